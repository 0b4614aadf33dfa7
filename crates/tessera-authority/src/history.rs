//! History heads: a server's rewritten Raft log or audit log, seen at its next sync.
//!
//! Each sync request reports, for the host that sends it, the heads of its own two hash
//! chains (its Raft log, tessera-store's `chain`; its audit log, `tessera_server::audit`)
//! and the same chains recomputed at the points the authority countersigned at that host's
//! previous sync. The authority keeps every point it countersigned (`history_points`) and
//! checks the recomputed ones against them:
//!
//! - **audit**: the record there must still have the countersigned hash. Records deleted
//!   (fewer than the point), or changed with the chain recomputed after them, make
//!   **`audit_rewritten`**.
//! - **log**: the entry there, while it is still in the log, must still have the
//!   countersigned hash; otherwise **`log_rewritten`**. An entry purged into a snapshot since
//!   cannot be checked and is not an alert (snapshots are made every 50,000 commands).
//! - A point that was never countersigned: the same alerts. A host that reports none is not
//!   judged (a lost first answer leaves no point in its ledger).
//!
//! These alerts do not refuse the sync: the server gets its answer, and the vendor sees the
//! alert (`tessera authority alerts`, the console) with the server ID and the host. The
//! response countersigns the heads the request reported, which become the next points.

use rusqlite::{Connection, OptionalExtension, params};
use tessera_core::sync::{ChainPoint, Countersigned, HistoryHeads, PointCheck};

use crate::error::AuthorityError;

pub const AUDIT_REWRITTEN: &str = "audit_rewritten";
pub const LOG_REWRITTEN: &str = "log_rewritten";
pub const LEDGER_REWOUND: &str = "ledger_rewound";

/// How many counter points of one host are kept.
pub const COUNTER_POINTS_MAX: i64 = 256;

