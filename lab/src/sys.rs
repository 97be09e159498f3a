//! The few system calls of the lab that libstd does not wrap: who we are (`geteuid`),
//! entering a namespace (`setns`), signalling a process by PID (`kill`), binding a socket
//! to a device, the clock tick of /proc, a raw packet socket that sends batches of one
//! frame, and a tc program that clones marked frames on their way out (the junk floods,
//! [`crate::flood`]). Every `unsafe` of the lab is here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A failed system call: which one, and the OS error.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {source}")]
pub struct SysError {
    /// The call (or socket option) that failed.
    pub call: &'static str,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

impl SysError {
    /// The error of `call` from `errno`.
    pub fn last(call: &'static str) -> SysError {
        SysError {
            call,
            source: io::Error::last_os_error(),
        }
    }
}

/// True when the process runs with effective user id 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Moves the calling thread into the network namespace open at `fd`.
pub fn setns_net(fd: RawFd) -> Result<(), SysError> {
    // SAFETY: setns only reads its integer arguments; `fd` is an open namespace file owned
    // by the caller for the duration of the call. It changes the calling thread only.
    let r = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    if r == 0 {
        Ok(())
    } else {
        Err(SysError::last("setns"))
    }
}

/// Sends signal `sig` to process `pid`. Refuses PIDs that are not positive (0 and -1
/// would signal a process group or every process), so a bad PID cannot hit more than
/// one process.
pub fn kill(pid: u32, sig: libc::c_int) -> Result<(), SysError> {
    let pid = match libc::pid_t::try_from(pid) {
        Ok(p) if p > 0 => p,
        _ => {
            return Err(SysError {
                call: "kill",
                source: io::Error::from(io::ErrorKind::InvalidInput),
            })
        }
    };
    // SAFETY: kill has no memory-safety preconditions; the pid is positive, so it names
    // one process. The callers only pass processes they started (or that run inside
    // namespaces they made).
    let r = unsafe { libc::kill(pid, sig) };
    if r == 0 {
        Ok(())
    } else {
        Err(SysError::last("kill"))
    }
}

/// Binds a socket to a device (`SO_BINDTODEVICE`).
pub fn bind_to_device(fd: RawFd, ifname: &str) -> Result<(), SysError> {
    let name = ifname.as_bytes();
    let len = libc::socklen_t::try_from(name.len()).map_err(|_| SysError {
        call: "SO_BINDTODEVICE",
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: the pointer and length describe `name`, which lives across the call; the
    // kernel copies at most `len` bytes from it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(SysError::last("SO_BINDTODEVICE"))
    }
}

/// Clock ticks per second of /proc's CPU times (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads its integer argument.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

fn invalid(call: &'static str) -> SysError {
    SysError {
        call,
        source: io::Error::from(io::ErrorKind::InvalidInput),
    }
}

/// The index of interface `ifname` in the calling thread's namespace.
pub fn ifindex(ifname: &str) -> Result<u32, SysError> {
    let cname = std::ffi::CString::new(ifname).map_err(|_| invalid("if_nametoindex"))?;
    // SAFETY: `cname` is a NUL-terminated string that lives across the call.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(SysError::last("if_nametoindex"));
    }
    Ok(ifindex)
}

/// How a packet socket's frames reach the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketPath {
    /// Straight to the device's queue (`PACKET_QDISC_BYPASS`): no qdisc, no tc hooks.
    Direct,
    /// Through the device's egress (qdisc and tc programs), as routed traffic goes.
    Egress,
}

/// An `AF_PACKET` socket bound to interface `ifname` of the calling thread's namespace,
/// sending frames by `path`.
pub fn packet_socket(ifname: &str, path: PacketPath) -> Result<OwnedFd, SysError> {
    let ifindex = ifindex(ifname)?;
    // SAFETY: socket only reads its integer arguments.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(SysError::last("socket(AF_PACKET)"));
    }
    // SAFETY: `raw` is a socket just opened here and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = (path == PacketPath::Direct).into();
    // SAFETY: the pointer and length describe `one`, which lives across the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            std::ptr::from_ref(&one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(SysError::last("PACKET_QDISC_BYPASS"));
    }
    // SAFETY: an all-zero sockaddr_ll is a valid value (plain integers).
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: the pointer and length describe `sll`, which lives across the call.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(SysError::last("bind(AF_PACKET)"));
    }
    Ok(fd)
}

