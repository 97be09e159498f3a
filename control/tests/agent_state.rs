//! The agent's reservation store (no root needed): an agent holding 1,000 reservations
//! (migrated from an old single `state.json`) killed at each step of one more
//! reservation, and restarted: every reservation is still there, the one cut short is
//! there whole or not at all, no claim or temporary file is left that the store does
//! not name.
use control::agent::{self, state::reservations_dir};
use control::auth::{Authorization, SigningKey};
use control::client::AgentClient;
use control::failpoint;
use control::model::Site;
use control::proto::{InfoData, Request, SlotReq};
use std::collections::BTreeSet;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Reservations the agent holds before the kills.
const HELD: usize = 1000;

struct Agent {
    dir: PathBuf,
    claims: PathBuf,
    addr: String,
    key: String,
    child: Option<Child>,
}

impl Agent {
    fn new(dir: &Path, user: &SigningKey) -> Agent {
        let key = agent::init(dir).unwrap();
        agent::authorize(
            dir,
            Authorization {
                key: user.public_hex(),
                comment: "test".into(),
                may_create_clusters: true,
                max_vms: 4000,
                hosts: vec!["*".into()],
            },
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Agent {
            dir: dir.into(),
            claims: dir.join("claims"),
            addr: format!("127.0.0.1:{port}"),
            key,
            child: None,
        }
    }

    /// `mvc agent run`, aborting at `failpoint` when given; waits until it listens.
    fn start(&mut self, failpoint: Option<&str>) -> Duration {
        let t = Instant::now();
        let log = std::fs::File::create(self.dir.join("agent.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mvc"));
        cmd.args(["agent", "run", "--state"])
            .arg(&self.dir)
            .args(["--site", "A", "--listen", &self.addr])
            .args(["--host", "h0:64:100000:256", "--host", "h1:64:100000:256"])
            .args(["--host", "h2:64:100000:256", "--host", "h3:64:100000:256"])
            .args(["--host", "h4:64:100000:256", "--ns-prefix", "mvcst-"])
            .args(["--overlay", "n2n", "--claims-dir"])
            .arg(&self.claims)
            .env("RUST_LOG", "info")
            .env_remove(failpoint::ENV)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(p) = failpoint {
            cmd.env(failpoint::ENV, p);
        }
        self.child = Some(cmd.spawn().unwrap());
        let end = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(&self.addr).is_err() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited ({st}) at start: {}", self.log());
            }
            assert!(Instant::now() < end, "agent did not listen: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        t.elapsed()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Wait (bounded) for the agent to have aborted at its failpoint.
    fn wait_abort(&mut self, point: &str) {
        let child = self.child.as_mut().unwrap();
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                assert!(!st.success(), "{point}: agent exited cleanly");
                break;
            }
            assert!(Instant::now() < end, "{point}: agent did not abort");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            self.log().contains(&format!("failpoint {point}")),
            "{point}: {}",
            self.log()
        );
        self.child = None;
    }

    /// SIGKILL, as `kill -9` (this test's own child, by its pid).
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn site(&self) -> Site {
        Site {
            id: 0,
            name: "A".into(),
            agent_addr: self.addr.clone(),
            agent_key: self.key.clone(),
        }
    }

    fn call(&self, user: &SigningKey, req: &Request) -> Result<serde_json::Value, String> {
        AgentClient::connect(&self.site(), user)
            .map_err(|e| e.to_string())?
            .call_value(req)
            .map_err(|e| e.to_string())
    }

    /// The reservations the agent reports: name -> confirmed.
    fn held(&self, user: &SigningKey) -> std::collections::BTreeMap<String, bool> {
        let v = self.call(user, &Request::Info).unwrap();
        let info: InfoData = serde_json::from_value(v).unwrap();
        info.reservations
            .into_iter()
            .map(|r| (r.cluster, r.confirmed))
            .collect()
    }

