//! XDP port tests in throwaway network namespaces.
//!
//! Each test builds a lab (the `lab` crate: namespaces torn down on drop, also when the
//! test fails): a "host" namespace holding a bridge `br0` and a "VM" namespace attached
//! to it by veth. The test body runs on a thread that entered the host namespace, so
//! the ports it opens and the commands it runs live there.
//! Needs root; skips with a message otherwise. The XDP program must have been
//! built (bpf-linker and nightly rust-src present): as root, a missing program
//! fails the tests unless `MVC_XDP_OPTIONAL=1`.

use std::{
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    os::fd::AsRawFd,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use dataplane::offload;
use dataplane::xdp::{
    self, link_info, DatapathRequest, HookMode, ModeRequest, XdpPort, XdpPortConfig,
};

const VM_IP: &str = "198.18.77.1";
const PEER_IP: [u8; 4] = [198, 18, 77, 2];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x77, 0x02];

fn skip_reason() -> Option<String> {
    if !lab::is_root() {
        return Some("needs root (network namespaces, XDP)".into());
    }
    if let Err(e @ xdp::Error::NotBuilt(_)) = xdp::availability() {
        if std::env::var("MVC_XDP_OPTIONAL").is_ok_and(|v| v == "1") {
            return Some(e.to_string());
        }
        panic!("{e} (set MVC_XDP_OPTIONAL=1 to skip)");
    }
    None
}

macro_rules! require_root {
    ($name:literal) => {
        if let Some(why) = skip_reason() {
            lab::skip($name, &why);
            return;
        }
    };
}

/// Runs a command in the current namespace (the lab's host namespace, from a test body);
/// panics on failure.
fn run(cmd: &[&str]) -> String {
    lab::run(cmd).unwrap_or_else(|e| panic!("{e}")).stdout
}

/// The host namespace with its bridge `br0` and the VM namespace whose `eth0` is the
/// bridge's port `vm0`.
struct Lab {
    lab: lab::Lab,
    host: String,
    vm: String,
}

impl Lab {
    fn with_mtu(mtu: u32) -> Self {
        let lab = lab::Lab::new("xdp").expect("lab");
        let host = lab.add_ns("host").expect("host namespace");
        let vm = lab.add_ns("vm").expect("VM namespace");
        lab.bridge(&host, "br0").expect("bridge");
        lab.veth(&host, "vm0", &vm, "eth0").expect("veth");
        lab.mtu(&host, "vm0", mtu).expect("mtu");
        lab.mtu(&vm, "eth0", mtu).expect("mtu");
        lab.enslave(&host, "vm0", "br0").expect("enslave");
        let ip: Ipv4Addr = VM_IP.parse().expect("VM_IP");
        lab.addr(&vm, "eth0", ip, 24).expect("addr");
        let peer = PEER_IP.map(|b| b.to_string()).join(".");
        let mac = PEER_MAC.map(|b| format!("{b:02x}")).join(":");
        lab.ip(
            &vm,
            &[
                "neigh",
                "replace",
                &peer,
                "lladdr",
                &mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        )
        .expect("neighbour");
        Self { lab, host, vm }
    }

    /// A second VM namespace on the bridge with address `ip`/24; returns
    /// its name for `ip netns exec`.
    fn add_vm(&self, ip: &str) -> String {
        let ns = self.lab.add_ns("vm2").expect("VM namespace");
        self.lab.veth(&self.host, "vm1", &ns, "eth0").expect("veth");
        self.lab.enslave(&self.host, "vm1", "br0").expect("enslave");
        let ip: Ipv4Addr = ip.parse().expect("address");
        self.lab.addr(&ns, "eth0", ip, 24).expect("addr");
        ns
    }

    fn vm_cmd(&self, cmd: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.vm]).args(cmd);
        c
    }

    fn vm_run(&self, cmd: &[&str]) -> String {
        self.lab
            .exec(&self.vm, cmd)
            .unwrap_or_else(|e| panic!("{e}"))
            .stdout
    }
}

/// Builds a lab (links of `mtu` bytes) and runs `f` on a thread inside its host
/// namespace; panics of `f` propagate, and the lab is torn down either way.
fn in_lab(mtu: u32, f: impl FnOnce(&Lab) + Send) {
    let lab = Lab::with_mtu(mtu);
    lab.lab
        .in_ns(&lab.host, || f(&lab))
        .unwrap_or_else(|e| panic!("entering the lab: {e}"));
}

/// Turns an ICMP echo request to PEER_IP into the echo reply, in place.
/// Returns false for anything else.
fn echo_reply(frame: &mut [u8]) -> bool {
    if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] {
        return false;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    if frame[14 + 9] != 1 || frame[30..34] != PEER_IP || frame.len() < 14 + ihl + 8 {
        return false;
    }
    let icmp = 14 + ihl;
    if frame[icmp] != 8 {
        return false;
    }
    let (dst, src) = frame[..12].split_at_mut(6);
    dst.swap_with_slice(src);
    let (a, b) = frame[26..34].split_at_mut(4);
    a.swap_with_slice(b);
    frame[icmp] = 0;
    // RFC 1624: the type field went from 8 to 0 (16-bit word 0x0800 less).
    let sum = u16::from_be_bytes([frame[icmp + 2], frame[icmp + 3]]);
    let mut s = u32::from(sum) + 0x0800;
    s = (s & 0xffff) + (s >> 16);
    frame[icmp + 2..icmp + 4].copy_from_slice(&(s as u16).to_be_bytes());
    true
}

/// Answers pings to PEER_IP through the port until `child` exits (10 s max).
/// Returns the number of requests answered.
fn serve_pings(port: &mut XdpPort, child: &mut std::process::Child) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut answered = 0;
    let mut replies: Vec<Vec<u8>> = Vec::new();
    while Instant::now() < deadline {
        if child.try_wait().expect("wait ping").is_some() {
            break;
        }
        let mut pfd = libc::pollfd {
            fd: port.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, 50 ms timeout.
        unsafe { libc::poll(&mut pfd, 1, 50) };
        port.recv_batch(64, |f| {
            let mut f = f.to_vec();
            if echo_reply(&mut f) {
                replies.push(f);
            }
        });
        answered += port.send_batch(replies.iter().map(Vec::as_slice));
        replies.clear();
        port.flush_tx();
    }
    answered
}

