//! The side effects of an applied entry, in one place: the usage history, the metrics and
//! the notifications that follow from what the ledger did, each stamped with the entry's
//! time. [`AppState::propose_at`] calls [`AppState::record_effects`] once for every entry
//! this host proposed and had applied (by the group, or by its alone ledger), so no request
//! handler records them itself.
//!
//! Two effects stay with their callers, because they need what the entry alone does not
//! say: a refused checkout's denial (a refusal answered by a redirect to a neighbour is not
//! a denial, and the denial records the request's user and host as the station sent them),
//! and the leases a key's removal ends (read before the removal, which deletes them).

use tessera_core::Outcome;
use tessera_core::ledger::Applied;

use crate::events::{EventKind, Severity};
use crate::state::{AppState, Cause};

impl AppState {
    /// Records what `applied` did, at the time `at_ms` of the entry `cause` was taken from.
    pub(crate) fn record_effects(&self, at_ms: i64, cause: &Cause, applied: &Applied) {
        if !applied.expired.is_empty() {
            self.metrics
                .expired_leases
                .inc_by(applied.expired.len() as u64);
            for lease in &applied.expired {
                let covered = self.read(|ledger| ledger.key_components(&lease.key_id));
                self.history
                    .lease_event(at_ms, "server", "expired", lease, None, &covered);
            }
        }
        match (cause, &applied.outcome) {
            (Cause::Checkout { component }, Outcome::LeaseGranted { lease, created }) => {
                let covered = self.read(|ledger| ledger.key_components(&lease.key_id));
                self.history.lease_event(
                    if *created { lease.issued_at_ms } else { at_ms },
                    &lease.station,
                    if *created { "granted" } else { "existing" },
                    lease,
                    Some(component),
                    &covered,
                );
            }
            (Cause::Heartbeat, Outcome::LeaseRenewed { .. }) => {
                self.metrics.heartbeats.inc();
            }
            (Cause::Checkin | Cause::ForceRelease, Outcome::LeaseReleased { lease }) => {
                self.metrics.checkins.inc();
                let (actor, kind) = match cause {
                    Cause::ForceRelease => ("admin", "force_release"),
                    _ => (lease.station.as_str(), "checkin"),
                };
                let covered = self.read(|ledger| ledger.key_components(&lease.key_id));
                self.history
                    .lease_event(at_ms, actor, kind, lease, None, &covered);
            }
            (Cause::ImportKey, Outcome::KeyImported { key_id }) => {
                self.history
                    .key_event(at_ms, "admin", "key_imported", key_id, String::new());
                self.notifier.emit(
                    at_ms,
                    EventKind::KeyImported,
                    Severity::Info,
                    format!("license key {key_id} added"),
                    serde_json::json!({"key_id": key_id}),
                );
            }
            _ => {}
        }
    }
}
