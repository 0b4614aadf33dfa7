//! The pair's runtime on real hosts: feeding [`PairMachine`](tessera_engine::pair::PairMachine)
//! every [`PAIR_TICK`] and carrying out its actions (the Raft routes, the
//! alone journal, the alone epoch in the store, the merge task), the signed RPCs between the
//! two hosts, and the status they show. The machine's inputs and the alone ledger are the
//! parent module's ([`Pair`]).

use std::collections::VecDeque;
use std::time::Duration;

use tessera_core::{Command, Outcome, Share, Stamped};
use tessera_engine::pair::{self as engine, Action, JournalMark, PAIRED_AND_AVAILABLE, RUNNING};

use super::journal::{self, Journal};
use super::{
    Handover, LEAD_WAIT, MergeReport, Mode, PAIR_AUTH_HEADER, PAIR_TICK, PAIR_TIME_HEADER, Pair,
    PairError, PairHost, PairStatus, RPC_TIMEOUT, lost_journal_error, rpc_tag_subject,
};
use crate::events::{EventKind, Severity};
use crate::state::SharedState;

impl Pair {
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
