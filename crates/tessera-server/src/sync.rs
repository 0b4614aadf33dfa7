//! Synchronizing with the vendor authority: online, or by file for air-gapped sites.
//!
//! Both ways are the same two replicated steps: `BeginSync` fixes the request's sequence and
//! nonce in the log, the request is signed with the server's identity key; the vendor's
//! response is applied by `CompleteSync`, which the ledger refuses unless it answers exactly
//! that request. A response file can therefore be imported once, and only the newest one.
//!
//! Every request carries the sync chain (the hash of the last accepted response, the first
//! unanswered sequence, this installation). An authority that refuses it as a clone or a
//! rollback (409 `server_cloned` / `server_rolled_back`) blocks the automatic schedule
//! (`Command::BlockSync`, event `sync_blocked`) until a sync succeeds after the vendor's
//! reset.

use std::time::Duration;

use tessera_api::{KeyUpdateReport, RenewalReport, SyncBlocked, SyncStatus, SyncSummary};
use tessera_core::sync::{
    ChainPoint, HistoryHeads, PointCheck, SERVER_CLONED, SERVER_ROLLED_BACK, SyncRequest,
    SyncRequestPayload, SyncResponse, TrustReport,
};
use tessera_core::{Command, Ledger, Refusal, RenewalResult, answer};

use crate::error::ApiError;
use crate::events::{EventKind, Severity};
use crate::state::{AppState, timestamp};

/// An online sync that takes longer than this is abandoned; the next attempt starts anew.
const AUTHORITY_TIMEOUT: Duration = Duration::from_secs(30);
/// What the neighbours this server donates to stated of their own ledgers in their last
/// usage reports, for the vendor.
fn relayed_heads(ledger: &tessera_core::Ledger) -> Vec<tessera_core::sync::RelayedHeads> {
    ledger
        .usage_reports()
        .iter()
        .filter_map(|(server_id, report)| {
            Some(tessera_core::sync::RelayedHeads {
                server_id: server_id.clone(),
                reported_at: timestamp(report.at_ms),
                heads: report.heads.clone()?,
            })
        })
        .collect()
}

impl AppState {
    /// Starts a sync: replicates the new sequence and nonce, returns the signed request.
    pub async fn export_sync_request(&self) -> Result<SyncRequest, ApiError> {
        let nonce = self.ids.next_id();
        let at_ms = self.stamper.stamp_lenient();
        let answer::SyncBegun {
            sequence,
            nonce,
            last_response,
            pending_since,
        } = self
            .propose_at(at_ms, Command::BeginSync { nonce })
            .await?
            .try_into()?;
        let server_id = self.config.server_id.clone().unwrap_or_default();
        let (keys, links, trust_changes, counters, relayed) = self.consensus.read(|ledger| {
            (
                ledger
                    .keys(at_ms)
                    .into_iter()
                    .filter(|view| {
                        view.key.payload.server_id.as_deref() == Some(server_id.as_str())
                    })
                    .map(|view| view.key.payload.key_id)
                    .collect(),
                ledger.sync_state().links.clone(),
                ledger.sync_state().trust_changes.clone(),
                ledger.counters(),
                relayed_heads(ledger),
            )
        });
        let trust = TrustReport {
            trusted: self.trusted_fingerprints(),
            changes: trust_changes,
        };
        let installation = installation(&self.config.data_dir);
        let history = self.history_heads(&installation).await?;
        let payload = SyncRequestPayload {
            server_id,
            public_key: self.identity.public_key().to_base64(),
            sequence,
            nonce,
            created_at: timestamp(at_ms),
            keys,
            last_response,
            pending_since,
            installation: Some(installation),
            history: Some(history),
            links,
            trust: Some(trust),
            counters: Some(counters),
            relayed,
        };
        Ok(SyncRequest::sign(payload, &self.identity))
    }

    /// This host's history heads for a sync request: the heads of its Raft log and audit
    /// chains, and both chains recomputed at the points the vendor countersigned at this
    /// host's last sync (docs/security.md, T2 and T12).
    async fn history_heads(&self, installation: &str) -> Result<HistoryHeads, ApiError> {
        let countersigned = self
            .consensus
            .read(|ledger| ledger.sync_state().countersigned.get(installation).cloned());
        let signed_log = countersigned
            .as_ref()
            .and_then(|c| c.log.as_ref())
            .map(|p| p.at);
        let signed_audit = countersigned
            .as_ref()
            .and_then(|c| c.audit.as_ref())
            .map(|p| p.at);
        let log =
            self.consensus.log_chain(signed_log).await.map_err(|e| {
                ApiError::Internal(format!("reading the Raft log's hash chain: {e}"))
            })?;
        let (audit, audit_at) = self
            .history
            .audit_points(signed_audit.map(|at| i64::try_from(at).unwrap_or(i64::MAX)))
            .map_err(|e| ApiError::Internal(format!("reading the audit chain: {e}")))?;
        Ok(HistoryHeads {
            installation: installation.to_string(),
            log: log.head.map(|(at, hash)| ChainPoint {
                at,
                hash: hex::encode(hash),
            }),
            audit: audit.map(|(records, hash)| ChainPoint {
                at: u64::try_from(records).unwrap_or(0),
                hash,
            }),
            log_at_countersigned: signed_log.map(|at| PointCheck {
                at,
                hash: log.at.map(hex::encode),
            }),
            audit_at_countersigned: signed_audit.map(|at| PointCheck { at, hash: audit_at }),
        })
    }

