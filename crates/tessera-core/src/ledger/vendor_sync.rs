//! The vendor sync as the ledger sees it: a sync begun (sequence and nonce), completed
//! (keys, revocations, renewal keys, the certificate) or blocked, and the trust list recorded.

use super::*;

impl Ledger {
    pub(super) fn begin_sync(&mut self, nonce: &str, at: i64) -> Outcome {
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
    pub(super) fn record_trust(&mut self, fingerprints: &[String], at: i64) -> Outcome {
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

    pub(super) fn block_sync(&mut self, code: &str, message: &str, at: i64) -> Outcome {
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
    pub(super) fn complete_sync(&mut self, response: &SyncResponse, at: i64) -> Outcome {
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
}
