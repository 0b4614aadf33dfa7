//! Deterministic simulation of a network of Tessera license servers that donate licenses to
//! each other, with message loss, delay, duplication, replay, partitions, crashes and
//! drifting clocks — checking the safety property at every step.
//!
//! # The model
//! - A tree of `servers` license servers (server 0 is the root, each other server's parent is
//!   drawn from the servers before it), each a real [`tessera_core::Ledger`] with its own
//!   Ed25519 identity and its own clock: the simulated true time plus a constant drift of at
//!   most `drift_max_ms` (below the ledgers' `clock_skew_max`).
//! - The root imports the vendor-signed keys. Administrators (random, from the seed) donate
//!   parts of what a server holds to its children — from its own keys or, down the chain,
//!   from grants it received — and sometimes change the count or the end date.
//! - The link behaviour of the real server: a receiver asks its donor to renew when less than
//!   half of a grant is left and at least every sync period; the donor commits
//!   `RenewDonations` first, then signs the grants (`grant_to_sign` + `Grant::issue`) and
//!   sends them; a donor pushes its grants after every change and every sync period; the
//!   receiver applies `AcceptGrant`. Stations check out and in on every server; every server
//!   applies `Expire` at its own time.
//! - Faults: messages lost, delayed (up to `delay_max_steps`), duplicated, and old grant
//!   messages replayed; links between a server and its parent cut for hours to days; servers
//!   crashed for a while (in-flight messages to them are lost; their ledger is durable and
//!   comes back from a snapshot).
//!
//! # What is checked
//! - After every apply, each ledger's own invariants (debug builds: leases + donated ≤
//!   licenses for every key and received grant).
//! - At every step, **the safety property**: for every vendor key, the leases stations hold
//!   anywhere in the network ≤ the key's licenses. A lease counts as held while its
//!   `expires_at_ms` is after its server's own clock — whether or not that server has
//!   applied the expiry yet, and whether the server is up or crashed (its stations do not
//!   know). This is the conservative reading: a station may use its lease until it expires.
//! - After the faults stop and every link heals, the number of sync periods until every
//!   donor's records match its receivers' (same serial, same licenses, for every running
//!   donation): the convergence figure in [`SimReport`].
//!
//! Every failure names its seed; `cargo run -p tessera-sim --release -- --seed N` replays it.

use std::collections::BTreeMap;

use jiff::Timestamp;
use tessera_core::{
    Command, Grant, Ledger, LedgerConfig, LicenseKey, LicenseKeyPayload, Outcome, SecretKey,
    Stamped,
};

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;
/// Simulated time starts here (2027-01-15).
const START_MS: i64 = 1_800_000_000_000;

/// What to simulate. [`SimConfig::ci`] is the set used in CI.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    /// The flags that select this configuration in `tessera-sim`, for reproduction lines.
    pub flags: String,
    pub servers: usize,
    pub days: i64,
    pub step_ms: i64,
    /// Faults stop after this fraction of the run, so convergence can be measured.
    pub faulty_fraction: f64,
    pub clock_skew_max_ms: i64,
    pub drift_max_ms: i64,
    pub renewal_period_ms: i64,
    pub sync_period_ms: i64,
    pub lease_ttl_ms: i64,
    pub stations_per_server: usize,
    /// Station requests (checkout or checkin) per server and step.
    pub requests_per_step: usize,
    pub keys: usize,
    pub licenses_per_key: u32,
    pub loss: f64,
    pub duplication: f64,
    pub replay: f64,
    pub delay_max_steps: i64,
    /// Per step: chance that a link to a parent is cut, that a server crashes.
    pub partition_rate: f64,
    pub crash_rate: f64,
    /// A deliberately broken rule, to show the check can fail: every ledger ignores the
    /// clock skew margin (receivers use grants to their very end, donors take licenses back
    /// at the lease end) while clocks still drift.
    pub ignore_skew_margin: bool,
}

