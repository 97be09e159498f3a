//! The edge's port on the VM bridge: a veth pair the edge creates, enslaves
//! (one end) to the bridge and removes on exit.
//!
//! Names: the bridge side is the port name the operator gave (what `bridge
//! link` shows, like the TAP of the TAP path); the edge side, where the XDP
//! program runs, is that name with `.x` appended. Without a bridge name the
//! bridge side is left for the operator to enslave, exactly like a TAP made
//! with `--create-tap`.
//!
//! GSO: with `gso` the bridge side keeps TCP segmentation and checksum offload,
//! so the VMs' TCP super-packets cross the veth whole (the XDP program must run
//! in generic mode: native XDP on a veth turns GSO off on the peer) and the
//! edge re-segments them; every other segmentation offload is turned off there,
//! so the kernel segments UDP, SCTP and tunnel super-packets before the veth.
//! Without `gso` (or after [`VethPort::stop_gso`]) the bridge side has
//! `gso_max_segs 1` and no checksum offload: every frame the XDP program sees is
//! at most one MTU with complete checksums. Both ends carry the alias
//! `mvc-xdp pid=<pid>` so that a later start can tell a port left behind by a
//! killed edge (owner gone: removed) from one in use (refused).
//!
//! Port setup happens once per start, off the datapath, so it uses iproute2
//! (`ip -j link ...`) rather than a netlink implementation of our own.

use std::{path::Path, process::Command};

use thiserror::Error;

/// Alias prefix marking ports made by this module.
pub const ALIAS_PREFIX: &str = "mvc-xdp pid=";

/// Errors of port setup.
#[derive(Debug, Error)]
pub enum PortError {
    /// The name does not fit (the edge side needs two more characters).
    #[error("port name {0:?} must be 1 to 13 characters of [A-Za-z0-9_-]")]
    BadName(String),
    /// The bridge does not exist or is not a bridge.
    #[error("{0:?} is not a bridge")]
    NotABridge(String),
    /// A live process owns the port.
    #[error("port {name:?} is in use by pid {pid}")]
    Busy {
        /// Port name.
        name: String,
        /// Owner.
        pid: u32,
    },
    /// An interface of that name exists and was not made by us.
    #[error("interface {0:?} exists and is not an mvc XDP port")]
    Foreign(String),
    /// `ip` failed.
    #[error("ip {args}: {msg}")]
    Ip {
        /// Arguments.
        args: String,
        /// stderr or spawn error.
        msg: String,
    },
}

fn ip(args: &[&str]) -> Result<String, PortError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| PortError::Ip {
            args: args.join(" "),
            msg: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(PortError::Ip {
            args: args.join(" "),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What `ip -j -d link show` says about one interface.
#[derive(Debug, Default)]
pub struct LinkInfo {
    /// `linkinfo.info_kind` (veth, bridge, ...).
    pub kind: Option<String>,
    /// `ifalias`.
    pub alias: Option<String>,
    /// XDP program id attached, if any.
    pub xdp_prog_id: Option<u64>,
}

/// Looks up an interface in the current network namespace.
pub fn link_info(name: &str) -> Result<Option<LinkInfo>, PortError> {
    let out = match ip(&["-j", "-d", "link", "show", "dev", name]) {
        Ok(out) => out,
        Err(PortError::Ip { msg, .. }) if msg.contains("does not exist") => return Ok(None),
        Err(e) => return Err(e),
    };
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| PortError::Ip {
        args: format!("-j -d link show dev {name}"),
        msg: format!("unparsable output: {e}"),
    })?;
    let Some(link) = v.as_array().and_then(|a| a.first()) else {
        return Ok(None);
    };
    let s = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_owned);
    Ok(Some(LinkInfo {
        kind: s(link.pointer("/linkinfo/info_kind")),
        alias: s(link.get("ifalias")),
        xdp_prog_id: link.pointer("/xdp/prog/id").and_then(|v| v.as_u64()),
    }))
}

/// Name of the edge side of port `name`.
pub fn edge_side(name: &str) -> String {
    format!("{name}.x")
}

fn check_name(name: &str) -> Result<(), PortError> {
    let ok = !name.is_empty()
        && name.len() <= 13
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(PortError::BadName(name.to_owned()))
    }
}

