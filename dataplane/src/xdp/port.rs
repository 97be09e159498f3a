//! The edge's port on the VM bridge: a veth pair the edge creates, enslaves
//! (one end) to the bridge and removes on exit.
//!
//! Names: the bridge side is the port name the operator gave (what `bridge
//! link` shows, like the TAP of the TAP path); the edge side, where the XDP
//! program runs, is that name with `.x` appended. Without a bridge name the
//! bridge side is left for the operator to enslave, exactly like a TAP made
//! with `--create-tap`.
//!
//! GSO: the bridge side is created with `gso_max_segs 1`, so the kernel
//! segments TCP/UDP super-packets of the VMs *before* they enter the veth and
//! every frame the XDP program sees is at most one MTU (AF_XDP carries no
//! segmentation metadata; a 64 KiB GSO frame could not be sent on as is). Both ends carry the alias
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
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    let err = |msg: String| PortError::Ip {
        args: format!("(ethtool) {dev} {what}"),
        msg,
    };
    if dev.len() >= libc::IFNAMSIZ {
        return Err(err("name too long".into()));
    }
    let mut value = EthtoolValue { cmd, data };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut value,
        _pad: [0; 16],
    };
    req.name[..dev.len()].copy_from_slice(dev.as_bytes());
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error().to_string()));
    }
    // SAFETY: SIOCETHTOOL reads an ifreq whose data points at a live
    // ethtool_value; both outlive the call.
    let r = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &mut req as *mut IfReq) };
    let e = std::io::Error::last_os_error();
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    if r != 0 {
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
    pub fn create(
        bridge: Option<&str>,
        name: &str,
        mtu: u32,
        queues: u32,
    ) -> Result<Self, PortError> {
        check_name(name)?;
        if let Some(bridge) = bridge {
            match link_info(bridge)? {
                Some(LinkInfo { kind: Some(k), .. }) if k == "bridge" => {}
                _ => return Err(PortError::NotABridge(bridge.to_owned())),
            }
        }
        // Checksums: with tx checksum offload on the bridge side, the VMs'
        // TCP/UDP frames cross the veth with only the pseudo-header sum in
        // the checksum field (CHECKSUM_PARTIAL) and AF_XDP would hand them on
        // like that. Off, the kernel completes the checksum before the veth
        // (and, TSO depending on it, segments in software).
        for gone in sweep_stale()? {
            tracing::info!(port = %gone, "removed XDP port left by an edge that is gone");
        }
        remove_stale(name)?;
        let edge = edge_side(name);
        let alias = format!("{ALIAS_PREFIX}{}", std::process::id());
        let mtu = mtu.to_string();
        let q = queues.max(1).to_string();
        ip(&[
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
            "gso_max_segs",
            "1",
        ])?;
        // From here on, drop removes the pair.
        let mut port = Self {
            name: name.to_owned(),
            edge,
            gro: false,
        };
        ip(&["link", "set", "dev", &port.edge, "alias", &alias])?;
        tx_checksum_off(&port.name)?;
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
    fn alias_pid() {
        assert_eq!(owner_pid("mvc-xdp pid=42"), Some(42));
        assert_eq!(owner_pid("mvc-xdp pid=x"), None);
        assert_eq!(owner_pid("something else"), None);
    }
}
