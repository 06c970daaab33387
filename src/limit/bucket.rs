//! The token bucket arithmetic, shared by the in-process buckets and mirrored by
//! `lua/token_bucket.lua`.
//!
//! Why: one definition of refill and take, in floating point (exact well past 1,000
//! tokens/s, where integer per-millisecond arithmetic loses tokens: redis-cell #80), that
//! never refills on a clock that went backwards.

use serde::Deserialize;

/// A rate and its burst.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Tokens added per second.
    pub per_sec: f64,
    /// Capacity: the most tokens a bucket holds (and so the largest burst).
    pub burst: u32,
}

impl Rate {
    pub fn per_minute(n: f64, burst: u32) -> Rate {
        Rate {
            per_sec: n / 60.0,
            burst,
        }
    }
    pub fn is_valid(&self) -> bool {
        self.per_sec.is_finite() && self.per_sec > 0.0 && self.burst >= 1
    }
    /// Milliseconds an empty bucket takes to fill.
    pub fn fill_ms(&self) -> f64 {
        f64::from(self.burst) * 1000.0 / self.per_sec
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    last_ms: i64,
}

impl TokenBucket {
    pub fn full(rate: &Rate, now_ms: i64) -> TokenBucket {
        TokenBucket {
            tokens: f64::from(rate.burst),
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, rate: &Rate, now_ms: i64) {
        if now_ms > self.last_ms {
            let added = (now_ms - self.last_ms) as f64 * rate.per_sec / 1000.0;
            self.tokens = (self.tokens + added).min(f64::from(rate.burst));
            self.last_ms = now_ms;
        }
    }

    /// Takes `n` tokens if the bucket holds them.
    pub fn take(&mut self, rate: &Rate, now_ms: i64, n: u32) -> bool {
        self.refill(rate, now_ms);
        if self.tokens >= f64::from(n) {
            self.tokens -= f64::from(n);
            true
        } else {
            false
        }
    }

    /// Milliseconds until `n` tokens are there (as of the last refill).
    pub fn wait_ms(&self, rate: &Rate, n: u32) -> u64 {
        let missing = f64::from(n) - self.tokens;
        if missing <= 0.0 {
            0
        } else {
            (missing * 1000.0 / rate.per_sec).ceil() as u64
        }
    }

    /// Whether the bucket would be full by `now_ms`: forgetting it then loses nothing.
    pub fn is_full_by(&self, rate: &Rate, now_ms: i64) -> bool {
        let missing = f64::from(rate.burst) - self.tokens;
        (now_ms - self.last_ms) as f64 >= missing / f64::from(rate.burst) * rate.fill_ms()
    }

    pub fn tokens(&self) -> f64 {
        self.tokens
    }
    pub fn last_ms(&self) -> i64 {
        self.last_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refill_take_and_clock_going_back() {
        let r = Rate {
            per_sec: 5.0,
            burst: 10,
        };
        let mut b = TokenBucket::full(&r, 0);
        assert!(b.take(&r, 0, 10));
        assert!(!b.take(&r, 0, 1));
        assert!(!b.take(&r, 199, 1));
        assert!(b.take(&r, 200, 1));
        assert!(!b.take(&r, 100, 1), "a clock going back refills nothing");
        assert_eq!(b.last_ms(), 200);
        assert!(b.take(&r, 3_600_000, 10));
        assert!(!b.take(&r, 3_600_000, 1), "refill is capped at burst");
    }

    #[test]
    fn high_rates_are_exact() {
        let r = Rate {
            per_sec: 50_000.0,
            burst: 50_000,
        };
        let mut b = TokenBucket::full(&r, 0);
        assert!(b.take(&r, 0, 50_000));
        for t in 1..=1_000 {
            assert!(b.take(&r, t, 50), "at {t} ms");
            assert!(!b.take(&r, t, 1), "at {t} ms");
        }
    }

    #[test]
    fn full_by() {
        let r = Rate {
            per_sec: 10.0,
            burst: 10,
        };
        let mut b = TokenBucket::full(&r, 0);
        assert!(b.is_full_by(&r, 0));
        b.take(&r, 0, 5);
        assert!(!b.is_full_by(&r, 499));
        assert!(b.is_full_by(&r, 500));
    }
}
