//! Neighbour links: a grant the donor's ledger never issued, seen at the syncs of both sides.
//!
//! A receiver accepts a grant signed by its donor's identity key. Whoever holds that key (the
//! customer owns both servers) can sign a grant the donor's ledger never issued (T10 in
//! docs/security.md). Every sync request carries each link's history as the server's ledger
//! holds it ([`LinkReport`]: runs of serials with one license count, donor side and receiver
//! side); the authority keeps the latest report of each side (`link_runs`) and checks, after
//! either side syncs, every serial the receiver reports as the start or end of a run:
//!
//! - up to the donor's last report, it must lie in a donor run with the same license count
//!   (a donor with no run on the link is not checked);
//!   otherwise the donor never issued it: **`grant_forged`**, recorded for the receiver's
//!   server ID (or the donor's, if the receiver is not registered), once per serial. "Up to
//!   the last report" is up to the donor's newest reported serial, or up to the time the
//!   donor stated in that request less five minutes, whichever is later: serials are the
//!   donor's time in ms (`next_number`), so a grant issued after the report has a serial
//!   above that time;
//! - above that, it may have been issued since: checked again after the donor's next sync;
//! - below the donor's oldest kept run: no longer checkable (each side keeps 64 runs).
//!
//! A serial inside a donor run with the same count may not have been issued itself, but it
//! gives nothing the donor did not give at that time. A donor that never reported (an older
//! server) is not checked.

use rusqlite::{Connection, OptionalExtension, params};
use tessera_core::sync::{LinkReport, LinkSide};

use crate::chain;
use crate::error::AuthorityError;

pub const GRANT_FORGED: &str = "grant_forged";
/// A server trusts a vendor key that is not this vendor's.
pub const VENDOR_KEY_ADDED: &str = "vendor_key_added";

type Run = (u64, u64, u32);

/// How far below a donor's stated time a serial it issued after its report may be: grants
/// issued within one ms get serials one above the other, and a renewal stamped just before
/// the report may reach the log just after it (a forwarded write, an election).
const SERIAL_MARGIN_MS: i64 = 5 * 60_000;

/// Replaces `reporter`'s reported links with `links`, reported at `stated_ms` by the
/// reporter's clock.
pub fn record(
    connection: &Connection,
    reporter: &str,
    links: &[LinkReport],
    stated_ms: i64,
    now_ms: i64,
) -> Result<(), AuthorityError> {
    connection.execute(
        "DELETE FROM link_runs WHERE reporter = ?1",
        params![reporter],
    )?;
    connection.execute(
        "INSERT OR REPLACE INTO link_reporters (server_id, stated_ms) VALUES (?1, ?2)",
        params![reporter, stated_ms],
    )?;
    let mut insert = connection.prepare_cached(
        "INSERT INTO link_runs (reporter, side, donor, receiver, key_id, first, last, licenses, reported_at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    for link in links {
        for run in &link.runs {
            insert.execute(params![
                reporter,
                link.side.name(),
                link.donor,
                link.receiver,
                link.key_id,
                i64::try_from(run.first).unwrap_or(i64::MAX),
                i64::try_from(run.last).unwrap_or(i64::MAX),
                run.licenses,
                now_ms
            ])?;
        }
    }
    Ok(())
}

fn runs(
    connection: &Connection,
    side: LinkSide,
    donor: &str,
    receiver: &str,
    key_id: &str,
) -> Result<Vec<Run>, AuthorityError> {
    // The donor's runs as the donor reported them; the receiver's as the receiver did.
    let reporter = match side {
        LinkSide::Donor => donor,
        LinkSide::Receiver => receiver,
    };
    let mut statement = connection.prepare_cached(
        "SELECT first, last, licenses FROM link_runs \
         WHERE reporter = ?1 AND side = ?2 AND donor = ?3 AND receiver = ?4 AND key_id = ?5 ORDER BY first",
    )?;
    let rows = statement
        .query_map(
            params![reporter, side.name(), donor, receiver, key_id],
            |row| {
                Ok((
                    u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0),
                    u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0),
                    row.get::<_, u32>(2)?,
                ))
            },
        )?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// What is wrong with the receiver's runs against the donor's, given that the donor's
/// report covers every serial up to `covered`: (serial, licenses, why) for each serial the
/// donor did not issue so.
fn mismatches(donor: &[Run], receiver: &[Run], covered: u64) -> Vec<(u64, u32, String)> {
    // A donor with no run on this link (rebuilt on an empty ledger, upgraded from a version
    // without link histories, or silent for 400 days) cannot be checked against.
    let (Some(lowest), Some(newest)) = (
        donor.iter().map(|r| r.0).min(),
        donor.iter().map(|r| r.1).max(),
    ) else {
        return Vec::new();
    };
    let highest = newest.max(covered);
    let mut found = Vec::new();
    for &(first, last, licenses) in receiver {
        for serial in [first, last] {
            if serial < lowest
                || serial > highest
                || found.iter().any(|f: &(u64, u32, String)| f.0 == serial)
            {
                continue;
            }
            match donor.iter().find(|r| r.0 <= serial && serial <= r.1) {
                Some(run) if run.2 == licenses => {}
                Some(run) => found.push((
                    serial,
                    licenses,
                    format!("the donor's ledger issued {} licenses under it", run.2),
                )),
                None => found.push((
                    serial,
                    licenses,
                    "the donor's ledger never issued that serial".to_string(),
                )),
            }
        }
    }
    found
}

