//! Outcomes: what the ledger answered. A refusal ("no licenses available") is a normal
//! answer, not an error; errors (not the primary, storage failed) live in the server.

use serde::{Deserialize, Serialize};

use crate::grant::GrantError;
use crate::key::KeyError;
use crate::records::{Donation, LeaseView, RenewalResult};
use crate::sync::SyncError;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// `created` is false when the station already held a lease covering the component.
    LeaseGranted {
        lease: LeaseView,
        created: bool,
    },
    LeaseRenewed {
        lease: LeaseView,
    },
    LeaseReleased {
        lease: LeaseView,
    },
    KeyImported {
        key_id: String,
    },
    KeyRemoved {
        key_id: String,
        leases_ended: u32,
    },
    Expired {
        leases_ended: u32,
    },
    SyncBegun {
        sequence: u64,
        nonce: String,
        /// The sync chain fields of the request: see `SyncRequestPayload`.
        #[serde(default)]
        last_response: Option<String>,
        #[serde(default)]
        pending_since: Option<u64>,
    },
    SyncBlocked {
        code: String,
    },
    /// The trust list recorded: what was added and removed since the last record (both
    /// empty: unchanged).
    TrustRecorded {
        added: Vec<String>,
        removed: Vec<String>,
    },
    Synced {
        sequence: u64,
        imported: Vec<String>,
        revoked: Vec<String>,
        renewals: Vec<String>,
        certificate_valid_until_ms: i64,
    },
    /// One entry per key a renewal key was found for; keys without one are not listed.
    KeysRenewed {
        renewed: Vec<(String, RenewalResult)>,
        leases_moved: u32,
        leases_ended: u32,
    },
    KeyAllocated {
        key_id: String,
        stations: bool,
    },
    KeyAllocatedToGroups {
        key_id: String,
        groups: Vec<String>,
    },
    KeyAllocatedToNeighbours {
        key_id: String,
        neighbours: Vec<String>,
    },
    StationGroupSet {
        group: String,
        stations: u32,
    },
    Donated {
        donation: Donation,
    },
    DonationsRenewed {
        to: String,
        donations: Vec<Donation>,
    },
    DonationEnded {
        donation: Donation,
    },
    GrantReturned {
        key_id: String,
        to: String,
        licenses_back: u32,
    },
    /// `key_id` is the pool the grant is used as: `KEY@DONOR`.
    GrantAccepted {
        key_id: String,
        donor: String,
        licenses: u32,
        serial: u64,
        usable_until_ms: i64,
        leases_ended: u32,
        /// The serial this server held from the donor that the donor's chain of grants does
        /// not contain (see [`crate::GrantPayload::prev_serial`]): a grant signed outside the
        /// donor's ledger, or a donor put back to a copy. Raise `grant_forged`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unknown_to_donor: Option<u64>,
    },
    GrantReleased {
        key_id: String,
        donor: String,
        serial: u64,
        leases_ended: u32,
        /// The latest expiry a station of the ended leases was told: they may use their
        /// licenses until then, so the donor hears of the return only after it.
        #[serde(default)]
        stations_until_ms: i64,
    },
    UsageReportRecorded {
        from: String,
    },
    PairSplitSet {
        backup_percent: Option<u8>,
    },
    AloneMerged {
        leases_merged: u32,
        leases_removed: u32,
        /// Leases that no longer fit (their key shrank meanwhile): not merged.
        leases_dropped: u32,
    },
    Refused {
        refusal: Refusal,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "refusal", rename_all = "snake_case")]
