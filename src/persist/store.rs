//! The SQL store: MySQL/MariaDB or the embedded SQLite, through one sqlx `Any` code path.
//!
//! Why: both stores must pass one persistence suite, so there is one implementation; the
//! few dialect differences (`INSERT IGNORE` vs `INSERT OR IGNORE`, schema collation,
//! MySQL's committer connections with autocommit off) are named by [`Dialect`]. Only this
//! module speaks SQL.
//! Must never: commit a batch that leaves `enrolled > capacity` (the schema's CHECK and the
//! guarded update both refuse it), or report a commit it has not seen succeed.

use std::time::Duration;

use anyhow::{bail, Context};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Row};

use crate::ids::{CourseId, StudentId, UnixMs};
use crate::shard::course::CourseSpec;

/// Rows in one multi-row statement at most. SQLite allows 32,766 bound variables and the
/// widest statement binds 3 per row.
pub const BATCH_ROWS_LIMIT: usize = 5_000;
const _: () = assert!(BATCH_ROWS_LIMIT * 3 < 32_766);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Mysql,
    Sqlite,
}

impl Dialect {
    pub fn of_url(url: &str) -> Option<Dialect> {
        if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            Some(Dialect::Mysql)
        } else if url.starts_with("sqlite:") {
            Some(Dialect::Sqlite)
        } else {
            None
        }
    }
    fn insert_ignore(self) -> &'static str {
        match self {
            Dialect::Mysql => "INSERT IGNORE INTO",
            Dialect::Sqlite => "INSERT OR IGNORE INTO",
        }
    }
}

/// Pool and time limits handed to sqlx explicitly.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub pool_connections_max: u32,
    pub acquire_timeout_ms: u64,
    /// Bound on a batch's statements before its COMMIT ([`Store::bounded`]).
    pub statement_timeout_ms: u64,
}

/// One seat change inside a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeatOp {
    Enroll {
        course: CourseId,
        student: StudentId,
        at: UnixMs,
    },
    Drop {
        course: CourseId,
        student: StudentId,
    },
}

impl SeatOp {
    pub fn key(&self) -> (&CourseId, &StudentId) {
        match self {
            SeatOp::Enroll { course, student, .. } | SeatOp::Drop { course, student } => (course, student),
        }
    }
}

/// The store's verdict on one seat op of a committed batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeatResult {
    Applied,
    /// The guarded update refused the seat: the course is full in the store (another node
    /// sold it, or an admin lowered capacity).
    Full,
}

