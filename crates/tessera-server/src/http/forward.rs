//! Every host of a domain answers: a backup receiving a write (any POST/PUT/PATCH/DELETE
//! under `/v1/`) proxies it to the primary and relays the answer; reads are served locally.
//!
//! - One hop at most: the forwarded request carries [`FORWARDED_HEADER`]; a host receiving
//!   one while not primary (leadership just moved) answers 503 `not_primary` instead of
//!   forwarding again, and the client retries.
//! - On the primary, a write that fails with `not_primary` (leadership moved while it was in
//!   flight, e.g. a transfer to a lower-numbered host) is forwarded once to the new primary,
//!   so a transfer does not drop requests. Every write is safe to repeat: checkout is
//!   idempotent per station, heartbeat never shortens a lease, checkin of a released lease
//!   is `lease_not_found`.
//! - No primary known, or the primary unreachable: 503 `no_quorum`. Such a host never
//!   issues anything itself; only a leader holding a majority commits.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::consensus::ConsensusError;
use crate::domain::FORWARDED_HEADER;
use crate::error::ApiError;
use crate::state::SharedState;

/// How long a backup waits for a primary to become known before answering `no_quorum`.
pub const PRIMARY_WAIT: Duration = Duration::from_millis(1_000);
/// The same wait on a host of a redundant pair.
pub const PAIR_PRIMARY_WAIT: Duration = Duration::from_millis(100);
/// A forwarded write waits at most this long for the primary's answer (its proposal times
/// out after 5 s).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(7);

/// Whether the forwarding middleware treats the request as a write (the OpenAPI document
/// uses it too).
pub fn is_write(method: &Method, path: &str) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) && path.starts_with("/v1/")
        && !path.starts_with("/v1/raft/")
        && !path.starts_with("/v1/pair/rpc/")
}

/// The server-to-server routes, which take larger bodies.
fn request_path_is_link(path: &str) -> bool {
    path == "/v1/neighbours/grants" || path == "/v1/neighbours/renew"
}

/// Whether this server is a host of a domain of several hosts (configured so, or grown so
/// by `domain add-host` / `pair enable`).
pub fn in_domain(state: &SharedState) -> bool {
    state
        .config
        .domain
        .as_ref()
        .is_some_and(|domain| domain.is_multi_host())
        || state.consensus.voter_ids().len() > 1
}

/// The middleware (only does anything in a domain of several hosts).
pub async fn forward_writes(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    if !in_domain(&state) || !is_write(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    // A pair's host serving alone (or merging) answers itself: see `crate::pair`.
    if matches!(
        state.pair.mode(),
        crate::pair::Mode::Alone | crate::pair::Mode::Recovering
    ) {
        return next.run(request).await;
    }
    let forwarded = request.headers().contains_key(FORWARDED_HEADER);
    let (parts, body) = request.into_parts();
    let limit = if request_path_is_link(parts.uri.path()) {
        crate::neighbours::LINK_BODY_LIMIT_BYTES.max(state.config.body_limit_bytes)
    } else {
        state.config.body_limit_bytes
    };
    let Ok(bytes) = axum::body::to_bytes(body, limit).await else {
        return ApiError::PayloadTooLarge { limit_bytes: limit }.into_response();
    };
    let (method, uri, headers) = (
        parts.method.clone(),
        parts.uri.clone(),
        parts.headers.clone(),
    );
    if !state.consensus.is_primary() {
        if forwarded {
            let primary = state.consensus.primary();
            return ApiError::Consensus(ConsensusError::NotPrimary { primary }).into_response();
        }
        return forward(&state, method, uri, headers, bytes).await;
    }
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes.clone())))
        .await;
    // Did leadership move while the write was in flight? (The answer's typed code, not its
    // body.)
    if forwarded || !is_not_primary(&response) {
        return response;
    }
    forward(&state, method, uri, headers, bytes).await
}

/// Whether an answer is this host's `not_primary` refusal (leadership moved while the write
/// was in flight), by its typed code.
fn is_not_primary(response: &Response) -> bool {
    response.extensions().get::<crate::error::ErrorCode>()
        == Some(&crate::error::ErrorCode("not_primary"))
}

async fn forward(
    state: &SharedState,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let me = state.config.domain.as_ref().map(|d| d.host).unwrap_or(1);
    // A pair's host does not wait long: without the other host it serves alone soon.
    let wait = if state.pair.mode() == crate::pair::Mode::Off {
        PRIMARY_WAIT
    } else {
        PAIR_PRIMARY_WAIT
    };
    let primary = match state.consensus.primary() {
        Some((id, addr)) if id != me => Some((id, addr)),
        _ => state
            .consensus
            .wait_primary(wait)
            .await
            .filter(|(id, _)| *id != me),
    };
    let Some((primary_id, primary_addr)) = primary else {
        return ApiError::Consensus(ConsensusError::NoQuorum).into_response();
    };
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| uri.path().to_string());
    let url = state.peer_url(&primary_addr, &path);
    let Ok(reqwest_method) = reqwest::Method::from_bytes(method.as_str().as_bytes()) else {
        return ApiError::Internal(format!("cannot forward method {method}")).into_response();
    };
    let mut request = state
        .peer_http
        .request(reqwest_method, &url)
        .timeout(FORWARD_TIMEOUT)
        .header(FORWARDED_HEADER, me.to_string())
        .body(body);
    for name in [header::CONTENT_TYPE, header::AUTHORIZATION, header::ACCEPT] {
        if let Some(value) = headers.get(&name).and_then(|v| v.to_str().ok()) {
            request = request.header(name.as_str(), value);
        }
    }
    for name in [
        super::leases::LEASE_SECRET_HEADER,
        super::leases::LEASE_NONCE_HEADER,
    ] {
        if let Some(value) = headers.get(name).and_then(|v| v.to_str().ok()) {
            request = request.header(name, value);
        }
    }
    let answer = match request.send().await {
        Ok(answer) => answer,
        Err(error) => {
            tracing::debug!(%error, primary = primary_id, "forwarding to the primary failed");
            return no_quorum_unreachable(primary_id, &primary_addr);
        }
    };
    let status =
        StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let content_type = answer
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
    let location = answer
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
    let Ok(bytes) = answer.bytes().await else {
        return no_quorum_unreachable(primary_id, &primary_addr);
    };
    let mut response = (status, bytes).into_response();
    if let Some(content_type) = content_type {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type);
    }
    // A checkout redirected to a neighbour (`component_elsewhere`).
    if let Some(location) = location {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

fn no_quorum_unreachable(primary: u64, addr: &str) -> Response {
    let body = tessera_api::ErrorBody {
        error: tessera_api::ErrorDetail {
            code: "no_quorum".into(),
            message: format!(
                "this host is a backup and cannot reach the primary (host {primary} at {addr}); no license is issued here without a majority of the domain"
            ),
        },
    };
    (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use axum::response::IntoResponse;

    use super::is_not_primary;
    use crate::consensus::ConsensusError;
    use crate::error::ApiError;

    #[test]
    fn not_primary_is_recognised_by_its_typed_code_not_by_a_body_saying_so() {
        let moved = ApiError::Consensus(ConsensusError::NotPrimary { primary: None });
        assert!(is_not_primary(&moved.into_response()));
        let other = ApiError::Consensus(ConsensusError::NoQuorum);
        assert!(!is_not_primary(&other.into_response()));
        // A handler's own body naming the code (a forwarded answer, say) is not the refusal.
        let lookalike = (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            r#"{"error":{"code":"not_primary","message":"m"}}"#,
        )
            .into_response();
        assert!(!is_not_primary(&lookalike));
    }
}
