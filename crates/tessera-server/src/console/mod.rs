//! The web console at `/`: askama templates (`templates/console/`), htmx embedded from
//! `assets/`, sessions in memory.
//!
//! Login: the admin token, or an `[[admin_user]]` with an argon2 password hash, posted to
//! `/login`; `/login?token=...&next=/usage` logs in from a link (scripts, headless
//! browsers). The session cookie is `HttpOnly; SameSite=Strict`; every POST also carries the
//! session's CSRF token.

pub mod chart;
pub mod reports;
mod session;

use std::sync::Arc;

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use serde::Deserialize;
use tessera_core::Refusal;
use tessera_core::sync::SyncResponse;

use crate::error::ApiError;
use crate::state::{SharedState, timestamp};
pub use session::{
    ConsoleUser, SESSION_COOKIE, SESSION_TTL, Sessions, hash_password, verify_password,
};

#[derive(rust_embed::Embed)]
#[folder = "assets/"]
struct Assets;

/// The console's routes (merged into the API router).
pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/", get(keys_page))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/{*file}", get(asset))
        .route("/keys/{key_id}/export", get(export_key))
        .route("/keys/upload", post(upload_key))
        .route("/keys/{key_id}/allocate", post(allocate_key))
        .route(
            "/keys/{key_id}/remove",
            get(remove_key_confirm).post(remove_key),
        )
        .route("/leases", get(leases_page))
        .route("/leases/table", get(leases_table))
        .route(
            "/leases/{lease_id}/release",
            get(release_confirm).post(release),
        )
        .route("/usage", get(usage_page))
        .route("/usage.csv", get(usage_csv))
        .route("/sync", get(sync_page))
        .route("/sync/now", post(sync_now))
        .route("/sync/update", post(update_keys))
        .route("/sync/request", post(sync_request))
        .route("/sync/response", post(sync_response))
        .route("/events", get(events_page))
        .route("/neighbours", get(neighbours_page))
        .route("/neighbours/donate", post(neighbours_donate))
        .route("/neighbours/end", post(neighbours_end))
        .layer(Extension(Arc::new(Sessions::default())))
        .layer(Extension(Arc::new(LoginThrottle::default())))
        .layer(Extension(Arc::new(AuditCheckpoint::default())))
}

/// A rendering failure is an internal error (templates are checked at compile time).
fn render(template: &impl Template) -> Response {
    match template.render() {
        Ok(html) => Html(html).into_response(),
        Err(error) => ApiError::Internal(format!("template: {error}")).into_response(),
    }
}

fn fmt_ts(time: jiff::Timestamp) -> String {
    time.strftime("%Y-%m-%d %H:%M:%S UTC").to_string()
}

async fn asset(Path(file): Path<String>) -> Response {
    match Assets::get(&file) {
        Some(content) => {
            let kind = if file.ends_with(".js") {
                "text/javascript; charset=utf-8"
            } else {
                "text/plain; charset=utf-8"
            };
            (
                [
                    (header::CONTENT_TYPE, kind),
                    (header::CACHE_CONTROL, "public, max-age=3600"),
                ],
                content.data.into_owned(),
            )
                .into_response()
        }
        None => ApiError::NoRoute {
            path: format!("/assets/{file}"),
        }
        .into_response(),
    }
}

// ---------------------------------------------------------------- login

#[derive(Template)]
#[template(path = "console/login.html")]
struct LoginPage {
    next: String,
    error: Option<String>,
    users_enabled: bool,
}

#[derive(Debug, Default, Deserialize)]
struct LoginQuery {
    token: Option<String>,
    next: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    next: String,
}

/// Only paths of this site, so the login cannot redirect elsewhere: one leading `/`, then
/// visible ASCII without `\\`. Browsers drop tabs and line breaks from a URL and read `\\`
/// as `/`, so `/%09/evil.example` or `/\\evil.example` would lead off-site.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(path)
            if path.starts_with('/')
                && !path[1..].starts_with('/')
                && path.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') =>
        {
            path.to_string()
        }
        _ => "/".to_string(),
    }
}

/// Headers on every answer: no framing (clickjacking), no content sniffing, no referrer
/// leaving the site, scripts only from the console's own assets; HSTS when serving HTTPS.
pub async fn security_headers(
    State(state): State<SharedState>,
    mut response: Response,
) -> Response {
    let headers = response.headers_mut();
    let mut set = |name: &'static str, value: &'static str| {
        headers
            .entry(name)
            .or_insert(header::HeaderValue::from_static(value));
    };
    set(
        "content-security-policy",
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    );
    set("x-frame-options", "DENY");
    set("x-content-type-options", "nosniff");
    set("referrer-policy", "no-referrer");
    if state.config.tls.is_some() {
        // A day: a site that turns HTTPS off again is not locked out of its console for long.
        set("strict-transport-security", "max-age=86400");
    }
    response
}

/// Failed console logins per client address (an IPv6 /64 counts as one address): after
/// [`LOGIN_FAILURES_MAX`] within [`LOGIN_WINDOW_MS`], the address gets 429 for any further
/// wrong token or any password, until the oldest failure leaves the window (by the server's
/// clock). The right admin token always gets in: it is 256 random bits, nobody guesses it,
/// and an attacker behind the same address must not lock the administrator out.
pub const LOGIN_FAILURES_MAX: usize = 5;
pub const LOGIN_WINDOW_MS: i64 = 60_000;
/// Addresses remembered at most (the oldest entries go first).
const LOGIN_ADDRESSES_MAX: usize = 10_000;
/// Password checks (argon2, deliberately slow) running at once.
const PASSWORD_CHECKS_MAX: usize = 2;

#[derive(Debug)]
pub struct LoginThrottle {
    failures: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, Vec<i64>>>,
    password_checks: tokio::sync::Semaphore,
}

impl Default for LoginThrottle {
    fn default() -> LoginThrottle {
        LoginThrottle {
            failures: Default::default(),
            password_checks: tokio::sync::Semaphore::new(PASSWORD_CHECKS_MAX),
        }
    }
}

impl LoginThrottle {
    /// Counts an attempt from `address` as a failure before it is checked (so parallel
    /// attempts cannot all slip through), or says how long the address must wait. A login
    /// that succeeds clears the address ([`LoginThrottle::succeeded`]). Without an address,
    /// all such attempts share one count.
    fn attempt(&self, address: Option<std::net::IpAddr>, now_ms: i64) -> Result<(), i64> {
        let group = address.map_or(
            std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            tessera_tls::address_group,
        );
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= LOGIN_ADDRESSES_MAX && !failures.contains_key(&group) {
            failures
                .retain(|_, times| times.last().is_some_and(|at| now_ms - at < LOGIN_WINDOW_MS));
            if failures.len() >= LOGIN_ADDRESSES_MAX {
                let oldest = failures
                    .iter()
                    .min_by_key(|(_, times)| times.last().copied())
                    .map(|(address, _)| *address);
                if let Some(oldest) = oldest {
                    failures.remove(&oldest);
                }
            }
        }
        let times = failures.entry(group).or_default();
        times.retain(|at| now_ms - at < LOGIN_WINDOW_MS);
        if times.len() >= LOGIN_FAILURES_MAX {
            return Err(times[0] + LOGIN_WINDOW_MS - now_ms);
        }
        times.push(now_ms);
        Ok(())
    }

