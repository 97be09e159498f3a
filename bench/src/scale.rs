//! Scale simulation: N edges in communities of K against S supernodes, all in one process,
//! on a simulated network with virtual time (no sockets, no sleeping). The cores are the
//! ones the binaries run ([`EdgeCore`], [`SupernodeCore`]); time jumps from one core's
//! deadline (`poll_timeout`) to the next through a heap of deadlines, so thousands of
//! idle edges cost nothing between their timers.
//!
//! One [`run`] goes through: a cold start (everyone registers at once), a steady window,
//! one late join, relayed packets, a supernode restart, edges leaving and restarting, and
//! a supernode outage after which every edge registers again. CPU is the wall time spent
//! inside the cores' calls; memory comes from the caller's allocation counter (the bench
//! binary counts every allocation), read around dropping the cores it measures.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use dataplane::crypto::{Cipher, CommunityKeys};
use dataplane::edge::{EdgeConfig, EdgeCore, SeededRng, SupernodeAddr, Timers};
use dataplane::outbox::Outbox;
use dataplane::snkey::SupernodeKey;
use dataplane::supernode::{SupernodeConfig, SupernodeCore};
use dataplane::wire::{self, MsgType, RelayHdr, RELAY_HDR_LEN};
use serde::Serialize;

/// Errors of a scale run.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    /// A core refused its settings.
    #[error("setting up the simulation: {0}")]
    Setup(String),
    /// More edges than the simulated underlay has addresses for.
    #[error("at most {MAX_EDGES} edges")]
    TooMany,
}

/// Most edges a run can address (198.18.1.1 .. 198.18.254.250, 200 ports each).
pub const MAX_EDGES: usize = 254 * 250 * 200;

/// What to simulate.
#[derive(Clone, Debug, Serialize)]
pub struct ScaleConfig {
    /// Edges.
    pub edges: usize,
    /// Edges per community (the last one may be smaller).
    pub community_size: usize,
    /// Supernodes (every edge registers with all of them).
    pub supernodes: usize,
    /// Seed of the edges' generators.
    pub seed: u64,
    /// Longest a convergence may take (virtual time) before it is reported as missed.
    pub budget_s: u64,
    /// Length of the steady window (virtual seconds).
    pub steady_s: u64,
    /// Length of the supernode outage (virtual seconds).
    pub outage_s: u64,
    /// Relayed packets sent through the supernode.
    pub relay_packets: usize,
    /// New registrations a supernode admits per second (0: no limit).
    pub new_per_s: u32,
}

impl ScaleConfig {
    /// Defaults for `edges` edges.
    pub fn new(edges: usize) -> Self {
        Self {
            edges,
            community_size: 10,
            supernodes: 1,
            seed: 1,
            budget_s: 60,
            steady_s: 5,
            outage_s: 15,
            relay_packets: 10_000,
            new_per_s: SupernodeConfig::default().new_per_s,
        }
    }
}

/// How long until everyone knew everyone (virtual time).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Convergence {
    /// Edges that had to converge.
    pub edges: usize,
    /// Of them, those that did within the budget.
    pub converged: usize,
    /// Median edge (ms, virtual).
    pub p50_ms: Option<u64>,
    /// Last edge (ms, virtual); `None` when some did not converge.
    pub all_ms: Option<u64>,
}

/// Supernode traffic and CPU during one phase.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SnTraffic {
    /// Registrations handled (all supernodes, cookie answers included).
    pub register_msgs: u64,
    /// Wall time inside the supernodes' handle() for them (µs).
    pub register_cpu_us: u64,
    /// Peer-information datagrams sent.
    pub peerinfo_msgs: u64,
    /// Their bytes.
    pub peerinfo_bytes: u64,
    /// Cookie answers sent.
    pub cookie_msgs: u64,
    /// Acknowledgements sent.
    pub ack_msgs: u64,
    /// Most registrations one supernode handled in one 100 ms slot.
    pub peak_register_per_100ms: u64,
    /// Signatures the supernodes made (acknowledgements and peer information).
    pub signatures: u64,
    /// Wall time inside the supernodes' calls, all of them (µs).
    pub cpu_us: u64,
}

