//! The XDP program on the edge's port of the VM bridge.
//!
//! The port is a veth pair made by the edge: one end is enslaved to the
//! bridge, this program runs on the other. Every frame the bridge sends to the
//! edge arrives here and is redirected, by rx queue, into the AF_XDP socket the
//! edge bound to that queue (`MVC_XSKS`). What must not enter the overlay
//! (frames too short to be Ethernet, 802.1D link-local control frames) and
//! frames of a queue without a socket go on to the kernel (`XDP_PASS`).
//!
//! Bounded and verifier-friendly: no loops, one bounds-checked read of the
//! Ethernet destination, one map redirect.
//!
//! The same object holds `mvc_relay`, the supernode's program on its underlay
//! interface (see `try_mvc_relay`): it relays sealed Data datagrams between
//! validated edges without a trip through userspace and drops datagrams for
//! the supernode's port that fail the cheap checks.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibLookup, xdp_action, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::generated::{bpf_fib_lookup, bpf_ktime_get_ns, bpf_redirect},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, XskMap},
    programs::{TcContext, XdpContext},
};
use dataplane_ebpf_common::{
    edge_rx_min, is_link_local, is_transport, wire, Counter, FilterCounter, RelayCounter, COUNTERS,
    ETH_HLEN, FILTER_CONFIG_LEN, FILTER_COUNTERS, FILTER_FLAG_SESSIONS, FILTER_MAX_SESSIONS,
    MAX_QUEUES, RELAY_CONFIG_LEN, RELAY_COUNTERS, RELAY_DEST_LEN, RELAY_FLAG_COMPLETE,
    RELAY_KEY_LEN, RELAY_MAX_EDGES, RELAY_PROMPTED_SOURCES, RELAY_PROMPTS_PER_SLOT,
    RELAY_PROMPT_SLOT_NS,
};

/// rx queue index -> AF_XDP socket (filled in by userspace).
#[map(name = "MVC_XSKS")]
static MVC_XSKS: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);

/// Per-CPU counters indexed by [`Counter`].
#[map(name = "MVC_STATS")]
static MVC_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

// `frags`: the program accepts multi-buffer frames (BPF_F_XDP_HAS_FRAGS), so
// the port works with MTUs above a page; only the linear head is read.
#[xdp(frags)]
pub fn mvc_xdp(ctx: XdpContext) -> u32 {
    match try_mvc_xdp(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_ABORTED,
    }
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = MVC_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: `slot` points at this CPU's element of a per-CPU array that
        // the kernel keeps alive for the program's run; no other context
        // writes this CPU's element concurrently.
        unsafe { *slot += 1 };
    }
}

/// Pointer to a `T` at `offset` bytes into the frame, or `Err` when the frame
/// is too short. The explicit comparison against `data_end` is what the
/// verifier needs to accept the later read.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    let len = core::mem::size_of::<T>();
    if start + offset + len > end {
        return Err(());
    }
    Ok((start + offset) as *const T)
}

#[inline(always)]
fn try_mvc_xdp(ctx: &XdpContext) -> Result<u32, ()> {
    if ctx.data() + ETH_HLEN > ctx.data_end() {
        count(Counter::PassedShort);
        return Ok(xdp_action::XDP_PASS);
    }
    let dst: *const [u8; 6] = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked that 6 bytes at `dst` lie inside the frame.
    let dst = unsafe { &*dst };
    if is_link_local(dst) {
        count(Counter::PassedLinkLocal);
        return Ok(xdp_action::XDP_PASS);
    }
    // With XDP_PASS in the flags' low bits, a queue without a socket passes
    // the frame to the kernel instead of dropping it.
    match MVC_XSKS.redirect(ctx.rx_queue_index(), u64::from(xdp_action::XDP_PASS)) {
        Ok(action) if action == xdp_action::XDP_REDIRECT => {
            count(Counter::Redirected);
            Ok(action)
        }
        Ok(action) => {
            count(Counter::PassedNoSocket);
            Ok(action)
        }
        Err(action) => {
            count(Counter::PassedNoSocket);
            Ok(action)
        }
    }
}

/// Validated edges: community id ‖ edge id -> IPv4 address ‖ port ‖ 0 0
/// (kept by the supernode as edges register and expire).
#[map(name = "MVC_RELAY_EDGES")]
static MVC_RELAY_EDGES: HashMap<[u8; RELAY_KEY_LEN], [u8; RELAY_DEST_LEN]> =
    HashMap::with_max_entries(RELAY_MAX_EDGES, 0);

/// Entry 0: the supernode's port, flags and address (`relay_config`).
#[map(name = "MVC_RELAY_CONFIG")]
static MVC_RELAY_CONFIG: Array<[u8; RELAY_CONFIG_LEN]> = Array::with_max_entries(1, 0);

