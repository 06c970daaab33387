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
/// Event batches (one per transaction) one trim removes at most (a trim holds the feed
/// row only briefly)...
pub const TRIM_BATCHES_MAX: u32 = 1_000;
/// ...and events: it stops before the batch that would pass this (but removes one batch
/// at least; a draw's batches hold up to `DRAW_ROWS_PER_STATEMENT` each).
pub const TRIM_EVENTS_MAX: u64 = 20_000;
/// Event batches one query of a read fetches; a read queries again until its page is full.
const BATCH_ROWS_PER_READ: i64 = 64;

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

    /// Appends how this event is kept in its batch's `body`:
    /// `type,course,student,version,capacity`, with an absent field empty
    /// (`enrolled,C1,s1,,` or `course_changed,C1,,3,40`).
    fn encode(&self, out: &mut String) {
        let w = "writing to a String";
        write!(out, "{},{},", self.kind.as_str(), self.course).expect(w);
        if let Some(s) = &self.student {
            out.push_str(s.as_str());
        }
        for v in [self.version, self.capacity] {
            out.push(',');
            if let Some(v) = v {
                write!(out, "{v}").expect(w);
            }
        }
    }
}

/// The events of one `event_batches` row, numbered `last - n + 1 ..= last`.
fn decode_batch(last: u64, n: u64, at: UnixMs, body: &str) -> anyhow::Result<Vec<Event>> {
    // Numbers start at 1.
    let first = last
        .checked_add(1)
        .and_then(|end| end.checked_sub(n))
        .filter(|&first| first >= 1 && n > 0)
        .with_context(|| format!("event batch {last} holds {n} events"))?;
    // Sized by the body, not by `n` as read: a damaged row must not ask for any memory.
    let mut events = Vec::with_capacity(body.len() / 8 + 1);
    for (i, line) in body.split('\n').enumerate() {
        let bad = || format!("event batch {last}: bad event {line:?}");
        let mut fields = line.split(',');
        let mut field = || fields.next().with_context(bad);
        let kind = EventKind::parse(field()?).with_context(bad)?;
        let course = field()?.to_owned();
        let student = Some(field()?).filter(|s| !s.is_empty()).map(str::to_owned);
        let mut number = || -> anyhow::Result<Option<u64>> {
            let f = field()?;
            Ok(if f.is_empty() {
                None
            } else {
                Some(f.parse().with_context(bad)?)
            })
        };
        let (version, capacity) = (number()?, number()?);
        anyhow::ensure!(fields.next().is_none() && !course.is_empty(), bad());
        events.push(Event {
            seq: first + i as u64,
            kind,
            course,
            student,
            at,
            version,
            capacity,
        });
    }
    anyhow::ensure!(
        events.len() as u64 == n,
        "event batch {last} holds {} events, not {n}",
        events.len()
    );
    Ok(events)
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
/// the row lock that orders committers) and one `INSERT` of a single row holding all of
/// them (`event_batches`: the batch's last number, how many, when, and one line per event),
/// so the feed costs the store two statements and one row per transaction, whatever the
/// number of changes in it. Measured with the `mariadb` client (4,000 transactions of 25
/// enrollments, the server's CPU ticks over the same transactions without a feed, medians
/// of five): a row per event cost +148 ticks, the packed row +42.
/// On MySQL the UPDATE hands the new value to `LAST_INSERT_ID()` (session-local), which the
/// row reads; SQLite has no such function and one writer, so it reads the row. Values are
/// inlined; only valid ids (the `[A-Za-z0-9_.-]` of `CourseId`/`StudentId`, which never
/// hold the `,` and newline that separate fields and events) reach here.
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
        let mut sql = String::with_capacity(160 + n * 32);
        let last = match dialect {
            Dialect::Mysql => {
                write!(sql, "UPDATE feed SET seq = LAST_INSERT_ID(seq + {n}) WHERE id = 1;\n").expect(w);
                "LAST_INSERT_ID()"
            }
            Dialect::Sqlite => {
                write!(sql, "UPDATE feed SET seq = seq + {n} WHERE id = 1;\n").expect(w);
                "(SELECT seq FROM feed WHERE id = 1)"
            }
        };
        write!(
            sql,
            "INSERT INTO event_batches (last_seq, n_events, at_ms, body) VALUES ({last}, {n}, {at}, '"
        )
        .expect(w);
        for (i, e) in events.iter().enumerate() {
            if i > 0 {
                sql.push('\n');
            }
            e.encode(&mut sql);
        }
        sql.push_str("')");
        Some(EventRows { sql, expected: [1, 1] })
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
        let limit = limit.min(EVENTS_PAGE_MAX) as usize;
        let mut events = Vec::new();
        // Batches in number order from the one that holds `from + 1`, a few rows at a time
        // until the page is full: each read is a prefix of the committed feed (committers
        // hold the feed row until COMMIT), so reads one after the other miss nothing.
        let mut read_through = from;
        while events.len() < limit {
            let rows = sqlx::query(
                "SELECT last_seq, n_events, at_ms, body FROM event_batches \
                 WHERE last_seq > ? ORDER BY last_seq LIMIT ?",
            )
            .bind(read_through as i64)
            .bind(BATCH_ROWS_PER_READ)
            .fetch_all(self.pool())
            .await
            .context("reading events")?;
            for row in &rows {
                if events.len() == limit {
                    break;
                }
                let last = row.try_get::<i64, _>(0).context("event_batches.last_seq")? as u64;
                let n = row.try_get::<i64, _>(1).context("event_batches.n_events")? as u64;
                let at = row.try_get(2).context("event_batches.at_ms")?;
                let body = text_column(row, 3).context("event_batches.body")?;
                let batch = decode_batch(last, n, at, &body)?;
                events.extend(batch.into_iter().filter(|e| e.seq > from).take(limit - events.len()));
                read_through = last;
            }
            if rows.len() < BATCH_ROWS_PER_READ as usize {
                break;
            }
        }
        // The reads above are separate snapshots: a trim that committed between them
        // removed events after `a` that the check on the first one let through, and the page
        // would skip them with a 200. Its `trimmed_through` is seen by a read after all.
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
        let next = events.last().map_or(from, |e| e.seq);
        Ok(Page {
            events,
            next,
            head: head.max(next),
        })
    }

    /// Removes up to [`TRIM_BATCHES_MAX`] of the oldest event batches written before
    /// `before_ms` (and about [`TRIM_EVENTS_MAX`] events), as a prefix of the feed (so `trimmed_through` says exactly what is
    /// gone). Returns the events removed.
    pub async fn trim_events(&self, before_ms: UnixMs) -> anyhow::Result<u64> {
        let rows = sqlx::query("SELECT last_seq, n_events, at_ms FROM event_batches ORDER BY last_seq LIMIT ?")
            .bind(i64::from(TRIM_BATCHES_MAX))
            .fetch_all(self.pool())
            .await?;
        let mut through = None;
        let mut events = 0;
        for row in &rows {
            let n = row.try_get::<i64, _>(1)? as u64;
            if row.try_get::<i64, _>(2)? >= before_ms || (through.is_some() && events + n > TRIM_EVENTS_MAX) {
                break;
            }
            through = Some(row.try_get::<i64, _>(0)?);
            events += n;
        }
        let Some(through) = through else { return Ok(0) };
        let mut conn = OpenTransaction::new(self.pool().acquire().await?);
        sqlx::query("BEGIN").execute(conn.get()).await?;
        sqlx::query("DELETE FROM event_batches WHERE last_seq <= ?")
            .bind(through)
            .execute(conn.get())
            .await?;
        sqlx::query("UPDATE feed SET trimmed_through = ? WHERE id = 1 AND trimmed_through < ?")
            .bind(through)
            .bind(through)
            .execute(conn.get())
            .await?;
        sqlx::query("COMMIT").execute(conn.get()).await?;
        conn.ended();
        Ok(events)
    }
}

