-- depends: 0004.api-key-rate-limit
-- With JOBRESULTS_EXPORTS_STORE=s3 every attempt of an export writes its own object,
-- <prefix><export_id>/<attempt>.<ext>; the one that won is recorded here, in the same conditional
-- UPDATE that marks the export succeeded. NULL for local files (file_name names them).
ALTER TABLE exports ADD COLUMN object_key VARCHAR(1024) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL;
