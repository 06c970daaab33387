-- Registration rounds; see migrations/mysql/0004_rounds.sql.
ALTER TABLE courses ADD COLUMN draw_at_ms INTEGER NULL;
ALTER TABLE courses ADD COLUMN waitlist_max INTEGER NOT NULL DEFAULT 0;

CREATE TABLE IF NOT EXISTS places (
    course_id   TEXT    NOT NULL,
    student_id  TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    ord         INTEGER NOT NULL,
    at_ms       INTEGER NOT NULL,
    PRIMARY KEY (course_id, student_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS places_by_student ON places (student_id);

CREATE TABLE IF NOT EXISTS draws (
    course_id    TEXT    NOT NULL PRIMARY KEY,
    drawn_at_ms  INTEGER NOT NULL,
    seed         TEXT    NOT NULL,
    entries      INTEGER NOT NULL,
    seats        INTEGER NOT NULL,
    waitlisted   INTEGER NOT NULL,
    first_rank   INTEGER NOT NULL,
    order_list   TEXT    NOT NULL
);
