//! A redundant pair: a domain of two hosts that keeps serving when the hosts lose each other,
//! without ever issuing, between them, more than a key holds (docs/pair.md).
//!
//! The rules are `tessera_engine::pair` (when a host serves paired, alone or not at all, and
//! when it merges); the ledger side (shares, serving alone, the merge) is
//! `tessera_core::ledger::pair`. This module is their runtime on real hosts: it reads the
//! link from the Raft traffic ([`PairLink`]), feeds the machine every [`PAIR_TICK`], and
//! carries out its actions: the Raft routes closed while alone, the alone journal
//! ([`journal::Journal`], fsync before each answer), the alone epoch in the store, the merge
//! task (the other host's alone state, the Raft leader role, one `MergeAlone`).
//!
//! An entry proposed before and committed after the pair fell out of step is not
//! acknowledged (503 `pair_recovering`; the station retries, and checkout is idempotent per
//! station).

pub use tessera_store::journal;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tessera_core::{AloneState, Applied, Command, Ledger, Outcome, Share, Stamped};
use tessera_engine::pair::{self as engine, Action, JournalMark, PairMachine, Rules, Timing};

use crate::consensus::Consensus;
pub use crate::consensus::pair_link::Mode;
use crate::consensus::pair_link::PairLink;
use crate::events::{EventKind, Severity};
use crate::state::SharedState;
use journal::Journal;

/// How often each host looks at its link.
pub const PAIR_TICK: Duration = Duration::from_millis(100);
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

