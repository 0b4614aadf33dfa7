//! The storage writer: one thread owning the SQLite write connection.
//!
//! Callers queue writes on a channel and return at once. The thread takes the first queued
//! write, then drains whatever else is queued (up to [`BATCH_OPS_MAX`]) and runs them all in
//! one transaction: one commit, one fsync of the WAL. Only after that commit does it tell
//! each caller (openraft's IO-flushed callback, or a reply channel). With many concurrent
//! clients, openraft's own batching plus this drain turn hundreds of proposals into a few
//! fsyncs. Blocking SQLite work never runs on the async runtime's threads.
//!
//! The committed log id (`Writer::save_committed`) is the one write that never needs its own
//! fsync: the thread keeps the newest one and writes it with a transaction of other writes,
//! at most once every [`COMMITTED_RIDE_EVERY_MS`], or alone after [`COMMITTED_DEFER_MS`]
//! without other writes. openraft saves it after every commit, so writing it at once cost
//! about one extra transaction per three batches of entries, and riding along with every
//! transaction one more WAL page in each. A crash loses at most the last second's progress
//! of the id: the entries after the stored one are in the log, and are applied again once
//! the group commits them again (a single voter does so before it serves).

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;

use openraft::entry::RaftEntry;
use openraft::storage::IOFlushed;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use crate::error::StoreError;
use crate::types::{Entry, LogId, SnapshotMeta, TypeConfig, Vote};
use crate::{chain, schema};

/// Upper bound on the writes merged into one transaction, so one commit stays short.
pub const BATCH_OPS_MAX: usize = 4096;
/// Longest time the newest committed log id waits for a transaction to ride along with.
pub const COMMITTED_DEFER_MS: u64 = 50;
/// Shortest time between two committed log ids written along with other writes.
pub const COMMITTED_RIDE_EVERY_MS: u64 = 1_000;

/// Keys of `raft_meta`.
pub(crate) const META_VOTE: &str = "vote";
pub(crate) const META_COMMITTED: &str = "committed";
pub(crate) const META_LAST_PURGED: &str = "last_purged";
/// The epoch of the alone journal a pair host began (`tessera_server::pair`), kept here too
/// so a journal deleted or replaced by an older copy is noticed; absent once merged.
pub(crate) const META_ALONE_EPOCH: &str = "alone_epoch";
/// The chain value of the last purged entry (hex): the `prev` of an entry appended to an
/// empty log after a purge (see [`crate::chain`]).
pub(crate) const META_CHAIN_BASE: &str = "chain_base";

/// One change to the database.
pub(crate) enum Write {
    /// Entries as (index, JSON); replaces entries at the same indexes.
    Append(Vec<(u64, Vec<u8>)>),
    /// Sets a `raft_meta` value (JSON); `None` deletes it.
    Meta {
        name: &'static str,
        value: Option<String>,
    },
    /// Deletes every entry at `index` and after.
    TruncateFrom(u64),
    /// Records the last purged log id and deletes the entries up to it, atomically.
    PurgeUpTo { index: u64, last_purged: String },
    /// Replaces the stored snapshot.
    Snapshot { meta: String, data: Vec<u8> },
}

/// A write that failed, as told to every writer whose write was in its transaction.
#[derive(Clone, Debug, thiserror::Error)]
#[error(transparent)]
pub struct WriteFailed(Arc<StoreError>);

impl From<StoreError> for WriteFailed {
    fn from(error: StoreError) -> WriteFailed {
        WriteFailed(Arc::new(error))
    }
}

impl From<rusqlite::Error> for WriteFailed {
    fn from(error: rusqlite::Error) -> WriteFailed {
        StoreError::from(error).into()
    }
}

/// Whom to tell once the write is durable (or failed).
pub(crate) enum Done {
    Flushed(IOFlushed<TypeConfig>),
    Reply(oneshot::Sender<Result<(), WriteFailed>>),
    Nothing,
}

impl Done {
    fn notify(self, result: &Result<(), WriteFailed>) {
        match self {
            Done::Flushed(callback) => {
                callback.io_completed(result.clone().map_err(io::Error::other));
            }
            Done::Reply(reply) => {
                let _ = reply.send(result.clone());
            }
            Done::Nothing => {
                if let Err(message) = result {
                    tracing::error!(%message, "storage write failed");
                }
            }
        }
    }
}

