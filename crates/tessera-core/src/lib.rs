//! Tessera's pure core: signed documents, the license ledger, commands and outcomes.
//!
//! # Layout
//! - [`clock`]: the `Clock` trait; this crate never reads a clock itself.
//! - [`identity`]: Ed25519 signing and verifying keys and their file formats.
//! - [`key`]: the vendor-signed license key document (format in `docs/formats.md`).
//! - [`grant`]: signed donations of licenses between servers, chained to the key.
//! - [`lease_token`]: signed lease tokens and the application's check of a lease.
//! - [`command`]: what can be asked of the ledger, stamped with the primary's time.
//! - [`outcome`]: what the ledger answered, refusals included; refusals are not errors.
//! - [`ledger`]: `Ledger::apply(entry) -> Outcome` and the invariants checked after it.
//!
//! Nothing here does I/O, reads a clock or draws randomness: every input arrives as data,
//! so every replica that applies the same entries reaches the same state.

pub mod answer;
pub mod clock;
pub mod command;
pub mod grant;
pub mod identity;
pub mod key;
pub mod lease_token;
pub mod ledger;
pub mod outcome;
pub mod records;
pub mod sync;

pub use clock::Clock;
pub use command::{Command, Stamped};
pub use grant::{Grant, GrantError, GrantPayload, GrantSource};
pub use identity::{IdentityError, PublicKey, SecretKey};
pub use key::{KeyError, LicenseKey, LicenseKeyPayload};
pub use ledger::{
    AloneLease, AloneState, Applied, Donation, KeyMeta, KeyState, KeyView, LeaseCursor,
    LeaseFilter, LeaseOrder, LeaseOverview, LeaseSort, LeaseView, Ledger, LedgerConfig,
    LedgerSnapshot, Outstanding, PENDING_DONATION_RETRY_MS, PendingDonation, Received,
    RenewalResult, Share, SortedLeasePage, StoredKey, SyncBlock, SyncState, Unverified,
    UsageReport, received_pool_id,
};
pub use outcome::{Outcome, Refusal};