/// Sends `frame` `n` times (at most 1024) in one `sendmmsg` on a packet socket; returns
/// how many the kernel took.
pub fn send_frame_batch(fd: &OwnedFd, frame: &[u8], n: usize) -> Result<usize, SysError> {
    let n = n.min(1024);
    let mut iov = libc::iovec {
        iov_base: frame.as_ptr() as *mut libc::c_void,
        iov_len: frame.len(),
    };
    // SAFETY: an all-zero mmsghdr is a valid value (null pointers, zero lengths).
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; n];
    for m in &mut msgs {
        m.msg_hdr.msg_iov = &mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: every header points at `iov`, which describes `frame`; both live across the
    // call, and for a send the kernel only reads them.
    let r = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), n as libc::c_uint, 0) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN)) {
            return Ok(0);
        }
        return Err(SysError {
            call: "sendmmsg",
            source: e,
        });
    }
    Ok(r as usize)
}

/// `bpf(2)` commands and constants of the cloning flood (linux/bpf.h).
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_LINK_CREATE: libc::c_int = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_EGRESS: u32 = 47;
const BPF_FUNC_CLONE_REDIRECT: i32 = 13;
/// `offsetof(struct __sk_buff, mark)`.
const SKB_MARK: i16 = 8;
/// Most clones one program makes of a seed (4 instructions each, far under the
/// verifier's limit).
pub const MAX_CLONES: u32 = 1024;

/// The head of `union bpf_attr` for `BPF_PROG_LOAD`, up to the fields used here (the
/// kernel zero-fills the rest of a shorter attribute).
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for `BPF_LINK_CREATE` with a device target (tcx).
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    /// tcx's `relative_fd`/`relative_id`, `expected_revision` and padding: all zero.
    rest: [u64; 4],
}

/// One eBPF instruction, encoded as the kernel reads it (`struct bpf_insn`: opcode,
/// destination and source register nibbles, offset, immediate).
fn bpf_insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut i = [0u8; 8];
    i[0] = code;
    i[1] = (src << 4) | (dst & 0x0f);
    i[2..4].copy_from_slice(&off.to_le_bytes());
    i[4..8].copy_from_slice(&imm.to_le_bytes());
    i
}

/// The cloning program: a frame leaving with `skb->mark == seed_mark` (a seed) gets its
/// mark cleared and is cloned `clones` times out of interface `ifindex`
/// (`bpf_clone_redirect`, egress), then passes itself; every other frame passes
/// untouched (so the interface's own traffic is not multiplied).
fn seed_cloner(ifindex: u32, seed_mark: u32, clones: u32) -> Vec<[u8; 8]> {
    const MOV64_REG: u8 = 0xbf;
    const MOV64_IMM: u8 = 0xb7;
    const LDX_W: u8 = 0x61;
    const STX_W: u8 = 0x63;
    const JNE_IMM: u8 = 0x55;
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    let clone = [
        bpf_insn(MOV64_REG, 1, 6, 0, 0),
        bpf_insn(MOV64_IMM, 2, 0, 0, ifindex as i32),
        bpf_insn(MOV64_IMM, 3, 0, 0, 0),
        bpf_insn(CALL, 0, 0, 0, BPF_FUNC_CLONE_REDIRECT),
    ];
    let clones = clones.min(MAX_CLONES) as usize;
    let body = clones * clone.len();
    let mut p = vec![
        // r6 = skb; r0 = skb->mark; not a seed: pass.
        bpf_insn(MOV64_REG, 6, 1, 0, 0),
        bpf_insn(LDX_W, 0, 6, SKB_MARK, 0),
        bpf_insn(JNE_IMM, 0, 0, (body + 2) as i16, seed_mark as i32),
        // skb->mark = 0: the clones are not seeds.
        bpf_insn(MOV64_IMM, 1, 0, 0, 0),
        bpf_insn(STX_W, 6, 1, SKB_MARK, 0),
    ];
    for _ in 0..clones {
        p.extend(clone);
    }
    // TCX_PASS.
    p.push(bpf_insn(MOV64_IMM, 0, 0, 0, 0));
    p.push(bpf_insn(EXIT, 0, 0, 0, 0));
    p
}

