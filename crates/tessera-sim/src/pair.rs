//! Deterministic simulation of a redundant pair: two hosts keeping one replicated log, losing
//! each other (partitions, kill -9), each serving alone within its share, and merging when
//! they are back. Checked at every step: the stations that believe they hold a license never
//! exceed the key, and after every merge every lease a station was told it holds is still
//! there.
//!
//! The model of the log, as a two-voter Raft group runs it: only the primary (host 1)
//! appends; an entry is committed once the backup has it too, and only then applied and
//! acknowledged. Replication can fail in any step (the backup or the link is down, or the
//! message is lost), so the primary's log can end in entries never committed nor acknowledged,
//! and the backup may have entries it does not know are committed. A host that has not heard
//! from the other for `alone_after_ms` applies its whole log (see `Ledger::set_alone`) and
//! serves alone, journaling what it does (durable: a crash replays it). When both are up and
//! linked again the primary commits its log, and one `MergeAlone` with both hosts' states
//! enters it; a host serves again only once it knows the merge is committed (Recovering until
//! then). Replication of the merge can be lost, and the hosts can lose each other again before
//! it commits: a host still waiting then serves alone again, rebuilt from its whole log and
//! its journal.

use tessera_core::{
    Command, Ledger, LedgerConfig, LicenseKey, LicenseKeyPayload, Outcome, SecretKey, Share,
    Stamped,
};

use crate::rng::Rng;
use crate::{HOUR_MS, MINUTE_MS, Violation};

const START_MS: i64 = 1_800_000_000_000;

/// A pair rule deliberately broken, to show the checks catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairBroken {
    /// A host alone issues from all of a key's licenses, not only its share.
    FullCapacityAlone,
    /// A host going alone applies only the entries it knows are committed, not its whole log.
    IgnoreLogTail,
    /// The merge takes only the primary's state.
    MergePrimaryOnly,
}

impl PairBroken {
    pub fn flag(self) -> &'static str {
        match self {
            PairBroken::FullCapacityAlone => "full-capacity-alone",
            PairBroken::IgnoreLogTail => "ignore-log-tail",
            PairBroken::MergePrimaryOnly => "merge-primary-only",
        }
    }

    pub fn parse(text: &str) -> Option<PairBroken> {
        [
            PairBroken::FullCapacityAlone,
            PairBroken::IgnoreLogTail,
            PairBroken::MergePrimaryOnly,
        ]
        .into_iter()
        .find(|rule| rule.flag() == text)
    }
}

/// One pair run.
#[derive(Clone, Debug)]
pub struct PairConfig {
    pub seed: u64,
    pub broken: Option<PairBroken>,
    pub hours: i64,
    pub licenses: u32,
    pub backup_percent: u8,
    pub stations: usize,
    pub step_ms: i64,
    pub lease_ttl_ms: i64,
    pub heartbeat_ms: i64,
    /// A host that has not heard from the other this long serves alone.
    pub alone_after_ms: i64,
    /// Per step: chance that replication fails (message lost).
    pub replication_loss_ppm: u32,
    /// Mean time between faults (a partition between the hosts, or a host killed).
    pub fault_interval_ms: i64,
    pub fault_ms: (i64, i64),
    pub session_mean_ms: i64,
    pub idle_mean_ms: i64,
}

impl PairConfig {
    pub fn ci(seed: u64) -> PairConfig {
        PairConfig {
            seed,
            broken: None,
            hours: 12,
            licenses: 10,
            backup_percent: 50,
            stations: 16,
            step_ms: 1000,
            lease_ttl_ms: 2 * MINUTE_MS,
            heartbeat_ms: 40_000,
            alone_after_ms: 2000,
            replication_loss_ppm: 100_000,
            fault_interval_ms: 20 * MINUTE_MS,
            fault_ms: (10_000, 30 * MINUTE_MS),
            session_mean_ms: 15 * MINUTE_MS,
            idle_mean_ms: 5 * MINUTE_MS,
        }
    }

    pub fn reproduce(&self) -> String {
        let mut line = format!(
            "cargo run -p tessera-sim --release -- --pair --seed {}",
            self.seed
        );
        if let Some(rule) = self.broken {
            line.push_str(&format!(" --broken {}", rule.flag()));
        }
        line
    }
}