/// Everything one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct ScaleResult {
    /// The settings.
    pub config: ScaleConfig,
    /// Communities.
    pub communities: usize,
    /// Cold start: everyone starts at once.
    pub cold: Convergence,
    /// Cold start: every edge had a session with every peer.
    pub cold_sessions: Convergence,
    /// Supernode traffic of the cold start.
    pub cold_sn: SnTraffic,
    /// Supernode CPU per accepted registration in the cold start (µs).
    pub cpu_per_registration_us: f64,
    /// Peer-information bytes sent per edge in the cold start.
    pub peerinfo_bytes_per_join_cold: f64,
    /// Supernode signatures per edge in the cold start (acknowledgements included).
    pub signatures_per_join_cold: f64,
    /// One edge joining a converged community: peer-information bytes the supernodes send.
    pub peerinfo_bytes_late_join: u64,
    /// Edges in that community after the join.
    pub late_join_community: usize,
    /// Supernode CPU per relayed packet (µs), the table holding every edge.
    pub cpu_per_relay_us: f64,
    /// Relayed packets the supernodes counted (must equal the packets sent).
    pub relayed_counted: u64,
    /// Registered edges on the first supernode once converged.
    pub registered: usize,
    /// Supernode memory per registered edge (bytes; `None` without an allocation counter).
    pub sn_bytes_per_edge: Option<f64>,
    /// Edge memory per peer (bytes, edge base included).
    pub edge_bytes_per_peer: Option<f64>,
    /// Edge memory per edge (bytes).
    pub edge_bytes_per_edge: Option<f64>,
    /// Steady state: edge CPU per peer per second of virtual time (µs).
    pub edge_cpu_per_peer_s_us: f64,
    /// Steady state: supernode CPU per second of virtual time (µs).
    pub sn_cpu_per_s_us: f64,
    /// Steady state: supernode CPU per registered edge per second of virtual time (µs).
    pub sn_cpu_per_edge_s_us: f64,
    /// Supernode traffic of the steady window (periodic registrations only).
    pub steady_sn: SnTraffic,
    /// Supernode restarted (tables lost, no outage): until it held every edge again (ms).
    pub restart_reregistered_ms: Option<u64>,
    /// Edges a supernode held after the restart and lost again before all were back.
    pub restart_dropped_known: usize,
    /// New registrations refused for overload after the restart (they retried).
    pub restart_overload_drops: u64,
    /// After the restart: every edge knew every peer (ms).
    pub restart: Convergence,
    /// Supernode traffic after the restart.
    pub restart_sn: SnTraffic,
    /// A tenth of the edges restarted with new keys: until every edge knew the new ids.
    pub churn: Convergence,
    /// Edges restarted in the churn.
    pub churned: usize,
    /// After the outage: until the supernode held every edge again (ms).
    pub outage_reregistered_ms: Option<u64>,
    /// Edges a supernode held after the outage and lost again before all were back.
    pub outage_dropped_known: usize,
    /// New registrations refused for overload after the outage (they retried).
    pub outage_overload_drops: u64,
    /// After the outage: every edge knew every peer (ms).
    pub outage: Convergence,
    /// Supernode traffic after the outage.
    pub outage_sn: SnTraffic,
    /// Supernode drops by reason at the end (first supernode).
    pub sn_drops: std::collections::BTreeMap<String, u64>,
    /// Wall time of the whole run (ms).
    pub wall_ms: u64,
}

struct Edge {
    addr: SocketAddr,
    community: usize,
    core: EdgeCore,
    alive: bool,
    restarts: u64,
}

struct Sn {
    addr: SocketAddr,
    key: SupernodeKey,
    core: SupernodeCore,
    out: Outbox,
    alive: bool,
    /// Registrations in the current 100 ms slot and the slot.
    slot: (u64, u64),
}

#[derive(Clone, Copy)]
enum Node {
    Edge(usize),
    Sn(usize),
}

/// How often the supernodes expire silent edges (their driver's tick).
const SN_TICK: Duration = Duration::from_millis(500);

type Queue = VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>;

struct Net {
    t0: Instant,
    now: Instant,
    cfg: ScaleConfig,
    edges: Vec<Edge>,
    /// One outbox for every edge: what a call writes is moved to the queue at once.
    eout: Outbox,
    sns: Vec<Sn>,
    index: HashMap<SocketAddr, Node>,
    heap: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Each edge's deadline as last scheduled: older heap entries are stale.
    sched: Vec<Option<Instant>>,
    /// Edges that received datagrams in the delivery under way (and `touched_mark`
    /// says whether an edge is in it): their deadlines are asked for once, after it.
    touched: Vec<usize>,
    touched_mark: Vec<bool>,
    /// When the supernodes are polled next (every 500 ms, as their driver does).
    sn_tick: Instant,
    queue: Queue,
    traffic: SnTraffic,
    edge_cpu: Duration,
    sn_cpu: Duration,
    members: Vec<Vec<usize>>,
    /// Signatures of supernode cores replaced by a restart.
    sigs_retired: u64,
    /// Signatures and supernode CPU when the traffic was last taken.
    sigs_mark: u64,
    cpu_mark: Duration,
}

