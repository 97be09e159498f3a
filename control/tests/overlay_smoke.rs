//! Smoke test of the real overlay binary in network namespaces: a supernode and two
//! edges on one underlay segment, ping across the overlay, the path goes direct, an edge
//! with the wrong secret reaches nothing. Needs root; skips (saying so) otherwise.
//! The three-site NAT lab lives with the benchmark; this only guards the I/O layer.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Lab {
    prefix: String,
    children: Vec<Child>,
    dir: std::path::PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in ["sw", "sn", "a", "b", "c"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &format!("{}{n}", self.prefix)])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .status()
        .expect("spawn");
    assert!(st.success(), "{args:?} failed");
}

fn ns(lab: &Lab, n: &str) -> String {
    format!("{}{n}", lab.prefix)
}

fn ping(lab: &Lab, from: &str, to: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", &ns(lab, from), "ping", "-c1", "-W1", to])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn two_edges_ping_direct_and_wrong_secret_is_isolated() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        println!("SKIPPED: overlay_smoke needs root (network namespaces, TAP devices)");
        return;
    }
    let mvc = env!("CARGO_BIN_EXE_mvc");
    let prefix = format!("mo{}", std::process::id() % 100_000);
    let dir = std::env::temp_dir().join(format!("{prefix}-smoke"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut lab = Lab {
        prefix: prefix.clone(),
        children: Vec::new(),
        dir: dir.clone(),
    };
    let sw = ns(&lab, "sw");
    sh(&["ip", "netns", "add", &sw]);
    sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"]);
    sh(&["ip", "-n", &sw, "link", "set", "br0", "up"]);
    for (i, n) in ["sn", "a", "b", "c"].iter().enumerate() {
        let name = ns(&lab, n);
        sh(&["ip", "netns", "add", &name]);
        let port = format!("{prefix}{n}p");
        sh(&[
            "ip", "link", "add", "u0", "netns", &name, "type", "veth", "peer", "name", &port,
            "netns", &sw,
        ]);
        sh(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"]);
        sh(&["ip", "-n", &name, "link", "set", "u0", "up"]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        let addr = format!("198.18.200.{}/24", i + 1);
        sh(&["ip", "-n", &name, "addr", "add", &addr, "dev", "u0"]);
    }
    let spawn = |lab: &mut Lab, n: &str, args: Vec<String>| {
        let log = std::fs::File::create(dir.join(format!("{n}.log"))).unwrap();
        let c = Command::new("ip")
            .args(["netns", "exec", &ns(lab, n), mvc])
            .args(&args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        lab.children.push(c);
    };
    let sn_sock = dir.join("sn.sock").display().to_string();
    spawn(
        &mut lab,
        "sn",
        vec![
            "supernode".into(),
            "--listen".into(),
            "198.18.200.1:7654".into(),
            "--status-socket".into(),
            sn_sock,
        ],
    );
    for (n, secret) in [("a", "s3cret"), ("b", "s3cret"), ("c", "wrong")] {
        let sock = dir.join(format!("{n}.sock")).display().to_string();
        spawn(
            &mut lab,
            n,
            vec![
                "edge".into(),
                "--name".into(),
                format!("edge-{n}"),
                "--community".into(),
                "smoke".into(),
                "--secret".into(),
                secret.into(),
                "--supernode".into(),
                "198.18.200.1:7654".into(),
                "--tap".into(),
                "ovl0".into(),
                "--create-tap".into(),
                "--status-socket".into(),
                sock,
            ],
        );
    }
    // Wait for the TAP devices, then address them.
    let deadline = Instant::now() + Duration::from_secs(10);
    for (n, ip) in [("a", "2"), ("b", "3"), ("c", "4")] {
        let name = ns(&lab, n);
        let addr = format!("198.19.200.{ip}/24");
        loop {
            let ok = Command::new("ip")
                .args(["-n", &name, "addr", "add", &addr, "dev", "ovl0"])
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "TAP of edge {n} never appeared");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ping(&lab, "a", "198.19.200.3") {
        assert!(Instant::now() < deadline, "no ping across the overlay");
    }
    // The path becomes direct.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = Command::new(mvc)
            .args(["edge", "status", "--json", "--status-socket"])
            .arg(dir.join("a.sock"))
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        if s.contains("\"path\":\"direct\"") {
            assert!(s.contains("\"name\":\"edge-b\""), "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "never direct: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The wrong secret reaches nothing, and is reached by nothing.
    assert!(!ping(&lab, "c", "198.19.200.2"));
    assert!(!ping(&lab, "a", "198.19.200.4"));
    assert!(ping(&lab, "b", "198.19.200.2"));
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
