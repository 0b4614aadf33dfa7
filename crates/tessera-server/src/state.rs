//! The server's shared state and the operations HTTP handlers and timers perform on it.
//! Every mutation is stamped here and proposed through consensus; reads go to the local
//! ledger replica.

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::Timestamp;
use tessera_api::{ComponentStatus, Holder, KeySummary, Lease, Status};
use tessera_core::ledger::KeyState;
use tessera_core::{Command, LeaseView, Ledger, LicenseKey, Outcome, SecretKey, Stamped, answer};

use crate::clock::Stamper;
use crate::config::ServerConfig;
use crate::consensus::Consensus;
use crate::error::ApiError;
use crate::events::{EventKind, Severity};
use crate::ids::LeaseIds;
use crate::metrics::{ComponentGauges, Metrics};

pub use tessera_engine::schedule::TIME_BEACON_MS;
/// Domain separation of the lease secret's signature ([`AppState::lease_secret`]).
const LEASE_SECRET_CONTEXT: &[u8] = b"tessera-lease-secret/v1\n";
/// Domain separation of lease ids derived from holder keys ([`AppState::holder_lease_id`]).
const HOLDER_CONTEXT: &[u8] = b"tessera-lease-holder/v1\n";
/// The key of the cheap derivations (HMAC-SHA256) that replaced a signature per call
/// ([`derivation_key`]).
const DERIVATION_KEY_CONTEXT: &[u8] = b"tessera-derivation-key/v2\n";

/// The key lease secrets and holder lease ids are derived with: a hash of the identity key's
/// (deterministic) signature of a fixed text, so every host of a domain or pair, which share
/// the identity, derives the same, and nobody without the identity key can.
pub fn derivation_key(identity: &SecretKey) -> [u8; 32] {
    use sha2::Digest;
    let signature = identity.sign_base64(DERIVATION_KEY_CONTEXT);
    let mut hash = sha2::Sha256::new();
    hash.update(DERIVATION_KEY_CONTEXT);
    hash.update(signature.as_bytes());
    hash.finalize().into()
}

/// HMAC-SHA256 of `context || parts` (each part followed by a 0 byte), its first 16 bytes
/// in hex.
fn derive(key: &[u8; 32], context: &[u8], parts: &[&str]) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(context);
    for part in parts {
        mac.update(part.as_bytes());
        mac.update(&[0]);
    }
    hex::encode(&mac.finalize().into_bytes()[..16])
}

fn same_text(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

pub struct AppState {
    pub config: ServerConfig,
    pub consensus: Consensus,
    pub stamper: Stamper,
    pub ids: LeaseIds,
    pub admin_token: String,
    pub metrics: Metrics,
    /// The server's identity key: signs sync requests; its public half is certified by the
    /// vendor.
    pub identity: SecretKey,
    /// See [`derivation_key`].
    pub derivation_key: [u8; 32],
    pub notifier: crate::events::Notifier,
    /// The sync-deadline warnings raised (each threshold once per certificate).
    pub deadline_notices: std::sync::Mutex<tessera_engine::schedule::DeadlineNotices>,
    /// What the primary's alerts already said (key ends, hosts, denials).
    pub alerts: crate::alerts::said::Alerts,
    /// Tags of the pair RPCs received lately (time, tag): a replay is refused.
    pub seen_pair_tags: std::sync::Mutex<std::collections::VecDeque<(i64, String)>>,
    /// When a clock set back was last reported, so a stuck clock does not flood the channels.
    pub last_clock_event_ms: std::sync::atomic::AtomicI64,
    /// The scheduled key update (`tessera_engine::schedule::UpdateSchedule`: when it is due,
    /// and a failed attempt retried after its retry time, not on every tick).
    pub update_schedule: std::sync::Mutex<tessera_engine::schedule::UpdateSchedule>,
    /// Held through an online sync: a scheduled sync and an administrator's one at the same
    /// time would each begin a request, and only the newest is answerable.
    pub online_sync: tokio::sync::Mutex<()>,
    /// Usage history and audit chain (`DATA/usage.sqlite3`), written in the background.
    pub history: crate::history::History,
    /// The state of the links to neighbour servers.
    pub links: crate::neighbours::links::Links,
    /// What each neighbour serves, for redirecting checkouts (see `neighbours::redirect`).
    pub served: crate::neighbours::served::ServedCache,
    /// HTTP client for neighbour servers (no proxy: they are on the site's network).
    pub http: reqwest::Client,
    /// HTTP client for the other hosts of the domain or pair (forwarded writes, pair RPCs,
    /// the primary's domain view): `https` with the peers' trust when this host serves
    /// HTTPS (see [`AppState::peer_url`]).
    pub peer_http: reqwest::Client,
    /// HTTP client for the vendor's authority and webhooks: through the site's proxy
    /// (`HTTPS_PROXY`) if it has one.
    pub external_http: reqwest::Client,
    /// The redundant pair's side of this host (does nothing unless it is one of a pair).
    pub pair: crate::pair::Pair,
}

pub use tessera_engine::schedule::DEADLINE_NOTICE_DAYS;

pub type SharedState = Arc<AppState>;

pub fn timestamp(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::MAX)
}

