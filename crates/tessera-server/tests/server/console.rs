//! The web console, usage history and audit chain, through the real HTTP server.

use reqwest::redirect::Policy;
use reqwest::{Method, StatusCode};

use super::{Fixture, RunningServer, request};

pub(super) fn http() -> reqwest::Client {
    tessera_tls::client_builder_exactly(None)
        .unwrap()
        .redirect(Policy::none())
        .build()
        .unwrap()
}

/// Logs in with the admin token; returns the session cookie and the CSRF token.
pub(super) async fn login(f: &Fixture) -> (String, String) {
    login_to(&f.server).await
}

/// [`login`] to any running server.
pub(super) async fn login_to(server: &RunningServer) -> (String, String) {
    let response = http()
        .post(format!("{}/login", server.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}&next=%2F", server.state.admin_token))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()["location"], "/");
    let set_cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
    assert!(set_cookie.contains("SameSite=Strict"), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let (status, html) = page_of(server, &cookie, "/").await;
    assert_eq!(status, 200);
    (cookie, csrf_of(&html))
}

fn csrf_of(html: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = html.find(marker).expect("a CSRF field") + marker.len();
    html[start..start + 64].to_string()
}

pub(super) async fn page(f: &Fixture, cookie: &str, path: &str) -> (u16, String) {
    page_of(&f.server, cookie, path).await
}

/// [`page`] of any running server.
pub(super) async fn page_of(server: &RunningServer, cookie: &str, path: &str) -> (u16, String) {
    let response = http()
        .get(format!("{}{path}", server.url()))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn post_form(f: &Fixture, cookie: &str, path: &str, body: &str) -> reqwest::Response {
    http()
        .post(format!("{}{path}", f.server.url()))
        .header("cookie", cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

pub(super) async fn admin_get(f: &Fixture, path: &str) -> (u16, String) {
    let response = http()
        .get(format!("{}{path}", f.server.url()))
        .bearer_auth(&f.server.state.admin_token)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn console_pages_need_a_login_and_a_wrong_token_is_refused() {
    let f = Fixture::start().await;
    for path in ["/", "/leases", "/usage", "/sync", "/events", "/neighbours"] {
        let response = http()
            .get(format!("{}{path}", f.server.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "{path}");
        let location = response.headers()["location"].to_str().unwrap();
        assert!(location.starts_with("/login?next="), "{location}");
    }
    // htmx fragments and actions answer 401 with the JSON error body.
    let response = http()
        .get(format!("{}/leases/table", f.server.url()))
        .header("hx-request", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    let (status, body) = super::raw(
        &format!("{}/leases/x/release", f.server.url()),
        Method::POST,
        "csrf=x",
        "application/x-www-form-urlencoded",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    // A wrong token: the login form again, 401, no cookie.
    let response = http()
        .post(format!("{}/login", f.server.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=wrong&next=%2F")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().get("set-cookie").is_none());
    // The login page and htmx are served without a session.
    let (status, html) = page(&f, "", "/login").await;
    assert_eq!(status, 200);
    assert!(html.contains("name=\"token\""));
    let response = http()
        .get(format!("{}/assets/htmx.min.js", f.server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.text().await.unwrap().contains("htmx"));
}

#[tokio::test]
async fn login_shows_keys_domain_and_escapes_what_stations_send() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad", "cam"], 3)).await;
    let mut evil = request("cad", "<script>alert(1)</script>");
    evil.user = "\"onmouseover=x".into();
    f.client().checkout(&evil).await.unwrap();
    let (cookie, _) = login(&f).await;
    let (status, html) = page(&f, &cookie, "/").await;
    assert_eq!(status, 200);
    assert!(html.contains("k1"), "{html}");
    assert!(html.contains("id=\"domain-tile\""));
    assert!(
        html.contains("Host 1") && html.contains("Running"),
        "a tile per host"
    );
    assert!(html.contains("primary"));
    assert!(html.contains("/keys/k1/export"));
    // No key bound to this server, no authority: the sync tile does not alarm.
    assert!(
        html.contains("<span class=\"ok\">not required</span>")
            && !html.contains("not synchronized"),
        "{html}"
    );
    let (status, html) = page(&f, &cookie, "/leases").await;
    assert_eq!(status, 200);
    assert!(
        !html.contains("<script>alert(1)"),
        "station names are escaped"
    );
    assert!(
        html.contains("&#60;script&#62;alert(1)&#60;/script&#62;"),
        "{html}"
    );
    assert!(!html.contains("\"onmouseover=x"));
    let (status, exported) = page(&f, &cookie, "/keys/k1/export").await;
    assert_eq!(status, 200);
    assert!(exported.contains("\"key_id\""));
    // The token link logs in too (for scripts and headless browsers), to a local path only.
    let response = http()
        .get(format!(
            "{}/login?token={}&next=https://evil.example/",
            f.server.url(),
            f.server.state.admin_token
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()["location"], "/");
}

#[tokio::test]
async fn leases_are_listed_filtered_and_force_released_after_confirmation() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad"], 5)).await;
    let (lease, _) = f.client().checkout(&request("cad", "ws-1")).await.unwrap();
    f.client().checkout(&request("cad", "ws-2")).await.unwrap();
    let (cookie, csrf) = login(&f).await;
    let (_, html) = page(&f, &cookie, "/leases").await;
    assert!(html.contains("ws-1") && html.contains("ws-2"), "{html}");
    // The htmx filter answers the table alone.
    let response = http()
        .get(format!("{}/leases/table?station=ws-1", f.server.url()))
        .header("cookie", &cookie)
        .header("hx-request", "true")
        .send()
        .await
        .unwrap();
    let table = response.text().await.unwrap();
    assert!(table.starts_with("<div id=\"leases\""), "{table}");
    assert!(table.contains("ws-1") && !table.contains("ws-2"), "{table}");
    assert!(table.contains("1 lease match the filter"), "{table}");
    // Exact unless it ends in `*`: ws- finds nothing, ws-* both.
    for (query, expected) in [
        ("station=ws-", 0),
        ("station=ws-*", 2),
        ("user=an", 0),
        ("user=ann", 2),
    ] {
        let table = http()
            .get(format!("{}/leases/table?{query}", f.server.url()))
            .header("cookie", &cookie)
            .header("hx-request", "true")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(
            table.matches("class=\"lease\"").count(),
            expected,
            "{query}: {table}"
        );
    }
    // The confirmation step changes nothing.
    let (status, confirm) = page(&f, &cookie, &format!("/leases/{}/release", lease.lease_id)).await;
    assert_eq!(status, 200);
    assert!(confirm.contains("Release this lease?"));
    assert!(confirm.contains("ws-1"));
    assert_eq!(f.client().status().await.unwrap().leases.len(), 2);
    // Without the CSRF token: refused, nothing released.
    let path = format!("/leases/{}/release", lease.lease_id);
    let refused = post_form(&f, &cookie, &path, "csrf=forged").await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "csrf_token_invalid");
    assert_eq!(f.client().status().await.unwrap().leases.len(), 2);
    // Confirmed: released, back to the list.
    let done = post_form(&f, &cookie, &path, &format!("csrf={csrf}")).await;
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    let status = f.client().status().await.unwrap();
    assert_eq!(status.leases.len(), 1);
    assert_eq!(status.leases[0].station, "ws-2");
    let (_, html) = page(&f, &cookie, "/leases?released=ws-1").await;
    assert!(html.contains("Released the lease of ws-1."));
    // The station's next heartbeat is refused.
    assert!(f.client().heartbeat(&lease.lease_id).await.is_err());
    // Logging out ends the session.
    let out = post_form(&f, &cookie, "/logout", &format!("csrf={csrf}")).await;
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    let (status, _) = page(&f, &cookie, "/leases").await;
    assert_eq!(status, 303);
}

#[tokio::test]
async fn usage_history_records_every_event_and_exports_csv_and_json() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad"], 1)).await;
    let (first, created) = f.client().checkout(&request("cad", "ws-1")).await.unwrap();
    assert!(created);
    f.client().checkout(&request("cad", "ws-1")).await.unwrap();
    assert!(f.client().checkout(&request("cad", "ws-2")).await.is_err());
    f.client().checkin(&first.lease_id).await.unwrap();
    let (second, _) = f.client().checkout(&request("cad", "ws-3")).await.unwrap();
    f.clock.advance_ms(super::LEASE_TTL.as_millis() as i64);
    assert_eq!(f.server.state.tick().await.unwrap(), 1);
    let (third, _) = f.client().checkout(&request("cad", "ws-4")).await.unwrap();
    f.admin().force_release(&third.lease_id).await.unwrap();
    f.admin().remove_key("k1").await.unwrap();

    let (status, csv) = admin_get(&f, "/v1/reports/usage?format=csv").await;
    assert_eq!(status, 200, "{csv}");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "time,kind,component,station,user,host,key_id,lease_id,delta,detail"
    );
    let kinds: Vec<(&str, &str)> = lines[1..]
        .iter()
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            (fields[1], fields[3])
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("key_imported", ""),
            ("granted", "ws-1"),
            ("existing", "ws-1"),
            ("denied", "ws-2"),
            ("checkin", "ws-1"),
            ("granted", "ws-3"),
            ("expired", "ws-3"),
            ("granted", "ws-4"),
            ("force_release", "ws-4"),
            ("key_removed", ""),
        ]
    );
    assert!(csv.contains(&second.lease_id));
    assert!(lines[4].contains("no_licenses_available"), "{}", lines[4]);

    let (status, json) = admin_get(&f, "/v1/reports/usage?format=json&from=2000-01-01").await;
    assert_eq!(status, 200);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), 10);
    assert_eq!(rows[1]["kind"], "granted");
    assert_eq!(rows[1]["user"], "ann");
    assert_eq!(rows[1]["component"], "cad");
    // A range before any event is empty; bad input is a JSON error; the token is needed.
    let (_, empty) = admin_get(&f, "/v1/reports/usage?to=2000-01-01").await;
    assert_eq!(empty.lines().count(), 1);
    let (status, bad) = admin_get(&f, "/v1/reports/usage?from=yesterday").await;
    assert_eq!(status, 400);
    assert!(bad.contains("invalid_query"));
    let (status, _) = super::raw(
        &format!("{}/v1/reports/usage", f.server.url()),
        Method::GET,
        "",
        "text/plain",
    )
    .await;
    assert_eq!(status, 401);

    // The console: chart, peak, denials, CSV link.
    let (cookie, _) = login(&f).await;
    let (status, html) = page(&f, &cookie, "/usage").await;
    assert_eq!(status, 200);
    assert!(html.contains("<svg id=\"usage-chart\""), "{html}");
    assert!(html.contains("<polyline class=\"series\""));
    // cad: no licenses now (its key was removed), a peak of 1, one denial; axis in UTC.
    assert!(
        html.contains("<td>cad</td><td>0</td><td>1</td><td>1</td>"),
        "{html}"
    );
    assert!(html.contains(">UTC</text>"), "{html}");
    for bucket in ["day", "month"] {
        let (status, html) = page(&f, &cookie, &format!("/usage?bucket={bucket}")).await;
        assert_eq!(status, 200);
        assert!(html.contains("<polyline"));
    }
    let (status, console_csv) = page(&f, &cookie, "/usage.csv").await;
    assert_eq!(status, 200);
    assert_eq!(console_csv, csv);
}

#[tokio::test]
async fn the_audit_chain_names_the_first_tampered_record() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad"], 2)).await;
    let (lease, _) = f.client().checkout(&request("cad", "ws-1")).await.unwrap();
    f.admin().force_release(&lease.lease_id).await.unwrap();
    login(&f).await;
    let (status, body) = admin_get(&f, "/v1/audit/verify").await;
    assert_eq!(status, 200);
    let verification: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(verification["ok"], true, "{body}");
    let records = verification["records"].as_i64().unwrap();
    // key import (ledger + API request), checkout, force-release (ledger + API), login.
    assert!(records >= 6, "{body}");
    let actions: Vec<String> = {
        let path = f.dir.path().join("data").join("usage.sqlite3");
        let connection = rusqlite::Connection::open(&path).unwrap();
        let mut statement = connection
            .prepare("SELECT action FROM audit_log ORDER BY seq")
            .unwrap();
        statement
            .query_map([], |row| row.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    for wanted in [
        "key.key_imported",
        "lease.granted",
        "lease.force_release",
        "api POST /v1/leases/{lease_id}/release",
        "console.login",
    ] {
        assert!(
            actions.iter().any(|a| a == wanted),
            "{wanted} in {actions:?}"
        );
    }

    // Change one record behind the server's back.
    let path = f.dir.path().join("data").join("usage.sqlite3");
    let connection = rusqlite::Connection::open(&path).unwrap();
    connection
        .execute(
            "UPDATE audit_log SET details = '{\"station\":\"someone-else\"}' WHERE seq = 3",
            [],
        )
        .unwrap();
    let (_, body) = admin_get(&f, "/v1/audit/verify").await;
    let verification: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(verification["ok"], false, "{body}");
    assert_eq!(verification["broken_seq"], 3, "{body}");
    let offline = tessera_server::history::verify_data_dir(&f.dir.path().join("data")).unwrap();
    assert!(!offline.ok);
    assert_eq!(offline.broken_seq, Some(3));

    // Deleting a record is found too.
    connection
        .execute("DELETE FROM audit_log WHERE seq = 2", [])
        .unwrap();
    let offline = tessera_server::history::verify_data_dir(&f.dir.path().join("data")).unwrap();
    assert_eq!(offline.broken_seq, Some(3));
    let (cookie, _) = login(&f).await;
    let (_, html) = page(&f, &cookie, "/events").await;
    assert!(html.contains("BROKEN at record 3"), "{html}");
}

#[tokio::test]
async fn the_chain_continues_across_a_restart() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad"], 2)).await;
    f.server.state.history.flush();
    let f = f.restart().await;
    f.client().checkout(&request("cad", "ws-1")).await.unwrap();
    let verification = f.server.state.history.verify().unwrap();
    assert!(verification.ok, "{verification:?}");
    assert!(verification.records >= 3);
}

#[tokio::test]
async fn sync_and_notifications_pages_render() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad"], 2)).await;
    let (cookie, csrf) = login(&f).await;
    // Every page's title is plain text, what the browser's tab shows.
    for path in ["/", "/leases", "/usage", "/sync", "/events", "/neighbours"] {
        let (_, html) = page(&f, &cookie, path).await;
        let title = html
            .split("<title>")
            .nth(1)
            .and_then(|rest| rest.split("</title>").next())
            .unwrap_or_default();
        assert!(
            title.ends_with(" · Tessera") && !title.contains('<'),
            "{path}: {title}"
        );
    }
    let (status, html) = page(&f, &cookie, "/sync").await;
    assert_eq!(status, 200);
    assert!(html.contains("srv-test"));
    assert!(html.contains("enctype=\"multipart/form-data\""));
    // The manual's trigger: check for updates and replace license keys, from the console.
    assert!(
        html.contains("Check for updates and replace license keys"),
        "{html}"
    );
    let response = post_form(&f, &cookie, "/sync/update", &format!("csrf={csrf}")).await;
    let html = response.text().await.unwrap();
    assert!(html.contains("No renewal key held"), "{html}");
    let mut renewal = f.key("k2", &["cad"], 2).payload.clone();
    renewal.renews = Some("k1".into());
    let renewal = tessera_core::LicenseKey::sign(renewal, &f.vendor).unwrap();
    f.import(&renewal).await;
    let response = post_form(&f, &cookie, "/sync/update", &format!("csrf={csrf}")).await;
    let html = response.text().await.unwrap();
    assert!(
        html.contains("k1 replaced by k2 (allocated to everything it served)."),
        "{html}"
    );
    let (status, html) = page(&f, &cookie, "/events").await;
    assert_eq!(status, 200);
    assert!(html.contains("key_imported"), "{html}");
    assert!(html.contains("intact"));
    assert!(html.contains("<td>console.login</td>"), "{html}");
    assert!(html.contains("<td>key.key_imported</td>"), "{html}");
    // A server without neighbours says how to add them, and offers no donation form.
    let (status, html) = page(&f, &cookie, "/neighbours").await;
    assert_eq!(status, 200);
    assert!(html.contains("No neighbours configured"), "{html}");
    assert!(!html.contains("action=\"/neighbours/donate\""), "{html}");
    // Exporting a sync request from the console gives the signed request file.
    let response = post_form(&f, &cookie, "/sync/request", &format!("csrf={csrf}")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .contains("request.tsync")
    );
    // A bad response file is shown as an error on the page.
    let boundary = "tessera-test-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n{csrf}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"r.tsync\"\r\n\
         Content-Type: application/octet-stream\r\n\r\nnot a response\r\n--{boundary}--\r\n"
    );
    let response = http()
        .post(format!("{}/sync/response", f.server.url()))
        .header("cookie", &cookie)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let html = response.text().await.unwrap();
    assert!(html.contains("class=\"error\""), "{html}");
}

#[tokio::test]
async fn an_admin_user_logs_in_with_an_argon2_password() {
    let f = Fixture::start().await;
    let config = tessera_server::ServerConfig {
        data_dir: f.dir.path().join("users-data"),
        listen: "127.0.0.1:0".into(),
        trust: vec![f.dir.path().join("vendor.pub")],
        admin_users: vec![tessera_server::config::AdminUser {
            name: "ann".into(),
            password_hash: tessera_server::console::hash_password("s3cret pass").unwrap(),
        }],
        ..tessera_server::ServerConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = tessera_server::start(
        listener,
        tessera_server::ServerOptions {
            config,
            clock: std::sync::Arc::new(f.clock.clone()),
            ids: tessera_server::ids::LeaseIds::from_seed([9; 32]),
            run_timers: false,
        },
    )
    .await
    .unwrap();
    let (_, form) = {
        let response = http()
            .get(format!("{}/login", server.url()))
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    };
    assert!(form.contains("name=\"password\""), "{form}");
    let attempt = |password: &'static str| {
        http()
            .post(format!("{}/login", server.url()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("name=ann&password={password}&next=%2Fleases"))
            .send()
    };
    let wrong = attempt("wrong").await.unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let right = attempt("s3cret+pass").await.unwrap();
    assert_eq!(right.status(), StatusCode::SEE_OTHER);
    assert_eq!(right.headers()["location"], "/leases");
    let cookie = right.headers()["set-cookie"].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_string();
    let html = http()
        .get(format!("{}/leases", server.url()))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("ann ·"), "{html}");
    let verification = server.state.history.verify().unwrap();
    assert!(verification.ok);
    server.shutdown().await;
}

/// An outsider's tricks on the console: framing it, sniffing content, a login link that
/// leads off-site (`/%09/evil.example`: browsers drop the tab), guessing the token.
#[tokio::test]
async fn the_console_refuses_framing_off_site_redirects_and_token_guessing() {
    let f = Fixture::start().await;
    let response = http()
        .get(format!("{}/login", f.server.url()))
        .send()
        .await
        .unwrap();
    let headers = response.headers();
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    assert!(
        headers.get("strict-transport-security").is_none(),
        "HSTS only under HTTPS"
    );
    let html = response.text().await.unwrap();
    assert!(
        !html.contains("<script>"),
        "no inline script: the CSP forbids it"
    );

    let token = f.server.state.admin_token.clone();
    for next in [
        "/%09/evil.example",
        "//evil.example",
        "/%5Cevil.example",
        "https://evil.example",
        "/%0A/evil.example",
    ] {
        let response = http()
            .post(format!("{}/login", f.server.url()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={token}&next={next}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "{next}");
        assert_eq!(response.headers()["location"], "/", "{next}");
    }
    let response = http()
        .post(format!("{}/login", f.server.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={token}&next=%2Fusage%3Ffrom%3D2026"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["location"], "/usage?from=2026");

    // Five wrong guesses in a minute: the address waits for the next guess (form or link).
    let try_token = |token: String| {
        let url = format!("{}/login", f.server.url());
        async move {
            http()
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("token={token}&next=%2F"))
                .send()
                .await
                .unwrap()
        }
    };
    for _ in 0..5 {
        assert_eq!(
            try_token("guess".into()).await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    let blocked = try_token("guess".into()).await;
    assert_eq!(blocked.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(blocked.headers()["retry-after"], "60");
    assert!(
        blocked
            .text()
            .await
            .unwrap()
            .contains("too many failed logins")
    );
    let link = http()
        .get(format!("{}/login?token=guess", f.server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        link.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the login link too"
    );
    // The administrator, behind the same address, is not locked out.
    assert_eq!(
        try_token(token.clone()).await.status(),
        StatusCode::SEE_OTHER
    );
    // Guessing in parallel does not slip through: at most five more failures count.
    for _ in 0..5 {
        try_token("guess".into()).await;
    }
    let guesses: Vec<_> = (0..8)
        .map(|_| tokio::spawn(try_token("guess".into())))
        .collect();
    let mut statuses = Vec::new();
    for guess in guesses {
        statuses.push(guess.await.unwrap().status());
    }
    assert!(
        statuses.iter().all(|s| *s == StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    // A minute later (the server's clock), guesses are answered again.
    f.clock.advance_ms(60_000);
    assert_eq!(
        try_token("guess".into()).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

/// A station's user name that is a spreadsheet formula reaches the CSV export as text.
#[tokio::test]
async fn csv_exports_do_not_carry_formulas_from_stations() {
    let f = Fixture::start().await;
    f.import(&f.key("k1", &["cad"], 2)).await;
    let mut evil = request("cad", "ws-1");
    evil.user = "=HYPERLINK(\"http://evil.example\",\"x\")".into();
    evil.host = "@SUM(A1)".into();
    f.client().checkout(&evil).await.unwrap();
    let (status, csv) = admin_get(&f, "/v1/reports/usage?format=csv").await;
    assert_eq!(status, 200, "{csv}");
    let granted = csv.lines().find(|line| line.contains(",granted,")).unwrap();
    assert!(granted.contains("\"'=HYPERLINK("), "{granted}");
    assert!(granted.contains(",'@SUM(A1),"), "{granted}");
    // Numbers stay numbers (the delta column).
    assert!(
        granted.ends_with(",1,") || granted.contains(",1,"),
        "{granted}"
    );
    assert!(!csv.contains(",=") && !csv.contains(",@"), "{csv}");
}

/// Under HTTPS the session cookie is `Secure` and the answers carry HSTS.
#[tokio::test]
async fn under_https_the_session_cookie_is_secure() {
    let dir = tempfile::tempdir().unwrap();
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let tls = tessera_tls::init(&dir.path().join("tls"), &names).unwrap();
    let vendor = tessera_core::SecretKey::from_seed([42; 32]);
    std::fs::write(
        dir.path().join("vendor.pub"),
        vendor.public_key().to_file_text(),
    )
    .unwrap();
    let config = tessera_server::ServerConfig {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".into(),
        trust: vec![dir.path().join("vendor.pub")],
        tls: Some((tls.cert.clone(), tls.key.clone())),
        ..tessera_server::ServerConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = tessera_server::start(
        listener,
        tessera_server::ServerOptions {
            config,
            clock: std::sync::Arc::new(tessera_server::clock::ManualClock::new(super::START_MS)),
            ids: tessera_server::ids::LeaseIds::from_seed([1; 32]),
            run_timers: false,
        },
    )
    .await
    .unwrap();
    let url = server.url();
    assert!(url.starts_with("https://"), "{url}");
    let client = tessera_tls::client_builder(Some(&tls.ca))
        .unwrap()
        .redirect(Policy::none())
        .build()
        .unwrap();
    let response = client
        .post(format!("{url}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}&next=%2F", server.state.admin_token))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let cookie = response.headers()["set-cookie"].to_str().unwrap();
    assert!(cookie.contains("; Secure"), "{cookie}");
    assert!(response.headers().contains_key("strict-transport-security"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leases_page_pages_with_the_count_at_the_top() {
    let f = Fixture::start().await;
    f.import(&f.key("k-big", &["cad"], 500)).await;
    for i in 0..230 {
        f.client()
            .checkout(&request("cad", &format!("ws-{i:03}")))
            .await
            .unwrap();
    }
    let (cookie, _) = login(&f).await;
    let (_, html) = page(&f, &cookie, "/leases").await;
    let count_at = html.find("230 leases; showing 1–100.").expect("the count");
    let table_at = html.find("<table id=\"lease-table\">").unwrap();
    assert!(count_at < table_at, "the count comes before the table");
    assert_eq!(html.matches("class=\"lease\"").count(), 100);
    // Following "Next" three times sees every lease once.
    let mut seen = std::collections::BTreeSet::new();
    let mut path = "/leases".to_string();
    let mut pages = 0;
    loop {
        let (_, html) = page(&f, &cookie, &path).await;
        pages += 1;
        for row in html.split("<tr class=\"lease\"><td>").skip(1) {
            assert!(seen.insert(row.split('<').next().unwrap().to_string()));
        }
        match html.split("<a class=\"next\" href=\"").nth(1) {
            Some(rest) => path = rest.split('"').next().unwrap().replace("&amp;", "&"),
            None => break,
        }
    }
    assert_eq!((pages, seen.len()), (3, 230));
}

/// Uploads `file` to the console's key form.
async fn upload_key_file(f: &Fixture, cookie: &str, csrf: &str, file: &str) -> (u16, String) {
    let boundary = "tessera-key-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n{csrf}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"k.json\"\r\n\
         Content-Type: application/json\r\n\r\n{file}\r\n--{boundary}--\r\n"
    );
    let response = http()
        .post(format!("{}/keys/upload", f.server.url()))
        .header("cookie", cookie)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn keys_are_added_and_removed_from_the_console_after_a_confirmation() {
    let f = Fixture::start().await;
    let (cookie, csrf) = login(&f).await;
    let (_, html) = page(&f, &cookie, "/").await;
    assert!(html.contains("action=\"/keys/upload\""), "{html}");
    let key = f.key("k-console", &["cad"], 3).to_json_pretty();
    let (_, html) = upload_key_file(&f, &cookie, &csrf, &key).await;
    assert!(html.contains("Added license key k-console."), "{html}");
    assert_eq!(f.admin().list_keys().await.unwrap().len(), 1);
    // A tampered file is refused with its reason, and changes nothing.
    let tampered = key.replace("\"licenses\": 3", "\"licenses\": 300");
    let (_, html) = upload_key_file(&f, &cookie, &csrf, &tampered).await;
    assert!(
        html.contains("The key was not added (key_bad_signature)"),
        "{html}"
    );
    // Without the session's CSRF token: refused.
    let (status, html) = upload_key_file(&f, &cookie, "forged", &key).await;
    assert_eq!(status, 400, "{html}");

    // Removing shows what it ends first; the confirmed POST removes.
    f.client().checkout(&request("cad", "ws-1")).await.unwrap();
    f.client().checkout(&request("cad", "ws-2")).await.unwrap();
    let (status, confirm) = page(&f, &cookie, "/keys/k-console/remove").await;
    assert_eq!(status, 200);
    assert!(confirm.contains("ends <b>2</b> leases"), "{confirm}");
    assert!(confirm.contains("ws-1") && confirm.contains("ws-2"));
    assert_eq!(f.admin().list_keys().await.unwrap().len(), 1, "nothing yet");
    let response = post_form(&f, &cookie, "/keys/k-console/remove", "csrf=wrong").await;
    assert_ne!(response.status(), StatusCode::OK);
    assert_eq!(f.admin().list_keys().await.unwrap().len(), 1);
    let response = post_form(
        &f,
        &cookie,
        "/keys/k-console/remove",
        &format!("csrf={csrf}"),
    )
    .await;
    let html = response.text().await.unwrap();
    assert!(
        html.contains("Removed license key k-console; 2 leases ended."),
        "{html}"
    );
    assert!(f.admin().list_keys().await.unwrap().is_empty());
    let (status, _) = page(&f, &cookie, "/keys/k-console/remove").await;
    assert_eq!(status, 404);
}

/// One definition of "in use": a lease holds a license of its key, which lets its station use
/// every component the key covers, so it counts (and is listed as a holder) under each of them
/// — in the status, the metrics, the lease filter and the usage history alike.
#[tokio::test]
async fn status_metrics_leases_and_usage_count_in_use_the_same_way() {
    let f = Fixture::start().await;
    f.import(&f.key("k-cad", &["cad"], 2)).await;
    f.import(&f.key("k-suite", &["cad", "viewer"], 10)).await;
    // k-cad first (same end, lower id): ws-1 and ws-2 take it; ws-3 takes k-suite for
    // viewer, then asks for cad too and keeps the same lease; ws-4 gets cad from k-suite.
    for (component, station) in [
        ("cad", "ws-1"),
        ("cad", "ws-2"),
        ("viewer", "ws-3"),
        ("cad", "ws-4"),
    ] {
        f.client()
            .checkout(&request(component, station))
            .await
            .unwrap();
    }
    let (again, created) = f.client().checkout(&request("cad", "ws-3")).await.unwrap();
    assert!(!created, "ws-3 holds a k-suite lease, which covers cad");
    assert_eq!(again.key_id, "k-suite");

    let status = f.admin().status().await.unwrap();
    let component = |name: &str| {
        status
            .components
            .iter()
            .find(|c| c.component == name)
            .unwrap()
            .clone()
    };
    let (cad, viewer) = (component("cad"), component("viewer"));
    assert_eq!((cad.licenses, cad.in_use, cad.free), (12, 4, 8));
    assert_eq!((viewer.licenses, viewer.in_use, viewer.free), (10, 2, 8));
    let stations = |c: &tessera_api::ComponentStatus| {
        let mut stations: Vec<String> = c.holders.iter().map(|h| h.station.clone()).collect();
        stations.sort();
        stations
    };
    assert_eq!(stations(&cad), ["ws-1", "ws-2", "ws-3", "ws-4"]);
    assert_eq!(
        stations(&viewer),
        ["ws-3", "ws-4"],
        "ws-4 may use viewer too"
    );
    assert_eq!((cad.holders_total, viewer.holders_total), (4, 2));
    let ws3 = cad.holders.iter().find(|h| h.station == "ws-3").unwrap();
    assert_eq!(
        ws3.components,
        ["cad", "viewer"],
        "what the station asked for"
    );

    // The summary counts without listing.
    let summary = f.admin().status_summary().await.unwrap();
    assert!(summary.leases.is_empty());
    assert_eq!(summary.leases_total, 4);
    for c in &summary.components {
        assert!(c.holders.is_empty());
        assert_eq!(c.holders_total, u64::from(c.in_use), "{}", c.component);
    }

    let metrics = super::metrics_text(&f).await;
    for line in [
        "tessera_licenses_in_use{component=\"cad\"} 4",
        "tessera_licenses_in_use{component=\"viewer\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }

    let total = |component: &'static str| {
        let admin = f.admin();
        async move {
            admin
                .leases(&[("component", component)])
                .await
                .unwrap()
                .total
        }
    };
    assert_eq!((total("cad").await, total("viewer").await), (4, 2));

    // The usage history's level per component: the sum of its rows' deltas.
    let (code, rows) = admin_get(&f, "/v1/reports/usage?format=json").await;
    assert_eq!(code, 200, "{rows}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&rows).unwrap();
    let level = |component: &str| -> i64 {
        rows.iter()
            .filter(|row| row["component"] == component)
            .map(|row| row["delta"].as_i64().unwrap())
            .sum()
    };
    assert_eq!((level("cad"), level("viewer")), (4, 2));
}

#[tokio::test]
async fn a_key_is_allocated_from_the_console_with_its_csrf_token() {
    let f = Fixture::start().await;
    f.import(&f.key("k-alloc", &["cad"], 3)).await;
    let (cookie, csrf) = login(&f).await;
    let (_, html) = page(&f, &cookie, "/").await;
    assert!(html.contains("action=\"/keys/k-alloc/allocate\""), "{html}");
    assert!(html.contains("name=\"stations\" value=\"on\" checked"));
    let response = post_form(&f, &cookie, "/keys/k-alloc/allocate", "groups=").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST, "no CSRF token");
    let response = post_form(
        &f,
        &cookie,
        "/keys/k-alloc/allocate",
        &format!("csrf={csrf}&groups="),
    )
    .await;
    let html = response.text().await.unwrap();
    assert!(
        html.contains("License key k-alloc now serves no station by itself."),
        "{html}"
    );
    assert!(!html.contains("name=\"stations\" value=\"on\" checked"));
    let refused = f.client().checkout(&request("cad", "ws-1")).await;
    assert!(refused.is_err(), "the key serves no station now");
    let response = post_form(
        &f,
        &cookie,
        "/keys/k-alloc/allocate",
        &format!("csrf={csrf}&stations=on&groups="),
    )
    .await;
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("now serves every station")
    );
    f.client().checkout(&request("cad", "ws-1")).await.unwrap();
}
