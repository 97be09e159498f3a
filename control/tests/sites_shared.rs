//! Shared sites in a network-namespace lab: two users (two controllers, two keys) on the
//! same three agents, clusters with the same names and overlay addresses side by side,
//! names reused after destroy, and agents killed at every step of creating and starting
//! a cluster. What the agent owns and how it cleans up is in docs/CONTROLLER.md.
//! Needs root; otherwise prints that it was skipped.
use lab::sites::{SiteLab, User};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A site lab running this project's overlay, agents with a short lease.
fn site_lab(lease_secs: u64) -> SiteLab {
    let mvc = PathBuf::from(env!("CARGO_BIN_EXE_mvc"));
    let extra: BTreeMap<String, Vec<String>> = ["A", "B", "C"]
        .iter()
        .map(|s| {
            (
                s.to_string(),
                vec!["--lease-secs".into(), lease_secs.to_string()],
            )
        })
        .collect();
    let sl = SiteLab::with_agent_args(&mvc, "mvc", 16, 16, &extra).expect("lab");
    sl.add_sites().expect("site add");
    sl
}

/// `cluster create NAME --sites A:B:C --computes 1:1:1 --start` as `user`.
fn create(sl: &SiteLab, user: &User, name: &str, overlay: Option<&str>) -> serde_json::Value {
    let mut args = vec![
        "cluster",
        "create",
        name,
        "--sites",
        "A:B:C",
        "--computes",
        "1:1:1",
        "--memory",
        "128",
        "--frontend-memory",
        "128",
        "--start",
    ];
    if let Some(o) = overlay {
        args.extend(["--overlay", o]);
    }
    let cl = sl
        .ctl_json_as(user, &args)
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
    assert_eq!(cl["state"], "running", "{cl}");
    cl
}

