//! Metrics: what operators watch during a rush, exposed in the Prometheus text format.
//!
//! Why: counting on the hot path must not bounce a cache line between cores. Each shard
//! owns a [`ShardMetrics`] that only its own thread writes (plain load+store on its own
//! cache lines, no lock prefix), and the [`Collector`] sums the shards when Prometheus
//! scrapes. The persist thread owns its histograms the same way. Per-course series are
//! limited to the hottest [`HOT_COURSES_MAX`] courses, so a catalog of 10,000 courses
//! cannot blow up cardinality.
//! Must never: be written by a thread other than the owner of the counters, or take a lock
//! on the request path (the hot-course snapshot lock is taken once per window and per
//! scrape).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector as PromCollector, Desc};
use prometheus::proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType};

/// Routes as labelled in `enrolld_http_request_duration_seconds{route}`.
pub const ROUTES: [&str; 13] = [
    "enroll",
    "drop",
    "course",
    "courses",
    "me",
    "admin_put",
    "roster",
    "health",
    "metrics",
    "other",
    "draw",
    "events",
    "unauthorized",
];
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// Request latency bucket bounds, seconds.
pub const LATENCY_BUCKETS_S: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Per-course series are kept for this many of the hottest courses.
pub const HOT_COURSES_MAX: usize = 20;
/// A course is hot from this many requests per second over a window (DESIGN.md).
pub const HOT_REQUESTS_PER_SEC_MIN: f64 = 5.0;
/// The window over which course heat is measured.
pub const HOT_WINDOW_MS: u64 = 5_000;

/// Outcomes of an enrollment POST (`enrolld_enroll_attempts_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    Enrolled,
    Already,
    Full,
    Closed,
    NotFound,
    RateLimited,
    Unavailable,
    /// Entered in a draw or placed on a waitlist (202).
    Placed,
}
pub const ATTEMPTS: [&str; 8] = [
    "enrolled",
    "already",
    "full",
    "closed",
    "not_found",
    "rate_limited",
    "unavailable",
    "placed",
];

/// Why an enrollment was refused (`enrolld_enroll_rejected_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    User,
    Course,
    Ipseg,
    Flow,
    Breaker,
    Full,
}
pub const REJECTS: [&str; 6] = ["user", "course", "ipseg", "flow", "breaker", "full"];

/// Adds to a counter that only one thread writes: no read-modify-write bus lock needed.
fn bump(a: &AtomicU64, n: u64) {
    a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

#[derive(Default)]
struct RouteStats {
    count: [AtomicU64; STATUS_CLASSES.len()],
    sum_us: [AtomicU64; STATUS_CLASSES.len()],
    /// Non-cumulative bucket counts; the last slot is +Inf.
    buckets: [[AtomicU64; LATENCY_BUCKETS_S.len() + 1]; STATUS_CLASSES.len()],
}

/// A course among a shard's hottest in the last window.
#[derive(Clone, Debug)]
pub struct HotCourse {
    pub course: String,
    pub requests_per_sec: f64,
    pub seats_left: u32,
    /// Enrollment answers by outcome since start (indexed like [`ATTEMPTS`]).
    pub outcomes: [u64; ATTEMPTS.len()],
}

/// One shard's counters. Written only by that shard's thread.
#[repr(align(128))]
#[derive(Default)]
pub struct ShardMetrics {
    requests: AtomicU64,
    hops: AtomicU64,
    attempts: [AtomicU64; ATTEMPTS.len()],
    rejects: [AtomicU64; REJECTS.len()],
    routes: [RouteStats; ROUTES.len()],
    hot: Mutex<Vec<HotCourse>>,
}

impl ShardMetrics {
    /// A course request that arrived here but belongs to another shard.
    pub fn hop(&self) {
        bump(&self.hops, 1);
    }

    pub fn request(&self, route: usize, status: u16, elapsed: std::time::Duration) {
        bump(&self.requests, 1);
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        let r = &self.routes[route.min(ROUTES.len() - 1)];
        let us = elapsed.as_micros() as u64;
        bump(&r.count[class], 1);
        bump(&r.sum_us[class], us);
        let secs = elapsed.as_secs_f64();
        let slot = LATENCY_BUCKETS_S
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS_S.len());
        bump(&r.buckets[class][slot], 1);
    }
    pub fn attempt(&self, a: Attempt) {
        bump(&self.attempts[a as usize], 1);
    }
    pub fn reject(&self, r: Reject) {
        bump(&self.rejects[r as usize], 1);
    }
    /// Replaces this shard's hot-course snapshot (once per window).
    pub fn publish_hot(&self, hot: Vec<HotCourse>) {
        *self.hot.lock().unwrap_or_else(|p| p.into_inner()) = hot;
    }
}

