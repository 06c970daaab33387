//! Cross-node token buckets in Redis (`lua/token_bucket.lua`), leased in batches.
//!
//! Why: limits that must hold across nodes live in Redis, but a Redis round trip per
//! request would put Redis on the hot path (and one hot key on one Redis node). So a shard
//! leases up to `lease_tokens` tokens at once from the shared bucket and spends them
//! locally until they run out or `lease_ttl_ms` passes. The trade: the cluster never
//! admits more than the Redis bucket grants (leases come out of it), but a node can hold
//! tokens it does not use for up to `lease_ttl_ms` while another node is refused, so the
//! cluster may admit up to `lease_tokens × shards × nodes` fewer than the rate in that
//! window. Only requests that could take a seat come here.
//! Must never: fail a request because Redis is down: the breaker opens, callers get
//! `None` and fall back to the local buckets, and a log line and a metric say so.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::breaker::{Breaker, Call};
use super::bucket::Rate;

/// Leases one shard keeps at most.
const LEASES_MAX: usize = 100_000;
/// Time allowed to connect to Redis.
const CONNECT_TIMEOUT_MS: u64 = 500;
/// Extra life of an idle bucket key beyond the time it takes to refill.
const KEY_TTL_SLACK_MS: u64 = 1_000;
/// Time allowed for one script call.
const CALL_TIMEOUT_MS: u64 = 200;

/// Process-wide Redis state.
pub struct RedisShared {
    client: redis::Client,
    /// Every bucket key starts with it (`redis_prefix`).
    prefix: String,
    script: redis::Script,
    pub breaker: Arc<Breaker>,
    fallbacks: AtomicU64,
}

impl RedisShared {
    pub fn new(url: &str, prefix: &str, breaker: Arc<Breaker>) -> redis::RedisResult<RedisShared> {
        Ok(RedisShared {
            client: redis::Client::open(url)?,
            prefix: prefix.to_string(),
            script: redis::Script::new(include_str!("../../lua/token_bucket.lua")),
            breaker,
            fallbacks: AtomicU64::new(0),
        })
    }
    /// Requests decided by local buckets alone because Redis was not usable.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }
}

struct Lease {
    tokens: u32,
    expires_ms: i64,
}

/// One shard's connection and leases.
pub struct RedisLink {
    shared: Arc<RedisShared>,
    conn: RefCell<Option<redis::aio::MultiplexedConnection>>,
    leases: RefCell<HashMap<String, Lease>>,
}

impl RedisLink {
    pub fn new(shared: Arc<RedisShared>) -> RedisLink {
        RedisLink {
            shared,
            conn: RefCell::new(None),
            leases: RefCell::new(HashMap::new()),
        }
    }

    /// Takes a token for `key` (e.g. `user:alice`). `None`: Redis is not usable now; the
    /// caller relies on its local buckets.
    pub async fn take(
        &self,
        key: &str,
        rate: &Rate,
        lease_tokens: u32,
        lease_ttl_ms: u64,
        now_ms: i64,
    ) -> Option<bool> {
        if let Some(lease) = self.leases.borrow_mut().get_mut(key) {
            if lease.tokens > 0 && lease.expires_ms > now_ms {
                lease.tokens -= 1;
                return Some(true);
            }
        }
        if !self.shared.breaker.allow() {
            return None;
        }
        let started = Instant::now();
        let granted = match self
            .call(key, rate, lease_tokens.clamp(1, rate.burst), lease_ttl_ms, now_ms)
            .await
        {
            Ok(g) => {
                self.shared.breaker.record(Call::Ok, started.elapsed());
                g
            }
            Err(call) => {
                self.shared.breaker.record(call, started.elapsed());
                return None;
            }
        };
        let mut leases = self.leases.borrow_mut();
        if leases.len() >= LEASES_MAX {
            leases.retain(|_, l| l.tokens > 0 && l.expires_ms > now_ms);
            if leases.len() >= LEASES_MAX {
                leases.clear();
            }
        }
        if granted == 0 {
            leases.remove(key);
            return Some(false);
        }
        leases.insert(
            key.to_string(),
            Lease {
                tokens: granted - 1,
                expires_ms: now_ms + lease_ttl_ms as i64,
            },
        );
        Some(true)
    }

    /// Counts one seat request that local buckets alone decided.
    pub fn note_fallback(&self) {
        let n = self.shared.fallbacks.fetch_add(1, Ordering::Relaxed);
        if n % 10_000 == 0 {
            tracing::warn!(
                fallbacks = n + 1,
                "Redis unavailable: cross-node limits fall back to local buckets"
            );
        }
    }

    async fn call(&self, key: &str, rate: &Rate, n: u32, lease_ttl_ms: u64, now_ms: i64) -> Result<u32, Call> {
        let ttl_ms = lease_ttl_ms;
        let existing = self.conn.borrow().clone();
        let mut conn = match existing {
            Some(c) => c,
            None => {
                let connecting = self.shared.client.get_multiplexed_async_connection();
                let c = match tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connecting).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "Redis connect failed");
                        return Err(Call::Unreachable);
                    }
                    Err(_) => return Err(Call::Unreachable),
                };
                *self.conn.borrow_mut() = Some(c.clone());
                c
            }
        };
        let mut invocation = self.shared.script.key(format!("{}tb:{{{key}}}", self.shared.prefix));
        // The key may expire only once an idle bucket would be full again anyway: an
        // earlier expiry would hand back a full burst too soon.
        let key_ttl_ms = ttl_ms.max(rate.fill_ms().ceil() as u64 + KEY_TTL_SLACK_MS);
        invocation
            .arg(rate.per_sec)
            .arg(rate.burst)
            .arg(now_ms)
            .arg(n)
            .arg(key_ttl_ms);
        // `invoke_async` runs EVALSHA and, on NOSCRIPT (a restart or failover emptied the
        // script cache), loads the script and retries.
        let call = invocation.invoke_async::<(u32, i64, i64)>(&mut conn);
        match tokio::time::timeout(Duration::from_millis(CALL_TIMEOUT_MS), call).await {
            Ok(Ok((granted, _left, _retry_ms))) => Ok(granted),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "Redis token bucket call failed");
                if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
                    *self.conn.borrow_mut() = None;
                    Err(Call::Unreachable)
                } else {
                    Err(Call::Failed)
                }
            }
            Err(_) => {
                *self.conn.borrow_mut() = None;
                Err(Call::Failed)
            }
        }
    }
}
