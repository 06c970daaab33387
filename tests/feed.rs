//! The change feed (`GET /v1/admin/events`) against the real server, on SQLite and on
//! MariaDB: while students enroll, drop and enroll again over many connections, consumers
//! page the feed with small pages and long polls, keeping `next`. Every change a client was
//! told committed (a 201 POST, a 200 DELETE that dropped) appears exactly once, nothing
//! else appears (but a change whose answer was cut off by a kill), each (course, student)
//! in the order its changes were answered, and replaying a course's events from an empty
//! roster never enrolls a student twice, drops one who is absent, or exceeds the capacity,
//! and ends at the course's roster. A consumer resumes from its saved cursor across
//! `kill -9` of enrolld and of itself; four committers racing each other make no reader
//! skip an event (the auto-increment trap); a long poll wakes on a commit; retention trims
//! and an expired cursor answers 410; `--events-enabled false` writes no feed.
//!
//! Cursors are treated as opaque: the tests compare them only for equality, and order
//! them by where they stand in a full read of the feed from the start.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use common::{StoreKind as Kind, TestStore as Db};

/// enrolld on `db` with two shards and no rate limits, plus `extra`.
fn start(db: &Db, extra: &[&str]) -> Server {
    let url = db.url();
    let mut args = vec!["--store", &url, "--shards", "2", "--limits-enabled", "false"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Creates courses `{prefix}-{i}` with these capacities; their ids and capacities.
async fn make_courses(server: &Server, prefix: &str, capacities: &[u32]) -> BTreeMap<String, u32> {
    let mut admin = server.conn().await;
    let mut courses = BTreeMap::new();
    for (i, cap) in capacities.iter().enumerate() {
        let id = format!("{prefix}-{i:02}");
        put_course(&mut admin, &id, *cap).await;
        courses.insert(id, *cap);
    }
    courses
}

// ---- the feed, as a consumer reads it ----

/// One event of the feed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Event {
    cursor: String,
    kind: String,
    course: String,
    student: Option<String>,
}

impl Event {
    fn of(v: &serde_json::Value) -> Event {
        let text = |k: &str| {
            v[k].as_str()
                .unwrap_or_else(|| panic!("event without a string {k:?}: {v}"))
                .to_string()
        };
        let at = text("at");
        assert!(
            time::OffsetDateTime::parse(&at, &time::format_description::well_known::Rfc3339).is_ok(),
            "`at` is not RFC 3339: {v}"
        );
        let kind = text("type");
        let student = v["student_id"].as_str().map(str::to_string);
        match kind.as_str() {
            "enrolled" | "dropped" => assert!(student.is_some(), "a seat event names its student: {v}"),
            "course_changed" => {}
            other => panic!("no change of that kind was made: {other:?} in {v}"),
        }
        Event {
            cursor: text("cursor"),
            kind,
            course: text("course_id"),
            student,
        }
    }
}

fn events_path(after: Option<&str>, limit: u32, wait_ms: u64) -> String {
    let mut path = format!("/v1/admin/events?limit={limit}&wait_ms={wait_ms}");
    if let Some(a) = after {
        path.push_str("&after=");
        path.push_str(a);
    }
    path
}

/// One page; None when the connection was cut (the server died).
async fn try_page(conn: &mut Conn, after: Option<&str>, limit: u32, wait_ms: u64) -> Option<(Vec<Event>, String)> {
    let path = events_path(after, limit, wait_ms);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\n\r\n",
        admin_token()
    );
    conn.send_raw(req.as_bytes()).await.ok()?;
    let r = conn.read_response().await?;
    Some(page_of(&r, limit))
}

