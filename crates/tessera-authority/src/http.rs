//! The HTTP API: routes, extractors and handlers. Handlers parse, then run one registry or
//! sync operation on the database thread pool; the status mapping lives in [`crate::error`].

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tessera_core::LicenseKey;
use tessera_core::sync::{SyncRequest, SyncResponse};

use crate::error::AuthorityError;
use crate::ids::{constant_time_eq, normalize_server_id};
use crate::registry;
use crate::wire::{
    AlertInfo, CustomerInfo, CustomerSettings, Health, IssueKey, KeyInfo, NewCustomer, NewServer,
    RenewKey, ServerInfo,
};

/// Largest request body accepted. The biggest legitimate body is a sync request listing the
/// keys a server holds, a few KiB; anything near this is a mistake or an attack.
pub const BODY_LIMIT_BYTES: usize = 64 * 1024;

pub use crate::state::{Shared, SharedState};

pub fn router(state: SharedState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/vendor.pub", get(vendor_pub))
        .route("/v1/customers", post(add_customer).get(list_customers))
        .route("/v1/customers/{name}/settings", post(set_customer))
        .route("/v1/servers", post(add_server).get(list_servers))
        .route("/v1/servers/{server_id}", get(get_server))
        .route("/v1/servers/{server_id}/reset", post(reset_server))
        .route("/v1/keys", post(issue_key).get(list_keys))
        .route("/v1/keys/{key_id}", get(get_key))
        .route("/v1/keys/{key_id}/renewal", post(renew_key))
        .route("/v1/keys/{key_id}/revoke", post(revoke_key))
        .route("/v1/alerts", get(list_alerts))
        .route("/v1/sync", post(sync))
        .route("/v1/sync/process", post(process))
        .merge(crate::console::router())
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .layer(axum::middleware::map_response(
            crate::console::security_headers,
        ))
        .with_state(state)
}

// ---- extractors -----------------------------------------------------------------------------

/// A JSON body, whatever the content type (request files arrive from mail and scripts), with
/// oversized and malformed bodies answered in the stable error format.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned> FromRequest<SharedState> for Body<T> {
    type Rejection = AuthorityError;

    async fn from_request(request: Request, state: &SharedState) -> Result<Self, AuthorityError> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    AuthorityError::BodyTooLarge {
                        limit_bytes: BODY_LIMIT_BYTES,
                    }
                } else {
                    AuthorityError::MalformedJson {
                        detail: rejection.body_text(),
                    }
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| AuthorityError::MalformedJson {
                detail: e.to_string(),
            })
    }
}

/// Query parameters, with a bad query answered in the stable error format.
pub struct Params<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<SharedState> for Params<T> {
    type Rejection = AuthorityError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SharedState,
    ) -> Result<Self, AuthorityError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| Params(value))
            .map_err(|rejection: QueryRejection| AuthorityError::invalid(rejection.body_text()))
    }
}

/// Proof that the request carried the admin token.
pub struct Admin;

impl FromRequestParts<SharedState> for Admin {
    type Rejection = AuthorityError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SharedState,
    ) -> Result<Admin, AuthorityError> {
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim);
        match presented {
            Some(token) if constant_time_eq(token.as_bytes(), state.admin_token.as_bytes()) => {
                Ok(Admin)
            }
            _ => Err(AuthorityError::Unauthorized),
        }
    }
}

// ---- handlers -------------------------------------------------------------------------------

async fn healthz(State(state): State<SharedState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        vendor_key: state.vendor.public_key().fingerprint(),
    })
}

/// The vendor public key file, for customers to pass to `tessera server --trust`.
async fn vendor_pub(State(state): State<SharedState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        state.vendor_pub_text.clone(),
    )
}

async fn add_customer(
    State(state): State<SharedState>,
    _admin: Admin,
    Body(request): Body<NewCustomer>,
) -> Result<(StatusCode, Json<CustomerInfo>), AuthorityError> {
    let customer = state
        .run(move |db, _, now_ms| {
            registry::add_customer(db, &request.name, request.online_certificate_days, now_ms)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(customer)))
}

async fn set_customer(
    State(state): State<SharedState>,
    _admin: Admin,
    Path(name): Path<String>,
    Body(request): Body<CustomerSettings>,
) -> Result<Json<CustomerInfo>, AuthorityError> {
    Ok(Json(
        state
            .run(move |db, _, _| registry::set_customer(db, &name, request.online_certificate_days))
            .await?,
    ))
}

async fn list_customers(
    State(state): State<SharedState>,
    _admin: Admin,
) -> Result<Json<Vec<CustomerInfo>>, AuthorityError> {
    Ok(Json(
        state.run(|db, _, _| registry::list_customers(db)).await?,
    ))
}

