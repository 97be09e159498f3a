//! Event loops: readiness with poll(2), non-blocking reads in batches, output flushed
//! after each batch. The edge's loop here is the fallback for kernels without io_uring
//! (`uring` is the fast one); it serves a TAP device or an XDP port alike, without
//! offloads.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::edge::EdgeCore;
use crate::outbox::Outbox;
use crate::status::{EdgeStatus, SupernodeStatus};
use crate::supernode::SupernodeCore;

use super::ctl::Snapshot;
use super::frames::{self, FramePort};
use super::IoError;
use super::{mtu, tap};

const BATCH: usize = 64;
const TICK: Duration = Duration::from_millis(20);
const PUBLISH: Duration = Duration::from_millis(200);

/// Fields of the edge status the driver knows.
#[derive(Clone, Debug)]
pub struct EdgeInfo {
    /// "tap" or "xdp".
    pub datapath: String,
    /// Why.
    pub datapath_reason: String,
    /// I/O engine and offloads.
    pub io: String,
    /// TAP name.
    pub tap: String,
    /// TAP MTU.
    pub mtu: u32,
    /// Listen address.
    pub listen: String,
    /// Bound socket address.
    pub listen_addr: std::net::SocketAddr,
    /// The XDP junk filter in front of the socket (`--xdp-filter`), for status.
    pub xdp_filter: Option<Arc<crate::xdp::XdpFilter>>,
}

/// How often the host's addresses are read again (interfaces come and go; the TAP
/// device gets enslaved to a bridge after the edge starts).
pub const HOST_REFRESH: Duration = Duration::from_secs(2);

/// Addresses announced to peers and networks inside the overlay (see
/// [`EdgeCore::set_host_addrs`]).
pub fn host_addrs(
    tap: &str,
    bound: std::net::SocketAddr,
) -> (Vec<std::net::SocketAddr>, Vec<(std::net::IpAddr, u8)>) {
    let (all, overlay) = super::sys::host_addrs(tap, bound.port());
    let locals = if bound.ip().is_unspecified() {
        all.into_iter()
            .filter(|a| a.is_ipv4() == bound.is_ipv4())
            .collect()
    } else {
        vec![bound]
    };
    (locals, overlay)
}

fn poll2(fds: &mut [libc::pollfd], timeout: Duration) -> Result<(), IoError> {
    // SAFETY: fds is a valid slice of pollfd for its length.
    let r = unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            timeout.as_millis() as libc::c_int,
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(IoError::Sys {
                call: "poll".into(),
                source: e,
            });
        }
    }
    Ok(())
}

