//! Running overlays in a [`Lab`]: this project's `mvc supernode` / `mvc edge` (through the
//! command-line contract documented in docs/BENCH.md) and Debian's n2n 1.3.1, the baseline.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::{Error, Lab, Proc, Result, Site, Topology};

/// The default supernode port.
pub const SUPERNODE_PORT: u16 = 7654;
/// The UDP port the lab's edges listen on (fixed so tests can aim at it).
pub const EDGE_PORT: u16 = 7700;

/// Where a `mvc` binary is.
#[derive(Debug, Clone)]
pub struct Mvc {
    /// Path of the binary.
    pub bin: PathBuf,
}

/// A running `mvc supernode`.
#[derive(Debug, Clone)]
pub struct Supernode {
    /// The process.
    pub proc: Proc,
    /// Its namespace.
    pub ns: String,
    /// Its status socket.
    pub sock: PathBuf,
    /// The address it listens on.
    pub addr: SocketAddrV4,
}

/// A running `mvc edge`.
#[derive(Debug, Clone)]
pub struct Edge {
    /// The process.
    pub proc: Proc,
    /// Its name.
    pub name: String,
    /// Its namespace (the site frontend).
    pub ns: String,
    /// Its status socket.
    pub sock: PathBuf,
}

/// Options of one `mvc edge`.
#[derive(Debug, Clone)]
pub struct EdgeOpts {
    /// Edge name.
    pub name: String,
    /// Community.
    pub community: String,
    /// Community secret (written to a file, passed with `--secret-file`).
    pub secret: String,
    /// Supernodes, in order.
    pub supernodes: Vec<SocketAddrV4>,
    /// `--cipher`, when not the default.
    pub cipher: Option<String>,
    /// `--datapath`, when not the default.
    pub datapath: Option<String>,
    /// UDP port to listen on (`--listen 0.0.0.0:PORT`).
    pub port: Option<u16>,
    /// `--tap` name instead of the site's TAP (the XDP datapath's veth port is named by it).
    pub tap: Option<String>,
    /// `--bridge`: the VM bridge the XDP datapath puts its port on.
    pub bridge: Option<String>,
    /// `--threads`, when above 1 ([`MvcCluster::start`] then makes the site's TAP
    /// multi-queue, as a TAP edge with several threads needs).
    pub threads: u32,
    /// Further flags, appended as given.
    pub extra: Vec<String>,
}

impl EdgeOpts {
    /// An edge for `site` in community `community` with secret `secret`, on port
    /// [`EDGE_PORT`], named after the site.
    pub fn new(site: &Site, community: &str, secret: &str, supernodes: &[SocketAddrV4]) -> Self {
        EdgeOpts {
            name: site.name.clone(),
            community: community.into(),
            secret: secret.into(),
            supernodes: supernodes.to_vec(),
            cipher: None,
            datapath: None,
            port: Some(EDGE_PORT),
            tap: None,
            bridge: None,
            threads: 1,
            extra: Vec::new(),
        }
    }

    /// Turns the edge's L2 control plane on or off (`--l2-control on|off`, appended to
    /// [`EdgeOpts::extra`]).
    pub fn l2_control(&mut self, on: bool) {
        self.extra
            .extend(["--l2-control".into(), if on { "on" } else { "off" }.into()]);
    }
}

impl Mvc {
    /// Starts `mvc supernode` in `ns` on `addr` and waits until its status answers.
    pub fn supernode(
        &self,
        lab: &Lab,
        ns: &str,
        addr: SocketAddrV4,
        label: &str,
    ) -> Result<Supernode> {
        self.supernode_with(lab, ns, addr, label, &[])
    }

