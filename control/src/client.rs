//! The controller's side of the agent protocol: connect (pinning the agent key), sign
//! each request with the user key, turn refusals into errors that name the site.
use crate::auth::{parse_public, Envelope, SigningKey};
use crate::channel::{self, Channel, ChannelError};
use crate::model::Site;
use crate::proto::{Body, Reply, Request, PROTO_VERSION};
use serde::de::DeserializeOwned;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Errors talking to an agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent cannot be reached.
    #[error("{}", connect_message(.site, .addr, .err))]
    Unreachable {
        /// Site name.
        site: String,
        /// Agent address.
        addr: String,
        /// Why.
        err: std::io::Error,
    },
    /// The channel failed (wrong agent key, tampering, closed).
    #[error("{}", channel_message(.site, .err))]
    Channel {
        /// Site name.
        site: String,
        /// Why.
        err: ChannelError,
    },
    /// The agent refused the request; the message says why.
    #[error("{0}")]
    Refused(String),
    /// Signing or parsing failed.
    #[error("{0}")]
    Local(String),
}

/// What a failed connection attempt to a site's agent means for the user.
fn connect_message(site: &str, addr: &str, e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => {
            format!("site {site}'s agent at {addr} refused the connection (is it running?)")
        }
        K::TimedOut | K::WouldBlock => format!(
            "site {site}'s agent at {addr} did not answer within {} s \
             (is the address right and the port open?)",
            CONNECT_TIMEOUT.as_secs()
        ),
        K::HostUnreachable | K::NetworkUnreachable => {
            format!("site {site}'s agent at {addr} is unreachable: no route to it")
        }
        _ => format!("site {site}'s agent at {addr} is unreachable: {e}"),
    }
}

/// What a failure on an open channel means for the user.
fn channel_message(site: &str, e: &ChannelError) -> String {
    use std::io::ErrorKind as K;
    match e {
        ChannelError::Io(io) => match io.kind() {
            K::UnexpectedEof | K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted => {
                format!("site {site}'s agent closed the connection (is it running?)")
            }
            K::TimedOut | K::WouldBlock => format!(
                "site {site}'s agent did not answer within {} s",
                REPLY_TIMEOUT.as_secs()
            ),
            _ => format!("connection to site {site}'s agent: {io}"),
        },
        ChannelError::Protocol => {
            format!("site {site}'s agent address answers, but not as an mvc agent of this version")
        }
        other => format!("channel to site {site}'s agent: {other}"),
    }
}

/// A connection to one site's agent.
pub struct AgentClient<'k> {
    site: String,
    ch: Channel<TcpStream>,
    key: &'k SigningKey,
}

/// Connect timeout to agents.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for one reply of an agent.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

impl<'k> AgentClient<'k> {
    /// Connect to `site`'s agent as the holder of `key`.
    pub fn connect(site: &Site, key: &'k SigningKey) -> Result<AgentClient<'k>, ClientError> {
        Self::connect_to(&site.name, &site.agent_addr, &site.agent_key, key)
    }

    /// Connect to an agent by address and pinned key.
    pub fn connect_to(
        site: &str,
        addr: &str,
        agent_key: &str,
        key: &'k SigningKey,
    ) -> Result<AgentClient<'k>, ClientError> {
        let unreachable = |err: std::io::Error| ClientError::Unreachable {
            site: site.into(),
            addr: addr.into(),
            err,
        };
        let pinned = parse_public(agent_key).map_err(|e| ClientError::Local(e.to_string()))?;
        let sa: SocketAddr = addr
            .to_socket_addrs()
            .map_err(unreachable)?
            .next()
            .ok_or_else(|| {
                unreachable(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the name has no address",
                ))
            })?;
        let s = TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT).map_err(unreachable)?;
        s.set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(unreachable)?;
        let _ = s.set_nodelay(true);
        let ch = channel::client(s, &pinned).map_err(|err| ClientError::Channel {
            site: site.into(),
            err,
        })?;
        Ok(AgentClient {
            site: site.into(),
            ch,
            key,
        })
    }

    /// Wait up to `d` for each reply from now on (a command run in a VM may take
    /// longer than [`REPLY_TIMEOUT`]).
    pub fn set_reply_timeout(&mut self, d: Duration) -> Result<(), ClientError> {
        self.ch
            .stream_ref()
            .set_read_timeout(Some(d))
            .map_err(|e| ClientError::Local(e.to_string()))
    }

    /// Send a request; the reply's data on success.
    pub fn call_value(&mut self, req: &Request) -> Result<serde_json::Value, ClientError> {
        let body = serde_json::to_string(&Body {
            proto: PROTO_VERSION,
            req: req.clone(),
        })
        .map_err(|e| ClientError::Local(e.to_string()))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let env = Envelope::seal(self.key, self.ch.id(), now, body)
            .map_err(|e| ClientError::Local(e.to_string()))?;
        self.send_envelope(&env)
    }

    /// Send an already sealed envelope (tests use this to replay or tamper).
    pub fn send_envelope(&mut self, env: &Envelope) -> Result<serde_json::Value, ClientError> {
        let site = self.site.clone();
        let ch_err = |err| ClientError::Channel {
            site: site.clone(),
            err,
        };
        let msg = serde_json::to_vec(env).map_err(|e| ClientError::Local(e.to_string()))?;
        self.ch.send(&msg).map_err(ch_err)?;
        let reply = self.ch.recv().map_err(ch_err)?;
        let reply: Reply = serde_json::from_slice(&reply)
            .map_err(|e| ClientError::Local(format!("bad reply: {e}")))?;
        if reply.ok {
            Ok(reply.data)
        } else {
            Err(ClientError::Refused(
                reply
                    .error
                    .unwrap_or_else(|| format!("site {}: refused", self.site)),
            ))
        }
    }

    /// Send a request and parse the reply data.
    pub fn call<T: DeserializeOwned>(&mut self, req: &Request) -> Result<T, ClientError> {
        let v = self.call_value(req)?;
        serde_json::from_value(v).map_err(|e| ClientError::Local(format!("bad reply data: {e}")))
    }

    /// The channel id (for sealing envelopes by hand).
    pub fn channel_id(&self) -> [u8; 32] {
        *self.ch.id()
    }
}
