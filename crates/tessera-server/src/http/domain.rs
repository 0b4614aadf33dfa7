//! `GET /v1/domain`: every host of the domain with its role, health, replication lag and
//! last contact. The primary sees all of that; so a backup asks the primary (one hop) and
//! falls back to its own, partial view when the primary cannot be reached.
//!
//! `POST /v1/domain/hosts` and `DELETE /v1/domain/hosts/{host}` (admin) change the members of
//! a running domain through openraft membership changes; a backup forwards them to the
//! primary like every write.

use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::domain::{FORWARDED_HEADER, HOSTS_MAX};
use crate::domain_status::{DomainStatus, local_status};
use crate::error::ApiError;
use crate::extract::{Admin, ApiJson, ApiPath};
use crate::state::SharedState;
use tessera_api::ErrorBody;

/// Every host of the domain with its role, health, replication lag and last contact (a
/// single server: itself alone). A backup shows the primary's view when it reaches it.
#[utoipa::path(get, path = "/v1/domain", responses((status = 200, body = DomainStatus)))]
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
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddHostRequest {
    #[schema(minimum = 1, maximum = 1000)]
    pub host: u64,
    /// `HOST:PORT` where the other hosts reach it.
    #[schema(pattern = ":")]
    pub address: String,
}

/// The voters after a membership change.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Members {
    pub hosts: Vec<u64>,
}

fn bad(message: String) -> ApiError {
    ApiError::BadRequest {
        code: "invalid_request",
        message,
    }
}

/// Add a host to the running domain: a learner until it holds the whole log, then a voter.
#[utoipa::path(post, path = "/v1/domain/hosts", request_body = AddHostRequest, security(("admin_token" = [])), responses(
    (status = 200, description = "the voters afterwards", body = Members),
    (status = 400, description = "malformed_json, invalid_json, invalid_request (host number out of range, address not HOST:PORT)", body = ErrorBody),
    (status = 409, description = "domain_requirements (no domain_secret: the hosts could not authenticate each other), host_already_member, domain_full", body = ErrorBody),
    (status = 415, description = "unsupported_media_type: not Content-Type application/json", body = ErrorBody),
    (status = 503, description = "no_quorum: the new host did not catch up in time, or no majority acknowledged the change", body = ErrorBody),
))]
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
    // Without the secret this host serves no Raft routes and the new host could not prove
    // itself: the learner would never catch up (and the server would keep calling an
    // address nobody checked).
    if state.config.domain_secret.is_none() {
        return Err(ApiError::Conflict {
            code: "domain_requirements",
            message: "a domain of several hosts needs the same domain_secret on every host: start this server with --domain-secret".into(),
        });
    }
    let members = state.consensus.domain_view();
    if members.iter().any(|h| h.host == request.host) {
        return Err(ApiError::Conflict {
            code: "host_already_member",
            message: format!("host {} is already a member of the domain", request.host),
        });
    }
    if members.len() >= HOSTS_MAX {
        return Err(ApiError::Conflict {
            code: "domain_full",
            message: format!(
                "the domain already has {} hosts; a domain has at most {HOSTS_MAX}",
                members.len()
            ),
        });
    }
    let hosts = state
        .consensus
        .add_host(request.host, &request.address)
        .await?;
    Ok(axum::Json(Members { hosts }))
}

/// Remove a host from the running domain (the remaining hosts become the voters).
#[utoipa::path(delete, path = "/v1/domain/hosts/{host}", params(("host" = u64, Path, description = "the host number")),
    security(("admin_token" = [])), responses(
    (status = 200, description = "the voters afterwards", body = Members),
    (status = 400, description = "invalid_path: not a host number", body = ErrorBody),
    (status = 404, description = "host_not_member", body = ErrorBody),
    (status = 409, description = "last_host: a domain never loses its last host", body = ErrorBody),
    (status = 503, description = "no_quorum: no majority acknowledged the change", body = ErrorBody),
))]
pub async fn remove_host(
    State(state): State<SharedState>,
    _admin: Admin,
    ApiPath(host): ApiPath<u64>,
) -> Result<axum::Json<Members>, ApiError> {
    let members = state.consensus.domain_view();
    if !members.iter().any(|h| h.host == host) {
        return Err(ApiError::NotFound {
            code: "host_not_member",
            message: format!(
                "host {host} is not a member of the domain (members: {:?})",
                members.iter().map(|h| h.host).collect::<Vec<_>>()
            ),
        });
    }
    if members.len() == 1 {
        return Err(ApiError::Conflict {
            code: "last_host",
            message: "cannot remove the last host of the domain".into(),
        });
    }
    let hosts = state.consensus.remove_host(host).await?;
    Ok(axum::Json(Members { hosts }))
}
