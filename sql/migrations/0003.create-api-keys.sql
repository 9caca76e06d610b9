-- depends: 0002.create-exports
-- API keys: the token is shown once at creation and only its SHA-256 is stored. key_id is the visible,
-- non-secret part of the token (jr_<key_id>_<secret>) used to find the row.
CREATE TABLE api_keys (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    key_id CHAR(12) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    name VARCHAR(128) NOT NULL,
    secret_sha256 BINARY(32) NOT NULL,
    scopes VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    created_at DATETIME(6) NOT NULL,
    revoked_at DATETIME(6) NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_api_keys_key_id (key_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
