//! `bench limits`: what one core of this machine can do for the edge's data path, without
//! any I/O: AES-256-GCM and ChaCha20-Poly1305 sealing and opening through the edge's own
//! [`AeadKey`] (ring), at a full-size datagram and at a whole 64 KiB super-frame, and
//! memcpy from cache (64 KiB, what the edge copies per TSO batch) and from memory (64 MiB).
//! Rates are per second of the measuring thread's own CPU time, so that a loaded machine
//! shows what a core does when the primitive has it (docs/BENCH.md, "where the time goes").

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use bench::thread_cpu_time;
use dataplane::crypto::{AeadKey, Cipher};
use serde::Serialize;

use super::{utc_now, write_json, Machine};

/// Options of `bench limits`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// CPU seconds per measurement (the median of `--runs` is reported).
    #[arg(long, default_value_t = 0.5)]
    pub secs: f64,
    /// Runs per measurement.
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
    /// Where to write the JSON result.
    #[arg(long, default_value = "results")]
    pub results: PathBuf,
}

/// One measured primitive.
#[derive(Debug, Serialize)]
pub struct Limit {
    /// What was measured.
    pub what: String,
    /// Bytes per call.
    pub bytes: usize,
    /// Gbit/s per CPU second of each run.
    pub gbps_runs: Vec<f64>,
    /// Median Gbit/s.
    pub gbps: f64,
    /// Best run, Gbit/s: on a shared machine other jobs only ever slow a run down, so the
    /// best run is the nearer estimate of what the core can do.
    pub best_gbps: f64,
}

#[derive(Serialize)]
struct Report<'a> {
    bench: &'static str,
    date: String,
    machine: Machine,
    secs: f64,
    runs: u32,
    limits: &'a [Limit],
}

/// Calls `f` (which handles `bytes` bytes) for about `secs` seconds of this thread's CPU
/// time; returns Gbit/s per CPU second (time the thread waited for the CPU while other
/// jobs ran does not count). Bounded by twice `secs` of wall time as well.
fn rate(bytes: usize, secs: f64, mut f: impl FnMut(u64)) -> f64 {
    let limit = Duration::from_secs_f64(secs);
    let (t0, c0) = (Instant::now(), thread_cpu_time());
    let mut n = 0u64;
    // Checked every 16 calls: the clock costs more than a small call.
    let cpu = loop {
        for _ in 0..16 {
            f(n);
            n += 1;
        }
        let cpu = thread_cpu_time().saturating_sub(c0);
        if cpu >= limit || t0.elapsed() >= 2 * limit {
            break cpu;
        }
    };
    let secs = if cpu.is_zero() { t0.elapsed() } else { cpu };
    (n as f64 * bytes as f64 * 8.0) / secs.as_secs_f64().max(1e-9) / 1e9
}

fn measure(what: &str, bytes: usize, a: &Args, mut f: impl FnMut(u64)) -> Limit {
    let gbps_runs: Vec<f64> = (0..a.runs).map(|_| rate(bytes, a.secs, &mut f)).collect();
    let gbps = lab::median(&gbps_runs).unwrap_or(0.0);
    let best_gbps = gbps_runs.iter().copied().fold(0.0, f64::max);
    eprintln!("  {what:<40} {bytes:>8} B  {gbps:>7.2} Gb/s (best {best_gbps:.2})");
    Limit {
        what: what.into(),
        bytes,
        gbps_runs,
        gbps,
        best_gbps,
    }
}

/// Seal, and seal then open, through `AeadKey` at `len` bytes.
fn aead(cipher: Cipher, len: usize, a: &Args, out: &mut Vec<Limit>) {
    let key = AeadKey::new(cipher, &[7u8; 32]);
    let aad = [1u8; 40];
    let mut buf = vec![0x5au8; len + 16];
    out.push(measure(&format!("{} seal", cipher.name()), len, a, |n| {
        let _ = black_box(key.seal(n, &aad, &mut buf, len));
    }));
    // Opening needs a valid tag: seal a fresh copy each time and count both passes.
    let mut sealed = vec![0x5au8; len + 16];
    out.push(measure(
        &format!("{} seal + open", cipher.name()),
        len,
        a,
        |n| {
            let _ = key.seal(n, &aad, &mut sealed, len);
            let _ = black_box(key.open(n, &aad, &mut sealed[..len + 16]));
        },
    ));
}

/// memcpy of `len` bytes between two buffers (cached when small).
fn copy(len: usize, a: &Args, out: &mut Vec<Limit>) {
    let src = vec![0x33u8; len];
    let mut dst = vec![0u8; len];
    out.push(measure("memcpy", len, a, |_| {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    }));
}

/// The markdown table.
pub fn table(rows: &[Limit], runs: u32) -> String {
    let mut s = format!(
        "| primitive (one core) | bytes per call | Gb/s (median of {runs}) | best run Gb/s | best GB/s |\n|---|---:|---:|---:|---:|\n"
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} |\n",
            r.what,
            r.bytes,
            r.gbps,
            r.best_gbps,
            r.best_gbps / 8.0
        ));
    }
    s
}

/// `bench limits`.
pub fn run(a: &Args) -> anyhow::Result<()> {
    if !(0.05..=10.0).contains(&a.secs) || !(1..=20).contains(&a.runs) {
        bail!("--secs must be 0.05..=10 and --runs 1..=20");
    }
    let (date, stamp) = utc_now();
    let machine = Machine::probe();
    eprintln!("bench limits: {date}, {}", machine.line());
    let mut rows = Vec::new();
    for len in [1400, 65_536] {
        aead(Cipher::Aes256Gcm, len, a, &mut rows);
        aead(Cipher::Chacha20Poly1305, len, a, &mut rows);
    }
    for len in [1400, 65_536, 64 << 20] {
        copy(len, a, &mut rows);
    }
    let md = table(&rows, a.runs);
    println!("\n{date}, {}\n\n{md}", machine.line());
    let report = Report {
        bench: "limits",
        date,
        machine,
        secs: a.secs,
        runs: a.runs,
        limits: &rows,
    };
    let p = write_json(&a.results, &format!("limits-{stamp}.json"), &report)?;
    eprintln!("results: {}", p.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_counts_bytes_per_second() {
        let mut calls = 0u64;
        let g = rate(1000, 0.02, |_| calls += 1);
        assert!(calls >= 16 && calls % 16 == 0);
        assert!(g > 0.0);
    }

    #[test]
    fn table_has_a_row_per_limit() {
        let rows = vec![Limit {
            what: "memcpy".into(),
            bytes: 64,
            gbps_runs: vec![8.0],
            gbps: 8.0,
            best_gbps: 16.0,
        }];
        let t = table(&rows, 1);
        assert!(t.contains("| memcpy | 64 | 8.00 | 16.00 | 2.00 |"), "{t}");
    }
}