type StoredSnapshot = (String, Vec<u8>);

enum Request {
    Write(Write, Done),
    /// The committed log id as JSON (`None`: none), written with a later transaction of other
    /// writes (at most once every [`COMMITTED_RIDE_EVERY_MS`]) or alone when the writer idles.
    Committed(Option<String>),
    LoadSnapshot(oneshot::Sender<Result<Option<StoredSnapshot>, StoreError>>),
    ReadChain(Option<u64>, oneshot::Sender<Result<ChainRead, StoreError>>),
}

/// The log's hash chain as stored: the last entry's (index, chain value), and the chain
/// value at a chosen index, if that entry is still in the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChainRead {
    pub head: Option<(u64, crate::chain::Hash)>,
    pub at: Option<crate::chain::Hash>,
}

/// What the database held when it was opened.
pub(crate) struct Loaded {
    pub log: LoadedLog,
    pub snapshot_meta: Option<SnapshotMeta>,
}

#[derive(Default)]
pub(crate) struct LoadedLog {
    pub vote: Option<Vote>,
    pub committed: Option<LogId>,
    pub last_purged: Option<LogId>,
    pub alone_epoch: Option<u64>,
    pub entries: BTreeMap<u64, Entry>,
    /// Stored entries that break the log's hash chain, with why (see [`crate::chain`]).
    pub chain_breaks: Vec<(u64, String)>,
    /// Why the stored snapshot does not match its digest, if it does not.
    pub snapshot_break: Option<String>,
}

/// Counters of the writer, for metrics and for checking that group commit happens.
#[derive(Clone, Default)]
pub struct WriterStats {
    transactions: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
}

impl WriterStats {
    /// Transactions committed, i.e. fsyncs of the WAL.
    pub fn transactions(&self) -> u64 {
        self.transactions.load(Ordering::Relaxed)
    }

    /// One transaction of `writes` writes committed.
    fn record(&self, writes: u64) {
        self.transactions.fetch_add(1, Ordering::Relaxed);
        self.writes.fetch_add(writes, Ordering::Relaxed);
    }

