//! The redundant pair's routes.
//!
//! - `GET /v1/pair`: this host's view (pair status, each host's status, mode, journal).
//! - `POST /v1/pair/enable` `{"backup":"HOST:PORT","backup_percent":50}` (admin, on the
//!   primary): checks the backup's requirements, adds it as the second voter, splits the
//!   licenses. `POST /v1/pair/disable` (admin): only once no key is active.
//!   `POST /v1/pair/sync` (admin): brings a pair that is not in sync back (split set again,
//!   shares rebalanced).
//! - `POST /v1/pair/rpc/{candidate,handover,stopping,history}`: between the hosts, signed with
//!   the domain secret (`x-tessera-pair-auth`).

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use serde::Deserialize;
use tessera_core::Command;

use crate::error::ApiError;
use crate::extract::{Admin, ApiBytes, ApiJson, ApiPath};
use crate::pair::{Candidate, Mode, PAIR_AUTH_HEADER, PairStatus};
use crate::state::SharedState;
use tessera_api::ErrorBody;

/// The backup's share when `enable` does not say.
pub const DEFAULT_BACKUP_PERCENT: u8 = 50;

/// A request this server's configuration or state refuses (409).
fn refused(code: &'static str, message: String) -> ApiError {
    ApiError::Conflict { code, message }
}

fn invalid(message: String) -> ApiError {
    ApiError::BadRequest {
        code: "invalid_request",
        message,
    }
}

/// This host's view of the redundant pair (a single server: `Not paired`, mode `off`).
#[utoipa::path(get, path = "/v1/pair", responses((status = 200, body = PairStatus)))]
pub async fn status(State(state): State<SharedState>) -> Json<PairStatus> {
    Json(state.pair.status(&state))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnableRequest {
    /// `HOST:PORT` of the backup, started with `--join` and the same domain secret.
    #[schema(pattern = ":")]
    pub backup: String,
    /// The backup's share of each key's licenses, in percent (default 50).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100)]
    pub backup_percent: Option<u8>,
}

/// Make this single server the primary of a redundant pair with the backup at `backup`.
#[utoipa::path(post, path = "/v1/pair/enable", request_body = EnableRequest, security(("admin_token" = [])), responses(
    (status = 200, description = "the pair status afterwards", body = PairStatus),
    (status = 400, description = "malformed_json, invalid_json, invalid_request (backup_percent over 100, backup not HOST:PORT)", body = ErrorBody),
    (status = 409, description = "pair_requirements: no domain_secret here, already several hosts, the backup unreachable or not fit (keys activated, ran before, same host number)", body = ErrorBody),
    (status = 415, description = "unsupported_media_type: not Content-Type application/json", body = ErrorBody),
    (status = 503, description = "no_quorum, not_primary: the membership change did not complete", body = ErrorBody),
))]
pub async fn enable(
    State(state): State<SharedState>,
    _admin: Admin,
    ApiJson(request): ApiJson<EnableRequest>,
) -> Result<Json<PairStatus>, ApiError> {
    let percent = request.backup_percent.unwrap_or(DEFAULT_BACKUP_PERCENT);
    if percent > 100 {
        return Err(invalid(format!(
            "backup_percent {percent} is not a percentage (0 to 100)"
        )));
    }
    if !request.backup.contains(':') {
        return Err(invalid(format!(
            "backup {:?} must be HOST:PORT",
            request.backup
        )));
    }
    if state.config.domain_secret.is_none() {
        return Err(refused(
            "pair_requirements",
            "a pair needs the same domain_secret on both hosts: start this server with --domain-secret".into(),
        ));
    }
    let voters = state.consensus.voter_ids();
    if voters.len() > 1 {
        return Err(refused(
            "pair_requirements",
            format!(
                "this server already has {} hosts ({voters:?}); pair a single server",
                voters.len()
            ),
        ));
    }
    let candidate: Candidate = crate::pair::runtime::call(
        &state,
        &request.backup,
        "candidate",
        &serde_json::json!({"primary": state.consensus.node_id()}),
    )
    .await
    .map_err(|e| {
        refused(
            "pair_requirements",
            format!("cannot use {} as the backup: {e}", request.backup),
        )
    })?;
    if candidate.keys > 0 {
        return Err(refused(
            "pair_requirements",
            format!(
                "the backup at {} has {} license keys activated: deactivate them there first (tessera keys remove KEY --server http://{}, while it runs as it did before), then reset its server ID: stop it and start it on a fresh data directory with --join",
                request.backup, candidate.keys, request.backup
            ),
        ));
    }
    if candidate.last_log_index.is_some() || !candidate.voters.is_empty() {
        return Err(refused(
            "pair_requirements",
            format!(
                "the backup at {} ran as a license server before (server ID {}): reset its server ID first: stop it and start it on a fresh data directory with --join",
                request.backup,
                candidate.server_id.as_deref().unwrap_or("unknown")
            ),
        ));
    }
    if voters.contains(&candidate.host) {
        return Err(refused(
            "pair_requirements",
            format!(
                "the backup at {} has host number {}, the same as this server: give it another (--host)",
                request.backup, candidate.host
            ),
        ));
    }
    state
        .consensus
        .add_host(candidate.host, &request.backup)
        .await?;
    set_split(&state, Some(percent)).await?;
    wait_paired(&state).await;
    Ok(Json(state.pair.status(&state)))
}

