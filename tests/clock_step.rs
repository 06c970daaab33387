//! A registration rush while the server's realtime clock steps back and forward, on the
//! real binary with libfaketime preloaded (`scripts/ops-tools.sh` installs it; without it
//! the test fails naming it).
//!
//! The realtime clock is not monotonic: NTP, a VM resume or an operator can step it at
//! any instant, and enrolld decides from it whether a course is open (`opens_at`,
//! `closes_at`). Here many students enroll over keep-alive connections while the clock
//! steps back before `opens_at` and forward past `closes_at`, every couple of
//! milliseconds, so some steps land between two reads of the clock inside one decision.
//! Only the realtime clock steps: the monotonic clocks the timers use are left alone
//! (`FAKETIME_DONT_FAKE_MONOTONIC=1`). The server must stay up, sell no seat beyond
//! capacity, and never take back a seat it granted.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

/// Where the clock stands relative to the real one, in seconds (libfaketime's offset).
/// Courses open 120 s before the test starts and close 900 s after it.
const OPEN_SECS: i64 = 0;
const BEFORE_OPENS_SECS: i64 = -600;
const AFTER_CLOSES_SECS: i64 = 1_800;
const OPENS_AGO_SECS: i64 = 120;
const CLOSES_IN_SECS: i64 = 900;
const _: () = assert!(BEFORE_OPENS_SECS < -OPENS_AGO_SECS && AFTER_CLOSES_SECS > CLOSES_IN_SECS);
/// Tokens live an hour (common::token): still valid at the latest fake time.
const _: () = assert!(AFTER_CLOSES_SECS < 3_600);

/// The steps, in a cycle: back across `opens_at` (from open and from closed), forward
/// across `closes_at` (from open and from before opening), and back to open.
const STEP_CYCLE: [i64; 6] = [
    BEFORE_OPENS_SECS,
    OPEN_SECS,
    AFTER_CLOSES_SECS,
    BEFORE_OPENS_SECS,
    AFTER_CLOSES_SECS,
    OPEN_SECS,
];
const STEPS: usize = 1_500;
const STEP_GAP: Duration = Duration::from_millis(2);
/// Rush time at the true time before the first step, and after the last.
const CALM: Duration = Duration::from_millis(500);

const CONNECTIONS: usize = 16;
/// One small course that sells out, and large ones that keep seats for the whole rush.
const COURSES: [(&str, u32); 4] = [("CLK-SMALL", 25), ("CLK-A", 5_000), ("CLK-B", 5_000), ("CLK-C", 5_000)];

/// The preload library (package libfaketime), on any multiarch directory.
fn libfaketime() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib").ok().and_then(|dirs| {
        dirs.flatten()
            .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
            .find(|p| p.is_file())
    });
    found.expect("libfaketimeMT.so.1 is not installed: run scripts/ops-tools.sh (Debian package faketime)")
}

/// The server's clock offset, in the file libfaketime reads on every clock read
/// (`FAKETIME_TIMESTAMP_FILE` with `FAKETIME_NO_CACHE=1`). Replaced by a rename, so the
/// server never reads half a file.
struct ClockFile {
    path: String,
}

impl ClockFile {
    fn new(dir: &TempDir) -> ClockFile {
        let clock = ClockFile {
            path: dir.path("faketime.rc"),
        };
        clock.set(OPEN_SECS);
        clock
    }

    fn set(&self, offset_secs: i64) {
        let aside = format!("{}.new", self.path);
        std::fs::write(&aside, format!("{offset_secs:+}\n")).unwrap();
        std::fs::rename(&aside, &self.path).unwrap();
    }

    fn env(&self, lib: &str) -> Vec<(&'static str, String)> {
        vec![
            ("LD_PRELOAD", lib.to_owned()),
            ("FAKETIME_TIMESTAMP_FILE", self.path.clone()),
            ("FAKETIME_NO_CACHE", "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
        ]
    }
}

fn rfc3339(unix_secs: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(unix_secs).unwrap();
    t.format(&time::format_description::well_known::Rfc3339).unwrap()
}

async fn put_timed_course(conn: &mut Conn, id: &str, capacity: u32, opens_at: i64, closes_at: i64) {
    let body = serde_json::json!({
        "title": format!("Clock {id}"),
        "capacity": capacity,
        "opens_at": rfc3339(opens_at),
        "closes_at": rfc3339(closes_at),
    })
    .to_string();
    let path = format!("/v1/admin/courses/{id}");
    let r = conn.request("PUT", &path, Some(&admin_token()), Some(&body)).await;
    assert_eq!(r.status, 201, "put {id}: {}", String::from_utf8_lossy(&r.body));
}

/// Enrollment POSTs on one keep-alive connection until `stop`: fresh students, each
/// trying every course. Ends early (without failing) when the connection is cut.
async fn enroll_until(addr: std::net::SocketAddr, conn_no: usize, stop: Arc<AtomicBool>) -> Outcomes {
    let mut out = Vec::new();
    let mut conn = Conn::open(addr).await;
    for i in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let student = format!("clk-{conn_no}-{i}");
        let tok = token(&student);
        // A different course first on each connection, so every course sees a rush.
        for k in 0..COURSES.len() {
            let course = COURSES[(conn_no + i + k) % COURSES.len()].0;
            let req = format!(
                "POST /v1/courses/{course}/enrollment HTTP/1.1\r\nHost: t\r\n\
                 Authorization: Bearer {tok}\r\nContent-Length: 0\r\n\r\n"
            );
            if conn.send_raw(req.as_bytes()).await.is_err() {
                return out;
            }
            match conn.read_response().await {
                Some(r) => out.push((r.status, course.to_owned(), student.clone())),
                None => return out,
            }
        }
    }
    out
}

