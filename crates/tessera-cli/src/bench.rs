//! `tessera bench`: checkout+checkin cycles per second against a real server (real SQLite,
//! every acknowledged lease durable) and against a no-op HTTP server with the same routes,
//! in the same run, so the figures are ratios on the same machine at the same moment.
//! `--leases N` instead measures memory and restart time with N active leases, what reads
//! (`/metrics`, `/v1/status`, `/v1/leases` pages) cost at that size, and checkout latency
//! while `/metrics` is scraped every second.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::Router;
use axum::http::StatusCode;
use axum::routing::{delete, post};
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use jiff::{Timestamp, ToSpan};
use tessera_api::CheckoutRequest;
use tessera_core::{LicenseKey, LicenseKeyPayload, SecretKey};
use tessera_server::clock::SystemClock;
use tessera_server::ids::LeaseIds;
use tessera_server::{RunningServer, ServerConfig, ServerOptions};
use tokio::net::{TcpListener, TcpStream};

/// Upper bound on cycles per client per run, so a loop can never run away.
const CYCLES_PER_CLIENT_MAX: usize = 10_000_000;

#[derive(Args)]
pub struct BenchArgs {
    /// Concurrent clients (stations); one run per value.
    #[arg(long, value_delimiter = ',', default_value = "32,256")]
    pub clients: Vec<usize>,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Instead of throughput: hold this many active leases, report RSS and restart time.
    #[arg(long)]
    pub leases: Option<usize>,
    /// Run against a domain of this many `tessera server` processes (3 to 20) on loopback:
    /// cycles/s through the primary, then the failover gap after kill -9 of the primary.
    #[arg(long)]
    pub domain: Option<usize>,
    /// Run against a redundant pair of two `tessera server` processes: cycles/s, the
    /// failover gap after kill -9 of the primary, and the capacity the backup keeps alone.
    #[arg(long)]
    pub pair: bool,
}

pub(crate) struct RunResult {
    cycles: usize,
    errors: usize,
    elapsed: Duration,
    p50_us: u64,
    p99_us: u64,
}

impl RunResult {
    pub(crate) fn cycles(&self) -> usize {
        self.cycles
    }

    pub(crate) fn cycles_per_s(&self) -> f64 {
        self.cycles as f64 / self.elapsed.as_secs_f64()
    }

    /// A run's figures from one latency sample per completed cycle.
    pub(crate) fn from_latencies(
        mut latencies_us: Vec<u64>,
        errors: usize,
        elapsed: Duration,
    ) -> RunResult {
        latencies_us.sort_unstable();
        let percentile = |p: f64| -> u64 {
            if latencies_us.is_empty() {
                return 0;
            }
            latencies_us[((latencies_us.len() as f64 - 1.0) * p) as usize]
        };
        RunResult {
            cycles: latencies_us.len(),
            errors,
            elapsed,
            p50_us: percentile(0.50),
            p99_us: percentile(0.99),
        }
    }
}

/// A single server's benchmark, or the ledger's in memory (`--leases`); `--pair` and
/// `--domain` run `crate::domain`'s (chosen in `main`).
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(leases) = args.leases {
        return run_memory(leases).await;
    }
    if args.seconds == 0 || args.seconds > 600 {
        bail!("--seconds must be 1 to 600");
    }
    let duration = Duration::from_secs(args.seconds);
    println!(
        "{:<10} {:>8} {:>12} {:>9} {:>9} {:>8} {:>8}",
        "target", "clients", "cycles/s", "p50 ms", "p99 ms", "errors", "ratio"
    );
    for &clients in &args.clients {
        if clients == 0 || clients > 4096 {
            bail!("clients must be 1 to 4096");
        }
        let baseline = {
            let (addr, stop) = start_noop().await?;
            let result = drive(addr, clients, duration).await?;
            let _ = stop.send(());
            result
        };
        print_row("no-op", clients, &baseline, 1.0);
        let dir = tempfile::tempdir()?;
        let server = start_real(dir.path(), clients as u32, Duration::from_secs(120)).await?;
        let before = server.state.consensus.status();
        let real = drive(server.addr, clients, duration).await?;
        let after = server.state.consensus.status();
        server.shutdown().await;
        print_row(
            "tessera",
            clients,
            &real,
            real.cycles_per_s() / baseline.cycles_per_s(),
        );
        let fsyncs = after.store_transactions - before.store_transactions;
        let entries = after.last_log_index.unwrap_or(0) - before.last_log_index.unwrap_or(0);
        // Two commands per cycle (checkout, checkin), plus the timers' few.
        let commands = real.cycles * 2;
        println!(
            "{:<10} {:>8} commands in {} log entries ({:.1} per entry), {} fsyncs of the Raft log ({:.1} entries per fsync)",
            "",
            commands,
            entries,
            commands as f64 / entries.max(1) as f64,
            fsyncs,
            entries as f64 / fsyncs.max(1) as f64
        );
    }
    Ok(())
}

