//! The hash chain through the Raft log (tamper evidence; docs/security.md, T2).
//!
//! Every stored entry carries `prev` (the chain value of the entry before it) and
//! `chain = SHA-256(prev || index (8 bytes, big-endian) || entry JSON)`. The writer computes
//! both in the transaction that appends the entry, from the row before it in that same
//! transaction, so a truncation followed by an append chains from what is left. Purging the
//! front of the log removes rows; the first row left keeps the `prev` it had, which is not
//! checked against anything (what was purged is in the snapshot).
//!
//! [`Walk`] checks the rows at open: a row whose `chain` is not the hash of its contents was
//! edited in place; a row whose `prev` is not the chain of the row before it follows a row
//! that was deleted, inserted or edited with its chain recomputed. Someone who recomputes the
//! whole chain after an edit is not caught here (there is no secret on the customer's
//! machine): the head goes into every sync request, and the vendor compares it at the next
//! sync with the one it countersigned (see `tessera_core::sync::HistoryHeads`).

use sha2::{Digest, Sha256};

/// A chain value.
pub type Hash = [u8; 32];

/// The `prev` of the first entry ever appended.
pub const GENESIS: Hash = [0; 32];

/// The chain value of the entry at `index` stored as `entry`, after `prev`.
pub fn link(prev: &Hash, index: u64, entry: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(index.to_be_bytes());
    hasher.update(entry);
    hasher.finalize().into()
}

/// The digest stored with the snapshot: SHA-256 of a context, the meta (JSON) and the data.
/// Checked at every open (see `writer::load`): a snapshot edited on disk stops the start.
pub fn snapshot_digest(meta: &str, data: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(b"tessera-snapshot/v1\n");
    hasher.update(meta.as_bytes());
    hasher.update(b"\n");
    hasher.update(data);
    hasher.finalize().into()
}

/// Why a stored row breaks the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Break {
    /// The row has no chain values: written after the migration without them (by hand).
    Missing,
    /// The entry does not hash to its chain value: it was edited in place.
    Edited,
    /// The row does not follow the row before it: a row was deleted or inserted before it,
    /// or the row before it was edited and re-chained by hand.
    Unlinked { previous: u64 },
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Break::Missing => write!(f, "the entry has no chain hash: it was added by hand"),
            Break::Edited => write!(
                f,
                "the entry does not match its chain hash: it was edited after it was written"
            ),
            Break::Unlinked { previous } => write!(
                f,
                "the entry does not follow entry {previous} in the hash chain: entries were deleted, inserted or rewritten before it"
            ),
        }
    }
}

/// Walks the chain one stored row at a time, in index order.
#[derive(Debug, Default)]
pub struct Walk {
    last: Option<(u64, Hash)>,
    /// Every row that breaks the chain, with why.
    pub breaks: Vec<(u64, Break)>,
}

impl Walk {
    /// Checks the next row (`prev` and `chain` as stored, `None` when NULL).
    pub fn row(&mut self, index: u64, entry: &[u8], prev: Option<&[u8]>, chain: Option<&[u8]>) {
        let (Some(prev), Some(chain)) = (
            prev.and_then(|p| Hash::try_from(p).ok()),
            chain.and_then(|c| Hash::try_from(c).ok()),
        ) else {
            self.breaks.push((index, Break::Missing));
            self.last = None;
            return;
        };
        if link(&prev, index, entry) != chain {
            self.breaks.push((index, Break::Edited));
        } else if let Some((previous, last)) = self.last
            && (previous + 1 != index || last != prev)
        {
            self.breaks.push((index, Break::Unlinked { previous }));
        }
        self.last = Some((index, chain));
    }

    /// The last row's (index, chain value).
    pub fn head(&self) -> Option<(u64, Hash)> {
        self.last
    }
}

/// Tests of other crates only (feature `test-support`): edits made the way a root customer
/// who read the source would make them, so that only the checks of what the data holds can
/// notice. They panic on any error.
#[cfg(feature = "test-support")]
pub mod tamper {
    use std::path::Path;

    use rusqlite::{Connection, params};

