//! The systems users would pick instead of this overlay, each started in the same three-site
//! [`Lab`] (same VMs, same NAT) as `mvc` and n2n:
//!
//! | peer | layer | how the sites are joined |
//! |---|---|---|
//! | kernel VXLAN | L2 | `vxlan` device per frontend on the bridge, head-end replication to the other sites' public addresses; NAT routers forward UDP 4789 to their frontend (VXLAN has no NAT traversal) |
//! | tinc 1.0 | L2 | `Mode = switch` on the site TAP; B and C `ConnectTo` A |
//! | OpenVPN 2.6 | L2 | TAP mode on the site TAP, TLS with a throwaway PKI; server on A with `client-to-client`, B and C clients |
//! | nebula | L3 | lighthouse on A; each site's VM /24 is an `unsafe_route` via that site's nebula address |
//! | boringtun + `wg` | L3 | hub on A, B and C peers with keepalive; each site's VM /24 routed to the tunnel |
//! | gotatun + `wg` | L3 | as boringtun (gotatun is its fork) |
//!
//! L3 peers carry the VMs' overlay addresses (198.19.s.0/24) routed: the frontend answers
//! ARP for remote VMs (proxy ARP on the bridge) and routes them into the tunnel, with TCP
//! MSS clamped to the tunnel's MTU. L2 peers put their device on the bridge and the VMs'
//! MTU is set to what the tunnel carries without fragmenting the underlay.
//!
//! Missing peers are installed by [`Peer::ensure_installed`] (`apt-get install -y`, or
//! `cargo install --locked boringtun-cli` / `gotatun-cli`).
//!
//! In the two-host layout (`bench overlay --layout hosts`) only the WireGuard peers run,
//! on the hosts themselves: [`Peer::start_pair`].

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lab::{Error, Lab, Proc, Result, Site, Topology};

/// Overlay address of site `s`'s nebula interface (198.19.250.s/24).
fn nebula_ip(s: u8) -> String {
    format!("198.19.250.{s}")
}

/// Overlay address of site `s`'s WireGuard interface (198.19.251.s/24).
fn wg_ip(s: u8) -> String {
    format!("198.19.251.{s}")
}

/// The /24 of site `s`'s VMs inside the overlay network.
fn vm_net(s: u8) -> String {
    format!("198.19.{s}.0/24")
}

const VXLAN_PORT: u16 = 4789;
const TINC_PORT: u16 = 655;
const OPENVPN_PORT: u16 = 1194;
const NEBULA_PORT: u16 = 4242;
const WG_PORT: u16 = 51820;

/// A peer system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// Kernel VXLAN (unencrypted).
    Vxlan,
    /// nebula (Debian).
    Nebula,
    /// tinc 1.0 in switch mode (Debian).
    Tinc,
    /// OpenVPN in TAP mode (Debian).
    Openvpn,
    /// boringtun (crates.io), configured with `wg`.
    Boringtun,
    /// gotatun (crates.io), boringtun's fork, configured the same way.
    Gotatun,
}

impl Peer {
    /// Every peer, in table order.
    pub const ALL: [Peer; 6] = [
        Peer::Vxlan,
        Peer::Nebula,
        Peer::Tinc,
        Peer::Openvpn,
        Peer::Boringtun,
        Peer::Gotatun,
    ];

    /// The peer called `s` (as in `--systems`).
    pub fn parse(s: &str) -> Option<Peer> {
        Peer::ALL.into_iter().find(|p| p.name() == s)
    }

