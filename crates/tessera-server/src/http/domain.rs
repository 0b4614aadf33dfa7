//! `GET /v1/domain`: every host of the domain with its role, health, replication lag and
//! last contact. The primary sees all of that; so a backup asks the primary (one hop) and
//! falls back to its own, partial view when the primary cannot be reached.
//!
//! `POST /v1/domain/hosts` and `DELETE /v1/domain/hosts/{host}` (admin) change the members of
//! a running domain through openraft membership changes; a backup forwards them to the
//! primary like every write.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};

use super::extract::{Admin, ApiJson};
use crate::consensus::HostView;
use crate::domain::{FORWARDED_HEADER, HOSTS_MAX};
use crate::error::ApiError;
use crate::state::SharedState;

/// The answer of `GET /v1/domain`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DomainStatus {
    /// The host whose view this is (the primary's when it could be reached).
    pub view_of: u64,
    /// The host that answered the request.
    pub answered_by: u64,
    pub primary: Option<u64>,
    /// Whether the view's host is the primary and has heard from a majority recently.
    pub quorum: bool,
    pub hosts: Vec<HostJson>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostJson {
    pub host: u64,
    pub address: Option<String>,
    pub role: String,
    pub healthy: bool,
    pub replication_lag: Option<u64>,
    pub last_contact_ms: Option<u64>,
}

impl From<HostView> for HostJson {
    fn from(view: HostView) -> HostJson {
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

pub fn local_status(state: &SharedState) -> DomainStatus {
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

pub async fn status(
    State(state): State<SharedState>,
    headers: HeaderMap,
) -> axum::Json<DomainStatus> {
    let local = local_status(&state);
    if state.consensus.is_primary() || headers.contains_key(FORWARDED_HEADER) {
        return axum::Json(local);
    }
    if let Some((primary, addr)) = state
        .consensus
        .primary()
        .filter(|(id, _)| *id != local.view_of)
    {
        let asked = state
            .peer_http
            .get(state.peer_url(&addr, "/v1/domain"))
            .timeout(Duration::from_millis(1_000))
            .header(FORWARDED_HEADER, local.view_of.to_string())
            .send();
        if let Ok(answer) = asked.await
            && answer.status().is_success()
            && let Ok(mut view) = answer.json::<DomainStatus>().await
            && view.view_of == primary
        {
            view.answered_by = local.view_of;
            return axum::Json(view);
        }
    }
    axum::Json(local)
}

/// `POST /v1/domain/hosts`: add a host to the running domain.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddHostRequest {
    pub host: u64,
    /// `HOST:PORT` where the other hosts reach it.
    pub address: String,
}

/// The voters after a membership change.
#[derive(Debug, Serialize, Deserialize)]
pub struct Members {
    pub hosts: Vec<u64>,
}

fn bad(message: String) -> ApiError {
    ApiError::BadRequest {
        code: "invalid_request",
        message,
    }
}

pub async fn add_host(
    State(state): State<SharedState>,
    _admin: Admin,
    ApiJson(request): ApiJson<AddHostRequest>,
) -> Result<axum::Json<Members>, ApiError> {
    if request.host == 0 || request.host > 1000 {
        return Err(bad(format!(
            "host number {} is out of range: number hosts from 1",
            request.host
        )));
    }
    if !request.address.contains(':') {
        return Err(bad(format!(
            "address {:?} must be HOST:PORT",
            request.address
        )));
    }
    let members = state.consensus.domain_view();
    if members.iter().any(|h| h.host == request.host) {
        return Err(bad(format!(
            "host {} is already a member of the domain",
            request.host
        )));
    }
    if members.len() >= HOSTS_MAX {
        return Err(bad(format!(
            "the domain already has {} hosts; a domain has at most {HOSTS_MAX}",
            members.len()
        )));
    }
    let hosts = state
        .consensus
        .add_host(request.host, &request.address)
        .await?;
    Ok(axum::Json(Members { hosts }))
}

/// `DELETE /v1/domain/hosts/{host}`: remove a host from the running domain.
pub async fn remove_host(
    State(state): State<SharedState>,
    _admin: Admin,
    Path(host): Path<u64>,
) -> Result<axum::Json<Members>, ApiError> {
    let members = state.consensus.domain_view();
    if !members.iter().any(|h| h.host == host) {
        return Err(bad(format!(
            "host {host} is not a member of the domain (members: {:?})",
            members.iter().map(|h| h.host).collect::<Vec<_>>()
        )));
    }
    if members.len() == 1 {
        return Err(bad("cannot remove the last host of the domain".into()));
    }
    let hosts = state.consensus.remove_host(host).await?;
    Ok(axum::Json(Members { hosts }))
}
