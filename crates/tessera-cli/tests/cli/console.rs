//! The console in a real browser (headless Chromium), the usage report, the audit check and
//! the password hash through the `tessera` binary.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{ServerProcess, ok, setup_vendor, tessera, token};

fn find_chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let names = ["chromium", "chromium-browser", "google-chrome", "chrome"];
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Runs Chromium headless with a throw-away profile; returns its standard output.
fn chromium(binary: &Path, profile: &Path, extra: &[&str], url: &str) -> String {
    let mut child = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    out
}

fn checkout(remote: &[&str], station: &str) -> std::process::Output {
    tessera(
        &[
            &[
                "lease",
                "checkout",
                "--component",
                "cad",
                "--station",
                station,
                "--user",
                "ann",
                "--host",
                station,
            ][..],
            remote,
        ]
        .concat(),
    )
}

#[test]
fn reports_audit_and_password_hash_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    setup_vendor(dir.path());
    let server = ServerProcess::start(dir.path());
    let token = token(dir.path());
    let remote = ["--server", server.url.as_str(), "--token", token.as_str()];
    let key_file = dir.path().join("cad.json");
    ok(&[&["keys", "add", key_file.to_str().unwrap()][..], &remote].concat());
    assert!(checkout(&remote, "ws-1").status.success());
    assert!(checkout(&remote, "ws-2").status.success());
    assert!(!checkout(&remote, "ws-3").status.success(), "2 licenses");

    let csv = ok(&[
        &["report", "usage", "--from", "2000-01-01", "--format", "csv"][..],
        &remote,
    ]
    .concat());
    let lines: Vec<&str> = csv.lines().collect();
    // The key covers cad and cam: a lease is in use under both (docs/operations.md, "What
    // 'in use' means"), so each grant is a row per component; the denial names what was asked.
    assert_eq!(lines.len(), 7, "{csv}");
    assert!(lines[0].starts_with("time,kind,component,station"));
    assert!(lines[2].contains(",granted,cad,ws-1,ann,ws-1,"), "{csv}");
    assert!(lines[3].contains(",granted,cam,ws-1,ann,ws-1,"), "{csv}");
    assert!(lines[6].contains(",denied,cad,ws-3,"), "{csv}");
    let json = ok(&[&["report", "usage", "--format", "json"][..], &remote].concat());
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), 6);

    let online = ok(&[&["audit", "verify"][..], &remote].concat());
    assert!(online.contains("audit chain intact"), "{online}");
    drop(server); // the writer has flushed: the server answered the verify request
    let data = dir.path().join("data");
    let offline = ok(&["audit", "verify", "--data", data.to_str().unwrap()]);
    assert!(offline.contains("audit chain intact"), "{offline}");
    // Tamper with one record: verify fails and names it.
    let broken = tamper(&data);
    let failed = tessera(&["audit", "verify", "--data", data.to_str().unwrap()]);
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains(&format!("broken at record {broken}")),
        "{stderr}"
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["admin", "hash-password"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"correct horse\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let hash = String::from_utf8(output.stdout).unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(tessera_server::console::verify_password(
        "correct horse",
        hash.trim()
    ));
    assert!(!tessera_server::console::verify_password(
        "wrong",
        hash.trim()
    ));
}

/// Changes the `actor` of record 2 behind the server's back; returns 2.
fn tamper(data: &Path) -> i64 {
    let verification = tessera_server::history::verify_data_dir(data).unwrap();
    assert!(verification.ok && verification.records >= 2);
    let connection = rusqlite::Connection::open(data.join("usage.sqlite3")).unwrap();
    let changed = connection
        .execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2", [])
        .unwrap();
    assert_eq!(changed, 1);
    2
}

