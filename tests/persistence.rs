//! One persistence suite, run against both stores (the embedded SQLite and MariaDB):
//! group commit, the guarded counter, idempotent inserts, per-key order, admin changes and
//! recovery all behave the same on each.

mod common;

use common::*;
use enrolld::ids::{CourseId, StudentId};
use enrolld::model::CourseSpec;
use enrolld::partition::Proof;
use enrolld::persist::store::{LoadRow, PutResult, SeatOp, SeatResult, Session, Store, StoreOptions};

const OPTS: StoreOptions = StoreOptions {
    pool_connections_max: 2,
    acquire_timeout_ms: 2_000,
    events: true,
};

/// Runs `body` once per store kind, each on a fresh database.
async fn each_store<F, Fut>(body: F)
where
    F: Fn(Store, &'static str) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = TempDir::new("enrolld-persist");
    let sqlite = Store::open(&format!("sqlite://{}", dir.path("p.db")), &OPTS)
        .await
        .expect("sqlite");
    body(sqlite, "sqlite").await;
    let db = TestDb::new();
    let mysql = Store::open(&db.url, &OPTS).await.expect("mysql");
    body(mysql, "mysql").await;
}

fn cid(s: &str) -> CourseId {
    CourseId::parse(s).unwrap()
}
fn sid(s: &str) -> StudentId {
    StudentId::parse(s).unwrap()
}
fn spec(capacity: u32) -> CourseSpec {
    CourseSpec::plain("T", capacity, None, None)
}
fn enroll(c: &str, s: &str) -> SeatOp {
    SeatOp::Enroll {
        course: cid(c),
        student: sid(s),
        at: 1_700_000_000_000,
    }
}
fn drop_op(c: &str, s: &str) -> SeatOp {
    SeatOp::Drop {
        course: cid(c),
        student: sid(s),
    }
}

async fn loaded(store: &Store) -> (Vec<(String, u32, u64)>, Vec<(String, String)>) {
    let mut courses = Vec::new();
    let mut seats = Vec::new();
    let recomputed = store
        .load(None, |row| match row {
            LoadRow::Course { id, spec, version } => courses.push((id.to_string(), spec.capacity, version)),
            LoadRow::Enrollment { course, student, .. } => seats.push((course.to_string(), student.to_string())),
            LoadRow::Place { .. } | LoadRow::Drawn { .. } => {}
        })
        .await
        .unwrap();
    // The triggers keep every counter equal to its rows; load would recompute one that is not.
    assert_eq!(recomputed.counters_fixed, 0, "seat counters disagreed with the rosters");
    courses.sort();
    seats.sort();
    (courses, seats)
}

#[tokio::test]
async fn group_commit_applies_a_batch_atomically() {
    each_store(|store, kind| async move {
        assert_eq!(
            store
                .put_course(&cid("A"), &spec(3), &[], &Proof::default(), &Session::default())
                .await
                .unwrap(),
            PutResult::Created { version: 1 }
        );
        assert_eq!(
            store
                .put_course(&cid("B"), &spec(5), &[], &Proof::default(), &Session::default())
                .await
                .unwrap(),
            PutResult::Created { version: 1 }
        );
        let batch = vec![
            enroll("A", "s1"),
            enroll("A", "s2"),
            enroll("B", "s1"),
            enroll("B", "s3"),
        ];
        assert_eq!(
            store
                .commit_seats(&batch, &Proof::default(), &Session::default())
                .await
                .unwrap(),
            vec![SeatResult::Applied; 4],
            "{kind}"
        );
        assert_eq!(store.roster(&cid("A")).await.unwrap(), vec!["s1", "s2"], "{kind}");
        let (courses, seats) = loaded(&store).await;
        assert_eq!(courses, vec![("A".into(), 3, 1), ("B".into(), 5, 1)], "{kind}");
        assert_eq!(seats.len(), 4, "{kind}");
    })
    .await;
}

#[tokio::test]
async fn the_guard_refuses_seats_beyond_capacity() {
    each_store(|store, kind| async move {
        store
            .put_course(&cid("G"), &spec(2), &[], &Proof::default(), &Session::default())
            .await
            .unwrap();
        store
            .put_course(&cid("H"), &spec(9), &[], &Proof::default(), &Session::default())
            .await
            .unwrap();
        // Three seats for a course of two in one batch (as two nodes selling it could ask):
        // the store sells two, refuses the third, and the rest of the batch still applies.
        let batch = vec![enroll("G", "a"), enroll("H", "z"), enroll("G", "b"), enroll("G", "c")];
        let got = store
            .commit_seats(&batch, &Proof::default(), &Session::default())
            .await
            .unwrap();
        assert_eq!(
            got,
            vec![
                SeatResult::Applied,
                SeatResult::Applied,
                SeatResult::Applied,
                SeatResult::Full
            ],
            "{kind}"
        );
        assert_eq!(store.roster(&cid("G")).await.unwrap(), vec!["a", "b"], "{kind}");
        assert_eq!(store.roster(&cid("H")).await.unwrap(), vec!["z"], "{kind}");
        let got = store
            .commit_seats(&[enroll("G", "d")], &Proof::default(), &Session::default())
            .await
            .unwrap();
        assert_eq!(got, vec![SeatResult::Full], "{kind}");
        // Capacity 0 sells nothing.
        store
            .put_course(&cid("Z"), &spec(0), &[], &Proof::default(), &Session::default())
            .await
            .unwrap();
        assert_eq!(
            store
                .commit_seats(&[enroll("Z", "a")], &Proof::default(), &Session::default())
                .await
                .unwrap(),
            vec![SeatResult::Full],
            "{kind}"
        );
        loaded(&store).await; // counters equal rosters after refusals
    })
    .await;
}

