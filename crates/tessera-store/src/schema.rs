//! Schema migrations: the files in `migrations/`, applied in order. The number of the last
//! one applied is kept in `PRAGMA user_version`.

use rusqlite::Connection;

use crate::error::StoreError;

/// (version, name, SQL). Append only: never edit a migration that has shipped.
const MIGRATIONS: &[(u32, &str, &str)] = &[
    (1, "raft", include_str!("../migrations/0001_raft.sql")),
    (
        2,
        "log_chain",
        include_str!("../migrations/0002_log_chain.sql"),
    ),
    (
        3,
        "snapshot_digest",
        include_str!("../migrations/0003_snapshot_digest.sql"),
    ),
];

/// The schema version this build writes.
pub fn latest_version() -> u32 {
    MIGRATIONS.last().map_or(0, |(version, _, _)| *version)
}

/// Applies the migrations the database has not seen yet, each in its own transaction.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found: u32 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if found > latest_version() {
        return Err(StoreError::SchemaTooNew {
            found,
            known: latest_version(),
        });
    }
    for &(version, name, sql) in MIGRATIONS.iter().filter(|(v, _, _)| *v > found) {
        let apply = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            if version == 2 {
                chain_existing_rows(&tx)?;
            }
            if version == 3 {
                digest_existing_snapshot(&tx)?;
            }
            tx.pragma_update(None, "user_version", version)?;
            tx.commit()
        };
        apply(conn).map_err(|source| StoreError::Migration {
            version,
            name,
            source,
        })?;
    }
    Ok(())
}

/// Migration 2: chains the entries already in the log, in index order, from the zero hash.
fn chain_existing_rows(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
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
fn digest_existing_snapshot(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
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