    /// [`Mvc::supernode`] with further flags (`extra`, appended as given).
    pub fn supernode_with(
        &self,
        lab: &Lab,
        ns: &str,
        addr: SocketAddrV4,
        label: &str,
        extra: &[&str],
    ) -> Result<Supernode> {
        let sock = lab.dir().join(format!("{label}.sock"));
        let _ = std::fs::remove_file(&sock);
        // Its identity lives in the lab (kept when the same label is started again).
        let key = lab.dir().join(format!("{label}.key"));
        let bin = self.bin.to_string_lossy();
        let (a, s, k) = (
            addr.to_string(),
            sock.to_string_lossy().into_owned(),
            key.to_string_lossy().into_owned(),
        );
        let mut argv: Vec<&str> = vec![
            &bin,
            "supernode",
            "--listen",
            &a,
            "--status-socket",
            &s,
            "--key-file",
            &k,
        ];
        argv.extend_from_slice(extra);
        let proc = lab.spawn(ns, label, &argv)?;
        let sn = Supernode {
            proc,
            ns: ns.into(),
            sock,
            addr,
        };
        self.wait_ready(lab, &sn.proc, || self.supernode_status(lab, &sn).is_ok())?;
        Ok(sn)
    }

    /// Starts `mvc edge` on `site`'s frontend, attached to the site's TAP, and waits until
    /// its status answers.
    pub fn edge(&self, lab: &Lab, site: &Site, o: &EdgeOpts) -> Result<Edge> {
        let label = format!("edge-{}", o.name);
        let sock = lab.dir().join(format!("{label}.sock"));
        let _ = std::fs::remove_file(&sock);
        let secret_file = lab.dir().join(format!("{label}.secret"));
        crate::write_private(&secret_file, o.secret.as_bytes())?;
        let bin = self.bin.to_string_lossy().into_owned();
        let mut args: Vec<String> = vec![
            bin,
            "edge".into(),
            "--name".into(),
            o.name.clone(),
            "--community".into(),
            o.community.clone(),
            "--secret-file".into(),
            secret_file.to_string_lossy().into_owned(),
            "--tap".into(),
            o.tap.clone().unwrap_or_else(|| site.tap.clone()),
            "--status-socket".into(),
            sock.to_string_lossy().into_owned(),
        ];
        for sn in &o.supernodes {
            args.extend(["--supernode".into(), sn.to_string()]);
        }
        if let Some(c) = &o.cipher {
            args.extend(["--cipher".into(), c.clone()]);
        }
        if let Some(d) = &o.datapath {
            args.extend(["--datapath".into(), d.clone()]);
        }
        if let Some(b) = &o.bridge {
            args.extend(["--bridge".into(), b.clone()]);
        }
        if let Some(p) = o.port {
            args.extend(["--listen".into(), format!("0.0.0.0:{p}")]);
        }
        if o.threads > 1 {
            args.extend(["--threads".into(), o.threads.to_string()]);
        }
        args.extend(o.extra.iter().cloned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = lab.spawn(&site.frontend, &label, &argv)?;
        let e = Edge {
            proc,
            name: o.name.clone(),
            ns: site.frontend.clone(),
            sock,
        };
        self.wait_ready(lab, &e.proc, || self.edge_status(lab, &e).is_ok())?;
        Ok(e)
    }

    fn wait_ready(&self, lab: &Lab, p: &Proc, mut ok: impl FnMut() -> bool) -> Result<()> {
        lab.wait_until(
            &format!("{} answering status", p.name),
            Duration::from_secs(10),
            || ok() || !lab.running(p),
        )?;
        if lab.running(p) {
            Ok(())
        } else {
            Err(Error::Command {
                cmd: p.name.clone(),
                status: format!("{:?}", lab.exit_status(p)),
                stderr: lab.log(p),
            })
        }
    }

    fn status(&self, lab: &Lab, ns: &str, what: &str, sock: &Path) -> Result<Value> {
        let bin = self.bin.to_string_lossy();
        let s = sock.to_string_lossy();
        let out = lab.exec_timeout(
            ns,
            &[&bin, what, "status", "--status-socket", &s, "--json"],
            Duration::from_secs(5),
        )?;
        if !out.ok {
            return Err(Error::Command {
                cmd: format!("mvc {what} status"),
                status: "failed".into(),
                stderr: out.stderr,
            });
        }
        serde_json::from_str(&out.stdout).map_err(|e| Error::Parse {
            what: format!("mvc {what} status --json"),
            detail: format!("{e}: {}", out.stdout),
        })
    }

    /// `mvc edge status --json`.
    pub fn edge_status(&self, lab: &Lab, e: &Edge) -> Result<Value> {
        self.status(lab, &e.ns, "edge", &e.sock)
    }

    /// `mvc supernode status --json`.
    pub fn supernode_status(&self, lab: &Lab, sn: &Supernode) -> Result<Value> {
        self.status(lab, &sn.ns, "supernode", &sn.sock)
    }

    /// The human-readable status table (`mvc edge|supernode status`).
    pub fn status_table(&self, lab: &Lab, ns: &str, what: &str, sock: &Path) -> Result<String> {
        let bin = self.bin.to_string_lossy();
        let s = sock.to_string_lossy();
        let out = lab.exec(ns, &[&bin, what, "status", "--status-socket", &s])?;
        Ok(out.stdout)
    }

    /// The path (`"direct"`/`"relayed"`) `e` reports towards peer `peer`, if it knows it.
    pub fn path_to(&self, lab: &Lab, e: &Edge, peer: &str) -> Option<String> {
        let st = self.edge_status(lab, e).ok()?;
        peer_entry(&st, peer)?
            .get("path")
            .and_then(Value::as_str)
            .map(str::to_string)
    }
}

/// The entry of peer `name` in an edge's status.
pub fn peer_entry<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status
        .get("peers")?
        .as_array()?
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
}

