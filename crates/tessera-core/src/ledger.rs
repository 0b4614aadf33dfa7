//! The ledger: license keys, leases and the rules that tie them together.
//!
//! One file per concept: this one holds the types, `apply` and the shared helpers; `keys`
//! (import, removal, allocation), `leases` (checkout, heartbeat, checkin, expiry),
//! `renewal` (renewal keys and their take-over), `vendor_sync` (the sync and the trust list),
//! `donation` (a donor's grants), `received` (a receiver's grants and pools), `pair` (shares,
//! serving alone, the merge), `snapshot`, `views`, `lease_order` (sorted lease pages) and
//! `invariants`.
//!
//! `Ledger::apply` is the only way to change it. It is deterministic: it reads no clock and
//! draws no randomness; the time is the `at_ms` the primary stamped, never moving backwards
//! (an entry stamped earlier than the last applied one is applied at the last time).
//!
//! Rules:
//! - A lease is active while `at < expires_at_ms`. Every apply first ends the leases whose
//!   time has run out, so expiry is exact whatever command comes next; the primary also
//!   proposes `Expire` on a timer so idle servers free licenses and record the expiry.
//! - A station holds at most one license of a key, whichever of the key's components it
//!   uses. Asking again for a component covered by a key it holds returns that lease.
//! - When several keys cover a component, the station gets a license from the key that ends
//!   first (ties broken by key id), so longer-lived keys stay free for later.
//! - A lease never outlives its key: its expiry is capped at the key's `valid_until`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use smallvec::{SmallVec, smallvec};

use serde::{Deserialize, Serialize};

use crate::command::{Command, Stamped};
use crate::grant::{Grant, GrantError, GrantPayload, GrantSource};
use crate::identity::PublicKey;
use crate::key::{KeyError, LicenseKey, is_name};
use crate::outcome::{Outcome, Refusal};
use crate::sync::{LinkSide, ServerCertificate, SyncError, SyncResponse};

mod donation;
mod invariants;
mod keys;
mod leases;
pub use invariants::Violation;
mod lease_order;
mod pair;
mod received;
mod renewal;
mod snapshot;
mod vendor_sync;
mod views;

pub use lease_order::{BadCursor, LeaseCursor, LeaseOrder, LeaseSort, SortedLeasePage};

pub use crate::records::{
    AloneLease, AloneState, Donation, LeaseView, Outstanding, RenewalResult, Share, UsageReport,
};
pub use snapshot::Unverified;

/// Upper bound on a lease's time to live, so a mistaken request cannot pin a seat for years.
pub const LEASE_TTL_MS_MAX: i64 = 7 * 24 * 3600 * 1000;
/// The longest borrowing any key may allow (`key::BORROW_DAYS_MAX` days).
pub const BORROW_MS_MAX: i64 = crate::key::BORROW_DAYS_MAX as i64 * 24 * 3600 * 1000;
pub const FREE_TEXT_LENGTH_MAX: usize = 256;
pub const STATIONS_PER_GROUP_MAX: usize = 10_000;

/// What every replica of a server is configured with, identically.
#[derive(Clone, Debug, Default)]
pub struct LedgerConfig {
    /// Vendor root keys whose signatures this server accepts.
    pub trusted_vendors: Vec<PublicKey>,
    /// This license server's ID, if it has one; keys issued to another ID are refused.
    pub server_id: Option<String>,
    /// This server's identity key: a sync response must certify exactly this key.
    pub server_public_key: Option<PublicKey>,
    /// The largest clock difference tolerated between neighbour servers. A receiver stops
    /// using a grant this long before it ends; a donor takes the licenses back this long
    /// after, so two drifting clocks never see the same license live on both sides.
    pub clock_skew_max_ms: i64,
}

