//! #22 item 3, sync as a chain, with real processes and real data directories: a copied
//! data directory (T4) and a restored backup (T5) are refused by the authority, listed by
//! `tessera authority alerts`, and a server is let back in by `tessera authority server
//! reset ID`.

use std::path::PathBuf;

use super::*;

/// A vendor authority process with one server ID and a key issued to it.
struct Vendor {
    _process: ServerProcess,
    url: String,
    token: String,
    server_id: String,
    trust: PathBuf,
}

impl Vendor {
    fn start(dir: &Path) -> Vendor {
        let data = dir.join("authority");
        let process = ServerProcess::spawn(
            &[
                "authority",
                "--data",
                data.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ],
            "Tessera authority on ",
        );
        let mut vendor = Vendor {
            url: process.url.clone(),
            _process: process,
            token: admin_token_in(&data),
            server_id: String::new(),
            trust: data.join("vendor.pub"),
        };
        vendor.server_id =
            last_line(&vendor.ok(&["authority", "server", "add", "--customer", "acme"]));
        let id = vendor.server_id.clone();
        vendor.ok(&[
            "authority",
            "key",
            "issue",
            "--server-id",
            &id,
            "--components",
            "cad",
            "--licenses",
            "2",
            "--valid-days",
            "30",
        ]);
        vendor
    }

    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = args.to_vec();
        all.extend(["--authority", &self.url, "--token", &self.token]);
        all
    }

    fn ok(&self, args: &[&str]) -> String {
        ok(&self.args(args))
    }

    /// `tessera authority alerts --json`.
    fn alerts(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["authority", "alerts", "--json"])).unwrap()
    }

    /// A license server on `data` with this vendor's server ID; online if `online`.
    fn server(&self, data: &Path, online: bool) -> Server {
        let mut args = vec![
            "server",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
            "--server-id",
            &self.server_id,
            "--trust",
            self.trust.to_str().unwrap(),
        ];
        if online {
            args.extend(["--authority", &self.url]);
        }
        let process = ServerProcess::spawn(&args, "Tessera license server on ");
        Server {
            token: admin_token_in(data),
            process,
        }
    }

    /// The air-gapped round trip: export on the server, process at the vendor, import.
    fn sync_by_file(&self, server: &Server, dir: &Path, name: &str) {
        let request = dir.join(format!("{name}.request"));
        let response = dir.join(format!("{name}.response"));
        server.ok(&["sync", "export", "--out", request.to_str().unwrap()]);
        self.ok(&[
            "authority",
            "process",
            "--in",
            request.to_str().unwrap(),
            "--out",
            response.to_str().unwrap(),
        ]);
        server.ok(&["sync", "import", response.to_str().unwrap()]);
    }
}

struct Server {
    process: ServerProcess,
    token: String,
}

impl Server {
    fn ok(&self, args: &[&str]) -> String {
        let mut all = args.to_vec();
        all.extend(["--server", &self.process.url, "--token", &self.token]);
        ok(&all)
    }

    fn sync_status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["sync", "status", "--json"])).unwrap()
    }

    /// `POST /v1/sync` as an administrator: (status, error code).
    fn sync_now(&self) -> (u16, String) {
        use std::io::{Read, Write};
        let authority = self.process.url.strip_prefix("http://").unwrap();
        let mut stream = std::net::TcpStream::connect(authority).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(40)))
            .unwrap();
        write!(
            stream,
            "POST /v1/sync HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\n\r\n",
            self.token
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let body: serde_json::Value = response
            .split_once("\r\n\r\n")
            .and_then(|(_, body)| serde_json::from_str(body).ok())
            .unwrap_or_default();
        let code = body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        (status, code)
    }
}

/// `cp -a FROM TO`: the whole data directory, identity included, as an operator copies it.
fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .args(["-a", from.to_str().unwrap(), to.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success(), "cp -a");
}

fn kinds_for(alerts: &[serde_json::Value], server_id: &str) -> Vec<String> {
    alerts
        .iter()
        .filter(|alert| alert["server_id"] == server_id)
        .map(|alert| alert["kind"].as_str().unwrap().to_string())
        .collect()
}

