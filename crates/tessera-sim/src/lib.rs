//! Deterministic simulation of a network of Tessera license servers that donate licenses to
//! each other, checking the network-wide safety property at every step.
//!
//! Everything runs in one thread from one seed: the same seed gives the same run, event for
//! event, on every machine. There is no wall clock, no thread, and no hash-map iteration in a
//! decision (ordered maps throughout); randomness comes from a splitmix64 generator seeded by
//! [`SimConfig::seed`]. (The [`domain`] simulation is the exception: it runs the real
//! consensus, whose election timer draws from openraft's own generator.)
//!
//! # The model
//!
//! **Servers.** A tree of [`SimConfig::servers`] license servers: server `s000` is the root,
//! each other server hangs under a random earlier one no deeper than
//! [`SimConfig::max_depth`] (so the fan-out is random and grant chains stay within the
//! grant format's limit), plus [`SimConfig::peer_links`] peer links, each letting one
//! server donate to another that is neither its parent nor its child (cycles are allowed).
//! Each server is a real [`tessera_core::Ledger`] with its own Ed25519 identity (derived from
//! the seed) and its own clock. The root imports the vendor-signed keys
//! ([`SimConfig::keys`]); every other server gets licenses only as grants.
//!
//! **Time.** True time advances in steps of [`SimConfig::step_ms`] (one minute by default);
//! every event happens on a step. Steps where nothing happens are skipped, which is what
//! makes months of a 100-server network cheap. Each server's clock is true time plus a drift
//! that wanders at up to [`SimConfig::drift_rate_ppm`] and stays within
//! ±[`SimConfig::drift_max_ms`] (below `clock_skew_max`, so that two servers never differ
//! by more than the skew the ledgers allow for). Every command a server applies is stamped
//! with its own clock.
//!
//! **Links**, with the rules the server runs (`tessera_engine::link`: when to push and to
//! renew, which grants a donor signs, what a receiver holds and gives back, what a donor takes
//! back, acknowledges and compares); only the transport is the simulator's own. A share of
//! the links ([`SimConfig::periodic_ppm`]) are periodic connections.
//! - *push* (donor → receiver), after every donation change and every
//!   [`SimConfig::sync_period_ms`] (a periodic link: at most every reconnect period): the
//!   donor signs the latest grant of each running donation
//!   (`grant_to_sign` + `Grant::issue`) and asks for ended ones back. The receiver applies
//!   `AcceptGrant` for each, releases (`ReleaseGrant`) pools whose donation ended — after
//!   ending and pushing its own onward donations from them — and answers with what it held
//!   before and after, and what it no longer uses; the donor applies `GrantReturned` for those.
//! - *renew* (receiver → donor) when a grant has less than half of its length left, at least
//!   every sync period, when a grant it gave back should be reported, and at once after a
//!   (re)start (a periodic link: every [`SimConfig::reconnect_ms`], and when a grant has less
//!   than [`SimConfig::preliminary_renewal_ms`] left): the donor takes back what was
//!   returned, **commits `RenewDonations` before it signs** the renewed grants, and answers
//!   with them; the receiver uses them only once it has applied `AcceptGrant`.
//! - Every message carries the sender's clock; a receiver refuses one whose clock differs
//!   from its own by more than `clock_skew_max`, as the server does.
//!
//! **Administrators** donate part of what a server holds to the neighbours it may send to —
//! from its own key, or down the chain from pools it received — sized by the number of
//! stations below each child, and now and then change a count or an end date or end a
//! donation ([`SimConfig::admin_interval_ms`]).
//!
//! **Stations** (per server, [`SimConfig::stations_per_server`]) check out a component,
//! heartbeat every [`SimConfig::heartbeat_ms`] (a third of the lease time, as the server tells
//! them), check in at the end of a session, and try again after a refusal. A station told at a
//! heartbeat that its lease is gone stops at once; a station that cannot reach its server
//! keeps its lease until the expiry it was last told. **Expire** runs on each server's own
//! schedule (its `next_expiry_ms`, at the latest every [`SimConfig::tick_ms`]).
//!
//! **Faults**, drawn from the seed during the first [`SimConfig::fault_days`] days: messages
//! lost, delayed by up to [`SimConfig::delay_max_ms`] (hence reordered) and duplicated;
//! partitions that cut a random subtree off from the rest of the network (every link across
//! the cut, peer links included) and heal after a while; server crashes — in-flight messages
//! to and answers for the crashed server are lost, so is its link state (timers, grants given
//! back but not yet confirmed), and it restarts from the snapshot of its durable ledger taken
//! at the crash (`Ledger::snapshot` + `Ledger::restore`, every other restart through the JSON
//! form, `snapshot_json` + `restore_json`, checked to come back identical); and replays of
//! old grant messages, delivered straight to `AcceptGrant` as if they had got past the
//! message signature and clock check.
//!
//! # What is checked
//!
//! Two properties per vendor key, at every step. A lease granted from a received pool
//! `KEY@DONOR` counts against vendor key `KEY`.
//!
//! - **Safety** (the property of issue 4): the leases stations hold across all servers ≤
//!   the key's licenses.
//! - **No double count** ([`SimConfig::check_double_count`], on by default): the leases
//!   held, plus the licenses every server could still grant right now from what its ledger
//!   holds (a pool's licenses − its leases − what it donated, while the pool is usable by
//!   that server's clock; a crashed server's included), ≤ the key's licenses. This implies
//!   safety whatever the demand, so it catches a license counted on two servers even where
//!   no station happens to ask for it — which a network with spare licenses would hide.
//!
//! When a lease counts as held is [`SimConfig::held_rule`]:
//!
//! - [`HeldRule::Station`] (the default, conservative): *from the moment its server grants it
//!   until the first of: the station checks it in; the station is told at a heartbeat that
//!   the lease is gone; the clock of the lease's server reaches the `expires_at_ms` the
//!   station was last told (at checkout or at its last successful heartbeat).* So a lease
//!   counts while its server is down, while its ledger has not applied `Expire` yet, and also
//!   after its ledger ended it early (a grant that shrank or was released) until its station
//!   hears of it — stations keep working until told. This count is never below the ledgers'.
//! - [`HeldRule::Ledger`]: while the lease's ledger holds it and its server's clock is before
//!   its `expires_at_ms` (counted even when the ledger has not applied `Expire` yet). A lease
//!   the ledger ended counts no more, whether or not its station has heard.
//!
//! **Every step, exactly.** The counts can only grow when a server applies something: a
//! lease granted, a grant accepted, licenses coming back to a donor. Between two applies
//! leases only run out and pools only end, by the clocks. So the checks run after every apply
//! that can make either count grow (every granted lease; every change of what a server could
//! grant), which is the maximum over every instant between two events — stronger than a check
//! once per step.
//!
//! Also checked:
//! - **Each ledger's invariants** after every apply (`check_invariants`: per key and received
//!   pool, leases + donated ≤ licenses, and the indexes agree): debug builds check this inside
//!   `Ledger::apply`; release builds of the simulation call it after every apply.
//! - **Durability**: a restarted ledger's snapshot equals the one taken at the crash.
//! - **Convergence**: when the faults stop (every partition heals, every crashed server
//!   restarts, the network stops losing, delaying, duplicating and replaying, administrators
//!   stop changing donations), the simulation checks every hour whether every donor's records
//!   match its receivers': each running donation's latest grant (serial and licenses) is what
//!   its receiver holds and can still use; no receiver holds a grant its donor ended or does
//!   not count; and no donation that lapsed during the faults is still lapsed although its
//!   donor had licenses for it when its receiver last asked (or was not asked since).
//!   [`SimReport::convergence_ms`] is how long that took, and
//!   [`SimReport::convergence_sync_periods`] the same in sync periods, rounded up.
//!
//! A failure — a violated property, a ledger invariant, a restore that differs — names the
//! seed, the step, the server, the counts per server, the recent link events of that key and
//! the one-line command that replays it (`cargo run -p tessera-sim --release -- --seed N …`).
//! [`simulate`] panics with it; [`try_simulate`] returns it.
//!
//! # What the simulation found, and how it was fixed
//!
//! Each has a minimal reproduction with two ledgers in `tests/sim.rs` that now guards it.
//!
//! - **Leases resting on a lowered donation's larger grant outlived it** (`--contended --held
//!   ledger --seed 149`): the receiver may use the earlier, larger grant until it lapses, but
//!   leases granted meanwhile were capped only at the current, smaller grant's end. Now a
//!   lease runs past an earlier grant's end only if it fits in what is left after it
//!   (`Ledger::lease_cap`); the rest are told they end with that grant.
//! - **A lease a ledger ended early kept running at its station** until its next heartbeat,
//!   while the license already counted as free: a released grant reported returned at once
//!   (`--broken return-at-once` brings that back), a newer grant recreating a released pool
//!   with its full count, and a lowered donation's larger grant lapsing at the receiver, which
//!   ended the newest leases although their stations were told a later expiry. Now no lease
//!   is ended early by a grant's change: leases are capped instead (above); a released
//!   grant's leases count as ended early until their expiry, against the pool if it comes
//!   back, and the receiver reports the return only after it (`GrantReleased`'s
//!   `stations_until_ms`); superseded serials are confirmed only while nothing rests on them.
//! - **Grant serials restarted per source pool** (`--contended --held ledger --seed 148` never
//!   converged): a server holding one vendor key from two donors that donated to one
//!   neighbour first from one pool, then the other, numbered the second donation from 1 while
//!   the receiver checks replays per `KEY@DONOR`. Serials are now numbered per (vendor key,
//!   receiver), and one donation of a vendor key to a neighbour runs at a time.
//!
//! Found earlier, with the ledgers' view, and fixed then: serials restarting after a
//! donation was removed (a receiver then refused every new grant as a replay), a re-grant
//! larger than the grant its chain carried after a shrink, and a re-grant outliving a
//! shortened parent grant.
//!
//! # Running
//!
//! ```text
//! cargo run -p tessera-sim --release -- --seed 7 --servers 100 --days 90
//! cargo run -p tessera-sim --release -- --seeds 1..100 --held ledger  # many seeds, a line each
//! cargo run -p tessera-sim --release -- --seeds 1..50 --contended      # small, saturated
//! cargo run -p tessera-sim --release -- --seeds 1..50 --contended --no-double-count
//! cargo run -p tessera-sim --release -- --seed 3 --contended --held ledger --broken no-skew-margin
//! cargo test -p tessera-sim                                  # the CI seeds (about a minute)
//! TESSERA_SIM_SEEDS=1..40 cargo test -p tessera-sim --release # more seeds
//! ```
//!
//! Flags: `--servers`, `--days` (faults stop 15 days before the end, 5 for `--contended`),
//! `--fault-days`, `--contended`, `--no-double-count`, `--held station|ledger`,
//! `--broken no-skew-margin|sign-before-commit|return-at-once`.
//! A 100-server, 90-day seed takes about 3 s in a release build, 10 s in a debug build.
//!
//! ```
//! use tessera_sim::{HeldRule, SimConfig, simulate};
//!
//! let report = simulate(SimConfig {
//!     servers: 8,
//!     days: 4,
//!     fault_days: 3,
//!     held_rule: HeldRule::Ledger,
//!     ..SimConfig::ci(1)
//! });
//! assert!(report.checkouts > 0);
//! println!("{}", report.summary());
//! ```

