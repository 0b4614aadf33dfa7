-- Vendor authority schema, version 1.
-- Times are milliseconds since the Unix epoch (UTC), as read from the injected clock.

CREATE TABLE customers (
    name          TEXT PRIMARY KEY,
    created_at_ms INTEGER NOT NULL
) STRICT;

-- One row per license server ID. The public key is bound on the first sync and stays bound
-- until the vendor resets it: that is what makes a leaked server ID useless to anyone else.
CREATE TABLE servers (
    server_id       TEXT PRIMARY KEY,
    customer        TEXT NOT NULL REFERENCES customers(name),
    created_at_ms   INTEGER NOT NULL,
    -- Ed25519 public key, base64; NULL until the first sync (or after a reset).
    public_key      TEXT,
    bound_at_ms     INTEGER,
    -- Highest request sequence answered for the current binding; 0 = none yet.
    last_sequence   INTEGER NOT NULL DEFAULT 0,
    last_sync_at_ms INTEGER,
    CHECK ((public_key IS NULL) = (bound_at_ms IS NULL))
) STRICT;

CREATE INDEX servers_by_customer ON servers(customer);

-- Issued license keys and renewal keys (renews IS NOT NULL). `key_json` is the signed document
-- exactly as handed out; the other columns repeat its payload so queries need not parse it.
CREATE TABLE keys (
    key_id          TEXT PRIMARY KEY,
    server_id       TEXT NOT NULL REFERENCES servers(server_id),
    customer        TEXT NOT NULL REFERENCES customers(name),
    renews          TEXT REFERENCES keys(key_id),
    valid_from_ms   INTEGER NOT NULL,
    valid_until_ms  INTEGER NOT NULL,
    issued_at_ms    INTEGER NOT NULL,
    revoked_at_ms   INTEGER,
    key_json        TEXT NOT NULL
) STRICT;

CREATE INDEX keys_by_server ON keys(server_id);
CREATE INDEX keys_by_renews ON keys(renews);
