//! In-process token buckets by key (student, IP segment), shared by all shards.
//!
//! Why: a student's requests land on any shard, so their bucket is shared; a striped map
//! (64 stripes under `parking_lot` mutexes) keeps that off any global lock, and a hard cap
//! on keys keeps a flood of distinct keys (governor #171) from exhausting memory.
//! Eviction first forgets buckets that have refilled to full (losing nothing: a new bucket
//! starts full), and only under a flood of live keys forgets the least recently used half
//! of a stripe.
//! Must never: hold a stripe lock across anything but the map operation.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::bucket::{Rate, TokenBucket};

/// Stripes of one keyed map; a power of two.
const STRIPES: usize = 64;
const _: () = assert!(STRIPES.is_power_of_two());

/// One stripe: key hash → its bucket and the rate it was last taken at.
type Stripe = HashMap<u64, (TokenBucket, Rate)>;

pub struct KeyedBuckets {
    stripes: Box<[Mutex<Stripe>]>,
    stripe_keys_max: usize,
    hasher: std::collections::hash_map::RandomState,
    evicted_live: AtomicU64,
}

impl KeyedBuckets {
    /// A map holding at most `keys_max` keys (rounded up to a multiple of the stripes).
    pub fn new(keys_max: usize) -> KeyedBuckets {
        KeyedBuckets {
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            stripe_keys_max: keys_max.div_ceil(STRIPES).max(1),
            hasher: Default::default(),
            evicted_live: AtomicU64::new(0),
        }
    }

    /// Takes one token from `key`'s bucket (made full on first sight).
    pub fn take(&self, key: impl Hash, rate: &Rate, now_ms: i64) -> bool {
        self.take_or_wait(key, rate, now_ms).is_ok()
    }

    /// Takes one token, or says how many milliseconds until one is there.
    pub fn take_or_wait(&self, key: impl Hash, rate: &Rate, now_ms: i64) -> Result<(), u64> {
        let h = self.hasher.hash_one(key);
        let mut stripe = self.stripes[(h >> 58) as usize % STRIPES].lock();
        if let Some((bucket, r)) = stripe.get_mut(&h) {
            *r = *rate;
            return if bucket.take(rate, now_ms, 1) {
                Ok(())
            } else {
                Err(bucket.wait_ms(rate, 1))
            };
        }
        if stripe.len() >= self.stripe_keys_max {
            self.evict(&mut stripe, now_ms);
        }
        let mut bucket = TokenBucket::full(rate, now_ms);
        let ok = bucket.take(rate, now_ms, 1);
        stripe.insert(h, (bucket, *rate));
        if ok {
            Ok(())
        } else {
            Err(bucket.wait_ms(rate, 1))
        }
    }

    fn evict(&self, stripe: &mut Stripe, now_ms: i64) {
        stripe.retain(|_, (b, r)| !b.is_full_by(r, now_ms));
        if stripe.len() < (self.stripe_keys_max * 7 / 8).max(1) {
            return;
        }
        // A flood of live keys: forget the least recently used half.
        let mut lasts: Vec<i64> = stripe.values().map(|(b, _)| b.last_ms()).collect();
        let mid = lasts.len() / 2;
        let (_, cutoff, _) = lasts.select_nth_unstable(mid);
        let cutoff = *cutoff;
        let before = stripe.len();
        stripe.retain(|_, (b, _)| b.last_ms() > cutoff);
        self.evicted_live
            .fetch_add((before - stripe.len()) as u64, Ordering::Relaxed);
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.stripes.iter().map(|s| s.lock().len()).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Live buckets forgotten under a flood so far.
    pub fn evicted_live(&self) -> u64 {
        self.evicted_live.load(Ordering::Relaxed)
    }
    /// The tokens left, summed over the held buckets (a gauge for operators).
    pub fn tokens_total(&self) -> f64 {
        self.stripes
            .iter()
            .map(|s| s.lock().values().map(|(b, _)| b.tokens()).sum::<f64>())
            .sum()
    }
    /// The most keys it will hold.
    pub fn keys_max(&self) -> usize {
        self.stripe_keys_max * STRIPES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_key() {
        let m = KeyedBuckets::new(1000);
        let r = Rate { per_sec: 1.0, burst: 3 };
        for _ in 0..3 {
            assert!(m.take("a", &r, 0));
        }
        assert!(!m.take("a", &r, 0));
        assert!(m.take("b", &r, 0), "keys are independent");
        assert!(m.take("a", &r, 1000));
    }

    /// governor #171: a flood of distinct keys must not grow memory without bound.
    #[test]
    fn a_million_distinct_keys_stay_bounded() {
        let keys_max = 100_000;
        let m = KeyedBuckets::new(keys_max);
        let r = Rate {
            per_sec: 5.0,
            burst: 10,
        };
        for i in 0..1_000_000u64 {
            assert!(m.take(i, &r, (i / 1000) as i64), "a new key starts full");
        }
        assert!(m.len() <= m.keys_max(), "{} keys held, cap {}", m.len(), m.keys_max());
        assert!(m.len() >= keys_max / 4, "eviction keeps recent keys ({})", m.len());
        // A recent, drained key is still limited after the flood.
        let hot = 999_999u64;
        for _ in 0..9 {
            m.take(hot, &r, 999);
        }
        assert!(!m.take(hot, &r, 999));
    }

    #[test]
    fn idle_full_buckets_are_forgotten_first() {
        let m = KeyedBuckets::new(64_000);
        let r = Rate {
            per_sec: 100.0,
            burst: 1,
        };
        for i in 0..40_000u64 {
            m.take(i, &r, 0);
        }
        // Long after, every old bucket is full again: new keys replace them losslessly.
        for i in 100_000..140_000u64 {
            m.take(i, &r, 10_000);
        }
        assert_eq!(m.evicted_live(), 0);
        assert!(m.len() <= m.keys_max());
        assert!(m.len() < 80_000, "old keys were forgotten ({})", m.len());
    }
}
