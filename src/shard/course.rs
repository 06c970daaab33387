//! One course's seat state and the pure seat decisions over it.
//!
//! Why: the seat decision must be a plain single-threaded check-and-take that can be unit
//! tested, benchmarked and driven by a randomized model test without any runtime. Everything
//! here is synchronous, allocation-light and does no I/O.
//! Must never: await, lock, or let `held` exceed `capacity` (asserted after every change,
//! in release builds too).
//!
//! A seat has three states. `EnrollPending` is held but not yet committed; `Enrolled` is
//! committed; `DropPending` is committed and being released. A held seat counts against
//! capacity in all three, so a seat is never promised twice while its commit is in flight,
//! and a failed commit always ends in [`Course::release_enroll`] or [`Course::cancel_drop`].

use std::collections::HashMap;

use crate::ids::{CourseId, StudentId, UnixMs};
pub use crate::model::CourseSpec;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seat {
    EnrollPending { at: UnixMs },
    Enrolled { at: UnixMs },
    DropPending { at: UnixMs },
}

#[derive(Debug)]
pub struct Course {
    pub id: CourseId,
    pub spec: CourseSpec,
    pub version: u64,
    seats: HashMap<StudentId, Seat>,
    /// Seats held in any state; never above `spec.capacity`.
    held: u32,
    /// Seats committed to the store (`Enrolled` + `DropPending`).
    committed: u32,
    /// While an admin change is in flight: the capacity both old and new specs allow.
    capacity_in_flight: Option<u32>,
    /// Seats above capacity that were loaded from the store (a hand edit, or a MySQL that
    /// ignored the CHECK). Never hidden or dropped: the course sells nothing until drops
    /// bring it under capacity, and this only shrinks.
    loaded_over: u32,
    /// Requests seen in the current heat window (metrics only).
    window_requests: std::cell::Cell<u32>,
    /// The course's answer to `GET /v1/courses/{id}`, rendered once until the course
    /// changes (polling bots are answered from these bytes). Opaque here.
    rendered: std::cell::RefCell<Option<bytes::Bytes>>,
    /// Enrollment answers by outcome since start, indexed like `metrics::ATTEMPTS`.
    outcomes: [std::cell::Cell<u64>; crate::metrics::ATTEMPTS.len()],
}

#[derive(Debug, PartialEq, Eq)]
pub enum SpecDecision {
    /// The new capacity is below the seats held now.
    BelowHeld,
    /// Another admin change to this course is in flight.
    InFlight,
    /// Commit it, then [`Course::apply_spec`] or [`Course::abort_spec`].
    Begun,
}

#[derive(Debug, PartialEq, Eq)]
pub enum EnrollDecision {
    /// The student already holds a committed seat (idempotent 200).
    Already { at: UnixMs },
    /// Another change to this student's seat is in flight; answer once it settles.
    InFlight,
    /// Outside the course's opening window.
    Closed,
    /// No seat left.
    Full,
    /// A seat is now held (pending) for this student; commit it, then confirm or release.
    Reserved { at: UnixMs },
}

#[derive(Debug, PartialEq, Eq)]
pub enum DropDecision {
    NotEnrolled,
    InFlight,
    /// The seat is now `DropPending`; commit, then confirm or cancel.
    Dropping,
}

impl Course {
    pub fn new(id: CourseId, spec: CourseSpec, version: u64) -> Course {
        Course {
            id,
            spec,
            version,
            seats: HashMap::new(),
            held: 0,
            committed: 0,
            capacity_in_flight: None,
            loaded_over: 0,
            window_requests: std::cell::Cell::new(0),
            outcomes: Default::default(),
            rendered: Default::default(),
        }
    }

    /// Adds a committed seat read back from the store at start. Returns false (and adds
    /// nothing) when the student is already on the roster. A seat beyond capacity is still
    /// loaded (an acknowledged enrollment is never dropped or hidden): the course is then
    /// [`Course::overfull`] and sells nothing until drops bring it under capacity.
    pub fn load_enrolled(&mut self, student: StudentId, at: UnixMs) -> bool {
        if self.seats.contains_key(&student) {
            return false;
        }
        self.seats.insert(student, Seat::Enrolled { at });
        self.held += 1;
        self.committed += 1;
        self.loaded_over = self.held.saturating_sub(self.sellable_capacity());
        self.check();
        true
    }