pub(crate) fn print_row(target: &str, clients: usize, result: &RunResult, ratio: f64) {
    println!(
        "{:<10} {:>8} {:>12.0} {:>9.2} {:>9.2} {:>8} {:>7.0}%",
        target,
        clients,
        result.cycles_per_s(),
        result.p50_us as f64 / 1000.0,
        result.p99_us as f64 / 1000.0,
        result.errors,
        ratio * 100.0
    );
}

/// A vendor, a key with `licenses` seats of component `bench`, and a server with it imported.
pub(crate) async fn start_real(
    dir: &std::path::Path,
    licenses: u32,
    lease_ttl: Duration,
) -> anyhow::Result<RunningServer> {
    let vendor = SecretKey::from_seed(tessera_server::ids::random_bytes()?);
    let vendor_pub = dir.join("vendor.pub");
    std::fs::write(&vendor_pub, vendor.public_key().to_file_text())?;
    let config = ServerConfig {
        data_dir: dir.join("data"),
        listen: "127.0.0.1:0".into(),
        trust: vec![vendor_pub],
        lease_ttl,
        ..ServerConfig::default()
    };
    let server = start_with(config).await?;
    let now = Timestamp::now();
    let key = LicenseKey::sign(
        LicenseKeyPayload {
            key_id: "BENCH".into(),
            customer: "bench".into(),
            components: vec!["bench".into()],
            licenses,
            valid_from: now.checked_sub(1.hour())?,
            valid_until: now.checked_add(240.hours())?,
            server_id: None,
            renews: None,
            certified_server_required: false,
            max_borrow_days: 0,
            grace_minutes: 0,
            issued_at: now,
        },
        &vendor,
    )?;
    server.state.import_key(key).await?;
    Ok(server)
}

async fn start_with(config: ServerConfig) -> anyhow::Result<RunningServer> {
    let listener = TcpListener::bind(&config.listen).await?;
    let options = ServerOptions {
        config,
        clock: Arc::new(SystemClock),
        ids: LeaseIds::from_os()?,
        run_timers: true,
    };
    Ok(tessera_server::start(listener, options).await?)
}

/// The baseline: the same routes and JSON parsing, no ledger, no consensus, no disk.
async fn start_noop() -> anyhow::Result<(SocketAddr, tokio::sync::oneshot::Sender<()>)> {
    async fn checkout(
        axum::Json(request): axum::Json<CheckoutRequest>,
    ) -> (StatusCode, axum::Json<serde_json::Value>) {
        let lease = serde_json::json!({
            "lease_id": "0123456789abcdef0123456789abcdef",
            "component": request.component,
            "components": [request.component],
            "key_id": "BENCH",
            "station": request.station,
            "user": request.user,
            "host": request.host,
            "issued_at": "2026-01-01T00:00:00Z",
            "renewed_at": "2026-01-01T00:00:00Z",
            "expires_at": "2026-01-01T00:02:00Z",
            "heartbeat_interval_s": 40
        });
        (StatusCode::CREATED, axum::Json(lease))
    }
    let router = Router::new().route("/v1/leases", post(checkout)).route(
        "/v1/leases/{lease_id}",
        delete(|| async { StatusCode::NO_CONTENT }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
    });
    Ok((addr, stop))
}

