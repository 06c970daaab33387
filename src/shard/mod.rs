//! Shards: each owns a partition of the courses and decides their seats alone.
//!
//! Why: a seat decision must be a single-threaded check-and-take with no lock, no CAS loop
//! and no Redis round trip. Every course has exactly one owner, `owner_of(id)`; a request
//! that lands on another shard crosses to the owner over a bounded channel ([`Router`]) and
//! its answer comes back the same way. State lives in `RefCell`s touched only by the
//! owner's thread.
//! Must never: hold a `RefCell` borrow across an `.await`, do I/O itself (the store is
//! reached only through the persist queue), or leave a held seat without a task that will
//! confirm or release it (commits are awaited in detached tasks, so a client hanging up
//! cannot strand a seat).

pub mod course;
pub mod table;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Notify};

use crate::ids::{CourseId, ShardClock, ShardId, StudentId, UnixMs};
use crate::limit::{Admission, Dimension, ShardLimiter};
use crate::metrics::{Attempt, ShardMetrics, HOT_COURSES_MAX, HOT_WINDOW_MS};
use crate::model::DrawRecord;
use crate::persist::store::{PutResult, SeatOp};
use crate::persist::{Change, Outcome, PersistHandle};
use course::{CourseSpec, DropDecision, EnrollDecision, SpecDecision};
use table::{CourseTable, CourseView, EnrollmentView, Status};

/// Messages queued to one shard from the others, at most.
pub const INBOX_MESSAGES_MAX: usize = 8_192;
/// Requests waiting at most on one seat's in-flight change before they are told to retry.
pub const SEAT_WAITERS_MAX: usize = 16;
/// Requests waiting at most on one course's lane to share it (joins, and enrollments
/// behind a draw or a waitlist change) before they are told to retry. Waiting joins all
/// start together when the lane is handed back and ride one group commit, so as many may
/// wait as may be in flight at once.
pub const LANE_WAITERS_MAX: usize = course::JOINS_IN_FLIGHT_MAX as usize;
/// Changes waiting at most on one course's lane to hold it alone (drops, leaves, admin
/// changes) before they are told to retry: each takes a commit of its own, in turn. Counted
/// apart from [`LANE_WAITERS_MAX`], so a crowd of joiners held back by a drop cannot take
/// the room the next drop needs to wait.
pub const LANE_ALONE_WAITERS_MAX: usize = 64;
/// How often a shard looks for draws that are due and seats to promote.
pub const ROUNDS_TICK_MS: u64 = 100;
/// How often an adoption looks whether a course's old copy has settled.
const ADOPT_SETTLE_POLL_MS: u64 = 5;
/// Times a request decides again (after waiting on an in-flight change or on admission).
const IN_FLIGHT_RETRIES_MAX: usize = 4;
/// How long a request waits at most for the store's outcome of its change, in statement
/// timeouts: a commit is bounded by one, and a commit whose answer was lost is settled
/// (old session fenced, row read back) within about one more. Past this the client's
/// connection is closed ([`Reply::OutcomeUnknown`]) while the seat stays held until the
/// persist thread learns the outcome.
pub const ANSWER_WAIT_STATEMENT_TIMEOUTS: u32 = 3;

/// The shard that owns a course: the peer nginx's `hash $course_key;` upstream picks for
/// the id among `shards` equal servers listed in shard order (its Cache::Memcached-style
/// hash: bits 16-30 of the CRC-32, modulo the server count). So an nginx in front can send
/// each course straight to its owner's own port (`shard_listen`, deploy/nginx) and the
/// request never crosses shards. Depends only on the id and the shard count.
pub fn owner_of(course: &CourseId, shards: usize) -> ShardId {
    owner_of_str(course.as_str(), shards)
}

/// [`owner_of`] for an id not yet made a [`CourseId`].
pub fn owner_of_str(course: &str, shards: usize) -> ShardId {
    let h = (crc32fast::hash(course.as_bytes()) >> 16) & 0x7fff;
    ShardId(h as usize % shards)
}

/// What one shard can be asked.
#[derive(Debug)]
pub enum Command {
    Course(CourseId),
    Enroll {
        course: CourseId,
        student: StudentId,
        admission: Admission,
    },
    Drop {
        course: CourseId,
        student: StudentId,
    },
    Roster(CourseId),
    Put {
        course: CourseId,
        spec: CourseSpec,
    },
    List {
        after: Option<CourseId>,
        limit: usize,
    },
    StudentEnrollments(StudentId),
    /// Courses of partitions this node took over, as the store holds them: each replaces
    /// the shard's copy once that copy has nothing in flight.
    Adopt(Vec<table::Adopted>),
}

/// One seat: a (course, student) pair.
type SeatKey = (CourseId, StudentId);