/// Upper bound on a donation's renewal period in a `Donate` command (what logs written by
/// earlier versions may hold; servers refuse to start with a period above
/// [`DONATION_RENEWAL_PERIOD_CAP_MS`]).
pub const DONATION_RENEWAL_PERIOD_MS_MAX: i64 = 366 * 24 * 3600 * 1000;
/// The longest a received grant is used after it is accepted (7 days), whatever the donor
/// signed, and the most `[licenses] donation_renewal_period` may be. A receiver keeps a
/// grant until it runs out, so this bounds how long a donor's recall, a donor's key removed,
/// or a donor put back from a backup (which lends the same seats again) leaves seats counted
/// twice (docs/security.md, T5/T7).
pub const DONATION_RENEWAL_PERIOD_CAP_MS: i64 = 7 * 24 * 3600 * 1000;
pub const USAGE_REPORT_COMPONENTS_MAX: usize = 1024;
/// Most leases [`Ledger::lease_overview`] looks at: a component held by few of a million
/// leases may list fewer holders than it has (its count is exact; `GET /v1/leases` pages).
pub const OVERVIEW_SCAN_MAX: usize = 100_000;

/// A grant this server received and uses as a pool of licenses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Received {
    pub grant: Grant,
    pub donor: String,
    pub serial: u64,
    pub licenses: u32,
    /// The grant's end minus the clock skew: this server issues nothing from it after.
    pub usable_until_ms: i64,
    pub accepted_at_ms: i64,
    /// Earlier grants of this pool the donor still counts and that give more than the
    /// current one at some time (more licenses, or a later end): (licenses, usable until).
    /// A donor that lowers or shortens a donation keeps counting the earlier grant until it
    /// lapses, so leases told an expiry under it keep it, and while it has more licenses new
    /// leases may use them too, ending with it (see `Ledger::lease_cap`).
    #[serde(default)]
    pub floor: Vec<(u32, i64)>,
    /// The pool serves from the key's start minus this (the clock skew when it was accepted):
    /// a renewal key's pool takes over exactly when the old key's pool stops, which is the
    /// skew before the old key's end (see `Ledger::pending_renewal`).
    #[serde(default)]
    pub starts_early_ms: i64,
}

impl Received {
    /// Every grant of the pool still usable: the current one first, then the floor.
    pub fn grants(&self) -> impl Iterator<Item = (u32, i64)> + '_ {
        std::iter::once((self.licenses, self.usable_until_ms)).chain(self.floor.iter().copied())
    }

    /// Licenses usable at `at`: the most any grant still usable then gives.
    pub fn capacity_at(&self, at: i64) -> u32 {
        self.grants()
            .filter(|(_, until)| *until > at)
            .map(|(licenses, _)| licenses)
            .max()
            .unwrap_or(0)
    }

    /// When the last grant of the pool stops being usable.
    pub fn usable_until_max_ms(&self) -> i64 {
        self.grants()
            .map(|(_, until)| until)
            .max()
            .unwrap_or(i64::MIN)
    }

    /// When the first grant of the pool stops being usable: re-grants end before it.
    pub fn usable_until_min_ms(&self) -> i64 {
        self.grants()
            .map(|(_, until)| until)
            .min()
            .unwrap_or(i64::MIN)
    }
}

/// The number after `previous` of a sequence others check for replays (a grant's serial per
/// vendor key and receiver, a sync request's sequence): also at least the entry's time in
/// milliseconds. A server rebuilt on an empty ledger (its disk lost) so numbers above
/// everything the lost ledger sent, and its receivers and the vendor, which refuse a number
/// at or below one they accepted, take it. These numbers are only ever compared.
fn next_number(previous: u64, at: i64) -> u64 {
    (previous + 1).max(u64::try_from(at).unwrap_or(0))
}

/// How far beyond this server's clock (and the clock skew allowed) a grant's serial may be.
/// Serials are the donor's time in ms, plus one per grant issued within the same ms.
const GRANT_SERIAL_AHEAD_MS: i64 = 60_000;

/// The pool id of a grant received from `donor` for vendor key `key_id`.
pub fn received_pool_id(key_id: &str, donor: &str) -> String {
    format!("{key_id}@{donor}")
}

