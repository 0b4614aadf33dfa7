//! Schema migrations: the files in `migrations/`, applied in order. The number of the last
//! one applied is kept in `PRAGMA user_version`.

use rusqlite::Connection;

use crate::error::StoreError;

/// (version, name, SQL). Append only: never edit a migration that has shipped.
const MIGRATIONS: &[(u32, &str, &str)] =
    &[(1, "raft", include_str!("../migrations/0001_raft.sql"))];

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
