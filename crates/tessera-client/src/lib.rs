//! Rust SDK for Tessera license servers: typed calls over HTTP/JSON.
//!
//! Errors keep the server's stable code (`no_licenses_available`, `lease_not_found`, ...) so
//! callers can branch on it.
//!
//! # Domains and failover
//! [`Client::new`] takes one URL or a comma-separated list of the domain's hosts, in host
//! order. Each call goes first to the host that answered last, then to the others in the
//! order given; a host that cannot be reached or answers 503 `no_quorum` / `not_primary` /
//! `unavailable` is skipped, and the rounds repeat (100 ms apart) for up to
//! [`FAILOVER_BUDGET`]. Any other answer (success or a refusal such as
//! `no_licenses_available`) is final. Backups forward writes to the primary and redirects are
//! followed, so whichever host answers speaks for the domain. A checkout redirected to a
//! neighbour serving the component (307 `component_elsewhere`) is followed too, and that
//! lease's heartbeats and checkin go to the neighbour ([`Client::lease_server`]). A lease lives in the replicated
//! ledger, so its id stays valid across a failover: heartbeat through any host.
//!
//! **The host list is learned.** Given any one host of a domain or a redundant pair, the
//! client asks it, at its first lease call, for the domain's hosts (`GET /v1/domain`) and
//! adds the ones it was not given (as `scheme://address`), so a station's checkout, heartbeat
//! and checkin fail over to the backup as the reference's products do ("automatically
//! populated"); clones share the list. Administration and status calls address only the
//! hosts given.
//!
//! [`LeaseGuard`] holds a lease, heartbeats it in the background and checks it in on drop.

pub mod blocking;
pub mod borrow;
mod guard;

pub use borrow::{BorrowStore, Borrowed};
pub use guard::{GuardEvent, GuardEvents, LeaseGuard};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use tessera_api::{
    AllocateRequest, CheckoutRequest, ErrorBody, Health, KeyImported, KeyRemoved, KeySummary,
    KeyUpdateReport, Lease, Status, SyncStatus, SyncSummary,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("cannot reach {url}: {message}")]
    Transport { url: String, message: String },
    #[error("unexpected answer from {url}: {message}")]
    Decode { url: String, message: String },
    /// The server granted a lease, but it does not check out against the vendor's root key
    /// (see [`Client::verifying`]): the application must not run on it. `check` names the
    /// check that failed (`key`, `signature`, `nonce`, `expired`, `certificate`, …).
    #[error("lease_untrusted ({check}): {message}")]
    Untrusted { check: String, message: String },
    /// The call cannot be made as asked (nothing was sent): the message says why.
    #[error("invalid_argument: {message}")]
    Invalid { message: String },
}

impl ClientError {
    /// The server's error code, if the server answered with one; `lease_untrusted` for a
    /// lease that failed the vendor's checks.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            ClientError::Untrusted { .. } => Some("lease_untrusted"),
            ClientError::Invalid { .. } => Some("invalid_argument"),
            _ => None,
        }
    }
}

/// The application's clock in milliseconds since the Unix epoch (the system clock unless a
/// test gives another, [`Client::with_clock`]).
#[derive(Clone)]
struct AppClock(Option<Arc<dyn Fn() -> i64 + Send + Sync>>);

impl AppClock {
    fn now_ms(&self) -> i64 {
        match &self.0 {
            Some(clock) => clock(),
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        }
    }

    /// Milliseconds on a clock that only moves forward (the system's monotonic clock, which
    /// setting the date does not change; a given clock stands in for it in tests): for
    /// measuring how long the application has gone without a server.
    fn monotonic_ms(&self) -> i64 {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        match &self.0 {
            Some(clock) => clock(),
            None => START
                .get_or_init(std::time::Instant::now)
                .elapsed()
                .as_millis() as i64,
        }
    }
}

impl std::fmt::Debug for AppClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "AppClock(given)"
        } else {
            "AppClock(system)"
        })
    }
}

/// How far the application's clock may disagree with the server's when a lease token's
/// times are checked.
pub const CLOCK_TOLERANCE: Duration = Duration::from_secs(60);

/// This machine's station identity: a hash of the operating system's machine id
/// (`/etc/machine-id`, else `/var/lib/dbus/machine-id`), so the same machine asking again
/// gets its lease back and the name is not one a user picks. The hash keeps the machine id
/// itself off the network. `None` where the system has no machine id.
pub fn machine_fingerprint() -> Option<String> {
    use sha2::Digest;
    let id = ["/etc/machine-id", "/var/lib/dbus/machine-id"]
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok())
        .map(|text| text.trim().to_string())
        .filter(|id| !id.is_empty())?;
    let mut hash = sha2::Sha256::new();
    hash.update(b"tessera-station/v1\n");
    hash.update(id.as_bytes());
    Some(hex::encode(&hash.finalize()[..16]))
}

