//! The contract as outside clients see it: `../shared/contract_smoke.py` against the real
//! server on both stores, the command-line contract (exit codes, `token`), SIGTERM and a
//! restart that keeps what was committed.

mod common;

use common::*;
use std::process::Command;

fn smoke(server: &Server) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/contract_smoke.py");
    let out = Command::new("python3")
        .args([script, "--url", &format!("http://{}", server.addr), "--secret", SECRET])
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "contract smoke failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("contract checks hold"), "{text}");
}

#[test]
fn contract_smoke_sqlite() {
    let dir = TempDir::new("enrolld-contract");
    let server = Server::start(&["--store", &format!("sqlite://{}", dir.path("e.db")), "--demo"]);
    smoke(&server);
}

#[test]
fn contract_smoke_mysql() {
    let db = TestDb::new();
    let server = Server::start(&["--store", &db.url]);
    smoke(&server);
    // What the API said is what the store holds.
    let rows = db.query("SELECT COUNT(*) FROM enrollments");
    assert_eq!(rows[0][0], "2", "smoke leaves two seats in its course");
}

#[tokio::test]
async fn sigterm_exits_zero_and_restart_keeps_state() {
    let dir = TempDir::new("enrolld-term");
    let store = format!("sqlite://{}", dir.path("e.db"));
    let mut server = Server::start(&["--store", &store, "--shards", "2"]);
    let mut c = server.conn().await;
    put_course(&mut c, "KEEP-1", 3).await;
    for s in ["ann", "bob"] {
        let r = c
            .request("POST", "/v1/courses/KEEP-1/enrollment", Some(&token(s)), None)
            .await;
        assert_eq!(r.status, 201);
    }
    drop(c);
    assert_eq!(server.terminate(), Some(0), "SIGTERM exits 0");
    let server = server.restart();
    let mut c = server.conn().await;
    assert_eq!(roster(&mut c, "KEEP-1").await, vec!["ann", "bob"]);
    let r = c.request("GET", "/v1/courses/KEEP-1", Some(&token("ann")), None).await;
    assert_eq!(
        (r.json()["enrolled"].as_u64(), r.json()["seats_left"].as_u64()),
        (Some(2), Some(1))
    );
    let r = c
        .request("POST", "/v1/courses/KEEP-1/enrollment", Some(&token("ann")), None)
        .await;
    assert_eq!(r.status, 200, "idempotent after restart");
}

fn exit_of(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin()).args(args).output().expect("run enrolld");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_configuration_exits_2_naming_the_key() {
    let dir = TempDir::new("enrolld-cfg");
    let bad_key = dir.path("bad.toml");
    std::fs::write(&bad_key, "shardz = 2\n").unwrap();
    let bad_value = dir.path("bad2.toml");
    std::fs::write(&bad_value, "batch_rows_max = 0\n").unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["serve", "--shards", "0"], "shards"),
        (&["serve", "--shards", "many"], "shards"),
        (&["serve", "--listen", "nowhere"], "listen"),
        (&["serve", "--store", "postgres://x/y"], "store"),
        (&["serve", "--store", "mysql://u@127.0.0.1/x"], "jwt_secret"),
        (&["serve", "--config", "/nonexistent/enrolld.toml"], "enrolld.toml"),
        (&["serve", "--config", &bad_key], "shardz"),
        (&["serve", "--config", &bad_value], "batch_rows_max"),
        (&["serve", "--no-such-flag"], "no-such-flag"),
    ];
    for (args, needle) in cases {
        let (code, err) = exit_of(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: error does not name {needle}: {err}");
    }
}

#[test]
fn token_subcommand_uses_the_configured_secret() {
    let out = Command::new(bin())
        .args(["token", "--sub", "alice", "--role", "admin", "--jwt-secret", SECRET])
        .output()
        .unwrap();
    assert!(out.status.success());
    let tok = String::from_utf8(out.stdout).unwrap();
    let caller = auth()
        .verify(format!("Bearer {}", tok.trim()).as_bytes())
        .expect("valid token");
    assert_eq!(caller.id.as_str(), "alice");
    let (code, _) = exit_of(&["token", "--sub", "bad sub", "--jwt-secret", SECRET]);
    assert_eq!(code, Some(2));
}