    /// Nothing in flight: every seat committed, no admin change begun.
    pub fn settled(&self) -> bool {
        self.capacity_in_flight.is_none() && self.seats.values().all(|s| matches!(s, Seat::Enrolled { .. }))
    }

    /// An admin change is in flight.
    pub fn spec_in_flight(&self) -> bool {
        self.capacity_in_flight.is_some()
    }

    /// Seats held above capacity (loaded so from the store); 0 in a healthy course.
    pub fn overfull(&self) -> u32 {
        self.held.saturating_sub(self.spec.capacity)
    }

    /// Counts a request for heat detection.
    pub fn note_request(&self) {
        self.window_requests.set(self.window_requests.get().saturating_add(1));
    }
    /// Counts an enrollment answer given for this course.
    pub fn note_outcome(&self, outcome: crate::metrics::Attempt) {
        let c = &self.outcomes[outcome as usize];
        c.set(c.get() + 1);
    }
    /// Enrollment answers by outcome since start.
    pub fn outcomes(&self) -> [u64; crate::metrics::ATTEMPTS.len()] {
        std::array::from_fn(|i| self.outcomes[i].get())
    }

    /// Requests since the last call, and starts a new window.
    pub fn take_window_requests(&self) -> u32 {
        self.window_requests.replace(0)
    }

    pub fn capacity(&self) -> u32 {
        self.spec.capacity
    }
    /// Committed seats (what the store holds).
    pub fn enrolled(&self) -> u32 {
        self.committed
    }
    /// Seats a new student could still take right now.
    pub fn seats_left(&self) -> u32 {
        self.sellable_capacity().saturating_sub(self.held)
    }
    /// Capacity usable now: while an admin change is in flight, the lower of old and new.
    fn sellable_capacity(&self) -> u32 {
        self.capacity_in_flight.unwrap_or(self.spec.capacity)
    }
    pub fn seat(&self, student: &StudentId) -> Option<Seat> {
        self.seats.get(student).copied()
    }
    /// Students holding a committed seat, sorted.
    pub fn roster(&self) -> Vec<StudentId> {
        let mut v: Vec<StudentId> = self
            .seats
            .iter()
            .filter(|(_, s)| !matches!(s, Seat::EnrollPending { .. }))
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }

    fn is_open(&self, now: UnixMs) -> bool {
        self.spec.opens_at.is_none_or(|t| now >= t) && self.spec.closes_at.is_none_or(|t| now < t)
    }

    /// The seat decision without taking the seat: `Reserved` means "would reserve".
    pub fn peek_enroll(&self, student: &StudentId, now: UnixMs) -> EnrollDecision {
        match self.seats.get(student) {
            Some(Seat::Enrolled { at }) => EnrollDecision::Already { at: *at },
            Some(_) => EnrollDecision::InFlight,
            None if !self.is_open(now) => EnrollDecision::Closed,
            None if self.held >= self.sellable_capacity() => EnrollDecision::Full,
            None => EnrollDecision::Reserved { at: now },
        }
    }

    /// The seat decision. Order: a student who holds the seat always hears so (even after
    /// the window closed, so a lost answer can be retried), then the window, then stock.
    pub fn enroll(&mut self, student: &StudentId, now: UnixMs) -> EnrollDecision {
        let decision = self.peek_enroll(student, now);
        if decision != (EnrollDecision::Reserved { at: now }) {
            return decision;
        }
        self.seats.insert(student.clone(), Seat::EnrollPending { at: now });
        self.held += 1;
        self.check();
        EnrollDecision::Reserved { at: now }
    }

    /// The pending seat was committed.
    pub fn confirm_enroll(&mut self, student: &StudentId) {
        let seat = self.seats.get_mut(student);
        let Some(seat @ Seat::EnrollPending { .. }) = seat else {
            panic!("confirm_enroll without a pending seat: {:?} {student:?}", self.id);
        };
        let Seat::EnrollPending { at } = *seat else {
            unreachable!()
        };
        *seat = Seat::Enrolled { at };
        self.committed += 1;
        self.check();
    }

