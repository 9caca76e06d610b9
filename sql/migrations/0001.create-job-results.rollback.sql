DROP TABLE job_results;
