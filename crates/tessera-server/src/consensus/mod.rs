//! Consensus: every ledger mutation goes through openraft, from day one.
//!
//! A single host is a one-voter Raft group; a domain of several hosts adds voters. There is
//! one write path: [`Consensus::propose`] appends the stamped command to the replicated log
//! and answers the ledger's outcome once the entry is committed and applied here.
//!
//! # Layout
//! - this file: [`Consensus`] (start, propose, read, status, shutdown), [`ConsensusConfig`],
//!   [`ConsensusError`], [`ConsensusStatus`], and the Raft timing (see [`raft_config`]).
//! - `network`: openraft's network over HTTP/JSON: reqwest POSTs to the peer's
//!   `/v1/raft/...`; failures map to openraft's `Unreachable` / `NetworkError`.
//! - `rpc`: the axum routes serving those POSTs ([`Consensus::router`]).
//! - storage lives in the `tessera-store` crate (SQLite log, ledger state machine).
//!
//! Time is data: the caller stamps `at_ms` on each command before proposing; nothing here
//! reads a clock for the ledger.

mod network;
mod rpc;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, Fatal, ForwardReason, ForwardToLeader, RaftError};
use openraft::{BasicNode, Raft, ServerState, SnapshotPolicy};
use serde::Serialize;
use tessera_core::{Applied, Ledger, LedgerConfig, Stamped};
use tessera_store::{LedgerReader, LedgerStateMachine, Proposal, TypeConfig, WriterStats};

/// The openraft node type used throughout the server.
pub(crate) type RaftNode = Raft<TypeConfig, LedgerStateMachine>;

/// File name of the SQLite store inside the data directory.
pub const STORE_FILE_NAME: &str = "raft.sqlite3";

/// Leader heartbeat period. Followers that miss heartbeats for an election timeout start an
/// election, so the failover gap is roughly one election timeout plus one vote round trip.
pub const HEARTBEAT_INTERVAL_MS: u64 = 50;
/// Election timeout range. 150 ms is three heartbeats, so one late heartbeat (a GC pause, a
/// busy core) does not depose a healthy leader; the 150 ms random spread makes split votes
/// rare; 300 ms max keeps the failover gap well under the 1 s target (aim: 0.5 s).
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 150;
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 300;
/// Sending a whole snapshot to a follower may take long for a big ledger.
pub const INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 60_000;
/// A proposal not committed within this time fails with [`ConsensusError::NoQuorum`].
pub const PROPOSE_TIMEOUT_MS: u64 = 5_000;
/// How long a proposal waits for a new (or cut-off) leader to hear from a quorum before it
/// fails with [`ConsensusError::NoQuorum`]: two election timeouts.
pub const LEADER_LEASE_WAIT_MS: u64 = 2 * ELECTION_TIMEOUT_MAX_MS;
/// How long [`Consensus::start`] waits for a single voter to become leader and catch up.
pub const START_LEADER_WAIT_MS: u64 = 10_000;

/// The openraft configuration: timing above, snapshots every
/// [`tessera_store::SNAPSHOT_EVERY_LOGS`] entries with the log behind them purged.
pub fn raft_config() -> Result<openraft::Config, ConsensusError> {
    openraft::Config {
        cluster_name: "tessera".into(),
        heartbeat_interval: HEARTBEAT_INTERVAL_MS,
        election_timeout_min: ELECTION_TIMEOUT_MIN_MS,
        election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
        install_snapshot_timeout: INSTALL_SNAPSHOT_TIMEOUT_MS,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(tessera_store::SNAPSHOT_EVERY_LOGS),
        max_in_snapshot_log_to_keep: tessera_store::LOGS_KEPT_AFTER_SNAPSHOT,
        ..openraft::Config::default()
    }
    .validate()
    .map_err(|e| ConsensusError::Config(e.to_string()))
}

