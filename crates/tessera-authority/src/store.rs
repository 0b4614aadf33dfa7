//! SQLite: opening the database, migrations, and reading rows.
//!
//! The database runs in WAL mode with `synchronous=FULL`: an answered sync or an issued key
//! must survive a power cut, because the other side already holds the signed result. The
//! schema lives in `migrations/NNNN_*.sql`, applied in order; `PRAGMA user_version` records
//! the last one applied.

use std::path::Path;

use jiff::Timestamp;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use tessera_core::LicenseKey;

use crate::error::AuthorityError;

/// `(version, sql)`, in order. Append only: a released migration is never edited.
pub const MIGRATIONS: &[(u32, &str)] = &[
    (1, include_str!("../migrations/0001_initial.sql")),
    (2, include_str!("../migrations/0002_sync_chain.sql")),
    (3, include_str!("../migrations/0003_history_points.sql")),
    (
        4,
        include_str!("../migrations/0004_online_certificates.sql"),
    ),
    (5, include_str!("../migrations/0005_link_runs.sql")),
    (6, include_str!("../migrations/0006_counters.sql")),
    (7, include_str!("../migrations/0007_link_reporters.sql")),
    (8, include_str!("../migrations/0008_counter_points.sql")),
];

/// How long a writer waits for another connection's lock (e.g. a backup) before failing.
const BUSY_TIMEOUT_MS: u64 = 5_000;

pub fn open(path: &Path) -> Result<Connection, AuthorityError> {
    create_private(path)?;
    let mut connection = Connection::open(path)?;
    configure(&connection)?;
    migrate(&mut connection)?;
    Ok(connection)
}

/// An in-memory database with the full schema, for unit tests.
#[cfg(test)]
pub fn open_in_memory() -> Connection {
    let mut connection = Connection::open_in_memory().unwrap();
    configure(&connection).unwrap();
    migrate(&mut connection).unwrap();
    connection
}

/// Creates the database file readable by the owner only, before SQLite does: the customer
/// list is the vendor's business, and SQLite gives the -wal and -shm files the same mode.
fn create_private(path: &Path) -> Result<(), AuthorityError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(AuthorityError::DataDir {
            path: path.display().to_string(),
            message: format!("cannot create the database: {error}"),
        }),
    }
}

fn configure(connection: &Connection) -> Result<(), AuthorityError> {
    // journal_mode answers with the mode in effect, so it is read as a query.
    let _mode: String = connection.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    connection.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
    connection.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))?;
    Ok(())
}

