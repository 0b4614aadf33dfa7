//! The redundant pair's machine: when a host serves paired, alone or not at all, and when it
//! merges (docs/pair.md).
//!
//! - **Paired**: every station command goes through the replicated log (both hosts hold it
//!   before it is acknowledged).
//! - **Alone**: a host that has not heard from the other for [`Timing::alone_after_ms`]
//!   closes its log to the other host, builds its alone ledger ([`alone_ledger`]: applied
//!   ledger + its whole log + its journal) and serves stations from its own share, each
//!   command journaled before it is answered.
//! - **Recovering**: the host owning the primary share drives the merge once it reaches the
//!   other host: it asks for the other's alone state (the other host stops serving alone),
//!   and proposes one `MergeAlone` with both states ([`merge_states`]). Each host deletes its
//!   journal once its applied ledger shows its epoch merged, and serves paired again. Cut off
//!   again before that: alone again, journal kept, in a new epoch.
//!
//! Which share a host owns follows its host number (the lower one: the primary share).
//!
//! [`PairMachine`] decides; the runtime does. Its inputs are the link as the host sees it
//! ([`Link`], in the link's own monotonic milliseconds), what the host stores ([`Host`]:
//! voters, the journal's mark, the alone epoch recorded in its store) and the applied
//! ledger. Its outputs are [`Action`]s; the slow ones (going alone, rejoining, the merge)
//! report back through [`PairMachine::on_alone`], [`PairMachine::on_rejoined`] and
//! [`PairMachine::on_recovery_finished`].

use serde::{Deserialize, Serialize};
use tessera_core::{AloneState, Ledger, Share, Stamped};

/// The machine's timers (milliseconds of the link's clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// A host that has not heard from the other this long serves alone.
    pub alone_after_ms: i64,
    /// A refusal or answer younger than this counts as current.
    pub recent_ms: i64,
}

impl Timing {
    /// Real hosts: ten Raft heartbeats, above the election timeout's upper bound (300 ms), so
    /// a late heartbeat does not split the pair, and short enough that stations see under a
    /// second without service when a host dies.
    pub const HOSTS: Timing = Timing {
        alone_after_ms: 500,
        recent_ms: 300,
    };
}

/// How a host of a redundant pair serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Not a pair (a single host or a domain).
    Off,
    /// In contact: every change is on both hosts before it is acknowledged.
    Paired,
    /// Cut off from the other host: serves stations from its own share, journaled.
    Alone,
    /// The hosts are back in contact; what each did alone is being merged. Serves nobody.
    Recovering,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Off, Mode::Paired, Mode::Alone, Mode::Recovering];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Paired => "paired",
            Mode::Alone => "alone",
            Mode::Recovering => "recovering",
        }
    }

    pub fn parse(text: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|mode| mode.name() == text)
    }
}

/// What a host knows of the link to the other host, in the link's milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    /// When this host started looking (a host that never heard from the other counts from
    /// here).
    pub started_ms: i64,
    /// The other host last took part in the log with this one (either direction).
    pub heard_ms: Option<i64>,
    /// Anything came back at all, a refusal included.
    pub reachable_ms: Option<i64>,
    /// The other host last refused because it serves alone.
    pub peer_alone_ms: Option<i64>,
    /// The other host's mode as its last message said, if that message is fresh.
    pub peer_mode: Option<Mode>,
}

impl Link {
    fn heard_age(&self, now_ms: i64) -> i64 {
        now_ms - self.heard_ms.unwrap_or(self.started_ms)
    }

    fn reachable_age(&self, now_ms: i64) -> i64 {
        now_ms - self.reachable_ms.unwrap_or(self.started_ms)
    }

    fn peer_alone_within(&self, now_ms: i64, ms: i64) -> bool {
        self.peer_alone_ms.is_some_and(|at| now_ms - at < ms)
    }
}

/// The alone journal's mark: whose share it serves and in which epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalMark {
    pub share: Share,
    pub epoch: u64,
}