impl SimConfig {
    /// A small, saturated network (3 servers, demand above supply everywhere, frequent cuts):
    /// where a wrong timing rule shows up fastest.
    pub fn contended(seed: u64) -> SimConfig {
        SimConfig {
            flags: " --contended".into(),
            servers: 3,
            days: 30,
            stations_per_server: 40,
            requests_per_step: 10,
            keys: 1,
            licenses_per_key: 30,
            partition_rate: 0.05,
            ..SimConfig::ci(seed)
        }
    }

    /// 100 servers over 60 simulated days, hourly steps, every fault enabled.
    pub fn ci(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            flags: String::new(),
            servers: 100,
            days: 60,
            step_ms: HOUR_MS,
            faulty_fraction: 0.75,
            clock_skew_max_ms: HOUR_MS,
            drift_max_ms: 50 * MINUTE_MS,
            renewal_period_ms: DAY_MS,
            sync_period_ms: 6 * HOUR_MS,
            lease_ttl_ms: 3 * HOUR_MS,
            stations_per_server: 6,
            requests_per_step: 2,
            keys: 2,
            licenses_per_key: 60,
            loss: 0.05,
            duplication: 0.05,
            replay: 0.02,
            delay_max_steps: 3,
            partition_rate: 0.002,
            crash_rate: 0.001,
            ignore_skew_margin: false,
        }
    }
}

/// What a run found.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub seed: u64,
    pub steps: u64,
    pub applies: u64,
    pub grants_accepted: u64,
    pub grants_refused: u64,
    pub donations: u64,
    pub checkouts: u64,
    pub denials: u64,
    pub partitions: u64,
    pub crashes: u64,
    pub messages_lost: u64,
    pub replays: u64,
    /// The most licenses of any key held at once across the network.
    pub peak_held: u32,
    /// Sync periods from the end of the faults until donors and receivers agreed (None:
    /// they did not by the end of the run).
    pub convergence_sync_periods: Option<u64>,
    /// If not converged: the first donation its receiver does not agree with.
    pub disagreement: Option<String>,
    /// Why grants were refused, with counts (replays and duplicates are expected).
    pub refusals: BTreeMap<String, u64>,
}

/// A safety violation: the seed, the step and what was over-issued.
#[derive(Clone, Debug)]
pub struct Violation {
    pub seed: u64,
    pub step: u64,
    pub message: String,
    /// The command line that replays it.
    pub reproduce: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} step {}: {} (reproduce: {})",
            self.seed, self.step, self.message, self.reproduce
        )
    }
}

/// splitmix64: small, seedable, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1).max(1) as u64) as i64
    }
}

enum Msg {
    /// Donor → receiver: grants (after a change, every sync period, or answering a renewal).
    Grants(Vec<Grant>),
    /// Receiver → donor: please renew.
    Renew,
}

struct InFlight {
    from: usize,
    to: usize,
    msg: Msg,
}

struct Server {
    id: String,
    secret: SecretKey,
    ledger: Ledger,
    drift_ms: i64,
    parent: Option<usize>,
    children: Vec<usize>,
    down_until: Option<i64>,
    last_renew_ms: i64,
    last_push_ms: i64,
    lease_seq: u64,
}

impl Server {
    fn now(&self, true_ms: i64) -> i64 {
        true_ms + self.drift_ms
    }
}

pub struct Sim {
    config: SimConfig,
    rng: Rng,
    servers: Vec<Server>,
    /// Vendor key id → licenses.
    keys: BTreeMap<String, u32>,
    /// (delivery time, sequence) → message.
    queue: BTreeMap<(i64, u64), InFlight>,
    seq: u64,
    /// Cut links: child index → heal time (true ms).
    cuts: BTreeMap<usize, i64>,
    /// Old grant messages, for replay: (from, to, grants).
    sent: Vec<(usize, usize, Vec<Grant>)>,
    now_ms: i64,
    step: u64,
    report: SimReport,
}

/// Runs one simulation; `Err` on the first safety violation.
pub fn simulate(config: SimConfig) -> Result<SimReport, Violation> {
    let mut sim = Sim::new(config);
    sim.run()?;
    Ok(sim.report)
}

