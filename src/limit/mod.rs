//! Traffic control: layered token buckets (per student, per course, per IP segment; local
//! and, across nodes, in Redis with leasing), flow rules per route, adaptive shedding, and
//! the circuit breakers around the store and Redis.
//!
//! Why: when registration opens, scripts and refresh-hammering send far more requests than
//! there are seats. People must stay ahead of scripts, and the node and its store must be
//! protected, without a Redis round trip on the common path.
//! Where each check runs:
//! - net/, for every `/v1` request: adaptive in-flight bound, the route's flow rule, then
//!   the student's and the IP segment's local buckets (shared by all shards, striped);
//! - the owner shard, only for an enrollment that could take a seat (never a 409, a 404 or
//!   a repeated POST): the course's bucket (owned by the shard: no lock), then the
//!   cross-node Redis buckets (student, course, IP segment), leased in batches.
//!
//! Must never: make a refused request cost more than an admitted one, or fail a request
//! because Redis is down (local buckets carry on).

pub mod breaker;
pub mod bucket;
pub mod flow;
pub mod keyed;
pub mod redis;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::watch;

use crate::ids::{CourseId, StudentId};
use breaker::BreakerConfig;
use bucket::{Rate, TokenBucket};
use flow::{FlowDecision, FlowRule, Pacer};
use keyed::KeyedBuckets;

/// The rates one profile (a token's `tier`) gets, per dimension.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub user: Rate,
    pub course: Rate,
    pub ipseg: Rate,
}

/// Flow rules per route group.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowRules {
    /// `POST /v1/courses/{id}/enrollment`
    pub enroll: FlowRule,
    /// `DELETE /v1/courses/{id}/enrollment`
    pub drop: FlowRule,
    /// Every other `/v1` route.
    pub read: FlowRule,
}

/// Adaptive protection: shed with 503 before the process falls over.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Adaptive {
    /// `/v1` requests in flight on this node at most (split over the shards).
    pub in_flight_max: usize,
    /// Shed while a shard's moving average of `/v1` request time is above this (0: off).
    pub latency_max_ms: u64,
}

impl Default for Adaptive {
    fn default() -> Self {
        Adaptive {
            in_flight_max: 50_000,
            latency_max_ms: 0,
        }
    }
}

/// Weight of the newest request in the moving average of request time.
const LATENCY_EWMA_WEIGHT: f64 = 0.05;
/// While shedding on latency, each shed request lowers the average by this share, so the
/// shard probes again once the slow requests have drained instead of shedding forever.
const LATENCY_SHED_DECAY: f64 = 0.02;

/// The `[limits]` table: every key optional, defaults documented in config/enrolld.toml.
/// Reloadable on SIGHUP or when the file changes, except `keys_max`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub enabled: bool,
    /// Profile used when a token names no tier, or an unknown one.
    pub default_profile: String,
    pub profiles: BTreeMap<String, Profile>,
    /// Keys each in-process dimension (student, IP segment) holds at most.
    pub keys_max: usize,
    /// Peers whose `X-Forwarded-For` / `X-Real-IP` are believed (CIDRs).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Tokens a shard leases from a Redis bucket at once.
    pub redis_lease_tokens: u32,
    /// Time after which an unspent lease is dropped.
    pub redis_lease_ttl_ms: u64,
    pub flow: FlowRules,
    pub adaptive: Adaptive,
    pub store_breaker: BreakerConfig,
    pub redis_breaker: BreakerConfig,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let mut profiles = BTreeMap::new();
        profiles.insert(
            "student".to_string(),
            Profile {
                user: Rate {
                    per_sec: 5.0,
                    burst: 10,
                },
                course: Rate::per_minute(12_000.0, 400),
                ipseg: Rate::per_minute(120_000.0, 5_000),
            },
        );
        profiles.insert(
            "staff".to_string(),
            Profile {
                user: Rate {
                    per_sec: 20.0,
                    burst: 40,
                },
                course: Rate::per_minute(12_000.0, 400),
                ipseg: Rate::per_minute(120_000.0, 5_000),
            },
        );
        LimitsConfig {
            enabled: true,
            default_profile: "student".into(),
            profiles,
            keys_max: 1_000_000,
            trusted_proxies: Vec::new(),
            redis_lease_tokens: 5,
            redis_lease_ttl_ms: 1_000,
            flow: FlowRules::default(),
            adaptive: Adaptive::default(),
            store_breaker: BreakerConfig::default(),
            redis_breaker: BreakerConfig::default(),
        }
    }
}