    /// The pending seat was not committed: free it.
    pub fn release_enroll(&mut self, student: &StudentId) {
        let removed = self.seats.remove(student);
        assert!(
            matches!(removed, Some(Seat::EnrollPending { .. })),
            "release_enroll without a pending seat: {:?} {student:?}",
            self.id
        );
        self.held -= 1;
        self.check();
    }

    pub fn drop_seat(&mut self, student: &StudentId) -> DropDecision {
        match self.seats.get_mut(student) {
            None => DropDecision::NotEnrolled,
            Some(seat @ Seat::Enrolled { .. }) => {
                let Seat::Enrolled { at } = *seat else { unreachable!() };
                *seat = Seat::DropPending { at };
                DropDecision::Dropping
            }
            Some(_) => DropDecision::InFlight,
        }
    }

    /// The drop was committed: the seat is free for the next student at once.
    pub fn confirm_drop(&mut self, student: &StudentId) {
        let removed = self.seats.remove(student);
        assert!(
            matches!(removed, Some(Seat::DropPending { .. })),
            "confirm_drop without a pending drop: {:?} {student:?}",
            self.id
        );
        self.held -= 1;
        self.committed -= 1;
        self.loaded_over = self.loaded_over.min(self.held.saturating_sub(self.sellable_capacity()));
        self.check();
    }

    /// The drop was not committed: the student keeps the seat.
    pub fn cancel_drop(&mut self, student: &StudentId) {
        let seat = self.seats.get_mut(student);
        let Some(seat @ Seat::DropPending { .. }) = seat else {
            panic!("cancel_drop without a pending drop: {:?} {student:?}", self.id);
        };
        let Seat::DropPending { at } = *seat else {
            unreachable!()
        };
        *seat = Seat::Enrolled { at };
        self.check();
    }

    /// Starts an admin change: capacity may not go below the seats held, and until the
    /// change settles the course sells only up to the lower of the old and new capacity,
    /// so whichever way the commit goes no seat is sold beyond it.
    pub fn begin_spec(&mut self, spec: &CourseSpec) -> SpecDecision {
        if self.capacity_in_flight.is_some() {
            return SpecDecision::InFlight;
        }
        if spec.capacity < self.held {
            return SpecDecision::BelowHeld;
        }
        self.capacity_in_flight = Some(spec.capacity.min(self.spec.capacity));
        self.rendered.take();
        SpecDecision::Begun
    }

    /// The admin change begun with [`Course::begin_spec`] committed with `version`.
    pub fn apply_spec(&mut self, spec: CourseSpec, version: u64) {
        assert!(
            self.capacity_in_flight.is_some(),
            "apply_spec without begin_spec on {:?}",
            self.id
        );
        self.capacity_in_flight = None;
        if version > self.version {
            self.spec = spec;
            self.version = version;
        }
        self.loaded_over = self.loaded_over.min(self.held.saturating_sub(self.sellable_capacity()));
        self.check();
    }

    /// The admin change did not commit.
    pub fn abort_spec(&mut self) {
        self.capacity_in_flight = None;
        self.rendered.take();
    }

    /// The rendered answer, if nothing changed since it was made.
    pub fn rendered(&self) -> Option<bytes::Bytes> {
        self.rendered.borrow().clone()
    }
    pub fn set_rendered(&self, bytes: bytes::Bytes) {
        *self.rendered.borrow_mut() = Some(bytes);
    }

    /// The invariant, checked after every change (release builds too); a change also
    /// drops the rendered answer.
    fn check(&self) {
        self.rendered.take();
        assert!(
            self.held <= self.sellable_capacity() + self.loaded_over,
            "oversold {:?}: held {} > capacity {} (+{} loaded over it)",
            self.id,
            self.held,
            self.sellable_capacity(),
            self.loaded_over
        );
        assert!(self.committed <= self.held, "{:?}: committed > held", self.id);
    }
}