/// A text column as a String. (sqlx's `Any` driver reports a MySQL MEDIUMTEXT or LONGTEXT
/// as a BLOB, which does not decode as a String: it is read as bytes there.)
pub(super) fn text_column(row: &sqlx::any::AnyRow, i: usize) -> anyhow::Result<String> {
    Ok(match row.try_get::<String, _>(i) {
        Ok(text) => text,
        Err(_) => String::from_utf8(row.try_get::<Vec<u8>, _>(i)?).context("not UTF-8")?,
    })
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
    fn event_rows_number_from_the_feed_row_and_read_back() {
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
             INSERT INTO event_batches (last_seq, n_events, at_ms, body) VALUES \
             ((SELECT seq FROM feed WHERE id = 1), 2, 17, 'enrolled,C1,s1,,\ncourse_changed,C1,,3,40')"
        );
        assert_eq!(rows.expected, [1, 1]);
        let rows = EventRows::of(Dialect::Mysql, &events, 17).unwrap();
        assert!(rows
            .sql
            .starts_with("UPDATE feed SET seq = LAST_INSERT_ID(seq + 2) WHERE id = 1;\n"));
        assert!(rows.sql.contains("VALUES (LAST_INSERT_ID(), 2, 17, 'enrolled,"));
        // What is written reads back as the same events, numbered up to the batch's last.
        let body = "enrolled,C1,s1,,\ncourse_changed,C1,,3,40";
        let read = decode_batch(9, 2, 17, body).unwrap();
        assert_eq!(read.iter().map(|e| e.seq).collect::<Vec<_>>(), [8, 9]);
        assert_eq!(
            (read[0].kind, read[0].student.as_deref()),
            (EventKind::Enrolled, Some("s1"))
        );
        assert_eq!(
            (
                read[1].kind,
                read[1].student.as_deref(),
                read[1].version,
                read[1].capacity
            ),
            (EventKind::CourseChanged, None, Some(3), Some(40))
        );
        for (last, n, bad) in [
            (9, 3, body),
            (9, 1, body),
            (9, 0, ""),
            (1, 2, body),
            (9, 1, "enrolled,C1,s1,"),
            (9, 1, "enrolled,C1,s1,,,"),
            (9, 1, "joined,C1,s1,,"),
            (9, 1, "enrolled,,s1,,"),
            (9, 1, "course_changed,C1,,x,40"),
        ] {
            assert!(decode_batch(last, n, 17, bad).is_err(), "{bad:?} as {n} up to {last}");
        }
        assert!(EventRows::of(Dialect::Mysql, &[], 1).is_none());
    }
}