fn flush_udp(sock: &UdpSocket, out: &mut Outbox, mut drop: impl FnMut(&'static str)) {
    for u in &out.udp {
        if let Err(e) = sock.send_to(u.bytes(), u.dst) {
            drop(if e.kind() == std::io::ErrorKind::WouldBlock {
                "udp_send_full"
            } else {
                "udp_send_error"
            });
        }
    }
}

/// Runs an edge until `stop` is set.
pub fn run_edge(
    mut core: EdgeCore,
    sock: UdpSocket,
    mut port: FramePort,
    info: EdgeInfo,
    snap: Snapshot<EdgeStatus>,
    stop: Arc<AtomicBool>,
) -> Result<(), IoError> {
    let buf_size = mtu::packet_buf_size(info.mtu);
    let mut out = Outbox::new(buf_size);
    let mut rx = vec![0u8; 65_536];
    let mut last_tick = Instant::now() - TICK;
    let mut last_pub = Instant::now() - PUBLISH;
    let tfd = port.fd();
    let mut last_host = Instant::now() - HOST_REFRESH;
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [
            libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: tfd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let tx_pending = port.xdp().is_some_and(|p| p.flush_tx() > 0);
        poll2(
            &mut fds,
            if tx_pending {
                Duration::from_millis(1)
            } else {
                TICK
            },
        )?;
        let now = Instant::now();
        if fds[0].revents != 0 {
            for _ in 0..BATCH {
                match sock.recv_from(&mut rx) {
                    Ok((n, src)) => core.handle_udp(now, src, &mut rx[..n], &mut out),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        core.count_drop("udp_recv_error");
                        break;
                    }
                }
            }
        }
        if let (true, Some(p)) = (fds[1].revents != 0, port.xdp()) {
            p.recv_batch(BATCH as u32, |f| core.handle_tap(now, f, &mut out));
        } else if fds[1].revents != 0 {
            for _ in 0..BATCH {
                match tap::read(tfd, &mut rx) {
                    Ok(Some(n)) => core.handle_tap(now, &rx[..n], &mut out),
                    Ok(None) => break,
                    Err(_) => {
                        core.count_drop("tap_read_error");
                        break;
                    }
                }
            }
        }
        if now.saturating_duration_since(last_tick) >= TICK {
            last_tick = now;
            if now.saturating_duration_since(last_host) >= HOST_REFRESH {
                last_host = now;
                let (l, o) = host_addrs(&info.tap, info.listen_addr);
                core.set_host_addrs(l, o);
            }
            core.poll(now, &mut out);
        }
        if let Some(f) = &info.xdp_filter {
            f.sync_sessions(core.session_generation(), core.session_indexes());
        }
        flush_udp(&sock, &mut out, |r| core.count_drop(r));
        if let Some(p) = port.xdp() {
            frames::send_xdp(p, &mut core, &mut out);
        }
        for t in &mut out.tap {
            if t.complete_csum().is_err() {
                core.count_drop("bad_csum_offload");
                continue;
            }
            if tap::write(tfd, &t.buf[t.start..t.start + t.len]).is_err() {
                core.count_drop("tap_write_error");
            }
        }
        out.recycle_sent();
        if now.saturating_duration_since(last_pub) >= PUBLISH {
            last_pub = now;
            let mut s = core.status(now);
            s.datapath = info.datapath.clone();
            s.datapath_reason = info.datapath_reason.clone();
            s.xdp_filter = info.xdp_filter.as_ref().map(|f| f.status());
            s.io = info.io.clone();
            s.tap = info.tap.clone();
            s.mtu = info.mtu;
            s.listen = info.listen.clone();
            *snap.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
        }
    }
    Ok(())
}

/// Counts a send failure of the supernode.
fn sn_send(
    fd: std::os::fd::RawFd,
    b: &[u8],
    dst: std::net::SocketAddr,
    seg: Option<u16>,
    fails: &mut u64,
) {
    if super::udp::send_msg(fd, b, dst, seg).is_err() {
        *fails += 1;
    }
}

/// The XDP relay's view in status.
fn xdp_relay_status(r: &crate::xdp::XdpRelay) -> crate::status::XdpRelayStatus {
    let (counters, map_errors) = r.counters();
    let mut x = crate::status::XdpRelayStatus {
        iface: r.iface().to_owned(),
        mode: r.hook().as_str().to_owned(),
        edges: r.edges() as u64,
        map_errors,
        ..Default::default()
    };
    for (c, (name, v)) in dataplane_ebpf_common::RelayCounter::ALL
        .iter()
        .zip(counters)
    {
        use dataplane_ebpf_common::RelayCounter as C;
        match c {
            C::Relayed => x.relayed_packets = v,
            C::RelayedBytes => x.relayed_bytes = v,
            C::Passed => x.passed = v,
            C::PassedNoRoute => {
                x.passed_no_route = v;
                x.passed += v;
            }
            C::PassedUnknownSource => {
                x.passed_unknown_source = v;
                x.passed += v;
            }
            C::PassedMixedBatch => {
                x.passed_mixed_batch = v;
                x.passed += v;
            }
            _ if v > 0 => {
                x.drops.insert(name.to_owned(), v);
            }
            _ => {}
        }
    }
    x
}