/// Compares the counters a host states (at its own sync: `source` "sync"; relayed by a
/// donor: the donor's server ID) with the points it stated before, and keeps them; returns
/// what is wrong. `leases_issued` only grows on a host, so a point with fewer leases issued
/// than an earlier one (by the time its ledger had applied), or more than a later one,
/// means its ledger forgot checkouts: put back from a copy, or rewritten. Counters without
/// a time (older servers) are compared with the last such report.
pub fn judge_counters(
    connection: &Connection,
    server_id: &str,
    installation: &str,
    counters: &tessera_core::sync::LedgerCounters,
    source: &str,
) -> Result<Option<String>, AuthorityError> {
    let Some(as_of_ms) = counters.as_of_ms else {
        return judge_untimed_counters(connection, server_id, installation, counters);
    };
    // Points from before the last alert or reset of this host are history already judged
    // (a donor relays a receiver's last report until the next one): not judged again.
    let floor: Option<i64> = connection.query_row(
        "SELECT MAX(as_of_ms) FROM counter_points WHERE server_id = ?1 \
         AND installation IN ('floor:' || ?2, 'floor:*')",
        params![server_id, installation],
        |row| row.get(0),
    )?;
    if floor.is_some_and(|floor| as_of_ms < floor) {
        return Ok(None);
    }
    let now = i64::try_from(counters.leases_issued).unwrap_or(i64::MAX);
    // An earlier point with more leases issued, or a later one with fewer.
    let contradiction: Option<(i64, i64, String)> = connection
        .query_row(
            "SELECT as_of_ms, leases_issued, source FROM counter_points \
             WHERE server_id = ?1 AND installation = ?2 \
               AND ((as_of_ms < ?3 AND leases_issued > ?4) OR (as_of_ms > ?3 AND leases_issued < ?4)) \
             ORDER BY as_of_ms DESC LIMIT 1",
            params![server_id, installation, as_of_ms, now],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .optional()?;
    // After an alert, the host's history starts again from the latest state known (the
    // ledger as it is now), so one rewind is one alert.
    let mut keep = (as_of_ms, now, source.to_string());
    if contradiction.is_some() {
        let latest: Option<(i64, i64, String)> = connection
            .query_row(
                "SELECT as_of_ms, leases_issued, source FROM counter_points \
                 WHERE server_id = ?1 AND installation = ?2 ORDER BY as_of_ms DESC LIMIT 1",
                params![server_id, installation],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .optional()?;
        if let Some(latest) = latest.filter(|latest| latest.0 > as_of_ms) {
            keep = latest;
        }
        // The state kept is also the floor: nothing older is judged again.
        connection.execute(
            "INSERT OR REPLACE INTO counter_points (server_id, installation, as_of_ms, leases_issued, source) \
             VALUES (?1, 'floor:' || ?2, ?3, ?4, 'floor')",
            params![server_id, installation, keep.0, keep.1],
        )?;
        connection.execute(
            "DELETE FROM counter_points WHERE server_id = ?1 AND installation = ?2",
            params![server_id, installation],
        )?;
    }
    connection.execute(
        "INSERT OR IGNORE INTO counter_points (server_id, installation, as_of_ms, leases_issued, source) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![server_id, installation, keep.0, keep.1, keep.2],
    )?;
    connection.execute(
        "DELETE FROM counter_points WHERE server_id = ?1 AND installation = ?2 AND as_of_ms NOT IN \
         (SELECT as_of_ms FROM counter_points WHERE server_id = ?1 AND installation = ?2 \
          ORDER BY as_of_ms DESC LIMIT ?3)",
        params![server_id, installation, COUNTER_POINTS_MAX],
    )?;
    let stated = |source: &str| match source {
        "sync" => "at its sync".to_string(),
        donor => format!("in its usage report to {donor}"),
    };
    Ok(contradiction.map(|(then_ms, then, then_source)| {
        let when = |ms: i64| {
            jiff::Timestamp::from_millisecond(ms)
                .map_or_else(|_| ms.to_string(), |t| t.to_string())
        };
        format!(
            "host {installation} of {server_id} states {now} leases issued as of {} ({}), but {then} as of {} ({}): leases issued only grow, so its ledger was put back from a copy or rewritten to forget checkouts",
            when(as_of_ms),
            stated(source),
            when(then_ms),
            stated(&then_source)
        )
    }))
}

/// [`judge_counters`] for counters without a time: compared with the last such report.
fn judge_untimed_counters(
    connection: &Connection,
    server_id: &str,
    installation: &str,
    counters: &tessera_core::sync::LedgerCounters,
) -> Result<Option<String>, AuthorityError> {
    let last: Option<i64> = connection
        .query_row(
            "SELECT leases_issued FROM ledger_counters WHERE server_id = ?1 AND installation = ?2",
            params![server_id, installation],
            |row| row.get(0),
        )
        .optional()?;
    let now = i64::try_from(counters.leases_issued).unwrap_or(i64::MAX);
    connection.execute(
        "INSERT OR REPLACE INTO ledger_counters (server_id, installation, leases_issued) VALUES (?1, ?2, ?3)",
        params![server_id, installation, now],
    )?;
    Ok(last.filter(|last| now < *last).map(|last| {
        format!(
            "host {installation} of {server_id} reports {now} leases issued in all, fewer than the {last} it reported at its last sync: its ledger was rewritten to forget checkouts"
        )
    }))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Log,
    Audit,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Log => "log",
            Kind::Audit => "audit",
        }
    }

    fn alert(self) -> &'static str {
        match self {
            Kind::Log => LOG_REWRITTEN,
            Kind::Audit => AUDIT_REWRITTEN,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Kind::Log => "Raft log entry",
            Kind::Audit => "audit record",
        }
    }
}

