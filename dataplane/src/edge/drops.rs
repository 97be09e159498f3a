//! Why an edge dropped a datagram or a frame, and the counters per reason.
//!
//! The names are the keys of `drops` in the status document (`mvc edge status --json`)
//! and the `reason` label of `mvc_edge_drops_total`: tools read them, so a name never
//! changes meaning; a new reason gets a new name.

use crate::crypto::CryptoError;
use crate::wire::WireError;

macro_rules! reasons {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal,)*) => {
        /// Why an edge dropped a datagram or a frame (see the module header for the names).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum DropReason {
            $($(#[doc = $doc])* $variant,)*
        }

        impl DropReason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [DropReason] = &[$(Self::$variant),*];

            /// The stable name (status key, metric label).
            pub const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }
        }
    };
}

reasons! {
    // Malformed input (the wire codec's errors).
    /// Shorter than its header or its declared length.
    Truncated = "truncated",
    /// Version byte is not ours.
    BadVersion = "bad_version",
    /// Type byte is unknown.
    UnknownType = "unknown_type",
    /// A field out of range, or bytes left over.
    Malformed = "malformed",
    /// A buffer was too small for what had to be written into it.
    NoRoom = "no_room",
    /// A known type where it makes no sense (a supernode message from a non-supernode, ...).
    UnexpectedType = "unexpected_type",

    // Authentication.
    /// A handshake or transport tag did not verify.
    AuthFailed = "auth_failed",
    /// Key agreement failed (bad public key).
    BadKey = "bad_key",
    /// The random generator failed.
    RngFailed = "rng_failed",
    /// The peer uses another cipher.
    CipherMismatch = "cipher_mismatch",
    /// A counter or handshake timestamp seen before.
    Replay = "replay",
    /// The same handshake init again (it arrives relayed and direct).
    DuplicateHandshake = "duplicate_handshake",
    /// A transport message for no session of ours.
    UnknownSession = "unknown_session",
    /// A handshake response that answers no init of ours.
    UnexpectedResp = "unexpected_resp",
    /// A relayed packet whose inner sender is not the relay header's sender.
    RelayMismatch = "relay_mismatch",
    /// A handshake from our own id.
    OwnPacket = "own_packet",
    /// A probe reply to no probe we still wait for.
    StaleProbe = "stale_probe",

    // Supernode messages.
    /// A relay header for another community or edge.
    RelayNotForUs = "relay_not_for_us",
    /// A broadcast for another community, or not listing us.
    BcastNotForUs = "bcast_not_for_us",
    /// An acknowledgement for another community or edge.
    AckNotForUs = "ack_not_for_us",
    /// A peer list for another community.
    InfoNotForUs = "info_not_for_us",
    /// A cookie for another edge or registration.
    CookieNotForUs = "cookie_not_for_us",
    /// A prompt to register within `handshake_retry` of the last one answered.
    PromptTooSoon = "prompt_too_soon",
    /// An acknowledgement signed with another key than the pinned (or first) one.
    SnKeyMismatch = "sn_key_mismatch",
    /// A peer list from a supernode whose key we do not know yet.
    SnKeyUnknown = "sn_key_unknown",
    /// A supernode signature that does not verify.
    BadSignature = "bad_signature",
    /// An acknowledgement of a registration already acknowledged, or never sent.
    StaleAck = "stale_ack",
    /// A peer list from another run of the supernode, or older than what the edge holds
    /// (a replay).
    StaleInfo = "stale_info",

    // Paths and tables.
    /// A datagram from an address inside the overlay itself (never a path).
    PathInsideOverlay = "path_inside_overlay",
    /// No room for another peer.
    PeerTableFull = "peer_table_full",
    /// No room for another learned MAC.
    MacTableFull = "mac_table_full",
    /// A handshake init not sent to an address that never answered: its tries are used up.
    UnvalidatedLimit = "unvalidated_limit",
    /// A handshake init not sent to an address that never answered: the per-second
    /// budget over all peers is used up.
    UnvalidatedBudget = "unvalidated_budget",

    // Frames.
    /// A frame shorter than an Ethernet header.
    RuntFrame = "runt_frame",
    /// A frame larger than a datagram can carry.
    FrameTooBig = "frame_too_big",
    /// A TSO super-frame that is not the TCP it claims to be.
    BadTsoFrame = "bad_tso_frame",
    /// A TSO batch for a peer that went away while it was sealed.
    UnknownPeer = "unknown_peer",
    /// A TSO batch for a peer whose session went away while it was sealed.
    NoSession = "no_session",
    /// A frame to flood (broadcast, multicast, unknown unicast) over its source MAC's
    /// limit.
    FloodVmLimit = "flood_vm_limit",
    /// A frame to flood over this edge's limit.
    FloodEdgeLimit = "flood_edge_limit",
    /// A frame to flood over this edge's limit of bytes.
    FloodEdgeBytes = "flood_edge_bytes",
    /// A local DHCP server's broadcast reply, steered to its client's peer, over this
    /// edge's limit for such replies.
    DhcpReplyLimit = "dhcp_reply_limit",

    // Noticed by the I/O driver.
    /// A frame whose partial checksum could not be completed.
    BadCsumOffload = "bad_csum_offload",
    /// The TAP device refused a write.
    TapWriteError = "tap_write_error",
    /// Reading the TAP device failed.
    TapReadError = "tap_read_error",
    /// No free slot to write a frame to the TAP device.
    TapBackpressure = "tap_backpressure",
    /// Receiving from the UDP socket failed.
    UdpRecvError = "udp_recv_error",
    /// Sending on the UDP socket failed.
    UdpSendError = "udp_send_error",
    /// The UDP socket's send buffer was full.
    UdpSendFull = "udp_send_full",
    /// No free slot to send a datagram.
    UdpBackpressure = "udp_backpressure",
    /// A GSO send failed.
    GsoSendFailed = "gso_send_failed",
    /// A send failed.
    SendError = "send_error",
    /// An io_uring completion the loop did not submit.
    UnknownCompletion = "unknown_completion",
    /// Polling the AF_XDP socket failed.
    XdpPollError = "xdp_poll_error",
    /// The AF_XDP transmit ring was full.
    XdpTxRingFull = "xdp_tx_ring_full",
    /// A frame too big for an AF_XDP chunk.
    XdpTxTooBig = "xdp_tx_too_big",
    /// A name the core does not know (counted under "other").
    Other = "other",
}