fn page_of(r: &Resp, limit: u32) -> (Vec<Event>, String) {
    assert_eq!(r.status, 200, "feed read: {}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    let events: Vec<Event> = j["events"].as_array().expect("events").iter().map(Event::of).collect();
    assert!(
        events.len() <= limit as usize,
        "{} events on a page of {limit}",
        events.len()
    );
    let next = j["next"].as_str().expect("next is a cursor").to_string();
    (events, next)
}

/// The feed from `after` (from the oldest kept when None) up to its head.
async fn read_all(conn: &mut Conn, mut after: Option<String>) -> Vec<Event> {
    let mut all = Vec::new();
    loop {
        let (events, next) = try_page(conn, after.as_deref(), 1_000, 0)
            .await
            .expect("feed read answered");
        if events.is_empty() {
            return all;
        }
        all.extend(events);
        after = Some(next);
    }
}

/// What a consumer has processed, and the cursor it stored with it.
#[derive(Clone, Debug, Default)]
struct Saved {
    events: Vec<Event>,
    next: Option<String>,
    pages: usize,
    /// Events read before it was told the writers had finished.
    read_while_writing: usize,
}

/// A consumer: pages the feed from `saved.next` with small pages and long polls, and
/// stores each page with its `next` in one step (as a consumer that keeps its offset with
/// what it processed), so killing it at any instant loses nothing it stored. It returns
/// when its connection is cut (the server died), or when a page asked for after `done` was
/// set comes back empty (every acknowledged change committed before `done` was set).
async fn consume(addr: SocketAddr, saved: Arc<Mutex<Saved>>, limit: u32, wait_ms: u64, done: Arc<AtomicBool>) {
    let mut conn = Conn::open(addr).await;
    loop {
        let finishing = done.load(Ordering::SeqCst);
        let after = saved.lock().unwrap().next.clone();
        let wait = if finishing { 0 } else { wait_ms };
        let Some((events, next)) = try_page(&mut conn, after.as_deref(), limit, wait).await else {
            return;
        };
        let empty = events.is_empty();
        let mut s = saved.lock().unwrap();
        let seen: HashSet<&str> = s.events.iter().map(|e| e.cursor.as_str()).collect();
        for e in &events {
            assert!(
                !seen.contains(e.cursor.as_str()),
                "event seen twice across pages: {e:?}"
            );
        }
        if !finishing {
            s.read_while_writing += events.len();
        }
        s.events.extend(events);
        s.next = Some(next);
        s.pages += 1;
        drop(s);
        if empty && finishing {
            return;
        }
    }
}

// ---- the writers ----

/// One enrollment call and its answer (None: the connection was cut before it).
#[derive(Clone, Debug)]
struct Call {
    drop: bool,
    course: String,
    student: String,
    status: Option<u16>,
}

impl Call {
    /// The event this call's change writes.
    fn kind(&self) -> &'static str {
        if self.drop {
            "dropped"
        } else {
            "enrolled"
        }
    }
    /// The client was told the change committed.
    fn acknowledged(&self) -> bool {
        matches!((self.drop, self.status), (false, Some(201)) | (true, Some(200)))
    }
}

/// The shape of a churn: connections, students each connection serves one after another,
/// calls per student.
#[derive(Clone, Copy)]
struct Churn {
    connections: usize,
    students_per_connection: usize,
    calls_per_student: usize,
}

/// Students enroll in random courses, drop most of the seats they got (and often enroll
/// again at once in the course just dropped), now and then drop a seat they do not hold
/// or repeat an enrollment they hold, and at the end give most of their seats back. Each student's calls go one after another on one
/// keep-alive connection, so each (course, student)'s changes are answered in order. A
/// connection stops at its first call without an answer (a kill), so only a connection's
/// last call can be unanswered. `acked` counts the changes answered as committed.
async fn churn(
    addr: SocketAddr,
    courses: &BTreeMap<String, u32>,
    tag: &str,
    plan: Churn,
    acked: Arc<AtomicUsize>,
) -> Vec<Vec<Call>> {
    let courses: Arc<Vec<String>> = Arc::new(courses.keys().cloned().collect());
    let mut tasks = Vec::new();
    for conn_no in 0..plan.connections {
        let courses = courses.clone();
        let acked = acked.clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            let mut rng = rand::rngs::StdRng::from_entropy();
            let mut calls = Vec::new();
            for i in 0..plan.students_per_connection {
                let student = format!("{tag}{conn_no}-{i}");
                let tok = token(&student);
                let mut held: BTreeSet<String> = BTreeSet::new();
                let mut just_dropped: Option<String> = None;
                let mut leaving: Vec<String> = Vec::new();
                for n in 0.. {
                    let (course, drop) = if n < plan.calls_per_student {
                        let course = match just_dropped.take() {
                            Some(c) if rng.gen_bool(0.4) => c,
                            _ => courses.choose(&mut rng).unwrap().clone(),
                        };
                        let drop = if held.contains(&course) {
                            rng.gen_bool(0.7)
                        } else {
                            rng.gen_bool(0.05)
                        };
                        (course, drop)
                    } else {
                        // Done: most students give their seats back, so the seats go round.
                        if n == plan.calls_per_student {
                            leaving = held.iter().filter(|_| rng.gen_bool(0.8)).cloned().collect();
                        }
                        match leaving.pop() {
                            Some(course) => (course, true),
                            None => break,
                        }
                    };
                    let method = if drop { "DELETE" } else { "POST" };
                    let req = format!(
                        "{method} /v1/courses/{course}/enrollment HTTP/1.1\r\nHost: t\r\n\
                         Authorization: Bearer {tok}\r\nContent-Length: 0\r\n\r\n"
                    );
                    let answer = match conn.send_raw(req.as_bytes()).await {
                        Ok(()) => conn.read_response().await,
                        Err(_) => None,
                    };
                    let call = Call {
                        drop,
                        course: course.clone(),
                        student: student.clone(),
                        status: answer.as_ref().map(|r| r.status),
                    };
                    if call.acknowledged() {
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    calls.push(call);
                    let Some(r) = answer else { return calls };
                    match (drop, r.status) {
                        (false, 201 | 200) => {
                            held.insert(course);
                        }
                        (true, 200) => {
                            assert_eq!(r.json()["status"], "dropped", "{student} dropping {course}");
                            held.remove(&course);
                            just_dropped = Some(course);
                        }
                        (true, 404) => assert!(!held.contains(&course), "{student} lost {course}"),
                        (_, 409 | 503) => {}
                        (_, other) => panic!(
                            "{method} {course} by {student}: {other} {}",
                            String::from_utf8_lossy(&r.body)
                        ),
                    }
                }
            }
            calls
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.expect("churn connection"));
    }
    all
}

