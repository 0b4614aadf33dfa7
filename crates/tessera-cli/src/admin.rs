//! Client commands: `tessera keys`, `tessera lease`, `tessera status`.

use std::path::PathBuf;

use clap::Subcommand;
use tessera_api::CheckoutRequest;
use tessera_client::Client;

use crate::{Remote, read_file};

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Import a license key file.
    Add { file: PathBuf },
    /// List the server's keys.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove a key; its leases end.
    Remove { key_id: String },
    /// Print a key file exactly as the vendor signed it.
    Export { key_id: String },
    /// Check for renewal keys and replace license keys (syncs first if the server has an
    /// authority configured).
    Update,
    /// Allocate a key to this server's stations (or take it away with --stations false).
    Allocate {
        key_id: String,
        /// Whether every station of this server may use the key (true or false).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        stations: bool,
        /// Allocate to the stations of this group (repeatable); replaces the key's groups.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Allocate to this neighbour server (repeatable); replaces the key's neighbours.
        #[arg(long = "neighbour")]
        neighbours: Vec<String>,
    },
    /// List station groups, or define one: `tessera keys group NAME --stations a,b`.
    Group {
        name: Option<String>,
        /// Comma-separated station names; an empty value deletes the group.
        #[arg(long, value_delimiter = ',')]
        stations: Option<Vec<String>>,
    },
}

#[derive(Subcommand)]
pub enum LeaseCommand {
    /// Take a license for a component; prints the lease as JSON.
    Checkout {
        /// The component to license, e.g. cad.
        #[arg(long)]
        component: String,
        /// The station's name: the same station asking again gets its lease back.
        #[arg(long)]
        station: String,
        /// Who uses it (shown in status and usage reports).
        #[arg(long, default_value = "")]
        user: String,
        /// The station's host name (shown in status and usage reports).
        #[arg(long, default_value = "")]
        host: String,
        /// Borrow the license for this many hours (up to the key's max_borrow_days): no
        /// heartbeat is needed until it ends; `lease checkin` returns it early.
        #[arg(long, default_value_t = 0)]
        borrow_hours: u32,
    },
    /// Keep a lease alive (with the secret `lease checkout` stored, or --secret).
    Heartbeat {
        lease_id: String,
        /// The lease secret, if not the one stored by `lease checkout` on this machine.
        #[arg(long, env = "TESSERA_LEASE_SECRET", hide_env_values = true)]
        secret: Option<String>,
    },
    /// Return a lease (with the secret `lease checkout` stored, or --secret).
    Checkin {
        lease_id: String,
        /// The lease secret, if not the one stored by `lease checkout` on this machine.
        #[arg(long, env = "TESSERA_LEASE_SECRET", hide_env_values = true)]
        secret: Option<String>,
    },
    /// Take a lease back from a station (admin).
    Release { lease_id: String },
}

#[derive(clap::Args)]
pub struct SyncArgs {
    #[command(subcommand)]
    command: Option<SyncCommand>,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Subcommand)]