    /// Its name in `--systems`.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Vxlan => "vxlan",
            Peer::Nebula => "nebula",
            Peer::Tinc => "tinc",
            Peer::Openvpn => "openvpn",
            Peer::Boringtun => "boringtun",
            Peer::Gotatun => "gotatun",
        }
    }

    /// "L2" (frames on the VM bridge) or "L3" (routed through the frontend).
    pub fn layer(self) -> &'static str {
        match self {
            Peer::Nebula | Peer::Boringtun | Peer::Gotatun => "L3",
            _ => "L2",
        }
    }

    /// The data cipher as configured here.
    pub fn cipher(self) -> &'static str {
        match self {
            Peer::Vxlan => "none",
            Peer::Nebula | Peer::Openvpn => "aes-256-gcm",
            Peer::Tinc => "aes-256-cbc+sha256",
            Peer::Boringtun | Peer::Gotatun => "chacha20-poly1305",
        }
    }

    /// The VMs' MTU while the peer runs (1500 for L3 peers: MSS clamping does the rest).
    pub fn vm_mtu(self) -> u32 {
        match self {
            Peer::Vxlan => 1450,
            Peer::Tinc | Peer::Openvpn => 1400,
            Peer::Nebula | Peer::Boringtun | Peer::Gotatun => 1500,
        }
    }

    /// Debian package and the binaries it must provide.
    fn package(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Peer::Vxlan => ("iproute2", &["bridge"]),
            Peer::Nebula => ("nebula", &["nebula", "nebula-cert"]),
            Peer::Tinc => ("tinc", &["tincd"]),
            Peer::Openvpn => ("openvpn", &["openvpn", "openssl"]),
            Peer::Boringtun | Peer::Gotatun => ("wireguard-tools", &["wg"]),
        }
    }

    /// Installs what is missing: the Debian package (`apt-get install -y`), and for
    /// boringtun and gotatun also `cargo install --locked boringtun-cli` / `gotatun-cli`.
    pub fn ensure_installed(self) -> Result<()> {
        let (pkg, bins) = self.package();
        if bins.iter().any(|b| which(b).is_none()) {
            eprintln!("installing {pkg} (apt-get install -y)");
            let out = std::process::Command::new("apt-get")
                .args([
                    "-o",
                    "DPkg::Lock::Timeout=300",
                    "install",
                    "-y",
                    "-q",
                    "--no-install-recommends",
                    pkg,
                ])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| Error::Spawn {
                    cmd: format!("apt-get install {pkg}"),
                    source: e,
                })?;
            if !out.status.success() {
                return Err(Error::Command {
                    cmd: format!("apt-get install -y {pkg}"),
                    status: out.status.to_string(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
        }
        if let Some(krate) = self.wg_crate() {
            if self.wg_bin().is_none() {
                eprintln!("installing {krate} (cargo install --locked {krate})");
                lab::run(&["cargo", "install", "--locked", krate])?;
                if self.wg_bin().is_none() {
                    return Err(Error::Command {
                        cmd: format!("cargo install {krate}"),
                        status: "no binary".into(),
                        stderr: format!("{krate}'s binary not found in PATH or ~/.cargo/bin"),
                    });
                }
            }
        }
        Ok(())
    }

    /// The crate of a userspace WireGuard peer.
    fn wg_crate(self) -> Option<&'static str> {
        match self {
            Peer::Boringtun => Some("boringtun-cli"),
            Peer::Gotatun => Some("gotatun-cli"),
            _ => None,
        }
    }

    /// The installed binary of a userspace WireGuard peer (gotatun-cli installs `gotatun`).
    pub fn wg_bin(self) -> Option<PathBuf> {
        match self {
            Peer::Boringtun => cargo_bin("boringtun-cli"),
            Peer::Gotatun => cargo_bin("gotatun"),
            _ => None,
        }
    }

    /// The installed version, for the table ("nebula-1.6.1"); the bare name when unknown.
    pub fn label(self) -> String {
        let out = match self {
            Peer::Vxlan => return "vxlan".into(),
            Peer::Nebula => lab::run(&["nebula", "-version"]),
            Peer::Tinc => lab::run(&["tincd", "--version"]),
            Peer::Openvpn => {
                // openvpn --version exits 1.
                std::process::Command::new("openvpn")
                    .arg("--version")
                    .output()
                    .map(|o| lab::Out {
                        ok: true,
                        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                        stderr: String::new(),
                    })
                    .map_err(Error::from)
            }
            Peer::Boringtun | Peer::Gotatun => match self.wg_bin() {
                Some(b) => lab::run(&[&b.to_string_lossy(), "--version"]),
                None => return self.name().into(),
            },
        };
        let v = out.ok().and_then(|o| first_version(&o.stdout));
        match v {
            Some(v) => format!("{}-{v}", self.name()),
            None => self.name().into(),
        }
    }

    /// Starts the peer on every site of `topo`.
    pub fn start(self, lab: &Lab, topo: &Topology) -> Result<Running> {
        let mut r = Running {
            peer: self,
            procs: Vec::new(),
            undo: Vec::new(),
            files: Vec::new(),
        };
        let res = match self {
            Peer::Vxlan => start_vxlan(lab, topo, &mut r),
            Peer::Tinc => start_tinc(lab, topo, &mut r),
            Peer::Openvpn => start_openvpn(lab, topo, &mut r),
            Peer::Nebula => start_nebula(lab, topo, &mut r),
            Peer::Boringtun | Peer::Gotatun => start_wg(self, lab, topo, &mut r),
        };
        let res = res.and_then(|()| {
            for s in &topo.sites {
                topo.set_site_mtu(lab, s, self.vm_mtu())?;
                flush_vm_neighbours(lab, s);
            }
            Ok(())
        });
        match res {
            Ok(()) => Ok(r),
            Err(e) => {
                let _ = r.stop(lab, topo);
                Err(e)
            }
        }
    }
}

/// A started peer: its processes and what undoes its settings.
pub struct Running {
    /// Which peer.
    pub peer: Peer,
    procs: Vec<Proc>,
    /// (namespace, command) run in reverse order on stop.
    undo: Vec<(String, Vec<String>)>,
    files: Vec<PathBuf>,
}

impl Running {
    /// PIDs of the peer's processes (none for kernel VXLAN).
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.pid).collect()
    }

    /// The processes, e.g. for their logs.
    pub fn procs(&self) -> &[Proc] {
        &self.procs
    }

    /// Stops the processes, undoes routes, rules and devices, puts the sites' MTUs back to
    /// 1500 and gives the sites fresh TAPs.
    pub fn stop(self, lab: &Lab, topo: &Topology) -> Result<()> {
        self.release(lab);
        for s in &topo.sites {
            topo.reset_tap(lab, s)?;
            topo.set_site_mtu(lab, s, 1500)?;
            flush_vm_neighbours(lab, s);
        }
        Ok(())
    }

    /// Stops the processes and undoes routes, rules and devices (the two-host layout has
    /// no sites to reset).
    pub fn release(&self, lab: &Lab) {
        for p in &self.procs {
            lab.stop(p);
        }
        for (ns, cmd) in self.undo.iter().rev() {
            let argv: Vec<&str> = cmd.iter().map(String::as_str).collect();
            let _ = lab.exec_timeout(ns, &argv, Duration::from_secs(10));
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }

    fn then_undo(&mut self, ns: &str, cmd: &[&str]) {
        self.undo
            .push((ns.to_string(), cmd.iter().map(|s| s.to_string()).collect()));
    }
}

