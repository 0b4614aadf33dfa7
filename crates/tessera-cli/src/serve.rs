//! `tessera server` and `tessera demo`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use jiff::Timestamp;
use tessera_core::{LicenseKey, Refusal};
use tessera_server::clock::SystemClock;
use tessera_server::config::{SyncSchedule, parse_duration};
use tessera_server::domain::DomainConfig;
use tessera_server::error::ApiError;
use tessera_server::ids::LeaseIds;
use tessera_server::{RunningServer, ServerConfig, ServerOptions};

use crate::vendor::{self, IssueArgs, VENDOR_PUB};

#[derive(Args)]
pub struct ServerArgs {
    /// Configuration file (TOML); flags given here override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory [default: ./tessera-data].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7400].
    #[arg(long)]
    listen: Option<String>,
    /// Vendor public key file to trust (repeatable).
    #[arg(long)]
    trust: Vec<PathBuf>,
    /// This license server's ID, as the vendor issued it.
    #[arg(long)]
    server_id: Option<String>,
    /// Lease time without heartbeat, e.g. 2m.
    #[arg(long)]
    lease_ttl: Option<String>,
    /// The vendor authority's URL, for online sync.
    #[arg(long)]
    authority: Option<String>,
    /// Automatic online sync: off, daily (the default with --authority) or weekly.
    #[arg(long)]
    sync_schedule: Option<String>,
    /// This host's number in its domain (with --hosts, or the domain section of the config).
    #[arg(long)]
    host: Option<u64>,
    /// Every host of the domain: 1=ADDR,2=ADDR,... (overrides the hosts of the config's domain section).
    #[arg(long)]
    hosts: Option<String>,
    /// The secret shared by the hosts of a domain (authenticates their Raft traffic).
    #[arg(long, env = "TESSERA_DOMAIN_SECRET", hide_env_values = true)]
    domain_secret: Option<String>,
    /// Join a running domain (then `tessera domain add-host`): never start a new one.
    #[arg(long)]
    join: bool,
    /// Threads serving requests and running consensus [default: one per CPU core].
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Serve HTTPS with this certificate chain (PEM; `tessera tls init` makes one), with
    /// --tls-key. Reloaded when the file changes or on SIGHUP.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A CA (PEM) to trust, besides the system's roots, when this server calls others over
    /// HTTPS (authority, neighbours, webhooks) [env: TESSERA_CA].
    #[arg(long = "tls-ca", env = "TESSERA_CA")]
    tls_ca: Option<PathBuf>,
    /// Trust a domain or pair peer whose certificate has this SHA-256 fingerprint
    /// (`tessera tls fingerprint FILE`); repeat for each host. Config: `peer_pins`.
    #[arg(long = "peer-pin", value_name = "SHA256")]
    peer_pins: Vec<String>,
    /// Mutual TLS between the hosts of a domain or pair: each shows its certificate, and
    /// peer requests without one from --tls-ca are refused. Config: `peer_mtls`.
    #[arg(long)]
    peer_mtls: bool,
    /// The log's format on stderr: text (colour only on a terminal) or json (one object per
    /// line). Config: `log_format`.
    #[arg(long, value_name = "text|json")]
    log_format: Option<String>,
    /// For tests of real processes: a clock that moves only by `POST /v1/test/clock`. Not in
    /// release builds: a customer must not be able to move the server's clock.
    #[cfg(debug_assertions)]
    #[arg(long, hide = true)]
    test_clock: bool,
}

impl ServerArgs {
    /// The configuration: the file, then the flags over it; checked.
    pub fn into_config(self) -> anyhow::Result<ServerConfig> {
        let mut config = match &self.config {
            Some(path) => ServerConfig::from_file(path)?,
            None => ServerConfig::default(),
        };
        if let Some(data) = self.data {
            config.data_dir = data;
        }
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        config.trust.extend(self.trust);
        if self.server_id.is_some() {
            config.server_id = self.server_id;
        }
        if let Some(ttl) = self.lease_ttl {
            config.lease_ttl = parse_duration("--lease-ttl", &ttl)?;
        }
        if self.authority.is_some() {
            config.authority = self.authority;
        }
        if let Some(schedule) = self.sync_schedule {
            config.sync_schedule = Some(SyncSchedule::parse(&schedule)?);
        }
        if self.domain_secret.is_some() {
            config.domain_secret = self.domain_secret;
        }
        match (self.host, self.hosts) {
            (host, Some(hosts)) => {
                let host = host
                    .or(config.domain.as_ref().map(|d| d.host))
                    .context("--hosts needs --host N, this host's number")?;
                config.domain = Some(DomainConfig::parse_list(host, &hosts)?);
            }
            (Some(host), None) => match &mut config.domain {
                Some(domain) => domain.host = host,
                None => anyhow::bail!("--host needs the domain's hosts: --hosts 1=ADDR,2=ADDR,..."),
            },
            (None, None) => {}
        }
        if self.join {
            match &mut config.domain {
                Some(domain) => domain.join = true,
                None => anyhow::bail!("--join needs the domain: --host N --hosts 1=ADDR,..."),
            }
        }
        if self.worker_threads.is_some() {
            config.worker_threads = self.worker_threads;
        }
        if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            config.tls = Some((cert, key));
        }
        if self.tls_ca.is_some() {
            config.tls_ca = self.tls_ca;
        }
        for pin in &self.peer_pins {
            config
                .peer_pins
                .push(tessera_tls::parse_pin(pin).map_err(anyhow::Error::msg)?);
        }
        config.peer_mtls |= self.peer_mtls;
        if let Some(format) = &self.log_format {
            config.log_format = tessera_server::config::LogFormat::parse(format)?;
        }
        #[cfg(debug_assertions)]
        if self.test_clock {
            config.test_clock = Some(tessera_server::clock::ManualClock::new(
                jiff::Timestamp::now().as_millisecond(),
            ));
        }
        config.validate()?;
        Ok(config)
    }
}