/// The points countersigned for one host's chain, as (at, hash).
fn points(
    connection: &Connection,
    server_id: &str,
    installation: &str,
    kind: Kind,
) -> Result<Vec<(u64, String)>, AuthorityError> {
    let mut statement = connection.prepare_cached(
        "SELECT at, hash FROM history_points WHERE server_id = ?1 AND installation = ?2 AND kind = ?3 ORDER BY at",
    )?;
    let rows = statement
        .query_map(params![server_id, installation, kind.name()], |row| {
            Ok((
                u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0),
                row.get(1)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// What is wrong with one chain's recomputed point, if anything.
fn judge_one(
    kind: Kind,
    countersigned: &[(u64, String)],
    check: Option<&PointCheck>,
    installation: &str,
) -> Option<String> {
    let last = countersigned.last()?;
    let host = format!("host {installation}");
    // No check: this host's ledger holds no countersigned point, which is also what a lost
    // first answer leaves (the retry is accepted as such by the sync chain). Not an alert.
    let check = check?;
    let Some((at, signed)) = countersigned.iter().find(|(at, _)| *at == check.at) else {
        return Some(format!(
            "{host} recomputed its chain at {} {}, which the vendor never countersigned (last countersigned: {})",
            kind.what(),
            check.at,
            last.0
        ));
    };
    match (&check.hash, kind) {
        (None, Kind::Log) => None,
        (None, Kind::Audit) => Some(format!(
            "{host} no longer holds audit record {at}, which the vendor countersigned: audit records were deleted"
        )),
        (Some(hash), _) if hash == signed => None,
        (Some(hash), _) => Some(format!(
            "{host}'s {} {at} hashes to {hash} now, not to {signed} as countersigned: the history before it was rewritten",
            kind.what()
        )),
    }
}

/// The alerts a request's heads call for, as (kind, detail).
pub fn judge(
    connection: &Connection,
    server_id: &str,
    heads: &HistoryHeads,
) -> Result<Vec<(&'static str, String)>, AuthorityError> {
    let mut alerts = Vec::new();
    for (kind, check) in [
        (Kind::Log, heads.log_at_countersigned.as_ref()),
        (Kind::Audit, heads.audit_at_countersigned.as_ref()),
    ] {
        let countersigned = points(connection, server_id, &heads.installation, kind)?;
        if let Some(detail) = judge_one(kind, &countersigned, check, &heads.installation) {
            alerts.push((kind.alert(), detail));
        }
    }
    Ok(alerts)
}

/// Records the heads a request reported as countersigned; returns what the response signs.
pub fn countersign(
    connection: &Connection,
    server_id: &str,
    heads: &HistoryHeads,
    now_ms: i64,
) -> Result<Countersigned, AuthorityError> {
    let mut insert = connection.prepare_cached(
        "INSERT OR REPLACE INTO history_points (server_id, installation, kind, at, hash, countersigned_at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for (kind, point) in [(Kind::Log, &heads.log), (Kind::Audit, &heads.audit)] {
        if let Some(ChainPoint { at, hash }) = point {
            insert.execute(params![
                server_id,
                heads.installation,
                kind.name(),
                i64::try_from(*at).unwrap_or(i64::MAX),
                hash,
                now_ms
            ])?;
        }
    }
    Ok(Countersigned {
        installation: heads.installation.clone(),
        log: heads.log.clone(),
        audit: heads.audit.clone(),
    })
}

/// Forgets a server's countersigned points (the vendor's reset, a new binding, at
/// `now_ms`): counter points stated before it are not judged any more.
pub fn clear(
    connection: &Connection,
    server_id: &str,
    now_ms: i64,
) -> Result<usize, AuthorityError> {
    connection.execute(
        "DELETE FROM ledger_counters WHERE server_id = ?1",
        params![server_id],
    )?;
    connection.execute(
        "DELETE FROM counter_points WHERE server_id = ?1",
        params![server_id],
    )?;
    connection.execute(
        "INSERT OR REPLACE INTO counter_points (server_id, installation, as_of_ms, leases_issued, source) \
         VALUES (?1, 'floor:*', ?2, 0, 'floor')",
        params![server_id, now_ms],
    )?;
    connection.execute(
        "DELETE FROM link_reporters WHERE server_id = ?1",
        params![server_id],
    )?;
    Ok(connection.execute(
        "DELETE FROM history_points WHERE server_id = ?1",
        params![server_id],
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(at: u64, hash: Option<&str>) -> PointCheck {
        PointCheck {
            at,
            hash: hash.map(str::to_string),
        }
    }

    #[test]
    fn a_recomputed_point_must_match_what_was_countersigned() {
        let signed = vec![(4, "aa".to_string()), (9, "bb".to_string())];
        // Nothing countersigned yet: nothing to check.
        assert_eq!(judge_one(Kind::Audit, &[], None, "h"), None);
        // The last point, or an earlier one (a retry after a lost answer), unchanged.
        assert_eq!(
            judge_one(Kind::Audit, &signed, Some(&check(9, Some("bb"))), "h"),
            None
        );
        assert_eq!(
            judge_one(Kind::Audit, &signed, Some(&check(4, Some("aa"))), "h"),
            None
        );
        // Rewritten, deleted, never countersigned, forgotten.
        let rewritten = judge_one(Kind::Audit, &signed, Some(&check(9, Some("cc"))), "h").unwrap();
        assert!(
            rewritten.contains("audit record 9 hashes to cc now, not to bb"),
            "{rewritten}"
        );
        let deleted = judge_one(Kind::Audit, &signed, Some(&check(9, None)), "h").unwrap();
        assert!(deleted.contains("audit records were deleted"), "{deleted}");
        let unknown = judge_one(Kind::Audit, &signed, Some(&check(7, Some("aa"))), "h").unwrap();
        assert!(unknown.contains("never countersigned"), "{unknown}");
        // No point held (a lost first answer looks the same): not judged.
        assert_eq!(judge_one(Kind::Audit, &signed, None, "h"), None);
        // A log entry purged into a snapshot cannot be checked; an edited one is named.
        assert_eq!(
            judge_one(Kind::Log, &signed, Some(&check(9, None)), "h"),
            None
        );
        let log = judge_one(Kind::Log, &signed, Some(&check(9, Some("cc"))), "h").unwrap();
        assert!(log.contains("Raft log entry 9"), "{log}");
    }

    fn counters(as_of_ms: i64, leases_issued: u64) -> tessera_core::sync::LedgerCounters {
        tessera_core::sync::LedgerCounters {
            leases_issued,
            as_of_ms: Some(as_of_ms),
            leases_held: 0,
            seats_donated: 0,
            keys: 1,
        }
    }

    /// Points of one host, from its syncs and relayed by its donor, in any order of arrival:
    /// leases issued never go down with the time of the ledger, unless the ledger went back.
    #[test]
    fn counter_points_contradict_each_other_only_when_the_ledger_went_back() {
        let connection = crate::store::open_in_memory();
        connection
            .execute_batch(
                "INSERT INTO customers (name, created_at_ms) VALUES ('acme', 0);
                 INSERT INTO servers (server_id, customer, created_at_ms) VALUES ('S', 'acme', 0);",
            )
            .unwrap();
        let judge = |as_of: i64, leases: u64, source: &str| {
            judge_counters(&connection, "S", "host", &counters(as_of, leases), source).unwrap()
        };
        // A genuine host: its own sync at t=100, then a relayed report made earlier (t=50,
        // fewer leases) arriving later, then more.
        assert_eq!(judge(100, 10, "sync"), None);
        assert_eq!(judge(50, 7, "hq"), None);
        assert_eq!(judge(100, 10, "hq"), None, "the same point again");
        assert_eq!(judge(200, 12, "hq"), None);
        // Arriving the other way round: an earlier time with more than a later point.
        let reversed = judge(150, 13, "hq").unwrap();
        assert!(reversed.contains("states 13 leases issued") && reversed.contains("but 12"));
        // One rewind, one alert: the same stale report relayed again is not judged again.
        assert_eq!(judge(150, 13, "hq"), None);
        // Put back to a copy: a later time with fewer leases issued than at t=200.
        let rewound = judge(300, 9, "hq").unwrap();
        assert!(
            rewound.contains("states 9 leases issued")
                && rewound.contains("but 12")
                && rewound.contains("in its usage report to hq"),
            "{rewound}"
        );
        // The ledger as it is now goes on from there; older reports are not judged again.
        assert_eq!(judge(400, 10, "sync"), None);
        assert_eq!(judge(250, 12, "hq"), None);
        // But it may not go back again.
        assert!(judge(500, 8, "sync").is_some());
        // Another host of the same server is judged on its own.
        assert_eq!(
            judge_counters(&connection, "S", "other", &counters(400, 1), "sync").unwrap(),
            None
        );
        // A reset forgets them, and what was stated before it.
        clear(&connection, "S", 1_000).unwrap();
        assert_eq!(judge(900, 50, "hq"), None);
        assert_eq!(judge(1_500, 1, "sync"), None);
        assert!(judge(1_600, 0, "sync").is_some());
    }
}
