//! `tessera`: the one binary. Runs the license server, the demo and the benchmark, and is the
//! command-line client for administrators and stations.
//!
//! # Layout
//! - `main.rs`: arguments and dispatch.
//! - `vendor.rs`: offline vendor tooling (root key, issuing key files).
//! - `serve.rs`: `tessera server` and `tessera demo`.
//! - `admin.rs`: client commands (keys, lease, status).
//! - `domain.rs`: `tessera domain status`.
//! - `bench.rs`: the checkout+checkin benchmark against a no-op baseline.
//! - `report.rs`: usage reports, audit verification, admin password hashes.

mod admin;
mod logging;

/// mimalloc instead of glibc's malloc: measured +20–30 % checkouts/s for `tessera bench` on
/// this project's 2-core machine (see BENCHMARKS.md); the server allocates small buffers per
/// request on several threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod authority;
mod bench;
mod bench_etcd;
mod domain;
mod neighbours;
mod pair;
mod report;
mod serve;
mod vendor;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tessera", version, about = "Tessera license server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the server is and how to prove you are its administrator.
#[derive(Args, Clone, Debug)]
pub struct Remote {
    /// The license server's URL; for a domain, its hosts' URLs comma-separated in host
    /// order (the client fails over between them).
    #[arg(
        long,
        env = "TESSERA_SERVER",
        default_value = "http://127.0.0.1:7400",
        global = true
    )]
    pub server: String,
    /// The admin token (DATA/admin.token).
    #[arg(long, env = "TESSERA_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// A CA certificate (PEM) to trust for https:// servers, besides the system's roots
    /// (`tessera tls init` writes ca.pem).
    #[arg(long, env = "TESSERA_CA", global = true)]
    pub ca: Option<std::path::PathBuf>,
}

impl Remote {
    /// The SDK client for `--server`, with `--token` and `--ca`.
    pub fn client(&self) -> anyhow::Result<tessera_client::Client> {
        check_server_urls(&self.server)?;
        if let Some(token) = &self.token
            && (token.trim().is_empty() || token.chars().any(|c| c.is_control() || c == ' '))
        {
            anyhow::bail!(
                "--token (TESSERA_TOKEN) is empty or has spaces or control characters: give the token from DATA/admin.token"
            );
        }
        let client = tessera_client::Client::new(&self.server, self.token.clone());
        Ok(match &self.ca {
            Some(ca) => client.with_ca_file(ca)?,
            None => client,
        })
    }
}