    /// Numbers with a reservation file; fails on a leftover temporary file.
    fn files(&self) -> BTreeSet<u32> {
        std::fs::read_dir(reservations_dir(&self.dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .map(|n| {
                assert!(!n.ends_with(".tmp"), "leftover {n}");
                n.strip_prefix('c')
                    .and_then(|x| x.strip_suffix(".json"))
                    .and_then(|x| x.parse().ok())
                    .unwrap_or_else(|| panic!("stray file {n}"))
            })
            .collect()
    }

    /// Cluster numbers claimed on the machine (every one by this agent here).
    fn claimed(&self) -> BTreeSet<u32> {
        std::fs::read_dir(&self.claims)
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter_map(|n| n.strip_prefix('n')?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn reserve(name: &str) -> Request {
    Request::Reserve {
        cluster: name.into(),
        slots: vec![SlotReq {
            name: format!("{name}-fe"),
            host: "h4".into(),
            memory_mb: 1,
        }],
        supernode: false,
    }
}

/// A version 2 `state.json` (one file for every reservation, as agents before the
/// per-reservation store wrote it) with `n` confirmed one-VM reservations of `owner`,
/// spread over hosts h0-h3.
fn old_state(n: usize, owner: &str) -> String {
    let clusters: serde_json::Map<String, serde_json::Value> = (1..=n)
        .map(|i| {
            let c = serde_json::json!({
                "name": format!("k{i}"),
                "owner": owner,
                "bridge": format!("mvb{i}"),
                "tap": format!("mvt{i}"),
                "supernode_port": null,
                "lease_until": null,
                "releasing": false,
                "slots": [{
                    "name": format!("k{i}-fe"),
                    "host": format!("h{}", i % 4),
                    "memory_mb": 1,
                    "state": "reserved",
                    "handle": null,
                    "local": format!("c{i}-k{i}-fe"),
                    "nic": format!("mvv{i}-0"),
                }],
                "overlay": null,
            });
            (i.to_string(), c)
        })
        .collect();
    serde_json::json!({"version": 2, "clusters": clusters}).to_string()
}

#[test]
fn agent_with_1000_reservations_killed_at_each_reserve_step_loses_and_leaks_nothing() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let user = SigningKey::generate().unwrap();
    let mut a = Agent::new(tmp.path(), &user);
    std::fs::write(
        tmp.path().join("state.json"),
        old_state(HELD, &user.public_hex()),
    )
    .unwrap();

    // The old file is migrated once, at the first start.
    let up = a.start(None);
    eprintln!(
        "start, migrating {HELD} reservations: {:.2} s",
        up.as_secs_f64()
    );
    assert!(!tmp.path().join("state.json").exists());
    assert!(tmp.path().join("state.json.migrated").exists());
    let want: BTreeSet<u32> = (1..=HELD as u32).collect();
    assert_eq!(a.files(), want);
    let held = a.held(&user);
    assert_eq!(held.len(), HELD);
    assert!(held.values().all(|c| *c));

    // Killed at each step of one more reservation, then restarted.
    let points = failpoint::STORE_POINTS
        .iter()
        .chain(["reserve-saved", "confirm-saved"].iter());
    for (i, point) in points.enumerate() {
        a.kill9();
        a.start(Some(point));
        let name = format!("x{i}");
        let r = a.call(&user, &reserve(&name));
        if *point == "confirm-saved" {
            // The reserve went through; the agent dies confirming.
            r.unwrap();
            assert!(a
                .call(
                    &user,
                    &Request::Confirm {
                        cluster: name.clone()
                    }
                )
                .is_err());
        } else {
            assert!(r.is_err(), "{point}: the request succeeded");
        }
        a.wait_abort(point);
        let up = a.start(None);
        let held = a.held(&user);
        let files = a.files();
        eprintln!(
            "{point}: restart with {} reservations {:.2} s",
            held.len(),
            up.as_secs_f64()
        );
        // Nothing lost: every earlier reservation is there, confirmed.
        for k in 1..=HELD {
            assert_eq!(held.get(&format!("k{k}")), Some(&true), "{point}: k{k}");
        }
        // The one cut short: not there before its file was renamed into place, there
        // (unconfirmed, or confirmed once the confirm was saved) after.
        let expect = match *point {
            "state-file-synced" => None,
            "confirm-saved" => Some(true),
            _ => Some(false),
        };
        assert_eq!(held.get(&name).copied(), expect, "{point}");
        assert_eq!(files.len(), held.len(), "{point}: files {files:?}");
        // Nothing leaked: every claim is a reservation's.
        let claimed = a.claimed();
        assert!(
            claimed.is_subset(&files),
            "{point}: claims {:?} not in the store",
            claimed.difference(&files).collect::<Vec<_>>()
        );
        // The agent serves: the cut-short one is released, a new one made and released.
        a.call(&user, &Request::Release { cluster: name }).unwrap();
        let y = format!("y{i}");
        a.call(&user, &reserve(&y)).unwrap();
        a.call(&user, &Request::Confirm { cluster: y.clone() })
            .unwrap();
        a.call(&user, &Request::Release { cluster: y }).unwrap();
        assert_eq!(a.files(), want, "{point}");
        assert!(a.claimed().is_subset(&want), "{point}");
    }
    a.kill9();
    a.start(None);
    assert_eq!(a.held(&user).len(), HELD);
    eprintln!("whole test: {:.1} s", t0.elapsed().as_secs_f64());
}
