//! Redirecting stations to the neighbour that serves a component this server has no key for
//! (LispWorks: daemons "redirect any requests for licenses to an appropriate domain").
//!
//! - **What a neighbour serves** is asked over the signed link (`POST /v1/neighbours/components`,
//!   kind `components`, answered with kind `served`): per component of its active keys, the
//!   licenses and how many are free. Any configured neighbour may ask, whatever the relation:
//!   the answer gives counts only, no station or lease.
//! - **When**: only when a checkout finds no key covering the component here. The answers are
//!   kept for [`SERVED_FRESH_MS`](super::served::SERVED_FRESH_MS); that a neighbour could not be asked, for
//!   [`SERVED_RETRY_MS`](super::served::SERVED_RETRY_MS) (a switched-off neighbour costs one attempt every few seconds, not
//!   one per checkout, and a neighbour that was slow once is asked again soon). Each ask is
//!   bounded by [`SERVED_TIMEOUT_MS`].
//! - **Which**: among the neighbours serving the component, the first in configuration order
//!   with a free license; if none has one, the first serving it (its answer,
//!   `no_licenses_available`, is then the truth).
//! - **One hop**: the `Location` carries `?redirected_from=ID`; a server receiving a checkout
//!   so marked never redirects it again, so two servers that each believe the other serves a
//!   component cannot bounce a station between them.

use serde::{Deserialize, Serialize};

use super::Envelope;
use super::config::Neighbour;
use super::served::ServedComponent;
use crate::error::ApiError;
use crate::state::{AppState, component_totals};

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
}
