//! Registration rounds against the real server: the draw (`draw_at`), the waitlist
//! (`waitlist_max`) and time tickets (`enroll_from`), on SQLite and on MariaDB.
//!
//! 1. A draw: entries (a repeat is the same entry, a withdrawal removes one), the record
//!    (a permutation of the entrants, reproducible from its seed), the roster and waitlist
//!    it made, what each student's POST answers after it, the feed it wrote.
//! 2. `kill -9` before the draw (the entries survive and are drawn after the restart),
//!    after it (the same record, roster and waitlist order) and during a draw of 3,000
//!    entries (one record, never two; every entrant in exactly one place).
//! 3. Promotion from the waitlist on a drop and on a capacity raise, in the commit that
//!    frees the seat; leaving the waitlist; the order across restarts.
//! 4. Waitlist positions under random churn, against a model of the queue.
//! 5. Time tickets: 403 `registration_closed` before `enroll_from`, normal after.
//! 6. Fairness: arrival order in the entry phase (and id order) does not change the
//!    chance to win.
//! 7. The feed of a whole round: every event once, in commit order for the course.

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use enrolld::ids::StudentId;
use enrolld::net::auth::Role;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

// ---- stores and servers ----

use common::{StoreKind as Kind, TestStore as Db};

/// enrolld on `db` with two shards and no rate limits (the tests poll and repeat POSTs as
/// one student from one address).
fn start(db: &Db) -> Server {
    let url = db.url();
    Server::start(&["--store", &url, "--shards", "2", "--limits-enabled", "false"])
}

// ---- time ----

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A whole second (unix) at least `ahead` seconds from now.
fn secs_ahead(ahead: i64) -> i64 {
    now_ms() / 1000 + 1 + ahead
}

