//! Starting a server: data directory, trusted keys, consensus, HTTP, timers. The caller
//! hands in the listener, the clock, the id source and the shutdown signal, so tests can run
//! many servers in one process on port 0 with a manual clock.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tessera_core::{Clock, LedgerConfig, PublicKey};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::Stamper;
use crate::config::ServerConfig;
use crate::consensus::{Consensus, ConsensusConfig};
use crate::data_dir::DataDir;
use crate::error::StartError;
use crate::ids::LeaseIds;
use crate::metrics::Metrics;
use crate::state::{AppState, SharedState};

/// How often the primary's timer looks for due leases (real time). Expiry itself is exact:
/// every command ends due leases before it runs; the timer only makes idle servers tidy up.
pub const TIMER_PERIOD: Duration = Duration::from_millis(250);

pub struct ServerOptions {
    pub config: ServerConfig,
    pub clock: Arc<dyn Clock>,
    pub ids: LeaseIds,
    /// Run the expiry timer in the background. Tests that drive time by hand turn it off and
    /// call [`AppState::tick`] themselves.
    pub run_timers: bool,
}

pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: SharedState,
    shutdown: watch::Sender<bool>,
    http: JoinHandle<()>,
    timers: Option<JoinHandle<()>>,
    pair: Option<JoinHandle<()>>,
    /// Reloads the TLS certificate (HTTPS only).
    tls_watch: Option<JoinHandle<()>>,
}

