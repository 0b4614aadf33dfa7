//! The `tessera` binary as a user runs it: real processes, real files, real HTTP.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

fn tessera(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("TESSERA_TOKEN")
        .env_remove("TESSERA_SERVER")
        .env_remove("TESSERA_LEASE_SECRET")
        .env_remove("TESSERA_CA")
        // Lease secrets stored by `lease checkout` (one file per lease id, unique per test).
        .env(
            "TESSERA_LEASE_DIR",
            std::env::temp_dir().join("tessera-test-leases"),
        )
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let output = tessera(args);
    assert!(
        output.status.success(),
        "tessera {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

struct ServerProcess {
    child: Child,
    url: String,
}

impl ServerProcess {
    /// Starts `tessera server` on a free port and waits for the line announcing its URL.
    fn start(dir: &Path) -> ServerProcess {
        let data = dir.join("data");
        let trust = dir.join("vendor").join("vendor.pub");
        ServerProcess::spawn(
            &[
                "server",
                "--listen",
                "127.0.0.1:0",
                "--lease-ttl",
                "10m",
                "--data",
                data.to_str().unwrap(),
                "--trust",
                trust.to_str().unwrap(),
            ],
            "Tessera license server on ",
        )
    }

    /// Runs `tessera ARGS` and reads the URL from its first line, which starts with `prefix`.
    fn spawn(args: &[&str], prefix: &str) -> ServerProcess {
        ServerProcess::spawn_with_env(args, prefix, &[])
    }

    /// [`ServerProcess::spawn`] with extra environment variables.
    fn spawn_with_env(args: &[&str], prefix: &str, env: &[(&str, &str)]) -> ServerProcess {
        let mut child = Command::new(BIN)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        // Keep draining what the process prints after its first line.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let url = line
            .trim()
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        ServerProcess { child, url }
    }

    /// Stops the server as a service manager would (SIGTERM) and waits for it to exit.
    fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success(), "kill -TERM {pid}");
        let exit = self.child.wait().unwrap();
        assert!(exit.success(), "the server exited with {exit} on SIGTERM");
    }

    fn kill_9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn setup_vendor(dir: &Path) -> String {
    let vendor = dir.join("vendor");
    ok(&["vendor", "init", "--dir", vendor.to_str().unwrap()]);
    let key_file = dir.join("cad.json");
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
        "2",
        "--valid-days",
        "30",
        "--out",
        key_file.to_str().unwrap(),
    ]);
    key_id.trim().to_string()
}

fn token(dir: &Path) -> String {
    admin_token_in(&dir.join("data"))
}

/// The admin token a server or authority wrote in its data directory.
fn admin_token_in(data: &Path) -> String {
    std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_string()
}

/// `tessera lease checkout --component cad --station STATION` with `remote`'s flags: the lease.
fn checkout_cad(remote: &[&str], station: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&[
        &[
            "lease",
            "checkout",
            "--component",
            "cad",
            "--station",
            station,
        ][..],
        remote,
    ]
    .concat()))
    .unwrap()
}

