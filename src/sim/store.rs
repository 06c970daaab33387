//! A store that misbehaves on purpose, for the simulation: the same rules as the SQL store
//! (the guarded counter, idempotent inserts, one transaction per call), with the faults a
//! real MySQL shows. It fails before anything is done, hangs (before COMMIT or at it),
//! answers "unknown" after committing or after not committing, and commits late: the
//! session lives on behind a cut connection and its COMMIT lands after the answer was
//! lost, unless a fence ([`Backend::read_back`]) ends the session first.
//!
//! Leases as the MySQL store keeps them: one row per partition (owner node, epoch), a
//! takeover that bumps the epoch, and a commit that lands only if every lease it proves
//! is still its node's ([`SimNode`] is one node's view of the store). The store records
//! which node wrote under each (partition, epoch) and every commit that wrote a
//! partition it did not prove, for the checker.

use crate::partition::{partition_of, Lease, Partition, Proof as LeaseProof};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::ids::{CourseId, StudentId, UnixMs};
use crate::limit::breaker::{Breaker, CLOSED};
use crate::model::{CourseSpec, DrawRecord};
use crate::persist::feed::{Event, EventKind, FeedError, NewEvent, Page};
use crate::persist::store::{
    better_probe, CommitError, LoadRow, Probe, PutResult, SeatOp, SeatResult, Session, Settled,
};
use crate::persist::Backend;

/// Store faults the coverage check needs every test run to reach.
pub const COVERED: &[&str] = &[
    "fault: fail",
    "fault: hang before commit",
    "fault: hang at commit",
    "fault: unknown, applied",
    "fault: unknown, not applied",
    "fault: late commit",
    "late commit landed",
    "late commit fenced",
    "commit fenced out",
];

/// A simulated process: each start is a new node (a new incarnation).
pub type NodeTag = u32;

/// What a transaction proves of its leases, checked when its COMMIT lands.
#[derive(Clone, Debug)]
struct Proof {
    node: NodeTag,
    /// The node's fence generation it proves (the real store's `fences` row).
    gen: u64,
    leases: Vec<Lease>,
    /// The partitions its effects write.
    writes: Vec<Partition>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCourse {
    pub spec: CourseSpec,
    /// The guarded counter (capped at capacity, like the SQL store's).
    pub enrolled: u32,
    pub version: u64,
}

/// The committed state.
#[derive(Clone, Debug, Default)]
pub struct Rows {
    pub courses: BTreeMap<CourseId, StoredCourse>,
    pub seats: BTreeMap<(CourseId, StudentId), UnixMs>,
    /// Entries (rank None) and waitlist places, as the `places` table.
    pub places: BTreeMap<(CourseId, StudentId), (Option<u64>, UnixMs)>,
    /// Draw records, one per course at most (the `draws` table's key).
    pub draws: BTreeMap<CourseId, DrawRecord>,
    /// The change feed, numbered from 1 in commit order.
    pub events: Vec<Event>,
}

impl Rows {
    pub fn seats_of(&self, course: &CourseId) -> Vec<StudentId> {
        self.seats
            .keys()
            .filter(|(c, _)| c == course)
            .map(|(_, s)| s.clone())
            .collect()
    }
    /// A course's waitlist in rank order.
    pub fn waitlist_of(&self, course: &CourseId) -> Vec<StudentId> {
        let mut waits: Vec<(u64, StudentId)> = self
            .places
            .iter()
            .filter_map(|((c, s), (rank, _))| (c == course).then_some((*rank)?).map(|r| (r, s.clone())))
            .collect();
        waits.sort();
        waits.into_iter().map(|(_, s)| s).collect()
    }
    /// A course's entries, sorted.
    pub fn entries_of(&self, course: &CourseId) -> Vec<StudentId> {
        self.places
            .iter()
            .filter(|((c, _), (rank, _))| c == course && rank.is_none())
            .map(|((_, s), _)| s.clone())
            .collect()
    }
}

/// One change a transaction makes, applied at its COMMIT.
#[derive(Clone, Debug)]
enum Effect {
    Insert(CourseId, StudentId, UnixMs),
    Delete(CourseId, StudentId),
    Counter(CourseId, i64),
    Course(CourseId, StoredCourse),
    /// A place row (an entry when the rank is None) inserted, or deleted.
    Place(CourseId, StudentId, Option<u64>, UnixMs),
    Unplace(CourseId, StudentId),
    Draw(CourseId, DrawRecord),
    /// The change's event, numbered when the transaction commits.
    Event(NewEvent),
}

/// Chances of each fault per call.
#[derive(Clone, Copy, Debug)]
pub struct Weather {
    fail: f64,
    hang_before: f64,
    hang_at_commit: f64,
    unknown_applied: f64,
    unknown_lost: f64,
    late: f64,
    latency_us_max: u64,
}

impl Weather {
    pub fn calm() -> Weather {
        Weather {
            fail: 0.0,
            hang_before: 0.0,
            hang_at_commit: 0.0,
            unknown_applied: 0.0,
            unknown_lost: 0.0,
            late: 0.0,
            latency_us_max: 2_000,
        }
    }

