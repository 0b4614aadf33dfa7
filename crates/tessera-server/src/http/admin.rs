//! Administrator endpoints, behind `Authorization: Bearer <admin token>`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use tessera_api::{
    AllocateRequest, ErrorBody, KeyImported, KeyRemoved, KeySummary, KeyUpdateReport, Lease,
};
use tessera_core::{LicenseKey, Refusal};

use super::extract::{Admin, ApiJson};
use crate::error::ApiError;
use crate::state::{SharedState, key_summaries};

/// Import a license key; the body is the key file as the vendor issued it.
#[utoipa::path(post, path = "/v1/keys", request_body(content = String, description = "license key file (JSON)"),
    security(("admin_token" = [])), responses(
    (status = 201, body = KeyImported),
    (status = 409, description = "key_already_imported", body = ErrorBody),
    (status = 422, description = "key_bad_signature, key_wrong_vendor, key_expired, key_other_server, key_malformed", body = ErrorBody),
    (status = 401, description = "unauthorized", body = ErrorBody),
))]
pub async fn import_key(
    State(state): State<SharedState>,
    _admin: Admin,
    body: Bytes,
) -> Result<(StatusCode, Json<KeyImported>), ApiError> {
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::BadRequest {
        code: "malformed_json",
        message: "the key file is not UTF-8 text".into(),
    })?;
    let key = LicenseKey::from_json(text).map_err(|error| Refusal::KeyRejected { error })?;
    let key_id = state.import_key(key).await?;
    Ok((StatusCode::CREATED, Json(KeyImported { key_id })))
}

#[utoipa::path(get, path = "/v1/keys", security(("admin_token" = [])), responses((status = 200, body = Vec<KeySummary>)))]
pub async fn list_keys(State(state): State<SharedState>, _admin: Admin) -> Json<Vec<KeySummary>> {
    let now_ms = state.stamper.now_ms();
    Json(state.read(|ledger| key_summaries(ledger, now_ms)))
}

/// Export a key file exactly as the vendor signed it.
#[utoipa::path(get, path = "/v1/keys/{key_id}", security(("admin_token" = [])), responses(
    (status = 200, description = "the license key file"),
    (status = 404, description = "key_not_found", body = ErrorBody),
))]
pub async fn export_key(
    State(state): State<SharedState>,
    _admin: Admin,
    Path(key_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let key = state
        .consensus
        .read(|ledger| ledger.key(&key_id).cloned())
        .ok_or(Refusal::KeyNotFound { key_id })?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        key.to_json_pretty(),
    ))
}

/// Remove a key; its leases end.
#[utoipa::path(delete, path = "/v1/keys/{key_id}", security(("admin_token" = [])), responses(
    (status = 200, body = KeyRemoved),
    (status = 404, description = "key_not_found", body = ErrorBody),
))]
pub async fn remove_key(
    State(state): State<SharedState>,
    _admin: Admin,
    Path(key_id): Path<String>,
) -> Result<Json<KeyRemoved>, ApiError> {
    let (key_id, leases_ended) = state.remove_key(key_id).await?;
    Ok(Json(KeyRemoved {
        key_id,
        leases_ended,
    }))
}

/// Take a license back from a station.
#[utoipa::path(post, path = "/v1/leases/{lease_id}/release", security(("admin_token" = [])), responses(
    (status = 200, body = Lease),
    (status = 404, description = "lease_not_found", body = ErrorBody),
))]
pub async fn force_release(
    State(state): State<SharedState>,
    _admin: Admin,
    Path(lease_id): Path<String>,
) -> Result<Json<Lease>, ApiError> {
    Ok(Json(state.release(lease_id, true).await?))
}

/// Check for renewal keys and replace license keys (sync first if an authority is set).
#[utoipa::path(post, path = "/v1/keys/update", security(("admin_token" = [])), responses((status = 200, body = KeyUpdateReport)))]
pub async fn update_keys(
    State(state): State<SharedState>,
    _admin: Admin,
) -> Result<Json<KeyUpdateReport>, ApiError> {
    Ok(Json(state.update_keys().await?))
}

/// Allocate a key to this server's stations, or take it away from them.
#[utoipa::path(post, path = "/v1/keys/{key_id}/allocate", request_body = AllocateRequest, security(("admin_token" = [])), responses(
    (status = 204, description = "allocated"),
    (status = 404, description = "key_not_found", body = ErrorBody),
))]
pub async fn allocate_key(
    State(state): State<SharedState>,
    _admin: Admin,
    Path(key_id): Path<String>,
    ApiJson(request): ApiJson<AllocateRequest>,
) -> Result<StatusCode, ApiError> {
    state
        .allocate_key(key_id, request.stations, request.groups, request.neighbours)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Recent events (notifications), newest first.
#[utoipa::path(get, path = "/v1/events", security(("admin_token" = [])), responses((status = 200, body = Vec<crate::events::Event>)))]
pub async fn events(
    State(state): State<SharedState>,
    _admin: Admin,
) -> Json<Vec<crate::events::Event>> {
    Json(state.notifier.recent())
}

/// Station groups, for allocating keys to some stations only.
#[utoipa::path(get, path = "/v1/groups", security(("admin_token" = [])), responses((status = 200, body = Vec<tessera_api::StationGroup>)))]
pub async fn list_groups(
    State(state): State<SharedState>,
    _admin: Admin,
) -> Json<Vec<tessera_api::StationGroup>> {
    Json(state.station_groups())
}

/// Define a station group (an empty list deletes it).
#[utoipa::path(put, path = "/v1/groups/{name}", request_body = tessera_api::StationGroup, security(("admin_token" = [])), responses(
    (status = 200, body = tessera_api::StationGroup),
    (status = 400, description = "invalid_request", body = ErrorBody),
))]
pub async fn set_group(
    State(state): State<SharedState>,
    _admin: Admin,
    Path(name): Path<String>,
    ApiJson(group): ApiJson<tessera_api::StationGroup>,
) -> Result<Json<tessera_api::StationGroup>, ApiError> {
    state
        .set_station_group(name.clone(), group.stations.clone())
        .await?;
    Ok(Json(tessera_api::StationGroup {
        name,
        stations: group.stations,
    }))
}
