//! Time from the vendor (issue #22 item 4, T8): a request whose stated time is far from the
//! authority's clock is refused `server_clock_skewed` and alerted, never certified.

use super::*;

/// A request stating `created_at` (the server's clock), signed by `identity`.
fn stated(identity: &SecretKey, server_id: &str, sequence: u64, created_ms: i64) -> SyncRequest {
    let mut payload = request(identity, server_id, sequence, &[]).payload;
    payload.created_at = jiff::Timestamp::from_millisecond(created_ms).unwrap();
    SyncRequest::sign(payload, identity)
}

#[tokio::test]
async fn a_server_whose_clock_says_400_days_ahead_is_refused_and_alerted() {
    let h = Harness::new().await;
    let server_id = h.add_server("acme").await;
    let ours = SecretKey::from_seed([1; 32]);
    h.sync(&request(&ours, &server_id, 1, &[])).await.unwrap();

    // Online and by file alike: a clock 400 days ahead is not re-certified.
    let ahead = stated(&ours, &server_id, 2, START_MS + 400 * DAY_MS);
    let (status, body) = h.sync(&ahead).await.unwrap_err();
    assert_eq!(
        (status, code(&body)),
        (409, "server_clock_skewed"),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("9600 hours ahead"), "{message}");
    let (status, body) = h
        .admin_post("/v1/sync/process", serde_json::to_value(&ahead).unwrap())
        .await;
    assert_eq!(
        (status, code(&body)),
        (409, "server_clock_skewed"),
        "{body}"
    );

    // Online, a day behind is the limit; a request file may have been carried for weeks.
    let (status, body) = h
        .sync(&stated(&ours, &server_id, 3, START_MS - 40 * DAY_MS))
        .await
        .unwrap_err();
    assert_eq!(
        (status, code(&body)),
        (409, "server_clock_skewed"),
        "{body}"
    );
    let (status, body) = h
        .admin_post(
            "/v1/sync/process",
            serde_json::to_value(stated(&ours, &server_id, 4, START_MS - 40 * DAY_MS)).unwrap(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let response: SyncResponse = serde_json::from_value(body).unwrap();
    assert_eq!(
        response.payload.issued_at.as_millisecond(),
        START_MS,
        "the answer carries the authority's own time"
    );

    // Nothing moved for the refused ones (the sequence of the file request was taken), and
    // the vendor sees them: one alert, counted three times.
    assert_eq!(h.server_row(&server_id).await["last_sequence"], 4);
    let (status, alerts) = h.admin_get("/v1/alerts").await;
    assert_eq!(status, 200);
    let skewed: Vec<&Value> = alerts
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "server_clock_skewed")
        .collect();
    assert_eq!(skewed.len(), 1, "{alerts}");
    assert_eq!(skewed[0]["count"], 3, "{alerts}");
    assert_eq!(skewed[0]["server_id"], server_id.as_str());
}
