-- The stored snapshot's digest (tamper evidence, docs/security.md T2):
-- `digest = SHA-256("tessera-snapshot/v1\n" || meta || "\n" || data)`, written with the
-- snapshot and checked at every open; a snapshot edited on disk stops the start. The row
-- stored before this migration gets its digest from the migration (in Rust,
-- `schema::digest_existing_snapshot`).
ALTER TABLE raft_snapshot ADD COLUMN digest BLOB;
