-- The change feed (transactional outbox); see migrations/mysql/0002_events.sql for why
-- events are numbered from one locked row rather than by an autoincrement.
CREATE TABLE IF NOT EXISTS feed (
    id               INTEGER NOT NULL PRIMARY KEY,
    seq              INTEGER NOT NULL,
    trimmed_through  INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO feed (id, seq, trimmed_through) VALUES (1, 0, 0);

CREATE TABLE IF NOT EXISTS events (
    seq         INTEGER NOT NULL PRIMARY KEY,
    type        TEXT    NOT NULL,
    course_id   TEXT    NOT NULL,
    student_id  TEXT    NULL,
    at_ms       INTEGER NOT NULL,
    version     INTEGER NULL,
    capacity    INTEGER NULL
);
