//! Map layout shared by the XDP program (`dataplane-ebpf`) and its loader
//! (`dataplane::xdp`). Both sides index the maps with these constants, so a
//! change here changes both at once.
#![no_std]

/// Name of the XDP entry point (the function in `dataplane-ebpf/src/main.rs`).
/// `bpftool prog show` lists programs by this name.
pub const PROGRAM_NAME: &str = "mvc_xdp";

/// Name of the `BPF_MAP_TYPE_XSKMAP`: rx queue index -> AF_XDP socket.
pub const XSKS_MAP: &str = "MVC_XSKS";

/// Name of the per-CPU counter array, indexed by [`Counter`].
pub const STATS_MAP: &str = "MVC_STATS";

/// Entries of the XSKMAP: one AF_XDP socket per rx queue, at most this many
/// queues.
pub const MAX_QUEUES: u32 = 64;

/// Declares the counters of a per-CPU `u64` stats array: the enum (a variant's
/// value is its index in the array), the number of slots, `ALL` in index order
/// and each counter's stable name, as used in metrics and status output.
macro_rules! counters {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $idx:literal => $label:literal, )*
        }
        $(#[$count_meta:meta])*
        pub const $count:ident;
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $idx, )*
        }

        $(#[$count_meta])*
        pub const $count: u32 = [$($idx),*].len() as u32;

        impl $name {
            /// All counters, in index order.
            pub const ALL: [$name; $count as usize] = [$($name::$variant),*];

            /// Stable name used in metrics and status output.
            pub const fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $label, )*
                }
            }
        }
    };
}

counters! {
    /// What the program did with a frame. The value is the index in the per-CPU
    /// `u64` array [`STATS_MAP`].
    pub enum Counter {
        /// Handed to an AF_XDP socket.
        Redirected = 0 => "redirected",
        /// Shorter than an Ethernet header: passed to the kernel (which drops it).
        PassedShort = 1 => "passed_short",
        /// IEEE 802.1D link-local control frame (01:80:c2:00:00:0x, e.g. STP,
        /// LACP, LLDP): belongs to the local link, never into the overlay.
        PassedLinkLocal = 2 => "passed_link_local",
        /// No AF_XDP socket bound to this rx queue: passed to the kernel.
        PassedNoSocket = 3 => "passed_no_socket",
    }
    /// Number of [`Counter`] slots in [`STATS_MAP`].
    pub const COUNTERS;
}

/// Length of an Ethernet header (destination, source, ethertype).
pub const ETH_HLEN: usize = 14;

/// True for the IEEE 802.1D reserved group addresses 01:80:c2:00:00:00-0f,
/// which bridges never forward.
pub const fn is_link_local(dst: &[u8; 6]) -> bool {
    dst[0] == 0x01
        && dst[1] == 0x80
        && dst[2] == 0xc2
        && dst[3] == 0x00
        && dst[4] == 0x00
        && dst[5] & 0xf0 == 0
}

/// Name of the supernode's XDP program (relay and junk filter), in the same
/// object as [`PROGRAM_NAME`].
pub const RELAY_PROGRAM_NAME: &str = "mvc_relay";

/// Name of the same relay as a TC classifier (`--xdp-relay-mode tc`), in the
/// same object and sharing its maps.
pub const RELAY_TC_PROGRAM_NAME: &str = "mvc_relay_tc";

/// Name of the hash map of validated edges: [`relay_key`] -> [`relay_dest`].
pub const RELAY_EDGES_MAP: &str = "MVC_RELAY_EDGES";

/// Name of the one-entry array holding the [`relay_config`].
pub const RELAY_CONFIG_MAP: &str = "MVC_RELAY_CONFIG";

/// Name of the per-CPU counter array of the relay program, indexed by
/// [`RelayCounter`].
pub const RELAY_STATS_MAP: &str = "MVC_RELAY_STATS";

