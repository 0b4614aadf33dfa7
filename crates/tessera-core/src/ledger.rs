//! The ledger: license keys, leases and the rules that tie them together.
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
pub use invariants::Violation;
mod lease_order;
mod pair;
mod snapshot;
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

    fn import_key(&mut self, key: &LicenseKey, at: i64) -> Outcome {
        let refuse = |error: KeyError| Outcome::Refused {
            refusal: Refusal::KeyRejected { error },
        };
        let payload = match key.verify(&self.config.trusted_vendors) {
            Ok(payload) => payload,
            Err(error) => return refuse(error),
        };
        if self.sync.revoked.contains(&payload.key_id) {
            return refuse(KeyError::Revoked {
                key_id: payload.key_id.clone(),
            });
        }
        if payload.valid_until_ms() <= at {
            return refuse(KeyError::Expired {
                key_id: payload.key_id.clone(),
                valid_until: payload.valid_until.to_string(),
            });
        }
        if let Some(issued_to) = &payload.server_id
            && self.config.server_id.as_deref() != Some(issued_to.as_str())
        {
            return refuse(KeyError::OtherServer {
                key_id: payload.key_id.clone(),
                issued_to: issued_to.clone(),
                this_server: self
                    .config
                    .server_id
                    .clone()
                    .unwrap_or_else(|| "no server ID".into()),
            });
        }
        if let Some(pool) = self
            .keys
            .values()
            .find(|r| r.received.is_some() && r.key.key_id() == payload.key_id)
        {
            return invalid(format!(
                "this server already receives licenses of key {} from a neighbour ({}): importing the key as well would count them twice",
                payload.key_id, pool.id
            ));
        }
        if self.keys.contains_key(&payload.key_id) {
            return Outcome::Refused {
                refusal: Refusal::KeyAlreadyImported {
                    key_id: payload.key_id.clone(),
                },
            };
        }
        let key_id = payload.key_id.clone();
        self.sync
            .observe_vendor_time(payload.issued_at.as_millisecond());
        self.keys.insert(
            key_id.clone(),
            KeyRecord::new(
                key.clone(),
                KeyMeta {
                    stations: true,
                    ..KeyMeta::default()
                },
            ),
        );
        Outcome::KeyImported { key_id }
    }

    /// The administrator's removal: refused while a neighbour may still hold a grant of the
    /// key. Removing the key (and adding it again) would otherwise forget those donated seats
    /// while the neighbour keeps using them. End the donation first; its grants run out within
    /// a renewal period.
    fn remove_key_by_admin(&mut self, key_id: &str, at: i64) -> Outcome {
        let donated_until = self
            .donations
            .iter()
            .filter(|((from, _), _)| from == key_id)
            .flat_map(|(_, donation)| donation.outstanding.iter())
            .map(|grant| grant.lease_until_ms)
            .filter(|until| *until > at)
            .max();
        if self.keys.contains_key(key_id)
            && let Some(until_ms) = donated_until
        {
            return Outcome::Refused {
                refusal: Refusal::KeyHasDonations {
                    key_id: key_id.into(),
                    until_ms,
                },
            };
        }
        self.remove_key(key_id)
    }

    /// Removes a key (the administrator's removal, checked above, or the vendor's revocation
    /// at sync, which always applies).
    fn remove_key(&mut self, key_id: &str) -> Outcome {
        if !self.keys.contains_key(key_id) {
            return Outcome::Refused {
                refusal: Refusal::KeyNotFound {
                    key_id: key_id.into(),
                },
            };
        }
        // Borrowings run offline until their end: removing the key (and adding it again)
        // must not free their seats meanwhile.
        let borrowed_until = self
            .leases
            .values()
            .filter(|lease| lease.borrowed && &*lease.key_id == key_id)
            .map(|lease| lease.expires_at_ms)
            .max();
        if let Some(until_ms) = borrowed_until {
            return Outcome::Refused {
                refusal: Refusal::KeyHasBorrowings {
                    key_id: key_id.into(),
                    until_ms,
                },
            };
        }
        let leases_ended = self.end_leases_of(key_id);
        // Its donations go with it: receivers keep their grants until they run out.
        self.donations.retain(|(from, _), _| from != key_id);
        self.keys.remove(key_id);
        self.recount_donated();
        Outcome::KeyRemoved {
            key_id: key_id.into(),
            leases_ended,
        }
    }

    /// Ends every lease of a key (or received pool); returns how many.
    fn end_leases_of(&mut self, key_id: &str) -> u32 {
        let doomed: Vec<Arc<str>> = self
            .leases
            .values()
            .filter(|lease| &*lease.key_id == key_id)
            .map(|lease| lease.id.clone())
            .collect();
        for lease_id in &doomed {
            self.remove_lease(lease_id);
        }
        doomed.len() as u32
    }

    fn checkout(&mut self, request: CheckoutRequest<'_>, at: i64) -> Outcome {
        if let Err(reason) = request.validate() {
            return Outcome::Refused {
                refusal: Refusal::InvalidRequest { reason },
            };
        }
        let component = request.component;
        let synchronized = self.sync.is_synchronized(at);
        let (covering, unsynchronized): (Vec<&KeyRecord>, Vec<&KeyRecord>) = self
            .keys
            .values()
            .filter(|record| {
                self.allocated_to(record, request.station)
                    && is_active(record, at)
                    && record.covers(component)
            })
            // Received grants carry their donor's certificate limit in their chain.
            .partition(|record| {
                synchronized || record.key.payload.server_id.is_none() || record.received.is_some()
            });
        // A borrowing only from keys that allow it for that long.
        let (covering, too_short): (Vec<&KeyRecord>, Vec<&KeyRecord>) = covering
            .into_iter()
            .partition(|record| allows_borrowing(record, request.borrow_ms));
        if covering.is_empty() && !too_short.is_empty() {
            let max_days = too_short
                .iter()
                .map(|record| record.key.payload.max_borrow_days)
                .max()
                .unwrap_or(0);
            return Outcome::Refused {
                refusal: Refusal::BorrowNotAllowed {
                    component: component.into(),
                    requested_hours: (request.borrow_ms + 3_599_999) / 3_600_000,
                    max_days,
                },
            };
        }
        if covering.is_empty() {
            let refusal = if unsynchronized.is_empty() {
                Refusal::ComponentNotLicensed {
                    component: component.into(),
                }
            } else {
                Refusal::ServerNotSynchronized {
                    deadline_ms: self.sync.deadline_ms(),
                }
            };
            return Outcome::Refused { refusal };
        }
        // The same station asking again: hand back the license it holds (idempotent). If it
        // holds several covering keys, the one chosen is the one a new lease would use.
        let held = covering
            .iter()
            .filter_map(|record| {
                let lease_id = self.station_lease(request.station, &record.id)?;
                Some(((record.valid_until_ms(), &*record.id), lease_id))
            })
            .min()
            .map(|(_, lease_id)| lease_id.clone());
        if let Some(lease_id) = held {
            if let Err(refused) = self.take_over(&lease_id, at) {
                return *refused;
            }
            let record = &self.keys[&*self.leases[&lease_id].key_id];
            let wanted = self.borrow_cap(
                record,
                &request,
                at + request.wanted_ms() + grace_ms(record),
            );
            let until = self.lease_cap(record, Some(&lease_id), at, wanted);
            let shared = record.component(component).cloned();
            let lease = self.extend_lease(&lease_id, at, until);
            lease.borrowed |= request.borrow_ms > 0;
            if let Some(shared) = shared
                && let Err(position) = lease.components.binary_search(&shared)
            {
                lease.components.insert(position, shared);
            }
            return Outcome::LeaseGranted {
                lease: lease.view(),
                created: false,
            };
        }
        let licenses: u32 = covering
            .iter()
            .map(|r| r.licenses(at).saturating_sub(r.donated))
            .sum();
        let Some(chosen) = covering
            .iter()
            .filter(|record| self.new_lease_share(record, at).is_some())
            .min_by_key(|record| (record.valid_until_ms(), record.id.clone()))
        else {
            let alone_share = self.pair.alone.map(|share| {
                covering
                    .iter()
                    .map(|record| {
                        let (primary, backup) = self.share_sizes(record, at);
                        match share {
                            Share::Primary => primary,
                            Share::Backup => backup,
                        }
                    })
                    .sum()
            });
            return Outcome::Refused {
                refusal: Refusal::NoLicensesAvailable {
                    component: component.into(),
                    licenses,
                    alone_share,
                },
            };
        };
        if self.leases.contains_key(request.lease_id) {
            return Outcome::Refused {
                refusal: Refusal::InvalidRequest {
                    reason: format!("lease id {} is already in use", request.lease_id),
                },
            };
        }
        let wanted = self.borrow_cap(
            chosen,
            &request,
            at + request.wanted_ms() + grace_ms(chosen),
        );
        let expires_at_ms = self.lease_cap(chosen, None, at, wanted);
        let share = self.new_lease_share(chosen, at).expect("chosen for it");
        // A station already indexed shares its name with the index entry.
        let station = self
            .by_station
            .get_key_value(request.station)
            .map(|(station, _)| station.clone())
            .unwrap_or_else(|| Arc::from(request.station));
        let lease = Lease {
            id: Arc::from(request.lease_id),
            key_id: chosen.id.clone(),
            components: smallvec![chosen.component(component).expect("covers").clone()],
            station,
            user: request.user.into(),
            host: request.host.into(),
            issued_at_ms: at,
            renewed_at_ms: at,
            expires_at_ms,
            borrowed: request.borrow_ms > 0,
        };
        let view = lease.view();
        let id = lease.id.clone();
        self.insert_lease(lease);
        self.tag(&id, share);
        self.sync.leases_issued += 1;
        Outcome::LeaseGranted {
            lease: view,
            created: true,
        }
    }

    /// A borrowing is checked offline by the application against what came with it, so it
    /// ends when that stops checking out: a donated license with the grant it was given
    /// under, a key bound to this server (or requiring a certified one) with this server's
    /// certificate (the 366-day rule).
    fn borrow_cap(&self, record: &KeyRecord, request: &CheckoutRequest<'_>, wanted: i64) -> i64 {
        if request.borrow_ms == 0 {
            return wanted;
        }
        if let Some(received) = &record.received {
            return wanted.min(received.usable_until_ms);
        }
        let payload = &record.key.payload;
        if payload.server_id.is_some() || payload.certified_server_required {
            return wanted.min(self.sync.deadline_ms().unwrap_or(i64::MAX));
        }
        wanted
    }

    fn begin_sync(&mut self, nonce: &str, at: i64) -> Outcome {
        if self.config.server_id.is_none() {
            return sync_refused(SyncError::NoServerId);
        }
        if !is_name(nonce) {
            return Outcome::Refused {
                refusal: Refusal::InvalidRequest {
                    reason: "sync nonce is not a valid name".into(),
                },
            };
        }
        // Above every request sent so far, not only the completed ones: if an answer was
        // lost, the retry must not look like a replay to the authority.
        let last_sent = self
            .sync
            .awaited
            .as_ref()
            .map_or(0, |(sequence, _)| *sequence);
        let sequence = next_number(self.sync.completed_sequence.max(last_sent), at);
        self.sync.awaited = Some((sequence, nonce.to_string()));
        let pending_since = *self.sync.pending_since.get_or_insert(sequence);
        Outcome::SyncBegun {
            sequence,
            nonce: nonce.to_string(),
            last_response: self.sync.last_response.clone(),
            pending_since: Some(pending_since),
        }
    }

    /// The authority refused this server's sync chain: recorded, so that no host of the
    /// domain syncs on schedule again until a sync succeeds.
    fn record_trust(&mut self, fingerprints: &[String], at: i64) -> Outcome {
        let mut now: Vec<String> = fingerprints.to_vec();
        now.sort();
        now.dedup();
        let added: Vec<String> = now
            .iter()
            .filter(|f| !self.sync.trusted.contains(f))
            .cloned()
            .collect();
        let removed: Vec<String> = self
            .sync
            .trusted
            .iter()
            .filter(|f| !now.contains(f))
            .cloned()
            .collect();
        if !added.is_empty() || !removed.is_empty() {
            if let Ok(at) = jiff::Timestamp::from_millisecond(at) {
                self.sync.trust_changes.push(crate::sync::TrustChange {
                    at,
                    added: added.clone(),
                    removed: removed.clone(),
                });
            }
            let excess = self
                .sync
                .trust_changes
                .len()
                .saturating_sub(crate::sync::TRUST_CHANGES_MAX);
            self.sync.trust_changes.drain(..excess);
            self.sync.trusted = now;
        }
        Outcome::TrustRecorded { added, removed }
    }

    fn block_sync(&mut self, code: &str, message: &str, at: i64) -> Outcome {
        self.sync.blocked = Some(SyncBlock {
            code: code.to_string(),
            message: message.to_string(),
            at_ms: at,
        });
        Outcome::SyncBlocked {
            code: code.to_string(),
        }
    }

    /// Verifies a vendor response completely before changing anything, then applies it.
    fn complete_sync(&mut self, response: &SyncResponse, at: i64) -> Outcome {
        let Some(server_id) = self.config.server_id.clone() else {
            return sync_refused(SyncError::NoServerId);
        };
        let payload = match response.verify(&self.config.trusted_vendors) {
            Ok(payload) => payload,
            Err(error) => return sync_refused(error),
        };
        for (what, for_server) in [
            ("sync response", &payload.server_id),
            ("server certificate", &payload.certificate.payload.server_id),
        ] {
            if for_server != &server_id {
                return sync_refused(SyncError::OtherServer {
                    what: what.into(),
                    for_server: for_server.clone(),
                    this_server: server_id,
                });
            }
        }
        let answered = (payload.sequence, payload.request_nonce.clone());
        if self.sync.awaited.as_ref() != Some(&answered) {
            return sync_refused(SyncError::NotAwaited {
                sequence: payload.sequence,
                nonce: payload.request_nonce.clone(),
                expected: match &self.sync.awaited {
                    Some((sequence, nonce)) => format!("{sequence} ({nonce})"),
                    None => "none: export a new request first".into(),
                },
            });
        }
        if let Some(ours) = &self.config.server_public_key
            && payload.certificate.payload.public_key != ours.to_base64()
        {
            return sync_refused(SyncError::WrongServerKey {
                certified: payload.certificate.payload.public_key.clone(),
                ours: ours.to_base64(),
            });
        }
        let mut imported = Vec::new();
        for key in &payload.keys {
            if self.keys.contains_key(key.key_id()) {
                continue;
            }
            // A key that fails (expired meanwhile, say) is skipped; the rest still apply.
            if let Outcome::KeyImported { key_id } = self.import_key(key, at) {
                imported.push(key_id);
            }
        }
        let mut revoked = Vec::new();
        for key_id in &payload.revoked {
            self.sync.revoked.insert(key_id.clone());
            if let Outcome::KeyRemoved { key_id, .. } = self.remove_key(key_id) {
                revoked.push(key_id);
            }
        }
        let mut renewals = Vec::new();
        for key in &payload.renewals {
            let Ok(renewal) = key.verify(&self.config.trusted_vendors) else {
                continue;
            };
            if let Some(renews) = &renewal.renews {
                renewals.push(renewal.key_id.clone());
                self.sync.renewals.insert(renews.clone(), key.clone());
            }
        }
        self.sync.certificate = Some(payload.certificate.clone());
        self.sync.completed_sequence = payload.sequence;
        self.sync.awaited = None;
        self.sync.last_response = Some(response.chain_hash());
        self.sync.pending_since = None;
        self.sync.blocked = None;
        self.sync.last_sync_at_ms = Some(at);
        if let Some(countersigned) = &payload.countersigned {
            self.sync
                .countersigned
                .insert(countersigned.installation.clone(), countersigned.clone());
        }
        self.sync
            .observe_vendor_time(payload.issued_at.as_millisecond());
        self.sync
            .observe_vendor_time(payload.certificate.payload.issued_at.as_millisecond());
        Outcome::Synced {
            sequence: payload.sequence,
            imported,
            revoked,
            renewals,
            certificate_valid_until_ms: payload.certificate.valid_until_ms(),
        }
    }

    fn allocate_key(&mut self, key_id: &str, stations: bool) -> Outcome {
        let Some(record) = self.keys.get_mut(key_id) else {
            return Outcome::Refused {
                refusal: Refusal::KeyNotFound {
                    key_id: key_id.into(),
                },
            };
        };
        record.meta.stations = stations;
        Outcome::KeyAllocated {
            key_id: key_id.into(),
            stations,
        }
    }

    /// Whether a key serves this station: allocated to all stations, or to a group of it.
    fn allocated_to(&self, record: &KeyRecord, station: &str) -> bool {
        record.meta.stations
            || record.meta.groups.iter().any(|group| {
                self.groups
                    .get(group)
                    .is_some_and(|members| members.contains(station))
            })
    }

    fn allocate_key_to_groups(&mut self, key_id: &str, groups: &[String]) -> Outcome {
        if let Some(bad) = groups.iter().find(|g| !is_name(g)) {
            return invalid(format!("group {bad:?} is not a valid name"));
        }
        let Some(record) = self.keys.get_mut(key_id) else {
            return Outcome::Refused {
                refusal: Refusal::KeyNotFound {
                    key_id: key_id.into(),
                },
            };
        };
        record.meta.groups = groups.iter().cloned().collect();
        Outcome::KeyAllocatedToGroups {
            key_id: key_id.into(),
            groups: record.meta.groups.iter().cloned().collect(),
        }
    }

    fn allocate_key_to_neighbours(&mut self, key_id: &str, neighbours: &[String]) -> Outcome {
        if let Some(bad) = neighbours.iter().find(|n| !is_name(n)) {
            return invalid(format!("neighbour {bad:?} is not a valid server ID"));
        }
        let Some(record) = self.keys.get_mut(key_id) else {
            return Outcome::Refused {
                refusal: Refusal::KeyNotFound {
                    key_id: key_id.into(),
                },
            };
        };
        record.meta.neighbours = neighbours.iter().cloned().collect();
        Outcome::KeyAllocatedToNeighbours {
            key_id: key_id.into(),
            neighbours: record.meta.neighbours.iter().cloned().collect(),
        }
    }

    fn set_station_group(&mut self, group: &str, stations: &[String]) -> Outcome {
        if !is_name(group) {
            return invalid(format!("group {group:?} is not a valid name"));
        }
        if stations.len() > STATIONS_PER_GROUP_MAX {
            return invalid(format!(
                "a group holds at most {STATIONS_PER_GROUP_MAX} stations"
            ));
        }
        if stations
            .iter()
            .any(|s| s.is_empty() || s.chars().count() > FREE_TEXT_LENGTH_MAX)
        {
            return invalid(format!(
                "station names have 1 to {FREE_TEXT_LENGTH_MAX} characters"
            ));
        }
        if stations.is_empty() {
            self.groups.remove(group);
        } else {
            self.groups
                .insert(group.to_string(), stations.iter().cloned().collect());
        }
        Outcome::StationGroupSet {
            group: group.into(),
            stations: self.groups.get(group).map_or(0, |m| m.len() as u32),
        }
    }

    pub fn station_groups(&self) -> &BTreeMap<String, BTreeSet<String>> {
        &self.groups
    }

    /// The renewal candidates: renewal keys held from the vendor, and keys already imported
    /// (by an administrator) that name a key they renew. Each as (old key id, renewal key).
    fn renewal_candidates(&self) -> Vec<(String, LicenseKey)> {
        let mut candidates: BTreeMap<String, LicenseKey> = self.sync.renewals.clone();
        for record in self.keys.values().filter(|r| r.received.is_none()) {
            if let Some(old) = &record.key.payload.renews {
                candidates
                    .entry(old.clone())
                    .or_insert_with(|| record.key.clone());
            }
        }
        candidates
            .into_iter()
            .filter(|(old, renewal)| {
                self.keys.get(old).is_some_and(|record| {
                    record.received.is_none()
                        && record.meta.replaced_by.as_deref() != Some(renewal.key_id())
                })
            })
            .collect()
    }

    /// Automatic key renewal, as the vendor's manual describes it: a renewal key with the
    /// same or more components and at least as many licenses is added and allocated to every
    /// object of the old key; otherwise it is added but not allocated, with the reason.
    fn renew_keys(&mut self, at: i64) -> Outcome {
        let mut renewed = Vec::new();
        let (mut leases_moved, mut leases_ended) = (0, 0);
        for (old_id, renewal) in self.renewal_candidates() {
            self.sync.renewals.remove(&old_id);
            let renewal_id = renewal.key_id().to_string();
            if !self.keys.contains_key(&renewal_id) {
                match self.import_key(&renewal, at) {
                    Outcome::KeyImported { .. } => {
                        // Allocation is decided below, not by the import default.
                        self.keys
                            .get_mut(&renewal_id)
                            .expect("imported")
                            .meta
                            .stations = false;
                    }
                    Outcome::Refused { refusal } => {
                        let result = RenewalResult::NotAllocated {
                            renewal_key_id: renewal_id,
                            reason: refusal.to_string(),
                        };
                        self.keys.get_mut(&old_id).expect("candidate").meta.renewal =
                            Some(result.clone());
                        renewed.push((old_id, result));
                        continue;
                    }
                    other => unreachable!("import answered {other:?}"),
                }
            }
            let old = &self.keys[&old_id];
            let new = &self.keys[&renewal_id];
            let missing: Vec<&String> = old
                .key
                .payload
                .components
                .iter()
                .filter(|c| !new.key.payload.covers(c))
                .collect();
            let mut reasons = Vec::new();
            if !missing.is_empty() {
                reasons.push(format!(
                    "the renewal key {renewal_id} does not license {}",
                    missing
                        .iter()
                        .map(|c| c.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if new.key.payload.licenses < old.key.payload.licenses {
                reasons.push(format!(
                    "the renewal key {renewal_id} has {} licenses, fewer than the {} of {old_id}",
                    new.key.payload.licenses, old.key.payload.licenses
                ));
            }
            let result = if reasons.is_empty() {
                let old_stations = old.meta.stations;
                let old_groups = old.meta.groups.clone();
                let old_neighbours = old.meta.neighbours.clone();
                let renewal_active = key_state(new, at) == KeyState::Active;
                let new_meta = &mut self.keys.get_mut(&renewal_id).expect("renewal").meta;
                new_meta.stations |= old_stations;
                new_meta.groups.extend(old_groups);
                new_meta.neighbours.extend(old_neighbours);
                let old = self.keys.get_mut(&old_id).expect("old");
                old.meta.replaced_by = Some(renewal_id.clone());
                if renewal_active {
                    // The renewal serves from now on: move the old key's leases onto it.
                    let (moved, ended) = self.renewal_takes_over(&old_id, &renewal_id, at);
                    leases_moved += moved;
                    leases_ended += ended;
                } else {
                    // Neighbours get the renewal's grants now, to use when it takes over.
                    self.continue_donations(&old_id, &renewal_id, at);
                }
                // Otherwise it takes over when it becomes valid (`take_over_renewals`);
                // until then the old key's leases may run until the renewal's end.
                RenewalResult::Allocated {
                    renewal_key_id: renewal_id,
                }
            } else {
                RenewalResult::NotAllocated {
                    renewal_key_id: renewal_id,
                    reason: reasons.join("; "),
                }
            };
            self.keys.get_mut(&old_id).expect("old").meta.renewal = Some(result.clone());
            renewed.push((old_id, result));
        }
        Outcome::KeysRenewed {
            renewed,
            leases_moved,
            leases_ended,
        }
    }

    /// The renewal key allocated to take over from `record` when it becomes valid, with no gap
    /// between the two keys: the old key's leases may run until its end.
    ///
    /// The same for a received pool whose donor sent, in advance, a grant of the key that
    /// renews it: the new pool takes over when the old one stops (its grant's end less the
    /// skew, when the new pool starts: `Received::starts_early_ms`).
    fn pending_renewal(&self, record: &KeyRecord) -> Option<&KeyRecord> {
        // `replaced_by` is set only when the renewal was allocated (a later renewal result for
        // another candidate does not undo it).
        let renewal_id = record.meta.replaced_by.as_deref()?;
        let renewal = self.keys.get(renewal_id)?;
        let outlives = match (&record.received, &renewal.received) {
            (None, None) => renewal.valid_until_ms() > record.valid_until_ms(),
            // Pools: the keys' ends decide (both grants are renewed together, so their ends
            // are often equal).
            (Some(old), Some(new)) => {
                old.donor == new.donor
                    && renewal.key.payload.valid_until_ms() > record.key.payload.valid_until_ms()
            }
            _ => false,
        };
        (outlives && key_start_ms(renewal) <= record.valid_until_ms()).then_some(renewal)
    }

    /// Whether `key_id` is the renewal allocated to take over from another key in advance.
    fn is_pending_renewal(&self, key_id: &str) -> bool {
        self.keys.values().any(|record| {
            record.meta.replaced_by.as_deref() == Some(key_id)
                && self
                    .pending_renewal(record)
                    .is_some_and(|renewal| &*renewal.id == key_id)
        })
    }

    /// Whether licenses of `record` may be donated (or a donation renewed) at `at`: an active
    /// key, or the renewal allocated in advance to a key, so that the neighbours hold its
    /// grants before it takes over and go on without a gap.
    fn donatable(&self, record: &KeyRecord, at: i64) -> bool {
        match key_state(record, at) {
            KeyState::Active => true,
            KeyState::Pending => self.is_pending_renewal(&record.id),
            KeyState::Expired => false,
        }
    }

    /// Until when a lease of `record` may run: its end, or, when an allocated renewal takes
    /// over without a gap, the renewal's end (the lease moves to it at the takeover).
    fn carry_until_ms(&self, record: &KeyRecord) -> i64 {
        self.pending_renewal(record)
            .map_or(record.valid_until_ms(), KeyRecord::valid_until_ms)
    }

    /// Renewals allocated in advance whose time has come: each takes over its old key's
    /// leases (same ids, same expiries) and donations, so stations and neighbours go on
    /// without a gap at the old key's end.
    fn take_over_renewals(&mut self, at: i64) {
        let due: Vec<(String, String)> = self
            .keys
            .values()
            .filter(|record| record.meta.replaced_by.is_some())
            .filter(|record| {
                record.meta.stations
                    || record.in_use > 0
                    || self
                        .donations
                        .values()
                        .any(|d| d.key_id == *record.id && !d.ended)
            })
            .filter_map(|record| {
                let renewal = self.pending_renewal(record)?;
                is_active(renewal, at).then(|| (record.id.to_string(), renewal.id.to_string()))
            })
            .collect();
        for (old_id, renewal_id) in due {
            self.renewal_takes_over(&old_id, &renewal_id, at);
        }
    }

    /// The renewal serves from now on: the old key serves no station any more, its leases
    /// and donations move to the renewal. Returns (leases moved, leases ended).
    fn renewal_takes_over(&mut self, old_id: &str, renewal_id: &str, at: i64) -> (u32, u32) {
        if let Some(old) = self.keys.get_mut(old_id) {
            old.meta.stations = false;
            old.meta.groups.clear();
        }
        let moved = self.move_leases(old_id, renewal_id);
        self.move_donations(old_id, renewal_id, at);
        moved
    }

    /// Moves leases from one key to another while it has free licenses; the rest end, and
    /// their stations get a license again at their next checkout if one is free.
    fn move_leases(&mut self, from: &str, to: &str) -> (u32, u32) {
        let mut ids: Vec<Arc<str>> = self
            .leases
            .values()
            .filter(|lease| &*lease.key_id == from)
            .map(|lease| lease.id.clone())
            .collect();
        ids.sort();
        let (mut moved, mut ended) = (0, 0);
        let at = self.last_at_ms;
        for lease_id in ids {
            let mut lease = self.remove_lease(&lease_id).expect("listed");
            let target = &self.keys[to];
            let taken = self.station_lease(&lease.station, to).is_some();
            if target.free(at) > 0 && !taken {
                let until = self.lease_cap(target, None, at, lease.expires_at_ms);
                let target = &self.keys[to];
                lease.key_id = target.id.clone();
                lease.components = lease
                    .components
                    .iter()
                    .filter_map(|c| target.component(c).cloned())
                    .collect();
                lease.expires_at_ms = until;
                self.insert_lease(lease);
                moved += 1;
            } else {
                // A received grant's donor counts it until it lapses or comes back, and the
                // station may use it until it hears otherwise: it still counts there. (A
                // vendor key's renewal ends them outright, as the manual says.)
                if self.keys.get(from).is_some_and(|r| r.received.is_some()) {
                    self.end_early(from, lease.expires_at_ms);
                }
                ended += 1;
            }
        }
        (moved, ended)
    }

    /// Removes keys that a renewal replaced once nothing uses them any more: no lease, and
    /// either expired or no longer allocated to stations.
    fn retire_replaced_keys(&mut self, at: i64) {
        let retired: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, record)| {
                record.meta.replaced_by.is_some()
                    // A received pool goes when its grant lapses or is given back.
                    && record.received.is_none()
                    && record.in_use == 0
                    && !self.ended_early.contains_key(&*record.id)
                    && record.donated == 0
                    && !self.donations.keys().any(|(from, _)| from == &*record.id)
                    && (!record.meta.stations || key_state(record, at) == KeyState::Expired)
            })
            .map(|(key_id, _)| key_id.clone())
            .collect();
        for key_id in retired {
            self.keys.remove(&key_id);
        }
    }

    fn heartbeat(&mut self, lease_id: &str, lease_ttl_ms: i64, at: i64) -> Outcome {
        if !(1..=LEASE_TTL_MS_MAX).contains(&lease_ttl_ms) {
            return Outcome::Refused {
                refusal: Refusal::InvalidRequest {
                    reason: format!("lease_ttl_ms must be 1 to {LEASE_TTL_MS_MAX}"),
                },
            };
        }
        let Some(lease) = self.leases.get(lease_id) else {
            return lease_not_found(lease_id);
        };
        // A received grant whose end date came while the lease still had time (told under an
        // earlier grant): its station hears now that the lease is over, so it ends now.
        let record = &self.keys[&*lease.key_id];
        if record.received.is_some() && at >= record.valid_until_ms() {
            self.remove_lease(lease_id);
            return lease_not_found(lease_id);
        }
        if let Err(refused) = self.take_over(lease_id, at) {
            return *refused;
        }
        let lease = &self.leases[lease_id];
        let record = &self.keys[&*lease.key_id];
        let until = self.lease_cap(
            record,
            Some(lease_id),
            at,
            at + lease_ttl_ms + grace_ms(record),
        );
        let lease = self.extend_lease(lease_id, at, until);
        Outcome::LeaseRenewed {
            lease: lease.view(),
        }
    }

    /// An administrator takes a lease back; not a borrowing, which its application holds
    /// offline until its end: freeing its seat would let two stations use one license.
    fn force_release(&mut self, lease_id: &str) -> Outcome {
        if let Some(lease) = self.leases.get(lease_id)
            && lease.borrowed
        {
            return Outcome::Refused {
                refusal: Refusal::LeaseBorrowed {
                    lease_id: lease_id.into(),
                    until_ms: lease.expires_at_ms,
                },
            };
        }
        self.release(lease_id)
    }

    fn release(&mut self, lease_id: &str) -> Outcome {
        match self.remove_lease(lease_id) {
            Some(lease) => Outcome::LeaseReleased {
                lease: lease.view(),
            },
            None => lease_not_found(lease_id),
        }
    }

    /// Extends a lease to `until` (from `lease_cap`).
    fn extend_lease(&mut self, lease_id: &str, at: i64, until: i64) -> &mut Lease {
        let lease = self
            .leases
            .get_mut(lease_id)
            .expect("caller checked the lease exists");
        self.expiry.remove(&(lease.expires_at_ms, lease.id.clone()));
        // A renewal never shortens a lease: a late, duplicated heartbeat must not cut it, and
        // its station may already count on the expiry it was told.
        lease.expires_at_ms = lease.expires_at_ms.max(until);
        lease.renewed_at_ms = at;
        self.expiry.insert((lease.expires_at_ms, lease.id.clone()));
        lease
    }

    /// How long a lease of `record` (new, or `lease_id` renewed) may run, at most until
    /// `wanted`: within the key, and for a received pool, within its current grant. A pool
    /// whose donor lowered the donation still holds the earlier, larger grant until it
    /// lapses; a lease runs past that grant's end only if it fits in what is left after it,
    /// with every other lease and re-grant still running then. So leases run out by
    /// themselves as the pool shrinks: none is ended early while its station may still count
    /// on it, and the donor, which counts each grant until it lapses, is never short.
    fn lease_cap(&self, record: &KeyRecord, lease_id: Option<&str>, at: i64, wanted: i64) -> i64 {
        let cap = wanted.min(self.carry_until_ms(record));
        let Some(received) = &record.received else {
            return cap;
        };
        let mut ends: Vec<i64> = received
            .grants()
            .map(|(_, until)| until)
            .filter(|until| *until > at && *until < cap)
            .collect();
        if ends.is_empty() {
            return cap;
        }
        ends.sort_unstable();
        ends.dedup();
        let pool = &*record.id;
        // Only leases still running after the first end count at any end: with leases much
        // shorter than grants, a handful.
        let first = ends[0];
        let mut others: Vec<i64> = self
            .expiry
            .range((first.saturating_add(1), Arc::<str>::from(""))..)
            .filter(|(_, id)| Some(&**id) != lease_id && *self.leases[&**id].key_id == *pool)
            .map(|(expires_at_ms, _)| *expires_at_ms)
            .chain(self.ended_early.get(pool).into_iter().flatten().copied())
            .collect();
        others.sort_unstable();
        for end in ends {
            let (renewal_room, renewal_counted) = self.renewal_pool_at(record, end);
            let room = u64::from(received.capacity_at(end)) + renewal_room;
            let running = others.len() - others.partition_point(|expires| *expires <= end);
            let counted =
                running as u64 + 1 + u64::from(self.donated_after(pool, end)) + renewal_counted;
            if counted > room {
                return end;
            }
        }
        cap
    }

    /// After a received pool stops, the pool of its renewal key (granted in advance) carries
    /// its leases: (the renewal pool's licenses at `end`, what it counts then). Nothing
    /// before the renewal pool starts.
    fn renewal_pool_at(&self, record: &KeyRecord, end: i64) -> (u64, u64) {
        let Some(renewal) = self.pending_renewal(record) else {
            return (0, 0);
        };
        match &renewal.received {
            Some(received) if key_start_ms(renewal) <= end => (
                u64::from(received.capacity_at(end)),
                u64::from(self.donated_after(&renewal.id, end))
                    + u64::from(renewal.in_use)
                    + u64::from(renewal.ended_early),
            ),
            _ => (0, 0),
        }
    }

    /// Licenses of `key_id` that donations still count after `at`.
    fn donated_after(&self, key_id: &str, at: i64) -> u32 {
        let skew = self.config.clock_skew_max_ms;
        self.donations
            .values()
            .filter(|d| d.key_id == key_id)
            .map(|d| {
                d.outstanding
                    .iter()
                    .filter(|o| o.lease_until_ms.saturating_add(skew) > at)
                    .map(|o| o.licenses)
                    .max()
                    .unwrap_or(0)
            })
            .sum()
    }

    /// The lease `station` holds from `key_id`, if any.
    fn station_lease(&self, station: &str, key_id: &str) -> Option<&Arc<str>> {
        self.by_station
            .get(station)?
            .iter()
            .find(|(key, _)| &**key == key_id)
            .map(|(_, lease_id)| lease_id)
    }

    fn insert_lease(&mut self, lease: Lease) {
        let record = self
            .keys
            .get_mut(&*lease.key_id)
            .expect("lease's key exists");
        record.in_use += 1;
        assert!(
            record.used() <= record.licenses(self.last_at_ms),
            "over-issued key {}",
            lease.key_id
        );
        self.by_station
            .entry(lease.station.clone())
            .or_default()
            .push((lease.key_id.clone(), lease.id.clone()));
        self.expiry.insert((lease.expires_at_ms, lease.id.clone()));
        self.leases.insert(lease.id.clone(), Box::new(lease));
    }

    fn remove_lease(&mut self, lease_id: &str) -> Option<Lease> {
        let lease = *self.leases.remove(lease_id)?;
        if let Some(held) = self.by_station.get_mut(&*lease.station) {
            held.retain(|(_, id)| id != &lease.id);
            if held.is_empty() {
                self.by_station.remove(&*lease.station);
            }
        }
        self.expiry.remove(&(lease.expires_at_ms, lease.id.clone()));
        if let Some(record) = self.keys.get_mut(&*lease.key_id) {
            record.in_use -= 1;
        }
        self.untag(&lease);
        Some(lease)
    }

    /// Ends every lease with `expires_at_ms <= at`; returns them.
    fn end_due_leases(&mut self, at: i64) -> Vec<LeaseView> {
        let mut ended = Vec::new();
        while let Some((expires_at_ms, lease_id)) = self.expiry.first().cloned() {
            if expires_at_ms > at {
                break;
            }
            ended.extend(self.remove_lease(&lease_id).map(|lease| lease.view()));
        }
        ended
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

impl CheckoutRequest<'_> {
    fn validate(&self) -> Result<(), String> {
        if !is_name(self.component) {
            return Err(format!(
                "component {:?} is not a valid name (1-128 of A-Z a-z 0-9 - _ .)",
                self.component
            ));
        }
        // Characters (Unicode scalar values), as the messages and the OpenAPI document say,
        // not UTF-8 bytes.
        let chars = |text: &str| text.chars().count();
        if self.station.is_empty() || chars(self.station) > FREE_TEXT_LENGTH_MAX {
            return Err(format!(
                "station must have 1 to {FREE_TEXT_LENGTH_MAX} characters"
            ));
        }
        if chars(self.user) > FREE_TEXT_LENGTH_MAX || chars(self.host) > FREE_TEXT_LENGTH_MAX {
            return Err(format!(
                "user and host have at most {FREE_TEXT_LENGTH_MAX} characters"
            ));
        }
        if !is_name(self.lease_id) {
            return Err("lease id is not a valid name".into());
        }
        if !(1..=LEASE_TTL_MS_MAX).contains(&self.lease_ttl_ms) {
            return Err(format!("lease_ttl_ms must be 1 to {LEASE_TTL_MS_MAX}"));
        }
        if !(0..=BORROW_MS_MAX).contains(&self.borrow_ms) {
            return Err(format!(
                "a borrowing lasts at most {} days",
                crate::key::BORROW_DAYS_MAX
            ));
        }
        Ok(())
    }

    /// How long the lease runs from `at`: the borrowing, or one time-to-live.
    fn wanted_ms(&self) -> i64 {
        self.lease_ttl_ms.max(self.borrow_ms)
    }
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
