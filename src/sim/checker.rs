//! The simulation's checker: every answer held against the store and memory at the
//! instant it is given, and the whole state once the faults heal.
//!
//! The promises it checks:
//! - no oversell: no course holds more seats than capacity, in the store or in memory
//!   (beyond what a hand edit put there, which only drops can lower);
//! - every acknowledged seat (a 201/200 to a POST) is in the store when it is answered
//!   and stays there, across crashes, until a DELETE of it is sent;
//! - every acknowledged drop is out of the store, the same way;
//! - 503 only when nothing was recorded: not while the seat is committed (and, asserted by
//!   the shard where the answer is decided, not while a change to the seat is in flight);
//! - once the store answers again, every request is answered and no seat or admin
//!   change is left pending;
//! - memory equals the store after settling, and after every restart;
//! - leases: one writer per partition per epoch, and no node commits to a partition
//!   without proving its lease (the store records both, [`SimStore::violations`]); a node
//!   deposed by a takeover answers what it had in flight without a seat promise it cannot
//!   keep: every 201 it gives was committed before the takeover (the fence refuses the
//!   rest), and the successor's memory equals the store;
//! - registration rounds: an acknowledged entry or waitlist place (a 202) is in the store
//!   when answered and stays there (or became what the draw or a promotion made of it);
//!   a student is in at most one of seat, entry and waitlist per course; at most
//!   `waitlist_max` wait; no entry outlives its course's draw; once settled no seat is
//!   free while anyone waits; memory's waitlists (in order) and entries equal the store's;
//!   and the feed, replayed, rebuilds the store's seats, entries and waitlists in order.

use std::collections::BTreeMap;
use std::rc::Rc;

use crate::ids::{CourseId, StudentId};
use crate::model::CourseSpec;
use crate::persist::feed::{Event, EventKind};
use crate::shard::course::Seat;
use crate::shard::{Reply, Shard};

use super::store::SimStore;

/// Answers the coverage check needs every test run to reach.
pub const COVERED: &[&str] = &[
    "enroll: 201",
    "enroll: 200",
    "enroll: 409",
    "enroll: 403",
    "enroll: 503",
    "enroll: unknown",
    "drop: 200",
    "drop: 404",
    "drop: 503",
    "put: 200",
    "put: 409",
    "put: 503",
    "deposed node answered",
    "enroll: 202 entered",
    "enroll: 202 waitlisted",
    "drop: withdrawn",
    "drop: left_waitlist",
];

/// What the store must hold for a (course, student) after an acknowledged answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Durable {
    /// A seat (a 201/200 to a POST).
    Seat,
    /// Nothing (a 200 to a DELETE).
    Nothing,
    /// A place (a 202): still the place, or what a draw or a promotion made of it (a
    /// seat, a waitlist place, or a draw that did not select the student).
    Placed,
}

#[derive(Clone, Debug)]
pub enum Request {
    Enroll { course: CourseId, student: StudentId },
    Drop { course: CourseId, student: StudentId },
    Put { course: CourseId, spec: CourseSpec },
}

impl Request {
    pub fn course(&self) -> &CourseId {
        match self {
            Request::Enroll { course, .. } | Request::Drop { course, .. } | Request::Put { course, .. } => course,
        }
    }
    fn seat(&self) -> Option<(CourseId, StudentId)> {
        match self {
            Request::Enroll { course, student } | Request::Drop { course, student } => {
                Some((course.clone(), student.clone()))
            }
            Request::Put { .. } => None,
        }
    }
}

type SeatKey = (CourseId, StudentId);

pub struct Checker {
    store: Rc<SimStore>,
    shards: Vec<Rc<Shard>>,
    next_id: u64,
    /// Requests sent and not yet answered, in this life, with the other requests for
    /// the same seat that were in flight when they were sent.
    open: BTreeMap<u64, (Request, Vec<u64>)>,
    /// Requests for each seat in flight now.
    open_by_seat: BTreeMap<SeatKey, Vec<u64>>,

    /// Requests in flight per seat.
    in_flight: BTreeMap<SeatKey, u32>,
    /// What the store must say of a seat: `Some(true)` held, `Some(false)` not held, no
    /// entry when not known (never acknowledged, or a request for it was sent since).
    durable: BTreeMap<SeatKey, Durable>,
    /// Courses a hand edit left overfull, and how many seats they may still hold.
    overfull: BTreeMap<CourseId, u32>,
    /// Requests a node had in flight when a successor took its leases over.
    deposed: std::collections::BTreeSet<u64>,
    counts: BTreeMap<&'static str, u64>,
}