/// Where this server stands with the vendor. Replicated, so every host of a domain knows
/// whether the server may issue from keys bound to its server ID.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    pub certificate: Option<ServerCertificate>,
    /// Sequence of the last completed sync; 0 before the first.
    pub completed_sequence: u64,
    /// The request a response must answer: (sequence, nonce).
    pub awaited: Option<(u64, String)>,
    pub last_sync_at_ms: Option<i64>,
    /// Renewal keys held for this server, by the key id they renew.
    pub renewals: BTreeMap<String, LicenseKey>,
    /// Key ids the vendor revoked at a sync: refused if added again (a tombstone that
    /// outlives the key).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub revoked: BTreeSet<String>,
    /// The sync chain: the hash of the last response accepted (`SyncResponse::chain_hash`),
    /// sent with every request so the authority sees clones and rollbacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_response: Option<String>,
    /// Sequence of the first request sent since the last accepted response (every retry
    /// after a lost answer carries the same one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_since: Option<u64>,
    /// The authority refused a sync as `server_cloned` or `server_rolled_back`: automatic
    /// syncs stop until a sync succeeds again (after the vendor's reset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<SyncBlock>,
    /// The vendor's time floor: the highest time the vendor signed that this server has seen
    /// (a sync response's and its certificate's `issued_at`, an imported key's). A clock
    /// below it is wrong: the server stops issuing until it is corrected (`docs/security.md`,
    /// T8). Set inside apply from signed documents, so every replica agrees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_time_ms: Option<i64>,
    /// The history heads the vendor countersigned last, per installation (each host of a
    /// domain reports its own): the next request recomputes its chains there.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub countersigned: BTreeMap<String, crate::sync::Countersigned>,
    /// The grant history of each neighbour link, as this server issued or accepted grants
    /// (reported at every sync; docs/security.md, T10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<crate::sync::LinkReport>,
    /// The fingerprints of the vendor keys the primary trusts, as last recorded
    /// (`RecordTrust`), sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted: Vec<String>,
    /// The trust list's changes, oldest first (the last [`crate::sync::TRUST_CHANGES_MAX`]),
    /// reported at every sync.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_changes: Vec<crate::sync::TrustChange>,
    /// Leases checked out in all (a lease renewed is counted once), reported at every sync:
    /// it only grows, so a ledger rewritten to forget checkouts reports less than the vendor
    /// already holds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub leases_issued: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// Why syncs are blocked: the authority's refusal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncBlock {
    /// `server_cloned` or `server_rolled_back`.
    pub code: String,
    pub message: String,
    pub at_ms: i64,
}

impl SyncState {
    /// The 366-day deadline: when the certificate runs out.
    pub fn deadline_ms(&self) -> Option<i64> {
        self.certificate
            .as_ref()
            .map(ServerCertificate::valid_until_ms)
    }

    pub fn is_synchronized(&self, at: i64) -> bool {
        self.deadline_ms().is_some_and(|deadline| at < deadline)
    }

    /// Raises the vendor's time floor to a time the vendor signed.
    fn observe_vendor_time(&mut self, signed_ms: i64) {
        self.vendor_time_ms = Some(self.vendor_time_ms.map_or(signed_ms, |t| t.max(signed_ms)));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Not valid yet.
    Pending,
    Active,
    Expired,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyView {
    /// The vendor key id, or `KEY@DONOR` for licenses received from a neighbour.
    pub id: String,
    pub key: LicenseKey,
    pub state: KeyState,
    /// Licenses this server may use or donate: the key's, or the received grant's.
    pub licenses: u32,
    pub in_use: u32,
    /// Leases that ended early (their grant was given back) whose stations may still use
    /// them until their expiry: counted as used until then.
    #[serde(default)]
    pub ended_early: u32,
    /// Licenses donated to neighbours and not yet back.
    pub donated: u32,
    /// Licenses a new lease could take here now: the licenses less those used, ended early
    /// and donated; while this host of a redundant pair serves alone, only what is left of
    /// its own share.
    pub free: u32,
    /// While this host of a redundant pair serves alone: the licenses of its own share (the
    /// most it may have in use until the pair is whole again); `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alone_share: Option<u32>,
    pub received: Option<Received>,
    pub meta: KeyMeta,
}

/// What the ledger knows about a key beyond the vendor's document: where it is allocated,
/// and how its automatic renewal went.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyMeta {
    /// Allocated to this server's stations. A key added by an automatic renewal that could
    /// not be allocated (fewer components or licenses) stays unallocated until an
    /// administrator allocates it.
    pub stations: bool,
    /// Also allocated to the stations of these groups (see `SetStationGroup`).
    #[serde(default)]
    pub groups: BTreeSet<String>,
    /// Neighbour servers (by server ID) the key is allocated to.
    #[serde(default)]
    pub neighbours: BTreeSet<String>,
    /// Set once a renewal key took this key's place; the key is removed when nothing uses it.
    pub replaced_by: Option<String>,
    /// The last renewal attempt's result for this key, for status and notifications.
    pub renewal: Option<RenewalResult>,
    /// Donations of the key this one renews that it could not carry (too few free licenses
    /// when it took over): tried again about every minute ([`PENDING_DONATION_RETRY_MS`])
    /// until they fit or end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_donations: Vec<PendingDonation>,
}

/// How often a donation a renewal could not carry is tried again (the manual: "the available
/// licenses are checked automatically approximately every minute").
pub const PENDING_DONATION_RETRY_MS: i64 = 60_000;

/// A neighbour's donation waiting for free licenses of a renewal key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingDonation {
    pub to: String,
    pub receiver_public_key: String,
    pub licenses: u32,
    pub donation_until_ms: i64,
    pub renewal_period_ms: i64,
    /// Why it did not fit at the last try.
    pub reason: String,
    pub next_try_ms: i64,
}

