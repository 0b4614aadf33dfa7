-- Vendor authority schema, version 3: the heads of each server host's own hash chains (its
-- Raft log and its audit log) that the authority countersigned at a sync. At the next sync
-- the host recomputes its chains at the countersigned point; a different hash there means
-- the history was rewritten (alerts `log_rewritten`, `audit_rewritten`). Rules in
-- src/history.rs and docs/security.md (T2, T12). Cleared with the sync chain at a reset.
CREATE TABLE history_points (
    server_id      TEXT NOT NULL REFERENCES servers(server_id),
    -- The host's installation (see sync_chain.installation).
    installation   TEXT NOT NULL,
    -- 'log' or 'audit'.
    kind           TEXT NOT NULL,
    -- The Raft log index, or the number of audit records.
    at             INTEGER NOT NULL,
    hash           TEXT NOT NULL,
    countersigned_at_ms INTEGER NOT NULL,
    PRIMARY KEY (server_id, installation, kind, at)
) STRICT;
