//! The clock as a trait. The server injects a system clock in production and a manual clock
//! in tests; the ledger never sees a clock, only the `at_ms` the primary stamped.

/// Milliseconds since the Unix epoch, as seen by one host.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}
