//! The edge's junk filter (`mvc edge --xdp-filter IFACE`): an XDP program on
//! the edge's underlay interface that drops datagrams for the edge's UDP port
//! failing the cheap checks (version byte, a type an edge receives, its
//! minimum length, the edge's own community id where the message carries one)
//! before they reach the socket and the forwarder, and passes everything else.
//! Registrations' answers, cookies, handshakes and hole-punching probes are
//! all of a type and length it passes, so legitimate traffic is not touched.
//! Unknown session indices of transport messages are not checked here: the
//! forwarder counts those (`unknown_session`).
//!
//! Cleanup is the kernel's (a bpf_link owned by the process). See docs/XDP.md
//! ("Junk filter in front of the edge").

use aya::{
    maps::{Array, MapData, PerCpuArray},
    Ebpf,
};
use dataplane_ebpf_common::{
    filter_config, FilterCounter, FILTER_CONFIG_LEN, FILTER_CONFIG_MAP, FILTER_PROGRAM_NAME,
    FILTER_STATS_MAP,
};

use super::{
    attach_first, attach_tries, availability, load_xdp, AttachMode, Error, ModeRequest, PROGRAM,
};
use crate::status::XdpFilterStatus;

/// The attached filter.
pub struct XdpFilter {
    _config: Array<MapData, [u8; FILTER_CONFIG_LEN]>,
    stats: PerCpuArray<MapData, u64>,
    /// Owns the program and, through it, the bpf_link that keeps it attached.
    _ebpf: Ebpf,
    iface: String,
    mode: AttachMode,
}

impl std::fmt::Debug for XdpFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpFilter")
            .field("iface", &self.iface)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl XdpFilter {
    /// Loads the filter and attaches it to `iface` for an edge on UDP `port` in
    /// `community` (native first for `Auto`, generic where the driver refuses).
    pub fn attach(
        iface: &str,
        port: u16,
        community: &[u8; 16],
        mode: ModeRequest,
    ) -> Result<Self, Error> {
        availability()?;
        let object = PROGRAM.ok_or_else(|| Error::NotBuilt(String::new()))?;
        let mut ebpf = Ebpf::load(object).map_err(|e| Error::Load(e.to_string()))?;
        let mut config: Array<MapData, [u8; FILTER_CONFIG_LEN]> = Array::try_from(
            ebpf.take_map(FILTER_CONFIG_MAP)
                .ok_or_else(|| Error::Load(format!("no map {FILTER_CONFIG_MAP}")))?,
        )
        .map_err(|e| Error::Load(format!("filter config map: {e}")))?;
        config
            .set(0, filter_config(port, community), 0)
            .map_err(|e| Error::Load(format!("filter config map: {e}")))?;
        let stats: PerCpuArray<MapData, u64> = PerCpuArray::try_from(
            ebpf.take_map(FILTER_STATS_MAP)
                .ok_or_else(|| Error::Load(format!("no map {FILTER_STATS_MAP}")))?,
        )
        .map_err(|e| Error::Load(format!("filter stats map: {e}")))?;
        let prog = load_xdp(&mut ebpf, FILTER_PROGRAM_NAME)?;
        let (mode, _) = attach_first(prog, iface, attach_tries(mode))?;
        tracing::info!(%iface, mode = mode.as_str(), "XDP junk filter attached");
        Ok(Self {
            _config: config,
            stats,
            _ebpf: ebpf,
            iface: iface.to_owned(),
            mode,
        })
    }

    /// Counters for status (system calls: one map lookup per counter).
    pub fn status(&self) -> XdpFilterStatus {
        let mut s = XdpFilterStatus {
            iface: self.iface.clone(),
            mode: self.mode.as_str().to_owned(),
            ..Default::default()
        };
        for c in FilterCounter::ALL {
            let v: u64 = self
                .stats
                .get(&(c as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            match c {
                FilterCounter::Passed => s.passed = v,
                _ if v > 0 => {
                    s.drops.insert(c.name().to_owned(), v);
                }
                _ => {}
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use dataplane_ebpf_common::{edge_rx_min, wire as w};

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
            dst: [7; 8],
            seq: 1,
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
}
