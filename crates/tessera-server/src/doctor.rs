//! `tessera doctor`: the checks a server makes before it starts, run on a stopped server's
//! data directory without changing it, each finding explained with the way out.
//!
//! A server refuses to start when its ledger holds a key, grant or certificate that does not
//! verify, or its Raft log an entry that does not (docs/security.md, T1 and T3). The doctor
//! names every such object, not only the first, reads the audit chain too, and says what to
//! do: the start error is the alarm, the doctor the diagnosis.

use serde::Serialize;
use tessera_core::{Ledger, LedgerConfig, PublicKey};

use crate::ServerConfig;
use crate::consensus::STORE_FILE_NAME;
use crate::data_dir::PUBLIC_FILE;

/// One thing found wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Where: a file, and the entry or object in it.
    pub place: String,
    /// What is wrong.
    pub problem: String,
    /// What to do about it.
    pub remedy: String,
}

/// What the doctor read and found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub data_dir: String,
    /// Log entries read (membership entries excepted).
    pub log_entries: usize,
    /// Whether a snapshot was stored.
    pub snapshot: bool,
    /// Audit records checked.
    pub audit_records: i64,
    pub findings: Vec<Finding>,
}

const RESTORE: &str = "restore the data directory from a backup taken before the change (docs/operations.md, \"Backups, and losing a disk\"); a server whose data directory went back in time is reported to the vendor at its next sync (server_rolled_back)";
const TRUST: &str = "if the vendor rotated its key, add its new public key with --trust (keep the old one while keys signed by it are in use); otherwise the data directory was edited: restore it from a backup";

/// Why the doctor could not examine a data directory at all.
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error(transparent)]
    Config(#[from] crate::error::StartError),
    #[error("{}: {source}", path.display())]
    ServerKey {
        path: std::path::PathBuf,
        source: tessera_core::identity::IdentityError,
    },
    #[error("{} does not exist: no server has run in this data directory", path.display())]
    NoStore { path: std::path::PathBuf },
    #[error("{}: {source}", path.display())]
    Store {
        path: std::path::PathBuf,
        source: tessera_store::StoreError,
    },
}

