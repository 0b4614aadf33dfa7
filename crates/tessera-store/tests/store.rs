//! Integration tests of the SQLite store: openraft's storage suite, plus durability across
//! reopening the file, truncate/purge, snapshots, and re-applying committed entries on start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, Membership, RaftLogReader, RaftSnapshotBuilder,
    StorageError, StorageHelper, StoredMembership, Vote,
};
use tempfile::TempDir;
use tessera_core::{Command, LedgerConfig, Share, Stamped};
use tessera_store::{LedgerStateMachine, LogStore, Proposal, TypeConfig};

type LogIdT = openraft::type_config::alias::LogIdOf<TypeConfig>;
type EntryT = openraft::type_config::alias::EntryOf<TypeConfig>;

/// A store in a fresh directory; `inline`: the simulations' mode (writes on the caller's
/// thread, no fsync).
struct TempStore {
    inline: bool,
}

impl StoreBuilder<TypeConfig, LogStore, LedgerStateMachine, TempDir> for TempStore {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore, LedgerStateMachine), StorageError<TypeConfig>> {
        let dir =
            tempfile::tempdir().map_err(|e| StorageError::write(TypeConfig::err_from_error(&e)))?;
        let options = tessera_store::StoreOptions {
            inline: self.inline,
            ..Default::default()
        };
        let (log, sm) = tessera_store::open_with(&db_path(dir.path()), ledger_config(), options)
            .map_err(|e| StorageError::write(TypeConfig::err_from_error(&e)))?;
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() {
    Suite::test_all(TempStore { inline: false })
        .await
        .expect("openraft storage suite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_with_inline_writes() {
    Suite::test_all(TempStore { inline: true })
        .await
        .expect("openraft storage suite (inline writes)");
}

fn db_path(dir: &Path) -> PathBuf {
    dir.join("raft.sqlite")
}

fn ledger_config() -> LedgerConfig {
    LedgerConfig {
        server_id: Some("server-1".into()),
        ..LedgerConfig::default()
    }
}

fn open(dir: &Path) -> (LogStore, LedgerStateMachine) {
    tessera_store::open(&db_path(dir), ledger_config()).expect("open store")
}

fn log_id(term: u64, index: u64) -> LogIdT {
    LogId::new(
        openraft::impls::leader_id_adv::LeaderId { term, node_id: 1 },
        index,
    )
}

fn blank(term: u64, index: u64) -> EntryT {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Blank,
    }
}

fn begin_sync(term: u64, index: u64, at_ms: i64, nonce: &str) -> EntryT {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Proposal(vec![Stamped {
            at_ms,
            command: Command::BeginSync {
                nonce: nonce.into(),
            },
        }])),
    }
}

fn membership(term: u64, index: u64) -> EntryT {
    let nodes: BTreeMap<u64, BasicNode> = [(1, BasicNode::new("127.0.0.1:1"))].into();
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Membership(Membership::new(vec![[1].into()], nodes).unwrap()),
    }
}

/// Appends and waits for the flush callback, as openraft would.
async fn append(log: &mut LogStore, entries: Vec<EntryT>) {
    let (tx, rx) = TypeConfig::oneshot();
    log.append(entries, IOFlushed::signal(tx))
        .await
        .expect("append");
    rx.await.expect("callback fired").expect("flushed");
}

async fn indexes(log: &mut LogStore) -> Vec<u64> {
    log.try_get_log_entries(..)
        .await
        .expect("read")
        .iter()
        .map(|entry| entry.index())
        .collect()
}

