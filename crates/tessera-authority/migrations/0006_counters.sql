-- Vendor authority schema, version 6: the ledger counters each server reported at its last
-- sync (docs/security.md, T2). `leases_issued` only grows on a server; less than the last
-- report means its ledger was rewritten (alert `ledger_rewound`). Cleared at a reset.
ALTER TABLE servers ADD COLUMN leases_issued INTEGER;
