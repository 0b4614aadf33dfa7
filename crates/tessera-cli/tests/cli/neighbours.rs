//! A parent and a child license server as real processes, configured by `tessera.toml`
//! files with the `[[neighbour]]` and `[licenses]` keys of the docs, on test clocks that the
//! test moves (`--test-clock`), never by sleeping for a timer.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{ServerProcess, ok, setup_vendor, tessera};

/// Creates an identity key pair for a server's data directory before its first start, so
/// each side can name the other's public key in its config. Returns the public key.
fn identity(root: &Path, data: &str) -> String {
    let keys = root.join(format!("{data}-identity"));
    ok(&["vendor", "init", "--dir", keys.to_str().unwrap()]);
    let data = root.join(data);
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(keys.join("vendor.key"), data.join("server.key")).unwrap();
    std::fs::copy(keys.join("vendor.pub"), data.join("server.pub")).unwrap();
    let text = std::fs::read_to_string(keys.join("vendor.pub")).unwrap();
    text.lines().nth(1).unwrap().trim().to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn status(url: &str, token: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&[
        "status", "--json", "--server", url, "--token", token,
    ]))
    .unwrap()
}

fn key<'a>(status: &'a serde_json::Value, key_id: &str) -> Option<&'a serde_json::Value> {
    status["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == key_id)
}

fn advance_clock(url: &str, token: &str, ms: i64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = runtime.block_on(async {
        reqwest::Client::new()
            .post(format!("{url}/v1/test/clock"))
            .bearer_auth(token)
            .json(&serde_json::json!({ "advance_ms": ms }))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert!(status.is_success(), "{status}");
}

#[test]
fn a_parent_donates_to_a_child_process_and_gets_the_licenses_back_when_it_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let key_id = setup_vendor(root); // cad.json: 2 licenses of cad, cam
    let (hq_port, branch_port) = (free_port(), free_port());
    let hq_key = identity(root, "hq-data");
    let branch_key = identity(root, "branch-data");
    let licenses = r#"
[licenses]
donation_renewal_period = "1h"
sync_period = "10m"
usage_report_period = "1h"
active_station_period = "1d"
preliminary_renewal_interval = "10m"
"#;
    std::fs::write(
        root.join("hq.toml"),
        format!(
            r#"data = "hq-data"
listen = "127.0.0.1:{hq_port}"
trust = ["vendor/vendor.pub"]
server_id = "hq"
lease_ttl = "10m"

[[neighbour]]
id = "branch-1"
url = "http://127.0.0.1:{branch_port}"
relation = "child"
connection = "permanent"
public_key = "{branch_key}"

[[neighbour]]
id = "east"
url = "http://127.0.0.1:9"
relation = "peer"
send = true
receive = false
connection = "periodic"
reconnect_period = "30m"
public_key = "{branch_key}"
{licenses}"#
        ),
    )
    .unwrap();
    std::fs::write(
        root.join("branch.toml"),
        format!(
            r#"data = "branch-data"
listen = "127.0.0.1:{branch_port}"
trust = ["vendor/vendor.pub"]
server_id = "branch-1"
lease_ttl = "10m"

[[neighbour]]
id = "hq"
url = "http://127.0.0.1:{hq_port}"
relation = "parent"
connection = "permanent"
public_key = "{hq_key}"
{licenses}"#
        ),
    )
    .unwrap();
    let start = |config: &str| {
        ServerProcess::spawn(
            &[
                "server",
                "--config",
                root.join(config).to_str().unwrap(),
                "--test-clock",
            ],
            "Tessera license server on ",
        )
    };
    let hq = start("hq.toml");
    let branch = start("branch.toml");
    let read_token = |data: &str| {
        std::fs::read_to_string(root.join(data).join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    };
    let (hq_token, branch_token) = (read_token("hq-data"), read_token("branch-data"));
    let hq_remote = ["--server", hq.url.as_str(), "--token", hq_token.as_str()];
    ok(&[
        &["keys", "add", root.join("cad.json").to_str().unwrap()][..],
        &hq_remote,
    ]
    .concat());

    let until = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(20 * 24))
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date()
        .to_string();
    let donated = ok(&[
        &[
            "donate",
            "--key",
            key_id.as_str(),
            "--to",
            "branch-1",
            "--licenses",
            "1",
            "--until",
            until.as_str(),
        ][..],
        &hq_remote,
    ]
    .concat());
    assert!(donated.contains("\"donated_now\": 1"), "{donated}");
    let at_hq = status(&hq.url, &hq_token);
    let own = key(&at_hq, &key_id).unwrap();
    assert_eq!(
        (own["licenses"].as_u64(), own["donated_out"].as_u64()),
        (Some(2), Some(1))
    );
    let at_branch = status(&branch.url, &branch_token);
    let pool = format!("{key_id}@hq");
    let received = key(&at_branch, &pool).expect("the grant reached the child");
    assert_eq!(
        (
            received["received"].as_u64(),
            received["received_from"].as_str()
        ),
        (Some(1), Some("hq"))
    );

    // The child serves its one license; a second station is refused there.
    let checkout = |url: &str, station: &str| {
        tessera(&[
            "lease",
            "checkout",
            "--component",
            "cad",
            "--station",
            station,
            "--server",
            url,
        ])
    };
    assert!(checkout(&branch.url, "ws-b1").status.success());
    let refused = checkout(&branch.url, "ws-b2");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no_licenses_available"));
    let listing = ok(&[&["neighbours", "list"][..], &hq_remote].concat());
    assert!(
        listing.contains("branch-1") && listing.contains("donated 1 of"),
        "{listing}"
    );

    // The child dies; one renewal period plus the clock skew later (test clock), the parent
    // has its license back without any message from the child.
    branch.kill_9();
    advance_clock(&hq.url, &hq_token, 3_600_000 + 31_000);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let at_hq = status(&hq.url, &hq_token);
        if key(&at_hq, &key_id).unwrap()["donated_out"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the donated license never came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(checkout(&hq.url, "ws-h1").status.success());
    assert!(checkout(&hq.url, "ws-h2").status.success());
}
