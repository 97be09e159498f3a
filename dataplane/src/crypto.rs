//! Keys and AEAD of the overlay. Pure: no clock, no I/O (randomness comes from the caller).
//!
//! Key schedule (all HKDF-SHA256, see `docs/PROTOCOL.md`):
//! - `prk = Extract(salt "mvc-overlay-v1", community secret)`;
//!   `community id = Expand(prk, "community-id" | name, 16)`,
//!   `psk = Expand(prk, "psk" | name, 32)`, `bcast = Expand(prk, "bcast" | name, 32)`.
//! - Handshake: PSK-keyed tags authenticate both messages before any Diffie-Hellman work;
//!   session keys are `Expand(Extract(psk, X25519(e_i, e_r)), "session" | e_i | e_r | ids | cipher)`,
//!   so they are fresh per handshake and gone with the ephemeral keys (forward secrecy).
//! - Broadcast: `Expand(Extract(bcast, sender id), "bcast-sender")`, one key per sender,
//!   nonces from the sender's counter.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::hkdf;
use ring::rand::SecureRandom;

use crate::wire::{self, CommunityId, EdgeId, HandshakeInit, HandshakeResp, TAG_LEN};

/// Errors of the crypto layer. Each maps to a drop counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// Tag did not verify.
    #[error("authentication failed")]
    Auth,
    /// Key agreement failed (bad public key).
    #[error("key agreement failed")]
    Agreement,
    /// The random generator failed.
    #[error("random generator failed")]
    Random,
    /// Buffer too small.
    #[error("buffer too small")]
    NoRoom,
    /// Cipher byte unknown or not the configured one.
    #[error("cipher mismatch")]
    Cipher,
}

impl CryptoError {
    /// Drop-counter name.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Auth => "auth_failed",
            Self::Agreement => "bad_key",
            Self::Random => "rng_failed",
            Self::NoRoom => "no_room",
            Self::Cipher => "cipher_mismatch",
        }
    }
}

/// Data cipher of sessions and broadcasts.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Cipher {
    /// No encryption and no authentication of data (benchmarking only).
    None = 0,
    /// AES-256-GCM (default; fast with AES-NI).
    #[default]
    Aes256Gcm = 1,
    /// ChaCha20-Poly1305 (fast without AES instructions).
    Chacha20Poly1305 = 2,
}

impl Cipher {
    /// From the wire byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::None),
            1 => Some(Self::Aes256Gcm),
            2 => Some(Self::Chacha20Poly1305),
            _ => None,
        }
    }
    /// Bytes the cipher adds to each message.
    pub fn overhead(self) -> usize {
        match self {
            Self::None => 0,
            _ => TAG_LEN,
        }
    }
    /// Name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Aes256Gcm => "aes-256-gcm",
            Self::Chacha20Poly1305 => "chacha20-poly1305",
        }
    }
}

impl std::str::FromStr for Cipher {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "aes-256-gcm" | "aes256gcm" | "aes" => Ok(Self::Aes256Gcm),
            "chacha20-poly1305" | "chacha20poly1305" | "chacha" => Ok(Self::Chacha20Poly1305),
            _ => Err(format!(
                "unknown cipher {s:?} (aes-256-gcm, chacha20-poly1305 or none)"
            )),
        }
    }
}

impl std::fmt::Display for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn hkdf(salt: &[u8], ikm: &[u8], info: &[&[u8]], out: &mut [u8]) {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    // Expand only fails when the output is longer than 255 hash lengths; ours are <= 96.
    if let Ok(okm) = prk.expand(info, Len(out.len())) {
        let _ = okm.fill(out);
    }
}

/// Keys derived from the community name and secret.
#[derive(Clone)]
pub struct CommunityKeys {
    /// What the supernode sees instead of the name.
    pub id: CommunityId,
    psk: [u8; 32],
    bcast: [u8; 32],
}

impl CommunityKeys {
    /// Derives the keys.
    pub fn derive(name: &str, secret: &[u8]) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"mvc-overlay-v1").extract(secret);
        let mut id = [0u8; 16];
        let mut psk = [0u8; 32];
        let mut bcast = [0u8; 32];
        for (label, out) in [
            (&b"community-id"[..], &mut id[..]),
            (&b"psk"[..], &mut psk[..]),
            (&b"bcast"[..], &mut bcast[..]),
        ] {
            if let Ok(okm) = prk.expand(&[label, name.as_bytes()], Len(out.len())) {
                let _ = okm.fill(out);
            }
        }
        Self { id, psk, bcast }
    }

    /// The broadcast key of one sender.
    pub fn bcast_key(&self, cipher: Cipher, sender: &EdgeId) -> AeadKey {
        let mut k = [0u8; 32];
        hkdf(&self.bcast, sender, &[b"bcast-sender"], &mut k);
        AeadKey::new(cipher, &k)
    }
}