/// Forgets the VMs' and frontend's ARP entries, which point at the frontend (proxy ARP)
/// after an L3 peer and at remote VMs after an L2 one.
fn flush_vm_neighbours(lab: &Lab, s: &Site) {
    for vm in &s.vms {
        let _ = lab.ip(&vm.ns, &["neigh", "flush", "dev", &vm.ifname]);
    }
    let _ = lab.ip(&s.frontend, &["neigh", "flush", "dev", &s.bridge]);
}

fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// `bin` in PATH or in root's/the user's `~/.cargo/bin`.
fn cargo_bin(bin: &str) -> Option<PathBuf> {
    which(bin).or_else(|| {
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
        let p = home.join(".cargo/bin").join(bin);
        p.is_file().then_some(p)
    })
}

fn first_version(s: &str) -> Option<String> {
    s.split(|c: char| c.is_whitespace() || c == ',')
        .map(|w| w.trim_start_matches('v'))
        .find(|w| {
            let parts: Vec<&str> = w.split('.').collect();
            parts.len() >= 2
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        })
        .map(str::to_string)
}

/// An empty directory `name` in the lab's directory (a peer started again in the same lab,
/// at the next delay of a sweep, must not find the keys of its last start: nebula-cert
/// refuses to overwrite them, tincd -K appends).
fn fresh_dir(lab: &Lab, name: &str) -> Result<PathBuf> {
    let dir = lab.dir().join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text)?;
    Ok(())
}