/// Why a batch did not commit.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Certainly not committed (failed before COMMIT was sent, or COMMIT was refused).
    #[error("not committed: {0:#}")]
    NotCommitted(anyhow::Error),
    /// COMMIT was sent and no answer came back: it may or may not have applied.
    #[error("commit outcome unknown: {0:#}")]
    Unknown(anyhow::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutResult {
    Created { version: u64 },
    Updated { version: u64 },
    BelowEnrolled,
}

/// A row streamed out of the store at start.
pub enum LoadRow {
    Course {
        id: CourseId,
        spec: CourseSpec,
        version: u64,
    },
    Enrollment {
        course: CourseId,
        student: StudentId,
        at: UnixMs,
    },
}

/// How to tell, after an unknown commit, whether it applied: one row it changed.
#[derive(Clone, Debug)]
pub struct Probe {
    pub course: CourseId,
    pub student: StudentId,
    pub present_if_committed: bool,
}

pub struct Store {
    /// Everything but the fast group commit: row-by-row batches, admin changes, reads.
    pool: AnyPool,
    /// MySQL only: connections with autocommit off for the fast group commit, so a batch
    /// costs its statements and a COMMIT, without a BEGIN round trip. Never used for
    /// reads: a connection left in a transaction would read from a stale snapshot.
    commit_pool: Option<AnyPool>,
    dialect: Dialect,
    /// See [`Store::bounded`].
    statement_timeout: Duration,
}

static MIGRATOR_MYSQL: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/mysql");
static MIGRATOR_SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

impl Store {
    /// Connects and migrates. The SQLite file is created when missing.
    pub async fn open(url: &str, opts: &StoreOptions) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        let dialect = Dialect::of_url(url).context("store URL must start with mysql:// or sqlite:")?;
        let url = match dialect {
            Dialect::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_string(),
        };
        let connect: AnyConnectOptions = url.parse().context("parsing store URL")?;
        let pool_options = || {
            AnyPoolOptions::new()
                .max_connections(opts.pool_connections_max)
                .min_connections(0)
                .acquire_timeout(Duration::from_millis(opts.acquire_timeout_ms))
                // A dead connection fails its batch (503, seat released) and is dropped; a
                // ping per acquire would cost a round trip on every group commit.
                .test_before_acquire(false)
        };
        let pool = pool_options()
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        // WAL with synchronous=FULL: a commit is on disk before we answer.
                        sqlx::query("PRAGMA journal_mode=WAL").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA synchronous=FULL").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA busy_timeout=5000").execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(connect.clone())
            .await
            .context("connecting to the store")?;
        let commit_pool = match dialect {
            Dialect::Sqlite => None,
            Dialect::Mysql => Some(
                pool_options()
                    .after_connect(|conn, _meta| {
                        Box::pin(async move {
                            sqlx::query("SET autocommit = 0").execute(&mut *conn).await?;
                            Ok(())
                        })
                    })
                    .connect_lazy_with(connect),
            ),
        };
        let migrator = match dialect {
            Dialect::Mysql => &MIGRATOR_MYSQL,
            Dialect::Sqlite => &MIGRATOR_SQLITE,
        };
        migrator.run(&pool).await.context("migrating the schema")?;
        Ok(Store {
            pool,
            commit_pool,
            dialect,
            statement_timeout: Duration::from_millis(opts.statement_timeout_ms),
        })
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Bounds a store call made before any COMMIT: a store that stops answering (a hung
    /// server, a silent network) fails the call with a connection error after
    /// `statement_timeout`, so the batch is answered 503 instead of never. The caller must
    /// then close the connection ([`OpenTransaction`] does on drop): its response
    /// stream is cut mid-way, and closing it makes the server roll its work back.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, sqlx::Error> {
        match tokio::time::timeout(self.statement_timeout, call).await {
            Ok(result) => result,
            Err(_elapsed) => Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the store did not answer within {} ms",
                    self.statement_timeout.as_millis()
                ),
            ))),
        }
    }

    /// Bounded like a batch's statements; a connection that timed out is closed.
    pub async fn ping(&self) -> anyhow::Result<()> {
        let mut conn = OpenTransaction::new(self.pool.acquire().await?);
        self.bounded(sqlx::query("SELECT 1").execute(conn.get())).await?;
        conn.ended();
        Ok(())
    }

    pub async fn course_count(&self) -> anyhow::Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) FROM courses")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)?)
    }

    /// Streams every course, then every enrollment, to `sink`. Recomputes each course's
    /// `enrolled` counter from its rows first, so a counter that drifted (a hand edit)
    /// cannot disagree with the rosters that are loaded. Returns how many it recomputed.
    pub async fn load(&self, mut sink: impl FnMut(LoadRow)) -> anyhow::Result<u64> {
        use futures_util::TryStreamExt;
        let fixed = sqlx::query(
            "UPDATE courses SET enrolled = (SELECT COUNT(*) FROM enrollments e WHERE e.course_id = courses.id) \
             WHERE enrolled <> (SELECT COUNT(*) FROM enrollments e WHERE e.course_id = courses.id)",
        )
        .execute(&self.pool)
        .await
        .context("reconciling seat counters")?
        .rows_affected();
        if fixed > 0 {
            tracing::warn!(courses = fixed, "seat counters disagreed with rosters; recomputed");
        }
        let mut rows = sqlx::query("SELECT id, title, capacity, opens_at_ms, closes_at_ms, version FROM courses")
            .fetch(&self.pool);
        while let Some(row) = rows.try_next().await? {
            let id: String = row.try_get(0)?;
            let id = CourseId::parse(&id).with_context(|| format!("bad course id in store: {id:?}"))?;
            let capacity: i64 = row.try_get(2)?;
            let spec = CourseSpec {
                title: row.try_get(1)?,
                capacity: u32::try_from(capacity).context("capacity out of range")?,
                opens_at: row.try_get(3)?,
                closes_at: row.try_get(4)?,
            };
            let version: i64 = row.try_get(5)?;
            sink(LoadRow::Course {
                id,
                spec,
                version: version as u64,
            });
        }
        drop(rows);
        let mut rows = sqlx::query("SELECT course_id, student_id, enrolled_at_ms FROM enrollments").fetch(&self.pool);
        while let Some(row) = rows.try_next().await? {
            let course: String = row.try_get(0)?;
            let student: String = row.try_get(1)?;
            let (Some(course), Some(student)) = (CourseId::parse(&course), StudentId::parse(&student)) else {
                bail!("bad enrollment ids in store: {course:?} {student:?}");
            };
            sink(LoadRow::Enrollment {
                course,
                student,
                at: row.try_get(2)?,
            });
        }
        Ok(fixed)
    }

    /// Commits one batch of seat ops in one transaction. Within a batch every (course,
    /// student) key appears at most once; the caller splits batches where a key repeats.
    pub async fn commit_seats(&self, ops: &[SeatOp]) -> Result<Vec<SeatResult>, CommitError> {
        assert!(
            !ops.is_empty() && ops.len() <= BATCH_ROWS_LIMIT,
            "batch of {} rows",
            ops.len()
        );
        match self.try_fast(ops).await {
            Ok(true) => return Ok(vec![SeatResult::Applied; ops.len()]),
            Ok(false) => {}
            Err(e @ CommitError::Unknown(_)) => {
                let probe = ops.iter().map(probe_of).next().expect("non-empty batch");
                return self
                    .settle_unknown(e, probe, vec![SeatResult::Applied; ops.len()])
                    .await;
            }
            Err(CommitError::NotCommitted(e)) if is_connection_error(&e) => {
                return Err(CommitError::NotCommitted(e));
            }
            Err(CommitError::NotCommitted(e)) => {
                tracing::debug!(error = %format!("{e:#}"), "fast path refused; going row by row");
            }
        }
        self.commit_row_by_row(ops).await
    }

    /// One statement per kind for the whole batch, then COMMIT. `Ok(false)`: rolled back
    /// because a row was not as expected or a course would overflow; the row-by-row path
    /// decides each op.
    async fn try_fast(&self, ops: &[SeatOp]) -> Result<bool, CommitError> {
        let Some(script) = OneTrip::of(self.dialect, ops) else {
            return Ok(false); // an id that cannot be inlined: the bound row-by-row path
        };
        let Some(commit_pool) = &self.commit_pool else {
            let mut tx = self.pool.begin().await.map_err(not_committed)?;
            if !script.run(&mut tx).await.map_err(not_committed)? {
                return Ok(false); // dropping `tx` rolls back
            }
            tx.commit().await.map_err(|e| CommitError::Unknown(e.into()))?;
            return Ok(true);
        };
        // Autocommit is off on these connections, so the first statement opens the
        // transaction: no BEGIN round trip.
        let mut conn = OpenTransaction::new(commit_pool.acquire().await.map_err(not_committed)?);
        let end = if self.bounded(script.run(conn.get())).await.map_err(not_committed)? {
            "COMMIT"
        } else {
            "ROLLBACK"
        };
        let ended = if end == "COMMIT" {
            // Never bounded: once COMMIT is sent, only the store knows the outcome.
            sqlx::query(end).execute(conn.get()).await
        } else {
            self.bounded(sqlx::query(end).execute(conn.get())).await
        };
        match ended {
            Ok(_) => {
                conn.ended();
                Ok(end == "COMMIT")
            }
            Err(e) if end == "COMMIT" => Err(CommitError::Unknown(e.into())),
            Err(e) => Err(not_committed(e)),
        }
    }

    /// Each op on its own, in order, in one transaction, with the guarded counter update
    /// (`enrolled + 1 <= capacity`): the store is the final arbiter across nodes.
    async fn commit_row_by_row(&self, ops: &[SeatOp]) -> Result<Vec<SeatResult>, CommitError> {
        // A plain BEGIN on a connection we own, so one that times out is closed, never
        // pooled half-read.
        let mut conn = OpenTransaction::new(self.pool.acquire().await.map_err(not_committed)?);
        self.bounded(sqlx::query("BEGIN").execute(conn.get()))
            .await
            .map_err(not_committed)?;
        let mut results = Vec::with_capacity(ops.len());
        let mut probe = None;
        let insert = format!(
            "{} enrollments (course_id, student_id, enrolled_at_ms) VALUES (?, ?, ?)",
            self.dialect.insert_ignore()
        );
        for op in ops {
            let (course, student) = op.key();
            let result = match op {
                SeatOp::Enroll { at, .. } => {
                    let inserted = self
                        .bounded(
                            sqlx::query(&insert)
                                .bind(course.as_str())
                                .bind(student.as_str())
                                .bind(*at)
                                .execute(conn.get()),
                        )
                        .await
                        .map_err(not_committed)?
                        .rows_affected();
                    if inserted == 0 {
                        SeatResult::Applied // already held in the store: idempotent
                    } else {
                        let counted = self.bounded(sqlx::query(
                            "UPDATE courses SET enrolled = enrolled + 1 WHERE id = ? AND enrolled + 1 <= capacity",
                        )
                        .bind(course.as_str())
                        .execute(conn.get()))
                        .await
                        .map_err(not_committed)?
                        .rows_affected();
                        if counted == 1 {
                            probe.get_or_insert_with(|| probe_of(op));
                            SeatResult::Applied
                        } else {
                            self.bounded(
                                sqlx::query("DELETE FROM enrollments WHERE course_id = ? AND student_id = ?")
                                    .bind(course.as_str())
                                    .bind(student.as_str())
                                    .execute(conn.get()),
                            )
                            .await
                            .map_err(not_committed)?;
                            SeatResult::Full
                        }
                    }
                }
                SeatOp::Drop { .. } => {
                    let deleted = self
                        .bounded(
                            sqlx::query("DELETE FROM enrollments WHERE course_id = ? AND student_id = ?")
                                .bind(course.as_str())
                                .bind(student.as_str())
                                .execute(conn.get()),
                        )
                        .await
                        .map_err(not_committed)?
                        .rows_affected();
                    if deleted == 1 {
                        self.bounded(
                            sqlx::query("UPDATE courses SET enrolled = enrolled - 1 WHERE id = ?")
                                .bind(course.as_str())
                                .execute(conn.get()),
                        )
                        .await
                        .map_err(not_committed)?;
                        probe.get_or_insert_with(|| probe_of(op));
                    }
                    SeatResult::Applied
                }
            };
            results.push(result);
        }
        // Never bounded: once COMMIT is sent, only the store knows the outcome.
        if let Err(e) = sqlx::query("COMMIT").execute(conn.get()).await {
            let e = CommitError::Unknown(e.into());
            return match probe {
                Some(p) => self.settle_unknown(e, p, results).await,
                // Nothing changed, so either outcome leaves the store as it was.
                None => Ok(results),
            };
        }
        conn.ended();
        Ok(results)
    }

    /// After COMMIT went unanswered: read one changed row back, retrying with capped
    /// backoff until the store answers. Nobody is answered before that.
    async fn settle_unknown(
        &self,
        cause: CommitError,
        probe: Probe,
        if_committed: Vec<SeatResult>,
    ) -> Result<Vec<SeatResult>, CommitError> {
        tracing::warn!(error = %cause, "reading the batch back to learn its outcome");
        let mut backoff_ms = 20;
        loop {
            match self.seat_present(&probe.course, &probe.student).await {
                Ok(present) if present == probe.present_if_committed => return Ok(if_committed),
                Ok(_) => return Err(CommitError::NotCommitted(anyhow::anyhow!("{cause}"))),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), backoff_ms, "read-back failed; retrying");
                    tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                    backoff_ms = (backoff_ms * 2).min(READBACK_BACKOFF_MS_MAX);
                }
            }
        }
    }

    pub async fn seat_present(&self, course: &CourseId, student: &StudentId) -> anyhow::Result<bool> {
        let row = sqlx::query("SELECT 1 FROM enrollments WHERE course_id = ? AND student_id = ?")
            .bind(course.as_str())
            .bind(student.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// Creates or updates a course. Capacity may not go below the committed count: the
    /// update is guarded in SQL, so a concurrent node cannot slip under it.
    pub async fn put_course(&self, id: &CourseId, spec: &CourseSpec) -> Result<PutResult, CommitError> {
        let mut tx = self.pool.begin().await.map_err(not_committed)?;
        let capacity = i64::from(spec.capacity);
        let updated = sqlx::query(
            "UPDATE courses SET title = ?, capacity = ?, opens_at_ms = ?, closes_at_ms = ?, version = version + 1 \
             WHERE id = ? AND enrolled <= ?",
        )
        .bind(spec.title.as_str())
        .bind(capacity)
        .bind(spec.opens_at)
        .bind(spec.closes_at)
        .bind(id.as_str())
        .bind(capacity)
        .execute(&mut *tx)
        .await
        .map_err(not_committed)?
        .rows_affected();
        let result = if updated == 1 {
            let row = sqlx::query("SELECT version FROM courses WHERE id = ?")
                .bind(id.as_str())
                .fetch_one(&mut *tx)
                .await
                .map_err(not_committed)?;
            PutResult::Updated {
                version: row.try_get::<i64, _>(0).map_err(not_committed)? as u64,
            }
        } else {
            let exists = sqlx::query("SELECT 1 FROM courses WHERE id = ?")
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(not_committed)?;
            if exists.is_some() {
                return Ok(PutResult::BelowEnrolled);
            }
            sqlx::query(
                "INSERT INTO courses (id, title, capacity, enrolled, opens_at_ms, closes_at_ms, version) \
                 VALUES (?, ?, ?, 0, ?, ?, 1)",
            )
            .bind(id.as_str())
            .bind(spec.title.as_str())
            .bind(capacity)
            .bind(spec.opens_at)
            .bind(spec.closes_at)
            .execute(&mut *tx)
            .await
            .map_err(not_committed)?;
            PutResult::Created { version: 1 }
        };
        // An unknown commit of an admin change is reported as not committed: the admin
        // retries the idempotent PUT, and the shard never widened capacity meanwhile.
        tx.commit().await.map_err(|e| CommitError::NotCommitted(e.into()))?;
        Ok(result)
    }

    /// The committed roster of a course, from the store (tests and recovery checks).
    pub async fn roster(&self, course: &CourseId) -> anyhow::Result<Vec<String>> {
        let rows = sqlx::query("SELECT student_id FROM enrollments WHERE course_id = ? ORDER BY student_id")
            .bind(course.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get::<String, _>(0)?)).collect()
    }

    pub async fn close(&self) {
        if let Some(p) = &self.commit_pool {
            p.close().await;
        }
        self.pool.close().await;
    }
}

