//! Console sessions (in memory, with expiry), the session extractor, CSRF, passwords.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

use crate::state::SharedState;

pub const SESSION_COOKIE: &str = "tessera_session";
/// A session ends this long after login.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

struct Session {
    user: String,
    csrf: String,
    expires: Instant,
}

#[derive(Default)]
pub struct Sessions {
    sessions: Mutex<HashMap<String, Session>>,
}

fn random_hex() -> String {
    hex::encode(crate::ids::random_bytes().expect("the OS provides randomness"))
}

impl Sessions {
    /// Returns (session id, CSRF token).
    pub fn create(&self, user: &str) -> (String, String) {
        let id = random_hex();
        let csrf = random_hex();
        let now = Instant::now();
        let mut sessions = self.sessions.lock().expect("sessions lock");
        sessions.retain(|_, session| session.expires > now);
        sessions.insert(
            id.clone(),
            Session {
                user: user.to_string(),
                csrf: csrf.clone(),
                expires: now + SESSION_TTL,
            },
        );
        (id, csrf)
    }

    pub fn remove(&self, id: &str) {
        self.sessions.lock().expect("sessions lock").remove(id);
    }

    fn get(&self, id: &str) -> Option<(String, String)> {
        let sessions = self.sessions.lock().expect("sessions lock");
        sessions
            .get(id)
            .filter(|session| session.expires > Instant::now())
            .map(|session| (session.user.clone(), session.csrf.clone()))
    }
}

pub fn token_matches(presented: &str, token: &str) -> bool {
    let (a, b) = (presented.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("no randomness for the salt: {0}")]
    Randomness(#[from] std::io::Error),
    #[error("{0}")]
    Argon2(argon2::password_hash::Error),
}

/// An argon2id PHC string for `password` (`tessera admin hash-password`).
pub fn hash_password(password: &str) -> Result<String, HashError> {
    let bytes = crate::ids::random_bytes()?;
    let salt = SaltString::encode_b64(&bytes[..16]).map_err(HashError::Argon2)?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(HashError::Argon2)
}

pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(hash) => Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok(),
        Err(_) => false,
    }
}

/// A logged-in console user. Without a valid session: a redirect to `/login` for pages,
/// 401 with the JSON error body for htmx requests and non-GET requests.
pub struct ConsoleUser {
    pub name: String,
    pub csrf: String,
    pub session_id: String,
}

impl ConsoleUser {
    /// Appends a console action by this user to the audit chain.
    pub fn record(&self, state: &crate::state::AppState, action: &str, details: serde_json::Value) {
        state
            .history
            .admin_action(state.stamper.now_ms(), &self.name, action, details);
    }

    /// Refuses a POST whose form does not carry this session's CSRF token.
    #[allow(clippy::result_large_err)]
    pub fn check_csrf(&self, presented: &str) -> Result<(), Response> {
        if token_matches(presented, &self.csrf) {
            Ok(())
        } else {
            Err(crate::error::ApiError::BadRequest {
                code: "csrf_token_invalid",
                message: "the form's CSRF token is missing or stale: reload the page".into(),
            }
            .into_response())
        }
    }
}

fn cookie(parts: &Parts, name: &str) -> Option<String> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value: &HeaderValue| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_string())
}

impl FromRequestParts<SharedState> for ConsoleUser {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &SharedState,
    ) -> Result<ConsoleUser, Response> {
        let sessions = parts.extensions.get::<Arc<Sessions>>().cloned();
        let found = match (sessions, cookie(parts, SESSION_COOKIE)) {
            (Some(sessions), Some(id)) => sessions.get(&id).map(|user| (id, user)),
            _ => None,
        };
        if let Some((session_id, (name, csrf))) = found {
            return Ok(ConsoleUser {
                name,
                csrf,
                session_id,
            });
        }
        let htmx = parts.headers.contains_key("hx-request");
        if parts.method == axum::http::Method::GET && !htmx {
            let next = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            let target = format!("/login?next={}", super::url_encode(&next));
            return Err(Redirect::to(&target).into_response());
        }
        let mut response = crate::error::ApiError::Unauthorized.into_response();
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        Err(response)
    }
}
