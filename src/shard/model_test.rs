//! Seeded randomized model test of the seat state machine ([`Course`]), in the style of
//! TigerBeetle's VOPR.
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

use super::course::{Course, CourseSpec, DropDecision, EnrollDecision, Seat, SpecDecision};
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
const OPS_PER_SEED: usize = 2_000;
/// Students in play: few, so the same student collides with its own in-flight changes.
const STUDENTS: usize = 12;
/// Largest capacity the generator picks (plus `held + 1` on the capacity-edge path).
const CAPACITY_GEN_MAX: u32 = 5;
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
    /// The admin change begun and not yet applied or aborted.
    spec_in_flight: Option<CourseSpec>,
    seats: BTreeMap<usize, ModelSeat>,
    /// Most seats held right after a load: loads may go beyond capacity (the store is
    /// never second-guessed), reservations never do.
    load_peak: u32,
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
            Some(new) => new.capacity.min(self.spec.capacity),
            None => self.spec.capacity,
        }
    }

    fn is_open(&self, now: UnixMs) -> bool {
        self.spec.opens_at.map_or(true, |t| now >= t) && self.spec.closes_at.map_or(true, |t| now < t)
    }

    /// The enroll decision without taking the seat (what `peek_enroll` must answer).
    fn decide_enroll(&self, s: usize, now: UnixMs) -> EnrollDecision {
        match self.seats.get(&s) {
            Some(ModelSeat::Enrolled(at)) => return EnrollDecision::Already { at: *at },
            Some(_) => return EnrollDecision::InFlight,
            None => {}
        }
        if !self.is_open(now) {
            return EnrollDecision::Closed;
        }
        if self.held() >= self.sellable() {
            return EnrollDecision::Full;
        }
        EnrollDecision::Reserved { at: now }
    }

    fn enroll(&mut self, s: usize, now: UnixMs) -> EnrollDecision {
        let decision = self.decide_enroll(s, now);
        if decision == (EnrollDecision::Reserved { at: now }) {
            self.seats.insert(s, ModelSeat::EnrollPending(now));
        }
        decision
    }

    fn drop_seat(&mut self, s: usize) -> DropDecision {
        match self.seats.get(&s).copied() {
            None => DropDecision::NotEnrolled,
            Some(ModelSeat::Enrolled(at)) => {
                self.seats.insert(s, ModelSeat::DropPending(at));
                DropDecision::Dropping {
                    promote: None,
                    lane: false,
                }
            }
            Some(_) => DropDecision::InFlight,
        }
    }

    fn begin_spec(&mut self, spec: &CourseSpec) -> SpecDecision {
        if self.spec_in_flight.is_some() {
            return SpecDecision::InFlight;
        }
        if spec.capacity < self.held() {
            return SpecDecision::BelowHeld;
        }
        self.spec_in_flight = Some(spec.clone());
        SpecDecision::Begun {
            promote: Vec::new(),
            lane: false,
        }
    }

    fn load_enrolled(&mut self, s: usize, at: UnixMs) -> bool {
        if self.seats.contains_key(&s) {
            return false;
        }
        self.seats.insert(s, ModelSeat::Enrolled(at));
        self.load_peak = self.load_peak.max(self.held());
        true
    }

    /// Students in a given state, in index order (for picking one at random).
    fn students_in(&self, want: fn(&ModelSeat) -> bool) -> Vec<usize> {
        self.seats.iter().filter(|(_, s)| want(s)).map(|(k, _)| *k).collect()
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
}

