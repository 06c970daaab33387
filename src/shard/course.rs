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
//!
//! Registration rounds (API.md) add a student's *place* that is not a seat: an entry in a
//! draw that has not run, or a place on the waitlist. Each has the same pending states as
//! a seat (adding, settled, removing; a waitlist place also promoting), so a change in
//! flight is never decided twice. The waitlist is a `VecDeque` of (rank, student) in rank
//! order: a new place goes last (ranks only grow), the head is promoted, and a position is
//! a binary search (exact, O(log n)); a place left in the middle costs a memmove of the
//! places behind it (a waitlist of 5,000 moves at most 5,000 pairs of 16 bytes). Every
//! change to the waitlist (joining, leaving, a drop that promotes, an admin change that
//! promotes, the draw) holds the course's *lane*, so a seat a change frees always goes to
//! the head that was waiting when it was decided, and the head is never a place still in
//! flight. Joins only append to the tail, so they share the lane with each other (up to
//! `JOINS_IN_FLIGHT_MAX`, and one group commit takes a burst of them together); every
//! other change holds it alone. A change that waits for the lane alone (`want_lane`) keeps
//! new joins out until it had its turn, so a stream of joiners cannot starve a drop.

use std::collections::{HashMap, VecDeque};

use crate::ids::{CourseId, StudentId, UnixMs};
use crate::model::DRAW_ENTRIES_MAX;
pub use crate::model::{CourseSpec, DrawRecord};

/// Joins of one course in flight together at most (they share its lane).
pub const JOINS_IN_FLIGHT_MAX: u32 = 512;

/// Who holds a course's lane (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    Free,
    /// One change that may touch the head: a leave, a drop or an admin change (which may
    /// promote), a repair promotion, the draw.
    Held,
    /// This many joins in flight, which only append to the tail.
    Joins(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seat {
    EnrollPending { at: UnixMs },
    Enrolled { at: UnixMs },
    DropPending { at: UnixMs },
}

/// Puts a draw's entrants (sorted by id, as [`Course::begin_draw`] gives them) in drawn
/// order: a Fisher-Yates shuffle (rand 0.8's `SliceRandom::shuffle`) driven by ChaCha20
/// seeded with the draw's 32-byte seed. Anyone with the record's seed and entries can
/// compute the same order again (the draw's audit).
pub fn shuffle_entries(entrants: &mut [StudentId], seed: [u8; 32]) {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    entrants.shuffle(&mut rand_chacha::ChaCha20Rng::from_seed(seed));
}

/// Where a place's change stands (a seat's three states, for places).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pending {
    /// Being added; not yet committed.
    Adding,
    /// Committed, nothing in flight.
    Settled,
    /// Committed, being removed (a withdrawal or a leave).
    Removing,
    /// Committed, being turned into a seat (waitlist only).
    Promoting,
}

/// A student's place in a course that is not a seat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// An entry in the draw that has not run.
    Entry { at: UnixMs, state: Pending },
    /// A place on the waitlist; `rank` orders the waitlist.
    Wait { rank: u64, at: UnixMs, state: Pending },
}