/// Runs every check on `config`'s data directory at `now_ms` (the wall clock: the time the
/// server would start at). The server must be stopped (the store is read as it is on disk).
/// An error: what could not be read at all.
pub fn examine(config: &ServerConfig, now_ms: i64) -> Result<Report, DoctorError> {
    let data = &config.data_dir;
    let mut report = Report {
        data_dir: data.display().to_string(),
        ..Report::default()
    };
    let trusted_vendors = crate::server::load_trusted_vendors(config)?;
    let public = data.join(PUBLIC_FILE);
    let server_public_key = match std::fs::read_to_string(&public) {
        Ok(text) => {
            Some(
                PublicKey::from_file_text(&text).map_err(|source| DoctorError::ServerKey {
                    path: public.clone(),
                    source,
                })?,
            )
        }
        Err(_) => None,
    };
    let store = data.join(STORE_FILE_NAME);
    if !store.exists() {
        return Err(DoctorError::NoStore { path: store });
    }
    let inspection = tessera_store::inspect(&store).map_err(|source| DoctorError::Store {
        path: store.clone(),
        source,
    })?;
    let ledger_config = LedgerConfig {
        trusted_vendors,
        server_id: config.server_id.clone(),
        server_public_key,
        clock_skew_max_ms: config.clock_skew_max.as_millis() as i64,
    };
    let store_name = store.display().to_string();
    let ledger = match &inspection.snapshot {
        Some(bytes) => match Ledger::restore_json(ledger_config.clone(), bytes) {
            Ok(ledger) => ledger,
            Err(error) => {
                report.findings.push(Finding {
                    place: format!("{store_name}, snapshot"),
                    problem: format!("the snapshot does not parse: {error}"),
                    remedy: RESTORE.into(),
                });
                Ledger::new(ledger_config)
            }
        },
        None => Ledger::new(ledger_config),
    };
    // The state now: the snapshot, then the entries after it. All of them: the committed
    // index is stored lazily (it may lag the last commits by a moment), and a single host
    // commits its whole log before it serves.
    let mut now = ledger.clone();
    for (index, batch) in &inspection.entries {
        let after_snapshot = inspection.snapshot_index.is_none_or(|last| *index > last);
        if after_snapshot {
            for stamped in batch {
                now.apply(stamped);
            }
        }
    }
    let sync = now.sync_state();
    if let Some(block) = &sync.blocked {
        report.findings.push(Finding {
            place: format!("{store_name}, sync state"),
            problem: format!(
                "the vendor refused this server's last sync ({}): {}",
                block.code, block.message
            ),
            remedy: "the vendor saw this server's data directory cloned or put back from a copy: it must reset the server ID (`tessera authority server reset ID`) before this server can sync again; run one copy only".into(),
        });
    }
    if let Some(deadline) = sync.deadline_ms()
        && deadline <= now_ms.max(now.last_at_ms())
    {
        report.findings.push(Finding {
            place: format!("{store_name}, sync state"),
            problem: format!(
                "the vendor certificate ran out at {} (not synchronized with the vendor since): keys bound to this server issue nothing",
                jiff::Timestamp::from_millisecond(deadline).unwrap_or(jiff::Timestamp::MAX)
            ),
            remedy: "synchronize with the vendor: `tessera sync` online, or `tessera sync export --out FILE` and `tessera sync import FILE` for an air-gapped server (docs/sync-and-renewal.md)".into(),
        });
    }
    report.snapshot = inspection.snapshot.is_some();
    report.log_entries = inspection.entries.len();
    for found in ledger.unverified_keys() {
        let remedy = if found.untrusted_vendor {
            TRUST
        } else {
            RESTORE
        };
        report.findings.push(Finding {
            place: format!("{store_name}, snapshot"),
            problem: format!("{} does not verify: {}", found.what, found.why),
            remedy: remedy.into(),
        });
    }
    for (index, why) in &inspection.unreadable {
        report.findings.push(Finding {
            place: format!("{store_name}, raft log entry {index}"),
            problem: format!("the entry does not parse: {why}"),
            remedy: RESTORE.into(),
        });
    }
    if let Some(why) = &inspection.snapshot_break {
        report.findings.push(Finding {
            place: format!("{store_name}, snapshot"),
            problem: why.clone(),
            remedy: RESTORE.into(),
        });
    }
    for (index, why) in &inspection.chain_breaks {
        report.findings.push(Finding {
            place: format!("{store_name}, raft log entry {index}"),
            problem: format!("the log's hash chain is broken here: {why}"),
            remedy: RESTORE.into(),
        });
    }
    for (index, batch) in &inspection.entries {
        for stamped in batch {
            if let Some(found) = ledger.unverified_command(&stamped.command) {
                let remedy = if found.untrusted_vendor {
                    TRUST
                } else {
                    RESTORE
                };
                report.findings.push(Finding {
                    place: format!("{store_name}, raft log entry {index}"),
                    problem: format!(
                        "{found} (replayed, it would silently drop or add what it carries)"
                    ),
                    remedy: remedy.into(),
                });
            }
        }
    }
    match crate::pair::journal::Journal::inspect(data) {
        Ok(_) => {}
        Err(error @ crate::pair::journal::JournalError::Io { .. }) => {
            report.findings.push(Finding {
                place: data
                    .join(crate::pair::journal::JOURNAL_FILE_NAME)
                    .display()
                    .to_string(),
                problem: format!("cannot be read: {error}"),
                remedy: "stop the server first (the doctor reads a stopped server's files), and check the file's owner and permissions".into(),
            })
        }
        Err(error) => report.findings.push(Finding {
            place: data
                .join(crate::pair::journal::JOURNAL_FILE_NAME)
                .display()
                .to_string(),
            problem: error.to_string(),
            remedy: "the alone journal of a pair host was changed after it was written: this host does not serve alone until the pair has merged; start both hosts so the pair merges (the leases that journal held are lost: their stations check out again)".into(),
        }),
    }
    match crate::history::verify_data_dir(data) {
        Ok(verification) => {
            report.audit_records = verification.records;
            if !verification.ok {
                report.findings.push(Finding {
                    place: format!(
                        "{}, audit record {}",
                        data.join(crate::history::FILE).display(),
                        verification.broken_seq.unwrap_or_default()
                    ),
                    problem: format!(
                        "the audit chain is broken: {}",
                        verification.reason.unwrap_or_default()
                    ),
                    remedy: "the usage history was changed after it was written: keep this copy as evidence, restore usage.sqlite3 from a backup if you need the history (the server runs either way)".into(),
                });
            }
        }
        // A server that never recorded history: nothing to check.
        Err(_) if !data.join(crate::history::FILE).exists() => {}
        Err(error) => report.findings.push(Finding {
            place: data.join(crate::history::FILE).display().to_string(),
            problem: format!("cannot be read: {error}"),
            remedy: RESTORE.into(),
        }),
    }
    Ok(report)
}