/// Most edges the relay map holds; edges beyond it are relayed by userspace.
pub const RELAY_MAX_EDGES: u32 = 65_536;

/// Length of a relay map key: community id (16) then edge id (8), exactly as
/// they follow each other in a Relay or Bcast header.
pub const RELAY_KEY_LEN: usize = 24;

/// Length of a relay map value: IPv4 address (4), UDP port (2, big-endian),
/// two zero bytes.
pub const RELAY_DEST_LEN: usize = 8;

/// Length of the relay configuration: UDP port of the supernode (2,
/// big-endian), flags (1, [`RELAY_FLAG_COMPLETE`]), a zero byte, the IPv4
/// address it listens on (4; 0.0.0.0 for any).
pub const RELAY_CONFIG_LEN: usize = 8;

/// Configuration flag: every validated IPv4 edge is in the map, so a Relay or
/// Bcast whose source edge is not there can be dropped in the program. Clear
/// when the map could not take them all (those are then left to userspace).
pub const RELAY_FLAG_COMPLETE: u8 = 1;

/// Name of the LRU hash map of source addresses (IPv4 address ‖ port ‖ 0 0, as
/// [`relay_dest`]) -> `bpf_ktime_get_ns` of the last Relay or Bcast from an
/// unvalidated source the program passed on from there (see
/// [`RelayCounter::PassedUnknownSource`]).
pub const RELAY_PROMPTED_MAP: &str = "MVC_RELAY_PROMPTED";

/// Source addresses [`RELAY_PROMPTED_MAP`] remembers (the least recently
/// used go first).
pub const RELAY_PROMPTED_SOURCES: u32 = 4_096;

/// Name of the one-entry per-CPU array of the budget for passing unvalidated
/// sources on: `[slot, used]`, the slot being `bpf_ktime_get_ns` divided by
/// [`RELAY_PROMPT_SLOT_NS`].
pub const RELAY_PROMPT_BUDGET_MAP: &str = "MVC_RELAY_PROMPT_BUDGET";

/// Length of a prompt slot, and the least time between two datagrams passed
/// on from one unvalidated source address: the supernode's own limits on
/// register prompts (one per address per 100 ms).
pub const RELAY_PROMPT_SLOT_NS: u64 = 100_000_000;

/// Datagrams from unvalidated sources passed on per CPU and slot: what the
/// supernode prompts in a slot at most (`SupernodeConfig::prompts_per_s`
/// divided by ten); the rest is dropped in the program.
pub const RELAY_PROMPTS_PER_SLOT: u64 = 200;

/// Key of the relay map for `edge` of `community`.
pub const fn relay_key(community: &[u8; 16], edge: &[u8; 8]) -> [u8; RELAY_KEY_LEN] {
    let mut k = [0u8; RELAY_KEY_LEN];
    let mut i = 0;
    while i < 16 {
        k[i] = community[i];
        i += 1;
    }
    while i < RELAY_KEY_LEN {
        k[i] = edge[i - 16];
        i += 1;
    }
    k
}

/// Value of the relay map for an edge registered from `ip`:`port`.
pub const fn relay_dest(ip: [u8; 4], port: u16) -> [u8; RELAY_DEST_LEN] {
    let p = port.to_be_bytes();
    [ip[0], ip[1], ip[2], ip[3], p[0], p[1], 0, 0]
}

/// The relay configuration for a supernode on `ip`:`port`.
pub const fn relay_config(ip: [u8; 4], port: u16, flags: u8) -> [u8; RELAY_CONFIG_LEN] {
    let p = port.to_be_bytes();
    [p[0], p[1], flags, 0, ip[0], ip[1], ip[2], ip[3]]
}

