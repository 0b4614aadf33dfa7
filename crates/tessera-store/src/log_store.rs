//! The Raft log: openraft's `RaftLogStorage` and `RaftLogReader` over SQLite.
//!
//! The entries present in the log are mirrored in memory: reads (replication, apply) are
//! served from the mirror, SQLite is the durable copy. The mirror is bounded because the
//! snapshot policy purges applied entries every [`crate::SNAPSHOT_EVERY_LOGS`].
//!
//! Durability per operation:
//! - `append`: the entries are readable when it returns (openraft may replicate them at once,
//!   before they are durable here); the IO-flushed callback fires only after the transaction
//!   holding them committed and was fsynced (group commit in [`crate::writer`]). A crash
//!   before that loses them on this host, so a leader may come back with a shorter log than
//!   its followers: the server never lets it resume its term (`enable_leader_restore: false`
//!   in `tessera_server::consensus::raft_config`).
//! - `save_vote`: returns after the vote is durable, as Raft requires.
//! - `save_committed`: kept by the writer thread and written along with other writes at most
//!   once a second (or alone after a short idle wait), without waiting; it may lag.
//! - `truncate_after`, `purge`: queued behind earlier writes without waiting. Losing them in a crash is safe: a lost committed id only means fewer entries
//!   re-applied at start (the leader commits them again), a lost truncation or purge leaves
//!   entries openraft will truncate or ignore again.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{EntryPayload, LogState, OptionalSend, RaftLogReader};
use tessera_core::Stamped;

use crate::types::{Entry, LogId, Proposal, TypeConfig, Vote};
use crate::writer::{Done, LoadedLog, META_ALONE_EPOCH, META_VOTE, Write, Writer, WriterStats};

/// The Raft log store. Cheap to clone; clones share the log (a clone is the log reader).
#[derive(Clone)]
pub struct LogStore {
    writer: Arc<Writer>,
    state: Arc<Mutex<LoadedLog>>,
}

impl LogStore {
    pub(crate) fn new(writer: Arc<Writer>, loaded: LoadedLog) -> LogStore {
        LogStore {
            writer,
            state: Arc::new(Mutex::new(loaded)),
        }
    }

    /// Counters of the store's writer thread (shared with every clone).
    pub fn stats(&self) -> WriterStats {
        self.writer.stats()
    }