#[tokio::test]
async fn inserts_are_idempotent_and_drops_free_the_counter() {
    each_store(|store, kind| async move {
        store
            .put_course(&cid("I"), &spec(2), &[], &Proof::default(), &Session::default())
            .await
            .unwrap();
        store
            .commit_seats(&[enroll("I", "a")], &Proof::default(), &Session::default())
            .await
            .unwrap();
        // The same seat again (a retried batch): applied, no second seat, counter unchanged.
        assert_eq!(
            store
                .commit_seats(
                    &[enroll("I", "a"), enroll("I", "b")],
                    &Proof::default(),
                    &Session::default()
                )
                .await
                .unwrap()
                .len(),
            2
        );
        assert_eq!(store.roster(&cid("I")).await.unwrap(), vec!["a", "b"], "{kind}");
        assert_eq!(
            store
                .put_course(&cid("I"), &spec(1), &[], &Proof::default(), &Session::default())
                .await
                .unwrap(),
            PutResult::BelowEnrolled,
            "{kind}"
        );
        store
            .commit_seats(&[drop_op("I", "a")], &Proof::default(), &Session::default())
            .await
            .unwrap();
        // Dropping a seat that is not there is harmless.
        store
            .commit_seats(&[drop_op("I", "nobody")], &Proof::default(), &Session::default())
            .await
            .unwrap();
        assert_eq!(
            store
                .put_course(&cid("I"), &spec(1), &[], &Proof::default(), &Session::default())
                .await
                .unwrap(),
            PutResult::Updated { version: 2 },
            "{kind}"
        );
        assert_eq!(
            store
                .commit_seats(&[enroll("I", "c")], &Proof::default(), &Session::default())
                .await
                .unwrap(),
            vec![SeatResult::Full],
            "{kind}"
        );
        assert_eq!(store.roster(&cid("I")).await.unwrap(), vec!["b"], "{kind}");
        loaded(&store).await; // counters equal rosters after duplicates and missing drops
    })
    .await;
}

#[tokio::test]
async fn order_per_key_holds_across_batches() {
    each_store(|store, kind| async move {
        store
            .put_course(&cid("O"), &spec(1), &[], &Proof::default(), &Session::default())
            .await
            .unwrap();
        // Enroll, drop, enroll another, as the persist thread splits them (one key per batch).
        store
            .commit_seats(&[enroll("O", "a")], &Proof::default(), &Session::default())
            .await
            .unwrap();
        store
            .commit_seats(
                &[drop_op("O", "a"), enroll("O", "b")],
                &Proof::default(),
                &Session::default(),
            )
            .await
            .unwrap();
        assert_eq!(store.roster(&cid("O")).await.unwrap(), vec!["b"], "{kind}");
        let (courses, _) = loaded(&store).await;
        assert_eq!(courses, vec![("O".into(), 1, 1)], "{kind}");
    })
    .await;
}

#[tokio::test]
async fn recovery_reloads_exactly_what_was_committed() {
    each_store(|store, kind| async move {
        for (c, cap) in [("R1", 3), ("R2", 1), ("R3", 0)] {
            store
                .put_course(&cid(c), &spec(cap), &[], &Proof::default(), &Session::default())
                .await
                .unwrap();
        }
        store
            .commit_seats(
                &[enroll("R1", "x"), enroll("R1", "y"), enroll("R2", "x")],
                &Proof::default(),
                &Session::default(),
            )
            .await
            .unwrap();
        store
            .commit_seats(&[drop_op("R1", "y")], &Proof::default(), &Session::default())
            .await
            .unwrap();
        let (courses, seats) = loaded(&store).await;
        assert_eq!(
            courses,
            vec![("R1".into(), 3, 1), ("R2".into(), 1, 1), ("R3".into(), 0, 1)],
            "{kind}"
        );
        assert_eq!(
            seats,
            vec![("R1".into(), "x".into()), ("R2".into(), "x".into())],
            "{kind}"
        );
        // Ids differing only in case are two courses, as they are in memory.
        store
            .put_course(&cid("case"), &spec(1), &[], &Proof::default(), &Session::default())
            .await
            .unwrap();
        assert_eq!(
            store
                .put_course(&cid("CASE"), &spec(1), &[], &Proof::default(), &Session::default())
                .await
                .unwrap(),
            PutResult::Created { version: 1 },
            "{kind}"
        );
    })
    .await;
}
