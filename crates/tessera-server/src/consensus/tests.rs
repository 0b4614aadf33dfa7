//! Real Raft over real loopback HTTP: three in-process hosts converge, and a single voter
//! restarts from its SQLite files with the same ledger. Waits use openraft's metrics watch
//! (event-driven, with a deadline), never fixed sleeps.

use std::collections::BTreeMap;
use std::time::Duration;

use tempfile::TempDir;
use tessera_core::{Command, LedgerConfig, Outcome, Stamped};
use tokio::net::TcpListener;

use super::{Consensus, ConsensusConfig, ConsensusError, Role};

const WAIT: Duration = Duration::from_secs(10);

fn ledger_config() -> LedgerConfig {
    LedgerConfig {
        server_id: Some("server-1".into()),
        ..LedgerConfig::default()
    }
}

fn begin_sync(at_ms: i64, nonce: &str) -> Stamped {
    Stamped {
        at_ms,
        command: Command::BeginSync {
            nonce: nonce.into(),
        },
    }
}

async fn bind() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    (listener, addr)
}

fn serve(listener: TcpListener, consensus: &Consensus) -> tokio::task::JoinHandle<()> {
    let router = consensus.router();
    tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    })
}

async fn start(
    dir: &TempDir,
    node_id: u64,
    addr: &str,
    members: &BTreeMap<u64, String>,
) -> Consensus {
    Consensus::start(ConsensusConfig {
        data_dir: dir.path().join(format!("node-{node_id}")),
        node_id,
        advertise_addr: addr.to_string(),
        ledger: ledger_config(),
        members: members.clone(),
        domain_secret: (members.len() > 1).then(|| "a test domain secret".to_string()),
        join: false,
        transport: None,
        peer_scheme: "http",
        store: tessera_store::StoreOptions::default(),
        broken_leader_restore: false,
    })
    .await
    .expect("start consensus")
}

/// Waits (on the metrics watch, with a deadline) until `node` sees `leader` lead. Whichever
/// host wins the first election, the primary's timer hands the lead to the lowest-numbered
/// healthy host, so a test waits for that host before relying on who leads.
async fn leader_seen_by(node: &Consensus, leader: u64) -> u64 {
    node.inner
        .raft
        .wait(Some(WAIT))
        .metrics(
            |m| m.current_leader == Some(leader),
            "the expected leader is known",
        )
        .await
        .expect("leader elected")
        .current_leader
        .unwrap()
}

fn awaited_nonce(node: &Consensus) -> Option<String> {
    node.read(|ledger| ledger.sync_state().awaited.clone().map(|(_, nonce)| nonce))
}