// ---- what the feed must show ----

/// Checks the whole feed (`events`, in feed order) against the calls that made it:
/// every cursor once; per (course, student), the seat events are exactly the changes
/// answered as committed, in the order they were answered (plus, at most, the change of a
/// connection's last call when its answer was cut off); per course, replaying the events
/// from an empty roster never enrolls a student already enrolled, never drops one who is
/// absent and never holds more than the capacity. Returns each course's replayed roster.
fn check_feed(
    events: &[Event],
    calls: &[Vec<Call>],
    courses: &BTreeMap<String, u32>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut cursors = HashSet::new();
    for e in events {
        assert!(cursors.insert(e.cursor.as_str()), "cursor twice in the feed: {e:?}");
    }

    type Key = (String, String);
    let mut answered: BTreeMap<Key, Vec<&str>> = BTreeMap::new();
    let mut cut: BTreeMap<Key, &str> = BTreeMap::new();
    for conn in calls {
        for (i, call) in conn.iter().enumerate() {
            let key = (call.course.clone(), call.student.clone());
            if call.status.is_none() {
                assert_eq!(i + 1, conn.len(), "a connection goes on after a call without an answer");
                cut.insert(key, call.kind());
            } else if call.acknowledged() {
                answered.entry(key).or_default().push(call.kind());
            }
        }
    }
    let mut in_feed: BTreeMap<Key, Vec<&str>> = BTreeMap::new();
    for e in events.iter().filter(|e| e.kind != "course_changed") {
        let key = (e.course.clone(), e.student.clone().expect("checked by Event::of"));
        in_feed.entry(key).or_default().push(&e.kind);
    }
    let keys: BTreeSet<&Key> = answered.keys().chain(in_feed.keys()).collect();
    for key in keys {
        let want = answered.get(key).cloned().unwrap_or_default();
        let got = in_feed.get(key).cloned().unwrap_or_default();
        let with_cut = cut.get(key).map(|k| {
            let mut w = want.clone();
            w.push(k);
            w
        });
        assert!(
            got == want || Some(&got) == with_cut.as_ref(),
            "{key:?}: the feed has {got:?}; the clients were answered {want:?} (cut off: {:?})",
            cut.get(key)
        );
    }

    let mut rosters: BTreeMap<String, BTreeSet<String>> =
        courses.keys().map(|c| (c.clone(), BTreeSet::new())).collect();
    for e in events.iter().filter(|e| e.kind != "course_changed") {
        let student = e.student.clone().expect("checked by Event::of");
        let roster = rosters
            .get_mut(&e.course)
            .unwrap_or_else(|| panic!("event of an unknown course: {e:?}"));
        if e.kind == "enrolled" {
            assert!(roster.insert(student), "enrolled while enrolled: {e:?}");
            let cap = courses[&e.course] as usize;
            assert!(
                roster.len() <= cap,
                "replay holds {} seats of {cap} at {e:?}",
                roster.len()
            );
        } else {
            assert!(roster.remove(&student), "dropped while absent: {e:?}");
        }
    }
    rosters
}

/// The replayed rosters equal the server's.
async fn rosters_match(server: &Server, replayed: &BTreeMap<String, BTreeSet<String>>) {
    let mut admin = server.conn().await;
    for (course, students) in replayed {
        let api: BTreeSet<String> = roster(&mut admin, course).await.into_iter().collect();
        assert_eq!(&api, students, "roster of {course} equals the replay of its events");
    }
}

/// One `course_changed` per course created.
fn one_course_changed_each(events: &[Event], courses: &BTreeMap<String, u32>) {
    let mut changed: BTreeMap<&str, usize> = BTreeMap::new();
    for e in events.iter().filter(|e| e.kind == "course_changed") {
        assert!(e.student.is_none(), "{e:?}");
        *changed.entry(&e.course).or_default() += 1;
    }
    let want: BTreeMap<&str, usize> = courses.keys().map(|c| (c.as_str(), 1)).collect();
    assert_eq!(changed, want, "one course_changed per PUT");
}

fn acknowledged_total(calls: &[Vec<Call>]) -> usize {
    calls.iter().flatten().filter(|c| c.acknowledged()).count()
}

