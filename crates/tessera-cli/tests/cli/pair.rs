//! A redundant pair of real `tessera server` processes: pairing and its requirements, kill -9
//! of either host, and a partition between them with stations on both sides. Each ends with
//! no key over-issued, no acknowledged lease lost, and the reference's statuses.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{ServerProcess, free_ports, ok, tessera};

const SECRET: &str = "real-process test pair secret";
/// Bound for the pair to reach a status; going alone takes 1 s, a merge well under 2 s.
const WAIT: Duration = Duration::from_secs(30);
/// The key: 4 licenses of `cad`, so each host's share is 2.
pub(super) const LICENSES: u32 = 4;

pub(super) struct PairDir {
    pub(super) root: PathBuf,
    pub(super) ports: Vec<u16>,
    /// How the hosts know each other (their ports, or proxies in front of them).
    addresses: Vec<String>,
    key_id: String,
}

impl PairDir {
    fn new(root: &Path, ports: Vec<u16>, addresses: Vec<String>) -> PairDir {
        PairDir::with_licenses(root, ports, addresses, LICENSES)
    }

    /// [`PairDir::new`] with a key of `licenses` licenses.
    pub(super) fn with_licenses(
        root: &Path,
        ports: Vec<u16>,
        addresses: Vec<String>,
        licenses: u32,
    ) -> PairDir {
        let vendor = root.join("vendor");
        ok(&["vendor", "init", "--dir", vendor.to_str().unwrap()]);
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
            &licenses.to_string(),
            "--valid-days",
            "30",
            "--out",
            root.join("cad.json").to_str().unwrap(),
        ]);
        let dir = PairDir {
            root: root.to_path_buf(),
            ports,
            addresses,
            key_id: key_id.trim().to_string(),
        };
        // Host 1: a single server with a domain secret. Host 2: joins (the backup).
        dir.write_config(1, &format!("hosts = [\"1={}\"]", dir.addresses[0]));
        dir.write_config(
            2,
            &format!(
                "hosts = [\"1={}\", \"2={}\"]\njoin = true",
                dir.addresses[0], dir.addresses[1]
            ),
        );
        dir
    }

    /// Two hosts that know each other by their own ports (no proxies).
    fn on_free_ports(root: &Path) -> PairDir {
        let ports = free_ports(2);
        let addresses = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        PairDir::new(root, ports, addresses)
    }

    fn write_config(&self, host: usize, domain: &str) {
        let port = self.ports[host - 1];
        let config = format!(
            "data = \"data-{host}\"\nlisten = \"127.0.0.1:{port}\"\ntrust = [\"vendor/vendor.pub\"]\nlease_ttl = \"10m\"\ndomain_secret = \"{SECRET}\"\n\n[domain]\nhost = {host}\n{domain}\n"
        );
        std::fs::write(self.root.join(format!("host-{host}.toml")), config).unwrap();
    }

    /// `host`'s port as a single server (no `[domain]`, so host 1 of its own group).
    fn write_single_config(&self, host: usize) {
        let port = self.ports[host - 1];
        let config = format!(
            "data = \"data-{host}\"\nlisten = \"127.0.0.1:{port}\"\ntrust = [\"vendor/vendor.pub\"]\nlease_ttl = \"10m\"\ndomain_secret = \"{SECRET}\"\n"
        );
        std::fs::write(self.root.join(format!("host-{host}.toml")), config).unwrap();
    }

    fn start(&self, host: usize) -> ServerProcess {
        self.start_with_env(host, &[])
    }

    pub(super) fn start_with_env(&self, host: usize, env: &[(&str, &str)]) -> ServerProcess {
        let config = self.root.join(format!("host-{host}.toml"));
        ServerProcess::spawn_with_env(
            &["server", "--config", config.to_str().unwrap()],
            "Tessera license server on ",
            env,
        )
    }

    /// The backup gets the primary's identity and admin token before its first start.
    pub(super) fn share_identity(&self) {
        let first = self.root.join("data-1");
        let data = self.root.join("data-2");
        std::fs::create_dir_all(&data).unwrap();
        for file in ["server.key", "server.pub", "admin.token"] {
            std::fs::copy(first.join(file), data.join(file)).unwrap();
        }
    }

    fn url(&self, host: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[host - 1])
    }

    fn servers(&self) -> String {
        format!("{},{}", self.url(1), self.url(2))
    }

    pub(super) fn token(&self) -> String {
        std::fs::read_to_string(self.root.join("data-1").join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }
}