struct Inner {
    machine: PairMachine,
    journal: Option<Journal>,
    alone: Option<Ledger>,
    /// Alone state handed over (the other host asked) or kept for the merge (this host
    /// drives it).
    handed: Option<AloneState>,
    recovery: Option<tokio::task::JoinHandle<()>>,
    last_merge: Option<MergeReport>,
    last_error: Option<String>,
    last_status: Option<String>,
    /// Why the journal on disk cannot be used (it was edited after it was written): the host
    /// then does as if it were lost, and says why.
    unusable_journal: Option<String>,
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
            inner: Mutex::new(Inner {
                machine: PairMachine::new(Timing::HOSTS, Rules::default()),
                journal: None,
                alone: None,
                handed: None,
                recovery: None,
                last_merge: None,
                last_error: None,
                last_status: None,
                unusable_journal: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn mode(&self) -> Mode {
        self.lock().machine.mode()
    }

    /// Where a command goes now.
    pub fn route(&self, link: &PairLink) -> Route {
        let disturbed = link.disturbed();
        let (now_ms, view) = link.view();
        match self.lock().machine.route(now_ms, &view) {
            engine::Route::Consensus => Route::Consensus { disturbed },
            engine::Route::Alone => Route::Alone,
            engine::Route::Recovering => Route::Recovering,
        }
    }

    /// After a commit: was the pair in step all along (see `PairLink::disturbed`)?
    pub fn still_in_step(&self, link: &PairLink, disturbed: u64) -> bool {
        self.mode() == Mode::Off || link.disturbed() == disturbed
    }

    /// Applies a command to the alone ledger, journaled first. `None`: no longer alone.
    pub fn apply_alone(&self, entry: &Stamped) -> Option<Result<Applied, journal::JournalError>> {
        let mut inner = self.lock();
        if inner.machine.mode() != Mode::Alone {
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
        if inner.machine.mode() == Mode::Alone
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
        let Some(actions) = self.lock().machine.on_handover() else {
            return Handover { state: None };
        };
        self.carry_out(state, actions).await;
        Handover {
            state: self.lock().handed.clone(),
        }
    }

    /// The other host announced it stops (graceful shutdown).
    pub fn peer_stopping(&self, link: &PairLink) {
        let (now_ms, _) = link.view();
        self.lock().machine.on_peer_stopping(now_ms);
    }

    /// One look at the link (every [`PAIR_TICK`]): the machine decides, this host does.
    pub async fn tick(&self, state: &SharedState) {
        let consensus = &state.consensus;
        let actions = {
            let mut inner = self.lock();
            if inner.journal.is_none()
                && inner.unusable_journal.is_none()
                && !inner.machine.started()
            {
                match Journal::load(&self.data_dir) {
                    Ok(journal) => inner.journal = journal,
                    Err(e @ journal::JournalError::Tampered { .. }) => {
                        // With an open alone epoch the machine raises `pair_journal_lost`
                        // (JournalLost); without one it would go unseen but for this.
                        if consensus.alone_epoch().is_none() {
                            tracing::error!(error = %e, "the alone journal was edited");
                            state.notifier.emit(
                                state.stamper.now_ms(),
                                EventKind::PairJournalLost,
                                Severity::Critical,
                                e.to_string(),
                                serde_json::json!({"epoch": null}),
                            );
                        }
                        inner.unusable_journal = Some(e.to_string());
                        inner.last_error = Some(e.to_string());
                    }
                    Err(e) => inner.last_error = Some(e.to_string()),
                }
            }
            let host = engine::Host {
                me: consensus.node_id(),
                voters: consensus.voter_ids().into_iter().collect(),
                journal: inner.journal.as_ref().map(|j| JournalMark {
                    share: j.share,
                    epoch: j.epoch,
                }),
                alone_epoch: consensus.alone_epoch(),
                wall_ms: state.stamper.now_ms(),
            };
            let (now_ms, link) = consensus.pair_link().view();
            consensus.read(|ledger| inner.machine.on_tick(now_ms, ledger, &host, &link))
        };
        if self.carry_out(state, actions).await {
            self.report_status(state);
        }
    }

    /// Carries out the machine's actions in order; a slow one's result goes back to the
    /// machine, and its actions are carried out next. `false`: one failed and the rest were
    /// left for the next tick.
    async fn carry_out(&self, state: &SharedState, actions: Vec<Action>) -> bool {
        let consensus = &state.consensus;
        let link = consensus.pair_link();
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Mode { from, to } => {
                    link.set_own_mode(to);
                    if from.is_some() {
                        tracing::info!(from = ?from, to = ?to, "pair mode");
                    }
                }
                Action::AbortRecovery => {
                    if let Some(task) = self.lock().recovery.take() {
                        task.abort();
                    }
                }
                Action::JournalLost { begun, found } => {
                    let mut inner = self.lock();
                    let error = lost_journal_error(
                        &self.data_dir,
                        begun,
                        found,
                        inner.unusable_journal.as_deref(),
                    );
                    if inner.last_error.as_deref() != Some(error.as_str()) {
                        tracing::error!(%error, "not serving alone");
                        state.notifier.emit(
                            state.stamper.now_ms(),
                            EventKind::PairJournalLost,
                            Severity::Critical,
                            error.clone(),
                            serde_json::json!({"epoch": begun}),
                        );
                    }
                    inner.last_error = Some(error);
                }
                Action::OpenRoutes => link.set_serving_alone(false).await,
                Action::KeepAloneState => {
                    let mut inner = self.lock();
                    let epoch = inner.journal.as_ref().map_or(0, |j| j.epoch);
                    let own = inner.alone.take().and_then(|ledger| ledger.alone_state());
                    inner.handed = own.map(|mut s| {
                        s.epoch = epoch;
                        s
                    });
                }
                Action::StartRecovery => self.spawn_recovery(state),
                Action::GoAlone { share, epoch } => {
                    let begun = self.go_alone(state, share, epoch).await;
                    let next = self.lock().machine.on_alone(begun);
                    queue.extend(next);
                }
                Action::Rejoin => {
                    // The pair is one again: the replicated ledger is the truth, and no alone
                    // epoch of this host is open any more.
                    if consensus.alone_epoch().is_some()
                        && let Err(e) = consensus.set_alone_epoch(None).await
                    {
                        self.lock().last_error = Some(format!("clearing the alone epoch: {e}"));
                        return false;
                    }
                    let mut inner = self.lock();
                    if let Some(journal) = inner.journal.take()
                        && let Err(e) = journal.delete()
                    {
                        inner.last_error = Some(e.to_string());
                    }
                    // A journal that could not be used was replaced by the merge.
                    if inner.unusable_journal.take().is_some()
                        && let Err(e) = Journal::discard(&self.data_dir)
                    {
                        inner.last_error = Some(e.to_string());
                    }
                    inner.handed = None;
                    inner.recovery = None;
                    let next = inner.machine.on_rejoined();
                    queue.extend(next);
                }
            }
        }
        true
    }

    /// Starts (or restarts) serving alone in `epoch`: Raft routes closed first (waiting for
    /// the RPCs in flight), the journal begun and the epoch recorded in the store, then the
    /// alone ledger built from the applied ledger, the whole log and the journal. `false`:
    /// nothing may be served alone (no journal or no record of its epoch).
    async fn go_alone(&self, state: &SharedState, share: Share, epoch: u64) -> bool {
        let consensus = &state.consensus;
        drop(self.lock().journal.take());
        consensus.pair_link().set_serving_alone(true).await;
        let began = Journal::begin(&self.data_dir, share, epoch);
        if let Err(e @ journal::JournalError::Tampered { .. }) = &began {
            self.lock().unusable_journal = Some(e.to_string());
        }
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
            (Err(e), _) => {
                inner.last_error = Some(e.to_string());
                return false;
            }
            (Ok(_), Err(e)) => {
                inner.last_error = Some(e);
                return false;
            }
        };
        let commands = match journal.commands() {
            Ok(commands) => commands,
            Err(e) => {
                // Kept: its epoch is recorded, and the next attempt reads it again (without
                // it, the next tick would take the journal for lost).
                inner.last_error = Some(e.to_string());
                inner.journal = Some(journal);
                return false;
            }
        };
        let rules = inner.machine.rules();
        let ledger = consensus.alone_ledger(rules, share, &commands);
        tracing::warn!(
            ?share,
            epoch,
            replayed = commands.len(),
            "the other host of the pair is out of reach: serving alone from this host's share"
        );
        inner.journal = Some(journal);
        inner.alone = Some(ledger);
        inner.handed = None;
        true
    }