pub enum Refusal {
    #[error("{}", no_licenses_message(component, *licenses, alone_share))]
    NoLicensesAvailable {
        component: String,
        licenses: u32,
        /// A pair's host serving alone: the licenses of its own share, all in use (it may
        /// issue no others while the pair is split).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        alone_share: Option<u32>,
    },
    #[error("no valid license key covers component {component}")]
    ComponentNotLicensed { component: String },
    #[error("no active lease {lease_id} (unknown, checked in, or expired)")]
    LeaseNotFound { lease_id: String },
    #[error("license key {key_id} is already imported")]
    KeyAlreadyImported { key_id: String },
    #[error("no license key {key_id}")]
    KeyNotFound { key_id: String },
    #[error(transparent)]
    KeyRejected { error: KeyError },
    #[error("invalid request: {reason}")]
    InvalidRequest { reason: String },
    #[error("{}", not_synchronized_message(.deadline_ms))]
    ServerNotSynchronized { deadline_ms: Option<i64> },
    #[error(transparent)]
    SyncRejected { error: SyncError },
    #[error(transparent)]
    GrantRejected { error: GrantError },
    #[error("cannot donate from key {key_id}: {reason}")]
    DonationRefused { key_id: String, reason: String },
    #[error("key {key_id} has {free} free licenses, fewer than the {requested} asked for")]
    NotEnoughLicenses {
        key_id: String,
        requested: u32,
        free: u32,
    },
    #[error("no donation of key {key_id} to {to}")]
    DonationNotFound { key_id: String, to: String },
    #[error(
        "lease {lease_id} is a borrowing: its application holds it offline until {}, so only its station can return it early (or it ends then)",
        format_ms(*until_ms)
    )]
    LeaseBorrowed { lease_id: String, until_ms: i64 },
    #[error(
        "license key {key_id} has borrowed licenses running until {}: it can be removed once they are returned or have ended",
        format_ms(*until_ms)
    )]
    KeyHasBorrowings { key_id: String, until_ms: i64 },
    #[error(
        "license key {key_id} has licenses donated to a neighbour, whose grant may run until {}: end the donation (tessera donate … or DELETE /v1/donations/{{key}}/{{to}}), and remove the key once the grant has run out",
        format_ms(*until_ms)
    )]
    KeyHasDonations { key_id: String, until_ms: i64 },
    #[error("{}", borrow_message(component, *requested_hours, *max_days))]
    BorrowNotAllowed {
        component: String,
        requested_hours: i64,
        /// The longest borrowing any key covering the component allows (0: none does).
        max_days: u32,
    },
}

fn format_ms(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map_or_else(|_| ms.to_string(), |t| t.to_string())
}

fn borrow_message(component: &str, requested_hours: i64, max_days: u32) -> String {
    if max_days == 0 {
        format!(
            "no license key of component {component} allows borrowing (the vendor sets max_borrow_days in the key)"
        )
    } else {
        format!(
            "a borrowing of {requested_hours} hours is longer than the keys of component {component} allow: at most {max_days} days"
        )
    }
}

fn no_licenses_message(component: &str, licenses: u32, alone_share: &Option<u32>) -> String {
    match alone_share {
        Some(share) => format!(
            "no licenses available for component {component}: this host of a redundant pair serves alone and all {share} licenses of its share are in use (the key has {licenses}; the other host's share is not used while the pair is split)"
        ),
        None => {
            format!("no licenses available for component {component}: all {licenses} are in use")
        }
    }
}

fn not_synchronized_message(deadline_ms: &Option<i64>) -> String {
    let action = "synchronize with the vendor (`tessera sync`, or `tessera sync export` / `tessera sync import` by file)";
    match deadline_ms.and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok()) {
        Some(deadline) => format!(
            "this license server was last synchronized more than 366 days ago (its certificate expired at {deadline}); it issues no licenses from keys bound to its server ID until you {action}"
        ),
        None => format!(
            "this license server has never synchronized with the vendor; it issues no licenses from keys bound to its server ID until you {action}"
        ),
    }
}

impl Refusal {
    /// A signed object refused because its vendor key is not on the trust list (rather than
    /// because it was altered).
    pub fn is_untrusted_vendor(&self) -> bool {
        match self {
            Refusal::KeyRejected { error } => error.is_untrusted_vendor(),
            Refusal::SyncRejected { error } => error.is_untrusted_vendor(),
            Refusal::GrantRejected {
                error:
                    crate::GrantError::BadKey {
                        untrusted_vendor, ..
                    },
            } => *untrusted_vendor,
            _ => false,
        }
    }

    /// Stable machine-readable code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::NoLicensesAvailable { .. } => "no_licenses_available",
            Refusal::ComponentNotLicensed { .. } => "component_not_licensed",
            Refusal::LeaseNotFound { .. } => "lease_not_found",
            Refusal::KeyAlreadyImported { .. } => "key_already_imported",
            Refusal::KeyNotFound { .. } => "key_not_found",
            Refusal::KeyRejected { error } => error.code(),
            Refusal::InvalidRequest { .. } => "invalid_request",
            Refusal::ServerNotSynchronized { .. } => "server_not_synchronized",
            Refusal::SyncRejected { error } => error.code(),
            Refusal::GrantRejected { error } => error.code(),
            Refusal::DonationRefused { .. } => "donation_refused",
            Refusal::NotEnoughLicenses { .. } => "not_enough_licenses",
            Refusal::DonationNotFound { .. } => "donation_not_found",
            Refusal::BorrowNotAllowed { .. } => "borrow_not_allowed",
            Refusal::LeaseBorrowed { .. } => "lease_borrowed",
            Refusal::KeyHasBorrowings { .. } => "key_has_borrowings",
            Refusal::KeyHasDonations { .. } => "key_has_donations",
        }
    }
}
