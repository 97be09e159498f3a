//! VM drivers: how an agent turns a [`VmSpec`] into a running machine on a bridge.
//!
//! - [`NetnsDriver`] (`netns.rs`): a light VM, a network namespace whose `eth0` (a veth with the
//!   allocated MAC) is enslaved to the cluster bridge. Processes of the "VM" run with
//!   `ip netns exec`. The default for demos and tests: it starts in milliseconds. Its
//!   disk is a plain file; it moves by live migration too (`netns_migrate.rs`).
//! - [`QemuDriver`] (`qemu.rs`): a real VM with `qemu-system-x86_64`, a TAP on the bridge,
//!   virtio-net with the allocated MAC, KVM when it works and TCG otherwise, direct
//!   kernel boot of the guest [`guest`] builds, its disk served by `xnbd serve`
//!   over NBD on a Unix socket. It also receives VMs by live migration
//!   ([`VmDriver::start_incoming`], see [`crate::migrate`]).
//!
//! - [`LibvirtDriver`] (`libvirt.rs`): the qemu driver's VM as a libvirt domain (KVM,
//!   TCG or Xen, through `virsh` and domain XML): `start` defines a domain whose
//!   `<interface type='bridge'>` names the cluster bridge and the MAC and whose disk is
//!   the NBD export of `xnbd serve`, and starts it; `stop` destroys and undefines it.
//!   See docs/CONTROLLER.md.
pub mod guest;
mod libvirt;
mod netns;
mod netns_migrate;
mod qemu;
mod vmfiles;

pub use libvirt::{LibvirtConfig, LibvirtDriver, METADATA_NS as LIBVIRT_METADATA_NS};
pub use netns::{NetnsDriver, DISK_BYTES as NETNS_DISK_BYTES};
pub use netns_migrate::{files as netns_files, xnbd_bin as netns_xnbd_bin};
pub use qemu::{QemuConfig, QemuDriver};
pub use vmfiles::parse_lease;

use crate::process::ProcessError;
use crate::proto::VmSpec;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Child;

/// Driver failures.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A helper command failed.
    #[error("`{cmd}` failed: {msg}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its stderr or the spawn error.
        msg: String,
    },
    /// The driver cannot do this.
    #[error("the {driver} driver does not support {what}")]
    Unsupported {
        /// Driver name.
        driver: &'static str,
        /// The operation.
        what: &'static str,
    },
    /// Configuration problem.
    #[error("{0}")]
    Config(String),
    /// A helper process could not be run or failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
}

/// Whether a network device of this name exists in this network namespace (asked for
/// by name with one ioctl, not `ip link show`: no process per check; and not
/// `/sys/class/net`, which shows the namespace sysfs was mounted in).
pub fn link_exists(name: &str) -> bool {
    crate::sys::if_index(name).is_some()
}

/// A VM the driver started: its handle and the helper processes it owns.
pub struct RunningVm {
    /// `netns:<name>`, `qemu:<tap>:<vm>` or `libvirt:<tap>:<vm>`.
    pub handle: String,
    /// Helper processes (dnsmasq, DHCP client; qemu and its xnbd disk server).
    pub children: Vec<Child>,
}

/// What every VM driver does.
pub trait VmDriver: Send {
    /// Driver name (`netns`, `qemu`, `libvirt`).
    fn kind(&self) -> &'static str;
    /// Create and boot the VM on `spec.bridge` with `spec.mac`.
    fn start(&mut self, spec: &VmSpec) -> Result<RunningVm, DriverError>;
    /// Stop it and remove everything `start` created.
    fn stop(&mut self, vm: &mut RunningVm) -> Result<(), DriverError>;
    /// Remove leftovers of a VM from a previous agent run, by handle.
    fn cleanup(&mut self, handle: &str);
    /// The handle of a VM started with local name `local` and host NIC `nic` (to find
    /// what a start cut short left, before its handle was saved).
    fn handle_for(&self, local: &str, nic: &str) -> String;
    /// Whether anything of the VM behind `handle` exists on this machine.
    fn present(&self, handle: &str) -> bool;
    /// Whether the VM behind `handle` still runs (after the agent that started it
    /// died): it can be adopted as it is.
    fn alive(&self, handle: &str) -> bool;
    /// Delete what a VM keeps between starts (its disk), when its cluster is released.
    fn discard(&mut self, _vm: &str) {}
    /// Handles of VMs this driver made for this agent that none of the `known`
    /// handles names (a hypervisor's leftovers the agent's store forgot), for
    /// [`VmDriver::cleanup`].
    fn strays(&self, _known: &[String]) -> Vec<String> {
        Vec::new()
    }
    /// The IPv4 address on the VM's overlay NIC, if it has one yet.
    fn address(&self, handle: &str) -> Result<Option<Ipv4Addr>, DriverError>;
    /// Median RTT in ms from inside the VM to `target`, `None` if unreachable.
    fn ping(&self, handle: &str, target: Ipv4Addr) -> Result<Option<f64>, DriverError>;
    /// Start a VM that receives its memory from a live migration on the Unix socket
    /// `incoming`, with its disk as `disk` says.
    fn start_incoming(
        &mut self,
        _spec: &VmSpec,
        _disk: crate::migrate::IncomingDisk,
        _incoming: &Path,
    ) -> Result<RunningVm, DriverError> {
        Err(DriverError::Unsupported {
            driver: self.kind(),
            what: "live migration",
        })
    }
    /// The libvirt driver, whose domains move by libvirt's own migration
    /// ([`LibvirtDriver::migrate_out`]); `None` for the others.
    fn as_libvirt(&mut self) -> Option<&mut LibvirtDriver> {
        None
    }
    /// After the switchover of an incoming VM (it runs here now): start what it runs
    /// beside its own processes (the netns driver's DHCP client).
    fn finish_incoming(&mut self, _vm: &mut RunningVm, _name: &str) -> Result<(), DriverError> {
        Ok(())
    }
    /// The Unix socket of the guest agent (`mvc-guest`) of the VM behind `handle`,
    /// when its VMs have one (the qemu driver's).
    fn guest_agent(&self, _handle: &str) -> Option<std::path::PathBuf> {
        None
    }
}

/// The average of `rtt min/avg/max/mdev = a/b/c/d ms` from ping's summary.
pub fn parse_ping_avg(out: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.contains("min/avg/max"))?;
    let nums = line.split('=').nth(1)?.trim();
    nums.split('/').nth(1)?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::netns::{parse_inet, prefix_mask};
    use super::*;

    #[test]
    fn parsers() {
        let o = "5: eth0    inet 198.19.1.10/24 brd 198.19.1.255 scope global eth0\n";
        assert_eq!(parse_inet(o), Some(Ipv4Addr::new(198, 19, 1, 10)));
        assert_eq!(parse_inet(""), None);
        let p = "5 packets transmitted, 5 received, 0% packet loss, time 801ms\n\
                 rtt min/avg/max/mdev = 0.051/0.072/0.101/0.017 ms\n";
        assert_eq!(parse_ping_avg(p), Some(0.072));
        assert_eq!(parse_ping_avg("100% packet loss"), None);
        assert_eq!(prefix_mask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(prefix_mask(0), Ipv4Addr::new(0, 0, 0, 0));
    }
}
