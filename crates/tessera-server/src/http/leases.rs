//! Station endpoints: checkout, heartbeat, checkin. No admin token: a station proves it holds
//! a lease with the lease secret of its checkout answer (`x-lease-secret`).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use tessera_api::{CheckoutRequest, ErrorBody, Lease};

use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::state::SharedState;

/// Where a checkout was sent from (set by the redirecting server in `Location`).
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CheckoutQuery {
    /// The server that redirected this checkout here: it is never redirected again.
    pub redirected_from: Option<String>,
}

/// `GET /v1/leases` query: a page and the filters.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LeaseQuery {
    /// Leases per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// The `next` of the previous page: the leases after this cursor (a lease id in lease-id
    /// order, `VALUE~LEASE_ID` in another).
    pub after: Option<String>,
    /// The `previous` of a page: the page before this cursor (not with `after`).
    pub before: Option<String>,
    /// The order: `id` (default), `expires`, `since` (checked out), `heartbeat`, `station`,
    /// `user`, `host` or `key`; ties in lease-id order. Empty: the default.
    #[param(pattern = "^(id|expires|since|heartbeat|station|user|host|key)?$")]
    pub sort: Option<String>,
    /// `asc` (default) or `desc`. Empty: the default.
    #[param(pattern = "^(asc|desc)?$")]
    pub order: Option<String>,
    /// Only leases of this component (exact, or a prefix ending in `*`).
    pub component: Option<String>,
    /// Only leases of this key (exact, or a prefix ending in `*`).
    pub key: Option<String>,
    /// Only leases of this station (exact, or a prefix ending in `*`).
    pub station: Option<String>,
    /// Only leases of this user (exact, or a prefix ending in `*`).
    pub user: Option<String>,
    /// Only leases of this host (exact, or a prefix ending in `*`).
    pub host: Option<String>,
}

/// Most leases per page of `GET /v1/leases`.
pub const LEASE_PAGE_MAX: u32 = 1000;

/// The leases, a page at a time in lease-id order (or sorted by `sort=`, `order=`), with exact
/// or prefix filters; `total` counts every lease matching the filters, `offset` those before
/// the page, `previous` is the cursor of the page before (`before=`).
#[utoipa::path(get, path = "/v1/leases", params(LeaseQuery), security(("admin_token" = [])), responses(
    (status = 200, description = "one page; `next` is the cursor of the following one", body = tessera_api::LeasePage),
    (status = 400, description = "invalid_query: limit out of 1..1000, an unknown parameter or sort, after with before, a cursor of another order", body = ErrorBody),
    (status = 401, description = "unauthorized: missing or wrong admin token", body = ErrorBody),
))]
pub async fn list(
    State(state): State<SharedState>,
    _admin: crate::extract::Admin,
    ApiQuery(query): ApiQuery<LeaseQuery>,
) -> Result<Json<tessera_api::LeasePage>, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=LEASE_PAGE_MAX).contains(&limit) {
        return Err(ApiError::BadRequest {
            code: "invalid_query",
            message: format!("limit must be 1 to {LEASE_PAGE_MAX}, not {limit}"),
        });
    }
    let filter = tessera_core::LeaseFilter {
        component: query.component.as_deref(),
        key: query.key.as_deref(),
        station: query.station.as_deref(),
        user: query.user.as_deref(),
        host: query.host.as_deref(),
    };
    let order = crate::lease_listing::parse_order(query.sort.as_deref(), query.order.as_deref())?;
    let cursor =
        crate::lease_listing::parse_cursor(query.after.as_deref(), query.before.as_deref())?;
    Ok(Json(state.sorted_lease_page(
        &filter,
        order,
        cursor,
        limit as usize,
    )?))
}