/// Longest wait between two read-backs of an unknown commit.
const READBACK_BACKOFF_MS_MAX: u64 = 1_000;

fn probe_of(op: &SeatOp) -> Probe {
    let (course, student) = op.key();
    Probe {
        course: course.clone(),
        student: student.clone(),
        present_if_committed: matches!(op, SeatOp::Enroll { .. }),
    }
}

/// Net change of `enrolled` per course, in first-seen order, zero deltas left out.
fn course_deltas(ops: &[SeatOp]) -> Vec<(&CourseId, i64)> {
    let mut deltas: Vec<(&CourseId, i64)> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for op in ops {
        let (course, _) = op.key();
        let d = if matches!(op, SeatOp::Enroll { .. }) { 1 } else { -1 };
        let i = *index.entry(course).or_insert_with(|| {
            deltas.push((course, 0));
            deltas.len() - 1
        });
        deltas[i].1 += d;
    }
    deltas.retain(|(_, d)| *d != 0);
    deltas
}

/// The fast path: one multi-row DELETE for the drops, one multi-row INSERT IGNORE for the
/// enrollments, one counter UPDATE for every course touched, sent as one multi-statement
/// text query (on MySQL one round trip instead of one each). The COMMIT or ROLLBACK
/// follows once each statement's row count is checked, so a batch cut off here is
/// certainly not committed.
///
/// ```sql
/// DELETE FROM enrollments WHERE (course_id = 'C1' AND student_id = 's9') OR ...;
/// INSERT IGNORE INTO enrollments (course_id, student_id, enrolled_at_ms) VALUES ('C1','s1',17), ...;
/// UPDATE courses SET enrolled = enrolled + CASE id WHEN 'C1' THEN 2 ... END WHERE id IN ('C1', ...)
/// ```
///
/// Values are inlined, which is safe only because ids are `[A-Za-z0-9_.-]` (checked again
/// here: any other byte and the batch goes row by row, with bound statements) and times
/// and deltas are integers. Measured on MySQL against three bound statements: mean commit
/// 1.02 -> 0.91 ms.
struct OneTrip {
    sql: String,
    /// Rows each statement must change, in order.
    expected: Vec<u64>,
}