fn owner_pid(alias: &str) -> Option<u32> {
    alias.strip_prefix(ALIAS_PREFIX)?.trim().parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes a port left behind by an edge that is gone (kill -9). Refuses a
/// port whose owner still runs and an interface that is not ours. Returns
/// whether something was removed.
pub fn remove_stale(name: &str) -> Result<bool, PortError> {
    check_name(name)?;
    let mut removed = false;
    for ifname in [name.to_owned(), edge_side(name)] {
        let Some(info) = link_info(&ifname)? else {
            continue;
        };
        let Some(pid) = info.alias.as_deref().and_then(owner_pid) else {
            return Err(PortError::Foreign(ifname));
        };
        if pid != std::process::id() && pid_alive(pid) {
            return Err(PortError::Busy { name: ifname, pid });
        }
        // Deleting one end of a veth deletes both, and with them any XDP
        // program still attached through netlink.
        match ip(&["link", "del", "dev", &ifname]) {
            Ok(_) => removed = true,
            Err(PortError::Ip { msg, .. }) if msg.contains("does not exist") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// `ethtool` set commands used on the port (legacy ethtool_value ioctls).
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_STSO: u32 = 0x1f;
const ETHTOOL_SGRO: u32 = 0x2c;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETHTOOL_SFEATURES: u32 = 0x3b;
const ETH_SS_FEATURES: u32 = 4;
const ETH_GSTRING_LEN: usize = 32;

/// Segmentation offloads kept on the bridge side with GSO through the port: TCP
/// only, which the edge re-segments (`EdgeCore::handle_tap_tso`). A UDP or tunnel
/// super-packet carries its segment size and inner headers in the skb alone.
const GSO_KEPT: &[&str] = &[
    "tx-tcp-segmentation",
    "tx-tcp6-segmentation",
    "tx-tcp-ecn-segmentation",
    "tx-tcp-mangleid-segmentation",
];

/// Whether `name` is an offload to turn off with GSO through the port: every
/// segmentation offload but TCP's, and SCTP's CRC (left partial in the frame, which
/// the edge could not tell).
fn gso_feature_off(name: &str) -> bool {
    (name.ends_with("-segmentation") && !GSO_KEPT.contains(&name))
        || matches!(name, "tx-gso-list" | "tx-gso-partial" | "tx-checksum-sctp")
}

/// Turns off transmit checksum offload of `dev` (`ethtool -K dev tx off`,
/// through the SIOCETHTOOL ioctl so that no ethtool binary is needed).
fn tx_checksum_off(dev: &str) -> Result<(), PortError> {
    ethtool_set(dev, ETHTOOL_STXCSUM, 0, "tx off")
}

/// One `ethtool -K` setting through the SIOCETHTOOL ioctl.
fn ethtool_set(dev: &str, cmd: u32, data: u32, what: &str) -> Result<(), PortError> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut value = EthtoolValue { cmd, data };
    ethtool(dev, (&mut value as *mut EthtoolValue).cast(), what)
}

/// Turns off every offload of `dev` named by `off` (`ethtool -K dev NAME off` for
/// each): the names come from the driver's feature strings, since the bit numbers
/// differ between kernels. Returns the names turned off.
fn features_off(dev: &str, off: impl Fn(&str) -> bool) -> Result<Vec<String>, PortError> {
    #[repr(C)]
    struct SsetInfo {
        cmd: u32,
        reserved: u32,
        mask: u64,
        count: u32,
    }
    let mut info = SsetInfo {
        cmd: ETHTOOL_GSSET_INFO,
        reserved: 0,
        mask: 1 << ETH_SS_FEATURES,
        count: 0,
    };
    ethtool(dev, (&mut info as *mut SsetInfo).cast(), "feature count")?;
    let n = info.count as usize;
    // struct ethtool_gstrings: cmd, string_set, len, then len strings of 32 bytes.
    let mut strings = vec![0u32; 3 + n * ETH_GSTRING_LEN / 4];
    strings[0] = ETHTOOL_GSTRINGS;
    strings[1] = ETH_SS_FEATURES;
    strings[2] = n as u32;
    ethtool(dev, strings.as_mut_ptr().cast(), "feature names")?;
    let bytes: Vec<u8> = strings[3..].iter().flat_map(|w| w.to_ne_bytes()).collect();
    let names: Vec<String> = bytes
        .chunks(ETH_GSTRING_LEN)
        .map(|c| {
            let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
            String::from_utf8_lossy(&c[..end]).into_owned()
        })
        .collect();
    // struct ethtool_sfeatures: cmd, size, then size blocks of (valid, requested).
    let blocks = n.div_ceil(32);
    let mut req = vec![0u32; 2 + 2 * blocks];
    req[0] = ETHTOOL_SFEATURES;
    req[1] = blocks as u32;
    let mut turned = Vec::new();
    for (bit, name) in names.iter().enumerate() {
        if off(name) {
            req[2 + 2 * (bit / 32)] |= 1 << (bit % 32);
            turned.push(name.clone());
        }
    }
    if !turned.is_empty() {
        ethtool(dev, req.as_mut_ptr().cast(), "features off")?;
    }
    Ok(turned)
}

/// One SIOCETHTOOL ioctl on `dev` with `data` (an ethtool command structure).
fn ethtool(dev: &str, data: *mut libc::c_void, what: &str) -> Result<(), PortError> {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }
    let err = |msg: String| PortError::Ip {
        args: format!("(ethtool) {dev} {what}"),
        msg,
    };
    if dev.len() >= libc::IFNAMSIZ {
        return Err(err("name too long".into()));
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data,
        _pad: [0; 16],
    };
    req.name[..dev.len()].copy_from_slice(dev.as_bytes());
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error().to_string()));
    }
    // SAFETY: SIOCETHTOOL reads an ifreq whose data points at a live ethtool
    // command structure of the size its own fields announce (the callers build it
    // so); both outlive the call.
    let r = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &mut req as *mut IfReq) };
    let e = std::io::Error::last_os_error();
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    // ETHTOOL_SFEATURES answers a positive value when some of the requested
    // features are fixed for the device (ETHTOOL_F_UNSUPPORTED): they stay as
    // they are, which for ours means off already or not offered.
    if r < 0 {
        return Err(err(e.to_string()));
    }
    Ok(())
}

