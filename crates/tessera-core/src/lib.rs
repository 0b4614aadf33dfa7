//! Tessera's pure core: signed documents, the license ledger, commands and outcomes.
//!
//! # Layout
//! - [`clock`]: the `Clock` trait; this crate never reads a clock itself.
//! - [`identity`]: Ed25519 signing and verifying keys and their file formats.
//! - [`key`]: the vendor-signed license key document (format in `docs/formats.md`).
//! - [`command`]: what can be asked of the ledger, stamped with the primary's time.
//! - [`outcome`]: what the ledger answered, refusals included; refusals are not errors.
//! - [`ledger`]: `Ledger::apply(entry) -> Outcome` and the invariants checked after it.
//!
//! Nothing here does I/O, reads a clock or draws randomness: every input arrives as data,
//! so every replica that applies the same entries reaches the same state.

pub mod clock;
pub mod command;
pub mod identity;
pub mod key;
pub mod ledger;
pub mod outcome;
pub mod sync;

pub use clock::Clock;
pub use command::{Command, Stamped};
pub use identity::{IdentityError, PublicKey, SecretKey};
pub use key::{KeyError, LicenseKey, LicenseKeyPayload};
pub use ledger::{
    Applied, KeyMeta, KeyState, KeyView, LeaseView, Ledger, LedgerConfig, LedgerSnapshot,
    RenewalResult, StoredKey, SyncState,
};
pub use outcome::{Outcome, Refusal};