    /// Writes (appends, vote/committed saves, truncations, purges, snapshots) committed.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

/// Handle to the writer thread. Dropping the last handle lets the thread finish the queued
/// writes, close the connection and exit; the drop waits for that, so the file can be
/// reopened right after.
pub struct Writer {
    stats: WriterStats,
    mode: Mode,
}

/// Where writes run.
enum Mode {
    /// On the writer thread, which owns the connection.
    Thread {
        tx: mpsc::Sender<Request>,
        thread: thread::JoinHandle<()>,
    },
    /// Simulations only ([`crate::StoreOptions::inline`]): on the caller's thread.
    Inline(Arc<Inline>),
    /// After the drop began: the thread was told to finish.
    Stopped,
}

impl Writer {
    /// Opens the database at `path`, migrates it, reads what it holds, and starts the thread.
    pub(crate) fn open(
        path: &Path,
        options: crate::StoreOptions,
    ) -> Result<(Writer, Loaded), StoreError> {
        let inline = options.inline;
        let mut conn = Connection::open(path)?;
        // Only this connection ever opens the file: exclusive locking keeps SQLite's WAL index
        // in this process's memory instead of a shared-memory file locked at every
        // transaction, and a second process pointed at the same data directory cannot write.
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, "SQLite refused WAL journal mode");
        }
        // FULL: every commit fsyncs the WAL, so an acknowledged entry survives power loss.
        // Inline (a simulation, where processes never really die): no fsync.
        let synchronous = if inline { "OFF" } else { "FULL" };
        conn.pragma_update(None, "synchronous", synchronous)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        schema::migrate(&mut conn)?;
        let loaded = load(&conn)?;
        if inline {
            let stats = WriterStats::default();
            return Ok((
                Writer {
                    stats: stats.clone(),
                    mode: Mode::Inline(Arc::new(Inline {
                        conn: std::sync::Mutex::new(conn),
                        pending: std::sync::Mutex::new(std::collections::VecDeque::new()),
                        next: AtomicU64::new(0),
                        unflushed_for: options.unflushed_for,
                        stats,
                    })),
                },
                loaded,
            ));
        }
        let slow_disk = options.slow_disk;
        let (tx, rx) = mpsc::channel();
        let stats = WriterStats::default();
        let thread_stats = stats.clone();
        let thread = thread::Builder::new()
            .name("tessera-store-writer".into())
            .spawn(move || {
                run(
                    conn,
                    rx,
                    thread_stats,
                    std::time::Duration::from_millis(COMMITTED_RIDE_EVERY_MS),
                    slow_disk,
                )
            })
            .map_err(StoreError::Spawn)?;
        Ok((
            Writer {
                stats,
                mode: Mode::Thread { tx, thread },
            },
            loaded,
        ))
    }

    pub fn stats(&self) -> WriterStats {
        self.stats.clone()
    }

    /// Queues a write; `done` is told after the commit that contains it.
    pub(crate) fn submit(&self, write: Write, done: Done) {
        match &self.mode {
            Mode::Thread { tx, .. } => {
                if let Err(mpsc::SendError(Request::Write(_, done))) =
                    tx.send(Request::Write(write, done))
                {
                    done.notify(&Err(StoreError::WriterStopped.into()));
                }
            }
            Mode::Inline(inline) => inline.submit(write, done),
            Mode::Stopped => done.notify(&Err(StoreError::WriterStopped.into())),
        }
    }

    /// Saves the committed log id (JSON) with a later transaction, without waiting; a crash
    /// may lose up to about a second of its progress (see the module docs).
    pub(crate) fn save_committed(&self, value: Option<String>) {
        match &self.mode {
            Mode::Thread { tx, .. } => {
                if tx.send(Request::Committed(value)).is_err() {
                    tracing::error!("storage writer stopped; committed log id not saved");
                }
            }
            Mode::Inline(_) | Mode::Stopped => self.submit(
                Write::Meta {
                    name: META_COMMITTED,
                    value,
                },
                Done::Nothing,
            ),
        }
    }

    /// Queues a write and waits until it is durable.
    pub(crate) async fn write(&self, write: Write) -> io::Result<()> {
        if let Mode::Inline(inline) = &self.mode {
            // Durable before it returns, with everything queued before it.
            let (reply, mut rx) = oneshot::channel();
            inline.flush_through(u64::MAX);
            inline.commit_now(write, Done::Reply(reply));
            return rx
                .try_recv()
                .map_err(|_| io::Error::from(StoreError::WriterStopped))?
                .map_err(io::Error::other);
        }
        let (reply, rx) = oneshot::channel();
        self.submit(write, Done::Reply(reply));
        rx.await
            .map_err(|_| io::Error::from(StoreError::WriterStopped))?
            .map_err(io::Error::other)
    }

    /// Reads the log's chain head and the chain value at `at` (see [`ChainRead`]), after
    /// every write queued before it.
    pub(crate) async fn read_chain(&self, at: Option<u64>) -> io::Result<ChainRead> {
        let tx = match &self.mode {
            Mode::Thread { tx, .. } => tx,
            Mode::Inline(inline) => {
                inline.flush_through(u64::MAX);
                let conn = inline.conn.lock().unwrap_or_else(|e| e.into_inner());
                return read_chain(&conn, at).map_err(io::Error::other);
            }
            Mode::Stopped => return Err(StoreError::WriterStopped.into()),
        };
        let (reply, rx) = oneshot::channel();
        tx.send(Request::ReadChain(at, reply))
            .map_err(|_| StoreError::WriterStopped)?;
        rx.await
            .map_err(|_| io::Error::from(StoreError::WriterStopped))?
            .map_err(io::Error::other)
    }

    /// Reads the stored snapshot (meta JSON, data), after every write queued before it.
    pub(crate) async fn load_snapshot(&self) -> io::Result<Option<StoredSnapshot>> {
        let tx = match &self.mode {
            Mode::Thread { tx, .. } => tx,
            Mode::Inline(inline) => {
                let conn = inline.conn.lock().unwrap_or_else(|e| e.into_inner());
                return read_snapshot(&conn).map_err(io::Error::other);
            }
            Mode::Stopped => return Err(StoreError::WriterStopped.into()),
        };
        let (reply, rx) = oneshot::channel();
        tx.send(Request::LoadSnapshot(reply))
            .map_err(|_| StoreError::WriterStopped)?;
        rx.await
            .map_err(|_| io::Error::from(StoreError::WriterStopped))?
            .map_err(io::Error::other)
    }
}

