//! JSON wire types shared by the server, the client SDK, the CLI and the console.
//!
//! Timestamps are RFC 3339 strings; durations carry their unit in the field name. Request
//! types refuse unknown fields, so a typo in a client is an error rather than a silent default.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/leases`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    /// The component the station wants to run, e.g. `cad`.
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,128}$")]
    pub component: String,
    /// A stable name for the station (machine); the same station asking again gets the
    /// same lease back.
    #[schema(min_length = 1, max_length = 256)]
    pub station: String,
    #[serde(default)]
    #[schema(max_length = 256)]
    pub user: String,
    #[serde(default)]
    #[schema(max_length = 256)]
    pub host: String,
    /// A fresh random value from the application: the signed `lease_token` carries it back,
    /// so an old answer cannot be played back as this one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub nonce: String,
    /// A random value the station keeps for this checkout: a retry carrying the same value
    /// (its first answer lost) gets the lease and its secret back. A station already holding
    /// a lease of the component and asking without it is refused (409 `lease_held`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub holder_key: String,
    /// Borrow the license for this many hours: the lease then needs no heartbeat until it
    /// ends (the application holds its signed token offline), and a checkin returns it
    /// early. Allowed up to the key's `max_borrow_days`; 0 (default): an ordinary lease.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schema(maximum = 8784)]
    pub borrow_hours: u32,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// A lease as the station and administrators see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Lease {
    /// Left out for callers without the admin token (anonymous status).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub lease_id: String,
    /// The component asked for in this request (for listings: the first one).
    pub component: String,
    /// Every component the station uses under this lease.
    pub components: Vec<String>,
    pub key_id: String,
    pub station: String,
    pub user: String,
    pub host: String,
    #[schema(value_type = String, format = DateTime)]
    pub issued_at: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub renewed_at: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: Timestamp,
    /// Send a heartbeat at least this often to keep the lease.
    pub heartbeat_interval_s: u64,
    /// A borrowing: no heartbeat needed until `expires_at`; only its holder returns it
    /// early (an administrator's release is refused with `lease_borrowed`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub borrowed: bool,
    /// The holder's credential: send it as `x-lease-secret` with every heartbeat and checkin.
    /// Given with a new lease, and with an existing one only to its holder (the request
    /// carries the secret, or the same non-empty `host` fingerprint). Never in listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_secret: Option<String>,
    /// The server's signed statement of this lease (checkout and heartbeat answers), with
    /// the request's nonce: the application checks it against the vendor's root key
    /// (`docs/formats.md`, `docs/sdk.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_token: Option<String>,
    /// What the token is checked with, offline: the vendor-signed license key…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub license_key: Option<serde_json::Value>,
    /// …the server's vendor certificate, where it has one…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub server_certificate: Option<serde_json::Value>,
    /// …and for licenses donated by a neighbour, the grant chain down to this server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub grant: Option<serde_json::Value>,
}

/// The stable error body: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeySummary {
    pub key_id: String,
    pub customer: String,
    pub components: Vec<String>,
    pub licenses: u32,
    pub in_use: u32,
    /// What a new lease could take here now; on a host of a redundant pair serving alone,
    /// what is left of its own share.
    pub free: u32,
    /// On a host of a redundant pair serving alone: the licenses of its own share, the most
    /// it may have in use until the pair is whole again (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alone_share: Option<u32>,
    #[schema(value_type = String, format = DateTime)]
    pub valid_from: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub valid_until: Timestamp,
    /// `pending`, `active` or `expired`.
    pub state: String,
    pub server_id: Option<String>,
    pub renews: Option<String>,
    /// Whether the key serves every station of this server.
    pub allocated: bool,
    /// Station groups the key is allocated to.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Neighbour servers the key is allocated to.
    #[serde(default)]
    pub neighbours: Vec<String>,
    /// The renewal key that replaced this one, if any.
    pub replaced_by: Option<String>,
    /// The last automatic renewal result for this key, in words.
    pub renewal: Option<String>,
    /// Licenses donated to neighbour servers and not back yet (not usable here).
    #[serde(default)]
    pub donated_out: u32,
    /// Licenses received from a neighbour: for `KEY@DONOR` entries, the grant's licenses.
    #[serde(default)]
    pub received: u32,
    /// The neighbour these licenses were received from.
    #[serde(default)]
    pub received_from: Option<String>,
    /// The vendor key id (for `KEY@DONOR` entries the part before `@`).
    #[serde(default)]
    pub vendor_key_id: String,
    /// Leases of a grant given back whose stations may still run until the expiry they were
    /// told: counted as used (not free) until then.
    #[serde(default)]
    pub ended_early: u32,
}