impl AppState {
    /// The URL of `path` on the peer (host of this domain or pair) at `addr` (`host:port`).
    pub fn peer_url(&self, addr: &str, path: &str) -> String {
        format!("{}://{addr}{path}", self.config.peer_scheme())
    }

    /// Reads the ledger this host serves from (its alone ledger while a pair's host serves
    /// alone; else the applied one).
    pub fn read<R>(&self, f: impl FnOnce(&Ledger) -> R) -> R {
        self.pair.read(&self.consensus, f)
    }

    fn lease_ttl_ms(&self) -> i64 {
        self.config.lease_ttl.as_millis() as i64
    }

    pub fn lease_to_api(&self, lease: &LeaseView, component: Option<&str>) -> Lease {
        Lease {
            lease_id: lease.lease_id.clone(),
            component: component
                .map(str::to_string)
                .or_else(|| lease.components.first().cloned())
                .unwrap_or_default(),
            components: lease.components.clone(),
            key_id: lease.key_id.clone(),
            station: lease.station.clone(),
            user: lease.user.clone(),
            host: lease.host.clone(),
            issued_at: timestamp(lease.issued_at_ms),
            renewed_at: timestamp(lease.renewed_at_ms),
            expires_at: timestamp(lease.expires_at_ms),
            heartbeat_interval_s: self.config.heartbeat_interval_s(),
            borrowed: lease.borrowed,
            lease_secret: None,
            lease_token: None,
            license_key: None,
            server_certificate: None,
            grant: None,
        }
    }

    /// Adds the signed lease token (carrying the application's `nonce`) and what checks it:
    /// the vendor's license key, this server's certificate, the grant chain of a donated
    /// license. Every host of a domain or pair signs with the same identity.
    pub fn sign_lease(&self, lease: &mut Lease, nonce: &str) {
        let now_ms = self.stamper.now_ms();
        let (key, certificate, grant) = self.read(|ledger| {
            (
                ledger.key(&lease.key_id).cloned(),
                ledger.sync_state().certificate.clone(),
                ledger.received_grant(&lease.key_id).cloned(),
            )
        });
        let Some(key) = key else {
            return;
        };
        let payload = tessera_core::lease_token::LeaseTokenPayload {
            format: tessera_core::lease_token::LEASE_TOKEN_FORMAT.into(),
            version: tessera_core::lease_token::LEASE_TOKEN_VERSION,
            lease_id: lease.lease_id.clone(),
            key_id: key.payload.key_id.clone(),
            component: lease.component.clone(),
            components: lease.components.clone(),
            station: lease.station.clone(),
            user: lease.user.clone(),
            host: lease.host.clone(),
            nonce: nonce.to_string(),
            issued_at: timestamp(now_ms),
            valid_until: lease.expires_at,
            server_id: self.config.server_id.clone().unwrap_or_default(),
            server_public_key: self.identity.public_key().to_base64(),
        };
        lease.lease_token = Some(payload.issue(&self.identity));
        lease.license_key = serde_json::to_value(&key).ok();
        lease.server_certificate = certificate.and_then(|c| serde_json::to_value(c).ok());
        lease.grant = grant.and_then(|g| serde_json::to_value(g).ok());
    }