/// Per-CPU counters indexed by [`RelayCounter`].
#[map(name = "MVC_RELAY_STATS")]
static MVC_RELAY_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(RELAY_COUNTERS, 0);

/// Source address (IPv4 ‖ port ‖ 0 0) -> time of the last datagram from an
/// unvalidated source passed on from there (`prompt_pass`).
#[map(name = "MVC_RELAY_PROMPTED")]
static MVC_RELAY_PROMPTED: LruHashMap<[u8; RELAY_DEST_LEN], u64> =
    LruHashMap::with_max_entries(RELAY_PROMPTED_SOURCES, 0);

/// This CPU's prompt budget: `[slot, used]` (`prompt_pass`).
#[map(name = "MVC_RELAY_PROMPT_BUDGET")]
static MVC_RELAY_PROMPT_BUDGET: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// The supernode's program on its underlay interface. Not `frags`: on veth
/// that makes the kernel segment UDP GSO batches before the program sees
/// them, so every frame holds one datagram with its own headers.
#[xdp]
pub fn mvc_relay(ctx: XdpContext) -> u32 {
    match try_mvc_relay(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_PASS,
    }
}

/// What the TC programs return for a packet they let go on: tcx's "next"
/// (`TC_ACT_UNSPEC`), so that later programs on the same hook (the relay and
/// the filter on one interface, or another tool's) still see it, then the
/// stack; `TC_ACT_OK` would end the chain at this program.
const TC_NEXT: i32 = TC_ACT_UNSPEC;

/// The same relay as a TC classifier on the ingress of the supernode's
/// underlay interface (`--xdp-relay-mode tc`): it sees the socket buffer, so
/// a UDP GSO batch stays one buffer (relayed whole when every datagram in it
/// goes the same way, `gso_batch_agrees`), its checksum can be left partial
/// and updated by the kernel's helpers, and the redirect to the interface's
/// egress goes through `dev_queue_xmit`, which segments the batch where the
/// device cannot.
#[classifier]
pub fn mvc_relay_tc(ctx: TcContext) -> i32 {
    match try_mvc_relay_tc(&ctx) {
        Ok(action) => action,
        Err(()) => TC_NEXT,
    }
}

#[inline(always)]
fn relay_count(counter: RelayCounter, n: u64) {
    if let Some(slot) = MVC_RELAY_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: as in `count`: this CPU's element of a per-CPU array, alive
        // for the program's run and written by no other context.
        unsafe { *slot += n };
    }
}