async fn apply(sm: &mut LedgerStateMachine, entries: Vec<EntryT>) {
    let stream = futures::stream::iter(entries.into_iter().map(|entry| Ok((entry, None))));
    sm.apply(stream).await.expect("apply");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_vote_and_committed_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let vote = Vote::new_committed(3, 1);
    {
        let (mut log, _sm) = open(dir.path());
        append(&mut log, vec![membership(1, 1), blank(1, 2)]).await;
        append(&mut log, vec![begin_sync(1, 3, 1_000, "n1")]).await;
        log.save_vote(&vote).await.unwrap();
        log.save_committed(Some(log_id(1, 2))).await.unwrap();
    }
    let (mut log, _sm) = open(dir.path());
    assert_eq!(indexes(&mut log).await, vec![1, 2, 3]);
    let entries = log.try_get_log_entries(3..4).await.unwrap();
    assert_eq!(entries, vec![begin_sync(1, 3, 1_000, "n1")]);
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 2)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(1, 3)));
    assert_eq!(state.last_purged_log_id, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_and_purge_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _sm) = open(dir.path());
        append(&mut log, (1..=10).map(|i| blank(1, i)).collect()).await;
        log.truncate_after(Some(log_id(1, 7))).await.unwrap();
        assert_eq!(indexes(&mut log).await, (1..=7).collect::<Vec<_>>());
        log.purge(log_id(1, 3)).await.unwrap();
        assert_eq!(indexes(&mut log).await, vec![4, 5, 6, 7]);
        // Entries replacing a truncated tail, in a later term.
        append(&mut log, vec![blank(2, 8)]).await;
    }
    let (mut log, _sm) = open(dir.path());
    assert_eq!(indexes(&mut log).await, vec![4, 5, 6, 7, 8]);
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 3)));
    assert_eq!(state.last_log_id, Some(log_id(2, 8)));

    // Purging everything leaves the last purged id as the last log id.
    log.purge(log_id(2, 8)).await.unwrap();
    drop((log, _sm));
    let (mut log, _sm) = open(dir.path());
    assert!(indexes(&mut log).await.is_empty());
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(2, 8)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_round_trip_through_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let expected_meta;
    {
        let (_log, mut sm) = open(dir.path());
        apply(
            &mut sm,
            vec![membership(1, 1), begin_sync(1, 2, 5_000, "nonce-a")],
        )
        .await;
        let snapshot = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 2)));
        assert_eq!(
            snapshot.meta.last_membership,
            StoredMembership::new(Some(log_id(1, 1)), membership_of(&membership(1, 1)))
        );
        expected_meta = snapshot.meta;
    }
    let (_log, mut sm) = open(dir.path());
    let reader = sm.reader();
    assert_eq!(
        reader.last_applied_index(),
        None,
        "starts empty: openraft restores it"
    );
    assert_eq!(
        reader.read(|ledger| ledger.sync_state().awaited.clone()),
        None
    );
    let stored = sm
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("stored snapshot");
    assert_eq!(stored.meta, expected_meta);

    // Install it on a second, empty store, as a follower would.
    let other = tempfile::tempdir().unwrap();
    let (_other_log, mut other_sm) = open(other.path());
    other_sm
        .install_snapshot(&stored.meta, stored.snapshot)
        .await
        .unwrap();
    let other_reader = other_sm.reader();
    assert_eq!(other_reader.read(|ledger| ledger.last_at_ms()), 5_000);
    assert_eq!(
        other_reader.read(|ledger| ledger.sync_state().awaited.clone().map(|(_, nonce)| nonce)),
        Some("nonce-a".to_string())
    );
    assert_eq!(other_reader.last_applied_index(), Some(2));
    assert_eq!(
        other_sm.applied_state().await.unwrap().0,
        Some(log_id(1, 2))
    );
    let installed = other_sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(installed.meta, expected_meta);
}

fn membership_of(entry: &EntryT) -> Membership<u64, BasicNode> {
    match &entry.payload {
        EntryPayload::Membership(membership) => membership.clone(),
        _ => unreachable!(),
    }
}

/// A restarted single voter: snapshot + committed entries after it come back before Raft
/// serves anything, through openraft's own start-up path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_restores_snapshot_and_reapplies_committed_entries() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, mut sm) = open(dir.path());
        let entries = vec![
            membership(1, 0),
            begin_sync(1, 1, 1_000, "first"),
            begin_sync(1, 2, 2_000, "second"),
            begin_sync(1, 3, 3_000, "third"),
        ];
        log.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
        append(&mut log, entries.clone()).await;
        apply(&mut sm, entries[..2].to_vec()).await;
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        apply(&mut sm, entries[2..].to_vec()).await;
        // Entry 3 is applied here but was never known committed: it must not come back.
        log.save_committed(Some(log_id(1, 2))).await.unwrap();
    }
    let (mut log, mut sm) = open(dir.path());
    let reader = sm.reader();
    StorageHelper::new(&mut log, &mut sm)
        .with_id(1)
        .get_initial_state()
        .await
        .expect("initial state");
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 2)));
    assert_eq!(reader.read(|ledger| ledger.last_at_ms()), 2_000);
    assert_eq!(
        reader.read(|ledger| ledger.sync_state().awaited.clone().map(|(_, nonce)| nonce)),
        Some("second".to_string())
    );
}