impl Sim {
    pub fn new(config: SimConfig) -> Sim {
        let mut rng = Rng(config.seed ^ 0x7E55_E7A5_1A11_0000);
        let vendor = SecretKey::from_seed([0x5E; 32]);
        let skew = if config.ignore_skew_margin {
            0
        } else {
            config.clock_skew_max_ms
        };
        let mut servers: Vec<Server> = Vec::with_capacity(config.servers);
        for i in 0..config.servers {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&rng.next().to_le_bytes());
            let secret = SecretKey::from_seed(seed);
            let id = format!("s{i}");
            let ledger = Ledger::new(LedgerConfig {
                trusted_vendors: vec![vendor.public_key()],
                server_id: Some(id.clone()),
                server_public_key: Some(secret.public_key()),
                clock_skew_max_ms: skew,
            });
            let parent = (i > 0).then(|| rng.below(i as u64) as usize);
            let drift_ms = rng.range(-config.drift_max_ms, config.drift_max_ms);
            servers.push(Server {
                id,
                secret,
                ledger,
                drift_ms,
                parent,
                children: Vec::new(),
                down_until: None,
                last_renew_ms: i64::MIN / 2,
                last_push_ms: i64::MIN / 2,
                lease_seq: 0,
            });
            if let Some(p) = parent {
                servers[p].children.push(i);
            }
        }
        let mut keys = BTreeMap::new();
        let until = START_MS + (config.days + 30) * DAY_MS;
        let mut sim = Sim {
            rng,
            servers,
            keys: BTreeMap::new(),
            queue: BTreeMap::new(),
            seq: 0,
            cuts: BTreeMap::new(),
            sent: Vec::new(),
            now_ms: START_MS,
            step: 0,
            report: SimReport {
                seed: config.seed,
                ..SimReport::default()
            },
            config,
        };
        for k in 0..sim.config.keys {
            let key_id = format!("K{k}");
            let key = LicenseKey::sign(
                LicenseKeyPayload {
                    key_id: key_id.clone(),
                    customer: "sim".into(),
                    components: vec!["cad".into()],
                    licenses: sim.config.licenses_per_key,
                    valid_from: Timestamp::from_millisecond(START_MS - DAY_MS).expect("time"),
                    valid_until: Timestamp::from_millisecond(until).expect("time"),
                    server_id: None,
                    renews: None,
                    issued_at: Timestamp::from_millisecond(START_MS - DAY_MS).expect("time"),
                },
                &vendor,
            )
            .expect("key signs");
            keys.insert(key_id, sim.config.licenses_per_key);
            sim.apply(0, Command::ImportKey { key });
        }
        sim.keys = keys;
        sim
    }

    fn apply(&mut self, server: usize, command: Command) -> Outcome {
        let at_ms = self.servers[server].now(self.now_ms);
        self.report.applies += 1;
        self.servers[server]
            .ledger
            .apply(&Stamped { at_ms, command })
    }

    fn up(&self, server: usize) -> bool {
        self.servers[server].down_until.is_none()
    }

    fn faulty(&self) -> bool {
        let total = self.config.days * DAY_MS;
        ((self.now_ms - START_MS) as f64) < total as f64 * self.config.faulty_fraction
    }

    fn linked(&self, a: usize, b: usize) -> bool {
        let child = if self.servers[a].parent == Some(b) {
            a
        } else {
            b
        };
        !self.cuts.contains_key(&child)
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        if let Msg::Grants(grants) = &msg
            && !grants.is_empty()
            && self.sent.len() < 512
        {
            self.sent.push((from, to, grants.clone()));
        }
        let faulty = self.faulty();
        if faulty && self.rng.chance(self.config.loss) {
            self.report.messages_lost += 1;
            return;
        }
        let copies = if faulty && self.rng.chance(self.config.duplication) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if faulty {
                self.rng.range(0, self.config.delay_max_steps) * self.config.step_ms
            } else {
                0
            };
            self.seq += 1;
            let msg = match &msg {
                Msg::Grants(g) => Msg::Grants(g.clone()),
                Msg::Renew => Msg::Renew,
            };
            self.queue
                .insert((self.now_ms + delay, self.seq), InFlight { from, to, msg });
        }
    }

    fn grants_for(&self, donor: usize, to: &str) -> Vec<Grant> {
        let server = &self.servers[donor];
        server
            .ledger
            .donations()
            .iter()
            .filter(|d| d.to == to)
            .filter_map(|d| {
                let (source, payload) = server.ledger.grant_to_sign(&d.key_id, to)?;
                Some(Grant::issue(source, payload, &server.secret))
            })
            .collect()
    }

    fn deliver(&mut self, message: InFlight) {
        let InFlight { from, to, msg } = message;
        if !self.up(to) || !self.linked(from, to) {
            self.report.messages_lost += 1;
            return;
        }
        match msg {
            Msg::Renew => {
                // The donor commits the renewal before the grants leave it.
                let receiver = self.servers[from].id.clone();
                self.apply(
                    to,
                    Command::RenewDonations {
                        to: receiver.clone(),
                    },
                );
                let grants = self.grants_for(to, &receiver);
                self.send(to, from, Msg::Grants(grants));
            }
            Msg::Grants(grants) => {
                for grant in grants {
                    match self.apply(
                        to,
                        Command::AcceptGrant {
                            grant: Box::new(grant),
                        },
                    ) {
                        Outcome::GrantAccepted { .. } => self.report.grants_accepted += 1,
                        Outcome::Refused { refusal } => {
                            self.report.grants_refused += 1;
                            let message = refusal.to_string();
                            let reason = message.split(':').next().unwrap_or("").to_string();
                            *self
                                .report
                                .refusals
                                .entry(format!("{} ({})", refusal.code(), reason))
                                .or_default() += 1;
                        }
                        _ => self.report.grants_refused += 1,
                    }
                }
            }
        }
    }

    fn faults(&mut self) {
        if !self.faulty() {
            // Heal everything and restart every crashed server.
            self.cuts.clear();
            for i in 0..self.servers.len() {
                if self.servers[i].down_until.is_some() {
                    self.restart(i);
                }
            }
            return;
        }
        let now = self.now_ms;
        self.cuts.retain(|_, heal| *heal > now);
        for i in 1..self.servers.len() {
            if self.rng.chance(self.config.partition_rate) {
                let hours = self.rng.range(1, 72);
                self.cuts.insert(i, now + hours * HOUR_MS);
                self.report.partitions += 1;
            }
        }
        for i in 0..self.servers.len() {
            match self.servers[i].down_until {
                Some(until) if until <= now => self.restart(i),
                None if self.rng.chance(self.config.crash_rate) => {
                    let hours = self.rng.range(1, 48);
                    self.servers[i].down_until = Some(now + hours * HOUR_MS);
                    self.report.crashes += 1;
                }
                _ => {}
            }
        }
        if self.rng.chance(self.config.replay) && !self.sent.is_empty() {
            let (from, to, grants) =
                self.sent[self.rng.below(self.sent.len() as u64) as usize].clone();
            self.report.replays += 1;
            self.seq += 1;
            self.queue.insert(
                (now, self.seq),
                InFlight {
                    from,
                    to,
                    msg: Msg::Grants(grants),
                },
            );
        }
    }

    /// A crashed server comes back with its durable state (a snapshot round trip).
    fn restart(&mut self, i: usize) {
        let server = &mut self.servers[i];
        let config = server.ledger.config().clone();
        let bytes = server.ledger.snapshot_json();
        server.ledger = Ledger::restore_json(config, &bytes).expect("own snapshot restores");
        server.down_until = None;
        server.last_renew_ms = i64::MIN / 2;
        server.last_push_ms = i64::MIN / 2;
    }

    fn stations(&mut self, i: usize) {
        self.apply(i, Command::Expire);
        // Most stations keep their licenses: demand stays high across the network.
        for lease in self.servers[i].ledger.leases() {
            if self.rng.chance(0.8) {
                self.apply(
                    i,
                    Command::Heartbeat {
                        lease_id: lease.lease_id,
                        lease_ttl_ms: self.config.lease_ttl_ms,
                    },
                );
            }
        }
        for _ in 0..self.config.requests_per_step {
            let n = self.rng.below(self.config.stations_per_server as u64);
            let station = format!("{}-ws{n}", self.servers[i].id);
            if self.rng.chance(0.6) {
                self.servers[i].lease_seq += 1;
                let lease_id = format!("{}-l{}", self.servers[i].id, self.servers[i].lease_seq);
                let outcome = self.apply(
                    i,
                    Command::Checkout {
                        lease_id,
                        component: "cad".into(),
                        station,
                        user: "u".into(),
                        host: "h".into(),
                        lease_ttl_ms: self.config.lease_ttl_ms,
                    },
                );
                match outcome {
                    Outcome::LeaseGranted { .. } => self.report.checkouts += 1,
                    _ => self.report.denials += 1,
                }
            } else if let Some(lease) = self.servers[i]
                .ledger
                .leases()
                .into_iter()
                .find(|l| l.station == station)
            {
                self.apply(
                    i,
                    Command::Checkin {
                        lease_id: lease.lease_id,
                    },
                );
            }
        }
    }

    /// An administrator donates (or changes a donation) to a child from a pool it holds.
    fn administer(&mut self, i: usize) {
        // Administrators act while faults happen; after that the network is left to settle,
        // so convergence measures the protocol alone.
        if !self.faulty() || self.servers[i].children.is_empty() || !self.rng.chance(0.1) {
            return;
        }
        let child = self.servers[i].children
            [self.rng.below(self.servers[i].children.len() as u64) as usize];
        let local = self.servers[i].now(self.now_ms);
        let pools: Vec<(String, u32, i64)> = self.servers[i]
            .ledger
            .keys(local)
            .into_iter()
            .map(|k| {
                let until = match &k.received {
                    Some(r) => r.grant.last().donation_until_ms(),
                    None => k.key.payload.valid_until_ms(),
                };
                (k.id, k.licenses, until)
            })
            .collect();
        if pools.is_empty() {
            return;
        }
        let (pool, licenses, until_max) =
            pools[self.rng.below(pools.len() as u64) as usize].clone();
        let ended = self.rng.chance(0.1);
        let command = if ended {
            Command::EndDonation {
                key_id: pool,
                to: self.servers[child].id.clone(),
            }
        } else {
            let count = 1 + self.rng.below(u64::from(licenses / 2).max(1)) as u32;
            let until = (local + self.rng.range(1, 40) * DAY_MS).min(until_max);
            Command::Donate {
                key_id: pool,
                to: self.servers[child].id.clone(),
                receiver_public_key: self.servers[child].secret.public_key().to_base64(),
                licenses: count,
                until_ms: until,
                renewal_period_ms: self.config.renewal_period_ms,
            }
        };
        if let Outcome::Donated { .. } | Outcome::DonationEnded { .. } = self.apply(i, command) {
            self.report.donations += 1;
            let grants = self.grants_for(i, &self.servers[child].id.clone());
            self.send(i, child, Msg::Grants(grants));
        }
    }

    /// The link schedule of a live server, as in the real server.
    fn links(&mut self, i: usize) {
        let local = self.servers[i].now(self.now_ms);
        let sync = self.config.sync_period_ms;
        if let Some(parent) = self.servers[i].parent {
            let donor = self.servers[parent].id.clone();
            let half_gone = self.servers[i].ledger.received().iter().any(|(_, r)| {
                r.donor == donor
                    && r.usable_until_ms - local
                        < (r.usable_until_ms - r.grant.last().issued_at.as_millisecond()) / 2
            });
            if half_gone || local - self.servers[i].last_renew_ms >= sync {
                self.servers[i].last_renew_ms = local;
                self.send(i, parent, Msg::Renew);
            }
        }
        if local - self.servers[i].last_push_ms >= sync {
            self.servers[i].last_push_ms = local;
            for child in self.servers[i].children.clone() {
                let grants = self.grants_for(i, &self.servers[child].id.clone());
                self.send(i, child, Msg::Grants(grants));
            }
        }
    }

    /// Leases held across the network per vendor key must not exceed the key.
    fn check_safety(&mut self) -> Result<(), Violation> {
        let mut held: BTreeMap<String, u32> = BTreeMap::new();
        for server in &self.servers {
            let local = server.now(self.now_ms);
            for lease in server.ledger.leases() {
                if lease.expires_at_ms > local {
                    let vendor_key = lease.key_id.split('@').next().unwrap_or("").to_string();
                    *held.entry(vendor_key).or_default() += 1;
                }
            }
        }
        for (key_id, count) in &held {
            self.report.peak_held = self.report.peak_held.max(*count);
            let licenses = self.keys.get(key_id).copied().unwrap_or(0);
            if *count > licenses {
                return Err(Violation {
                    reproduce: format!(
                        "cargo run -p tessera-sim --release -- --seed {} --servers {} --days {}{}{}",
                        self.config.seed,
                        self.config.servers,
                        self.config.days,
                        self.config.flags,
                        if self.config.ignore_skew_margin {
                            " --ignore-skew-margin"
                        } else {
                            ""
                        }
                    ),
                    seed: self.config.seed,
                    step: self.step,
                    message: format!(
                        "key {key_id}: {count} leases held across the network, {licenses} licenses"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Whether every running donation's latest grant is what its receiver holds.
    fn converged(&self) -> bool {
        self.first_disagreement().is_none()
    }

    /// The first donation whose receiver does not hold its latest grant, in words.
    pub fn first_disagreement(&self) -> Option<String> {
        self.servers.iter().find_map(|donor| {
            let local = donor.now(self.now_ms);
            donor.ledger.donations().iter().find_map(|d| {
                let agrees = self.agrees(donor, d, local);
                (!agrees).then(|| {
                    let held = self.servers.iter().find(|s| s.id == d.to).map(|s| {
                        s.ledger
                            .received()
                            .into_iter()
                            .map(|(id, r)| {
                                format!(
                                    "{id} serial {} licenses {} until {}",
                                    r.serial, r.licenses, r.usable_until_ms
                                )
                            })
                            .collect::<Vec<_>>()
                    });
                    format!(
                        "{} → {}: {d:?}; receiver holds {held:?} at {}",
                        donor.id, d.to, local
                    )
                })
            })
        })
    }

    fn agrees(&self, donor: &Server, d: &tessera_core::Donation, local: i64) -> bool {
        {
            {
                if d.ended || d.donation_until_ms <= local || d.outstanding.is_empty() {
                    return true;
                }
                let Some(receiver) = self.servers.iter().find(|s| s.id == d.to) else {
                    return false;
                };
                let Some(latest) = d.outstanding.iter().max_by_key(|o| o.serial) else {
                    return true;
                };
                let pool = tessera_core::received_pool_id(
                    d.key_id.split('@').next().unwrap_or(""),
                    &donor.id,
                );
                receiver.ledger.received().iter().any(|(id, r)| {
                    *id == pool && r.serial >= latest.serial && r.licenses == latest.licenses
                }) || latest.lease_until_ms - self.config.clock_skew_max_ms <= local
            }
        }
    }

    pub fn run(&mut self) -> Result<(), Violation> {
        let end = START_MS + self.config.days * DAY_MS;
        let mut healed_at: Option<i64> = None;
        while self.now_ms < end {
            self.step += 1;
            self.now_ms += self.config.step_ms;
            self.faults();
            if !self.faulty() && healed_at.is_none() {
                healed_at = Some(self.now_ms);
            }
            while let Some(entry) = self.queue.first_entry() {
                if entry.key().0 > self.now_ms {
                    break;
                }
                let message = entry.remove();
                self.deliver(message);
            }
            // Measured here, when every message due by now (answers included) has arrived.
            if let Some(healed) = healed_at
                && self.report.convergence_sync_periods.is_none()
                && self.converged()
            {
                self.report.convergence_sync_periods =
                    Some(((self.now_ms - healed) / self.config.sync_period_ms) as u64);
            }
            for i in 0..self.servers.len() {
                if !self.up(i) {
                    continue;
                }
                self.stations(i);
                self.administer(i);
                self.links(i);
            }
            self.check_safety()?;
        }
        self.report.steps = self.step;
        if self.report.convergence_sync_periods.is_none() {
            self.report.disagreement = self.first_disagreement();
        }
        Ok(())
    }
}
