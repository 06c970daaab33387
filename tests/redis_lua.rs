//! `lua/token_bucket.lua` against a real Redis: refill arithmetic, burst cap, clocks that go
//! backwards, atomicity under concurrent callers, high rates (redis-cell#80), leasing, TTL,
//! argument validation, and the EVALSHA / NOSCRIPT / reload path.
//!
//! The shared Redis is at 127.0.0.1:6379 (override with `ENROLLD_TEST_REDIS`). These tests
//! use only keys under `enrolld:test:<random>:` and delete them when done. They never flush
//! it. The NOSCRIPT test runs its own private `redis-server`, because it needs SCRIPT FLUSH.

mod common;

use std::time::{Duration, Instant};

use common::{free_port, PrivateRedis};

use redis::aio::MultiplexedConnection;
use redis::{ErrorKind, RedisResult, Script};

const SRC: &str = include_str!("../lua/token_bucket.lua");

fn redis_url() -> String {
    std::env::var("ENROLLD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// What the script returns: (granted, floor(tokens left), ms until a token is available).
type Reply = (i64, i64, i64);

/// One call in a scenario: at `now` ms ask for `requested` tokens and expect this reply.
type Step = (i64, u64, Reply);

/// The parameters of a bucket, apart from its key.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    rate: f64,
    burst: u64,
    ttl_ms: u64,
}

impl Bucket {
    fn new(rate: f64, burst: u64) -> Bucket {
        Bucket {
            rate,
            burst,
            ttl_ms: 600_000,
        }
    }
}

/// Keys under `enrolld:test:<random>:`, all deleted on drop (even when a test panics).
struct Keys {
    prefix: String,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            prefix: format!("enrolld:test:{}-{:016x}:", std::process::id(), rand::random::<u64>()),
        }
    }

    /// A bucket key with a hash tag, as callers write them for Redis Cluster.
    fn bucket(&self, name: &str) -> String {
        format!("{}tb:{{{name}}}", self.prefix)
    }

    fn existing(&self, con: &mut redis::Connection) -> RedisResult<Vec<String>> {
        let mut found = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query(con)?;
            found.extend(batch);
            if next == 0 {
                return Ok(found);
            }
            cursor = next;
        }
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        // Synchronous client: Drop cannot await. Errors are ignored (the keys expire anyway).
        let Ok(client) = redis::Client::open(redis_url()) else {
            return;
        };
        let Ok(mut con) = client.get_connection() else {
            return;
        };
        if let Ok(keys) = self.existing(&mut con) {
            if !keys.is_empty() {
                let _: RedisResult<i64> = redis::cmd("DEL").arg(&keys).query(&mut con);
            }
        }
    }
}

/// A connection plus the script object (its SHA1 is computed once).
struct Lab {
    con: MultiplexedConnection,
    script: Script,
}

impl Lab {
    async fn connect(url: &str) -> Lab {
        let client = redis::Client::open(url).expect("redis url");
        let con = client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to Redis at {url}: {e}"));
        Lab {
            con,
            script: Script::new(SRC),
        }
    }

    async fn shared() -> Lab {
        Lab::connect(&redis_url()).await
    }

    /// EVALSHA (falling back to SCRIPT LOAD + retry on NOSCRIPT) with raw arguments.
    async fn try_call(&mut self, keys: &[&str], args: &[&str]) -> RedisResult<Reply> {
        let mut inv = self.script.prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        for a in args {
            inv.arg(*a);
        }
        inv.invoke_async(&mut self.con).await
    }

    async fn take(&mut self, key: &str, b: Bucket, now: i64, requested: u64) -> Reply {
        self.script
            .key(key)
            .arg(b.rate)
            .arg(b.burst)
            .arg(now)
            .arg(requested)
            .arg(b.ttl_ms)
            .invoke_async(&mut self.con)
            .await
            .unwrap_or_else(|e| panic!("{b:?} now={now} requested={requested}: {e}"))
    }

    async fn field(&mut self, key: &str, field: &str) -> f64 {
        let s: String = redis::cmd("HGET")
            .arg(key)
            .arg(field)
            .query_async(&mut self.con)
            .await
            .unwrap_or_else(|e| panic!("HGET {key} {field}: {e}"));
        s.parse().unwrap_or_else(|e| panic!("HGET {key} {field} = {s:?}: {e}"))
    }