impl Place {
    pub fn state(&self) -> Pending {
        match self {
            Place::Entry { state, .. } | Place::Wait { state, .. } => *state,
        }
    }
    fn set_state(&mut self, to: Pending) {
        match self {
            Place::Entry { state, .. } | Place::Wait { state, .. } => *state = to,
        }
    }
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
    /// Entries and waitlist places (empty for a course with neither: the 409 path of a
    /// plain course looks no further than `is_empty`).
    places: HashMap<StudentId, Place>,
    /// Every `Place::Wait`, in rank order.
    waitlist: VecDeque<(u64, StudentId)>,
    /// The rank the next waitlist place gets.
    next_rank: u64,
    /// `Place::Entry`s, and those of them with a change in flight.
    entries: u32,
    entries_in_flight: u32,
    /// A waitlist change or the draw is in flight (see the module docs).
    lane: Lane,
    /// Changes waiting for the lane alone: while any does, no join starts.
    lane_wanted: u32,
    /// The draw is in flight.
    drawing: bool,
    /// When the draw ran (None: not yet, or the course has none).
    drawn_at: Option<UnixMs>,
    /// Waitlist places above `waitlist_max` loaded from the store (a hand edit); only
    /// shrinks, like `loaded_over`.
    waitlist_over: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SpecDecision {
    /// The new capacity is below the seats held now.
    BelowHeld,
    /// Another admin change to this course is in flight.
    InFlight,
    /// A waitlist change or the draw holds the lane; try again once it settles.
    LaneBusy,
    /// The change breaks a rule of the rounds (the reason, for a 400).
    Refused(&'static str),
    /// Commit it, then [`Course::apply_spec`] or [`Course::abort_spec`]. `promote`: the
    /// heads of the waitlist a capacity raise gives seats to in the same commit (the
    /// change then holds the lane, as it does whenever `lane` is true).
    Begun {
        promote: Vec<(StudentId, UnixMs)>,
        lane: bool,
    },
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
    /// The student is in the draw (a repeat: 202 entered).
    Entered { at: UnixMs },
    /// The student waits at this 1-based position (a repeat: 202 waitlisted).
    Waiting { position: u32 },
    /// An entry is now pending; commit it, then [`Course::confirm_place`] or
    /// [`Course::release_place`].
    Enter { at: UnixMs },
    /// A waitlist place at `rank` is now pending (the lane is taken); commit it, then
    /// confirm or release.
    Join { rank: u64, at: UnixMs },
    /// Another waitlist change holds the lane; decide again once it settles.
    LaneBusy,
    /// The draw is due or running; decide again once it committed.
    DrawPending,
}

#[derive(Debug, PartialEq, Eq)]
pub enum DropDecision {
    NotEnrolled,
    InFlight,
    /// The seat is now `DropPending`; commit, then confirm or cancel. `promote`: the head
    /// of the waitlist, now `Promoting`, who gets the seat in the same commit. `lane`: the
    /// drop holds the course's lane (it must hand it back when it settles).
    Dropping {
        promote: Option<(StudentId, UnixMs)>,
        lane: bool,
    },
    /// The entry is now `Removing`; commit, then confirm or cancel.
    Withdrawing,
    /// The waitlist place is now `Removing` (the lane is taken).
    Leaving,
    /// Another waitlist change holds the lane; decide again once it settles.
    LaneBusy,
    /// The draw is running; decide again once it committed.
    DrawPending,
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
            places: HashMap::new(),
            waitlist: VecDeque::new(),
            next_rank: 1,
            entries: 0,
            entries_in_flight: 0,
            lane: Lane::Free,
            lane_wanted: 0,
            drawing: false,
            drawn_at: None,
            waitlist_over: 0,
        }
    }

    /// Adds a committed place read back from the store at start (`rank` None: an entry).
    /// False (nothing added) when the student already has a seat or a place here.
    pub fn load_place(&mut self, student: StudentId, rank: Option<u64>, at: UnixMs) -> bool {
        if self.seats.contains_key(&student) || self.places.contains_key(&student) {
            return false;
        }
        match rank {
            None => {
                self.places.insert(
                    student,
                    Place::Entry {
                        at,
                        state: Pending::Settled,
                    },
                );
                self.entries += 1;
            }
            Some(rank) => {
                let i = self.waitlist.partition_point(|(r, _)| *r < rank);
                self.waitlist.insert(i, (rank, student.clone()));
                self.places.insert(
                    student,
                    Place::Wait {
                        rank,
                        at,
                        state: Pending::Settled,
                    },
                );
                self.next_rank = self.next_rank.max(rank + 1);
                self.waitlist_over = (self.waitlist.len() as u32).saturating_sub(self.spec.waitlist_max);
            }
        }
        self.check();
        true
    }

