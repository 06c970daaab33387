//! Seeded randomized model test of the seat state machine ([`Course`]), in the style of
//! TigerBeetle's VOPR. It covers the registration rounds too: entries in a draw, the draw
//! itself, waitlist places and their promotion, and the course's lane.
//!
//! Why: `Course` is the one place a seat is decided, and its promises (never oversold, a
//! pending seat counts against capacity in both directions, an admin change in flight sells
//! only the lower of the old and new capacity) depend on how enrolls, drops, their commits
//! and aborts, capacity changes and start-up loads interleave. Hand-written cases cover the
//! interleavings someone thought of; this drives tens of thousands of random ones against a
//! deliberately naive reference model and compares every decision and every observable count
//! after every step. Few students and small capacities make collisions and full courses
//! common.
//!
//! Replay: a failure names its seed, the op index and the last ops. Run one seed (before the
//! fixed ones) with `ENROLLD_MODEL_SEED=<seed> cargo test --lib shard::model_test`; set
//! `ENROLLD_MODEL_OPS=<n>` to run that seed longer.

use std::collections::{BTreeMap, VecDeque};
use std::panic::{self, AssertUnwindSafe};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::course::{
    Course, CourseSpec, DrawRecord, DropDecision, EnrollDecision, Pending, Place, Seat, SpecDecision,
    JOINS_IN_FLIGHT_MAX,
};
use crate::ids::{CourseId, StudentId, UnixMs};

/// Fixed seeds, run on every `cargo test`.
const SEEDS: [u64; 24] = [
    0,
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    42,
    1_337,
    9_001,
    65_535,
    0xdead_beef,
    0xcafe_f00d,
    0x5eed_0001,
    0x5eed_0002,
    0x5eed_0003,
    0x0123_4567_89ab_cdef,
    0xfedc_ba98_7654_3210,
    u64::MAX,
    u64::MAX - 1,
    1 << 32,
    (1 << 63) + 17,
    314_159_265_358,
];
/// Ops per seed unless `ENROLLD_MODEL_OPS` says otherwise (env seed only).
const OPS_PER_SEED: usize = 5_000;
/// Students in play: few, so the same student collides with its own in-flight changes.
const STUDENTS: usize = 12;
/// Largest capacity the generator picks (plus `held + 1` on the capacity-edge path).
const CAPACITY_GEN_MAX: u32 = 5;
/// Largest waitlist the generator picks.
const WAITLIST_GEN_MAX: u32 = 4;
/// Ops remembered for the failure message.
const LOG_OPS_MAX: usize = 16;

/// Window bounds the generator picks from; the clock ranges over `0..CLOCK_MAX`.
const OPENS_AT: UnixMs = 1_000;
const OPENS_AT_LATE: UnixMs = 1_500;
const CLOSES_AT: UnixMs = 2_000;
const CLOSES_AT_LATE: UnixMs = 2_500;
const CLOCK_MAX: UnixMs = 3_000;

/// The reference model's view of one student's seat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ModelSeat {
    EnrollPending(UnixMs),
    Enrolled(UnixMs),
    DropPending(UnixMs),
}

/// The reference model: the obvious, slow formulation of the rules, with no counters to
/// drift. Held and committed are recounted from the seat map every time.
struct Model {
    spec: CourseSpec,
    version: u64,
    /// The admin change begun and not yet applied or aborted, with the heads it promotes
    /// and whether it holds the lane.
    spec_in_flight: Option<(CourseSpec, Vec<usize>, bool)>,
    seats: BTreeMap<usize, ModelSeat>,
    /// Pending drops: the head each promotes, and whether it holds the lane.
    drops: BTreeMap<usize, (Option<usize>, bool)>,
    /// Most seats held right after a load: loads may go beyond capacity (the store is
    /// never second-guessed), reservations never do.
    load_peak: u32,
    /// Entries and waitlist places: (rank None for an entry, when asked, state).
    places: BTreeMap<usize, (Option<u64>, UnixMs, Pending)>,
    next_rank: u64,
    /// The lane is held alone (joins in flight share it: `joins_in_flight`).
    lane: bool,
    /// Changes waiting for the lane alone.
    wanted: u32,
    /// The draw begun: its entrants.
    drawing: Option<Vec<usize>>,
    drawn: bool,
    /// The head a repair promotion is giving a seat.
    promoting: Option<usize>,
    /// Most waitlist places right after a load.
    wait_load_peak: u32,
}

impl Model {
    fn held(&self) -> u32 {
        self.seats.len() as u32
    }

    fn committed(&self) -> u32 {
        self.seats
            .values()
            .filter(|s| !matches!(s, ModelSeat::EnrollPending(_)))
            .count() as u32
    }

    fn sellable(&self) -> u32 {
        match &self.spec_in_flight {
            Some((new, ..)) => new.capacity.min(self.spec.capacity),
            None => self.spec.capacity,
        }
    }

    fn is_open(&self, now: UnixMs) -> bool {
        self.spec.opens_at.map_or(true, |t| now >= t) && self.spec.closes_at.map_or(true, |t| now < t)
    }

    /// Every waitlist place (in flight or not), in rank order.
    fn waitlist(&self) -> Vec<usize> {
        let mut w: Vec<(u64, usize)> = self
            .places
            .iter()
            .filter_map(|(s, (rank, _, _))| rank.map(|r| (r, *s)))
            .collect();
        w.sort();
        w.into_iter().map(|(_, s)| s).collect()
    }

    fn entries(&self) -> Vec<usize> {
        self.places
            .iter()
            .filter(|(_, p)| p.0.is_none())
            .map(|(s, _)| *s)
            .collect()
    }

    fn entries_in_flight(&self) -> usize {
        self.places
            .values()
            .filter(|p| p.0.is_none() && p.2 != Pending::Settled)
            .count()
    }

    fn uses_lane(&self) -> bool {
        self.spec.waitlist_max > 0 || !self.waitlist().is_empty()
    }

    /// Waitlist places being added (joins share the lane).
    fn joins_in_flight(&self) -> usize {
        self.places
            .values()
            .filter(|p| p.0.is_some() && p.2 == Pending::Adding)
            .count()
    }

    /// Held alone or by joins: no other waitlist change may start.
    fn lane_busy(&self) -> bool {
        self.lane || self.joins_in_flight() > 0
    }

