//! The simulated network: servers, stations, messages, faults and the checks.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};

use jiff::Timestamp;
use tessera_core::grant::GRANT_CHAIN_MAX;
use tessera_core::{
    Command, Donation, Grant, GrantSource, KeyState, KeyView, LeaseView, Ledger, LedgerConfig,
    LedgerSnapshot, LicenseKey, LicenseKeyPayload, Outcome, Received, Refusal, SecretKey, Stamped,
    received_pool_id,
};

use tessera_engine::link::{
    self, Connection, Held, LinkAction, LinkMemory, LinkTiming, Returned, Roles, vendor_key_id,
};

use crate::rng::Rng;
use crate::{BrokenRule, DAY_MS, HOUR_MS, MINUTE_MS, SimConfig, SimReport, Violation};

/// Simulated time starts here (2027-01-15T08:00:00Z).
const START_MS: i64 = 1_800_000_000_000;
/// How many recent link events are kept for a failure's trace.
const TRACE_LEN: usize = 400;
/// Old grant messages kept for replays.
const REPLAYABLE_LEN: usize = 128;
/// A station that could not reach its server tries again this soon.
const STATION_RETRY_MS: i64 = 5 * MINUTE_MS;

/// When a station counts as holding a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeldRule {
    /// The station's view (the default, conservative): from the grant until the station
    /// checks in, is told at a heartbeat that the lease is gone, or its server's clock reaches
    /// the expiry it was last told.
    Station,
    /// The ledgers' view: a lease counts while its ledger holds it and its server's clock is
    /// before its `expires_at_ms`. Weaker: a lease the ledger ended counts no more, even if its
    /// station has not heard yet.
    Ledger,
}

impl HeldRule {
    pub fn flag(self) -> &'static str {
        match self {
            HeldRule::Station => "station",
            HeldRule::Ledger => "ledger",
        }
    }

    pub fn parse(text: &str) -> Option<HeldRule> {
        [HeldRule::Station, HeldRule::Ledger]
            .into_iter()
            .find(|rule| rule.flag() == text)
    }
}

/// A server's clock: true time plus a drift that changes at `rate_ppm` from an anchor and is
/// clamped to ±`max`. Monotonic, since the rate is far below one.
#[derive(Clone, Debug)]
struct DriftClock {
    anchor_ms: i64,
    anchor_drift_ms: i64,
    rate_ppm: i64,
    max_ms: i64,
}

impl DriftClock {
    fn drift(&self, t: i64) -> i64 {
        (self.anchor_drift_ms + self.rate_ppm * (t - self.anchor_ms) / 1_000_000)
            .clamp(-self.max_ms, self.max_ms)
    }

    fn local(&self, t: i64) -> i64 {
        t + self.drift(t)
    }

    fn set_rate(&mut self, t: i64, rate_ppm: i64) {
        self.anchor_drift_ms = self.drift(t);
        self.anchor_ms = t;
        self.rate_ppm = rate_ppm;
    }
}

#[derive(Clone, Debug)]
enum StationState {
    Idle,
    Holding {
        lease_id: String,
        /// As the station was last told, in its server's clock.
        expires_at_ms: i64,
        /// True time the session ends.
        session_end: i64,
    },
}

#[derive(Clone, Debug)]
struct Station {
    name: String,
    component: &'static str,
    state: StationState,
}

struct Server {
    id: String,
    secret: SecretKey,
    public_key: String,
    ledger_config: LedgerConfig,
    ledger: Ledger,
    clock: DriftClock,
    parent: Option<usize>,
    depth: usize,
    children: Vec<usize>,
    /// Servers this one may donate to (children, then peers), and receive from.
    sends_to: Vec<usize>,
    receives_from: Vec<usize>,
    /// Down: the durable state as it was at the crash.
    down: Option<LedgerSnapshot>,
    restarts: u64,
    incarnation: u64,
    /// What it remembers of each link (the engine's [`LinkMemory`]); lost when it crashes,
    /// as in the server, where it is per-host memory.
    links: BTreeMap<usize, LinkMemory>,
    /// True time of the pending timer event (older ones are stale).
    timer_at: Option<i64>,
    /// Per received grant, as of the last apply that may have changed them: (donor, issued
    /// at, lease until, usable until), for the renewal schedule.
    renew_points: Vec<(String, i64, i64, i64)>,
    stations: Vec<Station>,
    lease_seq: u64,
}

#[derive(Clone, Debug)]
enum Body {
    /// Donor → receiver.
    Push {
        grants: Vec<Grant>,
        returned_request: bool,
    },
    /// Receiver → donor, answering a push.
    HeldAnswer {
        held: Vec<Held>,
        held_before: Vec<Held>,
        returned: Vec<Returned>,
    },
    /// Receiver → donor.
    Renew {
        held: Vec<Held>,
        returned: Vec<Returned>,
    },
    /// Donor → receiver, answering a renew.
    Renewed {
        grants: Vec<Grant>,
        returned_request: bool,
        echo: Vec<Returned>,
    },
}

impl Body {
    fn name(&self) -> &'static str {
        match self {
            Body::Push { .. } => "push",
            Body::HeldAnswer { .. } => "held",
            Body::Renew { .. } => "renew",
            Body::Renewed { .. } => "renewed",
        }
    }
}

#[derive(Clone, Debug)]
struct Message {
    from: usize,
    to: usize,
    /// The sender's clock when it sent the message.
    sent_at_ms: i64,
    /// The receiver's incarnation when the message was sent: a crash in between loses it
    /// (the connection broke).
    to_incarnation: u64,
    /// The sender's incarnation, so the answer goes to the same one.
    from_incarnation: u64,
    body: Body,
}

enum Event {
    Deliver(Box<Message>),
    Station { server: usize, station: usize },
    Timer { server: usize },
    Admin { server: usize },
    Crash,
    Restart { server: usize },
    Partition,
    Heal { cut: u64 },
    Replay,
    Drift,
    Quiet,
    ConvergenceCheck,
}

struct Cut {
    id: u64,
    /// The subtree cut off from the rest of the network.
    root: usize,
}

/// What a server could grant from one pool, as of its last apply, as time passes without
/// another apply: `(until, free)` segments in the server's clock. Only the decreases that
/// come by themselves are modelled (the pool's end, an earlier larger grant lapsing); the
/// increases (leases or donations running out) happen in the ledger at its next apply, which
/// recomputes this.
#[derive(Clone, Debug)]
struct PoolFree {
    pool: String,
    key: usize,
    segments: Vec<(i64, u32)>,
}

impl PoolFree {
    fn of(key: usize, view: &KeyView) -> PoolFree {
        let busy = view.in_use + view.ended_early + view.donated;
        let key_until = view.key.payload.valid_until_ms();
        let segments = match &view.received {
            None => vec![(key_until, view.licenses.saturating_sub(busy))],
            Some(rc) => {
                let until = key_until.min(rc.usable_until_ms);
                let mut ends: Vec<i64> = rc
                    .floor
                    .iter()
                    .map(|(_, end)| *end)
                    .filter(|end| *end < until)
                    .collect();
                ends.sort_unstable();
                ends.push(until);
                let mut from = i64::MIN;
                ends.into_iter()
                    .map(|end| {
                        // Capacity while the larger grants still valid after `from` count.
                        let capacity = rc
                            .floor
                            .iter()
                            .filter(|(_, until)| *until > from)
                            .map(|(licenses, _)| *licenses)
                            .fold(rc.licenses, u32::max);
                        from = end;
                        (end, capacity.saturating_sub(busy))
                    })
                    .collect()
            }
        };
        PoolFree {
            pool: view.id.clone(),
            key,
            segments,
        }
    }

    fn free_at(&self, local: i64) -> u32 {
        self.segments
            .iter()
            .find(|(until, _)| local < *until)
            .map_or(0, |(_, free)| *free)
    }
}

struct VendorKey {
    id: String,
    licenses: u32,
}

pub(crate) fn run(config: SimConfig) -> Result<SimReport, Violation> {
    let seed = config.seed;
    let reproduce = config.reproduce();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut world = World::new(config);
        world.run();
        match world.failed.take() {
            Some(violation) => Err(violation),
            None => Ok(world.report),
        }
    }));
    match result {
        Ok(outcome) => outcome,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic without a message".into());
            Err(Violation {
                seed,
                step: 0,
                message: format!("panicked: {message}"),
                trace: Vec::new(),
                reproduce,
            })
        }
    }
}

