//! The admission check's cost: the in-process path (token bucket, striped keyed buckets,
//! flow pacer) in ns/op with criterion, and the Redis path's rate with and without
//! leasing, against the real Redis at 127.0.0.1:6379 (skipped with a note when absent).
//!
//! Run: `cargo bench --bench admission`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use enrolld::limit::breaker::{Breaker, BreakerConfig};
use enrolld::limit::bucket::{Rate, TokenBucket};
use enrolld::limit::flow::{FlowRule, Pacer};
use enrolld::limit::keyed::KeyedBuckets;
use enrolld::limit::redis::{RedisLink, RedisShared};

fn local(c: &mut Criterion) {
    let rate = Rate {
        per_sec: 1e9,
        burst: 1_000_000,
    };
    let mut bucket = TokenBucket::full(&rate, 0);
    let mut t = 0i64;
    c.bench_function("token_bucket_take", |b| {
        b.iter(|| {
            t += 1;
            black_box(bucket.take(&rate, t, 1))
        })
    });
    let keyed = KeyedBuckets::new(1_000_000);
    let keys: Vec<String> = (0..100_000).map(|i| format!("student-{i}")).collect();
    let mut i = 0usize;
    c.bench_function("keyed_take_100k_students", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(keyed.take(keys[i].as_str(), &rate, 1))
        })
    });
    // The alternative the choice was made against: governor's keyed limiter (DashMap).
    let quota = governor::Quota::per_second(std::num::NonZeroU32::new(1_000_000_000).unwrap());
    let gov: governor::DefaultKeyedRateLimiter<String> = governor::RateLimiter::keyed(quota);
    let mut j = 0usize;
    c.bench_function("governor_keyed_check_100k_students", |b| {
        b.iter(|| {
            j = (j + 1) % keys.len();
            black_box(gov.check_key(&keys[j]).is_ok())
        })
    });
    let pacer = Pacer::default();
    let rule = FlowRule {
        qps: 1e9,
        ..FlowRule::default()
    };
    let now = Instant::now();
    c.bench_function("flow_pacer_admit", |b| b.iter(|| black_box(pacer.admit(&rule, 2, now))));
}

/// Requests per second through `RedisLink::take` for one key, with `lease` tokens leased
/// per Redis call, over `secs`.
fn redis_rate(lease: u32, secs: f64) -> Option<f64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let breaker = Arc::new(Breaker::new("bench", BreakerConfig::default()));
        let shared =
            Arc::new(RedisShared::new("redis://127.0.0.1:6379", enrolld::config::REDIS_PREFIX_DEFAULT, breaker).ok()?);
        let link = RedisLink::new(shared);
        let rate = Rate {
            per_sec: 1e9,
            burst: 1_000_000_000,
        };
        let key = format!("bench:{}", std::process::id());
        link.take(&key, &rate, lease, 60_000, enrolld::ids::now_ms()).await?;
        let started = Instant::now();
        let mut n = 0u64;
        while started.elapsed() < Duration::from_secs_f64(secs) {
            for _ in 0..100 {
                link.take(&key, &rate, lease, 60_000, enrolld::ids::now_ms()).await?;
                n += 1;
            }
        }
        Some(n as f64 / started.elapsed().as_secs_f64())
    })
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    local(&mut c);
    let quick = std::env::args()
        .any(|a| a == "--test" || a == "--bench")
        .then_some(())
        .is_none();
    let secs = if quick || std::env::args().any(|a| a == "--test") {
        0.2
    } else {
        3.0
    };
    match (redis_rate(1, secs), redis_rate(100, secs)) {
        (Some(one), Some(leased)) => println!(
            "redis_take: {one:.0} req/s with a Redis call per request; {leased:.0} req/s leasing 100 tokens a call ({:.1}x)",
            leased / one
        ),
        _ => println!("redis_take: skipped (no Redis at 127.0.0.1:6379)"),
    }
    c.final_summary();
}
