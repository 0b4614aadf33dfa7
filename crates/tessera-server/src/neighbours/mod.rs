//! Links to neighbour servers: donating licenses as grants, renewing them while the link
//! lives, calling them back, comparing records, and usage reports from receivers to donors.
//!
//! Every message between servers is an [`Envelope`] signed with the sender's identity key
//! and checked against the `public_key` configured for that neighbour, with both clocks
//! compared (more than `clock_skew_max` apart is refused). Two exchanges:
//!
//! - **push** (`POST /v1/neighbours/grants`, donor → receiver): the donor's current grants
//!   for the receiver, and with `returned_request` the request to give back every grant of
//!   that donor not among them (donations ended). The receiver accepts the grants
//!   (`AcceptGrant`), releases the others (`ReleaseGrant`), and answers with what it held
//!   before and holds now, and what it no longer uses. Sent after every donation change and
//!   every `sync_period`; the donor takes back what was returned (`GrantReturned`) and
//!   compares the answer with its records (a mismatch is an event naming both counts).
//! - **renew** (`POST /v1/neighbours/renew`, receiver → donor): the receiver asks for its
//!   grants to be renewed, sending what it holds, what it no longer uses and, when due, its
//!   usage report; the donor commits `RenewDonations` *before* it signs and returns the
//!   renewed grants.
//!
//! When a receiver stops asking (switched off, cut off), its grants run out after at most one
//! renewal period and the donor's ledger takes the licenses back by itself.

pub mod links;
pub mod served;
pub use links::{LinkState, Links};
pub mod config;
pub mod redirect;

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tessera_core::{Command, Grant, PublicKey, Refusal, UsageReport, answer};
use tessera_engine::link::{self, LinkTiming};

pub use tessera_api::{
    DonorSettings, HeldGrant as Held, NeighbourEnvelope as Envelope, ReturnedGrant as Returned,
};

use crate::error::ApiError;
use crate::events::{EventKind, Severity};
use crate::state::{AppState, timestamp};
use config::{Connection, Neighbour, Relation};

const SIGNING_CONTEXT: &[u8] = b"tessera-neighbour/v1\n";
/// After a failed attempt, a link is tried again no sooner than this.
pub const RETRY_MS: i64 = 10_000;
/// Timeout of one exchange with a neighbour.
const EXCHANGE_TIMEOUT_MS: u64 = 10_000;
/// Refusals of incoming messages are notified at most this often (unless they change), so a
/// misconfigured or hostile sender cannot flood the notification channels.
const REFUSAL_NOTICE_MS: i64 = 60_000;
/// Most (component, station) pairs a usage report reads from the history.
const REPORT_PAIRS_MAX: usize = 1_000_000;
/// Request bodies of the link routes may be this large (many grants, each with its key).
pub const LINK_BODY_LIMIT_BYTES: usize = 4 * 1024 * 1024;

/// The header with which a sending server vouches for its message's size before the body
/// is read: `FROM LENGTH SIGNATURE`, the signature (its identity key) over
/// `body_voucher_bytes`. A body larger than the server's ordinary limit
/// (`body_limit_bytes`) is read only with a valid one, so that only configured neighbours
/// can make this server read up to [`LINK_BODY_LIMIT_BYTES`].
pub const BODY_VOUCHER_HEADER: &str = "x-tessera-neighbour-body";

fn body_voucher_bytes(from: &str, to: &str, path: &str, length: u64) -> Vec<u8> {
    let mut bytes = SIGNING_CONTEXT.to_vec();
    bytes.extend_from_slice(format!("body\n{from}\n{to}\n{path}\n{length}").as_bytes());
    bytes
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

/// Push body (`kind = "grants"`): the donor's current grants for the receiver.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GrantsPush {
    pub grants: Vec<Grant>,
    /// Give back every grant from this donor that is not in `grants` (its donation ended),
    /// and say so in `returned`.
    #[serde(default)]
    pub returned_request: bool,
}

/// Push answer (`kind = "held"`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HeldAnswer {
    /// What the receiver holds from the donor after the push.
    pub held: Vec<Held>,
    /// What it held before the push: what the donor compares with its records.
    #[serde(default)]
    pub held_before: Vec<Held>,
    /// Grants it no longer uses.
    #[serde(default)]
    pub returned: Vec<Returned>,
    /// Grants of the push it refused, in words.
    #[serde(default)]
    pub refused: Vec<String>,
}

/// Renew body (`kind = "renew"`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenewRequest {
    pub held: Vec<Held>,
    pub usage: Option<UsageReport>,
    #[serde(default)]
    pub returned: Vec<Returned>,
}

/// Renew answer (`kind = "renewed"`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenewAnswer {
    /// A signed grant for every running donation to the receiver.
    pub grants: Vec<Grant>,
    pub settings: DonorSettings,
    /// As in [`GrantsPush`]: give back the grants of ended donations.
    #[serde(default)]
    pub returned_request: bool,
}

fn refused(code: &'static str, message: String) -> ApiError {
    ApiError::Neighbour { code, message }
}