/// The simulations' writer: writes run on the caller's thread, at once or, with
/// [`crate::StoreOptions::unflushed_for`], after a delay during which a crash loses them.
pub(crate) struct Inline {
    conn: std::sync::Mutex<Connection>,
    /// Writes queued and not yet durable, in order, each with its sequence number.
    pending: std::sync::Mutex<std::collections::VecDeque<(u64, Write, Done)>>,
    next: AtomicU64,
    unflushed_for: Option<std::time::Duration>,
    stats: WriterStats,
}

impl Inline {
    fn submit(self: &Arc<Self>, write: Write, done: Done) {
        let Some(delay) = self.unflushed_for else {
            return self.commit_now(write, done);
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return self.commit_now(write, done);
        };
        let sequence = {
            // Numbered under the lock, so the queue is always in sequence order.
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let sequence = self.next.fetch_add(1, Ordering::Relaxed);
            pending.push_back((sequence, write, done));
            sequence
        };
        // A crash drops the store (and this task with the host's runtime): what is still
        // pending then is lost, never written.
        let inline = Arc::downgrade(self);
        runtime.spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(inline) = inline.upgrade() {
                inline.flush_through(sequence);
            }
        });
    }

    /// Makes every pending write up to `sequence` durable, in order.
    fn flush_through(&self, sequence: u64) {
        loop {
            let next = {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                match pending.front() {
                    Some((s, _, _)) if *s <= sequence => pending.pop_front(),
                    _ => None,
                }
            };
            let Some((_, write, done)) = next else { return };
            self.commit_now(write, done);
        }
    }

    fn commit_now(&self, write: Write, done: Done) {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let result = commit(&mut conn, std::iter::once(&write)).map_err(WriteFailed::from);
        if result.is_ok() {
            self.stats.record(1);
        }
        done.notify(&result);
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Dropping the sender ends the thread's loop once the queue is written.
        if let Mode::Thread { tx, thread } = std::mem::replace(&mut self.mode, Mode::Stopped) {
            drop(tx);
            if thread.join().is_err() {
                tracing::error!("storage writer thread panicked");
            }
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(json: Option<String>) -> Result<Option<T>, StoreError> {
    Ok(json.map(|json| serde_json::from_str(&json)).transpose()?)
}

fn load(conn: &Connection) -> Result<Loaded, StoreError> {
    let meta = |name: &str| -> Result<Option<String>, StoreError> {
        Ok(conn
            .query_row(
                "SELECT value FROM raft_meta WHERE name = ?1",
                [name],
                |row| row.get(0),
            )
            .optional()?)
    };
    let mut log = LoadedLog {
        vote: decode(meta(META_VOTE)?)?,
        committed: decode(meta(META_COMMITTED)?)?,
        last_purged: decode(meta(META_LAST_PURGED)?)?,
        alone_epoch: decode(meta(META_ALONE_EPOCH)?)?,
        entries: BTreeMap::new(),
        chain_breaks: Vec::new(),
        snapshot_break: snapshot_break(conn, true)?,
    };
    let mut walk = chain::Walk::default();
    let mut statement =
        conn.prepare("SELECT log_index, entry, prev, chain FROM raft_log ORDER BY log_index")?;
    let mut rows = statement.query([])?;
    while let Some(row) = rows.next()? {
        let index: i64 = row.get(0)?;
        let json = blob(row, 1)?.unwrap_or_default();
        walk.row(
            u64::try_from(index).unwrap_or(0),
            json,
            blob(row, 2)?,
            blob(row, 3)?,
        );
        let entry: Entry = serde_json::from_slice(json)?;
        log.entries.insert(entry.index(), entry);
    }
    log.chain_breaks = walk
        .breaks
        .into_iter()
        .map(|(index, why)| (index, why.to_string()))
        .collect();
    let snapshot_meta: Option<String> = conn
        .query_row("SELECT meta FROM raft_snapshot WHERE id = 1", [], |row| {
            row.get(0)
        })
        .optional()?;
    Ok(Loaded {
        log,
        snapshot_meta: decode(snapshot_meta)?,
    })
}

fn run(
    mut conn: Connection,
    rx: mpsc::Receiver<Request>,
    stats: WriterStats,
    ride_every: std::time::Duration,
    slow_disk: Option<std::time::Duration>,
) {
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    let mut chain_reads = Vec::new();
    // The newest committed log id not yet written.
    let mut committed: Option<Write> = None;
    // When a committed log id last rode along with other writes.
    let mut ridden_at: Option<std::time::Instant> = None;
    loop {
        let first = if committed.is_some() {
            match rx.recv_timeout(std::time::Duration::from_millis(COMMITTED_DEFER_MS)) {
                Ok(request) => Some(request),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(request) => Some(request),
                Err(mpsc::RecvError) => break,
            }
        };
        let waited_out = first.is_none();
        if let Some(delay) = slow_disk.filter(|_| !waited_out) {
            thread::sleep(delay);
        }
        let mut next = first;
        while let Some(request) = next {
            match request {
                Request::Write(write, done) => writes.push((write, done)),
                Request::Committed(value) => {
                    committed = Some(Write::Meta {
                        name: META_COMMITTED,
                        value,
                    });
                }
                Request::LoadSnapshot(reply) => reads.push(reply),
                Request::ReadChain(at, reply) => chain_reads.push((at, reply)),
            }
            next = if writes.len() < BATCH_OPS_MAX {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if waited_out {
            write_batch(&mut conn, &stats, &mut writes, committed.take());
        } else if !writes.is_empty() {
            let ride = committed.is_some() && ridden_at.is_none_or(|at| at.elapsed() >= ride_every);
            if ride {
                ridden_at = Some(std::time::Instant::now());
            }
            write_batch(
                &mut conn,
                &stats,
                &mut writes,
                if ride { committed.take() } else { None },
            );
        }
        for reply in reads.drain(..) {
            let _ = reply.send(read_snapshot(&conn));
        }
        for (at, reply) in chain_reads.drain(..) {
            let _ = reply.send(read_chain(&conn, at));
        }
    }
    if committed.is_some() {
        write_batch(&mut conn, &stats, &mut writes, committed.take());
    }
}

/// Commits `writes` (and the deferred committed log id) in one transaction and tells each
/// writer.
fn write_batch(
    conn: &mut Connection,
    stats: &WriterStats,
    writes: &mut Vec<(Write, Done)>,
    committed: Option<Write>,
) {
    let result = commit(
        conn,
        writes
            .iter()
            .map(|(write, _)| write)
            .chain(committed.as_ref()),
    )
    .map_err(WriteFailed::from);
    match &result {
        Ok(()) => stats.record((writes.len() + usize::from(committed.is_some())) as u64),
        Err(message) if writes.is_empty() => {
            tracing::error!(%message, "storage write failed (committed log id)");
        }
        Err(_) => {}
    }
    for (_, done) in writes.drain(..) {
        done.notify(&result);
    }
}

fn read_chain(conn: &Connection, at: Option<u64>) -> Result<ChainRead, StoreError> {
    let hash =
        |bytes: Option<Vec<u8>>| bytes.and_then(|b| chain::Hash::try_from(b.as_slice()).ok());
    let head = conn
        .query_row(
            "SELECT log_index, chain FROM raft_log ORDER BY log_index DESC LIMIT 1",
            [],
            |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Option<Vec<u8>>>(1)?)),
        )
        .optional()?
        .and_then(|(index, chain)| Some((u64::try_from(index).ok()?, hash(chain)?)));
    let at = match at {
        Some(index) => conn
            .query_row(
                "SELECT chain FROM raft_log WHERE log_index = ?1",
                params![sql_index(index)],
                |row| row.get::<_, Option<Vec<u8>>>(0),
            )
            .optional()?
            .and_then(hash),
        None => None,
    };
    Ok(ChainRead { head, at })
}

fn read_snapshot(conn: &Connection) -> Result<Option<StoredSnapshot>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT meta, data FROM raft_snapshot WHERE id = 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?)
}

