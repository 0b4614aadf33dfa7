//! The HTTP API: routes, extractors and handlers. Handlers translate JSON to calls on
//! [`AppState`](crate::state::AppState) and back; the status mapping lives in [`crate::error`].

mod admin;
pub mod domain;
pub mod forward;
mod leases;
mod neighbours;
mod openapi;
pub mod pair;
mod sync;

use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use tessera_api::Health;

use crate::error::ApiError;
use crate::metrics::RouteLabel;
use crate::state::SharedState;

pub use crate::extract::{Admin, ApiQuery};
pub use openapi::openapi_json;

pub fn router(state: SharedState) -> Router {
    let body_limit_bytes = state.config.body_limit_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi::serve))
        .route("/v1/status", get(status))
        .route("/v1/domain", get(domain::status))
        .route("/v1/domain/hosts", post(domain::add_host))
        .route("/v1/domain/hosts/{host}", delete(domain::remove_host))
        .route("/v1/pair", get(pair::status))
        .route("/v1/pair/enable", post(pair::enable))
        .route("/v1/pair/disable", post(pair::disable))
        .route("/v1/pair/sync", post(pair::sync))
        .route("/v1/pair/rpc/{rpc}", post(pair::rpc))
        .route("/v1/leases", post(leases::checkout).get(leases::list))
        .route("/v1/leases/{lease_id}/heartbeat", post(leases::heartbeat))
        .route("/v1/leases/{lease_id}", delete(leases::checkin))
        .route("/v1/leases/{lease_id}/release", post(admin::force_release))
        .route("/v1/keys", post(admin::import_key).get(admin::list_keys))
        .route("/v1/keys/update", post(admin::update_keys))
        .route("/v1/keys/{key_id}/allocate", post(admin::allocate_key))
        .route("/v1/groups", get(admin::list_groups))
        .route("/v1/groups/{name}", axum::routing::put(admin::set_group))
        .route("/v1/events", get(admin::events))
        .route(
            "/v1/keys/{key_id}",
            get(admin::export_key).delete(admin::remove_key),
        )
        .route("/v1/identity", get(neighbours::identity))
        .route("/v1/neighbours/components", post(neighbours::components))
        .route("/v1/neighbours", get(neighbours::list))
        // Signed by the sending server (no admin token); a push carries every grant with its
        // key, so these take larger bodies: from configured neighbours only (`body_gate`).
        .route(
            "/v1/neighbours/grants",
            post(neighbours::receive_grants)
                .layer(DefaultBodyLimit::max(
                    crate::neighbours::LINK_BODY_LIMIT_BYTES.max(body_limit_bytes),
                ))
                .layer(middleware::from_fn_with_state(
                    state.clone(),
                    neighbours::body_gate,
                )),
        )
        .route(
            "/v1/neighbours/renew",
            post(neighbours::renew)
                .layer(DefaultBodyLimit::max(
                    crate::neighbours::LINK_BODY_LIMIT_BYTES.max(body_limit_bytes),
                ))
                .layer(middleware::from_fn_with_state(
                    state.clone(),
                    neighbours::body_gate,
                )),
        )
        .route(
            "/v1/donations",
            post(neighbours::donate).get(neighbours::donations),
        )
        .route(
            "/v1/donations/{key_id}/{to}",
            delete(neighbours::end_donation),
        )
        .route("/v1/sync", get(sync::status).post(sync::sync_now))
        .route("/v1/sync/request", post(sync::export_request))
        .route("/v1/sync/response", post(sync::import_response))
        .route(
            "/v1/reports/usage",
            get(crate::console::reports::usage_report),
        )
        .route(
            "/v1/audit/verify",
            get(crate::console::reports::audit_verify),
        )
        .merge(test_routes())
        .merge(crate::console::router())
        // A known path with a method it does not serve: 405 with `Allow` (axum sets it) and
        // the JSON error body.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(no_route)
        .layer(middleware::map_response_with_state(
            state.clone(),
            crate::console::security_headers,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::console::reports::audit_admin_requests,
        ))
        // In a domain, a backup forwards writes to the primary (no-op for a single host).
        .layer(middleware::from_fn_with_state(
            state.clone(),
            forward::forward_writes,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            record_latency,
        ))
        .layer(DefaultBodyLimit::max(body_limit_bytes))
        .with_state(state)
}

async fn record_latency(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    state
        .metrics
        .requests
        .get_or_create(&RouteLabel { method, route })
        .observe(started.elapsed().as_secs_f64());
    response
}

/// `POST /v1/test/clock` in debug builds (the tests of real processes); no such route in a
/// release build.
fn test_routes() -> Router<SharedState> {
    #[cfg(debug_assertions)]
    {
        Router::new().route("/v1/test/clock", post(advance_test_clock))
    }
    #[cfg(not(debug_assertions))]
    {
        Router::new()
    }
}