impl Op {
    const ALL: [Op; 10] = [
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
            model: Model {
                spec,
                version,
                spec_in_flight: None,
                seats: BTreeMap::new(),
                load_peak: 0,
            },
            coverage: Coverage::default(),
            weights,
        }
    }

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
        match Op::ALL[op] {
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
            other => unreachable!("a course without rounds decided {other:?}"),
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
        let want = self.model.drop_seat(s);
        let got = self.course.drop_seat(&self.students[s]);
        assert_eq!(got, want, "drop decision differs from the model; {}", self.ctx());
        self.coverage.hit(match want {
            DropDecision::NotEnrolled => "drop NotEnrolled",
            DropDecision::InFlight => "drop InFlight",
            DropDecision::Dropping { .. } => "drop Dropping",
            other => unreachable!("a course without rounds decided {other:?}"),
        });
    }

    fn confirm_drop(&mut self) {
        let Some(s) = self.pick("confirm_drop", |x| matches!(x, ModelSeat::DropPending(_))) else {
            return;
        };
        self.model.seats.remove(&s);
        self.course.confirm_drop(&self.students[s], None, false);
        self.coverage.hit("confirm_drop");
    }

    fn cancel_drop(&mut self) {
        let Some(s) = self.pick("cancel_drop", |x| matches!(x, ModelSeat::DropPending(_))) else {
            return;
        };
        let Some(ModelSeat::DropPending(at)) = self.model.seats.get(&s).copied() else {
            unreachable!()
        };
        self.model.seats.insert(s, ModelSeat::Enrolled(at));
        self.course.cancel_drop(&self.students[s], None, false);
        self.coverage.hit("cancel_drop");
    }

    fn begin_spec(&mut self) {
        let held = self.model.held();
        // Capacity edges: 0, 1, exactly the seats held, one below (BelowHeld unless 0),
        // one above, one above the current capacity, else anything small (lowering and
        // raising both common).
        let capacity = match self.rng.gen_range(0..9) {
            0 => 0,
            1 => 1,
            2 => held,
            3 => held.saturating_sub(1),
            4 => held + 1,
            5 => (self.model.spec.capacity + 1).min(CAPACITY_GEN_MAX + 1),
            _ => self.rng.gen_range(0..=CAPACITY_GEN_MAX),
        };
        let title = format!("rev-at-op-{}", self.op);
        let spec = random_spec(&mut self.rng, &title, capacity);
        self.note(format!(
            "begin_spec capacity {} -> {capacity} window {:?}..{:?} (held {held})",
            self.model.spec.capacity, spec.opens_at, spec.closes_at
        ));
        let want = self.model.begin_spec(&spec);
        let got = self.course.begin_spec(&spec, OPENS_AT);
        assert_eq!(got, want, "begin_spec decision differs from the model; {}", self.ctx());
        let begun = matches!(want, SpecDecision::Begun { .. });
        self.coverage.hit(match want {
            SpecDecision::BelowHeld => "begin_spec BelowHeld",
            SpecDecision::InFlight => "begin_spec InFlight",
            SpecDecision::Begun { .. } if capacity < self.model.spec.capacity => "begin_spec Begun lower",
            SpecDecision::Begun { .. } => "begin_spec Begun",
            other => unreachable!("a course without rounds decided {other:?}"),
        });
        if begun && capacity == 0 {
            self.coverage.hit("begin_spec Begun zero");
        }
    }

    fn apply_spec(&mut self) {
        let Some(spec) = self.model.spec_in_flight.take() else {
            self.note("apply_spec: nothing in flight, skipped".to_string());
            return;
        };
        // Usually a newer version; sometimes the same or an older one (a commit that lost the
        // race to a newer version already applied): the in-flight cap is cleared either way,
        // the spec replaced only when newer.
        let version = match self.rng.gen_range(0..8) {
            0 => self.model.version,
            1 => self.model.version.saturating_sub(1),
            _ => self.model.version + self.rng.gen_range(1..=3),
        };
        self.note(format!(
            "apply_spec v{} -> v{version} capacity {} -> {}",
            self.model.version, self.model.spec.capacity, spec.capacity
        ));
        if version > self.model.version {
            self.model.spec = spec.clone();
            self.model.version = version;
            self.coverage.hit("apply_spec newer");
        } else {
            self.coverage.hit("apply_spec stale");
        }
        self.course.apply_spec(spec, version, &[], false);
    }

    fn abort_spec(&mut self) {
        if self.model.spec_in_flight.take().is_none() {
            self.note("abort_spec: nothing in flight, skipped".to_string());
            return;
        }
        self.note("abort_spec".to_string());
        self.course.abort_spec(&[], false);
        self.coverage.hit("abort_spec");
    }

    fn load_enrolled(&mut self) {
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
        }
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
    CourseSpec::plain(title, capacity, opens_at, closes_at)
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
    ];
    for what in expected {
        let n = coverage.0.get(what).copied().unwrap_or(0);
        assert!(n >= 10, "path {what:?} reached only {n} times: {:?}", coverage.0);
    }
}
