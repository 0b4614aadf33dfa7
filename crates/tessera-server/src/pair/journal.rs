//! The alone journal (`DATA/pair-alone.sqlite3`): what a host of a pair did while serving
//! alone, written (fsync) before the station gets its answer, so a host killed while alone
//! comes back with the same leases. Its presence means "this host served alone and the pair
//! has not merged it yet"; it is deleted once the host's applied ledger shows the merge of
//! its epoch (`Ledger::merged_epoch`).

use std::path::{Path, PathBuf};

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
}

fn error(path: &Path, e: impl std::fmt::Display) -> String {
    format!("alone journal {}: {e}", path.display())
}

fn open_connection(path: &Path) -> Result<Connection, String> {
    let conn = Connection::open(path).map_err(|e| error(path, e))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         CREATE TABLE IF NOT EXISTS meta (id INTEGER PRIMARY KEY CHECK (id = 1),
                                          share TEXT NOT NULL, epoch INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS commands (seq INTEGER PRIMARY KEY AUTOINCREMENT,
                                              entry TEXT NOT NULL);",
    )
    .map_err(|e| error(path, e))?;
    Ok(conn)
}

fn share_name(share: Share) -> &'static str {
    match share {
        Share::Primary => "primary",
        Share::Backup => "backup",
    }
}

impl Journal {
    /// The journal in `data_dir`, if this host served alone and it was not merged yet.
    pub fn load(data_dir: &Path) -> Result<Option<Journal>, String> {
        let path = data_dir.join(JOURNAL_FILE_NAME);
        if !path.exists() {
            return Ok(None);
        }
        let conn = open_connection(&path)?;
        let meta: Option<(String, i64)> = conn
            .query_row("SELECT share, epoch FROM meta WHERE id = 1", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()
            .map_err(|e| error(&path, e))?;
        let Some((share, epoch)) = meta else {
            return Ok(None);
        };
        let share = match share.as_str() {
            "primary" => Share::Primary,
            "backup" => Share::Backup,
            other => return Err(error(&path, format!("unknown share {other:?}"))),
        };
        let mut journal = Journal {
            path,
            conn,
            share,
            epoch: epoch as u64,
            count: 0,
        };
        // Every stored command must read back: a journal that does not is named at load.
        journal.count = journal.commands()?.len();
        Ok(Some(journal))
    }

    /// The commands written, in order, read from the file.
    pub fn commands(&self) -> Result<Vec<Stamped>, String> {
        let path = &self.path;
        let mut statement = self
            .conn
            .prepare("SELECT entry FROM commands ORDER BY seq")
            .map_err(|e| error(path, e))?;
        let rows = statement
            .query_map([], |row| row.get::<_, String>(0))
            .map_err(|e| error(path, e))?;
        let mut commands = Vec::new();
        for row in rows {
            let text = row.map_err(|e| error(path, e))?;
            commands.push(serde_json::from_str(&text).map_err(|e| error(path, e))?);
        }
        Ok(commands)
    }

    /// Starts a journal for a new alone period (an existing one keeps its commands; its
    /// epoch moves on, so an older merge of it does not end this one).
    pub fn begin(data_dir: &Path, share: Share, epoch: u64) -> Result<Journal, String> {
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
                }
            }
        };
        journal.share = share;
        journal.epoch = epoch.max(journal.epoch);
        journal
            .conn
            .execute(
                "INSERT INTO meta (id, share, epoch) VALUES (1, ?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET share = ?1, epoch = ?2",
                params![share_name(share), journal.epoch as i64],
            )
            .map_err(|e| error(&journal.path, e))?;
        Ok(journal)
    }

    /// Writes one command durably (before it is applied and answered).
    pub fn append(&mut self, entry: &Stamped) -> Result<(), String> {
        let text = serde_json::to_string(entry).map_err(|e| error(&self.path, e))?;
        self.conn
            .execute("INSERT INTO commands (entry) VALUES (?1)", params![text])
            .map_err(|e| error(&self.path, e))?;
        self.count += 1;
        Ok(())
    }

    /// The pair merged this host's alone state: the journal goes.
    pub fn delete(self) -> Result<(), String> {
        let Journal { path, conn, .. } = self;
        conn.execute_batch("DELETE FROM commands; DELETE FROM meta;")
            .map_err(|e| error(&path, e))?;
        drop(conn);
        for suffix in ["", "-wal", "-shm"] {
            let file = PathBuf::from(format!("{}{suffix}", path.display()));
            if file.exists() {
                std::fs::remove_file(&file).map_err(|e| error(&file, e))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Journal;
    use tessera_core::{Command, Share, Stamped};

    #[test]
    fn a_journal_survives_reopening_and_a_new_period_keeps_its_commands() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Journal::load(dir.path()).unwrap().is_none());
        let mut journal = Journal::begin(dir.path(), Share::Backup, 5).unwrap();
        let entry = Stamped {
            at_ms: 10,
            command: Command::Checkin {
                lease_id: "l1".into(),
            },
        };
        journal.append(&entry).unwrap();
        drop(journal);
        let journal = Journal::load(dir.path()).unwrap().unwrap();
        assert_eq!((journal.share, journal.epoch), (Share::Backup, 5));
        assert_eq!(journal.commands().unwrap(), vec![entry.clone()]);
        assert_eq!(journal.count, 1);
        drop(journal);
        let journal = Journal::begin(dir.path(), Share::Backup, 9).unwrap();
        assert_eq!(journal.epoch, 9);
        assert_eq!(journal.commands().unwrap(), vec![entry]);
        journal.delete().unwrap();
        assert!(Journal::load(dir.path()).unwrap().is_none());
    }
}
