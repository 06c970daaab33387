//! Circuit breakers around the store and Redis: closed → open → half-open → closed.
//!
//! Why: when a dependency fails or slows down, callers should stop waiting on it at once
//! (the store: 503 without holding a seat; Redis: fall back to local buckets) and probe it
//! now and then instead of hammering it. A breaker opens when, over its last
//! `window_calls` calls (at least `calls_min`), the share of errors or of slow calls passes
//! its bound, or at once on a connection failure; after `open_ms` it lets one probe through
//! (half-open), whose result closes or reopens it.
//! Must never: be consulted per request on the hot path with a lock: callers read the
//! state through an atomic ([`Breaker::is_open`]); the mutex is taken per dependency call.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

// tokio's Instant: the system's monotonic clock in production, the paused test clock in
// the simulation, so the breaker's timing is part of what a seed replays.
use tokio::time::Instant;

use parking_lot::Mutex;
use serde::Deserialize;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Calls remembered for the ratios.
    pub window_calls: usize,
    /// Calls needed in the window before a ratio can open the breaker.
    pub calls_min: usize,
    /// Share of failed calls that opens it.
    pub error_ratio_max: f64,
    /// Share of slow calls that opens it.
    pub slow_ratio_max: f64,
    /// A call slower than this is slow.
    pub slow_call_ms: u64,
    /// Time it stays open before a probe.
    pub open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window_calls: 50,
            calls_min: 10,
            error_ratio_max: 0.5,
            slow_ratio_max: 0.8,
            slow_call_ms: 1_000,
            open_ms: 2_000,
        }
    }
}

pub const CLOSED: u8 = 0;
pub const HALF_OPEN: u8 = 1;
pub const OPEN: u8 = 2;

/// How a call went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Ok,
    /// Failed; the dependency may still be there.
    Failed,
    /// Could not reach the dependency at all: open at once.
    Unreachable,
}

struct Inner {
    calls: VecDeque<(bool, bool)>,
    opened_at: Option<Instant>,
    probe_in_flight: bool,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Breaker({}, state {})", self.name, self.state())
    }
}

pub struct Breaker {
    pub name: &'static str,
    cfg: Mutex<BreakerConfig>,
    state: AtomicU8,
    inner: Mutex<Inner>,
}

impl Breaker {
    pub fn new(name: &'static str, cfg: BreakerConfig) -> Breaker {
        Breaker {
            name,
            cfg: Mutex::new(cfg),
            state: AtomicU8::new(CLOSED),
            inner: Mutex::new(Inner {
                calls: VecDeque::new(),
                opened_at: None,
                probe_in_flight: false,
            }),
        }
    }

    pub fn reconfigure(&self, cfg: BreakerConfig) {
        *self.cfg.lock() = cfg;
    }

    /// `CLOSED`, `HALF_OPEN` or `OPEN` (a plain atomic read).
    pub fn state(&self) -> u8 {
        self.state.load(Ordering::Relaxed)
    }
    pub fn is_open(&self) -> bool {
        self.state() == OPEN
    }

    /// Whether a call may go to the dependency now. Open: no, until `open_ms` passed, then
    /// one probe (half-open) and no other call until it reports.
    pub fn allow(&self) -> bool {
        if self.state() == CLOSED {
            return true;
        }
        let open_ms = self.cfg.lock().open_ms;
        let mut inner = self.inner.lock();
        if inner.probe_in_flight {
            return false;
        }
        match inner.opened_at {
            Some(at) if at.elapsed() < Duration::from_millis(open_ms) => false,
            _ => {
                inner.probe_in_flight = true;
                self.set(HALF_OPEN);
                true
            }
        }
    }

    /// A call that counts as slow.
    pub fn slow_call(&self) -> Duration {
        Duration::from_millis(self.cfg.lock().slow_call_ms)
    }

    /// A call has been in progress longer than a slow call and has not ended: open now,
    /// without waiting for it (a COMMIT that hangs never reports). Its [`Breaker::record`]
    /// comes when it ends.
    pub fn stalled(&self) {
        let mut inner = self.inner.lock();
        if self.state() != OPEN {
            inner.opened_at = Some(Instant::now());
            inner.calls.clear();
            self.set(OPEN);
        }
    }

    /// Reports a call that `allow` let through.
    pub fn record(&self, call: Call, elapsed: Duration) {
        let cfg = self.cfg.lock().clone();
        let mut inner = self.inner.lock();
        let slow = elapsed >= Duration::from_millis(cfg.slow_call_ms);
        if inner.probe_in_flight {
            inner.probe_in_flight = false;
            inner.calls.clear();
            if call == Call::Ok && !slow {
                self.close(&mut inner);
            } else {
                inner.opened_at = Some(Instant::now());
                self.set(OPEN);
            }
            return;
        }
        inner.calls.push_back((call != Call::Ok, slow));
        while inner.calls.len() > cfg.window_calls.max(1) {
            inner.calls.pop_front();
        }
        let n = inner.calls.len();
        let failed = inner.calls.iter().filter(|c| c.0).count();
        let slow_n = inner.calls.iter().filter(|c| c.1).count();
        let ratio_trips = n >= cfg.calls_min
            && (failed as f64 / n as f64 >= cfg.error_ratio_max || slow_n as f64 / n as f64 >= cfg.slow_ratio_max);
        if self.state() == CLOSED && (call == Call::Unreachable || ratio_trips) {
            inner.opened_at = Some(Instant::now());
            inner.calls.clear();
            self.set(OPEN);
        }
    }

    fn close(&self, inner: &mut Inner) {
        inner.opened_at = None;
        self.set(CLOSED);
    }

    fn set(&self, state: u8) {
        let before = self.state.swap(state, Ordering::Relaxed);
        if before != state {
            let name = ["closed", "half-open", "open"][usize::from(state)];
            tracing::warn!(breaker = self.name, state = name, "circuit breaker changed state");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> BreakerConfig {
        BreakerConfig {
            window_calls: 10,
            calls_min: 4,
            open_ms: 30,
            ..Default::default()
        }
    }

    #[test]
    fn opens_on_error_ratio_then_probes_and_closes() {
        let b = Breaker::new("t", quick());
        let ms = Duration::from_millis(1);
        for _ in 0..3 {
            assert!(b.allow());
            b.record(Call::Failed, ms);
        }
        assert_eq!(b.state(), CLOSED, "not enough calls yet");
        b.record(Call::Failed, ms);
        assert_eq!(b.state(), OPEN);
        assert!(!b.allow(), "open refuses");
        std::thread::sleep(Duration::from_millis(35));
        assert!(b.allow(), "one probe after open_ms");
        assert_eq!(b.state(), HALF_OPEN);
        assert!(!b.allow(), "only one probe");
        b.record(Call::Ok, ms);
        assert_eq!(b.state(), CLOSED);
    }

    #[test]
    fn a_failed_probe_reopens_and_unreachable_opens_at_once() {
        let b = Breaker::new("t", quick());
        b.record(Call::Unreachable, Duration::ZERO);
        assert_eq!(b.state(), OPEN);
        std::thread::sleep(Duration::from_millis(35));
        assert!(b.allow());
        b.record(Call::Failed, Duration::ZERO);
        assert_eq!(b.state(), OPEN);
        assert!(!b.allow());
    }

    #[test]
    fn opens_on_slow_calls() {
        let b = Breaker::new(
            "t",
            BreakerConfig {
                slow_call_ms: 10,
                ..quick()
            },
        );
        for _ in 0..4 {
            b.record(Call::Ok, Duration::from_millis(20));
        }
        assert_eq!(b.state(), OPEN);
    }
}
