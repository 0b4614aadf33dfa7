//! Extractors whose rejections speak the stable JSON error format.

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::SharedState;

/// `axum::Json`, with malformed JSON, unknown fields and oversized bodies answered as
/// `{"error": {...}}`.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<SharedState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &SharedState) -> Result<Self, ApiError> {
        if !is_json(request.headers()) {
            return Err(ApiError::UnsupportedMediaType {
                message: "Expected request with `Content-Type: application/json`".into(),
            });
        }
        let limit_bytes = state.config.body_limit_bytes;
        let ApiBytes(bytes) = ApiBytes::from_request(request, state).await?;
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            // Perhaps an integer written as `2.0`: parsed again through a JSON value (only
            // then, so the usual request pays for one parse).
            Err(JsonRejection::JsonDataError(_)) => {
                let mut value: serde_json::Value =
                    serde_json::from_slice(&bytes).map_err(|error| ApiError::BadRequest {
                        code: "malformed_json",
                        message: error.to_string(),
                    })?;
                integral_numbers_as_integers(&mut value);
                serde_json::from_value(value)
                    .map(ApiJson)
                    .map_err(|error| ApiError::BadRequest {
                        code: "invalid_json",
                        message: format!(
                            "Failed to deserialize the JSON body into the target type: {error}"
                        ),
                    })
            }
            Err(rejection) => Err(json_rejection(rejection, limit_bytes)),
        }
    }
}

/// Whether the request says its body is JSON (`application/json`, or `application/…+json`),
/// as axum's `Json` requires.
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// JSON has one number type: `3.0` is the integer 3 to JSON Schema (and so to the OpenAPI
/// document), but serde refuses it for an integer field. The request types' integer fields
/// are all members of the top-level object; nested free-form values (a neighbour envelope's
/// signed `body`) are left exactly as sent.
fn integral_numbers_as_integers(value: &mut serde_json::Value) {
    let Some(object) = value.as_object_mut() else {
        return;
    };
    for member in object.values_mut() {
        let Some(number) = member.as_number().filter(|n| n.is_f64()) else {
            continue;
        };
        let Some(float) = number.as_f64().filter(|f| f.fract() == 0.0) else {
            continue;
        };
        // Within ±2^53 a float is an exact integer.
        const EXACT: f64 = 9_007_199_254_740_992.0;
        if (-EXACT..=EXACT).contains(&float) {
            *member = serde_json::Value::from(float as i64);
        }
    }
}

fn json_rejection(rejection: JsonRejection, limit_bytes: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::PayloadTooLarge { limit_bytes };
    }
    let code = match &rejection {
        JsonRejection::MissingJsonContentType(_) => {
            return ApiError::UnsupportedMediaType {
                message: rejection.body_text(),
            };
        }
        JsonRejection::JsonSyntaxError(_) => "malformed_json",
        _ => "invalid_json",
    };
    ApiError::BadRequest {
        code,
        message: rejection.body_text(),
    }
}

/// The raw body (a key or sync file), with an oversized body answered as `{"error": {...}}`
/// (413 `body_too_large`) rather than axum's plain text.
pub struct ApiBytes(pub Bytes);

impl FromRequest<SharedState> for ApiBytes {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &SharedState) -> Result<Self, ApiError> {
        // The route's own limit (`DefaultBodyLimit`) applies; name the server-wide one.
        Bytes::from_request(request, state)
            .await
            .map(ApiBytes)
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge {
                        limit_bytes: state.config.body_limit_bytes,
                    }
                } else {
                    ApiError::BadRequest {
                        code: "invalid_body",
                        message: rejection.body_text(),
                    }
                }
            })
    }
}

/// `axum::extract::Query`, with a query string that does not parse answered as
/// 400 `invalid_query` in the JSON error format.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<SharedState> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| ApiQuery(value))
            .map_err(|rejection| ApiError::BadRequest {
                code: "invalid_query",
                message: rejection.body_text(),
            })
    }
}

/// `axum::extract::Path`, with a path parameter that does not parse (a host number that is
/// not a number, bytes that are not UTF-8) answered as 400 `invalid_path` in the JSON error
/// format.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<SharedState> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| ApiPath(value))
            .map_err(|rejection| ApiError::BadRequest {
                code: "invalid_path",
                message: rejection.body_text(),
            })
    }
}

/// Proof that the request carried the admin token.
pub struct Admin;

impl FromRequestParts<SharedState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Admin, ApiError> {
        if is_admin(&parts.headers, state) {
            Ok(Admin)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

/// Whether the request carries the admin token (for routes that answer everyone, and more
/// to the administrator).
pub fn is_admin(headers: &axum::http::HeaderMap, state: &SharedState) -> bool {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .is_some_and(|token| constant_time_eq(token.as_bytes(), state.admin_token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::integral_numbers_as_integers;

    /// Found by the API fuzzer: an integer field written as a float near 2^52 must read back
    /// as that integer. It needs serde_json's exact float parsing (`float_roundtrip`); the
    /// default fast path reads `-4463450244662550.0` one step off, as `…550.5`.
    #[test]
    fn an_integral_float_near_two_to_the_52_is_its_integer() {
        for (text, integer) in [
            ("-4463450244662550.0", -4_463_450_244_662_550_i64),
            ("4503599627370495.0", 4_503_599_627_370_495),
            ("2.0", 2),
        ] {
            let mut value: serde_json::Value =
                serde_json::from_str(&format!("{{\"sent_at_ms\": {text}}}")).unwrap();
            integral_numbers_as_integers(&mut value);
            assert_eq!(
                value["sent_at_ms"].as_i64(),
                Some(integer),
                "{text}: {value}"
            );
        }
    }
}
