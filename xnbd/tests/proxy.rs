//! The migration proxy against real sources (nbdkit with log/delay/rate filters standing in
//! for a WAN, qemu-nbd, xnbd over TLS) and real clients.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{nbdkit, ok, query, run, src_uri, u, wait_status, xnbd, ProxyRun};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 * 1024;

#[test]
fn on_demand_writes_readahead_cache_all_switch() {
    require!("nbdkit", "qemu-io", "qemu-img", "nbdcopy");
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    let expected = d.path().join("expected.img");
    common::make_image(&src, 32 * MIB, 24 * MIB, 11);
    std::fs::copy(&src, &expected).unwrap();
    let ssock = d.path().join("src.sock");
    let slog = d.path().join("nbdkit-reads.log");
    let mut source = nbdkit(
        &ssock,
        &[
            "--filter=log",
            "--filter=delay",
            "file",
            src.to_str().unwrap(),
            &format!("logfile={}", slog.display()),
            "delay-read=5ms",
        ],
        &d.path().join("nbdkit.log"),
    );
    let p = ProxyRun::new(d.path(), "proxy");
    let _proxy = p.start(&src_uri(&ssock), &["--no-background"], "proxy.log");
    let q = query(&p.ctl);
    assert_eq!(q["mode"], "proxy");
    assert_eq!(u(&q, "total_blocks"), 512);
    assert_eq!(u(&q, "cached_blocks"), 0);

    // On-demand read of 4 MiB: exactly those blocks arrive, with the source's bytes (the
    // reply does not wait for them to be stored and marked).
    ok(60, "qemu-io", &["-f", "raw", "-c", "read 2M 4M", &p.uri()]);
    let q = wait_status(&p.ctl, Duration::from_secs(10), |q| {
        u(q, "cached_blocks") >= 64
    });
    assert_eq!(u(&q, "cached_blocks"), 64, "{q}");
    assert_eq!(u(&q, "demand_blocks"), 64, "{q}");
    // Link counters: 4 MiB went to the client, exactly those bytes came from the source.
    assert!(u(&q, "client_read_bytes") >= 4 * MIB, "{q}");
    assert_eq!(u(&q, "demand_bytes"), 4 * MIB, "{q}");
    assert_eq!(u(&q, "background_bytes"), 0, "{q}");
    assert_eq!(u(&q, "client_write_bytes"), 0, "{q}");
    let cache = std::fs::read(&p.cache).unwrap();
    let want = std::fs::read(&src).unwrap();
    assert_eq!(cache[2 << 20..6 << 20], want[2 << 20..6 << 20]);

    // Sequential reads trigger readahead (1 MiB by default).
    ok(
        60,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read 8M 64k",
            "-c",
            "read 8256k 64k",
            &p.uri(),
        ],
    );
    wait_status(&p.ctl, Duration::from_secs(20), |q| {
        u(q, "cached_blocks") >= 64 + 2 + 16
    });

    // Writes stay local: a partial block is fetched first, full blocks are not fetched.
    let writes = [
        "write -P 0x77 100000 5000",
        "write -P 0x66 16M 1M",
        "write -z 20M 128k",
    ];
    let mut args = vec!["-f", "raw"];
    for w in &writes {
        args.extend_from_slice(&["-c", w]);
    }
    let mut local = args.clone();
    let puri = p.uri();
    args.push(&puri);
    ok(60, "qemu-io", &args);
    local.push(expected.to_str().unwrap());
    ok(60, "qemu-io", &local);
    let q = query(&p.ctl);
    assert!(u(&q, "written_blocks") >= 16 + 2, "{q}");
    // Only WRITE carries a payload: 5000 bytes (the client may widen it to its alignment)
    // + 1 MiB, not the 128 KiB write-zeroes range.
    let w = u(&q, "client_write_bytes");
    assert!((5000 + MIB..5000 + MIB + 4096).contains(&w), "{q}");

    // Switch is refused while blocks are missing.
    let o = p.ctl(&["switch"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("still at the source"));

    // Copy everything, concurrently with a client reading the whole export.
    let reader = {
        let uri = p.uri();
        let out = d.path().join("during.img");
        std::thread::spawn(move || {
            let o = run(120, "nbdcopy", &[&uri, out.to_str().unwrap()]);
            (o, out)
        })
    };
    let q = p.cache_all();
    assert_eq!(u(&q, "cached_blocks"), 512, "{q}");
    let (o, during) = reader.join().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        common::same_bytes(&during, &expected),
        "client read wrong data during the copy"
    );
    let q = wait_status(&p.ctl, Duration::from_secs(10), |q| q["mode"] == "target");
    assert_eq!(q["source_connected"], false);
    assert!(p.ctl(&["switch"]).status.success());

    // The local image is byte-identical to the source plus the client's writes.
    assert!(common::same_bytes(&p.cache, &expected));
    // No block was fetched twice, and the fully written blocks were never fetched.
    let counts = common::fetch_counts(&common::nbdkit_reads(&slog), BLOCK);
    assert!(
        counts.values().all(|&c| c == 1),
        "a block was fetched twice: {counts:?}"
    );
    for b in (16 * MIB / BLOCK)..(17 * MIB / BLOCK) {
        assert!(
            !counts.contains_key(&b),
            "block {b} was fetched although fully written"
        );
    }

    // The source is gone for good: clients carry on against the local copy.
    source.kill9();
    ok(
        60,
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            expected.to_str().unwrap(),
            &p.uri(),
        ],
    );
    ok(
        30,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "read -P 0x11 0 64k",
            &p.uri(),
        ],
    );
}