    fn succeeded(&self, address: Option<std::net::IpAddr>) {
        let group = address.map_or(
            std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            tessera_tls::address_group,
        );
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&group);
    }
}

type PeerAddress = Option<Extension<axum::extract::ConnectInfo<tessera_tls::Client>>>;

fn ip_of(peer: &PeerAddress) -> Option<std::net::IpAddr> {
    peer.as_ref().map(|info| info.0.0.addr.ip())
}

fn too_many_logins(state: &SharedState, next: String, wait_ms: i64) -> Response {
    let seconds = (wait_ms + 999) / 1000;
    let mut response = login_form(
        state,
        next,
        Some(format!(
            "too many failed logins from this address: try again in {seconds} s"
        )),
        StatusCode::TOO_MANY_REQUESTS,
    );
    if let Ok(value) = header::HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

async fn login_page(
    State(state): State<SharedState>,
    Extension(sessions): Extension<Arc<Sessions>>,
    Extension(throttle): Extension<Arc<LoginThrottle>>,
    peer: PeerAddress,
    Query(query): Query<LoginQuery>,
) -> Response {
    let next = safe_next(query.next.as_deref());
    if let Some(token) = query.token {
        let address = ip_of(&peer);
        if session::token_matches(&token, &state.admin_token) {
            throttle.succeeded(address);
            return start_session(&state, &sessions, "admin", "token link", &next);
        }
        if let Err(wait_ms) = throttle.attempt(address, state.stamper.now_ms()) {
            return too_many_logins(&state, next, wait_ms);
        }
        return login_form(
            &state,
            next,
            Some("wrong token".into()),
            StatusCode::UNAUTHORIZED,
        );
    }
    login_form(&state, next, None, StatusCode::OK)
}

fn login_form(
    state: &SharedState,
    next: String,
    error: Option<String>,
    status: StatusCode,
) -> Response {
    let mut response = render(&LoginPage {
        next,
        error,
        users_enabled: !state.config.admin_users.is_empty(),
    });
    *response.status_mut() = status;
    response
}

fn start_session(
    state: &SharedState,
    sessions: &Sessions,
    user: &str,
    method: &str,
    next: &str,
) -> Response {
    let (id, _) = sessions.create(user);
    state.history.admin_action(
        state.stamper.now_ms(),
        user,
        "console.login",
        serde_json::json!({"method": method}),
    );
    // Under HTTPS the browser never sends the session over plain HTTP.
    let secure = if state.config.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        SESSION_TTL.as_secs()
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to(next)).into_response()
}

async fn login(
    State(state): State<SharedState>,
    Extension(sessions): Extension<Arc<Sessions>>,
    Extension(throttle): Extension<Arc<LoginThrottle>>,
    peer: PeerAddress,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = safe_next(Some(&form.next));
    let address = ip_of(&peer);
    if !form.token.is_empty() && session::token_matches(form.token.trim(), &state.admin_token) {
        throttle.succeeded(address);
        return start_session(&state, &sessions, "admin", "token", &next);
    }
    if let Err(wait_ms) = throttle.attempt(address, state.stamper.now_ms()) {
        return too_many_logins(&state, next, wait_ms);
    }
    if !form.token.is_empty() {
        // A wrong token: counted above.
    } else if !form.name.is_empty() {
        let user = state
            .config
            .admin_users
            .iter()
            .find(|user| user.name == form.name)
            .cloned();
        if let Some(user) = user {
            let password = form.password.clone();
            let hash = user.password_hash.clone();
            // A few argon2 checks at once: a flood of logins cannot take the blocking pool.
            let _permit = throttle.password_checks.acquire().await;
            let ok =
                tokio::task::spawn_blocking(move || session::verify_password(&password, &hash))
                    .await
                    .unwrap_or(false);
            if ok {
                throttle.succeeded(address);
                return start_session(&state, &sessions, &user.name, "password", &next);
            }
        }
    }
    state.history.admin_action(
        state.stamper.now_ms(),
        if form.name.is_empty() {
            "admin"
        } else {
            &form.name
        },
        "console.login_failed",
        serde_json::json!({}),
    );
    login_form(
        &state,
        next,
        Some("wrong token, name or password".into()),
        StatusCode::UNAUTHORIZED,
    )
}

#[derive(Debug, Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    Extension(sessions): Extension<Arc<Sessions>>,
    user: ConsoleUser,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(response) = user.check_csrf(&form.csrf) {
        return response;
    }
    sessions.remove(&user.session_id);
    (
        [(
            header::SET_COOKIE,
            format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
        )],
        Redirect::to("/login"),
    )
        .into_response()
}

// ---------------------------------------------------------------- keys (home)

struct KeyRow {
    key_id: String,
    customer: String,
    components: String,
    licenses: u32,
    in_use: u32,
    valid_from: Time,
    valid_until: Time,
    state: String,
    allocated: bool,
    /// Station groups the key is allocated to, comma-separated.
    groups: String,
    renewal: String,
    donated_out: u32,
    received_from: String,
}

#[derive(Template)]
#[template(path = "console/keys.html")]
struct KeysPage {
    page: &'static str,
    /// This host of a pair serves alone (only its share of each key).
    serving_alone: bool,
    user: String,
    csrf: String,
    flash: Option<String>,
    error: Option<String>,
    role: String,
    /// One tile per host of the domain (a single host shows one).
    hosts: Vec<crate::domain_status::HostJson>,
    /// A redundant pair: its status and each host's, as the reference names them.
    pair: Option<crate::pair::PairStatus>,
    server_id: String,
    lease_count: usize,
    synchronized: bool,
    /// Whether this server needs the vendor's sync at all: a key bound to its server ID, an
    /// authority configured, or a sync done before.
    sync_required: bool,
    deadline: String,
    components: Vec<tessera_api::ComponentStatus>,
    keys: Vec<KeyRow>,
    refresh: Option<u32>,
    refresh_path: &'static str,
}

/// A page's `?refresh=` (seconds between reloads; absent or 0: off).
#[derive(Debug, Default, Deserialize)]
struct RefreshQuery {
    refresh: Option<String>,
}

