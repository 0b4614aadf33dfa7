//! The one error type of the authority, and the one table mapping it to HTTP.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tessera_core::sync::{SERVER_CLOCK_SKEWED, SERVER_CLONED, SERVER_ROLLED_BACK};

use crate::wire::{ErrorBody, ErrorDetail};

/// Everything that can go wrong, at start-up or in a request. Each variant has a stable
/// machine-readable code ([`AuthorityError::code`]); messages are for people and may change.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    // ---- start-up -------------------------------------------------------------------------
    #[error("data directory {path}: {message}")]
    DataDir { path: String, message: String },
    #[error("cannot read the listener's address: {0}")]
    Listen(std::io::Error),

    // ---- requests -------------------------------------------------------------------------
    #[error(
        "missing or wrong admin token: send Authorization: Bearer <token from DATA/admin.token>"
    )]
    Unauthorized,
    #[error("request body is larger than the limit of {limit_bytes} bytes")]
    BodyTooLarge { limit_bytes: usize },
    #[error("the request body is not valid JSON of the expected shape: {detail}")]
    MalformedJson { detail: String },
    #[error("{message}")]
    InvalidRequest { message: String },
    #[error("no route for {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("unknown customer {name:?}: add it first (`tessera authority customer add`)")]
    UnknownCustomer { name: String },
    #[error("customer {name:?} already exists")]
    CustomerExists { name: String },
    #[error("unknown license server ID {server_id:?}")]
    UnknownServer { server_id: String },
    #[error("unknown key {key_id:?}")]
    UnknownKey { key_id: String },
    #[error("key {key_id} is revoked: it cannot be renewed")]
    KeyRevoked { key_id: String },
    #[error(
        "key {key_id} already has renewal key {renewal_id}; revoke that one first to register another"
    )]
    RenewalExists { key_id: String, renewal_id: String },

    // ---- sync -----------------------------------------------------------------------------
    #[error("the sync request has an invalid signature: it was altered after it was signed")]
    BadSignature,
    #[error("unsupported sync request format `{format}` version {version}")]
    UnsupportedFormat { format: String, version: u32 },
    #[error(
        "license server ID {server_id} is in use by another key pair (bound to key {bound_fingerprint}, this request was signed by key {offered_fingerprint}); if the server was reinstalled, the vendor must reset the ID (`tessera authority server reset {server_id}`)"
    )]
    ServerIdInUse {
        server_id: String,
        bound_fingerprint: String,
        offered_fingerprint: String,
    },
    #[error(
        "sync request {sequence} for license server {server_id} is not above the last answered sequence {last_sequence}: it is replayed or stale; send a new request with sequence {next}",
        next = .last_sequence.saturating_add(1)
    )]
    ReplayedRequest {
        server_id: String,
        sequence: u64,
        last_sequence: u64,
    },

    #[error(
        "license server {server_id} is refused as a copy of its data: {detail}. The vendor resets the chain (`tessera authority server reset {server_id}`) once only the legitimate installation is left"
    )]
    ServerCloned { server_id: String, detail: String },
    #[error(
        "license server {server_id} is refused as rolled back: {detail}. The vendor resets the chain (`tessera authority server reset {server_id}`) once the server is accounted for"
    )]
    ServerRolledBack { server_id: String, detail: String },
    #[error(
        "license server {server_id}'s clock is wrong: its request says {stated}, the authority's clock {now} ({detail}). Correct the server's clock and sync again"
    )]
    ServerClockSkewed {
        server_id: String,
        stated: String,
        now: String,
        detail: String,
    },

    // ---- internal -------------------------------------------------------------------------
    #[error("storage: {0}")]
    Storage(#[from] rusqlite::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

impl AuthorityError {
    /// The mapping table: (HTTP status, stable code). Keep it the only one.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use AuthorityError as E;
        match self {
            E::DataDir { .. } | E::Listen(_) => (StatusCode::INTERNAL_SERVER_ERROR, "start_failed"),
            E::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            E::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            E::MalformedJson { .. } => (StatusCode::BAD_REQUEST, "malformed_json"),
            E::InvalidRequest { .. } => (StatusCode::BAD_REQUEST, "invalid_request"),
            E::NoRoute { .. } => (StatusCode::NOT_FOUND, "no_route"),
            E::MethodNotAllowed { .. } => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            E::UnknownCustomer { .. } => (StatusCode::NOT_FOUND, "unknown_customer"),
            E::CustomerExists { .. } => (StatusCode::CONFLICT, "customer_exists"),
            E::UnknownServer { .. } => (StatusCode::NOT_FOUND, "unknown_server"),
            E::UnknownKey { .. } => (StatusCode::NOT_FOUND, "unknown_key"),
            E::KeyRevoked { .. } => (StatusCode::CONFLICT, "key_revoked"),
            E::RenewalExists { .. } => (StatusCode::CONFLICT, "renewal_exists"),
            E::BadSignature => (StatusCode::UNPROCESSABLE_ENTITY, "bad_signature"),
            E::UnsupportedFormat { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "unsupported_format"),
            E::ServerIdInUse { .. } => (StatusCode::CONFLICT, "server_id_in_use"),
            E::ReplayedRequest { .. } => (StatusCode::CONFLICT, "replayed_request"),
            // The codes the license server recognizes (`tessera_core::sync`): keep them there.
            E::ServerCloned { .. } => (StatusCode::CONFLICT, SERVER_CLONED),
            E::ServerRolledBack { .. } => (StatusCode::CONFLICT, SERVER_ROLLED_BACK),
            E::ServerClockSkewed { .. } => (StatusCode::CONFLICT, SERVER_CLOCK_SKEWED),
            E::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage"),
            E::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    pub fn code(&self) -> &'static str {
        self.status_and_code().1
    }

    pub(crate) fn invalid(message: impl Into<String>) -> AuthorityError {
        AuthorityError::InvalidRequest {
            message: message.into(),
        }
    }
}

impl IntoResponse for AuthorityError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            // The client sees the code; the operator needs the detail.
            tracing::error!(error = %self, "request failed");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                message: self.to_string(),
            },
        };
        (status, axum::Json(body)).into_response()
    }
}