/// T4, online: a server's data directory copied (identity included) and both copies run.
#[test]
fn a_copied_data_directory_is_refused_as_cloned_when_it_syncs_online() {
    let dir = tempfile::tempdir().unwrap();
    let vendor = Vendor::start(dir.path());
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let original = vendor.server(&a, true);
    original.ok(&["sync"]);
    original.process.terminate();
    copy_dir(&a, &b);
    let original = vendor.server(&a, true);
    let copy = vendor.server(&b, true);

    original.ok(&["sync"]);
    // The administrator's sync on the copy: 409 with the authority's code.
    assert_eq!(copy.sync_now(), (409, "server_cloned".to_string()));
    let status = copy.sync_status();
    assert_eq!(status["blocked"]["code"], "server_cloned", "{status}");
    let text = copy.ok(&["sync", "status"]);
    assert!(text.contains("blocked:        server_cloned"), "{text}");
    let events = copy.ok(&["events", "--json"]);
    assert!(events.contains("sync_blocked"), "{events}");
    fails_with(
        &[
            &["sync"][..],
            &["--server", &copy.process.url, "--token", &copy.token],
        ]
        .concat(),
        "server_cloned",
    );

    let alerts = vendor.alerts();
    assert_eq!(kinds_for(&alerts, &vendor.server_id), ["server_cloned"]);
    assert_eq!(
        alerts[0]["count"], 2,
        "the second refusal counts on the alert"
    );
    let listed = vendor.ok(&["authority", "alerts"]);
    assert!(
        listed.contains("server_cloned") && listed.contains(&vendor.server_id),
        "{listed}"
    );
    // The original is not disturbed.
    original.ok(&["sync"]);
    assert!(original.sync_status()["blocked"].is_null());

    // On the stopped copy, the doctor explains the block and the way out.
    copy.process.terminate();
    let doctor = tessera(&[
        "doctor",
        "--data",
        b.to_str().unwrap(),
        "--server-id",
        &vendor.server_id,
        "--trust",
        vendor.trust.to_str().unwrap(),
    ]);
    let report = String::from_utf8_lossy(&doctor.stdout).to_string()
        + &String::from_utf8_lossy(&doctor.stderr);
    assert!(!doctor.status.success(), "{report}");
    assert!(
        report.contains("refused this server's last sync (server_cloned)")
            && report.contains("tessera authority server reset"),
        "{report}"
    );
}

/// T4, by file: the same with the air-gapped flow; the vendor's `authority process` refuses.
#[test]
fn a_copied_data_directory_is_refused_as_cloned_when_it_syncs_by_file() {
    let dir = tempfile::tempdir().unwrap();
    let vendor = Vendor::start(dir.path());
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let original = vendor.server(&a, false);
    vendor.sync_by_file(&original, dir.path(), "first");
    original.process.terminate();
    copy_dir(&a, &b);
    let original = vendor.server(&a, false);
    let copy = vendor.server(&b, false);

    vendor.sync_by_file(&original, dir.path(), "original");
    let request = dir.path().join("copy.request");
    copy.ok(&["sync", "export", "--out", request.to_str().unwrap()]);
    let response = dir.path().join("copy.response");
    fails_with(
        &vendor.args(&[
            "authority",
            "process",
            "--in",
            request.to_str().unwrap(),
            "--out",
            response.to_str().unwrap(),
        ]),
        "server_cloned",
    );
    assert!(!response.exists());
    let alerts = vendor.alerts();
    assert_eq!(kinds_for(&alerts, &vendor.server_id), ["server_cloned"]);
    assert!(
        alerts[0]["detail"]
            .as_str()
            .unwrap()
            .contains("another installation"),
        "{alerts:?}"
    );
    vendor.sync_by_file(&original, dir.path(), "original-again");
}

