//! The vendor authority: the vendor's central service that issues license keys, holds renewal
//! keys, keeps the registry of license server IDs with the key pair bound to each, and answers
//! synchronization requests online (`POST /v1/sync`) and by file (`POST /v1/sync/process`).
//!
//! # Codemap
//! - [`service`]: [`start`] on a listener with an injected clock; [`RunningAuthority`].
//! - [`data_dir`]: first-start creation of the vendor key pair and the admin token.
//! - [`store`]: SQLite (WAL, `synchronous=FULL`), migrations from `migrations/`, row readers.
//! - [`registry`]: customers, server IDs, issuing, renewal keys, revocation, input bounds.
//! - [`sync`]: the binding and replay rules and the signed sync response.
//! - [`chain`]: the sync chain per server, its clone and rollback rules, the vendor's alerts.
//! - [`state`]: the state the API and the console share (database, vendor key, clock).
//! - [`http`]: routes, extractors (admin token, bounded JSON bodies), handlers.
//! - [`wire`]: JSON bodies of the admin API, shared with the CLI.
//! - [`error`]: the one error enum and its mapping to HTTP status and stable code.
//! - [`ids`]: server IDs (`LS-XXXX-XXXX`), key ids, the admin token.
//!
//! Time comes only from the injected [`tessera_core::Clock`], read once per operation while
//! the database lock is held; randomness only from the OS, for identifiers and keys.

pub mod chain;
pub mod console;
pub mod data_dir;
pub mod error;
pub mod history;
pub mod http;
pub mod ids;
pub mod links;
pub mod registry;
pub mod service;
pub mod state;
pub mod store;
pub mod sync;
pub mod wire;

pub use error::AuthorityError;
pub use service::{AuthorityConfig, RunningAuthority, SystemClock, start};
