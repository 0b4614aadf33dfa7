//! Usage history and the audit chain in `DATA/usage.sqlite3`.
//!
//! The primary records every license event (checkout, checkin, force-release, expiry,
//! denial, key import and removal) and every administrator action. Recording never waits
//! for the disk: events go through a bounded channel to one writer thread, which writes
//! whatever has queued up in one transaction (WAL, `synchronous=NORMAL`). License events
//! become rows of `usage_event`; every record is also appended to the audit hash chain
//! (see [`crate::audit`]). The server's notifications ([`Notification`]) are kept in `notification`, so
//! that the recent-events list and its ids outlive a restart. [`History::flush`] waits until
//! everything sent so far is written.
//!
//! The writer gathers: once a record arrives it sleeps for 20 ms (unless a flush or the
//! stop asks for it) and then writes everything queued. Sending a record therefore rarely
//! wakes a thread, and one commit covers hundreds of records: a wake-up and a commit per
//! record cost about as much CPU as the request that caused the record.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use tessera_core::LeaseView;

use crate::audit;
use crate::schema::{Migration, Schema, migrate_schema};

pub const FILE: &str = "usage.sqlite3";

/// The history's migrations (`migrations/usage/`), run by the store's one runner.
pub const SCHEMA: Schema = Schema {
    migrations: &[
        Migration {
            version: 1,
            name: "usage_and_audit",
            sql: include_str!("../migrations/usage/0001_usage_and_audit.sql"),
            fill: None,
        },
        Migration {
            version: 2,
            name: "notifications",
            sql: include_str!("../migrations/usage/0002_notifications.sql"),
            fill: None,
        },
        Migration {
            version: 3,
            name: "merged_history",
            sql: include_str!("../migrations/usage/0003_merged_history.sql"),
            fill: None,
        },
        // The chart's hourly roll-up, filled from the events already stored.
        Migration {
            version: 4,
            name: "usage_hour",
            sql: include_str!("../migrations/usage/0004_usage_hour.sql"),
            fill: Some(rebuild_rollup),
        },
    ],
};
/// The roll-up's unit: the chart's smallest bucket.
const HOUR_MS: i64 = 3_600_000;

/// Events queued beyond this make recording wait for the writer (back-pressure).
const QUEUE: usize = 16_384;
/// Most records written in one transaction.
const BATCH: usize = 2_048;
/// Notifications kept in `notification` (the oldest beyond are deleted): a flood of refused
/// messages from other servers, each its own event, must not grow the file without end.
const NOTIFICATIONS_KEPT: i64 = 10_000;
/// How long the writer gathers records before writing them, unless asked to hurry.
const GATHER: Duration = Duration::from_millis(20);

/// One row of `usage_event`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct UsageEvent {
    pub at_ms: i64,
    /// `granted`, `existing`, `checkin`, `force_release`, `expired`, `key_removed`,
    /// `denied`, `key_imported`.
    pub kind: String,
    pub lease_id: Option<String>,
    pub key_id: Option<String>,
    pub component: Option<String>,
    pub station: Option<String>,
    pub user: Option<String>,
    pub host: Option<String>,
    /// Change of the licenses in use of `component`.
    pub delta: i64,
    pub detail: Option<String>,
}

/// The activity log's word for a lease event (as FlexNet's debug log: `OUT`, `IN`,
/// `DENIED`, plus `EXPIRED` for a lease whose heartbeats stopped, `RELEASED` for the
/// administrator's force-release, `ENDED` for a lease ended by its key's removal).
fn activity_word(kind: &str) -> &'static str {
    match kind {
        "granted" => "OUT",
        "existing" => "OUT_AGAIN",
        "checkin" => "IN",
        "expired" => "EXPIRED",
        "force_release" => "RELEASED",
        "key_removed" => "ENDED",
        _ => "LEASE",
    }
}

/// One line of the activity log (target `tessera::activity`, level info): the word, then
/// what, who and where, and the key, lease or refusal code as fields. A stable format
/// (docs/operations.md, "Activity log").
#[allow(clippy::too_many_arguments)]
fn log_activity(
    word: &str,
    component: &str,
    user: &str,
    host: &str,
    station: &str,
    key: Option<&str>,
    lease: Option<&str>,
    code: Option<&str>,
) {
    let who = match (user, host) {
        ("", "") => String::new(),
        (user, "") => format!(" {user}"),
        (user, host) => format!(" {user}@{host}"),
    };
    tracing::info!(
        target: "tessera::activity",
        activity = word,
        component,
        station,
        user,
        host,
        key = key.unwrap_or(""),
        lease = lease.unwrap_or(""),
        code = code.unwrap_or(""),
        "{word}: {component}{who} station={station}{}{}{}",
        key.map(|k| format!(" key={k}")).unwrap_or_default(),
        lease.map(|l| format!(" lease={l}")).unwrap_or_default(),
        code.map(|c| format!(" code={c}")).unwrap_or_default(),
    );
}

/// One stored notification (table `notification`): the server's event as the API shows it,
/// kept so that the recent-events list and its ids outlive a restart.
#[derive(Clone, Debug, PartialEq)]
pub struct Notification {
    pub id: u64,
    pub at_ms: i64,
    pub kind: String,
    pub severity: String,
    pub server_id: Option<String>,
    pub host: Option<u64>,
    pub message: String,
    pub details: serde_json::Value,
}

/// One record of the audit chain before it is chained.
#[derive(Clone, Debug)]
pub struct AuditRecord {
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub details: serde_json::Value,
}

/// The audit chain's head (records, last hash) and the hash of a chosen record.
pub type AuditPoints = (Option<(i64, String)>, Option<String>);

/// One stored audit record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    pub seq: i64,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub details: String,
}

/// The audit details of a lease event, and what its usage rows are made of. The fields are
/// in alphabetical order, as `serde_json::json!` writes an object's keys.
#[derive(Debug, Serialize)]
struct LeaseDetails {
    components: Vec<String>,
    host: String,
    key_id: String,
    lease_id: String,
    station: String,
    user: String,
}

enum Message {
    Record {
        usage: Vec<UsageEvent>,
        audit: AuditRecord,
    },
    /// A lease event. The writer makes its usage rows and its audit record, so the request
    /// that caused it only copies the lease's strings once and serializes nothing.
    Lease {
        at_ms: i64,
        actor: String,
        kind: &'static str,
        delta: i64,
        /// The components whose usage level `delta` changes (one row each).
        usage: Vec<String>,
        details: LeaseDetails,
    },
    /// A notification; a restarted server numbers its next one after the highest stored.
    Notification(Notification),
    /// Rows another host of the pair or domain recorded (`origin`: its instance), each
    /// with its id there; copied once (see `crate::peer_history`).
    Copied {
        origin: String,
        rows: Vec<(i64, UsageEvent)>,
        audit: AuditRecord,
    },
    Flush(std::sync::mpsc::Sender<()>),
    /// Write what came before, then end the writer thread.
    Stop,
}

