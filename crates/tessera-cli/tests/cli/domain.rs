//! A three-host domain of real `tessera server` processes on loopback, each with its own
//! config file, data directory and port, and the CLI as the client over all three.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{ServerProcess, free_ports, ok, setup_vendor, tessera};

const SECRET: &str = "real-process test domain secret";
/// Bound for an election to show up in `domain status`; elections take well under 1 s.
const WAIT: Duration = Duration::from_secs(20);

pub(super) struct DomainDir {
    pub(super) root: PathBuf,
    pub(super) ports: Vec<u16>,
    /// `http`, or `https` after [`DomainDir::use_tls`].
    scheme: &'static str,
}

impl DomainDir {
    pub(super) fn new(root: &Path, n: usize) -> DomainDir {
        let ports = free_ports(n);
        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        DomainDir::with_addresses(root, ports, &addresses)
    }

    /// Hosts listen on `ports` but the domain knows them by `addresses` (proxies in front).
    pub(super) fn with_addresses(root: &Path, ports: Vec<u16>, addresses: &[String]) -> DomainDir {
        let hosts: Vec<String> = addresses
            .iter()
            .enumerate()
            .map(|(i, address)| format!("\"{}={address}\"", i + 1))
            .collect();
        for (i, port) in ports.iter().enumerate() {
            let host = i + 1;
            let config = format!(
                "data = \"data-{host}\"\nlisten = \"127.0.0.1:{port}\"\ntrust = [\"vendor/vendor.pub\"]\nlease_ttl = \"10m\"\ndomain_secret = \"{SECRET}\"\nworker_threads = 1\n\n[domain]\nhost = {host}\nhosts = [{}]\n",
                hosts.join(", ")
            );
            std::fs::write(root.join(format!("host-{host}.toml")), config).unwrap();
        }
        DomainDir {
            root: root.to_path_buf(),
            ports,
            scheme: "http",
        }
    }

