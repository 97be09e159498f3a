//! XDP/AF_XDP datapath: the edge's frame source and sink on the VM bridge
//! without a TAP device.
//!
//! [`XdpPort::open`] creates a veth pair (one end enslaved to the VM bridge),
//! loads the XDP program built from `dataplane-ebpf` and attaches it to the
//! other end (native mode where the driver has it, generic SKB mode
//! otherwise), creates an AF_XDP socket for rx queue 0 and registers it in the
//! program's XSKMAP. Frames the bridge sends to the port then land in the
//! socket's UMEM; [`XdpPort::recv_batch`] reads them in batches and
//! [`XdpPort::send_batch`] sends frames into the bridge through the TX ring.
//! [`XdpPort`] is pollable (`AsFd`, readable when frames are waiting), so the
//! edge's io_uring loop can `POLL_ADD` it next to the UDP socket.
//!
//! Cleanup: dropping the port detaches the program (a bpf_link owned by the
//! process: the kernel also detaches it when the process dies, kill -9
//! included), frees the maps and socket and deletes the veth pair. A veth left
//! by a killed edge is recognised by its alias and removed on the next start.
//! Nothing is pinned in bpffs.
//!
//! See docs/XDP.md for the design and measurements.

mod filter;
mod packet;
mod port;
mod relay;
mod xsk;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use aya::{
    maps::{MapData, PerCpuArray, XskMap},
    programs::{
        tc::{SchedClassifier, TcAttachOptions, TcAttachType},
        LinkOrder, Xdp, XdpMode,
    },
    Ebpf,
};
use dataplane_ebpf_common::{Counter, PROGRAM_NAME, STATS_MAP, XSKS_MAP};
use thiserror::Error;

pub use filter::{filter_tc_programs, XdpFilter};
pub use port::{
    enslave, link_info, remove_stale, sweep_stale, LinkInfo, PortError, VethPort, ALIAS_PREFIX,
};
pub use relay::{relay_tc_programs, XdpRelay};
pub use xsk::{BindMode, SysError, XskConfig, XskCounters, MAX_FRAME};

/// The XDP object file built by build.rs, if the BPF toolchain was there.
#[cfg(mvc_xdp_built)]
static PROGRAM: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/mvc-xdp"
)));
#[cfg(not(mvc_xdp_built))]
static PROGRAM: Option<&[u8]> = None;

/// Why the XDP datapath cannot be used on this host, or `Ok` if it may be
/// tried (attaching can still fail; [`XdpPort::open`] says why).
pub fn availability() -> Result<(), Error> {
    if PROGRAM.is_none() {
        #[cfg(not(mvc_xdp_built))]
        let reason = option_env!("MVC_XDP_UNAVAILABLE").unwrap_or("eBPF program not built");
        #[cfg(mvc_xdp_built)]
        let reason = "";
        return Err(Error::NotBuilt(reason.to_owned()));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::NotRoot);
    }
    Ok(())
}

/// Errors of the XDP datapath.
#[derive(Debug, Error)]
pub enum Error {
    /// This build has no XDP program.
    #[error("XDP program not built into this binary: {0}")]
    NotBuilt(String),
    /// Loading programs and creating AF_XDP sockets needs root (or
    /// CAP_BPF + CAP_NET_ADMIN + CAP_NET_RAW).
    #[error("XDP needs root (CAP_BPF, CAP_NET_ADMIN, CAP_NET_RAW)")]
    NotRoot,
    /// Creating or removing the veth port.
    #[error("XDP port: {0}")]
    Port(#[from] PortError),
    /// Loading the object or a map in it.
    #[error("loading XDP program: {0}")]
    Load(String),
    /// Attaching to the interface in any mode.
    #[error("attaching XDP program to {iface}: {msg}")]
    Attach {
        /// Interface.
        iface: String,
        /// Errors of each mode tried.
        msg: String,
    },
    /// The AF_XDP socket.
    #[error("AF_XDP socket: {0}")]
    Socket(#[from] SysError),
    /// `--datapath xdp` without an XDP port configuration.
    #[error("no XDP port configured")]
    NotConfigured,
    /// Not one of auto, tap, xdp.
    #[error("unknown datapath {0:?} (expected auto, tap or xdp)")]
    UnknownDatapath(String),
}

/// What `--datapath` asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DatapathRequest {
    /// The faster datapath by the rule of docs/XDP.md ([`AUTO_RULE`]): today
    /// the TAP device.
    #[default]
    Auto,
    /// The TAP device only.
    Tap,
    /// XDP only: failing to attach is an error.
    Xdp,
}

impl std::str::FromStr for DatapathRequest {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "auto" => Ok(Self::Auto),
            "tap" => Ok(Self::Tap),
            "xdp" => Ok(Self::Xdp),
            other => Err(Error::UnknownDatapath(other.to_owned())),
        }
    }
}

