//! A redundant pair: a domain of two hosts that keeps serving when the hosts lose each other,
//! without ever issuing, between them, more than a key holds (docs/pair.md).
//!
//! The rules are `tessera_engine::pair` (when a host serves paired, alone or not at all, and
//! when it merges); the ledger side (shares, serving alone, the merge) is
//! `tessera_core::ledger::pair`. This module is their runtime on real hosts: it reads the
//! link from the Raft traffic ([`PairLink`]), feeds the machine every [`PAIR_TICK`], and
//! carries out its actions: the Raft routes closed while alone, the alone journal
//! ([`journal::Journal`], fsync before each answer), the alone epoch in the store, the merge
//! task (the other host's alone state, the Raft leader role, one `MergeAlone`).
//!
//! An entry proposed before and committed after the pair fell out of step is not
//! acknowledged (503 `pair_recovering`; the station retries, and checkout is idempotent per
//! station).

pub use tessera_store::journal;
pub mod runtime;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tessera_core::{AloneState, Applied, Ledger, Share, Stamped};
use tessera_engine::pair::{self as engine, PairMachine, Rules, Timing};

use crate::consensus::Consensus;
pub use crate::consensus::pair_link::Mode;
use crate::consensus::pair_link::PairLink;
use journal::Journal;

/// How often each host looks at its link.
pub const PAIR_TICK: Duration = Duration::from_millis(100);
/// How long the recovering host waits for the Raft leader role before it tries again.
const LEAD_WAIT: Duration = Duration::from_secs(5);
/// Timeout of a pair RPC to the other host.
const RPC_TIMEOUT: Duration = Duration::from_secs(3);
/// Header carrying the HMAC (domain secret) of a pair RPC's body.
pub const PAIR_AUTH_HEADER: &str = "x-tessera-pair-auth";
/// The sender's time (Unix ms) of a pair RPC, under its tag: a captured RPC is refused once
/// [`PAIR_RPC_WINDOW_MS`] has passed, and within it, a second time (replay).
pub const PAIR_TIME_HEADER: &str = "x-tessera-pair-time";
/// How far a pair RPC's time may be from the receiver's clock.
pub const PAIR_RPC_WINDOW_MS: i64 = 30_000;

/// What a pair RPC's tag covers besides the body: its name and the sender's time.
pub fn rpc_tag_subject(rpc: &str, time_ms: i64) -> String {
    format!("{rpc} {time_ms}")
}

/// Where a station command goes.
pub enum Route {
    /// Through Raft; `disturbed` as read before proposing.
    Consensus { disturbed: u64 },
    /// To this host's alone ledger.
    Alone,
    /// Nowhere: the pair is merging.
    Recovering,
}

/// The last merge this host proposed or saw.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MergeReport {
    pub at_ms: i64,
    pub leases_merged: u32,
    pub leases_removed: u32,
    pub leases_dropped: u32,
}

pub struct Pair {
    data_dir: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    machine: PairMachine,
    journal: Option<Journal>,
    alone: Option<Ledger>,
    /// Alone state handed over (the other host asked) or kept for the merge (this host
    /// drives it).
    handed: Option<AloneState>,
    recovery: Option<tokio::task::JoinHandle<()>>,
    last_merge: Option<MergeReport>,
    last_error: Option<String>,
    last_status: Option<String>,
    /// Why the journal on disk cannot be used (it was edited after it was written): the host
    /// then does as if it were lost, and says why.
    unusable_journal: Option<String>,
}

/// Answer of `POST /v1/pair/rpc/handover`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Handover {
    pub state: Option<AloneState>,
}

/// Answer of `POST /v1/pair/rpc/candidate`: may this host become a pair's backup?
#[derive(Debug, Serialize, Deserialize)]
pub struct Candidate {
    pub host: u64,
    pub address: String,
    pub voters: Vec<u64>,
    pub keys: usize,
    /// Log entries this host's store holds: a host that ran as a server before has some.
    pub last_log_index: Option<u64>,
    pub server_id: Option<String>,
}

