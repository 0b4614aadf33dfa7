//! Every SQLite file a Tessera server writes: the replicated log and ledger state machine
//! (`raft.sqlite3`), the usage history with its audit chain (`usage.sqlite3`) and a pair
//! host's alone journal (`pair-alone.sqlite3`). The server itself opens no database.
//!
//! Everything that changes the ledger is an entry of an openraft log; this crate stores that
//! log durably and applies committed entries to the pure [`tessera_core::Ledger`].
//!
//! # Layout
//! - [`types`]: the openraft type configuration ([`TypeConfig`]) and the log payload
//!   ([`Proposal`]: a batch of stamped commands) / response (`Option<Vec<Applied>>`) types.
//! - [`schema`]: the one migration runner, for the files under `migrations/<database>/`,
//!   applied in order and tracked by `PRAGMA user_version`.
//! - [`writer`]: the one thread that owns the SQLite write connection. It drains every queued
//!   write into one transaction, so concurrent appends share one fsync (group commit).
//! - [`log_store`]: [`LogStore`], openraft's `RaftLogStorage` + `RaftLogReader`. The log tail
//!   is mirrored in memory (bounded by the snapshot policy), so reads never touch SQLite.
//! - [`state_machine`]: [`LedgerStateMachine`], openraft's `RaftStateMachine` + snapshot
//!   builder; the ledger lives in memory and [`LedgerReader`] reads it without Raft.
//! - [`chain`]: the hash chain through the log, written with every entry and checked at
//!   every open (tamper evidence).
//! - [`history`]: the usage history, notifications and the audit chain (`usage.sqlite3`),
//!   written by their own gathering writer thread; [`audit`]: the chain's rules and checks.
//! - [`journal`]: a pair host's alone journal, hash-chained, written (fsync) before each
//!   answer.
//! - [`error`]: [`StoreError`], the log's error type.
//!
//! # Durability model
//! The log and the vote are durable (WAL, `synchronous=FULL`); the committed log id is
//! written lazily and may lag by about a second. The state machine is in memory; snapshots
//! are durable. On start openraft installs the stored snapshot and re-applies the entries
//! after it up to the stored committed id (see `save_committed`); the rest of the log waits
//! until the group commits it again, which a restarted single voter does before it serves
//! anything, so it comes back with the same ledger.

pub mod audit;
pub mod chain;
pub mod error;
pub mod history;
pub mod journal;
pub mod log_store;
pub mod schema;
pub mod state_machine;
pub mod types;
pub mod writer;

use std::path::Path;
use std::sync::Arc;

use tessera_core::{Ledger, LedgerConfig, Stamped};

pub use error::StoreError;
pub use log_store::LogStore;
pub use state_machine::{LedgerReader, LedgerStateMachine, SnapshotSignal};
pub use types::{Proposal, Response, TypeConfig};
pub use writer::{ChainRead, Inspection, WriterStats, inspect};

/// Build a snapshot after this many applied entries since the last one; the log entries it
/// covers are then purged, which bounds both the SQLite log and its in-memory mirror.
/// A snapshot of a million leases takes about a second to write, during which applying
/// waits; 50,000 entries (a few MiB of log, well under a second to replay) keeps that rare.
pub const SNAPSHOT_EVERY_LOGS: u64 = 50_000;

/// Also build one after this many applied commands: an entry may carry many commands (see
/// [`Proposal`]), so counting entries alone would let the log, its mirror and the replay at
/// start grow with the batch size. The state machine signals it ([`SnapshotSignal`]); the
/// server asks openraft for the snapshot.
pub const SNAPSHOT_EVERY_COMMANDS: u64 = 50_000;

/// Log entries kept after a snapshot, so a briefly lagging follower can still catch up from
/// the log instead of receiving a whole snapshot.
pub const LOGS_KEPT_AFTER_SNAPSHOT: u64 = 1_000;

/// Opens (creating and migrating if needed) the store in the SQLite file at `path` and returns
/// the two halves openraft needs. Blocking: call it from `spawn_blocking` in async code.
///
/// The state machine starts empty; openraft restores it from the stored snapshot and the
/// committed log when `Raft::new` runs.
pub fn open(
    path: &Path,
    ledger: LedgerConfig,
) -> Result<(LogStore, LedgerStateMachine), StoreError> {
    open_with(path, ledger, StoreOptions::default())
}

/// How the store writes.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreOptions {
    /// Simulations only: every write runs at once on the caller's thread, without fsync, so
    /// a simulated runtime (turmoil) never waits for a thread outside its simulated time.
    /// Production uses the writer thread and fsyncs every commit.
    pub inline: bool,
    /// Tests only (a slow disk): every transaction of the writer thread waits this long
    /// before it commits, so entries stay appended but not durable for longer. The server
    /// sets it from `TESSERA_TEST_SLOW_DISK_MS` in debug builds only; release builds never do.
    pub slow_disk: Option<std::time::Duration>,
    /// Simulations only, with `inline`: a queued write becomes durable only this long
    /// (simulated time) after it was queued; until then it is held in memory, and a crash —
    /// the store dropped without that flush — loses it, as a disk loses its unflushed tail.
    /// openraft's IO-flushed callback fires only once the write is durable. Writes that are
    /// awaited (the vote, snapshots) flush everything queued before them. `None`: every inline
    /// write is durable at once.
    pub unflushed_for: Option<std::time::Duration>,
}

/// [`open`] with options.
pub fn open_with(
    path: &Path,
    ledger: LedgerConfig,
    options: StoreOptions,
) -> Result<(LogStore, LedgerStateMachine), StoreError> {
    let (writer, loaded) = writer::Writer::open(path, options)?;
    let writer = Arc::new(writer);
    let log = LogStore::new(writer.clone(), loaded.log);
    let state_machine = LedgerStateMachine::new(writer, ledger, loaded.snapshot_meta);
    Ok((log, state_machine))
}

/// What a redundant pair's host builds its alone ledger from
/// (`tessera_engine::pair::alone_ledger`): a copy of the applied ledger, and every command of
/// its log after it, committed or not (an entry it holds may have been acknowledged by the
/// other host, which it cannot ask). The replicated ledger is not touched.
pub fn applied_and_log_tail(reader: &LedgerReader, log: &LogStore) -> (Ledger, Vec<Stamped>) {
    let (ledger, applied) = reader.copy_with_index();
    (ledger, log.proposals_after(applied))
}
