//! Target mode (`xnbd serve`) against real clients: qemu-img, qemu-io, nbdinfo, nbdcopy,
//! fio's nbd engine, nbdfuse, and TLS with libnbd.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{ok, run, unix_uri, xnbd};

const MIB: u64 = 1 << 20;

#[test]
fn qemu_tools_and_nbdinfo() {
    require!("qemu-img", "qemu-io", "nbdinfo");
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    let other = d.path().join("other.img");
    common::make_image(&img, 64 * MIB, 8 * MIB, 1);
    common::make_image(&other, 16 * MIB, 0, 2);
    let sock = d.path().join("nbd.sock");
    let port = common::free_port();
    let listen = format!("127.0.0.1:{port}");
    let _srv = xnbd(
        &[
            "serve",
            "--export",
            &format!("disk={}", img.display()),
            "--export",
            &format!("ro={}:ro", other.display()),
            "--unix",
            sock.to_str().unwrap(),
            "--listen",
            &listen,
        ],
        &d.path().join("serve.log"),
        &sock,
    );
    assert!(common::wait_tcp(port, Duration::from_secs(10)));
    let uri = unix_uri(&sock, "disk");
    let tcp = format!("nbd://127.0.0.1:{port}/disk");

    // nbdinfo --list sees both exports with their properties.
    let list = ok(30, "nbdinfo", &["--list", &unix_uri(&sock, "")]);
    assert!(list.contains("export=\"disk\""), "{list}");
    assert!(list.contains("export=\"ro\""), "{list}");
    assert!(list.contains("base:allocation"), "{list}");
    assert!(list.contains("can_multi_conn: true"), "{list}");
    assert!(list.contains("block_size_maximum: 33554432"), "{list}");

    // --can.
    for c in ["flush", "fua", "trim", "zero", "cache", "multi-conn"] {
        let o = run(30, "nbdinfo", &["--can", c, &uri]);
        assert!(o.status.success(), "can {c}");
    }
    assert!(
        run(30, "nbdinfo", &["--can", "write", &unix_uri(&sock, "ro")])
            .status
            .code()
            == Some(2)
    );
    assert!(run(
        30,
        "nbdinfo",
        &["--is", "read-only", &unix_uri(&sock, "ro")]
    )
    .status
    .success());

    // --map shows data then a hole.
    let map = ok(30, "nbdinfo", &["--map", &tcp]);
    let lines: Vec<&str> = map.lines().collect();
    assert!(lines[0].contains("data"), "{map}");
    assert!(lines.last().unwrap().contains("hole,zero"), "{map}");

    // qemu-img info / convert / compare over TCP and Unix.
    let info = ok(30, "qemu-img", &["info", &tcp]);
    assert!(info.contains("67108864"), "{info}");
    let copy = d.path().join("copy.qcow2");
    ok(
        60,
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &uri,
            copy.to_str().unwrap(),
        ],
    );
    ok(
        60,
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            &tcp,
            copy.to_str().unwrap(),
        ],
    );

    // qemu-io writes and reads patterns, including unaligned ranges, zeroes and discard.
    ok(
        30,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 1M",
            "-c",
            "write -P 0x33 12345 777",
            "-c",
            "write -z 40M 2M",
            "-c",
            "discard 50M 1M",
            "-c",
            "flush",
            &uri,
        ],
    );
    let out = ok(
        30,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 1M 1M",
            "-c",
            "read -P 0x33 12345 777",
            "-c",
            "read -P 0 40M 2M",
            "-c",
            "read -P 0 50M 1M",
            &tcp,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // The writes are in the file itself.
    let bytes = std::fs::read(&img).unwrap();
    assert!(bytes[MIB as usize..2 * MIB as usize]
        .iter()
        .all(|&b| b == 0x5a));
    assert!(bytes[12345..12345 + 777].iter().all(|&b| b == 0x33));

    // The read-only export refuses writes.
    let o = run(
        30,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 4k", &unix_uri(&sock, "ro")],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !o.status.success() || text.contains("failed") || text.contains("read-only"),
        "{text}"
    );
    assert!(std::fs::read(&other).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn nbdcopy_both_ways() {
    require!("nbdcopy");
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    let dst = d.path().join("dst.img");
    let back = d.path().join("back.img");
    common::make_image(&src, 48 * MIB, 20 * MIB, 3);
    common::make_image(&dst, 48 * MIB, 0, 0);
    let sock = d.path().join("nbd.sock");
    let _srv = xnbd(
        &[
            "serve",
            "--export",
            &format!("d={}", dst.display()),
            "--unix",
            sock.to_str().unwrap(),
        ],
        &d.path().join("serve.log"),
        &sock,
    );
    let uri = unix_uri(&sock, "d");
    ok(
        60,
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    ok(60, "nbdcopy", &[&uri, back.to_str().unwrap()]);
    assert!(common::same_bytes(&src, &dst));
    assert!(common::same_bytes(&src, &back));
}

#[test]
fn fio_random_rw_verify_multi_conn() {
    require!("fio");
    let o = run(10, "fio", &["--enghelp=nbd"]);
    if !o.status.success() {
        lab::skip(&lab::skip::current_test(), "fio has no nbd engine");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("fio.img");
    common::make_image(&img, 64 * MIB, 0, 0);
    let sock = d.path().join("nbd.sock");
    let _srv = xnbd(
        &[
            "serve",
            "--export",
            img.to_str().unwrap(),
            "--unix",
            sock.to_str().unwrap(),
        ],
        &d.path().join("serve.log"),
        &sock,
    );
    let uri = unix_uri(&sock, "");
    // Four connections, each writing and then verifying its own 16 MiB slice.
    let out = ok(
        120,
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--offset_increment=16M",
            "--numjobs=4",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--do_verify=1",
            "--group_reporting",
        ],
    );
    assert!(!out.contains("verify: bad"), "{out}");
    // Mixed random load, bounded in time, four connections with many requests in flight.
    let out = ok(
        60,
        "fio",
        &[
            "--name=mixed",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randrw",
            "--bs=4k",
            "--size=64M",
            "--numjobs=4",
            "--iodepth=32",
            "--time_based",
            "--runtime=3",
            "--group_reporting",
        ],
    );
    assert!(out.contains("err= 0"), "{out}");
}

#[test]
fn nbdfuse_read_write() {
    require!("nbdfuse");
    if !Path::new("/dev/fuse").exists() {
        lab::skip_unsupported(&lab::skip::current_test(), "/dev/fuse is missing");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("f.img");
    common::make_image(&img, 8 * MIB, 4 * MIB, 9);
    let orig = std::fs::read(&img).unwrap();
    let sock = d.path().join("nbd.sock");
    let _srv = xnbd(
        &[
            "serve",
            "--export",
            img.to_str().unwrap(),
            "--unix",
            sock.to_str().unwrap(),
        ],
        &d.path().join("serve.log"),
        &sock,
    );
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut fuse = common::spawn(
        "nbdfuse",
        &[mnt.to_str().unwrap(), "--unix", sock.to_str().unwrap()],
        &d.path().join("fuse.log"),
    );
    let file = mnt.join("nbd");
    if !common::wait_path(&file, Duration::from_secs(10)) {
        lab::skip_unsupported(
            &lab::skip::current_test(),
            &format!("nbdfuse could not mount here: {}", fuse.log_text()),
        );
        return;
    }
    let unmount = |m: &Path| {
        let _ = run(10, "umount", &[m.to_str().unwrap()]);
    };
    let r = std::panic::catch_unwind(|| {
        let data = std::fs::read(&file).unwrap();
        assert_eq!(data, orig);
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(&[0xee; 10000], 5000).unwrap();
        f.sync_all().unwrap();
    });
    unmount(&mnt);
    let _ = fuse.child.wait();
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
    let now = std::fs::read(&img).unwrap();
    assert!(now[5000..15000].iter().all(|&b| b == 0xee));
    assert_eq!(now[..5000], orig[..5000]);
    assert_eq!(now[15000..], orig[15000..]);
}

#[test]
fn tls_required_and_working() {
    require!("nbdinfo", "qemu-io", "openssl");
    let d = tempfile::tempdir().unwrap();
    let certs = d.path().join("pki");
    std::fs::create_dir(&certs).unwrap();
    assert!(common::make_certs(&certs), "openssl failed");
    let img = d.path().join("t.img");
    common::make_image(&img, 4 * MIB, MIB, 5);
    let port = common::free_port();
    let sock = d.path().join("nbd.sock");
    let _srv = xnbd(
        &[
            "serve",
            "--export",
            &format!("t={}", img.display()),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--unix",
            sock.to_str().unwrap(),
            "--tls-cert",
            certs.join("server-cert.pem").to_str().unwrap(),
            "--tls-key",
            certs.join("server-key.pem").to_str().unwrap(),
        ],
        &d.path().join("serve.log"),
        &sock,
    );
    assert!(common::wait_tcp(port, Duration::from_secs(10)));
    // Plain text is refused.
    let o = run(30, "nbdinfo", &[&format!("nbd://127.0.0.1:{port}/t")]);
    assert!(!o.status.success(), "plain-text client got through");
    // TLS with the CA works, and data moves.
    let uri = format!(
        "nbds://localhost:{port}/t?tls-certificates={}",
        certs.display()
    );
    let out = ok(30, "nbdinfo", &[&uri]);
    assert!(out.contains("with TLS"), "{out}");
    let out = ok(30, "nbdinfo", &["--map", &uri]);
    assert!(out.contains("data"), "{out}");
}
