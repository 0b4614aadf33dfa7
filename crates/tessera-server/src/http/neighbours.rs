//! Neighbour servers: the signed server-to-server exchanges, and the administrator's
//! donations.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use tessera_api::{
    DonateRequest, DonationSummary, ErrorBody, Identity, NeighbourEnvelope, Neighbours,
};

use crate::error::ApiError;
use crate::extract::{Admin, ApiJson, ApiPath};
use crate::neighbours::Envelope;
use crate::state::SharedState;

/// Before a link route reads its body: one larger than `body_limit_bytes` is read only when
/// a configured neighbour vouched for its length ([`crate::neighbours::BODY_VOUCHER_HEADER`],
/// signed with its identity key); otherwise 413 from the headers alone. A body of unknown
/// length is read up to `body_limit_bytes`.
pub async fn body_gate(
    State(state): State<SharedState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let limit = state.config.body_limit_bytes;
    let length = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || ApiError::PayloadTooLarge { limit_bytes: limit }.into_response();
    match length {
        Some(length) if length <= limit as u64 => next.run(request).await,
        Some(length) => {
            let vouched = length <= crate::neighbours::LINK_BODY_LIMIT_BYTES as u64
                && request
                    .headers()
                    .get(crate::neighbours::BODY_VOUCHER_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|voucher| {
                        state.body_vouched(request.uri().path(), length, voucher)
                    });
            if vouched {
                next.run(request).await
            } else {
                too_large()
            }
        }
        None => {
            let (parts, body) = request.into_parts();
            match axum::body::to_bytes(body, limit).await {
                Ok(bytes) => {
                    next.run(axum::extract::Request::from_parts(
                        parts,
                        axum::body::Body::from(bytes),
                    ))
                    .await
                }
                Err(_) => too_large(),
            }
        }
    }
}

/// A donor's grants for this server (signed by the donor; no admin token).
///
/// The envelope's `kind` is `grants`, its body `{grants: [Grant], returned_request: bool}`.
/// The answer's `kind` is `held`, its body `{held: [HeldGrant], held_before: [HeldGrant],
/// returned: [ReturnedGrant], refused: [string]}`.
#[utoipa::path(post, path = "/v1/neighbours/grants", request_body = NeighbourEnvelope, responses(
    (status = 200, description = "signed envelope: what this server holds from the donor", body = NeighbourEnvelope),
    (status = 400, description = "malformed_json, invalid_json: not an envelope; malformed_json: a body that is not its kind's", body = ErrorBody),
    (status = 403, description = "unknown_neighbour, neighbour_not_allowed, bad_neighbour_signature", body = ErrorBody),
    (status = 409, description = "clock_skew", body = ErrorBody),
    (status = 415, description = "unsupported_media_type: not Content-Type application/json", body = ErrorBody),
))]
pub async fn receive_grants(
    State(state): State<SharedState>,
    ApiJson(envelope): ApiJson<Envelope>,
) -> Result<Json<Envelope>, ApiError> {
    Ok(Json(state.receive_push(envelope).await?))
}

/// A receiver asks this server to renew its grants (signed by the receiver).
///
/// The envelope's `kind` is `renew`, its body `{held: [HeldGrant], usage: UsageReport | null,
/// returned: [ReturnedGrant]}`. The answer's `kind` is `renewed`, its body `{grants: [Grant],
/// settings: DonorSettings, returned_request: bool}`.
#[utoipa::path(post, path = "/v1/neighbours/renew", request_body = NeighbourEnvelope, responses(
    (status = 200, description = "signed envelope: the renewed grants and the donor's periods", body = NeighbourEnvelope),
    (status = 400, description = "malformed_json, invalid_json: not an envelope; malformed_json: a body that is not its kind's", body = ErrorBody),
    (status = 403, description = "unknown_neighbour, neighbour_not_allowed, bad_neighbour_signature", body = ErrorBody),
    (status = 409, description = "clock_skew", body = ErrorBody),
    (status = 415, description = "unsupported_media_type: not Content-Type application/json", body = ErrorBody),
))]
pub async fn renew(
    State(state): State<SharedState>,
    ApiJson(envelope): ApiJson<Envelope>,
) -> Result<Json<Envelope>, ApiError> {
    Ok(Json(state.receive_renew(envelope).await?))
}