    fn needs_promotion(&self) -> bool {
        !self.lane_busy() && !self.waitlist().is_empty() && self.held() < self.sellable()
    }

    /// The enroll decision without taking the seat (what `peek_enroll` must answer).
    fn decide_enroll(&self, s: usize, now: UnixMs) -> EnrollDecision {
        match self.seats.get(&s) {
            Some(ModelSeat::Enrolled(at)) => return EnrollDecision::Already { at: *at },
            Some(_) => return EnrollDecision::InFlight,
            None => {}
        }
        match self.places.get(&s) {
            Some((None, at, Pending::Settled)) => return EnrollDecision::Entered { at: *at },
            Some((Some(_), _, Pending::Settled)) => {
                let position = self.waitlist().iter().position(|w| *w == s).expect("waiting") as u32 + 1;
                return EnrollDecision::Waiting { position };
            }
            Some(_) => return EnrollDecision::InFlight,
            None => {}
        }
        if !self.is_open(now) {
            return EnrollDecision::Closed;
        }
        if let (Some(draw_at), false) = (self.spec.draw_at, self.drawn) {
            return if now < draw_at && self.drawing.is_none() {
                EnrollDecision::Enter { at: now }
            } else {
                EnrollDecision::DrawPending
            };
        }
        let waiting = self.waitlist().len() as u32;
        if self.held() < self.sellable() && waiting == 0 {
            return EnrollDecision::Reserved { at: now };
        }
        if self.spec.waitlist_max == 0 || waiting >= self.spec.waitlist_max {
            return EnrollDecision::Full;
        }
        let joins = self.joins_in_flight();
        let may_join = if self.lane {
            false
        } else if joins > 0 {
            joins < JOINS_IN_FLIGHT_MAX as usize
        } else {
            self.held() >= self.sellable() || waiting == 0
        };
        if !may_join || self.wanted > 0 {
            return EnrollDecision::LaneBusy;
        }
        EnrollDecision::Join {
            rank: self.next_rank,
            at: now,
        }
    }

    fn enroll(&mut self, s: usize, now: UnixMs) -> EnrollDecision {
        let decision = self.decide_enroll(s, now);
        match decision {
            EnrollDecision::Reserved { at } => {
                self.seats.insert(s, ModelSeat::EnrollPending(at));
            }
            EnrollDecision::Enter { at } => {
                self.places.insert(s, (None, at, Pending::Adding));
            }
            EnrollDecision::Join { rank, at } => {
                self.places.insert(s, (Some(rank), at, Pending::Adding));
                self.next_rank = rank + 1;
            }
            _ => {}
        }
        decision
    }

    /// Marks the first `n` waitlist places `Promoting` and names them.
    fn take_heads(&mut self, n: usize) -> Vec<usize> {
        let heads: Vec<usize> = self.waitlist().into_iter().take(n).collect();
        for h in &heads {
            let p = self.places.get_mut(h).expect("waiting");
            assert_eq!(p.2, Pending::Settled, "model: promoting a head in flight");
            p.2 = Pending::Promoting;
        }
        heads
    }

    /// A promoted head takes its seat.
    fn promoted(&mut self, s: usize) {
        let (_, at, _) = self.places.remove(&s).expect("a promoting place");
        self.seats.insert(s, ModelSeat::Enrolled(at));
    }

    fn drop_seat(&mut self, s: usize) -> (DropDecision, Option<usize>) {
        match self.seats.get(&s).copied() {
            Some(ModelSeat::Enrolled(at)) => {
                let lane = self.uses_lane();
                let mut promote = None;
                if lane {
                    if self.lane_busy() {
                        return (DropDecision::LaneBusy, None);
                    }
                    self.lane = true;
                    promote = self.take_heads(1).pop();
                }
                self.seats.insert(s, ModelSeat::DropPending(at));
                self.drops.insert(s, (promote, lane));
                return (DropDecision::Dropping { promote: None, lane }, promote);
            }
            Some(_) => return (DropDecision::InFlight, None),
            None => {}
        }
        let Some((rank, _, state)) = self.places.get(&s).copied() else {
            return (DropDecision::NotEnrolled, None);
        };
        if state != Pending::Settled {
            return (DropDecision::InFlight, None);
        }
        let decision = match rank {
            None if self.drawing.is_some() => return (DropDecision::DrawPending, None),
            None => DropDecision::Withdrawing,
            Some(_) if self.lane_busy() => return (DropDecision::LaneBusy, None),
            Some(_) => {
                self.lane = true;
                DropDecision::Leaving
            }
        };
        self.places.get_mut(&s).expect("found").2 = Pending::Removing;
        (decision, None)
    }

    fn begin_spec(&mut self, spec: &CourseSpec, now: UnixMs) -> (SpecDecision, Vec<usize>) {
        let none = Vec::new();
        if self.spec_in_flight.is_some() || self.drawing.is_some() {
            return (SpecDecision::InFlight, none);
        }
        if spec.capacity < self.held() {
            return (SpecDecision::BelowHeld, none);
        }
        if self.drawn {
            if spec.draw_at != self.spec.draw_at {
                return (
                    SpecDecision::Refused("the draw already ran: draw_at cannot change"),
                    none,
                );
            }
        } else if !self.entries().is_empty() {
            match spec.draw_at {
                None => {
                    return (
                        SpecDecision::Refused("students entered the draw: draw_at cannot be removed"),
                        none,
                    )
                }
                Some(t) if t < now && spec.draw_at != self.spec.draw_at => {
                    return (
                        SpecDecision::Refused("students entered the draw: draw_at cannot move into the past"),
                        none,
                    )
                }
                Some(_) => {}
            }
        }
        if (spec.waitlist_max as usize) < self.waitlist().len() {
            return (
                SpecDecision::Refused("waitlist_max cannot go below the students waiting"),
                none,
            );
        }
        let lane = self.uses_lane() || spec.waitlist_max > 0;
        if lane && self.lane_busy() {
            return (SpecDecision::LaneBusy, none);
        }
        if lane && !self.uses_lane() && self.seats.values().any(|s| matches!(s, ModelSeat::DropPending(_))) {
            return (SpecDecision::LaneBusy, none);
        }
        let heads = if spec.capacity > self.held() {
            self.take_heads((spec.capacity - self.held()) as usize)
        } else {
            Vec::new()
        };
        self.lane |= lane;
        self.spec_in_flight = Some((spec.clone(), heads.clone(), lane));
        (
            SpecDecision::Begun {
                promote: Vec::new(),
                lane,
            },
            heads,
        )
    }

