//! The status document of an edge.

use std::time::Instant;

// Looked up for every packet: a seeded fast hash instead of SipHash.

use crate::snkey;
use crate::status::{hex, EdgeStatus, MacStatus, PeerStatus, SupernodeLink};

use super::EdgeCore;

impl EdgeCore {
    /// Whether peer `id` is in the peer table: `None` when not, else whether it has a
    /// current session. One lookup, for callers that ask about many peers (the status
    /// document formats every peer).
    pub fn peer_session(&self, id: &crate::wire::EdgeId) -> Option<bool> {
        self.peers.get(id).map(|p| p.cur.is_some())
    }

    /// Status document (datapath fields are filled in by the caller).
    pub fn status(&self, now: Instant) -> EdgeStatus {
        let mut peers: Vec<PeerStatus> = self
            .peers
            .values()
            .map(|p| {
                let (path, endpoint, reason) = match (p.direct, &p.cur) {
                    (Some(d), Some(_)) => (
                        "direct",
                        d.to_string(),
                        "probe replies arrive on the direct address".to_string(),
                    ),
                    (_, cur) => {
                        let sn = self.relay_sn(p.listed_by, p.relay_rx_sn, now);
                        let why = if cur.is_none() {
                            if p.pending.is_some() {
                                "handshake in progress; frames go through the supernode".to_string()
                            } else {
                                "no session yet; frames go through the supernode".to_string()
                            }
                        } else if p.direct_lost {
                            "direct path lost (no probe reply); relaying and retrying direct"
                                .to_string()
                        } else {
                            format!(
                                "no direct path yet; probing {} candidate address(es)",
                                p.candidates(&self.overlay_nets).len()
                            )
                        };
                        ("relayed", sn.to_string(), why)
                    }
                };
                PeerStatus {
                    name: p.name.clone(),
                    id: hex(&p.id),
                    endpoint,
                    path: path.to_string(),
                    path_reason: reason,
                    rtt_ms: p.rtt.map(|r| r.as_secs_f64() * 1e3),
                    session: p.cur.is_some(),
                    session_age_s: p
                        .cur
                        .as_ref()
                        .map(|s| now.saturating_duration_since(s.created).as_secs()),
                    tx_bytes: p.stats.tx_bytes,
                    rx_bytes: p.stats.rx_bytes,
                    tx_packets: p.stats.tx_packets,
                    rx_packets: p.stats.rx_packets,
                    handshakes: p.handshakes,
                }
            })
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        let mut macs: Vec<MacStatus> = self
            .macs
            .iter()
            .map(|(m, (pid, _))| MacStatus {
                mac: m.to_string(),
                peer: self
                    .peers
                    .get(pid)
                    .map(|p| p.name.clone())
                    .unwrap_or_else(|| hex(pid)),
            })
            .collect();
        macs.sort_by(|a, b| a.mac.cmp(&b.mac));
        EdgeStatus {
            name: self.cfg.name.clone(),
            community: self.cfg.community.clone(),
            id: hex(&self.id),
            cipher: self.cfg.cipher.name().into(),
            datapath: String::new(),
            datapath_reason: String::new(),
            io: String::new(),
            tap: String::new(),
            mtu: 0,
            listen: String::new(),
            uptime_s: now.saturating_duration_since(self.started).as_secs(),
            supernodes: self
                .sns
                .iter()
                .enumerate()
                .map(|(i, s)| SupernodeLink {
                    addr: s.addr.to_string(),
                    state: if self.sn_up(i, now) { "up" } else { "down" }.into(),
                    observed: s.observed.map(|a| a.to_string()),
                    last_ack_ms: s
                        .last_ack
                        .map(|t| now.saturating_duration_since(t).as_millis() as u64),
                    key: s.key.map(|k| snkey::to_hex(&k)),
                    key_source: match (s.pinned, s.key.is_some()) {
                        (true, _) => "pinned",
                        (false, true) => "first-use",
                        (false, false) => "none",
                    }
                    .into(),
                })
                .collect(),
            peers,
            macs,
            tap_rx_frames: self.tap_rx,
            tap_tx_frames: self.tap_tx,
            flooded_frames: self.flooded,
            flooded_wan_bytes: self.flooded_wan_bytes,
            udp_rx_packets: self.udp_rx,
            udp_tx_packets: self.udp_tx,
            drops: self
                .drops
                .by_name()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            threads: Vec::new(),
            l2: self.l2_status(),
            xdp_filter: None,
        }
    }
}