/// `POST /v1/donations`: donate licenses of a key to a neighbour, or change a donation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DonateRequest {
    /// A key id, or `KEY@DONOR` to donate further licenses received from a neighbour.
    pub key_id: String,
    /// The neighbour's server ID.
    pub to: String,
    #[schema(minimum = 1, maximum = 10_000_000)]
    pub licenses: u32,
    /// The donation end date: `YYYY-MM-DD` (the end of that day, UTC); an RFC 3339 time is
    /// taken too.
    #[schema(format = Date)]
    pub until: String,
}

/// A donation to a neighbour, as the donor sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DonationSummary {
    pub key_id: String,
    pub to: String,
    /// The licenses the administrator donated.
    pub licenses: u32,
    /// Licenses counted as donated now (the largest grant the neighbour may still hold).
    pub donated_now: u32,
    pub serial: u64,
    #[schema(value_type = String, format = DateTime)]
    pub lease_until: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub donation_until: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub renewed_at: Timestamp,
    /// `active`, `lapsed` (not renewed: the licenses are back until the neighbour renews) or
    /// `ended`.
    pub state: String,
}

/// A grant received from a neighbour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReceivedSummary {
    /// The pool the grant is used as: `KEY@DONOR`.
    pub key_id: String,
    pub from: String,
    pub licenses: u32,
    pub in_use: u32,
    pub donated_out: u32,
    pub serial: u64,
    /// This server issues nothing from the grant after this time.
    #[schema(value_type = String, format = DateTime)]
    pub usable_until: Timestamp,
}

/// A child's report of its active stations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UsageReportSummary {
    #[schema(value_type = String, format = DateTime)]
    pub at: Timestamp,
    pub period_s: i64,
    /// Distinct stations that held a license of each component during the period.
    pub active_stations: std::collections::BTreeMap<String, u32>,
    /// Licenses in use per component when the report was made.
    pub in_use: std::collections::BTreeMap<String, u32>,
}

/// A configured neighbour server and the state of the link to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NeighbourSummary {
    pub id: String,
    pub url: String,
    /// `parent`, `child` or `peer`.
    pub relation: String,
    /// This server may donate to it.
    pub send: bool,
    /// This server accepts licenses from it.
    pub receive: bool,
    /// `permanent` or `periodic`.
    pub connection: String,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_contact: Option<Timestamp>,
    pub last_error: Option<String>,
    /// The last difference between donor and receiver records found by the license
    /// synchronization with this neighbour (cleared when the records agree again).
    #[serde(default)]
    pub last_mismatch: Option<String>,
    pub donations: Vec<DonationSummary>,
    pub received: Vec<ReceivedSummary>,
    pub usage: Option<UsageReportSummary>,
}

/// `GET /v1/neighbours`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Neighbours {
    pub server_id: Option<String>,
    pub neighbours: Vec<NeighbourSummary>,
}

/// `GET /v1/identity`: what a neighbour's administrator puts in its `[[neighbour]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Identity {
    pub server_id: Option<String>,
    /// The server's Ed25519 identity public key, base64.
    pub public_key: String,
}

/// A signed message between two neighbour servers (`POST /v1/neighbours/grants` and
/// `POST /v1/neighbours/renew`, and their answers). The signature is Ed25519 by the
/// sender's identity key over `tessera-neighbour/v1` + newline + the compact JSON array
/// `[from, to, sent_at_ms, kind, body]`; the receiver checks it against the `public_key`
/// configured for `from`, and refuses a `sent_at_ms` further than `clock_skew_max` from its
/// own clock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NeighbourEnvelope {
    /// The sender's server ID.
    pub from: String,
    /// The addressee's server ID.
    pub to: String,
    /// The sender's clock when it sent the message (milliseconds since the Unix epoch).
    pub sent_at_ms: i64,
    /// What the body is: `grants` (push), `held` (its answer), `renew`, `renewed`.
    pub kind: String,
    /// The message itself, as described for its kind.
    #[schema(value_type = Object)]
    pub body: serde_json::Value,
    /// Base64 Ed25519 signature.
    pub signature: String,
}

/// One grant a receiver holds from a donor, as it reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HeldGrant {
    /// The vendor key id.
    pub key_id: String,
    pub serial: u64,
    pub licenses: u32,
    pub in_use: u32,
}