    async fn pttl(&mut self, key: &str) -> i64 {
        redis::cmd("PTTL").arg(key).query_async(&mut self.con).await.unwrap()
    }

    async fn exists(&mut self, key: &str) -> bool {
        let n: i64 = redis::cmd("EXISTS").arg(key).query_async(&mut self.con).await.unwrap();
        n == 1
    }

    /// Runs `steps` in order against `key` and checks every reply.
    async fn check(&mut self, case: &str, key: &str, b: Bucket, steps: &[Step]) {
        for (i, &(now, requested, want)) in steps.iter().enumerate() {
            let got = self.take(key, b, now, requested).await;
            assert_eq!(
                got, want,
                "{case}: step {i} (rate {} burst {}, now={now}, requested={requested}): \
                 got (granted, left, retry_ms) = {got:?}, want {want:?}",
                b.rate, b.burst
            );
        }
    }
}

struct Case {
    name: &'static str,
    rate: f64,
    burst: u64,
    steps: &'static [Step],
}

const CASES: &[Case] = &[
    Case {
        name: "refill at 5/s",
        rate: 5.0,
        burst: 10,
        steps: &[
            (0, 10, (10, 0, 200)),
            (0, 1, (0, 0, 200)),
            (199, 1, (0, 0, 1)),     // 0.995 tokens: 1 ms to go
            (200, 1, (1, 0, 200)),   // 0.995 + 0.005 must count as a whole token
            (1000, 10, (4, 0, 200)), // 5 refilled since t=0, 1 of them taken at t=200
            (1100, 1, (0, 0, 100)),  // half a token
            (1200, 1, (1, 0, 200)),
        ],
    },
    Case {
        name: "fractional rate 0.5/s",
        rate: 0.5,
        burst: 2,
        steps: &[
            (0, 2, (2, 0, 2000)),
            (1999, 1, (0, 0, 1)),
            (2000, 1, (1, 0, 2000)),
            (5000, 5, (1, 0, 1000)), // 1.5 tokens: 1 granted, 0.5 kept
            (6000, 1, (1, 0, 2000)), // the kept half plus 1000 ms of refill
        ],
    },
    Case {
        name: "slow rate 0.001/s (one token per 1000 s)",
        rate: 0.001,
        burst: 1,
        steps: &[
            (0, 1, (1, 0, 1_000_000)),
            (999_999, 1, (0, 0, 1)),
            (1_000_000, 1, (1, 0, 1_000_000)),
        ],
    },
    Case {
        name: "retry_ms is when the token arrives, at 3/s",
        rate: 3.0,
        burst: 1,
        steps: &[(0, 1, (1, 0, 334)), (333, 1, (0, 0, 1)), (334, 1, (1, 0, 334))],
    },
    Case {
        name: "new bucket starts full, realistic clock",
        rate: 1.0,
        burst: 3,
        steps: &[
            (1_700_000_000_000, 1, (1, 2, 0)),
            (1_700_000_000_000, 1, (1, 1, 0)),
            (1_700_000_000_000, 1, (1, 0, 1000)),
            (1_700_000_000_000, 1, (0, 0, 1000)),
            (1_700_000_000_500, 1, (0, 0, 500)),
            (1_700_000_001_000, 1, (1, 0, 1000)),
        ],
    },
    Case {
        name: "burst cap after an hour idle",
        rate: 5.0,
        burst: 10,
        steps: &[
            (0, 10, (10, 0, 200)),
            (3_600_000, 100, (10, 0, 200)), // not 18,000
            (3_600_200, 100, (1, 0, 200)),
        ],
    },
    Case {
        name: "burst cap with small requests",
        rate: 5.0,
        burst: 10,
        steps: &[(0, 1, (1, 9, 0)), (3_600_000, 1, (1, 9, 0))],
    },
    Case {
        name: "new bucket asked for more than burst",
        rate: 5.0,
        burst: 10,
        steps: &[(0, 100, (10, 0, 200))],
    },
    Case {
        name: "leasing: 10 asked, 7 left",
        rate: 5.0,
        burst: 10,
        steps: &[(0, 3, (3, 7, 0)), (0, 10, (7, 0, 200)), (0, 10, (0, 0, 200))],
    },
    Case {
        name: "leasing from a bucket of 7",
        rate: 1.0,
        burst: 7,
        steps: &[(0, 10, (7, 0, 1000))],
    },
    Case {
        name: "two callers' clocks disagree by 100 ms",
        rate: 5.0,
        burst: 10,
        steps: &[
            (10_000, 10, (10, 0, 200)),
            (9_900, 1, (0, 0, 200)),  // behind: no refill, last_fill stays 10,000
            (10_100, 1, (0, 0, 100)), // 100 ms since 10,000, not 200 ms since 9,900
            (10_200, 1, (1, 0, 200)),
        ],
    },
    Case {
        name: "50,000/s: every ms brings exactly 50",
        rate: 50_000.0,
        burst: 50_000,
        steps: &[
            (0, 50_000, (50_000, 0, 1)),
            (0, 1, (0, 0, 1)),
            (1, 50, (50, 0, 1)),
            (1, 1, (0, 0, 1)),
            (2, 100, (50, 0, 1)),
            (1002, 100_000, (50_000, 0, 1)), // 1 s refills the whole burst, no more
        ],
    },
];

