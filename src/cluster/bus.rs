//! The catalog bus (cluster mode): publishes this node's course changes on Redis, applies
//! the other nodes' changes to the catalog cache, and re-reads the catalog from MySQL
//! after a gap, after Redis comes back, and every `cluster_catchup_ms` in any case.
//!
//! Why: the catalog cache (`catalog.rs`) must follow every owner's changes within a
//! second while Redis is up and within `cluster_catchup_ms` when it is not. It runs on a
//! thread of its own, beside the keeper, so a slow Redis or store never stalls a shard.
//! Must never: block a shard (shards hand changes over a bounded queue with `try_send`),
//! or let Redis's loss do more than slow the cache down to the catch-up bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;

use super::catalog::{Catalog, Message, Published, PUBLISH_TICK_MS};
use crate::ids::CourseId;
use crate::metrics::ClusterMetrics;
use crate::persist::store::{Store, StoreOptions};
use crate::shard::table::CourseView;

/// Courses read from the store per catch-up query.
const CATCH_UP_PAGE: u32 = 5_000;
/// Changes in one published message at most.
const MESSAGE_COURSES_MAX: usize = 500;
/// Longest wait between two attempts to reach Redis.
const REDIS_RETRY_MS_MAX: u64 = 2_000;
/// Time allowed to connect to Redis or publish.
const REDIS_CALL_TIMEOUT_MS: u64 = 1_000;

pub struct BusConfig {
    pub store_url: String,
    /// None: no Redis; the cache follows the store every `catchup` only.
    pub redis: Option<String>,
    /// The pub/sub channel (`{redis_prefix}catalog`).
    pub channel: String,
    pub node_id: String,
    pub incarnation: i64,
    pub catchup: Duration,
    pub statement_timeout: Duration,
    pub catalog: Arc<Catalog>,
    /// This node's changed courses, from its shards.
    pub changes: flume::Receiver<Published>,
    pub metrics: Arc<ClusterMetrics>,
}

/// The running bus; stopped with the process.
pub struct Bus {
    stop: Arc<AtomicBool>,
}

impl Bus {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Starts the bus and returns once the cache holds the whole catalog.
pub fn spawn(cfg: BusConfig) -> anyhow::Result<Bus> {
    let stop = Arc::new(AtomicBool::new(false));
    let (first_tx, first_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let stopping = stop.clone();
    std::thread::Builder::new()
        .name("catalog-bus".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = first_tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(run(cfg, stopping, first_tx));
        })
        .context("spawning the catalog bus thread")?;
    first_rx.recv().context("catalog bus died during start")??;
    Ok(Bus { stop })
}

async fn run(cfg: BusConfig, stop: Arc<AtomicBool>, first: std::sync::mpsc::Sender<anyhow::Result<()>>) {
    let opts = StoreOptions {
        pool_connections_max: 1,
        acquire_timeout_ms: cfg.statement_timeout.as_millis() as u64,
        events: false,
    };
    let store = match Store::open(&cfg.store_url, &opts).await {
        Ok(s) => s,
        Err(e) => {
            let _ = first.send(Err(e));
            return;
        }
    };
    if let Err(e) = catch_up(&store, &cfg).await {
        let _ = first.send(Err(e.context("reading the catalog into the cache")));
        return;
    }
    let _ = first.send(Ok(()));
    let wake = tokio::sync::Notify::new();
    let refresh = async {
        while !stop.load(Ordering::Acquire) {
            tokio::select! {
                () = tokio::time::sleep(cfg.catchup) => {}
                () = wake.notified() => {}
            }
            if let Err(e) = catch_up(&store, &cfg).await {
                tracing::warn!(error = %format!("{e:#}"), "catalog catch-up failed; retrying");
            }
        }
    };
    tokio::join!(refresh, publish(&cfg), subscribe(&cfg, &wake));
}

/// Reads the whole catalog from the store into the cache.
async fn catch_up(store: &Store, cfg: &BusConfig) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut all: Vec<CourseView> = Vec::new();
    let mut after: Option<CourseId> = None;
    loop {
        let page = tokio::time::timeout(cfg.statement_timeout, store.list_courses(after.as_ref(), CATCH_UP_PAGE))
            .await
            .context("the store did not answer in time")??;
        let done = page.len() < CATCH_UP_PAGE as usize;
        after = page.last().map(|c| c.id.clone());
        all.extend(page.into_iter().map(CourseView::from));
        if done {
            break;
        }
    }
    cfg.catalog.catch_up(all, started);
    cfg.metrics.catalog_catch_ups.inc();
    Ok(())
}

