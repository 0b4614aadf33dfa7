//! Synchronization endpoints (admin): online sync, request export, response import, status.

use axum::Json;
use axum::extract::State;
use tessera_api::{ErrorBody, SyncStatus, SyncSummary};
use tessera_core::Refusal;
use tessera_core::sync::{SyncRequest, SyncResponse};

use crate::error::ApiError;
use crate::extract::{Admin, ApiBytes};
use crate::state::SharedState;

#[utoipa::path(get, path = "/v1/sync", responses((status = 200, body = SyncStatus)))]
pub async fn status(State(state): State<SharedState>) -> Json<SyncStatus> {
    Json(state.sync_status())
}

/// Synchronize now with the configured authority.
#[utoipa::path(post, path = "/v1/sync", security(("admin_token" = [])), responses(
    (status = 200, body = SyncSummary),
    (status = 409, description = "no_authority: no authority URL configured (sync by file); no_server_id; server_cloned, server_rolled_back: the authority refused this server's sync chain (a copy or a restored backup of its data), automatic syncs stop until the vendor resets it", body = ErrorBody),
    (status = 422, description = "the authority's answer was refused: sync_bad_signature, sync_other_server, sync_malformed, sync_wrong_vendor", body = ErrorBody),
    (status = 502, description = "authority_refused, authority_unreachable", body = ErrorBody),
))]
pub async fn sync_now(
    State(state): State<SharedState>,
    _admin: Admin,
) -> Result<Json<SyncSummary>, ApiError> {
    Ok(Json(state.sync_online().await?))
}

/// Start a sync by file: returns the signed request to carry to the vendor.
#[utoipa::path(post, path = "/v1/sync/request", security(("admin_token" = [])), responses(
    (status = 200, description = "the signed sync request (tessera-sync-request)", content_type = "application/json", body = Object),
    (status = 409, description = "no_server_id", body = ErrorBody),
))]
pub async fn export_request(
    State(state): State<SharedState>,
    _admin: Admin,
) -> Result<Json<SyncRequest>, ApiError> {
    Ok(Json(state.export_sync_request().await?))
}

/// Finish a sync by file: the body is the vendor's response file.
///
/// Any content type is taken: the body is read as the response file's text.
#[utoipa::path(post, path = "/v1/sync/response", security(("admin_token" = [])),
    request_body(content = Object, content_type = "application/json", description = "the vendor's sync response file (signed JSON)"), responses(
    (status = 200, body = SyncSummary),
    (status = 409, description = "sync_not_awaited: stale or replayed response", body = ErrorBody),
    (status = 422, description = "sync_bad_signature, sync_other_server, sync_malformed, sync_wrong_vendor", body = ErrorBody),
))]
pub async fn import_response(
    State(state): State<SharedState>,
    _admin: Admin,
    ApiBytes(body): ApiBytes,
) -> Result<Json<SyncSummary>, ApiError> {
    let text = String::from_utf8_lossy(&body);
    let response =
        SyncResponse::from_json(&text).map_err(|error| Refusal::SyncRejected { error })?;
    Ok(Json(state.import_sync_response(response).await?))
}
