//! Commands: everything that changes the ledger. Each enters the replicated log as a
//! [`Stamped`] entry carrying the time the primary stamped on it, so that applying the same
//! log gives the same state on every host, whenever it is applied.

use serde::{Deserialize, Serialize};

use crate::grant::Grant;
use crate::key::LicenseKey;
use crate::records::{AloneState, UsageReport};
use crate::sync::SyncResponse;

fn is_zero(value: &i64) -> bool {
    *value == 0
}

/// A command with the primary's time. `at_ms` is milliseconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamped {
    pub at_ms: i64,
    pub command: Command,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Adds a vendor-signed key. The ledger verifies it again on apply.
    ImportKey { key: LicenseKey },
    /// Removes a key; its leases end with it.
    RemoveKey { key_id: String },
    /// A station asks for a license of `component`. `lease_id` is used only if a new lease
    /// is created; the primary draws it before proposing, so replicas agree on it.
    Checkout {
        lease_id: String,
        component: String,
        station: String,
        user: String,
        host: String,
        lease_ttl_ms: i64,
        /// A borrowing: the lease runs this long (instead of `lease_ttl_ms`) without a
        /// heartbeat, from a key whose `max_borrow_days` allows it. 0 (absent in older
        /// entries): an ordinary lease.
        #[serde(default, skip_serializing_if = "is_zero")]
        borrow_ms: i64,
    },
    /// Extends a live lease by `lease_ttl_ms` from now.
    Heartbeat { lease_id: String, lease_ttl_ms: i64 },
    /// The station returns its license.
    Checkin { lease_id: String },
    /// An administrator takes a license back from a station.
    ForceRelease { lease_id: String },
    /// Ends every lease whose time has run out. Proposed by the primary's timer; replicas
    /// never expire anything on their own.
    Expire,
    /// Starts a sync with the vendor: the next request gets sequence `last completed + 1` and
    /// this nonce. Only the latest begun request can be completed.
    BeginSync { nonce: String },
    /// Applies the vendor's answer to the awaited request.
    CompleteSync { response: Box<SyncResponse> },
    /// The authority refused a sync as a clone or a rollback (`server_cloned`,
    /// `server_rolled_back`): automatic syncs stop until one succeeds.
    BlockSync { code: String, message: String },
    /// The vendor keys the primary trusts (fingerprints), recorded when they differ from
    /// the last recorded list: a change is kept and reported to the vendor at the next sync
    /// (docs/security.md, the trust list).
    RecordTrust { fingerprints: Vec<String> },
    /// Automatic key renewal: replaces keys by the renewal keys held for them, where the
    /// renewal covers the same components and at least as many licenses.
    RenewKeys,
    /// An administrator allocates a key to this server's stations, or takes it away.
    AllocateKey { key_id: String, stations: bool },
    /// Allocates a key to the stations of these groups (replacing its group list).
    AllocateKeyToGroups { key_id: String, groups: Vec<String> },
    /// Allocates a key to these neighbour servers (replacing its list): the objects a renewal
    /// carries over, and the neighbours donations from the key go to.
    AllocateKeyToNeighbours {
        key_id: String,
        neighbours: Vec<String>,
    },
    /// Defines a station group; an empty list deletes it.
    SetStationGroup {
        group: String,
        stations: Vec<String>,
    },
    /// Donates (or changes the donation of) licenses of a key to a neighbour server until
    /// `until_ms`, as grants renewed every `renewal_period_ms` while the link lives.
    Donate {
        key_id: String,
        to: String,
        receiver_public_key: String,
        licenses: u32,
        until_ms: i64,
        renewal_period_ms: i64,
    },
    /// The link to a neighbour is alive: renew the grants of every donation to it.
    RenewDonations { to: String },
    /// No more renewals: the licenses come back when the neighbour returns them or the
    /// last grant runs out.
    EndDonation { key_id: String, to: String },
    /// The neighbour confirmed it no longer uses grants up to `serial`.
    GrantReturned {
        key_id: String,
        to: String,
        serial: u64,
    },
    /// A grant from a neighbour, verified on apply down to the vendor's key.
    AcceptGrant { grant: Box<Grant> },
    /// This server gives back a received grant (`KEY@DONOR`); its leases end.
    ReleaseGrant { key_id: String },
    /// A neighbour's report of its active stations.
    RecordUsageReport { from: String, report: UsageReport },
    /// Makes this ledger a redundant pair's, with the backup's share of every key in percent
    /// (`None`: not a pair).
    SetPairSplit { backup_percent: Option<u8> },
    /// The pair is back together: what each host that served alone holds in its share.
    MergeAlone { states: Vec<AloneState> },
}

impl Command {
    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::ImportKey { .. } => "import_key",
            Command::RemoveKey { .. } => "remove_key",
            Command::Checkout { .. } => "checkout",
            Command::Heartbeat { .. } => "heartbeat",
            Command::Checkin { .. } => "checkin",
            Command::ForceRelease { .. } => "force_release",
            Command::Expire => "expire",
            Command::BeginSync { .. } => "begin_sync",
            Command::CompleteSync { .. } => "complete_sync",
            Command::BlockSync { .. } => "block_sync",
            Command::RecordTrust { .. } => "record_trust",
            Command::RenewKeys => "renew_keys",
            Command::AllocateKey { .. } => "allocate_key",
            Command::AllocateKeyToGroups { .. } => "allocate_key_to_groups",
            Command::SetStationGroup { .. } => "set_station_group",
            Command::AllocateKeyToNeighbours { .. } => "allocate_key_to_neighbours",
            Command::Donate { .. } => "donate",
            Command::RenewDonations { .. } => "renew_donations",
            Command::EndDonation { .. } => "end_donation",
            Command::GrantReturned { .. } => "grant_returned",
            Command::AcceptGrant { .. } => "accept_grant",
            Command::ReleaseGrant { .. } => "release_grant",
            Command::RecordUsageReport { .. } => "record_usage_report",
            Command::SetPairSplit { .. } => "set_pair_split",
            Command::MergeAlone { .. } => "merge_alone",
        }
    }
}
