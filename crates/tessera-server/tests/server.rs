//! The server over real HTTP, with real SQLite files and a manual clock. One test binary.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tessera_api::CheckoutRequest;
use tessera_client::{Client, ClientError};
use tessera_core::{LicenseKey, LicenseKeyPayload, SecretKey};
use tessera_server::clock::ManualClock;
use tessera_server::ids::LeaseIds;
use tessera_server::{RunningServer, ServerConfig, ServerOptions};

const START_MS: i64 = 1_800_000_000_000;
const LEASE_TTL: Duration = Duration::from_secs(60);

struct Fixture {
    dir: tempfile::TempDir,
    vendor: SecretKey,
    clock: ManualClock,
    server: RunningServer,
    /// Holds the lease secrets every client of the test shares (one station).
    secrets: Client,
}

impl Fixture {
    async fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let vendor = SecretKey::from_seed([42; 32]);
        std::fs::write(
            dir.path().join("vendor.pub"),
            vendor.public_key().to_file_text(),
        )
        .unwrap();
        let clock = ManualClock::new(START_MS);
        let server = start_server(dir.path(), &clock, 1).await;
        Fixture {
            dir,
            vendor,
            clock,
            server,
            secrets: Client::new("http://127.0.0.1:9", None),
        }
    }

    fn client(&self) -> Client {
        Client::new(&self.server.url(), None).sharing_secrets(&self.secrets)
    }

    fn admin(&self) -> Client {
        Client::new(
            &self.server.url(),
            Some(self.server.state.admin_token.clone()),
        )
        .sharing_secrets(&self.secrets)
    }

    fn key(&self, key_id: &str, components: &[&str], licenses: u32) -> LicenseKey {
        sign(
            &self.vendor,
            key_id,
            components,
            licenses,
            START_MS + 30 * 86_400_000,
            None,
        )
    }

    async fn import(&self, key: &LicenseKey) {
        self.admin().import_key(key.to_json_pretty()).await.unwrap();
    }

    async fn restart(self) -> Fixture {
        let Fixture {
            dir,
            vendor,
            clock,
            server,
            secrets,
        } = self;
        server.shutdown().await;
        let server = start_server(dir.path(), &clock, 2).await;
        Fixture {
            dir,
            vendor,
            clock,
            server,
            secrets,
        }
    }
}

async fn start_server(dir: &Path, clock: &ManualClock, seed: u8) -> RunningServer {
    start_server_with(dir, clock, seed, vec![]).await
}

async fn start_server_with(
    dir: &Path,
    clock: &ManualClock,
    seed: u8,
    notifications: Vec<tessera_server::events::NotificationRule>,
) -> RunningServer {
    start_server_tweaked(dir, clock, seed, |config| {
        config.notifications = notifications
    })
    .await
}

/// [`start_server`] with the configuration adjusted by `tweak`.
async fn start_server_tweaked(
    dir: &Path,
    clock: &ManualClock,
    seed: u8,
    tweak: impl FnOnce(&mut ServerConfig),
) -> RunningServer {
    let mut config = ServerConfig {
        data_dir: dir.join("data"),
        listen: "127.0.0.1:0".into(),
        trust: vec![dir.join("vendor.pub")],
        server_id: Some("srv-test".into()),
        lease_ttl: LEASE_TTL,
        body_limit_bytes: 4096,
        ..ServerConfig::default()
    };
    tweak(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tessera_server::start(
        listener,
        ServerOptions {
            config,
            clock: Arc::new(clock.clone()),
            ids: LeaseIds::from_seed([seed; 32]),
            run_timers: false,
        },
    )
    .await
    .unwrap()
}

fn sign(
    vendor: &SecretKey,
    key_id: &str,
    components: &[&str],
    licenses: u32,
    until_ms: i64,
    server_id: Option<&str>,
) -> LicenseKey {
    LicenseKey::sign(
        LicenseKeyPayload {
            key_id: key_id.into(),
            customer: "acme".into(),
            components: components.iter().map(|c| c.to_string()).collect(),
            licenses,
            valid_from: Timestamp::from_millisecond(START_MS - 86_400_000).unwrap(),
            valid_until: Timestamp::from_millisecond(until_ms).unwrap(),
            server_id: server_id.map(str::to_string),
            renews: None,
            certified_server_required: false,
            max_borrow_days: 0,
            grace_minutes: 0,
            issued_at: Timestamp::from_millisecond(START_MS - 86_400_000).unwrap(),
        },
        vendor,
    )
    .unwrap()
}

async fn metrics_text(f: &Fixture) -> String {
    let url = format!("{}/metrics", f.server.url());
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// A station's checkout; the holder key is the station's own, so the same station asking
/// again is a retry that gets its lease back.
fn request(component: &str, station: &str) -> CheckoutRequest {
    CheckoutRequest {
        component: component.into(),
        station: station.into(),
        user: "ann".into(),
        host: station.into(),
        nonce: String::new(),
        holder_key: format!("hk-{station}"),
        borrow_hours: 0,
    }
}

fn code(error: ClientError) -> (u16, String) {
    match error {
        ClientError::Api { status, code, .. } => (status, code),
        other => panic!("expected an API error, got {other}"),
    }
}

async fn raw(
    url: &str,
    method: reqwest::Method,
    body: &str,
    content_type: &str,
) -> (u16, serde_json::Value) {
    let response = tessera_tls::client_builder_exactly(None)
        .unwrap()
        .build()
        .unwrap()
        .request(method, url)
        .header("content-type", content_type)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

#[tokio::test]
async fn checkout_is_201_then_200_with_the_same_lease_for_the_same_station() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad"], 2)).await;
    let (first, created) = f.client().checkout(&request("cad", "ws-17")).await.unwrap();
    assert!(created);
    assert_eq!(first.heartbeat_interval_s, 20);
    assert_eq!(
        first.expires_at,
        Timestamp::from_millisecond(START_MS + 60_000).unwrap()
    );
    let (again, created) = f.client().checkout(&request("cad", "ws-17")).await.unwrap();
    assert!(!created);
    assert_eq!(again.lease_id, first.lease_id);
    let status = f.client().status().await.unwrap();
    assert_eq!(status.components[0].in_use, 1);
    assert_eq!(status.components[0].holders[0].station, "ws-17");
}

#[tokio::test]
async fn checkout_when_pool_exhausted_is_409_no_licenses_available() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad"], 1)).await;
    f.client().checkout(&request("cad", "ws-1")).await.unwrap();
    let refused = f
        .client()
        .checkout(&request("cad", "ws-2"))
        .await
        .unwrap_err();
    assert_eq!(code(refused), (409, "no_licenses_available".into()));
    let unknown = f
        .client()
        .checkout(&request("nothing", "ws-2"))
        .await
        .unwrap_err();
    assert_eq!(code(unknown), (404, "component_not_licensed".into()));
    let metrics = metrics_text(&f).await;
    assert!(
        metrics.contains("tessera_denials_total{component=\"cad\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn heartbeat_extends_and_checkin_returns_the_license() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad"], 1)).await;
    let (lease, _) = f.client().checkout(&request("cad", "ws-1")).await.unwrap();
    f.clock.advance_ms(50_000);
    let renewed = f.client().heartbeat(&lease.lease_id).await.unwrap();
    assert_eq!(
        renewed.expires_at,
        Timestamp::from_millisecond(START_MS + 110_000).unwrap()
    );
    f.client().checkin(&lease.lease_id).await.unwrap();
    let again = f.client().checkin(&lease.lease_id).await.unwrap_err();
    assert_eq!(code(again), (404, "lease_not_found".into()));
    // A lease id alone is not enough: no secret, no heartbeat (nothing is said about the id).
    let unknown = f.client().heartbeat("feedface").await.unwrap_err();
    assert_eq!(code(unknown), (401, "lease_secret_required".into()));
    f.client().checkout(&request("cad", "ws-2")).await.unwrap();
}

#[tokio::test]
async fn a_lease_without_heartbeat_expires_when_the_clock_passes_its_end() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad"], 1)).await;
    let (lease, _) = f.client().checkout(&request("cad", "ws-1")).await.unwrap();
    f.clock.advance_ms(59_999);
    assert_eq!(f.server.state.tick().await.unwrap(), 0);
    f.clock.advance_ms(1);
    assert_eq!(
        f.server.state.tick().await.unwrap(),
        1,
        "the timer proposes Expire"
    );
    assert_eq!(f.client().status().await.unwrap().components[0].free, 1);
    let late = f.client().heartbeat(&lease.lease_id).await.unwrap_err();
    assert_eq!(code(late), (404, "lease_not_found".into()));
}

#[tokio::test]
async fn admin_endpoints_refuse_a_missing_or_wrong_token_and_change_nothing() {
    let f = Fixture::start().await;
    let key = f.key("k1", &["cad"], 1).to_json_pretty();
    let anonymous = f.client().import_key(key.clone()).await.unwrap_err();
    assert_eq!(code(anonymous), (401, "unauthorized".into()));
    let wrong = Client::new(&f.server.url(), Some("0".repeat(64)));
    assert_eq!(code(wrong.import_key(key).await.unwrap_err()).0, 401);
    assert_eq!(code(f.client().list_keys().await.unwrap_err()).0, 401);
    assert!(f.admin().list_keys().await.unwrap().is_empty());
}

#[tokio::test]
async fn bad_keys_are_refused_with_a_clear_error_and_change_nothing() {
    let f = Fixture::start().await;
    let mut tampered = f.key("k1", &["cad"], 5);
    tampered.payload.licenses = 500;
    let other_vendor = sign(
        &SecretKey::from_seed([1; 32]),
        "k2",
        &["cad"],
        5,
        START_MS + 1_000_000,
        None,
    );
    let expired = sign(&f.vendor, "k3", &["cad"], 5, START_MS - 1, None);
    let elsewhere = sign(
        &f.vendor,
        "k4",
        &["cad"],
        5,
        START_MS + 1_000_000,
        Some("srv-other"),
    );
    let cases = [
        (tampered.to_json_pretty(), "key_bad_signature"),
        (other_vendor.to_json_pretty(), "key_wrong_vendor"),
        (expired.to_json_pretty(), "key_expired"),
        (elsewhere.to_json_pretty(), "key_other_server"),
        ("{not json".to_string(), "key_malformed"),
    ];
    for (text, expected) in cases {
        let error = f.admin().import_key(text).await.unwrap_err();
        let message = error.to_string();
        assert_eq!(code(error), (422, expected.to_string()), "{message}");
    }
    assert!(f.admin().list_keys().await.unwrap().is_empty());
    let mine = sign(
        &f.vendor,
        "k5",
        &["cad"],
        5,
        START_MS + 1_000_000,
        Some("srv-test"),
    );
    f.import(&mine).await;
    let duplicate = f
        .admin()
        .import_key(mine.to_json_pretty())
        .await
        .unwrap_err();
    assert_eq!(code(duplicate), (409, "key_already_imported".into()));
    assert_eq!(f.admin().list_keys().await.unwrap().len(), 1);
}

