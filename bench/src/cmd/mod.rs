//! Subcommands of the `bench` binary.

pub mod apps;
pub mod broadcast;
pub mod buildtime;
pub mod demo;
pub mod dock;
pub mod figure;
pub mod hosts;
pub mod hpl;
pub mod limits;
pub mod migrate;
pub mod nbd;
pub mod overlay;
pub mod report;
pub mod scale;
pub mod slurmlab;
pub mod wanem;

use std::path::PathBuf;

use anyhow::{bail, Context};
use serde::Serialize;

/// Finds `mvc`: the given path, or the binary next to this one (target/release/mvc).
pub fn find_mvc(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        if p.is_file() {
            return Ok(p);
        }
        bail!("--mvc {}: no such file", p.display());
    }
    let me = std::env::current_exe().context("locating the bench binary")?;
    let dir = me.parent().context("bench binary has no directory")?;
    for cand in [dir.join("mvc"), dir.join("../mvc")] {
        if cand.is_file() {
            return Ok(cand);
        }
    }
    bail!(
        "no mvc binary next to {} (build it with `cargo build --release -p control`, or pass --mvc PATH)",
        me.display()
    )
}

/// The machine a run was made on.
#[derive(Debug, Serialize)]
pub struct Machine {
    /// Kernel release.
    pub kernel: String,
    /// CPU model.
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Memory in GiB.
    pub mem_gib: f64,
}

impl Machine {
    /// Reads /proc.
    pub fn probe() -> Machine {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("unknown")
            .trim()
            .to_string();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Machine {
            kernel,
            cpu,
            cpus,
            mem_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        }
    }

    /// One line for tables.
    pub fn line(&self) -> String {
        format!(
            "{} ({} CPUs, {} GiB), Linux {}",
            self.cpu, self.cpus, self.mem_gib, self.kernel
        )
    }
}

/// UTC time now as (ISO 8601 "YYYY-MM-DDTHH:MM:SSZ", compact "YYYYMMDDTHHMMSSZ").
pub fn utc_now() -> (String, String) {
    use time::macros::format_description;
    let now = time::OffsetDateTime::now_utc();
    let iso = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    let compact = format_description!("[year][month][day]T[hour][minute][second]Z");
    (
        now.format(iso).unwrap_or_default(),
        now.format(compact).unwrap_or_default(),
    )
}

/// Writes `value` as pretty JSON to `dir/name`, creating `dir`.
pub fn write_json(
    dir: &std::path::Path,
    name: &str,
    value: &impl Serialize,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_have_both_shapes() {
        let (iso, compact) = super::utc_now();
        assert_eq!(iso.len(), 20, "{iso}");
        assert_eq!(iso.replace(['-', ':'], ""), compact);
        assert!(iso.starts_with("20") && iso.ends_with('Z'), "{iso}");
    }
}
