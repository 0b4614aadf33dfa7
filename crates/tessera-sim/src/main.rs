//! `tessera-sim`: runs the network simulation for one seed or a range of seeds and prints one
//! line per seed; a failure prints its seed, step, server, counts and the command replaying
//! it, and the exit status is 1.
//!
//! ```text
//! tessera-sim --seed 7                       # one seed of the CI network
//! tessera-sim --seeds 1..100 --held ledger   # many seeds, one line each
//! tessera-sim --pair --seeds 1..200          # a redundant pair: splits, kills, merges
//! tessera-sim --domain 3 --seeds 1..20        # a domain's real consensus on turmoil
//! tessera-sim --campaign 10000 --jobs 2       # the campaign: pairs, networks, domains
//! ```
//!
//! Options: `--campaign N [--jobs J] [--first-seed S]` (see `tessera_sim::campaign`),
//! `--seed N` or `--seeds A..B`, `--servers N`, `--days N`, `--fault-days N`,
//! `--contended`, `--no-double-count`, `--held station|ledger`, `--pair`, `--domain 3|5`,
//! `--broken no-skew-margin|sign-before-commit|return-at-once` (with `--pair`:
//! `full-capacity-alone|ignore-log-tail|merge-primary-only`; with `--domain`: `backup-answers|leader-restore`).

use std::process::ExitCode;

use tessera_sim::{BrokenRule, HeldRule, SimConfig, try_simulate};

const USAGE: &str = "usage: tessera-sim [--campaign N [--jobs J] [--first-seed S]] [--seed N | --seeds A..B] [--servers N] [--days N] [--fault-days N] [--contended] [--pair] [--domain 3|5] [--no-double-count] [--held station|ledger] [--broken no-skew-margin|sign-before-commit|return-at-once]";

