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
    super::free_ports(1)[0]
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

pub(super) fn advance_clock(url: &str, token: &str, ms: i64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = runtime.block_on(async {
        tessera_tls::client_builder_exactly(None)
            .unwrap()
            .build()
            .unwrap()
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

/// One server process of a test network: its config file, data dir, URL and token.
struct Node {
    name: &'static str,
    port: u16,
    key: String,
}

fn write_config(root: &Path, node: &Node, neighbours: &[(&Node, &str)]) {
    write_config_with(root, node, neighbours, "1h");
}

/// [`write_config`] with another `donation_renewal_period`.
fn write_config_with(root: &Path, node: &Node, neighbours: &[(&Node, &str)], renewal: &str) {
    let mut text = format!(
        "data = \"{0}-data\"\nlisten = \"127.0.0.1:{1}\"\ntrust = [\"vendor/vendor.pub\"]\nserver_id = \"{0}\"\nlease_ttl = \"10m\"\n",
        node.name, node.port
    );
    for (other, relation) in neighbours {
        text += &format!(
            "\n[[neighbour]]\nid = \"{}\"\nurl = \"http://127.0.0.1:{}\"\nrelation = \"{relation}\"\nconnection = \"permanent\"\npublic_key = \"{}\"\n",
            other.name, other.port, other.key
        );
    }
    text +=
        &format!("\n[licenses]\ndonation_renewal_period = \"{renewal}\"\nsync_period = \"10m\"\n");
    std::fs::write(root.join(format!("{}.toml", node.name)), text).unwrap();
}

/// Most steps [`poll_stepping`] takes: enough for a few retries in a row, too few to let a
/// timer that fires late (a renewal past half of its grant, say) pass unnoticed.
const STEPS_MAX: usize = 6;

/// Polls `done` for up to 20 s, calling `step` between the first [`STEPS_MAX`] attempts: a test
/// whose processes run on test clocks moves them on a little each time, so that a retry
/// scheduled in test time (after a failed exchange, say) comes due while the poll waits.
fn poll_stepping(what: &str, mut step: impl FnMut(), mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut steps = 0;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within 20 s"
        );
        std::thread::sleep(Duration::from_millis(100));
        if steps < STEPS_MAX {
            step();
            steps += 1;
        }
    }
}

#[test]
fn a_chain_of_processes_renews_ends_and_detects_a_wiped_child() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup_vendor(root);
    let vendor = root.join("vendor");
    let key_file = root.join("k10.json");
    let key_id = ok(&[
        "vendor",
        "issue",
        "--dir",
        vendor.to_str().unwrap(),
        "--customer",
        "acme",
        "--components",
        "cad",
        "--licenses",
        "10",
        "--valid-days",
        "30",
        "--out",
        key_file.to_str().unwrap(),
    ])
    .trim()
    .to_string();
    let node = |name: &'static str| Node {
        name,
        port: free_port(),
        key: identity(root, &format!("{name}-data")),
    };
    let (hq, branch_1, branch_2, site) =
        (node("hq"), node("branch-1"), node("branch-2"), node("site"));
    write_config(root, &hq, &[(&branch_1, "child"), (&branch_2, "child")]);
    write_config(root, &branch_1, &[(&hq, "parent"), (&site, "child")]);
    write_config(root, &branch_2, &[(&hq, "parent")]);
    write_config(root, &site, &[(&branch_1, "parent")]);
    let start = |node: &Node| {
        ServerProcess::spawn(
            &[
                "server",
                "--config",
                root.join(format!("{}.toml", node.name)).to_str().unwrap(),
                "--test-clock",
            ],
            "Tessera license server on ",
        )
    };
    let token = |node: &Node| {
        std::fs::read_to_string(root.join(format!("{}-data", node.name)).join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    };
    let processes: Vec<ServerProcess> = [&hq, &branch_1, &site].iter().map(|n| start(n)).collect();
    let branch_2_process = start(&branch_2);
    let url = |node: &Node| format!("http://127.0.0.1:{}", node.port);
    let remote = |node: &Node| {
        vec![
            "--server".to_string(),
            url(node),
            "--token".to_string(),
            token(node),
        ]
    };
    let run = |args: &[&str], node: &Node| {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(remote(node));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        ok(&refs)
    };
    // A process's time, on its test clock.
    let now_at = |node: &Node| -> jiff::Timestamp {
        let status: serde_json::Value =
            serde_json::from_str(&run(&["status", "--json"], node)).unwrap();
        status["now"].as_str().unwrap().parse().unwrap()
    };
    run(&["keys", "add", key_file.to_str().unwrap()], &hq);
    let until = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(20 * 24)).to_string();
    run(
        &[
            "donate",
            "--key",
            &key_id,
            "--to",
            "branch-1",
            "--licenses",
            "5",
            "--until",
            &until,
        ],
        &hq,
    );
    run(
        &[
            "donate",
            "--key",
            &key_id,
            "--to",
            "branch-2",
            "--licenses",
            "3",
            "--until",
            &until,
        ],
        &hq,
    );
    // The chain: branch-1 gives 2 of its 5 to the site.
    let pool = format!("{key_id}@hq");
    run(
        &[
            "donate",
            "--key",
            &pool,
            "--to",
            "site",
            "--licenses",
            "2",
            "--until",
            &until,
        ],
        &branch_1,
    );
    let at_site = status(&url(&site), &token(&site));
    let chained =
        key(&at_site, &format!("{key_id}@branch-1")).expect("the re-grant reached the site");
    assert_eq!(
        (
            chained["licenses"].as_u64(),
            chained["vendor_key_id"].as_str()
        ),
        (Some(2), Some(key_id.as_str()))
    );
    let too_many = tessera(
        &[
            &[
                "donate",
                "--key",
                &pool,
                "--to",
                "site",
                "--licenses",
                "6",
                "--until",
                &until,
            ][..],
            &remote(&branch_1)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        ]
        .concat(),
    );
    assert!(String::from_utf8_lossy(&too_many.stderr).contains("not_enough_licenses"));

    // Test clocks move together: neighbours refuse each other beyond clock_skew_max. The
    // processes are moved one after another, so an exchange can fail in between (a grant
    // pushed by a process still at the old time, say): while a poll waits, every clock moves
    // on by the neighbours' retry interval, so the retry comes due.
    let advance_all = |ms: i64| {
        for node in [&hq, &branch_1, &branch_2, &site] {
            advance_clock(&url(node), &token(node), ms);
        }
    };
    let retry_step = || advance_all(tessera_server::neighbours::RETRY_MS);

    // Renewal: past half of the one-hour grants every receiver asks, and serials go up.
    let serial = || {
        let donations: serde_json::Value =
            serde_json::from_str(&run(&["neighbours", "list", "--json"], &hq)).unwrap();
        donations["neighbours"][0]["donations"][0]["serial"]
            .as_u64()
            .expect("a donation to branch-1")
    };
    let first = serial();
    advance_all(35 * 60_000);
    poll_stepping("the renewal of branch-1's grant", retry_step, || {
        serial() > first
    });

    // The end date, moved to 10 minutes from now on the test clock, ends branch-2's grant.
    let now = now_at(&hq);
    let soon = (now + jiff::SignedDuration::from_mins(10)).to_string();
    run(
        &[
            "donate",
            "--key",
            &key_id,
            "--to",
            "branch-2",
            "--licenses",
            "3",
            "--until",
            &soon,
        ],
        &hq,
    );
    advance_all(10 * 60_000);
    poll_stepping("the end of branch-2's grant", retry_step, || {
        key(&status(&url(&branch_2), &token(&branch_2)), &pool).is_none()
    });
    // branch-1's end date moved a day later: a new grant (same count) replaces the one it
    // holds, which the parent no longer counts once the new one is out.
    let before_edit = serial();
    let later = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(21 * 24)).to_string();
    run(
        &[
            "donate",
            "--key",
            &key_id,
            "--to",
            "branch-1",
            "--licenses",
            "5",
            "--until",
            &later,
        ],
        &hq,
    );
    poll_stepping("branch-1's new grant", retry_step, || {
        serial() > before_edit
    });
    advance_all(35 * 60_000);
    // Editing a donation's end date or count is no mismatch: the receiver held the previous
    // grant while the new one was on its way.
    let events = run(&["events"], &hq);
    assert!(!events.contains("license_mismatch"), "{events}");

    // branch-2's store is wiped behind the parent's back (identity kept): the parent's
    // license synchronization reports the mismatch with both counts.
    branch_2_process.kill_9();
    run(
        &[
            "donate",
            "--key",
            &key_id,
            "--to",
            "branch-2",
            "--licenses",
            "3",
            "--until",
            &until,
        ],
        &hq,
    );
    let data = root.join("branch-2-data");
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("server.")
        {
            if path.is_dir() {
                std::fs::remove_dir_all(&path).unwrap();
            } else {
                std::fs::remove_file(&path).unwrap();
            }
        }
    }
    let _branch_2_again = start(&branch_2);
    // Its fresh test clock starts at the real time: bring it to the others'.
    let behind = now_at(&hq).duration_since(now_at(&branch_2));
    advance_clock(
        &url(&branch_2),
        &token(&branch_2),
        behind.as_millis() as i64,
    );
    advance_all(11 * 60_000);
    poll_stepping("a license_mismatch event on the parent", retry_step, || {
        run(&["events"], &hq).contains("license_mismatch")
    });

    // Usage reports: the site's stations, counted by the site, shown by its parent.
    let checkout = tessera(&[
        "lease",
        "checkout",
        "--component",
        "cad",
        "--station",
        "site-ws-1",
        "--server",
        &url(&site),
    ]);
    assert!(checkout.status.success(), "{checkout:?}");
    advance_all(61 * 60_000);
    poll_stepping("the site's usage report at branch-1", retry_step, || {
        let status: serde_json::Value =
            serde_json::from_str(&run(&["status", "--json"], &branch_1)).unwrap();
        status["usage_reports"]["site"]["active_stations"]["cad"] == 1
    });
    let table = run(&["status"], &branch_1);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("site") && l.contains("cad")),
        "{table}"
    );
    drop(processes);
}

