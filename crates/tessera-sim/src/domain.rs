//! A server domain on a simulated network (turmoil): the real consensus of `tessera-server`
//! (openraft, the SQLite store, the ledger, the Raft RPCs as HTTP/JSON with the domain
//! secret) on 3 or 5 hosts, stations checking out and in through whichever host answers, and
//! random faults: hosts crashed and restarted from their data directory (kill -9: the store
//! keeps what was flushed apart from what was only appended, and a crash drops the unflushed
//! tail), two hosts crashed at once and back within moments, links cut and repaired, message
//! delays.
//!
//! Checked while it runs: no two hosts hold different entries under one log id (log
//! matching), and the stations' view — the stations that were told they hold a lease
//! and have not given it back — never exceeds the key's licenses (a split brain that lets two
//! primaries issue would break it at once). Checked at the end, once every fault is healed:
//! every host converges to the same ledger, which holds every lease a station still believes
//! it holds (no acknowledged lease lost) and passes `Ledger::check_invariants`.
//!
//! Determinism: turmoil's network, the fault schedule and the stations' choices come from
//! the seed, and the store writes inline (no thread) in simulated time; openraft's election
//! timeouts draw from its own unseeded generator, so a seed replays the same faults and
//! requests but not always the same elections. A failure prints its seed.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::routing::post;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tessera_core::{
    Command, LedgerConfig, LicenseKey, LicenseKeyPayload, Outcome, SecretKey, Stamped,
};
use tessera_server::consensus::{
    Consensus, ConsensusConfig, ConsensusError, RaftTransport, TransportError, TransportFuture,
    TransportRequest, TransportResponse,
};

use crate::rng::Rng;

const PORT: u16 = 7400;
const SECRET: &str = "simulated domain secret";
const KEY_ID: &str = "K";
const COMPONENT: &str = "cad";
/// Leases outlive the simulation: every lease ends by a check-in, so the stations' view is
/// exact.
const LEASE_TTL_MS: i64 = 24 * 3600 * 1000;
/// How long a store write stays appended but not durable (lost if its host crashes then).
const UNFLUSHED_MS: u64 = 20;
/// Start of simulated time (2026-01-01T00:00:00Z).
const EPOCH_MS: i64 = 1_767_225_600_000;

/// One run.
#[derive(Clone, Debug)]
pub struct DomainConfig {
    pub seed: u64,
    /// 3 or 5 hosts.
    pub hosts: usize,
    pub licenses: u32,
    /// Stations (more than licenses: demand above supply).
    pub stations: usize,
    /// Concurrent clients, each driving random stations.
    pub clients: usize,
    /// Requests per client while faults happen.
    pub requests: usize,
    /// Mean simulated time between two faults.
    pub fault_every_ms: u64,
    /// A deliberately broken rule, to show the checks catch it: a backup answers checkouts
    /// from its own replica (a split brain), without the primary.
    pub broken_backup_answers: bool,
    /// A deliberately broken rule: a restarted primary takes its leadership back without an
    /// election (openraft's leader restore), which lets one log id name two entries once a
    /// crash has dropped the primary's unflushed tail.
    pub broken_leader_restore: bool,
}

impl DomainConfig {
    /// The configuration CI runs: three hosts, a key of 5 licenses, 12 stations.
    pub fn ci(seed: u64) -> DomainConfig {
        DomainConfig {
            seed,
            hosts: 3,
            licenses: 5,
            stations: 12,
            clients: 3,
            requests: 300,
            fault_every_ms: 600,
            broken_backup_answers: false,
            broken_leader_restore: false,
        }
    }
}

/// What a run did.
#[derive(Debug, Default)]
pub struct DomainReport {
    pub seed: u64,
    pub hosts: usize,
    pub checkouts: u64,
    pub checkins: u64,
    pub refused: u64,
    pub unavailable: u64,
    pub crashes: u64,
    pub cuts: u64,
    pub peak_held: usize,
    pub final_leases: usize,
    pub simulated_ms: u128,
}

impl DomainReport {
    pub fn summary(&self) -> String {
        format!(
            "seed {}: ok — {} hosts, {} checkouts, {} check-ins, {} refused (no license), {} unanswered (no primary reachable), {} crashes, {} link cuts, peak {} held, {} leases at the end, {:.1} s simulated",
            self.seed,
            self.hosts,
            self.checkouts,
            self.checkins,
            self.refused,
            self.unavailable,
            self.crashes,
            self.cuts,
            self.peak_held,
            self.final_leases,
            self.simulated_ms as f64 / 1000.0
        )
    }
}

