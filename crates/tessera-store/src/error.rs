//! The crate's error type.

use std::io;

/// Why the store could not open, read or write.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot encode or decode stored data: {0}")]
    Codec(#[from] serde_json::Error),
    #[error("schema migration {version} ({name}) failed: {source}")]
    Migration {
        version: u32,
        name: &'static str,
        source: rusqlite::Error,
    },
    #[error(
        "the database has schema version {found} but this build knows only up to {known}: it was written by a newer Tessera"
    )]
    SchemaTooNew { found: u32, known: u32 },
    #[error("the storage writer thread has stopped")]
    WriterStopped,
    #[error("cannot start the storage writer thread: {0}")]
    Spawn(io::Error),
}

impl From<StoreError> for io::Error {
    fn from(error: StoreError) -> io::Error {
        match error {
            StoreError::Codec(e) => io::Error::new(io::ErrorKind::InvalidData, e),
            other => io::Error::other(other),
        }
    }
}
