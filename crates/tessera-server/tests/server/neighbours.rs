//! Donations between license servers: parent, children, grandchild and peers, each a real
//! server on loopback with its own data directory and its own manual clock.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tessera_client::Client;
use tessera_core::{Grant, LicenseKey, SecretKey};
use tessera_server::clock::ManualClock;
use tessera_server::ids::LeaseIds;
use tessera_server::neighbours::config::{Connection, LicenseSettings, Neighbour, Relation};
use tessera_server::neighbours::{Envelope, GrantsPush};
use tessera_server::{RunningServer, ServerConfig, ServerOptions};
use tokio::net::TcpListener;

use super::{START_MS, code, request, sign};

const HOUR_MS: i64 = 3_600_000;
const SKEW: Duration = Duration::from_secs(30);

/// One link as a server sees it: (neighbour, relation, send, receive).
type Link<'a> = (&'a str, Relation, bool, bool);

fn child(id: &str) -> Link<'_> {
    (id, Relation::Child, true, false)
}

fn parent(id: &str) -> Link<'_> {
    (id, Relation::Parent, false, true)
}

struct Node {
    clock: ManualClock,
    server: Option<RunningServer>,
    config: ServerConfig,
    secret: SecretKey,
}

struct Net {
    dir: tempfile::TempDir,
    vendor: SecretKey,
    nodes: BTreeMap<String, Node>,
    /// The licenses of every vendor key signed for the test, for the safety check that runs
    /// after every tick and every batch of checkouts.
    limits: std::sync::Mutex<BTreeMap<String, u32>>,
    /// Holds the lease secrets every client of the test shares.
    secrets: Client,
}

