//! Server domains in one process: three hosts on loopback, real HTTP between them, real
//! SQLite. Elections are waited for by polling with a deadline, never by fixed sleeps.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tessera_client::Client;
use tessera_server::clock::ManualClock;
use tessera_server::domain::DomainConfig;
use tessera_server::ids::LeaseIds;
use tessera_server::{RunningServer, ServerConfig, ServerOptions, fault_proxy};
use tokio::net::TcpListener;

use super::{START_MS, code, request, sign};

/// The shortest lease time, so stations are told to heartbeat every second (the manual clock
/// does not move, so nothing expires on its own).
const LEASE_TTL: Duration = Duration::from_secs(3);

const SECRET: &str = "in-process test domain secret";
/// Upper bound for an election or a leadership transfer to show; they take well under 1 s.
const WAIT: Duration = Duration::from_secs(10);

struct Domain {
    dir: tempfile::TempDir,
    vendor: tessera_core::SecretKey,
    clock: ManualClock,
    addrs: BTreeMap<u64, String>,
    hosts: BTreeMap<u64, RunningServer>,
    /// Holds the lease secrets every client of the test shares (one station).
    secrets: Client,
}

impl Domain {
    /// Binds every listener first (port 0), then starts every host with the full list. All
    /// hosts share one identity and admin token, copied from host 1's data directory.
    async fn start(n: u64) -> Domain {
        Domain::start_some(n, &(1..=n).collect::<Vec<_>>()).await
    }

    /// A domain of `n` hosts of which only `running` are started.
    async fn start_some(n: u64, running: &[u64]) -> Domain {
        let dir = tempfile::tempdir().unwrap();
        let vendor = tessera_core::SecretKey::from_seed([42; 32]);
        std::fs::write(
            dir.path().join("vendor.pub"),
            vendor.public_key().to_file_text(),
        )
        .unwrap();
        let first = dir.path().join("host-1");
        tessera_server::data_dir::DataDir::open_or_init(&first).unwrap();
        for host in 2..=n {
            let data = dir.path().join(format!("host-{host}"));
            std::fs::create_dir_all(&data).unwrap();
            for file in ["server.key", "server.pub", "admin.token"] {
                std::fs::copy(first.join(file), data.join(file)).unwrap();
            }
        }
        let mut listeners = BTreeMap::new();
        for host in 1..=n {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listeners.insert(host, listener);
        }
        let addrs: BTreeMap<u64, String> = listeners
            .iter()
            .map(|(host, l)| (*host, l.local_addr().unwrap().to_string()))
            .collect();
        let clock = ManualClock::new(START_MS);
        let mut domain = Domain {
            dir,
            vendor,
            clock,
            addrs,
            hosts: BTreeMap::new(),
            secrets: Client::new("http://127.0.0.1:9", None),
        };
        for (host, listener) in listeners {
            if !running.contains(&host) {
                continue;
            }
            let server = domain.start_host(host, listener).await;
            domain.hosts.insert(host, server);
        }
        domain
    }

    async fn start_host(&self, host: u64, listener: TcpListener) -> RunningServer {
        self.start_host_with(host, listener, &self.addrs, false)
            .await
    }

    async fn start_host_with(
        &self,
        host: u64,
        listener: TcpListener,
        addrs: &BTreeMap<u64, String>,
        join: bool,
    ) -> RunningServer {
        let entries: Vec<String> = addrs
            .iter()
            .map(|(n, addr)| format!("{n}={addr}"))
            .collect();
        let mut domain = DomainConfig::parse(host, &entries).unwrap();
        domain.join = join;
        let config = ServerConfig {
            data_dir: self.dir.path().join(format!("host-{host}")),
            listen: addrs[&host].clone(),
            trust: vec![self.dir.path().join("vendor.pub")],
            server_id: Some("srv-test".into()),
            lease_ttl: LEASE_TTL,
            body_limit_bytes: 4096,
            domain: Some(domain),
            domain_secret: Some(SECRET.into()),
            ..ServerConfig::default()
        };
        tessera_server::start(
            listener,
            ServerOptions {
                config,
                clock: Arc::new(self.clock.clone()),
                ids: LeaseIds::from_seed([host as u8; 32]),
                run_timers: false,
            },
        )
        .await
        .unwrap()
    }

