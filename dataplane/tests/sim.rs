//! The overlay's cores wired through a simulated network with virtual time: supernodes,
//! edges, NAT-less paths that can be blocked, dead nodes. No sockets, no sleeping.
//! Time moves from one core's deadline (`poll_timeout`) to the next, as quinn-proto's
//! `Pair::step` does, and only the cores whose deadline came are polled; edges draw their
//! randomness from a generator seeded per edge, so a run repeats itself.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dataplane::crypto::Cipher;
use dataplane::edge::{EdgeConfig, EdgeCore, L2Config, SeededRng, SupernodeAddr, Timers};
use dataplane::offload::{csum_add, csum_fold};
use dataplane::outbox::Outbox;
use dataplane::snkey::SupernodeKey;
use dataplane::status::EdgeStatus;
use dataplane::supernode::{SupernodeConfig, SupernodeCore};

struct Edge {
    addr: SocketAddr,
    core: EdgeCore,
    out: Outbox,
    alive: bool,
    tap_rx: Vec<Vec<u8>>,
}

struct Sn {
    addr: SocketAddr,
    key: SupernodeKey,
    core: SupernodeCore,
    out: Outbox,
    alive: bool,
}

struct Net {
    now: Instant,
    /// Seed of the edges' generators (edge `i` gets `seed + i`).
    seed: u64,
    /// Times the cores were polled.
    polls: u64,
    edges: Vec<Edge>,
    sns: Vec<Sn>,
    blocked: Vec<(SocketAddr, SocketAddr)>,
    queue: VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>,
    delivered: u64,
    /// Datagrams sent to addresses where nothing of ours listens (victims, attackers).
    strays: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    /// Every datagram delivered, while `capture` is set.
    capture: bool,
    seen: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    /// The MAC table size of edges added from now on.
    max_macs: usize,
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn timers() -> Timers {
    Timers {
        register_interval: Duration::from_millis(500),
        register_backoff_max: Duration::from_secs(2),
        supernode_down_after: Duration::from_millis(1600),
        handshake_retry: Duration::from_millis(200),
        handshake_defer: Duration::from_millis(300),
        rekey_after_time: Duration::from_secs(20),
        rekey_after_packets: 1 << 40,
        reject_after_time: Duration::from_secs(30),
        probe_interval: Duration::from_millis(200),
        keepalive_interval: Duration::from_millis(400),
        direct_timeout: Duration::from_millis(1500),
        peer_expiry: Duration::from_secs(10),
        mac_expiry: Duration::from_secs(60),
        relay_silence: Duration::from_millis(200),
        relay_check_timeout: Duration::from_millis(300),
        relay_check_every: Duration::from_secs(1),
        unvalidated_tries: 8,
        unvalidated_backoff: Duration::from_secs(1),
        unvalidated_per_sec: 64,
    }
}

fn drain(
    out: &mut Outbox,
    src: SocketAddr,
    q: &mut VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>,
    tap: Option<&mut Vec<Vec<u8>>>,
) {
    out.flush_tap();
    for u in &out.udp {
        let b = u.bytes();
        match u.segment {
            Some(s) => {
                for c in b.chunks(s) {
                    q.push_back((src, u.dst, c.to_vec()));
                }
            }
            None => q.push_back((src, u.dst, b.to_vec())),
        }
    }
    if let Some(tap) = tap {
        for t in &out.tap {
            tap.push(t.buf[t.start..t.start + t.len].to_vec());
        }
    }
    out.recycle_sent();
}

impl Net {
    fn new(n_sns: usize) -> Self {
        Self::with_sn_config(
            n_sns,
            SupernodeConfig {
                edge_timeout: Duration::from_secs(3),
                ..SupernodeConfig::default()
            },
        )
    }

    fn with_sn_config(n_sns: usize, cfg: SupernodeConfig) -> Self {
        let now = Instant::now();
        let sns = (0..n_sns)
            .map(|i| {
                let key = SupernodeKey::generate().unwrap();
                Sn {
                    addr: sa(&format!("198.18.0.{}:7654", 100 + i)),
                    core: SupernodeCore::new(cfg.clone(), key.clone(), now),
                    key,
                    out: Outbox::new(2048),
                    alive: true,
                }
            })
            .collect();
        Self {
            now,
            seed: 1,
            polls: 0,
            edges: Vec::new(),
            sns,
            blocked: Vec::new(),
            queue: VecDeque::new(),
            delivered: 0,
            strays: Vec::new(),
            capture: false,
            seen: Vec::new(),
            max_macs: 64,
        }
    }

    fn add_edge(&mut self, name: &str, secret: &str, cipher: Cipher) -> usize {
        self.add_edge_with(name, secret, cipher, timers(), true)
    }

    /// An edge with its own timers; `pin` gives it the supernodes' keys.
    fn add_edge_with(
        &mut self,
        name: &str,
        secret: &str,
        cipher: Cipher,
        timers: Timers,
        pin: bool,
    ) -> usize {
        let i = self.edges.len();
        let addr = sa(&format!("198.18.{}.{}:40000", 1 + i / 200, i % 200 + 1));
        let cfg = EdgeConfig {
            name: name.into(),
            community: "lab".into(),
            secret: secret.as_bytes().to_vec(),
            cipher,
            supernodes: self
                .sns
                .iter()
                .map(|s| SupernodeAddr {
                    addr: s.addr,
                    key: pin.then(|| s.key.public()),
                })
                .collect(),
            local_addrs: vec![addr],
            timers,
            max_peers: 64,
            max_macs: self.max_macs,
        };
        self.edges.push(Edge {
            addr,
            core: EdgeCore::with_rng(
                cfg,
                self.now,
                Box::new(SeededRng::new(self.seed.wrapping_add(i as u64))),
            )
            .unwrap(),
            out: Outbox::new(2048),
            alive: true,
            tap_rx: Vec::new(),
        });
        i
    }

    fn deliver(&mut self) {
        let mut guard = 0;
        while let Some((src, dst, mut pkt)) = self.queue.pop_front() {
            guard += 1;
            assert!(guard < 1_000_000, "packet storm");
            if self.blocked.contains(&(src, dst)) || self.blocked.contains(&(dst, src)) {
                continue;
            }
            let now = self.now;
            if self.capture {
                self.seen.push((src, dst, pkt.clone()));
            }
            if let Some(e) = self.edges.iter_mut().find(|e| e.addr == dst && e.alive) {
                e.core.handle_udp(now, src, &mut pkt, &mut e.out);
                drain(&mut e.out, e.addr, &mut self.queue, Some(&mut e.tap_rx));
                self.delivered += 1;
            } else if let Some(s) = self.sns.iter_mut().find(|s| s.addr == dst && s.alive) {
                s.core.handle(now, src, &pkt, &mut s.out);
                drain(&mut s.out, s.addr, &mut self.queue, None);
                self.delivered += 1;
            } else if !self.edges.iter().any(|e| e.addr == dst)
                && !self.sns.iter().any(|s| s.addr == dst)
            {
                self.strays.push((src, dst, pkt));
            }
        }
    }

    /// The earliest deadline of the live cores.
    fn next_deadline(&self) -> Option<Instant> {
        let e = self
            .edges
            .iter()
            .filter(|e| e.alive)
            .filter_map(|e| e.core.poll_timeout());
        let s = self
            .sns
            .iter()
            .filter(|s| s.alive)
            .filter_map(|s| s.core.poll_timeout());
        e.chain(s).min()
    }

    /// Moves time forward by `dt`, from deadline to deadline: each time, the cores whose
    /// deadline came are polled and what they send is delivered.
    fn step(&mut self, dt: Duration) {
        let end = self.now + dt;
        let mut stuck = 0;
        loop {
            let next = self
                .next_deadline()
                .map_or(end, |d| d.min(end))
                .max(self.now);
            if next == self.now {
                // Due now (an event made it due); polling must clear it.
                stuck += 1;
                assert!(stuck < 100, "a timer stays due after polling");
            } else {
                stuck = 0;
            }
            if next > self.now {
                self.check_quiet(self.now + (next - self.now) / 2);
            }
            self.now = next;
            let now = self.now;
            for e in self.edges.iter_mut().filter(|e| e.alive) {
                if e.core.poll_timeout().is_some_and(|d| d <= now) {
                    e.core.poll(now, &mut e.out);
                    drain(&mut e.out, e.addr, &mut self.queue, Some(&mut e.tap_rx));
                    self.polls += 1;
                }
            }
            for s in self.sns.iter_mut().filter(|s| s.alive) {
                if s.core.poll_timeout().is_some_and(|d| d <= now) {
                    s.core.poll(now, &mut s.out);
                    drain(&mut s.out, s.addr, &mut self.queue, None);
                    self.polls += 1;
                }
            }
            self.deliver();
            if self.now >= end {
                break;
            }
        }
    }

    /// Polls every live core at `at`, a time before its deadline, and checks that the
    /// poll sends and changes nothing: the deadline is the earliest of the core's timers.
    fn check_quiet(&mut self, at: Instant) {
        for e in self.edges.iter_mut().filter(|e| e.alive) {
            if e.core.poll_timeout().is_some_and(|d| d <= at) {
                continue;
            }
            let before = timer_state(&e.core, at);
            e.core.poll(at, &mut e.out);
            assert!(
                e.out.udp.is_empty(),
                "edge {} sent {} datagram(s) when polled before its deadline",
                e.addr,
                e.out.udp.len(),
            );
            assert_eq!(before, timer_state(&e.core, at), "edge {}", e.addr);
        }
        for s in self.sns.iter_mut().filter(|s| s.alive) {
            if s.core.poll_timeout().is_some_and(|d| d <= at) {
                continue;
            }
            let before = format!("{:?}", s.core.status(at, "sn").communities);
            s.core.poll(at, &mut s.out);
            let after = format!("{:?}", s.core.status(at, "sn").communities);
            assert_eq!(before, after, "supernode {}", s.addr);
        }
    }

    fn run(&mut self, total: Duration) {
        self.step(total);
    }

    fn send_frame(&mut self, from: usize, frame: &[u8]) {
        let now = self.now;
        let e = &mut self.edges[from];
        e.core.handle_tap(now, frame, &mut e.out);
        drain(&mut e.out, e.addr, &mut self.queue, Some(&mut e.tap_rx));
        self.deliver();
    }

    fn status(&self, i: usize) -> EdgeStatus {
        self.edges[i].core.status(self.now)
    }

    /// Whether edge `i` wrote `frame` to its TAP device.
    fn tap_got(&self, i: usize, frame: &[u8]) -> bool {
        self.edges[i].tap_rx.iter().any(|x| x == frame)
    }