impl LimitsConfig {
    /// Checks what serde cannot; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if !self.profiles.contains_key(&self.default_profile) {
            return Err(format!(
                "`limits.default_profile` {:?} names no profile",
                self.default_profile
            ));
        }
        for (name, p) in &self.profiles {
            for (dim, r) in [("user", p.user), ("course", p.course), ("ipseg", p.ipseg)] {
                if !r.is_valid() {
                    return Err(format!(
                        "`limits.profiles.{name}.{dim}`: per_sec must be > 0 and burst >= 1"
                    ));
                }
            }
        }
        for (route, rule) in [
            ("enroll", &self.flow.enroll),
            ("drop", &self.flow.drop),
            ("read", &self.flow.read),
        ] {
            if !(rule.qps == 0.0 || (rule.qps.is_finite() && rule.qps >= flow::FLOW_QPS_MIN)) {
                return Err(format!(
                    "`limits.flow.{route}.qps` = {:?}: must be 0 (off) or at least {} (FLOW_QPS_MIN)",
                    rule.qps,
                    flow::FLOW_QPS_MIN
                ));
            }
        }
        if self.keys_max == 0 || self.redis_lease_tokens == 0 || self.adaptive.in_flight_max == 0 {
            return Err("`limits.keys_max`, `redis_lease_tokens` and `adaptive.in_flight_max` must be >= 1".into());
        }
        Ok(())
    }

    pub fn profile(&self, tier: Option<&str>) -> Profile {
        tier.and_then(|t| self.profiles.get(t))
            .or_else(|| self.profiles.get(&self.default_profile))
            .copied()
            .expect("validated: the default profile exists")
    }
}

/// Which dimension refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dimension {
    User,
    Course,
    Ipseg,
}

/// What the owner shard needs to admit a seat-taking request: the caller's rates and IP
/// segment, decided in net/.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Admission {
    pub profile: Profile,
    pub ipseg: u128,
}

/// The client address: the peer's, or (only from a trusted proxy) the nearest untrusted
/// address in `X-Forwarded-For`, else `X-Real-IP`. A spoofed header from anyone else
/// buys nothing.
pub fn client_ip(peer: SocketAddr, xff: Option<&[u8]>, real_ip: Option<&[u8]>, trusted: &[ipnet::IpNet]) -> IpAddr {
    let peer_ip = canonical(peer.ip());
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer_ip) {
        return peer_ip;
    }
    if let Some(list) = xff.and_then(|v| std::str::from_utf8(v).ok()) {
        for hop in list.rsplit(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) if is_trusted(&canonical(ip)) => continue,
                Ok(ip) => return canonical(ip),
                Err(_) => break,
            }
        }
    }
    real_ip
        .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<IpAddr>().ok())
        .map(canonical)
        .unwrap_or(peer_ip)
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The rate-limit key of an address's segment: its /24 (IPv4) or /64 (IPv6).
pub fn segment(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => (1u128 << 64) | u128::from(u32::from(v4) & 0xffff_ff00),
        IpAddr::V6(v6) => u128::from(v6) & !((1u128 << 64) - 1),
    }
}

/// `Retry-After` for a token due in `ms` (whole seconds, at least 1).
fn retry_after_secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

/// `Retry-After` when a Redis bucket refused (its lease is per shard, its refill unknown here).
const REDIS_RETRY_AFTER_SECS: u64 = 1;

/// What net/ knows of where a request came from.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr<'a> {
    pub peer: SocketAddr,
    pub forwarded_for: Option<&'a [u8]>,
    pub real_ip: Option<&'a [u8]>,
}

