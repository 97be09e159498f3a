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

#[test]
fn gen_docs_writes_completions_and_man_pages() {
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mvc"))
        .args(["gen-docs", "--out"])
        .arg(d.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for f in [
        "completions/mvc.bash",
        "completions/_mvc",
        "completions/mvc.fish",
        "man/mvc.1",
        "man/mvc-doctor.1",
        "man/mvc-edge.1",
        "man/mvc-agent-run.1",
    ] {
        let p = d.path().join(f);
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        assert!(len > 100, "{} missing or empty", p.display());
    }
    let edge = std::fs::read_to_string(d.path().join("man/mvc-edge.1")).unwrap();
    assert!(edge.contains("secret\\-file"), "{edge}");
    assert!(
        !d.path().join("man/mvc-gen-docs.1").exists(),
        "hidden command documented"
    );
}

/// Builds the .deb from debug binaries with packaging/build-deb (installs cargo-deb when
/// missing; a few minutes), unpacks it into an empty root with `dpkg --root`, and checks
/// the files, the units and the binaries. Runs only with MVC_PACKAGE_TEST=1 (CI sets it).
#[test]
fn deb_unpacks_into_a_clean_root() {
    if std::env::var_os("MVC_PACKAGE_TEST").is_none_or(|v| v != "1") {
        println!("deb_unpacks_into_a_clean_root: set MVC_PACKAGE_TEST=1 to build the .deb");
        return;
    }
    if Command::new("dpkg").arg("--version").output().is_err() {
        lab::skip::skip(&lab::skip::current_test(), "dpkg is not installed");
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let d = tempfile::tempdir().unwrap();
    let st = Command::new(repo.join("packaging/build-deb"))
        .env("MVC_DEB_PROFILE", "dev")
        // cargo-deb's quicker compression: 6 s against 20 s here, for a 9 MB instead of 7 MB .deb.
        .arg("--fast")
        .arg("--output")
        .arg(d.path())
        .status()
        .unwrap();
    assert!(st.success(), "packaging/build-deb: {st}");
    let deb = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb in the output dir");
    // An empty dpkg database; --unpack runs no maintainer script (they would touch this
    // machine's users through --force-script-chrootless), so the conffiles stay .dpkg-new.
    let root = d.path().join("root");
    for sub in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let out = Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-depends", "--force-script-chrootless", "--unpack"])
        .arg(&deb)
        .output()
        .unwrap();
    assert!(out.status.success(), "dpkg --unpack: {out:?}");
    for f in [
        "usr/bin/mvc",
        "usr/bin/xnbd",
        "usr/bin/mvc-guest",
        "lib/systemd/system/mvc-supernode.service",
        "lib/systemd/system/mvc-edge@.service",
        "lib/systemd/system/mvc-agent.service",
        "lib/systemd/system/xnbd-serve@.service",
        "usr/lib/sysusers.d/mvc.conf",
        "etc/mvc/supernode.toml.dpkg-new",
        "etc/mvc/agent.env.dpkg-new",
        "usr/share/bash-completion/completions/mvc",
        "usr/share/man/man1/mvc.1.gz",
        "usr/share/man/man1/mvc-doctor.1.gz",
        "usr/share/man/man1/xnbd.1.gz",
        "usr/share/man/man1/xnbd-serve.1.gz",
        "usr/share/man/man1/xnbd-proxy.1.gz",
        "usr/share/doc/mvc/DEPLOY.md",
    ] {
        assert!(root.join(f).exists(), "{f} not in the package");
    }
    for u in UNITS {
        let packaged = std::fs::read_to_string(root.join("lib/systemd/system").join(u)).unwrap();
        assert_eq!(packaged, read_unit(u), "{u} differs from packaging/systemd");
    }
    for b in ["mvc", "xnbd"] {
        let out = Command::new(root.join("usr/bin").join(b))
            .arg("--version")
            .output()
            .unwrap();
        assert!(out.status.success(), "{b} --version: {out:?}");
    }
    let conffiles =
        std::fs::read_to_string(root.join("var/lib/dpkg/info/mvc.conffiles")).unwrap_or_default();
    assert!(conffiles.contains("/etc/mvc/supernode.toml"), "{conffiles}");
    if lab::is_root() {
        overlay_from_the_package(&root);
    } else {
        lab::skip::skip(
            &lab::skip::current_test(),
            "the overlay run of the installed binaries needs root (network namespaces, TAPs)",
        );
    }
}

/// The namespace lab once with what the package installed: `usr/bin/mvc` of the root,
/// a supernode from `etc/mvc/supernode.toml` and two edges (site A public, site B behind
/// NAT) from `etc/mvc/edge-COMMUNITY.toml.example` filled in as docs/DEPLOY.md says;
/// a VM of site A pings one of site B over the overlay.
fn overlay_from_the_package(root: &Path) {
    let mvc = root.join("usr/bin/mvc").display().to_string();
    let lab = lab::Lab::new("mvpk").expect("lab");
    let topo = lab::Topology::three_sites(&lab, 1).expect("topology");
    let (a, b) = (&topo.sites[0], &topo.sites[1]);
    let dir = lab.dir().to_path_buf();
    let p = |f: &str| dir.join(f).display().to_string();
    let sn_conf = root.join("etc/mvc/supernode.toml.dpkg-new");
    let sn_key = p("supernode.key");
    let out = lab::run(&[&mvc, "supernode", "key", "--key-file", &sn_key]).expect("key");
    let key = out.stdout.trim().to_string();
    let sn_proc = lab
        .spawn(
            &a.frontend,
            "supernode",
            &[
                &mvc,
                "supernode",
                "--config",
                &sn_conf.display().to_string(),
                "--key-file",
                &sn_key,
                "--status-socket",
                &p("supernode.sock"),
            ],
        )
        .expect("supernode");
    let example =
        std::fs::read_to_string(root.join("etc/mvc/edge-COMMUNITY.toml.example.dpkg-new"))
            .or_else(|_| std::fs::read_to_string(root.join("etc/mvc/edge-COMMUNITY.toml.example")))
            .expect("edge example config");
    let secret = p("pkg.secret");
    lab::write_private(
        Path::new(&secret),
        b"a-secret-of-the-package-test-0123456789",
    )
    .expect("secret");
    // The port of the packaged supernode.toml.
    let sn_toml = std::fs::read_to_string(&sn_conf).unwrap();
    let port = sn_toml
        .lines()
        .find_map(|l| l.strip_prefix("listen = \"0.0.0.0:"))
        .and_then(|r| r.trim_end_matches('"').parse::<u16>().ok())
        .expect("listen port in supernode.toml");
    let mut edges = Vec::new();
    for s in [a, b] {
        let conf = example
            .lines()
            .map(|l| {
                let key_of = l.split('=').next().unwrap_or("").trim();
                match key_of {
                    "name" => format!("name = \"site-{}\"", s.name),
                    "community" => "community = \"pkg\"".into(),
                    "secret_file" => format!("secret_file = \"{secret}\""),
                    "supernodes" => format!("supernodes = [\"{}:{port}@{key}\"]", a.public_ip),
                    "tap" => format!("tap = \"{}\"", s.tap),
                    "create_tap" => "create_tap = false".into(),
                    _ => l.to_string(),
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let f = p(&format!("edge-{}.toml", s.name));
        std::fs::write(&f, conf).unwrap();
        topo.reset_tap(&lab, s).expect("tap");
        edges.push(
            lab.spawn(
                &s.frontend,
                &format!("edge-{}", s.name),
                &[
                    &mvc,
                    "edge",
                    "--config",
                    &f,
                    "--status-socket",
                    &p(&format!("edge-{}.sock", s.name)),
                ],
            )
            .expect("edge"),
        );
    }
    let (va, vb) = (&a.vms[0], &b.vms[0]);
    lab::wait_ping(&lab, &va.ns, vb.ip, std::time::Duration::from_secs(30)).unwrap_or_else(|e| {
        for pr in edges.iter().chain([&sn_proc]) {
            eprintln!("---- {}:\n{}", pr.name, lab.log(pr));
        }
        panic!("VM at A -> VM at B over the packaged binaries: {e}")
    });
}

/// The Type=notify units rely on this: with NOTIFY_SOCKET set, `mvc supernode` sends
/// READY=1 once its UDP socket and status socket are up.
#[test]
fn supernode_tells_systemd_it_is_ready() {
    use std::os::unix::net::UnixDatagram;
    assert_eq!(
        directive(&read_unit("mvc-supernode.service"), "Type"),
        ["notify"]
    );
    assert_eq!(
        directive(&read_unit("mvc-edge@.service"), "Type"),
        ["notify"]
    );
    let d = tempfile::tempdir().unwrap();
    let notify = d.path().join("notify");
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let status = d.path().join("sn.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mvc"))
        .args(["supernode", "--listen", "127.0.0.1:0", "--key-file"])
        .arg(d.path().join("sn.key"))
        .arg("--status-socket")
        .arg(&status)
        .env("NOTIFY_SOCKET", &notify)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let got = rx.recv(&mut buf);
    let ready_status_socket = status.exists();
    let _ = child.kill();
    let _ = child.wait();
    let n = got.expect("no notification within 20 s");
    let msg = String::from_utf8_lossy(&buf[..n]);
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    assert!(
        ready_status_socket,
        "READY=1 before the status socket listens"
    );
}
