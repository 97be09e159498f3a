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
    bindings::{bpf_fib_lookup as FibLookup, xdp_action},
    helpers::generated::{bpf_fib_lookup, bpf_ktime_get_ns},
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, XskMap},
    programs::XdpContext,
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

#[inline(always)]
fn relay_count(counter: RelayCounter, n: u64) {
    if let Some(slot) = MVC_RELAY_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: as in `count`: this CPU's element of a per-CPU array, alive
        // for the program's run and written by no other context.
        unsafe { *slot += n };
    }
}

#[inline(always)]
fn pass(counter: RelayCounter) -> Result<u32, ()> {
    relay_count(counter, 1);
    Ok(xdp_action::XDP_PASS)
}

#[inline(always)]
fn drop(counter: RelayCounter) -> Result<u32, ()> {
    relay_count(counter, 1);
    Ok(xdp_action::XDP_DROP)
}

/// [`ptr_at`] with the frame's bounds read afresh (volatile loads): the
/// relay program also compares the UDP length against the frame, and the
/// compiler would otherwise drop this check as implied by that one, which the
/// verifier (tracking packet pointers, not the arithmetic) cannot follow.
#[inline(always)]
fn pkt_ptr<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ()> {
    // SAFETY: `ctx.ctx` points at the program's `xdp_md`, valid for its run.
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
        )
    };
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
/// `BPF_FIB_LOOKUP_OUTPUT`: route as the host's own output would, from the
/// ingress interface (no forwarding sysctl needed).
const FIB_LOOKUP_OUTPUT: u32 = 2;
const FIB_SUCCESS: i64 = 0;
/// TTL of a relayed datagram, as of one the supernode's socket would send.
const RELAY_TTL: u8 = 64;