    /// Marks the course's draw as run (read back from the store at start).
    pub fn load_drawn(&mut self, at: UnixMs) {
        self.drawn_at = Some(at);
    }

    /// Adds a committed seat read back from the store at start. Returns false (and adds
    /// nothing) when the student is already on the roster or has a place. A seat beyond capacity is still
    /// loaded (an acknowledged enrollment is never dropped or hidden): the course is then
    /// [`Course::overfull`] and sells nothing until drops bring it under capacity.
    pub fn load_enrolled(&mut self, student: StudentId, at: UnixMs) -> bool {
        if self.seats.contains_key(&student) || self.places.contains_key(&student) {
            return false;
        }
        self.seats.insert(student, Seat::Enrolled { at });
        self.held += 1;
        self.committed += 1;
        self.loaded_over = self.held.saturating_sub(self.sellable_capacity());
        self.check();
        true
    }

    /// Nothing in flight: every seat and place committed, no admin change or draw begun.
    pub fn settled(&self) -> bool {
        self.capacity_in_flight.is_none()
            && self.lane == Lane::Free
            && self.entries_in_flight == 0
            && self.seats.values().all(|s| matches!(s, Seat::Enrolled { .. }))
            && self.places.values().all(|p| p.state() == Pending::Settled)
    }

    /// Students on the waitlist now (every place, in flight or not).
    pub fn waitlisted(&self) -> u32 {
        self.waitlist.len() as u32
    }
    /// Entries in the draw now.
    pub fn entries(&self) -> u32 {
        self.entries
    }
    /// When the draw ran, if it did.
    pub fn drawn_at(&self) -> Option<UnixMs> {
        self.drawn_at
    }
    pub fn place(&self, student: &StudentId) -> Option<Place> {
        if self.places.is_empty() {
            return None;
        }
        self.places.get(student).copied()
    }
    /// The 1-based position of a waitlist place of this rank.
    pub fn position(&self, rank: u64) -> u32 {
        self.waitlist.partition_point(|(r, _)| *r < rank) as u32 + 1
    }
    /// The committed waitlist in order.
    pub fn waitlist(&self) -> Vec<StudentId> {
        self.waitlist
            .iter()
            .filter(|(_, s)| self.places.get(s).is_some_and(|p| p.state() != Pending::Adding))
            .map(|(_, s)| s.clone())
            .collect()
    }
    /// The committed entries of the draw, sorted.
    pub fn entrants(&self) -> Vec<StudentId> {
        let mut v: Vec<StudentId> = self
            .places
            .iter()
            .filter(|(_, p)| matches!(p, Place::Entry { .. }) && p.state() != Pending::Adding)
            .map(|(s, _)| s.clone())
            .collect();
        v.sort();
        v
    }
    /// A change that frees seats must give them to the waitlist: a seat is free while
    /// someone waits and nothing holds the lane (only after a failed enrollment commit,
    /// or a state loaded so).
    pub fn needs_promotion(&self) -> bool {
        self.lane == Lane::Free && !self.waitlist.is_empty() && self.held < self.sellable_capacity()
    }
    /// Hands back the lane a change held alone.
    fn release_lane(&mut self) {
        assert_eq!(self.lane, Lane::Held, "{:?}: releasing a lane not held alone", self.id);
        self.lane = Lane::Free;
    }

    /// A change is about to wait for the lane alone: no join starts until it had its turn
    /// ([`Course::unwant_lane`] when it stops waiting).
    pub fn want_lane(&mut self) {
        self.lane_wanted += 1;
    }

