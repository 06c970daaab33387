//! The store goes away mid-service. A private `mariadbd` on its own port and data
//! directory is started and killed here (the shared server is never touched): enrollment
//! answers 503 with Retry-After and holds no seat, reads keep working from memory, and when
//! the store is back enrollment resumes without a restart. A store that stops answering
//! (paused with SIGSTOP) is the same to a student: 503 after `store_statement_timeout_ms`,
//! and the paused batch is never committed.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A throwaway MariaDB server for fault tests.
struct PrivateMariadb {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl PrivateMariadb {
    fn new() -> PrivateMariadb {
        let dir = TempDir::new("enrolld-mariadb");
        let out = Command::new("mariadb-install-db")
            .args([
                "--no-defaults",
                &format!("--datadir={}", dir.path("data")),
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .output()
            .expect("mariadb-install-db (scripts/services.sh installs mariadb-server)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut db = PrivateMariadb {
            dir,
            port: free_port(),
            child: None,
        };
        db.start();
        db.sql("CREATE DATABASE enrolld; USE enrolld; SELECT 1");
        db
    }

    fn start(&mut self) {
        let child = Command::new("mariadbd")
            .args([
                "--no-defaults".to_string(),
                format!("--datadir={}", self.dir.path("data")),
                format!("--socket={}", self.dir.path("sock")),
                format!("--pid-file={}", self.dir.path("pid")),
                format!("--port={}", self.port),
                "--bind-address=127.0.0.1".into(),
                "--user=root".into(),
                "--skip-grant-tables".into(),
                "--innodb-buffer-pool-size=32M".into(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mariadbd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.ping() {
            assert!(Instant::now() < deadline, "private mariadbd did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn ping(&self) -> bool {
        Command::new("mariadb-admin")
            .args([
                "-h127.0.0.1",
                &format!("-P{}", self.port),
                "-uroot",
                "--connect-timeout=1",
                "ping",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn sql(&self, sql: &str) -> String {
        let with_db = if sql.starts_with("CREATE DATABASE") {
            sql.to_string()
        } else {
            format!("USE enrolld; {sql}")
        };
        let out = Command::new("mariadb")
            .args([
                "-h127.0.0.1",
                &format!("-P{}", self.port),
                "-uroot",
                "-N",
                "-B",
                "-e",
                &with_db,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP / SIGCONT: the server keeps its connections open but stops answering.
    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    }

    fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/enrolld", self.port)
    }
}

impl Drop for PrivateMariadb {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal("-CONT");
        }
        self.kill();
    }
}

/// Enrolls `student`, retrying while the answer is 503 (the breaker may still be open), for
/// at most 30 s; the last status.
async fn enroll_once_the_store_is_back(c: &mut Conn, course: &str, student: &str) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let path = format!("/v1/courses/{course}/enrollment");
        let r = c.request("POST", &path, Some(&token(student)), None).await;
        if r.status != 503 || Instant::now() > deadline {
            return r.status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

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
