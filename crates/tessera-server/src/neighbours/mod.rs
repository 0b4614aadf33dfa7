//! Links to neighbour servers: donating licenses as grants, renewing them while the link
//! lives, comparing records, and usage reports from receivers to donors.
//!
//! Every message between servers is an [`Envelope`] signed with the sender's identity key
//! and checked against the `public_key` configured for that neighbour. Two exchanges:
//!
//! - **push** (`POST /v1/neighbours/grants`, donor → receiver): the donor's current grants
//!   for the receiver; the receiver accepts them (`AcceptGrant`) and answers with what it
//!   holds from that donor. Sent after every donation change and every `sync_period`; the
//!   donor compares the answer with its own records (a mismatch is an event naming both
//!   counts).
//! - **renew** (`POST /v1/neighbours/renew`, receiver → donor): the receiver asks for its
//!   grants to be renewed, sending what it holds and, when due, its usage report; the donor
//!   commits `RenewDonations` *before* it signs and returns the renewed grants.
//!
//! When a receiver stops asking (switched off, cut off), its grants run out after at most one
//! renewal period and the donor's ledger takes the licenses back by itself.

pub mod config;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tessera_core::{Command, Grant, Outcome, PublicKey, UsageReport};

use crate::error::ApiError;
use crate::state::{AppState, timestamp};
use config::{Connection, Neighbour};

const SIGNING_CONTEXT: &[u8] = b"tessera-neighbour/v1\n";
/// After a failed attempt, a link is tried again no sooner than this.
pub const RETRY_MS: i64 = 10_000;
/// Timeout of one exchange with a neighbour.
const EXCHANGE_TIMEOUT_MS: u64 = 10_000;

/// A signed message between two neighbour servers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub from: String,
    pub to: String,
    pub sent_at_ms: i64,
    pub kind: String,
    pub body: serde_json::Value,
    /// Ed25519 by the sender's identity key over the context and the JSON of the fields above.
    pub signature: String,
}

fn signed_bytes(
    from: &str,
    to: &str,
    sent_at_ms: i64,
    kind: &str,
    body: &serde_json::Value,
) -> Vec<u8> {
    let mut bytes = SIGNING_CONTEXT.to_vec();
    bytes.extend(
        serde_json::to_vec(&(from, to, sent_at_ms, kind, body)).expect("envelope serializes"),
    );
    bytes
}

/// What a receiver holds from one donor, per grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The vendor key id.
    pub key_id: String,
    pub serial: u64,
    pub licenses: u32,
    pub in_use: u32,
}

/// Push body: the donor's grants for the receiver.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GrantsPush {
    pub grants: Vec<Grant>,
}

/// Push answer: what the receiver holds from the donor, and grants it refused.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeldAnswer {
    pub held: Vec<Held>,
    pub refused: Vec<String>,
}

/// Renew body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenewRequest {
    pub held: Vec<Held>,
    pub usage: Option<UsageReport>,
}

/// The donor's periods the receiver uses ("set on the parent, used by the child").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DonorSettings {
    pub donation_renewal_period_ms: i64,
    pub usage_report_period_ms: i64,
    pub active_station_period_ms: i64,
}

/// Renew answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenewAnswer {
    pub grants: Vec<Grant>,
    pub settings: DonorSettings,
}

/// What this host knows about the link to one neighbour (not replicated: a new primary
/// starts afresh and contacts every neighbour at once).
#[derive(Clone, Debug, Default)]
pub struct LinkState {
    pub last_contact_ms: Option<i64>,
    pub last_error: Option<String>,
    pub last_push_ms: Option<i64>,
    pub last_renew_ms: Option<i64>,
    pub last_report_ms: Option<i64>,
    pub last_failure_ms: Option<i64>,
    pub donor_settings: Option<DonorSettings>,
    /// The last mismatch reported, so the same one is not notified every sync period.
    pub last_mismatch: Option<String>,
}

