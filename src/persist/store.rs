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

use super::feed::{EventKind, EventRows, NewEvent};
use crate::ids::{CourseId, StudentId, UnixMs};
use crate::model::{CourseSpec, DrawRecord, Standing};
use crate::partition::{Partition, Proof};

/// Rows in one multi-row statement at most. SQLite allows 32,766 bound variables and the
/// widest statement binds 3 per row.
pub const BATCH_ROWS_LIMIT: usize = 5_000;
const _: () = assert!(BATCH_ROWS_LIMIT * 3 < 32_766);

/// Tries to migrate the schema at start before giving up (see [`Store::open`]).
const MIGRATE_ATTEMPTS_MAX: u32 = 5;
/// Wait before the second try; it grows with each try.
const MIGRATE_RETRY_MS: u64 = 300;

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
    /// The scalar minimum of its arguments.
    fn least(self) -> &'static str {
        match self {
            Dialect::Mysql => "LEAST",
            Dialect::Sqlite => "MIN",
        }
    }
}

/// Pool and time limits handed to sqlx explicitly.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub pool_connections_max: u32,
    pub acquire_timeout_ms: u64,
    /// Write the change feed's events in every change's transaction (`feed.rs`).
    pub events: bool,
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
    /// An entry in the course's draw.
    Enter {
        course: CourseId,
        student: StudentId,
        at: UnixMs,
    },
    /// An entry withdrawn.
    Withdraw {
        course: CourseId,
        student: StudentId,
    },
    /// A place at the end of the waitlist.
    Join {
        course: CourseId,
        student: StudentId,
        rank: u64,
        at: UnixMs,
    },
    /// A waitlist place given up.
    Leave {
        course: CourseId,
        student: StudentId,
    },
    /// A drop whose seat goes to `next`, the head of the waitlist, in the same commit
    /// (`at`: when `next` asked).
    DropPromote {
        course: CourseId,
        student: StudentId,
        next: StudentId,
        at: UnixMs,
    },
    /// The head of the waitlist takes a seat that is free (guarded like an enrollment).
    Promote {
        course: CourseId,
        student: StudentId,
        at: UnixMs,
    },
}

impl SeatOp {
    pub fn key(&self) -> (&CourseId, &StudentId) {
        match self {
            SeatOp::Enroll { course, student, .. }
            | SeatOp::Drop { course, student }
            | SeatOp::Enter { course, student, .. }
            | SeatOp::Withdraw { course, student }
            | SeatOp::Join { course, student, .. }
            | SeatOp::Leave { course, student }
            | SeatOp::DropPromote { course, student, .. }
            | SeatOp::Promote { course, student, .. } => (course, student),
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
    /// Certainly not committed: the store no longer gives this node the epoch of one of
    /// the batch's partitions (another node took it over).
    #[error("fenced out: this node no longer holds the lease of a partition it wrote")]
    Fenced,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutResult {
    Created { version: u64 },
    Updated { version: u64 },
    BelowEnrolled,
}

/// What a load found besides the rows it streamed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Courses whose seat counter disagreed with their rows.
    pub counters_fixed: u64,
    /// Courses with more seats than capacity.
    pub courses_overfull: u64,
    /// Seats of courses that do not exist.
    pub seats_orphaned: u64,
}

/// A course as committed in the store (cluster mode's catalog reads).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCourse {
    pub id: CourseId,
    pub spec: CourseSpec,
    pub enrolled: u32,
    pub version: u64,
    pub waitlisted: u32,
}

/// `places.kind` of an entry in a draw.
pub const PLACE_ENTRY: &str = "entry";
/// `places.kind` of a waitlist place.
pub const PLACE_WAIT: &str = "wait";

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
    /// An entry (rank None) or a waitlist place; waitlist places come in rank order.
    Place {
        course: CourseId,
        student: StudentId,
        rank: Option<u64>,
        at: UnixMs,
    },
    /// The course's draw ran at `at`.
    Drawn { course: CourseId, at: UnixMs },
}

impl LoadRow {
    /// The course the row is about.
    pub fn course(&self) -> &CourseId {
        match self {
            LoadRow::Course { id, .. } => id,
            LoadRow::Enrollment { course, .. } | LoadRow::Place { course, .. } | LoadRow::Drawn { course, .. } => {
                course
            }
        }
    }
}

/// How to tell, after an unknown commit, whether it applied: one thing it changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// A seat row that is present (or absent) only if the batch committed.
    Seat {
        course: CourseId,
        student: StudentId,
        present_if_committed: bool,
    },
    /// A course row whose version is this only if the admin change committed.
    Course {
        course: CourseId,
        version_if_committed: u64,
    },
    /// A place (entry or waitlist) row present (or absent) only if the batch committed.
    Place {
        course: CourseId,
        student: StudentId,
        present_if_committed: bool,
    },
    /// The course's draw record, present only if the draw committed.
    Draw { course: CourseId },
}

/// What a transaction's callers are told if its unanswered COMMIT turns out to have
/// applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settled {
    Seats(Vec<SeatResult>),
    Put(PutResult),
    Draw,
}

/// One transaction's session, as far as settling it needs: which server session runs it,
/// and, once COMMIT is about to be sent, how to tell whether it applied. A call cut short
/// (an error, or the persist thread's time bound dropping its future) leaves this behind:
/// with no `committing`, COMMIT was never sent and the work is rolled back with the
/// closed connection; with it, the outcome is unknown until [`Store::read_back`].
#[derive(Debug, Default)]
pub struct Session {
    /// MySQL's `CONNECTION_ID()` of the session (None on SQLite, which needs none).
    pub id: std::cell::Cell<Option<u64>>,
    /// Set just before COMMIT is sent: the probe (None when the transaction changed
    /// nothing, so either outcome is the same) and what its callers are told if it
    /// applied.
    pub committing: std::cell::RefCell<Option<(Option<Probe>, Settled)>>,
}

impl Session {
    /// Marks COMMIT as about to be sent (see `committing`).
    pub fn commit_sent(&self, probe: Option<Probe>, if_committed: Settled) {
        *self.committing.borrow_mut() = Some((probe, if_committed));
    }
}

