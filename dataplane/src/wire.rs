//! The overlay's wire format: one codec for every message (see `docs/PROTOCOL.md`).
//!
//! Every datagram starts with a version byte and a type byte. Parsing checks the length
//! once per message and then reads fields at fixed offsets; lengths carried in a message
//! are checked against the datagram and against a maximum before use. Encoders write into
//! a caller buffer and return the number of bytes written.
//!
//! Changing any layout here changes the protocol: bump [`VERSION`] and update the document.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Protocol version carried in byte 0 of every datagram.
pub const VERSION: u8 = 4;

/// Length of a community identifier (derived from the community secret, see `crypto`).
pub const COMMUNITY_ID_LEN: usize = 16;
/// Length of an edge identifier (derived from the edge's registration key).
pub const EDGE_ID_LEN: usize = 8;
/// Length of an edge's Ed25519 registration key.
pub const EDGE_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIG_LEN: usize = 64;
/// Length of a supernode's Ed25519 public key.
pub const SN_KEY_LEN: usize = 32;
/// Length of an address-validation cookie.
pub const COOKIE_LEN: usize = 16;
/// Length of a cookie message.
pub const COOKIE_MSG_LEN: usize = 4 + EDGE_ID_LEN + 8 + COOKIE_LEN;
/// Sequence number of a cookie message that answers no registration: the supernode
/// prompts an edge it does not have (registered from that address) to register now.
/// Registrations never carry it (their numbers count up from 1).
pub const PROMPT_SEQ: u64 = u64::MAX;
/// Length of an AEAD tag.
pub const TAG_LEN: usize = 16;
/// Longest edge name.
pub const MAX_NAME_LEN: usize = 32;
/// Most local addresses an edge announces.
pub const MAX_LOCAL_ADDRS: usize = 8;
/// Most peers in one peer-info message.
pub const MAX_PEERS_PER_INFO: usize = 16;
/// Most explicit destinations in one broadcast message.
pub const MAX_BCAST_DSTS: usize = 64;
/// Largest datagram the overlay sends or accepts.
pub const MAX_DATAGRAM: usize = 65_535;

/// A community identifier as the supernode sees it.
pub type CommunityId = [u8; COMMUNITY_ID_LEN];
/// An edge identifier.
pub type EdgeId = [u8; EDGE_ID_LEN];

/// The all-zero edge id: "no particular edge".
pub const NO_EDGE: EdgeId = [0; EDGE_ID_LEN];

/// Message types (byte 1). Unknown values are counted and dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MsgType {
    /// Edge -> supernode: register (signed).
    Register = 0x01,
    /// Supernode -> edge: registration accepted, with the observed address.
    RegisterAck = 0x02,
    /// Supernode -> edge: where peers are.
    PeerInfo = 0x03,
    /// Edge -> supernode -> edge: an edge-to-edge packet relayed by the supernode.
    Relay = 0x04,
    /// Edge -> supernode -> edges: a frame encrypted with the sender's broadcast key, fanned out.
    Bcast = 0x05,
    /// Supernode -> edge: an address-validation cookie, the only answer to a registration
    /// whose cookie does not prove that its source address receives.
    Cookie = 0x06,
    /// Edge -> edge: first handshake message.
    HandshakeInit = 0x10,
    /// Edge -> edge: second handshake message.
    HandshakeResp = 0x11,
    /// Edge -> edge: an encrypted Ethernet frame.
    Data = 0x12,
    /// Edge -> edge: an encrypted path probe or probe reply.
    Probe = 0x13,
    /// Edge -> edge: an encrypted control message (the sender's MAC/IP bindings; the
    /// plaintext carries its own version, see `l2::Bindings`).
    Control = 0x14,
}

impl MsgType {
    /// Maps byte 1 of a datagram to a type.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x01 => Self::Register,
            0x02 => Self::RegisterAck,
            0x03 => Self::PeerInfo,
            0x04 => Self::Relay,
            0x05 => Self::Bcast,
            0x06 => Self::Cookie,
            0x10 => Self::HandshakeInit,
            0x11 => Self::HandshakeResp,
            0x12 => Self::Data,
            0x13 => Self::Probe,
            0x14 => Self::Control,
            _ => return None,
        })
    }
}

/// Why a datagram could not be decoded. Each maps to a drop counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than its fixed part, or a length field points past the end.
    #[error("truncated")]
    Truncated,
    /// Version byte is not [`VERSION`].
    #[error("unsupported version")]
    BadVersion,
    /// Type byte is unknown.
    #[error("unknown message type")]
    UnknownType,
    /// A field holds a value outside its allowed range.
    #[error("malformed field")]
    Malformed,
    /// Bytes left over after the message.
    #[error("trailing bytes")]
    Trailing,
    /// The caller's buffer is too small for the encoded message.
    #[error("output buffer too small")]
    NoRoom,
}