    /// Applies the vendor's response; refused unless it answers the awaited request.
    pub async fn import_sync_response(
        &self,
        response: SyncResponse,
    ) -> Result<SyncSummary, ApiError> {
        let at_ms = self.stamper.stamp_lenient();
        let command = Command::CompleteSync {
            response: Box::new(response),
        };
        // Verified before it is proposed (the ledger verifies it all again on apply): a
        // response that does not verify never enters the log.
        self.consensus
            .read(|ledger| ledger.verify_command(&command))
            .map_err(ApiError::Refused)?;
        let synced = self
            .propose_at(at_ms, command)
            .await
            .and_then(|outcome| Ok(answer::Synced::try_from(outcome)?));
        match synced {
            Ok(answer::Synced {
                sequence,
                imported,
                revoked,
                renewals,
                certificate_valid_until_ms,
            }) => {
                // The vendor's signed time is the clock's floor from now on (T8).
                self.stamper
                    .observe_vendor(self.consensus.read(|ledger| ledger.vendor_time_ms()));
                self.notifier.emit(
                    at_ms,
                    EventKind::SyncCompleted,
                    Severity::Info,
                    format!(
                        "synchronized with the vendor (sequence {sequence}): {} keys added, {} revoked, {} renewal keys held; certificate valid until {}",
                        imported.len(),
                        revoked.len(),
                        renewals.len(),
                        timestamp(certificate_valid_until_ms)
                    ),
                    serde_json::json!({"sequence": sequence, "imported": imported, "revoked": revoked, "renewals": renewals}),
                );
                Ok(SyncSummary {
                    sequence,
                    imported,
                    revoked,
                    renewals,
                    certificate_valid_until: timestamp(certificate_valid_until_ms),
                })
            }
            Err(error) => {
                self.notify_sync_failed(&error);
                Err(error)
            }
        }
    }

    /// Online sync: request, send it to the authority, apply the answer.
    pub async fn sync_online(&self) -> Result<SyncSummary, ApiError> {
        let Some(authority) = self.config.authority.clone() else {
            return Err(ApiError::Conflict {
                code: "no_authority",
                message: "no authority URL configured: start the server with --authority URL, or sync by file (tessera sync export / import)".into(),
            });
        };
        // One online sync at a time: each begins a request, and only the newest is
        // answerable, so a second one started meanwhile would void the first.
        let _one_at_a_time = self.online_sync.lock().await;
        let request = self.export_sync_request().await?;
        let url = format!("{}/v1/sync", authority.trim_end_matches('/'));
        let unreachable = |message: String| ApiError::AuthorityUnreachable {
            url: url.clone(),
            message,
        };
        let response = self
            .external_http
            .post(&url)
            .timeout(AUTHORITY_TIMEOUT)
            .json(&request)
            .send()
            .await
            .map_err(|e| {
                let error = unreachable(e.to_string());
                self.notify_sync_failed(&error);
                error
            })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        if !status.is_success() {
            let (code, message) = match serde_json::from_str::<tessera_api::ErrorBody>(&text) {
                Ok(body) => (body.error.code, body.error.message),
                Err(_) => (format!("http_{}", status.as_u16()), text),
            };
            if status == reqwest::StatusCode::CONFLICT
                && let Some(code) = chain_refusal_code(&code)
            {
                return Err(self.block_sync(code, message).await);
            }
            let error = ApiError::Authority { code, message };
            self.notify_sync_failed(&error);
            return Err(error);
        }
        let response =
            SyncResponse::from_json(&text).map_err(|error| Refusal::SyncRejected { error })?;
        self.import_sync_response(response).await
    }