    /// The holder's credential for a lease: derived from the lease id with the server's
    /// identity key (a deterministic Ed25519 signature, hashed), so every host of a domain or
    /// pair (one identity) knows it without storing it, and nobody without the key can.
    pub fn lease_secret(&self, lease_id: &str) -> String {
        derive(&self.derivation_key, LEASE_SECRET_CONTEXT, &[lease_id])
    }

    /// The first derivations (an Ed25519 signature per call), still accepted so leases
    /// granted before an upgrade keep working: `(context, data)` signed, hashed.
    fn signed_derivation(&self, context: &[u8], data: &[u8]) -> String {
        use sha2::Digest;
        let mut bytes = context.to_vec();
        bytes.extend_from_slice(data);
        let signature = self.identity.sign_base64(&bytes);
        hex::encode(&sha2::Sha256::digest(signature.as_bytes())[..16])
    }

    /// Whether `lease_id` is the one derived from `station` and `holder_key`, now or by the
    /// first derivation (a lease checked out before an upgrade).
    pub fn is_holder_lease_id(&self, lease_id: &str, station: &str, holder_key: &str) -> bool {
        same_text(lease_id, &self.holder_lease_id(station, holder_key)) || {
            let mut data = station.as_bytes().to_vec();
            data.push(0);
            data.extend_from_slice(holder_key.as_bytes());
            same_text(lease_id, &self.signed_derivation(HOLDER_CONTEXT, &data))
        }
    }

    /// The lease id for a checkout by `station` with `holder_key`: derived with the identity
    /// key (deterministic, the same on every host), so a retry proposes the same id and the
    /// answer proves the asker knew the key. Unguessable without the key and the identity.
    pub fn holder_lease_id(&self, station: &str, holder_key: &str) -> String {
        derive(&self.derivation_key, HOLDER_CONTEXT, &[station, holder_key])
    }

    /// Checks the `x-lease-secret` a station sent for `lease_id`.
    pub fn check_lease_secret(
        &self,
        lease_id: &str,
        presented: Option<&str>,
    ) -> Result<(), ApiError> {
        let Some(presented) = presented else {
            return Err(ApiError::LeaseSecretRequired);
        };
        let same = same_text(presented, &self.lease_secret(lease_id))
            || same_text(
                presented,
                &self.signed_derivation(LEASE_SECRET_CONTEXT, lease_id.as_bytes()),
            );
        if same {
            Ok(())
        } else {
            Err(ApiError::LeaseSecretWrong)
        }
    }

    /// Stamps and proposes a command that may hand out or extend licenses.
    pub(crate) async fn propose_issuing(&self, command: Command) -> Result<Outcome, ApiError> {
        let at_ms = self.stamper.stamp().map_err(|set_back| {
            let (now, high_water) = (
                timestamp(set_back.now_ms).to_string(),
                timestamp(set_back.high_water_ms).to_string(),
            );
            let error = if set_back.vendor {
                ApiError::ClockBehindVendor {
                    now,
                    vendor_time: high_water,
                }
            } else {
                ApiError::ClockSetBack { now, high_water }
            };
            let last = self.last_clock_event_ms.load(std::sync::atomic::Ordering::Relaxed);
            if set_back.now_ms.saturating_sub(last).abs() >= 60_000 {
                self.last_clock_event_ms
                    .store(set_back.now_ms, std::sync::atomic::Ordering::Relaxed);
                self.notifier.emit(
                    set_back.high_water_ms,
                    EventKind::ClockSetBack,
                    Severity::Error,
                    error.to_string(),
                    serde_json::json!({"now_ms": set_back.now_ms, "high_water_ms": set_back.high_water_ms}),
                );
            }
            error
        })?;
        self.propose_at(at_ms, command).await
    }

