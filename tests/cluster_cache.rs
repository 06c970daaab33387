//! The catalog cache of cluster mode (API.md, "Several nodes"): reads of courses another
//! node owns come from each node's cache, which follows every change within a second while
//! Redis is up, and within `cluster_catchup_ms` of the change while Redis is down (and so
//! within that bound of Redis coming back). Two real nodes on one MariaDB database and a
//! private `redis-server` that the test stops and starts again. The times printed are the
//! measured staleness the README quotes; the assertions are the contract's bounds, with
//! the polling interval as the only slack.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// The catch-up bound the nodes run with (shorter than the default, to keep the test short).
const CATCHUP_MS: u64 = 1_500;
/// How often the test looks again.
const POLL_MS: u64 = 10;

/// A throwaway `redis-server` on a loopback port, killed on drop.

fn node(id: &str, port: u16, db: &TestDb, redis: u16) -> Server {
    Server::start_args(
        [
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--node-id",
            id,
            "--store",
            &db.url,
            "--jwt-secret",
            SECRET,
            "--shards",
            "2",
            "--redis",
            &format!("redis://127.0.0.1:{redis}"),
            "--cluster-catchup-ms",
            &CATCHUP_MS.to_string(),
            // The test polls a course every 10 ms as one student from one address.
            "--limits-enabled",
            "false",
        ]
        .map(String::from)
        .to_vec(),
    )
}

async fn capacity_on(c: &mut Conn, course: &str) -> (u64, String) {
    let r = c
        .request("GET", &format!("/v1/courses/{course}"), Some(&token("reader")), None)
        .await;
    assert_eq!(r.status, 200, "GET {course}");
    let node = r
        .header("x-enrolld-node")
        .expect("every /v1 answer names its node")
        .to_string();
    (r.json()["capacity"].as_u64().expect("capacity"), node)
}

/// Sets `course`'s capacity through `writer` and returns how long `reader` took to show it.
async fn staleness(writer: &mut Conn, reader: &mut Conn, course: &str, capacity: u32, bound: Duration) -> Duration {
    put_course(writer, course, capacity).await;
    let changed = Instant::now();
    loop {
        let (seen, node) = capacity_on(reader, course).await;
        if seen == u64::from(capacity) {
            return changed.elapsed();
        }
        assert!(
            changed.elapsed() < bound,
            "{course}: capacity {capacity} not visible on the other node (node {node} still shows {seen}) after {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
}

#[tokio::test]
async fn a_change_reaches_the_other_nodes_cache_within_a_second_and_within_the_catch_up_bound_without_redis() {
    let db = TestDb::new();
    let mut redis = PrivateRedis::start(free_port());
    let (pa, pb) = (free_port(), free_port());
    let a = node("ca", pa, &db, redis.port);
    let b = node("cb", pb, &db, redis.port);
    let mut ca = a.conn().await;
    let mut cb = b.conn().await;
    // Courses until one is owned by each node (the owners settle within a few heartbeats).
    for i in 0..40 {
        put_course(&mut ca, &format!("CACHE-{i}"), 10).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let (on_a, on_b) = loop {
        let mut on_a = None;
        let mut on_b = None;
        for i in 0..40 {
            let id = format!("CACHE-{i}");
            let r = roster_resp(&mut ca, &id).await;
            match r.header("x-enrolld-node") {
                Some("ca") => on_a = Some(id),
                Some("cb") => on_b = Some(id),
                _ => {}
            }
        }
        if let (Some(x), Some(y)) = (on_a, on_b) {
            break (x, y);
        }
        assert!(Instant::now() < deadline, "the two nodes never split the courses");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Redis up: a change on B's course, made through A (passed to B), read on A from its
    // cache; and the other way round.
    let second = Duration::from_secs(1);
    let mut ca2 = a.conn().await;
    // A reads its own write at once (it passes reads of the course to B until its cache
    // has B's change), then answers from its own cache again within the second.
    let t1 = staleness(&mut ca, &mut ca2, &on_b, 11, second).await;
    let cached = Instant::now();
    loop {
        let (seen, served_by) = capacity_on(&mut ca, &on_b).await;
        assert_eq!(seen, 11, "never an older copy after the write was answered");
        if served_by == "ca" {
            break;
        }
        assert!(
            cached.elapsed() < second,
            "A answers a read of B's course from its own cache again"
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
    let t2 = staleness(&mut cb, &mut ca, &on_b, 12, second).await;
    let t3 = staleness(&mut ca, &mut cb, &on_a, 13, second).await;
    eprintln!(
        "with Redis up: the writing node read its write after {t1:?} and served it from its cache after {:?}; \
         the other node's cache followed after {t2:?} and {t3:?} (bound 1 s)",
        cached.elapsed()
    );

    // Redis down: the change reaches the other cache by the catch-up from the store.
    redis.stop();
    let bound = Duration::from_millis(CATCHUP_MS) + Duration::from_millis(500);
    let t4 = staleness(&mut cb, &mut ca, &on_b, 14, bound).await;
    let t5 = staleness(&mut ca, &mut cb, &on_a, 15, bound).await;
    eprintln!("cache staleness with Redis down: {t4:?}, {t5:?} (bound cluster_catchup_ms = {CATCHUP_MS} ms)");
    // Seats still sell with Redis down (it never decides a seat).
    let r = cb
        .request(
            "POST",
            &format!("/v1/courses/{on_b}/enrollment"),
            Some(&token("while-redis-down")),
            None,
        )
        .await;
    assert_eq!(r.status, 201);

    // Redis back (same port): changes flow over it again within a second once the nodes
    // have resubscribed (their retry backs off to 2 s at most).
    let redis = PrivateRedis::start(redis.port);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let t6 = staleness(&mut cb, &mut ca, &on_b, 16, second).await;
    eprintln!("cache staleness after Redis came back: {t6:?}");
    drop(redis);
}