fn pair_status(url: &str) -> Option<serde_json::Value> {
    let output = tessera(&["pair", "status", "--json", "--server", url]);
    output
        .status
        .success()
        .then(|| serde_json::from_slice(&output.stdout).unwrap())
}

/// Polls (bounded) until the host at `url` reports `status` and serves in `mode`.
fn wait_status(url: &str, status: &str, mode: &str) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    loop {
        if let Some(seen) = pair_status(url) {
            if seen["pair_status"] == status && seen["mode"] == mode {
                return seen;
            }
            last = Some(seen);
        }
        assert!(
            Instant::now() < deadline,
            "{url} did not reach {status:?} / {mode} within {WAIT:?}; last: {last:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn host_status(status: &serde_json::Value, host: u64) -> String {
    status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == host)
        .map(|h| h["status"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

fn checkout(servers: &str, station: &str) -> Result<String, String> {
    let output = tessera(&[
        "lease",
        "checkout",
        "--component",
        "cad",
        "--station",
        station,
        "--server",
        servers,
    ]);
    if output.status.success() {
        let lease: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        Ok(lease["lease_id"].as_str().unwrap().to_string())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).to_string())
    }
}

/// The free licenses `tessera status` shows for the pair's key.
fn free_licenses(url: &str) -> u32 {
    let status: serde_json::Value =
        serde_json::from_str(&ok(&["status", "--json", "--server", url])).unwrap();
    status["keys"][0]["free"].as_u64().unwrap() as u32
}

/// The lease ids `url` holds (the admin `token` shows them).
fn held_leases(url: &str, token: &str) -> Vec<String> {
    let status: serde_json::Value = serde_json::from_str(&ok(&[
        "status", "--json", "--server", url, "--token", token,
    ]))
    .unwrap();
    let mut held: Vec<String> = status["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|lease| lease["lease_id"].as_str().unwrap().to_string())
        .collect();
    held.sort();
    held
}

/// Both hosts on free ports, started and paired, the key added.
fn paired(root: &Path) -> (PairDir, ServerProcess, ServerProcess) {
    let pair = PairDir::on_free_ports(root);
    let host_1 = pair.start(1);
    pair.share_identity();
    let host_2 = pair.start(2);
    pair_up(&pair);
    (pair, host_1, host_2)
}

/// Pairs the two hosts (host 2 started with `--join`) and adds the key.
pub(super) fn pair_up(dir: &PairDir) {
    let token = dir.token();
    let enabled = ok(&[
        "pair",
        "enable",
        "--backup",
        &dir.addresses[1],
        "--server",
        &dir.url(1),
        "--token",
        &token,
    ]);
    assert!(enabled.contains("pair status"), "{enabled}");
    assert!(
        enabled.contains("serving: paired") && enabled.matches(" paired ").count() == 2,
        "the answer shows both hosts paired: {enabled}"
    );
    wait_status(&dir.url(1), "Paired and Available", "paired");
    wait_status(&dir.url(2), "Paired and Available", "paired");
    ok(&[
        "keys",
        "add",
        dir.root.join("cad.json").to_str().unwrap(),
        "--server",
        &dir.servers(),
        "--token",
        &token,
    ]);
}

/// Every lease in `acknowledged` is held, and no more than the key's licenses.
fn assert_merged(url: &str, token: &str, acknowledged: &[String]) -> Vec<String> {
    let held = held_leases(url, token);
    assert!(
        held.len() <= LICENSES as usize,
        "over-issued: {held:?} for {LICENSES} licenses"
    );
    for lease in acknowledged {
        assert!(
            held.contains(lease),
            "acknowledged lease {lease} lost: {held:?}"
        );
    }
    held
}

#[test]
fn pairing_checks_the_backups_requirements_and_a_pair_with_keys_cannot_be_undone() {
    let dir = tempfile::tempdir().unwrap();
    let pair = PairDir::on_free_ports(dir.path());
    let _host_1 = pair.start(1);
    let token = pair.token();
    let enable = |backup: &str| {
        tessera(&[
            "pair",
            "enable",
            "--backup",
            backup,
            "--server",
            &pair.url(1),
            "--token",
            &token,
        ])
    };
    // A backup that ran as a single license server with keys: refused, naming what to do.
    pair.write_single_config(2);
    let standalone = pair.start(2);
    let token_2 = std::fs::read_to_string(pair.root.join("data-2").join("admin.token")).unwrap();
    let on_2 = ["--server", &pair.url(2), "--token", token_2.trim()];
    ok(&[
        &["keys", "add", pair.root.join("cad.json").to_str().unwrap()][..],
        &on_2,
    ]
    .concat());
    let refused = enable(&pair.addresses[1]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("pair_requirements") && stderr.contains("license keys activated"),
        "{stderr}"
    );
    // Started with --join on the same data directory (as the pair's backup would be), it
    // refuses to start, naming how to reach its keys, instead of forwarding to itself.
    drop(standalone);
    pair.write_config(
        2,
        &format!(
            "hosts = [\"1={}\", \"2={}\"]\njoin = true",
            pair.addresses[0], pair.addresses[1]
        ),
    );
    let config_2 = pair.root.join("host-2.toml");
    // (Bounded: a server that wrongly starts would otherwise run for ever.)
    let joined = Command::new("timeout")
        .args([
            "60",
            super::BIN,
            "server",
            "--config",
            config_2.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let start_error = String::from_utf8_lossy(&joined.stderr);
    assert!(!joined.status.success());
    assert!(
        start_error.contains("start it as it ran before")
            && start_error.contains("fresh data directory"),
        "{start_error}"
    );
    // As it ran before, the advice works as written: `tessera keys remove KEY --server URL`.
    pair.write_single_config(2);
    let standalone = pair.start(2);
    let advice = stderr
        .split("tessera keys remove KEY --server ")
        .nth(1)
        .and_then(|rest| rest.split([',', ' ']).next())
        .expect("the advice names the command")
        .to_string();
    ok(&[
        "keys",
        "remove",
        pair.key_id.as_str(),
        "--server",
        &advice,
        "--token",
        token_2.trim(),
    ]);
    let refused = enable(&pair.addresses[1]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("reset its server ID"), "{stderr}");
    drop(standalone);
    // Reset (a fresh data directory, started with --join): paired.
    std::fs::remove_dir_all(pair.root.join("data-2")).unwrap();
    pair.write_config(
        2,
        &format!(
            "hosts = [\"1={}\", \"2={}\"]\njoin = true",
            pair.addresses[0], pair.addresses[1]
        ),
    );
    pair.share_identity();
    let _host_2 = pair.start(2);
    pair_up(&pair);
    // Both hosts show the same configuration.
    let keys = |url: &str| {
        let status: serde_json::Value =
            serde_json::from_str(&ok(&["status", "--json", "--server", url])).unwrap();
        status["keys"].as_array().unwrap().len()
    };
    assert_eq!((keys(&pair.url(1)), keys(&pair.url(2))), (1, 1));
    // With a key active the pair cannot be undone.
    let refused = tessera(&[
        "pair",
        "disable",
        "--server",
        &pair.url(1),
        "--token",
        &token,
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("cannot be undone"), "{stderr}");
}

#[test]
fn a_pair_serves_alone_within_a_share_across_kill_9_of_either_host_and_merges_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, host_1, host_2) = paired(dir.path());
    let servers = pair.servers();
    let mut acknowledged = vec![
        checkout(&servers, "ws-1").unwrap(),
        checkout(&servers, "ws-2").unwrap(),
    ];

    // kill -9 of the primary: the backup serves alone, from its share only.
    host_1.kill_9();
    let alone = wait_status(&pair.url(2), "Primary not available", "alone");
    assert_eq!(host_status(&alone, 1), "Disconnected");
    // Its status counts as free only what is left of its own share: exactly what it grants.
    let free_alone = free_licenses(&pair.url(2));
    assert!(
        free_alone < LICENSES - 2,
        "the whole key's free licenses: {free_alone}"
    );
    // And it says so: serving alone, with its share of the key, in JSON and in the table.
    let status: serde_json::Value =
        serde_json::from_str(&ok(&["status", "--json", "--server", &pair.url(2)])).unwrap();
    assert_eq!(status["serving_alone"], true, "{status}");
    assert_eq!(status["keys"][0]["alone_share"], LICENSES / 2, "{status}");
    assert_eq!(status["components"][0]["alone_share"], LICENSES / 2);
    let table = ok(&["status", "--server", &pair.url(2)]);
    assert!(
        table.contains("serves alone") && table.contains("SHARE"),
        "{table}"
    );
    let mut granted = 0;
    for station in ["ws-3", "ws-4", "ws-5"] {
        match checkout(&servers, station) {
            Ok(lease) => {
                acknowledged.push(lease);
                granted += 1;
            }
            Err(stderr) => assert!(stderr.contains("no_licenses_available"), "{stderr}"),
        }
    }
    assert!(granted >= 1, "the backup served nobody alone");
    assert_eq!(granted, free_alone.min(3));
    // Refused, it names its share, not the whole key as if every license were in use.
    let refused = checkout(&servers, "ws-extra").unwrap_err();
    assert!(
        refused.contains("serves alone") && refused.contains("licenses of its share are in use"),
        "{refused}"
    );
    assert_eq!(free_licenses(&pair.url(2)), free_alone - granted);
    assert!(held_leases(&pair.url(2), &pair.token()).len() <= LICENSES as usize);

    // The primary comes back: Recovering, merged, Paired and Available on both.
    let host_1 = pair.start(1);
    wait_status(&pair.url(1), "Paired and Available", "paired");
    wait_status(&pair.url(2), "Paired and Available", "paired");
    assert_merged(&pair.url(1), &pair.token(), &acknowledged);
    assert_eq!(
        held_leases(&pair.url(1), &pair.token()),
        held_leases(&pair.url(2), &pair.token())
    );

    // kill -9 of the backup: the primary serves alone within its share.
    host_2.kill_9();
    let alone = wait_status(&pair.url(1), "Backup not available", "alone");
    assert_eq!(host_status(&alone, 2), "Disconnected");
    for station in ["ws-6", "ws-7"] {
        match checkout(&pair.url(1), station) {
            Ok(lease) => acknowledged.push(lease),
            Err(stderr) => assert!(stderr.contains("no_licenses_available"), "{stderr}"),
        }
    }
    assert!(held_leases(&pair.url(1), &pair.token()).len() <= LICENSES as usize);

    // A restart while alone keeps what it did (the journal), then the pair merges again.
    host_1.kill_9();
    let _host_1 = pair.start(1);
    wait_status(&pair.url(1), "Backup not available", "alone");
    assert_merged(&pair.url(1), &pair.token(), &acknowledged);
    let _host_2 = pair.start(2);
    wait_status(&pair.url(1), "Paired and Available", "paired");
    wait_status(&pair.url(2), "Paired and Available", "paired");
    let held = assert_merged(&pair.url(2), &pair.token(), &acknowledged);
    assert_eq!(held_leases(&pair.url(1), &pair.token()), held);
}

/// Attack T11: split the pair, let the backup issue its whole share alone, kill -9 it,
/// delete its alone journal and start it again, hoping for a fresh share. Its store still
/// records the alone epoch, so it does not serve alone (Recovering, with the reason and the
/// `pair_journal_lost` event) until the primary is back and the pair has merged, within the
/// key.
#[test]
fn a_host_whose_alone_journal_was_deleted_does_not_serve_its_share_again() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, host_1, host_2) = paired(dir.path());
    backup_issues_its_share_alone(&pair, host_1);

    host_2.kill_9();
    let data = pair.root.join("data-2");
    assert!(data.join("pair-alone.sqlite3").exists());
    for file in [
        "pair-alone.sqlite3",
        "pair-alone.sqlite3-wal",
        "pair-alone.sqlite3-shm",
    ] {
        let _ = std::fs::remove_file(data.join(file));
    }
    let host_2 = pair.start(2);
    let status = wait_status(&pair.url(2), "Recovering", "recovering");
    let reason = status["last_error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("alone journal") && reason.contains("is missing"),
        "{status:#}"
    );
    refuses_alone_and_says_so(&pair);

    // The primary comes back: the pair merges within the key, and the record is cleared.
    let host_1 = pair.start(1);
    wait_status(&pair.url(1), "Paired and Available", "paired");
    wait_status(&pair.url(2), "Paired and Available", "paired");
    assert!(held_leases(&pair.url(1), &pair.token()).len() <= LICENSES as usize);
    for station in ["ws-1", "ws-2", "ws-3", "ws-4", "ws-5"] {
        let _ = checkout(&pair.servers(), station);
    }
    let held = held_leases(&pair.url(1), &pair.token());
    assert_eq!(held.len(), LICENSES as usize, "{held:?}");
    // Split again, it serves alone again: the lost journal is behind it.
    host_1.kill_9();
    wait_status(&pair.url(2), "Primary not available", "alone");
    drop(host_2);
}

/// Host 1 killed -9: host 2 serves alone and issues its whole share (journaled).
fn backup_issues_its_share_alone(pair: &PairDir, host_1: ServerProcess) {
    host_1.kill_9();
    wait_status(&pair.url(2), "Primary not available", "alone");
    let issued: Vec<String> = ["ws-1", "ws-2", "ws-3"]
        .iter()
        .filter_map(|station| checkout(&pair.url(2), station).ok())
        .collect();
    assert_eq!(issued.len(), (LICENSES / 2) as usize, "the backup's share");
}

/// Host 2, cut off from host 1 and without a journal it may trust: not one more license
/// (it answers 503 pair_recovering; the client then tries the primary, which is down, so
/// the last error it reports is either), and the `pair_journal_lost` event says why.
fn refuses_alone_and_says_so(pair: &PairDir) {
    for station in ["ws-4", "ws-5"] {
        let refused = checkout(&pair.url(2), station).unwrap_err();
        assert!(
            refused.contains("pair_recovering") || refused.contains("cannot reach"),
            "{refused}"
        );
    }
    let events = ok(&["events", "--server", &pair.url(2), "--token", &pair.token()]);
    assert!(events.contains("pair_journal_lost"), "{events}");
}

/// Attack T11 with the sqlite3 shell: the backup issues its whole share alone, is killed
/// -9, and the last command of its alone journal (a checkout) is deleted, so that it would
/// come back with one seat free again. The journal's hash chain and count name the edit: the
/// doctor reports it, and the host does not serve alone until the pair has merged.
#[test]
fn a_host_whose_alone_journal_was_edited_names_the_edit_and_does_not_serve_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, host_1, host_2) = paired(dir.path());
    backup_issues_its_share_alone(&pair, host_1);
    host_2.kill_9();

    let journal = pair.root.join("data-2").join("pair-alone.sqlite3");
    let connection = rusqlite::Connection::open(&journal).unwrap();
    let deleted = connection
        .execute(
            "DELETE FROM commands WHERE seq = (SELECT MAX(seq) FROM commands)",
            [],
        )
        .unwrap();
    assert_eq!(deleted, 1);
    drop(connection);

    let config = pair.root.join("host-2.toml");
    let doctor = tessera(&["doctor", "--config", config.to_str().unwrap()]);
    let report = String::from_utf8_lossy(&doctor.stdout).to_string()
        + &String::from_utf8_lossy(&doctor.stderr);
    assert!(!doctor.status.success(), "{report}");
    assert!(
        report.contains("pair-alone.sqlite3") && report.contains("was edited after it was written"),
        "{report}"
    );

    let host_2 = pair.start(2);
    let status = wait_status(&pair.url(2), "Recovering", "recovering");
    let reason = status["last_error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("was edited after it was written")
            && reason.contains("does not serve alone"),
        "{status:#}"
    );
    refuses_alone_and_says_so(&pair);

    // The primary comes back: the pair merges within the key, the edited journal is gone,
    // and a new split is served alone again.
    let host_1 = pair.start(1);
    wait_status(&pair.url(1), "Paired and Available", "paired");
    wait_status(&pair.url(2), "Paired and Available", "paired");
    assert!(held_leases(&pair.url(1), &pair.token()).len() <= LICENSES as usize);
    host_1.kill_9();
    wait_status(&pair.url(2), "Primary not available", "alone");
    drop(host_2);
}

