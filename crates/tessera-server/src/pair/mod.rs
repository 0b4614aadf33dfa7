//! A redundant pair: a domain of two hosts that keeps serving when the hosts lose each other,
//! without ever issuing, between them, more than a key holds (docs/pair.md).
//!
//! The ledger side (shares, serving alone, the merge) is `tessera_core::ledger::pair`; this
//! module runs it on real hosts:
//!
//! - **Paired**: every station command goes through Raft (both hosts hold it before it is
//!   acknowledged). An entry proposed before and committed after the pair fell out of step is
//!   not acknowledged (503 `pair_recovering`; the station retries, and checkout is
//!   idempotent per station).
//! - **Alone**: a host that has not heard from the other for [`ALONE_AFTER`] closes its Raft
//!   routes (the log cannot move under it), builds its alone ledger (applied ledger + its
//!   whole log + its journal) and serves stations from its own share, each command written to
//!   the [`journal::Journal`] (fsync) before it is answered.
//! - **Recovering**: the host owning the primary share drives the merge once it reaches the
//!   other host: it asks for the other's alone state (`handover`: that host stops serving and
//!   opens its Raft routes), becomes the Raft leader, and proposes one `MergeAlone` with both
//!   states. Each host deletes its journal once its applied ledger shows its epoch merged,
//!   and serves paired again. Cut off again before that: alone again, journal kept (new
//!   epoch).
//!
//! Which share a host owns follows its host number (the lower one: the primary share), not
//! the Raft role, which may move between the two.

pub mod journal;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tessera_core::{AloneState, Applied, Command, Ledger, Outcome, Share, Stamped};

use crate::consensus::Consensus;
pub use crate::consensus::pair_link::Mode;
use crate::consensus::pair_link::PairLink;
use crate::state::SharedState;
use journal::Journal;

/// A host that has not heard from the other for this long serves alone: ten Raft heartbeats,
/// above the election timeout's upper bound (300 ms), so a late heartbeat does not split the
/// pair, and short enough that stations see under a second without service when a host dies.
pub const ALONE_AFTER: Duration = Duration::from_millis(500);
/// How often each host looks at its link.
pub const PAIR_TICK: Duration = Duration::from_millis(100);
/// A refusal or answer younger than this counts as current.
const RECENT: Duration = Duration::from_millis(300);
/// How long the recovering host waits for the Raft leader role before it tries again.
const LEAD_WAIT: Duration = Duration::from_secs(5);
/// Timeout of a pair RPC to the other host.
const RPC_TIMEOUT: Duration = Duration::from_secs(3);
/// Header carrying the HMAC (domain secret) of a pair RPC's body.
pub const PAIR_AUTH_HEADER: &str = "x-tessera-pair-auth";
/// The sender's time (Unix ms) of a pair RPC, under its tag: a captured RPC is refused once
/// [`PAIR_RPC_WINDOW_MS`] has passed, and within it, a second time (replay).
pub const PAIR_TIME_HEADER: &str = "x-tessera-pair-time";
/// How far a pair RPC's time may be from the receiver's clock.
pub const PAIR_RPC_WINDOW_MS: i64 = 30_000;

/// What a pair RPC's tag covers besides the body: its name and the sender's time.
pub fn rpc_tag_subject(rpc: &str, time_ms: i64) -> String {
    format!("{rpc} {time_ms}")
}

/// Where a station command goes.
pub enum Route {
    /// Through Raft; `disturbed` as read before proposing.
    Consensus { disturbed: u64 },
    /// To this host's alone ledger.
    Alone,
    /// Nowhere: the pair is merging.
    Recovering,
}

/// The last merge this host proposed or saw.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MergeReport {
    pub at_ms: i64,
    pub leases_merged: u32,
    pub leases_removed: u32,
    pub leases_dropped: u32,
}

pub struct Pair {
    data_dir: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    mode: Option<Mode>,
    journal: Option<Journal>,
    alone: Option<Ledger>,
    /// Alone state handed over (the other host asked) or kept for the merge (this host
    /// drives it).
    handed: Option<AloneState>,
    recovery: Option<tokio::task::JoinHandle<()>>,
    recovery_done: bool,
    /// When the other host announced it stops; cleared once it is heard again well after
    /// that (Raft answers in flight during its shutdown do not count).
    peer_stopped: Option<std::time::Instant>,
    last_merge: Option<MergeReport>,
    last_error: Option<String>,
    last_status: Option<String>,
}