/// A receiver's confirmation that it no longer uses the grants of a key up to `serial`
/// (it gave them back, or holds a newer one that replaced them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReturnedGrant {
    /// The vendor key id.
    pub key_id: String,
    pub serial: u64,
}

/// The donor's periods that its receivers use ("set on the parent, used by the child").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DonorSettings {
    pub donation_renewal_period_ms: i64,
    pub usage_report_period_ms: i64,
    pub active_station_period_ms: i64,
}

/// `POST /v1/keys/update`: check for renewal keys and replace keys ("check for updates").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyUpdateReport {
    /// The online sync made first, if an authority is configured.
    pub sync: Option<SyncSummary>,
    /// Why that sync failed: the error code, then the message (`server_rolled_back: …`).
    pub sync_error: Option<String>,
    pub renewals: Vec<RenewalReport>,
    pub leases_moved: u32,
    pub leases_ended: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RenewalReport {
    pub key_id: String,
    pub renewal_key_id: String,
    /// True: added and allocated to every object of the old key. False: added, not allocated.
    pub allocated: bool,
    pub reason: Option<String>,
}

/// `POST /v1/keys/{key_id}/allocate`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AllocateRequest {
    /// Allocate to every station of this server.
    pub stations: bool,
    /// Also (or instead) allocate to the stations of these groups; omitted: unchanged.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Name>>)]
    pub groups: Option<Vec<String>>,
    /// Allocate to these neighbour servers (server IDs); omitted: unchanged.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Name>>)]
    pub neighbours: Option<Vec<String>>,
}

/// A name (group, server ID, component): 1 to 128 of `A-Z a-z 0-9 - _ .`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(pattern = r"^[A-Za-z0-9._-]{1,128}$")]
pub struct Name(pub String);

/// A station name in a group: 1 to 256 characters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(min_length = 1, max_length = 256)]
pub struct StationName(pub String);

/// A station group (`GET /v1/groups`, `PUT /v1/groups/{name}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StationGroup {
    #[serde(default)]
    pub name: String,
    /// Station names; an empty list deletes the group.
    #[schema(value_type = Vec<StationName>, max_items = 10_000)]
    pub stations: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ComponentStatus {
    pub component: String,
    /// Licenses of the active keys covering this component. Components of one key share its
    /// licenses, so these numbers can overlap between components.
    pub licenses: u32,
    /// Licenses of those keys in use: leases of a key covering several components count under
    /// each of them (a lease lets its station use every component of its key).
    pub in_use: u32,
    /// What new leases could take here now (on a pair's host serving alone: its share).
    pub free: u32,
    /// On a host of a redundant pair serving alone: the licenses of its share of those keys
    /// (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alone_share: Option<u32>,
    /// The holders: every lease of a key covering the component (over the API at most
    /// [`STATUS_LEASES_MAX`]; `holders_total` counts them all).
    pub holders: Vec<Holder>,
    #[serde(default)]
    pub holders_total: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Holder {
    /// Left out for callers without the admin token (anonymous status).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub lease_id: String,
    pub station: String,
    pub user: String,
    pub host: String,
    pub key_id: String,
    /// The components the station asked for under its lease (it may use any of its key's).
    #[serde(default)]
    pub components: Vec<String>,
    #[schema(value_type = String, format = DateTime)]
    pub since: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: Timestamp,
}

/// `GET /v1/status`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Status {
    pub server_id: Option<String>,
    #[schema(value_type = String, format = DateTime)]
    pub now: Timestamp,
    pub role: String,
    pub keys: Vec<KeySummary>,
    pub components: Vec<ComponentStatus>,
    /// Over the API: the first [`STATUS_LEASES_MAX`] leases to expire (and holders per
    /// component);
    /// `leases_total` says how many there are, `GET /v1/leases` pages through them all.
    pub leases: Vec<Lease>,
    /// Every lease this server holds (whether or not `leases` lists them all).
    #[serde(default)]
    pub leases_total: u64,
    /// True while this host of a redundant pair serves alone: it may use only its share of
    /// each key (`alone_share`) until the pair is whole again.
    #[serde(default)]
    pub serving_alone: bool,
    pub sync: SyncStatus,
    /// The latest usage report of each neighbour this server donates to, by server ID.
    #[serde(default)]
    pub usage_reports: std::collections::BTreeMap<String, UsageReportSummary>,
}