    pub fn random(rng: &mut StdRng) -> Weather {
        if rng.gen_bool(0.4) {
            return Weather::calm();
        }
        // Mostly drizzle; now and then an outage in which most calls hang or fail.
        let worst = if rng.gen_bool(0.2) { 0.8 } else { 0.15 };
        let mut chance = || {
            if rng.gen_bool(0.5) {
                rng.gen_range(0.0..worst)
            } else {
                0.0
            }
        };
        Weather {
            fail: chance(),
            hang_before: chance(),
            hang_at_commit: chance(),
            unknown_applied: chance(),
            unknown_lost: chance(),
            late: chance(),
            latency_us_max: 5_000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    Fail,
    HangBefore,
    HangAtCommit,
    UnknownApplied,
    UnknownLost,
    Late,
}

pub struct SimStore {
    me: Weak<SimStore>,
    rows: RefCell<Rows>,
    weather: Cell<Weather>,
    rng: RefCell<StdRng>,
    next_session: Cell<u64>,
    /// Sessions whose COMMIT is on its way: they land unless fenced first.
    late: RefCell<BTreeMap<u64, (Proof, Vec<Effect>)>>,
    /// The lease table: each partition's owner and epoch (none before a node takes it).
    leases: RefCell<BTreeMap<Partition, (NodeTag, u64)>>,
    /// Each node's fence generation: bumped whenever one of its leases is taken.
    gens: RefCell<BTreeMap<NodeTag, u64>>,
    /// Every seat ever inserted (for the checker's view of a deposed node's answers).
    ever: RefCell<std::collections::BTreeSet<(CourseId, StudentId)>>,
    /// Which node wrote under each (partition, epoch): one writer per partition per epoch.
    writers: RefCell<BTreeMap<(Partition, u64), NodeTag>>,
    /// Broken lease rules, for the checker.
    violations: RefCell<Vec<String>>,
    counts: RefCell<BTreeMap<&'static str, u64>>,
    /// Each node's store breaker, which every hung call of that node must open (see
    /// [`SimStore::hang`]).
    breakers: RefCell<BTreeMap<NodeTag, Arc<Breaker>>>,
}

impl SimStore {
    pub fn new(seed: u64) -> Rc<SimStore> {
        Rc::new_cyclic(|me| SimStore {
            me: me.clone(),
            rows: RefCell::default(),
            weather: Cell::new(Weather::calm()),
            rng: RefCell::new(StdRng::seed_from_u64(seed)),
            next_session: Cell::new(1),
            late: RefCell::default(),
            leases: RefCell::default(),
            gens: RefCell::default(),
            ever: RefCell::default(),
            writers: RefCell::default(),
            violations: RefCell::default(),
            counts: RefCell::default(),
            breakers: RefCell::default(),
        })
    }

    pub fn set_breaker(&self, node: NodeTag, breaker: Arc<Breaker>) {
        self.breakers.borrow_mut().insert(node, breaker);
    }

    /// A call that never answers (its caller cuts it off). The breaker must hear of it
    /// while it hangs, not when it is cut off: if it was closed when the call hung, it is
    /// not closed a slow call later (only a probe closes it, and none can be let through
    /// within `open_ms` of its opening, which outlasts a slow call).
    async fn hang<T>(&self, node: NodeTag) -> T {
        struct Alive(Rc<Cell<bool>>);
        impl Drop for Alive {
            fn drop(&mut self) {
                self.0.set(false);
            }
        }
        let alive = Alive(Rc::new(Cell::new(true)));
        let breaker = self.breakers.borrow().get(&node).cloned();
        if let Some(breaker) = breaker.filter(|b| b.state() == CLOSED) {
            let still_hung = alive.0.clone();
            tokio::task::spawn_local(async move {
                let after = breaker.slow_call() + Duration::from_millis(2);
                tokio::time::sleep(after).await;
                if still_hung.get() && breaker.state() == CLOSED {
                    panic!("a store call has hung for {after:?} and the breaker is still closed");
                }
            });
        }
        std::future::pending::<T>().await
    }

    pub fn rows(&self) -> std::cell::Ref<'_, Rows> {
        self.rows.borrow()
    }

    pub fn set_weather(&self, weather: Weather) {
        self.weather.set(weather);
    }

    pub fn create_course(&self, id: &CourseId, spec: CourseSpec) {
        let course = StoredCourse {
            spec,
            enrolled: 0,
            version: 1,
        };
        self.rows.borrow_mut().courses.insert(id.clone(), course);
    }

    /// A hand edit: lowers a course's capacity below its seats (bypassing every guard).
    /// Returns the course and its seats.
    pub fn lower_capacity_below_seats(&self, rng: &mut StdRng) -> Option<(CourseId, u32)> {
        let mut rows = self.rows.borrow_mut();
        let candidates: Vec<(CourseId, u32)> = rows
            .courses
            .keys()
            .map(|c| (c.clone(), rows.seats_of(c).len() as u32))
            .filter(|(_, n)| *n >= 1)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let (course, seats) = candidates[rng.gen_range(0..candidates.len())].clone();
        let c = rows.courses.get_mut(&course).expect("listed");
        c.spec.capacity = rng.gen_range(0..seats);
        c.enrolled = c.spec.capacity;
        c.version += 1;
        Some((course, seats))
    }

    /// What a start reads, as `Store::load` streams it: courses, then their seats.
    pub fn load(&self, mut sink: impl FnMut(LoadRow)) {
        let rows = self.rows.borrow();
        for (id, c) in &rows.courses {
            sink(LoadRow::Course {
                id: id.clone(),
                spec: c.spec.clone(),
                version: c.version,
            });
        }
        for ((course, student), at) in &rows.seats {
            sink(LoadRow::Enrollment {
                course: course.clone(),
                student: student.clone(),
                at: *at,
            });
        }
        // Waitlist places in rank order, as the SQL store streams them.
        let mut places: Vec<_> = rows.places.iter().collect();
        places.sort_by_key(|(_, (rank, _))| *rank);
        for ((course, student), (rank, at)) in places {
            sink(LoadRow::Place {
                course: course.clone(),
                student: student.clone(),
                rank: *rank,
                at: *at,
            });
        }
        for (course, record) in &rows.draws {
            sink(LoadRow::Drawn {
                course: course.clone(),
                at: record.drawn_at,
            });
        }
    }

    /// The process died: every session it had ends, its COMMIT landing or not.
    pub fn crash(&self) {
        let late = std::mem::take(&mut *self.late.borrow_mut());
        for (_, (proof, effects)) in late {
            if self.rng.borrow_mut().gen_bool(0.5) {
                self.land(&proof, &effects);
                self.count("late commit landed");
            } else {
                self.count("late commit fenced");
            }
        }
    }

    /// `node` takes every partition of every course over, bumping each epoch, as a node
    /// does whose predecessor's lease lapsed (it died, or is paused and will resume).
    pub fn take_over(&self, node: NodeTag) -> Vec<Lease> {
        let parts: std::collections::BTreeSet<Partition> = self
            .rows
            .borrow()
            .courses
            .keys()
            .map(|c| partition_of(c.as_str()))
            .collect();
        let mut leases = self.leases.borrow_mut();
        let mut gens = self.gens.borrow_mut();
        parts
            .into_iter()
            .map(|p| {
                let row = leases.entry(p).or_insert((node, 0));
                if row.1 > 0 {
                    // Taken from its owner: the owner's fence moves on.
                    *gens.entry(row.0).or_default() += 1;
                }
                row.0 = node;
                row.1 += 1;
                Lease {
                    partition: p,
                    epoch: row.1,
                }
            })
            .collect()
    }

    /// A node's fence generation and its leases, as the real store's `fence_state` reads them.
    pub fn fence_state(&self, node: NodeTag) -> (u64, Vec<Lease>) {
        let gen = self.gens.borrow().get(&node).copied().unwrap_or(0);
        let leases = self
            .leases
            .borrow()
            .iter()
            .filter(|(_, (owner, _))| *owner == node)
            .map(|(p, (_, epoch))| Lease {
                partition: *p,
                epoch: *epoch,
            })
            .collect();
        (gen, leases)
    }

    /// Whether the seat was ever committed (it may have been dropped since).
    pub fn ever_held(&self, key: &(CourseId, StudentId)) -> bool {
        self.ever.borrow().contains(key)
    }

    /// Lease rules broken so far (none, or the checker fails the seed).
    pub fn violations(&self) -> Vec<String> {
        self.violations.borrow().clone()
    }

    /// Lands a COMMIT: only if every lease it proves is still its node's (else nothing
    /// of it is applied: the takeover came first). Records the writer of each proven
    /// (partition, epoch), and a violation for a write to a partition it did not prove.
    fn land(&self, proof: &Proof, effects: &[Effect]) -> bool {
        {
            let table = self.leases.borrow();
            let gen = self.gens.borrow().get(&proof.node).copied().unwrap_or(0);
            // The fence is the generation alone (as in the real store); the leases must
            // then be the node's, or the generation check let a stale proof through.
            if !proof.leases.is_empty() && proof.gen != gen {
                self.count("commit fenced out");
                return false;
            }
            let holds = |l: &Lease| table.get(&l.partition) == Some(&(proof.node, l.epoch));
            if !proof.leases.iter().all(holds) {
                self.violations.borrow_mut().push(format!(
                    "node {} committed at its current fence generation {gen} under leases it does not hold: {:?}",
                    proof.node, proof.leases
                ));
            }
            for p in &proof.writes {
                if table.contains_key(p) && !proof.leases.iter().any(|l| l.partition == *p) {
                    self.violations.borrow_mut().push(format!(
                        "node {} committed to partition {p:?} without proving its lease ({:?})",
                        proof.node, proof.leases
                    ));
                }
            }
        }
        let mut writers = self.writers.borrow_mut();
        for l in &proof.leases {
            let writer = *writers.entry((l.partition, l.epoch)).or_insert(proof.node);
            if writer != proof.node {
                self.violations.borrow_mut().push(format!(
                    "partition {:?} epoch {} written by nodes {writer} and {}",
                    l.partition, l.epoch, proof.node
                ));
            }
        }
        drop(writers);
        self.apply(effects);
        true
    }

    pub fn report(&self) -> super::Report {
        super::Report {
            counts: self.counts.borrow().clone(),
            ..super::Report::default()
        }
    }

    fn count(&self, what: &'static str) {
        *self.counts.borrow_mut().entry(what).or_default() += 1;
    }

    fn session(&self, session: &Session) -> u64 {
        let id = self.next_session.get();
        self.next_session.set(id + 1);
        session.id.set(Some(id));
        id
    }

    async fn latency(&self) {
        let us = self.rng.borrow_mut().gen_range(0..=self.weather.get().latency_us_max);
        tokio::time::sleep(Duration::from_micros(us)).await;
    }

    fn roll(&self) -> Fault {
        let w = self.weather.get();
        let mut rng = self.rng.borrow_mut();
        let x: f64 = rng.gen();
        let faults = [
            (w.fail, Fault::Fail),
            (w.hang_before, Fault::HangBefore),
            (w.hang_at_commit, Fault::HangAtCommit),
            (w.unknown_applied, Fault::UnknownApplied),
            (w.unknown_lost, Fault::UnknownLost),
            (w.late, Fault::Late),
        ];
        let mut edge = 0.0;
        for (p, fault) in faults {
            edge += p;
            if x < edge {
                return fault;
            }
        }
        Fault::None
    }

    fn apply(&self, effects: &[Effect]) {
        let mut rows = self.rows.borrow_mut();
        for e in effects {
            match e {
                Effect::Insert(c, s, at) => {
                    rows.seats.insert((c.clone(), s.clone()), *at);
                    self.ever.borrow_mut().insert((c.clone(), s.clone()));
                }
                Effect::Delete(c, s) => {
                    rows.seats.remove(&(c.clone(), s.clone()));
                }
                Effect::Counter(c, d) => {
                    let course = rows.courses.get_mut(c).expect("counted courses exist");
                    course.enrolled = (i64::from(course.enrolled) + d).max(0) as u32;
                }
                Effect::Course(c, course) => {
                    rows.courses.insert(c.clone(), course.clone());
                }
                Effect::Place(c, s, rank, at) => {
                    rows.places.insert((c.clone(), s.clone()), (*rank, *at));
                }
                Effect::Unplace(c, s) => {
                    rows.places.remove(&(c.clone(), s.clone()));
                }
                Effect::Draw(c, record) => {
                    rows.draws.insert(c.clone(), record.clone());
                }
                Effect::Event(e) => {
                    let seq = rows.events.len() as u64 + 1;
                    rows.events.push(Event {
                        seq,
                        kind: e.kind,
                        course: e.course.to_string(),
                        student: e.student.as_ref().map(ToString::to_string),
                        at: 0,
                        version: e.version,
                        capacity: e.capacity,
                    });
                }
            }
        }
    }

    /// The row-by-row rules of the SQL store, against the committed state: an insert of a
    /// held seat or place is a no-op, a new seat needs `enrolled + 1 <= capacity`, a drop
    /// frees it, a drop that promotes passes it to the head (both rows must be there, or
    /// the store refuses the batch, as the SQL store does when memory and store disagree).
    fn plan_seats(&self, ops: &[SeatOp]) -> Result<(Vec<SeatResult>, Vec<Effect>, Option<Probe>), CommitError> {
        let mut rows = self.rows.borrow().clone();
        let mut results = Vec::with_capacity(ops.len());
        let mut effects = Vec::new();
        let mut probe = None;
        let disagree = |what: String| CommitError::NotCommitted(anyhow::anyhow!("simulated store refused: {what}"));
        for op in ops {
            let (course, student) = op.key();
            let key = (course.clone(), student.clone());
            let Some(c) = rows.courses.get_mut(course) else {
                results.push(SeatResult::Full);
                continue;
            };
            let events = |effects: &mut Vec<Effect>| effects.extend(NewEvent::of_op(op).map(Effect::Event));
            let (result, changed) = match op {
                SeatOp::Enroll { at, .. } if !rows.seats.contains_key(&key) => {
                    if c.enrolled < c.spec.capacity {
                        c.enrolled += 1;
                        rows.seats.insert(key.clone(), *at);
                        effects.push(Effect::Insert(course.clone(), student.clone(), *at));
                        effects.push(Effect::Counter(course.clone(), 1));
                        events(&mut effects);
                        (SeatResult::Applied, true)
                    } else {
                        (SeatResult::Full, false)
                    }
                }
                SeatOp::Enroll { .. } => (SeatResult::Applied, false),
                SeatOp::Drop { .. } => {
                    if rows.seats.remove(&key).is_some() {
                        c.enrolled = c.enrolled.saturating_sub(1);
                        effects.push(Effect::Delete(course.clone(), student.clone()));
                        effects.push(Effect::Counter(course.clone(), -1));
                        events(&mut effects);
                        (SeatResult::Applied, true)
                    } else {
                        (SeatResult::Applied, false)
                    }
                }
                SeatOp::Enter { at, .. } | SeatOp::Join { at, .. } => {
                    let rank = match op {
                        SeatOp::Join { rank, .. } => Some(*rank),
                        _ => None,
                    };
                    if rows.places.contains_key(&key) {
                        (SeatResult::Applied, false)
                    } else {
                        rows.places.insert(key.clone(), (rank, *at));
                        effects.push(Effect::Place(course.clone(), student.clone(), rank, *at));
                        events(&mut effects);
                        (SeatResult::Applied, true)
                    }
                }
                SeatOp::Withdraw { .. } | SeatOp::Leave { .. } => {
                    let wait = matches!(op, SeatOp::Leave { .. });
                    if rows.places.get(&key).is_some_and(|(rank, _)| rank.is_some() == wait) {
                        rows.places.remove(&key);
                        effects.push(Effect::Unplace(course.clone(), student.clone()));
                        events(&mut effects);
                        (SeatResult::Applied, true)
                    } else {
                        (SeatResult::Applied, false)
                    }
                }
                SeatOp::DropPromote { next, at, .. } => {
                    let next_key = (course.clone(), next.clone());
                    let waiting = rows.places.get(&next_key).is_some_and(|(rank, _)| rank.is_some());
                    if !rows.seats.contains_key(&key) || !waiting {
                        return Err(disagree(format!("{op:?}")));
                    }
                    rows.seats.remove(&key);
                    rows.places.remove(&next_key);
                    rows.seats.insert(next_key, *at);
                    effects.push(Effect::Delete(course.clone(), student.clone()));
                    effects.push(Effect::Unplace(course.clone(), next.clone()));
                    effects.push(Effect::Insert(course.clone(), next.clone(), *at));
                    events(&mut effects);
                    (SeatResult::Applied, true)
                }
                SeatOp::Promote { at, .. } => {
                    if c.enrolled >= c.spec.capacity {
                        (SeatResult::Full, false)
                    } else if !rows.places.get(&key).is_some_and(|(rank, _)| rank.is_some()) {
                        return Err(disagree(format!("{op:?}")));
                    } else {
                        c.enrolled += 1;
                        rows.places.remove(&key);
                        rows.seats.insert(key.clone(), *at);
                        effects.push(Effect::Unplace(course.clone(), student.clone()));
                        effects.push(Effect::Insert(course.clone(), student.clone(), *at));
                        effects.push(Effect::Counter(course.clone(), 1));
                        events(&mut effects);
                        (SeatResult::Applied, true)
                    }
                }
            };
            results.push(result);
            if changed {
                probe = better_probe(probe, op);
            }
        }
        Ok((results, effects, probe))
    }

    /// Runs a transaction's ending under the weather: `Ok` when it committed and the
    /// answer came back.
    async fn finish(&self, id: u64, fault: Fault, proof: Proof, effects: Vec<Effect>) -> Result<(), CommitError> {
        let node = proof.node;
        let unknown = || CommitError::Unknown(anyhow::anyhow!("simulated: the COMMIT's answer was lost"));
        match fault {
            Fault::None | Fault::Fail | Fault::HangBefore => {
                if self.land(&proof, &effects) {
                    Ok(())
                } else {
                    Err(CommitError::Fenced)
                }
            }
            Fault::UnknownApplied => {
                self.count("fault: unknown, applied");
                self.land(&proof, &effects);
                Err(unknown())
            }
            Fault::UnknownLost => {
                self.count("fault: unknown, not applied");
                Err(unknown())
            }
            Fault::Late | Fault::HangAtCommit => {
                self.late.borrow_mut().insert(id, (proof, effects));
                let delay_ms = self.rng.borrow_mut().gen_range(1..5_000);
                let me = self.me.upgrade().expect("the store outlives its calls");
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    let pending = me.late.borrow_mut().remove(&id);
                    if let Some((proof, effects)) = pending {
                        if me.land(&proof, &effects) {
                            me.count("late commit landed");
                        }
                    }
                });
                if fault == Fault::HangAtCommit {
                    self.count("fault: hang at commit");
                    self.hang::<()>(node).await;
                }
                self.count("fault: late commit");
                Err(unknown())
            }
        }
    }

