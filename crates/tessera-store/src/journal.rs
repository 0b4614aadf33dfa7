//! The alone journal (`DATA/pair-alone.sqlite3`): what a host of a pair did while serving
//! alone, written (fsync) before the station gets its answer, so a host killed while alone
//! comes back with the same leases. Its presence means "this host served alone and the pair
//! has not merged it yet"; it is deleted once the host's applied ledger shows the merge of
//! its epoch (`Ledger::merged_epoch`).
//!
//! Its commands are hash-chained like the Raft log ([`crate::chain`]): each row stores
//! `prev` and `chain = SHA-256(prev || seq || command)`, and the meta row keeps the count and
//! the head, written in the transaction that appends the command. [`Journal::load`] walks the
//! chain: a command edited, deleted (in the middle or at the end) or inserted is named, and
//! the host does not serve alone until the pair has merged (docs/security.md, T11): the
//! forgotten leases would otherwise be issued again within its share.

use std::path::{Path, PathBuf};

use crate::chain::{self, Hash};
use crate::schema::{Migration, Schema, migrate_schema};
use rusqlite::{Connection, OptionalExtension, params};
use tessera_core::{Share, Stamped};

pub const JOURNAL_FILE_NAME: &str = "pair-alone.sqlite3";

pub struct Journal {
    path: PathBuf,
    conn: Connection,
    pub share: Share,
    pub epoch: u64,
    /// Commands written. They stay on disk only (read again by [`Journal::commands`] when an
    /// alone ledger is rebuilt), so a long alone period does not grow this host's memory.
    pub count: usize,
    /// The chain value of the last command (the genesis value when there is none).
    head: Hash,
}

/// Why a journal cannot be used.
#[derive(Debug)]
pub enum JournalError {
    /// SQLite or the file system failed, or a command does not parse.
    Io { path: PathBuf, detail: String },
    /// The file was edited after it was written: its hash chain or its count is broken.
    Tampered { path: PathBuf, detail: String },
}

impl JournalError {
    fn io(path: &Path, e: impl std::fmt::Display) -> JournalError {
        JournalError::Io {
            path: path.to_path_buf(),
            detail: e.to_string(),
        }
    }

    fn tampered(path: &Path, detail: String) -> JournalError {
        JournalError::Tampered {
            path: path.to_path_buf(),
            detail,
        }
    }
}

impl std::fmt::Display for JournalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JournalError::Io { path, detail } => {
                write!(f, "alone journal {}: {detail}", path.display())
            }
            JournalError::Tampered { path, detail } => write!(
                f,
                "the alone journal {} was edited after it was written ({detail})",
                path.display()
            ),
        }
    }
}

impl std::error::Error for JournalError {}

/// The journal's migrations (`migrations/journal/`), run by the store's one runner.
pub const SCHEMA: Schema = Schema {
    migrations: &[
        Migration {
            version: 1,
            name: "alone_journal",
            sql: include_str!("../migrations/journal/0001_alone_journal.sql"),
            fill: None,
        },
        Migration {
            version: 2,
            name: "chain_columns",
            sql: include_str!("../migrations/journal/0002_chain_columns.sql"),
            fill: Some(add_chain_columns),
        },
    ],
};

/// Migration 2: the chain's columns a journal written before them lacks.
fn add_chain_columns(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    for (table, column, kind) in [
        ("meta", "count", "INTEGER"),
        ("meta", "head", "BLOB"),
        ("commands", "prev", "BLOB"),
        ("commands", "chain", "BLOB"),
    ] {
        let present: i64 = tx.query_row(
            "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2",
            params![table, column],
            |row| row.get(0),
        )?;
        if present == 0 {
            tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
        }
    }
    Ok(())
}

fn open_connection(path: &Path) -> Result<Connection, JournalError> {
    let mut conn = Connection::open(path).map_err(|e| JournalError::io(path, e))?;
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
        .map_err(|e| JournalError::io(path, e))?;
    migrate_schema(&mut conn, &SCHEMA).map_err(|e| JournalError::io(path, e))?;
    Ok(conn)
}

fn share_name(share: Share) -> &'static str {
    match share {
        Share::Primary => "primary",
        Share::Backup => "backup",
    }
}

/// One stored row: seq, command text, prev, chain.
type Row = (i64, String, Option<Vec<u8>>, Option<Vec<u8>>);