/// What the host stores and knows besides the link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub me: u64,
    /// The voters of its Raft group, ascending.
    pub voters: Vec<u64>,
    /// Its alone journal, if it holds one (served alone, not merged yet).
    pub journal: Option<JournalMark>,
    /// The alone epoch its store records as begun and not merged.
    pub alone_epoch: Option<u64>,
    /// Wall-clock time (Unix ms): epochs are never below it, so a new epoch is above any
    /// earlier one even when the journal is gone.
    pub wall_ms: i64,
}

/// What the runtime carries out, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The host's mode changed: tell the link (answers carry it) and log it.
    Mode { from: Option<Mode>, to: Mode },
    /// Stop the merge task if one runs.
    AbortRecovery,
    /// Serve alone from `share` in `epoch`: close the log to the other host (waiting for
    /// requests in flight), begin the journal, record the epoch in the store, build the alone
    /// ledger ([`alone_ledger`]); then report with [`PairMachine::on_alone`].
    GoAlone { share: Share, epoch: u64 },
    /// The journal is missing (`found: None`) or older than the epoch the store recorded as
    /// begun: it was deleted or put back from a copy, and serving alone from it would issue
    /// the share's licenses a second time (attack T11). Raise `pair_journal_lost`.
    JournalLost { begun: u64, found: Option<u64> },
    /// Open the log to the other host again.
    OpenRoutes,
    /// Keep this host's alone state (with its journal's epoch) for the merge, and stop
    /// serving from the alone ledger.
    KeepAloneState,
    /// Start the merge task: the other host's alone state ([`PairMachine::on_handover`] on
    /// that host), the leader role, one `MergeAlone` of [`merge_states`]; then report with
    /// [`PairMachine::on_recovery_finished`].
    StartRecovery,
    /// The pair is one again: clear the store's alone epoch, delete the journal, forget the
    /// kept state; then report with [`PairMachine::on_rejoined`].
    Rejoin,
}

/// Where a station command goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Through the replicated log.
    Consensus,
    /// To this host's alone ledger, journaled.
    Alone,
    /// Nowhere: the pair is merging.
    Recovering,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Recovery {
    #[default]
    Idle,
    Running,
    Done,
}

/// One host's pair machine.
#[derive(Clone, Debug)]
pub struct PairMachine {
    timing: Timing,
    rules: Rules,
    mode: Option<Mode>,
    recovery: Recovery,
    /// When the other host announced it stops; cleared once it is heard again well after
    /// that (answers in flight during its shutdown do not count).
    peer_stopped_ms: Option<i64>,
}