impl WireError {
    /// Drop-counter name.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::BadVersion => "bad_version",
            Self::UnknownType => "unknown_type",
            Self::Malformed => "malformed",
            Self::Trailing => "malformed",
            Self::NoRoom => "no_room",
        }
    }
}

/// Reads version and type of a datagram.
pub fn peek_type(buf: &[u8]) -> Result<MsgType, WireError> {
    if buf.len() < 2 {
        return Err(WireError::Truncated);
    }
    if buf[0] != VERSION {
        return Err(WireError::BadVersion);
    }
    MsgType::from_u8(buf[1]).ok_or(WireError::UnknownType)
}

// ---------------------------------------------------------------------------------------
// Little cursor helpers: a reader that never reads past the end and a writer that never
// writes past the end.

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], pos: usize) -> Self {
        Self { buf, pos }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(WireError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn addr(&mut self) -> Result<SocketAddr, WireError> {
        let ip = match self.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
            _ => return Err(WireError::Malformed),
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }
    fn name(&mut self) -> Result<String, WireError> {
        let n = self.u8()? as usize;
        if n > MAX_NAME_LEN {
            return Err(WireError::Malformed);
        }
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| WireError::Malformed)?;
        Ok(s.to_owned())
    }
    fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }
    fn finish(&self) -> Result<(), WireError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(WireError::Trailing)
        }
    }
}

struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    fn put(&mut self, b: &[u8]) -> Result<(), WireError> {
        let end = self.pos + b.len();
        self.buf
            .get_mut(self.pos..end)
            .ok_or(WireError::NoRoom)?
            .copy_from_slice(b);
        self.pos = end;
        Ok(())
    }
    fn u8(&mut self, v: u8) -> Result<(), WireError> {
        self.put(&[v])
    }
    fn u16(&mut self, v: u16) -> Result<(), WireError> {
        self.put(&v.to_be_bytes())
    }
    fn u64(&mut self, v: u64) -> Result<(), WireError> {
        self.put(&v.to_be_bytes())
    }
    fn addr(&mut self, a: &SocketAddr) -> Result<(), WireError> {
        match a.ip() {
            IpAddr::V4(ip) => {
                self.u8(4)?;
                self.put(&ip.octets())?;
            }
            IpAddr::V6(ip) => {
                self.u8(6)?;
                self.put(&ip.octets())?;
            }
        }
        self.u16(a.port())
    }
    fn name(&mut self, s: &str) -> Result<(), WireError> {
        if s.len() > MAX_NAME_LEN {
            return Err(WireError::Malformed);
        }
        self.u8(s.len() as u8)?;
        self.put(s.as_bytes())
    }
}

fn check_head(buf: &[u8], t: MsgType) -> Result<(), WireError> {
    if peek_type(buf)? != t {
        return Err(WireError::UnknownType);
    }
    Ok(())
}

/// Fixed-size messages are exactly `len` bytes long.
fn check_len(buf: &[u8], len: usize) -> Result<(), WireError> {
    match buf.len().cmp(&len) {
        std::cmp::Ordering::Less => Err(WireError::Truncated),
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Greater => Err(WireError::Trailing),
    }
}

/// Reserved header bytes must be zero (a later version may give them a meaning).
fn check_zero(buf: &[u8], at: std::ops::Range<usize>) -> Result<(), WireError> {
    match buf.get(at) {
        None => Err(WireError::Truncated),
        Some(b) if b.iter().all(|x| *x == 0) => Ok(()),
        Some(_) => Err(WireError::Malformed),
    }
}

// ---------------------------------------------------------------------------------------
// Register (edge -> supernode)

/// Registration of an edge with a supernode. Signed with the edge's Ed25519 key; the
/// signature covers every byte before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Register {
    /// The cookie from the supernode's last cookie message or acknowledgement (all zero:
    /// none yet). Proves that the source address receives what the supernode sends.
    pub cookie: [u8; COOKIE_LEN],
    /// Community the edge joins.
    pub community: CommunityId,
    /// The edge's registration key (Ed25519 public key); the edge id is derived from it.
    pub edge_key: [u8; EDGE_KEY_LEN],
    /// Strictly increasing per edge key; the supernode ignores older or equal values.
    pub seq: u64,
    /// Version of the peer list the edge holds complete from this supernode ([`NO_LIST`]:
    /// none). When it is the community's current version the supernode sends no list.
    pub known: u64,
    /// Operator-chosen edge name.
    pub name: String,
    /// The edge's own addresses (for peers behind the same NAT).
    pub local_addrs: Vec<SocketAddr>,
}

/// A parsed signed message with the bytes its signature covers.
#[derive(Debug)]
pub struct Signed<'a, T> {
    /// The fields.
    pub msg: T,
    /// Bytes covered by the signature (every byte before it).
    pub signed: &'a [u8],
    /// The Ed25519 signature.
    pub sig: &'a [u8],
}