struct Options {
    seeds: Vec<u64>,
    contended: bool,
    pair: bool,
    domain: Option<usize>,
    no_double_count: bool,
    servers: Option<usize>,
    days: Option<i64>,
    fault_days: Option<i64>,
    held: Option<HeldRule>,
    broken: Option<BrokenRule>,
    pair_broken: Option<tessera_sim::pair::PairBroken>,
    domain_broken: bool,
    domain_leader_restore: bool,
    campaign: Option<u64>,
    jobs: usize,
    first_seed: u64,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        seeds: vec![1],
        contended: false,
        pair: false,
        domain: None,
        no_double_count: false,
        servers: None,
        days: None,
        fault_days: None,
        held: None,
        broken: None,
        pair_broken: None,
        domain_broken: false,
        domain_leader_restore: false,
        campaign: None,
        jobs: 2,
        first_seed: 1,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .cloned()
                .ok_or_else(|| format!("{arg} takes a value"))
        };
        match arg.as_str() {
            "--seed" => {
                let seed = value()?;
                options.seeds = vec![seed.parse().map_err(|_| "--seed takes a number")?];
            }
            "--seeds" => {
                let range = value()?;
                let (a, b) = range
                    .split_once("..")
                    .ok_or("--seeds takes A..B (B excluded)")?;
                let (a, b): (u64, u64) = (
                    a.parse().map_err(|_| "--seeds takes A..B")?,
                    b.parse().map_err(|_| "--seeds takes A..B")?,
                );
                if a >= b {
                    return Err("--seeds takes A..B with A < B".into());
                }
                options.seeds = (a..b).collect();
            }
            "--servers" => {
                options.servers = Some(value()?.parse().map_err(|_| "--servers takes a number")?)
            }
            "--days" => options.days = Some(value()?.parse().map_err(|_| "--days takes a number")?),
            "--fault-days" => {
                options.fault_days = Some(
                    value()?
                        .parse()
                        .map_err(|_| "--fault-days takes a number")?,
                )
            }
            "--contended" => options.contended = true,
            "--campaign" => {
                options.campaign = Some(value()?.parse().map_err(|_| "--campaign takes a number")?)
            }
            "--jobs" => {
                options.jobs = value()?
                    .parse()
                    .ok()
                    .filter(|jobs| *jobs > 0)
                    .ok_or("--jobs takes a number above 0")?
            }
            "--first-seed" => {
                options.first_seed = value()?
                    .parse()
                    .map_err(|_| "--first-seed takes a number")?
            }
            "--pair" => options.pair = true,
            "--domain" => {
                let hosts: usize = value()?.parse().map_err(|_| "--domain takes 3 or 5")?;
                if hosts != 3 && hosts != 5 {
                    return Err("--domain takes 3 or 5".into());
                }
                options.domain = Some(hosts);
            }
            "--no-double-count" => options.no_double_count = true,
            "--held" => {
                options.held =
                    Some(HeldRule::parse(&value()?).ok_or("--held takes station or ledger")?)
            }
            "--broken" => {
                let rule = value()?;
                if rule == "backup-answers" {
                    options.domain_broken = true;
                    continue;
                }
                if rule == "leader-restore" {
                    options.domain_leader_restore = true;
                    continue;
                }
                match tessera_sim::pair::PairBroken::parse(&rule) {
                    Some(pair) => options.pair_broken = Some(pair),
                    None => {
                        options.broken = Some(BrokenRule::parse(&rule).ok_or(
                            "--broken takes no-skew-margin, sign-before-commit or return-at-once (with --pair: full-capacity-alone, ignore-log-tail or merge-primary-only; with --domain: backup-answers or leader-restore)",
                        )?)
                    }
                }
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(options)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse(&args) {
        Ok(options) => options,
        Err(problem) => {
            if !problem.is_empty() {
                eprintln!("{problem}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Some(n) = options.campaign {
        let plan = tessera_sim::campaign::plan(n, options.first_seed);
        let outcome = tessera_sim::campaign::run(&plan, options.jobs, |line| {
            if line.starts_with("FAILED") {
                println!("{line}");
            }
        });
        println!("{}", outcome.summary());
        return if outcome.failures.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let mut failed = 0;
    for &seed in &options.seeds {
        if let Some(hosts) = options.domain {
            if !run_domain(&options, hosts, seed) {
                failed += 1;
            }
            continue;
        }
        if options.pair {
            let config = tessera_sim::pair::PairConfig {
                broken: options.pair_broken,
                ..tessera_sim::pair::PairConfig::ci(seed)
            };
            match tessera_sim::pair::run(config) {
                Ok(report) => println!("{}", report.summary()),
                Err(violation) => {
                    println!("FAILED: {violation}");
                    failed += 1;
                }
            }
            continue;
        }
        let mut config = if options.contended {
            SimConfig::contended(seed)
        } else {
            SimConfig::ci(seed)
        };
        if let Some(servers) = options.servers {
            config.servers = servers;
        }
        if let Some(days) = options.days {
            config.fault_days = (days - SimConfig::quiet_days(config.preset)).max(0);
            config.days = days;
        }
        if let Some(fault_days) = options.fault_days {
            config.fault_days = fault_days;
        }
        if let Some(held) = options.held {
            config.held_rule = held;
        }
        config.broken = options.broken;
        config.check_double_count = !options.no_double_count;
        match try_simulate(config) {
            Ok(report) => println!("{}", report.summary()),
            Err(violation) => {
                println!("FAILED: {violation}");
                failed += 1;
            }
        }
    }
    if options.seeds.len() > 1 {
        println!(
            "{} of {} seeds passed",
            options.seeds.len() - failed,
            options.seeds.len()
        );
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// One domain schedule (`--domain N`): the server's real consensus on turmoil. `false`: it
/// failed (the line says how to replay it).
#[cfg(feature = "domain")]
fn run_domain(options: &Options, hosts: usize, seed: u64) -> bool {
    let config = tessera_sim::domain::DomainConfig {
        hosts,
        broken_backup_answers: options.domain_broken,
        broken_leader_restore: options.domain_leader_restore,
        ..tessera_sim::domain::DomainConfig::ci(seed)
    };
    match tessera_sim::domain::run(config) {
        Ok(report) => {
            println!("{}", report.summary());
            true
        }
        Err(violation) => {
            let broken = match (options.domain_broken, options.domain_leader_restore) {
                (true, _) => " --broken backup-answers",
                (_, true) => " --broken leader-restore",
                _ => "",
            };
            println!(
                "FAILED: {violation} (replay: tessera-sim --domain {hosts} --seed {seed}{broken})"
            );
            false
        }
    }
}

/// Built without the `domain` feature (networks and pairs only, without tessera-server).
#[cfg(not(feature = "domain"))]
fn run_domain(_options: &Options, hosts: usize, seed: u64) -> bool {
    println!(
        "FAILED: --domain {hosts} --seed {seed}: this tessera-sim was built without the domain feature (cargo build -p tessera-sim)"
    );
    false
}
