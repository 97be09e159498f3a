//! Three agents on one machine, in one network namespace, as the README's real-site
//! commands run them (own state directory and port each, everything else default, the
//! same VM namespace prefix): the bridge, TAP, veth, VM namespace and supernode port
//! names they allocate are unique across the machine through the claim directory
//! (docs/CONTROLLER.md, "What the agent owns"). Two clusters across the three agents
//! run at once and ping; after destroy, no claim, link or namespace of theirs remains.
//! Needs root; otherwise prints that it was skipped.
use lab::{self, Lab};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const CLAIMS: &str = "/run/mvc/claims";

struct Host {
    lab: Lab,
    ns: String,
    mvc: PathBuf,
    vm_prefix: String,
    agents: Vec<(String, PathBuf, Child)>,
}

impl Host {
    /// `mvc ARGS` inside the namespace as the user (controller database and key in the
    /// lab directory), whatever its exit status.
    fn mvc(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["300", "ip", "netns", "exec", &self.ns])
            .arg(&self.mvc)
            .args(args)
            .env("MVC_DB", self.lab.dir().join("controller.db"))
            .env("MVC_KEY", self.lab.dir().join("user.key"))
            .stdin(Stdio::null())
            .output()
            .expect("run mvc")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.mvc(args);
        assert!(
            o.status.success(),
            "mvc {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let a = [args, &["--json"]].concat();
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{}: {e}: {out}", a.join(" ")))
    }