pub struct ConsensusConfig {
    /// Where the SQLite store ([`STORE_FILE_NAME`]) lives; created if missing.
    pub data_dir: PathBuf,
    /// This host's number in the domain.
    pub node_id: u64,
    /// `host:port` where peers reach this host's `/v1/raft/...` routes.
    pub advertise_addr: String,
    pub ledger: LedgerConfig,
    /// node id → `host:port` of every voter, this host included. A single host: just itself.
    /// Used only to initialize the group on its very first start; afterwards the membership
    /// in the log rules.
    pub members: BTreeMap<u64, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    #[error("this host is not the primary{}", primary_hint(.primary))]
    NotPrimary { primary: Option<(u64, String)> },
    /// No quorum committed the entry in time. It may still be committed later, so a retry
    /// must be safe to repeat (the ledger's commands are idempotent per lease id).
    #[error("no quorum of the domain's hosts acknowledged the command in time")]
    NoQuorum,
    #[error("storage failed: {0}")]
    Storage(String),
    #[error("consensus is shut down")]
    Shutdown,
    #[error("consensus configuration: {0}")]
    Config(String),
    #[error("consensus: {0}")]
    Internal(String),
}

fn primary_hint(primary: &Option<(u64, String)>) -> String {
    match primary {
        Some((id, addr)) => format!("; the primary is host {id} at {addr}"),
        None => "; no primary is known right now".into(),
    }
}

/// This host's view of the group, from openraft's metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConsensusStatus {
    pub node_id: u64,
    pub role: Role,
    pub current_term: u64,
    pub current_leader: Option<u64>,
    pub last_log_index: Option<u64>,
    pub committed_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub voters: Vec<u64>,
    /// Only on the leader: how far behind each other voter is.
    pub followers: BTreeMap<u64, FollowerStatus>,
    /// SQLite transactions committed by this host's store (each one fsync); with group
    /// commit this grows much slower than the number of proposals under load.
    pub store_transactions: u64,
    pub store_writes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FollowerStatus {
    /// Last log index known replicated to that follower.
    pub matched_index: Option<u64>,
    /// Entries the follower is missing compared to the leader's log.
    pub lag_entries: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    Learner,
    Shutdown,
}

impl From<ServerState> for Role {
    fn from(state: ServerState) -> Role {
        match state {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Shutdown,
        }
    }
}

/// The consensus handle; clones share one Raft node.
#[derive(Clone)]
pub struct Consensus {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: u64,
    raft: RaftNode,
    ledger: LedgerReader,
    store_stats: WriterStats,
    /// Addresses from the configuration, for a leader the log's membership does not name.
    configured_members: BTreeMap<u64, String>,
}

