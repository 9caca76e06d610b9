-- Job results: one row per job id, the result kept as a JSON document.
-- Runs unchanged on MySQL 8.0, 8.4, 9.x and MariaDB 10.11+.
-- job_id is VARBINARY: byte comparison on both engines, so ids that differ only in letter case
-- are different jobs and 'a' never equals 'a ' (no collation folding, no PAD SPACE).
-- created_at/updated_at are UTC, written by the service (never NOW(), which follows the session zone).
CREATE TABLE job_results (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    job_id VARBINARY(128) NOT NULL,
    status VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    result_data JSON NOT NULL,
    version INT UNSIGNED NOT NULL DEFAULT 1,
    created_at DATETIME(6) NOT NULL,
    updated_at DATETIME(6) NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_job_results_job_id (job_id),
    KEY idx_created (created_at, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- MariaDB stores JSON as LONGTEXT with an automatic CHECK (JSON_VALID(...)), and its JSON_VALID
-- rejects documents nested 32 levels or deeper, while the service accepts up to 64 (MySQL allows 100).
-- The service validates every document itself before storing it, so on MariaDB only, the column
-- is redefined without that CHECK. /*M! ... */ is MariaDB's executable comment: MySQL skips it
-- and runs a no-op ALTER TABLE. Source: MariaDB json_lib JSON_DEPTH_LIMIT (32).
ALTER TABLE job_results /*M! MODIFY result_data LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL */;