impl PairMachine {
    pub fn new(timing: Timing, rules: Rules) -> PairMachine {
        PairMachine {
            timing,
            rules,
            mode: None,
            recovery: Recovery::Idle,
            peer_stopped_ms: None,
        }
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    pub fn rules(&self) -> Rules {
        self.rules
    }

    /// `Off` until the first tick decided otherwise.
    pub fn mode(&self) -> Mode {
        self.mode.unwrap_or(Mode::Off)
    }

    /// Whether a tick has run yet (the runtime loads its journal before the first one).
    pub fn started(&self) -> bool {
        self.mode.is_some()
    }

    pub fn peer_stopped(&self) -> bool {
        self.peer_stopped_ms.is_some()
    }

    /// Where a station command goes now.
    pub fn route(&self, now_ms: i64, link: &Link) -> Route {
        match self.mode() {
            Mode::Alone => Route::Alone,
            Mode::Recovering => Route::Recovering,
            Mode::Off => Route::Consensus,
            Mode::Paired => match link.peer_mode {
                Some(Mode::Alone | Mode::Recovering) => Route::Recovering,
                _ if link.peer_alone_within(now_ms, self.timing.recent_ms) => Route::Recovering,
                _ => Route::Consensus,
            },
        }
    }

    /// The other host announced it stops (graceful shutdown): no need to wait for silence.
    pub fn on_peer_stopping(&mut self, now_ms: i64) {
        self.peer_stopped_ms = Some(now_ms);
    }

    /// The other host asks for this host's alone state (it drives the merge). `None`:
    /// nothing to hand over. `Some(actions)`: carry them out, then answer with the kept
    /// alone state.
    pub fn on_handover(&mut self) -> Option<Vec<Action>> {
        match self.mode {
            Some(Mode::Alone) => {
                let mut actions = vec![Action::KeepAloneState];
                actions.extend(self.set_mode(Mode::Recovering));
                actions.push(Action::OpenRoutes);
                Some(actions)
            }
            Some(Mode::Recovering) => Some(vec![Action::OpenRoutes]),
            _ => None,
        }
    }

    /// One look at the link (every pair tick).
    pub fn on_tick(
        &mut self,
        now_ms: i64,
        ledger: &Ledger,
        host: &Host,
        link: &Link,
    ) -> Vec<Action> {
        let timing = self.timing;
        let split = ledger.pair_backup_percent();
        let is_pair = host.voters.len() == 2 && host.voters.contains(&host.me) && split.is_some();
        let own_share = if host.voters.first() == Some(&host.me) {
            Share::Primary
        } else {
            Share::Backup
        };
        let heard = link.heard_age(now_ms);
        let reachable = link.reachable_age(now_ms);
        let peer_alone =
            link.peer_alone_within(now_ms, timing.recent_ms) || link.peer_mode == Some(Mode::Alone);
        // Heard or reached (a request refused while alone) well after the announcement: it
        // runs again.
        if let Some(at) = self.peer_stopped_ms {
            let since = now_ms - at - timing.recent_ms;
            if since >= 0 && heard.min(reachable) < since {
                self.peer_stopped_ms = None;
            }
        }
        let peer_stopped = self.peer_stopped_ms.is_some();
        if !is_pair && host.journal.is_none() {
            return self.set_mode(Mode::Off);
        }
        let share = host.journal.map_or(own_share, |j| j.share);
        match self.mode() {
            Mode::Off | Mode::Paired => {
                // A stopped host answers nothing more: no need to wait for silence.
                let gone = heard >= timing.alone_after_ms || peer_stopped;
                if host.journal.is_some() || (gone && !peer_alone) {
                    self.go_alone(ledger, host, share)
                } else if peer_alone && share == Share::Primary {
                    self.recover()
                } else {
                    self.set_mode(Mode::Paired)
                }
            }
            Mode::Alone => {
                // Requests the other host sent while it stopped do not start a recovery.
                if share == Share::Primary
                    && reachable < timing.recent_ms
                    && !peer_stopped
                    && self.recovery == Recovery::Idle
                {
                    self.recover()
                } else {
                    Vec::new()
                }
            }
            Mode::Recovering => {
                let merged = ledger.merged_epoch(share);
                // A lost journal (see `go_alone`) has nothing to hand over: this host is one
                // of the pair again once the other host serves paired, merged.
                let journal_epoch = host.journal.map_or(0, |j| j.epoch);
                let lost = host
                    .alone_epoch
                    .is_some_and(|begun| begun > merged && journal_epoch < begun);
                let own_merged = if lost {
                    heard < timing.recent_ms && link.peer_mode == Some(Mode::Paired)
                } else {
                    host.journal.is_none_or(|j| merged >= j.epoch)
                };
                let driver_done = share != Share::Primary || self.recovery == Recovery::Done;
                if own_merged && driver_done {
                    vec![Action::Rejoin]
                } else if heard >= timing.alone_after_ms && reachable >= timing.alone_after_ms {
                    self.go_alone(ledger, host, share)
                } else if share == Share::Primary && self.recovery == Recovery::Idle {
                    self.recovery = Recovery::Running;
                    vec![Action::StartRecovery]
                } else {
                    Vec::new()
                }
            }
        }
    }

    /// How [`Action::GoAlone`] ended: serving alone, or (no journal, no record of the epoch)
    /// recovering, serving nobody.
    pub fn on_alone(&mut self, begun: bool) -> Vec<Action> {
        if begun {
            self.recovery = Recovery::Idle;
            self.set_mode(Mode::Alone)
        } else {
            self.set_mode(Mode::Recovering)
        }
    }

    /// [`Action::Rejoin`] is done: paired again.
    pub fn on_rejoined(&mut self) -> Vec<Action> {
        self.recovery = Recovery::Idle;
        self.set_mode(Mode::Paired)
    }

    /// The merge task ended (`merged`: the merge committed, or there was nothing to merge).
    pub fn on_recovery_finished(&mut self, merged: bool) {
        if self.recovery == Recovery::Running {
            self.recovery = if merged {
                Recovery::Done
            } else {
                Recovery::Idle
            };
        }
    }

    /// The other host's server status, as this host sees it (`None` without another host).
    pub fn peer_status(&self, now_ms: i64, link: &Link, has_peer: bool) -> Option<&'static str> {
        let alone_after = self.timing.alone_after_ms;
        let heard = link.heard_ms.map(|at| now_ms - at);
        let reachable = link.reachable_ms.map(|at| now_ms - at);
        match (has_peer, heard, reachable) {
            (false, _, _) => None,
            (true, _, _) if self.peer_stopped() => Some(STOPPED),
            (true, Some(age), _) if age < alone_after => Some(RUNNING),
            (true, _, Some(age)) if age < alone_after => Some(RUNNING),
            (true, None, None) => Some(NOT_AVAILABLE),
            (true, _, _) => Some(DISCONNECTED),
        }
    }