/// A shard's answer. Plain data: it crosses threads.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// `GET /v1/courses/{id}`, already rendered by net/'s renderer.
    CourseBody(bytes::Bytes),
    NotFound,
    /// `created`: this call took the seat (201) rather than finding it held (200).
    Enrolled {
        enrollment: EnrollmentView,
        created: bool,
    },
    /// Entered in the draw or placed on the waitlist (202), now or before.
    Placed(EnrollmentView),
    Full,
    Closed,
    NotEnrolled,
    /// The DELETE's change: `dropped`, `withdrawn` or `left_waitlist`.
    Dropped(&'static str),
    /// An admin change that breaks a rule of the rounds (400, with the reason).
    Refused(&'static str),
    /// The store is unreachable, a queue is full, or the seat is busy: retry shortly.
    /// Nothing was recorded for this request.
    Unavailable,
    /// The outcome is not known within the answer bound (the store did not answer, or the
    /// owner shard went away with the command). net/ closes the connection instead of
    /// answering: the contract allows a cut connection to go either way, never a 503.
    OutcomeUnknown,
    /// A rate limit refused a request that could take a seat (retry after these seconds).
    RateLimited(Dimension, u64),
    BelowEnrolled,
    Put {
        course: CourseView,
        created: bool,
    },
    Roster {
        students: Vec<StudentId>,
        waitlist: Vec<StudentId>,
    },
    Courses(Vec<CourseView>),
    Enrollments(Vec<EnrollmentView>),
    /// The courses adopted, but for these, whose old copies still had changes in flight.
    Adopted {
        unsettled: Vec<CourseId>,
    },
}

pub struct Envelope {
    pub cmd: Command,
    pub reply: oneshot::Sender<Reply>,
}

/// One shard's state. Lives in an `Rc` on its own thread.
pub struct Shard {
    pub id: ShardId,
    table: RefCell<CourseTable>,
    persist: PersistHandle,
    /// Seats with a change in flight, and how many requests wait on each.
    in_flight: RefCell<HashMap<SeatKey, (Rc<Notify>, usize)>>,
    /// Courses whose creation is in flight: one at a time, so a second PUT cannot apply a
    /// spec that skipped `begin_spec`.
    creating: RefCell<HashSet<CourseId>>,
    /// This shard's counters (written only by this thread).
    pub metrics: Arc<ShardMetrics>,
    /// This shard's rate limits and flow rules.
    pub limiter: Rc<ShardLimiter>,
    /// Renders a course for `GET /v1/courses/{id}` (net/'s JSON; shard/ keeps the bytes).
    render_course: RenderCourse,
    /// The wall clock, read once per decision.
    clock: ShardClock,
    /// How long a request waits for the outcome of its change (see
    /// [`ANSWER_WAIT_STATEMENT_TIMEOUTS`]).
    answer_wait: std::time::Duration,
    /// Cluster mode: courses changed since [`Shard::take_changed`] last ran (the other
    /// nodes' catalog caches follow them); None on a single node.
    changed: Option<RefCell<HashSet<CourseId>>>,
    /// Courses whose lane requests wait on, and how many wait on each.
    lanes: RefCell<HashMap<CourseId, LaneWaiters>>,
    /// Where draws get their seeds: the operating system's random source (the
    /// simulation hands in its seeded one).
    draw_seeds: Rc<dyn Fn() -> [u8; 32]>,
}

/// The requests waiting on one course's lane: all are woken when it is handed back.
#[derive(Default)]
struct LaneWaiters {
    notify: Rc<Notify>,
    /// Waiting to share the lane (at most [`LANE_WAITERS_MAX`]).
    sharing: usize,
    /// Waiting to hold it alone (at most [`LANE_ALONE_WAITERS_MAX`]).
    alone: usize,
}

/// How a request will use the lane it waits for: the two are bounded apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LaneUse {
    Share,
    Alone,
}

/// How net/ renders a course; the shard caches the bytes until the course changes.
pub type RenderCourse = fn(&CourseView) -> bytes::Bytes;

impl Shard {
    pub fn new(
        id: ShardId,
        table: CourseTable,
        persist: PersistHandle,
        metrics: Arc<ShardMetrics>,
        limiter: Rc<ShardLimiter>,
        render_course: RenderCourse,
        clock: ShardClock,
        answer_wait: std::time::Duration,
    ) -> Shard {
        Shard {
            clock,
            answer_wait,
            id,
            table: RefCell::new(table),
            persist,
            in_flight: RefCell::new(HashMap::new()),
            creating: RefCell::new(HashSet::new()),
            metrics,
            limiter,
            render_course,
            changed: None,
            lanes: RefCell::default(),
            draw_seeds: Rc::new(|| {
                let mut seed = [0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
                seed
            }),
        }
    }

    /// Draws take their seeds from `seeds` instead of the OS (the simulation's replay).
    pub fn with_draw_seeds(mut self, seeds: Rc<dyn Fn() -> [u8; 32]>) -> Self {
        self.draw_seeds = seeds;
        self
    }

    /// Records the courses that change from now on, for [`Shard::take_changed`].
    pub fn track_changes(mut self) -> Self {
        self.changed = Some(RefCell::default());
        self
    }

    fn note_changed(&self, course: &CourseId) {
        if let Some(changed) = &self.changed {
            changed.borrow_mut().insert(course.clone());
        }
    }

    /// The courses changed since the last call, as they are now.
    pub fn take_changed(&self) -> Vec<CourseView> {
        let Some(changed) = &self.changed else {
            return Vec::new();
        };
        let ids = std::mem::take(&mut *changed.borrow_mut());
        let table = self.table.borrow();
        ids.iter().filter_map(|id| table.view(id)).collect()
    }

    pub fn persist(&self) -> &PersistHandle {
        &self.persist
    }

    /// The shard's courses, for the simulation's checker (it reads memory between steps).
    #[cfg(test)]
    pub(crate) fn table(&self) -> std::cell::Ref<'_, CourseTable> {
        self.table.borrow()
    }

