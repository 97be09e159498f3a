//! A local `mvc agent run` for the tests that need no root (`agent_listener.rs`,
//! `agent_state.rs`): its state made with one authorised user, a free loopback port,
//! the start awaited, its log, calls to it.
use control::agent;
use control::auth::{Authorization, SigningKey};
use control::client::AgentClient;
use control::model::Site;
use control::proto::Request;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An agent's state directory and where it listens (site `A`).
pub struct LocalAgent {
    /// The state directory (`--state`); the log is `agent.log` in it.
    pub dir: PathBuf,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    /// The agent's public key (hex).
    pub key: String,
}

impl LocalAgent {
    /// `mvc agent init` in `dir` with `user` authorised to create clusters of up to
    /// `max_vms` VMs on any host, and a free loopback port.
    pub fn init(dir: &Path, user: &SigningKey, max_vms: u32) -> LocalAgent {
        let key = agent::init(dir).unwrap();
        agent::authorize(
            dir,
            Authorization {
                key: user.public_hex(),
                comment: "test".into(),
                may_create_clusters: true,
                max_vms,
                hosts: vec!["*".into()],
            },
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        LocalAgent {
            dir: dir.into(),
            addr: format!("127.0.0.1:{port}"),
            key,
        }
    }

    /// `agent run` with this state, site `A` and address: the caller adds hosts, name
    /// prefix, overlay and what else it tests.
    pub fn run_args(&self) -> Vec<String> {
        let state = self.dir.to_str().unwrap();
        [
            "agent", "run", "--state", state, "--site", "A", "--listen", &self.addr,
        ]
        .map(String::from)
        .to_vec()
    }

    /// Start `cmd` (`mvc` with [`LocalAgent::run_args`], maybe behind a wrapper) with
    /// its output in `agent.log` and wait, at most `limit`, until it listens; panics
    /// with the log when it exits first or does not listen in time.
    pub fn spawn(&self, cmd: &mut Command, limit: Duration) -> Child {
        let log = std::fs::File::create(self.dir.join("agent.log")).unwrap();
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let end = Instant::now() + limit;
        while TcpStream::connect(&self.addr).is_err() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("agent exited ({st}) at start: {}", self.log());
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                panic!("agent did not listen within {limit:?}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// The log so far, without terminal colour codes.
    pub fn log(&self) -> String {
        let raw = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
        let mut out = String::with_capacity(raw.len());
        let mut esc = false;
        for c in raw.chars() {
            match (esc, c) {
                (false, '\x1b') => esc = true,
                (false, c) => out.push(c),
                (true, 'm') => esc = false,
                (true, _) => {}
            }
        }
        out
    }

    /// The agent as the controller knows a site.
    pub fn site(&self) -> Site {
        Site {
            id: 0,
            name: "A".into(),
            agent_addr: self.addr.clone(),
            agent_key: self.key.clone(),
        }
    }

    /// `req` from `user`, over a new connection.
    pub fn call(&self, user: &SigningKey, req: &Request) -> Result<serde_json::Value, String> {
        AgentClient::connect(&self.site(), user)
            .map_err(|e| e.to_string())?
            .call_value(req)
            .map_err(|e| e.to_string())
    }
}