/// An AEAD key with counter nonces, or no protection for [`Cipher::None`].
pub struct AeadKey {
    key: Option<LessSafeKey>,
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

impl AeadKey {
    /// Builds a key from 32 bytes.
    pub fn new(cipher: Cipher, key: &[u8; 32]) -> Self {
        let alg = match cipher {
            Cipher::None => return Self { key: None },
            Cipher::Aes256Gcm => &aead::AES_256_GCM,
            Cipher::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        };
        // Both algorithms take 32-byte keys, so this cannot fail.
        let key = UnboundKey::new(alg, key).ok().map(LessSafeKey::new);
        Self { key }
    }

    /// Tag bytes added by `seal`.
    pub fn overhead(&self) -> usize {
        if self.key.is_some() {
            TAG_LEN
        } else {
            0
        }
    }

    /// Encrypts `buf[..plain_len]` in place and writes the tag after it; returns the
    /// sealed length. The counter must never repeat for this key.
    pub fn seal(
        &self,
        counter: u64,
        aad: &[u8],
        buf: &mut [u8],
        plain_len: usize,
    ) -> Result<usize, CryptoError> {
        let Some(key) = &self.key else {
            return Ok(plain_len);
        };
        if buf.len() < plain_len + TAG_LEN {
            return Err(CryptoError::NoRoom);
        }
        let (data, rest) = buf.split_at_mut(plain_len);
        let tag = key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(aad), data)
            .map_err(|_| CryptoError::NoRoom)?;
        rest[..TAG_LEN].copy_from_slice(tag.as_ref());
        Ok(plain_len + TAG_LEN)
    }

    /// Decrypts and verifies `buf` (ciphertext and tag) in place; returns the plaintext length.
    pub fn open(&self, counter: u64, aad: &[u8], buf: &mut [u8]) -> Result<usize, CryptoError> {
        let Some(key) = &self.key else {
            return Ok(buf.len());
        };
        if buf.len() < TAG_LEN {
            return Err(CryptoError::Auth);
        }
        key.open_in_place(nonce(counter), Aad::from(aad), buf)
            .map(|p| p.len())
            .map_err(|_| CryptoError::Auth)
    }
}

/// Associated data of an edge-to-edge message: community, sender, receiver, header bytes.
pub struct EdgeAad {
    buf: [u8; 128],
    len: usize,
}