/// A key as kept in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    pub key: LicenseKey,
    pub meta: KeyMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<Received>,
}

#[derive(Clone, Debug)]
struct KeyRecord {
    key: LicenseKey,
    /// The key id (or received pool id) and components once, shared by every lease.
    id: Arc<str>,
    components: Vec<Arc<str>>,
    in_use: u32,
    /// Licenses counted as donated to neighbours (sum over this key's donations).
    donated: u32,
    /// Leases of this pool that ended early (the grant was given back) whose stations may
    /// still use them until their expiry: counted as in use until then.
    ended_early: u32,
    /// Of `in_use`, the leases paid by a pair's backup share (see `pair`).
    in_use_backup: u32,
    received: Option<Received>,
    meta: KeyMeta,
}

impl KeyRecord {
    fn new(key: LicenseKey, meta: KeyMeta) -> KeyRecord {
        let id = key.payload.key_id.clone();
        KeyRecord::with_id(&id, key, meta, None)
    }

    fn with_id(id: &str, key: LicenseKey, meta: KeyMeta, received: Option<Received>) -> KeyRecord {
        let components = match &received {
            Some(received) => received.grant.last().components.clone(),
            None => key.payload.components.clone(),
        };
        KeyRecord {
            id: Arc::from(id),
            components: components.iter().map(|c| Arc::from(c.as_str())).collect(),
            key,
            in_use: 0,
            donated: 0,
            ended_early: 0,
            in_use_backup: 0,
            received,
            meta,
        }
    }

    fn component(&self, name: &str) -> Option<&Arc<str>> {
        self.components.iter().find(|c| &***c == name)
    }

    fn covers(&self, component: &str) -> bool {
        self.component(component).is_some()
    }

    /// Licenses this server holds from the record at `at`: the key's, or the received
    /// grants'.
    fn licenses(&self, at: i64) -> u32 {
        match &self.received {
            Some(received) => received.capacity_at(at),
            None => self.key.payload.licenses,
        }
    }

    /// Licenses counted here at `at`: leases, leases that ended early, donations.
    fn used(&self) -> u32 {
        self.in_use + self.ended_early + self.donated
    }

    /// Licenses stations may take at `at`.
    fn free(&self, at: i64) -> u32 {
        self.licenses(at).saturating_sub(self.used())
    }

    /// Until when new leases and extensions may run: the key's end, or the current received
    /// grant's. (Leases already told a later expiry under an earlier grant keep it.)
    fn valid_until_ms(&self) -> i64 {
        let until = self.key.payload.valid_until_ms();
        match &self.received {
            Some(received) => until.min(received.usable_until_ms),
            None => until,
        }
    }
}

/// The (key id, lease id) pairs one station holds; almost always one, kept inline.
type StationLeases = SmallVec<[(Arc<str>, Arc<str>); 1]>;

/// A lease as the ledger keeps it: compact, because a server may hold a million of them.
/// Strings shared with keys and indexes are reference-counted, not copied.
#[derive(Clone, Debug)]
struct Lease {
    id: Arc<str>,
    key_id: Arc<str>,
    /// Almost always one component: kept inline, no allocation.
    components: SmallVec<[Arc<str>; 1]>,
    station: Arc<str>,
    user: Box<str>,
    host: Box<str>,
    issued_at_ms: i64,
    renewed_at_ms: i64,
    expires_at_ms: i64,
    /// A borrowing (see `LeaseView::borrowed`).
    borrowed: bool,
}