async fn keys_page(
    State(state): State<SharedState>,
    user: ConsoleUser,
    Query(query): Query<RefreshQuery>,
) -> Response {
    keys_page_refreshed(
        &state,
        &user,
        None,
        None,
        refresh_seconds(query.refresh.as_deref()),
    )
}

fn keys_page_with(
    state: &SharedState,
    user: &ConsoleUser,
    flash: Option<String>,
    error: Option<String>,
) -> Response {
    keys_page_refreshed(state, user, flash, error, None)
}

fn keys_page_refreshed(
    state: &SharedState,
    user: &ConsoleUser,
    flash: Option<String>,
    error: Option<String>,
    refresh: Option<u32>,
) -> Response {
    let status = state.status_with(true);
    let keys = status
        .keys
        .iter()
        .map(|key| KeyRow {
            key_id: key.key_id.clone(),
            customer: key.customer.clone(),
            components: key.components.join(", "),
            licenses: key.licenses,
            in_use: key.in_use,
            valid_from: Time::of(key.valid_from),
            valid_until: Time::of(key.valid_until),
            state: key.state.clone(),
            allocated: key.allocated,
            groups: key.groups.join(", "),
            donated_out: key.donated_out,
            received_from: key.received_from.clone().unwrap_or_default(),
            renewal: match (&key.renewal, &key.replaced_by, &key.renews) {
                (Some(renewal), _, _) => renewal.clone(),
                (None, Some(by), _) => format!("replaced by {by}"),
                (None, None, Some(renews)) => format!("renews {renews}"),
                _ => String::new(),
            },
        })
        .collect();
    render(&KeysPage {
        page: "keys",
        user: user.name.clone(),
        csrf: user.csrf.clone(),
        flash,
        error,
        role: status.role.clone(),
        hosts: crate::domain_status::local_status(state).hosts,
        pair: Some(state.pair.status(state)).filter(|pair| pair.mode != crate::pair::Mode::Off),
        server_id: status.server_id.clone().unwrap_or_else(|| "(none)".into()),
        lease_count: status.leases_total as usize,
        synchronized: status.sync.synchronized,
        sync_required: status.keys.iter().any(|key| key.server_id.is_some())
            || status.sync.authority.is_some()
            || status.sync.last_sync_at.is_some(),
        deadline: status
            .sync
            .deadline
            .map(|deadline| format!("deadline {}", fmt_ts(deadline)))
            .unwrap_or_else(|| "no deadline".into()),
        serving_alone: status.serving_alone,
        components: status.components,
        keys,
        refresh,
        refresh_path: "/",
    })
}

/// The allocation form of a key: every station of this server or not, and station groups
/// (comma-separated; empty: none).
#[derive(Debug, Deserialize)]
struct AllocateForm {
    #[serde(default)]
    csrf: String,
    /// `on` when the box "all stations" is ticked.
    stations: Option<String>,
    #[serde(default)]
    groups: String,
}

/// `POST /keys/{key_id}/allocate`: as `POST /v1/keys/{key_id}/allocate` (neighbours are
/// the neighbours page's).
async fn allocate_key(
    State(state): State<SharedState>,
    user: ConsoleUser,
    Path(key_id): Path<String>,
    Form(form): Form<AllocateForm>,
) -> Response {
    if let Err(response) = user.check_csrf(&form.csrf) {
        return response;
    }
    let stations = form.stations.is_some();
    let groups: Vec<String> = form
        .groups
        .split(',')
        .map(str::trim)
        .filter(|group| !group.is_empty())
        .map(str::to_string)
        .collect();
    let result = state
        .allocate_key(key_id.clone(), stations, Some(groups.clone()), None)
        .await;
    user.record(
        &state,
        "console.key_allocate",
        serde_json::json!({"key_id": key_id, "stations": stations, "groups": groups, "ok": result.is_ok()}),
    );
    match result {
        Ok(()) => keys_page_with(
            &state,
            &user,
            Some(format!(
                "License key {key_id} now serves {}{}.",
                if stations {
                    "every station"
                } else {
                    "no station by itself"
                },
                if groups.is_empty() {
                    String::new()
                } else {
                    format!(" and the groups {}", groups.join(", "))
                }
            )),
            None,
        ),
        Err(error) => keys_page_with(
            &state,
            &user,
            None,
            Some(format!(
                "Key {key_id} was not allocated ({}): {error}",
                error.status_and_code().1
            )),
        ),
    }
}

async fn export_key(
    State(state): State<SharedState>,
    _user: ConsoleUser,
    Path(key_id): Path<String>,
) -> Result<Response, ApiError> {
    let key = state
        .consensus
        .read(|ledger| ledger.key(&key_id).cloned())
        .ok_or(Refusal::KeyNotFound {
            key_id: key_id.clone(),
        })?;
    let disposition = format!(
        "attachment; filename=\"{}.json\"",
        key_id.replace(
            |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_',
            "_"
        )
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/json".to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        key.to_json_pretty(),
    )
        .into_response())
}

// ---------------------------------------------------------------- leases

struct LeaseRow {
    lease_id: String,
    station: String,
    user: String,
    host: String,
    components: String,
    key_id: String,
    since: Time,
    heartbeat: Time,
    expires: Time,
}

impl LeaseRow {
    fn from(lease: &tessera_api::Lease) -> LeaseRow {
        LeaseRow {
            lease_id: lease.lease_id.clone(),
            station: lease.station.clone(),
            user: lease.user.clone(),
            host: lease.host.clone(),
            components: lease.components.join(", "),
            key_id: lease.key_id.clone(),
            since: Time::of(lease.issued_at),
            heartbeat: Time::of(lease.renewed_at),
            expires: Time::of(lease.expires_at),
        }
    }
}

/// A time as a page shows it: `<time datetime="RFC 3339">` with the UTC text, which the
/// console's script switches to the browser's time zone on request.
struct Time {
    /// RFC 3339, UTC (`2026-12-03T06:00:00Z`).
    iso: String,
    /// `2026-12-03 06:00:00 UTC`.
    text: String,
}

