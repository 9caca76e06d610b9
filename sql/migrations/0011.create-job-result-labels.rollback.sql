ALTER TABLE job_results DROP KEY idx_status_created;
DROP TABLE job_result_labels;
