-- The alone journal of a redundant pair's host (DATA/pair-alone.sqlite3): what it did while
-- serving alone, hash-chained (see src/journal.rs). IF NOT EXISTS: a journal written before
-- this file was numbered already has these tables.
CREATE TABLE IF NOT EXISTS meta (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    share  TEXT    NOT NULL,   -- 'primary' or 'backup'
    epoch  INTEGER NOT NULL,
    count  INTEGER,            -- commands written
    head   BLOB                -- the chain value of the last command
);
CREATE TABLE IF NOT EXISTS commands (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    entry  TEXT NOT NULL,      -- the stamped command, JSON
    prev   BLOB,               -- the chain value before it
    chain  BLOB                -- SHA-256(prev || seq || entry)
);