/// Waits until both hosts' pair loops (every [`crate::pair::PAIR_TICK`]) have taken up the
/// split, so that the status in the answer shows them paired, not still "off"; at most
/// [`PAIRED_WAIT`] (then the answer shows what is).
async fn wait_paired(state: &SharedState) {
    let paired = || {
        state.pair.mode() == Mode::Paired
            && state.consensus.pair_link().peer_mode() == Some(Mode::Paired)
    };
    let _ = tokio::time::timeout(PAIRED_WAIT, async {
        while !paired() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// How long `enable` waits for both hosts to serve as a pair: normally one or two pair ticks.
const PAIRED_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

async fn set_split(state: &SharedState, backup_percent: Option<u8>) -> Result<(), ApiError> {
    let at_ms = state.stamper.stamp_lenient();
    let command = Command::SetPairSplit { backup_percent };
    let _: tessera_core::answer::PairSplitSet =
        tessera_core::answer::expect(state.propose_at(at_ms, command).await)?;
    Ok(())
}

/// Undo the pair (only once no key is active): the other host leaves.
#[utoipa::path(post, path = "/v1/pair/disable", security(("admin_token" = [])), responses(
    (status = 200, description = "the pair status afterwards", body = PairStatus),
    (status = 409, description = "not_a_pair; pair_requirements: license keys are active", body = ErrorBody),
    (status = 503, description = "no_quorum, not_primary, pair_recovering", body = ErrorBody),
))]
pub async fn disable(
    State(state): State<SharedState>,
    _admin: Admin,
) -> Result<Json<PairStatus>, ApiError> {
    let me = state.consensus.node_id();
    let voters = state.consensus.voter_ids();
    let Some(other) = voters.iter().copied().find(|id| *id != me) else {
        return Err(refused(
            "not_a_pair",
            "this server is not one of a pair".into(),
        ));
    };
    if voters.len() != 2 {
        return Err(refused(
            "not_a_pair",
            "this server is a domain of several hosts, not a pair".into(),
        ));
    }
    let keys = state.read(|ledger| ledger.keys(i64::MIN).len());
    if keys > 0 {
        return Err(refused(
            "pair_requirements",
            format!(
                "the pair holds {keys} license keys: a pair with activated licenses cannot be undone; deactivate them first (tessera keys remove)"
            ),
        ));
    }
    set_split(&state, None).await?;
    state.consensus.remove_host(other).await?;
    Ok(Json(state.pair.status(&state)))
}

/// Bring a pair that is not in sync back: the split set again, the shares rebalanced.
#[utoipa::path(post, path = "/v1/pair/sync", security(("admin_token" = [])), responses(
    (status = 200, description = "the pair status afterwards", body = PairStatus),
    (status = 409, description = "not_a_pair", body = ErrorBody),
    (status = 503, description = "no_quorum, not_primary, pair_recovering", body = ErrorBody),
))]
pub async fn sync(
    State(state): State<SharedState>,
    _admin: Admin,
) -> Result<Json<PairStatus>, ApiError> {
    if state.consensus.voter_ids().len() != 2 {
        return Err(refused(
            "not_a_pair",
            "this server is not one of a pair".into(),
        ));
    }
    let percent = state
        .read(|ledger| ledger.pair_backup_percent())
        .unwrap_or(DEFAULT_BACKUP_PERCENT);
    set_split(&state, Some(percent)).await?;
    Ok(Json(state.pair.status(&state)))
}

