//! The agent's reservation store (no root needed): an agent holding 1,000 reservations
//! (migrated from an old single `state.json`) killed at each step of one more
//! reservation, and restarted: every reservation is still there, the one cut short is
//! there whole or not at all, no claim or temporary file is left that the store does
//! not name.
mod common;

use common::agent::LocalAgent;
use control::agent::state::reservations_dir;
use control::auth::SigningKey;
use control::failpoint;
use control::proto::{InfoData, Request, SlotReq};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Reservations the agent holds before the kills.
const HELD: usize = 1000;

struct Agent {
    local: LocalAgent,
    claims: PathBuf,
    child: Option<Child>,
}

impl Agent {
    fn new(dir: &Path, user: &SigningKey) -> Agent {
        Agent {
            local: LocalAgent::init(dir, user, 4000),
            claims: dir.join("claims"),
            child: None,
        }
    }

    /// `mvc agent run`, aborting at `failpoint` when given; waits until it listens.
    fn start(&mut self, failpoint: Option<&str>) -> Duration {
        let t = Instant::now();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mvc"));
        cmd.args(self.local.run_args())
            .args(["--host", "h0:64:100000:256", "--host", "h1:64:100000:256"])
            .args(["--host", "h2:64:100000:256", "--host", "h3:64:100000:256"])
            .args(["--host", "h4:64:100000:256", "--ns-prefix", "mvcst-"])
            .args(["--overlay", "n2n", "--claims-dir"])
            .arg(&self.claims)
            .env_remove(failpoint::ENV);
        if let Some(p) = failpoint {
            cmd.env(failpoint::ENV, p);
        }
        self.child = Some(self.local.spawn(&mut cmd, Duration::from_secs(60)));
        t.elapsed()
    }

    fn log(&self) -> String {
        self.local.log()
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

    fn call(&self, user: &SigningKey, req: &Request) -> Result<serde_json::Value, String> {
        self.local.call(user, req)
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
        std::fs::read_dir(reservations_dir(&self.local.dir))
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