/// A parsed register message with the bytes its signature covers.
pub type RegisterView<'a> = Signed<'a, Register>;

/// Splits a signed message into the signed bytes and the trailing signature.
fn split_sig(buf: &[u8], min: usize) -> Result<(&[u8], &[u8]), WireError> {
    if buf.len() < min + SIG_LEN {
        return Err(WireError::Truncated);
    }
    Ok(buf.split_at(buf.len() - SIG_LEN))
}

/// Checks that the caller's buffer has room for the signature after `len` bytes.
fn room_for_sig(buf: &[u8], len: usize) -> Result<usize, WireError> {
    if buf.len() < len + SIG_LEN {
        return Err(WireError::NoRoom);
    }
    Ok(len)
}

impl Register {
    /// Encodes everything except the signature; returns the length. The caller appends
    /// a [`SIG_LEN`]-byte signature over `buf[..len]`.
    pub fn encode_unsigned(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        if self.local_addrs.len() > MAX_LOCAL_ADDRS {
            return Err(WireError::Malformed);
        }
        let mut w = Writer::new(buf);
        w.put(&[VERSION, MsgType::Register as u8, 0, 0])?;
        w.put(&self.cookie)?;
        w.put(&self.community)?;
        w.put(&self.edge_key)?;
        w.u64(self.seq)?;
        w.u64(self.known)?;
        w.name(&self.name)?;
        w.u8(self.local_addrs.len() as u8)?;
        for a in &self.local_addrs {
            w.addr(a)?;
        }
        room_for_sig(w.buf, w.pos)
    }

    /// Parses a register message (signature not checked here).
    pub fn decode(buf: &[u8]) -> Result<RegisterView<'_>, WireError> {
        check_head(buf, MsgType::Register)?;
        let (signed, sig) = split_sig(buf, 4)?;
        check_zero(buf, 2..4)?;
        let mut r = Reader::new(signed, 4);
        let cookie = r.array()?;
        let community = r.array()?;
        let edge_key = r.array()?;
        let seq = r.u64()?;
        let known = r.u64()?;
        let name = r.name()?;
        let n = r.u8()? as usize;
        if n > MAX_LOCAL_ADDRS {
            return Err(WireError::Malformed);
        }
        let mut local_addrs = Vec::with_capacity(n);
        for _ in 0..n {
            local_addrs.push(r.addr()?);
        }
        r.finish()?;
        Ok(RegisterView {
            msg: Register {
                cookie,
                community,
                edge_key,
                seq,
                known,
                name,
                local_addrs,
            },
            signed,
            sig,
        })
    }
}

// ---------------------------------------------------------------------------------------
// RegisterAck (supernode -> edge), signed by the supernode

/// The supernode's answer to a register message whose cookie is valid. Signed with the
/// supernode's key; bound to the registration by edge id and sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterAck {
    /// Community of the registration.
    pub community: CommunityId,
    /// The registered edge.
    pub edge: EdgeId,
    /// The sequence number accepted.
    pub seq: u64,
    /// The community's peer-list version after this registration: an edge holding it
    /// knows the supernode's list is unchanged.
    pub version: u64,
    /// The supernode's epoch: random, drawn at its start. Peer information carries it, so
    /// what a supernode sent before a restart is not taken for current.
    pub epoch: u64,
    /// Source address the supernode saw.
    pub observed: SocketAddr,
    /// Seconds the registration lasts without a refresh.
    pub lifetime_secs: u16,
    /// A fresh cookie for the next registration.
    pub cookie: [u8; COOKIE_LEN],
    /// The supernode's Ed25519 public key (the signature checks against it).
    pub sn_key: [u8; SN_KEY_LEN],
}

impl RegisterAck {
    /// Encodes everything except the signature; returns the length. The caller appends
    /// a [`SIG_LEN`]-byte signature over `buf[..len]`.
    pub fn encode_unsigned(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(buf);
        w.put(&[VERSION, MsgType::RegisterAck as u8, 0, 0])?;
        w.put(&self.community)?;
        w.put(&self.edge)?;
        w.u64(self.seq)?;
        w.u64(self.version)?;
        w.u64(self.epoch)?;
        w.addr(&self.observed)?;
        w.u16(self.lifetime_secs)?;
        w.put(&self.cookie)?;
        w.put(&self.sn_key)?;
        room_for_sig(w.buf, w.pos)
    }
    /// Parses (signature not checked here).
    pub fn decode(buf: &[u8]) -> Result<Signed<'_, Self>, WireError> {
        check_head(buf, MsgType::RegisterAck)?;
        let (signed, sig) = split_sig(buf, 4)?;
        check_zero(buf, 2..4)?;
        let mut r = Reader::new(signed, 4);
        let msg = Self {
            community: r.array()?,
            edge: r.array()?,
            seq: r.u64()?,
            version: r.u64()?,
            epoch: r.u64()?,
            observed: r.addr()?,
            lifetime_secs: r.u16()?,
            cookie: r.array()?,
            sn_key: r.array()?,
        };
        r.finish()?;
        Ok(Signed { msg, signed, sig })
    }
}

