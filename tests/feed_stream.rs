//! The change feed's optional push to a Redis Stream (`events_redis_stream`) on the shared
//! Redis, under a key of this test's own: every event committed while the server runs
//! reaches the stream with its cursor, in feed order, and a restart resumes after the last
//! entry it finds there instead of starting over.

mod common;

use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

fn rcli(args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", "6379"])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The cursors in the stream, in order (XRANGE prints field and value on their own lines).
fn stream_cursors(key: &str) -> Vec<String> {
    let out = rcli(&["XRANGE", key, "-", "+"]);
    let lines: Vec<&str> = out.lines().collect();
    lines
        .windows(2)
        .filter(|w| w[0] == "cursor")
        .map(|w| w[1].to_string())
        .collect()
}

/// The feed's cursors after `after`, from the server.
async fn feed_cursors(conn: &mut Conn, after: &str) -> Vec<String> {
    let r = conn
        .request(
            "GET",
            &format!("/v1/admin/events?limit=1000&after={after}"),
            Some(&admin_token()),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["cursor"].as_str().expect("cursor").to_string())
        .collect()
}

async fn wait_for_stream(key: &str, want: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = stream_cursors(key);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "stream {got:?}, feed {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn committed_events_reach_the_stream_in_order_and_a_restart_resumes() {
    let dir = TempDir::new("enrolld-stream");
    let key = format!("enrolld:test:stream:{}", std::process::id());
    rcli(&["DEL", &key]);
    let store = format!("sqlite://{}", dir.path("e.db"));
    let server = Server::start(&[
        "--store",
        &store,
        "--redis",
        "redis://127.0.0.1:6379",
        "--events-redis-stream",
        &key,
    ]);
    let mut c = server.conn().await;
    put_course(&mut c, "S-1", 3).await;
    for s in ["ann", "bob"] {
        let r = c
            .request("POST", "/v1/courses/S-1/enrollment", Some(&token(s)), None)
            .await;
        assert_eq!(r.status, 201);
    }
    let r = c
        .request("DELETE", "/v1/courses/S-1/enrollment", Some(&token("ann")), None)
        .await;
    assert_eq!(r.status, 200);
    // A fresh stream starts at the feed's head when the server started (empty here), so
    // it holds the whole feed: the course, two enrollments, one drop.
    let feed = feed_cursors(&mut c, "c0000000000000000").await;
    assert_eq!(feed.len(), 4, "{feed:?}");
    wait_for_stream(&key, &feed).await;

    drop(c);
    let server = server.restart();
    let mut c = server.conn().await;
    let r = c
        .request("POST", "/v1/courses/S-1/enrollment", Some(&token("cy")), None)
        .await;
    assert_eq!(r.status, 201);
    let feed = feed_cursors(&mut c, "c0000000000000000").await;
    assert_eq!(feed.len(), 5);
    // Resumed after its last entry: each event once, none pushed again.
    wait_for_stream(&key, &feed).await;
    rcli(&["DEL", &key]);
}