    /// The change that called [`Course::want_lane`] stopped waiting. True when that lets
    /// joins held back for it start now (nobody else wants the lane and it is free), so
    /// they must be woken; otherwise whoever holds or wants the lane wakes them when done.
    /// (Saturating: the course may have been loaded anew meanwhile, with nobody waiting.)
    pub fn unwant_lane(&mut self) -> bool {
        self.lane_wanted = self.lane_wanted.saturating_sub(1);
        self.lane_wanted == 0 && self.lane == Lane::Free
    }

    /// Whether waitlist changes go through the lane (a drop may have to promote).
    fn uses_lane(&self) -> bool {
        self.spec.waitlist_max > 0 || !self.waitlist.is_empty()
    }
    /// The draw is due at `now` and may begin (nothing holds the lane, no entry in flight).
    pub fn draw_due(&self, now: UnixMs) -> bool {
        self.drawn_at.is_none() && !self.drawing && self.spec.draw_at.is_some_and(|t| now >= t)
    }
    pub fn drawing(&self) -> bool {
        self.drawing
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

    /// The seat decision without taking the seat: `Reserved`, `Enter` and `Join` mean
    /// "would take". A course with no places, no draw and no waitlist (the rush's 409 path)
    /// decides exactly as before the rounds, with two more field reads.
    pub fn peek_enroll(&self, student: &StudentId, now: UnixMs) -> EnrollDecision {
        match self.seats.get(student) {
            Some(Seat::Enrolled { at }) => return EnrollDecision::Already { at: *at },
            Some(_) => return EnrollDecision::InFlight,
            None => {}
        }
        if !self.places.is_empty() {
            match self.places.get(student) {
                Some(Place::Entry {
                    at,
                    state: Pending::Settled,
                }) => return EnrollDecision::Entered { at: *at },
                Some(Place::Wait {
                    rank,
                    state: Pending::Settled,
                    ..
                }) => {
                    return EnrollDecision::Waiting {
                        position: self.position(*rank),
                    }
                }
                Some(_) => return EnrollDecision::InFlight,
                None => {}
            }
        }
        if !self.is_open(now) {
            return EnrollDecision::Closed;
        }
        if let (Some(draw_at), None) = (self.spec.draw_at, self.drawn_at) {
            return if now < draw_at && !self.drawing {
                if self.entries >= DRAW_ENTRIES_MAX {
                    EnrollDecision::Full
                } else {
                    EnrollDecision::Enter { at: now }
                }
            } else {
                EnrollDecision::DrawPending
            };
        }
        if self.held < self.sellable_capacity() && self.waitlist.is_empty() {
            return EnrollDecision::Reserved { at: now };
        }
        // Full, or (a seat free while someone waits: being promoted) behind the waitlist.
        if self.spec.waitlist_max == 0 || self.waitlist.len() as u32 >= self.spec.waitlist_max {
            return EnrollDecision::Full;
        }
        let may_join = match self.lane {
            // Not while a seat is free for the head (the repair promotion goes first).
            Lane::Free => self.held >= self.sellable_capacity() || self.waitlist.is_empty(),
            Lane::Joins(n) => n < JOINS_IN_FLIGHT_MAX,
            Lane::Held => false,
        };
        if !may_join || self.lane_wanted > 0 {
            return EnrollDecision::LaneBusy;
        }
        EnrollDecision::Join {
            rank: self.next_rank,
            at: now,
        }
    }

    /// The seat decision. Order: a student who holds the seat (or a place) always hears
    /// so (even after the window closed, so a lost answer can be retried), then the
    /// window, then the draw, then stock, then the waitlist.
    pub fn enroll(&mut self, student: &StudentId, now: UnixMs) -> EnrollDecision {
        let decision = self.peek_enroll(student, now);
        match decision {
            EnrollDecision::Reserved { at } => {
                self.seats.insert(student.clone(), Seat::EnrollPending { at });
                self.held += 1;
            }
            EnrollDecision::Enter { at } => {
                self.places.insert(
                    student.clone(),
                    Place::Entry {
                        at,
                        state: Pending::Adding,
                    },
                );
                self.entries += 1;
                self.entries_in_flight += 1;
            }
            EnrollDecision::Join { rank, at } => {
                self.places.insert(
                    student.clone(),
                    Place::Wait {
                        rank,
                        at,
                        state: Pending::Adding,
                    },
                );
                self.waitlist.push_back((rank, student.clone()));
                self.next_rank = rank + 1;
                self.lane = match self.lane {
                    Lane::Free => Lane::Joins(1),
                    Lane::Joins(n) => Lane::Joins(n + 1),
                    Lane::Held => unreachable!("peek_enroll refuses a join while the lane is held"),
                };
            }
            _ => return decision,
        }
        self.check();
        decision
    }

    /// The pending place (an entry or a waitlist place) was committed.
    pub fn confirm_place(&mut self, student: &StudentId) {
        self.end_place_change(student, Pending::Adding, Some(Pending::Settled), "confirm_place");
    }

    /// The pending place was not committed: it goes.
    pub fn release_place(&mut self, student: &StudentId) {
        self.end_place_change(student, Pending::Adding, None, "release_place");
    }

    /// A change to a place settled: the place was `from` while in flight and is now `to`
    /// (None: gone). An entry's change leaves the entries in flight; a waitlist place's
    /// hands the lane back.
    fn end_place_change(&mut self, student: &StudentId, from: Pending, to: Option<Pending>, what: &str) {
        let place = self.places.get(student).copied();
        let Some(place) = place.filter(|p| p.state() == from) else {
            panic!("{what} of {:?} {student:?}: the place is {place:?}", self.id);
        };
        match to {
            None => {
                self.remove_place(student);
            }
            Some(state) => self.places.get_mut(student).expect("found above").set_state(state),
        }
        match (place, from) {
            (Place::Entry { .. }, _) => self.entries_in_flight -= 1,
            (Place::Wait { .. }, Pending::Adding) => {
                self.lane = match self.lane {
                    Lane::Joins(1) => Lane::Free,
                    Lane::Joins(n) => Lane::Joins(n - 1),
                    other => panic!(
                        "{what} of {:?} {student:?}: a join ended, the lane is {other:?}",
                        self.id
                    ),
                }
            }
            (Place::Wait { .. }, _) => self.release_lane(),
        }
        self.check();
    }

    /// Removes a place from every index.
    fn remove_place(&mut self, student: &StudentId) -> Place {
        let place = self.places.remove(student).expect("a place to remove");
        match place {
            Place::Entry { .. } => self.entries -= 1,
            Place::Wait { rank, .. } => {
                let i = self.waitlist.partition_point(|(r, _)| *r < rank);
                assert!(
                    self.waitlist.get(i).is_some_and(|(r, s)| *r == rank && s == student),
                    "{:?}: waitlist out of step with places",
                    self.id
                );
                self.waitlist.remove(i);
                self.waitlist_over = self.waitlist_over.min(self.waitlist.len() as u32);
            }
        }
        place
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

    /// A DELETE: drops a seat (promoting the head of the waitlist in the same commit),
    /// withdraws an entry, or leaves the waitlist.
    pub fn drop_seat(&mut self, student: &StudentId) -> DropDecision {
        match self.seats.get(student) {
            Some(Seat::Enrolled { .. }) => {}
            Some(_) => return DropDecision::InFlight,
            None => return self.drop_place(student),
        }
        let mut promote = None;
        let lane = self.uses_lane();
        if lane {
            if self.lane != Lane::Free {
                return DropDecision::LaneBusy;
            }
            self.lane = Lane::Held;
            if let Some((_, head)) = self.waitlist.front() {
                let head = head.clone();
                let place = self.places.get_mut(&head).expect("waitlisted students have places");
                // The lane was free, so no waitlist place is in flight.
                assert_eq!(
                    place.state(),
                    Pending::Settled,
                    "{:?}: lane free, head in flight",
                    self.id
                );
                place.set_state(Pending::Promoting);
                let Place::Wait { at, .. } = *place else {
                    unreachable!("the waitlist holds waits")
                };
                promote = Some((head, at));
            }
        }
        let seat = self.seats.get_mut(student).expect("checked above");
        let Seat::Enrolled { at } = *seat else {
            unreachable!("checked above")
        };
        *seat = Seat::DropPending { at };
        self.rendered.take();
        DropDecision::Dropping { promote, lane }
    }

    fn drop_place(&mut self, student: &StudentId) -> DropDecision {
        let Some(place) = self.place(student) else {
            return DropDecision::NotEnrolled;
        };
        if place.state() != Pending::Settled {
            return DropDecision::InFlight;
        }
        match place {
            Place::Entry { .. } if self.drawing => return DropDecision::DrawPending,
            Place::Entry { .. } => self.entries_in_flight += 1,
            Place::Wait { .. } if self.lane != Lane::Free => return DropDecision::LaneBusy,
            Place::Wait { .. } => self.lane = Lane::Held,
        }
        self.places
            .get_mut(student)
            .expect("found above")
            .set_state(Pending::Removing);
        self.rendered.take();
        match place {
            Place::Entry { .. } => DropDecision::Withdrawing,
            Place::Wait { .. } => DropDecision::Leaving,
        }
    }

    /// The withdrawal or leave was committed.
    pub fn confirm_unplace(&mut self, student: &StudentId) {
        self.end_place_change(student, Pending::Removing, None, "confirm_unplace");
    }

    /// The withdrawal or leave was not committed: the place stays.
    pub fn cancel_unplace(&mut self, student: &StudentId) {
        self.end_place_change(student, Pending::Removing, Some(Pending::Settled), "cancel_unplace");
    }

    /// The drop was committed: the seat is free for the next student at once, or was
    /// given to `promoted` in the same commit.
    pub fn confirm_drop(&mut self, student: &StudentId, promoted: Option<&StudentId>, lane: bool) {
        let removed = self.seats.remove(student);
        assert!(
            matches!(removed, Some(Seat::DropPending { .. })),
            "confirm_drop without a pending drop: {:?} {student:?}",
            self.id
        );
        self.held -= 1;
        self.committed -= 1;
        if let Some(p) = promoted {
            self.promoted(p);
        }
        if lane {
            self.release_lane();
        }
        self.loaded_over = self.loaded_over.min(self.held.saturating_sub(self.sellable_capacity()));
        self.check();
    }

    /// A `Promoting` place's commit gave it a seat.
    fn promoted(&mut self, student: &StudentId) {
        let place = self.remove_place(student);
        let Place::Wait {
            at,
            state: Pending::Promoting,
            ..
        } = place
        else {
            panic!("{:?}: promoted {student:?} from {place:?}", self.id)
        };
        self.seats.insert(student.clone(), Seat::Enrolled { at });
        self.held += 1;
        self.committed += 1;
    }

    /// The drop was not committed: the student keeps the seat, and the head its place.
    pub fn cancel_drop(&mut self, student: &StudentId, promoted: Option<&StudentId>, lane: bool) {
        let seat = self.seats.get_mut(student);
        let Some(seat @ Seat::DropPending { .. }) = seat else {
            panic!("cancel_drop without a pending drop: {:?} {student:?}", self.id);
        };
        let Seat::DropPending { at } = *seat else {
            unreachable!()
        };
        *seat = Seat::Enrolled { at };
        if let Some(p) = promoted {
            self.places
                .get_mut(p)
                .expect("a promoting place")
                .set_state(Pending::Settled);
        }
        if lane {
            self.release_lane();
        }
        self.check();
    }

    /// A seat free while someone waits (after a failed enrollment commit, or as loaded):
    /// takes the lane and marks the head that gets it `Promoting`. None when there is
    /// nothing to promote or the lane is busy.
    pub fn begin_promote(&mut self) -> Option<(StudentId, UnixMs)> {
        if !self.needs_promotion() || self.capacity_in_flight.is_some() || self.drawing {
            return None;
        }
        let head = self.take_heads(1).pop()?;
        self.lane = Lane::Held;
        Some(head)
    }

    /// Marks up to `n` settled heads `Promoting` and returns them.
    fn take_heads(&mut self, n: usize) -> Vec<(StudentId, UnixMs)> {
        let heads: Vec<StudentId> = self.waitlist.iter().take(n).map(|(_, s)| s.clone()).collect();
        heads
            .into_iter()
            .map(|s| {
                let place = self.places.get_mut(&s).expect("waitlisted students have places");
                assert_eq!(
                    place.state(),
                    Pending::Settled,
                    "{:?}: promoting a head in flight",
                    self.id
                );
                place.set_state(Pending::Promoting);
                let Place::Wait { at, .. } = *place else {
                    unreachable!("the waitlist holds waits")
                };
                (s, at)
            })
            .collect()
    }

    /// The promotion begun by [`Course::begin_promote`] committed (`applied`) or not.
    pub fn end_promote(&mut self, student: &StudentId, applied: bool) {
        if applied {
            self.promoted(student);
        } else {
            self.places
                .get_mut(student)
                .expect("a promoting place")
                .set_state(Pending::Settled);
        }
        self.release_lane();
        self.check();
    }

    /// Starts an admin change: capacity may not go below the seats held, and until the
    /// change settles the course sells only up to the lower of the old and new capacity,
    /// so whichever way the commit goes no seat is sold beyond it. The rounds' rules: the
    /// draw's time cannot change once it ran, nor move into the past or away while entries
    /// wait for it; `waitlist_max` cannot go below the students waiting. A capacity raise
    /// gives the new seats to the heads of the waitlist in the same commit.
    pub fn begin_spec(&mut self, spec: &CourseSpec, now: UnixMs) -> SpecDecision {
        if self.capacity_in_flight.is_some() || self.drawing {
            return SpecDecision::InFlight;
        }
        if spec.capacity < self.held {
            return SpecDecision::BelowHeld;
        }
        if self.drawn_at.is_some() {
            if spec.draw_at != self.spec.draw_at {
                return SpecDecision::Refused("the draw already ran: draw_at cannot change");
            }
        } else if self.entries > 0 {
            match spec.draw_at {
                None => return SpecDecision::Refused("students entered the draw: draw_at cannot be removed"),
                Some(t) if t < now && spec.draw_at != self.spec.draw_at => {
                    return SpecDecision::Refused("students entered the draw: draw_at cannot move into the past")
                }
                Some(_) => {}
            }
        }
        if (spec.waitlist_max as usize) < self.waitlist.len() {
            return SpecDecision::Refused("waitlist_max cannot go below the students waiting");
        }
        let lane = self.uses_lane() || spec.waitlist_max > 0;
        if lane && self.lane != Lane::Free {
            return SpecDecision::LaneBusy;
        }
        // A waitlist switched on while a drop that took no lane is in flight: that drop
        // would free its seat with nobody promoted, after a student joined behind it.
        if lane && !self.uses_lane() && self.seats.values().any(|s| matches!(s, Seat::DropPending { .. })) {
            return SpecDecision::LaneBusy;
        }
        let promote = if spec.capacity > self.held {
            self.take_heads((spec.capacity - self.held) as usize)
        } else {
            Vec::new()
        };
        if lane {
            self.lane = Lane::Held;
        }
        self.capacity_in_flight = Some(spec.capacity.min(self.spec.capacity));
        self.rendered.take();
        SpecDecision::Begun { promote, lane }
    }

    /// The admin change begun with [`Course::begin_spec`] committed with `version`, with
    /// its promotions.
    pub fn apply_spec(&mut self, spec: CourseSpec, version: u64, promoted: &[(StudentId, UnixMs)], lane: bool) {
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
        for (s, _) in promoted {
            self.promoted(s);
        }
        if lane {
            self.release_lane();
        }
        self.loaded_over = self.loaded_over.min(self.held.saturating_sub(self.sellable_capacity()));
        self.check();
    }

    /// The admin change did not commit.
    pub fn abort_spec(&mut self, promoted: &[(StudentId, UnixMs)], lane: bool) {
        self.capacity_in_flight = None;
        for (s, _) in promoted {
            self.places
                .get_mut(s)
                .expect("a promoting place")
                .set_state(Pending::Settled);
        }
        if lane {
            self.release_lane();
        }
        self.rendered.take();
    }

    /// Begins the draw if it is due and may run (nothing holds the lane, no entry or admin
    /// change in flight): takes the lane and returns the entrants in id order (arrival
    /// order must not matter, and is not kept).
    pub fn begin_draw(&mut self, now: UnixMs) -> Option<Vec<StudentId>> {
        if !self.draw_due(now)
            || self.lane != Lane::Free
            || self.entries_in_flight > 0
            || self.capacity_in_flight.is_some()
        {
            return None;
        }
        self.lane = Lane::Held;
        self.drawing = true;
        let mut entrants: Vec<StudentId> = self
            .places
            .iter()
            .filter(|(_, p)| matches!(p, Place::Entry { .. }))
            .map(|(s, _)| s.clone())
            .collect();
        entrants.sort_unstable();
        Some(entrants)
    }

    /// How a draw of `n` entries is cut: (seats, waitlist places), in drawn order; the rest
    /// are not selected. Also the rank the first waitlist place gets.
    pub fn draw_cut(&self, n: u32) -> (u32, u32, u64) {
        let seats = n.min(self.sellable_capacity().saturating_sub(self.held));
        let room = self.spec.waitlist_max.saturating_sub(self.waitlist.len() as u32);
        (seats, (n - seats).min(room), self.next_rank)
    }

    /// The draw begun with [`Course::begin_draw`] committed as `record`.
    pub fn apply_draw(&mut self, record: &DrawRecord) {
        assert!(self.drawing, "{:?}: apply_draw without begin_draw", self.id);
        self.places.retain(|_, p| !matches!(p, Place::Entry { .. }));
        self.entries = 0;
        let (seats, rest) = record.order.split_at(record.seats as usize);
        for s in seats {
            let earlier = self.seats.insert(s.clone(), Seat::Enrolled { at: record.drawn_at });
            assert!(earlier.is_none(), "{:?}: {s:?} drawn while holding a seat", self.id);
            self.held += 1;
            self.committed += 1;
        }
        for (i, s) in rest.iter().take(record.waitlisted as usize).enumerate() {
            let rank = record.first_rank + i as u64;
            assert!(
                self.waitlist.back().is_none_or(|(r, _)| *r < rank),
                "{:?}: draw ranks out of order",
                self.id
            );
            self.waitlist.push_back((rank, s.clone()));
            self.places.insert(
                s.clone(),
                Place::Wait {
                    rank,
                    at: record.drawn_at,
                    state: Pending::Settled,
                },
            );
            self.next_rank = rank + 1;
        }
        self.drawn_at = Some(record.drawn_at);
        self.drawing = false;
        self.release_lane();
        self.check();
    }

    /// The draw did not commit: the entries stand, and it runs again.
    pub fn abort_draw(&mut self) {
        assert!(self.drawing, "{:?}: abort_draw without begin_draw", self.id);
        self.drawing = false;
        self.release_lane();
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
        assert!(
            self.waitlist.len() as u32 <= self.spec.waitlist_max + self.waitlist_over,
            "{:?}: {} waiting > waitlist_max {}",
            self.id,
            self.waitlist.len(),
            self.spec.waitlist_max
        );
    }
}