/// What [`Ledger::lease_overview`] returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseOverview {
    /// The first leases to expire.
    pub leases: Vec<LeaseView>,
    /// Every lease.
    pub total: usize,
    /// Per component: its first holders to expire (leases of the keys covering it), and how
    /// many there are.
    pub holders: BTreeMap<String, (Vec<LeaseView>, usize)>,
}

/// A lease in a page's heap, ordered by id.
struct ById<'a>(&'a Lease);

impl PartialEq for ById<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for ById<'_> {}

impl PartialOrd for ById<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ById<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.id.cmp(&other.0.id)
    }
}

/// Which leases a listing shows: each field given must match, exactly or, ending in `*`, by
/// prefix (`user=ann*`). `component` matches a lease of a key covering a matching component
/// (a lease lets its station use every component of its key; see `Ledger::lease_matcher`),
/// or a lease that asked for one.
#[derive(Clone, Debug, Default)]
pub struct LeaseFilter<'a> {
    pub component: Option<&'a str>,
    pub key: Option<&'a str>,
    pub station: Option<&'a str>,
    pub user: Option<&'a str>,
    pub host: Option<&'a str>,
}

impl LeaseFilter<'_> {
    /// Whether `value` matches `pattern` (exact, or a prefix when it ends in `*`).
    pub fn matches_text(pattern: &str, value: &str) -> bool {
        match pattern.strip_suffix('*') {
            Some(prefix) => value.starts_with(prefix),
            None => value == pattern,
        }
    }

    fn matches(&self, lease: &Lease) -> bool {
        let field = |pattern: Option<&str>, value: &str| {
            pattern.is_none_or(|pattern| Self::matches_text(pattern, value))
        };
        field(self.key, &lease.key_id)
            && field(self.station, &lease.station)
            && field(self.user, &lease.user)
            && field(self.host, &lease.host)
            && self.component.is_none_or(|pattern| {
                lease
                    .components
                    .iter()
                    .any(|component| Self::matches_text(pattern, component))
            })
    }
}

impl Lease {
    fn view(&self) -> LeaseView {
        LeaseView {
            lease_id: self.id.to_string(),
            key_id: self.key_id.to_string(),
            components: self.components.iter().map(|c| c.to_string()).collect(),
            station: self.station.to_string(),
            user: self.user.to_string(),
            host: self.host.to_string(),
            issued_at_ms: self.issued_at_ms,
            renewed_at_ms: self.renewed_at_ms,
            expires_at_ms: self.expires_at_ms,
            borrowed: self.borrowed,
        }
    }
}

/// The result of applying one entry: the outcome, and the leases that expired first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub outcome: Outcome,
    pub expired: Vec<LeaseView>,
}

/// The ledger's state as it is stored in a snapshot; indexes are rebuilt on restore.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerSnapshot {
    pub last_at_ms: i64,
    pub keys: Vec<StoredKey>,
    /// Stored as arrays, not objects: a million leases parse twice as fast without the
    /// field names.
    #[serde(with = "lease_rows")]
    pub leases: Vec<LeaseView>,
    #[serde(default)]
    pub groups: BTreeMap<String, BTreeSet<String>>,
    #[serde(default)]
    pub sync: SyncState,
    #[serde(default)]
    pub donations: Vec<Donation>,
    #[serde(default)]
    pub reports: BTreeMap<String, UsageReport>,
    #[serde(default)]
    pub accepted_serials: BTreeMap<String, u64>,
    #[serde(default)]
    pub issued_serials: BTreeMap<String, u64>,
    #[serde(default)]
    pub ended_early: BTreeMap<String, Vec<i64>>,
    #[serde(default)]
    pub pair_backup_percent: Option<u8>,
    /// Leases paid by a pair's backup share.
    #[serde(default)]
    pub backup_leases: Vec<String>,
    /// Leases that are borrowings (kept beside the lease rows, whose format predates them).
    #[serde(default)]
    pub borrowed_leases: Vec<String>,
    /// Per share, the latest epoch of a host's alone state merged (`MergeAlone`).
    #[serde(default)]
    pub pair_merged_epochs: BTreeMap<Share, u64>,
}