/// Steps the clock through `STEP_CYCLE` `STEPS` times, with `CALM` at the true time
/// before and after; then stops the rush.
fn step_the_clock(clock: &ClockFile, stop: &AtomicBool) {
    std::thread::sleep(CALM);
    for offset in STEP_CYCLE.iter().cycle().take(STEPS) {
        clock.set(*offset);
        std::thread::sleep(STEP_GAP);
    }
    clock.set(OPEN_SECS);
    std::thread::sleep(CALM);
    stop.store(true, Ordering::Relaxed);
}

/// Fails with the server's exit status and its panic message (or the end of its log)
/// when it is gone.
fn assert_alive(server: &mut Server, what: &str) {
    if let Some(status) = server.child.try_wait().unwrap() {
        // The log thread ends when the process does; give it a moment to hand over lines.
        std::thread::sleep(Duration::from_millis(200));
        let log = server.drain_log();
        let panic_at = log.iter().position(|l| l.contains("panicked"));
        let shown = match panic_at {
            Some(i) => &log[i..(i + 3).min(log.len())],
            None => &log[log.len().saturating_sub(20)..],
        };
        panic!("enrolld died {what} ({status}):\n{}", shown.join("\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_steps_during_a_rush_neither_kill_the_server_nor_oversell_nor_take_seats_back() {
    let lib = libfaketime();
    let dir = TempDir::new("clock_step");
    let clock = ClockFile::new(&dir);
    let env = clock.env(&lib.to_string_lossy());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let store = format!("sqlite://{}", dir.path("enrolld.db"));
    let mut server = Server::start_with_env(&["--store", &store, "--shards", "2", "--limits-enabled", "false"], &env);

    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let mut admin = server.conn().await;
    for (id, capacity) in COURSES {
        put_timed_course(&mut admin, id, capacity, now - OPENS_AGO_SECS, now + CLOSES_IN_SECS).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut rush = Vec::new();
    for conn_no in 0..CONNECTIONS {
        rush.push(tokio::spawn(enroll_until(server.addr, conn_no, stop.clone())));
    }
    let stepper = {
        let stop = stop.clone();
        let clock = ClockFile {
            path: clock.path.clone(),
        };
        std::thread::spawn(move || step_the_clock(&clock, &stop))
    };
    let mut outcomes = Outcomes::new();
    for task in rush {
        outcomes.extend(task.await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    stepper.join().unwrap();
    clock.set(OPEN_SECS);

    assert_alive(&mut server, "during the rush");
    let mut conn = server.conn().await;
    assert_eq!(conn.request("GET", "/healthz", None, None).await.status, 200);

    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for (status, _, _) in &outcomes {
        *statuses.entry(*status).or_default() += 1;
    }
    let granted = acknowledged(&outcomes);
    assert!(!granted.is_empty(), "no seat was taken: {statuses:?}");
    assert!(
        statuses.contains_key(&403),
        "no registration_closed: the clock steps never reached the server: {statuses:?}"
    );

    // Within capacity, and every granted seat still on its roster.
    for (id, capacity) in COURSES {
        let on_roster: BTreeSet<String> = roster(&mut conn, id).await.into_iter().collect();
        assert!(
            on_roster.len() <= capacity as usize,
            "{id}: {} students on a course of {capacity}",
            on_roster.len()
        );
        let lost: Vec<&String> = granted
            .get(id)
            .into_iter()
            .flatten()
            .filter(|s| !on_roster.contains(*s))
            .collect();
        assert!(lost.is_empty(), "{id}: granted seats missing from the roster: {lost:?}");
    }

    // Every student's own list still holds each seat granted to them.
    let mut by_student: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (course, students) in &granted {
        for s in students {
            by_student.entry(s).or_default().insert(course);
        }
    }
    for (student, courses) in by_student {
        let r = conn
            .request("GET", "/v1/me/enrollments", Some(&token(student)), None)
            .await;
        assert_eq!(r.status, 200, "{student}: {}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        let listed: BTreeSet<&str> = v["enrollments"]
            .as_array()
            .expect("enrollments")
            .iter()
            .filter(|e| e["status"] == "enrolled")
            .filter_map(|e| e["course_id"].as_str())
            .collect();
        let missing: Vec<&&str> = courses.iter().filter(|c| !listed.contains(**c)).collect();
        assert!(missing.is_empty(), "{student}: granted {missing:?}, listed {v}");
    }
    assert_alive(&mut server, "after the checks");
    eprintln!(
        "clock_step: {} answers {statuses:?}, {} seats granted",
        outcomes.len(),
        granted.values().map(BTreeSet::len).sum::<usize>()
    );
}