    /// Links of the agents' naming in the namespace.
    fn links(&self) -> Vec<String> {
        let o = self
            .lab
            .ip(&self.ns, &["-o", "link", "show"])
            .expect("ip link");
        o.stdout
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| {
                ["mvb", "mvt", "mvv", "mvq"]
                    .iter()
                    .any(|p| n.starts_with(p))
            })
            .collect()
    }

    /// VM namespaces of the agents (all three share one prefix).
    fn vm_namespaces(&self) -> Vec<String> {
        std::fs::read_dir("/run/netns")
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&self.vm_prefix))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Claim files naming one of this test's agents.
    fn claims(&self) -> Vec<String> {
        let ours: Vec<String> = self
            .agents
            .iter()
            .map(|(_, s, _)| s.canonicalize().unwrap().display().to_string())
            .collect();
        std::fs::read_dir(CLAIMS)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| {
                        std::fs::read_to_string(e.path())
                            .is_ok_and(|t| ours.iter().any(|o| t.trim_end() == o))
                    })
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for (_, _, c) in &mut self.agents {
            // SIGTERM: the agent stops what it started and exits.
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run_local(mvc: &Path, args: &[&str]) -> String {
    let o = Command::new(mvc).args(args).output().expect("run mvc");
    assert!(
        o.status.success(),
        "mvc {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The namespace, the user key, three initialised agents listening on
/// 127.0.0.1:7001-7003 and registered as sites A, B, C.
fn host() -> Host {
    let lab = Lab::new("mvsh").expect("lab");
    let ns = lab.add_ns("host").expect("namespace");
    let mvc = PathBuf::from(env!("CARGO_BIN_EXE_mvc"));
    let vm_prefix = format!("{}-v", lab.prefix());
    let user = run_local(
        &mvc,
        &[
            "key",
            "gen",
            "--key",
            &lab.dir().join("user.key").display().to_string(),
        ],
    );
    let mut h = Host {
        lab,
        ns,
        mvc,
        vm_prefix,
        agents: Vec::new(),
    };
    for (i, site) in ["A", "B", "C"].iter().enumerate() {
        let state = h.lab.dir().join(format!("agent-{site}"));
        let st = state.display().to_string();
        let key = run_local(&h.mvc, &["agent", "init", "--state", &st]);
        run_local(
            &h.mvc,
            &[
                "agent",
                "authorize",
                "--state",
                &st,
                "--key",
                &user,
                "--max-vms",
                "8",
                "--hosts",
                "*",
            ],
        );
        let listen = format!("127.0.0.1:{}", 7001 + i);
        let log = std::fs::File::create(h.lab.dir().join(format!("agent-{site}.log"))).unwrap();
        // nsenter enters only the network namespace: the VM namespaces the agents make
        // stay visible in the root mount namespace.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", h.ns))
            .arg(&h.mvc)
            .args([
                "agent", "run", "--state", &st, "--site", site, "--listen", &listen,
            ])
            .args([
                "--host",
                &format!("h{i}:2:8192:8"),
                "--ns-prefix",
                &h.vm_prefix,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("agent");
        h.lab.record_child(child.id());
        h.agents.push((site.to_string(), state, child));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = h
                .lab
                .in_ns(&h.ns, || {
                    std::net::TcpStream::connect_timeout(
                        &listen.parse().unwrap(),
                        Duration::from_millis(300),
                    )
                    .is_ok()
                })
                .unwrap_or(false);
            if up {
                break;
            }
            assert!(Instant::now() < deadline, "agent {site} did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        h.ok(&["site", "add", site, "--agent", &listen, "--agent-key", &key]);
    }
    h
}

/// Every VM of `cluster` reaches every other over the overlay.
fn all_ping(h: &Host, cluster: &str) {
    let st = h.json(&["cluster", "status", cluster]);
    let vms: Vec<(String, String, String)> = st["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["ip"].as_str().unwrap().to_string(),
                v["handle"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    for (from, _, handle) in &vms {
        let from_ns = handle
            .strip_prefix("netns:")
            .unwrap_or_else(|| panic!("{cluster}: {from} runs in no namespace: {st}"));
        for (to, ip, _) in &vms {
            if from != to {
                lab::wait_ping(
                    &h.lab,
                    from_ns,
                    ip.parse().unwrap(),
                    Duration::from_secs(20),
                )
                .unwrap_or_else(|e| panic!("{cluster}: {from} -> {to} ({ip}): {e}"));
            }
        }
    }
}

#[test]
fn three_agents_in_one_namespace_allocate_unique_names() {
    if !lab::is_root() {
        lab::skip(
            "three_agents_in_one_namespace_allocate_unique_names",
            "needs root for network namespaces",
        );
        return;
    }
    let h = host();
    let t0 = Instant::now();
    for (name, sites) in [("k1", "A:B:C"), ("k2", "B:C:A")] {
        let cl = h.json(&[
            "cluster",
            "create",
            name,
            "--sites",
            sites,
            "--computes",
            "1:1:1",
            "--memory",
            "128",
            "--frontend-memory",
            "128",
            "--start",
        ]);
        assert_eq!(cl["state"], "running", "{cl}");
    }
    eprintln!(
        "two clusters created in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    all_ping(&h, "k1");
    all_ping(&h, "k2");
    // Six reservations (two clusters at three agents), six bridges and TAPs.
    let links = h.links();
    let bridges: BTreeSet<&String> = links.iter().filter(|l| l.starts_with("mvb")).collect();
    let taps: BTreeSet<&String> = links.iter().filter(|l| l.starts_with("mvt")).collect();
    assert_eq!((bridges.len(), taps.len()), (6, 6), "links {links:?}");
    let claims = h.claims();
    let numbers = claims.iter().filter(|c| c.starts_with('n')).count();
    let ports = claims.iter().filter(|c| c.starts_with("port")).count();
    assert_eq!((numbers, ports), (6, 2), "claims {claims:?}");
    // The two supernodes (origins A and B) have two ports.
    let supernodes: BTreeSet<String> = ["k1", "k2"]
        .iter()
        .map(|c| h.json(&["cluster", "status", c])["overlay"]["supernode"].to_string())
        .collect();
    assert_eq!(supernodes.len(), 2, "{supernodes:?}");
    for c in ["k1", "k2"] {
        h.ok(&["cluster", "destroy", c]);
    }
    assert!(h.claims().is_empty(), "claims left: {:?}", h.claims());
    assert!(h.links().is_empty(), "links left: {:?}", h.links());
    assert!(
        h.vm_namespaces().is_empty(),
        "VM namespaces left: {:?}",
        h.vm_namespaces()
    );
}