/// Per-neighbour link states.
#[derive(Debug, Default)]
pub struct Links(Mutex<BTreeMap<String, LinkState>>);

impl Links {
    pub fn get(&self, id: &str) -> LinkState {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    fn update(&self, id: &str, change: impl FnOnce(&mut LinkState)) {
        let mut links = self.0.lock().unwrap_or_else(|e| e.into_inner());
        change(links.entry(id.to_string()).or_default());
    }
}

fn refused(code: &'static str, message: String) -> ApiError {
    ApiError::Neighbour { code, message }
}

impl AppState {
    fn neighbour(&self, id: &str) -> Option<&Neighbour> {
        self.config.neighbours.iter().find(|n| n.id == id)
    }

    fn own_id(&self) -> Result<&str, ApiError> {
        self.config.server_id.as_deref().ok_or_else(|| {
            refused(
                "unknown_neighbour",
                "this server has no server_id and no neighbours".into(),
            )
        })
    }

    /// Signs a message to a neighbour.
    pub fn seal<T: Serialize>(&self, to: &str, kind: &str, body: &T) -> Envelope {
        let from = self.config.server_id.clone().unwrap_or_default();
        let sent_at_ms = self.stamper.now_ms();
        let body = serde_json::to_value(body).expect("message serializes");
        let signature = self
            .identity
            .sign_base64(&signed_bytes(&from, to, sent_at_ms, kind, &body));
        Envelope {
            from,
            to: to.into(),
            sent_at_ms,
            kind: kind.into(),
            body,
            signature,
        }
    }

    /// Checks a message from a neighbour: addressed here, from a configured neighbour,
    /// signed by its key, of the expected kind, with a clock close enough to ours.
    pub fn open<T: DeserializeOwned>(
        &self,
        envelope: &Envelope,
        kind: &str,
    ) -> Result<(Neighbour, T), ApiError> {
        let own = self.own_id()?;
        if envelope.to != own {
            return Err(refused(
                "unknown_neighbour",
                format!(
                    "the message is for server {:?}, but this is server {own:?}",
                    envelope.to
                ),
            ));
        }
        let Some(neighbour) = self.neighbour(&envelope.from) else {
            return Err(refused(
                "unknown_neighbour",
                format!(
                    "server {own:?} has no neighbour {:?}: add a [[neighbour]] entry for it (id, url, relation, public_key) and restart",
                    envelope.from
                ),
            ));
        };
        let bytes = signed_bytes(
            &envelope.from,
            &envelope.to,
            envelope.sent_at_ms,
            &envelope.kind,
            &envelope.body,
        );
        if !matches!(
            neighbour
                .public_key
                .verify_base64(&bytes, &envelope.signature),
            Ok(true)
        ) {
            return Err(refused(
                "bad_neighbour_signature",
                format!(
                    "the message from {:?} is not signed by the public key configured for it ({}): check public_key in its [[neighbour]] entry",
                    envelope.from,
                    neighbour.public_key.fingerprint()
                ),
            ));
        }
        if envelope.kind != kind {
            return Err(ApiError::BadRequest {
                code: "malformed_json",
                message: format!("expected a {kind:?} message, got {:?}", envelope.kind),
            });
        }
        let skew_ms = (envelope.sent_at_ms - self.stamper.now_ms()).abs();
        let max_ms = self.config.clock_skew_max.as_millis() as i64;
        if skew_ms > max_ms {
            return Err(refused(
                "clock_skew",
                format!(
                    "the clocks of {:?} and {own:?} differ by {} s, more than clock_skew_max ({} s): correct the clocks",
                    envelope.from,
                    skew_ms / 1000,
                    max_ms / 1000
                ),
            ));
        }
        let body =
            serde_json::from_value(envelope.body.clone()).map_err(|e| ApiError::BadRequest {
                code: "malformed_json",
                message: format!("the {kind:?} message is malformed: {e}"),
            })?;
        Ok((neighbour.clone(), body))
    }

