//! Administrator endpoints, behind `Authorization: Bearer <admin token>`.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use tessera_api::{
    AllocateRequest, ErrorBody, KeyImported, KeyRemoved, KeySummary, KeyUpdateReport, Lease,
};
use tessera_core::{LicenseKey, Refusal};

use crate::error::ApiError;
use crate::extract::{Admin, ApiBytes, ApiJson, ApiPath};
use crate::state::{SharedState, key_summaries};

/// Import a license key; the body is the key file as the vendor issued it.
///
/// Any content type is taken: the body is read as the key file's text.
#[utoipa::path(post, path = "/v1/keys",
    request_body(content = Object, content_type = "application/json", description = "the license key file as the vendor issued it (vendor-signed JSON)"),
    security(("admin_token" = [])), responses(
    (status = 201, body = KeyImported),
    (status = 400, description = "malformed_json: the body is not UTF-8 text", body = ErrorBody),
    (status = 409, description = "key_already_imported", body = ErrorBody),
    (status = 422, description = "key_bad_signature, key_wrong_vendor, key_expired, key_other_server, key_malformed (also any body that is not a vendor-signed key)", body = ErrorBody),
))]
pub async fn import_key(
    State(state): State<SharedState>,
    _admin: Admin,
    ApiBytes(body): ApiBytes,
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
#[utoipa::path(get, path = "/v1/keys/{key_id}", params(("key_id" = String, Path)), security(("admin_token" = [])), responses(
    (status = 200, description = "the license key file", content_type = "application/json", body = Object),
    (status = 400, description = "invalid_path", body = ErrorBody),
    (status = 404, description = "key_not_found", body = ErrorBody),
))]
pub async fn export_key(
    State(state): State<SharedState>,
    _admin: Admin,
    ApiPath(key_id): ApiPath<String>,
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
#[utoipa::path(delete, path = "/v1/keys/{key_id}", params(("key_id" = String, Path)), security(("admin_token" = [])), responses(
    (status = 200, body = KeyRemoved),
    (status = 400, description = "invalid_path", body = ErrorBody),
    (status = 404, description = "key_not_found", body = ErrorBody),
    (status = 409, description = "key_has_borrowings: a borrowing of the key has not ended; key_has_donations: a neighbour may still hold a grant of it (end the donation, wait for the grant to run out)", body = ErrorBody),
))]
pub async fn remove_key(
    State(state): State<SharedState>,
    _admin: Admin,
    ApiPath(key_id): ApiPath<String>,
) -> Result<Json<KeyRemoved>, ApiError> {
    let (key_id, leases_ended) = state.remove_key(key_id).await?;
    Ok(Json(KeyRemoved {
        key_id,
        leases_ended,
    }))
}

/// Take a license back from a station.
#[utoipa::path(post, path = "/v1/leases/{lease_id}/release", params(("lease_id" = String, Path)), security(("admin_token" = [])), responses(
    (status = 200, body = Lease),
    (status = 400, description = "invalid_path", body = ErrorBody),
    (status = 404, description = "lease_not_found", body = ErrorBody),
    (status = 409, description = "lease_borrowed: only its holder returns a borrowing early", body = ErrorBody),
))]
pub async fn force_release(
    State(state): State<SharedState>,
    _admin: Admin,
    ApiPath(lease_id): ApiPath<String>,
) -> Result<Json<Lease>, ApiError> {
    Ok(Json(state.release(lease_id, true).await?))
}

/// Check for renewal keys and replace license keys (sync first if an authority is set).
#[utoipa::path(post, path = "/v1/keys/update", security(("admin_token" = [])), responses(
    (status = 200, description = "what was renewed; a failed sync is reported in sync_error", body = KeyUpdateReport),
))]
pub async fn update_keys(
    State(state): State<SharedState>,
    _admin: Admin,
) -> Result<Json<KeyUpdateReport>, ApiError> {
    Ok(Json(state.update_keys().await?))
}

/// Allocate a key to this server's stations, or take it away from them.
#[utoipa::path(post, path = "/v1/keys/{key_id}/allocate", params(("key_id" = String, Path)), request_body = AllocateRequest, security(("admin_token" = [])), responses(
    (status = 204, description = "allocated"),
    (status = 400, description = "malformed_json, invalid_json, invalid_path, invalid_request (a group or neighbour name that is not a name)", body = ErrorBody),
    (status = 404, description = "key_not_found", body = ErrorBody),
    (status = 415, description = "unsupported_media_type: not Content-Type application/json", body = ErrorBody),
))]
pub async fn allocate_key(
    State(state): State<SharedState>,
    _admin: Admin,
    ApiPath(key_id): ApiPath<String>,
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
#[utoipa::path(put, path = "/v1/groups/{name}",
    params(("name" = String, Path, pattern = r"^[A-Za-z0-9._-]{1,128}$", description = "the group's name (the body's name is ignored)")),
    request_body = tessera_api::StationGroup, security(("admin_token" = [])), responses(
    (status = 200, body = tessera_api::StationGroup),
    (status = 400, description = "malformed_json, invalid_json, invalid_path, invalid_request", body = ErrorBody),
    (status = 415, description = "unsupported_media_type: not Content-Type application/json", body = ErrorBody),
))]
pub async fn set_group(
    State(state): State<SharedState>,
    _admin: Admin,
    ApiPath(name): ApiPath<String>,
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