/// Runs a supernode until `stop` is set. Relay traffic arrives in GRO batches and leaves
/// in GSO batches when the kernel has them: a batch whose datagrams all go to one edge is
/// forwarded with one send and no copy. With `relay` (the XDP program on the underlay
/// interface), its map of validated edges is brought up to date after every round that
/// changed the registrations, before the round's acknowledgements leave.
pub fn run_supernode(
    mut core: SupernodeCore,
    sock: UdpSocket,
    listen: String,
    mut relay: Option<crate::xdp::XdpRelay>,
    snap: Snapshot<SupernodeStatus>,
    stop: Arc<AtomicBool>,
) -> Result<(), IoError> {
    let mut synced_generation = None;
    let fd = sock.as_raw_fd();
    let gro = super::udp::enable_gro(fd);
    let mut gso = super::udp::probe_gso(fd);
    if !gro || !gso {
        tracing::warn!(
            gro,
            gso,
            "UDP offloads missing; relaying datagram by datagram"
        );
    }
    let mut out = Outbox::new(2048);
    let mut rx = vec![0u8; 65_536];
    let mut last_tick = Instant::now() - TICK;
    let mut last_pub = Instant::now() - PUBLISH;
    let mut send_fails = 0u64;
    // Sends of relayed datagrams (a GSO send counts once).
    let mut relay_sends = 0u64;
    let mut targets: Vec<Option<std::net::SocketAddr>> = Vec::with_capacity(64);
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }];
        poll2(&mut fds, TICK)?;
        let now = Instant::now();
        if fds[0].revents != 0 {
            for _ in 0..BATCH {
                let (n, src, seg) = match super::udp::recv_msg(fd, &mut rx) {
                    Ok(Some(v)) => v,
                    Ok(None) => break,
                    Err(_) => break,
                };
                let seg = seg.unwrap_or(n).max(1);
                // Relay datagrams: find each target, then forward runs to one target.
                core.relay_batch(now, src, (&rx[..n], seg), &mut out, &mut targets);
                let mut k = 0;
                while k < targets.len() {
                    let Some(dst) = targets[k] else {
                        k += 1;
                        continue;
                    };
                    let mut j = k + 1;
                    while j < targets.len() && targets[j] == Some(dst) {
                        j += 1;
                    }
                    let start = k * seg;
                    let end = (j * seg).min(n);
                    relay_sends += 1;
                    if j - k > 1 && gso {
                        if super::udp::send_msg(fd, &rx[start..end], dst, Some(seg as u16)).is_err()
                        {
                            gso = false;
                            tracing::warn!(
                                "UDP GSO send failed; relaying datagram by datagram from now on"
                            );
                            for q in k..j {
                                sn_send(
                                    fd,
                                    &rx[q * seg..((q + 1) * seg).min(n)],
                                    dst,
                                    None,
                                    &mut send_fails,
                                );
                            }
                        }
                    } else {
                        for q in k..j {
                            sn_send(
                                fd,
                                &rx[q * seg..((q + 1) * seg).min(n)],
                                dst,
                                None,
                                &mut send_fails,
                            );
                        }
                    }
                    k = j;
                }
            }
        }
        // Expiry every 500 ms; gathered announcements when they are due (the loop wakes
        // at least every `TICK`).
        if now.saturating_duration_since(last_tick) >= Duration::from_millis(500)
            || core.announce_at().is_some_and(|t| t <= now)
        {
            last_tick = now;
            core.poll(now, &mut out);
        }
        if let Some(r) = relay.as_mut() {
            let g = core.edges_generation();
            if synced_generation != Some(g) {
                r.sync(core.registered_edges());
                synced_generation = Some(g);
            }
        }
        for u in &out.udp {
            sn_send(fd, u.bytes(), u.dst, None, &mut send_fails);
        }
        out.recycle_sent();
        if now.saturating_duration_since(last_pub) >= PUBLISH {
            last_pub = now;
            let mut s = core.status(now, &listen);
            s.xdp_relay = relay.as_ref().map(xdp_relay_status);
            s.relay_sends = relay_sends;
            if send_fails > 0 {
                s.drops.insert("udp_send_error".into(), send_fails);
            }
            *snap.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
        }
    }
    Ok(())
}
