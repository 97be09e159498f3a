//! The edge's junk filter (`mvc edge --xdp-filter IFACE`): an XDP program on
//! the edge's underlay interface that drops datagrams for the edge's UDP port
//! failing the cheap checks (version byte, a type an edge receives, its
//! minimum length, the edge's own community id where the message carries one)
//! before they reach the socket and the forwarder, and passes everything else.
//! Registrations' answers, cookies, handshakes and hole-punching probes are
//! all of a type and length it passes, so legitimate traffic is not touched.
//!
//! Transport messages (Data, Probe, Control, direct or inside a Relay) must
//! also name a receiver session index the edge has: [`XdpFilter::sync_sessions`]
//! keeps a map of the core's live local indexes equal to the core's table,
//! called by the forwarder after every round that changed it and before that
//! round's datagrams are sent, so an index is in the map before the peer can
//! learn it (from our handshake init or response). While the map cannot hold
//! every index (full, or a failed update), the program stops the check and
//! passes transport messages on unchecked (`passed_unchecked`); it never drops
//! a message for a live session.
//!
//! The same checks also run as a TC classifier on the interface's ingress
//! ([`HookMode::Tc`], program `mvc_filter_tc`, same maps and counters); auto
//! takes it on veth ([`super::HOOK_AUTO_RULE`]), where native XDP makes the peer
//! segment its GSO batches and copies every frame into a page pool. A batch
//! (GSO or GRO) is checked by its first datagram's head in either hook; the
//! rest of it is checked by the AEAD in userspace.
//!
//! Cleanup is the kernel's (a bpf_link owned by the process: XDP link, or
//! tcx link for TC). See docs/XDP.md ("Junk filter in front of the edge").

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    Ebpf,
};
use dataplane_ebpf_common::{
    filter_config, FilterCounter, FILTER_CONFIG_LEN, FILTER_CONFIG_MAP, FILTER_FLAG_SESSIONS,
    FILTER_MAX_SESSIONS, FILTER_PROGRAM_NAME, FILTER_SESSIONS_MAP, FILTER_STATS_MAP,
    FILTER_TC_PROGRAM_NAME,
};

use super::{attach_hook, availability, tc_programs, Error, Hook, HookMode, HookPrograms, PROGRAM};
use crate::status::XdpFilterStatus;

/// Kernel ids of the `mvc_filter_tc` programs attached to the tc ingress of
/// `iface` (tcx links), in the current network namespace.
pub fn filter_tc_programs(iface: &str) -> Result<Vec<u32>, Error> {
    tc_programs(iface, FILTER_TC_PROGRAM_NAME)
}

/// The session map and what userspace knows it holds.
struct Sessions {
    map: HashMap<MapData, [u8; 4], u8>,
    config: Array<MapData, [u8; FILTER_CONFIG_LEN]>,
    /// The configuration without its flags.
    base: [u8; FILTER_CONFIG_LEN],
    installed: HashSet<u32>,
    /// Whether the map holds every live index (the program checks only then).
    complete: bool,
    /// Live indexes the map had no room for at the last synchronisation.
    missing: u64,
    /// Map updates that failed.
    errors: u64,
}

/// The attached filter.
pub struct XdpFilter {
    sessions: Mutex<Sessions>,
    /// The core's [`crate::edge::EdgeCore::session_generation`] the map was last made equal to
    /// (read without the lock, once per forwarder round); `u64::MAX` before the first.
    synced: AtomicU64,
    stats: PerCpuArray<MapData, u64>,
    /// Owns the program and, through it, the bpf_link that keeps it attached.
    _ebpf: Ebpf,
    iface: String,
    hook: Hook,
}

impl std::fmt::Debug for XdpFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpFilter")
            .field("iface", &self.iface)
            .field("hook", &self.hook)
            .finish_non_exhaustive()
    }
}

