//! Deterministic simulation of a redundant pair: two hosts keeping one replicated log, losing
//! each other (partitions, kill -9), each serving alone within its share, and merging when
//! they are back. Checked at every step: the stations that believe they hold a license never
//! exceed the key, and after every merge every lease a station was told it holds is still
//! there.
//!
//! Each host runs the pair machine the server runs (`tessera_engine::pair::PairMachine`):
//! when to serve alone, in which epoch, when a lost journal forbids it, when to merge, when
//! to serve paired again. The alone ledger and the merge's states come from the engine too.
//! This file is only the machine's runtime on simulated hosts, and the world around it:
//!
//! - **The log**, as a two-voter Raft group runs it: only host 1 appends; an entry is
//!   committed once host 2 has it too, and only then applied and acknowledged. Replication
//!   can fail in any step (a host or the link is down, a host serves alone and refuses, or
//!   the message is lost), so host 1's log can end in entries never committed nor
//!   acknowledged, and host 2 may hold entries it does not know are committed (it learns the
//!   commit index one round late).
//! - **The link**: in contact, each host hears the other, with its mode; a host serving alone
//!   refuses, so the other sees it reachable and alone but does not hear it.
//! - **Durable** per host: the log and its commit index, the alone journal, and the alone
//!   epoch recorded in the store. kill -9 loses the rest, the machine included.
//! - **The merge task** of the host driving the merge: the other host's alone state
//!   (`on_handover` there), one `MergeAlone` appended to the log, done once it is committed.

use tessera_core::{
    AloneState, Command, Ledger, LedgerConfig, LicenseKey, LicenseKeyPayload, Outcome, SecretKey,
    Share, Stamped,
};
use tessera_engine::pair::{
    self as engine, Action, Broken, Host as HostFacts, JournalMark, Link, PairMachine, Route,
    Rules, Timing,
};

use crate::rng::Rng;
use crate::{HOUR_MS, MINUTE_MS, Violation};

const START_MS: i64 = 1_800_000_000_000;

