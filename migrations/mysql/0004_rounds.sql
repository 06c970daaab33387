-- Registration rounds (API.md, "Registration rounds"): a draw, waitlists.
-- `draw_at_ms`: POSTs before it are entries in the draw; `waitlist_max`: 0 for none.
ALTER TABLE courses
    ADD COLUMN draw_at_ms   BIGINT NULL,
    ADD COLUMN waitlist_max BIGINT NOT NULL DEFAULT 0;

-- A student's place in a course that is not a seat: an entry in the draw that has not run
-- (`kind` 'entry'), or a place on the waitlist (`kind` 'wait', in `ord` order; it only
-- grow, so a new place goes last). A student is in at most one of enrollments and places
-- for a course; the owner shard decides that alone, as it decides seats.
CREATE TABLE IF NOT EXISTS places (
    course_id   VARCHAR(32) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    student_id  VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    kind        VARCHAR(5)  NOT NULL,
    ord         BIGINT      NOT NULL,
    at_ms       BIGINT      NOT NULL,
    PRIMARY KEY (course_id, student_id),
    KEY places_by_student (student_id)
) ENGINE=InnoDB;

-- One row per draw that ran, written by the transaction that applied it: the primary key
-- makes a second draw of a course impossible, and the record is what a registrar shows.
-- `order_list`: the entries in drawn order, one student id per line.
CREATE TABLE IF NOT EXISTS draws (
    course_id    VARCHAR(32) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    drawn_at_ms  BIGINT      NOT NULL,
    seed         CHAR(64)    NOT NULL,
    entries      BIGINT      NOT NULL,
    seats        BIGINT      NOT NULL,
    waitlisted   BIGINT      NOT NULL,
    first_rank   BIGINT      NOT NULL,
    order_list   LONGTEXT    NOT NULL
) ENGINE=InnoDB;