fn edge_addr(i: usize) -> SocketAddr {
    let host = i % (254 * 250);
    let port = 40_000 + (i / (254 * 250)) as u16;
    let ip = Ipv4Addr::new(198, 18, 1 + (host / 250) as u8, 1 + (host % 250) as u8);
    SocketAddr::new(IpAddr::V4(ip), port)
}

fn sn_config(cfg: &ScaleConfig, n: usize) -> SupernodeConfig {
    SupernodeConfig {
        max_edges: n * 2 + 16,
        new_per_s: cfg.new_per_s,
        ..SupernodeConfig::default()
    }
}

fn drain(out: &mut Outbox, src: SocketAddr, q: &mut Queue) {
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
    out.recycle_sent();
}

impl Net {
    fn new(cfg: &ScaleConfig) -> Result<Self, ScaleError> {
        if cfg.edges > MAX_EDGES {
            return Err(ScaleError::TooMany);
        }
        let now = Instant::now();
        let mut sns = Vec::new();
        let mut index = HashMap::new();
        for j in 0..cfg.supernodes.max(1) {
            let key = SupernodeKey::generate().map_err(|e| ScaleError::Setup(e.to_string()))?;
            let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 100 + j as u8)), 7654);
            index.insert(addr, Node::Sn(j));
            sns.push(Sn {
                addr,
                core: SupernodeCore::new(sn_config(cfg, cfg.edges), key.clone(), now),
                key,
                out: Outbox::new(2048),
                alive: true,
                slot: (0, 0),
            });
        }
        let k = cfg.community_size.max(1);
        let n_comm = cfg.edges.div_ceil(k);
        let mut net = Self {
            t0: now,
            now,
            cfg: cfg.clone(),
            edges: Vec::with_capacity(cfg.edges),
            eout: Outbox::new(2048),
            sns,
            index,
            heap: BinaryHeap::new(),
            sched: Vec::with_capacity(cfg.edges),
            touched: Vec::new(),
            touched_mark: Vec::with_capacity(cfg.edges),
            sn_tick: now + SN_TICK,
            queue: VecDeque::new(),
            traffic: SnTraffic::default(),
            edge_cpu: Duration::ZERO,
            sn_cpu: Duration::ZERO,
            members: vec![Vec::new(); n_comm],
            sigs_retired: 0,
            sigs_mark: 0,
            cpu_mark: Duration::ZERO,
        };
        for i in 0..cfg.edges {
            net.add_edge(i / k)?;
        }
        Ok(net)
    }

    fn edge_core(&self, i: usize, community: usize, restarts: u64) -> Result<EdgeCore, ScaleError> {
        let addr = edge_addr(i);
        let cfg = EdgeConfig {
            name: format!("e{i}"),
            community: format!("c{community}"),
            secret: format!("secret-{community}").into_bytes(),
            cipher: Cipher::Aes256Gcm,
            supernodes: self
                .sns
                .iter()
                .map(|s| SupernodeAddr {
                    addr: s.addr,
                    key: Some(s.key.public()),
                })
                .collect(),
            local_addrs: vec![addr],
            timers: Timers::default(),
            // Room for every member twice: after the churn a tenth of them hold new ids
            // while the old ones are kept until they expire (90 s).
            max_peers: self.cfg.community_size * 2 + 16,
            max_macs: 64,
        };
        let seed = self
            .cfg
            .seed
            .wrapping_add(i as u64)
            .wrapping_add(restarts.wrapping_mul(0x1_0000_0000));
        EdgeCore::with_rng(cfg, self.now, Box::new(SeededRng::new(seed)))
            .map_err(|e| ScaleError::Setup(e.to_string()))
    }

    fn add_edge(&mut self, community: usize) -> Result<usize, ScaleError> {
        let i = self.edges.len();
        let core = self.edge_core(i, community, 0)?;
        let addr = edge_addr(i);
        self.index.insert(addr, Node::Edge(i));
        self.members[community].push(i);
        self.sched.push(None);
        self.touched_mark.push(false);
        self.edges.push(Edge {
            addr,
            community,
            core,
            alive: true,
            restarts: 0,
        });
        self.schedule_edge(i);
        Ok(i)
    }

    /// Asks edge `i` for its deadline (a scan of its peer table: once per event batch,
    /// as a driver does after a batch of datagrams, not once per datagram).
    fn schedule_edge(&mut self, i: usize) {
        let d = self.edges[i].core.poll_timeout();
        if d != self.sched[i] {
            self.sched[i] = d;
            if let Some(d) = d {
                self.heap.push(Reverse((d, i)));
            }
        }
    }

    fn count_sn_out(&mut self, j: usize) {
        for u in &self.sns[j].out.udp {
            let b = u.bytes();
            match wire::peek_type(b) {
                Ok(MsgType::PeerInfo) => {
                    self.traffic.peerinfo_msgs += 1;
                    self.traffic.peerinfo_bytes += b.len() as u64;
                }
                Ok(MsgType::Cookie) => self.traffic.cookie_msgs += 1,
                Ok(MsgType::RegisterAck) => self.traffic.ack_msgs += 1,
                _ => {}
            }
        }
    }

    fn deliver(&mut self) {
        while let Some((src, dst, mut pkt)) = self.queue.pop_front() {
            let now = self.now;
            match self.index.get(&dst).copied() {
                Some(Node::Edge(i)) if self.edges[i].alive => {
                    let e = &mut self.edges[i];
                    let t = Instant::now();
                    e.core.handle_udp(now, src, &mut pkt, &mut self.eout);
                    self.edge_cpu += t.elapsed();
                    drain(&mut self.eout, e.addr, &mut self.queue);
                    if !self.touched_mark[i] {
                        self.touched_mark[i] = true;
                        self.touched.push(i);
                    }
                }
                Some(Node::Sn(j)) if self.sns[j].alive => {
                    let is_reg = wire::peek_type(&pkt).ok() == Some(MsgType::Register);
                    let s = &mut self.sns[j];
                    let t = Instant::now();
                    s.core.handle(now, src, &pkt, &mut s.out);
                    let dt = t.elapsed();
                    self.sn_cpu += dt;
                    if is_reg {
                        self.traffic.register_msgs += 1;
                        self.traffic.register_cpu_us += dt.as_micros() as u64;
                        let slot = (now - self.t0).as_millis() as u64 / 100;
                        if s.slot.1 != slot {
                            s.slot = (0, slot);
                        }
                        s.slot.0 += 1;
                        self.traffic.peak_register_per_100ms =
                            self.traffic.peak_register_per_100ms.max(s.slot.0);
                    }
                    self.count_sn_out(j);
                    let s = &mut self.sns[j];
                    drain(&mut s.out, s.addr, &mut self.queue);
                }
                _ => {}
            }
        }
        let touched = std::mem::take(&mut self.touched);
        for &i in &touched {
            self.touched_mark[i] = false;
            self.schedule_edge(i);
        }
        self.touched = touched;
        self.touched.clear();
    }

    /// Moves virtual time to `end`, polling every core whose deadline came.
    fn run_until(&mut self, end: Instant) {
        loop {
            let e = self.heap.peek().map(|r| r.0 .0);
            let a = self.next_announcement();
            let next = e.map_or(self.sn_tick, |e| e.min(self.sn_tick));
            let next = a.map_or(next, |a| a.min(next));
            if next > end {
                self.now = end;
                return;
            }
            self.now = self.now.max(next);
            let now = self.now;
            while let Some(&Reverse((d, i))) = self.heap.peek() {
                if d > now {
                    break;
                }
                self.heap.pop();
                let e = &mut self.edges[i];
                // Stale heap entries (the deadline moved) are skipped.
                if !e.alive || self.sched[i] != Some(d) {
                    continue;
                }
                self.sched[i] = None;
                let t = Instant::now();
                e.core.poll(now, &mut self.eout);
                self.edge_cpu += t.elapsed();
                drain(&mut self.eout, e.addr, &mut self.queue);
                self.schedule_edge(i);
            }
            let tick = self.sn_tick <= now;
            if tick {
                self.sn_tick = now + SN_TICK;
            }
            if tick || a.is_some_and(|a| a <= now) {
                for j in 0..self.sns.len() {
                    let s = &mut self.sns[j];
                    let due = tick || s.core.announce_at().is_some_and(|a| a <= now);
                    if !s.alive || !due {
                        continue;
                    }
                    let t = Instant::now();
                    s.core.poll(now, &mut s.out);
                    self.sn_cpu += t.elapsed();
                    self.count_sn_out(j);
                    let s = &mut self.sns[j];
                    drain(&mut s.out, s.addr, &mut self.queue);
                }
            }
            self.deliver();
        }
    }

    /// The earliest time a live supernode is due to announce gathered joins (its driver
    /// polls it then, besides every 500 ms).
    fn next_announcement(&self) -> Option<Instant> {
        self.sns
            .iter()
            .filter(|s| s.alive)
            .filter_map(|s| s.core.announce_at())
            .min()
    }

    fn ms(&self, since: Instant) -> u64 {
        self.now.saturating_duration_since(since).as_millis() as u64
    }

    /// Whether edge `i` knows (or has a session with) every live member of its community:
    /// one table lookup per member (not the status document, which formats every peer).
    fn knows_all(&self, i: usize, sessions: bool) -> bool {
        let e = &self.edges[i];
        self.members[e.community]
            .iter()
            .filter(|&&m| m != i && self.edges[m].alive)
            .all(|&m| {
                e.core
                    .peer_session(&self.edges[m].core.id())
                    .is_some_and(|s| s || !sessions)
            })
    }

    /// Runs until every live edge of `which` knows every live peer (checked every 100 ms
    /// of virtual time), or the budget runs out.
    fn converge(&mut self, which: &[usize], sessions: bool) -> Convergence {
        self.converge_since(self.now, which, sessions)
    }

    /// [`Net::converge`], with times counted from `start`.
    fn converge_since(&mut self, start: Instant, which: &[usize], sessions: bool) -> Convergence {
        let end = start + Duration::from_secs(self.cfg.budget_s);
        let mut left: Vec<usize> = which
            .iter()
            .copied()
            .filter(|&i| self.edges[i].alive)
            .collect();
        let total = left.len();
        let mut times = Vec::with_capacity(total);
        loop {
            left.retain(|&i| {
                let done = self.knows_all(i, sessions);
                if done {
                    times.push(self.ms(start));
                }
                !done
            });
            if left.is_empty() || self.now >= end {
                break;
            }
            let next = (self.now + Duration::from_millis(100)).min(end);
            self.run_until(next);
        }
        times.sort_unstable();
        Convergence {
            edges: total,
            converged: times.len(),
            p50_ms: times.get(times.len() / 2).copied(),
            all_ms: left.is_empty().then(|| times.last().copied().unwrap_or(0)),
        }
    }

    /// Runs until every supernode holds `n` edges: the time it took (ms), `None` when
    /// the budget ran out, and the most edges a supernode held at one check (every 100 ms)
    /// and no longer at a later one (known edges dropped on the way).
    fn reregistered(&mut self, n: usize) -> Rereg {
        let start = self.now;
        let end = start + Duration::from_secs(self.cfg.budget_s);
        let mut most = vec![0usize; self.sns.len()];
        let mut lost = 0;
        loop {
            let held: Vec<usize> = self.sns.iter().map(|s| s.core.edge_count()).collect();
            for (m, h) in most.iter_mut().zip(&held) {
                lost = lost.max(m.saturating_sub(*h));
                *m = (*m).max(*h);
            }
            if held.iter().all(|h| *h >= n) {
                return Rereg {
                    ms: Some(self.ms(start)),
                    lost,
                };
            }
            if self.now >= end {
                return Rereg { ms: None, lost };
            }
            let next = (self.now + Duration::from_millis(100)).min(end);
            self.run_until(next);
        }
    }

    fn take_traffic(&mut self) -> SnTraffic {
        let sigs = self.sigs_retired + self.sns.iter().map(|s| s.core.signatures()).sum::<u64>();
        let mut t = std::mem::take(&mut self.traffic);
        t.signatures = sigs - self.sigs_mark;
        t.cpu_us = (self.sn_cpu - self.cpu_mark).as_micros() as u64;
        self.sigs_mark = sigs;
        self.cpu_mark = self.sn_cpu;
        t
    }

    /// Replaces supernode `j`'s core with a new one (same key, empty tables).
    fn restart_sn(&mut self, j: usize) {
        let s = &mut self.sns[j];
        self.sigs_retired += s.core.signatures();
        s.core = SupernodeCore::new(
            sn_config(&self.cfg, self.cfg.edges + 1),
            s.key.clone(),
            self.now,
        );
        s.alive = true;
        // What the old core queued is lost with it; the buffers stay (the outbox's pool
        // is the driver's, bounded, and not the core's memory).
        s.out.recycle_sent();
    }
}

