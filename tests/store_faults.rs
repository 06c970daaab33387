//! The store misbehaves in ways that are not "down": a COMMIT that hangs behind
//! `FLUSH TABLES WITH READ LOCK`, a server paused while SIGTERM drains, rows a hand edit
//! left over capacity or without their course, a server that does not flush at commit.
//! Each test runs its own private `mariadbd` (never the shared one), and checks that what
//! a client was told agrees with what the store holds afterwards.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use sqlx::{Connection, MySqlConnection};

/// Short, so a hung call is cut off quickly; not a whole number of seconds: MariaDB looks
/// whether the client of a waiting statement is still connected once a second, and a
/// COMMIT cut off half-way between two looks stays waiting for about half a second more.
/// Were it not fenced, `UNLOCK TABLES` in that half second would let it land.
const STATEMENT_TIMEOUT_MS: u64 = 1_500;

/// How long a client may wait for an answer: the server's bound (three statement
/// timeouts, `ANSWER_WAIT_STATEMENT_TIMEOUTS`) and slack for a busy machine. Past it the
/// request hung.
fn answer_bound() -> Duration {
    Duration::from_millis(3 * STATEMENT_TIMEOUT_MS + 5_000)
}

/// One request on a fresh connection, waited on at most `answer_bound()` (panics beyond):
/// `None` when the server closed the connection without answering.
async fn request_bounded(addr: SocketAddr, method: &str, path: &str, tok: &str) -> Option<Resp> {
    let mut conn = Conn::open(addr).await;
    let req =
        format!("{method} {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {tok}\r\nContent-Length: 0\r\n\r\n");
    conn.send_raw(req.as_bytes()).await.expect("send");
    match tokio::time::timeout(answer_bound(), conn.read_response()).await {
        Ok(answer) => answer,
        Err(_) => panic!("{method} {path} hung past {:?}", answer_bound()),
    }
}

async fn enroll_bounded(addr: SocketAddr, course: &str, student: &str) -> Option<Resp> {
    request_bounded(
        addr,
        "POST",
        &format!("/v1/courses/{course}/enrollment"),
        &token(student),
    )
    .await
}