    /// The faults that strike before COMMIT: nothing is applied.
    async fn before_commit(&self, node: NodeTag, fault: Fault) -> Result<(), CommitError> {
        match fault {
            Fault::Fail => {
                self.count("fault: fail");
                Err(CommitError::NotCommitted(anyhow::Error::new(sqlx::Error::Io(
                    std::io::Error::new(std::io::ErrorKind::ConnectionReset, "simulated: connection reset"),
                ))))
            }
            Fault::HangBefore => {
                self.count("fault: hang before commit");
                self.hang(node).await
            }
            _ => Ok(()),
        }
    }
}

/// One simulated node's view of the store: the store, with its node tag on every
/// transaction (as a real node's connection carries its node id in the fence).
pub struct SimNode {
    pub store: Rc<SimStore>,
    pub node: NodeTag,
}

impl Backend for SimNode {
    async fn ping(&self) -> anyhow::Result<()> {
        self.store.ping(self.node).await
    }
    async fn commit_seats(
        &self,
        ops: &[SeatOp],
        proof: &LeaseProof,
        session: &Session,
    ) -> Result<Vec<SeatResult>, CommitError> {
        self.store.commit_seats(self.node, ops, proof, session).await
    }
    async fn put_course(
        &self,
        id: &CourseId,
        spec: &CourseSpec,
        promote: &[(StudentId, UnixMs)],
        proof: &LeaseProof,
        session: &Session,
    ) -> Result<PutResult, CommitError> {
        self.store
            .put_course(self.node, id, spec, promote, proof, session)
            .await
    }
    async fn draw(
        &self,
        course: &CourseId,
        record: &DrawRecord,
        proof: &LeaseProof,
        session: &Session,
    ) -> Result<(), CommitError> {
        self.store.draw(self.node, course, record, proof, session).await
    }
    async fn fence(&self, session: &Session) -> anyhow::Result<()> {
        self.store.fence(self.node, session).await
    }
    async fn fence_state(&self) -> anyhow::Result<(u64, Vec<Lease>)> {
        Ok(self.store.fence_state(self.node))
    }
    async fn read_back(&self, probe: &Probe) -> anyhow::Result<bool> {
        self.store.read_back(self.node, probe).await
    }
    async fn read_events(&self, after: Option<u64>, limit: u32) -> Result<Page, FeedError> {
        self.store.read_events(self.node, after, limit).await
    }
    async fn trim_events(&self, before_ms: UnixMs) -> anyhow::Result<u64> {
        self.store.trim_events(before_ms).await
    }
}