/// What a pair run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PairReport {
    pub seed: u64,
    pub checkouts: u64,
    pub denied: u64,
    pub unacknowledged: u64,
    pub splits: u64,
    pub kills: u64,
    pub merges: u64,
    pub served_alone: u64,
    pub takeovers: u64,
    pub peak_held: u32,
}

impl PairReport {
    pub fn summary(&self) -> String {
        format!(
            "pair seed {}: ok — {} checkouts ({} served alone, {} takeovers), {} denied, {} unacknowledged; {} splits, {} kills, {} merges; peak held {}",
            self.seed,
            self.checkouts,
            self.served_alone,
            self.takeovers,
            self.denied,
            self.unacknowledged,
            self.splits,
            self.kills,
            self.merges,
            self.peak_held
        )
    }
}

struct Host {
    share: Share,
    /// Durable: the log and how much of it this host knows is committed.
    log: Vec<Stamped>,
    committed: usize,
    /// Durable: what it did alone since it went alone.
    journal: Vec<Stamped>,
    went_alone: bool,
    /// In memory: the committed ledger, and the ledger it serves from alone.
    ledger: Ledger,
    alone: Option<Ledger>,
    up: bool,
    last_heard_ms: i64,
}

#[derive(Clone)]
enum Station {
    Idle {
        next_ms: i64,
    },
    Holding {
        lease_id: String,
        expires_at_ms: i64,
        next_ms: i64,
        end_ms: i64,
    },
}

struct Pair {
    config: PairConfig,
    ledger_config: LedgerConfig,
    hosts: [Host; 2],
    stations: Vec<Station>,
    linked: bool,
    now: i64,
    rng: Rng,
    fault_rng: Rng,
    next_fault_ms: i64,
    heal_ms: i64,
    next_lease: u64,
    /// The primary's log index of the merge on its way (Recovering until a host knows it is
    /// committed).
    pending_merge: Option<usize>,
    /// Recent events, for a failure's report.
    trace: std::collections::VecDeque<String>,
    report: PairReport,
}

fn vendor() -> SecretKey {
    SecretKey::from_seed([0x7A; 32])
}

/// Runs one pair simulation.
pub fn run(config: PairConfig) -> Result<PairReport, Violation> {
    let ledger_config = LedgerConfig {
        trusted_vendors: vec![vendor().public_key()],
        server_id: Some("pair".into()),
        ..LedgerConfig::default()
    };
    let key = LicenseKey::sign(
        LicenseKeyPayload {
            key_id: "K".into(),
            customer: "sim".into(),
            components: vec!["cad".into()],
            licenses: config.licenses,
            valid_from: jiff::Timestamp::from_millisecond(START_MS - HOUR_MS).expect("a time"),
            valid_until: jiff::Timestamp::from_millisecond(START_MS + 1000 * HOUR_MS)
                .expect("a time"),
            server_id: None,
            renews: None,
            certified_server_required: false,
            max_borrow_days: 0,
            grace_minutes: 0,
            issued_at: jiff::Timestamp::from_millisecond(START_MS - HOUR_MS).expect("a time"),
        },
        &vendor(),
    )
    .expect("the key signs");
    let setup = vec![
        Stamped {
            at_ms: START_MS,
            command: Command::ImportKey { key },
        },
        Stamped {
            at_ms: START_MS,
            command: Command::SetPairSplit {
                backup_percent: Some(config.backup_percent),
            },
        },
    ];
    let host = |share| {
        let mut ledger = Ledger::new(ledger_config.clone());
        for entry in &setup {
            ledger.apply(entry);
        }
        Host {
            share,
            log: setup.clone(),
            committed: setup.len(),
            journal: Vec::new(),
            went_alone: false,
            ledger,
            alone: None,
            up: true,
            last_heard_ms: START_MS,
        }
    };
    let mut root = Rng::new(config.seed);
    let mut rng = root.fork(1);
    let fault_rng = root.fork(2);
    let stations = (0..config.stations)
        .map(|_| Station::Idle {
            next_ms: START_MS + rng.range(0, 10 * MINUTE_MS),
        })
        .collect();
    let mut pair = Pair {
        hosts: [host(Share::Primary), host(Share::Backup)],
        ledger_config,
        stations,
        linked: true,
        now: START_MS,
        rng,
        fault_rng,
        next_fault_ms: START_MS,
        heal_ms: i64::MIN,
        next_lease: 0,
        pending_merge: None,
        trace: std::collections::VecDeque::new(),
        report: PairReport {
            seed: config.seed,
            ..PairReport::default()
        },
        config,
    };
    pair.next_fault_ms = START_MS + pair.fault_rng.exponential(pair.config.fault_interval_ms);
    let end = START_MS + pair.config.hours * HOUR_MS;
    while pair.now < end {
        pair.step()?;
        pair.now += pair.config.step_ms;
    }
    Ok(pair.report)
}