/// Polls `/readyz` until it answers `status`; whether it did within `within`.
async fn readyz_turns(addr: SocketAddr, status: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut c = Conn::open(addr).await;
    while Instant::now() < deadline {
        if c.request("GET", "/readyz", None, None).await.status == status {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A session of our own on the private server, for locks and for looking inside it.
async fn session(db: &PrivateMariadb) -> MySqlConnection {
    MySqlConnection::connect(&db.url())
        .await
        .expect("a session on the private mariadbd")
}

async fn count(s: &mut MySqlConnection, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(s)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Waits (at most `within`) until `sql` counts at least one row; whether it did.
async fn eventually(s: &mut MySqlConnection, sql: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let n = count(s, sql).await;
        if n > 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// Every session on the server: id, command, state, the statement's start (for messages).
async fn processlist(s: &mut MySqlConnection) -> String {
    let rows: Vec<(i64, String, String, String)> = sqlx::query_as(
        "SELECT CAST(ID AS SIGNED), CAST(COMMAND AS CHAR), CAST(IFNULL(STATE, '') AS CHAR), \
         CAST(IFNULL(LEFT(INFO, 60), '') AS CHAR) FROM information_schema.PROCESSLIST ORDER BY ID",
    )
    .fetch_all(s)
    .await
    .unwrap();
    rows.iter().map(|r| format!("\n  {r:?}")).collect()
}

/// Waits until no other session on the server is running a statement (an abandoned one
/// finished, a blocked COMMIT landed or was killed), so what the store holds is final.
async fn store_quiet(s: &mut MySqlConnection) {
    let busy = "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
                WHERE ID <> CONNECTION_ID() AND COMMAND NOT IN ('Sleep', 'Daemon')";
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(s, busy).await > 0 {
        assert!(Instant::now() < deadline, "the private mariadbd stays busy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn seat_stored(s: &mut MySqlConnection, course: &str, student: &str) -> bool {
    let sql = format!("SELECT COUNT(*) FROM enrollments WHERE course_id = '{course}' AND student_id = '{student}'");
    count(s, &sql).await == 1
}

/// The server, the store's rows and the store's counter agree on a course's seats.
async fn assert_store_agrees(c: &mut Conn, s: &mut MySqlConnection, course: &str) {
    let rows: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT CAST(student_id AS CHAR) FROM enrollments WHERE course_id = '{course}' ORDER BY student_id"
    ))
    .fetch_all(&mut *s)
    .await
    .unwrap();
    assert_eq!(roster(c, course).await, rows, "the roster is the store's rows");
    let counter = count(s, &format!("SELECT enrolled FROM courses WHERE id = '{course}'")).await;
    assert_eq!(counter, rows.len() as i64, "the store's counter matches its rows");
    let r = c
        .request("GET", &format!("/v1/courses/{course}"), Some(&token("reader")), None)
        .await;
    assert_eq!(
        r.json()["enrolled"].as_u64(),
        Some(rows.len() as u64),
        "GET counts the store's rows"
    );
}

/// Enrolls `student` until the answer is neither 503 nor a closed connection (a seat
/// still being settled), for at most 30 s; the last status.
async fn enroll_until_decided(addr: SocketAddr, course: &str, student: &str) -> Option<u16> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = enroll_bounded(addr, course, student).await.map(|r| r.status);
        if !matches!(answer, None | Some(503)) || Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// After the store answers again: what `student` was told about an enrollment agrees with
/// the store. A 503 means nothing was recorded; a closed connection may go either way,
/// and a retry answers 200 if the seat is stored, 201 if it is not.
async fn assert_answer_holds(answer: Option<u16>, c: &mut Conn, s: &mut MySqlConnection, course: &str, student: &str) {
    store_quiet(s).await;
    let stored = seat_stored(s, course, student).await;
    match answer {
        Some(503) => assert!(!stored, "answered 503, yet the store holds the seat of {student}"),
        None => {
            let addr = c.stream.peer_addr().unwrap();
            let retried = enroll_until_decided(addr, course, student).await;
            let expected = Some(if stored { 200 } else { 201 });
            assert_eq!(
                retried, expected,
                "retry of {student} (seat stored before it: {stored})"
            );
            assert!(seat_stored(s, course, student).await, "a 200/201 is stored");
        }
        Some(other) => panic!("{student} was answered {other} while the store could not commit"),
    }
    assert_store_agrees(c, s, course).await;
}

/// Phase one takes the lock before the request, so the batch's first write blocks (COMMIT
/// is never sent). Phase two takes it after the batch's writes, before its COMMIT: the
/// COMMIT itself hangs. The request is then cut off at the statement timeout, the old session killed
/// and the row read back; a 503 is only right if the killed COMMIT never lands, which is
/// checked after `UNLOCK TABLES`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_blocked_by_flush_tables_with_read_lock_is_bounded_fenced_and_never_reported_as_nothing_recorded() {
    let db = PrivateMariadb::new();
    let timeout = STATEMENT_TIMEOUT_MS.to_string();
    let server = Server::start(&["--store", &db.url(), "--store-statement-timeout-ms", &timeout]);
    let addr = server.addr;
    let course = "FTWRL-1";
    let mut c = server.conn().await;
    put_course(&mut c, course, 100).await;
    assert_eq!(
        enroll_bounded(addr, course, "before").await.map(|r| r.status),
        Some(201)
    );
    let mut monitor = session(&db).await;
    let mut lock = session(&db).await;

    // Phase one: the lock first; the batch's INSERT waits for it.
    sqlx::query("FLUSH TABLES WITH READ LOCK")
        .execute(&mut lock)
        .await
        .unwrap();
    let post = tokio::spawn(enroll_bounded(addr, course, "write-blocked"));
    assert!(
        readyz_turns(addr, 503, Duration::from_secs(5)).await,
        "/readyz turns 503 while a store call hangs"
    );
    let answer = post.await.unwrap().map(|r| r.status);
    eprintln!("write blocked: answered {answer:?} (None: connection closed)");
    assert!(matches!(answer, None | Some(503)), "write blocked: answered {answer:?}");
    sqlx::query("UNLOCK TABLES").execute(&mut lock).await.unwrap();
    assert_eq!(enroll_once_the_store_is_back(&mut c, course, "after-1").await, 201);
    assert_answer_holds(answer, &mut c, &mut monitor, course, "write-blocked").await;

    // Phase two: the batch's UPDATE of the course row waits on a row lock of ours, and
    // enrolld is paused. The lock goes, the server runs the rest of the batch's script
    // and the session falls idle in its open transaction; only then is FLUSH TABLES WITH
    // READ LOCK taken, and enrolld resumed: the COMMIT it sends next waits for the lock,
    // whatever the scheduling and whatever statements the script holds.
    let mut gate = session(&db).await;
    sqlx::query("BEGIN").execute(&mut gate).await.unwrap();
    sqlx::query(&format!("SELECT id FROM courses WHERE id = '{course}' FOR UPDATE"))
        .fetch_all(&mut gate)
        .await
        .unwrap();
    let post = tokio::spawn(enroll_bounded(addr, course, "commit-blocked"));
    let waits = Duration::from_secs(5);
    let row_wait = "FROM information_schema.PROCESSLIST \
                    WHERE INFO LIKE 'UPDATE courses SET enrolled%' AND STATE = 'Updating'";
    let waiting = eventually(&mut monitor, &format!("SELECT COUNT(*) {row_wait}"), waits).await;
    assert!(waiting, "the batch waits on the row lock");
    let batch_session = count(&mut monitor, &format!("SELECT CAST(MIN(ID) AS SIGNED) {row_wait}")).await;
    signal(server.child.id(), "-STOP");
    sqlx::query("ROLLBACK").execute(&mut gate).await.unwrap();
    let idle =
        format!("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = {batch_session} AND COMMAND = 'Sleep'");
    let script_done = eventually(&mut monitor, &idle, waits).await;
    if script_done {
        sqlx::query("FLUSH TABLES WITH READ LOCK")
            .execute(&mut lock)
            .await
            .unwrap();
    }
    signal(server.child.id(), "-CONT");
    assert!(
        script_done,
        "the batch's script ran to its end:{}",
        processlist(&mut monitor).await
    );
    let commit_waits = format!(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
         WHERE ID = {batch_session} AND INFO = 'COMMIT' AND STATE LIKE 'Waiting%'"
    );
    if !eventually(&mut monitor, &commit_waits, waits).await {
        panic!(
            "the batch's COMMIT does not wait for the lock:{}",
            processlist(&mut monitor).await
        );
    }
    assert!(
        readyz_turns(addr, 503, Duration::from_secs(5)).await,
        "/readyz turns 503 while the COMMIT hangs"
    );
    let answer = post.await.unwrap().map(|r| r.status);
    eprintln!("COMMIT blocked: answered {answer:?} (None: connection closed)");
    assert!(
        matches!(answer, None | Some(503)),
        "COMMIT blocked: answered {answer:?}"
    );
    // Were the hung session still alive, its COMMIT would land now.
    sqlx::query("UNLOCK TABLES").execute(&mut lock).await.unwrap();
    assert_eq!(enroll_once_the_store_is_back(&mut c, course, "after-2").await, 201);
    assert_answer_holds(answer, &mut c, &mut monitor, course, "commit-blocked").await;
    assert!(readyz_turns(addr, 200, Duration::from_secs(10)).await, "ready again");
}

/// Before the bound, shutdown waited on a batch the paused store never answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_hung_store_exits_within_its_bound() {
    let db = PrivateMariadb::new();
    let timeout = STATEMENT_TIMEOUT_MS.to_string();
    let mut server = Server::start(&[
        "--store",
        &db.url(),
        "--store-statement-timeout-ms",
        &timeout,
        "--drain-timeout-ms",
        "1000",
    ]);
    let course = "TERM-1".to_string();
    let mut c = server.conn().await;
    put_course(&mut c, &course, 100_000).await;
    let students: Vec<String> = (0..100_000).map(|i| format!("s{i}")).collect();
    let (addr, courses) = (server.addr, vec![course.clone()]);
    let rush = tokio::spawn(async move { rush(addr, &courses, &students, 8).await });
    let mut monitor = session(&db).await;
    let some_stored = "SELECT CAST(COUNT(*) >= 50 AS SIGNED) FROM enrollments";
    assert!(
        eventually(&mut monitor, some_stored, Duration::from_secs(30)).await,
        "the rush commits"
    );

    db.signal("-STOP");
    tokio::time::sleep(Duration::from_millis(300)).await; // batches now wait on the store
    let stopped = Instant::now();
    signal(server.child.id(), "-TERM");
    let exit_bound = Duration::from_secs(30);
    let code = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status.code();
        }
        if stopped.elapsed() > exit_bound {
            server.kill9();
            db.signal("-CONT");
            panic!("enrolld did not exit within {exit_bound:?} of SIGTERM with the store paused");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("exited with {code:?} after {:?}", stopped.elapsed());
    let outcomes = rush.await.unwrap();
    db.signal("-CONT");

    // What the store made of it agrees with every answer given.
    store_quiet(&mut monitor).await;
    let stored: std::collections::BTreeSet<String> = sqlx::query_scalar(&format!(
        "SELECT CAST(student_id AS CHAR) FROM enrollments WHERE course_id = '{course}'"
    ))
    .fetch_all(&mut monitor)
    .await
    .unwrap()
    .into_iter()
    .collect();
    for (status, _, student) in &outcomes {
        match status {
            201 | 200 => assert!(
                stored.contains(student),
                "{student} was answered {status} but is not stored"
            ),
            503 => assert!(!stored.contains(student), "{student} was answered 503 but is stored"),
            _ => {}
        }
    }
}

/// 5 rows on a course of capacity 2, as a hand edit (CHECK off for its session) leaves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overfull_course_is_loaded_whole_sells_nothing_and_is_counted() {
    let db = PrivateMariadb::new();
    let mut server = Server::start(&["--store", &db.url()]);
    let course = "OVER-1";
    let mut c = server.conn().await;
    put_course(&mut c, course, 3).await;
    enroll_all(&mut c, course, &["s1", "s2", "s3"]).await;
    assert_eq!(server.terminate(), Some(0));
    db.sql(&format!(
        "SET SESSION check_constraint_checks = 0; \
         INSERT INTO enrollments (course_id, student_id, enrolled_at_ms) VALUES ('{course}', 's4', 1), ('{course}', 's5', 2); \
         UPDATE courses SET capacity = 2 WHERE id = '{course}'"
    ));

    let server = server.restart();
    let mut c = server.conn().await;
    let check = |r: Resp, enrolled: u64, seats_left: u64| {
        assert_eq!(r.status, 200);
        let j = r.json();
        assert_eq!(
            (j["capacity"].as_u64(), j["enrolled"].as_u64(), j["seats_left"].as_u64()),
            (Some(2), Some(enrolled), Some(seats_left)),
            "{j}"
        );
    };
    let get = format!("/v1/courses/{course}");
    check(c.request("GET", &get, Some(&token("reader")), None).await, 5, 0);
    assert_eq!(roster(&mut c, course).await, ["s1", "s2", "s3", "s4", "s5"]);
    assert_eq!(metric(&mut c, "enrolld_recovery_courses_overfull").await, Some(1.0));
    assert_eq!(metric(&mut c, "enrolld_recovery_seats_orphaned").await, Some(0.0));
    let enroll = format!("/v1/courses/{course}/enrollment");
    let r = c.request("POST", &enroll, Some(&token("new1")), None).await;
    assert_eq!((r.status, r.json()["error"].as_str()), (409, Some("course_full")));

    for (i, s) in ["s1", "s2", "s3", "s4"].into_iter().enumerate() {
        let r = c.request("DELETE", &enroll, Some(&token(s)), None).await;
        assert_eq!(
            r.status,
            200,
            "drop {} of {s}: {:?}",
            i + 1,
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["status"], "dropped");
        let left = 5 - (i as u64 + 1);
        check(
            c.request("GET", &get, Some(&token("reader")), None).await,
            left,
            2u64.saturating_sub(left),
        );
        if left == 2 {
            let r = c.request("POST", &enroll, Some(&token("new1")), None).await;
            assert_eq!(r.status, 409, "at capacity after the third drop");
        }
    }
    let r = c.request("POST", &enroll, Some(&token("new1")), None).await;
    assert_eq!(r.status, 201, "under capacity again: sells");
    let mut monitor = session(&db).await;
    assert_store_agrees(&mut c, &mut monitor, course).await;
    assert_eq!(roster(&mut c, course).await, ["new1", "s5"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_seats_are_kept_and_counted() {
    let db = PrivateMariadb::new();
    let mut server = Server::start(&["--store", &db.url()]);
    let mut c = server.conn().await;
    put_course(&mut c, "REAL-1", 5).await;
    assert_eq!(server.terminate(), Some(0)); // the schema is in place
    db.sql("INSERT INTO enrollments (course_id, student_id, enrolled_at_ms) VALUES ('GONE-1', 'orphan', 1)");

    let mut server = server.restart();
    let mut c = server.conn().await;
    assert_eq!(metric(&mut c, "enrolld_recovery_seats_orphaned").await, Some(1.0));
    assert_eq!(metric(&mut c, "enrolld_recovery_courses_overfull").await, Some(0.0));
    let r = c
        .request("GET", "/v1/courses/GONE-1", Some(&token("orphan")), None)
        .await;
    assert_eq!(r.status, 404, "not loaded");
    let r = c
        .request("GET", "/v1/me/enrollments", Some(&token("orphan")), None)
        .await;
    assert_eq!(r.json()["enrollments"], serde_json::json!([]), "not loaded");
    let r = c
        .request("POST", "/v1/courses/REAL-1/enrollment", Some(&token("orphan")), None)
        .await;
    assert_eq!(r.status, 201, "the rest serves");
    assert_eq!(server.terminate(), Some(0));
    assert_eq!(
        db.sql("SELECT course_id FROM enrollments WHERE student_id = 'orphan' ORDER BY course_id"),
        "GONE-1\nREAL-1",
        "the orphan seat is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_does_not_flush_at_commit_is_refused() {
    let db = PrivateMariadb::with_args(&["--innodb-flush-log-at-trx-commit=2"]);
    assert_eq!(db.sql("SELECT @@innodb_flush_log_at_trx_commit"), "2");
    let mut child = spawn_serve(&["--listen", "127.0.0.1:0", "--store", &db.url()]);
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("enrolld served a store that does not flush at commit");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit {:?}; {stderr}", out.status);
    let error = stderr
        .lines()
        .find(|l| l.starts_with("enrolld: "))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(error.contains("innodb_flush_log_at_trx_commit"), "{error}");
    assert!(!stderr.contains("ready listen="), "{stderr}");
}