#[test]
fn vendor_tooling_writes_an_owner_only_secret_and_refuses_to_overwrite_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    setup_vendor(dir.path());
    let mode = std::fs::metadata(dir.path().join("vendor/vendor.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = tessera(&[
        "vendor",
        "init",
        "--dir",
        dir.path().join("vendor").to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to replace"));
}

#[test]
fn an_administrator_imports_a_key_and_a_station_checks_out_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let key_id = setup_vendor(dir.path());
    let server = ServerProcess::start(dir.path());
    let token = token(dir.path());
    let key_file = dir.path().join("cad.json");
    let remote = ["--server", server.url.as_str(), "--token", token.as_str()];
    let imported = ok(&[&["keys", "add", key_file.to_str().unwrap()][..], &remote].concat());
    assert!(imported.contains(&key_id));
    let lease: serde_json::Value = serde_json::from_str(&ok(&[
        &[
            "lease",
            "checkout",
            "--component",
            "cad",
            "--station",
            "ws-17",
            "--user",
            "ann",
            "--host",
            "ws17",
        ][..],
        &remote,
    ]
    .concat()))
    .unwrap();
    assert_eq!(lease["station"], "ws-17");
    let status: serde_json::Value =
        serde_json::from_str(&ok(&[&["status", "--json"][..], &remote].concat())).unwrap();
    assert_eq!(status["keys"][0]["in_use"], 1);
    let table = ok(&[&["status"][..], &remote].concat());
    assert!(
        table.contains("cad") && table.contains("ws-17 ann@ws17 since"),
        "{table}"
    );
    // A second station, of user bob, on cam: the filters and the summary.
    let bob: serde_json::Value = serde_json::from_str(&ok(&[
        &[
            "lease",
            "checkout",
            "--component",
            "cam",
            "--station",
            "ws-18",
            "--user",
            "bob",
        ][..],
        &remote,
    ]
    .concat()))
    .unwrap();
    let summary = ok(&[&["status", "--summary"][..], &remote].concat());
    assert!(summary.contains(": 2 leases"), "{summary}");
    assert!(
        !summary.contains("ws-17") && !summary.contains("ws-18"),
        "{summary}"
    );
    let ann = ok(&[&["status", "--user", "ann"][..], &remote].concat());
    assert!(ann.contains("ws-17") && !ann.contains("ws-18"), "{ann}");
    assert!(ann.contains(" expires "), "{ann}");
    let cam: serde_json::Value = serde_json::from_str(&ok(&[
        &["status", "--json", "--component", "cam"][..],
        &remote,
    ]
    .concat()))
    .unwrap();
    let components: Vec<&str> = cam["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["component"].as_str().unwrap())
        .collect();
    assert_eq!(components, ["cam"]);
    // One definition of "in use": both leases hold a license of the key that covers cad and
    // cam, so both count (and are listed) under cam, whatever component each one asked for.
    assert_eq!(cam["components"][0]["in_use"], 2);
    let mut stations: Vec<&str> = cam["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["station"].as_str().unwrap())
        .collect();
    stations.sort();
    assert_eq!(stations, ["ws-17", "ws-18"]);
    let bob = bob["lease_id"].as_str().unwrap();
    ok(&[&["lease", "checkin", bob][..], &remote].concat());
    let lease_id = lease["lease_id"].as_str().unwrap();
    // `lease checkout` stored the secret, owner-only, where heartbeat and checkin find it;
    // without it (or with another) the lease id alone does nothing.
    let stored = std::env::temp_dir()
        .join("tessera-test-leases")
        .join(lease_id);
    let secret = std::fs::read_to_string(&stored).unwrap();
    assert_eq!(secret.trim(), lease["lease_secret"].as_str().unwrap());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let wrong = tessera(
        &[
            &["lease", "heartbeat", lease_id, "--secret", "not-the-secret"][..],
            &remote,
        ]
        .concat(),
    );
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("lease_secret_wrong"));
    ok(&[&["lease", "heartbeat", lease_id][..], &remote].concat());
    ok(&[&["lease", "checkin", lease_id][..], &remote].concat());
    assert!(
        !stored.exists(),
        "the secret is forgotten once the lease is returned"
    );
    let listing = ok(&[&["keys", "list"][..], &remote].concat());
    assert!(listing.contains(&key_id));

    // A key allocated to no station: nothing is free, as checkout then says.
    ok(&[
        &["keys", "allocate", key_id.as_str(), "--stations", "false"][..],
        &remote,
    ]
    .concat());
    let status: serde_json::Value =
        serde_json::from_str(&ok(&[&["status", "--json"][..], &remote].concat())).unwrap();
    assert_eq!(status["keys"][0]["free"], 0, "{status}");
    let (_, metrics) = http_get(&format!("{}/metrics", server.url));
    let free: Vec<&str> = metrics
        .lines()
        .filter(|line| line.starts_with("tessera_licenses_free{"))
        .collect();
    assert!(
        !free.is_empty() && free.iter().all(|line| line.ends_with(" 0")),
        "{metrics}"
    );
    let refused = tessera(
        &[
            &[
                "lease",
                "checkout",
                "--component",
                "cad",
                "--station",
                "ws-18",
            ][..],
            &remote,
        ]
        .concat(),
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("component_not_licensed"));
}

/// `GET url` over plain HTTP/1.1: (status, body).
fn http_get(url: &str) -> (u16, String) {
    http_request(url, "GET", None)
}

/// `POST url` with a JSON body over plain HTTP/1.1: (status, body).
fn http_post_json(url: &str, json: &str) -> (u16, String) {
    http_request(url, "POST", Some(json))
}

fn http_request(url: &str, method: &str, json: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = std::net::TcpStream::connect(authority).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let body = json.unwrap_or("");
    let content_type = if json.is_some() {
        "Content-Type: application/json\r\n"
    } else {
        ""
    };
    write!(
        stream,
        "{method} /{path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n{content_type}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn errors_exit_non_zero_with_the_reason_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    setup_vendor(dir.path());
    let server = ServerProcess::start(dir.path());
    let token = token(dir.path());
    let key_file = dir.path().join("cad.json");
    let text = std::fs::read_to_string(&key_file)
        .unwrap()
        .replace("\"licenses\": 2", "\"licenses\": 20");
    let tampered = dir.path().join("tampered.json");
    std::fs::write(&tampered, text).unwrap();
    let output = tessera(&[
        "keys",
        "add",
        tampered.to_str().unwrap(),
        "--server",
        &server.url,
        "--token",
        &token,
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("key_bad_signature"), "{stderr}");
    let output = tessera(&["keys", "list", "--server", &server.url]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unauthorized"), "{stderr}");
    assert!(
        stderr.contains("--token TOKEN or TESSERA_TOKEN"),
        "{stderr}"
    );
    // A URL without a scheme, or a blank token: named before anything is sent.
    let bare = server.url.trim_start_matches("http://");
    let output = tessera(&["status", "--server", bare]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("needs a scheme: http://{bare}")),
        "{stderr}"
    );
    let output = tessera(&["status", "--server", &server.url, "--token", " "]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--token (TESSERA_TOKEN) is empty"),
        "{stderr}"
    );
    // Output into a pipe closed early ends quietly: no panic, not exit 101.
    ok(&[
        "keys",
        "add",
        key_file.to_str().unwrap(),
        "--server",
        &server.url,
        "--token",
        &token,
    ]);
    let mut child = Command::new(BIN)
        .args([
            "status",
            "--json",
            "--server",
            &server.url,
            "--token",
            &token,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before anything is written
    let exit = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&exit.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(exit.status.code(), Some(101), "{stderr}");
}

/// A service manager may stop the server as soon as it has read its announcement: the stop
/// is graceful (exit status 0) however soon it comes. Before, the SIGTERM handler was
/// installed after the announcement, and a stop in that gap killed the process.
#[test]
fn a_sigterm_right_after_the_announcement_stops_the_server_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    setup_vendor(dir.path());
    for _ in 0..20 {
        let mut server = ServerProcess::start(dir.path());
        // At once, as a service manager can (no `kill` process started in between).
        // SAFETY: kill only reads its two integer arguments.
        let sent = unsafe { libc::kill(server.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(sent, 0);
        let exit = server.child.wait().unwrap();
        assert!(exit.success(), "the server exited with {exit} on SIGTERM");
    }
}

/// Runs `tessera ARGS` to its end (at most 60 s: a server that should refuse to start and
/// does not is killed, and the test fails).
fn run_to_end(args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("tessera {args:?} did not end within 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Attack T3 through the binary: a key import edited in the stopped server's Raft log (2
/// licenses made 200) and an audit record changed. The server refuses to start, exit status
/// non-zero, naming the entry; `tessera doctor` names both findings with the way out, and
/// finds nothing once the entry is put back.
#[test]
fn an_edited_log_entry_stops_the_server_and_the_doctor_explains_it() {
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
    ok(&[
        &[
            "lease",
            "checkout",
            "--component",
            "cad",
            "--station",
            "ws-1",
        ][..],
        &remote,
    ]
    .concat());
    server.terminate();
    let data = dir.path().join("data");
    let trust = dir.path().join("vendor").join("vendor.pub");
    let flags = [
        "--data",
        data.to_str().unwrap(),
        "--trust",
        trust.to_str().unwrap(),
    ];
    let doctor = ok(&[&["doctor"][..], &flags].concat());
    assert!(doctor.contains("no problem found"), "{doctor}");

    let store = data.join("raft.sqlite3");
    let (index, text) = log_entry_like(&store, "%import_key%");
    let edited = text.replace("\"licenses\":2,", "\"licenses\":200,");
    assert_ne!(edited, text, "{text}");
    let naive_edit = |entry: &str| {
        rusqlite::Connection::open(&store)
            .unwrap()
            .execute(
                "UPDATE raft_log SET entry = ?1 WHERE log_index = ?2",
                rusqlite::params![entry.as_bytes(), index],
            )
            .unwrap();
    };
    // Attack T2: edited in place, the log's hash chain breaks there, before anything is
    // replayed; the server does not start, the doctor names the entry.
    naive_edit(&edited);
    let started = run_to_end(&[&["server", "--listen", "127.0.0.1:0"][..], &flags].concat());
    let stderr = String::from_utf8_lossy(&started.stderr);
    assert!(!started.status.success(), "started: {stderr}");
    assert!(
        stderr.contains(&format!(
            "raft log entry {index}: the entry does not match its chain hash"
        )),
        "{stderr}"
    );
    let doctor = tessera(&[&["doctor"][..], &flags].concat());
    let stdout = String::from_utf8_lossy(&doctor.stdout);
    assert!(!doctor.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("raft.sqlite3, raft log entry {index}"))
            && stdout.contains("hash chain is broken"),
        "{stdout}"
    );
    naive_edit(&text);

    // Attack T3: edited with the chain recomputed, the key it carries no longer verifies.
    let put = |entry: &str| rewrite_log_entry(&store, index, entry.as_bytes());
    put(&edited);
    rusqlite::Connection::open(data.join("usage.sqlite3"))
        .unwrap()
        .execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2", [])
        .unwrap();

    let started = run_to_end(&[&["server", "--listen", "127.0.0.1:0"][..], &flags].concat());
    let stderr = String::from_utf8_lossy(&started.stderr);
    assert!(!started.status.success(), "started: {stderr}");
    assert!(
        stderr.contains(&format!("raft log entry {index}, import of license key")),
        "{stderr}"
    );

    let doctor = tessera(&[&["doctor"][..], &flags].concat());
    let stdout = String::from_utf8_lossy(&doctor.stdout);
    assert!(!doctor.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("raft.sqlite3, raft log entry {index}"))
            && stdout.contains("import of license key")
            && stdout.contains("way out: restore the data directory from a backup"),
        "{stdout}"
    );
    assert!(
        stdout.contains("usage.sqlite3, audit record 2")
            && stdout.contains("audit chain is broken"),
        "{stdout}"
    );
    assert!(
        String::from_utf8_lossy(&doctor.stderr).contains("2 problem(s) found"),
        "{doctor:?}"
    );
    let json = tessera(&[&["doctor", "--json"][..], &flags].concat());
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["findings"].as_array().unwrap().len(), 2, "{report}");

    // Put back: the log is whole again (the audit record stays changed, which the server
    // starts with and reports).
    put(&text);
    let doctor = tessera(&[&["doctor", "--json"][..], &flags].concat());
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    assert_eq!(report["findings"].as_array().unwrap().len(), 1, "{report}");
    // And the server starts and serves its lease again.
    let server = ServerProcess::start(dir.path());
    let remote = ["--server", server.url.as_str(), "--token", token.as_str()];
    let status: serde_json::Value =
        serde_json::from_str(&ok(&[&["status", "--json"][..], &remote].concat())).unwrap();
    assert_eq!(status["leases"].as_array().unwrap().len(), 1, "{status}");
}

#[test]
fn an_acknowledged_lease_survives_kill_9_of_the_server() {
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
    let mut acknowledged = Vec::new();
    for station in ["ws-1", "ws-2"] {
        let lease: serde_json::Value = serde_json::from_str(&ok(&[
            &[
                "lease",
                "checkout",
                "--component",
                "cad",
                "--station",
                station,
            ][..],
            &remote,
        ]
        .concat()))
        .unwrap();
        acknowledged.push(lease["lease_id"].as_str().unwrap().to_string());
    }
    server.kill_9();
    let server = ServerProcess::start(dir.path());
    let remote = ["--server", server.url.as_str(), "--token", token.as_str()];
    let status: serde_json::Value =
        serde_json::from_str(&ok(&[&["status", "--json"][..], &remote].concat())).unwrap();
    let mut held: Vec<String> = status["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|lease| lease["lease_id"].as_str().unwrap().to_string())
        .collect();
    held.sort();
    acknowledged.sort();
    assert_eq!(held, acknowledged);
    let refused = tessera(
        &[
            &[
                "lease",
                "checkout",
                "--component",
                "cad",
                "--station",
                "ws-3",
            ][..],
            &remote,
        ]
        .concat(),
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no_licenses_available"));
}

fn last_line(text: &str) -> String {
    text.lines().last().unwrap_or_default().trim().to_string()
}

fn fails_with(args: &[&str], code: &str) {
    let output = tessera(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains(code),
        "tessera {args:?}: expected {code}, got {stderr}"
    );
}

/// The vendor, a customer, an online and an air-gapped license server, and a key renewal,
/// all as separate processes talking HTTP, as docs/sync-and-renewal.md describes.
#[test]
fn online_and_air_gapped_servers_stay_licensed_across_a_key_renewal() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let authority = ServerProcess::spawn(
        &[
            "authority",
            "--data",
            &d("authority"),
            "--listen",
            "127.0.0.1:0",
        ],
        "Tessera authority on ",
    );
    let vendor_token = std::fs::read_to_string(dir.path().join("authority/admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let vendor = [
        "--authority",
        authority.url.as_str(),
        "--token",
        vendor_token.as_str(),
    ];
    let online_id = last_line(&ok(&[
        &["authority", "server", "add", "--customer", "acme"][..],
        &vendor,
    ]
    .concat()));
    let offline_id = last_line(&ok(&[
        &["authority", "server", "add", "--customer", "acme"][..],
        &vendor,
    ]
    .concat()));
    let mut keys = Vec::new();
    for server_id in [&online_id, &offline_id] {
        keys.push(last_line(&ok(&[
            &[
                "authority",
                "key",
                "issue",
                "--server-id",
                server_id,
                "--components",
                "cad",
                "--licenses",
                "2",
                "--valid-days",
                "30",
            ][..],
            &vendor,
        ]
        .concat())));
    }
    let trust = d("authority/vendor.pub");
    let online = ServerProcess::spawn(
        &[
            "server",
            "--data",
            &d("online"),
            "--listen",
            "127.0.0.1:0",
            "--server-id",
            &online_id,
            "--authority",
            &authority.url,
            // The test drives each sync (the default would sync at start by itself).
            "--sync-schedule",
            "off",
            "--trust",
            &trust,
        ],
        "Tessera license server on ",
    );
    let offline = ServerProcess::spawn(
        &[
            "server",
            "--data",
            &d("offline"),
            "--listen",
            "127.0.0.1:0",
            "--server-id",
            &offline_id,
            "--trust",
            &trust,
        ],
        "Tessera license server on ",
    );
    let online_token = std::fs::read_to_string(dir.path().join("online/admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let offline_token = std::fs::read_to_string(dir.path().join("offline/admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let on = [
        "--server",
        online.url.as_str(),
        "--token",
        online_token.as_str(),
    ];
    let off = [
        "--server",
        offline.url.as_str(),
        "--token",
        offline_token.as_str(),
    ];
    let checkout = |remote: &[&str], station: &str| -> serde_json::Value {
        serde_json::from_str(&ok(&[
            &[
                "lease",
                "checkout",
                "--component",
                "cad",
                "--station",
                station,
            ][..],
            remote,
        ]
        .concat()))
        .unwrap()
    };

    // Online: one command.
    let synced = ok(&[&["sync"][..], &on].concat());
    assert!(synced.contains(&keys[0]), "{synced}");
    let online_lease = checkout(&on, "ws-1");

    // Air-gapped: a request file to the vendor, a response file back.
    fails_with(
        &[
            &[
                "lease",
                "checkout",
                "--component",
                "cad",
                "--station",
                "ws-9",
            ][..],
            &off,
        ]
        .concat(),
        "component_not_licensed",
    );
    ok(&[&["sync", "export", "--out", &d("request.tsync")][..], &off].concat());
    ok(&[
        &[
            "authority",
            "process",
            "--in",
            &d("request.tsync"),
            "--out",
            &d("response.tsync"),
        ][..],
        &vendor,
    ]
    .concat());
    let imported = ok(&[&["sync", "import", &d("response.tsync")][..], &off].concat());
    assert!(imported.contains(&keys[1]), "{imported}");
    checkout(&off, "ws-9");
    fails_with(
        &[&["sync", "import", &d("response.tsync")][..], &off].concat(),
        "sync_not_awaited",
    );

    // The vendor registers renewal keys with more licenses; both servers pick them up.
    let renewals: Vec<String> = keys
        .iter()
        .map(|key| {
            last_line(&ok(&[
                &[
                    "authority",
                    "key",
                    "renew",
                    "--key",
                    key,
                    "--valid-days",
                    "365",
                    "--licenses",
                    "3",
                ][..],
                &vendor,
            ]
            .concat()))
        })
        .collect();
    let updated = ok(&[&["keys", "update"][..], &on].concat());
    assert!(
        updated.contains(&format!("replaced by {}", renewals[0])),
        "{updated}"
    );
    ok(&[&["sync", "export", "--out", &d("request2.tsync")][..], &off].concat());
    ok(&[
        &[
            "authority",
            "process",
            "--in",
            &d("request2.tsync"),
            "--out",
            &d("response2.tsync"),
        ][..],
        &vendor,
    ]
    .concat());
    ok(&[&["sync", "import", &d("response2.tsync")][..], &off].concat());
    let updated = ok(&[&["keys", "update"][..], &off].concat());
    assert!(
        updated.contains(&format!("replaced by {}", renewals[1])),
        "{updated}"
    );
    for (remote, old, new) in [
        (&on, &keys[0], &renewals[0]),
        (&off, &keys[1], &renewals[1]),
    ] {
        let status: serde_json::Value =
            serde_json::from_str(&ok(&[&["status", "--json"][..], &remote[..]].concat())).unwrap();
        let old_key = status["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| &k["key_id"] == old)
            .unwrap();
        assert_eq!(&old_key["replaced_by"], new);
        let new_key = status["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| &k["key_id"] == new)
            .unwrap();
        assert_eq!(new_key["allocated"], true);
        assert!(status["sync"]["synchronized"].as_bool().unwrap());
    }
    let lease_id = online_lease["lease_id"].as_str().unwrap();
    ok(&[&["lease", "heartbeat", lease_id][..], &on].concat());

    // A reinstalled server (new key pair) cannot use the bound server ID until the vendor resets it.
    let thief = ServerProcess::spawn(
        &[
            "server",
            "--data",
            &d("reinstalled"),
            "--listen",
            "127.0.0.1:0",
            "--server-id",
            &online_id,
            "--authority",
            &authority.url,
            // The test drives each sync (the default would sync at start by itself).
            "--sync-schedule",
            "off",
            "--trust",
            &trust,
        ],
        "Tessera license server on ",
    );
    let thief_token = std::fs::read_to_string(dir.path().join("reinstalled/admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let thief_remote = [
        "--server",
        thief.url.as_str(),
        "--token",
        thief_token.as_str(),
    ];
    fails_with(&[&["sync"][..], &thief_remote].concat(), "server_id_in_use");
    ok(&[&["authority", "server", "reset", &online_id][..], &vendor].concat());
    ok(&[&["sync"][..], &thief_remote].concat());
}

/// Loopback listeners on free ports, held until the caller drops them (just before its
/// servers bind those ports).
///
/// The ports come from below Linux's ephemeral range (32768–60999): a port the kernel hands
/// to an outgoing connection or a `:0` listener in a test running alongside could otherwise
/// take a host's port between its reservation and its start (or while it restarts after a
/// `kill -9`). Candidates are spread by process id and a counter, and bound to check.
fn reserve_ports(n: usize) -> Vec<std::net::TcpListener> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let mut listeners = Vec::with_capacity(n);
    while listeners.len() < n {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + (std::process::id().wrapping_mul(7_919) + k.wrapping_mul(104_729)) % SPAN;
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            listeners.push(listener);
        }
        assert!(k < 1_000_000, "no free port below the ephemeral range");
    }
    listeners
}

fn ports_of(listeners: &[std::net::TcpListener]) -> Vec<u16> {
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Free loopback ports (bound, read, released just before the servers bind).
fn free_ports(n: usize) -> Vec<u16> {
    ports_of(&reserve_ports(n))
}

#[path = "cli/api_fuzz.rs"]
mod api_fuzz;
#[path = "cli/console.rs"]
mod console;
#[path = "cli/domain.rs"]
mod domain;
#[path = "cli/neighbours.rs"]
mod neighbours;
#[path = "cli/nemesis.rs"]
mod nemesis;
#[path = "cli/package.rs"]
mod package;
#[path = "cli/pair.rs"]
mod pair;
#[path = "cli/sync_chain.rs"]
mod sync_chain;
#[path = "cli/tls.rs"]
mod tls;

/// Automatic renewal at a key's end (the manual's outcome 3): a renewal key bought in advance,
/// valid from the old key's end, is allocated by the update; a station heartbeating on the
/// old key 90 s before its end keeps the same lease across it, now on the renewal.
#[test]
fn a_lease_crosses_its_keys_end_onto_the_renewal_bought_in_advance() {
    let dir = tempfile::tempdir().unwrap();
    let old_id = setup_vendor(dir.path()); // cad.json: 2 licenses, 30 days
    let data = dir.path().join("data");
    let server = ServerProcess::spawn(
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--lease-ttl",
            "10m",
            "--test-clock",
            "--data",
            data.to_str().unwrap(),
            "--trust",
            dir.path().join("vendor/vendor.pub").to_str().unwrap(),
        ],
        "Tessera license server on ",
    );
    let token = token(dir.path());
    let remote = ["--server", server.url.as_str(), "--token", token.as_str()];
    ok(&[
        &["keys", "add", dir.path().join("cad.json").to_str().unwrap()][..],
        &remote,
    ]
    .concat());
    let status = || -> serde_json::Value {
        serde_json::from_str(&ok(&[&["status", "--json"][..], &remote].concat())).unwrap()
    };
    let old_end: jiff::Timestamp = status()["keys"][0]["valid_until"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let renewal = dir.path().join("renewal.json");
    let renewal_id = last_line(&ok(&[
        "vendor",
        "issue",
        "--dir",
        dir.path().join("vendor").to_str().unwrap(),
        "--customer",
        "acme",
        "--components",
        "cad,cam",
        "--licenses",
        "2",
        "--valid-from",
        &old_end.to_string(),
        "--valid-days",
        "365",
        "--renews",
        &old_id,
        "--out",
        renewal.to_str().unwrap(),
    ]));
    ok(&[&["keys", "add", renewal.to_str().unwrap()][..], &remote].concat());
    let updated = ok(&[&["keys", "update"][..], &remote].concat());
    assert!(updated.contains(&renewal_id), "{updated}");
    // Five minutes before the old key's end a station checks out, and heartbeats 90 s
    // before it.
    let now: jiff::Timestamp = status()["now"].as_str().unwrap().parse().unwrap();
    let to_end = old_end.duration_since(now).as_millis() as i64;
    neighbours::advance_clock(&server.url, &token, to_end - 300_000);
    let lease = checkout_cad(&remote, "ws-1");
    let lease_id = lease["lease_id"].as_str().unwrap();
    assert_eq!(lease["key_id"], old_id.as_str());
    neighbours::advance_clock(&server.url, &token, 210_000);
    ok(&[&["lease", "heartbeat", lease_id][..], &remote].concat());
    // 90 s after it: the same lease, now on the renewal, no gap and no second license.
    neighbours::advance_clock(&server.url, &token, 180_000);
    let beat: serde_json::Value =
        serde_json::from_str(&ok(
            &[&["lease", "heartbeat", lease_id][..], &remote].concat()
        ))
        .unwrap();
    assert_eq!(beat["lease_id"], lease_id);
    assert_eq!(beat["key_id"], renewal_id.as_str(), "{beat}");
    let after = status();
    let leases = after["leases"].as_array().unwrap();
    assert_eq!(leases.len(), 1, "{after}");
    assert_eq!(leases[0]["key_id"], renewal_id.as_str());
    let renewal_key = after["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == renewal_id.as_str())
        .expect("the renewal key");
    assert_eq!(renewal_key["in_use"], 1, "{after}");
}

/// Starts `tessera server` with `extra` flags, its log (stderr) written to `log`.
fn server_logging_to(dir: &Path, extra: &[&str], log: &Path) -> (Child, String) {
    let data = dir.join("data");
    let trust = dir.join("vendor").join("vendor.pub");
    let mut child = Command::new(BIN)
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
            "--trust",
            trust.to_str().unwrap(),
        ])
        .args(extra)
        .env("RUST_LOG", "warn,tessera::activity=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let url = line
        .trim()
        .strip_prefix("Tessera license server on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (child, url)
}

/// Polls `log` (bounded) until it has `lines` lines containing `needle`.
fn log_lines(log: &Path, needle: &str, lines: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let found: Vec<String> = text
            .lines()
            .filter(|line| line.contains(needle))
            .map(str::to_string)
            .collect();
        if found.len() >= lines {
            return found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{needle:?} x{lines} not in the log:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn the_activity_log_has_a_line_per_checkout_checkin_and_denial_in_text_or_json() {
    let dir = tempfile::tempdir().unwrap();
    let bad = tessera(&["server", "--log-format", "xml"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("log_format = \"xml\": expected"));
    let key_file = dir.path().join("cad.json");
    setup_vendor(dir.path()); // cad, cam: 2 licenses
    for format in ["text", "json"] {
        let log = dir.path().join(format!("{format}.log"));
        // Text by flag, JSON by the config file's `log_format`.
        let config = dir.path().join("logging.toml");
        std::fs::write(&config, format!("log_format = \"{format}\"\n")).unwrap();
        let flags = match format {
            "text" => vec!["--log-format", "text"],
            _ => vec!["--config", config.to_str().unwrap()],
        };
        let (mut child, url) = server_logging_to(dir.path(), &flags, &log);
        let token = token(dir.path());
        let remote = ["--server", url.as_str(), "--token", token.as_str()];
        if format == "text" {
            ok(&[&["keys", "add", key_file.to_str().unwrap()][..], &remote].concat());
        }
        let station = |n: u32| format!("{format}-ws-{n}");
        let leases: Vec<serde_json::Value> = (1..=2)
            .map(|n| checkout_cad(&remote, &station(n)))
            .collect();
        let denied = tessera(
            &[
                &[
                    "lease",
                    "checkout",
                    "--component",
                    "cad",
                    "--station",
                    &station(3),
                ][..],
                &remote,
            ]
            .concat(),
        );
        assert!(!denied.status.success());
        let lease_id = leases[0]["lease_id"].as_str().unwrap();
        ok(&[&["lease", "checkin", lease_id][..], &remote].concat());
        let out = log_lines(&log, "OUT", 2);
        let denied = log_lines(&log, "DENIED", 1);
        let returned = log_lines(&log, "IN", 1);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            !text.contains('\u{1b}'),
            "no colour codes in a file: {text}"
        );
        if format == "text" {
            assert!(
                out[0].contains(&format!("OUT: cad station={}", station(1))),
                "{out:?}"
            );
            assert!(out[0].contains(&format!(
                " lease={}",
                leases[0]["lease_id"].as_str().unwrap()
            )));
            assert!(
                denied[0].contains("DENIED: cad")
                    && denied[0].contains("code=no_licenses_available"),
                "{denied:?}"
            );
        } else {
            let parse = |line: &str| -> serde_json::Value { serde_json::from_str(line).unwrap() };
            for line in text.lines() {
                parse(line); // every line is one JSON object
            }
            let out = parse(&out[0]);
            assert_eq!(out["target"], "tessera::activity");
            assert_eq!(out["activity"], "OUT");
            assert_eq!(out["component"], "cad");
            assert_eq!(out["station"], station(1));
            assert_eq!(out["lease"], leases[0]["lease_id"]);
            let denied = parse(&denied[0]);
            assert_eq!(denied["activity"], "DENIED");
            assert_eq!(denied["code"], "no_licenses_available");
            let returned = returned
                .iter()
                .map(|l| parse(l))
                .find(|l| l["activity"] == "IN");
            assert_eq!(returned.unwrap()["lease"], lease_id);
        }
        // The next round starts on the same data: return what is still held.
        let second = leases[1]["lease_id"].as_str().unwrap();
        ok(&[&["lease", "checkin", second][..], &remote].concat());
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// The first Raft log entry whose JSON is `LIKE` the pattern: (log index, JSON).
fn log_entry_like(store: &Path, pattern: &str) -> (i64, String) {
    let (index, entry): (i64, Vec<u8>) = rusqlite::Connection::open(store)
        .unwrap()
        .query_row(
            "SELECT log_index, entry FROM raft_log WHERE CAST(entry AS TEXT) LIKE ?1 ORDER BY log_index LIMIT 1",
            [pattern],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    (index, String::from_utf8(entry).unwrap())
}

/// Rewrites the Raft log entry at `index`, its hash chain recomputed (see
/// `tessera_store::chain::tamper`).
fn rewrite_log_entry(store: &Path, index: i64, entry: &[u8]) {
    tessera_store::chain::tamper::rewrite_entry(store, index, entry);
}