#[tokio::test]
async fn arithmetic_cases() {
    let keys = Keys::new();
    let mut lab = Lab::shared().await;
    for (n, case) in CASES.iter().enumerate() {
        let key = keys.bucket(&format!("case{n}"));
        let b = Bucket::new(case.rate, case.burst);
        lab.check(case.name, &key, b, case.steps).await;
    }
}

#[tokio::test]
async fn clock_going_backwards_does_not_move_last_fill() {
    let keys = Keys::new();
    let mut lab = Lab::shared().await;
    let key = keys.bucket("user:backwards");
    let b = Bucket::new(5.0, 10);

    lab.check("backwards", &key, b, &[(10_000, 10, (10, 0, 200))]).await;
    assert_eq!(lab.field(&key, "last_fill").await, 10_000.0);

    // 5 s in the past: no refill (a refill from 5,000 would give the bucket 10 tokens).
    lab.check("backwards", &key, b, &[(5_000, 1, (0, 0, 200))]).await;
    assert_eq!(
        lab.field(&key, "last_fill").await,
        10_000.0,
        "last_fill moved backwards"
    );
    assert_eq!(lab.field(&key, "tokens").await, 0.0);

    // Only the 200 ms since 10,000 count: one token, not a full bucket.
    lab.check("backwards", &key, b, &[(10_200, 10, (1, 0, 200))]).await;
    assert_eq!(lab.field(&key, "last_fill").await, 10_200.0);
}