/// Each of `--server`'s comma-separated URLs is `http://` or `https://` with a host: a
/// clear message before anything is sent.
fn check_server_urls(servers: &str) -> anyhow::Result<()> {
    for url in servers.split(',').map(str::trim) {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"));
        match rest {
            Some(rest) if !rest.is_empty() && !rest.starts_with('/') => {}
            Some(_) => anyhow::bail!("--server {url:?} has no host: http://HOST:PORT"),
            None => anyhow::bail!(
                "--server {url:?} needs a scheme: http://{url} (or https://{url} for a server serving HTTPS)"
            ),
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum Command {
    /// Run a license server.
    Server(serve::ServerArgs),
    /// Run the vendor authority, or manage customers, server IDs and keys on it.
    Authority(authority::AuthorityArgs),
    /// Run a complete local setup: a vendor, sample keys, a server on 127.0.0.1:7400.
    Demo(serve::DemoArgs),
    /// Offline vendor tooling: create the root key, issue license keys.
    #[command(subcommand)]
    Vendor(vendor::VendorCommand),
    /// Manage the license keys of a server.
    Keys {
        #[command(subcommand)]
        command: admin::KeysCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Take, keep and return a lease, as a station does.
    Lease {
        #[command(subcommand)]
        command: admin::LeaseCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show licenses per component, keys and holders.
    Status {
        /// Print the JSON status instead of tables.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        filter: admin::StatusFilter,
        #[command(flatten)]
        remote: Remote,
    },
    /// Recent notifications (key updates, sync, deadlines, clock), newest first.
    Events {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// A server domain of several hosts: status, add a host, remove a host.
    Domain {
        #[command(subcommand)]
        command: domain::DomainCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// A redundant pair: enable, disable, sync, status.
    Pair {
        #[command(subcommand)]
        command: pair::PairCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Donate licenses of a key to a neighbour server until a date (or change, or --end).
    Donate(neighbours::DonateArgs),
    /// Neighbour servers: links, donations, received grants, usage reports.
    Neighbours {
        #[command(subcommand)]
        command: neighbours::NeighboursCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Synchronize with the vendor: online (no subcommand), or by file (export / import).
    Sync(admin::SyncArgs),
    /// Measure checkout+checkin cycles/s against a no-op HTTP baseline in the same run.
    Bench(bench::BenchArgs),
    /// Reports from the usage history.
    Report {
        #[command(subcommand)]
        command: report::ReportCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// The tamper-evident audit log.
    Audit {
        #[command(subcommand)]
        command: report::AuditCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Console administrators.
    #[command(subcommand)]
    Admin(report::AdminCommand),
    /// TLS certificates: a private CA and a server certificate, for sites without a PKI.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Check a stopped server's data directory as a start does (every key, grant, certificate
    /// and log entry against the trusted vendor keys; the audit chain) and explain each
    /// finding with the way out. Takes the server's own flags or --config. Exit status 1 when
    /// something is found.
    Doctor {
        #[command(flatten)]
        server: serve::ServerArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Make a private CA (or reuse the one in --out) and a server certificate for the names
    /// and addresses the server is reached by; writes ca.pem, ca.key, server.pem, server.key.
    Init {
        /// The directory to write to.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Host names and IP addresses, comma-separated: localhost,licenses.example,10.0.0.5.
        #[arg(long, value_delimiter = ',', required = true)]
        name: Vec<String>,
        /// Write the certificate and key as NAME.pem and NAME.key (one per host of a domain,
        /// all from the CA in --out).
        #[arg(long, default_value = "server")]
        cert_name: String,
    },
    /// Print a certificate's SHA-256 fingerprint (of the first certificate of the PEM file),
    /// as `peer_pins` / `--peer-pin` take it.
    Fingerprint {
        /// The certificate file (PEM), e.g. a host's server.pem.
        cert: std::path::PathBuf,
    },
}

fn run_tls(command: TlsCommand) -> anyhow::Result<()> {
    match command {
        TlsCommand::Fingerprint { cert } => {
            println!("{}", tessera_tls::fingerprint_file(&cert)?);
            Ok(())
        }
        TlsCommand::Init {
            out,
            name,
            cert_name,
        } => {
            let written = tessera_tls::init_as(&out, &name, &cert_name)?;
            println!(
                "CA certificate (clients trust it: --ca, TESSERA_CA): {}",
                written.ca.display()
            );
            println!(
                "CA key (keep it private; issues the next certificates): {}",
                written.ca_key.display()
            );
            println!("server certificate: {}", written.cert.display());
            println!("server key: {}", written.key.display());
            println!(
                "certificate fingerprint (peer_pins): {}",
                tessera_tls::fingerprint_file(&written.cert)?
            );
            println!(
                "serve with: tessera server --tls-cert {} --tls-key {}",
                written.cert.display(),
                written.key.display()
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    tessera_tls::install();
    let cli = Cli::parse();
    // Output piped into a reader that stops early (`tessera status | head -1`) ends a
    // command quietly, as other command-line tools do, instead of a panic on the write.
    // Not for the long-running services, whose sockets must never kill them.
    let service = matches!(
        cli.command,
        Command::Server(_) | Command::Authority(_) | Command::Demo(_) | Command::Bench(_)
    );
    #[cfg(unix)]
    if !service {
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // A server's configuration is read and checked before the runtime exists: it sets the
    // runtime's thread count and the log format.
    let job = match cli.command {
        Command::Server(args) => match args.into_config() {
            Ok(config) => Job::Server(config),
            Err(error) => {
                eprintln!("error: {error:#}");
                return ExitCode::FAILURE;
            }
        },
        command => Job::Other(command),
    };
    let log_format = match &job {
        Job::Server(config) => config.log_format,
        Job::Other(_) => tessera_server::config::LogFormat::Text,
    };
    // A benchmark's million checkouts are not an activity log anyone reads (writing one
    // line each would be what it measures).
    let default_filter = if matches!(job, Job::Other(Command::Bench(_))) {
        "info,openraft=warn,tessera::activity=off"
    } else {
        logging::DEFAULT_FILTER
    };
    logging::init(log_format, default_filter);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Job::Server(config) = &job
        && let Some(threads) = config.worker_threads
    {
        runtime.worker_threads(threads);
    }
    let runtime = runtime.build().expect("tokio runtime");
    let result = runtime.block_on(async move {
        match job {
            Job::Server(config) => serve::run_server(config).await,
            Job::Other(command) => run(command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            if let Some(tessera_client::ClientError::Api {
                status: 401, code, ..
            }) = error.downcast_ref::<tessera_client::ClientError>()
                && code == "unauthorized"
            {
                eprintln!(
                    "hint: give the admin token with --token TOKEN or TESSERA_TOKEN (the server's DATA/admin.token)"
                );
            }
            ExitCode::FAILURE
        }
    }
}

/// What the process runs: a server, its configuration already read, or another command.
enum Job {
    Server(tessera_server::ServerConfig),
    Other(Command),
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Server(args) => serve::run_server(args.into_config()?).await,
        Command::Demo(args) => serve::run_demo(args).await,
        Command::Authority(args) => authority::run(args).await,
        Command::Vendor(command) => vendor::run(command),
        Command::Keys { command, remote } => admin::run_keys(command, &remote).await,
        Command::Lease { command, remote } => admin::run_lease(command, &remote).await,
        Command::Status {
            json,
            filter,
            remote,
        } => admin::run_status(json, &filter, &remote).await,
        Command::Events { json, remote } => admin::run_events(json, &remote).await,
        Command::Sync(args) => admin::run_sync(args).await,
        Command::Donate(args) => neighbours::run_donate(args).await,
        Command::Neighbours { command, remote } => neighbours::run(command, &remote).await,
        Command::Domain { command, remote } => domain::run(command, &remote).await,
        Command::Pair { command, remote } => pair::run(command, &remote).await,
        Command::Bench(args) => match (args.leases, args.pair, args.domain) {
            (None, true, _) => domain::bench_pair(&args.clients, args.seconds).await,
            (None, false, Some(hosts)) => domain::bench(hosts, &args.clients, args.seconds).await,
            _ => bench::run(args).await,
        },
        Command::Report { command, remote } => report::run_report(command, &remote).await,
        Command::Audit { command, remote } => report::run_audit(command, &remote).await,
        Command::Admin(command) => report::run_admin(command),
        Command::Tls(command) => run_tls(command),
        Command::Doctor { server, json } => run_doctor(server, json),
    }
}

/// `tessera doctor`: prints what it read and each finding; fails when something was found.
fn run_doctor(server: serve::ServerArgs, json: bool) -> anyhow::Result<()> {
    let config = server.into_config()?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as i64);
    let report =
        tessera_server::doctor::examine(&config, now_ms).map_err(|error| anyhow::anyhow!(error))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "data directory {}: {} log entries{}, {} audit records",
            report.data_dir,
            report.log_entries,
            if report.snapshot {
                " after a snapshot"
            } else {
                ""
            },
            report.audit_records
        );
        for finding in &report.findings {
            println!(
                "\nFOUND in {}:\n  {}\n  way out: {}",
                finding.place, finding.problem, finding.remedy
            );
        }
    }
    match report.findings.len() {
        0 => {
            if !json {
                println!("no problem found: the server will start from this data directory");
            }
            Ok(())
        }
        found => anyhow::bail!("{found} problem(s) found in {}", report.data_dir),
    }
}

/// Reads a file, naming it in the error.
pub fn read_file(path: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", path.display()))
}