/// Forwards `proto/port` arriving on a NATed site's public address to its frontend, as an
/// operator would for a tunnel without NAT traversal.
fn forward_port(lab: &Lab, s: &Site, proto: &str, port: u16, r: &mut Running) -> Result<()> {
    let Some(router) = &s.router else {
        return Ok(());
    };
    let (p, fe) = (port.to_string(), s.frontend_ip.to_string());
    let dnat = [
        "PREROUTING",
        "-i",
        "wan",
        "-p",
        proto,
        "--dport",
        &p,
        "-j",
        "DNAT",
        "--to-destination",
        &fe,
    ];
    let mut add = vec!["iptables", "-w", "-t", "nat", "-A"];
    add.extend(dnat);
    lab.exec(router, &add)?;
    let mut del = vec!["iptables", "-w", "-t", "nat", "-D"];
    del.extend(dnat);
    r.then_undo(router, &del);
    let accept = [
        "FORWARD", "-i", "wan", "-p", proto, "-d", &fe, "--dport", &p, "-j", "ACCEPT",
    ];
    let mut add = vec!["iptables", "-w", "-I"];
    add.extend(accept);
    lab.exec(router, &add)?;
    let mut del = vec!["iptables", "-w", "-D"];
    del.extend(accept);
    r.then_undo(router, &del);
    Ok(())
}

fn start_vxlan(lab: &Lab, topo: &Topology, r: &mut Running) -> Result<()> {
    for s in &topo.sites {
        forward_port(lab, s, "udp", VXLAN_PORT, r)?;
    }
    for s in &topo.sites {
        let fe = &s.frontend;
        let local = s.frontend_ip.to_string();
        let port = VXLAN_PORT.to_string();
        lab.ip(
            fe,
            &[
                "link", "add", "vx0", "type", "vxlan", "id", "4242", "local", &local, "dstport",
                &port, "ttl", "64",
            ],
        )?;
        r.then_undo(fe, &["ip", "link", "del", "vx0"]);
        lab.mtu(fe, "vx0", Peer::Vxlan.vm_mtu())?;
        if topo.sites.iter().any(|t| t.wan.is_some()) {
            // The WAN emulator forwards through AF_PACKET with a virtio-net header, which
            // has no UDP-tunnel GSO type: such super-frames would be dropped there. With
            // the emulator in the lab, segment TCP before encapsulation instead.
            lab.ip(fe, &["link", "set", "vx0", "gso_max_segs", "1"])?;
        }
        // Head-end replication of broadcasts to every other site; unicast is learned.
        for t in topo.sites.iter().filter(|t| t.idx != s.idx) {
            let dst = t.public_ip.to_string();
            lab.exec(
                fe,
                &[
                    "bridge",
                    "fdb",
                    "append",
                    "00:00:00:00:00:00",
                    "dev",
                    "vx0",
                    "dst",
                    &dst,
                ],
            )?;
        }
        lab.enslave(fe, "vx0", &s.bridge)?;
    }
    Ok(())
}

fn start_tinc(lab: &Lab, topo: &Topology, r: &mut Running) -> Result<()> {
    let hub = &topo.sites[0];
    let mut hosts = Vec::new();
    for s in &topo.sites {
        let dir = fresh_dir(lab, &format!("tinc-{}", s.name))?;
        std::fs::create_dir_all(dir.join("hosts"))?;
        let mut conf = format!(
            "Name = {}\nMode = switch\nInterface = {}\nDeviceType = tap\nAddressFamily = ipv4\n\
             Port = {TINC_PORT}\n",
            s.name, s.tap
        );
        if s.idx != hub.idx {
            let _ = writeln!(conf, "ConnectTo = {}", hub.name);
        }
        write(&dir.join("tinc.conf"), &conf)?;
        let d = dir.to_string_lossy().into_owned();
        lab::run(&["tincd", "-c", &d, "-K2048"])?;
        let host = dir.join("hosts").join(&s.name);
        let key = std::fs::read_to_string(&host)?;
        let mut text = String::new();
        if s.idx == hub.idx {
            let _ = writeln!(text, "Address = {}", s.public_ip);
        }
        let _ = write!(
            text,
            "Port = {TINC_PORT}\nCipher = aes-256-cbc\nDigest = sha256\n{key}"
        );
        hosts.push((s.name.clone(), text));
    }
    for s in &topo.sites {
        let dir = lab.dir().join(format!("tinc-{}", s.name));
        for (name, text) in &hosts {
            write(&dir.join("hosts").join(name), text)?;
        }
        topo.reset_tap(lab, s)?;
        let d = dir.to_string_lossy().into_owned();
        let pid = format!("--pidfile={d}/tinc.pid");
        let p = lab.spawn(
            &s.frontend,
            &format!("tinc-{}", s.name),
            &["tincd", "-c", &d, "-D", "-d1", &pid],
        )?;
        r.procs.push(p);
    }
    Ok(())
}