#[test]
fn crash_and_resume_fetches_no_block_twice() {
    require!("nbdkit");
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    common::make_image(&src, 32 * MIB, 32 * MIB, 12);
    let ssock = d.path().join("src.sock");
    let slog = d.path().join("nbdkit-reads.log");
    // The rate filter stands in for a slow link (the copy takes a few seconds).
    let start_source = |log: &Path, out: &str| {
        nbdkit(
            &ssock,
            &[
                "--filter=log",
                "--filter=rate",
                "file",
                src.to_str().unwrap(),
                &format!("logfile={}", log.display()),
                "rate=64M",
            ],
            &d.path().join(out),
        )
    };
    let mut source = start_source(&slog, "nbdkit.log");
    let p = ProxyRun::new(d.path(), "proxy");
    let mut proxy = p.start(&src_uri(&ssock), &[], "proxy1.log");
    let before = wait_status(&p.ctl, Duration::from_secs(30), |q| {
        u(q, "cached_blocks") >= 128
    });
    proxy.kill9();
    // nbdkit 1.32 can abort when a client vanishes with reads in flight (an assertion in
    // its socket code); the source then restarts, logging to a second file.
    let slog2 = d.path().join("nbdkit-reads2.log");
    std::thread::sleep(Duration::from_millis(200));
    if source.child.try_wait().unwrap().is_some() {
        eprintln!("nbdkit died with the proxy's connection; restarting it");
        source = start_source(&slog2, "nbdkit2.log");
    }
    assert!(
        u(&before, "cached_blocks") < 512,
        "copy finished before the crash: {before}"
    );

    // Restart without the background copy so the resume point can be read exactly.
    let _proxy = p.start(&src_uri(&ssock), &["--no-background"], "proxy2.log");
    let after = query(&p.ctl);
    assert_eq!(u(&after, "fetched_blocks"), 0);
    assert!(
        u(&after, "cached_blocks") >= u(&before, "cached_blocks"),
        "lost cached blocks: before {before} after {after}"
    );
    let resumed_with = u(&after, "cached_blocks");
    let q = p.cache_all();
    assert_eq!(u(&q, "cached_blocks"), 512);
    assert!(common::same_bytes(&p.cache, &src));
    // This process fetched only what was missing at its start.
    let q = query(&p.ctl);
    assert_eq!(u(&q, "fetched_blocks"), 512 - resumed_with, "{q}");
    // At the source: every block read, and only blocks in flight at the crash read twice
    // (at most 4 background requests of 1 MiB = 64 blocks; no client read here).
    let mut reads = common::nbdkit_reads(&slog);
    reads.extend(common::nbdkit_reads(&slog2));
    drop(source);
    let counts = common::fetch_counts(&reads, BLOCK);
    assert_eq!(counts.len(), 512);
    let twice: Vec<_> = counts.iter().filter(|(_, &c)| c > 1).collect();
    assert!(
        twice.len() <= 64,
        "{} blocks fetched twice: {twice:?}",
        twice.len()
    );
    assert!(counts.values().all(|&c| c <= 2));
}