/// The persist thread's figures. Written only by the persist thread.
#[derive(Debug)]
pub struct PersistMetrics {
    pub batch_rows: prometheus::Histogram,
    pub commit_seconds: prometheus::Histogram,
    /// Courses loaded with more seats than capacity (they sell nothing until under it).
    pub courses_overfull: prometheus::IntGauge,
    /// Stored seats of courses that do not exist, left in the store and not loaded.
    pub seats_orphaned: prometheus::IntGauge,
    /// The change feed: the newest event's number (events written since the feed began),
    /// the newest number any reader was served, and rows trimmed by retention.
    pub feed_head: prometheus::IntGauge,
    pub feed_served: prometheus::IntGauge,
    pub events_trimmed: prometheus::IntCounter,
    /// Batches refused because this node no longer held a lease they were decided under.
    pub fenced_batches: prometheus::IntCounter,
    /// Registration rounds: entries committed, draws run (their entries and commit time),
    /// students waiting, and promotions from a waitlist to a seat.
    pub entries: prometheus::IntCounter,
    pub draws: prometheus::IntCounter,
    pub draw_entries: prometheus::Histogram,
    pub draw_seconds: prometheus::Histogram,
    pub waitlisted: prometheus::IntGauge,
    pub promotions: prometheus::IntCounter,
}

/// The cluster's figures (leases, takeovers, hops). Outside cluster mode on MySQL, the one
/// node holds every lease and the rest stay 0.
pub struct ClusterMetrics {
    pub leases_held: prometheus::IntGauge,
    pub nodes_alive: prometheus::IntGauge,
    pub partitions_unowned: prometheus::IntGauge,
    pub partitions_taken: prometheus::IntCounter,
    pub partitions_released: prometheus::IntCounter,
    /// Requests passed to the owning node, and those whose hop failed (502/504).
    pub hops: prometheus::IntCounter,
    pub hops_failed: prometheus::IntCounter,
    /// The catalog cache: catch-ups from the store, courses published, gaps seen, and
    /// how old the copy is (since it was last known whole).
    pub catalog_catch_ups: prometheus::IntCounter,
    pub catalog_published: prometheus::IntCounter,
    pub catalog_gaps: prometheus::IntCounter,
    pub catalog_age_seconds: prometheus::Gauge,
}

impl Default for ClusterMetrics {
    fn default() -> Self {
        let gauge = |name: &str, help: &str| prometheus::IntGauge::new(name, help).expect("valid gauge");
        let counter = |name: &str, help: &str| prometheus::IntCounter::new(name, help).expect("valid counter");
        ClusterMetrics {
            leases_held: gauge(
                "enrolld_cluster_leases_held",
                "Partitions whose lease this node holds (MySQL; every partition outside cluster mode).",
            ),
            nodes_alive: gauge(
                "enrolld_cluster_nodes_alive",
                "Nodes with a live heartbeat in the store's lease table, at this node's last look (cluster mode).",
            ),
            partitions_unowned: gauge(
                "enrolld_cluster_partitions_unowned",
                "Partitions no live node owned at this node's last look (cluster mode).",
            ),
            partitions_taken: counter(
                "enrolld_cluster_partitions_taken_total",
                "Partitions this node took over (start, a node lost, a hand-over).",
            ),
            partitions_released: counter(
                "enrolld_cluster_partitions_released_total",
                "Partitions this node handed over to their preferred owner while running.",
            ),
            hops: counter(
                "enrolld_cluster_hops_total",
                "Requests passed to the node that owns their course.",
            ),
            hops_failed: counter(
                "enrolld_cluster_hops_failed_total",
                "Hops cut or timed out (answered 502/504 outcome_unknown).",
            ),
            catalog_catch_ups: counter(
                "enrolld_cluster_catalog_catch_ups_total",
                "Times the catalog cache was re-read whole from the store.",
            ),
            catalog_published: counter(
                "enrolld_cluster_catalog_published_total",
                "Course changes this node published to the other nodes' caches.",
            ),
            catalog_gaps: counter(
                "enrolld_cluster_catalog_gaps_total",
                "Missing messages from another node (each wakes a catch-up).",
            ),
            catalog_age_seconds: prometheus::Gauge::new(
                "enrolld_cluster_catalog_age_seconds",
                "Seconds since the catalog cache was last re-read whole (its staleness bound while Redis is down).",
            )
            .expect("valid gauge"),
        }
    }
}