async fn applied_at_least(node: &Consensus, index: u64) {
    node.inner
        .raft
        .wait(Some(WAIT))
        .applied_index_at_least(Some(index), "entries applied")
        .await
        .expect("entries applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_elect_replicate_and_converge() {
    let dir = tempfile::tempdir().unwrap();
    let mut listeners = Vec::new();
    let mut members = BTreeMap::new();
    for node_id in 1..=3 {
        let (listener, addr) = bind().await;
        members.insert(node_id, addr);
        listeners.push(listener);
    }
    let mut nodes = Vec::new();
    let mut servers = Vec::new();
    for (node_id, listener) in (1..=3).zip(listeners) {
        let node = start(&dir, node_id, &members[&node_id], &members).await;
        servers.push(serve(listener, &node));
        nodes.push(node);
    }

    for node in &nodes {
        leader_seen_by(node, 1).await;
    }
    let leader_id = 1;
    let leader = &nodes[(leader_id - 1) as usize];
    // The leader knows it leads once its own metrics say so.
    leader
        .inner
        .raft
        .wait(Some(WAIT))
        .state(openraft::ServerState::Leader, "leader established")
        .await
        .unwrap();
    assert!(leader.is_primary());
    assert_eq!(
        leader.primary(),
        Some((leader_id, members[&leader_id].clone()))
    );

    for (i, nonce) in ["alpha", "beta", "gamma"].into_iter().enumerate() {
        let outcome = leader
            .propose(begin_sync(1_000 * (i as i64 + 1), nonce))
            .await
            .unwrap();
        assert!(
            matches!(&outcome.outcome, Outcome::SyncBegun { nonce: got, .. } if got == nonce),
            "{outcome:?}"
        );
    }
    // Asked of the Raft core itself (metrics may lag): everything proposed is committed.
    let committed = leader
        .inner
        .raft
        .with_raft_state(|state| state.local_committed().map(|log_id| log_id.index()))
        .await
        .unwrap()
        .unwrap();

    for node in &nodes {
        applied_at_least(node, committed).await;
        assert_eq!(node.read(|ledger| ledger.last_at_ms()), 3_000);
        assert_eq!(awaited_nonce(node), Some("gamma".into()));
    }
    let snapshots: Vec<_> = nodes.iter().map(|n| n.read(|l| l.snapshot())).collect();
    assert!(
        snapshots.windows(2).all(|w| w[0] == w[1]),
        "ledgers converge"
    );

    // A backup refuses proposals and names the primary.
    let backup = nodes.iter().find(|n| !n.is_primary()).unwrap();
    match backup.propose(begin_sync(4_000, "delta")).await {
        Err(ConsensusError::NotPrimary { primary }) => {
            assert_eq!(primary, Some((leader_id, members[&leader_id].clone())));
        }
        other => panic!("expected NotPrimary, got {other:?}"),
    }

    let status = leader.status();
    assert_eq!(status.role, Role::Leader);
    assert_eq!(status.voters, vec![1, 2, 3]);
    assert_eq!(status.followers.len(), 2, "{status:?}");
    assert_eq!(backup.status().role, Role::Follower);

    for node in &nodes {
        node.shutdown().await;
    }
    for server in servers {
        server.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_voter_restarts_with_the_same_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let (listener, addr) = bind().await;
    let members = BTreeMap::from([(1, addr.clone())]);
    let node = start(&dir, 1, &addr, &members).await;
    let server = serve(listener, &node);
    // A single voter leads as soon as `start` returns.
    assert!(node.is_primary());
    assert_eq!(node.primary(), Some((1, addr.clone())));

    node.propose(begin_sync(1_000, "one")).await.unwrap();
    node.propose(begin_sync(2_000, "two")).await.unwrap();
    // Snapshot here, so the restart goes through snapshot + re-applied log entries.
    let raft = &node.inner.raft;
    raft.trigger().snapshot().await.unwrap();
    raft.wait(Some(WAIT))
        .metrics(|m| m.snapshot.is_some(), "snapshot built")
        .await
        .unwrap();
    node.propose(begin_sync(3_000, "three")).await.unwrap();
    let before = node.read(|ledger| ledger.snapshot());
    assert_eq!(before.last_at_ms, 3_000);
    node.shutdown().await;
    server.abort();
    drop(node);

    // Restart on a new port: the log's membership is the old address; a single voter never
    // calls itself, so it leads again regardless.
    let (listener, addr) = bind().await;
    let members = BTreeMap::from([(1, addr.clone())]);
    let node = start(&dir, 1, &addr, &members).await;
    let server = serve(listener, &node);
    assert!(node.is_primary());
    assert_eq!(node.primary(), Some((1, addr.clone())));
    assert_eq!(node.read(|ledger| ledger.snapshot()), before);
    assert!(node.status().snapshot_index.is_some());
    // What it would serve from alone (as a pair's host): the same ledger, alone.
    let alone = node.alone_ledger(Default::default(), tessera_core::Share::Primary, &[]);
    assert_eq!(alone.alone(), Some(tessera_core::Share::Primary));
    assert_eq!(alone.snapshot(), before);

    let outcome = node.propose(begin_sync(4_000, "four")).await.unwrap();
    assert!(matches!(outcome.outcome, Outcome::SyncBegun { .. }));
    node.shutdown().await;
    server.abort();
}

/// Group commit: many concurrent proposals share few Raft entries and few SQLite
/// transactions (fsyncs), and each proposer gets the outcome of its own command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_proposals_share_entries_and_fsyncs() {
    const CLIENTS: usize = 256;
    let dir = tempfile::tempdir().unwrap();
    let (_listener, addr) = bind().await;
    let members = BTreeMap::from([(1, addr.clone())]);
    let node = start(&dir, 1, &addr, &members).await;
    let before = node.status();
    let proposals = (0..CLIENTS).map(|i| {
        let node = node.clone();
        tokio::spawn(async move {
            node.propose(begin_sync(1_000 + i as i64, &format!("n{i}")))
                .await
        })
    });
    for (i, outcome) in futures::future::join_all(proposals)
        .await
        .into_iter()
        .enumerate()
    {
        match outcome.unwrap().map(|a| a.outcome) {
            Ok(Outcome::SyncBegun { nonce, .. }) => assert_eq!(nonce, format!("n{i}")),
            other => panic!("proposal {i}: {other:?}"),
        }
    }
    let after = node.status();
    let transactions = after.store_transactions - before.store_transactions;
    let entries = after.last_log_index.unwrap() - before.last_log_index.unwrap();
    eprintln!(
        "{CLIENTS} concurrent proposals committed in {entries} entries, {transactions} transactions"
    );
    assert!(
        transactions < CLIENTS as u64 / 4,
        "{transactions} transactions for {CLIENTS} proposals"
    );
    assert!(
        entries < CLIENTS as u64 / 4,
        "{entries} entries for {CLIENTS} proposals"
    );
    node.shutdown().await;
}

/// The proposal queue is bounded: a command beyond it is refused at once (`overloaded`, so
/// the station retries), and one after shutdown is refused as such.
#[test]
fn a_full_proposal_queue_refuses_instead_of_growing() {
    let (sender, mut receiver) = tokio::sync::mpsc::channel(1);
    let item = || (begin_sync(1, "n"), tokio::sync::oneshot::channel().0);
    super::enqueue(&sender, item()).expect("room for one");
    assert!(matches!(
        super::enqueue(&sender, item()),
        Err(ConsensusError::Overloaded)
    ));
    assert!(receiver.try_recv().is_ok());
    super::enqueue(&sender, item()).expect("room again once the batcher took it");
    drop(receiver);
    assert!(matches!(
        super::enqueue(&sender, item()),
        Err(ConsensusError::Shutdown)
    ));
    assert_eq!(
        crate::error::ApiError::Consensus(ConsensusError::Overloaded)
            .status_and_code()
            .1,
        "overloaded"
    );
}
