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
//! fsync: the thread keeps the newest one and writes it with the next transaction, or alone
//! after [`COMMITTED_DEFER_MS`] without other writes. openraft saves it after every commit, so
//! writing it at once cost about one extra transaction per three batches of entries.

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
use crate::schema;
use crate::types::{Entry, LogId, SnapshotMeta, TypeConfig, Vote};

/// Upper bound on the writes merged into one transaction, so one commit stays short.
pub const BATCH_OPS_MAX: usize = 4096;
/// Longest time the newest committed log id waits for a transaction to ride along with.
pub const COMMITTED_DEFER_MS: u64 = 50;
/// Purged log rows deleted per transaction. A purge after a snapshot covers ~12,000 entries;
/// deleted at once it held the writer (and every append waiting behind it) for 15–35 ms. The
/// rows go in chunks instead, with the following transactions or when the queue is empty.
pub const PURGE_ROWS_PER_TRANSACTION: usize = 256;

/// Keys of `raft_meta`.
pub(crate) const META_VOTE: &str = "vote";
pub(crate) const META_COMMITTED: &str = "committed";
pub(crate) const META_LAST_PURGED: &str = "last_purged";

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
    /// Records the last purged log id; the entries up to it are deleted in chunks
    /// ([`PURGE_ROWS_PER_TRANSACTION`]) by this and later transactions. Rows left at or
    /// below the last purged id (after a crash mid-way) are skipped on load and deleted.
    PurgeUpTo { index: u64, last_purged: String },
    /// Replaces the stored snapshot.
    Snapshot { meta: String, data: Vec<u8> },
}

/// Whom to tell once the write is durable (or failed).
pub(crate) enum Done {
    Flushed(IOFlushed<TypeConfig>),
    Reply(oneshot::Sender<Result<(), String>>),
    Nothing,
}