fn ping_received(out: &str) -> u32 {
    out.split(',')
        .find_map(|p| p.trim().strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn ping_through_port(lab: &Lab, mode: ModeRequest, mtu: u32, sizes: &[&str]) {
    let mut cfg = XdpPortConfig::new(Some("br0"), "mvp0");
    cfg.mode = mode;
    cfg.mtu = mtu;
    let mut port = XdpPort::open(&cfg).expect("open XDP port");
    // Auto means generic with GSO through the port (the default), native
    // otherwise (veth has native XDP).
    let expected = match mode {
        ModeRequest::Native => xdp::AttachMode::Native,
        _ => xdp::AttachMode::Generic,
    };
    assert_eq!(port.mode(), expected);
    let info = link_info("mvp0.x").unwrap().expect("edge side exists");
    assert_eq!(info.xdp_prog_id, Some(u64::from(port.prog_id())));

    for &size in sizes {
        let mut child = lab
            .vm_cmd(&[
                "ping",
                "-c",
                "40",
                "-i",
                "0.01",
                "-W",
                "1",
                "-s",
                size,
                &PEER_IP.map(|b| b.to_string()).join("."),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn ping");
        let answered = serve_pings(&mut port, &mut child);
        let out = child.wait_with_output().expect("ping output");
        let out = String::from_utf8_lossy(&out.stdout);
        let received = ping_received(&out);
        assert!(
            received >= 38,
            "size {size}: {received}/40 replies, {answered} answered\n{out}"
        );
    }
    let st = port.stats();
    if mtu > 4000 {
        assert!(port.multi_buffer());
        assert!(st.socket.rx_multi_buffer >= 38, "{st:?}");
        assert!(st.socket.tx_multi_buffer >= 38, "{st:?}");
    }
    let redirected = st
        .program
        .iter()
        .find(|(n, _)| *n == "redirected")
        .map(|&(_, v)| v);
    let n = 40 * sizes.len() as u64;
    assert!(redirected >= Some(n), "{st:?}");
    assert!(st.socket.rx_frames >= n, "{st:?}");
    assert!(st.socket.tx_frames >= n - 2 * sizes.len() as u64, "{st:?}");
    assert_eq!(st.kernel_tx_invalid, 0);
}

#[test]
fn ping_through_native_xdp() {
    require_root!("ping_through_native_xdp");
    in_lab(1500, |lab| {
        ping_through_port(lab, ModeRequest::Native, 1500, &["56", "1400"])
    });
}

#[test]
fn ping_through_generic_xdp() {
    require_root!("ping_through_generic_xdp");
    in_lab(1500, |lab| {
        ping_through_port(lab, ModeRequest::Generic, 1500, &["56", "1400"])
    });
}

/// Jumbo frames (8 KiB ICMP, three 4 KiB chunks) in both directions:
/// AF_XDP multi-buffer on RX and TX.
#[test]
fn jumbo_frames_native_multi_buffer() {
    require_root!("jumbo_frames_native_multi_buffer");
    in_lab(9000, |lab| {
        ping_through_port(lab, ModeRequest::Native, 9000, &["8000"])
    });
}

#[test]
fn jumbo_frames_generic_multi_buffer() {
    require_root!("jumbo_frames_generic_multi_buffer");
    in_lab(9000, |lab| {
        ping_through_port(lab, ModeRequest::Generic, 9000, &["8000"])
    });
}

/// Frames of every size up to the MTU sent through AF_XDP TX arrive in the
/// VM; a frame larger than a UMEM chunk is refused and counted.
#[test]
fn tx_sizes_arrive_in_vm() {
    require_root!("tx_sizes_arrive_in_vm");
    in_lab(1500, |lab| {
        let mut port = XdpPort::open(&XdpPortConfig::new(Some("br0"), "mvp0")).expect("open");
        let rx_before = vm_rx_packets(lab);
        let mut frames = Vec::new();
        for len in (60..=1514).step_by(29) {
            let mut f = vec![0u8; len];
            f[..6].copy_from_slice(&[0xff; 6]);
            f[6..12].copy_from_slice(&PEER_MAC);
            f[12..14].copy_from_slice(&[0x88, 0xb5]); // local experimental ethertype
            frames.push(f);
        }
        let queued = port.send_batch(frames.iter().map(Vec::as_slice));
        assert_eq!(queued as usize, frames.len());
        let deadline = Instant::now() + Duration::from_secs(5);
        while port.flush_tx() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        // The bridge side's NAPI thread delivers them after the kernel took
        // them off the TX ring.
        let mut got = vm_rx_packets(lab) - rx_before;
        while got < frames.len() as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            got = vm_rx_packets(lab) - rx_before;
        }
        assert!(
            got >= frames.len() as u64,
            "{got} of {} arrived",
            frames.len()
        );
        let big = vec![0u8; port.max_frame() + 1];
        assert_eq!(port.send_batch([big.as_slice()]), 0);
        assert_eq!(port.stats().socket.tx_too_big, 1);
    });
}

/// Consecutive TCP segments of one flow sent through AF_XDP TX are merged by
/// GRO on the bridge side of the port: the VM's interface receives fewer,
/// larger packets carrying every byte (without GRO: one packet per frame).
#[test]
fn tx_tcp_segments_are_coalesced_towards_the_bridge() {
    require_root!("tx_tcp_segments_are_coalesced_towards_the_bridge");
    in_lab(1500, |lab| {
        private_sysfs();
        let mut port = XdpPort::open(&af_xdp_tx_config()).expect("open");
        assert!(port.bridge_gro(), "GRO towards the bridge not enabled");
        let out = lab.vm_run(&["ip", "-j", "link", "show", "dev", "eth0"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j");
        let mut vm_mac = [0u8; 6];
        for (m, h) in vm_mac
            .iter_mut()
            .zip(v[0]["address"].as_str().expect("mac").split(':'))
        {
            *m = u8::from_str_radix(h, 16).expect("hex");
        }
        let vm_ip: Vec<u8> = VM_IP.split('.').map(|b| b.parse().expect("ip")).collect();
        const SEGS: u32 = 32;
        const MSS: usize = 1400;
        let frames: Vec<Vec<u8>> = (0..SEGS)
            .map(|i| tcp_segment(vm_mac, &vm_ip, 1000 + i * MSS as u32, MSS))
            .collect();
        assert!(frames.iter().all(|f| tcp_checksum_ok(f) == Some(true)));
        let (p0, b0) = vm_rx(lab);
        assert_eq!(port.send_batch(frames.iter().map(Vec::as_slice)), SEGS);
        let deadline = Instant::now() + Duration::from_secs(5);
        // Every packet the VM receives carries one Ethernet/IP/TCP header and
        // some of the payload: all of it arrived when the bytes add up.
        let payload = u64::from(SEGS) * MSS as u64;
        let arrived = |p: u64, b: u64| b.saturating_sub(p * 54) >= payload;
        let (mut p, mut b) = (0, 0);
        while !arrived(p, b) && Instant::now() < deadline {
            port.flush_tx();
            std::thread::sleep(Duration::from_millis(20));
            let (p1, b1) = vm_rx(lab);
            (p, b) = (p1 - p0, b1 - b0);
        }
        assert!(arrived(p, b), "{b} bytes in {p} packets: payload missing");
        assert!(
            p < u64::from(SEGS),
            "{p} packets for {SEGS} segments: no GRO"
        );
    });
}

/// The port's packet socket takes frames for the VM with a virtio-net header in
/// front, as a TAP write does: one TCP super-frame of 16 segments with its checksum
/// partial reaches the VM whole (fewer packets than segments on its interface, every
/// payload byte) and its TCP counts no checksum error.
#[test]
fn tso_super_frames_reach_the_vm_through_the_packet_socket() {
    require_root!("tso_super_frames_reach_the_vm_through_the_packet_socket");
    in_lab(1500, |lab| {
        private_sysfs();
        let port = XdpPort::open(&XdpPortConfig::new(Some("br0"), "mvp0")).expect("open");
        let fd = port
            .vnet_tx_fd()
            .expect("no packet socket for frames to the VMs");
        super_frames_reach_the_vm(lab, &[fd]);
    });
}

/// With two queues (`--threads 2`, native XDP) each queue's port, the one split off
/// included, has a packet socket of its own for the frames to the VMs, and a TCP
/// super-frame written to each (two flows, one per forwarder thread) reaches the VM
/// whole: TSO at the edge side holds in native mode.
#[test]
fn two_queues_send_super_frames_through_packet_sockets_of_their_own() {
    require_root!("two_queues_send_super_frames_through_packet_sockets_of_their_own");
    in_lab(1500, |lab| {
        private_sysfs();
        let mut cfg = XdpPortConfig::new(Some("br0"), "mvp0");
        cfg.queues = 2;
        let mut port = XdpPort::open(&cfg).expect("open");
        assert_eq!(port.mode(), xdp::AttachMode::Native);
        let q1 = port.split_queues().pop().expect("queue 1");
        let fds: Vec<_> = [&port, &q1]
            .iter()
            .map(|p| {
                p.vnet_tx_fd()
                    .unwrap_or_else(|| panic!("queue {}: no packet socket", p.queue()))
            })
            .collect();
        assert_ne!(fds[0], fds[1], "the queues share one packet socket");
        super_frames_reach_the_vm(lab, &fds);
    });
}

/// Writes one TCP super-frame of 16 segments, its checksum partial, to each packet
/// socket of `fds` (each a flow of its own, by source port) and checks that the VM
/// receives every payload byte in fewer packets than segments and that its TCP counts
/// them with no checksum error.
fn super_frames_reach_the_vm(lab: &Lab, fds: &[std::os::fd::RawFd]) {
    let vm_ip: Vec<u8> = VM_IP.split('.').map(|b| b.parse().expect("ip")).collect();
    const SEGS: usize = 16;
    const MSS: usize = 1400;
    let hdr = offload::VnetHdr {
        flags: offload::F_NEEDS_CSUM,
        gso_type: offload::GSO_TCPV4,
        hdr_len: 54,
        gso_size: MSS as u16,
        csum_start: 34,
        csum_offset: 16,
    };
    let mac = vm_mac(lab);
    let (segs0, errs0) = vm_tcp_counters(lab);
    let (p0, b0) = vm_rx(lab);
    for (i, &fd) in fds.iter().enumerate() {
        let frame = tcp_segment_partial(mac, &vm_ip, 40_000 + i as u16, 5000, SEGS * MSS);
        let mut buf = vec![0u8; offload::VNET_HDR_LEN];
        hdr.write(&mut buf);
        buf.extend_from_slice(&frame);
        // SAFETY: `buf` is a live buffer of the length given.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        assert_eq!(
            n,
            buf.len() as isize,
            "write to socket {i}: {}",
            std::io::Error::last_os_error()
        );
    }
    let segs = (SEGS * fds.len()) as u64;
    let payload = segs * MSS as u64;
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut p, mut b) = (0u64, 0u64);
    while b.saturating_sub(p * 54) < payload && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let (p1, b1) = vm_rx(lab);
        (p, b) = (p1 - p0, b1 - b0);
    }
    assert!(
        b.saturating_sub(p * 54) >= payload,
        "{b} bytes in {p} packets: payload missing"
    );
    assert!(
        p < segs,
        "{p} packets for {segs} segments: segmented on the way"
    );
    let (segs1, errs) = vm_tcp_counters(lab);
    assert!(
        segs1 >= segs0 + fds.len() as u64,
        "{} segments reached the VM's TCP for {} super-frames",
        segs1 - segs0,
        fds.len()
    );
    assert_eq!(errs, errs0, "checksum errors in the VM");
}

/// A port that sends frames for the VMs through AF_XDP TX (as with several queues),
/// not its packet socket.
fn af_xdp_tx_config() -> XdpPortConfig {
    let mut cfg = XdpPortConfig::new(Some("br0"), "mvp0");
    cfg.tx_vnet = false;
    cfg
}

fn vm_mac(lab: &Lab) -> [u8; 6] {
    let out = lab.vm_run(&["ip", "-j", "link", "show", "dev", "eth0"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j");
    let mut mac = [0u8; 6];
    for (m, h) in mac
        .iter_mut()
        .zip(v[0]["address"].as_str().expect("mac").split(':'))
    {
        *m = u8::from_str_radix(h, 16).expect("hex");
    }
    mac
}

/// `InSegs` and `InCsumErrors` of the VM's TCP (/proc/net/snmp of its namespace).
fn vm_tcp_counters(lab: &Lab) -> (u64, u64) {
    let out = lab.vm_run(&["cat", "/proc/net/snmp"]);
    let mut tcp = out.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (
        tcp.next().expect("Tcp header"),
        tcp.next().expect("Tcp values"),
    );
    let field = |name: &str| {
        let i = names
            .split_whitespace()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no {name} in {names}"));
        values
            .split_whitespace()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} value in {values}"))
    };
    (field("InSegs"), field("InCsumErrors"))
}

/// [`tcp_segment`] from source port `sport` with its TCP checksum left partial: the
/// field holds the folded pseudo-header sum, as a TSO segment's does before a NIC
/// completes it.
fn tcp_segment_partial(
    dst_mac: [u8; 6],
    vm_ip: &[u8],
    sport: u16,
    seq: u32,
    len: usize,
) -> Vec<u8> {
    let mut f = tcp_segment(dst_mac, vm_ip, seq, len);
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    let mut sum: u32 = 6 + (20 + len) as u32;
    for c in PEER_IP.chunks(2).chain(vm_ip.chunks(2)) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[50..52].copy_from_slice(&(sum as u16).to_be_bytes());
    f
}

/// Gives this thread its own mount namespace with a sysfs of its network
/// namespace (as `ip netns exec` does), so that the port can set threaded
/// NAPI under /sys/class/net.
fn private_sysfs() {
    // SAFETY: unshare/mount with constant arguments; the new mount namespace
    // belongs to this test thread only.
    unsafe {
        assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare(NEWNS)");
        let root = c"/";
        let none = c"none";
        let sys = c"/sys";
        let sysfs = c"sysfs";
        assert_eq!(
            libc::mount(
                none.as_ptr(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null()
            ),
            0,
            "make / private"
        );
        assert_eq!(
            libc::mount(
                sysfs.as_ptr(),
                sys.as_ptr(),
                sysfs.as_ptr(),
                0,
                std::ptr::null()
            ),
            0,
            "mount sysfs: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// An IPv4/TCP data segment (ACK, complete checksums) from the test's peer
/// to the VM: `len` bytes at sequence number `seq`.
fn tcp_segment(dst_mac: [u8; 6], vm_ip: &[u8], seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 40 + len];
    f[..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&PEER_MAC);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((40 + len) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&((seq / 1400) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&PEER_IP);
    ip[16..20].copy_from_slice(vm_ip);
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let tcp = &mut f[34..];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x10; // ACK
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    for (i, b) in tcp[20..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let mut sum: u32 = 6 + (20 + len) as u32;
    for c in PEER_IP
        .chunks(2)
        .chain(vm_ip.chunks(2))
        .chain(tcp.chunks(2))
    {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f
}

fn vm_rx(lab: &Lab) -> (u64, u64) {
    let out = lab.vm_run(&["ip", "-j", "-s", "link", "show", "dev", "eth0"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j");
    let rx = &v[0]["stats64"]["rx"];
    (
        rx["packets"].as_u64().expect("rx packets"),
        rx["bytes"].as_u64().expect("rx bytes"),
    )
}

fn vm_rx_packets(lab: &Lab) -> u64 {
    let out = lab.vm_run(&["ip", "-j", "-s", "link", "show", "dev", "eth0"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j");
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .expect("rx packets")
}

fn bpftool_has(kind: &str, id: u32) -> bool {
    Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("bpftool")
        .success()
}

/// The kernel frees programs and maps after an RCU grace period: wait a
/// little for them to disappear.
fn gone(kind: &str, id: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !bpftool_has(kind, id) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn drop_leaves_nothing_behind() {
    require_root!("drop_leaves_nothing_behind");
    in_lab(1500, |_| {
        let port = XdpPort::open(&XdpPortConfig::new(Some("br0"), "mvp0")).expect("open");
        let prog = port.prog_id();
        let maps = port.map_ids().to_vec();
        assert!(bpftool_has("prog", prog));
        assert!(maps.len() >= 2, "{maps:?}");
        assert!(link_info("mvp0").unwrap().is_some());
        drop(port);
        assert!(gone("prog", prog), "program {prog} still loaded");
        for m in maps {
            assert!(gone("map", m), "map {m} still there");
        }
        assert!(link_info("mvp0").unwrap().is_none());
        assert!(link_info("mvp0.x").unwrap().is_none());
    });
}

/// A port with two queues (two forwarder threads): the veth has two rx
/// queues, the queue-1 socket is handed out as a port of its own, and the
/// program stays loaded until the last of the two is dropped; then program,
/// maps and veth are gone.
#[test]
fn two_queues_share_the_program_until_the_last_is_dropped() {
    require_root!("two_queues_share_the_program_until_the_last_is_dropped");
    in_lab(1500, |_| {
        let mut cfg = XdpPortConfig::new(Some("br0"), "mvp0");
        cfg.queues = 2;
        let mut port = XdpPort::open(&cfg).expect("open");
        let mut more = port.split_queues();
        assert_eq!(more.len(), 1);
        assert!(port.split_queues().is_empty());
        let q1 = more.pop().expect("queue 1");
        assert_eq!((port.queue(), q1.queue()), (0, 1));
        assert_eq!(q1.prog_id(), port.prog_id());
        let show = run(&["ip", "-d", "link", "show", "dev", "mvp0.x"]);
        assert!(show.contains("numrxqueues 2"), "{show}");
        let prog = port.prog_id();
        let maps = port.map_ids().to_vec();
        drop(port);
        assert!(bpftool_has("prog", prog), "program gone with a queue left");
        assert!(link_info("mvp0.x").unwrap().is_some());
        drop(q1);
        assert!(gone("prog", prog), "program {prog} still loaded");
        for m in maps {
            assert!(gone("map", m), "map {m} still there");
        }
        assert!(link_info("mvp0").unwrap().is_none());
        assert!(link_info("mvp0.x").unwrap().is_none());
        // Out of range: refused before anything is made.
        cfg.queues = 0;
        assert!(XdpPort::open(&cfg).is_err());
        cfg.queues = 65;
        assert!(XdpPort::open(&cfg).is_err());
        assert!(link_info("mvp0").unwrap().is_none());
    });
}

/// Refuses a name that is not ours, or too long, and a bridge that is not
/// a bridge, with an error rather than touching the interface.
#[test]
fn refuses_foreign_interfaces() {
    require_root!("refuses_foreign_interfaces");
    in_lab(1500, |_| {
        // vm0 exists (the VM's veth) and is not an XDP port.
        let e = XdpPort::open(&XdpPortConfig::new(Some("br0"), "vm0")).expect_err("must refuse");
        assert!(e.to_string().contains("not an mvc XDP port"), "{e}");
        assert!(link_info("vm0").unwrap().is_some());
        let e = XdpPort::open(&XdpPortConfig::new(Some("vm0"), "mvp0")).expect_err("must refuse");
        assert!(e.to_string().contains("not a bridge"), "{e}");
        let e = XdpPort::open(&XdpPortConfig::new(Some("br0"), "a-much-too-long"))
            .expect_err("must refuse");
        assert!(e.to_string().contains("13 characters"), "{e}");
    });
}

/// A process holding a port is killed with SIGKILL: the kernel frees the
/// program and maps (bpf_link owned by the process, nothing pinned), the veth
/// stays, and the next open removes it and starts clean.
#[test]
fn kill9_then_restart_cleans_up() {
    require_root!("kill9_then_restart_cleans_up");
    in_lab(1500, |_| {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "xdp_port_holder", "--ignored", "--nocapture"])
            .env("MVC_XDP_HOLDER", "br0:mvp0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn holder");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines
            .find_map(|l| {
                l.ok()
                    .and_then(|l| l.strip_prefix("READY ").map(str::to_owned))
            })
            .expect("holder did not get ready");
        let ids: Vec<u32> = ready
            .split_whitespace()
            .map(|s| s.parse().expect("id"))
            .collect();
        let (prog, maps) = ids.split_first().expect("prog id");
        assert!(bpftool_has("prog", *prog));
        let busy = XdpPort::open(&XdpPortConfig::new(Some("br0"), "mvp0"))
            .expect_err("a live holder's port must be refused");
        assert!(busy.to_string().contains("in use by pid"), "{busy}");

        child.kill().expect("SIGKILL to the holder");
        child.wait().expect("reap holder");
        assert!(gone("prog", *prog), "program {prog} survived kill -9");
        for m in maps {
            assert!(gone("map", *m), "map {m} survived kill -9");
        }
        let stale = link_info("mvp0").unwrap().expect("veth left behind");
        assert!(stale.xdp_prog_id.is_none());
        assert!(stale.alias.unwrap().starts_with(xdp::ALIAS_PREFIX));

        // Restarted under another port name: the old port is swept anyway.
        let port = XdpPort::open(&XdpPortConfig::new(Some("br0"), "mvp1")).expect("restart");
        assert_ne!(port.prog_id(), *prog);
        assert!(link_info("mvp0").unwrap().is_none(), "stale port not swept");
        assert!(link_info("mvp0.x").unwrap().is_none());
        drop(port);
        assert!(link_info("mvp1").unwrap().is_none());
        assert!(link_info("mvp1.x").unwrap().is_none());
    });
}

/// Not a test on its own: the process `kill9_then_restart_cleans_up` kills.
/// Opens the port named in MVC_XDP_HOLDER, prints its ids, waits (30 s max).
#[test]
#[ignore = "helper process of kill9_then_restart_cleans_up"]
fn xdp_port_holder() {
    let Ok(spec) = std::env::var("MVC_XDP_HOLDER") else {
        eprintln!("xdp_port_holder: only runs as a child of kill9_then_restart_cleans_up");
        return;
    };
    let (bridge, name) = spec.split_once(':').expect("bridge:port");
    let port = XdpPort::open(&XdpPortConfig::new(Some(bridge), name)).expect("holder open");
    let mut ids = vec![port.prog_id().to_string()];
    ids.extend(port.map_ids().iter().map(u32::to_string));
    println!("READY {}", ids.join(" "));
    std::thread::sleep(Duration::from_secs(30));
}

/// `--datapath auto` gives the TAP device by the rule of docs/XDP.md, with
/// that rule as the reason, also where XDP could attach (and leaves no port
/// behind); `--datapath xdp` fails where it cannot attach and gives XDP in
/// generic mode with GSO through the port where it can.
#[test]
fn auto_falls_back_to_tap_with_reason() {
    require_root!("auto_falls_back_to_tap_with_reason");
    in_lab(1500, |_| {
        let bad = XdpPortConfig::new(Some("vm0"), "mvp0");
        let good = XdpPortConfig::new(Some("br0"), "mvp0");
        for cfg in [Some(&bad), Some(&good), None] {
            let c = xdp::choose(DatapathRequest::Auto, cfg).expect("auto never fails");
            assert_eq!(c.datapath.name(), "tap");
            assert_eq!(c.reason, xdp::AUTO_RULE);
        }
        assert!(link_info("mvp0").unwrap().is_none(), "auto made a port");
        let e = xdp::choose(DatapathRequest::Xdp, Some(&bad))
            .err()
            .expect("xdp on a non-bridge");
        assert!(e.to_string().contains("not a bridge"), "{e}");
        assert!(
            link_info("mvp0").unwrap().is_none(),
            "failed open left a port"
        );
        let c = xdp::choose(DatapathRequest::Xdp, Some(&good)).expect("xdp");
        assert_eq!(c.datapath.name(), "xdp");
        assert!(c.reason.contains("generic"), "{}", c.reason);
        assert!(c.reason.contains("gso from the bridge"), "{}", c.reason);
    });
}

fn redirected(port: &XdpPort) -> u64 {
    port.stats()
        .program
        .iter()
        .find(|(n, _)| *n == "redirected")
        .map_or(0, |&(_, v)| v)
}

/// For an IPv4/TCP frame: whether its TCP checksum is complete and right.
fn tcp_checksum_ok(f: &[u8]) -> Option<bool> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[23] != 6 {
        return None;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    if total < ihl + 20 || 14 + total > f.len() {
        return None;
    }
    let seg = &f[14 + ihl..14 + total];
    let mut sum: u32 = 0;
    for c in f[26..34].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    sum += 6 + seg.len() as u32;
    for c in seg.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    Some(sum == 0xffff)
}

/// TCP between two VMs on a hub-mode bridge (every frame flooded to every
/// port, ours included), on a port without GSO (the fallback where generic
/// mode or multi-buffer is missing): the VMs' GSO super-packets are segmented
/// and their checksums completed before the port, so AF_XDP only ever sees
/// frames of at most one MTU with valid TCP checksums.
#[test]
fn gso_traffic_reaches_the_port_as_mtu_frames() {
    require_root!("gso_traffic_reaches_the_port_as_mtu_frames");
    in_lab(1500, |lab| gso_traffic(lab, ModeRequest::Auto, false));
    in_lab(1500, |lab| gso_traffic(lab, ModeRequest::Generic, false));
}

/// The same with GSO through the port (the default): the program runs in
/// generic mode and the VMs' TCP super-packets arrive whole, above one MTU;
/// every TCP checksum is complete or exactly partial (the pseudo-header sum,
/// which `offload::partial_l4_csum` finds and `complete_csum` completes).
/// Asked for native mode, the port falls back to one-MTU frames.
#[test]
fn gso_traffic_reaches_the_port_as_super_frames() {
    require_root!("gso_traffic_reaches_the_port_as_super_frames");
    in_lab(1500, |lab| gso_traffic(lab, ModeRequest::Auto, true));
    in_lab(1500, |lab| gso_traffic(lab, ModeRequest::Native, true));
}

fn gso_traffic(lab: &Lab, mode: ModeRequest, gso: bool) {
    {
        let vm2 = lab.add_vm("198.18.77.3");
        run(&[
            "ip",
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "ageing_time",
            "0",
        ]);
        let mut cfg = XdpPortConfig::new(Some("br0"), "mvp0");
        cfg.mode = mode;
        cfg.gso = gso;
        let mut port = XdpPort::open(&cfg).expect("open");
        let whole = gso && mode != ModeRequest::Native;
        assert_eq!(port.gso_mtu().is_some(), whole, "{mode:?} gso {gso}");
        let mut server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &vm2,
                "iperf3",
                "-s",
                "-1",
                "-B",
                "198.18.77.3",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 -s");
        std::thread::sleep(Duration::from_millis(300));
        // Two seconds, not a byte count: on a loaded machine a short transfer
        // could end before this thread gets to read the port at all.
        let mut client = lab
            .vm_cmd(&["iperf3", "-c", "198.18.77.3", "-t", "2"])
            .stdout(Stdio::null())
            .spawn()
            .expect("iperf3 -c");
        let (mut frames, mut max_len, mut tcp, mut bad_csum) = (0u64, 0usize, 0u64, 0u64);
        let mut partial = 0u64;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline && client.try_wait().expect("wait").is_none() {
            if port.recv_batch(64, |f| {
                frames += 1;
                max_len = max_len.max(f.len());
                // A complete checksum first: one in 65 536 happens to equal the
                // pseudo-header sum that marks a partial one.
                let ok = match tcp_checksum_ok(f) {
                    Some(false) => match offload::partial_l4_csum(f) {
                        Some((start, offset, end)) => {
                            partial += 1;
                            let mut owned = f.to_vec();
                            offload::complete_csum(&mut owned[..end], start, offset)
                                .expect("complete");
                            tcp_checksum_ok(&owned)
                        }
                        None => Some(false),
                    },
                    other => other,
                };
                match ok {
                    Some(true) => tcp += 1,
                    Some(false) => bad_csum += 1,
                    None => {}
                }
            }) == 0
            {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        if client.try_wait().expect("wait").is_none() {
            let _ = client.kill();
        }
        let ok = client.wait().expect("iperf3 client").success();
        let _ = server.kill();
        let _ = server.wait();
        assert!(ok, "iperf3 between the VMs failed");
        println!("{mode:?} gso {whole}: {frames} frames, largest {max_len}, {partial} partial");
        // Two seconds of bulk TCP (a few hundred Mbit/s at least): tens of
        // thousands of frames of one MTU, or thousands of super-packets (and ACKs).
        let least = if whole { 10 } else { 100 };
        assert!(
            redirected(&port) > 10 * least && frames > least,
            "{mode:?}: only {frames} frames read from the port: {:?}",
            port.stats()
        );
        if whole {
            assert!(
                max_len > 1514,
                "{mode:?}: no frame above one MTU reached the port"
            );
        } else {
            assert!(
                max_len <= 1514,
                "{mode:?}: a {max_len}-byte frame reached the port"
            );
            assert_eq!(partial, 0, "{mode:?}: partial checksums without GSO");
        }
        // The test's (debug-build) checksum loop cannot keep up with iperf3:
        // the kernel drops what does not fit the ring; what is read is a
        // sample of the frames.
        assert!(tcp > least, "{mode:?}: only {tcp} TCP frames checked");
        assert_eq!(bad_csum, 0, "{mode:?}: TCP frames with a bad checksum");
    }
}

/// Indexes of the transport messages `rx` received (drained until 150 ms of quiet).
fn received_indexes(rx: &std::net::UdpSocket) -> Vec<u32> {
    rx.set_read_timeout(Some(Duration::from_millis(150)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok(n) = rx.recv(&mut buf) {
        let inner = if buf[1] == 0x04 { 36 } else { 0 };
        if n >= inner + 8 {
            got.push(u32::from_be_bytes(
                buf[inner + 4..inner + 8].try_into().expect("4 bytes"),
            ));
        }
    }
    got.sort_unstable();
    got
}

/// A Data message (direct, or inside a Relay of `community`) naming `index`.
fn data_to(index: u32, relay: Option<[u8; 16]>) -> Vec<u8> {
    let v = dataplane::wire::VERSION;
    let mut d = Vec::new();
    if let Some(c) = relay {
        d.extend([v, 0x04, 0, 0]);
        d.extend(c);
        d.extend([1u8; 16]);
    }
    d.extend([v, 0x12, 0, 0]);
    d.extend(index.to_be_bytes());
    d.extend([0u8; 8 + 32]);
    d
}

/// The edge's junk filter with its session map driven directly: transport messages
/// (direct and relayed) naming an index that is not in the map are dropped in the
/// program and counted (`unknown_session`), live ones pass; after a "rekey" (one index
/// replaced) the new and the kept index pass and the removed one is dropped; with more
/// live indexes than the map holds the check is off (`session_check` false) and
/// transport messages pass unchecked (`passed_unchecked`), and it is on again once they
/// fit. In both hooks: XDP native and the TC classifier. About 4 s.
#[test]
fn filter_drops_transport_messages_for_unknown_sessions() {
    require_root!("filter_drops_transport_messages_for_unknown_sessions");
    filter_session_check(
        HookMode::Xdp(ModeRequest::Native),
        xdp::Hook::Xdp(xdp::AttachMode::Native),
    );
    filter_session_check(HookMode::Tc, xdp::Hook::Tc);
}

/// Namespaces `edge` and `peer` joined by a veth pair (`eth0` in both), at
/// 198.18.`net`.1 and .2.
fn edge_and_peer(lab: &lab::Lab, net: u8) -> (String, String) {
    let edge = lab.add_ns("edge").expect("namespace");
    let peer = lab.add_ns("peer").expect("namespace");
    lab.veth(&edge, "eth0", &peer, "eth0").expect("veth");
    for (ns, host) in [(&edge, 1), (&peer, 2)] {
        lab.addr(ns, "eth0", Ipv4Addr::new(198, 18, net, host), 24)
            .expect("addr");
    }
    (edge, peer)
}

/// The body of `filter_drops_transport_messages_for_unknown_sessions` with the
/// filter attached in `mode`, which must end up in `hook`.
fn filter_session_check(mode: HookMode, hook: xdp::Hook) {
    let lab = lab::Lab::new("xfs").expect("lab");
    let (edge, peer) = edge_and_peer(&lab, 78);
    let community = [0x5a; 16];
    let (rx, filter) = lab
        .in_ns(&edge, || {
            let rx = std::net::UdpSocket::bind("198.18.78.1:0").expect("bind");
            let port = rx.local_addr().expect("addr").port();
            let f =
                xdp::XdpFilter::attach("eth0", port, &community, mode).expect("attach the filter");
            (rx, f)
        })
        .expect("edge namespace");
    assert_eq!(filter.hook(), hook);
    assert_eq!(filter.status().mode, hook.as_str());
    let dst = rx.local_addr().expect("addr");
    let tx = lab
        .in_ns(&peer, || std::net::UdpSocket::bind("198.18.78.2:0"))
        .expect("peer namespace")
        .expect("bind");
    let send = |indexes: &[u32], relay: Option<[u8; 16]>| {
        for &i in indexes {
            tx.send_to(&data_to(i, relay), dst).expect("send");
        }
        received_indexes(&rx)
    };
    let unknown = |f: &xdp::XdpFilter| f.status().drops.get("unknown_session").copied();

    // The ARP exchange before the first datagram: wait until one gets through.
    filter.sync_sessions(1, [1u32, 2].into_iter());
    let t0 = Instant::now();
    while send(&[1], None).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(5), "nothing passes");
    }
    let st = filter.status();
    assert!(st.session_check && st.sessions == 2, "{st:?}");
    assert_eq!(send(&[1, 2, 3], None), vec![1, 2]);
    assert_eq!(unknown(&filter), Some(1));
    assert_eq!(send(&[1, 3], Some(community)), vec![1], "relayed");
    assert_eq!(unknown(&filter), Some(2));

    // Rekey: 1 replaced by 5.
    filter.sync_sessions(2, [2u32, 5].into_iter());
    assert_eq!(send(&[1, 2, 5], None), vec![2, 5]);
    // The same generation again: the map is not touched.
    filter.sync_sessions(2, std::iter::empty());
    assert_eq!(send(&[2], None), vec![2]);
    // Every session gone.
    filter.sync_sessions(3, std::iter::empty());
    assert_eq!(send(&[2, 5], None), Vec::<u32>::new());
    assert_eq!(unknown(&filter), Some(5));

    // One more live index than the map holds: nothing is checked (nothing dropped).
    let max = dataplane_ebpf_common::FILTER_MAX_SESSIONS;
    filter.sync_sessions(4, 1..=max + 1);
    let st = filter.status();
    assert!(
        !st.session_check && st.sessions == u64::from(max) && st.sessions_missing == 1,
        "{st:?}"
    );
    assert_eq!(send(&[3, max + 7], None), vec![3, max + 7]);
    assert!(filter.status().passed_unchecked >= 2);
    // Back within bounds: checked again.
    filter.sync_sessions(5, [7u32].into_iter());
    let st = filter.status();
    assert!(
        st.session_check && st.sessions == 1 && st.map_errors == 0,
        "{st:?}"
    );
    assert_eq!(send(&[3, 7], None), vec![7]);
    assert_eq!(unknown(&filter), Some(6));
}

/// Two processes (here two threads) attaching the same TC hook to one interface at
/// the same moment: exactly one keeps it, the other is refused with the program id it
/// lost to, and only one program stays on the ingress; for the relay and the filter,
/// 12 rounds each (a check done before attaching alone lets both through when their
/// checks meet). About 15 s.
#[test]
fn tc_hooks_started_together_attach_once() {
    require_root!("tc_hooks_started_together_attach_once");
    let lab = lab::Lab::new("xtr").expect("lab");
    let (edge, _peer) = edge_and_peer(&lab, 77);
    let listen: std::net::SocketAddr = "198.18.77.1:7800".parse().expect("addr");
    let attached = |relay: bool| {
        lab.in_ns(&edge, || {
            if relay {
                xdp::relay_tc_programs("eth0")
            } else {
                xdp::filter_tc_programs("eth0")
            }
            .expect("query tcx")
        })
        .expect("edge namespace")
    };
    for relay in [true, false] {
        for round in 0..12 {
            let start = std::sync::Barrier::new(2);
            let results: Vec<Result<Box<dyn Send>, String>> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..2)
                    .map(|_| {
                        s.spawn(|| {
                            lab.in_ns(&edge, || {
                                start.wait();
                                let hook: Result<Box<dyn Send>, xdp::Error> = if relay {
                                    xdp::XdpRelay::attach("eth0", listen, HookMode::Tc)
                                        .map(|r| Box::new(r) as Box<dyn Send>)
                                } else {
                                    xdp::XdpFilter::attach("eth0", 7800, &[1; 16], HookMode::Tc)
                                        .map(|f| Box::new(f) as Box<dyn Send>)
                                };
                                hook.map_err(|e| e.to_string())
                            })
                            .expect("edge namespace")
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().expect("thread")).collect()
            });
            let kept = results.iter().filter(|r| r.is_ok()).count();
            let refusals: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
            assert_eq!(kept, 1, "relay {relay}, round {round}: {refusals:?}");
            assert!(
                refusals[0].contains("already runs"),
                "relay {relay}, round {round}: {refusals:?}"
            );
            assert_eq!(attached(relay).len(), 1, "relay {relay}, round {round}");
            drop(results);
            lab.wait_until("the hook gone", Duration::from_secs(5), || {
                attached(relay).is_empty()
            })
            .expect("detached");
        }
    }
}

/// How fast a junk flood reaches the filter here, and what each dropped frame costs:
/// `MVC_FLOOD_THREADS` (default 1) senders with the generator of `MVC_FLOOD_GEN` (`clone`,
/// the default, paced to `MVC_FLOOD_PPS`, default 1 000 000 frames/s in all; or `socket`,
/// `lab::flood::flood` as fast as it goes) flood a veth pair for `MVC_FLOOD_SECS` (default
/// 3) with junk (a wrong version byte) for a port the filter guards on the other end (or,
/// with `MVC_FLOOD_TARGET=relay`, the supernode's relay program, native), which drops it in
/// the hook `MVC_FILTER_MODE` asks for (default auto: tc on veth); with
/// `MVC_FLOOD_TARGET=dead-end` the other end is down instead, so the sender's veth frees
/// every frame unreceived (the flood's making alone). Prints the rate offered and the rate
/// the filter dropped, the sending process's CPU (which runs the receiving veth's NAPI and
/// the XDP drop too, in its softirq) and the machine's kernel CPU per dropped frame.
/// Ignored (for docs/BENCH.md): `cargo test --release -p dataplane --test xdp -- --ignored
/// --nocapture measure_flood_rate`.
#[test]
#[ignore]
fn measure_flood_rate() {
    require_root!("measure_flood_rate");
    let (threads, secs) = (
        lab::env_number::<u64>("MVC_FLOOD_THREADS", 1).clamp(1, 4),
        lab::env_number::<u64>("MVC_FLOOD_SECS", 3).clamp(1, 30),
    );
    let generator = lab::flood::Generator::from_env().unwrap_or_else(|e| panic!("{e}"));
    let lab = lab::Lab::new("xfr").expect("lab");
    let (edge, peer) = edge_and_peer(&lab, 79);
    let port = 7700;
    let dst = std::net::SocketAddrV4::new(Ipv4Addr::new(198, 18, 79, 1), port);
    // The edge's filter, or with MVC_FLOOD_TARGET=relay the supernode's program
    // (native: it only drops here, so the peer needs no NAPI for XDP_TX).
    let target = std::env::var("MVC_FLOOD_TARGET").unwrap_or_default();
    let (relay, dead_end) = (target == "relay", target == "dead-end");
    if dead_end {
        lab.ip(&edge, &["link", "set", "eth0", "down"])
            .expect("link down");
    }
    let freed = || lab.if_counter(&peer, "eth0", "tx_dropped").unwrap_or(0);
    let freed0 = freed();
    let (filter, relay) = lab
        .in_ns(&edge, || {
            if dead_end {
                (None, None)
            } else if relay {
                let r =
                    xdp::XdpRelay::attach("eth0", dst.into(), HookMode::Xdp(ModeRequest::Native));
                (None, Some(r.expect("attach")))
            } else {
                let mode: HookMode = std::env::var("MVC_FILTER_MODE")
                    .as_deref()
                    .unwrap_or("auto")
                    .parse()
                    .expect("MVC_FILTER_MODE");
                let f = xdp::XdpFilter::attach("eth0", port, &[1; 16], mode);
                (Some(f.expect("attach")), None)
            }
        })
        .expect("edge namespace");
    let frame = lab::flood::udp_frame(
        lab::flood::mac_of(&edge, "eth0").expect("mac"),
        lab::flood::mac_of(&peer, "eth0").expect("mac"),
        "198.18.79.2:40000".parse().expect("addr"),
        dst,
        &[0u8; 96],
    );
    let t0 = Instant::now();
    let c0 = lab::cpu::sample(&[std::process::id()]);
    let sent: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    lab.in_ns(&peer, || {
                        generator.run(
                            "eth0",
                            &frame,
                            1.0 / threads as f64,
                            100_000_000,
                            Duration::from_secs(secs),
                        )
                    })
                    .expect("peer namespace")
                    .expect("flood")
                    .frames
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("sender")).sum()
    });
    let el = t0.elapsed().as_secs_f64();
    let c1 = lab::cpu::sample(&[std::process::id()]);
    // The senders' CPU, with the receive side's softirq work run on their way out of
    // the kernel.
    let (user, kernel, sys) = lab::cpu::seconds(&c0, &c1);
    std::thread::sleep(Duration::from_millis(200));
    let dropped = match (&filter, &relay) {
        (Some(f), _) => f.status().drops.get("bad_version").copied(),
        (_, Some(r)) => r
            .counters()
            .0
            .into_iter()
            .find_map(|(name, n)| (name == "bad_version").then_some(n)),
        _ if dead_end => Some(freed().saturating_sub(freed0)),
        _ => None,
    }
    .unwrap_or(0);
    let target = match (&relay, dead_end) {
        (Some(_), _) => "supernode relay program",
        (None, true) => "dead end (freed by the sending veth)",
        (None, false) => "edge filter",
    };
    println!(
        "{target}, {generator}, {threads} senders, {el:.1} s: offered {sent} ({:.0}/s), dropped by the program {dropped} ({:.0}/s), \
         sender process CPU {user:.2} s user + {sys:.2} s sys ({:.0} ns per dropped frame), \
         machine kernel CPU {kernel:.2} s ({:.0} ns per dropped frame)",
        sent as f64 / el,
        dropped as f64 / el,
        (user + sys) * 1e9 / dropped.max(1) as f64,
        kernel * 1e9 / dropped.max(1) as f64,
    );
    assert!(dropped > 0, "nothing reached the filter");
}

/// What the junk filter's TC program (`mvc_filter_tc`) costs per frame by itself, for
/// each thing it decides: the kernel's test run (`bpftool prog run ... repeat`, one skb
/// run through the program `MVC_PROG_REPEAT` times, default 1 000 000) on a Data
/// datagram naming an unknown session (the junk of `measure_junk_flood`, dropped after
/// the session lookup), one naming the live session (passed after it), one with a wrong
/// version (dropped at the first check) and one for another port (passed unexamined);
/// `MVC_PROG_ROUNDS` rounds (default 5), the cases alternating. Prints the average ns
/// per run of each (the kernel's figure, which includes its loop's few ns per run) per
/// round and their medians, and checks each verdict. Needs `bpftool`. Ignored (for
/// docs/BENCH.md): `cargo test --release -p dataplane --test xdp -- --ignored
/// --nocapture measure_filter_program`.
#[test]
#[ignore]
fn measure_filter_program() {
    require_root!("measure_filter_program");
    let (rounds, repeat) = (
        lab::env_number::<u64>("MVC_PROG_ROUNDS", 5).clamp(1, 50),
        lab::env_number::<u64>("MVC_PROG_REPEAT", 1_000_000).clamp(1, 100_000_000),
    );
    let lab = lab::Lab::new("xfp").expect("lab");
    let (edge, _peer) = edge_and_peer(&lab, 76);
    let port = 7700;
    let live = 7u32;
    let (filter, id) = lab
        .in_ns(&edge, || {
            let f = xdp::XdpFilter::attach("eth0", port, &[0x5a; 16], HookMode::Tc)
                .expect("attach the filter");
            let ids = xdp::filter_tc_programs("eth0").expect("query tcx");
            (f, ids[0])
        })
        .expect("edge namespace");
    filter.sync_sessions(1, [live].into_iter());
    // The floor: the lab's cloning program on a frame without its mark (it reads the
    // mark and returns), run the same way: the kernel's test loop and a minimal program.
    let floor = lab::sys::load_seed_cloner(1, lab::flood::SEED_MARK, 1).expect("load");
    let floor_id = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", floor.as_raw_fd()))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse::<u32>().ok())
        })
        .expect("the floor program's id");
    let data = |index: u32| {
        let mut p = vec![dataplane::wire::VERSION, 0x12, 0, 0];
        p.extend(index.to_be_bytes());
        p.extend([0u8; 8 + 64 + 16]);
        p
    };
    let frame = |payload: &[u8], dport: u16| {
        lab::flood::udp_frame(
            [2, 0, 0, 0, 0x76, 1],
            [2, 0, 0, 0, 0x76, 2],
            "198.18.76.2:40000".parse().expect("addr"),
            std::net::SocketAddrV4::new(Ipv4Addr::new(198, 18, 76, 1), dport),
            payload,
        )
    };
    let mut old_version = data(live);
    old_version[0] = 1;
    // (what, program, frame, dropped)
    let cases = [
        (
            "Data, unknown session",
            id,
            frame(&data(0x0bad_5e55), port),
            true,
        ),
        ("Data, live session", id, frame(&data(live), port), false),
        ("wrong version", id, frame(&old_version, port), true),
        ("another port", id, frame(&data(live), port + 1), false),
        ("floor", floor_id, frame(&data(live), port), false),
    ];
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for r in 0..rounds as usize {
        for k in 0..cases.len() {
            let i = (k + r) % cases.len();
            let (what, prog, bytes, dropped) = &cases[i];
            let file = lab.dir().join(format!("frame-{i}"));
            std::fs::write(&file, bytes).expect("write the frame");
            let out = run(&[
                "bpftool",
                "prog",
                "run",
                "id",
                &prog.to_string(),
                "data_in",
                file.to_str().expect("path"),
                "repeat",
                &repeat.to_string(),
            ]);
            // "Return value: 2, duration (average): 25ns"
            let field = |key: &str| {
                out.split(key)
                    .nth(1)
                    .and_then(|s| {
                        s.trim_start()
                            .split(|c: char| !c.is_ascii_digit())
                            .next()?
                            .parse::<u64>()
                            .ok()
                    })
                    .unwrap_or_else(|| panic!("bpftool prog run: {out}"))
            };
            // TC_ACT_SHOT is 2; what passes goes on as TC_ACT_UNSPEC (-1), the floor's
            // frames as TC_ACT_OK (0).
            assert_eq!(field("Return value:") == 2, *dropped, "{what}: {out}");
            ns[i].push(field("duration (average):") as f64);
        }
    }
    let show = lab::run(&["bpftool", "prog", "show", "id", &id.to_string()])
        .map(|o| o.stdout)
        .unwrap_or_default();
    println!(
        "mvc_filter_tc (id {id}), {repeat} runs per case and round: {}",
        show.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    for (i, (what, _, _, dropped)) in cases.iter().enumerate() {
        let mut sorted = ns[i].clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "{what:>22} ({}): ns per run per round {:?}, median {}",
            if *dropped { "dropped" } else { "passed" },
            ns[i],
            sorted[sorted.len() / 2],
        );
    }
}