    /// What this server holds from a donor.
    fn held_from(&self, donor: &str) -> Vec<Held> {
        self.consensus.read(|ledger| {
            ledger
                .keys(ledger.last_at_ms())
                .into_iter()
                .filter_map(|view| {
                    let received = view.received.as_ref()?;
                    (received.donor == donor).then(|| Held {
                        key_id: view.key.payload.key_id.clone(),
                        serial: received.serial,
                        licenses: received.licenses,
                        in_use: view.in_use,
                    })
                })
                .collect()
        })
    }

    /// The signed grants for every donation to `to` with something outstanding.
    fn grants_for(&self, to: &str) -> Vec<Grant> {
        self.consensus.read(|ledger| {
            ledger
                .donations()
                .iter()
                .filter(|d| d.to == to)
                .filter_map(|d| {
                    let (source, payload) = ledger.grant_to_sign(&d.key_id, to)?;
                    Some(Grant::issue(source, payload, &self.identity))
                })
                .collect()
        })
    }

    /// Receiver side of a push or renew answer: accepts each grant that comes from this
    /// neighbour. Returns the refusals in words.
    async fn accept_grants(&self, neighbour: &Neighbour, grants: Vec<Grant>) -> Vec<String> {
        let mut refusals = Vec::new();
        for grant in grants {
            let Some(last) = grant.links.last().map(|l| l.payload.clone()) else {
                refusals.push("a grant without links".to_string());
                continue;
            };
            if last.donor != neighbour.id
                || last.donor_public_key != neighbour.public_key.to_base64()
            {
                refusals.push(format!(
                    "grant of key {} is signed by {:?}, not by neighbour {:?}",
                    last.key_id, last.donor, neighbour.id
                ));
                continue;
            }
            let command = Command::AcceptGrant {
                grant: Box::new(grant),
            };
            match self.propose_issuing(command).await {
                Ok(Outcome::GrantAccepted {
                    key_id,
                    licenses,
                    serial,
                    leases_ended,
                    ..
                }) => {
                    if leases_ended > 0 {
                        self.notifier.emit(
                            self.stamper.now_ms(),
                            "grant_reduced",
                            "warning",
                            format!(
                                "neighbour {} reduced the grant {key_id} to {licenses} licenses: {leases_ended} leases ended",
                                neighbour.id
                            ),
                            serde_json::json!({"key_id": key_id, "licenses": licenses, "serial": serial, "leases_ended": leases_ended}),
                        );
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    let message = format!(
                        "grant of key {} from {} refused ({}): {error}",
                        last.key_id,
                        neighbour.id,
                        error.status_and_code().1
                    );
                    self.notifier.emit(
                        self.stamper.now_ms(),
                        "grant_refused",
                        "error",
                        message.clone(),
                        serde_json::json!({"neighbour": neighbour.id, "key_id": last.key_id, "serial": last.serial, "code": error.status_and_code().1}),
                    );
                    refusals.push(message);
                }
            }
        }
        refusals
    }

    /// `POST /v1/neighbours/grants` on the receiver.
    pub async fn receive_push(&self, envelope: Envelope) -> Result<Envelope, ApiError> {
        let (neighbour, push): (Neighbour, GrantsPush) = self.open(&envelope, "grants")?;
        if !neighbour.receive {
            return Err(refused(
                "neighbour_not_allowed",
                format!(
                    "this server does not accept licenses from {:?} (relation {}{}): a child receives from its parents, a peer only with receive = true",
                    neighbour.id,
                    neighbour.relation.name(),
                    if neighbour.relation == config::Relation::Peer {
                        ", receive = false"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let refused = self.accept_grants(&neighbour, push.grants).await;
        self.links.update(&neighbour.id, |link| {
            link.last_contact_ms = Some(self.stamper.now_ms());
        });
        let answer = HeldAnswer {
            held: self.held_from(&neighbour.id),
            refused,
        };
        Ok(self.seal(&neighbour.id, "held", &answer))
    }

    /// `POST /v1/neighbours/renew` on the donor.
    pub async fn receive_renew(&self, envelope: Envelope) -> Result<Envelope, ApiError> {
        let (neighbour, request): (Neighbour, RenewRequest) = self.open(&envelope, "renew")?;
        if !neighbour.send {
            return Err(refused(
                "neighbour_not_allowed",
                format!(
                    "this server does not donate to {:?} (relation {}): a parent donates to its children, a peer only with send = true",
                    neighbour.id,
                    neighbour.relation.name()
                ),
            ));
        }
        self.propose_issuing(Command::RenewDonations {
            to: neighbour.id.clone(),
        })
        .await?;
        if let Some(report) = request.usage {
            self.propose_issuing(Command::RecordUsageReport {
                from: neighbour.id.clone(),
                report,
            })
            .await?;
        }
        self.compare_records(&neighbour.id, &request.held, true);
        self.links.update(&neighbour.id, |link| {
            link.last_contact_ms = Some(self.stamper.now_ms());
        });
        let settings = &self.config.licenses;
        let answer = RenewAnswer {
            grants: self.grants_for(&neighbour.id),
            settings: DonorSettings {
                donation_renewal_period_ms: settings.donation_renewal_period.as_millis() as i64,
                usage_report_period_ms: settings.usage_report_period.as_millis() as i64,
                active_station_period_ms: settings.active_station_period.as_millis() as i64,
            },
        };
        Ok(self.seal(&neighbour.id, "renewed", &answer))
    }

    /// Compares what a receiver says it holds with this donor's records. `renewing`: the
    /// receiver reported before the renewal just committed, so a serial one below ours is
    /// expected. Any other difference is an event and a notification with both counts.
    fn compare_records(&self, to: &str, held: &[Held], renewing: bool) -> Vec<String> {
        let donations = self.consensus.read(|ledger| ledger.donations());
        let mut mismatches = Vec::new();
        let mut seen = BTreeSet::new();
        for donation in donations.iter().filter(|d| d.to == to) {
            let key_id = donation.key_id.split('@').next().unwrap_or("").to_string();
            let counted = donation.counted();
            let theirs = held.iter().find(|h| h.key_id == key_id);
            seen.insert(key_id.clone());
            let (their_licenses, their_serial) = theirs.map_or((0, 0), |h| (h.licenses, h.serial));
            let serial_ok = their_serial == donation.serial
                || (renewing && their_serial + 1 == donation.serial);
            let issued: BTreeSet<u32> = donation.outstanding.iter().map(|o| o.licenses).collect();
            if counted == 0 && theirs.is_none() {
                continue;
            }
            if theirs.is_none() || !issued.contains(&their_licenses) || !serial_ok {
                mismatches.push(format!(
                    "neighbour {to} reports {their_licenses} licenses of key {key_id} received (grant serial {their_serial}), this server counts {counted} donated (serial {})",
                    donation.serial
                ));
            }
        }
        for theirs in held.iter().filter(|h| !seen.contains(&h.key_id)) {
            mismatches.push(format!(
                "neighbour {to} reports {} licenses of key {} received (grant serial {}), this server counts 0 donated",
                theirs.licenses, theirs.key_id, theirs.serial
            ));
        }
        let summary = mismatches.join("; ");
        let previous = self.links.get(to).last_mismatch;
        if !mismatches.is_empty() && previous.as_deref() != Some(summary.as_str()) {
            self.notifier.emit(
                self.stamper.now_ms(),
                "license_mismatch",
                "error",
                summary.clone(),
                serde_json::json!({"neighbour": to, "mismatches": mismatches, "held": held}),
            );
            self.metrics.neighbour_mismatches.inc();
        }
        self.links.update(to, |link| {
            link.last_mismatch = (!mismatches.is_empty()).then_some(summary);
        });
        mismatches
    }

    /// Sends a signed message to a neighbour and opens its signed answer.
    async fn exchange<B: Serialize, A: DeserializeOwned>(
        &self,
        neighbour: &Neighbour,
        path: &str,
        kind: &str,
        answer_kind: &str,
        body: &B,
    ) -> Result<A, String> {
        let envelope = self.seal(&neighbour.id, kind, body);
        let url = format!("{}{path}", neighbour.url);
        let response = self
            .http
            .post(&url)
            .timeout(std::time::Duration::from_millis(EXCHANGE_TIMEOUT_MS))
            .json(&envelope)
            .send()
            .await
            .map_err(|e| format!("cannot reach neighbour {} at {url}: {e}", neighbour.id))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| format!("neighbour {} answer: {e}", neighbour.id))?;
        if !status.is_success() {
            let detail = serde_json::from_slice::<tessera_api::ErrorBody>(&bytes)
                .map(|b| format!("{}: {}", b.error.code, b.error.message))
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(format!("neighbour {} refused: {detail}", neighbour.id));
        }
        let answer: Envelope = serde_json::from_slice(&bytes)
            .map_err(|e| format!("neighbour {} sent a malformed answer: {e}", neighbour.id))?;
        let (_, body) = self
            .open::<A>(&answer, answer_kind)
            .map_err(|e| format!("answer of neighbour {} refused: {e}", neighbour.id))?;
        Ok(body)
    }

    fn link_result<T>(&self, id: &str, result: &Result<T, String>) {
        let now_ms = self.stamper.now_ms();
        match result {
            Ok(_) => self.links.update(id, |link| {
                link.last_contact_ms = Some(now_ms);
                link.last_error = None;
            }),
            Err(error) => {
                let first = self.links.get(id).last_error.as_deref() != Some(error.as_str());
                self.links.update(id, |link| {
                    link.last_error = Some(error.clone());
                    link.last_failure_ms = Some(now_ms);
                });
                self.metrics.neighbour_errors.inc();
                if first {
                    self.notifier.emit(
                        now_ms,
                        "neighbour_link_failed",
                        "warning",
                        error.clone(),
                        serde_json::json!({"neighbour": id}),
                    );
                }
            }
        }
    }

    /// Donor side: sends the current grants to a receiver and compares its records.
    /// Returns the mismatches found.
    pub async fn push_grants(&self, neighbour: &Neighbour) -> Result<Vec<String>, String> {
        let now_ms = self.stamper.now_ms();
        self.links
            .update(&neighbour.id, |link| link.last_push_ms = Some(now_ms));
        let push = GrantsPush {
            grants: self.grants_for(&neighbour.id),
        };
        let result: Result<HeldAnswer, String> = self
            .exchange(neighbour, "/v1/neighbours/grants", "grants", "held", &push)
            .await;
        self.link_result(&neighbour.id, &result);
        let answer = result?;
        Ok(self.compare_records(&neighbour.id, &answer.held, false))
    }

    /// Receiver side: asks a donor to renew its grants (with a usage report when due).
    pub async fn request_renewal(&self, neighbour: &Neighbour) -> Result<(), String> {
        let now_ms = self.stamper.now_ms();
        let link = self.links.get(&neighbour.id);
        let report_period_ms = link.donor_settings.map_or(
            self.config.licenses.usage_report_period.as_millis() as i64,
            |s| s.usage_report_period_ms,
        );
        let usage = match link.last_report_ms {
            Some(last) if now_ms - last < report_period_ms => None,
            _ => Some(self.usage_report(&neighbour.id, link.donor_settings).await),
        };
        self.links
            .update(&neighbour.id, |link| link.last_renew_ms = Some(now_ms));
        let request = RenewRequest {
            held: self.held_from(&neighbour.id),
            usage: usage.clone(),
        };
        let result: Result<RenewAnswer, String> = self
            .exchange(
                neighbour,
                "/v1/neighbours/renew",
                "renew",
                "renewed",
                &request,
            )
            .await;
        self.link_result(&neighbour.id, &result);
        let answer = result?;
        self.links.update(&neighbour.id, |link| {
            link.donor_settings = Some(answer.settings);
            if usage.is_some() {
                link.last_report_ms = Some(now_ms);
            }
        });
        let refusals = self.accept_grants(neighbour, answer.grants).await;
        if refusals.is_empty() {
            Ok(())
        } else {
            Err(refusals.join("; "))
        }
    }

    /// Active stations per component over the counting period (the donor's setting), and
    /// licenses in use now, counted over the grants received from `donor`... and every
    /// other pool: the report is about this server's use of the components.
    async fn usage_report(&self, _donor: &str, settings: Option<DonorSettings>) -> UsageReport {
        let now_ms = self.stamper.now_ms();
        let period_ms = settings.map_or(
            self.config.licenses.active_station_period.as_millis() as i64,
            |s| s.active_station_period_ms,
        );
        let mut stations: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut in_use: BTreeMap<String, u32> = BTreeMap::new();
        for lease in self.consensus.read(|ledger| ledger.leases()) {
            for component in &lease.components {
                stations
                    .entry(component.clone())
                    .or_default()
                    .insert(lease.station.clone());
                *in_use.entry(component.clone()).or_default() += 1;
            }
        }
        // A flush and one query, once per report period.
        let events = self
            .history
            .usage(now_ms.saturating_sub(period_ms), now_ms.saturating_add(1))
            .unwrap_or_default();
        for event in events {
            if let (Some(component), Some(station)) = (event.component, event.station)
                && matches!(event.kind.as_str(), "granted" | "existing")
            {
                stations.entry(component).or_default().insert(station);
            }
        }
        UsageReport {
            at_ms: now_ms,
            period_ms,
            active_stations: stations
                .into_iter()
                .map(|(c, s)| (c, s.len() as u32))
                .collect(),
            in_use,
        }
    }

    /// Everything due on the links at the current clock; the primary's timer calls it (tests
    /// call it after advancing their clock). Returns the errors met, one per failed link.
    pub async fn neighbour_tick(&self) -> Vec<String> {
        if self.config.neighbours.is_empty() || !self.consensus.is_primary() {
            return Vec::new();
        }
        let now_ms = self.stamper.now_ms();
        let sync_ms = self.config.licenses.sync_period.as_millis() as i64;
        let mut errors = Vec::new();
        for neighbour in &self.config.neighbours {
            let link = self.links.get(&neighbour.id);
            let retry_ok = link
                .last_failure_ms
                .is_none_or(|failed| now_ms - failed >= RETRY_MS);
            if neighbour.send
                && retry_ok
                && link
                    .last_push_ms
                    .is_none_or(|last| now_ms - last >= sync_ms)
                && let Err(error) = self.push_grants(neighbour).await
            {
                errors.push(error);
            }
            if neighbour.receive
                && retry_ok
                && self.renewal_due(neighbour, &link, now_ms)
                && let Err(error) = self.request_renewal(neighbour).await
            {
                errors.push(error);
            }
        }
        errors
    }

    /// Whether a receiver should ask this donor for a renewal now.
    fn renewal_due(&self, neighbour: &Neighbour, link: &LinkState, now_ms: i64) -> bool {
        let Some(last) = link.last_renew_ms else {
            return true;
        };
        let since = now_ms - last;
        let report_due = link.donor_settings.is_some_and(|s| {
            link.last_report_ms
                .is_none_or(|r| now_ms - r >= s.usage_report_period_ms)
        });
        let grants: Vec<(i64, i64)> = self.consensus.read(|ledger| {
            ledger
                .received()
                .into_iter()
                .filter(|(_, r)| r.donor == neighbour.id)
                .map(|(_, r)| {
                    let last = r.grant.last();
                    (last.issued_at.as_millisecond(), r.usable_until_ms)
                })
                .collect()
        });
        match neighbour.connection {
            Connection::Permanent => {
                let sync_ms = self.config.licenses.sync_period.as_millis() as i64;
                since >= sync_ms
                    || report_due
                    || grants
                        .iter()
                        .any(|(issued, until)| until - now_ms < (until - issued) / 2)
            }
            Connection::Periodic { reconnect_period } => {
                let preliminary_ms = self
                    .config
                    .licenses
                    .preliminary_renewal_interval
                    .as_millis() as i64;
                since >= reconnect_period.as_millis() as i64
                    || grants
                        .iter()
                        .any(|(_, until)| until - now_ms < preliminary_ms)
            }
        }
    }

    /// After an administrator changed a donation: send the grants now (best effort; the
    /// schedule retries).
    pub async fn push_after_change(&self, to: &str) -> Option<String> {
        let neighbour = self.neighbour(to)?.clone();
        self.push_grants(&neighbour).await.err()
    }

    /// `GET /v1/neighbours`.
    pub fn neighbours_summary(&self) -> tessera_api::Neighbours {
        let (donations, keys, reports) = self.consensus.read(|ledger| {
            (
                ledger.donations(),
                ledger.keys(ledger.last_at_ms()),
                ledger.usage_reports().clone(),
            )
        });
        let now_ms = self.stamper.now_ms();
        let neighbours = self
            .config
            .neighbours
            .iter()
            .map(|n| {
                let link = self.links.get(&n.id);
                tessera_api::NeighbourSummary {
                    id: n.id.clone(),
                    url: n.url.clone(),
                    relation: n.relation.name().into(),
                    send: n.send,
                    receive: n.receive,
                    connection: n.connection.name().into(),
                    last_contact: link.last_contact_ms.map(timestamp),
                    last_error: link.last_error.clone(),
                    donations: donations
                        .iter()
                        .filter(|d| d.to == n.id)
                        .map(|d| donation_summary(d, now_ms))
                        .collect(),
                    received: keys
                        .iter()
                        .filter_map(|view| {
                            let r = view.received.as_ref()?;
                            (r.donor == n.id).then(|| tessera_api::ReceivedSummary {
                                key_id: view.id.clone(),
                                from: r.donor.clone(),
                                licenses: r.licenses,
                                in_use: view.in_use,
                                donated_out: view.donated,
                                serial: r.serial,
                                usable_until: timestamp(r.usable_until_ms),
                            })
                        })
                        .collect(),
                    usage: reports.get(&n.id).map(|r| tessera_api::UsageReportSummary {
                        at: timestamp(r.at_ms),
                        period_s: r.period_ms / 1000,
                        active_stations: r.active_stations.clone(),
                        in_use: r.in_use.clone(),
                    }),
                }
            })
            .collect();
        tessera_api::Neighbours {
            server_id: self.config.server_id.clone(),
            neighbours,
        }
    }
}

/// `until` of a donation: RFC 3339, or a plain date meaning the end of that day (UTC).
pub fn parse_until(text: &str) -> Result<i64, ApiError> {
    if let Ok(at) = text.parse::<jiff::Timestamp>() {
        return Ok(at.as_millisecond());
    }
    if let Ok(date) = text.parse::<jiff::civil::Date>() {
        let next = date
            .tomorrow()
            .and_then(|d| d.to_zoned(jiff::tz::TimeZone::UTC))
            .map_err(|e| ApiError::BadRequest {
                code: "invalid_request",
                message: format!("until = {text:?}: {e}"),
            })?;
        return Ok(next.timestamp().as_millisecond() - 1);
    }
    Err(ApiError::BadRequest {
        code: "invalid_request",
        message: format!(
            "until = {text:?} is neither an RFC 3339 time (2027-03-31T18:00:00Z) nor a date (2027-03-31)"
        ),
    })
}

impl AppState {
    /// An administrator donates licenses of a key to a neighbour (or changes the donation);
    /// the grants go out at once.
    pub async fn donate(
        &self,
        request: tessera_api::DonateRequest,
    ) -> Result<tessera_api::DonationSummary, ApiError> {
        let until_ms = parse_until(&request.until)?;
        let public_key = self.donation_target(&request.to)?;
        let command = Command::Donate {
            key_id: request.key_id.clone(),
            to: request.to.clone(),
            receiver_public_key: public_key.to_base64(),
            licenses: request.licenses,
            until_ms,
            renewal_period_ms: self.config.licenses.donation_renewal_period.as_millis() as i64,
        };
        let donation = match self.propose_issuing(command).await? {
            Outcome::Donated { donation } => donation,
            other => return Err(crate::state::unexpected(other)),
        };
        let now_ms = self.stamper.now_ms();
        self.history.admin_action(
            now_ms,
            "admin",
            "donate",
            serde_json::json!({"key_id": request.key_id, "to": request.to, "licenses": request.licenses, "until_ms": until_ms, "serial": donation.serial}),
        );
        self.notifier.emit(
            now_ms,
            "licenses_donated",
            "info",
            format!(
                "{} licenses of key {} donated to {} until {}",
                request.licenses,
                request.key_id,
                request.to,
                timestamp(until_ms)
            ),
            serde_json::json!({"key_id": request.key_id, "to": request.to, "licenses": request.licenses}),
        );
        if let Some(error) = self.push_after_change(&request.to).await {
            tracing::warn!(%error, "donation recorded; the neighbour gets it at the next attempt");
        }
        Ok(donation_summary(&donation, now_ms))
    }

    /// Ends a donation: no more renewals; the neighbour is told at once.
    pub async fn end_donation(
        &self,
        key_id: String,
        to: String,
    ) -> Result<tessera_api::DonationSummary, ApiError> {
        let command = Command::EndDonation {
            key_id: key_id.clone(),
            to: to.clone(),
        };
        let at_ms = self.stamper.stamp_lenient();
        let donation = match self.propose_at(at_ms, command).await? {
            Outcome::DonationEnded { donation } => donation,
            other => return Err(crate::state::unexpected(other)),
        };
        self.history.admin_action(
            at_ms,
            "admin",
            "end_donation",
            serde_json::json!({"key_id": key_id, "to": to}),
        );
        let _ = self.push_after_change(&to).await;
        Ok(donation_summary(&donation, at_ms))
    }

    /// The configured public key of a neighbour this server may donate to.
    pub fn donation_target(&self, to: &str) -> Result<PublicKey, ApiError> {
        let Some(neighbour) = self.neighbour(to) else {
            return Err(refused(
                "unknown_neighbour",
                format!("no neighbour {to:?} is configured: add a [[neighbour]] entry for it"),
            ));
        };
        if !neighbour.send {
            return Err(refused(
                "neighbour_not_allowed",
                format!(
                    "this server does not donate to {to:?} (relation {}): donate to children, or to peers with send = true",
                    neighbour.relation.name()
                ),
            ));
        }
        Ok(neighbour.public_key)
    }
}

pub fn donation_summary(d: &tessera_core::Donation, now_ms: i64) -> tessera_api::DonationSummary {
    let state = if d.ended || d.donation_until_ms <= now_ms {
        "ended"
    } else if d.outstanding.is_empty() {
        "lapsed"
    } else {
        "active"
    };
    tessera_api::DonationSummary {
        key_id: d.key_id.clone(),
        to: d.to.clone(),
        licenses: d.licenses,
        donated_now: d.counted(),
        serial: d.serial,
        lease_until: timestamp(d.lease_until_ms),
        donation_until: timestamp(d.donation_until_ms),
        renewed_at: timestamp(d.renewed_at_ms),
        state: state.into(),
    }
}
