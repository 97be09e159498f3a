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
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{PerCpuArray, XskMap},
    programs::XdpContext,
};
use dataplane_ebpf_common::{is_link_local, Counter, COUNTERS, ETH_HLEN, MAX_QUEUES};

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
