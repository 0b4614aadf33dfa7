//! The routes peers call: `POST /v1/raft/{append,vote,pre-vote,snapshot,transfer-leader}`.
//! Each answers 200 with the JSON of `Result<Response, RaftError>`, as openraft's API
//! returns it; a malformed request is a 400 naming what is wrong. Bodies are parsed with
//! `serde_json::from_slice` directly: axum's `Json` extractor tracks the path of every
//! field for its error messages, which cost a follower a tenth of its CPU under load.
//!
//! `snapshot` takes `application/octet-stream`: one JSON line `{"vote":..,"meta":..}`, a
//! newline, then the snapshot data (the ledger snapshot's JSON) as stored.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use openraft::Snapshot;
use openraft::errors::RaftError;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use tessera_store::TypeConfig;

use std::sync::Arc;

use super::RaftNode;
use super::auth::{AUTH_HEADER, DomainKey, LENGTH_HEADER};
use super::pair_link::{MODE_HEADER, Mode, PAIR_ALONE_CODE, PairLink};

/// Largest Raft request accepted: a full snapshot of a big ledger arrives in one body.
pub const RAFT_BODY_BYTES_MAX: usize = 1 << 30;
/// Largest Raft request read without a valid [`LENGTH_HEADER`] (a peer of an older version
/// sends none): a batch of appends fits; a large snapshot needs the header.
pub const UNVOUCHED_BODY_BYTES_MAX: usize = 1 << 20;

#[derive(Serialize, Deserialize)]
pub(super) struct SnapshotHeader {
    pub vote: openraft::type_config::alias::VoteOf<TypeConfig>,
    pub meta: openraft::type_config::alias::SnapshotMetaOf<TypeConfig>,
}

type Answer<T> = Json<Result<T, RaftError<TypeConfig>>>;

pub(super) fn router(raft: RaftNode, key: Option<DomainKey>, link: Arc<PairLink>) -> Router {
    let router = Router::new()
        .route("/v1/raft/append", post(append))
        .route("/v1/raft/vote", post(vote))
        .route("/v1/raft/pre-vote", post(pre_vote))
        .route("/v1/raft/snapshot", post(snapshot))
        .route("/v1/raft/transfer-leader", post(transfer_leader))
        .with_state(raft)
        .layer(middleware::from_fn_with_state(link, pair_gate));
    let router = match key {
        Some(key) => router.layer(middleware::from_fn_with_state(key, authenticate)),
        None => router,
    };
    router.layer(DefaultBodyLimit::max(RAFT_BODY_BYTES_MAX))
}