use tessera_engine::link::vendor_key_id;

fn held_grants(held: Vec<link::Held>) -> Vec<Held> {
    held.into_iter()
        .map(|h| Held {
            key_id: h.key_id,
            serial: h.serial,
            licenses: h.licenses,
            in_use: h.in_use,
        })
        .collect()
}

fn engine_held(held: &[Held]) -> Vec<link::Held> {
    held.iter()
        .map(|h| link::Held {
            key_id: h.key_id.clone(),
            serial: h.serial,
            licenses: h.licenses,
            in_use: h.in_use,
        })
        .collect()
}

fn engine_returned(returned: &[Returned]) -> Vec<link::Returned> {
    returned
        .iter()
        .map(|r| link::Returned {
            key_id: r.key_id.clone(),
            serial: r.serial,
        })
        .collect()
}

/// Why an exchange with a neighbour failed. Its text is the link's `last_error` and the
/// `neighbour_link_failed` event's message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("cannot reach neighbour {neighbour} at {url}: {detail}")]
    Unreachable {
        neighbour: String,
        url: String,
        detail: String,
    },
    #[error("neighbour {neighbour} answer: {detail}")]
    AnswerLost { neighbour: String, detail: String },
    /// The neighbour answered with an error status.
    #[error("neighbour {neighbour} refused: {detail}")]
    Refused {
        neighbour: String,
        status: u16,
        detail: String,
    },
    #[error("neighbour {neighbour} sent a malformed answer: {detail}")]
    Malformed { neighbour: String, detail: String },
    /// Its answer's envelope was refused here (signature, time, kind).
    #[error("answer of neighbour {neighbour} refused ({code}): {detail}")]
    AnswerRefused {
        neighbour: String,
        code: String,
        detail: String,
    },
    /// A receiver refused grants this server pushed.
    #[error("neighbour {neighbour} refused grants: {}", refusals.join("; "))]
    GrantsRefused {
        neighbour: String,
        refusals: Vec<String>,
    },
    /// This server refused grants a donor sent with its renewal.
    #[error("grants of {neighbour} refused: {}", refusals.join("; "))]
    GrantsNotAccepted {
        neighbour: String,
        refusals: Vec<String>,
    },
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

    fn skew_ms(&self) -> i64 {
        self.config.clock_skew_max.as_millis() as i64
    }

    /// The link timers of this server's configuration.
    fn link_timing(&self) -> LinkTiming {
        let licenses = &self.config.licenses;
        LinkTiming {
            sync_period_ms: licenses.sync_period.as_millis() as i64,
            preliminary_renewal_ms: licenses.preliminary_renewal_interval.as_millis() as i64,
            retry_ms: RETRY_MS,
            skew_ms: self.skew_ms(),
        }
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

    /// The [`BODY_VOUCHER_HEADER`] for a message of `length` bytes to `to` at `path`.
    pub fn body_voucher(&self, to: &str, path: &str, length: u64) -> String {
        let from = self.config.server_id.clone().unwrap_or_default();
        let signature = self
            .identity
            .sign_base64(&body_voucher_bytes(&from, to, path, length));
        format!("{from} {length} {signature}")
    }

    /// Whether `voucher` (a [`BODY_VOUCHER_HEADER`]) comes from a configured neighbour for a
    /// body of `length` bytes at `path` of this server.
    pub fn body_vouched(&self, path: &str, length: u64, voucher: &str) -> bool {
        let mut parts = voucher.split(' ');
        let (Some(from), Some(claimed), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        let (Ok(own), Some(neighbour)) = (self.own_id(), self.neighbour(from)) else {
            return false;
        };
        claimed == length.to_string()
            && matches!(
                neighbour
                    .public_key
                    .verify_base64(&body_voucher_bytes(from, own, path, length), signature),
                Ok(true)
            )
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
                    "the message is for server {:?}, but this is server {own:?}: check the url of this neighbour",
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
        let max_ms = self.skew_ms();
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

    /// [`AppState::open`] for a request from another server, and the direction check: a
    /// refusal is answered and also counted and notified here (rate-limited).
    fn open_request<T: DeserializeOwned>(
        &self,
        envelope: &Envelope,
        kind: &str,
    ) -> Result<(Neighbour, T), ApiError> {
        let opened = self.open::<T>(envelope, kind).and_then(|(neighbour, body)| {
            let allowed = match kind {
                "grants" => neighbour.receive,
                _ => neighbour.send,
            };
            if allowed {
                return Ok((neighbour, body));
            }
            let peer = neighbour.relation == Relation::Peer;
            Err(refused(
                "neighbour_not_allowed",
                match kind {
                    "grants" => format!(
                        "this server does not accept licenses from {:?} (relation {}{}): a child receives from its parents, a peer only with receive = true",
                        neighbour.id,
                        neighbour.relation.name(),
                        if peer { ", receive = false" } else { "" }
                    ),
                    _ => format!(
                        "this server does not donate to {:?} (relation {}{}): a parent donates to its children, a peer only with send = true",
                        neighbour.id,
                        neighbour.relation.name(),
                        if peer { ", send = false" } else { "" }
                    ),
                },
            ))
        });
        if let Err(error) = &opened {
            self.metrics.neighbour_refused.inc();
            let (_, code) = error.status_and_code();
            let message = format!(
                "refused a {kind:?} message from server {:?}: {code}: {error}",
                envelope.from
            );
            let now_ms = self.stamper.now_ms();
            let notify = {
                let mut last = self
                    .links
                    .last_refusal
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let due = last.as_ref().is_none_or(|(at, previous)| {
                    *previous != message || now_ms.saturating_sub(*at) >= REFUSAL_NOTICE_MS
                });
                if due {
                    *last = Some((now_ms, message.clone()));
                }
                due
            };
            if notify {
                self.notifier.emit(
                    now_ms,
                    EventKind::NeighbourRefused,
                    Severity::Warning,
                    message,
                    serde_json::json!({"from": envelope.from, "kind": kind, "code": code}),
                );
            }
        }
        opened
    }

    /// What this server holds from a donor: its received grants still usable.
    fn held_from(&self, donor: &str) -> Vec<Held> {
        let now_ms = self.stamper.now_ms();
        held_grants(
            self.consensus
                .read(|ledger| link::held_from(ledger, donor, now_ms)),
        )
    }

    /// Receiver side: the grants of `donor` this server no longer uses
    /// ([`LinkMemory::returned_to`]).
    fn returned_to(&self, donor: &str) -> Vec<Returned> {
        let now_ms = self.stamper.now_ms();
        let memory = self.links.get(donor).memory;
        self.consensus
            .read(|ledger| memory.returned_to(ledger, donor, now_ms))
            .into_iter()
            .map(|r| Returned {
                key_id: r.key_id,
                serial: r.serial,
            })
            .collect()
    }

    /// Donor side: the signed grants of every running donation to `to`, and whether the
    /// receiver should give back grants of ended ones.
    fn grants_for(&self, to: &str) -> (Vec<Grant>, bool) {
        let now_ms = self.stamper.now_ms();
        self.consensus
            .read(|ledger| link::grants_for(ledger, to, now_ms, &self.identity))
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
                let message = format!(
                    "grant of key {} is signed by {:?}, not by neighbour {:?}",
                    last.key_id, last.donor, neighbour.id
                );
                self.notifier.emit(
                    self.stamper.now_ms(),
                    EventKind::GrantRefused,
                    Severity::Error,
                    message.clone(),
                    serde_json::json!({"neighbour": neighbour.id, "key_id": last.key_id, "serial": last.serial, "code": "grant_wrong_donor"}),
                );
                refusals.push(message);
                continue;
            }
            // A first grant from a key that renews another: the donor's key was renewed and
            // its donation carried to the renewal (the manual: every server that receives a
            // new key notifies).
            let renews = grant.key.payload.renews.clone().filter(|_| {
                !self
                    .held_from(&neighbour.id)
                    .iter()
                    .any(|h| h.key_id == last.key_id)
            });
            let command = Command::AcceptGrant {
                grant: Box::new(grant),
            };
            // Verified before it is proposed (the ledger verifies again on apply): a grant
            // whose signatures do not verify never enters the log, so one found there at
            // start was edited on disk. Refused the same way either way.
            let proposed = match self.read(|ledger| ledger.verify_command(&command)) {
                Ok(()) => self.propose_issuing(command).await,
                Err(refusal) => Err(ApiError::Refused(refusal)),
            };
            match answer::expect(proposed) {
                Ok(answer::GrantAccepted {
                    key_id,
                    licenses,
                    serial,
                    leases_ended,
                    unknown_to_donor,
                    ..
                }) => {
                    if let Some(held) = unknown_to_donor {
                        let message = format!(
                            "this server held grant serial {held} of key {} from {}, which the donor's chain of grants does not contain (its grant {serial} follows serial {}): that grant was signed with the donor's key outside its ledger, or the donor's ledger was put back to a copy",
                            last.key_id,
                            neighbour.id,
                            last.prev_serial.unwrap_or_default()
                        );
                        tracing::error!(%message, "grant_forged");
                        self.notifier.emit(
                            self.stamper.now_ms(),
                            EventKind::GrantForged,
                            Severity::Critical,
                            message,
                            serde_json::json!({"neighbour": neighbour.id, "key_id": last.key_id, "serial": held, "donor_serial": serial, "donor_prev_serial": last.prev_serial}),
                        );
                    }
                    if let Some(old) = renews {
                        self.notifier.emit(
                            self.stamper.now_ms(),
                            EventKind::KeyUpdated,
                            Severity::Info,
                            format!(
                                "license key {old} renewed: neighbour {} now grants {licenses} licenses from the renewal key {} (pool {key_id})",
                                neighbour.id, last.key_id
                            ),
                            serde_json::json!({"key_id": old, "renewal_key_id": last.key_id, "neighbour": neighbour.id, "pool": key_id, "licenses": licenses}),
                        );
                    }
                    if leases_ended > 0 {
                        self.notifier.emit(
                            self.stamper.now_ms(),
                            EventKind::GrantReduced,
                            Severity::Warning,
                            format!(
                                "neighbour {} reduced the grant {key_id} to {licenses} licenses: {leases_ended} leases ended",
                                neighbour.id
                            ),
                            serde_json::json!({"neighbour": neighbour.id, "key_id": key_id, "licenses": licenses, "serial": serial, "leases_ended": leases_ended}),
                        );
                    }
                }
                Err(error) => {
                    let message = format!(
                        "grant of key {} from {} refused ({}): {error}",
                        last.key_id,
                        neighbour.id,
                        error.status_and_code().1
                    );
                    // An older grant of the donor's while a newer one is held here: a push
                    // that crossed a renewal (or a harmless replay). Answered, not notified.
                    let stale = matches!(
                        &error,
                        ApiError::Refused(Refusal::GrantRejected {
                            error: tessera_core::GrantError::Replayed { .. }
                        })
                    ) && self
                        .held_from(&neighbour.id)
                        .iter()
                        .any(|h| h.key_id == last.key_id && h.serial > last.serial);
                    if stale {
                        refusals.push(message);
                        continue;
                    }
                    self.notifier.emit(
                        self.stamper.now_ms(),
                        EventKind::GrantRefused,
                        Severity::Error,
                        message.clone(),
                        serde_json::json!({"neighbour": neighbour.id, "key_id": last.key_id, "serial": last.serial, "code": error.status_and_code().1}),
                    );
                    refusals.push(message);
                }
            }
        }
        refusals
    }

    /// Receiver side: gives back every grant from `donor` whose vendor key is not in
    /// `keep` (the donor ended those donations). A grant this server donated further is
    /// called back from its own receivers first. The returned grants are remembered until the
    /// donor has heard of them.
    async fn release_absent(&self, donor: &Neighbour, keep: &BTreeSet<String>) {
        let release = self
            .consensus
            .read(|ledger| link::to_release(ledger, &donor.id, keep));
        for (pool, onward) in release {
            for to in onward {
                let ended = self
                    .propose_at(
                        self.stamper.stamp_lenient(),
                        Command::EndDonation {
                            key_id: pool.clone(),
                            to: to.clone(),
                        },
                    )
                    .await;
                if ended.is_ok()
                    && let Some(error) = self.push_after_change(&to).await
                {
                    tracing::warn!(%error, pool, to, "calling back a donation further");
                }
            }
            let at_ms = self.stamper.stamp_lenient();
            let command = Command::ReleaseGrant {
                key_id: pool.clone(),
            };
            match answer::expect(self.propose_at(at_ms, command).await) {
                Ok(answer::GrantReleased {
                    serial,
                    leases_ended,
                    stations_until_ms,
                    ..
                }) => {
                    let key_id = vendor_key_id(&pool).to_string();
                    self.links.update(&donor.id, |link| {
                        link.memory.on_released(&key_id, serial, stations_until_ms);
                    });
                    self.history.key_event(
                        at_ms,
                        &donor.id,
                        "grant_released",
                        &pool,
                        format!("{leases_ended} leases ended"),
                    );
                    self.notifier.emit(
                        at_ms,
                        EventKind::GrantReleased,
                        Severity::Warning,
                        format!(
                            "neighbour {} called back the licenses of {pool}: {leases_ended} leases ended",
                            donor.id
                        ),
                        serde_json::json!({"neighbour": donor.id, "key_id": pool, "serial": serial, "leases_ended": leases_ended}),
                    );
                }
                // Still donated further (a receiver out of reach): it lapses by itself.
                Err(error) => tracing::warn!(%error, pool, "cannot give the grant back yet"),
            }
        }
    }

    /// `POST /v1/neighbours/grants` on the receiver.
    pub async fn receive_push(&self, envelope: Envelope) -> Result<Envelope, ApiError> {
        let (neighbour, push): (Neighbour, GrantsPush) = self.open_request(&envelope, "grants")?;
        let held_before = self.held_from(&neighbour.id);
        let keep = link::kept(&push.grants);
        let refused = self.accept_grants(&neighbour, push.grants).await;
        if push.returned_request {
            self.release_absent(&neighbour, &keep).await;
        }
        self.links.update(&neighbour.id, |link| {
            link.last_contact_ms = Some(self.stamper.now_ms());
        });
        let answer = HeldAnswer {
            held: self.held_from(&neighbour.id),
            held_before,
            returned: self.returned_to(&neighbour.id),
            refused,
        };
        Ok(self.seal(&neighbour.id, "held", &answer))
    }

    /// `POST /v1/neighbours/renew` on the donor.
    pub async fn receive_renew(&self, envelope: Envelope) -> Result<Envelope, ApiError> {
        let (neighbour, request): (Neighbour, RenewRequest) =
            self.open_request(&envelope, "renew")?;
        // What it holds is without what it gave back: take that back first, then compare.
        self.take_back(&neighbour.id, &request.returned).await?;
        self.compare_records(&neighbour.id, &request.held);
        self.acknowledge(&neighbour.id, &request.held);
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
        self.links.update(&neighbour.id, |link| {
            link.last_contact_ms = Some(self.stamper.now_ms());
        });
        let settings = &self.config.licenses;
        // Read after the renewal committed: only committed extensions are signed.
        let (grants, returned_request) = self.grants_for(&neighbour.id);
        let answer = RenewAnswer {
            grants,
            settings: DonorSettings {
                donation_renewal_period_ms: settings.donation_renewal_period.as_millis() as i64,
                usage_report_period_ms: settings.usage_report_period.as_millis() as i64,
                active_station_period_ms: settings.active_station_period.as_millis() as i64,
            },
            returned_request,
        };
        Ok(self.seal(&neighbour.id, "renewed", &answer))
    }

    /// Donor side: the receiver no longer uses these grants; the licenses come back now.
    /// Only serials this server issued and still counts are taken back.
    async fn take_back(&self, to: &str, returned: &[Returned]) -> Result<(), ApiError> {
        let returned = engine_returned(returned);
        let commands = self
            .consensus
            .read(|ledger| link::take_back(ledger, to, &returned));
        for command in commands {
            let Command::GrantReturned { key_id, serial, .. } = &command else {
                continue;
            };
            let (key_id, serial) = (key_id.clone(), *serial);
            let at_ms = self.stamper.stamp_lenient();
            match answer::expect(self.propose_at(at_ms, command).await) {
                Ok(answer::GrantReturned { licenses_back, .. }) if licenses_back > 0 => {
                    self.notifier.emit(
                        at_ms,
                        EventKind::LicensesReturned,
                        Severity::Info,
                        format!("neighbour {to} gave back {licenses_back} licenses of {key_id}"),
                        serde_json::json!({"neighbour": to, "key_id": key_id, "serial": serial, "licenses_back": licenses_back}),
                    );
                }
                Ok(_) | Err(ApiError::Refused(Refusal::DonationNotFound { .. })) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Donor side: remembers which serial the receiver holds of each donation.
    fn acknowledge(&self, to: &str, held: &[Held]) {
        let held = engine_held(held);
        self.links.update(to, |state| {
            self.consensus
                .read(|ledger| state.memory.acknowledge(ledger, to, &held));
        });
    }

    /// Compares what a receiver says it holds with this donor's records. Consistent: it
    /// holds one of the grants this server still counts for the donation (perhaps not yet the
    /// newest), or nothing where it never confirmed a grant, or where the grants it may still
    /// hold are about to end. Any other difference (a count or serial this server never
    /// issued, a grant it does not know, a grant lost) is an event and a notification with
    /// both counts. Returns the mismatches.
    fn compare_records(&self, to: &str, held: &[Held]) -> Vec<String> {
        let now_ms = self.stamper.now_ms();
        let timing = self.link_timing();
        let memory = self.links.get(to).memory;
        let held_now = engine_held(held);
        let mismatches = self
            .consensus
            .read(|ledger| memory.compare_records(ledger, to, &held_now, now_ms, &timing));
        let summary = mismatches.join("; ");
        let previous = self.links.get(to).last_mismatch;
        if !mismatches.is_empty() && previous.as_deref() != Some(summary.as_str()) {
            self.notifier.emit(
                now_ms,
                EventKind::LicenseMismatch,
                Severity::Error,
                summary.clone(),
                serde_json::json!({"neighbour": to, "mismatches": mismatches, "held": held}),
            );
            self.metrics
                .neighbour_mismatches
                .get_or_create(&crate::metrics::NeighbourLabel {
                    neighbour: to.to_string(),
                })
                .inc();
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
    ) -> Result<A, LinkError> {
        let envelope = self.seal(&neighbour.id, kind, body);
        let bytes = serde_json::to_vec(&envelope).expect("an envelope serializes");
        let url = format!("{}{path}", neighbour.url);
        let response = self
            .http
            .post(&url)
            .timeout(std::time::Duration::from_millis(EXCHANGE_TIMEOUT_MS))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                BODY_VOUCHER_HEADER,
                self.body_voucher(&neighbour.id, path, bytes.len() as u64),
            )
            .body(bytes)
            .send()
            .await
            .map_err(|e| LinkError::Unreachable {
                neighbour: neighbour.id.clone(),
                url: url.clone(),
                detail: e.to_string(),
            })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| LinkError::AnswerLost {
            neighbour: neighbour.id.clone(),
            detail: e.to_string(),
        })?;
        if !status.is_success() {
            let detail = serde_json::from_slice::<tessera_api::ErrorBody>(&bytes)
                .map(|b| format!("{}: {}", b.error.code, b.error.message))
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(LinkError::Refused {
                neighbour: neighbour.id.clone(),
                status: status.as_u16(),
                detail,
            });
        }
        let answer: Envelope =
            serde_json::from_slice(&bytes).map_err(|e| LinkError::Malformed {
                neighbour: neighbour.id.clone(),
                detail: e.to_string(),
            })?;
        let (_, body) =
            self.open::<A>(&answer, answer_kind)
                .map_err(|e| LinkError::AnswerRefused {
                    neighbour: neighbour.id.clone(),
                    code: e.status_and_code().1.to_string(),
                    detail: e.to_string(),
                })?;
        Ok(body)
    }

    /// Records the result of an exchange as the link's state; a new error is notified.
    fn link_result<T>(&self, id: &str, result: &Result<T, LinkError>) {
        let now_ms = self.stamper.now_ms();
        match result {
            Ok(_) => {
                let recovered = self.links.get(id).last_error.is_some();
                self.links.update(id, |link| {
                    link.last_contact_ms = Some(now_ms);
                    link.last_error = None;
                });
                if recovered {
                    self.notifier.emit(
                        now_ms,
                        EventKind::NeighbourLinkRestored,
                        Severity::Info,
                        format!("the link to neighbour {id} works again"),
                        serde_json::json!({"neighbour": id}),
                    );
                }
            }
            Err(error) => {
                let error = error.to_string();
                let first = self.links.get(id).last_error.as_deref() != Some(error.as_str());
                self.links.update(id, |link| {
                    link.last_error = Some(error.clone());
                    link.memory.last_failure_ms = Some(now_ms);
                });
                self.metrics
                    .neighbour_errors
                    .get_or_create(&crate::metrics::NeighbourLabel {
                        neighbour: id.to_string(),
                    })
                    .inc();
                if first {
                    self.notifier.emit(
                        now_ms,
                        EventKind::NeighbourLinkFailed,
                        Severity::Warning,
                        error.clone(),
                        serde_json::json!({"neighbour": id}),
                    );
                }
            }
        }
    }

    /// Donor side (license synchronization): sends the current grants to a receiver, takes
    /// back what it returned and compares its records. Returns the mismatches found; grants
    /// the receiver refused are an error.
    pub async fn push_grants(&self, neighbour: &Neighbour) -> Result<Vec<String>, LinkError> {
        let now_ms = self.stamper.now_ms();
        self.links.update(&neighbour.id, |link| {
            link.memory.last_push_ms = Some(now_ms)
        });
        let (grants, returned_request) = self.grants_for(&neighbour.id);
        let pushed: Vec<(String, u64)> = grants
            .iter()
            .map(|g| (g.last().key_id.clone(), g.last().serial))
            .collect();
        let push = GrantsPush {
            grants,
            returned_request,
        };
        let result: Result<HeldAnswer, LinkError> = self
            .exchange(neighbour, "/v1/neighbours/grants", "grants", "held", &push)
            .await;
        let answer = match result {
            Ok(answer) => answer,
            Err(error) => {
                self.link_result::<()>(&neighbour.id, &Err(error.clone()));
                return Err(error);
            }
        };
        // Grants the receiver refused are the link's error (unless it holds a newer one of
        // each: the push crossed a renewal); the rest of the answer counts.
        let all_held = pushed.iter().all(|(key_id, serial)| {
            answer
                .held
                .iter()
                .any(|h| &h.key_id == key_id && h.serial >= *serial)
        });
        let error = (!answer.refused.is_empty() && !all_held).then(|| LinkError::GrantsRefused {
            neighbour: neighbour.id.clone(),
            refusals: answer.refused.clone(),
        });
        match &error {
            Some(error) => self.link_result::<()>(&neighbour.id, &Err(error.clone())),
            None => self.link_result(&neighbour.id, &Ok::<(), LinkError>(())),
        }
        // The records are compared as they stood before the push, then what the receiver
        // gave back is taken back.
        let mismatches = self.compare_records(&neighbour.id, &answer.held_before);
        if let Err(error) = self.take_back(&neighbour.id, &answer.returned).await {
            tracing::warn!(%error, neighbour = neighbour.id, "taking back returned grants");
        }
        self.acknowledge(&neighbour.id, &answer.held);
        match error {
            Some(error) => Err(error),
            None => Ok(mismatches),
        }
    }

    /// Receiver side: asks a donor to renew its grants (with a usage report when due).
    pub async fn request_renewal(&self, neighbour: &Neighbour) -> Result<(), LinkError> {
        let now_ms = self.stamper.now_ms();
        let link = self.links.get(&neighbour.id);
        let default_period_ms = self.config.licenses.usage_report_period.as_millis() as i64;
        let mut usage = link
            .memory
            .usage_due(now_ms, default_period_ms)
            .then(|| self.usage_report(&neighbour.id, link.donor_settings));
        if let Some(report) = usage.as_mut() {
            report.heads = self.reported_heads().await;
        }
        self.links.update(&neighbour.id, |link| {
            link.memory.last_renew_ms = Some(now_ms)
        });
        let returned = self.returned_to(&neighbour.id);
        let request = RenewRequest {
            held: self.held_from(&neighbour.id),
            usage: usage.clone(),
            returned: returned.clone(),
        };
        let result: Result<RenewAnswer, LinkError> = self
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
        let heard = engine_returned(&returned);
        self.links.update(&neighbour.id, |link| {
            link.donor_settings = Some(answer.settings);
            link.memory.report_period_ms = Some(answer.settings.usage_report_period_ms);
            // The donor has heard of these.
            link.memory.on_renewed(now_ms, &heard, usage.is_some());
        });
        let keep = link::kept(&answer.grants);
        let refusals = self.accept_grants(neighbour, answer.grants).await;
        if answer.returned_request {
            self.release_absent(neighbour, &keep).await;
        }
        if refusals.is_empty() {
            Ok(())
        } else {
            let error = LinkError::GrantsNotAccepted {
                neighbour: neighbour.id.clone(),
                refusals,
            };
            self.link_result::<()>(&neighbour.id, &Err(error.clone()));
            Err(error)
        }
    }

    /// The usage report for a donor: distinct stations per component that held a license
    /// from its grants during the counting period (the donor's setting), and the licenses of
    /// its grants in use now.
    /// This host's ledger counters and log head, for a usage report: its donor relays them
    /// to the vendor at its own sync (docs/security.md, T5 for a child that never syncs).
    async fn reported_heads(&self) -> Option<tessera_core::sync::ReportedHeads> {
        let log = match self.consensus.log_chain(None).await {
            Ok(read) => read.head,
            Err(error) => {
                tracing::warn!(%error, "usage report: the log's hash chain is unreadable");
                return None;
            }
        };
        Some(tessera_core::sync::ReportedHeads {
            installation: crate::sync::installation(&self.config.data_dir),
            log: log.map(|(at, hash)| tessera_core::sync::ChainPoint {
                at,
                hash: hex::encode(hash),
            }),
            counters: self.consensus.read(|ledger| ledger.counters()),
        })
    }

    fn usage_report(&self, donor: &str, settings: Option<DonorSettings>) -> UsageReport {
        let now_ms = self.stamper.now_ms();
        let period_ms = settings.map_or(
            self.config.licenses.active_station_period.as_millis() as i64,
            |s| s.active_station_period_ms,
        );
        let suffix = format!("@{donor}");
        let mut stations: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut in_use: BTreeMap<String, u32> = BTreeMap::new();
        // A lease holds every component of its pool (one definition of "in use").
        let leases = self.consensus.read(|ledger| {
            let mut covered: BTreeMap<String, Vec<String>> = BTreeMap::new();
            ledger
                .leases()
                .into_iter()
                .filter(|lease| lease.key_id.ends_with(&suffix))
                .map(|lease| {
                    let components = covered
                        .entry(lease.key_id.clone())
                        .or_insert_with(|| ledger.key_components(&lease.key_id))
                        .clone();
                    (lease, components)
                })
                .collect::<Vec<_>>()
        });
        for (lease, covered) in leases {
            let components = if covered.is_empty() {
                &lease.components
            } else {
                &covered
            };
            for component in components {
                stations
                    .entry(component.clone())
                    .or_default()
                    .insert(lease.station.clone());
                *in_use.entry(component.clone()).or_default() += 1;
            }
        }
        // One indexed query, once per report period and donor.
        match self.history.active_stations(
            now_ms.saturating_sub(period_ms),
            now_ms.saturating_add(1),
            &suffix,
            REPORT_PAIRS_MAX,
        ) {
            Ok(pairs) => {
                for (component, station) in pairs {
                    stations.entry(component).or_default().insert(station);
                }
            }
            Err(error) => tracing::warn!(%error, "usage report: history unreadable"),
        }
        UsageReport {
            at_ms: now_ms,
            period_ms,
            active_stations: stations
                .into_iter()
                .map(|(c, s)| (c, s.len() as u32))
                .collect(),
            in_use,
            heads: None,
        }
    }

    /// Everything due on the links at the current clock; the primary's timer calls it (tests
    /// call it after advancing their clock). The neighbours are served concurrently. Returns
    /// the errors met.
    pub async fn neighbour_tick(&self) -> Vec<String> {
        if self.config.neighbours.is_empty() || !self.consensus.is_primary() {
            return Vec::new();
        }
        let now_ms = self.stamper.now_ms();
        let links = self
            .config
            .neighbours
            .iter()
            .map(|neighbour| self.neighbour_due(neighbour, now_ms));
        futures::future::join_all(links)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// What is due on one link (`tessera_engine::link::LinkMemory::on_tick`), carried out:
    /// as donor the push, as receiver the renewal request.
    async fn neighbour_due(&self, neighbour: &Neighbour, now_ms: i64) -> Vec<String> {
        let memory = self.links.get(&neighbour.id).memory;
        let connection = match neighbour.connection {
            Connection::Permanent => link::Connection::Permanent,
            Connection::Periodic { reconnect_period } => link::Connection::Periodic {
                reconnect_ms: reconnect_period.as_millis() as i64,
            },
        };
        let roles = link::Roles {
            send: neighbour.send,
            receive: neighbour.receive,
        };
        let grants = self
            .consensus
            .read(|ledger| link::grant_points(ledger, &neighbour.id));
        let actions = memory.on_tick(now_ms, &self.link_timing(), connection, roles, grants);
        let mut errors = Vec::new();
        for action in actions {
            let done = match action {
                link::LinkAction::Push => self.push_grants(neighbour).await.map(drop),
                link::LinkAction::RequestRenewal => self.request_renewal(neighbour).await,
            };
            if let Err(error) = done {
                errors.push(error.to_string());
            }
        }
        errors
    }

    /// After an administrator changed a donation: send the grants now (best effort; the
    /// schedule retries).
    pub async fn push_after_change(&self, to: &str) -> Option<String> {
        let neighbour = self.neighbour(to)?.clone();
        self.push_grants(&neighbour)
            .await
            .err()
            .map(|error| error.to_string())
    }

    /// `GET /v1/neighbours`.
    pub fn neighbours_summary(&self) -> tessera_api::Neighbours {
        let now_ms = self.stamper.now_ms();
        let (donations, keys, reports) = self.consensus.read(|ledger| {
            (
                ledger.donations(),
                ledger.keys(ledger.last_at_ms().max(now_ms)),
                ledger.usage_reports().clone(),
            )
        });
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
                    last_mismatch: link.last_mismatch.clone(),
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
        let public_key = self.donation_target(&request.to)?;
        let until_ms = parse_until(&request.until)?;
        // The receiver keeps one pool per vendor key and donor: two sources of one vendor
        // key for the same neighbour would overwrite each other there.
        let clash = self.consensus.read(|ledger| {
            ledger.donations().into_iter().find(|d| {
                d.to == request.to
                    && d.key_id != request.key_id
                    && vendor_key_id(&d.key_id) == vendor_key_id(&request.key_id)
                    && !d.outstanding.is_empty()
            })
        });
        if let Some(other) = clash {
            return Err(ApiError::Refused(Refusal::DonationRefused {
                key_id: request.key_id.clone(),
                reason: format!(
                    "{} already gets licenses of vendor key {} from {}: change that donation instead",
                    request.to,
                    vendor_key_id(&request.key_id),
                    other.key_id
                ),
            }));
        }
        let command = Command::Donate {
            key_id: request.key_id.clone(),
            to: request.to.clone(),
            receiver_public_key: public_key.to_base64(),
            licenses: request.licenses,
            until_ms,
            renewal_period_ms: self.config.licenses.donation_renewal_period.as_millis() as i64,
        };
        let answer::Donated { donation } = self.propose_issuing(command).await?.try_into()?;
        let now_ms = self.stamper.now_ms();
        self.history.admin_action(
            now_ms,
            "admin",
            "donate",
            serde_json::json!({"key_id": request.key_id, "to": request.to, "licenses": request.licenses, "until_ms": until_ms, "serial": donation.serial}),
        );
        self.notifier.emit(
            now_ms,
            EventKind::LicensesDonated,
            Severity::Info,
            format!(
                "{} licenses of key {} donated to {} until {}",
                request.licenses,
                request.key_id,
                request.to,
                timestamp(until_ms)
            ),
            serde_json::json!({"key_id": request.key_id, "to": request.to, "licenses": request.licenses, "serial": donation.serial}),
        );
        if let Some(error) = self.push_after_change(&request.to).await {
            tracing::warn!(%error, "donation recorded; the neighbour gets it at the next attempt");
        }
        Ok(self.donation_now(donation))
    }

    /// Ends a donation: no more renewals, and the neighbour is asked to give the licenses
    /// back at once; if it cannot be reached they come back when its grant runs out.
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
        let answer::DonationEnded { donation } =
            self.propose_at(at_ms, command).await?.try_into()?;
        self.history.admin_action(
            at_ms,
            "admin",
            "end_donation",
            serde_json::json!({"key_id": key_id, "to": to}),
        );
        self.notifier.emit(
            at_ms,
            EventKind::DonationEnded,
            Severity::Info,
            format!("the donation of {key_id} to {to} ended: the licenses are called back"),
            serde_json::json!({"key_id": key_id, "to": to, "serial": donation.serial}),
        );
        if let Some(error) = self.push_after_change(&to).await {
            tracing::warn!(%error, "donation ended; its grant runs out by itself");
        }
        Ok(self.donation_now(donation))
    }

    /// The donation as the ledger holds it now (after the push); gone means fully back.
    fn donation_now(&self, mut donation: tessera_core::Donation) -> tessera_api::DonationSummary {
        let now_ms = self.stamper.now_ms();
        match self
            .consensus
            .read(|ledger| ledger.donation(&donation.key_id, &donation.to).cloned())
        {
            Some(current) => donation = current,
            None => donation.outstanding.clear(),
        }
        donation_summary(&donation, now_ms)
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
