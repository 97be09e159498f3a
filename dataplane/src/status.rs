//! Status documents of edges and supernodes: built by the cores, served as JSON on the
//! status socket, rendered as tables and as Prometheus text.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// One supernode as an edge sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SupernodeLink {
    /// Address.
    pub addr: String,
    /// "up" or "down".
    pub state: String,
    /// Our address as the supernode observes it.
    pub observed: Option<String>,
    /// Milliseconds since the last acknowledgement.
    pub last_ack_ms: Option<u64>,
    /// The supernode's public key the edge checks signatures with (none yet: unpinned
    /// and not heard from).
    #[serde(default)]
    pub key: Option<String>,
    /// "pinned" (configured), "first-use" (taken from the first signed acknowledgement)
    /// or "none".
    #[serde(default)]
    pub key_source: String,
}

/// One peer of an edge.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    /// Name (as announced to the supernode; "?" until it is known).
    pub name: String,
    /// Edge id (hex).
    pub id: String,
    /// Where its packets go: the direct address, or the supernode relaying them.
    pub endpoint: String,
    /// "direct" or "relayed".
    pub path: String,
    /// Why.
    pub path_reason: String,
    /// Round-trip time of the last path probe.
    pub rtt_ms: Option<f64>,
    /// Session established.
    pub session: bool,
    /// Session age.
    pub session_age_s: Option<u64>,
    /// Counters.
    pub tx_bytes: u64,
    /// Counters.
    pub rx_bytes: u64,
    /// Counters.
    pub tx_packets: u64,
    /// Counters.
    pub rx_packets: u64,
    /// Handshakes completed with this peer.
    pub handshakes: u64,
}

/// A learned MAC address.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MacStatus {
    /// aa:bb:cc:dd:ee:ff
    pub mac: String,
    /// Owning peer's name.
    pub peer: String,
}

/// `mvc edge status --json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EdgeStatus {
    /// Edge name.
    pub name: String,
    /// Community name.
    pub community: String,
    /// This edge's id (hex).
    pub id: String,
    /// Data cipher.
    pub cipher: String,
    /// "tap" or "xdp".
    pub datapath: String,
    /// Why this datapath.
    pub datapath_reason: String,
    /// I/O engine and offloads in use.
    pub io: String,
    /// TAP device.
    pub tap: String,
    /// TAP MTU.
    pub mtu: u32,
    /// UDP listen address.
    pub listen: String,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Supernodes.
    pub supernodes: Vec<SupernodeLink>,
    /// Peers.
    pub peers: Vec<PeerStatus>,
    /// Learned MACs.
    pub macs: Vec<MacStatus>,
    /// Frames read from the TAP device.
    pub tap_rx_frames: u64,
    /// Frames written to the TAP device.
    pub tap_tx_frames: u64,
    /// Frames flooded (broadcast, multicast, unknown unicast).
    pub flooded_frames: u64,
    /// Frame bytes of the copies of flooded frames sent across the WAN (one per direct
    /// peer, one per broadcast through a supernode).
    #[serde(default)]
    pub flooded_wan_bytes: u64,
    /// Datagrams received.
    pub udp_rx_packets: u64,
    /// Datagrams sent.
    pub udp_tx_packets: u64,
    /// Drops by reason.
    pub drops: BTreeMap<String, u64>,
    /// Forwarder threads (`--threads`), each with its own socket and frame queue.
    #[serde(default)]
    pub threads: Vec<ThreadStatus>,
    /// The L2 control plane: bindings and ARP.
    #[serde(default)]
    pub l2: L2Status,
    /// The XDP junk filter in front of the socket (`--xdp-filter`), when attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xdp_filter: Option<XdpFilterStatus>,
}