#[test]
fn headless_chromium_logs_in_views_leases_and_screenshots_the_usage_chart() {
    let Some(browser) = find_chromium() else {
        println!(
            "SKIPPED: no chromium binary found (install Debian's `chromium`, or set CHROMIUM=/path)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    setup_vendor(dir.path());
    let server = ServerProcess::start(dir.path());
    let token = token(dir.path());
    let remote = ["--server", server.url.as_str(), "--token", token.as_str()];
    let key_file = dir.path().join("cad.json");
    ok(&[&["keys", "add", key_file.to_str().unwrap()][..], &remote].concat());
    assert!(checkout(&remote, "ws-1").status.success());
    assert!(checkout(&remote, "ws-2").status.success());
    assert!(!checkout(&remote, "ws-3").status.success());

    // Log in through the token link, land on the leases page: the browser keeps the
    // HttpOnly session cookie across the redirect.
    let profile = dir.path().join("profile");
    let dom = chromium(
        &browser,
        &profile,
        &["--dump-dom"],
        &format!("{}/login?token={token}&next=%2Fleases", server.url),
    );
    assert!(
        dom.contains("Leases &amp; stations") || dom.contains("Leases & stations"),
        "{dom}"
    );
    assert!(dom.contains("ws-1") && dom.contains("ws-2"), "{dom}");
    assert!(dom.contains("Release…"), "{dom}");

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("usage-chart.png");
    let _ = std::fs::remove_file(&png);
    chromium(
        &browser,
        &dir.path().join("profile2"),
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1000,800",
        ],
        &format!("{}/login?token={token}&next=%2Fusage", server.url),
    );
    let bytes = std::fs::read(&png).expect("the screenshot was written");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");
    assert!(
        bytes.len() > 10_000,
        "a non-trivial picture: {} bytes",
        bytes.len()
    );
    println!("screenshot: {}", png.display());
}

/// A minimal W3C WebDriver client over chromedriver, enough to click through the console.
struct WebDriver {
    http: reqwest::Client,
    base: String,
    session: String,
}

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

impl WebDriver {
    /// Starts chromedriver on a free port and opens a session in headless Chromium with a
    /// throw-away profile; [`WebDriver::quit`] ends both.
    async fn launch(browser: &Path, driver: &Path, profile: &Path) -> (WebDriver, Child) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let chromedriver = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let http = tessera_tls::client_builder_exactly(None)
            .unwrap()
            .build()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let capabilities = serde_json::json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": browser,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", format!("--user-data-dir={}", profile.display())]
        }}}});
        let session: serde_json::Value = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = session["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("{session}"))
            .to_string();
        (
            WebDriver {
                http,
                base,
                session,
            },
            chromedriver,
        )
    }

    /// Ends the session and stops chromedriver.
    async fn quit(&self, chromedriver: &mut Child) {
        self.call(reqwest::Method::DELETE, "", serde_json::json!({}))
            .await;
        let _ = chromedriver.kill();
        let _ = chromedriver.wait();
    }

    /// Runs `script` (a function body) in the page; returns what it returns.
    async fn script(&self, script: &str) -> serde_json::Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            serde_json::json!({ "script": script, "args": [] }),
        )
        .await
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let answer: serde_json::Value = self
            .http
            .request(method, &url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(answer["value"]["error"].is_null(), "{path}: {answer}");
        answer["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.call(
            reqwest::Method::POST,
            "/url",
            serde_json::json!({ "url": url }),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                serde_json::json!({"using": "css selector", "value": css}),
            )
            .await;
        let element = found[ELEMENT_KEY].as_str().unwrap().to_string();
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/click"),
            serde_json::json!({}),
        )
        .await;
    }

    /// The page source once `done` holds for it (navigation and form posts finish after the
    /// WebDriver call returns); fails with the last source after 20 s.
    async fn source_when(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let source = self.source().await;
            if done(&source) {
                return source;
            }
            assert!(Instant::now() < deadline, "{what}: {source}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn source(&self) -> String {
        let url = format!("{}/session/{}/source", self.base, self.session);
        let answer: serde_json::Value = self
            .http
            .get(&url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["value"].as_str().unwrap_or_default().to_string()
    }
}

fn find_chromedriver() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMEDRIVER") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromedriver"))
        .find(|candidate| candidate.is_file())
}

