//! The records the ledger, its commands and its outcomes share: leases as seen from outside,
//! donations, usage reports, a pair's shares and alone states. They sit below `command`,
//! `outcome` and `ledger`, so those modules depend on them and not on each other's insides.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A grant a donor issued and its receiver may still be using: counted until
/// `lease_until_ms + clock_skew_max`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outstanding {
    pub serial: u64,
    pub licenses: u32,
    pub lease_until_ms: i64,
}

/// Licenses of one key (or received grant) donated to one neighbour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Donation {
    /// The key the licenses come from: a vendor key id, or a received grant `KEY@DONOR`.
    pub key_id: String,
    pub to: String,
    pub receiver_public_key: String,
    /// The licenses the donor wants the neighbour to have.
    pub licenses: u32,
    pub donation_until_ms: i64,
    pub renewal_period_ms: i64,
    /// Serial of the latest grant issued.
    pub serial: u64,
    /// Serial of the grant issued on this link before it (see [`crate::GrantPayload::prev_serial`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_serial: Option<u64>,
    pub lease_until_ms: i64,
    pub renewed_at_ms: i64,
    /// Ended by an administrator (or moved to a renewal key): no more renewals.
    pub ended: bool,
    /// Grants the receiver may still hold; the donor counts the largest as donated.
    pub outstanding: Vec<Outstanding>,
}

impl Donation {
    /// Licenses counted as donated now: the largest grant the receiver may still hold.
    pub fn counted(&self) -> u32 {
        self.outstanding
            .iter()
            .map(|o| o.licenses)
            .max()
            .unwrap_or(0)
    }
}

/// Active stations per component that a child reported to this server.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    /// When the child counted, and over how long a period before that.
    pub at_ms: i64,
    pub period_ms: i64,
    pub active_stations: BTreeMap<String, u32>,
    /// Licenses in use per component at the time of the report.
    #[serde(default)]
    pub in_use: BTreeMap<String, u32>,
    /// The child's own ledger counters and log head (relayed to the vendor at this server's
    /// sync). Absent from older children's reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heads: Option<crate::sync::ReportedHeads>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseView {
    pub lease_id: String,
    pub key_id: String,
    /// The components the station asked for under this lease, sorted.
    pub components: Vec<String>,
    pub station: String,
    pub user: String,
    pub host: String,
    pub issued_at_ms: i64,
    pub renewed_at_ms: i64,
    pub expires_at_ms: i64,
    /// A borrowing: needs no heartbeat until it ends, and only its holder returns it early.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub borrowed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum RenewalResult {
    /// The renewal key was added and allocated to every object of this key.
    Allocated { renewal_key_id: String },
    /// The renewal key was added but not allocated; `reason` says why.
    NotAllocated {
        renewal_key_id: String,
        reason: String,
    },
}

/// Which host's share of a key's licenses pays for a lease.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Share {
    #[default]
    Primary,
    Backup,
}

impl Share {
    pub fn other(self) -> Share {
        match self {
            Share::Primary => Share::Backup,
            Share::Backup => Share::Primary,
        }
    }
}

/// A lease as one host left it while alone: for `MergeAlone`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AloneLease {
    pub lease: LeaseView,
    pub share: Share,
}

/// What one host held in its own share when the pair came back: every such lease.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AloneState {
    pub share: Share,
    /// Which of the host's alone periods this is (it only grows): a host drops its journal
    /// once its applied ledger has merged this epoch of its share (`Ledger::merged_epoch`).
    #[serde(default)]
    pub epoch: u64,
    pub leases: Vec<AloneLease>,
}