/// What `--datapath auto` takes, and why (docs/XDP.md, "Choosing the
/// datapath"): the TAP device. With its packet socket towards the VMs the
/// XDP port moves bulk TCP at about the TAP path's rate (0.83-1.18x) for as
/// much CPU per byte or more and about its ping RTT (1.01x); its one measured
/// gain, less CPU per small frame, does not make it the faster path, and a
/// TAP device needs nothing of the kernel's XDP. `--datapath xdp` gives XDP.
pub const AUTO_RULE: &str = "auto: the TAP device (the XDP port measured 0.83-1.18x its \
    bulk TCP at 1.0-1.1x its CPU per byte, and about its ping RTT; docs/XDP.md \
    \"Choosing the datapath\"); --datapath xdp to use XDP";

/// The frame source/sink the edge ended up with.
pub enum Datapath {
    /// The XDP port on the VM bridge (boxed: it is large and moves once).
    Xdp(Box<XdpPort>),
    /// The TAP device (opened by the caller).
    Tap,
}

impl Datapath {
    /// `"xdp"` or `"tap"`, as status shows it.
    pub fn name(&self) -> &'static str {
        match self {
            Datapath::Xdp(_) => "xdp",
            Datapath::Tap => "tap",
        }
    }
}

/// A datapath and why it was chosen (status' `datapath_reason`).
pub struct Choice {
    /// What to use.
    pub datapath: Datapath,
    /// Why, in words for the operator.
    pub reason: String,
}

/// Applies `--datapath`: `xdp` opens the port or fails; `auto` returns
/// [`Datapath::Tap`] with [`AUTO_RULE`] as the reason; `tap` returns
/// [`Datapath::Tap`]. `xdp` is `None` when there is nothing to configure the
/// port from.
pub fn choose(request: DatapathRequest, xdp: Option<&XdpPortConfig>) -> Result<Choice, Error> {
    let opened = |port: XdpPort, why: &str| {
        let reason = format!(
            "{why}: XDP {} mode on {}/{}{}{}{}{}{}",
            port.mode().as_str(),
            port.names().0,
            port.names().1,
            if port.multi_buffer() {
                ", multi-buffer"
            } else {
                ""
            },
            match port.more.len() {
                0 => String::new(),
                n => format!(", {} queues", n + 1),
            },
            if port.bridge_gro() {
                ", gro towards the bridge"
            } else {
                ""
            },
            if port.gso_mtu().is_some() {
                ", gso from the bridge"
            } else {
                ""
            },
            if port.vnet_tx_fd().is_some() {
                ", frames to the bridge with virtio-net headers"
            } else {
                ""
            }
        );
        Choice {
            datapath: Datapath::Xdp(Box::new(port)),
            reason,
        }
    };
    match request {
        DatapathRequest::Tap => Ok(Choice {
            datapath: Datapath::Tap,
            reason: "requested (--datapath tap)".into(),
        }),
        DatapathRequest::Xdp => {
            let cfg = xdp.ok_or(Error::NotConfigured)?;
            Ok(opened(XdpPort::open(cfg)?, "requested (--datapath xdp)"))
        }
        // The rule of docs/XDP.md: XDP is not tried (the port would be made and
        // removed for nothing).
        DatapathRequest::Auto => Ok(Choice {
            datapath: Datapath::Tap,
            reason: AUTO_RULE.into(),
        }),
    }
}

/// Which attach mode to ask for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ModeRequest {
    /// Native first, generic (SKB) if the driver refuses.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (SKB) mode only.
    Generic,
}