struct World {
    /// Per link (donor, receiver): permanent or periodic.
    connections: BTreeMap<(usize, usize), Connection>,
    config: SimConfig,
    /// Separate generators per concern: changing how stations behave does not move faults.
    net_rng: Rng,
    fault_rng: Rng,
    admin_rng: Rng,
    station_rng: Rng,
    servers: Vec<Server>,
    index: BTreeMap<String, usize>,
    /// Stations below each server in the tree (itself included): how donations are sized.
    weight: Vec<usize>,
    keys: Vec<VendorKey>,
    key_index: BTreeMap<String, usize>,
    queue: BTreeMap<(i64, u64), Event>,
    seq: u64,
    now: i64,
    end: i64,
    quiet_at: i64,
    faulty: bool,
    cuts: Vec<Cut>,
    next_cut: u64,
    /// Per vendor key: (server, lease id) → expiry as its station knows it (server clock).
    held: Vec<BTreeMap<(usize, String), i64>>,
    /// Per server: what it could grant, per pool, as of its last apply.
    issuable: Vec<Vec<PoolFree>>,
    replayable: VecDeque<(usize, Vec<Grant>)>,
    /// (donor, receiver) pairs whose renewal the donor answered since the faults stopped.
    renewed_since_quiet: BTreeSet<(usize, usize)>,
    /// Donations (donor, pool, receiver) a donor left lapsed when asked to renew, although it
    /// had licenses for them.
    left_lapsed: BTreeSet<(usize, String, usize)>,
    trace: VecDeque<(i64, String)>,
    failed: Option<Violation>,
    report: SimReport,
}

fn ms(t: i64) -> Timestamp {
    Timestamp::from_millisecond(t).expect("simulated times are in range")
}

