-- A hash chain through the log (tamper evidence, docs/security.md T2): each entry stores
-- the chain value it follows (`prev`: the previous entry's `chain`) and its own
-- `chain = SHA-256(prev || index as 8 bytes big-endian || entry)`. The store checks both at
-- every open; an entry edited in place, or one inserted or deleted inside the log, breaks
-- it. Rows written before this migration are chained by the migration itself (in Rust,
-- `schema::chain_existing_rows`), in the same transaction.
ALTER TABLE raft_log ADD COLUMN prev BLOB;
ALTER TABLE raft_log ADD COLUMN chain BLOB;