/// The store's side of each [`Backend`] call ([`SimNode`] passes its node).
impl SimStore {
    async fn ping(&self, node: NodeTag) -> anyhow::Result<()> {
        self.latency().await;
        match self.roll() {
            Fault::Fail => anyhow::bail!("simulated: ping failed"),
            Fault::HangBefore | Fault::HangAtCommit => self.hang(node).await,
            _ => Ok(()),
        }
    }

    async fn commit_seats(
        &self,
        node: NodeTag,
        ops: &[SeatOp],
        lease_proof: &LeaseProof,
        session: &Session,
    ) -> Result<Vec<SeatResult>, CommitError> {
        let id = self.session(session);
        self.latency().await;
        let fault = self.roll();
        self.before_commit(node, fault).await?;
        let (results, effects, probe) = self.plan_seats(ops)?;
        let proof = Proof {
            node,
            gen: lease_proof.gen,
            leases: lease_proof.leases.clone(),
            writes: ops.iter().map(|op| partition_of(op.key().0.as_str())).collect(),
        };
        session.commit_sent(probe, Settled::Seats(results.clone()));
        self.latency().await;
        self.finish(id, fault, proof, effects).await?;
        Ok(results)
    }

    async fn put_course(
        &self,
        node: NodeTag,
        id: &CourseId,
        spec: &CourseSpec,
        promote: &[(StudentId, UnixMs)],
        lease_proof: &LeaseProof,
        session: &Session,
    ) -> Result<PutResult, CommitError> {
        let proof = Proof {
            node,
            gen: lease_proof.gen,
            leases: lease_proof.leases.clone(),
            writes: vec![partition_of(id.as_str())],
        };
        let sid = self.session(session);
        self.latency().await;
        let fault = self.roll();
        self.before_commit(node, fault).await?;
        let existing = self.rows.borrow().courses.get(id).cloned();
        let promoted = promote.len() as u32;
        let (result, course) = match existing {
            Some(c) if c.enrolled > spec.capacity => return Ok(PutResult::BelowEnrolled),
            Some(c) if c.enrolled + promoted > spec.capacity => {
                return Err(CommitError::NotCommitted(anyhow::anyhow!(
                    "simulated store refused: promotions beyond capacity"
                )))
            }
            Some(c) => (
                PutResult::Updated { version: c.version + 1 },
                StoredCourse {
                    spec: spec.clone(),
                    enrolled: c.enrolled + promoted,
                    version: c.version + 1,
                },
            ),
            None => (
                PutResult::Created { version: 1 },
                StoredCourse {
                    spec: spec.clone(),
                    enrolled: 0,
                    version: 1,
                },
            ),
        };
        let probe = Probe::Course {
            course: id.clone(),
            version_if_committed: course.version,
        };
        session.commit_sent(Some(probe), Settled::Put(result));
        self.latency().await;
        let event = NewEvent {
            kind: EventKind::CourseChanged,
            course: id.clone(),
            student: None,
            version: Some(course.version),
            capacity: Some(u64::from(spec.capacity)),
        };
        let mut effects = vec![Effect::Course(id.clone(), course), Effect::Event(event)];
        {
            let rows = self.rows.borrow();
            for (student, at) in promote {
                let key = (id.clone(), student.clone());
                if !rows.places.get(&key).is_some_and(|(rank, _)| rank.is_some()) || rows.seats.contains_key(&key) {
                    return Err(CommitError::NotCommitted(anyhow::anyhow!(
                        "simulated store refused: promoting {student}, who is not waiting"
                    )));
                }
                effects.push(Effect::Unplace(id.clone(), student.clone()));
                effects.push(Effect::Insert(id.clone(), student.clone(), *at));
                effects.push(Effect::Event(NewEvent::of_student(EventKind::Promoted, id, student)));
            }
        }
        self.finish(sid, fault, proof, effects).await?;
        Ok(result)
    }

