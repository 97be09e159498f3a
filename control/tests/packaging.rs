//! The systemd units under `packaging/systemd/` pass `systemd-analyze verify` and keep
//! the hardening the deployment guide promises.
use std::path::{Path, PathBuf};
use std::process::Command;

const UNITS: [&str; 4] = [
    "mvc-supernode.service",
    "mvc-edge@.service",
    "mvc-agent.service",
    "xnbd-serve@.service",
];

fn unit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd")
}

fn read_unit(name: &str) -> String {
    std::fs::read_to_string(unit_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// `systemd-analyze verify` checks that the ExecStart binaries exist: the units are
/// verified as copies whose /usr/bin/ points at stand-in executables in a temp dir.
/// Any warning (an unknown key, a bad value) fails the test, not only errors.
#[test]
fn units_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        lab::skip::skip(
            &lab::skip::current_test(),
            "systemd-analyze is not installed (Debian package systemd)",
        );
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let bin = d.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for b in ["mvc", "xnbd"] {
        let p = bin.join(b);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut paths = Vec::new();
    for u in UNITS {
        let text = read_unit(u).replace("/usr/bin/", &format!("{}/", bin.display()));
        let p = d.path().join(u);
        std::fs::write(&p, text).unwrap();
        paths.push(p);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&paths)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}

fn directive<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn units_are_hardened_and_restart() {
    for u in UNITS {
        let t = read_unit(u);
        assert_eq!(directive(&t, "ProtectSystem"), ["strict"], "{u}");
        assert_eq!(directive(&t, "Restart"), ["on-failure"], "{u}");
        assert_eq!(directive(&t, "NoNewPrivileges"), ["yes"], "{u}");
        assert!(!directive(&t, "StateDirectory").is_empty(), "{u}");
        // A unit that is not root runs with an explicit capability list (maybe empty).
        assert_eq!(directive(&t, "CapabilityBoundingSet").len(), 1, "{u}");
    }
    let edge = read_unit("mvc-edge@.service");
    assert_eq!(
        directive(&edge, "AmbientCapabilities"),
        ["CAP_NET_ADMIN CAP_NET_RAW CAP_BPF CAP_PERFMON"]
    );
    assert!(edge.contains("--config /etc/mvc/edge-%i.toml"));
    assert_eq!(
        directive(&read_unit("mvc-supernode.service"), "CapabilityBoundingSet"),
        [""]
    );
}
