//! The optional push of the change feed to a Redis Stream (`events_redis_stream`), for
//! consumers that want consumer groups.
//!
//! Why: some downstream systems already read Redis Streams. The feed in the store stays
//! the truth; this copy is best effort: it may lag (Redis down, a slow store) or repeat
//! (a restart resumes from the last entry it finds in the stream), and every entry carries
//! the event's `cursor` so a consumer can deduplicate and fall back to
//! `GET /v1/admin/events` from it.
//! Must never: hold up a commit, or read the feed other than through the store.

use std::time::Duration;

use super::feed::{cursor_of, parse_cursor, Event};
use super::{bounded, Backend, PersistConfig};

/// Entries the stream keeps, about (`XADD ... MAXLEN ~`).
pub const STREAM_ENTRIES_MAX: u64 = 1_000_000;
/// Events read and pushed per round.
const PUSH_PAGE_EVENTS: u32 = 500;
/// Longest wait between two tries after a failure.
const PUSH_BACKOFF_MS_MAX: u64 = 5_000;
/// Longest wait for new events before looking again anyway (another node may commit).
const PUSH_IDLE_MS: u64 = 1_000;

/// Where to push: the Redis URL and the stream's key.
#[derive(Clone, Debug)]
pub struct StreamTarget {
    pub redis_url: String,
    pub key: String,
}

/// Pushes every committed event to the stream, forever (the persist runtime ends it).
pub async fn push<B: Backend>(
    store: &B,
    cfg: &PersistConfig,
    target: &StreamTarget,
    mut committed: tokio::sync::watch::Receiver<u64>,
) {
    let client = match redis::Client::open(target.redis_url.as_str()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "events_redis_stream: bad Redis URL; not pushing");
            return std::future::pending().await;
        }
    };
    let mut after: Option<u64> = None;
    let mut backoff_ms = 100;
    loop {
        match push_round(store, cfg, &client, target, &mut after).await {
            Ok(0) => {
                backoff_ms = 100;
                let _ = tokio::time::timeout(Duration::from_millis(PUSH_IDLE_MS), committed.changed()).await;
            }
            Ok(_) => backoff_ms = 100,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), backoff_ms, "pushing events to the Redis stream failed; retrying");
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(PUSH_BACKOFF_MS_MAX);
            }
        }
    }
}

/// One round: where to start (the stream's last entry, or the feed's head on a fresh
/// stream), then one page of events. Returns how many were pushed.
async fn push_round<B: Backend>(
    store: &B,
    cfg: &PersistConfig,
    client: &redis::Client,
    target: &StreamTarget,
    after: &mut Option<u64>,
) -> anyhow::Result<usize> {
    let timeout = cfg.statement_timeout;
    let mut conn = tokio::time::timeout(timeout, client.get_multiplexed_async_connection()).await??;
    let from = match *after {
        Some(a) => a,
        None => {
            let last: Vec<(String, Vec<(String, String)>)> = tokio::time::timeout(
                timeout,
                redis::cmd("XREVRANGE")
                    .arg(&target.key)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut conn),
            )
            .await??;
            let resumed = last
                .first()
                .and_then(|(_, fields)| fields.iter().find(|(k, _)| k == "cursor"))
                .and_then(|(_, v)| parse_cursor(v));
            match resumed {
                Some(seq) => seq,
                // A fresh stream starts at the feed's head: history stays in the store.
                None => bounded(cfg, store.read_events(None, 0)).await??.head,
            }
        }
    };
    let page = bounded(cfg, store.read_events(Some(from), PUSH_PAGE_EVENTS)).await??;
    *after = Some(page.next);
    if page.events.is_empty() {
        return Ok(0);
    }
    let mut pipe = redis::pipe();
    for e in &page.events {
        pipe.cmd("XADD")
            .arg(&target.key)
            .arg("MAXLEN")
            .arg("~")
            .arg(STREAM_ENTRIES_MAX)
            .arg("*")
            .arg(fields_of(e))
            .ignore();
    }
    if let Err(e) = tokio::time::timeout(timeout, pipe.query_async::<()>(&mut conn)).await? {
        *after = Some(from); // push this page again: the stream may repeat, never skip
        return Err(e.into());
    }
    Ok(page.events.len())
}

fn fields_of(e: &Event) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("cursor", cursor_of(e.seq)),
        ("type", e.kind.as_str().to_string()),
        ("course_id", e.course.clone()),
        ("at", crate::ids::rfc3339(e.at)),
    ];
    if let Some(s) = &e.student {
        f.push(("student_id", s.clone()));
    }
    if let Some(v) = e.version {
        f.push(("version", v.to_string()));
    }
    if let Some(c) = e.capacity {
        f.push(("capacity", c.to_string()));
    }
    f
}
