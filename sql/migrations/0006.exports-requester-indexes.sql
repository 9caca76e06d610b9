-- depends: 0004.api-key-rate-limit
-- Per-requester look-ups for range exports: the quota (queued + running exports of one key) and the
-- round-robin claim order (when a requester's last range export started).
ALTER TABLE exports
    ADD KEY idx_exports_requester_state (requested_by, kind, state),
    ADD KEY idx_exports_requester_started (requested_by, kind, started_at);