/// Ones' complement sum of the 20-byte IPv4 header at `ip`, folded.
#[inline(always)]
fn ip_checksum(ip: *const [u16; 10]) -> u16 {
    // SAFETY: the caller checked that 20 bytes at `ip` lie inside the frame;
    // `read_unaligned` needs no alignment.
    let words = unsafe { core::ptr::read_unaligned(ip) };
    let mut sum: u32 = 0;
    // Unrolled by the compiler: a constant bound of 10.
    for w in words {
        sum += u32::from(w);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The IPv4 and UDP headers of a frame, copied out; `None` for a frame that is
/// not IPv4/UDP or that carries IP options or is a fragment (those are left to
/// the kernel). The UDP header's length field is not checked here.
#[inline(always)]
fn ipv4_udp_headers(ctx: &XdpContext) -> Result<Option<([u8; IP_HLEN], [u8; UDP_HLEN])>, ()> {
    let ethertype: *const [u8; 2] = pkt_ptr(ctx, 12)?;
    // SAFETY: `pkt_ptr` checked the bounds (also for every read below).
    if u16::from_be_bytes(unsafe { *ethertype }) != ETH_P_IP {
        return Ok(None);
    }
    let ip: *const [u8; IP_HLEN] = pkt_ptr(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by `pkt_ptr`.
    let iph = unsafe { *ip };
    // Options (IHL above 5) or fragments: left to the kernel.
    if iph[0] != 0x45 || iph[9] != IPPROTO_UDP || (iph[6] & 0x3f) != 0 || iph[7] != 0 {
        return Ok(None);
    }
    let udp: *const [u8; UDP_HLEN] = pkt_ptr(ctx, UDP_AT)?;
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

/// A Relay or Bcast from an unvalidated source: passed on within the prompt
/// limits (`prompt_pass`), else dropped and counted as `counter`.
#[inline(always)]
fn unvalidated(
    iph: &[u8; IP_HLEN],
    udph: &[u8; UDP_HLEN],
    counter: RelayCounter,
) -> Result<u32, ()> {
    if prompt_pass(iph, udph) {
        return pass(RelayCounter::PassedUnknownSource);
    }
    drop(counter)
}

/// The supernode's checks and relay, for IPv4 datagrams to its port:
///
/// * junk (wrong version, unknown type, shorter than its type's fixed part)
///   is dropped and counted;
/// * a Relay or Bcast whose source edge is not validated (when the map holds
///   every validated edge) or that comes from another address than the one
///   the edge registered from is dropped and counted: relaying it would make
///   the supernode a reflector for spoofed datagrams (except the few that the
///   supernode answers with a prompt to register, `prompt_pass`);
/// * a Relay carrying a Data message to a validated edge is rewritten (our
///   address and port as the source, the edge's as the destination, MACs
///   from the kernel's FIB and neighbour table) and sent back out of the
///   same interface (`XDP_TX`);
/// * everything else goes on to the socket (`XDP_PASS`), as without the
///   program.
#[inline(always)]
fn try_mvc_relay(ctx: &XdpContext) -> Result<u32, ()> {
    let Some((iph, udph)) = ipv4_udp_headers(ctx)? else {
        return Ok(xdp_action::XDP_PASS);
    };
    let Some(cfg) = MVC_RELAY_CONFIG.get(0) else {
        return Ok(xdp_action::XDP_PASS);
    };
    if udph[2..4] != cfg[0..2] {
        return Ok(xdp_action::XDP_PASS);
    }
    if cfg[4..8] != [0, 0, 0, 0] && iph[16..20] != cfg[4..8] {
        return Ok(xdp_action::XDP_PASS);
    }
    let udp_len = usize::from(u16::from_be_bytes([udph[4], udph[5]]));
    if udp_len < UDP_HLEN || ctx.data() + UDP_AT + udp_len > ctx.data_end() {
        // A length the kernel will refuse: let it.
        return Ok(xdp_action::XDP_PASS);
    }
    let len = udp_len - UDP_HLEN;
    if len < 2 {
        return drop(RelayCounter::DropTruncated);
    }
    let head: *const [u8; 2] = pkt_ptr(ctx, PAYLOAD_AT)?;
    // SAFETY: bounds checked by `pkt_ptr`.
    let head = unsafe { *head };
    if head[0] != wire::VERSION {
        return drop(RelayCounter::DropBadVersion);
    }
    let min = match head[1] {
        wire::TYPE_REGISTER => wire::REGISTER_MIN_LEN,
        wire::TYPE_RELAY => wire::RELAY_MIN_LEN,
        wire::TYPE_BCAST => wire::BCAST_MIN_LEN,
        _ => return drop(RelayCounter::DropUnknownType),
    };
    if len < min {
        return drop(RelayCounter::DropTruncated);
    }
    if head[1] == wire::TYPE_REGISTER {
        // Registrations prove their address with the cookie, in userspace.
        return pass(RelayCounter::Passed);
    }
    // Relay and Bcast: community ‖ source edge id lie next to each other.
    let src_key: *const [u8; RELAY_KEY_LEN] = pkt_ptr(ctx, PAYLOAD_AT + wire::COMMUNITY_AT)?;
    // SAFETY: bounds checked by `pkt_ptr`; map keys are copied by the kernel.
    let src_key = unsafe { *src_key };
    // SAFETY: the map value is plain bytes that userspace replaces whole.
    let Some(src) = (unsafe { MVC_RELAY_EDGES.get(&src_key) }) else {
        if cfg[2] & RELAY_FLAG_COMPLETE != 0 {
            return unvalidated(&iph, &udph, RelayCounter::DropUnknownEdge);
        }
        return pass(RelayCounter::Passed);
    };
    if iph[12..16] != src[0..4] || udph[0..2] != src[4..6] {
        return unvalidated(&iph, &udph, RelayCounter::DropSpoofed);
    }
    if head[1] != wire::TYPE_RELAY || len < wire::RELAY_HDR_LEN + wire::TRANSPORT_HDR_LEN {
        return pass(RelayCounter::Passed);
    }
    let inner: *const [u8; 2] = pkt_ptr(ctx, PAYLOAD_AT + wire::RELAY_HDR_LEN)?;
    // SAFETY: bounds checked by `pkt_ptr`.
    let inner = unsafe { *inner };
    if inner[0] != wire::VERSION || inner[1] != wire::TYPE_DATA {
        return pass(RelayCounter::Passed);
    }
    let dst_id: *const [u8; 8] = pkt_ptr(ctx, PAYLOAD_AT + wire::DST_AT)?;
    // SAFETY: bounds checked by `pkt_ptr`.
    let dst_id = unsafe { *dst_id };
    if dst_id == src_key[16..24] {
        return pass(RelayCounter::Passed);
    }
    let mut dst_key = src_key;
    dst_key[16..24].copy_from_slice(&dst_id);
    // SAFETY: as for `src`.
    let Some(dst) = (unsafe { MVC_RELAY_EDGES.get(&dst_key) }) else {
        // Not validated (or not IPv4): userspace counts the drop.
        return pass(RelayCounter::Passed);
    };
    let dst = *dst;

    // SAFETY: an all-zero `bpf_fib_lookup` is a valid value (plain integers).
    let mut fib: FibLookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = IPPROTO_UDP;
    fib.sport = u16::from_ne_bytes([udph[2], udph[3]]);
    fib.dport = u16::from_ne_bytes([dst[4], dst[5]]);
    fib.__bindgen_anon_1.tot_len = u16::from_be_bytes([iph[2], iph[3]]);
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib.__bindgen_anon_2.tos = iph[1];
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([iph[16], iph[17], iph[18], iph[19]]);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([dst[0], dst[1], dst[2], dst[3]]);
    // SAFETY: `fib` is a valid, writable `bpf_fib_lookup` of the size passed;
    // `ctx.ctx` is the program's context.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut fib,
            core::mem::size_of::<FibLookup>() as i32,
            FIB_LOOKUP_OUTPUT,
        )
    };
    if rc != FIB_SUCCESS || fib.ifindex != ctx.ingress_ifindex() as u32 {
        return pass(RelayCounter::PassedNoRoute);
    }

    let eth: *mut [u8; 12] = pkt_ptr(ctx, 0)?;
    let ipm: *mut [u8; IP_HLEN] = pkt_ptr(ctx, ETH_HLEN)?;
    let udpm: *mut [u8; UDP_HLEN] = pkt_ptr(ctx, UDP_AT)?;
    let mut e = [0u8; 12];
    e[0..6].copy_from_slice(&fib.dmac);
    e[6..12].copy_from_slice(&fib.smac);
    let mut h = iph;
    // New source: the address and port the datagram was sent to (ours).
    h[12..16].copy_from_slice(&iph[16..20]);
    h[16..20].copy_from_slice(&dst[0..4]);
    h[8] = RELAY_TTL;
    h[10] = 0;
    h[11] = 0;
    let mut u = udph;
    u[0..2].copy_from_slice(&udph[2..4]);
    u[2..4].copy_from_slice(&dst[4..6]);
    // No UDP checksum (allowed for IPv4): the payload is authenticated by the
    // edges' AEAD, and a received partial checksum could not be completed.
    u[6] = 0;
    u[7] = 0;
    // SAFETY: the three pointers were bounds-checked by `pkt_ptr`; the
    // frame is writable in XDP and nothing else refers to it.
    unsafe {
        *eth = e;
        *udpm = u;
        *ipm = h;
        let sum = ip_checksum(ipm as *const [u16; 10]);
        let ck = sum.to_ne_bytes();
        (*ipm)[10] = ck[0];
        (*ipm)[11] = ck[1];
    }
    relay_count(RelayCounter::Relayed, 1);
    relay_count(RelayCounter::RelayedBytes, len as u64);
    Ok(xdp_action::XDP_TX)
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
    match try_mvc_filter(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn filter_verdict(counter: FilterCounter) -> Result<u32, ()> {
    if let Some(slot) = MVC_FILTER_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: as in `count`: this CPU's element of a per-CPU array.
        unsafe { *slot += 1 };
    }
    Ok(if counter.is_drop() {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    })
}

/// Version byte, a type an edge receives, its minimum length, the community
/// id where the message carries one, and the receiver session index of a
/// transport message, direct or inside a Relay. Frames that are not IPv4/UDP
/// to the edge's port, and IP fragments, pass unexamined. The length checked
/// is the UDP length field's (a GSO batch's head carries the first datagram's
/// headers, and only the first datagram's session index is read).
#[inline(always)]
fn try_mvc_filter(ctx: &XdpContext) -> Result<u32, ()> {
    let Some((_, udph)) = ipv4_udp_headers(ctx)? else {
        return Ok(xdp_action::XDP_PASS);
    };
    let Some(cfg) = MVC_FILTER_CONFIG.get(0) else {
        return Ok(xdp_action::XDP_PASS);
    };
    if udph[2..4] != cfg[0..2] {
        return Ok(xdp_action::XDP_PASS);
    }
    let udp_len = usize::from(u16::from_be_bytes([udph[4], udph[5]]));
    if udp_len < UDP_HLEN {
        return Ok(xdp_action::XDP_PASS);
    }
    let len = udp_len - UDP_HLEN;
    if len < 2 {
        return filter_verdict(FilterCounter::DropTruncated);
    }
    let head: *const [u8; 2] = pkt_ptr(ctx, PAYLOAD_AT)?;
    // SAFETY: bounds checked by `pkt_ptr`.
    let head = unsafe { *head };
    if head[0] != wire::VERSION {
        return filter_verdict(FilterCounter::DropBadVersion);
    }
    let Some((min, has_community)) = edge_rx_min(head[1]) else {
        return filter_verdict(FilterCounter::DropUnknownType);
    };
    if len < min {
        return filter_verdict(FilterCounter::DropTruncated);
    }
    if has_community {
        let c: *const [u8; 16] = pkt_ptr(ctx, PAYLOAD_AT + wire::COMMUNITY_AT)?;
        // SAFETY: bounds checked by `pkt_ptr`.
        if unsafe { *c } != cfg[4..20] {
            return filter_verdict(FilterCounter::DropWrongCommunity);
        }
    }
    // The receiver index of a transport message, direct or relayed (each read
    // at a constant offset, which the verifier follows most simply).
    let index: [u8; 4] = if is_transport(head[1]) {
        let i: *const [u8; 4] = pkt_ptr(ctx, PAYLOAD_AT + wire::INDEX_AT)?;
        // SAFETY: bounds checked by `pkt_ptr`.
        unsafe { *i }
    } else if head[1] == wire::TYPE_RELAY && len >= wire::RELAY_HDR_LEN + wire::TRANSPORT_HDR_LEN {
        let inner: *const [u8; 8] = pkt_ptr(ctx, PAYLOAD_AT + wire::RELAY_HDR_LEN)?;
        // SAFETY: bounds checked by `pkt_ptr`.
        let inner = unsafe { *inner };
        if inner[0] != wire::VERSION || !is_transport(inner[1]) {
            return filter_verdict(FilterCounter::Passed);
        }
        [inner[4], inner[5], inner[6], inner[7]]
    } else {
        return filter_verdict(FilterCounter::Passed);
    };
    if cfg[2] & FILTER_FLAG_SESSIONS == 0 {
        return filter_verdict(FilterCounter::PassedUnchecked);
    }
    // SAFETY: the value is a plain byte, never read; the key is on the stack.
    if unsafe { MVC_FILTER_SESSIONS.get(&index) }.is_none() {
        return filter_verdict(FilterCounter::DropUnknownSession);
    }
    filter_verdict(FilterCounter::Passed)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
