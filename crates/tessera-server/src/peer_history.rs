//! The whole usage history on every host of a pair or domain.
//!
//! Each host records the license events it handles itself: while paired, the primary; while
//! a pair is apart, each host what it served alone; in a domain, whichever host led. So every
//! host copies, every [`PULL_EVERY`], the rows each other host recorded itself (never rows
//! that host copied in turn) over the signed peer RPC `history`, and the Usage Details of
//! either host of a pair show what both served — within seconds of a pair's recovery.
//!
//! - Rows are named by the recording history's instance id (`history_meta.instance`, random
//!   per data directory) and their id there, and stored once (`INSERT OR IGNORE` on that
//!   pair): a pull repeated after a lost answer, or two pulls crossing, add nothing.
//! - The asker sends, per instance, the highest id it holds; the answer holds the next rows
//!   ([`ROWS_PER_CALL`] at most, `more` when there are others).
//! - A host whose data directory was wiped has a new instance: its rows are copied from the
//!   start; what was copied from its old instance stays.
//! - Copies are audited (`usage.copied`, one record per batch) in the copying host's chain.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::history::{HistoryError, UsageEvent};
use crate::pair::PairError;
use crate::state::SharedState;

/// Why rows could not be copied or served.
#[derive(Debug, thiserror::Error)]
pub enum PeerHistoryError {
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error("the history task stopped: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Call(#[from] PairError),
    #[error("host {host} at {addr} has this host's own history (a copied data directory?)")]
    OwnHistory { host: u64, addr: String },
}

/// How often each host pulls the other hosts' new rows.
pub const PULL_EVERY: Duration = Duration::from_secs(2);
/// Most rows one answer carries.
pub const ROWS_PER_CALL: usize = 5_000;

/// Body of the `history` RPC: per instance, the highest row id the asker holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HistoryRequest {
    pub copied: BTreeMap<String, i64>,
}

/// Answer of the `history` RPC: the answering host's own rows after what the asker holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HistoryAnswer {
    pub instance: String,
    pub rows: Vec<(i64, UsageEvent)>,
    /// More rows follow: ask again.
    pub more: bool,
}

/// The answering side of the RPC.
pub async fn answer(
    state: &SharedState,
    request: HistoryRequest,
) -> Result<HistoryAnswer, PeerHistoryError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let instance = state.history.instance().to_string();
        let after = request.copied.get(&instance).copied().unwrap_or(0);
        let mut rows = state.history.own_rows_after(after, ROWS_PER_CALL + 1)?;
        let more = rows.len() > ROWS_PER_CALL;
        rows.truncate(ROWS_PER_CALL);
        Ok(HistoryAnswer {
            instance,
            rows,
            more,
        })
    })
    .await?
}

/// Copies the new rows of the host at `addr`; returns how many arrived.
pub async fn pull_from(
    state: &SharedState,
    host: u64,
    addr: &str,
) -> Result<usize, PeerHistoryError> {
    let mut total = 0;
    loop {
        let history_state = state.clone();
        let copied =
            tokio::task::spawn_blocking(move || history_state.history.copied_up_to()).await??;
        let request = serde_json::json!(HistoryRequest { copied });
        let answer: HistoryAnswer =
            crate::pair::runtime::call(state, addr, "history", &request).await?;
        if answer.instance == state.history.instance() {
            return Err(PeerHistoryError::OwnHistory {
                host,
                addr: addr.to_string(),
            });
        }
        total += answer.rows.len();
        let more = answer.more && !answer.rows.is_empty();
        let at_ms = state.stamper.now_ms();
        let history_state = state.clone();
        tokio::task::spawn_blocking(move || {
            history_state
                .history
                .copy_rows(at_ms, &answer.instance, host, answer.rows)
        })
        .await?;
        if !more {
            return Ok(total);
        }
    }
}

/// Every host of a pair or domain (with a domain secret) runs this loop; alone it does
/// nothing.
pub async fn run(state: SharedState) {
    let mut interval = tokio::time::interval(PULL_EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: BTreeMap<u64, String> = BTreeMap::new();
    loop {
        interval.tick().await;
        let me = state.consensus.node_id();
        for host in state.consensus.voter_ids() {
            if host == me {
                continue;
            }
            let Some(addr) = state.consensus.address(host) else {
                continue;
            };
            match pull_from(&state, host, &addr).await {
                Ok(rows) => {
                    if rows > 0 {
                        tracing::debug!(host, rows, "copied usage history rows");
                    }
                    last_error.remove(&host);
                }
                // Said once per cause: a host that is down is the pair's or domain's news.
                Err(error) => {
                    let error = error.to_string();
                    if last_error.get(&host) != Some(&error) {
                        tracing::debug!(host, %error, "cannot copy usage history rows yet");
                        last_error.insert(host, error);
                    }
                }
            }
        }
    }
}
