//! Partition leases on a MySQL store (API.md, "Running" and "Several nodes"): one enrolld
//! takes every lease at start, so a second one on the same database refuses (exit 2,
//! naming the holder) while the first lives, waits out a dead one's lease (`kill -9`) and
//! takes over at once from one that stopped with SIGTERM. A process paused past its lease
//! whose store another one took over is fenced: nothing it decides from memory is recorded,
//! it answers 503 or nothing, and it exits 1.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// Partitions in every store (`partition::PARTITIONS`).
const PARTITIONS: &str = "16384";
/// The line a start logs while another process holds the store's leases.
const WAITING_FOR_LEASES: &str = "waiting for them to lapse";
/// How long a fenced process may take to notice and exit once it runs again: a liveness
/// guard (it notices within a heartbeat), not a timing assertion.
const FENCED_EXIT_WAIT_MS_MAX: u64 = 30_000;

fn serve_args(listen: &str, store: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["serve", "--listen", listen, "--jwt-secret", SECRET, "--store", store]
        .map(String::from)
        .to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn students(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:02}")).collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The one owner of every lease row, and how many rows it owns.
fn lease_owners(db: &TestDb) -> Vec<(String, String)> {
    db.query("SELECT COALESCE(owner, 'NULL'), COUNT(*) FROM leases GROUP BY owner")
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect()
}

/// Waits for `server` to exit by itself, at most `wait_ms_max`; its exit code.
async fn exit_code_within(server: &mut Server, wait_ms_max: u64) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_millis(wait_ms_max);
    loop {
        if let Some(status) = server.child.try_wait().expect("try_wait") {
            return status.code();
        }
        assert!(
            Instant::now() < deadline,
            "enrolld pid {} did not exit within {wait_ms_max} ms; its log:\n{}",
            server.child.id(),
            server.drain_log().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_second_server_on_one_mysql_database_exits_2_naming_the_holder() {
    let db = TestDb::new();
    // A port of its own, not :0, so the holder's advertised address is the real one.
    let listen = format!("127.0.0.1:{}", free_port());
    let first = Server::start_args(serve_args(&listen, &db.url, &["--shards", "2"]));
    let mut c = first.conn().await;
    put_course(&mut c, "ONE-1", 5).await;
    let owners = lease_owners(&db);
    assert_eq!(owners.len(), 1, "one holder: {owners:?}");
    let holder_id = owners[0].0.clone();

    let holder_pid = format!("pid {}", first.child.id());
    check_refused(
        &["--listen", "127.0.0.1:0", "--store", &db.url],
        &[&holder_id, &listen, &holder_pid],
    );

    // The refused start gave back nothing of the first's and took nothing: the first
    // still holds every partition, and sells.
    assert_eq!(lease_owners(&db), vec![(holder_id, PARTITIONS.to_string())]);
    assert_eq!(enroll_on(first.addr, "ONE-1", "ann").await, 201);
    assert_eq!(roster(&mut c, "ONE-1").await, vec!["ann"]);
}

#[tokio::test]
async fn a_restart_after_kill_9_takes_the_leases_over_and_keeps_every_seat() {
    let db = TestDb::new();
    // The dead process's lease must outlast the restart's way to its lease check, for the
    // restart to be seen waiting; 3 s leaves room on a loaded machine.
    let mut server = Server::start(&["--store", &db.url, "--shards", "2", "--cluster-lease-ms", "3000"]);
    let mut c = server.conn().await;
    put_course(&mut c, "CRASH-1", 10).await;
    let before = students("s", 6);
    enroll_all(&mut c, "CRASH-1", &strs(&before)).await;
    let dead_pid = format!("pid {}", server.child.id());
    drop(c);

    server.kill9();
    let server = server.restart();
    let waited: Vec<&String> = server
        .start_log
        .iter()
        .filter(|l| l.contains(WAITING_FOR_LEASES))
        .collect();
    assert!(
        waited.iter().any(|l| l.contains(&dead_pid)),
        "the restart waited for the dead holder ({dead_pid}) to lapse:\n{}",
        server.start_log.join("\n")
    );
    // Every partition is the new process's, each taken over (epoch bumped past the first
    // start's 1), so whatever the dead one had queued could never commit.
    let owners = lease_owners(&db);
    assert_eq!(owners.len(), 1, "one holder: {owners:?}");
    assert_eq!(owners[0].1, PARTITIONS);
    assert_eq!(
        db.query("SELECT MIN(epoch), MAX(epoch) FROM leases"),
        vec![vec!["2".to_string(), "2".to_string()]]
    );

    let mut c = server.conn().await;
    assert_eq!(roster(&mut c, "CRASH-1").await, before);
    let after = students("t", 4);
    enroll_all(&mut c, "CRASH-1", &strs(&after)).await;
    assert_eq!(enroll_on(server.addr, "CRASH-1", "late").await, 409);
    assert_eq!(roster(&mut c, "CRASH-1").await.len(), 10);
}

#[tokio::test]
async fn sigterm_hands_the_store_over_at_once() {
    let db = TestDb::new();
    // A lease far longer than the test: had it not been released, the next start would
    // have to wait it out, and would say so.
    let mut first = Server::start(&["--store", &db.url, "--shards", "2", "--cluster-lease-ms", "20000"]);
    let mut c = first.conn().await;
    put_course(&mut c, "TERM-1", 3).await;
    enroll_all(&mut c, "TERM-1", &["ann"]).await;
    drop(c);

    let code = first.terminate();
    let log = first.rest_of_log();
    assert_eq!(code, Some(0), "SIGTERM exits 0; the log:\n{}", log.join("\n"));
    assert!(
        log.iter()
            .any(|l| l.contains("leases released") && l.contains(&format!("partitions={PARTITIONS}"))),
        "the first released every lease:\n{}",
        log.join("\n")
    );
    assert_eq!(lease_owners(&db), vec![("NULL".to_string(), PARTITIONS.to_string())]);

    let second = Server::start(&["--store", &db.url, "--shards", "2"]);
    assert!(
        !second.start_log.iter().any(|l| l.contains(WAITING_FOR_LEASES)),
        "the second found the leases free:\n{}",
        second.start_log.join("\n")
    );
    let owners = lease_owners(&db);
    assert_eq!(owners.len(), 1, "one holder: {owners:?}");
    assert_eq!(owners[0].1, PARTITIONS);
    let mut c = second.conn().await;
    assert_eq!(roster(&mut c, "TERM-1").await, vec!["ann"]);
    enroll_all(&mut c, "TERM-1", &["bob", "cy"]).await;
    assert_eq!(enroll_on(second.addr, "TERM-1", "dee").await, 409);
}

#[tokio::test]
async fn a_paused_server_is_fenced_out_and_never_oversells() {
    const COURSE: &str = "FENCE-1";
    const CAPACITY: usize = 12;
    let db = TestDb::new();
    let mut a = Server::start(&["--store", &db.url, "--shards", "2", "--cluster-lease-ms", "1000"]);
    let mut c = a.conn().await;
    put_course(&mut c, COURSE, CAPACITY as u32).await;
    drop(c);

    // Paused, A keeps its memory (0 of 12 taken) and its listen socket: the kernel takes
    // these connections and requests into A's backlog and buffers, for A to decide once
    // it runs again, by then no longer the store's owner.
    signal(a.child.id(), "-STOP");
    let mut queued = Vec::new();
    for s in students("a", CAPACITY) {
        let mut conn = Conn::open(a.addr).await;
        let path = format!("/v1/courses/{COURSE}/enrollment");
        conn.send_request("POST", &path, Some(&token(&s)), None)
            .await
            .expect("queue a request at the paused server");
        queued.push((format!("POST {s}"), conn));
    }
    let mut conn = Conn::open(a.addr).await;
    let raise = format!(r#"{{"title":"Course {COURSE}","capacity":40}}"#);
    conn.send_request(
        "PUT",
        &format!("/v1/admin/courses/{COURSE}"),
        Some(&admin_token()),
        Some(&raise),
    )
    .await
    .expect("queue an admin change at the paused server");
    queued.push(("PUT capacity 40".to_string(), conn));
    let answers: Vec<_> = queued
        .into_iter()
        .map(|(what, mut conn)| tokio::spawn(async move { (what, conn.read_response().await.map(|r| r.status)) }))
        .collect();

    // B becomes ready only once it holds every partition: after A's lease lapsed.
    let b = Server::start(&["--store", &db.url, "--shards", "2", "--cluster-lease-ms", "1000"]);
    let mut c = b.conn().await;
    let sold = students("b", CAPACITY);
    enroll_all(&mut c, COURSE, &strs(&sold)).await;
    assert_eq!(enroll_on(b.addr, COURSE, "b-late").await, 409);

    signal(a.child.id(), "-CONT");
    let mut fenced = 0;
    for answer in answers {
        let (what, status) = answer.await.expect("reader task");
        assert!(
            matches!(status, None | Some(503)),
            "{what} at the fenced server answered {status:?}: only 503 or a closed connection may"
        );
        fenced += usize::from(status.is_some());
    }
    let code = exit_code_within(&mut a, FENCED_EXIT_WAIT_MS_MAX).await;
    let log_a = a.rest_of_log();
    assert_eq!(
        code,
        Some(1),
        "the fenced server exits 1; its log:\n{}",
        log_a.join("\n")
    );
    assert!(
        log_a.iter().any(|l| l.contains("lost the store's leases")),
        "A says why it exits:\n{}",
        log_a.join("\n")
    );
    eprintln!(
        "{fenced} of {} requests queued at A answered 503, the rest cut off",
        CAPACITY + 1
    );

    // The store holds B's sale and nothing of A's.
    let rows: Vec<String> = db
        .query(&format!(
            "SELECT student_id FROM enrollments WHERE course_id = '{COURSE}' ORDER BY student_id"
        ))
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    assert_eq!(rows, sold);
    assert_eq!(
        db.query(&format!("SELECT capacity, enrolled FROM courses WHERE id = '{COURSE}'")),
        vec![vec![CAPACITY.to_string(), CAPACITY.to_string()]]
    );
    assert_eq!(roster(&mut c, COURSE).await, sold);
    assert_eq!(enroll_on(b.addr, COURSE, "b-later").await, 409);
}

#[tokio::test]
async fn leases_table_names_the_holder() {
    let db = TestDb::new();
    let listen = format!("127.0.0.1:{}", free_port());
    let server = Server::start_args(serve_args(&listen, &db.url, &["--shards", "2"]));
    let owners = lease_owners(&db);
    assert_eq!(owners.len(), 1, "one holder: {owners:?}");
    let (owner, partitions) = &owners[0];
    assert!(owner.starts_with("solo-"), "a node outside cluster mode: {owner}");
    assert_eq!(partitions, PARTITIONS);
    assert_eq!(
        db.query("SELECT MIN(epoch) FROM leases"),
        vec![vec!["1".to_string()]],
        "the first start took every partition once"
    );
    assert_eq!(
        db.query(&format!("SELECT pid, advertise FROM nodes WHERE id = '{owner}'")),
        vec![vec![server.child.id().to_string(), listen]]
    );
}
