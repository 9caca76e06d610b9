-- depends: 0011.create-job-result-labels
-- Idempotency keys of export POSTs (Stripe's semantics): one row per (owner, key), where owner is the
-- requester (key:<api key id>, or ip:<address> without authentication). A request claims its key by
-- INSERT in a unit of its own (a duplicate-key error means another request has it, on any Galera node);
-- the response is stored by the same transaction that records the export, so both commit or neither.
-- A claim whose request died is taken over once stale; rows older than 24 h are deleted.
-- Every table has a primary key (Galera). Runs unchanged on MySQL 8.0-9.x and MariaDB 10.11+.
CREATE TABLE idempotency_keys (
    owner VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    idempotency_key VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    request_sha256 CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    claim CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    state VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    export_id CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NULL,
    status_code SMALLINT UNSIGNED NULL,
    response_headers VARCHAR(2048) NULL,
    response_body MEDIUMTEXT NULL,
    created_at DATETIME(6) NOT NULL,
    claimed_at DATETIME(6) NOT NULL,
    PRIMARY KEY (owner, idempotency_key),
    KEY idx_idempotency_keys_created (created_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
