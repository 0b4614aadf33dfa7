//! `tessera pair enable|disable|sync|status`: a redundant pair (docs/pair.md).

use clap::Subcommand;

use crate::Remote;

#[derive(Subcommand)]
pub enum PairCommand {
    /// Pair this server (the primary, started with a domain secret) with a backup started with
    /// `--join` on a fresh data directory and the same domain secret (admin).
    Enable {
        /// HOST:PORT of the backup.
        #[arg(long)]
        backup: String,
        /// The backup's share of each key's licenses while the hosts are apart (default 50).
        #[arg(long)]
        backup_percent: Option<u8>,
    },
    /// Undo the pair (admin): only once no license key is active.
    Disable,
    /// Bring a pair that is not in sync back in sync (admin).
    Sync,
    /// Pair status (Paired and Available, Backup not available, Primary not available, Pair
    /// not synced, Recovering) and each host's status.
    Status {
        /// Print the JSON of GET /v1/pair.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(command: PairCommand, remote: &Remote) -> anyhow::Result<()> {
    let client = remote.client()?;
    let (status, json) = match command {
        PairCommand::Enable {
            backup,
            backup_percent,
        } => (client.pair_enable(&backup, backup_percent).await?, false),
        PairCommand::Disable => (client.pair_disable().await?, false),
        PairCommand::Sync => (client.pair_sync().await?, false),
        PairCommand::Status { json } => (client.pair_status().await?, json),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

/// The status as a few lines of text.
pub fn render(status: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    let mut out = format!(
        "pair status: {}   (view of host {}, serving: {}, backup share: {}%)\n",
        text(&status["pair_status"]),
        status["view_of"],
        text(&status["mode"]),
        status["backup_percent"]
            .as_u64()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into()),
    );
    out.push_str(&format!(
        "{:>4}  {:<22} {:<8} {:<22} {:<11} {:<7}\n",
        "host", "address", "role", "status", "mode", "leader"
    ));
    for host in status["hosts"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:>4}  {:<22} {:<8} {:<22} {:<11} {:<7}\n",
            host["host"].to_string(),
            text(&host["address"]),
            text(&host["role"]),
            text(&host["status"]),
            text(&host["mode"]),
            if host["raft_leader"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            }
        ));
    }
    if let Some(n) = status["journal_commands"].as_u64().filter(|n| *n > 0) {
        out.push_str(&format!("alone journal: {n} commands not merged yet\n"));
    }
    if let Some(error) = status["last_error"].as_str() {
        out.push_str(&format!("last error: {error}\n"));
    }
    out
}