impl OneTrip {
    fn of(dialect: Dialect, ops: &[SeatOp]) -> Option<OneTrip> {
        use std::fmt::Write;
        let inlinable = |id: &str| id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !ops.iter().all(|op| {
            let (c, s) = op.key();
            inlinable(c.as_str()) && inlinable(s.as_str())
        }) {
            return None;
        }
        let mut sql = String::with_capacity(192 + ops.len() * 64);
        let mut expected = Vec::with_capacity(3);
        let w = "writing to a String";
        let mut deletes = 0;
        for op in ops {
            if let SeatOp::Drop { course, student } = op {
                let head = if deletes == 0 {
                    "DELETE FROM enrollments WHERE "
                } else {
                    " OR "
                };
                write!(sql, "{head}(course_id = '{course}' AND student_id = '{student}')").expect(w);
                deletes += 1;
            }
        }
        if deletes > 0 {
            expected.push(deletes);
            sql.push_str(";\n");
        }
        let mut inserts = 0;
        for op in ops {
            if let SeatOp::Enroll { course, student, at } = op {
                if inserts == 0 {
                    let insert = dialect.insert_ignore();
                    write!(
                        sql,
                        "{insert} enrollments (course_id, student_id, enrolled_at_ms) VALUES "
                    )
                    .expect(w);
                } else {
                    sql.push(',');
                }
                write!(sql, "('{course}','{student}',{at})").expect(w);
                inserts += 1;
            }
        }
        if inserts > 0 {
            expected.push(inserts);
            sql.push_str(";\n");
        }
        let deltas = course_deltas(ops);
        if !deltas.is_empty() {
            sql.push_str("UPDATE courses SET enrolled = enrolled + CASE id");
            for (course, d) in &deltas {
                write!(sql, " WHEN '{course}' THEN {d}").expect(w);
            }
            for (i, (course, _)) in deltas.iter().enumerate() {
                let head = if i == 0 { " END WHERE id IN (" } else { "," };
                write!(sql, "{head}'{course}'").expect(w);
            }
            sql.push(')');
            expected.push(deltas.len() as u64);
        }
        Some(OneTrip { sql, expected })
    }