fn rows(conn: &Connection, path: &Path) -> Result<Vec<Row>, JournalError> {
    let mut statement = conn
        .prepare("SELECT seq, entry, prev, chain FROM commands ORDER BY seq")
        .map_err(|e| JournalError::io(path, e))?;
    let rows = statement
        .query_map([], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .map_err(|e| JournalError::io(path, e))?;
    rows.collect::<Result<_, _>>()
        .map_err(|e| JournalError::io(path, e))
}

/// Checks the stored chain against the meta's count and head; returns the head.
fn verify(
    path: &Path,
    rows: &[Row],
    count: Option<i64>,
    head: Option<Vec<u8>>,
) -> Result<Hash, JournalError> {
    let mut walk = chain::Walk::default();
    for (expected, (seq, entry, prev, link)) in (1..).zip(rows) {
        if *seq != expected {
            return Err(JournalError::tampered(
                path,
                format!(
                    "command {seq} follows command {}: commands were deleted or inserted before it",
                    expected - 1
                ),
            ));
        }
        walk.row(
            *seq as u64,
            entry.as_bytes(),
            prev.as_deref(),
            link.as_deref(),
        );
        // The first command follows nothing.
        if *seq == 1 && prev.as_deref() != Some(chain::GENESIS.as_slice()) && walk.breaks.is_empty()
        {
            walk.breaks
                .push((1, chain::Break::Unlinked { previous: 0 }));
        }
        if let Some((at, why)) = walk.breaks.first() {
            return Err(JournalError::tampered(path, format!("command {at}: {why}")));
        }
    }
    let stored_head = head.and_then(|h| Hash::try_from(h.as_slice()).ok());
    let walked_head = walk.head().map_or(chain::GENESIS, |(_, h)| h);
    if count != Some(rows.len() as i64) {
        return Err(JournalError::tampered(
            path,
            format!(
                "it holds {} commands, but {} were written: commands were deleted or added at its end",
                rows.len(),
                count.map_or_else(|| "no count".to_string(), |c| c.to_string())
            ),
        ));
    }
    if stored_head != Some(walked_head) {
        return Err(JournalError::tampered(
            path,
            "its last command is not the one written last: commands were deleted or added at its end"
                .to_string(),
        ));
    }
    Ok(walked_head)
}

impl Journal {
    /// The journal in `data_dir`, if this host served alone and it was not merged yet. A
    /// journal whose chain is broken is [`JournalError::Tampered`], naming the command.
    pub fn load(data_dir: &Path) -> Result<Option<Journal>, JournalError> {
        let path = data_dir.join(JOURNAL_FILE_NAME);
        if !path.exists() {
            return Ok(None);
        }
        let conn = open_connection(&path)?;
        type Meta = (String, i64, Option<i64>, Option<Vec<u8>>);
        let meta: Option<Meta> = conn
            .query_row(
                "SELECT share, epoch, count, head FROM meta WHERE id = 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
            )
            .optional()
            .map_err(|e| JournalError::io(&path, e))?;
        let stored = rows(&conn, &path)?;
        let Some((share, epoch, count, head)) = meta else {
            if stored.is_empty() {
                return Ok(None);
            }
            return Err(JournalError::tampered(
                &path,
                format!(
                    "it holds {} commands but no record of its share and epoch",
                    stored.len()
                ),
            ));
        };
        let share = match share.as_str() {
            "primary" => Share::Primary,
            "backup" => Share::Backup,
            other => return Err(JournalError::io(&path, format!("unknown share {other:?}"))),
        };
        // A journal without its chain (its values cleared, or written by a version before
        // the chain: one upgraded while serving alone) is not trusted either: the host
        // serves again once the pair has merged.
        let head = verify(&path, &stored, count, head)?;
        // Every stored command must read back: a journal that does not is named at load.
        for (seq, text, _, _) in &stored {
            serde_json::from_str::<Stamped>(text)
                .map_err(|e| JournalError::io(&path, format!("command {seq}: {e}")))?;
        }
        Ok(Some(Journal {
            path,
            conn,
            share,
            epoch: epoch as u64,
            count: stored.len(),
            head,
        }))
    }

    /// `tessera doctor`'s check, on a stopped server, changing nothing: the number of
    /// commands of the journal in `data_dir` (`None`: there is none), or what is wrong.
    pub fn inspect(data_dir: &Path) -> Result<Option<usize>, JournalError> {
        let path = data_dir.join(JOURNAL_FILE_NAME);
        if !path.exists() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| JournalError::io(&path, e))?;
        let chained: i64 = conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM pragma_table_info('meta') WHERE name IN ('count', 'head'))
                      + (SELECT COUNT(*) FROM pragma_table_info('commands') WHERE name IN ('prev', 'chain'))",
                [],
                |row| row.get(0),
            )
            .map_err(|e| JournalError::io(&path, e))?;
        if chained < 4 {
            return Err(JournalError::tampered(
                &path,
                "it has no hash chain (columns removed, or written by a version before the chain)"
                    .to_string(),
            ));
        }
        let stored = rows(&conn, &path)?;
        type Meta = (Option<i64>, Option<Vec<u8>>);
        let meta: Option<Meta> = conn
            .query_row("SELECT count, head FROM meta WHERE id = 1", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()
            .map_err(|e| JournalError::io(&path, e))?;
        match meta {
            None if stored.is_empty() => Ok(None),
            None => Err(JournalError::tampered(
                &path,
                format!(
                    "it holds {} commands but no record of its share and epoch",
                    stored.len()
                ),
            )),
            Some((count, head)) => {
                verify(&path, &stored, count, head)?;
                Ok(Some(stored.len()))
            }
        }
    }

    /// The commands written, in order, read from the file.
    pub fn commands(&self) -> Result<Vec<Stamped>, JournalError> {
        let path = &self.path;
        rows(&self.conn, path)?
            .into_iter()
            .map(|(seq, text, _, _)| {
                serde_json::from_str(&text)
                    .map_err(|e| JournalError::io(path, format!("command {seq}: {e}")))
            })
            .collect()
    }

    /// Starts a journal for a new alone period (an existing one keeps its commands; its
    /// epoch moves on, so an older merge of it does not end this one).
    pub fn begin(data_dir: &Path, share: Share, epoch: u64) -> Result<Journal, JournalError> {
        let mut journal = match Journal::load(data_dir)? {
            Some(journal) => journal,
            None => {
                let path = data_dir.join(JOURNAL_FILE_NAME);
                let conn = open_connection(&path)?;
                Journal {
                    path,
                    conn,
                    share,
                    epoch,
                    count: 0,
                    head: chain::GENESIS,
                }
            }
        };
        journal.share = share;
        journal.epoch = epoch.max(journal.epoch);
        journal
            .conn
            .execute(
                "INSERT INTO meta (id, share, epoch, count, head) VALUES (1, ?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET share = ?1, epoch = ?2, count = ?3, head = ?4",
                params![
                    share_name(share),
                    journal.epoch as i64,
                    journal.count as i64,
                    journal.head.as_slice()
                ],
            )
            .map_err(|e| JournalError::io(&journal.path, e))?;
        Ok(journal)
    }

    /// Writes one command durably (before it is applied and answered), chained to the one
    /// before it, with the meta's count and head in the same transaction.
    pub fn append(&mut self, entry: &Stamped) -> Result<(), JournalError> {
        let path = &self.path;
        let text = serde_json::to_string(entry).map_err(|e| JournalError::io(path, e))?;
        let seq = self.count as u64 + 1;
        let next = chain::link(&self.head, seq, text.as_bytes());
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(|e| JournalError::io(path, e))?;
        tx.execute(
            "INSERT INTO commands (seq, entry, prev, chain) VALUES (?1, ?2, ?3, ?4)",
            params![seq as i64, text, self.head.as_slice(), next.as_slice()],
        )
        .map_err(|e| JournalError::io(path, e))?;
        tx.execute(
            "UPDATE meta SET count = ?1, head = ?2 WHERE id = 1",
            params![seq as i64, next.as_slice()],
        )
        .map_err(|e| JournalError::io(path, e))?;
        tx.commit().map_err(|e| JournalError::io(path, e))?;
        self.count += 1;
        self.head = next;
        Ok(())
    }

    /// The pair merged this host's alone state: the journal goes.
    pub fn delete(self) -> Result<(), JournalError> {
        let Journal { path, conn, .. } = self;
        // One transaction: a crash between the two leaves the journal whole, not a count
        // without its commands (which would read as an edit).
        conn.execute_batch("BEGIN; DELETE FROM commands; DELETE FROM meta; COMMIT;")
            .map_err(|e| JournalError::io(&path, e))?;
        drop(conn);
        remove_files(&path)
    }

    /// The pair merged while this host's journal could not be used (it was edited): the
    /// merge replaced it, so its file goes.
    pub fn discard(data_dir: &Path) -> Result<(), JournalError> {
        remove_files(&data_dir.join(JOURNAL_FILE_NAME))
    }
}

