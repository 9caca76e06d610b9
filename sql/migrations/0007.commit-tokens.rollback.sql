DROP TABLE commit_tokens;