pub mod campaign;
#[cfg(feature = "domain")]
pub mod domain;
pub mod pair;
mod rng;
mod world;

use std::collections::BTreeMap;

pub use world::HeldRule;

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;

/// A rule deliberately broken, to show that the safety check can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokenRule {
    /// Every ledger runs with `clock_skew_max = 0`: receivers use grants to their very end and
    /// donors take licenses back at the lease end, while the clocks still drift.
    NoSkewMargin,
    /// Donors answer a renewal with a grant extended by a renewal period and a new serial
    /// without committing `RenewDonations` first: the receiver uses licenses the donor's
    /// ledger takes back when the last committed grant lapses.
    SignBeforeCommit,
    /// Receivers report a released grant returned at once, not once the leases it ended have
    /// run out by the expiry their stations were told: the donor reuses licenses stations
    /// still hold.
    ReturnAtOnce,
}

impl BrokenRule {
    pub fn flag(self) -> &'static str {
        match self {
            BrokenRule::NoSkewMargin => "no-skew-margin",
            BrokenRule::SignBeforeCommit => "sign-before-commit",
            BrokenRule::ReturnAtOnce => "return-at-once",
        }
    }

    pub fn parse(text: &str) -> Option<BrokenRule> {
        [
            BrokenRule::NoSkewMargin,
            BrokenRule::SignBeforeCommit,
            BrokenRule::ReturnAtOnce,
        ]
        .into_iter()
        .find(|rule| rule.flag() == text)
    }
}