impl ClusterMetrics {
    fn register(&self, registry: &prometheus::Registry) {
        for g in [&self.leases_held, &self.nodes_alive, &self.partitions_unowned] {
            registry.register(Box::new(g.clone())).expect("unique name");
        }
        for c in [
            &self.partitions_taken,
            &self.partitions_released,
            &self.hops,
            &self.hops_failed,
            &self.catalog_catch_ups,
            &self.catalog_published,
            &self.catalog_gaps,
        ] {
            registry.register(Box::new(c.clone())).expect("unique name");
        }
        registry
            .register(Box::new(self.catalog_age_seconds.clone()))
            .expect("unique name");
    }
}

impl Default for PersistMetrics {
    fn default() -> Self {
        let rows = prometheus::HistogramOpts::new("enrolld_persist_batch_rows", "Seat changes per group commit.")
            .buckets(vec![
                1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
            ]);
        let secs = prometheus::HistogramOpts::new("enrolld_persist_commit_seconds", "Time to commit one batch.")
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0,
            ]);
        PersistMetrics {
            batch_rows: prometheus::Histogram::with_opts(rows).expect("valid histogram opts"),
            commit_seconds: prometheus::Histogram::with_opts(secs).expect("valid histogram opts"),
            courses_overfull: prometheus::IntGauge::new(
                "enrolld_recovery_courses_overfull",
                "Courses the last start loaded with more seats than capacity.",
            )
            .expect("valid gauge"),
            feed_head: prometheus::IntGauge::new(
                "enrolld_events_head_seq",
                "Number of the newest committed change-feed event (events written since the feed began).",
            )
            .expect("valid gauge"),
            feed_served: prometheus::IntGauge::new(
                "enrolld_events_served_seq",
                "Number of the newest change-feed event served to a reader (head minus this: the feed lag).",
            )
            .expect("valid gauge"),
            events_trimmed: prometheus::IntCounter::new(
                "enrolld_events_trimmed_total",
                "Change-feed events removed by retention.",
            )
            .expect("valid counter"),
            seats_orphaned: prometheus::IntGauge::new(
                "enrolld_recovery_seats_orphaned",
                "Stored seats of unknown courses the last start found (kept, not loaded).",
            )
            .expect("valid gauge"),
            fenced_batches: prometheus::IntCounter::new(
                "enrolld_cluster_fenced_batches_total",
                "Batches the store refused because another node had taken over a partition they wrote (nothing of them recorded).",
            )
            .expect("valid counter"),
            entries: prometheus::IntCounter::new(
                "enrolld_rounds_entries_total",
                "Entries in a draw committed (repeats not counted).",
            )
            .expect("valid counter"),
            draws: prometheus::IntCounter::new("enrolld_rounds_draws_total", "Draws tried (committed or not).")
                .expect("valid counter"),
            draw_entries: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new("enrolld_rounds_draw_entries", "Entries per draw.").buckets(vec![
                    0.0, 10.0, 100.0, 1_000.0, 5_000.0, 10_000.0, 50_000.0, 100_000.0, 200_000.0,
                ]),
            )
            .expect("valid histogram opts"),
            draw_seconds: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new(
                    "enrolld_rounds_draw_seconds",
                    "Time a draw's commit took (its shuffle on the owner shard is logged with the draw).",
                )
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            )
            .expect("valid histogram opts"),
            waitlisted: prometheus::IntGauge::new(
                "enrolld_rounds_waitlisted",
                "Students waiting on the waitlists this node loaded or changed.",
            )
            .expect("valid gauge"),
            promotions: prometheus::IntCounter::new(
                "enrolld_rounds_promotions_total",
                "Students given a seat from a waitlist (by a drop, a capacity raise, or a seat found free).",
            )
            .expect("valid counter"),
        }
    }
}

/// Figures read at scrape time from elsewhere in the process.
pub trait Gauges: Send + Sync {
    fn queue_depth(&self) -> usize;
    fn store_up(&self) -> bool;
    /// The store breaker's state (0 closed, 1 half-open, 2 open).
    fn store_breaker(&self) -> u8;
}

/// The rate limiter's figures, read at scrape time.
pub trait LimitGauges: Send + Sync {
    /// Tokens left per dimension, summed over the keys held.
    fn tokens(&self) -> Vec<(&'static str, f64)>;
    /// The Redis breaker's state, when Redis is configured.
    fn redis_breaker(&self) -> Option<u8>;
    /// Requests decided by local buckets alone because Redis was not usable.
    fn redis_fallbacks(&self) -> u64;
}

/// Sums the shards at scrape time.
pub struct Collector {
    shards: Vec<Arc<ShardMetrics>>,
    gauges: Arc<dyn Gauges>,
    limits: Arc<dyn LimitGauges>,
    descs: Vec<Desc>,
}

impl Collector {
    pub fn new(shards: Vec<Arc<ShardMetrics>>, gauges: Arc<dyn Gauges>, limits: Arc<dyn LimitGauges>) -> Collector {
        Collector {
            shards,
            gauges,
            limits,
            descs: Vec::new(),
        }
    }