impl Consensus {
    /// Opens the store, starts the Raft node, initializes the group on the first start of
    /// the lowest-numbered member, and, for a single voter, waits until it leads and has
    /// applied its whole log (so reads after `start` see every acknowledged command).
    pub async fn start(cfg: ConsensusConfig) -> Result<Consensus, ConsensusError> {
        let mut members = cfg.members;
        if members.is_empty() {
            members.insert(cfg.node_id, cfg.advertise_addr.clone());
        }
        if members.get(&cfg.node_id) != Some(&cfg.advertise_addr) {
            return Err(ConsensusError::Config(format!(
                "members must map this host ({}) to its advertised address {}",
                cfg.node_id, cfg.advertise_addr
            )));
        }
        let config = Arc::new(raft_config()?);
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            ConsensusError::Storage(format!("cannot create {}: {e}", cfg.data_dir.display()))
        })?;
        let path = cfg.data_dir.join(STORE_FILE_NAME);
        let ledger_config = cfg.ledger;
        let (log_store, state_machine) =
            tokio::task::spawn_blocking(move || tessera_store::open(&path, ledger_config))
                .await
                .map_err(|e| ConsensusError::Internal(e.to_string()))?
                .map_err(|e| ConsensusError::Storage(e.to_string()))?;
        let ledger = state_machine.reader();
        let store_stats = log_store.stats();
        let raft = Raft::new(
            cfg.node_id,
            config,
            network::HttpNetwork::new(),
            log_store,
            state_machine,
        )
        .await
        .map_err(fatal)?;

        let initialized = raft.is_initialized().await.map_err(fatal)?;
        let lowest = members.keys().next().copied();
        let voters: BTreeSet<u64> = if !initialized && lowest == Some(cfg.node_id) {
            let nodes: BTreeMap<u64, BasicNode> = members
                .iter()
                .map(|(id, addr)| (*id, BasicNode::new(addr)))
                .collect();
            tracing::info!(voters = ?nodes.keys().collect::<Vec<_>>(), "initializing the Raft group");
            match raft.initialize(nodes).await {
                Ok(()) => {}
                // Another start raced us to it: the membership is in the log either way.
                Err(RaftError::APIError(openraft::errors::InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(ConsensusError::Internal(e.to_string())),
            }
            members.keys().copied().collect()
        } else {
            // The membership this node holds (empty until a leader contacts a new member).
            raft.with_raft_state(|state| state.membership_state.effective().voter_ids().collect())
                .await
                .map_err(fatal)?
        };

        let consensus = Consensus {
            inner: Arc::new(Inner {
                node_id: cfg.node_id,
                raft,
                ledger,
                store_stats,
                configured_members: members,
            }),
        };
        if voters == BTreeSet::from([cfg.node_id]) {
            consensus.wait_single_voter_ready().await?;
        }
        Ok(consensus)
    }

    async fn wait_single_voter_ready(&self) -> Result<(), ConsensusError> {
        let node_id = self.inner.node_id;
        self.inner
            .raft
            .wait(Some(Duration::from_millis(START_LEADER_WAIT_MS)))
            .metrics(
                |m| {
                    // Leading, and the blank entry of this term applied: every earlier entry is
                    // applied too.
                    m.state == ServerState::Leader
                        && m.current_leader == Some(node_id)
                        && m.last_applied.as_ref().map(|id| id.index()) == m.last_log_index
                },
                "single voter leads and has applied its log",
            )
            .await
            .map(drop)
            .map_err(|e| match e {
                openraft::metrics::WaitError::ShuttingDown => ConsensusError::Shutdown,
                timeout => ConsensusError::Internal(timeout.to_string()),
            })
    }

    /// Appends the stamped command to the log and answers the ledger's outcome once it is
    /// committed and applied on this host. Only the primary accepts proposals.
    pub async fn propose(&self, entry: Stamped) -> Result<Applied, ConsensusError> {
        let raft = &self.inner.raft;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(PROPOSE_TIMEOUT_MS);
        let lease_deadline =
            tokio::time::Instant::now() + Duration::from_millis(LEADER_LEASE_WAIT_MS);
        let proposal = Proposal(entry);
        loop {
            let result = tokio::time::timeout_at(deadline, raft.client_write(proposal.clone()))
                .await
                .map_err(|_| ConsensusError::NoQuorum)?;
            let error = match result {
                Ok(response) => {
                    return response.data.ok_or_else(|| {
                        ConsensusError::Internal(
                            "a normal entry was applied without an outcome".into(),
                        )
                    });
                }
                Err(error) => error,
            };
            match error {
                // A multi-voter leader writes only while a quorum acknowledged it within the
                // lease (the election timeout): not yet right after its election, no longer
                // when cut off. Wait for acknowledgements briefly; then there is no quorum.
                RaftError::APIError(ClientWriteError::ForwardToLeader(forward))
                    if forward.reason == ForwardReason::LeaseExpired =>
                {
                    let mut metrics = raft.metrics();
                    let wait =
                        tokio::time::timeout_at(lease_deadline.min(deadline), metrics.changed());
                    if !matches!(wait.await, Ok(Ok(()))) {
                        return Err(ConsensusError::NoQuorum);
                    }
                }
                RaftError::APIError(ClientWriteError::ForwardToLeader(forward))
                | RaftError::APIError(ClientWriteError::LogEntryDiscarded(forward)) => {
                    return Err(self.not_primary(forward));
                }
                RaftError::APIError(other) => {
                    return Err(ConsensusError::Internal(other.to_string()));
                }
                RaftError::Fatal(fatal_error) => return Err(fatal(fatal_error)),
            }
        }
    }

    fn not_primary(&self, forward: ForwardToLeader<TypeConfig>) -> ConsensusError {
        let primary = match (forward.leader_id, forward.leader_node) {
            (Some(id), Some(node)) => Some((id, node.addr)),
            (Some(id), None) => self.address_of(id).map(|addr| (id, addr)),
            (None, _) => None,
        };
        ConsensusError::NotPrimary { primary }
    }

    /// Reads the ledger as applied on this host, without going through Raft. On a backup it
    /// may lag the primary by the entries not yet applied here.
    pub fn read<R>(&self, f: impl FnOnce(&Ledger) -> R) -> R {
        self.inner.ledger.read(f)
    }

    /// Whether this host currently leads the group (and so may propose and run timers).
    pub fn is_primary(&self) -> bool {
        self.inner.raft.is_leader()
    }

    /// The current leader as (node id, address), if one is known.
    pub fn primary(&self) -> Option<(u64, String)> {
        let leader = self.inner.raft.metrics().borrow_watched().current_leader?;
        self.address_of(leader).map(|addr| (leader, addr))
    }

    /// A node's address: this host's own is the advertised one it was started with (it may
    /// have moved since the membership was written); others' come from the log's membership.
    fn address_of(&self, node_id: u64) -> Option<String> {
        if node_id == self.inner.node_id {
            return self.inner.configured_members.get(&node_id).cloned();
        }
        let metrics = self.inner.raft.metrics();
        let from_log = metrics
            .borrow_watched()
            .membership_config
            .get_node(&node_id)
            .map(|node| node.addr.clone());
        from_log.or_else(|| self.inner.configured_members.get(&node_id).cloned())
    }

    /// Role, leader, log positions and per-follower replication lag, from openraft's metrics.
    pub fn status(&self) -> ConsensusStatus {
        let metrics = self.inner.raft.metrics().borrow_watched().clone();
        let last_log_index = metrics.last_log_index;
        let followers = metrics
            .replication
            .iter()
            .flatten()
            .filter(|(id, _)| **id != metrics.id)
            .map(|(id, matched)| {
                let matched_index = matched.as_ref().map(|log_id| log_id.index());
                let lag_entries = match (last_log_index, matched_index) {
                    (Some(last), Some(matched)) => last.saturating_sub(matched),
                    (Some(last), None) => last + 1,
                    (None, _) => 0,
                };
                (
                    *id,
                    FollowerStatus {
                        matched_index,
                        lag_entries,
                    },
                )
            })
            .collect();
        ConsensusStatus {
            node_id: metrics.id,
            role: metrics.state.into(),
            current_term: metrics.current_term,
            current_leader: metrics.current_leader,
            last_log_index,
            committed_index: metrics.local_committed.as_ref().map(|id| id.index()),
            last_applied_index: metrics.last_applied.as_ref().map(|id| id.index()),
            snapshot_index: metrics.snapshot.as_ref().map(|id| id.index()),
            voters: metrics.membership_config.voter_ids().collect(),
            followers,
            store_transactions: self.inner.store_stats.transactions(),
            store_writes: self.inner.store_stats.writes(),
        }
    }

    /// The Raft RPC routes (`/v1/raft/...`) peers call; merge into the server's router.
    pub fn router(&self) -> axum::Router {
        rpc::router(self.inner.raft.clone())
    }

    /// Stops the Raft node; proposals fail with [`ConsensusError::Shutdown`] afterwards. The
    /// store closes when the last handle is dropped.
    pub async fn shutdown(&self) {
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

fn fatal(error: Fatal<TypeConfig>) -> ConsensusError {
    match error {
        Fatal::Stopped => ConsensusError::Shutdown,
        Fatal::StorageError(e) => ConsensusError::Storage(e.to_string()),
        Fatal::Panicked => ConsensusError::Internal("the Raft core panicked".into()),
    }
}