impl DropReason {
    /// How many reasons there are.
    pub const COUNT: usize = Self::ALL.len();

    /// The reason with this name, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|r| r.name() == name)
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The I/O driver counts drops by name: a name of [`DropReason::ALL`] is that reason,
/// any other is [`DropReason::Other`].
impl From<&str> for DropReason {
    fn from(name: &str) -> Self {
        Self::from_name(name).unwrap_or(Self::Other)
    }
}

impl From<WireError> for DropReason {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Truncated => Self::Truncated,
            WireError::BadVersion => Self::BadVersion,
            WireError::UnknownType => Self::UnknownType,
            WireError::Malformed | WireError::Trailing => Self::Malformed,
            WireError::NoRoom => Self::NoRoom,
        }
    }
}

impl From<CryptoError> for DropReason {
    fn from(e: CryptoError) -> Self {
        match e {
            CryptoError::Auth => Self::AuthFailed,
            CryptoError::Agreement => Self::BadKey,
            CryptoError::Random => Self::RngFailed,
            CryptoError::NoRoom => Self::NoRoom,
            CryptoError::Cipher => Self::CipherMismatch,
        }
    }
}

/// A counter per reason.
#[derive(Clone, Debug)]
pub struct Drops([u64; DropReason::COUNT]);

impl Default for Drops {
    fn default() -> Self {
        Self([0; DropReason::COUNT])
    }
}

impl Drops {
    /// Counts one drop.
    pub fn count(&mut self, r: DropReason) {
        self.0[r as usize] += 1;
    }

    /// Drops counted for `r`.
    pub fn get(&self, r: DropReason) -> u64 {
        self.0[r as usize]
    }

    /// The reasons with drops, by name (the status document's `drops`).
    pub fn by_name(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (r.name(), self.get(*r)))
            .filter(|(_, n)| *n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert_eq!(DropReason::from_name(r.name()), Some(*r));
            assert!(r
                .name()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT);
    }

    #[test]
    fn names_of_the_io_driver_and_the_codecs_are_reasons() {
        // The names the I/O driver counts with (`EdgeCore::count_drop`).
        for n in [
            "bad_csum_offload",
            "gso_send_failed",
            "runt_frame",
            "send_error",
            "tap_backpressure",
            "tap_read_error",
            "tap_write_error",
            "udp_backpressure",
            "udp_recv_error",
            "udp_send_error",
            "udp_send_full",
            "unknown_completion",
            "xdp_poll_error",
            "xdp_tx_ring_full",
            "xdp_tx_too_big",
        ] {
            assert_eq!(DropReason::from(n).name(), n);
        }
        assert_eq!(DropReason::from("no such reason"), DropReason::Other);
        // The codecs' own names agree with the reasons they map to.
        for e in [
            WireError::Truncated,
            WireError::BadVersion,
            WireError::UnknownType,
            WireError::Malformed,
            WireError::Trailing,
            WireError::NoRoom,
        ] {
            assert_eq!(DropReason::from(e).name(), e.reason());
        }
        for e in [
            CryptoError::Auth,
            CryptoError::Agreement,
            CryptoError::Random,
            CryptoError::NoRoom,
            CryptoError::Cipher,
        ] {
            assert_eq!(DropReason::from(e).name(), e.reason());
        }
    }

    #[test]
    fn status_lists_only_counted_reasons() {
        let mut d = Drops::default();
        d.count(DropReason::Replay);
        d.count(DropReason::Replay);
        d.count(DropReason::StaleAck);
        let v: Vec<_> = d.by_name().collect();
        assert_eq!(v, vec![("replay", 2), ("stale_ack", 1)]);
    }
}