fn host_name(n: usize) -> String {
    format!("h{n}")
}

fn vendor() -> SecretKey {
    SecretKey::from_seed([0x5D; 32])
}

fn ledger_config() -> LedgerConfig {
    LedgerConfig {
        trusted_vendors: vec![vendor().public_key()],
        ..LedgerConfig::default()
    }
}

fn now_ms() -> i64 {
    EPOCH_MS + turmoil::sim_elapsed().unwrap_or_default().as_millis() as i64
}

// ---------------------------------------------------------------------------------------
// HTTP over turmoil's TCP

/// Splits `http://host:port/path`.
fn split_url(url: &str) -> Result<(String, String), TransportError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| TransportError::Other(format!("not an http URL: {url}")))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    Ok((authority.to_string(), format!("/{path}")))
}

async fn post_once(request: TransportRequest) -> Result<TransportResponse, TransportError> {
    let (authority, path) = split_url(&request.url)?;
    let stream = turmoil::net::TcpStream::connect(authority.as_str())
        .await
        .map_err(|e| TransportError::Connect(e.to_string()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| TransportError::Other(e.to_string()))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut builder = hyper::Request::post(path).header("host", authority);
    for (name, value) in &request.headers {
        builder = builder.header(*name, value);
    }
    let http_request = builder
        .body(Full::new(Bytes::from(request.body)))
        .map_err(|e| TransportError::Other(e.to_string()))?;
    let response = sender
        .send_request(http_request)
        .await
        .map_err(|e| TransportError::Other(e.to_string()))?;
    let (head, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| TransportError::Other(e.to_string()))?
        .to_bytes()
        .to_vec();
    Ok(TransportResponse::new(&head, body))
}

/// Raft RPCs over turmoil: one connection per RPC, bounded by the RPC's timeout (a cut link
/// drops segments, so without it a request would wait for ever).
struct TurmoilTransport;

impl RaftTransport for TurmoilTransport {
    fn post(&self, request: TransportRequest) -> TransportFuture {
        let timeout = request.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, post_once(request)).await {
                Ok(result) => result,
                Err(_) => Err(TransportError::Other("timed out".into())),
            }
        })
    }
}