/// The station identity the SDKs send: [`machine_fingerprint`], or on a system without a
/// machine id the host name.
pub fn station_identity() -> String {
    machine_fingerprint().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown-station".into())
    })
}

/// A fresh random nonce (128 bits, hex).
fn nonce() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the system's random source");
    hex::encode(bytes)
}

/// How long a call keeps trying the hosts of a domain before giving up with the last error.
/// An election after the primary dies takes well under a second.
pub const FAILOVER_BUDGET: Duration = Duration::from_secs(5);
/// Pause between two rounds over all hosts.
pub const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// The one host, or the hosts of a domain; clones share which host answered last.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    /// The hosts given (they come first), then the ones learned.
    hosts: Arc<std::sync::RwLock<Vec<String>>>,
    /// How many of `hosts` were given: administration and status calls address only those.
    given: usize,
    /// Whether lease calls learn and use the domain's other hosts ([`Client::pinned`]: no).
    learn: bool,
    /// Whether the domain's host list was asked for (once, at the first call).
    learned: Arc<std::sync::atomic::AtomicBool>,
    current: Arc<AtomicUsize>,
    token: Option<String>,
    /// Leases granted by a neighbour the checkout was redirected to: lease id → that server.
    homes: Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
    /// The holder's secret of each lease this client checked out (or was given).
    secrets: Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
    /// The vendor's root key the application embeds: when set, every lease is checked
    /// against it ([`Client::verifying`]).
    vendor_root: Option<tessera_core::PublicKey>,
    clock: AppClock,
    /// Why the HTTP client could not be set up as asked (`$TESSERA_CA` unreadable): every
    /// call fails with it.
    setup_error: Option<String>,
}

/// The HTTP client of the SDK: HTTPS (rustls) trusting the system's roots and `ca` (`None`:
/// `$TESSERA_CA`, if set); `exactly`: not reading the environment.
fn http_client(
    ca: Option<&std::path::Path>,
    exactly: bool,
) -> Result<reqwest::Client, HttpSetupError> {
    let builder = if exactly {
        tessera_tls::client_builder_exactly(ca)
    } else {
        tessera_tls::client_builder(ca)
    };
    Ok(builder?
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(1))
        .build()?)
}