/// T5 and the reset: a backup of the data directory put back in place after a sync.
#[test]
fn a_restored_backup_is_refused_as_rolled_back_until_the_vendor_resets_it() {
    let dir = tempfile::tempdir().unwrap();
    let vendor = Vendor::start(dir.path());
    let (data, backup) = (dir.path().join("data"), dir.path().join("backup"));
    let server = vendor.server(&data, true);
    server.ok(&["sync"]);
    server.process.terminate();
    copy_dir(&data, &backup);
    let server = vendor.server(&data, true);
    server.ok(&["sync"]);
    server.process.terminate();
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::rename(&backup, &data).unwrap();

    let restored = vendor.server(&data, true);
    assert_eq!(restored.sync_now(), (409, "server_rolled_back".to_string()));
    assert_eq!(
        restored.sync_status()["blocked"]["code"],
        "server_rolled_back"
    );
    let alerts = vendor.alerts();
    assert_eq!(
        kinds_for(&alerts, &vendor.server_id),
        ["server_rolled_back"]
    );
    assert!(
        alerts[0]["detail"]
            .as_str()
            .unwrap()
            .contains("this same installation"),
        "{alerts:?}"
    );

    // The vendor, satisfied only this installation is left, resets the server ID.
    let said = vendor.ok(&["authority", "server", "reset", &vendor.server_id]);
    assert!(said.contains("sync chain cleared"), "{said}");
    let synced = restored.ok(&["sync"]);
    assert!(synced.contains("synchronized"), "{synced}");
    assert!(restored.sync_status()["blocked"].is_null());
    restored.ok(&["sync"]);
    assert_eq!(
        kinds_for(&vendor.alerts(), &vendor.server_id),
        ["chain_reset", "server_rolled_back"]
    );
}

