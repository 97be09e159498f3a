//! `sockperf ping-pong` between two lab namespaces: UDP request/reply latency, one message
//! in flight at a time, as Debian's `sockperf` measures it (one-way latency = half of each
//! round trip, in microseconds).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use lab::{Error, Lab, Result};
use serde::Serialize;

/// Ports of successive servers (one per run, so a lingering server never answers a later
/// run).
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// One ping-pong run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PingPong {
    /// Median one-way latency (half the round trip), us.
    pub p50_us: f64,
    /// 99th percentile, us.
    pub p99_us: f64,
    /// Mean, us.
    pub avg_us: f64,
    /// Replies received in the measured interval.
    pub replies: u64,
}

/// Parses the output of `sockperf ping-pong` (its summary lines); `None` when a figure is
/// missing.
pub fn parse(out: &str) -> Option<PingPong> {
    let mut p50 = None;
    let mut p99 = None;
    let mut avg = None;
    let mut replies = None;
    for line in out.lines() {
        let num_after = |key: &str| -> Option<f64> {
            let rest = line.split(key).nth(1)?;
            let t: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            t.parse().ok()
        };
        if line.contains("percentile 50.000") {
            p50 = num_after("=");
        } else if line.contains("percentile 99.000") {
            p99 = num_after("=");
        } else if line.contains("avg-latency=") {
            avg = num_after("avg-latency=");
        } else if line.contains("ReceivedMessages=") {
            // The last one is the measured interval (the warm-up is reported first).
            replies = num_after("ReceivedMessages=").map(|x| x as u64);
        }
    }
    Some(PingPong {
        p50_us: p50?,
        p99_us: p99?,
        avg_us: avg?,
        replies: replies?,
    })
}

/// Installs Debian's `sockperf` when it is missing.
pub fn ensure_installed() -> anyhow::Result<()> {
    let present = std::process::Command::new("sockperf")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    eprintln!("installing sockperf (apt-get install -y)");
    let out = std::process::Command::new("apt-get")
        .args([
            "-o",
            "DPkg::Lock::Timeout=300",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "sockperf",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(std::process::Stdio::null())
        .output()?;
    if !out.status.success() {
        anyhow::bail!(
            "apt-get install -y sockperf: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One run of `secs` seconds: a sockperf server on `dst` in `server`, the client in
/// `client`, 64-byte messages. The server is stopped afterwards, also on failure.
pub fn ping_pong(
    lab: &Lab,
    client: &str,
    server: &str,
    dst: Ipv4Addr,
    secs: u32,
) -> Result<PingPong> {
    let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
    let port = 11_111 + (std::process::id() as u16).wrapping_add(n) % 2000;
    let (d, p, t) = (dst.to_string(), port.to_string(), secs.to_string());
    let srv = lab.spawn(
        server,
        &format!("sockperf-server-{port}"),
        &["sockperf", "server", "-i", &d, "-p", &p],
    )?;
    let filter = format!("sport = :{port}");
    let r = lab
        .wait_until("sockperf server listening", Duration::from_secs(5), || {
            lab.exec(server, &["ss", "-Hlun", &filter])
                .is_ok_and(|o| !o.stdout.trim().is_empty())
        })
        .and_then(|()| {
            let limit = Duration::from_secs(u64::from(secs) + 30);
            let out = lab.exec_timeout(
                client,
                &[
                    "sockperf",
                    "ping-pong",
                    "-i",
                    &d,
                    "-p",
                    &p,
                    "-t",
                    &t,
                    "-m",
                    "64",
                ],
                limit,
            )?;
            parse(&out.stdout).ok_or_else(|| Error::Parse {
                what: "sockperf ping-pong".into(),
                detail: out.stdout.chars().take(400).collect(),
            })
        });
    lab.stop(&srv);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "sockperf: == version #3.7-no.git ==
sockperf[CLIENT] send on:sockperf: using recvfrom() to block on socket(s)
[ 0] IP = 198.19.60.1     PORT = 11111 # UDP
sockperf: Warmup stage (sending a few dummy messages)...
sockperf: Starting test...
sockperf: Test end (interrupted by timer)
sockperf: Test ended
sockperf: [Total Run] RunTime=3.000 sec; Warm up time=400 msec; SentMessages=14044; ReceivedMessages=14043
sockperf: ========= Printing statistics for Server No: 0
sockperf: [Valid Duration] RunTime=2.550 sec; SentMessages=12945; ReceivedMessages=12944
sockperf: \x1b[2;35m====> avg-latency=80.673 (std-dev=332.090)\x1b[0m
sockperf: # dropped messages = 0; # duplicated messages = 0; # out-of-order messages = 0
sockperf: Summary: Latency is 80.673 usec
sockperf: \x1b[2;35mTotal 12944 observations\x1b[0m; each percentile contains 129.44 observations
sockperf: ---> <MAX> observation = 6512.210
sockperf: ---> percentile 99.999 = 6512.210
sockperf: ---> percentile 99.000 = 1707.474
sockperf: ---> percentile 90.000 =   78.872
sockperf: ---> percentile 50.000 =   27.661
sockperf: ---> <MIN> observation =   44.751
";

    #[test]
    fn parses_the_summary() {
        let p = parse(OUT).unwrap();
        assert_eq!(p.p50_us, 27.661);
        assert_eq!(p.p99_us, 1707.474);
        assert_eq!(p.avg_us, 80.673);
        assert_eq!(p.replies, 12944);
    }

    #[test]
    fn missing_figures_are_none() {
        assert_eq!(parse(""), None);
        let cut: String = OUT
            .lines()
            .filter(|l| !l.contains("percentile 99.000"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(parse(&cut), None);
    }
}