    fn peer_path(&self, i: usize, peer: &str) -> Option<String> {
        self.status(i)
            .peers
            .iter()
            .find(|p| p.name == peer)
            .map(|p| p.path.clone())
    }
}

/// What an edge's timers change besides sending: tables, sessions and paths.
fn timer_state(core: &EdgeCore, now: Instant) -> String {
    let st = core.status(now);
    let peers: Vec<_> = st
        .peers
        .iter()
        .map(|p| (&p.id, p.session, &p.path, &p.path_reason, p.handshakes))
        .collect();
    let sns: Vec<_> = st.supernodes.iter().map(|s| &s.state).collect();
    format!("{peers:?} {:?} {sns:?}", st.macs.len())
}

fn mac(n: u8) -> [u8; 6] {
    [2, 0, 0, 0, 0, n]
}

fn frame(dst: [u8; 6], src: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = vec![tag; 74];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f
}

const BCAST: [u8; 6] = [0xff; 6];

#[test]
fn broadcast_then_direct_unicast() {
    let mut net = Net::new(1);
    let a = net.add_edge("a", "secret", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "secret", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    assert_eq!(net.peer_path(a, "b").as_deref(), Some("direct"));
    assert_eq!(net.peer_path(b, "a").as_deref(), Some("direct"));
    let f = frame(BCAST, mac(1), 7);
    net.send_frame(a, &f);
    assert_eq!(net.edges[b].tap_rx.last(), Some(&f));
    // b answers to the learned MAC: unicast, straight to a.
    let r = frame(mac(1), mac(2), 8);
    net.send_frame(b, &r);
    assert_eq!(net.edges[a].tap_rx.last(), Some(&r));
    let st = net.status(b);
    assert_eq!(st.macs.len(), 1);
    assert_eq!(st.macs[0].peer, "a");
    let p = &st.peers[0];
    assert!(p.tx_packets >= 1 && p.rx_packets >= 1);
    assert!(p.rtt_ms.is_some());
    // The supernode relayed nothing for the unicast frame.
    let sn = net.sns[0].core.status(net.now, "sn");
    let before = sn.relayed_packets;
    net.send_frame(b, &r);
    assert_eq!(
        net.sns[0].core.status(net.now, "sn").relayed_packets,
        before
    );
}

#[test]
fn chacha_and_none_ciphers_work() {
    for c in [Cipher::Chacha20Poly1305, Cipher::None] {
        let mut net = Net::new(1);
        let a = net.add_edge("a", "s", c);
        let b = net.add_edge("b", "s", c);
        net.run(Duration::from_secs(2));
        let f = frame(BCAST, mac(1), 1);
        net.send_frame(a, &f);
        assert_eq!(net.edges[b].tap_rx.last(), Some(&f), "{c}");
        let r = frame(mac(1), mac(2), 2);
        net.send_frame(b, &r);
        assert_eq!(net.edges[a].tap_rx.last(), Some(&r), "{c}");
    }
}

#[test]
fn relayed_when_direct_blocked_and_direct_again_after() {
    let mut net = Net::new(1);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    let (aa, ba) = (net.edges[a].addr, net.edges[b].addr);
    net.blocked.push((aa, ba));
    net.run(Duration::from_secs(3));
    assert_eq!(net.peer_path(a, "b").as_deref(), Some("relayed"));
    let f = frame(BCAST, mac(1), 1);
    net.send_frame(a, &f);
    let r = frame(mac(1), mac(2), 2);
    net.send_frame(b, &r);
    assert_eq!(net.edges[a].tap_rx.last(), Some(&r));
    let st = net.status(a);
    assert!(
        st.peers[0].path_reason.contains("probing"),
        "{}",
        st.peers[0].path_reason
    );
    // The path opens: the edges notice and switch.
    net.blocked.clear();
    net.run(Duration::from_secs(2));
    assert_eq!(net.peer_path(a, "b").as_deref(), Some("direct"));
    // And closes again: back to the relay, traffic still flows.
    net.blocked.push((aa, ba));
    net.run(Duration::from_secs(3));
    assert_eq!(net.peer_path(a, "b").as_deref(), Some("relayed"));
    let r2 = frame(mac(1), mac(2), 3);
    net.send_frame(b, &r2);
    assert_eq!(net.edges[a].tap_rx.last(), Some(&r2));
}

#[test]
fn wrong_secret_gets_nothing_and_sends_nothing() {
    let mut net = Net::new(1);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    let c = net.add_edge("c", "not-the-secret", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    assert!(net.status(c).peers.is_empty());
    assert_eq!(net.status(a).peers.len(), 1);
    net.send_frame(a, &frame(BCAST, mac(1), 1));
    net.send_frame(c, &frame(BCAST, mac(3), 3));
    net.send_frame(c, &frame(mac(1), mac(3), 4));
    assert!(net.edges[c].tap_rx.is_empty());
    assert!(net.edges[a].tap_rx.is_empty());
    assert_eq!(net.edges[b].tap_rx.len(), 1);
    // c cannot even talk to a directly with a forged handshake: a counts the failure.
    let init = {
        let mut buf = vec![0u8; 72];
        buf[0] = dataplane::wire::VERSION;
        buf[1] = 0x10;
        buf[2] = 1;
        buf
    };
    let (ca, aa) = (net.edges[c].addr, net.edges[a].addr);
    net.queue.push_back((ca, aa, init));
    net.deliver();
    assert!(net.status(a).drops.get("auth_failed").copied().unwrap_or(0) >= 1);
}

#[test]
fn mac_moves_to_another_edge_at_once() {
    let mut net = Net::new(1);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    let c = net.add_edge("c", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    let vm = mac(9);
    net.send_frame(b, &frame(BCAST, vm, 1));
    let to_vm = frame(vm, mac(1), 2);
    net.send_frame(a, &to_vm);
    assert_eq!(net.edges[b].tap_rx.last(), Some(&to_vm));
    let c_before = net.edges[c].tap_rx.len();
    // The VM migrates to c and speaks once.
    net.send_frame(c, &frame(BCAST, vm, 3));
    let to_vm2 = frame(vm, mac(1), 4);
    let b_before = net.edges[b].tap_rx.len();
    net.send_frame(a, &to_vm2);
    assert_eq!(net.edges[c].tap_rx.last(), Some(&to_vm2));
    assert_eq!(
        net.edges[b].tap_rx.len(),
        b_before,
        "the old owner gets nothing"
    );
    assert!(net.edges[c].tap_rx.len() > c_before);
    let st = net.status(a);
    assert_eq!(
        st.macs
            .iter()
            .find(|m| m.mac == "02:00:00:00:00:09")
            .unwrap()
            .peer,
        "c"
    );
}

#[test]
fn supernode_failover_and_direct_traffic_survives() {
    let mut net = Net::new(2);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    net.sns[0].alive = false;
    net.run(Duration::from_secs(3));
    let st = net.status(a);
    assert_eq!(st.supernodes[0].state, "down");
    assert_eq!(st.supernodes[1].state, "up");
    net.send_frame(a, &frame(BCAST, mac(1), 1));
    let r = frame(mac(1), mac(2), 2);
    net.send_frame(b, &r);
    assert_eq!(net.edges[a].tap_rx.last(), Some(&r));
    // A new edge finds the others through the second supernode.
    let c = net.add_edge("c", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    assert_eq!(net.status(c).peers.len(), 2);
    let f = frame(BCAST, mac(3), 3);
    net.send_frame(c, &f);
    assert_eq!(net.edges[a].tap_rx.last(), Some(&f));
    // The first supernode restarts empty: the edges register again by themselves.
    net.sns[0].alive = true;
    net.sns[0].core =
        SupernodeCore::new(SupernodeConfig::default(), net.sns[0].key.clone(), net.now);
    net.run(Duration::from_secs(2));
    assert_eq!(net.status(a).supernodes[0].state, "up");
    let s = net.sns[0].core.status(net.now, "sn");
    assert_eq!(s.communities[0].edges.len(), 3);
}

#[test]
fn supernode_expires_silent_edges() {
    let mut net = Net::new(1);
    let _a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(1));
    assert_eq!(
        net.sns[0].core.status(net.now, "sn").communities[0]
            .edges
            .len(),
        2
    );
    net.edges[b].alive = false;
    net.run(Duration::from_secs(4));
    let s = net.sns[0].core.status(net.now, "sn");
    assert_eq!(s.communities[0].edges.len(), 1);
    assert_eq!(s.communities[0].edges[0].name, "a");
    // And the edges forget it too, later.
    net.run(Duration::from_secs(12));
    assert!(net.status(0).peers.is_empty());
}

#[test]
fn rekey_keeps_traffic_flowing() {
    let mut net = Net::new(1);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    net.send_frame(a, &frame(BCAST, mac(1), 1));
    let h0 = net.status(a).peers[0].handshakes;
    for i in 0..5u8 {
        net.run(Duration::from_secs(10));
        let r = frame(mac(1), mac(2), 10 + i);
        net.send_frame(b, &r);
        assert_eq!(net.edges[a].tap_rx.last(), Some(&r), "round {i}");
    }
    let st = net.status(a);
    assert!(
        st.peers[0].handshakes >= h0 + 2,
        "{} -> {}",
        h0,
        st.peers[0].handshakes
    );
    assert!(st.peers[0].session_age_s.unwrap() < 25);
}

#[test]
fn replayed_datagrams_are_dropped() {
    let mut net = Net::new(1);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    net.send_frame(b, &frame(BCAST, mac(2), 1));
    // Capture a unicast data datagram from a to b.
    let now = net.now;
    let f = frame(mac(2), mac(1), 5);
    let e = &mut net.edges[a];
    e.core.handle_tap(now, &f, &mut e.out);
    let u = &e.out.udp[0];
    let (dst, bytes) = (u.dst, u.bytes().to_vec());
    e.out.recycle_sent();
    let aa = net.edges[a].addr;
    net.queue.push_back((aa, dst, bytes.clone()));
    net.deliver();
    let n = net.edges[b].tap_rx.len();
    net.queue.push_back((aa, dst, bytes));
    net.deliver();
    assert_eq!(net.edges[b].tap_rx.len(), n);
    assert!(net.status(b).drops["replay"] >= 1);
}

#[test]
fn garbage_is_counted_never_fatal() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut net = Net::new(1);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    let evil = sa("198.18.9.9:1234");
    let targets = [net.sns[0].addr, net.edges[a].addr, net.edges[b].addr];
    for i in 0..3000 {
        let len = rng.gen_range(0..200);
        let mut p: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        if i % 2 == 0 && len >= 2 {
            p[0] = dataplane::wire::VERSION; // right version, random type and body
            p[1] = [1u8, 2, 3, 4, 5, 0x10, 0x11, 0x12, 0x13][i % 9];
        }
        let t = targets[i % 3];
        // Half of it claims to come from the supernode.
        let src = if i % 4 < 2 { net.sns[0].addr } else { evil };
        net.queue.push_back((src, t, p));
    }
    net.deliver();
    let drops: u64 = net.status(a).drops.values().sum();
    assert!(drops > 500, "{drops}");
    let sn_drops: u64 = net.sns[0].core.status(net.now, "sn").drops.values().sum();
    assert!(sn_drops > 200, "{sn_drops}");
    // Half of the junk claimed the supernode's address: still no phantom or renamed peer.
    for (e, other) in [(a, "b"), (b, "a")] {
        let names: Vec<String> = net.status(e).peers.iter().map(|p| p.name.clone()).collect();
        assert_eq!(names, [other]);
    }
    // Still working.
    net.run(Duration::from_secs(1));
    net.send_frame(a, &frame(BCAST, mac(1), 1));
    let r = frame(mac(1), mac(2), 2);
    net.send_frame(b, &r);
    assert_eq!(net.edges[a].tap_rx.last(), Some(&r));
}

#[test]
fn tso_frames_are_resegmented_into_gso_batches() {
    let (mut net, a, b, f) = tso_sealed_by_a(20_000);
    let e = &mut net.edges[a];
    assert!(e.out.udp.iter().all(|u| u.segment.is_some()));
    let n0 = net.edges[b].tap_rx.len();
    let ea = net.edges[a].addr;
    let mut q = VecDeque::new();
    drain(&mut net.edges[a].out, ea, &mut q, None);
    net.queue.extend(q);
    net.deliver();
    let got = &net.edges[b].tap_rx[n0..];
    let payload: Vec<u8> = got.iter().flat_map(|s| s[54..].to_vec()).collect();
    assert_eq!(payload, f[54..].to_vec());
    assert!(got.iter().all(|s| s.len() <= 1404));
}

/// Two edges `a` and `b` (b at mac 2, learnt by a) with GSO sends on `a`, and a TCP
/// super-frame of `payload` bytes from `a`'s TAP sealed into `a`'s outbox as GSO batches
/// for an underlay MTU of 1404. Returns the network, `a`, `b` and the frame.
fn tso_sealed_by_a(payload: usize) -> (Net, usize, usize, Vec<u8>) {
    let mut net = Net::new(1);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    net.edges[a].out.gso = true;
    net.edges[a].out.gso_max_segment = 1472;
    net.run(Duration::from_secs(2));
    net.send_frame(b, &frame(BCAST, mac(2), 1));
    let (hdr, f) = tcp_super_frame(payload);
    let now = net.now;
    let e = &mut net.edges[a];
    e.core.handle_tap_tso(now, &hdr, &f, 1404, &mut e.out);
    (net, a, b, f)
}

/// A TCP super-frame from mac 1 to mac 2 with `payload` bytes (`i % 251` each) and the
/// virtio header of a TSO read (MSS 1448).
fn tcp_super_frame(payload: usize) -> (dataplane::offload::VnetHdr, Vec<u8>) {
    use dataplane::offload::{VnetHdr, GSO_TCPV4};
    let mut f = vec![0u8; 14 + 20 + 20 + payload];
    f[..6].copy_from_slice(&mac(2));
    f[6..12].copy_from_slice(&mac(1));
    f[12..14].copy_from_slice(&[0x08, 0]);
    f[14] = 0x45;
    f[14 + 9] = 6;
    f[34 + 12] = 5 << 4;
    f[34 + 13] = 0x18;
    for (i, x) in f[54..].iter_mut().enumerate() {
        *x = (i % 251) as u8;
    }
    let hdr = VnetHdr {
        gso_type: GSO_TCPV4,
        gso_size: 1448,
        ..VnetHdr::default()
    };
    (hdr, f)
}

/// The receiving side of a GSO batch as the forwarder sees it with UDP GRO: the whole
/// batch in one buffer, handed to the core at once (`handle_udp_batch`, one deadline
/// update per batch). Every segment is opened and delivered in order, and the deadline
/// index stays right (debug builds check it when the deadline is read).
#[test]
fn a_gro_batch_is_handled_as_its_datagrams() {
    let (mut net, a, b, f) = tso_sealed_by_a(30_000);
    let now = net.now;
    let e = &mut net.edges[a];
    let batches: Vec<(Vec<u8>, usize)> = e
        .out
        .udp
        .iter()
        .filter_map(|u| u.segment.map(|s| (u.bytes().to_vec(), s)))
        .collect();
    e.out.recycle_sent();
    assert!(!batches.is_empty());
    let ea = net.edges[a].addr;
    let n0 = net.edges[b].tap_rx.len();
    let mut datagrams = 0;
    let e = &mut net.edges[b];
    for (mut buf, seg) in batches {
        let expect = buf.len().div_ceil(seg);
        assert_eq!(
            e.core.handle_udp_batch(now, ea, &mut buf, seg, &mut e.out),
            expect
        );
        datagrams += expect;
        assert!(e.core.poll_timeout().is_some());
    }
    let mut q = VecDeque::new();
    drain(&mut e.out, e.addr, &mut q, Some(&mut e.tap_rx));
    let got = &net.edges[b].tap_rx[n0..];
    let payload: Vec<u8> = got.iter().flat_map(|s| s[54..].to_vec()).collect();
    assert_eq!(payload, f[54..].to_vec());
    assert_eq!(datagrams, 30_000usize.div_ceil(1404 - 54));
}

/// Two forwarder threads share one core (`io::threads::Forwarders`, locked per round of
/// eight frames) and seal frames to the same peer at the same time: no counter (AEAD
/// nonce) is used twice, and the receiver takes every datagram although the two threads'
/// rounds arrive swapped (each round of one thread before the earlier round of the
/// other), in each thread's own order.
#[test]
fn two_forwarder_threads_share_one_core_without_repeating_nonces() {
    use dataplane::io::threads::Forwarders;
    use dataplane::wire::TransportHdr;
    use std::collections::HashSet;
    use std::sync::Arc;

    let mut net = Net::new(1);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let _b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    // a learns mac(2) behind b, b learns mac(1) behind a.
    net.send_frame(1, &frame(BCAST, mac(2), 1));
    net.send_frame(0, &frame(BCAST, mac(1), 1));
    let edge_a = net.edges.remove(a);
    let a_addr = edge_a.addr;
    let now = net.now;
    let shared = Arc::new(Forwarders::new(edge_a.core, 2));
    const FRAMES: u16 = 600;
    const ROUND: u16 = 8;
    /// Datagrams (destination, bytes) of one round.
    type Round = Vec<(SocketAddr, Vec<u8>)>;
    let sent: Vec<Vec<Round>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2u8)
            .map(|t| {
                let shared = Arc::clone(&shared);
                s.spawn(move || {
                    let mut out = Outbox::new(2048);
                    let mut rounds = Vec::new();
                    for r in 0..FRAMES / ROUND {
                        let mut round = Vec::new();
                        {
                            let mut core = shared.lock();
                            for i in 0..ROUND {
                                let mut f = frame(mac(2), mac(1), t);
                                let n = r * ROUND + i;
                                f[14..16].copy_from_slice(&n.to_be_bytes());
                                core.handle_tap(now, &f, &mut out);
                            }
                        }
                        for u in &out.udp {
                            round.push((u.dst, u.bytes().to_vec()));
                        }
                        out.recycle_sent();
                        rounds.push(round);
                        std::thread::yield_now();
                    }
                    rounds
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ctrs = HashSet::new();
    for d in sent.iter().flatten().flatten() {
        let h = TransportHdr::decode(&d.1).expect("a transport datagram");
        assert!(ctrs.insert(h.counter), "counter {} used twice", h.counter);
    }
    assert_eq!(ctrs.len(), 2 * usize::from(FRAMES));
    // Deliver round k of thread 1, then round k of thread 0, and so on.
    let b = 0;
    let before = net.edges[b].tap_rx.len();
    for (r0, r1) in sent[0].iter().zip(&sent[1]) {
        for (dst, bytes) in r1.iter().chain(r0) {
            net.queue.push_back((a_addr, *dst, bytes.clone()));
        }
        net.deliver();
    }
    let got = &net.edges[b].tap_rx[before..];
    assert_eq!(
        got.len(),
        2 * usize::from(FRAMES),
        "{:?}",
        net.status(b).drops
    );
    for t in 0..2u8 {
        let seq: Vec<u16> = got
            .iter()
            .filter(|f| f[16] == t)
            .map(|f| u16::from_be_bytes([f[14], f[15]]))
            .collect();
        assert_eq!(seq, (0..FRAMES).collect::<Vec<_>>(), "thread {t}");
    }
    assert!(!net.status(b).drops.contains_key("replay"));
    // A datagram delivered again is still a replay.
    let (dst, bytes) = sent[0][0][0].clone();
    net.queue.push_back((a_addr, dst, bytes));
    net.deliver();
    assert_eq!(net.status(b).drops.get("replay"), Some(&1));
}

// ---------------------------------------------------------------------------------------
// Hostile networks: reflection, forged supernode messages, bounded attempts, failover.

/// A registration of a key the attacker holds, for community "lab" with secret "s"
/// (an attacker who has seen one registration knows the community id), with `cookie`
/// and `locals` as the announced addresses.
fn forged_register(
    key: &ring::signature::Ed25519KeyPair,
    seq: u64,
    cookie: [u8; 16],
    locals: Vec<SocketAddr>,
) -> Vec<u8> {
    use dataplane::wire::{Register, SIG_LEN};
    use ring::signature::KeyPair;
    let mut edge_key = [0u8; 32];
    edge_key.copy_from_slice(key.public_key().as_ref());
    let m = Register {
        cookie,
        community: dataplane::crypto::CommunityKeys::derive("lab", b"s").id,
        edge_key,
        seq,
        known: 0,
        name: "evil".into(),
        local_addrs: locals,
    };
    let mut b = vec![0u8; 512];
    let n = m.encode_unsigned(&mut b).unwrap();
    let sig = key.sign(&b[..n]);
    b[n..n + SIG_LEN].copy_from_slice(sig.as_ref());
    b.truncate(n + SIG_LEN);
    b
}

fn attacker_key() -> ring::signature::Ed25519KeyPair {
    ring::signature::Ed25519KeyPair::from_seed_unchecked(&[42; 32]).unwrap()
}

/// One registration with a spoofed source (the victim's address) makes the supernode
/// send the victim one datagram no larger than the registration, and nothing else: no
/// acknowledgement, no peer list, no introduction to the members, hence no handshake
/// inits from them. With 3 and with 50 members.
/// Peer-information messages (type, kind) the supernodes sent since the capture began.
fn infos_sent(net: &Net) -> Vec<u8> {
    net.seen
        .iter()
        .filter(|(s, _, p)| net.sns.iter().any(|x| x.addr == *s) && p[1] == 0x03)
        .map(|(_, _, p)| p[2])
        .collect()
}

#[test]
fn peer_lists_go_only_where_something_changed() {
    let mut net = Net::new(1);
    for i in 0..4 {
        net.add_edge(&format!("m{i}"), "s", Cipher::Aes256Gcm);
    }
    // A second community on the same supernode: its changes must not disturb the first.
    for i in 0..2 {
        net.add_edge(&format!("o{i}"), "other", Cipher::Aes256Gcm);
    }
    net.run(Duration::from_secs(3));
    for i in 0..4 {
        assert_eq!(net.status(i).peers.len(), 3);
    }
    // Ten periodic registrations each: acknowledged, no list.
    net.capture = true;
    net.run(Duration::from_secs(5));
    let acks = net.seen.iter().filter(|(_, _, p)| p[1] == 0x02).count();
    assert!(acks >= 6 * 8, "{acks} acks");
    assert_eq!(infos_sent(&net), Vec::<u8>::new());
    // Joins in both communities: the complete list (one part) to each new edge, one
    // update (the same signed bytes) to every member, the new one included, and nothing
    // more at the next registrations.
    net.seen.clear();
    net.add_edge("o2", "other", Cipher::Aes256Gcm);
    let j = net.add_edge("m4", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(3));
    let mut kinds = infos_sent(&net);
    kinds.sort_unstable();
    assert_eq!(kinds, vec![0, 0, 0, 0, 0, 0, 0, 0, 1, 1]);
    for i in (0..4).chain([j]) {
        assert_eq!(net.status(i).peers.len(), 4, "edge {i}");
    }
    net.seen.clear();
    net.run(Duration::from_secs(5));
    assert_eq!(infos_sent(&net), Vec::<u8>::new());
    // A departure: once the supernode expires it, one departure notice per member.
    net.seen.clear();
    net.edges[j].alive = false;
    net.run(Duration::from_secs(6));
    assert_eq!(infos_sent(&net), vec![2, 2, 2, 2]);
    // Peers nobody lists any more and who send nothing are forgotten; the others stay,
    // confirmed by every acknowledgement, though no list came for far longer than
    // `peer_expiry` (the direct paths are blocked: relayed, and no traffic at all).
    for a in 0..4 {
        for b in 0..4 {
            if a != b {
                net.blocked.push((net.edges[a].addr, net.edges[b].addr));
            }
        }
    }
    net.seen.clear();
    net.run(Duration::from_secs(25));
    assert_eq!(infos_sent(&net), Vec::<u8>::new());
    for i in 0..4 {
        let names: Vec<String> = net.status(i).peers.into_iter().map(|p| p.name).collect();
        assert_eq!(names.len(), 3, "edge {i}: {names:?}");
        assert!(!names.contains(&"m4".to_string()));
    }
}

#[test]
fn a_registration_storm_is_admitted_known_edges_first() {
    let n = 24;
    let cfg = SupernodeConfig {
        edge_timeout: Duration::from_secs(3),
        new_per_s: 20,
        ..SupernodeConfig::default()
    };
    let mut net = Net::with_sn_config(1, cfg.clone());
    for i in 0..n {
        net.add_edge(&format!("m{i}"), "s", Cipher::Aes256Gcm);
    }
    let registered = |net: &Net| {
        net.sns[0]
            .core
            .status(net.now, "sn")
            .communities
            .iter()
            .map(|c| c.edges.len())
            .sum::<usize>()
    };
    for round in ["cold start", "restart"] {
        // At most 2 new edges per 100 ms: 1.2 s for 24 at best; the rest back off and
        // retry. Once in, an edge stays in: its refreshes are admitted first.
        let start = net.now;
        let mut last = 0;
        while registered(&net) < n {
            assert!(
                net.now - start < Duration::from_secs(10),
                "{round}: {last} of {n}"
            );
            net.run(Duration::from_millis(100));
            let r = registered(&net);
            assert!(
                r >= last,
                "{round}: {r} after {last}: a registered edge was dropped"
            );
            last = r;
        }
        let st = net.sns[0].core.status(net.now, "sn");
        assert!(
            st.drops.get("overload").copied().unwrap_or(0) > 0,
            "{round}"
        );
        println!("{round}: {n} edges in {:?}", net.now - start);
        net.run(Duration::from_secs(2));
        let key = net.sns[0].key.clone();
        net.sns[0].core = SupernodeCore::new(cfg.clone(), key, net.now);
    }
}

#[test]
fn spoofed_registration_gets_one_small_cookie_and_no_fanout() {
    for members in [3usize, 50] {
        let mut net = Net::new(1);
        for i in 0..members {
            net.add_edge(&format!("m{i}"), "s", Cipher::Aes256Gcm);
        }
        net.run(Duration::from_secs(3));
        assert_eq!(net.status(0).peers.len(), members - 1);
        let victim = sa("198.18.9.9:5000");
        let reg = forged_register(&attacker_key(), 1, [0; 16], vec![victim]);
        let sn0 = net.sns[0].core.status(net.now, "sn");
        net.strays.clear();
        net.queue.push_back((victim, net.sns[0].addr, reg.clone()));
        net.deliver();
        net.run(Duration::from_secs(5));
        let to_victim: Vec<&Vec<u8>> = net
            .strays
            .iter()
            .filter(|(_, d, _)| *d == victim)
            .map(|(_, _, b)| b)
            .collect();
        let bytes: usize = to_victim.iter().map(|b| b.len()).sum();
        assert_eq!(to_victim.len(), 1, "{members} members");
        assert!(
            bytes <= reg.len(),
            "{bytes} bytes for a {}-byte request",
            reg.len()
        );
        assert_eq!(to_victim[0][1], dataplane::wire::MsgType::Cookie as u8);
        let sn = net.sns[0].core.status(net.now, "sn");
        assert!(sn.communities[0].edges.iter().all(|e| e.name != "evil"));
        assert_eq!(sn.cookies_sent, sn0.cookies_sent + 1);
        for i in 0..members {
            assert!(net.status(i).peers.iter().all(|p| p.name != "evil"));
        }
        println!(
            "{members} members: 1 request of {} bytes -> {} datagram(s), {bytes} bytes to the victim",
            reg.len(),
            to_victim.len()
        );
    }
}

/// Datagrams claiming to come from the supernode but not signed with its key, for another
/// community, or replayed (older than what the edge took) change nothing: no new or
/// renamed peers, no supernode state change.
#[test]
fn spoofed_peer_info_and_ack_change_nothing() {
    use dataplane::wire::{PeerEntry, PeerInfo, RegisterAck};
    let mut net = Net::new(1);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    net.capture = true;
    net.run(Duration::from_secs(2));
    net.capture = false;
    let sn = net.sns[0].addr;
    let (aa, ba) = (net.edges[a].addr, net.edges[b].addr);
    let a_id = net.edges[a].core.id();
    let before = net.status(a);
    // Genuine messages seen on the wire: a peer list for b and an early one for a.
    let info_for_b = net
        .seen
        .iter()
        .find(|(s, d, p)| *s == sn && *d == ba && p[1] == 0x03)
        .map(|x| x.2.clone())
        .expect("a peer list for b");
    let early_for_a = net
        .seen
        .iter()
        .find(|(s, d, p)| *s == sn && *d == aa && p[1] == 0x03)
        .map(|x| x.2.clone())
        .expect("a peer list for a");
    let early_ack = net
        .seen
        .iter()
        .find(|(s, d, p)| *s == sn && *d == aa && p[1] == 0x02)
        .map(|x| x.2.clone())
        .expect("an ack for a");
    // Forged, signed with a key that is not the supernode's (with the current epoch and
    // a version far ahead, so only the signature stops it).
    let evil = SupernodeKey::generate().unwrap();
    let community = dataplane::crypto::CommunityKeys::derive("lab", b"s").id;
    let epoch = RegisterAck::decode(&early_ack).unwrap().msg.epoch;
    let info = PeerInfo {
        community,
        kind: dataplane::wire::InfoKind::Update,
        epoch,
        version: u64::MAX - 1,
        part: 0,
        parts: 1,
        peers: vec![
            PeerEntry {
                id: [9; 8],
                name: "phantom".into(),
                observed: sa("198.18.9.9:1"),
                local_addrs: vec![],
            },
            PeerEntry {
                id: net.edges[b].core.id(),
                name: "renamed".into(),
                observed: sa("198.18.9.9:2"),
                local_addrs: vec![],
            },
        ],
    };
    let mut buf = vec![0u8; 1024];
    let n = info.encode_unsigned(&mut buf).unwrap();
    let n = evil.sign_into(&mut buf, n).unwrap();
    let forged_info = buf[..n].to_vec();
    let other = PeerInfo {
        community: [0; 16],
        ..info.clone()
    };
    let n = other.encode_unsigned(&mut buf).unwrap();
    let n = net.sns[0].key.sign_into(&mut buf, n).unwrap();
    let other_community = buf[..n].to_vec();
    let ack = RegisterAck {
        community,
        edge: a_id,
        seq: 6,
        version: 2,
        epoch,
        observed: sa("198.18.9.9:3"),
        lifetime_secs: 30,
        cookie: [1; 16],
        sn_key: evil.public(),
    };
    let n = ack.encode_unsigned(&mut buf).unwrap();
    let n = evil.sign_into(&mut buf, n).unwrap();
    let forged_ack = buf[..n].to_vec();
    // The forged list with the real key's place taken by a flipped signature bit.
    let mut flipped = info_for_b.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    for p in [
        forged_info,
        other_community,
        forged_ack,
        info_for_b,
        early_for_a,
        early_ack,
        flipped,
    ] {
        net.queue.push_back((sn, aa, p));
    }
    // A flood of bit-flipped genuine lists (each byte position, each bit in turn).
    let genuine: Vec<Vec<u8>> = net
        .seen
        .iter()
        .filter(|(s, d, p)| *s == sn && *d == aa && p[1] == 0x03)
        .map(|x| x.2.clone())
        .collect();
    for (k, g) in genuine.iter().cycle().take(2000).enumerate() {
        let mut f = g.clone();
        let i = k % f.len();
        f[i] ^= 1 << (k % 8);
        net.queue.push_back((sn, aa, f));
    }
    net.deliver();
    let after = net.status(a);
    let names = |s: &dataplane::status::EdgeStatus| {
        s.peers
            .iter()
            .map(|p| (p.name.clone(), p.id.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&after), names(&before));
    assert_eq!(after.supernodes[0].observed, before.supernodes[0].observed);
    let d = &after.drops;
    assert!(d.contains_key("sn_key_mismatch"), "{d:?}");
    assert!(d.contains_key("info_not_for_us"), "{d:?}");
    assert!(d.contains_key("stale_info"), "{d:?}");
    assert!(d.contains_key("bad_signature"), "{d:?}");
    assert!(d.contains_key("stale_ack"), "{d:?}");
    // Traffic still flows.
    net.run(Duration::from_secs(1));
    net.send_frame(a, &frame(BCAST, mac(1), 1));
    let r = frame(mac(1), mac(2), 2);
    net.send_frame(b, &r);
    assert_eq!(net.edges[a].tap_rx.last(), Some(&r));
}

/// Peer information is signed once per message and the same bytes go to every member
/// that needs them: a cold start of a community of N costs a few signed messages (the
/// joins of one announcement window gathered, the complete list signed once per
/// version), not one per member and join (N^2/2 before). A signed announcement replayed
/// later, or after the supernode restarted (a new epoch), changes nothing.
#[test]
fn peer_information_is_signed_once_and_replays_are_stale() {
    let n = 30;
    let mut net = Net::new(1);
    for i in 0..n {
        net.add_edge(&format!("m{i}"), "s", Cipher::Aes256Gcm);
    }
    net.capture = true;
    net.run(Duration::from_secs(3));
    net.capture = false;
    for i in 0..n {
        assert_eq!(net.status(i).peers.len(), n - 1, "edge {i}");
    }
    let sn = net.sns[0].addr;
    let infos: Vec<&Vec<u8>> = net
        .seen
        .iter()
        .filter(|(s, _, p)| *s == sn && p[1] == 0x03)
        .map(|x| &x.2)
        .collect();
    let mut distinct = infos.clone();
    distinct.sort_unstable();
    distinct.dedup();
    println!(
        "{n} edges: {} peer-information datagrams, {} distinct (signed), {} signatures in all",
        infos.len(),
        distinct.len(),
        net.sns[0].core.signatures()
    );
    assert!(infos.len() >= 2 * n, "{}", infos.len());
    assert!(distinct.len() <= 8, "{} signed messages", distinct.len());
    // Every announcement edge 0 got, replayed to it: older than what it holds.
    let e0 = net.edges[0].addr;
    let to_e0: Vec<Vec<u8>> = net
        .seen
        .iter()
        .filter(|(s, d, p)| *s == sn && *d == e0 && p[1] == 0x03)
        .map(|x| x.2.clone())
        .collect();
    assert!(!to_e0.is_empty());
    let stale = |net: &Net| net.status(0).drops.get("stale_info").copied().unwrap_or(0);
    let before = (stale(&net), net.status(0).peers.len());
    for p in &to_e0 {
        net.queue.push_back((sn, e0, p.clone()));
    }
    net.deliver();
    assert_eq!(stale(&net), before.0 + to_e0.len() as u64);
    // A restarted supernode (same key, new epoch): the old messages are not current.
    net.sns[0].core = SupernodeCore::new(
        SupernodeConfig {
            edge_timeout: Duration::from_secs(3),
            ..SupernodeConfig::default()
        },
        net.sns[0].key.clone(),
        net.now,
    );
    net.run(Duration::from_secs(3));
    let s0 = stale(&net);
    for p in &to_e0 {
        net.queue.push_back((sn, e0, p.clone()));
    }
    net.deliver();
    assert_eq!(stale(&net), s0 + to_e0.len() as u64);
    assert_eq!(net.status(0).peers.len(), n - 1);
    // A late join after the restart still reaches everyone.
    let j = net.add_edge("late", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    for i in 0..n {
        assert!(
            net.status(i).peers.iter().any(|p| p.name == "late"),
            "edge {i}"
        );
    }
    assert_eq!(net.status(j).peers.len(), n);
}

/// Without a pinned key an edge takes the key of the first signed acknowledgement and
/// then refuses any other.
#[test]
fn unpinned_edge_trusts_the_first_key_and_keeps_it() {
    let mut net = Net::new(1);
    let a = net.add_edge_with("a", "s", Cipher::Aes256Gcm, timers(), false);
    let _b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    let st = net.status(a);
    assert_eq!(st.supernodes[0].key_source, "first-use");
    assert_eq!(
        st.supernodes[0].key.as_deref(),
        Some(net.sns[0].key.public_hex().as_str())
    );
    assert_eq!(st.peers.len(), 1);
    // The supernode comes back with another key: refused.
    net.sns[0].core = SupernodeCore::new(
        SupernodeConfig::default(),
        SupernodeKey::generate().unwrap(),
        net.now,
    );
    net.run(Duration::from_secs(3));
    let st = net.status(a);
    assert_eq!(st.supernodes[0].state, "down");
    assert!(st.drops.contains_key("sn_key_mismatch"), "{:?}", st.drops);
}

/// A registered impostor (it knows the community id, not the secret) announces victim
/// addresses: the members' handshake inits to each address that never answers stay
/// within `unvalidated_tries` plus one per `unvalidated_backoff`.
#[test]
fn handshake_attempts_to_unvalidated_addresses_are_bounded() {
    let mut net = Net::new(1);
    for i in 0..3 {
        net.add_edge(&format!("m{i}"), "s", Cipher::Aes256Gcm);
    }
    net.run(Duration::from_secs(2));
    let attacker = sa("198.18.9.8:1");
    let victims: Vec<SocketAddr> = (0..8)
        .map(|i| sa(&format!("198.18.9.{}:9", 10 + i)))
        .collect();
    let key = attacker_key();
    let snaddr = net.sns[0].addr;
    // First contact: a cookie comes back to the attacker's own address.
    net.queue.push_back((
        attacker,
        snaddr,
        forged_register(&key, 1, [0; 16], victims.clone()),
    ));
    net.deliver();
    let cookie_msg = net
        .strays
        .iter()
        .find(|(_, d, _)| *d == attacker)
        .map(|x| x.2.clone())
        .unwrap();
    let cookie = dataplane::wire::Cookie::decode(&cookie_msg).unwrap().cookie;
    net.strays.clear();
    let secs = 10u32;
    for k in 0..secs {
        let reg = forged_register(&key, 2 + u64::from(k), cookie, victims.clone());
        net.queue.push_back((attacker, snaddr, reg));
        net.deliver();
        net.run(Duration::from_secs(1));
    }
    assert!(net.status(0).peers.iter().any(|p| p.name == "evil"));
    let t = timers();
    let bound = t.unvalidated_tries + secs * 1000 / t.unvalidated_backoff.as_millis() as u32 + 1;
    let mut worst = 0;
    for e in &net.edges {
        for v in &victims {
            let n = net
                .strays
                .iter()
                .filter(|(s, d, _)| *s == e.addr && d == v)
                .count() as u32;
            worst = worst.max(n);
        }
    }
    // Unbounded, each member would send one every handshake_retry (50 in 10 s).
    assert!(
        worst <= bound,
        "{worst} datagrams to one victim from one member, bound {bound}"
    );
    assert!(worst > 0);
    let limited: u64 = (0..3)
        .map(|i| {
            net.status(i)
                .drops
                .get("unvalidated_limit")
                .copied()
                .unwrap_or(0)
        })
        .sum();
    assert!(limited > 0);
    println!("at most {worst} datagrams per member per victim address in {secs} s (bound {bound})");
}

/// Two edges "a" and "b" with production timers (and `sns` supernodes with production
/// settings: the other tests shrink them) whose direct path is blocked, after 6 s of
/// stepping: their path is relayed and each has sent a broadcast, so each knows the
/// other's MAC.
fn relayed_pair(sns: usize) -> (Net, usize, usize) {
    let mut net = Net::new(sns);
    for sn in &mut net.sns {
        sn.core = SupernodeCore::new(SupernodeConfig::default(), sn.key.clone(), net.now);
    }
    let t = Timers {
        unvalidated_backoff: Duration::from_secs(1),
        ..Timers::default()
    };
    let a = net.add_edge_with("a", "s", Cipher::Aes256Gcm, t.clone(), true);
    let b = net.add_edge_with("b", "s", Cipher::Aes256Gcm, t, true);
    let (aa, ba) = (net.edges[a].addr, net.edges[b].addr);
    net.blocked.push((aa, ba));
    let dt = Duration::from_millis(10);
    for _ in 0..600 {
        net.step(dt);
    }
    assert_eq!(net.peer_path(a, "b").as_deref(), Some("relayed"));
    net.send_frame(b, &frame(BCAST, mac(2), 0));
    net.send_frame(a, &frame(BCAST, mac(1), 0));
    (net, a, b)
}

/// A GSO batch of relays as the supernode's socket gets it with UDP GRO, handed to
/// `relay_batch` at once: every datagram goes to the peer and is counted once; each
/// datagram is checked (one for an unknown edge in the middle is dropped, the ones
/// after it still go), and a batch from another address than the sender registered
/// from goes nowhere, each datagram counted as a drop.
#[test]
fn a_gro_batch_of_relays_is_checked_datagram_by_datagram() {
    let (mut net, a, b) = relayed_pair(1);
    net.edges[a].out.gso = true;
    net.edges[a].out.gso_max_segment = 1472;
    // Whatever the set-up left queued goes first.
    net.run(Duration::from_millis(10));
    let (hdr, f) = tcp_super_frame(30_000);
    let now = net.now;
    let e = &mut net.edges[a];
    e.core.handle_tap_tso(now, &hdr, &f, 1404, &mut e.out);
    let (sn_addr, aa, ba) = (net.sns[0].addr, net.edges[a].addr, net.edges[b].addr);
    let batches: Vec<(Vec<u8>, usize)> = net.edges[a]
        .out
        .udp
        .iter()
        .filter(|u| u.dst == sn_addr)
        .filter_map(|u| u.segment.map(|s| (u.bytes().to_vec(), s)))
        .collect();
    net.edges[a].out.recycle_sent();
    let (batch, seg) = batches.into_iter().next().expect("a relayed GSO batch");
    let n = batch.len().div_ceil(seg);
    assert!(n > 2, "{n} datagrams");
    let sn = &mut net.sns[0];
    let relayed = |sn: &Sn| sn.core.status(now, "").relayed_packets;
    let drops = |sn: &Sn, r: &str| sn.core.status(now, "").drops.get(r).copied();
    let mut targets = Vec::new();
    let r0 = relayed(sn);
    sn.core
        .relay_batch(now, aa, (&batch, seg), &mut sn.out, &mut targets);
    assert_eq!(targets, vec![Some(ba); n]);
    assert_eq!(relayed(sn), r0 + n as u64);
    // The middle datagram names an edge nobody registered.
    let mut tampered = batch.clone();
    let mid = n / 2 * seg;
    tampered[mid + 28..mid + 36].copy_from_slice(&[0xee; 8]);
    sn.core
        .relay_batch(now, aa, (&tampered, seg), &mut sn.out, &mut targets);
    let mut want = vec![Some(ba); n];
    want[n / 2] = None;
    assert_eq!(targets, want);
    assert_eq!(relayed(sn), r0 + 2 * n as u64 - 1);
    assert_eq!(drops(sn, "relay_unknown_dst"), Some(1));
    // From an address the sender did not register from: nothing goes.
    let other = sa("198.18.0.250:7700");
    sn.core
        .relay_batch(now, other, (&batch, seg), &mut sn.out, &mut targets);
    assert_eq!(targets, vec![None; n]);
    assert_eq!(relayed(sn), r0 + 2 * n as u64 - 1);
    assert_eq!(drops(sn, "relay_src_mismatch"), Some(n as u64));
}

/// Relayed traffic (direct path blocked) moves to the second supernode within 1 s of the
/// first one dying, with the production timers; and while both directions flow, the
/// supernode is not asked more often than the registration interval.
#[test]
fn relayed_traffic_fails_over_within_a_second() {
    let (mut net, a, b) = relayed_pair(2);
    let aa = net.edges[a].addr;
    let dt = Duration::from_millis(10);
    // Pings every 100 ms from a to b; b answers each at once.
    let sn0 = net.sns[0].addr;
    let mut replies: Vec<Duration> = Vec::new();
    let t0 = net.now;
    let mut kill_at = None;
    let mut regs_to_sn0 = 0;
    net.capture = true;
    for tick in 0..1000u32 {
        if tick % 10 == 0 {
            let seq = tick / 10;
            let mut f = frame(mac(2), mac(1), 1);
            f[14..18].copy_from_slice(&seq.to_be_bytes());
            net.send_frame(a, &f);
            let got: Vec<Vec<u8>> = net.edges[b].tap_rx.drain(..).collect();
            for g in got.iter().filter(|g| g[..6] == mac(2)) {
                let mut r = frame(mac(1), mac(2), 2);
                r[14..18].copy_from_slice(&g[14..18]);
                net.send_frame(b, &r);
            }
        }
        let n_replies = net.edges[a]
            .tap_rx
            .iter()
            .filter(|f| f[..6] == mac(1))
            .count();
        for _ in replies.len()..n_replies {
            replies.push(net.now - t0);
        }
        if tick == 300 {
            regs_to_sn0 = net
                .seen
                .iter()
                .filter(|(s, d, p)| *s == aa && *d == sn0 && p[1] == 0x01)
                .count();
            net.sns[0].alive = false;
            kill_at = Some(net.now - t0);
        }
        net.step(dt);
    }
    let kill = kill_at.unwrap();
    // Three seconds of pings both ways before the kill: registrations only every 5 s.
    assert!(
        regs_to_sn0 <= 2,
        "{regs_to_sn0} registrations in 3 s of steady traffic"
    );
    let first_after = replies
        .iter()
        .find(|t| **t > kill)
        .copied()
        .expect("replies resume");
    let gap = first_after - kill;
    let last_before = replies.iter().rfind(|t| **t <= kill).copied().unwrap();
    let lost = replies.iter().filter(|t| **t > kill).count();
    assert!(
        gap < Duration::from_secs(1),
        "relayed traffic resumed {gap:?} after the kill"
    );
    assert!(lost > 50, "{lost} replies after the kill");
    println!(
        "failover: last reply {:?} before the kill, first {:?} after it",
        kill - last_before,
        gap
    );
}

/// Relayed traffic that gets no answer (one-way, or to a peer that went away) checks the
/// supernode at most once per `relay_check_every`, and the supernode sends the complete
/// list at most every 2 s to an edge whose registration did not change.
#[test]
fn one_way_relayed_traffic_checks_the_supernode_at_most_once_a_second() {
    let mut net = Net::new(1);
    net.sns[0].core =
        SupernodeCore::new(SupernodeConfig::default(), net.sns[0].key.clone(), net.now);
    let t = Timers::default();
    let a = net.add_edge_with("a", "s", Cipher::Aes256Gcm, t.clone(), true);
    let b = net.add_edge_with("b", "s", Cipher::Aes256Gcm, t, true);
    let (aa, ba) = (net.edges[a].addr, net.edges[b].addr);
    net.blocked.push((aa, ba));
    let dt = Duration::from_millis(10);
    for _ in 0..600 {
        net.step(dt);
    }
    net.send_frame(b, &frame(BCAST, mac(2), 0));
    // b goes away; a keeps sending to it through the supernode for 10 s.
    net.edges[b].alive = false;
    let sn = net.sns[0].addr;
    net.capture = true;
    for tick in 0..1000u32 {
        if tick % 5 == 0 {
            net.send_frame(a, &frame(mac(2), mac(1), 1));
        }
        net.step(dt);
    }
    let regs = net
        .seen
        .iter()
        .filter(|(s, d, p)| *s == aa && *d == sn && p[1] == 0x01)
        .count();
    let lists = net
        .seen
        .iter()
        .filter(|(s, d, p)| *s == sn && *d == aa && p[1] == 0x03)
        .count();
    // 10 checks at most plus two regular registrations.
    assert!(regs <= 13, "{regs} registrations in 10 s");
    assert!(regs >= 5, "{regs}: the supernode was not checked");
    assert!(lists <= 6, "{lists} peer lists in 10 s");
    assert_eq!(net.status(a).supernodes[0].state, "up");
    println!("one-way relayed traffic for 10 s: {regs} registrations, {lists} peer lists");
}

/// Over all peers together, an edge sends at most `unvalidated_per_sec` handshake inits a
/// second to addresses that never answered: impostors announcing many addresses each do
/// not add up.
#[test]
fn unvalidated_inits_share_one_budget_per_second() {
    let mut net = Net::new(1);
    let t = Timers {
        unvalidated_per_sec: 5,
        ..timers()
    };
    let m = net.add_edge_with("m", "s", Cipher::Aes256Gcm, t, true);
    net.run(Duration::from_secs(1));
    let snaddr = net.sns[0].addr;
    // Four impostors, eight victim addresses each.
    for k in 0..4u8 {
        let attacker = sa(&format!("198.18.9.{}:1", 100 + k));
        let key = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[k + 1; 32]).unwrap();
        let victims: Vec<SocketAddr> = (0..8)
            .map(|i| sa(&format!("198.18.{}.{}:9", 20 + k, 10 + i)))
            .collect();
        net.queue.push_back((
            attacker,
            snaddr,
            forged_register(&key, 1, [0; 16], victims.clone()),
        ));
        net.deliver();
        let cookie_msg = net
            .strays
            .iter()
            .rev()
            .find(|(_, d, _)| *d == attacker)
            .map(|x| x.2.clone())
            .unwrap();
        let cookie = dataplane::wire::Cookie::decode(&cookie_msg).unwrap().cookie;
        net.queue
            .push_back((attacker, snaddr, forged_register(&key, 2, cookie, victims)));
        net.deliver();
    }
    net.strays.clear();
    let ma = net.edges[m].addr;
    let secs = 3u32;
    net.run(Duration::from_secs(u64::from(secs)));
    assert_eq!(
        net.status(m)
            .peers
            .iter()
            .filter(|p| p.name == "evil")
            .count(),
        4
    );
    // Inits to the victims (those to the impostors' own addresses use the budget too).
    let to_victims = net
        .strays
        .iter()
        .filter(|(s, d, p)| *s == ma && d.port() == 9 && p[1] == 0x10)
        .count() as u32;
    assert!(
        to_victims <= 5 * (secs + 1),
        "{to_victims} inits to unvalidated addresses in {secs} s"
    );
    assert!(net.status(m).drops.contains_key("unvalidated_budget"));
}

/// With the same seeds a run repeats itself: the same edge ids, the same datagrams (type,
/// length, addresses) in the same order, the same polls; another seed gives other ids.
/// Time moves by deadlines, so minutes of idle overlay cost few polls.
#[test]
fn a_seeded_run_repeats_itself_and_steps_by_deadlines() {
    let run = |seed: u64| {
        let mut net = Net::new(1);
        net.seed = seed;
        net.capture = true;
        let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
        let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
        net.run(Duration::from_secs(3));
        net.send_frame(a, &frame(BCAST, mac(1), 1));
        net.send_frame(b, &frame(mac(1), mac(2), 2));
        net.run(Duration::from_secs(2));
        let trace: Vec<_> = net
            .seen
            .iter()
            .map(|(s, d, p)| (*s, *d, p[1], p.len()))
            .collect();
        let ids: Vec<_> = (0..2).map(|i| net.status(i).id).collect();
        (ids, trace, net.polls)
    };
    let (ids, trace, polls) = run(7);
    assert!(trace.len() > 50, "{}", trace.len());
    let (ids2, trace2, polls2) = run(7);
    assert_eq!(ids, ids2);
    assert_eq!(polls, polls2);
    assert_eq!(trace, trace2);
    let (ids3, _, _) = run(8);
    assert_ne!(ids, ids3);
    // An idle minute: keepalives and registrations only, not one poll per 50 ms.
    let mut net = Net::new(1);
    net.add_edge("a", "s", Cipher::Aes256Gcm);
    net.add_edge("b", "s", Cipher::Aes256Gcm);
    // Off the edges' 100 ms timer grid, so that the MAC's expiry is a deadline of its own.
    net.run(Duration::from_millis(5_037));
    net.send_frame(0, &frame(BCAST, mac(1), 1));
    assert_eq!(net.status(1).macs.len(), 1);
    let p0 = net.polls;
    net.run(Duration::from_secs(130));
    let per_sec = (net.polls - p0) as f64 / 130.0;
    assert_eq!(net.peer_path(0, "b").as_deref(), Some("direct"));
    // The learned MAC expired on its deadline: a announced its VM's binding with the
    // full sets at 30 s and 60 s (refreshing b's entry), forgot the silent VM at 90 s
    // (60 s unseen), and b's entry expired 60 s after its last refresh.
    assert!(net.status(1).macs.is_empty());
    assert_eq!(net.status(0).l2.local_bindings, 0);
    assert!(per_sec < 10.0, "{per_sec} polls per second");
    println!("idle overlay: {per_sec:.1} polls per second over 3 cores");
}

fn ip(n: u8) -> [u8; 4] {
    [198, 19, 0, n]
}

/// An ARP request from `sha`/`spa` for `tpa` (broadcast; gratuitous when `tpa == spa`).
fn arp_request(sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[..6].copy_from_slice(&BCAST);
    f[6..12].copy_from_slice(&sha);
    f[12..14].copy_from_slice(&[0x08, 0x06]);
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&sha);
    f[28..32].copy_from_slice(&spa);
    f[38..42].copy_from_slice(&tpa);
    f
}

/// The (sender MAC, sender address, target MAC) of an ARP reply frame.
fn arp_reply_of(f: &[u8]) -> Option<([u8; 6], [u8; 4], [u8; 6])> {
    if f.len() < 42 || f[12..14] != [0x08, 0x06] || f[20..22] != [0, 2] {
        return None;
    }
    Some((
        f[22..28].try_into().unwrap(),
        f[28..32].try_into().unwrap(),
        f[32..38].try_into().unwrap(),
    ))
}

/// Once a VM's binding is announced, ARP requests for it from the other site are answered
/// by the local edge: not one of them crosses the WAN (counted at both edges).
#[test]
fn arp_for_a_known_binding_is_answered_locally_and_never_crosses() {
    let mut net = Net::new(1);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    // VM 2 (behind b) announces itself with a gratuitous ARP; VM 1 (behind a) too.
    net.send_frame(b, &arp_request(mac(2), ip(2), ip(2)));
    net.send_frame(a, &arp_request(mac(1), ip(1), ip(1)));
    // One round trip: the bindings are announced at the edges' next poll.
    net.run(Duration::from_millis(50));
    assert_eq!(net.status(a).l2.remote_bindings, 1);
    assert_eq!(net.status(b).l2.remote_bindings, 1);
    let (a0, b0) = (net.status(a).l2, net.status(b).l2);
    let b_tap = net.edges[b].tap_rx.len();
    for _ in 0..10 {
        net.send_frame(a, &arp_request(mac(1), ip(1), ip(2)));
        let r = arp_reply_of(net.edges[a].tap_rx.last().unwrap()).expect("an ARP reply");
        assert_eq!(r, (mac(2), ip(2), mac(1)));
        net.send_frame(b, &arp_request(mac(2), ip(2), ip(1)));
        let r = arp_reply_of(net.edges[b].tap_rx.last().unwrap()).expect("an ARP reply");
        assert_eq!(r, (mac(1), ip(1), mac(2)));
        net.run(Duration::from_millis(100));
    }
    let (a1, b1) = (net.status(a).l2, net.status(b).l2);
    assert_eq!(a1.arp_answered_locally - a0.arp_answered_locally, 10);
    assert_eq!(b1.arp_answered_locally - b0.arp_answered_locally, 10);
    assert_eq!(a1.arp_requests_flooded, a0.arp_requests_flooded);
    assert_eq!(b1.arp_requests_from_wan, b0.arp_requests_from_wan);
    assert_eq!(a1.arp_requests_from_wan, a0.arp_requests_from_wan);
    // b's TAP got only its own answers (10), nothing from a.
    assert_eq!(net.edges[b].tap_rx.len() - b_tap, 10);
    // A request for an address nobody announced is flooded, and counted as such.
    net.send_frame(a, &arp_request(mac(1), ip(1), ip(9)));
    assert_eq!(
        net.status(a).l2.arp_requests_flooded,
        a1.arp_requests_flooded + 1
    );
    assert_eq!(
        net.status(b).l2.arp_requests_from_wan,
        b1.arp_requests_from_wan + 1
    );
    // With the control plane off, every request crosses again.
    let mut off = L2Config {
        control: false,
        ..L2Config::default()
    };
    off.announce_interval = Duration::from_secs(30);
    net.edges[a].core.set_l2_config(off);
    net.send_frame(a, &arp_request(mac(1), ip(1), ip(2)));
    assert_eq!(
        net.status(b).l2.arp_requests_from_wan,
        b1.arp_requests_from_wan + 2
    );
}

/// Sends `f` from edge `from` every 50 ms until edge `to`'s TAP device gets it; returns
/// how long that took (at most `limit`).
fn time_until_delivered(
    net: &mut Net,
    from: usize,
    to: usize,
    f: &[u8],
    limit: Duration,
) -> Option<Duration> {
    let t0 = net.now;
    while net.now - t0 <= limit {
        net.send_frame(from, f);
        if net.edges[to].tap_rx.last().map(Vec::as_slice) == Some(f) {
            return Some(net.now - t0);
        }
        net.run(Duration::from_millis(50));
    }
    None
}

/// A VM that moves without a gratuitous ARP is found at once by every edge (the new edge
/// announces it); a silent VM behind a restarted edge is reachable as soon as the new
/// edge's session is up (the old edge's MACs are dropped, frames for them are flooded).
#[test]
fn restarted_edge_and_moved_vm_are_reachable_within_a_second() {
    let mut net = Net::new(1);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    let c = net.add_edge("c", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    // VM 9 and VM 5 behind b say who they are; everyone knows them.
    net.send_frame(b, &arp_request(mac(9), ip(9), ip(9)));
    net.send_frame(b, &arp_request(mac(5), ip(5), ip(5)));
    net.send_frame(c, &arp_request(mac(3), ip(3), ip(3)));
    net.run(Duration::from_millis(100));
    let to9 = frame(mac(9), mac(1), 1);
    net.send_frame(a, &to9);
    assert_eq!(net.edges[b].tap_rx.last(), Some(&to9));
    // VM 9 migrates to c and sends one unicast frame (to VM 1 behind a), no ARP.
    net.send_frame(c, &frame(mac(1), mac(9), 2));
    net.run(Duration::from_millis(50));
    // Everyone, b included, now sends to c: no flood.
    let flooded_b = net.status(b).flooded_frames;
    let from_b = frame(mac(9), mac(6), 3);
    net.send_frame(b, &from_b);
    assert_eq!(net.edges[c].tap_rx.last(), Some(&from_b));
    assert_eq!(net.status(b).flooded_frames, flooded_b);
    let to9 = frame(mac(9), mac(1), 4);
    net.send_frame(a, &to9);
    assert_eq!(net.edges[c].tap_rx.last(), Some(&to9));
    // And ARP for VM 9 is answered at a with its MAC.
    net.send_frame(a, &arp_request(mac(1), ip(1), ip(9)));
    let r = arp_reply_of(net.edges[a].tap_rx.last().unwrap()).expect("an ARP reply");
    assert_eq!(r.0, mac(9));

    // b restarts (new id, same name); VM 5 behind it stays silent.
    net.edges[b].alive = false;
    let b2 = net.add_edge("b", "s", Cipher::Aes256Gcm);
    let to5 = frame(mac(5), mac(1), 5);
    let t = time_until_delivered(&mut net, a, b2, &to5, Duration::from_secs(1));
    println!("VM behind a restarted edge reachable after {t:?}");
    assert!(t.is_some(), "VM 5 unreachable 1 s after its edge restarted");
    // The old edge's binding is gone everywhere (it is not answered for with a stale MAC
    // holder any more: the request is flooded).
    let flooded = net.status(c).l2.arp_requests_flooded;
    net.send_frame(c, &arp_request(mac(3), ip(3), ip(5)));
    assert_eq!(net.status(c).l2.arp_requests_flooded, flooded + 1);
}

/// A broadcast storm from one VM is capped at its limit while another VM's unicast and
/// broadcast keep flowing; the drops are counted.
#[test]
fn a_broadcast_storm_from_one_vm_is_capped_while_others_flow() {
    let mut net = Net::new(1);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    net.edges[a].core.set_l2_config(L2Config {
        vm_flood_pps: 100,
        vm_flood_burst: 200,
        edge_flood_pps: 400,
        edge_flood_burst: 400,
        ..L2Config::default()
    });
    net.run(Duration::from_secs(2));
    net.send_frame(b, &frame(BCAST, mac(3), 0));
    net.run(Duration::from_millis(50));
    let before = net.edges[b].tap_rx.len();
    let (mut storm, mut unicast, mut other_bcast) = (0, 0, 0);
    // One second: 2000 broadcast frames from VM 1, and every 10 ms a unicast frame and a
    // broadcast from VM 2.
    for i in 0..2000u32 {
        net.send_frame(a, &frame(BCAST, mac(1), 1));
        if i % 20 == 0 {
            net.send_frame(a, &frame(mac(3), mac(2), 2));
            net.send_frame(a, &frame(BCAST, mac(2), 3));
        }
        net.run(Duration::from_micros(500));
    }
    for f in &net.edges[b].tap_rx[before..] {
        match (f[0], f[11], f[20]) {
            (0xff, 1, _) => storm += 1,
            (0xff, 2, _) => other_bcast += 1,
            (_, 2, _) => unicast += 1,
            _ => {}
        }
    }
    println!("storm: {storm} of 2000 crossed; other VM: {unicast}/100 unicast, {other_bcast}/100 broadcast");
    // The burst plus one second at the rate, give or take a frame.
    assert!((290..=302).contains(&storm), "{storm} storm frames crossed");
    assert_eq!(unicast, 100);
    assert_eq!(other_bcast, 100);
    let drops = net.status(a).drops;
    assert!(drops.get("flood_vm_limit").copied().unwrap_or(0) >= 1690);
    // The edge's own limit holds for many VMs together.
    let e0 = net
        .status(a)
        .drops
        .get("flood_edge_limit")
        .copied()
        .unwrap_or(0);
    for i in 0..1000u32 {
        net.send_frame(a, &frame(BCAST, [2, 0, 0, 1, (i >> 8) as u8, i as u8], 4));
    }
    let e1 = net
        .status(a)
        .drops
        .get("flood_edge_limit")
        .copied()
        .unwrap_or(0);
    assert!(e1 - e0 >= 500, "{} over the edge's limit", e1 - e0);
}

/// Two VMs claiming one address: the second claim is reported (counted), the first
/// binding is kept and ARP still answers with the first MAC.
#[test]
fn duplicate_ip_claims_are_reported_not_flipped() {
    let mut net = Net::new(1);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    let c = net.add_edge("c", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    net.send_frame(a, &arp_request(mac(1), ip(7), ip(7)));
    net.run(Duration::from_millis(50));
    // VM 2 behind b claims the same address, three times.
    for _ in 0..3 {
        net.send_frame(b, &arp_request(mac(2), ip(7), ip(7)));
        net.run(Duration::from_millis(50));
    }
    assert_eq!(net.status(b).l2.duplicate_ip_claims, 3);
    assert_eq!(net.status(a).l2.duplicate_ip_claims, 0);
    // Every edge still answers with the first MAC.
    for e in [b, c] {
        net.send_frame(e, &arp_request(mac(8), ip(8), ip(7)));
        let r = arp_reply_of(net.edges[e].tap_rx.last().unwrap()).expect("an ARP reply");
        assert_eq!(r.0, mac(1), "edge {e}");
    }
}

/// Link-local IPv6 address fe80::n.
fn ip6(n: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..2].copy_from_slice(&[0xfe, 0x80]);
    a[15] = n;
    a
}

/// An Ethernet frame carrying ICMPv6 message `m` from `s` to `d` (checksum filled in).
fn icmp6_frame(dst: [u8; 6], src: [u8; 6], s: [u8; 16], d: [u8; 16], m: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 54];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x86, 0xdd]);
    f[14] = 0x60;
    f[18..20].copy_from_slice(&(m.len() as u16).to_be_bytes());
    f[20] = 58;
    f[21] = 255;
    f[22..38].copy_from_slice(&s);
    f[38..54].copy_from_slice(&d);
    let mut m = m.to_vec();
    let mut sum = csum_add(0, &s);
    sum = csum_add(sum, &d);
    sum = csum_add(sum, &(m.len() as u32).to_be_bytes());
    sum = csum_add(sum, &[0, 0, 0, 58]);
    sum = csum_add(sum, &m);
    m[2..4].copy_from_slice(&(!csum_fold(sum)).to_be_bytes());
    f.extend_from_slice(&m);
    f
}

/// A neighbour solicitation from `sha`/`s` (unspecified: duplicate address detection)
/// for `target`, to its solicited-node group.
fn ns(sha: [u8; 6], s: [u8; 16], target: [u8; 16]) -> Vec<u8> {
    let mut d = [0u8; 16];
    d[..2].copy_from_slice(&[0xff, 0x02]);
    d[11..13].copy_from_slice(&[1, 0xff]);
    d[13..].copy_from_slice(&target[13..]);
    let mut m = vec![135, 0, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&target);
    if s != [0; 16] {
        m.extend_from_slice(&[1, 1]);
        m.extend_from_slice(&sha);
    }
    let dm = [0x33, 0x33, 0xff, target[13], target[14], target[15]];
    icmp6_frame(dm, sha, s, d, &m)
}

/// An unsolicited neighbour advertisement (override) of `target` by `sha`, to ff02::1.
fn unsolicited_na(sha: [u8; 6], target: [u8; 16]) -> Vec<u8> {
    let mut all = [0u8; 16];
    all[..2].copy_from_slice(&[0xff, 0x02]);
    all[15] = 1;
    let mut m = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    m.extend_from_slice(&target);
    m.extend_from_slice(&[2, 1]);
    m.extend_from_slice(&sha);
    icmp6_frame([0x33, 0x33, 0, 0, 0, 1], sha, target, all, &m)
}

/// (Ethernet source, IPv6 destination, solicited flag, target, target link-layer
/// address) of a neighbour advertisement.
type NaFields = ([u8; 6], [u8; 16], bool, [u8; 16], [u8; 6]);

/// The fields of a neighbour advertisement frame whose checksum verifies.
fn na_of(f: &[u8]) -> Option<NaFields> {
    if f.len() < 86 || f[12..14] != [0x86, 0xdd] || f[20] != 58 || f[54] != 136 {
        return None;
    }
    let plen = usize::from(u16::from_be_bytes([f[18], f[19]]));
    let m = &f[54..54 + plen];
    let mut sum = csum_add(0, &f[22..54]);
    sum = csum_add(sum, &(m.len() as u32).to_be_bytes());
    sum = csum_add(sum, &[0, 0, 0, 58]);
    sum = csum_add(sum, m);
    if csum_fold(sum) != 0xffff || m[24..26] != [2, 1] {
        return None;
    }
    Some((
        f[6..12].try_into().unwrap(),
        f[38..54].try_into().unwrap(),
        m[4] & 0x40 != 0,
        m[8..24].try_into().unwrap(),
        m[26..32].try_into().unwrap(),
    ))
}

/// Neighbour solicitations for an address announced by another site are answered by the
/// local edge (a valid advertisement with the owner's MAC) and none crosses the WAN;
/// duplicate address detection for an address held elsewhere is answered so it fails,
/// and reported; a VM that moves and advertises itself is found at the new site at once.
#[test]
fn nd_for_a_known_binding_is_answered_locally_and_never_crosses() {
    let mut net = Net::new(1);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    let c = net.add_edge("c", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    // VM 2 (behind b) does duplicate address detection for fe80::2; VM 1 (behind a)
    // solicits a neighbour nobody knows yet (so its own address is learned).
    net.send_frame(b, &ns(mac(2), [0; 16], ip6(2)));
    net.send_frame(a, &ns(mac(1), ip6(1), ip6(9)));
    net.run(Duration::from_millis(50));
    assert_eq!(net.status(a).l2.nd_solicits_flooded, 1);
    assert_eq!(net.status(b).l2.nd_solicits_from_wan, 1);
    let (a0, b0) = (net.status(a).l2, net.status(b).l2);
    for _ in 0..10 {
        net.send_frame(a, &ns(mac(1), ip6(1), ip6(2)));
        let r = na_of(net.edges[a].tap_rx.last().unwrap()).expect("a valid advertisement");
        assert_eq!(r, (mac(2), ip6(1), true, ip6(2), mac(2)));
        net.send_frame(b, &ns(mac(2), ip6(2), ip6(1)));
        let r = na_of(net.edges[b].tap_rx.last().unwrap()).expect("a valid advertisement");
        assert_eq!(r, (mac(1), ip6(2), true, ip6(1), mac(1)));
        net.run(Duration::from_millis(100));
    }
    let (a1, b1) = (net.status(a).l2, net.status(b).l2);
    assert_eq!(a1.nd_answered_locally - a0.nd_answered_locally, 10);
    assert_eq!(b1.nd_answered_locally - b0.nd_answered_locally, 10);
    assert_eq!(a1.nd_solicits_flooded, a0.nd_solicits_flooded);
    assert_eq!(b1.nd_solicits_from_wan, b0.nd_solicits_from_wan);
    assert_eq!(a1.nd_solicits_from_wan, a0.nd_solicits_from_wan);
    assert_eq!(net.status(c).l2.nd_solicits_from_wan, 1);
    // VM 3 behind c wants fe80::2 too: its duplicate address detection is answered
    // (for all nodes, not solicited) and the claim is reported.
    net.send_frame(c, &ns(mac(3), [0; 16], ip6(2)));
    let r = na_of(net.edges[c].tap_rx.last().unwrap()).expect("a valid advertisement");
    let mut all = [0u8; 16];
    all[..2].copy_from_slice(&[0xff, 0x02]);
    all[15] = 1;
    assert_eq!(r, (mac(2), all, false, ip6(2), mac(2)));
    assert_eq!(net.status(c).l2.duplicate_ip_claims, 1);
    // VM 2 moves to c and advertises itself once: a sends to c, without a flood.
    net.send_frame(c, &unsolicited_na(mac(2), ip6(2)));
    net.run(Duration::from_millis(50));
    let flooded = net.status(a).flooded_frames;
    let to2 = frame(mac(2), mac(1), 9);
    net.send_frame(a, &to2);
    assert_eq!(net.edges[c].tap_rx.last(), Some(&to2));
    assert_eq!(net.status(a).flooded_frames, flooded);
    net.send_frame(a, &ns(mac(1), ip6(1), ip6(2)));
    let r = na_of(net.edges[a].tap_rx.last().unwrap()).expect("a valid advertisement");
    assert_eq!(r.4, mac(2));
}

/// A DHCP reply of message type `kind` (5: ACK) from `server` giving `addr` to `client`.
fn dhcp_reply(server: [u8; 6], client: [u8; 6], addr: [u8; 4], kind: u8) -> Vec<u8> {
    let mut b = vec![0u8; 240];
    b[..3].copy_from_slice(&[2, 1, 6]);
    b[16..20].copy_from_slice(&addr);
    b[28..34].copy_from_slice(&client);
    b[236..240].copy_from_slice(&[99, 130, 83, 99]);
    b.extend_from_slice(&[53, 1, kind, 255]);
    let mut f = vec![0u8; 42];
    f[..6].copy_from_slice(&client);
    f[6..12].copy_from_slice(&server);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((28 + b.len()) as u16).to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&ip(1));
    f[30..34].copy_from_slice(&addr);
    f[34..38].copy_from_slice(&[0, 67, 0, 68]);
    f[38..40].copy_from_slice(&((8 + b.len()) as u16).to_be_bytes());
    f.extend_from_slice(&b);
    f
}

/// A lease acknowledged by a DHCP server at site A becomes a binding everywhere before
/// the client sends its first ARP: the client's edge sees the acknowledgement arrive and
/// announces it, and an ARP request for the leased address at a third site is answered
/// there.
#[test]
fn a_dhcp_lease_is_a_binding_before_the_first_arp() {
    let mut net = Net::new(1);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    let c = net.add_edge("c", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    // The client (VM 7 behind b) broadcasts its request (any broadcast will do).
    net.send_frame(b, &frame(BCAST, mac(7), 0));
    net.run(Duration::from_millis(50));
    // The server (VM 1 behind a) acknowledges 198.19.0.7.
    let ack = dhcp_reply(mac(1), mac(7), ip(7), 5);
    net.send_frame(a, &ack);
    assert_eq!(net.edges[b].tap_rx.last(), Some(&ack));
    net.run(Duration::from_millis(50));
    assert_eq!(net.status(a).l2.dhcp_acks_seen, 1);
    assert_eq!(net.status(b).l2.dhcp_acks_seen, 1);
    for e in [a, c] {
        net.send_frame(e, &arp_request(mac(8), ip(8), ip(7)));
        let r = arp_reply_of(net.edges[e].tap_rx.last().unwrap()).expect("an ARP reply");
        assert_eq!(r.0, mac(7), "edge {e}");
    }
    assert_eq!(net.status(b).l2.arp_requests_from_wan, 0);
    // An offer binds nothing.
    net.send_frame(a, &dhcp_reply(mac(1), mac(7), ip(17), 2));
    net.run(Duration::from_millis(50));
    let flooded = net.status(c).l2.arp_requests_flooded;
    net.send_frame(c, &arp_request(mac(8), ip(8), ip(17)));
    assert_eq!(net.status(c).l2.arp_requests_flooded, flooded + 1);
}

/// A peer that stops answering (its edge died, its supernode still lists it) loses its
/// bindings when its last session lapses, well before the peer itself expires: ARP for
/// its VMs is flooded again instead of answered with a stale MAC. A live peer's bindings
/// survive rekeying.
#[test]
fn bindings_go_when_the_peers_session_lapses() {
    let mut net = Net::new(1);
    let t = Timers {
        peer_expiry: Duration::from_secs(600),
        ..timers()
    };
    let a = net.add_edge_with("a", "s", Cipher::Aes256Gcm, t, true);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    let c = net.add_edge("c", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    net.send_frame(b, &arp_request(mac(2), ip(2), ip(2)));
    net.send_frame(c, &arp_request(mac(3), ip(3), ip(3)));
    net.run(Duration::from_millis(50));
    assert_eq!(net.status(a).l2.remote_bindings, 2);
    net.edges[b].alive = false;
    // The session lives at most `reject_after_time` (30 s here) without a rekey.
    net.run(Duration::from_secs(32));
    let st = net.status(a);
    assert!(st.peers.iter().any(|p| p.name == "b"), "b is still a peer");
    assert_eq!(st.l2.remote_bindings, 1, "only c's binding is left");
    let flooded = st.l2.arp_requests_flooded;
    net.send_frame(a, &arp_request(mac(1), ip(1), ip(2)));
    assert_eq!(net.status(a).l2.arp_requests_flooded, flooded + 1);
    net.send_frame(a, &arp_request(mac(1), ip(1), ip(3)));
    let r = arp_reply_of(net.edges[a].tap_rx.last().unwrap()).expect("an ARP reply");
    assert_eq!(r.0, mac(3));
}

/// An IGMPv3 report from `src` joining (or leaving) IPv4 group `g`.
fn igmp3_report(src: [u8; 6], g: [u8; 4], join: bool) -> Vec<u8> {
    let mut m = vec![0x22, 0, 0, 0, 0, 0, 0, 1, if join { 4 } else { 3 }, 0, 0, 0];
    m.extend_from_slice(&g);
    let c = !csum_fold(csum_add(0, &m));
    m[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0u8; 34];
    f[..6].copy_from_slice(&[1, 0, 0x5e, 0, 0, 22]);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((20 + m.len()) as u16).to_be_bytes());
    f[22] = 1;
    f[23] = 2;
    f[30..34].copy_from_slice(&[224, 0, 0, 22]);
    f.extend_from_slice(&m);
    f
}

/// Multicast follows membership: a group frame goes to the site whose VM joined it, not
/// to a site without members, and to a site whose edge announces no groups (control
/// plane off); link-local groups go everywhere; after the leave, no site gets it.
#[test]
fn multicast_goes_only_to_sites_with_members() {
    let mut net = Net::new(1);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    let c = net.add_edge("c", "s", Cipher::Aes256Gcm);
    let d = net.add_edge("d", "s", Cipher::Aes256Gcm);
    net.edges[d].core.set_l2_config(L2Config {
        control: false,
        ..L2Config::default()
    });
    net.run(Duration::from_secs(2));
    net.send_frame(b, &igmp3_report(mac(2), [239, 1, 2, 3], true));
    net.run(Duration::from_millis(50));
    assert_eq!(net.status(b).l2.local_groups, 1);
    let group = frame([1, 0, 0x5e, 1, 2, 3], mac(1), 0x31);
    let link_local = frame([1, 0, 0x5e, 0, 0, 251], mac(1), 0x32);
    let got = |net: &Net, e: usize, f: &Vec<u8>| net.tap_got(e, f);
    net.send_frame(a, &group);
    net.send_frame(a, &link_local);
    net.run(Duration::from_millis(50));
    assert!(got(&net, b, &group), "the member's site");
    assert!(!got(&net, c, &group), "a site without members");
    assert!(got(&net, d, &group), "a site that announces no groups");
    for e in [b, c, d] {
        assert!(got(&net, e, &link_local), "link-local group at edge {e}");
    }
    assert_eq!(net.status(a).l2.multicast_withheld, 1);
    // VM 2 leaves: b no longer gets the group either.
    net.send_frame(b, &igmp3_report(mac(2), [239, 1, 2, 3], false));
    net.run(Duration::from_millis(50));
    let again = frame([1, 0, 0x5e, 1, 2, 3], mac(1), 0x33);
    net.send_frame(a, &again);
    net.run(Duration::from_millis(50));
    assert!(!got(&net, b, &again) && !got(&net, c, &again));
    assert!(got(&net, d, &again));
}

/// Large broadcast frames are held to the edge's byte limit even while they are within
/// its frame limits: 1400-byte frames from many VMs at 500 frames/s for 2 s against a
/// limit of 100 kB/s (100 kB at once).
#[test]
fn large_broadcast_frames_are_held_to_the_byte_limit() {
    let mut net = Net::new(1);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    net.edges[a].core.set_l2_config(L2Config {
        edge_flood_bytes: 100_000,
        edge_flood_byte_burst: 100_000,
        ..L2Config::default()
    });
    net.run(Duration::from_secs(2));
    let before = net.edges[b].tap_rx.len();
    for i in 0..1000u32 {
        let mut f = vec![0u8; 1400];
        f[..6].copy_from_slice(&BCAST);
        f[6..12].copy_from_slice(&[2, 0, 0, 2, (i >> 8) as u8, i as u8]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        net.send_frame(a, &f);
        net.run(Duration::from_millis(2));
    }
    let got = net.edges[b].tap_rx[before..]
        .iter()
        .filter(|f| f.len() == 1400)
        .count();
    let drops = net.status(a).drops;
    let dropped = drops.get("flood_edge_bytes").copied().unwrap_or(0);
    println!("{got} of 1000 large frames crossed, {dropped} dropped at the byte limit");
    // 100 kB at once and 100 kB/s for 2 s: 300 kB, 214 frames of 1400 bytes.
    assert!((210..=216).contains(&got), "{got} frames crossed");
    assert_eq!(dropped, 1000 - got as u64);
    assert_eq!(drops.get("flood_vm_limit").copied().unwrap_or(0), 0);
}

/// A DHCP client's broadcast (REQUEST) from `client`.
fn dhcp_request(client: [u8; 6]) -> Vec<u8> {
    let mut f = dhcp_reply(client, BCAST, [0; 4], 3);
    f[6..12].copy_from_slice(&client);
    f[34..38].copy_from_slice(&[0, 68, 0, 67]);
    f[42] = 1;
    f[70..76].copy_from_slice(&client);
    f
}

/// Three edges "a", "b", "c" of one community, their sessions up.
fn three_sites() -> (Net, [usize; 3]) {
    let mut net = Net::new(1);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    let c = net.add_edge("c", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    (net, [a, b, c])
}

/// Once a DHCP server has acknowledged a lease, clients' broadcasts go only to the site
/// of the server and the server's broadcast replies only to the site of the client: the
/// third site gets none of them (counted as withheld).
#[test]
fn dhcp_broadcasts_go_only_where_the_server_or_client_is() {
    let (mut net, [a, b, c]) = three_sites();
    let got = |net: &Net, e: usize, f: &Vec<u8>| net.tap_got(e, f);
    // The first request: no server known yet, flooded everywhere.
    let r7 = dhcp_request(mac(7));
    net.send_frame(b, &r7);
    assert!(got(&net, a, &r7) && got(&net, c, &r7));
    net.run(Duration::from_millis(50));
    // The server (VM 1 behind a) acknowledges, broadcast: only b gets it.
    let mut ack = dhcp_reply(mac(1), mac(7), ip(7), 5);
    ack[..6].copy_from_slice(&BCAST);
    net.send_frame(a, &ack);
    assert!(got(&net, b, &ack));
    assert!(
        !got(&net, c, &ack),
        "the reply went to a site without the client"
    );
    net.run(Duration::from_millis(50));
    // Another client at b, then one at c: their requests reach a only.
    net.send_frame(b, &frame(BCAST, mac(8), 0));
    net.run(Duration::from_millis(50));
    let r8 = dhcp_request(mac(8));
    net.send_frame(b, &r8);
    assert!(got(&net, a, &r8));
    assert!(
        !got(&net, c, &r8),
        "a client's request went to a site without servers"
    );
    // c has seen no acknowledgement yet: its first client's request goes everywhere,
    // the answer only to c, and from then on c's requests go to a only.
    let r9 = dhcp_request(mac(9));
    net.send_frame(c, &r9);
    assert!(got(&net, a, &r9) && got(&net, b, &r9));
    net.run(Duration::from_millis(50));
    let mut ack9 = dhcp_reply(mac(1), mac(9), ip(9), 5);
    ack9[..6].copy_from_slice(&BCAST);
    net.send_frame(a, &ack9);
    assert!(got(&net, c, &ack9) && !got(&net, b, &ack9));
    net.send_frame(c, &frame(BCAST, mac(10), 0));
    net.run(Duration::from_millis(50));
    let r10 = dhcp_request(mac(10));
    net.send_frame(c, &r10);
    assert!(got(&net, a, &r10) && !got(&net, b, &r10));
    let withheld = [a, b, c].map(|e| net.status(e).l2.dhcp_withheld);
    assert_eq!(withheld, [2, 1, 1], "copies withheld at a, b, c");
    // A request at the server's own site does not cross at all.
    let r2 = dhcp_request(mac(2));
    net.send_frame(a, &r2);
    assert!(!got(&net, b, &r2) && !got(&net, c, &r2));
}

/// A server's OFFER places it as an acknowledgement does: the client's REQUEST that
/// follows goes only to the server's site, so of a DHCP exchange only what a site's
/// clients send before the first reply reaches the site goes to every peer.
#[test]
fn a_dhcp_offer_places_the_server_for_the_request_that_follows() {
    let (mut net, [a, b, c]) = three_sites();
    let got = |net: &Net, e: usize, f: &Vec<u8>| net.tap_got(e, f);
    // The client's first broadcast: no server known yet, flooded everywhere.
    let first = dhcp_request(mac(7));
    net.send_frame(b, &first);
    assert!(got(&net, a, &first) && got(&net, c, &first));
    net.run(Duration::from_millis(50));
    // The server (VM 1 behind a) offers an address, broadcast: only b gets it.
    let mut offer = dhcp_reply(mac(1), mac(7), ip(7), 2);
    offer[..6].copy_from_slice(&BCAST);
    net.send_frame(a, &offer);
    assert!(got(&net, b, &offer) && !got(&net, c, &offer));
    net.run(Duration::from_millis(50));
    // The client's REQUEST (the same frame again here) reaches a only.
    let before = net.edges[c].tap_rx.len();
    net.send_frame(b, &first);
    assert!(
        net.edges[c].tap_rx.len() == before,
        "the request after the offer went to a site without servers"
    );
    assert_eq!(net.status(b).l2.dhcp_withheld, 1);
}

/// When the session with the DHCP server's edge ends, clients' requests are flooded to
/// every site again at once, not steered to that edge until it expires (here, as by
/// default, long after its session): a server at another site can answer them.
#[test]
fn dhcp_requests_are_not_steered_to_a_server_whose_session_ended() {
    let mut net = Net::new(1);
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let slow_expiry = Timers {
        peer_expiry: Duration::from_secs(90),
        mac_expiry: Duration::from_secs(300),
        ..timers()
    };
    let b = net.add_edge_with("b", "s", Cipher::Aes256Gcm, slow_expiry.clone(), true);
    let c = net.add_edge("c", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    let got = |net: &Net, e: usize, f: &Vec<u8>| net.tap_got(e, f);
    // The server (VM 1 behind a) is bound everywhere and acknowledges a client at b.
    net.send_frame(a, &frame(BCAST, mac(1), 0));
    net.send_frame(b, &frame(BCAST, mac(7), 0));
    net.run(Duration::from_millis(50));
    let mut ack = dhcp_reply(mac(1), mac(7), ip(7), 5);
    ack[..6].copy_from_slice(&BCAST);
    net.send_frame(a, &ack);
    assert!(got(&net, b, &ack));
    net.run(Duration::from_millis(50));
    let r7 = dhcp_request(mac(7));
    net.send_frame(b, &r7);
    assert!(got(&net, a, &r7) && !got(&net, c, &r7), "steered to a");
    // a goes away; once b's session with it has ended (its bindings dropped, well
    // before a expires at b), b's client's request reaches c too.
    net.edges[a].alive = false;
    let step = Duration::from_millis(500);
    let mut t = Duration::ZERO;
    while net.status(b).l2.remote_bindings > 0 && t < Duration::from_secs(60) {
        net.run(step);
        t += step;
    }
    println!("a's bindings dropped at b after {t:?}");
    assert_eq!(
        net.status(b).l2.remote_bindings,
        0,
        "a's bindings still held"
    );
    assert!(t < slow_expiry.peer_expiry, "{t:?}");
    let again = dhcp_request(mac(7));
    net.send_frame(b, &again);
    assert!(
        got(&net, c, &again),
        "the request went only to the edge whose session ended"
    );
}

/// One DHCP server answers 300 clients at two other sites at once (an OFFER each, then
/// an ACK each, broadcast: 600 replies from one MAC): every reply reaches its client's
/// site and no other, none is charged to the server VM's flood limit. A second VM at the
/// server's site that sends the same replies (faking a server) is still held to its
/// flood limit.
#[test]
fn a_dhcp_server_answers_a_large_cluster_at_once_and_a_fake_one_is_limited() {
    let mut net = Net::new(1);
    net.max_macs = 1024;
    let a = net.add_edge("a", "s", Cipher::Aes256Gcm);
    let b = net.add_edge("b", "s", Cipher::Aes256Gcm);
    let c = net.add_edge("c", "s", Cipher::Aes256Gcm);
    net.run(Duration::from_secs(2));
    let client = |i: u16| [2, 0, 0, 0x10, (i >> 8) as u8, i as u8];
    let at = |i: u16| if i % 2 == 0 { b } else { c };
    // The clients ask (their requests make them known); the server is VM 1 behind a,
    // known at its edge from its first broadcast.
    for i in 0..300u16 {
        net.send_frame(at(i), &dhcp_request(client(i)));
    }
    net.send_frame(a, &frame(BCAST, mac(1), 0));
    net.run(Duration::from_millis(50));
    let rx0 = [b, c].map(|e| net.edges[e].tap_rx.len());
    let reply = |server: [u8; 6], i: u16, kind: u8| {
        let mut f = dhcp_reply(
            server,
            client(i),
            [198, 19, 1 + (i >> 8) as u8, i as u8],
            kind,
        );
        f[..6].copy_from_slice(&BCAST);
        f
    };
    let mut sent = Vec::new();
    for kind in [2, 5] {
        for i in 0..300u16 {
            let f = reply(mac(1), i, kind);
            net.send_frame(a, &f);
            sent.push((at(i), f));
        }
    }
    net.run(Duration::from_millis(50));
    let got = |net: &Net, e: usize, f: &Vec<u8>| {
        let from = if e == b { rx0[0] } else { rx0[1] };
        net.edges[e].tap_rx[from..].iter().any(|x| x == f)
    };
    let delivered = sent.iter().filter(|(e, f)| got(&net, *e, f)).count();
    let astray = sent
        .iter()
        .filter(|(e, f)| got(&net, if *e == b { c } else { b }, f))
        .count();
    let st = net.status(a);
    let vm_drops = st.drops.get("flood_vm_limit").copied().unwrap_or(0);
    println!(
        "server: {delivered}/600 replies delivered, {astray} astray, {} steered, {vm_drops} over the VM limit",
        st.l2.dhcp_replies_steered
    );
    assert_eq!(delivered, 600);
    assert_eq!(astray, 0);
    assert_eq!(vm_drops, 0);
    assert_eq!(st.l2.dhcp_replies_steered, 600);
    // A second VM at a sends the same 600 replies (ACKs too) at once: only its flood
    // burst crosses.
    let rx1 = [b, c].map(|e| net.edges[e].tap_rx.len());
    net.send_frame(a, &frame(BCAST, mac(2), 0));
    for kind in [2, 5] {
        for i in 0..300u16 {
            net.send_frame(a, &reply(mac(2), i, kind));
        }
    }
    net.run(Duration::from_millis(50));
    let fake = [(b, rx1[0]), (c, rx1[1])]
        .iter()
        .map(|&(e, from)| {
            net.edges[e].tap_rx[from..]
                .iter()
                .filter(|f| f[6..12] == mac(2) && f.len() > 60)
                .count()
        })
        .sum::<usize>();
    let st = net.status(a);
    let vm_drops = st.drops.get("flood_vm_limit").copied().unwrap_or(0);
    println!("fake server: {fake}/600 replies crossed, {vm_drops} over the VM limit");
    assert!(fake <= 202, "{fake} fake replies crossed");
    assert!(vm_drops >= 398, "{vm_drops} over the VM limit");
    // The bound server still answers outside the limit.
    let again = reply(mac(1), 1, 5);
    net.send_frame(a, &again);
    assert!(net.edges[c].tap_rx.last() == Some(&again));
    // Its replies have their own bounded allowance.
    net.edges[a].core.set_l2_config(L2Config {
        dhcp_reply_pps: 10,
        dhcp_reply_burst: 20,
        ..L2Config::default()
    });
    let before = net.status(a).l2.dhcp_replies_steered;
    for i in 0..100u16 {
        net.send_frame(a, &reply(mac(1), i, 5));
    }
    let st = net.status(a);
    let limited = st.drops.get("dhcp_reply_limit").copied().unwrap_or(0);
    assert!((20..=21).contains(&(st.l2.dhcp_replies_steered - before)));
    assert!(limited >= 79, "{limited} over the reply limit");
}

/// What a supernode restart under relayed traffic cost: until the restarted supernode
/// held both edges again, until the first reply relayed through it, and its counters.
struct RestartRecovery {
    registered: Duration,
    first_reply: Duration,
    sn: dataplane::status::SupernodeStatus,
}

/// Two edges with production timers talk through one supernode (their direct path is
/// blocked): pings every 100 ms from a, answered by b. At 3 s the supernode restarts empty
/// (same key) with `prompts_per_s`.
fn restart_under_relayed_traffic(prompts_per_s: u32) -> RestartRecovery {
    let (mut net, a, b) = relayed_pair(1);
    let dt = Duration::from_millis(10);
    let t0 = net.now;
    let mut restart_at = None;
    let (mut registered, mut first_reply) = (None, None);
    for tick in 0..1000u32 {
        if tick % 10 == 0 {
            net.send_frame(a, &frame(mac(2), mac(1), 1));
            let got: Vec<Vec<u8>> = net.edges[b].tap_rx.drain(..).collect();
            for _ in got.iter().filter(|g| g[..6] == mac(2)) {
                net.send_frame(b, &frame(mac(1), mac(2), 2));
            }
        }
        let replied = net.edges[a].tap_rx.drain(..).any(|f| f[..6] == mac(1));
        if let Some(r) = restart_at {
            let since = net.now - t0 - r;
            if registered.is_none() && net.sns[0].core.edge_count() == 2 {
                registered = Some(since);
            }
            if first_reply.is_none() && replied {
                first_reply = Some(since);
            }
        }
        if tick == 300 {
            let cfg = SupernodeConfig {
                prompts_per_s,
                ..SupernodeConfig::default()
            };
            net.sns[0].core = SupernodeCore::new(cfg, net.sns[0].key.clone(), net.now);
            restart_at = Some(net.now - t0);
        }
        net.step(dt);
    }
    RestartRecovery {
        registered: registered.expect("both edges registered again"),
        first_reply: first_reply.expect("replies resume"),
        sn: net.sns[0].core.status(net.now, "sn"),
    }
}

/// After a supernode restart, relayed traffic from edges it no longer has is answered
/// with a prompt to register: the edges are registered again and the relayed pings flow
/// within a few hundred ms, not at their next periodic registration (every 4-5 s), the
/// run without prompts side by side.
#[test]
fn a_restarted_supernode_prompts_relaying_edges_to_register() {
    let with = restart_under_relayed_traffic(SupernodeConfig::default().prompts_per_s);
    let without = restart_under_relayed_traffic(0);
    println!(
        "restart: registered again after {:?} with prompts ({} sent, {} relayed dropped as from \
         unknown edges), {:?} without ({} dropped); first reply {:?} / {:?}",
        with.registered,
        with.sn.prompts_sent,
        with.sn.drops.get("relay_unknown_src").copied().unwrap_or(0)
            + with.sn.drops.get("unknown_community").copied().unwrap_or(0),
        without.registered,
        without
            .sn
            .drops
            .get("relay_unknown_src")
            .copied()
            .unwrap_or(0)
            + without
                .sn
                .drops
                .get("unknown_community")
                .copied()
                .unwrap_or(0),
        with.first_reply,
        without.first_reply,
    );
    assert!(with.sn.prompts_sent >= 1);
    assert_eq!(without.sn.prompts_sent, 0);
    assert!(
        with.registered < Duration::from_millis(500),
        "registered again {:?} after the restart",
        with.registered
    );
    assert!(
        with.first_reply < Duration::from_millis(500),
        "first relayed reply {:?} after the restart",
        with.first_reply
    );
    assert!(with.registered < without.registered);
}

/// A prompt to register as the supernode sends it, with any cookie (anyone can forge one
/// with the supernode's source address).
fn prompt_for(edge: [u8; 8], cookie: [u8; 16]) -> Vec<u8> {
    let c = dataplane::wire::Cookie {
        edge,
        seq: dataplane::wire::PROMPT_SEQ,
        cookie,
    };
    let mut b = vec![0u8; dataplane::wire::COOKIE_MSG_LEN];
    let n = c.encode(&mut b).unwrap();
    b.truncate(n);
    b
}

/// Forged prompts (the supernode's source address, a wrong cookie), 100 of them in one
/// second and as many for another edge id, make a registered edge register at most once for them (`handshake_retry` is
/// 1 s) and once more to answer the cookie its wrong one earns; the rest are counted. The
/// edge stays registered, and prompts for another edge id are not for it.
#[test]
fn forged_prompts_make_an_edge_register_at_most_once_per_handshake_retry() {
    let mut net = Net::with_sn_config(
        1,
        SupernodeConfig {
            edge_timeout: Duration::from_secs(30),
            ..SupernodeConfig::default()
        },
    );
    let t = Timers::default();
    let retry = t.handshake_retry;
    let a = net.add_edge_with("a", "s", Cipher::Aes256Gcm, t, true);
    net.run(Duration::from_secs(2));
    assert_eq!(net.status(a).supernodes[0].state, "up");
    let (sn, ea, id) = (net.sns[0].addr, net.edges[a].addr, net.edges[a].core.id());
    let regs = |net: &Net| {
        net.seen
            .iter()
            .filter(|(s, d, p)| {
                *s == ea && *d == sn && p[1] == dataplane::wire::MsgType::Register as u8
            })
            .count()
    };
    net.capture = true;
    let (t0, n) = (net.now, 100u64);
    for _ in 0..n {
        for edge in [[0u8; 8], id] {
            net.queue.push_back((sn, ea, prompt_for(edge, [7; 16])));
        }
        net.deliver();
        net.step(Duration::from_millis(9));
    }
    let spent = net.now - t0;
    assert!(spent < retry + Duration::from_millis(10), "{spent:?}");
    let st = net.status(a);
    let too_soon = st.drops.get("prompt_too_soon").copied().unwrap_or(0);
    let not_for_us = st.drops.get("cookie_not_for_us").copied().unwrap_or(0);
    // The periodic registration (every 4-5 s) may fall in this second too.
    let sent = regs(&net);
    println!("{n} forged prompts in {spent:?}: {sent} registrations, {too_soon} too soon, {not_for_us} not for us");
    assert!(sent <= 3, "{sent} registrations for {n} forged prompts");
    assert_eq!(too_soon, n - 1);
    assert!(not_for_us >= n, "{not_for_us}");
    net.run(Duration::from_secs(1));
    assert_eq!(net.status(a).supernodes[0].state, "up");
    assert_eq!(net.sns[0].core.edge_count(), 1);
}

/// A flood of relayed packets from edges the supernode does not have is answered with at
/// most `prompts_per_s` prompts a second and one per source address per 100 ms, each no
/// larger than what triggered it; the rest are counted, and nothing else is sent.
#[test]
fn prompts_to_unknown_relays_are_rate_limited_and_counted() {
    use dataplane::wire::{Cookie, RelayHdr, COOKIE_MSG_LEN, PROMPT_SEQ, RELAY_HDR_LEN};
    let t0 = Instant::now();
    let key = SupernodeKey::generate().unwrap();
    let cfg = SupernodeConfig {
        prompts_per_s: 100,
        ..SupernodeConfig::default()
    };
    let mut sn = SupernodeCore::new(cfg, key, t0);
    let mut out = Outbox::new(2048);
    let community = dataplane::crypto::CommunityKeys::derive("lab", b"s").id;
    // The smallest relay packet: a header and two bytes (a prompt is as long as the header).
    let mut pkt = vec![0u8; RELAY_HDR_LEN + 2];
    let (mut prompts, mut other) = (0u64, 0u64);
    let mut per_src = std::collections::HashMap::<SocketAddr, u64>::new();
    // One second: 1,000 sources, 5 packets each, 5,000 packets in all.
    for k in 0..5_000u32 {
        let now = t0 + Duration::from_micros(200 * u64::from(k));
        let src = sa(&format!(
            "198.18.{}.{}:40000",
            1 + k % 1000 / 200,
            k % 200 + 1
        ));
        let h = RelayHdr {
            community,
            src: (k % 1000).to_be_bytes().repeat(2).try_into().unwrap(),
            dst: [9; 8],
        };
        h.write(&mut pkt).unwrap();
        if k % 2 == 0 {
            sn.handle(now, src, &pkt, &mut out);
        } else {
            assert!(sn.relay_target(now, src, &pkt, &mut out).is_none());
        }
        for u in &out.udp {
            let b = u.bytes();
            assert_eq!(u.dst, src);
            assert!(b.len() <= pkt.len() && b.len() == COOKIE_MSG_LEN);
            let c = Cookie::decode(b).unwrap();
            assert_eq!((c.seq, c.edge), (PROMPT_SEQ, h.src));
            prompts += 1;
            *per_src.entry(src).or_default() += 1;
        }
        other += out.tap.len() as u64;
        out.recycle_sent();
    }
    let st = sn.status(t0 + Duration::from_secs(1), "sn");
    println!(
        "5,000 unknown relays from 1,000 sources in 1 s: {prompts} prompts, {} limited",
        st.prompts_limited
    );
    assert_eq!(other, 0);
    assert_eq!(prompts, st.prompts_sent);
    assert!(prompts > 0 && prompts <= 100, "{prompts} prompts");
    assert_eq!(st.prompts_sent + st.prompts_limited, 5_000);
    // Each 100 ms slot: 500 packets, 10 prompts; one source at most once in a slot.
    assert!(per_src.values().all(|n| *n <= 10));
    // One source flooding alone: one prompt per 100 ms slot.
    let src = sa("198.18.7.7:40000");
    let before = sn.status(t0, "sn").prompts_sent;
    for k in 0..1_000u32 {
        let now = t0 + Duration::from_secs(2) + Duration::from_millis(u64::from(k));
        sn.handle(now, src, &pkt, &mut out);
        out.recycle_sent();
    }
    let st = sn.status(t0, "sn");
    assert_eq!(st.prompts_sent - before, 10);
    assert!(
        st.drops.get("relay_unknown_src").copied().unwrap_or(0)
            + st.drops.get("unknown_community").copied().unwrap_or(0)
            >= 6_000
    );
}