/// Why the stored snapshot does not match its digest (`None`: it does, or there is none).
/// `digested`: the schema has the digest column (a store not yet migrated has none to check).
fn snapshot_break(conn: &Connection, digested: bool) -> Result<Option<String>, StoreError> {
    if !digested {
        return Ok(None);
    }
    let row: Option<(String, Vec<u8>, Option<Vec<u8>>)> = conn
        .query_row(
            "SELECT meta, data, digest FROM raft_snapshot WHERE id = 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .optional()?;
    Ok(row.and_then(|(meta, data, digest)| match digest {
        None => Some("the snapshot has no digest: it was put there by hand".to_string()),
        Some(digest) if digest.as_slice() != chain::snapshot_digest(&meta, &data).as_slice() => {
            Some(
                "the snapshot does not match its digest: it was edited after it was written"
                    .to_string(),
            )
        }
        Some(_) => None,
    }))
}

/// A BLOB (or TEXT) column, borrowed; `None` when NULL or of another type.
fn blob<'r>(row: &'r rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Option<&'r [u8]>> {
    use rusqlite::types::ValueRef;
    Ok(match row.get_ref(index)? {
        ValueRef::Blob(bytes) | ValueRef::Text(bytes) => Some(bytes),
        _ => None,
    })
}

/// SQLite integers are i64; Raft log indexes never get near 2^63.
fn sql_index(index: u64) -> i64 {
    i64::try_from(index).unwrap_or(i64::MAX)
}

