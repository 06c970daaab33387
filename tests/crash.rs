//! `kill -9` in the middle of a rush, then a restart: every acknowledged enrollment is in
//! the store and in the rebuilt state, nothing is oversold, and the rebuilt state equals
//! the store. The server runs several committers, so several group commits are in flight
//! when it dies.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;

const CAPACITIES: &[u32] = &[1, 5, 20, 50, 200, 500, 1000, 3000];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_rush_loses_no_acknowledged_seat() {
    let db = TestDb::new();
    // Three committers (each owns a share of the courses), so the kill lands with several
    // group commits in flight at once; every other suite runs the default one.
    let mut server = Server::start(&[
        "--store",
        &db.url,
        "--shards",
        "2",
        "--limits-enabled",
        "false",
        "--commits-in-flight-max",
        "3",
    ]);
    let mut admin = server.conn().await;
    let courses: Vec<String> = (0..CAPACITIES.len()).map(|i| format!("K-{i}")).collect();
    for (c, cap) in courses.iter().zip(CAPACITIES) {
        put_course(&mut admin, c, *cap).await;
    }
    drop(admin);
    // Far more work than fits before the kill, so the kill lands mid-rush.
    let students: Vec<String> = (0..20_000).map(|i| format!("k{i}")).collect();
    let addr = server.addr;
    let courses_for_rush = courses.clone();
    let rushing = tokio::spawn(async move { rush(addr, &courses_for_rush, &students, 64).await });
    // Wait until seats are being committed, then kill.
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n: u64 = db.query("SELECT COUNT(*) FROM enrollments")[0][0].parse().unwrap();
        if n >= 2_000 {
            break;
        }
    }
    server.kill9();
    let outcomes = rushing.await.unwrap();
    let acked = acknowledged(&outcomes);
    let acked_total: usize = acked.values().map(BTreeSet::len).sum();
    assert!(
        acked_total >= 1_000,
        "the kill landed after seats were acknowledged ({acked_total})"
    );

    let mut stored: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in db.query("SELECT course_id, student_id FROM enrollments") {
        stored.entry(r[0].clone()).or_default().insert(r[1].clone());
    }
    let stored_total: usize = stored.values().map(BTreeSet::len).sum();
    eprintln!("killed with {acked_total} seats acknowledged and {stored_total} in the store");
    for (c, students) in &acked {
        let in_store = stored.get(c).cloned().unwrap_or_default();
        let lost: Vec<_> = students.difference(&in_store).collect();
        assert!(lost.is_empty(), "acknowledged seats of {c} lost by kill -9: {lost:?}");
    }
    for (c, cap) in courses.iter().zip(CAPACITIES) {
        let n = stored.get(c).map_or(0, BTreeSet::len);
        assert!(n <= *cap as usize, "{c} oversold in the store: {n} > {cap}");
    }

    let server = server.restart();
    let mut conn = server.conn().await;
    for (c, cap) in courses.iter().zip(CAPACITIES) {
        let in_store: Vec<String> = stored.get(c).cloned().unwrap_or_default().into_iter().collect();
        assert_eq!(
            roster(&mut conn, c).await,
            in_store,
            "rebuilt roster of {c} equals the store"
        );
        let r = conn
            .request("GET", &format!("/v1/courses/{c}"), Some(&admin_token()), None)
            .await;
        let j = r.json();
        assert_eq!(j["enrolled"].as_u64(), Some(in_store.len() as u64));
        assert_eq!(j["seats_left"].as_u64(), Some(u64::from(*cap) - in_store.len() as u64));
        let counter = db.query(&format!("SELECT enrolled FROM courses WHERE id = '{c}'"));
        assert_eq!(counter[0][0], in_store.len().to_string(), "stored counter of {c}");
    }
    // And the rebuilt node keeps selling correctly.
    let r = conn
        .request(
            "POST",
            "/v1/courses/K-7/enrollment",
            Some(&token("after-restart")),
            None,
        )
        .await;
    assert_eq!(r.status, 201);
}