    pub(crate) async fn propose_at(
        &self,
        at_ms: i64,
        command: Command,
    ) -> Result<Outcome, ApiError> {
        let cause = Cause::of(&command);
        let entry = Stamped { at_ms, command };
        let applied = match self.pair.route(self.consensus.pair_link()) {
            crate::pair::Route::Consensus { disturbed } => {
                let applied = self.consensus.propose(entry).await?;
                if !self
                    .pair
                    .still_in_step(self.consensus.pair_link(), disturbed)
                {
                    return Err(ApiError::PairRecovering);
                }
                applied
            }
            crate::pair::Route::Alone => match self.pair.apply_alone(&entry) {
                Some(Ok(applied)) => applied,
                Some(Err(journal_error)) => {
                    return Err(ApiError::Internal(journal_error.to_string()));
                }
                None => return Err(ApiError::PairRecovering),
            },
            crate::pair::Route::Recovering => return Err(ApiError::PairRecovering),
        };
        self.record_effects(at_ms, &cause, &applied);
        match applied.outcome {
            Outcome::Refused { refusal } => Err(ApiError::Refused(refusal)),
            outcome => Ok(outcome),
        }
    }

    /// Returns the lease and whether it was created (false: the station already held it).
    pub async fn checkout(
        &self,
        request: tessera_api::CheckoutRequest,
    ) -> Result<(Lease, bool), ApiError> {
        self.checkout_from(request, None, None).await
    }

    /// A checkout; with no key for the component here, sent on to a neighbour serving it
    /// unless `redirected_from` names the server that already sent it here.
    /// `lease_id`: the id for a new lease (derived from the holder key), else a random one.
    pub async fn checkout_from(
        &self,
        request: tessera_api::CheckoutRequest,
        lease_id: Option<String>,
        redirected_from: Option<&str>,
    ) -> Result<(Lease, bool), ApiError> {
        let command = Command::Checkout {
            lease_id: lease_id.unwrap_or_else(|| self.ids.next_id()),
            component: request.component.clone(),
            station: request.station.clone(),
            user: request.user.clone(),
            host: request.host.clone(),
            lease_ttl_ms: self.lease_ttl_ms(),
            borrow_ms: i64::from(request.borrow_hours) * 3_600_000,
        };
        let mut result = self.propose_issuing(command).await;
        if let Err(ApiError::Refused(tessera_core::Refusal::ComponentNotLicensed { component })) =
            &result
            && redirected_from.is_none()
            && let Some(redirect) = self.redirect_for(component).await
        {
            result = Err(ApiError::Redirected {
                component: component.clone(),
                neighbour: redirect.neighbour,
                location: redirect.location,
            });
        }
        let label = match &result {
            Ok(Outcome::LeaseGranted { created: true, .. }) => "granted".to_string(),
            Ok(_) => "existing".to_string(),
            Err(error) => error.status_and_code().1.to_string(),
        };
        self.metrics
            .checkouts
            .get_or_create(&crate::metrics::OutcomeLabel { outcome: label })
            .inc();
        if let Err(ApiError::Refused(refusal)) = &result {
            let now_ms = self.stamper.now_ms();
            self.history.denial(now_ms, &request, refusal.code());
            self.note_denial(&request.component, refusal.code(), now_ms);
        }
        if let Err(ApiError::Refused(tessera_core::Refusal::NoLicensesAvailable { .. })) = &result {
            self.metrics
                .denials
                .get_or_create(&crate::metrics::ComponentLabel {
                    component: request.component.clone(),
                })
                .inc();
        }
        let answer::Granted { lease, created } = result?.try_into()?;
        Ok((self.lease_to_api(&lease, Some(&request.component)), created))
    }

    pub async fn heartbeat(&self, lease_id: String) -> Result<Lease, ApiError> {
        let command = Command::Heartbeat {
            lease_id,
            lease_ttl_ms: self.lease_ttl_ms(),
        };
        let answer::Renewed { lease } = self.propose_issuing(command).await?.try_into()?;
        Ok(self.lease_to_api(&lease, None))
    }

    /// Checkin (station) or force-release (admin): both only give a license back, so they are
    /// accepted even while the clock is set back.
    pub async fn release(&self, lease_id: String, forced: bool) -> Result<Lease, ApiError> {
        let command = if forced {
            Command::ForceRelease { lease_id }
        } else {
            Command::Checkin { lease_id }
        };
        let at_ms = self.stamper.stamp_lenient();
        let answer::Released { lease } = self.propose_at(at_ms, command).await?.try_into()?;
        Ok(self.lease_to_api(&lease, None))
    }

