-- Vendor authority schema, version 8: the ledger counters each host of a server stated, each
-- with the time of the last entry its ledger had applied (docs/security.md, T2 and T5), from
-- its own syncs and as relayed by the donors it reports its usage to. On one host a later
-- time never has fewer `leases_issued`: two points that say otherwise mean its ledger was
-- put back or rewritten (alert `ledger_rewound`), whichever of them arrived first. The most
-- recent points of each host are kept. Cleared at a reset.
CREATE TABLE counter_points (
    server_id     TEXT NOT NULL REFERENCES servers(server_id),
    installation  TEXT NOT NULL,
    as_of_ms      INTEGER NOT NULL,
    leases_issued INTEGER NOT NULL,
    -- Who stated it: "sync", or the donor's server ID that relayed it.
    source        TEXT NOT NULL,
    PRIMARY KEY (server_id, installation, as_of_ms)
) STRICT;