/// One vendor key imported at the root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySpec {
    pub key_id: String,
    pub components: Vec<String>,
    pub licenses: u32,
}

/// What to simulate. [`SimConfig::ci`] is the 100-server network the CI runs;
/// [`SimConfig::contended`] a small network where demand exceeds supply everywhere.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    /// Which preset the configuration started from (`ci` or `contended`), for the
    /// reproduction line.
    pub preset: &'static str,
    pub servers: usize,
    pub days: i64,
    /// Faults (and administrators' changes) stop after this many days; the rest of the run
    /// measures convergence.
    pub fault_days: i64,
    /// The time quantum: every event happens on a multiple of it.
    pub step_ms: i64,
    pub keys: Vec<KeySpec>,
    /// Deepest level of the tree (the root is level 0).
    pub max_depth: usize,
    /// Extra one-way peer links (donor → receiver) besides the tree.
    pub peer_links: usize,
    pub clock_skew_max_ms: i64,
    /// Each server's clock stays within ±this of true time.
    pub drift_max_ms: i64,
    /// How fast a clock may drift, in parts per million (redrawn daily per server).
    pub drift_rate_ppm: i64,
    pub lease_ttl_ms: i64,
    pub heartbeat_ms: i64,
    pub renewal_period_ms: i64,
    pub sync_period_ms: i64,
    /// Share of the links (per million) that are periodic connections: the receiver asks
    /// every `reconnect_ms`, and when a grant has less than `preliminary_renewal_ms` left.
    pub periodic_ppm: u32,
    pub reconnect_ms: i64,
    pub preliminary_renewal_ms: i64,
    /// A server's timer runs at least this often (links due, expiry).
    pub tick_ms: i64,
    pub stations_per_server: usize,
    /// Mean length of a station's session holding a license, and of its pause between two.
    pub session_mean_ms: i64,
    pub idle_mean_ms: i64,
    /// A station refused for want of a free license tries again after this long.
    pub retry_ms: (i64, i64),
    /// Mean time between two administrator actions on one donating server.
    pub admin_interval_ms: i64,
    /// Per message, in parts per million.
    pub loss_ppm: u32,
    pub duplication_ppm: u32,
    pub delay_max_ms: i64,
    /// Mean time between two partitions, network-wide; how long one lasts.
    pub partition_interval_ms: i64,
    pub partition_ms: (i64, i64),
    /// Mean time between two crashes, network-wide; how long a server stays down.
    pub crash_interval_ms: i64,
    pub down_ms: (i64, i64),
    /// Mean time between two replays of an old grant message.
    pub replay_interval_ms: i64,
    /// Also check that no license is counted on two servers: leases held plus licenses any
    /// server could grant now ≤ licenses (see the crate docs). Off: only the safety property.
    pub check_double_count: bool,
    /// When a station counts as holding a lease (see the crate docs).
    pub held_rule: HeldRule,
    pub broken: Option<BrokenRule>,
}