/// The overlay wire format as far as the program reads it (docs/PROTOCOL.md;
/// `dataplane::wire` is the codec, and its tests check these against it).
pub mod wire {
    /// Version byte of every datagram.
    pub const VERSION: u8 = 4;
    /// Register (edge -> supernode).
    pub const TYPE_REGISTER: u8 = 0x01;
    /// Relay (edge -> supernode -> edge).
    pub const TYPE_RELAY: u8 = 0x04;
    /// Bcast (edge -> supernode -> edges).
    pub const TYPE_BCAST: u8 = 0x05;
    /// Data (edge -> edge transport message).
    pub const TYPE_DATA: u8 = 0x12;
    /// The transport messages' types, first and last: Data, Probe, Control.
    pub const TYPE_TRANSPORT_FIRST: u8 = TYPE_DATA;
    /// See [`TYPE_TRANSPORT_FIRST`].
    pub const TYPE_TRANSPORT_LAST: u8 = 0x14;
    /// Shortest Register (no name, no addresses).
    pub const REGISTER_MIN_LEN: usize = 150;
    /// Relay header: version, type, 2 reserved, community (16), source and
    /// destination edge ids (8 each).
    pub const RELAY_HDR_LEN: usize = 36;
    /// Shortest Relay the supernode accepts (header and two inner bytes).
    pub const RELAY_MIN_LEN: usize = RELAY_HDR_LEN + 2;
    /// Fixed part of a Bcast (version, type, cipher, n, community, sender,
    /// counter).
    pub const BCAST_MIN_LEN: usize = 36;
    /// Header of a transport message (Data, Probe, Control).
    pub const TRANSPORT_HDR_LEN: usize = 16;
    /// Offset of the community id in Relay and Bcast.
    pub const COMMUNITY_AT: usize = 4;
    /// Offset of the source edge id in Relay and Bcast.
    pub const SRC_AT: usize = 20;
    /// Offset of the destination edge id in Relay.
    pub const DST_AT: usize = 28;
    /// Offset of the receiver's session index (4 bytes, big-endian) in a
    /// transport message (Data, Probe, Control).
    pub const INDEX_AT: usize = 4;
    /// Shortest RegisterAck (IPv4 observed address).
    pub const REGISTER_ACK_MIN_LEN: usize = 173;
    /// Shortest PeerInfo (no entries).
    pub const PEER_INFO_MIN_LEN: usize = 104;
    /// Cookie message.
    pub const COOKIE_LEN: usize = 36;
    /// HandshakeInit.
    pub const HS_INIT_LEN: usize = 72;
    /// HandshakeResp.
    pub const HS_RESP_LEN: usize = 84;
}

/// Name of the edge's junk filter in front of its UDP socket (same object).
pub const FILTER_PROGRAM_NAME: &str = "mvc_filter";

/// Name of the same filter as a TC classifier (`--xdp-filter-mode tc`), in the
/// same object and sharing its maps.
pub const FILTER_TC_PROGRAM_NAME: &str = "mvc_filter_tc";

/// Name of the one-entry array holding the [`filter_config`].
pub const FILTER_CONFIG_MAP: &str = "MVC_FILTER_CONFIG";

/// Name of the per-CPU counter array of the filter, indexed by [`FilterCounter`].
pub const FILTER_STATS_MAP: &str = "MVC_FILTER_STATS";

/// Name of the hash map of the edge's live receiver session indexes (the
/// index as on the wire, 4 bytes big-endian -> 0), kept by the edge.
pub const FILTER_SESSIONS_MAP: &str = "MVC_FILTER_SESSIONS";

/// Most session indexes the filter's map holds. An edge with more live
/// indexes clears [`FILTER_FLAG_SESSIONS`] and its socket sees every
/// transport message again.
pub const FILTER_MAX_SESSIONS: u32 = 65_536;

/// Length of the filter configuration: the edge's UDP port (2, big-endian),
/// flags (1, [`FILTER_FLAG_SESSIONS`]), a zero byte, its community id (16).
pub const FILTER_CONFIG_LEN: usize = 20;

