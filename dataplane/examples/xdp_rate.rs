//! Small-frame rate of the frame paths an edge can use, side by side in one
//! run: AF_XDP (XDP port on the bridge), a TAP fd (one read/write per frame)
//! and, for the uplink question, a UDP socket (recvmmsg/sendmmsg batches).
//!
//! Ad hoc measurement for docs/XDP.md, not a test. Needs root; runs in a
//! private network namespace (everything it creates dies with it). Bounded:
//! every run lasts `--secs` (default 2) and the whole matrix is
//! 4 paths x 2 directions x 2 sizes x `--reps` (default 3).
//!
//! ```text
//! cargo run --release -p dataplane --example xdp_rate [-- --secs 2 --reps 3]
//! ```
//!
//! RX: a generator thread writes Ethernet frames with an AF_PACKET socket into
//! `gen0` (a veth whose peer is on the bridge); the bridge floods them to the
//! port under test (or, for UDP, delivers them to the bridge's own address);
//! the receiver thread counts what arrives.
//! TX: the sender thread pushes frames into the bridge through the path under
//! test; frames arriving on `gen0` are counted from its interface counters.
//! Reported: frames/s, CPU ns per frame of the thread using the path, and of
//! the whole process (the kernel's forwarding work runs in the sender's
//! context and is included there). RX path `none` has no port on the bridge:
//! its frames/s and process_ns are the generator's own rate and cost per
//! frame, the baseline to subtract.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use dataplane::xdp::{ModeRequest, XdpPort, XdpPortConfig};

const BR_IP: [u8; 4] = [198, 18, 90, 1];
const GEN_IP: [u8; 4] = [198, 18, 90, 2];
const UDP_PORT: u16 = 9999;
const FLOOD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x90, 0x99];

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mac_of(dev: &str) -> [u8; 6] {
    let v: serde_json::Value =
        serde_json::from_str(&sh(&["ip", "-j", "link", "show", "dev", dev])).expect("json");
    let s = v[0]["address"].as_str().expect("address");
    let mut m = [0u8; 6];
    for (i, p) in s.split(':').enumerate() {
        m[i] = u8::from_str_radix(p, 16).expect("hex");
    }
    m
}

fn rx_packets(dev: &str) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&sh(&["ip", "-j", "-s", "link", "show", "dev", dev])).expect("json");
    v[0]["stats64"]["rx"]["packets"].as_u64().expect("rx")
}

fn thread_cpu() -> Duration {
    cpu(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn process_cpu() -> Duration {
    cpu(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn cpu(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn csum(data: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in data.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// An Ethernet/IPv4/UDP frame of `len` bytes (UDP checksum 0).
fn udp_frame(
    len: usize,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip_len = (len - 14) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = csum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    udp[2..4].copy_from_slice(&UDP_PORT.to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f
}

fn check(r: libc::c_int, what: &str) -> libc::c_int {
    assert!(r >= 0, "{what}: {}", io::Error::last_os_error());
    r
}

fn fd(raw: libc::c_int, what: &str) -> OwnedFd {
    check(raw, what);
    // SAFETY: freshly created fd, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// AF_PACKET socket bound to `dev`, with the qdisc bypassed.
fn packet_socket(dev: &str) -> OwnedFd {
    // SAFETY: plain socket(2).
    let s = fd(
        unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) },
        "socket(AF_PACKET)",
    );
    let name = CString::new(dev).expect("name");
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    // SAFETY: all-zero sockaddr_ll is valid.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_ifindex = idx as i32;
    // SAFETY: `sa` is a valid sockaddr_ll of the given size.
    check(
        unsafe {
            libc::bind(
                s.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        },
        "bind(AF_PACKET)",
    );
    let one: libc::c_int = 1;
    // SAFETY: int option.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const libc::c_int).cast(),
            4,
        )
    };
    s
}

/// Sends copies of `frame` in batches of 64 (sendmmsg) until `stop`.
fn send_mmsg_loop(
    sock: &OwnedFd,
    frame: &[u8],
    dst: Option<&libc::sockaddr_in>,
    stop: &AtomicBool,
) -> u64 {
    let mut iov: Vec<libc::iovec> = (0..64)
        .map(|_| libc::iovec {
            iov_base: frame.as_ptr() as *mut _,
            iov_len: frame.len(),
        })
        .collect();
    // SAFETY: all-zero mmsghdr is valid; fields set below.
    let mut msgs: Vec<libc::mmsghdr> = (0..64).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
        if let Some(d) = dst {
            m.msg_hdr.msg_name = (d as *const libc::sockaddr_in) as *mut _;
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        }
    }
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `msgs` point at live iovecs/frame/address for the call.
        let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), 64, 0) };
        if n > 0 {
            sent += n as u64;
        }
    }
    sent
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    /// UDP socket with GSO (TX only): 64 datagrams per send.
    UdpGso,
    /// No port: the bridge floods to nowhere; the generator's own cost.
    Baseline,
    Xdp,
    XdpGeneric,
    Tap,
    Udp,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Xdp => "xdp",
            Path::XdpGeneric => "xdp-skb",
            Path::Tap => "tap",
            Path::Udp => "udp",
            Path::UdpGso => "udp-gso",
            Path::Baseline => "none",
        }
    }
}

