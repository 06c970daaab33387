//! A registration rush against the real server on both stores: thousands of concurrent
//! enrollments over many keep-alive connections, courses of mixed capacity (0 and 1
//! included). No course oversold, none undersold once demand exceeded supply, and the
//! roster API and the store both equal exactly the set of 201s.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;

const CAPACITIES: &[u32] = &[0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 0, 1, 40, 60, 100, 150, 7, 30];
const STUDENTS: usize = 400;
const CONNECTIONS: usize = 64;

async fn run_rush(server: &Server) -> (Vec<String>, BTreeMap<String, BTreeSet<String>>) {
    let mut admin = server.conn().await;
    let tag: u32 = rand::random::<u16>().into();
    let courses: Vec<String> = (0..CAPACITIES.len()).map(|i| format!("R{tag}-{i:02}")).collect();
    for (c, cap) in courses.iter().zip(CAPACITIES) {
        put_course(&mut admin, c, *cap).await;
    }
    let students: Vec<String> = (0..STUDENTS).map(|i| format!("s{tag}-{i}")).collect();
    let outcomes = rush(server.addr, &courses, &students, CONNECTIONS).await;
    assert_eq!(outcomes.len(), courses.len() * STUDENTS, "every request was answered");
    let mut created: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (status, c, s) in &outcomes {
        match status {
            201 => assert!(created.entry(c.clone()).or_default().insert(s.clone()), "two 201s for {s} in {c}"),
            409 => {}
            other => panic!("unexpected {other} for {s} in {c}"),
        }
    }
    for (c, cap) in courses.iter().zip(CAPACITIES) {
        let got = created.get(c).map_or(0, BTreeSet::len);
        // Demand (STUDENTS) exceeds every capacity: exactly `cap` seats sold.
        assert_eq!(got, *cap as usize, "course {c} of capacity {cap} sold {got}");
        let api: BTreeSet<String> = roster(&mut admin, c).await.into_iter().collect();
        assert_eq!(&api, created.get(c).unwrap_or(&BTreeSet::new()), "roster of {c} equals its 201s");
        let r = admin.request("GET", &format!("/v1/courses/{c}"), Some(&admin_token()), None).await;
        assert_eq!((r.json()["enrolled"].as_u64(), r.json()["seats_left"].as_u64()), (Some(*cap as u64), Some(0)));
    }
    // A repeated POST takes no second seat.
    if let Some((c, ss)) = created.iter().next() {
        let s = ss.iter().next().unwrap();
        let r = admin.request("POST", &format!("/v1/courses/{c}/enrollment"), Some(&token(s)), None).await;
        assert_eq!(r.status, 200);
    }
    (courses, created)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rush_on_mariadb() {
    let db = TestDb::new();
    let server = Server::start(&["--store", &db.url, "--shards", "2"]);
    let (courses, created) = run_rush(&server).await;
    let rows = db.query("SELECT course_id, student_id FROM enrollments");
    let mut stored: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in rows {
        stored.entry(r[0].clone()).or_default().insert(r[1].clone());
    }
    assert_eq!(stored, created, "the store holds exactly the 201s");
    for c in &courses {
        let n = db.query(&format!("SELECT enrolled, capacity FROM courses WHERE id = '{c}'"));
        let want = created.get(c).map_or(0, BTreeSet::len).to_string();
        assert_eq!(n[0][0], want, "stored counter of {c}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rush_on_sqlite() {
    let dir = TempDir::new("enrolld-rush");
    let server = Server::start(&["--store", &format!("sqlite://{}", dir.path("e.db")), "--shards", "2"]);
    run_rush(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_frees_the_seat_at_once() {
    let db = TestDb::new();
    let server = Server::start(&["--store", &db.url]);
    let mut c = server.conn().await;
    put_course(&mut c, "DROP-1", 1).await;
    let r = c.request("POST", "/v1/courses/DROP-1/enrollment", Some(&token("first")), None).await;
    assert_eq!(r.status, 201);
    let r = c.request("POST", "/v1/courses/DROP-1/enrollment", Some(&token("first")), None).await;
    assert_eq!(r.status, 200, "repeat is idempotent");
    let r = c.request("POST", "/v1/courses/DROP-1/enrollment", Some(&token("second")), None).await;
    assert_eq!(r.status, 409);
    let r = c.request("DELETE", "/v1/courses/DROP-1/enrollment", Some(&token("first")), None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "dropped");
    let r = c.request("POST", "/v1/courses/DROP-1/enrollment", Some(&token("second")), None).await;
    assert_eq!(r.status, 201, "the freed seat goes to the next student at once");
    assert_eq!(roster(&mut c, "DROP-1").await, vec!["second"]);
    assert_eq!(db.query("SELECT student_id FROM enrollments"), vec![vec!["second".to_string()]]);
    assert_eq!(db.query("SELECT enrolled FROM courses WHERE id='DROP-1'")[0][0], "1");
}