#[tokio::test]
async fn stored_fields_keep_fractions() {
    let keys = Keys::new();
    let mut lab = Lab::shared().await;
    let key = keys.bucket("user:fields");
    let b = Bucket::new(5.0, 10);

    lab.check("fields", &key, b, &[(1_000, 3, (3, 7, 0))]).await;
    assert_eq!(lab.field(&key, "tokens").await, 7.0);
    assert_eq!(lab.field(&key, "last_fill").await, 1_000.0);

    // 100 ms at 5/s is half a token: 7.5 - 1 = 6.5 must be stored, not rounded away.
    lab.check("fields", &key, b, &[(1_100, 1, (1, 6, 0))]).await;
    assert_eq!(lab.field(&key, "tokens").await, 6.5);

    // A third of a token per call (1/3 is not exact in binary) does not drift: after 3,000
    // calls 1 ms apart at 1000/3 per s, exactly 1,000 tokens have arrived.
    let key = keys.bucket("user:third");
    let b = Bucket::new(1000.0 / 3.0, 2000);
    lab.check("third", &key, b, &[(0, 2000, (2000, 0, 3))]).await;
    let mut total = 0;
    for t in 1..=3000 {
        total += lab.take(&key, b, t, 2000).await.0;
    }
    assert_eq!(total, 1000, "1000/3 per s over 3 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_never_overdraw() {
    const TASKS: usize = 32;
    const CALLS: usize = 100;
    const NOW: i64 = 1_700_000_000_000;
    let keys = Keys::new();
    let lab = Lab::shared().await;
    let key = keys.bucket("user:crowd");
    let b = Bucket::new(1.0, 1000);

    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let mut lab = Lab {
            con: lab.con.clone(),
            script: lab.script.clone(),
        };
        let key = key.clone();
        handles.push(tokio::spawn(async move {
            let mut granted = 0;
            for _ in 0..CALLS {
                let (g, left, _) = lab.take(&key, b, NOW, 1).await;
                assert!(g == 0 || g == 1, "granted {g} for a request of 1");
                assert!((0..1000).contains(&left), "left {left}");
                granted += g;
            }
            granted
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await.expect("task panicked");
    }
    assert_eq!(
        total, 1000,
        "{TASKS} x {CALLS} requests at one instant against burst 1000"
    );

    let mut lab = lab;
    assert_eq!(lab.field(&key, "tokens").await, 0.0);
    assert_eq!(lab.take(&key, b, NOW, 1).await, (0, 0, 1000));
}

#[tokio::test]
async fn tokens_arrive_on_the_ms_they_are_due() {
    // Rates as num/den tokens per s, stepped 1 ms at a time, each call asking for all it
    // can get. At every ms the total granted must be exactly floor(t * rate / 1000), worked
    // out here in integers. When nothing is left, t + retry_ms must be the first ms at
    // which the next token is due. Double rounding makes 7 x (7/1000) come out as
    // 6.99999999999988, so a plain floor() would hand over the 7th token 1 ms late.
    const RATES: &[(u64, u64, i64)] = &[
        (7, 1, 2_000),
        (11, 1, 1_000),
        (3, 5, 5_000), // 0.6/s
        (1, 5, 5_000), // 0.2/s
        (1_000, 3, 3_000),
        (1_500, 1, 2_000),
    ];
    let keys = Keys::new();
    let mut lab = Lab::shared().await;
    for (n, &(num, den, ms)) in RATES.iter().enumerate() {
        let key = keys.bucket(&format!("ontime{n}"));
        let burst = 10 + 2 * num.div_ceil(1000 * den);
        let b = Bucket::new(num as f64 / den as f64, burst);
        assert_eq!(lab.take(&key, b, 0, burst).await.0, burst as i64);
        let due = |t: i64| (t as u64 * num / (1000 * den)) as i64; // tokens refilled by t
        let mut total = 0i64;
        for t in 1..=ms {
            let (g, left, retry_ms) = lab.take(&key, b, t, burst).await;
            total += g;
            assert_eq!(total, due(t), "rate {num}/{den}: total granted by t={t} ms");
            assert_eq!(left, 0, "rate {num}/{den} at t={t}");
            let next = (((total as u64 + 1) * 1000 * den).div_ceil(num)) as i64;
            assert_eq!(
                retry_ms,
                next - t,
                "rate {num}/{den} at t={t}: next token due at {next} ms"
            );
        }
    }
}

#[tokio::test]
async fn rate_50000_grants_exactly_50_per_ms() {
    let keys = Keys::new();
    let mut lab = Lab::shared().await;
    let key = keys.bucket("user:fast");
    let b = Bucket::new(50_000.0, 50_000);
    assert_eq!(lab.take(&key, b, 0, 50_000).await, (50_000, 0, 1));
    let mut total = 0;
    for t in 1..=1000 {
        let got = lab.take(&key, b, t, 50).await;
        assert_eq!(got, (50, 0, 1), "at t={t} ms");
        total += got.0;
    }
    assert_eq!(total, 50_000);
}

#[tokio::test]
async fn sustained_high_rates_lose_no_tokens() {
    // (rate per s, burst, simulated ms, in 1 ms steps). Integer per-ms arithmetic
    // (redis-cell#80) would give 1 per ms at 1500/s: 10,000 instead of 15,000.
    const RUNS: &[(f64, u64, i64)] = &[
        (1_500.0, 1_500, 10_000),
        (1_234.5, 2_000, 4_000),
        (999.9, 1_000, 5_000),
        (100_000.0, 100_000, 500),
    ];
    let keys = Keys::new();
    let mut lab = Lab::shared().await;
    for (n, &(rate, burst, ms)) in RUNS.iter().enumerate() {
        let key = keys.bucket(&format!("sustained{n}"));
        let b = Bucket::new(rate, burst);
        let (drained, _, _) = lab.take(&key, b, 0, burst).await;
        assert_eq!(drained, burst as i64);
        let per_ms = rate / 1000.0;
        let mut total = 0i64;
        for t in 1..=ms {
            let (g, _, _) = lab.take(&key, b, t, burst).await;
            assert!(
                g == per_ms.floor() as i64 || g == per_ms.ceil() as i64,
                "rate {rate}: granted {g} at t={t} ms, want {per_ms} rounded down or up"
            );
            total += g;
        }
        let want = rate * ms as f64 / 1000.0;
        assert!(
            (total as f64 - want).abs() <= 1.0,
            "rate {rate}/s over {ms} ms granted {total}, want {want} ± 1"
        );
    }
}

#[tokio::test]
async fn ttl_is_set_on_every_call_and_idle_keys_expire() {
    let keys = Keys::new();
    let mut lab = Lab::shared().await;
    let key = keys.bucket("user:ttl");
    let mut b = Bucket::new(5.0, 10);

    b.ttl_ms = 60_000;
    lab.take(&key, b, 0, 1).await;
    let pttl = lab.pttl(&key).await;
    assert!(0 < pttl && pttl <= 60_000, "PTTL {pttl} after ttl 60000");

    b.ttl_ms = 5_000;
    lab.take(&key, b, 0, 1).await;
    let pttl = lab.pttl(&key).await;
    assert!(0 < pttl && pttl <= 5_000, "PTTL {pttl} after ttl 5000");

    // A call that grants nothing still refreshes the TTL.
    b.ttl_ms = 120_000;
    lab.take(&key, b, 0, 100).await;
    assert_eq!(lab.take(&key, b, 0, 1).await, (0, 0, 200));
    let pttl = lab.pttl(&key).await;
    assert!(60_000 < pttl && pttl <= 120_000, "PTTL {pttl} after ttl 120000");

    // Idle past the TTL: the key is gone, and the bucket comes back full.
    b.ttl_ms = 50;
    lab.take(&key, b, 0, 1).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while lab.exists(&key).await {
        assert!(Instant::now() < deadline, "key with a 50 ms TTL still exists");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lab.take(&key, b, 0, 1).await, (1, 9, 0));
}

#[tokio::test]
async fn bad_arguments_are_redis_errors() {
    // ARGV: rate, burst, now_ms, requested, ttl_ms.
    const BAD: &[(&str, &[&str])] = &[
        ("rate not a number", &["fast", "10", "0", "1", "1000"]),
        ("rate empty", &["", "10", "0", "1", "1000"]),
        ("rate zero", &["0", "10", "0", "1", "1000"]),
        ("rate negative", &["-5", "10", "0", "1", "1000"]),
        ("rate nan", &["nan", "10", "0", "1", "1000"]),
        ("rate inf", &["inf", "10", "0", "1", "1000"]),
        ("burst zero", &["5", "0", "0", "1", "1000"]),
        ("burst negative", &["5", "-10", "0", "1", "1000"]),
        ("burst fractional", &["5", "1.5", "0", "1", "1000"]),
        ("burst not a number", &["5", "ten", "0", "1", "1000"]),
        ("now not a number", &["5", "10", "yesterday", "1", "1000"]),
        ("now inf", &["5", "10", "inf", "1", "1000"]),
        ("requested zero", &["5", "10", "0", "0", "1000"]),
        ("requested negative", &["5", "10", "0", "-1", "1000"]),
        ("requested fractional", &["5", "10", "0", "0.5", "1000"]),
        ("ttl zero", &["5", "10", "0", "1", "0"]),
        ("ttl negative", &["5", "10", "0", "1", "-1"]),
        ("ttl not a number", &["5", "10", "0", "1", "forever"]),
        ("too few arguments", &["5", "10", "0", "1"]),
        ("too many arguments", &["5", "10", "0", "1", "1000", "extra"]),
    ];
    let keys = Keys::new();
    let mut lab = Lab::shared().await;
    let key = keys.bucket("user:bad");
    for &(what, args) in BAD {
        match lab.try_call(&[&key], args).await {
            Ok(reply) => panic!("{what}: {args:?} was accepted: {reply:?}"),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::ResponseError, "{what}: {e}");
                assert!(
                    e.to_string().contains("token_bucket"),
                    "{what}: error does not name the script: {e}"
                );
            }
        }
        assert!(!lab.exists(&key).await, "{what}: a rejected call wrote the key");
    }

    // The wrong number of keys.
    let other = keys.bucket("user:bad2");
    let args = ["5", "10", "0", "1", "1000"];
    for ks in [vec![], vec![key.as_str(), other.as_str()]] {
        let e = lab.try_call(&ks, &args).await.unwrap_err();
        assert!(e.to_string().contains("token_bucket"), "{} keys: {e}", ks.len());
    }
    assert!(!lab.exists(&key).await && !lab.exists(&other).await);

    // The same arguments, made valid, work.
    assert_eq!(lab.try_call(&[&key], &args).await.unwrap(), (1, 9, 0));
}

#[tokio::test]
async fn script_load_and_evalsha_on_the_shared_server() {
    let keys = Keys::new();
    let mut lab = Lab::shared().await;
    let key = keys.bucket("user:evalsha");
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(SRC)
        .query_async(&mut lab.con)
        .await
        .unwrap();
    assert_eq!(sha, lab.script.get_hash());
    let got: Reply = evalsha(&mut lab.con, &sha, &key, 0).await.unwrap();
    assert_eq!(got, (1, 9, 0));
    let got: Reply = evalsha(&mut lab.con, &sha, &key, 0).await.unwrap();
    assert_eq!(got, (1, 8, 0));
}

async fn evalsha(con: &mut MultiplexedConnection, sha: &str, key: &str, now: i64) -> RedisResult<Reply> {
    redis::cmd("EVALSHA")
        .arg(sha)
        .arg(1)
        .arg(key)
        .arg(5.0)
        .arg(10)
        .arg(now)
        .arg(1)
        .arg(60_000)
        .query_async(con)
        .await
}

/// A throwaway `redis-server` on a free loopback port, killed on drop.

#[tokio::test]
async fn noscript_after_script_flush_is_recovered() {
    let server = PrivateRedis::start(free_port());
    let mut lab = Lab::connect(&server.url()).await;
    let key = "enrolld:test:private:tb:{user:noscript}"; // a private server: no cleanup

    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(SRC)
        .query_async(&mut lab.con)
        .await
        .unwrap();
    assert_eq!(sha, lab.script.get_hash());
    assert_eq!(evalsha(&mut lab.con, &sha, key, 0).await.unwrap(), (1, 9, 0));

    // What a Redis restart or failover does to the script cache.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut lab.con)
        .await
        .unwrap();
    let e = evalsha(&mut lab.con, &sha, key, 0).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoScriptError, "{e}");
    assert_eq!(e.code(), Some("NOSCRIPT"), "{e}");
    let exists: Vec<i64> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(&sha)
        .query_async(&mut lab.con)
        .await
        .unwrap();
    assert_eq!(exists, vec![0]);

    // invoke_async: EVALSHA, NOSCRIPT, SCRIPT LOAD, EVALSHA again, all in one call. The
    // bucket kept its state through the flush (1 more token gone, not a fresh bucket).
    let b = Bucket {
        rate: 5.0,
        burst: 10,
        ttl_ms: 60_000,
    };
    assert_eq!(lab.take(key, b, 0, 1).await, (1, 8, 0));
    let exists: Vec<i64> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(&sha)
        .query_async(&mut lab.con)
        .await
        .unwrap();
    assert_eq!(exists, vec![1], "invoke_async did not load the script again");
    assert_eq!(evalsha(&mut lab.con, &sha, key, 0).await.unwrap(), (1, 7, 0));
    drop(server);
}