    /// Runs a command on this (owner) shard. Answers that memory alone decides (every 409
    /// in a rush, and every read) are given inline, with no future of their own; commands
    /// that wait on the store run in a detached local task, so the seat is settled even if
    /// the caller goes away. (Keeping the store path out of this future keeps the caller's
    /// future small: hyper moves it once per request.)
    pub async fn run(self: &Rc<Self>, cmd: Command) -> Reply {
        match self.answer_now(cmd) {
            Ok(reply) => reply,
            Err(cmd) => self.clone().execute_bounded(cmd).await,
        }
    }

    /// Runs a store-bound command in a detached task (the seat is settled even if the
    /// caller goes away) and waits for it at most `answer_wait`: past that, the outcome is
    /// unknown to the caller, never "nothing recorded".
    async fn execute_bounded(self: Rc<Self>, cmd: Command) -> Reply {
        let wait = self.answer_wait;
        let task = tokio::task::spawn_local(async move { self.execute(cmd).await });
        match tokio::time::timeout(wait, task).await {
            Ok(Ok(reply)) => reply,
            // The task was cancelled (the runtime is going down) or outlived the bound.
            Ok(Err(_)) | Err(_) => Reply::OutcomeUnknown,
        }
    }

    /// Answers what needs no await: every read, and the enrollments memory decides. Hands
    /// the command back when it must wait on the store.
    fn answer_now(&self, cmd: Command) -> Result<Reply, Command> {
        if let Some(reply) = self.answer_from_memory(&cmd) {
            return Ok(reply);
        }
        Ok(match cmd {
            Command::Course(id) => {
                let table = self.table.borrow();
                let Some(c) = table.get(&id) else {
                    return Ok(Reply::NotFound);
                };
                c.note_request();
                if let Some(bytes) = c.rendered() {
                    return Ok(Reply::CourseBody(bytes));
                }
                let bytes = (self.render_course)(&table.view(&id).expect("just found"));
                c.set_rendered(bytes.clone());
                Reply::CourseBody(bytes)
            }
            Command::Roster(id) => match self.table.borrow().get(&id) {
                Some(c) => Reply::Roster {
                    students: c.roster(),
                    waitlist: c.waitlist(),
                },
                None => Reply::NotFound,
            },
            Command::List { after, limit } => Reply::Courses(self.table.borrow().list(after.as_ref(), limit)),
            Command::StudentEnrollments(s) => Reply::Enrollments(self.table.borrow().enrollments_of(&s)),
            cmd @ (Command::Enroll { .. } | Command::Drop { .. } | Command::Put { .. } | Command::Adopt(_)) => {
                return Err(cmd)
            }
        })
    }

    /// The enrollment answers that take no seat: unknown course, already held, closed,
    /// full. `None` when the request may take a seat (or must wait on one in flight).
    fn answer_from_memory(&self, cmd: &Command) -> Option<Reply> {
        let Command::Enroll { course, student, .. } = cmd else {
            return None;
        };
        let table = self.table.borrow();
        let Some(c) = table.get(course) else {
            return Some(Reply::NotFound);
        };
        c.note_request();
        let reply = match c.peek_enroll(student, self.clock.now_ms()) {
            EnrollDecision::Already { at } => enrolled(course.clone(), student.clone(), at, false),
            EnrollDecision::Closed => Reply::Closed,
            EnrollDecision::Full => Reply::Full,
            EnrollDecision::Entered { .. } => placed(
                course,
                student,
                Status::Entered {
                    draw_at: c.spec.draw_at,
                },
            ),
            EnrollDecision::Waiting { position } => placed(course, student, Status::Waitlisted { position }),
            EnrollDecision::InFlight
            | EnrollDecision::Reserved { .. }
            | EnrollDecision::Enter { .. }
            | EnrollDecision::Join { .. }
            | EnrollDecision::LaneBusy
            | EnrollDecision::DrawPending => return None,
        };
        if let Some(a) = attempt_of(&reply) {
            c.note_outcome(a);
        }
        Some(reply)
    }

    /// The commands that wait on the store (see [`Shard::answer_now`] for the rest).
    async fn execute(&self, cmd: Command) -> Reply {
        match cmd {
            Command::Enroll {
                course,
                student,
                admission,
            } => {
                #[cfg(test)]
                let seat = student.clone();
                let reply = self.enroll(course.clone(), student, admission).await;
                #[cfg(test)]
                if reply == Reply::Unavailable {
                    // "Nothing was recorded", checked where it is decided: no change to the seat
                    // is in flight or committed (a caller sees the answer only after other
                    // tasks ran, which may have taken the seat since).
                    let held = self.table.borrow().get(&course).and_then(|c| c.seat(&seat));
                    assert!(
                        held.is_none(),
                        "{course:?} {seat:?}: an enrollment decided 503 while the seat is {held:?}"
                    );
                }
                if let (Some(c), Some(a)) = (self.table.borrow().get(&course), attempt_of(&reply)) {
                    c.note_outcome(a);
                }
                reply
            }
            Command::Drop { course, student } => self.drop_seat(course, student).await,
            Command::Put { course, spec } => self.put(course, spec).await,
            Command::Adopt(courses) => self.adopt(courses).await,
            Command::Course(_) | Command::Roster(_) | Command::List { .. } | Command::StudentEnrollments(_) => {
                unreachable!("reads are answered by answer_now")
            }
        }
    }

