//! Station endpoints: checkout, heartbeat, checkin. No token: a station proves it holds a
//! lease by knowing its unguessable id.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use tessera_api::{CheckoutRequest, ErrorBody, Lease};

use super::extract::ApiJson;
use crate::error::ApiError;
use crate::state::SharedState;

/// Where a checkout was sent from (set by the redirecting server in `Location`).
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
pub struct CheckoutQuery {
    /// The server that redirected this checkout here: it is never redirected again.
    pub redirected_from: Option<String>,
}

/// Take a license for a component (201), or get back the lease this station holds (200).
///
/// A server with no key for the component that knows a neighbour serving it answers 307
/// `component_elsewhere` with `Location` (the neighbour's `/v1/leases`): repeat the checkout
/// there; the lease then lives on that server (heartbeats and checkin go there).
#[utoipa::path(post, path = "/v1/leases", request_body = CheckoutRequest, params(CheckoutQuery), responses(
    (status = 201, description = "new lease", body = Lease),
    (status = 200, description = "the station already held this lease", body = Lease),
    (status = 307, description = "component_elsewhere: a neighbour serves the component; Location names it", body = ErrorBody),
    (status = 409, description = "no_licenses_available", body = ErrorBody),
    (status = 404, description = "component_not_licensed", body = ErrorBody),
    (status = 503, description = "clock_set_back, not_primary, no_quorum", body = ErrorBody),
))]
pub async fn checkout(
    State(state): State<SharedState>,
    Query(query): Query<CheckoutQuery>,
    ApiJson(request): ApiJson<CheckoutRequest>,
) -> Result<(StatusCode, Json<Lease>), ApiError> {
    let (lease, created) = state
        .checkout_from(request, query.redirected_from.as_deref())
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(lease)))
}

/// Keep a lease alive for another lease period.
#[utoipa::path(post, path = "/v1/leases/{lease_id}/heartbeat", responses(
    (status = 200, body = Lease),
    (status = 404, description = "lease_not_found", body = ErrorBody),
))]
pub async fn heartbeat(
    State(state): State<SharedState>,
    Path(lease_id): Path<String>,
) -> Result<Json<Lease>, ApiError> {
    Ok(Json(state.heartbeat(lease_id).await?))
}

/// Return a license.
#[utoipa::path(delete, path = "/v1/leases/{lease_id}", responses(
    (status = 204, description = "returned"),
    (status = 404, description = "lease_not_found", body = ErrorBody),
))]
pub async fn checkin(
    State(state): State<SharedState>,
    Path(lease_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.release(lease_id, false).await?;
    Ok(StatusCode::NO_CONTENT)
}