/// Configuration flag: [`FILTER_SESSIONS_MAP`] holds every index the edge
/// accepts transport messages on, so one naming another index can be
/// dropped in the program. Clear while the map could not take them all
/// (those messages then pass unchecked).
pub const FILTER_FLAG_SESSIONS: u8 = 1;

/// The filter configuration for an edge on `port` in `community`, with
/// `flags` ([`FILTER_FLAG_SESSIONS`]).
pub const fn filter_config(port: u16, community: &[u8; 16], flags: u8) -> [u8; FILTER_CONFIG_LEN] {
    let p = port.to_be_bytes();
    let mut c = [0u8; FILTER_CONFIG_LEN];
    c[0] = p[0];
    c[1] = p[1];
    c[2] = flags;
    let mut i = 0;
    while i < 16 {
        c[4 + i] = community[i];
        i += 1;
    }
    c
}

counters! {
    /// What the edge's filter did with a datagram for the edge's port. The value
    /// is the index in the per-CPU `u64` array [`FILTER_STATS_MAP`].
    pub enum FilterCounter {
        /// Passed on to the edge's socket.
        Passed = 0 => "passed",
        /// Dropped: version byte is not [`wire::VERSION`].
        DropBadVersion = 1 => "bad_version",
        /// Dropped: a type an edge never receives.
        DropUnknownType = 2 => "unknown_type",
        /// Dropped: shorter than its type's fixed part.
        DropTruncated = 3 => "truncated",
        /// Dropped: a message carrying a community id that is not the edge's.
        DropWrongCommunity = 4 => "wrong_community",
        /// Dropped: a transport message (direct, or inside a Relay) naming a
        /// receiver session index the edge does not have.
        DropUnknownSession = 5 => "unknown_session",
        /// Passed on without the session check: a transport message while the
        /// session map is incomplete ([`FILTER_FLAG_SESSIONS`] clear).
        PassedUnchecked = 6 => "passed_unchecked",
    }
    /// Number of [`FilterCounter`] slots in [`FILTER_STATS_MAP`].
    pub const FILTER_COUNTERS;
}

/// Shortest datagram of each type an edge receives, and whether it carries
/// the community id at [`wire::COMMUNITY_AT`]; `None` for a type an edge
/// never receives.
pub const fn edge_rx_min(msg_type: u8) -> Option<(usize, bool)> {
    match msg_type {
        // RegisterAck with an IPv4 observed address.
        0x02 => Some((wire::REGISTER_ACK_MIN_LEN, true)),
        0x03 => Some((wire::PEER_INFO_MIN_LEN, true)),
        wire::TYPE_RELAY => Some((wire::RELAY_MIN_LEN, true)),
        wire::TYPE_BCAST => Some((wire::BCAST_MIN_LEN, true)),
        0x06 => Some((wire::COOKIE_LEN, false)),
        0x10 => Some((wire::HS_INIT_LEN, false)),
        0x11 => Some((wire::HS_RESP_LEN, false)),
        t if is_transport(t) => Some((wire::TRANSPORT_HDR_LEN, false)),
        _ => None,
    }
}

/// Transport messages (Data, Probe, Control): those name the receiver's
/// session index at [`wire::INDEX_AT`].
pub const fn is_transport(msg_type: u8) -> bool {
    matches!(
        msg_type,
        wire::TYPE_TRANSPORT_FIRST..=wire::TYPE_TRANSPORT_LAST
    )
}

impl FilterCounter {
    /// True for the counters of dropped datagrams.
    pub const fn is_drop(self) -> bool {
        !matches!(self, FilterCounter::Passed | FilterCounter::PassedUnchecked)
    }
}