impl RunningServer {
    pub fn url(&self) -> String {
        let scheme = if self.tls_watch.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Stops serving, waits for in-flight requests, then shuts consensus down.
    pub async fn shutdown(self) {
        if let Some(pair) = self.pair {
            pair.abort();
            crate::pair::runtime::announce_stop(&self.state).await;
        }
        let _ = self.shutdown.send(true);
        if let Some(timers) = self.timers {
            timers.abort();
        }
        if let Some(watch) = self.tls_watch {
            watch.abort();
        }
        let _ = self.http.await;
        self.state.consensus.shutdown().await;
    }
}

pub fn load_trusted_vendors(config: &ServerConfig) -> Result<Vec<PublicKey>, StartError> {
    if config.trust.is_empty() {
        return Err(StartError::Config {
            message:
                "no trusted vendor key: pass --trust VENDOR.pub (or trust = [..] in the config)"
                    .into(),
        });
    }
    config
        .trust
        .iter()
        .map(|path| {
            let fail = |message: String| StartError::Trust {
                path: path.display().to_string(),
                message,
            };
            let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
            PublicKey::from_file_text(&text).map_err(|e| fail(e.to_string()))
        })
        .collect()
}

pub async fn start(
    listener: TcpListener,
    options: ServerOptions,
) -> Result<RunningServer, StartError> {
    let ServerOptions {
        config,
        clock,
        ids,
        run_timers,
    } = options;
    config.validate()?;
    let tls_error = |error: tessera_tls::TlsError| StartError::Config {
        message: error.to_string(),
    };
    let tls = match &config.tls {
        Some((cert, key)) => Some(tessera_tls::ServerTls::load(cert, key).map_err(tls_error)?),
        None => None,
    };
    let trusted_vendors = load_trusted_vendors(&config)?;
    let data = DataDir::open_or_init(&config.data_dir)?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: config.listen.clone(),
        source,
    })?;
    // A domain's hosts are Raft voters numbered by host; a single host is node 1 at the
    // address it listens on.
    let (node_id, advertise_addr, members) = match &config.domain {
        Some(domain) => (
            domain.host,
            domain.own_address().to_string(),
            domain.hosts.clone(),
        ),
        None => (
            1,
            addr.to_string(),
            [(1, addr.to_string())].into_iter().collect(),
        ),
    };
    let multi_host = members.len() > 1;
    // Peers (Raft, pair, forwarded writes) over HTTPS when this host serves HTTPS: trusting
    // the pins, else the domain's CA (`tls_ca`), else the system's roots; showing this host's
    // certificate with `peer_mtls`.
    let peer_tls = match &tls {
        Some(tls) => Some(Arc::new(
            tessera_tls::peer_client_config(
                config.tls_ca.as_deref(),
                &config.peer_pins,
                config.peer_mtls.then(|| tls.clone()),
            )
            .map_err(tls_error)?,
        )),
        None => None,
    };
    let consensus = Consensus::start(ConsensusConfig {
        data_dir: config.data_dir.clone(),
        node_id,
        advertise_addr,
        ledger: LedgerConfig {
            trusted_vendors,
            server_id: config.server_id.clone(),
            server_public_key: Some(data.identity.public_key()),
            clock_skew_max_ms: config.clock_skew_max.as_millis() as i64,
        },
        members,
        domain_secret: config.domain_secret.clone(),
        join: config.domain.as_ref().is_some_and(|d| d.join),
        transport: Some(Arc::new(crate::consensus::PeerTransport::new(
            peer_tls.clone(),
        ))),
        peer_scheme: config.peer_scheme(),
        store: tessera_store::StoreOptions {
            slow_disk: test_slow_disk(),
            ..Default::default()
        },
        broken_leader_restore: false,
    })
    .await?;
    // Every key the ledger holds must verify as imported: a key that does not (a snapshot
    // edited on disk, a vendor removed from the trust list) stops the start, named.
    // So must every signed object the stored log carries: keys are verified before they are
    // proposed, so an import in the log that does not verify was edited on disk (or its
    // vendor left the trust list), and replaying it would silently drop or add the key.
    let unverified_keys = consensus.read(|ledger| ledger.unverified_keys());
    let unverified_entries = consensus.unverified_log_entries();
    if !unverified_keys.is_empty() || !unverified_entries.is_empty() {
        consensus.shutdown().await;
        let named: Vec<String> = unverified_keys
            .iter()
            .map(|found| found.to_string())
            .chain(
                unverified_entries
                    .iter()
                    .map(|(index, why)| format!("raft log entry {index}, {why}")),
            )
            .collect();
        return Err(StartError::DataDir {
            path: config
                .data_dir
                .join(crate::consensus::STORE_FILE_NAME)
                .display()
                .to_string(),
            message: format!(
                "the ledger holds keys, grants, a certificate or log entries that do not verify against the trusted vendor keys: {}. The data directory was edited, or the trust list no longer names their vendor: restore the data directory from a backup, or trust the vendor's key again (`tessera doctor` with the server's flags lists every finding and the way out)",
                named.join("; ")
            ),
        });
    }
    let (high_water_ms, vendor_time_ms) =
        consensus.read(|ledger| (ledger.last_at_ms(), ledger.vendor_time_ms()));
    let stamper = Stamper::new(
        clock,
        high_water_ms,
        config.clock_tolerance.as_millis() as i64,
    );
    stamper.observe_vendor(vendor_time_ms);
    let history_error = |error: crate::history::HistoryError| StartError::DataDir {
        path: error.path,
        message: error.message,
    };
    let history = crate::history::History::start(&config.data_dir).map_err(history_error)?;
    // The clients for this server's own calls (HTTPS trusting the system's roots and
    // `tls_ca`): neighbours directly; the authority and webhooks through the site's proxy.
    let client_error = |e: reqwest::Error| StartError::Config {
        message: format!("HTTP client: {e}"),
    };
    let http = tessera_tls::client_builder(config.tls_ca.as_deref())
        .map_err(tls_error)?
        .no_proxy()
        .connect_timeout(std::time::Duration::from_secs(3))
        .build()
        .map_err(client_error)?;
    // The other hosts of the domain or pair: their TLS trust, no proxy, no redirects.
    let peer_http = {
        let builder = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(std::time::Duration::from_millis(500))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none());
        match &peer_tls {
            Some(peer_tls) => builder.tls_backend_preconfigured(peer_tls.as_ref().clone()),
            None => builder,
        }
        .build()
        .map_err(client_error)?
    };
    let external_http = tessera_tls::client_builder(config.tls_ca.as_deref())
        .map_err(tls_error)?
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(client_error)?;
    let notifier = crate::events::Notifier::start(
        config.server_id.clone(),
        config.domain.as_ref().map(|domain| domain.host),
        config.notifications.clone(),
        // A record for people: unreadable, the list starts empty, and licenses are served.
        history
            .notifications(crate::events::RECENT_EVENTS_MAX)
            .unwrap_or_else(|error| {
                tracing::warn!(%error, "stored notifications unreadable: the list starts empty");
                Vec::new()
            })
            .into_iter()
            .map(crate::events::Event::from_stored)
            .collect(),
        history.notification_log(),
        external_http.clone(),
    );
    let pair = crate::pair::Pair::new(config.data_dir.clone());
    let state: SharedState = Arc::new(AppState {
        history,
        notifier,
        deadline_notices: Default::default(),
        alerts: Default::default(),
        seen_pair_tags: Default::default(),
        last_clock_event_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
        update_schedule: Default::default(),
        online_sync: tokio::sync::Mutex::new(()),
        config,
        consensus: consensus.clone(),
        stamper,
        ids,
        admin_token: data.admin_token,
        metrics: Metrics::new(),
        derivation_key: crate::state::derivation_key(&data.identity),
        identity: data.identity,
        links: Default::default(),
        served: Default::default(),
        pair,
        http: http.clone(),
        peer_http,
        external_http,
    });
    // A single host (a one-voter group, which never needs them) does not serve the Raft RPC
    // routes at all; a domain serves them, each request authenticated by the domain secret.
    // A host with a domain secret may become one of a pair (`tessera pair enable`), so it
    // serves them too.
    let mut router = crate::http::router(state.clone());
    let raft_routes = multi_host || state.config.domain_secret.is_some();
    if raft_routes {
        router = router.merge(consensus.router());
    }
    if state.config.peer_mtls {
        router = router.layer(axum::middleware::from_fn(
            crate::http::require_peer_certificate,
        ));
    }
    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let acceptor = match (&tls, &state.config.tls_ca) {
        (Some(tls), Some(ca)) if state.config.peer_mtls => {
            Some(tls.acceptor_asking_certificates(ca))
        }
        (Some(tls), _) => Some(tls.acceptor()),
        (None, _) => None,
    }
    .transpose()
    .map_err(tls_error)?;
    let tls_watch = tls.as_ref().map(|tls| tls.watch(TLS_RELOAD_PERIOD));
    if tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "serving the admin API and the console in clear (HTTP) on an address that is not loopback: tokens and passwords cross the network readable; serve HTTPS with --tls-cert and --tls-key (tessera tls init makes them)"
        );
    }
    let http = tokio::spawn(async move {
        let signal = async move {
            let _ = shutdown_rx.wait_for(|stop| *stop).await;
        };
        let served = match acceptor {
            Some(acceptor) => match tessera_tls::TlsListener::new(listener, acceptor) {
                Ok(listener) => {
                    axum::serve(listener, connected(router))
                        .with_graceful_shutdown(signal)
                        .await
                }
                Err(error) => Err(error),
            },
            None => {
                axum::serve(listener, connected(router))
                    .with_graceful_shutdown(signal)
                    .await
            }
        };
        if let Err(error) = served {
            tracing::error!(%error, "HTTP server failed");
        }
    });
    let timers = run_timers.then(|| tokio::spawn(run_timer_loop(state.clone())));
    let pair = raft_routes.then(|| {
        let (pair_state, history_state) = (state.clone(), state.clone());
        tokio::spawn(async move {
            tokio::join!(
                crate::pair::runtime::run(pair_state),
                crate::peer_history::run(history_state)
            );
        })
    });
    tracing::info!(%addr, tls = tls_watch.is_some(), "license server listening");
    Ok(RunningServer {
        addr,
        state,
        shutdown,
        http,
        timers,
        pair,
        tls_watch,
    })
}

