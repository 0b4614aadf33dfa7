//! TEMPORARY single-process stand-in used only while the openraft glue is written; replaced by
//! `consensus/` before commit.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use tessera_core::{Ledger, LedgerConfig, Outcome, Stamped};

pub struct ConsensusConfig {
    pub data_dir: PathBuf,
    pub node_id: u64,
    pub advertise_addr: String,
    pub ledger: LedgerConfig,
    pub members: BTreeMap<u64, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    #[error("not the primary")]
    NotPrimary { primary: Option<(u64, String)> },
    #[error("no quorum")]
    NoQuorum,
    #[error("storage: {0}")]
    Storage(String),
    #[error("shut down")]
    Shutdown,
}

#[derive(Clone)]
pub struct Consensus {
    ledger: Arc<RwLock<Ledger>>,
}

impl Consensus {
    pub async fn start(config: ConsensusConfig) -> Result<Consensus, ConsensusError> {
        Ok(Consensus {
            ledger: Arc::new(RwLock::new(Ledger::new(config.ledger))),
        })
    }
    pub async fn propose(&self, entry: Stamped) -> Result<Outcome, ConsensusError> {
        Ok(self.ledger.write().unwrap().apply(&entry))
    }
    pub fn read<R>(&self, f: impl FnOnce(&Ledger) -> R) -> R {
        f(&self.ledger.read().unwrap())
    }
    pub fn is_primary(&self) -> bool {
        true
    }
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
    }
    pub async fn shutdown(&self) {}
}