impl crate::metrics::LimitGauges for Limiter {
    fn tokens(&self) -> Vec<(&'static str, f64)> {
        Limiter::tokens(self).to_vec()
    }
    fn redis_breaker(&self) -> Option<u8> {
        self.redis.as_ref().map(|r| r.breaker.state())
    }
    fn redis_fallbacks(&self) -> u64 {
        self.redis.as_ref().map_or(0, |r| r.fallbacks())
    }
}

/// Process-wide limiter state, shared by all shards.
pub struct Limiter {
    users: KeyedBuckets,
    ipsegs: KeyedBuckets,
    pub redis: Option<Arc<redis::RedisShared>>,
    pub store_breaker: Arc<breaker::Breaker>,
    updates: watch::Receiver<Arc<LimitsConfig>>,
}

impl Limiter {
    /// `redis`: the URL and the prefix every key starts with (`redis_prefix`).
    pub fn new(
        cfg: watch::Receiver<Arc<LimitsConfig>>,
        redis: Option<(&str, &str)>,
        store_breaker: Arc<breaker::Breaker>,
    ) -> anyhow::Result<Limiter> {
        let current = cfg.borrow().clone();
        let redis = match redis {
            None => None,
            Some((url, prefix)) => {
                let b = Arc::new(breaker::Breaker::new("redis", current.redis_breaker.clone()));
                Some(Arc::new(redis::RedisShared::new(url, prefix, b)?))
            }
        };
        Ok(Limiter {
            users: KeyedBuckets::new(current.keys_max),
            ipsegs: KeyedBuckets::new(current.keys_max),
            redis,
            store_breaker,
            updates: cfg,
        })
    }

    /// Tokens left over the held keys, per in-process dimension (a gauge).
    pub fn tokens(&self) -> [(&'static str, f64); 2] {
        [
            ("user", self.users.tokens_total()),
            ("ipseg", self.ipsegs.tokens_total()),
        ]
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<LimitsConfig>> {
        self.updates.clone()
    }

    /// Applies reloaded breaker settings (the buckets read theirs per request).
    pub fn reconfigure(&self, cfg: &LimitsConfig) {
        self.store_breaker.reconfigure(cfg.store_breaker.clone());
        if let Some(r) = &self.redis {
            r.breaker.reconfigure(cfg.redis_breaker.clone());
        }
    }
}

/// Route groups with a flow rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteGroup {
    Enroll,
    Drop,
    Read,
}

/// Why net/ refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 429: a bucket is empty; a token is due in this many seconds.
    Limited(Dimension, u64),
    /// 429: the flow rule would make it wait too long.
    Flow,
    /// 503: shed, too much in flight.
    Shed,
}

/// One shard's view: the current rules, its pacers, its in-flight count, the buckets of
/// the courses it owns, and its Redis link. Lives in an `Rc` on the shard's thread.
pub struct ShardLimiter {
    shared: Arc<Limiter>,
    shards: usize,
    cfg: RefCell<Arc<LimitsConfig>>,
    updates: RefCell<watch::Receiver<Arc<LimitsConfig>>>,
    pacers: [Pacer; 3],
    in_flight: Cell<usize>,
    /// Moving average of `/v1` request time on this shard, microseconds.
    latency_ewma_us: Cell<f64>,
    courses: RefCell<HashMap<CourseId, TokenBucket>>,
    redis: Option<redis::RedisLink>,
}

/// Counts a request in flight until dropped.
pub struct InFlight(Rc<ShardLimiter>, std::time::Instant);

impl Drop for InFlight {
    fn drop(&mut self) {
        let l = &self.0;
        l.in_flight.set(l.in_flight.get() - 1);
        let us = self.1.elapsed().as_secs_f64() * 1e6;
        l.latency_ewma_us
            .set(l.latency_ewma_us.get() * (1.0 - LATENCY_EWMA_WEIGHT) + us * LATENCY_EWMA_WEIGHT);
    }
}