impl EdgeAad {
    /// Builds it; `header` is at most 96 bytes (all headers are).
    pub fn new(community: &CommunityId, src: &EdgeId, dst: &EdgeId, header: &[u8]) -> Self {
        let mut buf = [0u8; 128];
        let hl = header.len().min(96);
        buf[..16].copy_from_slice(community);
        buf[16..24].copy_from_slice(src);
        buf[24..32].copy_from_slice(dst);
        buf[32..32 + hl].copy_from_slice(&header[..hl]);
        Self { buf, len: 32 + hl }
    }
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

fn tag_of(key: &[u8; 32], aad: &[u8]) -> [u8; TAG_LEN] {
    let k = AeadKey::new(Cipher::Aes256Gcm, key);
    let mut t = [0u8; TAG_LEN];
    // Sealing an empty message into a 16-byte buffer cannot fail.
    let _ = k.seal(0, aad, &mut t, 0);
    t
}

fn tag_ok(key: &[u8; 32], aad: &[u8], tag: &[u8; TAG_LEN]) -> bool {
    let k = AeadKey::new(Cipher::Aes256Gcm, key);
    let mut t = *tag;
    k.open(0, aad, &mut t).is_ok()
}

/// Session keys of one direction pair.
pub struct SessionKeys {
    /// Key for what this side sends.
    pub send: [u8; 32],
    /// Key for what this side receives.
    pub recv: [u8; 32],
}

/// What an initiator keeps until the response arrives.
pub struct InitState {
    /// Ephemeral private key (used once, then gone).
    pub private: EphemeralPrivateKey,
    /// The init as sent.
    pub init: HandshakeInit,
}

fn session_secret(
    psk: &[u8; 32],
    dh: &[u8],
    init: &HandshakeInit,
    resp_eph: &[u8; 32],
    resp_id: &EdgeId,
) -> ([u8; 32], [u8; 32], [u8; 32]) {
    let mut okm = [0u8; 96];
    hkdf(
        psk,
        dh,
        &[
            b"session",
            &init.ephemeral,
            resp_eph,
            &init.src,
            resp_id,
            &[init.cipher],
        ],
        &mut okm,
    );
    let mut a = [0u8; 32];
    let mut b = [0u8; 32];
    let mut c = [0u8; 32];
    a.copy_from_slice(&okm[..32]);
    b.copy_from_slice(&okm[32..64]);
    c.copy_from_slice(&okm[64..]);
    (a, b, c)
}

impl CommunityKeys {
    /// Starts a handshake with `peer`.
    pub fn handshake_init(
        &self,
        rng: &dyn SecureRandom,
        cipher: Cipher,
        me: &EdgeId,
        peer: &EdgeId,
        sender_index: u32,
        ts: u64,
    ) -> Result<InitState, CryptoError> {
        let private =
            EphemeralPrivateKey::generate(&X25519, rng).map_err(|_| CryptoError::Random)?;
        let public = private
            .compute_public_key()
            .map_err(|_| CryptoError::Random)?;
        let mut ephemeral = [0u8; 32];
        ephemeral.copy_from_slice(public.as_ref());
        let mut init = HandshakeInit {
            cipher: cipher as u8,
            sender_index,
            src: *me,
            ts,
            ephemeral,
            mac: [0; TAG_LEN],
        };
        let mut buf = [0u8; wire::HS_INIT_LEN];
        init.encode(&mut buf).map_err(|_| CryptoError::NoRoom)?;
        let aad = EdgeAad::new(&self.id, me, peer, &buf[..HandshakeInit::SIGNED_LEN]);
        let mut k = [0u8; 32];
        hkdf(&self.psk, &ephemeral, &[b"hs-init-mac"], &mut k);
        init.mac = tag_of(&k, aad.as_bytes());
        Ok(InitState { private, init })
    }

    /// Checks an init's PSK tag (cheap; no Diffie-Hellman).
    pub fn verify_init(&self, me: &EdgeId, init: &HandshakeInit) -> bool {
        let mut buf = [0u8; wire::HS_INIT_LEN];
        if init.encode(&mut buf).is_err() {
            return false;
        }
        let aad = EdgeAad::new(&self.id, &init.src, me, &buf[..HandshakeInit::SIGNED_LEN]);
        let mut k = [0u8; 32];
        hkdf(&self.psk, &init.ephemeral, &[b"hs-init-mac"], &mut k);
        tag_ok(&k, aad.as_bytes(), &init.mac)
    }

    /// Answers a verified init: returns the response and this side's session keys.
    pub fn handshake_respond(
        &self,
        rng: &dyn SecureRandom,
        me: &EdgeId,
        init: &HandshakeInit,
        sender_index: u32,
    ) -> Result<(HandshakeResp, SessionKeys), CryptoError> {
        let private =
            EphemeralPrivateKey::generate(&X25519, rng).map_err(|_| CryptoError::Random)?;
        let public = private
            .compute_public_key()
            .map_err(|_| CryptoError::Random)?;
        let mut ephemeral = [0u8; 32];
        ephemeral.copy_from_slice(public.as_ref());
        let (i2r, r2i, confirm) = agreement::agree_ephemeral(
            private,
            &UnparsedPublicKey::new(&X25519, &init.ephemeral),
            |dh| session_secret(&self.psk, dh, init, &ephemeral, me),
        )
        .map_err(|_| CryptoError::Agreement)?;
        let mut resp = HandshakeResp {
            cipher: init.cipher,
            sender_index,
            receiver_index: init.sender_index,
            src: *me,
            ephemeral,
            mac: [0; TAG_LEN],
            confirm: [0; TAG_LEN],
        };
        let mut buf = [0u8; wire::HS_RESP_LEN];
        resp.encode(&mut buf).map_err(|_| CryptoError::NoRoom)?;
        let aad = EdgeAad::new(&self.id, me, &init.src, &buf[..HandshakeResp::SIGNED_LEN]);
        let mut k = [0u8; 32];
        hkdf(
            &self.psk,
            &[&init.ephemeral[..], &ephemeral[..]].concat(),
            &[b"hs-resp-mac"],
            &mut k,
        );
        resp.mac = tag_of(&k, aad.as_bytes());
        resp.confirm = tag_of(&confirm, aad.as_bytes());
        Ok((
            resp,
            SessionKeys {
                send: r2i,
                recv: i2r,
            },
        ))
    }