/// What this server serves, for a neighbour redirecting stations (signed by the asker).
///
/// The envelope's `kind` is `components`, its body `{}`. The answer's `kind` is `served`, its
/// body `{components: [{component, licenses, free}]}`.
#[utoipa::path(post, path = "/v1/neighbours/components", request_body = NeighbourEnvelope, responses(
    (status = 200, description = "signed envelope: the components this server serves", body = NeighbourEnvelope),
    (status = 400, description = "malformed_json, invalid_json: not an envelope", body = ErrorBody),
    (status = 403, description = "unknown_neighbour, bad_neighbour_signature", body = ErrorBody),
    (status = 409, description = "clock_skew", body = ErrorBody),
    (status = 415, description = "unsupported_media_type: not Content-Type application/json", body = ErrorBody),
))]
pub async fn components(
    State(state): State<SharedState>,
    ApiJson(envelope): ApiJson<Envelope>,
) -> Result<Json<Envelope>, ApiError> {
    Ok(Json(state.receive_components(envelope)?))
}

/// This server's ID and identity public key, for a neighbour's `[[neighbour]]` entry.
#[utoipa::path(get, path = "/v1/identity", responses((status = 200, body = Identity)))]
pub async fn identity(State(state): State<SharedState>) -> Json<Identity> {
    Json(Identity {
        server_id: state.config.server_id.clone(),
        public_key: state.identity.public_key().to_base64(),
    })
}

/// Every configured neighbour: link state, donations, received grants, usage reports.
#[utoipa::path(get, path = "/v1/neighbours", security(("admin_token" = [])), responses((status = 200, body = Neighbours)))]
pub async fn list(State(state): State<SharedState>, _admin: Admin) -> Json<Neighbours> {
    Json(state.neighbours_summary())
}

/// Donate licenses of a key to a neighbour until a date, or change a donation.
#[utoipa::path(post, path = "/v1/donations", request_body = DonateRequest, security(("admin_token" = [])), responses(
    (status = 200, body = DonationSummary),
    (status = 400, description = "malformed_json, invalid_json, invalid_request (until not a date, no server ID, licenses 0)", body = ErrorBody),
    (status = 403, description = "unknown_neighbour, neighbour_not_allowed", body = ErrorBody),
    (status = 404, description = "key_not_found", body = ErrorBody),
    (status = 409, description = "not_enough_licenses", body = ErrorBody),
    (status = 415, description = "unsupported_media_type: not Content-Type application/json", body = ErrorBody),
    (status = 422, description = "donation_refused", body = ErrorBody),
))]
pub async fn donate(
    State(state): State<SharedState>,
    _admin: Admin,
    ApiJson(request): ApiJson<DonateRequest>,
) -> Result<Json<DonationSummary>, ApiError> {
    Ok(Json(state.donate(request).await?))
}

/// Every donation to neighbours.
#[utoipa::path(get, path = "/v1/donations", security(("admin_token" = [])), responses((status = 200, body = Vec<DonationSummary>)))]
pub async fn donations(
    State(state): State<SharedState>,
    _admin: Admin,
) -> Json<Vec<DonationSummary>> {
    let now_ms = state.stamper.now_ms();
    let donations = state.consensus.read(|ledger| ledger.donations());
    Json(
        donations
            .iter()
            .map(|d| crate::neighbours::donation_summary(d, now_ms))
            .collect(),
    )
}

/// End a donation: no more renewals; the licenses come back when the neighbour's grant
/// runs out (at most one renewal period).
#[utoipa::path(delete, path = "/v1/donations/{key_id}/{to}",
    params(("key_id" = String, Path), ("to" = String, Path, description = "the neighbour's server ID")),
    security(("admin_token" = [])), responses(
    (status = 200, body = DonationSummary),
    (status = 400, description = "invalid_path", body = ErrorBody),
    (status = 404, description = "donation_not_found", body = ErrorBody),
))]
pub async fn end_donation(
    State(state): State<SharedState>,
    _admin: Admin,
    ApiPath((key_id, to)): ApiPath<(String, String)>,
) -> Result<(StatusCode, Json<DonationSummary>), ApiError> {
    Ok((StatusCode::OK, Json(state.end_donation(key_id, to).await?)))
}
