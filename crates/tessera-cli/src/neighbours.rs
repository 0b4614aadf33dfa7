//! `tessera donate` and `tessera neighbours`: licenses given to and received from neighbour
//! servers.

use clap::Subcommand;
use tessera_client::Client;

use crate::Remote;

/// `tessera donate`: donate licenses of a key to a neighbour, change or end a donation.
#[derive(clap::Args)]
pub struct DonateArgs {
    /// The key to donate from; `KEY@DONOR` donates further what a neighbour gave.
    #[arg(long)]
    key: String,
    /// The neighbour's server ID.
    #[arg(long)]
    to: String,
    /// How many licenses (donating again to the same neighbour changes the donation).
    #[arg(long, required_unless_present = "end")]
    licenses: Option<u32>,
    /// The donation end date: YYYY-MM-DD (end of that day, UTC) or an RFC 3339 time.
    #[arg(long, required_unless_present = "end")]
    until: Option<String>,
    /// End the donation instead: the neighbour is told to give the licenses back at once; if
    /// it cannot be reached they come back when its grant runs out.
    #[arg(long, conflicts_with_all = ["licenses", "until"])]
    end: bool,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Subcommand)]
pub enum NeighboursCommand {
    /// Every neighbour: relation, link state, donations, received grants, usage reports.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// This server's ID and identity public key, for a neighbour's `[[neighbour]]` entry.
    Identity,
}

fn client(remote: &Remote) -> anyhow::Result<Client> {
    remote.client()
}

pub async fn run_donate(args: DonateArgs) -> anyhow::Result<()> {
    let client = client(&args.remote)?;
    let donation = if args.end {
        client.end_donation(&args.key, &args.to).await?
    } else {
        let (Some(licenses), Some(until)) = (args.licenses, args.until.as_deref()) else {
            anyhow::bail!("--licenses and --until are required (or --end)");
        };
        client.donate(&args.key, &args.to, licenses, until).await?
    };
    println!("{}", serde_json::to_string_pretty(&donation)?);
    Ok(())
}

pub async fn run(command: NeighboursCommand, remote: &Remote) -> anyhow::Result<()> {
    let client = client(remote)?;
    match command {
        NeighboursCommand::Identity => {
            let identity = client.identity().await?;
            println!("{}", serde_json::to_string_pretty(&identity)?);
        }
        NeighboursCommand::List { json } => {
            let view = client.neighbours().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
                return Ok(());
            }
            println!(
                "{:<20} {:<8} {:<10} {:<26} LAST ERROR",
                "NEIGHBOUR", "RELATION", "CONNECTION", "LAST CONTACT"
            );
            for n in &view.neighbours {
                println!(
                    "{:<20} {:<8} {:<10} {:<26} {}",
                    n.id,
                    n.relation,
                    n.connection,
                    n.last_contact.map_or("never".into(), |t| t.to_string()),
                    n.last_error.as_deref().unwrap_or("")
                );
                for d in &n.donations {
                    println!(
                        "    donated {} of {} ({} counted, {}), serial {}, lease until {}, donation until {}",
                        d.licenses,
                        d.key_id,
                        d.donated_now,
                        d.state,
                        d.serial,
                        d.lease_until,
                        d.donation_until
                    );
                }
                for r in &n.received {
                    println!(
                        "    received {} as {} ({} in use), serial {}, usable until {}",
                        r.licenses, r.key_id, r.in_use, r.serial, r.usable_until
                    );
                }
                if let Some(usage) = &n.usage {
                    let stations: Vec<String> = usage
                        .active_stations
                        .iter()
                        .map(|(c, s)| format!("{c}: {s}"))
                        .collect();
                    println!(
                        "    usage report at {}: active stations over {} s: {}",
                        tessera_api::time_text(usage.at),
                        usage.period_s,
                        stations.join(", ")
                    );
                }
            }
        }
    }
    Ok(())
}
