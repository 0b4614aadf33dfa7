//! Errors, and the one place where outcomes and errors become HTTP statuses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tessera_api::{ErrorBody, ErrorDetail};
use tessera_core::Refusal;

use crate::consensus::ConsensusError;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration: {message}")]
    Config { message: String },
    #[error("data directory {path}: {message}")]
    DataDir { path: String, message: String },
    #[error("trusted vendor key {path}: {message}")]
    Trust { path: String, message: String },
    #[error("consensus: {0}")]
    Consensus(#[from] ConsensusError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// Everything an HTTP handler can answer other than success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("{0}")]
    Consensus(#[from] ConsensusError),
    #[error(
        "the clock reads {now} but this server already stamped {high_water}: the clock was set back; no licenses are issued until it is corrected"
    )]
    ClockSetBack { now: String, high_water: String },
    #[error(
        "the clock reads {now} but the vendor signed {vendor_time} at this server's last sync or key import: the clock is behind; no licenses are issued until it is corrected"
    )]
    ClockBehindVendor { now: String, vendor_time: String },
    #[error(
        "missing or wrong admin token: send Authorization: Bearer <token from DATA/admin.token>"
    )]
    Unauthorized,
    #[error(
        "this lease call needs the holder's credential: send the lease_secret of the checkout answer in the x-lease-secret header"
    )]
    LeaseSecretRequired,
    #[error(
        "x-lease-secret is not this lease's secret: only the station holding the lease may heartbeat or return it"
    )]
    LeaseSecretWrong,
    #[error(
        "this route is for the other hosts of the domain or pair, which show a certificate from the domain's CA (peer_mtls): this connection showed none"
    )]
    PeerCertificateRequired,
    #[error(
        "station {station:?} already holds a lease of this component: a checkout again needs the holder_key of the first one (its lease is not shown to others)"
    )]
    LeaseHeld { station: String },
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// A well-formed request that the server's present state refuses (409).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// A well-formed request naming something that does not exist (404).
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    #[error("this request needs a JSON body: send Content-Type: application/json ({message})")]
    UnsupportedMediaType { message: String },
    #[error("method {method} is not allowed on {path}: the Allow header lists those that are")]
    MethodNotAllowed { method: String, path: String },
    #[error("request body is larger than the limit of {limit_bytes} bytes")]
    PayloadTooLarge { limit_bytes: usize },
    #[error("the vendor authority refused: {code}: {message}")]
    Authority { code: String, message: String },
    #[error("cannot reach the vendor authority at {url}: {message}")]
    AuthorityUnreachable { url: String, message: String },
    #[error("no route {path}")]
    NoRoute { path: String },
    /// A neighbour server's message was refused (unknown, not allowed, bad signature, clock
    /// skew), or a donation names a neighbour that cannot receive it.
    #[error("{message}")]
    Neighbour { code: &'static str, message: String },
    #[error(
        "the redundant pair is merging what its hosts did apart (Recovering): nothing was changed; retry in a moment"
    )]
    PairRecovering,
    /// No key here covers the component, but a neighbour serves it: repeat the checkout at
    /// `location` (307, see `neighbours::redirect`).
    #[error(
        "no key of this server covers component {component:?}; neighbour {neighbour:?} serves it: repeat the checkout at {location}"
    )]
    Redirected {
        component: String,
        neighbour: String,
        location: String,
    },
    #[error("internal error: {0}")]
    Internal(String),
    /// The ledger answered a command with an outcome of another kind (a bug).
    #[error("internal error: {0}")]
    Unexpected(#[from] tessera_core::answer::Unexpected),
}