    /// The authority refused the sync chain: replicate the block (automatic syncs stop on
    /// every host), raise `sync_blocked`, and answer 409 with the authority's code.
    async fn block_sync(&self, code: &'static str, message: String) -> ApiError {
        let at_ms = self.stamper.stamp_lenient();
        let command = Command::BlockSync {
            code: code.to_string(),
            message: message.clone(),
        };
        if let Err(error) = self.propose_at(at_ms, command).await {
            tracing::warn!(%error, "cannot record the blocked sync");
        }
        self.notifier.emit(
            at_ms,
            EventKind::SyncBlocked,
            Severity::Error,
            format!(
                "the vendor authority refused to synchronize ({code}): {message}; automatic syncs are stopped until the vendor resets this server's sync chain"
            ),
            serde_json::json!({"code": code}),
        );
        ApiError::Conflict { code, message }
    }

    fn notify_sync_failed(&self, error: &ApiError) {
        self.notifier.emit(
            self.stamper.now_ms(),
            EventKind::SyncFailed,
            Severity::Warning,
            format!("synchronization with the vendor failed: {error}"),
            serde_json::json!({"code": error.status_and_code().1}),
        );
    }

    /// "Check for updates and replace license keys": an online sync if an authority is
    /// configured (a failure is reported but held renewal keys are still applied), then the
    /// automatic renewal. Each key renewed or not renewed is a notification.
    pub async fn update_keys(&self) -> Result<KeyUpdateReport, ApiError> {
        let (sync, sync_error) = if self.config.authority.is_some() {
            match self.sync_online().await {
                Ok(summary) => (Some(summary), None),
                // The code first, as in every error body: `server_rolled_back: …`.
                Err(error) => (
                    None,
                    Some(format!("{}: {error}", error.status_and_code().1)),
                ),
            }
        } else {
            (None, None)
        };
        let at_ms = self.stamper.stamp_lenient();
        let answer::KeysRenewed {
            renewed,
            leases_moved,
            leases_ended,
        } = self
            .propose_at(at_ms, Command::RenewKeys)
            .await?
            .try_into()?;
        let mut renewals = Vec::new();
        for (key_id, result) in renewed {
            let report = match result {
                RenewalResult::Allocated { renewal_key_id } => {
                    // Neighbours the renewal could not serve yet: named, and retried.
                    let pending: Vec<tessera_core::PendingDonation> = self.read(|ledger| {
                        ledger
                            .keys(at_ms)
                            .into_iter()
                            .find(|view| view.id == renewal_key_id)
                            .map(|view| view.meta.pending_donations)
                            .unwrap_or_default()
                    });
                    if pending.is_empty() {
                        self.notifier.emit(
                            at_ms,
                            EventKind::KeyUpdated,
                            Severity::Info,
                            format!("license key {key_id} automatically updated: renewal key {renewal_key_id} added and allocated to every object of the old key"),
                            serde_json::json!({"key_id": key_id, "renewal_key_id": renewal_key_id}),
                        );
                    } else {
                        let missing: Vec<String> = pending
                            .iter()
                            .map(|p| {
                                format!(
                                    "{} licenses for neighbour {} ({})",
                                    p.licenses, p.to, p.reason
                                )
                            })
                            .collect();
                        self.notifier.emit(
                            at_ms,
                            EventKind::KeyUpdated,
                            Severity::Warning,
                            format!(
                                "license key {key_id} automatically updated: renewal key {renewal_key_id} added and allocated to every object of the old key except {}; the free licenses are checked again about every minute",
                                missing.join(", ")
                            ),
                            serde_json::json!({"key_id": key_id, "renewal_key_id": renewal_key_id, "not_allocated": pending}),
                        );
                    }
                    RenewalReport {
                        key_id,
                        renewal_key_id,
                        allocated: true,
                        reason: None,
                    }
                }
                RenewalResult::NotAllocated {
                    renewal_key_id,
                    reason,
                } => {
                    self.notifier.emit(
                        at_ms,
                        EventKind::KeyNotUpdated,
                        Severity::Warning,
                        format!("license key {key_id} cannot be automatically updated: {reason}; allocate {renewal_key_id} by hand"),
                        serde_json::json!({"key_id": key_id, "renewal_key_id": renewal_key_id, "reason": reason}),
                    );
                    RenewalReport {
                        key_id,
                        renewal_key_id,
                        allocated: false,
                        reason: Some(reason),
                    }
                }
            };
            renewals.push(report);
        }
        Ok(KeyUpdateReport {
            sync,
            sync_error,
            renewals,
            leases_moved,
            leases_ended,
        })
    }