/// Counters of an edge's L2 control plane.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct L2Status {
    /// Bindings announced and ARP answered locally.
    pub control: bool,
    /// MACs (with their IPv4 address when known) on this edge's side.
    pub local_bindings: u64,
    /// MACs announced by peers.
    pub remote_bindings: u64,
    /// ARP requests from the TAP device answered here (an address behind a peer).
    pub arp_answered_locally: u64,
    /// ARP requests from the TAP device for an address on this side: not forwarded.
    pub arp_owned_locally: u64,
    /// ARP requests flooded to peers (no binding known).
    pub arp_requests_flooded: u64,
    /// ARP requests received from peers.
    pub arp_requests_from_wan: u64,
    /// Addresses claimed by a second MAC while the first held them (reported, not
    /// taken over).
    pub duplicate_ip_claims: u64,
    /// Control messages (bindings and groups) sent.
    pub bindings_sent: u64,
    /// Control messages (bindings and groups) received.
    pub bindings_received: u64,
    /// Neighbour solicitations from the TAP device answered here (an address behind a
    /// peer).
    pub nd_answered_locally: u64,
    /// Neighbour solicitations from the TAP device for an address on this side.
    pub nd_owned_locally: u64,
    /// Multicast neighbour solicitations flooded to peers (no binding known).
    pub nd_solicits_flooded: u64,
    /// Multicast neighbour solicitations received from peers.
    pub nd_solicits_from_wan: u64,
    /// DHCP acknowledgements seen (their leases become bindings).
    pub dhcp_acks_seen: u64,
    /// IGMP and MLD membership reports from local VMs.
    pub membership_reports: u64,
    /// Multicast groups with members on this side.
    pub local_groups: u64,
    /// Copies of multicast frames not sent to a peer without members of the group.
    pub multicast_withheld: u64,
    /// Copies of DHCP broadcasts not sent to a peer without the server or the client.
    pub dhcp_withheld: u64,
    /// Broadcast replies of local DHCP servers sent only to their client's peer, outside
    /// the flood limits.
    pub dhcp_replies_steered: u64,
}

/// Counters of one forwarder thread of an edge.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ThreadStatus {
    /// Thread number (also its frame queue and socket).
    pub thread: usize,
    /// Frames read from its frame queue.
    pub frames_rx: u64,
    /// Frames (TSO super-frames count once) written to the frame port.
    pub frames_tx: u64,
    /// Datagrams received on its socket.
    pub udp_rx: u64,
    /// Datagrams sent from its socket.
    pub udp_tx: u64,
    /// Rounds that waited for another thread to release the core.
    pub lock_waits: u64,
}

/// One edge as a supernode knows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RegisteredEdge {
    /// Name.
    pub name: String,
    /// Edge id (hex).
    pub id: String,
    /// Source address of its registrations.
    pub observed: String,
    /// Addresses it announced.
    pub local_addrs: Vec<String>,
    /// Milliseconds since its last registration.
    pub last_seen_ms: u64,
}

/// One community at a supernode.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CommunityStatus {
    /// Community id (hex; the supernode never learns the name).
    pub id: String,
    /// Edges.
    pub edges: Vec<RegisteredEdge>,
}

/// `mvc supernode status --json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SupernodeStatus {
    /// Listen address.
    pub listen: String,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Communities.
    pub communities: Vec<CommunityStatus>,
    /// Registrations accepted.
    pub registrations: u64,
    /// Cookie messages sent (answers to registrations from unvalidated addresses).
    #[serde(default)]
    pub cookies_sent: u64,
    /// Prompts to register sent to edges not registered from the address they relayed
    /// from (a cookie message with the prompt sequence number).
    #[serde(default)]
    pub prompts_sent: u64,
    /// Prompts left out by the per-second and per-address limits.
    #[serde(default)]
    pub prompts_limited: u64,
    /// The supernode's public key, as edges pin it (`--supernode ADDR@KEY`).
    #[serde(default)]
    pub key: String,
    /// Packets relayed (each copy of a fan-out counts).
    pub relayed_packets: u64,
    /// Bytes relayed.
    pub relayed_bytes: u64,
    /// Sends that carried relayed packets: a batch of datagrams for one edge goes
    /// as one GSO send, so `relayed_packets / relay_sends` is the datagrams per send.
    #[serde(default)]
    pub relay_sends: u64,
    /// Drops by reason.
    pub drops: BTreeMap<String, u64>,
    /// The XDP relay and filter on the underlay interface (`--xdp-relay`),
    /// when attached. Its packets are not in `relayed_packets`, which counts
    /// what userspace relayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xdp_relay: Option<XdpRelayStatus>,
}

