//! `tessera-sim`: run the network simulation for one seed or a range of seeds.
//!
//! ```text
//! tessera-sim --seed 7 [--servers 100] [--days 60] [--ignore-skew-margin]
//! tessera-sim --seeds 1..200
//! ```

use std::process::ExitCode;

use tessera_sim::{SimConfig, simulate};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let seeds: Vec<u64> = match (value("--seed"), value("--seeds")) {
        (Some(seed), _) => match seed.parse() {
            Ok(seed) => vec![seed],
            Err(_) => return usage("--seed takes a number"),
        },
        (None, Some(range)) => {
            let Some((a, b)) = range.split_once("..") else {
                return usage("--seeds takes A..B");
            };
            match (a.parse::<u64>(), b.parse::<u64>()) {
                (Ok(a), Ok(b)) if a < b => (a..b).collect(),
                _ => return usage("--seeds takes A..B with A < B"),
            }
        }
        (None, None) => vec![1],
    };
    let mut failed = false;
    for seed in seeds {
        let mut config = if args.iter().any(|a| a == "--contended") {
            SimConfig::contended(seed)
        } else {
            SimConfig::ci(seed)
        };
        if let Some(servers) = value("--servers").and_then(|v| v.parse().ok()) {
            config.servers = servers;
        }
        if let Some(days) = value("--days").and_then(|v| v.parse().ok()) {
            config.days = days;
        }
        config.ignore_skew_margin = args.iter().any(|a| a == "--ignore-skew-margin");
        match simulate(config) {
            Ok(report) => {
                if let Some(d) = &report.disagreement {
                    println!("seed {seed}: not converged: {d}");
                    println!("seed {seed}: refusals: {:?}", report.refusals);
                }
                println!(
                    "seed {seed}: ok — {} steps, {} applies, {} donations, {} grants accepted / {} refused, {} checkouts / {} denied, {} partitions, {} crashes, {} messages lost, {} replays, peak {} licenses held; converged after {} sync periods",
                    report.steps,
                    report.applies,
                    report.donations,
                    report.grants_accepted,
                    report.grants_refused,
                    report.checkouts,
                    report.denials,
                    report.partitions,
                    report.crashes,
                    report.messages_lost,
                    report.replays,
                    report.peak_held,
                    report
                        .convergence_sync_periods
                        .map_or("(not converged)".into(), |n| n.to_string())
                )
            }
            Err(violation) => {
                println!("FAILED: {violation}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!(
        "{problem}\nusage: tessera-sim [--seed N | --seeds A..B] [--servers N] [--days N] [--ignore-skew-margin]"
    );
    ExitCode::from(2)
}
