//! The ledger as openraft's state machine.
//!
//! The [`Ledger`] lives in memory behind a lock shared with [`LedgerReader`], so HTTP handlers
//! read it directly while entries are applied. Applying persists nothing: the log is the
//! durable record. Snapshots (the serialized [`LedgerSnapshot`](tessera_core::LedgerSnapshot) plus openraft's meta) are
//! stored in SQLite and reinstalled by openraft on start.
//!
//! Snapshot data on the wire and in SQLite is the JSON of a `LedgerSnapshot`.

use std::io;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine, Snapshot};
use openraft::type_config::alias::SnapshotOf;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use tessera_core::{Ledger, LedgerConfig};

use crate::types::{LogId, SnapshotMeta, StoredMembership, TypeConfig};
use crate::writer::{Write, Writer};

/// Snapshot data: a `LedgerSnapshot` as JSON.
pub type SnapshotData = Vec<u8>;

/// The applied state: the ledger and where in the log it stands.
struct Applied {
    ledger: Ledger,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
}

type Shared = Arc<RwLock<Applied>>;

/// Commands applied since the last snapshot, and the signal that one is due.
#[derive(Default)]
struct SnapshotDue {
    commands: std::sync::atomic::AtomicU64,
    due: tokio::sync::Notify,
}

// A panic while the lock is held can only come from the ledger's own invariant assertion;
// openraft stops on it anyway, and readers may still look at the last state.
fn read(shared: &Shared) -> RwLockReadGuard<'_, Applied> {
    shared.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(shared: &Shared) -> RwLockWriteGuard<'_, Applied> {
    shared.write().unwrap_or_else(PoisonError::into_inner)
}

/// Read access to the applied ledger, without going through Raft. On a follower it may lag
/// the leader by the entries not yet applied here.
#[derive(Clone)]
pub struct LedgerReader(Shared, Arc<SnapshotDue>);

/// Tells when [`crate::SNAPSHOT_EVERY_COMMANDS`] commands were applied since the last
/// snapshot; holds nothing of the ledger.
#[derive(Clone)]
pub struct SnapshotSignal(Arc<SnapshotDue>);

impl SnapshotSignal {
    /// Completes once a snapshot is due (wakes one waiter).
    pub async fn due(&self) {
        self.0.due.notified().await;
    }
}

impl LedgerReader {
    pub fn snapshot_signal(&self) -> SnapshotSignal {
        SnapshotSignal(self.1.clone())
    }

    pub fn read<R>(&self, f: impl FnOnce(&Ledger) -> R) -> R {
        f(&read(&self.0).ledger)
    }

    /// A copy of the ledger and the index of the last entry applied to it, read together.
    pub fn copy_with_index(&self) -> (Ledger, Option<u64>) {
        let applied = read(&self.0);
        (
            applied.ledger.clone(),
            applied.last_applied.as_ref().map(|log_id| log_id.index()),
        )
    }

    /// Index of the last entry applied to the ledger.
    pub fn last_applied_index(&self) -> Option<u64> {
        read(&self.0)
            .last_applied
            .as_ref()
            .map(|log_id| log_id.index())
    }
}

/// The state machine handed to openraft.
pub struct LedgerStateMachine {
    shared: Shared,
    due: Arc<SnapshotDue>,
    ledger_config: LedgerConfig,
    snapshots: SnapshotStore,
}

/// The stored snapshot, shared by the state machine and its builders.
#[derive(Clone)]
struct SnapshotStore {
    writer: Arc<Writer>,
    /// Meta of the snapshot in SQLite, so re-installing the same snapshot (openraft does so
    /// on every start) does not write it again.
    current_meta: Arc<Mutex<Option<SnapshotMeta>>>,
}