impl Pair {
    fn fail(&self, message: String) -> Violation {
        Violation {
            seed: self.config.seed,
            step: ((self.now - START_MS) / self.config.step_ms) as u64,
            message,
            trace: self.trace.iter().cloned().collect(),
            reproduce: self.config.reproduce(),
        }
    }

    fn note(&mut self, event: String) {
        let step = (self.now - START_MS) / self.config.step_ms;
        self.trace.push_back(format!("step {step}: {event}"));
        if self.trace.len() > 80 {
            self.trace.pop_front();
        }
    }

    fn in_contact(&self) -> bool {
        self.linked && self.hosts[0].up && self.hosts[1].up
    }

    fn step(&mut self) -> Result<(), Violation> {
        self.faults();
        if self.in_contact() {
            for host in &mut self.hosts {
                host.last_heard_ms = self.now;
            }
            // Background replication catches up the backup and the commit index.
            if !self.rng.chance_ppm(self.config.replication_loss_ppm) {
                self.replicate();
            }
            if self.pending_merge.is_none()
                && self.hosts.iter().any(|h| h.went_alone)
                && self.hosts[0].committed == self.hosts[0].log.len()
            {
                self.start_merge();
            }
        } else if self.pending_merge.take().is_some() {
            self.note("cut off again before the merge committed".into());
            // Cut off again before the merge committed: a host still waiting for it serves
            // alone again, from its whole log (the merge entry and what followed may be in
            // it) and its journal, as after a restart.
            for host in self.hosts.iter_mut().filter(|h| h.went_alone && h.up) {
                host.alone = Some(alone_ledger(host, self.config.broken));
            }
        }
        self.finish_merge()?;
        for h in 0..2 {
            let host = &self.hosts[h];
            if host.up
                && !host.went_alone
                && self.now - host.last_heard_ms >= self.config.alone_after_ms
            {
                self.go_alone(h);
            }
        }
        for s in 0..self.stations.len() {
            self.station(s)?;
        }
        self.check()
    }

    fn faults(&mut self) {
        if self.now >= self.heal_ms && self.heal_ms != i64::MIN {
            self.linked = true;
            for h in 0..2 {
                if !self.hosts[h].up {
                    self.restart(h);
                }
            }
            self.heal_ms = i64::MIN;
        }
        if self.heal_ms == i64::MIN && self.now >= self.next_fault_ms {
            let (lo, hi) = self.config.fault_ms;
            self.heal_ms = self.now + self.fault_rng.range(lo, hi);
            match self.fault_rng.below(3) {
                0 => {
                    self.linked = false;
                    self.report.splits += 1;
                    self.note(format!(
                        "the hosts are cut off until step {}",
                        (self.heal_ms - START_MS) / self.config.step_ms
                    ));
                }
                n => {
                    let h = (n - 1) as usize;
                    self.kill(h);
                }
            }
            self.next_fault_ms =
                self.heal_ms + self.fault_rng.exponential(self.config.fault_interval_ms);
        }
    }

    /// kill -9: only the durable parts stay.
    fn kill(&mut self, h: usize) {
        self.report.kills += 1;
        self.note(format!("host {} killed", h + 1));
        let host = &mut self.hosts[h];
        host.up = false;
        host.alone = None;
        host.ledger = Ledger::new(self.ledger_config.clone());
    }