/// A time as Tessera prints it everywhere people read times (CLI tables, console, logs):
/// RFC 3339 in UTC, to the second — `2026-12-02T21:05:54Z`. (JSON carries the full
/// timestamp, also RFC 3339 UTC.)
pub fn time_text(time: Timestamp) -> String {
    time.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// [`time_text`] of an RFC 3339 string (as JSON carries it); anything else as it is.
pub fn time_text_of(text: &str) -> String {
    text.parse::<Timestamp>()
        .map(time_text)
        .unwrap_or_else(|_| text.to_string())
}

/// Most leases (and holders per component) `GET /v1/status` lists; `GET /v1/leases` pages.
pub const STATUS_LEASES_MAX: usize = 100;

/// `GET /v1/leases` answer: one page of leases in lease-id order, or in the order of `sort=`
/// and `order=`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LeasePage {
    pub leases: Vec<Lease>,
    /// How many leases match the filters in all.
    pub total: u64,
    /// The cursor for the next page (`after=`), or absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// The cursor for the page before (`before=`), or absent on the first page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// How many matching leases come before this page's first (absent when 0).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub offset: u64,
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// `POST /v1/keys` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyImported {
    pub key_id: String,
}

/// `DELETE /v1/keys/{key_id}` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyRemoved {
    pub key_id: String,
    pub leases_ended: u32,
}

/// `GET /healthz`: 200 with `status` `ok` when this host can serve stations now, 503 with
/// `no_quorum` (a domain host that reaches no majority, nor a primary that does) or
/// `pair_recovering` (a pair's host merging after a split) when it cannot — for load
/// balancers and supervisors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    /// `primary`, `backup`, or `alone` (a pair's host serving alone from its share).
    pub role: String,
    /// The Tessera version serving.
    #[serde(default)]
    pub version: String,
}

/// Where this server stands with the vendor (`GET /v1/sync`, and inside `/v1/status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SyncStatus {
    pub server_id: Option<String>,
    /// True while the server certificate is valid: keys bound to the server ID can be used.
    pub synchronized: bool,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_sync_at: Option<Timestamp>,
    /// The 366-day deadline: after it, no licenses from keys bound to this server ID.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub deadline: Option<Timestamp>,
    pub days_left: Option<i64>,
    pub completed_sequence: u64,
    /// Sequence of an exported request still waiting for its response.
    pub awaiting_sequence: Option<u64>,
    /// Renewal keys held for this server, by the key they renew.
    pub renewals: Vec<String>,
    /// `off`, `daily` or `weekly`.
    pub schedule: String,
    pub authority: Option<String>,
    /// The authority refused this server's sync chain (a copy or a restored backup of its
    /// data): automatic syncs are stopped until the vendor resets the chain and a sync
    /// succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<SyncBlocked>,
}

/// Why syncs are blocked (`SyncStatus.blocked`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SyncBlocked {
    /// `server_cloned` or `server_rolled_back`.
    pub code: String,
    /// The authority's explanation.
    pub message: String,
    #[schema(value_type = String, format = DateTime)]
    pub at: Timestamp,
}

/// What a completed sync changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SyncSummary {
    pub sequence: u64,
    pub imported: Vec<String>,
    pub revoked: Vec<String>,
    pub renewals: Vec<String>,
    #[schema(value_type = String, format = DateTime)]
    pub certificate_valid_until: Timestamp,
}

/// The result of checking the audit chain (`GET /v1/audit/verify`, `tessera audit verify`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(as = Verification)]
pub struct AuditVerification {
    pub ok: bool,
    /// Records checked (up to and including the first broken one).
    pub records: i64,
    /// The hash of the last record when the chain is intact.
    pub head_hash: Option<String>,
    /// The first broken record.
    pub broken_seq: Option<i64>,
    pub reason: Option<String>,
    /// The record the vendor countersigned at this host's last sync, checked against the
    /// hash it countersigned (absent when the vendor has countersigned none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub countersigned: Option<i64>,
}

/// The answer of `GET /v1/domain`: a domain's hosts as one host sees them.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DomainStatus {
    /// The host whose view this is (the primary's when the answering host could reach it).
    pub view_of: u64,
    /// The host that answered the request.
    pub answered_by: u64,
    pub primary: Option<u64>,
    /// Whether the view's host is the primary and has heard from a majority recently.
    pub quorum: bool,
    pub hosts: Vec<DomainHost>,
}

/// One host of [`DomainStatus`].
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = HostJson)]
pub struct DomainHost {
    pub host: u64,
    pub address: Option<String>,
    /// `primary` or `backup`.
    pub role: String,
    pub healthy: bool,
    pub replication_lag: Option<u64>,
    pub last_contact_ms: Option<u64>,
}