/// The router, told each request's client address (the console's login throttle) and
/// whether it showed a verified certificate (the peer routes under `peer_mtls`).
fn connected(
    router: axum::Router,
) -> axum::extract::connect_info::IntoMakeServiceWithConnectInfo<axum::Router, tessera_tls::Client>
{
    router.into_make_service_with_connect_info::<tessera_tls::Client>()
}

/// How often the TLS certificate files are looked at for a change (SIGHUP reloads at once).
const TLS_RELOAD_PERIOD: std::time::Duration = std::time::Duration::from_secs(2);

/// The primary's timers: expiry and scheduled key updates in one loop, the links to
/// neighbour servers in another, so a slow neighbour never delays expiry.
async fn run_timer_loop(state: SharedState) {
    tokio::join!(run_expiry_loop(state.clone()), run_neighbour_loop(state));
}

async fn run_neighbour_loop(state: SharedState) {
    if state.config.neighbours.is_empty() {
        return;
    }
    let mut interval = tokio::time::interval(TIMER_PERIOD);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        for error in state.neighbour_tick().await {
            tracing::warn!(%error, "neighbour link");
        }
    }
}

async fn run_expiry_loop(state: SharedState) {
    let mut interval = tokio::time::interval(TIMER_PERIOD);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if let Err(error) = state.tick().await {
            tracing::warn!(%error, "expiry timer");
        }
        match state.run_scheduled_update().await {
            Some(Ok(report)) => tracing::info!(
                renewals = report.renewals.len(),
                sync_error = report.sync_error.as_deref().unwrap_or(""),
                "scheduled key update done"
            ),
            Some(Err(error)) => tracing::warn!(%error, "scheduled key update failed"),
            None => {}
        }
    }
}

/// Tests only: `TESSERA_TEST_SLOW_DISK_MS` makes every store transaction wait that long
/// before it commits (a slow disk), for the nemesis tests. Release builds ignore it.
fn test_slow_disk() -> Option<std::time::Duration> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let ms: u64 = std::env::var("TESSERA_TEST_SLOW_DISK_MS")
        .ok()?
        .parse()
        .ok()?;
    Some(std::time::Duration::from_millis(ms))
}