// ---------------------------------------------------------------------------------------
// Cookie (supernode -> edge), the answer to an unvalidated registration

/// An address-validation cookie. Never larger than the registration it answers, and the
/// only thing the supernode sends to an address that has not proven it receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cookie {
    /// Edge id of the registration key in the request.
    pub edge: EdgeId,
    /// Sequence number of the request.
    pub seq: u64,
    /// The cookie to put in the next registration.
    pub cookie: [u8; COOKIE_LEN],
}

impl Cookie {
    /// Encodes into `buf[..COOKIE_MSG_LEN]`.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(buf);
        w.put(&[VERSION, MsgType::Cookie as u8, 0, 0])?;
        w.put(&self.edge)?;
        w.u64(self.seq)?;
        w.put(&self.cookie)?;
        Ok(w.pos)
    }
    /// Parses.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        check_head(buf, MsgType::Cookie)?;
        check_len(buf, COOKIE_MSG_LEN)?;
        check_zero(buf, 2..4)?;
        let mut r = Reader::new(buf, 4);
        Ok(Self {
            edge: r.array()?,
            seq: r.u64()?,
            cookie: r.array()?,
        })
    }
}

// ---------------------------------------------------------------------------------------
// PeerInfo (supernode -> edge), signed by the supernode

/// One peer as the supernode knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerEntry {
    /// Edge id.
    pub id: EdgeId,
    /// Edge name.
    pub name: String,
    /// Address the supernode observed for it.
    pub observed: SocketAddr,
    /// Addresses it announced.
    pub local_addrs: Vec<SocketAddr>,
}

/// "No peer list held": the version an edge registers with before it has a complete one.
pub const NO_LIST: u64 = 0;

/// What a peer-info message says about its entries (byte 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum InfoKind {
    /// The entries joined or changed their addresses since the previous version.
    Update = 0,
    /// Part `part` of `parts` of the complete list.
    Full = 1,
    /// The entries left the community (expired on the supernode).
    Gone = 2,
}

/// Where peers are. Signed with the supernode's key once and sent as the same bytes to
/// every member that needs it: not bound to a receiver, but to the supernode's run
/// (`epoch`) and to a place in the community's history (`version`), which edges only
/// move forward through (see `docs/PROTOCOL.md`, PeerInfo).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// Community.
    pub community: CommunityId,
    /// Complete list, changes, or departures.
    pub kind: InfoKind,
    /// The supernode's epoch (as in its acknowledgements).
    pub epoch: u64,
    /// The community's peer-list version this message brings the receiver to (changes
    /// and departures take it from `version - 1`; a complete list to `version` once
    /// every part came).
    pub version: u64,
    /// Index of this part of a complete list (0 otherwise).
    pub part: u16,
    /// Parts of the complete list, at least 1 (1 otherwise).
    pub parts: u16,
    /// Peers (at most [`MAX_PEERS_PER_INFO`]).
    pub peers: Vec<PeerEntry>,
}

impl PeerInfo {
    /// Encodes everything except the signature; returns the length. The caller appends
    /// a [`SIG_LEN`]-byte signature over `buf[..len]`.
    pub fn encode_unsigned(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        if self.peers.len() > MAX_PEERS_PER_INFO || !parts_ok(self.kind, self.part, self.parts) {
            return Err(WireError::Malformed);
        }
        let mut w = Writer::new(buf);
        w.put(&[
            VERSION,
            MsgType::PeerInfo as u8,
            self.kind as u8,
            self.peers.len() as u8,
        ])?;
        w.put(&self.community)?;
        w.u64(self.epoch)?;
        w.u64(self.version)?;
        w.u16(self.part)?;
        w.u16(self.parts)?;
        for p in &self.peers {
            if p.local_addrs.len() > MAX_LOCAL_ADDRS {
                return Err(WireError::Malformed);
            }
            w.put(&p.id)?;
            w.name(&p.name)?;
            w.addr(&p.observed)?;
            w.u8(p.local_addrs.len() as u8)?;
            for a in &p.local_addrs {
                w.addr(a)?;
            }
        }
        room_for_sig(w.buf, w.pos)
    }
    /// Parses (signature not checked here).
    pub fn decode(buf: &[u8]) -> Result<Signed<'_, Self>, WireError> {
        check_head(buf, MsgType::PeerInfo)?;
        let (signed, sig) = split_sig(buf, 4)?;
        let kind = match buf[2] {
            0 => InfoKind::Update,
            1 => InfoKind::Full,
            2 => InfoKind::Gone,
            _ => return Err(WireError::Malformed),
        };
        let n = buf[3] as usize;
        if n > MAX_PEERS_PER_INFO {
            return Err(WireError::Malformed);
        }
        let mut r = Reader::new(signed, 4);
        let community = r.array()?;
        let epoch = r.u64()?;
        let version = r.u64()?;
        let part = r.u16()?;
        let parts = r.u16()?;
        if !parts_ok(kind, part, parts) {
            return Err(WireError::Malformed);
        }
        let mut peers = Vec::with_capacity(n);
        for _ in 0..n {
            let id = r.array()?;
            let name = r.name()?;
            let observed = r.addr()?;
            let k = r.u8()? as usize;
            if k > MAX_LOCAL_ADDRS {
                return Err(WireError::Malformed);
            }
            let mut local_addrs = Vec::with_capacity(k);
            for _ in 0..k {
                local_addrs.push(r.addr()?);
            }
            peers.push(PeerEntry {
                id,
                name,
                observed,
                local_addrs,
            });
        }
        r.finish()?;
        Ok(Signed {
            msg: Self {
                community,
                kind,
                epoch,
                version,
                part,
                parts,
                peers,
            },
            signed,
            sig,
        })
    }
}