    fn sum(&self, f: impl Fn(&ShardMetrics) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|s| f(s).load(Ordering::Relaxed)).sum()
    }

    /// One counter per shard, labelled `shard="i"`.
    fn per_shard(&self, f: impl Fn(&ShardMetrics) -> &AtomicU64) -> Vec<Metric> {
        self.shards
            .iter()
            .enumerate()
            .map(|(i, s)| counter(vec![label("shard", &i.to_string())], f(s).load(Ordering::Relaxed)))
            .collect()
    }
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

fn family(name: &str, help: &str, t: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(t);
    f.set_metric(metrics);
    f
}

fn counter(labels: Vec<LabelPair>, v: u64) -> Metric {
    let mut c = Counter::default();
    c.set_value(v as f64);
    let mut m = Metric::from_label(labels);
    m.set_counter(c);
    m
}

fn gauge(labels: Vec<LabelPair>, v: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(v);
    let mut m = Metric::from_label(labels);
    m.set_gauge(g);
    m
}

impl PromCollector for Collector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        let attempts = (0..ATTEMPTS.len())
            .map(|i| counter(vec![label("outcome", ATTEMPTS[i])], self.sum(|s| &s.attempts[i])))
            .collect();
        out.push(family(
            "enrolld_enroll_attempts_total",
            "Enrollment POSTs by outcome.",
            MetricType::COUNTER,
            attempts,
        ));
        let rejects = (0..REJECTS.len())
            .map(|i| counter(vec![label("reason", REJECTS[i])], self.sum(|s| &s.rejects[i])))
            .collect();
        out.push(family(
            "enrolld_enroll_rejected_total",
            "Enrollments refused, by reason.",
            MetricType::COUNTER,
            rejects,
        ));
        out.push(family(
            "enrolld_shard_requests_total",
            "Requests accepted per shard (imbalance shows here).",
            MetricType::COUNTER,
            self.per_shard(|s| &s.requests),
        ));
        out.push(family(
            "enrolld_shard_hops_total",
            "Course requests a shard passed to the course's owner shard (near 0 behind a proxy that routes by owner).",
            MetricType::COUNTER,
            self.per_shard(|s| &s.hops),
        ));
        out.extend(self.http_families());
        out.extend(self.hot_families());
        let store_up = self.gauges.store_up();
        out.push(family(
            "enrolld_persist_queue_depth",
            "Seat changes waiting for the persist thread.",
            MetricType::GAUGE,
            vec![gauge(vec![], self.gauges.queue_depth() as f64)],
        ));
        out.push(family(
            "enrolld_store_up",
            "1 while the store answers.",
            MetricType::GAUGE,
            vec![gauge(vec![], f64::from(u8::from(store_up)))],
        ));
        out.push(family(
            "enrolld_breaker_state",
            "Circuit breakers: 0 closed, 1 half-open, 2 open.",
            MetricType::GAUGE,
            std::iter::once(gauge(
                vec![label("breaker", "store")],
                f64::from(self.gauges.store_breaker()),
            ))
            .chain(
                self.limits
                    .redis_breaker()
                    .map(|s| gauge(vec![label("breaker", "redis")], f64::from(s))),
            )
            .collect(),
        ));
        out.push(family(
            "enrolld_rate_limit_tokens",
            "Tokens left in the in-process buckets, summed over the keys held, by dimension.",
            MetricType::GAUGE,
            self.limits
                .tokens()
                .into_iter()
                .map(|(d, v)| gauge(vec![label("dimension", d)], v))
                .collect(),
        ));
        out.push(family(
            "enrolld_rate_limit_redis_fallbacks_total",
            "Seat requests limited by local buckets alone because Redis was not usable.",
            MetricType::COUNTER,
            vec![counter(vec![], self.limits.redis_fallbacks())],
        ));
        out.push(family(
            "enrolld_up",
            "1 while the process serves.",
            MetricType::GAUGE,
            vec![gauge(vec![], 1.0)],
        ));
        out
    }
}