impl Message {
    /// Someone waits for this message: the writer stops gathering.
    fn urgent(&self) -> bool {
        matches!(self, Message::Flush(_) | Message::Stop)
    }
}

/// The way to the writer thread.
#[derive(Clone)]
struct Queue {
    sender: SyncSender<Message>,
    /// Set (and the writer unparked) when an urgent message is queued.
    hurry: std::sync::Arc<AtomicBool>,
    writer: std::thread::Thread,
}

impl Queue {
    fn send(&self, message: Message) {
        let urgent = message.urgent();
        if self.sender.send(message).is_err() {
            tracing::error!("usage history writer stopped; event lost");
            return;
        }
        if urgent {
            self.hurry.store(true, Ordering::SeqCst);
            self.writer.unpark();
        }
    }
}

/// Stores notifications in the history database ([`History::notification_log`]).
#[derive(Clone)]
pub struct NotificationLog(Queue);

impl NotificationLog {
    pub fn record(&self, notification: Notification) {
        self.0.send(Message::Notification(notification));
    }
}

pub struct History {
    path: PathBuf,
    /// This history's own id (`history_meta.instance`), naming its rows on other hosts.
    instance: String,
    queue: Queue,
    writer: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("usage history {path}: {message}")]
pub struct HistoryError {
    pub path: String,
    pub message: String,
}

/// Opens (creating and migrating) the history database.
pub fn open(path: &Path) -> Result<Connection, HistoryError> {
    let fail = |message: String| HistoryError {
        path: path.display().to_string(),
        message,
    };
    let mut connection = Connection::open(path).map_err(|e| fail(e.to_string()))?;
    connection
        .busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|e| fail(e.to_string()))?;
    connection
        .pragma_update(None, "journal_mode", "WAL")
        .map_err(|e| fail(e.to_string()))?;
    connection
        .pragma_update(None, "synchronous", "NORMAL")
        .map_err(|e| fail(e.to_string()))?;
    migrate_schema(&mut connection, &SCHEMA).map_err(|e| fail(e.to_string()))?;
    Ok(connection)
}

