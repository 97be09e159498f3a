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