    pub async fn import_key(&self, key: LicenseKey) -> Result<String, ApiError> {
        // Verified before it is proposed (the ledger verifies again on apply): a key that does
        // not verify never enters the log, so one found there at start was edited on disk.
        let command = Command::ImportKey { key };
        self.read(|ledger| ledger.verify_command(&command))
            .map_err(ApiError::Refused)?;
        let answer::KeyImported { key_id } = self.propose_issuing(command).await?.try_into()?;
        self.stamper
            .observe_vendor(self.read(|ledger| ledger.vendor_time_ms()));
        Ok(key_id)
    }

    pub async fn remove_key(&self, key_id: String) -> Result<(String, u32), ApiError> {
        let at_ms = self.stamper.stamp_lenient();
        let (ending, covered): (Vec<LeaseView>, Vec<String>) = self.consensus.read(|ledger| {
            let ending = ledger
                .leases()
                .into_iter()
                .filter(|lease| lease.key_id == key_id && lease.expires_at_ms > at_ms)
                .collect();
            (ending, ledger.key_components(&key_id))
        });
        let answer::KeyRemoved {
            key_id,
            leases_ended,
        } = self
            .propose_at(at_ms, Command::RemoveKey { key_id })
            .await?
            .try_into()?;
        for lease in &ending {
            self.history
                .lease_event(at_ms, "admin", "key_removed", lease, None, &covered);
        }
        self.history.key_event(
            at_ms,
            "admin",
            "key_removed",
            &key_id,
            format!("{leases_ended} leases ended"),
        );
        self.notifier.emit(
            at_ms,
            EventKind::KeyRemoved,
            if leases_ended > 0 {
                Severity::Warning
            } else {
                Severity::Info
            },
            format!(
                "license key {key_id} was removed by the administrator; {leases_ended} leases ended"
            ),
            serde_json::json!({"key_id": key_id, "leases_ended": leases_ended}),
        );
        Ok((key_id, leases_ended))
    }

    /// One round of the primary's timer: propose `Expire` when a lease is due, or when no
    /// command has carried time into the log for a while. Returns the leases ended.
    pub async fn tick(&self) -> Result<u32, ApiError> {
        if !self.consensus.is_primary() {
            self.not_primary();
            return Ok(0);
        }
        let now_ms = self.stamper.now_ms();
        self.notify_deadline(now_ms);
        self.check_alerts(now_ms);
        let (due, last_at_ms, vendor_time_ms) = self.consensus.read(|ledger| {
            (
                tessera_engine::schedule::expire_due(now_ms, ledger),
                ledger.last_at_ms(),
                ledger.vendor_time_ms(),
            )
        });
        // A host that became primary in a domain takes over the time mark of the log, and
        // the vendor's time floor.
        self.stamper.observe(last_at_ms);
        self.stamper.observe_vendor(vendor_time_ms);
        let ended = if due {
            let answer::Expired { leases_ended } =
                self.propose_issuing(Command::Expire).await?.try_into()?;
            leases_ended
        } else {
            0
        };
        // After the expiry, so the leases it ends are counted there.
        self.record_trust(now_ms).await;
        Ok(ended)
    }

    /// The fingerprints of the vendor keys this host trusts (its configuration), sorted.
    pub fn trusted_fingerprints(&self) -> Vec<String> {
        self.consensus.read(|ledger| {
            let mut trusted: Vec<String> = ledger
                .config()
                .trusted_vendors
                .iter()
                .map(|key| key.fingerprint())
                .collect();
            trusted.sort();
            trusted.dedup();
            trusted
        })
    }

