//! `tessera report usage`, `tessera audit verify`, `tessera admin hash-password`.

use std::io::BufRead;
use std::path::PathBuf;

use clap::Subcommand;

use crate::Remote;

#[derive(Subcommand)]
pub enum ReportCommand {
    /// Usage history (checkouts, checkins, expiries, denials, key changes) as CSV or JSON.
    Usage {
        /// First day (YYYY-MM-DD, UTC) or an RFC 3339 time; default: the beginning.
        #[arg(long)]
        from: Option<String>,
        /// Last day included (YYYY-MM-DD, UTC) or an RFC 3339 time; default: now.
        #[arg(long)]
        to: Option<String>,
        /// csv or json.
        #[arg(long, default_value = "csv", value_parser = ["csv", "json"])]
        format: String,
    },
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check the audit hash chain; names the first broken record. With --data, reads the
    /// data directory's usage.sqlite3 directly (offline); otherwise asks the server.
    Verify {
        /// A server's data directory: check its usage.sqlite3 without asking the server.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Read a password from standard input and print its argon2 hash, for
    /// `[[admin_user]] password_hash = "..."`.
    HashPassword,
}

fn base_url(remote: &Remote) -> String {
    remote
        .server
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .trim_end_matches('/')
        .to_string()
}

async fn admin_get(remote: &Remote, path_and_query: &str) -> anyhow::Result<String> {
    let token = remote
        .token
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("this needs the admin token: --token or TESSERA_TOKEN"))?;
    let url = format!("{}{path_and_query}", base_url(remote));
    let response = tessera_tls::client_builder(remote.ca.as_deref())?
        .build()?
        .get(&url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|error| anyhow::anyhow!("cannot reach {url}: {error}"))?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        let detail: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        anyhow::bail!(
            "{}: {}",
            detail["error"]["code"].as_str().unwrap_or(status.as_str()),
            detail["error"]["message"].as_str().unwrap_or(&text)
        );
    }
    Ok(text)
}

fn encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b':') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

pub async fn run_report(command: ReportCommand, remote: &Remote) -> anyhow::Result<()> {
    match command {
        ReportCommand::Usage { from, to, format } => {
            let mut query = format!("/v1/reports/usage?format={format}");
            if let Some(from) = from {
                query.push_str(&format!("&from={}", encode(&from)));
            }
            if let Some(to) = to {
                query.push_str(&format!("&to={}", encode(&to)));
            }
            print!("{}", admin_get(remote, &query).await?);
            if format == "json" {
                println!();
            }
            Ok(())
        }
    }
}

pub async fn run_audit(command: AuditCommand, remote: &Remote) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify { data, json } => {
            let verification = match data {
                Some(dir) => tessera_server::history::verify_data_dir(&dir)?,
                None => serde_json::from_str(&admin_get(remote, "/v1/audit/verify").await?)?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&verification)?);
            } else if verification.ok {
                println!(
                    "audit chain intact: {} records, head {}{}",
                    verification.records,
                    verification.head_hash.as_deref().unwrap_or("(empty)"),
                    match verification.countersigned {
                        Some(seq) => format!(
                            "; record {seq} has the hash the vendor countersigned at the last sync"
                        ),
                        None => String::new(),
                    }
                );
            }
            if !verification.ok {
                anyhow::bail!(
                    "audit chain broken at record {}: {}",
                    verification.broken_seq.unwrap_or_default(),
                    verification.reason.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }
    }
}

pub fn run_admin(command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::HashPassword => {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            let password = line.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                anyhow::bail!("no password on standard input");
            }
            let hash = tessera_server::console::hash_password(password)
                .map_err(|error| anyhow::anyhow!("cannot hash: {error}"))?;
            println!("{hash}");
            Ok(())
        }
    }
}