impl ShardLimiter {
    pub fn new(shared: Arc<Limiter>, shards: usize) -> ShardLimiter {
        let updates = shared.subscribe();
        let cfg = updates.borrow().clone();
        let redis = shared.redis.clone().map(redis::RedisLink::new);
        ShardLimiter {
            shared,
            shards,
            cfg: RefCell::new(cfg),
            updates: RefCell::new(updates),
            pacers: Default::default(),
            in_flight: Cell::new(0),
            latency_ewma_us: Cell::new(0.0),
            courses: RefCell::new(HashMap::new()),
            redis,
        }
    }

    /// The rules in force (picks up a reload with one atomic read when nothing changed).
    pub fn config(&self) -> Arc<LimitsConfig> {
        let mut updates = self.updates.borrow_mut();
        if updates.has_changed().unwrap_or(false) {
            *self.cfg.borrow_mut() = updates.borrow_and_update().clone();
        }
        self.cfg.borrow().clone()
    }

    /// Checks a `/v1` request in net/: in-flight bound, flow rule, student and segment
    /// buckets. On success returns the caller's admission and an in-flight guard.
    /// Admins (authenticated operators) skip the student and segment buckets; the flow
    /// rules and the in-flight bound still apply to them.
    pub async fn admit_request(
        self: &Rc<Self>,
        group: RouteGroup,
        student: &StudentId,
        tier: Option<&str>,
        is_admin: bool,
        client: ClientAddr<'_>,
    ) -> Result<(Admission, InFlight), Refusal> {
        let cfg = self.config();
        let ipseg = segment(client_ip(
            client.peer,
            client.forwarded_for,
            client.real_ip,
            &cfg.trusted_proxies,
        ));
        let profile = cfg.profile(tier);
        if !cfg.enabled {
            return Ok((Admission { profile, ipseg }, self.enter()));
        }
        if self.in_flight.get() >= cfg.adaptive.in_flight_max.div_ceil(self.shards) {
            return Err(Refusal::Shed);
        }
        let latency_max_us = cfg.adaptive.latency_max_ms as f64 * 1000.0;
        if latency_max_us > 0.0 && self.latency_ewma_us.get() > latency_max_us {
            self.latency_ewma_us
                .set(self.latency_ewma_us.get() * (1.0 - LATENCY_SHED_DECAY));
            return Err(Refusal::Shed);
        }
        let guard = self.enter();
        let rule = match group {
            RouteGroup::Enroll => &cfg.flow.enroll,
            RouteGroup::Drop => &cfg.flow.drop,
            RouteGroup::Read => &cfg.flow.read,
        };
        match self.pacers[group as usize].admit(rule, self.shards, std::time::Instant::now()) {
            FlowDecision::Pass => {}
            FlowDecision::Wait(d) => tokio::time::sleep(d).await,
            FlowDecision::Reject => return Err(Refusal::Flow),
        }
        if is_admin {
            return Ok((Admission { profile, ipseg }, guard));
        }
        let now = crate::ids::now_ms();
        if let Err(ms) = self.shared.users.take_or_wait(student.as_str(), &profile.user, now) {
            return Err(Refusal::Limited(Dimension::User, retry_after_secs(ms)));
        }
        if let Err(ms) = self.shared.ipsegs.take_or_wait(ipseg, &profile.ipseg, now) {
            return Err(Refusal::Limited(Dimension::Ipseg, retry_after_secs(ms)));
        }
        Ok((Admission { profile, ipseg }, guard))
    }

    fn enter(self: &Rc<Self>) -> InFlight {
        self.in_flight.set(self.in_flight.get() + 1);
        InFlight(self.clone(), std::time::Instant::now())
    }