impl XdpFilter {
    /// Loads the filter and attaches it to `iface` for an edge on UDP `port` in
    /// `community`, in the hook `mode` asks for ([`super::HOOK_AUTO_RULE`] for `Auto`).
    pub fn attach(
        iface: &str,
        port: u16,
        community: &[u8; 16],
        mode: HookMode,
    ) -> Result<Self, Error> {
        availability()?;
        let object = PROGRAM.ok_or_else(|| Error::NotBuilt(String::new()))?;
        let mut ebpf = Ebpf::load(object).map_err(|e| Error::Load(e.to_string()))?;
        let mut config: Array<MapData, [u8; FILTER_CONFIG_LEN]> = Array::try_from(
            ebpf.take_map(FILTER_CONFIG_MAP)
                .ok_or_else(|| Error::Load(format!("no map {FILTER_CONFIG_MAP}")))?,
        )
        .map_err(|e| Error::Load(format!("filter config map: {e}")))?;
        // No session yet: the empty map holds every live index.
        config
            .set(0, filter_config(port, community, FILTER_FLAG_SESSIONS), 0)
            .map_err(|e| Error::Load(format!("filter config map: {e}")))?;
        let map: HashMap<MapData, [u8; 4], u8> = HashMap::try_from(
            ebpf.take_map(FILTER_SESSIONS_MAP)
                .ok_or_else(|| Error::Load(format!("no map {FILTER_SESSIONS_MAP}")))?,
        )
        .map_err(|e| Error::Load(format!("filter session map: {e}")))?;
        let stats: PerCpuArray<MapData, u64> = PerCpuArray::try_from(
            ebpf.take_map(FILTER_STATS_MAP)
                .ok_or_else(|| Error::Load(format!("no map {FILTER_STATS_MAP}")))?,
        )
        .map_err(|e| Error::Load(format!("filter stats map: {e}")))?;
        let (hook, _) = attach_hook(
            &mut ebpf,
            iface,
            mode,
            HookPrograms {
                xdp: FILTER_PROGRAM_NAME,
                tc: FILTER_TC_PROGRAM_NAME,
                what: "XDP junk filter",
            },
        )?;
        Ok(Self {
            sessions: Mutex::new(Sessions {
                map,
                config,
                base: filter_config(port, community, 0),
                installed: HashSet::new(),
                complete: true,
                missing: 0,
                errors: 0,
            }),
            synced: AtomicU64::new(u64::MAX),
            stats,
            _ebpf: ebpf,
            iface: iface.to_owned(),
            hook,
        })
    }

    /// The hook it runs in.
    pub fn hook(&self) -> Hook {
        self.hook
    }

    /// Makes the session map equal to the live local indexes `live` of a core whose
    /// [`crate::edge::EdgeCore::session_generation`] is `generation`, when that changed since the
    /// last call (otherwise one atomic load; `live` is not iterated). Call with the
    /// core locked, after handling a batch and before sending what it queued.
    pub fn sync_sessions(&self, generation: u64, live: impl Iterator<Item = u32>) {
        if self.synced.load(Ordering::Relaxed) == generation {
            return;
        }
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        s.sync(live);
        self.synced.store(generation, Ordering::Relaxed);
    }

