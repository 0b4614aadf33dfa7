//! The console at scale: 100,000 leases in release builds (2,000 under debug assertions, so
//! the usual debug run stays quick), filled through the server's own checkout path (the
//! consensus, the log, the usage history and the audit chain, as a station's checkout), then
//! every console page over real HTTP: right content, small pages. Times are printed, not
//! asserted (`cargo nextest run --release -p tessera-server --test server console_at_scale
//! --no-capture`; BENCHMARKS.md keeps them).

use std::time::Instant;

use tessera_api::CheckoutRequest;

use super::Fixture;
use super::console::{admin_get, login};

#[cfg(debug_assertions)]
const LEASES: usize = 2_000;
#[cfg(not(debug_assertions))]
const LEASES: usize = 100_000;

/// Users repeat every 100 stations: `user7` holds a hundredth of the leases, `user7*` also
/// takes `user70`..`user79`.
const USERS: usize = 100;
/// The largest page the console may send (its list shows 100 leases a page).
const PAGE_BYTES_MAX: usize = 200_000;

fn lease_json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Fills the leases: even stations check out `cad` (key `k-cad`, covering cad and sim), odd
/// ones `view` (key `k-view`); the clock moves 100 ms between batches so times differ.
async fn fill(f: &Fixture) {
    f.import(&f.key("k-cad", &["cad", "sim"], LEASES as u32))
        .await;
    f.import(&f.key("k-view", &["view"], LEASES as u32)).await;
    let started = Instant::now();
    let batch = if cfg!(debug_assertions) { 100 } else { 500 };
    for start in (0..LEASES).step_by(batch) {
        let checkouts = (start..(start + batch).min(LEASES)).map(|i| {
            let state = f.server.state.clone();
            async move {
                let request = CheckoutRequest {
                    component: if i % 2 == 0 { "cad" } else { "view" }.into(),
                    station: format!("ws-{i:06}"),
                    user: format!("user{}", i % USERS),
                    host: format!("host-{}", i % 1000),
                    nonce: String::new(),
                    holder_key: String::new(),
                    borrow_hours: 0,
                };
                // A busy machine (a debug build among other builds) may time a proposal out;
                // a checkout is safe to retry (the station gets its lease back).
                let mut tries = 0;
                loop {
                    match state.checkout(request.clone()).await {
                        Err(error) if tries < 5 => {
                            tries += 1;
                            eprintln!("checkout {i}: {error}; again");
                        }
                        result => return result,
                    }
                }
            }
        });
        for result in futures::future::join_all(checkouts).await {
            result.unwrap();
        }
        f.clock.advance_ms(100);
    }
    eprintln!(
        "console at scale: {LEASES} leases filled in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// One client for the timed pages (keep-alive; building a client costs more than a page).
fn client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(super::console::http)
}

/// One console page: status 200, small; prints its time.
async fn timed(f: &Fixture, cookie: &str, path: &str) -> String {
    let started = Instant::now();
    let response = client()
        .get(format!("{}{path}", f.server.url()))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let html = response.text().await.unwrap();
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    eprintln!(
        "console at scale: {LEASES} leases: GET {path}: {ms:.1} ms, {} bytes",
        html.len()
    );
    assert_eq!(status, 200, "{path}: {html}");
    assert!(html.len() < PAGE_BYTES_MAX, "{path}: {} bytes", html.len());
    html
}

/// The `href` of the first link with this class, unescaped.
fn link(html: &str, class: &str) -> Option<String> {
    let marker = format!("<a class=\"{class}\" ");
    let rest = &html[html.find(&marker)? + marker.len()..];
    let rest = &rest[rest.find("href=\"")? + 6..];
    Some(
        rest[..rest.find('"')?]
            .replace("&#38;", "&")
            .replace("&amp;", "&"),
    )
}

/// The station column of the leases table, in order.
fn stations(html: &str) -> Vec<String> {
    html.split("<tr class=\"lease\"><td>")
        .skip(1)
        .map(|row| row.split('<').next().unwrap().to_string())
        .collect()
}

fn count_line(html: &str) -> &str {
    let start = html.find("id=\"lease-count\">").expect("the count") + 17;
    &html[start..start + html[start..].find("</p>").unwrap()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_console_page_stays_small_and_right_with_many_leases() {
    let f = Fixture::start().await;
    fill(&f).await;
    let n = LEASES;

    // The API: the old contract (lease-id order, `after=` the last id) and the sorted pages.
    let (status, body) = admin_get(&f, "/v1/leases?limit=1000").await;
    assert_eq!(status, 200, "{body}");
    let first = lease_json(&body);
    assert_eq!(first["total"], n);
    assert!(first.get("previous").is_none() && first.get("offset").is_none());
    let ids: Vec<&str> = first["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["lease_id"].as_str().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(first["next"].as_str(), Some(*ids.last().unwrap()));
    let (_, body) = admin_get(&f, &format!("/v1/leases?limit=1000&after={}", ids[999])).await;
    let second = lease_json(&body);
    assert!(second["leases"][0]["lease_id"].as_str().unwrap() > ids[999]);
    assert_eq!(second["offset"], 1000);
    assert_eq!(
        second["previous"].as_str(),
        second["leases"][0]["lease_id"].as_str()
    );

    let (_, body) = admin_get(&f, "/v1/leases?limit=50&sort=expires&order=desc").await;
    let by_expiry = lease_json(&body);
    let expiries: Vec<&str> = by_expiry["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["expires_at"].as_str().unwrap())
        .collect();
    assert!(expiries.windows(2).all(|w| w[0] >= w[1]), "{expiries:?}");
    let next = by_expiry["next"].as_str().unwrap();
    assert!(next.contains('~'), "{next}");
    let (_, body) = admin_get(
        &f,
        &format!("/v1/leases?limit=50&sort=expires&order=desc&after={next}"),
    )
    .await;
    let page_two = lease_json(&body);
    let previous = page_two["previous"].as_str().unwrap();
    let (_, body) = admin_get(
        &f,
        &format!("/v1/leases?limit=50&sort=expires&order=desc&before={previous}"),
    )
    .await;
    assert_eq!(lease_json(&body)["leases"], by_expiry["leases"]);
    for (query, code) in [
        ("sort=colour", 400),
        ("sort=user&after=x&before=y", 400),
        ("sort=expires&after=not-a-cursor", 400),
        ("order=up", 400),
    ] {
        let (status, body) = admin_get(&f, &format!("/v1/leases?{query}")).await;
        assert_eq!(status, code, "{query}: {body}");
        assert!(body.contains("invalid_query"), "{body}");
    }
    // Exact filters are exact; a `*` makes a prefix; a component finds the leases of the
    // keys covering it.
    for (query, expected) in [
        ("user=user7", n / USERS),
        ("user=user7*", n / USERS * 11),
        ("component=sim", n / 2),
        ("component=view", n / 2),
        ("key=k-view&user=user7", n / USERS),
        ("key=k-view&user=user8", 0),
        ("station=ws-000042", 1),
        ("host=host-1", n / 1000),
    ] {
        let (_, body) = admin_get(&f, &format!("/v1/leases?limit=1&{query}")).await;
        assert_eq!(lease_json(&body)["total"], expected, "{query}");
    }

    // The console, page by page.
    let login_page = timed(&f, "", "/login").await;
    assert!(login_page.contains("class=\"card\""), "{login_page}");
    let (cookie, _) = login(&f).await;

    let keys = timed(&f, &cookie, "/").await;
    assert!(
        keys.contains(&format!("Leases<br><b>{n}</b>")),
        "the lease tile"
    );
    assert!(keys.contains("not required"), "the sync tile");
    assert!(keys.contains("action=\"/keys/k-cad/allocate\""));
    assert!(keys.contains("id=\"update-keys\""));

    let leases = timed(&f, &cookie, "/leases").await;
    let count_at = leases.find("id=\"lease-count\"").unwrap();
    assert!(count_at < leases.find("<table").unwrap(), "the count first");
    assert_eq!(count_line(&leases), format!("{n} leases; showing 1–100."));
    assert_eq!(stations(&leases).len(), 100);
    assert!(link(&leases, "previous").is_none());
    assert!(leases.contains("<time datetime=\""));
    assert!(
        leases.contains("class=\"act\""),
        "the sticky Release column"
    );

    // Sorted by user, descending: user99 first; page 2 and back.
    let by_user = timed(&f, &cookie, "/leases?sort=user&order=desc").await;
    assert!(
        by_user.contains("<th aria-sort=\"descending\"><a href=\"/leases?sort=user\">User ▼</a>"),
        "{by_user}"
    );
    let users: Vec<String> = by_user
        .split("<tr class=\"lease\"><td>")
        .skip(1)
        .map(|row| row.split("</td><td>").nth(1).unwrap().to_string())
        .collect();
    assert_eq!(users[0], "user99");
    assert!(users.windows(2).all(|w| w[0] >= w[1]), "{users:?}");
    let next = link(&by_user, "next").expect("a next page");
    assert!(
        next.contains("sort=user") && next.contains("order=desc") && next.contains("after=user9"),
        "{next}"
    );
    let page_two = timed(&f, &cookie, &next).await;
    assert_eq!(
        count_line(&page_two),
        format!("{n} leases; showing 101–200.")
    );
    let back = link(&page_two, "previous").expect("a previous page");
    assert!(back.contains("before="), "{back}");
    let page_one = timed(&f, &cookie, &back).await;
    assert_eq!(stations(&page_one), stations(&by_user));
    assert!(link(&page_one, "previous").is_none());

    let by_expiry = timed(&f, &cookie, "/leases?sort=expires").await;
    let soonest: usize = stations(&by_expiry)[0][3..].parse().unwrap();
    assert!(
        soonest < 500,
        "a lease of the first batch expires first, not {soonest}"
    );

    // Filters: exact, prefix, component by covering key.
    let user7 = timed(&f, &cookie, "/leases?user=user7").await;
    assert!(count_line(&user7).starts_with(&format!("{} leases match the filter", n / USERS)));
    assert!(!user7.contains("user70"));
    let user7s = timed(&f, &cookie, "/leases?user=user7*&sort=station").await;
    assert!(
        count_line(&user7s).starts_with(&format!("{} leases match the filter", n / USERS * 11))
    );
    let sim = timed(&f, &cookie, "/leases?component=sim&sort=since&order=desc").await;
    assert!(count_line(&sim).starts_with(&format!("{} leases match the filter", n / 2)));
    let table = timed(&f, &cookie, "/leases/table?key=k-view&host=host-1").await;
    assert!(count_line(&table).starts_with(&format!("{} leases match", n / 1000)));
    let bad = timed(&f, &cookie, "/leases?sort=expires&after=nonsense").await;
    assert!(bad.contains("id=\"query-error\""), "{bad}");

    // Auto-refresh on and off.
    let refreshing = timed(&f, &cookie, "/leases?user=user7&refresh=30").await;
    assert!(refreshing.contains("<meta http-equiv=\"refresh\" content=\"30\">"));
    assert!(link(&refreshing, "next").is_none_or(|next| next.ends_with("&refresh=30")));
    assert!(refreshing.contains("href=\"/leases?user=user7\" id=\"refresh-toggle\">turn off"));

    let remove = timed(&f, &cookie, "/keys/k-view/remove").await;
    assert!(
        remove.contains(&format!("ends <b>{}</b> leases", n / 2)),
        "{remove}"
    );

    let usage = timed(&f, &cookie, "/usage").await;
    assert!(usage.contains("id=\"usage-chart\"") && usage.contains(">UTC</text>"));
    assert!(
        usage.contains("class=\"licenses\""),
        "the license-count line"
    );
    timed(&f, &cookie, "/usage?bucket=day").await;
    timed(&f, &cookie, "/usage?bucket=month").await;

    // The events page: the first load walks the whole audit chain, later ones only what was
    // added since; `verify=full` walks it all on request.
    let events = timed(&f, &cookie, "/events").await;
    assert!(
        events.contains("<span class=\"ok\">intact</span>"),
        "{events}"
    );
    let events = timed(&f, &cookie, "/events").await;
    assert!(events.contains("<span class=\"ok\">intact</span>"));
    assert!(events.contains("id=\"verify-full\""));
    let full = timed(&f, &cookie, "/events?verify=full").await;
    assert!(full.contains("The whole chain was checked now."));

    let neighbours = timed(&f, &cookie, "/neighbours").await;
    assert!(neighbours.contains("Neighbours"));
    let sync = timed(&f, &cookie, "/sync").await;
    assert!(sync.contains("Sync"));
    timed(&f, &cookie, "/assets/console.js").await;

    // A record changed behind the server's back: the whole walk finds it, and the quick
    // check finds it as soon as it touches the record it ended at.
    let path = f.dir.path().join("data").join("usage.sqlite3");
    let connection = rusqlite::Connection::open(&path).unwrap();
    connection
        .execute(
            "UPDATE audit_log SET details = '{\"station\":\"someone-else\"}' WHERE seq = 3",
            [],
        )
        .unwrap();
    let full = timed(&f, &cookie, "/events?verify=full").await;
    assert!(full.contains("BROKEN at record 3"), "{full}");
    let quick = timed(&f, &cookie, "/events").await;
    assert!(
        quick.contains("BROKEN at record 3"),
        "no intact checkpoint left: a whole walk"
    );
}
