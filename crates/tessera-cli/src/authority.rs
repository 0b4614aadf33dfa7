//! `tessera authority`: run the vendor authority, and the vendor's commands against it.
//!
//! Without a subcommand it runs the service (`--data DIR --listen ADDR`) and prints
//! `Tessera authority on http://ADDR` as its first line. With one, it calls the authority's
//! admin API at `--authority URL` with `--token T`. Commands whose result is an identifier
//! (`server add`, `key issue`, `key renew`) print it as their last line, for scripts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tessera_authority::wire::{
    AlertInfo, CustomerInfo, CustomerSettings, ErrorBody, IssueKey, KeyInfo, NewCustomer,
    NewServer, RenewKey, ServerInfo,
};
use tessera_authority::{AuthorityConfig, SystemClock};
use tessera_core::LicenseKey;
use tessera_core::sync::SyncResponse;

pub const DEFAULT_AUTHORITY_URL: &str = "http://127.0.0.1:7450";
/// A request file larger than the authority accepts is refused before sending it.
const REQUEST_FILE_BYTES_MAX: u64 = 64 * 1024;

/// Run the vendor authority, or manage customers, server IDs and keys on it.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuthorityArgs {
    #[command(subcommand)]
    pub command: Option<AuthorityCommand>,
    /// Data directory: vendor.key, vendor.pub, admin.token, authority.sqlite.
    #[arg(long, default_value = "./tessera-authority")]
    pub data: PathBuf,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7450")]
    pub listen: String,
    /// Serve HTTPS with this certificate chain (PEM), with --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// Where the authority is and how to prove you are the vendor.
#[derive(Args, Clone, Debug)]
pub struct AuthorityRemote {
    /// The authority's URL.
    #[arg(long, env = "TESSERA_AUTHORITY", default_value = DEFAULT_AUTHORITY_URL, global = true)]
    pub authority: String,
    /// The admin token (DATA/admin.token).
    #[arg(
        long,
        env = "TESSERA_AUTHORITY_TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// A CA certificate (PEM) to trust for an https:// authority, besides the system's roots.
    #[arg(long, env = "TESSERA_CA", global = true)]
    pub ca: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum AuthorityCommand {
    /// Add and list customers.
    Customer {
        #[command(subcommand)]
        command: CustomerCommand,
        #[command(flatten)]
        remote: AuthorityRemote,
    },
    /// Register license server IDs, list them, reset their key pair binding.
    Server {
        #[command(subcommand)]
        command: ServerCommand,
        #[command(flatten)]
        remote: AuthorityRemote,
    },
    /// Issue, renew, revoke and list license keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
        #[command(flatten)]
        remote: AuthorityRemote,
    },
    /// List the clones and rollbacks detected at syncs (and the vendor's resets), newest
    /// first.
    Alerts {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: AuthorityRemote,
    },
    /// Answer a sync request file from an air-gapped license server.
    Process {
        /// The request file the customer sent (from `POST /v1/sync/request` on their server).
        #[arg(long = "in")]
        input: PathBuf,
        /// Where to write the response file to send back.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        remote: AuthorityRemote,
    },
}