/// A throwaway PKI for OpenVPN: CA, server and client certificates (P-256).
fn openvpn_pki(dir: &Path) -> Result<()> {
    let f = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["openssl", "req", "-x509"];
    let (ca_key, ca_crt) = (f("ca.key"), f("ca.crt"));
    ca.extend(ec);
    ca.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca_crt,
        "-days",
        "2",
        "-subj",
        "/CN=mvc-bench-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    lab::run(&ca)?;
    for (name, eku) in [("server", "serverAuth"), ("client", "clientAuth")] {
        let (key, csr, crt, ext) = (
            f(&format!("{name}.key")),
            f(&format!("{name}.csr")),
            f(&format!("{name}.crt")),
            f(&format!("{name}.ext")),
        );
        let mut req = vec!["openssl", "req"];
        req.extend(ec);
        let subj = format!("/CN={name}");
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        lab::run(&req)?;
        write(
            Path::new(&ext),
            &format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyAgreement\n\
                 extendedKeyUsage={eku}\n"
            ),
        )?;
        lab::run(&[
            "openssl",
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &ext,
        ])?;
    }
    Ok(())
}

fn start_openvpn(lab: &Lab, topo: &Topology, r: &mut Running) -> Result<()> {
    let dir = fresh_dir(lab, "openvpn")?;
    openvpn_pki(&dir)?;
    let d = dir.to_string_lossy().into_owned();
    let hub = &topo.sites[0];
    for s in &topo.sites {
        topo.reset_tap(lab, s)?;
        let conf = if s.idx == hub.idx {
            format!(
                "mode server\ntls-server\nproto udp4\nlocal {ip}\nport {OPENVPN_PORT}\n\
                 dev {tap}\ndev-type tap\nca {d}/ca.crt\ncert {d}/server.crt\n\
                 key {d}/server.key\ndh none\nclient-to-client\nduplicate-cn\n\
                 keepalive 5 30\nverb 3\n",
                ip = s.public_ip,
                tap = s.tap
            )
        } else {
            format!(
                "client\nproto udp4\nremote {ip} {OPENVPN_PORT}\nnobind\ndev {tap}\n\
                 dev-type tap\nca {d}/ca.crt\ncert {d}/client.crt\nkey {d}/client.key\n\
                 remote-cert-tls server\nkeepalive 5 30\nverb 3\n",
                ip = hub.public_ip,
                tap = s.tap
            )
        };
        let file = dir.join(format!("{}.conf", s.name));
        write(&file, &conf)?;
        let p = lab.spawn(
            &s.frontend,
            &format!("openvpn-{}", s.name),
            &["openvpn", "--config", &file.to_string_lossy()],
        )?;
        r.procs.push(p);
        if s.idx == hub.idx {
            let p = r.procs[0].clone();
            lab.wait_until("openvpn server up", Duration::from_secs(15), || {
                lab.log(&p).contains("Initialization Sequence Completed") || !lab.running(&p)
            })?;
            if !lab.running(&p) {
                return Err(Error::Command {
                    cmd: "openvpn (server)".into(),
                    status: "exited".into(),
                    stderr: lab.log(&p),
                });
            }
        }
    }
    Ok(())
}