impl Net {
    /// Starts one server per entry, each knowing the neighbours listed for it.
    async fn start(specs: &[(&str, Vec<Link<'_>>)]) -> Net {
        Net::start_with(specs, |_, _| {}).await
    }

    /// As [`Net::start`], with each server's configuration adjusted by `tweak` (by ID).
    async fn start_with(
        specs: &[(&str, Vec<Link<'_>>)],
        tweak: impl Fn(&str, &mut ServerConfig),
    ) -> Net {
        let dir = tempfile::tempdir().unwrap();
        let vendor = SecretKey::from_seed([42; 32]);
        std::fs::write(
            dir.path().join("vendor.pub"),
            vendor.public_key().to_file_text(),
        )
        .unwrap();
        let mut listeners = BTreeMap::new();
        let mut secrets = BTreeMap::new();
        for (index, (id, _)) in specs.iter().enumerate() {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listeners.insert(id.to_string(), listener);
            secrets.insert(
                id.to_string(),
                SecretKey::from_seed([index as u8 + 100; 32]),
            );
        }
        let mut nodes = BTreeMap::new();
        for (id, links) in specs {
            let data = dir.path().join(id);
            std::fs::create_dir_all(&data).unwrap();
            // The identity exists before the first start, so neighbours can be configured.
            let secret = secrets[*id].clone();
            std::fs::write(data.join("server.key"), secret.to_file_text()).unwrap();
            std::fs::write(data.join("server.pub"), secret.public_key().to_file_text()).unwrap();
            let neighbours = links
                .iter()
                .map(|(other, relation, send, receive)| Neighbour {
                    id: other.to_string(),
                    url: format!("http://{}", listeners[*other].local_addr().unwrap()),
                    relation: *relation,
                    send: *send,
                    receive: *receive,
                    connection: Connection::Permanent,
                    public_key: secrets[*other].public_key(),
                })
                .collect();
            let mut config = ServerConfig {
                data_dir: data,
                listen: "127.0.0.1:0".into(),
                trust: vec![dir.path().join("vendor.pub")],
                server_id: Some(id.to_string()),
                lease_ttl: Duration::from_secs(600),
                clock_skew_max: SKEW,
                neighbours,
                licenses: LicenseSettings::default(),
                ..ServerConfig::default()
            };
            tweak(id, &mut config);
            nodes.insert(
                id.to_string(),
                Node {
                    clock: ManualClock::new(START_MS),
                    server: None,
                    config,
                    secret,
                },
            );
        }
        let mut net = Net {
            dir,
            vendor,
            nodes,
            limits: Default::default(),
            secrets: Client::new("http://127.0.0.1:9", None),
        };
        for (id, listener) in listeners {
            net.boot(&id, listener).await;
        }
        net
    }

    /// A parent `hq` with one child `branch`, and key K (10 licenses) imported at hq.
    async fn hq_and_branch() -> (Net, Client) {
        let net = Net::start(&[
            ("hq", vec![child("branch")]),
            ("branch", vec![parent("hq")]),
        ])
        .await;
        let hq = net.admin("hq");
        hq.import_key(net.key("K", 10).to_json_pretty())
            .await
            .unwrap();
        (net, hq)
    }

    async fn boot(&mut self, id: &str, listener: TcpListener) {
        let node = self.nodes.get_mut(id).unwrap();
        let server = tessera_server::start(
            listener,
            ServerOptions {
                config: node.config.clone(),
                clock: Arc::new(node.clock.clone()),
                ids: LeaseIds::from_seed([id.len() as u8; 32]),
                run_timers: false,
            },
        )
        .await
        .unwrap();
        node.server = Some(server);
    }

    fn server(&self, id: &str) -> &RunningServer {
        self.nodes[id].server.as_ref().expect("running")
    }

    fn admin(&self, id: &str) -> Client {
        let server = self.server(id);
        Client::new(&server.url(), Some(server.state.admin_token.clone()))
            .sharing_secrets(&self.secrets)
    }

    fn key(&self, key_id: &str, licenses: u32) -> LicenseKey {
        self.key_for(key_id, &["cad"], licenses)
    }

    fn key_for(&self, key_id: &str, components: &[&str], licenses: u32) -> LicenseKey {
        self.limits
            .lock()
            .unwrap()
            .insert(key_id.to_string(), licenses);
        sign(
            &self.vendor,
            key_id,
            components,
            licenses,
            START_MS + 30 * 86_400_000,
            None,
        )
    }

    /// A key `renewal_id` renewing `old`, signed by the test vendor.
    fn renewal_of(&self, old: &str, renewal_id: &str, licenses: u32) -> LicenseKey {
        let mut payload = self.key(renewal_id, licenses).payload.clone();
        payload.renews = Some(old.into());
        LicenseKey::sign(payload, &self.vendor).unwrap()
    }

    /// A key `renewal_id` of 10 licenses renewing `old` from `from_ms` (bought in advance),
    /// valid 30 days from then.
    fn renewal_from(&self, old: &str, renewal_id: &str, from_ms: i64) -> LicenseKey {
        let mut payload = self.key(renewal_id, 10).payload.clone();
        payload.renews = Some(old.into());
        payload.valid_from = jiff::Timestamp::from_millisecond(from_ms).unwrap();
        payload.valid_until = jiff::Timestamp::from_millisecond(from_ms + 30 * 86_400_000).unwrap();
        LicenseKey::sign(payload, &self.vendor).unwrap()
    }

    /// Moves the clocks on by the retry interval and runs hq's and branch's timers until
    /// `done` (bounded).
    async fn exchange_until<F: std::future::Future<Output = bool>>(
        &self,
        what: &str,
        done: impl Fn() -> F,
    ) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !done().await {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: not within 20 s"
            );
            self.advance(tessera_server::neighbours::RETRY_MS);
            self.tick("hq").await;
            self.tick("branch").await;
        }
    }

    fn advance(&self, ms: i64) {
        for node in self.nodes.values() {
            node.clock.advance_ms(ms);
        }
    }

    /// What the primary's timers do at the current clock; then the safety check.
    async fn tick(&self, id: &str) -> Vec<String> {
        let state = &self.server(id).state;
        state.tick().await.unwrap();
        let errors = state.neighbour_tick().await;
        self.check_safe().await;
        errors
    }

    async fn checkouts(&self, id: &str, prefix: &str, count: usize) -> usize {
        let client = Client::new(&self.server(id).url(), None).sharing_secrets(&self.secrets);
        let mut granted = 0;
        for n in 0..count {
            if client
                .checkout(&request("cad", &format!("{prefix}-{n}")))
                .await
                .is_ok()
            {
                granted += 1;
            }
        }
        self.check_safe().await;
        granted
    }

    /// The key (or received pool) summary of a server.
    async fn key_summary(&self, id: &str, key_id: &str) -> Option<tessera_api::KeySummary> {
        let status = self.admin(id).status().await.unwrap();
        status.keys.into_iter().find(|k| k.key_id == key_id)
    }

    /// [`Net::assert_safe`] for every key signed in the test.
    async fn check_safe(&self) {
        let limits = self.limits.lock().unwrap().clone();
        let limits = limits.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        self.assert_safe(&limits).await;
    }

    /// The safety property: for every vendor key, leases held anywhere ≤ its licenses (and
    /// on every server, leases + licenses donated ≤ the licenses it holds).
    async fn assert_safe(&self, licenses: &BTreeMap<&str, u32>) {
        let mut held: BTreeMap<String, u32> = BTreeMap::new();
        for (id, node) in &self.nodes {
            let Some(server) = &node.server else { continue };
            let status = Client::new(&server.url(), None).status().await.unwrap();
            for key in status.keys {
                *held.entry(key.vendor_key_id.clone()).or_default() += key.in_use;
                assert!(
                    key.in_use + key.donated_out <= key.licenses,
                    "{id}: {key:?}"
                );
            }
        }
        for (key_id, count) in held {
            assert!(
                count <= licenses[key_id.as_str()],
                "key {key_id}: {count} leases across the network"
            );
        }
    }

    async fn events(&self, id: &str) -> Vec<serde_json::Value> {
        self.admin(id).events().await.unwrap()
    }

    /// The messages of the events of `kind` on a server, newest first.
    async fn messages(&self, id: &str, kind: &str) -> Vec<String> {
        self.events(id)
            .await
            .into_iter()
            .filter(|e| e["kind"] == kind)
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    async fn metrics(&self, id: &str) -> String {
        reqwest::get(format!("{}/metrics", self.server(id).url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn neighbour_view(&self, id: &str, of: &str) -> tessera_api::NeighbourSummary {
        self.admin(id)
            .neighbours()
            .await
            .unwrap()
            .neighbours
            .into_iter()
            .find(|n| n.id == of)
            .unwrap()
    }

    async fn stop(&mut self, id: &str) {
        let server = self.nodes.get_mut(id).unwrap().server.take().unwrap();
        server.shutdown().await;
    }

    /// Signs a message as `from` (whose identity this test created).
    fn envelope<T: serde::Serialize>(
        &self,
        from: &str,
        to: &str,
        kind: &str,
        body: &T,
    ) -> Envelope {
        let node = &self.nodes[from];
        let body = serde_json::to_value(body).unwrap();
        let sent_at_ms = tessera_core::Clock::now_ms(&node.clock);
        let bytes = {
            let mut bytes = b"tessera-neighbour/v1\n".to_vec();
            bytes.extend(serde_json::to_vec(&(from, to, sent_at_ms, kind, &body)).unwrap());
            bytes
        };
        Envelope {
            from: from.into(),
            to: to.into(),
            sent_at_ms,
            kind: kind.into(),
            body,
            signature: node.secret.sign_base64(&bytes),
        }
    }

    async fn post(&self, to: &str, path: &str, envelope: &Envelope) -> (u16, serde_json::Value) {
        let response = tessera_tls::client_builder_exactly(None)
            .unwrap()
            .build()
            .unwrap()
            .post(format!("{}{path}", self.server(to).url()))
            .json(envelope)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }
}

fn until(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_donates_to_two_children_who_use_exactly_what_they_got() {
    let net = Net::start(&[
        ("hq", vec![child("branch-1"), child("branch-2")]),
        ("branch-1", vec![parent("hq")]),
        ("branch-2", vec![parent("hq")]),
    ])
    .await;
    let licenses = BTreeMap::from([("K", 10)]);
    let hq = net.admin("hq");
    hq.import_key(net.key("K", 10).to_json_pretty())
        .await
        .unwrap();
    let far = until(START_MS + 10 * 86_400_000);
    let donation = hq.donate("K", "branch-1", 4, &far).await.unwrap();
    assert_eq!((donation.licenses, donation.donated_now), (4, 4));
    hq.donate("K", "branch-2", 3, "2027-02-01").await.unwrap();

    // The grants were pushed at once.
    let received = net.key_summary("branch-1", "K@hq").await.unwrap();
    assert_eq!(
        (received.licenses, received.received, received.received_from),
        (4, 4, Some("hq".to_string()))
    );
    assert_eq!(
        net.key_summary("branch-2", "K@hq").await.unwrap().licenses,
        3
    );
    let own = net.key_summary("hq", "K").await.unwrap();
    assert_eq!((own.licenses, own.donated_out, own.free), (10, 7, 3));

    assert_eq!(net.checkouts("branch-1", "b1", 5).await, 4);
    assert_eq!(net.checkouts("branch-2", "b2", 5).await, 3);
    assert_eq!(net.checkouts("hq", "hq", 5).await, 3);
    net.assert_safe(&licenses).await;

    // The children report their usage; the parent shows it per neighbour.
    assert!(net.tick("branch-1").await.is_empty());
    let neighbours = hq.neighbours().await.unwrap();
    let branch_1 = neighbours
        .neighbours
        .iter()
        .find(|n| n.id == "branch-1")
        .unwrap();
    let usage = branch_1.usage.as_ref().expect("usage report");
    assert_eq!(usage.active_stations.get("cad"), Some(&4));
    assert_eq!(branch_1.donations[0].donated_now, 4);
    assert!(branch_1.last_contact.is_some());
    let child_view = net.admin("branch-1").neighbours().await.unwrap();
    assert_eq!(child_view.neighbours[0].received[0].licenses, 4);

    // More than the free licenses cannot be donated.
    let refused = hq.donate("K", "branch-1", 8, &far).await.unwrap_err();
    assert_eq!(code(refused), (409, "not_enough_licenses".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_bodies_over_the_ordinary_limit_are_read_only_when_a_neighbour_vouches_for_them() {
    let net = Net::start_with(
        &[
            ("hq", vec![child("branch")]),
            ("branch", vec![parent("hq")]),
        ],
        // The receiver's ordinary limit is 1 KiB.
        |id, config| {
            if id == "branch" {
                config.body_limit_bytes = 1024;
            }
        },
    )
    .await;
    let hq = net.admin("hq");
    // A key of many components: its grant is well over the 1 KiB limit.
    let components: Vec<String> = (0..40).map(|i| format!("component-{i:02}")).collect();
    let names: Vec<&str> = components.iter().map(String::as_str).collect();
    let key = net.key_for("K", &names, 10);
    assert!(key.to_json_pretty().len() > 1024);
    hq.import_key(key.to_json_pretty()).await.unwrap();
    hq.donate("K", "branch", 4, &until(START_MS + 10 * 86_400_000))
        .await
        .unwrap();
    let received = net.key_summary("branch", "K@hq").await.unwrap();
    assert_eq!(received.licenses, 4);
    assert!(net.tick("branch").await.is_empty());

    // An outsider announcing a large body is refused from the headers alone: without a
    // voucher, with a voucher in hq's name signed by another key, and with hq's own voucher
    // for another length.
    let branch = net.server("branch").url();
    let authority = branch.trim_start_matches("http://");
    let path = "/v1/neighbours/grants";
    let forger = SecretKey::from_seed([7; 32]);
    let forged = forger
        .sign_base64(format!("tessera-neighbour/v1\nbody\nhq\nbranch\n{path}\n3000000").as_bytes());
    let real = net
        .server("hq")
        .state
        .body_voucher("branch", path, 1_000_000);
    for headers in [
        vec![],
        vec![("x-tessera-neighbour-body", format!("hq 3000000 {forged}"))],
        vec![("x-tessera-neighbour-body", real)],
    ] {
        let answer = super::head_only_post(authority, path, 3_000_000, &headers).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_donates_further_within_its_grant() {
    let net = Net::start(&[
        ("hq", vec![child("branch")]),
        ("branch", vec![parent("hq"), child("site")]),
        ("site", vec![parent("branch")]),
    ])
    .await;
    let hq = net.admin("hq");
    hq.import_key(net.key("K", 10).to_json_pretty())
        .await
        .unwrap();
    let far = until(START_MS + 10 * 86_400_000);
    hq.donate("K", "branch", 5, &far).await.unwrap();
    let branch = net.admin("branch");
    let first = branch.donate("K@hq", "site", 3, &far).await.unwrap();
    let at_site = net.key_summary("site", "K@branch").await.unwrap();
    assert_eq!((at_site.licenses, at_site.vendor_key_id.as_str()), (3, "K"));
    let refused = branch.donate("K@hq", "site", 6, &far).await.unwrap_err();
    assert_eq!(code(refused), (409, "not_enough_licenses".to_string()));
    assert_eq!(net.checkouts("site", "s", 4).await, 3);
    assert_eq!(net.checkouts("branch", "b", 4).await, 2);
    assert_eq!(net.checkouts("hq", "h", 6).await, 5);
    net.assert_safe(&BTreeMap::from([("K", 10)])).await;
    // The site's grant renews through its own parent, the branch.
    net.advance(40 * 60_000);
    assert!(net.tick("branch").await.is_empty());
    assert!(net.tick("site").await.is_empty());
    assert!(
        net.admin("branch").donations().await.unwrap()[0].serial > first.serial,
        "renewed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_donate_only_where_send_and_receive_allow() {
    let net = Net::start(&[
        ("east", vec![("west", Relation::Peer, true, false)]),
        ("west", vec![("east", Relation::Peer, false, true)]),
    ])
    .await;
    let far = until(START_MS + 10 * 86_400_000);
    net.admin("east")
        .import_key(net.key("E", 4).to_json_pretty())
        .await
        .unwrap();
    net.admin("west")
        .import_key(net.key("W", 4).to_json_pretty())
        .await
        .unwrap();
    net.admin("east")
        .donate("E", "west", 2, &far)
        .await
        .unwrap();
    assert_eq!(net.key_summary("west", "E@east").await.unwrap().licenses, 2);
    // West may not send to east.
    let refused = net
        .admin("west")
        .donate("W", "east", 1, &far)
        .await
        .unwrap_err();
    assert_eq!(code(refused), (403, "neighbour_not_allowed".to_string()));
    // And east refuses grants from west even if west tries (east does not receive).
    let (status, body) = net
        .post(
            "east",
            "/v1/neighbours/grants",
            &net.envelope(
                "west",
                "east",
                "grants",
                &GrantsPush {
                    grants: vec![],
                    returned_request: false,
                },
            ),
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "neighbour_not_allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_renew_while_the_child_lives_and_come_back_when_it_is_gone() {
    let (mut net, hq) = Net::hq_and_branch().await;
    let first = hq
        .donate("K", "branch", 4, &until(START_MS + 10 * 86_400_000))
        .await
        .unwrap();
    assert_eq!(net.checkouts("branch", "b", 4).await, 4);
    // Past half of the one-hour grant the child asks for a renewal.
    net.advance(35 * 60_000);
    assert!(net.tick("branch").await.is_empty());
    let donation = &hq.donations().await.unwrap()[0];
    assert!(donation.serial > first.serial, "renewed");
    assert_eq!(net.key_summary("branch", "K@hq").await.unwrap().received, 4);

    // The child is switched off: nothing renews; one renewal period (plus the clock skew)
    // after the last renewal the parent has its licenses back by itself.
    net.stop("branch").await;
    net.advance(HOUR_MS - 1000);
    let errors = net.tick("hq").await;
    assert!(
        errors
            .iter()
            .any(|e| e.contains("cannot reach neighbour branch")),
        "{errors:?}"
    );
    assert_eq!(net.key_summary("hq", "K").await.unwrap().donated_out, 4);
    net.advance(1000 + SKEW.as_millis() as i64);
    net.tick("hq").await;
    let own = net.key_summary("hq", "K").await.unwrap();
    assert_eq!((own.donated_out, own.free), (0, 10));
    assert_eq!(net.checkouts("hq", "h", 10).await, 10);
    assert_eq!(hq.donations().await.unwrap()[0].state, "lapsed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_end_date_the_childs_leases_end_and_the_licenses_return() {
    let (net, hq) = Net::hq_and_branch().await;
    let end = START_MS + 5 * 60_000;
    let first = hq
        .donate("K", "branch", 4, &until(START_MS + 10 * HOUR_MS))
        .await
        .unwrap();
    // The end date is editable at any time: moved earlier, the child gets the new grant.
    let changed = hq.donate("K", "branch", 4, &until(end)).await.unwrap();
    assert!(changed.serial > first.serial);
    let branch = Client::new(&net.server("branch").url(), None).sharing_secrets(&net.secrets);
    let (lease, _) = branch.checkout(&request("cad", "ws-1")).await.unwrap();
    assert_eq!(
        lease.expires_at.as_millisecond(),
        end - SKEW.as_millis() as i64,
        "no lease outlives the grant (less the clock skew)"
    );
    net.advance(end - SKEW.as_millis() as i64 - START_MS);
    net.tick("branch").await;
    let gone = branch.heartbeat(&lease.lease_id).await.unwrap_err();
    assert_eq!(code(gone), (404, "lease_not_found".to_string()));
    assert!(net.key_summary("branch", "K@hq").await.is_none());
    // The parent counts the first, longer grant until it lapses, then has all back.
    net.advance(HOUR_MS);
    net.tick("hq").await;
    let own = net.key_summary("hq", "K").await.unwrap();
    assert_eq!(own.donated_out, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_misconfigured_and_skewed_neighbours_are_refused_on_both_sides() {
    let net = Net::start(&[
        ("hq", vec![child("branch")]),
        ("branch", vec![parent("hq")]),
        // A stranger that believes hq is its parent; hq does not know it.
        ("stranger", vec![parent("hq")]),
    ])
    .await;
    let errors = net.tick("stranger").await;
    assert!(
        errors.iter().any(|e| e.contains("unknown_neighbour")),
        "{errors:?}"
    );
    let view = net.admin("stranger").neighbours().await.unwrap();
    assert!(
        view.neighbours[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("has no neighbour \"stranger\"")
    );
    // ... and on the side that refused it: an event and a counter.
    let refusals = net.messages("hq", "neighbour_refused").await;
    assert!(
        refusals[0].contains("from server \"stranger\": unknown_neighbour"),
        "{refusals:?}"
    );
    assert!(
        net.metrics("hq")
            .await
            .contains("tessera_neighbour_refused_total 1")
    );
    // A message signed by a neighbour but addressed to another server.
    let (status, body) = net
        .post(
            "hq",
            "/v1/neighbours/renew",
            &net.envelope(
                "branch",
                "elsewhere",
                "renew",
                &serde_json::json!({"held": [], "usage": null}),
            ),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("unknown_neighbour")),
        "{body}"
    );
    // A message from a known neighbour signed with another key.
    let mut forged = net.envelope(
        "branch",
        "hq",
        "renew",
        &serde_json::json!({"held": [], "usage": null}),
    );
    forged.signature = SecretKey::from_seed([7; 32]).sign_base64(b"something else");
    let (status, body) = net.post("hq", "/v1/neighbours/renew", &forged).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("bad_neighbour_signature"))
    );
    // A child whose clock is off by more than clock_skew_max.
    net.nodes["branch"].clock.advance_ms(2 * 60_000);
    let errors = net.tick("branch").await;
    assert!(
        errors.iter().any(|e| e.contains("clock_skew")),
        "{errors:?}"
    );
    assert!(
        net.messages("hq", "neighbour_refused").await[0].contains("clock_skew"),
        "refused on the parent's side too"
    );
    assert!(
        net.neighbour_view("branch", "hq")
            .await
            .last_error
            .unwrap()
            .contains("more than clock_skew_max")
    );
    // Donating to a server that is not a neighbour.
    let refused = net
        .admin("hq")
        .donate("K", "nowhere", 1, "2027-02-01")
        .await
        .unwrap_err();
    assert_eq!(code(refused), (403, "unknown_neighbour".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_inflated_and_replayed_grants_are_refused_by_the_receiver() {
    let (net, hq) = Net::hq_and_branch().await;
    let far = until(START_MS + 10 * 86_400_000);
    hq.donate("K", "branch", 2, &far).await.unwrap();
    let first: Grant = net.server("hq").state.consensus.read(|ledger| {
        let (source, payload) = ledger.grant_to_sign("K", "branch").unwrap();
        Grant::issue(source, payload, &net.nodes["hq"].secret)
    });
    hq.donate("K", "branch", 3, &far).await.unwrap();
    assert_eq!(net.key_summary("branch", "K@hq").await.unwrap().licenses, 3);

    let mut inflated = first.clone();
    inflated.links[0].payload.licenses = 9;
    inflated.links[0].payload.serial = 99;
    let impostor = SecretKey::from_seed([77; 32]);
    let mut forged_payload = first.last().clone();
    forged_payload.serial = 100;
    forged_payload.licenses = 10;
    // Self-consistent (signed by the key it names), but not the parent's key.
    forged_payload.donor_public_key = impostor.public_key().to_base64();
    let forged = Grant::issue(
        tessera_core::GrantSource::Key {
            key: &first.key,
            certificate: None,
        },
        forged_payload,
        &impostor,
    );
    for (grant, why) in [
        (inflated, "grant_bad_signature"),
        (first, "grant_replayed"),
        (forged, "not by neighbour"),
    ] {
        let push = GrantsPush {
            grants: vec![grant],
            returned_request: false,
        };
        let (status, body) = net
            .post(
                "branch",
                "/v1/neighbours/grants",
                &net.envelope("hq", "branch", "grants", &push),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let answer: tessera_server::neighbours::HeldAnswer =
            serde_json::from_value(body["body"].clone()).unwrap();
        assert!(
            answer.refused.iter().any(|r| r.contains(why)),
            "{why}: {:?}",
            answer.refused
        );
        assert_eq!(answer.held[0].licenses, 3, "nothing changed");
    }
    assert_eq!(net.checkouts("branch", "b", 5).await, 3);
    // The grant whose signature fails was refused before it was proposed: the log holds no
    // grant that does not verify (a restart would refuse one, as edited on disk).
    assert_eq!(
        net.server("branch")
            .state
            .consensus
            .unverified_log_entries(),
        vec![]
    );
}

/// Attack T3 for grants: an accepted grant edited in the receiver's Raft log (3 licenses
/// made 30). Replayed, it would silently drop the pool (or, edited the other way, add one):
/// the receiver refuses to start, naming the entry, and starts again once it is put back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_edited_in_the_receivers_log_stops_its_start_naming_it() {
    let (mut net, hq) = Net::hq_and_branch().await;
    hq.donate("K", "branch", 3, &until(START_MS + 10 * 86_400_000))
        .await
        .unwrap();
    assert_eq!(net.key_summary("branch", "K@hq").await.unwrap().licenses, 3);
    net.stop("branch").await;
    let config = net.nodes["branch"].config.clone();
    let store = config.data_dir.join("raft.sqlite3");
    let connection = rusqlite::Connection::open(&store).unwrap();
    let (index, entry): (i64, Vec<u8>) = connection
        .query_row(
            "SELECT log_index, entry FROM raft_log WHERE CAST(entry AS TEXT) LIKE '%accept_grant%'
             ORDER BY log_index DESC LIMIT 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    let text = String::from_utf8(entry).unwrap();
    let edited = text.replacen("\"licenses\":3,", "\"licenses\":30,", 1);
    assert_ne!(edited, text, "{text}");
    let put = |entry: &str| super::rewrite_log_entry(&store, index, entry.as_bytes());
    drop(connection);
    put(&edited);
    let error = super::try_start(config.clone(), &net.nodes["branch"].clock)
        .await
        .err()
        .expect("refused to start");
    let message = error.to_string();
    assert!(
        message.contains(&format!("raft log entry {index}"))
            && message.contains("grant of key K from hq"),
        "{message}"
    );
    put(&text);
    let server = super::try_start(config, &net.nodes["branch"].clock)
        .await
        .expect("starts as it was");
    assert_eq!(
        server
            .state
            .consensus
            .read(|ledger| ledger.unverified_keys()),
        vec![]
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatch_between_donor_and_receiver_is_detected_and_notified() {
    let (mut net, hq) = Net::hq_and_branch().await;
    hq.donate("K", "branch", 4, &until(START_MS + 10 * 86_400_000))
        .await
        .unwrap();
    // The child's store is tampered with: its records are wiped, its identity kept. (A
    // fresh directory rather than deleting files, which the stopped server's storage may
    // still be closing.)
    net.stop("branch").await;
    let old = net.nodes["branch"].config.data_dir.clone();
    let wiped = net.dir.path().join("branch-wiped");
    std::fs::create_dir_all(&wiped).unwrap();
    for file in ["server.key", "server.pub"] {
        std::fs::copy(old.join(file), wiped.join(file)).unwrap();
    }
    net.nodes.get_mut("branch").unwrap().config.data_dir = wiped;
    // Back on the same address, which the parent knows it by.
    let url = net.nodes["hq"].config.neighbours[0].url.clone();
    let listener = TcpListener::bind(url.trim_start_matches("http://"))
        .await
        .unwrap();
    net.boot("branch", listener).await;
    // Its next contact reports what it holds: nothing, where the parent counts 4.
    let errors = net.tick("branch").await;
    let events = hq.events().await.unwrap();
    let mismatch = events
        .iter()
        .find(|e| e["kind"] == "license_mismatch")
        .unwrap_or_else(|| panic!("a license_mismatch event: {errors:?} {events:#?}"));
    let message = mismatch["message"].as_str().unwrap();
    assert!(
        message.contains("reports 0 licenses of key K") && message.contains("counts 4 donated"),
        "{message}"
    );
    // The renewal answer gave the child its grant back.
    assert_eq!(net.key_summary("branch", "K@hq").await.unwrap().licenses, 4);
}

/// Tampering with a server's records behind the link's back: a change proposed straight to
/// its consensus, as a corrupted or edited store would hold it.
async fn tamper(net: &Net, id: &str, command: tessera_core::Command) {
    let state = &net.server(id).state;
    let at_ms = tessera_core::Clock::now_ms(&net.nodes[id].clock);
    state
        .consensus
        .propose(tessera_core::Stamped { at_ms, command })
        .await
        .unwrap();
}

/// Attack T7: remove the donated key on the donor and add it again, to have the donated
/// seats back while the child keeps them. Refused while a grant may still be held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_with_donated_licenses_cannot_be_removed_to_count_them_again() {
    let net = Net::start(&[
        ("hq", vec![child("branch")]),
        ("branch", vec![parent("hq")]),
    ])
    .await;
    let licenses = BTreeMap::from([("K", 10)]);
    let hq = net.admin("hq");
    let key = net.key("K", 10);
    hq.import_key(key.to_json_pretty()).await.unwrap();
    hq.donate("K", "branch", 4, &until(START_MS + 10 * 86_400_000))
        .await
        .unwrap();
    assert_eq!(net.checkouts("branch", "b", 5).await, 4);
    let refused = hq.remove_key("K").await.unwrap_err();
    assert_eq!(code(refused), (409, "key_has_donations".to_string()));
    // Nothing changed: the donor still counts the 4 and issues only the other 6.
    assert_eq!(net.key_summary("hq", "K").await.unwrap().donated_out, 4);
    assert_eq!(net.checkouts("hq", "h", 10).await, 6);
    net.assert_safe(&licenses).await;
    // Ended, the grant is still counted until it runs out; then the key may go.
    hq.end_donation("K", "branch").await.unwrap();
    let refused = hq.remove_key("K").await.unwrap_err();
    assert_eq!(code(refused).1, "key_has_donations");
    net.advance(600_000);
    assert!(net.tick("branch").await.is_empty());
    assert_eq!(net.key_summary("hq", "K").await.unwrap().donated_out, 0);
    hq.remove_key("K").await.unwrap();
    hq.import_key(key.to_json_pretty()).await.unwrap();
    net.assert_safe(&licenses).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_a_donation_calls_the_licenses_back_once_the_stations_stop() {
    let net = Net::start(&[
        ("hq", vec![child("branch")]),
        ("branch", vec![parent("hq")]),
    ])
    .await;
    let licenses = BTreeMap::from([("K", 10)]);
    let hq = net.admin("hq");
    hq.import_key(net.key("K", 10).to_json_pretty())
        .await
        .unwrap();
    hq.donate("K", "branch", 4, &until(START_MS + 10 * 86_400_000))
        .await
        .unwrap();
    let branch = Client::new(&net.server("branch").url(), None).sharing_secrets(&net.secrets);
    let (lease, _) = branch.checkout(&request("cad", "ws-1")).await.unwrap();
    assert_eq!(net.checkouts("branch", "b", 5).await, 3);
    assert_eq!(net.checkouts("hq", "h", 10).await, 6);
    net.assert_safe(&licenses).await;

    // Ended: the child is asked to give the grant back and does at once; its leases end and
    // a station hears so at its next heartbeat. Until the expiry they were told the stations
    // may still use their licenses, so the parent counts them until then and has them back
    // at the child's first renewal request after it (not one renewal period later).
    let ended = hq.end_donation("K", "branch").await.unwrap();
    assert_eq!(ended.state.as_str(), "ended");
    assert!(net.key_summary("branch", "K@hq").await.is_none());
    let gone = branch.heartbeat(&lease.lease_id).await.unwrap_err();
    assert_eq!(code(gone), (404, "lease_not_found".to_string()));
    assert!(
        net.messages("branch", "grant_released").await[0]
            .contains("called back the licenses of K@hq: 4 leases ended")
    );
    let own = net.key_summary("hq", "K").await.unwrap();
    assert_eq!((own.donated_out, own.free), (4, 0));
    net.assert_safe(&licenses).await;
    net.advance(599_000);
    assert!(net.tick("branch").await.is_empty());
    assert_eq!(net.key_summary("hq", "K").await.unwrap().donated_out, 4);
    net.advance(1000);
    assert!(net.tick("branch").await.is_empty());
    assert_eq!(net.key_summary("hq", "K").await.unwrap().donated_out, 0);
    assert!(net.messages("hq", "licenses_returned").await[0].contains("gave back 4 licenses of K"));
    assert!(hq.donations().await.unwrap().is_empty());
    assert_eq!(net.checkouts("hq", "h2", 12).await, 10);
    net.assert_safe(&licenses).await;
    // The child's next renewal finds nothing to renew and no difference.
    net.advance(20 * 60_000);
    assert!(net.tick("branch").await.is_empty());
    assert!(net.tick("hq").await.is_empty());
    assert!(net.messages("hq", "license_mismatch").await.is_empty());
    net.assert_safe(&licenses).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_a_donation_calls_back_what_the_child_donated_further() {
    let net = Net::start(&[
        ("hq", vec![child("branch")]),
        ("branch", vec![parent("hq"), child("site")]),
        ("site", vec![parent("branch")]),
    ])
    .await;
    let licenses = BTreeMap::from([("K", 10)]);
    let hq = net.admin("hq");
    hq.import_key(net.key("K", 10).to_json_pretty())
        .await
        .unwrap();
    let far = until(START_MS + 10 * 86_400_000);
    hq.donate("K", "branch", 5, &far).await.unwrap();
    net.admin("branch")
        .donate("K@hq", "site", 3, &far)
        .await
        .unwrap();
    assert_eq!(net.checkouts("site", "s", 3).await, 3);
    assert_eq!(net.checkouts("branch", "b", 3).await, 2);
    net.assert_safe(&licenses).await;

    hq.end_donation("K", "branch").await.unwrap();
    // The site gives its re-grant back at once; the branch can give its own grant back
    // once the site's stations stopped and the site said so; then the parent has all its
    // licenses again once the branch's stations stopped too. Each step comes with the
    // ordinary exchanges, within a few sync periods.
    assert!(net.key_summary("site", "K@branch").await.is_none());
    net.assert_safe(&licenses).await;
    let mut minutes = 0;
    while net.key_summary("hq", "K").await.unwrap().donated_out > 0 {
        assert!(minutes < 60, "the licenses never came back");
        net.advance(60_000);
        minutes += 1;
        for id in ["site", "branch", "hq"] {
            net.tick(id).await;
        }
    }
    assert!(minutes >= 10, "not before the site's stations stopped");
    assert!(net.key_summary("branch", "K@hq").await.is_none());
    assert!(net.admin("branch").donations().await.unwrap().is_empty());
    let own = net.key_summary("hq", "K").await.unwrap();
    assert_eq!((own.donated_out, own.free), (0, 10));
    net.assert_safe(&licenses).await;
    assert_eq!(net.checkouts("hq", "h", 12).await, 10);
    net.assert_safe(&licenses).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smaller_donation_is_counted_as_the_child_can_use_it() {
    let net = Net::start(&[
        ("hq", vec![child("branch")]),
        ("branch", vec![parent("hq")]),
    ])
    .await;
    let licenses = BTreeMap::from([("K", 10)]);
    let hq = net.admin("hq");
    hq.import_key(net.key("K", 10).to_json_pretty())
        .await
        .unwrap();
    let far = until(START_MS + 10 * 86_400_000);
    let first = hq.donate("K", "branch", 4, &far).await.unwrap();
    assert_eq!(net.checkouts("branch", "b", 4).await, 4);
    let lowered = hq.donate("K", "branch", 2, &far).await.unwrap();
    assert_eq!(lowered.licenses, 2);
    assert!(lowered.serial > first.serial);
    net.assert_safe(&licenses).await;
    // Whatever the child may still use of the larger grant, the parent still counts; once
    // the larger grant has lapsed both sides count the smaller one.
    for _ in 0..6 {
        let donated = net.key_summary("hq", "K").await.unwrap().donated_out;
        let usable = net.key_summary("branch", "K@hq").await.unwrap().licenses;
        assert!(
            usable <= donated,
            "child may use {usable}, parent counts {donated}"
        );
        net.advance(15 * 60_000);
        net.tick("branch").await;
        net.tick("hq").await;
        net.assert_safe(&licenses).await;
    }
    assert_eq!(net.key_summary("hq", "K").await.unwrap().donated_out, 2);
    assert_eq!(net.key_summary("branch", "K@hq").await.unwrap().licenses, 2);
    assert!(net.messages("hq", "license_mismatch").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_periodic_connection_renews_at_its_period_and_before_the_grant_ends() {
    let periodic = Connection::Periodic {
        reconnect_period: Duration::from_secs(3 * 3600),
    };
    let net = Net::start_with(
        &[
            ("hq", vec![child("branch")]),
            ("branch", vec![parent("hq")]),
        ],
        |_, config| {
            for neighbour in &mut config.neighbours {
                neighbour.connection = periodic;
            }
        },
    )
    .await;
    let hq = net.admin("hq");
    hq.import_key(net.key("K", 10).to_json_pretty())
        .await
        .unwrap();
    let donated = hq
        .donate("K", "branch", 4, &until(START_MS + 10 * 86_400_000))
        .await
        .unwrap();
    let serial = || async { hq.donations().await.unwrap()[0].serial };
    // The first contact comes at once.
    assert!(net.tick("branch").await.is_empty());
    let contacted = serial().await;
    assert!(contacted > donated.serial);
    // Half of the one-hour grant gone: a permanent link would renew, a periodic one waits.
    net.advance(31 * 60_000);
    assert!(net.tick("branch").await.is_empty());
    assert_eq!(serial().await, contacted);
    // Less than the preliminary renewal interval (10 min) left: it renews early.
    net.advance(19 * 60_000 + 1000);
    assert!(net.tick("branch").await.is_empty());
    assert!(serial().await > contacted);
    // The parent contacts a periodic neighbour at most every reconnect period.
    let pushed = net.neighbour_view("branch", "hq").await.last_contact;
    net.advance(20 * 60_000);
    net.tick("hq").await;
    assert_eq!(
        net.neighbour_view("branch", "hq").await.last_contact,
        pushed,
        "no push within the reconnect period"
    );
    net.assert_safe(&BTreeMap::from([("K", 10)])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reports_count_the_stations_of_the_grant_at_the_donors_periods() {
    let net = Net::start_with(
        &[
            ("hq", vec![child("branch")]),
            ("branch", vec![parent("hq")]),
        ],
        |id, config| {
            if id == "hq" {
                config.licenses.usage_report_period = Duration::from_secs(2 * 3600);
                config.licenses.active_station_period = Duration::from_secs(86_400);
            } else {
                // The child's own setting is used only until the parent's is known.
                config.licenses.usage_report_period = Duration::from_secs(60);
            }
        },
    )
    .await;
    let hq = net.admin("hq");
    hq.import_key(net.key("K", 10).to_json_pretty())
        .await
        .unwrap();
    hq.donate("K", "branch", 4, &until(START_MS + 10 * 86_400_000))
        .await
        .unwrap();
    // A key of the child's own for another component: not the parent's business.
    net.admin("branch")
        .import_key(net.key_for("L", &["cam"], 5).to_json_pretty())
        .await
        .unwrap();
    let branch = Client::new(&net.server("branch").url(), None).sharing_secrets(&net.secrets);
    branch.checkout(&request("cad", "ws-1")).await.unwrap();
    let (gone, _) = branch.checkout(&request("cad", "ws-2")).await.unwrap();
    branch.checkin(&gone.lease_id).await.unwrap();
    branch.checkout(&request("cam", "ws-9")).await.unwrap();

    assert!(net.tick("branch").await.is_empty());
    let usage = net.neighbour_view("hq", "branch").await.usage.unwrap();
    assert_eq!(
        usage.active_stations,
        BTreeMap::from([("cad".to_string(), 2)])
    );
    assert_eq!(usage.in_use, BTreeMap::from([("cad".to_string(), 1)]));
    assert_eq!(usage.period_s, 86_400);
    let first = usage.at;
    // Renewals every half hour; the next report only after the parent's two hours.
    for _ in 0..3 {
        net.advance(31 * 60_000);
        assert!(net.tick("branch").await.is_empty());
        net.tick("hq").await;
        let usage = net.neighbour_view("hq", "branch").await.usage.unwrap();
        assert_eq!(usage.at, first);
    }
    net.advance(31 * 60_000);
    assert!(net.tick("branch").await.is_empty());
    let usage = net.neighbour_view("hq", "branch").await.usage.unwrap();
    assert!(usage.at > first);
    // The leases expired meanwhile (no heartbeats), but the stations were active within
    // the counting period.
    assert_eq!(
        usage.active_stations,
        BTreeMap::from([("cad".to_string(), 2)])
    );
    assert!(usage.in_use.is_empty(), "{usage:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parents_sync_finds_a_grant_the_child_dropped_behind_its_back() {
    let (net, hq) = Net::hq_and_branch().await;
    hq.donate("K", "branch", 4, &until(START_MS + 10 * 86_400_000))
        .await
        .unwrap();
    net.advance(60_000);
    assert!(
        net.tick("hq").await.is_empty(),
        "nothing due before sync_period"
    );
    // The child's records lose the grant without the link knowing.
    tamper(
        &net,
        "branch",
        tessera_core::Command::ReleaseGrant {
            key_id: "K@hq".into(),
        },
    )
    .await;
    net.advance(10 * 60_000);
    let errors = net.tick("hq").await;
    assert!(
        errors.iter().any(|e| e.contains("grant_replayed")),
        "{errors:?}"
    );
    let mismatches = net.messages("hq", "license_mismatch").await;
    assert_eq!(mismatches.len(), 1, "{mismatches:?}");
    assert!(
        mismatches[0].contains("neighbour branch reports 0 licenses of key K received")
            && mismatches[0].contains("this server counts 4 donated"),
        "{}",
        mismatches[0]
    );
    let view = net.neighbour_view("hq", "branch").await;
    assert!(view.last_mismatch.unwrap().contains("counts 4 donated"));
    assert!(view.last_error.unwrap().contains("grant_replayed"));
    assert!(
        net.metrics("hq")
            .await
            .contains("tessera_neighbour_mismatches_total{neighbour=\"branch\"} 1")
    );
    // The same difference is not notified again every sync period.
    net.advance(10 * 60_000);
    net.tick("hq").await;
    assert_eq!(net.messages("hq", "license_mismatch").await.len(), 1);
    net.assert_safe(&BTreeMap::from([("K", 10)])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_metrics_and_the_console_show_the_network() {
    let net = Net::start(&[
        ("hq", vec![child("branch")]),
        ("branch", vec![parent("hq")]),
    ])
    .await;
    let identity: tessera_api::Identity =
        reqwest::get(format!("{}/v1/identity", net.server("hq").url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(identity.server_id.as_deref(), Some("hq"));
    let openapi: serde_json::Value =
        reqwest::get(format!("{}/v1/openapi.json", net.server("hq").url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    for path in [
        "/v1/identity",
        "/v1/neighbours",
        "/v1/neighbours/grants",
        "/v1/neighbours/renew",
        "/v1/donations",
        "/v1/donations/{key_id}/{to}",
    ] {
        assert!(openapi["paths"][path].is_object(), "{path}");
    }
    for schema in [
        "NeighbourEnvelope",
        "HeldGrant",
        "ReturnedGrant",
        "DonorSettings",
        "DonateRequest",
        "NeighbourSummary",
    ] {
        assert!(
            openapi["components"]["schemas"][schema].is_object(),
            "{schema}"
        );
    }
    assert_eq!(
        identity.public_key,
        net.nodes["hq"].secret.public_key().to_base64()
    );
    let hq = net.admin("hq");
    hq.import_key(net.key("K", 10).to_json_pretty())
        .await
        .unwrap();
    hq.donate("K", "branch", 4, &until(START_MS + 10 * 86_400_000))
        .await
        .unwrap();
    net.checkouts("branch", "b", 1).await;
    net.tick("branch").await;
    let metrics = net.metrics("hq").await;
    assert!(
        metrics.contains("tessera_key_licenses_donated{key=\"K\"} 4"),
        "{metrics}"
    );
    let metrics = net.metrics("branch").await;
    assert!(
        metrics.contains("tessera_key_licenses_received{key=\"K@hq\"} 4")
            && metrics.contains("tessera_key_licenses_in_use{key=\"K@hq\"} 1"),
        "{metrics}"
    );

    // The console of each side.
    let http = tessera_tls::client_builder_exactly(None)
        .unwrap()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = |id: &str| {
        let server = net.server(id);
        let url = format!(
            "{}/login?token={}&next=/neighbours",
            server.url(),
            server.state.admin_token
        );
        let http = http.clone();
        async move {
            let response = http.get(url).send().await.unwrap();
            assert_eq!(response.status(), 303);
            response.headers()["set-cookie"]
                .to_str()
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .to_string()
        }
    };
    let page = |id: &str, cookie: String| {
        let url = format!("{}/neighbours", net.server(id).url());
        let http = http.clone();
        async move {
            let response = http.get(url).header("cookie", cookie).send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.text().await.unwrap()
        }
    };
    let hq_cookie = login("hq").await;
    let html = page("hq", hq_cookie.clone()).await;
    assert!(html.contains("id=\"neighbour-branch\""), "{html}");
    assert!(html.contains("Donated to branch"), "{html}");
    assert!(
        html.contains("<td>K</td><td>4</td><td>4</td><td>active</td>"),
        "{html}"
    );
    assert!(html.contains("Usage reported by branch"), "{html}");
    assert!(html.contains("<td>cad</td><td>1</td><td>1</td>"), "{html}");
    assert!(html.contains(&identity.public_key), "{html}");
    assert!(html.contains("class=\"active\">Neighbours"), "{html}");
    let branch_cookie = login("branch").await;
    let html = page("branch", branch_cookie).await;
    assert!(html.contains("Received from hq"), "{html}");
    assert!(html.contains("<td>K@hq</td><td>4</td><td>1</td>"), "{html}");

    // Donating and ending from the console (with the session's CSRF token).
    let marker = "name=\"csrf\" value=\"";
    let csrf = {
        let html = page("hq", hq_cookie.clone()).await;
        let start = html.find(marker).unwrap() + marker.len();
        html[start..start + 64].to_string()
    };
    let post = |path: &str, body: String| {
        let url = format!("{}{path}", net.server("hq").url());
        let http = http.clone();
        let cookie = hq_cookie.clone();
        async move {
            let response = http
                .post(url)
                .header("cookie", cookie)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body)
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let (status, html) = post(
        "/neighbours/donate",
        format!("csrf={csrf}&key_id=K&to=branch&licenses=20&until=2027-02-01"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(html.contains("class=\"error\""), "{html}");
    let (status, html) = post(
        "/neighbours/donate",
        format!("csrf={csrf}&key_id=K&to=branch&licenses=3&until=2027-02-01"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        html.contains("3 licenses of K donated to branch until 2027-02-01 23:59:59 UTC"),
        "{html}"
    );
    let (status, html) = post("/neighbours/end", format!("csrf={csrf}&key_id=K&to=branch")).await;
    assert_eq!(status, 200);
    assert!(html.contains("The donation of K to branch ended"), "{html}");
    let (status, _) = post("/neighbours/end", "csrf=wrong&key_id=K&to=branch".into()).await;
    assert_eq!(status, 400);
    net.assert_safe(&BTreeMap::from([("K", 10)])).await;
}

/// A renewal of the donor's key carries its donation to the renewal key, and the child that
/// receives licenses from it notifies too (the manual: every server that received a new key).
#[tokio::test]
async fn a_child_receiving_licenses_from_a_renewal_key_notifies_key_updated() {
    let (net, hq) = Net::hq_and_branch().await;
    hq.donate("K", "branch", 4, &until(START_MS + 10 * 86_400_000))
        .await
        .unwrap();
    assert_eq!(net.key_summary("branch", "K@hq").await.unwrap().received, 4);
    assert!(net.messages("branch", "key_updated").await.is_empty());
    hq.import_key(net.renewal_of("K", "K2", 10).to_json_pretty())
        .await
        .unwrap();
    let report = hq.update_keys().await.unwrap();
    assert!(report.renewals[0].allocated, "{report:?}");
    // The donation moved to K2; the next exchange hands the child a grant of it.
    net.exchange_until("branch receives K2", || async {
        net.key_summary("branch", "K2@hq").await.is_some()
    })
    .await;
    assert_eq!(
        net.key_summary("branch", "K2@hq").await.unwrap().received,
        4
    );
    let updated = net.messages("branch", "key_updated").await;
    assert_eq!(updated.len(), 1, "{updated:?}");
    assert!(
        updated[0].contains("license key K renewed") && updated[0].contains("K2"),
        "{updated:?}"
    );
}

/// The manual: "If a neighbouring Server has not received licenses from a new key, then the
/// available licenses are checked automatically approximately every minute." A renewal whose
/// licenses are all in use cannot carry a donation at once: the notification names it, and
/// the donation follows once licenses are free, within about a minute.
#[tokio::test]
async fn a_donation_a_renewal_cannot_carry_is_named_and_retried_about_every_minute() {
    let (net, hq) = Net::hq_and_branch().await;
    hq.donate("K", "branch", 4, &until(START_MS + 10 * 86_400_000))
        .await
        .unwrap();
    assert_eq!(net.checkouts("hq", "s", 6).await, 6); // K: 6 leases + 4 donated = 10
    hq.import_key(net.renewal_of("K", "K2", 10).to_json_pretty())
        .await
        .unwrap();
    // Five more stations take K2 (K is full): the renewal has 5 free.
    assert_eq!(net.checkouts("hq", "t", 5).await, 5);
    let report = hq.update_keys().await.unwrap();
    assert!(report.renewals[0].allocated, "{report:?}");
    let updated = net.messages("hq", "key_updated").await;
    assert!(
        updated
            .iter()
            .any(|m| m.contains("4 licenses for neighbour branch")
                && m.contains("about every minute")),
        "{updated:?}"
    );
    assert!(net.key_summary("branch", "K2@hq").await.is_none());
    // Four stations of K2 check in; within about a minute the donation follows.
    let status = hq.status().await.unwrap();
    for lease in status
        .leases
        .iter()
        .filter(|l| l.station.starts_with("t-"))
        .take(4)
    {
        hq.checkin(&lease.lease_id).await.unwrap();
    }
    net.advance(30_000);
    net.tick("hq").await;
    assert!(
        hq.donations()
            .await
            .unwrap()
            .iter()
            .all(|d| d.key_id != "K2"),
        "tried again before the minute"
    );
    net.advance(31_000);
    net.tick("hq").await;
    net.exchange_until("branch receives K2", || async {
        net.key_summary("branch", "K2@hq").await.is_some()
    })
    .await;
    assert_eq!(
        net.key_summary("branch", "K2@hq").await.unwrap().received,
        4
    );
}

/// The issue (#18, 2): a renewal key bought in advance was "allocated to every object,
/// neighbours included", yet the child held nothing once the old key ended. Now the donor
/// gives the child the renewal's grant in advance, and the child's pool of it takes over
/// exactly when the old pool stops: the station heartbeating on the child keeps its lease
/// id across the old key's end, new stations are served throughout, and the two keys
/// together never count more than their licenses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_childs_leases_and_donation_continue_onto_a_renewal_bought_in_advance() {
    let (net, hq) = Net::hq_and_branch().await;
    let k_end = START_MS + 30 * 86_400_000;
    hq.donate("K", "branch", 4, &until(k_end)).await.unwrap();
    // K2 renews K from K's end on (bought in advance).
    let k2 = net.renewal_from("K", "K2", k_end);
    hq.import_key(k2.to_json_pretty()).await.unwrap();
    let report = hq.update_keys().await.unwrap();
    assert!(report.renewals[0].allocated, "{report:?}");
    // The donation has its twin on K2 at once, running to K2's end.
    let donations = hq.donations().await.unwrap();
    let twin = donations
        .iter()
        .find(|d| d.key_id == "K2")
        .expect("the donation continues on the renewal");
    assert_eq!(twin.licenses, 4);
    net.exchange_until("branch holds K2's grant, pending", || async {
        net.key_summary("branch", "K2@hq")
            .await
            .is_some_and(|k| k.state == "pending" && k.received == 4)
    })
    .await;

    // Close to K's end, a station on branch holds a lease of K@hq.
    net.advance(k_end - 2 * 3_600_000 - START_MS - 60_000);
    net.exchange_until("branch holds K again", || async {
        net.key_summary("branch", "K@hq")
            .await
            .is_some_and(|k| k.state == "active" && k.received == 4)
    })
    .await;
    let station = Client::new(&net.server("branch").url(), None).sharing_secrets(&net.secrets);
    let (lease, _) = station.checkout(&request("cad", "ws-1")).await.unwrap();
    assert_eq!(lease.key_id, "K@hq");
    let mut key_ids = BTreeSet::new();
    // Four minutes at a time to half an hour past K's end: the timers run, the station
    // heartbeats, and a new station is served at every step.
    let mut step = 0;
    while net.server("hq").state.stamper.now_ms() < k_end + 1_800_000 {
        step += 1;
        net.advance(240_000);
        // Each server's timer writes an entry when a takeover is due (the branch first, so
        // the safety check never looks at it before its timer ran).
        net.tick("branch").await;
        net.tick("hq").await;
        net.tick("branch").await;
        let beat = station
            .heartbeat(&lease.lease_id)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "step {step}: the lease was lost at {}: {e}",
                    net.server("branch").state.stamper.now_ms() - k_end
                )
            });
        key_ids.insert(beat.key_id.clone());
        let (probe, _) = station
            .checkout(&request("cad", &format!("probe-{step}")))
            .await
            .unwrap_or_else(|e| panic!("step {step}: no license for a new station: {e}"));
        station.checkin(&probe.lease_id).await.unwrap();
        // K and K2 are the same licenses: together never more than 10.
        let mut in_use = 0;
        for id in ["hq", "branch"] {
            let status = Client::new(&net.server(id).url(), None)
                .status()
                .await
                .unwrap();
            in_use += status.keys.iter().map(|k| k.in_use).sum::<u32>();
        }
        assert!(in_use <= 10, "step {step}: {in_use} leases of K and K2");
    }
    assert_eq!(
        key_ids,
        ["K2@hq".to_string(), "K@hq".to_string()].into(),
        "the lease moved from K@hq to K2@hq under the same id"
    );
    let k2_pool = net.key_summary("branch", "K2@hq").await.unwrap();
    assert_eq!(
        (k2_pool.state.as_str(), k2_pool.received, k2_pool.in_use),
        ("active", 4, 1)
    );
}

/// The issue (#18, 2): "a donation cannot run past the current key's end and cannot be set on
/// the pending renewal key". With a renewal allocated in advance, both work: a donation past
/// the old key's end runs on the old key to its end and on the renewal after it (one twin,
/// edited and ended with it), and the renewal itself can be donated. A key that is merely
/// not valid yet still cannot.
#[tokio::test]
async fn donations_reach_past_the_old_keys_end_onto_a_renewal_bought_in_advance() {
    let (net, hq) = Net::hq_and_branch().await;
    let k_end = START_MS + 30 * 86_400_000;
    let day = 86_400_000;
    hq.import_key(net.renewal_from("K", "K2", k_end).to_json_pretty())
        .await
        .unwrap();
    assert!(hq.update_keys().await.unwrap().renewals[0].allocated);
    let ends = |key_id: &'static str| {
        let hq = hq.clone();
        async move {
            hq.donations()
                .await
                .unwrap()
                .into_iter()
                .find(|d| d.key_id == key_id && d.state != "ended")
                .map(|d| (d.licenses, d.donation_until))
        }
    };
    let until_text = |ms: i64| jiff::Timestamp::from_millisecond(ms).unwrap();
    hq.donate("K", "branch", 3, &until(k_end + 10 * day))
        .await
        .unwrap();
    assert_eq!(ends("K").await, Some((3, until_text(k_end))));
    assert_eq!(ends("K2").await, Some((3, until_text(k_end + 10 * day))));
    // Edited through the old key: the twin follows.
    hq.donate("K", "branch", 2, &until(k_end + 20 * day))
        .await
        .unwrap();
    assert_eq!(ends("K2").await, Some((2, until_text(k_end + 20 * day))));
    // Past the renewal's end: refused, naming both keys, nothing changed.
    let refused = hq
        .donate("K", "branch", 2, &until(k_end + 40 * day))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("donation_refused"), "{refused}");
    assert!(refused.to_string().contains("renewal K2"), "{refused}");
    assert_eq!(ends("K2").await, Some((2, until_text(k_end + 20 * day))));
    // The renewal itself can be donated (here: changed) before it starts.
    hq.donate("K2", "branch", 4, &until(k_end + 5 * day))
        .await
        .unwrap();
    assert_eq!(ends("K2").await, Some((4, until_text(k_end + 5 * day))));
    // Ending the old key's donation ends its twin.
    hq.end_donation("K", "branch").await.unwrap();
    assert_eq!(ends("K").await, None);
    assert_eq!(ends("K2").await, None);
    // A key merely not valid yet (no renewal of anything) cannot be donated.
    let mut payload = net.key("LATER", 5).payload.clone();
    payload.valid_from = jiff::Timestamp::from_millisecond(START_MS + day).unwrap();
    let later = LicenseKey::sign(payload, &net.vendor).unwrap();
    hq.import_key(later.to_json_pretty()).await.unwrap();
    let refused = hq
        .donate("LATER", "branch", 1, &until(START_MS + 2 * day))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("not active"), "{refused}");
}

/// A renewal that starts long before the old key ends: once it starts, the child's pool of
/// it takes over the old pool's stations and the old pool serves no more, so the child never
/// serves the donation twice (once from each key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_never_serves_a_donation_twice_from_the_old_and_the_renewal_pool() {
    let (net, hq) = Net::hq_and_branch().await;
    let k_end = START_MS + 30 * 86_400_000;
    hq.donate("K", "branch", 4, &until(k_end)).await.unwrap();
    let k2_start = START_MS + 86_400_000;
    hq.import_key(net.renewal_from("K", "K2", k2_start).to_json_pretty())
        .await
        .unwrap();
    assert!(hq.update_keys().await.unwrap().renewals[0].allocated);
    net.exchange_until("branch holds K2's grant", || async {
        net.key_summary("branch", "K2@hq").await.is_some()
    })
    .await;
    assert_eq!(net.checkouts("branch", "early", 6).await, 4);
    // Half an hour before K2 starts, both grants are renewed (for an hour)…
    net.advance(k2_start - START_MS - 1_800_000);
    net.tick("branch").await; // the early leases ran out long ago
    net.exchange_until("branch holds both grants, renewed", || async {
        net.key_summary("branch", "K@hq")
            .await
            .is_some_and(|k| k.state == "active" && k.received == 4)
            && net
                .key_summary("branch", "K2@hq")
                .await
                .is_some_and(|k| k.state == "pending")
    })
    .await;
    // …so just after K2 starts, the branch holds two usable grants of the same licenses.
    net.advance(1_800_000 + 60_000);
    let granted = net.checkouts("branch", "late", 10).await;
    let status = Client::new(&net.server("branch").url(), None)
        .status()
        .await
        .unwrap();
    let in_use: u32 = status.keys.iter().map(|k| k.in_use).sum();
    assert!(
        in_use <= 4,
        "the branch serves {in_use} leases of a donation of 4 ({granted} new)"
    );
}

/// Attack T10: the customer owns the donor and signs a grant with its `server.key` that the
/// donor's ledger never issued (serial after the real one, 6 licenses for a donation of 2).
/// The receiver takes it (its signature is the donor's); both servers report their link
/// histories at sync, and at the donor's first sync after the forged serial's time the
/// vendor sees `grant_forged` naming the receiver, the key, the serial and the count. A
/// grant numbered far ahead of the receiver's clock (to make every real grant after it a
/// replay) is refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_signed_outside_the_donors_ledger_is_reported_to_the_vendor() {
    let vendor_dir = tempfile::tempdir().unwrap();
    let vendor_clock = ManualClock::new(START_MS);
    let (authority, hq) = super::authority_with_a_server_id(vendor_dir.path(), &vendor_clock).await;
    let branch = super::register_server_id(&authority).await;
    let vendor_pub = vendor_dir.path().join("authority").join("vendor.pub");
    let url = authority.url();
    let net = Net::start_with(
        &[(&hq, vec![child(&branch)]), (&branch, vec![parent(&hq)])],
        |_, config| {
            config.trust.push(vendor_pub.clone());
            config.authority = Some(url.clone());
        },
    )
    .await;
    let pool = format!("K@{hq}");
    let admin = net.admin(&hq);
    admin
        .import_key(net.key("K", 10).to_json_pretty())
        .await
        .unwrap();
    let far = until(START_MS + 10 * 86_400_000);
    admin.donate("K", &branch, 2, &far).await.unwrap();
    assert_eq!(net.key_summary(&branch, &pool).await.unwrap().licenses, 2);
    let alerts = || super::vendor_alerts(&authority, "grant_forged");
    let sync = |id: &str| {
        let state = net.server(id).state.clone();
        async move { state.sync_online().await.unwrap() }
    };
    sync(&hq).await;
    sync(&branch).await;
    assert!(alerts().await.is_empty());

    // Signed with hq's identity key, outside hq's ledger.
    let forge = |serial_ahead_ms: u64, licenses: u32| {
        net.server(&hq).state.consensus.read(|ledger| {
            let (source, mut payload) = ledger.grant_to_sign("K", &branch).unwrap();
            payload.serial += serial_ahead_ms;
            payload.licenses = licenses;
            Grant::issue(source, payload, &net.nodes[&hq].secret)
        })
    };
    let push = |grant: Grant| {
        let envelope = net.envelope(
            &hq,
            &branch,
            "grants",
            &GrantsPush {
                grants: vec![grant],
                returned_request: false,
            },
        );
        let branch = branch.clone();
        let net = &net;
        async move {
            let (status, body) = net.post(&branch, "/v1/neighbours/grants", &envelope).await;
            assert_eq!(status, 200, "{body}");
            serde_json::from_value::<tessera_server::neighbours::HeldAnswer>(body["body"].clone())
                .unwrap()
        }
    };
    let ahead = push(forge(2 * 86_400_000, 6)).await;
    assert!(
        ahead
            .refused
            .iter()
            .any(|r| r.contains("grant_serial_ahead")),
        "{:?}",
        ahead.refused
    );
    let forged_serial = net
        .server(&hq)
        .state
        .consensus
        .read(|ledger| ledger.grant_to_sign("K", &branch).unwrap().1.serial + 5_000);
    let taken = push(forge(5_000, 6)).await;
    assert!(taken.refused.is_empty(), "{:?}", taken.refused);
    assert_eq!(net.key_summary(&branch, &pool).await.unwrap().licenses, 6);
    // The receiver reports it; the donor's last report is older than the forged serial: not
    // judged yet.
    sync(&branch).await;
    assert!(alerts().await.is_empty());
    // The donor syncs later, having issued nothing since: every grant its ledger issued
    // before that time is in its report (serials are its time in ms), the forged one is not.
    net.advance(10 * 60_000);
    vendor_clock.advance_ms(10 * 60_000);
    sync(&hq).await;
    let found = alerts().await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["server_id"], branch.as_str());
    let detail = found[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("serial {forged_serial} for 6 licenses"))
            && detail.contains(&format!("from {hq}"))
            && detail.contains("never issued"),
        "{detail}"
    );
    // Both sides sync again: the same forgery is not reported twice.
    sync(&branch).await;
    sync(&hq).await;
    assert_eq!(alerts().await.len(), 1);

    // On the receiver itself, with no sync: the donor's next real grant names the serial
    // before it on the link, which skips the forged one.
    assert!(net.messages(&branch, "grant_forged").await.is_empty());
    net.advance(40 * 60_000);
    vendor_clock.advance_ms(40 * 60_000);
    net.tick(&branch).await;
    let events = net.messages(&branch, "grant_forged").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        events[0].contains(&format!(
            "held grant serial {forged_serial} of key K from {hq}"
        )),
        "{}",
        events[0]
    );
}

/// Attack T5 on a child that never syncs itself: its data directory is put back to a copy
/// taken before its checkouts, to issue those seats again. Each usage report it sends its
/// donor states its ledger's counters (with the time of the ledger's last entry); the donor
/// relays them at its own sync, and the vendor, holding an earlier report with more leases
/// issued, raises `ledger_rewound` on the child's server ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_put_back_to_a_copy_is_reported_to_the_vendor_through_its_donor() {
    let vendor_dir = tempfile::tempdir().unwrap();
    let vendor_clock = ManualClock::new(START_MS);
    let (authority, hq) = super::authority_with_a_server_id(vendor_dir.path(), &vendor_clock).await;
    let branch = super::register_server_id(&authority).await;
    let vendor_pub = vendor_dir.path().join("authority").join("vendor.pub");
    let url = authority.url();
    let mut net = Net::start_with(
        &[(&hq, vec![child(&branch)]), (&branch, vec![parent(&hq)])],
        |id, config| {
            config.trust.push(vendor_pub.clone());
            // The child is air-gapped: only its donor talks to the vendor.
            if id == hq {
                config.authority = Some(url.clone());
            }
        },
    )
    .await;
    let admin = net.admin(&hq);
    admin
        .import_key(net.key("K", 10).to_json_pretty())
        .await
        .unwrap();
    admin
        .donate("K", &branch, 4, &until(START_MS + 10 * 86_400_000))
        .await
        .unwrap();
    // hq is never stopped: its state serves every sync.
    let hq_state = net.server(&hq).state.clone();
    let sync_hq = || {
        let state = hq_state.clone();
        async move { state.sync_online().await.unwrap() }
    };
    sync_hq().await;

    // The customer's copy of the child's data directory, before its checkouts.
    net.stop(&branch).await;
    let data = net.nodes[&branch].config.data_dir.clone();
    let copy = net.dir.path().join("branch-copy");
    // (Put back at the same path, the same host: the same installation, as a customer's
    // restore is.)
    let status = std::process::Command::new("cp")
        .args(["-a", data.to_str().unwrap(), copy.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let address = net.nodes[&hq].config.neighbours[0]
        .url
        .trim_start_matches("http://")
        .to_string();
    net.boot(&branch, TcpListener::bind(&address).await.unwrap())
        .await;

    assert_eq!(net.checkouts(&branch, "ws", 3).await, 3);
    net.tick(&branch).await;
    let relayed = net.server(&hq).state.consensus.read(|ledger| {
        ledger.usage_reports()[&branch]
            .heads
            .clone()
            .expect("the report states the child's heads")
    });
    assert_eq!(relayed.counters.leases_issued, 3);
    sync_hq().await;
    let alerts = || super::vendor_alerts(&authority, "ledger_rewound");
    assert!(alerts().await.is_empty());

    // Put back where it was, started again: it issues the same seats again and reports as
    // before.
    net.stop(&branch).await;
    std::fs::remove_dir_all(&data).unwrap();
    let status = std::process::Command::new("cp")
        .args(["-a", copy.to_str().unwrap(), data.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    net.boot(&branch, TcpListener::bind(&address).await.unwrap())
        .await;
    net.advance(10 * 60_000);
    vendor_clock.advance_ms(10 * 60_000);
    assert_eq!(net.checkouts(&branch, "again", 1).await, 1);
    net.tick(&branch).await;
    assert!(
        alerts().await.is_empty(),
        "nothing is known before the donor syncs"
    );
    sync_hq().await;
    let found = alerts().await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["server_id"], branch.as_str());
    let detail = found[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("states 1 leases issued")
            && detail.contains("but 3")
            && detail.contains(&format!("in its usage report to {hq}")),
        "{detail}"
    );
}