fn remove_files(path: &Path) -> Result<(), JournalError> {
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        if file.exists() {
            std::fs::remove_file(&file).map_err(|e| JournalError::io(&file, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Journal, JournalError};
    use rusqlite::Connection;
    use tessera_core::{Command, Share, Stamped};

    fn entry(n: i64) -> Stamped {
        Stamped {
            at_ms: n,
            command: Command::Checkin {
                lease_id: format!("l{n}"),
            },
        }
    }

    #[test]
    fn a_journal_survives_reopening_and_a_new_period_keeps_its_commands() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Journal::load(dir.path()).unwrap().is_none());
        let mut journal = Journal::begin(dir.path(), Share::Backup, 5).unwrap();
        journal.append(&entry(10)).unwrap();
        drop(journal);
        let journal = Journal::load(dir.path()).unwrap().unwrap();
        assert_eq!((journal.share, journal.epoch), (Share::Backup, 5));
        assert_eq!(journal.commands().unwrap(), vec![entry(10)]);
        assert_eq!(journal.count, 1);
        drop(journal);
        let mut journal = Journal::begin(dir.path(), Share::Backup, 9).unwrap();
        assert_eq!(journal.epoch, 9);
        journal.append(&entry(11)).unwrap();
        drop(journal);
        let journal = Journal::load(dir.path()).unwrap().unwrap();
        assert_eq!(journal.commands().unwrap(), vec![entry(10), entry(11)]);
        assert_eq!(Journal::inspect(dir.path()).unwrap(), Some(2));
        journal.delete().unwrap();
        assert!(Journal::load(dir.path()).unwrap().is_none());
        assert_eq!(Journal::inspect(dir.path()).unwrap(), None);
    }

    /// A journal of three commands, and a connection to edit it the way a root customer
    /// would with the sqlite3 shell.
    fn written() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::begin(dir.path(), Share::Backup, 3).unwrap();
        for n in 1..=3 {
            journal.append(&entry(n)).unwrap();
        }
        drop(journal);
        let conn = Connection::open(dir.path().join(super::JOURNAL_FILE_NAME)).unwrap();
        (dir, conn)
    }

    fn tampered(dir: &std::path::Path) -> String {
        let inspected = Journal::inspect(dir).unwrap_err();
        assert!(
            matches!(inspected, JournalError::Tampered { .. }),
            "{inspected}"
        );
        let Err(error) = Journal::load(dir) else {
            panic!("an edited journal loads");
        };
        assert!(matches!(error, JournalError::Tampered { .. }), "{error}");
        assert!(Journal::begin(dir, Share::Backup, 4).is_err());
        error.to_string()
    }

    /// The attack: while a host serves alone, delete or change journal rows, kill -9 it and
    /// start it again, so that it forgets leases it issued. Every edit is named.
    #[test]
    fn every_edit_of_a_journal_is_named_deleted_rows_at_its_end_included() {
        let (dir, conn) = written();
        conn.execute("DELETE FROM commands WHERE seq = 2", [])
            .unwrap();
        let why = tampered(dir.path());
        assert!(why.contains("command 3 follows command 1"), "{why}");

        let (dir, conn) = written();
        conn.execute("DELETE FROM commands WHERE seq = 3", [])
            .unwrap();
        let why = tampered(dir.path());
        assert!(
            why.contains("holds 2 commands, but 3 were written"),
            "{why}"
        );

        let (dir, conn) = written();
        conn.execute_batch("DELETE FROM commands WHERE seq = 3; UPDATE meta SET count = 2")
            .unwrap();
        let why = tampered(dir.path());
        assert!(why.contains("deleted or added at its end"), "{why}");

        let (dir, conn) = written();
        conn.execute(
            "UPDATE commands SET entry = replace(entry, 'l2', 'l9') WHERE seq = 2",
            [],
        )
        .unwrap();
        let why = tampered(dir.path());
        assert!(why.contains("command 2") && why.contains("edited"), "{why}");

        let (dir, conn) = written();
        conn.execute("DELETE FROM commands", []).unwrap();
        let why = tampered(dir.path());
        assert!(
            why.contains("holds 0 commands, but 3 were written"),
            "{why}"
        );

        let (dir, conn) = written();
        conn.execute("DELETE FROM meta", []).unwrap();
        let why = tampered(dir.path());
        assert!(why.contains("no record of its share"), "{why}");
    }

    /// A journal without its chain (written before it, or its values cleared, or its
    /// columns dropped, so that deleted rows pass) is not trusted.
    #[test]
    fn a_journal_without_its_chain_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(super::JOURNAL_FILE_NAME);
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE meta (id INTEGER PRIMARY KEY CHECK (id = 1), share TEXT NOT NULL, epoch INTEGER NOT NULL);
             CREATE TABLE commands (seq INTEGER PRIMARY KEY AUTOINCREMENT, entry TEXT NOT NULL);
             INSERT INTO meta VALUES (1, 'primary', 7);",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO commands (entry) VALUES (?1)",
            [serde_json::to_string(&entry(1)).unwrap()],
        )
        .unwrap();
        let why = tampered(dir.path());
        assert!(why.contains("command 1"), "{why}");

        let (dir, conn) = written();
        conn.execute_batch(
            "DELETE FROM commands WHERE seq = 3;
             UPDATE meta SET count = NULL, head = NULL; UPDATE commands SET prev = NULL, chain = NULL;",
        )
        .unwrap();
        tampered(dir.path());

        let (dir, conn) = written();
        conn.execute_batch(
            "DELETE FROM commands WHERE seq = 3; ALTER TABLE commands DROP COLUMN chain;",
        )
        .unwrap();
        drop(conn);
        let inspected = Journal::inspect(dir.path()).unwrap_err();
        assert!(
            inspected.to_string().contains("no hash chain"),
            "{inspected}"
        );
    }
}