/// A complete list has `part < parts`; a change or departure is part 0 of 1.
fn parts_ok(kind: InfoKind, part: u16, parts: u16) -> bool {
    match kind {
        InfoKind::Full => part < parts,
        InfoKind::Update | InfoKind::Gone => part == 0 && parts == 1,
    }
}

// ---------------------------------------------------------------------------------------
// Relay header (edge -> supernode -> edge)

/// Length of the relay header that precedes the relayed edge-to-edge packet.
pub const RELAY_HDR_LEN: usize = 4 + COMMUNITY_ID_LEN + 2 * EDGE_ID_LEN;

/// The relay header: the fields the supernode reads. The inner packet authenticates them
/// (they are part of its AEAD associated data), so a changed header makes it fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayHdr {
    /// Community.
    pub community: CommunityId,
    /// Sending edge.
    pub src: EdgeId,
    /// Receiving edge.
    pub dst: EdgeId,
}

impl RelayHdr {
    /// Writes the header into `buf[..RELAY_HDR_LEN]`.
    pub fn write(&self, buf: &mut [u8]) -> Result<(), WireError> {
        let h = buf.get_mut(..RELAY_HDR_LEN).ok_or(WireError::NoRoom)?;
        h[..4].copy_from_slice(&[VERSION, MsgType::Relay as u8, 0, 0]);
        h[4..20].copy_from_slice(&self.community);
        h[20..28].copy_from_slice(&self.src);
        h[28..36].copy_from_slice(&self.dst);
        Ok(())
    }
    /// Parses the header; returns it and the inner packet (never empty).
    pub fn decode(buf: &[u8]) -> Result<(Self, &[u8]), WireError> {
        check_head(buf, MsgType::Relay)?;
        if buf.len() < RELAY_HDR_LEN + 2 {
            return Err(WireError::Truncated);
        }
        check_zero(buf, 2..4)?;
        let mut r = Reader::new(buf, 4);
        let h = Self {
            community: r.array()?,
            src: r.array()?,
            dst: r.array()?,
        };
        Ok((h, r.rest()))
    }
}

// ---------------------------------------------------------------------------------------
// Bcast (edge -> supernode -> edges)

/// Fixed part of a broadcast message before its destination list.
pub const BCAST_FIXED_LEN: usize = 4 + COMMUNITY_ID_LEN + EDGE_ID_LEN + 8;

/// A frame for several edges, encrypted once with the sender's broadcast key.
#[derive(Debug, PartialEq, Eq)]
pub struct BcastView<'a> {
    /// Community.
    pub community: CommunityId,
    /// Sender.
    pub src: EdgeId,
    /// Counter (nonce) of the sender's broadcast key.
    pub counter: u64,
    /// Explicit destinations; empty means every edge of the community but the sender.
    pub dsts: Vec<EdgeId>,
    /// Header bytes (associated data of the AEAD).
    pub header: &'a [u8],
    /// Ciphertext and tag.
    pub body: &'a [u8],
}

/// Writes a broadcast header into `buf`; returns its length (the body follows).
pub fn write_bcast_header(
    buf: &mut [u8],
    community: &CommunityId,
    src: &EdgeId,
    counter: u64,
    dsts: &[EdgeId],
) -> Result<usize, WireError> {
    if dsts.len() > MAX_BCAST_DSTS {
        return Err(WireError::Malformed);
    }
    let mut w = Writer::new(buf);
    w.put(&[VERSION, MsgType::Bcast as u8, 0, dsts.len() as u8])?;
    w.put(community)?;
    w.put(src)?;
    w.u64(counter)?;
    for d in dsts {
        w.put(d)?;
    }
    Ok(w.pos)
}