impl std::str::FromStr for ModeRequest {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "auto" => Ok(Self::Auto),
            "native" => Ok(Self::Native),
            "generic" => Ok(Self::Generic),
            other => Err(Error::Load(format!(
                "unknown XDP mode {other:?} (expected auto, native or generic)"
            ))),
        }
    }
}

/// Where `--xdp-relay-mode` and `--xdp-filter-mode` ask a program in front of a
/// UDP socket to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HookMode {
    /// [`HookMode::Tc`] on veth, else XDP native then generic ([`HOOK_AUTO_RULE`]).
    #[default]
    Auto,
    /// XDP in the mode asked (`native` or `generic`).
    Xdp(ModeRequest),
    /// TC classifier on the interface's ingress (tcx link, Linux 6.6).
    Tc,
}

impl std::str::FromStr for HookMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "auto" => Ok(Self::Auto),
            "native" | "generic" => s.parse().map(Self::Xdp),
            "tc" => Ok(Self::Tc),
            other => Err(Error::Load(format!(
                "unknown mode {other:?} (expected auto, native, generic or tc)"
            ))),
        }
    }
}

/// What auto takes, and why (docs/XDP.md, "Supernode relay in XDP" and "Junk
/// filter in front of the edge"): on a veth, native XDP makes the peer segment
/// its UDP GSO batches (every datagram its own buffer through the rest of the
/// path) and copies every frame into a page pool, and generic XDP passes a
/// batch on as one oversized frame, while the TC hook sees the batch whole as
/// the socket buffer it already is; on other interfaces (physical NICs) native
/// XDP.
pub const HOOK_AUTO_RULE: &str =
    "auto: tc on veth (GSO batches stay whole), else XDP native then generic";

/// The hook a program ended up in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// The XDP program, in this mode.
    Xdp(AttachMode),
    /// The TC classifier on ingress.
    Tc,
}

impl Hook {
    /// `native`, `generic` or `tc`, as status shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Xdp(m) => m.as_str(),
            Hook::Tc => "tc",
        }
    }
}

/// The XDP attach modes to try for `mode`, or `None` for the TC hook.
fn hook_plan(mode: HookMode, veth: bool) -> Option<ModeRequest> {
    match mode {
        HookMode::Tc => None,
        HookMode::Auto if veth => None,
        HookMode::Auto => Some(ModeRequest::Auto),
        HookMode::Xdp(request) => Some(request),
    }
}

/// Kernel ids of the programs named `program` attached to the tc ingress of
/// `iface` (tcx links), in the current network namespace.
pub fn tc_programs(iface: &str, program: &str) -> Result<Vec<u32>, Error> {
    let (_, attached) =
        SchedClassifier::query_tcx(iface, TcAttachType::Ingress).map_err(|e| Error::Attach {
            iface: iface.to_owned(),
            msg: format!("tc (tcx links need Linux 6.6): {e}"),
        })?;
    Ok(attached
        .iter()
        .filter(|p| p.name_as_str() == Some(program))
        .map(|p| p.id())
        .collect())
}

/// The two forms of one program in the object: XDP and TC classifier.
#[derive(Clone, Copy, Debug)]
struct HookPrograms {
    xdp: &'static str,
    tc: &'static str,
    /// What it is, for the log.
    what: &'static str,
}

/// Loads `programs`' form for the hook `mode` asks for ([`HOOK_AUTO_RULE`]
/// for `Auto`) and attaches it to `iface`: XDP in the first mode the driver
/// takes, or the TC classifier on ingress with a tcx link (owned by the
/// process: gone when it exits or is killed). The TC hook is refused when the
/// ingress already holds the same classifier (another process runs it there).
/// Returns the hook and the program's kernel id.
fn attach_hook(
    ebpf: &mut Ebpf,
    iface: &str,
    mode: HookMode,
    programs: HookPrograms,
) -> Result<(Hook, u32), Error> {
    let link = link_info(iface)?.ok_or_else(|| Error::Attach {
        iface: iface.to_owned(),
        msg: "no such interface".into(),
    })?;
    let veth = link.kind.as_deref() == Some("veth");
    let (hook, prog_id) = match hook_plan(mode, veth) {
        None => (Hook::Tc, attach_tc(ebpf, iface, programs.tc)?),
        Some(request) => {
            let prog = load_xdp(ebpf, programs.xdp)?;
            let prog_id = prog.info().map_err(|e| Error::Load(e.to_string()))?.id();
            let (attached, _) = attach_first(prog, iface, attach_tries(request))?;
            (Hook::Xdp(attached), prog_id)
        }
    };
    let rule = if mode == HookMode::Auto {
        HOOK_AUTO_RULE
    } else {
        "as asked"
    };
    tracing::info!(%iface, hook = hook.as_str(), prog_id, rule, "{} attached", programs.what);
    Ok((hook, prog_id))
}

