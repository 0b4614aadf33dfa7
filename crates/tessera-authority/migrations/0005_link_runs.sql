-- Vendor authority schema, version 5: the grant history of every neighbour link, as each
-- side last reported it at a sync (docs/security.md, T10). A receiver's serial that the
-- donor never issued, or issued with another license count, is an alert `grant_forged`.
-- Rules in src/links.rs. Each sync replaces the reporting server's rows.
CREATE TABLE link_runs (
    -- The server ID whose sync reported the run.
    reporter       TEXT NOT NULL,
    -- 'donor' or 'receiver'.
    side           TEXT NOT NULL,
    donor          TEXT NOT NULL,
    receiver       TEXT NOT NULL,
    key_id         TEXT NOT NULL,
    first          INTEGER NOT NULL,
    last           INTEGER NOT NULL,
    licenses       INTEGER NOT NULL,
    reported_at_ms INTEGER NOT NULL
) STRICT;

CREATE INDEX link_runs_by_link ON link_runs(donor, receiver, key_id, side);
CREATE INDEX link_runs_by_reporter ON link_runs(reporter);