    fn restart(&mut self, h: usize) {
        self.note(format!("host {} restarts", h + 1));
        let host = &mut self.hosts[h];
        host.up = true;
        let mut ledger = Ledger::new(self.ledger_config.clone());
        for entry in &host.log[..host.committed] {
            ledger.apply(entry);
        }
        host.ledger = ledger;
        host.last_heard_ms = self.now;
        if host.went_alone {
            host.alone = Some(alone_ledger(host, self.config.broken));
        }
    }

    /// One round of replication: the backup gets the primary's new entries and learns the
    /// commit index the primary had (so it learns of a commit one round late, as a Raft
    /// follower does); the primary, its entries now on both, commits them all. Returns the
    /// primary's outcomes by log index.
    fn replicate(&mut self) -> Vec<(usize, Outcome)> {
        // Only the primary appends: the backup's log is a prefix of the primary's.
        let have = self.hosts[1].log.len();
        let missing = self.hosts[0].log[have..].to_vec();
        self.hosts[1].log.extend(missing);
        let known = self.hosts[0].committed;
        let backup = &mut self.hosts[1];
        while backup.committed < known {
            backup.ledger.apply(&backup.log[backup.committed]);
            backup.committed += 1;
        }
        let primary = &mut self.hosts[0];
        let mut outcomes = Vec::new();
        while primary.committed < primary.log.len() {
            let outcome = primary.ledger.apply(&primary.log[primary.committed]);
            outcomes.push((primary.committed, outcome));
            primary.committed += 1;
        }
        outcomes
    }

    /// Which host a station reaches: the primary if it can, else the backup. While the hosts
    /// are cut off from each other, a station reaches only the host on its side of the cut.
    fn host_for(&self, s: usize) -> Option<usize> {
        let reachable = |h: usize| self.hosts[h].up && (self.linked || s % 2 == h);
        [0, 1].into_iter().find(|h| reachable(*h))
    }

    fn go_alone(&mut self, h: usize) {
        self.note(format!("host {} goes alone", h + 1));
        let host = &mut self.hosts[h];
        host.went_alone = true;
        host.journal.clear();
        host.alone = Some(alone_ledger(host, self.config.broken));
    }

    /// Both hosts are back and the primary's log is committed: the merge of what each did
    /// alone enters the log. Neither serves until it knows the merge is committed.
    fn start_merge(&mut self) {
        let merged = match self.config.broken {
            Some(PairBroken::MergePrimaryOnly) => 1,
            _ => 2,
        };
        let states: Vec<_> = self.hosts[..merged]
            .iter()
            .filter_map(|h| h.alone.as_ref().and_then(Ledger::alone_state))
            .collect();
        self.hosts[0].log.push(Stamped {
            at_ms: self.now,
            command: Command::MergeAlone { states },
        });
        self.pending_merge = Some(self.hosts[0].log.len() - 1);
        self.note(format!(
            "merge proposed at index {}",
            self.hosts[0].log.len() - 1
        ));
    }

    /// A host that knows the merge is committed serves paired again; once the primary knows,
    /// every lease a station was told it holds must be in the merged ledger.
    fn finish_merge(&mut self) -> Result<(), Violation> {
        let Some(index) = self.pending_merge else {
            return Ok(());
        };
        let mut problem = None;
        for host in self
            .hosts
            .iter_mut()
            .filter(|h| h.committed > index && h.went_alone)
        {
            host.went_alone = false;
            host.alone = None;
            host.journal.clear();
            if host.share != Share::Primary {
                continue;
            }
            self.report.merges += 1;
            if let Err(e) = host.ledger.check_invariants() {
                problem = Some(format!("after a merge: {e}"));
            }
            for (s, station) in self.stations.iter().enumerate() {
                if let Station::Holding {
                    lease_id,
                    expires_at_ms,
                    ..
                } = station
                    && *expires_at_ms > self.now
                    && host.ledger.lease(lease_id).is_none()
                {
                    problem = Some(format!(
                        "station {s} was told it holds lease {lease_id} until {expires_at_ms}; the merged ledger lost it"
                    ));
                }
            }
        }
        if let Some(message) = problem {
            return Err(self.fail(message));
        }
        if self.hosts.iter().all(|h| !h.went_alone) {
            self.pending_merge = None;
        }
        Ok(())
    }