/// A received packet as the relay's checks read it: the bounds of its
/// linear part and its whole length.
trait Frame {
    /// Start and end of the bytes the program may read directly, read
    /// afresh (see [`pkt_ptr`]).
    fn bounds(&self) -> (usize, usize);
    /// Length of the whole packet from its Ethernet header (a GSO batch's
    /// total).
    fn len(&self) -> usize;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn bounds(&self) -> (usize, usize) {
        // SAFETY: `self.ctx` points at the program's `xdp_md`, valid for its run.
        unsafe {
            (
                core::ptr::read_volatile(&(*self.ctx).data) as usize,
                core::ptr::read_volatile(&(*self.ctx).data_end) as usize,
            )
        }
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn bounds(&self) -> (usize, usize) {
        let skb = self.skb.skb;
        // SAFETY: `skb` points at the program's `__sk_buff`, valid for its run.
        unsafe {
            (
                core::ptr::read_volatile(&(*skb).data) as usize,
                core::ptr::read_volatile(&(*skb).data_end) as usize,
            )
        }
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.len() as usize
    }
}

/// [`ptr_at`] with the frame's bounds read afresh (volatile loads): the
/// relay program also compares the UDP length against the frame, and the
/// compiler would otherwise drop this check as implied by that one, which the
/// verifier (tracking packet pointers, not the arithmetic) cannot follow.
#[inline(always)]
fn pkt_ptr<T, F: Frame>(frame: &F, offset: usize) -> Result<*mut T, ()> {
    let (start, end) = frame.bounds();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

const ETH_P_IP: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;
const AF_INET: u8 = 2;
const IP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const UDP_AT: usize = ETH_HLEN + IP_HLEN;
const PAYLOAD_AT: usize = UDP_AT + UDP_HLEN;
/// Offset of the UDP checksum in the frame.
const UDP_CSUM_AT: usize = UDP_AT + 6;
/// `BPF_FIB_LOOKUP_OUTPUT`: route as the host's own output would, from the
/// ingress interface (no forwarding sysctl needed).
const FIB_LOOKUP_OUTPUT: u32 = 2;
const FIB_SUCCESS: i64 = 0;
/// TTL of a relayed datagram, as of one the supernode's socket would send.
const RELAY_TTL: u8 = 64;
/// The head of a Relay of Data the relay reads: the relay header and the
/// inner message's version and type.
const RELAY_HEAD_LEN: usize = wire::RELAY_HDR_LEN + 2;
/// Bytes of a frame the checks read (headers and [`RELAY_HEAD_LEN`]); the TC
/// program makes them linear first.
const CHECKED_LEN: usize = PAYLOAD_AT + RELAY_HEAD_LEN;
/// Most datagrams in a GSO batch the TC relay checks (the kernel's
/// `UDP_MAX_SEGMENTS`); a larger batch goes to userspace.
const GSO_MAX_SEGS: u32 = 128;
/// `bpf_l4_csum_replace` flags: `BPF_F_PSEUDO_HDR` (the field is in the
/// pseudo header: updated in a partial checksum too) and
/// `BPF_F_MARK_MANGLED_0` (a UDP checksum of 0, none, stays 0, and a
/// computed 0 is sent as 0xffff); the low bits give the field's size.
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// Ones' complement checksum of the 20-byte IPv4 header `h` (its checksum
/// field read as zero), as it goes on the wire.
#[inline(always)]
fn ip_checksum(h: &[u8; IP_HLEN]) -> [u8; 2] {
    let mut sum: u32 = 0;
    // Unrolled by the compiler: a constant bound of 10.
    for i in 0..10 {
        if i != 5 {
            sum += u32::from(u16::from_be_bytes([h[2 * i], h[2 * i + 1]]));
        }
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// The IPv4 and UDP headers of a frame, copied out; `None` for a frame that is
/// not IPv4/UDP or that carries IP options or is a fragment (those are left to
/// the kernel). The UDP header's length field is not checked here.
#[inline(always)]
fn ipv4_udp_headers<F: Frame>(f: &F) -> Result<Option<([u8; IP_HLEN], [u8; UDP_HLEN])>, ()> {
    let ethertype: *const [u8; 2] = pkt_ptr(f, 12)?;
    // SAFETY: `pkt_ptr` checked the bounds (also for every read below).
    if u16::from_be_bytes(unsafe { *ethertype }) != ETH_P_IP {
        return Ok(None);
    }
    let ip: *const [u8; IP_HLEN] = pkt_ptr(f, ETH_HLEN)?;
    // SAFETY: bounds checked by `pkt_ptr`.
    let iph = unsafe { *ip };
    // Options (IHL above 5) or fragments: left to the kernel.
    if iph[0] != 0x45 || iph[9] != IPPROTO_UDP || (iph[6] & 0x3f) != 0 || iph[7] != 0 {
        return Ok(None);
    }
    let udp: *const [u8; UDP_HLEN] = pkt_ptr(f, UDP_AT)?;
    // SAFETY: bounds checked by `pkt_ptr`.
    let udph = unsafe { *udp };
    Ok(Some((iph, udph)))
}

/// Whether a Relay or Bcast from a source the map does not validate, sent
/// from `iph`/`udph`'s source address, goes on to userspace after all: the
/// supernode answers it with a prompt to register (its edges then come back
/// after a supernode restart or a NAT change without waiting for their
/// periodic registration), and prompts are limited there to one per address
/// per 100 ms and a budget per 100 ms. The same limits here (the budget per
/// CPU) keep a flood of such datagrams in the kernel: past them, it is dropped
/// as before. The budget is looked at first, so a flood past it costs no map
/// update.
#[inline(always)]
fn prompt_pass(iph: &[u8; IP_HLEN], udph: &[u8; UDP_HLEN]) -> bool {
    let Some(budget) = MVC_RELAY_PROMPT_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a helper without arguments or side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    let slot = now / RELAY_PROMPT_SLOT_NS;
    // SAFETY: this CPU's element of a per-CPU array, alive for the program's
    // run and written by no other context (as in `count`).
    let budget = unsafe { &mut *budget };
    if budget[0] != slot {
        *budget = [slot, 0];
    }
    if budget[1] >= RELAY_PROMPTS_PER_SLOT {
        return false;
    }
    let src = [iph[12], iph[13], iph[14], iph[15], udph[0], udph[1], 0, 0];
    // SAFETY: a plain `u64` that the program replaces whole.
    if let Some(last) = unsafe { MVC_RELAY_PROMPTED.get(&src) } {
        if now.wrapping_sub(*last) < RELAY_PROMPT_SLOT_NS {
            return false;
        }
    }
    if MVC_RELAY_PROMPTED.insert(&src, &now, 0).is_err() {
        return false;
    }
    budget[1] += 1;
    true
}

/// What the relay's checks decided for a frame.
enum Verdict {
    /// Not for the supernode's port (or not IPv4/UDP): on to the kernel,
    /// uncounted.
    Ignore,
    /// Counted, then dropped ([`RelayCounter::is_drop`]) or passed on to the
    /// socket.
    Count(RelayCounter),
    /// A Relay of Data from a validated edge to another: sent on by the
    /// program.
    Relay(Relayable),
}

/// A datagram to relay: its headers as received, the destination edge's
/// address (IPv4 ‖ port ‖ 0 0) and its UDP payload length (a GSO batch's
/// total, from the UDP length field).
struct Relayable {
    iph: [u8; IP_HLEN],
    udph: [u8; UDP_HLEN],
    dst: [u8; RELAY_DEST_LEN],
    len: usize,
}

/// A Relay or Bcast from an unvalidated source: passed on within the prompt
/// limits (`prompt_pass`), else dropped and counted as `counter`.
#[inline(always)]
fn unvalidated(iph: &[u8; IP_HLEN], udph: &[u8; UDP_HLEN], counter: RelayCounter) -> Verdict {
    if prompt_pass(iph, udph) {
        return Verdict::Count(RelayCounter::PassedUnknownSource);
    }
    Verdict::Count(counter)
}

/// The supernode's checks, for IPv4 datagrams to its port, the same in both
/// hooks (XDP and TC):
///
/// * junk (wrong version, unknown type, shorter than its type's fixed part)
///   is dropped and counted;
/// * a Relay or Bcast whose source edge is not validated (when the map holds
///   every validated edge) or that comes from another address than the one
///   the edge registered from is dropped and counted: relaying it would make
///   the supernode a reflector for spoofed datagrams (except the few that the
///   supernode answers with a prompt to register, `prompt_pass`);
/// * a Relay carrying a Data message to a validated edge is to be relayed;
/// * everything else goes on to the socket, as without the program.
///
/// Lengths come from the UDP header, checked against the whole packet; the
/// bytes read lie in its first [`CHECKED_LEN`].
#[inline(always)]
fn check<F: Frame>(f: &F) -> Result<Verdict, ()> {
    let Some((iph, udph)) = ipv4_udp_headers(f)? else {
        return Ok(Verdict::Ignore);
    };
    let Some(cfg) = MVC_RELAY_CONFIG.get(0) else {
        return Ok(Verdict::Ignore);
    };
    if udph[2..4] != cfg[0..2] {
        return Ok(Verdict::Ignore);
    }
    if cfg[4..8] != [0, 0, 0, 0] && iph[16..20] != cfg[4..8] {
        return Ok(Verdict::Ignore);
    }
    let udp_len = usize::from(u16::from_be_bytes([udph[4], udph[5]]));
    if udp_len < UDP_HLEN || UDP_AT + udp_len > f.len() {
        // A length the kernel will refuse: let it.
        return Ok(Verdict::Ignore);
    }
    let len = udp_len - UDP_HLEN;
    if len < 2 {
        return Ok(Verdict::Count(RelayCounter::DropTruncated));
    }
    let head: *const [u8; 2] = pkt_ptr(f, PAYLOAD_AT)?;
    // SAFETY: bounds checked by `pkt_ptr`.
    let head = unsafe { *head };
    if head[0] != wire::VERSION {
        return Ok(Verdict::Count(RelayCounter::DropBadVersion));
    }
    let min = match head[1] {
        wire::TYPE_REGISTER => wire::REGISTER_MIN_LEN,
        wire::TYPE_RELAY => wire::RELAY_MIN_LEN,
        wire::TYPE_BCAST => wire::BCAST_MIN_LEN,
        _ => return Ok(Verdict::Count(RelayCounter::DropUnknownType)),
    };
    if len < min {
        return Ok(Verdict::Count(RelayCounter::DropTruncated));
    }
    if head[1] == wire::TYPE_REGISTER {
        // Registrations prove their address with the cookie, in userspace.
        return Ok(Verdict::Count(RelayCounter::Passed));
    }
    // Relay and Bcast: community ‖ source edge id lie next to each other.
    let src_key: *const [u8; RELAY_KEY_LEN] = pkt_ptr(f, PAYLOAD_AT + wire::COMMUNITY_AT)?;
    // SAFETY: bounds checked by `pkt_ptr`; map keys are copied by the kernel.
    let src_key = unsafe { *src_key };
    // SAFETY: the map value is plain bytes that userspace replaces whole.
    let Some(src) = (unsafe { MVC_RELAY_EDGES.get(&src_key) }) else {
        if cfg[2] & RELAY_FLAG_COMPLETE != 0 {
            return Ok(unvalidated(&iph, &udph, RelayCounter::DropUnknownEdge));
        }
        return Ok(Verdict::Count(RelayCounter::Passed));
    };
    if iph[12..16] != src[0..4] || udph[0..2] != src[4..6] {
        return Ok(unvalidated(&iph, &udph, RelayCounter::DropSpoofed));
    }
    if head[1] != wire::TYPE_RELAY || len < wire::RELAY_HDR_LEN + wire::TRANSPORT_HDR_LEN {
        return Ok(Verdict::Count(RelayCounter::Passed));
    }
    let rh: *const [u8; RELAY_HEAD_LEN] = pkt_ptr(f, PAYLOAD_AT)?;
    // SAFETY: bounds checked by `pkt_ptr`.
    let rh = unsafe { *rh };
    if rh[wire::RELAY_HDR_LEN] != wire::VERSION || rh[wire::RELAY_HDR_LEN + 1] != wire::TYPE_DATA {
        return Ok(Verdict::Count(RelayCounter::Passed));
    }
    let mut dst_key = src_key;
    dst_key[16..24].copy_from_slice(&rh[wire::DST_AT..wire::DST_AT + 8]);
    if dst_key[16..24] == src_key[16..24] {
        return Ok(Verdict::Count(RelayCounter::Passed));
    }
    // SAFETY: as for `src`.
    let Some(dst) = (unsafe { MVC_RELAY_EDGES.get(&dst_key) }) else {
        // Not validated (or not IPv4): userspace counts the drop.
        return Ok(Verdict::Count(RelayCounter::Passed));
    };
    Ok(Verdict::Relay(Relayable {
        iph,
        udph,
        dst: *dst,
        len,
    }))
}

/// The route out for a relayed datagram of `tot_len` bytes (IP header on; one
/// segment's for a GSO batch), from the kernel's FIB and neighbour table, if
/// it leaves through `ifindex` (where it came in), has a neighbour entry and
/// fits the route's MTU.
#[inline(always)]
fn relay_route(
    ctx: *mut core::ffi::c_void,
    ifindex: u32,
    r: &Relayable,
    tot_len: u16,
) -> Option<FibLookup> {
    // SAFETY: an all-zero `bpf_fib_lookup` is a valid value (plain integers).
    let mut fib: FibLookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = IPPROTO_UDP;
    fib.sport = u16::from_ne_bytes([r.udph[2], r.udph[3]]);
    fib.dport = u16::from_ne_bytes([r.dst[4], r.dst[5]]);
    fib.__bindgen_anon_1.tot_len = tot_len;
    fib.ifindex = ifindex;
    fib.__bindgen_anon_2.tos = r.iph[1];
    let ip = &r.iph;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([r.dst[0], r.dst[1], r.dst[2], r.dst[3]]);
    // SAFETY: `fib` is a valid, writable `bpf_fib_lookup` of the size passed;
    // `ctx` is the program's context.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx,
            &mut fib,
            core::mem::size_of::<FibLookup>() as i32,
            FIB_LOOKUP_OUTPUT,
        )
    };
    (rc == FIB_SUCCESS && fib.ifindex == ifindex).then_some(fib)
}

/// The relayed datagram's Ethernet addresses (destination ‖ source), IPv4
/// header (checksum filled in) and UDP header (checksum as received): source
/// address and port = the supernode's (the datagram's destination),
/// destination = the edge's, TTL 64.
#[inline(always)]
fn relayed_headers(r: &Relayable, fib: &FibLookup) -> ([u8; 12], [u8; IP_HLEN], [u8; UDP_HLEN]) {
    let mut e = [0u8; 12];
    e[0..6].copy_from_slice(&fib.dmac);
    e[6..12].copy_from_slice(&fib.smac);
    let mut h = r.iph;
    h[12..16].copy_from_slice(&r.iph[16..20]);
    h[16..20].copy_from_slice(&r.dst[0..4]);
    h[8] = RELAY_TTL;
    let ck = ip_checksum(&h);
    h[10] = ck[0];
    h[11] = ck[1];
    let mut u = r.udph;
    u[0..2].copy_from_slice(&r.udph[2..4]);
    u[2..4].copy_from_slice(&r.dst[4..6]);
    (e, h, u)
}

#[inline(always)]
fn xdp_verdict(counter: RelayCounter) -> u32 {
    relay_count(counter, 1);
    if counter.is_drop() {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// [`check`], then a relayable datagram is rewritten ([`relayed_headers`],
/// UDP checksum 0: a received partial checksum could not be completed here,
/// and the payload is authenticated by the edges' AEAD) and sent back out of
/// the same interface (`XDP_TX`); everything else passes or is dropped as
/// counted.
#[inline(always)]
fn try_mvc_relay(ctx: &XdpContext) -> Result<u32, ()> {
    let r = match check(ctx)? {
        Verdict::Ignore => return Ok(xdp_action::XDP_PASS),
        Verdict::Count(c) => return Ok(xdp_verdict(c)),
        Verdict::Relay(r) => r,
    };
    let ifindex = ctx.ingress_ifindex() as u32;
    let tot_len = u16::from_be_bytes([r.iph[2], r.iph[3]]);
    let Some(fib) = relay_route(ctx.ctx as *mut _, ifindex, &r, tot_len) else {
        return Ok(xdp_verdict(RelayCounter::PassedNoRoute));
    };
    let (e, h, mut u) = relayed_headers(&r, &fib);
    u[6] = 0;
    u[7] = 0;
    let eth: *mut [u8; 12] = pkt_ptr(ctx, 0)?;
    let ipm: *mut [u8; IP_HLEN] = pkt_ptr(ctx, ETH_HLEN)?;
    let udpm: *mut [u8; UDP_HLEN] = pkt_ptr(ctx, UDP_AT)?;
    // SAFETY: the three pointers were bounds-checked by `pkt_ptr`; the
    // frame is writable in XDP and nothing else refers to it.
    unsafe {
        *eth = e;
        *ipm = h;
        *udpm = u;
    }
    relay_count(RelayCounter::Relayed, 1);
    relay_count(RelayCounter::RelayedBytes, r.len as u64);
    Ok(xdp_action::XDP_TX)
}

#[inline(always)]
fn tc_verdict(counter: RelayCounter) -> i32 {
    relay_count(counter, 1);
    if counter.is_drop() {
        TC_ACT_SHOT
    } else {
        TC_NEXT
    }
}

/// Whether every datagram of a GSO batch of `segs` datagrams of `size`
/// bytes (`r.len` in all) is a Relay of Data with the first one's community,
/// source and destination (the reserved bytes aside): the edges
/// send one peer's datagrams per batch, but GRO on a physical NIC may merge
/// one edge's relays to several destinations. Each head is read with
/// `bpf_skb_load_bytes`, in a loop bounded by [`GSO_MAX_SEGS`].
#[inline(always)]
fn gso_batch_agrees(ctx: &TcContext, r: &Relayable, segs: u32, size: usize) -> bool {
    // Every datagram long enough for the relay's header and a transport
    // header; the last one holds the rest.
    let full = (segs as usize - 1) * size;
    if size < wire::RELAY_HDR_LEN + wire::TRANSPORT_HDR_LEN
        || r.len <= full
        || r.len - full > size
        || r.len - full < wire::RELAY_HDR_LEN + wire::TRANSPORT_HDR_LEN
    {
        return false;
    }
    let Ok(first) = ctx.load::<[u8; RELAY_HEAD_LEN]>(PAYLOAD_AT) else {
        return false;
    };
    let first = head_words(&first);
    let mut at = PAYLOAD_AT;
    for i in 1..GSO_MAX_SEGS {
        if i >= segs {
            return true;
        }
        at += size;
        let Ok(h) = ctx.load::<[u8; RELAY_HEAD_LEN]>(at) else {
            return false;
        };
        let w = head_words(&h);
        // Word by word: a slice comparison would be a byte loop, which the
        // verifier walks for every datagram of the batch.
        if w[0] != first[0]
            || w[1] != first[1]
            || w[2] != first[2]
            || w[3] != first[3]
            || w[4] != first[4]
        {
            return false;
        }
    }
    true
}

/// The fields of a Relay of Data's head that every datagram of a relayed GSO
/// batch shares, as five words: version and type of the relay and of the
/// inner message, then community, source and destination ids (the relay
/// header's two reserved bytes left out).
#[inline(always)]
fn head_words(h: &[u8; RELAY_HEAD_LEN]) -> [u64; 5] {
    let word = |at: usize| {
        u64::from_ne_bytes([
            h[at],
            h[at + 1],
            h[at + 2],
            h[at + 3],
            h[at + 4],
            h[at + 5],
            h[at + 6],
            h[at + 7],
        ])
    };
    let at = wire::RELAY_HDR_LEN;
    [
        u64::from_ne_bytes([h[0], h[1], h[at], h[at + 1], 0, 0, 0, 0]),
        word(wire::COMMUNITY_AT),
        word(wire::COMMUNITY_AT + 8),
        word(wire::SRC_AT),
        word(wire::DST_AT),
    ]
}

/// [`check`] on the socket buffer's head (made linear first), then a
/// relayable datagram or GSO batch is rewritten in place ([`relayed_headers`];
/// the UDP checksum updated by `bpf_l4_csum_replace`, so a partial one stays
/// partial and right, a complete one complete, none stays none) and
/// redirected to the egress of the same interface. A batch goes whole when
/// all its datagrams agree (`gso_batch_agrees`) and one of them fits the
/// route's MTU; else it goes to the socket, which relays each datagram.
#[inline(always)]
fn try_mvc_relay_tc(ctx: &TcContext) -> Result<i32, ()> {
    let (start, end) = ctx.bounds();
    let want = ctx.len().min(CHECKED_LEN as u32);
    if start + want as usize > end && ctx.pull_data(want).is_err() {
        return Ok(TC_NEXT);
    }
    let r = match check(ctx)? {
        Verdict::Ignore => return Ok(TC_NEXT),
        Verdict::Count(c) => return Ok(tc_verdict(c)),
        Verdict::Relay(r) => r,
    };
    let skb = ctx.skb.skb;
    // SAFETY: `skb` points at the program's `__sk_buff`, valid for its run.
    let (ifindex, gso_segs, gso_size) =
        unsafe { ((*skb).ifindex, (*skb).gso_segs, (*skb).gso_size) };
    let (segs, tot_len) = if gso_segs > 1 {
        let size = gso_size as usize;
        if gso_segs > GSO_MAX_SEGS || !gso_batch_agrees(ctx, &r, gso_segs, size) {
            return Ok(tc_verdict(RelayCounter::PassedMixedBatch));
        }
        (gso_segs, (IP_HLEN + UDP_HLEN + size) as u16)
    } else {
        (1, u16::from_be_bytes([r.iph[2], r.iph[3]]))
    };
    let Some(fib) = relay_route(skb as *mut _, ifindex, &r, tot_len) else {
        return Ok(tc_verdict(RelayCounter::PassedNoRoute));
    };
    let (e, h, u) = relayed_headers(&r, &fib);
    let word = |b: &[u8]| u64::from(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    // A GSO batch's checksum is always partial: its field is the pseudo
    // header's folded sum, updated as it is. A single datagram's 0 means it
    // came without a checksum (a partial one's sum folds to 0xffff, never
    // 0), and stays 0.
    let zero = if segs > 1 { 0 } else { BPF_F_MARK_MANGLED_0 };
    let pseudo = BPF_F_PSEUDO_HDR | zero | 4;
    // The addresses are in the pseudo header, the ports in the UDP header's
    // first word.
    let sums = ctx
        .l4_csum_replace(UDP_CSUM_AT, word(&r.iph[12..16]), word(&h[12..16]), pseudo)
        .and_then(|()| {
            ctx.l4_csum_replace(UDP_CSUM_AT, word(&r.iph[16..20]), word(&h[16..20]), pseudo)
        })
        .and_then(|()| {
            ctx.l4_csum_replace(UDP_CSUM_AT, word(&r.udph[0..4]), word(&u[0..4]), zero | 4)
        });
    let ports = [u[0], u[1], u[2], u[3]];
    let stored = sums
        .and_then(|()| ctx.store(0, &e, 0))
        .and_then(|()| ctx.store(ETH_HLEN, &h, 0))
        .and_then(|()| ctx.store(UDP_AT, &ports, 0));
    if stored.is_err() {
        // The buffer could not be made writable: the headers may be half
        // written, so it cannot go to the socket either.
        return Ok(tc_verdict(RelayCounter::DropRewrite));
    }
    relay_count(RelayCounter::Relayed, u64::from(segs));
    relay_count(RelayCounter::RelayedBytes, r.len as u64);
    // SAFETY: a helper taking plain integers.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// Entry 0: the edge's port, flags and community id (`filter_config`).
#[map(name = "MVC_FILTER_CONFIG")]
static MVC_FILTER_CONFIG: Array<[u8; FILTER_CONFIG_LEN]> = Array::with_max_entries(1, 0);

/// The edge's live receiver session indexes, as on the wire (kept by the
/// edge as sessions are made and dropped).
#[map(name = "MVC_FILTER_SESSIONS")]
static MVC_FILTER_SESSIONS: HashMap<[u8; 4], u8> =
    HashMap::with_max_entries(FILTER_MAX_SESSIONS, 0);

/// Per-CPU counters indexed by [`FilterCounter`].
#[map(name = "MVC_FILTER_STATS")]
static MVC_FILTER_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(FILTER_COUNTERS, 0);

/// The edge's junk filter on its underlay interface: datagrams for the edge's
/// port that fail the cheap checks are dropped before its socket, everything
/// else passes. `frags`: only the head is read, so the peer's GSO batches
/// need not be segmented for it.
#[xdp(frags)]
pub fn mvc_filter(ctx: XdpContext) -> u32 {
    match filter_check(&ctx) {
        Ok(Some(c)) if c.is_drop() => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

/// The same filter as a TC classifier on the ingress of the edge's underlay
/// interface (`--xdp-filter-mode tc`): no XDP runs on the device, so a veth
/// peer keeps its UDP GSO batches whole and a junk datagram is dropped as the
/// socket buffer it already is. A batch (GSO or GRO) is checked by its first
/// datagram's head, as the XDP filter does; the rest is the AEAD's in
/// userspace. What passes goes on as [`TC_NEXT`].
#[classifier]
pub fn mvc_filter_tc(ctx: TcContext) -> i32 {
    let (start, end) = ctx.bounds();
    let want = ctx.len().min(FILTER_CHECKED_LEN as u32);
    if start + want as usize > end && ctx.pull_data(want).is_err() {
        return TC_NEXT;
    }
    match filter_check(&ctx) {
        Ok(Some(c)) if c.is_drop() => TC_ACT_SHOT,
        _ => TC_NEXT,
    }
}

/// Bytes of a frame the filter reads: headers, then the farthest of the
/// community id and a relayed transport message's head.
const FILTER_CHECKED_LEN: usize = PAYLOAD_AT + wire::RELAY_HDR_LEN + 8;

/// The filter's counter for a frame, counted; `None` for a frame it does not
/// examine (passed).
#[inline(always)]
fn filter_check<F: Frame>(f: &F) -> Result<Option<FilterCounter>, ()> {
    let counter = filter_counter(f)?;
    if let Some(c) = counter {
        if let Some(slot) = MVC_FILTER_STATS.get_ptr_mut(c as u32) {
            // SAFETY: as in `count`: this CPU's element of a per-CPU array.
            unsafe { *slot += 1 };
        }
    }
    Ok(counter)
}

/// Version byte, a type an edge receives, its minimum length, the community
/// id where the message carries one, and the receiver session index of a
/// transport message, direct or inside a Relay. Frames that are not IPv4/UDP
/// to the edge's port, and IP fragments, pass unexamined (`None`). The length
/// checked is the UDP length field's (a GSO batch's head carries the first
/// datagram's headers, and only the first datagram's session index is read).
#[inline(always)]
fn filter_counter<F: Frame>(f: &F) -> Result<Option<FilterCounter>, ()> {
    let Some((_, udph)) = ipv4_udp_headers(f)? else {
        return Ok(None);
    };
    let Some(cfg) = MVC_FILTER_CONFIG.get(0) else {
        return Ok(None);
    };
    if udph[2..4] != cfg[0..2] {
        return Ok(None);
    }
    let udp_len = usize::from(u16::from_be_bytes([udph[4], udph[5]]));
    if udp_len < UDP_HLEN {
        return Ok(None);
    }
    let len = udp_len - UDP_HLEN;
    if len < 2 {
        return Ok(Some(FilterCounter::DropTruncated));
    }
    let head: *const [u8; 2] = pkt_ptr(f, PAYLOAD_AT)?;
    // SAFETY: bounds checked by `pkt_ptr`.
    let head = unsafe { *head };
    if head[0] != wire::VERSION {
        return Ok(Some(FilterCounter::DropBadVersion));
    }
    let Some((min, has_community)) = edge_rx_min(head[1]) else {
        return Ok(Some(FilterCounter::DropUnknownType));
    };
    if len < min {
        return Ok(Some(FilterCounter::DropTruncated));
    }
    if has_community {
        let c: *const [u8; 16] = pkt_ptr(f, PAYLOAD_AT + wire::COMMUNITY_AT)?;
        // SAFETY: bounds checked by `pkt_ptr`.
        if unsafe { *c } != cfg[4..20] {
            return Ok(Some(FilterCounter::DropWrongCommunity));
        }
    }
    // The receiver index of a transport message, direct or relayed (each read
    // at a constant offset, which the verifier follows most simply).
    let index: [u8; 4] = if is_transport(head[1]) {
        let i: *const [u8; 4] = pkt_ptr(f, PAYLOAD_AT + wire::INDEX_AT)?;
        // SAFETY: bounds checked by `pkt_ptr`.
        unsafe { *i }
    } else if head[1] == wire::TYPE_RELAY && len >= wire::RELAY_HDR_LEN + wire::TRANSPORT_HDR_LEN {
        let inner: *const [u8; 8] = pkt_ptr(f, PAYLOAD_AT + wire::RELAY_HDR_LEN)?;
        // SAFETY: bounds checked by `pkt_ptr`.
        let inner = unsafe { *inner };
        if inner[0] != wire::VERSION || !is_transport(inner[1]) {
            return Ok(Some(FilterCounter::Passed));
        }
        [inner[4], inner[5], inner[6], inner[7]]
    } else {
        return Ok(Some(FilterCounter::Passed));
    };
    if cfg[2] & FILTER_FLAG_SESSIONS == 0 {
        return Ok(Some(FilterCounter::PassedUnchecked));
    }
    // SAFETY: the value is a plain byte, never read; the key is on the stack.
    if unsafe { MVC_FILTER_SESSIONS.get(&index) }.is_none() {
        return Ok(Some(FilterCounter::DropUnknownSession));
    }
    Ok(Some(FilterCounter::Passed))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
