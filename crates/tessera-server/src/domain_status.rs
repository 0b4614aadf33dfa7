//! A domain's hosts as this host sees them (`GET /v1/domain`, the console's domain panel):
//! a view over the consensus, used by the HTTP and console layers only.

pub use tessera_api::{DomainHost as HostJson, DomainStatus};

impl From<crate::consensus::HostView> for HostJson {
    fn from(view: crate::consensus::HostView) -> HostJson {
        HostJson {
            host: view.host,
            address: view.address,
            role: view.role.to_string(),
            healthy: view.healthy,
            replication_lag: view.replication_lag,
            last_contact_ms: view.last_contact_ms,
        }
    }
}

pub fn local_status(state: &crate::state::SharedState) -> DomainStatus {
    let me = state.config.domain.as_ref().map(|d| d.host).unwrap_or(1);
    let hosts: Vec<HostJson> = state
        .consensus
        .domain_view()
        .into_iter()
        .map(HostJson::from)
        .collect();
    let primary = state.consensus.primary().map(|(id, _)| id);
    let quorum = state.consensus.is_primary()
        && hosts.iter().filter(|h| h.healthy).count() * 2 > hosts.len();
    DomainStatus {
        view_of: me,
        answered_by: me,
        primary,
        quorum,
        hosts,
    }
}