    /// Checks a response's PSK tag against the init it answers (cheap).
    pub fn verify_resp(&self, me: &EdgeId, init: &HandshakeInit, resp: &HandshakeResp) -> bool {
        let mut buf = [0u8; wire::HS_RESP_LEN];
        if resp.encode(&mut buf).is_err() || resp.receiver_index != init.sender_index {
            return false;
        }
        let aad = EdgeAad::new(&self.id, &resp.src, me, &buf[..HandshakeResp::SIGNED_LEN]);
        let mut k = [0u8; 32];
        hkdf(
            &self.psk,
            &[&init.ephemeral[..], &resp.ephemeral[..]].concat(),
            &[b"hs-resp-mac"],
            &mut k,
        );
        tag_ok(&k, aad.as_bytes(), &resp.mac)
    }

    /// Completes the handshake at the initiator (consumes the ephemeral key).
    pub fn handshake_finish(
        &self,
        me: &EdgeId,
        state: InitState,
        resp: &HandshakeResp,
    ) -> Result<SessionKeys, CryptoError> {
        if !self.verify_resp(me, &state.init, resp) {
            return Err(CryptoError::Auth);
        }
        let init = state.init;
        let (i2r, r2i, confirm) = agreement::agree_ephemeral(
            state.private,
            &UnparsedPublicKey::new(&X25519, &resp.ephemeral),
            |dh| session_secret(&self.psk, dh, &init, &resp.ephemeral, &resp.src),
        )
        .map_err(|_| CryptoError::Agreement)?;
        let mut buf = [0u8; wire::HS_RESP_LEN];
        resp.encode(&mut buf).map_err(|_| CryptoError::NoRoom)?;
        let aad = EdgeAad::new(&self.id, &resp.src, me, &buf[..HandshakeResp::SIGNED_LEN]);
        if !tag_ok(&confirm, aad.as_bytes(), &resp.confirm) {
            return Err(CryptoError::Auth);
        }
        Ok(SessionKeys {
            send: i2r,
            recv: r2i,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    #[test]
    fn community_keys_depend_on_secret_and_name() {
        let a = CommunityKeys::derive("c", b"s1");
        let b = CommunityKeys::derive("c", b"s2");
        let c = CommunityKeys::derive("d", b"s1");
        assert_ne!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_eq!(a.id, CommunityKeys::derive("c", b"s1").id);
    }

    #[test]
    fn handshake_agrees_and_wrong_psk_fails() {
        let rng = SystemRandom::new();
        let k = CommunityKeys::derive("c", b"secret");
        let (i, r) = ([1u8; 8], [2u8; 8]);
        let st = k
            .handshake_init(&rng, Cipher::Aes256Gcm, &i, &r, 7, 1)
            .unwrap();
        assert!(k.verify_init(&r, &st.init));
        // Bound to the receiver: another edge cannot accept it.
        assert!(!k.verify_init(&[3; 8], &st.init));
        let bad = CommunityKeys::derive("c", b"wrong");
        assert!(!bad.verify_init(&r, &st.init));
        let init = st.init;
        let (resp, rk) = k.handshake_respond(&rng, &r, &init, 9).unwrap();
        let mut forged = resp;
        forged.ephemeral[0] ^= 1;
        assert!(!k.verify_resp(&i, &init, &forged));
        let ik = k.handshake_finish(&i, st, &resp).unwrap();
        assert_eq!(ik.send, rk.recv);
        assert_eq!(ik.recv, rk.send);
        assert_ne!(ik.send, ik.recv);
    }

    #[test]
    fn aead_roundtrip_and_tamper() {
        for c in [Cipher::Aes256Gcm, Cipher::Chacha20Poly1305, Cipher::None] {
            let key = AeadKey::new(c, &[5; 32]);
            let mut buf = [0u8; 64];
            buf[..10].copy_from_slice(b"helloworld");
            let n = key.seal(3, b"aad", &mut buf, 10).unwrap();
            assert_eq!(n, 10 + c.overhead());
            let mut copy = buf;
            let p = key.open(3, b"aad", &mut copy[..n]).unwrap();
            assert_eq!(&copy[..p], b"helloworld");
            if c != Cipher::None {
                let mut copy = buf;
                assert!(key.open(3, b"aaX", &mut copy[..n]).is_err());
                let mut copy = buf;
                assert!(key.open(4, b"aad", &mut copy[..n]).is_err());
                let mut copy = buf;
                copy[0] ^= 1;
                assert!(key.open(3, b"aad", &mut copy[..n]).is_err());
            }
        }
    }
}