impl SimConfig {
    /// The CI network: 100 servers over 90 days in one-minute steps, faults for the first 75.
    /// The times that the safety argument rests on are the server's defaults scaled up 60×
    /// (`clock_skew_max` 30 s → 30 min, lease 2 min → 2 h, heartbeat a third of it), with
    /// clocks up to 12 minutes off each (24 apart, within the skew); the link periods are
    /// longer than the scaled defaults (renewal 48 h instead of 60 h, sync 24 h instead of
    /// 10 h) to keep months of signed traffic cheap.
    pub fn ci(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            preset: "ci",
            servers: 100,
            days: 90,
            fault_days: 75,
            step_ms: MINUTE_MS,
            keys: vec![
                KeySpec {
                    key_id: "K-CAD".into(),
                    components: vec!["cad".into()],
                    licenses: 120,
                },
                KeySpec {
                    key_id: "K-SUITE".into(),
                    components: vec!["cad".into(), "cam".into()],
                    licenses: 60,
                },
            ],
            max_depth: 6,
            peer_links: 4,
            clock_skew_max_ms: 30 * MINUTE_MS,
            drift_max_ms: 12 * MINUTE_MS,
            drift_rate_ppm: 1500,
            lease_ttl_ms: 2 * HOUR_MS,
            heartbeat_ms: 40 * MINUTE_MS,
            renewal_period_ms: 48 * HOUR_MS,
            sync_period_ms: 24 * HOUR_MS,
            periodic_ppm: 250_000,
            reconnect_ms: 12 * HOUR_MS,
            preliminary_renewal_ms: 12 * HOUR_MS,
            tick_ms: 2 * HOUR_MS,
            stations_per_server: 2,
            session_mean_ms: 8 * HOUR_MS,
            idle_mean_ms: 6 * HOUR_MS,
            retry_ms: (HOUR_MS, 3 * HOUR_MS),
            admin_interval_ms: 4 * DAY_MS,
            loss_ppm: 50_000,
            duplication_ppm: 30_000,
            delay_max_ms: 10 * MINUTE_MS,
            partition_interval_ms: 12 * HOUR_MS,
            partition_ms: (HOUR_MS, 3 * DAY_MS),
            crash_interval_ms: 12 * HOUR_MS,
            down_ms: (10 * MINUTE_MS, DAY_MS),
            replay_interval_ms: 6 * HOUR_MS,
            check_double_count: true,
            held_rule: HeldRule::Station,
            broken: None,
        }
    }

    /// A small network where demand exceeds supply on every server, with frequent cuts,
    /// crashes and donation changes: where a wrong timing rule shows up fastest.
    pub fn contended(seed: u64) -> SimConfig {
        SimConfig {
            preset: "contended",
            servers: 6,
            days: 30,
            fault_days: 25,
            keys: vec![KeySpec {
                key_id: "K-CAD".into(),
                components: vec!["cad".into()],
                licenses: 20,
            }],
            max_depth: 3,
            peer_links: 1,
            stations_per_server: 10,
            session_mean_ms: 4 * HOUR_MS,
            idle_mean_ms: HOUR_MS,
            retry_ms: (5 * MINUTE_MS, 30 * MINUTE_MS),
            renewal_period_ms: 12 * HOUR_MS,
            sync_period_ms: 4 * HOUR_MS,
            periodic_ppm: 250_000,
            reconnect_ms: 2 * HOUR_MS,
            preliminary_renewal_ms: 3 * HOUR_MS,
            admin_interval_ms: DAY_MS,
            partition_interval_ms: 8 * HOUR_MS,
            partition_ms: (HOUR_MS, DAY_MS),
            crash_interval_ms: DAY_MS,
            ..SimConfig::ci(seed)
        }
    }

    /// The command line that runs this configuration again.
    pub fn reproduce(&self) -> String {
        let mut line = format!(
            "cargo run -p tessera-sim --release -- --seed {} --servers {} --days {}",
            self.seed, self.servers, self.days
        );
        if self.preset == "contended" {
            line.push_str(" --contended");
        }
        if self.fault_days != self.days - SimConfig::quiet_days(self.preset) {
            line.push_str(&format!(" --fault-days {}", self.fault_days));
        }
        if !self.check_double_count {
            line.push_str(" --no-double-count");
        }
        if self.held_rule != HeldRule::Station {
            line.push_str(&format!(" --held {}", self.held_rule.flag()));
        }
        if let Some(rule) = self.broken {
            line.push_str(&format!(" --broken {}", rule.flag()));
        }
        line
    }

    /// Days without faults at the end of a preset's run.
    pub fn quiet_days(preset: &str) -> i64 {
        if preset == "contended" { 5 } else { 15 }
    }
}