impl World {
    fn new(config: SimConfig) -> World {
        assert!(config.servers >= 1, "at least one server");
        assert!(
            2 * config.drift_max_ms <= config.clock_skew_max_ms,
            "two clocks must stay within clock_skew_max of each other: drift_max_ms ≤ clock_skew_max_ms / 2"
        );
        let mut root_rng = Rng::new(config.seed);
        let mut topo_rng = root_rng.fork(1);
        let net_rng = root_rng.fork(2);
        let fault_rng = root_rng.fork(3);
        let admin_rng = root_rng.fork(4);
        let station_rng = root_rng.fork(5);
        let mut clock_rng = root_rng.fork(6);
        let vendor = SecretKey::from_seed([0x5E; 32]);
        let ledger_skew = match config.broken {
            Some(BrokenRule::NoSkewMargin) => 0,
            _ => config.clock_skew_max_ms,
        };
        let start = START_MS;
        let mut servers: Vec<Server> = Vec::with_capacity(config.servers);
        let mut parents: Vec<Option<usize>> = Vec::with_capacity(config.servers);
        for i in 0..config.servers {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&topo_rng.next_u64().to_le_bytes());
            seed[8..16].copy_from_slice(&(i as u64).to_le_bytes());
            let secret = SecretKey::from_seed(seed);
            let id = format!("s{i:03}");
            let ledger_config = LedgerConfig {
                trusted_vendors: vec![vendor.public_key()],
                server_id: Some(id.clone()),
                server_public_key: Some(secret.public_key()),
                clock_skew_max_ms: ledger_skew,
            };
            let parent = if i == 0 {
                None
            } else {
                let eligible: Vec<usize> = (0..i)
                    .filter(|&j| servers[j].depth < config.max_depth)
                    .collect();
                Some(eligible[topo_rng.index(eligible.len())])
            };
            let depth = parent.map_or(0, |p| servers[p].depth + 1);
            let clock = DriftClock {
                anchor_ms: start,
                anchor_drift_ms: clock_rng.range(-config.drift_max_ms, config.drift_max_ms),
                rate_ppm: clock_rng.range(-config.drift_rate_ppm, config.drift_rate_ppm),
                max_ms: config.drift_max_ms,
            };
            let stations = (0..config.stations_per_server)
                .map(|n| Station {
                    name: format!("{id}-w{n}"),
                    component: if topo_rng.below(10) < 7 { "cad" } else { "cam" },
                    state: StationState::Idle,
                })
                .collect();
            servers.push(Server {
                public_key: secret.public_key().to_base64(),
                id,
                secret,
                ledger: Ledger::new(ledger_config.clone()),
                ledger_config,
                clock,
                parent,
                depth,
                children: Vec::new(),
                sends_to: Vec::new(),
                receives_from: Vec::new(),
                down: None,
                restarts: 0,
                incarnation: 0,
                links: BTreeMap::new(),
                timer_at: None,
                renew_points: Vec::new(),
                stations,
                lease_seq: 0,
            });
            parents.push(parent);
            if let Some(p) = parent {
                servers[p].children.push(i);
                servers[p].sends_to.push(i);
                servers[i].receives_from.push(p);
            }
        }
        // Peer links: a donor and a receiver that are not parent and child; never to the
        // root, which holds the vendor keys itself.
        let mut peers = BTreeSet::new();
        let mut attempts = 0;
        while peers.len() < config.peer_links && config.servers > 3 && attempts < 1000 {
            attempts += 1;
            let a = topo_rng.index(config.servers);
            let b = 1 + topo_rng.index(config.servers - 1);
            if a == b
                || parents[b] == Some(a)
                || parents[a] == Some(b)
                || servers[a].depth >= config.max_depth
                || !peers.insert((a, b))
            {
                continue;
            }
            servers[a].sends_to.push(b);
            servers[b].receives_from.push(a);
        }
        // Which links are periodic connections (their own stream: the topology's draws stay).
        let mut link_rng = root_rng.fork(7);
        let mut connections = BTreeMap::new();
        for (d, server) in servers.iter().enumerate() {
            for &r in &server.sends_to {
                let connection = if link_rng.chance_ppm(config.periodic_ppm) {
                    Connection::Periodic {
                        reconnect_ms: config.reconnect_ms,
                    }
                } else {
                    Connection::Permanent
                };
                connections.insert((d, r), connection);
            }
        }
        let mut weight = vec![config.stations_per_server; config.servers];
        for i in (1..config.servers).rev() {
            if let Some(p) = parents[i] {
                weight[p] += weight[i];
            }
        }
        let index = servers
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        let end = start + config.days * DAY_MS;
        let quiet_at = start + config.fault_days.min(config.days) * DAY_MS;
        let mut world = World {
            connections,
            net_rng,
            fault_rng,
            admin_rng,
            station_rng,
            servers,
            index,
            weight,
            keys: Vec::new(),
            key_index: BTreeMap::new(),
            queue: BTreeMap::new(),
            seq: 0,
            now: start,
            end,
            quiet_at,
            faulty: true,
            cuts: Vec::new(),
            next_cut: 0,
            held: Vec::new(),
            issuable: Vec::new(),
            replayable: VecDeque::new(),
            renewed_since_quiet: BTreeSet::new(),
            left_lapsed: BTreeSet::new(),
            trace: VecDeque::new(),
            failed: None,
            report: SimReport {
                seed: config.seed,
                ..SimReport::default()
            },
            config,
        };
        world.issuable = (0..world.servers.len()).map(|_| Vec::new()).collect();
        let valid_until = end + 60 * DAY_MS;
        for spec in world.config.keys.clone() {
            let key = LicenseKey::sign(
                LicenseKeyPayload {
                    key_id: spec.key_id.clone(),
                    customer: "sim".into(),
                    components: spec.components.clone(),
                    licenses: spec.licenses,
                    valid_from: ms(start - DAY_MS),
                    valid_until: ms(valid_until),
                    server_id: None,
                    renews: None,
                    certified_server_required: false,
                    max_borrow_days: 0,
                    grace_minutes: 0,
                    issued_at: ms(start - DAY_MS),
                },
                &vendor,
            )
            .expect("the vendor key signs");
            world
                .key_index
                .insert(spec.key_id.clone(), world.keys.len());
            world.keys.push(VendorKey {
                id: spec.key_id.clone(),
                licenses: spec.licenses,
            });
            world.held.push(BTreeMap::new());
            world
                .report
                .peak_held
                .insert(spec.key_id.clone(), (0, spec.licenses));
            match world.apply(0, Command::ImportKey { key }) {
                Outcome::KeyImported { .. } => {}
                other => panic!("the root could not import {}: {other:?}", spec.key_id),
            }
        }
        world.schedule_start();
        world
    }

    fn schedule_start(&mut self) {
        let start = self.now;
        for i in 0..self.servers.len() {
            for s in 0..self.servers[i].stations.len() {
                let at = start + self.station_rng.range(0, 4 * HOUR_MS);
                self.schedule(
                    at,
                    Event::Station {
                        server: i,
                        station: s,
                    },
                );
            }
            let at = start + self.net_rng.range(0, self.config.tick_ms);
            self.arm_timer_at(i, at);
            if !self.servers[i].sends_to.is_empty() {
                // Administrators provision the tree top down: a level acts once its grants
                // have had time to arrive.
                let at = start
                    + self.servers[i].depth as i64 * 2 * HOUR_MS
                    + self.admin_rng.range(0, HOUR_MS);
                self.schedule(at, Event::Admin { server: i });
            }
        }
        let wait = self.fault_rng.exponential(self.config.crash_interval_ms);
        self.schedule(start + wait, Event::Crash);
        let wait = self
            .fault_rng
            .exponential(self.config.partition_interval_ms);
        self.schedule(start + wait, Event::Partition);
        let wait = self.fault_rng.exponential(self.config.replay_interval_ms);
        self.schedule(start + wait, Event::Replay);
        self.schedule(start + DAY_MS, Event::Drift);
        self.schedule(self.quiet_at, Event::Quiet);
    }

    /// Schedules an event on the first step at or after `at` (never in the past).
    fn schedule(&mut self, at: i64, event: Event) -> i64 {
        let step = self.config.step_ms;
        let at = at.max(self.now);
        let at = START_MS + (at - START_MS + step - 1) / step * step;
        self.seq += 1;
        self.queue.insert((at, self.seq), event);
        at
    }

    fn run(&mut self) {
        while let Some(((at, _), event)) = self.queue.pop_first() {
            if at > self.end || self.failed.is_some() {
                break;
            }
            self.now = at;
            self.report.events += 1;
            self.handle(event);
        }
        self.now = self.end;
        self.report.steps = ((self.end - START_MS) / self.config.step_ms) as u64;
        if self.failed.is_none() && self.report.convergence_sync_periods.is_none() {
            self.report.disagreement = self.first_disagreement();
        }
    }

    fn step(&self) -> u64 {
        ((self.now - START_MS) / self.config.step_ms) as u64
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Deliver(message) => self.deliver(*message),
            Event::Station { server, station } => self.station(server, station),
            Event::Timer { server } => self.timer(server),
            Event::Admin { server } => self.admin(server),
            Event::Crash => self.crash_some(),
            Event::Restart { server } => self.restart(server),
            Event::Partition => self.partition(),
            Event::Heal { cut } => self.cuts.retain(|c| c.id != cut),
            Event::Replay => self.replay(),
            Event::Drift => self.drift(),
            Event::Quiet => self.quiet(),
            Event::ConvergenceCheck => self.convergence_check(),
        }
    }

    // ---- clocks and the ledger ----

    fn local(&self, i: usize) -> i64 {
        self.servers[i].clock.local(self.now)
    }

    fn up(&self, i: usize) -> bool {
        self.servers[i].down.is_none()
    }

    /// Applies a command on server `i`, stamped with its clock.
    fn apply(&mut self, i: usize, command: Command) -> Outcome {
        let at_ms = self.local(i);
        debug_assert!(self.up(i), "a crashed server applies nothing");
        // Whether this apply may change what the server could grant: anything but a
        // heartbeat or a refused checkout, unless a lease or grant is due to end first.
        let due = self.servers[i]
            .ledger
            .next_expiry_ms()
            .is_some_and(|due| due <= at_ms);
        let station_request = matches!(
            command,
            Command::Heartbeat { .. } | Command::Checkout { .. }
        );
        let outcome = self.servers[i].ledger.apply(&Stamped { at_ms, command });
        self.report.applies += 1;
        // A station request that changed nothing else: a heartbeat, a refusal, the lease the
        // station already held, or a new lease (one license less to grant from its pool).
        let new_lease = match &outcome {
            Outcome::LeaseGranted {
                lease,
                created: true,
            } => Some(lease.key_id.clone()),
            _ => None,
        };
        let unchanged = matches!(
            outcome,
            Outcome::Refused { .. }
                | Outcome::LeaseRenewed { .. }
                | Outcome::LeaseGranted { created: false, .. }
        );
        if due || !station_request || !(unchanged || new_lease.is_some()) {
            self.refresh_issuable(i);
        } else if let Some(pool) = new_lease {
            for cached in self.issuable[i].iter_mut().filter(|p| p.pool == pool) {
                for segment in &mut cached.segments {
                    segment.1 = segment.1.saturating_sub(1);
                }
            }
        }
        // Debug builds check inside `apply`; release builds of the simulation check here.
        #[cfg(not(debug_assertions))]
        if let Err(violation) = self.servers[i].ledger.check_invariants() {
            let message = format!(
                "ledger invariant of {} violated: {violation}",
                self.servers[i].id
            );
            self.fail(i, message, None);
        }
        self.rearm_for_expiry(i);
        outcome
    }

    /// The server's timer runs at its next lease or grant expiry if that comes before the
    /// pending tick.
    fn rearm_for_expiry(&mut self, i: usize) {
        let Some(expiry) = self.servers[i].ledger.next_expiry_ms() else {
            return;
        };
        let local = self.local(i);
        if expiry <= local {
            return;
        }
        let at = self.now + (expiry - local);
        if self.servers[i].timer_at.is_none_or(|pending| at < pending) {
            self.arm_timer_at(i, at);
        }
    }

    fn arm_timer_at(&mut self, i: usize, at: i64) {
        let at = self.schedule(at, Event::Timer { server: i });
        self.servers[i].timer_at = Some(at);
    }

    fn note(&mut self, line: String) {
        if self.trace.len() == TRACE_LEN {
            self.trace.pop_front();
        }
        self.trace.push_back((self.now, line));
    }

    fn fail(&mut self, server: usize, message: String, key: Option<&str>) {
        if self.failed.is_some() {
            return;
        }
        let mut trace: Vec<String> = self
            .trace
            .iter()
            .rev()
            .filter(|(_, line)| key.is_none_or(|k| line.contains(k)))
            .take(40)
            .map(|(at, line)| format!("step {}: {line}", (at - START_MS) / self.config.step_ms))
            .collect();
        trace.reverse();
        self.failed = Some(Violation {
            seed: self.config.seed,
            step: self.step(),
            message: format!(
                "at server {} (day {:.2}): {message}",
                self.servers[server].id,
                (self.now - START_MS) as f64 / DAY_MS as f64
            ),
            trace,
            reproduce: self.config.reproduce(),
        });
    }

    // ---- the checks ----

    /// A station got (or kept) a lease: record it and check its vendor key.
    fn hold(&mut self, i: usize, lease: &LeaseView) {
        let k = self.key_index[vendor_key_id(&lease.key_id)];
        self.held[k].insert((i, lease.lease_id.clone()), lease.expires_at_ms);
        self.check_key(k, i);
    }

    fn unhold(&mut self, i: usize, lease_id: &str) {
        for held in &mut self.held {
            held.remove(&(i, lease_id.to_string()));
        }
    }

    /// Leases of vendor key `k` held across the network now, by the configured rule.
    fn held_count(&mut self, k: usize, locals: &[i64]) -> u32 {
        // Expired by their server's clock: gone for good (clocks never go back, and an
        // expired lease is never extended).
        // With the ledgers' view, leases a ledger ended were dropped when it ended them.
        self.held[k].retain(|(i, _), expires_at| locals[*i] < *expires_at);
        self.held[k].len() as u32
    }

    /// Licenses of vendor key `k` that server `i` could grant now, from its last apply.
    fn issuable(&self, i: usize, k: usize, local: i64) -> u32 {
        self.issuable[i]
            .iter()
            .filter(|pool| pool.key == k)
            .map(|pool| pool.free_at(local))
            .sum()
    }

    /// After an apply on server `i`: what it could grant now, per pool. When that grew for a
    /// key, the no-double-count check runs for it.
    fn refresh_issuable(&mut self, i: usize) {
        let local = self.local(i);
        let before: Vec<u32> = (0..self.keys.len())
            .map(|k| self.issuable(i, k, local))
            .collect();
        let views = self.servers[i].ledger.keys(local);
        self.servers[i].renew_points = views
            .iter()
            .filter_map(|v| v.received.as_ref())
            .map(|rc| {
                let grant = rc.grant.last();
                (
                    rc.donor.clone(),
                    grant.issued_at.as_millisecond(),
                    grant.lease_until_ms(),
                    rc.usable_until_ms,
                )
            })
            .collect();
        self.issuable[i] = views
            .iter()
            .filter(|v| v.state == KeyState::Active)
            .filter_map(|v| {
                let k = *self.key_index.get(v.key.payload.key_id.as_str())?;
                Some(PoolFree::of(k, v))
            })
            .collect();
        if self.config.held_rule == HeldRule::Ledger {
            // The ledgers' view: a lease its ledger ended counts no more.
            let live: BTreeSet<String> = self.servers[i]
                .ledger
                .leases()
                .into_iter()
                .map(|lease| lease.lease_id)
                .collect();
            for held in &mut self.held {
                held.retain(|(server, lease_id), _| *server != i || live.contains(lease_id));
            }
        }
        for (k, before) in before.into_iter().enumerate() {
            if self.issuable(i, k, local) > before {
                self.check_key(k, i);
            }
        }
    }

    /// The checks for vendor key `k`, right after something on server `trigger` changed:
    /// **safety** — leases held across the network ≤ licenses; and the stronger **no double
    /// count** — leases held plus licenses some server could still grant now ≤ licenses
    /// (which does not need demand to show a license counted on two servers).
    fn check_key(&mut self, k: usize, trigger: usize) {
        let locals: Vec<i64> = (0..self.servers.len()).map(|i| self.local(i)).collect();
        let held = self.held_count(k, &locals);
        let issuable: u32 = (0..self.servers.len())
            .map(|i| self.issuable(i, k, locals[i]))
            .sum();
        let key = &self.keys[k];
        let licenses = key.licenses;
        let peak = self
            .report
            .peak_held
            .get_mut(&key.id)
            .expect("every key has a peak");
        peak.0 = peak.0.max(held);
        let double_counted = self.config.check_double_count && held + issuable > licenses;
        if held <= licenses && !double_counted {
            return;
        }
        let what = if held > licenses {
            format!(
                "SAFETY: {held} leases held by stations across the network, {licenses} licenses"
            )
        } else {
            format!(
                "DOUBLE COUNT: {held} leases held + {issuable} licenses servers could grant now = {} > {licenses} licenses",
                held + issuable
            )
        };
        let mut servers: BTreeSet<usize> = self.held[k].keys().map(|(i, _)| *i).collect();
        servers.extend((0..self.servers.len()).filter(|&i| self.issuable(i, k, locals[i]) > 0));
        let breakdown: Vec<String> = servers
            .into_iter()
            .map(|i| {
                let server = &self.servers[i];
                let mine: Vec<&String> = self.held[k]
                    .keys()
                    .filter(|(s, _)| *s == i)
                    .map(|(_, lease_id)| lease_id)
                    .collect();
                let gone = mine
                    .iter()
                    .filter(|lease_id| server.ledger.lease(lease_id).is_none())
                    .count();
                let pools: Vec<String> = server
                    .ledger
                    .keys(locals[i])
                    .into_iter()
                    .filter(|v| v.key.payload.key_id == key.id)
                    .map(|v| {
                        format!(
                            "{} {} in use + {} donated of {}",
                            v.id, v.in_use, v.donated, v.licenses
                        )
                    })
                    .collect();
                format!(
                    "{}{}: {} held{}, {} grantable [{}]",
                    server.id,
                    if server.down.is_some() { " (down)" } else { "" },
                    mine.len(),
                    if gone > 0 {
                        format!(" ({gone} already ended in its ledger, station not told yet)")
                    } else {
                        String::new()
                    },
                    self.issuable(i, k, locals[i]),
                    pools.join(", ")
                )
            })
            .collect();
        let key_id = key.id.clone();
        self.fail(
            trigger,
            format!(
                "key {key_id}: {what} (held rule: {}); per server: {}",
                self.config.held_rule.flag(),
                breakdown.join("; ")
            ),
            Some(&key_id),
        );
    }

    // ---- stations ----

    fn station(&mut self, i: usize, s: usize) {
        let state = self.servers[i].stations[s].state.clone();
        let up = self.up(i);
        let local = self.local(i);
        match state {
            StationState::Idle => {
                if !up {
                    self.schedule(
                        self.now + STATION_RETRY_MS,
                        Event::Station {
                            server: i,
                            station: s,
                        },
                    );
                    return;
                }
                let server = &mut self.servers[i];
                server.lease_seq += 1;
                let lease_id = format!("{}-l{}", server.id, server.lease_seq);
                let station = &server.stations[s];
                let command = Command::Checkout {
                    lease_id,
                    component: station.component.into(),
                    station: station.name.clone(),
                    user: "user".into(),
                    host: station.name.clone(),
                    lease_ttl_ms: self.config.lease_ttl_ms,
                    borrow_ms: 0,
                };
                match self.apply(i, command) {
                    Outcome::LeaseGranted { lease, created } => {
                        if created {
                            self.report.checkouts += 1;
                        }
                        self.hold(i, &lease);
                        let session_end =
                            self.now + self.station_rng.exponential(self.config.session_mean_ms);
                        self.servers[i].stations[s].state = StationState::Holding {
                            lease_id: lease.lease_id,
                            expires_at_ms: lease.expires_at_ms,
                            session_end,
                        };
                        let next = (self.now + self.config.heartbeat_ms).min(session_end);
                        self.schedule(
                            next,
                            Event::Station {
                                server: i,
                                station: s,
                            },
                        );
                    }
                    Outcome::Refused { refusal } => {
                        self.report.denials += 1;
                        // All in use: the user tries again later. Nothing licensed here at
                        // all: much later.
                        let retry = match refusal {
                            Refusal::NoLicensesAvailable { .. } => self
                                .station_rng
                                .range(self.config.retry_ms.0, self.config.retry_ms.1),
                            Refusal::ComponentNotLicensed { .. } => {
                                self.station_rng.range(4 * HOUR_MS, 12 * HOUR_MS)
                            }
                            other => panic!(
                                "unexpected checkout refusal at {}: {other:?}",
                                self.servers[i].id
                            ),
                        };
                        self.schedule(
                            self.now + retry,
                            Event::Station {
                                server: i,
                                station: s,
                            },
                        );
                    }
                    other => panic!(
                        "unexpected checkout outcome at {}: {other:?}",
                        self.servers[i].id
                    ),
                }
            }
            StationState::Holding {
                lease_id,
                expires_at_ms,
                session_end,
            } => {
                if local >= expires_at_ms {
                    // No heartbeat got through in time: the station lost its license.
                    self.report.leases_lapsed += 1;
                    self.servers[i].stations[s].state = StationState::Idle;
                    self.schedule(
                        self.now + STATION_RETRY_MS,
                        Event::Station {
                            server: i,
                            station: s,
                        },
                    );
                } else if self.now >= session_end {
                    if up {
                        // The station stops using the license, then checks it in.
                        self.unhold(i, &lease_id);
                        match self.apply(
                            i,
                            Command::Checkin {
                                lease_id: lease_id.clone(),
                            },
                        ) {
                            Outcome::LeaseReleased { .. }
                            | Outcome::Refused {
                                refusal: Refusal::LeaseNotFound { .. },
                            } => {}
                            other => panic!("unexpected checkin outcome: {other:?}"),
                        }
                    }
                    // Cannot reach its server: the station stops, the lease runs out (and is
                    // counted until then).
                    self.servers[i].stations[s].state = StationState::Idle;
                    let idle = self.station_rng.exponential(self.config.idle_mean_ms);
                    self.schedule(
                        self.now + idle,
                        Event::Station {
                            server: i,
                            station: s,
                        },
                    );
                } else if up {
                    self.report.heartbeats += 1;
                    match self.apply(
                        i,
                        Command::Heartbeat {
                            lease_id: lease_id.clone(),
                            lease_ttl_ms: self.config.lease_ttl_ms,
                        },
                    ) {
                        Outcome::LeaseRenewed { lease } => {
                            // The same lease, a later expiry: the count cannot grow.
                            let k = self.key_index[vendor_key_id(&lease.key_id)];
                            self.held[k].insert((i, lease.lease_id.clone()), lease.expires_at_ms);
                            self.servers[i].stations[s].state = StationState::Holding {
                                lease_id,
                                expires_at_ms: lease.expires_at_ms,
                                session_end,
                            };
                            let next = (self.now + self.config.heartbeat_ms).min(session_end);
                            self.schedule(
                                next,
                                Event::Station {
                                    server: i,
                                    station: s,
                                },
                            );
                        }
                        Outcome::Refused {
                            refusal: Refusal::LeaseNotFound { .. },
                        } => {
                            // The ledger ended it (a grant shrank, lapsed or was released):
                            // the station stops now and asks again.
                            self.report.leases_revoked += 1;
                            self.unhold(i, &lease_id);
                            self.servers[i].stations[s].state = StationState::Idle;
                            self.schedule(
                                self.now + STATION_RETRY_MS,
                                Event::Station {
                                    server: i,
                                    station: s,
                                },
                            );
                        }
                        other => panic!("unexpected heartbeat outcome: {other:?}"),
                    }
                } else {
                    // Server unreachable: keep the lease, try again soon.
                    let next = (self.now + STATION_RETRY_MS).min(session_end);
                    self.schedule(
                        next,
                        Event::Station {
                            server: i,
                            station: s,
                        },
                    );
                }
            }
        }
    }

    // ---- the server's timer: expiry and links ----

    fn timer(&mut self, i: usize) {
        if self.servers[i].timer_at != Some(self.now) {
            return;
        }
        self.servers[i].timer_at = None;
        if !self.up(i) {
            return;
        }
        let local = self.local(i);
        // The primary's schedule, as the server runs it: a lease due, or the time beacon.
        if tessera_engine::schedule::expire_due(local, &self.servers[i].ledger) {
            self.apply(i, Command::Expire);
        }
        // Each link's tick, as the server runs it (`LinkMemory::on_tick`), one role at a
        // time: the simulated servers send to and receive from different sets.
        let send = Roles {
            send: true,
            receive: false,
        };
        for r in self.servers[i].sends_to.clone() {
            let actions = self.link_memory(i, r).on_tick(
                local,
                &self.link_timing(),
                self.connection(i, r),
                send,
                [],
            );
            if actions.contains(&LinkAction::Push) {
                self.push(i, r);
            }
        }
        for d in self.servers[i].receives_from.clone() {
            if self.renewal_due(i, d, local) {
                self.renew(i, d);
            }
        }
        let tick = self.now + self.config.tick_ms;
        if self.servers[i]
            .timer_at
            .is_none_or(|pending| tick < pending)
        {
            self.arm_timer_at(i, tick);
        }
    }

    /// How donor `d` and receiver `r` keep in touch.
    fn connection(&self, d: usize, r: usize) -> Connection {
        self.connections
            .get(&(d, r))
            .copied()
            .unwrap_or(Connection::Permanent)
    }

    /// The engine's tick ([`LinkMemory::on_tick`]) for receiver `r` of donor `d`, on the
    /// grants' renewal points as of the last apply.
    fn renewal_due(&self, r: usize, d: usize, local: i64) -> bool {
        let donor = &self.servers[d].id;
        let points = self.servers[r]
            .renew_points
            .iter()
            .filter(|(from, ..)| from == donor)
            .map(|(_, issued, until, usable)| (*issued, *until, *usable));
        let receive = Roles {
            send: false,
            receive: true,
        };
        self.link_memory(r, d)
            .on_tick(
                local,
                &self.link_timing(),
                self.connection(d, r),
                receive,
                points,
            )
            .contains(&LinkAction::RequestRenewal)
    }

    /// The link timers of every simulated server.
    fn link_timing(&self) -> LinkTiming {
        LinkTiming {
            sync_period_ms: self.config.sync_period_ms,
            preliminary_renewal_ms: self.config.preliminary_renewal_ms,
            retry_ms: 0,
            skew_ms: self.config.clock_skew_max_ms,
        }
    }

    // ---- messages ----

    fn linked(&self, a: usize, b: usize) -> bool {
        !self
            .cuts
            .iter()
            .any(|cut| self.in_subtree(cut.root, a) != self.in_subtree(cut.root, b))
    }

    fn in_subtree(&self, root: usize, mut i: usize) -> bool {
        loop {
            if i == root {
                return true;
            }
            match self.servers[i].parent {
                Some(p) => i = p,
                None => return false,
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, body: Body, to_incarnation: Option<u64>) {
        self.report.messages += 1;
        let to_incarnation = to_incarnation.unwrap_or(self.servers[to].incarnation);
        if !self.up(to) || self.servers[to].incarnation != to_incarnation || !self.linked(from, to)
        {
            self.report.messages_lost += 1;
            return;
        }
        if self.faulty && self.net_rng.chance_ppm(self.config.loss_ppm) {
            self.report.messages_lost += 1;
            return;
        }
        if self.faulty
            && let Body::Push { grants, .. } | Body::Renewed { grants, .. } = &body
            && !grants.is_empty()
        {
            if self.replayable.len() == REPLAYABLE_LEN {
                self.replayable.pop_front();
            }
            self.replayable.push_back((to, grants.clone()));
        }
        let copies = if self.faulty && self.net_rng.chance_ppm(self.config.duplication_ppm) {
            self.report.messages_duplicated += 1;
            2
        } else {
            1
        };
        let message = Message {
            from,
            to,
            sent_at_ms: self.local(from),
            to_incarnation,
            from_incarnation: self.servers[from].incarnation,
            body,
        };
        for _ in 0..copies {
            let delay = if self.faulty {
                self.net_rng.range(0, self.config.delay_max_ms)
            } else {
                0
            };
            self.schedule(self.now + delay, Event::Deliver(Box::new(message.clone())));
        }
    }

    fn deliver(&mut self, message: Message) {
        let Message {
            from,
            to,
            sent_at_ms,
            to_incarnation,
            from_incarnation,
            body,
        } = message;
        if !self.up(to) || self.servers[to].incarnation != to_incarnation || !self.linked(from, to)
        {
            self.report.messages_lost += 1;
            return;
        }
        // Both clocks travel with every message; too far apart is refused.
        if (sent_at_ms - self.local(to)).abs() > self.config.clock_skew_max_ms {
            self.report.clock_refusals += 1;
            let line = format!(
                "{} refused a {} from {}: clocks differ too much",
                self.servers[to].id,
                body.name(),
                self.servers[from].id
            );
            self.note(line);
            return;
        }
        match body {
            Body::Push {
                grants,
                returned_request,
            } => self.on_push(to, from, grants, returned_request, from_incarnation),
            Body::HeldAnswer {
                held,
                held_before,
                returned,
            } => {
                // As the server: compared as the records stood before the push, then what
                // was given back is taken back, then what it holds now is acknowledged.
                self.compare(to, from, &held_before);
                self.take_back(to, from, &returned);
                self.acknowledge(to, from, &held);
            }
            Body::Renew { held, returned } => {
                self.on_renew(to, from, held, returned, from_incarnation)
            }
            Body::Renewed {
                grants,
                returned_request,
                echo,
            } => self.on_renewed(to, from, grants, returned_request, echo),
        }
    }

    /// Donor side: the engine's [`link::grants_for`], signed with `d`'s identity.
    fn grants_for(&mut self, d: usize, r: usize) -> (Vec<Grant>, bool) {
        let local = self.local(d);
        let server = &self.servers[d];
        let to = &self.servers[r].id;
        let (grants, returned_request) =
            link::grants_for(&server.ledger, to, local, &server.secret);
        self.report.grants_signed += grants.len() as u64;
        (grants, returned_request)
    }

    fn push(&mut self, d: usize, r: usize) {
        let local = self.local(d);
        self.servers[d].links.entry(r).or_default().last_push_ms = Some(local);
        let (grants, returned_request) = self.grants_for(d, r);
        self.send(
            d,
            r,
            Body::Push {
                grants,
                returned_request,
            },
            None,
        );
    }

    fn renew(&mut self, r: usize, d: usize) {
        let local = self.local(r);
        self.servers[r].links.entry(d).or_default().last_renew_ms = Some(local);
        let returned = self.returned_to(r, d);
        let held = self.held_from(r, d);
        self.send(r, d, Body::Renew { held, returned }, None);
    }

    /// Receiver side: what it holds from donor `d` and can still use.
    fn held_from(&self, r: usize, d: usize) -> Vec<Held> {
        link::held_from(&self.servers[r].ledger, &self.servers[d].id, self.local(r))
    }

    /// Receiver side: grants of `d` it no longer uses ([`LinkMemory::returned_to`]).
    fn returned_to(&self, r: usize, d: usize) -> Vec<Returned> {
        let local = self.local(r);
        let donor = &self.servers[d].id;
        let ledger = &self.servers[r].ledger;
        self.link_memory(r, d).returned_to(ledger, donor, local)
    }

    /// What server `s` remembers of its link with `other`: a fresh memory when it has none
    /// (never in contact, or restarted since), as the server's runtime has.
    fn link_memory(&self, s: usize, other: usize) -> std::borrow::Cow<'_, LinkMemory> {
        self.servers[s].links.get(&other).map_or_else(
            || std::borrow::Cow::Owned(LinkMemory::default()),
            std::borrow::Cow::Borrowed,
        )
    }

    fn on_push(
        &mut self,
        r: usize,
        d: usize,
        grants: Vec<Grant>,
        returned_request: bool,
        donor_incarnation: u64,
    ) {
        let held_before = self.held_from(r, d);
        let keep = link::kept(&grants);
        self.accept_grants(r, d, grants);
        if returned_request {
            self.release_absent(r, d, &keep);
        }
        let returned = self.returned_to(r, d);
        let held = self.held_from(r, d);
        self.send(
            r,
            d,
            Body::HeldAnswer {
                held,
                held_before,
                returned,
            },
            Some(donor_incarnation),
        );
    }

    fn on_renew(
        &mut self,
        d: usize,
        r: usize,
        held: Vec<Held>,
        returned: Vec<Returned>,
        receiver_incarnation: u64,
    ) {
        // As the server: what it gave back first, then compared and acknowledged.
        self.take_back(d, r, &returned);
        self.compare(d, r, &held);
        self.acknowledge(d, r, &held);
        let to = self.servers[r].id.clone();
        let (grants, returned_request) = if self.config.broken == Some(BrokenRule::SignBeforeCommit)
        {
            self.sign_uncommitted(d, r)
        } else {
            // The order rule: the extension is committed before any grant carrying it leaves.
            if let Outcome::DonationsRenewed { donations, .. } =
                self.apply(d, Command::RenewDonations { to: to.clone() })
            {
                for donation in donations {
                    let line = format!(
                        "{} renewed {} → {}: serial {} licenses {} lease until {}",
                        self.servers[d].id,
                        donation.key_id,
                        to,
                        donation.serial,
                        donation.outstanding.last().map_or(0, |o| o.licenses),
                        donation.lease_until_ms
                    );
                    self.note(line);
                }
            }
            self.note_lapsed(d, r);
            self.grants_for(d, r)
        };
        self.send(
            d,
            r,
            Body::Renewed {
                grants,
                returned_request,
                echo: returned,
            },
            Some(receiver_incarnation),
        );
    }

    /// After a donor answered a renewal from `r`: which running donations to `r` it left
    /// lapsed although it had licenses for them (the convergence check reports those).
    fn note_lapsed(&mut self, d: usize, r: usize) {
        if !self.faulty {
            self.renewed_since_quiet.insert((d, r));
        }
        let to = self.servers[r].id.clone();
        let lapsed: Vec<String> = self.servers[d]
            .ledger
            .donations()
            .into_iter()
            .filter(|x| x.to == to && x.outstanding.is_empty())
            .map(|x| x.key_id)
            .collect();
        self.left_lapsed
            .retain(|(donor, _, receiver)| (*donor, *receiver) != (d, r));
        for key_id in lapsed {
            if self.could_renew(d, &key_id) {
                self.left_lapsed.insert((d, key_id, r));
            }
        }
    }

    /// Whether donor `d` has licenses of pool `key_id` to renew a lapsed donation with, from
    /// a source that does not end too soon.
    fn could_renew(&self, d: usize, key_id: &str) -> bool {
        let local = self.local(d);
        let skew = self.config.clock_skew_max_ms;
        self.servers[d]
            .ledger
            .keys(local)
            .into_iter()
            .find(|v| v.id == key_id)
            .is_some_and(|view| {
                let source_until = view
                    .received
                    .as_ref()
                    .map_or(view.key.payload.valid_until_ms(), |rc| rc.usable_until_ms);
                let available = view
                    .licenses
                    .saturating_sub(view.in_use + view.donated)
                    .min(view.received.as_ref().map_or(u32::MAX, |rc| rc.licenses));
                view.state == KeyState::Active && available > 0 && source_until - 3 * skew > local
            })
    }

    /// The broken donor of [`BrokenRule::SignBeforeCommit`]: extends and re-serials each grant
    /// in the document only, never in its ledger.
    fn sign_uncommitted(&mut self, d: usize, r: usize) -> (Vec<Grant>, bool) {
        let local = self.local(d);
        let server = &self.servers[d];
        let to = &self.servers[r].id;
        let mut grants = Vec::new();
        for donation in server.ledger.donations().iter().filter(|x| &x.to == to) {
            if donation.outstanding.is_empty() || donation.ended {
                continue;
            }
            let Some((source, mut payload)) = server.ledger.grant_to_sign(&donation.key_id, to)
            else {
                continue;
            };
            let chain_limit = match &source {
                GrantSource::Key { key, .. } => key.payload.valid_until_ms(),
                GrantSource::Received(parent) => parent.last().lease_until_ms(),
            };
            let until = (local + self.config.renewal_period_ms)
                .min(donation.donation_until_ms)
                .min(chain_limit);
            payload.serial += 1;
            payload.issued_at = ms(local);
            payload.lease_until = ms(until.max(payload.lease_until_ms()));
            grants.push(Grant::issue(source, payload, &server.secret));
        }
        self.report.grants_signed += grants.len() as u64;
        (grants, false)
    }

    fn on_renewed(
        &mut self,
        r: usize,
        d: usize,
        grants: Vec<Grant>,
        returned_request: bool,
        echo: Vec<Returned>,
    ) {
        let local = self.local(r);
        self.servers[r]
            .links
            .entry(d)
            .or_default()
            .on_renewed(local, &echo, false);
        let keep = link::kept(&grants);
        self.accept_grants(r, d, grants);
        if returned_request {
            self.release_absent(r, d, &keep);
        }
    }

    fn accept_grants(&mut self, r: usize, d: usize, grants: Vec<Grant>) {
        for grant in grants {
            if grant.last().donor != self.servers[d].id {
                *self
                    .report
                    .grants_refused
                    .entry("grant_wrong_donor".into())
                    .or_default() += 1;
                continue;
            }
            let (serial, licenses) = (grant.last().serial, grant.last().licenses);
            match self.apply(
                r,
                Command::AcceptGrant {
                    grant: Box::new(grant),
                },
            ) {
                Outcome::GrantAccepted {
                    key_id,
                    usable_until_ms,
                    leases_ended,
                    ..
                } => {
                    self.report.grants_accepted += 1;
                    let line = format!(
                        "{} accepted {key_id} serial {serial} licenses {licenses} usable until {usable_until_ms} (local {}), {leases_ended} leases ended",
                        self.servers[r].id,
                        self.local(r)
                    );
                    self.note(line);
                }
                Outcome::Refused { refusal } => {
                    *self
                        .report
                        .grants_refused
                        .entry(refusal.code().to_string())
                        .or_default() += 1;
                }
                other => panic!("unexpected outcome of a grant: {other:?}"),
            }
        }
    }

    /// Receiver side: gives back every grant of `d` whose vendor key is not in `keep`, after
    /// calling back what it donated further from it.
    fn release_absent(&mut self, r: usize, d: usize, keep: &BTreeSet<String>) {
        let donor = self.servers[d].id.clone();
        let release = link::to_release(&self.servers[r].ledger, &donor, keep);
        for (pool, onward) in release {
            for to in onward {
                if let Outcome::DonationEnded { .. } = self.apply(
                    r,
                    Command::EndDonation {
                        key_id: pool.clone(),
                        to: to.clone(),
                    },
                ) {
                    self.report.donations_ended += 1;
                    let next = self.index[&to];
                    self.push(r, next);
                }
            }
            match self.apply(
                r,
                Command::ReleaseGrant {
                    key_id: pool.clone(),
                },
            ) {
                Outcome::GrantReleased {
                    serial,
                    leases_ended,
                    stations_until_ms,
                    ..
                } => {
                    self.report.releases += 1;
                    let key_id = vendor_key_id(&pool).to_string();
                    // As the server does: the donor hears of it once the stations of the
                    // ended leases stopped.
                    let from = match self.config.broken {
                        Some(BrokenRule::ReturnAtOnce) => i64::MIN,
                        _ => stations_until_ms,
                    };
                    self.servers[r]
                        .links
                        .entry(d)
                        .or_default()
                        .on_released(&key_id, serial, from);
                    let line = format!(
                        "{} released {pool} serial {serial}: {leases_ended} leases ended",
                        self.servers[r].id
                    );
                    self.note(line);
                }
                // Still donated further (a receiver out of reach): it lapses by itself.
                Outcome::Refused { .. } => {}
                other => panic!("unexpected outcome of a release: {other:?}"),
            }
        }
    }

    /// Donor side: the receiver no longer uses these grants ([`link::take_back`]).
    fn take_back(&mut self, d: usize, r: usize, returned: &[Returned]) {
        let to = self.servers[r].id.clone();
        let commands = link::take_back(&self.servers[d].ledger, &to, returned);
        for command in commands {
            let Command::GrantReturned { key_id, serial, .. } = &command else {
                continue;
            };
            let (key_id, serial) = (key_id.clone(), *serial);
            if let Outcome::GrantReturned { licenses_back, .. } = self.apply(d, command) {
                self.report.licenses_returned += u64::from(licenses_back);
                if licenses_back > 0 {
                    let line = format!(
                        "{} took back {licenses_back} of {key_id} from {to} (returned serial {serial})",
                        self.servers[d].id
                    );
                    self.note(line);
                }
            }
        }
    }

    /// Donor side, license synchronization: the engine's comparison of what the receiver
    /// said it held with this donor's records ([`LinkMemory::compare_records`]).
    fn compare(&mut self, d: usize, r: usize, held: &[Held]) {
        let local = self.local(d);
        let timing = self.link_timing();
        let to = &self.servers[r].id;
        let server = &self.servers[d];
        let mismatches =
            self.link_memory(d, r)
                .compare_records(&server.ledger, to, held, local, &timing);
        self.report.mismatches += mismatches.len() as u64;
    }

    /// Donor side: remembers which serial the receiver holds of each donation.
    fn acknowledge(&mut self, d: usize, r: usize, held: &[Held]) {
        let to = self.servers[r].id.clone();
        let server = &mut self.servers[d];
        server
            .links
            .entry(r)
            .or_default()
            .acknowledge(&server.ledger, &to, held);
    }

    // ---- administrators ----

    /// An administrator session on a donating server: for each neighbour it may donate to
    /// and each pool it holds, start a donation (most likely to a child), or change the count
    /// or the end date of a running one, or end it.
    fn admin(&mut self, i: usize) {
        if !self.faulty {
            return;
        }
        let wait = self.admin_rng.exponential(self.config.admin_interval_ms);
        self.schedule(self.now + wait, Event::Admin { server: i });
        if !self.up(i) {
            return;
        }
        for r in self.servers[i].sends_to.clone() {
            let local = self.local(i);
            let skew = self.config.clock_skew_max_ms;
            let pools: Vec<KeyView> = self.servers[i]
                .ledger
                .keys(local)
                .into_iter()
                .filter(|v| v.state == KeyState::Active)
                .filter(|v| {
                    v.received.as_ref().is_none_or(|rc| {
                        rc.grant.links.len() < GRANT_CHAIN_MAX - 1
                            && rc.usable_until_ms > local + 4 * skew
                    })
                })
                .collect();
            for view in pools {
                if let Some(command) = self.admin_decides(i, r, &view, local) {
                    self.admin_applies(i, r, command);
                }
            }
        }
    }

    fn admin_decides(&mut self, i: usize, r: usize, view: &KeyView, local: i64) -> Option<Command> {
        let skew = self.config.clock_skew_max_ms;
        let to = self.servers[r].id.clone();
        let child = self.servers[i].children.contains(&r);
        // One source per vendor key and receiver (the server refuses a second one).
        let clash = self.servers[i].ledger.donations().into_iter().any(|x| {
            x.to == to
                && x.key_id != view.id
                && vendor_key_id(&x.key_id) == view.key.payload.key_id
                && !x.outstanding.is_empty()
        });
        if clash {
            return None;
        }
        let existing: Option<Donation> = self.servers[i].ledger.donation(&view.id, &to).cloned();
        let running = existing
            .as_ref()
            .is_some_and(|x| !x.ended && x.donation_until_ms > local);
        let roll = self.admin_rng.below(100);
        let change_until = match running {
            false if roll >= if child { 80 } else { 30 } => return None,
            false => false,
            true if roll < 5 => {
                return Some(Command::EndDonation {
                    key_id: view.id.clone(),
                    to,
                });
            }
            true if roll < 30 => false,
            true if roll < 50 => true,
            true => return None,
        };
        let counted = existing.as_ref().map_or(0, Donation::counted);
        let available = view
            .licenses
            .saturating_sub(view.in_use + view.donated - counted)
            .min(view.received.as_ref().map_or(u32::MAX, |rc| rc.licenses));
        let most = counted.max(available);
        if most == 0 {
            return None;
        }
        let share = if child {
            (u64::from(view.licenses) * self.weight[r] as u64 / self.weight[i] as u64) as u32
        } else {
            1 + view.licenses / 10
        };
        let percent = self.admin_rng.range(80, 125) as u32;
        let licenses = match &existing {
            Some(x) if running && change_until => x.licenses.min(most),
            _ => (share * percent / 100).clamp(1, most),
        };
        let until_limit = match &view.received {
            Some(rc) => rc.grant.last().donation_until_ms(),
            None => view.key.payload.valid_until_ms(),
        };
        let until = match &existing {
            Some(x) if running && !change_until => x.donation_until_ms,
            _ => local + self.admin_rng.range(10 * DAY_MS, 40 * DAY_MS),
        }
        .min(until_limit);
        if until <= local + 4 * skew {
            return None;
        }
        Some(Command::Donate {
            key_id: view.id.clone(),
            to,
            receiver_public_key: self.servers[r].public_key.clone(),
            licenses,
            until_ms: until,
            renewal_period_ms: self.config.renewal_period_ms,
        })
    }

    fn admin_applies(&mut self, i: usize, r: usize, command: Command) {
        let to = self.servers[r].id.clone();
        match self.apply(i, command) {
            Outcome::Donated { donation } => {
                self.report.donations += 1;
                let line = format!(
                    "{} donates {} → {to}: {} licenses until {} (serial {}, lease until {})",
                    self.servers[i].id,
                    donation.key_id,
                    donation.licenses,
                    donation.donation_until_ms,
                    donation.serial,
                    donation.lease_until_ms
                );
                self.note(line);
                self.push(i, r);
            }
            Outcome::DonationEnded { donation } => {
                self.report.donations_ended += 1;
                let line = format!(
                    "{} ended the donation {} → {to}",
                    self.servers[i].id, donation.key_id
                );
                self.note(line);
                self.push(i, r);
            }
            // Not enough licenses any more, an end date too late for the chain: the
            // administrator reads the refusal and moves on.
            Outcome::Refused { .. } => {}
            other => panic!("unexpected outcome of a donation: {other:?}"),
        }
    }

    // ---- faults ----

    fn crash_some(&mut self) {
        if !self.faulty {
            return;
        }
        let wait = self.fault_rng.exponential(self.config.crash_interval_ms);
        self.schedule(self.now + wait, Event::Crash);
        let i = self.fault_rng.index(self.servers.len());
        if !self.up(i) {
            return;
        }
        let down = self
            .fault_rng
            .range(self.config.down_ms.0, self.config.down_ms.1);
        let server = &mut self.servers[i];
        server.down = Some(server.ledger.snapshot());
        server.incarnation += 1;
        server.links.clear();
        server.timer_at = None;
        self.report.crashes += 1;
        let line = format!("{} crashed", self.servers[i].id);
        self.note(line);
        self.schedule(self.now + down, Event::Restart { server: i });
    }

    /// Back from its durable state; link state starts afresh.
    fn restart(&mut self, i: usize) {
        let server = &mut self.servers[i];
        let Some(snapshot) = server.down.take() else {
            return;
        };
        server.restarts += 1;
        let config = server.ledger_config.clone();
        let ledger = if server.restarts.is_multiple_of(2) {
            let bytes = serde_json::to_vec(&snapshot).expect("a snapshot serializes");
            Ledger::restore_json(config, &bytes).expect("a ledger's own snapshot restores")
        } else {
            Ledger::restore(config, snapshot.clone())
        };
        if ledger.snapshot() != snapshot {
            let message = format!(
                "the ledger of {} restored from its snapshot differs from it",
                server.id
            );
            self.fail(i, message, None);
            return;
        }
        server.ledger = ledger;
        server.incarnation += 1;
        let line = format!("{} restarted", self.servers[i].id);
        self.note(line);
        let now = self.now;
        self.arm_timer_at(i, now);
    }

    fn partition(&mut self) {
        if !self.faulty || self.servers.len() < 2 {
            return;
        }
        let wait = self
            .fault_rng
            .exponential(self.config.partition_interval_ms);
        self.schedule(self.now + wait, Event::Partition);
        let root = 1 + self.fault_rng.index(self.servers.len() - 1);
        let length = self
            .fault_rng
            .range(self.config.partition_ms.0, self.config.partition_ms.1);
        self.next_cut += 1;
        let id = self.next_cut;
        self.cuts.push(Cut { id, root });
        self.report.partitions += 1;
        let line = format!("subtree of {} cut off", self.servers[root].id);
        self.note(line);
        self.schedule(self.now + length, Event::Heal { cut: id });
    }

    /// An old grant message played back to its receiver, straight into `AcceptGrant`.
    fn replay(&mut self) {
        if !self.faulty {
            return;
        }
        let wait = self.fault_rng.exponential(self.config.replay_interval_ms);
        self.schedule(self.now + wait, Event::Replay);
        if self.replayable.is_empty() {
            return;
        }
        let (to, grants) = self.replayable[self.fault_rng.index(self.replayable.len())].clone();
        if !self.up(to) {
            return;
        }
        for grant in grants {
            self.report.replays += 1;
            if let Outcome::GrantAccepted { key_id, serial, .. } = self.apply(
                to,
                Command::AcceptGrant {
                    grant: Box::new(grant),
                },
            ) {
                self.report.replays_accepted += 1;
                let line = format!(
                    "{} accepted a replayed grant {key_id} serial {serial}",
                    self.servers[to].id
                );
                self.note(line);
            }
        }
    }

    fn drift(&mut self) {
        for i in 0..self.servers.len() {
            let rate = self
                .fault_rng
                .range(-self.config.drift_rate_ppm, self.config.drift_rate_ppm);
            let now = self.now;
            self.servers[i].clock.set_rate(now, rate);
        }
        self.schedule(self.now + DAY_MS, Event::Drift);
    }

    /// The faults stop: every cut heals, every crashed server restarts, and convergence is
    /// measured from here, once per sync period.
    fn quiet(&mut self) {
        self.faulty = false;
        self.cuts.clear();
        for i in 0..self.servers.len() {
            self.restart(i);
        }
        self.note("faults stop".into());
        let now = self.now;
        self.schedule(now, Event::ConvergenceCheck);
    }

    /// Every hour after the faults stopped, until donors and receivers agree.
    fn convergence_check(&mut self) {
        if self.report.convergence_sync_periods.is_some() {
            return;
        }
        if self.first_disagreement().is_none() {
            let ms = self.now - self.quiet_at;
            let sync = self.config.sync_period_ms;
            self.report.convergence_ms = Some(ms);
            self.report.convergence_sync_periods = Some(((ms + sync - 1) / sync) as u64);
        } else {
            self.schedule(self.now + HOUR_MS, Event::ConvergenceCheck);
        }
    }

    /// The first place where a donor's records and its receiver's differ, in words.
    fn first_disagreement(&self) -> Option<String> {
        let skew = self.config.clock_skew_max_ms;
        let received: Vec<BTreeMap<String, Received>> = self
            .servers
            .iter()
            .map(|server| server.ledger.received().into_iter().collect())
            .collect();
        for (d, donor) in self.servers.iter().enumerate() {
            let local = self.local(d);
            for donation in donor.ledger.donations() {
                let r = self.index[&donation.to];
                let rlocal = self.local(r);
                let pool = received_pool_id(vendor_key_id(&donation.key_id), &donor.id);
                let held = received[r]
                    .get(&pool)
                    .filter(|rc| rc.usable_until_ms > rlocal);
                let running = !donation.ended && donation.donation_until_ms > local;
                let describe = |what: &str| {
                    Some(format!(
                        "{} → {} ({}): {what}; donor has serial {} outstanding {:?}, receiver holds {}",
                        donor.id,
                        donation.to,
                        donation.key_id,
                        donation.serial,
                        donation.outstanding,
                        held.as_ref().map_or("nothing".into(), |rc| format!(
                            "serial {} licenses {} usable until {}",
                            rc.serial, rc.licenses, rc.usable_until_ms
                        ))
                    ))
                };
                if !running {
                    if held.is_some() {
                        return describe("ended, but the receiver still holds it");
                    }
                    continue;
                }
                match donation.outstanding.iter().max_by_key(|o| o.serial) {
                    Some(latest) => {
                        if latest.lease_until_ms - 2 * skew <= local {
                            // Ends about now: the receiver may rightly refuse it.
                            continue;
                        }
                        let matches = held.as_ref().is_some_and(|rc| {
                            rc.serial == latest.serial && rc.licenses == latest.licenses
                        });
                        if !matches {
                            return describe("the receiver does not hold the latest grant");
                        }
                    }
                    None => {
                        // Lapsed (during the faults). The receiver asks for a renewal every
                        // sync period; the donor renews if it has licenses then (its own
                        // stations may have taken them). Wrong if it was not asked since the
                        // faults stopped although it could renew now, or if it was asked and
                        // left it lapsed although it had licenses.
                        let asked = self.renewed_since_quiet.contains(&(d, r));
                        if !asked && self.could_renew(d, &donation.key_id) {
                            return describe("lapsed, and not renewed since the faults stopped");
                        }
                        if self.left_lapsed.contains(&(d, donation.key_id.clone(), r)) {
                            return describe(
                                "left lapsed at a renewal although the donor had licenses",
                            );
                        }
                    }
                }
            }
        }
        // No receiver uses a grant its donor does not know.
        for (r, receiver) in self.servers.iter().enumerate() {
            let rlocal = self.local(r);
            for (pool, rc) in &received[r] {
                if rc.usable_until_ms <= rlocal {
                    continue;
                }
                let d = self.index[&rc.donor];
                let known = self.servers[d].ledger.donations().iter().any(|x| {
                    x.to == receiver.id
                        && vendor_key_id(&x.key_id) == vendor_key_id(pool)
                        && x.outstanding.iter().any(|o| o.serial == rc.serial)
                });
                if !known {
                    return Some(format!(
                        "{} holds {pool} serial {} ({} licenses), which {} does not count",
                        receiver.id, rc.serial, rc.licenses, rc.donor
                    ));
                }
            }
        }
        None
    }
}
