//! The change feed: a transactional outbox of every committed change, for billing, the
//! learning platform and the mailer.
//!
//! Why: a message sent after a change commits can be lost (the process dies between the
//! two) and nothing reconciles it; that is where comparable systems lost data. Here the
//! event rows are written by the same transaction as the change, so a change and its
//! event commit or roll back together. Events are numbered from one row (`feed.seq`) that
//! every event-writing transaction updates: its lock is held until COMMIT, so numbers are
//! handed out in commit order and never leave a gap a reader could skip past (an
//! auto-increment id is not commit order when transactions commit concurrently, on one
//! node or several). Readers page by number with an opaque cursor.
//! Must never: write an event outside the transaction of its change, or number events
//! other than through `feed.seq`.
//!
//! A later kind of change adds a variant to [`EventKind`] (and its name to
//! `EventKind::ALL`) and writes its events through [`EventRows`] in the transaction that
//! makes the change, as the registration rounds' kinds do.

use std::fmt::Write;

use anyhow::Context;
use sqlx::Row;

use super::store::{Dialect, OpenTransaction, SeatOp, Store};
use crate::ids::{CourseId, StudentId, UnixMs};

/// Events one read returns at most.
pub const EVENTS_PAGE_MAX: u32 = 1_000;
/// Events one trim removes at most (a trim holds the feed row only briefly).
pub const TRIM_ROWS_MAX: u32 = 1_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Enrolled,
    Dropped,
    Waitlisted,
    Promoted,
    LeftWaitlist,
    Entered,
    Withdrawn,
    NotSelected,
    Drawn,
    CourseChanged,
}

impl EventKind {
    /// Every kind, with its name on the wire (API.md, "The change feed").
    pub const ALL: [(EventKind, &'static str); 10] = [
        (EventKind::Enrolled, "enrolled"),
        (EventKind::Dropped, "dropped"),
        (EventKind::Waitlisted, "waitlisted"),
        (EventKind::Promoted, "promoted"),
        (EventKind::LeftWaitlist, "left_waitlist"),
        (EventKind::Entered, "entered"),
        (EventKind::Withdrawn, "withdrawn"),
        (EventKind::NotSelected, "not_selected"),
        (EventKind::Drawn, "drawn"),
        (EventKind::CourseChanged, "course_changed"),
    ];

    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(k, _)| *k == self)
            .map(|(_, name)| *name)
            .expect("every kind is listed")
    }
    fn parse(s: &str) -> Option<EventKind> {
        Self::ALL.iter().find(|(_, name)| *name == s).map(|(k, _)| *k)
    }
}

/// One committed change, as the feed serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    pub kind: EventKind,
    pub course: String,
    pub student: Option<String>,
    pub at: UnixMs,
    /// `course_changed`: the course's version and capacity after the change.
    pub version: Option<u64>,
    pub capacity: Option<u64>,
}

/// A change's event before it is numbered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    pub kind: EventKind,
    pub course: CourseId,
    pub student: Option<StudentId>,
    pub version: Option<u64>,
    pub capacity: Option<u64>,
}

impl NewEvent {
    /// The event of a plain seat op (an enrollment or a drop).
    pub fn of_seat(op: &SeatOp) -> NewEvent {
        let mut events = Self::of_op(op);
        let first = events.next().expect("every op has an event");
        assert!(events.next().is_none(), "{op:?} is not a plain seat op");
        first
    }

    /// The events of a committed op, in the order they happened (no allocation: the
    /// group commit's hot path builds one per row).
    pub fn of_op(op: &SeatOp) -> impl Iterator<Item = NewEvent> {
        let (course, student) = op.key();
        let kind = match op {
            SeatOp::Enroll { .. } => EventKind::Enrolled,
            SeatOp::Drop { .. } | SeatOp::DropPromote { .. } => EventKind::Dropped,
            SeatOp::Enter { .. } => EventKind::Entered,
            SeatOp::Withdraw { .. } => EventKind::Withdrawn,
            SeatOp::Join { .. } => EventKind::Waitlisted,
            SeatOp::Leave { .. } => EventKind::LeftWaitlist,
            SeatOp::Promote { .. } => EventKind::Promoted,
        };
        let then = match op {
            SeatOp::DropPromote { next, .. } => Some(NewEvent::of_student(EventKind::Promoted, course, next)),
            _ => None,
        };
        std::iter::once(NewEvent::of_student(kind, course, student)).chain(then)
    }

    /// An event about one student.
    pub fn of_student(kind: EventKind, course: &CourseId, student: &StudentId) -> NewEvent {
        NewEvent {
            kind,
            course: course.clone(),
            student: Some(student.clone()),
            version: None,
            capacity: None,
        }
    }

    /// An event about the course as a whole.
    pub fn of_course(kind: EventKind, course: &CourseId) -> NewEvent {
        NewEvent {
            kind,
            course: course.clone(),
            student: None,
            version: None,
            capacity: None,
        }
    }
}