fn rfc3339_secs(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// Unix ms of an RFC 3339 text.
fn instant_ms(s: &str) -> i64 {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("not RFC 3339 ({e}): {s:?}"));
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// Unix ms of a JSON field holding an RFC 3339 text.
fn instant_of(v: &Value, key: &str) -> i64 {
    instant_ms(v[key].as_str().unwrap_or_else(|| panic!("no RFC 3339 {key:?} in {v}")))
}

async fn sleep_until_ms(t: i64) {
    let left = t - now_ms();
    if left > 0 {
        tokio::time::sleep(Duration::from_millis(left as u64)).await;
    }
}

// ---- requests ----

fn text(r: &Resp) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// The answer's JSON after checking its status.
fn expect(r: &Resp, status: u16, what: &str) -> Value {
    assert_eq!(r.status, status, "{what}: {}", text(r));
    r.json()
}

/// A course body: title, capacity, waitlist_max and an optional draw_at (unix seconds).
fn course_body(capacity: u32, waitlist_max: u32, draw_at: Option<i64>) -> String {
    let mut b = json!({"title": "Rounds", "capacity": capacity, "waitlist_max": waitlist_max});
    if let Some(d) = draw_at {
        b["draw_at"] = json!(rfc3339_secs(d));
    }
    b.to_string()
}

async fn put(c: &mut Conn, id: &str, body: &str) -> Resp {
    put_course_body(c, id, body).await
}

/// Creates a course (201) and returns its JSON.
async fn create(c: &mut Conn, id: &str, capacity: u32, waitlist_max: u32, draw_at: Option<i64>) -> Value {
    let r = put(c, id, &course_body(capacity, waitlist_max, draw_at)).await;
    let j = expect(&r, 201, &format!("create {id}"));
    assert_eq!(j["capacity"], capacity, "{j}");
    assert_eq!(j["waitlist_max"], waitlist_max, "{j}");
    assert_eq!(j["waitlisted"], 0, "{j}");
    match draw_at {
        Some(d) => assert_eq!(instant_of(&j, "draw_at"), d * 1000, "draw_at of {id}: {j}"),
        None => assert!(j["draw_at"].is_null(), "{j}"),
    }
    j
}

async fn post_tok(c: &mut Conn, course: &str, tok: &str) -> Resp {
    c.request("POST", &format!("/v1/courses/{course}/enrollment"), Some(tok), None)
        .await
}

async fn post(c: &mut Conn, course: &str, student: &str) -> Resp {
    post_tok(c, course, &token(student)).await
}

async fn delete(c: &mut Conn, course: &str, student: &str) -> Resp {
    c.request(
        "DELETE",
        &format!("/v1/courses/{course}/enrollment"),
        Some(&token(student)),
        None,
    )
    .await
}

/// A POST that must answer `202 entered` in a draw due at `draw_at` (unix seconds).
async fn enter(c: &mut Conn, course: &str, student: &str, draw_at: i64) {
    let r = post(c, course, student).await;
    let j = expect(&r, 202, &format!("{student} enters the draw of {course}"));
    assert_eq!(j["status"], "entered", "{j}");
    assert_eq!(j["course_id"], course, "{j}");
    assert_eq!(j["student_id"], student, "{j}");
    assert_eq!(instant_of(&j, "draw_at"), draw_at * 1000, "{j}");
}

/// A POST that must answer `202 waitlisted` at `position`.
async fn expect_waiting(c: &mut Conn, course: &str, student: &str, position: usize) {
    let r = post(c, course, student).await;
    let j = expect(&r, 202, &format!("{student} waits for {course}"));
    assert_eq!(j["status"], "waitlisted", "{student}: {j}");
    assert_eq!(j["position"], position, "position of {student} in {course}: {j}");
}

/// A POST that must answer `200 enrolled` (the seat is held already).
async fn expect_holding(c: &mut Conn, course: &str, student: &str) {
    let r = post(c, course, student).await;
    let j = expect(&r, 200, &format!("{student} holds a seat in {course}"));
    assert_eq!(j["status"], "enrolled", "{j}");
}

/// A POST that must answer `409 course_full`.
async fn expect_full(c: &mut Conn, course: &str, student: &str) {
    let r = post(c, course, student).await;
    let j = expect(&r, 409, &format!("{student} finds {course} full"));
    assert_eq!(j["error"], "course_full", "{j}");
}

async fn course(c: &mut Conn, id: &str) -> Value {
    let r = c
        .request("GET", &format!("/v1/courses/{id}"), Some(&token("reader")), None)
        .await;
    expect(&r, 200, &format!("GET course {id}"))
}

/// (enrolled, seats_left, waitlisted) of a course.
async fn counts(c: &mut Conn, id: &str) -> (u64, u64, u64) {
    let j = course(c, id).await;
    (
        j["enrolled"].as_u64().unwrap(),
        j["seats_left"].as_u64().unwrap(),
        j["waitlisted"].as_u64().unwrap(),
    )
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// (students as answered, waitlist in order) of a course.
async fn full_roster(c: &mut Conn, id: &str) -> (Vec<String>, Vec<String>) {
    let j = expect(&roster_resp(c, id).await, 200, &format!("roster of {id}"));
    assert_eq!(j["course_id"], id, "{j}");
    (strings(&j["students"]), strings(&j["waitlist"]))
}

async fn draw_resp(c: &mut Conn, id: &str) -> Resp {
    c.request(
        "GET",
        &format!("/v1/admin/courses/{id}/draw"),
        Some(&admin_token()),
        None,
    )
    .await
}

/// The draw's record once it exists: polls until `deadline_ms` (unix ms).
async fn await_draw(c: &mut Conn, id: &str, deadline_ms: i64) -> Value {
    loop {
        let r = draw_resp(c, id).await;
        match r.status {
            200 => {
                let record = r.json();
                await_drawn_in_memory(c, id, &record, deadline_ms).await;
                return record;
            }
            404 => {}
            other => panic!("draw record of {id}: {other} {}", text(&r)),
        }
        assert!(
            now_ms() < deadline_ms,
            "no draw record for {id} by {} (now {})",
            enrolld::ids::rfc3339(deadline_ms),
            enrolld::ids::rfc3339(now_ms())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the course (memory, on the owner shard) shows the draw's outcome. The record
/// is read from the store, where the draw's transaction wrote it, and can be seen a moment
/// before the shard has applied that commit's answer to its memory.
async fn await_drawn_in_memory(c: &mut Conn, id: &str, record: &Value, deadline_ms: i64) {
    let want = (
        record["seats"].as_u64().unwrap(),
        record["waitlisted"].as_u64().unwrap(),
    );
    loop {
        let (enrolled, _, waitlisted) = counts(c, id).await;
        if (enrolled, waitlisted) == want {
            return;
        }
        assert!(
            now_ms() < deadline_ms,
            "{id}: drawn {want:?} (seated, waiting) in the store, memory still shows {:?}",
            (enrolled, waitlisted)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The parts of a draw record that must never change once written.
fn record_key(r: &Value) -> (String, String, String, u64, u64, u64, Vec<String>) {
    (
        r["course_id"].as_str().unwrap().to_string(),
        r["drawn_at"].as_str().unwrap().to_string(),
        r["seed"].as_str().unwrap().to_string(),
        r["entries"].as_u64().unwrap(),
        r["seats"].as_u64().unwrap(),
        r["waitlisted"].as_u64().unwrap(),
        strings(&r["order"]),
    )
}

/// The order a draw with this seed makes: the entrants in id order, shuffled by ChaCha20
/// seeded with the 32 bytes of the seed.
fn redraw(entrants: &BTreeSet<String>, seed_hex: &str) -> Vec<String> {
    let mut seed = [0u8; 32];
    for (i, b) in seed.iter_mut().enumerate() {
        *b = u8::from_str_radix(&seed_hex[2 * i..2 * i + 2], 16).unwrap();
    }
    let mut order: Vec<String> = entrants.iter().cloned().collect();
    order.shuffle(&mut rand_chacha::ChaCha20Rng::from_seed(seed));
    order
}

/// Checks a record against its entrants, capacity and waitlist room (course empty before
/// the draw) and returns its order.
fn check_record(
    rec: &Value,
    id: &str,
    entrants: &BTreeSet<String>,
    capacity: usize,
    waitlist_max: usize,
) -> Vec<String> {
    assert_eq!(rec["course_id"], id, "{rec}");
    let order = strings(&rec["order"]);
    let drawn: BTreeSet<String> = order.iter().cloned().collect();
    assert_eq!(drawn.len(), order.len(), "a student drawn twice in {id}: {rec}");
    assert_eq!(&drawn, entrants, "the draw of {id} drew exactly its entrants");
    assert_eq!(rec["entries"], entrants.len(), "{id}: entries");
    let seats = capacity.min(entrants.len());
    let waits = waitlist_max.min(entrants.len() - seats);
    assert_eq!(rec["seats"], seats, "{id}: seats");
    assert_eq!(rec["waitlisted"], waits, "{id}: waitlisted");
    let seed = rec["seed"].as_str().expect("seed");
    assert!(
        seed.len() == 64 && seed.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}: seed is 32 bytes in hex: {seed:?}"
    );
    instant_of(rec, "drawn_at");
    assert_eq!(
        redraw(entrants, seed),
        order,
        "{id}: the recorded order is the entrants in id order shuffled by ChaCha20 from the recorded seed"
    );
    order
}

fn sorted(v: &[String]) -> Vec<String> {
    let mut v = v.to_vec();
    v.sort();
    v
}

/// The student's enrollments, by course.
async fn mine(c: &mut Conn, student: &str) -> BTreeMap<String, Value> {
    let r = c
        .request("GET", "/v1/me/enrollments", Some(&token(student)), None)
        .await;
    let j = expect(&r, 200, &format!("enrollments of {student}"));
    let mut m = BTreeMap::new();
    for e in j["enrollments"].as_array().expect("enrollments") {
        assert_eq!(e["student_id"], student, "{e}");
        let course = e["course_id"].as_str().unwrap().to_string();
        assert!(
            m.insert(course, e.clone()).is_none(),
            "a course listed twice for {student}: {j}"
        );
    }
    m
}

/// One event of the feed: (type, student).
type Ev = (String, Option<String>);

/// The whole feed from the oldest event, page by page.
async fn feed(c: &mut Conn) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    let mut cursors = BTreeSet::new();
    loop {
        let mut path = "/v1/admin/events?limit=1000".to_string();
        if let Some(a) = &after {
            path.push_str("&after=");
            path.push_str(a);
        }
        let r = c.request("GET", &path, Some(&admin_token()), None).await;
        let j = expect(&r, 200, "feed page");
        let events = j["events"].as_array().expect("events").clone();
        if events.is_empty() {
            return all;
        }
        for e in &events {
            let cursor = e["cursor"].as_str().expect("cursor").to_string();
            assert!(cursors.insert(cursor), "an event read twice: {e}");
        }
        all.extend(events);
        after = Some(j["next"].as_str().expect("next").to_string());
    }
}

/// A course's events in feed order.
fn events_of(all: &[Value], course: &str) -> Vec<Ev> {
    all.iter()
        .filter(|e| e["course_id"] == course)
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["student_id"].as_str().map(str::to_string),
            )
        })
        .collect()
}

fn ev(kind: &str, student: &str) -> Ev {
    (kind.to_string(), Some(student.to_string()))
}

fn course_ev(kind: &str) -> Ev {
    (kind.to_string(), None)
}

fn count(events: &[Ev], kind: &str) -> usize {
    events.iter().filter(|e| e.0 == kind).count()
}

/// Each of `students` enters `course`'s draw, over `connections` connections at once.
async fn enter_many(addr: SocketAddr, course: &str, students: &[String], connections: usize, draw_at: i64) {
    let mut tasks = Vec::new();
    for chunk in students.chunks(students.len().div_ceil(connections)) {
        let chunk = chunk.to_vec();
        let course = course.to_string();
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(addr).await;
            for s in &chunk {
                enter(&mut c, &course, s, draw_at).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("an entering connection");
    }
}

// ---- 1. a draw ----

async fn draw_round(kind: Kind) {
    let db = Db::new(kind);
    let server = start(&db);
    let mut c = server.conn().await;
    let id = "DRAW-1";

    // draw_at must lie between opens_at and closes_at; waitlist_max within 0..100000.
    let d = secs_ahead(60);
    for (body, what) in [
        (
            json!({"title":"B","capacity":3,"draw_at":rfc3339_secs(d),"opens_at":rfc3339_secs(d + 10)}),
            "draw_at before opens_at",
        ),
        (
            json!({"title":"B","capacity":3,"draw_at":rfc3339_secs(d),"opens_at":rfc3339_secs(d)}),
            "draw_at at opens_at",
        ),
        (
            json!({"title":"B","capacity":3,"draw_at":rfc3339_secs(d),"closes_at":rfc3339_secs(d - 10)}),
            "draw_at after closes_at",
        ),
        (
            json!({"title":"B","capacity":3,"waitlist_max":100_001}),
            "waitlist_max above 100000",
        ),
        (
            json!({"title":"B","capacity":3,"waitlist_max":-1}),
            "negative waitlist_max",
        ),
        (
            json!({"title":"B","capacity":3,"draw_at":"soon"}),
            "draw_at not RFC 3339",
        ),
    ] {
        let r = put(&mut c, "DRAW-BAD", &body.to_string()).await;
        assert_eq!(r.status, 400, "{what}: {}", text(&r));
    }
    let j = expect(
        &put(
            &mut c,
            "DRAW-OK",
            &json!({"title":"B","capacity":3,"waitlist_max":100_000}).to_string(),
        )
        .await,
        201,
        "waitlist_max 100000",
    );
    assert_eq!(j["waitlist_max"], 100_000);
    assert!(j["draw_at"].is_null(), "{j}");

    let draw_at = secs_ahead(3);
    create(&mut c, id, 3, 2, Some(draw_at)).await;
    let students: Vec<String> = (0..8).map(|i| format!("d{i}")).collect();
    for s in &students {
        enter(&mut c, id, s, draw_at).await;
    }
    // Entering twice is the same entry; withdrawing removes one.
    enter(&mut c, id, "d0", draw_at).await;
    let j = expect(&delete(&mut c, id, "d7").await, 200, "d7 withdraws");
    assert_eq!(j["status"], "withdrawn", "{j}");
    let j = expect(&delete(&mut c, id, "d7").await, 404, "d7 withdraws again");
    assert_eq!(j["error"], "not_enrolled", "{j}");
    let entrants: BTreeSet<String> = students[..7].iter().cloned().collect();

    // Before the draw: no record, entries are neither seats nor waitlist places, and each
    // student sees their entry.
    let checked_before = now_ms() < draw_at * 1000 - 500;
    if checked_before {
        let r = draw_resp(&mut c, id).await;
        assert_eq!(r.status, 404, "no draw record before draw_at: {}", text(&r));
        assert_eq!(counts(&mut c, id).await, (0, 3, 0), "entries hold no seat");
        let (students_now, waitlist_now) = full_roster(&mut c, id).await;
        assert!(
            students_now.is_empty() && waitlist_now.is_empty(),
            "{students_now:?} {waitlist_now:?}"
        );
        let m = mine(&mut c, "d1").await;
        let e = m.get(id).unwrap_or_else(|| panic!("d1's entry listed: {m:?}"));
        assert_eq!(e["status"], "entered", "{e}");
        assert_eq!(instant_of(e, "draw_at"), draw_at * 1000, "{e}");
        assert!(
            !mine(&mut c, "d7").await.contains_key(id),
            "a withdrawn entry is not listed"
        );

        // With entries, draw_at can be neither removed nor moved into the past.
        let r = put(&mut c, id, &course_body(3, 2, None)).await;
        assert_eq!(r.status, 400, "draw_at removed with entries: {}", text(&r));
        let r = put(&mut c, id, &course_body(3, 2, Some(now_ms() / 1000 - 60))).await;
        assert_eq!(r.status, 400, "draw_at moved into the past with entries: {}", text(&r));
        let j = course(&mut c, id).await;
        assert_eq!(
            instant_of(&j, "draw_at"),
            draw_at * 1000,
            "refused PUTs changed nothing: {j}"
        );
    } else {
        eprintln!("{kind:?}: the entries took until draw_at; the before-the-draw checks were skipped");
    }

    let rec = await_draw(&mut c, id, draw_at * 1000 + 15_000).await;
    assert!(
        instant_of(&rec, "drawn_at") >= draw_at * 1000,
        "drawn at or after draw_at: {rec}"
    );
    let order = check_record(&rec, id, &entrants, 3, 2);
    assert_eq!(
        record_key(&expect(&draw_resp(&mut c, id).await, 200, "draw again")),
        record_key(&rec),
        "the record reads the same twice"
    );

    let (students_now, waitlist_now) = full_roster(&mut c, id).await;
    assert_eq!(sorted(&students_now), sorted(&order[..3]), "the winners hold the seats");
    assert_eq!(waitlist_now, order[3..5].to_vec(), "the waitlist in drawn order");
    assert_eq!(counts(&mut c, id).await, (3, 0, 2));

    // Each student's POST after the draw.
    for s in &order[..3] {
        expect_holding(&mut c, id, s).await;
    }
    expect_waiting(&mut c, id, &order[3], 1).await;
    expect_waiting(&mut c, id, &order[4], 2).await;
    for s in &order[5..] {
        expect_full(&mut c, id, s).await;
    }
    expect_full(&mut c, id, "d7").await;
    expect_full(&mut c, id, "late").await;

    let m = mine(&mut c, &order[4]).await;
    assert_eq!(m[id]["status"], "waitlisted", "{m:?}");
    assert_eq!(m[id]["position"], 2, "{m:?}");
    let m = mine(&mut c, &order[0]).await;
    assert_eq!(m[id]["status"], "enrolled", "{m:?}");
    instant_of(&m[id], "enrolled_at");
    assert!(
        !mine(&mut c, &order[5]).await.contains_key(id),
        "a student not selected holds nothing"
    );

    // After the draw, draw_at is fixed, and waitlist_max cannot drop below those waiting.
    let r = put(&mut c, id, &course_body(3, 2, Some(draw_at + 60))).await;
    assert_eq!(r.status, 400, "draw_at changed after the draw: {}", text(&r));
    let r = put(&mut c, id, &course_body(3, 2, None)).await;
    assert_eq!(r.status, 400, "draw_at removed after the draw: {}", text(&r));
    let r = put(&mut c, id, &course_body(3, 1, Some(draw_at))).await;
    assert_eq!(r.status, 400, "waitlist_max below the 2 waiting: {}", text(&r));
    assert_eq!(
        full_roster(&mut c, id).await,
        (students_now, waitlist_now),
        "refused PUTs changed nothing"
    );

    // The feed: each change once.
    let events = events_of(&feed(&mut c).await, id);
    assert_eq!(count(&events, "course_changed"), 1, "{events:?}");
    assert_eq!(
        count(&events, "entered"),
        8,
        "a repeated entry writes no event: {events:?}"
    );
    assert_eq!(count(&events, "withdrawn"), 1, "{events:?}");
    assert_eq!(count(&events, "drawn"), 1, "{events:?}");
    assert_eq!(count(&events, "enrolled"), 3, "{events:?}");
    assert_eq!(count(&events, "waitlisted"), 2, "{events:?}");
    assert_eq!(count(&events, "not_selected"), 2, "{events:?}");
    assert_eq!(events.len(), 18, "no other event for {id}: {events:?}");
    let drawn = events.iter().position(|e| e.0 == "drawn").unwrap();
    assert!(
        events[..drawn]
            .iter()
            .all(|e| ["course_changed", "entered", "withdrawn"].contains(&e.0.as_str())),
        "entries before the draw: {events:?}"
    );
    let mut after_draw = vec![course_ev("drawn")];
    after_draw.extend(order[..3].iter().map(|s| ev("enrolled", s)));
    after_draw.extend(order[3..5].iter().map(|s| ev("waitlisted", s)));
    after_draw.extend(order[5..].iter().map(|s| ev("not_selected", s)));
    assert_eq!(
        events[drawn..].to_vec(),
        after_draw,
        "the draw's events, in drawn order"
    );

    // The metrics count what happened: 8 entries committed (the repeat is not one), one
    // draw of 7 entries, 2 waiting, and every 202 as outcome `placed`.
    let m = |sample: &'static str| {
        let addr = server.addr;
        async move {
            let mut c = Conn::open(addr).await;
            metric(&mut c, sample).await.unwrap_or(-1.0)
        }
    };
    assert_eq!(m("enrolld_rounds_entries_total").await, 8.0);
    assert_eq!(m("enrolld_rounds_draws_total").await, 1.0);
    assert_eq!(m("enrolld_rounds_draw_entries_sum").await, 7.0);
    assert_eq!(m("enrolld_rounds_waitlisted").await, 2.0);
    assert!(m(r#"enrolld_enroll_attempts_total{outcome="placed"}"#).await >= 9.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draw_on_sqlite() {
    draw_round(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draw_on_mariadb() {
    draw_round(Kind::Mariadb).await;
}

// ---- 2. kill -9 before, after and during the draw ----

/// Course A draws late (the kill lands before it), course B early (the kill lands after
/// it). After the restart B is exactly as it was, and A's entries stand and are drawn.
async fn kill9_before_and_after_draw(kind: Kind) {
    let db = Db::new(kind);
    let mut server = start(&db);
    let mut c = server.conn().await;
    let (a, b) = ("KILL-A", "KILL-B");
    let b_at = secs_ahead(3);
    let a_at = b_at + 12;
    create(&mut c, a, 2, 2, Some(a_at)).await;
    create(&mut c, b, 2, 2, Some(b_at)).await;
    let a_students: BTreeSet<String> = (0..6).map(|i| format!("a{i}")).collect();
    let b_students: BTreeSet<String> = (0..6).map(|i| format!("b{i}")).collect();
    for s in &a_students {
        enter(&mut c, a, s, a_at).await;
    }
    for s in &b_students {
        enter(&mut c, b, s, b_at).await;
    }
    let b_rec = await_draw(&mut c, b, b_at * 1000 + 15_000).await;
    let b_order = check_record(&b_rec, b, &b_students, 2, 2);
    let b_roster = full_roster(&mut c, b).await;
    assert_eq!(b_roster.1, b_order[2..4].to_vec());
    let b_counts = counts(&mut c, b).await;
    assert_eq!(b_counts, (2, 0, 2));

    server.kill9();
    let mut server = server.restart();
    let mut c = server.conn().await;

    // B: the same record, roster and waitlist order.
    assert_eq!(
        record_key(&expect(&draw_resp(&mut c, b).await, 200, "B's record after kill -9")),
        record_key(&b_rec),
        "B's draw record survives kill -9 unchanged"
    );
    assert_eq!(
        full_roster(&mut c, b).await,
        b_roster,
        "B's roster and waitlist after kill -9"
    );
    assert_eq!(counts(&mut c, b).await, b_counts);
    expect_waiting(&mut c, b, &b_order[2], 1).await;
    expect_waiting(&mut c, b, &b_order[3], 2).await;
    expect_holding(&mut c, b, &b_order[0]).await;

    // A: the entries stand.
    if now_ms() < a_at * 1000 - 1_000 {
        let r = draw_resp(&mut c, a).await;
        assert_eq!(r.status, 404, "no draw of A yet: {}", text(&r));
        enter(&mut c, a, "a1", a_at).await;
        let m = mine(&mut c, "a2").await;
        assert_eq!(m.get(a).map(|e| e["status"].clone()), Some(json!("entered")), "{m:?}");
    } else {
        eprintln!("{kind:?}: the restart took until A's draw_at; the before-the-draw checks of A were skipped");
    }
    let a_rec = await_draw(&mut c, a, a_at * 1000 + 15_000).await;
    let a_order = check_record(&a_rec, a, &a_students, 2, 2);
    let a_roster = full_roster(&mut c, a).await;
    assert_eq!(sorted(&a_roster.0), sorted(&a_order[..2]));
    assert_eq!(a_roster.1, a_order[2..4].to_vec());

    // And once more after A's draw.
    server.kill9();
    let server = server.restart();
    let mut c = server.conn().await;
    for (id, rec, roster) in [(a, &a_rec, &a_roster), (b, &b_rec, &b_roster)] {
        assert_eq!(
            record_key(&expect(
                &draw_resp(&mut c, id).await,
                200,
                "record after the second kill"
            )),
            record_key(rec),
            "{id}"
        );
        assert_eq!(&full_roster(&mut c, id).await, roster, "{id}");
    }
    let events = feed(&mut c).await;
    for id in [a, b] {
        let ev = events_of(&events, id);
        assert_eq!(count(&ev, "drawn"), 1, "{id}: one draw: {ev:?}");
        assert_eq!(count(&ev, "entered"), 6, "{id}: {ev:?}");
        assert_eq!(count(&ev, "enrolled"), 2, "{id}: {ev:?}");
        assert_eq!(count(&ev, "waitlisted"), 2, "{id}: {ev:?}");
        assert_eq!(count(&ev, "not_selected"), 2, "{id}: {ev:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_before_and_after_the_draw_on_sqlite() {
    kill9_before_and_after_draw(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_before_and_after_the_draw_on_mariadb() {
    kill9_before_and_after_draw(Kind::Mariadb).await;
}

/// 3,000 entries, capacity 100, waitlist 200; `kill -9` a few ms after draw_at, while the
/// draw runs or just before or after it commits. After the restart there is exactly one
/// record (or the draw runs again and makes one), and the roster, waitlist and feed are
/// that record's.
async fn kill9_during_draw(kind: Kind) {
    const ENTRANTS: usize = 3_000;
    let db = Db::new(kind);
    let mut server = start(&db);
    let mut c = server.conn().await;
    let id = "KILL-MID";
    // Far ahead while the entries come in, then moved to just ahead.
    let far = secs_ahead(600);
    create(&mut c, id, 100, 200, Some(far)).await;
    let students: Vec<String> = (0..ENTRANTS).map(|i| format!("x{i:04}")).collect();
    enter_many(server.addr, id, &students, 16, far).await;
    let entrants: BTreeSet<String> = students.iter().cloned().collect();
    assert_eq!(counts(&mut c, id).await, (0, 100, 0));
    let draw_at = secs_ahead(2);
    let j = expect(
        &put(&mut c, id, &course_body(100, 200, Some(draw_at))).await,
        200,
        "draw_at moved earlier (still ahead) with entries",
    );
    assert_eq!(instant_of(&j, "draw_at"), draw_at * 1000, "{j}");

    let offset = rand::thread_rng().gen_range(0..150);
    sleep_until_ms(draw_at * 1000 + offset).await;
    server.kill9();
    let killed_log = server.rest_of_log();
    let committed_before = killed_log
        .iter()
        .any(|l| l.contains("draw committed") && l.contains(id));
    eprintln!(
        "{kind:?}: killed {offset} ms after draw_at; the draw {} before the kill",
        if committed_before {
            "had committed"
        } else {
            "had not committed"
        }
    );

    let server = server.restart();
    let mut c = server.conn().await;
    let rec = await_draw(&mut c, id, now_ms() + 30_000).await;
    let order = check_record(&rec, id, &entrants, 100, 200);
    // Never a second record: the record stays the same.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        record_key(&expect(&draw_resp(&mut c, id).await, 200, "record again")),
        record_key(&rec),
        "one draw record only"
    );
    let (students_now, waitlist_now) = full_roster(&mut c, id).await;
    assert_eq!(
        sorted(&students_now),
        sorted(&order[..100]),
        "the record's winners hold the seats"
    );
    assert_eq!(
        waitlist_now,
        order[100..300].to_vec(),
        "the record's waitlist, in drawn order"
    );
    assert_eq!(counts(&mut c, id).await, (100, 0, 200));
    expect_holding(&mut c, id, &order[0]).await;
    expect_waiting(&mut c, id, &order[100], 1).await;
    expect_waiting(&mut c, id, &order[299], 200).await;
    expect_full(&mut c, id, &order[300]).await;
    assert!(
        !mine(&mut c, &order[ENTRANTS - 1]).await.contains_key(id),
        "a student not selected holds no entry"
    );

    // The feed: every entrant exactly once in one of the three outcomes, one draw.
    let events = events_of(&feed(&mut c).await, id);
    assert_eq!(count(&events, "drawn"), 1, "exactly one draw in the feed");
    assert_eq!(count(&events, "entered"), ENTRANTS);
    let mut outcome: BTreeMap<String, &str> = BTreeMap::new();
    for (k, s) in &events {
        if let ("enrolled" | "waitlisted" | "not_selected", Some(s)) = (k.as_str(), s) {
            assert!(outcome.insert(s.clone(), k).is_none(), "{s} drawn twice in the feed");
        }
    }
    assert_eq!(outcome.len(), ENTRANTS, "every entrant has one outcome in the feed");
    for (i, s) in order.iter().enumerate() {
        let want = match i {
            i if i < 100 => "enrolled",
            i if i < 300 => "waitlisted",
            _ => "not_selected",
        };
        assert_eq!(outcome[s], want, "{s} at {i} in the drawn order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_the_draw_on_sqlite() {
    kill9_during_draw(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_the_draw_on_mariadb() {
    kill9_during_draw(Kind::Mariadb).await;
}

// ---- 3. promotion on a drop and on a capacity raise ----

async fn waitlist_promotion(kind: Kind) {
    let db = Db::new(kind);
    let mut server = start(&db);
    let mut c = server.conn().await;
    let id = "WAIT-1";
    create(&mut c, id, 2, 3, None).await;
    for s in ["w1", "w2"] {
        let j = expect(&post(&mut c, id, s).await, 201, s);
        assert_eq!(j["status"], "enrolled", "{j}");
    }
    for (i, s) in ["w3", "w4", "w5"].iter().enumerate() {
        expect_waiting(&mut c, id, s, i + 1).await;
    }
    expect_waiting(&mut c, id, "w4", 2).await; // a repeat: the same place
    expect_full(&mut c, id, "w6").await;
    assert_eq!(counts(&mut c, id).await, (2, 0, 3));
    let r = put(
        &mut c,
        id,
        &json!({"title":"W","capacity":2,"waitlist_max":2}).to_string(),
    )
    .await;
    assert_eq!(r.status, 400, "waitlist_max below the 3 waiting: {}", text(&r));

    // A drop gives the seat to the head in the same commit: no sleep before looking.
    let j = expect(&delete(&mut c, id, "w1").await, 200, "w1 drops");
    assert_eq!(j["status"], "dropped", "{j}");
    assert_eq!(counts(&mut c, id).await, (2, 0, 2), "right after the drop");
    let (students_now, waitlist_now) = full_roster(&mut c, id).await;
    assert_eq!(sorted(&students_now), vec!["w2", "w3"], "the head was promoted");
    assert_eq!(waitlist_now, vec!["w4", "w5"]);
    expect_waiting(&mut c, id, "w4", 1).await;
    expect_waiting(&mut c, id, "w5", 2).await;
    expect_holding(&mut c, id, "w3").await;
    let m = mine(&mut c, "w3").await;
    assert_eq!(m[id]["status"], "enrolled", "{m:?}");

    // A capacity raise promotes the heads in the PUT's own commit.
    let j = expect(
        &put(
            &mut c,
            id,
            &json!({"title":"W","capacity":4,"waitlist_max":3}).to_string(),
        )
        .await,
        200,
        "capacity 2 -> 4",
    );
    assert_eq!(
        (j["enrolled"].clone(), j["waitlisted"].clone(), j["seats_left"].clone()),
        (json!(4), json!(0), json!(0)),
        "{j}"
    );
    let (students_now, waitlist_now) = full_roster(&mut c, id).await;
    assert_eq!(sorted(&students_now), vec!["w2", "w3", "w4", "w5"]);
    assert!(waitlist_now.is_empty(), "{waitlist_now:?}");
    expect_holding(&mut c, id, "w5").await;

    // Leaving the waitlist moves those behind up by one.
    for (i, s) in ["w6", "w7", "w8"].iter().enumerate() {
        expect_waiting(&mut c, id, s, i + 1).await;
    }
    expect_full(&mut c, id, "w1").await;
    let j = expect(&delete(&mut c, id, "w7").await, 200, "w7 leaves the waitlist");
    assert_eq!(j["status"], "left_waitlist", "{j}");
    assert_eq!(counts(&mut c, id).await, (4, 0, 2));
    expect_waiting(&mut c, id, "w6", 1).await;
    expect_waiting(&mut c, id, "w8", 2).await;
    let j = expect(&delete(&mut c, id, "w6").await, 200, "the head leaves");
    assert_eq!(j["status"], "left_waitlist", "{j}");
    expect_waiting(&mut c, id, "w8", 1).await;
    expect_waiting(&mut c, id, "w1", 2).await;
    expect_waiting(&mut c, id, "w7", 3).await;
    assert!(!mine(&mut c, "w6").await.contains_key(id), "w6 left");
    let want_waitlist = vec!["w8".to_string(), "w1".to_string(), "w7".to_string()];
    assert_eq!(full_roster(&mut c, id).await.1, want_waitlist);

    // The order survives a SIGTERM and a kill -9.
    for how in ["SIGTERM", "kill -9"] {
        if how == "SIGTERM" {
            assert_eq!(server.terminate(), Some(0), "a SIGTERM exits 0");
        } else {
            server.kill9();
        }
        server = server.restart();
        c = server.conn().await;
        let (students_now, waitlist_now) = full_roster(&mut c, id).await;
        assert_eq!(sorted(&students_now), vec!["w2", "w3", "w4", "w5"], "after {how}");
        assert_eq!(waitlist_now, want_waitlist, "the waitlist order after {how}");
        assert_eq!(counts(&mut c, id).await, (4, 0, 3), "after {how}");
        for (i, s) in want_waitlist.iter().enumerate() {
            expect_waiting(&mut c, id, s, i + 1).await;
        }
    }
    // And promotion still works on the rebuilt state.
    expect(&delete(&mut c, id, "w2").await, 200, "w2 drops after the restarts");
    assert_eq!(counts(&mut c, id).await, (4, 0, 2));
    let (students_now, waitlist_now) = full_roster(&mut c, id).await;
    assert_eq!(sorted(&students_now), vec!["w3", "w4", "w5", "w8"]);
    assert_eq!(waitlist_now, vec!["w1", "w7"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waitlist_promotion_on_sqlite() {
    waitlist_promotion(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waitlist_promotion_on_mariadb() {
    waitlist_promotion(Kind::Mariadb).await;
}

// ---- 4. positions under churn ----

/// A model of one seat and its queue checked against the server after every step.
async fn positions_under_churn(kind: Kind) {
    const JOINED: usize = 150;
    const STEPS: usize = 100;
    let seed: u64 = rand::random();
    eprintln!("{kind:?}: churn seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let db = Db::new(kind);
    let server = start(&db);
    let mut c = server.conn().await;
    let id = "CHURN";
    create(&mut c, id, 1, 200, None).await;
    expect(&post(&mut c, id, "holder").await, 201, "the seat");
    let mut holder: Option<String> = Some("holder".into());
    let mut queue: VecDeque<String> = VecDeque::new();
    let mut next_id = 0;
    let mut fresh = || {
        next_id += 1;
        format!("q{next_id:04}")
    };
    for _ in 0..JOINED {
        let s = fresh();
        expect_waiting(&mut c, id, &s, queue.len() + 1).await;
        queue.push_back(s);
    }
    // Students who left (the waitlist or the seat) and may come back.
    let mut gone: Vec<String> = Vec::new();
    let (mut leaves, mut joins, mut drops, mut promotions) = (0, 0, 0, 0);
    for step in 0..STEPS {
        let what = rng.gen_range(0..3);
        let mut deleted = false;
        match what {
            0 if !queue.is_empty() => {
                let i = rng.gen_range(0..queue.len());
                let s = queue.remove(i).unwrap();
                let j = expect(&delete(&mut c, id, &s).await, 200, &format!("step {step}: {s} leaves"));
                assert_eq!(j["status"], "left_waitlist", "{j}");
                gone.push(s);
                deleted = true;
                leaves += 1;
            }
            2 if holder.is_some() => {
                let s = holder.take().unwrap();
                let j = expect(&delete(&mut c, id, &s).await, 200, &format!("step {step}: {s} drops"));
                assert_eq!(j["status"], "dropped", "{j}");
                holder = queue.pop_front();
                promotions += usize::from(holder.is_some());
                gone.push(s);
                deleted = true;
                drops += 1;
            }
            _ => {
                let s = if !gone.is_empty() && rng.gen_bool(0.3) {
                    gone.swap_remove(rng.gen_range(0..gone.len()))
                } else {
                    fresh()
                };
                if holder.is_none() {
                    expect(
                        &post(&mut c, id, &s).await,
                        201,
                        &format!("step {step}: {s} takes the free seat"),
                    );
                    holder = Some(s);
                } else {
                    expect_waiting(&mut c, id, &s, queue.len() + 1).await;
                    queue.push_back(s);
                }
                joins += 1;
            }
        }
        // Right after the answer (no sleep): the counts, the roster and the positions.
        let (enrolled, seats_left, waitlisted) = counts(&mut c, id).await;
        if deleted {
            assert!(
                !(seats_left > 0 && waitlisted > 0),
                "step {step}: a seat free ({seats_left}) while {waitlisted} wait, right after a DELETE"
            );
        }
        assert_eq!(
            (enrolled, seats_left, waitlisted),
            (
                u64::from(holder.is_some()),
                u64::from(holder.is_none()),
                queue.len() as u64
            ),
            "step {step}: counts"
        );
        let (students_now, waitlist_now) = full_roster(&mut c, id).await;
        assert_eq!(
            students_now,
            holder.iter().cloned().collect::<Vec<_>>(),
            "step {step}: the seat"
        );
        assert_eq!(waitlist_now, Vec::from(queue.clone()), "step {step}: the waitlist");
        let mut sample: BTreeSet<usize> = (0..4)
            .filter_map(|_| (!queue.is_empty()).then(|| rng.gen_range(0..queue.len())))
            .collect();
        if !queue.is_empty() {
            sample.insert(0);
            sample.insert(queue.len() - 1);
        }
        for i in sample {
            let s = queue[i].clone();
            expect_waiting(&mut c, id, &s, i + 1).await;
        }
        if let Some(h) = holder.clone() {
            expect_holding(&mut c, id, &h).await;
        }
    }
    eprintln!("{kind:?}: {leaves} left, {joins} joined, {drops} dropped (promoting)");
    for (i, s) in queue.clone().iter().enumerate() {
        expect_waiting(&mut c, id, s, i + 1).await;
        let m = mine(&mut c, s).await;
        assert_eq!(m[id]["position"], i + 1, "{s}: {m:?}");
    }
    // The feed: each change once, each promotion right after the drop that made it.
    let events = events_of(&feed(&mut c).await, id);
    assert_eq!(count(&events, "dropped"), drops, "{events:?}");
    assert_eq!(count(&events, "left_waitlist"), leaves, "{events:?}");
    assert_eq!(count(&events, "promoted"), promotions, "{events:?}");
    for (i, e) in events.iter().enumerate() {
        if e.0 == "promoted" {
            assert_eq!(
                events[i - 1].0,
                "dropped",
                "a promotion follows its drop: {:?}",
                &events[i - 1..=i]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_under_churn_on_sqlite() {
    positions_under_churn(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_under_churn_on_mariadb() {
    positions_under_churn(Kind::Mariadb).await;
}

// ---- 5. time tickets ----

fn ticket(student: &str, enroll_from: i64) -> String {
    auth().mint_ticket(
        &StudentId::parse(student).unwrap(),
        Role::Student,
        3600,
        None,
        Some(enroll_from as u64),
    )
}

async fn time_tickets(kind: Kind) {
    let db = Db::new(kind);
    let server = start(&db);
    let mut c = server.conn().await;
    let (plain, drawn) = ("TT-PLAIN", "TT-DRAW");
    create(&mut c, plain, 5, 0, None).await;
    let draw_at = secs_ahead(60);
    create(&mut c, drawn, 5, 5, Some(draw_at)).await;

    let from = secs_ahead(3);
    let early = ticket("t-early", from);
    for course in [plain, drawn] {
        let r = post_tok(&mut c, course, &early).await;
        let j = expect(&r, 403, &format!("a POST before the ticket on {course}"));
        assert_eq!(j["error"], "registration_closed", "{j}");
        let message = j["message"].as_str().expect("message");
        let named = message
            .split(|ch: char| ch.is_whitespace() || ch == '(' || ch == ')' || ch == ',')
            .any(|w| {
                time::OffsetDateTime::parse(w, &time::format_description::well_known::Rfc3339)
                    .is_ok_and(|t| t.unix_timestamp() == from && t.nanosecond() == 0)
            });
        assert!(
            named,
            "the message names {} in RFC 3339: {message:?}",
            rfc3339_secs(from)
        );
    }
    // The refusals recorded nothing.
    assert_eq!(counts(&mut c, plain).await, (0, 5, 0));
    assert!(mine(&mut c, "t-early").await.is_empty());
    // Other routes are not closed by the ticket.
    let r = c
        .request("GET", &format!("/v1/courses/{plain}"), Some(&early), None)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));

    // A ticket beyond any clock keeps the student out, naming year 9999 (not 1970).
    let never = ticket("t-never", u64::MAX as i64);
    let j = expect(&post_tok(&mut c, plain, &never).await, 403, "a ticket at u64::MAX");
    assert!(j["message"].as_str().unwrap_or("").contains("9999-12-31"), "{j}");

    // A ticket in the past: as a token without one.
    let past = ticket("t-past", now_ms() / 1000 - 10);
    let j = expect(&post_tok(&mut c, plain, &past).await, 201, "a ticket in the past");
    assert_eq!(j["status"], "enrolled");
    let j = expect(&post_tok(&mut c, drawn, &past).await, 202, "a ticket in the past, draw");
    assert_eq!(j["status"], "entered");

    // Once the time has come.
    sleep_until_ms(from * 1000 + 200).await;
    let j = expect(&post_tok(&mut c, plain, &early).await, 201, "after the ticket's time");
    assert_eq!(j["status"], "enrolled");
    let j = expect(
        &post_tok(&mut c, drawn, &early).await,
        202,
        "after the ticket's time, draw",
    );
    assert_eq!(j["status"], "entered");
    assert_eq!(counts(&mut c, plain).await, (2, 3, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_tickets_on_sqlite() {
    time_tickets(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_tickets_on_mariadb() {
    time_tickets(Kind::Mariadb).await;
}

// ---- 6. fairness ----

/// Arrival order in the entry phase does not change the chance to win, nor does the
/// student's id.
///
/// 100 courses of capacity 5, each with the same 20 entrants `e00`..`e19`, who enter one
/// after another on one connection per group of courses: in even courses `e00` first and
/// `e19` last, in odd courses the reverse. After the draws, 500 seats were won.
///
/// Under a fair draw, the number of the first ten arrivals among a course's 5 winners is
/// hypergeometric (20 entrants, 10 early, 5 drawn): mean 2.5, variance
/// 5 · ½ · ½ · 15/19 ≈ 0.987. Over 100 independent courses the early wins total has mean
/// 250 and standard deviation √98.7 ≈ 9.93. The test allows |early − 250| ≤ 44, i.e. 4.4
/// standard deviations: a fair server fails it with probability below 2e-5. The same bound
/// applies to the wins of the ids `e00`..`e09` (which arrive first in half the courses and
/// last in the other half): a draw biased by id order fails it.
///
/// Per position: each arrival position wins a course with probability 5/20, so its wins
/// over 100 courses are Binomial(100, ¼): mean 25, sd 4.33. The test allows 5..=50 for each
/// of the 20 positions; P(X < 5) + P(X > 50) ≈ 4e-8 per position, below 1e-6 for all 20.
///
/// The seeds of the 100 draws are all different (32 bytes from the OS each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrival_order_does_not_change_the_odds() {
    const COURSES: usize = 100;
    const ENTRANTS: usize = 20;
    const SEATS: usize = 5;
    const CONNECTIONS: usize = 10;
    let db = Db::new(Kind::Sqlite);
    let server = start(&db);
    let mut c = server.conn().await;
    let ids: Vec<String> = (0..COURSES).map(|i| format!("FAIR-{i:03}")).collect();
    let far = secs_ahead(600);
    for id in &ids {
        create(&mut c, id, SEATS as u32, 0, Some(far)).await;
    }
    let students: Vec<String> = (0..ENTRANTS).map(|i| format!("e{i:02}")).collect();
    let arrivals = |course: usize| -> Vec<String> {
        let mut v = students.clone();
        if course % 2 == 1 {
            v.reverse();
        }
        v
    };
    let mut tasks = Vec::new();
    for group in (0..COURSES).collect::<Vec<_>>().chunks(COURSES / CONNECTIONS) {
        let group: Vec<(String, Vec<String>)> = group.iter().map(|&i| (ids[i].clone(), arrivals(i))).collect();
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(addr).await;
            for (id, order) in group {
                for s in order {
                    enter(&mut c, &id, &s, far).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("an entering connection");
    }
    // Every entry is in; now the draws, all at the same moment.
    let draw_at = secs_ahead(2);
    for id in &ids {
        let r = put(&mut c, id, &course_body(SEATS as u32, 0, Some(draw_at))).await;
        expect(
            &r,
            200,
            &format!("{id}: draw_at moved earlier (still ahead) with entries"),
        );
    }
    let entrants: BTreeSet<String> = students.iter().cloned().collect();
    let mut early_arrival_wins = 0usize;
    let mut low_id_wins = 0usize;
    let mut by_position = [0usize; ENTRANTS];
    let mut seeds = BTreeSet::new();
    for (i, id) in ids.iter().enumerate() {
        let rec = await_draw(&mut c, id, draw_at * 1000 + 30_000).await;
        let order = check_record(&rec, id, &entrants, SEATS, 0);
        seeds.insert(rec["seed"].as_str().unwrap().to_string());
        let arrived = arrivals(i);
        for w in &order[..SEATS] {
            let position = arrived.iter().position(|s| s == w).unwrap();
            by_position[position] += 1;
            if position < ENTRANTS / 2 {
                early_arrival_wins += 1;
            }
            if w.as_str() < "e10" {
                low_id_wins += 1;
            }
        }
    }
    eprintln!("fairness: early arrivals won {early_arrival_wins}/500, ids e00-e09 won {low_id_wins}/500, wins by arrival position {by_position:?}");
    assert_eq!(seeds.len(), COURSES, "every draw has a seed of its own");
    assert_eq!(by_position.iter().sum::<usize>(), COURSES * SEATS);
    assert!(
        early_arrival_wins.abs_diff(250) <= 44,
        "the first ten arrivals won {early_arrival_wins} of 500 seats (fair: 250 ± 44)"
    );
    assert!(
        low_id_wins.abs_diff(250) <= 44,
        "ids e00-e09 won {low_id_wins} of 500 seats (fair: 250 ± 44)"
    );
    for (p, wins) in by_position.iter().enumerate() {
        assert!(
            (5..=50).contains(wins),
            "arrival position {p} won {wins} of 100 courses (fair: 25, allowed 5-50)"
        );
    }
}

// ---- 7. the feed of a whole round ----

/// One course through every kind of rounds change; its feed is exactly the changes, each
/// once, in the order they were committed (a drop that promotes writes `dropped` then
/// `promoted`, adjacent).
async fn feed_of_a_round(kind: Kind) {
    let db = Db::new(kind);
    let server = start(&db);
    let mut c = server.conn().await;
    let id = "FEED-R";
    let draw_at = secs_ahead(3);
    create(&mut c, id, 2, 2, Some(draw_at)).await;
    let mut want = vec![course_ev("course_changed")];
    for i in 0..6 {
        let s = format!("f{i}");
        enter(&mut c, id, &s, draw_at).await;
        want.push(ev("entered", &s));
    }
    enter(&mut c, id, "f1", draw_at).await; // the same entry: no event
    let j = expect(&delete(&mut c, id, "f5").await, 200, "f5 withdraws");
    assert_eq!(j["status"], "withdrawn");
    want.push(ev("withdrawn", "f5"));
    enter(&mut c, id, "f5", draw_at).await;
    want.push(ev("entered", "f5"));
    expect(&delete(&mut c, id, "f2").await, 200, "f2 withdraws");
    want.push(ev("withdrawn", "f2"));
    let entrants: BTreeSet<String> = ["f0", "f1", "f3", "f4", "f5"].iter().map(|s| s.to_string()).collect();

    let rec = await_draw(&mut c, id, draw_at * 1000 + 15_000).await;
    let o = check_record(&rec, id, &entrants, 2, 2);
    want.push(course_ev("drawn"));
    want.extend([
        ev("enrolled", &o[0]),
        ev("enrolled", &o[1]),
        ev("waitlisted", &o[2]),
        ev("waitlisted", &o[3]),
        ev("not_selected", &o[4]),
    ]);
    // A winner drops: the head is promoted in the same commit.
    let j = expect(&delete(&mut c, id, &o[0]).await, 200, "a winner drops");
    assert_eq!(j["status"], "dropped");
    want.extend([ev("dropped", &o[0]), ev("promoted", &o[2])]);
    // The new head leaves the waitlist.
    let j = expect(&delete(&mut c, id, &o[3]).await, 200, "the head leaves");
    assert_eq!(j["status"], "left_waitlist");
    want.push(ev("left_waitlist", &o[3]));
    // The one not selected, and one who withdrew, join the waitlist first come.
    expect_waiting(&mut c, id, &o[4], 1).await;
    want.push(ev("waitlisted", &o[4]));
    expect_waiting(&mut c, id, "f2", 2).await;
    want.push(ev("waitlisted", "f2"));
    // A capacity raise promotes the head in its own commit.
    let j = expect(
        &put(&mut c, id, &course_body(3, 2, Some(draw_at))).await,
        200,
        "capacity 2 -> 3",
    );
    assert_eq!(
        (j["enrolled"].clone(), j["waitlisted"].clone()),
        (json!(3), json!(1)),
        "{j}"
    );
    want.extend([course_ev("course_changed"), ev("promoted", &o[4])]);
    let j = expect(&delete(&mut c, id, "f2").await, 200, "f2 leaves");
    assert_eq!(j["status"], "left_waitlist");
    want.push(ev("left_waitlist", "f2"));

    let (students_now, waitlist_now) = full_roster(&mut c, id).await;
    assert_eq!(
        sorted(&students_now),
        sorted(&[o[1].clone(), o[2].clone(), o[4].clone()])
    );
    assert!(waitlist_now.is_empty(), "{waitlist_now:?}");
    let got = events_of(&feed(&mut c).await, id);
    assert_eq!(got, want, "the course's feed, each change once, in commit order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_of_a_round_on_sqlite() {
    feed_of_a_round(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_of_a_round_on_mariadb() {
    feed_of_a_round(Kind::Mariadb).await;
}

/// A burst of students joining one waitlist at once, more than `LANE_ALONE_WAITERS_MAX`
/// (64) changes may wait for a lane held by one change at a time: joins share the lane (they only
/// append), so none is refused; the waitlist holds each of them once, with distinct
/// positions 1..n matching the order it shows.
async fn burst_joining_a_waitlist(kind: Kind) {
    const JOINERS: usize = 200;
    let db = Db::new(kind);
    let server = start(&db);
    let mut c = server.conn().await;
    let id = "BURST-1";
    create(&mut c, id, 1, JOINERS as u32 + 2, None).await;
    expect(&post(&mut c, id, "holder").await, 201, "the one seat");
    let joins = (0..JOINERS).map(|i| {
        let addr = server.addr;
        tokio::spawn(async move {
            let student = format!("b{i:03}");
            let mut c = Conn::open(addr).await;
            let r = post(&mut c, id, &student).await;
            (student, r.status, r.json())
        })
    });
    let mut positions = BTreeMap::new();
    for join in futures_util::future::join_all(joins).await {
        let (student, status, body) = join.expect("the join task");
        assert_eq!(status, 202, "{student}: {body}");
        assert_eq!(body["status"], "waitlisted", "{student}: {body}");
        let position = body["position"].as_u64().expect("position") as usize;
        assert!(
            positions.insert(position, student.clone()).is_none(),
            "{student} told position {position}, which another was told"
        );
    }
    let expected: Vec<usize> = (1..=JOINERS).collect();
    assert_eq!(positions.keys().copied().collect::<Vec<_>>(), expected);
    let (_, waitlist) = full_roster(&mut c, id).await;
    assert_eq!(
        waitlist,
        positions.values().cloned().collect::<Vec<_>>(),
        "the waitlist is in the order of the positions told"
    );
}

/// Drops while a burst joins: each seat a holder gives up goes to a joiner (the head of
/// the waitlist in the drop's own commit, or a joiner who came while nobody waited), no
/// drop is starved by the stream of joins, and nobody is lost or listed twice.
async fn drops_during_a_burst_of_joins(kind: Kind) {
    const JOINERS: usize = 150;
    const SEATS: usize = 6;
    let db = Db::new(kind);
    let server = start(&db);
    let mut c = server.conn().await;
    let id = "BURST-2";
    create(&mut c, id, SEATS as u32, JOINERS as u32, None).await;
    for h in 0..SEATS {
        expect(&post(&mut c, id, &format!("h{h}")).await, 201, "a holder's seat");
    }
    let addr = server.addr;
    let joins = (0..JOINERS).map(|i| {
        tokio::spawn(async move {
            let student = format!("j{i:03}");
            let mut c = Conn::open(addr).await;
            let r = post(&mut c, id, &student).await;
            (student, r.status, r.json())
        })
    });
    let drops = (0..SEATS).map(|h| {
        tokio::spawn(async move {
            let mut c = Conn::open(addr).await;
            tokio::time::sleep(Duration::from_millis(5 * h as u64)).await;
            let r = delete(&mut c, id, &format!("h{h}")).await;
            (r.status, r.json())
        })
    });
    let (joined, dropped) = futures_util::future::join(
        futures_util::future::join_all(joins),
        futures_util::future::join_all(drops),
    )
    .await;
    for d in dropped {
        let (status, body) = d.expect("the drop task");
        assert_eq!((status, body["status"].as_str()), (200, Some("dropped")), "{body}");
    }
    let mut seated_directly = BTreeSet::new();
    for j in joined {
        let (student, status, body) = j.expect("the join task");
        match status {
            201 => assert!(seated_directly.insert(student)),
            202 => assert_eq!(body["status"], "waitlisted", "{student}: {body}"),
            _ => panic!("{student}: {status} {body}"),
        }
    }
    let (students, waitlist) = full_roster(&mut c, id).await;
    assert_eq!(
        students.len(),
        SEATS,
        "every seat given up went to a joiner: {students:?}"
    );
    assert!(students.iter().all(|s| s.starts_with('j')), "{students:?}");
    assert!(
        seated_directly.iter().all(|s| students.contains(s)),
        "{seated_directly:?}"
    );
    let mut everyone: Vec<String> = students.iter().chain(&waitlist).cloned().collect();
    everyone.sort();
    let all: Vec<String> = (0..JOINERS).map(|i| format!("j{i:03}")).collect();
    assert_eq!(everyone, all, "each joiner seated or waiting, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_during_a_burst_of_joins_on_sqlite() {
    drops_during_a_burst_of_joins(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_during_a_burst_of_joins_on_mariadb() {
    drops_during_a_burst_of_joins(Kind::Mariadb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_joining_a_waitlist_on_sqlite_is_queued_not_refused() {
    burst_joining_a_waitlist(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_joining_a_waitlist_on_mariadb_is_queued_not_refused() {
    burst_joining_a_waitlist(Kind::Mariadb).await;
}
