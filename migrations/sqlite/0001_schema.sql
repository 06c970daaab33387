-- enrolld schema for the embedded SQLite store (same shape as migrations/mysql).
-- `enrolled` is the committed seat count; the CHECK makes the store refuse an oversold course.
CREATE TABLE IF NOT EXISTS courses (
    id            TEXT    NOT NULL PRIMARY KEY,
    title         TEXT    NOT NULL,
    capacity      INTEGER NOT NULL,
    enrolled      INTEGER NOT NULL DEFAULT 0,
    opens_at_ms   INTEGER NULL,
    closes_at_ms  INTEGER NULL,
    version       INTEGER NOT NULL DEFAULT 1,
    CONSTRAINT seats_within_capacity CHECK (enrolled >= 0 AND enrolled <= capacity)
);

CREATE TABLE IF NOT EXISTS enrollments (
    course_id       TEXT    NOT NULL,
    student_id      TEXT    NOT NULL,
    enrolled_at_ms  INTEGER NOT NULL,
    PRIMARY KEY (course_id, student_id)
) WITHOUT ROWID;
