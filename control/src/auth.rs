//! Who may ask an agent for what.
//!
//! Every controller->agent request is an [`Envelope`]: the request body, the user's
//! Ed25519 public key, a timestamp, a random nonce and a signature over all of them plus
//! the id of the encrypted channel it travels in (see [`crate::channel`]). The agent's
//! [`Verifier`] refuses a request whose key is not authorised at the site, whose
//! signature does not verify (tampered), whose timestamp is outside the window, or whose
//! nonce it has already seen (replayed). Then [`Authorization`] says what that key may
//! do: create clusters, run at most N VMs at this site, on which hosts.
//!
//! This module does no I/O and reads no clock: callers pass `now` (Unix seconds).
use crate::model::{hex, unhex};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};

/// Version of the signed envelope; bumped when the signed bytes change.
pub const ENVELOPE_VERSION: u8 = 1;
/// How far a request's timestamp may be from the agent's clock, in seconds.
pub const MAX_SKEW_SECS: u64 = 120;
/// Most nonces remembered (older ones have left the time window anyway).
const MAX_NONCES: usize = 65_536;

/// Errors of keys and request checks. Each refusal says why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// Key material did not parse.
    #[error("bad key: {0}")]
    BadKey(&'static str),
    /// No randomness from the OS.
    #[error("system randomness unavailable")]
    Rng,
    /// Envelope version unknown.
    #[error("unsupported request envelope version {0}")]
    Version(u8),
    /// The user key is not in the site's authorisations.
    #[error("key {0} is not authorised at this site")]
    UnknownKey(String),
    /// Signature does not verify: the request was altered or signed by another key.
    #[error("bad signature: request tampered with or signed by a different key")]
    BadSignature,
    /// Timestamp outside the window.
    #[error("request timestamp is {0} s away from the agent clock (limit {MAX_SKEW_SECS} s)")]
    Skew(i64),
    /// Same nonce seen before.
    #[error("replayed request refused (nonce already seen)")]
    Replay,
    /// The key is known but may not do this.
    #[error("not permitted: {0}")]
    Denied(String),
}

/// A user's (or an agent's) Ed25519 signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl SigningKey {
    /// A fresh random key.
    pub fn generate() -> Result<SigningKey, AuthError> {
        let rng = SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| AuthError::Rng)?;
        SigningKey::from_pkcs8(doc.as_ref())
    }
    /// Load from PKCS#8 bytes.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<SigningKey, AuthError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| AuthError::BadKey("pkcs8"))?;
        Ok(SigningKey {
            pair,
            pkcs8: pkcs8.to_vec(),
        })
    }
    /// Load from the key file format: PKCS#8 in hex on one line.
    pub fn from_file_text(text: &str) -> Result<SigningKey, AuthError> {
        let bytes = unhex(text.trim()).ok_or(AuthError::BadKey("key file is not hex"))?;
        SigningKey::from_pkcs8(&bytes)
    }
    /// The key file format (keep it mode 0600).
    pub fn to_file_text(&self) -> String {
        format!("{}\n", hex(&self.pkcs8))
    }
    /// Public key in hex (what site admins authorise and controllers pin).
    pub fn public_hex(&self) -> String {
        hex(self.pair.public_key().as_ref())
    }
    /// Public key bytes.
    pub fn public(&self) -> [u8; 32] {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.pair.public_key().as_ref());
        k
    }
    /// Sign `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        let mut s = [0u8; 64];
        s.copy_from_slice(self.pair.sign(msg).as_ref());
        s
    }
}

/// Verify an Ed25519 signature by public key bytes.
pub fn verify(public: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public)
        .verify(msg, sig)
        .is_ok()
}

/// Parse a hex public key.
pub fn parse_public(s: &str) -> Result<[u8; 32], AuthError> {
    let b = unhex(s).ok_or(AuthError::BadKey("public key is not hex"))?;
    b.try_into()
        .map_err(|_| AuthError::BadKey("public key is not 32 bytes"))
}

/// A signed request as it travels (inside the encrypted channel).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Envelope {
    /// [`ENVELOPE_VERSION`].
    pub v: u8,
    /// Signer's public key, hex.
    pub key: String,
    /// Unix seconds at signing.
    pub ts: u64,
    /// 16 random bytes, hex.
    pub nonce: String,
    /// The request, JSON text exactly as signed.
    pub body: String,
    /// Ed25519 signature, hex.
    pub sig: String,
}

