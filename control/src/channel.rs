//! The encrypted, agent-authenticated channel between controller and agent.
//!
//! Handshake (one round trip, over TCP):
//!
//! ```text
//! C -> S: "MVC" 0x01 | client ephemeral X25519 public (32)
//! S -> C: "MVC" 0x01 | server ephemeral X25519 public (32) | agent Ed25519 public (32)
//!         | Ed25519 signature by the agent key over
//!           "mvc-channel\0" 0x01 | client eph | server eph | agent public
//! ```
//!
//! The controller refuses unless the agent key equals the one pinned at `mvc site add`
//! and the signature verifies, so a man in the middle cannot complete the exchange.
//! Keys: HKDF-SHA256(salt = SHA-256(transcript), ikm = X25519 shared secret), info
//! `c2s` / `s2c`, one ChaCha20-Poly1305 key per direction; nonces are a per-direction
//! counter, so a reordered, replayed or dropped frame fails to open and ends the
//! channel. Ephemeral keys give forward secrecy. The transcript hash is the channel id
//! that every request signature covers ([`crate::auth`]), which binds each signed
//! request to this one channel.
//!
//! Frames: 4-byte big-endian ciphertext length (at most [`MAX_FRAME`]) and the sealed
//! bytes.
use crate::auth::{verify, SigningKey};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::agreement::{agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::digest::{digest, SHA256};
use ring::hkdf::{Salt, HKDF_SHA256};
use ring::rand::SystemRandom;
use std::io::{Read, Write};

/// Version byte of the handshake.
pub const CHANNEL_VERSION: u8 = 1;
/// Largest frame accepted, in bytes.
pub const MAX_FRAME: usize = 4 << 20;
/// Length of the client's hello: magic, version, ephemeral public key.
pub const HELLO_LEN: usize = 36;
const MAGIC: [u8; 3] = *b"MVC";

/// Channel failures.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer does not speak this protocol or version.
    #[error("peer is not an mvc agent/controller of this version")]
    Protocol,
    /// The agent's key is not the pinned one.
    #[error("agent key mismatch: expected {expected}, agent presented {got}")]
    WrongAgentKey {
        /// Pinned key, hex.
        expected: String,
        /// Presented key, hex.
        got: String,
    },
    /// Handshake signature or a frame failed to verify.
    #[error("channel authentication failed")]
    Auth,
    /// Crypto primitive failure.
    #[error("crypto failure")]
    Crypto,
    /// Frame larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

/// An established channel.
pub struct Channel<S> {
    stream: S,
    send_key: LessSafeKey,
    recv_key: LessSafeKey,
    send_ctr: u64,
    recv_ctr: u64,
    id: [u8; 32],
    peer_key: [u8; 32],
}

fn transcript(c_eph: &[u8], s_eph: &[u8], agent: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(110);
    t.extend_from_slice(b"mvc-channel\0");
    t.push(CHANNEL_VERSION);
    t.extend_from_slice(c_eph);
    t.extend_from_slice(s_eph);
    t.extend_from_slice(agent);
    t
}

fn derive(shared: &[u8], th: &[u8; 32], info: &[u8]) -> Result<LessSafeKey, ChannelError> {
    let prk = Salt::new(HKDF_SHA256, th).extract(shared);
    let info = [info];
    let okm = prk
        .expand(&info, &CHACHA20_POLY1305)
        .map_err(|_| ChannelError::Crypto)?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

fn ephemeral() -> Result<(EphemeralPrivateKey, [u8; 32]), ChannelError> {
    let rng = SystemRandom::new();
    let k = EphemeralPrivateKey::generate(&X25519, &rng).map_err(|_| ChannelError::Crypto)?;
    let p = k.compute_public_key().map_err(|_| ChannelError::Crypto)?;
    let mut out = [0u8; 32];
    out.copy_from_slice(p.as_ref());
    Ok((k, out))
}

fn keys(
    private: EphemeralPrivateKey,
    peer_eph: &[u8],
    th: &[u8; 32],
) -> Result<(LessSafeKey, LessSafeKey), ChannelError> {
    agree_ephemeral(private, &UnparsedPublicKey::new(&X25519, peer_eph), |s| {
        Ok((derive(s, th, b"c2s")?, derive(s, th, b"s2c")?))
    })
    .map_err(|_| ChannelError::Crypto)?
}

fn hash(t: &[u8]) -> [u8; 32] {
    let mut th = [0u8; 32];
    th.copy_from_slice(digest(&SHA256, t).as_ref());
    th
}

/// Controller side: open a channel to an agent whose key must be `pinned`.
pub fn client<S: Read + Write>(
    mut stream: S,
    pinned: &[u8; 32],
) -> Result<Channel<S>, ChannelError> {
    let (private, c_eph) = ephemeral()?;
    let mut hello = [0u8; HELLO_LEN];
    hello[..3].copy_from_slice(&MAGIC);
    hello[3] = CHANNEL_VERSION;
    hello[4..].copy_from_slice(&c_eph);
    stream.write_all(&hello)?;
    stream.flush()?;
    let mut reply = [0u8; 4 + 32 + 32 + 64];
    stream.read_exact(&mut reply)?;
    if reply[..3] != MAGIC || reply[3] != CHANNEL_VERSION {
        return Err(ChannelError::Protocol);
    }
    let (s_eph, rest) = reply[4..].split_at(32);
    let (agent, sig) = rest.split_at(32);
    if agent != pinned {
        return Err(ChannelError::WrongAgentKey {
            expected: crate::model::hex(pinned),
            got: crate::model::hex(agent),
        });
    }
    let t = transcript(&c_eph, s_eph, agent);
    if !verify(agent, &t, sig) {
        return Err(ChannelError::Auth);
    }
    let th = hash(&t);
    let (c2s, s2c) = keys(private, s_eph, &th)?;
    Ok(Channel {
        stream,
        send_key: c2s,
        recv_key: s2c,
        send_ctr: 0,
        recv_ctr: 0,
        id: th,
        peer_key: *pinned,
    })
}

/// Agent side: answer a handshake, proving the agent key `host`.
pub fn server<S: Read + Write>(
    mut stream: S,
    host: &SigningKey,
) -> Result<Channel<S>, ChannelError> {
    let mut hello = [0u8; HELLO_LEN];
    stream.read_exact(&mut hello)?;
    if hello[..3] != MAGIC || hello[3] != CHANNEL_VERSION {
        return Err(ChannelError::Protocol);
    }
    let c_eph = &hello[4..];
    let (private, s_eph) = ephemeral()?;
    let agent = host.public();
    let t = transcript(c_eph, &s_eph, &agent);
    let sig = host.sign(&t);
    let mut reply = Vec::with_capacity(132);
    reply.extend_from_slice(&MAGIC);
    reply.push(CHANNEL_VERSION);
    reply.extend_from_slice(&s_eph);
    reply.extend_from_slice(&agent);
    reply.extend_from_slice(&sig);
    stream.write_all(&reply)?;
    stream.flush()?;
    let th = hash(&t);
    let (c2s, s2c) = keys(private, c_eph, &th)?;
    Ok(Channel {
        stream,
        send_key: s2c,
        recv_key: c2s,
        send_ctr: 0,
        recv_ctr: 0,
        id: th,
        peer_key: [0u8; 32],
    })
}

fn nonce(ctr: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&ctr.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

impl<S: Read + Write> Channel<S> {
    /// The channel id every signed request must name.
    pub fn id(&self) -> &[u8; 32] {
        &self.id
    }

    /// The underlying stream.
    pub fn stream_ref(&self) -> &S {
        &self.stream
    }

    /// On the controller side: the agent key it proved.
    pub fn peer_key(&self) -> &[u8; 32] {
        &self.peer_key
    }

    /// Seal and send one message.
    pub fn send(&mut self, msg: &[u8]) -> Result<(), ChannelError> {
        if msg.len() + 16 > MAX_FRAME {
            return Err(ChannelError::TooLarge(msg.len()));
        }
        let mut buf = msg.to_vec();
        self.send_key
            .seal_in_place_append_tag(nonce(self.send_ctr), Aad::empty(), &mut buf)
            .map_err(|_| ChannelError::Crypto)?;
        self.send_ctr += 1;
        let len = u32::try_from(buf.len()).map_err(|_| ChannelError::TooLarge(buf.len()))?;
        self.stream.write_all(&len.to_be_bytes())?;
        self.stream.write_all(&buf)?;
        self.stream.flush()?;
        Ok(())
    }

    /// Receive and open one message.
    pub fn recv(&mut self) -> Result<Vec<u8>, ChannelError> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if !(16..=MAX_FRAME).contains(&len) {
            return Err(ChannelError::TooLarge(len));
        }
        let mut buf = vec![0u8; len];
        self.stream.read_exact(&mut buf)?;
        let plain = self
            .recv_key
            .open_in_place(nonce(self.recv_ctr), Aad::empty(), &mut buf)
            .map_err(|_| ChannelError::Auth)?;
        let n = plain.len();
        self.recv_ctr += 1;
        buf.truncate(n);
        Ok(buf)
    }
}

/// One direction of a [`Channel`] after [`Channel::split`]: sends or receives frames on
/// its own copy of the stream, so that two threads can relay both ways at once.
pub struct Half<S> {
    stream: S,
    key: LessSafeKey,
    ctr: u64,
}

impl<S: Read + Write> Half<S> {
    /// Seal and send one message (the sending half).
    pub fn send(&mut self, msg: &[u8]) -> Result<(), ChannelError> {
        seal_to(&mut self.stream, &self.key, &mut self.ctr, msg)
    }

    /// Receive and open one message (the receiving half).
    pub fn recv(&mut self) -> Result<Vec<u8>, ChannelError> {
        open_from(&mut self.stream, &self.key, &mut self.ctr)
    }
}

impl<S> Channel<S> {
    /// Split into a sending half on the channel's stream and a receiving half on
    /// `second`, another handle of the same connection (`TcpStream::try_clone`). The
    /// nonce counters carry on, so frames stay in one sequence per direction.
    pub fn split(self, second: S) -> (Half<S>, Half<S>) {
        (
            Half {
                stream: self.stream,
                key: self.send_key,
                ctr: self.send_ctr,
            },
            Half {
                stream: second,
                key: self.recv_key,
                ctr: self.recv_ctr,
            },
        )
    }
}

fn seal_to<S: Write>(
    stream: &mut S,
    key: &LessSafeKey,
    ctr: &mut u64,
    msg: &[u8],
) -> Result<(), ChannelError> {
    if msg.len() + 16 > MAX_FRAME {
        return Err(ChannelError::TooLarge(msg.len()));
    }
    let mut buf = Vec::with_capacity(4 + msg.len() + 16);
    buf.extend_from_slice(&[0u8; 4]);
    buf.extend_from_slice(msg);
    let mut body = buf.split_off(4);
    key.seal_in_place_append_tag(nonce(*ctr), Aad::empty(), &mut body)
        .map_err(|_| ChannelError::Crypto)?;
    *ctr += 1;
    let len = u32::try_from(body.len()).map_err(|_| ChannelError::TooLarge(body.len()))?;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    stream.write_all(&buf)?;
    stream.flush()?;
    Ok(())
}

fn open_from<S: Read>(
    stream: &mut S,
    key: &LessSafeKey,
    ctr: &mut u64,
) -> Result<Vec<u8>, ChannelError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if !(16..=MAX_FRAME).contains(&len) {
        return Err(ChannelError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf)?;
    let plain = key
        .open_in_place(nonce(*ctr), Aad::empty(), &mut buf)
        .map_err(|_| ChannelError::Auth)?;
    let n = plain.len();
    *ctr += 1;
    buf.truncate(n);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    type Pair = (
        Result<Channel<TcpStream>, ChannelError>,
        std::thread::JoinHandle<Option<Channel<TcpStream>>>,
    );

    fn pair(pin_wrong: bool) -> Pair {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let host = SigningKey::generate().unwrap();
        let mut pinned = host.public();
        if pin_wrong {
            pinned[0] ^= 1;
        }
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            server(s, &host).ok()
        });
        (client(TcpStream::connect(addr).unwrap(), &pinned), t)
    }

    #[test]
    fn messages_flow_both_ways() {
        let (c, t) = pair(false);
        let mut c = c.unwrap();
        let mut s = t.join().unwrap().unwrap();
        assert_eq!(c.id(), s.id());
        c.send(b"hello").unwrap();
        assert_eq!(s.recv().unwrap(), b"hello");
        s.send(b"").unwrap();
        s.send(b"world").unwrap();
        assert_eq!(c.recv().unwrap(), b"");
        assert_eq!(c.recv().unwrap(), b"world");
    }

    #[test]
    fn split_halves_carry_the_sequence_on() {
        let (c, t) = pair(false);
        let mut c = c.unwrap();
        let mut s = t.join().unwrap().unwrap();
        c.send(b"before").unwrap();
        assert_eq!(s.recv().unwrap(), b"before");
        let second = s.stream.try_clone().unwrap();
        let (mut tx, mut rx) = s.split(second);
        c.send(b"to the agent").unwrap();
        assert_eq!(rx.recv().unwrap(), b"to the agent");
        tx.send(b"to the controller").unwrap();
        assert_eq!(c.recv().unwrap(), b"to the controller");
    }

    #[test]
    fn wrong_pinned_key_refused() {
        let (c, _t) = pair(true);
        assert!(matches!(c, Err(ChannelError::WrongAgentKey { .. })));
    }

    #[test]
    fn tampered_frame_refused() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let host = SigningKey::generate().unwrap();
        let pinned = host.public();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut ch = server(s, &host).unwrap();
            ch.recv()
        });
        let mut c = client(TcpStream::connect(addr).unwrap(), &pinned).unwrap();
        // seal a frame, flip a ciphertext bit, send it raw
        let mut buf = b"payload".to_vec();
        c.send_key
            .seal_in_place_append_tag(nonce(0), Aad::empty(), &mut buf)
            .unwrap();
        buf[0] ^= 0x80;
        c.stream
            .write_all(&(buf.len() as u32).to_be_bytes())
            .unwrap();
        c.stream.write_all(&buf).unwrap();
        assert!(matches!(t.join().unwrap(), Err(ChannelError::Auth)));
    }
}