    /// A station's request, to the host it reaches (see `host_for`). `None`: no answer.
    fn request(&mut self, s: usize, command: Command) -> Option<Outcome> {
        let h = self.host_for(s)?;
        let entry = Stamped {
            at_ms: self.now,
            command,
        };
        if self.hosts[h].went_alone {
            if self.pending_merge.is_some() {
                // Recovering: the merge is on its way; no answer until it is committed.
                return None;
            }
            // Alone: journaled, answered at once.
            let host = &mut self.hosts[h];
            let alone = host.alone.as_mut().expect("alone");
            host.journal.push(entry.clone());
            let before = match &entry.command {
                Command::Heartbeat { lease_id, .. } => Some(alone.lease_share(lease_id)),
                _ => None,
            };
            let outcome = alone.apply(&entry);
            if let (Some(before), Outcome::LeaseRenewed { lease }) = (before, &outcome)
                && alone.lease_share(&lease.lease_id) != before
            {
                self.report.takeovers += 1;
            }
            self.report.served_alone += 1;
            let line = describe(&entry, &outcome);
            self.note(format!("host {} alone: {line}", h + 1));
            return Some(outcome);
        }
        if h == 1 {
            // The backup forwards to the primary, which is down and not yet given up on.
            return None;
        }
        if self.in_contact() && self.hosts[1].went_alone {
            // Recovering: the backup served alone; the primary serves again only once that is
            // merged (it would issue licenses the backup's stations hold).
            return None;
        }
        self.hosts[0].log.push(entry);
        if self.in_contact() && !self.rng.chance_ppm(self.config.replication_loss_ppm) {
            let index = self.hosts[0].log.len() - 1;
            // Committed: applied in log order, answered with its own outcome.
            let outcome = self
                .replicate()
                .into_iter()
                .find(|(i, _)| *i == index)
                .map(|(_, outcome)| outcome);
            if let Some(outcome) = &outcome {
                let line = describe(&self.hosts[0].log[index], outcome);
                let share = match outcome {
                    Outcome::LeaseGranted { lease, .. } | Outcome::LeaseRenewed { lease } => {
                        format!(" [{:?}]", self.hosts[0].ledger.lease_share(&lease.lease_id))
                    }
                    _ => String::new(),
                };
                self.note(format!("paired: {line}{share}"));
            }
            return outcome;
        }
        let line = format!(
            "{:?}",
            self.hosts[0].log[self.hosts[0].log.len() - 1]
                .command
                .name()
        );
        self.note(format!("paired, not acknowledged: {line}"));
        self.report.unacknowledged += 1;
        None
    }

