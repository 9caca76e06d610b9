-- depends: 0010.export-lifecycle
-- Labels of job results (issue 15): one row per (result, key), replaced with the result in the same
-- transaction, deleted with it (ON DELETE CASCADE, so every path that deletes results drops its labels).
-- created_at is a copy of job_results.created_at (which never changes after the insert), so a filter
-- on a label and a time range is one range of idx_labels_filter, read in keyset order (created_at, id).
-- label_key is ASCII (the API allows a-z 0-9 . _ / -); label_value is the value's UTF-8 bytes
-- (255 characters at most, so at most 1020 bytes) in a VARBINARY: values compare byte for byte on both
-- engines (no collation folding, no PAD SPACE), like job ids. Index length: 63 + 1022 + 8 + 8 bytes,
-- well under InnoDB's 3072-byte limit (DYNAMIC rows, the default on MySQL 8.0+ and MariaDB 10.11+).
-- idx_status_created serves the status filter in keyset order when no label drives the query.
-- Runs unchanged on MySQL 8.0, 8.4, 9.x and MariaDB 10.11+; every table has a primary key (Galera).
CREATE TABLE job_result_labels (
    result_id BIGINT UNSIGNED NOT NULL,
    label_key VARCHAR(63) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    label_value VARBINARY(1020) NOT NULL,
    created_at DATETIME(6) NOT NULL,
    PRIMARY KEY (result_id, label_key),
    KEY idx_labels_filter (label_key, label_value, created_at, result_id),
    CONSTRAINT fk_labels_result FOREIGN KEY (result_id) REFERENCES job_results (id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

ALTER TABLE job_results ADD KEY idx_status_created (status, created_at, id);