/// Routing for L3 peers on every frontend: the site's own VM /24 on the bridge, proxy ARP
/// so VMs reach remote overlay addresses through the frontend, MSS clamped to the tunnel.
fn l3_frontends(lab: &Lab, topo: &Topology, r: &mut Running) -> Result<()> {
    for s in &topo.sites {
        let fe = &s.frontend;
        let net = vm_net(s.idx);
        lab.ip(fe, &["route", "add", &net, "dev", &s.bridge])?;
        r.then_undo(fe, &["ip", "route", "del", &net, "dev", &s.bridge]);
        let br = &s.bridge;
        lab.sysctl(fe, &format!("net.ipv4.conf.{br}.proxy_arp"), "1")?;
        lab.sysctl(fe, &format!("net.ipv4.neigh.{br}.proxy_delay"), "0")?;
        let key = format!("net.ipv4.conf.{br}.proxy_arp=0");
        r.then_undo(fe, &["sysctl", "-qw", &key]);
        let clamp = [
            "FORWARD",
            "-p",
            "tcp",
            "--tcp-flags",
            "SYN,RST",
            "SYN",
            "-j",
            "TCPMSS",
            "--clamp-mss-to-pmtu",
        ];
        let mut add = vec!["-t", "mangle", "-A"];
        add.extend(clamp);
        lab.iptables(fe, &add)?;
        let mut del = vec!["iptables", "-w", "-t", "mangle", "-D"];
        del.extend(clamp);
        r.then_undo(fe, &del);
    }
    Ok(())
}

fn start_nebula(lab: &Lab, topo: &Topology, r: &mut Running) -> Result<()> {
    let dir = fresh_dir(lab, "nebula")?;
    let f = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let (ca_crt, ca_key) = (f("ca.crt"), f("ca.key"));
    lab::run(&[
        "nebula-cert",
        "ca",
        "-name",
        "mvc-bench",
        "-duration",
        "48h",
        "-out-crt",
        &ca_crt,
        "-out-key",
        &ca_key,
    ])?;
    let hub = &topo.sites[0];
    for s in &topo.sites {
        let (crt, key) = (f(&format!("{}.crt", s.name)), f(&format!("{}.key", s.name)));
        let ip = format!("{}/24", nebula_ip(s.idx));
        lab::run(&[
            "nebula-cert",
            "sign",
            "-ca-crt",
            &ca_crt,
            "-ca-key",
            &ca_key,
            "-name",
            &s.name,
            "-ip",
            &ip,
            "-subnets",
            &vm_net(s.idx),
            "-out-crt",
            &crt,
            "-out-key",
            &key,
        ])?;
    }
    l3_frontends(lab, topo, r)?;
    for s in &topo.sites {
        let is_hub = s.idx == hub.idx;
        let mut routes = String::new();
        for t in topo.sites.iter().filter(|t| t.idx != s.idx) {
            let _ = write!(
                routes,
                "\n    - route: {}\n      via: {}",
                vm_net(t.idx),
                nebula_ip(t.idx)
            );
        }
        let conf = format!(
            "pki:\n  ca: {ca_crt}\n  cert: {crt}\n  key: {key}\n\
             static_host_map:\n  \"{hub_ip}\": [\"{hub_pub}:{NEBULA_PORT}\"]\n\
             lighthouse:\n  am_lighthouse: {is_hub}\n  interval: 10\n  hosts: [{hosts}]\n\
             listen:\n  host: 0.0.0.0\n  port: {NEBULA_PORT}\n\
             punchy:\n  punch: true\n  respond: true\n\
             tun:\n  disabled: false\n  dev: nb0\n  mtu: 1300\n  unsafe_routes:{routes}\n\
             logging:\n  level: info\n\
             firewall:\n  outbound:\n    - port: any\n      proto: any\n      host: any\n\
             \x20 inbound:\n    - port: any\n      proto: any\n      host: any\n",
            crt = f(&format!("{}.crt", s.name)),
            key = f(&format!("{}.key", s.name)),
            hub_ip = nebula_ip(hub.idx),
            hub_pub = hub.public_ip,
            hosts = if is_hub {
                String::new()
            } else {
                format!("\"{}\"", nebula_ip(hub.idx))
            },
        );
        let file = dir.join(format!("{}.yml", s.name));
        write(&file, &conf)?;
        let p = lab.spawn(
            &s.frontend,
            &format!("nebula-{}", s.name),
            &["nebula", "-config", &file.to_string_lossy()],
        )?;
        r.procs.push(p);
    }
    // Nebula makes its tun device and routes itself; wait for them.
    for s in &topo.sites {
        lab.wait_until("nebula tun up", Duration::from_secs(15), || {
            lab.ip(&s.frontend, &["route", "show", "dev", "nb0"])
                .is_ok_and(|o| o.stdout.contains("198.19."))
        })?;
    }
    Ok(())
}

