-- depends: 0004.api-key-rate-limit
-- Webhooks: endpoints, an outbox of events (one row per event and endpoint, written in the same
-- transaction as the change it announces) and a delivery log (one row per HTTP attempt).
-- An outbox row is claimed by a delivery worker with a conditional UPDATE lease (lease_owner,
-- lease_until), so any replica delivers and none sends twice while its lease holds.
-- Every table has a primary key (Galera). Runs unchanged on MySQL 8.0-9.x and MariaDB 10.11+.
CREATE TABLE webhook_endpoints (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    webhook_id CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    url VARCHAR(2048) NOT NULL,
    description VARCHAR(255) NULL,
    events VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    secret VARCHAR(100) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    previous_secret VARCHAR(100) CHARACTER SET ascii COLLATE ascii_bin NULL,
    previous_secret_until DATETIME(6) NULL,
    enabled BOOLEAN NOT NULL DEFAULT TRUE,
    disabled_reason VARCHAR(255) NULL,
    disabled_at DATETIME(6) NULL,
    failure_streak INT UNSIGNED NOT NULL DEFAULT 0,
    created_by VARCHAR(128) NULL,
    created_at DATETIME(6) NOT NULL,
    updated_at DATETIME(6) NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_webhook_endpoints_webhook_id (webhook_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE webhook_outbox (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    event_id CHAR(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    endpoint_id BIGINT UNSIGNED NOT NULL,
    event_type VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    payload TEXT NOT NULL,
    state VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    attempts INT UNSIGNED NOT NULL DEFAULT 0,
    next_attempt_at DATETIME(6) NOT NULL,
    lease_owner VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
    lease_until DATETIME(6) NULL,
    last_error VARCHAR(255) NULL,
    created_at DATETIME(6) NOT NULL,
    finished_at DATETIME(6) NULL,
    PRIMARY KEY (id),
    KEY idx_webhook_outbox_due (state, next_attempt_at),
    KEY idx_webhook_outbox_endpoint (endpoint_id, state)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE webhook_attempts (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    endpoint_id BIGINT UNSIGNED NOT NULL,
    outbox_id BIGINT UNSIGNED NOT NULL,
    event_id CHAR(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    event_type VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    attempt INT UNSIGNED NOT NULL,
    outcome VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    status_code SMALLINT UNSIGNED NULL,
    latency_ms INT UNSIGNED NOT NULL,
    error VARCHAR(255) NULL,
    attempted_at DATETIME(6) NOT NULL,
    PRIMARY KEY (id),
    KEY idx_webhook_attempts_endpoint (endpoint_id, id),
    KEY idx_webhook_attempts_time (attempted_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