/// Removes every port in this network namespace whose owner is gone
/// (whatever its name: an edge killed with -9 and restarted under another
/// port name leaves nothing behind either). Returns the names removed.
pub fn sweep_stale() -> Result<Vec<String>, PortError> {
    let out = ip(&["-j", "link", "show"])?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| PortError::Ip {
        args: "-j link show".into(),
        msg: format!("unparsable output: {e}"),
    })?;
    let mut removed = Vec::new();
    for link in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        let (Some(name), Some(alias)) = (
            link.get("ifname").and_then(|v| v.as_str()),
            link.get("ifalias").and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        let Some(pid) = owner_pid(alias) else {
            continue;
        };
        // The edge side's name is the port's plus ".x": one of the pair is
        // enough (deleting one end deletes both).
        if pid == std::process::id() || pid_alive(pid) || name.ends_with(".x") {
            continue;
        }
        match ip(&["link", "del", "dev", name]) {
            Ok(_) => removed.push(name.to_owned()),
            Err(PortError::Ip { msg, .. }) if msg.contains("does not exist") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// A veth port on a bridge; deleted on drop.
#[derive(Debug)]
pub struct VethPort {
    name: String,
    edge: String,
    gro: bool,
    gso: bool,
}

/// Enslaves an existing interface (the edge's TAP device) to `bridge` and
/// brings it up; refused when `bridge` is not a bridge.
pub fn enslave(dev: &str, bridge: &str) -> Result<(), PortError> {
    match link_info(bridge)? {
        Some(LinkInfo { kind: Some(k), .. }) if k == "bridge" => {}
        _ => return Err(PortError::NotABridge(bridge.to_owned())),
    }
    ip(&["link", "set", "dev", dev, "master", bridge, "up"]).map(|_| ())
}

impl VethPort {
    /// Creates the pair, enslaves `name` to `bridge` (if given), brings both
    /// ends up.
    /// IPv6 is disabled on the edge side so the kernel sends nothing of its
    /// own (router solicitations, DAD) into the bridge from there.
    /// Both ends get `queues` rx and tx queues: the bridge side picks a tx
    /// queue by flow hash, and veth hands the frame to the same rx queue
    /// on the edge side, so one flow always reaches one AF_XDP socket.
    /// With `gso` the VMs' TCP super-packets cross the veth whole (see the module
    /// documentation); best effort: where the offloads cannot be set, the port works
    /// without ([`VethPort::gso`] says which).
    pub fn create(
        bridge: Option<&str>,
        name: &str,
        mtu: u32,
        queues: u32,
        gso: bool,
    ) -> Result<Self, PortError> {
        check_name(name)?;
        if let Some(bridge) = bridge {
            match link_info(bridge)? {
                Some(LinkInfo { kind: Some(k), .. }) if k == "bridge" => {}
                _ => return Err(PortError::NotABridge(bridge.to_owned())),
            }
        }
        for gone in sweep_stale()? {
            tracing::info!(port = %gone, "removed XDP port left by an edge that is gone");
        }
        remove_stale(name)?;
        let edge = edge_side(name);
        let alias = format!("{ALIAS_PREFIX}{}", std::process::id());
        let mtu = mtu.to_string();
        let q = queues.max(1).to_string();
        let mut add = vec![
            "link",
            "add",
            "dev",
            &edge,
            "mtu",
            &mtu,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "type",
            "veth",
            "peer",
            "name",
            name,
            "mtu",
            &mtu,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
        ];
        if !gso {
            add.extend(["gso_max_segs", "1"]);
        }
        ip(&add)?;
        // From here on, drop removes the pair.
        let mut port = Self {
            name: name.to_owned(),
            edge,
            gro: false,
            gso,
        };
        ip(&["link", "set", "dev", &port.edge, "alias", &alias])?;
        if gso {
            match features_off(&port.name, gso_feature_off) {
                Ok(off) => tracing::debug!(port = %name, ?off, "GSO through the port: TCP only"),
                Err(e) => {
                    tracing::warn!(port = %name, error = %e, "no GSO through the port");
                    port.stop_gso()?;
                }
            }
        } else {
            // The kernel completes checksums before the veth (and, TCP
            // segmentation depending on checksum offload, segments in software).
            tx_checksum_off(&port.name)?;
        }
        // Frames the edge sends through AF_XDP enter the bridge one MTU at a
        // time. With GRO on the bridge side (which gives it a NAPI context)
        // and TSO off on the edge side (which makes veth_xmit treat the
        // frames as GRO candidates), the kernel coalesces them into GSO
        // packets before the bridge, so the VMs' stacks get super-packets as
        // from a TAP device. Best effort: without it frames still flow.
        port.gro = ethtool_set(&port.edge, ETHTOOL_STSO, 0, "tso off")
            .and_then(|()| ethtool_set(&port.name, ETHTOOL_SGRO, 1, "gro on"))
            .inspect_err(|e| tracing::warn!(port = %name, error = %e, "no GRO towards the bridge"))
            .is_ok();
        ip(&["link", "set", "dev", &port.name, "alias", &alias])?;
        // Best effort: a kernel without IPv6 has no such file.
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", port.edge),
            "1",
        );
        match bridge {
            Some(bridge) => ip(&["link", "set", "dev", &port.name, "master", bridge, "up"])?,
            None => ip(&["link", "set", "dev", &port.name, "up"])?,
        };
        ip(&["link", "set", "dev", &port.edge, "up"])?;
        // Threaded NAPI on the bridge side (its NAPI context exists once it
        // is up): AF_XDP copy mode enables bottom halves after every frame it
        // transmits, so a NAPI poll in softirq context would see one frame at
        // a time and GRO would have nothing to merge. A NAPI thread polls the
        // frames a whole `sendto` queued (up to 64 per poll), and the bridge
        // and the VMs' stacks run beside the edge, not inside its sendto.
        if port.gro {
            port.gro = std::fs::write(format!("/sys/class/net/{}/threaded", port.name), "1")
                .inspect_err(|e| tracing::warn!(port = %name, error = %e, "no threaded NAPI"))
                .is_ok();
        }
        Ok(port)
    }

    /// Turns TSO back on at the edge side, for frames sent with virtio-net headers
    /// (GSO skbs would otherwise be segmented before the veth); the bridge side's GRO
    /// then has nothing to merge ([`VethPort::gro`] false).
    pub fn tso_on_edge(&mut self) -> Result<(), PortError> {
        ethtool_set(&self.edge, ETHTOOL_STSO, 1, "tso on")?;
        self.gro = false;
        Ok(())
    }

    /// Bridge-side name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Edge-side name (where the XDP program runs).
    pub fn edge_name(&self) -> &str {
        &self.edge
    }

    /// Whether frames sent into the bridge are coalesced by GRO on the
    /// bridge side.
    pub fn gro(&self) -> bool {
        self.gro
    }

    /// Whether the VMs' TCP super-packets reach the edge side whole (with their
    /// TCP/UDP checksums possibly partial: only the pseudo-header sum in the field).
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Back to frames of at most one MTU with complete checksums: checksum offload off
    /// on the bridge side (TCP segmentation depends on it) and `gso_max_segs 1`. For an
    /// edge side that cannot take super-packets whole (native XDP, no AF_XDP
    /// multi-buffer).
    pub fn stop_gso(&mut self) -> Result<(), PortError> {
        if self.gso {
            tx_checksum_off(&self.name)?;
            ip(&["link", "set", "dev", &self.name, "gso_max_segs", "1"])?;
            self.gso = false;
        }
        Ok(())
    }
}

impl Drop for VethPort {
    fn drop(&mut self) {
        if let Err(e) = ip(&["link", "del", "dev", &self.edge]) {
            tracing::warn!(port = %self.name, error = %e, "could not remove XDP port");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("mvc0").is_ok());
        assert!(check_name("abcdefghijklm").is_ok());
        assert!(check_name("abcdefghijklmn").is_err());
        assert!(check_name("").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name("a/b").is_err());
        assert_eq!(edge_side("mvc0"), "mvc0.x");
    }

    #[test]
    fn only_tcp_segmentation_stays_with_gso() {
        for keep in GSO_KEPT
            .iter()
            .chain(&["tx-checksum-ip-generic", "tx-scatter-gather"])
        {
            assert!(!gso_feature_off(keep), "{keep}");
        }
        for off in [
            "tx-udp-segmentation",
            "tx-udp_tnl-segmentation",
            "tx-udp_tnl-csum-segmentation",
            "tx-gre-segmentation",
            "tx-sctp-segmentation",
            "tx-gso-list",
            "tx-gso-partial",
            "tx-checksum-sctp",
        ] {
            assert!(gso_feature_off(off), "{off}");
        }
    }

    #[test]
    fn alias_pid() {
        assert_eq!(owner_pid("mvc-xdp pid=42"), Some(42));
        assert_eq!(owner_pid("mvc-xdp pid=x"), None);
        assert_eq!(owner_pid("something else"), None);
    }
}