/// Loads the classifier `name` and attaches it to the ingress of `iface`
/// (see [`attach_hook`]). Two processes starting at once could both pass the
/// check before either attaches, so the chain is read again after attaching:
/// new links go last, and only the one that comes first keeps its place.
fn attach_tc(ebpf: &mut Ebpf, iface: &str, name: &str) -> Result<u32, Error> {
    let taken = |other: u32| Error::Attach {
        iface: iface.to_owned(),
        msg: format!(
            "tc ingress already runs {name} (program id {other}): another process \
             runs it on this interface"
        ),
    };
    if let Some(&other) = tc_programs(iface, name)?.first() {
        return Err(taken(other));
    }
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| Error::Load(format!("no program {name}")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| Error::Load(e.to_string()))?;
    prog.load().map_err(|e| Error::Load(e.to_string()))?;
    let prog_id = prog.info().map_err(|e| Error::Load(e.to_string()))?.id();
    let link = prog
        .attach_with_options(
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::last()),
        )
        .map_err(|e| Error::Attach {
            iface: iface.to_owned(),
            msg: format!("tc: {e}"),
        })?;
    match tc_programs(iface, name)?.first() {
        Some(&first) if first != prog_id => {
            // Best effort: the link also goes when the program is dropped.
            let _ = prog.detach(link);
            Err(taken(first))
        }
        _ => Ok(prog_id),
    }
}

/// The mode the program ended up attached in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`).
    Native,
    /// In the generic receive path (`XDP_FLAGS_SKB_MODE`).
    Generic,
}

impl AttachMode {
    /// `native` or `generic`.
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        }
    }
}

/// The attach modes to try, in order, for a request: native then generic for
/// `Auto`.
fn attach_tries(mode: ModeRequest) -> &'static [(AttachMode, XdpMode)] {
    match mode {
        ModeRequest::Auto => &[
            (AttachMode::Native, XdpMode::Driver),
            (AttachMode::Generic, XdpMode::Skb),
        ],
        ModeRequest::Native => &[(AttachMode::Native, XdpMode::Driver)],
        ModeRequest::Generic => &[(AttachMode::Generic, XdpMode::Skb)],
    }
}

/// The XDP program `name` of `ebpf`, loaded into the kernel.
fn load_xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp, Error> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| Error::Load(format!("no program {name}")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| Error::Load(e.to_string()))?;
    prog.load().map_err(|e| Error::Load(e.to_string()))?;
    Ok(prog)
}

/// Attaches `prog` to `iface` in the first of `tries` the kernel accepts: that mode
/// and why the ones before it failed (empty when the first one worked).
fn attach_first(
    prog: &mut Xdp,
    iface: &str,
    tries: &[(AttachMode, XdpMode)],
) -> Result<(AttachMode, Vec<String>), Error> {
    let mut errors = Vec::new();
    for &(m, flags) in tries {
        match prog.attach(iface, flags) {
            Ok(_) => return Ok((m, errors)),
            Err(e) => errors.push(format!("{}: {e}", m.as_str())),
        }
    }
    Err(Error::Attach {
        iface: iface.to_owned(),
        msg: errors.join("; "),
    })
}

