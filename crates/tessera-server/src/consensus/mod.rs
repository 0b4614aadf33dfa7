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
//! - `auth`: the HMAC tag (domain secret) every RPC between the hosts of a domain carries.
//! - primary placement: in a domain, a timer on the primary hands leadership to the
//!   lowest-numbered host once it is healthy and caught up ([`Consensus::start`]).
//! - storage lives in the `tessera-store` crate (SQLite log, ledger state machine).
//!
//! Time is data: the caller stamps `at_ms` on each command before proposing; nothing here
//! reads a clock for the ledger.

mod auth;
pub use auth::FROM_HEADER;
mod network;
pub use network::{
    PeerTransport, RaftTransport, TransportError, TransportFuture, TransportRequest,
    TransportResponse,
};
pub mod pair_link;
mod rpc;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, Fatal, ForwardReason, ForwardToLeader, RaftError};
use openraft::{BasicNode, Instant as _, Raft, ServerState, SnapshotPolicy};
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
/// How often a proposal retries while the leader waits for a quorum's acknowledgement.
pub const LEASE_RETRY_MS: u64 = 10;
/// How long [`Consensus::start`] waits for a single voter to become leader and catch up.
pub const START_LEADER_WAIT_MS: u64 = 10_000;

/// The openraft configuration: timing above, snapshots every
/// [`tessera_store::SNAPSHOT_EVERY_LOGS`] entries with the log behind them purged.
///
/// A restarted leader never takes its leadership back without an election
/// (`enable_leader_restore: false`). openraft replicates entries as soon as the log store has
/// accepted them, before they are durable on the leader itself; a leader killed then comes
/// back with a shorter log than its followers. Restored as leader of the same term, it would
/// number its next entries from its own shorter log, so one log id would name two different
/// entries: followers skip the new entry as already held, acknowledged leases vanish and
/// licenses are issued twice (ARCHITECTURE.md, "A restarted leader stands for election").
/// An election costs a new term, and the vote goes only to a host whose log is at least as
/// up to date as a majority's.
pub fn raft_config() -> Result<openraft::Config, ConsensusError> {
    openraft::Config {
        enable_leader_restore: Some(false),
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
    /// The domain secret signing the Raft RPCs (required with several members).
    pub domain_secret: Option<String>,
    /// Joining a running domain: never initialize the group here; wait for the primary to
    /// add this host (`add_host`).
    pub join: bool,
    /// How Raft RPCs travel: `None` for real HTTP in clear; a [`PeerTransport`] with TLS
    /// for HTTPS peers; a simulated network in `tessera-sim`.
    pub transport: Option<Arc<dyn network::RaftTransport>>,
    /// `http` or `https`: how peers' URLs are written (`https` needs a transport with TLS).
    pub peer_scheme: &'static str,
    /// How the store writes (inline without fsync only in simulations).
    pub store: tessera_store::StoreOptions,
    /// A deliberately broken rule, for the simulator to show that it catches it: a restarted
    /// leader takes its leadership back without an election (openraft's
    /// `enable_leader_restore`), which splits the log after a crash (see [`raft_config`]).
    /// Always `false` in the server.
    pub broken_leader_restore: bool,
}

/// A backup whose last acknowledged contact with the primary is older than this is reported
/// unhealthy, and is not handed the primary role.
pub const HEALTHY_CONTACT_MS: u64 = 1_000;
/// How long adding a host (its catching up included) or changing the voters may take.
pub const MEMBERSHIP_TIMEOUT_MS: u64 = 60_000;
/// How often the primary checks whether a lower-numbered host could take over.
pub const PLACEMENT_PERIOD_MS: u64 = 300;

/// What a host of a domain (or pair) does: the primary serves and proposes, a backup
/// follows it and forwards writes to it. Its name is the `role` of the APIs' JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostRole {
    Primary,
    Backup,
}

impl HostRole {
    pub fn as_str(self) -> &'static str {
        match self {
            HostRole::Primary => "primary",
            HostRole::Backup => "backup",
        }
    }
}