    fn spawn_recovery(&self, state: &SharedState) {
        let task_state = state.clone();
        let task = tokio::spawn(async move {
            let result = recover(&task_state).await;
            let pair = &task_state.pair;
            let mut inner = pair.lock();
            match result {
                Ok(report) => {
                    inner.machine.on_recovery_finished(true);
                    inner.last_error = None;
                    if report.is_some() {
                        inner.last_merge = report;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pair recovery");
                    inner.machine.on_recovery_finished(false);
                    inner.last_error = Some(e.to_string());
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
                Severity::Info
            } else {
                Severity::Warning
            };
            state.notifier.emit(
                state.stamper.now_ms(),
                EventKind::PairStatus,
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
        let mode = inner.machine.mode();
        let heard = link.heard_age();
        let peer = voters.iter().copied().find(|id| *id != me);
        let (now_ms, view) = link.view();
        let peer_status = inner.machine.peer_status(now_ms, &view, peer.is_some());
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
        let pair_status = engine::status_text(&engine::StatusInputs {
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
                    crate::consensus::HostRole::Primary
                } else {
                    crate::consensus::HostRole::Backup
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
                    peer_status.unwrap_or(engine::NOT_AVAILABLE)
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
            journal_commands: inner.journal.as_ref().map_or(0, |j| j.count),
            alone_epoch: inner.journal.as_ref().map(|j| j.epoch),
            last_merge: inner.last_merge.clone(),
            last_error: inner.last_error.clone(),
            last_contact_ms: heard.map(|age| age.as_millis() as u64),
        }
    }
}

/// Why a host does not serve alone when its alone journal is missing (`found: None`) or older
/// than the epoch its store recorded.
fn lost_journal_error(
    data_dir: &std::path::Path,
    begun: u64,
    found: Option<u64>,
    unusable: Option<&str>,
) -> String {
    if let Some(unusable) = unusable {
        return format!(
            "{unusable}, and this host began serving alone in epoch {begun} and that epoch was not merged: this host does not serve alone (the leases that journal held would be issued twice) and serves again once the pair has merged"
        );
    }
    let path = data_dir.join(journal::JOURNAL_FILE_NAME);
    let found = match found {
        None => "is missing".to_string(),
        Some(epoch) => format!("holds the older epoch {epoch}"),
    };
    format!(
        "the alone journal {} {found}, but this host began serving alone in epoch {begun} and that epoch was not merged: the journal was deleted or put back from a copy, so this host does not serve alone (its leases of that epoch would be issued twice) and serves again once the pair has merged",
        path.display()
    )
}

pub use engine::{
    BACKUP_NOT_AVAILABLE, PAIR_NOT_SYNCED, PAIRED_AND_AVAILABLE, PRIMARY_NOT_AVAILABLE, RECOVERING,
    RUNNING,
};

/// `GET /v1/pair` and `tessera pair status --json`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PairStatus {
    pub view_of: u64,
    /// Paired and Available, Backup not available, Primary not available, Pair not synced,
    /// Recovering (or Not paired).
    pub pair_status: String,
    /// How this host serves: off, paired, alone, recovering.
    #[schema(value_type = String, pattern = "^(off|paired|alone|recovering)$")]
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
    #[schema(value_type = Option<String>, pattern = "^(off|paired|alone|recovering)$")]
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

/// Why a pair RPC or the merge failed (its text is the pair status's `last_error`).
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("a pair needs a domain_secret on both hosts")]
    NoDomainSecret,
    #[error("the pair has no other host")]
    NoOtherHost,
    #[error("cannot reach {addr}: {detail}")]
    Unreachable { addr: String, detail: String },
    #[error("{addr} answered {status}: {text}")]
    Refused {
        addr: String,
        status: reqwest::StatusCode,
        text: String,
    },
    #[error("{addr} answered {text:?}: {detail}")]
    Malformed {
        addr: String,
        text: String,
        detail: String,
    },
    #[error("waiting for the Raft leader role to merge (host {peer} leads)")]
    NotLeading { peer: u64 },
    #[error(transparent)]
    Consensus(#[from] crate::consensus::ConsensusError),
    #[error("the merge was refused: {0}")]
    MergeRefused(String),
}

/// Sends a signed pair RPC to `addr` and decodes the answer.
pub async fn call<T: serde::de::DeserializeOwned>(
    state: &SharedState,
    addr: &str,
    rpc: &str,
    body: &serde_json::Value,
) -> Result<T, PairError> {
    let bytes = serde_json::to_vec(body).expect("a JSON value serializes");
    let time_ms = state.stamper.now_ms();
    let tag = state
        .consensus
        .sign(&rpc_tag_subject(rpc, time_ms), &bytes)
        .ok_or(PairError::NoDomainSecret)?;
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
        .map_err(|e| PairError::Unreachable {
            addr: addr.to_string(),
            detail: e.to_string(),
        })?;
    let status = answer.status();
    let text = answer.text().await.map_err(|e| PairError::Unreachable {
        addr: addr.to_string(),
        detail: e.to_string(),
    })?;
    if !status.is_success() {
        return Err(PairError::Refused {
            addr: addr.to_string(),
            status,
            text,
        });
    }
    serde_json::from_str(&text).map_err(|e| PairError::Malformed {
        addr: addr.to_string(),
        detail: e.to_string(),
        text,
    })
}

/// The driving host's merge: the other host's alone state, the Raft leader role, one
/// `MergeAlone`. `Ok(None)`: nothing to merge.
async fn recover(state: &SharedState) -> Result<Option<MergeReport>, PairError> {
    let (peer, addr) = peer_address(state).ok_or(PairError::NoOtherHost)?;
    let handover: Handover = call(
        state,
        &addr,
        "handover",
        &serde_json::json!({"from": state.consensus.node_id()}),
    )
    .await?;
    let (own, rules) = {
        let inner = state.pair.lock();
        (inner.handed.clone(), inner.machine.rules())
    };
    let states = engine::merge_states(rules, own, handover.state);
    if states.is_empty() {
        return Ok(None);
    }
    let deadline = tokio::time::Instant::now() + LEAD_WAIT;
    while !state.consensus.is_primary() {
        if tokio::time::Instant::now() >= deadline {
            return Err(PairError::NotLeading { peer });
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
        .await?;
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
        other => Err(PairError::MergeRefused(format!("{other:?}"))),
    }
}

/// Tells the other host this one stops (graceful shutdown), so it shows "Stopped".
pub async fn announce_stop(state: &SharedState) {
    if state.pair.mode() == Mode::Off {
        return;
    }
    if let Some((_, addr)) = peer_address(state) {
        let _: Result<serde_json::Value, PairError> = call(
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