#[test]
fn a_peer_pair_donates_only_in_the_direction_its_flags_allow() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let key_id = setup_vendor(root); // cad.json: 2 licenses
    let node = |name: &'static str| Node {
        name,
        port: free_port(),
        key: identity(root, &format!("{name}-data")),
    };
    let (east, west) = (node("east"), node("west"));
    let peer = |me: &Node, other: &Node, send: bool, receive: bool| {
        let mut text = format!(
            "data = \"{0}-data\"\nlisten = \"127.0.0.1:{1}\"\ntrust = [\"vendor/vendor.pub\"]\nserver_id = \"{0}\"\n",
            me.name, me.port
        );
        text += &format!(
            "\n[[neighbour]]\nid = \"{}\"\nurl = \"http://127.0.0.1:{}\"\nrelation = \"peer\"\nsend = {send}\nreceive = {receive}\nconnection = \"periodic\"\nreconnect_period = \"30m\"\npublic_key = \"{}\"\n",
            other.name, other.port, other.key
        );
        std::fs::write(root.join(format!("{}.toml", me.name)), text).unwrap();
    };
    // East may send to west; west accepts from east; nothing the other way.
    peer(&east, &west, true, false);
    peer(&west, &east, false, true);
    let start = |node: &Node| {
        ServerProcess::spawn(
            &[
                "server",
                "--config",
                root.join(format!("{}.toml", node.name)).to_str().unwrap(),
                "--test-clock",
            ],
            "Tessera license server on ",
        )
    };
    let (_east, _west) = (start(&east), start(&west));
    let remote = |node: &Node| {
        let token =
            std::fs::read_to_string(root.join(format!("{}-data", node.name)).join("admin.token"))
                .unwrap();
        [
            "--server".to_string(),
            format!("http://127.0.0.1:{}", node.port),
            "--token".to_string(),
            token.trim().to_string(),
        ]
    };
    let run = |args: &[&str], node: &Node| {
        let remote = remote(node);
        let all: Vec<&str> = args
            .iter()
            .copied()
            .chain(remote.iter().map(String::as_str))
            .collect();
        tessera(&all)
    };
    let add = run(
        &["keys", "add", root.join("cad.json").to_str().unwrap()],
        &east,
    );
    assert!(add.status.success(), "{add:?}");
    let west_key_file = root.join("west.json");
    let west_key = ok(&[
        "vendor",
        "issue",
        "--dir",
        root.join("vendor").to_str().unwrap(),
        "--customer",
        "acme",
        "--components",
        "cad",
        "--licenses",
        "3",
        "--valid-days",
        "30",
        "--out",
        west_key_file.to_str().unwrap(),
    ])
    .trim()
    .to_string();
    let add = run(&["keys", "add", west_key_file.to_str().unwrap()], &west);
    assert!(add.status.success(), "{add:?}");
    let until = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24 * 10)).to_string();
    // East sends one license; west receives it.
    let donated = run(
        &[
            "donate",
            "--key",
            &key_id,
            "--to",
            "west",
            "--licenses",
            "1",
            "--until",
            &until,
        ],
        &east,
    );
    assert!(donated.status.success(), "{donated:?}");
    let status: serde_json::Value =
        serde_json::from_slice(&run(&["status", "--json"], &west).stdout).unwrap();
    let received = key(&status, &format!("{key_id}@east")).expect("west received east's license");
    assert_eq!(received["received"], 1);
    // West may not donate to east (send = false), whatever it holds.
    let refused = run(
        &[
            "donate",
            "--key",
            &west_key,
            "--to",
            "east",
            "--licenses",
            "1",
            "--until",
            &until,
        ],
        &west,
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("neighbour_not_allowed"));
}

