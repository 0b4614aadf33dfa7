//! The authority over real HTTP on 127.0.0.1 (port 0), with a real SQLite database in a
//! temporary directory and a manual clock: time moves only when a test moves it.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use serde_json::{Value, json};
use tempfile::TempDir;
use tessera_authority::{AuthorityConfig, RunningAuthority};
use tessera_core::sync::{SyncRequest, SyncRequestPayload, SyncResponse};
use tessera_core::{Clock, LicenseKey, PublicKey, SecretKey};

// The CLI module of the `tessera` binary, compiled here so its commands run end to end
// against a real authority. `run` (serve until Ctrl-C, print to stdout) is the binary's
// entry point and is not called from tests.
#[allow(dead_code)]
#[path = "../../tessera-cli/src/authority.rs"]
mod cli;

const DAY_MS: i64 = 86_400_000;
/// 2026-01-01T00:00:00Z.
const START_MS: i64 = 1_767_225_600_000;

struct ManualClock(AtomicI64);

impl ManualClock {
    fn advance_days(&self, days: i64) {
        self.0.fetch_add(days * DAY_MS, Ordering::SeqCst);
        STATED_MS.with(|stated| stated.set(stated.get() + days * DAY_MS));
    }
}

thread_local! {
    /// The time `request` states: a server whose clock agrees with the authority's. The test
    /// body runs on one thread, so the clock moved there moves what it states.
    static STATED_MS: std::cell::Cell<i64> = const { std::cell::Cell::new(START_MS) };
}

