//! SVG figures.
use std::path::Path;

use crate::cmd::overlay::Row;

/// Throughput and RTT against added delay.
pub fn overlay_vs_delay(_rows: &[Row], _out: &Path) -> anyhow::Result<()> {
    anyhow::bail!("plots are not built yet")
}