/// What a run did and found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimReport {
    pub seed: u64,
    /// Simulated time in steps, and the events processed.
    pub steps: u64,
    pub events: u64,
    pub applies: u64,
    pub checkouts: u64,
    pub denials: u64,
    pub heartbeats: u64,
    /// Stations told at a heartbeat that their lease had gone (ended by the ledger).
    pub leases_revoked: u64,
    /// Leases a station lost because no heartbeat got through before it expired.
    pub leases_lapsed: u64,
    pub donations: u64,
    pub donations_ended: u64,
    pub grants_signed: u64,
    pub grants_accepted: u64,
    /// Refused grants by refusal code (replays and pushes crossing a renewal are expected).
    pub grants_refused: BTreeMap<String, u64>,
    pub releases: u64,
    /// Licenses donors took back because their receiver gave them back (`GrantReturned`).
    pub licenses_returned: u64,
    /// Records a donor found not matching what its receiver said it held.
    pub mismatches: u64,
    pub messages: u64,
    pub messages_lost: u64,
    pub messages_duplicated: u64,
    pub clock_refusals: u64,
    pub partitions: u64,
    pub crashes: u64,
    pub replays: u64,
    pub replays_accepted: u64,
    /// Per vendor key: (most leases held at once across the network, licenses).
    pub peak_held: BTreeMap<String, (u32, u32)>,
    /// Time after the faults stopped until every donor's records matched its receivers'
    /// (checked hourly; `None`: not by the end of the run), and the same in sync periods,
    /// rounded up.
    pub convergence_ms: Option<i64>,
    pub convergence_sync_periods: Option<u64>,
    /// If it did not converge: the first disagreement, in words.
    pub disagreement: Option<String>,
}