impl Pair {
    pub fn new(data_dir: PathBuf) -> Pair {
        Pair {
            data_dir,
            inner: Mutex::new(Inner {
                machine: PairMachine::new(Timing::HOSTS, Rules::default()),
                journal: None,
                alone: None,
                handed: None,
                recovery: None,
                last_merge: None,
                last_error: None,
                last_status: None,
                unusable_journal: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn mode(&self) -> Mode {
        self.lock().machine.mode()
    }

    /// Where a command goes now.
    pub fn route(&self, link: &PairLink) -> Route {
        let disturbed = link.disturbed();
        let (now_ms, view) = link.view();
        match self.lock().machine.route(now_ms, &view) {
            engine::Route::Consensus => Route::Consensus { disturbed },
            engine::Route::Alone => Route::Alone,
            engine::Route::Recovering => Route::Recovering,
        }
    }

    /// After a commit: was the pair in step all along (see `PairLink::disturbed`)?
    pub fn still_in_step(&self, link: &PairLink, disturbed: u64) -> bool {
        self.mode() == Mode::Off || link.disturbed() == disturbed
    }

    /// Applies a command to the alone ledger, journaled first. `None`: no longer alone.
    pub fn apply_alone(&self, entry: &Stamped) -> Option<Result<Applied, journal::JournalError>> {
        let mut inner = self.lock();
        if inner.machine.mode() != Mode::Alone {
            return None;
        }
        let Inner { journal, alone, .. } = &mut *inner;
        let (Some(journal), Some(alone)) = (journal.as_mut(), alone.as_mut()) else {
            return None;
        };
        if let Err(e) = journal.append(entry) {
            return Some(Err(e));
        }
        Some(Ok(alone.apply_recording(entry)))
    }

    /// Reads the ledger this host serves from: its alone ledger while alone, else the
    /// applied one.
    pub fn read<R>(&self, consensus: &Consensus, f: impl FnOnce(&Ledger) -> R) -> R {
        let inner = self.lock();
        if inner.machine.mode() == Mode::Alone
            && let Some(ledger) = &inner.alone
        {
            return f(ledger);
        }
        drop(inner);
        consensus.read(f)
    }

    /// The other host announced it stops (graceful shutdown).
    pub fn peer_stopping(&self, link: &PairLink) {
        let (now_ms, _) = link.view();
        self.lock().machine.on_peer_stopping(now_ms);
    }
}

/// Why a host does not serve alone when its alone journal is missing (`found: None`) or older
/// than the epoch its store recorded.
fn lost_journal_error(
    data_dir: &std::path::Path,
    begun: u64,
    found: Option<u64>,
    unusable: Option<&str>,
) -> String {
    if let Some(unusable) = unusable {
        return format!(
            "{unusable}, and this host began serving alone in epoch {begun} and that epoch was not merged: this host does not serve alone (the leases that journal held would be issued twice) and serves again once the pair has merged"
        );
    }
    let path = data_dir.join(journal::JOURNAL_FILE_NAME);
    let found = match found {
        None => "is missing".to_string(),
        Some(epoch) => format!("holds the older epoch {epoch}"),
    };
    format!(
        "the alone journal {} {found}, but this host began serving alone in epoch {begun} and that epoch was not merged: the journal was deleted or put back from a copy, so this host does not serve alone (its leases of that epoch would be issued twice) and serves again once the pair has merged",
        path.display()
    )
}

pub use engine::{
    BACKUP_NOT_AVAILABLE, PAIR_NOT_SYNCED, PAIRED_AND_AVAILABLE, PRIMARY_NOT_AVAILABLE, RECOVERING,
    RUNNING,
};

/// `GET /v1/pair` and `tessera pair status --json`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PairStatus {
    pub view_of: u64,
    /// Paired and Available, Backup not available, Primary not available, Pair not synced,
    /// Recovering (or Not paired).
    pub pair_status: String,
    /// How this host serves: off, paired, alone, recovering.
    #[schema(value_type = String, pattern = "^(off|paired|alone|recovering)$")]
    pub mode: Mode,
    pub backup_percent: Option<u8>,
    pub hosts: Vec<PairHost>,
    /// Commands this host journaled alone, not merged yet.
    pub journal_commands: usize,
    pub alone_epoch: Option<u64>,
    pub last_merge: Option<MergeReport>,
    pub last_error: Option<String>,
    /// Milliseconds since this host last heard from the other.
    pub last_contact_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PairHost {
    pub host: u64,
    pub address: Option<String>,
    /// By host number: the lower one is the pair's primary.
    pub role: String,
    /// Whose share of each key's licenses this host serves from when alone.
    #[schema(value_type = String, pattern = "^(primary|backup)$")]
    pub share: Share,
    /// Running, Stopped, Disconnected, Backup not available.
    pub status: String,
    #[schema(value_type = Option<String>, pattern = "^(off|paired|alone|recovering)$")]
    pub mode: Option<Mode>,
    /// Holds the Raft leader role now (it moves back to the primary once it caught up).
    pub raft_leader: bool,
}

/// Why a pair RPC or the merge failed (its text is the pair status's `last_error`).
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("a pair needs a domain_secret on both hosts")]
    NoDomainSecret,
    #[error("the pair has no other host")]
    NoOtherHost,
    #[error("cannot reach {addr}: {detail}")]
    Unreachable { addr: String, detail: String },
    #[error("{addr} answered {status}: {text}")]
    Refused {
        addr: String,
        status: reqwest::StatusCode,
        text: String,
    },
    #[error("{addr} answered {text:?}: {detail}")]
    Malformed {
        addr: String,
        text: String,
        detail: String,
    },
    #[error("waiting for the Raft leader role to merge (host {peer} leads)")]
    NotLeading { peer: u64 },
    #[error(transparent)]
    Consensus(#[from] crate::consensus::ConsensusError),
    #[error("the merge was refused: {0}")]
    MergeRefused(String),
}
