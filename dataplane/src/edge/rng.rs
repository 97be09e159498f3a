//! Where an edge core's randomness comes from.
//!
//! The core draws from an [`EdgeRng`] for its registration key (hence its edge id), its
//! session indices and the seeds of its tables, so a simulation that passes a seeded
//! generator replays the same ids, indices and table orders, hence the same datagrams in
//! the same order. ring draws the X25519 ephemeral keys of handshakes itself, from
//! [`EdgeRng::ring`] (its generator trait is sealed: only ring's own generators fit), so
//! their bytes differ between runs; what the core does with them does not.

use ring::rand::{SecureRandom, SystemRandom};

/// The random generator failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("random generator failed")]
pub struct RngError;

/// Randomness of an edge core.
pub trait EdgeRng: Send {
    /// Fills `dest` with random bytes.
    fn fill(&mut self, dest: &mut [u8]) -> Result<(), RngError>;

    /// The generator ring draws handshake ephemeral keys from.
    fn ring(&self) -> &dyn SecureRandom;

    /// A random `u64`.
    fn next_u64(&mut self) -> Result<u64, RngError> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// The operating system's generator (what `mvc edge` uses).
#[derive(Debug)]
pub struct SystemRng(SystemRandom);

impl Default for SystemRng {
    fn default() -> Self {
        Self(SystemRandom::new())
    }
}

impl EdgeRng for SystemRng {
    fn fill(&mut self, dest: &mut [u8]) -> Result<(), RngError> {
        self.0.fill(dest).map_err(|_| RngError)
    }

    fn ring(&self) -> &dyn SecureRandom {
        &self.0
    }
}