/// The reference (LispWorks): daemons "redirect any requests for licenses to an appropriate
/// domain". A branch with no key for `cad` sends its stations to `hq`, which serves it; the
/// station's client follows, and heartbeats and checks in at `hq`.
#[test]
fn a_server_without_the_component_redirects_stations_to_the_neighbour_serving_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup_vendor(root); // cad.json: cad, cam, 2 licenses
    let node = |name: &'static str| Node {
        name,
        port: free_port(),
        key: identity(root, &format!("{name}-data")),
    };
    let (hq, branch) = (node("hq"), node("branch"));
    write_config(root, &hq, &[(&branch, "child")]);
    write_config(root, &branch, &[(&hq, "parent")]);
    let start = |node: &Node| {
        ServerProcess::spawn(
            &[
                "server",
                "--config",
                root.join(format!("{}.toml", node.name)).to_str().unwrap(),
                "--test-clock",
            ],
            "Tessera license server on ",
        )
    };
    let (_hq_process, _branch_process) = (start(&hq), start(&branch));
    let url = |node: &Node| format!("http://127.0.0.1:{}", node.port);
    let token = |node: &Node| {
        std::fs::read_to_string(root.join(format!("{}-data", node.name)).join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    };
    let add = |node: &Node, file: &Path| {
        let url = url(node);
        let token = token(node);
        ok(&[
            "keys",
            "add",
            file.to_str().unwrap(),
            "--server",
            &url,
            "--token",
            &token,
        ]);
    };
    add(&hq, &root.join("cad.json"));
    // The branch serves `viewer` (which hq does not).
    let viewer_file = root.join("viewer.json");
    ok(&[
        "vendor",
        "issue",
        "--dir",
        root.join("vendor").to_str().unwrap(),
        "--customer",
        "acme",
        "--components",
        "viewer",
        "--licenses",
        "1",
        "--valid-days",
        "30",
        "--out",
        viewer_file.to_str().unwrap(),
    ]);
    add(&branch, &viewer_file);
    // The servers' test clocks started at their launch, which may be a second or more before
    // the keys' `valid_from` (now, when issued): move both past it, together (no skew).
    for node in [&hq, &branch] {
        advance_clock(&url(node), &token(node), 60_000);
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let raw = tessera_tls::client_builder_exactly(None)
            .unwrap()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let post = |base: String, query: &'static str, component: &'static str| {
            let raw = raw.clone();
            async move {
                let answer = raw
                    .post(format!("{base}/v1/leases{query}"))
                    .json(&serde_json::json!({"component": component, "station": "ws-raw"}))
                    .send()
                    .await
                    .unwrap();
                let status = answer.status().as_u16();
                let location = answer
                    .headers()
                    .get("location")
                    .map(|v| v.to_str().unwrap().to_string());
                let body: serde_json::Value = answer.json().await.unwrap();
                (status, location, body)
            }
        };
        // The branch has no key for cad: 307 to hq, one hop marked in the query.
        let (answer, location, body) = post(url(&branch), "", "cad").await;
        assert_eq!(answer, 307, "{body}");
        assert_eq!(body["error"]["code"], "component_elsewhere");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("\"hq\""),
            "{body}"
        );
        assert_eq!(
            location.as_deref(),
            Some(format!("{}/v1/leases?redirected_from=branch", url(&hq)).as_str())
        );
        // Nobody serves `plotter`: the plain refusal.
        let (answer, _, body) = post(url(&branch), "", "plotter").await;
        assert_eq!(
            (answer, &body["error"]["code"]),
            (404, &"component_not_licensed".into())
        );
        // hq sends viewer to the branch, but never a checkout that was already redirected.
        let (answer, location, _) = post(url(&hq), "", "viewer").await;
        assert_eq!(answer, 307);
        assert!(location.unwrap().starts_with(&url(&branch)));
        let (answer, _, body) = post(url(&hq), "?redirected_from=branch", "viewer").await;
        assert_eq!(
            (answer, &body["error"]["code"]),
            (404, &"component_not_licensed".into())
        );

        // A station's client, given only the branch, is served by hq.
        let client = tessera_client::Client::new(&url(&branch), None);
        let request = |station: &str| tessera_api::CheckoutRequest {
            component: "cad".into(),
            station: station.into(),
            user: "ann".into(),
            host: "ws".into(),
            nonce: String::new(),
            holder_key: String::new(),
            borrow_hours: 0,
        };
        let (lease, created) = client.checkout(&request("ws-1")).await.unwrap();
        assert!(created);
        assert_eq!(client.lease_server(&lease.lease_id), Some(url(&hq)));
        let hq_status = status(&url(&hq), &token(&hq));
        assert_eq!(key(&hq_status, &lease.key_id).unwrap()["in_use"], 1);
        let beat = client.heartbeat(&lease.lease_id).await.unwrap();
        assert_eq!(beat.lease_id, lease.lease_id);
        // hq's two licenses in use: its answer is the truth the station hears.
        client.checkout(&request("ws-2")).await.unwrap();
        let full = client.checkout(&request("ws-3")).await.unwrap_err();
        assert_eq!(full.code(), Some("no_licenses_available"), "{full}");
        client.checkin(&lease.lease_id).await.unwrap();
        assert_eq!(client.lease_server(&lease.lease_id), None);
        let hq_status = status(&url(&hq), &token(&hq));
        assert_eq!(key(&hq_status, &lease.key_id).unwrap()["in_use"], 1);
    });
}