/// The `prev` of an entry appended at `index`: the chain value of the entry before it, or,
/// with no entry there (the log was purged or is empty), the chain base, or the genesis.
fn chain_before(tx: &rusqlite::Transaction<'_>, index: u64) -> rusqlite::Result<chain::Hash> {
    let before: Option<Vec<u8>> = match index.checked_sub(1) {
        Some(before) => tx
            .prepare_cached("SELECT chain FROM raft_log WHERE log_index = ?1")?
            .query_row(params![sql_index(before)], |row| row.get(0))
            .optional()?
            .flatten(),
        None => None,
    };
    let base = match before {
        Some(chain) => Some(chain),
        None => tx
            .prepare_cached("SELECT value FROM raft_meta WHERE name = ?1")?
            .query_row(params![META_CHAIN_BASE], |row| row.get::<_, String>(0))
            .optional()?
            .and_then(|text| hex::decode(text).ok()),
    };
    Ok(base
        .and_then(|bytes| chain::Hash::try_from(bytes.as_slice()).ok())
        .unwrap_or(chain::GENESIS))
}

/// Runs the writes in order in one transaction.
fn commit<'a>(
    conn: &mut Connection,
    writes: impl Iterator<Item = &'a Write>,
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for write in writes {
        match write {
            Write::Append(entries) => {
                let mut insert = tx.prepare_cached(
                    "INSERT OR REPLACE INTO raft_log (log_index, entry, prev, chain) VALUES (?1, ?2, ?3, ?4)",
                )?;
                let mut last: Option<(u64, chain::Hash)> = None;
                for (index, json) in entries {
                    let prev = match last {
                        Some((at, chain)) if at + 1 == *index => chain,
                        _ => chain_before(&tx, *index)?,
                    };
                    let chain = chain::link(&prev, *index, json);
                    insert.execute(params![
                        sql_index(*index),
                        json,
                        prev.as_slice(),
                        chain.as_slice()
                    ])?;
                    last = Some((*index, chain));
                }
            }
            Write::Meta {
                name,
                value: Some(value),
            } => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO raft_meta (name, value) VALUES (?1, ?2)",
                )?
                .execute(params![name, value])?;
            }
            Write::Meta { name, value: None } => {
                tx.prepare_cached("DELETE FROM raft_meta WHERE name = ?1")?
                    .execute(params![name])?;
            }
            Write::TruncateFrom(index) => {
                tx.prepare_cached("DELETE FROM raft_log WHERE log_index >= ?1")?
                    .execute(params![sql_index(*index)])?;
            }
            Write::PurgeUpTo { index, last_purged } => {
                let base: Option<Vec<u8>> = tx
                    .prepare_cached("SELECT chain FROM raft_log WHERE log_index = ?1")?
                    .query_row(params![sql_index(*index)], |row| row.get(0))
                    .optional()?
                    .flatten();
                if let Some(base) = base {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO raft_meta (name, value) VALUES (?1, ?2)",
                    )?
                    .execute(params![META_CHAIN_BASE, hex::encode(base)])?;
                }
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO raft_meta (name, value) VALUES (?1, ?2)",
                )?
                .execute(params![META_LAST_PURGED, last_purged])?;
                tx.prepare_cached("DELETE FROM raft_log WHERE log_index <= ?1")?
                    .execute(params![sql_index(*index)])?;
            }
            Write::Snapshot { meta, data } => {
                let digest = chain::snapshot_digest(meta, data);
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO raft_snapshot (id, meta, data, digest) VALUES (1, ?1, ?2, ?3)",
                )?
                .execute(params![meta, data, digest.as_slice()])?;
            }
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

    fn migrated(dir: &Path) -> Connection {
        let mut conn = Connection::open(dir.join("raft.sqlite")).expect("open");
        schema::migrate(&mut conn).expect("migrate");
        conn
    }

    fn committed_in(conn: &Connection) -> Option<String> {
        conn.query_row(
            "SELECT value FROM raft_meta WHERE name = ?1",
            [META_COMMITTED],
            |row| row.get(0),
        )
        .optional()
        .expect("read committed")
    }

    #[test]
    fn the_committed_id_rides_with_the_next_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::channel();
        let (reply, mut flushed) = oneshot::channel();
        tx.send(Request::Committed(Some("\"old\"".into()))).unwrap();
        tx.send(Request::Committed(Some("\"new\"".into()))).unwrap();
        tx.send(Request::Write(
            Write::Append(vec![(1, b"{}".to_vec())]),
            Done::Reply(reply),
        ))
        .unwrap();
        drop(tx);
        let stats = WriterStats::default();
        run(migrated(dir.path()), rx, stats.clone(), HOUR, None);
        assert!(flushed.try_recv().expect("append answered").is_ok());
        // One transaction for the append and the newest committed id, none of its own.
        assert_eq!((stats.transactions(), stats.writes()), (1, 2));
        let conn = migrated(dir.path());
        assert_eq!(committed_in(&conn).as_deref(), Some("\"new\""));
    }

    #[test]
    fn a_committed_id_without_other_writes_is_written_before_the_writer_stops() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::channel();
        tx.send(Request::Committed(Some("\"last\"".into())))
            .unwrap();
        drop(tx);
        let stats = WriterStats::default();
        run(migrated(dir.path()), rx, stats.clone(), HOUR, None);
        assert_eq!(stats.transactions(), 1);
        let conn = migrated(dir.path());
        assert_eq!(committed_in(&conn).as_deref(), Some("\"last\""));
    }

    /// Two transactions in a row (the writer takes at most BATCH_OPS_MAX writes at once), each
    /// with a new committed id queued before it; returns (transactions, writes, stored id).
    fn two_transactions_with_committed_ids(ride_every: std::time::Duration) -> (u64, u64, String) {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::channel();
        let append = |index: u64| {
            Request::Write(Write::Append(vec![(index, b"{}".to_vec())]), Done::Nothing)
        };
        tx.send(Request::Committed(Some("\"first\"".into())))
            .unwrap();
        for index in 1..=BATCH_OPS_MAX as u64 {
            tx.send(append(index)).unwrap();
        }
        tx.send(Request::Committed(Some("\"second\"".into())))
            .unwrap();
        tx.send(append(BATCH_OPS_MAX as u64 + 1)).unwrap();
        drop(tx);
        let stats = WriterStats::default();
        run(migrated(dir.path()), rx, stats.clone(), ride_every, None);
        let conn = migrated(dir.path());
        (
            stats.transactions(),
            stats.writes(),
            committed_in(&conn).expect("a committed id"),
        )
    }

    #[test]
    fn a_committed_id_rides_along_at_most_once_per_interval_and_is_kept_until_the_stop() {
        let all = BATCH_OPS_MAX as u64 + 1;
        // Within the interval the second transaction goes without the id, which is written
        // alone at the stop.
        assert_eq!(
            two_transactions_with_committed_ids(HOUR),
            (3, all + 2, "\"second\"".to_string())
        );
        // Once the interval has passed (here: at once), the id rides along again.
        assert_eq!(
            two_transactions_with_committed_ids(std::time::Duration::ZERO),
            (2, all + 2, "\"second\"".to_string())
        );
    }
}

