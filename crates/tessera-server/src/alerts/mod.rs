//! Events an administrator must hear of that no single request announces: a key expiring
//! (30, 7 and 1 days before) and expired, a component out of licenses, a spike of denials, a
//! domain host lost and back, a new primary. Each goes through the notification channels
//! ([`crate::events::Notifier`]) once per occurrence, not on every tick. The primary raises
//! them (its timer), as it raises the others.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::events::{EventKind, Severity};

pub mod said;
use crate::state::{AppState, timestamp};

/// Days before a key's end at which `key_expiring` goes out.
pub const KEY_NOTICE_DAYS: [i64; 3] = [30, 7, 1];
/// `component_exhausted` at most this often per component while checkouts are refused.
pub const EXHAUSTED_NOTICE_MS: i64 = 10 * 60_000;
/// A spike: this many denials (any component) within [`DENIAL_SPIKE_WINDOW_MS`]…
pub const DENIAL_SPIKE_COUNT: usize = 20;
pub const DENIAL_SPIKE_WINDOW_MS: i64 = 60_000;
/// …said at most this often.
pub const DENIAL_SPIKE_NOTICE_MS: i64 = 10 * 60_000;
/// A host of the domain unhealthy this long (real time, as Raft's own timers) is reported
/// lost; a shorter gap (an election, a restart) is not.
pub const HOST_LOST_AFTER: Duration = Duration::from_secs(3);

impl AppState {
    /// The primary's periodic look: key ends, domain hosts, a new primary.
    pub(crate) fn check_alerts(&self, now_ms: i64) {
        self.check_primary();
        self.check_keys(now_ms);
        self.check_hosts(now_ms);
    }