    /// Checks an enrollment that could take a seat, on the course's owner shard: the
    /// course's bucket, then (with Redis) the cross-node buckets. A refusal says which
    /// dimension and in how many seconds to retry.
    pub async fn admit_seat(
        &self,
        course: &CourseId,
        student: &StudentId,
        a: &Admission,
    ) -> Result<(), (Dimension, u64)> {
        let cfg = self.config();
        if !cfg.enabled {
            return Ok(());
        }
        let now = crate::ids::now_ms();
        let local_ok = {
            let mut courses = self.courses.borrow_mut();
            let b = courses
                .entry(course.clone())
                .or_insert_with(|| TokenBucket::full(&a.profile.course, now));
            if b.take(&a.profile.course, now, 1) {
                Ok(())
            } else {
                Err(b.wait_ms(&a.profile.course, 1))
            }
        };
        if let Err(ms) = local_ok {
            return Err((Dimension::Course, retry_after_secs(ms)));
        }
        let Some(link) = &self.redis else { return Ok(()) };
        let checks = [
            (Dimension::User, format!("user:{student}"), a.profile.user),
            (Dimension::Course, format!("course:{course}"), a.profile.course),
            (Dimension::Ipseg, format!("ipseg:{:032x}", a.ipseg), a.profile.ipseg),
        ];
        let mut fell_back = false;
        for (dim, key, rate) in checks {
            match link
                .take(&key, &rate, cfg.redis_lease_tokens, cfg.redis_lease_ttl_ms, now)
                .await
            {
                Some(true) => {}
                Some(false) => return Err((dim, REDIS_RETRY_AFTER_SECS)),
                None => fell_back = true,
            }
        }
        if fell_back {
            link.note_fallback();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(peer: &str, xff: Option<&str>, real: Option<&str>, trusted: &[&str], want: &str) {
        let trusted: Vec<ipnet::IpNet> = trusted.iter().map(|t| t.parse().unwrap()).collect();
        let got = client_ip(
            peer.parse().unwrap(),
            xff.map(str::as_bytes),
            real.map(str::as_bytes),
            &trusted,
        );
        assert_eq!(got, want.parse::<IpAddr>().unwrap(), "{peer} {xff:?} {real:?}");
    }

    #[test]
    fn client_addresses() {
        check("1.2.3.4:5", Some("9.9.9.9"), None, &[], "1.2.3.4");
        check("1.2.3.4:5", None, Some("9.9.9.9"), &[], "1.2.3.4");
        check("10.0.0.1:5", Some("9.9.9.9"), None, &["10.0.0.0/8"], "9.9.9.9");
        check(
            "10.0.0.1:5",
            Some("6.6.6.6, 9.9.9.9, 10.0.0.2"),
            None,
            &["10.0.0.0/8"],
            "9.9.9.9",
        );
        check("10.0.0.1:5", None, Some("8.8.8.8"), &["10.0.0.0/8"], "8.8.8.8");
        check("10.0.0.1:5", Some("garbage"), None, &["10.0.0.0/8"], "10.0.0.1");
        check("[::ffff:1.2.3.4]:5", None, None, &[], "1.2.3.4");
    }

    #[test]
    fn segments() {
        let s = |ip: &str| segment(ip.parse().unwrap());
        assert_eq!(s("1.2.3.4"), s("1.2.3.200"));
        assert_ne!(s("1.2.3.4"), s("1.2.4.4"));
        assert_eq!(s("2001:db8::1"), s("2001:db8::ffff"));
        assert_ne!(s("2001:db8::1"), s("2001:db8:0:1::1"));
        assert_ne!(s("0.0.0.1"), s("::1"), "v4 and v6 never share a segment");
    }

    #[test]
    fn defaults_validate() {
        LimitsConfig::default().validate().unwrap();
        let mut c = LimitsConfig::default();
        c.default_profile = "nobody".into();
        assert!(c.validate().unwrap_err().contains("default_profile"));
    }

    #[test]
    fn flow_qps_is_off_or_at_least_the_floor() {
        let check = |qps: f64, ok: bool| {
            let mut c = LimitsConfig::default();
            c.flow.drop.qps = qps;
            match c.validate() {
                Ok(()) => assert!(ok, "qps {qps} passed"),
                Err(e) => {
                    assert!(!ok, "qps {qps}: {e}");
                    assert!(e.contains("`limits.flow.drop.qps`"), "{e}");
                }
            }
        };
        check(0.0, true);
        check(flow::FLOW_QPS_MIN, true);
        check(1e6, true);
        for bad in [
            1e-20,
            f64::MIN_POSITIVE,
            flow::FLOW_QPS_MIN / 2.0,
            -1.0,
            f64::NAN,
            f64::INFINITY,
        ] {
            check(bad, false);
        }
    }
}