    use super::{Hash, link, snapshot_digest};

    /// Rewrites the log entry at `index` of the store at `path`, then recomputes the hash
    /// chain from it on.
    pub fn rewrite_entry(path: &Path, index: i64, entry: &[u8]) {
        let connection = Connection::open(path).expect("open the store");
        connection
            .execute(
                "UPDATE raft_log SET entry = ?1 WHERE log_index = ?2",
                params![entry, index],
            )
            .expect("rewrite the entry");
        let rows: Vec<(i64, Vec<u8>, Vec<u8>)> = connection
            .prepare(
                "SELECT log_index, entry, prev FROM raft_log WHERE log_index >= ?1 ORDER BY log_index",
            )
            .and_then(|mut statement| {
                statement
                    .query_map([index], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                    .collect()
            })
            .expect("read the entries");
        let mut prev: Hash = rows[0].2.as_slice().try_into().expect("a chained entry");
        for (at, entry, _) in rows {
            let chain = link(&prev, at as u64, &entry);
            connection
                .execute(
                    "UPDATE raft_log SET prev = ?2, chain = ?3 WHERE log_index = ?1",
                    params![at, prev.as_slice(), chain.as_slice()],
                )
                .expect("rewrite the chain");
            prev = chain;
        }
    }

    /// Rewrites the stored snapshot's data, with its digest recomputed.
    pub fn rewrite_snapshot(path: &Path, data: &[u8]) {
        let connection = Connection::open(path).expect("open the store");
        let meta: String = connection
            .query_row("SELECT meta FROM raft_snapshot WHERE id = 1", [], |row| {
                row.get(0)
            })
            .expect("a stored snapshot");
        let digest = snapshot_digest(&meta, data);
        connection
            .execute(
                "UPDATE raft_snapshot SET data = ?1, digest = ?2 WHERE id = 1",
                params![data, digest.as_slice()],
            )
            .expect("rewrite the snapshot");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chained(entries: &[&[u8]]) -> Vec<(u64, Vec<u8>, Hash, Hash)> {
        let mut prev = GENESIS;
        entries
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                let index = i as u64 + 1;
                let chain = link(&prev, index, entry);
                let row = (index, entry.to_vec(), prev, chain);
                prev = chain;
                row
            })
            .collect()
    }

    fn walk(rows: &[(u64, Vec<u8>, Hash, Hash)]) -> Vec<(u64, Break)> {
        let mut walk = Walk::default();
        for (index, entry, prev, chain) in rows {
            walk.row(*index, entry, Some(prev), Some(chain));
        }
        walk.breaks
    }

    #[test]
    fn an_intact_chain_has_no_breaks_and_each_kind_of_edit_is_named_at_its_row() {
        let rows = chained(&[b"one", b"two", b"three", b"four"]);
        assert!(walk(&rows).is_empty());
        // The front purged: what is left is still intact.
        assert!(walk(&rows[2..]).is_empty());

        let mut edited = rows.clone();
        edited[1].1 = b"TWO".to_vec();
        assert_eq!(walk(&edited), vec![(2, Break::Edited)]);

        let mut deleted = rows.clone();
        deleted.remove(1);
        assert_eq!(walk(&deleted), vec![(3, Break::Unlinked { previous: 1 })]);

        // Edited and re-chained by hand, the rows after it not: the next row says so.
        let mut rechained = rows.clone();
        rechained[1].1 = b"TWO".to_vec();
        rechained[1].3 = link(&rechained[1].2, 2, b"TWO");
        assert_eq!(walk(&rechained), vec![(3, Break::Unlinked { previous: 2 })]);

        // A chain value edited: that row, and the row that no longer follows it.
        let mut overwritten = rows;
        overwritten[2].3 = [1; 32];
        assert_eq!(
            walk(&overwritten),
            vec![(3, Break::Edited), (4, Break::Unlinked { previous: 3 })]
        );

        let mut walk = Walk::default();
        walk.row(1, b"one", None, None);
        assert_eq!(walk.breaks, vec![(1, Break::Missing)]);
    }
}