/// Name, IP and MAC of each VM of a cluster record.
fn nodes(cl: &serde_json::Value) -> Vec<(String, String, String)> {
    cl["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["ip"].as_str().unwrap().to_string(),
                v["mac"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Every VM of the cluster reaches every other over the overlay.
fn all_ping(sl: &SiteLab, user: &User, cluster: &str, cl: &serde_json::Value) {
    let ns = sl.vm_handles_as(user, cluster).expect("handles");
    for (from, _, _) in nodes(cl) {
        let from_ns = ns[&from].strip_prefix("netns:").unwrap();
        for (to, ip, _) in nodes(cl) {
            if from != to {
                lab::wait_ping(
                    &sl.lab,
                    from_ns,
                    ip.parse().unwrap(),
                    Duration::from_secs(20),
                )
                .unwrap_or_else(|e| panic!("{cluster}: {from} -> {to} ({ip}): {e}"));
            }
        }
    }
}

fn sh(args: &[&str]) -> lab::Out {
    lab::run(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Whether `ping` from namespace `ns` to `ip` gets any answer (2 tries).
fn answers(ns: &str, ip: &str) -> bool {
    lab::run(&[
        "ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", "2", "-i", "0.3", "-W", "1", ip,
    ])
    .is_ok()
}

/// `victim` (a VM namespace) gets an extra address `extra`; a VM of the other user's
/// cluster `prober`, told that `extra` is at `victim_mac`, must get no answer, while
/// `friend` (a VM of the victim's own cluster) does.
fn isolated(prober: &str, friend: &str, victim: &str, victim_mac: &str, extra: &str) {
    sh(&[
        "ip",
        "-n",
        victim,
        "addr",
        "add",
        &format!("{extra}/32"),
        "dev",
        "eth0",
    ]);
    for ns in [prober, friend] {
        sh(&[
            "ip",
            "-n",
            ns,
            "neigh",
            "replace",
            extra,
            "lladdr",
            victim_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
    }
    assert!(
        answers(friend, extra),
        "control: {friend} cannot reach {extra} in its own cluster"
    );
    assert!(
        !answers(prober, extra),
        "{prober} reached {extra} in another user's cluster"
    );
    sh(&[
        "ip",
        "-n",
        victim,
        "addr",
        "del",
        &format!("{extra}/32"),
        "dev",
        "eth0",
    ]);
}

/// `c<digits>` at the start of a name: the agent's cluster number.
fn cluster_number(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('c')?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// What exists at `site` that an agent may have made: VM namespaces, links of the
/// agent's naming, processes naming a per-cluster file of its state directory, and
/// per-cluster files.
struct SiteTrace {
    namespaces: Vec<String>,
    links: Vec<String>,
    processes: Vec<(i32, String)>,
    files: Vec<PathBuf>,
}

fn trace(sl: &SiteLab, site: &str) -> SiteTrace {
    let a = &sl.agents[site];
    let prefix = format!("{}{site}-", sl.vm_prefix);
    let namespaces = std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    let links = sh(&["ip", "-n", &a.ns, "-o", "link", "show"])
        .stdout
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| {
            ["mvb", "mvt", "mvv", "mvq"]
                .iter()
                .any(|p| n.starts_with(p))
        })
        .collect();
    let marks = [
        format!("{}/run/c", a.state.display()),
        format!("{}/secrets/c", a.state.display()),
    ];
    let processes = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter_map(|pid| {
                    let c = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                    let c = String::from_utf8_lossy(&c).replace('\0', " ");
                    marks.iter().any(|m| c.contains(m)).then_some((pid, c))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut files = Vec::new();
    for d in ["run", "secrets", "disks"] {
        if let Ok(rd) = std::fs::read_dir(a.state.join(d)) {
            for e in rd.flatten() {
                if cluster_number(&e.file_name().to_string_lossy()).is_some() {
                    files.push(e.path());
                }
            }
        }
    }
    SiteTrace {
        namespaces,
        links,
        processes,
        files,
    }
}

/// The agent's reservations as `{"clusters": {n: reservation}}`, read from its files.
fn state_json(sl: &SiteLab, site: &str) -> serde_json::Value {
    let dir = control::agent::state::reservations_dir(&sl.agents[site].state);
    let mut clusters = serde_json::Map::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            clusters.insert(v["n"].to_string(), v["cluster"].clone());
        }
    }
    serde_json::json!({ "clusters": clusters })
}

/// Everything at `site` that an agent may have made is named in its store.
fn all_listed(sl: &SiteLab, site: &str, when: &str) {
    let st = state_json(sl, site);
    let text = st.to_string();
    let numbers: Vec<u32> = st["clusters"]
        .as_object()
        .unwrap()
        .keys()
        .filter_map(|k| k.parse().ok())
        .collect();
    let t = trace(sl, site);
    let prefix = format!("{}{site}-", sl.vm_prefix);
    for ns in &t.namespaces {
        let local = ns.strip_prefix(&prefix).unwrap();
        assert!(
            text.contains(&format!("\"{local}\"")),
            "{when}: site {site}: namespace {ns} is not in its agent's store: {st}"
        );
    }
    for l in &t.links {
        // A netns VM's veth is the NIC its slot names plus its peer `<nic>p`.
        let named = |n: &str| text.contains(&format!("\"{n}\""));
        assert!(
            named(l) || l.strip_suffix('p').is_some_and(named),
            "{when}: site {site}: link {l} is not in its agent's store: {st}"
        );
    }
    for (pid, c) in &t.processes {
        let n = c
            .split("/run/")
            .chain(c.split("/secrets/"))
            .skip(1)
            .find_map(cluster_number);
        assert!(
            n.is_some_and(|n| numbers.contains(&n)),
            "{when}: site {site}: process {pid} ({c}) is not in its agent's store: {st}"
        );
    }
    for f in &t.files {
        let n = cluster_number(&f.file_name().unwrap().to_string_lossy()).unwrap();
        assert!(
            numbers.contains(&n),
            "{when}: site {site}: file {} is not in its agent's store: {st}",
            f.display()
        );
    }
}

/// No namespace, link, process or per-cluster file at any site, and no reservation.
fn no_trace(sl: &SiteLab, when: &str) {
    for site in ["A", "B", "C"] {
        let t = trace(sl, site);
        let st = state_json(sl, site);
        assert!(
            t.namespaces.is_empty()
                && t.links.is_empty()
                && t.processes.is_empty()
                && t.files.is_empty()
                && st["clusters"].as_object().unwrap().is_empty(),
            "{when}: site {site} keeps namespaces {:?}, links {:?}, processes {:?}, files {:?}, \
             reservations {}",
            t.namespaces,
            t.links,
            t.processes,
            t.files,
            st["clusters"]
        );
    }
}

fn skip(name: &str) -> bool {
    if !lab::is_root() {
        lab::skip(name, "needs root for network namespaces");
        return true;
    }
    false
}

#[test]
fn two_users_share_three_sites_with_the_same_names_and_addresses() {
    if skip("two_users_share_three_sites_with_the_same_names_and_addresses") {
        return;
    }
    let t0 = Instant::now();
    let sl = site_lab(60);
    let u1 = sl.first_user();
    let u2 = sl.add_user("user2", 16).expect("second user");
    // Both users: cluster t on 198.19.5.0/24, cluster u on the pool's first /24.
    let mut cls: BTreeMap<(usize, &str), serde_json::Value> = BTreeMap::new();
    for (i, u) in [&u1, &u2].into_iter().enumerate() {
        cls.insert((i, "t"), create(&sl, u, "t", Some("198.19.5.0/24")));
        cls.insert((i, "u"), create(&sl, u, "u", None));
    }
    eprintln!(
        "four clusters running after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let users = [&u1, &u2];
    for ((i, name), cl) in &cls {
        // Same names and addresses for both users, MACs from each controller.
        let ips: Vec<String> = nodes(cl).into_iter().map(|n| n.1).collect();
        let want = if *name == "t" {
            "198.19.5."
        } else {
            "198.19.0."
        };
        assert!(ips.iter().all(|ip| ip.starts_with(want)), "{ips:?}");
        all_ping(&sl, users[*i], name, cl);
    }
    // The agents gave each user's cluster its own bridge at every site.
    for site in ["A", "B", "C"] {
        let st = state_json(&sl, site);
        let bridges: std::collections::BTreeSet<String> = st["clusters"]
            .as_object()
            .unwrap()
            .values()
            .map(|c| c["bridge"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(bridges.len(), 4, "site {site}: {st}");
    }
    // An MPI job on each user's t, both at once: an mpi4py allreduce across its four
    // nodes (a hostname per rank when mpi4py is missing).
    if Path::new("/usr/bin/mpirun").exists() {
        let prog = sl.lab.dir().join("allreduce.py");
        std::fs::write(&prog, control::demo::MPI_PROGRAM).unwrap();
        let p = prog.display().to_string();
        let mpi4py = Path::new("/usr/lib/python3/dist-packages/mpi4py").exists();
        let cmd: Vec<&str> = if mpi4py {
            vec!["/usr/bin/python3", &p]
        } else {
            vec!["hostname"]
        };
        let outs: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = [&u1, &u2]
                .into_iter()
                .map(|u| s.spawn(|| sl.mpirun_as(u, "t", 4, &cmd).expect("mpirun")))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for out in outs {
            if mpi4py {
                assert!(
                    out.contains("allreduce(sum of ranks) = 6 (expected 6)"),
                    "{out}"
                );
            }
            for (name, ..) in nodes(&cls[&(0, "t")]) {
                assert!(out.contains(name.as_str()), "{name} missing from {out}");
            }
        }
    } else {
        lab::skip(
            "two_users_share_three_sites_with_the_same_names_and_addresses (MPI step)",
            "mpirun is not installed",
        );
    }
    // Isolation both ways: each user's t VMs reach nothing of the other user's t,
    // although the addresses are the same.
    let ns = |u: &User, vm: &str| sl.vm_ns_as(u, "t", vm).unwrap();
    let mac = |i: usize, vm: &str| {
        nodes(&cls[&(i, "t")])
            .into_iter()
            .find(|n| n.0 == vm)
            .unwrap()
            .2
    };
    isolated(
        &ns(&u1, "t-c2"),
        &ns(&u2, "t-c2"),
        &ns(&u2, "t-fe"),
        &mac(1, "t-fe"),
        "198.19.5.200",
    );
    isolated(
        &ns(&u2, "t-c3"),
        &ns(&u1, "t-c3"),
        &ns(&u1, "t-fe"),
        &mac(0, "t-fe"),
        "198.19.5.201",
    );
    // Each user's compute resolves the frontend address to its own frontend's MAC.
    for (i, u) in users.iter().enumerate() {
        let c2 = ns(u, "t-c2");
        assert!(answers(&c2, "198.19.5.1"));
        let neigh = sh(&["ip", "-n", &c2, "neigh", "show", "198.19.5.1"]).stdout;
        assert!(
            neigh.contains(&mac(i, "t-fe")),
            "user {i}: {neigh} is not its frontend {}",
            mac(i, "t-fe")
        );
    }
    // Destroying user 2's u leaves the other three working.
    sl.ctl_as(&u2, &["cluster", "destroy", "u"])
        .expect("destroy");
    for ((i, name), cl) in &cls {
        if (*i, *name) != (1, "u") {
            all_ping(&sl, users[*i], name, cl);
        }
    }
    for site in ["A", "B", "C"] {
        all_listed(&sl, site, "after one destroy");
    }
    for (u, n) in [(&u1, "t"), (&u1, "u"), (&u2, "t")] {
        sl.ctl_as(u, &["cluster", "destroy", n]).expect("destroy");
    }
    no_trace(&sl, "after destroying all four");
    eprintln!(
        "two users, four clusters: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn create_destroy_create_the_same_name_five_times() {
    if skip("create_destroy_create_the_same_name_five_times") {
        return;
    }
    let t0 = Instant::now();
    let sl = site_lab(60);
    let u = sl.first_user();
    for round in 0..5 {
        let cl = create(&sl, &u, "k", None);
        all_ping(&sl, &u, "k", &cl);
        sl.ctl(&["cluster", "destroy", "k"]).expect("destroy");
        no_trace(&sl, &format!("round {round}"));
    }
    eprintln!(
        "five create/start/destroy rounds: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// Run `mvc agent gc` for `site` in its frontend's namespace.
fn gc(sl: &SiteLab, site: &str, dry: bool) -> String {
    let a = &sl.agents[site];
    let prefix = format!("{}{site}-", sl.vm_prefix);
    let state = a.state.display().to_string();
    let mut args = vec![
        "ip",
        "netns",
        "exec",
        &a.ns,
        sl.mvc.to_str().unwrap(),
        "agent",
        "gc",
        "--state",
        &state,
        "--ns-prefix",
        &prefix,
    ];
    if dry {
        args.push("--dry-run");
    }
    sh(&args).stdout
}

#[test]
fn agent_killed_at_each_step_leaves_nothing_it_does_not_list() {
    if skip("agent_killed_at_each_step_leaves_nothing_it_does_not_list") {
        return;
    }
    let t0 = Instant::now();
    let lease = 20;
    let mut sl = site_lab(lease);
    sl.echo_ctl = false;
    // While an agent runs, it alone acts on its state: gc is refused.
    let a = &sl.agents["A"];
    let st = a.state.display().to_string();
    let e = lab::run(&[
        "ip",
        "netns",
        "exec",
        &a.ns,
        sl.mvc.to_str().unwrap(),
        "agent",
        "gc",
        "--state",
        &st,
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("runs"), "{e}");
    for point in control::failpoint::POINTS {
        let ts = Instant::now();
        let releasing = *point == "release-begin";
        if releasing {
            create(&sl, &sl.first_user(), "fp", None);
        }
        sl.stop_agent("B");
        sl.restart_agent_with("B", &[(control::failpoint::ENV, point)])
            .expect("agent B with a failpoint");
        let o = if releasing {
            sl.ctl_output(&["cluster", "destroy", "fp"]).unwrap()
        } else {
            sl.ctl_output(&[
                "cluster",
                "create",
                "fp",
                "--sites",
                "A:B:C",
                "--computes",
                "1:1:1",
                "--memory",
                "128",
                "--frontend-memory",
                "128",
                "--start",
                "--lease-timeout",
                "20",
            ])
            .unwrap()
        };
        assert!(!o.status.success(), "{point}: the command succeeded");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sl.reap_agent("B") {
            assert!(
                Instant::now() < deadline,
                "{point}: agent B did not abort there"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        all_listed(&sl, "B", &format!("{point}, agent dead"));
        // On demand, with the agent down: gc says what it would do, then does it.
        let plan = gc(&sl, "B", true);
        let done = gc(&sl, "B", false);
        // (Ending a process can remove what it held, such as an edge's TAP: gc may
        // then have less to do than it listed, never more.)
        assert!(
            done.lines().all(|l| l == "nothing to collect"
                || plan.lines().any(|p| p.strip_prefix("would: ") == Some(l))),
            "{point}: gc did other than it said:\n{plan}\n{done}"
        );
        assert_eq!(
            plan.contains("nothing to collect"),
            done.contains("nothing to collect"),
            "{point}:\n{plan}\n{done}"
        );
        all_listed(&sl, "B", &format!("{point}, after gc"));
        // What still runs after gc is what it adopted (an edge the store records as
        // started).
        assert!(
            trace(&sl, "B").processes.is_empty() || done.contains("adopt overlay"),
            "{point}: processes left after gc: {:?}\n{done}",
            trace(&sl, "B").processes
        );
        sl.restart_agent("B").expect("agent B restart");
        all_listed(&sl, "B", &format!("{point}, agent restarted"));
        if *point == "reserve-saved" {
            // Never confirmed: the reservation lapses at B by itself.
            let deadline = Instant::now() + Duration::from_secs(lease + 10);
            while !state_json(&sl, "B")["clusters"]
                .as_object()
                .unwrap()
                .is_empty()
            {
                assert!(
                    Instant::now() < deadline,
                    "{point}: the lease did not lapse"
                );
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        let o = sl.ctl_output(&["cluster", "destroy", "fp"]).unwrap();
        if !o.status.success() {
            let o = sl
                .ctl_output(&["cluster", "destroy", "fp", "--force"])
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                o.status.success() || err.contains("no cluster named"),
                "{point}: destroy --force: {err}"
            );
        }
        no_trace(&sl, point);
        eprintln!("{point}: {:.1} s", ts.elapsed().as_secs_f64());
    }
    // The names are free again: the same cluster comes up.
    let cl = create(&sl, &sl.first_user(), "fp", None);
    all_ping(&sl, &sl.first_user(), "fp", &cl);
    sl.ctl(&["cluster", "destroy", "fp"]).expect("destroy");
    no_trace(&sl, "at the end");
    eprintln!(
        "{} crash points: {:.1} s",
        control::failpoint::POINTS.len(),
        t0.elapsed().as_secs_f64()
    );
}