    /// A draw, under the SQL store's rules: a second record for a course is refused, the
    /// entries removed must be exactly those drawn, and the seats must fit capacity.
    async fn draw(
        &self,
        node: NodeTag,
        course: &CourseId,
        record: &DrawRecord,
        lease_proof: &LeaseProof,
        session: &Session,
    ) -> Result<(), CommitError> {
        let proof = Proof {
            node,
            gen: lease_proof.gen,
            leases: lease_proof.leases.clone(),
            writes: vec![partition_of(course.as_str())],
        };
        let sid = self.session(session);
        self.latency().await;
        let fault = self.roll();
        self.before_commit(node, fault).await?;
        let refuse = |why: &str| {
            Err(CommitError::NotCommitted(anyhow::anyhow!(
                "simulated store refused the draw: {why}"
            )))
        };
        let mut effects = Vec::new();
        {
            let rows = self.rows.borrow();
            if rows.draws.contains_key(course) {
                return refuse("drawn already");
            }
            let mut drawn = record.order.clone();
            drawn.sort();
            if rows.entries_of(course) != drawn {
                return refuse("entries differ");
            }
            let c = rows.courses.get(course).expect("drawn courses exist");
            if c.enrolled + record.seats > c.spec.capacity {
                return refuse("seats beyond capacity");
            }
            effects.push(Effect::Draw(course.clone(), record.clone()));
            effects.push(Effect::Event(NewEvent::of_course(EventKind::Drawn, course)));
            for (i, s) in record.order.iter().enumerate() {
                let i = i as u32;
                effects.push(Effect::Unplace(course.clone(), s.clone()));
                let kind = if i < record.seats {
                    effects.push(Effect::Insert(course.clone(), s.clone(), record.drawn_at));
                    EventKind::Enrolled
                } else if i < record.seats + record.waitlisted {
                    let rank = record.first_rank + u64::from(i - record.seats);
                    effects.push(Effect::Place(course.clone(), s.clone(), Some(rank), record.drawn_at));
                    EventKind::Waitlisted
                } else {
                    EventKind::NotSelected
                };
                effects.push(Effect::Event(NewEvent::of_student(kind, course, s)));
            }
            effects.push(Effect::Counter(course.clone(), i64::from(record.seats)));
        }
        session.commit_sent(Some(Probe::Draw { course: course.clone() }), Settled::Draw);
        self.latency().await;
        self.finish(sid, fault, proof, effects).await
    }