async fn wait_for(what: &str, bound: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !cond() {
        assert!(Instant::now() < deadline, "waited {bound:?} for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- 1. a rush with a consumer following it ----

async fn rush_with_a_consumer(kind: Kind) {
    let db = Db::new(kind);
    let server = start(&db, &[]);
    let courses = make_courses(&server, "RU", &[2, 3, 3, 4, 5, 2, 6, 3, 4, 8]).await;
    let saved = Arc::new(Mutex::new(Saved::default()));
    let done = Arc::new(AtomicBool::new(false));
    let consumer = tokio::spawn(consume(server.addr, saved.clone(), 7, 1_000, done.clone()));
    let plan = Churn {
        connections: 32,
        students_per_connection: 10,
        calls_per_student: 12,
    };
    let calls = churn(server.addr, &courses, "r", plan, Arc::default()).await;
    done.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(60), consumer)
        .await
        .expect("the consumer catches up")
        .expect("consumer");
    assert!(
        calls.iter().flatten().all(|c| c.status.is_some()),
        "every call was answered"
    );
    let saved = saved.lock().unwrap().clone();
    let mut admin = server.conn().await;
    let full = read_all(&mut admin, None).await;
    assert_eq!(
        saved.events, full,
        "the consumer's pages, one after another, are the feed read from the start"
    );
    let replayed = check_feed(&full, &calls, &courses);
    rosters_match(&server, &replayed).await;
    one_course_changed_each(&full, &courses);
    let acked = acknowledged_total(&calls);
    assert!(acked >= 100, "the churn changed seats ({acked} acknowledged)");
    assert!(saved.read_while_writing > 0, "the consumer read while the rush ran");
    eprintln!(
        "{kind:?}: {} calls, {acked} acknowledged changes, {} events, {} pages ({} events read during the rush)",
        calls.iter().map(Vec::len).sum::<usize>(),
        full.len(),
        saved.pages,
        saved.read_while_writing
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rush_with_a_consumer_on_sqlite() {
    rush_with_a_consumer(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rush_with_a_consumer_on_mariadb() {
    rush_with_a_consumer(Kind::Mariadb).await;
}

// ---- 2. resuming across kill -9 of the consumer and of enrolld ----

async fn resume_across_kills(kind: Kind) {
    let db = Db::new(kind);
    let mut server = start(&db, &[]);
    let courses = make_courses(&server, "KI", &[20, 30, 10, 25, 15, 40, 5, 35]).await;
    let acked = Arc::new(AtomicUsize::new(0));
    let plan = Churn {
        connections: 32,
        students_per_connection: 40,
        calls_per_student: 15,
    };
    let planned = plan.connections * plan.students_per_connection * plan.calls_per_student;
    let rushing = {
        let (addr, courses, acked) = (server.addr, courses.clone(), acked.clone());
        tokio::spawn(async move { churn(addr, &courses, "k", plan, acked).await })
    };
    let saved = Arc::new(Mutex::new(Saved::default()));
    let done = Arc::new(AtomicBool::new(false));
    let stored = |saved: &Arc<Mutex<Saved>>| saved.lock().unwrap().events.len();

    // The first consumer is killed (its task dropped at whatever await it is in) once it
    // has stored some events; the second resumes from the cursor it stored.
    let first = tokio::spawn(consume(server.addr, saved.clone(), 5, 2_000, done.clone()));
    wait_for(
        "the first consumer to store 100 events",
        Duration::from_secs(60),
        || stored(&saved) >= 100,
    )
    .await;
    first.abort();
    assert!(
        first.await.unwrap_err().is_cancelled(),
        "the first consumer was killed mid-run"
    );
    let at_consumer_kill = stored(&saved);
    let second = tokio::spawn(consume(server.addr, saved.clone(), 5, 2_000, done.clone()));

    // enrolld is killed once the second consumer has made progress, mid-rush.
    let target = acked.load(Ordering::SeqCst) + 800;
    wait_for("the rush to go on", Duration::from_secs(60), || {
        assert!(!rushing.is_finished(), "the rush ended before the kill");
        acked.load(Ordering::SeqCst) >= target && stored(&saved) >= at_consumer_kill + 100
    })
    .await;
    server.kill9();
    let mut calls = rushing.await.expect("rush");
    let made: usize = calls.iter().map(Vec::len).sum();
    let cut = calls
        .iter()
        .filter(|c| c.last().is_some_and(|l| l.status.is_none()))
        .count();
    assert!(
        cut > 0,
        "the kill landed mid-rush ({made} of {planned} calls, {cut} cut)"
    );
    tokio::time::timeout(Duration::from_secs(40), second)
        .await
        .expect("the second consumer sees its connection cut")
        .expect("second consumer");
    let at_server_kill = stored(&saved);

    // Restarted: more changes, and a third consumer from the stored cursor.
    let server = server.restart();
    let after_restart = Churn {
        connections: 4,
        students_per_connection: 5,
        calls_per_student: 6,
    };
    let more = churn(server.addr, &courses, "after", after_restart, Arc::default()).await;
    assert!(
        more.iter().flatten().all(|c| c.status.is_some()),
        "answered after the restart"
    );
    assert!(acknowledged_total(&more) > 0, "changes after the restart");
    calls.extend(more);
    done.store(true, Ordering::SeqCst);
    tokio::time::timeout(
        Duration::from_secs(60),
        consume(server.addr, saved.clone(), 5, 0, done.clone()),
    )
    .await
    .expect("the third consumer catches up");

    let saved = saved.lock().unwrap().clone();
    let mut admin = server.conn().await;
    let full = read_all(&mut admin, None).await;
    assert_eq!(
        saved.events, full,
        "three consumers' stored pages, resumed across both kills, are the feed read from the start"
    );
    let replayed = check_feed(&full, &calls, &courses);
    rosters_match(&server, &replayed).await;
    one_course_changed_each(&full, &courses);
    eprintln!(
        "{kind:?}: consumer killed at {at_consumer_kill} events, enrolld killed at {at_server_kill} \
         ({made} of {planned} calls made, {cut} cut off); {} events in all, {} acknowledged changes",
        full.len(),
        acknowledged_total(&calls)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_across_kills_on_sqlite() {
    resume_across_kills(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_across_kills_on_mariadb() {
    resume_across_kills(Kind::Mariadb).await;
}

// ---- 3. many committers: a reader at the head skips nothing ----

async fn concurrent_committers_skip_nothing(kind: Kind) {
    let db = Db::new(kind);
    let server = start(&db, &["--commits-in-flight-max", "4"]);
    let capacities: Vec<u32> = (0..40).map(|i| 5 + i % 16).collect();
    let courses = make_courses(&server, "CC", &capacities).await;
    let done = Arc::new(AtomicBool::new(false));
    // Readers that follow the head closely, where a late commit would be skipped: pages of
    // 3 and of 1 returning as soon as any batch commits, and pages of 20 read without pause.
    let readers: Vec<(Arc<Mutex<Saved>>, tokio::task::JoinHandle<()>)> = [(3, 1_000), (1, 1_000), (20, 0)]
        .into_iter()
        .map(|(limit, wait_ms)| {
            let saved = Arc::new(Mutex::new(Saved::default()));
            let task = tokio::spawn(consume(server.addr, saved.clone(), limit, wait_ms, done.clone()));
            (saved, task)
        })
        .collect();
    let plan = Churn {
        connections: 32,
        students_per_connection: 24,
        calls_per_student: 15,
    };
    let calls = churn(server.addr, &courses, "c", plan, Arc::default()).await;
    done.store(true, Ordering::SeqCst);
    let mut admin = server.conn().await;
    let mut pages = Vec::new();
    let mut full = None;
    for (saved, task) in readers {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the reader catches up")
            .expect("reader");
        let saved = saved.lock().unwrap().clone();
        if full.is_none() {
            full = Some(read_all(&mut admin, None).await);
        }
        let full = full.as_ref().expect("read");
        let read: HashSet<&str> = saved.events.iter().map(|e| e.cursor.as_str()).collect();
        let missing: Vec<&Event> = full.iter().filter(|e| !read.contains(e.cursor.as_str())).collect();
        assert!(
            missing.is_empty(),
            "a reader following the head skipped {} events, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        assert_eq!(
            &saved.events, full,
            "the reader's pages are the feed read from the start"
        );
        assert!(saved.read_while_writing > 0, "the reader read while the rush ran");
        pages.push(saved.pages);
    }
    let full = full.expect("read");
    let replayed = check_feed(&full, &calls, &courses);
    rosters_match(&server, &replayed).await;
    eprintln!(
        "{kind:?}, 4 committers: {} events, {} acknowledged changes, readers' pages {pages:?}",
        full.len(),
        acknowledged_total(&calls)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_committers_skip_nothing_on_mariadb() {
    concurrent_committers_skip_nothing(Kind::Mariadb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_committers_skip_nothing_on_sqlite() {
    concurrent_committers_skip_nothing(Kind::Sqlite).await;
}

// ---- 4. long poll, and what the route refuses ----

async fn long_poll_wakes_on_a_commit(kind: Kind) {
    let db = Db::new(kind);
    let server = start(&db, &[]);
    let mut admin = server.conn().await;
    put_course(&mut admin, "LP-1", 5).await;
    let (events, head) = try_page(&mut admin, None, 1_000, 0).await.expect("answered");
    assert_eq!(events.len(), 1, "one course_changed: {events:?}");

    let addr = server.addr;
    let path = events_path(Some(&head), 100, 20_000);
    let waiting = tokio::spawn(async move {
        let mut c = Conn::open(addr).await;
        let asked = Instant::now();
        let r = c.request("GET", &path, Some(&admin_token()), None).await;
        (r, asked.elapsed())
    });
    // The poll waits while nothing commits (it would be a bug to come back empty here)...
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "the long poll returned before anything committed"
    );
    // ...and returns with the event once one does.
    let r = admin
        .request("POST", "/v1/courses/LP-1/enrollment", Some(&token("waiter")), None)
        .await;
    assert_eq!(r.status, 201);
    let (r, waited) = tokio::time::timeout(Duration::from_secs(25), waiting)
        .await
        .expect("the long poll answers")
        .expect("long poll");
    let (events, _) = page_of(&r, 100);
    assert_eq!(
        events
            .iter()
            .map(|e| (e.kind.as_str(), e.course.as_str(), e.student.as_deref()))
            .collect::<Vec<_>>(),
        vec![("enrolled", "LP-1", Some("waiter"))],
        "the long poll returned with the new event"
    );
    assert!(
        waited < Duration::from_secs(20),
        "it returned before the wait ran out ({waited:?})"
    );

    refusals(&mut admin, &head).await;
}

/// Admin only; a cursor the server did not make, and bad bounds, are 400.
async fn refusals(c: &mut Conn, cursor: &str) {
    let path = events_path(None, 10, 0);
    let r = c.request("GET", &path, Some(&token("student")), None).await;
    assert_eq!(r.status, 403, "a student reads no feed");
    assert_eq!(r.json()["error"], "forbidden");
    let r = c.request("GET", &path, None, None).await;
    assert_eq!(r.status, 401);
    let r = c.request("POST", &path, Some(&admin_token()), None).await;
    assert_eq!(r.status, 405);

    let truncated = &cursor[..cursor.len() - 1];
    let longer = format!("{cursor}0");
    let bad_queries = [
        "after=garbage".to_string(),
        "after=".to_string(),
        "after=%00%01".to_string(),
        "after=-1".to_string(),
        format!("after={truncated}"),
        format!("after={longer}"),
        "limit=0".into(),
        "limit=1001".into(),
        "limit=ten".into(),
        "wait_ms=30001".into(),
        "wait_ms=-5".into(),
        "cursor=x".into(),
    ];
    for q in &bad_queries {
        let r = c
            .request("GET", &format!("/v1/admin/events?{q}"), Some(&admin_token()), None)
            .await;
        assert_eq!(r.status, 400, "{q}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["error"], "bad_request", "{q}");
    }
    // The cursor itself still reads.
    let r = c
        .request(
            "GET",
            &format!("/v1/admin/events?after={cursor}"),
            Some(&admin_token()),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_wakes_on_a_commit_on_sqlite() {
    long_poll_wakes_on_a_commit(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_wakes_on_a_commit_on_mariadb() {
    long_poll_wakes_on_a_commit(Kind::Mariadb).await;
}

// ---- 5. retention and 410 ----

fn seat_events(events: &[Event]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| (e.kind.clone(), e.student.clone().unwrap_or_default()))
        .collect()
}

async fn retention_trims_and_expires_cursors(kind: Kind) {
    let db = Db::new(kind);
    // 0.00002 days: about 1.7 s.
    let server = start(&db, &["--events-retention-days", "0.00002"]);
    let mut c = server.conn().await;
    put_course(&mut c, "RT-1", 100).await;
    let old = ["old1", "old2", "old3", "old4"];
    enroll_all(&mut c, "RT-1", &old).await;
    let written = read_all(&mut c, None).await;
    assert_eq!(written.len(), 1 + old.len(), "{written:?}");
    let first = written[0].cursor.clone();
    let old_cursors: HashSet<String> = written.iter().map(|e| e.cursor.clone()).collect();

    // Polled with a bound: the trim runs every second and keeps about 1.7 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let kept = read_all(&mut c, None).await;
        if !kept.iter().any(|e| old_cursors.contains(&e.cursor)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "events older than the retention still kept: {kept:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = c
        .request(
            "GET",
            &format!("/v1/admin/events?after={first}"),
            Some(&admin_token()),
            None,
        )
        .await;
    assert_eq!(r.status, 410, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"], "cursor_expired");
    assert!(r.json()["message"].is_string());

    // New events; a read without `after` starts at the oldest kept: the first new one
    // (when the read came within the retention of writing them, none can be trimmed yet).
    let writing = Instant::now();
    let new = ["new1", "new2", "new3"];
    enroll_all(&mut c, "RT-1", &new).await;
    let (events, next) = try_page(&mut c, None, 1_000, 0).await.expect("answered");
    let want: Vec<(String, String)> = new.iter().map(|s| ("enrolled".into(), s.to_string())).collect();
    if writing.elapsed() < Duration::from_millis(1_000) {
        assert_eq!(seat_events(&events), want, "from the oldest kept: the new events");
    } else {
        assert!(
            want.ends_with(&seat_events(&events)),
            "from the oldest kept: {events:?}"
        );
    }
    assert!(events.iter().all(|e| !old_cursors.contains(&e.cursor)));
    let (after_next, _) = try_page(&mut c, Some(&next), 10, 0).await.expect("answered");
    assert!(after_next.is_empty(), "a kept cursor reads on: {after_next:?}");
    let trimmed = metric(&mut c, "enrolld_events_trimmed_total").await.unwrap_or(0.0);
    assert!(
        trimmed >= written.len() as f64,
        "enrolld_events_trimmed_total is {trimmed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_trims_and_expires_cursors_on_sqlite() {
    retention_trims_and_expires_cursors(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_trims_and_expires_cursors_on_mariadb() {
    retention_trims_and_expires_cursors(Kind::Mariadb).await;
}

// ---- 5b. a cursor the trim passes: 410, never a page with a gap ----

/// Readers that stay as far behind as the retention lets them: each re-reads one event
/// after the oldest kept (`after=X&limit=1`) until the trim passes X, then starts again
/// from the oldest kept. Every 200 for X must start with the same event (X's successor):
/// a read that checked X against what was trimmed, and then read the events after a trim
/// removed more, would hand out a later event and silently skip the ones between.
async fn expiring_cursor_answers_410_never_a_gap(kind: Kind) {
    const READERS: usize = 3;
    let db = Db::new(kind);
    // The shortest retention, 1e-5 days (about 0.9 s); the trim runs every second.
    let server = start(&db, &["--events-retention-days", "0.00001"]);
    let mut c = server.conn().await;
    put_course(&mut c, "EX-1", 100_000).await;
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (addr, done) = (server.addr, done.clone());
        tokio::spawn(async move {
            let mut c = Conn::open(addr).await;
            let mut n = 0;
            while !done.load(Ordering::SeqCst) {
                // A 503 (a slow commit on a busy machine opens the store breaker) is
                // retried, as the contract asks of a client; the retry answers 201 or 200.
                let path = "/v1/courses/EX-1/enrollment";
                match c
                    .request("POST", path, Some(&token(&format!("w{n}"))), None)
                    .await
                    .status
                {
                    200 | 201 => n += 1,
                    503 => tokio::time::sleep(Duration::from_millis(50)).await,
                    s => panic!("w{n} in EX-1: {s}"),
                }
            }
            n
        })
    };
    // Some events old enough to trim before the readers start.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let (addr, done) = (server.addr, done.clone());
            tokio::spawn(async move {
                let mut c = Conn::open(addr).await;
                let (mut expired, mut reads) = (0, 0);
                while !done.load(Ordering::SeqCst) {
                    let (oldest, _) = try_page(&mut c, None, 1, 0).await.expect("answered");
                    // Everything trimmed (the writer held up longer than the retention).
                    let Some(oldest) = oldest.first() else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let x = oldest.cursor.clone();
                    let mut successor: Option<Event> = None;
                    while !done.load(Ordering::SeqCst) {
                        let r = c
                            .request("GET", &events_path(Some(&x), 1, 0), Some(&admin_token()), None)
                            .await;
                        reads += 1;
                        if r.status == 410 {
                            assert_eq!(r.json()["error"], "cursor_expired");
                            expired += 1;
                            break;
                        }
                        let (events, _) = page_of(&r, 1);
                        let Some(first) = events.into_iter().next() else {
                            // Nothing after X yet (X is the head while the writer is held
                            // up). Once X had a successor, it must stay until X expires.
                            assert!(
                                successor.is_none(),
                                "after={x} answered an empty page once it had a successor: \
                                 events were trimmed without a 410"
                            );
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        match &successor {
                            None => successor = Some(first),
                            Some(s) => assert_eq!(
                                s, &first,
                                "after={x} answered a later event once the trim had passed it: \
                                 the events between were skipped without a 410"
                            ),
                        }
                    }
                }
                (expired, reads)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(8)).await;
    done.store(true, Ordering::SeqCst);
    let written = writer.await.expect("writer");
    let mut expired = 0;
    let mut reads = 0;
    for r in readers {
        let (e, n) = r.await.expect("reader");
        expired += e;
        reads += n;
    }
    eprintln!("{kind:?}: {written} events written, {reads} reads at the trim's edge, {expired} answered 410");
    assert!(
        expired >= READERS * 3,
        "the trim passed the readers' cursors ({expired} times)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_cursor_answers_410_never_a_gap_on_sqlite() {
    expiring_cursor_answers_410_never_a_gap(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_cursor_answers_410_never_a_gap_on_mariadb() {
    expiring_cursor_answers_410_never_a_gap(Kind::Mariadb).await;
}

// ---- 6. the feed switched off ----

async fn disabled_feed_stays_empty(kind: Kind) {
    let db = Db::new(kind);
    let server = start(&db, &["--events-enabled", "false"]);
    let mut c = server.conn().await;
    put_course(&mut c, "OFF-1", 10).await;
    let students = ["a", "b", "c", "d", "e"];
    enroll_all(&mut c, "OFF-1", &students).await;
    let r = c
        .request("DELETE", "/v1/courses/OFF-1/enrollment", Some(&token("a")), None)
        .await;
    assert_eq!((r.status, r.json()["status"].as_str()), (200, Some("dropped")));
    assert_eq!(roster(&mut c, "OFF-1").await, vec!["b", "c", "d", "e"]);
    let (events, next) = try_page(&mut c, None, 1_000, 0).await.expect("answered");
    assert!(events.is_empty(), "the feed is off: {events:?}");
    let (events, _) = try_page(&mut c, Some(&next), 1_000, 200).await.expect("answered");
    assert!(events.is_empty(), "the feed is off: {events:?}");
    if let Db::Mariadb(db) = &db {
        assert_eq!(
            db.query("SELECT COUNT(*) FROM event_batches")[0][0],
            "0",
            "no event rows"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_feed_stays_empty_on_sqlite() {
    disabled_feed_stays_empty(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_feed_stays_empty_on_mariadb() {
    disabled_feed_stays_empty(Kind::Mariadb).await;
}

// ---- 7. an upgrade keeps the feed ----

/// A store written before the feed was packed into one row per transaction (every
/// migration before `event_batches`, run by sqlx from a copy of the migrations, with
/// events one row each) keeps every event, its number and its cursor when a new enrolld
/// migrates it; the feed goes on after them, and a cursor saved before the upgrade reads
/// on exactly.
async fn upgrade_keeps_the_feed(kind: Kind) {
    let db = Db::new(kind);
    let (dir, url) = match &db {
        Db::Sqlite(_) => ("migrations/sqlite", format!("{}?mode=rwc", db.url())),
        Db::Mariadb(_) => ("migrations/mysql", db.url()),
    };
    let old = TempDir::new("old-migrations");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("migrations")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let packed = names
        .iter()
        .position(|n| n.contains("event_batches"))
        .expect("the migration that packs the feed");
    for name in &names[..packed] {
        std::fs::copy(format!("{dir}/{name}"), old.path(name)).expect("copy");
    }
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&url).await.expect("connect");
    sqlx::migrate::Migrator::new(old.0.clone())
        .await
        .expect("old migrations")
        .run(&pool)
        .await
        .expect("the schema as it was");
    // Written now: older ones would be trimmed by the retention as soon as enrolld starts.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    for sql in [
        "UPDATE feed SET seq = 3 WHERE id = 1".to_string(),
        format!(
            "INSERT INTO events (seq, type, course_id, student_id, at_ms, version, capacity) VALUES \
             (1, 'course_changed', 'UP-1', NULL, {now}, 1, 10), \
             (2, 'enrolled', 'UP-1', 's1', {now}, NULL, NULL), \
             (3, 'dropped', 'UP-1', 's1', {now}, NULL, NULL)"
        ),
    ] {
        sqlx::query(&sql).execute(&pool).await.expect(&sql);
    }
    pool.close().await;

    let server = start(&db, &[]);
    let mut c = server.conn().await;
    let kept = read_all(&mut c, None).await;
    let seen = |events: &[Event]| -> Vec<(String, String, Option<String>)> {
        events
            .iter()
            .map(|e| (e.kind.clone(), e.course.clone(), e.student.clone()))
            .collect()
    };
    let s1 = Some("s1".to_string());
    assert_eq!(
        seen(&kept),
        [
            ("course_changed".into(), "UP-1".into(), None),
            ("enrolled".into(), "UP-1".into(), s1.clone()),
            ("dropped".into(), "UP-1".into(), s1),
        ],
        "the events written before the upgrade"
    );
    let r = c
        .request("GET", &events_path(None, 1, 0), Some(&admin_token()), None)
        .await;
    assert_eq!(
        r.json()["events"][0]["version"],
        1,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.json()["events"][0]["capacity"], 10);
    // A cursor saved before the upgrade reads on from the same place.
    let (rest, _) = try_page(&mut c, Some(&kept[0].cursor), 1_000, 0)
        .await
        .expect("answered");
    assert_eq!(rest, kept[1..], "after the first event");

    put_course(&mut c, "UP-2", 5).await;
    enroll_all(&mut c, "UP-2", &["s2", "s3"]).await;
    let (events, next) = try_page(&mut c, Some(&kept[2].cursor), 1, 0).await.expect("answered");
    assert_eq!(seen(&events), [("course_changed".into(), "UP-2".into(), None)]);
    let after = read_all(&mut c, Some(next)).await;
    assert_eq!(
        seen(&after),
        [
            ("enrolled".into(), "UP-2".into(), Some("s2".into())),
            ("enrolled".into(), "UP-2".into(), Some("s3".into())),
        ],
        "the feed goes on after the old events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_keeps_the_feed_on_sqlite() {
    upgrade_keeps_the_feed(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_keeps_the_feed_on_mariadb() {
    upgrade_keeps_the_feed(Kind::Mariadb).await;
}