/// Publishes this node's changes, coalesced per tick (a hot course once per tick), and
/// applies them to the node's own cache.
async fn publish(cfg: &BusConfig) {
    let client = cfg.redis.as_deref().and_then(|url| redis::Client::open(url).ok());
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(PUBLISH_TICK_MS));
    loop {
        tick.tick().await;
        if let Some(age) = cfg.catalog.age() {
            cfg.metrics.catalog_age_seconds.set(age.as_secs_f64());
        }
        let mut latest: HashMap<String, Published> = HashMap::new();
        while let Ok(change) = cfg.changes.try_recv() {
            match latest.get(&change.id) {
                Some(held) if held.stamp >= change.stamp => {}
                _ => {
                    latest.insert(change.id.clone(), change);
                }
            }
        }
        if cfg.changes.is_disconnected() && latest.is_empty() {
            return;
        }
        if latest.is_empty() {
            continue;
        }
        let changes: Vec<Published> = latest.into_values().collect();
        for c in &changes {
            cfg.catalog.apply(c);
        }
        let Some(client) = &client else { continue };
        for chunk in changes.chunks(MESSAGE_COURSES_MAX) {
            seq += 1;
            let message = Message {
                node: cfg.node_id.clone(),
                incarnation: cfg.incarnation,
                seq,
                courses: chunk.to_vec(),
            };
            let payload = serde_json::to_string(&message).expect("plain struct");
            if conn.is_none() {
                let connect = client.get_multiplexed_async_connection();
                conn = match tokio::time::timeout(Duration::from_millis(REDIS_CALL_TIMEOUT_MS), connect).await {
                    Ok(Ok(c)) => Some(c),
                    _ => None,
                };
            }
            let Some(c) = conn.as_mut() else {
                // The others notice the gap in the numbering and catch up from the store.
                continue;
            };
            let mut cmd = redis::cmd("PUBLISH");
            cmd.arg(&cfg.channel).arg(payload);
            let sent = cmd.query_async::<i64>(c);
            match tokio::time::timeout(Duration::from_millis(REDIS_CALL_TIMEOUT_MS), sent).await {
                Ok(Ok(_)) => cfg.metrics.catalog_published.inc_by(chunk.len() as u64),
                _ => conn = None,
            }
        }
    }
}

/// Applies the other nodes' changes; on a gap in a publisher's numbering, and each time
/// the subscription is (re)made, wakes a catch-up from the store.
async fn subscribe(cfg: &BusConfig, wake: &tokio::sync::Notify) {
    let Some(url) = cfg.redis.as_deref() else {
        return;
    };
    let Ok(client) = redis::Client::open(url) else {
        tracing::warn!("the catalog bus cannot use the redis URL; the cache follows the store only");
        return;
    };
    let mut retry_ms = 50;
    loop {
        let connect = client.get_async_pubsub();
        let mut pubsub = match tokio::time::timeout(Duration::from_millis(REDIS_CALL_TIMEOUT_MS), connect).await {
            Ok(Ok(p)) => p,
            _ => {
                tokio::time::sleep(Duration::from_millis(retry_ms)).await;
                retry_ms = (retry_ms * 2).min(REDIS_RETRY_MS_MAX);
                continue;
            }
        };
        if pubsub.subscribe(&cfg.channel).await.is_err() {
            tokio::time::sleep(Duration::from_millis(retry_ms)).await;
            retry_ms = (retry_ms * 2).min(REDIS_RETRY_MS_MAX);
            continue;
        }
        retry_ms = 50;
        // Whatever was published while the subscription was down is in the store.
        wake.notify_one();
        let mut last: HashMap<(String, i64), u64> = HashMap::new();
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            let Ok(message) = serde_json::from_str::<Message>(&payload) else {
                tracing::warn!("an unreadable catalog message; catching up from the store");
                wake.notify_one();
                continue;
            };
            if message.node == cfg.node_id && message.incarnation == cfg.incarnation {
                continue; // applied when it was published
            }
            let key = (message.node.clone(), message.incarnation);
            if let Some(prev) = last.insert(key, message.seq) {
                if message.seq != prev + 1 {
                    cfg.metrics.catalog_gaps.inc();
                    wake.notify_one();
                }
            }
            for c in &message.courses {
                cfg.catalog.apply(c);
            }
        }
        tracing::warn!("the catalog bus lost Redis; the cache follows the store until it is back");
    }
}