impl std::fmt::Display for Time {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Time {
    fn of(time: jiff::Timestamp) -> Time {
        Time {
            iso: time.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
            text: fmt_ts(time),
        }
    }
}

/// Leases per page of the console's list.
const LEASE_ROWS: usize = 100;

/// The leases page's query: filters (exact, or a prefix ending in `*`, as `GET /v1/leases`),
/// order, page cursor and auto-refresh.
#[derive(Debug, Default, Deserialize)]
struct LeaseFilter {
    #[serde(default)]
    station: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    component: String,
    #[serde(default)]
    host: String,
    #[serde(default)]
    key: String,
    /// `id` (default), `expires`, `since`, `heartbeat`, `station`, `user`, `host`, `key`.
    #[serde(default)]
    sort: String,
    /// `asc` (default) or `desc`.
    #[serde(default)]
    order: String,
    /// The page after this cursor.
    #[serde(default)]
    after: String,
    /// The page before this cursor.
    #[serde(default)]
    before: String,
    /// Reload the page every this many seconds.
    refresh: Option<String>,
    released: Option<String>,
}

/// A column heading of the leases table: a link sorting by it (the other way round when the
/// table is sorted by it already).
struct SortLink {
    label: &'static str,
    href: String,
    /// `" ▲"`, `" ▼"` on the column the table is sorted by, else empty.
    mark: &'static str,
    /// `ascending`, `descending` or `none`, for `aria-sort`.
    aria: &'static str,
}

/// What the leases page and its htmx table show.
struct LeaseListing {
    leases: Vec<LeaseRow>,
    total: usize,
    /// The first row's position (1-based) among the matching leases.
    first: usize,
    next: Option<String>,
    previous: Option<String>,
    columns: Vec<SortLink>,
    filtered: bool,
    /// What the query got wrong (a bad sort or cursor), shown instead of the table.
    error: Option<String>,
}

impl LeaseFilter {
    fn listing(&self, state: &SharedState) -> LeaseListing {
        fn given(text: &str) -> Option<&str> {
            let text = text.trim();
            (!text.is_empty()).then_some(text)
        }
        let filter = tessera_core::LeaseFilter {
            component: given(&self.component),
            key: given(&self.key),
            station: given(&self.station),
            user: given(&self.user),
            host: given(&self.host),
        };
        let page = crate::lease_listing::parse_order(given(&self.sort), given(&self.order))
            .and_then(|order| {
                let cursor =
                    crate::lease_listing::parse_cursor(given(&self.after), given(&self.before))?;
                Ok((
                    order,
                    state.sorted_lease_page(&filter, order, cursor, LEASE_ROWS)?,
                ))
            });
        let (order, page, error) = match page {
            Ok((order, page)) => (order, page, None),
            Err(error) => (
                tessera_core::LeaseOrder::default(),
                tessera_api::LeasePage {
                    leases: vec![],
                    total: 0,
                    next: None,
                    previous: None,
                    offset: 0,
                },
                Some(error.to_string()),
            ),
        };
        let columns = [
            ("Station", tessera_core::LeaseSort::Station),
            ("User", tessera_core::LeaseSort::User),
            ("Host", tessera_core::LeaseSort::Host),
            ("Key", tessera_core::LeaseSort::Key),
            ("Since", tessera_core::LeaseSort::Since),
            ("Last heartbeat", tessera_core::LeaseSort::Heartbeat),
            ("Expires", tessera_core::LeaseSort::Expires),
        ]
        .into_iter()
        .map(|(label, sort)| {
            let current = order.sort == sort;
            let descending = current && !order.descending;
            SortLink {
                label,
                href: format!(
                    "/leases?{}",
                    self.query(sort.name(), if descending { "desc" } else { "asc" }, None)
                ),
                mark: match (current, order.descending) {
                    (false, _) => "",
                    (true, false) => " ▲",
                    (true, true) => " ▼",
                },
                aria: match (current, order.descending) {
                    (false, _) => "none",
                    (true, false) => "ascending",
                    (true, true) => "descending",
                },
            }
        })
        .collect();
        let (sort, direction) = (
            order.sort.name(),
            if order.descending { "desc" } else { "asc" },
        );
        LeaseListing {
            total: page.total as usize,
            first: page.offset as usize + 1,
            next: page
                .next
                .map(|next| self.query(sort, direction, Some(("after", &next)))),
            previous: page
                .previous
                .map(|previous| self.query(sort, direction, Some(("before", &previous)))),
            leases: page.leases.iter().map(LeaseRow::from).collect(),
            columns,
            filtered: self.is_filtered(),
            error,
        }
    }

    fn is_filtered(&self) -> bool {
        !(self.station.trim().is_empty()
            && self.user.trim().is_empty()
            && self.component.trim().is_empty()
            && self.host.trim().is_empty()
            && self.key.trim().is_empty())
    }

    /// Seconds between reloads, when auto-refresh is on (5 s at least, an hour at most).
    fn refresh(&self) -> Option<u32> {
        refresh_seconds(self.refresh.as_deref())
    }

    /// The query of these filters in the order `sort`, `order` (the default left out), with a
    /// cursor and auto-refresh as now.
    fn query(&self, sort: &str, order: &str, cursor: Option<(&str, &str)>) -> String {
        let mut parts = Vec::new();
        for (name, value) in [
            ("station", &self.station),
            ("user", &self.user),
            ("component", &self.component),
            ("host", &self.host),
            ("key", &self.key),
        ] {
            if !value.trim().is_empty() {
                parts.push(format!("{name}={}", urlencode(value.trim())));
            }
        }
        if sort != "id" {
            parts.push(format!("sort={sort}"));
        }
        if order != "asc" {
            parts.push(format!("order={order}"));
        }
        if let Some((name, cursor)) = cursor {
            parts.push(format!("{name}={}", urlencode(cursor)));
        }
        if let Some(seconds) = self.refresh() {
            parts.push(format!("refresh={seconds}"));
        }
        parts.join("&")
    }