    fn load_enrolled(&mut self, s: usize, at: UnixMs) -> bool {
        if self.seats.contains_key(&s) || self.places.contains_key(&s) {
            return false;
        }
        self.seats.insert(s, ModelSeat::Enrolled(at));
        self.load_peak = self.load_peak.max(self.held());
        true
    }

    fn load_place(&mut self, s: usize, rank: Option<u64>, at: UnixMs) -> bool {
        if self.seats.contains_key(&s) || self.places.contains_key(&s) {
            return false;
        }
        self.places.insert(s, (rank, at, Pending::Settled));
        if let Some(r) = rank {
            self.next_rank = self.next_rank.max(r + 1);
        }
        self.wait_load_peak = self.wait_load_peak.max(self.waitlist().len() as u32);
        true
    }

    /// Students in a given state, in index order (for picking one at random).
    fn students_in(&self, want: fn(&ModelSeat) -> bool) -> Vec<usize> {
        self.seats.iter().filter(|(_, s)| want(s)).map(|(k, _)| *k).collect()
    }

    /// Seats free while anyone waits.
    fn starving(&self) -> u32 {
        if self.waitlist().is_empty() {
            0
        } else {
            self.sellable().saturating_sub(self.held())
        }
    }

    /// Students whose place is in a given state.
    fn placed_in(&self, state: Pending) -> Vec<usize> {
        self.places
            .iter()
            .filter(|(_, p)| p.2 == state)
            .map(|(k, _)| *k)
            .collect()
    }
}