impl Collector {
    fn http_families(&self) -> Vec<MetricFamily> {
        let mut hist = Vec::new();
        let mut totals = Vec::new();
        for (r, route) in ROUTES.iter().enumerate() {
            for (c, class) in STATUS_CLASSES.iter().enumerate() {
                let count = self.sum(|s| &s.routes[r].count[c]);
                if count == 0 {
                    continue;
                }
                let labels = vec![label("route", route), label("status_class", class)];
                let mut cumulative = 0;
                let buckets = LATENCY_BUCKETS_S
                    .iter()
                    .enumerate()
                    .map(|(i, bound)| {
                        cumulative += self.sum(|s| &s.routes[r].buckets[c][i]);
                        let mut b = Bucket::default();
                        b.set_upper_bound(*bound);
                        b.set_cumulative_count(cumulative);
                        b
                    })
                    .collect();
                let mut h = Histogram::default();
                h.set_sample_count(count);
                h.set_sample_sum(self.sum(|s| &s.routes[r].sum_us[c]) as f64 / 1e6);
                h.set_bucket(buckets);
                let mut m = Metric::from_label(labels.clone());
                m.set_histogram(h);
                hist.push(m);
                totals.push(counter(labels, count));
            }
        }
        vec![
            family(
                "enrolld_http_request_duration_seconds",
                "Time from request head to answer, by route and status class.",
                MetricType::HISTOGRAM,
                hist,
            ),
            family(
                "enrolld_http_requests_total",
                "Requests by route and status class.",
                MetricType::COUNTER,
                totals,
            ),
        ]
    }

    fn hot_families(&self) -> Vec<MetricFamily> {
        let mut hot: Vec<HotCourse> = Vec::new();
        for s in &self.shards {
            hot.extend(s.hot.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
        }
        hot.sort_by(|a, b| b.requests_per_sec.total_cmp(&a.requests_per_sec));
        hot.truncate(HOT_COURSES_MAX);
        let seats = hot
            .iter()
            .map(|h| gauge(vec![label("course", &h.course)], f64::from(h.seats_left)))
            .collect();
        let is_hot = hot
            .iter()
            .map(|h| {
                let v = if h.requests_per_sec >= HOT_REQUESTS_PER_SEC_MIN {
                    1.0
                } else {
                    0.0
                };
                gauge(vec![label("course", &h.course)], v)
            })
            .collect();
        let rate = hot
            .iter()
            .map(|h| gauge(vec![label("course", &h.course)], h.requests_per_sec))
            .collect();
        let by_outcome = hot
            .iter()
            .flat_map(|h| {
                let course = h.course.clone();
                ATTEMPTS
                    .iter()
                    .zip(h.outcomes)
                    .map(move |(o, n)| counter(vec![label("course", &course), label("outcome", o)], n))
            })
            .collect();
        vec![
            family(
                "enrolld_course_seats_left",
                "Seats left in the hottest courses.",
                MetricType::GAUGE,
                seats,
            ),
            family(
                "enrolld_course_hot",
                "1 when a course had at least 5 requests/s over the last window.",
                MetricType::GAUGE,
                is_hot,
            ),
            family(
                "enrolld_course_requests_total",
                "Enrollment answers by outcome since start, hottest courses.",
                MetricType::COUNTER,
                by_outcome,
            ),
            family(
                "enrolld_course_requests_per_second",
                "Requests per second over the last window, hottest courses.",
                MetricType::GAUGE,
                rate,
            ),
        ]
    }
}

/// The process-wide registry: shard sums, persist histograms, process figures.
pub struct Metrics {
    registry: prometheus::Registry,
}

impl Metrics {
    pub fn new(collector: Collector, persist: &PersistMetrics, cluster: &ClusterMetrics) -> Metrics {
        let registry = prometheus::Registry::new();
        registry.register(Box::new(collector)).expect("first registration");
        cluster.register(&registry);
        registry
            .register(Box::new(persist.batch_rows.clone()))
            .expect("unique name");
        registry
            .register(Box::new(persist.commit_seconds.clone()))
            .expect("unique name");
        for histogram in [&persist.draw_entries, &persist.draw_seconds] {
            registry.register(Box::new(histogram.clone())).expect("unique name");
        }
        for gauge in [
            &persist.courses_overfull,
            &persist.seats_orphaned,
            &persist.feed_head,
            &persist.feed_served,
            &persist.waitlisted,
        ] {
            registry.register(Box::new(gauge.clone())).expect("unique name");
        }
        for counter in [
            &persist.events_trimmed,
            &persist.fenced_batches,
            &persist.entries,
            &persist.draws,
            &persist.promotions,
        ] {
            registry.register(Box::new(counter.clone())).expect("unique name");
        }
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("unique name");
        Metrics { registry }
    }

    /// The text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        use prometheus::Encoder;
        let mut buf = Vec::with_capacity(16 * 1024);
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of plain data");
        buf
    }
}