    /// This page's query with auto-refresh on (`Some`) or off.
    fn with_refresh(&self, refresh: Option<u32>) -> String {
        let mut query = LeaseFilter {
            refresh: refresh.map(|seconds| seconds.to_string()),
            ..LeaseFilter::default()
        };
        for (field, value) in [
            (&mut query.station, &self.station),
            (&mut query.user, &self.user),
            (&mut query.component, &self.component),
            (&mut query.host, &self.host),
            (&mut query.key, &self.key),
        ] {
            field.clone_from(value);
        }
        let sort = tessera_core::LeaseSort::parse(self.sort.trim()).unwrap_or_default();
        let order = if self.order.trim() == "desc" {
            "desc"
        } else {
            "asc"
        };
        let cursor = [("after", &self.after), ("before", &self.before)]
            .into_iter()
            .find(|(_, cursor)| !cursor.trim().is_empty())
            .map(|(name, cursor)| (name, cursor.trim()));
        query.query(sort.name(), order, cursor)
    }
}

/// The auto-refresh period a page's `refresh=` asks for: `None` when off (absent, `0`,
/// `off`), else 5 to 3600 seconds.
fn refresh_seconds(refresh: Option<&str>) -> Option<u32> {
    let seconds: u32 = refresh?.trim().parse().ok()?;
    (seconds > 0).then_some(seconds.clamp(5, 3600))
}

/// The auto-refresh period the console offers.
const REFRESH_SECONDS: u32 = 30;

/// `text` for a URL query (unreserved characters kept, the rest `%XX`).
fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[derive(Template)]
#[template(path = "console/leases.html")]
struct LeasesPage {
    page: &'static str,
    user: String,
    csrf: String,
    flash: Option<String>,
    station: String,
    user_filter: String,
    component: String,
    host: String,
    key: String,
    sort: String,
    order: String,
    list: LeaseListing,
    /// Auto-refresh: the period when on, and the link switching it.
    refresh: Option<u32>,
    refresh_toggle: String,
}

#[derive(Template)]
#[template(path = "console/leases_table.html")]
struct LeasesTable {
    list: LeaseListing,
}

async fn leases_page(
    State(state): State<SharedState>,
    user: ConsoleUser,
    Query(filter): Query<LeaseFilter>,
) -> Response {
    let list = filter.listing(&state);
    let refresh = filter.refresh();
    render(&LeasesPage {
        page: "leases",
        user: user.name.clone(),
        csrf: user.csrf.clone(),
        flash: filter
            .released
            .as_ref()
            .map(|station| format!("Released the lease of {station}.")),
        list,
        refresh,
        refresh_toggle: format!(
            "/leases?{}",
            filter.with_refresh(match refresh {
                Some(_) => None,
                None => Some(REFRESH_SECONDS),
            })
        ),
        sort: tessera_core::LeaseSort::parse(filter.sort.trim())
            .unwrap_or_default()
            .name()
            .to_string(),
        order: if filter.order.trim() == "desc" {
            "desc".into()
        } else {
            "asc".into()
        },
        station: filter.station,
        user_filter: filter.user,
        component: filter.component,
        host: filter.host,
        key: filter.key,
    })
}

async fn leases_table(
    State(state): State<SharedState>,
    _user: ConsoleUser,
    Query(filter): Query<LeaseFilter>,
) -> Response {
    render(&LeasesTable {
        list: filter.listing(&state),
    })
}

/// A console upload form's fields: its CSRF token and the file (if one was sent).
async fn read_upload(
    multipart: &mut Multipart,
) -> Result<(String, Option<Bytes>), axum::extract::multipart::MultipartError> {
    let mut csrf = String::new();
    let mut file: Option<Bytes> = None;
    loop {
        match multipart.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().unwrap_or_default().to_string();
                let Ok(data) = field.bytes().await else {
                    break;
                };
                match name.as_str() {
                    "csrf" => csrf = String::from_utf8_lossy(&data).into_owned(),
                    "file" => file = Some(data),
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(error) => return Err(error),
        }
    }
    Ok((csrf, file))
}

/// `POST /keys/upload` (multipart: `csrf`, `file`): adds a key file, as `tessera keys add`.
async fn upload_key(
    State(state): State<SharedState>,
    user: ConsoleUser,
    mut multipart: Multipart,
) -> Response {
    let (csrf, file) = match read_upload(&mut multipart).await {
        Ok(upload) => upload,
        Err(error) => {
            return keys_page_with(&state, &user, None, Some(format!("upload: {error}")));
        }
    };
    if let Err(response) = user.check_csrf(&csrf) {
        return response;
    }
    let Some(file) = file.filter(|file| !file.is_empty()) else {
        return keys_page_with(&state, &user, None, Some("choose a key file to add".into()));
    };
    let result = match tessera_core::LicenseKey::from_json(&String::from_utf8_lossy(&file)) {
        Ok(key) => state.import_key(key).await,
        Err(error) => Err(ApiError::Refused(Refusal::KeyRejected { error })),
    };
    user.record(
        &state,
        "console.key_import",
        serde_json::json!({"ok": result.is_ok(), "key_id": result.as_ref().ok()}),
    );
    match result {
        Ok(key_id) => keys_page_with(
            &state,
            &user,
            Some(format!("Added license key {key_id}.")),
            None,
        ),
        Err(error) => keys_page_with(
            &state,
            &user,
            None,
            Some(format!(
                "The key was not added ({}): {error}",
                error.status_and_code().1
            )),
        ),
    }
}

#[derive(Template)]
#[template(path = "console/remove_key.html")]
struct RemoveKeyPage {
    page: &'static str,
    user: String,
    csrf: String,
    flash: Option<String>,
    key_id: String,
    /// Leases removing the key ends, and the first of them.
    ending: usize,
    stations: Vec<LeaseRow>,
}

/// The confirmation step of removing a key: what it ends.
async fn remove_key_confirm(
    State(state): State<SharedState>,
    user: ConsoleUser,
    Path(key_id): Path<String>,
) -> Result<Response, ApiError> {
    if !state
        .consensus
        .read(|ledger| ledger.keys(0).iter().any(|k| k.id == key_id))
    {
        return Err(Refusal::KeyNotFound { key_id }.into());
    }
    let filter = tessera_core::LeaseFilter {
        key: Some(&key_id),
        ..Default::default()
    };
    let page = state.lease_page(&filter, None, 20);
    Ok(render(&RemoveKeyPage {
        page: "keys",
        user: user.name.clone(),
        csrf: user.csrf.clone(),
        flash: None,
        ending: page.total as usize,
        stations: page.leases.iter().map(LeaseRow::from).collect(),
        key_id,
    }))
}

/// The confirmed removal.
async fn remove_key(
    State(state): State<SharedState>,
    user: ConsoleUser,
    Path(key_id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(response) = user.check_csrf(&form.csrf) {
        return response;
    }
    let result = state.remove_key(key_id.clone()).await;
    user.record(
        &state,
        "console.key_remove",
        serde_json::json!({"key_id": key_id, "ok": result.is_ok()}),
    );
    match result {
        Ok((key_id, ended)) => keys_page_with(
            &state,
            &user,
            Some(format!(
                "Removed license key {key_id}; {ended} leases ended."
            )),
            None,
        ),
        Err(error) => keys_page_with(
            &state,
            &user,
            None,
            Some(format!(
                "The key was not removed ({}): {error}",
                error.status_and_code().1
            )),
        ),
    }
}

#[derive(Template)]
#[template(path = "console/release.html")]
struct ReleasePage {
    page: &'static str,
    user: String,
    csrf: String,
    flash: Option<String>,
    lease: LeaseRow,
}

async fn release_confirm(
    State(state): State<SharedState>,
    user: ConsoleUser,
    Path(lease_id): Path<String>,
) -> Result<Response, ApiError> {
    let lease =
        state
            .lease(&lease_id)
            .as_ref()
            .map(LeaseRow::from)
            .ok_or(Refusal::LeaseNotFound {
                lease_id: lease_id.clone(),
            })?;
    Ok(render(&ReleasePage {
        page: "leases",
        user: user.name.clone(),
        csrf: user.csrf.clone(),
        flash: None,
        lease,
    }))
}

async fn release(
    State(state): State<SharedState>,
    user: ConsoleUser,
    Path(lease_id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, ApiError> {
    if let Err(response) = user.check_csrf(&form.csrf) {
        return Ok(response);
    }
    let lease = state.release(lease_id.clone(), true).await?;
    user.record(
        &state,
        "console.force_release",
        serde_json::json!({"lease_id": lease_id, "station": lease.station}),
    );
    let station: String = url_encode(&lease.station);
    Ok(Redirect::to(&format!("/leases?released={station}")).into_response())
}

fn url_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------- usage

#[derive(Template)]
#[template(path = "console/usage.html")]
struct UsagePage {
    page: &'static str,
    user: String,
    csrf: String,
    flash: Option<String>,
    bucket: String,
    buckets: Vec<(&'static str, &'static str)>,
    range_label: String,
    from_date: String,
    to_date: String,
    chart: chart::Chart,
    refresh: Option<u32>,
    refresh_path: &'static str,
}

#[derive(Debug, Default, Deserialize)]
struct UsageQuery {
    bucket: Option<String>,
    refresh: Option<String>,
}

async fn usage_page(
    State(state): State<SharedState>,
    user: ConsoleUser,
    Query(query): Query<UsageQuery>,
) -> Result<Response, ApiError> {
    let bucket = match query.bucket.as_deref() {
        Some("day") => "day",
        Some("month") => "month",
        _ => "hour",
    };
    let (bucket_ms, count, label) = match bucket {
        "day" => (86_400_000i64, 30i64, "last 30 days, per day"),
        "month" => (30 * 86_400_000i64, 12i64, "last 12 months, per 30 days"),
        _ => (3_600_000i64, 24i64, "last 24 hours, per hour"),
    };
    let now_ms = state.stamper.now_ms();
    let to_ms = (now_ms.div_euclid(bucket_ms) + 1) * bucket_ms;
    let from_ms = to_ms - count * bucket_ms;
    let series = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || state.history.chart(from_ms, to_ms, bucket_ms))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(e.to_string()))?
    };
    let licenses: std::collections::BTreeMap<String, u32> = state
        .read(|ledger| crate::state::component_totals(ledger, now_ms))
        .into_iter()
        .map(|(component, status)| (component, status.licenses))
        .collect();
    let chart = chart::Chart::build(&series, &licenses, from_ms, bucket_ms, bucket);
    let date = |ms: i64| timestamp(ms).strftime("%Y-%m-%d").to_string();
    Ok(render(&UsagePage {
        page: "usage",
        user: user.name.clone(),
        csrf: user.csrf.clone(),
        flash: None,
        bucket: bucket.to_string(),
        buckets: vec![("hour", "Hours"), ("day", "Days"), ("month", "Months")],
        range_label: label.to_string(),
        from_date: date(from_ms),
        to_date: date(to_ms - 1),
        chart,
        refresh: refresh_seconds(query.refresh.as_deref()),
        refresh_path: "/usage",
    }))
}

async fn usage_csv(
    State(state): State<SharedState>,
    _user: ConsoleUser,
    Query(mut query): Query<reports::UsageQuery>,
) -> Result<Response, ApiError> {
    query.format = Some("csv".into());
    reports::usage_answer(&state, &query).await
}

// ---------------------------------------------------------------- sync

#[derive(Template)]
#[template(path = "console/sync.html")]
struct SyncPage {
    page: &'static str,
    user: String,
    csrf: String,
    flash: Option<String>,
    error: Option<String>,
    server_id: String,
    synchronized: bool,
    last_sync: String,
    deadline: String,
    days_left: String,
    awaiting: String,
    renewals: String,
    schedule: String,
    authority: String,
    has_authority: bool,
    /// The authority refused this server's syncs (`server_cloned` / `server_rolled_back`).
    blocked: Option<(String, String)>,
}

fn sync_page_with(
    state: &SharedState,
    user: &ConsoleUser,
    flash: Option<String>,
    error: Option<String>,
) -> Response {
    let sync = state.sync_status();
    let none = || "—".to_string();
    render(&SyncPage {
        page: "sync",
        user: user.name.clone(),
        csrf: user.csrf.clone(),
        flash,
        error,
        server_id: sync.server_id.clone().unwrap_or_else(|| "(none)".into()),
        synchronized: sync.synchronized,
        last_sync: sync.last_sync_at.map(fmt_ts).unwrap_or_else(none),
        deadline: sync.deadline.map(fmt_ts).unwrap_or_else(none),
        days_left: sync.days_left.map(|d| d.to_string()).unwrap_or_else(none),
        awaiting: sync
            .awaiting_sequence
            .map(|s| format!("request #{s}"))
            .unwrap_or_else(none),
        renewals: if sync.renewals.is_empty() {
            none()
        } else {
            sync.renewals.join(", ")
        },
        schedule: sync.schedule.clone(),
        authority: sync.authority.clone().unwrap_or_else(none),
        has_authority: sync.authority.is_some(),
        blocked: sync
            .blocked
            .as_ref()
            .map(|blocked| (blocked.code.clone(), blocked.message.clone())),
    })
}

async fn sync_page(State(state): State<SharedState>, user: ConsoleUser) -> Response {
    sync_page_with(&state, &user, None, None)
}

async fn sync_now(
    State(state): State<SharedState>,
    user: ConsoleUser,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(response) = user.check_csrf(&form.csrf) {
        return response;
    }
    let result = state.sync_online().await;
    user.record(
        &state,
        "console.sync_online",
        serde_json::json!({"ok": result.is_ok()}),
    );
    match result {
        Ok(summary) => sync_page_with(
            &state,
            &user,
            Some(format!(
                "Synchronized (#{}): {} keys imported, {} revoked.",
                summary.sequence,
                summary.imported.len(),
                summary.revoked.len()
            )),
            None,
        ),
        Err(error) => sync_page_with(&state, &user, None, Some(error.to_string())),
    }
}

/// The console's "check for updates and replace license keys": what `tessera keys update`
/// does (sync first when an authority is set, then the automatic key update).
async fn update_keys(
    State(state): State<SharedState>,
    user: ConsoleUser,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(response) = user.check_csrf(&form.csrf) {
        return response;
    }
    let result = state.update_keys().await;
    user.record(
        &state,
        "console.update_keys",
        serde_json::json!({"ok": result.is_ok()}),
    );
    match result {
        Ok(report) => {
            let mut lines = Vec::new();
            if let Some(error) = &report.sync_error {
                lines.push(format!(
                    "Synchronization failed ({error}); renewal keys already held were checked."
                ));
            }
            if report.renewals.is_empty() {
                lines.push("No renewal key held: nothing to replace.".to_string());
            }
            for renewal in &report.renewals {
                lines.push(if renewal.allocated {
                    format!(
                        "{} replaced by {} (allocated to everything it served).",
                        renewal.key_id, renewal.renewal_key_id
                    )
                } else {
                    format!(
                        "{} cannot be automatically updated: {} (renewal key {} added, not allocated).",
                        renewal.key_id,
                        renewal.reason.as_deref().unwrap_or("see the notification"),
                        renewal.renewal_key_id
                    )
                });
            }
            if report.leases_moved + report.leases_ended > 0 {
                lines.push(format!(
                    "{} leases moved to renewal keys, {} ended.",
                    report.leases_moved, report.leases_ended
                ));
            }
            sync_page_with(&state, &user, Some(lines.join(" ")), None)
        }
        Err(error) => sync_page_with(&state, &user, None, Some(error.to_string())),
    }
}

async fn sync_request(
    State(state): State<SharedState>,
    user: ConsoleUser,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(response) = user.check_csrf(&form.csrf) {
        return response;
    }
    let result = state.export_sync_request().await;
    user.record(
        &state,
        "console.sync_export",
        serde_json::json!({"ok": result.is_ok()}),
    );
    match result.and_then(|request| {
        serde_json::to_string_pretty(&request).map_err(|e| ApiError::Internal(e.to_string()))
    }) {
        Ok(text) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"request.tsync\"",
                ),
            ],
            text,
        )
            .into_response(),
        Err(error) => sync_page_with(&state, &user, None, Some(error.to_string())),
    }
}