    /// Restarts a stopped host on its old address.
    async fn restart(&mut self, host: u64) {
        let listener = TcpListener::bind(&self.addrs[&host]).await.unwrap();
        let server = self.start_host(host, listener).await;
        self.hosts.insert(host, server);
    }

    async fn stop(&mut self, host: u64) {
        self.hosts.remove(&host).unwrap().shutdown().await;
    }

    fn url(&self, host: u64) -> String {
        format!("http://{}", self.addrs[&host])
    }

    fn client(&self, host: u64) -> Client {
        Client::pinned(&self.url(host), None).sharing_secrets(&self.secrets)
    }

    fn admin(&self, host: u64) -> Client {
        let token = self
            .hosts
            .values()
            .next()
            .unwrap()
            .state
            .admin_token
            .clone();
        Client::new(&self.url(host), Some(token)).sharing_secrets(&self.secrets)
    }

    /// A client over every host, in host order.
    fn failover_client(&self) -> Client {
        let urls: Vec<String> = self.addrs.keys().map(|h| self.url(*h)).collect();
        Client::new(&urls.join(","), None).sharing_secrets(&self.secrets)
    }

    /// Polls (with a deadline) until every running host agrees that `expected` is primary.
    async fn wait_primary(&self, expected: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let agreed = self.hosts.iter().all(|(host, server)| {
                let primary = server.state.consensus.primary().map(|(id, _)| id);
                primary == Some(expected)
                    && (*host != expected || server.state.consensus.is_primary())
            });
            if agreed {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "host {expected} did not become primary within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn key(&self, key_id: &str, licenses: u32) -> tessera_core::LicenseKey {
        sign(
            &self.vendor,
            key_id,
            &["cad"],
            licenses,
            START_MS + 30 * 86_400_000,
            None,
        )
    }
}

fn lease_ids(status: &tessera_api::Status) -> Vec<String> {
    status.leases.iter().map(|l| l.lease_id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lowest_numbered_host_becomes_primary_and_backups_forward_writes() {
    let domain = Domain::start(3).await;
    domain.wait_primary(1).await;
    // An admin write and a station write through backups land on the primary.
    domain
        .admin(3)
        .import_key(domain.key("K-CAD", 2).to_json_pretty())
        .await
        .unwrap();
    let (lease, created) = domain
        .client(2)
        .checkout(&request("cad", "ws-1"))
        .await
        .unwrap();
    assert!(created);
    assert_eq!(domain.hosts[&2].state.role().as_str(), "backup");
    let on_primary = domain.admin(1).status().await.unwrap();
    assert_eq!(lease_ids(&on_primary), vec![lease.lease_id.clone()]);
    // Heartbeat and checkin through the other backup.
    domain.client(3).heartbeat(&lease.lease_id).await.unwrap();
    domain.client(3).checkin(&lease.lease_id).await.unwrap();
    assert!(domain.admin(1).status().await.unwrap().leases.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_majority_serves_on_first_start_even_without_host_1() {
    let domain = Domain::start_some(3, &[2, 3]).await;
    domain.wait_primary(2).await;
    domain
        .admin(3)
        .import_key(domain.key("K-CAD", 1).to_json_pretty())
        .await
        .unwrap();
    domain
        .client(3)
        .checkout(&request("cad", "ws-1"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_host_of_a_new_domain_does_not_serve() {
    let domain = Domain::start_some(3, &[1]).await;
    let refused = domain
        .admin(1)
        .import_key(domain.key("K-CAD", 1).to_json_pretty())
        .await
        .unwrap_err();
    assert_eq!(code(refused), (503, "no_quorum".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_domain_status_lists_every_host_with_role_and_health() {
    let domain = Domain::start(3).await;
    domain.wait_primary(1).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // Asked through a backup: it answers with the primary's view.
        let status = domain.client(3).domain_status().await.unwrap();
        let roles: Vec<(u64, String, bool)> = status
            .hosts
            .iter()
            .map(|h| (h.host, h.role.clone(), h.healthy))
            .collect();
        if roles
            == vec![
                (1, "primary".to_string(), true),
                (2, "backup".to_string(), true),
                (3, "backup".to_string(), true),
            ]
        {
            assert_eq!(status.primary, Some(1));
            assert_eq!(status.view_of, 1);
            assert_eq!(status.answered_by, 3);
            assert!(status.quorum);
            assert_eq!(
                status.hosts[1].address.as_deref(),
                Some(domain.addrs[&2].as_str())
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status never settled: {roles:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let raw: serde_json::Value = reqwest::get(format!("{}/v1/domain", domain.url(2)))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for field in [
        "host",
        "role",
        "healthy",
        "address",
        "replication_lag",
        "last_contact_ms",
    ] {
        assert!(
            raw["hosts"][0].get(field).is_some(),
            "missing {field}: {raw}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_primary_stops_a_new_primary_serves_and_the_acknowledged_lease_survives() {
    let mut domain = Domain::start(3).await;
    domain.wait_primary(1).await;
    domain
        .admin(1)
        .import_key(domain.key("K-CAD", 2).to_json_pretty())
        .await
        .unwrap();
    let client = domain.failover_client();
    let (lease, _) = client.checkout(&request("cad", "ws-1")).await.unwrap();

    domain.stop(1).await;
    // The client fails over by itself; the lease id is still valid on the new primary.
    let renewed = client.heartbeat(&lease.lease_id).await.unwrap();
    assert_eq!(renewed.lease_id, lease.lease_id);
    domain.wait_primary(2).await;
    let status = domain.admin(2).status().await.unwrap();
    assert_eq!(lease_ids(&status), vec![lease.lease_id.clone()]);
    // The new primary still counts the surviving lease: one license left, then none.
    client.checkout(&request("cad", "ws-2")).await.unwrap();
    let refused = client.checkout(&request("cad", "ws-3")).await.unwrap_err();
    assert_eq!(code(refused), (409, "no_licenses_available".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_lower_numbered_host_takes_the_primary_role_back() {
    let mut domain = Domain::start(3).await;
    domain.wait_primary(1).await;
    domain.stop(1).await;
    domain.wait_primary(2).await;
    domain
        .admin(2)
        .import_key(domain.key("K-CAD", 3).to_json_pretty())
        .await
        .unwrap();
    let (lease, _) = domain
        .client(3)
        .checkout(&request("cad", "ws-1"))
        .await
        .unwrap();
    domain.restart(1).await;
    domain.wait_primary(1).await;
    let status = domain.admin(1).status().await.unwrap();
    assert_eq!(lease_ids(&status), vec![lease.lease_id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_a_majority_answers_no_quorum_and_issues_nothing() {
    let mut domain = Domain::start(3).await;
    domain.wait_primary(1).await;
    domain
        .admin(1)
        .import_key(domain.key("K-CAD", 5).to_json_pretty())
        .await
        .unwrap();
    domain.stop(1).await;
    domain.stop(2).await;
    let refused = domain
        .client(3)
        .checkout(&request("cad", "ws-9"))
        .await
        .unwrap_err();
    assert_eq!(code(refused), (503, "no_quorum".to_string()));
    // Reads are still served locally, and show nothing was issued.
    let status = domain.admin(3).status().await.unwrap();
    assert!(status.leases.is_empty());
    let view = domain.client(3).domain_status().await.unwrap();
    assert!(!view.quorum);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_routes_refuse_requests_without_the_domain_secret() {
    let domain = Domain::start(3).await;
    domain.wait_primary(1).await;
    let http = tessera_tls::client_builder_exactly(None)
        .unwrap()
        .build()
        .unwrap();
    let url = format!("{}/v1/raft/vote", domain.url(2));
    let unsigned = http.post(&url).body("{}").send().await.unwrap();
    assert_eq!(unsigned.status().as_u16(), 401);
    let body: serde_json::Value = unsigned.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    let forged = http
        .post(&url)
        .header("x-tessera-raft-auth", "00".repeat(32))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 401);
    // Signed with the domain secret but not an AppendEntries request: 400 naming the RPC,
    // and the host keeps serving.
    let body = b"{\"vote\": 1}";
    let mut mac =
        <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(SECRET.as_bytes()).unwrap();
    hmac::Mac::update(&mut mac, b"append\n");
    hmac::Mac::update(&mut mac, body);
    let tag = hex::encode(hmac::Mac::finalize(mac).into_bytes());
    let malformed = http
        .post(format!("{}/v1/raft/append", domain.url(2)))
        .header("x-tessera-raft-auth", tag)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status().as_u16(), 400);
    let message = malformed.text().await.unwrap();
    assert!(
        message.contains("malformed Raft append request"),
        "{message}"
    );
    // An outsider announcing a gigabyte-sized snapshot is refused from the headers alone,
    // before it sends any of the body; with a length tag of another secret, too.
    let authority = domain.url(2).trim_start_matches("http://").to_string();
    let forged_auth = ("x-tessera-raft-auth", "00".repeat(32));
    for length_tag in [None, Some("11".repeat(32))] {
        let mut headers = vec![forged_auth.clone()];
        headers.extend(length_tag.map(|tag| ("x-tessera-raft-length", tag)));
        let answer =
            super::head_only_post(&authority, "/v1/raft/snapshot", 900 << 20, &headers).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(answer.contains("x-tessera-raft-length"), "{answer}");
    }
    // Over the Raft limit even with the right tag: 413, also before the body.
    let mut mac =
        <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(SECRET.as_bytes()).unwrap();
    hmac::Mac::update(
        &mut mac,
        format!("length\nsnapshot\n{}", 2u64 << 30).as_bytes(),
    );
    let tag = hex::encode(hmac::Mac::finalize(mac).into_bytes());
    let answer = super::head_only_post(
        &authority,
        "/v1/raft/snapshot",
        2 << 30,
        &[forged_auth, ("x-tessera-raft-length", tag)],
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    domain
        .admin(1)
        .import_key(domain.key("K-CAD", 5).to_json_pretty())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_single_host_does_not_serve_raft_routes() {
    let dir = tempfile::tempdir().unwrap();
    let vendor = tessera_core::SecretKey::from_seed([42; 32]);
    std::fs::write(
        dir.path().join("vendor.pub"),
        vendor.public_key().to_file_text(),
    )
    .unwrap();
    let server = super::start_server(dir.path(), &ManualClock::new(START_MS), 1).await;
    let answer = tessera_tls::client_builder_exactly(None)
        .unwrap()
        .build()
        .unwrap()
        .post(format!("{}/v1/raft/vote", server.url()))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 404);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_guard_keeps_heartbeating_across_failover_and_checks_in_on_drop() {
    let mut domain = Domain::start(3).await;
    domain.wait_primary(1).await;
    domain
        .admin(1)
        .import_key(domain.key("K-CAD", 1).to_json_pretty())
        .await
        .unwrap();
    let client = domain.failover_client();
    let guard = client
        .checkout_guard(&request("cad", "ws-1"))
        .await
        .unwrap();
    assert_eq!(guard.lease().heartbeat_interval_s, 1);
    let heartbeats_reach = |n: u64| {
        let guard = &guard;
        async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            while guard.heartbeats() < n {
                assert!(tokio::time::Instant::now() < deadline, "no heartbeat {n}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    heartbeats_reach(1).await;
    domain.stop(1).await;
    let before = guard.heartbeats();
    heartbeats_reach(before + 2).await;
    assert_eq!(guard.lost(), None);
    let lease_id = guard.lease_id().to_string();
    assert_eq!(
        lease_ids(&domain.admin(2).status().await.unwrap()),
        vec![lease_id]
    );
    drop(guard);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !domain.admin(2).status().await.unwrap().leases.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dropped guard did not check in"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_joins_and_another_leaves_a_running_domain() {
    let mut domain = Domain::start(3).await;
    domain.wait_primary(1).await;
    domain
        .admin(1)
        .import_key(domain.key("K-CAD", 2).to_json_pretty())
        .await
        .unwrap();
    let (lease, _) = domain
        .client(2)
        .checkout(&request("cad", "ws-1"))
        .await
        .unwrap();
    // Host 4: the same identity, the list with itself, and --join.
    let data = domain.dir.path().join("host-4");
    std::fs::create_dir_all(&data).unwrap();
    for file in ["server.key", "server.pub", "admin.token"] {
        std::fs::copy(domain.dir.path().join("host-1").join(file), data.join(file)).unwrap();
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut addrs = domain.addrs.clone();
    addrs.insert(4, listener.local_addr().unwrap().to_string());
    let host_4 = domain.start_host_with(4, listener, &addrs, true).await;
    domain.addrs = addrs;
    domain.hosts.insert(4, host_4);
    // Asked through a backup: forwarded to the primary.
    let members = domain
        .admin(2)
        .add_host(4, &domain.addrs[&4])
        .await
        .unwrap();
    assert_eq!(members, vec![1, 2, 3, 4]);
    let refused = domain
        .admin(2)
        .add_host(4, &domain.addrs[&4])
        .await
        .unwrap_err();
    assert_eq!(code(refused), (409, "host_already_member".to_string()));
    // The new host has the whole ledger.
    let deadline = tokio::time::Instant::now() + WAIT;
    while lease_ids(&domain.admin(4).status().await.unwrap()) != vec![lease.lease_id.clone()] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "host 4 never caught up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let members = domain.admin(4).remove_host(3).await.unwrap();
    assert_eq!(members, vec![1, 2, 4]);
    domain.stop(3).await;
    // With 3 gone and 4 a voter, stopping 2 still leaves a majority (1 and 4) of 3.
    domain.stop(2).await;
    domain
        .client(4)
        .checkout(&request("cad", "ws-2"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_from_the_majority_issues_nothing_and_the_majority_serves() {
    // Three hosts; the domain list names proxies, so links can be cut.
    let mut domain = Domain::start_some(3, &[]).await;
    let cuts = fault_proxy::Cuts::default();
    let mut proxies = BTreeMap::new();
    for (host, addr) in &domain.addrs {
        let proxy = fault_proxy::start(*host, addr.clone(), cuts.clone()).await;
        proxies.insert(*host, proxy.unwrap());
    }
    for host in 1..=3 {
        let listener = TcpListener::bind(&domain.addrs[&host]).await.unwrap();
        let server = domain
            .start_host_with(host, listener, &proxies, false)
            .await;
        domain.hosts.insert(host, server);
    }
    domain.wait_primary(1).await;
    domain
        .admin(1)
        .import_key(domain.key("K-CAD", 2).to_json_pretty())
        .await
        .unwrap();
    let (before, _) = domain
        .client(1)
        .checkout(&request("cad", "ws-1"))
        .await
        .unwrap();

    cuts.partition(&[1], &[2, 3]);
    // The old primary cannot commit: no_quorum, and it issues nothing.
    let refused = domain
        .client(1)
        .checkout(&request("cad", "ws-minority"))
        .await
        .unwrap_err();
    assert_eq!(code(refused), (503, "no_quorum".to_string()));
    // The majority elects host 2 and serves the one license left, and no more.
    let majority = Client::new(&format!("{},{}", domain.url(2), domain.url(3)), None)
        .sharing_secrets(&domain.secrets);
    let (during, _) = majority.checkout(&request("cad", "ws-2")).await.unwrap();
    let refused = majority
        .checkout(&request("cad", "ws-3"))
        .await
        .unwrap_err();
    assert_eq!(code(refused), (409, "no_licenses_available".to_string()));
    assert!(
        domain.hosts[&1]
            .state
            .consensus
            .read(|ledger| ledger.lease_count())
            <= 1,
        "the cut-off host applied a lease it could not have committed"
    );

    // Healed: host 1 catches up and is primary again, with exactly the committed leases.
    cuts.heal();
    domain.wait_primary(1).await;
    let mut held = lease_ids(&domain.admin(1).status().await.unwrap());
    held.sort();
    let mut expected = vec![before.lease_id, during.lease_id];
    expected.sort();
    assert_eq!(held, expected);
}