    /// Records the trust list in the ledger when it differs from the one recorded last (the
    /// primary's, at its first tick and after its configuration changed), with a
    /// `trust_changed` event; the next sync reports it to the vendor (docs/security.md).
    async fn record_trust(&self, now_ms: i64) {
        let ours = self.trusted_fingerprints();
        let recorded = self
            .consensus
            .read(|ledger| ledger.sync_state().trusted.clone());
        if ours == recorded {
            return;
        }
        let command = Command::RecordTrust { fingerprints: ours };
        match answer::expect(self.propose_at(self.stamper.stamp_lenient(), command).await) {
            Ok(answer::TrustRecorded { added, removed })
                if !(added.is_empty() && removed.is_empty()) =>
            {
                let (severity, message) = if recorded.is_empty() {
                    (
                        Severity::Info,
                        format!("trust list recorded: vendor keys {}", added.join(", ")),
                    )
                } else {
                    (
                        Severity::Warning,
                        format!(
                            "the trust list changed: added {}, removed {}; the next sync reports it to the vendor",
                            if added.is_empty() {
                                "none".to_string()
                            } else {
                                added.join(", ")
                            },
                            if removed.is_empty() {
                                "none".to_string()
                            } else {
                                removed.join(", ")
                            }
                        ),
                    )
                };
                self.notifier.emit(
                    now_ms,
                    EventKind::TrustChanged,
                    severity,
                    message,
                    serde_json::json!({"added": added, "removed": removed}),
                );
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "recording the trust list failed"),
        }
    }

    pub fn role(&self) -> crate::consensus::HostRole {
        if self.consensus.is_primary() {
            crate::consensus::HostRole::Primary
        } else {
            crate::consensus::HostRole::Backup
        }
    }

    /// Keys, components and sync state, with the first [`tessera_api::STATUS_LEASES_MAX`]
    /// leases to expire and as many holders per component (from the expiry index, not a
    /// pass over every lease); with `summary`, no leases or holders at all: the cost depends
    /// on the keys only.
    pub fn status(&self) -> Status {
        self.status_with(false)
    }

    /// [`AppState::status`], or with `summary` its counts only.
    pub fn status_with(&self, summary: bool) -> Status {
        let now_ms = self.stamper.now_ms();
        let limit = if summary {
            0
        } else {
            tessera_api::STATUS_LEASES_MAX
        };
        let (keys, mut components, overview, sync, usage_reports, serving_alone) =
            self.read(|ledger| {
                let overview = if summary {
                    tessera_core::LeaseOverview {
                        total: ledger.lease_count(),
                        ..Default::default()
                    }
                } else {
                    ledger.lease_overview(limit)
                };
                let usage_reports = ledger
                    .usage_reports()
                    .iter()
                    .map(|(from, r)| {
                        let summary = tessera_api::UsageReportSummary {
                            at: timestamp(r.at_ms),
                            period_s: r.period_ms / 1000,
                            active_stations: r.active_stations.clone(),
                            in_use: r.in_use.clone(),
                        };
                        (from.clone(), summary)
                    })
                    .collect();
                (
                    key_summaries(ledger, now_ms),
                    component_totals(ledger, now_ms),
                    overview,
                    self.sync_status_of(ledger, now_ms),
                    usage_reports,
                    ledger.alone().is_some(),
                )
            });
        let tessera_core::LeaseOverview {
            leases,
            total,
            holders,
        } = overview;
        for (component, (leases, _)) in holders {
            if let Some(entry) = components.get_mut(&component) {
                entry.holders = leases.iter().map(holder).collect();
            }
        }
        // Every lease of a key covering the component holds it: the keys' counts say how
        // many, listed or not.
        for entry in components.values_mut() {
            entry.holders_total = u64::from(entry.in_use);
        }
        Status {
            server_id: self.config.server_id.clone(),
            now: timestamp(now_ms),
            role: self.role().to_string(),
            keys,
            components: components.into_values().collect(),
            leases: leases
                .iter()
                .map(|lease| self.lease_to_api(lease, None))
                .collect(),
            leases_total: total as u64,
            serving_alone,
            sync,
            usage_reports,
        }
    }

    /// One lease, by id.
    pub fn lease(&self, lease_id: &str) -> Option<Lease> {
        self.read(|ledger| ledger.lease(lease_id))
            .map(|lease| self.lease_to_api(&lease, None))
    }

    /// One page of the leases `filter` matches, after the cursor `after` (a lease id), in
    /// lease-id order (sorted pages: `lease_listing.rs`).
    pub fn lease_page(
        &self,
        filter: &tessera_core::LeaseFilter<'_>,
        after: Option<&str>,
        limit: usize,
    ) -> tessera_api::LeasePage {
        self.sorted_lease_page(
            filter,
            tessera_core::LeaseOrder::default(),
            after.map(tessera_core::LeaseCursor::After),
            limit,
        )
        .expect("any text is a cursor of lease-id order")
    }