pub struct Store {
    /// Everything but the fast group commit: row-by-row batches, admin changes, reads.
    pool: AnyPool,
    /// MySQL only: connections with autocommit off for the fast group commit, so a batch
    /// costs its statements and a COMMIT, without a BEGIN round trip. Never used for
    /// reads: a connection left in a transaction would read from a stale snapshot.
    commit_pool: Option<AnyPool>,
    dialect: Dialect,
    /// Write the change feed's events (see `feed.rs`).
    events: bool,
    /// MySQL: the node id whose leases every write transaction proves (`lease.rs`).
    lease_owner: Option<String>,
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
                    if dialect == Dialect::Mysql {
                        bound_idle_transactions(conn).await?;
                    }
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
                            bound_idle_transactions(conn).await?;
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
        // Nodes started together on an empty database race to migrate it; the loser sees
        // the winner's migration half done and fails. Waiting for the winner and looking
        // again finds it done.
        let mut attempt = 1;
        loop {
            match migrator.run(&pool).await {
                Ok(()) => break,
                Err(e) if attempt < MIGRATE_ATTEMPTS_MAX => {
                    tracing::warn!(error = %e, attempt, "migrating the schema failed; another process may be migrating it, looking again");
                    let pause = MIGRATE_RETRY_MS * attempt as u64 + u64::from(rand::random::<u8>());
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    attempt += 1;
                }
                Err(e) => return Err(anyhow::Error::new(e).context("migrating the schema")),
            }
        }
        Ok(Store {
            pool,
            commit_pool,
            dialect,
            events: opts.events,
            lease_owner: None,
        })
    }

    /// From now on every write transaction proves, inside itself, that `node` still holds
    /// the leases its changes were decided under (MySQL; see [`fence_sql`]).
    pub fn fence_as(&mut self, node: &str) {
        assert!(
            node.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)),
            "node ids are validated: {node:?}"
        );
        self.lease_owner = Some(node.to_string());
    }

    /// The node whose leases this store's writes prove, once [`Store::fence_as`] ran.
    pub fn lease_owner(&self) -> Option<&str> {
        self.lease_owner.as_deref()
    }

    /// The fence statement for this proof, when this store fences.
    fn fence_for(&self, proof: &Proof) -> Option<FenceCheck> {
        if cfg!(feature = "unfenced") {
            return None; // measurement builds only (Cargo.toml)
        }
        let owner = self.lease_owner.as_deref()?;
        assert!(
            !proof.leases.is_empty(),
            "a fenced store writes only changes decided under a lease"
        );
        Some(fence_sql(owner, proof.gen))
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub(super) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The feed's rows for these changes, when the feed is on.
    fn event_rows(&self, events: &[NewEvent]) -> Option<EventRows> {
        if !self.events {
            return None;
        }
        EventRows::of(self.dialect, events, crate::ids::now_ms())
    }

    /// A round trip to the store (the caller bounds it; a connection cut off is closed).
    pub async fn ping(&self) -> anyhow::Result<()> {
        let mut conn = OpenTransaction::new(self.pool.acquire().await?);
        sqlx::query("SELECT 1").execute(conn.get()).await?;
        conn.ended();
        Ok(())
    }

    pub async fn course_count(&self) -> anyhow::Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) FROM courses")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)?)
    }

    /// Refuses a store that cannot keep the promises: one that ignores CHECK constraints
    /// (MySQL before 8.0.16), or, on MySQL, one that does not flush its log at every
    /// commit (`innodb_flush_log_at_trx_commit` other than 1: a 201 could be lost to a
    /// power cut).
    pub async fn check_guarantees(&self) -> anyhow::Result<()> {
        let mut conn = OpenTransaction::new(self.pool.acquire().await?);
        sqlx::query("BEGIN").execute(conn.get()).await?;
        let oversold = sqlx::query(
            "INSERT INTO courses (id, title, capacity, enrolled, version) VALUES ('.check', 'CHECK probe', 0, 1, 1)",
        )
        .execute(conn.get())
        .await;
        sqlx::query("ROLLBACK").execute(conn.get()).await?;
        conn.ended();
        match oversold {
            Ok(_) => bail!(
                "the store accepted a course with more seats than capacity: it does not enforce CHECK \
                 constraints (MySQL before 8.0.16?), and enrolld relies on them"
            ),
            Err(sqlx::Error::Database(_)) => {}
            Err(e) => return Err(e).context("probing CHECK constraints"),
        }
        if self.dialect == Dialect::Mysql {
            let row = sqlx::query("SELECT CAST(@@innodb_flush_log_at_trx_commit AS SIGNED)")
                .fetch_one(&self.pool)
                .await
                .context("reading innodb_flush_log_at_trx_commit")?;
            let flush: i64 = row.try_get(0)?;
            if flush != 1 {
                bail!(
                    "innodb_flush_log_at_trx_commit is {flush}: a committed seat could be lost to a crash of \
                     the database host; set it to 1"
                );
            }
        }
        Ok(())
    }

    /// Streams every course, then every enrollment, to `sink`, from one consistent
    /// snapshot. Recomputes each course's `enrolled` counter from its rows first (capped at
    /// capacity, which the CHECK requires), so a counter that drifted (a hand edit) cannot
    /// disagree with the rosters that are loaded. A course with more rows than capacity
    /// is loaded whole and reported; seats of a course that does not exist stay in the
    /// store, are not loaded, and are reported.
    ///
    /// `only`: just the courses of these partitions (MySQL; a node taking them over).
    pub async fn load(&self, only: Option<&[Partition]>, mut sink: impl FnMut(LoadRow)) -> anyhow::Result<LoadReport> {
        use futures_util::TryStreamExt;
        let least = self.dialect.least();
        let count = "(SELECT COUNT(*) FROM enrollments e WHERE e.course_id = courses.id)";
        let (in_parts, and_in_parts, and_c_in_parts) = match only {
            None => (String::new(), String::new(), String::new()),
            Some(parts) => {
                assert_eq!(self.dialect, Dialect::Mysql, "partitions are stored on MySQL only");
                let list: Vec<String> = parts.iter().map(|p| p.0.to_string()).collect();
                let list = if list.is_empty() {
                    "-1".to_string()
                } else {
                    list.join(",")
                };
                (
                    format!(" WHERE part IN ({list})"),
                    format!(" AND part IN ({list})"),
                    format!(" AND c.part IN ({list})"),
                )
            }
        };
        let counters_fixed = sqlx::query(&format!(
            "UPDATE courses SET enrolled = {least}({count}, capacity) WHERE enrolled <> {least}({count}, capacity){and_in_parts}"
        ))
        .execute(&self.pool)
        .await
        .context("reconciling seat counters")?
        .rows_affected();
        if counters_fixed > 0 {
            tracing::warn!(
                courses = counters_fixed,
                "seat counters disagreed with rosters; recomputed"
            );
        }
        let mut conn = OpenTransaction::new(self.pool.acquire().await?);
        let begin = match self.dialect {
            Dialect::Mysql => "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY",
            Dialect::Sqlite => "BEGIN",
        };
        sqlx::query(begin)
            .execute(conn.get())
            .await
            .context("opening the load snapshot")?;
        let mut report = LoadReport {
            counters_fixed,
            ..LoadReport::default()
        };
        let courses_sql = format!(
            "SELECT id, title, capacity, opens_at_ms, closes_at_ms, version, {count}, draw_at_ms, waitlist_max \
             FROM courses{in_parts}"
        );
        let mut rows = sqlx::query(&courses_sql).fetch(conn.get());
        while let Some(row) = rows.try_next().await? {
            let id: String = row.try_get(0)?;
            let id = CourseId::parse(&id).with_context(|| format!("bad course id in store: {id:?}"))?;
            let capacity: i64 = row.try_get(2)?;
            let spec = CourseSpec {
                title: row.try_get(1)?,
                capacity: u32::try_from(capacity).context("capacity out of range")?,
                opens_at: row.try_get(3)?,
                closes_at: row.try_get(4)?,
                draw_at: row.try_get(7)?,
                waitlist_max: u32::try_from(row.try_get::<i64, _>(8)?).context("waitlist_max out of range")?,
            };
            let seats: i64 = row.try_get(6)?;
            if seats > capacity {
                tracing::error!(
                    course = %id, capacity, seats,
                    "course holds more seats than capacity (a hand edit, or a store that ignored CHECK); \
                     every seat is kept, and it sells nothing until drops bring it under capacity"
                );
                report.courses_overfull += 1;
            }
            let version: i64 = row.try_get(5)?;
            sink(LoadRow::Course {
                id,
                spec,
                version: version as u64,
            });
        }
        drop(rows);
        if only.is_none() {
            let orphans = sqlx::query(
                "SELECT COUNT(*) FROM enrollments e WHERE NOT EXISTS (SELECT 1 FROM courses c WHERE c.id = e.course_id)",
            )
            .fetch_one(conn.get())
            .await?;
            report.seats_orphaned = orphans.try_get::<i64, _>(0)? as u64;
        }
        if report.seats_orphaned > 0 {
            tracing::error!(
                seats = report.seats_orphaned,
                "stored seats of courses that do not exist: kept in the store, not loaded"
            );
        }
        let enrollments_sql = format!(
            "SELECT e.course_id, e.student_id, e.enrolled_at_ms FROM enrollments e JOIN courses c ON c.id = e.course_id{}",
            if only.is_some() { format!(" WHERE 1 = 1{and_c_in_parts}") } else { String::new() }
        );
        let mut rows = sqlx::query(&enrollments_sql).fetch(conn.get());
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
        drop(rows);
        let join = |table: &str| {
            format!(
                "{table} x JOIN courses c ON c.id = x.course_id{}",
                if only.is_some() {
                    format!(" WHERE 1 = 1{and_c_in_parts}")
                } else {
                    String::new()
                }
            )
        };
        // Waitlist places in rank order, so each course's waitlist is built by appending.
        let places_sql = format!(
            "SELECT x.course_id, x.student_id, x.kind, x.ord, x.at_ms FROM {} ORDER BY x.ord",
            join("places")
        );
        let mut rows = sqlx::query(&places_sql).fetch(conn.get());
        while let Some(row) = rows.try_next().await? {
            let course: String = row.try_get(0)?;
            let student: String = row.try_get(1)?;
            let (Some(course), Some(student)) = (CourseId::parse(&course), StudentId::parse(&student)) else {
                bail!("bad place ids in store: {course:?} {student:?}");
            };
            let kind: String = row.try_get(2)?;
            let rank = match kind.as_str() {
                PLACE_ENTRY => None,
                PLACE_WAIT => Some(row.try_get::<i64, _>(3)? as u64),
                other => bail!("unknown place kind in store: {other:?}"),
            };
            sink(LoadRow::Place {
                course,
                student,
                rank,
                at: row.try_get(4)?,
            });
        }
        drop(rows);
        let draws_sql = format!("SELECT x.course_id, x.drawn_at_ms FROM {}", join("draws"));
        let mut rows = sqlx::query(&draws_sql).fetch(conn.get());
        while let Some(row) = rows.try_next().await? {
            let course: String = row.try_get(0)?;
            let course = CourseId::parse(&course).with_context(|| format!("bad course id in draws: {course:?}"))?;
            sink(LoadRow::Drawn {
                course,
                at: row.try_get(1)?,
            });
        }
        drop(rows);
        sqlx::query("ROLLBACK").execute(conn.get()).await?;
        conn.ended();
        Ok(report)
    }

    /// Commits one batch of seat ops in one transaction. Within a batch every (course,
    /// student) key appears at most once; the caller splits batches where a key repeats.
    /// An unanswered COMMIT is `CommitError::Unknown`, with `session` telling how to
    /// settle it; the caller settles it (persist/ owns the time bounds and retries).
    /// `proof`: the leases the ops were decided under and the fence generation they are
    /// this node's at (no leases: a store that does not fence); the batch commits only if
    /// the generation is still the store's.
    pub async fn commit_seats(
        &self,
        ops: &[SeatOp],
        proof: &Proof,
        session: &Session,
    ) -> Result<Vec<SeatResult>, CommitError> {
        assert!(
            !ops.is_empty() && ops.len() <= BATCH_ROWS_LIMIT,
            "batch of {} rows",
            ops.len()
        );
        match self.try_fast(ops, proof, session).await {
            Ok(true) => return Ok(vec![SeatResult::Applied; ops.len()]),
            Ok(false) => {}
            Err(e @ (CommitError::Unknown(_) | CommitError::Fenced)) => return Err(e),
            Err(CommitError::NotCommitted(e)) if is_connection_error(&e) => {
                return Err(CommitError::NotCommitted(e));
            }
            Err(CommitError::NotCommitted(e)) => {
                tracing::debug!(error = %format!("{e:#}"), "fast path refused; going row by row");
            }
        }
        self.commit_row_by_row(ops, proof, session).await
    }

    /// One statement per kind for the whole batch, then COMMIT. `Ok(false)`: rolled back
    /// because a row was not as expected or a course would overflow; the row-by-row path
    /// decides each op.
    async fn try_fast(&self, ops: &[SeatOp], proof: &Proof, session: &Session) -> Result<bool, CommitError> {
        let Some(mut script) = OneTrip::of(self.dialect, ops, self.fence_for(proof)) else {
            return Ok(false); // an id that cannot be inlined: the bound row-by-row path
        };
        // Every op of a fast batch changes a row (or the batch rolls back), so each has its
        // event, written by the same round trip.
        let events: Vec<NewEvent> = ops.iter().flat_map(NewEvent::of_op).collect();
        if let Some(rows) = self.event_rows(&events) {
            script.append(&rows);
        }
        let if_committed = || Settled::Seats(vec![SeatResult::Applied; ops.len()]);
        let Some(commit_pool) = &self.commit_pool else {
            let mut tx = self.pool.begin().await.map_err(not_committed)?;
            match script.run(&mut tx, session).await.map_err(not_committed)? {
                Ran::AsExpected => {}
                Ran::Refused => return Ok(false), // dropping `tx` rolls back
                Ran::Fenced => return Err(CommitError::Fenced),
            }
            session.commit_sent(ops.iter().fold(None, better_probe), if_committed());
            tx.commit().await.map_err(|e| CommitError::Unknown(e.into()))?;
            return Ok(true);
        };
        // Autocommit is off on these connections, so the first statement opens the
        // transaction: no BEGIN round trip.
        let mut conn = OpenTransaction::new(commit_pool.acquire().await.map_err(not_committed)?);
        let ran = script.run(conn.get(), session).await.map_err(not_committed)?;
        if ran != Ran::AsExpected {
            sqlx::query("ROLLBACK")
                .execute(conn.get())
                .await
                .map_err(not_committed)?;
            conn.ended();
            return match ran {
                Ran::Fenced => Err(CommitError::Fenced),
                _ => Ok(false),
            };
        }
        conn.commit(session, ops.iter().fold(None, better_probe), if_committed())
            .await?;
        Ok(true)
    }

    /// A transaction on a pooled connection we own (plain BEGIN, so one cut off is closed,
    /// never pooled half-read), with its MySQL session id in `session` for the fence.
    /// Runs the fence in a transaction [`Store::begin`] opened; fenced out, it rolls back.
    async fn prove_leases(&self, conn: &mut OpenTransaction, proof: &Proof) -> Result<(), CommitError> {
        let Some(fence) = self.fence_for(proof) else {
            return Ok(());
        };
        let row = sqlx::query(&fence.sql)
            .fetch_optional(conn.get())
            .await
            .map_err(not_committed)?;
        if let Some(row) = row {
            if row.try_get::<i64, _>(0).map_err(not_committed)? == fence.expected {
                return Ok(());
            }
        }
        sqlx::query("ROLLBACK")
            .execute(conn.get())
            .await
            .map_err(not_committed)?;
        conn.ended();
        Err(CommitError::Fenced)
    }

    async fn begin(&self, session: &Session) -> Result<OpenTransaction, CommitError> {
        let mut conn = OpenTransaction::new(self.pool.acquire().await.map_err(not_committed)?);
        sqlx::query("BEGIN").execute(conn.get()).await.map_err(not_committed)?;
        if self.dialect == Dialect::Mysql {
            session
                .id
                .set(Some(connection_id(conn.get()).await.map_err(not_committed)?));
        }
        Ok(conn)
    }

    /// Each op on its own, in order, in one transaction, with the guarded counter update
    /// (`enrolled + 1 <= capacity`): the store is the final arbiter across nodes.
    async fn commit_row_by_row(
        &self,
        ops: &[SeatOp],
        proof: &Proof,
        session: &Session,
    ) -> Result<Vec<SeatResult>, CommitError> {
        // A plain BEGIN on a connection we own, so one that is cut off is closed, never
        // pooled half-read.
        let mut conn = self.begin(session).await?;
        self.prove_leases(&mut conn, proof).await?;
        let mut results = Vec::with_capacity(ops.len());
        let mut probe = None;
        let mut events = Vec::new();
        let insert = format!(
            "{} enrollments (course_id, student_id, enrolled_at_ms) VALUES (?, ?, ?)",
            self.dialect.insert_ignore()
        );
        let recount = format!(
            "UPDATE courses SET enrolled = {}(capacity, (SELECT COUNT(*) FROM enrollments WHERE course_id = ?)) \
             WHERE id = ?",
            self.dialect.least()
        );
        let insert_place = format!(
            "{} places (course_id, student_id, kind, ord, at_ms) VALUES (?, ?, ?, ?, ?)",
            self.dialect.insert_ignore()
        );
        use Bind::{Int, Text};
        const DELETE_SEAT: &str = "DELETE FROM enrollments WHERE course_id = ? AND student_id = ?";
        const COUNT_SEAT: &str = "UPDATE courses SET enrolled = enrolled + 1 WHERE id = ? AND enrolled + 1 <= capacity";
        for op in ops {
            let (course, student) = op.key();
            let (c, s) = (Text(course.as_str()), Text(student.as_str()));
            let mut changed = true;
            let result = match op {
                SeatOp::Enroll { at, .. } => {
                    if run(&mut conn, &insert, &[c, s, Int(*at)]).await? == 0 {
                        changed = false; // already held in the store: idempotent
                        SeatResult::Applied
                    } else if run(&mut conn, COUNT_SEAT, &[c]).await? == 1 {
                        SeatResult::Applied
                    } else {
                        run(&mut conn, DELETE_SEAT, &[c, s]).await?;
                        changed = false;
                        SeatResult::Full
                    }
                }
                SeatOp::Drop { .. } => {
                    changed = run(&mut conn, DELETE_SEAT, &[c, s]).await? == 1;
                    if changed {
                        // The rows left, capped at capacity, as the load sets it: a course
                        // loaded with more rows than capacity keeps a counter of capacity,
                        // and a decrement would break the CHECK (`enrolled >= 0`) before
                        // drops bring it under capacity. This also heals a counter the
                        // fast path's decrements left below its rows on such a course.
                        run(&mut conn, &recount, &[c, c]).await?;
                    }
                    SeatResult::Applied
                }
                SeatOp::Enter { at, .. } | SeatOp::Join { at, .. } => {
                    let (kind, rank) = match op {
                        SeatOp::Join { rank, .. } => (PLACE_WAIT, *rank as i64),
                        _ => (PLACE_ENTRY, 0),
                    };
                    changed = run(&mut conn, &insert_place, &[c, s, Text(kind), Int(rank), Int(*at)]).await? == 1;
                    SeatResult::Applied
                }
                SeatOp::Withdraw { .. } | SeatOp::Leave { .. } => {
                    let kind = if matches!(op, SeatOp::Leave { .. }) {
                        PLACE_WAIT
                    } else {
                        PLACE_ENTRY
                    };
                    changed = run(&mut conn, DELETE_PLACE, &[c, s, Text(kind)]).await? == 1;
                    SeatResult::Applied
                }
                SeatOp::DropPromote { next, at, .. } => {
                    // The seat passes from one student to the next in this transaction: the
                    // counter does not move, and no instant sees it free.
                    let n = Text(next.as_str());
                    let deleted = run(&mut conn, DELETE_SEAT, &[c, s]).await?;
                    let unplaced = run(&mut conn, DELETE_PLACE, &[c, n, Text(PLACE_WAIT)]).await?;
                    if deleted != 1 || unplaced != 1 {
                        return Err(CommitError::NotCommitted(anyhow::anyhow!(
                            "{course}: drop of {student} promoting {next}: seat rows {deleted}, place rows {unplaced}; \
                             the store and memory disagree"
                        )));
                    }
                    run(&mut conn, &insert, &[c, n, Int(*at)]).await?;
                    SeatResult::Applied
                }
                SeatOp::Promote { at, .. } => {
                    if run(&mut conn, COUNT_SEAT, &[c]).await? == 1 {
                        if run(&mut conn, DELETE_PLACE, &[c, s, Text(PLACE_WAIT)]).await? != 1 {
                            return Err(CommitError::NotCommitted(anyhow::anyhow!(
                                "{course}: promoting {student}, who is not on the stored waitlist"
                            )));
                        }
                        run(&mut conn, &insert, &[c, s, Int(*at)]).await?;
                        SeatResult::Applied
                    } else {
                        changed = false;
                        SeatResult::Full
                    }
                }
            };
            if changed {
                probe = better_probe(probe, op);
                events.extend(NewEvent::of_op(op));
            }
            results.push(result);
        }
        if let Some(rows) = self.event_rows(&events) {
            rows.write(conn.get()).await.map_err(not_committed)?;
        }
        conn.commit(session, probe, Settled::Seats(results.clone())).await?;
        Ok(results)
    }

    /// After COMMIT went unanswered: makes sure the old session can no longer commit.
    ///
    /// Reading back at once could run before a COMMIT that is still on its way lands (the
    /// first session may be alive behind a proxy that cut only our side), and report
    /// "nothing recorded" for a commit that lands a moment later. So on MySQL, `KILL` the
    /// session and wait until it has left the process list: its COMMIT has then either
    /// applied or never will. On SQLite (one process, see `single_writer`), take the
    /// writer lock with `BEGIN IMMEDIATE`: it is held until any COMMIT in progress has
    /// finished. Unbounded here; the caller bounds it.
    pub async fn fence(&self, session: &Session) -> anyhow::Result<()> {
        let mut conn = OpenTransaction::new(self.pool.acquire().await?);
        match (self.dialect, session.id.get()) {
            (Dialect::Mysql, Some(id)) => fence_session(conn.get(), id).await?,
            (Dialect::Mysql, None) => bail!("a MySQL transaction reached COMMIT without its session id"),
            (Dialect::Sqlite, _) => {
                sqlx::query("BEGIN IMMEDIATE").execute(conn.get()).await?;
                sqlx::query("ROLLBACK").execute(conn.get()).await?;
            }
        }
        conn.ended();
        Ok(())
    }

    /// Whether what `probe` names is as its transaction, committed, left it.
    pub async fn read_back(&self, probe: &Probe) -> anyhow::Result<bool> {
        Ok(match probe {
            Probe::Seat {
                course,
                student,
                present_if_committed,
            } => self.seat_present(course, student).await? == *present_if_committed,
            Probe::Course {
                course,
                version_if_committed,
            } => {
                let row = sqlx::query("SELECT version FROM courses WHERE id = ?")
                    .bind(course.as_str())
                    .fetch_optional(&self.pool)
                    .await?;
                match row {
                    Some(row) => row.try_get::<i64, _>(0)? as u64 == *version_if_committed,
                    None => false,
                }
            }
            Probe::Place {
                course,
                student,
                present_if_committed,
            } => {
                let row = sqlx::query("SELECT 1 FROM places WHERE course_id = ? AND student_id = ?")
                    .bind(course.as_str())
                    .bind(student.as_str())
                    .fetch_optional(&self.pool)
                    .await?;
                row.is_some() == *present_if_committed
            }
            Probe::Draw { course } => sqlx::query("SELECT 1 FROM draws WHERE course_id = ?")
                .bind(course.as_str())
                .fetch_optional(&self.pool)
                .await?
                .is_some(),
        })
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
    pub async fn put_course(
        &self,
        id: &CourseId,
        spec: &CourseSpec,
        promote: &[(StudentId, UnixMs)],
        proof: &Proof,
        session: &Session,
    ) -> Result<PutResult, CommitError> {
        let mut conn = self.begin(session).await?;
        self.prove_leases(&mut conn, proof).await?;
        let tx = conn.get();
        let capacity = i64::from(spec.capacity);
        let updated = sqlx::query(
            "UPDATE courses SET title = ?, capacity = ?, opens_at_ms = ?, closes_at_ms = ?, draw_at_ms = ?, \
             waitlist_max = ?, version = version + 1 WHERE id = ? AND enrolled <= ?",
        )
        .bind(spec.title.as_str())
        .bind(capacity)
        .bind(spec.opens_at)
        .bind(spec.closes_at)
        .bind(spec.draw_at)
        .bind(i64::from(spec.waitlist_max))
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
                sqlx::query("ROLLBACK").execute(&mut *tx).await.map_err(not_committed)?;
                conn.ended();
                return Ok(PutResult::BelowEnrolled);
            }
            sqlx::query(
                "INSERT INTO courses (id, title, capacity, enrolled, opens_at_ms, closes_at_ms, draw_at_ms, \
                 waitlist_max, version) VALUES (?, ?, ?, 0, ?, ?, ?, ?, 1)",
            )
            .bind(id.as_str())
            .bind(spec.title.as_str())
            .bind(capacity)
            .bind(spec.opens_at)
            .bind(spec.closes_at)
            .bind(spec.draw_at)
            .bind(i64::from(spec.waitlist_max))
            .execute(&mut *tx)
            .await
            .map_err(not_committed)?;
            PutResult::Created { version: 1 }
        };
        let version = match result {
            PutResult::Created { version } | PutResult::Updated { version } => version,
            PutResult::BelowEnrolled => unreachable!("returned above"),
        };
        let changed = NewEvent {
            kind: EventKind::CourseChanged,
            course: id.clone(),
            student: None,
            version: Some(version),
            capacity: Some(u64::from(spec.capacity)),
        };
        let mut events = vec![changed];
        // A capacity raise gives its seats to the heads of the waitlist in this commit.
        for (student, at) in promote {
            let unplaced = sqlx::query(DELETE_PLACE)
                .bind(id.as_str())
                .bind(student.as_str())
                .bind(PLACE_WAIT)
                .execute(&mut *tx)
                .await
                .map_err(not_committed)?
                .rows_affected();
            let inserted =
                sqlx::query("INSERT INTO enrollments (course_id, student_id, enrolled_at_ms) VALUES (?, ?, ?)")
                    .bind(id.as_str())
                    .bind(student.as_str())
                    .bind(*at)
                    .execute(&mut *tx)
                    .await
                    .map_err(not_committed)?
                    .rows_affected();
            if unplaced != 1 || inserted != 1 {
                return Err(CommitError::NotCommitted(anyhow::anyhow!(
                    "{id}: promoting {student}: place rows {unplaced}, seat rows {inserted}; the store and memory disagree"
                )));
            }
            events.push(NewEvent::of_student(EventKind::Promoted, id, student));
        }
        if !promote.is_empty() {
            let n = promote.len();
            let counted = sqlx::query(&format!(
                "UPDATE courses SET enrolled = enrolled + {n} WHERE id = ? AND enrolled + {n} <= capacity"
            ))
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(not_committed)?
            .rows_affected();
            if counted != 1 {
                return Err(CommitError::NotCommitted(anyhow::anyhow!(
                    "{id}: {n} promotions do not fit the stored capacity"
                )));
            }
        }
        if let Some(rows) = self.event_rows(&events) {
            rows.write(&mut *tx).await.map_err(not_committed)?;
        }
        let probe = Probe::Course {
            course: id.clone(),
            version_if_committed: version,
        };
        conn.commit(session, Some(probe), Settled::Put(result)).await?;
        Ok(result)
    }

    /// Up to `limit` courses with ids after `after`, in id order, as committed (cluster
    /// mode's catalog: every node's courses).
    pub async fn list_courses(&self, after: Option<&CourseId>, limit: u32) -> anyhow::Result<Vec<StoredCourse>> {
        let rows = sqlx::query(
            "SELECT id, title, capacity, opens_at_ms, closes_at_ms, version, enrolled, draw_at_ms, waitlist_max, \
             (SELECT COUNT(*) FROM places p WHERE p.course_id = courses.id AND p.kind = 'wait') \
             FROM courses WHERE id > ? ORDER BY id LIMIT ?",
        )
        .bind(after.map_or("", CourseId::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get(0)?;
                let capacity: i64 = row.try_get(2)?;
                Ok(StoredCourse {
                    id: CourseId::parse(&id).with_context(|| format!("bad course id in store: {id:?}"))?,
                    spec: CourseSpec {
                        title: row.try_get(1)?,
                        capacity: u32::try_from(capacity).context("capacity out of range")?,
                        opens_at: row.try_get(3)?,
                        closes_at: row.try_get(4)?,
                        draw_at: row.try_get(7)?,
                        waitlist_max: u32::try_from(row.try_get::<i64, _>(8)?).context("waitlist_max out of range")?,
                    },
                    version: row.try_get::<i64, _>(5)? as u64,
                    enrolled: u32::try_from(row.try_get::<i64, _>(6)?).context("seat count out of range")?,
                    waitlisted: u32::try_from(row.try_get::<i64, _>(9)?).context("waitlist length out of range")?,
                })
            })
            .collect()
    }

    /// A student's committed seats and places, in course order (cluster mode: every
    /// node's).
    pub async fn enrollments_of(&self, student: &StudentId) -> anyhow::Result<Vec<(CourseId, Standing)>> {
        let parse = |id: String| CourseId::parse(&id).with_context(|| format!("bad course id in store: {id:?}"));
        let rows = sqlx::query("SELECT course_id, enrolled_at_ms FROM enrollments WHERE student_id = ?")
            .bind(student.as_str())
            .fetch_all(&self.pool)
            .await?;
        let mut all = Vec::with_capacity(rows.len());
        for row in &rows {
            all.push((parse(row.try_get(0)?)?, Standing::Enrolled { at: row.try_get(1)? }));
        }
        let rows = sqlx::query(
            "SELECT p.course_id, p.kind, c.draw_at_ms, \
             (SELECT COUNT(*) FROM places q WHERE q.course_id = p.course_id AND q.kind = 'wait' AND q.ord <= p.ord) \
             FROM places p JOIN courses c ON c.id = p.course_id WHERE p.student_id = ?",
        )
        .bind(student.as_str())
        .fetch_all(&self.pool)
        .await?;
        for row in &rows {
            let kind: String = row.try_get(1)?;
            let standing = if kind == PLACE_ENTRY {
                Standing::Entered {
                    draw_at: row.try_get(2)?,
                }
            } else {
                Standing::Waitlisted {
                    position: row.try_get::<i64, _>(3)? as u32,
                }
            };
            all.push((parse(row.try_get(0)?)?, standing));
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }

    /// A course's draw record, if its draw ran.
    pub async fn read_draw(&self, course: &CourseId) -> anyhow::Result<Option<DrawRecord>> {
        let row = sqlx::query(
            "SELECT drawn_at_ms, seed, seats, waitlisted, first_rank, order_list FROM draws WHERE course_id = ?",
        )
        .bind(course.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let order = super::feed::text_column(&row, 5).context("a draw's order")?;
        let order = order
            .split('\n')
            .filter(|s| !s.is_empty())
            .map(|s| StudentId::parse(s).with_context(|| format!("bad student id in a draw: {s:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Some(DrawRecord {
            drawn_at: row.try_get(0)?,
            seed: row.try_get(1)?,
            order,
            seats: row.try_get::<i64, _>(2)? as u32,
            waitlisted: row.try_get::<i64, _>(3)? as u32,
            first_rank: row.try_get::<i64, _>(4)? as u64,
        }))
    }

    /// Commits a draw in one transaction: its record first (the primary key refuses a
    /// second draw of the course), then the entries removed, the winners' seats, the
    /// waitlist places in drawn order, the seat counter (guarded by capacity) and the
    /// events. All or nothing, so a crash before COMMIT leaves the entries as they were
    /// and nothing of the draw anywhere: it runs again. Statements are multi-row, at most
    /// [`DRAW_ROWS_PER_STATEMENT`] rows each.
    pub async fn draw(
        &self,
        course: &CourseId,
        record: &DrawRecord,
        proof: &Proof,
        session: &Session,
    ) -> Result<(), CommitError> {
        use std::fmt::Write;
        let w = "writing to a String";
        if !(inlinable(course.as_str()) && record.order.iter().all(|s| inlinable(s.as_str()))) {
            return Err(CommitError::NotCommitted(anyhow::anyhow!("ids that cannot be inlined")));
        }
        let mut conn = self.begin(session).await?;
        self.prove_leases(&mut conn, proof).await?;
        let mut order_list = String::with_capacity(record.order.len() * 12);
        for s in &record.order {
            order_list.push_str(s.as_str());
            order_list.push('\n');
        }
        sqlx::query(
            "INSERT INTO draws (course_id, drawn_at_ms, seed, entries, seats, waitlisted, first_rank, order_list) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(course.as_str())
        .bind(record.drawn_at)
        .bind(record.seed.as_str())
        .bind(record.order.len() as i64)
        .bind(i64::from(record.seats))
        .bind(i64::from(record.waitlisted))
        .bind(record.first_rank as i64)
        .bind(order_list)
        .execute(conn.get())
        .await
        .map_err(not_committed)?;
        let removed = sqlx::query("DELETE FROM places WHERE course_id = ? AND kind = 'entry'")
            .bind(course.as_str())
            .execute(conn.get())
            .await
            .map_err(not_committed)?
            .rows_affected();
        if removed != record.order.len() as u64 {
            return Err(CommitError::NotCommitted(anyhow::anyhow!(
                "draw of {course}: {removed} entries in the store, {} drawn",
                record.order.len()
            )));
        }
        let seats = &record.order[..record.seats as usize];
        let waits = &record.order[record.seats as usize..(record.seats + record.waitlisted) as usize];
        for chunk in seats.chunks(DRAW_ROWS_PER_STATEMENT) {
            let mut sql = String::from("INSERT INTO enrollments (course_id, student_id, enrolled_at_ms) VALUES ");
            for (i, s) in chunk.iter().enumerate() {
                let sep = if i == 0 { "" } else { "," };
                write!(sql, "{sep}('{course}','{s}',{})", record.drawn_at).expect(w);
            }
            changed_exactly(&mut conn, &sql, chunk.len()).await?;
        }
        if !seats.is_empty() {
            let n = seats.len();
            changed_exactly(
                &mut conn,
                &format!(
                    "UPDATE courses SET enrolled = enrolled + {n} WHERE id = '{course}' AND enrolled + {n} <= capacity"
                ),
                1,
            )
            .await?;
        }
        for (c, chunk) in waits.chunks(DRAW_ROWS_PER_STATEMENT).enumerate() {
            let mut sql = String::from("INSERT INTO places (course_id, student_id, kind, ord, at_ms) VALUES ");
            for (i, s) in chunk.iter().enumerate() {
                let rank = record.first_rank + (c * DRAW_ROWS_PER_STATEMENT + i) as u64;
                let sep = if i == 0 { "" } else { "," };
                write!(sql, "{sep}('{course}','{s}','wait',{rank},{})", record.drawn_at).expect(w);
            }
            changed_exactly(&mut conn, &sql, chunk.len()).await?;
        }
        let mut events = vec![NewEvent::of_course(EventKind::Drawn, course)];
        for (i, s) in record.order.iter().enumerate() {
            let kind = match i as u32 {
                i if i < record.seats => EventKind::Enrolled,
                i if i < record.seats + record.waitlisted => EventKind::Waitlisted,
                _ => EventKind::NotSelected,
            };
            events.push(NewEvent::of_student(kind, course, s));
        }
        for chunk in events.chunks(DRAW_ROWS_PER_STATEMENT) {
            if let Some(rows) = self.event_rows(chunk) {
                rows.write(conn.get()).await.map_err(not_committed)?;
            }
        }
        conn.commit(session, Some(Probe::Draw { course: course.clone() }), Settled::Draw)
            .await
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

/// The probe of a batch, given the next op that changed a row: the first row the batch
/// *inserts* if there is one. A row the batch deletes is a weaker witness: after a
/// takeover the successor may delete the same row, and a read-back would then take a
/// fenced batch for applied.
pub fn better_probe(current: Option<Probe>, op: &SeatOp) -> Option<Probe> {
    let inserts = |p: &Probe| {
        matches!(
            p,
            Probe::Seat {
                present_if_committed: true,
                ..
            } | Probe::Place {
                present_if_committed: true,
                ..
            }
        )
    };
    match current {
        Some(p) if inserts(&p) => Some(p),
        Some(p) => {
            let next = probe_of(op);
            Some(if inserts(&next) { next } else { p })
        }
        None => Some(probe_of(op)),
    }
}

/// What tells, after an unanswered COMMIT, whether an op that changed a row applied.
pub fn probe_of(op: &SeatOp) -> Probe {
    let (course, student) = op.key();
    let (course, student) = (course.clone(), student.clone());
    match op {
        SeatOp::Enroll { .. } | SeatOp::Promote { .. } => Probe::Seat {
            course,
            student,
            present_if_committed: true,
        },
        SeatOp::Drop { .. } | SeatOp::DropPromote { .. } => Probe::Seat {
            course,
            student,
            present_if_committed: false,
        },
        SeatOp::Enter { .. } | SeatOp::Join { .. } => Probe::Place {
            course,
            student,
            present_if_committed: true,
        },
        SeatOp::Withdraw { .. } | SeatOp::Leave { .. } => Probe::Place {
            course,
            student,
            present_if_committed: false,
        },
    }
}

/// Seconds one of our MariaDB sessions may sit idle inside a transaction before the server
/// ends the session and rolls the transaction back (`idle_transaction_timeout`).
///
/// Why: enrolld never waits between two statements of a transaction beyond its own few
/// microseconds of work, so only a process that is paused (SIGSTOP, a frozen VM) or starved
/// leaves one open. Its locks would stay with it: the fence row's share lock, taken by every
/// commit until its COMMIT, would block the process taking its leases over (which bumps
/// that row) until MariaDB's lock wait timeout (50 s) failed the takeover. A live process
/// that is cut off this way loses one batch, answered like any failed commit. Kept below a
/// lease's usual length, so a successor's wait is the lease, not this.
pub const IDLE_IN_TRANSACTION_SECS_MAX: u32 = 5;

/// Sets [`IDLE_IN_TRANSACTION_SECS_MAX`] on a new session. MySQL has no such variable
/// (ER_UNKNOWN_SYSTEM_VARIABLE): there a paused process's locks last until its session
/// ends, and the takeover waits or fails as described above.
async fn bound_idle_transactions(conn: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
    let set = format!("SET SESSION idle_transaction_timeout = {IDLE_IN_TRANSACTION_SECS_MAX}");
    match sqlx::query(&set).execute(&mut *conn).await {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.message().contains("Unknown system variable") => Ok(()),
        Err(e) => Err(e),
    }
}

/// This connection's MySQL session id.
async fn connection_id(conn: &mut sqlx::AnyConnection) -> Result<u64, sqlx::Error> {
    let row = sqlx::query("SELECT CONNECTION_ID()").fetch_one(conn).await?;
    Ok(row.try_get::<i64, _>(0)? as u64)
}

/// How often the process list is asked whether a killed session has gone.
const FENCE_POLL_MS: u64 = 10;

/// Ends MySQL session `id` and returns once it has left the process list, so nothing it
/// was doing (a COMMIT included) can still apply. Unbounded here; the caller bounds it.
async fn fence_session(conn: &mut sqlx::AnyConnection, id: u64) -> anyhow::Result<()> {
    // `KILL` of a session that already ended is ER_NO_SUCH_THREAD (1094): fine.
    if let Err(e) = sqlx::query(&format!("KILL CONNECTION {id}")).execute(&mut *conn).await {
        let gone = matches!(&e, sqlx::Error::Database(d) if d.code().as_deref() == Some("HY000") || d.message().contains("Unknown thread"));
        if !gone {
            return Err(e).context("killing the session of an unanswered COMMIT");
        }
    }
    loop {
        let row = sqlx::query("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = ?")
            .bind(id as i64)
            .fetch_one(&mut *conn)
            .await?;
        if row.try_get::<i64, _>(0)? == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(FENCE_POLL_MS)).await;
    }
}

/// Net change of `enrolled` per course, in first-seen order, zero deltas left out.
fn course_deltas(ops: &[SeatOp]) -> Vec<(&CourseId, i64)> {
    let mut deltas: Vec<(&CourseId, i64)> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for op in ops {
        let (course, _) = op.key();
        let d = match op {
            SeatOp::Enroll { .. } | SeatOp::Promote { .. } => 1,
            SeatOp::Drop { .. } => -1,
            _ => 0,
        };
        let i = *index.entry(course).or_insert_with(|| {
            deltas.push((course, 0));
            deltas.len() - 1
        });
        deltas[i].1 += d;
    }
    deltas.retain(|(_, d)| *d != 0);
    deltas
}

/// The statement that proves a transaction's leases (MySQL): it reads this node's fence
/// row with a shared lock, held to COMMIT, and returns its generation, which must be the
/// one the node read its leases at. Every takeover of one of the node's partitions and
/// every release bumps that generation in its own transaction, so such a change either
/// waits for this transaction to end or has already moved the generation on, and the
/// transaction then rolls back: `CommitError::Fenced`. One point read per transaction,
/// however many partitions it writes (a per-partition check cost 0.3-0.65 ms a batch of
/// 30 on this machine; this costs about 0.03 ms):
///
/// ```sql
/// SELECT gen FROM fences WHERE node = 'n1' LOCK IN SHARE MODE
/// ```
struct FenceCheck {
    sql: String,
    /// The generation the statement must return.
    expected: i64,
}

fn fence_sql(owner: &str, gen: u64) -> FenceCheck {
    FenceCheck {
        sql: format!("SELECT gen FROM fences WHERE node = '{owner}' LOCK IN SHARE MODE"),
        expected: gen as i64,
    }
}

/// What one statement of a [`OneTrip`] script must give.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// `SELECT CONNECTION_ID()`: one row, the session's id.
    SessionId,
    /// The fence: one row, this count.
    Fence(i64),
    /// A change of exactly this many rows.
    Changed(u64),
}

/// How a [`OneTrip`] script went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ran {
    /// Every statement as expected: COMMIT may follow.
    AsExpected,
    /// A statement changed other rows than expected, or the server refused one (the
    /// schema's CHECK on an overflowing course): roll back and go row by row.
    Refused,
    /// The leases are not this node's any more: roll back; nothing may be written.
    Fenced,
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
    /// What each statement must give, in order.
    expects: Vec<Expect>,
}

impl OneTrip {
    fn of(dialect: Dialect, ops: &[SeatOp], fence: Option<FenceCheck>) -> Option<OneTrip> {
        use std::fmt::Write;
        if !ops.iter().all(|op| {
            let (c, s) = op.key();
            let fast = matches!(
                op,
                SeatOp::Enroll { .. } | SeatOp::Drop { .. } | SeatOp::Enter { .. } | SeatOp::Withdraw { .. }
            );
            fast && inlinable(c.as_str()) && inlinable(s.as_str())
        }) {
            return None;
        }
        let mut sql = String::with_capacity(192 + ops.len() * 64);
        let mut expects = Vec::with_capacity(6);
        if dialect == Dialect::Mysql {
            // The session's id, first: if the COMMIT that follows goes unanswered, the
            // read-back ends this session before it looks (see `Store::read_back`).
            sql.push_str("SELECT CONNECTION_ID();\n");
            expects.push(Expect::SessionId);
        }
        if let Some(fence) = fence {
            // Before any change: the shared locks are taken first, in partition order.
            sql.push_str(&fence.sql);
            sql.push_str(";\n");
            expects.push(Expect::Fence(fence.expected));
        }
        let w = "writing to a String";
        let insert = dialect.insert_ignore();
        let key = |sql: &mut String, (course, student): (&CourseId, &StudentId)| {
            write!(sql, "(course_id = '{course}' AND student_id = '{student}')").expect(w);
        };
        let drops = ops
            .iter()
            .filter(|op| matches!(op, SeatOp::Drop { .. }))
            .map(SeatOp::key);
        push_statement(
            &mut sql,
            &mut expects,
            "DELETE FROM enrollments WHERE ",
            " OR ",
            ";\n",
            drops,
            key,
        );
        let enrolls = ops.iter().filter_map(|op| match op {
            SeatOp::Enroll { course, student, at } => Some((course, student, *at)),
            _ => None,
        });
        push_statement(
            &mut sql,
            &mut expects,
            &format!("{insert} enrollments (course_id, student_id, enrolled_at_ms) VALUES "),
            ",",
            ";\n",
            enrolls,
            |sql, (course, student, at)| write!(sql, "('{course}','{student}',{at})").expect(w),
        );
        // A draw's entries: one multi-row statement each way, like the seats.
        let withdrawals = ops
            .iter()
            .filter(|op| matches!(op, SeatOp::Withdraw { .. }))
            .map(SeatOp::key);
        let head = "DELETE FROM places WHERE kind = 'entry' AND (";
        push_statement(&mut sql, &mut expects, head, " OR ", ");\n", withdrawals, key);
        let entries = ops.iter().filter_map(|op| match op {
            SeatOp::Enter { course, student, at } => Some((course, student, *at)),
            _ => None,
        });
        push_statement(
            &mut sql,
            &mut expects,
            &format!("{insert} places (course_id, student_id, kind, ord, at_ms) VALUES "),
            ",",
            ";\n",
            entries,
            |sql, (course, student, at)| write!(sql, "('{course}','{student}','entry',0,{at})").expect(w),
        );
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
            expects.push(Expect::Changed(deltas.len() as u64));
        }
        Some(OneTrip { sql, expects })
    }

    /// Adds the feed's statements (numbering, then the events) to the script.
    fn append(&mut self, rows: &EventRows) {
        if !self.sql.is_empty() && !self.sql.ends_with('\n') {
            self.sql.push_str(";\n");
        }
        self.sql.push_str(&rows.sql);
        self.expects.extend(rows.expected.iter().map(|&n| Expect::Changed(n)));
    }

    async fn run(&self, conn: &mut sqlx::AnyConnection, session: &Session) -> Result<Ran, sqlx::Error> {
        use futures_util::TryStreamExt;
        use sqlx::Either;
        let mut results = sqlx::raw_sql(&self.sql).fetch_many(conn);
        // The statement whose results come next.
        let mut at = 0;
        let mut as_expected = true;
        // The fence's row as read: None until it is (no row at all is fenced out too).
        let mut fence_holds: Option<bool> = None;
        let fences = self.expects.iter().any(|e| matches!(e, Expect::Fence(_)));
        let fenced = |holds: Option<bool>| fences && holds != Some(true);
        loop {
            match results.try_next().await {
                Ok(Some(Either::Right(row))) => match self.expects.get(at) {
                    Some(Expect::SessionId) => session.id.set(Some(row.try_get::<i64, _>(0)? as u64)),
                    Some(Expect::Fence(n)) => fence_holds = Some(row.try_get::<i64, _>(0)? == *n),
                    _ => as_expected = false,
                },
                // A SELECT's own end-of-results, or a change's count.
                Ok(Some(Either::Left(done))) => {
                    if let Some(Expect::Changed(n)) = self.expects.get(at) {
                        as_expected &= done.rows_affected() == *n;
                    }
                    at += 1;
                }
                Ok(None) => {
                    let complete = at == self.expects.len()
                        && (session.id.get().is_some() || !self.expects.contains(&Expect::SessionId));
                    return Ok(match () {
                        () if fenced(fence_holds) => Ran::Fenced,
                        () if as_expected && complete => Ran::AsExpected,
                        () => Ran::Refused,
                    });
                }
                Err(sqlx::Error::Database(e)) => {
                    tracing::debug!(error = %e, statement = at, "fast path refused by the store");
                    return Ok(if fences && fence_holds == Some(false) {
                        Ran::Fenced
                    } else {
                        Ran::Refused
                    });
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
pub(super) struct OpenTransaction {
    conn: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
    ended: bool,
}

impl OpenTransaction {
    pub(super) fn new(conn: sqlx::pool::PoolConnection<sqlx::Any>) -> Self {
        OpenTransaction {
            conn: Some(conn),
            ended: false,
        }
    }
    pub(super) fn get(&mut self) -> &mut sqlx::AnyConnection {
        self.conn.as_mut().expect("present until drop")
    }
    /// Sends COMMIT, first marking `session` with how to tell whether it applied, so a
    /// COMMIT that goes unanswered (or is cut off by the caller's bound) is settled, never
    /// guessed.
    async fn commit(
        mut self,
        session: &Session,
        probe: Option<Probe>,
        if_committed: Settled,
    ) -> Result<(), CommitError> {
        session.commit_sent(probe, if_committed);
        sqlx::query("COMMIT")
            .execute(self.get())
            .await
            .map_err(|e| CommitError::Unknown(e.into()))?;
        self.ended();
        Ok(())
    }

    pub(super) fn ended(&mut self) {
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

/// Appends one multi-row statement to a one-trip script: `head`, each item as `write`
/// puts it, joined by `sep`, then `tail`; the statement must change one row per item.
/// Nothing when there are no items.
fn push_statement<T>(
    sql: &mut String,
    expects: &mut Vec<Expect>,
    head: &str,
    sep: &str,
    tail: &str,
    items: impl Iterator<Item = T>,
    mut write: impl FnMut(&mut String, T),
) {
    let mut n = 0;
    for item in items {
        sql.push_str(if n == 0 { head } else { sep });
        write(sql, item);
        n += 1;
    }
    if n > 0 {
        sql.push_str(tail);
        expects.push(Expect::Changed(n));
    }
}

/// A value bound to a row-by-row statement.
#[derive(Clone, Copy)]
enum Bind<'a> {
    Text(&'a str),
    Int(i64),
}

/// Runs one bound statement in the open transaction; the rows it changed.
async fn run(conn: &mut OpenTransaction, sql: &str, binds: &[Bind<'_>]) -> Result<u64, CommitError> {
    let mut query = sqlx::query(sql);
    for b in binds {
        query = match *b {
            Bind::Text(t) => query.bind(t),
            Bind::Int(i) => query.bind(i),
        };
    }
    Ok(query.execute(conn.get()).await.map_err(not_committed)?.rows_affected())
}

/// Removes one place of a kind: (course, student, kind).
const DELETE_PLACE: &str = "DELETE FROM places WHERE course_id = ? AND student_id = ? AND kind = ?";

/// Rows one statement of a draw writes at most.
pub const DRAW_ROWS_PER_STATEMENT: usize = 1_000;

/// Whether an id may be inlined into SQL text: only `[A-Za-z0-9_.-]`, which every valid
/// `CourseId` and `StudentId` is (checked again wherever SQL is written with it).
fn inlinable(id: &str) -> bool {
    id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Runs one statement in the open transaction; anything but exactly `n` rows changed is
/// a disagreement between memory and the store, and the transaction is not committed.
async fn changed_exactly(conn: &mut OpenTransaction, sql: &str, n: usize) -> Result<(), CommitError> {
    let changed = sqlx::query(sql)
        .execute(conn.get())
        .await
        .map_err(not_committed)?
        .rows_affected();
    if changed != n as u64 {
        return Err(CommitError::NotCommitted(anyhow::anyhow!(
            "{changed} rows changed, {n} expected: {}",
            sql.chars().take(120).collect::<String>()
        )));
    }
    Ok(())
}

fn not_committed(e: impl Into<anyhow::Error>) -> CommitError {
    CommitError::NotCommitted(e.into())
}

/// Whether the store rolled the transaction back as a deadlock victim (InnoDB's 1213,
/// SQLSTATE 40001): nothing of it applied, and running it again is the remedy.
pub fn is_deadlock(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(db)) => {
            db.code().as_deref() == Some("40001") || db.message().contains("Deadlock found")
        }
        _ => false,
    }
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

    /// A store at `url` holding course `F-1` (capacity 5), and a student for it.
    /// A database of its own on the test MariaDB (`ENROLLD_TEST_MYSQL`), made anew.
    struct Scratch {
        admin: AnyPool,
        name: String,
        url: String,
    }

    impl Scratch {
        async fn new(tag: &str) -> Scratch {
            let base =
                std::env::var("ENROLLD_TEST_MYSQL").unwrap_or_else(|_| "mysql://enrolld:enrolld@127.0.0.1:3306".into());
            let name = format!("enrolld_unit_{tag}_{}", std::process::id());
            sqlx::any::install_default_drivers();
            let admin = AnyPool::connect(&format!("{base}/enrolld"))
                .await
                .expect("MariaDB for tests");
            sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name}"))
                .execute(&admin)
                .await
                .unwrap();
            let url = format!("{base}/{name}");
            Scratch { admin, name, url }
        }

        async fn drop(self) {
            sqlx::raw_sql(&format!("DROP DATABASE {}", self.name))
                .execute(&self.admin)
                .await
                .unwrap();
        }
    }

    async fn store_with_a_course(url: &str) -> (Store, CourseId, StudentId) {
        let opts = StoreOptions {
            pool_connections_max: 2,
            acquire_timeout_ms: 1_000,
            events: true,
        };
        let store = Store::open(url, &opts).await.unwrap();
        let (c, s) = ids("F-1", "s1");
        let spec = CourseSpec::plain("fast", 5, None, None);
        store
            .put_course(&c, &spec, &[], &Proof::default(), &Session::default())
            .await
            .unwrap();
        (store, c, s)
    }

    /// The fast path really commits on SQLite (a refusal would fall back to the row-by-row
    /// path and still give right answers, hiding a broken script).
    #[tokio::test]
    async fn sqlite_takes_the_fast_path_and_refuses_a_duplicate() {
        let path = std::env::temp_dir().join(format!("enrolld-fast-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let (store, c, s) = store_with_a_course(&format!("sqlite://{}", path.display())).await;
        let op = SeatOp::Enroll {
            course: c.clone(),
            student: s,
            at: 1,
        };
        assert!(
            store
                .try_fast(std::slice::from_ref(&op), &Proof::default(), &Session::default())
                .await
                .unwrap(),
            "committed fast"
        );
        assert!(
            !store
                .try_fast(&[op], &Proof::default(), &Session::default())
                .await
                .unwrap(),
            "a stored row refuses the batch"
        );
        store.close().await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    /// On MariaDB too the fast path commits (its script opens with the session id, which
    /// must not be mistaken for a change count), and the session id is captured.
    #[tokio::test]
    async fn mysql_takes_the_fast_path_and_knows_its_session() {
        let scratch = Scratch::new("fast").await;
        let (store, c, s) = store_with_a_course(&scratch.url).await;
        store
            .check_guarantees()
            .await
            .expect("MariaDB enforces CHECK and flushes at commit");
        let op = SeatOp::Enroll {
            course: c.clone(),
            student: s.clone(),
            at: 1,
        };
        let session = Session::default();
        assert!(
            store
                .try_fast(std::slice::from_ref(&op), &Proof::default(), &session)
                .await
                .unwrap(),
            "committed fast"
        );
        assert!(session.id.get().is_some(), "the session id was read");
        assert!(session.committing.borrow().is_some(), "COMMIT was marked as sent");
        // A fence after the fact ends a session that already ended; the row is there.
        store.fence(&session).await.unwrap();
        assert!(store.read_back(&probe_of(&op)).await.unwrap());
        store.close().await;
        scratch.drop().await;
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
        let script = OneTrip::of(Dialect::Mysql, &ops, None).expect("valid ids inline");
        assert_eq!(
            script.sql,
            "SELECT CONNECTION_ID();\n\
             DELETE FROM enrollments WHERE (course_id = 'A-1' AND student_id = 's-2');\n\
             INSERT IGNORE INTO enrollments (course_id, student_id, enrolled_at_ms) VALUES ('A-1','s.1',17),('B_2','s.1',18);\n\
             UPDATE courses SET enrolled = enrolled + CASE id WHEN 'B_2' THEN 1 END WHERE id IN ('B_2')"
        );
        // A's drop and enrollment cancel out: only B's counter moves.
        use Expect::{Changed, SessionId};
        assert_eq!(script.expects, vec![SessionId, Changed(1), Changed(2), Changed(1)]);
        let only_enroll = [SeatOp::Enroll {
            course: b,
            student: s2,
            at: 1,
        }];
        let script = OneTrip::of(Dialect::Sqlite, &only_enroll, None).unwrap();
        assert!(script.sql.starts_with("INSERT OR IGNORE INTO") && !script.sql.contains("DELETE"));
        assert_eq!(script.expects, vec![Changed(1), Changed(1)]);
    }

    #[test]
    fn the_fence_is_one_point_read_before_any_change() {
        let fence = fence_sql("n-1", 7);
        assert_eq!(
            fence.sql,
            "SELECT gen FROM fences WHERE node = 'n-1' LOCK IN SHARE MODE"
        );
        assert_eq!(fence.expected, 7);
        let (a, s1) = ids("A-1", "s.1");
        let op = SeatOp::Enroll {
            course: a,
            student: s1,
            at: 1,
        };
        let script = OneTrip::of(Dialect::Mysql, &[op], Some(fence)).unwrap();
        assert_eq!(
            script.expects[..2],
            [Expect::SessionId, Expect::Fence(7)],
            "the fence comes before any change"
        );
    }

    /// The fence on MariaDB: a batch commits under the leases it proves, and is refused,
    /// with nothing written, once another node's takeover moved this node's fence on (the
    /// takeover statement itself, `take_lapsed`, as another node runs it).
    #[tokio::test]
    async fn mysql_commits_only_under_the_leases_it_proves() {
        use crate::persist::lease::NodeInfo;
        let scratch = Scratch::new("fence").await;
        let (mut store, c, _) = store_with_a_course(&scratch.url).await;
        let node = NodeInfo::solo("127.0.0.1:1", Duration::from_millis(300));
        crate::persist::lease::take_all(&store, &node).await.unwrap();
        let (gen, leases) = store.fence_state(&node.id).await.unwrap();
        assert_eq!(leases.len(), crate::partition::PARTITIONS as usize);
        store.fence_as(&node.id);
        let part = crate::partition::partition_of(c.as_str());
        let stored: i64 = sqlx::query(&format!("SELECT part FROM courses WHERE id = '{c}'"))
            .fetch_one(&store.pool)
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(stored as u32, part.0, "the store computes partitions as enrolld does");
        let lease = *leases.iter().find(|l| l.partition == part).unwrap();
        let proof = Proof {
            gen,
            leases: vec![lease],
        };
        let enroll = |s: &str| SeatOp::Enroll {
            course: c.clone(),
            student: StudentId::parse(s).unwrap(),
            at: 1,
        };
        let ok = store.commit_seats(&[enroll("a")], &proof, &Session::default()).await;
        assert_eq!(ok.unwrap(), vec![SeatResult::Applied]);
        // This node's heartbeat lapses, and another node takes the partition over.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let other = NodeInfo {
            id: "other".into(),
            incarnation: 1,
            advertise: "127.0.0.1:2".into(),
            lease: Duration::from_secs(3),
        };
        store.register(&other).await.unwrap();
        let taken = store.take_lapsed(&other, Some(&[part])).await.unwrap();
        assert_eq!(taken.len(), 1, "the other node took the lapsed partition");
        let fenced = store.commit_seats(&[enroll("b")], &proof, &Session::default()).await;
        assert!(matches!(fenced, Err(CommitError::Fenced)), "{fenced:?}");
        // The row-by-row path proves the lease too.
        let fenced = store
            .commit_row_by_row(&[enroll("b")], &proof, &Session::default())
            .await;
        assert!(matches!(fenced, Err(CommitError::Fenced)), "{fenced:?}");
        let fenced = store
            .put_course(
                &c,
                &CourseSpec::plain("changed", 9, None, None),
                &[],
                &proof,
                &Session::default(),
            )
            .await;
        assert!(matches!(fenced, Err(CommitError::Fenced)), "{fenced:?}");
        assert_eq!(
            store.roster(&c).await.unwrap(),
            vec!["a".to_string()],
            "nothing fenced was written"
        );
        // The node learns its new generation and that the partition is gone.
        let (gen_after, left) = store.fence_state(&node.id).await.unwrap();
        assert_eq!(gen_after, gen + 1);
        assert!(!left.contains(&lease) && left.len() + 1 == leases.len());
        store.close().await;
        scratch.drop().await;
    }

    /// A session of ours left idle inside a transaction (its process paused between two
    /// statements, holding locks) is ended by MariaDB after
    /// [`IDLE_IN_TRANSACTION_SECS_MAX`], and its locks are freed: another session that
    /// needs them (a node taking the leases over) gets them, rather than waiting until its
    /// own lock wait fails. Both pools' sessions carry the bound.
    #[tokio::test]
    async fn mysql_ends_a_transaction_left_idle() {
        let scratch = Scratch::new("idle").await;
        let (store, c, _) = store_with_a_course(&scratch.url).await;
        let commit_pool = store.commit_pool.as_ref().expect("MariaDB has a commit pool");
        for pool in [&store.pool, commit_pool] {
            let row = sqlx::query("SELECT CAST(@@SESSION.idle_transaction_timeout AS SIGNED)")
                .fetch_one(pool)
                .await
                .unwrap();
            assert_eq!(
                row.try_get::<i64, _>(0).unwrap(),
                i64::from(IDLE_IN_TRANSACTION_SECS_MAX)
            );
        }
        let mut paused = store.pool.acquire().await.unwrap();
        sqlx::query("BEGIN").execute(&mut *paused).await.unwrap();
        sqlx::query("SELECT version FROM courses WHERE id = ? FOR UPDATE")
            .bind(c.as_str())
            .fetch_one(&mut *paused)
            .await
            .unwrap();
        // The taker would wait far longer than the bound for the row.
        let mut taker = <sqlx::AnyConnection as sqlx::Connection>::connect(&scratch.url)
            .await
            .unwrap();
        sqlx::query("SET SESSION innodb_lock_wait_timeout = 60")
            .execute(&mut taker)
            .await
            .unwrap();
        sqlx::query("UPDATE courses SET version = version + 1 WHERE id = ?")
            .bind(c.as_str())
            .execute(&mut taker)
            .await
            .expect("the idle transaction was ended and its lock freed");
        assert!(
            sqlx::query("SELECT 1").execute(&mut *paused).await.is_err(),
            "the idle session was ended"
        );
        paused.close().await.ok();
        store.close().await;
        scratch.drop().await;
    }
}
