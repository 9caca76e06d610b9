DROP TABLE leases;
ALTER TABLE job_results DROP KEY idx_job_results_expires, DROP COLUMN pinned, DROP COLUMN expires_at;