    pub fn render_metrics(&self) -> String {
        let now_ms = self.stamper.now_ms();
        let (components, active, donated, keys) = self.read(|ledger| {
            let mut donated: BTreeMap<String, u32> = BTreeMap::new();
            let mut keys = Vec::new();
            for view in ledger.keys(now_ms) {
                for component in &view.key.payload.components {
                    *donated.entry(component.clone()).or_default() += view.donated;
                }
                keys.push(crate::metrics::KeyGauges {
                    key: view.id.clone(),
                    licenses: view.licenses,
                    in_use: view.in_use,
                    donated: view.donated,
                    received: view.received.as_ref().map_or(0, |r| r.licenses),
                });
            }
            // Counts only (no holder lists): a scrape costs the same at 1 lease or a million.
            (
                component_totals(ledger, now_ms)
                    .into_values()
                    .collect::<Vec<_>>(),
                ledger.lease_count(),
                donated,
                keys,
            )
        });
        let gauges: Vec<ComponentGauges> = components
            .into_iter()
            .map(|c| ComponentGauges {
                donated: donated.get(&c.component).copied().unwrap_or(0),
                component: c.component,
                licenses: c.licenses,
                in_use: c.in_use,
                free: c.free,
            })
            .collect();
        let deadline_ms = self
            .consensus
            .read(|ledger| ledger.sync_state().deadline_ms());
        self.metrics
            .sync_deadline
            .set(deadline_ms.map_or(0, |ms| ms.div_euclid(1000)));
        self.update_domain_gauges();
        self.metrics
            .render(&gauges, &keys, active, self.consensus.is_primary())
    }

    /// Per-host gauges of the server domain, from this host's view.
    fn update_domain_gauges(&self) {
        let m = &self.metrics;
        m.domain_host_healthy.clear();
        m.domain_host_is_primary.clear();
        m.domain_host_replication_lag.clear();
        m.domain_host_last_contact_ms.clear();
        for view in self.consensus.domain_view() {
            let label = crate::metrics::HostLabel {
                host: view.host.to_string(),
            };
            m.domain_host_healthy
                .get_or_create(&label)
                .set(i64::from(view.healthy));
            m.domain_host_is_primary
                .get_or_create(&label)
                .set(i64::from(view.role == crate::consensus::HostRole::Primary));
            if let Some(lag) = view.replication_lag {
                m.domain_host_replication_lag
                    .get_or_create(&label)
                    .set(lag as i64);
            }
            if let Some(ms) = view.last_contact_ms {
                m.domain_host_last_contact_ms
                    .get_or_create(&label)
                    .set(ms as i64);
            }
        }
    }
}

impl AppState {
    /// Sends `sync_deadline_near` once per threshold (30, 7, 1 days) for the current deadline.
    /// Only thresholds shorter than half the certificate's term count: a 30-day certificate
    /// from an online sync is not "near its end" the day it was issued.
    fn notify_deadline(&self, now_ms: i64) {
        let notice = {
            let mut notices = self.deadline_notices.lock().expect("notices lock");
            self.consensus
                .read(|ledger| notices.on_tick(now_ms, ledger))
        };
        let Some(tessera_engine::schedule::DeadlineNotice {
            deadline_ms,
            days_left,
            threshold_days: threshold,
        }) = notice
        else {
            return;
        };
        let message = if days_left < 0 {
            format!(
                "the server certificate expired at {}: this server issues no licenses from keys bound to its server ID until it synchronizes with the vendor",
                timestamp(deadline_ms)
            )
        } else {
            format!(
                "synchronize with the vendor before {} ({days_left} days left), or this server stops issuing licenses from keys bound to its server ID",
                timestamp(deadline_ms)
            )
        };
        self.notifier.emit(
            now_ms,
            EventKind::SyncDeadlineNear,
            Severity::Warning,
            message,
            serde_json::json!({"deadline_ms": deadline_ms, "days_left": days_left, "threshold_days": threshold}),
        );
    }
}

