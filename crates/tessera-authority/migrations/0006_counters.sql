-- Vendor authority schema, version 6: the ledger counters each host of a server reported at
-- its last sync (docs/security.md, T2). `leases_issued` only grows on a host; less than the
-- host's last report means its ledger was rewritten (alert `ledger_rewound`). Per host
-- (installation): hosts of a domain upgraded from a version without the counter count from
-- their own snapshot points. Cleared at a reset.
CREATE TABLE ledger_counters (
    server_id     TEXT NOT NULL REFERENCES servers(server_id),
    installation  TEXT NOT NULL,
    leases_issued INTEGER NOT NULL,
    PRIMARY KEY (server_id, installation)
) STRICT;