/// Leases in snapshots as `[id, key, [components], station, user, host, issued, renewed, expires]`.
mod lease_rows {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::LeaseView;

    type Row = (
        String,
        String,
        Vec<String>,
        String,
        String,
        String,
        i64,
        i64,
        i64,
    );
    type RowRef<'a> = (
        &'a str,
        &'a str,
        &'a [String],
        &'a str,
        &'a str,
        &'a str,
        i64,
        i64,
        i64,
    );

    pub fn serialize<S: Serializer>(
        leases: &[LeaseView],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(leases.iter().map(|l| -> RowRef<'_> {
            (
                &l.lease_id,
                &l.key_id,
                &l.components,
                &l.station,
                &l.user,
                &l.host,
                l.issued_at_ms,
                l.renewed_at_ms,
                l.expires_at_ms,
            )
        }))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<LeaseView>, D::Error> {
        let rows = Vec::<Row>::deserialize(deserializer)?;
        Ok(rows
            .into_iter()
            .map(|r| LeaseView {
                lease_id: r.0,
                key_id: r.1,
                components: r.2,
                station: r.3,
                user: r.4,
                host: r.5,
                issued_at_ms: r.6,
                renewed_at_ms: r.7,
                expires_at_ms: r.8,
                // Restored from `LedgerSnapshot::borrowed_leases`.
                borrowed: false,
            })
            .collect())
    }
}

#[derive(Clone, Debug)]
pub struct Ledger {
    config: LedgerConfig,
    last_at_ms: i64,
    keys: BTreeMap<String, KeyRecord>,
    /// Boxed: the table's slots stay small, which matters at a million leases because a
    /// hash table keeps up to twice as many slots as entries.
    leases: HashMap<Arc<str>, Box<Lease>>,
    /// station → [(key id, lease id)]: the one-license-per-station-per-key rule.
    by_station: HashMap<Arc<str>, StationLeases>,
    /// (expires at, lease id), so expiry touches only the leases that are due.
    expiry: BTreeSet<(i64, Arc<str>)>,
    sync: SyncState,
    /// Station groups: group name → station names.
    groups: BTreeMap<String, BTreeSet<String>>,
    /// Donations to neighbours, by (key or pool id, neighbour).
    donations: BTreeMap<(String, String), Donation>,
    /// The latest usage report of each neighbour that received licenses from this server.
    reports: BTreeMap<String, UsageReport>,
    /// The highest grant serial accepted per received pool, kept after the pool is gone so
    /// an old grant cannot be played back.
    accepted_serials: BTreeMap<String, u64>,
    /// The highest grant serial issued per (key, neighbour), kept after the donation is gone
    /// so a new donation to the same neighbour never reuses a serial it refused as spent.
    issued_serials: BTreeMap<String, u64>,
    /// Per received pool: expiries of its leases that ended early because the grant was
    /// given back. Their stations may use them until then (they hear of it at their next
    /// heartbeat at best), so they count against the pool if it comes back, and the donor
    /// hears of the return only once they ran out.
    ended_early: BTreeMap<String, Vec<i64>>,
    /// A redundant pair's shares, and the state of a host serving alone.
    pair: pair::PairState,
    /// When the next grant lapses (a donation's lease plus skew, or a received grant's end).
    grant_due_ms: i64,
}

impl Ledger {
    pub fn new(config: LedgerConfig) -> Ledger {
        Ledger {
            config,
            last_at_ms: i64::MIN,
            keys: BTreeMap::new(),
            leases: HashMap::new(),
            by_station: HashMap::new(),
            expiry: BTreeSet::new(),
            sync: SyncState::default(),
            groups: BTreeMap::new(),
            donations: BTreeMap::new(),
            reports: BTreeMap::new(),
            accepted_serials: BTreeMap::new(),
            issued_serials: BTreeMap::new(),
            ended_early: BTreeMap::new(),
            pair: pair::PairState::default(),
            grant_due_ms: i64::MAX,
        }
    }

    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// The latest time applied: the persisted high-water mark of time for clock checks.
    pub fn last_at_ms(&self) -> i64 {
        self.last_at_ms
    }