async fn sync_response(
    State(state): State<SharedState>,
    user: ConsoleUser,
    mut multipart: Multipart,
) -> Response {
    let (csrf, file) = match read_upload(&mut multipart).await {
        Ok(upload) => upload,
        Err(error) => {
            return sync_page_with(&state, &user, None, Some(format!("upload: {error}")));
        }
    };
    if let Err(response) = user.check_csrf(&csrf) {
        return response;
    }
    let Some(file) = file else {
        return sync_page_with(&state, &user, None, Some("no file uploaded".into()));
    };
    let text = String::from_utf8_lossy(&file);
    let result = match SyncResponse::from_json(&text) {
        Ok(response) => state.import_sync_response(response).await,
        Err(error) => Err(ApiError::Refused(Refusal::SyncRejected { error })),
    };
    user.record(
        &state,
        "console.sync_import",
        serde_json::json!({"ok": result.is_ok()}),
    );
    match result {
        Ok(summary) => sync_page_with(
            &state,
            &user,
            Some(format!(
                "Response #{} imported: {} keys imported, {} revoked, {} renewal keys.",
                summary.sequence,
                summary.imported.len(),
                summary.revoked.len(),
                summary.renewals.len()
            )),
            None,
        ),
        Err(error) => sync_page_with(&state, &user, None, Some(error.to_string())),
    }
}

