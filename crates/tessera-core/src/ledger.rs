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
use crate::identity::PublicKey;
use crate::key::{KeyError, LicenseKey, is_name};
use crate::outcome::{Outcome, Refusal};
use crate::sync::{ServerCertificate, SyncError, SyncResponse};

/// Upper bound on a lease's time to live, so a mistaken request cannot pin a seat for years.
pub const LEASE_TTL_MS_MAX: i64 = 7 * 24 * 3600 * 1000;
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
    pub key: LicenseKey,
    pub state: KeyState,
    pub in_use: u32,
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

/// A key as kept in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    pub key: LicenseKey,
    pub meta: KeyMeta,
}

#[derive(Clone, Debug)]
struct KeyRecord {
    key: LicenseKey,
    /// The key id and components once, shared by every lease of the key.
    id: Arc<str>,
    components: Vec<Arc<str>>,
    in_use: u32,
    meta: KeyMeta,
}

impl KeyRecord {
    fn new(key: LicenseKey, meta: KeyMeta) -> KeyRecord {
        KeyRecord {
            id: Arc::from(key.payload.key_id.as_str()),
            components: key
                .payload
                .components
                .iter()
                .map(|c| Arc::from(c.as_str()))
                .collect(),
            key,
            in_use: 0,
            meta,
        }
    }