impl std::fmt::Display for HostRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One host of the domain as seen from this host (see [`Consensus::domain_view`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostView {
    pub host: u64,
    pub address: Option<String>,
    pub role: HostRole,
    pub healthy: bool,
    /// Log entries the host is missing compared to the primary (known on the primary only).
    pub replication_lag: Option<u64>,
    /// Milliseconds since the primary last had an answer from it (primary's view only).
    pub last_contact_ms: Option<u64>,
}

#[derive(Clone, Debug, thiserror::Error)]
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
    /// More commands are waiting to be proposed than [`PROPOSAL_QUEUE_MAX`]: the station
    /// retries (nothing was proposed).
    #[error(
        "this host has {PROPOSAL_QUEUE_MAX} commands waiting to be proposed: try again shortly"
    )]
    Overloaded,
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
    /// The log, read for a pair host going alone (entries not yet applied here).
    log: tessera_store::LogStore,
    store_stats: WriterStats,
    /// Addresses from the configuration, for a leader the log's membership does not name.
    configured_members: BTreeMap<u64, String>,
    key: Option<auth::DomainKey>,
    placement: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    link: Arc<pair_link::PairLink>,
    /// Commands waiting to be proposed together (see [`batch_proposals`]).
    proposals: tokio::sync::mpsc::Sender<Queued>,
    /// The task asking openraft for a snapshot every
    /// [`tessera_store::SNAPSHOT_EVERY_COMMANDS`] commands (see [`trigger_snapshots`]);
    /// aborted with the last handle, as it holds a Raft handle of its own.
    snapshots: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.snapshots.abort();
    }
}

/// Asks openraft for a snapshot whenever the state machine says enough commands were applied
/// since the last one (openraft's own policy counts entries, which may carry many commands).
async fn trigger_snapshots(raft: RaftNode, signal: tessera_store::SnapshotSignal) {
    loop {
        signal.due().await;
        if let Err(error) = raft.trigger().snapshot().await {
            tracing::warn!(%error, "could not start a snapshot");
            break;
        }
    }
}

/// Where the outcome of one proposed command goes.
type Reply = tokio::sync::oneshot::Sender<Result<Applied, ConsensusError>>;

/// Most commands proposed together in one Raft entry.
pub const BATCH_COMMANDS_MAX: usize = 256;
/// Batches proposed but not yet applied at any time.
pub const BATCHES_IN_FLIGHT: usize = 4;
/// Commands waiting to be proposed, at most: beyond this, a write is refused at once
/// (`overloaded`) instead of the queue growing without bound while the log is slow or a
/// quorum is missing. Far above what the benchmarks queue (one command per client).
pub const PROPOSAL_QUEUE_MAX: usize = 65_536;

type Queued = (Stamped, Reply);

/// Queues a command for [`batch_proposals`], or refuses it when the queue is full.
fn enqueue(
    proposals: &tokio::sync::mpsc::Sender<Queued>,
    item: Queued,
) -> Result<(), ConsensusError> {
    proposals.try_send(item).map_err(|error| match error {
        tokio::sync::mpsc::error::TrySendError::Full(_) => ConsensusError::Overloaded,
        tokio::sync::mpsc::error::TrySendError::Closed(_) => ConsensusError::Shutdown,
    })
}

/// Proposes what the request handlers queued, as group commit: at most
/// [`BATCHES_IN_FLIGHT`] entries are on their way through openraft at a time, and every
/// command that arrived meanwhile goes into the next entry (at most [`BATCH_COMMANDS_MAX`]).
/// Under load one entry, one log row, one apply step and one replication item carry many
/// commands instead of one each; alone, a command waits for nothing. Ends when the consensus
/// handle is dropped.
async fn batch_proposals(
    inner: std::sync::Weak<Inner>,
    mut queue: tokio::sync::mpsc::Receiver<Queued>,
) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    let mut batch = Vec::new();
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        if queue.recv_many(&mut batch, BATCH_COMMANDS_MAX).await == 0 {
            break;
        }
        let Some(inner) = inner.upgrade() else {
            break;
        };
        let consensus = Consensus { inner };
        let (commands, replies): (Vec<Stamped>, Vec<Reply>) =
            std::mem::take(&mut batch).into_iter().unzip();
        tokio::spawn(async move {
            let answers = match consensus.propose_batch(commands).await {
                Ok(outcomes) if outcomes.len() == replies.len() => {
                    outcomes.into_iter().map(Ok).collect()
                }
                Ok(outcomes) => {
                    let error = ConsensusError::Internal(format!(
                        "a batch of {} commands was applied with {} outcomes",
                        replies.len(),
                        outcomes.len()
                    ));
                    vec![Err(error); replies.len()]
                }
                Err(error) => vec![Err(error); replies.len()],
            };
            drop(permit);
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
        });
    }
}