/// The sum of all drop counters of a status document.
pub fn drops_total(status: &Value) -> u64 {
    status
        .get("drops")
        .and_then(Value::as_object)
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0)
}

/// Names of the edges a supernode status lists (all communities).
pub fn supernode_edges(status: &Value) -> Vec<String> {
    let mut v = Vec::new();
    for c in status
        .get("communities")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for e in c
            .get("edges")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(n) = e.get("name").and_then(Value::as_str) {
                v.push(n.to_string());
            }
        }
    }
    v.sort();
    v
}

/// A supernode and one edge per site, all of `mvc`.
pub struct MvcCluster {
    /// The binary.
    pub mvc: Mvc,
    /// The supernode (on site A's frontend).
    pub supernode: Supernode,
    /// Edges by site name.
    pub edges: BTreeMap<String, Edge>,
}

/// Community and secret of the lab clusters.
pub const COMMUNITY: &str = "lab";
/// The lab cluster's secret.
pub const SECRET: &str = "lab-secret-5b1f0c";

impl MvcCluster {
    /// Starts a supernode on the first site's frontend and an edge on every site, with
    /// `tweak` applied to each edge's options.
    pub fn start(
        lab: &Lab,
        topo: &Topology,
        mvc: &Mvc,
        mut tweak: impl FnMut(&mut EdgeOpts),
    ) -> Result<MvcCluster> {
        let a = &topo.sites[0];
        let sn_addr = SocketAddrV4::new(a.public_ip, SUPERNODE_PORT);
        let supernode = mvc.supernode(lab, &a.frontend, sn_addr, "supernode")?;
        let mut edges = BTreeMap::new();
        for s in &topo.sites {
            let mut o = EdgeOpts::new(s, COMMUNITY, SECRET, &[sn_addr]);
            tweak(&mut o);
            topo.reset_tap_queues(lab, s, o.threads > 1)?;
            edges.insert(s.name.clone(), mvc.edge(lab, s, &o)?);
        }
        Ok(MvcCluster {
            mvc: mvc.clone(),
            supernode,
            edges,
        })
    }

    /// The README's three sites ([`Topology::three_sites`], `vms` VMs each) with a cluster
    /// on them, every edge's L2 control plane on or off (`l2_control`).
    pub fn three_sites(
        lab: &Lab,
        mvc: &Mvc,
        vms: u8,
        l2_control: bool,
    ) -> Result<(Topology, MvcCluster)> {
        let t = Topology::three_sites(lab, vms)?;
        let c = MvcCluster::start(lab, &t, mvc, |o| o.l2_control(l2_control))?;
        Ok((t, c))
    }