    /// `Ok(false)`: a statement changed other than the expected rows, or the server refused
    /// one (the schema's CHECK on an overflowing course); the caller rolls back.
    async fn run(&self, conn: &mut sqlx::AnyConnection) -> Result<bool, sqlx::Error> {
        use futures_util::TryStreamExt;
        let mut results = sqlx::raw_sql(&self.sql).execute_many(conn);
        let mut changed = Vec::with_capacity(self.expected.len());
        loop {
            match results.try_next().await {
                Ok(Some(done)) => changed.push(done.rows_affected()),
                Ok(None) => return Ok(changed == self.expected),
                Err(sqlx::Error::Database(e)) => {
                    tracing::debug!(error = %e, statement = changed.len(), "fast path refused by the store");
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A connection between its first statement and the end of its work (COMMIT, ROLLBACK,
/// or a ping's answer): a committer connection with autocommit off, a row-by-row batch
/// after its BEGIN. Dropped before [`OpenTransaction::ended`] (an error, a timeout, a
/// cancelled future), the connection is closed instead of pooled: the server rolls the
/// work back, no later batch can commit it by accident, and no half-read answer is left
/// on a pooled connection.
struct OpenTransaction {
    conn: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
    ended: bool,
}

impl OpenTransaction {
    fn new(conn: sqlx::pool::PoolConnection<sqlx::Any>) -> Self {
        OpenTransaction {
            conn: Some(conn),
            ended: false,
        }
    }
    fn get(&mut self) -> &mut sqlx::AnyConnection {
        self.conn.as_mut().expect("present until drop")
    }
    fn ended(&mut self) {
        self.ended = true;
    }
}

impl Drop for OpenTransaction {
    fn drop(&mut self) {
        if !self.ended {
            if let Some(conn) = self.conn.take() {
                drop(conn.detach());
            }
        }
    }
}

fn not_committed(e: impl Into<anyhow::Error>) -> CommitError {
    CommitError::NotCommitted(e.into())
}

pub fn is_connection_error(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<sqlx::Error>(),
        Some(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Protocol(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(c: &str, s: &str) -> (CourseId, StudentId) {
        (CourseId::parse(c).unwrap(), StudentId::parse(s).unwrap())
    }

    /// The fast path really commits on SQLite (a refusal would fall back to the row-by-row
    /// path and still give right answers, hiding a broken script).
    #[tokio::test]
    async fn sqlite_takes_the_fast_path_and_refuses_a_duplicate() {
        let path = std::env::temp_dir().join(format!("enrolld-fast-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let opts = StoreOptions {
            pool_connections_max: 2,
            acquire_timeout_ms: 1_000,
            statement_timeout_ms: 5_000,
        };
        let store = Store::open(&format!("sqlite://{}", path.display()), &opts)
            .await
            .unwrap();
        let (c, s) = ids("F-1", "s1");
        let spec = CourseSpec {
            title: "fast".into(),
            capacity: 5,
            opens_at: None,
            closes_at: None,
        };
        store.put_course(&c, &spec).await.unwrap();
        let op = SeatOp::Enroll {
            course: c.clone(),
            student: s,
            at: 1,
        };
        assert!(
            store.try_fast(std::slice::from_ref(&op)).await.unwrap(),
            "committed fast"
        );
        assert!(!store.try_fast(&[op]).await.unwrap(), "a stored row refuses the batch");
        store.close().await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    #[test]
    fn one_trip_script_holds_each_statement_once_with_its_expected_count() {
        let (a, s1) = ids("A-1", "s.1");
        let (b, s2) = ids("B_2", "s-2");
        let ops = [
            SeatOp::Drop {
                course: a.clone(),
                student: s2.clone(),
            },
            SeatOp::Enroll {
                course: a.clone(),
                student: s1.clone(),
                at: 17,
            },
            SeatOp::Enroll {
                course: b.clone(),
                student: s1,
                at: 18,
            },
        ];
        let script = OneTrip::of(Dialect::Mysql, &ops).expect("valid ids inline");
        assert_eq!(
            script.sql,
            "DELETE FROM enrollments WHERE (course_id = 'A-1' AND student_id = 's-2');\n\
             INSERT IGNORE INTO enrollments (course_id, student_id, enrolled_at_ms) VALUES ('A-1','s.1',17),('B_2','s.1',18);\n\
             UPDATE courses SET enrolled = enrolled + CASE id WHEN 'B_2' THEN 1 END WHERE id IN ('B_2')"
        );
        // A's drop and enrollment cancel out: only B's counter moves.
        assert_eq!(script.expected, vec![1, 2, 1]);
        let only_enroll = [SeatOp::Enroll {
            course: b,
            student: s2,
            at: 1,
        }];
        let script = OneTrip::of(Dialect::Sqlite, &only_enroll).unwrap();
        assert!(script.sql.starts_with("INSERT OR IGNORE INTO") && !script.sql.contains("DELETE"));
        assert_eq!(script.expected, vec![1, 1]);
    }
}