/// A pair host going alone serves from a copy of its applied ledger plus every entry of its
/// log after it, committed or not; the replicated ledger is left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alone_ledger_applies_the_whole_log_on_a_copy() {
    let dir = TempDir::new().unwrap();
    let (mut log, mut sm) = open(dir.path());
    append(
        &mut log,
        vec![
            blank(1, 1),
            begin_sync(1, 2, 1_000, "applied"),
            begin_sync(1, 3, 2_000, "in-the-log"),
            membership(1, 4),
            begin_sync(1, 5, 3_000, "last"),
        ],
    )
    .await;
    apply(
        &mut sm,
        vec![blank(1, 1), begin_sync(1, 2, 1_000, "applied")],
    )
    .await;
    let reader = sm.reader();
    let (mut alone, tail) = tessera_store::applied_and_log_tail(&reader, &log);
    // The membership entry is not a command.
    assert_eq!(tail.len(), 2);
    for entry in &tail {
        alone.apply(entry);
    }
    alone.set_alone(Some(Share::Backup));
    let awaited = |ledger: &tessera_core::Ledger| ledger.sync_state().awaited.clone();
    // A request's sequence is at least its entry's time.
    assert_eq!(awaited(&alone), Some((3_000, "last".to_string())));
    assert_eq!(reader.read(awaited), Some((1_000, "applied".to_string())));
    assert_eq!(reader.read(|ledger| ledger.alone()), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_due_after_enough_commands_however_they_are_batched() {
    use futures::FutureExt;
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(dir.path());
    let signal = sm.reader().snapshot_signal();
    let batch = |index: u64, from: u64, count: u64| Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(Proposal(
            (from..from + count)
                .map(|i| Stamped {
                    at_ms: 1_000 + i as i64,
                    command: Command::BeginSync {
                        nonce: format!("n{i}"),
                    },
                })
                .collect(),
        )),
    };
    let threshold = tessera_store::SNAPSHOT_EVERY_COMMANDS;
    // Two entries, one command short of the threshold: not due.
    apply(&mut sm, vec![batch(1, 0, 1), batch(2, 1, threshold - 2)]).await;
    assert!(signal.due().now_or_never().is_none());
    // One more entry of one command crosses it.
    apply(&mut sm, vec![batch(3, threshold - 1, 1)]).await;
    assert!(signal.due().now_or_never().is_some());
    // Building the snapshot starts the count again.
    sm.get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    apply(&mut sm, vec![batch(4, threshold, 1)]).await;
    assert!(signal.due().now_or_never().is_none());
}

/// The stored row of `index`: its entry JSON.
fn stored_entry(dir: &Path, index: u64) -> Vec<u8> {
    rusqlite::Connection::open(db_path(dir))
        .unwrap()
        .query_row(
            "SELECT entry FROM raft_log WHERE log_index = ?1",
            [index as i64],
            |row| row.get(0),
        )
        .unwrap()
}

fn set_stored_entry(dir: &Path, index: u64, entry: &[u8]) {
    rusqlite::Connection::open(db_path(dir))
        .unwrap()
        .execute(
            "UPDATE raft_log SET entry = ?1 WHERE log_index = ?2",
            rusqlite::params![entry, index as i64],
        )
        .unwrap();
}

/// Attack T2 at the store: the log's hash chain holds through appends, a truncated tail
/// replaced in a later term, purges and reopening; an entry edited in place, or a row
/// deleted from inside the log, is named at the next open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_hash_chain_holds_through_truncation_and_purge_and_names_an_edited_entry() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _sm) = open(dir.path());
        append(&mut log, (1..=10).map(|i| blank(1, i)).collect()).await;
        log.truncate_after(Some(log_id(1, 7))).await.unwrap();
        append(
            &mut log,
            vec![begin_sync(2, 8, 1_000, "n8"), begin_sync(2, 9, 1_000, "n9")],
        )
        .await;
        log.purge(log_id(1, 3)).await.unwrap();
        append(&mut log, vec![begin_sync(2, 10, 2_000, "n10")]).await;
    }
    let (log, sm) = open(dir.path());
    assert_eq!(log.chain_breaks(), vec![]);
    drop((log, sm));

    // Entry 8's nonce edited in place.
    let original = stored_entry(dir.path(), 8);
    let edited = String::from_utf8(original.clone())
        .unwrap()
        .replace("n8", "m8");
    assert_ne!(edited.as_bytes(), original.as_slice());
    set_stored_entry(dir.path(), 8, edited.as_bytes());
    let (log, sm) = open(dir.path());
    let breaks = log.chain_breaks();
    assert_eq!(breaks.len(), 1, "{breaks:?}");
    assert_eq!(breaks[0].0, 8);
    assert!(breaks[0].1.contains("edited"), "{breaks:?}");
    drop((log, sm));

    // Put back, it is whole again; a row deleted from the middle is named at the next one.
    set_stored_entry(dir.path(), 8, &original);
    rusqlite::Connection::open(db_path(dir.path()))
        .unwrap()
        .execute("DELETE FROM raft_log WHERE log_index = 6", [])
        .unwrap();
    let (log, sm) = open(dir.path());
    let breaks = log.chain_breaks();
    assert_eq!(breaks.len(), 1, "{breaks:?}");
    assert_eq!(breaks[0].0, 7);
    assert!(
        breaks[0].1.contains("does not follow entry 5"),
        "{breaks:?}"
    );
    drop((log, sm));
    let inspection = tessera_store::inspect(&db_path(dir.path())).unwrap();
    assert_eq!(inspection.chain_breaks, breaks);
}