fn is_registered(connection: &Connection, server_id: &str) -> Result<bool, AuthorityError> {
    Ok(connection
        .query_row(
            "SELECT 1 FROM servers WHERE server_id = ?1",
            params![server_id],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Checks every link the request's server reported on, against the other side's latest
/// report; records a `grant_forged` alert (once per serial) for each mismatch. Returns the
/// details of the new alerts.
pub fn judge(
    connection: &Connection,
    links: &[LinkReport],
    now_ms: i64,
) -> Result<Vec<String>, AuthorityError> {
    let mut checked = std::collections::BTreeSet::new();
    let mut raised = Vec::new();
    for link in links {
        let id = (
            link.donor.clone(),
            link.receiver.clone(),
            link.key_id.clone(),
        );
        if !checked.insert(id) {
            continue;
        }
        // A donor that never reported link histories (an older server) is not checked.
        let Some(stated_ms) = connection
            .query_row(
                "SELECT stated_ms FROM link_reporters WHERE server_id = ?1",
                params![link.donor],
                |row| row.get::<_, i64>(0),
            )
            .optional()?
        else {
            continue;
        };
        let covered = u64::try_from(stated_ms - SERIAL_MARGIN_MS).unwrap_or(0);
        let donor = runs(
            connection,
            LinkSide::Donor,
            &link.donor,
            &link.receiver,
            &link.key_id,
        )?;
        let receiver = runs(
            connection,
            LinkSide::Receiver,
            &link.donor,
            &link.receiver,
            &link.key_id,
        )?;
        for (serial, licenses, why) in mismatches(&donor, &receiver, covered) {
            let detail = format!(
                "{} holds a grant of key {} from {} with serial {serial} for {licenses} licenses, and {why}: the grant was signed outside the donor's ledger",
                link.receiver, link.key_id, link.donor
            );
            let server_id = if is_registered(connection, &link.receiver)? {
                &link.receiver
            } else if is_registered(connection, &link.donor)? {
                &link.donor
            } else {
                continue;
            };
            let seen = connection
                .query_row(
                    "SELECT 1 FROM alerts WHERE server_id = ?1 AND kind = ?2 AND detail = ?3",
                    params![server_id, GRANT_FORGED, detail],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if !seen {
                chain::record_alert(connection, server_id, GRANT_FORGED, None, &detail, now_ms)?;
                raised.push(detail);
            }
        }
    }
    Ok(raised)
}

/// Records `vendor_key_added` (once per key and server) for every key the server trusts or
/// added to its trust list that is not `vendor`'s own: keys signed by such a key are served
/// by that server although the vendor never signed them (a verifying application refuses
/// them). Returns the details of the new alerts.
pub fn judge_trust(
    connection: &Connection,
    server_id: &str,
    trust: &tessera_core::sync::TrustReport,
    vendor: &str,
    now_ms: i64,
) -> Result<Vec<String>, AuthorityError> {
    let mut foreign: Vec<(&str, Option<String>)> = Vec::new();
    for change in &trust.changes {
        for added in &change.added {
            if added != vendor && !foreign.iter().any(|(f, _)| f == added) {
                foreign.push((added, Some(change.at.to_string())));
            }
        }
    }
    for trusted in &trust.trusted {
        if trusted != vendor && !foreign.iter().any(|(f, _)| f == trusted) {
            foreign.push((trusted, None));
        }
    }
    let mut raised = Vec::new();
    for (fingerprint, since) in foreign {
        let detail = format!(
            "{server_id} trusts vendor key {fingerprint}{}, which is not this vendor's ({vendor}): it serves keys signed by it, which the vendor never issued",
            since.map(|at| format!(" (added {at})")).unwrap_or_default()
        );
        let seen = connection
            .query_row(
                "SELECT 1 FROM alerts WHERE server_id = ?1 AND kind = ?2 AND detail LIKE ?3",
                params![
                    server_id,
                    VENDOR_KEY_ADDED,
                    format!("{server_id} trusts vendor key {fingerprint}%")
                ],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if !seen {
            chain::record_alert(
                connection,
                server_id,
                VENDOR_KEY_ADDED,
                None,
                &detail,
                now_ms,
            )?;
            raised.push(detail);
        }
    }
    Ok(raised)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receivers_serial_must_be_one_the_donor_issued_with_that_count() {
        let donor = vec![(100, 400, 2), (500, 900, 3)];
        // Issued: within a run, same count.
        assert!(mismatches(&donor, &[(100, 300, 2), (600, 900, 3)], 0).is_empty());
        // Above what the donor reported: not checked yet; below its oldest run: no longer.
        assert!(mismatches(&donor, &[(950, 990, 7), (10, 20, 9)], 0).is_empty());
        // Another count under an issued serial, and a serial in a gap between runs.
        let found = mismatches(&donor, &[(200, 200, 6), (450, 450, 2)], 0);
        assert_eq!(
            found.iter().map(|f| (f.0, f.1)).collect::<Vec<_>>(),
            vec![(200, 6), (450, 2)]
        );
        assert!(found[0].2.contains("issued 2 licenses"), "{found:?}");
        assert!(found[1].2.contains("never issued"), "{found:?}");
        // Above the donor's newest serial but below the time it reported at: it would have
        // been in the report.
        assert_eq!(mismatches(&donor, &[(950, 950, 3)], 2_000).len(), 1);
        // A donor with no run on this link: not checked.
        assert!(mismatches(&[], &[(1, 2, 3)], 2_000).is_empty());
    }
}
