//! Flow rules per route (Sentinel-style): a QPS threshold that rejects, or queues requests
//! and paces them evenly up to `max_queue_ms`; an optional warm-up; and adaptive shedding
//! when in-flight requests pass a bound.
//!
//! Why: a rush is far more requests than the node should start at once; pacing turns a
//! spike into an even stream and a clear 429 with `Retry-After` for what would wait too
//! long. Each shard paces its share of the threshold (`qps / shards`) with no shared state.
//! Must never: hold a request longer than `max_queue_ms`.

use std::cell::Cell;
use std::time::{Duration, Instant};

use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Behaviour {
    Reject,
    Queue,
}

/// One route's rule. `qps = 0` turns it off.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowRule {
    /// Requests per second admitted on this node.
    pub qps: f64,
    pub behaviour: Behaviour,
    /// Longest a queued request waits before it gets 429 instead.
    pub max_queue_ms: u64,
    /// After an idle spell, the threshold ramps from a third of `qps` to `qps` over this
    /// time (0: no warm-up).
    pub warmup_ms: u64,
}

impl Default for FlowRule {
    fn default() -> Self {
        FlowRule {
            qps: 0.0,
            behaviour: Behaviour::Queue,
            max_queue_ms: 500,
            warmup_ms: 0,
        }
    }
}

/// Warm-up starts at `qps / WARMUP_COLD_FACTOR` (Sentinel's cold factor).
const WARMUP_COLD_FACTOR: f64 = 3.0;

/// The smallest `qps` a rule may set other than 0 (off): one request per 1,000 s on the
/// node. Validation refuses a rule below it (a tiny rate is a typo, not a policy).
pub const FLOW_QPS_MIN: f64 = 0.001;

/// The longest gap a pacer puts between two requests. The floor gives at most
/// `SHARDS_MAX * WARMUP_COLD_FACTOR / FLOW_QPS_MIN` s (under 9 days); the cap only keeps
/// the arithmetic finite for a rule that never went through validation.
const FLOW_INTERVAL_MAX: Duration = Duration::from_secs(30 * 86_400);
const _: () =
    assert!(crate::ids::SHARDS_MAX as f64 * WARMUP_COLD_FACTOR / FLOW_QPS_MIN <= FLOW_INTERVAL_MAX.as_secs() as f64);

/// The gap between two requests at `qps_per_shard`, for any value at all: no rate is so
/// small (or NaN) that it panics, none so large that it is negative.
fn pacing_interval(qps_per_shard: f64) -> Duration {
    Duration::try_from_secs_f64(1.0 / qps_per_shard).map_or(FLOW_INTERVAL_MAX, |d| d.min(FLOW_INTERVAL_MAX))
}

#[derive(Debug, PartialEq, Eq)]
pub enum FlowDecision {
    Pass,
    /// Pass after this wait.
    Wait(Duration),
    Reject,
}

/// One shard's pacer for one route.
pub struct Pacer {
    next_slot: Cell<Option<Instant>>,
    warm_since: Cell<Option<Instant>>,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer {
            next_slot: Cell::new(None),
            warm_since: Cell::new(None),
        }
    }
}

impl Pacer {
    /// Decides for a request arriving `now`, with the node-wide rule split over `shards`.
    pub fn admit(&self, rule: &FlowRule, shards: usize, now: Instant) -> FlowDecision {
        if rule.qps <= 0.0 {
            return FlowDecision::Pass;
        }
        let interval = pacing_interval(self.warmed_qps(rule, now) / shards as f64);
        let slot = match self.next_slot.get() {
            Some(next) if next > now => next,
            _ => now,
        };
        let wait = slot - now;
        let limit = match rule.behaviour {
            Behaviour::Reject => Duration::ZERO,
            Behaviour::Queue => Duration::from_millis(rule.max_queue_ms),
        };
        if wait > limit {
            return FlowDecision::Reject;
        }
        // The interval is capped, so this cannot overflow; were it to, pace from `slot`.
        self.next_slot.set(Some(slot.checked_add(interval).unwrap_or(slot)));
        if wait.is_zero() {
            FlowDecision::Pass
        } else {
            FlowDecision::Wait(wait)
        }
    }