#[test]
fn in_headless_chromium_an_administrator_force_releases_a_lease_after_confirming() {
    let (Some(browser), Some(driver)) = (find_chromium(), find_chromedriver()) else {
        println!(
            "SKIPPED: chromium and chromedriver are needed (Debian: chromium, chromium-driver)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    setup_vendor(dir.path());
    let server = ServerProcess::start(dir.path());
    let token = token(dir.path());
    let remote = ["--server", server.url.as_str(), "--token", token.as_str()];
    ok(&[
        &["keys", "add", dir.path().join("cad.json").to_str().unwrap()][..],
        &remote,
    ]
    .concat());
    assert!(checkout(&remote, "ws-1").status.success());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (web, mut chromedriver) =
            WebDriver::launch(&browser, &driver, &dir.path().join("webdriver-profile")).await;
        web.open(&format!(
            "{}/login?token={token}&next=%2Fleases",
            server.url
        ))
        .await;
        web.source_when("the leases page lists ws-1", |s| s.contains("ws-1"))
            .await;
        web.click("a[href$='/release']").await;
        web.source_when("a confirmation step comes first", |s| {
            s.contains("confirm-release")
        })
        .await;
        web.click("#confirm-release").await;
        web.source_when("back on the leases page without ws-1", |s| {
            !s.contains("confirm-release") && !s.contains("ws-1</td>")
        })
        .await;
        // The form's post may still be on its way while the page changes: wait for the server.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status: serde_json::Value =
                serde_json::from_str(&ok(&[&["status", "--json"][..], &remote].concat())).unwrap();
            if status["leases"].as_array().is_some_and(|l| l.is_empty()) {
                break;
            }
            assert!(Instant::now() < deadline, "the lease was never released");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        web.quit(&mut chromedriver).await;
    });
    let status: serde_json::Value =
        serde_json::from_str(&ok(&[&["status", "--json"][..], &remote].concat())).unwrap();
    assert_eq!(
        status["leases"].as_array().unwrap().len(),
        0,
        "the lease was released"
    );
}

/// Leases for the browser at scale: 100,000 in release builds (the measured run; BENCHMARKS.md,
/// "The console in Chromium at 100,000 leases"), 2,000 under debug assertions so the usual
/// run stays quick.
#[cfg(debug_assertions)]
const BROWSER_LEASES: usize = 2_000;
#[cfg(not(debug_assertions))]
const BROWSER_LEASES: usize = 100_000;