    /// Counters for status (system calls: one map lookup per counter).
    pub fn status(&self) -> XdpFilterStatus {
        let mut s = XdpFilterStatus {
            iface: self.iface.clone(),
            mode: self.hook.as_str().to_owned(),
            ..Default::default()
        };
        {
            let m = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            s.sessions = m.installed.len() as u64;
            s.session_check = m.complete;
            s.sessions_missing = m.missing;
            s.map_errors = m.errors;
        }
        for c in FilterCounter::ALL {
            let v: u64 = self
                .stats
                .get(&(c as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            match c {
                FilterCounter::Passed => s.passed = v,
                FilterCounter::PassedUnchecked => s.passed_unchecked = v,
                _ if v > 0 => {
                    s.drops.insert(c.name().to_owned(), v);
                }
                _ => {}
            }
        }
        s
    }
}

impl Sessions {
    /// Removes what is gone, then adds what is new while there is room; the check is
    /// on exactly when every live index is in the map.
    fn sync(&mut self, live: impl Iterator<Item = u32>) {
        let want: HashSet<u32> = live.collect();
        let gone: Vec<u32> = self.installed.difference(&want).copied().collect();
        for i in gone {
            // Already gone is fine; anything else leaves a stale index, which only
            // lets junk naming it through to the forwarder (which drops it).
            if self.map.remove(&i.to_be_bytes()).is_err() {
                self.errors += 1;
            }
            self.installed.remove(&i);
        }
        let mut missing = 0u64;
        for &i in &want {
            if self.installed.contains(&i) {
                continue;
            }
            if self.installed.len() >= FILTER_MAX_SESSIONS as usize {
                missing += 1;
                continue;
            }
            match self.map.insert(i.to_be_bytes(), 0, 0) {
                Ok(()) => {
                    self.installed.insert(i);
                }
                Err(_) => {
                    self.errors += 1;
                    missing += 1;
                }
            }
        }
        self.missing = missing;
        let complete = missing == 0;
        if complete != self.complete {
            let mut cfg = self.base;
            if complete {
                cfg[2] = FILTER_FLAG_SESSIONS;
            } else {
                tracing::warn!(
                    missing,
                    "XDP filter session map incomplete: transport messages pass unchecked"
                );
            }
            match self.config.set(0, cfg, 0) {
                Ok(()) => self.complete = complete,
                Err(_) => self.errors += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use dataplane_ebpf_common::{edge_rx_min, is_transport, wire as w};

    use crate::wire::{self, InfoKind, MsgType, PeerInfo, RegisterAck};

    /// The filter's shortest length per type is the codec's shortest message, and
    /// every type an edge handles passes the type check.
    #[test]
    fn filter_minimum_lengths_match_the_codec() {
        let mut buf = [0u8; 1024];
        let ack = RegisterAck {
            community: [1; 16],
            edge: [2; 8],
            seq: 3,
            version: 4,
            epoch: 5,
            observed: "198.18.0.1:7700".parse().unwrap(),
            lifetime_secs: 30,
            cookie: [4; wire::COOKIE_LEN],
            sn_key: [5; wire::SN_KEY_LEN],
        };
        let n = ack.encode_unsigned(&mut buf).unwrap() + wire::SIG_LEN;
        assert_eq!(edge_rx_min(MsgType::RegisterAck as u8), Some((n, true)));
        assert_eq!(&buf[w::COMMUNITY_AT..w::COMMUNITY_AT + 16], &[1; 16]);
        let info = PeerInfo {
            community: [6; 16],
            kind: InfoKind::Full,
            epoch: 7,
            version: 1,
            part: 0,
            parts: 1,
            peers: Vec::new(),
        };
        let n = info.encode_unsigned(&mut buf).unwrap() + wire::SIG_LEN;
        assert_eq!(edge_rx_min(MsgType::PeerInfo as u8), Some((n, true)));
        assert_eq!(&buf[w::COMMUNITY_AT..w::COMMUNITY_AT + 16], &[6; 16]);
        assert_eq!(
            edge_rx_min(MsgType::Cookie as u8),
            Some((wire::COOKIE_MSG_LEN, false))
        );
        assert_eq!(
            edge_rx_min(MsgType::HandshakeInit as u8),
            Some((wire::HS_INIT_LEN, false))
        );
        assert_eq!(
            edge_rx_min(MsgType::HandshakeResp as u8),
            Some((wire::HS_RESP_LEN, false))
        );
        for t in [MsgType::Data, MsgType::Probe] {
            assert_eq!(edge_rx_min(t as u8), Some((wire::TRANSPORT_HDR_LEN, false)));
        }
        assert_eq!(edge_rx_min(0x14), Some((wire::TRANSPORT_HDR_LEN, false)));
        assert_eq!(
            edge_rx_min(MsgType::Relay as u8),
            Some((w::RELAY_MIN_LEN, true))
        );
        assert_eq!(
            edge_rx_min(MsgType::Bcast as u8),
            Some((wire::BCAST_FIXED_LEN, true))
        );
        // What an edge never receives.
        assert_eq!(edge_rx_min(MsgType::Register as u8), None);
        assert_eq!(edge_rx_min(0x07), None);
        assert_eq!(edge_rx_min(0x15), None);
    }

    /// The program reads the receiver session index where the codec writes it, for
    /// exactly the transport message types.
    #[test]
    fn filter_reads_the_session_index_where_the_codec_writes_it() {
        let mut buf = [0u8; wire::TRANSPORT_HDR_LEN];
        for kind in [MsgType::Data, MsgType::Probe, MsgType::Control] {
            wire::TransportHdr {
                kind,
                flags: 0,
                receiver_index: 0x0102_0304,
                counter: 9,
            }
            .write(&mut buf)
            .unwrap();
            assert!(is_transport(buf[1]));
            assert_eq!(&buf[w::INDEX_AT..w::INDEX_AT + 4], &[1, 2, 3, 4]);
        }
        for t in 0..=255u8 {
            let codec = matches!(
                MsgType::from_u8(t),
                Some(MsgType::Data | MsgType::Probe | MsgType::Control)
            );
            assert_eq!(is_transport(t), codec, "type {t:#x}");
        }
    }
}
