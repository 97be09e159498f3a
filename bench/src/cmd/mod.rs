//! Subcommands of the `bench` binary.

pub mod apps;
pub mod buildtime;
pub mod demo;
pub mod dock;
pub mod figure;
pub mod hpl;
pub mod nbd;
pub mod overlay;
pub mod report;
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
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    (
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z"),
        format!("{y:04}{mo:02}{d:02}T{h:02}{m:02}{s:02}Z"),
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
