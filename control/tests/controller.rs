//! The controller against real agents served in-process on 127.0.0.1 (no root needed):
//! authorisation, replay and tampering refusals, all-or-nothing reservations, agents
//! that are down, and state that survives a controller restart.
use control::agent::{self, AgentConfig, AgentCore, HostSpec, OverlayImpl};
use control::auth::{Authorization, Envelope, SigningKey};
use control::client::AgentClient;
use control::controller::{ControlError, Controller, CreateArgs};
use control::driver::NetnsDriver;
use control::model::Site;
use control::proto::{Body, InfoData, Request, ReserveData, SlotReq, PROTO_VERSION};
use control::store::{SqliteStore, Store};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

struct TestAgent {
    site: String,
    addr: String,
    key: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestAgent {
    /// An agent for `site` with one host of `host_max` VMs; `user` authorised for
    /// `max_vms` VMs when given.
    fn start(site: &str, host_max: u32, user: Option<(&SigningKey, u32)>) -> TestAgent {
        TestAgent::start_with_lease(site, host_max, user, agent::DEFAULT_LEASE_SECS)
    }

    /// As [`TestAgent::start`], with unconfirmed reservations lapsing after `lease_secs`.
    fn start_with_lease(
        site: &str,
        host_max: u32,
        user: Option<(&SigningKey, u32)>,
        lease_secs: u64,
    ) -> TestAgent {
        let dir = tempfile::tempdir().unwrap();
        let key = agent::init(dir.path()).unwrap();
        if let Some((u, max)) = user {
            agent::authorize(
                dir.path(),
                Authorization {
                    key: u.public_hex(),
                    comment: "test".into(),
                    may_create_clusters: true,
                    max_vms: max,
                    hosts: vec!["*".into()],
                },
            )
            .unwrap();
        }
        let cfg = AgentConfig {
            lease_secs,
            claims_dir: dir.path().join("claims"),
            ..AgentConfig::new(
                site,
                dir.path(),
                vec![HostSpec {
                    name: "h0".into(),
                    vcpus: 2,
                    memory_mb: 4096,
                    max_vms: host_max,
                }],
                OverlayImpl::N2n,
            )
        };
        let drv = NetnsDriver::new("mvctest-", &dir.path().join("run"));
        let core = AgentCore::open(cfg, Box::new(drv)).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let hk = Arc::new(agent::load_key(dir.path()).unwrap());
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            agent::serve(Arc::new(Mutex::new(core)), hk, listener, s2).unwrap();
        });
        TestAgent {
            site: site.into(),
            addr,
            key,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn authorize(&self, user: &SigningKey, max_vms: u32) {
        agent::authorize(
            self._dir.path(),
            Authorization {
                key: user.public_hex(),
                comment: "second user".into(),
                may_create_clusters: true,
                max_vms,
                hosts: vec!["*".into()],
            },
        )
        .unwrap();
    }

    fn site(&self) -> Site {
        Site {
            id: 0,
            name: self.site.clone(),
            agent_addr: self.addr.clone(),
            agent_key: self.key.clone(),
        }
    }

    fn info(&self, user: &SigningKey) -> InfoData {
        AgentClient::connect(&self.site(), user)
            .unwrap()
            .call(&Request::Info)
            .unwrap()
    }

    fn down(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.down();
    }
}

fn quiet(_: &str) {}

fn controller<'a>(
    store: &'a mut SqliteStore,
    key: &'a SigningKey,
    dir: &std::path::Path,
) -> Controller<'a> {
    Controller {
        store,
        key,
        secrets_dir: dir.join("secrets"),
        progress: &quiet,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sealed(c: &AgentClient, user: &SigningKey, req: Request) -> Envelope {
    let body = serde_json::to_string(&Body {
        proto: PROTO_VERSION,
        req,
    })
    .unwrap();
    Envelope::seal(user, &c.channel_id(), now(), body).unwrap()
}

#[test]
fn unauthorised_key_is_refused_at_the_agent() {
    let admin_user = SigningKey::generate().unwrap();
    let stranger = SigningKey::generate().unwrap();
    let a = TestAgent::start("A", 8, Some((&admin_user, 4)));
    let dir = tempfile::tempdir().unwrap();
    let mut store = SqliteStore::open_in_memory().unwrap();
    let mut c = controller(&mut store, &stranger, dir.path());
    let e = c.site_add("A", &a.addr, &a.key).unwrap_err().to_string();
    assert!(e.contains("not authorised at this site"), "{e}");
    assert!(c.store.sites().unwrap().is_empty());
    // A wrong pinned agent key is refused by the controller before anything is sent.
    let other = SigningKey::generate().unwrap().public_hex();
    let mut c = controller(&mut store, &admin_user, dir.path());
    let e = c.site_add("A", &a.addr, &other).unwrap_err().to_string();
    assert!(e.contains("agent key mismatch"), "{e}");
    // The right user and key work; the agent reports its site and capacity.
    let v = c.site_add("A", &a.addr, &a.key).unwrap();
    assert_eq!(v.hosts[0].free_vms, 8);
    let e = c.site_add("B", &a.addr, &a.key).unwrap_err().to_string();
    assert!(e.contains("serves site 'A'"), "{e}");
}

#[test]
fn replayed_tampered_and_over_limit_requests_are_refused() {
    let user = SigningKey::generate().unwrap();
    let a = TestAgent::start("A", 8, Some((&user, 2)));
    let mut c = AgentClient::connect(&a.site(), &user).unwrap();
    let env = sealed(&c, &user, Request::Info);
    c.send_envelope(&env).unwrap();
    let e = c.send_envelope(&env).unwrap_err().to_string();
    assert!(e.contains("replayed request refused"), "{e}");

    let mut t = sealed(&c, &user, Request::Info);
    t.body = t.body.replace("info", "release\",\"cluster\":\"x");
    let e = c.send_envelope(&t).unwrap_err().to_string();
    assert!(e.contains("bad signature"), "{e}");

    // Signed for another channel: replaying a captured request on a new connection.
    let mut c2 = AgentClient::connect(&a.site(), &user).unwrap();
    let env = sealed(&c, &user, Request::Info);
    let e = c2.send_envelope(&env).unwrap_err().to_string();
    assert!(e.contains("bad signature"), "{e}");

    // Stale timestamp.
    let body = serde_json::to_string(&Body {
        proto: PROTO_VERSION,
        req: Request::Info,
    })
    .unwrap();
    let old = Envelope::seal(&user, &c2.channel_id(), now() - 3600, body).unwrap();
    let e = c2.send_envelope(&old).unwrap_err().to_string();
    assert!(e.contains("away from the agent clock"), "{e}");

    // Authorised for 2 VMs: 3 are refused, with the reason.
    let slots = (0..3)
        .map(|i| SlotReq {
            name: format!("k-c{i}"),
            host: "h0".into(),
            memory_mb: 128,
        })
        .collect::<Vec<_>>();
    let e = c2
        .call_value(&Request::Reserve {
            cluster: "k".into(),
            slots: slots.clone(),
            supernode: false,
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most 2 VMs"), "{e}");
    // An unknown host is refused too.
    let e = c2
        .call_value(&Request::Reserve {
            cluster: "k".into(),
            slots: vec![SlotReq {
                name: "k-c0".into(),
                host: "nosuch".into(),
                memory_mb: 128,
            }],
            supernode: false,
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("no host 'nosuch'"), "{e}");
    // Hostile names never reach a file name or an `ip` argument.
    let e = c2
        .call_value(&Request::Release {
            cluster: "../../etc".into(),
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a valid name"), "{e}");
    // Within the limit it is reserved.
    c2.call_value(&Request::Reserve {
        cluster: "k".into(),
        slots: slots[..2].to_vec(),
        supernode: false,
    })
    .unwrap();
    assert_eq!(a.info(&user).hosts[0].free_vms, 6);

    // A second authorised user (picked up without restarting the agent) can neither
    // see nor touch the first user's cluster: its names are its own.
    let other = SigningKey::generate().unwrap();
    a.authorize(&other, 4);
    let mut c3 = AgentClient::connect(&a.site(), &other).unwrap();
    let i: InfoData = c3.call(&Request::Info).unwrap();
    assert!(i.vms.is_empty() && i.reservations.is_empty());
    assert_eq!(i.hosts[0].free_vms, 6);
    let r: String = c3
        .call(&Request::Release {
            cluster: "k".into(),
        })
        .unwrap();
    assert_eq!(r, "nothing reserved");
    let e = c3
        .call_value(&Request::StopVm {
            cluster: "k".into(),
            vm: "k-c0".into(),
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("no cluster 'k' of yours"), "{e}");
    assert_eq!(a.info(&user).hosts[0].free_vms, 6);
    // Revoked: refused from the next connection on.
    assert!(agent::revoke(a._dir.path(), &other.public_hex()).unwrap());
    let e = AgentClient::connect(&a.site(), &other)
        .unwrap()
        .call_value(&Request::Info)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not authorised"), "{e}");
}

#[test]
fn capacity_refusal_leaves_nothing_behind() {
    let user = SigningKey::generate().unwrap();
    let a = TestAgent::start("A", 8, Some((&user, 8)));
    let b = TestAgent::start("B", 8, Some((&user, 8)));
    // C's host has room for 8 VMs but the user may hold only 2 there: the controller's
    // placement passes and the agent refuses at reservation time, after A and B
    // reserved; they must be released again.
    let c_ag = TestAgent::start("C", 8, Some((&user, 2)));
    let dir = tempfile::tempdir().unwrap();
    let mut store = SqliteStore::open_in_memory().unwrap();
    let mut c = controller(&mut store, &user, dir.path());
    for ag in [&a, &b, &c_ag] {
        c.site_add(&ag.site, &ag.addr, &ag.key).unwrap();
    }
    let args = |name: &str, computes: Vec<u32>| CreateArgs {
        name: name.into(),
        sites: vec!["A".into(), "B".into(), "C".into()],
        computes,
        memory_mb: 256,
        frontend_memory_mb: 256,
        overlay: None,
        pool: "198.19.0.0/16".parse().unwrap(),
    };
    // Placement refusal: B's host has 8 slots.
    let e = c.cluster_create(&args("k", vec![1, 9, 1])).unwrap_err();
    assert!(matches!(e, ControlError::Capacity(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("site B lacks capacity") && msg.contains("nothing was allocated"),
        "{msg}"
    );
    // Reservation refusal at C.
    let e = c
        .cluster_create(&args("k", vec![1, 1, 3]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("site C") && e.contains("at most 2 VMs"), "{e}");
    assert!(c.store.clusters().unwrap().is_empty());
    assert!(c.store.all_macs().unwrap().is_empty());
    for ag in [&a, &b, &c_ag] {
        let i = ag.info(&user);
        assert_eq!(
            i.hosts[0].free_vms, 8,
            "site {} kept a reservation",
            ag.site
        );
        assert!(i.vms.is_empty());
    }
    assert!(std::fs::read_dir(dir.path().join("secrets"))
        .map(|mut d| d.next().is_none())
        .unwrap_or(true));
}

#[test]
fn agent_down_is_a_clear_error_and_shows_in_status() {
    let user = SigningKey::generate().unwrap();
    let a = TestAgent::start("A", 8, Some((&user, 8)));
    let mut b = TestAgent::start("B", 8, Some((&user, 8)));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let mut store = SqliteStore::open(&db).unwrap();
    {
        let mut c = controller(&mut store, &user, dir.path());
        c.site_add("A", &a.addr, &a.key).unwrap();
        c.site_add("B", &b.addr, &b.key).unwrap();
    }
    // A cluster record (as if created earlier), to ask its status.
    let plan = control::store::ClusterPlan {
        name: "k".into(),
        origin: "A".into(),
        overlay: control::model::Overlay {
            community: "mvctest".into(),
            secret_ref: "file:/nonexistent".into(),
            supernode: "127.0.0.1:7701".into(),
        },
        overlay_net: None,
        pool: "198.19.0.0/16".parse().unwrap(),
        attachments: Vec::new(),
        vms: vec![
            control::store::PlannedVm {
                name: "k-fe".into(),
                role: control::model::Role::Frontend,
                site: "A".into(),
                host: "h0".into(),
                memory_mb: 256,
            },
            control::store::PlannedVm {
                name: "k-c1".into(),
                role: control::model::Role::Compute,
                site: "B".into(),
                host: "h0".into(),
                memory_mb: 256,
            },
        ],
    };
    store.create_cluster(&plan).unwrap();
    b.down();
    drop(store);
    // A restarted controller (fresh store handle on the same file) sees everything.
    let mut store = SqliteStore::open(&db).unwrap();
    let c = controller(&mut store, &user, dir.path());
    assert_eq!(c.site_list().unwrap().len(), 2);
    let st = c.cluster_status("k").unwrap();
    let sb = st.sites.iter().find(|s| s.site == "B").unwrap();
    assert!(!sb.reachable);
    let err = sb.error.as_deref().unwrap();
    assert!(
        err.contains("site B's agent at")
            && err.contains("refused the connection (is it running?)"),
        "{err}"
    );
    let vm = st.vms.iter().find(|v| v.vm.name == "k-c1").unwrap();
    assert_eq!(vm.live, "unknown (site down)");
    assert!(st.sites.iter().find(|s| s.site == "A").unwrap().reachable);
    // Creating on a down site is refused before anything is reserved.
    let mut c = c;
    let e = c
        .cluster_create(&CreateArgs {
            name: "j".into(),
            sites: vec!["A".into(), "B".into()],
            computes: vec![1, 1],
            memory_mb: 128,
            frontend_memory_mb: 128,
            overlay: None,
            pool: "198.19.0.0/16".parse().unwrap(),
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("site B's agent at") && e.contains("is it running?"),
        "{e}"
    );
    assert_eq!(a.info(&user).hosts[0].free_vms, 8);
    // Destroy refuses while B is down, and --force forgets it.
    let e = c.cluster_destroy("k", false).unwrap_err().to_string();
    assert!(e.contains("--force"), "{e}");
    let r = c.cluster_destroy("k", true).unwrap();
    assert!(r.known);
    assert_eq!(r.unreachable.len(), 1);
    assert!(matches!(c.cluster_status("k"), Err(ControlError::Store(_))));
}

fn slot(name: &str) -> SlotReq {
    SlotReq {
        name: name.into(),
        host: "h0".into(),
        memory_mb: 128,
    }
}

#[test]
fn the_agent_names_each_users_cluster_and_unconfirmed_reservations_lapse() {
    let u1 = SigningKey::generate().unwrap();
    let u2 = SigningKey::generate().unwrap();
    let a = TestAgent::start_with_lease("A", 8, Some((&u1, 4)), 2);
    a.authorize(&u2, 4);
    let mut c1 = AgentClient::connect(&a.site(), &u1).unwrap();
    let mut c2 = AgentClient::connect(&a.site(), &u2).unwrap();
    // The same cluster and VM names for two keys: each gets its own bridge, TAP,
    // supernode port and local VM names.
    let req = Request::Reserve {
        cluster: "k".into(),
        slots: vec![slot("k-fe"), slot("k-c1")],
        supernode: true,
    };
    let d1: ReserveData = c1.call(&req).unwrap();
    let d2: ReserveData = c2.call(&req).unwrap();
    assert_ne!(d1.bridge, d2.bridge);
    assert_ne!(d1.tap, d2.tap);
    assert!(d1.supernode_port.is_some() && d2.supernode_port.is_some());
    assert_ne!(d1.supernode_port, d2.supernode_port);
    assert_ne!(d1.local_names, d2.local_names);
    assert_eq!(d1.lease_secs, 2);
    // Asking again is answered with the same names (a retried request).
    let again: ReserveData = c1.call(&req).unwrap();
    assert_eq!(again, d1);
    // Another plan under a name the key holds is refused.
    let e = c1
        .call_value(&Request::Reserve {
            cluster: "k".into(),
            slots: vec![slot("k-fe")],
            supernode: true,
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("--force"), "{e}");
    // Nothing starts on an unconfirmed reservation.
    let e = c1
        .call_value(&Request::StartOverlay {
            cluster: "k".into(),
            community: "mvcabc".into(),
            secret: "0a".repeat(32),
            supernode: "127.0.0.1:7700".into(),
            edge_name: "A-h0-0".into(),
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("not confirmed"), "{e}");
    let i: InfoData = c2.call(&Request::Info).unwrap();
    assert_eq!(i.reservations.len(), 1);
    assert!(!i.reservations[0].confirmed && i.reservations[0].expires_in.is_some());
    assert_eq!(i.hosts[0].free_vms, 4);
    // u1 confirms; u2 does not, and its reservation lapses after the lease.
    c1.call_value(&Request::Confirm {
        cluster: "k".into(),
    })
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(3100));
    let i: InfoData = c2.call(&Request::Info).unwrap();
    assert!(i.reservations.is_empty() && i.vms.is_empty(), "{i:?}");
    assert_eq!(i.hosts[0].free_vms, 6);
    let e = c2
        .call_value(&Request::Confirm {
            cluster: "k".into(),
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("lease lapse"), "{e}");
    let i: InfoData = c1.call(&Request::Info).unwrap();
    assert_eq!(i.reservations.len(), 1);
    assert!(i.reservations[0].confirmed);
}

#[test]
fn destroy_force_clears_a_reservation_the_store_does_not_know() {
    let user = SigningKey::generate().unwrap();
    let a = TestAgent::start("A", 8, Some((&user, 8)));
    let b = TestAgent::start("B", 8, Some((&user, 8)));
    let dir = tempfile::tempdir().unwrap();
    let mut store = SqliteStore::open_in_memory().unwrap();
    let mut c = controller(&mut store, &user, dir.path());
    c.site_add("A", &a.addr, &a.key).unwrap();
    c.site_add("B", &b.addr, &b.key).unwrap();
    // As if a controller crashed after reserving at B and confirming there.
    let mut cb = AgentClient::connect(&b.site(), &user).unwrap();
    cb.call_value(&Request::Reserve {
        cluster: "lost".into(),
        slots: vec![slot("lost-c1")],
        supernode: false,
    })
    .unwrap();
    cb.call_value(&Request::Confirm {
        cluster: "lost".into(),
    })
    .unwrap();
    assert_eq!(b.info(&user).hosts[0].free_vms, 7);
    let e = c.cluster_destroy("lost", false).unwrap_err().to_string();
    assert!(e.contains("no cluster named 'lost'"), "{e}");
    let r = c.cluster_destroy("lost", true).unwrap();
    assert!(!r.known);
    assert_eq!(r.released_at, vec!["B".to_string()]);
    assert_eq!(b.info(&user).hosts[0].free_vms, 8);
    assert!(b.info(&user).reservations.is_empty());
    // Nothing left anywhere: --force on an unknown name is a clear error again.
    let e = c.cluster_destroy("lost", true).unwrap_err().to_string();
    assert!(e.contains("no cluster named 'lost'"), "{e}");
}

#[test]
fn overlay_networks_holding_an_agent_address_are_refused() {
    let user = SigningKey::generate().unwrap();
    let a = TestAgent::start("A", 8, Some((&user, 8)));
    let dir = tempfile::tempdir().unwrap();
    let mut store = SqliteStore::open_in_memory().unwrap();
    let mut c = controller(&mut store, &user, dir.path());
    c.site_add("A", &a.addr, &a.key).unwrap();
    let args = |overlay: Option<&str>, pool: &str| CreateArgs {
        name: "k".into(),
        sites: vec!["A".into()],
        computes: vec![1],
        memory_mb: 128,
        frontend_memory_mb: 128,
        overlay: overlay.map(|o| o.parse().unwrap()),
        pool: pool.parse().unwrap(),
    };
    // The agent listens on 127.0.0.1: an overlay or pool holding it is refused before
    // any site is asked.
    for (o, p, flag) in [
        (
            Some("127.0.0.0/24"),
            "198.19.0.0/16",
            "--overlay 127.0.0.0/24",
        ),
        (None, "127.0.0.0/8", "--overlay-pool 127.0.0.0/8"),
    ] {
        let e = c.cluster_create(&args(o, p)).unwrap_err().to_string();
        assert!(e.contains(flag) && e.contains("underlay"), "{e}");
    }
    let e = c
        .cluster_create(&args(Some("198.19.5.0/30"), "198.19.0.0/16"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/16 to /27"), "{e}");
    assert!(c.store.clusters().unwrap().is_empty());
    assert!(a.info(&user).reservations.is_empty());
}

#[test]
fn a_cluster_larger_than_its_overlay_network_is_refused_before_reserving() {
    let user = SigningKey::generate().unwrap();
    let a = TestAgent::start("A", 64, Some((&user, 64)));
    let dir = tempfile::tempdir().unwrap();
    let mut store = SqliteStore::open_in_memory().unwrap();
    let mut c = controller(&mut store, &user, dir.path());
    c.site_add("A", &a.addr, &a.key).unwrap();
    let e = c
        .cluster_create(&CreateArgs {
            name: "k".into(),
            sites: vec!["A".into()],
            computes: vec![30],
            memory_mb: 16,
            frontend_memory_mb: 16,
            overlay: Some("198.19.5.0/27".parse().unwrap()),
            pool: "198.19.0.0/16".parse().unwrap(),
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most 22"), "{e}");
    assert!(a.info(&user).reservations.is_empty());
}
