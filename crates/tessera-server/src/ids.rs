//! Lease ids: unguessable, because a lease id is what lets a station heartbeat or check in.
//!
//! Each id is SHA-256(seed || counter), truncated to 128 bits. The seed comes from the OS in
//! production and is fixed in tests, so test runs are reproducible.

use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

pub struct LeaseIds {
    seed: [u8; 32],
    counter: AtomicU64,
}

impl LeaseIds {
    pub fn from_seed(seed: [u8; 32]) -> LeaseIds {
        LeaseIds {
            seed,
            counter: AtomicU64::new(0),
        }
    }

    pub fn from_os() -> std::io::Result<LeaseIds> {
        Ok(LeaseIds::from_seed(random_bytes()?))
    }

    pub fn next_id(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut hasher = Sha256::new();
        hasher.update(self.seed);
        hasher.update(n.to_le_bytes());
        let digest = hasher.finalize();
        hex::encode(&digest[..16])
    }
}

/// 32 bytes from the operating system's random source.
pub fn random_bytes() -> std::io::Result<[u8; 32]> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    Ok(bytes)
}
