-- The change feed (transactional outbox). Every transaction that changes seats or courses
-- writes its events here, in the same transaction, numbered from `feed.seq`: the UPDATE of
-- that one row holds its lock until COMMIT, so transactions that write events commit in
-- `seq` order, a rolled-back one gives its numbers back, and a reader paging by `seq`
-- never skips a row that commits late (an AUTO_INCREMENT id is not commit order).
CREATE TABLE IF NOT EXISTS feed (
    id               INT    NOT NULL PRIMARY KEY,
    seq              BIGINT NOT NULL,
    -- Events up to this seq were trimmed (retention); a cursor before it is expired.
    trimmed_through  BIGINT NOT NULL DEFAULT 0
) ENGINE=InnoDB;
INSERT IGNORE INTO feed (id, seq, trimmed_through) VALUES (1, 0, 0);

CREATE TABLE IF NOT EXISTS events (
    seq         BIGINT      NOT NULL PRIMARY KEY,
    type        VARCHAR(16) NOT NULL,
    course_id   VARCHAR(32) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    student_id  VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    at_ms       BIGINT      NOT NULL,
    -- course_changed: the course's version and capacity after the change.
    version     BIGINT      NULL,
    capacity    BIGINT      NULL
) ENGINE=InnoDB;