/// Outcome counts over all seeds, so the test fails if the generator stops reaching a path.
#[derive(Default)]
struct Coverage(BTreeMap<&'static str, u64>);

impl Coverage {
    fn hit(&mut self, what: &'static str) {
        *self.0.entry(what).or_default() += 1;
    }
    fn merge(&mut self, other: Coverage) {
        for (k, v) in other.0 {
            *self.0.entry(k).or_default() += v;
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Enroll,
    ConfirmEnroll,
    ReleaseEnroll,
    DropSeat,
    ConfirmDrop,
    CancelDrop,
    BeginSpec,
    ApplySpec,
    AbortSpec,
    LoadEnrolled,
    ConfirmPlace,
    ReleasePlace,
    ConfirmUnplace,
    CancelUnplace,
    BeginDraw,
    EndDraw,
    BeginPromote,
    EndPromote,
    LoadPlace,
    NewCourse,
    WantLane,
    UnwantLane,
}

impl Op {
    const ALL: [Op; 22] = [
        Op::Enroll,
        Op::ConfirmEnroll,
        Op::ReleaseEnroll,
        Op::DropSeat,
        Op::ConfirmDrop,
        Op::CancelDrop,
        Op::BeginSpec,
        Op::ApplySpec,
        Op::AbortSpec,
        Op::LoadEnrolled,
        Op::ConfirmPlace,
        Op::ReleasePlace,
        Op::ConfirmUnplace,
        Op::CancelUnplace,
        Op::BeginDraw,
        Op::EndDraw,
        Op::BeginPromote,
        Op::EndPromote,
        Op::LoadPlace,
        Op::NewCourse,
        Op::WantLane,
        Op::UnwantLane,
    ];

    /// Relative frequency before the per-seed swarm factor (1-4x) is applied.
    fn base_weight(self) -> u32 {
        match self {
            Op::Enroll => 30,
            Op::ConfirmEnroll => 10,
            Op::ReleaseEnroll => 7,
            Op::DropSeat => 14,
            Op::ConfirmDrop => 10,
            Op::CancelDrop => 3,
            Op::BeginSpec => 9,
            Op::ApplySpec => 7,
            Op::AbortSpec => 3,
            Op::LoadEnrolled => 7,
            Op::ConfirmPlace => 10,
            Op::ReleasePlace => 3,
            Op::ConfirmUnplace => 6,
            Op::CancelUnplace => 2,
            Op::BeginDraw => 10,
            Op::EndDraw => 10,
            Op::BeginPromote => 4,
            Op::EndPromote => 4,
            Op::LoadPlace => 3,
            Op::NewCourse => 1,
            Op::WantLane => 2,
            Op::UnwantLane => 3,
        }
    }
}

/// One seed's run: the course under test, the model, and what is needed to report a failure.
struct Sim {
    seed: u64,
    rng: StdRng,
    /// Index of the op being run (reported on failure).
    op: usize,
    log: VecDeque<String>,
    students: Vec<StudentId>,
    course: Course,
    model: Model,
    coverage: Coverage,
    /// This seed's op mix (swarm testing: each seed leans a different way, so some keep the
    /// course full and others drain it to empty).
    weights: [u32; Op::ALL.len()],
    /// The op just run applied an admin change whose version was not newer.
    stale_apply: bool,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let students = (0..STUDENTS)
            .map(|i| StudentId::parse(&format!("s{i:02}")).expect("valid student id"))
            .collect();
        let capacity = rng.gen_range(0..=CAPACITY_GEN_MAX);
        let spec = random_spec(&mut rng, "initial", capacity);
        let version = rng.gen_range(1..=3);
        let weights = Op::ALL.map(|op| op.base_weight() * rng.gen_range(1..=4));
        let id = CourseId::parse("MODEL-101").expect("valid course id");
        Sim {
            seed,
            rng,
            op: 0,
            log: VecDeque::new(),
            students,
            course: Course::new(id, spec.clone(), version),
            model: Model::new(spec, version),
            coverage: Coverage::default(),
            weights,
            stale_apply: false,
        }
    }

    /// Starts over on a new course (each course draws once; the generator wants many).
    fn new_course(&mut self) {
        let capacity = self.rng.gen_range(0..=CAPACITY_GEN_MAX);
        let mut spec = random_spec(&mut self.rng, "again", capacity);
        if self.rng.gen_bool(0.7) {
            spec.draw_at = Some(OPENS_AT_LATE + 100);
        }
        self.note(format!("new_course {spec:?}"));
        self.course = Course::new(CourseId::parse("MODEL-102").expect("valid course id"), spec.clone(), 1);
        self.model = Model::new(spec, 1);
        self.coverage.hit("new_course");
    }
}

impl Model {
    fn new(spec: CourseSpec, version: u64) -> Model {
        Model {
            spec,
            version,
            spec_in_flight: None,
            seats: BTreeMap::new(),
            drops: BTreeMap::new(),
            load_peak: 0,
            places: BTreeMap::new(),
            next_rank: 1,
            lane: false,
            wanted: 0,
            drawing: None,
            drawn: false,
            promoting: None,
            wait_load_peak: 0,
        }
    }
}

impl Sim {
    /// Seed, op index and recent ops: everything needed to replay and read a failure.
    fn ctx(&self) -> String {
        let recent: Vec<&str> = self.log.iter().map(String::as_str).collect();
        format!(
            "seed {} op {} (replay: ENROLLD_MODEL_SEED={} cargo test --lib shard::model_test)\n\
             last ops:\n  {}",
            self.seed,
            self.op,
            self.seed,
            recent.join("\n  ")
        )
    }

    fn note(&mut self, line: String) {
        if self.log.len() == LOG_OPS_MAX {
            self.log.pop_front();
        }
        self.log.push_back(format!("#{} {line}", self.op));
    }

    fn run(&mut self, ops: usize) {
        self.check_state();
        for op in 0..ops {
            self.op = op;
            self.step();
            self.check_state();
        }
    }

    fn step(&mut self) {
        let total: u32 = self.weights.iter().sum();
        let mut roll = self.rng.gen_range(0..total);
        let mut op = 0;
        while roll >= self.weights[op] {
            roll -= self.weights[op];
            op += 1;
        }
        let op = Op::ALL[op];
        let starving = self.model.starving();
        self.stale_apply = false;
        match op {
            Op::Enroll => self.enroll(),
            Op::ConfirmEnroll => self.confirm_enroll(),
            Op::ReleaseEnroll => self.release_enroll(),
            Op::DropSeat => self.drop_seat(),
            Op::ConfirmDrop => self.confirm_drop(),
            Op::CancelDrop => self.cancel_drop(),
            Op::BeginSpec => self.begin_spec(),
            Op::ApplySpec => self.apply_spec(),
            Op::AbortSpec => self.abort_spec(),
            Op::LoadEnrolled => self.load_enrolled(),
            Op::ConfirmPlace => self.end_place(true),
            Op::ReleasePlace => self.end_place(false),
            Op::ConfirmUnplace => self.end_unplace(true),
            Op::CancelUnplace => self.end_unplace(false),
            Op::BeginDraw => self.begin_draw(),
            Op::EndDraw => self.end_draw(),
            Op::BeginPromote => self.begin_promote(),
            Op::EndPromote => self.end_promote(),
            Op::LoadPlace => self.load_place(),
            Op::NewCourse => self.new_course(),
            Op::WantLane => {
                self.note("want_lane".into());
                self.model.wanted += 1;
                self.course.want_lane();
                self.coverage.hit("want_lane");
            }
            Op::UnwantLane => {
                self.note("unwant_lane".into());
                self.model.wanted = self.model.wanted.saturating_sub(1);
                let joins_may_go = self.model.wanted == 0 && !self.model.lane_busy();
                assert_eq!(self.course.unwant_lane(), joins_may_go, "unwant_lane; {}", self.ctx());
                self.coverage.hit("unwant_lane");
            }
        }
        // No decision frees a seat while anyone waits: a drop, a raise and a draw give
        // their seats to the heads. Only a failed commit (the seat held for it comes
        // free), an admin change that did not apply (its lower capacity lifted), and a
        // load can leave one, for a promotion to repair.
        let exempt = matches!(
            op,
            Op::ReleaseEnroll | Op::AbortSpec | Op::LoadEnrolled | Op::LoadPlace | Op::NewCourse
        ) || self.stale_apply;
        if !exempt {
            assert!(
                self.model.starving() <= starving,
                "{op:?} left {} seats free while {:?} wait (before: {starving}); {}",
                self.model.starving(),
                self.model.waitlist(),
                self.ctx()
            );
        }
    }

    /// A clock that is usually inside the window, sometimes outside, sometimes on an edge.
    fn pick_now(&mut self) -> UnixMs {
        match self.rng.gen_range(0..10) {
            0 => self.rng.gen_range(0..OPENS_AT),
            1 => self.rng.gen_range(CLOSES_AT..CLOCK_MAX),
            2 => {
                let edges = [
                    self.model.spec.opens_at,
                    self.model.spec.closes_at,
                    Some(OPENS_AT),
                    Some(CLOSES_AT),
                ];
                let edge = edges[self.rng.gen_range(0..edges.len())].unwrap_or(OPENS_AT);
                edge - self.rng.gen_range(0..=1)
            }
            _ => self.rng.gen_range(OPENS_AT..CLOSES_AT),
        }
    }

    fn enroll(&mut self) {
        let s = self.rng.gen_range(0..STUDENTS);
        let now = self.pick_now();
        self.note(format!("enroll s{s:02} now={now}"));
        let peeked = self.course.peek_enroll(&self.students[s], now);
        let sharing = self.model.joins_in_flight() > 0;
        let want = self.model.enroll(s, now);
        assert_eq!(peeked, want, "peek_enroll differs from the model; {}", self.ctx());
        let got = self.course.enroll(&self.students[s], now);
        assert_eq!(got, want, "enroll decision differs from the model; {}", self.ctx());
        self.coverage.hit(match want {
            EnrollDecision::Already { .. } => "enroll Already",
            EnrollDecision::InFlight => "enroll InFlight",
            EnrollDecision::Closed => "enroll Closed",
            // Full only because an admin change in flight sells min(old, new).
            EnrollDecision::Full if self.model.sellable() == 0 => "enroll Full at capacity 0",
            EnrollDecision::Full if self.model.held() < self.model.spec.capacity => "enroll Full by in-flight min",
            EnrollDecision::Full => "enroll Full",
            EnrollDecision::Reserved { .. } => "enroll Reserved",
            EnrollDecision::Entered { .. } => "enroll Entered",
            EnrollDecision::Waiting { .. } => "enroll Waiting",
            EnrollDecision::Enter { .. } => "enroll Enter",
            EnrollDecision::Join { .. } if sharing => "enroll Join sharing the lane",
            EnrollDecision::Join { .. } => "enroll Join",
            EnrollDecision::LaneBusy => "enroll LaneBusy",
            EnrollDecision::DrawPending => "enroll DrawPending",
        });
    }

    /// Picks a random student whose model seat matches, or notes a skip.
    fn pick(&mut self, what: &str, want: fn(&ModelSeat) -> bool) -> Option<usize> {
        let candidates = self.model.students_in(want);
        if candidates.is_empty() {
            self.note(format!("{what}: none pending, skipped"));
            return None;
        }
        let s = candidates[self.rng.gen_range(0..candidates.len())];
        self.note(format!("{what} s{s:02}"));
        Some(s)
    }

    fn confirm_enroll(&mut self) {
        let Some(s) = self.pick("confirm_enroll", |x| matches!(x, ModelSeat::EnrollPending(_))) else {
            return;
        };
        let Some(ModelSeat::EnrollPending(at)) = self.model.seats.get(&s).copied() else {
            unreachable!()
        };
        self.model.seats.insert(s, ModelSeat::Enrolled(at));
        self.course.confirm_enroll(&self.students[s]);
        self.coverage.hit("confirm_enroll");
    }

    fn release_enroll(&mut self) {
        let Some(s) = self.pick("release_enroll", |x| matches!(x, ModelSeat::EnrollPending(_))) else {
            return;
        };
        self.model.seats.remove(&s);
        self.course.release_enroll(&self.students[s]);
        self.coverage.hit("release_enroll");
    }

    fn drop_seat(&mut self) {
        // Half the time a student with a committed seat, so courses also drain to empty.
        let enrolled = self.model.students_in(|x| matches!(x, ModelSeat::Enrolled(_)));
        let s = if !enrolled.is_empty() && self.rng.gen_bool(0.5) {
            enrolled[self.rng.gen_range(0..enrolled.len())]
        } else {
            self.rng.gen_range(0..STUDENTS)
        };
        self.note(format!("drop_seat s{s:02}"));
        let (want, promote) = self.model.drop_seat(s);
        let want = match want {
            DropDecision::Dropping { lane, .. } => DropDecision::Dropping {
                promote: promote.map(|h| (self.students[h].clone(), self.place_at(h))),
                lane,
            },
            other => other,
        };
        let got = self.course.drop_seat(&self.students[s]);
        assert_eq!(got, want, "drop decision differs from the model; {}", self.ctx());
        self.coverage.hit(match want {
            DropDecision::NotEnrolled => "drop NotEnrolled",
            DropDecision::InFlight => "drop InFlight",
            DropDecision::Dropping { promote: Some(_), .. } => "drop Dropping promoting",
            DropDecision::Dropping { .. } => "drop Dropping",
            DropDecision::Withdrawing => "drop Withdrawing",
            DropDecision::Leaving => "drop Leaving",
            DropDecision::LaneBusy => "drop LaneBusy",
            DropDecision::DrawPending => "drop DrawPending",
        });
    }

    /// When a student's place was asked for.
    fn place_at(&self, s: usize) -> UnixMs {
        self.model.places[&s].1
    }

    fn end_drop(&mut self, committed: bool) {
        let what = if committed { "confirm_drop" } else { "cancel_drop" };
        let Some(s) = self.pick(what, |x| matches!(x, ModelSeat::DropPending(_))) else {
            return;
        };
        let (promote, lane) = self.model.drops.remove(&s).expect("a pending drop");
        let at = match self.model.seats.get(&s) {
            Some(ModelSeat::DropPending(at)) => *at,
            _ => unreachable!(),
        };
        if committed {
            self.model.seats.remove(&s);
            if let Some(h) = promote {
                self.model.promoted(h);
            }
        } else {
            self.model.seats.insert(s, ModelSeat::Enrolled(at));
            if let Some(h) = promote {
                self.model.places.get_mut(&h).expect("promoting").2 = Pending::Settled;
            }
        }
        if lane {
            self.model.lane = false;
        }
        let promoted = promote.map(|h| self.students[h].clone());
        if committed {
            self.course.confirm_drop(&self.students[s], promoted.as_ref(), lane);
        } else {
            self.course.cancel_drop(&self.students[s], promoted.as_ref(), lane);
        }
        self.coverage.hit(what);
    }

    fn confirm_drop(&mut self) {
        self.end_drop(true);
    }

    fn cancel_drop(&mut self) {
        self.end_drop(false);
    }

    /// A pending entry or waitlist place committed (or not).
    fn end_place(&mut self, committed: bool) {
        let (what, to) = if committed {
            ("confirm_place", Some(Pending::Settled))
        } else {
            ("release_place", None)
        };
        self.end_place_change(what, Pending::Adding, to);
    }

    /// A pending withdrawal or leave committed (or not).
    fn end_unplace(&mut self, committed: bool) {
        let (what, to) = if committed {
            ("confirm_unplace", None)
        } else {
            ("cancel_unplace", Some(Pending::Settled))
        };
        self.end_place_change(what, Pending::Removing, to);
    }

    /// A random place `from` (in flight) becomes `to` (None: gone), in the model and the
    /// course (`what` is the course's method); a waitlist place's change hands the lane back.
    fn end_place_change(&mut self, what: &'static str, from: Pending, to: Option<Pending>) {
        let candidates = self.model.placed_in(from);
        if candidates.is_empty() {
            self.note(format!("{what}: none pending, skipped"));
            return;
        }
        let s = candidates[self.rng.gen_range(0..candidates.len())];
        self.note(format!("{what} s{s:02}"));
        let rank = self.model.places[&s].0;
        match to {
            Some(state) => self.model.places.get_mut(&s).expect("in flight").2 = state,
            None => {
                self.model.places.remove(&s);
            }
        }
        let student = &self.students[s];
        match what {
            "confirm_place" => self.course.confirm_place(student),
            "release_place" => self.course.release_place(student),
            "confirm_unplace" => self.course.confirm_unplace(student),
            _ => self.course.cancel_unplace(student),
        }
        // A leave held the lane alone; a join shared it (counted from the places).
        if rank.is_some() && from == Pending::Removing {
            self.model.lane = false;
        }
        self.coverage.hit(what);
    }

    fn begin_draw(&mut self) {
        let now = self.pick_now();
        let m = &self.model;
        let due = m.spec.draw_at.is_some_and(|t| now >= t) && !m.drawn && m.drawing.is_none();
        let may = due && !m.lane_busy() && m.entries_in_flight() == 0 && m.spec_in_flight.is_none();
        self.note(format!("begin_draw now={now} (may: {may})"));
        assert_eq!(
            self.course.draw_due(now),
            due,
            "draw_due differs from the model; {}",
            self.ctx()
        );
        let got = self.course.begin_draw(now);
        if !may {
            assert_eq!(got, None, "a draw began that may not; {}", self.ctx());
            return;
        }
        let entrants = self.model.entries();
        let want: Vec<StudentId> = entrants.iter().map(|s| self.students[*s].clone()).collect();
        assert_eq!(got, Some(want), "draw entrants differ from the model; {}", self.ctx());
        self.model.lane = true;
        self.model.drawing = Some(entrants);
        self.coverage.hit("begin_draw");
    }

    fn end_draw(&mut self) {
        let Some(mut order) = self.model.drawing.take() else {
            self.note("end_draw: none running, skipped".to_string());
            return;
        };
        let committed = self.rng.gen_ratio(2, 3);
        self.note(format!("end_draw committed={committed}"));
        self.model.lane = false;
        if !committed {
            self.course.abort_draw();
            self.coverage.hit("abort_draw");
            return;
        }
        // Any order: the shuffle is the shard's; the cut is the course's.
        for i in (1..order.len()).rev() {
            order.swap(i, self.rng.gen_range(0..=i));
        }
        let m = &self.model;
        let n = order.len() as u32;
        let seats = n.min(m.sellable().saturating_sub(m.held()));
        let room = m.spec.waitlist_max.saturating_sub(m.waitlist().len() as u32);
        let waitlisted = (n - seats).min(room);
        assert_eq!(
            self.course.draw_cut(n),
            (seats, waitlisted, m.next_rank),
            "draw cut differs from the model; {}",
            self.ctx()
        );
        let drawn_at = CLOSES_AT;
        let record = DrawRecord {
            drawn_at,
            seed: "00".repeat(32),
            order: order.iter().map(|s| self.students[*s].clone()).collect(),
            seats,
            waitlisted,
            first_rank: m.next_rank,
        };
        let first_rank = m.next_rank;
        for s in &order {
            self.model.places.remove(s);
        }
        for (i, s) in order.iter().enumerate() {
            let i = i as u32;
            if i < seats {
                self.model.seats.insert(*s, ModelSeat::Enrolled(drawn_at));
            } else if i < seats + waitlisted {
                let rank = first_rank + u64::from(i - seats);
                self.model.places.insert(*s, (Some(rank), drawn_at, Pending::Settled));
                self.model.next_rank = rank + 1;
            }
        }
        self.model.drawn = true;
        self.course.apply_draw(&record);
        self.coverage.hit(if waitlisted > 0 {
            "apply_draw waitlisting"
        } else {
            "apply_draw"
        });
    }

    fn begin_promote(&mut self) {
        let m = &self.model;
        let may = m.needs_promotion() && m.spec_in_flight.is_none() && m.drawing.is_none();
        assert_eq!(
            self.course.needs_promotion(),
            m.needs_promotion(),
            "needs_promotion differs from the model; {}",
            self.ctx()
        );
        let got = self.course.begin_promote();
        self.note(format!("begin_promote (may: {may})"));
        if !may {
            assert_eq!(got, None, "a promotion began that may not; {}", self.ctx());
            return;
        }
        let head = self.model.take_heads(1).pop().expect("someone waits");
        self.model.lane = true;
        self.model.promoting = Some(head);
        assert_eq!(
            got,
            Some((self.students[head].clone(), self.place_at(head))),
            "promoted head differs from the model; {}",
            self.ctx()
        );
        self.coverage.hit("begin_promote");
    }

    fn end_promote(&mut self) {
        let Some(h) = self.model.promoting.take() else {
            self.note("end_promote: none running, skipped".to_string());
            return;
        };
        let applied = self.rng.gen_ratio(3, 4);
        self.note(format!("end_promote s{h:02} applied={applied}"));
        if applied {
            self.model.promoted(h);
        } else {
            self.model.places.get_mut(&h).expect("promoting").2 = Pending::Settled;
        }
        self.model.lane = false;
        self.course.end_promote(&self.students[h], applied);
        self.coverage.hit("end_promote");
    }

    fn load_place(&mut self) {
        // Places are loaded at start, before anything is in flight.
        if !self.course.settled() {
            self.note("load_place: changes in flight, skipped".to_string());
            return;
        }
        let s = self.rng.gen_range(0..STUDENTS);
        let at = self.rng.gen_range(0..CLOCK_MAX);
        let rank = self
            .rng
            .gen_bool(0.5)
            .then(|| self.model.next_rank + self.rng.gen_range(0..3));
        self.note(format!("load_place s{s:02} rank={rank:?} at={at}"));
        let want = self.model.load_place(s, rank, at);
        let got = self.course.load_place(self.students[s].clone(), rank, at);
        assert_eq!(got, want, "load_place differs from the model; {}", self.ctx());
        self.coverage
            .hit(if want { "load_place added" } else { "load_place refused" });
    }

    fn begin_spec(&mut self) {
        let held = self.model.held();
        // Capacity edges: 0, 1, exactly the seats held, one below (BelowHeld unless 0),
        // one above, one above the current capacity, else anything small (lowering and
        // raising both common).
        let capacity = match self.rng.gen_range(0..10) {
            0 => 0,
            1 => 1,
            2 => held,
            3 => held.saturating_sub(1),
            4 => held + 1,
            5 => (self.model.spec.capacity + 1).min(CAPACITY_GEN_MAX + 1),
            // A raise that gives seats to the waitlist.
            6 => held + self.rng.gen_range(1..=2),
            _ => self.rng.gen_range(0..=CAPACITY_GEN_MAX),
        };
        let title = format!("rev-at-op-{}", self.op);
        let mut spec = random_spec(&mut self.rng, &title, capacity);
        if self.rng.gen_ratio(1, 2) {
            // Often keep the draw and the waitlist as they are, or the rules refuse most
            // changes once the draw ran or students wait.
            spec.draw_at = self.model.spec.draw_at;
            spec.waitlist_max = self.model.spec.waitlist_max;
        }
        let now = self.pick_now();
        self.note(format!(
            "begin_spec capacity {} -> {capacity} window {:?}..{:?} draw {:?} waitlist {} (held {held}) now={now}",
            self.model.spec.capacity, spec.opens_at, spec.closes_at, spec.draw_at, spec.waitlist_max
        ));
        let (want, heads) = self.model.begin_spec(&spec, now);
        let want = match want {
            SpecDecision::Begun { lane, .. } => SpecDecision::Begun {
                promote: heads
                    .iter()
                    .map(|h| (self.students[*h].clone(), self.place_at(*h)))
                    .collect(),
                lane,
            },
            other => other,
        };
        let got = self.course.begin_spec(&spec, now);
        assert_eq!(got, want, "begin_spec decision differs from the model; {}", self.ctx());
        let begun = matches!(want, SpecDecision::Begun { .. });
        self.coverage.hit(match want {
            SpecDecision::BelowHeld => "begin_spec BelowHeld",
            SpecDecision::InFlight => "begin_spec InFlight",
            SpecDecision::LaneBusy => "begin_spec LaneBusy",
            SpecDecision::Refused(_) => "begin_spec Refused",
            SpecDecision::Begun { ref promote, .. } if !promote.is_empty() => "begin_spec Begun promoting",
            SpecDecision::Begun { .. } if capacity < self.model.spec.capacity => "begin_spec Begun lower",
            SpecDecision::Begun { .. } => "begin_spec Begun",
        });
        if begun && capacity == 0 {
            self.coverage.hit("begin_spec Begun zero");
        }
    }

    fn apply_spec(&mut self) {
        let Some((spec, heads, lane)) = self.model.spec_in_flight.take() else {
            self.note("apply_spec: nothing in flight, skipped".to_string());
            return;
        };
        // Usually a newer version; sometimes the same or an older one (a commit that lost the
        // race to a newer version already applied): the in-flight cap is cleared either way,
        // the spec replaced only when newer. A change that promotes committed its own
        // version.
        let version = match self.rng.gen_range(0..8) {
            0 if heads.is_empty() => self.model.version,
            1 if heads.is_empty() => self.model.version.saturating_sub(1),
            _ => self.model.version + self.rng.gen_range(1..=3),
        };
        self.note(format!(
            "apply_spec v{} -> v{version} capacity {} -> {} promoting {heads:?}",
            self.model.version, self.model.spec.capacity, spec.capacity
        ));
        if version > self.model.version {
            self.model.spec = spec.clone();
            self.model.version = version;
            self.coverage.hit("apply_spec newer");
        } else {
            self.stale_apply = true;
            self.coverage.hit("apply_spec stale");
        }
        let promoted: Vec<(StudentId, UnixMs)> = heads
            .iter()
            .map(|h| (self.students[*h].clone(), self.place_at(*h)))
            .collect();
        for h in &heads {
            self.model.promoted(*h);
        }
        if lane {
            self.model.lane = false;
        }
        self.course.apply_spec(spec, version, &promoted, lane);
    }

    fn abort_spec(&mut self) {
        let Some((_, heads, lane)) = self.model.spec_in_flight.take() else {
            self.note("abort_spec: nothing in flight, skipped".to_string());
            return;
        };
        self.note("abort_spec".to_string());
        let promoted: Vec<(StudentId, UnixMs)> = heads
            .iter()
            .map(|h| (self.students[*h].clone(), self.place_at(*h)))
            .collect();
        for h in &heads {
            self.model.places.get_mut(h).expect("promoting").2 = Pending::Settled;
        }
        if lane {
            self.model.lane = false;
        }
        self.course.abort_spec(&promoted, lane);
        self.coverage.hit("abort_spec");
    }

    fn load_enrolled(&mut self) {
        // Loads happen at start; seats appearing under a change that planned promotions
        // for the seats it saw would be a history that cannot happen.
        if self.model.spec_in_flight.is_some() || self.model.drawing.is_some() || self.model.promoting.is_some() {
            self.note("load_enrolled: a promotion or draw in flight, skipped".to_string());
            return;
        }
        let s = self.rng.gen_range(0..STUDENTS);
        let at = self.rng.gen_range(0..CLOCK_MAX);
        self.note(format!("load_enrolled s{s:02} at={at}"));
        let want = self.model.load_enrolled(s, at);
        let got = self.course.load_enrolled(self.students[s].clone(), at);
        assert_eq!(got, want, "load_enrolled differs from the model; {}", self.ctx());
        self.coverage.hit(if want {
            "load_enrolled added"
        } else {
            "load_enrolled refused"
        });
    }

    /// Everything observable about the course, against the model and the invariants.
    fn check_state(&self) {
        let (c, m) = (&self.course, &self.model);
        assert!(
            m.held() <= c.capacity().max(m.load_peak) && m.held() <= m.sellable().max(m.load_peak),
            "oversold: held {} capacity {} sellable {}; {}",
            m.held(),
            c.capacity(),
            m.sellable(),
            self.ctx()
        );
        assert_eq!(c.capacity(), m.spec.capacity, "capacity; {}", self.ctx());
        assert_eq!(c.spec, m.spec, "spec; {}", self.ctx());
        assert_eq!(c.version, m.version, "version; {}", self.ctx());
        assert_eq!(c.enrolled(), m.committed(), "enrolled (committed); {}", self.ctx());
        assert_eq!(
            c.seats_left(),
            m.sellable().saturating_sub(m.held()),
            "seats_left; {}",
            self.ctx()
        );
        let mut roster: Vec<StudentId> = m
            .seats
            .iter()
            .filter(|(_, s)| !matches!(s, ModelSeat::EnrollPending(_)))
            .map(|(k, _)| self.students[*k].clone())
            .collect();
        roster.sort();
        assert_eq!(c.roster(), roster, "roster; {}", self.ctx());
        for (i, student) in self.students.iter().enumerate() {
            let want = m.seats.get(&i).map(|s| match *s {
                ModelSeat::EnrollPending(at) => Seat::EnrollPending { at },
                ModelSeat::Enrolled(at) => Seat::Enrolled { at },
                ModelSeat::DropPending(at) => Seat::DropPending { at },
            });
            assert_eq!(c.seat(student), want, "seat of s{i:02}; {}", self.ctx());
            let want = m.places.get(&i).map(|(rank, at, state)| match rank {
                None => Place::Entry { at: *at, state: *state },
                Some(rank) => Place::Wait {
                    rank: *rank,
                    at: *at,
                    state: *state,
                },
            });
            assert_eq!(c.place(student), want, "place of s{i:02}; {}", self.ctx());
            assert!(
                !(m.seats.contains_key(&i) && m.places.contains_key(&i)),
                "s{i:02} has a seat and a place; {}",
                self.ctx()
            );
        }
        let waitlist = m.waitlist();
        let committed: Vec<StudentId> = waitlist
            .iter()
            .filter(|s| m.places[*s].2 != Pending::Adding)
            .map(|s| self.students[*s].clone())
            .collect();
        assert_eq!(c.waitlist(), committed, "waitlist; {}", self.ctx());
        assert_eq!(c.waitlisted(), waitlist.len() as u32, "waitlisted; {}", self.ctx());
        assert!(
            waitlist.len() as u32 <= m.spec.waitlist_max.max(m.wait_load_peak),
            "{} waiting, waitlist_max {}; {}",
            waitlist.len(),
            m.spec.waitlist_max,
            self.ctx()
        );
        assert_eq!(c.entries(), m.entries().len() as u32, "entries; {}", self.ctx());
        assert_eq!(
            c.needs_promotion(),
            m.needs_promotion(),
            "needs_promotion; {}",
            self.ctx()
        );
        assert_eq!(c.drawn_at().is_some(), m.drawn, "drawn; {}", self.ctx());
    }
}

/// A spec with the given capacity and a window drawn from a few fixed bounds (including
/// open-ended and empty windows).
fn random_spec(rng: &mut StdRng, title: &str, capacity: u32) -> CourseSpec {
    let opens = [None, Some(OPENS_AT), Some(OPENS_AT), Some(OPENS_AT_LATE)];
    let closes = [None, Some(CLOSES_AT), Some(CLOSES_AT), Some(CLOSES_AT_LATE)];
    let (opens_at, closes_at) = if rng.gen_ratio(1, 20) {
        // Empty window: never open.
        (Some(CLOSES_AT), Some(OPENS_AT))
    } else {
        (
            opens[rng.gen_range(0..opens.len())],
            closes[rng.gen_range(0..closes.len())],
        )
    };
    let mut spec = CourseSpec::plain(title, capacity, opens_at, closes_at);
    if rng.gen_ratio(1, 3) {
        spec.draw_at = Some([OPENS_AT + 100, OPENS_AT_LATE + 100, CLOSES_AT - 100][rng.gen_range(0..3)]);
    }
    if rng.gen_ratio(1, 2) {
        spec.waitlist_max = rng.gen_range(1..=WAITLIST_GEN_MAX);
    }
    spec
}

/// Runs one seed; on any panic (a model mismatch or an assert inside `Course`) panics again
/// with the seed, the op index and the last ops.
fn run_seed(seed: u64, ops: usize) -> Coverage {
    let mut sim = Sim::new(seed);
    let result = panic::catch_unwind(AssertUnwindSafe(|| sim.run(ops)));
    if let Err(payload) = result {
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "(non-string panic)".to_string());
        if msg.contains("replay:") {
            panic!("model test failed: {msg}");
        }
        // A panic inside `Course` (its own invariant check, or a misuse assert) names no seed.
        panic!("model test failed: {msg}\n--- {}", sim.ctx());
    }
    sim.coverage
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a u64")))
}

#[test]
fn course_matches_model() {
    let mut coverage = Coverage::default();
    if let Some(seed) = env_u64("ENROLLD_MODEL_SEED") {
        let ops = env_u64("ENROLLD_MODEL_OPS").map_or(OPS_PER_SEED, |n| n as usize);
        eprintln!("model test: ENROLLD_MODEL_SEED={seed}, {ops} ops");
        coverage.merge(run_seed(seed, ops));
    }
    for seed in SEEDS {
        coverage.merge(run_seed(seed, OPS_PER_SEED));
    }
    // The generator must keep reaching every path, or the test passes vacuously.
    let expected = [
        "enroll Already",
        "enroll InFlight",
        "enroll Closed",
        "enroll Full",
        "enroll Full by in-flight min",
        "enroll Full at capacity 0",
        "enroll Reserved",
        "confirm_enroll",
        "release_enroll",
        "drop NotEnrolled",
        "drop InFlight",
        "drop Dropping",
        "confirm_drop",
        "cancel_drop",
        "begin_spec BelowHeld",
        "begin_spec InFlight",
        "begin_spec Begun",
        "begin_spec Begun lower",
        "begin_spec Begun zero",
        "apply_spec newer",
        "apply_spec stale",
        "abort_spec",
        "load_enrolled added",
        "load_enrolled refused",
        "enroll Entered",
        "enroll Waiting",
        "enroll Enter",
        "enroll Join",
        "enroll LaneBusy",
        "enroll DrawPending",
        "drop Dropping promoting",
        "drop Withdrawing",
        "drop Leaving",
        "drop LaneBusy",
        "drop DrawPending",
        "confirm_place",
        "release_place",
        "confirm_unplace",
        "cancel_unplace",
        "begin_spec LaneBusy",
        "begin_spec Refused",
        "begin_spec Begun promoting",
        "begin_draw",
        "apply_draw",
        "apply_draw waitlisting",
        "abort_draw",
        "begin_promote",
        "end_promote",
        "load_place added",
        "load_place refused",
        "want_lane",
        "enroll Join sharing the lane",
    ];
    for what in expected {
        let n = coverage.0.get(what).copied().unwrap_or(0);
        assert!(n >= 10, "path {what:?} reached only {n} times: {:?}", coverage.0);
    }
}
