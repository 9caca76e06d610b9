ALTER TABLE exports
    DROP KEY idx_exports_purge,
    DROP KEY idx_exports_job,
    DROP COLUMN purge_at,
    DROP COLUMN expires_at,
    DROP COLUMN job_id;
