-- The usage history of every host of a pair or domain, on every host: each host copies the
-- rows the others recorded themselves (see src/history/merge, docs/pair.md "Usage").

-- `instance`: this history's own random id; rows copied from another host name theirs.
CREATE TABLE history_meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO history_meta (name, value) VALUES ('instance', lower(hex(randomblob(16))));

-- NULL: recorded by this host. Otherwise the instance of the host that recorded the row,
-- and the row's id there (each copied once).
ALTER TABLE usage_event ADD COLUMN origin TEXT;
ALTER TABLE usage_event ADD COLUMN origin_id INTEGER;
CREATE UNIQUE INDEX usage_event_origin ON usage_event (origin, origin_id)
    WHERE origin IS NOT NULL;

-- Copied rows arrive after newer local ones: levels follow time, not insertion order.
DROP VIEW daily_peak;
DROP VIEW usage_level;
CREATE VIEW usage_level AS
SELECT id, at_ms, component,
       SUM(delta) OVER (PARTITION BY component ORDER BY at_ms, id ROWS UNBOUNDED PRECEDING) AS in_use
FROM usage_event
WHERE delta != 0 AND component IS NOT NULL;

CREATE VIEW daily_peak AS
SELECT date(at_ms / 1000, 'unixepoch') AS day, component, MAX(in_use) AS peak
FROM usage_level
GROUP BY day, component;
