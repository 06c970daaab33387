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
            201 => assert!(
                created.entry(c.clone()).or_default().insert(s.clone()),
                "two 201s for {s} in {c}"
            ),
            409 => {}
            other => panic!("unexpected {other} for {s} in {c}"),
        }
    }
    for (c, cap) in courses.iter().zip(CAPACITIES) {
        let got = created.get(c).map_or(0, BTreeSet::len);
        // Demand (STUDENTS) exceeds every capacity: exactly `cap` seats sold.
        assert_eq!(got, *cap as usize, "course {c} of capacity {cap} sold {got}");
        let api: BTreeSet<String> = roster(&mut admin, c).await.into_iter().collect();
        assert_eq!(
            &api,
            created.get(c).unwrap_or(&BTreeSet::new()),
            "roster of {c} equals its 201s"
        );
        let r = admin
            .request("GET", &format!("/v1/courses/{c}"), Some(&admin_token()), None)
            .await;
        assert_eq!(
            (r.json()["enrolled"].as_u64(), r.json()["seats_left"].as_u64()),
            (Some(*cap as u64), Some(0))
        );
    }
    // The metrics count what the clients saw.
    let sold: usize = created.values().map(BTreeSet::len).sum();
    let full = outcomes.iter().filter(|o| o.0 == 409).count();
    assert_eq!(
        metric(&mut admin, r#"enrolld_enroll_attempts_total{outcome="enrolled"}"#).await,
        Some(sold as f64)
    );
    assert_eq!(
        metric(&mut admin, r#"enrolld_enroll_attempts_total{outcome="full"}"#).await,
        Some(full as f64)
    );
    let committed = metric(&mut admin, "enrolld_persist_batch_rows_sum").await.unwrap();
    assert!(committed >= sold as f64, "every sold seat went through a group commit");
    // A repeated POST takes no second seat.
    if let Some((c, ss)) = created.iter().next() {
        let s = ss.iter().next().unwrap();
        let r = admin
            .request("POST", &format!("/v1/courses/{c}/enrollment"), Some(&token(s)), None)
            .await;
        assert_eq!(r.status, 200);
    }
    (courses, created)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rush_on_mariadb() {
    let db = TestDb::new();
    let server = Server::start(&["--store", &db.url, "--shards", "2", "--limits-enabled", "false"]);
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
    let server = Server::start(&[
        "--store",
        &format!("sqlite://{}", dir.path("e.db")),
        "--shards",
        "2",
        "--limits-enabled",
        "false",
    ]);
    run_rush(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_frees_the_seat_at_once() {
    let db = TestDb::new();
    let server = Server::start(&["--store", &db.url]);
    let mut c = server.conn().await;
    put_course(&mut c, "DROP-1", 1).await;
    // GET answers are rendered once per change of the course: each must show the change.
    let get = "/v1/courses/DROP-1";
    let seats = |r: Resp| {
        let j = r.json();
        (j["enrolled"].as_u64(), j["seats_left"].as_u64(), j["capacity"].as_u64())
    };
    assert_eq!(
        seats(c.request("GET", get, Some(&token("reader")), None).await),
        (Some(0), Some(1), Some(1))
    );
    let r = c
        .request("POST", "/v1/courses/DROP-1/enrollment", Some(&token("first")), None)
        .await;
    assert_eq!(r.status, 201);
    let r = c
        .request("POST", "/v1/courses/DROP-1/enrollment", Some(&token("first")), None)
        .await;
    assert_eq!(r.status, 200, "repeat is idempotent");
    assert_eq!(
        seats(c.request("GET", get, Some(&token("reader")), None).await),
        (Some(1), Some(0), Some(1))
    );
    let r = c
        .request("POST", "/v1/courses/DROP-1/enrollment", Some(&token("second")), None)
        .await;
    assert_eq!(r.status, 409);
    let r = c
        .request("DELETE", "/v1/courses/DROP-1/enrollment", Some(&token("first")), None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "dropped");
    assert_eq!(
        seats(c.request("GET", get, Some(&token("reader")), None).await),
        (Some(0), Some(1), Some(1))
    );
    put_course(&mut c, "DROP-1", 3).await;
    assert_eq!(
        seats(c.request("GET", get, Some(&token("reader")), None).await),
        (Some(0), Some(3), Some(3))
    );
    put_course(&mut c, "DROP-1", 1).await;
    let r = c
        .request("POST", "/v1/courses/DROP-1/enrollment", Some(&token("second")), None)
        .await;
    assert_eq!(r.status, 201, "the freed seat goes to the next student at once");
    assert_eq!(roster(&mut c, "DROP-1").await, vec!["second"]);
    assert_eq!(
        db.query("SELECT student_id FROM enrollments"),
        vec![vec!["second".to_string()]]
    );
    assert_eq!(db.query("SELECT enrolled FROM courses WHERE id='DROP-1'")[0][0], "1");
}

/// Admin capacity changes racing a rush (and two creates of one course racing each
/// other): every answer is one the contract allows, the node stays up, and the course is
/// never oversold in memory or in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_racing_a_rush_never_oversell() {
    let db = TestDb::new();
    let server = Server::start(&["--store", &db.url, "--shards", "2", "--limits-enabled", "false"]);
    let addr = server.addr;
    let creates: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = Conn::open(addr).await;
                let body = r#"{"title":"Race","capacity":30}"#;
                c.request("PUT", "/v1/admin/courses/RACE-1", Some(&admin_token()), Some(body))
                    .await
                    .status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in creates {
        statuses.push(t.await.unwrap());
    }
    assert!(statuses.iter().all(|s| [200, 201, 503].contains(s)), "{statuses:?}");
    assert!(statuses.contains(&201) || statuses.contains(&200), "{statuses:?}");

    let admin = tokio::spawn(async move {
        let mut c = Conn::open(addr).await;
        let mut seen = Vec::new();
        for cap in [25, 10, 40, 3, 0, 35, 12, 50, 1, 30].iter().cycle().take(60) {
            let body = format!(r#"{{"title":"Race","capacity":{cap}}}"#);
            let r = c
                .request("PUT", "/v1/admin/courses/RACE-1", Some(&admin_token()), Some(&body))
                .await;
            assert!([200, 409, 503].contains(&r.status), "admin PUT answered {}", r.status);
            seen.push(r.status);
        }
        seen
    });
    let students: Vec<String> = (0..300).map(|i| format!("race{i}")).collect();
    let outcomes = rush(addr, &["RACE-1".to_string()], &students, 32).await;
    let admin_statuses = admin.await.unwrap();
    assert!(admin_statuses.contains(&200), "some capacity changes applied");
    for (status, _, s) in &outcomes {
        assert!([201, 409, 503].contains(status), "{s} got {status}");
    }
    let mut c = Conn::open(addr).await;
    let r = c.request("GET", "/v1/courses/RACE-1", Some(&admin_token()), None).await;
    let j = r.json();
    let (enrolled, capacity) = (j["enrolled"].as_u64().unwrap(), j["capacity"].as_u64().unwrap());
    assert!(enrolled <= capacity, "memory: {enrolled} > {capacity}");
    let stored =
        db.query("SELECT enrolled, capacity, (SELECT COUNT(*) FROM enrollments) FROM courses WHERE id='RACE-1'");
    let (e, cap, rows): (u64, u64, u64) = (
        stored[0][0].parse().unwrap(),
        stored[0][1].parse().unwrap(),
        stored[0][2].parse().unwrap(),
    );
    assert!(
        e <= cap && e == rows && e == enrolled,
        "store {e}/{cap} rows {rows}, memory {enrolled}"
    );
    let mut ack: Vec<String> = outcomes.iter().filter(|o| o.0 == 201).map(|o| o.2.clone()).collect();
    ack.sort();
    assert_eq!(roster(&mut c, "RACE-1").await, ack, "roster equals the 201s");
}
