-- Vendor authority schema, version 7: when each server that reports link histories last
-- did so, by its own stated time (the request's created_at). A donor's ledger numbers its
-- grants by its own time in ms, so every grant it issued before that time is in its report:
-- a receiver's serial below it that the donor did not report was never issued
-- (src/links.rs).
CREATE TABLE link_reporters (
    server_id TEXT PRIMARY KEY,
    stated_ms INTEGER NOT NULL
) STRICT;
