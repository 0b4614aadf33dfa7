//! The vendor's console: alerts (clones and rollbacks detected, resets), customers, license
//! server IDs (binding, last sync, certificate), keys and renewal keys, on one page at `/`.
//! Sign in with the admin token (`/login?token=` or the form); the session cookie holds a
//! hash of the token, never the token itself.
//! Changes are made with the CLI or the API; the page shows their result.

use std::fmt::Write;

use axum::Router;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::registry;
use crate::state::SharedState;

const COOKIE: &str = "tessera_authority";

pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/", get(page))
        .route("/login", get(login_link).post(login_form))
        .route("/logout", get(logout))
}

fn session_value(token: &str) -> String {
    hex::encode(Sha256::digest(
        format!("tessera-authority-session\n{token}").as_bytes(),
    ))
}

/// Compares two secrets in time independent of where they differ (their hashes, byte by byte,
/// without stopping early).
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn signed_in(state: &SharedState, headers: &HeaderMap) -> bool {
    let expected = session_value(&state.admin_token);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().strip_prefix(&format!("{COOKIE}=")))
        .any(|value| same_secret(value, &expected))
}

/// Headers on every answer: no framing, no scripts, no sniffing, no referrer; HSTS is left
/// to the license server's console (the authority's own TLS is optional).
pub async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            "content-security-policy",
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
    ] {
        headers
            .entry(name)
            .or_insert(header::HeaderValue::from_static(value));
    }
    response
}

#[derive(Deserialize)]
struct TokenForm {
    token: String,
}

fn sign_in(state: &SharedState, token: &str) -> Response {
    if !same_secret(token.trim(), &state.admin_token) {
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            Html(login_html(
                "That is not the admin token (DATA/admin.token).",
            )),
        )
            .into_response();
    }
    let secure = if state.secure_cookies { "; Secure" } else { "" };
    let cookie = format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age=28800{secure}",
        session_value(&state.admin_token)
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

async fn login_link(State(state): State<SharedState>, Query(form): Query<TokenForm>) -> Response {
    sign_in(&state, &form.token)
}

async fn login_form(State(state): State<SharedState>, Form(form): Form<TokenForm>) -> Response {
    sign_in(&state, &form.token)
}

async fn logout() -> Response {
    let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

fn login_html(message: &str) -> String {
    format!(
        "{HEAD}<h1>Tessera authority</h1><p>{}</p><form method=post action=/login>\
         <label>Admin token <input name=token type=password autofocus></label> <button>Sign in</button></form></body></html>",
        escape(message)
    )
}

const HEAD: &str = "<!doctype html><html><head><meta charset=utf-8><title>Tessera authority</title>\
<style>body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin-bottom:2em}\
td,th{border:1px solid #ccc;padding:.3em .7em;text-align:left}th{background:#f3f3f3}.warn{color:#a00}</style></head><body>";

async fn page(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    if !signed_in(&state, &headers) {
        return Html(login_html("Sign in with the authority's admin token.")).into_response();
    }
    let lists = state
        .run(|db, _, _| {
            Ok((
                registry::list_customers(db)?,
                registry::list_servers(db, None)?,
                registry::list_keys(db, None)?,
                crate::chain::list_alerts(db)?,
            ))
        })
        .await;
    let (customers, servers, keys, alerts) = match lists {
        Ok(lists) => lists,
        Err(error) => return error.into_response(),
    };
    let ts = |t: Option<jiff::Timestamp>| t.map(|t| t.to_string()).unwrap_or_else(|| "—".into());
    let mut html = String::from(HEAD);
    let _ = write!(
        html,
        "<h1>Tessera authority</h1><p>Vendor key {} &middot; <a href=/logout>sign out</a></p>",
        escape(&state.vendor.public_key().fingerprint())
    );
    // Clones and rollbacks first: they are what the vendor must act on.
    html.push_str("<h2>Alerts</h2>");
    if alerts.is_empty() {
        html.push_str("<p>No clone or rollback detected.</p>");
    } else {
        html.push_str("<table><tr><th>Kind</th><th>Server ID</th><th>Customer</th><th>First seen</th><th>Last seen</th><th>Times</th><th>Detail</th></tr>");
        for a in &alerts {
            let kind = if a.kind == crate::chain::CHAIN_RESET {
                escape(&a.kind)
            } else {
                format!("<span class=warn>{}</span>", escape(&a.kind))
            };
            let _ = write!(
                html,
                "<tr><td>{kind}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&a.server_id),
                escape(&a.customer),
                a.at,
                a.last_at,
                a.count,
                escape(&a.detail)
            );
        }
        html.push_str("</table>");
    }
    html.push_str(
        "<h2>Customers</h2><table><tr><th>Customer</th><th>Since</th><th>License servers</th></tr>",
    );
    for c in &customers {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&c.name),
            c.created_at,
            c.servers
        );
    }
    html.push_str("</table><h2>License servers</h2><table><tr><th>Server ID</th><th>Customer</th><th>Bound key</th><th>Bound at</th><th>Last sync</th><th>Sequence</th><th>Certificate valid until</th></tr>");
    for s in &servers {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&s.server_id),
            escape(&s.customer),
            escape(s.key_fingerprint.as_deref().unwrap_or("not bound")),
            ts(s.bound_at),
            ts(s.last_sync_at),
            s.last_sequence,
            ts(s.certificate_valid_until)
        );
    }
    for (title, renewals) in [("License keys", false), ("Renewal keys", true)] {
        let _ = write!(
            html,
            "</table><h2>{title}</h2><table><tr><th>Key</th><th>Server ID</th><th>Customer</th><th>Components</th><th>Licenses</th><th>Valid</th><th>{}</th><th>State</th></tr>",
            if renewals { "Renews" } else { "Issued" }
        );
        for k in keys.iter().filter(|k| k.renews.is_some() == renewals) {
            let state_text = match k.revoked_at {
                Some(at) => format!("<span class=warn>revoked {at}</span>"),
                None => "valid".into(),
            };
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} – {}</td><td>{}</td><td>{}</td></tr>",
                escape(&k.key_id),
                escape(&k.server_id),
                escape(&k.customer),
                escape(&k.components.join(", ")),
                k.licenses,
                k.valid_from,
                k.valid_until,
                escape(&k.renews.clone().unwrap_or_else(|| k.issued_at.to_string())),
                state_text
            );
        }
    }
    html.push_str("</table></body></html>");
    Html(html).into_response()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}
