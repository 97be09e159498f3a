//! Settings of an edge: timers and limits, supernodes (with pinned keys), errors.

use std::net::SocketAddr;
use std::time::Duration;

// Looked up for every packet: a seeded fast hash instead of SipHash.

use crate::crypto::Cipher;
use crate::snkey;
use crate::wire::SN_KEY_LEN;

/// Timers and limits of an edge. Defaults suit a WAN; tests shrink them.
#[derive(Clone, Debug)]
pub struct Timers {
    /// Registration refresh (each one drawn between 80 % and 100 % of it, so edges that
    /// started together drift apart).
    pub register_interval: Duration,
    /// Longest wait between registrations to a supernode that does not answer: the wait
    /// starts at `min(register_interval, 1 s)`, doubles with every unanswered
    /// registration up to this, and is drawn between half and all of that.
    pub register_backoff_max: Duration,
    /// A supernode is down after this long without an acknowledgement.
    pub supernode_down_after: Duration,
    /// Handshake retransmission.
    pub handshake_retry: Duration,
    /// The higher-id edge waits this long for the lower-id edge to start a handshake.
    pub handshake_defer: Duration,
    /// Rekey a session this old...
    pub rekey_after_time: Duration,
    /// ...or after this many messages sent with it.
    pub rekey_after_packets: u64,
    /// Never send with a session this old.
    pub reject_after_time: Duration,
    /// Probing of candidate addresses while there is no direct path.
    pub probe_interval: Duration,
    /// Keepalive probe on a direct path.
    pub keepalive_interval: Duration,
    /// A direct path is given up after this long without a probe reply.
    pub direct_timeout: Duration,
    /// A peer nobody lists and who sends nothing is forgotten after this long.
    pub peer_expiry: Duration,
    /// A learned MAC is forgotten after this long.
    pub mac_expiry: Duration,
    /// Relayed traffic sent through a supernode with nothing back from it for this long
    /// makes the edge check that supernode (an early registration).
    pub relay_silence: Duration,
    /// Least time a check waits for its acknowledgement (at least 4 RTTs of that
    /// supernode); a check not answered in time marks the supernode down at once.
    pub relay_check_timeout: Duration,
    /// After an answered check, the next one waits this long (traffic to a peer that
    /// went away, or flowing one way, then costs one registration per interval).
    pub relay_check_every: Duration,
    /// Handshake inits sent to one candidate address that has never answered before the
    /// edge slows down to one per `unvalidated_backoff`.
    pub unvalidated_tries: u32,
    /// Spacing of further attempts to a candidate address that has never answered.
    pub unvalidated_backoff: Duration,
    /// Most handshake inits per second to addresses that have never answered, over all
    /// peers.
    pub unvalidated_per_sec: u32,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            register_interval: Duration::from_secs(5),
            register_backoff_max: Duration::from_secs(8),
            supernode_down_after: Duration::from_secs(12),
            handshake_retry: Duration::from_secs(1),
            handshake_defer: Duration::from_secs(2),
            rekey_after_time: Duration::from_secs(120),
            rekey_after_packets: 1 << 32,
            reject_after_time: Duration::from_secs(180),
            probe_interval: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(2),
            direct_timeout: Duration::from_secs(7),
            peer_expiry: Duration::from_secs(90),
            mac_expiry: Duration::from_secs(300),
            relay_silence: Duration::from_millis(200),
            relay_check_timeout: Duration::from_millis(300),
            relay_check_every: Duration::from_secs(1),
            unvalidated_tries: 8,
            unvalidated_backoff: Duration::from_secs(30),
            unvalidated_per_sec: 64,
        }
    }
}

/// Edge settings.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// Edge name (at most 32 bytes).
    pub name: String,
    /// Community name.
    pub community: String,
    /// Community secret.
    pub secret: Vec<u8>,
    /// Data cipher.
    pub cipher: Cipher,
    /// Supernodes, in order of preference, each with the public key to pin (without
    /// one, the key of the first signed acknowledgement is trusted: first use).
    pub supernodes: Vec<SupernodeAddr>,
    /// Our own addresses (announced for peers behind the same NAT).
    pub local_addrs: Vec<SocketAddr>,
    /// Timers.
    pub timers: Timers,
    /// Most peers kept.
    pub max_peers: usize,
    /// Most learned MACs kept.
    pub max_macs: usize,
}

/// A supernode as an edge knows it: `ADDR:PORT` or `ADDR:PORT@KEY` (KEY = the
/// supernode's Ed25519 public key in 64 hex digits, as `mvc supernode` prints it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct SupernodeAddr {
    /// UDP address.
    pub addr: SocketAddr,
    /// Pinned public key.
    pub key: Option<[u8; SN_KEY_LEN]>,
}

impl From<SocketAddr> for SupernodeAddr {
    fn from(addr: SocketAddr) -> Self {
        Self { addr, key: None }
    }
}

impl std::str::FromStr for SupernodeAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, k) = match s.split_once('@') {
            Some((a, k)) => (a, Some(k)),
            None => (s, None),
        };
        let addr = a
            .parse()
            .map_err(|e| format!("supernode {s:?}: {a:?} is not ADDR:PORT ({e})"))?;
        let key = k
            .map(|k| snkey::parse_hex(k).map_err(|e| format!("supernode {s:?}: {e}")))
            .transpose()?;
        Ok(Self { addr, key })
    }
}

impl TryFrom<String> for SupernodeAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::fmt::Display for SupernodeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.key {
            Some(k) => write!(f, "{}@{}", self.addr, snkey::to_hex(k)),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// Errors creating an edge.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// Key generation failed.
    #[error("key generation failed")]
    Keys,
}