counters! {
    /// What the relay program did with a datagram for the supernode's port. The
    /// value is the index in the per-CPU `u64` array [`RELAY_STATS_MAP`].
    pub enum RelayCounter {
        /// Relayed Data datagrams, sent back out by the program (`XDP_TX`, or
        /// the TC program's redirect; a GSO batch counts its datagrams).
        Relayed = 0 => "relayed_packets",
        /// UDP payload bytes of those.
        RelayedBytes = 1 => "relayed_bytes",
        /// Passed to the supernode's socket (registrations, broadcasts, relayed
        /// handshakes and probes, unknown destinations).
        Passed = 2 => "passed",
        /// A relayable Data datagram passed to userspace because the kernel had
        /// no route out of the same interface or no neighbour entry yet, or the
        /// datagram was above the route's MTU.
        PassedNoRoute = 3 => "passed_no_route",
        /// A Relay or Bcast that would be dropped as `unknown_edge` or
        /// `spoofed_source`, passed to userspace so that the supernode prompts
        /// the sender to register (after a supernode restart, a new NAT
        /// mapping): at most one per source address per
        /// [`RELAY_PROMPT_SLOT_NS`] and [`RELAY_PROMPTS_PER_SLOT`] per CPU.
        PassedUnknownSource = 4 => "passed_unknown_source",
        /// Dropped: version byte is not [`wire::VERSION`].
        DropBadVersion = 5 => "bad_version",
        /// Dropped: shorter than its type's fixed part.
        DropTruncated = 6 => "truncated",
        /// Dropped: a type the supernode never receives.
        DropUnknownType = 7 => "unknown_type",
        /// Dropped: Relay or Bcast from an edge id the supernode has not
        /// validated in that community (beyond the prompt limits).
        DropUnknownEdge = 8 => "unknown_edge",
        /// Dropped: Relay or Bcast naming a validated edge but sent from another
        /// address than the one it registered from (beyond the prompt limits).
        DropSpoofed = 9 => "spoofed_source",
        /// A GSO batch of relays passed to userspace whole (TC program): its
        /// datagrams do not all go from one edge to one other edge, or it
        /// holds more than the program checks.
        PassedMixedBatch = 10 => "passed_mixed_batch",
        /// Dropped: the TC program could not rewrite a relayable datagram's
        /// headers (the buffer could not be made writable).
        DropRewrite = 11 => "rewrite_failed",
    }
    /// Number of [`RelayCounter`] slots in [`RELAY_STATS_MAP`].
    pub const RELAY_COUNTERS;
}

impl RelayCounter {
    /// True for the counters of dropped datagrams.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            RelayCounter::DropBadVersion
                | RelayCounter::DropTruncated
                | RelayCounter::DropUnknownType
                | RelayCounter::DropUnknownEdge
                | RelayCounter::DropSpoofed
                | RelayCounter::DropRewrite
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_range() {
        assert!(is_link_local(&[0x01, 0x80, 0xc2, 0, 0, 0]));
        assert!(is_link_local(&[0x01, 0x80, 0xc2, 0, 0, 0x0e]));
        assert!(!is_link_local(&[0x01, 0x80, 0xc2, 0, 0, 0x10]));
        assert!(!is_link_local(&[0xff; 6]));
        assert!(!is_link_local(&[0x01, 0x00, 0x5e, 0, 0, 1]));
    }

    #[test]
    fn counters_are_indexed_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        for (i, c) in RelayCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        for (i, c) in FilterCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }

    #[test]
    fn relay_map_layouts() {
        let k = relay_key(&[1; 16], &[2; 8]);
        assert_eq!(&k[..16], &[1; 16]);
        assert_eq!(&k[16..], &[2; 8]);
        assert_eq!(
            relay_dest([198, 18, 0, 1], 7654),
            [198, 18, 0, 1, 0x1d, 0xe6, 0, 0]
        );
        assert_eq!(
            relay_config([0; 4], 7654, RELAY_FLAG_COMPLETE),
            [0x1d, 0xe6, 1, 0, 0, 0, 0, 0]
        );
        assert_eq!(wire::SRC_AT, wire::COMMUNITY_AT + 16);
    }
}
