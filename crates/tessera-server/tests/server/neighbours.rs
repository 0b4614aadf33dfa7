//! Donations between license servers: parent, children, grandchild and peers, each a real
//! server on loopback with its own data directory and its own manual clock.

use std::collections::BTreeMap;
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
}

impl Net {
    /// Starts one server per entry, each knowing the neighbours listed for it.
    async fn start(specs: &[(&str, Vec<Link<'_>>)]) -> Net {
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
            let config = ServerConfig {
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
        let mut net = Net { dir, vendor, nodes };
        for (id, listener) in listeners {
            net.boot(&id, listener).await;
        }
        net
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
    }

    fn key(&self, key_id: &str, licenses: u32) -> LicenseKey {
        sign(
            &self.vendor,
            key_id,
            &["cad"],
            licenses,
            START_MS + 30 * 86_400_000,
            None,
        )
    }

    fn advance(&self, ms: i64) {
        for node in self.nodes.values() {
            node.clock.advance_ms(ms);
        }
    }

    async fn tick(&self, id: &str) -> Vec<String> {
        let state = &self.server(id).state;
        state.tick().await.unwrap();
        state.neighbour_tick().await
    }

    async fn checkouts(&self, id: &str, prefix: &str, count: usize) -> usize {
        let client = Client::new(&self.server(id).url(), None);
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
        granted
    }

    /// The key (or received pool) summary of a server.
    async fn key_summary(&self, id: &str, key_id: &str) -> Option<tessera_api::KeySummary> {
        let status = self.admin(id).status().await.unwrap();
        status.keys.into_iter().find(|k| k.key_id == key_id)
    }

    /// The safety property: for every vendor key, leases held anywhere ≤ its licenses.
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
        let response = reqwest::Client::new()
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
    branch.donate("K@hq", "site", 3, &far).await.unwrap();
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
    assert_eq!(
        net.admin("branch").donations().await.unwrap()[0].serial,
        2,
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
            &net.envelope("west", "east", "grants", &GrantsPush { grants: vec![] }),
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "neighbour_not_allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_renew_while_the_child_lives_and_come_back_when_it_is_gone() {
    let mut net = Net::start(&[
        ("hq", vec![child("branch")]),
        ("branch", vec![parent("hq")]),
    ])
    .await;
    let hq = net.admin("hq");
    hq.import_key(net.key("K", 10).to_json_pretty())
        .await
        .unwrap();
    hq.donate("K", "branch", 4, &until(START_MS + 10 * 86_400_000))
        .await
        .unwrap();
    assert_eq!(net.checkouts("branch", "b", 4).await, 4);
    // Past half of the one-hour grant the child asks for a renewal.
    net.advance(35 * 60_000);
    assert!(net.tick("branch").await.is_empty());
    let donation = &hq.donations().await.unwrap()[0];
    assert_eq!(donation.serial, 2);
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
    let net = Net::start(&[
        ("hq", vec![child("branch")]),
        ("branch", vec![parent("hq")]),
    ])
    .await;
    let hq = net.admin("hq");
    hq.import_key(net.key("K", 10).to_json_pretty())
        .await
        .unwrap();
    let end = START_MS + 5 * 60_000;
    hq.donate("K", "branch", 4, &until(START_MS + 10 * HOUR_MS))
        .await
        .unwrap();
    // The end date is editable at any time: moved earlier, the child gets the new grant.
    let changed = hq.donate("K", "branch", 4, &until(end)).await.unwrap();
    assert_eq!(changed.serial, 2);
    let branch = Client::new(&net.server("branch").url(), None);
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
    let net = Net::start(&[
        ("hq", vec![child("branch")]),
        ("branch", vec![parent("hq")]),
    ])
    .await;
    let hq = net.admin("hq");
    hq.import_key(net.key("K", 10).to_json_pretty())
        .await
        .unwrap();
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatch_between_donor_and_receiver_is_detected_and_notified() {
    let mut net = Net::start(&[
        ("hq", vec![child("branch")]),
        ("branch", vec![parent("hq")]),
    ])
    .await;
    let hq = net.admin("hq");
    hq.import_key(net.key("K", 10).to_json_pretty())
        .await
        .unwrap();
    hq.donate("K", "branch", 4, &until(START_MS + 10 * 86_400_000))
        .await
        .unwrap();
    // The child's store is tampered with: its records are wiped (identity kept).
    net.stop("branch").await;
    let data = net.dir.path().join("branch");
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if !name.starts_with("server.") {
            if path.is_dir() {
                std::fs::remove_dir_all(&path).unwrap();
            } else {
                std::fs::remove_file(&path).unwrap();
            }
        }
    }
    // Back on the same address, which the parent knows it by.
    let url = net.nodes["hq"].config.neighbours[0].url.clone();
    let listener = TcpListener::bind(url.trim_start_matches("http://"))
        .await
        .unwrap();
    net.boot("branch", listener).await;
    // Its next contact reports what it holds: nothing, where the parent counts 4.
    net.tick("branch").await;
    let events = hq.events().await.unwrap();
    let mismatch = events
        .iter()
        .find(|e| e["kind"] == "license_mismatch")
        .expect("a license_mismatch event");
    let message = mismatch["message"].as_str().unwrap();
    assert!(
        message.contains("reports 0 licenses of key K") && message.contains("counts 4 donated"),
        "{message}"
    );
    // The renewal answer gave the child its grant back.
    assert_eq!(net.key_summary("branch", "K@hq").await.unwrap().licenses, 4);
}
