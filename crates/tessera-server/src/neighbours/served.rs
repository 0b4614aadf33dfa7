//! What each neighbour was last found to serve, kept for redirecting checkouts (held by
//! `AppState`; see the sibling `redirect`).

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// How long what a neighbour serves (or that it could not be asked) is trusted.
pub const SERVED_FRESH_MS: i64 = 60_000;
/// How long that a neighbour could not be asked is trusted.
pub const SERVED_RETRY_MS: i64 = 10_000;
/// One component a server serves from its active keys (received pools included).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedComponent {
    pub component: String,
    /// Its licenses, without those donated on.
    pub licenses: u32,
    pub free: u32,
}

/// When a neighbour was asked, and what it answered (`None`: it could not be asked).
type Asked = (i64, Option<Vec<ServedComponent>>);

/// Per neighbour, when it was last asked and what it answered. Not replicated: each host
/// asks for itself.
#[derive(Debug, Default)]
pub struct ServedCache {
    pub(super) answers: Mutex<BTreeMap<String, Asked>>,
}

impl ServedCache {
    pub(super) fn fresh(&self, id: &str, now_ms: i64) -> Option<Option<Vec<ServedComponent>>> {
        let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        answers
            .get(id)
            .filter(|(at, served)| {
                let kept = if served.is_some() {
                    SERVED_FRESH_MS
                } else {
                    SERVED_RETRY_MS
                };
                now_ms.saturating_sub(*at) < kept && *at <= now_ms
            })
            .map(|(_, served)| served.clone())
    }

    pub(super) fn store(&self, id: &str, now_ms: i64, served: Option<Vec<ServedComponent>>) {
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), (now_ms, served));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_answers_expire_after_a_minute_and_never_come_from_the_future() {
        let cache = ServedCache::default();
        cache.store("hq", 1_000, Some(vec![]));
        assert_eq!(
            cache.fresh("hq", 1_000 + SERVED_FRESH_MS - 1),
            Some(Some(vec![]))
        );
        assert_eq!(cache.fresh("hq", 1_000 + SERVED_FRESH_MS), None);
        assert_eq!(cache.fresh("hq", 999), None, "clock set back: ask again");
        assert_eq!(cache.fresh("branch", 1_000), None);
        // Unreachable: asked again sooner.
        cache.store("branch", 1_000, None);
        assert_eq!(
            cache.fresh("branch", 1_000 + SERVED_RETRY_MS - 1),
            Some(None)
        );
        assert_eq!(cache.fresh("branch", 1_000 + SERVED_RETRY_MS), None);
    }
}