/// Checks out `count` leases of `cad` over HTTP, as stations do (64 at a time): station
/// `ws-NNNNNN`, user `user{i % 100}`, host `host-{i % 1000}`.
async fn fill_over_http(url: &str, count: usize) {
    use futures::StreamExt;
    let http = tessera_tls::client_builder_exactly(None)
        .unwrap()
        .build()
        .unwrap();
    let started = Instant::now();
    let mut answers = futures::stream::iter(0..count)
        .map(|i| {
            let http = http.clone();
            async move {
                let body = serde_json::json!({
                    "component": "cad",
                    "station": format!("ws-{i:06}"),
                    "user": format!("user{}", i % 100),
                    "host": format!("host-{}", i % 1000),
                });
                let response = http
                    .post(format!("{url}/v1/leases"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = response.status();
                (i, status, response.text().await.unwrap())
            }
        })
        .buffer_unordered(64);
    while let Some((i, status, text)) = answers.next().await {
        assert_eq!(status, 201, "checkout {i}: {text}");
    }
    println!(
        "browser at scale: {count} leases checked out over HTTP in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The console's pages in headless Chromium with many leases: each page's content as a user
/// sees it, the leases page's Next link clicked, the Release column on screen in a 900 px
/// window; the browser's own navigation timing of each page is printed (not asserted: a
/// shared machine's times are no pass mark; BENCHMARKS.md keeps the 100,000-lease run:
/// `cargo nextest run --release -p tessera-cli --test cli at_scale --no-capture`).
#[test]
fn in_headless_chromium_every_console_page_works_at_scale() {
    let (Some(browser), Some(driver)) = (find_chromium(), find_chromedriver()) else {
        println!(
            "SKIPPED: chromium and chromedriver are needed (Debian: chromium, chromium-driver)"
        );
        return;
    };
    let n = BROWSER_LEASES;
    let dir = tempfile::tempdir().unwrap();
    setup_vendor(dir.path());
    let vendor = dir.path().join("vendor");
    let key_file = dir.path().join("many.json");
    let key_id = ok(&[
        "vendor",
        "issue",
        "--dir",
        vendor.to_str().unwrap(),
        "--customer",
        "acme",
        "--components",
        "cad,cam",
        "--licenses",
        &n.to_string(),
        "--valid-days",
        "30",
        "--out",
        key_file.to_str().unwrap(),
    ]);
    let key_id = key_id.trim();
    let server = ServerProcess::start(dir.path());
    let token = token(dir.path());
    let remote = ["--server", server.url.as_str(), "--token", token.as_str()];
    ok(&[&["keys", "add", key_file.to_str().unwrap()][..], &remote].concat());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        fill_over_http(&server.url, n).await;
        let (web, mut chromedriver) =
            WebDriver::launch(&browser, &driver, &dir.path().join("scale-profile")).await;
        web.call(
            reqwest::Method::POST,
            "/window/rect",
            serde_json::json!({"width": 900, "height": 800}),
        )
        .await;
        web.open(&format!("{}/login?token={token}&next=%2Fleases", server.url))
            .await;
        web.source_when("logged in, on the leases page", |s| {
            s.contains("id=\"lease-count\"")
        })
        .await;

        // Each page: open it, wait for what it must show, print the browser's timing.
        let visit = |path: String, what: String| {
            let web = &web;
            let url = format!("{}{path}", server.url);
            async move {
                web.open(&url).await;
                let source = web.source_when(&path, |s| s.contains(&what)).await;
                let timing = web
                    .script(
                        "const n = performance.getEntriesByType('navigation')[0];
                         return [n.responseEnd - n.requestStart, n.loadEventEnd - n.startTime,
                                 n.transferSize];",
                    )
                    .await;
                println!(
                    "browser at scale: {n} leases: {path}: response {:.1} ms, loaded {:.1} ms, {} bytes",
                    timing[0].as_f64().unwrap_or(-1.0),
                    timing[1].as_f64().unwrap_or(-1.0),
                    timing[2]
                );
                source
            }
        };
        let leases = visit(
            "/leases".into(),
            format!("{n} leases; showing 1–100."),
        )
        .await;
        assert_eq!(leases.matches("<tr class=\"lease\">").count(), 100);
        // At 900 px the Release column stays on screen (sticky), the table scrolls.
        let right = web
            .script(
                "const cell = document.querySelector('tr.lease td.act');
                 return [cell.getBoundingClientRect().right, window.innerWidth];",
            )
            .await;
        let (cell, window) = (right[0].as_f64().unwrap(), right[1].as_f64().unwrap());
        assert!(
            cell <= window,
            "the Release column ends at {cell} px in a {window} px window"
        );
        web.click("a.next").await;
        web.source_when("the next page", |s| {
            s.contains(&format!("{n} leases; showing 101–200."))
        })
        .await;
        web.click("a.previous").await;
        web.source_when("back to the first page", |s| {
            s.contains(&format!("{n} leases; showing 1–100."))
        })
        .await;

        visit(
            "/leases?sort=user&order=desc".into(),
            "<td>user99</td>".into(),
        )
        .await;
        let user7 = visit(
            "/leases?user=user7".into(),
            format!("{} leases match the filter", n / 100),
        )
        .await;
        assert!(!user7.contains("user70"));
        visit(
            "/leases?user=user7*&sort=station".into(),
            format!("{} leases match the filter", n / 100 * 11),
        )
        .await;
        visit(
            "/leases?component=cam&sort=expires&order=desc".into(),
            format!("{n} leases match the filter"),
        )
        .await;
        visit("/".into(), format!("Leases<br><b>{n}</b>")).await;
        visit(
            format!("/keys/{key_id}/remove"),
            format!("ends <b>{n}</b> leases"),
        )
        .await;
        for path in ["/usage", "/usage?bucket=day", "/usage?bucket=month"] {
            let usage = visit(path.into(), "id=\"usage-chart\"".into()).await;
            assert!(usage.contains("class=\"licenses\""), "{path}: the license line");
        }
        visit("/events".into(), "<span class=\"ok\">intact</span>".into()).await;
        visit("/events".into(), "<span class=\"ok\">intact</span>".into()).await;
        visit("/neighbours".into(), "Neighbour servers".into()).await;
        visit("/sync".into(), "Synchronization with the vendor".into()).await;
        web.quit(&mut chromedriver).await;
    });
}
