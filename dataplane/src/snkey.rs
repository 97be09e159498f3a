//! Supernode identity and address validation, both pure.
//!
//! Identity: each supernode holds an Ed25519 key pair (`ring`); it signs the messages
//! that change an edge's tables (RegisterAck, PeerInfo). Edges pin its public key
//! (`--supernode ADDR@KEY`), written as 64 lower-case hex digits.
//!
//! Address validation: a stateless cookie, as WireGuard's cookie reply and QUIC's Retry.
//! `cookie = HMAC-SHA256(secret, source address)[..16]` with a random secret drawn for
//! every epoch of [`COOKIE_EPOCH`]; cookies of the current and the previous epoch are
//! accepted. A registration without a valid cookie gets one small cookie message and
//! nothing else.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use crate::wire::{COOKIE_LEN, SIG_LEN, SN_KEY_LEN};

/// How long one cookie secret epoch lasts; a cookie is good for one to two epochs.
pub const COOKIE_EPOCH: Duration = Duration::from_secs(120);

/// Errors about supernode keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key written in hex could not be read.
    #[error("{0}: expected 64 hex digits (an Ed25519 key)")]
    BadHex(String),
    /// The random generator or the key construction failed.
    #[error("key generation failed")]
    Rng,
    /// A key file could not be read or written.
    #[error("{what} {path}: {source}")]
    File {
        /// What was done.
        what: &'static str,
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// A supernode's Ed25519 key pair, kept with its 32-byte seed (the key file's content).
pub struct SupernodeKey {
    seed: [u8; 32],
    pair: Ed25519KeyPair,
    public: [u8; SN_KEY_LEN],
}

impl std::fmt::Debug for SupernodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SupernodeKey({})", to_hex(&self.public))
    }
}

impl Clone for SupernodeKey {
    fn clone(&self) -> Self {
        Self::from_seed(&self.seed).expect("a seed that made a key makes it again")
    }
}

impl SupernodeKey {
    /// The key pair of a seed.
    pub fn from_seed(seed: &[u8; 32]) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| KeyError::Rng)?;
        let mut public = [0u8; SN_KEY_LEN];
        public.copy_from_slice(pair.public_key().as_ref());
        Ok(Self {
            seed: *seed,
            pair,
            public,
        })
    }

    /// A fresh random key pair.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| KeyError::Rng)?;
        Self::from_seed(&seed)
    }

    /// Reads the seed from `path` (64 hex digits), or makes a new key and writes it there
    /// (mode 0600, parent directories created) when the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(s) => {
                let seed = parse_hex(s.trim()).map_err(|_| KeyError::BadHex(shown))?;
                Self::from_seed(&seed)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let k = Self::generate()?;
                let file_err = |what, source| KeyError::File {
                    what,
                    path: shown.clone(),
                    source,
                };
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| file_err("create the directory of", e))?;
                }
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                {
                    Ok(f) => f,
                    // Another process made it meanwhile: use that one.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        std::thread::sleep(Duration::from_millis(50));
                        return Self::load_or_create(path);
                    }
                    Err(e) => return Err(file_err("create", e)),
                };
                writeln!(f, "{}", to_hex(&k.seed)).map_err(|e| file_err("write", e))?;
                f.sync_all().map_err(|e| file_err("sync", e))?;
                Ok(k)
            }
            Err(e) => Err(KeyError::File {
                what: "read",
                path: shown,
                source: e,
            }),
        }
    }

    /// The public key.
    pub fn public(&self) -> [u8; SN_KEY_LEN] {
        self.public
    }

    /// The public key as edges pin it (64 hex digits).
    pub fn public_hex(&self) -> String {
        to_hex(&self.public)
    }

    /// Signs `buf[..len]` and writes the signature after it; returns the new length.
    pub fn sign_into(&self, buf: &mut [u8], len: usize) -> Option<usize> {
        let sig = self.pair.sign(buf.get(..len)?);
        buf.get_mut(len..len + SIG_LEN)?
            .copy_from_slice(sig.as_ref());
        Some(len + SIG_LEN)
    }
}

/// Whether `sig` is `key`'s signature over `signed`.
pub fn verify(key: &[u8; SN_KEY_LEN], signed: &[u8], sig: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, key)
        .verify(signed, sig)
        .is_ok()
}

/// Lower-case hex.
pub fn to_hex(b: &[u8]) -> String {
    crate::status::hex(b)
}

/// Reads 64 hex digits.
pub fn parse_hex(s: &str) -> Result<[u8; 32], KeyError> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return Err(KeyError::BadHex(s.into()));
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let hi = (b[2 * i] as char).to_digit(16);
        let lo = (b[2 * i + 1] as char).to_digit(16);
        match (hi, lo) {
            (Some(h), Some(l)) => *o = (h * 16 + l) as u8,
            _ => return Err(KeyError::BadHex(s.into())),
        }
    }
    Ok(out)
}

/// Makes and checks address-validation cookies. The secret is drawn anew for every
/// epoch and kept for one more, so a secret read out of memory forges cookies for at
/// most two epochs.
pub struct CookieJar {
    rng: SystemRandom,
    /// Used only if the system generator fails: secrets are then derived from it.
    fallback: hmac::Key,
    cur: (u64, hmac::Key),
    prev: Option<(u64, hmac::Key)>,
}

