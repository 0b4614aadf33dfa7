-- The replicated log, the Raft metadata and the latest state machine snapshot.
-- The ledger itself is not stored table by table: it lives in memory and is rebuilt on
-- start from the snapshot plus the committed log entries after it.

-- One row per log entry; `entry` is the openraft entry (log id + payload) as JSON.
CREATE TABLE raft_log (
    log_index INTEGER PRIMARY KEY,
    entry     BLOB NOT NULL
);

-- Small named values: 'vote', 'committed', 'last_purged' (each a JSON log id or vote).
CREATE TABLE raft_meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- At most one snapshot: the openraft snapshot meta (JSON) and the serialized ledger.
CREATE TABLE raft_snapshot (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    meta TEXT NOT NULL,
    data BLOB NOT NULL
);
