//! The sync chain: clones and rollbacks of a license server's data, detected.
//!
//! Every response the authority issues to a server is a link; every chained request names
//! the last link its server accepted (`last_response`). The links of one server form a chain
//! since its last reset (`sync_chain` table); the newest link not superseded is the *head*.
//! A request is judged, after the key binding and the replay rule, by [`judge`]:
//!
//! 1. **Extend**: it presents the head. The new response becomes the head.
//! 2. **Retry after a lost answer**: it presents the head's parent *and* carries the same
//!    `pending_since` as the head's request (the sequence of the first request sent since
//!    the server last accepted a response: a server that never received the head sends the
//!    same one in every retry). The head is marked superseded and the new response replaces
//!    it at the same position.
//! 3. **Start**: the server has no chain yet (first sync, first after a reset, or first
//!    chained request of a server that synced before the chain existed).
//! 4. Anything else is refused (409) and recorded as an alert:
//!    - it presents a superseded link: that answer was reported lost by a retry and is now
//!      used after all, so two copies hold the data: **`server_cloned`**;
//!    - otherwise some installation moved past the presented point: the *witness* is the
//!      link issued from that point (the child of the presented link on the chain; the first
//!      link when it presents nothing or the point the chain started from; the head when it
//!      presents a link the chain does not know). If the witness was requested by the same
//!      installation (host name and data directory path) as this request, the data went
//!      back in time on the same installation: **`server_rolled_back`** (a restored backup);
//!      if by another installation, a second copy of the data runs elsewhere:
//!      **`server_cloned`**.
//!    - a request without a chain for a server that has one (an older tessera, or data from
//!      before the chain): **`server_rolled_back`**.
//!
//! Why the installation, and not the distance: the authority sees the same thing when a
//! copy taken before the last sync is started beside the original (a clone) and when it is
//! put back in place of the original (a rollback): the presented link is an ancestor of the
//! head. Only where the request comes from differs. Both are refused alike; the kind tells
//! the vendor what to ask the customer.
//!
//! A server ID a request is refused for stays refused until the vendor resets it
//! (`registry::reset_server`): the binding and the chain are cleared, the reset is an alert,
//! and the next sync starts a new chain.

use rusqlite::{Connection, OptionalExtension, Row, params};
use tessera_core::sync::{SERVER_CLONED, SERVER_ROLLED_BACK, SyncRequestPayload};

use crate::error::AuthorityError;
use crate::store::timestamp;
use crate::wire::AlertInfo;

/// The alert kind a vendor's reset is recorded under.
pub const CHAIN_RESET: &str = "chain_reset";

/// One response issued to a server: a row of `sync_chain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub position: i64,
    pub hash: String,
    pub parent: Option<String>,
    pub request_sequence: u64,
    pub pending_since: u64,
    pub installation: Option<String>,
    pub issued_at_ms: i64,
    pub superseded: bool,
}

const LINK_COLUMNS: &str = "position, hash, parent, request_sequence, pending_since, installation, issued_at_ms, superseded_at_ms";

impl Link {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Link> {
        Ok(Link {
            position: row.get(0)?,
            hash: row.get(1)?,
            parent: row.get(2)?,
            request_sequence: u64::try_from(row.get::<_, i64>(3)?).unwrap_or(0),
            pending_since: u64::try_from(row.get::<_, i64>(4)?).unwrap_or(0),
            installation: row.get(5)?,
            issued_at_ms: row.get(6)?,
            superseded: row.get::<_, Option<i64>>(7)?.is_some(),
        })
    }
}

/// What a request claims about its chain.
#[derive(Clone, Copy, Debug)]
pub struct Claim<'a> {
    pub last_response: Option<&'a str>,
    pub pending_since: Option<u64>,
    pub installation: Option<&'a str>,
}

impl<'a> Claim<'a> {
    pub fn of(payload: &'a SyncRequestPayload) -> Claim<'a> {
        Claim {
            last_response: payload.last_response.as_deref(),
            pending_since: payload.pending_since,
            installation: payload.installation.as_deref(),
        }
    }
}

/// How an accepted request moves the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// No chain yet: the response is the first link.
    Start,
    /// The response follows the head.
    Extend { head: Link },
    /// A retry after a lost answer: the head is superseded, the response takes its place.
    Retry { head: Link },
    /// A server older than the chain that never sent a chained request: answered, nothing
    /// recorded.
    Unchained,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    Cloned,
    RolledBack,
}