/// Checks a pair RPC's signature (domain secret) over its name, time and body; refuses one
/// whose time is more than [`crate::pair::PAIR_RPC_WINDOW_MS`] from this host's clock, and
/// one seen before (a replay of a captured request).
fn verify(
    state: &SharedState,
    rpc: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(), ApiError> {
    let refuse = |message: String| ApiError::Neighbour {
        code: "unauthorized_peer",
        message,
    };
    let tag = headers
        .get(PAIR_AUTH_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let time_ms = headers
        .get(crate::pair::PAIR_TIME_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    let Some(time_ms) = time_ms else {
        return Err(refuse(format!(
            "{} is missing: pair RPCs carry the sender's time under their tag (both hosts must run this version)",
            crate::pair::PAIR_TIME_HEADER
        )));
    };
    if !state
        .consensus
        .verify(&crate::pair::rpc_tag_subject(rpc, time_ms), body, tag)
    {
        return Err(refuse(format!(
            "{PAIR_AUTH_HEADER} is missing or wrong: the sender does not hold this server's domain_secret"
        )));
    }
    let now_ms = state.stamper.now_ms();
    let window = crate::pair::PAIR_RPC_WINDOW_MS;
    if (now_ms - time_ms).abs() > window {
        return Err(refuse(format!(
            "the pair RPC was sent at {time_ms} ms, more than {} s from this host's clock ({now_ms} ms): a replay, or the hosts' clocks disagree",
            window / 1000
        )));
    }
    let mut seen = state
        .seen_pair_tags
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    while seen
        .front()
        .is_some_and(|(at, _)| *at < now_ms - 2 * window)
    {
        seen.pop_front();
    }
    if seen.iter().any(|(_, seen_tag)| seen_tag == tag) {
        return Err(refuse(
            "this pair RPC was received before: a replay is refused".into(),
        ));
    }
    seen.push_back((now_ms, tag.to_string()));
    Ok(())
}

/// Between the two hosts of a pair, authenticated with the domain secret: not for clients.
#[utoipa::path(post, path = "/v1/pair/rpc/{rpc}", params(
    ("rpc" = String, Path, description = "candidate, handover, stopping or history"),
    ("x-tessera-pair-auth" = String, Header, description = "hex HMAC-SHA256 with the domain secret of the rpc name, a space, the sender's time, a newline and the body"),
    ("x-tessera-pair-time" = i64, Header, description = "the sender's time (Unix ms); refused more than 30 s from the receiver's clock, and a second time"),
), request_body(content = Object, content_type = "application/json", description = "the RPC's message"), responses(
    (status = 200, description = "the RPC's answer", body = Object),
    (status = 400, description = "malformed_json: a history request that is not one; invalid_path", body = ErrorBody),
    (status = 403, description = "unauthorized_peer: the signature is missing or wrong (always, on a server without domain_secret)", body = ErrorBody),
    (status = 404, description = "no_route: no such RPC", body = ErrorBody),
    (status = 413, description = "body_too_large", body = ErrorBody),
    (status = 500, description = "internal: the history could not be read", body = ErrorBody),
))]
pub async fn rpc(
    State(state): State<SharedState>,
    ApiPath(rpc): ApiPath<String>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    verify(&state, &rpc, &headers, &body)?;
    let value = match rpc.as_str() {
        "candidate" => {
            let status = state.consensus.status();
            let keys = state.read(|ledger| ledger.keys(i64::MIN).len());
            let candidate = Candidate {
                host: state.consensus.node_id(),
                address: state
                    .consensus
                    .address(state.consensus.node_id())
                    .unwrap_or_default(),
                voters: status.voters,
                keys,
                last_log_index: status.last_log_index,
                server_id: state.config.server_id.clone(),
            };
            serde_json::to_value(candidate)
        }
        "handover" => serde_json::to_value(state.pair.handover(&state).await),
        "stopping" => {
            state.pair.peer_stopping(state.consensus.pair_link());
            Ok(serde_json::json!({}))
        }
        "history" => {
            let request: crate::peer_history::HistoryRequest = serde_json::from_slice(&body)
                .map_err(|e| ApiError::BadRequest {
                    code: "malformed_json",
                    message: format!("the history request is malformed: {e}"),
                })?;
            let answer = crate::peer_history::answer(&state, request)
                .await
                .map_err(|error| ApiError::Internal(error.to_string()))?;
            serde_json::to_value(answer)
        }
        other => {
            return Err(ApiError::NoRoute {
                path: format!("/v1/pair/rpc/{other}"),
            });
        }
    };
    value
        .map(Json)
        .map_err(|e| ApiError::Internal(e.to_string()))
}
