//! Every user-error path of the `mvc` command line, run as a user would (the binary, with
//! RUST_BACKTRACE=1 as this machine sets it): the exit status, exactly one line on stderr
//! that says what is wrong, nothing else (no backtrace, no usage dump), `{"error": ...}`
//! on stdout with `--json`, and the store and the sites unchanged. Three agents run as
//! `mvc agent run` processes on 127.0.0.1 (no root needed: nothing here starts a VM).
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn mvc() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mvc"))
}

/// `mvc ARGS` with the test's store and key, RUST_BACKTRACE=1.
fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(mvc())
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env("MVC_DB", dir.join("ctl/controller.db"))
        .env("MVC_KEY", dir.join("user.key"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let o = run(dir, args);
    assert!(
        o.status.success(),
        "mvc {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A failure reported as one clear line: exit `code`, stderr exactly `error: ...`
/// containing `want`, stdout empty (or, with `--json`, one JSON object saying the same).
fn user_error(dir: &Path, args: &[&str], code: i32, want: &str) -> String {
    let o = run(dir, args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let what = format!("mvc {}\nstderr: {err}\nstdout: {out}", args.join(" "));
    assert_eq!(o.status.code(), Some(code), "{what}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {what}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "{what}");
    assert!(line.contains(want), "wanted {want:?}: {what}");
    for bad in ["Some(", "backtrace", "panicked", "Caused by", "\\\""] {
        assert!(!line.contains(bad), "{bad:?} in {what}");
    }
    if args.contains(&"--json") {
        let v: serde_json::Value = serde_json::from_str(&out).expect(&what);
        assert_eq!(
            v["error"].as_str(),
            Some(line.trim_start_matches("error: ")),
            "{what}"
        );
    } else {
        assert!(out.is_empty(), "nothing on stdout: {what}");
    }
    line.to_string()
}

struct Agent {
    child: Child,
    addr: String,
    key: String,
    state: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `mvc agent init`, `authorize`, `run` for `site`, as the README has a site admin do.
fn agent(dir: &Path, site: &str, user_pub: &str) -> Agent {
    let state = dir.join(format!("agent-{site}"));
    let st = state.display().to_string();
    let key = ok(dir, &["agent", "init", "--state", &st]);
    ok(
        dir,
        &[
            "agent",
            "authorize",
            "--state",
            &st,
            "--key",
            user_pub,
            "--max-vms",
            "8",
            "--hosts",
            "*",
        ],
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(mvc())
        .args([
            "agent",
            "run",
            "--state",
            &st,
            "--site",
            site,
            "--listen",
            &addr,
            "--host",
            "node1:4:8192:8",
            "--ns-prefix",
            "mvcclierr-",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sa: SocketAddr = addr.parse().unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < end, "agent {site} did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    Agent {
        child,
        addr,
        key,
        state,
    }
}

/// What must not change when a command is refused: the store's rows and MAC counter,
/// and what every agent has reserved.
fn snapshot(dir: &Path, agents: &[&Agent]) -> String {
    let db = rusqlite::Connection::open(dir.join("ctl/controller.db")).unwrap();
    let mut s = String::new();
    for q in [
        "SELECT count(*) FROM clusters",
        "SELECT count(*) FROM vms",
        "SELECT count(*) FROM sites",
        "SELECT next_mac FROM meta",
    ] {
        let n: i64 = db.query_row(q, [], |r| r.get(0)).unwrap();
        s += &format!("{q} = {n}\n");
    }
    for a in agents {
        let rd = std::fs::read_dir(&a.state).unwrap();
        let mut files: Vec<String> = rd
            .flatten()
            .filter(|e| e.path().is_file())
            .map(|e| {
                format!(
                    "{}={}",
                    e.file_name().to_string_lossy(),
                    std::fs::read_to_string(e.path()).unwrap_or_default()
                )
            })
            .collect();
        files.sort();
        s += &files.join("\n");
    }
    s
}

#[test]
fn user_errors_are_one_line_with_the_store_and_sites_unchanged() {
    let t0 = Instant::now();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let user_pub = ok(dir, &["key", "gen"]);

    // The agent refuses a bad host at start, before it makes its state directory.
    let st = dir.join("agent-X");
    let s = st.display().to_string();
    let line = user_error(
        dir,
        &[
            "agent",
            "run",
            "--state",
            &s,
            "--site",
            "X",
            "--host",
            "bad host!:2:1024:2",
        ],
        2,
        "host name 'bad host!'",
    );
    assert!(line.contains("letters, digits"), "{line}");
    assert!(!st.exists());
    for (args, want) in [
        (vec!["--site", "X", "--host", "h:0:1024:2"], "vCPUs of host"),
        (vec!["--site", "X", "--host", "h:2:1024"], "NAME:VCPUS"),
        (vec!["--site", "bad site", "--host", "h:1:1:1"], "site name"),
        (vec!["--site", "X", "--listen", "nowhere"], "listen address"),
        (
            vec!["--site", "X", "--ns-prefix", "a/b"],
            "namespace prefix",
        ),
        (vec![], "--site"),
        (
            vec!["--site", "X"],
            "is not an agent state directory (no agent key): run `mvc agent init",
        ),
    ] {
        let mut a = vec!["agent", "run", "--state", &s];
        a.extend(args);
        user_error(dir, &a, 2, want);
        assert!(!st.exists());
    }
    // The demo's counts are checked before it needs root or builds anything.
    for bad in ["0:0:0", "1:1", "1:x:1"] {
        user_error(dir, &["demo", "--computes", bad], 2, &format!("'{bad}'"));
    }
    user_error(
        dir,
        &[
            "agent",
            "authorize",
            "--state",
            &s,
            "--key",
            "abc",
            "--max-vms",
            "2",
        ],
        2,
        "64 hex digits",
    );
    user_error(
        dir,
        &[
            "agent",
            "authorize",
            "--state",
            &s,
            "--key",
            &user_pub,
            "--max-vms",
            "2",
            "--hosts",
            "a,b c",
        ],
        2,
        "host name 'b c'",
    );
    user_error(
        dir,
        &[
            "agent",
            "authorize",
            "--state",
            &s,
            "--key",
            &user_pub,
            "--max-vms",
            "2",
        ],
        2,
        "is not an agent state directory",
    );
    assert!(!st.exists());

    // Three sites, as the README has them; then the agents go away, so a command that
    // asked any of them would fail differently from a refusal at the door.
    let agents: Vec<Agent> = ["A", "B", "C"]
        .iter()
        .map(|s| agent(dir, s, &user_pub))
        .collect();
    for (site, a) in ["A", "B", "C"].iter().zip(&agents) {
        ok(
            dir,
            &[
                "site",
                "add",
                site,
                "--agent",
                &a.addr,
                "--agent-key",
                &a.key,
            ],
        );
    }
    let refs: Vec<&Agent> = agents.iter().collect();
    // A second agent on a port in use.
    let p = dir.join("agent-P").display().to_string();
    ok(dir, &["agent", "init", "--state", &p]);
    user_error(
        dir,
        &[
            "agent",
            "run",
            "--state",
            &p,
            "--site",
            "P",
            "--listen",
            &agents[0].addr,
        ],
        1,
        &format!("listening on {}: Address already in use", agents[0].addr),
    );
    let before = snapshot(dir, &refs);
    let create = |name: &str, sites: &str, computes: &str| {
        vec![
            "cluster".to_string(),
            "create".into(),
            name.into(),
            "--sites".into(),
            sites.into(),
            "--computes".into(),
            computes.into(),
        ]
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (create("vc1", "A:B:C", "0:0:0"), "at least one compute"),
        (create("vc1", "A:B:C", "1:x:1"), "compute count 'x'"),
        (
            create("vc1", "A:B:C", "1:1"),
            "3 site(s) but --computes gives 2",
        ),
        (create("vc1", "A:A:B", "1:1:1"), "a site is named twice"),
        (create("vc1", "A:B:C", "300:0:0"), "compute count '300'"),
        (
            create("bad_name", "A:B:C", "1:1:1"),
            "cluster name 'bad_name'",
        ),
        (create("vc1", "A:b c", "1:1"), "site name 'b c'"),
    ];
    for (args, want) in &cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        user_error(dir, &a, 2, want);
        let mut j = a.clone();
        j.push("--json");
        user_error(dir, &j, 2, want);
    }
    let mut a = create("vc1", "A:B:C", "1:1:1");
    a.extend(["--memory".into(), "0".into()]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    user_error(dir, &a, 2, "memory (MiB) '0'");
    user_error(
        dir,
        &["cluster", "status", "nope"],
        1,
        "no cluster named 'nope'",
    );
    user_error(
        dir,
        &["cluster", "status", "nope", "--json"],
        1,
        "no cluster named 'nope'",
    );
    for json in [false, true] {
        let mut a = vec!["vm", "list", "--cluster", "nope"];
        if json {
            a.push("--json");
        }
        user_error(dir, &a, 1, "no cluster named 'nope'");
    }
    user_error(dir, &["vm", "start", "a b"], 2, "VM name 'a b'");
    user_error(
        dir,
        &[
            "site",
            "add",
            "D",
            "--agent",
            "198.18.1.2",
            "--agent-key",
            &user_pub,
        ],
        2,
        "agent address '198.18.1.2'",
    );
    user_error(
        dir,
        &["cluster", "list", "--key", "/nonexistent/user.key"],
        1,
        "reading your key /nonexistent/user.key (make one with `mvc key gen`): No such file",
    );
    // A page of clusters: at least one, after a valid name.
    user_error(dir, &["cluster", "list", "--limit", "0"], 2, "--limit");
    user_error(
        dir,
        &["cluster", "list", "--json", "--after", "bad name!"],
        2,
        "'bad name!'",
    );
    user_error(
        dir,
        &["cluster", "frobnicate"],
        2,
        "unrecognized subcommand",
    );
    assert_eq!(snapshot(dir, &refs), before, "store or sites changed");

    // Agents that are gone or that hang up: the site is named, and what to check.
    let port = free_port();
    user_error(
        dir,
        &[
            "site",
            "add",
            "D",
            "--agent",
            &format!("127.0.0.1:{port}"),
            "--agent-key",
            &agents[0].key,
        ],
        1,
        &format!("site D's agent at 127.0.0.1:{port} refused the connection (is it running?)"),
    );
    let hangup = TcpListener::bind("127.0.0.1:0").unwrap();
    let hp = hangup.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        // Accept and close at once, as an agent that dies mid-request.
        if let Ok((s, _)) = hangup.accept() {
            drop(s);
        }
    });
    user_error(
        dir,
        &[
            "site",
            "add",
            "B",
            "--agent",
            &format!("127.0.0.1:{hp}"),
            "--agent-key",
            &agents[1].key,
            "--json",
        ],
        1,
        "site B's agent closed the connection (is it running?)",
    );
    t.join().unwrap();
    assert_eq!(snapshot(dir, &refs), before, "store or sites changed");
    drop(agents);
    // With the agents gone, a command that needs them names the site and what to check.
    // (after its progress line: it asked the sites for their capacity).
    let o = run(
        dir,
        &[
            "cluster",
            "create",
            "vc1",
            "--sites",
            "A:B:C",
            "--computes",
            "1:1:1",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert_eq!(lines[0], "mvc: asking each site for its capacity");
    for site in ["A", "B", "C"] {
        assert!(
            lines[1].contains(&format!("site {site}'s agent at 127.0.0.1:")),
            "{err}"
        );
    }
    assert!(
        lines[1].contains("refused the connection (is it running?)"),
        "{err}"
    );
    eprintln!(
        "user-error paths checked in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// xnbd's binary, when it is built next to `mvc`: a user error is one line too.
#[test]
fn xnbd_user_error_is_one_line() {
    let xnbd = mvc().with_file_name("xnbd");
    if !xnbd.exists() {
        lab::skip(
            "xnbd_user_error_is_one_line",
            &format!("{} is not built", xnbd.display()),
        );
        return;
    }
    let o = Command::new(&xnbd)
        .args([
            "serve",
            "--export",
            "/nonexistent/disk.img",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("error: opening /nonexistent/disk.img: No such file"),
        "{err}"
    );
}