#[cfg(debug_assertions)]
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AdvanceClock {
    advance_ms: i64,
}

/// Moves the test clock of a server started with `--test-clock` (404 otherwise).
#[cfg(debug_assertions)]
async fn advance_test_clock(
    State(state): State<SharedState>,
    _admin: crate::extract::Admin,
    crate::extract::ApiJson(body): crate::extract::ApiJson<AdvanceClock>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let Some(clock) = &state.config.test_clock else {
        return Err(ApiError::NoRoute {
            path: "/v1/test/clock (the server was not started with --test-clock)".into(),
        });
    };
    if !(0..=400 * 86_400_000).contains(&body.advance_ms) {
        return Err(ApiError::BadRequest {
            code: "invalid_request",
            message: "advance_ms must be 0 to 400 days".into(),
        });
    }
    clock.advance_ms(body.advance_ms);
    Ok(axum::Json(
        serde_json::json!({"now_ms": tessera_core::Clock::now_ms(clock)}),
    ))
}

/// Under `peer_mtls`: the routes only the other hosts of the domain or pair call (Raft,
/// pair RPCs) refuse a connection that showed no certificate from the domain's CA (401
/// `peer_certificate_required`), before anything else looks at the request.
pub async fn require_peer_certificate(request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let peer_only = path.starts_with("/v1/raft/") || path.starts_with("/v1/pair/rpc/");
    let certified = request
        .extensions()
        .get::<axum::extract::ConnectInfo<tessera_tls::Client>>()
        .is_some_and(|info| info.0.certified);
    if peer_only && !certified {
        return ApiError::PeerCertificateRequired.into_response();
    }
    next.run(request).await
}

async fn no_route(request: Request) -> ApiError {
    ApiError::NoRoute {
        path: request.uri().path().to_string(),
    }
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::MethodNotAllowed {
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
    }
}

#[utoipa::path(get, path = "/healthz", responses(
    (status = 200, description = "this host serves stations now", body = Health),
    (status = 503, description = "it cannot: no_quorum or pair_recovering", body = Health),
))]
async fn healthz(State(state): State<SharedState>) -> (StatusCode, axum::Json<Health>) {
    use crate::pair::Mode;
    let (status, role) = match state.pair.mode() {
        Mode::Alone => ("ok", "alone"),
        Mode::Recovering => ("pair_recovering", state.role().as_str()),
        Mode::Off | Mode::Paired => {
            let me = state.consensus.node_id();
            let serving = state
                .consensus
                .domain_view()
                .iter()
                .any(|host| host.host == me && host.healthy);
            (
                if serving { "ok" } else { "no_quorum" },
                state.role().as_str(),
            )
        }
    };
    let code = if status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        axum::Json(Health {
            status: status.into(),
            role: role.into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }),
    )
}

/// Prometheus / OpenMetrics text: licenses, leases, sync deadline, request latencies.
#[utoipa::path(get, path = "/metrics", responses(
    (status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String),
))]
async fn metrics(State(state): State<SharedState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.render_metrics(),
    )
}

/// `GET /v1/status` query.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatusQuery {
    /// Counts only: no leases and no holders (`leases_total` and each component's
    /// `holders_total` still count them). Costs the same at 1 lease or 1,000,000.
    pub summary: Option<bool>,
}

/// Keys, components, leases and sync state. Without the admin token the lease ids are left
/// out: counts, stations and users are shown, never what would let a caller end or extend
/// another station's lease. Summary-sized: at most 100 leases (`leases_total` counts them
/// all), and at most 100 holders per component (`holders_total`); `GET /v1/leases` pages
/// through the rest. A lease is a holder of every component its key covers.
#[utoipa::path(get, path = "/v1/status", params(StatusQuery), security((), ("admin_token" = [])), responses(
    (status = 200, body = tessera_api::Status),
    (status = 400, description = "invalid_query: a summary that is not true or false", body = tessera_api::ErrorBody),
))]
async fn status(
    State(state): State<SharedState>,
    headers: axum::http::HeaderMap,
    crate::extract::ApiQuery(query): crate::extract::ApiQuery<StatusQuery>,
) -> axum::Json<tessera_api::Status> {
    let mut status = state.status_with(query.summary.unwrap_or(false));
    if !crate::extract::is_admin(&headers, &state) {
        for lease in &mut status.leases {
            lease.lease_id.clear();
        }
        for component in &mut status.components {
            for holder in &mut component.holders {
                holder.lease_id.clear();
            }
        }
    }
    axum::Json(status)
}