/// Options of [`XdpPort::open`].
#[derive(Clone, Debug)]
pub struct XdpPortConfig {
    /// The VM bridge to enslave the port to; `None` leaves that to the
    /// operator (as with a TAP).
    pub bridge: Option<String>,
    /// Bridge-side name of the port (at most 13 characters; the edge's
    /// `--tap` name).
    pub port: String,
    /// MTU of both veth ends.
    pub mtu: u32,
    /// Attach mode wanted.
    pub mode: ModeRequest,
    /// UMEM size.
    pub xsk: XskConfig,
    /// Queues of the veth and AF_XDP sockets (one per forwarder thread),
    /// 1..=[`MAX_QUEUES`].
    pub queues: u32,
    /// Let the VMs' TCP super-packets through the port whole (generic mode, AF_XDP
    /// multi-buffer and one queue needed; the port falls back to one-MTU frames
    /// without them): docs/XDP.md "GSO through the port".
    pub gso: bool,
    /// Send the frames for the VMs through packet sockets with virtio-net headers
    /// (TCP super-frames whole, as a TAP write takes them) instead of AF_XDP TX, one
    /// socket per queue; AF_XDP TX on every queue where the sockets cannot be made:
    /// docs/XDP.md "Frames to the VMs through a packet socket".
    pub tx_vnet: bool,
}

/// Most queues of a port (entries of the program's XSKMAP).
pub const MAX_QUEUES: u32 = 64;

impl XdpPortConfig {
    /// Defaults: MTU 1500, auto mode, 4096 chunks of 4 KiB.
    pub fn new(bridge: Option<&str>, port: &str) -> Self {
        Self {
            bridge: bridge.map(str::to_owned),
            port: port.to_owned(),
            mtu: 1500,
            mode: ModeRequest::Auto,
            xsk: XskConfig::default(),
            queues: 1,
            gso: true,
            tx_vnet: true,
        }
    }
}

