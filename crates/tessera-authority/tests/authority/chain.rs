//! The sync chain at the authority (`src/chain.rs`): copies and restored backups of a
//! server's data are refused, alerted, and cleared only by the vendor's reset.

use super::*;

/// What a license server keeps of its sync chain (`SyncState` in the ledger), and where it
/// runs. Cloning it is copying the data directory.
#[derive(Clone)]
struct Copy {
    identity: SecretKey,
    server_id: String,
    installation: String,
    last_response: Option<String>,
    pending_since: Option<u64>,
}

impl Copy {
    fn new(server_id: &str, installation: &str) -> Copy {
        Copy {
            identity: SecretKey::from_seed([7; 32]),
            server_id: server_id.into(),
            installation: installation.into(),
            last_response: None,
            pending_since: None,
        }
    }

    /// The same data directory elsewhere (another host or path).
    fn copied_to(&self, installation: &str) -> Copy {
        Copy {
            installation: installation.into(),
            ..self.clone()
        }
    }

    /// A request with this sequence (`BeginSync`).
    fn request(&mut self, sequence: u64) -> SyncRequest {
        let pending_since = *self.pending_since.get_or_insert(sequence);
        SyncRequest::sign(
            SyncRequestPayload {
                server_id: self.server_id.clone(),
                public_key: self.identity.public_key().to_base64(),
                sequence,
                nonce: format!("n{sequence}"),
                created_at: jiff::Timestamp::from_millisecond(START_MS).unwrap(),
                keys: Vec::new(),
                last_response: self.last_response.clone(),
                pending_since: Some(pending_since),
                installation: Some(self.installation.clone()),
                history: None,
                links: Vec::new(),
                trust: None,
                counters: None,
                relayed: Vec::new(),
            },
            &self.identity,
        )
    }

    /// `CompleteSync`.
    fn accept(&mut self, response: &SyncResponse) {
        self.last_response = Some(response.chain_hash());
        self.pending_since = None;
    }

    /// An online sync, accepted.
    async fn sync(&mut self, h: &Harness, sequence: u64) -> SyncResponse {
        let request = self.request(sequence);
        let response = h.sync(&request).await.unwrap_or_else(|(status, body)| {
            panic!("sync {sequence} of {}: {status} {body}", self.installation)
        });
        self.accept(&response);
        response
    }

    /// An online sync the authority refuses: (status, code, message).
    async fn refused(&mut self, h: &Harness, sequence: u64) -> (u16, String, String) {
        let request = self.request(sequence);
        let (status, body) = h.sync(&request).await.unwrap_err();
        (
            status,
            code(&body).to_string(),
            body["error"]["message"].as_str().unwrap().to_string(),
        )
    }
}

async fn alerts(h: &Harness) -> Vec<Value> {
    let (status, body) = h.admin_get("/v1/alerts").await;
    assert_eq!(status, 200, "{body}");
    body.as_array().unwrap().clone()
}

#[tokio::test]
async fn a_copy_of_the_data_is_refused_as_cloned_and_the_original_goes_on() {
    let h = Harness::new().await;
    let server_id = h.add_server("acme").await;
    let mut original = Copy::new(&server_id, "host-a:/var/lib/tessera");
    original.sync(&h, 1).await;
    let mut copy = original.copied_to("host-b:/var/lib/tessera");
    original.sync(&h, 2).await;

    let (status, code, message) = copy.refused(&h, 3).await;
    assert_eq!((status, code.as_str()), (409, "server_cloned"), "{message}");
    assert!(message.contains(&server_id), "{message}");
    assert!(message.contains("another installation"), "{message}");
    // Nothing moved: the original syncs on from its own head.
    original.sync(&h, 4).await;
    assert_eq!(h.server_row(&server_id).await["last_sequence"], 4);

    // The copy asking again (online or by file) counts on the same alert.
    assert_eq!(copy.refused(&h, 5).await.1, "server_cloned");
    let by_file = copy.request(6);
    let (status, body) = h
        .admin_post("/v1/sync/process", serde_json::to_value(&by_file).unwrap())
        .await;
    assert_eq!((status, super::code(&body)), (409, "server_cloned"));
    let alerts = alerts(&h).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["kind"], "server_cloned");
    assert_eq!(alerts[0]["server_id"], server_id.as_str());
    assert_eq!(alerts[0]["customer"], "acme");
    assert_eq!(alerts[0]["count"], 3);

    // Two copies that never synced: the second one's first sync is the clone.
    let fresh_id = h.add_server("acme").await;
    let mut first = Copy::new(&fresh_id, "host-a:/srv/a");
    let mut second = first.copied_to("host-a:/srv/b");
    first.sync(&h, 10).await;
    assert_eq!(second.refused(&h, 11).await.1, "server_cloned");
}