impl Checker {
    pub fn new(store: Rc<SimStore>) -> Checker {
        Checker {
            store,
            shards: Vec::new(),
            next_id: 0,
            open: BTreeMap::new(),
            open_by_seat: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            durable: BTreeMap::new(),
            overfull: BTreeMap::new(),
            deposed: Default::default(),
            counts: BTreeMap::new(),
        }
    }

    pub fn set_shards(&mut self, shards: Vec<Rc<Shard>>) {
        self.shards = shards;
    }

    /// A successor took every lease over: the requests in flight now are answered by the
    /// deposed node, from a memory that is no longer the store's.
    pub fn depose(&mut self) {
        self.deposed.extend(self.open.keys().copied());
    }

    pub fn allow_overfull(&mut self, course: &CourseId, seats: u32) {
        self.overfull.insert(course.clone(), seats);
    }

    pub fn report(&self) -> super::Report {
        super::Report {
            requests: self.next_id,
            counts: self.counts.clone(),
            ..super::Report::default()
        }
    }

    pub fn begin(&mut self, request: &Request) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        if std::env::var_os("ENROLLD_SIM_TRACE").is_some() {
            eprintln!("#{id} sent {request:?}");
        }
        let concurrent = match request.seat() {
            Some(key) => {
                let open = self.open_by_seat.entry(key).or_default();
                let before = open.clone();
                open.push(id);
                before
            }
            None => Vec::new(),
        };
        self.open.insert(id, (request.clone(), concurrent));
        if let Some(key) = request.seat() {
            *self.in_flight.entry(key.clone()).or_default() += 1;
            self.durable.remove(&key);
        }
        id
    }

    fn shard_of(&self, course: &CourseId) -> &Shard {
        &self.shards[crate::shard::owner_of(course, self.shards.len()).0]
    }

    fn memory_seat(&self, key: &SeatKey) -> Option<Seat> {
        self.shard_of(&key.0).table().get(&key.0)?.seat(&key.1)
    }

    fn memory_place(&self, key: &SeatKey) -> Option<crate::shard::course::Place> {
        self.shard_of(&key.0).table().get(&key.0)?.place(&key.1)
    }

    fn store_has(&self, key: &SeatKey) -> bool {
        self.store.rows().seats.contains_key(key)
    }

    fn store_places(&self, key: &SeatKey) -> bool {
        self.store.rows().places.contains_key(key)
    }

    /// Whether the store holds what an acknowledged answer promised of a seat.
    fn holds(rows: &super::store::Rows, key: &SeatKey, durable: Durable) -> bool {
        let seat = rows.seats.contains_key(key);
        let place = rows.places.contains_key(key);
        match durable {
            Durable::Seat => seat,
            Durable::Nothing => !seat && !place,
            Durable::Placed => seat || place || rows.draws.get(&key.0).is_some_and(|d| d.order.contains(&key.1)),
        }
    }

    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_default() += 1;
    }

    /// Checks one answer at the instant it is given. Violations panic (the simulation
    /// turns a panic into a failed seed, with its seed).
    pub fn end(&mut self, id: u64, request: &Request, reply: &Reply) {
        let (_, concurrent) = self.open.remove(&id).expect("begun");
        if let Some(key) = request.seat() {
            if let Some(open) = self.open_by_seat.get_mut(&key) {
                open.retain(|&x| x != id);
            }
        }
        if std::env::var_os("ENROLLD_SIM_TRACE").is_some() {
            let seat = request.seat().and_then(|k| self.memory_seat(&k));
            eprintln!("#{id} {request:?} -> {reply:?} (concurrent {concurrent:?}, memory now {seat:?})");
        }
        let acknowledged = match (request, reply) {
            _ if self.deposed.remove(&id) => {
                // Decided by a node deposed meanwhile: its memory and the successor's
                // changes since are not one history, so only what the fence promises is
                // checked. A seat it answers as newly taken committed before the takeover
                // (the store held it at some point; the successor may have changed it
                // since, for requests sent after this one); its other answers promise
                // nothing the successor could contradict.
                self.count("deposed node answered");
                if let (Request::Enroll { .. }, Reply::Enrolled { created: true, .. }) = (request, reply) {
                    let key = request.seat().expect("a seat request");
                    assert!(
                        self.store.ever_held(&key),
                        "{key:?}: a deposed node answered 201 for a seat the store never held"
                    );
                }
                None
            }
            (Request::Enroll { .. }, Reply::Enrolled { created, .. }) => {
                self.count(if *created { "enroll: 201" } else { "enroll: 200" });
                let key = request.seat().expect("a seat request");
                assert!(
                    self.store_has(&key),
                    "{key:?} answered enrolled but the store does not hold it"
                );
                Some(Durable::Seat)
            }
            (Request::Enroll { .. }, Reply::Placed(view)) => {
                self.count(match view.status {
                    crate::shard::table::Status::Entered { .. } => "enroll: 202 entered",
                    _ => "enroll: 202 waitlisted",
                });
                let key = request.seat().expect("a seat request");
                // The place, or (an entry whose draw committed while its outcome was on its
                // way to the shard) what the draw made of it.
                assert!(
                    Self::holds(&self.store.rows(), &key, Durable::Placed),
                    "{key:?} answered {:?} but the store holds no place",
                    view.status
                );
                Some(Durable::Placed)
            }
            (Request::Enroll { .. }, Reply::Unavailable) => {
                self.count("enroll: 503");
                let key = request.seat().expect("a seat request");
                let place = self.memory_place(&key);
                match self.memory_seat(&key) {
                    Some(Seat::Enrolled { .. }) => panic!("{key:?}: a POST answered 503 while the seat is held"),
                    None if place.is_none() => assert!(
                        !self.store_has(&key) && !self.store_places(&key),
                        "{key:?}: a POST answered 503; the store holds the seat or a place"
                    ),
                    _ => {}
                }
                if place.is_some_and(|p| p.state() == crate::shard::course::Pending::Settled) {
                    panic!("{key:?}: a POST answered 503 while the student has a place");
                }
                None
            }
            (Request::Enroll { .. }, r) => {
                self.count(match r {
                    Reply::Full => "enroll: 409",
                    Reply::Closed => "enroll: 403",
                    Reply::OutcomeUnknown => "enroll: unknown",
                    Reply::NotFound => "enroll: 404",
                    other => panic!("an enrollment answered {other:?}"),
                });
                None
            }
            (Request::Drop { .. }, Reply::Dropped(word)) => {
                self.count(match *word {
                    "withdrawn" => "drop: withdrawn",
                    "left_waitlist" => "drop: left_waitlist",
                    _ => "drop: 200",
                });
                let key = request.seat().expect("a seat request");
                assert!(
                    !self.store_has(&key) && !self.store_places(&key),
                    "{key:?} answered {word} but the store holds a seat or place"
                );
                Some(Durable::Nothing)
            }
            (Request::Drop { .. }, r) => {
                self.count(match r {
                    Reply::NotEnrolled => "drop: 404",
                    Reply::Unavailable => "drop: 503",
                    Reply::OutcomeUnknown => "drop: unknown",
                    other => panic!("a drop answered {other:?}"),
                });
                None
            }
            (Request::Put { course, spec }, Reply::Put { course: view, .. }) => {
                self.count("put: 200");
                let rows = self.store.rows();
                let stored = rows.courses.get(course).expect("an answered PUT is stored");
                assert!(
                    stored.version >= view.version,
                    "{course:?} answered a version the store never had"
                );
                if stored.version == view.version {
                    assert_eq!(
                        &stored.spec, spec,
                        "{course:?} answered with a spec the store does not hold"
                    );
                }
                None
            }
            (Request::Put { course, .. }, r) => {
                self.count(match r {
                    Reply::BelowEnrolled => "put: 409",
                    Reply::Refused(_) => "put: 400",
                    Reply::Unavailable => "put: 503",
                    Reply::OutcomeUnknown => "put: unknown",
                    other => panic!("a PUT answered {other:?}"),
                });
                if matches!(r, Reply::Unavailable) {
                    let table = self.shard_of(course).table();
                    let memory = table.get(course).expect("simulated courses exist");
                    if !memory.spec_in_flight() {
                        let stored = self.store.rows().courses[course].version;
                        assert_eq!(
                            stored, memory.version,
                            "{course:?}: a PUT answered 503 but its change is stored"
                        );
                    }
                }
                None
            }
        };
        if let Some(key) = request.seat() {
            let n = self.in_flight.get_mut(&key).expect("counted at begin");
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(&key);
                if let Some(held) = acknowledged {
                    self.durable.insert(key, held);
                }
            }
        }
    }

    /// Checks that hold after every step: no oversell in the store or memory, and every
    /// acknowledged seat where it was acknowledged.
    pub fn check_step(&self) -> Result<(), String> {
        if let Some(v) = self.store.violations().first() {
            return Err(format!("lease rule broken: {v}"));
        }
        let rows = self.store.rows();
        for (id, c) in &rows.courses {
            let seats = rows.seats_of(id).len() as u32;
            let allowed = c.spec.capacity.max(self.overfull.get(id).copied().unwrap_or(0));
            if seats > allowed {
                return Err(format!(
                    "{id:?} oversold in the store: {seats} seats, capacity {}",
                    c.spec.capacity
                ));
            }
        }
        for (key, durable) in &self.durable {
            if !Self::holds(&rows, key, *durable) {
                return Err(format!("acknowledged {key:?} ({durable:?}) but the store disagrees"));
            }
        }
        for key in rows.places.keys() {
            if rows.seats.contains_key(key) {
                return Err(format!("{key:?} holds both a seat and a place in the store"));
            }
        }
        for (id, c) in &rows.courses {
            let waiting = rows.waitlist_of(id).len() as u32;
            if waiting > c.spec.waitlist_max {
                return Err(format!(
                    "{id:?}: {waiting} waiting, waitlist_max {}",
                    c.spec.waitlist_max
                ));
            }
            if rows.draws.contains_key(id) && !rows.entries_of(id).is_empty() {
                return Err(format!("{id:?}: entries outlived the draw"));
            }
        }
        Ok(())
    }

    /// Right after a start: memory is what the store holds.
    pub fn check_loaded(&self) -> Result<(), String> {
        self.check_step()?;
        self.check_memory_equals_store()
    }

    pub fn check_all_answered(&self) -> Result<(), String> {
        match self.open.first_key_value() {
            None => Ok(()),
            Some((id, (r, _))) => Err(format!(
                "{} requests never answered once the store healed (first: #{id} {r:?})",
                self.open.len()
            )),
        }
    }

    /// Once healed and given time: nothing pending, memory equals the store, and no 503
    /// hid a seat that committed.
    pub fn check_settled(&self) -> Result<(), String> {
        self.check_all_answered()?;
        self.check_step()?;
        for shard in &self.shards {
            for c in shard.table().courses() {
                if !c.settled() {
                    return Err(format!("{:?} still has a change pending after the store healed", c.id));
                }
            }
        }
        self.check_memory_equals_store()?;
        // No seat free while anyone waits (a failed enrollment's seat is promoted by the
        // rounds task, which had time to run).
        let rows = self.store.rows();
        for (id, c) in &rows.courses {
            let waiting = rows.waitlist_of(id);
            if !waiting.is_empty() && (rows.seats_of(id).len() as u32) < c.spec.capacity {
                return Err(format!(
                    "{id:?}: {} seats of {} taken while {waiting:?} wait",
                    rows.seats_of(id).len(),
                    c.spec.capacity
                ));
            }
        }
        Ok(())
    }

    /// The change feed, read page by page, replayed from nothing: every event numbered in
    /// turn, each seat enrolled before it is dropped and never twice (exactly once, in
    /// commit order per course), every course's versions rising, and the replay ending
    /// with exactly the store's rosters (no change without its event).
    pub fn check_feed(&self, feed: &[Event]) -> Result<(), String> {
        use std::collections::BTreeSet;
        #[derive(Default)]
        struct Replayed {
            seats: BTreeSet<String>,
            entries: BTreeSet<String>,
            waitlist: Vec<String>,
        }
        let mut courses: BTreeMap<String, Replayed> = BTreeMap::new();
        let mut versions: BTreeMap<String, u64> = BTreeMap::new();
        for (i, e) in feed.iter().enumerate() {
            if e.seq != i as u64 + 1 {
                return Err(format!("feed: event {} numbered {}", i + 1, e.seq));
            }
            let c = courses.entry(e.course.clone()).or_default();
            let student = || e.student.clone().ok_or_else(|| format!("feed: {e:?} names no student"));
            let wrong = || Err(format!("feed: {e:?} does not follow from the events before it"));
            match e.kind {
                EventKind::Enrolled => {
                    let s = student()?;
                    c.entries.remove(&s); // a draw's winner leaves the entries
                    if !c.seats.insert(s) {
                        return wrong();
                    }
                }
                EventKind::Dropped => {
                    if !c.seats.remove(&student()?) {
                        return wrong();
                    }
                    // The seat went to the head of the waitlist in the same commit: the
                    // next event promotes exactly the head.
                    if let Some(head) = c.waitlist.first() {
                        let next = feed.get(i + 1);
                        if !next.is_some_and(|n| n.kind == EventKind::Promoted && n.student.as_ref() == Some(head)) {
                            return Err(format!(
                                "feed: {e:?} freed a seat while {:?} waited, and the next event is {next:?}",
                                c.waitlist
                            ));
                        }
                    }
                }
                EventKind::Entered if !c.entries.insert(student()?) => return wrong(),
                EventKind::Withdrawn | EventKind::NotSelected if !c.entries.remove(&student()?) => return wrong(),
                EventKind::Waitlisted => {
                    let s = student()?;
                    c.entries.remove(&s);
                    if c.waitlist.contains(&s) || c.seats.contains(&s) {
                        return wrong();
                    }
                    c.waitlist.push(s);
                }
                EventKind::LeftWaitlist | EventKind::Promoted => {
                    let s = student()?;
                    let Some(at) = c.waitlist.iter().position(|w| *w == s) else {
                        return wrong();
                    };
                    if e.kind == EventKind::Promoted && at != 0 {
                        return Err(format!("feed: {e:?} skipped {:?}", &c.waitlist[..at]));
                    }
                    c.waitlist.remove(at);
                    if e.kind == EventKind::Promoted && !c.seats.insert(s) {
                        return wrong();
                    }
                }
                EventKind::CourseChanged => {
                    let v = e.version.ok_or("feed: course_changed without a version")?;
                    let before = versions.insert(e.course.clone(), v).unwrap_or(0);
                    if v <= before {
                        return Err(format!("feed: {e:?} after version {before}"));
                    }
                }
                _ => {}
            }
        }
        let rows = self.store.rows();
        for id in rows.courses.keys() {
            let names = |v: Vec<crate::ids::StudentId>| v.iter().map(ToString::to_string).collect::<Vec<_>>();
            let replayed = courses.remove(id.as_str()).unwrap_or_default();
            let stored_seats: BTreeSet<String> = names(rows.seats_of(id)).into_iter().collect();
            let stored_entries: BTreeSet<String> = names(rows.entries_of(id)).into_iter().collect();
            let stored_waitlist = names(rows.waitlist_of(id));
            if stored_seats != replayed.seats
                || stored_entries != replayed.entries
                || stored_waitlist != replayed.waitlist
            {
                return Err(format!(
                    "feed: replaying {id:?} gives seats {:?} entries {:?} waitlist {:?}; the store holds {stored_seats:?} {stored_entries:?} {stored_waitlist:?}",
                    replayed.seats, replayed.entries, replayed.waitlist
                ));
            }
        }
        Ok(())
    }

    fn check_memory_equals_store(&self) -> Result<(), String> {
        let rows = self.store.rows();
        for (id, stored) in &rows.courses {
            let table = self.shard_of(id).table();
            let Some(memory) = table.get(id) else {
                return Err(format!("{id:?} is stored but not in memory"));
            };
            let mut in_store = rows.seats_of(id);
            in_store.sort();
            if memory.roster() != in_store {
                return Err(format!(
                    "{id:?}: memory roster {:?} != store {:?}",
                    memory.roster(),
                    in_store
                ));
            }
            if memory.waitlist() != rows.waitlist_of(id) {
                return Err(format!(
                    "{id:?}: memory waitlist {:?} != store {:?}",
                    memory.waitlist(),
                    rows.waitlist_of(id)
                ));
            }
            if memory.entrants() != rows.entries_of(id) {
                return Err(format!(
                    "{id:?}: memory entries {:?} != store {:?}",
                    memory.entrants(),
                    rows.entries_of(id)
                ));
            }
            if memory.drawn_at() != rows.draws.get(id).map(|d| d.drawn_at) {
                return Err(format!("{id:?}: memory and store disagree on the draw"));
            }
            if memory.spec != stored.spec || memory.version != stored.version {
                return Err(format!("{id:?}: memory spec/version differ from the store"));
            }
        }
        Ok(())
    }

    /// The process died: requests in flight end unanswered (their outcome unknown), and
    /// what was acknowledged must survive in the store.
    pub fn after_crash(&mut self) -> Result<(), String> {
        for (_, (request, _)) in std::mem::take(&mut self.open) {
            if let Some(key) = request.seat() {
                self.durable.remove(&key);
            }
        }
        self.in_flight.clear();
        self.open_by_seat.clear();
        self.deposed.clear();
        self.shards.clear();
        self.check_step()
    }
}