/// A store written before the chain existed (schema 1) is chained by the migration, so an
/// upgraded server starts, and its entries are protected from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_from_before_the_chain_is_chained_by_its_migration() {
    let dir = tempfile::tempdir().unwrap();
    {
        let connection = rusqlite::Connection::open(db_path(dir.path())).unwrap();
        connection
            .execute_batch(include_str!("../migrations/raft/0001_raft.sql"))
            .unwrap();
        connection.pragma_update(None, "user_version", 1).unwrap();
        for index in 1..=4 {
            connection
                .execute(
                    "INSERT INTO raft_log (log_index, entry) VALUES (?1, ?2)",
                    rusqlite::params![index as i64, serde_json::to_vec(&blank(1, index)).unwrap()],
                )
                .unwrap();
        }
    }
    // Inspecting it read-only before the upgrade: nothing to check, nothing broken.
    let inspection = tessera_store::inspect(&db_path(dir.path())).unwrap();
    assert_eq!(inspection.chain_breaks, vec![]);
    {
        let (mut log, _sm) = open(dir.path());
        assert_eq!(log.chain_breaks(), vec![]);
        assert_eq!(indexes(&mut log).await, vec![1, 2, 3, 4]);
        append(&mut log, vec![blank(1, 5)]).await;
    }
    let (log, sm) = open(dir.path());
    assert_eq!(log.chain_breaks(), vec![]);
    drop((log, sm));
    let original = stored_entry(dir.path(), 2);
    set_stored_entry(dir.path(), 2, &serde_json::to_vec(&blank(7, 2)).unwrap());
    let (log, sm) = open(dir.path());
    assert_eq!(
        log.chain_breaks()
            .iter()
            .map(|(i, _)| *i)
            .collect::<Vec<_>>(),
        vec![2]
    );
    drop((log, sm));
    assert_ne!(original, stored_entry(dir.path(), 2));
}

/// A snapshot edited on disk (a lease row dropped, say) no longer matches the digest stored
/// with it: the next open names it, and so does `inspect` (the doctor). Put back, it is
/// whole again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_edited_on_disk_is_named_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm) = open(dir.path());
        apply(
            &mut sm,
            vec![membership(1, 1), begin_sync(1, 2, 5_000, "nonce-a")],
        )
        .await;
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
    }
    let (log, sm) = open(dir.path());
    assert_eq!(log.snapshot_break(), None);
    drop((log, sm));
    let data: Vec<u8> = rusqlite::Connection::open(db_path(dir.path()))
        .unwrap()
        .query_row("SELECT data FROM raft_snapshot WHERE id = 1", [], |row| {
            row.get(0)
        })
        .unwrap();
    let text = String::from_utf8(data.clone()).unwrap();
    let edited = text.replace("nonce-a", "nonce-b");
    assert_ne!(edited, text);
    let put = |data: &[u8]| {
        rusqlite::Connection::open(db_path(dir.path()))
            .unwrap()
            .execute("UPDATE raft_snapshot SET data = ?1 WHERE id = 1", [data])
            .unwrap();
    };
    put(edited.as_bytes());
    let (log, sm) = open(dir.path());
    let why = log.snapshot_break().expect("named");
    assert!(why.contains("does not match its digest"), "{why}");
    drop((log, sm));
    assert_eq!(
        tessera_store::inspect(&db_path(dir.path()))
            .unwrap()
            .snapshot_break,
        Some(why)
    );
    put(&data);
    let (log, sm) = open(dir.path());
    assert_eq!(log.snapshot_break(), None);
    drop((log, sm));

    // A store from before the digest (schema 2) gets it from its migration: an upgraded
    // server starts.
    {
        let connection = rusqlite::Connection::open(db_path(dir.path())).unwrap();
        connection
            .execute("ALTER TABLE raft_snapshot DROP COLUMN digest", [])
            .unwrap();
        connection.pragma_update(None, "user_version", 2).unwrap();
    }
    assert_eq!(
        tessera_store::inspect(&db_path(dir.path()))
            .unwrap()
            .snapshot_break,
        None,
        "nothing to check before the upgrade"
    );
    let (log, _sm) = open(dir.path());
    assert_eq!(log.snapshot_break(), None);
}