#[tokio::test]
async fn malformed_unknown_and_oversized_requests_get_json_errors() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad"], 1)).await;
    let url = format!("{}/v1/leases", f.server.url());
    let (status, body) = raw(
        &url,
        reqwest::Method::POST,
        "{\"component\":",
        "application/json",
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("malformed_json"))
    );
    let unknown = r#"{"component":"cad","station":"a","colour":"red"}"#;
    let (status, body) = raw(&url, reqwest::Method::POST, unknown, "application/json").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("colour")
    );
    let huge = format!(
        r#"{{"component":"cad","station":"{}"}}"#,
        "x".repeat(10_000)
    );
    let (status, body) = raw(&url, reqwest::Method::POST, &huge, "application/json").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );
    let (status, body) = raw(
        &format!("{}/v1/nowhere", f.server.url()),
        reqwest::Method::GET,
        "",
        "text/plain",
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("no_route"))
    );
    assert_eq!(f.client().status().await.unwrap().leases.len(), 0);
}

#[tokio::test]
async fn a_clock_set_back_stops_issuing_but_licenses_can_still_be_returned() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad"], 2)).await;
    let (lease, _) = f.client().checkout(&request("cad", "ws-1")).await.unwrap();
    f.clock.advance_ms(-3_600_000);
    let refused = f
        .client()
        .checkout(&request("cad", "ws-2"))
        .await
        .unwrap_err();
    assert_eq!(code(refused), (503, "clock_set_back".into()));
    let heartbeat = f.client().heartbeat(&lease.lease_id).await.unwrap_err();
    assert_eq!(code(heartbeat).1, "clock_set_back");
    f.client().checkin(&lease.lease_id).await.unwrap();
    assert!(f.client().status().await.unwrap().leases.is_empty());
    f.clock.advance_ms(3_600_000);
    f.client().checkout(&request("cad", "ws-2")).await.unwrap();
}

#[tokio::test]
async fn leases_and_keys_survive_a_restart_and_the_clock_mark_is_kept() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad"], 2)).await;
    let (lease, _) = f.client().checkout(&request("cad", "ws-1")).await.unwrap();
    f.clock.advance_ms(10_000);
    f.client().heartbeat(&lease.lease_id).await.unwrap();
    let f = f.restart().await;
    let status = f.admin().status().await.unwrap();
    assert_eq!(status.leases.len(), 1);
    assert_eq!(status.leases[0].lease_id, lease.lease_id);
    assert_eq!(
        status.leases[0].expires_at,
        Timestamp::from_millisecond(START_MS + 70_000).unwrap()
    );
    f.clock.advance_ms(-60_000);
    let refused = f
        .client()
        .checkout(&request("cad", "ws-2"))
        .await
        .unwrap_err();
    assert_eq!(
        code(refused).1,
        "clock_set_back",
        "the high-water mark survived the restart"
    );
}

#[tokio::test]
async fn force_release_and_key_removal_by_the_administrator() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad"], 2)).await;
    let (a, _) = f.client().checkout(&request("cad", "ws-1")).await.unwrap();
    f.client().checkout(&request("cad", "ws-2")).await.unwrap();
    assert_eq!(
        code(f.client().force_release(&a.lease_id).await.unwrap_err()).0,
        401
    );
    let released = f.admin().force_release(&a.lease_id).await.unwrap();
    assert_eq!(released.station, "ws-1");
    let exported = f.admin().export_key("k1").await.unwrap();
    assert_eq!(
        LicenseKey::from_json(&exported).unwrap(),
        f.key("k1", &["cad"], 2)
    );
    let removed = f.admin().remove_key("k1").await.unwrap();
    assert_eq!(removed.leases_ended, 1);
    assert_eq!(
        code(f.admin().remove_key("k1").await.unwrap_err()),
        (404, "key_not_found".into())
    );
}

