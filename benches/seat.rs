//! Benchmarks of the pure seat decision ([`Course`]), with no runtime, store or network.
//!
//! Why: every enroll and drop goes through `Course` on its shard's single thread, so its cost
//! bounds a shard's seat throughput. These cases watch the hot paths for regressions:
//! (a) the 409 answer on a full course (what a registration rush mostly hits), (b) a full
//! enroll -> confirm -> drop -> confirm round trip on a course with free seats, and (c) the
//! idempotent answer to a student who already holds a seat, and (d) the owner shard's part
//! of a draw over 50,000 entries. Student ids are built before timing starts, so only the
//! decision itself is measured.
//!
//! Run: `cargo bench --bench seat` (add `-- --warm-up-time 1 --measurement-time 2` for a
//! quick look).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use enrolld::ids::{CourseId, StudentId};
use enrolld::shard::course::{Course, CourseSpec, DrawRecord, DropDecision, EnrollDecision};

/// Seats in the benchmarked course: a large lecture, so the seat map has realistic size.
const CAPACITY: u32 = 500;
/// Students already committed in the round-trip course (it keeps `CAPACITY - HALF` free).
const HALF: u32 = CAPACITY / 2;
/// Distinct fresh students the round trip cycles through.
const FRESH_STUDENTS: usize = 1_024;
/// A clock inside the course's window.
const NOW: i64 = 1_800_000_000_000;

fn spec() -> CourseSpec {
    CourseSpec::plain(
        "Benchmarking 101",
        CAPACITY,
        Some(NOW - 86_400_000),
        Some(NOW + 86_400_000),
    )
}

fn students(prefix: &str, n: usize) -> Vec<StudentId> {
    (0..n)
        .map(|i| StudentId::parse(&format!("{prefix}-{i:06}")).expect("valid student id"))
        .collect()
}

/// A course with one committed seat per holder.
fn course_with(holders: &[StudentId]) -> Course {
    let id = CourseId::parse("BENCH-101").expect("valid course id");
    let mut course = Course::new(id, spec(), 1);
    for s in holders {
        assert_eq!(course.enroll(s, NOW), EnrollDecision::Reserved { at: NOW });
        course.confirm_enroll(s);
    }
    course
}

fn enroll_full(c: &mut Criterion) {
    let holders = students("holder", CAPACITY as usize);
    let mut course = course_with(&holders);
    let newcomer = StudentId::parse("newcomer-000001").expect("valid student id");
    assert_eq!(course.seats_left(), 0);
    assert_eq!(course.enroll(&newcomer, NOW), EnrollDecision::Full);
    c.bench_function("enroll_full_course_409", |b| {
        b.iter(|| black_box(course.enroll(black_box(&newcomer), black_box(NOW))))
    });
}

fn round_trip(c: &mut Criterion) {
    let holders = students("holder", HALF as usize);
    let mut course = course_with(&holders);
    let fresh = students("fresh", FRESH_STUDENTS);
    // One round trip leaves the course as it found it.
    let s = &fresh[0];
    assert_eq!(course.enroll(s, NOW), EnrollDecision::Reserved { at: NOW });
    course.confirm_enroll(s);
    assert_eq!(
        course.drop_seat(s),
        DropDecision::Dropping {
            promote: None,
            lane: false
        }
    );
    course.confirm_drop(s, None, false);
    assert_eq!(course.enrolled(), HALF);
    let mut next = 0;
    c.bench_function("enroll_confirm_drop_confirm_round_trip", |b| {
        b.iter(|| {
            let s = &fresh[next];
            next = (next + 1) % FRESH_STUDENTS;
            black_box(course.enroll(black_box(s), black_box(NOW)));
            course.confirm_enroll(s);
            black_box(course.drop_seat(s));
            course.confirm_drop(s, None, false);
        })
    });
    assert_eq!(course.enrolled(), HALF, "round trip must leave the course unchanged");
}

fn enroll_already(c: &mut Criterion) {
    let holders = students("holder", HALF as usize);
    let mut course = course_with(&holders);
    let holder = &holders[holders.len() / 2];
    assert_eq!(course.enroll(holder, NOW), EnrollDecision::Already { at: NOW });
    c.bench_function("enroll_already_holds_seat", |b| {
        b.iter(|| black_box(course.enroll(black_box(holder), black_box(NOW))))
    });
}

/// Entries in the benchmarked draw (the bound: well under a second of the shard's
/// time for 50,000).
const DRAW_ENTRIES: usize = 50_000;

/// The owner shard's part of a draw over 50,000 entries: collect and sort the entrants,
/// shuffle them with the seed, cut the order, and apply the committed result (seats,
/// waitlist places, entries removed). The commit itself is the store's time, not measured
/// here.
fn draw_50k(c: &mut Criterion) {
    let entrants = students("entrant", DRAW_ENTRIES);
    let make = || {
        let id = CourseId::parse("DRAW-101").expect("valid course id");
        let mut spec = CourseSpec::plain("Drawn", 300, Some(NOW - 86_400_000), None);
        spec.draw_at = Some(NOW - 1);
        spec.waitlist_max = 1_000;
        let mut course = Course::new(id, spec, 1);
        for s in &entrants {
            assert!(course.load_place(s.clone(), None, NOW - 10));
        }
        course
    };
    let mut group = c.benchmark_group("draw");
    group.sample_size(10);
    group.bench_function("draw_50000_entries_shard_time", |b| {
        b.iter_batched(
            make,
            |mut course| {
                let mut order = course.begin_draw(NOW).expect("due");
                enrolld::shard::course::shuffle_entries(&mut order, [7; 32]);
                let (seats, waitlisted, first_rank) = course.draw_cut(order.len() as u32);
                let record = DrawRecord {
                    drawn_at: NOW,
                    seed: String::new(),
                    order,
                    seats,
                    waitlisted,
                    first_rank,
                };
                course.apply_draw(&record);
                black_box(course)
            },
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, enroll_full, round_trip, enroll_already, draw_50k);
criterion_main!(benches);