struct Sample {
    frames_per_sec: f64,
    thread_ns: f64,
    process_ns: f64,
}

fn tap_open(name: &str) -> OwnedFd {
    // SAFETY: open(2) with a constant path.
    let f = fd(
        unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) },
        "open /dev/net/tun",
    );
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as u16;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads/writes an ifreq (40 bytes) we own.
    check(
        unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()) },
        "TUNSETIFF",
    );
    f
}

fn measure(path: Path, tx: bool, size: usize, secs: u64) -> Sample {
    let stop = Arc::new(AtomicBool::new(false));
    let gen_mac = mac_of("gen0");
    let br_mac = mac_of("br0");
    // The path under test, set up before the clock starts.
    let mut xdp = matches!(path, Path::Xdp | Path::XdpGeneric).then(|| {
        let mut cfg = XdpPortConfig::new(Some("br0"), "mvrate");
        if path == Path::XdpGeneric {
            cfg.mode = ModeRequest::Generic;
        }
        XdpPort::open(&cfg).expect("XDP port")
    });
    let tap = (path == Path::Tap).then(|| {
        let t = tap_open("mvtap");
        // SAFETY: fcntl on our own fd.
        unsafe { libc::fcntl(t.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        sh(&["ip", "link", "set", "mvtap", "master", "br0", "up"]);
        t
    });
    let udp = matches!(path, Path::Udp | Path::UdpGso).then(|| {
        // SAFETY: plain socket(2).
        let s = fd(
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) },
            "socket(udp)",
        );
        // SAFETY: all-zero sockaddr_in is valid.
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sa.sin_family = libc::AF_INET as u16;
        sa.sin_port = UDP_PORT.to_be();
        sa.sin_addr.s_addr = u32::from_ne_bytes(BR_IP);
        // SAFETY: valid sockaddr_in.
        check(
            unsafe {
                libc::bind(
                    s.as_raw_fd(),
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            },
            "bind(udp)",
        );
        let big: libc::c_int = 8 << 20;
        // SAFETY: int option.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&big as *const libc::c_int).cast(),
                4,
            )
        };
        s
    });
    std::thread::sleep(Duration::from_millis(300)); // ports up, bridge settled
    let run = Duration::from_secs(secs);

    let sample = if !tx {
        // Generator into gen0 -> bridge -> path under test.
        let dst_mac = if path == Path::Udp { br_mac } else { FLOOD_MAC };
        let frame = udp_frame(size, dst_mac, gen_mac, GEN_IP, BR_IP);
        let gstop = stop.clone();
        let gen = std::thread::spawn(move || {
            let s = packet_socket("gen0");
            send_mmsg_loop(&s, &frame, None, &gstop)
        });
        let p0 = process_cpu();
        let t0 = thread_cpu();
        let start = Instant::now();
        let mut n = 0u64;
        let mut buf = vec![0u8; 65536];
        // Drain what is there, then nap: the same batching chance for
        // every path, and no wake-up per frame.
        while start.elapsed() < run {
            let got = match path {
                Path::Xdp | Path::XdpGeneric => {
                    let port = xdp.as_mut().expect("xdp");
                    let mut got = 0;
                    loop {
                        let k = port.recv_batch(64, |_| {});
                        if k == 0 {
                            break;
                        }
                        got += u64::from(k);
                    }
                    got
                }
                Path::Tap => {
                    let t = tap.as_ref().expect("tap");
                    let mut got = 0;
                    // SAFETY: reading into our own buffer (non-blocking fd).
                    while unsafe { libc::read(t.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) }
                        > 0
                    {
                        got += 1;
                    }
                    got
                }
                Path::Udp => {
                    let s = udp.as_ref().expect("udp");
                    let mut got = 0;
                    loop {
                        let k = recv_mmsg(s, &mut buf);
                        if k == 0 {
                            break;
                        }
                        got += k;
                    }
                    got
                }
                Path::Baseline | Path::UdpGso => 0,
            };
            n += got;
            if got == 0 {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        let elapsed = start.elapsed();
        let t = thread_cpu() - t0;
        stop.store(true, Ordering::Relaxed);
        let sent = gen.join().expect("generator");
        let p = process_cpu() - p0;
        if path == Path::Baseline {
            // No receiver: report what the generator pushed and its cost.
            n = sent;
        }
        sample(n, elapsed, t, p)
    } else {
        // Path under test -> bridge -> gen0; counted from gen0's counters.
        // To a MAC no one has: flooded to gen0, which drops it as "other
        // host" right away, so the receiving side costs little and the same
        // for every path.
        let frame = udp_frame(size, FLOOD_MAC, br_mac, BR_IP, GEN_IP);
        let before = rx_packets("gen0");
        let p0 = process_cpu();
        let t0 = thread_cpu();
        let start = Instant::now();
        match path {
            Path::Xdp | Path::XdpGeneric => {
                let port = xdp.as_mut().expect("xdp");
                let batch: Vec<&[u8]> = vec![frame.as_slice(); 64];
                while start.elapsed() < run {
                    if port.send_batch(batch.iter().copied()) == 0 {
                        port.flush_tx();
                    }
                }
                while port.flush_tx() > 0 && start.elapsed() < run + Duration::from_secs(1) {}
            }
            Path::Tap => {
                let t = tap.as_ref().expect("tap");
                while start.elapsed() < run {
                    for _ in 0..64 {
                        // SAFETY: writing our own frame buffer.
                        unsafe { libc::write(t.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
                    }
                }
            }
            Path::Baseline => {}
            Path::Udp | Path::UdpGso => {
                let s = udp.as_ref().expect("udp");
                // SAFETY: all-zero sockaddr_in is valid.
                let mut d: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                d.sin_family = libc::AF_INET as u16;
                d.sin_port = UDP_PORT.to_be();
                d.sin_addr.s_addr = u32::from_ne_bytes(GEN_IP);
                let seg = size - 42;
                let payload = if path == Path::UdpGso {
                    // Every send carries 64 datagrams, cut by the kernel.
                    let seg_c = seg as libc::c_int;
                    // SAFETY: int option on our socket.
                    check(
                        unsafe {
                            libc::setsockopt(
                                s.as_raw_fd(),
                                libc::SOL_UDP,
                                libc::UDP_SEGMENT,
                                (&seg_c as *const libc::c_int).cast(),
                                4,
                            )
                        },
                        "UDP_SEGMENT",
                    );
                    vec![0u8; seg * 64]
                } else {
                    vec![0u8; seg]
                };
                let st = AtomicBool::new(false);
                std::thread::scope(|sc| {
                    sc.spawn(|| {
                        std::thread::sleep(run);
                        st.store(true, Ordering::Relaxed);
                    });
                    send_mmsg_loop(s, &payload, Some(&d), &st);
                });
            }
        }
        let elapsed = start.elapsed();
        let t = thread_cpu() - t0;
        let p = process_cpu() - p0;
        std::thread::sleep(Duration::from_millis(100));
        let n = rx_packets("gen0") - before;
        sample(n, elapsed, t, p)
    };
    drop(xdp);
    drop(tap);
    drop(udp);
    sample
}

fn sample(n: u64, elapsed: Duration, thread: Duration, process: Duration) -> Sample {
    let n_f = n.max(1) as f64;
    Sample {
        frames_per_sec: n as f64 / elapsed.as_secs_f64(),
        thread_ns: thread.as_nanos() as f64 / n_f,
        process_ns: process.as_nanos() as f64 / n_f,
    }
}

fn recv_mmsg(s: &OwnedFd, buf: &mut [u8]) -> u64 {
    let chunk = 2048;
    let count = (buf.len() / chunk).min(32);
    let mut iov: Vec<libc::iovec> = buf
        .chunks_mut(chunk)
        .take(count)
        .map(|c| libc::iovec {
            iov_base: c.as_mut_ptr().cast(),
            iov_len: c.len(),
        })
        .collect();
    // SAFETY: all-zero mmsghdr is valid.
    let mut msgs: Vec<libc::mmsghdr> = (0..count).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: `msgs` point into `buf` for the call.
    let n = unsafe {
        libc::recvmmsg(
            s.as_raw_fd(),
            msgs.as_mut_ptr(),
            count as u32,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    n.max(0) as u64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut secs: u64 = 2;
    let mut only: Option<String> = None;
    let mut reps: u64 = 3;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let raw = args.next();
        let v: Option<u64> = raw.as_deref().and_then(|v| v.parse().ok());
        match (a.as_str(), v) {
            ("--only", _) if raw.is_some() => only = raw,
            ("--secs", Some(v)) => secs = v.clamp(1, 10),
            ("--reps", Some(v)) => reps = v.clamp(1, 9),
            _ => {
                eprintln!(
                    "usage: xdp_rate [--secs N (1-10)] [--reps N (1-9)] [--only none|tap|xdp|xdp-skb|udp|udp-gso]"
                );
                std::process::exit(2);
            }
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("xdp_rate: needs root (network namespaces, XDP)");
        std::process::exit(1);
    }
    if let Err(e) = dataplane::xdp::availability() {
        eprintln!("xdp_rate: {e}");
        std::process::exit(1);
    }
    // SAFETY: single-threaded at this point; the whole process moves to a
    // fresh network namespace that disappears when it exits.
    check(unsafe { libc::unshare(libc::CLONE_NEWNET) }, "unshare");
    sh(&["ip", "link", "set", "lo", "up"]);
    // br_netfilter (loaded on hosts that NAT, like the lab) would run every
    // bridged frame through iptables: off in this namespace, it is the same
    // cost for every path and not what is measured.
    for t in ["iptables", "ip6tables", "arptables"] {
        let _ = std::fs::write(format!("/proc/sys/net/bridge/bridge-nf-call-{t}"), "0");
    }
    // A fixed address: a bridge otherwise takes its ports' lowest MAC,
    // which changes as ports come and go between runs.
    sh(&[
        "ip",
        "link",
        "add",
        "br0",
        "address",
        "02:00:00:00:90:01",
        "type",
        "bridge",
    ]);
    sh(&["ip", "addr", "add", "198.18.90.1/24", "dev", "br0"]);
    sh(&["ip", "link", "set", "br0", "up"]);
    sh(&[
        "ip", "link", "add", "gen0", "type", "veth", "peer", "name", "gen0b",
    ]);
    sh(&["ip", "link", "set", "gen0b", "master", "br0", "up"]);
    sh(&["ip", "link", "set", "gen0", "up"]);
    // The UDP socket path addresses the same MAC no one has as the other TX
    // paths (see `measure`).
    let gen_mac = FLOOD_MAC.map(|b| format!("{b:02x}")).join(":");
    sh(&[
        "ip",
        "neigh",
        "replace",
        "198.18.90.2",
        "lladdr",
        &gen_mac,
        "dev",
        "br0",
        "nud",
        "permanent",
    ]);

    println!("# xdp_rate: {secs} s per run, median of {reps}; ns = CPU ns per frame");
    println!(
        "{:<4} {:<7} {:>5} {:>12} {:>10} {:>11}",
        "dir", "path", "bytes", "frames/s", "thread_ns", "process_ns"
    );
    for tx in [false, true] {
        for size in [64usize, 512] {
            for path in [
                Path::Baseline,
                Path::Tap,
                Path::Xdp,
                Path::XdpGeneric,
                Path::Udp,
                Path::UdpGso,
            ] {
                if (tx && path == Path::Baseline) || (!tx && path == Path::UdpGso) {
                    continue;
                }
                if only.as_deref().is_some_and(|o| o != path.name()) {
                    continue;
                }
                let mut f = Vec::new();
                let mut t = Vec::new();
                let mut p = Vec::new();
                for _ in 0..reps {
                    let s = measure(path, tx, size, secs);
                    f.push(s.frames_per_sec);
                    t.push(s.thread_ns);
                    p.push(s.process_ns);
                }
                println!(
                    "{:<4} {:<7} {:>5} {:>12.0} {:>10.0} {:>11.0}",
                    if tx { "tx" } else { "rx" },
                    path.name(),
                    size,
                    median(f),
                    median(t),
                    median(p)
                );
            }
        }
    }
}