// ---------------------------------------------------------------- events

struct EventRow {
    at: Time,
    kind: String,
    severity: String,
    message: String,
}

#[derive(Template)]
#[template(path = "console/events.html")]
struct EventsPage {
    page: &'static str,
    user: String,
    csrf: String,
    flash: Option<String>,
    events: Vec<EventRow>,
    audit: crate::audit::Verification,
    audit_head: String,
    audit_broken: String,
    audit_reason: String,
    /// The whole chain was walked (else the records after the last intact check).
    full: bool,
    records: Vec<AuditRow>,
    events_total: usize,
    refresh: Option<u32>,
    refresh_path: &'static str,
}

struct AuditRow {
    seq: i64,
    at: Time,
    actor: String,
    action: String,
    details: String,
}

/// The newest intact audit head the events page verified, `(seq, hash)`: the page checks only
/// the records after it (and that it is unchanged), so its cost does not grow with the chain;
/// `?verify=full` walks the whole chain.
#[derive(Debug, Default)]
pub struct AuditCheckpoint(std::sync::Mutex<Option<(i64, String)>>);

#[derive(Debug, Default, Deserialize)]
struct EventsQuery {
    /// `full`: check the whole audit chain now.
    verify: Option<String>,
    refresh: Option<String>,
}

/// Notifications the events page lists (the newest).
const EVENT_ROWS: usize = 100;

async fn events_page(
    State(state): State<SharedState>,
    Extension(checkpoint): Extension<Arc<AuditCheckpoint>>,
    user: ConsoleUser,
    Query(query): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    let full = query.verify.as_deref() == Some("full");
    let audit = {
        let state = state.clone();
        let checkpoint = checkpoint.clone();
        tokio::task::spawn_blocking(move || {
            let from = if full {
                None
            } else {
                checkpoint.0.lock().expect("checkpoint lock").clone()
            };
            let verification = state.history.verify_since(from);
            if let Ok(verification) = &verification {
                let mut checkpoint = checkpoint.0.lock().expect("checkpoint lock");
                *checkpoint = match (&verification.head_hash, verification.ok) {
                    (Some(head), true) => Some((verification.records, head.clone())),
                    _ => None,
                };
            }
            verification
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?
    };
    let records = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || state.history.recent_audit(100))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(e.to_string()))?
    };
    let records = records
        .into_iter()
        .map(|record| AuditRow {
            seq: record.seq,
            at: Time::of(timestamp(record.at_ms)),
            actor: record.actor,
            action: record.action,
            details: record.details,
        })
        .collect();
    let recent = state.notifier.recent();
    let events_total = recent.len();
    let events = recent
        .into_iter()
        .take(EVENT_ROWS)
        .map(|event| EventRow {
            at: Time::of(event.at),
            kind: event.kind,
            severity: event.severity,
            message: event.message,
        })
        .collect();
    Ok(render(&EventsPage {
        page: "events",
        user: user.name.clone(),
        csrf: user.csrf.clone(),
        flash: None,
        events,
        audit_head: audit.head_hash.clone().unwrap_or_default(),
        audit_broken: audit.broken_seq.map(|s| s.to_string()).unwrap_or_default(),
        audit_reason: audit.reason.clone().unwrap_or_default(),
        audit,
        full,
        records,
        events_total,
        refresh: refresh_seconds(query.refresh.as_deref()),
        refresh_path: "/events",
    }))
}

// ---------------------------------------------------------------- neighbours

struct NeighbourRow {
    id: String,
    url: String,
    relation: String,
    connection: String,
    send: bool,
    receive: bool,
    last_contact: String,
    last_error: String,
    last_mismatch: String,
    donations: Vec<DonationRow>,
    received: Vec<ReceivedRow>,
    report_at: String,
    report_period: String,
    usage: Vec<UsageRow>,
}