/// A page of the feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub events: Vec<Event>,
    /// Where the next read starts: the last event's number, or the request's.
    pub next: u64,
    /// The newest number handed out when the page was read.
    pub head: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("the cursor is older than the events kept (events up to {trimmed_through} were trimmed)")]
    Expired { trimmed_through: u64 },
    #[error("the cursor is ahead of the feed")]
    Ahead,
    #[error("reading the feed: {0:#}")]
    Store(#[from] anyhow::Error),
}

/// The opaque text of a cursor (the number of the last event seen).
pub fn cursor_of(seq: u64) -> String {
    format!("c{seq:016x}")
}

/// A cursor's number; None for anything [`cursor_of`] did not make.
pub fn parse_cursor(s: &str) -> Option<u64> {
    let hex = s.strip_prefix('c')?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// The SQL that numbers and writes a transaction's events: one `UPDATE feed` (which takes
/// the row lock that orders committers) and one multi-row `INSERT`, each row numbered
/// from the updated `feed.seq` by its offset. On MySQL the UPDATE hands the new value to
/// `LAST_INSERT_ID()` (session-local), which the rows read: measured on MariaDB, 50,000
/// events in 25-row transactions cost the server 58 CPU ticks this way against 97 with a
/// `(SELECT seq FROM feed)` subquery per row (and 41 for the same rows without any feed).
/// SQLite has no such function and one writer; it reads the row. Values are inlined; only
/// valid ids (the `[A-Za-z0-9_.-]` of `CourseId`/`StudentId`) reach here.
pub struct EventRows {
    pub sql: String,
    /// Rows each of the two statements changes.
    pub expected: [u64; 2],
}

impl EventRows {
    pub fn of(dialect: Dialect, events: &[NewEvent], at: UnixMs) -> Option<EventRows> {
        if events.is_empty() {
            return None;
        }
        let n = events.len();
        let w = "writing to a String";
        let mut sql = String::with_capacity(160 + n * 96);
        let head = match dialect {
            Dialect::Mysql => {
                write!(sql, "UPDATE feed SET seq = LAST_INSERT_ID(seq + {n}) WHERE id = 1;\n").expect(w);
                "LAST_INSERT_ID()"
            }
            Dialect::Sqlite => {
                write!(sql, "UPDATE feed SET seq = seq + {n} WHERE id = 1;\n").expect(w);
                "(SELECT seq FROM feed WHERE id = 1)"
            }
        };
        sql.push_str("INSERT INTO events (seq, type, course_id, student_id, at_ms, version, capacity) VALUES ");
        for (i, e) in events.iter().enumerate() {
            let offset = n - 1 - i;
            if i > 0 {
                sql.push(',');
            }
            write!(sql, "({head} - {offset}, '{}', '{}', ", e.kind.as_str(), e.course).expect(w);
            match &e.student {
                Some(s) => write!(sql, "'{s}', ").expect(w),
                None => sql.push_str("NULL, "),
            }
            write!(sql, "{at}, ").expect(w);
            for (j, v) in [e.version, e.capacity].into_iter().enumerate() {
                match v {
                    Some(v) => write!(sql, "{v}").expect(w),
                    None => sql.push_str("NULL"),
                }
                sql.push_str(if j == 0 { ", " } else { ")" });
            }
        }
        Some(EventRows {
            sql,
            expected: [1, n as u64],
        })
    }

    /// Runs both statements on a connection inside the change's transaction.
    pub async fn write(&self, conn: &mut sqlx::AnyConnection) -> anyhow::Result<()> {
        use futures_util::TryStreamExt;
        let mut results = sqlx::raw_sql(&self.sql).execute_many(conn);
        let mut changed = Vec::with_capacity(2);
        while let Some(done) = results.try_next().await? {
            changed.push(done.rows_affected());
        }
        anyhow::ensure!(
            changed == self.expected,
            "event rows written: {changed:?}, expected {:?}",
            self.expected
        );
        Ok(())
    }
}

impl Store {
    /// Up to `limit` events after `after` (from the oldest kept when None), in order.
    pub async fn read_events(&self, after: Option<u64>, limit: u32) -> Result<Page, FeedError> {
        let row = sqlx::query("SELECT seq, trimmed_through FROM feed WHERE id = 1")
            .fetch_one(self.pool())
            .await
            .context("reading the feed head")?;
        let head = row.try_get::<i64, _>(0).context("feed.seq")? as u64;
        let trimmed_through = row.try_get::<i64, _>(1).context("feed.trimmed_through")? as u64;
        let from = match after {
            Some(a) if a < trimmed_through => return Err(FeedError::Expired { trimmed_through }),
            Some(a) if a > head => return Err(FeedError::Ahead),
            Some(a) => a,
            None => trimmed_through,
        };
        let rows = sqlx::query(
            "SELECT seq, type, course_id, student_id, at_ms, version, capacity FROM events \
             WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(from as i64)
        .bind(i64::from(limit.min(EVENTS_PAGE_MAX)))
        .fetch_all(self.pool())
        .await
        .context("reading events")?;
        // The two reads above are two snapshots: a trim that committed between them removed
        // events after `a` that the check on the first one let through, and the page would
        // skip them with a 200. Its `trimmed_through` is seen by a read after both.
        if let Some(a) = after {
            let trimmed_now = sqlx::query("SELECT trimmed_through FROM feed WHERE id = 1")
                .fetch_one(self.pool())
                .await
                .context("reading the feed's trimmed point")?
                .try_get::<i64, _>(0)
                .context("feed.trimmed_through")? as u64;
            if a < trimmed_now {
                return Err(FeedError::Expired {
                    trimmed_through: trimmed_now,
                });
            }
        }
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            let kind: String = row.try_get(1).context("events.type")?;
            events.push(Event {
                seq: row.try_get::<i64, _>(0).context("events.seq")? as u64,
                kind: EventKind::parse(&kind).with_context(|| format!("unknown event type {kind:?}"))?,
                course: row.try_get(2).context("events.course_id")?,
                student: row.try_get(3).context("events.student_id")?,
                at: row.try_get(4).context("events.at_ms")?,
                version: row
                    .try_get::<Option<i64>, _>(5)
                    .context("events.version")?
                    .map(|v| v as u64),
                capacity: row
                    .try_get::<Option<i64>, _>(6)
                    .context("events.capacity")?
                    .map(|v| v as u64),
            });
        }
        let next = events.last().map_or(from, |e| e.seq);
        Ok(Page {
            events,
            next,
            head: head.max(next),
        })
    }

    /// Removes up to [`TRIM_ROWS_MAX`] of the oldest events written before `before_ms`,
    /// as a prefix of the feed (so `trimmed_through` says exactly what is gone). Returns
    /// the rows removed.
    pub async fn trim_events(&self, before_ms: UnixMs) -> anyhow::Result<u64> {
        let rows = sqlx::query("SELECT seq, at_ms FROM events ORDER BY seq LIMIT ?")
            .bind(i64::from(TRIM_ROWS_MAX))
            .fetch_all(self.pool())
            .await?;
        let mut through = None;
        for row in &rows {
            if row.try_get::<i64, _>(1)? >= before_ms {
                break;
            }
            through = Some(row.try_get::<i64, _>(0)?);
        }
        let Some(through) = through else { return Ok(0) };
        let mut conn = OpenTransaction::new(self.pool().acquire().await?);
        sqlx::query("BEGIN").execute(conn.get()).await?;
        let removed = sqlx::query("DELETE FROM events WHERE seq <= ?")
            .bind(through)
            .execute(conn.get())
            .await?
            .rows_affected();
        sqlx::query("UPDATE feed SET trimmed_through = ? WHERE id = 1 AND trimmed_through < ?")
            .bind(through)
            .bind(through)
            .execute(conn.get())
            .await?;
        sqlx::query("COMMIT").execute(conn.get()).await?;
        conn.ended();
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        for seq in [0, 1, 255, u64::MAX] {
            assert_eq!(parse_cursor(&cursor_of(seq)), Some(seq));
        }
        for bad in [
            "",
            "c",
            "12",
            "c00000000000000zz",
            "C0000000000000001",
            "c000000000000001",
            "c00000000000000FF",
        ] {
            assert_eq!(parse_cursor(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn event_rows_number_from_the_feed_row_in_order() {
        let c = CourseId::parse("C1").unwrap();
        let s = StudentId::parse("s1").unwrap();
        let events = [
            NewEvent::of_seat(&SeatOp::Enroll {
                course: c.clone(),
                student: s.clone(),
                at: 5,
            }),
            NewEvent {
                kind: EventKind::CourseChanged,
                course: c,
                student: None,
                version: Some(3),
                capacity: Some(40),
            },
        ];
        let rows = EventRows::of(Dialect::Sqlite, &events, 17).unwrap();
        assert_eq!(
            rows.sql,
            "UPDATE feed SET seq = seq + 2 WHERE id = 1;\n\
             INSERT INTO events (seq, type, course_id, student_id, at_ms, version, capacity) VALUES \
             ((SELECT seq FROM feed WHERE id = 1) - 1, 'enrolled', 'C1', 's1', 17, NULL, NULL),\
             ((SELECT seq FROM feed WHERE id = 1) - 0, 'course_changed', 'C1', NULL, 17, 3, 40)"
        );
        assert_eq!(rows.expected, [1, 2]);
        let rows = EventRows::of(Dialect::Mysql, &events, 17).unwrap();
        assert!(rows
            .sql
            .starts_with("UPDATE feed SET seq = LAST_INSERT_ID(seq + 2) WHERE id = 1;\n"));
        assert!(rows.sql.contains("(LAST_INSERT_ID() - 1, 'enrolled'"));
        assert!(EventRows::of(Dialect::Mysql, &[], 1).is_none());
    }
}
