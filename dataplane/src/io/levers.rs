//! io_uring features beyond plain reads and receives, each used only where the kernel has
//! it (probed once at start) and the operator did not turn it off (`mvc edge
//! --uring-off`, for measuring one against the other and for kernels that misbehave):
//!
//! - `fixed-reads`: the TAP read buffers are registered with the ring
//!   (`IORING_REGISTER_BUFFERS`) and read with `READ_FIXED`: no page lookup and no
//!   user-copy checks per read.
//! - `multishot`: one armed multishot `recvmsg` over a provided-buffer ring receives
//!   every datagram (and GRO batch) instead of a `recvmsg` re-armed per datagram
//!   (`io::multishot`).
//!
//! A forwarder whose ring refuses a feature at run time (a registration fails) turns it
//! off for itself, says so once in the log, and its status `io` line shows it off.
//!
//! Measured and left out (docs/BENCH.md, "io_uring levers"): zero-copy sends of GSO
//! batches (`IORING_OP_SENDMSG_ZC`). Where the peer's socket is on the same kernel (a
//! veth lab, a host's own VMs) the kernel copies every such send at the veth anyway,
//! and the pinning and the second completion per send made the encrypted path slower.

use io_uring::{opcode, IoUring, Probe};

use super::IoError;

/// The features, as names for `--uring-off` and for the status line.
pub const NAMES: [&str; 2] = ["fixed-reads", "multishot"];

/// Which features a forwarder uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Levers {
    /// Registered TAP read buffers.
    pub fixed_reads: bool,
    /// Multishot UDP receive.
    pub multishot: bool,
}

impl Levers {
    /// Every feature on (before probing).
    pub const ALL: Self = Self {
        fixed_reads: true,
        multishot: true,
    };

    /// Every feature off.
    pub const NONE: Self = Self {
        fixed_reads: false,
        multishot: false,
    };

    /// `ALL` without the features named in `off` (comma-separated names of [`NAMES`],
    /// or `all`); an unknown name is an error.
    pub fn without(off: &str) -> Result<Self, IoError> {
        let mut l = Self::ALL;
        for name in off.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match name {
                "all" => l = Self::NONE,
                "fixed-reads" => l.fixed_reads = false,
                "multishot" => l.multishot = false,
                _ => {
                    return Err(IoError::Invalid(format!(
                        "--uring-off {name}: not one of all, {}",
                        NAMES.join(", ")
                    )))
                }
            }
        }
        Ok(l)
    }

    /// What the kernel offers of `self`: the opcodes are looked up in the ring's probe
    /// (a kernel without `IORING_REGISTER_PROBE` offers none of them).
    pub fn probe(self) -> Self {
        let mut probe = Probe::new();
        let known = IoUring::new(2)
            .and_then(|r| r.submitter().register_probe(&mut probe))
            .is_ok();
        Self {
            fixed_reads: self.fixed_reads && known && probe.is_supported(opcode::ReadFixed::CODE),
            // Multishot receive came in 6.0 and has no opcode of its own: SENDMSG_ZC
            // (6.1) stands for it; a ring that refuses the buffer ring turns it off again.
            multishot: self.multishot && known && probe.is_supported(opcode::SendMsgZc::CODE),
        }
    }

    /// The part of the status `io` line about these features.
    pub fn describe(&self) -> String {
        format!(
            "fixed-reads {}; multishot-recv {}",
            on(self.fixed_reads),
            on(self.multishot)
        )
    }
}

/// "on" or "off".
pub fn on(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_names_features_and_refuses_unknown_ones() {
        assert_eq!(Levers::without("").unwrap(), Levers::ALL);
        assert_eq!(Levers::without("all").unwrap(), Levers::NONE);
        let l = Levers::without("multishot").unwrap();
        assert!(l.fixed_reads && !l.multishot);
        let l = Levers::without(" fixed-reads , multishot").unwrap();
        assert_eq!(l, Levers::NONE);
        let e = Levers::without("multishot,send-zc")
            .unwrap_err()
            .to_string();
        assert!(e.contains("send-zc") && e.contains("fixed-reads"), "{e}");
    }

    #[test]
    fn probe_never_turns_on_what_was_off() {
        assert_eq!(Levers::NONE.probe(), Levers::NONE);
        let p = Levers::ALL.probe();
        let l = Levers::without("multishot").unwrap().probe();
        assert!(!l.multishot);
        assert_eq!(l.fixed_reads, p.fixed_reads);
    }

    #[test]
    fn describe_says_what_is_on() {
        let l = Levers::without("fixed-reads").unwrap();
        assert_eq!(l.describe(), "fixed-reads off; multishot-recv on");
        assert_eq!(
            Levers::NONE.describe(),
            "fixed-reads off; multishot-recv off"
        );
    }
}