/// Take a license for a component (201), or get back the lease this station holds (200).
///
/// A server with no key for the component that knows a neighbour serving it answers 307
/// `component_elsewhere` with `Location` (the neighbour's `/v1/leases`): repeat the checkout
/// there; the lease then lives on that server (heartbeats and checkin go there).
#[utoipa::path(post, path = "/v1/leases", request_body = CheckoutRequest, params(CheckoutQuery), responses(
    (status = 201, description = "new lease", body = Lease),
    (status = 200, description = "the station already held this lease", body = Lease),
    (status = 307, description = "component_elsewhere: a neighbour serves the component; Location names it", body = ErrorBody,
        headers(("location" = String, description = "the neighbour's /v1/leases"))),
    (status = 400, description = "malformed_json, invalid_json, invalid_query, invalid_request", body = ErrorBody),
    (status = 403, description = "borrow_not_allowed: longer than the key's max_borrow_days", body = ErrorBody),
    (status = 404, description = "component_not_licensed", body = ErrorBody),
    (status = 409, description = "no_licenses_available, lease_held", body = ErrorBody),
    (status = 413, description = "body_too_large", body = ErrorBody),
    (status = 415, description = "unsupported_media_type: not Content-Type application/json", body = ErrorBody),
    (status = 503, description = "clock_set_back, server_not_synchronized, not_primary, no_quorum, pair_recovering", body = ErrorBody),
))]
pub async fn checkout(
    State(state): State<SharedState>,
    ApiQuery(query): ApiQuery<CheckoutQuery>,
    ApiJson(request): ApiJson<CheckoutRequest>,
) -> Result<(StatusCode, Json<Lease>), ApiError> {
    let nonce = request.nonce.clone();
    // With a holder key, the lease id is derived from it: a retry proposes the same id, and
    // only the one who knows the key can show it (see `AppState::holder_lease_id`).
    let derived = (!request.holder_key.is_empty())
        .then(|| state.holder_lease_id(&request.station, &request.holder_key));
    // A station already holding a lease of the component gets it again only with its holder
    // key: anyone else naming the station learns nothing and extends nothing.
    let held = state.read(|ledger| {
        ledger
            .station_leases(&request.station)
            .into_iter()
            .find(|lease| {
                ledger
                    .key(&lease.key_id)
                    .is_some_and(|key| key.payload.covers(&request.component))
            })
            .map(|lease| lease.lease_id)
    });
    let holds = |lease_id: &str| {
        !request.holder_key.is_empty()
            && state.is_holder_lease_id(lease_id, &request.station, &request.holder_key)
    };
    if let Some(held) = &held
        && !holds(held)
    {
        return Err(ApiError::LeaseHeld {
            station: request.station,
        });
    }
    let (station, holder_key) = (request.station.clone(), request.holder_key.clone());
    let (mut lease, created) = state
        .checkout_from(request, derived.clone(), query.redirected_from.as_deref())
        .await?;
    let holds =
        !holder_key.is_empty() && state.is_holder_lease_id(&lease.lease_id, &station, &holder_key);
    if !created && !holds {
        // Taken meanwhile by another request for the station.
        return Err(ApiError::LeaseHeld {
            station: lease.station,
        });
    }
    lease.lease_secret = Some(state.lease_secret(&lease.lease_id));
    state.sign_lease(&mut lease, &nonce);
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(lease)))
}

/// The `x-lease-secret` header, if any (also `pub(crate)` for the heartbeat and checkin).
fn lease_secret(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(LEASE_SECRET_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
}

/// The header carrying the holder's lease secret.
pub const LEASE_SECRET_HEADER: &str = "x-lease-secret";
/// The header carrying a heartbeat's nonce, returned inside the signed lease token.
pub const LEASE_NONCE_HEADER: &str = "x-lease-nonce";

/// Keep a lease alive for another lease period (the holder's `x-lease-secret` required).
#[utoipa::path(post, path = "/v1/leases/{lease_id}/heartbeat", params(
    ("lease_id" = String, Path, description = "the lease_id of the checkout answer"),
    ("x-lease-secret" = String, Header, description = "the lease_secret of the checkout answer"),
    ("x-lease-nonce" = Option<String>, Header, description = "a fresh random value, returned inside the signed lease_token"),
), responses(
    (status = 200, body = Lease),
    (status = 400, description = "invalid_path", body = ErrorBody),
    (status = 401, description = "lease_secret_required", body = ErrorBody),
    (status = 403, description = "lease_secret_wrong", body = ErrorBody),
    (status = 404, description = "lease_not_found", body = ErrorBody),
))]
pub async fn heartbeat(
    State(state): State<SharedState>,
    ApiPath(lease_id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Json<Lease>, ApiError> {
    state.check_lease_secret(&lease_id, lease_secret(&headers))?;
    let mut lease = state.heartbeat(lease_id).await?;
    let nonce = headers
        .get(LEASE_NONCE_HEADER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    state.sign_lease(&mut lease, nonce);
    Ok(Json(lease))
}

/// Return a license (the holder's `x-lease-secret` required; administrators force-release
/// with `POST /v1/leases/{lease_id}/release`).
#[utoipa::path(delete, path = "/v1/leases/{lease_id}", params(
    ("lease_id" = String, Path, description = "the lease_id of the checkout answer"),
    ("x-lease-secret" = String, Header, description = "the lease_secret of the checkout answer"),
), responses(
    (status = 204, description = "returned"),
    (status = 400, description = "invalid_path", body = ErrorBody),
    (status = 401, description = "lease_secret_required", body = ErrorBody),
    (status = 403, description = "lease_secret_wrong", body = ErrorBody),
    (status = 404, description = "lease_not_found", body = ErrorBody),
))]
pub async fn checkin(
    State(state): State<SharedState>,
    ApiPath(lease_id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    state.check_lease_secret(&lease_id, lease_secret(&headers))?;
    state.release(lease_id, false).await?;
    Ok(StatusCode::NO_CONTENT)
}