    pub(super) fn start(&self, host: usize) -> ServerProcess {
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

    /// Host 1 creates the identity and admin token; the others get copies before their first
    /// start (a domain is one license server with one identity).
    pub(super) fn share_identity(&self, hosts: usize) {
        let first = self.root.join("data-1");
        for host in 2..=hosts {
            let data = self.root.join(format!("data-{host}"));
            std::fs::create_dir_all(&data).unwrap();
            for file in ["server.key", "server.pub", "admin.token"] {
                std::fs::copy(first.join(file), data.join(file)).unwrap();
            }
        }
    }

    /// Every host serves HTTPS with its own certificate from one private CA (`tessera tls init
    /// --cert-name host-N`), and the hosts show them to each other (`peer_mtls`).
    pub(super) fn use_tls(&mut self) -> PathBuf {
        let tls = self.root.join("tls");
        for host in 1..=self.ports.len() {
            ok(&[
                "tls",
                "init",
                "--out",
                tls.to_str().unwrap(),
                "--name",
                "localhost,127.0.0.1",
                "--cert-name",
                &format!("host-{host}"),
            ]);
            let path = self.root.join(format!("host-{host}.toml"));
            let config = std::fs::read_to_string(&path).unwrap().replace(
                "\n[domain]\n",
                &format!(
                    "tls_cert = \"tls/host-{host}.pem\"\ntls_key = \"tls/host-{host}.key\"\ntls_ca = \"tls/ca.pem\"\npeer_mtls = true\n\n[domain]\n"
                ),
            );
            std::fs::write(path, config).unwrap();
        }
        self.scheme = "https";
        tls.join("ca.pem")
    }

    pub(super) fn servers(&self) -> String {
        self.ports
            .iter()
            .map(|port| format!("{}://127.0.0.1:{port}", self.scheme))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub(super) fn token(&self) -> String {
        std::fs::read_to_string(self.root.join("data-1").join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }
}

/// Polls `tessera domain status --json` (bounded) until `primary` leads and the hosts in
/// `healthy` are reported healthy.
fn wait_for_primary(servers: &str, primary: u64, healthy: &[u64]) -> serde_json::Value {
    wait_for_primary_with(&[], servers, primary, healthy)
}

/// [`wait_for_primary`] with more CLI arguments (`--ca FILE`).
fn wait_for_primary_with(
    extra: &[&str],
    servers: &str,
    primary: u64,
    healthy: &[u64],
) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let output =
            tessera(&[&["domain", "status", "--json", "--server", servers], extra].concat());
        if output.status.success() {
            let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            let settled = status["primary"] == primary
                && healthy.iter().all(|h| {
                    status["hosts"].as_array().unwrap().iter().any(|host| {
                        host["host"] == *h
                            && host["healthy"] == true
                            && host["role"] == if *h == primary { "primary" } else { "backup" }
                    })
                });
            if settled {
                return status;
            }
        }
        assert!(
            Instant::now() < deadline,
            "host {primary} did not lead a healthy domain within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lease ids the domain holds (the admin `token` shows them).
fn held_leases(servers: &str, token: &str) -> Vec<String> {
    held_leases_with(servers, token, &[])
}

/// [`held_leases`] with more CLI arguments (`--ca FILE`); sorted.
fn held_leases_with(servers: &str, token: &str, extra: &[&str]) -> Vec<String> {
    let status: serde_json::Value = serde_json::from_str(&ok(&[
        &["status", "--json", "--server", servers, "--token", token][..],
        extra,
    ]
    .concat()))
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

#[test]
fn a_three_process_domain_loses_no_acknowledged_lease_and_never_over_issues_across_kill_9_of_the_primary()
 {
    let dir = tempfile::tempdir().unwrap();
    setup_vendor(dir.path()); // cad.json: 2 licenses
    let domain = DomainDir::new(dir.path(), 3);
    let host_1 = domain.start(1);
    domain.share_identity(3);
    let _host_2 = domain.start(2);
    let _host_3 = domain.start(3);
    let servers = domain.servers();
    let token = domain.token();
    let remote = ["--server", servers.as_str(), "--token", token.as_str()];
    let status = wait_for_primary(&servers, 1, &[1, 2, 3]);
    assert_eq!(status["hosts"].as_array().unwrap().len(), 3);

    ok(&[
        &["keys", "add", dir.path().join("cad.json").to_str().unwrap()][..],
        &remote,
    ]
    .concat());
    let checkout = |station: &str| {
        tessera(
            &[
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
            .concat(),
        )
    };
    let mut acknowledged = Vec::new();
    for station in ["ws-1", "ws-2"] {
        let output = checkout(station);
        assert!(output.status.success(), "{output:?}");
        let lease: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        acknowledged.push(lease["lease_id"].as_str().unwrap().to_string());
    }
    acknowledged.sort();

    // An application given only host 1 learns the domain's other hosts from it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let host_1_url = servers.split(',').next().unwrap().to_string();
    let sdk = tessera_client::Client::new(&host_1_url, None);
    let lease_id = acknowledged[0].clone();
    // The station's secret, which `lease checkout` stored for it.
    let secret = std::fs::read_to_string(
        std::env::temp_dir()
            .join("tessera-test-leases")
            .join(&lease_id),
    )
    .unwrap();
    sdk.set_lease_secret(&lease_id, secret.trim());
    runtime.block_on(sdk.heartbeat(&lease_id)).unwrap();
    assert_eq!(sdk.hosts().len(), 3, "{:?}", sdk.hosts());

    host_1.kill_9();
    // Host 1 is gone: the same application goes on through a host it learned.
    runtime.block_on(sdk.heartbeat(&lease_id)).unwrap();
    // The CLI fails over to the hosts that remain; the pool is still exhausted there.
    let refused = checkout("ws-3");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("no_licenses_available"), "{stderr}");
    wait_for_primary(&servers, 2, &[2, 3]);
    assert_eq!(held_leases(&servers, &token), acknowledged);
    // The acknowledged leases stay alive through the new primary.
    for lease_id in &acknowledged {
        ok(&[&["lease", "heartbeat", lease_id.as_str()][..], &remote].concat());
    }

    // Host 1 comes back, catches up and takes the primary role back with the same leases.
    let _host_1 = domain.start(1);
    wait_for_primary(&servers, 1, &[1, 2, 3]);
    assert_eq!(held_leases(&servers, &token), acknowledged);
    let refused = checkout("ws-4");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no_licenses_available"));
}

#[test]
fn a_three_process_domain_runs_over_mutual_tls_and_fails_over() {
    let dir = tempfile::tempdir().unwrap();
    setup_vendor(dir.path()); // cad.json: 2 licenses
    let mut domain = DomainDir::new(dir.path(), 3);
    let ca = domain.use_tls();
    let ca = ca.to_str().unwrap();
    let host_1 = domain.start(1);
    assert!(host_1.url.starts_with("https://"), "{}", host_1.url);
    domain.share_identity(3);
    let _host_2 = domain.start(2);
    let _host_3 = domain.start(3);
    let servers = domain.servers();
    let token = domain.token();
    // The hosts elect and replicate over HTTPS, each showing its certificate.
    wait_for_primary_with(&["--ca", ca], &servers, 1, &[1, 2, 3]);
    // Without the CA the CLI trusts none of them.
    let refused = tessera(&["domain", "status", "--server", &servers]);
    assert!(!refused.status.success());

    // Written through a backup: host 3 forwards to the primary over HTTPS.
    let host_3_only = servers.split(',').nth(2).unwrap().to_string();
    let via_3 = [
        "--server",
        host_3_only.as_str(),
        "--token",
        token.as_str(),
        "--ca",
        ca,
    ];
    ok(&[
        &["keys", "add", dir.path().join("cad.json").to_str().unwrap()][..],
        &via_3,
    ]
    .concat());
    let remote = [
        "--server",
        servers.as_str(),
        "--token",
        token.as_str(),
        "--ca",
        ca,
    ];
    let checkout = |station: &str| {
        tessera(
            &[
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
            .concat(),
        )
    };
    for station in ["ws-1", "ws-2"] {
        let output = checkout(station);
        assert!(output.status.success(), "{output:?}");
    }
    let acknowledged = held_leases_with(&servers, &token, &["--ca", ca]);
    assert_eq!(acknowledged.len(), 2);

    // An outsider that trusts the CA but has no host certificate is refused by the peer
    // routes (a Raft vote and a pair RPC), whatever it sends.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let outsider = tessera_tls::client_builder_exactly(Some(Path::new(ca)))
        .unwrap()
        .build()
        .unwrap();
    for path in ["/v1/raft/vote", "/v1/pair/rpc/handover"] {
        let (status, body) = runtime.block_on(async {
            let answer = outsider
                .post(format!("{host_3_only}{path}"))
                .header("x-tessera-raft-auth", "00".repeat(32))
                .body("{}")
                .send()
                .await
                .unwrap();
            (answer.status().as_u16(), answer.text().await.unwrap())
        });
        assert_eq!(status, 401, "{path}: {body}");
        assert!(body.contains("peer_certificate_required"), "{path}: {body}");
    }

    // Failover over TLS: host 1 is killed; host 2 leads with the same leases; the pool is
    // still exhausted.
    host_1.kill_9();
    wait_for_primary_with(&["--ca", ca], &servers, 2, &[2, 3]);
    assert_eq!(
        held_leases_with(&servers, &token, &["--ca", ca]),
        acknowledged
    );
    let refused = checkout("ws-3");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no_licenses_available"),
        "{refused:?}"
    );
    // The new primary announces itself and, a few seconds on, the lost host.
    let deadline = Instant::now() + WAIT;
    loop {
        let events: serde_json::Value =
            serde_json::from_str(&ok(&[&["events", "--json"][..], &remote].concat())).unwrap();
        let has = |kind: &str, host: u64| {
            events.as_array().unwrap().iter().any(|e| {
                e["kind"] == kind
                    && (e["details"]["host"] == host || e["details"]["primary"] == host)
            })
        };
        if has("primary_changed", 2) && has("domain_host_lost", 1) {
            break;
        }
        assert!(Instant::now() < deadline, "no failover events: {events}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_domain_config_with_more_than_twenty_hosts_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let hosts: Vec<String> = (1..=21)
        .map(|i| format!("\"{i}=127.0.0.1:{}\"", 17000 + i))
        .collect();
    let config = dir.path().join("tessera.toml");
    std::fs::write(
        &config,
        format!(
            "domain_secret = \"{SECRET}\"\n[domain]\nhost = 1\nhosts = [{}]\n",
            hosts.join(", ")
        ),
    )
    .unwrap();
    let output = tessera(&["server", "--config", config.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("at most 20"), "{stderr}");
}

#[test]
fn peer_tls_settings_that_cannot_work_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let cases: [(&[&str], &str); 3] = [
        (&["--peer-mtls"], "peer_pins and peer_mtls need tls_cert"),
        (&["--peer-pin", "abcd"], "is not 32 bytes"),
        (
            &["--peer-pin", &"ab".repeat(32)],
            "need tls_cert and tls_key",
        ),
    ];
    for (flags, expected) in cases {
        let output = tessera(&[&["server", "--data", data][..], flags].concat());
        assert!(!output.status.success(), "{flags:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
    }
    let tls = dir.path().join("tls");
    ok(&[
        "tls",
        "init",
        "--out",
        tls.to_str().unwrap(),
        "--name",
        "localhost",
    ]);
    let output = tessera(&[
        "server",
        "--data",
        data,
        "--tls-cert",
        tls.join("server.pem").to_str().unwrap(),
        "--tls-key",
        tls.join("server.key").to_str().unwrap(),
        "--peer-mtls",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("peer_mtls needs tls_ca"), "{stderr}");
    assert!(
        !dir.path().join("data").exists(),
        "a refused start creates nothing"
    );
    // The fingerprint `tls init` prints is the one `tls fingerprint` prints.
    let fingerprint = ok(&[
        "tls",
        "fingerprint",
        tls.join("server.pem").to_str().unwrap(),
    ]);
    assert_eq!(fingerprint.trim().len(), 64, "{fingerprint}");
}

#[test]
fn a_worker_thread_count_out_of_range_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tessera.toml");
    std::fs::write(&config, "worker_threads = 0\n").unwrap();
    let output = tessera(&["server", "--config", config.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("worker_threads must be 1 to 256, not 0"),
        "{stderr}"
    );
    let output = tessera(&[
        "server",
        "--data",
        dir.path().join("data").to_str().unwrap(),
        "--worker-threads",
        "1000",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("worker_threads must be 1 to 256, not 1000"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "a refused start creates nothing"
    );
}

#[test]
fn a_five_process_domain_keeps_serving_with_two_hosts_killed() {
    let dir = tempfile::tempdir().unwrap();
    setup_vendor(dir.path()); // cad.json: 2 licenses
    let domain = DomainDir::new(dir.path(), 5);
    let host_1 = domain.start(1);
    domain.share_identity(5);
    let host_2 = domain.start(2);
    let _others: Vec<ServerProcess> = (3..=5).map(|h| domain.start(h)).collect();
    let servers = domain.servers();
    let token = domain.token();
    let remote = ["--server", servers.as_str(), "--token", token.as_str()];
    wait_for_primary(&servers, 1, &[1, 2, 3, 4, 5]);
    ok(&[
        &["keys", "add", dir.path().join("cad.json").to_str().unwrap()][..],
        &remote,
    ]
    .concat());
    let lease: serde_json::Value = serde_json::from_str(&ok(&[
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
    .concat()))
    .unwrap();
    host_1.kill_9();
    host_2.kill_9();
    // 3 of 5 remain: a majority, led by the lowest of them.
    wait_for_primary(&servers, 3, &[3, 4, 5]);
    assert_eq!(
        held_leases(&servers, &token),
        vec![lease["lease_id"].as_str().unwrap().to_string()]
    );
    ok(&[
        &[
            "lease",
            "checkout",
            "--component",
            "cad",
            "--station",
            "ws-2",
        ][..],
        &remote,
    ]
    .concat());
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

#[test]
fn a_partitioned_process_domain_serves_only_on_the_majority_side_and_heals_without_over_issuing() {
    use tessera_server::fault_proxy::{self, Cuts};

    let dir = tempfile::tempdir().unwrap();
    setup_vendor(dir.path()); // cad.json: 2 licenses
    // A proxy in front of each host process; the domain knows the hosts by their proxies.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cuts = Cuts::default();
    // Held while the proxies bind port 0, so that none of them takes a host's port.
    let reserved = super::reserve_ports(3);
    let ports = super::ports_of(&reserved);
    let proxies: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let target = format!("127.0.0.1:{port}");
            runtime
                .block_on(fault_proxy::start(i as u64 + 1, target, cuts.clone()))
                .unwrap()
        })
        .collect();
    drop(reserved);
    let domain = DomainDir::with_addresses(dir.path(), ports, &proxies);
    let _host_1 = domain.start(1);
    domain.share_identity(3);
    let _host_2 = domain.start(2);
    let _host_3 = domain.start(3);
    let servers = domain.servers();
    let token = domain.token();
    wait_for_primary(&servers, 1, &[1, 2, 3]);
    let remote = ["--server", servers.as_str(), "--token", token.as_str()];
    ok(&[
        &["keys", "add", dir.path().join("cad.json").to_str().unwrap()][..],
        &remote,
    ]
    .concat());
    let checkout = |servers: &str, station: &str| {
        tessera(&[
            "lease",
            "checkout",
            "--component",
            "cad",
            "--station",
            station,
            "--server",
            servers,
        ])
    };
    let lease_id = |output: std::process::Output| -> String {
        assert!(output.status.success(), "{output:?}");
        let lease: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        lease["lease_id"].as_str().unwrap().to_string()
    };
    let before = lease_id(checkout(&servers, "ws-1"));

    // Host 1 (the primary) is cut off from hosts 2 and 3.
    cuts.partition(&[1], &[2, 3]);
    let host_1_url = servers.split(',').next().unwrap().to_string();
    let majority = servers.split(',').skip(1).collect::<Vec<_>>().join(",");
    // Host 1 itself answers no_quorum (a station's client would go on to the hosts it
    // learned; asked directly, host 1 issues nothing).
    let (code, body) = super::http_post_json(
        &format!("{host_1_url}/v1/leases"),
        r#"{"component":"cad","station":"ws-minority"}"#,
    );
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no_quorum"), "{body}");
    // Its health check says so, with a status a load balancer acts on.
    let (code, body) = super::http_get(&format!("{host_1_url}/healthz"));
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"no_quorum\""), "{body}");
    // The majority elects host 2 and serves the one license left, and no more.
    wait_for_primary(&majority, 2, &[2, 3]);
    let during = lease_id(checkout(&majority, "ws-2"));
    for url in majority.split(',') {
        let (code, body) = super::http_get(&format!("{url}/healthz"));
        assert_eq!(code, 200, "{url}: {body}");
        assert!(
            body.contains("\"ok\"") && body.contains("\"version\""),
            "{body}"
        );
    }
    let refused = checkout(&majority, "ws-3");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no_licenses_available"));
    assert!(
        held_leases(&host_1_url, &token).len() <= 1,
        "the cut-off host applied a lease it could not have committed"
    );

    // Healed: host 1 catches up, leads again, with exactly the committed leases.
    cuts.heal();
    wait_for_primary(&servers, 1, &[1, 2, 3]);
    let mut expected = vec![before, during];
    expected.sort();
    assert_eq!(held_leases(&servers, &token), expected);
    assert!(
        String::from_utf8_lossy(&checkout(&servers, "ws-4").stderr)
            .contains("no_licenses_available")
    );
}