/// What a stopped server's store holds, read without changing it (`tessera doctor`).
#[derive(Debug, Default)]
pub struct Inspection {
    /// The stored snapshot's ledger (JSON), if any.
    pub snapshot: Option<Vec<u8>>,
    /// Every stored entry's commands with its log index (membership entries excepted).
    pub entries: Vec<(u64, Vec<tessera_core::Stamped>)>,
    /// Entries that do not even parse, with why (the server does not start with one).
    pub unreadable: Vec<(u64, String)>,
    /// Entries that break the log's hash chain, with why (the server does not start with
    /// one either).
    pub chain_breaks: Vec<(u64, String)>,
    /// Why the snapshot does not match its digest, if it does not (nor with this).
    pub snapshot_break: Option<String>,
    /// The last log index the snapshot holds.
    pub snapshot_index: Option<u64>,
    /// The last log index known committed.
    pub committed_index: Option<u64>,
}

/// Reads the store in the SQLite file at `path` read-only: no migration, no writer thread.
pub fn inspect(path: &Path) -> Result<Inspection, StoreError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut inspection = Inspection {
        snapshot: conn
            .query_row("SELECT data FROM raft_snapshot WHERE id = 1", [], |row| {
                row.get(0)
            })
            .optional()?,
        ..Inspection::default()
    };
    // A store not yet migrated to the chain (written by an older Tessera) has none to check.
    let version: u32 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let chained = version >= 2;
    let mut walk = chain::Walk::default();
    let mut statement = conn.prepare(if chained {
        "SELECT log_index, entry, prev, chain FROM raft_log ORDER BY log_index"
    } else {
        "SELECT log_index, entry, NULL, NULL FROM raft_log ORDER BY log_index"
    })?;
    let mut rows = statement.query([])?;
    while let Some(row) = rows.next()? {
        let (index, json): (i64, Vec<u8>) = (row.get(0)?, row.get(1)?);
        if chained {
            walk.row(index as u64, &json, blob(row, 2)?, blob(row, 3)?);
        }
        match serde_json::from_slice::<Entry>(&json) {
            Ok(entry) => {
                if let openraft::EntryPayload::Normal(crate::types::Proposal(batch)) = entry.payload
                {
                    inspection.entries.push((index as u64, batch));
                }
            }
            Err(error) => inspection
                .unreadable
                .push((index as u64, error.to_string())),
        }
    }
    inspection.chain_breaks = walk
        .breaks
        .into_iter()
        .map(|(index, why)| (index, why.to_string()))
        .collect();
    inspection.snapshot_break = snapshot_break(&conn, version >= 3)?;
    let snapshot_meta: Option<String> = conn
        .query_row("SELECT meta FROM raft_snapshot WHERE id = 1", [], |row| {
            row.get(0)
        })
        .optional()?;
    inspection.snapshot_index = decode::<crate::types::SnapshotMeta>(snapshot_meta)?
        .and_then(|meta| meta.last_log_id)
        .map(|id| id.index);
    let committed: Option<String> = conn
        .query_row(
            "SELECT value FROM raft_meta WHERE name = ?1",
            [META_COMMITTED],
            |row| row.get(0),
        )
        .optional()?;
    inspection.committed_index = decode::<LogId>(committed)?.map(|id| id.index);
    Ok(inspection)
}