/// Rewrites `usage.sqlite3`'s audit log without the records whose action matches `like`,
/// renumbered and with the hash chain recomputed, as a root customer who read the source
/// would: `tessera audit verify` on the file alone finds it intact.
fn delete_audit_records_and_rechain(usage: &Path, like: &str) -> usize {
    let connection = rusqlite::Connection::open(usage).unwrap();
    let deleted = connection
        .execute("DELETE FROM audit_log WHERE action LIKE ?1", [like])
        .unwrap();
    let rows: Vec<(i64, String, String, String)> = connection
        .prepare("SELECT at_ms, actor, action, details FROM audit_log ORDER BY seq")
        .unwrap()
        .query_map([], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    connection.execute("DELETE FROM audit_log", []).unwrap();
    let mut prev = tessera_server::audit::genesis();
    for (seq, (at_ms, actor, action, details)) in (1..).zip(rows) {
        let hash = tessera_server::audit::chain_hash(&prev, seq, at_ms, &actor, &action, &details);
        connection
            .execute(
                "INSERT INTO audit_log (seq, at_ms, actor, action, details, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                rusqlite::params![seq, at_ms, actor, action, details, prev, hash],
            )
            .unwrap();
        prev = hash;
    }
    deleted
}

/// T12 and T2, detected at the next sync: the customer deletes lease records from the audit
/// log and rewrites two checkouts in the Raft log (one so that it replays to nothing, its
/// seat free again), each with its hash chain recomputed, so that neither the server's start
/// nor `tessera audit verify --data` notices. The server's own `tessera audit verify` checks
/// against the head the vendor countersigned and fails; the next sync is answered, and the
/// vendor sees `audit_rewritten`, `log_rewritten` and `ledger_rewound` (fewer leases issued
/// than reported before) with the server ID. The sync after that countersigns the new heads:
/// no new alert.
#[test]
fn history_rewritten_with_its_chains_recomputed_is_reported_to_the_vendor_at_the_next_sync() {
    let dir = tempfile::tempdir().unwrap();
    let vendor = Vendor::start(dir.path());
    let data = dir.path().join("a");
    let server = vendor.server(&data, true);
    server.ok(&["sync"]);
    for station in ["ws-1", "ws-2"] {
        server.ok(&[
            "lease",
            "checkout",
            "--component",
            "cad",
            "--station",
            station,
        ]);
    }
    server.ok(&["sync"]);
    let verified = server.ok(&["audit", "verify"]);
    assert!(
        verified.contains("has the hash the vendor countersigned at the last sync"),
        "{verified}"
    );
    // A clean sync raises nothing.
    server.ok(&["sync"]);
    assert_eq!(
        kinds_for(&vendor.alerts(), &vendor.server_id),
        Vec::<String>::new()
    );
    server.process.terminate();

    let deleted = delete_audit_records_and_rechain(&data.join("usage.sqlite3"), "lease.%");
    assert_eq!(deleted, 2, "the two checkouts' records");
    let intact = ok(&["audit", "verify", "--data", data.to_str().unwrap()]);
    assert!(intact.contains("audit chain intact"), "{intact}");
    let store = data.join("raft.sqlite3");
    let (index, text) = super::log_entry_like(&store, "%\"ws-2\"%");
    super::rewrite_log_entry(
        &store,
        index,
        text.replace("\"ws-2\"", "\"ws-9\"").as_bytes(),
    );
    // And T2 proper: ws-1's checkout made one that replays to nothing (a component the key
    // does not cover), so its seat is free again.
    let (index, text) = super::log_entry_like(&store, "%\"ws-1\"%");
    let forgotten = text.replace("\"cad\"", "\"gone\"");
    assert_ne!(forgotten, text, "{text}");
    super::rewrite_log_entry(&store, index, forgotten.as_bytes());

    // The start notices nothing: both chains are whole; ws-1's lease is forgotten.
    let server = vendor.server(&data, true);
    let status: serde_json::Value =
        serde_json::from_str(&server.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["leases"].as_array().unwrap().len(), 1, "{status}");
    fails_with(
        &[
            &["audit", "verify"][..],
            &["--server", &server.process.url, "--token", &server.token],
        ]
        .concat(),
        "records were deleted",
    );
    server.ok(&["sync"]);
    let alerts = vendor.alerts();
    let mut kinds = kinds_for(&alerts, &vendor.server_id);
    kinds.sort();
    assert_eq!(
        kinds,
        ["audit_rewritten", "ledger_rewound", "log_rewritten"],
        "{alerts:?}"
    );
    let listed = vendor.ok(&["authority", "alerts"]);
    assert!(
        listed.contains("audit_rewritten")
            && listed.contains("audit records were deleted")
            && listed.contains(&vendor.server_id),
        "{listed}"
    );
    // Countersigned again: the next sync raises nothing new.
    server.ok(&["sync"]);
    assert_eq!(kinds_for(&vendor.alerts(), &vendor.server_id).len(), 3);
}

/// Item 3 of #22: a server with an authority URL syncs daily by default, so at its start it
/// syncs by itself; an online sync certifies it for its customer's online term (30 days
/// unless the vendor chose otherwise: `tessera authority customer set`), and a 30-day
/// certificate does not raise the 30-days-left warning the day it is issued.
#[test]
fn an_online_server_syncs_by_itself_and_is_certified_for_its_customers_online_term() {
    let dir = tempfile::tempdir().unwrap();
    let vendor = Vendor::start(dir.path());
    let server = vendor.server(&dir.path().join("a"), true);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        let status = server.sync_status();
        if status["synchronized"] == true {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no sync by itself within 20 s: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(status["schedule"], "daily", "{status}");
    let term_days = |status: &serde_json::Value| {
        let at = |field: &str| {
            status[field]
                .as_str()
                .unwrap()
                .parse::<jiff::Timestamp>()
                .unwrap()
        };
        at("deadline")
            .duration_since(at("last_sync_at"))
            .as_secs_f64()
            / 86_400.0
    };
    assert!((term_days(&status) - 30.0).abs() < 0.01, "{status}");

    vendor.ok(&[
        "authority",
        "customer",
        "set",
        "--name",
        "acme",
        "--online-certificate-days",
        "90",
    ]);
    let listed = vendor.ok(&["authority", "customer", "list"]);
    assert!(listed.contains("90d"), "{listed}");
    server.ok(&["sync"]);
    assert!((term_days(&server.sync_status()) - 90.0).abs() < 0.01);
    let events = server.ok(&["events", "--json"]);
    assert!(!events.contains("sync_deadline_near"), "{events}");
    fails_with(
        &vendor.args(&[
            "authority",
            "customer",
            "set",
            "--name",
            "acme",
            "--online-certificate-days",
            "400",
        ]),
        "between 1 and 366",
    );
}