/// Runs `clients` closed-loop stations, each on its own keep-alive connection.
pub(crate) async fn drive(
    addr: SocketAddr,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<RunResult> {
    let started = Instant::now();
    let deadline = started + duration;
    let tasks = (0..clients)
        .map(|client| tokio::spawn(station_loop(addr, client, deadline)))
        .collect();
    collect_runs(tasks, started).await
}

/// One client's run: its cycle latencies in µs and its error count.
pub(crate) type ClientRun = tokio::task::JoinHandle<anyhow::Result<(Vec<u64>, usize)>>;

/// Waits for the clients of a run.
pub(crate) async fn collect_runs(
    tasks: Vec<ClientRun>,
    started: Instant,
) -> anyhow::Result<RunResult> {
    let mut latencies_us = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (mut samples, failed) = task.await??;
        latencies_us.append(&mut samples);
        errors += failed;
    }
    Ok(RunResult::from_latencies(
        latencies_us,
        errors,
        started.elapsed(),
    ))
}

async fn station_loop(
    addr: SocketAddr,
    client: usize,
    deadline: Instant,
) -> anyhow::Result<(Vec<u64>, usize)> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let body = serde_json::to_vec(&CheckoutRequest {
        component: "bench".into(),
        station: format!("bench-{client}"),
        user: "bench".into(),
        host: "bench".into(),
        nonce: String::new(),
        holder_key: String::new(),
        borrow_hours: 0,
    })?;
    let mut latencies_us = Vec::new();
    let mut errors = 0;
    while Instant::now() < deadline && latencies_us.len() < CYCLES_PER_CLIENT_MAX {
        let cycle_started = Instant::now();
        let request = hyper::Request::post("/v1/leases")
            .header("host", addr.to_string())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.clone())))?;
        let response = sender.send_request(request).await.context("checkout")?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        if status != StatusCode::CREATED && status != StatusCode::OK {
            errors += 1;
            continue;
        }
        let lease: serde_json::Value = serde_json::from_slice(&bytes)?;
        let lease_id = lease["lease_id"].as_str().context("lease_id")?;
        let secret = lease["lease_secret"].as_str().unwrap_or_default();
        let request = hyper::Request::delete(format!("/v1/leases/{lease_id}"))
            .header("host", addr.to_string())
            .header("x-lease-secret", secret)
            .body(Full::new(Bytes::new()))?;
        let response = sender.send_request(request).await.context("checkin")?;
        let status = response.status();
        response.into_body().collect().await?;
        if status != StatusCode::NO_CONTENT {
            errors += 1;
            continue;
        }
        latencies_us.push(cycle_started.elapsed().as_micros() as u64);
    }
    Ok((latencies_us, errors))
}

/// CPU time (user + system) a process has used so far, from `/proc/PID/stat`, or `None`
/// where there is no procfs. Ticks are USER_HZ, 100 per second on Linux.
pub(crate) fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