/// How a re-registration went.
struct Rereg {
    ms: Option<u64>,
    lost: usize,
}

fn registered(core: &SupernodeCore) -> usize {
    core.edge_count()
}

fn drops(core: &SupernodeCore, now: Instant, reason: &str) -> u64 {
    core.status(now, "").drops.get(reason).copied().unwrap_or(0)
}

/// Runs the whole scenario. `allocated` reads the bytes allocated in the process now
/// (`None`: memory is not reported).
pub fn run(cfg: &ScaleConfig, allocated: Option<fn() -> usize>) -> Result<ScaleResult, ScaleError> {
    let wall = Instant::now();
    let mut net = Net::new(cfg)?;
    let n = cfg.edges;
    let all: Vec<usize> = (0..n).collect();

    // Cold start.
    let t_cold = net.now;
    let cold = net.converge(&all, false);
    let cold_sessions = net.converge_since(t_cold, &all, true);
    let cold_sn = net.take_traffic();
    let registered_first = registered(&net.sns[0].core);
    let accepted: u64 = net
        .sns
        .iter()
        .map(|s| s.core.status(net.now, "").registrations)
        .sum();
    let cpu_per_registration_us = cold_sn.register_cpu_us as f64 / accepted.max(1) as f64;
    let peerinfo_bytes_per_join_cold = cold_sn.peerinfo_bytes as f64 / n.max(1) as f64;
    let signatures_per_join_cold = cold_sn.signatures as f64 / n.max(1) as f64;

    // Steady window.
    let (e0, s0) = (net.edge_cpu, net.sn_cpu);
    let steady = Duration::from_secs(cfg.steady_s.max(1));
    net.run_until(net.now + steady);
    let peers: f64 = net
        .members
        .iter()
        .map(|m| (m.len() * m.len().saturating_sub(1)) as f64)
        .sum();
    let edge_cpu_per_peer_s_us =
        (net.edge_cpu - e0).as_secs_f64() * 1e6 / peers.max(1.0) / steady.as_secs_f64();
    let sn_cpu_per_s_us = (net.sn_cpu - s0).as_secs_f64() * 1e6 / steady.as_secs_f64();
    let sn_cpu_per_edge_s_us = sn_cpu_per_s_us / n.max(1) as f64;
    let steady_sn = net.take_traffic();

    // One late join into community 0.
    let j = net.add_edge(0)?;
    let _ = net.converge(&[j], false);
    net.run_until(net.now + Duration::from_secs(1));
    let late = net.take_traffic();
    let late_join_community = net.members[0].len();

    // Relayed packets between members of the same community.
    let relayed_before = net.sns[0].core.status(net.now, "").relayed_packets;
    let ids: Vec<_> = net.edges.iter().map(|e| e.core.id()).collect();
    let cids: Vec<_> = (0..net.members.len())
        .map(|c| CommunityKeys::derive(&format!("c{c}"), format!("secret-{c}").as_bytes()).id)
        .collect();
    let mut pkt = vec![0u8; RELAY_HDR_LEN + 100];
    let mut relay_cpu = Duration::ZERO;
    let mut sent = 0u64;
    let mut x = cfg.seed | 1;
    for _ in 0..cfg.relay_packets {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let c = (x as usize) % net.members.len();
        let m = &net.members[c];
        if m.len() < 2 {
            continue;
        }
        let pa = (x >> 20) as usize % m.len();
        let pb = (pa + 1 + (x >> 40) as usize % (m.len() - 1)) % m.len();
        let (a, b) = (m[pa], m[pb]);
        let h = RelayHdr {
            community: cids[c],
            src: ids[a],
            dst: ids[b],
        };
        if h.write(&mut pkt).is_err() {
            continue;
        }
        let s = &mut net.sns[0];
        let t = Instant::now();
        s.core.handle(net.now, net.edges[a].addr, &pkt, &mut s.out);
        relay_cpu += t.elapsed();
        s.out.recycle_sent();
        sent += 1;
    }
    let relayed_counted = net.sns[0]
        .core
        .status(net.now, "")
        .relayed_packets
        .saturating_sub(relayed_before);
    let cpu_per_relay_us = relay_cpu.as_secs_f64() * 1e6 / sent.max(1) as f64;

    // Supernode restart: tables lost; the memory it gave back is what it held.
    let reg = registered(&net.sns[0].core);
    let before = allocated.map(|f| f());
    net.restart_sn(0);
    let sn_bytes_per_edge = match (allocated, before) {
        (Some(f), Some(b)) => Some(b.saturating_sub(f()) as f64 / reg.max(1) as f64),
        _ => None,
    };
    for j in 1..net.sns.len() {
        net.restart_sn(j);
    }
    let n_now = net.edges.len();
    let restart_rereg = net.reregistered(n_now);
    let restart_overload_drops = drops(&net.sns[0].core, net.now, "overload");
    let all: Vec<usize> = (0..n_now).collect();
    let restart = net.converge(&all, false);
    let restart_sn = net.take_traffic();

    // Churn: a tenth of the edges restart with new keys at the same address.
    let step = 10;
    let churned: Vec<usize> = (0..n_now).step_by(step).collect();
    for &i in &churned {
        let c = net.edges[i].community;
        let r = net.edges[i].restarts + 1;
        let core = net.edge_core(i, c, r)?;
        let e = &mut net.edges[i];
        e.core = core;
        e.restarts = r;
        net.schedule_edge(i);
    }
    let churn = net.converge(&all, false);
    net.take_traffic();

    // Outage: the supernodes go away long enough for the edges to notice, then come back
    // empty and everyone registers again.
    for s in &mut net.sns {
        s.alive = false;
    }
    net.run_until(net.now + Duration::from_secs(cfg.outage_s));
    for j in 0..net.sns.len() {
        net.restart_sn(j);
    }
    let outage_rereg = net.reregistered(n_now);
    let outage_overload_drops = drops(&net.sns[0].core, net.now, "overload");
    let outage = net.converge(&all, false);
    let outage_sn = net.take_traffic();
    let sn_drops = net.sns[0].core.status(net.now, "").drops;

    // Edge memory: what dropping every edge gives back.
    let peer_slots: f64 = net
        .members
        .iter()
        .map(|m| (m.len() * m.len().saturating_sub(1)) as f64)
        .sum();
    let n_edges = net.edges.len();
    let before = allocated.map(|f| f());
    net.edges.clear();
    net.edges.shrink_to_fit();
    let (edge_bytes_per_peer, edge_bytes_per_edge) = match (allocated, before) {
        (Some(f), Some(b)) => {
            let d = b.saturating_sub(f()) as f64;
            (
                Some(d / peer_slots.max(1.0)),
                Some(d / n_edges.max(1) as f64),
            )
        }
        _ => (None, None),
    };

    Ok(ScaleResult {
        config: cfg.clone(),
        communities: net.members.len(),
        cold,
        cold_sessions,
        cold_sn,
        cpu_per_registration_us,
        peerinfo_bytes_per_join_cold,
        signatures_per_join_cold,
        peerinfo_bytes_late_join: late.peerinfo_bytes,
        late_join_community,
        cpu_per_relay_us,
        relayed_counted,
        registered: registered_first,
        sn_bytes_per_edge,
        edge_bytes_per_peer,
        edge_bytes_per_edge,
        edge_cpu_per_peer_s_us,
        sn_cpu_per_s_us,
        sn_cpu_per_edge_s_us,
        steady_sn,
        restart_reregistered_ms: restart_rereg.ms,
        restart_dropped_known: restart_rereg.lost,
        restart_overload_drops,
        restart,
        restart_sn,
        churn,
        churned: churned.len(),
        outage_reregistered_ms: outage_rereg.ms,
        outage_dropped_known: outage_rereg.lost,
        outage_overload_drops,
        outage,
        outage_sn,
        sn_drops,
        wall_ms: wall.elapsed().as_millis() as u64,
    })
}