impl Done {
    fn notify(self, result: &Result<(), String>) {
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
    /// The committed log id as JSON (`None`: none), written with the next transaction.
    Committed(Option<String>),
    LoadSnapshot(oneshot::Sender<Result<Option<StoredSnapshot>, String>>),
}

/// What the database held when it was opened.
pub(crate) struct Loaded {
    pub log: LoadedLog,
    pub snapshot_meta: Option<SnapshotMeta>,
    /// Rows at or below this index are purged but still stored (skipped in `log`).
    pub purge_pending: Option<u64>,
}

#[derive(Default)]
pub(crate) struct LoadedLog {
    pub vote: Option<Vote>,
    pub committed: Option<LogId>,
    pub last_purged: Option<LogId>,
    pub entries: BTreeMap<u64, Entry>,
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
    Inline(std::sync::Mutex<Connection>),
    /// After the drop began: the thread was told to finish.
    Stopped,
}

impl Writer {
    /// Opens the database at `path`, migrates it, reads what it holds, and starts the thread.
    pub(crate) fn open(path: &Path, inline: bool) -> Result<(Writer, Loaded), StoreError> {
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
            // A simulation: finish an interrupted purge at once.
            if let Some(index) = loaded.purge_pending {
                conn.execute(
                    "DELETE FROM raft_log WHERE log_index <= ?1",
                    [sql_index(index)],
                )?;
            }
            return Ok((
                Writer {
                    stats: WriterStats::default(),
                    mode: Mode::Inline(std::sync::Mutex::new(conn)),
                },
                loaded,
            ));
        }
        let purge_pending = loaded.purge_pending;
        let (tx, rx) = mpsc::channel();
        let stats = WriterStats::default();
        let thread_stats = stats.clone();
        let thread = thread::Builder::new()
            .name("tessera-store-writer".into())
            .spawn(move || run(conn, rx, thread_stats, purge_pending))
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
                    done.notify(&Err(StoreError::WriterStopped.to_string()));
                }
            }
            Mode::Inline(conn) => {
                let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
                let result = commit(&mut conn, std::iter::once(&write), &mut None, None)
                    .map_err(|e| e.to_string());
                if result.is_ok() {
                    self.stats.record(1);
                }
                done.notify(&result);
            }
            Mode::Stopped => done.notify(&Err(StoreError::WriterStopped.to_string())),
        }
    }

    /// Saves the committed log id (JSON) with the next transaction, without waiting; a crash
    /// may lose it (see the module docs).
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
        let (reply, rx) = oneshot::channel();
        self.submit(write, Done::Reply(reply));
        rx.await
            .map_err(|_| io::Error::from(StoreError::WriterStopped))?
            .map_err(io::Error::other)
    }

    /// Reads the stored snapshot (meta JSON, data), after every write queued before it.
    pub(crate) async fn load_snapshot(&self) -> io::Result<Option<StoredSnapshot>> {
        let tx = match &self.mode {
            Mode::Thread { tx, .. } => tx,
            Mode::Inline(conn) => {
                let conn = conn.lock().unwrap_or_else(|e| e.into_inner());
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
        entries: BTreeMap::new(),
    };
    let purged_index = log.last_purged.as_ref().map(|log_id| log_id.index());
    let purge_pending: Option<u64> = match purged_index {
        Some(index) => conn
            .query_row(
                "SELECT 1 FROM raft_log WHERE log_index <= ?1 LIMIT 1",
                [sql_index(index)],
                |_| Ok(index),
            )
            .optional()?,
        None => None,
    };
    let mut statement =
        conn.prepare("SELECT entry FROM raft_log WHERE log_index > ?1 ORDER BY log_index")?;
    let mut rows = statement.query([purged_index.map_or(-1, sql_index)])?;
    while let Some(row) = rows.next()? {
        let json: Vec<u8> = row.get(0)?;
        let entry: Entry = serde_json::from_slice(&json)?;
        log.entries.insert(entry.index(), entry);
    }
    let snapshot_meta: Option<String> = conn
        .query_row("SELECT meta FROM raft_snapshot WHERE id = 1", [], |row| {
            row.get(0)
        })
        .optional()?;
    Ok(Loaded {
        log,
        snapshot_meta: decode(snapshot_meta)?,
        purge_pending,
    })
}

fn run(
    mut conn: Connection,
    rx: mpsc::Receiver<Request>,
    stats: WriterStats,
    mut purge: Option<u64>,
) {
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    // The newest committed log id not yet written.
    let mut committed: Option<Write> = None;
    loop {
        let first = if purge.is_some() {
            // Purged rows left to delete: a chunk goes with the next transaction, or alone
            // now if nothing is queued. Stopping does not wait for them: they are skipped on
            // load and deleted after the next start.
            match rx.try_recv() {
                Ok(request) => Some(request),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => break,
            }
        } else if committed.is_some() {
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
            }
            next = if writes.len() < BATCH_OPS_MAX {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !writes.is_empty() || waited_out {
            write_batch(&mut conn, &stats, &mut writes, committed.take(), &mut purge);
        }
        for reply in reads.drain(..) {
            let _ = reply.send(read_snapshot(&conn));
        }
    }
    if committed.is_some() {
        write_batch(&mut conn, &stats, &mut writes, committed.take(), &mut None);
    }
}

/// Commits `writes` (and the deferred committed log id) in one transaction and tells each
/// writer.
fn write_batch(
    conn: &mut Connection,
    stats: &WriterStats,
    writes: &mut Vec<(Write, Done)>,
    committed: Option<Write>,
    purge: &mut Option<u64>,
) {
    let result = commit(
        conn,
        writes
            .iter()
            .map(|(write, _)| write)
            .chain(committed.as_ref()),
        purge,
        Some(PURGE_ROWS_PER_TRANSACTION),
    )
    .map_err(|e| e.to_string());
    match &result {
        Ok(()) => stats.record((writes.len() + usize::from(committed.is_some())) as u64),
        Err(message) => {
            if writes.is_empty() {
                tracing::error!(%message, "storage write failed (committed log id or purge)");
            }
            // Not retried in a loop: purged rows left are skipped on load, and deleted by the
            // next purge or after a restart.
            *purge = None;
        }
    }
    for (_, done) in writes.drain(..) {
        done.notify(&result);
    }
}

fn read_snapshot(conn: &Connection) -> Result<Option<StoredSnapshot>, String> {
    conn.query_row(
        "SELECT meta, data FROM raft_snapshot WHERE id = 1",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )
    .optional()
    .map_err(|e| e.to_string())
}

/// SQLite integers are i64; Raft log indexes never get near 2^63.
fn sql_index(index: u64) -> i64 {
    i64::try_from(index).unwrap_or(i64::MAX)
}

/// Runs the writes in order in one transaction, then deletes purged rows: `purge` is the
/// index at or below which rows remain to be deleted (a purge in `writes` raises it); at most
/// `chunk` rows go (all without a chunk), and `purge` becomes `None` once none remain. It
/// changes only if the transaction commits.
fn commit<'a>(
    conn: &mut Connection,
    writes: impl Iterator<Item = &'a Write>,
    purge: &mut Option<u64>,
    chunk: Option<usize>,
) -> rusqlite::Result<()> {
    let mut purge_to = *purge;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for write in writes {
        match write {
            Write::Append(entries) => {
                let mut insert = tx.prepare_cached(
                    "INSERT OR REPLACE INTO raft_log (log_index, entry) VALUES (?1, ?2)",
                )?;
                for (index, json) in entries {
                    insert.execute(params![sql_index(*index), json])?;
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
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO raft_meta (name, value) VALUES (?1, ?2)",
                )?
                .execute(params![META_LAST_PURGED, last_purged])?;
                purge_to = purge_to.max(Some(*index));
            }
            Write::Snapshot { meta, data } => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO raft_snapshot (id, meta, data) VALUES (1, ?1, ?2)",
                )?
                .execute(params![meta, data])?;
            }
        }
    }
    if let Some(index) = purge_to {
        let done = match chunk {
            Some(rows) => {
                let deleted = tx
                    .prepare_cached(
                        "DELETE FROM raft_log WHERE log_index IN \
                         (SELECT log_index FROM raft_log WHERE log_index <= ?1 \
                          ORDER BY log_index LIMIT ?2)",
                    )?
                    .execute(params![sql_index(index), rows as i64])?;
                deleted < rows
            }
            None => {
                tx.prepare_cached("DELETE FROM raft_log WHERE log_index <= ?1")?
                    .execute(params![sql_index(index)])?;
                true
            }
        };
        if done {
            purge_to = None;
        }
    }
    tx.commit()?;
    *purge = purge_to;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        run(migrated(dir.path()), rx, stats.clone(), None);
        assert_eq!(flushed.try_recv().expect("append answered"), Ok(()));
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
        run(migrated(dir.path()), rx, stats.clone(), None);
        assert_eq!(stats.transactions(), 1);
        let conn = migrated(dir.path());
        assert_eq!(committed_in(&conn).as_deref(), Some("\"last\""));
    }

    fn blank_row(index: u64) -> (u64, Vec<u8>) {
        let entry: Entry = openraft::Entry {
            log_id: blank_log_id(index),
            payload: openraft::EntryPayload::Blank,
        };
        (index, serde_json::to_vec(&entry).expect("entry JSON"))
    }

    fn blank_log_id(index: u64) -> LogId {
        openraft::LogId::new(
            openraft::impls::leader_id_adv::LeaderId {
                term: 1,
                node_id: 1,
            },
            index,
        )
    }

    fn rows_in(conn: &Connection) -> (i64, i64, i64) {
        conn.query_row(
            "SELECT COUNT(*), MIN(log_index), MAX(log_index) FROM raft_log",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .expect("count rows")
    }

    /// Rows 1 to 600, then a purge up to 550 committed with `chunk`: the directory, the
    /// connection and the index of rows left to delete.
    fn purged_up_to_550(chunk: Option<usize>) -> (tempfile::TempDir, Connection, Option<u64>) {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = migrated(dir.path());
        let rows: Vec<_> = (1..=600).map(blank_row).collect();
        commit(&mut conn, [Write::Append(rows)].iter(), &mut None, None).unwrap();
        let purge_write = Write::PurgeUpTo {
            index: 550,
            last_purged: serde_json::to_string(&blank_log_id(550)).unwrap(),
        };
        let mut purge = None;
        commit(&mut conn, [purge_write].iter(), &mut purge, chunk).unwrap();
        (dir, conn, purge)
    }

    #[test]
    fn a_large_purge_is_deleted_in_chunks_and_finished_after_a_crash() {
        let (dir, conn, purge) = purged_up_to_550(Some(PURGE_ROWS_PER_TRANSACTION));
        // One chunk went with the purge's own transaction; the rest is pending.
        assert_eq!(purge, Some(550));
        assert_eq!(rows_in(&conn), (600 - 256, 257, 600));

        // A crash now: loading skips the purged rows still stored, and reports them.
        let loaded = load(&conn).unwrap();
        assert_eq!(loaded.purge_pending, Some(550));
        assert_eq!(loaded.log.entries.len(), 50);
        assert_eq!(loaded.log.entries.keys().next(), Some(&551));
        assert_eq!(
            loaded.log.last_purged.map(|id| id.index()),
            Some(550),
            "the last purged id was written with the first chunk"
        );

        // The restarted writer deletes the rest in chunks riding with the next writes; stopping
        // does not wait for the rest.
        let restart = |conn: Connection, index: u64, purge: Option<u64>| {
            let (tx, rx) = mpsc::channel();
            let (reply, mut flushed) = oneshot::channel();
            tx.send(Request::Write(
                Write::Append(vec![blank_row(index)]),
                Done::Reply(reply),
            ))
            .unwrap();
            drop(tx);
            let stats = WriterStats::default();
            run(conn, rx, stats.clone(), purge);
            assert_eq!(flushed.try_recv().expect("append answered"), Ok(()));
            assert_eq!(
                stats.transactions(),
                1,
                "no transaction of its own for a chunk"
            );
        };
        restart(conn, 601, loaded.purge_pending);
        let conn = migrated(dir.path());
        assert_eq!(rows_in(&conn), (601 - 512, 513, 601));
        let loaded = load(&conn).unwrap();
        assert_eq!(loaded.purge_pending, Some(550));
        restart(conn, 602, loaded.purge_pending);
        let conn = migrated(dir.path());
        assert_eq!(rows_in(&conn), (52, 551, 602));
        assert_eq!(load(&conn).unwrap().purge_pending, None);
    }

    #[test]
    fn without_a_chunk_size_a_purge_deletes_everything_at_once() {
        let (_dir, conn, purge) = purged_up_to_550(None);
        assert_eq!(purge, None);
        assert_eq!(rows_in(&conn), (50, 551, 600));
    }
}
