//! Redirecting stations to the neighbour that serves a component this server has no key for
//! (LispWorks: daemons "redirect any requests for licenses to an appropriate domain").
//!
//! - **What a neighbour serves** is asked over the signed link (`POST /v1/neighbours/components`,
//!   kind `components`, answered with kind `served`): per component of its active keys, the
//!   licenses and how many are free. Any configured neighbour may ask, whatever the relation:
//!   the answer gives counts only, no station or lease.
//! - **When**: only when a checkout finds no key covering the component here. The answers are
//!   kept for [`SERVED_FRESH_MS`]; that a neighbour could not be asked, for
//!   [`SERVED_RETRY_MS`] (a switched-off neighbour costs one attempt every few seconds, not
//!   one per checkout, and a neighbour that was slow once is asked again soon). Each ask is
//!   bounded by [`SERVED_TIMEOUT_MS`].
//! - **Which**: among the neighbours serving the component, the first in configuration order
//!   with a free license; if none has one, the first serving it (its answer,
//!   `no_licenses_available`, is then the truth).
//! - **One hop**: the `Location` carries `?redirected_from=ID`; a server receiving a checkout
//!   so marked never redirects it again, so two servers that each believe the other serves a
//!   component cannot bounce a station between them.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::Envelope;
use super::config::Neighbour;
use crate::error::ApiError;
use crate::state::{AppState, component_totals};

/// How long what a neighbour serves (or that it could not be asked) is trusted.
pub const SERVED_FRESH_MS: i64 = 60_000;
/// How long that a neighbour could not be asked is trusted.
pub const SERVED_RETRY_MS: i64 = 10_000;
/// How long one ask may take before the neighbour counts as unreachable.
pub const SERVED_TIMEOUT_MS: u64 = 2_000;

/// Request body of kind `components`: nothing to say.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ComponentsRequest {}

/// Answer body of kind `served`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServedAnswer {
    pub components: Vec<ServedComponent>,
}

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
    answers: Mutex<BTreeMap<String, Asked>>,
}

impl ServedCache {
    fn fresh(&self, id: &str, now_ms: i64) -> Option<Option<Vec<ServedComponent>>> {
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

    fn store(&self, id: &str, now_ms: i64, served: Option<Vec<ServedComponent>>) {
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), (now_ms, served));
    }
}

/// Where a station is sent: the neighbour and the URL to repeat the checkout at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub neighbour: String,
    pub location: String,
}

impl AppState {
    /// `POST /v1/neighbours/components`: what this server serves, for a neighbour.
    pub fn receive_components(&self, envelope: Envelope) -> Result<Envelope, ApiError> {
        let (neighbour, _): (Neighbour, ComponentsRequest) = self.open(&envelope, "components")?;
        let answer = ServedAnswer {
            components: self.served_here(),
        };
        Ok(self.seal(&neighbour.id, "served", &answer))
    }

    /// The components this server serves now, with their licenses and free counts.
    pub fn served_here(&self) -> Vec<ServedComponent> {
        let now_ms = self.stamper.now_ms();
        self.read(|ledger| component_totals(ledger, now_ms))
            .into_values()
            .filter(|c| c.licenses > 0)
            .map(|c| ServedComponent {
                component: c.component,
                licenses: c.licenses,
                free: c.free,
            })
            .collect()
    }

    /// What a neighbour serves: the answer kept, or a new one.
    async fn served_by(&self, neighbour: &Neighbour) -> Option<Vec<ServedComponent>> {
        let now_ms = self.stamper.now_ms();
        if let Some(served) = self.served.fresh(&neighbour.id, now_ms) {
            return served;
        }
        let request = ComponentsRequest::default();
        let ask = self.exchange::<_, ServedAnswer>(
            neighbour,
            "/v1/neighbours/components",
            "components",
            "served",
            &request,
        );
        let served =
            match tokio::time::timeout(std::time::Duration::from_millis(SERVED_TIMEOUT_MS), ask)
                .await
            {
                Ok(Ok(answer)) => Some(answer.components),
                Ok(Err(error)) => {
                    tracing::debug!(%error, neighbour = neighbour.id, "cannot ask what it serves");
                    None
                }
                Err(_) => {
                    tracing::debug!(neighbour = neighbour.id, "asking what it serves timed out");
                    None
                }
            };
        self.served.store(&neighbour.id, now_ms, served.clone());
        served
    }

    /// The neighbour to send a checkout for `component` to, if any serves it.
    pub async fn redirect_for(&self, component: &str) -> Option<Redirect> {
        if self.config.neighbours.is_empty() || self.config.server_id.is_none() {
            return None;
        }
        let answers = futures::future::join_all(
            self.config
                .neighbours
                .iter()
                .map(|neighbour| async move { (neighbour, self.served_by(neighbour).await) }),
        )
        .await;
        let serving: Vec<(&Neighbour, u32)> = answers
            .into_iter()
            .filter_map(|(neighbour, served)| {
                let entry = served?.into_iter().find(|c| c.component == component)?;
                Some((neighbour, entry.free))
            })
            .collect();
        let chosen = serving
            .iter()
            .find(|(_, free)| *free > 0)
            .or_else(|| serving.first())?
            .0;
        let from = self.config.server_id.as_deref().unwrap_or_default();
        Some(Redirect {
            neighbour: chosen.id.clone(),
            location: format!(
                "{}/v1/leases?redirected_from={}",
                chosen.url.trim_end_matches('/'),
                url_component(from)
            ),
        })
    }
}

/// Percent-encodes everything but unreserved characters (server IDs are plain, but a query
/// must stay a query whatever an administrator typed).
fn url_component(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_id_is_encoded_into_the_query() {
        assert_eq!(url_component("hq-1.a_b~"), "hq-1.a_b~");
        assert_eq!(url_component("a b&c=d"), "a%20b%26c%3Dd");
    }

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