/// Cold reads are answered before their blocks are written, made durable and marked. A
/// kill -9 at any moment must still never leave a bit set over data that is not in the
/// cache: after each kill, every marked block holds the source's bytes.
#[test]
fn kill9_during_cold_reads_marks_only_stored_blocks() {
    require!("nbdkit", "nbdcopy");
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    common::make_image(&src, 32 * MIB, 32 * MIB, 13);
    let want = std::fs::read(&src).unwrap();
    let ssock = d.path().join("src.sock");
    // Slow enough that the kill lands while reads are in flight and stores are pending.
    let start_source = |out: &str| {
        nbdkit(
            &ssock,
            &[
                "--filter=delay",
                "--filter=rate",
                "file",
                src.to_str().unwrap(),
                "delay-read=2ms",
                // 8 MiB/s (the filter counts bits), no initial burst: 4 s for the disk.
                "rate=64M",
                "burstiness=0.1",
            ],
            &d.path().join(out),
        )
    };
    let mut source = start_source("nbdkit0.log");
    let p = ProxyRun::new(d.path(), "proxy");
    let bitmap = d.path().join("cache.img.bitmap");
    let mut marked = Vec::new();
    for round in 0..3 {
        let mut proxy = p.start(
            &src_uri(&ssock),
            &["--no-background"],
            &format!("proxy{round}.log"),
        );
        // Many reads in flight: 4 connections reading the whole disk (with readahead).
        let mut reader = std::process::Command::new("nbdcopy")
            .args(["--connections=4", &p.uri(), "null:"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Killed once the first blocks are marked, while the rest are on their way.
        if round == 0 {
            wait_status(&p.ctl, Duration::from_secs(20), |q| {
                u(q, "cached_blocks") > 0
            });
        }
        std::thread::sleep(Duration::from_millis(20 + 60 * round));
        proxy.kill9();
        let _ = reader.kill();
        let _ = reader.wait();
        let bm = std::fs::read(&bitmap).unwrap();
        let cache = std::fs::read(&p.cache).unwrap();
        let mut n = 0;
        for i in 0..512usize {
            if bm[32 + i / 8] >> (i % 8) & 1 == 1 {
                n += 1;
                let r = i * BLOCK as usize..(i + 1) * BLOCK as usize;
                assert!(
                    cache[r.clone()] == want[r],
                    "round {round}: block {i} marked but not stored"
                );
            }
        }
        marked.push(n);
        // nbdkit 1.32 can abort when a client vanishes with reads in flight.
        std::thread::sleep(Duration::from_millis(100));
        if source.child.try_wait().unwrap().is_some() {
            source = start_source(&format!("nbdkit{}.log", round + 1));
        }
    }
    eprintln!("blocks marked after each kill: {marked:?}");
    // The kills landed mid-copy, and what was marked before a kill stayed marked.
    assert!(
        marked[0] > 0 && marked[0] < 512,
        "marked per round: {marked:?}"
    );
    assert!(marked.windows(2).all(|w| w[0] <= w[1]), "{marked:?}");
}

#[test]
fn sources_qemu_nbd_and_xnbd_over_tls() {
    require!("qemu-nbd", "openssl");
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    common::make_image(&src, 8 * MIB, 6 * MIB, 14);

    // qemu-nbd as the source.
    let qsock = d.path().join("q.sock");
    let _q = {
        let mut pr = common::spawn(
            "qemu-nbd",
            &[
                "-f",
                "raw",
                "-r",
                "-t",
                "-k",
                qsock.to_str().unwrap(),
                src.to_str().unwrap(),
            ],
            &d.path().join("qemu-nbd.log"),
        );
        assert!(
            common::wait_path(&qsock, Duration::from_secs(10)),
            "{}",
            pr.log_text()
        );
        let _ = &mut pr;
        pr
    };
    let pdir = d.path().join("p1");
    std::fs::create_dir(&pdir).unwrap();
    let p = ProxyRun::new(&pdir, "proxy");
    let _proxy = p.start(&src_uri(&qsock), &[], "proxy.log");
    p.cache_all();
    assert!(common::same_bytes(&p.cache, &src));
    // The status table, under its name and under its older one.
    for verb in ["status", "query"] {
        let o = p.ctl(&[verb]);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && text.contains("health:    ok"),
            "{verb}: {o:?}"
        );
        assert!(text.contains("mode:      target"), "{verb}: {text}");
    }

    // xnbd serve with TLS required as the source, the proxy verifying it with the CA.
    let certs = d.path().join("pki");
    std::fs::create_dir(&certs).unwrap();
    assert!(common::make_certs(&certs));
    let port = common::free_port();
    let tsock = d.path().join("tls.sock");
    let _srv = xnbd(
        &[
            "serve",
            "--export",
            &format!("vm={}:ro", src.display()),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--unix",
            tsock.to_str().unwrap(),
            "--tls-cert",
            certs.join("server-cert.pem").to_str().unwrap(),
            "--tls-key",
            certs.join("server-key.pem").to_str().unwrap(),
        ],
        &d.path().join("tls-serve.log"),
        &tsock,
    );
    assert!(common::wait_tcp(port, Duration::from_secs(10)));
    let pdir = d.path().join("p2");
    std::fs::create_dir(&pdir).unwrap();
    let p = ProxyRun::new(&pdir, "proxy");
    let ca = certs.join("ca-cert.pem");
    let source = format!("127.0.0.1:{port}");
    let _proxy = p.start(
        &source,
        &[
            "--source-export",
            "vm",
            "--source-tls-ca",
            ca.to_str().unwrap(),
            "--source-tls-name",
            "localhost",
        ],
        "proxy.log",
    );
    p.cache_all();
    assert!(common::same_bytes(&p.cache, &src));
}

#[test]
fn forced_switch_drops_the_source_with_blocks_missing() {
    require!("nbdkit", "qemu-io");
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    common::make_image(&src, 4 * MIB, 4 * MIB, 15);
    let ssock = d.path().join("src.sock");
    let _source = nbdkit(
        &ssock,
        &["file", src.to_str().unwrap()],
        &d.path().join("nbdkit.log"),
    );
    let p = ProxyRun::new(d.path(), "proxy");
    let _proxy = p.start(
        &src_uri(&ssock),
        &["--no-background", "--readahead", "0"],
        "proxy.log",
    );
    ok(30, "qemu-io", &["-f", "raw", "-c", "read 0 64k", &p.uri()]);
    wait_status(&p.ctl, Duration::from_secs(10), |q| {
        u(q, "cached_blocks") == 1
    });
    let o = p.ctl(&["switch"]);
    assert!(!o.status.success());
    let o = p.ctl(&["--json", "switch", "--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let q: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(q["mode"], "target");
    assert_eq!(u(&q, "cached_blocks"), 1);
    // The fetched block keeps the source's bytes; missing ones read as the sparse cache
    // holds them (zeroes), as documented; nothing more is fetched.
    let out = ok(
        30,
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0 1M 64k", &p.uri()],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let cache = std::fs::read(&p.cache).unwrap();
    assert_eq!(cache[..65536], std::fs::read(&src).unwrap()[..65536]);
    let q = query(&p.ctl);
    assert_eq!(u(&q, "fetched_blocks"), 1, "{q}");
}
