//! What the alerts already said, so each goes out once per occurrence (held by `AppState`;
//! the checks are in the parent module).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

/// The alerts' memory.
#[derive(Default)]
pub struct Alerts {
    /// key id → (its end, the smallest threshold already said; 0: expired said).
    pub(super) keys: Mutex<HashMap<String, (i64, i64)>>,
    /// component → when `component_exhausted` was last said.
    pub(super) exhausted: Mutex<HashMap<String, i64>>,
    /// Times of the recent denials, and when a spike was last said.
    pub(super) denials: Mutex<(VecDeque<i64>, Option<i64>)>,
    /// host → (unhealthy since, reported lost).
    pub(super) hosts: Mutex<BTreeMap<u64, (Option<Instant>, bool)>>,
    /// This host was the primary at its last tick.
    pub(super) was_primary: AtomicBool,
}