async fn run_memory(leases: usize) -> anyhow::Result<()> {
    if leases == 0 || leases > 10_000_000 {
        bail!("--leases must be 1 to 10000000");
    }
    let dir = tempfile::tempdir()?;
    let rss_before = rss_bytes();
    // Room for the closed-loop stations of the latency runs besides the held leases.
    let server = start_real(
        dir.path(),
        leases as u32 + READ_BENCH_CLIENTS as u32,
        Duration::from_secs(6 * 24 * 3600),
    )
    .await?;
    let state = server.state.clone();
    let started = Instant::now();
    let concurrency = 512;
    let mut next = 0usize;
    while next < leases {
        let batch_end = (next + concurrency).min(leases);
        let futures = (next..batch_end).map(|i| {
            let state = state.clone();
            async move {
                state
                    .checkout(CheckoutRequest {
                        component: "bench".into(),
                        station: format!("st-{i}"),
                        user: "u".into(),
                        host: "h".into(),
                        nonce: String::new(),
                        holder_key: String::new(),
                        borrow_hours: 0,
                    })
                    .await
            }
        });
        for result in futures::future::join_all(futures).await {
            result?;
        }
        next = batch_end;
    }
    let fill = started.elapsed();
    let rss_full = rss_bytes();
    let reads = measure_reads(server.addr, &state.admin_token).await?;
    let data_dir = state.config.data_dir.clone();
    let config = state.config.clone();
    drop(state);
    server.shutdown().await;
    let restart_started = Instant::now();
    let restarted = start_with(ServerConfig {
        listen: "127.0.0.1:0".into(),
        ..config
    })
    .await?;
    let restart = restart_started.elapsed();
    let held = restarted
        .state
        .consensus
        .read(|ledger| ledger.lease_count());
    restarted.shutdown().await;
    println!("active leases:     {leases} (after restart: {held})");
    println!(
        "fill time:         {:.1} s ({:.0} checkouts/s in-process)",
        fill.as_secs_f64(),
        leases as f64 / fill.as_secs_f64()
    );
    println!("RSS before:        {} MiB", rss_before / (1 << 20));
    println!("RSS with leases:   {} MiB", rss_full / (1 << 20));
    println!("restart to ready:  {:.2} s", restart.as_secs_f64());
    println!("data dir:          {}", data_dir.display());
    println!();
    println!(
        "{:<34} {:>9} {:>9} {:>11}",
        "read (over HTTP)", "median ms", "max ms", "bytes"
    );
    for read in &reads.reads {
        println!(
            "{:<34} {:>9.2} {:>9.2} {:>11}",
            read.path,
            read.median.as_secs_f64() * 1000.0,
            read.max.as_secs_f64() * 1000.0,
            read.bytes
        );
    }
    println!();
    println!(
        "{:<34} {:>9} {:>9} {:>11}",
        "checkout+checkin cycles", "p50 ms", "p99 ms", "cycles/s"
    );
    for (label, run) in [
        ("quiet", &reads.quiet),
        ("/metrics scraped every second", &reads.scraped),
    ] {
        println!(
            "{:<34} {:>9.2} {:>9.2} {:>11.0}",
            label,
            run.p50_us as f64 / 1000.0,
            run.p99_us as f64 / 1000.0,
            run.cycles_per_s()
        );
    }
    Ok(())
}

/// Stations of the latency runs of `--leases`.
const READ_BENCH_CLIENTS: usize = 32;
/// Requests per read measured by `--leases`.
const READ_SAMPLES: usize = 10;
/// Seconds of each latency run of `--leases`.
const READ_RUN_SECONDS: u64 = 10;

struct ReadTiming {
    path: &'static str,
    median: Duration,
    max: Duration,
    bytes: usize,
}

struct ReadFigures {
    reads: Vec<ReadTiming>,
    /// Checkout+checkin cycles with nothing else going on.
    quiet: RunResult,
    /// The same, while a scraper reads `/metrics` once a second.
    scraped: RunResult,
}

/// What reads cost with the server full of leases, and whether a scrape every second slows
/// checkouts down.
async fn measure_reads(addr: SocketAddr, admin_token: &str) -> anyhow::Result<ReadFigures> {
    let http = reqwest::Client::new();
    let base = format!("http://{addr}");
    let get = |path: &'static str| {
        let request = http.get(format!("{base}{path}")).bearer_auth(admin_token);
        async move {
            let started = Instant::now();
            let response = request.send().await?.error_for_status()?;
            let bytes = response.bytes().await?.len();
            anyhow::Ok((started.elapsed(), bytes))
        }
    };
    let mut reads = Vec::new();
    for path in [
        "/metrics",
        "/v1/status?summary=true",
        "/v1/status",
        "/v1/leases?limit=100",
        "/v1/leases?limit=100&station=st-9999*",
    ] {
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..READ_SAMPLES {
            let (took, size) = get(path).await?;
            times.push(took);
            bytes = size;
        }
        times.sort();
        reads.push(ReadTiming {
            path,
            median: times[times.len() / 2],
            max: *times.last().expect("samples"),
            bytes,
        });
    }
    let run = Duration::from_secs(READ_RUN_SECONDS);
    let quiet = drive(addr, READ_BENCH_CLIENTS, run).await?;
    let scraper = {
        let deadline = Instant::now() + run;
        let http = http.clone();
        let url = format!("{base}/metrics");
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_secs(1));
            while Instant::now() < deadline {
                ticks.tick().await;
                http.get(&url)
                    .send()
                    .await?
                    .error_for_status()?
                    .bytes()
                    .await?;
            }
            anyhow::Ok(())
        })
    };
    let scraped = drive(addr, READ_BENCH_CLIENTS, run).await?;
    scraper.await??;
    Ok(ReadFigures {
        reads,
        quiet,
        scraped,
    })
}