fn signed_bytes(channel_id: &[u8; 32], ts: u64, nonce: &[u8], body: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(64 + body.len());
    m.extend_from_slice(b"mvc-request\0");
    m.push(ENVELOPE_VERSION);
    m.extend_from_slice(channel_id);
    m.extend_from_slice(&ts.to_be_bytes());
    m.extend_from_slice(nonce);
    m.extend_from_slice(body.as_bytes());
    m
}

impl Envelope {
    /// Sign `body` for the channel `channel_id` at time `now`.
    pub fn seal(
        key: &SigningKey,
        channel_id: &[u8; 32],
        now: u64,
        body: String,
    ) -> Result<Envelope, AuthError> {
        let mut nonce = [0u8; 16];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| AuthError::Rng)?;
        let sig = key.sign(&signed_bytes(channel_id, now, &nonce, &body));
        Ok(Envelope {
            v: ENVELOPE_VERSION,
            key: key.public_hex(),
            ts: now,
            nonce: hex(&nonce),
            body,
            sig: hex(&sig),
        })
    }
}

/// What one user key may do at a site (set by the site admin with
/// `mvc agent authorize`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Authorization {
    /// User public key, hex.
    pub key: String,
    /// Free text (who this is).
    #[serde(default)]
    pub comment: String,
    /// May reserve VMs for new clusters here.
    pub may_create_clusters: bool,
    /// Most VMs this key may hold at this site at once.
    pub max_vms: u32,
    /// Hosts it may use; `*` means all.
    pub hosts: Vec<String>,
}

impl Authorization {
    /// May this key place a VM on `host`?
    pub fn allows_host(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| h == "*" || h == host)
    }

    /// Check a reservation of `want` more VMs on `hosts` when the key holds `held`.
    pub fn check_reserve<'a>(
        &self,
        held: u32,
        want: u32,
        hosts: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), AuthError> {
        if !self.may_create_clusters {
            return Err(AuthError::Denied(
                "this key may not create clusters at this site".into(),
            ));
        }
        for h in hosts {
            if !self.allows_host(h) {
                return Err(AuthError::Denied(format!(
                    "this key may not use host '{h}' (allowed: {})",
                    self.hosts.join(",")
                )));
            }
        }
        if held.saturating_add(want) > self.max_vms {
            return Err(AuthError::Denied(format!(
                "this key may hold at most {} VMs at this site; it holds {held} and asked for {want}",
                self.max_vms
            )));
        }
        Ok(())
    }
}

/// The agent's check of incoming envelopes: signature, window, replay, known key.
pub struct Verifier {
    authz: Vec<Authorization>,
    seen: HashMap<[u8; 16], u64>,
    order: VecDeque<[u8; 16]>,
}