/// Key pairs for userspace WireGuard, one per name: the private key's file in `dir` and
/// the public key.
fn wg_keys(dir: &Path, names: &[&str]) -> Result<Vec<(PathBuf, String)>> {
    let mut keys = Vec::new();
    for name in names {
        let private = lab::run(&["wg", "genkey"])?.stdout.trim().to_string();
        let key_file = dir.join(format!("{name}.key"));
        write(&key_file, &private)?;
        let public = std::process::Command::new("sh")
            .args(["-c", "wg pubkey < \"$0\"", &key_file.to_string_lossy()])
            .output()
            .map_err(Error::from)?;
        let public = String::from_utf8_lossy(&public.stdout).trim().to_string();
        if public.is_empty() {
            return Err(Error::Parse {
                what: "wg pubkey".into(),
                detail: "empty".into(),
            });
        }
        keys.push((key_file, public));
    }
    Ok(keys)
}

/// The name of the WireGuard interface number `i` of this lab: the userspace API socket
/// (/var/run/wireguard/<if>.sock) is global, so the name carries the lab's unique prefix.
fn wg_ifname(lab: &Lab, i: u8) -> String {
    let p = lab.prefix();
    let tail = &p[p.len().saturating_sub(11)..];
    format!("w{tail}{i}")
}

/// Starts userspace WireGuard `peer` in `ns` on interface `wif` with the private key in
/// `key`, listening on [`WG_PORT`].
fn wg_up(
    lab: &Lab,
    peer: Peer,
    ns: &str,
    label: &str,
    wif: &str,
    key: &Path,
    r: &mut Running,
) -> Result<()> {
    let krate = peer.wg_crate().unwrap_or("boringtun-cli");
    let bin = peer.wg_bin().ok_or_else(|| Error::Command {
        cmd: krate.into(),
        status: "missing".into(),
        stderr: format!("not installed (bench installs it with cargo install {krate})"),
    })?;
    let sock = PathBuf::from(format!("/var/run/wireguard/{wif}.sock"));
    let _ = std::fs::remove_file(&sock);
    r.files.push(sock.clone());
    let proc = lab.spawn(
        ns,
        label,
        &[
            &bin.to_string_lossy(),
            wif,
            "--foreground",
            "--disable-drop-privileges",
        ],
    )?;
    r.procs.push(proc.clone());
    lab.wait_until(&format!("{krate} socket"), Duration::from_secs(10), || {
        sock.exists() || !lab.running(&proc)
    })?;
    if !lab.running(&proc) {
        return Err(Error::Command {
            cmd: krate.into(),
            status: "exited".into(),
            stderr: lab.log(&proc),
        });
    }
    let key = key.to_string_lossy().into_owned();
    let port = WG_PORT.to_string();
    lab.exec(
        ns,
        &["wg", "set", wif, "private-key", &key, "listen-port", &port],
    )?;
    Ok(())
}

/// Adds a peer to interface `wif`; with `endpoint`, kept alive every 5 s.
fn wg_peer(
    lab: &Lab,
    ns: &str,
    wif: &str,
    public: &str,
    allowed: &str,
    endpoint: Option<&str>,
) -> Result<()> {
    let mut cmd = vec!["wg", "set", wif, "peer", public, "allowed-ips", allowed];
    if let Some(ep) = endpoint {
        cmd.extend(["endpoint", ep, "persistent-keepalive", "5"]);
    }
    lab.exec(ns, &cmd)?;
    Ok(())
}

/// Gives interface `wif` its address (a /24) and WireGuard's MTU, and brings it up.
fn wg_addr(lab: &Lab, ns: &str, wif: &str, ip: &str) -> Result<()> {
    lab.ip(ns, &["addr", "add", &format!("{ip}/24"), "dev", wif])?;
    lab.ip(ns, &["link", "set", wif, "mtu", "1420", "up"])?;
    Ok(())
}