impl std::fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CookieJar(epoch {})", self.cur.0)
    }
}

impl CookieJar {
    /// A jar with a fresh random secret for epoch 0; if the system generator fails,
    /// secrets are derived from the supernode's key (unknown to anyone without it).
    pub fn new(key: &SupernodeKey) -> Self {
        let rng = SystemRandom::new();
        let fallback = hmac::Key::new(hmac::HMAC_SHA256, &key.seed);
        let cur = (0, fresh_secret(&rng, &fallback, 0));
        Self {
            rng,
            fallback,
            cur,
            prev: None,
        }
    }

    /// Moves to epoch `e` when it is newer: the current secret becomes the previous one
    /// (if `e` directly follows it) and a new one is drawn.
    fn advance(&mut self, e: u64) {
        if e <= self.cur.0 {
            return;
        }
        let next = (e, fresh_secret(&self.rng, &self.fallback, e));
        let old = std::mem::replace(&mut self.cur, next);
        self.prev = (old.0 + 1 == e).then_some(old);
    }

    /// The current cookie of `src`; `age` is the time since the supernode started.
    pub fn make(&mut self, age: Duration, src: &SocketAddr) -> [u8; COOKIE_LEN] {
        self.advance(epoch(age));
        cookie_of(&self.cur.1, src)
    }

    /// Whether `cookie` is `src`'s cookie of this epoch or the previous one.
    pub fn check(&mut self, age: Duration, src: &SocketAddr, cookie: &[u8; COOKIE_LEN]) -> bool {
        self.advance(epoch(age));
        // Constant time: no early exit on the first differing byte.
        let ok = |k: &hmac::Key| {
            cookie_of(k, src)
                .iter()
                .zip(cookie)
                .fold(0u8, |d, (x, y)| d | (x ^ y))
                == 0
        };
        let prev = self.prev.as_ref().is_some_and(|(_, k)| ok(k));
        ok(&self.cur.1) | prev
    }
}

/// A random secret for epoch `e` (derived from `fallback` if the generator fails).
fn fresh_secret(rng: &SystemRandom, fallback: &hmac::Key, e: u64) -> hmac::Key {
    let mut secret = [0u8; 32];
    if rng.fill(&mut secret).is_err() {
        let mut ctx = hmac::Context::with_key(fallback);
        ctx.update(b"mvc-cookie-secret");
        ctx.update(&e.to_be_bytes());
        secret.copy_from_slice(&ctx.sign().as_ref()[..32]);
    }
    hmac::Key::new(hmac::HMAC_SHA256, &secret)
}

/// `HMAC-SHA256(secret, family ‖ IP ‖ port)[..16]`.
fn cookie_of(key: &hmac::Key, src: &SocketAddr) -> [u8; COOKIE_LEN] {
    let mut ctx = hmac::Context::with_key(key);
    match src.ip() {
        IpAddr::V4(ip) => {
            ctx.update(&[4]);
            ctx.update(&ip.octets());
        }
        IpAddr::V6(ip) => {
            ctx.update(&[6]);
            ctx.update(&ip.octets());
        }
    }
    ctx.update(&src.port().to_be_bytes());
    let tag = ctx.sign();
    let mut c = [0u8; COOKIE_LEN];
    c.copy_from_slice(&tag.as_ref()[..COOKIE_LEN]);
    c
}

fn epoch(age: Duration) -> u64 {
    age.as_secs() / COOKIE_EPOCH.as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_hex_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/sn.key");
        let k = SupernodeKey::load_or_create(&p).unwrap();
        let k2 = SupernodeKey::load_or_create(&p).unwrap();
        assert_eq!(k.public(), k2.public(), "the key survives a restart");
        assert_eq!(parse_hex(&k.public_hex()).unwrap(), k.public());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(&p, "zz").unwrap();
        assert!(SupernodeKey::load_or_create(&p).is_err());
        assert!(parse_hex("00").is_err());
        let mut buf = [7u8; 100];
        let n = k.sign_into(&mut buf, 20).unwrap();
        assert!(verify(&k.public(), &buf[..20], &buf[20..n]));
        buf[3] ^= 1;
        assert!(!verify(&k.public(), &buf[..20], &buf[20..n]));
    }

    #[test]
    fn cookies_bind_address_and_epoch() {
        let k = SupernodeKey::generate().unwrap();
        let mut j = CookieJar::new(&k);
        let a: SocketAddr = "198.18.1.1:4000".parse().unwrap();
        let b: SocketAddr = "198.18.1.1:4001".parse().unwrap();
        let t0 = Duration::from_secs(5);
        let c = j.make(t0, &a);
        assert!(j.check(t0, &a, &c));
        assert!(!j.check(t0, &b, &c));
        assert!(j.check(t0 + COOKIE_EPOCH, &a, &c), "one epoch later");
        assert!(!j.check(t0 + COOKIE_EPOCH * 2, &a, &c), "two epochs later");
        assert!(!j.check(t0, &a, &[0; COOKIE_LEN]));
        assert!(!CookieJar::new(&k).check(t0, &a, &c), "another secret");
    }
}
