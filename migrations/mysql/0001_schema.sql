-- enrolld schema for MySQL / MariaDB.
-- Ids are compared byte-wise (utf8mb4_bin) so `cs101` and `CS101` are two courses, as they
-- are in memory. `enrolled` is the committed seat count; the CHECK makes the store itself
-- refuse an oversold course at every instant, whatever writes to it.
CREATE TABLE IF NOT EXISTS courses (
    id            VARCHAR(32)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    title         VARCHAR(200) NOT NULL,
    capacity      BIGINT       NOT NULL,
    enrolled      BIGINT       NOT NULL DEFAULT 0,
    opens_at_ms   BIGINT       NULL,
    closes_at_ms  BIGINT       NULL,
    version       BIGINT       NOT NULL DEFAULT 1,
    CONSTRAINT seats_within_capacity CHECK (enrolled >= 0 AND enrolled <= capacity)
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS enrollments (
    course_id       VARCHAR(32) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    student_id      VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    enrolled_at_ms  BIGINT      NOT NULL,
    PRIMARY KEY (course_id, student_id)
) ENGINE=InnoDB;