    /// Memory decides first; only a request that could take a seat (or a place in a draw
    /// or on a waitlist) is checked against the course's (and the cross-node) limits, and
    /// the decision is made again after that await, since the course may have changed
    /// meanwhile. The clock is read once per decision, and no decision is asserted on: a
    /// clock step between two decisions only changes the answer.
    async fn enroll(&self, course: CourseId, student: StudentId, admission: Admission) -> Reply {
        let mut admitted = false;
        // Waits on the course's lane are bounded by time, not rounds: in a burst of
        // students joining a waitlist each waits for the joins ahead of it.
        let lane_deadline = tokio::time::Instant::now() + self.answer_wait / 2;
        let mut rounds = 0;
        while rounds < IN_FLIGHT_RETRIES_MAX {
            rounds += 1;
            let now = self.clock.now_ms();
            let decision = match self.table.borrow_mut().get_mut(&course) {
                None => return Reply::NotFound,
                Some(c) if admitted => c.enroll(&student, now),
                Some(c) => c.peek_enroll(&student, now),
            };
            let op = match decision {
                EnrollDecision::Already { at } => return enrolled(course, student, at, false),
                EnrollDecision::Closed => return Reply::Closed,
                EnrollDecision::Full => return Reply::Full,
                EnrollDecision::Entered { .. } | EnrollDecision::Waiting { .. } => {
                    return self.standing(&course, &student).unwrap_or(Reply::Unavailable)
                }
                EnrollDecision::InFlight => {
                    if !self.wait_settled(&course, &student).await {
                        break;
                    }
                    continue;
                }
                EnrollDecision::LaneBusy | EnrollDecision::DrawPending => {
                    if !self.wait_lane(&course, LaneUse::Share, lane_deadline).await {
                        break;
                    }
                    rounds -= 1;
                    continue;
                }
                EnrollDecision::Reserved { .. } | EnrollDecision::Enter { .. } | EnrollDecision::Join { .. }
                    if !admitted =>
                {
                    if let Err(dim) = self.limiter.admit_seat(&course, &student, &admission).await {
                        return Reply::RateLimited(dim.0, dim.1);
                    }
                    admitted = true;
                    continue;
                }
                EnrollDecision::Reserved { at } => SeatOp::Enroll {
                    course: course.clone(),
                    student: student.clone(),
                    at,
                },
                EnrollDecision::Enter { at } => SeatOp::Enter {
                    course: course.clone(),
                    student: student.clone(),
                    at,
                },
                EnrollDecision::Join { rank, at } => SeatOp::Join {
                    course: course.clone(),
                    student: student.clone(),
                    rank,
                    at,
                },
            };
            let outcome = self.commit(&course, &student, None, op.clone()).await;
            let reply = {
                let mut table = self.table.borrow_mut();
                let c = table.get_mut(&course).expect("courses are never removed");
                match (op, outcome) {
                    (SeatOp::Enroll { at, .. }, Outcome::Committed) => {
                        c.confirm_enroll(&student);
                        table.reindex(&course, &student);
                        self.note_changed(&course);
                        enrolled(course.clone(), student.clone(), at, true)
                    }
                    (SeatOp::Enroll { .. }, Outcome::Full) => {
                        c.release_enroll(&student);
                        Reply::Full
                    }
                    (SeatOp::Enroll { .. }, other) => {
                        c.release_enroll(&student);
                        not_recorded(other)
                    }
                    (_, Outcome::Committed) => {
                        c.confirm_place(&student);
                        table.reindex(&course, &student);
                        table.note_rounds(&course);
                        self.note_changed(&course);
                        drop(table);
                        self.standing(&course, &student).expect("just placed")
                    }
                    (_, other) => {
                        c.release_place(&student);
                        not_recorded(other)
                    }
                }
            };
            self.after_change(&course);
            return reply;
        }
        self.enroll_settled_elsewhere(&course, &student)
    }

    /// A student's 202 answer from memory: entered in the draw, or waitlisted at their
    /// position. None if they have no committed place.
    fn standing(&self, course: &CourseId, student: &StudentId) -> Option<Reply> {
        let table = self.table.borrow();
        let c = table.get(course)?;
        let status = match c.place(student)? {
            course::Place::Entry { .. } => Status::Entered {
                draw_at: c.spec.draw_at,
            },
            course::Place::Wait { rank, .. } => Status::Waitlisted {
                position: c.position(rank),
            },
        };
        Some(placed(course, student, status))
    }

    /// After any change to a course settles: wakes the requests waiting on its lane. (A
    /// seat left free while someone waits, by a failed enrollment commit, is given to the
    /// head by [`run_rounds`].)
    fn after_change(&self, course: &CourseId) {
        let waiting = self.lanes.borrow_mut().remove(course);
        if let Some(waiting) = waiting {
            waiting.notify.notify_waiters();
        }
    }

