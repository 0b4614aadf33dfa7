//! A fault-injecting HTTP proxy for partition tests and drills.
//!
//! Put one proxy in front of each host of a domain and name the proxies (not the hosts) in
//! the `[domain] hosts` list; each host still listens on its own address. A proxy forwards
//! every request to its host, except requests *from* a host whose link to it is cut: Raft
//! RPCs carry `x-tessera-raft-from` and forwarded writes `x-tessera-forwarded-by`, so the
//! proxy knows the sender and answers 502 instead, as a broken network would. Cutting both
//! directions between two groups of hosts is a partition; clearing the cuts heals it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use tokio::net::TcpListener;

/// Links cut between hosts, as (from, to) host numbers.
#[derive(Clone, Debug, Default)]
pub struct Cuts(Arc<Mutex<BTreeSet<(u64, u64)>>>);

impl Cuts {
    /// Cuts every link between the two groups, both ways.
    pub fn partition(&self, side_a: &[u64], side_b: &[u64]) {
        let mut cuts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for a in side_a {
            for b in side_b {
                cuts.insert((*a, *b));
                cuts.insert((*b, *a));
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn is_cut(&self, from: u64, to: u64) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&(from, to))
    }
}

/// Starts a proxy on a free loopback port in front of `host` (listening on `target`);
/// returns the proxy's address. It runs until the runtime stops.
pub async fn start(host: u64, target: String, cuts: Cuts) -> std::io::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let http = tessera_tls::client_builder_exactly(None)
        .map_err(std::io::Error::other)?
        .no_proxy()
        .build()
        .map_err(std::io::Error::other)?;
    let handler = move |request: Request| {
        let (http, target, cuts) = (http.clone(), target.clone(), cuts.clone());
        async move { forward(http, host, &target, &cuts, request).await }
    };
    let router = axum::Router::new().fallback(handler);
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok(addr)
}

async fn forward(
    http: reqwest::Client,
    host: u64,
    target: &str,
    cuts: &Cuts,
    request: Request,
) -> axum::response::Response {
    let (parts, body) = request.into_parts();
    let from = ["x-tessera-raft-from", "x-tessera-forwarded-by"]
        .iter()
        .find_map(|name| parts.headers.get(*name))
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if from.is_some_and(|from| cuts.is_cut(from, host)) {
        return (StatusCode::BAD_GATEWAY, "link cut").into_response();
    }
    let Ok(body): Result<Bytes, _> = axum::body::to_bytes(body, 64 * 1024 * 1024).await else {
        return (StatusCode::BAD_GATEWAY, "request body unreadable").into_response();
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let Ok(method) = reqwest::Method::from_bytes(parts.method.as_str().as_bytes()) else {
        return (StatusCode::BAD_GATEWAY, "method").into_response();
    };
    let mut outgoing = http.request(method, format!("http://{target}{path}"));
    for (name, value) in &parts.headers {
        if name.as_str() != "host" {
            outgoing = outgoing.header(name.as_str(), value.as_bytes());
        }
    }
    match outgoing.body(body).send().await {
        Ok(answer) => {
            let status =
                StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let headers: Vec<_> = answer
                .headers()
                .iter()
                .filter(|(name, _)| {
                    name.as_str() == "content-type" || name.as_str().starts_with("x-tessera-")
                })
                .filter_map(|(name, value)| {
                    Some((
                        axum::http::HeaderName::from_bytes(name.as_str().as_bytes()).ok()?,
                        axum::http::HeaderValue::from_bytes(value.as_bytes()).ok()?,
                    ))
                })
                .collect();
            let bytes = answer.bytes().await.unwrap_or_default();
            let mut response = (status, bytes).into_response();
            for (name, value) in headers {
                response.headers_mut().insert(name, value);
            }
            response
        }
        Err(_) => (StatusCode::BAD_GATEWAY, "host down").into_response(),
    }
}
