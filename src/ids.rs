//! Validated identifiers.
//!
//! Why: every layer behind the HTTP parser trusts an id it is handed. A `CourseId` or
//! `StudentId` can only be built by [`CourseId::parse`] / [`StudentId::parse`], which enforce
//! the character sets and lengths of API.md, so no shard or store code re-validates and no
//! malformed id ever reaches SQL or a log line unescaped.
//! Must never: expose a constructor that skips validation.

use std::fmt;
use std::sync::Arc;

/// Longest course id API.md allows.
pub const COURSE_ID_BYTES_MAX: usize = 32;
/// Longest student (JWT `sub`) id API.md allows.
pub const STUDENT_ID_BYTES_MAX: usize = 64;

fn id_chars_ok(s: &str, bytes_max: usize) -> bool {
    !s.is_empty()
        && s.len() <= bytes_max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// A course id: 1-32 chars of `[A-Za-z0-9_.-]`. Cheap to clone (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CourseId(Arc<str>);

/// Maps keyed by `CourseId` can be searched by `&str` (the derived order, equality and
/// hash are those of the string).
impl std::borrow::Borrow<str> for CourseId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl CourseId {
    pub fn parse(s: &str) -> Option<CourseId> {
        Self::valid(s).then(|| CourseId(Arc::from(s)))
    }
    /// Whether `s` is a valid course id, without making one (no allocation).
    pub fn valid(s: &str) -> bool {
        id_chars_ok(s, COURSE_ID_BYTES_MAX)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A student (or admin) id, the JWT `sub`: 1-64 chars of `[A-Za-z0-9_.-]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StudentId(Arc<str>);

impl StudentId {
    pub fn parse(s: &str) -> Option<StudentId> {
        id_chars_ok(s, STUDENT_ID_BYTES_MAX).then(|| StudentId(Arc::from(s)))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! id_fmt {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", &*self.0)
            }
        }
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}
id_fmt!(CourseId);
id_fmt!(StudentId);

/// Index of a shard, `0..shards`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShardId(pub usize);

/// Most shards one process runs.
pub const SHARDS_MAX: usize = 256;

/// Milliseconds since the unix epoch (UTC). The one time unit stored and compared.
pub type UnixMs = i64;

pub fn now_ms() -> UnixMs {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    d.as_millis() as UnixMs
}

/// Where the wall-clock time comes from: the system's realtime clock in production, a
/// clock the simulator steps back and forward in tests. The seam exists because the
/// realtime clock is not monotonic (NTP, a VM resume, an operator): code that reads it
/// must hold up when it jumps, and only a clock we control shows that it does.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> UnixMs;
}

/// The system's realtime clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> UnixMs {
        now_ms()
    }
}

/// A step back of the wall clock up to this is absorbed (time stands still until the clock
/// catches up); a larger one is taken as the correction of a clock that had jumped ahead.
pub const CLOCK_BACKSTEP_ABSORB_MS: UnixMs = 60_000;

/// A shard's view of the wall clock: never earlier than a time it already gave out, for
/// steps back of up to [`CLOCK_BACKSTEP_ABSORB_MS`].
///
/// A small step back of the realtime clock (NTP, a VM resume) would otherwise re-close a
/// course that is open (`opens_at` passes again) or reopen one that closed, and date a new
/// seat before an older one. So the shard's time stands still until the realtime clock
/// catches up, and steps forward with it. A step forward cannot be told from time passing
/// and is taken as is; a large step back is the correction of a clock that had jumped
/// ahead by mistake, and is followed (logged), or the shard's time would stand still for
/// as long as the mistake was. Either way no seat is affected: a held seat is never
/// re-decided. Read it once per decision: two reads may differ.
pub struct ShardClock {
    source: std::sync::Arc<dyn Clock>,
    high_water: std::cell::Cell<UnixMs>,
}

impl ShardClock {
    pub fn new(source: std::sync::Arc<dyn Clock>) -> ShardClock {
        ShardClock {
            source,
            high_water: std::cell::Cell::new(UnixMs::MIN),
        }
    }

    pub fn now_ms(&self) -> UnixMs {
        let source = self.source.now_ms();
        let high_water = self.high_water.get();
        let now = if source >= high_water {
            source
        } else if high_water - source <= CLOCK_BACKSTEP_ABSORB_MS {
            high_water
        } else {
            tracing::warn!(
                back_ms = high_water - source,
                "the wall clock stepped far back; following it (it had jumped ahead)"
            );
            source
        };
        self.high_water.set(now);
        now
    }
}

#[cfg(test)]
mod clock_tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;

    struct Manual(AtomicI64);
    impl Clock for Manual {
        fn now_ms(&self) -> UnixMs {
            self.0.load(Ordering::Relaxed)
        }
    }

    #[test]
    fn small_steps_back_stand_still_large_ones_are_followed() {
        let source = Arc::new(Manual(AtomicI64::new(1_000_000)));
        let clock = ShardClock::new(source.clone());
        assert_eq!(clock.now_ms(), 1_000_000);
        source.0.store(1_000_000 - CLOCK_BACKSTEP_ABSORB_MS, Ordering::Relaxed);
        assert_eq!(clock.now_ms(), 1_000_000, "a small step back stands still");
        source.0.store(1_000_500, Ordering::Relaxed);
        assert_eq!(clock.now_ms(), 1_000_500, "forward with the clock");
        source
            .0
            .store(1_000_500 - CLOCK_BACKSTEP_ABSORB_MS - 1, Ordering::Relaxed);
        assert_eq!(
            clock.now_ms(),
            1_000_500 - CLOCK_BACKSTEP_ABSORB_MS - 1,
            "a large one is followed"
        );
    }
}

/// RFC 3339 UTC text of a unix-ms instant, e.g. `2026-11-24T09:00:00.000Z`.
pub fn rfc3339(ms: UnixMs) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Parses RFC 3339 (any offset) into unix ms.
pub fn parse_rfc3339(s: &str) -> Option<UnixMs> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_course(input: &str, ok: bool) {
        assert_eq!(CourseId::parse(input).is_some(), ok, "course id {input:?}");
    }

    #[test]
    fn course_ids() {
        check_course("CS101-01", true);
        check_course("a", true);
        check_course("a.b_c-d", true);
        check_course(&"x".repeat(32), true);
        check_course(&"x".repeat(33), false);
        check_course("", false);
        check_course("bad id", false);
        check_course("bad%20id", false);
        check_course("é", false);
        check_course("a/b", false);
    }

    #[test]
    fn student_ids() {
        assert!(StudentId::parse(&"s".repeat(64)).is_some());
        assert!(StudentId::parse(&"s".repeat(65)).is_none());
        assert!(StudentId::parse("alice@x").is_none());
    }

    #[test]
    fn time_roundtrip() {
        let ms = 1_790_000_000_123;
        assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms));
        assert_eq!(parse_rfc3339("2026-01-01T00:00:00+01:00"), Some(1_767_222_000_000));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
