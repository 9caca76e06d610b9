-- depends: 0001.create-job-results
-- Exports: one row per export file, single-job or time range. Range exports are durable jobs:
-- queued -> running (leased by one worker, claimed with FOR UPDATE SKIP LOCKED) -> succeeded | failed.
-- Runs unchanged on MySQL 8.0, 8.4, 9.x and MariaDB 10.11+ (SKIP LOCKED: MySQL 8.0.1+, MariaDB 10.6+).
CREATE TABLE exports (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    export_id CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    kind VARCHAR(8) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    format VARCHAR(8) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    compression VARCHAR(8) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    parameters JSON NOT NULL,
    state VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    rows_written BIGINT UNSIGNED NOT NULL DEFAULT 0,
    bytes BIGINT UNSIGNED NULL,
    sha256 CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
    file_name VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
    error VARCHAR(255) NULL,
    requested_by VARCHAR(128) NULL,
    attempts INT UNSIGNED NOT NULL DEFAULT 0,
    lease_owner VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
    lease_until DATETIME(6) NULL,
    created_at DATETIME(6) NOT NULL,
    started_at DATETIME(6) NULL,
    finished_at DATETIME(6) NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_exports_export_id (export_id),
    KEY idx_exports_state (state, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
