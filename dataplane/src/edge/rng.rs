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

/// A seeded generator (splitmix64) for simulations and benchmarks: the same seed gives
/// the same edge ids, session indices and table orders. Handshake ephemeral keys still
/// come from the system (ring takes only its own generators), which changes bytes, not
/// events. Never for a real edge: its ids and indices would be predictable.
#[derive(Debug)]
pub struct SeededRng {
    state: u64,
    system: SystemRandom,
}

impl SeededRng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed,
            system: SystemRandom::new(),
        }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl EdgeRng for SeededRng {
    fn fill(&mut self, dest: &mut [u8]) -> Result<(), RngError> {
        for c in dest.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
        Ok(())
    }

    fn ring(&self) -> &dyn SecureRandom {
        &self.system
    }
}