    /// Waits until the course's lane (a waitlist change or the draw) is handed back. False
    /// when too many already wait to use it as `how` would, or `deadline` passed (the
    /// request's bound on its lane waits: half the answer wait).
    async fn wait_lane(&self, course: &CourseId, how: LaneUse, deadline: tokio::time::Instant) -> bool {
        let notify = {
            let mut lanes = self.lanes.borrow_mut();
            let waiting = lanes.entry(course.clone()).or_default();
            let (waiters, max) = match how {
                LaneUse::Share => (&mut waiting.sharing, LANE_WAITERS_MAX),
                LaneUse::Alone => (&mut waiting.alone, LANE_ALONE_WAITERS_MAX),
            };
            if *waiters >= max {
                return false;
            }
            *waiters += 1;
            waiting.notify.clone()
        };
        // A draw or a queue of joins that outlives the bound leaves the request to retry.
        tokio::time::timeout_at(deadline, notify.notified()).await.is_ok()
    }

    /// [`Shard::wait_lane`] for a change that needs the lane alone (a drop, an admin
    /// change): no join starts while it waits, so a stream of joiners cannot starve it.
    async fn wait_lane_alone(&self, course: &CourseId, deadline: tokio::time::Instant) -> bool {
        /// Stops wanting the lane however the wait ends (a request's future may be
        /// dropped mid-wait when its client goes), and wakes the joins it held back if
        /// they may start now: the change may not take the lane after all (it decides
        /// again), and nothing else would wake them. Only then: waking the other changes
        /// that wait for the lane alone would have them wake each other, round after round,
        /// while the lane stays busy.
        struct Wanting<'a>(&'a Shard, &'a CourseId);
        impl Drop for Wanting<'_> {
            fn drop(&mut self) {
                let joins_may_go = self
                    .0
                    .table
                    .borrow_mut()
                    .get_mut(self.1)
                    .is_some_and(|c| c.unwant_lane());
                if joins_may_go {
                    self.0.after_change(self.1);
                }
            }
        }
        match self.table.borrow_mut().get_mut(course) {
            Some(c) => c.want_lane(),
            None => return false,
        }
        let _wanting = Wanting(self, course);
        self.wait_lane(course, LaneUse::Alone, deadline).await
    }

    /// The answer to a POST that stopped waiting on another request's change to the same
    /// seat (too many waiters, or too many rounds): what memory holds now. A seat that
    /// committed meanwhile is the student's (200); one still in flight may go either way.
    /// Only a seat that is not held at all is "nothing recorded".
    fn enroll_settled_elsewhere(&self, course: &CourseId, student: &StudentId) -> Reply {
        let table = self.table.borrow();
        let Some(c) = table.get(course) else {
            return Reply::NotFound;
        };
        match (c.seat(student), c.place(student)) {
            (Some(course::Seat::Enrolled { at }), _) => enrolled(course.clone(), student.clone(), at, false),
            (Some(_), _) => Reply::OutcomeUnknown,
            (None, Some(p)) if p.state() == course::Pending::Settled => {
                drop(table);
                self.standing(course, student).unwrap_or(Reply::Unavailable)
            }
            (None, Some(_)) => Reply::OutcomeUnknown,
            (None, None) => Reply::Unavailable,
        }
    }

    async fn drop_seat(&self, course: CourseId, student: StudentId) -> Reply {
        let lane_deadline = tokio::time::Instant::now() + self.answer_wait / 2;
        let mut rounds = 0;
        while rounds < IN_FLIGHT_RETRIES_MAX {
            rounds += 1;
            let decision = match self.table.borrow_mut().get_mut(&course) {
                None => return Reply::NotFound,
                Some(c) => c.drop_seat(&student),
            };
            let (op, promote, lane) = match decision {
                DropDecision::NotEnrolled => return Reply::NotEnrolled,
                DropDecision::InFlight => {
                    if !self.wait_settled(&course, &student).await {
                        break;
                    }
                    continue;
                }
                DropDecision::LaneBusy | DropDecision::DrawPending => {
                    if !self.wait_lane_alone(&course, lane_deadline).await {
                        break;
                    }
                    rounds -= 1;
                    continue;
                }
                DropDecision::Dropping { promote: None, lane } => (
                    SeatOp::Drop {
                        course: course.clone(),
                        student: student.clone(),
                    },
                    None,
                    lane,
                ),
                DropDecision::Dropping {
                    promote: Some((next, at)),
                    lane,
                } => (
                    SeatOp::DropPromote {
                        course: course.clone(),
                        student: student.clone(),
                        next: next.clone(),
                        at,
                    },
                    Some(next),
                    lane,
                ),
                DropDecision::Withdrawing => (
                    SeatOp::Withdraw {
                        course: course.clone(),
                        student: student.clone(),
                    },
                    None,
                    false,
                ),
                DropDecision::Leaving => (
                    SeatOp::Leave {
                        course: course.clone(),
                        student: student.clone(),
                    },
                    None,
                    true,
                ),
            };
            let outcome = self.commit(&course, &student, promote.as_ref(), op.clone()).await;
            let committed = outcome == Outcome::Committed;
            let reply = {
                let mut table = self.table.borrow_mut();
                let c = table.get_mut(&course).expect("courses are never removed");
                let word = match op {
                    SeatOp::Drop { .. } | SeatOp::DropPromote { .. } => {
                        if committed {
                            c.confirm_drop(&student, promote.as_ref(), lane);
                        } else {
                            c.cancel_drop(&student, promote.as_ref(), lane);
                        }
                        "dropped"
                    }
                    SeatOp::Withdraw { .. } | SeatOp::Leave { .. } => {
                        if committed {
                            c.confirm_unplace(&student);
                        } else {
                            c.cancel_unplace(&student);
                        }
                        if matches!(op, SeatOp::Leave { .. }) {
                            "left_waitlist"
                        } else {
                            "withdrawn"
                        }
                    }
                    _ => unreachable!("a DELETE makes only these"),
                };
                if committed {
                    table.reindex(&course, &student);
                    if let Some(next) = &promote {
                        table.reindex(&course, next);
                    }
                    table.note_rounds(&course);
                    self.note_changed(&course);
                    Reply::Dropped(word)
                } else {
                    not_recorded(outcome)
                }
            };
            self.after_change(&course);
            return reply;
        }
        // Stopped waiting on another request's change to this seat: what memory holds now.
        let table = self.table.borrow();
        let Some(c) = table.get(&course) else {
            return Reply::NotFound;
        };
        match (c.seat(&student), c.place(&student)) {
            (None, None) => Reply::NotEnrolled,
            (Some(course::Seat::Enrolled { .. }), _) => Reply::Unavailable,
            (None, Some(p)) if p.state() == course::Pending::Settled => Reply::Unavailable,
            _ => Reply::OutcomeUnknown,
        }
    }

    /// Sends a seat op to the store and waits for its outcome, marking the seat (and the
    /// seat of `also`, a student promoted by the same op) in flight meanwhile so other
    /// requests for it wait instead of racing.
    async fn commit(&self, course: &CourseId, student: &StudentId, also: Option<&StudentId>, op: SeatOp) -> Outcome {
        let rx = match self.persist.submit(Change::Seat(op)) {
            Ok(rx) => rx,
            Err(_) => return Outcome::Failed,
        };
        let keys: Vec<SeatKey> = std::iter::once(student)
            .chain(also)
            .map(|s| (course.clone(), s.clone()))
            .collect();
        // At most one change per seat is in flight: the persist thread relies on it to run
        // batches concurrently without reordering a seat's changes.
        for key in &keys {
            let earlier = self
                .in_flight
                .borrow_mut()
                .insert(key.clone(), (Rc::new(Notify::new()), 0));
            assert!(earlier.is_none(), "two changes in flight for {key:?}");
        }
        // A dropped sender means the persist thread died; nothing it had not answered was
        // committed after that, and the process is going down.
        let outcome = rx.await.unwrap_or(Outcome::Failed);
        for key in &keys {
            if let Some((notify, _)) = self.in_flight.borrow_mut().remove(key) {
                notify.notify_waiters();
            }
        }
        outcome
    }

    /// Waits until the seat's in-flight change settles. False when too many already wait.
    async fn wait_settled(&self, course: &CourseId, student: &StudentId) -> bool {
        let notify = {
            let mut map = self.in_flight.borrow_mut();
            let Some((notify, waiters)) = map.get_mut(&(course.clone(), student.clone())) else {
                return true;
            };
            if *waiters >= SEAT_WAITERS_MAX {
                return false;
            }
            *waiters += 1;
            notify.clone()
        };
        notify.notified().await;
        true
    }

    /// Replaces each course's copy with the store's, once the old copy has nothing in
    /// flight: the changes in flight were decided under the lease this node lost, so the
    /// store fences them out and they settle quickly as not recorded. One still unsettled
    /// after half the answer wait is left as it was and named in the reply (its partition
    /// is then not taken: the keeper gives it back).
    async fn adopt(&self, courses: Vec<table::Adopted>) -> Reply {
        let deadline = tokio::time::Instant::now() + self.answer_wait / 2;
        let mut unsettled = Vec::new();
        for adopted in courses {
            loop {
                let settled = self.table.borrow().get(&adopted.id).is_none_or(course::Course::settled)
                    && !self.creating.borrow().contains(&adopted.id);
                if settled {
                    self.table.borrow_mut().replace(adopted);
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    unsettled.push(adopted.id);
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(ADOPT_SETTLE_POLL_MS)).await;
            }
        }
        Reply::Adopted { unsettled }
    }

    async fn put(&self, course: CourseId, spec: CourseSpec) -> Reply {
        let lane_deadline = tokio::time::Instant::now() + self.answer_wait / 2;
        let (existed, promote, lane) = loop {
            let now = self.clock.now_ms();
            let decision = match self.table.borrow_mut().get_mut(&course) {
                None => {
                    if !self.creating.borrow_mut().insert(course.clone()) {
                        return Reply::Unavailable;
                    }
                    break (false, Vec::new(), false);
                }
                Some(c) => c.begin_spec(&spec, now),
            };
            match decision {
                SpecDecision::BelowHeld => return Reply::BelowEnrolled,
                SpecDecision::InFlight => return Reply::Unavailable,
                SpecDecision::Refused(why) => return Reply::Refused(why),
                SpecDecision::LaneBusy => {
                    if !self.wait_lane_alone(&course, lane_deadline).await {
                        return Reply::Unavailable;
                    }
                }
                SpecDecision::Begun { promote, lane } => break (true, promote, lane),
            }
        };
        let outcome = match self.persist.submit(Change::PutCourse {
            course: course.clone(),
            spec: spec.clone(),
            promote: promote.clone(),
        }) {
            Ok(rx) => rx.await.unwrap_or(Outcome::Failed),
            Err(_) => Outcome::Failed,
        };
        if !existed {
            self.creating.borrow_mut().remove(&course);
        }
        let reply = {
            let mut table = self.table.borrow_mut();
            match outcome {
                Outcome::CoursePut(PutResult::Created { version } | PutResult::Updated { version }) => {
                    let created = matches!(outcome, Outcome::CoursePut(PutResult::Created { .. }));
                    match table.get_mut(&course) {
                        Some(c) => c.apply_spec(spec, version, &promote, lane),
                        None => table.insert(&course, spec, version),
                    }
                    for (s, _) in &promote {
                        table.reindex(&course, s);
                    }
                    table.note_rounds(&course);
                    self.note_changed(&course);
                    Reply::Put {
                        course: table.view(&course).expect("just put"),
                        created,
                    }
                }
                other => {
                    if existed {
                        table
                            .get_mut(&course)
                            .expect("courses are never removed")
                            .abort_spec(&promote, lane);
                    }
                    if other == Outcome::CoursePut(PutResult::BelowEnrolled) {
                        Reply::BelowEnrolled
                    } else {
                        not_recorded(other)
                    }
                }
            }
        };
        self.after_change(&course);
        reply
    }

    /// Runs a course's draw if it is due and may begin: the entrants in id order are
    /// shuffled by ChaCha20 seeded from `draw_seeds` (the OS), cut into seats, waitlist
    /// places and the rest, and committed whole with the record. Until it commits, the
    /// entrants' POSTs answer `202 entered` and everyone else's wait on the course's lane.
    /// Not committed: the entries stand and the next round draws again (no result of the
    /// failed draw was recorded or told to anyone).
    async fn draw(&self, course: CourseId) {
        let now = self.clock.now_ms();
        let started = std::time::Instant::now();
        let record = {
            let mut table = self.table.borrow_mut();
            let Some(c) = table.get_mut(&course) else { return };
            let Some(mut order) = c.begin_draw(now) else { return };
            let seed = (self.draw_seeds)();
            course::shuffle_entries(&mut order, seed);
            let (seats, waitlisted, first_rank) = c.draw_cut(order.len() as u32);
            DrawRecord {
                drawn_at: now,
                seed: seed.iter().map(|b| format!("{b:02x}")).collect(),
                order,
                seats,
                waitlisted,
                first_rank,
            }
        };
        let shuffled_us = started.elapsed().as_micros() as u64;
        let outcome = match self.persist.submit(Change::Draw {
            course: course.clone(),
            record: record.clone(),
        }) {
            Ok(rx) => rx.await.unwrap_or(Outcome::Failed),
            Err(_) => Outcome::Failed,
        };
        {
            let mut table = self.table.borrow_mut();
            let c = table.get_mut(&course).expect("courses are never removed");
            if outcome == Outcome::Committed {
                c.apply_draw(&record);
                for s in &record.order {
                    table.reindex(&course, s);
                }
                table.note_rounds(&course);
                self.note_changed(&course);
                tracing::info!(
                    course = %course,
                    entries = record.order.len(),
                    seats = record.seats,
                    waitlisted = record.waitlisted,
                    shuffled_us,
                    "draw committed"
                );
            } else {
                c.abort_draw();
                tracing::warn!(course = %course, entries = record.order.len(), "draw not committed; it runs again");
            }
        }
        self.after_change(&course);
    }

    /// Gives a seat that is free while someone waits to the head of the waitlist (after a
    /// failed enrollment commit, or a state loaded so), one head at a time.
    async fn promote(&self, course: CourseId) {
        loop {
            let head = match self.table.borrow_mut().get_mut(&course) {
                Some(c) => c.begin_promote(),
                None => None,
            };
            let Some((student, at)) = head else { return };
            let op = SeatOp::Promote {
                course: course.clone(),
                student: student.clone(),
                at,
            };
            let outcome = self.commit(&course, &student, None, op).await;
            let applied = outcome == Outcome::Committed;
            {
                let mut table = self.table.borrow_mut();
                let c = table.get_mut(&course).expect("courses are never removed");
                c.end_promote(&student, applied);
                if applied {
                    table.reindex(&course, &student);
                    table.note_rounds(&course);
                    self.note_changed(&course);
                }
            }
            self.after_change(&course);
            if !applied {
                return; // the next round tries again
            }
        }
    }
}

