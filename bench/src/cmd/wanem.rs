//! `bench wanem`: the userspace WAN emulator (being built).
use anyhow::bail;
use bench::lab::{Lab, Topology};

/// Three sites with a WAN emulator on site B's uplink.
pub fn three_sites_with_wan(_lab: &Lab, _vms: u8) -> anyhow::Result<Topology> {
    bail!("the WAN emulator is not built yet")
}

/// Sets the emulated delay.
pub fn set_delay(_lab: &Lab, _t: &Topology, _d: u32) -> anyhow::Result<()> {
    bail!("the WAN emulator is not built yet")
}