    pub async fn allocate_key(
        &self,
        key_id: String,
        stations: bool,
        groups: Option<Vec<String>>,
        neighbours: Option<Vec<String>>,
    ) -> Result<(), ApiError> {
        let at_ms = self.stamper.stamp_lenient();
        if let Some(neighbours) = neighbours {
            let command = Command::AllocateKeyToNeighbours {
                key_id: key_id.clone(),
                neighbours,
            };
            answer::KeyAllocatedToNeighbours::try_from(self.propose_at(at_ms, command).await?)?;
        }
        if let Some(groups) = groups {
            let command = Command::AllocateKeyToGroups {
                key_id: key_id.clone(),
                groups,
            };
            answer::KeyAllocatedToGroups::try_from(self.propose_at(at_ms, command).await?)?;
        }
        answer::KeyAllocated::try_from(
            self.propose_at(at_ms, Command::AllocateKey { key_id, stations })
                .await?,
        )?;
        Ok(())
    }

    pub async fn set_station_group(
        &self,
        group: String,
        stations: Vec<String>,
    ) -> Result<u32, ApiError> {
        let at_ms = self.stamper.stamp_lenient();
        let answer::StationGroupSet { stations, .. } = self
            .propose_at(at_ms, Command::SetStationGroup { group, stations })
            .await?
            .try_into()?;
        Ok(stations)
    }

    pub fn station_groups(&self) -> Vec<tessera_api::StationGroup> {
        self.consensus.read(|ledger| {
            ledger
                .station_groups()
                .iter()
                .map(|(name, stations)| tessera_api::StationGroup {
                    name: name.clone(),
                    stations: stations.iter().cloned().collect(),
                })
                .collect()
        })
    }

    /// One round of the scheduled update task: when the schedule (daily / weekly) calls for
    /// it, sync online and renew keys, as "check for updates" does. Only the primary runs it
    /// (in a domain, backups would each call the authority). `None`: nothing was due.
    pub async fn run_scheduled_update(&self) -> Option<Result<KeyUpdateReport, ApiError>> {
        let now_ms = self.stamper.now_ms();
        if self.config.authority.is_none() || !self.consensus.is_primary() {
            return None;
        }
        let period_ms = self.config.sync_schedule().period_ms();
        let due = {
            let mut schedule = self
                .update_schedule
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.consensus
                .read(|ledger| schedule.on_tick(now_ms, ledger, period_ms))
        };
        if !due {
            return None;
        }
        Some(self.update_keys().await)
    }

    /// Whether the automatic schedule calls for an online sync now.
    pub fn sync_due(&self, now_ms: i64) -> bool {
        if self.config.authority.is_none() || !self.consensus.is_primary() {
            return false;
        }
        let period_ms = self.config.sync_schedule().period_ms();
        self.consensus
            .read(|ledger| tessera_engine::schedule::sync_due(now_ms, ledger, period_ms))
    }

    pub fn sync_status(&self) -> SyncStatus {
        let now_ms = self.stamper.now_ms();
        self.consensus
            .read(|ledger| self.sync_status_of(ledger, now_ms))
    }

    pub(crate) fn sync_status_of(&self, ledger: &Ledger, now_ms: i64) -> SyncStatus {
        let sync = ledger.sync_state();
        let deadline_ms = sync.deadline_ms();
        SyncStatus {
            server_id: self.config.server_id.clone(),
            synchronized: sync.is_synchronized(now_ms),
            last_sync_at: sync.last_sync_at_ms.map(timestamp),
            deadline: deadline_ms.map(timestamp),
            days_left: deadline_ms.map(|deadline| (deadline - now_ms).div_euclid(86_400_000)),
            completed_sequence: sync.completed_sequence,
            awaiting_sequence: sync.awaited.as_ref().map(|(sequence, _)| *sequence),
            renewals: sync
                .renewals
                .values()
                .map(|key| key.payload.key_id.clone())
                .collect(),
            schedule: self.config.sync_schedule().name().to_string(),
            authority: self.config.authority.clone(),
            blocked: sync.blocked.as_ref().map(|block| SyncBlocked {
                code: block.code.clone(),
                message: block.message.clone(),
                at: timestamp(block.at_ms),
            }),
        }
    }
}

/// The authority's code, if it is a sync chain refusal.
fn chain_refusal_code(code: &str) -> Option<&'static str> {
    [SERVER_CLONED, SERVER_ROLLED_BACK]
        .into_iter()
        .find(|known| *known == code)
}

/// This installation, as the sync chain names it: a hash of the host name and the data
/// directory's full path. A copy of the data directory elsewhere (another path or machine)
/// names another installation, a backup restored in place the same one; the authority uses
/// it only to tell a clone from a rollback. Hashed: the vendor learns neither.
pub fn installation(data_dir: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let path = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let digest = Sha256::digest(
        format!(
            "tessera-installation\n{}\n{}",
            host.trim(),
            path.to_string_lossy()
        )
        .as_bytes(),
    );
    hex::encode(&digest[..8])
}
