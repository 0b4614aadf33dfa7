//! The simulation campaign: many fault schedules across networks, pairs and domains, each
//! checking the safety property (never more leases than licenses, network-wide) at every step.
//!
//! A campaign of `n` schedules is a fixed mix, each schedule named by its class and seed so
//! that any failure replays alone with the command line it prints:
//!
//! | class | share | what one schedule is |
//! |---|---|---|
//! | pair | 65 % | `--pair --seed S`: 12 h of splits, kill -9 of either host, lost replication, merges |
//! | contended network | 30 % | `--contended --seed S`: 30 days, 25 of them with partitions, crashes, replays, lost and duplicated messages, drifting clocks |
//! | network | 2 % | `--days 20 --seed S`: the CI network (up to 100 servers, peers), 5 fault days |
//! | domain | 3 % | `--domain 3` or `--domain 5 --seed S`: the real consensus (openraft, SQLite) on turmoil, hosts killed and links cut |
//!
//! `tessera-sim --campaign N [--jobs J] [--first-seed S]` runs it on `J` threads;
//! `scripts/campaign.sh` runs the long one. CI runs a slice of it (tests/sim.rs).

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crate::{SimConfig, try_simulate};

/// One fault schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    Pair(u64),
    Contended(u64),
    Network(u64),
    Domain { hosts: usize, seed: u64 },
}

impl Schedule {
    pub fn class(self) -> &'static str {
        match self {
            Schedule::Pair(_) => "pair",
            Schedule::Contended(_) => "contended network",
            Schedule::Network(_) => "network",
            Schedule::Domain { .. } => "domain",
        }
    }

    /// The command line that replays this schedule alone.
    pub fn replay(self) -> String {
        let run = "cargo run -p tessera-sim --release --";
        match self {
            Schedule::Pair(seed) => format!("{run} --pair --seed {seed}"),
            Schedule::Contended(seed) => format!("{run} --contended --seed {seed}"),
            Schedule::Network(seed) => format!("{run} --days {NETWORK_DAYS} --seed {seed}"),
            Schedule::Domain { hosts, seed } => format!("{run} --domain {hosts} --seed {seed}"),
        }
    }

    /// Runs it: `Ok` with its summary line, `Err` with the violation.
    pub fn run(self) -> Result<String, String> {
        match self {
            Schedule::Pair(seed) => crate::pair::run(crate::pair::PairConfig::ci(seed))
                .map(|report| report.summary())
                .map_err(|violation| violation.to_string()),
            Schedule::Contended(seed) => try_simulate(SimConfig::contended(seed))
                .map(|report| report.summary())
                .map_err(|violation| violation.to_string()),
            Schedule::Network(seed) => {
                let mut config = SimConfig::ci(seed);
                config.fault_days = NETWORK_DAYS - SimConfig::quiet_days(config.preset);
                config.days = NETWORK_DAYS;
                try_simulate(config)
                    .map(|report| report.summary())
                    .map_err(|violation| violation.to_string())
            }
            #[cfg(feature = "domain")]
            Schedule::Domain { hosts, seed } => crate::domain::run(crate::domain::DomainConfig {
                hosts,
                ..crate::domain::DomainConfig::ci(seed)
            })
            .map(|report| report.summary())
            .map_err(|violation| violation.to_string()),
            #[cfg(not(feature = "domain"))]
            Schedule::Domain { hosts, seed } => Err(format!(
                "--domain {hosts} --seed {seed}: built without the domain feature"
            )),
        }
    }
}

/// Simulated days of a campaign's CI-network schedule (5 of them with faults).
const NETWORK_DAYS: i64 = 20;

/// The `n` schedules of a campaign whose seeds start at `first_seed`, in the mix of the
/// module docs (every class gets at least one schedule once `n` ≥ 4).
pub fn plan(n: u64, first_seed: u64) -> Vec<Schedule> {
    // Without the `domain` feature (networks and pairs only), no domain schedules.
    let domains = if cfg!(feature = "domain") {
        (n * 3 / 100).max(n.min(1))
    } else {
        0
    };
    let networks = (n * 2 / 100).max(u64::from(n >= 2));
    let contended = (n * 30 / 100).max(u64::from(n >= 3));
    let pairs = n.saturating_sub(domains + networks + contended);
    let seeds = |count: u64| first_seed..first_seed + count;
    let mut plan: Vec<Schedule> = Vec::with_capacity(n as usize);
    // The slow ones first, so the threads finish together.
    plan.extend(seeds(domains).map(|seed| Schedule::Domain {
        hosts: if seed % 4 == 0 { 5 } else { 3 },
        seed,
    }));
    plan.extend(seeds(networks).map(Schedule::Network));
    plan.extend(seeds(contended).map(Schedule::Contended));
    plan.extend(seeds(pairs).map(Schedule::Pair));
    plan.truncate(n as usize);
    plan
}

/// What a campaign found.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Per class: (schedules run, passed).
    pub classes: Vec<(&'static str, u64, u64)>,
    /// Each failure: its schedule's replay line and the violation.
    pub failures: Vec<(String, String)>,
    pub seconds: f64,
}

impl Outcome {
    pub fn schedules(&self) -> u64 {
        self.classes.iter().map(|(_, run, _)| run).sum()
    }

    pub fn per_minute(&self) -> f64 {
        self.schedules() as f64 * 60.0 / self.seconds.max(1e-9)
    }

    pub fn summary(&self) -> String {
        let classes: Vec<String> = self
            .classes
            .iter()
            .map(|(class, run, passed)| format!("{class} {passed}/{run}"))
            .collect();
        format!(
            "campaign: {} schedules in {:.0} s ({:.0} per minute): {}; {} failed",
            self.schedules(),
            self.seconds,
            self.per_minute(),
            classes.join(", "),
            self.failures.len()
        )
    }
}

/// Runs `plan` on `jobs` threads; `progress` gets each schedule's line as it ends.
pub fn run(plan: &[Schedule], jobs: usize, progress: impl Fn(&str) + Sync) -> Outcome {
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(Schedule, Result<String, String>)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&schedule) = plan.get(i) else { break };
                    let result = schedule.run();
                    match &result {
                        Ok(line) => progress(line),
                        Err(violation) => progress(&format!(
                            "FAILED: {violation} (replay: {})",
                            schedule.replay()
                        )),
                    }
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((schedule, result));
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut outcome = Outcome {
        seconds: started.elapsed().as_secs_f64(),
        ..Outcome::default()
    };
    for class in ["pair", "contended network", "network", "domain"] {
        let of_class: Vec<_> = results.iter().filter(|(s, _)| s.class() == class).collect();
        if of_class.is_empty() {
            continue;
        }
        let passed = of_class.iter().filter(|(_, r)| r.is_ok()).count() as u64;
        outcome.classes.push((class, of_class.len() as u64, passed));
    }
    outcome.failures = results
        .into_iter()
        .filter_map(|(schedule, result)| result.err().map(|v| (schedule.replay(), v)))
        .collect();
    outcome
}