impl FaultKind {
    pub fn code(self) -> &'static str {
        match self {
            FaultKind::Cloned => SERVER_CLONED,
            FaultKind::RolledBack => SERVER_ROLLED_BACK,
        }
    }
}

/// A refused request: which kind, and what the authority saw, for the vendor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    pub detail: String,
}

/// The rules of the module documentation, on the server's chain as stored (every link,
/// superseded ones included, in any order). Pure.
pub fn judge(chain: &[Link], claim: Claim<'_>) -> Result<Step, Fault> {
    let mut main: Vec<&Link> = chain.iter().filter(|link| !link.superseded).collect();
    main.sort_by_key(|link| link.position);
    let Some(head) = main.last().copied() else {
        return Ok(if claim.pending_since.is_some() {
            Step::Start
        } else {
            Step::Unchained
        });
    };
    if claim.pending_since.is_none() {
        return Err(Fault {
            kind: FaultKind::RolledBack,
            detail: format!(
                "the request carries no sync chain, but this server has sent chained requests since {}: tessera older than the chain, or its data restored from before it",
                time_text(main[0].issued_at_ms)
            ),
        });
    }
    let presented = claim.last_response;
    if presented == Some(head.hash.as_str()) {
        return Ok(Step::Extend { head: head.clone() });
    }
    if presented == head.parent.as_deref() && claim.pending_since == Some(head.pending_since) {
        return Ok(Step::Retry { head: head.clone() });
    }
    let presented_text = presented.map_or_else(
        || "no response (a first sync)".to_string(),
        |hash| format!("response {}", short(hash)),
    );
    if let Some(lost) = chain
        .iter()
        .find(|link| link.superseded && Some(link.hash.as_str()) == presented)
    {
        return Err(Fault {
            kind: FaultKind::Cloned,
            detail: format!(
                "it presents {presented_text}, issued {} and later reported lost by a retry from the same point: one copy of the data used that answer while another asked again",
                time_text(lost.issued_at_ms)
            ),
        });
    }
    let (witness, what) = match main
        .iter()
        .position(|link| Some(link.hash.as_str()) == presented)
    {
        // Not the head (that was rule 1), so it has a child on the chain.
        Some(index) => (main[index + 1], "the next response from that point"),
        None if presented == main[0].parent.as_deref() => {
            (main[0], "the first response of the chain from that point")
        }
        None => (
            head,
            "the chain's head; the presented response is not in the chain",
        ),
    };
    let same_installation =
        witness.installation.is_some() && witness.installation.as_deref() == claim.installation;
    let kind = if same_installation {
        FaultKind::RolledBack
    } else {
        FaultKind::Cloned
    };
    let whose = if same_installation {
        "this same installation (host and data directory), whose data has since gone back: a restored backup or an old copy put in place"
    } else {
        "another installation (another host or data directory) holding the same identity: a copy of the data directory"
    };
    let head_text = if witness.position == head.position {
        String::new()
    } else {
        format!(
            "; the chain's head is link {} issued {}",
            head.position,
            time_text(head.issued_at_ms)
        )
    };
    Err(Fault {
        kind,
        detail: format!(
            "it presents {presented_text}, but the authority already answered past that point: {what}, link {} issued {}, went to {whose}{head_text}",
            witness.position,
            time_text(witness.issued_at_ms),
        ),
    })
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

fn time_text(ms: i64) -> String {
    timestamp(ms).map_or_else(|_| format!("{ms} ms"), |t| t.to_string())
}

/// Every link of a server's chain.
pub fn load(connection: &Connection, server_id: &str) -> Result<Vec<Link>, AuthorityError> {
    let mut statement = connection.prepare(&format!(
        "SELECT {LINK_COLUMNS} FROM sync_chain WHERE server_id = ?1 ORDER BY position, issued_at_ms"
    ))?;
    let rows = statement.query_map(params![server_id], Link::from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Records the response `hash` as the chain moved by `step`.
pub fn record(
    connection: &Connection,
    server_id: &str,
    step: &Step,
    hash: &str,
    payload: &SyncRequestPayload,
    now_ms: i64,
) -> Result<(), AuthorityError> {
    let (position, parent) = match step {
        Step::Unchained => return Ok(()),
        Step::Start => (1, payload.last_response.clone()),
        Step::Extend { head } => (head.position + 1, Some(head.hash.clone())),
        Step::Retry { head } => {
            connection.execute(
                "UPDATE sync_chain SET superseded_at_ms = ?3 WHERE server_id = ?1 AND hash = ?2",
                params![server_id, head.hash, now_ms],
            )?;
            (head.position, head.parent.clone())
        }
    };
    let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    connection.execute(
        &format!(
            "INSERT INTO sync_chain (server_id, {LINK_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL)"
        ),
        params![
            server_id,
            position,
            hash,
            parent,
            as_i64(payload.sequence),
            as_i64(payload.pending_since.unwrap_or(payload.sequence)),
            payload.installation,
            now_ms
        ],
    )?;
    Ok(())
}

/// Clears a server's chain (the vendor's reset, at `now_ms`); returns how many links it had.
pub fn clear(
    connection: &Connection,
    server_id: &str,
    now_ms: i64,
) -> Result<usize, AuthorityError> {
    crate::history::clear(connection, server_id, now_ms)?;
    Ok(connection.execute(
        "DELETE FROM sync_chain WHERE server_id = ?1",
        params![server_id],
    )?)
}

/// Records an alert, or counts a repeat on the server's latest alert when that one has the
/// same kind, presented link and installation (a blocked server asking again).
pub fn record_alert(
    connection: &Connection,
    server_id: &str,
    kind: &str,
    claim: Option<Claim<'_>>,
    detail: &str,
    now_ms: i64,
) -> Result<(), AuthorityError> {
    let presented = claim.and_then(|c| c.last_response);
    let installation = claim.and_then(|c| c.installation);
    if kind != CHAIN_RESET {
        let repeat: Option<i64> = connection
            .query_row(
                "SELECT id FROM alerts WHERE server_id = ?1 ORDER BY id DESC LIMIT 1",
                params![server_id],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(id) = repeat {
            let changed = connection.execute(
                "UPDATE alerts SET count = count + 1, last_at_ms = ?5 \
                 WHERE id = ?1 AND kind = ?2 AND presented IS ?3 AND installation IS ?4",
                params![id, kind, presented, installation, now_ms],
            )?;
            if changed == 1 {
                return Ok(());
            }
        }
    }
    connection.execute(
        "INSERT INTO alerts (server_id, kind, at_ms, last_at_ms, count, presented, installation, detail) \
         VALUES (?1, ?2, ?3, ?3, 1, ?4, ?5, ?6)",
        params![server_id, kind, now_ms, presented, installation, detail],
    )?;
    Ok(())
}

/// Every alert, newest first, with the server's customer.
pub fn list_alerts(connection: &Connection) -> Result<Vec<AlertInfo>, AuthorityError> {
    let mut statement = connection.prepare(
        "SELECT a.id, a.server_id, s.customer, a.kind, a.at_ms, a.last_at_ms, a.count, a.detail \
         FROM alerts a JOIN servers s ON s.server_id = a.server_id ORDER BY a.id DESC",
    )?;
    let rows = statement.query_map([], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, String>(3)?,
            row.get::<_, i64>(4)?,
            row.get::<_, i64>(5)?,
            row.get::<_, i64>(6)?,
            row.get::<_, String>(7)?,
        ))
    })?;
    let mut alerts = Vec::new();
    for row in rows {
        let (id, server_id, customer, kind, at_ms, last_at_ms, count, detail) = row?;
        alerts.push(AlertInfo {
            id,
            server_id,
            customer,
            kind,
            at: timestamp(at_ms)?,
            last_at: timestamp(last_at_ms)?,
            count: u64::try_from(count).unwrap_or(0),
            detail,
        });
    }
    Ok(alerts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(position: i64, hash: &str, parent: Option<&str>, pending: u64, at: &str) -> Link {
        Link {
            position,
            hash: hash.into(),
            parent: parent.map(Into::into),
            request_sequence: pending,
            pending_since: pending,
            installation: Some(at.into()),
            issued_at_ms: position * 1_000,
            superseded: false,
        }
    }

    fn claim<'a>(last: Option<&'a str>, pending: u64, at: &'a str) -> Claim<'a> {
        Claim {
            last_response: last,
            pending_since: Some(pending),
            installation: Some(at),
        }
    }

    /// Three syncs of installation "a": r1 (from nothing), r2, r3.
    fn chain() -> Vec<Link> {
        vec![
            link(1, "r1", None, 10, "a"),
            link(2, "r2", Some("r1"), 20, "a"),
            link(3, "r3", Some("r2"), 30, "a"),
        ]
    }

    fn kind(result: Result<Step, Fault>) -> FaultKind {
        result.unwrap_err().kind
    }

    #[test]
    fn no_chain_starts_one_and_the_head_extends_it() {
        assert_eq!(judge(&[], claim(None, 1, "a")), Ok(Step::Start));
        // A server that synced before the chain existed presents its last response.
        assert_eq!(judge(&[], claim(Some("old"), 1, "a")), Ok(Step::Start));
        let chain = chain();
        assert_eq!(
            judge(&chain, claim(Some("r3"), 40, "a")),
            Ok(Step::Extend {
                head: chain[2].clone()
            })
        );
        // The head extends from any installation: a domain's primary may move.
        assert!(matches!(
            judge(&chain, claim(Some("r3"), 40, "b")),
            Ok(Step::Extend { .. })
        ));
    }

    #[test]
    fn a_retry_after_a_lost_answer_replaces_the_head() {
        let chain = chain();
        // The answer r3 (to the request with pending_since 30) never arrived: the server
        // still holds r2 and asks again with the same pending_since.
        assert_eq!(
            judge(&chain, claim(Some("r2"), 30, "a")),
            Ok(Step::Retry {
                head: chain[2].clone()
            })
        );
        // A first sync whose answer was lost, likewise.
        let first = vec![link(1, "r1", None, 10, "a")];
        assert!(matches!(
            judge(&first, claim(None, 10, "a")),
            Ok(Step::Retry { .. })
        ));
    }

    #[test]
    fn the_head_s_parent_from_another_lineage_is_a_clone_or_a_rollback() {
        let chain = chain();
        // Another installation still at r2 while "a" took r3: a copy of the data.
        assert_eq!(
            kind(judge(&chain, claim(Some("r2"), 35, "b"))),
            FaultKind::Cloned
        );
        // The same installation back at r2 with a new request: a restored backup.
        assert_eq!(
            kind(judge(&chain, claim(Some("r2"), 35, "a"))),
            FaultKind::RolledBack
        );
    }

    #[test]
    fn older_links_and_first_syncs_are_judged_by_the_witness_installation() {
        let mut chain = chain();
        // r2 and r3 were taken by installation "b" (the primary moved, say).
        chain[1].installation = Some("b".into());
        chain[2].installation = Some("b".into());
        // Presenting r1: the witness is r2 (from "b").
        assert_eq!(
            kind(judge(&chain, claim(Some("r1"), 35, "b"))),
            FaultKind::RolledBack
        );
        assert_eq!(
            kind(judge(&chain, claim(Some("r1"), 35, "a"))),
            FaultKind::Cloned
        );
        // Presenting nothing (a fresh data directory with the identity): the witness is r1.
        assert_eq!(
            kind(judge(&chain, claim(None, 35, "a"))),
            FaultKind::RolledBack
        );
        assert_eq!(kind(judge(&chain, claim(None, 35, "c"))), FaultKind::Cloned);
        // A link the chain does not know (from before a reset): the witness is the head.
        assert_eq!(
            kind(judge(&chain, claim(Some("zz"), 35, "b"))),
            FaultKind::RolledBack
        );
        assert_eq!(
            kind(judge(&chain, claim(Some("zz"), 35, "a"))),
            FaultKind::Cloned
        );
        let detail = judge(&chain, claim(Some("r1"), 35, "a"))
            .unwrap_err()
            .detail;
        assert!(detail.contains("link 2"), "{detail}");
    }

    #[test]
    fn a_superseded_answer_presented_later_is_a_clone() {
        let mut chain = chain();
        chain[2].superseded = true;
        chain.push(link(3, "r3b", Some("r2"), 30, "a"));
        assert_eq!(
            kind(judge(&chain, claim(Some("r3"), 40, "a"))),
            FaultKind::Cloned
        );
        // The replacement is the head.
        assert!(matches!(
            judge(&chain, claim(Some("r3b"), 40, "a")),
            Ok(Step::Extend { .. })
        ));
    }

    #[test]
    fn requests_without_a_chain_are_answered_until_the_server_has_one() {
        let unchained = Claim {
            last_response: None,
            pending_since: None,
            installation: None,
        };
        assert_eq!(judge(&[], unchained), Ok(Step::Unchained));
        assert_eq!(kind(judge(&chain(), unchained)), FaultKind::RolledBack);
    }
}