/// Counters of the XDP port: the program's (summed over CPUs), the
/// socket's, and the kernel's socket statistics.
#[derive(Clone, Debug, Default)]
pub struct XdpStats {
    /// (name, value) for each program counter (see `dataplane_ebpf_common::Counter`).
    pub program: Vec<(&'static str, u64)>,
    /// Our socket counters.
    pub socket: XskCounters,
    /// Frames the kernel dropped because the RX ring was full or the frame
    /// did not fit (`rx_dropped` + `rx_ring_full` of XDP_STATISTICS).
    pub kernel_rx_dropped: u64,
    /// Invalid TX descriptors the kernel saw (never expected).
    pub kernel_tx_invalid: u64,
}

/// The edge's port on the VM bridge, served by XDP + AF_XDP: the AF_XDP
/// socket of one rx queue, and a share of the program and veth pair. With
/// several queues, [`XdpPort::split_queues`] hands the other queues'
/// sockets out as ports of their own (one per forwarder thread); the
/// program and the veth pair go away with the last of them.
///
/// Field order is drop order: sockets out of the map and closed, then
/// (with the last share) program detached and freed, veth pair deleted.
pub struct XdpPort {
    vnet_tx: Option<OwnedFd>,
    xsk: xsk::Xsk,
    queue: u32,
    more: Vec<(Option<OwnedFd>, xsk::Xsk)>,
    shared: Arc<PortShared>,
}

/// What the queues of one port share. Field order is drop order.
struct PortShared {
    ebpf: Mutex<Ebpf>,
    mode: AttachMode,
    prog_id: u32,
    map_ids: Vec<u32>,
    veth: VethPort,
    gso_mtu: Option<usize>,
}

impl XdpPort {
    /// Creates the port, attaches the program and binds the socket.
    pub fn open(cfg: &XdpPortConfig) -> Result<Self, Error> {
        availability()?;
        let object = PROGRAM.ok_or_else(|| Error::NotBuilt(String::new()))?;
        if !(1..=MAX_QUEUES).contains(&cfg.queues) {
            return Err(Error::Load(format!(
                "{} queues: 1..={MAX_QUEUES} are possible",
                cfg.queues
            )));
        }
        let mut veth = VethPort::create(
            cfg.bridge.as_deref(),
            &cfg.port,
            cfg.mtu,
            cfg.queues,
            // Generic XDP reads the bridge side's tx queue as rx queue + 1 (veth
            // records no rx queue, with NAPI or without): with two queues every
            // frame is queue 0's. One queue only (docs/XDP.md).
            cfg.gso && cfg.queues == 1,
        )?;
        let iface = veth.edge_name().to_owned();

        let mut ebpf = Ebpf::load(object).map_err(|e| Error::Load(e.to_string()))?;
        let prog = load_xdp(&mut ebpf, PROGRAM_NAME)?;
        let info = prog.info().map_err(|e| Error::Load(e.to_string()))?;
        let prog_id = info.id();
        let map_ids = info.map_ids().ok().flatten().unwrap_or_default();

        // With GSO through the port, auto means generic mode: native XDP on a veth
        // turns GSO off on its peer (`veth_xdp_set`, `veth_fix_features`).
        let port_tries = match cfg.mode {
            ModeRequest::Auto if veth.gso() => attach_tries(ModeRequest::Generic),
            mode => attach_tries(mode),
        };
        let (mode, errors) = attach_first(prog, &iface, port_tries)?;
        if !errors.is_empty() {
            tracing::info!(%iface, fallback = %errors.join("; "), "XDP attached in generic mode");
        }

        let ifindex = if_index(&iface)?;
        let bind = match mode {
            AttachMode::Native => BindMode::Auto,
            AttachMode::Generic => BindMode::Copy,
        };
        let mut xsks: XskMap<&mut MapData> = ebpf
            .map_mut(XSKS_MAP)
            .ok_or_else(|| Error::Load(format!("no map {XSKS_MAP}")))?
            .try_into()
            .map_err(|e: aya::maps::MapError| Error::Load(e.to_string()))?;
        let mut socks = Vec::with_capacity(cfg.queues as usize);
        for q in 0..cfg.queues {
            let x = xsk::Xsk::new(ifindex, q, cfg.xsk, bind)?;
            xsks.set(q, x.as_raw_fd(), 0)
                .map_err(|e| Error::Load(format!("XSKMAP set {q}: {e}")))?;
            socks.push(x);
        }
        let mut socks = socks.into_iter();
        let xsk = socks.next().ok_or_else(|| Error::Load("no queue".into()))?;
        if mode == AttachMode::Native || !xsk.multi_buffer() {
            veth.stop_gso()?;
        }
        let gso_mtu = veth.gso().then_some(cfg.mtu as usize);
        let mut vnet_txs = if cfg.tx_vnet {
            vnet_tx_sockets(ifindex, cfg.queues, &mut veth)
        } else {
            Vec::new()
        }
        .into_iter();
        let vnet_tx = vnet_txs.next();
        tracing::info!(port = %cfg.port, bridge = ?cfg.bridge, mode = mode.as_str(), prog_id,
            multi_buffer = xsk.multi_buffer(), queues = cfg.queues, gso = veth.gso(),
            tx_vnet = vnet_tx.is_some(), "XDP port up");
        // Every queue has its socket or none has (`vnet_tx_sockets`).
        let more = socks.map(|x| (vnet_txs.next(), x)).collect::<Vec<_>>();
        Ok(Self {
            vnet_tx,
            xsk,
            queue: 0,
            more,
            shared: Arc::new(PortShared {
                ebpf: Mutex::new(ebpf),
                mode,
                prog_id,
                map_ids,
                veth,
                gso_mtu,
            }),
        })
    }

    /// Takes the sockets of queues 1.. out of this port (which keeps queue
    /// 0) as ports of their own, for one forwarder thread each, each with its
    /// own packet socket for the frames to the VMs when the port has them.
    pub fn split_queues(&mut self) -> Vec<XdpPort> {
        let shared = &self.shared;
        std::mem::take(&mut self.more)
            .into_iter()
            .enumerate()
            .map(|(i, (vnet_tx, xsk))| XdpPort {
                vnet_tx,
                xsk,
                queue: i as u32 + 1,
                more: Vec::new(),
                shared: Arc::clone(shared),
            })
            .collect()
    }

    /// The rx queue this port's socket serves.
    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// Mode the program is attached in.
    pub fn mode(&self) -> AttachMode {
        self.shared.mode
    }

    /// Kernel id of the loaded program (as `bpftool prog show` lists it).
    pub fn prog_id(&self) -> u32 {
        self.shared.prog_id
    }