    fn warmed_qps(&self, rule: &FlowRule, now: Instant) -> f64 {
        if rule.warmup_ms == 0 {
            return rule.qps;
        }
        let warmup = Duration::from_millis(rule.warmup_ms);
        // Idle (no slot in use for a whole warm-up period): start cold again.
        let idle = self
            .next_slot
            .get()
            .is_none_or(|n| now.saturating_duration_since(n) >= warmup);
        if idle || self.warm_since.get().is_none() {
            self.warm_since.set(Some(now));
        }
        let since = now.saturating_duration_since(self.warm_since.get().unwrap_or(now));
        let progress = (since.as_secs_f64() / warmup.as_secs_f64()).min(1.0);
        rule.qps * (1.0 / WARMUP_COLD_FACTOR + (1.0 - 1.0 / WARMUP_COLD_FACTOR) * progress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_paces_evenly_then_rejects() {
        let p = Pacer::default();
        let rule = FlowRule {
            qps: 100.0,
            behaviour: Behaviour::Queue,
            max_queue_ms: 50,
            warmup_ms: 0,
        };
        let t = Instant::now();
        assert_eq!(p.admit(&rule, 1, t), FlowDecision::Pass);
        for i in 1..=5 {
            assert_eq!(p.admit(&rule, 1, t), FlowDecision::Wait(Duration::from_millis(10 * i)));
        }
        assert_eq!(p.admit(&rule, 1, t), FlowDecision::Reject, "60 ms would exceed 50");
        assert_eq!(p.admit(&rule, 1, t + Duration::from_millis(60)), FlowDecision::Pass);
    }

    #[test]
    fn reject_mode_and_shard_split() {
        let p = Pacer::default();
        let rule = FlowRule {
            qps: 200.0,
            behaviour: Behaviour::Reject,
            max_queue_ms: 500,
            warmup_ms: 0,
        };
        let t = Instant::now();
        assert_eq!(p.admit(&rule, 2, t), FlowDecision::Pass);
        assert_eq!(p.admit(&rule, 2, t), FlowDecision::Reject);
        assert_eq!(
            p.admit(&rule, 2, t + Duration::from_millis(10)),
            FlowDecision::Pass,
            "100/s per shard"
        );
    }

    #[test]
    fn warm_up_starts_at_a_third() {
        let p = Pacer::default();
        let rule = FlowRule {
            qps: 300.0,
            behaviour: Behaviour::Reject,
            max_queue_ms: 0,
            warmup_ms: 1000,
        };
        let t = Instant::now();
        assert_eq!(p.admit(&rule, 1, t), FlowDecision::Pass);
        // Cold: 100/s, so the next slot is 10 ms away, not 3.3.
        assert_eq!(p.admit(&rule, 1, t + Duration::from_millis(5)), FlowDecision::Reject);
        assert_eq!(p.admit(&rule, 1, t + Duration::from_millis(10)), FlowDecision::Pass);
    }

    #[test]
    fn no_rate_panics_the_pacer() {
        // 1e-20 once panicked in Duration::from_secs_f64 (validation now refuses it, but a
        // request must never be the thing that finds out).
        let t = Instant::now();
        for qps in [
            1e-20,
            f64::MIN_POSITIVE,
            5e-324,
            f64::NAN,
            f64::INFINITY,
            f64::MAX,
            FLOW_QPS_MIN,
        ] {
            for warmup_ms in [0, 1000] {
                let p = Pacer::default();
                let rule = FlowRule {
                    qps,
                    behaviour: Behaviour::Queue,
                    max_queue_ms: u64::MAX,
                    warmup_ms,
                };
                for i in 0..3 {
                    p.admit(&rule, crate::ids::SHARDS_MAX, t + Duration::from_millis(i));
                }
            }
        }
        assert_eq!(pacing_interval(1e-20), FLOW_INTERVAL_MAX);
        assert_eq!(pacing_interval(f64::NAN), FLOW_INTERVAL_MAX);
        assert_eq!(pacing_interval(f64::INFINITY), Duration::ZERO);
        assert_eq!(pacing_interval(FLOW_QPS_MIN), Duration::from_secs(1000));
    }

    #[test]
    fn the_floor_still_paces() {
        let p = Pacer::default();
        let rule = FlowRule {
            qps: FLOW_QPS_MIN,
            behaviour: Behaviour::Reject,
            max_queue_ms: 0,
            warmup_ms: 0,
        };
        let t = Instant::now();
        assert_eq!(p.admit(&rule, 1, t), FlowDecision::Pass);
        assert_eq!(p.admit(&rule, 1, t + Duration::from_secs(999)), FlowDecision::Reject);
        assert_eq!(p.admit(&rule, 1, t + Duration::from_secs(1000)), FlowDecision::Pass);
    }

    #[test]
    fn zero_qps_is_off() {
        let p = Pacer::default();
        let t = Instant::now();
        for _ in 0..1000 {
            assert_eq!(p.admit(&FlowRule::default(), 1, t), FlowDecision::Pass);
        }
    }
}