#[tokio::test]
async fn a_restored_backup_is_refused_as_rolled_back() {
    let h = Harness::new().await;
    let server_id = h.add_server("acme").await;
    let mut server = Copy::new(&server_id, "host-a:/var/lib/tessera");
    let before_first_sync = server.clone();
    server.sync(&h, 1).await;
    let backup = server.clone();
    server.sync(&h, 2).await;
    let one_sync_ago = server.clone();
    server.sync(&h, 3).await;

    // Put back in place: same installation, data from two syncs ago.
    let (status, code, message) = backup.clone().refused(&h, 4).await;
    assert_eq!(
        (status, code.as_str()),
        (409, "server_rolled_back"),
        "{message}"
    );
    assert!(message.contains("this same installation"), "{message}");
    // One sync ago is a rollback too: what a copy taken then would present, but in place.
    one_sync_ago
        .clone()
        .sync_refused_kind(&h, 5, "server_rolled_back")
        .await;
    // A fresh data directory with the identity copied in, in place.
    before_first_sync
        .clone()
        .sync_refused_kind(&h, 6, "server_rolled_back")
        .await;
    // The same backup restored on another machine is a copy.
    backup
        .copied_to("host-c:/var/lib/tessera")
        .sync_refused_kind(&h, 7, "server_cloned")
        .await;
    let kinds: Vec<Value> = alerts(&h).await.iter().map(|a| a["kind"].clone()).collect();
    assert_eq!(
        kinds,
        [
            "server_cloned",
            "server_rolled_back",
            "server_rolled_back",
            "server_rolled_back"
        ]
    );
    // The server itself is unharmed.
    server.sync(&h, 8).await;
}

impl Copy {
    async fn sync_refused_kind(&mut self, h: &Harness, sequence: u64, expected: &str) {
        let (status, code, message) = self.refused(h, sequence).await;
        assert_eq!((status, code.as_str()), (409, expected), "{message}");
    }
}

#[tokio::test]
async fn a_retry_after_a_lost_answer_is_no_clone_but_the_lost_answer_used_later_is() {
    let h = Harness::new().await;
    let server_id = h.add_server("acme").await;
    let mut server = Copy::new(&server_id, "host-a:/var/lib/tessera");
    server.sync(&h, 1).await;
    // The answer to request 2 is lost on the way back...
    let mut holder = server.clone();
    let lost = h.sync(&holder.request(2)).await.unwrap();
    // ...so the server asks again (request 3, still pending since 2): answered.
    server.request(2);
    server.sync(&h, 3).await;
    // And again after one more lost answer, from the first request's point.
    let mut again = server.clone();
    h.sync(&again.request(4)).await.unwrap();
    again.sync(&h, 5).await;
    server = again;
    // The request carrying the lost answer itself, replayed, is a replay, not an alert.
    let (status, body) = h.sync(&server.clone().request(2)).await.unwrap_err();
    assert_eq!((status, code(&body)), (409, "replayed_request"));
    assert!(alerts(&h).await.is_empty());

    // But a copy that did receive the "lost" answer and uses it: two holders.
    holder.accept(&lost);
    holder.sync_refused_kind(&h, 6, "server_cloned").await;
    let alerts = alerts(&h).await;
    assert!(
        alerts[0]["detail"]
            .as_str()
            .unwrap()
            .contains("reported lost"),
        "{alerts:?}"
    );
}

#[tokio::test]
async fn an_older_tessera_is_answered_until_its_server_has_a_chain() {
    let h = Harness::new().await;
    let server_id = h.add_server("acme").await;
    let identity = SecretKey::from_seed([7; 32]);
    h.sync(&request(&identity, &server_id, 1, &[]))
        .await
        .unwrap();
    h.sync(&request(&identity, &server_id, 2, &[]))
        .await
        .unwrap();
    // Upgraded: its first chained request starts the chain from what it holds.
    let mut server = Copy::new(&server_id, "host-a:/d");
    server.last_response = Some("a response from before the chain".into());
    server.sync(&h, 3).await;
    server.sync(&h, 4).await;
    // Downgraded (or its data from before the upgrade put back): refused.
    let (status, body) = h
        .sync(&request(&identity, &server_id, 5, &[]))
        .await
        .unwrap_err();
    assert_eq!((status, code(&body)), (409, "server_rolled_back"));
}

