//! Schema migrations of every SQLite file the server writes: the files under
//! `migrations/<database>/`, applied in order by one runner ([`migrate_schema`]). The number
//! of the last one applied is kept in `PRAGMA user_version`.

use rusqlite::{Connection, Transaction};

use crate::error::StoreError;

/// One migration: its version (1, 2, ...: the order it runs in), a name for errors, its SQL,
/// and Rust that completes it in the same transaction (filling a new column or table from the
/// rows already there).
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
    pub fill: Option<fn(&Transaction<'_>) -> rusqlite::Result<()>>,
}

/// The migrations of one database file. Append only: never edit a migration that has
/// shipped. Every SQLite file Tessera's server writes has one, under `migrations/<name>/`,
/// run by [`migrate`].
pub struct Schema {
    pub migrations: &'static [Migration],
}

impl Schema {
    /// The schema version this build writes.
    pub fn latest_version(&self) -> u32 {
        self.migrations.last().map_or(0, |m| m.version)
    }
}

/// The replicated log, its vote and snapshot (`DATA/raft.sqlite3`).
pub const RAFT: Schema = Schema {
    migrations: &[
        Migration {
            version: 1,
            name: "raft",
            sql: include_str!("../migrations/raft/0001_raft.sql"),
            fill: None,
        },
        Migration {
            version: 2,
            name: "log_chain",
            sql: include_str!("../migrations/raft/0002_log_chain.sql"),
            fill: Some(chain_existing_rows),
        },
        Migration {
            version: 3,
            name: "snapshot_digest",
            sql: include_str!("../migrations/raft/0003_snapshot_digest.sql"),
            fill: Some(digest_existing_snapshot),
        },
    ],
};

/// The schema version of the replicated log this build writes.
pub fn latest_version() -> u32 {
    RAFT.latest_version()
}

/// Applies the migrations of `schema` the database has not seen yet, each in its own
/// transaction. The number of the last one applied is kept in `PRAGMA user_version`; a
/// database written by a newer build is refused ([`StoreError::SchemaTooNew`]).
pub fn migrate_schema(conn: &mut Connection, schema: &Schema) -> Result<(), StoreError> {
    let found: u32 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if found > schema.latest_version() {
        return Err(StoreError::SchemaTooNew {
            found,
            known: schema.latest_version(),
        });
    }
    for migration in schema.migrations.iter().filter(|m| m.version > found) {
        let apply = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            tx.execute_batch(migration.sql)?;
            if let Some(fill) = migration.fill {
                fill(&tx)?;
            }
            tx.pragma_update(None, "user_version", migration.version)?;
            tx.commit()
        };
        apply(conn).map_err(|source| StoreError::Migration {
            version: migration.version,
            name: migration.name,
            source,
        })?;
    }
    Ok(())
}

/// Migrates the replicated log's database ([`RAFT`]).
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    migrate_schema(conn, &RAFT)
}

/// Migration 2: chains the entries already in the log, in index order, from the zero hash.
fn chain_existing_rows(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    let rows: Vec<(i64, Vec<u8>)> = {
        let mut statement =
            tx.prepare("SELECT log_index, entry FROM raft_log ORDER BY log_index")?;
        statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?
    };
    let mut prev = crate::chain::GENESIS;
    let mut update =
        tx.prepare("UPDATE raft_log SET prev = ?2, chain = ?3 WHERE log_index = ?1")?;
    for (index, entry) in rows {
        let chain = crate::chain::link(&prev, u64::try_from(index).unwrap_or(0), &entry);
        update.execute(rusqlite::params![index, prev.as_slice(), chain.as_slice()])?;
        prev = chain;
    }
    Ok(())
}

/// Migration 3: the digest of the snapshot stored before it.
fn digest_existing_snapshot(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    use rusqlite::OptionalExtension;
    let row: Option<(String, Vec<u8>)> = tx
        .query_row(
            "SELECT meta, data FROM raft_snapshot WHERE id = 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    if let Some((meta, data)) = row {
        let digest = crate::chain::snapshot_digest(&meta, &data);
        tx.execute(
            "UPDATE raft_snapshot SET digest = ?1 WHERE id = 1",
            [digest.as_slice()],
        )?;
    }
    Ok(())
}