fn start_wg(peer: Peer, lab: &Lab, topo: &Topology, r: &mut Running) -> Result<()> {
    let dir = fresh_dir(lab, "wg")?;
    let names: Vec<&str> = topo.sites.iter().map(|s| s.name.as_str()).collect();
    let keys = wg_keys(&dir, &names)?;
    l3_frontends(lab, topo, r)?;
    let hub = &topo.sites[0];
    for (i, s) in topo.sites.iter().enumerate() {
        let (fe, wif) = (&s.frontend, wg_ifname(lab, s.idx));
        let label = format!("{}-{}", peer.name(), s.name);
        wg_up(lab, peer, fe, &label, &wif, &keys[i].0, r)?;
        for (j, t) in topo.sites.iter().enumerate() {
            if t.idx == s.idx || (s.idx != hub.idx && t.idx != hub.idx) {
                continue;
            }
            let peer_key = &keys[j].1;
            if s.idx == hub.idx {
                let allowed = format!("{}/32,{}", wg_ip(t.idx), vm_net(t.idx));
                wg_peer(lab, fe, &wif, peer_key, &allowed, None)?;
            } else {
                let ep = format!("{}:{WG_PORT}", t.public_ip);
                wg_peer(lab, fe, &wif, peer_key, "198.19.0.0/16", Some(&ep))?;
            }
        }
        wg_addr(lab, fe, &wif, &wg_ip(s.idx))?;
        for t in topo.sites.iter().filter(|t| t.idx != s.idx) {
            lab.ip(fe, &["route", "add", &vm_net(t.idx), "dev", &wif])?;
        }
    }
    Ok(())
}

/// One end of the two-host layout: its namespace and underlay address.
#[derive(Debug, Clone)]
pub struct HostEnd {
    /// Namespace.
    pub ns: String,
    /// Underlay address.
    pub ip: Ipv4Addr,
}

impl Peer {
    /// Starts a userspace WireGuard peer (boringtun, gotatun) on two hosts joined directly:
    /// interface addresses 198.19.251.1 (`a`) and .2 (`b`), `b` keeping the session alive.
    /// Returns the running peer and `a`'s tunnel address (the server's).
    pub fn start_pair(self, lab: &Lab, a: &HostEnd, b: &HostEnd) -> Result<(Running, Ipv4Addr)> {
        let mut r = Running {
            peer: self,
            procs: Vec::new(),
            undo: Vec::new(),
            files: Vec::new(),
        };
        let res = (|| -> Result<Ipv4Addr> {
            if self.wg_crate().is_none() {
                return Err(Error::Command {
                    cmd: self.name().into(),
                    status: "unsupported".into(),
                    stderr: "only boringtun and gotatun run in the two-host layout".into(),
                });
            }
            let dir = fresh_dir(lab, "wg")?;
            let keys = wg_keys(&dir, &["a", "b"])?;
            let ends = [(a, 1u8, b, 2u8), (b, 2, a, 1)];
            for (k, (me, i, other, j)) in ends.iter().enumerate() {
                let wif = wg_ifname(lab, *i);
                let label = format!("{}-{}", self.name(), if k == 0 { "a" } else { "b" });
                wg_up(lab, self, &me.ns, &label, &wif, &keys[k].0, &mut r)?;
                let allowed = format!("{}/32", wg_ip(*j));
                let ep = format!("{}:{WG_PORT}", other.ip);
                let ep = (k == 1).then_some(ep.as_str());
                wg_peer(lab, &me.ns, &wif, &keys[1 - k].1, &allowed, ep)?;
                wg_addr(lab, &me.ns, &wif, &wg_ip(*i))?;
            }
            wg_ip(1).parse().map_err(|_| Error::Parse {
                what: "tunnel address".into(),
                detail: wg_ip(1),
            })
        })();
        match res {
            Ok(ip) => Ok((r, ip)),
            Err(e) => {
                r.release(lab);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_versions_parse() {
        for p in Peer::ALL {
            assert_eq!(Peer::parse(p.name()), Some(p));
        }
        assert_eq!(Peer::parse("mvc"), None);
        assert_eq!(
            first_version("tinc version 1.0.36 (built ...)").as_deref(),
            Some("1.0.36")
        );
        assert_eq!(first_version("Version: 1.6.1").as_deref(), Some("1.6.1"));
        assert_eq!(first_version("boringtun 0.6.0").as_deref(), Some("0.6.0"));
        assert_eq!(first_version("no version here"), None);
    }

    #[test]
    fn overlay_addresses_stay_in_the_lab_range() {
        for s in 1..=9 {
            for a in [nebula_ip(s), wg_ip(s)] {
                assert!(a.starts_with("198.19."), "{a}");
            }
            assert!(vm_net(s).starts_with("198.19."));
        }
    }
}