    fn go_alone(&mut self, ledger: &Ledger, host: &Host, share: Share) -> Vec<Action> {
        let mut actions = vec![Action::AbortRecovery];
        if self.recovery == Recovery::Running {
            self.recovery = Recovery::Idle;
        }
        let merged = ledger.merged_epoch(share);
        // The store records each alone epoch begun until it is merged: a journal missing, or
        // older than that record, was deleted or put back from a copy (attack T11).
        let previous = host.journal.map_or(0, |j| j.epoch);
        if let Some(begun) = host.alone_epoch
            && begun > merged
            && previous < begun
        {
            actions.push(Action::JournalLost {
                begun,
                found: host.journal.map(|j| j.epoch),
            });
            actions.extend(self.set_mode(Mode::Recovering));
            // It holds nothing alone: its log stays open, so the pair can merge.
            actions.push(Action::OpenRoutes);
            return actions;
        }
        let epoch = (merged + 1)
            .max(previous + 1)
            .max(host.wall_ms.max(0) as u64);
        actions.push(Action::GoAlone { share, epoch });
        actions
    }

    fn recover(&mut self) -> Vec<Action> {
        self.recovery = Recovery::Running;
        let mut actions = vec![Action::KeepAloneState];
        actions.extend(self.set_mode(Mode::Recovering));
        actions.push(Action::OpenRoutes);
        actions.push(Action::StartRecovery);
        actions
    }

    fn set_mode(&mut self, to: Mode) -> Vec<Action> {
        let from = self.mode.replace(to);
        if from == Some(to) {
            Vec::new()
        } else {
            vec![Action::Mode { from, to }]
        }
    }
}

/// The ledger a host serves from alone: the applied ledger, then the rest of its log (entries
/// it holds but does not know are committed: the other host may have them committed and
/// acknowledged), then alone in its share, then what it journaled alone.
pub fn alone_ledger(
    rules: Rules,
    applied: Ledger,
    log_tail: impl IntoIterator<Item = Stamped>,
    share: Share,
    journal: &[Stamped],
) -> Ledger {
    let mut ledger = applied;
    if rules.broken() != Some(Broken::IgnoreLogTail) {
        for entry in log_tail {
            ledger.apply(&entry);
        }
    }
    if rules.broken() == Some(Broken::FullCapacityAlone) {
        // On this host's copy only, its share is the whole key.
        ledger.apply(&Stamped {
            at_ms: ledger.last_at_ms(),
            command: tessera_core::Command::SetPairSplit {
                backup_percent: Some(match share {
                    Share::Primary => 0,
                    Share::Backup => 100,
                }),
            },
        });
    }
    ledger.set_alone(Some(share));
    for entry in journal {
        ledger.apply(entry);
    }
    ledger
}

/// The alone states one `MergeAlone` carries: the driving host's and the other host's.
pub fn merge_states(
    rules: Rules,
    own: Option<AloneState>,
    other: Option<AloneState>,
) -> Vec<AloneState> {
    let other = other.filter(|_| rules.broken() != Some(Broken::MergePrimaryOnly));
    own.into_iter().chain(other).collect()
}