async fn post_json<Req: Serialize, Resp: for<'de> Deserialize<'de>>(
    host: &str,
    path: &str,
    body: &Req,
) -> Result<Resp, String> {
    let request = TransportRequest {
        url: format!("http://{host}:{PORT}{path}"),
        headers: vec![("content-type", "application/json".into())],
        body: serde_json::to_vec(body).map_err(|e| e.to_string())?,
        timeout: Duration::from_secs(2),
    };
    let response = TurmoilTransport
        .post(request)
        .await
        .map_err(|e| e.to_string())?;
    if response.status != 200 {
        return Err(format!(
            "HTTP {}: {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        ));
    }
    serde_json::from_slice(&response.body).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------
// A host: consensus, its Raft routes, and a small station API over it

#[derive(Debug, Serialize, Deserialize)]
enum Ask {
    Import,
    Checkout { station: String },
    Checkin { lease_id: String },
    State,
}

#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    Imported,
    Granted { lease_id: String },
    NoLicense,
    Released,
    NotPrimary,
    Unavailable(String),
    State(HostState),
}

#[derive(Debug, Serialize, Deserialize)]
struct HostState {
    leases: BTreeSet<String>,
    /// The log: index → (log id, digest of the entry).
    log: BTreeMap<u64, (String, u64)>,
    applied: Option<u64>,
    invariants: Result<(), String>,
}

struct Host {
    consensus: Consensus,
    node: usize,
    incarnation: u64,
    next: AtomicU64,
    /// The key's licenses in this run.
    licenses: u32,
    /// [`DomainConfig::broken_backup_answers`].
    broken: bool,
}

async fn station_api(State(host): State<Arc<Host>>, Json(ask): Json<Ask>) -> Json<Answer> {
    if let Ask::State = ask {
        let status = host.consensus.status();
        let log = host
            .consensus
            .log_digests()
            .into_iter()
            .map(|(index, log_id, digest)| (index, (log_id.to_string(), digest)))
            .collect();
        let state = host.consensus.read(|ledger| HostState {
            leases: ledger.leases().into_iter().map(|l| l.lease_id).collect(),
            log,
            applied: status.last_applied_index,
            invariants: ledger.check_invariants().map_err(|violation| violation.0),
        });
        return Json(Answer::State(state));
    }
    if !host.consensus.is_primary() {
        if host.broken
            && let Ask::Checkout { station } = &ask
        {
            // The broken rule: grant from this replica if it shows a free license.
            let free = host.consensus.read(|ledger| {
                ledger.lease_count() < host.licenses as usize
                    && !ledger.leases().iter().any(|l| &l.station == station)
            });
            if free {
                let lease_id = format!(
                    "{}-{}-{}",
                    host.node,
                    host.incarnation,
                    host.next.fetch_add(1, Ordering::Relaxed)
                );
                return Json(Answer::Granted { lease_id });
            }
        }
        return Json(Answer::NotPrimary);
    }
    let command = match ask {
        Ask::Import => Command::ImportKey {
            key: key(host.licenses),
        },
        Ask::Checkout { station } => Command::Checkout {
            lease_id: format!(
                "{}-{}-{}",
                host.node,
                host.incarnation,
                host.next.fetch_add(1, Ordering::Relaxed)
            ),
            component: COMPONENT.into(),
            station,
            user: "sim".into(),
            host: "sim".into(),
            lease_ttl_ms: LEASE_TTL_MS,
            borrow_ms: 0,
        },
        Ask::Checkin { lease_id } => Command::Checkin { lease_id },
        Ask::State => unreachable!("answered above"),
    };
    let at_ms = now_ms().max(host.consensus.read(|ledger| ledger.last_at_ms()));
    let answer = match host.consensus.propose(Stamped { at_ms, command }).await {
        Ok(applied) => match applied.outcome {
            Outcome::KeyImported { .. } => Answer::Imported,
            Outcome::LeaseGranted { lease, .. } => Answer::Granted {
                lease_id: lease.lease_id,
            },
            Outcome::LeaseReleased { .. } => Answer::Released,
            Outcome::Refused { refusal } => match refusal.code() {
                "no_licenses_available" => Answer::NoLicense,
                // Checking in a lease that is gone (an earlier try committed) is done.
                "lease_not_found" => Answer::Released,
                "key_already_imported" => Answer::Imported,
                other => Answer::Unavailable(format!("refused: {other}")),
            },
            other => Answer::Unavailable(format!("unexpected outcome {other:?}")),
        },
        Err(ConsensusError::NotPrimary { .. }) => Answer::NotPrimary,
        Err(e) => Answer::Unavailable(e.to_string()),
    };
    Json(answer)
}

fn key(licenses: u32) -> LicenseKey {
    let from = Timestamp::from_millisecond(EPOCH_MS - 24 * 3600 * 1000).expect("epoch");
    let until = Timestamp::from_millisecond(EPOCH_MS + 30 * 24 * 3600 * 1000).expect("epoch");
    LicenseKey::sign(
        LicenseKeyPayload {
            key_id: KEY_ID.into(),
            customer: "sim".into(),
            components: vec![COMPONENT.into()],
            licenses,
            valid_from: from,
            valid_until: until,
            server_id: None,
            renews: None,
            certified_server_required: false,
            max_borrow_days: 0,
            grace_minutes: 0,
            issued_at: from,
        },
        &vendor(),
    )
    .expect("the vendor key signs")
}

async fn run_host(
    node: usize,
    config: DomainConfig,
    dir: PathBuf,
    incarnation: u64,
) -> turmoil::Result {
    let members: BTreeMap<u64, String> = (1..=config.hosts)
        .map(|n| (n as u64, format!("{}:{PORT}", host_name(n))))
        .collect();
    let consensus = Consensus::start(ConsensusConfig {
        data_dir: dir,
        node_id: node as u64,
        advertise_addr: format!("{}:{PORT}", host_name(node)),
        ledger: ledger_config(),
        members,
        domain_secret: Some(SECRET.into()),
        join: false,
        transport: Some(Arc::new(TurmoilTransport)),
        peer_scheme: "http",
        store: tessera_store::StoreOptions {
            inline: true,
            unflushed_for: Some(Duration::from_millis(UNFLUSHED_MS)),
            ..Default::default()
        },
        broken_leader_restore: config.broken_leader_restore,
    })
    .await
    .map_err(|e| format!("host {node}: {e}"))?;
    let host = Arc::new(Host {
        consensus: consensus.clone(),
        node,
        incarnation,
        next: AtomicU64::new(0),
        licenses: config.licenses,
        broken: config.broken_backup_answers,
    });
    let app = consensus.router().merge(
        axum::Router::new()
            .route("/sim", post(station_api))
            .with_state(host),
    );
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::task::spawn_local(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

// ---------------------------------------------------------------------------------------
// Stations and the checks

#[derive(Default)]
struct Stations {
    /// station → lease it was told it holds (and has not checked in).
    held: BTreeMap<String, String>,
    report: DomainReport,
    violation: Option<String>,
}

/// Sends `ask` to the hosts, the last one that answered first; `None` when no primary
/// answered.
async fn ask_domain(hosts: usize, start: &Cell<usize>, ask: impl Fn() -> Ask) -> Option<Answer> {
    for i in 0..hosts {
        let n = (start.get() + i) % hosts + 1;
        match post_json::<Ask, Answer>(&host_name(n), "/sim", &ask()).await {
            Ok(Answer::NotPrimary) | Err(_) => continue,
            Ok(Answer::Unavailable(_)) => return None,
            Ok(answer) => {
                start.set(n - 1);
                return Some(answer);
            }
        }
    }
    None
}

async fn station_client(
    config: DomainConfig,
    client: usize,
    shared: Rc<RefCell<Stations>>,
    faults_over: Rc<Cell<usize>>,
) -> turmoil::Result {
    let mut rng = Rng::new(config.seed).fork(100 + client as u64);
    let start = Cell::new(0);
    // The key, once (any client may import it; a repeat is harmless).
    loop {
        if let Some(Answer::Imported) = ask_domain(config.hosts, &start, || Ask::Import).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..config.requests {
        // Each station belongs to one client: a station never checks out and in at once.
        let mine = config.stations.div_ceil(config.clients);
        let index = client + config.clients * rng.index(mine);
        if index >= config.stations {
            continue;
        }
        let station = format!("ws-{index}");
        if config.broken_backup_answers {
            // Stations spread over the hosts, as they do when each lists another host first.
            start.set((start.get() + 1) % config.hosts);
        }
        let holding = shared.borrow().held.get(&station).cloned();
        match holding {
            Some(lease_id) => {
                // The station stops using the license when it decides to give it back.
                shared.borrow_mut().held.remove(&station);
                let answer = ask_domain(config.hosts, &start, || Ask::Checkin {
                    lease_id: lease_id.clone(),
                })
                .await;
                let mut s = shared.borrow_mut();
                match answer {
                    Some(Answer::Released) => s.report.checkins += 1,
                    _ => s.report.unavailable += 1,
                }
            }
            None => {
                let answer = ask_domain(config.hosts, &start, || Ask::Checkout {
                    station: station.clone(),
                })
                .await;
                let mut s = shared.borrow_mut();
                match answer {
                    Some(Answer::Granted { lease_id }) => {
                        s.report.checkouts += 1;
                        s.held.insert(station.clone(), lease_id);
                        let held = s.held.len();
                        s.report.peak_held = s.report.peak_held.max(held);
                        if held > config.licenses as usize && s.violation.is_none() {
                            s.violation = Some(format!(
                                "{held} stations hold a license of a {}-license key: {:?}",
                                config.licenses, s.held
                            ));
                        }
                    }
                    Some(Answer::NoLicense) => s.report.refused += 1,
                    _ => s.report.unavailable += 1,
                }
            }
        }
        if shared.borrow().violation.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(rng.range(5, 60) as u64)).await;
    }
    faults_over.set(faults_over.get() + 1);
    Ok(())
}

/// Two hosts holding different entries under one log id, named; `None` when the logs match.
fn log_split(states: &[HostState]) -> Option<String> {
    for (a, state_a) in states.iter().enumerate() {
        for (b, state_b) in states.iter().enumerate().skip(a + 1) {
            for (index, (log_id, digest)) in &state_a.log {
                if let Some((other_id, other_digest)) = state_b.log.get(index)
                    && other_id == log_id
                    && other_digest != digest
                {
                    return Some(format!(
                        "hosts {} and {} hold different entries under log id {log_id} (index {index})",
                        a + 1,
                        b + 1
                    ));
                }
            }
        }
    }
    None
}

/// While the stations run: every `LOG_CHECK_MS` the hosts that answer are asked for their
/// logs, which must match wherever they hold the same log id.
async fn log_watch(
    config: DomainConfig,
    shared: Rc<RefCell<Stations>>,
    faults_over: Rc<Cell<usize>>,
) -> turmoil::Result {
    while faults_over.get() < config.clients && shared.borrow().violation.is_none() {
        tokio::time::sleep(Duration::from_millis(LOG_CHECK_MS)).await;
        let mut states = Vec::new();
        for n in 1..=config.hosts {
            if let Ok(Answer::State(state)) =
                post_json::<Ask, Answer>(&host_name(n), "/sim", &Ask::State).await
            {
                states.push(state);
            }
        }
        if let Some(split) = log_split(&states) {
            shared.borrow_mut().violation = Some(split);
        }
    }
    Ok(())
}

/// How often [`log_watch`] compares the hosts' logs.
const LOG_CHECK_MS: u64 = 500;

/// After the faults: every host converges to one ledger holding every lease a station
/// believes it holds.
async fn checker(
    config: DomainConfig,
    shared: Rc<RefCell<Stations>>,
    faults_over: Rc<Cell<usize>>,
    healed: Rc<Cell<bool>>,
) -> turmoil::Result {
    while faults_over.get() < config.clients || !healed.get() {
        if shared.borrow().violation.is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    loop {
        let mut states = Vec::new();
        for n in 1..=config.hosts {
            match post_json::<Ask, Answer>(&host_name(n), "/sim", &Ask::State).await {
                Ok(Answer::State(state)) => states.push(state),
                other => {
                    last = format!("host {n}: {other:?}");
                    break;
                }
            }
        }
        if states.len() == config.hosts {
            if let Some(split) = log_split(&states) {
                shared.borrow_mut().violation = Some(split);
                return Ok(());
            }
            let believed: BTreeSet<String> = shared.borrow().held.values().cloned().collect();
            for (i, state) in states.iter().enumerate() {
                if let Err(e) = &state.invariants {
                    shared.borrow_mut().violation = Some(format!("host {}: {e}", i + 1));
                    return Ok(());
                }
                if state.leases.len() > config.licenses as usize {
                    shared.borrow_mut().violation = Some(format!(
                        "host {} holds {} leases of a {}-license key",
                        i + 1,
                        state.leases.len(),
                        config.licenses
                    ));
                    return Ok(());
                }
            }
            let same = states
                .iter()
                .all(|s| s.leases == states[0].leases && s.applied == states[0].applied);
            if same {
                let lost: Vec<&String> = believed.difference(&states[0].leases).collect();
                let mut s = shared.borrow_mut();
                if !lost.is_empty() {
                    s.violation = Some(format!(
                        "acknowledged leases lost: {lost:?} (the hosts hold {:?})",
                        states[0].leases
                    ));
                }
                s.report.final_leases = states[0].leases.len();
                return Ok(());
            }
            last = format!(
                "hosts differ: {:?}",
                states
                    .iter()
                    .map(|s| (s.applied, s.leases.len()))
                    .collect::<Vec<_>>()
            );
        }
        if tokio::time::Instant::now() >= deadline {
            shared.borrow_mut().violation = Some(format!(
                "the hosts did not converge within 120 s after the faults ended; last: {last}"
            ));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs one simulation; `Err` names the violation (and the seed).
pub fn run(config: DomainConfig) -> Result<DomainReport, String> {
    if !(config.hosts == 3 || config.hosts == 5) {
        return Err("a simulated domain has 3 or 5 hosts".into());
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(3600))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(0))
        .max_message_latency(Duration::from_millis(4))
        .rng_seed(config.seed)
        .build();
    let incarnations: Vec<Rc<Cell<u64>>> = (0..config.hosts).map(|_| Rc::default()).collect();
    for n in 1..=config.hosts {
        let data = dir.path().join(host_name(n));
        let incarnation = incarnations[n - 1].clone();
        let host_config = config.clone();
        sim.host(host_name(n).as_str(), move || {
            incarnation.set(incarnation.get() + 1);
            run_host(n, host_config.clone(), data.clone(), incarnation.get())
        });
    }
    let shared = Rc::new(RefCell::new(Stations::default()));
    let faults_over = Rc::new(Cell::new(0));
    let healed = Rc::new(Cell::new(false));
    for c in 0..config.clients {
        sim.client(
            format!("station-{c}").as_str(),
            station_client(config.clone(), c, shared.clone(), faults_over.clone()),
        );
    }
    sim.client(
        "log-watch",
        log_watch(config.clone(), shared.clone(), faults_over.clone()),
    );
    sim.client(
        "checker",
        checker(
            config.clone(),
            shared.clone(),
            faults_over.clone(),
            healed.clone(),
        ),
    );

    // The fault schedule, from the seed.
    let mut rng = Rng::new(config.seed).fork(7);
    let mut down: BTreeMap<usize, u128> = BTreeMap::new();
    let mut cut: Vec<(usize, usize, u128)> = Vec::new();
    let mut next_fault_ms = 1_000 + rng.below(config.fault_every_ms * 2) as u128;
    let mut crashes = 0;
    let mut cuts = 0;
    // SIM_DEBUG=1 prints the faults as they happen and a line of progress every second.
    let debug = std::env::var_os("SIM_DEBUG").is_some();
    loop {
        let finished = sim
            .step()
            .map_err(|e| format!("seed {}: the simulation failed: {e}", config.seed))?;
        let now = sim.elapsed().as_millis();
        if debug && now % 1_000 == 0 {
            let s = shared.borrow();
            eprintln!(
                "t={now} faults_over={} healed={} checkouts={} unavailable={} down={down:?} cut={}",
                faults_over.get(),
                healed.get(),
                s.report.checkouts,
                s.report.unavailable,
                cut.len()
            );
        }
        if finished {
            break;
        }
        if shared.borrow().violation.is_some() {
            break;
        }
        let faulting = faults_over.get() < config.clients;
        // Heal what is due (and everything once the stations are done).
        let due: Vec<usize> = down
            .iter()
            .filter(|(_, until)| !faulting || **until <= now)
            .map(|(n, _)| *n)
            .collect();
        for n in due {
            if debug {
                eprintln!("t={now} bounce h{n}");
            }
            down.remove(&n);
            sim.bounce(host_name(n).as_str());
        }
        cut.retain(|(a, b, until)| {
            if !faulting || *until <= now {
                if debug {
                    eprintln!("t={now} repair h{a}-h{b}");
                }
                sim.repair(host_name(*a).as_str(), host_name(*b).as_str());
                false
            } else {
                true
            }
        });
        if !faulting {
            healed.set(true);
            continue;
        }
        if now >= next_fault_ms {
            next_fault_ms = now + 1 + rng.below(config.fault_every_ms * 2) as u128;
            let a = 1 + rng.index(config.hosts);
            match rng.below(4) {
                3 => {
                    // Two hosts at once (often the primary among them), each back within
                    // 0–300 ms: the quorum is gone until one returns.
                    let b = (a % config.hosts) + 1;
                    for n in [a, b] {
                        if let std::collections::btree_map::Entry::Vacant(slot) = down.entry(n) {
                            if debug {
                                eprintln!("t={now} crash h{n} (with another)");
                            }
                            sim.crash(host_name(n).as_str());
                            slot.insert(now + 1 + rng.range(0, 300) as u128);
                            crashes += 1;
                        }
                    }
                }
                0 if !down.contains_key(&a) => {
                    // kill -9, back after 0.2–4 s.
                    if debug {
                        eprintln!("t={now} crash h{a}");
                    }
                    sim.crash(host_name(a).as_str());
                    down.insert(a, now + rng.range(200, 4_000) as u128);
                    crashes += 1;
                }
                1 => {
                    // Isolate a host from every other host (clients still reach it).
                    for b in (1..=config.hosts).filter(|b| *b != a) {
                        if debug {
                            eprintln!("t={now} cut h{a}-h{b}");
                        }
                        sim.partition(host_name(a).as_str(), host_name(b).as_str());
                        cut.push((a, b, now + rng.range(300, 5_000) as u128));
                    }
                    cuts += 1;
                }
                _ => {
                    let b = 1 + rng.index(config.hosts);
                    if a != b {
                        sim.partition(host_name(a).as_str(), host_name(b).as_str());
                        cut.push((a, b, now + rng.range(100, 3_000) as u128));
                        cuts += 1;
                    }
                }
            }
        }
    }
    let simulated_ms = sim.elapsed().as_millis();
    drop(sim);
    let mut stations = shared.take();
    if let Some(violation) = stations.violation {
        return Err(format!("seed {}: {violation}", config.seed));
    }
    stations.report.seed = config.seed;
    stations.report.hosts = config.hosts;
    stations.report.crashes = crashes;
    stations.report.cuts = cuts;
    stations.report.simulated_ms = simulated_ms;
    Ok(stations.report)
}