async fn start(config: ServerConfig) -> anyhow::Result<RunningServer> {
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    #[cfg(debug_assertions)]
    let clock: Arc<dyn tessera_server::clock::Clock> = match &config.test_clock {
        Some(clock) => Arc::new(clock.clone()),
        None => Arc::new(SystemClock),
    };
    #[cfg(not(debug_assertions))]
    let clock: Arc<dyn tessera_server::clock::Clock> = Arc::new(SystemClock);
    let options = ServerOptions {
        config,
        clock,
        ids: LeaseIds::from_os()?,
        run_timers: true,
    };
    Ok(tessera_server::start(listener, options).await?)
}

/// Ctrl-C (SIGINT) and SIGTERM (a service manager stopping us), listened to from the moment
/// this is made: made before the server announces itself, so a stop sent as soon as the
/// announcement is read is a graceful one, not the signal's default (death).
struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn listen() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for either, then shuts down gracefully: in-flight requests finish and a pair's
    /// other host hears that this one stops.
    async fn shut_down_on_signal(mut self, server: RunningServer) -> anyhow::Result<()> {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        eprintln!("shutting down");
        server.shutdown().await;
        Ok(())
    }
}

pub async fn run_server(config: ServerConfig) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    let server = start(config).await?;
    let stop = StopSignals::listen()?;
    // Whoever started us may close stdout after reading the URL; that must not stop the server.
    let mut out = std::io::stdout();
    let _ = writeln!(out, "Tessera license server on {}", server.url());
    let _ = writeln!(
        out,
        "admin token in {}",
        data_dir.join("admin.token").display()
    );
    let _ = out.flush();
    stop.shut_down_on_signal(server).await
}

#[derive(Args)]
pub struct DemoArgs {
    /// Where the demo keeps its vendor, keys and server data (reused on the next run).
    #[arg(long, default_value = "./tessera-demo")]
    dir: PathBuf,
    /// The demo server's address.
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: String,
}

/// The sample keys: (key id, components, licenses).
const SAMPLE_KEYS: [(&str, &[&str], u32); 3] = [
    ("DEMO-CAD", &["cad"], 5),
    ("DEMO-SUITE", &["cam", "sim"], 3),
    ("DEMO-VIEWER", &["viewer"], 50),
];

pub async fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    let vendor_dir = args.dir.join("vendor");
    if !vendor_dir.join(VENDOR_PUB).exists() {
        vendor::init(&vendor_dir)?;
    }
    let keys_dir = args.dir.join("keys");
    std::fs::create_dir_all(&keys_dir)?;
    let mut keys = Vec::new();
    for (key_id, components, licenses) in SAMPLE_KEYS {
        let out = keys_dir.join(format!("{key_id}.json"));
        if !out.exists() {
            vendor::issue(
                &IssueArgs {
                    dir: vendor_dir.clone(),
                    customer: "Demo Customer".into(),
                    components: components.iter().map(|c| c.to_string()).collect(),
                    licenses,
                    valid_days: 365,
                    server_id: None,
                    renews: None,
                    certified_server_required: false,
                    max_borrow_days: 0,
                    grace_minutes: 0,
                    valid_from: None,
                    key_id: Some(key_id.into()),
                    out: out.clone(),
                },
                Timestamp::now(),
            )?;
        }
        keys.push(LicenseKey::from_json(&std::fs::read_to_string(&out)?)?);
    }
    let config = ServerConfig {
        data_dir: args.dir.join("server"),
        listen: args.listen.clone(),
        trust: vec![vendor_dir.join(VENDOR_PUB)],
        ..ServerConfig::default()
    };
    let server = start(config).await?;
    for key in keys {
        match server.state.import_key(key).await {
            Ok(_) | Err(ApiError::Refused(Refusal::KeyAlreadyImported { .. })) => {}
            Err(error) => return Err(error.into()),
        }
    }
    let url = server.url();
    let token = server.state.admin_token.clone();
    let stop = StopSignals::listen()?;
    println!(
        "\nTessera demo is running.\n\n  Console:      {url}/login?token={token}  (signs you in)\n  Status JSON:  {url}/v1/status\n  Metrics:      {url}/metrics\n  OpenAPI:      {url}/v1/openapi.json\n  Admin token:  {token}\n  Data:         {dir}\n\nTry, in another terminal:\n  export TESSERA_SERVER={url} TESSERA_TOKEN={token}\n  alias tessera={exe}\n  tessera lease checkout --component cad --station ws-17 --user ann --host ws17\n  tessera status\n  tessera keys list\n  curl -s -X POST {url}/v1/leases -H 'content-type: application/json' -d '{{\"component\":\"cam\",\"station\":\"ws-18\",\"user\":\"bob\",\"host\":\"ws18\"}}'\n\nPress Ctrl-C to stop.",
        dir = args.dir.display(),
        exe = std::env::current_exe()
            .map(|exe| exe.display().to_string())
            .unwrap_or_else(|_| "tessera".into()),
    );
    stop.shut_down_on_signal(server).await
}