    /// The edge of site `name`.
    pub fn edge(&self, name: &str) -> &Edge {
        &self.edges[name]
    }

    /// Waits until edge `from` reports path `path` towards `to`.
    pub fn wait_path(
        &self,
        lab: &Lab,
        from: &str,
        to: &str,
        path: &str,
        limit: Duration,
    ) -> Result<()> {
        let e = self.edge(from);
        lab.wait_until(&format!("edge {from} -> {to} path {path}"), limit, || {
            self.mvc.path_to(lab, e, to).as_deref() == Some(path)
        })
    }

    /// PIDs of the cluster's processes (supernode and edges).
    pub fn pids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.edges.values().map(|e| e.proc.pid).collect();
        v.push(self.supernode.proc.pid);
        v
    }

    /// Stops every process of the cluster.
    pub fn stop(&self, lab: &Lab) {
        for e in self.edges.values() {
            lab.stop(&e.proc);
        }
        lab.stop(&self.supernode.proc);
    }
}

/// Debian's n2n 1.3.1 (`/usr/sbin/edge`, `/usr/bin/supernode`) in a lab.
pub struct N2n {
    /// Supernode process.
    pub supernode: Proc,
    /// Edge processes.
    pub edges: Vec<Proc>,
}

/// n2n's default TAP MTU; the sites' VM interfaces are set to it while n2n runs.
pub const N2N_MTU: u32 = 1400;

impl N2n {
    /// Starts n2n's supernode on the first site's frontend and an n2n edge on every site
    /// (with forwarding `-r`, so bridged VMs are reachable), listening on [`EDGE_PORT`].
    pub fn start(lab: &Lab, topo: &Topology) -> Result<N2n> {
        let a = &topo.sites[0];
        let supernode = lab.spawn(
            &a.frontend,
            "n2n-supernode",
            &["supernode", "-l", &SUPERNODE_PORT.to_string()],
        )?;
        let sn = format!("{}:{SUPERNODE_PORT}", a.public_ip);
        let mut edges = Vec::new();
        for s in &topo.sites {
            topo.reset_tap(lab, s)?;
            // The TAP's own address (n2n requires one): 198.19.s.1/16.
            let ip = format!("198.19.{}.1", s.idx);
            let mac = format!("02:4e:32:00:{:02x}:01", s.idx);
            let p = lab.spawn_env(
                &s.frontend,
                &format!("n2n-edge-{}", s.name),
                &[
                    "edge",
                    "-d",
                    &s.tap,
                    "-a",
                    &ip,
                    "-s",
                    "255.255.0.0",
                    "-c",
                    COMMUNITY,
                    "-l",
                    &sn,
                    "-p",
                    &EDGE_PORT.to_string(),
                    "-m",
                    &mac,
                    "-M",
                    &N2N_MTU.to_string(),
                    "-r",
                ],
                &[("N2N_KEY", SECRET)],
            )?;
            edges.push(p);
        }
        for s in &topo.sites {
            topo.set_site_mtu(lab, s, N2N_MTU)?;
        }
        Ok(N2n { supernode, edges })
    }

    /// PIDs of n2n's processes.
    pub fn pids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.edges.iter().map(|p| p.pid).collect();
        v.push(self.supernode.pid);
        v
    }

    /// Stops n2n and puts the sites' MTUs back to 1500.
    pub fn stop(&self, lab: &Lab, topo: &Topology) -> Result<()> {
        for p in &self.edges {
            lab.stop(p);
        }
        lab.stop(&self.supernode);
        for s in &topo.sites {
            // n2n leaves its address on the TAP; take it away with the MTU.
            let _ = lab.ip(&s.frontend, &["addr", "flush", "dev", &s.tap]);
            topo.set_site_mtu(lab, s, 1500)?;
        }
        Ok(())
    }
}
