//! The agent's listener under hostile load (no root needed): `mvc agent run` under a low
//! descriptor limit with its descriptors taken by idle connections, connections over the
//! limit, and clients that never send their channel hello. After each, a normal client is
//! served.
mod common;

use common::agent::LocalAgent;
use control::auth::SigningKey;
use control::client::AgentClient;
use control::proto::{InfoData, Request};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// An agent process, killed and reaped on drop.
struct AgentProc {
    child: Child,
    agent: LocalAgent,
}

impl AgentProc {
    /// `mvc agent run` for site "A" on a free loopback port, under `prlimit --nofile=N`
    /// when given, with `user` authorised.
    fn start(dir: &Path, user: &SigningKey, nofile: Option<u32>, extra: &[&str]) -> AgentProc {
        let agent = LocalAgent::init(dir, user, 1);
        let mvc = env!("CARGO_BIN_EXE_mvc");
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.args([format!("--nofile={n}:{n}").as_str(), mvc]);
                c
            }
            None => Command::new(mvc),
        };
        cmd.args(agent.run_args())
            .args(["--host", "h0:2:4096:1", "--ns-prefix", "mvctl-"])
            .args(["--overlay", "n2n"])
            .args(extra);
        let child = agent.spawn(&mut cmd, Duration::from_secs(20));
        AgentProc { child, agent }
    }

    /// SIGTERM, then wait (bounded) for the exit.
    fn terminate(&mut self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let end = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < end, "agent did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The log so far, without terminal colour codes.
    fn log_text(&self) -> String {
        self.agent.log()
    }

    fn info(&self, user: &SigningKey) -> InfoData {
        serde_json::from_value(self.agent.call(user, &Request::Info).unwrap()).unwrap()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the peer closes `s` within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let end = Instant::now() + within;
    let mut b = [0u8; 256];
    while Instant::now() < end {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Lines in which the agent's listener logs a failed accept.
fn accept_failures(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("accept failed") && l.contains("listener=\"agent\""))
        .count()
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

#[test]
fn agent_survives_descriptor_exhaustion() {
    if !have("prlimit") {
        lab::skip(
            "agent_survives_descriptor_exhaustion",
            "prlimit is not installed",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let user = SigningKey::generate().unwrap();
    let a = AgentProc::start(dir.path(), &user, Some(48), &["--handshake-timeout", "120"]);
    let addr: SocketAddr = a.agent.addr.parse().unwrap();
    // Idle connections (each a thread at the agent, holding a descriptor) until accept fails.
    let mut idle = Vec::new();
    for _ in 0..100 {
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            idle.push(s);
        }
    }
    let end = Instant::now() + Duration::from_secs(20);
    while accept_failures(&a.log_text()) == 0 {
        assert!(Instant::now() < end, "no accept failure: {}", a.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    drop(idle);
    // A normal client is served once descriptors are free (bounded retries).
    let end = Instant::now() + Duration::from_secs(30);
    let info = loop {
        match AgentClient::connect(&a.agent.site(), &user)
            .and_then(|mut c| c.call::<InfoData>(&Request::Info))
        {
            Ok(i) => break i,
            Err(e) => {
                assert!(
                    Instant::now() < end,
                    "agent not serving: {e}: {}",
                    a.log_text()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    assert_eq!(info.site, "A");
    let log = a.log_text();
    let logged = accept_failures(&log);
    assert!((1..=5).contains(&logged), "{log}");
    assert!(log.contains("accepting again"), "{log}");
}

#[test]
fn agent_bounds_connections_and_handshake_time() {
    let dir = tempfile::tempdir().unwrap();
    let user = SigningKey::generate().unwrap();
    let mut a = AgentProc::start(
        dir.path(),
        &user,
        None,
        &["--max-connections", "3", "--handshake-timeout", "1.5"],
    );
    // The probe connection of `start` is gone (closed by the test at once).
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let mut silent: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(&a.agent.addr).unwrap())
        .collect();
    // Over the limit: closed at once.
    std::thread::sleep(Duration::from_millis(200));
    let mut over = TcpStream::connect(&a.agent.addr).unwrap();
    assert!(closed_within(&mut over, Duration::from_secs(1)));
    // The silent ones are closed after the handshake timeout.
    for s in &mut silent {
        assert!(closed_within(s, Duration::from_secs(10)));
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1200) && took < Duration::from_secs(8),
        "{took:?}"
    );
    // A normal client is served.
    assert_eq!(a.info(&user).site, "A");
    assert!(
        a.log_text().contains("closed at accept"),
        "{}",
        a.log_text()
    );
    // On SIGTERM the agent logs its listener's counters.
    a.terminate();
    let log = a.log_text();
    let last = log
        .lines()
        .find(|l| l.contains("agent listener closed"))
        .unwrap_or_else(|| panic!("no counters in {log}"));
    assert!(last.contains("refused=1"), "{last}");
    assert!(last.contains("handshake_timeouts=3"), "{last}");
}