/// Loads the cloning program as a tc program (`BPF_PROG_TYPE_SCHED_CLS` for tcx egress):
/// a frame leaving with `skb->mark == seed_mark` gets its mark cleared and is cloned
/// `clones` times (at most [`MAX_CLONES`]) out of interface `ifindex`; every other frame
/// passes untouched.
pub fn load_seed_cloner(ifindex: u32, seed_mark: u32, clones: u32) -> Result<OwnedFd, SysError> {
    const CALL: &str = "bpf(BPF_PROG_LOAD)";
    let insns = seed_cloner(ifindex, seed_mark, clones);
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    prog_name[..10].copy_from_slice(b"lab_cloner");
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: u32::try_from(insns.len()).map_err(|_| invalid(CALL))?,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type: BPF_TCX_EGRESS,
    };
    // SAFETY: `attr` and the instructions and license it points at live across the call;
    // the kernel reads `size_of::<ProgLoadAttr>()` bytes of `attr` and `insn_cnt`
    // instructions of 8 bytes, and writes nothing back (no log buffer).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            std::ptr::from_ref(&attr),
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    owned_fd(r, CALL)
}

/// Attaches tc program `prog` to the egress of interface `ifindex` (calling thread's
/// namespace) with a tcx link (kernel >= 6.6); dropping the returned link detaches it.
pub fn tcx_attach_egress(prog: &OwnedFd, ifindex: u32) -> Result<OwnedFd, SysError> {
    const CALL: &str = "bpf(BPF_LINK_CREATE, tcx egress)";
    let attr = LinkCreateAttr {
        prog_fd: u32::try_from(prog.as_raw_fd()).map_err(|_| invalid(CALL))?,
        target_ifindex: ifindex,
        attach_type: BPF_TCX_EGRESS,
        flags: 0,
        rest: [0; 4],
    };
    // SAFETY: `attr` lives across the call; the kernel reads its
    // `size_of::<LinkCreateAttr>()` bytes and writes nothing back.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            std::ptr::from_ref(&attr),
            std::mem::size_of::<LinkCreateAttr>(),
        )
    };
    owned_fd(r, CALL)
}

/// The descriptor a successful `bpf(2)` returned, or the error of `call`.
fn owned_fd(r: libc::c_long, call: &'static str) -> Result<OwnedFd, SysError> {
    if r < 0 {
        return Err(SysError::last(call));
    }
    let raw = RawFd::try_from(r).map_err(|_| invalid(call))?;
    // SAFETY: a successful bpf(2) that creates an object returns a new descriptor owned
    // by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Sets the mark of the frames a socket sends (`SO_MARK`, needs CAP_NET_ADMIN).
pub fn set_mark(fd: &OwnedFd, mark: u32) -> Result<(), SysError> {
    // SAFETY: the pointer and length describe `mark`, which lives across the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            std::ptr::from_ref(&mark).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(SysError::last("SO_MARK"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_refuses_group_pids() {
        for pid in [0, u32::MAX, 1 << 31] {
            let e = kill(pid, 0).expect_err("must refuse");
            assert_eq!(e.source.kind(), io::ErrorKind::InvalidInput, "{pid}");
        }
        // Signal 0 checks that a process exists: this one does.
        kill(std::process::id(), 0).expect("own pid");
    }

    #[test]
    fn cloner_encodes_as_the_kernel_reads_it() {
        // r0 = *(u32 *)(r6 + 8): opcode, dst 0 / src 6, offset 8.
        assert_eq!(bpf_insn(0x61, 0, 6, 8, 0), [0x61, 0x60, 8, 0, 0, 0, 0, 0]);
        let p = seed_cloner(7, 0x5eed, 3);
        assert_eq!(p.len(), 5 + 3 * 4 + 2);
        // The seed test jumps over the clones to `r0 = 0; exit`.
        let jump = i16::from_le_bytes([p[2][2], p[2][3]]) as usize;
        assert_eq!(3 + jump, p.len() - 2);
        assert_eq!(p[6][4..8], 7i32.to_le_bytes(), "clones go out of ifindex 7");
        assert_eq!(
            seed_cloner(7, 1, u32::MAX).len(),
            5 + MAX_CLONES as usize * 4 + 2
        );
        assert_eq!(std::mem::size_of::<ProgLoadAttr>(), 72);
        assert_eq!(std::mem::size_of::<LinkCreateAttr>(), 48);
    }
}
