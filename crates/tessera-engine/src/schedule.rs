//! The primary's schedules: when to propose `Expire` (a lease due, or the time beacon), when
//! the automatic online sync is due, and which sync-deadline warning is due.
//!
//! Each is a function of the time, the applied ledger and what the schedule remembers; the
//! server's timer calls them and does what they say.

use tessera_core::Ledger;

/// The primary proposes `Expire` at least this often, so the log carries a recent time (the
/// clock's high-water mark that a restarted or new primary starts from).
pub const TIME_BEACON_MS: i64 = 60_000;

/// Days before the certificate's end at which `sync_deadline_near` is raised (and once it has
/// passed).
pub const DEADLINE_NOTICE_DAYS: [i64; 3] = [30, 7, 1];

const DAY_MS: i64 = 86_400_000;

/// Whether the primary proposes `Expire` now: a lease is due, or the log has carried no time
/// for [`TIME_BEACON_MS`].
pub fn expire_due(now_ms: i64, ledger: &Ledger) -> bool {
    ledger.next_expiry_ms().is_some_and(|at| at <= now_ms)
        || now_ms.saturating_sub(ledger.last_at_ms()) >= TIME_BEACON_MS
}

/// Whether the automatic online sync is due: a schedule (`period_ms`), not blocked by the
/// authority (then only an administrator's sync tries again), and no sync for a period.
pub fn sync_due(now_ms: i64, ledger: &Ledger, period_ms: Option<i64>) -> bool {
    let Some(period_ms) = period_ms else {
        return false;
    };
    let sync = ledger.sync_state();
    sync.blocked.is_none()
        && sync
            .last_sync_at_ms
            .is_none_or(|last_ms| now_ms - last_ms >= period_ms)
}

/// A failed scheduled update (online sync and key renewal) is tried again after this long,
/// not on every tick.
pub const UPDATE_RETRY_MS: i64 = 15 * 60 * 1000;

/// The scheduled key update ("check for updates" on a daily or weekly schedule): due when
/// [`sync_due`] says so and the last attempt is [`UPDATE_RETRY_MS`] old. Only the primary
/// runs it (backups would each call the authority); a new primary starts afresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpdateSchedule {
    next_attempt_ms: i64,
}

impl Default for UpdateSchedule {
    fn default() -> UpdateSchedule {
        UpdateSchedule {
            next_attempt_ms: i64::MIN,
        }
    }
}

impl UpdateSchedule {
    /// Whether to run the update now; `true` also counts as the attempt.
    pub fn on_tick(&mut self, now_ms: i64, ledger: &Ledger, period_ms: Option<i64>) -> bool {
        if now_ms < self.next_attempt_ms || !sync_due(now_ms, ledger, period_ms) {
            return false;
        }
        self.next_attempt_ms = now_ms.saturating_add(UPDATE_RETRY_MS);
        true
    }
}

/// A `sync_deadline_near` warning that is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeadlineNotice {
    pub deadline_ms: i64,
    /// Whole days left (negative: the certificate has expired).
    pub days_left: i64,
    /// The threshold of [`DEADLINE_NOTICE_DAYS`] crossed.
    pub threshold_days: i64,
}

/// Which deadline warnings were raised: each threshold once per certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeadlineNotices {
    deadline_ms: Option<i64>,
    /// The lowest threshold raised for that deadline.
    raised: i64,
}

impl Default for DeadlineNotices {
    fn default() -> DeadlineNotices {
        DeadlineNotices {
            deadline_ms: None,
            raised: i64::MAX,
        }
    }
}

impl DeadlineNotices {
    /// The warning due now, if any. A threshold counts only when it is under half the
    /// certificate's term (a 30-day certificate does not warn the day it is issued), except
    /// once the certificate has expired. A new certificate starts afresh.
    pub fn on_tick(&mut self, now_ms: i64, ledger: &Ledger) -> Option<DeadlineNotice> {
        let (deadline_ms, term_ms) = ledger.sync_state().certificate.as_ref().map(|c| {
            (
                c.valid_until_ms(),
                c.valid_until_ms() - c.payload.issued_at.as_millisecond(),
            )
        })?;
        let days_left = (deadline_ms - now_ms).div_euclid(DAY_MS);
        if self.deadline_ms != Some(deadline_ms) {
            *self = DeadlineNotices {
                deadline_ms: Some(deadline_ms),
                raised: i64::MAX,
            };
        }
        let threshold_days = DEADLINE_NOTICE_DAYS
            .iter()
            .copied()
            .filter(|days| days_left < 0 || days * 2 * DAY_MS < term_ms)
            .filter(|days| days_left <= *days && *days < self.raised)
            .min()?;
        self.raised = threshold_days;
        Some(DeadlineNotice {
            deadline_ms,
            days_left,
            threshold_days,
        })
    }
}

#[cfg(test)]
mod tests {
    use tessera_core::{Command, LedgerConfig, Stamped};

    use super::*;

    #[test]
    fn expire_is_due_for_a_due_lease_or_the_time_beacon() {
        let mut ledger = Ledger::new(LedgerConfig::default());
        ledger.apply(&Stamped {
            at_ms: 1_000,
            command: Command::Expire,
        });
        assert!(!expire_due(1_000 + TIME_BEACON_MS - 1, &ledger));
        assert!(expire_due(1_000 + TIME_BEACON_MS, &ledger));
    }

    #[test]
    fn the_sync_schedule_waits_a_period_and_is_off_without_one() {
        let ledger = Ledger::new(LedgerConfig::default());
        // Never synced: due at once with a schedule.
        assert!(sync_due(0, &ledger, Some(DAY_MS)));
        assert!(!sync_due(0, &ledger, None));
    }

    #[test]
    fn without_a_certificate_no_deadline_warning() {
        let ledger = Ledger::new(LedgerConfig::default());
        assert_eq!(DeadlineNotices::default().on_tick(0, &ledger), None);
    }

    #[test]
    fn the_scheduled_update_is_tried_again_only_after_its_retry_time() {
        let ledger = Ledger::new(LedgerConfig::default());
        let day = 86_400_000;
        let mut schedule = UpdateSchedule::default();
        assert!(
            !schedule.on_tick(0, &ledger, None),
            "no schedule configured"
        );
        assert!(schedule.on_tick(0, &ledger, Some(day)), "never synced: due");
        assert!(!schedule.on_tick(UPDATE_RETRY_MS - 1, &ledger, Some(day)));
        assert!(schedule.on_tick(UPDATE_RETRY_MS, &ledger, Some(day)));
    }
}