pub enum SyncCommand {
    /// Write a signed sync request to carry to the vendor (air-gapped sites).
    Export {
        /// The request file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Apply the vendor's response file.
    Import { file: PathBuf },
    /// Show the last sync, the 366-day deadline, held renewal keys, and whether the authority
    /// blocked syncs (server_cloned, server_rolled_back).
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn print_summary(summary: &tessera_api::SyncSummary) {
    println!("synchronized (sequence {})", summary.sequence);
    println!(
        "  certificate valid until {}",
        tessera_api::time_text(summary.certificate_valid_until)
    );
    for (label, ids) in [
        ("imported", &summary.imported),
        ("revoked", &summary.revoked),
        ("renewal keys", &summary.renewals),
    ] {
        if !ids.is_empty() {
            println!("  {label}: {}", ids.join(", "));
        }
    }
}

pub async fn run_sync(args: SyncArgs) -> anyhow::Result<()> {
    let remote = &args.remote;
    match args.command {
        None => print_summary(&client(remote)?.sync_now().await?),
        Some(SyncCommand::Export { out }) => {
            let request = client(remote)?.export_sync_request().await?;
            std::fs::write(&out, request)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
            println!(
                "sync request written to {}: send it to the vendor",
                out.display()
            );
        }
        Some(SyncCommand::Import { file }) => print_summary(
            &client(remote)?
                .import_sync_response(read_file(&file)?)
                .await?,
        ),
        Some(SyncCommand::Status { json }) => {
            let status = client(remote)?.sync_status().await?;
            if json {
                return print_json(&status);
            }
            println!(
                "server ID:      {}",
                status.server_id.as_deref().unwrap_or("(none)")
            );
            println!("synchronized:   {}", status.synchronized);
            println!(
                "last sync:      {}",
                status
                    .last_sync_at
                    .map(tessera_api::time_text)
                    .unwrap_or_else(|| "never".into())
            );
            match (status.deadline, status.days_left) {
                (Some(deadline), Some(days)) => {
                    println!(
                        "deadline:       {} ({days} days left)",
                        tessera_api::time_text(deadline)
                    )
                }
                _ => println!("deadline:       none (never synchronized)"),
            }
            println!("schedule:       {}", status.schedule);
            if let Some(blocked) = &status.blocked {
                println!(
                    "blocked:        {} since {}: automatic syncs stopped until the vendor resets this server's sync chain",
                    blocked.code,
                    tessera_api::time_text(blocked.at)
                );
                println!("                {}", blocked.message);
            }
        }
    }
    Ok(())
}

fn client(remote: &Remote) -> anyhow::Result<Client> {
    remote.client()
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub async fn run_keys(command: KeysCommand, remote: &Remote) -> anyhow::Result<()> {
    let client = client(remote)?;
    match command {
        KeysCommand::Add { file } => {
            let imported = client.import_key(read_file(&file)?).await?;
            println!("imported {}", imported.key_id);
        }
        KeysCommand::List { json } => {
            let keys = client.list_keys().await?;
            if json {
                return print_json(&keys);
            }
            println!(
                "{:<16} {:<14} {:<24} {:>8} {:>7} {:>6}  {:<10} VALID UNTIL",
                "KEY", "CUSTOMER", "COMPONENTS", "LICENSES", "IN USE", "FREE", "STATE"
            );
            for key in keys {
                println!(
                    "{:<16} {:<14} {:<24} {:>8} {:>7} {:>6}  {:<10} {}",
                    key.key_id,
                    key.customer,
                    key.components.join(","),
                    key.licenses,
                    key.in_use,
                    key.free,
                    key.state,
                    tessera_api::time_text(key.valid_until)
                );
            }
        }
        KeysCommand::Remove { key_id } => {
            let removed = client.remove_key(&key_id).await?;
            println!(
                "removed {} ({} leases ended)",
                removed.key_id, removed.leases_ended
            );
        }
        KeysCommand::Export { key_id } => print!("{}", client.export_key(&key_id).await?),
        KeysCommand::Update => {
            let report = client.update_keys().await?;
            if let Some(error) = &report.sync_error {
                eprintln!("warning: sync failed, applying renewal keys already held: {error}");
            }
            if report.renewals.is_empty() {
                println!("no renewal keys available");
            }
            for renewal in &report.renewals {
                match &renewal.reason {
                    None => println!(
                        "{} updated: replaced by {}",
                        renewal.key_id, renewal.renewal_key_id
                    ),
                    Some(reason) => println!(
                        "{} cannot be automatically updated: {reason} (renewal key {} added, not allocated)",
                        renewal.key_id, renewal.renewal_key_id
                    ),
                }
            }
            if report.leases_moved + report.leases_ended > 0 {
                println!(
                    "{} leases moved to renewal keys, {} ended",
                    report.leases_moved, report.leases_ended
                );
            }
        }
        KeysCommand::Allocate {
            key_id,
            stations,
            groups,
            neighbours,
        } => {
            let groups = (!groups.is_empty()).then_some(groups);
            let neighbours = (!neighbours.is_empty()).then_some(neighbours);
            client
                .allocate_key(&key_id, stations, groups.clone(), neighbours.clone())
                .await?;
            if let Some(neighbours) = neighbours {
                println!(
                    "{key_id}: allocated to neighbours {}",
                    neighbours.join(", ")
                );
            }
            println!("{key_id}: allocated to all stations = {stations}");
            if let Some(groups) = groups {
                println!("{key_id}: allocated to groups {}", groups.join(", "));
            }
        }
        KeysCommand::Group { name, stations } => match (name, stations) {
            (Some(name), Some(stations)) => {
                let stations: Vec<String> =
                    stations.into_iter().filter(|s| !s.is_empty()).collect();
                let count = stations.len();
                client.set_station_group(&name, stations).await?;
                println!("group {name}: {count} stations");
            }
            _ => {
                for group in client.station_groups().await? {
                    println!("{:<20} {}", group.name, group.stations.join(", "));
                }
            }
        },
    }
    Ok(())
}

pub async fn run_lease(command: LeaseCommand, remote: &Remote) -> anyhow::Result<()> {
    let client = client(remote)?;
    match command {
        LeaseCommand::Checkout {
            component,
            station,
            user,
            host,
            borrow_hours,
        } => {
            let request = CheckoutRequest {
                component,
                station,
                user,
                host,
                nonce: String::new(),
                holder_key: String::new(),
                borrow_hours,
            };
            let (lease, _) = client.checkout(&request).await?;
            if let Some(secret) = &lease.lease_secret {
                lease_secrets::store(&lease.lease_id, secret)?;
            }
            print_json(&lease)
        }
        LeaseCommand::Heartbeat { lease_id, secret } => {
            let secret = secret.or_else(|| lease_secrets::load(&lease_id));
            if let Some(secret) = secret {
                client.set_lease_secret(&lease_id, &secret);
            }
            print_json(&client.heartbeat(&lease_id).await?)
        }
        LeaseCommand::Checkin { lease_id, secret } => {
            let secret = secret.or_else(|| lease_secrets::load(&lease_id));
            if let Some(secret) = secret {
                client.set_lease_secret(&lease_id, &secret);
            }
            client.checkin(&lease_id).await?;
            lease_secrets::forget(&lease_id);
            println!("returned {lease_id}");
            Ok(())
        }
        LeaseCommand::Release { lease_id } => print_json(&client.force_release(&lease_id).await?),
    }
}

pub async fn run_events(json: bool, remote: &Remote) -> anyhow::Result<()> {
    let events = client(remote)?.events().await?;
    if json {
        return print_json(&events);
    }
    for event in events {
        println!(
            "{} {:<8} {:<20} {}",
            tessera_api::time_text_of(event["at"].as_str().unwrap_or("")),
            event["severity"].as_str().unwrap_or(""),
            event["kind"].as_str().unwrap_or(""),
            event["message"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// `tessera status` filters.
#[derive(clap::Args, Debug, Default)]
pub struct StatusFilter {
    /// Counts only: the component and key tables, no holders.
    #[arg(long)]
    pub summary: bool,
    /// Only this component (exact, or a prefix ending in `*`).
    #[arg(long)]
    pub component: Option<String>,
    /// Only the holders of this user (exact, or a prefix ending in `*`).
    #[arg(long)]
    pub user: Option<String>,
}

/// Most leases `tessera status` reads page by page for its holder lists.
const STATUS_LEASES_READ_MAX: u64 = 1_000_000;

pub async fn run_status(json: bool, filter: &StatusFilter, remote: &Remote) -> anyhow::Result<()> {
    use tessera_core::LeaseFilter;
    let client = client(remote)?;
    let mut status = if filter.summary {
        client.status_summary().await?
    } else {
        client.status().await?
    };
    let component_matches = |component: &str| {
        filter
            .component
            .as_deref()
            .is_none_or(|pattern| LeaseFilter::matches_text(pattern, component))
    };
    let user_matches = |user: &str| {
        filter
            .user
            .as_deref()
            .is_none_or(|pattern| LeaseFilter::matches_text(pattern, user))
    };
    status
        .components
        .retain(|c| component_matches(&c.component));
    // The status lists at most 100 leases: with the admin token, the holders come from every
    // matching lease, read a page at a time.
    let truncated = status.leases_total > status.leases.len() as u64;
    if !filter.summary && remote.token.is_some() && truncated {
        let mut query: Vec<(&str, &str)> = vec![("limit", "1000")];
        if let Some(component) = &filter.component {
            query.push(("component", component));
        }
        if let Some(user) = &filter.user {
            query.push(("user", user));
        }
        let mut leases = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut page_query = query.clone();
            if let Some(after) = &after {
                page_query.push(("after", after));
            }
            let page = client.leases(&page_query).await?;
            leases.extend(page.leases);
            match page.next {
                Some(next) if (leases.len() as u64) < STATUS_LEASES_READ_MAX => after = Some(next),
                _ => break,
            }
        }
        // A lease holds every component of its key.
        let covers: std::collections::HashMap<&str, &[String]> = status
            .keys
            .iter()
            .map(|key| (key.key_id.as_str(), key.components.as_slice()))
            .collect();
        for component in &mut status.components {
            component.holders = leases
                .iter()
                .filter(|lease| {
                    covers
                        .get(lease.key_id.as_str())
                        .is_some_and(|covered| covered.contains(&component.component))
                        || lease.components.contains(&component.component)
                })
                .map(|lease| tessera_api::Holder {
                    lease_id: lease.lease_id.clone(),
                    station: lease.station.clone(),
                    user: lease.user.clone(),
                    host: lease.host.clone(),
                    key_id: lease.key_id.clone(),
                    components: lease.components.clone(),
                    since: lease.issued_at,
                    expires_at: lease.expires_at,
                })
                .collect();
        }
        status.leases = leases;
    }
    // A lease holds every component of its key: it matches when its key covers one.
    let covering: std::collections::HashSet<String> = status
        .keys
        .iter()
        .filter(|key| key.components.iter().any(|c| component_matches(c)))
        .map(|key| key.key_id.clone())
        .collect();
    status.leases.retain(|lease| {
        (covering.contains(&lease.key_id) || lease.components.iter().any(|c| component_matches(c)))
            && user_matches(&lease.user)
    });
    for component in &mut status.components {
        component
            .holders
            .retain(|holder| user_matches(&holder.user));
        if filter.summary {
            component.holders.clear();
        }
    }
    if filter.summary {
        status.leases.clear();
    }
    if json {
        return print_json(&status);
    }
    println!(
        "License server {} ({}) at {}: {} leases",
        status.server_id.as_deref().unwrap_or("(no server ID)"),
        status.role,
        tessera_api::time_text(status.now),
        status.leases_total
    );
    if status.serving_alone {
        println!(
            "This host of a redundant pair serves alone: it may use only its share of each key (SHARE) until the pair is whole again."
        );
    }
    println!();
    let share = |share: Option<u32>| match (status.serving_alone, share) {
        (true, Some(share)) => format!(" {share:>6}"),
        _ => String::new(),
    };
    println!(
        "{:<20} {:>8} {:>7} {:>6}{}",
        "COMPONENT",
        "LICENSES",
        "IN USE",
        "FREE",
        if status.serving_alone { "  SHARE" } else { "" }
    );
    for component in &status.components {
        println!(
            "{:<20} {:>8} {:>7} {:>6}{}",
            component.component,
            component.licenses,
            component.in_use,
            component.free,
            share(component.alone_share)
        );
        for holder in &component.holders {
            // lmstat's "user host display": station, then who and where when the station said.
            let who = match (holder.user.as_str(), holder.host.as_str()) {
                ("", "") => String::new(),
                (user, "") => format!(" {user}"),
                (user, host) => format!(" {user}@{host}"),
            };
            let lease = if holder.lease_id.is_empty() {
                String::new()
            } else {
                format!(", lease {}", holder.lease_id)
            };
            println!(
                "    {}{} since {} expires {} (key {}{lease})",
                holder.station,
                who,
                tessera_api::time_text(holder.since),
                tessera_api::time_text(holder.expires_at),
                holder.key_id
            );
        }
    }
    if !filter.summary && truncated && remote.token.is_none() {
        println!(
            "(the holders of the first {} of {} leases: give --token to list them all)",
            tessera_api::STATUS_LEASES_MAX,
            status.leases_total
        );
    }
    println!();
    println!(
        "{:<24} {:>8} {:>7} {:>8} {:>8} {:>6}  STATE",
        "KEY", "LICENSES", "IN USE", "DONATED", "RECEIVED", "FREE"
    );
    for key in &status.keys {
        println!(
            "{:<24} {:>8} {:>7} {:>8} {:>8} {:>6}  {}{}",
            key.key_id,
            key.licenses,
            key.in_use,
            key.donated_out,
            key.received,
            key.free,
            key.state,
            key.received_from
                .as_deref()
                .map(|from| format!(" (from {from})"))
                .unwrap_or_default()
        );
    }
    if !status.usage_reports.is_empty() {
        println!();
        println!(
            "{:<20} {:<20} {:>15} {:>7}  REPORTED",
            "NEIGHBOUR", "COMPONENT", "ACTIVE STATIONS", "IN USE"
        );
        for (neighbour, report) in &status.usage_reports {
            for (component, active) in &report.active_stations {
                println!(
                    "{:<20} {:<20} {:>15} {:>7}  {} (over {} s)",
                    neighbour,
                    component,
                    active,
                    report.in_use.get(component).copied().unwrap_or(0),
                    tessera_api::time_text(report.at),
                    report.period_s
                );
            }
        }
    }
    Ok(())
}

/// Where `tessera lease checkout` keeps each lease's secret for `lease heartbeat` and `lease
/// checkin`: one file per lease, named by its id, readable by its owner only, in
/// `$TESSERA_LEASE_DIR`, else `$XDG_STATE_HOME/tessera/leases`, else
/// `~/.local/state/tessera/leases`.
pub mod lease_secrets {
    use std::path::PathBuf;

    pub fn dir() -> Option<PathBuf> {
        tessera_client::borrow::state_dir("TESSERA_LEASE_DIR", "leases")
    }

    /// A lease id names a file only if it is plain (no path of any kind).
    fn file(lease_id: &str) -> Option<PathBuf> {
        let plain = !lease_id.is_empty()
            && lease_id.len() <= 128
            && lease_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        plain.then(|| dir().map(|dir| dir.join(lease_id))).flatten()
    }

    pub fn store(lease_id: &str, secret: &str) -> anyhow::Result<()> {
        let Some(path) = file(lease_id) else {
            anyhow::bail!(
                "cannot store the secret of lease {lease_id:?}: set TESSERA_LEASE_DIR (or HOME)"
            );
        };
        tessera_client::borrow::write_private(&path, &format!("{secret}\n"))
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
    }

    pub fn load(lease_id: &str) -> Option<String> {
        let text = std::fs::read_to_string(file(lease_id)?).ok()?;
        Some(text.trim().to_string()).filter(|s| !s.is_empty())
    }

    pub fn forget(lease_id: &str) {
        if let Some(path) = file(lease_id) {
            let _ = std::fs::remove_file(path);
        }
    }
}