#[test]
fn shard_of_names_the_owner_shard_and_refuses_bad_input() {
    let courses = ["CS101-01", "MATH221-01", "BIG-0", "BIG-1", "a.b_c"];
    let out = Command::new(bin())
        .args(["shard-of", "--shards", "3"])
        .args(courses)
        .output()
        .unwrap();
    assert!(out.status.success());
    let lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let expected: Vec<String> = courses
        .iter()
        .map(|c| {
            let id = enrolld::ids::CourseId::parse(c).unwrap();
            format!("{c} {}", enrolld::shard::owner_of(&id, 3).0)
        })
        .collect();
    assert_eq!(lines, expected);
    for args in [
        &["shard-of", "--shards", "0", "A"][..],
        &["shard-of", "--shards", "2", "bad id"],
    ] {
        let (code, err) = exit_of(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
    }
}

/// The hottest courses get per-course series: heat over the last window and answers by
/// outcome (what the "top-3 limited courses" recording rule reads).
#[tokio::test]
async fn hot_course_series() {
    let dir = TempDir::new("enrolld-hot");
    let server = Server::start(&[
        "--store",
        &format!("sqlite://{}", dir.path("e.db")),
        "--limits-enabled",
        "false",
    ]);
    let mut c = server.conn().await;
    put_course(&mut c, "HOT-1", 1).await;
    put_course(&mut c, "COLD-1", 5).await;
    for i in 0..40 {
        let r = c
            .request(
                "POST",
                "/v1/courses/HOT-1/enrollment",
                Some(&token(&format!("h{i}"))),
                None,
            )
            .await;
        assert_eq!(r.status, if i == 0 { 201 } else { 409 });
    }
    // One heat window (5 s) must pass before the shards publish it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        if metric(&mut c, r#"enrolld_course_hot{course="HOT-1"}"#).await.is_some() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no heat series published");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert_eq!(
        metric(&mut c, r#"enrolld_course_hot{course="HOT-1"}"#).await,
        Some(1.0),
        "40 requests in 5 s is hot"
    );
    let full = r#"enrolld_course_requests_total{course="HOT-1",outcome="full"}"#;
    assert_eq!(metric(&mut c, full).await, Some(39.0));
    let enrolled = r#"enrolld_course_requests_total{course="HOT-1",outcome="enrolled"}"#;
    assert_eq!(metric(&mut c, enrolled).await, Some(1.0));
    assert_eq!(
        metric(&mut c, r#"enrolld_course_seats_left{course="HOT-1"}"#).await,
        Some(0.0)
    );
    assert_eq!(
        metric(&mut c, r#"enrolld_course_hot{course="COLD-1"}"#).await,
        None,
        "an idle course has no series"
    );
}

/// `--log-format json` writes one JSON object per line, and with `--access-log` each
/// request's line carries its request id.
#[tokio::test]
async fn json_logs_carry_request_ids() {
    let dir = TempDir::new("enrolld-json");
    let store = format!("sqlite://{}", dir.path("e.db"));
    let server = Server::start(&["--store", &store, "--log-format", "json", "--access-log"]);
    let mut c = server.conn().await;
    c.send_raw(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Request-Id: json-log-1\r\n\r\n")
        .await
        .unwrap();
    let r = c.read_response().await.expect("an answer");
    assert_eq!(r.status, 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let found = server.drain_log().into_iter().find(|l| l.contains("json-log-1"));
        if let Some(line) = found {
            let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
            assert_eq!(v["fields"]["request_id"], "json-log-1", "{line}");
            assert_eq!(v["fields"]["status"], 200, "{line}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no access-log line with the request id"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The ready line names the address once (it named `listen=` twice: as a field and in the
/// message), so a script that takes the first `listen=` and one that takes the last agree.
#[test]
fn the_ready_line_names_the_address_once() {
    use std::io::{BufRead, BufReader};
    let dir = TempDir::new("enrolld-ready");
    let store = format!("sqlite://{}", dir.path("e.db"));
    let mut child = spawn_serve(&["--listen", "127.0.0.1:0", "--store", &store]);
    let stderr = child.stderr.take().expect("piped");
    let line = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("enrolld ready"))
        .expect("a ready line");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(line.matches("listen=").count(), 1, "{line}");
}