fn state_name(state: KeyState) -> &'static str {
    match state {
        KeyState::Pending => "pending",
        KeyState::Active => "active",
        KeyState::Expired => "expired",
    }
}

pub fn key_summaries(ledger: &Ledger, now_ms: i64) -> Vec<KeySummary> {
    ledger
        .keys(now_ms)
        .into_iter()
        .map(|view| {
            let payload = &view.key.payload;
            let received = view.received.as_ref();
            KeySummary {
                key_id: view.id.clone(),
                customer: payload.customer.clone(),
                components: received
                    .map(|r| r.grant.last().components.clone())
                    .unwrap_or_else(|| payload.components.clone()),
                licenses: view.licenses,
                in_use: view.in_use,
                free: view.free,
                alone_share: view.alone_share,
                ended_early: view.ended_early,
                valid_from: payload.valid_from,
                valid_until: payload.valid_until,
                state: state_name(view.state).to_string(),
                server_id: payload.server_id.clone(),
                renews: payload.renews.clone(),
                allocated: view.meta.stations,
                groups: view.meta.groups.iter().cloned().collect(),
                neighbours: view.meta.neighbours.iter().cloned().collect(),
                replaced_by: view.meta.replaced_by.clone(),
                renewal: view.meta.renewal.as_ref().map(|result| match result {
                    tessera_core::RenewalResult::Allocated { renewal_key_id } => {
                        format!("replaced by {renewal_key_id}")
                    }
                    tessera_core::RenewalResult::NotAllocated {
                        renewal_key_id,
                        reason,
                    } => format!("renewal key {renewal_key_id} added but not allocated: {reason}"),
                }),
                donated_out: view.donated,
                received: received.map_or(0, |r| r.licenses),
                received_from: received.map(|r| r.donor.clone()),
                vendor_key_id: payload.key_id.clone(),
            }
        })
        .collect()
}

/// A lease as a holder of a component it covers.
fn holder(lease: &tessera_core::LeaseView) -> Holder {
    Holder {
        lease_id: lease.lease_id.clone(),
        station: lease.station.clone(),
        user: lease.user.clone(),
        host: lease.host.clone(),
        key_id: lease.key_id.clone(),
        components: lease.components.clone(),
        since: timestamp(lease.issued_at_ms),
        expires_at: timestamp(lease.expires_at_ms),
    }
}

/// Per component: the licenses of active keys covering it and their use (no holders: reads
/// the keys only).
pub fn component_totals(ledger: &Ledger, now_ms: i64) -> BTreeMap<String, ComponentStatus> {
    let mut components: BTreeMap<String, ComponentStatus> = BTreeMap::new();
    for view in ledger.keys(now_ms) {
        if view.state != KeyState::Active {
            continue;
        }
        let usable = view.licenses.saturating_sub(view.donated);
        let covered = match &view.received {
            Some(received) => received.grant.last().components.clone(),
            None => view.key.payload.components.clone(),
        };
        for component in &covered {
            let entry = components
                .entry(component.clone())
                .or_insert_with(|| ComponentStatus {
                    component: component.clone(),
                    licenses: 0,
                    in_use: 0,
                    free: 0,
                    alone_share: None,
                    holders: Vec::new(),
                    holders_total: 0,
                });
            entry.licenses += usable;
            entry.in_use += view.in_use;
            entry.free += view.free;
            if let Some(share) = view.alone_share {
                *entry.alone_share.get_or_insert(0) += share;
            }
        }
    }
    components
}

/// What of a command its effects need, taken before the command goes to the log (so the
/// command itself is not copied); `effects.rs` records them.
pub(crate) enum Cause {
    Checkout { component: String },
    Heartbeat,
    Checkin,
    ForceRelease,
    ImportKey,
    Other,
}

impl Cause {
    pub(crate) fn of(command: &Command) -> Cause {
        match command {
            Command::Checkout { component, .. } => Cause::Checkout {
                component: component.clone(),
            },
            Command::Heartbeat { .. } => Cause::Heartbeat,
            Command::Checkin { .. } => Cause::Checkin,
            Command::ForceRelease { .. } => Cause::ForceRelease,
            Command::ImportKey { .. } => Cause::ImportKey,
            _ => Cause::Other,
        }
    }
}
