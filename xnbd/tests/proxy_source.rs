//! The proxy as a process against an awkward real source (nbdkit's `blocksize-policy`
//! filter: advertised block size limits), and two proxies on one cache (exit status, the
//! lock a killed proxy leaves behind). Failing, slow, silent and vanishing sources are
//! scripted in-process in `proxy_fake.rs`.

mod common;

use common::{nbdkit, ok, query, run, src_uri, u, ProxyRun, XNBD};

const MIB: u64 = 1 << 20;
/// Exit status of `xnbd proxy` when its cache is in use.
const EXIT_LOCKED: i32 = 75;

fn qemu_io(uri: &str, cmds: &[&str]) -> std::process::Output {
    let mut a = vec!["-f", "raw"];
    for c in cmds {
        a.extend_from_slice(&["-c", c]);
    }
    a.push(uri);
    run(60, "qemu-io", &a)
}

fn failed(o: &std::process::Output) -> bool {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    !o.status.success() || text.contains("error")
}

/// A source advertising 16 KiB minimum and 512 KiB maximum block sizes and refusing
/// anything else: large on-demand reads, unaligned reads with a 4 KiB proxy block, and the
/// background copy with 2 MiB chunks all stay within the limits, and the data matches.
#[test]
fn source_block_size_limits_are_respected() {
    require!("nbdkit", "qemu-io");
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    common::make_image(&src, 16 * MIB, 16 * MIB, 21);
    let ssock = d.path().join("src.sock");
    let slog = d.path().join("nbdkit-reads.log");
    let _source = nbdkit(
        &ssock,
        &[
            "--filter=log",
            "--filter=blocksize-policy",
            "file",
            src.to_str().unwrap(),
            &format!("logfile={}", slog.display()),
            "blocksize-minimum=16384",
            "blocksize-preferred=65536",
            "blocksize-maximum=524288",
            "blocksize-error-policy=error",
        ],
        &d.path().join("nbdkit.log"),
    );
    let p = ProxyRun::new(d.path(), "proxy");
    let _proxy = p.start(
        &src_uri(&ssock),
        &[
            "--block-size",
            "4K",
            "--no-background",
            "--background-chunk",
            "2M",
            "--readahead",
            "0",
        ],
        "proxy.log",
    );
    // 3 MiB in one client request (6 source requests), then 4 KiB blocks inside 16 KiB
    // source blocks.
    let o = qemu_io(
        &p.uri(),
        &["read 1M 3M", "read 5M 4k", "read 6148k 8k", "read 8M 1536k"],
    );
    assert!(!failed(&o), "{o:?}");
    // Replies do not wait for the fetched blocks to be stored and marked.
    common::wait_status(&p.ctl, std::time::Duration::from_secs(10), |q| {
        u(q, "cached_blocks") == u(q, "fetched_blocks")
    });
    let cache = std::fs::read(&p.cache).unwrap();
    let want = std::fs::read(&src).unwrap();
    assert_eq!(cache[1 << 20..4 << 20], want[1 << 20..4 << 20]);
    assert_eq!(
        cache[5 << 20..(5 << 20) + 4096],
        want[5 << 20..(5 << 20) + 4096]
    );
    let q = query(&p.ctl);
    assert_eq!(u(&q, "source_errors"), 0, "{q}");

    // The background copy in chunks four times the source's maximum.
    let q = p.cache_all();
    assert_eq!(u(&q, "cached_blocks"), u(&q, "total_blocks"), "{q}");
    assert_eq!(u(&q, "source_errors"), 0, "{q}");
    assert!(common::same_bytes(&p.cache, &src));

    let reads = common::nbdkit_reads(&slog);
    assert!(reads.len() >= 32, "{} reads", reads.len());
    for &(off, count) in &reads {
        assert!(
            count <= 512 << 10,
            "read of {count} at {off} over the maximum"
        );
        assert!(
            off % 16384 == 0 && count % 16384 == 0,
            "read of {count} at {off} not aligned to the minimum"
        );
    }
    // Large requests were split at the maximum, not into small pieces.
    assert!(
        reads.iter().any(|&(_, c)| c == 512 << 10),
        "no read used the maximum"
    );
}

/// A second proxy on a cache in use is refused with one line and its own exit status, and
/// changes nothing; a proxy killed with SIGKILL leaves no lock behind.
#[test]
fn one_proxy_per_cache_and_no_stale_lock() {
    require!("nbdkit", "qemu-io");
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    common::make_image(&src, 8 * MIB, 8 * MIB, 24);
    let ssock = d.path().join("src.sock");
    let _source = nbdkit(
        &ssock,
        &["file", src.to_str().unwrap()],
        &d.path().join("nbdkit.log"),
    );
    let a = ProxyRun::new(d.path(), "a");
    let mut pa = a.start(&src_uri(&ssock), &["--no-background"], "a.log");
    ok(
        30,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 1M 64k", &a.uri()],
    );
    let bitmap = d.path().join("cache.img.bitmap");
    let before = std::fs::read(&bitmap).unwrap();

    // Same cache, other sockets: refused before it touches anything.
    let b = ProxyRun::new(d.path(), "b");
    let src_b = src_uri(&ssock);
    let o = run(30, XNBD, &b.args(&src_b, &[]));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(EXIT_LOCKED), "{o:?}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("in use by another process"), "{err}");
    assert!(err.contains(&format!("pid {}", pa.pid())), "{err}");
    assert!(!b.sock.exists() && !b.ctl.exists());
    assert_eq!(std::fs::read(&bitmap).unwrap(), before);
    // The first proxy is unaffected.
    let o = qemu_io(&a.uri(), &["read -P 0x5a 1M 64k"]);
    assert!(!failed(&o), "{o:?}");

    // Killed: the next proxy starts on the same cache and keeps the write.
    pa.kill9();
    let c = ProxyRun::new(d.path(), "c");
    let _pc = c.start(&src_uri(&ssock), &["--no-background"], "c.log");
    let q = query(&c.ctl);
    assert_eq!(q["mode"], "proxy", "{q}");
    let o = qemu_io(&c.uri(), &["read -P 0x5a 1M 64k"]);
    assert!(!failed(&o), "{o:?}");
}