#[test]
fn a_partition_between_the_hosts_with_stations_on_both_sides_never_over_issues() {
    use tessera_server::fault_proxy::{self, Cuts};

    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cuts = Cuts::default();
    // Held while the proxies bind port 0, so that none of them takes a host's port.
    let reserved = super::reserve_ports(2);
    let ports = super::ports_of(&reserved);
    let proxies: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            runtime
                .block_on(fault_proxy::start(
                    i as u64 + 1,
                    format!("127.0.0.1:{port}"),
                    cuts.clone(),
                ))
                .unwrap()
        })
        .collect();
    drop(reserved);
    let pair = PairDir::new(dir.path(), ports, proxies);
    let _host_1 = pair.start(1);
    pair.share_identity();
    let _host_2 = pair.start(2);
    pair_up(&pair);
    let mut acknowledged = vec![checkout(&pair.servers(), "ws-0").unwrap()];

    // The hosts lose each other; stations near each host reach only that host.
    cuts.partition(&[1], &[2]);
    wait_status(&pair.url(1), "Backup not available", "alone");
    wait_status(&pair.url(2), "Primary not available", "alone");
    let mut served = [0, 0];
    for n in 0..4 {
        for host in [1, 2] {
            match checkout(&pair.url(host), &format!("ws-{host}-{n}")) {
                Ok(lease) => {
                    acknowledged.push(lease);
                    served[host - 1] += 1;
                }
                Err(stderr) => assert!(stderr.contains("no_licenses_available"), "{stderr}"),
            }
        }
    }
    assert!(served[0] >= 1 && served[1] >= 1, "served alone: {served:?}");
    let total = held_leases(&pair.url(1), &pair.token()).len()
        + held_leases(&pair.url(2), &pair.token()).len();
    // Both sides together: the lease taken before the cut is counted on both.
    assert!(
        total <= LICENSES as usize + 1,
        "the two sides issued {total} leases for {LICENSES} licenses"
    );

    // Healed: Recovering, then both sides' leases in one ledger, within the key.
    cuts.heal();
    wait_status(&pair.url(1), "Paired and Available", "paired");
    wait_status(&pair.url(2), "Paired and Available", "paired");
    let held = assert_merged(&pair.url(1), &pair.token(), &acknowledged);
    assert_eq!(held.len(), acknowledged.len());
    assert_eq!(held_leases(&pair.url(2), &pair.token()), held);
    assert!(
        checkout(&pair.servers(), "ws-late")
            .unwrap_err()
            .contains("no_licenses_available")
    );
    // Usage details: either host's history shows what both served, each lease granted once.
    for host in [1, 2] {
        let deadline = Instant::now() + WAIT;
        loop {
            let granted = granted_in_usage(&pair, host);
            if acknowledged.iter().all(|lease| granted.contains(lease)) {
                let mut unique = granted.clone();
                unique.sort();
                unique.dedup();
                assert_eq!(
                    unique.len(),
                    granted.len(),
                    "a grant shown twice: {granted:?}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "host {host}'s usage history lacks leases the other served: {granted:?} of {acknowledged:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The lease ids of `granted` rows in `host`'s usage report (`tessera report usage`).
fn granted_in_usage(pair: &PairDir, host: usize) -> Vec<String> {
    let report = ok(&[
        "report",
        "usage",
        "--format",
        "json",
        "--server",
        &pair.url(host),
        "--token",
        &pair.token(),
    ]);
    let events: Vec<serde_json::Value> = serde_json::from_str(&report).unwrap();
    events
        .iter()
        .filter(|event| event["kind"] == "granted")
        .map(|event| event["lease_id"].as_str().unwrap().to_string())
        .collect()
}

/// `GET path` over plain HTTP/1.0 with an optional cookie; (head, body).
fn http_request(url: &str, path: &str, cookie: Option<&str>) -> (String, String) {
    use std::io::{Read, Write};
    let addr = url.strip_prefix("http://").unwrap();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{cookie}\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

/// `GET path`; the body of a 200 answer.
fn http_get(url: &str, path: &str) -> String {
    let (head, body) = http_request(url, path, None);
    assert!(head.contains(" 200 "), "{head}");
    body
}

/// The console's keys page, signed in with the admin token.
fn console_page(url: &str, token: &str) -> String {
    let (head, _) = http_request(url, &format!("/login?token={token}"), None);
    let cookie = head
        .lines()
        .find_map(|line| line.strip_prefix("set-cookie: "))
        .and_then(|value| value.split(';').next())
        .unwrap_or_else(|| panic!("no session cookie: {head}"))
        .to_string();
    let (head, body) = http_request(url, "/", Some(&cookie));
    assert!(head.contains(" 200 "), "{head}");
    body
}

#[test]
fn a_backup_stopped_gracefully_shows_stopped_in_status_metrics_and_events_then_pairs_again() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, host_1, host_2) = paired(dir.path());
    let token = pair.token();
    let admin = ["--server", &pair.url(1), "--token", &token];
    // The manual sync action on a pair in step keeps it in step.
    let synced = ok(&[&["pair", "sync"][..], &admin].concat());
    assert!(synced.contains("Paired and Available"), "{synced}");
    let lease = checkout(&pair.servers(), "ws-1").unwrap();

    // The backup is stopped (SIGTERM, as a service manager does): it tells the primary.
    host_2.terminate();
    let seen = wait_status(&pair.url(1), "Backup not available", "alone");
    assert_eq!(host_status(&seen, 1), "Running");
    assert_eq!(host_status(&seen, 2), "Stopped");
    let text = ok(&[&["pair", "status"][..], &admin].concat());
    assert!(
        text.contains("Backup not available") && text.contains("Stopped"),
        "{text}"
    );
    let metrics = http_get(&pair.url(1), "/metrics");
    assert!(
        metrics.contains("pair_status{status=\"Backup not available\"} 1")
            && metrics.contains("pair_status{status=\"Paired and Available\"} 0"),
        "{metrics}"
    );
    let events: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&[&["events", "--json"][..], &admin].concat())).unwrap();
    let pair_events: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "pair_status")
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        pair_events
            .iter()
            .any(|m| m.contains("Backup not available")),
        "{events:#?}"
    );
    assert!(
        events.iter().all(|e| e["host"] == 1),
        "raised by host 1: {events:#?}"
    );
    // The primary alone keeps the station's lease.
    assert!(held_leases(&pair.url(1), &pair.token()).contains(&lease));
    // The console's tiles show the pair and each host as the reference does.
    let page = console_page(&pair.url(1), &token);
    assert!(
        page.contains("pair-tile")
            && page.contains("Backup not available")
            && page.contains("Stopped"),
        "{page}"
    );

    // The backup starts again: Recovering, merged, Paired and Available on both.
    let _host_2 = pair.start(2);
    let seen = wait_status(&pair.url(1), "Paired and Available", "paired");
    assert_eq!(host_status(&seen, 2), "Running");
    wait_status(&pair.url(2), "Paired and Available", "paired");
    assert_eq!(
        assert_merged(&pair.url(2), &pair.token(), std::slice::from_ref(&lease)),
        vec![lease.clone()]
    );
    let metrics = http_get(&pair.url(1), "/metrics");
    assert!(
        metrics.contains("pair_status{status=\"Paired and Available\"} 1"),
        "{metrics}"
    );

    // The primary is stopped (the reference's figure 13): the backup shows it Stopped and
    // the pair as Primary not available, and keeps the station's lease.
    host_1.terminate();
    let seen = wait_status(&pair.url(2), "Primary not available", "alone");
    assert_eq!(host_status(&seen, 1), "Stopped");
    assert_eq!(host_status(&seen, 2), "Running");
    assert!(held_leases(&pair.url(2), &pair.token()).contains(&lease));
    // The station's lease goes on through the backup (the failover client finds it).
    let renewed: serde_json::Value = serde_json::from_str(&ok(&[
        "lease",
        "heartbeat",
        &lease,
        "--server",
        &pair.servers(),
    ]))
    .unwrap();
    assert_eq!(renewed["lease_id"], lease.as_str(), "{renewed}");
}