    /// Kernel ids of the program's maps.
    pub fn map_ids(&self) -> &[u32] {
        &self.shared.map_ids
    }

    /// Bridge-side and edge-side interface names.
    pub fn names(&self) -> (&str, &str) {
        (self.shared.veth.name(), self.shared.veth.edge_name())
    }

    /// Whether the kernel coalesces the frames sent into the bridge (GRO on
    /// the bridge side of the port).
    pub fn bridge_gro(&self) -> bool {
        self.shared.veth.gro()
    }

    /// With GSO through the port, the VMs' MTU: a frame above it (plus its Ethernet
    /// header) is a TCP super-packet to be re-segmented, and TCP/UDP checksums may be
    /// partial. `None`: every frame is at most one MTU with complete checksums.
    pub fn gso_mtu(&self) -> Option<usize> {
        self.shared.gso_mtu
    }

    /// Whether frames larger than a UMEM chunk work (AF_XDP multi-buffer).
    pub fn multi_buffer(&self) -> bool {
        self.xsk.multi_buffer()
    }

    /// The packet socket that takes frames for the VMs with a virtio-net header in
    /// front (TSO super-frames, partial checksums), as a TAP device with
    /// `IFF_VNET_HDR` does; `None`: send them through AF_XDP TX.
    pub fn vnet_tx_fd(&self) -> Option<RawFd> {
        self.vnet_tx.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Largest frame [`XdpPort::send_batch`] accepts.
    pub fn max_frame(&self) -> usize {
        self.xsk.max_frame()
    }

    /// Receives up to `max` frames that the bridge sent to the port, calling
    /// `f` with each (the slice is valid only during the call). Returns the
    /// number received; 0 means poll the fd and come back.
    pub fn recv_batch(&mut self, max: u32, f: impl FnMut(&[u8])) -> u32 {
        self.xsk.recv_batch(max, f)
    }

    /// Sends frames into the bridge. Frames that cannot be queued (larger
    /// than [`XdpPort::max_frame`], TX ring full) are counted in
    /// [`XdpStats::socket`] and dropped. Returns the number queued.
    pub fn send_batch<'a>(&mut self, frames: impl IntoIterator<Item = &'a [u8]>) -> u32 {
        self.xsk.send_batch(frames)
    }

    /// Kicks pending transmits and reaps completions; returns the number of
    /// descriptors the kernel has not taken off the TX ring yet (those need
    /// another kick soon). Frames it has taken complete on their own, e.g.
    /// once the bridge side's NAPI thread has passed them on, and are reaped
    /// by the next send.
    pub fn flush_tx(&mut self) -> u32 {
        self.xsk.flush_tx();
        self.xsk.tx_unsent()
    }

    /// The socket's own counters (no system call; for the datapath's per-batch use).
    pub fn socket_counters(&self) -> XskCounters {
        self.xsk.counters()
    }

    /// All counters (reads the program's per-CPU map and the kernel's socket
    /// statistics: system calls, not for every batch).
    pub fn stats(&self) -> XdpStats {
        let mut st = XdpStats {
            socket: self.xsk.counters(),
            ..XdpStats::default()
        };
        let ebpf = self.shared.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Ok(arr)) = ebpf
            .map(STATS_MAP)
            .map(PerCpuArray::<&MapData, u64>::try_from)
        {
            for c in Counter::ALL {
                let v = arr
                    .get(&(c as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                st.program.push((c.name(), v));
            }
        }
        if let Ok(k) = self.xsk.kernel_stats() {
            st.kernel_rx_dropped = k.rx_dropped + k.rx_ring_full;
            st.kernel_tx_invalid = k.tx_invalid_descs;
        }
        st
    }
}

impl AsFd for XdpPort {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.xsk.as_fd()
    }
}

impl std::fmt::Debug for XdpPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpPort")
            .field("names", &self.names())
            .field("queue", &self.queue)
            .field("mode", &self.shared.mode)
            .field("prog_id", &self.shared.prog_id)
            .finish_non_exhaustive()
    }
}

impl AsRawFd for XdpPort {
    fn as_raw_fd(&self) -> RawFd {
        self.xsk.as_raw_fd()
    }
}