impl SimReport {
    /// One line for the command-line tool.
    pub fn summary(&self) -> String {
        let peaks: Vec<String> = self
            .peak_held
            .iter()
            .map(|(key, (peak, licenses))| format!("{key} {peak}/{licenses}"))
            .collect();
        let refused: u64 = self.grants_refused.values().sum();
        format!(
            "seed {}: ok — {} steps, {} events, {} applies; {} checkouts, {} denied, {} revoked at heartbeat; {} donations, {} ended; grants {} signed, {} accepted, {} refused; {} releases, {} licenses returned; {} messages ({} lost, {} duplicated, {} clock refusals); {} partitions, {} crashes, {} replays ({} accepted); peak held {}; {}",
            self.seed,
            self.steps,
            self.events,
            self.applies,
            self.checkouts,
            self.denials,
            self.leases_revoked,
            self.donations,
            self.donations_ended,
            self.grants_signed,
            self.grants_accepted,
            refused,
            self.releases,
            self.licenses_returned,
            self.messages,
            self.messages_lost,
            self.messages_duplicated,
            self.clock_refusals,
            self.partitions,
            self.crashes,
            self.replays,
            self.replays_accepted,
            peaks.join(", "),
            match self.convergence_sync_periods {
                Some(n) => format!(
                    "converged {:.0} h ({n} sync periods) after the faults stopped",
                    self.convergence_ms.unwrap_or(0) as f64 / HOUR_MS as f64
                ),
                None => format!(
                    "NOT converged: {}",
                    self.disagreement.as_deref().unwrap_or("?")
                ),
            }
        )
    }
}

/// A failed run: what failed, where, and how to replay it.
#[derive(Clone, Debug)]
pub struct Violation {
    pub seed: u64,
    pub step: u64,
    /// What failed, with the server and counts.
    pub message: String,
    /// Recent link events involving the key that failed, oldest first.
    pub trace: Vec<String>,
    /// The one-line command that replays the run.
    pub reproduce: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} step {}: {}\n  reproduce: {}",
            self.seed, self.step, self.message, self.reproduce
        )?;
        if !self.trace.is_empty() {
            write!(f, "\n  recent events:")?;
            for line in &self.trace {
                write!(f, "\n    {line}")?;
            }
        }
        Ok(())
    }
}

/// Runs one simulation; `Err` with the first failure. A panic inside (a ledger invariant in
/// a debug build) is turned into a [`Violation`] naming the seed too.
pub fn try_simulate(config: SimConfig) -> Result<SimReport, Violation> {
    world::run(config)
}

/// Runs one simulation and panics on the first failure, naming the seed, step, server,
/// counts and the command that replays it.
pub fn simulate(config: SimConfig) -> SimReport {
    match try_simulate(config) {
        Ok(report) => report,
        Err(violation) => panic!("{violation}"),
    }
}