/// Parses a broadcast message.
pub fn decode_bcast(buf: &[u8]) -> Result<BcastView<'_>, WireError> {
    check_head(buf, MsgType::Bcast)?;
    if buf.len() < BCAST_FIXED_LEN {
        return Err(WireError::Truncated);
    }
    let n = buf[3] as usize;
    if n > MAX_BCAST_DSTS {
        return Err(WireError::Malformed);
    }
    let mut r = Reader::new(buf, 4);
    let community = r.array()?;
    let src = r.array()?;
    let counter = r.u64()?;
    let mut dsts = Vec::with_capacity(n);
    for _ in 0..n {
        dsts.push(r.array()?);
    }
    let hl = r.pos;
    Ok(BcastView {
        community,
        src,
        counter,
        dsts,
        header: &buf[..hl],
        body: &buf[hl..],
    })
}

// ---------------------------------------------------------------------------------------
// Handshake (edge -> edge)

/// Length of a handshake-init message.
pub const HS_INIT_LEN: usize = 4 + 4 + EDGE_ID_LEN + 8 + 32 + TAG_LEN;
/// Length of a handshake-response message.
pub const HS_RESP_LEN: usize = 4 + 4 + 4 + EDGE_ID_LEN + 32 + 2 * TAG_LEN;

/// First handshake message. `mac` is an AEAD tag keyed from the community PSK and the
/// ephemeral key over the header fields before it (see `crypto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeInit {
    /// Cipher the initiator wants for the session.
    pub cipher: u8,
    /// Index the responder puts in packets to the initiator.
    pub sender_index: u32,
    /// Initiator's edge id.
    pub src: EdgeId,
    /// Strictly increasing per initiator; older inits are replays.
    pub ts: u64,
    /// Initiator's ephemeral X25519 public key.
    pub ephemeral: [u8; 32],
    /// PSK tag.
    pub mac: [u8; TAG_LEN],
}

impl HandshakeInit {
    /// Bytes covered by the tag: everything before it.
    pub const SIGNED_LEN: usize = HS_INIT_LEN - TAG_LEN;
    /// Encodes into `buf[..HS_INIT_LEN]`.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(buf);
        w.put(&[VERSION, MsgType::HandshakeInit as u8, self.cipher, 0])?;
        w.put(&self.sender_index.to_be_bytes())?;
        w.put(&self.src)?;
        w.u64(self.ts)?;
        w.put(&self.ephemeral)?;
        w.put(&self.mac)?;
        Ok(w.pos)
    }
    /// Parses.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        check_head(buf, MsgType::HandshakeInit)?;
        check_len(buf, HS_INIT_LEN)?;
        check_zero(buf, 3..4)?;
        let mut r = Reader::new(buf, 2);
        let cipher = r.u8()?;
        r.u8()?;
        Ok(Self {
            cipher,
            sender_index: u32::from_be_bytes(r.array()?),
            src: r.array()?,
            ts: r.u64()?,
            ephemeral: r.array()?,
            mac: r.array()?,
        })
    }
}

/// Second handshake message. `mac` is keyed from the PSK and both ephemeral keys (checked
/// before any Diffie-Hellman work); `confirm` is keyed from the session secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeResp {
    /// Cipher of the session (equals the init's).
    pub cipher: u8,
    /// Index the initiator puts in packets to the responder.
    pub sender_index: u32,
    /// The init's sender index.
    pub receiver_index: u32,
    /// Responder's edge id.
    pub src: EdgeId,
    /// Responder's ephemeral X25519 public key.
    pub ephemeral: [u8; 32],
    /// PSK tag.
    pub mac: [u8; TAG_LEN],
    /// Key-confirmation tag.
    pub confirm: [u8; TAG_LEN],
}

