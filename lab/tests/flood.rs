//! The cloning junk flood (`lab::flood::flood_cloned`) on a veth pair: the tc program
//! multiplies marked seeds only, leaves unmarked frames alone and goes with its link;
//! the paced flood delivers what it offered into the peer and stops by itself at its
//! frame count and at its time limit. Needs root; otherwise prints that it was skipped.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use lab::flood::{FRAMES_PER_SEED, SEED_MARK};
use lab::sys::PacketPath::Egress;
use lab::Lab;

/// Packets received by `ifname` in namespace `ns` (the kernel's interface counter).
fn rx_packets(lab: &Lab, ns: &str, ifname: &str) -> u64 {
    let path = format!("/sys/class/net/{ifname}/statistics/rx_packets");
    let out = lab.exec(ns, &["cat", &path]).expect("rx_packets").stdout;
    out.trim().parse().expect("rx_packets is a number")
}

#[test]
fn cloned_flood_multiplies_seeds_only_and_stops_by_itself() {
    const TEST: &str = "cloned_flood_multiplies_seeds_only_and_stops_by_itself";
    if !lab::is_root() {
        lab::skip(TEST, "needs root for network namespaces and bpf(2)");
        return;
    }
    let lab = Lab::new("xg").expect("lab");
    let rx = lab.add_ns("rx").expect("namespace");
    let tx = lab.add_ns("tx").expect("namespace");
    lab.veth(&rx, "eth0", &tx, "eth0").expect("veth");
    lab.addr(&rx, "eth0", Ipv4Addr::new(198, 18, 78, 1), 24)
        .expect("addr");
    lab.addr(&tx, "eth0", Ipv4Addr::new(198, 18, 78, 2), 24)
        .expect("addr");
    let frame = lab::flood::udp_frame(
        lab::flood::mac_of(&rx, "eth0").expect("mac"),
        lab::flood::mac_of(&tx, "eth0").expect("mac"),
        "198.18.78.2:40000".parse().expect("addr"),
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 78, 1), 7700),
        &[0u8; 96],
    );
    let arrived = |before: u64| {
        std::thread::sleep(Duration::from_millis(200));
        rx_packets(&lab, &rx, "eth0") - before
    };

    // The program itself: 10 unmarked frames pass as 10, 10 seeds become 10 x 64; with
    // the link gone, seeds are plain frames again.
    let before = rx_packets(&lab, &rx, "eth0");
    let (plain, seeds, detached) = lab
        .in_ns(&tx, || {
            let ifindex = lab::sys::ifindex("eth0")?;
            let prog = lab::sys::load_seed_cloner(ifindex, SEED_MARK, FRAMES_PER_SEED as u32 - 1)?;
            let link = lab::sys::tcx_attach_egress(&prog, ifindex)?;
            let plain = lab::sys::packet_socket("eth0", Egress)?;
            let marked = lab::sys::packet_socket("eth0", Egress)?;
            lab::sys::set_mark(&marked, SEED_MARK)?;
            let send = |fd, n| -> Result<u64, lab::SysError> {
                let sent = lab::sys::send_frame_batch(fd, &frame, n)?;
                std::thread::sleep(Duration::from_millis(200));
                Ok(sent as u64)
            };
            let counts = (send(&plain, 10)?, send(&marked, 10)?);
            drop(link);
            Ok::<_, lab::SysError>((counts.0, counts.1, send(&marked, 10)?))
        })
        .expect("tx namespace")
        .expect("cloner");
    assert_eq!(
        (plain, seeds, detached),
        (10, 10, 10),
        "frames the socket took"
    );
    // (A stray frame of the kernel's own, e.g. IGMP, may arrive too.)
    let expected = 10 + 10 * FRAMES_PER_SEED + 10;
    let got = arrived(before);
    assert!(
        (expected..expected + 3).contains(&got),
        "unmarked 10, seeds 10 x {FRAMES_PER_SEED}, seeds after detach 10: {got} arrived"
    );

    // The paced flood stops at its count and delivers it.
    let offer = |pps: u64, max: u64, secs: u64| {
        lab.in_ns(&tx, || {
            lab::flood::flood_cloned("eth0", &frame, pps, max, Duration::from_secs(secs))
        })
        .expect("tx namespace")
        .expect("flood")
    };
    let before = rx_packets(&lab, &rx, "eth0");
    let offered = offer(500_000, 64_000, 10);
    assert_eq!(offered.frames, 64_000, "stops at its count: {offered:?}");
    let got = arrived(before);
    println!(
        "offered {} at {:.0}/s, {got} arrived",
        offered.frames,
        offered.per_sec()
    );
    assert!(
        got >= offered.frames * 9 / 10 && got <= offered.frames,
        "offered {}, arrived {got}",
        offered.frames
    );

    // Bounded in time: a count it cannot reach in 1 s at this rate.
    let offered = offer(20_000, 1_000_000, 1);
    assert!(
        offered.frames > 0 && offered.frames < 1_000_000,
        "stops at its time limit: {offered:?}"
    );
}