    fn station(&mut self, s: usize) -> Result<(), Violation> {
        let state = self.stations[s].clone();
        match state {
            Station::Idle { next_ms } if next_ms <= self.now => {
                self.next_lease += 1;
                let lease_id = format!("l{}", self.next_lease);
                let outcome = self.request(
                    s,
                    Command::Checkout {
                        lease_id,
                        component: "cad".into(),
                        station: format!("ws{s}"),
                        user: "u".into(),
                        host: "h".into(),
                        lease_ttl_ms: self.config.lease_ttl_ms,
                        borrow_ms: 0,
                    },
                );
                match outcome {
                    Some(Outcome::LeaseGranted { lease, .. }) => {
                        self.report.checkouts += 1;
                        let session = self.rng.exponential(self.config.session_mean_ms);
                        self.stations[s] = Station::Holding {
                            lease_id: lease.lease_id,
                            expires_at_ms: lease.expires_at_ms,
                            next_ms: self.now + self.config.heartbeat_ms,
                            end_ms: self.now + session,
                        };
                    }
                    other => {
                        if matches!(other, Some(Outcome::Refused { .. })) {
                            self.report.denied += 1;
                        }
                        self.stations[s] = Station::Idle {
                            next_ms: self.now + self.rng.range(5_000, 60_000),
                        };
                    }
                }
            }
            Station::Holding { expires_at_ms, .. } if expires_at_ms <= self.now => {
                // Its lease ran out by what it was told: it stops.
                self.stations[s] = Station::Idle {
                    next_ms: self.now + self.rng.exponential(self.config.idle_mean_ms),
                };
            }
            Station::Holding {
                lease_id, end_ms, ..
            } if end_ms <= self.now => {
                let outcome = self.request(
                    s,
                    Command::Checkin {
                        lease_id: lease_id.clone(),
                    },
                );
                // A check-in not answered: the station stops anyway; the lease runs out.
                let _ = outcome;
                self.stations[s] = Station::Idle {
                    next_ms: self.now + self.rng.exponential(self.config.idle_mean_ms),
                };
            }
            Station::Holding {
                lease_id,
                expires_at_ms,
                next_ms,
                end_ms,
            } if next_ms <= self.now => {
                let outcome = self.request(
                    s,
                    Command::Heartbeat {
                        lease_id: lease_id.clone(),
                        lease_ttl_ms: self.config.lease_ttl_ms,
                    },
                );
                match outcome {
                    Some(Outcome::LeaseRenewed { lease }) => {
                        self.stations[s] = Station::Holding {
                            lease_id,
                            expires_at_ms: lease.expires_at_ms.max(expires_at_ms),
                            next_ms: self.now + self.config.heartbeat_ms,
                            end_ms,
                        };
                    }
                    Some(Outcome::Refused { .. }) => {
                        // Told the lease is gone (or cannot be taken over): it stops.
                        self.stations[s] = Station::Idle {
                            next_ms: self.now + self.rng.range(5_000, 60_000),
                        };
                    }
                    _ => {
                        // No answer: keeps its lease until the expiry it was told; tries again.
                        self.stations[s] = Station::Holding {
                            lease_id,
                            expires_at_ms,
                            next_ms: self.now + 5_000,
                            end_ms,
                        };
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Safety: stations that believe they hold a license ≤ the key's licenses.
    fn check(&mut self) -> Result<(), Violation> {
        let held = self
            .stations
            .iter()
            .filter(|s| matches!(s, Station::Holding { expires_at_ms, .. } if *expires_at_ms > self.now))
            .count() as u32;
        self.report.peak_held = self.report.peak_held.max(held);
        if held > self.config.licenses {
            let alone: Vec<String> = self
                .hosts
                .iter()
                .map(|h| {
                    format!(
                        "{:?}: up {}, alone {}, {} committed of {} entries",
                        h.share,
                        h.up,
                        h.went_alone,
                        h.committed,
                        h.log.len()
                    )
                })
                .collect();
            return Err(self.fail(format!(
                "SAFETY: {held} stations hold a license of a key of {} ({})",
                self.config.licenses,
                alone.join("; ")
            )));
        }
        Ok(())
    }
}

/// A host going alone (or restarting alone): its whole log applied as the pair would, then
/// alone from there, then what it journaled alone.
fn alone_ledger(host: &Host, broken: Option<PairBroken>) -> Ledger {
    let mut ledger = host.ledger.clone();
    if broken != Some(PairBroken::IgnoreLogTail) {
        for entry in &host.log[host.committed..] {
            ledger.apply(entry);
        }
    }
    if broken == Some(PairBroken::FullCapacityAlone) {
        // On this host's copy only, its share is the whole key.
        ledger.apply(&Stamped {
            at_ms: ledger.last_at_ms(),
            command: Command::SetPairSplit {
                backup_percent: Some(match host.share {
                    Share::Primary => 0,
                    Share::Backup => 100,
                }),
            },
        });
    }
    ledger.set_alone(Some(host.share));
    for entry in &host.journal {
        ledger.apply(entry);
    }
    ledger
}

/// One line for the trace: a station's command and its answer.
fn describe(entry: &Stamped, outcome: &Outcome) -> String {
    let what = match &entry.command {
        Command::Checkout { station, .. } => format!("checkout by {station}"),
        Command::Heartbeat { lease_id, .. } => format!("heartbeat {lease_id}"),
        Command::Checkin { lease_id } => format!("checkin {lease_id}"),
        other => other.name().to_string(),
    };
    let answer = match outcome {
        Outcome::LeaseGranted { lease, created } => {
            format!(
                "lease {} until {} (new: {created})",
                lease.lease_id, lease.expires_at_ms
            )
        }
        Outcome::LeaseRenewed { lease } => format!("until {}", lease.expires_at_ms),
        Outcome::Refused { refusal } => refusal.code().to_string(),
        other => format!("{other:?}").chars().take(40).collect(),
    };
    format!("{what} → {answer}")
}