/// The outcome an owner shard's reply stands for, if it is an enrollment answer.
fn attempt_of(r: &Reply) -> Option<Attempt> {
    Some(match r {
        Reply::Enrolled { created: true, .. } => Attempt::Enrolled,
        Reply::Enrolled { created: false, .. } => Attempt::Already,
        Reply::Full => Attempt::Full,
        Reply::Closed => Attempt::Closed,
        Reply::NotFound => Attempt::NotFound,
        Reply::RateLimited(..) => Attempt::RateLimited,
        Reply::Unavailable => Attempt::Unavailable,
        Reply::Placed(_) => Attempt::Placed,
        _ => return None,
    })
}

fn enrolled(course: CourseId, student: StudentId, at: UnixMs, created: bool) -> Reply {
    Reply::Enrolled {
        enrollment: EnrollmentView {
            course,
            student,
            status: Status::Enrolled { at },
        },
        created,
    }
}

/// The answer to a change that did not commit as asked: nothing recorded (503), or, when the
/// store cannot tell (a lease was taken while its COMMIT went unanswered), unknown.
fn not_recorded(outcome: Outcome) -> Reply {
    match outcome {
        Outcome::Unknown => Reply::OutcomeUnknown,
        _ => Reply::Unavailable,
    }
}

fn placed(course: &CourseId, student: &StudentId, status: Status) -> Reply {
    Reply::Placed(EnrollmentView {
        course: course.clone(),
        student: student.clone(),
        status,
    })
}

