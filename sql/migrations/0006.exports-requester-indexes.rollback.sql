ALTER TABLE exports DROP KEY idx_exports_requester_state, DROP KEY idx_exports_requester_started;