fn stated_now() -> jiff::Timestamp {
    jiff::Timestamp::from_millisecond(STATED_MS.with(std::cell::Cell::get)).unwrap()
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

struct Harness {
    dir: TempDir,
    clock: Arc<ManualClock>,
    authority: Option<RunningAuthority>,
    http: reqwest::Client,
}

impl Harness {
    async fn new() -> Harness {
        Harness::in_dir(tempfile::tempdir().unwrap()).await
    }

    async fn in_dir(dir: TempDir) -> Harness {
        let clock = Arc::new(ManualClock(AtomicI64::new(START_MS)));
        let authority = start(&dir, clock.clone()).await;
        Harness {
            dir,
            clock,
            authority: Some(authority),
            http: tessera_tls::client_builder_exactly(None)
                .unwrap()
                .build()
                .unwrap(),
        }
    }

    fn authority(&self) -> &RunningAuthority {
        self.authority.as_ref().unwrap()
    }

    fn token(&self) -> String {
        self.authority().admin_token.clone()
    }

    async fn restart(&mut self) {
        self.authority.take().unwrap().shutdown().await;
        self.authority = Some(start(&self.dir, self.clock.clone()).await);
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.authority().url()));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    async fn admin_get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, Some(&self.token()), None)
            .await
    }

    async fn admin_post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(&self.token()), Some(body))
            .await
    }

    async fn vendor_key(&self) -> PublicKey {
        let (status, text) = self
            .call(reqwest::Method::GET, "/v1/vendor.pub", None, None)
            .await;
        assert_eq!(status, 200);
        PublicKey::from_file_text(text.as_str().unwrap()).unwrap()
    }

    async fn add_server(&self, customer: &str) -> String {
        let (status, body) = self
            .admin_post(
                "/v1/servers",
                json!({"customer": customer, "create_customer": true}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["server_id"].as_str().unwrap().to_string()
    }

    async fn issue(&self, server_id: &str, valid_days: u32) -> LicenseKey {
        let (status, body) = self
            .admin_post(
                "/v1/keys",
                json!({"server_id": server_id, "components": ["cad", "cam"], "licenses": 10, "valid_days": valid_days}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        serde_json::from_value(body).unwrap()
    }

    async fn server_row(&self, server_id: &str) -> Value {
        let (status, body) = self.admin_get(&format!("/v1/servers/{server_id}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Online sync; returns the verified response or the error body.
    async fn sync(&self, request: &SyncRequest) -> Result<SyncResponse, (u16, Value)> {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/v1/sync",
                None,
                Some(serde_json::to_value(request).unwrap()),
            )
            .await;
        if status != 200 {
            return Err((status, body));
        }
        let response: SyncResponse = serde_json::from_value(body).unwrap();
        response.verify(&[self.vendor_key().await]).unwrap();
        Ok(response)
    }
}

async fn start(dir: &TempDir, clock: Arc<ManualClock>) -> RunningAuthority {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tessera_authority::start(
        listener,
        AuthorityConfig {
            data_dir: dir.path().to_path_buf(),
            clock,
            tls: None,
        },
    )
    .await
    .unwrap()
}

fn request(identity: &SecretKey, server_id: &str, sequence: u64, held: &[&str]) -> SyncRequest {
    SyncRequest::sign(
        SyncRequestPayload {
            server_id: server_id.into(),
            public_key: identity.public_key().to_base64(),
            sequence,
            nonce: format!("nonce-{sequence}-{}", identity.public_key().fingerprint()),
            created_at: stated_now(),
            keys: held.iter().map(|k| k.to_string()).collect(),
            // A server older than the sync chain: `chain.rs` tests the chained requests.
            last_response: None,
            pending_since: None,
            installation: None,
            history: None,
            links: Vec::new(),
            trust: None,
            counters: None,
            relayed: Vec::new(),
        },
        identity,
    )
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no code>")
}

fn ids(keys: &[LicenseKey]) -> Vec<&str> {
    keys.iter().map(LicenseKey::key_id).collect()
}

/// A sync's certificate: 30 days online by default (the vendor's choice per customer, 1 to
/// 366), 366 days by file (the reference's rule for air-gapped servers).
#[tokio::test]
async fn first_sync_binds_the_key_pair_and_certifies_it_30_days_online_and_366_by_file() {
    let h = Harness::new().await;
    let server_id = h.add_server("Acme Corp").await;
    let key = h.issue(&server_id, 30).await;
    let ours = SecretKey::from_seed([1; 32]);

    let response = h.sync(&request(&ours, &server_id, 1, &[])).await.unwrap();
    let payload = &response.payload;
    assert_eq!(payload.server_id, server_id);
    assert_eq!(payload.sequence, 1);
    assert_eq!(
        payload.request_nonce,
        request(&ours, &server_id, 1, &[]).payload.nonce
    );
    assert_eq!(ids(&payload.keys), [key.key_id()]);
    let certificate = &payload.certificate.payload;
    assert_eq!(certificate.public_key, ours.public_key().to_base64());
    assert_eq!(certificate.customer, "Acme Corp");
    assert_eq!(certificate.issued_at.as_millisecond(), START_MS);
    assert_eq!(
        certificate.valid_until.as_millisecond(),
        START_MS + 30 * DAY_MS
    );

    let row = h.server_row(&server_id).await;
    assert_eq!(row["key_fingerprint"], ours.public_key().fingerprint());
    assert_eq!(row["last_sequence"], 1);
    assert_eq!(row["bound_at"], row["last_sync_at"]);
    assert_eq!(
        row["certificate_valid_until"],
        jiff::Timestamp::from_millisecond(START_MS + 30 * DAY_MS)
            .unwrap()
            .to_string()
    );

    // The vendor gives this customer 90 days: a later online sync certifies from its time.
    let (status, body) = h
        .admin_post(
            "/v1/customers/Acme%20Corp/settings",
            json!({"online_certificate_days": 90}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["online_certificate_days"], 90);
    for days in [0, 367] {
        let (status, body) = h
            .admin_post(
                "/v1/customers/Acme%20Corp/settings",
                json!({"online_certificate_days": days}),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("between 1 and 366"),
            "{body}"
        );
    }
    h.clock.advance_days(10);
    let later = h.sync(&request(&ours, &server_id, 2, &[])).await.unwrap();
    assert_eq!(
        later
            .payload
            .certificate
            .payload
            .valid_until
            .as_millisecond(),
        START_MS + 100 * DAY_MS
    );

    // By file: 366 days, whatever the customer's online setting.
    h.clock.advance_days(10);
    let file = serde_json::to_value(request(&ours, &server_id, 3, &[])).unwrap();
    let (status, body) = h.admin_post("/v1/sync/process", file).await;
    assert_eq!(status, 200, "{body}");
    let by_file: SyncResponse = serde_json::from_value(body).unwrap();
    assert_eq!(
        by_file
            .payload
            .certificate
            .payload
            .valid_until
            .as_millisecond(),
        START_MS + (20 + 366) * DAY_MS
    );
    let row = h.server_row(&server_id).await;
    assert_eq!(
        row["certificate_valid_until"],
        jiff::Timestamp::from_millisecond(START_MS + 386 * DAY_MS)
            .unwrap()
            .to_string()
    );
}

#[tokio::test]
async fn another_key_pair_is_refused_and_nothing_changes_until_the_vendor_resets() {
    let h = Harness::new().await;
    let server_id = h.add_server("acme").await;
    let ours = SecretKey::from_seed([1; 32]);
    let thief = SecretKey::from_seed([2; 32]);
    h.sync(&request(&ours, &server_id, 1, &[])).await.unwrap();
    let before = h.server_row(&server_id).await;

    h.clock.advance_days(1);
    let (status, body) = h
        .sync(&request(&thief, &server_id, 2, &[]))
        .await
        .unwrap_err();
    assert_eq!((status, code(&body)), (409, "server_id_in_use"));
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("in use by another key pair"), "{message}");
    assert!(
        message.contains("tessera authority server reset"),
        "{message}"
    );
    assert_eq!(h.server_row(&server_id).await, before);

    // The rightful server still syncs.
    h.sync(&request(&ours, &server_id, 2, &[])).await.unwrap();

    // After a reset, the next key pair to sync binds, from sequence 1 again.
    let (status, reset) = h
        .admin_post(&format!("/v1/servers/{server_id}/reset"), json!({}))
        .await;
    assert_eq!(status, 200, "{reset}");
    assert_eq!(reset["public_key"], Value::Null);
    assert_eq!(reset["last_sequence"], 0);
    let rebound = h.sync(&request(&thief, &server_id, 1, &[])).await.unwrap();
    assert_eq!(
        rebound.payload.certificate.payload.public_key,
        thief.public_key().to_base64()
    );
    let (status, body) = h
        .sync(&request(&ours, &server_id, 3, &[]))
        .await
        .unwrap_err();
    assert_eq!((status, code(&body)), (409, "server_id_in_use"));
}

#[tokio::test]
async fn replayed_tampered_and_unknown_requests_are_refused() {
    let h = Harness::new().await;
    let server_id = h.add_server("acme").await;
    let ours = SecretKey::from_seed([1; 32]);
    let first = request(&ours, &server_id, 1, &[]);
    h.sync(&first).await.unwrap();

    let (status, body) = h.sync(&first).await.unwrap_err();
    assert_eq!((status, code(&body)), (409, "replayed_request"));
    h.sync(&request(&ours, &server_id, 5, &[])).await.unwrap();
    let (status, body) = h
        .sync(&request(&ours, &server_id, 4, &[]))
        .await
        .unwrap_err();
    assert_eq!((status, code(&body)), (409, "replayed_request"));
    assert_eq!(h.server_row(&server_id).await["last_sequence"], 5);

    let mut tampered = request(&ours, &server_id, 6, &[]);
    tampered.payload.sequence = 7;
    let (status, body) = h.sync(&tampered).await.unwrap_err();
    assert_eq!((status, code(&body)), (422, "bad_signature"));
    assert_eq!(h.server_row(&server_id).await["last_sequence"], 5);

    let (status, body) = h
        .sync(&request(&ours, "LS-0000-0000", 1, &[]))
        .await
        .unwrap_err();
    assert_eq!((status, code(&body)), (404, "unknown_server"));
}

#[tokio::test]
async fn revoked_expired_and_renewal_keys_are_sorted_into_their_lists() {
    let h = Harness::new().await;
    let server_id = h.add_server("acme").await;
    let other_server = h.add_server("acme").await;
    let kept = h.issue(&server_id, 365).await;
    let revoked = h.issue(&server_id, 365).await;
    let short = h.issue(&server_id, 10).await;
    let elsewhere = h.issue(&other_server, 365).await;

    let (status, info) = h
        .admin_post(&format!("/v1/keys/{}/revoke", revoked.key_id()), json!({}))
        .await;
    assert_eq!(status, 200, "{info}");
    assert!(info["revoked_at"].is_string());

    let (status, body) = h
        .admin_post(
            &format!("/v1/keys/{}/renewal", kept.key_id()),
            json!({"valid_days": 365, "licenses": 12}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let renewal: LicenseKey = serde_json::from_value(body).unwrap();
    assert_eq!(renewal.payload.renews.as_deref(), Some(kept.key_id()));
    assert_eq!(renewal.payload.valid_from, kept.payload.valid_until);
    assert_eq!(
        renewal.payload.server_id.as_deref(),
        Some(server_id.as_str())
    );
    renewal.verify(&[h.vendor_key().await]).unwrap();

    let (status, body) = h
        .admin_post(
            &format!("/v1/keys/{}/renewal", kept.key_id()),
            json!({"valid_days": 30}),
        )
        .await;
    assert_eq!((status, code(&body)), (409, "renewal_exists"));
    let (status, body) = h
        .admin_post("/v1/keys/K-NOTAKEY/renewal", json!({"valid_days": 30}))
        .await;
    assert_eq!((status, code(&body)), (404, "unknown_key"));

    h.clock.advance_days(11);
    let ours = SecretKey::from_seed([1; 32]);
    let response = h.sync(&request(&ours, &server_id, 1, &[])).await.unwrap();
    let payload = &response.payload;
    assert_eq!(ids(&payload.keys), [kept.key_id()]);
    assert_eq!(payload.revoked, [revoked.key_id()]);
    assert_eq!(ids(&payload.renewals), [renewal.key_id()]);
    assert!(!ids(&payload.keys).contains(&short.key_id()));
    assert!(!ids(&payload.keys).contains(&elsewhere.key_id()));

    // A key the server held is named revoked even after it expired; others are forgotten.
    h.admin_post(&format!("/v1/keys/{}/revoke", short.key_id()), json!({}))
        .await;
    let response = h
        .sync(&request(&ours, &server_id, 2, &[short.key_id()]))
        .await
        .unwrap();
    let mut revoked_ids = response.payload.revoked.clone();
    revoked_ids.sort();
    let mut expected = vec![revoked.key_id().to_string(), short.key_id().to_string()];
    expected.sort();
    assert_eq!(revoked_ids, expected);

    // The renewal key is held until its own end.
    h.clock.advance_days(365 + 365);
    let response = h.sync(&request(&ours, &server_id, 3, &[])).await.unwrap();
    assert!(response.payload.renewals.is_empty());
    assert!(response.payload.keys.is_empty());
}

#[tokio::test]
async fn admin_routes_and_the_process_endpoint_need_the_admin_token() {
    let h = Harness::new().await;
    let server_id = h.add_server("acme").await;
    let ours = SecretKey::from_seed([1; 32]);
    let file = serde_json::to_value(request(&ours, &server_id, 1, &[])).unwrap();

    for (method, path) in [
        (reqwest::Method::GET, "/v1/customers"),
        (reqwest::Method::GET, "/v1/servers"),
        (reqwest::Method::GET, "/v1/keys"),
        (reqwest::Method::POST, "/v1/sync/process"),
    ] {
        for token in [None, Some("0".repeat(64))] {
            let (status, body) = h
                .call(method.clone(), path, token.as_deref(), Some(file.clone()))
                .await;
            assert_eq!((status, code(&body)), (401, "unauthorized"), "{path}");
        }
    }
    assert_eq!(h.server_row(&server_id).await["last_sequence"], 0);

    let (status, body) = h.admin_post("/v1/sync/process", file.clone()).await;
    assert_eq!(status, 200, "{body}");
    let response: SyncResponse = serde_json::from_value(body).unwrap();
    response.verify(&[h.vendor_key().await]).unwrap();
    // Same rules as online: the same file twice is a replay.
    let (status, body) = h.admin_post("/v1/sync/process", file).await;
    assert_eq!((status, code(&body)), (409, "replayed_request"));

    let (status, body) = h.call(reqwest::Method::GET, "/healthz", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(body["vendor_key"], h.vendor_key().await.fingerprint());
}

#[tokio::test]
async fn bad_bodies_and_routes_get_the_stable_error_body() {
    let h = Harness::new().await;
    let url = h.authority().url();
    let send = |path: &str, body: Vec<u8>| {
        h.http
            .post(format!("{url}{path}"))
            .bearer_auth(h.token())
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let response = send("/v1/sync", vec![b' '; 65 * 1024]).await.unwrap();
    assert_eq!(response.status().as_u16(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(code(&body), "body_too_large");

    let response = send("/v1/customers", b"{\"name\":".to_vec()).await.unwrap();
    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(code(&response.json().await.unwrap()), "malformed_json");

    let (status, body) = h
        .admin_post("/v1/customers", json!({"name": "acme", "colour": "red"}))
        .await;
    assert_eq!((status, code(&body)), (400, "malformed_json"));
    let (status, body) = h.admin_post("/v1/customers", json!({"name": " "})).await;
    assert_eq!((status, code(&body)), (400, "invalid_request"));
    let (status, body) = h
        .admin_post("/v1/servers", json!({"customer": "nobody"}))
        .await;
    assert_eq!((status, code(&body)), (404, "unknown_customer"));
    let (status, body) = h
        .admin_post(
            "/v1/keys",
            json!({"server_id": "LS-0000-0000", "components": ["cad"], "licenses": 1, "valid_days": 1}),
        )
        .await;
    assert_eq!((status, code(&body)), (404, "unknown_server"));
    let (status, body) = h.admin_get("/v1/nothing").await;
    assert_eq!((status, code(&body)), (404, "no_route"));
    let (status, body) = h
        .call(reqwest::Method::DELETE, "/v1/keys", Some(&h.token()), None)
        .await;
    assert_eq!((status, code(&body)), (405, "method_not_allowed"));
}

#[tokio::test]
async fn everything_survives_a_restart() {
    let mut h = Harness::new().await;
    let token = h.token();
    let vendor = h.vendor_key().await;
    let server_id = h.add_server("acme").await;
    let key = h.issue(&server_id, 30).await;
    let ours = SecretKey::from_seed([1; 32]);
    h.sync(&request(&ours, &server_id, 1, &[])).await.unwrap();

    h.restart().await;
    assert_eq!(h.token(), token);
    assert_eq!(h.vendor_key().await, vendor);
    let (status, stored) = h.admin_get(&format!("/v1/keys/{}", key.key_id())).await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_value::<LicenseKey>(stored).unwrap(), key);
    let (_, keys) = h.admin_get("/v1/keys").await;
    assert_eq!(keys.as_array().unwrap().len(), 1);
    // The binding and the sequence survived too.
    let (status, body) = h
        .sync(&request(&ours, &server_id, 1, &[]))
        .await
        .unwrap_err();
    assert_eq!((status, code(&body)), (409, "replayed_request"));
    let response = h.sync(&request(&ours, &server_id, 2, &[])).await.unwrap();
    assert_eq!(ids(&response.payload.keys), [key.key_id()]);
}

#[tokio::test]
async fn a_vendor_key_made_by_vendor_init_is_used_and_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let vendor = SecretKey::from_seed([42; 32]);
    std::fs::write(dir.path().join("vendor.key"), vendor.to_file_text()).unwrap();
    let h = Harness::in_dir(dir).await;
    assert_eq!(h.vendor_key().await, vendor.public_key());
    let mode = |name: &str| {
        std::fs::metadata(h.dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("admin.token"), 0o600);
    assert!(h.dir.path().join("authority.sqlite").exists());
    let token = std::fs::read_to_string(h.dir.path().join("admin.token")).unwrap();
    assert_eq!(token.trim(), h.token());
    assert_eq!(h.token().len(), 64);
}

// ---- the CLI module -------------------------------------------------------------------------

#[derive(clap::Parser)]
struct TestCli {
    #[command(subcommand)]
    command: Top,
}

#[derive(clap::Subcommand)]
enum Top {
    Authority(cli::AuthorityArgs),
}

/// Runs `tessera authority ARGS --authority URL --token T`; returns stdout.
async fn tessera(h: &Harness, args: &[&str]) -> anyhow::Result<String> {
    use clap::Parser;
    let mut argv = vec!["tessera", "authority"];
    argv.extend_from_slice(args);
    let url = h.authority().url();
    let token = h.token();
    argv.extend_from_slice(&["--authority", &url, "--token", &token]);
    let Top::Authority(parsed) = TestCli::try_parse_from(argv)?.command;
    let mut out = Vec::new();
    cli::run_command(parsed.command.expect("a subcommand"), &mut out).await?;
    Ok(String::from_utf8(out).unwrap())
}

fn last_line(text: &str) -> &str {
    text.lines().last().unwrap_or("")
}

#[path = "authority/chain.rs"]
mod chain;
#[path = "authority/clock.rs"]
mod clock;

#[test]
fn the_cli_definition_is_consistent() {
    use clap::{CommandFactory, Parser};
    TestCli::command().debug_assert();
    let Top::Authority(serve) =
        TestCli::try_parse_from(["tessera", "authority", "--data", "/d", "--listen", "0:0"])
            .unwrap()
            .command;
    assert!(serve.command.is_none());
    assert_eq!(serve.listen, "0:0");
    let Top::Authority(defaults) = TestCli::try_parse_from(["tessera", "authority"])
        .unwrap()
        .command;
    assert_eq!(defaults.listen, "127.0.0.1:7450");
    assert_eq!(defaults.data, std::path::Path::new("./tessera-authority"));
    // Service flags and subcommands do not mix.
    assert!(
        TestCli::try_parse_from(["tessera", "authority", "--data", "/d", "customer", "list"])
            .is_err()
    );
}

#[tokio::test]
async fn the_cli_drives_the_whole_vendor_workflow() {
    let h = Harness::new().await;
    let work = tempfile::tempdir().unwrap();
    let path = |name: &str| work.path().join(name).display().to_string();

    tessera(&h, &["customer", "add", "--name", "Globex"])
        .await
        .unwrap();
    let server_id = last_line(
        &tessera(&h, &["server", "add", "--customer", "Acme"])
            .await
            .unwrap(),
    )
    .to_string();
    assert!(
        tessera_authority::ids::is_server_id(&server_id),
        "{server_id}"
    );
    let customers = tessera(&h, &["customer", "list"]).await.unwrap();
    assert!(
        customers.contains("Acme") && customers.contains("Globex"),
        "{customers}"
    );

    let key_file = path("key.json");
    let issued = tessera(
        &h,
        &[
            "key",
            "issue",
            "--server-id",
            &server_id,
            "--components",
            "cad,cam",
            "--licenses",
            "5",
            "--valid-days",
            "30",
            "--out",
            &key_file,
        ],
    )
    .await
    .unwrap();
    let key_id = last_line(&issued).to_string();
    let key = LicenseKey::from_json(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    assert_eq!(key.key_id(), key_id);
    assert_eq!(key.payload.components, ["cad", "cam"]);

    let renewed = tessera(
        &h,
        &[
            "key",
            "renew",
            "--key",
            &key_id,
            "--valid-days",
            "365",
            "--licenses",
            "7",
        ],
    )
    .await
    .unwrap();
    let renewal_id = last_line(&renewed).to_string();
    let listed: Vec<Value> =
        serde_json::from_str(&tessera(&h, &["key", "list", "--json"]).await.unwrap()).unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().any(|k| k["renews"] == key_id.as_str()));
    assert!(
        tessera(&h, &["key", "list"])
            .await
            .unwrap()
            .contains(&renewal_id)
    );

    // An air-gapped site's request file, processed by the vendor.
    let ours = SecretKey::from_seed([1; 32]);
    let request_file = path("request.json");
    let response_file = path("response.json");
    std::fs::write(
        &request_file,
        serde_json::to_string_pretty(&request(&ours, &server_id, 1, &[])).unwrap(),
    )
    .unwrap();
    let processed = tessera(
        &h,
        &["process", "--in", &request_file, "--out", &response_file],
    )
    .await
    .unwrap();
    assert!(processed.contains("1 keys, 1 renewal keys"), "{processed}");
    let response =
        SyncResponse::from_json(&std::fs::read_to_string(&response_file).unwrap()).unwrap();
    response.verify(&[h.vendor_key().await]).unwrap();
    assert_eq!(ids(&response.payload.keys), [key_id.as_str()]);

    let servers: Vec<Value> =
        serde_json::from_str(&tessera(&h, &["server", "list", "--json"]).await.unwrap()).unwrap();
    assert_eq!(
        servers[0]["key_fingerprint"],
        ours.public_key().fingerprint()
    );
    assert!(
        tessera(&h, &["server", "list"])
            .await
            .unwrap()
            .contains(&server_id)
    );

    // The same file again is refused, with the code in the message.
    let error = tessera(
        &h,
        &["process", "--in", &request_file, "--out", &response_file],
    )
    .await
    .unwrap_err();
    assert!(error.to_string().contains("replayed_request"), "{error}");

    tessera(&h, &["server", "reset", &server_id.to_lowercase()])
        .await
        .unwrap();
    assert_eq!(h.server_row(&server_id).await["public_key"], Value::Null);

    tessera(&h, &["key", "revoke", &key_id]).await.unwrap();
    let exported = tessera(&h, &["key", "export", &key_id]).await.unwrap();
    assert_eq!(LicenseKey::from_json(&exported).unwrap(), key);

    let error = tessera(&h, &["key", "revoke", "K-NOPE"]).await.unwrap_err();
    assert!(error.to_string().contains("unknown_key"), "{error}");
}

#[tokio::test]
async fn the_cli_without_a_token_says_where_to_find_it() {
    use clap::Parser;
    let h = Harness::new().await;
    let url = h.authority().url();
    let Top::Authority(parsed) = TestCli::try_parse_from([
        "tessera",
        "authority",
        "customer",
        "list",
        "--authority",
        &url,
    ])
    .unwrap()
    .command;
    let mut out = Vec::new();
    // The environment may carry a token; only assert when it does not.
    if std::env::var_os("TESSERA_AUTHORITY_TOKEN").is_none() {
        let error = cli::run_command(parsed.command.unwrap(), &mut out)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("admin.token"), "{error}");
    }
}

#[tokio::test]
async fn the_console_shows_servers_keys_and_renewals_only_after_signing_in() {
    let h = Harness::new().await;
    let server_id = h.add_server("Acme <Corp>").await;
    let key = h.issue(&server_id, 30).await;
    let url = h.authority().url();
    let browser = tessera_tls::client_builder_exactly(None)
        .unwrap()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let anonymous = browser
        .get(format!("{url}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(anonymous.contains("name=token") && !anonymous.contains(&server_id));
    let wrong = browser
        .get(format!("{url}/login?token=nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    // No framing, no scripts, no sniffing (the console holds the vendor's keys).
    let headers = wrong.headers();
    assert!(
        headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let signed_in = browser
        .get(format!("{url}/login?token={}", h.token()))
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status().as_u16(), 303);
    let cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && !cookie.contains(&h.token()),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    let page = browser
        .get(format!("{url}/"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(&server_id) && page.contains(key.key_id()),
        "{page}"
    );
    assert!(page.contains("Acme &lt;Corp&gt;"), "escaped: {page}");
    assert!(page.contains("Renewal keys") && page.contains("not bound"));
}