/// Supernode CPU of one periodic registration in a community of `k`, two ways, in
/// alternation: the edge holds the current list (the acknowledgement alone goes back) and
/// the edge holds none (the complete list goes back too, what every periodic registration
/// cost before lists were versioned; since protocol 4 the list's parts are signed once per
/// version and copied to each edge that needs them, so this is mostly the copies). Medians
/// over `reps` pairs, in µs.
#[derive(Clone, Debug, Serialize)]
pub struct RegCost {
    /// Community size.
    pub community: usize,
    /// Pairs measured.
    pub reps: usize,
    /// Median µs, the edge holding the current list.
    pub current_us: f64,
    /// Median µs, the complete list sent.
    pub full_list_us: f64,
    /// Datagrams and bytes the supernode sent for one registration, each way.
    pub current_out: (usize, usize),
    /// As `current_out`, the complete list sent.
    pub full_list_out: (usize, usize),
}

/// Measures [`RegCost`] for a community of `k` edges registered with one supernode.
pub fn registration_cost(k: usize, reps: usize) -> Result<RegCost, ScaleError> {
    use dataplane::wire::{Cookie, Register, RegisterAck, NO_LIST, SIG_LEN};
    use ring::signature::{Ed25519KeyPair, KeyPair};
    let setup = |e: &dyn std::fmt::Display| ScaleError::Setup(e.to_string());
    let now = Instant::now();
    let key = SupernodeKey::generate().map_err(|e| setup(&e))?;
    let mut sn = SupernodeCore::new(
        SupernodeConfig {
            max_edges: k + 16,
            new_per_s: 0,
            ..SupernodeConfig::default()
        },
        key,
        now,
    );
    let community = CommunityKeys::derive("c", b"s").id;
    let mut out = Outbox::new(2048);
    let mut pairs = Vec::with_capacity(k);
    for i in 0..k.max(1) {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|e| setup(&e))?;
        pairs.push((pair, edge_addr(i), [0u8; 16], 0u64, NO_LIST));
    }
    let mut buf = vec![0u8; 2048];
    // Sends edge `i`'s next registration with `known`; returns (µs, datagrams, bytes) and
    // keeps the cookie and list version the supernode answered with.
    let mut register = |sn: &mut SupernodeCore,
                        out: &mut Outbox,
                        e: &mut (Ed25519KeyPair, SocketAddr, [u8; 16], u64, u64),
                        known: Option<u64>|
     -> Result<(f64, usize, usize), ScaleError> {
        e.3 += 1;
        let mut edge_key = [0u8; 32];
        edge_key.copy_from_slice(e.0.public_key().as_ref());
        let m = Register {
            cookie: e.2,
            community,
            edge_key,
            seq: e.3,
            known: known.unwrap_or(e.4),
            name: "e".into(),
            local_addrs: vec![e.1],
        };
        let n = m.encode_unsigned(&mut buf).map_err(|x| setup(&x))?;
        let sig = e.0.sign(&buf[..n]);
        buf[n..n + SIG_LEN].copy_from_slice(sig.as_ref());
        let t = Instant::now();
        sn.handle(now, e.1, &buf[..n + SIG_LEN], out);
        let us = t.elapsed().as_secs_f64() * 1e6;
        let (mut dgrams, mut bytes) = (0, 0);
        for u in &out.udp {
            let b = u.bytes();
            if u.dst == e.1 {
                match wire::peek_type(b) {
                    Ok(MsgType::Cookie) => {
                        if let Ok(c) = Cookie::decode(b) {
                            e.2 = c.cookie;
                        }
                    }
                    Ok(MsgType::RegisterAck) => {
                        if let Ok(a) = RegisterAck::decode(b) {
                            e.2 = a.msg.cookie;
                            e.4 = a.msg.version;
                        }
                    }
                    _ => {}
                }
            }
            dgrams += 1;
            bytes += b.len();
        }
        out.recycle_sent();
        Ok((us, dgrams, bytes))
    };
    // Everyone in (a cookie first, then the registration), then once more so each
    // holds the final version.
    for round in 0..3 {
        for e in pairs.iter_mut() {
            register(&mut sn, &mut out, e, None)?;
        }
        if round == 1 {
            // The versions the edges hold are those of their last complete list; the
            // last round makes every one current.
            let v = pairs.last().map_or(NO_LIST, |p| p.4);
            for p in pairs.iter_mut() {
                p.4 = v;
            }
        }
    }
    // The joins are announced when the supernode is polled (the list version moves on
    // then); once more round, so every edge holds the version after them.
    sn.poll(now + SupernodeConfig::default().announce_delay, &mut out);
    out.recycle_sent();
    for e in pairs.iter_mut() {
        register(&mut sn, &mut out, e, None)?;
    }
    let (mut cur, mut full) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    let (mut cur_out, mut full_out) = ((0, 0), (0, 0));
    for r in 0..reps {
        let i = r % pairs.len();
        let e = &mut pairs[i];
        let a = register(&mut sn, &mut out, e, None)?;
        let b = register(&mut sn, &mut out, e, Some(NO_LIST))?;
        cur.push(a.0);
        full.push(b.0);
        cur_out = (a.1, a.2);
        full_out = (b.1, b.2);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    Ok(RegCost {
        community: k,
        reps,
        current_us: median(&mut cur),
        full_list_us: median(&mut full),
        current_out: cur_out,
        full_list_out: full_out,
    })
}