/// A pair's host serving alone refuses every Raft RPC (503 `pair_alone`): its log must not
/// move while it issues from its share, and the other host learns from the refusal that it
/// is reachable and alone. Any RPC answered normally counts as contact with the other host.
async fn pair_gate(State(link): State<Arc<PairLink>>, request: Request, next: Next) -> Response {
    if let Some(mode) = request
        .headers()
        .get(MODE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(Mode::parse)
    {
        link.peer_mode_seen(mode);
    }
    let gate = link.gate.read().await;
    let mut response = if *gate {
        link.reached_while_alone();
        let body = serde_json::json!({"error": {"code": PAIR_ALONE_CODE, "message":
            "this host of the pair serves alone until the other host merges what it did"}});
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    } else {
        let response = next.run(request).await;
        if response.status().is_success() {
            link.heard();
        }
        response
    };
    drop(gate);
    response.headers_mut().insert(
        MODE_HEADER,
        axum::http::HeaderValue::from_static(link.own_mode().name()),
    );
    response
}

/// Refuses (401, JSON error body) an RPC whose `x-tessera-raft-auth` tag does not match the
/// body under the domain secret; passes the body on unchanged otherwise.
async fn authenticate(State(key): State<DomainKey>, request: Request, next: Next) -> Response {
    let refuse = |status: StatusCode, code: &str, message: String| {
        let body = serde_json::json!({"error": {"code": code, "message": message}});
        (status, Json(body)).into_response()
    };
    let (parts, body) = request.into_parts();
    let rpc = parts
        .uri
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let tag = parts
        .headers
        .get(AUTH_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // Before reading: a body larger than a batch of appends is read only when the sender
    // vouched for its length with the domain secret.
    let length = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let vouched = match (length, parts.headers.get(LENGTH_HEADER)) {
        (Some(length), Some(tag)) => tag
            .to_str()
            .is_ok_and(|tag| key.verify_length(&rpc, length, tag))
            .then_some(length),
        _ => None,
    };
    let limit = match vouched {
        Some(length) if length <= RAFT_BODY_BYTES_MAX as u64 => length as usize,
        Some(length) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "a Raft request of {length} bytes is over the limit of {RAFT_BODY_BYTES_MAX}"
                ),
            );
        }
        None if length.is_some_and(|length| length > UNVOUCHED_BODY_BYTES_MAX as u64) => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!(
                    "a Raft request over {UNVOUCHED_BODY_BYTES_MAX} bytes needs {LENGTH_HEADER} for its Content-Length: the sender does not hold this domain's domain_secret"
                ),
            );
        }
        None => UNVOUCHED_BODY_BYTES_MAX,
    };
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => bytes,
        Err(e) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("cannot read the Raft request body (at most {limit} bytes here): {e}"),
            );
        }
    };
    match tag {
        Some(tag) if key.verify(&rpc, &bytes, &tag) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Some(_) => refuse(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!(
                "{AUTH_HEADER} does not match: the sender does not hold this domain's domain_secret"
            ),
        ),
        None => refuse(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("Raft requests between the hosts of a domain must carry {AUTH_HEADER}"),
        ),
    }
}

type Refusal = (StatusCode, String);

/// The request body as `T`, or a 400 naming the RPC and what is wrong.
fn parse<T: serde::de::DeserializeOwned>(rpc: &str, body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("malformed Raft {rpc} request: {e}"),
        )
    })
}

async fn append(
    State(raft): State<RaftNode>,
    body: Bytes,
) -> Result<Answer<AppendEntriesResponse<TypeConfig>>, Refusal> {
    let request: AppendEntriesRequest<TypeConfig> = parse("append", &body)?;
    Ok(Json(raft.append_entries(request).await))
}

async fn vote(
    State(raft): State<RaftNode>,
    body: Bytes,
) -> Result<Answer<VoteResponse<TypeConfig>>, Refusal> {
    let request: VoteRequest<TypeConfig> = parse("vote", &body)?;
    Ok(Json(raft.vote(request).await))
}

async fn pre_vote(
    State(raft): State<RaftNode>,
    body: Bytes,
) -> Result<Answer<VoteResponse<TypeConfig>>, Refusal> {
    let request: VoteRequest<TypeConfig> = parse("pre-vote", &body)?;
    Ok(Json(raft.pre_vote(request).await))
}

async fn snapshot(
    State(raft): State<RaftNode>,
    body: Bytes,
) -> Result<Answer<SnapshotResponse<TypeConfig>>, Refusal> {
    let bad = |message: String| (StatusCode::BAD_REQUEST, message);
    let newline = body
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| bad("snapshot body has no header line".into()))?;
    let header: SnapshotHeader = serde_json::from_slice(&body[..newline])
        .map_err(|e| bad(format!("snapshot header: {e}")))?;
    let snapshot = Snapshot {
        meta: header.meta,
        snapshot: body[newline + 1..].to_vec(),
    };
    let answer = raft
        .install_full_snapshot(header.vote, snapshot)
        .await
        .map_err(RaftError::Fatal);
    Ok(Json(answer))
}

async fn transfer_leader(
    State(raft): State<RaftNode>,
    body: Bytes,
) -> Result<Answer<TransferLeaderResponse<TypeConfig>>, Refusal> {
    let request: TransferLeaderRequest<TypeConfig> = parse("transfer-leader", &body)?;
    Ok(Json(
        raft.handle_transfer_leader(request)
            .await
            .map_err(RaftError::Fatal),
    ))
}
