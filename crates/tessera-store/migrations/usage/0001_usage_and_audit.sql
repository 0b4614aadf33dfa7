-- Usage history and the audit chain (DATA/usage.sqlite3). Applied once, tracked by
-- PRAGMA user_version. Times are milliseconds since the Unix epoch (UTC).

-- One row per license event. `delta` is the change of licenses in use for `component`:
-- +1 for a new lease, -1 for a checkin, force-release, expiry or key removal, 0 otherwise.
CREATE TABLE usage_event (
    id        INTEGER PRIMARY KEY,
    at_ms     INTEGER NOT NULL,
    kind      TEXT    NOT NULL,
    lease_id  TEXT,
    key_id    TEXT,
    component TEXT,
    station   TEXT,
    user      TEXT,
    host      TEXT,
    delta     INTEGER NOT NULL DEFAULT 0,
    detail    TEXT
);
CREATE INDEX usage_event_at ON usage_event (at_ms);
CREATE INDEX usage_event_component ON usage_event (component, at_ms);

-- The tamper-evident audit log: hash = SHA-256(prev_hash || canonical record), hex.
CREATE TABLE audit_log (
    seq       INTEGER PRIMARY KEY,
    at_ms     INTEGER NOT NULL,
    actor     TEXT    NOT NULL,
    action    TEXT    NOT NULL,
    details   TEXT    NOT NULL,
    prev_hash TEXT    NOT NULL,
    hash      TEXT    NOT NULL
);

-- Documented views (docs/console.md).
CREATE VIEW usage_events AS
SELECT id,
       strftime('%Y-%m-%dT%H:%M:%fZ', at_ms / 1000.0, 'unixepoch') AS time,
       at_ms, kind, component, station, user, host, key_id, lease_id, delta, detail
FROM usage_event;

-- Licenses in use per component after each event that changed it.
CREATE VIEW usage_level AS
SELECT id, at_ms, component,
       SUM(delta) OVER (PARTITION BY component ORDER BY id ROWS UNBOUNDED PRECEDING) AS in_use
FROM usage_event
WHERE delta != 0 AND component IS NOT NULL;

CREATE VIEW daily_peak AS
SELECT date(at_ms / 1000, 'unixepoch') AS day, component, MAX(in_use) AS peak
FROM usage_level
GROUP BY day, component;

CREATE VIEW daily_denials AS
SELECT date(at_ms / 1000, 'unixepoch') AS day, component, COUNT(*) AS denials
FROM usage_event
WHERE kind = 'denied'
GROUP BY day, component;
