//! The authority's shared state: the database, the vendor key, the admin token and the
//! clock, shared by the API (`http`) and the console.

use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use tessera_core::{Clock, SecretKey};

use crate::error::AuthorityError;

pub struct Shared {
    /// One connection, used under the lock: the authority's load is a few syncs and admin
    /// calls a minute, and one writer at a time is what SQLite does anyway.
    pub database: Mutex<Connection>,
    pub vendor: SecretKey,
    pub vendor_pub_text: String,
    pub admin_token: String,
    pub clock: Arc<dyn Clock>,
    /// Served over HTTPS: the console's cookie is `Secure`.
    pub secure_cookies: bool,
}

pub type SharedState = Arc<Shared>;

impl Shared {
    /// Runs `operation` on the database off the async threads, at the clock reading taken
    /// once the lock is held, so recorded times follow commit order.
    pub(crate) async fn run<T, F>(self: &Arc<Self>, operation: F) -> Result<T, AuthorityError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &SecretKey, i64) -> Result<T, AuthorityError> + Send + 'static,
    {
        let shared = self.clone();
        tokio::task::spawn_blocking(move || {
            // A panic inside an operation drops its transaction, which rolls back, so the
            // connection behind a poisoned lock is still consistent.
            let mut database = shared
                .database
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now_ms = shared.clock.now_ms();
            operation(&mut database, &shared.vendor, now_ms)
        })
        .await
        .map_err(|e| AuthorityError::Internal(format!("database task failed: {e}")))?
    }
}