#[tokio::test]
async fn the_vendor_sees_alerts_and_a_reset_lets_the_legitimate_server_sync_again() {
    let h = Harness::new().await;
    let server_id = h.add_server("acme").await;
    let mut original = Copy::new(&server_id, "host-a:/d");
    original.sync(&h, 1).await;
    let mut copy = original.copied_to("host-b:/d");
    original.sync(&h, 2).await;
    copy.sync_refused_kind(&h, 3, "server_cloned").await;

    let (status, _) = h.call(reqwest::Method::GET, "/v1/alerts", None, None).await;
    assert_eq!(status, 401, "alerts are the vendor's");
    let listed: Vec<Value> =
        serde_json::from_str(&tessera(&h, &["alerts", "--json"]).await.unwrap()).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["server_id"], server_id.as_str());
    assert_eq!(listed[0]["kind"], "server_cloned");
    let text = tessera(&h, &["alerts"]).await.unwrap();
    assert!(
        text.contains("server_cloned") && text.contains(&server_id),
        "{text}"
    );

    // The copy is gone; the vendor resets; the legitimate server syncs again.
    let said = tessera(&h, &["server", "reset", &server_id]).await.unwrap();
    assert!(said.contains("sync chain cleared"), "{said}");
    original.sync(&h, 1).await;
    original.sync(&h, 2).await;
    let kinds: Vec<Value> = alerts(&h).await.iter().map(|a| a["kind"].clone()).collect();
    assert_eq!(kinds, ["chain_reset", "server_cloned"]);
    // The copy, should it come back, is refused again.
    copy.sync_refused_kind(&h, 3, "server_cloned").await;

    // The console shows the alerts above everything else.
    let url = h.authority().url();
    let browser = tessera_tls::client_builder_exactly(None)
        .unwrap()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let signed_in = browser
        .get(format!("{url}/login?token={}", h.token()))
        .send()
        .await
        .unwrap();
    let session = signed_in.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let page = browser
        .get(format!("{url}/"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let alerts_at = page.find("<h2>Alerts</h2>").expect("an alerts section");
    assert!(alerts_at < page.find("<h2>Customers</h2>").unwrap());
    assert!(
        page.contains("<span class=warn>server_cloned</span>") && page.contains("chain_reset"),
        "{page}"
    );
}

#[tokio::test]
async fn the_chain_survives_a_restart() {
    let mut h = Harness::new().await;
    let server_id = h.add_server("acme").await;
    let mut server = Copy::new(&server_id, "host-a:/d");
    server.sync(&h, 1).await;
    let copy = server.copied_to("host-b:/d");
    server.sync(&h, 2).await;
    h.restart().await;
    copy.clone().sync_refused_kind(&h, 3, "server_cloned").await;
    server.sync(&h, 4).await;
    assert_eq!(alerts(&h).await.len(), 1);
}

/// A donor relays the counters its receivers stated in their usage reports. The vendor
/// judges them for a receiver the donor reports a link to, of the same customer, at a time
/// the authority has reached; a customer cannot plant points (and false `ledger_rewound`
/// alerts) on another customer's server, nor on a server it does not donate to.
#[tokio::test]
async fn relayed_counters_are_judged_only_for_the_donors_own_receivers() {
    use tessera_core::sync::{LedgerCounters, LinkReport, LinkSide, RelayedHeads, ReportedHeads};
    let h = Harness::new().await;
    let donor = h.add_server("acme").await;
    let receiver = h.add_server("acme").await;
    let stranger = h.add_server("acme").await;
    let victim = h.add_server("other corp").await;
    let relay = |server_id: &str, as_of_ms: i64, leases_issued: u64| RelayedHeads {
        server_id: server_id.into(),
        reported_at: jiff::Timestamp::from_millisecond(as_of_ms).unwrap(),
        heads: ReportedHeads {
            installation: "branch:/var/lib/tessera".into(),
            log: None,
            counters: LedgerCounters {
                leases_issued,
                as_of_ms: Some(as_of_ms),
                leases_held: 0,
                seats_donated: 0,
                keys: 1,
            },
        },
    };
    let link = |to: &str| LinkReport {
        side: LinkSide::Donor,
        donor: donor.clone(),
        receiver: to.into(),
        key_id: "K".into(),
        runs: Vec::new(),
    };
    let mut copy = Copy::new(&donor, "hq:/var/lib/tessera");
    let mut sync = async |sequence: u64, relayed: Vec<RelayedHeads>, links: Vec<LinkReport>| {
        let mut request = copy.request(sequence);
        request.payload.relayed = relayed;
        request.payload.links = links;
        let request = SyncRequest::sign(request.payload, &copy.identity);
        let response = h.sync(&request).await.unwrap();
        copy.accept(&response);
    };
    let day = 86_400_000;
    // Planted: another customer's server, a server of ours we report no link to, a time
    // far ahead of the authority's. None is judged.
    sync(
        1,
        vec![
            relay(&victim, START_MS - day, 50),
            relay(&stranger, START_MS - day, 50),
            relay(&receiver, START_MS + 30 * day, 50),
        ],
        vec![link(&receiver)],
    )
    .await;
    sync(
        2,
        vec![
            relay(&victim, START_MS - 1, 0),
            relay(&stranger, START_MS - 1, 0),
        ],
        vec![link(&receiver)],
    )
    .await;
    assert!(
        alerts(&h)
            .await
            .iter()
            .all(|alert| alert["kind"] != "ledger_rewound"),
        "{:?}",
        alerts(&h).await
    );
    // Its own receiver: a later report with fewer leases issued is a rewind.
    sync(
        3,
        vec![relay(&receiver, START_MS - day, 5)],
        vec![link(&receiver)],
    )
    .await;
    sync(
        4,
        vec![relay(&receiver, START_MS - 1, 2)],
        vec![link(&receiver)],
    )
    .await;
    let found = alerts(&h).await;
    let rewound: Vec<&Value> = found
        .iter()
        .filter(|alert| alert["kind"] == "ledger_rewound")
        .collect();
    assert_eq!(rewound.len(), 1, "{found:?}");
    assert_eq!(rewound[0]["server_id"], receiver.as_str());
}
