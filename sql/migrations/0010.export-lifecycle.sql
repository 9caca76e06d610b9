-- depends: 0009.result-retention
-- Export lifecycle (issue 14): expiry, deletion, cancellation, the cascade from a deleted job.
-- job_id: the job of a single-job export (NULL for range exports), so deleting a job finds its
--   exports by index (the same VARBINARY as job_results.job_id: byte comparison on both engines).
-- expires_at: when a finished export expires (finished_at + JOBRESULTS_EXPORT_RETENTION_DAYS); NULL
--   while queued or running. A succeeded export past it reads as state 'expired' (computed at read).
-- purge_at: when the purge next has work on the row: its expiry (file and record go), or, for a
--   deleted export whose file is still there, the deletion time (the file goes, the record stays
--   until expires_at). NULL: nothing to do (queued, running).
-- Finished exports recorded before this migration expire 30 days (the default) after they finished.
ALTER TABLE exports
    ADD COLUMN job_id VARBINARY(128) NULL,
    ADD COLUMN expires_at DATETIME(6) NULL,
    ADD COLUMN purge_at DATETIME(6) NULL,
    ADD KEY idx_exports_job (job_id),
    ADD KEY idx_exports_purge (purge_at);
UPDATE exports SET job_id = JSON_UNQUOTE(JSON_EXTRACT(parameters, '$.job_id')) WHERE kind = 'job';
UPDATE exports SET expires_at = finished_at + INTERVAL 30 DAY, purge_at = finished_at + INTERVAL 30 DAY
    WHERE finished_at IS NOT NULL;