/// A shard's way to every course: its own shard directly, the others over their inboxes.
pub struct Router {
    pub me: Rc<Shard>,
    pub peers: Vec<mpsc::Sender<Envelope>>,
}

impl Router {
    pub fn shards(&self) -> usize {
        self.peers.len()
    }

    /// Runs `cmd` on the shard that owns `course`, counting the hop when that is another.
    pub async fn call(&self, course: &CourseId, cmd: Command) -> Reply {
        let owner = owner_of(course, self.shards());
        if owner != self.me.id {
            self.me.metrics.hop();
        }
        self.call_shard(owner, cmd).await
    }

    /// Runs `make(course)` on the owner of an existing course, given a valid id as text.
    /// On the owner itself the command holds the table's own id (no allocation: the 409
    /// path makes none of its own), and an unknown course is `NotFound` at once.
    pub async fn call_existing(&self, id: &str, make: impl FnOnce(CourseId) -> Command) -> Reply {
        debug_assert!(CourseId::valid(id), "callers validate ids: {id:?}");
        let owner = owner_of_str(id, self.shards());
        if owner == self.me.id {
            let Some(course) = self.me.table.borrow().id_of(id) else {
                return Reply::NotFound;
            };
            return self.me.run(make(course)).await;
        }
        self.me.metrics.hop();
        let Some(course) = CourseId::parse(id) else {
            return Reply::NotFound;
        };
        self.call_shard(owner, make(course)).await
    }

