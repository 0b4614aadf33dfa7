//! Clocks (system and manual) and the stamper that turns clock readings into the monotonic
//! `at_ms` the primary writes on each command.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

pub use tessera_core::Clock;

/// The wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        jiff::Timestamp::now().as_millisecond()
    }
}

/// A clock that moves only when told to: tests advance it instead of sleeping.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn new(now_ms: i64) -> ManualClock {
        ManualClock(Arc::new(AtomicI64::new(now_ms)))
    }

    pub fn advance_ms(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn set_ms(&self, now_ms: i64) {
        self.0.store(now_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The clock was set back further than the tolerance below the last stamped time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockSetBack {
    pub now_ms: i64,
    pub high_water_ms: i64,
    /// The mark passed is the vendor's signed time (`Stamper::observe_vendor`), not a time
    /// this server stamped.
    pub vendor: bool,
}

/// How far the clock may be behind the vendor's signed time before the server stops issuing:
/// the authority's and the server's clocks may differ a little.
pub const VENDOR_CLOCK_ALLOWANCE_MS: i64 = 60 * 60 * 1000;

/// Stamps commands with a time that never goes backwards, and notices a clock set back.
pub struct Stamper {
    clock: Arc<dyn Clock>,
    high_water_ms: AtomicI64,
    /// The vendor's time floor (`Ledger::vendor_time_ms`): a clock more than
    /// [`VENDOR_CLOCK_ALLOWANCE_MS`] below it issues nothing. Checked, never stamped.
    vendor_floor_ms: AtomicI64,
    tolerance_ms: i64,
}

impl Stamper {
    pub fn new(clock: Arc<dyn Clock>, high_water_ms: i64, tolerance_ms: i64) -> Stamper {
        Stamper {
            clock,
            high_water_ms: AtomicI64::new(high_water_ms),
            vendor_floor_ms: AtomicI64::new(i64::MIN),
            tolerance_ms,
        }
    }

    /// Raises the vendor's time floor (the ledger's, after a start, a sync, an import).
    pub fn observe_vendor(&self, vendor_time_ms: Option<i64>) {
        if let Some(at_ms) = vendor_time_ms {
            self.vendor_floor_ms.fetch_max(at_ms, Ordering::SeqCst);
        }
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Raises the high-water mark, e.g. to the ledger's last applied time after a restart.
    pub fn observe(&self, at_ms: i64) {
        self.high_water_ms.fetch_max(at_ms, Ordering::SeqCst);
    }

    /// A time for a new command: the clock, or the high-water mark if the clock is slightly
    /// behind it. Fails if the clock is behind by more than the tolerance.
    pub fn stamp(&self) -> Result<i64, ClockSetBack> {
        let now_ms = self.clock.now_ms();
        let high_water_ms = self.high_water_ms.load(Ordering::SeqCst);
        if now_ms < high_water_ms.saturating_sub(self.tolerance_ms) {
            return Err(ClockSetBack {
                now_ms,
                high_water_ms,
                vendor: false,
            });
        }
        let vendor_floor_ms = self.vendor_floor_ms.load(Ordering::SeqCst);
        if now_ms < vendor_floor_ms.saturating_sub(VENDOR_CLOCK_ALLOWANCE_MS) {
            return Err(ClockSetBack {
                now_ms,
                high_water_ms: vendor_floor_ms,
                vendor: true,
            });
        }
        let previous = self.high_water_ms.fetch_max(now_ms, Ordering::SeqCst);
        Ok(previous.max(now_ms))
    }

    /// A time for commands that only give licenses back (checkin, release): these are safe
    /// even when the clock was set back, so they never fail.
    pub fn stamp_lenient(&self) -> i64 {
        let now_ms = self.clock.now_ms();
        self.high_water_ms
            .fetch_max(now_ms, Ordering::SeqCst)
            .max(now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_never_go_backwards_and_a_clock_set_back_is_refused() {
        let clock = ManualClock::new(10_000);
        let stamper = Stamper::new(Arc::new(clock.clone()), 0, 5_000);
        assert_eq!(stamper.stamp(), Ok(10_000));
        clock.set_ms(8_000);
        assert_eq!(
            stamper.stamp(),
            Ok(10_000),
            "within tolerance: held at the mark"
        );
        clock.set_ms(4_000);
        assert_eq!(
            stamper.stamp(),
            Err(ClockSetBack {
                now_ms: 4_000,
                high_water_ms: 10_000,
                vendor: false,
            })
        );
        assert_eq!(stamper.stamp_lenient(), 10_000);
    }

    #[test]
    fn a_clock_behind_the_vendors_signed_time_is_refused() {
        let day = 86_400_000;
        let clock = ManualClock::new(100 * day);
        let stamper = Stamper::new(Arc::new(clock.clone()), 0, 5_000);
        stamper.observe_vendor(Some(140 * day));
        assert_eq!(
            stamper.stamp(),
            Err(ClockSetBack {
                now_ms: 100 * day,
                high_water_ms: 140 * day,
                vendor: true,
            })
        );
        assert_eq!(stamper.stamp_lenient(), 100 * day, "returning still works");
        clock.set_ms(140 * day - VENDOR_CLOCK_ALLOWANCE_MS + 1);
        assert_eq!(
            stamper.stamp(),
            Ok(140 * day - VENDOR_CLOCK_ALLOWANCE_MS + 1)
        );
    }
}
