//! `mvc doctor` against a real supernode on loopback, a closed port, and a mount
//! namespace whose /dev lacks the TUN device.
use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MVC: &str = env!("CARGO_BIN_EXE_mvc");

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `mvc doctor --json ARGS` (behind `prefix`, e.g. unshare) and returns the exit
/// status and the parsed report.
fn doctor(prefix: &[&str], args: &[&str]) -> (std::process::ExitStatus, serde_json::Value) {
    let mut argv: Vec<&str> = prefix.to_vec();
    argv.extend([MVC, "doctor", "--json"]);
    argv.extend(args);
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {stdout} stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status, v)
}

fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {report}"))
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn doctor_does_a_cookie_round_trip_with_a_supernode() {
    let d = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let addr = format!("127.0.0.1:{port}");
    let sock = d.path().join("sn.sock");
    let _sn = Kill(
        Command::new(MVC)
            .args(["supernode", "--listen", &addr, "--key-file"])
            .arg(d.path().join("sn.key"))
            .arg("--status-socket")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "supernode did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, v) = doctor(&[], &["--supernode", &addr, "--timeout", "5"]);
    let c = check(&v, "supernode");
    assert_eq!(c["status"], "ok", "{v}");
    assert!(c["detail"].as_str().unwrap().contains("cookie"), "{v}");
    assert_eq!(check(&v, "underlay-mtu")["status"], "ok", "{v}");
}

#[test]
fn doctor_fails_on_a_closed_supernode_port() {
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let t0 = Instant::now();
    let (status, v) = doctor(&[], &["--supernode", &addr, "--timeout", "1"]);
    assert!(!status.success(), "{v}");
    assert_eq!(v["ok"], false);
    let c = check(&v, "supernode");
    assert_eq!(c["status"], "fail", "{v}");
    assert!(c["fix"].as_str().unwrap().contains("firewall"), "{v}");
    assert!(t0.elapsed() < Duration::from_secs(10));
}

/// In a mount namespace whose /dev is an empty tmpfs, the TUN check fails and says how
/// to fix it; an address that nobody answers from (TEST-NET of 198.18.0.0/15 with no
/// route in a fresh network namespace) fails the supernode check.
#[test]
fn doctor_reports_missing_tun_and_unreachable_supernode_in_a_namespace() {
    if !lab::is_root() {
        lab::skip::skip(
            &lab::skip::current_test(),
            "needs root (mount and net namespaces)",
        );
        return;
    }
    let script = format!(
        "mount -t tmpfs tmpfs /dev && exec {MVC} doctor --json --supernode 198.18.255.1:7654 --timeout 1"
    );
    let out = Command::new("unshare")
        .args(["--mount", "--net", "sh", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout} {}", String::from_utf8_lossy(&out.stderr)));
    assert!(!out.status.success(), "{v}");
    let tun = check(&v, "tun");
    assert_eq!(tun["status"], "fail", "{v}");
    assert!(tun["detail"].as_str().unwrap().contains("missing"), "{v}");
    assert!(tun["fix"].as_str().unwrap().contains("modprobe tun"), "{v}");
    assert_eq!(check(&v, "supernode")["status"], "fail", "{v}");
}

/// libfaketime (Debian package faketime): shifts the clock of the process it is preloaded
/// into by `FAKETIME` (`+30s`).
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// `mvc agent init` + `authorize` + `run` on a free loopback port, its clock shifted by
/// libfaketime when `shift` is given; killed and reaped on drop.
fn agent(dir: &std::path::Path, user_pub: &str, shift: Option<&str>) -> (Kill, String, String) {
    let st = dir.display().to_string();
    let out = Command::new(MVC)
        .args(["agent", "init", "--state", &st])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = Command::new(MVC)
        .args(["agent", "authorize", "--state", &st, "--key", user_pub])
        .args(["--max-vms", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    (respawn(dir, shift, &addr), addr, key)
}

/// `mvc agent run` of the agent in `dir` on `addr`.
fn respawn(dir: &std::path::Path, shift: Option<&str>, addr: &str) -> Kill {
    let mut argv: Vec<String> = vec![MVC.into()];
    let st = dir.display().to_string();
    // The site is named after the directory (`a` serves site `A`).
    let site = dir.file_name().unwrap().to_string_lossy().to_uppercase();
    argv.extend(
        [
            "agent",
            "run",
            "--state",
            &st,
            "--site",
            &site,
            "--listen",
            addr,
            "--host",
            "h0:1:1024:1",
            "--overlay",
            "n2n",
        ]
        .map(String::from),
    );
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let mut cmd = Command::new(&argv[0]);
    if let Some(s) = shift {
        // libfaketime in the agent itself (the `faketime` wrapper would stay its parent,
        // and killing the wrapper would leave the agent running).
        cmd.env("LD_PRELOAD", FAKETIME_LIB).env("FAKETIME", s);
    }
    let child = cmd
        .args(&argv[1..])
        .env("MVC_CLAIMS_DIR", dir.join("claims"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let child = Kill(child);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < end,
            "agent in {st} did not come up: {}",
            std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// `mvc doctor --agents`: an agent on time is ok, one 30 s ahead (faketime) warns, and
/// one 300 s ahead, which refuses the request for its timestamp, fails with the fix.
#[test]
fn doctor_compares_the_agents_clocks() {
    assert!(
        std::path::Path::new(FAKETIME_LIB).exists(),
        "{FAKETIME_LIB} missing: install the Debian package faketime (.ci/setup-deps)"
    );
    let d = tempfile::tempdir().unwrap();
    let user = d.path().join("user.key");
    let db = d.path().join("c.db");
    let out = Command::new(MVC)
        .args(["key", "gen", "--key"])
        .arg(&user)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let user_pub = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let ctl = |args: &[&str]| {
        let out = Command::new(MVC)
            .args(args)
            .arg("--db")
            .arg(&db)
            .arg("--key")
            .arg(&user)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mvc {args:?}: {out:?}\n{}",
            std::fs::read_to_string(d.path().join("b/agent.log")).unwrap_or_default()
        );
    };
    let (da, db_dir) = (d.path().join("a"), d.path().join("b"));
    let (_a, a_addr, a_key) = agent(&da, &user_pub, None);
    let (b, b_addr, b_key) = agent(&db_dir, &user_pub, Some("+30s"));
    ctl(&[
        "site",
        "add",
        "A",
        "--agent",
        &a_addr,
        "--agent-key",
        &a_key,
    ]);
    ctl(&[
        "site",
        "add",
        "B",
        "--agent",
        &b_addr,
        "--agent-key",
        &b_key,
    ]);
    let with_store = |v: &mut Vec<String>| {
        v.extend([
            "--agents".into(),
            "--db".into(),
            db.display().to_string(),
            "--key".into(),
            user.display().to_string(),
        ])
    };
    let mut args = Vec::new();
    with_store(&mut args);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, v) = doctor(&[], &a);
    let ca = check(&v, "clock-A");
    assert_eq!(ca["status"], "ok", "{v}");
    let cb = check(&v, "clock-B");
    assert_eq!(cb["status"], "warn", "{v}");
    let detail = cb["detail"].as_str().unwrap();
    let skew: f64 = detail
        .split(" is ")
        .nth(1)
        .and_then(|r| r.split(" s ").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no skew in {detail:?}"));
    assert!((28.0..=32.0).contains(&skew), "{detail}");
    assert!(cb["fix"].as_str().unwrap().contains("chrony"), "{v}");
    // A warning is not a failure (the TUN and other checks may fail without root).
    let _ = status;

    // B 300 s ahead: beyond the agents' request window, so it refuses the request.
    drop(b);
    let _b = respawn(&db_dir, Some("+300s"), &b_addr);
    let (status, v) = doctor(&[], &a);
    assert!(!status.success(), "{v}");
    assert_eq!(check(&v, "clock-A")["status"], "ok", "{v}");
    let cb = check(&v, "clock-B");
    assert_eq!(cb["status"], "fail", "{v}");
    assert!(
        cb["detail"].as_str().unwrap().contains("agent clock"),
        "{v}"
    );
    assert!(cb["fix"].as_str().unwrap().contains("chrony"), "{v}");
}