    /// The vendor's time floor (`SyncState::vendor_time_ms`): no correct clock reads less.
    pub fn vendor_time_ms(&self) -> Option<i64> {
        self.sync.vendor_time_ms
    }

    pub fn apply(&mut self, entry: &Stamped) -> Outcome {
        self.apply_recording(entry).outcome
    }

    /// Applies an entry and also reports the leases that ran out before it was applied, so
    /// usage history sees every expiry, whichever command noticed it.
    pub fn apply_recording(&mut self, entry: &Stamped) -> Applied {
        let at = entry.at_ms.max(self.last_at_ms);
        self.last_at_ms = at;
        // A renewal allocated in advance takes over when it becomes valid, before anything
        // expires at the old key's end: its leases and donations move to it, same lease ids.
        self.take_over_renewals(at);
        self.retry_pending_donations(at);
        // Leases of a received grant end no later than the grant: they are capped at it.
        let expired = self.end_due_leases(at);
        self.end_due_grants(at);
        let ended = expired.len() as u32;
        if let Some(refused) = self.refused_alone(&entry.command) {
            return Applied {
                outcome: refused,
                expired,
            };
        }
        let outcome = match &entry.command {
            Command::ImportKey { key } => self.import_key(key, at),
            Command::RemoveKey { key_id } => self.remove_key_by_admin(key_id, at),
            Command::Checkout {
                lease_id,
                component,
                station,
                user,
                host,
                lease_ttl_ms,
                borrow_ms,
            } => self.checkout(
                CheckoutRequest {
                    lease_id,
                    component,
                    station,
                    user,
                    host,
                    lease_ttl_ms: *lease_ttl_ms,
                    borrow_ms: *borrow_ms,
                },
                at,
            ),
            Command::Heartbeat {
                lease_id,
                lease_ttl_ms,
            } => self.heartbeat(lease_id, *lease_ttl_ms, at),
            Command::Checkin { lease_id } => self.release(lease_id),
            Command::ForceRelease { lease_id } => self.force_release(lease_id),
            Command::Expire => Outcome::Expired {
                leases_ended: ended,
            },
            Command::BeginSync { nonce } => self.begin_sync(nonce, at),
            Command::CompleteSync { response } => self.complete_sync(response, at),
            Command::BlockSync { code, message } => self.block_sync(code, message, at),
            Command::RecordTrust { fingerprints } => self.record_trust(fingerprints, at),
            Command::RenewKeys => self.renew_keys(at),
            Command::AllocateKey { key_id, stations } => self.allocate_key(key_id, *stations),
            Command::AllocateKeyToGroups { key_id, groups } => {
                self.allocate_key_to_groups(key_id, groups)
            }
            Command::AllocateKeyToNeighbours { key_id, neighbours } => {
                self.allocate_key_to_neighbours(key_id, neighbours)
            }
            Command::SetStationGroup { group, stations } => self.set_station_group(group, stations),
            Command::Donate {
                key_id,
                to,
                receiver_public_key,
                licenses,
                until_ms,
                renewal_period_ms,
            } => self.donate_command(
                DonateRequest {
                    key_id,
                    to,
                    receiver_public_key,
                    licenses: *licenses,
                    until_ms: *until_ms,
                    renewal_period_ms: *renewal_period_ms,
                },
                at,
            ),
            Command::RenewDonations { to } => self.renew_donations(to, at),
            Command::EndDonation { key_id, to } => self.end_donation_command(key_id, to),
            Command::GrantReturned { key_id, to, serial } => {
                self.grant_returned(key_id, to, *serial, at)
            }
            Command::AcceptGrant { grant } => self.accept_grant(grant, at),
            Command::ReleaseGrant { key_id } => self.release_grant(key_id, at),
            Command::RecordUsageReport { from, report } => self.record_usage_report(from, report),
            Command::SetPairSplit { backup_percent } => self.set_pair_split(*backup_percent, at),
            Command::MergeAlone { states } => self.merge_alone(states, at),
        };
        self.retire_replaced_keys(at);
        self.rebalance(at);
        #[cfg(debug_assertions)]
        if let Err(violation) = self.check_invariants() {
            panic!("ledger invariant violated after {entry:?}: {violation}");
        }
        Applied { outcome, expired }
    }
}