/// Applies every migration above `user_version`, each in its own transaction together with
/// the version bump, so a crash leaves the database at a whole version. Returns the version.
pub fn migrate(connection: &mut Connection) -> Result<u32, AuthorityError> {
    let current: u32 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let latest = MIGRATIONS.last().map_or(0, |(version, _)| *version);
    if current > latest {
        return Err(AuthorityError::Internal(format!(
            "the database is at schema version {current}, newer than this program knows ({latest}): use a newer tessera"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        transaction.execute_batch(sql)?;
        transaction.pragma_update(None, "user_version", version)?;
        transaction.commit()?;
        tracing::info!(version, "applied authority schema migration");
    }
    Ok(latest)
}

/// Milliseconds since the epoch as a timestamp. Clock readings are always in range; an out
/// of range value means a corrupted row or a broken clock.
pub fn timestamp(ms: i64) -> Result<Timestamp, AuthorityError> {
    Timestamp::from_millisecond(ms)
        .map_err(|e| AuthorityError::Internal(format!("time {ms} ms is out of range: {e}")))
}

pub const DAY_MS: i64 = 86_400_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerRow {
    pub server_id: String,
    pub customer: String,
    pub created_at_ms: i64,
    pub public_key: Option<String>,
    pub bound_at_ms: Option<i64>,
    pub last_sequence: u64,
    pub last_sync_at_ms: Option<i64>,
    /// The end of the certificate the last sync gave (NULL before migration 4: see
    /// `registry::server_info`).
    pub certificate_valid_until_ms: Option<i64>,
}

pub const SERVER_COLUMNS: &str = "server_id, customer, created_at_ms, public_key, bound_at_ms, last_sequence, last_sync_at_ms, certificate_valid_until_ms";

impl ServerRow {
    pub fn from_row(row: &Row<'_>) -> rusqlite::Result<ServerRow> {
        Ok(ServerRow {
            server_id: row.get(0)?,
            customer: row.get(1)?,
            created_at_ms: row.get(2)?,
            public_key: row.get(3)?,
            bound_at_ms: row.get(4)?,
            // Stored as a signed integer; the sync path never writes a negative one.
            last_sequence: u64::try_from(row.get::<_, i64>(5)?).unwrap_or(0),
            last_sync_at_ms: row.get(6)?,
            certificate_valid_until_ms: row.get(7)?,
        })
    }
}

pub fn find_server(
    connection: &Connection,
    server_id: &str,
) -> Result<Option<ServerRow>, AuthorityError> {
    Ok(connection
        .query_row(
            &format!("SELECT {SERVER_COLUMNS} FROM servers WHERE server_id = ?1"),
            params![server_id],
            ServerRow::from_row,
        )
        .optional()?)
}

pub fn server(connection: &Connection, server_id: &str) -> Result<ServerRow, AuthorityError> {
    find_server(connection, server_id)?.ok_or_else(|| AuthorityError::UnknownServer {
        server_id: server_id.to_string(),
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRow {
    pub key_id: String,
    pub server_id: String,
    pub renews: Option<String>,
    pub valid_until_ms: i64,
    pub revoked_at_ms: Option<i64>,
    pub key: LicenseKey,
}

pub const KEY_COLUMNS: &str = "key_id, server_id, renews, valid_until_ms, revoked_at_ms, key_json";

impl KeyRow {
    pub fn from_row(row: &Row<'_>) -> rusqlite::Result<KeyRow> {
        let json: String = row.get(5)?;
        let key = LicenseKey::from_json(&json).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(5, rusqlite::types::Type::Text, Box::new(e))
        })?;
        Ok(KeyRow {
            key_id: row.get(0)?,
            server_id: row.get(1)?,
            renews: row.get(2)?,
            valid_until_ms: row.get(3)?,
            revoked_at_ms: row.get(4)?,
            key,
        })
    }
}

pub fn key(connection: &Connection, key_id: &str) -> Result<KeyRow, AuthorityError> {
    connection
        .query_row(
            &format!("SELECT {KEY_COLUMNS} FROM keys WHERE key_id = ?1"),
            params![key_id],
            KeyRow::from_row,
        )
        .optional()?
        .ok_or_else(|| AuthorityError::UnknownKey {
            key_id: key_id.to_string(),
        })
}

/// Keys matching a `WHERE` clause over the `keys` table, ordered by issue time.
pub fn keys_where(
    connection: &Connection,
    condition: &str,
    parameters: impl rusqlite::Params,
) -> Result<Vec<KeyRow>, AuthorityError> {
    let mut statement = connection.prepare(&format!(
        "SELECT {KEY_COLUMNS} FROM keys WHERE {condition} ORDER BY issued_at_ms, key_id"
    ))?;
    let rows = statement.query_map(parameters, KeyRow::from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_bring_a_new_database_to_the_latest_version_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sqlite");
        let connection = open(&path).unwrap();
        let version: u32 = connection
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.last().unwrap().0);
        let mode: String = connection
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        use std::os::unix::fs::PermissionsExt;
        let permissions = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(permissions.mode() & 0o777, 0o600);
        drop(connection);
        // Reopening applies nothing twice (a second CREATE TABLE would fail).
        open(&path).unwrap();
    }

    #[test]
    fn a_database_from_a_newer_program_is_refused() {
        let mut connection = open_in_memory();
        connection.pragma_update(None, "user_version", 999).unwrap();
        let error = migrate(&mut connection).unwrap_err();
        assert!(error.to_string().contains("newer"), "{error}");
    }

    #[test]
    fn migration_versions_are_strictly_increasing() {
        assert!(MIGRATIONS.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(MIGRATIONS[0].0, 1);
    }
}
