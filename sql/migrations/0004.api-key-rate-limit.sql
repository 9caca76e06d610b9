-- depends: 0003.create-api-keys
-- A key may carry its own rate limit (e.g. "1000/second" for a load generator); NULL means the
-- service's per-client-IP limit applies to its requests.
ALTER TABLE api_keys ADD COLUMN rate_limit VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NULL;