    async fn call_shard(&self, owner: ShardId, cmd: Command) -> Reply {
        if owner == self.me.id {
            return self.me.run(cmd).await;
        }
        let (reply, rx) = oneshot::channel();
        if self.peers[owner.0].try_send(Envelope { cmd, reply }).is_err() {
            return Reply::Unavailable;
        }
        // The owner had the command: a lost reply (the owner is shutting down) may hide a
        // committed change, so it is not "nothing recorded".
        rx.await.unwrap_or(Reply::OutcomeUnknown)
    }

    /// Asks every shard (for reads that span the catalog) and returns the answers in shard
    /// order.
    pub async fn gather(&self, make: impl Fn() -> Command) -> Vec<Reply> {
        let calls = (0..self.shards()).map(|i| self.call_shard(ShardId(i), make()));
        futures_util::future::join_all(calls).await
    }
}

/// Publishes this shard's hottest courses once per window, forever (the shard's runtime
/// ends it).
pub async fn publish_heat(shard: Rc<Shard>) {
    let window = std::time::Duration::from_millis(HOT_WINDOW_MS);
    let mut tick = tokio::time::interval(window);
    tick.tick().await;
    loop {
        tick.tick().await;
        let hot = shard.table.borrow().take_hottest(HOT_COURSES_MAX, window.as_secs_f64());
        shard.metrics.publish_hot(hot);
    }
}

/// Every [`ROUNDS_TICK_MS`], forever (the shard's runtime ends it): starts the draws that
/// are due and gives free seats to waiting students, each in a task of its own. (It scans
/// the shard's courses with a draw or a waitlist: bounded by the catalog.)
pub async fn run_rounds(shard: Rc<Shard>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(ROUNDS_TICK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = shard.clock.now_ms();
        let (draws, promotions): (Vec<CourseId>, Vec<CourseId>) = {
            let table = shard.table.borrow();
            // Only courses whose partition this node holds (in cluster mode a shard keeps
            // the memory of partitions it lost; the new owner draws and promotes).
            let mine = || table.rounds().filter(|c| shard.persist.holds(&c.id));
            let draws = mine().filter(|c| c.draw_due(now)).map(|c| c.id.clone()).collect();
            let promotions = mine().filter(|c| c.needs_promotion()).map(|c| c.id.clone()).collect();
            (draws, promotions)
        };
        for course in draws {
            let shard = shard.clone();
            tokio::task::spawn_local(async move { shard.draw(course).await });
        }
        for course in promotions {
            let shard = shard.clone();
            tokio::task::spawn_local(async move { shard.promote(course).await });
        }
    }
}

/// Serves the shard's inbox until every sender is gone. Reads are answered inline; store
/// waits get their own task.
pub async fn serve_inbox(shard: Rc<Shard>, mut inbox: mpsc::Receiver<Envelope>) {
    while let Some(Envelope { cmd, reply }) = inbox.recv().await {
        match shard.answer_now(cmd) {
            Ok(answer) => {
                let _ = reply.send(answer);
            }
            Err(cmd) => {
                let shard = shard.clone();
                tokio::task::spawn_local(async move {
                    let _ = reply.send(shard.execute_bounded(cmd).await);
                });
            }
        }
    }
}

#[cfg(test)]
mod model_test;