async fn add_server(
    State(state): State<SharedState>,
    _admin: Admin,
    Body(request): Body<NewServer>,
) -> Result<(StatusCode, Json<ServerInfo>), AuthorityError> {
    let server = state
        .run(move |db, _, now_ms| {
            registry::add_server(db, &request.customer, request.create_customer, now_ms)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(server)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerFilter {
    customer: Option<String>,
}

async fn list_servers(
    State(state): State<SharedState>,
    _admin: Admin,
    Params(filter): Params<ServerFilter>,
) -> Result<Json<Vec<ServerInfo>>, AuthorityError> {
    Ok(Json(
        state
            .run(move |db, _, _| registry::list_servers(db, filter.customer.as_deref()))
            .await?,
    ))
}

async fn get_server(
    State(state): State<SharedState>,
    _admin: Admin,
    Path(server_id): Path<String>,
) -> Result<Json<ServerInfo>, AuthorityError> {
    let server_id = normalize_server_id(&server_id);
    Ok(Json(
        state
            .run(move |db, _, _| registry::server_info(&crate::store::server(db, &server_id)?))
            .await?,
    ))
}

async fn reset_server(
    State(state): State<SharedState>,
    _admin: Admin,
    Path(server_id): Path<String>,
) -> Result<Json<ServerInfo>, AuthorityError> {
    let server_id = normalize_server_id(&server_id);
    Ok(Json(
        state
            .run(move |db, _, now_ms| registry::reset_server(db, &server_id, now_ms))
            .await?,
    ))
}

async fn issue_key(
    State(state): State<SharedState>,
    _admin: Admin,
    Body(mut request): Body<IssueKey>,
) -> Result<(StatusCode, Json<LicenseKey>), AuthorityError> {
    request.server_id = normalize_server_id(&request.server_id);
    let key = state
        .run(move |db, vendor, now_ms| registry::issue_key(db, vendor, &request, now_ms))
        .await?;
    Ok((StatusCode::CREATED, Json(key)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFilter {
    server_id: Option<String>,
}

async fn list_keys(
    State(state): State<SharedState>,
    _admin: Admin,
    Params(filter): Params<KeyFilter>,
) -> Result<Json<Vec<KeyInfo>>, AuthorityError> {
    let server_id = filter.server_id.as_deref().map(normalize_server_id);
    Ok(Json(
        state
            .run(move |db, _, _| registry::list_keys(db, server_id.as_deref()))
            .await?,
    ))
}

/// The key file exactly as signed.
async fn get_key(
    State(state): State<SharedState>,
    _admin: Admin,
    Path(key_id): Path<String>,
) -> Result<Json<LicenseKey>, AuthorityError> {
    Ok(Json(
        state
            .run(move |db, _, _| Ok(crate::store::key(db, &key_id)?.key))
            .await?,
    ))
}

async fn renew_key(
    State(state): State<SharedState>,
    _admin: Admin,
    Path(key_id): Path<String>,
    Body(request): Body<RenewKey>,
) -> Result<(StatusCode, Json<LicenseKey>), AuthorityError> {
    let key = state
        .run(move |db, vendor, now_ms| registry::renew_key(db, vendor, &key_id, &request, now_ms))
        .await?;
    Ok((StatusCode::CREATED, Json(key)))
}

async fn revoke_key(
    State(state): State<SharedState>,
    _admin: Admin,
    Path(key_id): Path<String>,
) -> Result<Json<KeyInfo>, AuthorityError> {
    Ok(Json(
        state
            .run(move |db, _, now_ms| registry::revoke_key(db, &key_id, now_ms))
            .await?,
    ))
}

/// Clones and rollbacks detected at syncs, and the vendor's resets, newest first.
async fn list_alerts(
    State(state): State<SharedState>,
    _admin: Admin,
) -> Result<Json<Vec<AlertInfo>>, AuthorityError> {
    Ok(Json(
        state.run(|db, _, _| crate::chain::list_alerts(db)).await?,
    ))
}

/// Online sync: no admin token, the request's own signature and the binding are the proof.
async fn sync(
    State(state): State<SharedState>,
    Body(request): Body<SyncRequest>,
) -> Result<Json<SyncResponse>, AuthorityError> {
    Ok(Json(
        state
            .run(move |db, vendor, now_ms| {
                crate::sync::answer(db, vendor, &request, crate::sync::Channel::Online, now_ms)
            })
            .await?,
    ))
}

/// Sync by file: the vendor submits a request file received from an air-gapped site. Same
/// rules as online; the admin token only guards who may act as the mail room.
async fn process(
    State(state): State<SharedState>,
    _admin: Admin,
    Body(request): Body<SyncRequest>,
) -> Result<Json<SyncResponse>, AuthorityError> {
    Ok(Json(
        state
            .run(move |db, vendor, now_ms| {
                crate::sync::answer(db, vendor, &request, crate::sync::Channel::File, now_ms)
            })
            .await?,
    ))
}

async fn no_route(request: Request) -> AuthorityError {
    AuthorityError::NoRoute {
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
    }
}

async fn method_not_allowed(request: Request) -> AuthorityError {
    AuthorityError::MethodNotAllowed {
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
    }
}