/// Everything in a snapshot but the leases.
struct RestoredHeader {
    last_at_ms: i64,
    sync: SyncState,
    groups: BTreeMap<String, BTreeSet<String>>,
    keys: Vec<StoredKey>,
    donations: Vec<Donation>,
    reports: BTreeMap<String, UsageReport>,
    accepted_serials: BTreeMap<String, u64>,
    issued_serials: BTreeMap<String, u64>,
    ended_early: BTreeMap<String, Vec<i64>>,
    pair_backup_percent: Option<u8>,
    pair_merged_epochs: BTreeMap<Share, u64>,
}

/// One lease as read back from a snapshot, whatever owns its strings.
struct RestoredLease<'a, S> {
    id: &'a str,
    key_id: &'a str,
    components: &'a [S],
    station: &'a str,
    user: &'a str,
    host: &'a str,
    /// (issued, renewed, expires)
    times_ms: (i64, i64, i64),
}

struct CheckoutRequest<'a> {
    lease_id: &'a str,
    component: &'a str,
    station: &'a str,
    user: &'a str,
    host: &'a str,
    lease_ttl_ms: i64,
    borrow_ms: i64,
}

/// A lease of `record` is counted this long past the time its station must renew it: the
/// key's `grace_minutes`, during which the application keeps running without a server (the
/// SDK holds a lease until its token's end, which includes it). So the seat is never given
/// to another station while the application may still run on it.
fn grace_ms(record: &KeyRecord) -> i64 {
    i64::from(record.key.payload.grace_minutes) * 60_000
}

/// Whether `record` allows a borrowing of `borrow_ms` (0: not a borrowing, always allowed).
fn allows_borrowing(record: &KeyRecord, borrow_ms: i64) -> bool {
    borrow_ms <= i64::from(record.key.payload.max_borrow_days) * 24 * 3600 * 1000
}

fn key_state(record: &KeyRecord, at: i64) -> KeyState {
    if at < key_start_ms(record) {
        KeyState::Pending
    } else if at < record.valid_until_ms() {
        KeyState::Active
    } else {
        KeyState::Expired
    }
}

/// When a key serves from: its start, for a received pool the skew earlier.
fn key_start_ms(record: &KeyRecord) -> i64 {
    let early = record.received.as_ref().map_or(0, |r| r.starts_early_ms);
    record.key.payload.valid_from_ms().saturating_sub(early)
}

fn is_active(record: &KeyRecord, at: i64) -> bool {
    key_state(record, at) == KeyState::Active
}

fn invalid(reason: String) -> Outcome {
    Outcome::Refused {
        refusal: Refusal::InvalidRequest { reason },
    }
}

fn sync_refused(error: SyncError) -> Outcome {
    Outcome::Refused {
        refusal: Refusal::SyncRejected { error },
    }
}

fn lease_not_found(lease_id: &str) -> Outcome {
    Outcome::Refused {
        refusal: Refusal::LeaseNotFound {
            lease_id: lease_id.into(),
        },
    }
}

/// The most licenses one donation from `record` may give: a received grant's current count
/// (the chain shows it; an earlier, larger grant still counted does not travel along).
fn regrant_limit(record: &KeyRecord) -> u32 {
    record
        .received
        .as_ref()
        .map_or(u32::MAX, |received| received.licenses)
}

fn donation_not_found(key_id: &str, to: &str) -> Outcome {
    Outcome::Refused {
        refusal: Refusal::DonationNotFound {
            key_id: key_id.into(),
            to: to.into(),
        },
    }
}

fn format_ms(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ms.to_string())
}

/// Adds a new grant; drops older ones the new grant covers (no more licenses, no later end).
fn push_outstanding(outstanding: &mut Vec<Outstanding>, new: Outstanding) {
    outstanding.retain(|o| o.licenses > new.licenses || o.lease_until_ms > new.lease_until_ms);
    outstanding.push(new);
}

struct DonateRequest<'a> {
    key_id: &'a str,
    to: &'a str,
    receiver_public_key: &'a str,
    licenses: u32,
    until_ms: i64,
    renewal_period_ms: i64,
}