    async fn fence(&self, node: NodeTag, session: &Session) -> anyhow::Result<()> {
        self.latency().await;
        match self.roll() {
            Fault::Fail => anyhow::bail!("simulated: the fence failed"),
            Fault::HangBefore | Fault::HangAtCommit => self.hang(node).await,
            _ => {}
        }
        // The session ends now, its COMMIT landing first or never.
        let id = session.id.get().expect("every simulated session has an id");
        let pending = self.late.borrow_mut().remove(&id);
        if let Some((proof, effects)) = pending {
            if self.rng.borrow_mut().gen_bool(0.5) {
                self.land(&proof, &effects);
                self.count("late commit landed");
            } else {
                self.count("late commit fenced");
            }
        }
        Ok(())
    }

    async fn read_back(&self, node: NodeTag, probe: &Probe) -> anyhow::Result<bool> {
        self.latency().await;
        match self.roll() {
            Fault::Fail => anyhow::bail!("simulated: read-back failed"),
            Fault::HangBefore | Fault::HangAtCommit => self.hang(node).await,
            _ => {}
        }
        let rows = self.rows.borrow();
        Ok(match probe {
            Probe::Seat {
                course,
                student,
                present_if_committed,
            } => rows.seats.contains_key(&(course.clone(), student.clone())) == *present_if_committed,
            Probe::Course {
                course,
                version_if_committed,
            } => rows
                .courses
                .get(course)
                .is_some_and(|c| c.version == *version_if_committed),
            Probe::Place {
                course,
                student,
                present_if_committed,
            } => rows.places.contains_key(&(course.clone(), student.clone())) == *present_if_committed,
            Probe::Draw { course } => rows.draws.contains_key(course),
        })
    }

    async fn read_events(&self, node: NodeTag, after: Option<u64>, limit: u32) -> Result<Page, FeedError> {
        self.latency().await;
        match self.roll() {
            Fault::Fail => return Err(FeedError::Store(anyhow::anyhow!("simulated: read failed"))),
            Fault::HangBefore | Fault::HangAtCommit => self.hang(node).await,
            _ => {}
        }
        let rows = self.rows.borrow();
        let head = rows.events.len() as u64;
        let from = match after {
            Some(a) if a > head => return Err(FeedError::Ahead),
            Some(a) => a,
            None => 0,
        };
        let events: Vec<Event> = rows.events[from as usize..]
            .iter()
            .take(limit as usize)
            .cloned()
            .collect();
        let next = events.last().map_or(from, |e| e.seq);
        Ok(Page { events, next, head })
    }

    async fn trim_events(&self, _before_ms: UnixMs) -> anyhow::Result<u64> {
        Ok(0) // the simulation keeps every event: the checker replays them all
    }
}
