ALTER TABLE api_keys DROP COLUMN rate_limit;