    /// A non-primary host's tick: the next time it leads is a change of primary.
    pub(crate) fn not_primary(&self) {
        self.alerts.was_primary.store(false, Ordering::Relaxed);
        self.alerts
            .hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn check_primary(&self) {
        if self.alerts.was_primary.swap(true, Ordering::Relaxed) {
            return;
        }
        let hosts = self.consensus.voter_ids();
        if hosts.len() < 2 {
            return;
        }
        let me = self.consensus.node_id();
        self.notifier.emit(
            self.stamper.now_ms(),
            EventKind::PrimaryChanged,
            Severity::Warning,
            format!("host {me} is now the primary of the domain (hosts {hosts:?})"),
            serde_json::json!({"primary": me, "hosts": hosts}),
        );
    }

    fn check_keys(&self, now_ms: i64) {
        let keys: Vec<(String, i64, bool)> = self.consensus.read(|ledger| {
            ledger
                .keys(now_ms)
                .into_iter()
                // A received grant ends with the donor's renewals, which the donor watches.
                .filter(|view| view.received.is_none())
                .map(|view| {
                    let end = view.key.payload.valid_until.as_millisecond();
                    (view.id.clone(), end, view.meta.replaced_by.is_some())
                })
                .collect()
        });
        let mut said = self.alerts.keys.lock().unwrap_or_else(|e| e.into_inner());
        said.retain(|id, _| keys.iter().any(|(key, _, _)| key == id));
        for (key_id, end_ms, replaced) in keys {
            let entry = said.entry(key_id.clone()).or_insert((end_ms, i64::MAX));
            if entry.0 != end_ms {
                *entry = (end_ms, i64::MAX);
            }
            // A key whose renewal took its place ends as planned: nothing to do.
            if replaced {
                continue;
            }
            let left_ms = end_ms - now_ms;
            let days_left = left_ms.div_euclid(86_400_000);
            if left_ms <= 0 {
                if entry.1 > 0 {
                    entry.1 = 0;
                    self.notifier.emit(
                        now_ms,
                        EventKind::KeyExpired,
                        Severity::Error,
                        format!(
                            "license key {key_id} ended at {}: its licenses are no longer issued",
                            timestamp(end_ms)
                        ),
                        serde_json::json!({"key_id": key_id, "valid_until_ms": end_ms}),
                    );
                }
                continue;
            }
            let Some(threshold) = KEY_NOTICE_DAYS
                .iter()
                .copied()
                .filter(|days| days_left <= *days && *days < entry.1)
                .min()
            else {
                continue;
            };
            entry.1 = threshold;
            self.notifier.emit(
                now_ms,
                EventKind::KeyExpiring,
                Severity::Warning,
                format!(
                    "license key {key_id} ends at {} (within {threshold} days): renew it with the vendor",
                    timestamp(end_ms)
                ),
                serde_json::json!({"key_id": key_id, "valid_until_ms": end_ms, "threshold_days": threshold}),
            );
        }
    }

    fn check_hosts(&self, now_ms: i64) {
        let view = self.consensus.domain_view();
        if view.len() < 2 {
            return;
        }
        let now = Instant::now();
        let mut hosts = self.alerts.hosts.lock().unwrap_or_else(|e| e.into_inner());
        hosts.retain(|host, _| view.iter().any(|h| h.host == *host));
        for host in &view {
            let state = hosts.entry(host.host).or_insert((None, false));
            if host.healthy {
                if state.1 {
                    self.notifier.emit(
                        now_ms,
                        EventKind::DomainHostBack,
                        Severity::Info,
                        format!("host {} of the domain answers again", host.host),
                        serde_json::json!({"host": host.host, "address": host.address}),
                    );
                }
                *state = (None, false);
                continue;
            }
            let since = *state.0.get_or_insert(now);
            if !state.1 && now.duration_since(since) >= HOST_LOST_AFTER {
                state.1 = true;
                self.notifier.emit(
                    now_ms,
                    EventKind::DomainHostLost,
                    Severity::Error,
                    format!(
                        "host {} of the domain ({}) has not answered for {} s: the domain serves while a majority of its hosts does",
                        host.host,
                        host.address.as_deref().unwrap_or("address unknown"),
                        HOST_LOST_AFTER.as_secs()
                    ),
                    serde_json::json!({"host": host.host, "address": host.address}),
                );
            }
        }
    }

    /// A refused checkout: `component_exhausted` when it was for want of a license, and
    /// `denial_spike` when many come at once.
    pub(crate) fn note_denial(&self, component: &str, code: &str, now_ms: i64) {
        if code == "no_licenses_available" {
            let mut exhausted = self
                .alerts
                .exhausted
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let last = exhausted.get(component).copied();
            if last.is_none_or(|last| now_ms - last >= EXHAUSTED_NOTICE_MS) {
                exhausted.insert(component.to_string(), now_ms);
                drop(exhausted);
                self.notifier.emit(
                    now_ms,
                    EventKind::ComponentExhausted,
                    Severity::Warning,
                    format!(
                        "every license of component {component} is in use: a checkout was refused"
                    ),
                    serde_json::json!({"component": component}),
                );
            }
        }
        let mut denials = self
            .alerts
            .denials
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (recent, last_spike) = &mut *denials;
        recent.push_back(now_ms);
        while recent
            .front()
            .is_some_and(|at| now_ms - at > DENIAL_SPIKE_WINDOW_MS)
        {
            recent.pop_front();
        }
        if recent.len() >= DENIAL_SPIKE_COUNT
            && last_spike.is_none_or(|last| now_ms - last >= DENIAL_SPIKE_NOTICE_MS)
        {
            *last_spike = Some(now_ms);
            let count = recent.len();
            drop(denials);
            self.notifier.emit(
                now_ms,
                EventKind::DenialSpike,
                Severity::Warning,
                format!(
                    "{count} checkouts refused within {} s",
                    DENIAL_SPIKE_WINDOW_MS / 1000
                ),
                serde_json::json!({"denials": count, "window_s": DENIAL_SPIKE_WINDOW_MS / 1000, "last_code": code, "last_component": component}),
            );
        }
    }
}