/// The edge's XDP junk filter (`--xdp-filter`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct XdpFilterStatus {
    /// Interface it runs on.
    pub iface: String,
    /// `native` or `generic`.
    pub mode: String,
    /// Datagrams for the edge's port passed on to its socket.
    pub passed: u64,
    /// Transport messages passed on without the session check (the session map was
    /// incomplete).
    #[serde(default)]
    pub passed_unchecked: u64,
    /// Datagrams dropped before the socket, by reason.
    pub drops: BTreeMap<String, u64>,
    /// Live session indexes in the program's map.
    #[serde(default)]
    pub sessions: u64,
    /// Whether the program checks session indexes (the map holds every live one).
    #[serde(default)]
    pub session_check: bool,
    /// Live session indexes the map had no room for.
    #[serde(default)]
    pub sessions_missing: u64,
    /// Session map updates that failed.
    #[serde(default)]
    pub map_errors: u64,
}

/// The supernode's XDP program: what it relayed, passed on and dropped.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct XdpRelayStatus {
    /// Interface it runs on.
    pub iface: String,
    /// `native` or `generic` (XDP), or `tc`.
    pub mode: String,
    /// Validated IPv4 edges in its map.
    pub edges: u64,
    /// Data datagrams relayed by the program.
    pub relayed_packets: u64,
    /// Their UDP payload bytes.
    pub relayed_bytes: u64,
    /// Datagrams for the supernode's port passed on to its socket.
    pub passed: u64,
    /// Of those, relayable Data datagrams without a route out of the same
    /// interface or a neighbour entry (relayed by userspace instead).
    pub passed_no_route: u64,
    /// Of those, relays and broadcasts from unvalidated sources, passed on within the
    /// register prompts' limits so that the supernode prompts their senders.
    #[serde(default)]
    pub passed_unknown_source: u64,
    /// Of those, GSO batches of relays passed on whole (tc) because their
    /// datagrams do not all go between the same two edges.
    #[serde(default)]
    pub passed_mixed_batch: u64,
    /// Datagrams dropped by the program, by reason.
    pub drops: BTreeMap<String, u64>,
    /// Map updates that failed.
    pub map_errors: u64,
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl EdgeStatus {
    /// Human-readable table.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "edge {} (id {}) community {}  cipher {}  datapath {} ({})",
            self.name, self.id, self.community, self.cipher, self.datapath, self.datapath_reason
        );
        let _ = writeln!(
            o,
            "tap {} mtu {}  listen {}  io {}  up {}s",
            self.tap, self.mtu, self.listen, self.io, self.uptime_s
        );
        if let Some(f) = &self.xdp_filter {
            let _ = write!(
                o,
                "xdp filter on {} ({}): passed {}; sessions {} ({}); dropped:",
                f.iface,
                f.mode,
                f.passed,
                f.sessions,
                if f.session_check {
                    "checked".to_owned()
                } else {
                    format!(
                        "unchecked: {} not in the map, {} passed unchecked",
                        f.sessions_missing, f.passed_unchecked
                    )
                }
            );
            if f.drops.is_empty() {
                let _ = write!(o, " none");
            }
            for (k, v) in &f.drops {
                let _ = write!(o, " {k}={v}");
            }
            o.push('\n');
        }
        let _ = writeln!(
            o,
            "\nSUPERNODE              STATE  OBSERVED-AS            KEY"
        );
        for s in &self.supernodes {
            let _ = writeln!(
                o,
                "{:<22} {:<6} {:<22} {} ({})",
                s.addr,
                s.state,
                s.observed.as_deref().unwrap_or("-"),
                s.key.as_deref().unwrap_or("-"),
                s.key_source
            );
        }
        let _ = writeln!(
            o,
            "\n{:<16} {:<22} {:<8} {:>8} {:>12} {:>12} {:>10} {:>10}  WHY",
            "PEER", "ENDPOINT", "PATH", "RTT-MS", "TX-BYTES", "RX-BYTES", "TX-PKTS", "RX-PKTS"
        );
        for p in &self.peers {
            let rtt = p.rtt_ms.map(|r| format!("{r:.2}")).unwrap_or("-".into());
            let _ = writeln!(
                o,
                "{:<16} {:<22} {:<8} {:>8} {:>12} {:>12} {:>10} {:>10}  {}",
                p.name,
                p.endpoint,
                p.path,
                rtt,
                p.tx_bytes,
                p.rx_bytes,
                p.tx_packets,
                p.rx_packets,
                p.path_reason
            );
        }
        let _ = writeln!(o, "\nMAC                PEER");
        for m in &self.macs {
            let _ = writeln!(o, "{}  {}", m.mac, m.peer);
        }
        let _ = writeln!(
            o,
            "\nframes: tap-rx {} tap-tx {} flooded {}  datagrams: rx {} tx {}",
            self.tap_rx_frames,
            self.tap_tx_frames,
            self.flooded_frames,
            self.udp_rx_packets,
            self.udp_tx_packets
        );
        let l = &self.l2;
        let _ = writeln!(
            o,
            "l2 control {}: bindings local {} remote {}  arp: answered-here {} owned-here {} \
             flooded {} from-wan {}  duplicate-ip {}",
            if l.control { "on" } else { "off" },
            l.local_bindings,
            l.remote_bindings,
            l.arp_answered_locally,
            l.arp_owned_locally,
            l.arp_requests_flooded,
            l.arp_requests_from_wan,
            l.duplicate_ip_claims
        );
        if self.threads.len() > 1 {
            let _ = writeln!(
                o,
                "\n{:<7} {:>12} {:>12} {:>12} {:>12} {:>10}",
                "THREAD", "FRAMES-RX", "FRAMES-TX", "UDP-RX", "UDP-TX", "LOCK-WAITS"
            );
            for t in &self.threads {
                let _ = writeln!(
                    o,
                    "{:<7} {:>12} {:>12} {:>12} {:>12} {:>10}",
                    t.thread, t.frames_rx, t.frames_tx, t.udp_rx, t.udp_tx, t.lock_waits
                );
            }
        }
        let _ = write!(o, "drops:");
        if self.drops.is_empty() {
            let _ = write!(o, " none");
        }
        for (k, v) in &self.drops {
            let _ = write!(o, " {k}={v}");
        }
        o.push('\n');
        o
    }

    /// Prometheus text exposition.
    pub fn prometheus(&self) -> String {
        let mut o = String::new();
        let e = esc(&self.name);
        let _ = writeln!(o, "# TYPE mvc_edge_uptime_seconds gauge");
        let _ = writeln!(
            o,
            "mvc_edge_uptime_seconds{{edge=\"{e}\"}} {}",
            self.uptime_s
        );
        let _ = writeln!(o, "# TYPE mvc_edge_supernode_up gauge");
        for s in &self.supernodes {
            let _ = writeln!(
                o,
                "mvc_edge_supernode_up{{edge=\"{e}\",supernode=\"{}\"}} {}",
                esc(&s.addr),
                u8::from(s.state == "up")
            );
        }
        for (metric, kind) in [
            ("tx_bytes", "counter"),
            ("rx_bytes", "counter"),
            ("tx_packets", "counter"),
            ("rx_packets", "counter"),
            ("direct", "gauge"),
            ("rtt_seconds", "gauge"),
        ] {
            let _ = writeln!(o, "# TYPE mvc_edge_peer_{metric} {kind}");
            for p in &self.peers {
                let v = match metric {
                    "tx_bytes" => p.tx_bytes as f64,
                    "rx_bytes" => p.rx_bytes as f64,
                    "tx_packets" => p.tx_packets as f64,
                    "rx_packets" => p.rx_packets as f64,
                    "direct" => f64::from(u8::from(p.path == "direct")),
                    _ => match p.rtt_ms {
                        Some(r) => r / 1000.0,
                        None => continue,
                    },
                };
                let _ = writeln!(
                    o,
                    "mvc_edge_peer_{metric}{{edge=\"{e}\",peer=\"{}\"}} {v}",
                    esc(&p.name)
                );
            }
        }
        for (metric, v) in [
            ("tap_rx_frames_total", self.tap_rx_frames),
            ("tap_tx_frames_total", self.tap_tx_frames),
            ("flooded_frames_total", self.flooded_frames),
            ("flooded_wan_bytes_total", self.flooded_wan_bytes),
            ("udp_rx_packets_total", self.udp_rx_packets),
            ("udp_tx_packets_total", self.udp_tx_packets),
            (
                "l2_arp_answered_locally_total",
                self.l2.arp_answered_locally,
            ),
            ("l2_arp_owned_locally_total", self.l2.arp_owned_locally),
            (
                "l2_arp_requests_flooded_total",
                self.l2.arp_requests_flooded,
            ),
            (
                "l2_arp_requests_from_wan_total",
                self.l2.arp_requests_from_wan,
            ),
            ("l2_duplicate_ip_claims_total", self.l2.duplicate_ip_claims),
            ("l2_nd_answered_locally_total", self.l2.nd_answered_locally),
            ("l2_nd_owned_locally_total", self.l2.nd_owned_locally),
            ("l2_nd_solicits_flooded_total", self.l2.nd_solicits_flooded),
            (
                "l2_nd_solicits_from_wan_total",
                self.l2.nd_solicits_from_wan,
            ),
            ("l2_dhcp_acks_seen_total", self.l2.dhcp_acks_seen),
            ("l2_membership_reports_total", self.l2.membership_reports),
            ("l2_multicast_withheld_total", self.l2.multicast_withheld),
            ("l2_dhcp_withheld_total", self.l2.dhcp_withheld),
            (
                "l2_dhcp_replies_steered_total",
                self.l2.dhcp_replies_steered,
            ),
        ] {
            let _ = writeln!(o, "# TYPE mvc_edge_{metric} counter");
            let _ = writeln!(o, "mvc_edge_{metric}{{edge=\"{e}\"}} {v}");
        }
        for (metric, v) in [
            ("l2_local_bindings", self.l2.local_bindings),
            ("l2_remote_bindings", self.l2.remote_bindings),
            ("l2_local_groups", self.l2.local_groups),
        ] {
            let _ = writeln!(o, "# TYPE mvc_edge_{metric} gauge");
            let _ = writeln!(o, "mvc_edge_{metric}{{edge=\"{e}\"}} {v}");
        }
        for (metric, f) in [
            ("frames_rx", (|t| t.frames_rx) as fn(&ThreadStatus) -> u64),
            ("frames_tx", |t| t.frames_tx),
            ("udp_rx", |t| t.udp_rx),
            ("udp_tx", |t| t.udp_tx),
            ("lock_waits", |t| t.lock_waits),
        ] {
            let _ = writeln!(o, "# TYPE mvc_edge_thread_{metric}_total counter");
            for t in &self.threads {
                let _ = writeln!(
                    o,
                    "mvc_edge_thread_{metric}_total{{edge=\"{e}\",thread=\"{}\"}} {}",
                    t.thread,
                    f(t)
                );
            }
        }
        let _ = writeln!(o, "# TYPE mvc_edge_drops_total counter");
        for (k, v) in &self.drops {
            let _ = writeln!(
                o,
                "mvc_edge_drops_total{{edge=\"{e}\",reason=\"{}\"}} {v}",
                esc(k)
            );
        }
        if let Some(f) = &self.xdp_filter {
            let _ = writeln!(o, "# TYPE mvc_edge_xdp_filter_passed_total counter");
            let _ = writeln!(
                o,
                "mvc_edge_xdp_filter_passed_total{{edge=\"{e}\"}} {}",
                f.passed
            );
            let _ = writeln!(
                o,
                "# TYPE mvc_edge_xdp_filter_passed_unchecked_total counter"
            );
            let _ = writeln!(
                o,
                "mvc_edge_xdp_filter_passed_unchecked_total{{edge=\"{e}\"}} {}",
                f.passed_unchecked
            );
            let _ = writeln!(o, "# TYPE mvc_edge_xdp_filter_sessions gauge");
            let _ = writeln!(
                o,
                "mvc_edge_xdp_filter_sessions{{edge=\"{e}\"}} {}",
                f.sessions
            );
            let _ = writeln!(o, "# TYPE mvc_edge_xdp_filter_drops_total counter");
            for (k, v) in &f.drops {
                let _ = writeln!(
                    o,
                    "mvc_edge_xdp_filter_drops_total{{edge=\"{e}\",reason=\"{}\"}} {v}",
                    esc(k)
                );
            }
        }
        o
    }
}

