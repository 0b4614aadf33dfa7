//! What this host remembers of each neighbour link (held by `AppState`; the protocol around
//! it is the parent module's).

use std::collections::BTreeMap;
use std::sync::Mutex;

use tessera_api::DonorSettings;
use tessera_engine::link::LinkMemory;

/// What this host knows about the link to one neighbour (not replicated: a new primary
/// starts afresh and contacts every neighbour at once): the protocol's memory
/// ([`LinkMemory`], whose rules are `tessera_engine::link`) and what the console shows.
#[derive(Clone, Debug, Default)]
pub struct LinkState {
    pub memory: LinkMemory,
    pub last_contact_ms: Option<i64>,
    pub last_error: Option<String>,
    pub donor_settings: Option<DonorSettings>,
    /// The last mismatch reported, so the same one is not notified every sync period.
    pub last_mismatch: Option<String>,
}

/// Per-neighbour link states.
#[derive(Debug, Default)]
pub struct Links {
    pub(super) states: Mutex<BTreeMap<String, LinkState>>,
    /// The last refusal of an incoming message notified: (when, what).
    pub(super) last_refusal: Mutex<Option<(i64, String)>>,
}

impl Links {
    pub fn get(&self, id: &str) -> LinkState {
        self.states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    pub(super) fn update(&self, id: &str, change: impl FnOnce(&mut LinkState)) {
        let mut links = self.states.lock().unwrap_or_else(|e| e.into_inner());
        change(links.entry(id.to_string()).or_default());
    }
}
