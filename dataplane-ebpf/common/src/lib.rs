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

/// What the program did with a frame. The value is the index in the per-CPU
/// `u64` array [`STATS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Handed to an AF_XDP socket.
    Redirected = 0,
    /// Shorter than an Ethernet header: passed to the kernel (which drops it).
    PassedShort = 1,
    /// IEEE 802.1D link-local control frame (01:80:c2:00:00:0x, e.g. STP,
    /// LACP, LLDP): belongs to the local link, never into the overlay.
    PassedLinkLocal = 2,
    /// No AF_XDP socket bound to this rx queue: passed to the kernel.
    PassedNoSocket = 3,
}

/// Number of [`Counter`] slots in [`STATS_MAP`].
pub const COUNTERS: u32 = 4;

impl Counter {
    /// All counters, in index order.
    pub const ALL: [Counter; COUNTERS as usize] = [
        Counter::Redirected,
        Counter::PassedShort,
        Counter::PassedLinkLocal,
        Counter::PassedNoSocket,
    ];

    /// Stable name used in metrics and status output.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::PassedShort => "passed_short",
            Counter::PassedLinkLocal => "passed_link_local",
            Counter::PassedNoSocket => "passed_no_socket",
        }
    }
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
    }
}
