-- Notifications (`tessera events`, GET /v1/events, the console's /events page), kept so
-- that they and their ids outlive a restart. One row per event, as the API shows it.
CREATE TABLE notification (
    id        INTEGER PRIMARY KEY,  -- the event's id; a restarted server continues after the highest
    at_ms     INTEGER NOT NULL,
    kind      TEXT    NOT NULL,
    severity  TEXT    NOT NULL,
    server_id TEXT,
    host      INTEGER,              -- the domain host that raised it; NULL on a single server
    message   TEXT    NOT NULL,
    details   TEXT    NOT NULL      -- JSON
);
