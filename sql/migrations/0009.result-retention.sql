-- depends: 0008.create-webhooks
-- Retention of job results (issue 14): a result expires at expires_at (UTC, written by the service from
-- its own clock, never NOW(); NULL = never). A pinned result never expires (its expires_at is NULL).
-- An expired row is invisible to readers at once; the purge deletes it later, in batches found through
-- idx_job_results_expires (a range scan of expires_at <= now, in index order; NULLs are never in range).
-- Runs unchanged on MySQL 8.0-9.x and MariaDB 10.11+.
ALTER TABLE job_results
    ADD COLUMN expires_at DATETIME(6) NULL,
    ADD COLUMN pinned BOOLEAN NOT NULL DEFAULT FALSE,
    ADD KEY idx_job_results_expires (expires_at, id);

-- Named leases of background work that one process at a time does for the whole deployment (the purge).
-- A process takes one with a conditional UPDATE (the row changes only if the lease is free, expired or
-- its own), so exactly one process holds it on every engine, Galera included (a conflicting UPDATE on
-- another node fails certification with 1213 and is retried, then sees the lease taken).
CREATE TABLE leases (
    name VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    lease_owner VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
    lease_until DATETIME(6) NULL,
    PRIMARY KEY (name)
) ENGINE = InnoDB;

INSERT INTO leases (name) VALUES ('purge');