struct DonationRow {
    key_id: String,
    licenses: u32,
    donated_now: u32,
    state: String,
    serial: u64,
    lease_until: String,
    donation_until: String,
}

struct ReceivedRow {
    key_id: String,
    licenses: u32,
    in_use: u32,
    donated_out: u32,
    serial: u64,
    usable_until: String,
}

struct UsageRow {
    component: String,
    active_stations: u32,
    in_use: u32,
}

#[derive(Template)]
#[template(path = "console/neighbours.html")]
struct NeighboursPage {
    page: &'static str,
    user: String,
    csrf: String,
    flash: Option<String>,
    error: Option<String>,
    server_id: String,
    public_key: String,
    renewal_period: String,
    sync_period: String,
    report_period: String,
    station_period: String,
    preliminary: String,
    neighbours: Vec<NeighbourRow>,
    /// Keys (and received pools) this server can donate from.
    keys: Vec<String>,
    /// Neighbours this server may donate to.
    targets: Vec<String>,
}

fn duration_text(duration: std::time::Duration) -> String {
    humantime::format_duration(duration).to_string()
}

fn neighbours_page_with(
    state: &SharedState,
    user: &ConsoleUser,
    flash: Option<String>,
    error: Option<String>,
) -> Response {
    let view = state.neighbours_summary();
    let never = || "never".to_string();
    let neighbours = view
        .neighbours
        .into_iter()
        .map(|n| NeighbourRow {
            last_contact: n.last_contact.map(fmt_ts).unwrap_or_else(never),
            last_error: n.last_error.unwrap_or_default(),
            last_mismatch: n.last_mismatch.unwrap_or_default(),
            donations: n
                .donations
                .into_iter()
                .map(|d| DonationRow {
                    key_id: d.key_id,
                    licenses: d.licenses,
                    donated_now: d.donated_now,
                    state: d.state,
                    serial: d.serial,
                    lease_until: fmt_ts(d.lease_until),
                    donation_until: fmt_ts(d.donation_until),
                })
                .collect(),
            received: n
                .received
                .into_iter()
                .map(|r| ReceivedRow {
                    key_id: r.key_id,
                    licenses: r.licenses,
                    in_use: r.in_use,
                    donated_out: r.donated_out,
                    serial: r.serial,
                    usable_until: fmt_ts(r.usable_until),
                })
                .collect(),
            report_at: n.usage.as_ref().map(|u| fmt_ts(u.at)).unwrap_or_default(),
            report_period: n
                .usage
                .as_ref()
                .map(|u| duration_text(std::time::Duration::from_secs(u.period_s.max(0) as u64)))
                .unwrap_or_default(),
            usage: n
                .usage
                .map(|u| {
                    let components: std::collections::BTreeSet<&String> =
                        u.active_stations.keys().chain(u.in_use.keys()).collect();
                    components
                        .into_iter()
                        .map(|c| UsageRow {
                            component: c.clone(),
                            active_stations: u.active_stations.get(c).copied().unwrap_or(0),
                            in_use: u.in_use.get(c).copied().unwrap_or(0),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            id: n.id,
            url: n.url,
            relation: n.relation,
            connection: n.connection,
            send: n.send,
            receive: n.receive,
        })
        .collect();
    let keys = state
        .status_with(true)
        .keys
        .into_iter()
        .filter(|k| k.state == "active")
        .map(|k| k.key_id)
        .collect();
    let targets = state
        .config
        .neighbours
        .iter()
        .filter(|n| n.send)
        .map(|n| n.id.clone())
        .collect();
    let settings = &state.config.licenses;
    render(&NeighboursPage {
        page: "neighbours",
        user: user.name.clone(),
        csrf: user.csrf.clone(),
        flash,
        error,
        server_id: view.server_id.unwrap_or_else(|| "(none)".into()),
        public_key: state.identity.public_key().to_base64(),
        renewal_period: duration_text(settings.donation_renewal_period),
        sync_period: duration_text(settings.sync_period),
        report_period: duration_text(settings.usage_report_period),
        station_period: duration_text(settings.active_station_period),
        preliminary: duration_text(settings.preliminary_renewal_interval),
        neighbours,
        keys,
        targets,
    })
}

async fn neighbours_page(State(state): State<SharedState>, user: ConsoleUser) -> Response {
    neighbours_page_with(&state, &user, None, None)
}

#[derive(Debug, Deserialize)]
struct DonateForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    key_id: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    licenses: String,
    #[serde(default)]
    until: String,
}

async fn neighbours_donate(
    State(state): State<SharedState>,
    user: ConsoleUser,
    Form(form): Form<DonateForm>,
) -> Response {
    if let Err(response) = user.check_csrf(&form.csrf) {
        return response;
    }
    let result = match form.licenses.trim().parse::<u32>() {
        Ok(licenses) => {
            state
                .donate(tessera_api::DonateRequest {
                    key_id: form.key_id.clone(),
                    to: form.to.clone(),
                    licenses,
                    until: form.until.clone(),
                })
                .await
        }
        Err(_) => Err(ApiError::BadRequest {
            code: "invalid_request",
            message: format!("licenses = {:?} is not a number", form.licenses),
        }),
    };
    user.record(
        &state,
        "console.donate",
        serde_json::json!({"key_id": form.key_id, "to": form.to, "licenses": form.licenses, "until": form.until, "ok": result.is_ok()}),
    );
    match result {
        Ok(d) => neighbours_page_with(
            &state,
            &user,
            Some(format!(
                "{} licenses of {} donated to {} until {}.",
                d.licenses,
                d.key_id,
                d.to,
                fmt_ts(d.donation_until)
            )),
            None,
        ),
        Err(error) => neighbours_page_with(&state, &user, None, Some(error.to_string())),
    }
}

#[derive(Debug, Deserialize)]
struct EndDonationForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    key_id: String,
    #[serde(default)]
    to: String,
}

async fn neighbours_end(
    State(state): State<SharedState>,
    user: ConsoleUser,
    Form(form): Form<EndDonationForm>,
) -> Response {
    if let Err(response) = user.check_csrf(&form.csrf) {
        return response;
    }
    let result = state
        .end_donation(form.key_id.clone(), form.to.clone())
        .await;
    user.record(
        &state,
        "console.end_donation",
        serde_json::json!({"key_id": form.key_id, "to": form.to, "ok": result.is_ok()}),
    );
    match result {
        Ok(d) => neighbours_page_with(
            &state,
            &user,
            Some(format!(
                "The donation of {} to {} ended: {} licenses still counted until the neighbour gives them back.",
                d.key_id, d.to, d.donated_now
            )),
            None,
        ),
        Err(error) => neighbours_page_with(&state, &user, None, Some(error.to_string())),
    }
}