    /// The commands of the log's entries after `index` (all if `None`), in log order,
    /// committed or not: what a pair host going alone applies on top of its applied ledger
    /// (see [`crate::applied_and_log_tail`]).
    pub fn proposals_after(&self, index: Option<u64>) -> Vec<Stamped> {
        let start = index.map_or(0, |i| i.saturating_add(1));
        self.state()
            .entries
            .range(start..)
            .flat_map(|(_, entry)| match &entry.payload {
                EntryPayload::Normal(Proposal(batch)) => batch.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// The log's hash chain as stored now: its head and the chain value at `at` (see
    /// [`crate::chain`]); what a sync request reports to the vendor.
    pub async fn read_chain(&self, at: Option<u64>) -> io::Result<crate::writer::ChainRead> {
        self.writer.read_chain(at).await
    }

    /// The stored entries that broke the log's hash chain when the store was opened, with
    /// why (see [`crate::chain`]). The server refuses to start with any.
    pub fn chain_breaks(&self) -> Vec<(u64, String)> {
        self.state().chain_breaks.clone()
    }

    /// Why the stored snapshot did not match its digest when the store was opened, if it
    /// did not. The server refuses to start with one.
    pub fn snapshot_break(&self) -> Option<String> {
        self.state().snapshot_break.clone()
    }

    /// The epoch of the alone journal this host began and has not seen merged (a pair host
    /// serving alone), as last made durable by [`LogStore::set_alone_epoch`].
    pub fn alone_epoch(&self) -> Option<u64> {
        self.state().alone_epoch
    }

    /// Records (durably, before it returns) that this host serves alone in `epoch`, or, with
    /// `None`, that its alone journal was merged. A journal file found missing or older than
    /// this record was deleted or put back from a copy.
    pub async fn set_alone_epoch(&self, epoch: Option<u64>) -> io::Result<()> {
        self.writer
            .write(Write::Meta {
                name: META_ALONE_EPOCH,
                value: epoch.as_ref().map(encode).transpose()?,
            })
            .await?;
        self.state().alone_epoch = epoch;
        Ok(())
    }

    /// The stored entries' commands with their log index (purged entries excepted), committed
    /// or not: what the start check verifies (see `tessera_core::Ledger::unverified_command`).
    pub fn proposal_entries(&self) -> Vec<(u64, Vec<Stamped>)> {
        self.state()
            .entries
            .iter()
            .filter_map(|(index, entry)| match &entry.payload {
                EntryPayload::Normal(Proposal(batch)) => Some((*index, batch.clone())),
                _ => None,
            })
            .collect()
    }

    /// Every entry this host's log holds (purged ones excepted), as (index, log id, digest of
    /// the whole entry): two hosts holding one log id must hold one digest (log matching).
    pub fn digests(&self) -> Vec<(u64, LogId, u64)> {
        use std::hash::{Hash, Hasher};
        self.state()
            .entries
            .iter()
            .map(|(index, entry)| {
                // SipHash with fixed keys: the same on every host and every run.
                let mut hasher = std::hash::DefaultHasher::new();
                serde_json::to_string(entry)
                    .unwrap_or_default()
                    .hash(&mut hasher);
                (*index, entry.log_id(), hasher.finish())
            })
            .collect()
    }

    fn state(&self) -> MutexGuard<'_, LoadedLog> {
        // The guarded data is only ever replaced whole or by BTreeMap operations that do not
        // panic halfway, so a poisoned lock still holds a consistent log.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn encode<T: serde::Serialize>(value: &T) -> io::Result<String> {
    serde_json::to_string(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// `range` as a half-open `[start, end)`; `None` when empty.
fn half_open(range: &impl RangeBounds<u64>) -> Option<(u64, u64)> {
    let start = match range.start_bound() {
        Bound::Included(&i) => i,
        Bound::Excluded(&i) => i.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&i) => i.saturating_add(1),
        Bound::Excluded(&i) => i,
        Bound::Unbounded => u64::MAX,
    };
    (start < end).then_some((start, end))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let Some((start, end)) = half_open(&range) else {
            return Ok(Vec::new());
        };
        Ok(self
            .state()
            .entries
            .range(start..end)
            .map(|(_, entry)| entry.clone())
            .collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.state().vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let state = self.state();
        let last_purged_log_id = state.last_purged;
        let last_log_id = state
            .entries
            .last_key_value()
            .map(|(_, entry)| entry.log_id())
            .or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.writer
            .write(Write::Meta {
                name: META_VOTE,
                value: Some(encode(vote)?),
            })
            .await?;
        self.state().vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        let value = committed.as_ref().map(encode).transpose()?;
        self.state().committed = committed;
        self.writer.save_committed(value);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.state().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let rows = entries
            .iter()
            .map(|entry| {
                serde_json::to_vec(entry)
                    .map(|json| (entry.index(), json))
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        {
            let mut state = self.state();
            for entry in entries {
                state.entries.insert(entry.index(), entry);
            }
        }
        self.writer
            .submit(Write::Append(rows), Done::Flushed(callback));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let first_removed = last_log_id.map_or(0, |log_id| log_id.index() + 1);
        drop(self.state().entries.split_off(&first_removed));
        self.writer
            .submit(Write::TruncateFrom(first_removed), Done::Nothing);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let last_purged = encode(&log_id)?;
        {
            let mut state = self.state();
            let kept = state.entries.split_off(&(log_id.index() + 1));
            state.entries = kept;
            state.last_purged = Some(log_id);
        }
        self.writer.submit(
            Write::PurgeUpTo {
                index: log_id.index(),
                last_purged,
            },
            Done::Nothing,
        );
        Ok(())
    }
}