impl History {
    /// Opens `DATA/usage.sqlite3` and starts the writer thread.
    pub fn start(data_dir: &Path) -> Result<History, HistoryError> {
        let path = data_dir.join(FILE);
        let connection = open(&path)?;
        let instance: String = connection
            .query_row(
                "SELECT value FROM history_meta WHERE name = 'instance'",
                [],
                |row| row.get(0),
            )
            .map_err(|e| HistoryError {
                path: path.display().to_string(),
                message: format!("no instance id: {e}"),
            })?;
        let (sender, receiver) = sync_channel(QUEUE);
        let hurry = std::sync::Arc::new(AtomicBool::new(false));
        let writer_hurry = hurry.clone();
        let writer = std::thread::Builder::new()
            .name("tessera-history".into())
            .spawn(move || write_loop(connection, receiver, &writer_hurry))
            .map_err(|e| HistoryError {
                path: path.display().to_string(),
                message: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(History {
            path,
            instance,
            queue: Queue {
                sender,
                hurry,
                writer: writer.thread().clone(),
            },
            writer: Mutex::new(Some(writer)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn send(&self, message: Message) {
        self.queue.send(message);
    }

    /// Where the notifier stores its events.
    pub fn notification_log(&self) -> NotificationLog {
        NotificationLog(self.queue.clone())
    }

    /// The newest `limit` stored notifications, oldest first.
    pub fn notifications(&self, limit: usize) -> Result<Vec<Notification>, HistoryError> {
        let connection = self.reader()?;
        let mut statement = connection
            .prepare(
                "SELECT id, at_ms, kind, severity, server_id, host, message, details FROM
                   (SELECT * FROM notification ORDER BY id DESC LIMIT ?1)
                 ORDER BY id",
            )
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map(params![limit as i64], |row| {
                let details: String = row.get(7)?;
                Ok(Notification {
                    id: row.get::<_, i64>(0)? as u64,
                    at_ms: row.get(1)?,
                    kind: row.get(2)?,
                    severity: row.get(3)?,
                    server_id: row.get(4)?,
                    host: row.get::<_, Option<i64>>(5)?.map(|host| host as u64),
                    message: row.get(6)?,
                    details: serde_json::from_str(&details).unwrap_or(serde_json::Value::Null),
                })
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.error(e))
    }

    /// Appends an audit record and the usage rows that belong to it.
    pub fn record(&self, audit: AuditRecord, usage: Vec<UsageEvent>) {
        self.send(Message::Record { usage, audit });
    }

    /// An administrator action without usage rows.
    pub fn admin_action(&self, at_ms: i64, actor: &str, action: &str, details: serde_json::Value) {
        self.record(
            AuditRecord {
                at_ms,
                actor: actor.to_string(),
                action: action.to_string(),
                details,
            },
            Vec::new(),
        );
    }

    /// A lease event: one audit record, one activity log line, and usage rows. A lease holds
    /// a license of its key, which lets its station use every component the key covers
    /// (`covered`, the key's components; empty: the lease's own), so a lease taken or ended
    /// changes the level of each of them (`granted` +1; `existing`, a station asking again,
    /// 0 for the component it asked; any other kind ends the lease, -1). `component`: the
    /// one a checkout asked for.
    pub fn lease_event(
        &self,
        at_ms: i64,
        actor: &str,
        kind: &'static str,
        lease: &LeaseView,
        component: Option<&str>,
        covered: &[String],
    ) {
        let components = match component {
            Some(component) => vec![component.to_string()],
            None => lease.components.clone(),
        };
        let delta = match kind {
            "granted" => 1,
            "existing" => 0,
            _ => -1,
        };
        let usage = if delta == 0 {
            components.clone()
        } else if covered.is_empty() {
            lease.components.clone()
        } else {
            covered.to_vec()
        };
        log_activity(
            activity_word(kind),
            &components.join(","),
            lease.user.as_str(),
            lease.host.as_str(),
            &lease.station,
            Some(&lease.key_id),
            Some(&lease.lease_id),
            None,
        );
        self.send(Message::Lease {
            at_ms,
            actor: actor.to_string(),
            kind,
            delta,
            usage,
            details: LeaseDetails {
                components,
                host: lease.host.clone(),
                key_id: lease.key_id.clone(),
                lease_id: lease.lease_id.clone(),
                station: lease.station.clone(),
                user: lease.user.clone(),
            },
        });
    }

    /// A refused checkout.
    pub fn denial(&self, at_ms: i64, request: &tessera_api::CheckoutRequest, code: &str) {
        log_activity(
            "DENIED",
            &request.component,
            &request.user,
            &request.host,
            &request.station,
            None,
            None,
            Some(code),
        );
        self.record(
            AuditRecord {
                at_ms,
                actor: request.station.clone(),
                action: "lease.denied".into(),
                details: serde_json::json!({
                    "component": request.component,
                    "station": request.station,
                    "user": request.user,
                    "host": request.host,
                    "code": code,
                }),
            },
            vec![UsageEvent {
                at_ms,
                kind: "denied".into(),
                lease_id: None,
                key_id: None,
                component: Some(request.component.clone()),
                station: Some(request.station.clone()),
                user: Some(request.user.clone()),
                host: Some(request.host.clone()),
                delta: 0,
                detail: Some(code.to_string()),
            }],
        );
    }

    /// A key event (`key_imported`, `key_removed`): a usage row without component.
    pub fn key_event(&self, at_ms: i64, actor: &str, kind: &str, key_id: &str, detail: String) {
        self.record(
            AuditRecord {
                at_ms,
                actor: actor.to_string(),
                action: format!("key.{kind}"),
                details: serde_json::json!({"key_id": key_id, "detail": detail}),
            },
            vec![UsageEvent {
                at_ms,
                kind: kind.to_string(),
                lease_id: None,
                key_id: Some(key_id.to_string()),
                component: None,
                station: None,
                user: None,
                host: None,
                delta: 0,
                detail: Some(detail),
            }],
        );
    }

    /// Waits until every event sent before this call is committed.
    pub fn flush(&self) {
        let (done, wait) = std::sync::mpsc::channel();
        self.send(Message::Flush(done));
        let _ = wait.recv();
    }

    /// This history's own id, naming the rows it recorded when other hosts copy them.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Rows this host recorded itself (not copied) with an id above `after_id`, in id
    /// order, at most `limit` (flushes first).
    pub fn own_rows_after(
        &self,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<(i64, UsageEvent)>, HistoryError> {
        self.flush();
        let connection = self.reader()?;
        let mut statement = connection
            .prepare(
                "SELECT id, at_ms, kind, lease_id, key_id, component, station, user, host, delta, detail
                 FROM usage_event WHERE origin IS NULL AND id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map(params![after_id, limit as i64], |row| {
                Ok((row.get(0)?, usage_row(row, 1)?))
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.error(e))
    }

    /// Per other host's instance, the highest id of its rows copied here.
    pub fn copied_up_to(&self) -> Result<std::collections::BTreeMap<String, i64>, HistoryError> {
        self.flush();
        let connection = self.reader()?;
        let mut statement = connection
            .prepare(
                "SELECT origin, MAX(origin_id) FROM usage_event
                 WHERE origin IS NOT NULL GROUP BY origin",
            )
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(|e| self.error(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.error(e))
    }

    /// Stores rows another host recorded (`origin`: its instance), each once, with an audit
    /// record of the copy; returns once they are written.
    pub fn copy_rows(&self, at_ms: i64, origin: &str, host: u64, rows: Vec<(i64, UsageEvent)>) {
        if rows.is_empty() {
            return;
        }
        let audit = AuditRecord {
            at_ms,
            actor: "server".into(),
            action: "usage.copied".into(),
            details: serde_json::json!({
                "from_host": host,
                "origin": origin,
                "rows": rows.len(),
                "first_id": rows.first().map(|r| r.0),
                "last_id": rows.last().map(|r| r.0),
            }),
        };
        self.send(Message::Copied {
            origin: origin.to_string(),
            rows,
            audit,
        });
        self.flush();
    }

    /// Usage rows with `from_ms <= at_ms < to_ms`, oldest first (flushes first).
    pub fn usage(&self, from_ms: i64, to_ms: i64) -> Result<Vec<UsageEvent>, HistoryError> {
        self.flush();
        let connection = self.reader()?;
        query_usage(&connection, from_ms, to_ms).map_err(|e| self.error(e))
    }

    /// Distinct (component, station) pairs that held a lease of a key whose id ends with
    /// `key_suffix` at some time in `from_ms <= at_ms < to_ms`: a lease granted, found again,
    /// returned, released or expired in the period (flushes first). At most `limit` pairs.
    pub fn active_stations(
        &self,
        from_ms: i64,
        to_ms: i64,
        key_suffix: &str,
        limit: usize,
    ) -> Result<Vec<(String, String)>, HistoryError> {
        self.flush();
        let connection = self.reader()?;
        let mut statement = connection
            .prepare(
                "SELECT DISTINCT component, station FROM usage_event
                 WHERE at_ms >= ?1 AND at_ms < ?2
                   AND component IS NOT NULL AND station IS NOT NULL
                   AND substr(key_id, -length(?3)) = ?3
                   AND kind IN ('granted', 'existing', 'checkin', 'force_release', 'expired', 'key_removed')
                 LIMIT ?4",
            )
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map(params![from_ms, to_ms, key_suffix, limit as i64], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.error(e))
    }

    /// Per component, the highest number of licenses in use in each bucket of `bucket_ms`
    /// between `from_ms` and `to_ms` (the level carried into a bucket counts), and the
    /// denials per bucket. Whole hours (the console's ranges) read the hourly roll-up, so
    /// they cost the same however many events the range holds; others read the events.
    pub fn chart(
        &self,
        from_ms: i64,
        to_ms: i64,
        bucket_ms: i64,
    ) -> Result<Vec<ComponentSeries>, HistoryError> {
        self.flush();
        let connection = self.reader()?;
        if from_ms.rem_euclid(HOUR_MS) == 0 && bucket_ms.rem_euclid(HOUR_MS) == 0 {
            chart(&connection, from_ms, to_ms, bucket_ms)
        } else {
            chart_from_events(&connection, from_ms, to_ms, bucket_ms)
        }
        .map_err(|e| self.error(e))
    }

    /// The newest `limit` audit records, newest first (flushes first).
    pub fn recent_audit(&self, limit: usize) -> Result<Vec<AuditEntry>, HistoryError> {
        self.flush();
        let connection = self.reader()?;
        let mut statement = connection
            .prepare(
                "SELECT seq, at_ms, actor, action, details FROM audit_log ORDER BY seq DESC LIMIT ?1",
            )
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map(params![limit as i64], |row| {
                Ok(AuditEntry {
                    seq: row.get(0)?,
                    at_ms: row.get(1)?,
                    actor: row.get(2)?,
                    action: row.get(3)?,
                    details: row.get(4)?,
                })
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.error(e))
    }

    /// The audit chain's head (records, hash of the last) and the hash of record `at`, if
    /// there is such a record (flushes first): what a sync request reports to the vendor.
    pub fn audit_points(&self, at: Option<i64>) -> Result<AuditPoints, HistoryError> {
        self.flush();
        let connection = self.reader()?;
        let head = audit::head(&connection).map_err(|e| self.error(e))?;
        let at = match at {
            Some(seq) => audit::hash_of(&connection, seq).map_err(|e| self.error(e))?,
            None => None,
        };
        Ok((head, at))
    }

    /// Checks the audit chain (flushes first).
    pub fn verify(&self) -> Result<audit::Verification, HistoryError> {
        self.verify_against(None)
    }

    /// Checks the audit chain, and that it still has the hash the vendor countersigned at
    /// `point` (see [`audit::against_countersigned`]).
    pub fn verify_against(
        &self,
        point: Option<&tessera_core::sync::ChainPoint>,
    ) -> Result<audit::Verification, HistoryError> {
        self.flush();
        let connection = self.reader()?;
        let verification = audit::verify(&connection).map_err(|e| self.error(e))?;
        audit::against_countersigned(&connection, verification, point).map_err(|e| self.error(e))
    }

    /// Checks the audit records after an intact `checkpoint` (flushes first); see
    /// [`audit::verify_since`].
    pub fn verify_since(
        &self,
        checkpoint: Option<(i64, String)>,
    ) -> Result<audit::Verification, HistoryError> {
        self.flush();
        let connection = self.reader()?;
        audit::verify_since(&connection, checkpoint).map_err(|e| self.error(e))
    }

    fn reader(&self) -> Result<Connection, HistoryError> {
        let connection = Connection::open(&self.path).map_err(|e| self.error(e))?;
        connection
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| self.error(e))?;
        Ok(connection)
    }

    fn error(&self, error: impl std::fmt::Display) -> HistoryError {
        HistoryError {
            path: self.path.display().to_string(),
            message: error.to_string(),
        }
    }
}

impl Drop for History {
    /// Writes what is queued and stops the writer, so a restarted server in the same data
    /// directory continues the chain from its real head.
    fn drop(&mut self) {
        self.send(Message::Stop);
        if let Some(writer) = self.writer.lock().expect("history lock").take() {
            let _ = writer.join();
        }
    }
}

/// The writer yields the CPU to the threads that answer requests: its records are already
/// queued, and a license server on two cores answers faster when a large history commit
/// waits instead of preempting them (Linux: the calling thread's nice value; 10 of 19).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority only reads its integer arguments; on Linux, PRIO_PROCESS with
        // id 0 changes the calling thread only.
        let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
        if result != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "usage history writer keeps its priority");
        }
    }
}

/// Each batch reads the chain's head inside its (immediate) write transaction, so the chain
/// stays whole even if another writer (a server restarting in the same directory) appended.
fn write_loop(mut connection: Connection, receiver: Receiver<Message>, hurry: &AtomicBool) {
    lower_priority();
    let mut stopping = false;
    while !stopping && let Ok(first) = receiver.recv() {
        if !first.urgent() {
            let until = Instant::now() + GATHER;
            while !hurry.load(Ordering::SeqCst) {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::park_timeout(left);
            }
        }
        hurry.store(false, Ordering::SeqCst);
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match receiver.try_recv() {
                Ok(message) => batch.push(message),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let mut flushes = Vec::new();
        let mut notified = false;
        let result = (|| -> rusqlite::Result<()> {
            let transaction =
                connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            // Per component, the earliest event this batch wrote: where the roll-up resumes.
            let mut touched: std::collections::HashMap<String, i64> = Default::default();
            let mut touch = |component: Option<&str>, at_ms: i64| {
                if let Some(component) = component {
                    let earliest = touched.entry(component.to_string()).or_insert(at_ms);
                    *earliest = (*earliest).min(at_ms);
                }
            };
            {
                let (mut seq, mut hash) =
                    audit::head(&transaction)?.unwrap_or_else(|| (0, audit::genesis()));
                let mut usage_insert = transaction.prepare_cached(
                    "INSERT INTO usage_event (at_ms, kind, lease_id, key_id, component, station, user, host, delta, detail)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )?;
                // An id stored already (the last events before a crash of the machine were
                // lost and their ids given again, or a second server runs in the same
                // directory): the newer event wins rather than failing the batch.
                let mut notification_insert = transaction.prepare_cached(
                    "INSERT OR REPLACE INTO notification (id, at_ms, kind, severity, server_id, host, message, details)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?;
                let mut copied_insert = transaction.prepare_cached(
                    "INSERT OR IGNORE INTO usage_event (at_ms, kind, lease_id, key_id, component, station, user, host, delta, detail, origin, origin_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                )?;
                let mut audit_insert = transaction.prepare_cached(
                    "INSERT INTO audit_log (seq, at_ms, actor, action, details, prev_hash, hash)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?;
                // Appends one record to the chain.
                let mut append = |at_ms: i64, actor: &str, action: &str, details: &str| {
                    seq += 1;
                    let next = audit::chain_hash(&hash, seq, at_ms, actor, action, details);
                    audit_insert
                        .execute(params![seq, at_ms, actor, action, details, hash, next])?;
                    hash = next;
                    Ok::<(), rusqlite::Error>(())
                };
                for message in &batch {
                    match message {
                        Message::Flush(done) => flushes.push(done.clone()),
                        Message::Notification(event) => {
                            notification_insert.execute(params![
                                event.id as i64,
                                event.at_ms,
                                event.kind,
                                event.severity,
                                event.server_id,
                                event.host.map(|host| host as i64),
                                event.message,
                                event.details.to_string(),
                            ])?;
                            notified = true;
                        }
                        Message::Stop => stopping = true,
                        Message::Copied {
                            origin,
                            rows,
                            audit: record,
                        } => {
                            let mut copied = 0;
                            for (origin_id, event) in rows {
                                touch(event.component.as_deref(), event.at_ms);
                                copied += copied_insert.execute(params![
                                    event.at_ms,
                                    event.kind,
                                    event.lease_id,
                                    event.key_id,
                                    event.component,
                                    event.station,
                                    event.user,
                                    event.host,
                                    event.delta,
                                    event.detail,
                                    origin,
                                    origin_id,
                                ])?;
                            }
                            // Rows copied already (a pull repeated) are not audited again.
                            if copied > 0 {
                                append(
                                    record.at_ms,
                                    &record.actor,
                                    &record.action,
                                    &record.details.to_string(),
                                )?;
                            }
                        }
                        Message::Record {
                            usage,
                            audit: record,
                        } => {
                            for event in usage {
                                touch(event.component.as_deref(), event.at_ms);
                                usage_insert.execute(params![
                                    event.at_ms,
                                    event.kind,
                                    event.lease_id,
                                    event.key_id,
                                    event.component,
                                    event.station,
                                    event.user,
                                    event.host,
                                    event.delta,
                                    event.detail,
                                ])?;
                            }
                            append(
                                record.at_ms,
                                &record.actor,
                                &record.action,
                                &record.details.to_string(),
                            )?;
                        }
                        Message::Lease {
                            at_ms,
                            actor,
                            kind,
                            delta,
                            usage,
                            details,
                        } => {
                            for component in usage {
                                touch(Some(component.as_str()), *at_ms);
                                usage_insert.execute(params![
                                    at_ms,
                                    kind,
                                    details.lease_id,
                                    details.key_id,
                                    component,
                                    details.station,
                                    details.user,
                                    details.host,
                                    delta,
                                    None::<&str>,
                                ])?;
                            }
                            let text = serde_json::to_string(details)
                                .expect("lease details serialize to JSON");
                            append(*at_ms, actor, &format!("lease.{kind}"), &text)?;
                        }
                    }
                }
                if notified {
                    transaction.execute(
                        "DELETE FROM notification
                         WHERE id <= (SELECT MAX(id) FROM notification) - ?1",
                        params![NOTIFICATIONS_KEPT],
                    )?;
                }
            }
            for (component, earliest_ms) in &touched {
                roll_up(&transaction, component, Some(*earliest_ms))?;
            }
            transaction.commit()
        })();
        if let Err(error) = result {
            tracing::error!(%error, "usage history: a batch could not be written");
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

fn query_usage(
    connection: &Connection,
    from_ms: i64,
    to_ms: i64,
) -> rusqlite::Result<Vec<UsageEvent>> {
    let mut statement = connection.prepare(
        "SELECT at_ms, kind, lease_id, key_id, component, station, user, host, delta, detail
         FROM usage_event WHERE at_ms >= ?1 AND at_ms < ?2 ORDER BY at_ms, id",
    )?;
    let rows = statement.query_map(params![from_ms, to_ms], |row| usage_row(row, 0))?;
    rows.collect()
}

/// A usage row from the columns `at_ms, kind, lease_id, key_id, component, station, user,
/// host, delta, detail` starting at `first`.
fn usage_row(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<UsageEvent> {
    Ok(UsageEvent {
        at_ms: row.get(first)?,
        kind: row.get(first + 1)?,
        lease_id: row.get(first + 2)?,
        key_id: row.get(first + 3)?,
        component: row.get(first + 4)?,
        station: row.get(first + 5)?,
        user: row.get(first + 6)?,
        host: row.get(first + 7)?,
        delta: row.get(first + 8)?,
        detail: row.get(first + 9)?,
    })
}

/// One component's chart data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ComponentSeries {
    pub component: String,
    /// Highest level in each bucket.
    pub peaks: Vec<i64>,
    /// Denials in each bucket.
    pub denials: Vec<i64>,
}

/// The first millisecond of the UTC hour holding `at_ms`.
fn hour_of(at_ms: i64) -> i64 {
    at_ms.div_euclid(HOUR_MS) * HOUR_MS
}

/// Folds `component`'s events into `usage_hour`: from its cursor on when the earliest event
/// written since (`earliest_ms`) comes after the cursor (the usual case: only the new
/// events are read), otherwise again from the hour of `earliest_ms` (a copied row from
/// another host, older than what is folded); `None`: the whole history of the component.
/// The level is the same running level the chart always drew: the sum of the deltas,
/// never below zero.
fn roll_up(
    connection: &Connection,
    component: &str,
    earliest_ms: Option<i64>,
) -> rusqlite::Result<()> {
    let cursor: Option<(i64, i64, i64)> = connection
        .prepare_cached("SELECT at_ms, id, level FROM usage_hour_cursor WHERE component = ?1")?
        .query_row(params![component], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    // After which (at_ms, id) to read, the level there, and the hour still open there
    // (its hour, peak and denials so far).
    let (after, mut level, mut open) = match (cursor, earliest_ms) {
        (Some((at_ms, id, level)), Some(earliest)) if earliest >= at_ms => {
            let open = connection
                .prepare_cached(
                    "SELECT peak, denials FROM usage_hour WHERE component = ?1 AND hour_ms = ?2",
                )?
                .query_row(params![component, hour_of(at_ms)], |row| {
                    Ok((hour_of(at_ms), row.get::<_, i64>(0)?, row.get::<_, i64>(1)?))
                })
                .optional()?;
            ((at_ms, id), level, open)
        }
        (_, Some(earliest)) => {
            let start = hour_of(earliest);
            connection
                .prepare_cached("DELETE FROM usage_hour WHERE component = ?1 AND hour_ms >= ?2")?
                .execute(params![component, start])?;
            let level = connection
                .prepare_cached(
                    "SELECT level_end FROM usage_hour WHERE component = ?1 AND hour_ms < ?2
                     ORDER BY hour_ms DESC LIMIT 1",
                )?
                .query_row(params![component, start], |row| row.get(0))
                .optional()?
                .unwrap_or(0);
            ((start - 1, i64::MAX), level, None)
        }
        (_, None) => {
            connection
                .prepare_cached("DELETE FROM usage_hour WHERE component = ?1")?
                .execute(params![component])?;
            ((i64::MIN, i64::MIN), 0, None)
        }
    };
    let mut write = connection.prepare_cached(
        "INSERT INTO usage_hour (component, hour_ms, level_end, peak, denials)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (component, hour_ms) DO UPDATE
         SET level_end = excluded.level_end, peak = excluded.peak, denials = excluded.denials",
    )?;
    let mut read = connection.prepare_cached(
        "SELECT at_ms, id, kind = 'denied', delta FROM usage_event
         WHERE component = ?1 AND (at_ms, id) > (?2, ?3) ORDER BY at_ms, id",
    )?;
    let mut rows = read.query(params![component, after.0, after.1])?;
    let mut last = None;
    while let Some(row) = rows.next()? {
        let (at_ms, id, denied, delta): (i64, i64, bool, i64) =
            (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
        let hour = hour_of(at_ms);
        match open {
            Some((open_hour, _, _)) if open_hour == hour => {}
            _ => {
                if let Some((open_hour, peak, denials)) = open {
                    write.execute(params![component, open_hour, level, peak, denials])?;
                }
                open = Some((hour, i64::MIN, 0));
            }
        }
        level = (level + delta).max(0);
        if let Some((_, peak, denials)) = open.as_mut() {
            *peak = (*peak).max(level);
            *denials += i64::from(denied);
        }
        last = Some((at_ms, id));
    }
    if let Some((open_hour, peak, denials)) = open {
        write.execute(params![component, open_hour, level, peak, denials])?;
    }
    if let Some((at_ms, id)) = last {
        connection
            .prepare_cached(
                "INSERT OR REPLACE INTO usage_hour_cursor (component, at_ms, id, level)
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![component, at_ms, id, level])?;
    }
    Ok(())
}

/// Fills the roll-up from every event stored (once, in its migration's transaction).
fn rebuild_rollup(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    let components: Vec<String> = tx
        .prepare("SELECT DISTINCT component FROM usage_event WHERE component IS NOT NULL")?
        .query_map([], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for component in &components {
        roll_up(tx, component, None)?;
    }
    Ok(())
}

/// The chart from the hourly roll-up: per component, the level carried into the range (the
/// last hour before it), then one row per hour with events. Costs the same at 100 events
/// or 10,000,000.
fn chart(
    connection: &Connection,
    from_ms: i64,
    to_ms: i64,
    bucket_ms: i64,
) -> rusqlite::Result<Vec<ComponentSeries>> {
    let bucket_ms = bucket_ms.max(1);
    let buckets = ((to_ms - from_ms).max(0) + bucket_ms - 1) / bucket_ms;
    let buckets = buckets.clamp(1, 2_000) as usize;
    let components: Vec<String> = connection
        .prepare_cached("SELECT component FROM usage_hour_cursor ORDER BY component")?
        .query_map([], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut before = connection.prepare_cached(
        "SELECT level_end FROM usage_hour WHERE component = ?1 AND hour_ms < ?2
         ORDER BY hour_ms DESC LIMIT 1",
    )?;
    let mut within = connection.prepare_cached(
        "SELECT hour_ms, level_end, peak, denials FROM usage_hour
         WHERE component = ?1 AND hour_ms >= ?2 AND hour_ms < ?3 ORDER BY hour_ms",
    )?;
    let mut series = Vec::new();
    for component in components {
        let carried: Option<i64> = before
            .query_row(params![component, from_ms], |row| row.get(0))
            .optional()?;
        let mut level = carried.unwrap_or(0).max(0);
        let mut data = ComponentSeries {
            component,
            peaks: vec![0; buckets],
            denials: vec![0; buckets],
        };
        data.peaks[0] = level;
        let mut bucket = 0usize;
        let mut seen = carried.is_some();
        let mut rows = within.query(params![data.component, from_ms, to_ms])?;
        while let Some(row) = rows.next()? {
            let (hour_ms, level_end, peak, denials): (i64, i64, i64, i64) =
                (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
            let index = (((hour_ms - from_ms) / bucket_ms) as usize).min(buckets - 1);
            while bucket < index {
                bucket += 1;
                data.peaks[bucket] = level;
            }
            data.peaks[index] = data.peaks[index].max(peak);
            data.denials[index] += denials;
            level = level_end;
            seen = true;
        }
        while bucket + 1 < buckets {
            bucket += 1;
            data.peaks[bucket] = level;
        }
        if seen {
            series.push(data);
        }
    }
    Ok(series)
}

/// The chart computed from every event of the range: for ranges and buckets that are not
/// whole hours (the console's are), and the reference the roll-up is tested against.
fn chart_from_events(
    connection: &Connection,
    from_ms: i64,
    to_ms: i64,
    bucket_ms: i64,
) -> rusqlite::Result<Vec<ComponentSeries>> {
    let bucket_ms = bucket_ms.max(1);
    let buckets = ((to_ms - from_ms).max(0) + bucket_ms - 1) / bucket_ms;
    let buckets = buckets.clamp(1, 2_000) as usize;
    let mut series: std::collections::BTreeMap<String, ComponentSeries> = Default::default();
    let mut entry = |component: &str| {
        series
            .entry(component.to_string())
            .or_insert_with(|| ComponentSeries {
                component: component.to_string(),
                peaks: vec![0; buckets],
                denials: vec![0; buckets],
            });
    };
    // The level at `from_ms` of each component.
    let mut levels: std::collections::BTreeMap<String, i64> = Default::default();
    {
        let mut statement = connection.prepare(
            "SELECT component, SUM(delta) FROM usage_event
             WHERE at_ms < ?1 AND component IS NOT NULL GROUP BY component",
        )?;
        let rows = statement.query_map(params![from_ms], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
        })?;
        for row in rows {
            let (component, level) = row?;
            entry(&component);
            levels.insert(component, level);
        }
    }
    // (at, component's index in `names`, denied, delta): no string copied per event, a
    // range may hold hundreds of thousands.
    let mut names: Vec<String> = Vec::new();
    let mut events: Vec<(i64, usize, bool, i64)> = Vec::new();
    {
        let mut statement = connection.prepare(
            "SELECT at_ms, component, kind = 'denied', delta FROM usage_event
             WHERE at_ms >= ?1 AND at_ms < ?2 AND component IS NOT NULL ORDER BY at_ms, id",
        )?;
        let mut rows = statement.query(params![from_ms, to_ms])?;
        while let Some(row) = rows.next()? {
            let component = row.get_ref(1)?.as_str().map_err(|error| {
                rusqlite::Error::FromSqlConversionFailure(
                    1,
                    rusqlite::types::Type::Text,
                    Box::new(error),
                )
            })?;
            let index = match names.iter().position(|name| name == component) {
                Some(index) => index,
                None => {
                    names.push(component.to_string());
                    names.len() - 1
                }
            };
            events.push((row.get(0)?, index, row.get(2)?, row.get(3)?));
        }
    }
    for name in &names {
        entry(name);
    }
    // Carry each level through the buckets, raising the bucket's peak at every change.
    for (component, data) in series.iter_mut() {
        let mut level = levels.get(component).copied().unwrap_or(0).max(0);
        let mut bucket = 0usize;
        data.peaks[0] = level;
        let Some(wanted) = names.iter().position(|name| name == component) else {
            data.peaks.iter_mut().for_each(|peak| *peak = level);
            continue;
        };
        for &(at_ms, event_component, denied, delta) in &events {
            if event_component != wanted {
                continue;
            }
            let index = (((at_ms - from_ms) / bucket_ms) as usize).min(buckets - 1);
            while bucket < index {
                bucket += 1;
                data.peaks[bucket] = level;
            }
            if denied {
                data.denials[index] += 1;
            }
            level = (level + delta).max(0);
            data.peaks[index] = data.peaks[index].max(level);
        }
        while bucket + 1 < buckets {
            bucket += 1;
            data.peaks[bucket] = level;
        }
    }
    Ok(series.into_values().collect())
}

/// The number of audit records, for tests and the console.
pub fn audit_len(connection: &Connection) -> rusqlite::Result<i64> {
    connection
        .query_row("SELECT COUNT(*) FROM audit_log", [], |row| row.get(0))
        .optional()
        .map(|count| count.unwrap_or(0))
}

/// Checks the chain in a data directory's `usage.sqlite3`, read-only (offline use).
pub fn verify_data_dir(data_dir: &Path) -> Result<audit::Verification, HistoryError> {
    let path = data_dir.join(FILE);
    let fail = |message: String| HistoryError {
        path: path.display().to_string(),
        message,
    };
    if !path.exists() {
        return Err(fail("does not exist".into()));
    }
    let connection = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| fail(e.to_string()))?;
    audit::verify(&connection).map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(station: &str, components: &[&str]) -> LeaseView {
        LeaseView {
            lease_id: format!("lease-{station}"),
            key_id: "k1".into(),
            components: components.iter().map(|c| c.to_string()).collect(),
            station: station.into(),
            user: "ann".into(),
            host: station.into(),
            issued_at_ms: 0,
            renewed_at_ms: 0,
            expires_at_ms: 0,
            borrowed: false,
        }
    }

    /// A small seeded generator (xorshift), so the roll-up test repeats exactly.
    struct Seeded(u64);

    impl Seeded {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    fn event(at_ms: i64, component: &str, kind: &str, delta: i64) -> UsageEvent {
        UsageEvent {
            at_ms,
            kind: kind.into(),
            lease_id: None,
            key_id: None,
            component: Some(component.into()),
            station: Some("ws".into()),
            user: None,
            host: None,
            delta,
            detail: None,
        }
    }

    /// Every range and bucket the console asks for, from the roll-up and from the events.
    fn assert_chart_matches_events(path: &Path, history: &History, end_ms: i64) {
        history.flush();
        let connection = Connection::open(path).unwrap();
        let hour = HOUR_MS;
        for (from_ms, to_ms, bucket_ms) in [
            (0, 48 * hour, hour),
            (-5 * hour, 7 * hour, hour),
            (10 * hour, 34 * hour, hour),
            (0, 72 * hour, 24 * hour),
            (24 * hour, end_ms + 24 * hour, 24 * hour),
            (-24 * hour, 30 * 24 * hour, 30 * 24 * hour),
            (end_ms + hour, end_ms + 5 * hour, hour),
        ] {
            assert_eq!(
                chart(&connection, from_ms, to_ms, bucket_ms).unwrap(),
                chart_from_events(&connection, from_ms, to_ms, bucket_ms).unwrap(),
                "{from_ms}..{to_ms} per {bucket_ms}"
            );
        }
    }

    #[test]
    fn the_hourly_roll_up_draws_the_chart_the_events_draw_whatever_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let history = History::start(dir.path()).unwrap();
        let mut random = Seeded(0x5eed_cafe);
        let components = ["cad", "cam", "view"];
        let mut held = [0i64; 3];
        let mut now = -3 * HOUR_MS;
        for batch in 0..60 {
            let mut usage = Vec::new();
            for _ in 0..random.below(40) {
                now += random.below(HOUR_MS as u64 / 4) as i64;
                let which = random.below(3) as usize;
                let component = components[which];
                // Returns only of what is held: a whole history never goes below zero.
                usage.push(match random.below(5) {
                    0 => event(now, component, "denied", 0),
                    1 | 2 if held[which] > 0 => {
                        held[which] -= 1;
                        event(now, component, "checkin", -1)
                    }
                    _ => {
                        held[which] += 1;
                        event(now, component, "granted", 1)
                    }
                });
            }
            history.record(
                AuditRecord {
                    at_ms: now,
                    actor: "test".into(),
                    action: "usage".into(),
                    details: serde_json::json!({ "batch": batch }),
                },
                usage,
            );
            // Another host's rows, copied late: older than what is folded already.
            if batch % 7 == 3 {
                let rows = (0..random.below(6) as i64)
                    .map(|i| {
                        let at_ms = now - random.below(30 * HOUR_MS as u64) as i64;
                        let component = components[random.below(3) as usize];
                        (batch * 100 + i, event(at_ms, component, "granted", 1))
                    })
                    .collect();
                history.copy_rows(now, "other-host", 2, rows);
            }
            if batch % 5 == 0 {
                assert_chart_matches_events(&path, &history, now);
            }
        }
        assert_chart_matches_events(&path, &history, now);
        // A repeated copy (ignored rows) changes nothing.
        history.copy_rows(
            now,
            "other-host",
            2,
            vec![(303, event(0, "cad", "granted", 1))],
        );
        assert_chart_matches_events(&path, &history, now);
        drop(history);

        // A history from before the roll-up: the migration fills it from the events.
        let connection = Connection::open(&path).unwrap();
        let folded: i64 = connection
            .query_row("SELECT COUNT(*) FROM usage_hour", [], |row| row.get(0))
            .unwrap();
        assert!(folded > 40, "{folded} hours folded");
        connection
            .execute_batch(
                "DROP TABLE usage_hour; DROP TABLE usage_hour_cursor; PRAGMA user_version = 3;",
            )
            .unwrap();
        drop(connection);
        let history = History::start(dir.path()).unwrap();
        assert_chart_matches_events(&path, &history, now);
    }

    #[test]
    fn the_chart_carries_levels_through_empty_buckets_and_keeps_each_buckets_peak() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::start(dir.path()).unwrap();
        let hour = 3_600_000;
        // Before the chart's range: one cad lease held.
        history.lease_event(
            -hour,
            "ws-0",
            "granted",
            &lease("ws-0", &["cad"]),
            Some("cad"),
            &[],
        );
        // Bucket 1: up to 3, back to 2. Bucket 3: a denial, then one checkin.
        history.lease_event(
            hour + 1,
            "ws-1",
            "granted",
            &lease("ws-1", &["cad"]),
            Some("cad"),
            &[],
        );
        history.lease_event(
            hour + 2,
            "ws-2",
            "granted",
            &lease("ws-2", &["cad"]),
            Some("cad"),
            &[],
        );
        history.lease_event(
            hour + 3,
            "ws-2",
            "checkin",
            &lease("ws-2", &["cad"]),
            None,
            &[],
        );
        let request = tessera_api::CheckoutRequest {
            component: "cad".into(),
            station: "ws-9".into(),
            user: "bob".into(),
            host: "ws9".into(),
            nonce: String::new(),
            holder_key: String::new(),
            borrow_hours: 0,
        };
        history.denial(3 * hour, &request, "no_licenses_available");
        history.lease_event(
            3 * hour + 5,
            "ws-1",
            "checkin",
            &lease("ws-1", &["cad"]),
            None,
            &[],
        );
        let series = history.chart(0, 5 * hour, hour).unwrap();
        assert_eq!(series.len(), 1);
        assert_eq!(series[0].component, "cad");
        assert_eq!(series[0].peaks, vec![1, 3, 2, 2, 1]);
        assert_eq!(series[0].denials, vec![0, 0, 0, 1, 0]);
        let rows = history.usage(0, 5 * hour).unwrap();
        assert_eq!(rows.len(), 5);
        assert_eq!(rows[3].kind, "denied");
        assert_eq!(rows[3].detail.as_deref(), Some("no_licenses_available"));
        let verification = history.verify().unwrap();
        assert!(verification.ok);
        assert_eq!(verification.records, 6);
    }

    #[test]
    fn a_lease_counts_under_every_component_of_its_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::start(dir.path()).unwrap();
        let covered = ["cad".to_string(), "viewer".to_string()];
        let held = lease("ws-1", &["cad"]);
        history.lease_event(10, "ws-1", "granted", &held, Some("cad"), &covered);
        // The station asks for viewer too: the same license, no new one.
        let both = lease("ws-1", &["cad", "viewer"]);
        history.lease_event(20, "ws-1", "existing", &both, Some("viewer"), &covered);
        let series = history.chart(0, 30, 30).unwrap();
        let peaks: Vec<(String, Vec<i64>)> = series
            .iter()
            .map(|s| (s.component.clone(), s.peaks.clone()))
            .collect();
        assert_eq!(
            peaks,
            vec![("cad".into(), vec![1]), ("viewer".into(), vec![1])]
        );
        history.lease_event(40, "ws-1", "checkin", &both, None, &covered);
        let series = history.chart(50, 60, 10).unwrap();
        assert!(series.iter().all(|s| s.peaks == vec![0]), "{series:?}");
    }

    #[test]
    fn a_lease_event_writes_a_usage_row_per_component_and_an_audit_record_with_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::start(dir.path()).unwrap();
        let held = lease("ws-1", &["cad", "cam"]);
        history.lease_event(7, "admin", "force_release", &held, None, &[]);
        history.flush();
        let rows = history.usage(0, 10).unwrap();
        let row = |component: &str| UsageEvent {
            at_ms: 7,
            kind: "force_release".into(),
            lease_id: Some("lease-ws-1".into()),
            key_id: Some("k1".into()),
            component: Some(component.into()),
            station: Some("ws-1".into()),
            user: Some("ann".into()),
            host: Some("ws-1".into()),
            delta: -1,
            detail: None,
        };
        assert_eq!(rows, vec![row("cad"), row("cam")]);
        let audit = history.recent_audit(10).unwrap();
        assert_eq!(audit.len(), 1);
        assert_eq!(
            (audit[0].actor.as_str(), audit[0].action.as_str()),
            ("admin", "lease.force_release")
        );
        // The same text as a JSON object of the lease's fields (keys in alphabetical order).
        let object = serde_json::json!({
            "lease_id": "lease-ws-1",
            "key_id": "k1",
            "components": ["cad", "cam"],
            "station": "ws-1",
            "user": "ann",
            "host": "ws-1",
        });
        assert_eq!(audit[0].details, object.to_string());
        assert!(history.verify().unwrap().ok);
    }

    #[test]
    fn rows_copied_from_another_host_are_stored_once_in_time_order_and_never_passed_on() {
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (
            History::start(dir_a.path()).unwrap(),
            History::start(dir_b.path()).unwrap(),
        );
        assert_ne!(a.instance(), b.instance());
        a.lease_event(10, "server", "granted", &lease("ws-a", &["cad"]), None, &[]);
        b.lease_event(5, "server", "granted", &lease("ws-b", &["cad"]), None, &[]);
        b.lease_event(20, "server", "checkin", &lease("ws-b", &["cad"]), None, &[]);
        let rows = b.own_rows_after(0, 100).unwrap();
        assert_eq!(rows.len(), 2);
        // Copied twice (a pull repeated): stored and audited once.
        a.copy_rows(30, b.instance(), 2, rows.clone());
        a.copy_rows(31, b.instance(), 2, rows.clone());
        let stations: Vec<(i64, Option<String>)> = a
            .usage(0, 100)
            .unwrap()
            .into_iter()
            .map(|e| (e.at_ms, e.station))
            .collect();
        assert_eq!(
            stations,
            vec![
                (5, Some("ws-b".into())),
                (10, Some("ws-a".into())),
                (20, Some("ws-b".into()))
            ]
        );
        let last_id = rows.last().unwrap().0;
        assert_eq!(
            a.copied_up_to().unwrap(),
            [(b.instance().to_string(), last_id)].into()
        );
        let copies = a
            .recent_audit(10)
            .unwrap()
            .into_iter()
            .filter(|entry| entry.action == "usage.copied")
            .count();
        assert_eq!(copies, 1);
        assert!(a.verify().unwrap().ok);
        // A's own rows are only its own: B's rows are not handed on to a third host.
        let own = a.own_rows_after(0, 100).unwrap();
        assert_eq!(own.len(), 1);
        assert_eq!(own[0].1.station.as_deref(), Some("ws-a"));
        // The levels follow time: 1 (B's grant), 2, then 1.
        let chart = a.chart(0, 30, 10).unwrap();
        assert_eq!(chart[0].peaks, vec![1, 2, 2]);
    }

    #[test]
    fn a_history_written_by_a_newer_tessera_is_refused_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        drop(History::start(dir.path()).unwrap());
        let path = dir.path().join(FILE);
        let connection = Connection::open(&path).unwrap();
        connection
            .pragma_update(None, "user_version", SCHEMA.latest_version() + 1)
            .unwrap();
        drop(connection);
        let Err(error) = History::start(dir.path()) else {
            panic!("a newer schema was opened");
        };
        assert!(
            error.to_string().contains("written by a newer Tessera"),
            "{error}"
        );
        let connection = Connection::open(&path).unwrap();
        let version: u32 = connection
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA.latest_version() + 1);
    }

    #[test]
    fn notifications_are_stored_as_sent_and_only_the_newest_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::start(dir.path()).unwrap();
        let log = history.notification_log();
        let event = |id: u64| Notification {
            id,
            at_ms: 1_000 * id as i64,
            kind: "neighbour_refused".into(),
            severity: "warning".into(),
            server_id: Some("hq".into()),
            host: Some(2),
            message: format!("refused message {id}"),
            details: serde_json::json!({"from": format!("server-{id}")}),
        };
        let sent = NOTIFICATIONS_KEPT as u64 + 5;
        for id in 1..=sent {
            log.record(event(id));
        }
        history.flush();
        let stored = history.notifications(usize::MAX).unwrap();
        assert_eq!(stored.len(), NOTIFICATIONS_KEPT as usize);
        assert_eq!(stored[0], event(6), "the oldest five are gone");
        assert_eq!(stored.last(), Some(&event(sent)));
        assert_eq!(
            history.notifications(2).unwrap(),
            [event(sent - 1), event(sent)]
        );
    }
}
