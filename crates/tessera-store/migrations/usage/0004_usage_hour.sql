-- The usage chart's hourly roll-up, kept by the history writer in the transaction that
-- writes the events, so the console's chart reads one row per component and hour instead
-- of every event of the range (and the level before the range in one row, not a sum over
-- all history). Rebuilt from `usage_event` when this migration runs.

-- Per component and hour (hour_ms: the hour's first millisecond, UTC): the level after the
-- hour's last event, the highest level after any of its events, and its denials.
CREATE TABLE usage_hour (
    component TEXT    NOT NULL,
    hour_ms   INTEGER NOT NULL,
    level_end INTEGER NOT NULL,
    peak      INTEGER NOT NULL,
    denials   INTEGER NOT NULL,
    PRIMARY KEY (component, hour_ms)
) WITHOUT ROWID;

-- Per component, the last event folded into `usage_hour` (by at_ms, then id) and the level
-- after it: the next batch folds only what comes after, or refolds from an earlier hour
-- when a copied row arrives out of order.
CREATE TABLE usage_hour_cursor (
    component TEXT    PRIMARY KEY,
    at_ms     INTEGER NOT NULL,
    id        INTEGER NOT NULL,
    level     INTEGER NOT NULL
) WITHOUT ROWID;
