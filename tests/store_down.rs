//! The store goes away mid-service. A private `mariadbd` on its own port and data
//! directory is started and killed here (the shared server is never touched): enrollment
//! answers 503 with Retry-After and holds no seat, reads keep working from memory, and when
//! the store is back enrollment resumes without a restart. A store that stops answering
//! (paused with SIGSTOP) is the same to a student: 503 after `store_statement_timeout_ms`,
//! and the paused batch is never committed.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_answers_503_holds_nothing_and_recovers() {
    let mut db = PrivateMariadb::new();
    let server = Server::start(&["--store", &db.url(), "--store-acquire-timeout-ms", "500"]);
    let mut c = server.conn().await;
    put_course(&mut c, "DOWN-1", 10).await;
    let r = c
        .request("POST", "/v1/courses/DOWN-1/enrollment", Some(&token("before")), None)
        .await;
    assert_eq!(r.status, 201);

    db.kill();
    for i in 0..5 {
        let r = c
            .request(
                "POST",
                "/v1/courses/DOWN-1/enrollment",
                Some(&token(&format!("during{i}"))),
                None,
            )
            .await;
        assert_eq!(r.status, 503, "enroll while the store is down");
        assert_eq!(r.json()["error"], "unavailable");
        assert!(r.header("retry-after").is_some(), "503 carries Retry-After");
    }
    let r = c
        .request("DELETE", "/v1/courses/DOWN-1/enrollment", Some(&token("before")), None)
        .await;
    assert_eq!(r.status, 503, "a drop cannot be recorded either");
    // Reads keep working from memory, and no seat is held by the failed attempts.
    let r = c
        .request("GET", "/v1/courses/DOWN-1", Some(&token("reader")), None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        (r.json()["enrolled"].as_u64(), r.json()["seats_left"].as_u64()),
        (Some(1), Some(9))
    );
    assert_eq!(roster(&mut c, "DOWN-1").await, vec!["before"]);
    let r = c.request("GET", "/readyz", None, None).await;
    assert_eq!(r.status, 503, "not ready while the store is down");
    let r = c.request("GET", "/healthz", None, None).await;
    assert_eq!(r.status, 200, "alive all the same");

    db.start();
    let status = enroll_once_the_store_is_back(&mut c, "DOWN-1", "after").await;
    assert_eq!(status, 201, "enrollment resumes without a restart");
    assert_eq!(
        db.sql("SELECT student_id FROM enrollments ORDER BY student_id"),
        "after\nbefore"
    );
    assert_eq!(db.sql("SELECT enrolled FROM courses WHERE id = 'DOWN-1'"), "2");
    let r = c.request("GET", "/readyz", None, None).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_stops_answering_gets_503_and_commits_nothing_of_it() {
    let db = PrivateMariadb::new();
    let server = Server::start(&[
        "--store",
        &db.url(),
        "--store-acquire-timeout-ms",
        "500",
        "--store-statement-timeout-ms",
        "300",
    ]);
    let mut c = server.conn().await;
    put_course(&mut c, "HUNG-1", 10).await;
    let r = c
        .request("POST", "/v1/courses/HUNG-1/enrollment", Some(&token("before")), None)
        .await;
    assert_eq!(r.status, 201);

    db.signal("-STOP");
    // Without a bound on the statements this request would wait for as long as the store
    // is paused (the test client gives up after 30 s and fails).
    let r = c
        .request("POST", "/v1/courses/HUNG-1/enrollment", Some(&token("paused")), None)
        .await;
    assert_eq!(r.status, 503, "enroll while the store does not answer");
    assert!(r.header("retry-after").is_some(), "503 carries Retry-After");
    let r = c
        .request("GET", "/v1/courses/HUNG-1", Some(&token("reader")), None)
        .await;
    assert_eq!(r.status, 200, "reads are answered from memory meanwhile");
    assert_eq!(
        (r.json()["enrolled"].as_u64(), r.json()["seats_left"].as_u64()),
        (Some(1), Some(9)),
        "the failed attempt holds no seat"
    );

    // Resumed, the server finds the statements it was sent on a closed connection: they
    // ran in a transaction that was never committed, so they are rolled back.
    db.signal("-CONT");
    let status = enroll_once_the_store_is_back(&mut c, "HUNG-1", "after").await;
    assert_eq!(status, 201, "enrollment resumes once the store answers");
    assert_eq!(
        db.sql("SELECT student_id FROM enrollments ORDER BY student_id"),
        "after\nbefore",
        "nothing of the paused batch was committed"
    );
    assert_eq!(db.sql("SELECT enrolled FROM courses WHERE id = 'HUNG-1'"), "2");
    assert_eq!(roster(&mut c, "HUNG-1").await, vec!["after", "before"]);
}