impl HandshakeResp {
    /// Bytes covered by the tags.
    pub const SIGNED_LEN: usize = HS_RESP_LEN - 2 * TAG_LEN;
    /// Encodes into `buf[..HS_RESP_LEN]`.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(buf);
        w.put(&[VERSION, MsgType::HandshakeResp as u8, self.cipher, 0])?;
        w.put(&self.sender_index.to_be_bytes())?;
        w.put(&self.receiver_index.to_be_bytes())?;
        w.put(&self.src)?;
        w.put(&self.ephemeral)?;
        w.put(&self.mac)?;
        w.put(&self.confirm)?;
        Ok(w.pos)
    }
    /// Parses.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        check_head(buf, MsgType::HandshakeResp)?;
        check_len(buf, HS_RESP_LEN)?;
        check_zero(buf, 3..4)?;
        let mut r = Reader::new(buf, 2);
        let cipher = r.u8()?;
        r.u8()?;
        Ok(Self {
            cipher,
            sender_index: u32::from_be_bytes(r.array()?),
            receiver_index: u32::from_be_bytes(r.array()?),
            src: r.array()?,
            ephemeral: r.array()?,
            mac: r.array()?,
            confirm: r.array()?,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Transport (Data / Probe)

/// Length of the transport header of data and probe messages.
pub const TRANSPORT_HDR_LEN: usize = 16;
/// Flag of a probe message: this is a reply.
pub const PROBE_REPLY: u8 = 1;
/// Flag of a data message: the frame's TCP checksum holds only the pseudo-header sum
/// (checksum offload); the receiver completes it or lets its kernel do so.
pub const DATA_CSUM_PARTIAL: u8 = 2;
/// Plaintext length of a probe body (probe id).
pub const PROBE_BODY_LEN: usize = 8;

/// Header of a session-encrypted message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportHdr {
    /// Data or probe.
    pub kind: MsgType,
    /// Flags (probe: [`PROBE_REPLY`]).
    pub flags: u8,
    /// The receiver's session index.
    pub receiver_index: u32,
    /// Nonce counter.
    pub counter: u64,
}

impl TransportHdr {
    /// Writes into `buf[..TRANSPORT_HDR_LEN]`.
    pub fn write(&self, buf: &mut [u8]) -> Result<(), WireError> {
        let h = buf.get_mut(..TRANSPORT_HDR_LEN).ok_or(WireError::NoRoom)?;
        h[..4].copy_from_slice(&[VERSION, self.kind as u8, self.flags, 0]);
        h[4..8].copy_from_slice(&self.receiver_index.to_be_bytes());
        h[8..16].copy_from_slice(&self.counter.to_be_bytes());
        Ok(())
    }
    /// Parses the header of a data, probe or control message; the body follows it.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let kind = peek_type(buf)?;
        if !matches!(kind, MsgType::Data | MsgType::Probe | MsgType::Control) {
            return Err(WireError::UnknownType);
        }
        if buf.len() < TRANSPORT_HDR_LEN {
            return Err(WireError::Truncated);
        }
        check_zero(buf, 3..4)?;
        let mut idx = [0u8; 4];
        idx.copy_from_slice(&buf[4..8]);
        let mut ctr = [0u8; 8];
        ctr.copy_from_slice(&buf[8..16]);
        Ok(Self {
            kind,
            flags: buf[2],
            receiver_index: u32::from_be_bytes(idx),
            counter: u64::from_be_bytes(ctr),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn register_roundtrip() {
        let m = Register {
            cookie: [3; 16],
            community: [7; 16],
            edge_key: [9; 32],
            seq: 42,
            known: 77,
            name: "site-b".into(),
            local_addrs: vec![sa("198.18.2.2:5000"), sa("[fe80::1]:5000")],
        };
        let mut buf = [0u8; 512];
        let n = m.encode_unsigned(&mut buf).unwrap();
        buf[n..n + SIG_LEN].fill(0xab);
        let v = Register::decode(&buf[..n + SIG_LEN]).unwrap();
        assert_eq!(v.msg, m);
        assert_eq!(v.signed, &buf[..n]);
        assert_eq!(v.sig, &[0xab; SIG_LEN][..]);
        for cut in 0..n + SIG_LEN {
            assert!(Register::decode(&buf[..cut]).is_err());
        }
    }

    #[test]
    fn ack_cookie_and_peerinfo_roundtrip() {
        let a = RegisterAck {
            community: [1; 16],
            edge: [2; 8],
            seq: 3,
            version: 11,
            epoch: 13,
            observed: sa("198.18.0.1:7654"),
            lifetime_secs: 30,
            cookie: [4; 16],
            sn_key: [5; 32],
        };
        let mut buf = [0u8; 1500];
        let n = a.encode_unsigned(&mut buf).unwrap();
        buf[n..n + SIG_LEN].fill(0xcd);
        let v = RegisterAck::decode(&buf[..n + SIG_LEN]).unwrap();
        assert_eq!(v.msg, a);
        assert_eq!(v.signed, &buf[..n]);
        for cut in 0..n + SIG_LEN {
            assert!(RegisterAck::decode(&buf[..cut]).is_err());
        }
        let c = Cookie {
            edge: [6; 8],
            seq: 7,
            cookie: [8; 16],
        };
        let n = c.encode(&mut buf).unwrap();
        assert_eq!(n, COOKIE_MSG_LEN);
        assert_eq!(Cookie::decode(&buf[..n]).unwrap(), c);
        assert!(Cookie::decode(&buf[..n - 1]).is_err());
        // A prompt is a cookie message with the reserved number, byte for byte the same.
        let p = Cookie {
            seq: PROMPT_SEQ,
            ..c
        };
        assert_eq!(p.encode(&mut buf).unwrap(), COOKIE_MSG_LEN);
        assert_eq!(buf[12..20], [0xff; 8]);
        assert_eq!(Cookie::decode(&buf[..n]).unwrap(), p);
        let p = PeerInfo {
            community: [1; 16],
            kind: InfoKind::Full,
            epoch: 10,
            version: 12,
            part: 1,
            parts: 3,
            peers: vec![PeerEntry {
                id: [3; 8],
                name: "a".into(),
                observed: sa("198.18.0.2:1"),
                local_addrs: vec![sa("10.0.0.1:2")],
            }],
        };
        let n = p.encode_unsigned(&mut buf).unwrap();
        buf[n..n + SIG_LEN].fill(0xef);
        let v = PeerInfo::decode(&buf[..n + SIG_LEN]).unwrap();
        assert_eq!(v.msg, p);
        assert_eq!(v.sig, &[0xef; SIG_LEN][..]);
        for cut in 0..n + SIG_LEN {
            assert!(PeerInfo::decode(&buf[..cut]).is_err());
        }
        // A part past the count, a change in parts, an unknown kind: malformed.
        let bad = |f: &dyn Fn(&mut PeerInfo)| {
            let mut q = p.clone();
            f(&mut q);
            assert_eq!(
                q.encode_unsigned(&mut [0u8; 1500]),
                Err(WireError::Malformed)
            );
        };
        bad(&|q| q.part = 3);
        bad(&|q| q.parts = 0);
        bad(&|q| q.kind = InfoKind::Update);
        bad(&|q| {
            q.kind = InfoKind::Gone;
            q.part = 0;
        });
        let n = p.encode_unsigned(&mut buf).unwrap();
        let at = 4 + COMMUNITY_ID_LEN + 16;
        buf[at..at + 2].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(
            PeerInfo::decode(&buf[..n + SIG_LEN]).unwrap_err(),
            WireError::Malformed
        );
        buf[2] = 3;
        assert_eq!(
            PeerInfo::decode(&buf[..n + SIG_LEN]).unwrap_err(),
            WireError::Malformed
        );
    }

    #[test]
    fn handshake_roundtrip() {
        let i = HandshakeInit {
            cipher: 1,
            sender_index: 0xdead_beef,
            src: [4; 8],
            ts: 99,
            ephemeral: [5; 32],
            mac: [6; 16],
        };
        let mut buf = [0u8; 128];
        let n = i.encode(&mut buf).unwrap();
        assert_eq!(n, HS_INIT_LEN);
        assert_eq!(HandshakeInit::decode(&buf[..n]).unwrap(), i);
        let r = HandshakeResp {
            cipher: 2,
            sender_index: 1,
            receiver_index: 2,
            src: [3; 8],
            ephemeral: [4; 32],
            mac: [5; 16],
            confirm: [6; 16],
        };
        let n = r.encode(&mut buf).unwrap();
        assert_eq!(n, HS_RESP_LEN);
        assert_eq!(HandshakeResp::decode(&buf[..n]).unwrap(), r);
    }

    #[test]
    fn relay_bcast_transport_roundtrip() {
        let mut buf = [0u8; 256];
        let h = RelayHdr {
            community: [1; 16],
            src: [2; 8],
            dst: [3; 8],
        };
        h.write(&mut buf).unwrap();
        buf[RELAY_HDR_LEN..RELAY_HDR_LEN + 4].copy_from_slice(&[1, 0x12, 0, 0]);
        let (h2, inner) = RelayHdr::decode(&buf[..RELAY_HDR_LEN + 4]).unwrap();
        assert_eq!(h, h2);
        assert_eq!(inner, &[1, 0x12, 0, 0]);
        let n = write_bcast_header(&mut buf, &[1; 16], &[2; 8], 77, &[[5; 8], [6; 8]]).unwrap();
        buf[n..n + 20].fill(9);
        let v = decode_bcast(&buf[..n + 20]).unwrap();
        assert_eq!(v.counter, 77);
        assert_eq!(v.dsts, vec![[5; 8], [6; 8]]);
        assert_eq!(v.body.len(), 20);
        let t = TransportHdr {
            kind: MsgType::Probe,
            flags: PROBE_REPLY,
            receiver_index: 5,
            counter: 6,
        };
        t.write(&mut buf).unwrap();
        assert_eq!(TransportHdr::decode(&buf[..16]).unwrap(), t);
    }

    #[test]
    fn bad_version_and_type() {
        assert_eq!(peek_type(&[1, 1]), Err(WireError::BadVersion));
        assert_eq!(peek_type(&[2, 1]), Err(WireError::BadVersion));
        assert_eq!(peek_type(&[3, 1]), Err(WireError::BadVersion));
        assert_eq!(peek_type(&[5, 1]), Err(WireError::BadVersion));
        assert_eq!(peek_type(&[VERSION, 0x77]), Err(WireError::UnknownType));
        assert_eq!(peek_type(&[VERSION]), Err(WireError::Truncated));
    }
}