#[tokio::test]
async fn health_metrics_and_openapi_are_served() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad", "cam"], 3)).await;
    f.client().checkout(&request("cad", "ws-1")).await.unwrap();
    let health = f.client().health().await.unwrap();
    assert_eq!(
        (health.status.as_str(), health.role.as_str()),
        ("ok", "primary")
    );
    let metrics = metrics_text(&f).await;
    assert!(
        metrics.contains("tessera_licenses_in_use{component=\"cam\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tessera_checkouts_total{outcome=\"granted\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tessera_http_request_duration_seconds_bucket"),
        "{metrics}"
    );
    let openapi: serde_json::Value = reqwest::get(format!("{}/v1/openapi.json", f.server.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(openapi["paths"]["/v1/leases"]["post"].is_object());
    assert!(openapi["components"]["schemas"]["Lease"].is_object());
    let page = reqwest::get(f.server.url())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The console needs a login (tests/server/console.rs covers it).
    assert!(page.contains("name=\"token\""), "{page}");
    assert!(
        metrics.contains("tessera_sync_deadline_seconds"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "tessera_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("tessera_licenses_donated{component=\"cad\"} 0"),
        "{metrics}"
    );
}

/// The router's routes, read from its source: `(METHOD, path)` for each `.route(...)`.
fn router_routes() -> Vec<(String, String)> {
    let source = include_str!("../src/http/mod.rs");
    let body = &source[source.find("pub fn router(").unwrap()..];
    let body = &body[..body.find(".merge(crate::console::router())").unwrap()];
    let mut routes = Vec::new();
    for chunk in body.split(".route(").skip(1) {
        let path = chunk.split('"').nth(1).unwrap().to_string();
        for method in ["get", "post", "put", "delete"] {
            let called = chunk
                .match_indices(&format!("{method}("))
                .any(|(at, _)| at == 0 || !chunk.as_bytes()[at - 1].is_ascii_alphanumeric());
            if called {
                routes.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    routes
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_with_its_errors() {
    let f = Fixture::start().await;
    let openapi: serde_json::Value =
        serde_json::from_str(&tessera_server::http::openapi_json()).expect("the document is JSON");
    let paths = openapi["paths"].as_object().unwrap();
    let routes = router_routes();
    assert!(routes.len() >= 39, "{routes:?}");
    // Every route of the router (the test clock, a debug-build hook, is in test_routes()).
    for (method, path) in &routes {
        if path == "/v1/test/clock" {
            assert!(paths.get(path).is_none());
            continue;
        }
        let operation = &openapi["paths"][path][method.to_lowercase()];
        assert!(operation.is_object(), "{method} {path} is not documented");
    }
    for path in [
        "/v1/domain",
        "/v1/domain/hosts",
        "/v1/domain/hosts/{host}",
        "/v1/pair",
        "/v1/pair/enable",
        "/v1/pair/disable",
        "/v1/pair/sync",
        "/v1/pair/rpc/{rpc}",
        "/v1/reports/usage",
        "/v1/audit/verify",
        "/metrics",
        "/v1/openapi.json",
    ] {
        assert!(paths.contains_key(path), "{path}");
    }
    let admin = format!("Bearer {}", f.server.state.admin_token);
    let client = reqwest::Client::new();
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let label = format!("{} {path}", method.to_uppercase());
            assert!(
                routes.contains(&(method.to_uppercase(), path.clone())),
                "{label} is documented but not routed"
            );
            let responses = operation["responses"].as_object().unwrap();
            // Every error answers the one error body.
            for (status, response) in responses {
                if status.starts_with('4') || (status.starts_with('5') && path != "/healthz") {
                    assert_eq!(
                        response["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{label} {status}"
                    );
                }
            }
            // Path parameters are declared.
            let declared: Vec<&str> = operation["parameters"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .filter(|p| p["in"] == "path")
                        .map(|p| p["name"].as_str().unwrap())
                        .collect()
                })
                .unwrap_or_default();
            let in_path: Vec<&str> = path
                .split('/')
                .filter_map(|part| part.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            assert_eq!(declared, in_path, "{label}: path parameters");
            let admin_only = operation["security"]
                .as_array()
                .is_some_and(|list| list.iter().all(|r| r.get("admin_token").is_some()));
            if admin_only {
                assert!(responses.contains_key("401"), "{label} 401");
                // And the server does answer 401 without the token, in the error format.
                let url = format!("{}{}", f.server.url(), path.replace("{host}", "1"));
                let url = url.replace(['{', '}'], "");
                let answer = client
                    .request(method.to_uppercase().parse().unwrap(), &url)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(answer.status().as_u16(), 401, "{label}");
                let body: serde_json::Value = answer.json().await.unwrap();
                assert_eq!(body["error"]["code"], "unauthorized", "{label}");
            }
            if operation["requestBody"]["content"]["application/json"].is_object()
                && !["/v1/keys", "/v1/sync/response", "/v1/pair/rpc/{rpc}"].contains(&path.as_str())
            {
                // A JSON body sent as something else: 415 in the error format.
                for status in ["400", "413", "415"] {
                    assert!(responses.contains_key(status), "{label} {status}");
                }
                let url = format!("{}{}", f.server.url(), path).replace(['{', '}'], "");
                let answer = client
                    .request(method.to_uppercase().parse().unwrap(), &url)
                    .header("authorization", &admin)
                    .header("content-type", "text/plain")
                    .body("{}")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(answer.status().as_u16(), 415, "{label}");
                let body: serde_json::Value = answer.json().await.unwrap();
                assert_eq!(body["error"]["code"], "unsupported_media_type", "{label}");
            }
        }
    }
}

#[tokio::test]
async fn wrong_methods_bad_paths_and_queries_and_integral_floats_get_json_answers() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad"], 1)).await;
    let admin = format!("Bearer {}", f.server.state.admin_token);
    let client = reqwest::Client::new();
    let send = |method: reqwest::Method, path: &str, body: Option<&str>| {
        let mut request = client
            .request(method, format!("{}{path}", f.server.url()))
            .header("authorization", &admin);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        async move {
            let answer = request.send().await.unwrap();
            let status = answer.status().as_u16();
            let allow = answer
                .headers()
                .get("allow")
                .map(|v| v.to_str().unwrap().to_string());
            let body: serde_json::Value = answer.json().await.unwrap();
            (
                status,
                body["error"]["code"].as_str().map(str::to_string),
                allow,
            )
        }
    };
    // A known path, a method it does not serve: 405 with Allow, in the error format.
    let (status, code, allow) = send(reqwest::Method::PATCH, "/v1/keys", None).await;
    assert_eq!((status, code.as_deref()), (405, Some("method_not_allowed")));
    let mut allowed: Vec<String> = allow.unwrap().split(',').map(str::to_string).collect();
    allowed.sort();
    assert_eq!(allowed, ["GET", "HEAD", "POST"]);
    // A host number that is not a number (was axum's plain text).
    let (status, code, _) = send(reqwest::Method::DELETE, "/v1/domain/hosts/abc", None).await;
    assert_eq!((status, code.as_deref()), (400, Some("invalid_path")));
    // A query that does not parse (was plain text) and an empty bound.
    let (status, code, _) = send(
        reqwest::Method::GET,
        "/v1/reports/usage?format=csv&format=json",
        None,
    )
    .await;
    assert_eq!((status, code.as_deref()), (400, Some("invalid_query")));
    let (status, code, _) = send(reqwest::Method::GET, "/v1/reports/usage?to=", None).await;
    assert_eq!((status, code.as_deref()), (400, Some("invalid_query")));
    // The end of the last day there is: every event (was 400).
    let (status, _, _) = send(
        reqwest::Method::GET,
        "/v1/reports/usage?to=9999-12-31&format=json",
        None,
    )
    .await;
    assert_eq!(status, 200);
    // A key file over the body limit: 413 in the error format (was plain text).
    let (status, code, _) =
        send(reqwest::Method::POST, "/v1/keys", Some(&"x".repeat(70_000))).await;
    assert_eq!((status, code.as_deref()), (413, Some("body_too_large")));
    // A well-formed request the server's state refuses: 409, not 400.
    let (status, code, _) = send(reqwest::Method::POST, "/v1/sync", None).await;
    assert_eq!((status, code.as_deref()), (409, Some("no_authority")));
    let (status, code, _) = send(reqwest::Method::POST, "/v1/pair/disable", None).await;
    assert_eq!((status, code.as_deref()), (409, Some("not_a_pair")));
    let (status, code, _) = send(
        reqwest::Method::POST,
        "/v1/domain/hosts",
        Some(r#"{"host": 2.0, "address": "127.0.0.1:9"}"#),
    )
    .await;
    // 2.0 is the integer 2 (JSON Schema says so); without a domain secret no host is added.
    assert_eq!(
        (status, code.as_deref()),
        (409, Some("domain_requirements"))
    );
    let (status, code, _) = send(reqwest::Method::DELETE, "/v1/domain/hosts/7", None).await;
    assert_eq!((status, code.as_deref()), (404, Some("host_not_member")));
    let (status, code, _) = send(reqwest::Method::DELETE, "/v1/domain/hosts/1", None).await;
    assert_eq!((status, code.as_deref()), (409, Some("last_host")));
    // A station name of 256 characters is 256 characters, however many bytes.
    let station = "é".repeat(256);
    let (status, _, _) = send(
        reqwest::Method::POST,
        "/v1/leases",
        Some(&format!(r#"{{"component":"cad","station":"{station}"}}"#)),
    )
    .await;
    assert_eq!(status, 201);
}

#[tokio::test]
async fn the_data_dir_holds_an_identity_and_an_owner_only_admin_token() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::start().await;
    let data = f.dir.path().join("data");
    for file in ["admin.token", "server.key"] {
        let mode = std::fs::metadata(data.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    assert_eq!(token.trim(), f.server.state.admin_token);
}

/// The sequence a sync request file carries.
fn request_sequence(request_text: &str) -> u64 {
    let request = tessera_core::sync::SyncRequest::from_json(request_text).unwrap();
    request.verify().unwrap().0.sequence
}

/// Plays the vendor for one request: a response certifying the server's key, with `keys`.
fn vendor_answer(f: &Fixture, request_text: &str, keys: Vec<LicenseKey>) -> String {
    vendor_answer_with_renewals(f, request_text, keys, vec![])
}

fn vendor_answer_with_renewals(
    f: &Fixture,
    request_text: &str,
    keys: Vec<LicenseKey>,
    renewals: Vec<LicenseKey>,
) -> String {
    vendor_answer_full(f, request_text, keys, renewals, vec![])
}

/// [`vendor_answer`] with renewal keys and revoked key ids.
fn vendor_answer_full(
    f: &Fixture,
    request_text: &str,
    keys: Vec<LicenseKey>,
    renewals: Vec<LicenseKey>,
    revoked: Vec<String>,
) -> String {
    use tessera_core::sync::{
        CertificatePayload, ServerCertificate, SyncRequest, SyncResponse, SyncResponsePayload,
    };
    let request = SyncRequest::from_json(request_text).unwrap();
    let (payload, _) = request.verify().unwrap();
    let now = Timestamp::from_millisecond(f.clock_now()).unwrap();
    let certificate = ServerCertificate::sign(
        CertificatePayload {
            server_id: payload.server_id.clone(),
            customer: "acme".into(),
            public_key: payload.public_key.clone(),
            issued_at: now,
            valid_until: Timestamp::from_millisecond(f.clock_now() + 366 * 86_400_000).unwrap(),
        },
        &f.vendor,
    );
    let response = SyncResponse::sign(
        SyncResponsePayload {
            server_id: payload.server_id.clone(),
            request_nonce: payload.nonce.clone(),
            sequence: payload.sequence,
            issued_at: now,
            certificate,
            keys,
            revoked,
            renewals,
            countersigned: None,
        },
        &f.vendor,
    );
    serde_json::to_string_pretty(&response).unwrap()
}

impl Fixture {
    fn clock_now(&self) -> i64 {
        use tessera_core::Clock;
        self.clock.now_ms()
    }
}

#[tokio::test]
async fn a_file_sync_makes_bound_keys_usable_until_366_days_pass() {
    let f = Fixture::start().await;
    let bound = sign(
        &f.vendor,
        "bound",
        &["cad"],
        3,
        START_MS + 800 * 86_400_000,
        Some("srv-test"),
    );
    f.import(&bound).await;
    let refused = f
        .client()
        .checkout(&request("cad", "ws-1"))
        .await
        .unwrap_err();
    let message = refused.to_string();
    assert_eq!(code(refused), (503, "server_not_synchronized".into()));
    assert!(message.contains("never synchronized"), "{message}");

    let request_text = f.admin().export_sync_request().await.unwrap();
    let sequence = request_sequence(&request_text);
    assert!(sequence >= f.clock_now() as u64, "at least the time in ms");
    let response_text = vendor_answer(&f, &request_text, vec![bound]);
    let summary = f
        .admin()
        .import_sync_response(response_text.clone())
        .await
        .unwrap();
    assert_eq!(summary.sequence, sequence);
    f.client().checkout(&request("cad", "ws-1")).await.unwrap();
    let sync = f.client().sync_status().await.unwrap();
    assert!(sync.synchronized);
    assert_eq!(sync.days_left, Some(366));

    let replayed = f
        .admin()
        .import_sync_response(response_text)
        .await
        .unwrap_err();
    assert_eq!(code(replayed), (409, "sync_not_awaited".into()));
    let second_request = f.admin().export_sync_request().await.unwrap();
    let second = request_sequence(&second_request);
    assert!(second > sequence);
    let truncated = vendor_answer(&f, &second_request, vec![]);
    let cut = truncated[..truncated.len() / 2].to_string();
    assert_eq!(
        code(f.admin().import_sync_response(cut).await.unwrap_err()),
        (422, "sync_malformed".into())
    );
    let edited = truncated.replace(
        &format!("\"sequence\": {second}"),
        &format!("\"sequence\": {}", second + 1),
    );
    assert_ne!(edited, truncated);
    assert_eq!(
        code(f.admin().import_sync_response(edited).await.unwrap_err()).1,
        "sync_bad_signature"
    );
    assert_eq!(
        f.client().sync_status().await.unwrap().completed_sequence,
        sequence,
        "nothing changed"
    );
    // Refused before it was proposed: the log holds no response that does not verify (a
    // restart would refuse one, as edited on disk).
    assert_eq!(f.server.state.consensus.unverified_log_entries(), vec![]);

    f.clock.advance_ms(366 * 86_400_000);
    let late = f
        .client()
        .checkout(&request("cad", "ws-2"))
        .await
        .unwrap_err();
    assert_eq!(code(late), (503, "server_not_synchronized".into()));
    assert!(!f.client().status().await.unwrap().sync.synchronized);

    // The doctor, on the stopped server, names the run-out certificate and the way out.
    let config = ServerConfig {
        data_dir: f.dir.path().join("data"),
        trust: vec![f.dir.path().join("vendor.pub")],
        server_id: Some("srv-test".into()),
        ..ServerConfig::default()
    };
    let now = f.clock_now();
    f.server.shutdown().await;
    let report = tessera_server::doctor::examine(&config, now).unwrap();
    let found: Vec<String> = report.findings.iter().map(|f| f.problem.clone()).collect();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("vendor certificate ran out"), "{found:?}");
    assert!(report.findings[0].remedy.contains("tessera sync export"));
}

#[tokio::test]
async fn check_for_updates_replaces_a_key_by_its_renewal_and_notifies() {
    let f = Fixture::start().await;
    let old = sign(
        &f.vendor,
        "old",
        &["cad"],
        2,
        START_MS + 20 * 86_400_000,
        Some("srv-test"),
    );
    let mut payload = sign(
        &f.vendor,
        "new",
        &["cad", "cam"],
        4,
        START_MS + 400 * 86_400_000,
        Some("srv-test"),
    )
    .payload;
    payload.renews = Some("old".into());
    let new = LicenseKey::sign(payload, &f.vendor).unwrap();
    let request_text = f.admin().export_sync_request().await.unwrap();
    let answer = vendor_answer_with_renewals(&f, &request_text, vec![old], vec![new]);
    assert_eq!(
        f.admin()
            .import_sync_response(answer)
            .await
            .unwrap()
            .renewals,
        vec!["new".to_string()]
    );
    let (lease, _) = f.client().checkout(&request("cad", "ws-1")).await.unwrap();
    assert_eq!(lease.key_id, "old");

    let report = f.admin().update_keys().await.unwrap();
    assert_eq!(report.renewals.len(), 1);
    assert!(report.renewals[0].allocated);
    assert_eq!(report.leases_moved, 1);
    let status = f.admin().status().await.unwrap();
    assert_eq!(
        status
            .keys
            .iter()
            .map(|k| k.key_id.as_str())
            .collect::<Vec<_>>(),
        vec!["new"]
    );
    assert_eq!(
        status.leases[0].lease_id, lease.lease_id,
        "the station kept its lease"
    );
    assert_eq!(status.leases[0].key_id, "new");
    let events = f.admin().events().await.unwrap();
    assert_eq!(events[0]["kind"], "key_updated", "{events:?}");
    assert!(
        f.admin().update_keys().await.unwrap().renewals.is_empty(),
        "nothing left to do"
    );

    // The notifications outlive a restart, ids and all, and the next one is numbered after
    // them.
    let before = f.admin().events().await.unwrap();
    let f = f.restart().await;
    assert_eq!(f.admin().events().await.unwrap(), before);
    f.import(&f.key("more", &["cam"], 1)).await;
    let after = f.admin().events().await.unwrap();
    assert_eq!(after[0]["kind"], "key_imported", "{after:?}");
    assert_eq!(after[0]["id"], before[0]["id"].as_u64().unwrap() + 1);
    assert_eq!(after[1..], before[..]);
}

/// The webhook is served over HTTPS by a private CA's certificate, which the server trusts
/// through `tls_ca`.
#[tokio::test]
async fn notifications_reach_a_signed_webhook_and_then_the_user_hook() {
    use axum::routing::post;
    let dir = tempfile::tempdir().unwrap();
    let vendor = SecretKey::from_seed([42; 32]);
    std::fs::write(
        dir.path().join("vendor.pub"),
        vendor.public_key().to_file_text(),
    )
    .unwrap();
    let (sender, mut received) = tokio::sync::mpsc::channel::<(String, String)>(8);
    let receiver = axum::Router::new().route(
        "/hook",
        post(move |headers: axum::http::HeaderMap, body: String| {
            let sender = sender.clone();
            async move {
                let signature = headers[tessera_server::events::SIGNATURE_HEADER]
                    .to_str()
                    .unwrap()
                    .to_string();
                sender.send((signature, body)).await.unwrap();
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let tls = tessera_tls::init(&dir.path().join("tls"), &["127.0.0.1".to_string()]).unwrap();
    let acceptor = tessera_tls::ServerTls::load(&tls.cert, &tls.key)
        .unwrap()
        .acceptor()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let webhook = format!("https://{}/hook", listener.local_addr().unwrap());
    let listener = tessera_tls::TlsListener::new(listener, acceptor).unwrap();
    tokio::spawn(async move { axum::serve(listener, receiver).await.unwrap() });
    let hook_out = dir.path().join("hook.out");
    let hook = dir.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\ncat > {}.tmp && mv {0}.tmp {0}\n",
            hook_out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let rules = vec![tessera_server::events::NotificationRule {
        events: vec!["key_imported".into()],
        webhook: Some(webhook),
        secret: Some("s3cret".into()),
        hook: Some(hook),
        hook_timeout: Some("5s".into()),
    }];
    let clock = ManualClock::new(START_MS);
    let server = start_server_tweaked(dir.path(), &clock, 1, |config| {
        config.notifications = rules;
        config.tls_ca = Some(tls.ca.clone());
    })
    .await;
    let admin = Client::new(&server.url(), Some(server.state.admin_token.clone()));
    let key = sign(&vendor, "k1", &["cad"], 1, START_MS + 1_000_000, None);
    admin.import_key(key.to_json_pretty()).await.unwrap();
    let (signature, body) = tokio::time::timeout(Duration::from_secs(10), received.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        signature,
        tessera_server::events::sign_body("s3cret", body.as_bytes())
    );
    let event: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["kind"], "key_imported");
    assert_eq!(event["details"]["key_id"], "k1");
    // The hook runs after the webhook; wait for the process to write its file.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !hook_out.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the user hook never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hooked: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&hook_out).unwrap()).unwrap();
    assert_eq!(hooked, event);
    server.shutdown().await;
}

#[tokio::test]
async fn the_sync_deadline_is_announced_30_7_and_1_days_before() {
    let f = Fixture::start().await;
    let request_text = f.admin().export_sync_request().await.unwrap();
    f.admin()
        .import_sync_response(vendor_answer(&f, &request_text, vec![]))
        .await
        .unwrap();
    let notices = |events: Vec<serde_json::Value>| {
        events
            .iter()
            .filter(|e| e["kind"] == "sync_deadline_near")
            .map(|e| e["details"]["threshold_days"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    for (day, expected) in [
        (300, vec![]),
        (337, vec![30]),
        (340, vec![30]),
        (359, vec![7, 30]),
        (365, vec![1, 7, 30]),
    ] {
        f.clock.set_ms(START_MS + day * 86_400_000);
        f.server.state.tick().await.unwrap();
        assert_eq!(
            notices(f.admin().events().await.unwrap()),
            expected,
            "day {day}"
        );
    }
}
#[path = "server/console.rs"]
mod console;
#[path = "server/console_at_scale.rs"]
mod console_at_scale;
#[path = "server/domain.rs"]
mod domain;
#[path = "server/neighbours.rs"]
mod neighbours;

/// A real in-process authority in `DIR/authority` on the test clock, and a server ID it
/// registered for customer acme.
async fn authority_with_a_server_id(
    dir: &Path,
    clock: &ManualClock,
) -> (tessera_authority::RunningAuthority, String) {
    let authority = tessera_authority::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tessera_authority::AuthorityConfig {
            data_dir: dir.join("authority"),
            clock: Arc::new(clock.clone()),
            tls: None,
        },
    )
    .await
    .unwrap();
    let server_id = register_server_id(&authority).await;
    (authority, server_id)
}

/// A new server ID the authority registers for customer acme.
async fn register_server_id(authority: &tessera_authority::RunningAuthority) -> String {
    let server: serde_json::Value = vendor_post(
        authority,
        "/v1/servers",
        serde_json::json!({"customer": "acme", "create_customer": true}),
    )
    .await
    .json()
    .await
    .unwrap();
    server["server_id"].as_str().unwrap().to_string()
}

/// The authority's alerts of `kind` (`GET /v1/alerts`).
async fn vendor_alerts(
    authority: &tessera_authority::RunningAuthority,
    kind: &str,
) -> Vec<serde_json::Value> {
    let alerts: Vec<serde_json::Value> = tessera_tls::client_builder_exactly(None)
        .unwrap()
        .build()
        .unwrap()
        .get(format!("{}/v1/alerts", authority.url()))
        .bearer_auth(&authority.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    alerts.into_iter().filter(|a| a["kind"] == kind).collect()
}

/// An admin request to the authority.
async fn vendor_post(
    authority: &tessera_authority::RunningAuthority,
    path: &str,
    body: serde_json::Value,
) -> reqwest::Response {
    let response = tessera_tls::client_builder_exactly(None)
        .unwrap()
        .build()
        .unwrap()
        .post(format!("{}{path}", authority.url()))
        .bearer_auth(&authority.admin_token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
    response
}

/// A server in `DIR/data` that syncs with `authority` daily; its timers do not run, the test
/// calls `run_scheduled_update`.
async fn start_syncing_server(
    dir: &Path,
    clock: &ManualClock,
    authority: &tessera_authority::RunningAuthority,
    server_id: &str,
) -> RunningServer {
    let config = ServerConfig {
        data_dir: dir.join("data"),
        listen: "127.0.0.1:0".into(),
        trust: vec![dir.join("authority/vendor.pub")],
        server_id: Some(server_id.into()),
        authority: Some(authority.url()),
        sync_schedule: Some(tessera_server::config::SyncSchedule::Daily),
        ..ServerConfig::default()
    };
    tessera_server::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        ServerOptions {
            config,
            clock: Arc::new(clock.clone()),
            ids: LeaseIds::from_seed([7; 32]),
            run_timers: false,
        },
    )
    .await
    .unwrap()
}

/// The trust list (#22, item 1): the primary records the vendor keys it trusts in the ledger
/// at its first tick; a key added later (the customer's own vendor key, to sign license keys
/// of its own) raises `trust_changed`, and the next sync reports it: the vendor sees
/// `vendor_key_added` with the key's fingerprint, once.
#[tokio::test]
async fn a_vendor_key_added_to_the_trust_list_is_recorded_and_reported_to_the_vendor() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let (authority, server_id) = authority_with_a_server_id(dir.path(), &clock).await;
    let server = start_syncing_server(dir.path(), &clock, &authority, &server_id).await;
    server.state.tick().await.unwrap();
    let recorded = server
        .state
        .consensus
        .read(|ledger| ledger.sync_state().trusted.clone());
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    server.state.sync_online().await.unwrap();
    let alerts = || vendor_alerts(&authority, "vendor_key_added");
    assert!(alerts().await.is_empty());
    server.shutdown().await;

    let own = SecretKey::from_seed([66; 32]);
    std::fs::write(dir.path().join("own.pub"), own.public_key().to_file_text()).unwrap();
    let config = ServerConfig {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".into(),
        trust: vec![
            dir.path().join("authority/vendor.pub"),
            dir.path().join("own.pub"),
        ],
        server_id: Some(server_id.clone()),
        authority: Some(authority.url()),
        ..ServerConfig::default()
    };
    let server = try_start(config, &clock).await.unwrap();
    server.state.tick().await.unwrap();
    let fingerprint = own.public_key().fingerprint();
    let changes = server
        .state
        .consensus
        .read(|ledger| ledger.sync_state().trust_changes.clone());
    assert_eq!(
        changes.len(),
        2,
        "the first record and the change: {changes:?}"
    );
    assert_eq!(changes[1].added, vec![fingerprint.clone()]);
    let events = Client::new(&server.url(), Some(server.state.admin_token.clone()))
        .events()
        .await
        .unwrap();
    let changed: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["kind"] == "trust_changed" && e["severity"] == "warning")
        .collect();
    assert_eq!(changed.len(), 1, "{events:?}");
    assert!(
        changed[0]["message"]
            .as_str()
            .unwrap()
            .contains(&fingerprint),
        "{changed:?}"
    );
    // Unchanged at the next tick: nothing more recorded.
    server.state.tick().await.unwrap();
    assert_eq!(
        server
            .state
            .consensus
            .read(|ledger| ledger.sync_state().trust_changes.len()),
        2
    );
    server.state.sync_online().await.unwrap();
    let found = alerts().await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["server_id"], server_id.as_str());
    assert!(
        found[0]["detail"].as_str().unwrap().contains(&fingerprint),
        "{found:?}"
    );
    server.state.sync_online().await.unwrap();
    assert_eq!(alerts().await.len(), 1, "reported once");
    server.shutdown().await;
}

/// The scheduled update task against a real in-process authority, driven by the manual clock.
#[tokio::test]
async fn the_daily_schedule_syncs_when_due_and_retries_a_failure_after_15_minutes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let (authority, server_id) = authority_with_a_server_id(dir.path(), &clock).await;
    let server = start_syncing_server(dir.path(), &clock, &authority, &server_id).await;
    let state = &server.state;
    let report = state
        .run_scheduled_update()
        .await
        .expect("never synced: due")
        .unwrap();
    let first = report.sync.unwrap().sequence;
    assert!(
        state.run_scheduled_update().await.is_none(),
        "synced just now"
    );
    clock.advance_ms(86_400_000 - 1);
    assert!(
        state.run_scheduled_update().await.is_none(),
        "not a day yet"
    );
    clock.advance_ms(1);
    let second = state
        .run_scheduled_update()
        .await
        .unwrap()
        .unwrap()
        .sync
        .unwrap()
        .sequence;
    assert!(second > first, "a second sync");

    // The authority goes away: the attempt fails (reported, notified) and is retried later.
    authority.shutdown().await;
    clock.advance_ms(86_400_000);
    let failed = state.run_scheduled_update().await.unwrap().unwrap();
    assert!(failed.sync_error.is_some());
    assert!(
        state.run_scheduled_update().await.is_none(),
        "no retry on every tick"
    );
    clock.advance_ms(15 * 60 * 1000);
    assert!(
        state.run_scheduled_update().await.is_some(),
        "retried after 15 minutes"
    );
    let events = state.notifier.recent();
    assert!(events.iter().any(|e| e.kind == "sync_failed"));
    assert_eq!(state.sync_status().completed_sequence, second);
    server.shutdown().await;
}

/// The disk of a single server is lost: it starts again on a fresh data directory with its
/// backed-up identity (docs/operations.md). To the authority's sync chain that is a rollback
/// (a first sync from an installation whose chain exists): refused `server_rolled_back`,
/// automatic syncs stop (no retry every 15 minutes), until the vendor resets the server ID;
/// then it syncs again. Its requests also come above the sequence the vendor remembers.
#[tokio::test]
async fn a_server_rebuilt_with_its_identity_on_a_fresh_data_directory_syncs_again() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let (authority, server_id) = authority_with_a_server_id(dir.path(), &clock).await;
    vendor_post(
        &authority,
        "/v1/keys",
        serde_json::json!({"server_id": server_id, "components": ["cad"], "licenses": 2, "valid_days": 30}),
    )
    .await;
    let data = dir.path().join("data");
    let start = || start_syncing_server(dir.path(), &clock, &authority, &server_id);
    let synced_keys = |report: tessera_api::KeyUpdateReport| {
        assert_eq!(report.sync_error, None);
        report.sync.expect("synced").imported.len()
    };

    let server = start().await;
    let report = server.state.run_scheduled_update().await.unwrap().unwrap();
    assert_eq!(synced_keys(report), 1);
    server.shutdown().await;

    // Lost: everything but the identity files.
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if !["server.key", "server.pub", "admin.token"].contains(&name.as_str()) {
            std::fs::remove_file(&path).unwrap();
        }
    }
    clock.advance_ms(10 * 60_000);
    let server = start().await;
    assert!(server.state.status().keys.is_empty(), "a fresh ledger");
    let report = server.state.run_scheduled_update().await.unwrap().unwrap();
    let error = report.sync_error.expect("refused");
    assert!(error.contains("server_rolled_back"), "{error}");
    let blocked = server.state.sync_status().blocked.expect("blocked");
    assert_eq!(blocked.code, "server_rolled_back");
    // The console's sync page says so.
    let (cookie, _) = console::login_to(&server).await;
    let (status, html) = console::page_of(&server, &cookie, "/sync").await;
    assert_eq!(status, 200);
    assert!(
        html.contains("Syncs blocked by the vendor (server_rolled_back)"),
        "{html}"
    );
    assert!(
        server
            .state
            .notifier
            .recent()
            .iter()
            .any(|e| e.kind == "sync_blocked" && e.severity == "error"),
        "a sync_blocked event"
    );
    // No hammering: the schedule stays quiet, a day later too.
    clock.advance_ms(86_400_000);
    assert!(server.state.run_scheduled_update().await.is_none());
    // An administrator's sync still asks, and gets the authority's code with 409.
    let refused = server.state.sync_online().await.unwrap_err();
    assert_eq!(
        refused.status_and_code(),
        (axum::http::StatusCode::CONFLICT, "server_rolled_back")
    );

    // The vendor resets the server ID; the next sync binds and unblocks.
    vendor_post(
        &authority,
        &format!("/v1/servers/{server_id}/reset"),
        serde_json::json!({}),
    )
    .await;
    let summary = server.state.sync_online().await.unwrap();
    assert_eq!(summary.imported.len(), 1, "the vendor sent the key again");
    assert_eq!(server.state.status().keys.len(), 1);
    assert_eq!(server.state.sync_status().blocked, None);
    clock.advance_ms(86_400_000);
    let report = server
        .state
        .run_scheduled_update()
        .await
        .expect("due again");
    assert_eq!(report.unwrap().sync_error, None);
    server.shutdown().await;
}

/// T8, time from the vendor (#22 item 4): a server synced, holding a 30-day key, whose clock
/// then stays frozen while 40 days pass at the authority. Until it syncs, it still serves
/// the key (the bound: the next sync). Online, the authority refuses its request
/// (`server_clock_skewed`); by file (carried for days, accepted), the response's signed
/// time becomes the server's time floor: checkouts are refused `clock_set_back`, naming the
/// vendor's time, also after a restart, until the clock is corrected; a license can still
/// be returned.
#[tokio::test]
async fn a_server_whose_clock_is_behind_the_vendors_signed_time_stops_issuing() {
    let day = 86_400_000;
    let dir = tempfile::tempdir().unwrap();
    let vendor_clock = ManualClock::new(START_MS);
    let (authority, server_id) = authority_with_a_server_id(dir.path(), &vendor_clock).await;
    vendor_post(
        &authority,
        "/v1/keys",
        serde_json::json!({"server_id": server_id, "components": ["cad"], "licenses": 2, "valid_days": 30}),
    )
    .await;
    let clock = ManualClock::new(START_MS);
    let server = start_syncing_server(dir.path(), &clock, &authority, &server_id).await;
    let station = Client::new(&server.url(), None);
    assert_eq!(server.state.sync_online().await.unwrap().imported.len(), 1);
    station.checkout(&request("cad", "ws-1")).await.unwrap();

    // 40 days pass at the vendor; the server's clock is frozen a day after its sync, where
    // the key is still valid: it is served.
    vendor_clock.advance_ms(40 * day);
    clock.advance_ms(day);
    let (held, _) = station.checkout(&request("cad", "ws-2")).await.unwrap();
    let refused = server.state.sync_online().await.unwrap_err();
    assert!(
        refused.to_string().contains("server_clock_skewed"),
        "{refused}"
    );

    let sync_request = server.state.export_sync_request().await.unwrap();
    let response = vendor_post(
        &authority,
        "/v1/sync/process",
        serde_json::to_value(&sync_request).unwrap(),
    )
    .await
    .json()
    .await
    .unwrap();
    server.state.import_sync_response(response).await.unwrap();
    let refused = station.checkout(&request("cad", "ws-3")).await.unwrap_err();
    let message = refused.to_string();
    assert_eq!(code(refused), (503, "clock_set_back".into()), "{message}");
    let vendor_time = Timestamp::from_millisecond(START_MS + 40 * day).unwrap();
    assert!(
        message.contains(&vendor_time.to_string()) && message.contains("vendor"),
        "{message}"
    );
    let heartbeat = station.heartbeat(&held.lease_id).await.unwrap_err();
    assert_eq!(code(heartbeat).1, "clock_set_back");
    station.checkin(&held.lease_id).await.unwrap();
    // Restarted, the floor is still there (it is in the ledger).
    server.shutdown().await;
    let server = start_syncing_server(dir.path(), &clock, &authority, &server_id).await;
    let station = Client::new(&server.url(), None);
    let refused = station.checkout(&request("cad", "ws-3")).await.unwrap_err();
    assert_eq!(code(refused), (503, "clock_set_back".into()));

    // The clock corrected: online syncs are accepted again, and the key has ended.
    clock.advance_ms(39 * day);
    server.state.sync_online().await.unwrap();
    let refused = station.checkout(&request("cad", "ws-3")).await.unwrap_err();
    assert_ne!(code(refused).1, "clock_set_back");
    server.shutdown().await;
}

/// A lease is a capability held by its station (#19 item 3, #21 item 3): heartbeat and
/// checkin need the lease secret of the checkout answer, an anonymous status shows no lease
/// ids, and a station asking again gets its lease only with the holder key of its checkout.
/// The administrator still force-releases with the admin token.
#[tokio::test]
async fn heartbeat_and_checkin_need_the_holders_lease_secret() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad"], 2)).await;
    let url = f.server.url();
    let http = tessera_tls::client_builder_exactly(None)
        .unwrap()
        .build()
        .unwrap();
    let checkout = |station: &'static str, holder_key: &'static str| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let body = serde_json::json!({"component": "cad", "station": station, "holder_key": holder_key});
            let answer = http
                .post(format!("{url}/v1/leases"))
                .json(&body)
                .send()
                .await
                .unwrap();
            (
                answer.status().as_u16(),
                answer.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let call = |method: reqwest::Method, path: String, secret: Option<&str>| {
        let mut request = http.request(method, format!("{url}{path}"));
        if let Some(secret) = secret {
            request = request.header("x-lease-secret", secret);
        }
        async move {
            let answer = request.send().await.unwrap();
            let status = answer.status().as_u16();
            let body: serde_json::Value = answer.json().await.unwrap_or_default();
            (
                status,
                body["error"]["code"].as_str().unwrap_or("").to_string(),
            )
        }
    };
    let (status, lease) = checkout("ws-1", "hk-1").await;
    assert_eq!(status, 201);
    let lease_id = lease["lease_id"].as_str().unwrap().to_string();
    let secret = lease["lease_secret"]
        .as_str()
        .expect("a secret")
        .to_string();
    assert_eq!(secret.len(), 32);
    let beat = format!("/v1/leases/{lease_id}/heartbeat");
    let back = format!("/v1/leases/{lease_id}");
    use reqwest::Method;
    assert_eq!(
        call(Method::POST, beat.clone(), None).await,
        (401, "lease_secret_required".into())
    );
    assert_eq!(
        call(
            Method::POST,
            beat.clone(),
            Some("0123456789abcdef0123456789abcdef")
        )
        .await,
        (403, "lease_secret_wrong".into())
    );
    assert_eq!(
        call(Method::DELETE, back.clone(), None).await,
        (401, "lease_secret_required".into())
    );
    assert_eq!(call(Method::POST, beat.clone(), Some(&secret)).await.0, 200);
    // Nothing was ended by the refused checkin.
    assert_eq!(f.admin().status().await.unwrap().leases.len(), 1);
    // Anonymous status: counts and stations, no lease ids; the administrator sees them.
    let anonymous = f.client().status().await.unwrap();
    assert_eq!(anonymous.leases.len(), 1);
    assert_eq!(anonymous.leases[0].lease_id, "");
    assert!(
        anonymous.components[0]
            .holders
            .iter()
            .all(|h| h.lease_id.is_empty())
    );
    assert_eq!(anonymous.components[0].in_use, 1);
    let text = reqwest::get(format!("{url}/v1/status"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !text.contains(&lease_id) && !text.contains(&secret) && !text.contains("lease_id"),
        "{text}"
    );
    assert_eq!(
        f.admin().status().await.unwrap().leases[0].lease_id,
        lease_id
    );
    // The same station asking again: the lease and its secret only with its holder key (a
    // retry whose answer was lost); anyone else naming the station learns nothing and
    // extends nothing.
    let expires = f.admin().status().await.unwrap().leases[0].expires_at;
    f.clock.advance_ms(1_000);
    for other in ["", "hk-guess"] {
        let (status, refused) = checkout("ws-1", other).await;
        assert_eq!(
            (status, &refused["error"]["code"]),
            (409, &"lease_held".into())
        );
        assert!(!refused.to_string().contains(&lease_id), "{refused}");
    }
    assert_eq!(
        f.admin().status().await.unwrap().leases[0].expires_at,
        expires
    );
    let (status, again) = checkout("ws-1", "hk-1").await;
    assert_eq!(
        (status, &again["lease_id"]),
        (200, &lease_id.clone().into())
    );
    assert_eq!(again["lease_secret"], secret.as_str());
    // The holder returns it; the administrator force-releases another without a secret.
    assert_eq!(call(Method::DELETE, back, Some(&secret)).await.0, 204);
    let (_, other) = checkout("ws-2", "hk-2").await;
    let released = f
        .admin()
        .force_release(other["lease_id"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(released.station, "ws-2");
    assert!(f.admin().status().await.unwrap().leases.is_empty());
}

/// Vendor trust ends in the application (#19 items 1–2): a client given the vendor's root
/// accepts the real server's leases, checked offline from the answer, and refuses a
/// customer's own vendor key, an uncertified server serving a bound key, a played-back
/// answer and an expired token, whatever the server said.
#[tokio::test]
async fn an_application_accepts_only_leases_that_check_out_against_the_vendor_root() {
    let f = Fixture::start().await;
    let root = f.vendor.public_key();
    f.import(&f.key("k1", &["cad"], 2)).await;
    let clock = f.clock.clone();
    let app_clock: Arc<dyn Fn() -> i64 + Send + Sync> =
        Arc::new(move || tessera_core::Clock::now_ms(&clock));
    let app = Client::new(&f.server.url(), None)
        .verifying(root)
        .with_clock(app_clock.clone());
    let (lease, created) = app.checkout(&request("cad", "ws-1")).await.unwrap();
    assert!(created && lease.lease_token.is_some() && lease.license_key.is_some());
    let beat = app.heartbeat(&lease.lease_id).await.unwrap();
    assert!(beat.lease_token.is_some());
    // The same answers with the application's clock past the lease: expired.
    let late = Client::new(&f.server.url(), None)
        .verifying(root)
        .sharing_secrets(&app)
        .with_clock(Arc::new(|| START_MS + 86_400_000));
    let refused = late.heartbeat(&lease.lease_id).await.unwrap_err();
    assert!(
        matches!(&refused, ClientError::Untrusted { check, .. } if check == "expired"),
        "{refused}"
    );
    assert_eq!(refused.code(), Some("lease_untrusted"));

    // A customer's own vendor key, trusted by their own server: refused, seat returned.
    let dir = tempfile::tempdir().unwrap();
    let customer_vendor = SecretKey::from_seed([77; 32]);
    std::fs::write(
        dir.path().join("vendor.pub"),
        customer_vendor.public_key().to_file_text(),
    )
    .unwrap();
    let own = start_server(dir.path(), &f.clock, 3).await;
    Client::new(&own.url(), Some(own.state.admin_token.clone()))
        .import_key(
            sign(
                &customer_vendor,
                "mine",
                &["cad"],
                500,
                START_MS + 86_400_000,
                None,
            )
            .to_json_pretty(),
        )
        .await
        .unwrap();
    let app_on_own = Client::new(&own.url(), None)
        .verifying(root)
        .with_clock(app_clock.clone());
    let refused = app_on_own
        .checkout(&request("cad", "ws-9"))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ClientError::Untrusted { check, .. } if check == "key"),
        "{refused}"
    );
    assert_eq!(own.state.status().keys[0].in_use, 0, "the seat went back");
    // Without the vendor root (an application that checks nothing) it would have run.
    assert!(
        Client::new(&own.url(), None)
            .checkout(&request("cad", "ws-9"))
            .await
            .is_ok()
    );

    // A hand-written server: it plays back the real server's earlier answer…
    let recorded = serde_json::to_value(&lease).unwrap();
    let impostor = SecretKey::from_seed([5; 32]);
    let bound_key = sign(
        &f.vendor,
        "bound",
        &["cad"],
        5,
        START_MS + 86_400_000,
        Some("srv-test"),
    );
    let mode = Arc::new(std::sync::Mutex::new("replay"));
    let real = f.server.url();
    let fake = {
        let mode = mode.clone();
        let impostor = impostor.clone();
        axum::Router::new().route(
            "/v1/leases",
            axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
                let mode = *mode.lock().unwrap();
                let recorded = recorded.clone();
                let impostor = impostor.clone();
                let bound_key = bound_key.clone();
                let real = real.clone();
                async move {
                    if mode == "replay" {
                        return (axum::http::StatusCode::CREATED, axum::Json(recorded));
                    }
                    if mode == "relay" {
                        // …or relays the application's nonce to the real server under the
                        // one station that holds a seat (one seat for every machine).
                        let mut relayed = body.clone();
                        relayed["station"] = "relay-seat".into();
                        relayed["holder_key"] = "relay".into();
                        let answer: serde_json::Value = tessera_tls::client_builder_exactly(None)
                            .unwrap()
                            .build()
                            .unwrap()
                            .post(format!("{real}/v1/leases"))
                            .json(&relayed)
                            .send()
                            .await
                            .unwrap()
                            .json()
                            .await
                            .unwrap();
                        return (axum::http::StatusCode::CREATED, axum::Json(answer));
                    }
                    // …or signs its own token, with the nonce, for a key bound to a server
                    // ID it cannot show a vendor certificate for.
                    let payload = tessera_core::lease_token::LeaseTokenPayload {
                        format: "tessera-lease-token".into(),
                        version: 1,
                        lease_id: "fake".into(),
                        key_id: "bound".into(),
                        component: "cad".into(),
                        components: vec!["cad".into()],
                        station: "ws-1".into(),
                        user: String::new(),
                        host: "ws-1".into(),
                        nonce: body["nonce"].as_str().unwrap_or_default().into(),
                        issued_at: Timestamp::from_millisecond(START_MS).unwrap(),
                        valid_until: Timestamp::from_millisecond(START_MS + 60_000).unwrap(),
                        server_id: "srv-test".into(),
                        server_public_key: impostor.public_key().to_base64(),
                    };
                    let mut lease = recorded.clone();
                    lease["lease_id"] = "fake".into();
                    lease["key_id"] = "bound".into();
                    lease["lease_token"] = payload.issue(&impostor).into();
                    lease["license_key"] = serde_json::to_value(&bound_key).unwrap();
                    lease.as_object_mut().unwrap().remove("server_certificate");
                    (axum::http::StatusCode::CREATED, axum::Json(lease))
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, fake).await });
    let app_on_fake = Client::new(&fake_url, None)
        .verifying(root)
        .with_clock(Arc::new(|| START_MS + 1_000));
    let refused = app_on_fake
        .checkout(&request("cad", "ws-1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ClientError::Untrusted { check, .. } if check == "nonce"),
        "{refused}"
    );
    *mode.lock().unwrap() = "impostor";
    let refused = app_on_fake
        .checkout(&request("cad", "ws-1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ClientError::Untrusted { check, .. } if check == "certificate"),
        "{refused}"
    );
    *mode.lock().unwrap() = "relay";
    let app_on_relay = Client::new(&fake_url, None)
        .verifying(root)
        .with_clock(app_clock.clone());
    let refused = app_on_relay
        .checkout(&request("cad", "ws-5"))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ClientError::Untrusted { check, .. } if check == "station"),
        "{refused}"
    );
}

/// Lease secrets and holder lease ids are derived with HMAC now (one signature per call
/// before); a station holding a secret of the first derivation, from before an upgrade, keeps
/// its lease.
#[tokio::test]
async fn a_lease_secret_from_before_the_upgrade_still_works() {
    use sha2::Digest;
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad"], 2)).await;
    let (lease, _) = f.client().checkout(&request("cad", "ws-1")).await.unwrap();
    let identity_text =
        std::fs::read_to_string(f.dir.path().join("data").join("server.key")).unwrap();
    let identity = SecretKey::from_file_text(&identity_text).unwrap();
    let mut signed = b"tessera-lease-secret/v1\n".to_vec();
    signed.extend_from_slice(lease.lease_id.as_bytes());
    let old_secret =
        hex::encode(&sha2::Sha256::digest(identity.sign_base64(&signed).as_bytes())[..16]);
    assert_ne!(
        Some(&old_secret),
        lease.lease_secret.as_ref(),
        "a new derivation"
    );
    let station = Client::new(&f.server.url(), None);
    station.set_lease_secret(&lease.lease_id, &old_secret);
    station.heartbeat(&lease.lease_id).await.unwrap();
    let stranger = Client::new(&f.server.url(), None);
    stranger.set_lease_secret(&lease.lease_id, &"0".repeat(32));
    assert_eq!(
        code(stranger.heartbeat(&lease.lease_id).await.unwrap_err()),
        (403, "lease_secret_wrong".into())
    );
    station.checkin(&lease.lease_id).await.unwrap();
}

/// Sends the head of a POST announcing a body of `length` bytes, and none of the body, and
/// reads the answer: the server must answer from the head alone (the read has a deadline).
pub async fn head_only_post(
    authority: &str,
    path: &str,
    length: u64,
    headers: &[(&str, String)],
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(authority).await.unwrap();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !String::from_utf8_lossy(&answer).contains("\"}}") {
        let read = tokio::time::timeout_at(deadline, stream.read(&mut buffer))
            .await
            .expect("the server answers from the head alone, without the body")
            .unwrap();
        if read == 0 {
            break;
        }
        answer.extend_from_slice(&buffer[..read]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_paged_and_filtered_and_the_status_stays_summary_sized() {
    let f = Fixture::start().await;
    f.import(&f.key("k-big", &["cad", "viewer"], 1_000)).await;
    // 250 leases: users user0..user24, ten stations each; a tenth of them also use viewer.
    for i in 0..250 {
        let mut checkout = request(
            if i % 10 == 0 { "viewer" } else { "cad" },
            &format!("ws-{i:03}"),
        );
        checkout.user = format!("user{}", i % 25);
        f.client().checkout(&checkout).await.unwrap();
    }
    let admin = f.admin();
    // Status: counts for all, at most 100 leases and 100 holders per component.
    let status = admin.status().await.unwrap();
    assert_eq!(status.leases_total, 250);
    assert_eq!(status.leases.len(), tessera_api::STATUS_LEASES_MAX);
    assert!(status.components.iter().all(|c| c.holders.len() <= 100));
    let cad = status
        .components
        .iter()
        .find(|c| c.component == "cad")
        .unwrap();
    assert_eq!(
        cad.in_use, 250,
        "one key: its leases count for each of its components"
    );

    // Pages of 100 in lease-id order, each id once, the cursor from `next`.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut query = vec![("limit", "100")];
        if let Some(after) = &after {
            query.push(("after", after.as_str()));
        }
        let page = admin.leases(&query).await.unwrap();
        assert_eq!(page.total, 250);
        pages += 1;
        seen.extend(page.leases.into_iter().map(|lease| lease.lease_id));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!((seen.len(), &seen), (250, &sorted));

    // Exact filters: user7 is not user70; a prefix ends in `*`.
    let page = admin
        .leases(&[("user", "user7"), ("limit", "1000")])
        .await
        .unwrap();
    assert_eq!(page.total, 10);
    assert!(page.leases.iter().all(|lease| lease.user == "user7"));
    let page = admin.leases(&[("user", "user1*")]).await.unwrap();
    assert_eq!(page.total, 11 * 10, "user1 and user10..user19");
    // A lease holds every component of its key: all 250 hold viewer, though 25 asked for it.
    let page = admin.leases(&[("component", "viewer")]).await.unwrap();
    assert_eq!(page.total, 250);
    let page = admin.leases(&[("component", "cam")]).await.unwrap();
    assert_eq!(page.total, 0, "no key covers cam");
    let page = admin
        .leases(&[("station", "ws-00*"), ("user", "user0")])
        .await
        .unwrap();
    assert_eq!(
        page.leases
            .iter()
            .map(|l| l.station.as_str())
            .collect::<Vec<_>>(),
        ["ws-000"]
    );
    // A page of one past the last lease: empty, no cursor.
    let last = seen.last().unwrap();
    let page = admin.leases(&[("after", last.as_str())]).await.unwrap();
    assert!(page.leases.is_empty() && page.next.is_none());

    // The admin token is needed; a bad limit or parameter is named.
    assert_eq!(code(f.client().leases(&[]).await.unwrap_err()).0, 401);
    for bad in [
        ("limit", "0"),
        ("limit", "1001"),
        ("sort", "colour"),
        ("colour", "red"),
        ("order", "up"),
    ] {
        let error = admin.leases(&[bad]).await.unwrap_err();
        assert_eq!(code(error), (400, "invalid_query".to_string()), "{bad:?}");
    }
}

/// The kinds of the events the server raised, oldest first.
async fn event_kinds(f: &Fixture) -> Vec<String> {
    let mut kinds: Vec<String> = f
        .admin()
        .events()
        .await
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    kinds.reverse();
    kinds
}

#[tokio::test]
async fn a_key_ending_is_announced_30_7_and_1_days_before_and_when_it_ends_once_each() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad"], 1)).await; // ends 30 days after the start
    let expiring = |kinds: &[String]| kinds.iter().filter(|k| *k == "key_expiring").count();
    f.server.state.tick().await.unwrap();
    f.server.state.tick().await.unwrap();
    assert_eq!(expiring(&event_kinds(&f).await), 1, "30 days, once");
    let events = f.admin().events().await.unwrap();
    let notice = events.iter().find(|e| e["kind"] == "key_expiring").unwrap();
    assert_eq!(notice["details"]["threshold_days"], 30);
    assert_eq!(notice["details"]["key_id"], "k1");
    f.clock.advance_ms(23 * 86_400_000 + 43_200_000); // 6.5 days left
    f.server.state.tick().await.unwrap();
    f.server.state.tick().await.unwrap();
    assert_eq!(expiring(&event_kinds(&f).await), 2);
    f.clock.advance_ms(6 * 86_400_000); // half a day left
    f.server.state.tick().await.unwrap();
    assert_eq!(expiring(&event_kinds(&f).await), 3);
    f.clock.advance_ms(43_200_000 + 1);
    f.server.state.tick().await.unwrap();
    f.server.state.tick().await.unwrap();
    let kinds = event_kinds(&f).await;
    assert_eq!(expiring(&kinds), 3);
    assert_eq!(
        kinds.iter().filter(|k| *k == "key_expired").count(),
        1,
        "{kinds:?}"
    );
}

#[tokio::test]
async fn exhausted_components_denial_spikes_and_removed_keys_are_announced() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad"], 1)).await;
    f.client().checkout(&request("cad", "ws-0")).await.unwrap();
    for i in 1..=25 {
        let refused = f
            .client()
            .checkout(&request("cad", &format!("ws-{i}")))
            .await
            .unwrap_err();
        assert_eq!(code(refused).1, "no_licenses_available");
    }
    let kinds = event_kinds(&f).await;
    let count = |kind: &str| kinds.iter().filter(|k| *k == kind).count();
    assert_eq!(
        count("component_exhausted"),
        1,
        "once, not per denial: {kinds:?}"
    );
    assert_eq!(count("denial_spike"), 1, "{kinds:?}");
    // Ten minutes later (ws-0's lease ran out; ws-99 takes the license), exhausted again:
    // said again.
    f.clock.advance_ms(10 * 60_000);
    f.client().checkout(&request("cad", "ws-99")).await.unwrap();
    let refused = f
        .client()
        .checkout(&request("cad", "ws-100"))
        .await
        .unwrap_err();
    assert_eq!(code(refused).1, "no_licenses_available");
    let kinds = event_kinds(&f).await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "component_exhausted").count(),
        2
    );
    // Removing a key that ends a lease is announced with the count.
    f.admin().remove_key("k1").await.unwrap();
    let events = f.admin().events().await.unwrap();
    let removed = events.iter().find(|e| e["kind"] == "key_removed").unwrap();
    assert_eq!(removed["details"]["leases_ended"], 1);
    assert_eq!(removed["severity"], "warning");
}

/// Attack T6: add a key file again after the sync that revoked it. Refused, also after a
/// restart (the tombstone is in the replicated ledger).
#[tokio::test]
async fn a_key_the_vendor_revoked_cannot_be_added_again() {
    let f = Fixture::start().await;
    let key = f.key("k-revoked", &["cad"], 5);
    f.import(&key).await;
    let request_text = f.admin().export_sync_request().await.unwrap();
    let summary = f
        .admin()
        .import_sync_response(vendor_answer_full(
            &f,
            &request_text,
            vec![],
            vec![],
            vec!["k-revoked".into()],
        ))
        .await
        .unwrap();
    assert_eq!(summary.revoked, ["k-revoked"]);
    assert!(f.admin().list_keys().await.unwrap().is_empty());
    let refused = f
        .admin()
        .import_key(key.to_json_pretty())
        .await
        .unwrap_err();
    assert_eq!(code(refused), (422, "key_revoked".to_string()));
    let f = f.restart().await;
    let refused = f
        .admin()
        .import_key(key.to_json_pretty())
        .await
        .unwrap_err();
    assert_eq!(code(refused), (422, "key_revoked".to_string()));
    // Another key is still welcome.
    f.import(&f.key("k-other", &["cad"], 5)).await;
}

/// Attack T13: replay a sniffed pair RPC. Its tag covers its time: refused a second time,
/// and once 30 s have passed; without a time, refused.
#[tokio::test]
async fn a_replayed_or_stale_pair_rpc_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let vendor = SecretKey::from_seed([42; 32]);
    std::fs::write(
        dir.path().join("vendor.pub"),
        vendor.public_key().to_file_text(),
    )
    .unwrap();
    const SECRET: &str = "pair test domain secret 0123456789";
    let clock = ManualClock::new(START_MS);
    let server = start_server_tweaked(dir.path(), &clock, 1, |config| {
        config.domain_secret = Some(SECRET.into())
    })
    .await;
    let tag = |subject: &str, body: &[u8]| {
        let mut mac =
            <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(SECRET.as_bytes()).unwrap();
        hmac::Mac::update(&mut mac, subject.as_bytes());
        hmac::Mac::update(&mut mac, b"\n");
        hmac::Mac::update(&mut mac, body);
        hex::encode(hmac::Mac::finalize(mac).into_bytes())
    };
    let http = tessera_tls::client_builder_exactly(None)
        .unwrap()
        .build()
        .unwrap();
    let send = |time: Option<i64>, signed_time: i64| {
        let mut request = http
            .post(format!("{}/v1/pair/rpc/candidate", server.url()))
            .header("content-type", "application/json")
            .header(
                "x-tessera-pair-auth",
                tag(&format!("candidate {signed_time}"), b"{}"),
            )
            .body("{}");
        if let Some(time) = time {
            request = request.header("x-tessera-pair-time", time.to_string());
        }
        async move {
            let answer = request.send().await.unwrap();
            (answer.status().as_u16(), answer.text().await.unwrap())
        }
    };
    let (status, body) = send(Some(START_MS), START_MS).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = send(Some(START_MS), START_MS).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("replay"), "{body}");
    // The time is under the tag: changing it breaks the tag.
    let (status, _) = send(Some(START_MS + 1), START_MS).await;
    assert_eq!(status, 403);
    // Without a time: refused.
    let (status, body) = send(None, START_MS).await;
    assert_eq!(status, 403);
    assert!(body.contains("x-tessera-pair-time"), "{body}");
    // A correctly signed request 31 s old: refused.
    clock.advance_ms(31_000);
    let (status, body) = send(Some(START_MS + 5), START_MS + 5).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("more than 30 s"), "{body}");
    let (status, _) = send(Some(START_MS + 31_000), START_MS + 31_000).await;
    assert_eq!(status, 200);
    server.shutdown().await;
}

/// Attack T1: edit the key in the snapshot on disk (5 licenses made 500, the signature
/// kept). The server refuses to start, naming the key; so it does when the trust list no
/// longer names the key's vendor.
#[tokio::test]
async fn a_ledger_key_that_does_not_verify_stops_the_start_naming_it() {
    let f = Fixture::start().await;
    f.import(&f.key("k-five", &["cad"], 5)).await;
    f.server.state.consensus.snapshot_now().await.unwrap();
    // The store is the server's alone while it runs: wait for the snapshot, then stop it.
    wait_for_snapshot(&f.server).await;
    let store = f.dir.path().join("data").join("raft.sqlite3");
    let Fixture {
        dir, clock, server, ..
    } = f;
    server.shutdown().await;
    let data = stored_snapshot(&store);
    // A restart as it is: fine.
    start_server(dir.path(), &clock, 2).await.shutdown().await;
    let text = String::from_utf8(data).unwrap();
    assert!(text.contains("\"licenses\":5,"), "{text}");
    let tampered = text.replace("\"licenses\":5,", "\"licenses\":500,");
    let config = stored_config(dir.path());
    let start = |config: ServerConfig| try_start(config, &clock);
    // Edited in place: the snapshot no longer matches its digest.
    rusqlite::Connection::open(&store)
        .unwrap()
        .execute(
            "UPDATE raft_snapshot SET data = ?1 WHERE id = 1",
            [tampered.as_bytes()],
        )
        .unwrap();
    let error = start(config.clone()).await.err().expect("refused to start");
    let message = error.to_string();
    assert!(
        message.contains("snapshot: the snapshot does not match its digest")
            && message.contains("raft.sqlite3"),
        "{message}"
    );
    // Edited with the digest recomputed (T1 proper): the key in it does not verify.
    rewrite_snapshot(&store, tampered.as_bytes());
    let error = start(config.clone()).await.err().expect("refused to start");
    let message = error.to_string();
    assert!(
        message.contains("license key k-five") && message.contains("raft.sqlite3"),
        "{message}"
    );
    // Put back as it was, but trusting another vendor only: refused too, naming the key.
    rewrite_snapshot(&store, text.as_bytes());
    let other = dir.path().join("other.pub");
    std::fs::write(
        &other,
        SecretKey::from_seed([9; 32]).public_key().to_file_text(),
    )
    .unwrap();
    let error = start(ServerConfig {
        trust: vec![other],
        ..config.clone()
    })
    .await
    .err()
    .expect("refused to start");
    assert!(error.to_string().contains("license key k-five"), "{error}");
    // Trusting the vendor again: it starts, with its 5 licenses.
    let server = start(config).await.unwrap();
    let status = Client::new(&server.url(), None).status().await.unwrap();
    assert_eq!(status.components[0].licenses, 5);
    server.shutdown().await;
}

/// Attack T1, second form: lease rows dropped from the snapshot, its digest recomputed, so
/// the seat is issued again. Not detected on the server (no secret on it), but bounded
/// (docs/security.md): the forgotten lease's next heartbeat is refused, so its station
/// holds the seat only until the expiry its last answer named, one lease TTL at most.
#[tokio::test]
async fn lease_rows_dropped_from_the_snapshot_give_a_seat_twice_for_one_lease_ttl_at_most() {
    let f = Fixture::start().await;
    f.import(&f.key("k-one", &["cad"], 1)).await;
    let (held, _) = f.client().checkout(&request("cad", "ws-1")).await.unwrap();
    f.server.state.consensus.snapshot_now().await.unwrap();
    wait_for_snapshot(&f.server).await;
    let store = f.dir.path().join("data").join("raft.sqlite3");
    let secrets = f.secrets.clone();
    let Fixture {
        dir, clock, server, ..
    } = f;
    server.shutdown().await;
    let data = stored_snapshot(&store);
    let mut snapshot: serde_json::Value = serde_json::from_slice(&data).unwrap();
    assert_eq!(snapshot["leases"].as_array().unwrap().len(), 1);
    snapshot["leases"] = serde_json::json!([]);
    rewrite_snapshot(&store, &serde_json::to_vec(&snapshot).unwrap());

    let server = try_start(stored_config(dir.path()), &clock)
        .await
        .expect("not detected on the server");
    let client = Client::new(&server.url(), None).sharing_secrets(&secrets);
    // The attack's gain: the seat is issued again.
    client.checkout(&request("cad", "ws-2")).await.unwrap();
    // Its bound: the forgotten lease's station is refused at its next heartbeat, and the
    // lease it holds ends by the expiry it was given, within one lease TTL.
    let refused = client.heartbeat(&held.lease_id).await.unwrap_err();
    assert_eq!(code(refused).1, "lease_not_found");
    assert!(
        held.expires_at.as_millisecond() <= START_MS + LEASE_TTL.as_millis() as i64,
        "{held:?}"
    );
    server.shutdown().await;
}

/// The configuration [`start_server`] uses, for tests that start by hand to see a refusal.
/// Waits (polling, with a deadline) until the server has written the snapshot it was asked
/// for: the store is the server's alone while it runs.
async fn wait_for_snapshot(server: &RunningServer) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.state.consensus.status().snapshot_index.is_none() {
        assert!(std::time::Instant::now() < deadline, "no snapshot written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The stored snapshot's data (the ledger's JSON), read from the store file.
fn stored_snapshot(store: &Path) -> Vec<u8> {
    rusqlite::Connection::open(store)
        .unwrap()
        .query_row("SELECT data FROM raft_snapshot WHERE id = 1", [], |row| {
            row.get(0)
        })
        .unwrap()
}

/// Rewrites the stored snapshot's data, its digest recomputed.
fn rewrite_snapshot(store: &Path, data: &[u8]) {
    tessera_store::chain::tamper::rewrite_snapshot(store, data);
}

/// Rewrites the Raft log entry at `index`, its hash chain recomputed (see
/// `tessera_store::chain::tamper`).
fn rewrite_log_entry(store: &Path, index: i64, entry: &[u8]) {
    tessera_store::chain::tamper::rewrite_entry(store, index, entry);
}

fn stored_config(dir: &Path) -> ServerConfig {
    ServerConfig {
        data_dir: dir.join("data"),
        listen: "127.0.0.1:0".into(),
        trust: vec![dir.join("vendor.pub")],
        server_id: Some("srv-test".into()),
        lease_ttl: LEASE_TTL,
        ..ServerConfig::default()
    }
}

/// Starts a server with `config`, returning the start error if it refuses.
async fn try_start(
    config: ServerConfig,
    clock: &ManualClock,
) -> Result<RunningServer, tessera_server::error::StartError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tessera_server::start(
        listener,
        ServerOptions {
            config,
            clock: Arc::new(clock.clone()),
            ids: LeaseIds::from_seed([3; 32]),
            run_timers: false,
        },
    )
    .await
}

/// Attack T3: edit the key inside the log entry that imported it (5 licenses made 500, the
/// signature kept). Replaying it would silently drop the key; the server refuses to start,
/// naming the log entry and the key. A tampered key sent over the API is refused before it
/// is proposed, so it never reaches the log and a restart after it is clean.
#[tokio::test]
async fn a_log_entry_whose_key_does_not_verify_stops_the_start_naming_it() {
    let f = Fixture::start().await;
    let key = f.key("k-five", &["cad"], 5);
    // Tampered in transit: refused at once (422), and nothing is written.
    let tampered_json = key
        .to_json_pretty()
        .replace("\"licenses\": 5,", "\"licenses\": 50,");
    assert_ne!(tampered_json, key.to_json_pretty());
    let refused = f.admin().import_key(tampered_json).await.unwrap_err();
    assert!(
        refused.to_string().contains("key_bad_signature"),
        "{refused}"
    );
    f.import(&key).await;
    let store = f.dir.path().join("data").join("raft.sqlite3");
    let Fixture {
        dir, clock, server, ..
    } = f;
    server.shutdown().await;
    // A restart as it is: fine (the refused upload left nothing in the log).
    start_server(dir.path(), &clock, 2).await.shutdown().await;
    let connection = rusqlite::Connection::open(&store).unwrap();
    let (index, entry): (i64, Vec<u8>) = connection
        .query_row(
            "SELECT log_index, entry FROM raft_log WHERE CAST(entry AS TEXT) LIKE '%import_key%'",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    let text = String::from_utf8(entry).unwrap();
    assert!(text.contains("\"licenses\":5,"), "{text}");
    drop(connection);
    rewrite_log_entry(
        &store,
        index,
        text.replace("\"licenses\":5,", "\"licenses\":500,")
            .as_bytes(),
    );
    let error = try_start(stored_config(dir.path()), &clock)
        .await
        .err()
        .expect("refused to start");
    let message = error.to_string();
    assert!(
        message.contains(&format!("raft log entry {index}"))
            && message.contains("license key k-five")
            && message.contains("raft.sqlite3"),
        "{message}"
    );
    // Put back as it was: it starts, with its 5 licenses.
    rewrite_log_entry(&store, index, text.as_bytes());
    let server = start_server(dir.path(), &clock, 2).await;
    let status = Client::new(&server.url(), None).status().await.unwrap();
    assert_eq!(status.components[0].licenses, 5);
    server.shutdown().await;
}