impl Verifier {
    /// A verifier for the site's current authorisations.
    pub fn new(authz: Vec<Authorization>) -> Verifier {
        Verifier {
            authz,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Replace the authorisations (the file changed); the nonce memory stays.
    pub fn set_authorizations(&mut self, authz: Vec<Authorization>) {
        self.authz = authz;
    }

    /// Check `env`, received on channel `channel_id`, at agent time `now`. Returns the
    /// signer's authorisation and the verified body.
    pub fn check<'a>(
        &'a mut self,
        channel_id: &[u8; 32],
        env: &'a Envelope,
        now: u64,
    ) -> Result<(&'a Authorization, &'a str), AuthError> {
        if env.v != ENVELOPE_VERSION {
            return Err(AuthError::Version(env.v));
        }
        let public = parse_public(&env.key)?;
        let nonce: [u8; 16] = unhex(&env.nonce)
            .and_then(|n| n.try_into().ok())
            .ok_or(AuthError::BadSignature)?;
        let sig = unhex(&env.sig).ok_or(AuthError::BadSignature)?;
        let Some(idx) = self.authz.iter().position(|a| a.key == env.key) else {
            return Err(AuthError::UnknownKey(env.key.clone()));
        };
        if !verify(
            &public,
            &signed_bytes(channel_id, env.ts, &nonce, &env.body),
            &sig,
        ) {
            return Err(AuthError::BadSignature);
        }
        let skew = env.ts as i64 - now as i64;
        if skew.unsigned_abs() > MAX_SKEW_SECS {
            return Err(AuthError::Skew(skew));
        }
        // Forget nonces that have left the window; they cannot pass the skew check.
        while let Some(old) = self.order.front() {
            let expired = self
                .seen
                .get(old)
                .is_none_or(|t| t + 2 * MAX_SKEW_SECS < now);
            if expired || self.order.len() >= MAX_NONCES {
                let old = *old;
                self.order.pop_front();
                self.seen.remove(&old);
            } else {
                break;
            }
        }
        if self.seen.contains_key(&nonce) {
            return Err(AuthError::Replay);
        }
        self.seen.insert(nonce, env.ts);
        self.order.push_back(nonce);
        Ok((&self.authz[idx], &env.body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CH: [u8; 32] = [7u8; 32];

    fn setup() -> (SigningKey, Verifier) {
        let k = SigningKey::generate().unwrap();
        let v = Verifier::new(vec![Authorization {
            key: k.public_hex(),
            comment: String::new(),
            may_create_clusters: true,
            max_vms: 4,
            hosts: vec!["h0".into()],
        }]);
        (k, v)
    }

    #[test]
    fn good_request_passes_once() {
        let (k, mut v) = setup();
        let e = Envelope::seal(&k, &CH, 1000, "{\"op\":\"info\"}".into()).unwrap();
        let (a, body) = v.check(&CH, &e, 1001).unwrap();
        assert_eq!(a.max_vms, 4);
        assert_eq!(body, "{\"op\":\"info\"}");
        assert_eq!(v.check(&CH, &e, 1002).unwrap_err(), AuthError::Replay);
    }

    #[test]
    fn tampered_requests_refused() {
        let (k, mut v) = setup();
        let e = Envelope::seal(&k, &CH, 1000, "{\"op\":\"info\"}".into()).unwrap();
        let mut t = e.clone();
        t.body = "{\"op\":\"release\"}".into();
        assert_eq!(v.check(&CH, &t, 1000).unwrap_err(), AuthError::BadSignature);
        let mut t = e.clone();
        t.ts += 1;
        assert_eq!(v.check(&CH, &t, 1000).unwrap_err(), AuthError::BadSignature);
        let mut t = e.clone();
        t.nonce = hex(&[1u8; 16]);
        assert_eq!(v.check(&CH, &t, 1000).unwrap_err(), AuthError::BadSignature);
        // replayed into another channel
        assert_eq!(
            v.check(&[8u8; 32], &e, 1000).unwrap_err(),
            AuthError::BadSignature
        );
        // the untampered one still passes: failed attempts did not burn its nonce
        assert!(v.check(&CH, &e, 1000).is_ok());
    }

    #[test]
    fn unknown_key_and_stale_requests_refused() {
        let (_, mut v) = setup();
        let other = SigningKey::generate().unwrap();
        let e = Envelope::seal(&other, &CH, 1000, "{}".into()).unwrap();
        let err = v.check(&CH, &e, 1000).unwrap_err();
        assert!(err.to_string().contains("not authorised"), "{err}");
        let (k, mut v) = setup();
        let e = Envelope::seal(&k, &CH, 1000, "{}".into()).unwrap();
        assert_eq!(
            v.check(&CH, &e, 1000 + 500).unwrap_err(),
            AuthError::Skew(-500)
        );
        // a key swapped in with its signature stays refused
        let mut t = Envelope::seal(&other, &CH, 1000, "{}".into()).unwrap();
        t.key = k.public_hex();
        assert_eq!(v.check(&CH, &t, 1000).unwrap_err(), AuthError::BadSignature);
    }

    #[test]
    fn authorisation_limits() {
        let (k, _) = setup();
        let a = Authorization {
            key: k.public_hex(),
            comment: String::new(),
            may_create_clusters: true,
            max_vms: 4,
            hosts: vec!["h0".into()],
        };
        assert!(a.check_reserve(1, 3, ["h0"]).is_ok());
        let e = a.check_reserve(2, 3, ["h0"]).unwrap_err().to_string();
        assert!(e.contains("at most 4 VMs"), "{e}");
        let e = a.check_reserve(0, 1, ["h1"]).unwrap_err().to_string();
        assert!(e.contains("host 'h1'"), "{e}");
        let no = Authorization {
            may_create_clusters: false,
            ..a
        };
        assert!(no.check_reserve(0, 1, ["h0"]).is_err());
    }

    #[test]
    fn key_file_round_trip() {
        let k = SigningKey::generate().unwrap();
        let k2 = SigningKey::from_file_text(&k.to_file_text()).unwrap();
        assert_eq!(k.public_hex(), k2.public_hex());
        assert!(SigningKey::from_file_text("zz").is_err());
        let sig = k.sign(b"m");
        assert!(verify(&k.public(), b"m", &sig));
        assert!(!verify(&k.public(), b"n", &sig));
    }
}