impl SupernodeStatus {
    /// Human-readable table.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "supernode {}  up {}s  registrations {}  cookies {}  prompts {} ({} limited)  relayed {} packets / {} bytes in {} sends\nkey {}",
            self.listen,
            self.uptime_s,
            self.registrations,
            self.cookies_sent,
            self.prompts_sent,
            self.prompts_limited,
            self.relayed_packets,
            self.relayed_bytes,
            self.relay_sends,
            self.key
        );
        for c in &self.communities {
            let _ = writeln!(o, "\ncommunity {}", c.id);
            let _ = writeln!(
                o,
                "  {:<16} {:<18} {:<22} {:>9}  LOCAL-ADDRS",
                "EDGE", "ID", "OBSERVED", "SEEN-MS"
            );
            for e in &c.edges {
                let _ = writeln!(
                    o,
                    "  {:<16} {:<18} {:<22} {:>9}  {}",
                    e.name,
                    e.id,
                    e.observed,
                    e.last_seen_ms,
                    e.local_addrs.join(",")
                );
            }
        }
        let _ = write!(o, "\ndrops:");
        if self.drops.is_empty() {
            let _ = write!(o, " none");
        }
        for (k, v) in &self.drops {
            let _ = write!(o, " {k}={v}");
        }
        o.push('\n');
        if let Some(x) = &self.xdp_relay {
            let _ = write!(
                o,
                "xdp relay on {} ({}, {} edges): relayed {} packets / {} bytes (userspace: {} / {}); \
                 to userspace {} (no route {}, unvalidated source {}, mixed batch {}); drops:",
                x.iface,
                x.mode,
                x.edges,
                x.relayed_packets,
                x.relayed_bytes,
                self.relayed_packets,
                self.relayed_bytes,
                x.passed,
                x.passed_no_route,
                x.passed_unknown_source,
                x.passed_mixed_batch
            );
            if x.drops.is_empty() {
                let _ = write!(o, " none");
            }
            for (k, v) in &x.drops {
                let _ = write!(o, " {k}={v}");
            }
            if x.map_errors > 0 {
                let _ = write!(o, "; map errors {}", x.map_errors);
            }
            o.push('\n');
        }
        o
    }

    /// Prometheus text exposition.
    pub fn prometheus(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "# TYPE mvc_supernode_uptime_seconds gauge");
        let _ = writeln!(o, "mvc_supernode_uptime_seconds {}", self.uptime_s);
        let _ = writeln!(o, "# TYPE mvc_supernode_edges gauge");
        for c in &self.communities {
            let _ = writeln!(
                o,
                "mvc_supernode_edges{{community=\"{}\"}} {}",
                c.id,
                c.edges.len()
            );
        }
        for (m, v) in [
            ("registrations_total", self.registrations),
            ("cookies_sent_total", self.cookies_sent),
            ("prompts_sent_total", self.prompts_sent),
            ("prompts_limited_total", self.prompts_limited),
            ("relayed_packets_total", self.relayed_packets),
            ("relayed_bytes_total", self.relayed_bytes),
            ("relay_sends_total", self.relay_sends),
        ] {
            let _ = writeln!(o, "# TYPE mvc_supernode_{m} counter");
            let _ = writeln!(o, "mvc_supernode_{m} {v}");
        }
        let _ = writeln!(o, "# TYPE mvc_supernode_drops_total counter");
        for (k, v) in &self.drops {
            let _ = writeln!(o, "mvc_supernode_drops_total{{reason=\"{}\"}} {v}", esc(k));
        }
        if let Some(x) = &self.xdp_relay {
            for (m, v) in [
                ("relayed_packets_total", x.relayed_packets),
                ("relayed_bytes_total", x.relayed_bytes),
                ("passed_total", x.passed),
                ("passed_no_route_total", x.passed_no_route),
                ("passed_unknown_source_total", x.passed_unknown_source),
                ("passed_mixed_batch_total", x.passed_mixed_batch),
                ("map_errors_total", x.map_errors),
            ] {
                let _ = writeln!(o, "# TYPE mvc_supernode_xdp_{m} counter");
                let _ = writeln!(o, "mvc_supernode_xdp_{m} {v}");
            }
            let _ = writeln!(o, "# TYPE mvc_supernode_xdp_drops_total counter");
            for (k, v) in &x.drops {
                let _ = writeln!(
                    o,
                    "mvc_supernode_xdp_drops_total{{reason=\"{}\"}} {v}",
                    esc(k)
                );
            }
        }
        o
    }
}