/// One packet socket per queue for the frames to the VMs, and TSO on at the edge
/// side (GSO skbs would otherwise be segmented before the veth): with several
/// queues each forwarder thread writes its own flows through its own socket, so a
/// flow's frames leave in the order one thread wrote them. Native XDP on the edge
/// side takes GSO off the bridge side only, so TSO at the edge side holds in both
/// modes. Where a socket or TSO cannot be had, none (AF_XDP TX on every queue),
/// with one warning.
fn vnet_tx_sockets(ifindex: u32, queues: u32, veth: &mut VethPort) -> Vec<OwnedFd> {
    let made = (0..queues)
        .map(|_| packet::vnet_tx_socket(ifindex))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::from)
        .and_then(|fds| Ok(veth.tso_on_edge().map(|()| fds)?));
    made.unwrap_or_else(|e| {
        tracing::warn!(iface = %veth.edge_name(), error = %e, "frames to the bridge through AF_XDP TX");
        Vec::new()
    })
}

fn if_index(name: &str) -> Result<u32, Error> {
    let c = std::ffi::CString::new(name).map_err(|_| PortError::BadName(name.to_owned()))?;
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(Error::Socket(SysError {
            call: "if_nametoindex",
            source: std::io::Error::last_os_error(),
        }));
    }
    Ok(idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datapath_names_parse() {
        assert_eq!(
            "auto".parse::<DatapathRequest>().unwrap(),
            DatapathRequest::Auto
        );
        assert_eq!(
            "tap".parse::<DatapathRequest>().unwrap(),
            DatapathRequest::Tap
        );
        assert_eq!(
            "xdp".parse::<DatapathRequest>().unwrap(),
            DatapathRequest::Xdp
        );
        assert!("dpdk".parse::<DatapathRequest>().is_err());
    }

    #[test]
    fn tap_is_taken_as_asked() {
        let c = choose(DatapathRequest::Tap, None).unwrap();
        assert_eq!(c.datapath.name(), "tap");
        assert!(c.reason.contains("requested"));
    }

    #[test]
    fn xdp_without_bridge_is_an_error() {
        assert!(matches!(
            choose(DatapathRequest::Xdp, None),
            Err(Error::NotConfigured)
        ));
    }

    /// `--xdp-relay-mode` and `--xdp-filter-mode` parse, and auto follows the rule
    /// of docs/XDP.md: tc on veth, XDP native then generic elsewhere.
    #[test]
    fn hook_modes_parse_and_auto_takes_tc_on_veth() {
        for (s, m) in [
            ("auto", HookMode::Auto),
            ("native", HookMode::Xdp(ModeRequest::Native)),
            ("generic", HookMode::Xdp(ModeRequest::Generic)),
            ("tc", HookMode::Tc),
        ] {
            assert_eq!(s.parse::<HookMode>().unwrap(), m);
        }
        assert!("xdp".parse::<HookMode>().is_err());
        assert_eq!(hook_plan(HookMode::Auto, true), None);
        assert_eq!(hook_plan(HookMode::Auto, false), Some(ModeRequest::Auto));
        assert_eq!(hook_plan(HookMode::Tc, false), None);
        assert_eq!(
            hook_plan(HookMode::Xdp(ModeRequest::Native), true),
            Some(ModeRequest::Native)
        );
        assert_eq!(
            hook_plan(HookMode::Xdp(ModeRequest::Generic), true),
            Some(ModeRequest::Generic)
        );
    }

    /// The program's pass-to-kernel rule for 802.1D link-local frames
    /// (shared code, so this is what runs in the kernel too).
    #[test]
    fn link_local_frames_stay_local() {
        use dataplane_ebpf_common::is_link_local;
        assert!(is_link_local(&[0x01, 0x80, 0xc2, 0, 0, 0])); // STP
        assert!(is_link_local(&[0x01, 0x80, 0xc2, 0, 0, 0x0e])); // LLDP
        assert!(!is_link_local(&[0x01, 0x80, 0xc2, 0, 0, 0x10]));
        assert!(!is_link_local(&[0xff; 6]));
        assert!(!is_link_local(&[0x33, 0x33, 0, 0, 0, 1]));
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
