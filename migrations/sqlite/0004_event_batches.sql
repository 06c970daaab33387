-- The change feed packed: one row per transaction instead of one per event; see
-- migrations/mysql/0005_event_batches.sql.
CREATE TABLE IF NOT EXISTS event_batches (
    last_seq  INTEGER NOT NULL PRIMARY KEY,
    n_events  INTEGER NOT NULL,
    at_ms     INTEGER NOT NULL,
    body      TEXT    NOT NULL
);

INSERT INTO event_batches (last_seq, n_events, at_ms, body)
SELECT seq, 1, at_ms, type || ',' || course_id || ',' || IFNULL(student_id, '') || ',' ||
                      IFNULL(version, '') || ',' || IFNULL(capacity, '')
FROM events;
DROP TABLE events;