/// Which rules run. Hosts run [`Rules::default`]; with the `mutations` feature (the
/// simulator's, never the server's) a rule can be broken on purpose, to show the simulator's
/// checks catch it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    #[cfg(feature = "mutations")]
    pub broken: Option<Broken>,
}

impl Rules {
    /// The rule broken on purpose (always `None` without the `mutations` feature).
    pub fn broken(self) -> Option<Broken> {
        #[cfg(feature = "mutations")]
        {
            self.broken
        }
        #[cfg(not(feature = "mutations"))]
        {
            None
        }
    }

    /// Rules with `broken` broken.
    #[cfg(feature = "mutations")]
    pub fn with_broken(broken: Option<Broken>) -> Rules {
        Rules { broken }
    }
}

/// A pair rule deliberately broken (see [`Rules`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broken {
    /// A host alone issues from all of a key's licenses, not only its share.
    FullCapacityAlone,
    /// A host going alone applies only the entries it knows are committed, not its whole log.
    IgnoreLogTail,
    /// The merge takes only the driving host's state.
    MergePrimaryOnly,
}

impl Broken {
    pub const ALL: [Broken; 3] = [
        Broken::FullCapacityAlone,
        Broken::IgnoreLogTail,
        Broken::MergePrimaryOnly,
    ];

    pub fn flag(self) -> &'static str {
        match self {
            Broken::FullCapacityAlone => "full-capacity-alone",
            Broken::IgnoreLogTail => "ignore-log-tail",
            Broken::MergePrimaryOnly => "merge-primary-only",
        }
    }

    pub fn parse(text: &str) -> Option<Broken> {
        Broken::ALL.into_iter().find(|rule| rule.flag() == text)
    }
}

/// What the pair status is computed from (one host's view).
#[derive(Clone, Debug)]
pub struct StatusInputs {
    pub hosts: usize,
    pub mode: Mode,
    /// The other host's server status, `None` without another host.
    pub peer_status: Option<&'static str>,
    pub peer_mode: Option<Mode>,
    pub peer_is_primary: bool,
    pub split: Option<u8>,
    /// Log entries the other host misses (leader's view; 0 elsewhere).
    pub lag: u64,
}

/// The pair status as the reference names it: Recovering while either host merges or still
/// holds alone state; the other host's absence named by its role; Pair not synced while the
/// split is not set or the backup lags; else Paired and Available.
pub fn status_text(inputs: &StatusInputs) -> &'static str {
    if inputs.hosts < 2 {
        NOT_PAIRED
    } else if inputs.mode == Mode::Recovering
        || (inputs.peer_status == Some(RUNNING)
            && matches!(inputs.peer_mode, Some(Mode::Recovering | Mode::Alone)))
    {
        RECOVERING
    } else if inputs.peer_status != Some(RUNNING) {
        if inputs.peer_is_primary {
            PRIMARY_NOT_AVAILABLE
        } else {
            BACKUP_NOT_AVAILABLE
        }
    } else if inputs.split.is_none() || inputs.lag > SYNC_LAG_MAX {
        PAIR_NOT_SYNCED
    } else {
        PAIRED_AND_AVAILABLE
    }
}

/// The reference's statuses.
pub const PAIRED_AND_AVAILABLE: &str = "Paired and Available";
pub const BACKUP_NOT_AVAILABLE: &str = "Backup not available";
pub const PRIMARY_NOT_AVAILABLE: &str = "Primary not available";
pub const PAIR_NOT_SYNCED: &str = "Pair not synced";
pub const RECOVERING: &str = "Recovering";
pub const NOT_PAIRED: &str = "Not paired";
pub const RUNNING: &str = "Running";
pub const STOPPED: &str = "Stopped";
pub const DISCONNECTED: &str = "Disconnected";
pub const NOT_AVAILABLE: &str = "Backup not available";
/// A backup missing more log entries than this is not in sync.
pub const SYNC_LAG_MAX: u64 = 1_000;

#[cfg(test)]
mod tests;