/// A pair rule deliberately broken, to show the checks catch it: a mutation of the engine.
pub type PairBroken = Broken;

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

    fn timing(&self) -> Timing {
        Timing {
            alone_after_ms: self.alone_after_ms,
            // What was seen in this step counts as current.
            recent_ms: self.step_ms,
        }
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

/// The alone journal (durable).
#[derive(Clone)]
struct Journal {
    share: Share,
    epoch: u64,
    commands: Vec<Stamped>,
}

/// The merge task of the driving host.
#[derive(Clone, Copy)]
enum Task {
    /// Asks the other host for its alone state at the next step.
    Handover,
    /// Its `MergeAlone` is at this index of host 1's log; done once committed there.
    Committing(usize),
}

struct Host {
    id: u64,
    /// Durable: the log and how much of it this host knows is committed.
    log: Vec<Stamped>,
    committed: usize,
    /// Durable: what it did alone, and the alone epoch its store records.
    journal: Option<Journal>,
    alone_epoch: Option<u64>,
    /// In memory: the pair machine, the link as it sees it, the committed ledger, the ledger
    /// it serves from alone, its alone state kept for a merge, its merge task.
    machine: PairMachine,
    link: Link,
    ledger: Ledger,
    alone: Option<Ledger>,
    handed: Option<AloneState>,
    task: Option<Task>,
    /// Its log refuses the other host (closed while it serves alone).
    routes_closed: bool,
    up: bool,
}

impl Host {
    fn facts(&self, now: i64) -> HostFacts {
        HostFacts {
            me: self.id,
            voters: vec![1, 2],
            journal: self.journal.as_ref().map(|j| JournalMark {
                share: j.share,
                epoch: j.epoch,
            }),
            alone_epoch: self.alone_epoch,
            wall_ms: now,
        }
    }
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
    rules: Rules,
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
    let rules = Rules::with_broken(config.broken);
    let host = |id| {
        let mut ledger = Ledger::new(ledger_config.clone());
        for entry in &setup {
            ledger.apply(entry);
        }
        Host {
            id,
            log: setup.clone(),
            committed: setup.len(),
            journal: None,
            alone_epoch: None,
            machine: PairMachine::new(config.timing(), rules),
            link: Link {
                started_ms: START_MS,
                ..Link::default()
            },
            ledger,
            alone: None,
            handed: None,
            task: None,
            routes_closed: false,
            up: true,
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
        hosts: [host(1), host(2)],
        rules,
        ledger_config,
        stations,
        linked: true,
        now: START_MS,
        rng,
        fault_rng,
        next_fault_ms: START_MS,
        heal_ms: i64::MIN,
        next_lease: 0,
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

    /// Replication can happen: both hosts up, linked, and neither refusing (alone).
    fn replicating(&self) -> bool {
        self.in_contact() && self.hosts.iter().all(|h| !h.routes_closed)
    }

    fn step(&mut self) -> Result<(), Violation> {
        self.faults();
        self.exchange();
        // Background replication catches up host 2 and the commit index.
        if self.replicating() && !self.rng.chance_ppm(self.config.replication_loss_ppm) {
            self.replicate();
        }
        for h in 0..2 {
            if self.hosts[h].up {
                self.run_task(h)?;
                self.tick(h);
            }
        }
        for s in 0..self.stations.len() {
            self.station(s)?;
        }
        self.check()
    }

    /// What each host learns of the other this step, as the Raft traffic would show it.
    fn exchange(&mut self) {
        if !self.in_contact() {
            return;
        }
        let now = self.now;
        let modes = [self.hosts[0].machine.mode(), self.hosts[1].machine.mode()];
        let refusing = [self.hosts[0].routes_closed, self.hosts[1].routes_closed];
        for h in 0..2 {
            let other = 1 - h;
            let link = &mut self.hosts[h].link;
            link.reachable_ms = Some(now);
            link.peer_mode = Some(modes[other]);
            if refusing[other] {
                link.peer_alone_ms = Some(now);
            } else {
                link.heard_ms = Some(now);
            }
        }
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
                    for host in &mut self.hosts {
                        // A mode last heard goes stale at once.
                        host.link.peer_mode = None;
                    }
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
        let timing = self.config.timing();
        let host = &mut self.hosts[h];
        host.up = false;
        host.alone = None;
        host.handed = None;
        host.task = None;
        host.routes_closed = false;
        host.machine = PairMachine::new(timing, self.rules);
        host.ledger = Ledger::new(self.ledger_config.clone());
        self.hosts[1 - h].link.peer_mode = None;
    }

    fn restart(&mut self, h: usize) {
        self.note(format!("host {} restarts", h + 1));
        let now = self.now;
        let host = &mut self.hosts[h];
        host.up = true;
        let mut ledger = Ledger::new(self.ledger_config.clone());
        for entry in &host.log[..host.committed] {
            ledger.apply(entry);
        }
        host.ledger = ledger;
        host.link = Link {
            started_ms: now,
            ..Link::default()
        };
    }

    /// One round of replication: host 2 gets host 1's new entries and learns the commit
    /// index host 1 had (so it learns of a commit one round late, as a Raft follower does);
    /// host 1, its entries now on both, commits them all. Returns host 1's outcomes by log
    /// index.
    fn replicate(&mut self) -> Vec<(usize, Outcome)> {
        // Only host 1 appends: host 2's log is a prefix of host 1's.
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

    /// One look of host `h`'s machine at its link, its actions carried out.
    fn tick(&mut self, h: usize) {
        let now = self.now;
        let host = &mut self.hosts[h];
        let facts = host.facts(now);
        let actions = host.machine.on_tick(now, &host.ledger, &facts, &host.link);
        self.carry_out(h, actions);
    }

    fn carry_out(&mut self, h: usize, actions: Vec<Action>) {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            let host = &mut self.hosts[h];
            match action {
                Action::Mode { from, to } => {
                    self.note(format!("host {} {from:?} → {to:?}", h + 1));
                }
                Action::AbortRecovery => host.task = None,
                Action::GoAlone { share, epoch } => {
                    // The journal keeps its commands; its epoch moves on.
                    let journal = host.journal.get_or_insert(Journal {
                        share,
                        epoch,
                        commands: Vec::new(),
                    });
                    journal.share = share;
                    journal.epoch = journal.epoch.max(epoch);
                    host.alone_epoch = Some(journal.epoch);
                    host.routes_closed = true;
                    let tail = host.log[host.committed..].to_vec();
                    host.alone = Some(engine::alone_ledger(
                        self.rules,
                        host.ledger.clone(),
                        tail,
                        share,
                        &journal.commands,
                    ));
                    host.handed = None;
                    let next = host.machine.on_alone(true);
                    queue.extend(next);
                    let replayed = self.hosts[h]
                        .journal
                        .as_ref()
                        .map_or(0, |j| j.commands.len());
                    self.note(format!(
                        "host {} goes alone ({share:?}, epoch {epoch}, {replayed} journaled)",
                        h + 1
                    ));
                }
                Action::JournalLost { begun, found } => {
                    self.note(format!(
                        "host {}: journal lost (began epoch {begun}, found {found:?})",
                        h + 1
                    ));
                }
                Action::OpenRoutes => host.routes_closed = false,
                Action::KeepAloneState => {
                    let epoch = host.journal.as_ref().map_or(0, |j| j.epoch);
                    host.handed = host.alone.take().and_then(|ledger| ledger.alone_state());
                    if let Some(state) = &mut host.handed {
                        state.epoch = epoch;
                    }
                }
                Action::StartRecovery => host.task = Some(Task::Handover),
                Action::Rejoin => {
                    host.alone_epoch = None;
                    host.journal = None;
                    host.handed = None;
                    host.task = None;
                    let next = host.machine.on_rejoined();
                    queue.extend(next);
                }
            }
        }
    }

    /// The merge task of host `h`, one step of it: the other host's alone state, then one
    /// `MergeAlone` in host 1's log; done once committed there.
    fn run_task(&mut self, h: usize) -> Result<(), Violation> {
        match self.hosts[h].task {
            None => Ok(()),
            Some(Task::Handover) => {
                if !self.in_contact() || h != 0 {
                    // The RPC fails (or the driver does not lead the log): the task ends; the
                    // machine starts it again.
                    self.hosts[h].task = None;
                    self.hosts[h].machine.on_recovery_finished(false);
                    return Ok(());
                }
                let other = 1 - h;
                let handed = match self.hosts[other].machine.on_handover() {
                    Some(actions) => {
                        self.carry_out(other, actions);
                        self.hosts[other].handed.clone()
                    }
                    None => None,
                };
                let states = engine::merge_states(self.rules, self.hosts[h].handed.clone(), handed);
                if states.is_empty() {
                    self.hosts[h].task = None;
                    self.hosts[h].machine.on_recovery_finished(true);
                    return Ok(());
                }
                self.hosts[0].log.push(Stamped {
                    at_ms: self.now.max(self.hosts[0].ledger.last_at_ms()),
                    command: Command::MergeAlone { states },
                });
                let index = self.hosts[0].log.len() - 1;
                self.hosts[h].task = Some(Task::Committing(index));
                self.note(format!("merge proposed at index {index}"));
                Ok(())
            }
            Some(Task::Committing(index)) => {
                if self.hosts[0].committed <= index {
                    return Ok(());
                }
                self.hosts[h].task = None;
                self.hosts[h].machine.on_recovery_finished(true);
                self.report.merges += 1;
                self.check_merged()
            }
        }
    }

    /// Once the driving host knows the merge is committed, every lease a station was told it
    /// holds must be in the merged ledger.
    fn check_merged(&mut self) -> Result<(), Violation> {
        let ledger = &self.hosts[0].ledger;
        let mut problem = ledger
            .check_invariants()
            .err()
            .map(|e| format!("after a merge: {e}"));
        for (s, station) in self.stations.iter().enumerate() {
            if let Station::Holding {
                lease_id,
                expires_at_ms,
                ..
            } = station
                && *expires_at_ms > self.now
                && ledger.lease(lease_id).is_none()
            {
                problem = Some(format!(
                    "station {s} was told it holds lease {lease_id} until {expires_at_ms}; the merged ledger lost it"
                ));
            }
        }
        match problem {
            Some(message) => Err(self.fail(message)),
            None => Ok(()),
        }
    }

    /// Which host a station reaches: host 1 if it can, else host 2. While the hosts are cut
    /// off from each other, a station reaches only the host on its side of the cut.
    fn host_for(&self, s: usize) -> Option<usize> {
        let reachable = |h: usize| self.hosts[h].up && (self.linked || s % 2 == h);
        [0, 1].into_iter().find(|h| reachable(*h))
    }

    /// A station's request, to the host it reaches (see `host_for`), routed as its machine
    /// says. `None`: no answer.
    fn request(&mut self, s: usize, command: Command) -> Option<Outcome> {
        let h = self.host_for(s)?;
        let entry = Stamped {
            at_ms: self.now,
            command,
        };
        let route = self.hosts[h].machine.route(self.now, &self.hosts[h].link);
        match route {
            Route::Recovering => None,
            Route::Alone => {
                // Journaled, answered at once.
                let host = &mut self.hosts[h];
                let alone = host.alone.as_mut()?;
                host.journal.as_mut()?.commands.push(entry.clone());
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
                Some(outcome)
            }
            Route::Consensus => {
                if h == 1 {
                    // Host 2 forwards to host 1, which it cannot reach.
                    return None;
                }
                self.hosts[0].log.push(entry);
                if self.replicating() && !self.rng.chance_ppm(self.config.replication_loss_ppm) {
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
                            Outcome::LeaseGranted { lease, .. }
                            | Outcome::LeaseRenewed { lease } => format!(
                                " [{:?}]",
                                self.hosts[0].ledger.lease_share(&lease.lease_id)
                            ),
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
        }
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
                        "host {}: up {}, {:?}, {} committed of {} entries",
                        h.id,
                        h.up,
                        h.machine.mode(),
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