/// The issue (#18, 2) with real processes on test clocks: a child's station heartbeating on
/// its parent's key shortly before that key's end goes on, same lease id, on the renewal the
/// parent bought in advance: the child got the renewal's grant beforehand.
#[test]
fn a_childs_station_crosses_its_parents_key_end_onto_the_renewal_bought_in_advance() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let key_id = setup_vendor(root); // cad.json: cad, cam, 2 licenses, 30 days
    let node = |name: &'static str| Node {
        name,
        port: free_port(),
        key: identity(root, &format!("{name}-data")),
    };
    let (hq, branch) = (node("hq"), node("branch"));
    // Grants of the longest period (7 days): the clocks go to the key's end in jumps shorter
    // than that, each followed by the renewal of the branch's grants.
    write_config_with(root, &hq, &[(&branch, "child")], "7d");
    write_config_with(root, &branch, &[(&hq, "parent")], "7d");
    let start = |node: &Node| {
        ServerProcess::spawn(
            &[
                "server",
                "--config",
                root.join(format!("{}.toml", node.name)).to_str().unwrap(),
                "--test-clock",
            ],
            "Tessera license server on ",
        )
    };
    let (_hq_process, _branch_process) = (start(&hq), start(&branch));
    let url = |node: &Node| format!("http://127.0.0.1:{}", node.port);
    let token = |node: &Node| {
        std::fs::read_to_string(root.join(format!("{}-data", node.name)).join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    };
    let (hq_url, hq_token, branch_url, branch_token) =
        (url(&hq), token(&hq), url(&branch), token(&branch));
    let at_hq =
        |args: &[&str]| ok(&[args, &["--server", &hq_url, "--token", &hq_token][..]].concat());
    let at_branch = |args: &[&str]| {
        ok(&[
            args,
            &["--server", &branch_url, "--token", &branch_token][..],
        ]
        .concat())
    };
    at_hq(&["keys", "add", root.join("cad.json").to_str().unwrap()]);
    let key_end: jiff::Timestamp = status(&hq_url, &hq_token)["keys"][0]["valid_until"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    at_hq(&[
        "donate",
        "--key",
        &key_id,
        "--to",
        "branch",
        "--licenses",
        "1",
        "--until",
        &key_end.to_string(),
    ]);
    let renewal_file = root.join("renewal.json");
    let renewal_id = super::last_line(&ok(&[
        "vendor",
        "issue",
        "--dir",
        root.join("vendor").to_str().unwrap(),
        "--customer",
        "acme",
        "--components",
        "cad,cam",
        "--licenses",
        "2",
        "--valid-from",
        &key_end.to_string(),
        "--valid-days",
        "365",
        "--renews",
        &key_id,
        "--out",
        renewal_file.to_str().unwrap(),
    ]));
    at_hq(&["keys", "add", renewal_file.to_str().unwrap()]);
    assert!(at_hq(&["keys", "update"]).contains(&renewal_id));
    let advance_both = |ms: i64| {
        advance_clock(&hq_url, &hq_token, ms);
        advance_clock(&branch_url, &branch_token, ms);
    };
    // The branch receives the renewal's grant before the renewal starts (at the next
    // license synchronization).
    let pending_pool = format!("{renewal_id}@hq");
    poll_stepping(
        "the branch holds the renewal's grant",
        || advance_both(11 * 60_000),
        || {
            key(&status(&branch_url, &branch_token), &pending_pool)
                .is_some_and(|k| k["state"] == "pending" && k["received"] == 1)
        },
    );
    // Five minutes before the key's end a station on the branch checks out. The clocks get
    // there in jumps of at most 6 days; after each, the branch's grants are renewed (its
    // link syncs at the first tick after a jump) before the next.
    let now_at_hq = || -> jiff::Timestamp {
        status(&hq_url, &hq_token)["now"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let grants_until = || -> Vec<jiff::Timestamp> {
        let listing: serde_json::Value =
            serde_json::from_str(&at_branch(&["neighbours", "list", "--json"])).unwrap();
        listing["neighbours"][0]["received"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["usable_until"].as_str().unwrap().parse().unwrap())
            .collect()
    };
    loop {
        let left_ms = key_end.duration_since(now_at_hq()).as_millis() as i64 - 300_000;
        if left_ms <= 86_400_000 {
            // The grants renewed last run for days yet: straight to five minutes before.
            advance_both(left_ms);
            break;
        }
        let jump_ms = (left_ms - 86_400_000).min(6 * 86_400_000);
        advance_both(jump_ms);
        let landed = now_at_hq();
        // Renewed: good for 5 more days, or to within a minute of the key's end. The clocks
        // step a minute at a time meanwhile, so a link attempt that failed is retried.
        let wanted_ms =
            (5 * 86_400_000).min(key_end.duration_since(landed).as_millis() as i64 - 60_000);
        poll_stepping(
            "the branch's grants are renewed after a jump",
            || advance_both(60_000),
            || {
                let until = grants_until();
                until.len() == 2
                    && until
                        .iter()
                        .all(|u| u.duration_since(landed).as_millis() as i64 > wanted_ms)
            },
        );
    }
    let lease: serde_json::Value = serde_json::from_str(&at_branch(&[
        "lease",
        "checkout",
        "--component",
        "cad",
        "--station",
        "ws-1",
    ]))
    .unwrap();
    let lease_id = lease["lease_id"].as_str().unwrap().to_string();
    assert_eq!(lease["key_id"], format!("{key_id}@hq"));
    // It heartbeats 90 s before the end, and 90 s after it: the same lease, on the renewal.
    advance_both(210_000);
    at_branch(&["lease", "heartbeat", &lease_id]);
    advance_both(180_000);
    let beat: serde_json::Value =
        serde_json::from_str(&at_branch(&["lease", "heartbeat", &lease_id])).unwrap();
    assert_eq!(beat["lease_id"], lease_id.as_str());
    assert_eq!(beat["key_id"], pending_pool.as_str(), "{beat}");
    let branch_status = status(&branch_url, &branch_token);
    let pool = key(&branch_status, &pending_pool).unwrap();
    assert_eq!(
        (&pool["state"], &pool["in_use"]),
        (&"active".into(), &1.into())
    );
    assert_eq!(branch_status["leases"].as_array().unwrap().len(), 1);
}

/// A parent and a child serving HTTPS with certificates from one private CA: the donation
/// reaches the child over HTTPS (the link trusts `tls_ca`), and the child serves it.
#[test]
fn neighbours_serving_https_donate_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let key_id = setup_vendor(root); // cad.json: 2 licenses of cad, cam
    let tls = root.join("tls");
    for name in ["hq", "branch"] {
        ok(&[
            "tls",
            "init",
            "--out",
            tls.to_str().unwrap(),
            "--name",
            "127.0.0.1",
            "--cert-name",
            name,
        ]);
    }
    let (hq_port, branch_port) = (free_port(), free_port());
    let keys = [
        ("hq", identity(root, "hq-data")),
        ("branch", identity(root, "branch-data")),
    ];
    for (name, port, other, other_port, relation, other_key) in [
        ("hq", hq_port, "branch", branch_port, "child", &keys[1].1),
        ("branch", branch_port, "hq", hq_port, "parent", &keys[0].1),
    ] {
        std::fs::write(
            root.join(format!("{name}.toml")),
            format!(
                r#"data = "{name}-data"
listen = "127.0.0.1:{port}"
trust = ["vendor/vendor.pub"]
server_id = "{name}"
tls_cert = "tls/{name}.pem"
tls_key = "tls/{name}.key"
tls_ca = "tls/ca.pem"

[[neighbour]]
id = "{other}"
url = "https://127.0.0.1:{other_port}"
relation = "{relation}"
public_key = "{other_key}"
"#
            ),
        )
        .unwrap();
    }
    let start = |name: &str| {
        ServerProcess::spawn(
            &[
                "server",
                "--config",
                root.join(format!("{name}.toml")).to_str().unwrap(),
            ],
            "Tessera license server on ",
        )
    };
    let hq = start("hq");
    let branch = start("branch");
    assert!(hq.url.starts_with("https://") && branch.url.starts_with("https://"));
    let ca = tls.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let token = |data: &str| super::admin_token_in(&root.join(data));
    let (hq_token, branch_token) = (token("hq-data"), token("branch-data"));
    let hq_remote = [
        "--server",
        hq.url.as_str(),
        "--token",
        hq_token.as_str(),
        "--ca",
        ca,
    ];
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
            "branch",
            "--licenses",
            "1",
            "--until",
            until.as_str(),
        ][..],
        &hq_remote,
    ]
    .concat());
    assert!(donated.contains("\"donated_now\": 1"), "{donated}");
    let at_branch: serde_json::Value = serde_json::from_str(&ok(&[
        "status",
        "--json",
        "--server",
        &branch.url,
        "--token",
        &branch_token,
        "--ca",
        ca,
    ]))
    .unwrap();
    let pool = format!("{key_id}@hq");
    let received = key(&at_branch, &pool).expect("the grant reached the child over HTTPS");
    assert_eq!(received["received"].as_u64(), Some(1));
    let lease = super::checkout_cad(&["--server", &branch.url, "--ca", ca], "ws-1");
    assert_eq!(lease["key_id"], pool);
}