impl ApiError {
    /// The mapping table: (status, stable code). Keep it the only one.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Refused(refusal) => {
                let status = match refusal {
                    Refusal::NoLicensesAvailable { .. } => StatusCode::CONFLICT,
                    Refusal::ComponentNotLicensed { .. } => StatusCode::NOT_FOUND,
                    Refusal::LeaseNotFound { .. } => StatusCode::NOT_FOUND,
                    Refusal::KeyAlreadyImported { .. } => StatusCode::CONFLICT,
                    Refusal::KeyNotFound { .. } => StatusCode::NOT_FOUND,
                    Refusal::KeyRejected { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                    Refusal::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
                    Refusal::ServerNotSynchronized { .. } => StatusCode::SERVICE_UNAVAILABLE,
                    Refusal::SyncRejected { error } => match error {
                        tessera_core::sync::SyncError::NotAwaited { .. } => StatusCode::CONFLICT,
                        tessera_core::sync::SyncError::NoServerId => StatusCode::CONFLICT,
                        _ => StatusCode::UNPROCESSABLE_ENTITY,
                    },
                    Refusal::GrantRejected { error } => match error {
                        tessera_core::GrantError::Replayed { .. } => StatusCode::CONFLICT,
                        _ => StatusCode::UNPROCESSABLE_ENTITY,
                    },
                    Refusal::DonationRefused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                    Refusal::NotEnoughLicenses { .. } => StatusCode::CONFLICT,
                    Refusal::DonationNotFound { .. } => StatusCode::NOT_FOUND,
                    Refusal::BorrowNotAllowed { .. } => StatusCode::FORBIDDEN,
                    Refusal::LeaseBorrowed { .. }
                    | Refusal::KeyHasBorrowings { .. }
                    | Refusal::KeyHasDonations { .. } => StatusCode::CONFLICT,
                };
                (status, refusal.code())
            }
            ApiError::Consensus(error) => match error {
                ConsensusError::NotPrimary { .. } => {
                    (StatusCode::SERVICE_UNAVAILABLE, "not_primary")
                }
                ConsensusError::NoQuorum => (StatusCode::SERVICE_UNAVAILABLE, "no_quorum"),
                ConsensusError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
                _ => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            },
            ApiError::ClockSetBack { .. } | ApiError::ClockBehindVendor { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "clock_set_back")
            }
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::LeaseSecretRequired => (StatusCode::UNAUTHORIZED, "lease_secret_required"),
            ApiError::LeaseSecretWrong => (StatusCode::FORBIDDEN, "lease_secret_wrong"),
            ApiError::PeerCertificateRequired => {
                (StatusCode::UNAUTHORIZED, "peer_certificate_required")
            }
            ApiError::LeaseHeld { .. } => (StatusCode::CONFLICT, "lease_held"),
            ApiError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            ApiError::Conflict { code, .. } => (StatusCode::CONFLICT, code),
            ApiError::NotFound { code, .. } => (StatusCode::NOT_FOUND, code),
            ApiError::UnsupportedMediaType { .. } => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            ApiError::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            ApiError::NoRoute { .. } => (StatusCode::NOT_FOUND, "no_route"),
            ApiError::Neighbour { code, .. } => match *code {
                "clock_skew" => (StatusCode::CONFLICT, code),
                _ => (StatusCode::FORBIDDEN, code),
            },
            ApiError::Authority { .. } => (StatusCode::BAD_GATEWAY, "authority_refused"),
            ApiError::AuthorityUnreachable { .. } => {
                (StatusCode::BAD_GATEWAY, "authority_unreachable")
            }
            ApiError::PairRecovering => (StatusCode::SERVICE_UNAVAILABLE, "pair_recovering"),
            ApiError::Redirected { .. } => (StatusCode::TEMPORARY_REDIRECT, "component_elsewhere"),
            ApiError::Internal(_) | ApiError::Unexpected(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        }
    }
}

/// The error code of an answer, kept in the response's extensions: middleware recognises an
/// error (forwarding on `not_primary`) by its type, without reading the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorCode(pub &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                message: self.to_string(),
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        response.extensions_mut().insert(ErrorCode(code));
        if let ApiError::Redirected { location, .. } = &self
            && let Ok(value) = axum::http::HeaderValue::from_str(location)
        {
            response
                .headers_mut()
                .insert(axum::http::header::LOCATION, value);
        }
        response
    }
}
