//! The tamper-evident audit log: table `audit_log` of `DATA/usage.sqlite3`.
//!
//! Each record carries `seq` (1, 2, ...), `at_ms`, `actor`, `action`, `details` (JSON text),
//! `prev_hash` (the previous record's hash; 64 zeros for the first) and
//! `hash = SHA-256(prev_hash || canonical record)` in lower-case hex, where the canonical
//! record is `seq \n at_ms \n actor \n action \n details` (decimal numbers, the stored
//! texts). Changing, inserting or deleting any record breaks the chain at that record;
//! [`verify`] names the first broken one. Cutting records off the end leaves a valid, shorter
//! chain: keep the head hash printed by `tessera audit verify` somewhere else to detect that.

use rusqlite::{Connection, OptionalExtension};
use sha2::{Digest, Sha256};

pub fn genesis() -> String {
    "0".repeat(64)
}

pub fn chain_hash(
    prev_hash: &str,
    seq: i64,
    at_ms: i64,
    actor: &str,
    action: &str,
    details: &str,
) -> String {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash.as_bytes());
    hasher.update(format!("{seq}\n{at_ms}\n{actor}\n{action}\n{details}").as_bytes());
    hex::encode(hasher.finalize())
}

/// The last record's (seq, hash), if any.
pub fn head(connection: &Connection) -> rusqlite::Result<Option<(i64, String)>> {
    connection
        .query_row(
            "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()
}

/// The hash of record `seq`, if there is one.
pub fn hash_of(connection: &Connection, seq: i64) -> rusqlite::Result<Option<String>> {
    connection
        .query_row("SELECT hash FROM audit_log WHERE seq = ?1", [seq], |row| {
            row.get(0)
        })
        .optional()
}

pub use tessera_api::AuditVerification as Verification;

/// Also checks an intact chain against the point the vendor countersigned (`at` records,
/// the last one's hash): a history rewritten with the chain recomputed after it passes
/// [`verify`] but not this (docs/security.md, T12).
pub fn against_countersigned(
    connection: &Connection,
    verification: Verification,
    point: Option<&tessera_core::sync::ChainPoint>,
) -> rusqlite::Result<Verification> {
    let Some(point) = point else {
        return Ok(verification);
    };
    let seq = i64::try_from(point.at).unwrap_or(i64::MAX);
    let checked = Verification {
        countersigned: Some(seq),
        ..verification
    };
    if !checked.ok {
        return Ok(checked);
    }
    let reason = match hash_of(connection, seq)? {
        Some(hash) if hash == point.hash => return Ok(checked),
        Some(_) => "the record does not have the hash the vendor countersigned at the last sync: the history up to it was rewritten and its chain recomputed".to_string(),
        None => format!(
            "the vendor countersigned {seq} records at the last sync and only {} are left: records were deleted and the chain recomputed",
            checked.records
        ),
    };
    Ok(Verification {
        ok: false,
        head_hash: None,
        broken_seq: Some(seq),
        reason: Some(reason),
        ..checked
    })
}

/// Walks the chain from the first record.
pub fn verify(connection: &Connection) -> rusqlite::Result<Verification> {
    verify_after(connection, 0, genesis())
}

/// Checks only the records after `checkpoint` (the `(seq, head hash)` of an earlier intact
/// verification), after checking that the record there still has that hash; when it does
/// not, walks the whole chain to name the first broken record. A change to a record before
/// the checkpoint that leaves the checkpoint's own record alone is found only by a whole
/// walk ([`verify`]): the console checks new records on each load and the whole chain on
/// request.
pub fn verify_since(
    connection: &Connection,
    checkpoint: Option<(i64, String)>,
) -> rusqlite::Result<Verification> {
    let Some((seq, hash)) = checkpoint else {
        return verify(connection);
    };
    let stored: Option<String> = connection
        .query_row("SELECT hash FROM audit_log WHERE seq = ?1", [seq], |row| {
            row.get(0)
        })
        .optional()?;
    if stored.as_deref() != Some(hash.as_str()) {
        return verify(connection);
    }
    verify_after(connection, seq, hash)
}

/// A text column of a row, borrowed (no copy per record: a chain may hold millions).
fn text<'r>(row: &'r rusqlite::Row<'_>, index: usize) -> rusqlite::Result<&'r str> {
    row.get_ref(index)?.as_str().map_err(|error| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Text,
            Box::new(error),
        )
    })
}

/// Walks the chain after record `seq` (0: from the first), whose hash is `prev`. Computes
/// what [`chain_hash`] does without allocating per record.
fn verify_after(connection: &Connection, seq: i64, prev: String) -> rusqlite::Result<Verification> {
    use std::io::Write;

    let mut statement = connection.prepare(
        "SELECT seq, at_ms, actor, action, details, prev_hash, hash FROM audit_log WHERE seq > ?1 ORDER BY seq",
    )?;
    let mut rows = statement.query([seq])?;
    let mut expected_prev = prev;
    let mut expected_seq = seq + 1;
    let mut records = seq;
    let mut canonical: Vec<u8> = Vec::with_capacity(512);
    let mut computed = [0u8; 64];
    while let Some(row) = rows.next()? {
        records += 1;
        let seq: i64 = row.get(0)?;
        let at_ms: i64 = row.get(1)?;
        let broken = |reason: String| Verification {
            ok: false,
            records,
            head_hash: None,
            broken_seq: Some(seq),
            reason: Some(reason),
            countersigned: None,
        };
        if seq != expected_seq {
            return Ok(broken(format!(
                "expected record {expected_seq} here: records are missing or were inserted"
            )));
        }
        let prev_hash = text(row, 5)?;
        if prev_hash != expected_prev {
            return Ok(broken(
                "prev_hash is not the previous record's hash".to_string(),
            ));
        }
        canonical.clear();
        write!(canonical, "{seq}\n{at_ms}\n").expect("writing to a Vec");
        canonical.extend_from_slice(text(row, 2)?.as_bytes());
        canonical.push(b'\n');
        canonical.extend_from_slice(text(row, 3)?.as_bytes());
        canonical.push(b'\n');
        canonical.extend_from_slice(text(row, 4)?.as_bytes());
        let mut hasher = Sha256::new();
        hasher.update(prev_hash.as_bytes());
        hasher.update(&canonical);
        hex::encode_to_slice(hasher.finalize(), &mut computed).expect("64 hex digits");
        let hash = text(row, 6)?;
        if computed.as_slice() != hash.as_bytes() {
            return Ok(broken(
                "the record does not match its hash: it was changed".to_string(),
            ));
        }
        expected_prev.clear();
        expected_prev.push_str(hash);
        expected_seq += 1;
    }
    Ok(Verification {
        ok: true,
        records,
        head_hash: (records > 0).then_some(expected_prev),
        broken_seq: None,
        reason: None,
        countersigned: None,
    })
}
