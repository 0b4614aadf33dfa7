//! The license server daemon.
//!
//! # Layout
//! - [`server`]: start a server on a listener with an injected clock; stop it.
//! - [`config`]: `tessera.toml` and defaults.
//! - [`data_dir`]: first-start creation of the identity key pair and the admin token.
//! - [`state`]: shared state and the operations (checkout, heartbeat, ...) that stamp time
//!   and propose commands through consensus.
//! - [`domain`]: `[domain]` configuration: host numbers and addresses.
//! - [`consensus`]: openraft glue: the replicated log in SQLite, the ledger as state machine.
//! - [`http`]: routes, extractors, handlers, OpenAPI, the overview page.
//! - [`sync`]: synchronizing with the vendor authority, online and by file.
//! - [`neighbours`]: links to neighbour servers: donations as signed grants, renewal,
//!   license synchronization and usage reports.
//! - [`events`]: notifications to the log, webhooks and user hooks.
//! - `effects`: the history, metrics and notifications an applied entry causes, in one
//!   place, at the entry's time.
//! - [`history`], [`audit`]: usage history and the audit hash chain (`usage.sqlite3`),
//!   stored by `tessera-store` (re-exported here).
//! - [`console`]: the web console (askama templates, htmx).
//! - [`error`]: errors and the single table mapping them to HTTP.
//! - [`clock`], [`ids`], [`metrics`]: time, lease ids, Prometheus.
//! - `fault_proxy` (feature `test-support`, tests only): an HTTP proxy that cuts links
//!   between hosts, for partition tests.

pub mod alerts;
pub use tessera_store::audit;
pub mod clock;
pub mod config;
pub mod consensus;
pub mod console;
pub mod data_dir;
pub mod doctor;
pub mod domain;
pub mod domain_status;
mod effects;
pub mod error;
pub mod events;
pub mod extract;
#[cfg(feature = "test-support")]
pub mod fault_proxy;
pub use tessera_store::history;
pub mod http;
pub mod ids;
pub mod lease_listing;
pub mod metrics;
pub mod neighbours;
pub mod pair;
pub mod peer_history;
pub mod server;
pub mod state;
pub mod sync;

pub use config::ServerConfig;
pub use server::{RunningServer, ServerOptions, start};