/// Answer of `POST /v1/pair/rpc/handover`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Handover {
    pub state: Option<AloneState>,
}

/// Answer of `POST /v1/pair/rpc/candidate`: may this host become a pair's backup?
#[derive(Debug, Serialize, Deserialize)]
pub struct Candidate {
    pub host: u64,
    pub address: String,
    pub voters: Vec<u64>,
    pub keys: usize,
    /// Log entries this host's store holds: a host that ran as a server before has some.
    pub last_log_index: Option<u64>,
    pub server_id: Option<String>,
}

impl Pair {
    pub fn new(data_dir: PathBuf) -> Pair {
        Pair {
            data_dir,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn mode(&self) -> Mode {
        self.lock().mode.unwrap_or(Mode::Off)
    }

    /// Where a command goes now.
    pub fn route(&self, link: &PairLink) -> Route {
        let disturbed = link.disturbed();
        match self.mode() {
            Mode::Alone => Route::Alone,
            Mode::Recovering => Route::Recovering,
            Mode::Off => Route::Consensus { disturbed },
            Mode::Paired => match link.peer_mode() {
                Some(Mode::Alone | Mode::Recovering) => Route::Recovering,
                _ if link.peer_alone_age().is_some_and(|age| age < RECENT) => Route::Recovering,
                _ => Route::Consensus { disturbed },
            },
        }
    }

    /// After a commit: was the pair in step all along (see `PairLink::disturbed`)?
    pub fn still_in_step(&self, link: &PairLink, disturbed: u64) -> bool {
        self.mode() == Mode::Off || link.disturbed() == disturbed
    }

    /// Applies a command to the alone ledger, journaled first. `None`: no longer alone.
    pub fn apply_alone(&self, entry: &Stamped) -> Option<Result<Applied, String>> {
        let mut inner = self.lock();
        if inner.mode != Some(Mode::Alone) {
            return None;
        }
        let Inner { journal, alone, .. } = &mut *inner;
        let (Some(journal), Some(alone)) = (journal.as_mut(), alone.as_mut()) else {
            return None;
        };
        if let Err(e) = journal.append(entry) {
            return Some(Err(e));
        }
        Some(Ok(alone.apply_recording(entry)))
    }

    /// Reads the ledger this host serves from: its alone ledger while alone, else the
    /// applied one.
    pub fn read<R>(&self, consensus: &Consensus, f: impl FnOnce(&Ledger) -> R) -> R {
        let inner = self.lock();
        if inner.mode == Some(Mode::Alone)
            && let Some(ledger) = &inner.alone
        {
            return f(ledger);
        }
        drop(inner);
        consensus.read(f)
    }

    /// The other host asks for this host's alone state (it drives the merge): this host
    /// stops serving alone and opens its Raft routes.
    pub async fn handover(&self, state: &SharedState) -> Handover {
        let answer = {
            let mut inner = self.lock();
            match inner.mode {
                Some(Mode::Alone) => {
                    let epoch = inner.journal.as_ref().map_or(0, |j| j.epoch);
                    let handed = inner.alone.take().and_then(|ledger| ledger.alone_state());
                    let handed = handed.map(|mut s| {
                        s.epoch = epoch;
                        s
                    });
                    inner.handed = handed.clone();
                    self.set_mode(&mut inner, state, Mode::Recovering);
                    Some(handed)
                }
                Some(Mode::Recovering) => Some(inner.handed.clone()),
                _ => None,
            }
        };
        match answer {
            Some(handed) => {
                state.consensus.pair_link().set_serving_alone(false).await;
                Handover { state: handed }
            }
            None => Handover { state: None },
        }
    }

    /// The other host announced it stops (graceful shutdown).
    pub fn peer_stopping(&self) {
        self.lock().peer_stopped = Some(std::time::Instant::now());
    }

    fn set_mode(&self, inner: &mut Inner, state: &SharedState, mode: Mode) {
        let before = inner.mode;
        inner.mode = Some(mode);
        state.consensus.pair_link().set_own_mode(mode);
        if before != Some(mode) && before.is_some() {
            tracing::info!(from = ?before, to = ?mode, "pair mode");
        }
    }

    /// One look at the link (every [`PAIR_TICK`]); see the module docs.
    pub async fn tick(&self, state: &SharedState) {
        let consensus = &state.consensus;
        let link = consensus.pair_link();
        let me = consensus.node_id();
        let voters = consensus.voter_ids();
        let split = consensus.read(|ledger| ledger.pair_backup_percent());
        let is_pair = voters.len() == 2 && voters.contains(&me) && split.is_some();
        let own_share = if voters.first() == Some(&me) {
            Share::Primary
        } else {
            Share::Backup
        };
        let heard = link.heard_age().unwrap_or_else(|| link.uptime());
        let reachable = link.reachable_age().unwrap_or_else(|| link.uptime());
        let peer_alone = link.peer_alone_age().is_some_and(|age| age < RECENT)
            || link.peer_mode() == Some(Mode::Alone);
        let peer_stopped = {
            let mut inner = self.lock();
            // Heard or reached (a Raft request refused while alone) well after the
            // announcement: it runs again.
            if let Some(at) = inner.peer_stopped
                && at
                    .elapsed()
                    .checked_sub(RECENT)
                    .is_some_and(|since| heard.min(reachable) < since)
            {
                inner.peer_stopped = None;
            }
            inner.peer_stopped.is_some()
        };
        enum Next {
            Stay,
            GoAlone(Share),
            Recover,
            Paired,
        }
        let next = {
            let mut inner = self.lock();
            if inner.journal.is_none() && inner.mode.is_none() {
                match Journal::load(&self.data_dir) {
                    Ok(journal) => inner.journal = journal,
                    Err(e) => inner.last_error = Some(e),
                }
            }
            if !is_pair && inner.journal.is_none() {
                self.set_mode(&mut inner, state, Mode::Off);
                drop(inner);
                self.report_status(state);
                return;
            }
            let share = inner.journal.as_ref().map_or(own_share, |j| j.share);
            match inner.mode.unwrap_or(Mode::Off) {
                Mode::Off | Mode::Paired => {
                    // A stopped host answers nothing more: no need to wait for silence.
                    let gone = heard >= ALONE_AFTER || peer_stopped;
                    if inner.journal.is_some() || (gone && !peer_alone) {
                        Next::GoAlone(share)
                    } else if peer_alone && share == Share::Primary {
                        Next::Recover
                    } else {
                        self.set_mode(&mut inner, state, Mode::Paired);
                        Next::Stay
                    }
                }
                Mode::Alone => {
                    // Requests the other host sent while it stopped do not start a recovery.
                    if share == Share::Primary
                        && reachable < RECENT
                        && !peer_stopped
                        && inner.recovery.is_none()
                    {
                        Next::Recover
                    } else {
                        Next::Stay
                    }
                }
                Mode::Recovering => {
                    let merged = consensus.read(|ledger| ledger.merged_epoch(share));
                    // A lost journal (see `go_alone`) has nothing to hand over: this host is
                    // one of the pair again once the other host serves paired, merged.
                    let journal_epoch = inner.journal.as_ref().map_or(0, |j| j.epoch);
                    let lost = consensus
                        .alone_epoch()
                        .is_some_and(|begun| begun > merged && journal_epoch < begun);
                    let own_merged = if lost {
                        heard < RECENT && link.peer_mode() == Some(Mode::Paired)
                    } else {
                        inner.journal.as_ref().is_none_or(|j| merged >= j.epoch)
                    };
                    let driver_done = share != Share::Primary || inner.recovery_done;
                    if own_merged && driver_done {
                        Next::Paired
                    } else if heard >= ALONE_AFTER && reachable >= ALONE_AFTER {
                        Next::GoAlone(share)
                    } else {
                        if share == Share::Primary
                            && inner
                                .recovery
                                .as_ref()
                                .is_none_or(|task| task.is_finished())
                            && !inner.recovery_done
                        {
                            drop(inner);
                            self.spawn_recovery(state);
                        }
                        Next::Stay
                    }
                }
            }
        };
        match next {
            Next::Stay => {}
            Next::GoAlone(share) => self.go_alone(state, share).await,
            Next::Recover => {
                {
                    let mut inner = self.lock();
                    let epoch = inner.journal.as_ref().map_or(0, |j| j.epoch);
                    let own = inner.alone.take().and_then(|ledger| ledger.alone_state());
                    inner.handed = own.map(|mut s| {
                        s.epoch = epoch;
                        s
                    });
                    inner.recovery_done = false;
                    self.set_mode(&mut inner, state, Mode::Recovering);
                }
                link.set_serving_alone(false).await;
                self.spawn_recovery(state);
            }
            Next::Paired => {
                // The pair is one again: the replicated ledger is the truth, and no alone
                // epoch of this host is open any more.
                if consensus.alone_epoch().is_some()
                    && let Err(e) = consensus.set_alone_epoch(None).await
                {
                    self.lock().last_error = Some(format!("clearing the alone epoch: {e}"));
                    return;
                }
                let mut inner = self.lock();
                if let Some(journal) = inner.journal.take()
                    && let Err(e) = journal.delete()
                {
                    inner.last_error = Some(e);
                }
                inner.handed = None;
                inner.recovery = None;
                inner.recovery_done = false;
                self.set_mode(&mut inner, state, Mode::Paired);
            }
        }
        self.report_status(state);
    }

    /// Starts (or restarts) serving alone: Raft routes closed first, then the alone ledger
    /// built from the applied ledger, the whole log and the journal.
    async fn go_alone(&self, state: &SharedState, share: Share) {
        let consensus = &state.consensus;
        if let Some(task) = self.lock().recovery.take() {
            task.abort();
        }
        let merged = consensus.read(|ledger| ledger.merged_epoch(share));
        let epoch = {
            let mut inner = self.lock();
            // The store records each alone epoch begun until it is merged: a journal missing,
            // or older than that record, was deleted or put back from a copy, and serving
            // alone from it would issue the share's licenses a second time (attack T11).
            let previous_epoch = inner.journal.as_ref().map_or(0, |j| j.epoch);
            if let Some(begun) = consensus.alone_epoch()
                && begun > merged
                && previous_epoch < begun
            {
                let error = lost_journal_error(&self.data_dir, begun, inner.journal.as_ref());
                if inner.last_error.as_deref() != Some(error.as_str()) {
                    tracing::error!(%error, "not serving alone");
                    state.notifier.emit(
                        state.stamper.now_ms(),
                        "pair_journal_lost",
                        "critical",
                        error.clone(),
                        serde_json::json!({"epoch": begun}),
                    );
                }
                inner.last_error = Some(error);
                self.set_mode(&mut inner, state, Mode::Recovering);
                None
            } else {
                drop(inner.journal.take());
                Some(
                    (merged + 1)
                        .max(previous_epoch + 1)
                        .max(state.stamper.now_ms().max(0) as u64),
                )
            }
        };
        // Refused: its Raft routes stay open (it holds nothing alone), so the pair can merge.
        let Some(epoch) = epoch else {
            consensus.pair_link().set_serving_alone(false).await;
            return;
        };
        consensus.pair_link().set_serving_alone(true).await;
        let began = Journal::begin(&self.data_dir, share, epoch);
        let recorded = match &began {
            Ok(_) => consensus
                .set_alone_epoch(Some(epoch))
                .await
                .map_err(|e| format!("recording the alone epoch in the store: {e}")),
            Err(_) => Ok(()),
        };
        let mut inner = self.lock();
        let journal = match (began, recorded) {
            (Ok(journal), Ok(())) => journal,
            (Err(e), _) | (Ok(_), Err(e)) => {
                // Without a journal nothing may be served alone.
                inner.last_error = Some(e);
                self.set_mode(&mut inner, state, Mode::Recovering);
                return;
            }
        };
        let mut ledger = consensus.alone_ledger(share);
        for entry in &journal.commands {
            ledger.apply(entry);
        }
        tracing::warn!(
            ?share,
            epoch,
            replayed = journal.commands.len(),
            "the other host of the pair is out of reach: serving alone from this host's share"
        );
        inner.journal = Some(journal);
        inner.alone = Some(ledger);
        inner.handed = None;
        inner.recovery_done = false;
        self.set_mode(&mut inner, state, Mode::Alone);
    }

    fn spawn_recovery(&self, state: &SharedState) {
        let task_state = state.clone();
        let task = tokio::spawn(async move {
            let result = recover(&task_state).await;
            let pair = &task_state.pair;
            let mut inner = pair.lock();
            match result {
                Ok(report) => {
                    inner.recovery_done = true;
                    inner.last_error = None;
                    if report.is_some() {
                        inner.last_merge = report;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pair recovery");
                    inner.last_error = Some(e);
                }
            }
        });
        let mut inner = self.lock();
        if let Some(old) = inner.recovery.replace(task) {
            old.abort();
        }
    }

    /// Notifies on a change of the pair status (and keeps the metric current).
    fn report_status(&self, state: &SharedState) {
        let status = self.status(state);
        let text = status.pair_status.clone();
        let changed = {
            let mut inner = self.lock();
            let changed = inner.last_status.as_deref() != Some(text.as_str());
            inner.last_status = Some(text.clone());
            changed
        };
        if status.mode == Mode::Off {
            return;
        }
        state.metrics.set_pair_status(&text);
        if changed {
            let severity = if text == PAIRED_AND_AVAILABLE {
                "info"
            } else {
                "warning"
            };
            state.notifier.emit(
                state.stamper.now_ms(),
                "pair_status",
                severity,
                format!("pair status: {text}"),
                serde_json::to_value(&status).unwrap_or_default(),
            );
        }
    }

    /// This host's view of the pair.
    pub fn status(&self, state: &SharedState) -> PairStatus {
        let consensus = &state.consensus;
        let link = consensus.pair_link();
        let me = consensus.node_id();
        let voters: Vec<u64> = consensus.voter_ids().into_iter().collect();
        let split = consensus.read(|ledger| ledger.pair_backup_percent());
        let inner = self.lock();
        let mode = inner.mode.unwrap_or(Mode::Off);
        let heard = link.heard_age();
        let reachable = link.reachable_age();
        let peer = voters.iter().copied().find(|id| *id != me);
        let peer_status = match (peer, heard, reachable) {
            (None, _, _) => None,
            (Some(_), _, _) if inner.peer_stopped.is_some() => Some(STOPPED),
            (Some(_), Some(age), _) if age < ALONE_AFTER => Some(RUNNING),
            (Some(_), _, Some(age)) if age < ALONE_AFTER => Some(RUNNING),
            (Some(_), None, None) => Some(NOT_AVAILABLE),
            (Some(_), _, _) => Some(DISCONNECTED),
        };
        let lowest = voters.first().copied();
        let peer_is_primary = peer.is_some() && peer == lowest;
        let peer_mode = link.peer_mode();
        let lag = consensus
            .status()
            .followers
            .values()
            .map(|f| f.lag_entries)
            .max()
            .unwrap_or(0);
        let pair_status = pair_status_text(&StatusInputs {
            hosts: voters.len(),
            mode,
            peer_status,
            peer_mode,
            peer_is_primary,
            split,
            lag,
        })
        .to_string();
        let hosts = voters
            .iter()
            .map(|id| PairHost {
                host: *id,
                address: consensus.address(*id),
                role: if Some(*id) == lowest {
                    "primary"
                } else {
                    "backup"
                }
                .to_string(),
                share: if Some(*id) == lowest {
                    Share::Primary
                } else {
                    Share::Backup
                },
                status: if *id == me {
                    RUNNING
                } else {
                    peer_status.unwrap_or(NOT_AVAILABLE)
                }
                .to_string(),
                // The other host's mode only while it answers (else it is not known).
                mode: if *id == me {
                    Some(mode)
                } else {
                    peer_mode.filter(|_| peer_status == Some(RUNNING))
                },
                raft_leader: consensus.primary().map(|(leader, _)| leader) == Some(*id),
            })
            .collect();
        PairStatus {
            view_of: me,
            pair_status,
            mode,
            backup_percent: split,
            hosts,
            journal_commands: inner.journal.as_ref().map_or(0, |j| j.commands.len()),
            alone_epoch: inner.journal.as_ref().map(|j| j.epoch),
            last_merge: inner.last_merge.clone(),
            last_error: inner.last_error.clone(),
            last_contact_ms: heard.map(|age| age.as_millis() as u64),
        }
    }
}

/// Why a host does not serve alone when its alone journal is missing or older than the
/// epoch its store recorded.
fn lost_journal_error(data_dir: &std::path::Path, begun: u64, journal: Option<&Journal>) -> String {
    let path = data_dir.join(journal::JOURNAL_FILE_NAME);
    let found = match journal {
        None => "is missing".to_string(),
        Some(journal) => format!("holds the older epoch {}", journal.epoch),
    };
    format!(
        "the alone journal {} {found}, but this host began serving alone in epoch {begun} and that epoch was not merged: the journal was deleted or put back from a copy, so this host does not serve alone (its leases of that epoch would be issued twice) and serves again once the pair has merged",
        path.display()
    )
}

/// What the pair status is computed from (one host's view).
struct StatusInputs {
    hosts: usize,
    mode: Mode,
    /// The other host's server status, `None` without another host.
    peer_status: Option<&'static str>,
    peer_mode: Option<Mode>,
    peer_is_primary: bool,
    split: Option<u8>,
    /// Log entries the other host misses (leader's view; 0 elsewhere).
    lag: u64,
}

/// The pair status as the reference names it: Recovering while either host merges or still
/// holds alone state; the other host's absence named by its role; Pair not synced while the
/// split is not set or the backup lags; else Paired and Available.
fn pair_status_text(inputs: &StatusInputs) -> &'static str {
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

/// `GET /v1/pair` and `tessera pair status --json`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PairStatus {
    pub view_of: u64,
    /// Paired and Available, Backup not available, Primary not available, Pair not synced,
    /// Recovering (or Not paired).
    pub pair_status: String,
    /// How this host serves: off, paired, alone, recovering.
    pub mode: Mode,
    pub backup_percent: Option<u8>,
    pub hosts: Vec<PairHost>,
    /// Commands this host journaled alone, not merged yet.
    pub journal_commands: usize,
    pub alone_epoch: Option<u64>,
    pub last_merge: Option<MergeReport>,
    pub last_error: Option<String>,
    /// Milliseconds since this host last heard from the other.
    pub last_contact_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PairHost {
    pub host: u64,
    pub address: Option<String>,
    /// By host number: the lower one is the pair's primary.
    pub role: String,
    /// Whose share of each key's licenses this host serves from when alone.
    #[schema(value_type = String, pattern = "^(primary|backup)$")]
    pub share: Share,
    /// Running, Stopped, Disconnected, Backup not available.
    pub status: String,
    pub mode: Option<Mode>,
    /// Holds the Raft leader role now (it moves back to the primary once it caught up).
    pub raft_leader: bool,
}

/// The address of the other host of the pair.
fn peer_address(state: &SharedState) -> Option<(u64, String)> {
    let me = state.consensus.node_id();
    let peer = state
        .consensus
        .voter_ids()
        .into_iter()
        .find(|id| *id != me)?;
    state.consensus.address(peer).map(|addr| (peer, addr))
}

/// Sends a signed pair RPC to `addr` and decodes the answer.
pub async fn call<T: serde::de::DeserializeOwned>(
    state: &SharedState,
    addr: &str,
    rpc: &str,
    body: &serde_json::Value,
) -> Result<T, String> {
    let bytes = serde_json::to_vec(body).map_err(|e| e.to_string())?;
    let time_ms = state.stamper.now_ms();
    let tag = state
        .consensus
        .sign(&rpc_tag_subject(rpc, time_ms), &bytes)
        .ok_or("a pair needs a domain_secret on both hosts")?;
    let answer = state
        .peer_http
        .post(state.peer_url(addr, &format!("/v1/pair/rpc/{rpc}")))
        .header(PAIR_AUTH_HEADER, tag)
        .header(PAIR_TIME_HEADER, time_ms.to_string())
        .header(
            crate::consensus::FROM_HEADER,
            state.consensus.node_id().to_string(),
        )
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .timeout(RPC_TIMEOUT)
        .body(bytes)
        .send()
        .await
        .map_err(|e| format!("cannot reach {addr}: {e}"))?;
    let status = answer.status();
    let text = answer.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{addr} answered {status}: {text}"));
    }
    serde_json::from_str(&text).map_err(|e| format!("{addr} answered {text:?}: {e}"))
}

/// The driving host's merge: the other host's alone state, the Raft leader role, one
/// `MergeAlone`. `Ok(None)`: nothing to merge.
async fn recover(state: &SharedState) -> Result<Option<MergeReport>, String> {
    let (peer, addr) = peer_address(state).ok_or("the pair has no other host")?;
    let handover: Handover = call(
        state,
        &addr,
        "handover",
        &serde_json::json!({"from": state.consensus.node_id()}),
    )
    .await?;
    let own = state.pair.lock().handed.clone();
    let states: Vec<AloneState> = own.into_iter().chain(handover.state).collect();
    if states.is_empty() {
        return Ok(None);
    }
    let deadline = tokio::time::Instant::now() + LEAD_WAIT;
    while !state.consensus.is_primary() {
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "waiting for the Raft leader role to merge (host {peer} leads)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at_ms = state
        .stamper
        .now_ms()
        .max(state.consensus.read(|ledger| ledger.last_at_ms()));
    let applied = state
        .consensus
        .propose(Stamped {
            at_ms,
            command: Command::MergeAlone { states },
        })
        .await
        .map_err(|e| e.to_string())?;
    match applied.outcome {
        Outcome::AloneMerged {
            leases_merged,
            leases_removed,
            leases_dropped,
        } => {
            tracing::info!(
                leases_merged,
                leases_removed,
                leases_dropped,
                "the pair merged what its hosts did alone"
            );
            Ok(Some(MergeReport {
                at_ms,
                leases_merged,
                leases_removed,
                leases_dropped,
            }))
        }
        other => Err(format!("the merge was refused: {other:?}")),
    }
}

/// Tells the other host this one stops (graceful shutdown), so it shows "Stopped".
pub async fn announce_stop(state: &SharedState) {
    if state.pair.mode() == Mode::Off {
        return;
    }
    if let Some((_, addr)) = peer_address(state) {
        let _: Result<serde_json::Value, String> = call(
            state,
            &addr,
            "stopping",
            &serde_json::json!({"from": state.consensus.node_id()}),
        )
        .await;
    }
}

/// The pair's loop (every host with a domain secret runs it; it does nothing unless the
/// host is one of a pair).
pub async fn run(state: SharedState) {
    let mut interval = tokio::time::interval(PAIR_TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        state.pair.tick(&state).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paired() -> StatusInputs {
        StatusInputs {
            hosts: 2,
            mode: Mode::Paired,
            peer_status: Some(RUNNING),
            peer_mode: Some(Mode::Paired),
            peer_is_primary: false,
            split: Some(50),
            lag: 0,
        }
    }

    #[test]
    fn the_pair_status_follows_the_reference() {
        assert_eq!(pair_status_text(&paired()), PAIRED_AND_AVAILABLE);
        let single = StatusInputs {
            hosts: 1,
            peer_status: None,
            ..paired()
        };
        assert_eq!(pair_status_text(&single), NOT_PAIRED);
        // The backup stopped, shut down or vanished: seen from the primary.
        for status in [STOPPED, DISCONNECTED, NOT_AVAILABLE] {
            let gone = StatusInputs {
                mode: Mode::Alone,
                peer_status: Some(status),
                peer_mode: None,
                ..paired()
            };
            assert_eq!(pair_status_text(&gone), BACKUP_NOT_AVAILABLE, "{status}");
        }
        // The primary gone: seen from the backup.
        let primary_gone = StatusInputs {
            mode: Mode::Alone,
            peer_status: Some(DISCONNECTED),
            peer_is_primary: true,
            ..paired()
        };
        assert_eq!(pair_status_text(&primary_gone), PRIMARY_NOT_AVAILABLE);
        // Both running: not synced while the split is unset or the backup lags.
        let unsplit = StatusInputs {
            split: None,
            ..paired()
        };
        assert_eq!(pair_status_text(&unsplit), PAIR_NOT_SYNCED);
        let lagging = StatusInputs {
            lag: SYNC_LAG_MAX + 1,
            ..paired()
        };
        assert_eq!(pair_status_text(&lagging), PAIR_NOT_SYNCED);
        // Merging, on either side.
        let merging = StatusInputs {
            mode: Mode::Recovering,
            ..paired()
        };
        assert_eq!(pair_status_text(&merging), RECOVERING);
        let peer_alone = StatusInputs {
            peer_mode: Some(Mode::Alone),
            ..paired()
        };
        assert_eq!(pair_status_text(&peer_alone), RECOVERING);
        // A recovering host whose peer vanished again still says Recovering until it goes
        // alone again.
        let lost_while_merging = StatusInputs {
            mode: Mode::Recovering,
            peer_status: Some(DISCONNECTED),
            ..paired()
        };
        assert_eq!(pair_status_text(&lost_while_merging), RECOVERING);
    }
}
