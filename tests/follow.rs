//! `enrolld events follow` against the real server on SQLite: it prints every event once,
//! in order, and resumes from its cursor file; with `--exec` it delivers every event in
//! order, retrying a failing command on the same event, and saves the cursor only past
//! delivered events; bad, future and expired cursors and refused tokens exit non-zero
//! naming the reason.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use enrolld::ids::StudentId;
use enrolld::net::auth::{Auth, Role};
use serde_json::Value;

/// Longest a `--once` run may take here (it ends by itself; this only bounds a hang).
const RUN_TIMEOUT_S: u64 = 60;

/// One finished `enrolld events follow` run.
struct Run {
    code: Option<i32>,
    events: Vec<Value>,
    stderr: String,
}

fn follow_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(["events", "follow"])
        .args(args)
        .env_remove("ENROLLD_JWT_SECRET")
        .env_remove("ENROLLD_STORE")
        .env_remove("ENROLLD_CONFIG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn follow(args: &[&str], env: &[(&str, &str)]) -> Run {
    let child = follow_command(args, env).spawn().expect("spawn enrolld events follow");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let out = match rx.recv_timeout(Duration::from_secs(RUN_TIMEOUT_S)) {
        Ok(out) => out.expect("follow's output"),
        Err(_) => {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
            panic!("follow {args:?} did not end within {RUN_TIMEOUT_S} s");
        }
    };
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 stdout");
    Run {
        code: out.status.code(),
        events: stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `(type, course, student)` of each event.
fn summary(events: &[Value]) -> Vec<(String, String, Option<String>)> {
    events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["course_id"].as_str().unwrap().to_string(),
                e["student_id"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

fn cursors(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["cursor"].as_str().unwrap().to_string())
        .collect()
}

/// Cursors are opaque to consumers; today they are `c` and 16 lowercase hex digits, so
/// their text orders as the feed does, which is what this checks.
fn assert_increasing(cursors: &[String]) {
    assert!(
        cursors.windows(2).all(|w| w[0] < w[1]),
        "cursors not increasing: {cursors:?}"
    );
}

fn ev(kind: &str, course: &str, student: Option<&str>) -> (String, String, Option<String>) {
    (kind.to_string(), course.to_string(), student.map(str::to_owned))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .to_string()
}

async fn seat(conn: &mut Conn, method: &str, course: &str, student: &str) -> u16 {
    let path = format!("/v1/courses/{course}/enrollment");
    conn.request(method, &path, Some(&token(student)), None).await.status
}

fn sqlite_server(dir: &TempDir) -> Server {
    Server::start(&["--store", &format!("sqlite://{}", dir.path("e.db"))])
}

#[tokio::test]
async fn follow_prints_every_event_once_and_resumes_from_its_cursor_file() {
    let dir = TempDir::new("follow_print");
    let server = sqlite_server(&dir);
    let url = format!("http://{}", server.addr);
    let mut conn = server.conn().await;
    put_course(&mut conn, "C1", 2).await;
    assert_eq!(seat(&mut conn, "POST", "C1", "s1").await, 201);
    assert_eq!(seat(&mut conn, "POST", "C1", "s2").await, 201);
    assert_eq!(seat(&mut conn, "POST", "C1", "s3").await, 409, "full: no event");
    assert_eq!(seat(&mut conn, "DELETE", "C1", "s1").await, 200);

    let file = dir.path("cursor");
    let first = follow(
        &["--once", "--url", &url, "--jwt-secret", SECRET, "--cursor-file", &file],
        &[],
    );
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    assert_eq!(
        summary(&first.events),
        [
            ev("course_changed", "C1", None),
            ev("enrolled", "C1", Some("s1")),
            ev("enrolled", "C1", Some("s2")),
            ev("dropped", "C1", Some("s1")),
        ]
    );
    assert_eq!(first.events[0]["capacity"], 2);
    assert!(first.events.iter().all(|e| e["at"].is_string()));
    let first_cursors = cursors(&first.events);
    assert_increasing(&first_cursors);
    assert_eq!(
        read(&file),
        first_cursors[3],
        "the cursor file ends at the last event printed"
    );

    // A second run (with a token instead of the secret) prints only what is newer.
    assert_eq!(seat(&mut conn, "POST", "C1", "s3").await, 201);
    let admin = admin_token();
    let second = follow(
        &["--once", "--url", &url, "--token", &admin, "--cursor-file", &file],
        &[],
    );
    assert_eq!(second.code, Some(0), "{}", second.stderr);
    assert_eq!(summary(&second.events), [ev("enrolled", "C1", Some("s3"))]);
    let s3 = cursors(&second.events).remove(0);
    assert!(s3 > first_cursors[3], "{s3} after {}", first_cursors[3]);
    assert_eq!(read(&file), s3);

    // --after wins over the cursor file; pages of 2 still give every event once.
    let after = follow(
        &[
            "--once",
            "--url",
            &url,
            "--token",
            &admin,
            "--after",
            &first_cursors[1],
            "--limit",
            "2",
        ],
        &[],
    );
    assert_eq!(after.code, Some(0), "{}", after.stderr);
    assert_eq!(
        cursors(&after.events),
        [first_cursors[2].clone(), first_cursors[3].clone(), s3.clone()]
    );

    // Following (long poll): a new change is printed as it commits; SIGTERM exits 0 with
    // the cursor saved.
    let mut child = follow_command(&["--url", &url, "--token", &admin, "--cursor-file", &file], &[])
        .spawn()
        .expect("spawn follow");
    let (tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    put_course(&mut conn, "C2", 5).await;
    assert_eq!(seat(&mut conn, "POST", "C2", "s4").await, 201);
    let mut live = Vec::new();
    for _ in 0..2 {
        let line = lines.recv_timeout(Duration::from_secs(20)).expect("a followed event");
        live.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    assert_eq!(
        summary(&live),
        [ev("course_changed", "C2", None), ev("enrolled", "C2", Some("s4"))]
    );
    let live_cursors = cursors(&live);
    assert!(live_cursors[0] > s3);
    assert_increasing(&live_cursors);
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "follow did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    assert_eq!(read(&file), live_cursors[1]);
    assert!(lines.try_recv().is_err(), "nothing else was printed");
}

/// Records each delivery (cursor, type, the JSON on stdin, whether the secret leaked into
/// its environment, what the cursor file held meanwhile) and fails the first 2 tries of
/// s2's enrollment.
const HANDLER: &str = r#"#!/bin/sh
event=$(cat)
tries="$FOLLOW_DIR/tries.$ENROLLD_EVENT_CURSOR"
n=$(cat "$tries" 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" > "$tries"
printf '%s\t%s\t%s\t%s\t%s\n' "$ENROLLD_EVENT_CURSOR" "$ENROLLD_EVENT_TYPE" "$event" "${ENROLLD_JWT_SECRET:-unset}" "$(cat "$FOLLOW_DIR/cursor" 2>/dev/null || echo none)" >> "$FOLLOW_DIR/delivered"
if [ "$ENROLLD_EVENT_TYPE" = enrolled ]; then
  case "$event" in *'"student_id":"s2"'*) [ "$n" -gt 2 ] || exit 1 ;; esac
fi
exit 0
"#;

#[tokio::test]
async fn exec_delivers_every_event_in_order_retrying_a_failing_command() {
    let dir = TempDir::new("follow_exec");
    let server = sqlite_server(&dir);
    let url = format!("http://{}", server.addr);
    let mut conn = server.conn().await;
    put_course(&mut conn, "C1", 3).await;
    for s in ["s1", "s2", "s3"] {
        assert_eq!(seat(&mut conn, "POST", "C1", s).await, 201);
    }
    assert_eq!(seat(&mut conn, "DELETE", "C1", "s2").await, 200);
    let plain = follow(&["--once", "--url", &url, "--jwt-secret", SECRET], &[]);
    assert_eq!(plain.code, Some(0), "{}", plain.stderr);
    assert_eq!(plain.events.len(), 5);
    let all = cursors(&plain.events);

    let script = dir.path("handler.sh");
    std::fs::write(&script, HANDLER).unwrap();
    let exec = format!("sh {script}");
    let file = dir.path("cursor");
    let env = [("FOLLOW_DIR", dir.0.to_str().unwrap()), ("ENROLLD_JWT_SECRET", SECRET)];
    let args = ["--once", "--url", &url, "--exec", &exec, "--cursor-file", &file];
    let run = follow(&args, &env);
    assert_eq!(run.code, Some(0), "{}", run.stderr);

    let delivered: Vec<Vec<String>> = std::fs::read_to_string(dir.path("delivered"))
        .unwrap()
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect();
    let s2 = &all[2];
    assert_eq!(plain.events[2]["student_id"], "s2");
    let expected: Vec<&String> = [&all[0], &all[1], s2, s2, s2, &all[3], &all[4]].into();
    let got: Vec<&String> = delivered.iter().map(|d| &d[0]).collect();
    assert_eq!(got, expected, "every event, in order, s2's enrollment 3 times");
    for d in &delivered {
        let event = plain.events.iter().find(|e| e["cursor"] == d[0].as_str()).unwrap();
        assert_eq!(d[1], event["type"].as_str().unwrap(), "ENROLLD_EVENT_TYPE");
        assert_eq!(
            serde_json::from_str::<Value>(&d[2]).unwrap(),
            *event,
            "the event on stdin"
        );
        assert_eq!(d[3], "unset", "the command never sees the signing secret");
        let i = all.iter().position(|c| *c == d[0]).unwrap();
        let saved = if i == 0 { "none" } else { all[i - 1].as_str() };
        assert_eq!(
            d[4], saved,
            "while an event is delivered, the cursor file is just before it"
        );
    }
    assert_eq!(run.events, plain.events, "stdout: each delivered event once");
    assert_eq!(
        run.stderr.matches(&format!("event {s2} (enrolled)")).count(),
        2,
        "{}",
        run.stderr
    );
    assert_eq!(read(&file), all[4], "the cursor ends at the last event");

    // Nothing is delivered twice by the next run.
    let again = follow(&args, &env);
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    assert!(again.events.is_empty());
    assert_eq!(
        std::fs::read_to_string(dir.path("delivered")).unwrap().lines().count(),
        delivered.len()
    );
}

fn assert_exit(run: &Run, code: i32, needles: &[&str]) {
    assert_eq!(run.code, Some(code), "{}", run.stderr);
    assert!(run.events.is_empty());
    for n in needles {
        assert!(run.stderr.contains(n), "{n:?} not in {:?}", run.stderr);
    }
}

#[tokio::test]
async fn bad_future_and_expired_cursors_and_refused_tokens_exit_non_zero_naming_why() {
    let dir = TempDir::new("follow_bad");
    let server = sqlite_server(&dir);
    let url = format!("http://{}", server.addr);
    let mut conn = server.conn().await;
    put_course(&mut conn, "C1", 1).await;
    let with_secret = |extra: &[&str]| {
        let mut args = vec!["--once", "--url", &url, "--jwt-secret", SECRET];
        args.extend_from_slice(extra);
        follow(&args, &[])
    };

    assert_exit(&with_secret(&["--after", "not-a-cursor"]), 2, &["400", "not-a-cursor"]);
    let future = format!("c{:016x}", u64::MAX >> 1); // made from today's format
    assert_exit(
        &with_secret(&["--after", &future]),
        2,
        &["400", "ahead of the feed", &future],
    );
    let file = dir.path("garbled");
    std::fs::write(&file, "zz\n").unwrap();
    assert_exit(&with_secret(&["--cursor-file", &file]), 2, &["400", "zz"]);
    assert_eq!(read(&file), "zz", "a refused cursor is left as it was");
    std::fs::write(&file, "\n").unwrap();
    assert_exit(&with_secret(&["--cursor-file", &file]), 2, &["is empty"]);

    let student = token("s1");
    assert_exit(
        &follow(&["--once", "--url", &url, "--token", &student], &[]),
        2,
        &["403"],
    );
    assert_exit(
        &follow(&["--once", "--url", &url, "--jwt-secret", "wrong"], &[]),
        2,
        &["401"],
    );
    let nowhere = dir.path("nowhere.db");
    assert_exit(
        &follow(
            &["--once", "--url", &url, "--store", &format!("sqlite://{nowhere}")],
            &[],
        ),
        2,
        &["nowhere.db"],
    );
    assert_exit(
        &follow(&["--once", "--url", "https://127.0.0.1:1", "--jwt-secret", SECRET], &[]),
        2,
        &["--url"],
    );
    let closed = format!("http://127.0.0.1:{}", free_port());
    assert_exit(
        &follow(&["--once", "--url", &closed, "--jwt-secret", SECRET], &[]),
        1,
        &["trying again", "after 5 tries"],
    );

    // A second server keeps events about a second, with its secret beside its store.
    let store = format!("sqlite://{}", dir.path("short.db"));
    let short = Server::start_args(
        [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            &store,
            "--events-retention-days",
            "0.00001",
        ]
        .map(String::from)
        .to_vec(),
    );
    let short_url = format!("http://{}", short.addr);
    let cursor_file = dir.path("short-cursor");
    let base = [
        "--once",
        "--url",
        &short_url,
        "--store",
        &store,
        "--cursor-file",
        &cursor_file,
    ];
    let empty = follow(&base, &[]);
    assert_exit(&empty, 0, &[]);
    let start = read(&cursor_file);
    let mut conn = short.conn().await;
    let secret = read(&format!("{}.secret", dir.path("short.db")));
    let r = conn
        .request(
            "PUT",
            "/v1/admin/courses/S1",
            Some(&mint(&secret, "admin", Role::Admin)),
            Some(r#"{"title":"S","capacity":1}"#),
        )
        .await;
    assert_eq!(r.status, 201);
    let r = conn
        .request(
            "POST",
            "/v1/courses/S1/enrollment",
            Some(&mint(&secret, "s1", Role::Student)),
            None,
        )
        .await;
    assert_eq!(r.status, 201);
    // The trim runs every second; wait until it has passed the saved cursor.
    let deadline = Instant::now() + Duration::from_secs(20);
    let expired = loop {
        let run = follow(
            &["--once", "--url", &short_url, "--store", &store, "--after", &start],
            &[],
        );
        if run.code != Some(0) {
            break run;
        }
        assert!(Instant::now() < deadline, "the events were not trimmed");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_exit(&expired, 3, &["cursor_expired", &start, "remove the cursor file"]);
    assert_exit(&follow(&base, &[]), 3, &["cursor_expired", &start]);
    assert_eq!(read(&cursor_file), start, "an expired cursor is left as it was");
}

fn mint(secret: &str, sub: &str, role: Role) -> String {
    Auth::new(secret.as_bytes()).mint(&StudentId::parse(sub).unwrap(), role, 600)
}