impl SnapshotStore {
    fn current_meta(&self) -> Option<SnapshotMeta> {
        self.current_meta
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn save(&self, meta: &SnapshotMeta, data: Vec<u8>) -> io::Result<()> {
        let meta_json = serde_json::to_string(meta)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.writer
            .write(Write::Snapshot {
                meta: meta_json,
                data,
            })
            .await?;
        *self
            .current_meta
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(meta.clone());
        Ok(())
    }
}

impl LedgerStateMachine {
    pub(crate) fn new(
        writer: Arc<Writer>,
        ledger_config: LedgerConfig,
        snapshot_meta: Option<SnapshotMeta>,
    ) -> LedgerStateMachine {
        LedgerStateMachine {
            shared: Arc::new(RwLock::new(Applied {
                ledger: Ledger::new(ledger_config.clone()),
                last_applied: None,
                last_membership: StoredMembership::default(),
            })),
            due: Arc::default(),
            ledger_config,
            snapshots: SnapshotStore {
                writer,
                current_meta: Arc::new(Mutex::new(snapshot_meta)),
            },
        }
    }

    /// A reader of the ledger for the rest of the server; stays valid after the state machine
    /// moves into openraft.
    pub fn reader(&self) -> LedgerReader {
        LedgerReader(self.shared.clone(), self.due.clone())
    }
}

/// Builds a snapshot of the ledger as it is when `build_snapshot` runs.
pub struct LedgerSnapshotBuilder {
    shared: Shared,
    due: Arc<SnapshotDue>,
    snapshots: SnapshotStore,
}

impl RaftSnapshotBuilder<TypeConfig> for LedgerSnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, SnapshotData>, io::Error> {
        // Serialize under the read lock, straight from the compact ledger: copying a ledger of
        // a million leases first would double the server's memory for the copy's lifetime.
        // Applying waits meanwhile (about a second per million leases).
        let (data, meta) = {
            let applied = read(&self.shared);
            self.due
                .commands
                .store(0, std::sync::atomic::Ordering::Relaxed);
            let meta = SnapshotMeta {
                last_log_id: applied.last_applied,
                last_membership: applied.last_membership.clone(),
            };
            (applied.ledger.snapshot_json(), meta)
        };
        self.snapshots.save(&meta, data.clone()).await?;
        tracing::info!(
            last_log_index = meta.last_log_id.as_ref().map(|id| id.index()),
            bytes = data.len(),
            "ledger snapshot stored"
        );
        Ok(Snapshot {
            meta,
            snapshot: data,
        })
    }
}

impl RaftStateMachine<TypeConfig> for LedgerStateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = LedgerSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let applied = read(&self.shared);
        Ok((applied.last_applied, applied.last_membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let response = {
                let mut applied = write(&self.shared);
                let response = match entry.payload {
                    EntryPayload::Blank => None,
                    EntryPayload::Normal(proposal) => {
                        let count = proposal.0.len() as u64;
                        let before = self
                            .due
                            .commands
                            .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
                        if before < crate::SNAPSHOT_EVERY_COMMANDS
                            && before + count >= crate::SNAPSHOT_EVERY_COMMANDS
                        {
                            self.due.due.notify_one();
                        }
                        Some(
                            proposal
                                .0
                                .iter()
                                .map(|stamped| applied.ledger.apply_recording(stamped))
                                .collect(),
                        )
                    }
                    EntryPayload::Membership(membership) => {
                        applied.last_membership =
                            StoredMembership::new(Some(entry.log_id), membership);
                        None
                    }
                };
                applied.last_applied = Some(entry.log_id);
                response
            };
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        LedgerSnapshotBuilder {
            shared: self.shared.clone(),
            due: self.due.clone(),
            snapshots: self.snapshots.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let already_stored = self.snapshots.current_meta().as_ref() == Some(meta);
        let config = self.ledger_config.clone();
        let (ledger, snapshot) = tokio::task::spawn_blocking(move || {
            Ledger::restore_json(config, &snapshot).map(|ledger| (ledger, snapshot))
        })
        .await
        .map_err(io::Error::other)?
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if !already_stored {
            self.snapshots.save(meta, snapshot).await?;
        }
        let mut applied = write(&self.shared);
        self.due
            .commands
            .store(0, std::sync::atomic::Ordering::Relaxed);
        applied.ledger = ledger;
        applied.last_applied = meta.last_log_id;
        applied.last_membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, SnapshotData>>, io::Error> {
        let Some((meta_json, data)) = self.snapshots.writer.load_snapshot().await? else {
            return Ok(None);
        };
        let meta: SnapshotMeta = serde_json::from_str(&meta_json)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: data,
        }))
    }
}
