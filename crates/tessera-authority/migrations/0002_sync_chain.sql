-- Vendor authority schema, version 2: the sync chain of every license server and the alerts
-- the vendor sees (`GET /v1/alerts`). Rules in src/chain.rs and docs/security.md.

-- Every response issued to a server since its last reset, one link each. `parent` is the
-- response the request said it had accepted last (NULL: none). A response that a retry
-- from the same point replaced before anyone presented it (its answer was lost) keeps its
-- row, `superseded_at_ms` set: should it be presented later, two copies hold the server.
CREATE TABLE sync_chain (
    server_id        TEXT NOT NULL REFERENCES servers(server_id),
    -- 1, 2, ... along the chain; a superseded link shares its replacement's position.
    position         INTEGER NOT NULL,
    hash             TEXT NOT NULL,
    parent           TEXT,
    request_sequence INTEGER NOT NULL,
    -- The request's first unanswered sequence: equal in a retry after a lost answer.
    pending_since    INTEGER NOT NULL,
    -- Hash of the requesting host's name and data directory path (NULL: not sent).
    installation     TEXT,
    issued_at_ms     INTEGER NOT NULL,
    superseded_at_ms INTEGER,
    PRIMARY KEY (server_id, hash)
) STRICT;

CREATE INDEX sync_chain_by_position ON sync_chain(server_id, position);

-- Clones and rollbacks detected, and the vendor's resets. A refusal repeated with the same
-- kind, presented link and installation as the server's latest alert counts on that alert.
CREATE TABLE alerts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    server_id    TEXT NOT NULL REFERENCES servers(server_id),
    -- server_cloned, server_rolled_back, chain_reset
    kind         TEXT NOT NULL,
    at_ms        INTEGER NOT NULL,
    last_at_ms   INTEGER NOT NULL,
    count        INTEGER NOT NULL DEFAULT 1,
    presented    TEXT,
    installation TEXT,
    detail       TEXT NOT NULL
) STRICT;

CREATE INDEX alerts_by_server ON alerts(server_id, id);