    fn component(&self, name: &str) -> Option<&Arc<str>> {
        self.components.iter().find(|c| &***c == name)
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
        }
    }

    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// The latest time applied: the persisted high-water mark of time for clock checks.
    pub fn last_at_ms(&self) -> i64 {
        self.last_at_ms
    }

    pub fn apply(&mut self, entry: &Stamped) -> Outcome {
        self.apply_recording(entry).outcome
    }

    /// Applies an entry and also reports the leases that ran out before it was applied, so
    /// usage history sees every expiry, whichever command noticed it.
    pub fn apply_recording(&mut self, entry: &Stamped) -> Applied {
        let at = entry.at_ms.max(self.last_at_ms);
        self.last_at_ms = at;
        let expired = self.end_due_leases(at);
        let ended = expired.len() as u32;
        let outcome = match &entry.command {
            Command::ImportKey { key } => self.import_key(key, at),
            Command::RemoveKey { key_id } => self.remove_key(key_id),
            Command::Checkout {
                lease_id,
                component,
                station,
                user,
                host,
                lease_ttl_ms,
            } => self.checkout(
                CheckoutRequest {
                    lease_id,
                    component,
                    station,
                    user,
                    host,
                    lease_ttl_ms: *lease_ttl_ms,
                },
                at,
            ),
            Command::Heartbeat {
                lease_id,
                lease_ttl_ms,
            } => self.heartbeat(lease_id, *lease_ttl_ms, at),
            Command::Checkin { lease_id } | Command::ForceRelease { lease_id } => {
                self.release(lease_id)
            }
            Command::Expire => Outcome::Expired {
                leases_ended: ended,
            },
            Command::BeginSync { nonce } => self.begin_sync(nonce),
            Command::CompleteSync { response } => self.complete_sync(response, at),
            Command::RenewKeys => self.renew_keys(at),
            Command::AllocateKey { key_id, stations } => self.allocate_key(key_id, *stations),
            Command::AllocateKeyToGroups { key_id, groups } => {
                self.allocate_key_to_groups(key_id, groups)
            }
            Command::AllocateKeyToNeighbours { key_id, neighbours } => {
                self.allocate_key_to_neighbours(key_id, neighbours)
            }
            Command::SetStationGroup { group, stations } => self.set_station_group(group, stations),
        };
        self.retire_replaced_keys(at);
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
        if self.keys.contains_key(&payload.key_id) {
            return Outcome::Refused {
                refusal: Refusal::KeyAlreadyImported {
                    key_id: payload.key_id.clone(),
                },
            };
        }
        let key_id = payload.key_id.clone();
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

    fn remove_key(&mut self, key_id: &str) -> Outcome {
        if !self.keys.contains_key(key_id) {
            return Outcome::Refused {
                refusal: Refusal::KeyNotFound {
                    key_id: key_id.into(),
                },
            };
        }
        let doomed: Vec<Arc<str>> = self
            .leases
            .values()
            .filter(|lease| &*lease.key_id == key_id)
            .map(|lease| lease.id.clone())
            .collect();
        for lease_id in &doomed {
            self.remove_lease(lease_id);
        }
        self.keys.remove(key_id);
        Outcome::KeyRemoved {
            key_id: key_id.into(),
            leases_ended: doomed.len() as u32,
        }
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
                    && record.key.payload.covers(component)
            })
            .partition(|record| synchronized || record.key.payload.server_id.is_none());
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
                Some((
                    (record.key.payload.valid_until_ms(), record.key.key_id()),
                    lease_id,
                ))
            })
            .min()
            .map(|(_, lease_id)| lease_id.clone());
        if let Some(lease_id) = held {
            let record = &self.keys[&*self.leases[&lease_id].key_id];
            let valid_until = record.key.payload.valid_until_ms();
            let shared = record.component(component).cloned();
            let lease = self.extend_lease(&lease_id, at, request.lease_ttl_ms, valid_until);
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
        let licenses: u32 = covering.iter().map(|r| r.key.payload.licenses).sum();
        let Some(chosen) = covering
            .iter()
            .filter(|record| record.in_use < record.key.payload.licenses)
            .min_by_key(|record| {
                (
                    record.key.payload.valid_until_ms(),
                    record.key.payload.key_id.clone(),
                )
            })
        else {
            return Outcome::Refused {
                refusal: Refusal::NoLicensesAvailable {
                    component: component.into(),
                    licenses,
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
        let expires_at_ms = (at + request.lease_ttl_ms).min(chosen.key.payload.valid_until_ms());
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
        };
        let view = lease.view();
        self.insert_lease(lease);
        Outcome::LeaseGranted {
            lease: view,
            created: true,
        }
    }

    fn begin_sync(&mut self, nonce: &str) -> Outcome {
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
        let sequence = self.sync.completed_sequence.max(last_sent) + 1;
        self.sync.awaited = Some((sequence, nonce.to_string()));
        Outcome::SyncBegun {
            sequence,
            nonce: nonce.to_string(),
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
        self.sync.last_sync_at_ms = Some(at);
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
            .any(|s| s.is_empty() || s.len() > FREE_TEXT_LENGTH_MAX)
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
        for record in self.keys.values() {
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
                    record.meta.replaced_by.as_deref() != Some(renewal.key_id())
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
                    old.meta.stations = false;
                    let (moved, ended) = self.move_leases(&old_id, &renewal_id);
                    leases_moved += moved;
                    leases_ended += ended;
                }
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
        let until = self.keys[to].key.payload.valid_until_ms();
        for lease_id in ids {
            let mut lease = self.remove_lease(&lease_id).expect("listed");
            let target = &self.keys[to];
            let taken = self.station_lease(&lease.station, to).is_some();
            if target.in_use < target.key.payload.licenses && !taken {
                lease.key_id = target.id.clone();
                lease.components = lease
                    .components
                    .iter()
                    .filter_map(|c| target.component(c).cloned())
                    .collect();
                lease.expires_at_ms = lease.expires_at_ms.min(until);
                self.insert_lease(lease);
                moved += 1;
            } else {
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
                    && record.in_use == 0
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
        let valid_until = self.keys[&*lease.key_id].key.payload.valid_until_ms();
        let lease = self.extend_lease(lease_id, at, lease_ttl_ms, valid_until);
        Outcome::LeaseRenewed {
            lease: lease.view(),
        }
    }

    fn release(&mut self, lease_id: &str) -> Outcome {
        match self.remove_lease(lease_id) {
            Some(lease) => Outcome::LeaseReleased {
                lease: lease.view(),
            },
            None => lease_not_found(lease_id),
        }
    }

    fn extend_lease(
        &mut self,
        lease_id: &str,
        at: i64,
        lease_ttl_ms: i64,
        valid_until_ms: i64,
    ) -> &mut Lease {
        let lease = self
            .leases
            .get_mut(lease_id)
            .expect("caller checked the lease exists");
        self.expiry.remove(&(lease.expires_at_ms, lease.id.clone()));
        // A renewal never shortens a lease: a late, duplicated heartbeat must not cut it.
        lease.expires_at_ms = lease
            .expires_at_ms
            .max((at + lease_ttl_ms).min(valid_until_ms));
        lease.renewed_at_ms = at;
        self.expiry.insert((lease.expires_at_ms, lease.id.clone()));
        lease
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
            record.in_use <= record.key.payload.licenses,
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

    // ---- reads ----

    pub fn lease(&self, lease_id: &str) -> Option<LeaseView> {
        self.leases.get(lease_id).map(|lease| lease.view())
    }

    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Leases sorted by key, then station (for stable listings).
    pub fn leases(&self) -> Vec<LeaseView> {
        let mut leases: Vec<&Lease> = self.leases.values().map(|lease| &**lease).collect();
        leases.sort_by(|a, b| (&a.key_id, &a.station).cmp(&(&b.key_id, &b.station)));
        leases.into_iter().map(Lease::view).collect()
    }

    pub fn keys(&self, at: i64) -> Vec<KeyView> {
        self.keys
            .values()
            .map(|record| KeyView {
                key: record.key.clone(),
                state: key_state(record, at),
                in_use: record.in_use,
                meta: record.meta.clone(),
            })
            .collect()
    }

    pub fn key(&self, key_id: &str) -> Option<&LicenseKey> {
        self.keys.get(key_id).map(|record| &record.key)
    }

    pub fn sync_state(&self) -> &SyncState {
        &self.sync
    }

    /// When the next lease runs out, so the primary knows when to propose `Expire`.
    pub fn next_expiry_ms(&self) -> Option<i64> {
        self.expiry.first().map(|(at, _)| *at)
    }

    // ---- snapshots ----

    pub fn snapshot(&self) -> LedgerSnapshot {
        let mut leases: Vec<LeaseView> = self.leases.values().map(|lease| lease.view()).collect();
        leases.sort_by(|a, b| a.lease_id.cmp(&b.lease_id));
        LedgerSnapshot {
            last_at_ms: self.last_at_ms,
            keys: self.snapshot_keys(),
            leases,
            sync: self.sync.clone(),
            groups: self.groups.clone(),
        }
    }

    /// The snapshot as JSON, written straight from the ledger: the same document as
    /// `serde_json::to_vec(&self.snapshot())`, without building a million `LeaseView`s first.
    pub fn snapshot_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct SnapshotRef<'a> {
            last_at_ms: i64,
            keys: Vec<StoredKey>,
            #[serde(serialize_with = "compact_rows")]
            leases: Vec<&'a Lease>,
            groups: &'a BTreeMap<String, BTreeSet<String>>,
            sync: &'a SyncState,
        }
        fn compact_rows<S: serde::Serializer>(
            leases: &[&Lease],
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            serializer.collect_seq(leases.iter().map(|l| {
                (
                    &*l.id,
                    &*l.key_id,
                    l.components.iter().map(|c| &**c).collect::<Vec<&str>>(),
                    &*l.station,
                    &*l.user,
                    &*l.host,
                    l.issued_at_ms,
                    l.renewed_at_ms,
                    l.expires_at_ms,
                )
            }))
        }
        let mut leases: Vec<&Lease> = self.leases.values().map(|lease| &**lease).collect();
        leases.sort_by(|a, b| a.id.cmp(&b.id));
        let snapshot = SnapshotRef {
            last_at_ms: self.last_at_ms,
            keys: self.snapshot_keys(),
            leases,
            groups: &self.groups,
            sync: &self.sync,
        };
        serde_json::to_vec(&snapshot).expect("the ledger serializes")
    }

    fn snapshot_keys(&self) -> Vec<StoredKey> {
        self.keys
            .values()
            .map(|r| StoredKey {
                key: r.key.clone(),
                meta: r.meta.clone(),
            })
            .collect()
    }

    /// Rebuilds a ledger from a snapshot this server wrote itself (keys are not verified
    /// again: they were verified when their import was applied).
    pub fn restore(config: LedgerConfig, snapshot: LedgerSnapshot) -> Ledger {
        let mut ledger = Ledger::new(config);
        ledger.restore_header(
            snapshot.last_at_ms,
            snapshot.sync,
            snapshot.groups,
            snapshot.keys,
        );
        ledger.reserve_leases(snapshot.leases.len());
        let mut expiry = Vec::with_capacity(snapshot.leases.len());
        for lease in &snapshot.leases {
            ledger.insert_restored(
                &mut expiry,
                RestoredLease {
                    id: &lease.lease_id,
                    key_id: &lease.key_id,
                    components: &lease.components,
                    station: &lease.station,
                    user: &lease.user,
                    host: &lease.host,
                    times_ms: (lease.issued_at_ms, lease.renewed_at_ms, lease.expires_at_ms),
                },
            );
        }
        ledger.finish_restore(expiry);
        ledger
    }

    /// Rebuilds a ledger straight from snapshot JSON, borrowing the lease strings from the
    /// bytes instead of building a `LeaseView` per lease first: the restart path.
    pub fn restore_json(config: LedgerConfig, bytes: &[u8]) -> serde_json::Result<Ledger> {
        #[derive(Deserialize)]
        struct Text<'a>(#[serde(borrow)] std::borrow::Cow<'a, str>);
        type Row<'a> = (
            Text<'a>,
            Text<'a>,
            Vec<Text<'a>>,
            Text<'a>,
            Text<'a>,
            Text<'a>,
            i64,
            i64,
            i64,
        );
        #[derive(Deserialize)]
        struct SnapshotIn<'a> {
            last_at_ms: i64,
            keys: Vec<StoredKey>,
            #[serde(borrow)]
            leases: Vec<Row<'a>>,
            #[serde(default)]
            groups: BTreeMap<String, BTreeSet<String>>,
            #[serde(default)]
            sync: SyncState,
        }
        let snapshot: SnapshotIn<'_> = serde_json::from_slice(bytes)?;
        let mut ledger = Ledger::new(config);
        ledger.restore_header(
            snapshot.last_at_ms,
            snapshot.sync,
            snapshot.groups,
            snapshot.keys,
        );
        ledger.reserve_leases(snapshot.leases.len());
        let mut expiry = Vec::with_capacity(snapshot.leases.len());
        for row in &snapshot.leases {
            let components: SmallVec<[&str; 2]> = row.2.iter().map(|c| &*c.0).collect();
            ledger.insert_restored(
                &mut expiry,
                RestoredLease {
                    id: &row.0.0,
                    key_id: &row.1.0,
                    components: &components,
                    station: &row.3.0,
                    user: &row.4.0,
                    host: &row.5.0,
                    times_ms: (row.6, row.7, row.8),
                },
            );
        }
        ledger.finish_restore(expiry);
        Ok(ledger)
    }

    fn restore_header(
        &mut self,
        last_at_ms: i64,
        sync: SyncState,
        groups: BTreeMap<String, BTreeSet<String>>,
        keys: Vec<StoredKey>,
    ) {
        self.last_at_ms = last_at_ms;
        self.sync = sync;
        self.groups = groups;
        for key in keys {
            self.keys.insert(
                key.key.payload.key_id.clone(),
                KeyRecord::new(key.key, key.meta),
            );
        }
    }

    fn reserve_leases(&mut self, count: usize) {
        self.leases.reserve(count);
        self.by_station.reserve(count);
    }

    /// Builds the expiry index in one sorted bulk load, and checks the restored counts.
    fn finish_restore(&mut self, mut expiry: Vec<(i64, Arc<str>)>) {
        expiry.sort_unstable();
        self.expiry = expiry.into_iter().collect();
        for (key_id, record) in &self.keys {
            assert!(
                record.in_use <= record.key.payload.licenses,
                "snapshot over-issues key {key_id}"
            );
        }
    }

    /// Like `insert_lease`, with the expiry index entry collected for a bulk load.
    fn insert_restored<S: AsRef<str>>(
        &mut self,
        expiry: &mut Vec<(i64, Arc<str>)>,
        lease: RestoredLease<'_, S>,
    ) {
        let record = &self.keys[lease.key_id];
        let station = self
            .by_station
            .get_key_value(lease.station)
            .map(|(station, _)| station.clone())
            .unwrap_or_else(|| Arc::from(lease.station));
        let (issued_at_ms, renewed_at_ms, expires_at_ms) = lease.times_ms;
        let lease = Lease {
            id: Arc::from(lease.id),
            key_id: record.id.clone(),
            components: lease
                .components
                .iter()
                .filter_map(|c| record.component(c.as_ref()).cloned())
                .collect(),
            station,
            user: lease.user.into(),
            host: lease.host.into(),
            issued_at_ms,
            renewed_at_ms,
            expires_at_ms,
        };
        self.keys
            .get_mut(&*lease.key_id)
            .expect("lease's key exists")
            .in_use += 1;
        self.by_station
            .entry(lease.station.clone())
            .or_default()
            .push((lease.key_id.clone(), lease.id.clone()));
        expiry.push((lease.expires_at_ms, lease.id.clone()));
        self.leases.insert(lease.id.clone(), Box::new(lease));
    }

    // ---- invariants ----

    /// Checks every invariant; returns the first violation found. Runs after every apply in
    /// debug builds (tests, simulation).
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut counted: HashMap<&str, u32> = HashMap::new();
        for (lease_id, lease) in &self.leases {
            if lease_id != &lease.id {
                return Err(format!("lease {lease_id} stored under another id"));
            }
            let Some(record) = self.keys.get(&*lease.key_id) else {
                return Err(format!(
                    "lease {lease_id} refers to missing key {}",
                    lease.key_id
                ));
            };
            if lease.expires_at_ms <= self.last_at_ms {
                return Err(format!("lease {lease_id} outlived its expiry"));
            }
            if lease.expires_at_ms > record.key.payload.valid_until_ms() {
                return Err(format!("lease {lease_id} outlives its key"));
            }
            if self.station_lease(&lease.station, &lease.key_id) != Some(lease_id) {
                return Err(format!("lease {lease_id} missing from the station index"));
            }
            if !self
                .expiry
                .contains(&(lease.expires_at_ms, lease_id.clone()))
            {
                return Err(format!("lease {lease_id} missing from the expiry index"));
            }
            *counted.entry(&*lease.key_id).or_default() += 1;
        }
        let indexed: usize = self.by_station.values().map(|held| held.len()).sum();
        if indexed != self.leases.len() || self.expiry.len() != self.leases.len() {
            return Err("indexes hold entries for leases that do not exist".into());
        }
        for (key_id, record) in &self.keys {
            let in_use = counted.get(key_id.as_str()).copied().unwrap_or(0);
            if in_use != record.in_use {
                return Err(format!(
                    "key {key_id} counts {} in use, leases say {in_use}",
                    record.in_use
                ));
            }
            if in_use > record.key.payload.licenses {
                return Err(format!(
                    "key {key_id} over-issued: {in_use} leases for {} licenses",
                    record.key.payload.licenses
                ));
            }
        }
        Ok(())
    }
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
}

impl CheckoutRequest<'_> {
    fn validate(&self) -> Result<(), String> {
        if !is_name(self.component) {
            return Err(format!(
                "component {:?} is not a valid name (1-128 of A-Z a-z 0-9 - _ .)",
                self.component
            ));
        }
        if self.station.is_empty() || self.station.len() > FREE_TEXT_LENGTH_MAX {
            return Err(format!(
                "station must have 1 to {FREE_TEXT_LENGTH_MAX} characters"
            ));
        }
        if self.user.len() > FREE_TEXT_LENGTH_MAX || self.host.len() > FREE_TEXT_LENGTH_MAX {
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
        Ok(())
    }
}

fn key_state(record: &KeyRecord, at: i64) -> KeyState {
    let payload = &record.key.payload;
    if at < payload.valid_from_ms() {
        KeyState::Pending
    } else if at < payload.valid_until_ms() {
        KeyState::Active
    } else {
        KeyState::Expired
    }
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
