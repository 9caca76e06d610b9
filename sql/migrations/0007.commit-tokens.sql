-- depends: 0004.api-key-rate-limit
-- Commit tokens: every write transaction of the service inserts one random token here, in the same
-- transaction. When the connection is lost while its COMMIT is in flight (client error 2013), the
-- service looks its token up on another connection: present means the transaction committed,
-- absent (once the lost transaction has ended) means it did not, so the write is never re-run blind.
-- A token is 8 bytes of microseconds since the Unix epoch (big-endian) then 8 random bytes: new rows
-- go to the end of the primary key, and tokens older than a few minutes are deleted by key range.
-- Runs unchanged on MySQL 8.0, 8.4, 9.x and MariaDB 10.11+ (and Galera: the table has a primary key).
CREATE TABLE commit_tokens (
    token BINARY(16) NOT NULL,
    PRIMARY KEY (token)
) ENGINE = InnoDB;