/// Why the SDK's HTTP client could not be set up.
#[derive(Debug, thiserror::Error)]
enum HttpSetupError {
    #[error(transparent)]
    Tls(#[from] tessera_tls::TlsError),
    #[error(transparent)]
    Http(#[from] reqwest::Error),
}

/// The header carrying a lease's secret on heartbeat and checkin.
pub const LEASE_SECRET_HEADER: &str = "x-lease-secret";
/// The header carrying a heartbeat's nonce (returned inside the signed lease token).
pub const LEASE_NONCE_HEADER: &str = "x-lease-nonce";

/// One answer: status, body, and where a redirect led (see [`Client::checkout`]).
struct Reply {
    status: StatusCode,
    text: String,
    redirected_to: Option<String>,
}

/// The server a redirected checkout landed on: its URL up to `/v1/leases`.
fn lease_home(url: &reqwest::Url) -> Option<String> {
    let text = url.as_str();
    let end = text.find("/v1/leases")?;
    Some(text[..end].to_string())
}

/// Whether an error means "try another host of the domain".
fn try_elsewhere(error: &ClientError) -> bool {
    match error {
        ClientError::Transport { .. } => true,
        ClientError::Api { status, code, .. } => {
            *status == 503
                && matches!(
                    code.as_str(),
                    "no_quorum" | "not_primary" | "unavailable" | "pair_recovering" | "overloaded"
                )
        }
        ClientError::Decode { .. }
        | ClientError::Untrusted { .. }
        | ClientError::Invalid { .. } => false,
    }
}

impl Client {
    /// `servers`: one URL, or the domain's hosts as a comma-separated list in host order
    /// (`http://127.0.0.1:7400,http://127.0.0.1:7401`).
    pub fn new(servers: &str, token: Option<String>) -> Client {
        let hosts: Vec<String> = servers
            .split(',')
            .map(|url| url.trim().trim_end_matches('/').to_string())
            .filter(|url| !url.is_empty())
            .collect();
        Client::with_hosts(hosts, token)
    }

    /// A client over several hosts, tried in the given order. HTTPS trusts the system's
    /// roots plus the CA in `$TESSERA_CA`, if set ([`Client::with_ca_file`] names one).
    pub fn with_hosts(hosts: Vec<String>, token: Option<String>) -> Client {
        let (http, setup_error) = match http_client(None, false) {
            Ok(http) => (http, None),
            // `$TESSERA_CA` cannot be read: every call says so.
            Err(error) => (
                http_client(None, true).unwrap_or_default(),
                Some(format!("{}: {error}", tessera_tls::CA_ENV)),
            ),
        };
        let hosts = hosts
            .into_iter()
            .map(|url| url.trim_end_matches('/').to_string())
            .collect();
        let hosts: Vec<String> = hosts;
        Client {
            http,
            given: hosts.len(),
            learn: true,
            hosts: Arc::new(std::sync::RwLock::new(hosts)),
            learned: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            current: Arc::new(AtomicUsize::new(0)),
            token,
            homes: Arc::default(),
            secrets: Arc::default(),
            vendor_root: None,
            clock: AppClock(None),
            setup_error,
        }
    }

    /// This client trusting the CA (PEM) in `path` for HTTPS, besides the system's roots
    /// (`--ca` of the CLI).
    pub fn with_ca_file(mut self, path: &std::path::Path) -> Result<Client, ClientError> {
        self.http = http_client(Some(path), true).map_err(|error| ClientError::Invalid {
            message: error.to_string(),
        })?;
        self.setup_error = None;
        Ok(self)
    }

    /// A client of exactly the hosts given, which never learns others: for tools and tests
    /// that must hear what one host answers (a cut-off host's `no_quorum`, say).
    pub fn pinned(servers: &str, token: Option<String>) -> Client {
        Client {
            learn: false,
            ..Client::new(servers, token)
        }
    }

    /// The host that answered last (the first one before any call).
    pub fn base_url(&self) -> String {
        let index = self.current.load(Ordering::Relaxed);
        self.hosts().get(index).cloned().unwrap_or_default()
    }

    /// The hosts this client tries: those it was given, then those it learned.
    pub fn hosts(&self) -> Vec<String> {
        self.hosts
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Once per client: asks the first host that answers for the domain's hosts and adds the
    /// ones not given. A single server (or a host that cannot say) adds nothing.
    async fn learn_hosts(&self) {
        if self.learned.load(Ordering::Relaxed) {
            return;
        }
        for base in self.hosts() {
            let Ok(response) = self
                .http
                .get(format!("{base}/v1/domain"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            else {
                continue;
            };
            let Ok(status) = response.json::<DomainStatus>().await else {
                continue;
            };
            let scheme = base.split_once("://").map_or("http", |(scheme, _)| scheme);
            let mut hosts = self
                .hosts
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // A host listening on every interface names no address a client can use.
            let usable =
                |address: &&str| !(address.starts_with("0.0.0.0:") || address.starts_with("[::]:"));
            for address in status
                .hosts
                .iter()
                .filter_map(|h| h.address.as_deref())
                .filter(usable)
            {
                let url = format!("{scheme}://{address}");
                if !hosts.iter().any(|known| known == &url) {
                    hosts.push(url);
                }
            }
            self.learned.store(true, Ordering::Relaxed);
            return;
        }
    }

    /// Sends to the hosts in turn (see the crate docs); returns the answer and whether an
    /// earlier attempt failed in transport (so it may have reached the server and taken
    /// effect before the answer was lost).
    async fn send_counted(
        &self,
        method: Method,
        path: &str,
        body: Option<(String, &'static str)>,
    ) -> (Result<Reply, ClientError>, bool) {
        self.send_counted_with(method, path, body, None).await
    }

    /// [`Client::send_counted`] with one more header (a heartbeat's nonce).
    async fn send_counted_with(
        &self,
        method: Method,
        path: &str,
        body: Option<(String, &'static str)>,
        extra: Option<(&'static str, &str)>,
    ) -> (Result<Reply, ClientError>, bool) {
        // Station calls (leases) fail over to learned hosts too; administration and status
        // address the hosts given (`--server B` asks B, not whichever host answers).
        let mut hosts = self.hosts();
        if self.learn && path.starts_with("/v1/leases") {
            self.learn_hosts().await;
            hosts = self.hosts();
        } else {
            hosts.truncate(self.given);
        }
        if hosts.len() <= 1 {
            let base = hosts.first().cloned().unwrap_or_default();
            return (self.send_to(&base, method, path, body, extra).await, false);
        }
        let deadline = tokio::time::Instant::now() + FAILOVER_BUDGET;
        let mut uncertain = false;
        loop {
            let first = self.current.load(Ordering::Relaxed).min(hosts.len() - 1);
            let order = std::iter::once(first).chain((0..hosts.len()).filter(|i| *i != first));
            let mut last_error = None;
            for index in order {
                match self
                    .send_to(&hosts[index], method.clone(), path, body.clone(), extra)
                    .await
                {
                    Ok(answer) => {
                        self.current.store(index, Ordering::Relaxed);
                        return (Ok(answer), uncertain);
                    }
                    Err(error) if try_elsewhere(&error) => {
                        uncertain |= matches!(error, ClientError::Transport { .. });
                        last_error = Some(error);
                    }
                    Err(error) => {
                        self.current.store(index, Ordering::Relaxed);
                        return (Err(error), uncertain);
                    }
                }
            }
            let error = last_error.expect("at least two hosts were tried");
            if tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
                return (Err(error), uncertain);
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(String, &'static str)>,
    ) -> Result<(StatusCode, String), ClientError> {
        self.send_counted(method, path, body)
            .await
            .0
            .map(|reply| (reply.status, reply.text))
    }

    async fn send_to(
        &self,
        base_url: &str,
        method: Method,
        path: &str,
        body: Option<(String, &'static str)>,
        extra: Option<(&'static str, &str)>,
    ) -> Result<Reply, ClientError> {
        let url = format!("{base_url}{path}");
        if let Some(message) = &self.setup_error {
            return Err(ClientError::Invalid {
                message: message.clone(),
            });
        }
        let mut request = self.http.request(method, &url);
        if let Some((name, value)) = extra {
            request = request.header(name, value);
        }
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        // A call about one lease (`/v1/leases/{id}…`) proves the holder with its secret.
        if let Some(lease_id) = path
            .strip_prefix("/v1/leases/")
            .and_then(|rest| rest.split('/').next())
            && let Some(secret) = self.lease_secret(lease_id)
        {
            request = request.header(LEASE_SECRET_HEADER, secret);
        }
        if let Some((body, content_type)) = body {
            request = request.header("content-type", content_type).body(body);
        }
        let transport = |error: reqwest::Error| ClientError::Transport {
            url: url.clone(),
            message: error.to_string(),
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        // A checkout redirected to a neighbour serving the component (307
        // `component_elsewhere`, followed by reqwest): the lease lives there.
        let redirected_to = (response.url().as_str() != url)
            .then(|| lease_home(response.url()))
            .flatten();
        let text = response.text().await.map_err(transport)?;
        if status.is_client_error() || status.is_server_error() {
            return Err(match serde_json::from_str::<ErrorBody>(&text) {
                Ok(body) => ClientError::Api {
                    status: status.as_u16(),
                    code: body.error.code,
                    message: body.error.message,
                },
                Err(_) => ClientError::Api {
                    status: status.as_u16(),
                    code: "http_error".into(),
                    message: format!("HTTP {status}: {text}"),
                },
            });
        }
        Ok(Reply {
            status,
            text,
            redirected_to,
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<(String, &'static str)>,
    ) -> Result<(StatusCode, T), ClientError> {
        let (status, text) = self.send(method, path, body).await?;
        let value = serde_json::from_str(&text).map_err(|error| ClientError::Decode {
            url: format!("{}{path}", self.base_url()),
            message: error.to_string(),
        })?;
        Ok((status, value))
    }

    /// Returns the lease and whether it is new (false: the station already held it).
    ///
    /// A server with no key for the component that knows a neighbour serving it redirects
    /// the checkout there (307 `component_elsewhere`); the client follows, and sends this
    /// lease's heartbeats and checkin to that server from then on.
    pub async fn checkout(&self, request: &CheckoutRequest) -> Result<(Lease, bool), ClientError> {
        self.checkout_with_nonce(request)
            .await
            .map(|(lease, created, _)| (lease, created))
    }

    /// Borrows a license for `hours` (up to the key's `max_borrow_days`): the lease needs no
    /// heartbeat until it ends. Keep the answer ([`BorrowStore::save`]) and use it offline
    /// with [`Client::borrowed`]; [`Client::return_borrowed`] gives the seat back early.
    pub async fn borrow(
        &self,
        request: &CheckoutRequest,
        hours: u32,
    ) -> Result<Borrowed, ClientError> {
        let request = CheckoutRequest {
            borrow_hours: hours,
            ..request.clone()
        };
        let (lease, _, nonce) = self.checkout_with_nonce(&request).await?;
        let server = self.lease_server(&lease.lease_id);
        Ok(Borrowed {
            lease,
            nonce,
            server,
        })
    }

    /// A stored borrowing of `component`, checked again as when it was granted (against the
    /// vendor's root key for a verifying client, for this `station`) and unexpired by the
    /// application's clock: the lease, or why it cannot be used.
    pub fn borrowed(
        &self,
        stored: &Borrowed,
        component: &str,
        station: &str,
    ) -> Result<Lease, ClientError> {
        let lease = &stored.lease;
        if lease.expires_at.as_millisecond() <= self.clock.now_ms() {
            return Err(ClientError::Untrusted {
                check: "expired".into(),
                message: format!("the borrowing ended at {}", lease.expires_at),
            });
        }
        self.check_lease(lease, component, &stored.nonce, Some(station))?;
        Ok(lease.clone())
    }

    /// Returns a borrowed license before its end (to the server that granted it). A
    /// borrowing the server no longer knows (it ended, or the administrator released it)
    /// counts as returned.
    pub async fn return_borrowed(&self, stored: &Borrowed) -> Result<(), ClientError> {
        let lease_id = &stored.lease.lease_id;
        if let Some(secret) = &stored.lease.lease_secret {
            self.set_lease_secret(lease_id, secret);
        }
        if let Some(server) = &stored.server {
            self.homes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(lease_id.clone(), server.clone());
        }
        match self.checkin(lease_id).await {
            Err(error) if error.code() == Some("lease_not_found") => Ok(()),
            other => other,
        }
    }

    /// [`Client::checkout`], also giving the nonce it sent.
    async fn checkout_with_nonce(
        &self,
        request: &CheckoutRequest,
    ) -> Result<(Lease, bool, String), ClientError> {
        let mut request = request.clone();
        if self.vendor_root.is_some() && request.nonce.is_empty() {
            request.nonce = nonce();
        }
        // Retries of this call (another host, a lost answer) carry the same holder key, so
        // they get the lease and its secret back.
        if request.holder_key.is_empty() {
            request.holder_key = nonce();
        }
        let body = serde_json::to_string(&request).expect("request serializes");
        let reply = self
            .send_counted(Method::POST, "/v1/leases", Some((body, "application/json")))
            .await
            .0?;
        let lease: Lease =
            serde_json::from_str(&reply.text).map_err(|error| ClientError::Decode {
                url: format!("{}/v1/leases", self.base_url()),
                message: error.to_string(),
            })?;
        if let Some(home) = reply.redirected_to {
            self.homes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(lease.lease_id.clone(), home);
        }
        if let Some(secret) = &lease.lease_secret {
            self.set_lease_secret(&lease.lease_id, secret);
        }
        let created = reply.status == StatusCode::CREATED;
        if let Err(untrusted) = self.check_lease(
            &lease,
            &request.component,
            &request.nonce,
            Some(&request.station),
        ) {
            // Not a license of this vendor: give the seat back if it was just taken.
            if created {
                let _ = self.checkin(&lease.lease_id).await;
            }
            return Err(untrusted);
        }
        Ok((lease, created, request.nonce))
    }

    /// The secret this client holds for a lease (from its checkout answer, or
    /// [`Client::set_lease_secret`]).
    pub fn lease_secret(&self, lease_id: &str) -> Option<String> {
        self.secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(lease_id)
            .cloned()
    }

    /// This client, accepting a lease only if it checks out against `vendor_root`, the
    /// vendor's public key compiled into the application (never read from the customer's
    /// files): the license key is the vendor's and covers the component, the server signed
    /// the lease token with the nonce this client sent, the token is unexpired (within
    /// [`CLOCK_TOLERANCE`]), and a key bound to a server ID (or requiring a certified server)
    /// comes from the server the vendor certified. Anything else is
    /// [`ClientError::Untrusted`], however the server answered; an untrusted new lease is
    /// returned at once.
    pub fn verifying(mut self, vendor_root: tessera_core::PublicKey) -> Client {
        self.vendor_root = Some(vendor_root);
        self
    }

    /// This client with another clock (milliseconds since the Unix epoch), for tests.
    pub fn with_clock(mut self, clock: Arc<dyn Fn() -> i64 + Send + Sync>) -> Client {
        self.clock = AppClock(Some(clock));
        self
    }

    /// Checks a lease answer (see [`Client::verifying`]).
    /// `station`: the station this client asked for (a checkout), which the token must name.
    fn check_lease(
        &self,
        lease: &Lease,
        component: &str,
        nonce: &str,
        station: Option<&str>,
    ) -> Result<(), ClientError> {
        let Some(root) = &self.vendor_root else {
            return Ok(());
        };
        let text = |value: &Option<serde_json::Value>| value.as_ref().map(|v| v.to_string());
        let (key, certificate, grant) = (
            text(&lease.license_key),
            text(&lease.server_certificate),
            text(&lease.grant),
        );
        let token = lease
            .lease_token
            .as_deref()
            .ok_or_else(|| ClientError::Untrusted {
                check: "token".into(),
                message: "the answer carries no signed lease token".into(),
            })?;
        let evidence = tessera_core::lease_token::LeaseEvidence {
            token,
            license_key: key.as_deref(),
            server_certificate: certificate.as_deref(),
            grant: grant.as_deref(),
            component,
            nonce,
            now_ms: self.clock.now_ms(),
            tolerance_ms: CLOCK_TOLERANCE.as_millis() as i64,
        };
        let payload = tessera_core::lease_token::verify_lease(&evidence, root).map_err(|e| {
            ClientError::Untrusted {
                check: e.check.into(),
                message: e.detail,
            }
        })?;
        if payload.lease_id != lease.lease_id {
            return Err(ClientError::Untrusted {
                check: "token".into(),
                message: format!(
                    "the token is for lease {}, the answer for {}",
                    payload.lease_id, lease.lease_id
                ),
            });
        }
        if let Some(station) = station
            && payload.station != station
        {
            return Err(ClientError::Untrusted {
                check: "station".into(),
                message: format!(
                    "the lease is held by station {:?}, not by this one ({station:?})",
                    payload.station
                ),
            });
        }
        Ok(())
    }

    /// This client, holding its lease secrets in one store with `other`'s: the clients of
    /// one station (for other servers, or other threads) then heartbeat and check in each
    /// other's leases.
    pub fn sharing_secrets(mut self, other: &Client) -> Client {
        self.secrets = other.secrets.clone();
        self.homes = other.homes.clone();
        self
    }

    /// Gives this client a lease's secret (checked out by another process of the same
    /// station, say): its heartbeats and checkin then prove the holder.
    pub fn set_lease_secret(&self, lease_id: &str, secret: &str) {
        self.secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(lease_id.to_string(), secret.to_string());
    }

    /// The server a lease was granted by after a redirect (None: this client's hosts).
    pub fn lease_server(&self, lease_id: &str) -> Option<String> {
        self.homes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(lease_id)
            .cloned()
    }

    /// Keeps a lease alive. A verifying client ([`Client::verifying`]) sends a fresh nonce
    /// and checks the renewed lease's token like a checkout's.
    pub async fn heartbeat(&self, lease_id: &str) -> Result<Lease, ClientError> {
        let path = format!("/v1/leases/{lease_id}/heartbeat");
        let nonce = nonce();
        let extra = Some((LEASE_NONCE_HEADER, nonce.as_str()));
        let (reply, url) = match self.lease_server(lease_id) {
            Some(home) => (
                self.send_to(&home, Method::POST, &path, None, extra)
                    .await?,
                format!("{home}{path}"),
            ),
            None => (
                self.send_counted_with(Method::POST, &path, None, extra)
                    .await
                    .0?,
                format!("{}{path}", self.base_url()),
            ),
        };
        let lease: Lease =
            serde_json::from_str(&reply.text).map_err(|error| ClientError::Decode {
                url,
                message: error.to_string(),
            })?;
        if lease.lease_id != lease_id {
            return Err(ClientError::Decode {
                url: format!("{}{path}", self.base_url()),
                message: format!(
                    "the heartbeat of lease {lease_id} answered lease {}",
                    lease.lease_id
                ),
            });
        }
        self.check_lease(&lease, &lease.component, &nonce, None)?;
        Ok(lease)
    }

    /// Returns the lease. In a domain, a checkin retried after an attempt whose answer was
    /// lost in transport, and then finding the lease gone, counts as done: the lost attempt
    /// released it.
    pub async fn checkin(&self, lease_id: &str) -> Result<(), ClientError> {
        let path = format!("/v1/leases/{lease_id}");
        if let Some(home) = self.lease_server(lease_id) {
            let result = self.send_to(&home, Method::DELETE, &path, None, None).await;
            if result.is_ok() || matches!(&result, Err(e) if e.code() == Some("lease_not_found")) {
                self.homes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(lease_id);
            }
            return result.map(|_| ());
        }
        match self.send_counted(Method::DELETE, &path, None).await {
            (Ok(_), _) => Ok(()),
            (Err(ClientError::Api { code, .. }), true) if code == "lease_not_found" => Ok(()),
            (Err(error), _) => Err(error),
        }
    }

    /// The domain's hosts with role, health, replication lag and last contact.
    pub async fn domain_status(&self) -> Result<DomainStatus, ClientError> {
        Ok(self.json(Method::GET, "/v1/domain", None).await?.1)
    }

    /// Adds a host to a running domain (admin); returns the members afterwards.
    pub async fn add_host(&self, host: u64, address: &str) -> Result<Vec<u64>, ClientError> {
        let body = serde_json::json!({"host": host, "address": address}).to_string();
        let (_, members): (_, serde_json::Value) = self
            .json(
                Method::POST,
                "/v1/domain/hosts",
                Some((body, "application/json")),
            )
            .await?;
        Ok(hosts_of(&members))
    }

    /// Removes a host from a running domain (admin); returns the members afterwards.
    pub async fn remove_host(&self, host: u64) -> Result<Vec<u64>, ClientError> {
        let path = format!("/v1/domain/hosts/{host}");
        let (_, members): (_, serde_json::Value) = self.json(Method::DELETE, &path, None).await?;
        Ok(hosts_of(&members))
    }

    /// A redundant pair's status as the answering host sees it (`GET /v1/pair`).
    pub async fn pair_status(&self) -> Result<serde_json::Value, ClientError> {
        Ok(self.json(Method::GET, "/v1/pair", None).await?.1)
    }

    /// Pairs this (single) server with a backup started with `--join` (admin).
    pub async fn pair_enable(
        &self,
        backup: &str,
        backup_percent: Option<u8>,
    ) -> Result<serde_json::Value, ClientError> {
        let body =
            serde_json::json!({"backup": backup, "backup_percent": backup_percent}).to_string();
        let path = "/v1/pair/enable";
        Ok(self
            .json(Method::POST, path, Some((body, "application/json")))
            .await?
            .1)
    }

    /// Undoes a pair that holds no license key (admin).
    pub async fn pair_disable(&self) -> Result<serde_json::Value, ClientError> {
        Ok(self.json(Method::POST, "/v1/pair/disable", None).await?.1)
    }

    /// Brings a pair that is not in sync back in sync (admin).
    pub async fn pair_sync(&self) -> Result<serde_json::Value, ClientError> {
        Ok(self.json(Method::POST, "/v1/pair/sync", None).await?.1)
    }

    /// Takes a lease and keeps it alive in the background; see [`LeaseGuard`].
    pub async fn checkout_guard(
        &self,
        request: &CheckoutRequest,
    ) -> Result<LeaseGuard, ClientError> {
        let (lease, _) = self.checkout(request).await?;
        Ok(LeaseGuard::start(self.clone(), lease))
    }

    pub async fn force_release(&self, lease_id: &str) -> Result<Lease, ClientError> {
        let path = format!("/v1/leases/{lease_id}/release");
        Ok(self.json(Method::POST, &path, None).await?.1)
    }

    pub async fn import_key(&self, key_file_text: String) -> Result<KeyImported, ClientError> {
        let body = Some((key_file_text, "application/json"));
        Ok(self.json(Method::POST, "/v1/keys", body).await?.1)
    }

    pub async fn list_keys(&self) -> Result<Vec<KeySummary>, ClientError> {
        Ok(self.json(Method::GET, "/v1/keys", None).await?.1)
    }

    pub async fn export_key(&self, key_id: &str) -> Result<String, ClientError> {
        Ok(self
            .send(Method::GET, &format!("/v1/keys/{key_id}"), None)
            .await?
            .1)
    }

    pub async fn remove_key(&self, key_id: &str) -> Result<KeyRemoved, ClientError> {
        let path = format!("/v1/keys/{key_id}");
        Ok(self.json(Method::DELETE, &path, None).await?.1)
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        Ok(self.json(Method::GET, "/v1/status", None).await?.1)
    }

    /// The status without leases or holders (`GET /v1/status?summary=true`): counts only,
    /// as cheap at a million leases as at one.
    pub async fn status_summary(&self) -> Result<Status, ClientError> {
        Ok(self
            .json(Method::GET, "/v1/status?summary=true", None)
            .await?
            .1)
    }

    /// One page of leases (admin token): `query` gives `limit`, `after` (the previous page's
    /// `next`) and the filters (`component`, `key`, `station`, `user`, `host`; exact, or a
    /// prefix ending in `*`), as `(name, value)` pairs.
    pub async fn leases(
        &self,
        query: &[(&str, &str)],
    ) -> Result<tessera_api::LeasePage, ClientError> {
        let mut path = String::from("/v1/leases");
        for (i, (name, value)) in query.iter().enumerate() {
            path.push(if i == 0 { '?' } else { '&' });
            path.push_str(name);
            path.push('=');
            path.push_str(&percent_encode(value));
        }
        Ok(self.json(Method::GET, &path, None).await?.1)
    }

    pub async fn station_groups(&self) -> Result<Vec<tessera_api::StationGroup>, ClientError> {
        Ok(self.json(Method::GET, "/v1/groups", None).await?.1)
    }

    /// Defines a station group; an empty list deletes it.
    pub async fn set_station_group(
        &self,
        name: &str,
        stations: Vec<String>,
    ) -> Result<(), ClientError> {
        let body = serde_json::to_string(&tessera_api::StationGroup {
            name: name.to_string(),
            stations,
        })
        .expect("serializes");
        let path = format!("/v1/groups/{name}");
        self.send(Method::PUT, &path, Some((body, "application/json")))
            .await?;
        Ok(())
    }

    /// "Check for updates and replace license keys".
    pub async fn update_keys(&self) -> Result<KeyUpdateReport, ClientError> {
        Ok(self.json(Method::POST, "/v1/keys/update", None).await?.1)
    }

    /// Allocates a key to every station (`stations`) and, if given, to these station groups.
    pub async fn allocate_key(
        &self,
        key_id: &str,
        stations: bool,
        groups: Option<Vec<String>>,
        neighbours: Option<Vec<String>>,
    ) -> Result<(), ClientError> {
        let request = AllocateRequest {
            stations,
            groups,
            neighbours,
        };
        let body = serde_json::to_string(&request).expect("serializes");
        let path = format!("/v1/keys/{key_id}/allocate");
        self.send(Method::POST, &path, Some((body, "application/json")))
            .await?;
        Ok(())
    }

    /// Recent events, newest first, as JSON values.
    pub async fn events(&self) -> Result<Vec<serde_json::Value>, ClientError> {
        Ok(self.json(Method::GET, "/v1/events", None).await?.1)
    }

    /// Online sync with the authority the server is configured with.
    pub async fn sync_now(&self) -> Result<SyncSummary, ClientError> {
        Ok(self.json(Method::POST, "/v1/sync", None).await?.1)
    }

    /// Starts a sync by file; returns the signed request file's text.
    pub async fn export_sync_request(&self) -> Result<String, ClientError> {
        Ok(self.send(Method::POST, "/v1/sync/request", None).await?.1)
    }

    pub async fn import_sync_response(
        &self,
        response_text: String,
    ) -> Result<SyncSummary, ClientError> {
        let body = Some((response_text, "application/json"));
        Ok(self.json(Method::POST, "/v1/sync/response", body).await?.1)
    }

    pub async fn sync_status(&self) -> Result<SyncStatus, ClientError> {
        Ok(self.json(Method::GET, "/v1/sync", None).await?.1)
    }

    /// Donates licenses of a key to a neighbour until `until` (RFC 3339 or `YYYY-MM-DD`),
    /// or changes the donation.
    pub async fn donate(
        &self,
        key_id: &str,
        to: &str,
        licenses: u32,
        until: &str,
    ) -> Result<tessera_api::DonationSummary, ClientError> {
        let body = serde_json::to_string(&tessera_api::DonateRequest {
            key_id: key_id.into(),
            to: to.into(),
            licenses,
            until: until.into(),
        })
        .expect("serializes");
        let body = Some((body, "application/json"));
        Ok(self.json(Method::POST, "/v1/donations", body).await?.1)
    }

    pub async fn donations(&self) -> Result<Vec<tessera_api::DonationSummary>, ClientError> {
        Ok(self.json(Method::GET, "/v1/donations", None).await?.1)
    }

    /// Ends a donation; the licenses come back when the neighbour's grant runs out.
    pub async fn end_donation(
        &self,
        key_id: &str,
        to: &str,
    ) -> Result<tessera_api::DonationSummary, ClientError> {
        let path = format!("/v1/donations/{key_id}/{to}");
        Ok(self.json(Method::DELETE, &path, None).await?.1)
    }

    pub async fn neighbours(&self) -> Result<tessera_api::Neighbours, ClientError> {
        Ok(self.json(Method::GET, "/v1/neighbours", None).await?.1)
    }

    pub async fn identity(&self) -> Result<tessera_api::Identity, ClientError> {
        Ok(self.json(Method::GET, "/v1/identity", None).await?.1)
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        Ok(self.json(Method::GET, "/healthz", None).await?.1)
    }
}

fn hosts_of(members: &serde_json::Value) -> Vec<u64> {
    members["hosts"]
        .as_array()
        .map(|hosts| hosts.iter().filter_map(|h| h.as_u64()).collect())
        .unwrap_or_default()
}

/// `GET /v1/domain` (the server's own type).
pub use tessera_api::{DomainHost as HostStatus, DomainStatus};

/// `value` for a URL query: unreserved characters as they are, every other byte as `%XX`.
fn percent_encode(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_fingerprint_is_stable_and_hides_the_machine_id() {
        let Some(fingerprint) = machine_fingerprint() else {
            return; // no machine id on this system
        };
        assert_eq!(fingerprint.len(), 32);
        assert_eq!(machine_fingerprint(), Some(fingerprint.clone()));
        let id = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
        assert!(id.trim().is_empty() || !id.contains(&fingerprint));
    }

    #[test]
    fn a_busy_or_leaderless_host_is_left_for_another_and_a_refusal_is_not() {
        let api = |status: u16, code: &str| ClientError::Api {
            status,
            code: code.into(),
            message: String::new(),
        };
        for code in [
            "no_quorum",
            "not_primary",
            "unavailable",
            "pair_recovering",
            "overloaded",
        ] {
            assert!(try_elsewhere(&api(503, code)), "{code}");
        }
        assert!(!try_elsewhere(&api(409, "no_licenses_available")));
        assert!(!try_elsewhere(&api(503, "clock_set_back")));
    }

    #[test]
    fn nonces_are_fresh() {
        assert_ne!(nonce(), nonce());
        assert_eq!(nonce().len(), 32);
    }
}