#[derive(Subcommand, Debug)]
pub enum CustomerCommand {
    /// Add a customer.
    Add {
        /// The customer's name.
        #[arg(long)]
        name: String,
        /// How long a certificate from an online sync lasts for this customer's servers,
        /// 1 to 366 days (default 30). A sync by file always certifies for 366 days.
        #[arg(long)]
        online_certificate_days: Option<i64>,
    },
    /// Change a customer's settings; they apply from each server's next sync.
    Set {
        /// The customer's name.
        #[arg(long)]
        name: String,
        /// As for `customer add`; `default` resets it to 30.
        #[arg(long)]
        online_certificate_days: String,
    },
    /// List customers.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ServerCommand {
    /// Register a new license server ID for a customer (created if missing); prints the ID.
    Add {
        /// The customer the server belongs to.
        #[arg(long)]
        customer: String,
    },
    /// List license server IDs with their binding and last sync.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Only this customer's servers.
        #[arg(long)]
        customer: Option<String>,
    },
    /// Clear the key pair bound to a server ID and its sync chain, so a reinstalled server
    /// (or, after a clone or rollback, the legitimate one) can sync again.
    Reset { server_id: String },
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Issue a license key to a server ID; prints the key id.
    Issue {
        /// The license server ID the key is issued to.
        #[arg(long)]
        server_id: String,
        /// Comma-separated component names, e.g. cad,cam.
        #[arg(long, value_delimiter = ',', required = true)]
        components: Vec<String>,
        /// How many stations may use it at once.
        #[arg(long)]
        licenses: u32,
        /// Valid from now for this many days.
        #[arg(long)]
        valid_days: u32,
        /// Refuse unless the server ID belongs to this customer.
        #[arg(long)]
        customer: Option<String>,
        /// Stations may borrow a license for up to this many days (0: never).
        #[arg(long, default_value_t = 0)]
        max_borrow_days: u32,
        /// Applications keep running this many minutes past a lease's end without a
        /// server (0: none).
        #[arg(long, default_value_t = 0)]
        grace_minutes: u32,
        /// Also write the key file here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Register the renewal key of a key; the server receives it at its next sync.
    Renew {
        /// The key to renew.
        #[arg(long)]
        key: String,
        /// Valid for this many days from the renewed key's end (or from now if it has ended).
        #[arg(long)]
        valid_days: u32,
        /// Default: the renewed key's.
        #[arg(long)]
        licenses: Option<u32>,
        /// Comma-separated; default: the renewed key's.
        #[arg(long, value_delimiter = ',')]
        components: Option<Vec<String>>,
        /// Also write the renewal key file here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Revoke a key (or a renewal key); servers drop it at their next sync.
    Revoke { key_id: String },
    /// List keys and renewal keys.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Only keys of this server ID.
        #[arg(long)]
        server_id: Option<String>,
    },
    /// Print a key file exactly as signed (or write it with --out).
    Export {
        key_id: String,
        /// Write the key file here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Entry point for `tessera authority ...`.
pub async fn run(args: AuthorityArgs) -> anyhow::Result<()> {
    match args.command {
        None => {
            let tls = args.tls_cert.zip(args.tls_key);
            serve(args.data, &args.listen, tls).await
        }
        Some(command) => run_command(command, &mut std::io::stdout()).await,
    }
}

/// Runs the service until Ctrl-C.
async fn serve(data: PathBuf, listen: &str, tls: Option<(PathBuf, PathBuf)>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let authority = tessera_authority::start(
        listener,
        AuthorityConfig {
            data_dir: data.clone(),
            clock: Arc::new(SystemClock),
            tls,
        },
    )
    .await?;
    // The first line is the contract: scripts and tests read the URL from it.
    println!("Tessera authority on {}", authority.url());
    println!(
        "vendor key {} ({}); admin token in {}",
        authority.vendor_public_key.fingerprint(),
        data.join(tessera_authority::data_dir::VENDOR_PUB_FILE)
            .display(),
        data.join(tessera_authority::data_dir::ADMIN_TOKEN_FILE)
            .display(),
    );
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for Ctrl-C")?;
    authority.shutdown().await;
    Ok(())
}

/// Runs one client command, writing what it prints to `out`.
pub async fn run_command(
    command: AuthorityCommand,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    match command {
        AuthorityCommand::Customer { command, remote } => {
            customer(command, &Remote::new(&remote)?, out).await
        }
        AuthorityCommand::Server { command, remote } => {
            server(command, &Remote::new(&remote)?, out).await
        }
        AuthorityCommand::Key { command, remote } => {
            key(command, &Remote::new(&remote)?, out).await
        }
        AuthorityCommand::Process {
            input,
            out: path,
            remote,
        } => process(&input, &path, &Remote::new(&remote)?, out).await,
        AuthorityCommand::Alerts { json, remote } => {
            alerts(json, &Remote::new(&remote)?, out).await
        }
    }
}

async fn alerts(json: bool, remote: &Remote, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let alerts: Vec<AlertInfo> = remote.get("/v1/alerts").await?;
    if json {
        return print_json(out, &alerts);
    }
    if alerts.is_empty() {
        writeln!(out, "no clone or rollback detected")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<20} {:<14} {:<16} {:<20} {:>5}  DETAIL",
        "KIND", "SERVER ID", "CUSTOMER", "LAST SEEN", "TIMES"
    )?;
    for alert in alerts {
        writeln!(
            out,
            "{:<20} {:<14} {:<16} {:<20} {:>5}  {}",
            alert.kind,
            alert.server_id,
            alert.customer,
            short_time(Some(alert.last_at)),
            alert.count,
            alert.detail
        )?;
    }
    Ok(())
}

async fn customer(
    command: CustomerCommand,
    remote: &Remote,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    match command {
        CustomerCommand::Add {
            name,
            online_certificate_days,
        } => {
            let added: CustomerInfo = remote
                .post(
                    "/v1/customers",
                    &NewCustomer {
                        name,
                        online_certificate_days,
                    },
                )
                .await?;
            writeln!(out, "{}", added.name)?;
        }
        CustomerCommand::Set {
            name,
            online_certificate_days,
        } => {
            let days = match online_certificate_days.as_str() {
                "default" => None,
                text => Some(text.parse::<i64>().map_err(|_| {
                    anyhow::anyhow!(
                        "--online-certificate-days {text:?}: expected a number of days or \"default\""
                    )
                })?),
            };
            let changed: CustomerInfo = remote
                .post(
                    &format!("/v1/customers/{}/settings", encode(&name)),
                    &CustomerSettings {
                        online_certificate_days: days,
                    },
                )
                .await?;
            writeln!(
                out,
                "{}: online syncs certify for {} days from the next sync",
                changed.name, changed.online_certificate_days
            )?;
        }
        CustomerCommand::List { json } => {
            let customers: Vec<CustomerInfo> = remote.get("/v1/customers").await?;
            if json {
                return print_json(out, &customers);
            }
            writeln!(
                out,
                "{:<32} {:>7} {:>12}  CREATED",
                "CUSTOMER", "SERVERS", "ONLINE CERT"
            )?;
            for customer in customers {
                writeln!(
                    out,
                    "{:<32} {:>7} {:>11}d  {}",
                    customer.name,
                    customer.servers,
                    customer.online_certificate_days,
                    short_time(Some(customer.created_at))
                )?;
            }
        }
    }
    Ok(())
}

async fn server(
    command: ServerCommand,
    remote: &Remote,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    match command {
        ServerCommand::Add { customer } => {
            let request = NewServer {
                customer,
                create_customer: true,
            };
            let added: ServerInfo = remote.post("/v1/servers", &request).await?;
            writeln!(out, "{}", added.server_id)?;
        }
        ServerCommand::List { json, customer } => {
            let path = match customer {
                Some(customer) => format!("/v1/servers?customer={}", encode(&customer)),
                None => "/v1/servers".to_string(),
            };
            let servers: Vec<ServerInfo> = remote.get(&path).await?;
            if json {
                return print_json(out, &servers);
            }
            writeln!(
                out,
                "{:<14} {:<20} {:<20} {:<20} {:<20} {:>5}  CERTIFICATE UNTIL",
                "SERVER ID", "CUSTOMER", "BOUND KEY", "BOUND AT", "LAST SYNC", "SEQ"
            )?;
            for server in servers {
                writeln!(
                    out,
                    "{:<14} {:<20} {:<20} {:<20} {:<20} {:>5}  {}",
                    server.server_id,
                    server.customer,
                    server.key_fingerprint.as_deref().unwrap_or("-"),
                    short_time(server.bound_at),
                    short_time(server.last_sync_at),
                    server.last_sequence,
                    short_time(server.certificate_valid_until),
                )?;
            }
        }
        ServerCommand::Reset { server_id } => {
            let path = format!("/v1/servers/{}/reset", encode(&server_id));
            let reset: ServerInfo = remote.post(&path, &serde_json::json!({})).await?;
            writeln!(
                out,
                "{}: key pair binding and sync chain cleared; the next sync binds the key pair that sends it and starts a new chain",
                reset.server_id
            )?;
        }
    }
    Ok(())
}

async fn key(
    command: KeyCommand,
    remote: &Remote,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    match command {
        KeyCommand::Issue {
            server_id,
            components,
            licenses,
            valid_days,
            customer,
            max_borrow_days,
            grace_minutes,
            out: file,
        } => {
            let request = IssueKey {
                server_id,
                components,
                licenses,
                valid_days,
                customer,
                max_borrow_days,
                grace_minutes,
            };
            let key: LicenseKey = remote.post("/v1/keys", &request).await?;
            write_key_file(file.as_deref(), &key, out)?;
            writeln!(out, "{}", key.key_id())?;
        }
        KeyCommand::Renew {
            key: key_id,
            valid_days,
            licenses,
            components,
            out: file,
        } => {
            let request = RenewKey {
                valid_days,
                components,
                licenses,
            };
            let path = format!("/v1/keys/{}/renewal", encode(&key_id));
            let key: LicenseKey = remote.post(&path, &request).await?;
            write_key_file(file.as_deref(), &key, out)?;
            writeln!(
                out,
                "renewal of {key_id}: valid {} to {}",
                tessera_api::time_text(key.payload.valid_from),
                tessera_api::time_text(key.payload.valid_until)
            )?;
            writeln!(out, "{}", key.key_id())?;
        }
        KeyCommand::Revoke { key_id } => {
            let path = format!("/v1/keys/{}/revoke", encode(&key_id));
            let revoked: KeyInfo = remote.post(&path, &serde_json::json!({})).await?;
            writeln!(
                out,
                "{} revoked; license server {} drops it at its next sync",
                revoked.key_id, revoked.server_id
            )?;
        }
        KeyCommand::List { json, server_id } => {
            let path = match server_id {
                Some(server_id) => format!("/v1/keys?server_id={}", encode(&server_id)),
                None => "/v1/keys".to_string(),
            };
            let keys: Vec<KeyInfo> = remote.get(&path).await?;
            if json {
                return print_json(out, &keys);
            }
            writeln!(
                out,
                "{:<16} {:<14} {:<16} {:<20} {:>8}  {:<20} {:<20} {:<16} STATE",
                "KEY",
                "SERVER ID",
                "CUSTOMER",
                "COMPONENTS",
                "LICENSES",
                "VALID FROM",
                "VALID UNTIL",
                "RENEWS"
            )?;
            for key in keys {
                let state = if key.revoked_at.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                writeln!(
                    out,
                    "{:<16} {:<14} {:<16} {:<20} {:>8}  {:<20} {:<20} {:<16} {state}",
                    key.key_id,
                    key.server_id,
                    key.customer,
                    key.components.join(","),
                    key.licenses,
                    short_time(Some(key.valid_from)),
                    short_time(Some(key.valid_until)),
                    key.renews.as_deref().unwrap_or("-"),
                )?;
            }
        }
        KeyCommand::Export { key_id, out: file } => {
            let key: LicenseKey = remote.get(&format!("/v1/keys/{}", encode(&key_id))).await?;
            match file {
                Some(path) => {
                    write_key_file(Some(&path), &key, out)?;
                }
                None => writeln!(out, "{}", key.to_json_pretty())?,
            }
        }
    }
    Ok(())
}

async fn process(
    input: &Path,
    output: &Path,
    remote: &Remote,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let size = std::fs::metadata(input)
        .with_context(|| format!("cannot read {}", input.display()))?
        .len();
    if size > REQUEST_FILE_BYTES_MAX {
        bail!(
            "{} is {size} bytes, larger than any sync request ({REQUEST_FILE_BYTES_MAX} bytes at most)",
            input.display()
        );
    }
    let text = std::fs::read_to_string(input)
        .with_context(|| format!("cannot read {}", input.display()))?;
    // Sent as is: the authority checks the server's signature over exactly this document.
    let response: SyncResponse = remote.post_text("/v1/sync/process", text).await?;
    let json = serde_json::to_string_pretty(&response)?;
    std::fs::write(output, format!("{json}\n"))
        .with_context(|| format!("cannot write {}", output.display()))?;
    let payload = &response.payload;
    writeln!(
        out,
        "answered sync request {} of {}: {} keys, {} renewal keys, {} revoked; certificate valid until {}",
        payload.sequence,
        payload.server_id,
        payload.keys.len(),
        payload.renewals.len(),
        payload.revoked.len(),
        tessera_api::time_text(payload.certificate.payload.valid_until),
    )?;
    writeln!(
        out,
        "wrote {}: send it back to the customer",
        output.display()
    )?;
    Ok(())
}

fn write_key_file(
    path: Option<&Path>,
    key: &LicenseKey,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    if let Some(path) = path {
        std::fs::write(path, format!("{}\n", key.to_json_pretty()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        writeln!(out, "wrote {}", path.display())?;
    }
    Ok(())
}

fn print_json<T: Serialize>(out: &mut (dyn Write + Send), value: &T) -> anyhow::Result<()> {
    writeln!(out, "{}", serde_json::to_string_pretty(value)?)?;
    Ok(())
}

fn short_time(time: Option<jiff::Timestamp>) -> String {
    match time {
        Some(time) => tessera_api::time_text(time),
        None => "-".into(),
    }
}

/// Percent-encodes one path segment or query value, so an id typed with `/` or `?` cannot
/// address another route.
fn encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// The authority's admin API, as seen from the CLI.
struct Remote {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Remote {
    fn new(remote: &AuthorityRemote) -> anyhow::Result<Remote> {
        Ok(Remote {
            http: tessera_tls::client_builder(remote.ca.as_deref())?
                .timeout(std::time::Duration::from_secs(60))
                .build()
                .context("cannot build the HTTP client")?,
            base: remote.authority.trim_end_matches('/').to_string(),
            token: remote.token.clone(),
        })
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        let token = self.token.as_deref().ok_or_else(|| {
            anyhow!(
                "no admin token: pass --token or set TESSERA_AUTHORITY_TOKEN (it is in the authority's DATA/admin.token)"
            )
        })?;
        Ok(self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.request(reqwest::Method::GET, path)?).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send(self.request(reqwest::Method::POST, path)?.json(body))
            .await
    }

    async fn post_text<T: DeserializeOwned>(&self, path: &str, body: String) -> anyhow::Result<T> {
        let request = self
            .request(reqwest::Method::POST, path)?
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        self.send(request).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<T> {
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the authority at {}", self.base))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .with_context(|| format!("reading the authority's answer ({status})"))?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(error) => anyhow!("{} ({})", error.error.message, error.error.code),
                Err(_) => anyhow!(
                    "the authority answered {status}: {}",
                    String::from_utf8_lossy(&body)
                ),
            });
        }
        serde_json::from_slice(&body)
            .with_context(|| format!("unexpected answer from the authority ({status})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(encode("LS-ABCD-EFGH"), "LS-ABCD-EFGH");
        assert_eq!(encode("a/b?c d"), "a%2Fb%3Fc%20d");
        assert_eq!(encode("é"), "%C3%A9");
    }
}