impl Consensus {
    /// Opens the store, starts the Raft node, initializes the group on a pristine host, and,
    /// for a single voter, waits until it leads and has
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
        let key = cfg.domain_secret.as_deref().map(auth::DomainKey::new);
        if members.len() > 1 && key.is_none() {
            return Err(ConsensusError::Config(
                "a domain of several hosts needs a domain secret".into(),
            ));
        }
        let mut config = raft_config()?;
        if cfg.broken_leader_restore {
            config.enable_leader_restore = Some(true);
        }
        let config = Arc::new(config);
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            ConsensusError::Storage(format!("cannot create {}: {e}", cfg.data_dir.display()))
        })?;
        let path = cfg.data_dir.join(STORE_FILE_NAME);
        let ledger_config = cfg.ledger;
        let store_options = cfg.store;
        let transport = cfg
            .transport
            .unwrap_or_else(|| Arc::new(network::PeerTransport::default()));
        let peer_scheme = cfg.peer_scheme;
        let shown = path.display().to_string();
        let (log_store, state_machine) = tokio::task::spawn_blocking(move || {
            tessera_store::open_with(&path, ledger_config, store_options)
        })
        .await
        .map_err(|e| ConsensusError::Internal(e.to_string()))?
        .map_err(|e| ConsensusError::Storage(e.to_string()))?;
        // The log's hash chain is checked before anything is replayed: an entry edited on
        // disk stops the start, named (docs/security.md, T2).
        let breaks = log_store.chain_breaks();
        let snapshot_break = log_store.snapshot_break();
        if !breaks.is_empty() || snapshot_break.is_some() {
            let named: Vec<String> = snapshot_break
                .iter()
                .map(|why| format!("snapshot: {why}"))
                .chain(
                    breaks
                        .iter()
                        .map(|(index, why)| format!("raft log entry {index}: {why}")),
                )
                .collect();
            return Err(ConsensusError::Storage(format!(
                "{shown}: the Raft log's hash chain or its snapshot digest is broken: {}. The data directory was edited: restore it from a backup (`tessera doctor` with the server's flags lists every finding and the way out)",
                named.join("; ")
            )));
        }
        let ledger = state_machine.reader();
        let store_stats = log_store.stats();
        let log = log_store.clone();
        let link = Arc::new(pair_link::PairLink::default());
        let raft = Raft::new(
            cfg.node_id,
            config,
            network::HttpNetwork::new(
                transport,
                peer_scheme,
                key.clone(),
                cfg.node_id,
                link.clone(),
            ),
            log_store,
            state_machine,
        )
        .await
        .map_err(fatal)?;

        let initialized = raft.is_initialized().await.map_err(fatal)?;
        // Every pristine host initializes the group with the configured members. openraft
        // allows this when the configuration is identical on every host (the vote decides the
        // one leader), and it lets any majority serve on the domain's first start, even
        // without the lowest-numbered host. A host with a log never re-initializes.
        let voters: BTreeSet<u64> = if !initialized && !cfg.join {
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
            let (voters, nodes): (BTreeSet<u64>, BTreeMap<u64, String>) = raft
                .with_raft_state(|state| {
                    let membership = state.membership_state.effective();
                    (
                        membership.voter_ids().collect(),
                        membership
                            .nodes()
                            .map(|(id, node)| (*id, node.addr.clone()))
                            .collect(),
                    )
                })
                .await
                .map_err(fatal)?;
            // A data directory that a server ran on as another host (a single server made a
            // pair's backup with --join, say) names this very address under another number:
            // serving it would forward every write to "the primary", itself, for ever.
            if !nodes.contains_key(&cfg.node_id)
                && let Some((other, _)) =
                    nodes.iter().find(|(_, addr)| **addr == cfg.advertise_addr)
            {
                raft.shutdown().await.ok();
                return Err(ConsensusError::Config(format!(
                    "the data directory {} holds the log of host {other} at {} (a license server that ran there before), not of host {}: start it as it ran before (host {other}{}) to use or remove its license keys, or start host {} on a fresh data directory{}",
                    cfg.data_dir.display(),
                    cfg.advertise_addr,
                    cfg.node_id,
                    if *other == 1 && nodes.len() == 1 {
                        ", a single server without [domain] or --join"
                    } else {
                        ""
                    },
                    cfg.node_id,
                    if cfg.join { " with --join" } else { "" },
                )));
            }
            voters
        };

        let (proposals, queue) = tokio::sync::mpsc::channel(PROPOSAL_QUEUE_MAX);
        let snapshots = tokio::spawn(trigger_snapshots(raft.clone(), ledger.snapshot_signal()));
        let consensus = Consensus {
            inner: Arc::new(Inner {
                node_id: cfg.node_id,
                raft,
                ledger,
                log,
                store_stats,
                configured_members: members,
                key,
                placement: std::sync::Mutex::new(None),
                link,
                proposals,
                snapshots,
            }),
        };
        tokio::spawn(batch_proposals(Arc::downgrade(&consensus.inner), queue));
        if voters == BTreeSet::from([cfg.node_id]) {
            // A single voter elects itself at once: wait, so reads after start see every
            // acknowledged command. Several voters need a majority up, which may take any
            // time: the server starts anyway and answers `no_quorum` until then.
            consensus.wait_single_voter_ready().await?;
        } else {
            let task = tokio::spawn(place_primary(consensus.inner.raft.clone()));
            *consensus
                .inner
                .placement
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(task);
        }
        Ok(consensus)
    }

    /// Adds a host to the running domain (primary only): first as a learner until it has
    /// caught up, then as a voter. Returns the voters afterwards.
    pub async fn add_host(&self, host: u64, addr: &str) -> Result<Vec<u64>, ConsensusError> {
        let raft = &self.inner.raft;
        let added = tokio::time::timeout(
            Duration::from_millis(MEMBERSHIP_TIMEOUT_MS),
            raft.add_learner(host, BasicNode::new(addr), true),
        )
        .await
        .map_err(|_| ConsensusError::NoQuorum)?;
        added.map_err(|e| self.membership_error(e))?;
        let mut voters: BTreeSet<u64> = self.voters();
        voters.insert(host);
        self.change_voters(voters).await
    }

    /// Removes a host from the running domain (primary only). Returns the voters afterwards.
    pub async fn remove_host(&self, host: u64) -> Result<Vec<u64>, ConsensusError> {
        let mut voters = self.voters();
        if !voters.remove(&host) {
            return Err(ConsensusError::Config(format!(
                "host {host} is not a member of the domain (members: {:?})",
                self.voters()
            )));
        }
        if voters.is_empty() {
            return Err(ConsensusError::Config(
                "cannot remove the last host of the domain".into(),
            ));
        }
        self.change_voters(voters).await
    }

    fn voters(&self) -> BTreeSet<u64> {
        self.inner
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .voter_ids()
            .collect()
    }

    async fn change_voters(&self, voters: BTreeSet<u64>) -> Result<Vec<u64>, ConsensusError> {
        let changed = tokio::time::timeout(
            Duration::from_millis(MEMBERSHIP_TIMEOUT_MS),
            self.inner.raft.change_membership(voters, false),
        )
        .await
        .map_err(|_| ConsensusError::NoQuorum)?;
        changed.map_err(|e| self.membership_error(e))?;
        Ok(self.voters().into_iter().collect())
    }

    fn membership_error(
        &self,
        error: RaftError<TypeConfig, ClientWriteError<TypeConfig>>,
    ) -> ConsensusError {
        match error {
            RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
                self.not_primary(forward)
            }
            RaftError::APIError(other) => ConsensusError::Config(other.to_string()),
            RaftError::Fatal(fatal_error) => fatal(fatal_error),
        }
    }

    /// Waits up to `timeout` until some host is known to lead; returns it with its address.
    pub async fn wait_primary(&self, timeout: Duration) -> Option<(u64, String)> {
        let wait = self
            .inner
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a primary is known")
            .await;
        match wait {
            Ok(_) => self.primary(),
            Err(_) => None,
        }
    }

    /// The domain's hosts as this host sees them. The primary knows every backup's lag and
    /// last contact; a backup knows only itself and who the primary is.
    pub fn domain_view(&self) -> Vec<HostView> {
        let metrics = self.inner.raft.metrics().borrow_watched().clone();
        let me = metrics.id;
        let leader = metrics.current_leader;
        let leading = metrics.state == ServerState::Leader;
        let quorum_fresh = metrics
            .last_quorum_acked
            .as_ref()
            .is_some_and(|at| at.elapsed() < Duration::from_millis(HEALTHY_CONTACT_MS));
        let last_log_index = metrics.last_log_index;
        let mut ids: BTreeSet<u64> = metrics.membership_config.voter_ids().collect();
        ids.extend(metrics.membership_config.nodes().map(|(id, _)| *id));
        if ids.is_empty() {
            ids.extend(self.inner.configured_members.keys().copied());
        }
        ids.into_iter()
            .map(|id| {
                let role = if Some(id) == leader {
                    HostRole::Primary
                } else {
                    HostRole::Backup
                };
                let address = self.address_of(id);
                if id == me {
                    let healthy = if leading {
                        quorum_fresh || ids_is_single(&metrics)
                    } else {
                        leader.is_some() && metrics.state == ServerState::Follower
                    };
                    return HostView {
                        host: id,
                        address,
                        role: if leading {
                            HostRole::Primary
                        } else {
                            HostRole::Backup
                        },
                        healthy,
                        replication_lag: leading.then_some(0),
                        last_contact_ms: leading.then_some(0),
                    };
                }
                if !leading {
                    return HostView {
                        host: id,
                        address,
                        role,
                        healthy: false,
                        replication_lag: None,
                        last_contact_ms: None,
                    };
                }
                let last_contact_ms = metrics
                    .heartbeat
                    .as_ref()
                    .and_then(|h| h.get(&id).cloned().flatten())
                    .map(|at| at.elapsed().as_millis() as u64);
                let matched = metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).cloned().flatten())
                    .map(|log_id| log_id.index());
                let replication_lag = match (last_log_index, matched) {
                    (Some(last), Some(matched)) => Some(last.saturating_sub(matched)),
                    (Some(last), None) => Some(last + 1),
                    (None, _) => Some(0),
                };
                HostView {
                    host: id,
                    address,
                    role,
                    healthy: last_contact_ms.is_some_and(|ms| ms < HEALTHY_CONTACT_MS),
                    replication_lag,
                    last_contact_ms,
                }
            })
            .collect()
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

    /// Appends the stamped command to the log (in one entry with the commands proposed while
    /// earlier entries were in flight, see [`BATCHES_IN_FLIGHT`]) and answers the ledger's
    /// outcome once it is committed and applied on this host. Only the primary accepts
    /// proposals.
    pub async fn propose(&self, entry: Stamped) -> Result<Applied, ConsensusError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        enqueue(&self.inner.proposals, (entry, reply))?;
        answer.await.map_err(|_| ConsensusError::Shutdown)?
    }

    /// Appends the commands as one entry; answers their outcomes in order.
    async fn propose_batch(&self, commands: Vec<Stamped>) -> Result<Vec<Applied>, ConsensusError> {
        let raft = &self.inner.raft;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(PROPOSE_TIMEOUT_MS);
        let lease_deadline =
            tokio::time::Instant::now() + Duration::from_millis(LEADER_LEASE_WAIT_MS);
        let proposal = Proposal(commands);
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
                // (A pause, not a wait for the next metrics change: a leader's metrics change
                // on every loop of its core, and retrying on each change kept a cut-off
                // leader's core and this loop busy until the lease wait ran out — forever in
                // simulated time, found by `tessera-sim --domain`.)
                RaftError::APIError(ClientWriteError::ForwardToLeader(forward))
                    if forward.reason == ForwardReason::LeaseExpired =>
                {
                    let retry_at =
                        tokio::time::Instant::now() + Duration::from_millis(LEASE_RETRY_MS);
                    if retry_at > lease_deadline.min(deadline) {
                        return Err(ConsensusError::NoQuorum);
                    }
                    tokio::time::sleep_until(retry_at).await;
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

    /// The ledger this host would serve from alone, as `share`'s host of a redundant pair: a
    /// copy of the applied ledger with every entry of its log after it, then `journal` (see
    /// `tessera_engine::pair::alone_ledger`).
    pub fn alone_ledger(
        &self,
        rules: tessera_engine::pair::Rules,
        share: tessera_core::Share,
        journal: &[tessera_core::Stamped],
    ) -> Ledger {
        let (applied, tail) =
            tessera_store::applied_and_log_tail(&self.inner.ledger, &self.inner.log);
        tessera_engine::pair::alone_ledger(rules, applied, tail, share, journal)
    }

    /// This host's Raft log hash chain as stored: its head and the chain value at `at`.
    pub async fn log_chain(&self, at: Option<u64>) -> std::io::Result<tessera_store::ChainRead> {
        self.inner.log.read_chain(at).await
    }

    /// The alone epoch this host's store records as begun and not merged (a pair host).
    pub fn alone_epoch(&self) -> Option<u64> {
        self.inner.log.alone_epoch()
    }

    /// Records durably that this host serves alone in `epoch` (`None`: merged).
    pub async fn set_alone_epoch(&self, epoch: Option<u64>) -> std::io::Result<()> {
        self.inner.log.set_alone_epoch(epoch).await
    }

    /// This host's log as (index, log id, digest of the entry), for checking that no two hosts
    /// hold different entries under one log id (see `LogStore::digests`).
    pub fn log_digests(&self) -> Vec<(u64, tessera_store::types::LogId, u64)> {
        self.inner.log.digests()
    }

    /// The link to the other host of a redundant pair, as the Raft traffic shows it.
    pub fn pair_link(&self) -> &pair_link::PairLink {
        &self.inner.link
    }

    /// The voters of the group, from the membership this host knows.
    pub fn voter_ids(&self) -> BTreeSet<u64> {
        self.voters()
    }

    /// This host's number.
    pub fn node_id(&self) -> u64 {
        self.inner.node_id
    }

    /// Signs a pair RPC body with the domain secret (`None`: no secret configured).
    pub fn sign(&self, rpc: &str, body: &[u8]) -> Option<String> {
        self.inner.key.as_ref().map(|key| key.sign(rpc, body))
    }

    /// Checks a pair RPC's tag against the domain secret.
    pub fn verify(&self, rpc: &str, body: &[u8], tag: &str) -> bool {
        self.inner
            .key
            .as_ref()
            .is_some_and(|key| key.verify(rpc, body, tag))
    }

    /// The stored log entries carrying a signed object that does not verify, as
    /// (log index, what and why), read from the log itself (whether replayed yet or not).
    pub fn unverified_log_entries(&self) -> Vec<(u64, tessera_core::Unverified)> {
        let entries = self.inner.log.proposal_entries();
        self.read(|ledger| {
            entries
                .iter()
                .flat_map(|(index, batch)| {
                    batch.iter().filter_map(move |stamped| {
                        ledger
                            .unverified_command(&stamped.command)
                            .map(|why| (*index, why))
                    })
                })
                .collect()
        })
    }

    /// Asks openraft to write a snapshot now (it does so in the background; normally every
    /// [`tessera_store::SNAPSHOT_EVERY_COMMANDS`] commands).
    pub async fn snapshot_now(&self) -> Result<(), ConsensusError> {
        self.inner
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| ConsensusError::Internal(e.to_string()))
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

    /// A host's address (see `address_of`).
    pub fn address(&self, node_id: u64) -> Option<String> {
        self.address_of(node_id)
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
        rpc::router(
            self.inner.raft.clone(),
            self.inner.key.clone(),
            self.inner.link.clone(),
        )
    }

    /// Stops the Raft node; proposals fail with [`ConsensusError::Shutdown`] afterwards. The
    /// store closes when the last handle is dropped.
    pub async fn shutdown(&self) {
        let placement = self
            .inner
            .placement
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = placement {
            task.abort();
        }
        self.inner.snapshots.abort();
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

fn ids_is_single(metrics: &openraft::RaftMetrics<TypeConfig>) -> bool {
    metrics.membership_config.voter_ids().count() <= 1
}

/// The primary's timer: the primary is the lowest-numbered healthy host. When a voter with a
/// lower number than this leader answers heartbeats and has every entry, leadership is
/// handed to it (openraft's leader transfer: the target is told to elect itself at once, so
/// the gap is one vote round trip; proposals caught in between fail with `NotPrimary` and the
/// HTTP layer retries them on the new primary).
async fn place_primary(raft: RaftNode) {
    let mut interval = tokio::time::interval(Duration::from_millis(PLACEMENT_PERIOD_MS));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let metrics = raft.metrics().borrow_watched().clone();
        match metrics.state {
            ServerState::Shutdown => return,
            ServerState::Leader => {}
            _ => continue,
        }
        let Some(last) = metrics.last_log_index else {
            continue;
        };
        let target = metrics
            .membership_config
            .voter_ids()
            .filter(|id| *id < metrics.id)
            .find(|id| {
                let caught_up = metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
                    .is_some_and(|log_id| log_id.index() >= last);
                let fresh = metrics
                    .heartbeat
                    .as_ref()
                    .and_then(|h| h.get(id).cloned().flatten())
                    .is_some_and(|at| at.elapsed() < Duration::from_millis(HEALTHY_CONTACT_MS));
                caught_up && fresh
            });
        if let Some(target) = target {
            tracing::info!(
                from = metrics.id,
                to = target,
                "handing the primary role to the lower-numbered host"
            );
            if raft.trigger().transfer_leader(target).await.is_err() {
                return;
            }
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
