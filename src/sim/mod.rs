//! The deterministic simulation of shard and persist, after TigerBeetle's VOPR and
//! FoundationDB's simulation testing.
//!
//! Why: the faults that break a seat promise (a COMMIT that hangs, an answer lost after
//! the commit landed, a clock that steps back, a crash between two of those) are rare in
//! example tests and common on registration day. Here the real [`Shard`] and the real
//! persist committers ([`persist::serve`]) run on one thread, on a tokio runtime whose
//! clock is paused (so hours of timeouts take milliseconds and a seed replays the same
//! run), against the two seams they are written against: a [`Backend`] that fails,
//! hangs, answers "unknown" and commits after its answer was lost ([`store::SimStore`]),
//! and a [`Clock`] that steps back and forward ([`SimClock`]). A [`checker::Checker`]
//! holds every answer against the store and memory, after every step and once the
//! faults heal.
//!
//! Replay one run with `ENROLLD_SIM_SEED=n`; `ENROLLD_SIM_SEEDS` (seeds per run, default
//! [`SEEDS_DEFAULT`]) and `ENROLLD_SIM_OPS` (requests per seed, default [`OPS_DEFAULT`])
//! make a longer run.
//! Must never: reach real time, the network or the disk; depend on anything but the seed.

mod checker;
mod store;

use std::rc::Rc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch};

use crate::ids::{Clock, CourseId, ShardClock, ShardId, StudentId, UnixMs};
use crate::limit::breaker::{Breaker, BreakerConfig};
use crate::limit::{Admission, Limiter, LimitsConfig, ShardLimiter};
use crate::model::CourseSpec;
use crate::persist::feed::Event;
use crate::persist::store::StoreOptions;
use crate::persist::{self, PersistConfig};
use crate::shard::table::CourseTable;
use crate::shard::{
    owner_of, run_rounds, serve_inbox, Command, Envelope, Router, Shard, ANSWER_WAIT_STATEMENT_TIMEOUTS,
};
use checker::{Checker, Request};
use store::{SimStore, Weather};

/// Seeds one test run tries unless `ENROLLD_SIM_SEEDS` says otherwise.
pub const SEEDS_DEFAULT: u64 = 200;
/// Wall-clock seconds one seed may take before the run is failed as a livelock (a seed
/// takes milliseconds; on the paused clock a livelock never lets time pass, so only the
/// wall clock can tell it from work).
pub const SEED_WALL_SECS_MAX: u64 = 60;
/// Requests per seed unless `ENROLLD_SIM_OPS` says otherwise.
pub const OPS_DEFAULT: usize = 1_000;
const SHARDS: usize = 2;
const COURSES: usize = 5;
const STUDENTS: usize = 14;
const CAPACITY_MAX: u32 = 5;
const WAITLIST_MAX: u32 = 4;
/// Largest page the simulation reads the change feed in.
const FEED_PAGE_MAX: u32 = 9;
/// Identical requests a hammering script sends at once: more than may wait on one seat.
const FLOOD_COPIES: usize = crate::shard::SEAT_WAITERS_MAX + 4;
/// Lives (start, load, serve, crash) per seed, at most.
const LIVES_MAX: u32 = 3;
/// Changes queued for commit at most: small, so a full queue is a fault seeds reach.
const QUEUE_ROWS_MAX: usize = 64;
/// The store's statement timeout in the simulation.
const STATEMENT_TIMEOUT_MS: u64 = 400;
/// Simulated time the healed system gets to settle before the checker looks.
const SETTLE_MS: u64 = 30_000;
/// Wall-clock origin of the simulated clock.
const T0_MS: UnixMs = 1_800_000_000_000;
/// Largest step of the simulated clock, either way.
const CLOCK_STEP_MS_MAX: i64 = 6_000;
/// Largest jump of the simulated clock, either way (beyond `CLOCK_BACKSTEP_ABSORB_MS`).
const CLOCK_JUMP_MS_MAX: i64 = 3 * crate::ids::CLOCK_BACKSTEP_ABSORB_MS;

/// A wall clock that creeps forward on every read and now and then steps back or forward,
/// as NTP, a VM resume or an operator make a real one do.
pub struct SimClock {
    now: AtomicI64,
    rng: parking_lot::Mutex<StdRng>,
    step_chance: f64,
}

impl SimClock {
    fn new(seed: u64, step_chance: f64) -> SimClock {
        SimClock {
            now: AtomicI64::new(T0_MS),
            rng: parking_lot::Mutex::new(StdRng::seed_from_u64(seed)),
            step_chance,
        }
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> UnixMs {
        let mut rng = self.rng.lock();
        let mut now = self.now.load(Ordering::Relaxed) + rng.gen_range(0..=3);
        if rng.gen_bool(self.step_chance) {
            // Mostly small steps (absorbed by the shard clock), now and then a large one
            // (followed, as the correction of a clock that had jumped).
            let max = if rng.gen_bool(0.1) {
                CLOCK_JUMP_MS_MAX
            } else {
                CLOCK_STEP_MS_MAX
            };
            now += rng.gen_range(-max..=max);
        }
        self.now.store(now, Ordering::Relaxed);
        now
    }
}

/// What one seed did, summed for the coverage check.
#[derive(Debug, Default)]
pub struct Report {
    pub requests: u64,
    pub lives: u64,
    pub counts: std::collections::BTreeMap<&'static str, u64>,
}

impl Report {
    fn add(&mut self, other: &Report) {
        self.requests += other.requests;
        self.lives += other.lives;
        for (k, v) in &other.counts {
            *self.counts.entry(k).or_default() += v;
        }
    }
}

/// Runs one seed to the end: several lives over one simulated store, each ending in a
/// crash or in a heal-and-check. Err names the first violation.
pub fn run(seed: u64, ops: usize) -> Result<Report, String> {
    panics::watch();
    let mut rng = StdRng::seed_from_u64(seed);
    let store = SimStore::new(rng.gen());
    let courses: Vec<CourseId> = (0..COURSES)
        .map(|i| CourseId::parse(&format!("C{i}")).expect("valid"))
        .collect();
    let students: Vec<StudentId> = (0..STUDENTS)
        .map(|i| StudentId::parse(&format!("s{i:02}")).expect("valid"))
        .collect();
    for c in &courses {
        store.create_course(c, random_spec(&mut rng));
    }
    let clock = Arc::new(SimClock::new(rng.gen(), rng.gen_range(0.0..0.05)));
    let checker = Rc::new(std::cell::RefCell::new(Checker::new(store.clone())));
    let lives = rng.gen_range(1..=LIVES_MAX);
    let mut report = Report::default();
    for life in 0..lives {
        let last = life + 1 == lives;
        if life > 0 && rng.gen_bool(0.2) {
            // An operator's hand edit between two lives: capacity below the seats held.
            if let Some((course, seats)) = store.lower_capacity_below_seats(&mut rng) {
                checker.borrow_mut().allow_overfull(&course, seats);
                *report.counts.entry("hand edit: overfull").or_default() += 1;
            }
        }
        let runtime = paused_runtime().map_err(|e| e.to_string())?;
        let local = tokio::task::LocalSet::new();
        let life_ops = ops / lives as usize;
        let world = World {
            store: store.clone(),
            clock: clock.clone(),
            checker: checker.clone(),
            courses: courses.clone(),
            students: students.clone(),
            // Each life is a new process: a new node, taking every lease over.
            node: life * 2 + 1,
            queue_rows_max: QUEUE_ROWS_MAX,
        };
        let result = local.block_on(&runtime, world.live(StdRng::seed_from_u64(rng.gen()), life_ops, last));
        drop(local);
        drop(runtime);
        if let Some(message) = panics::take() {
            return Err(format!("life {life}: a task panicked: {message}"));
        }
        result.map_err(|e| format!("life {life}: {e}"))?;
        // The process is gone: commits still on their way land or roll back.
        store.crash();
        checker
            .borrow_mut()
            .after_crash()
            .map_err(|e| format!("after life {life}: {e}"))?;
        report.lives += 1;
    }
    report.add(&checker.borrow().report());
    report.add(&store.report());
    Ok(report)
}

/// The persist side of a simulated process: small batches and queues, two committers, the
/// simulation's statement timeout.
fn persist_config(breaker: Arc<Breaker>, leases: Option<persist::LeaseConfig>, queue_rows_max: usize) -> PersistConfig {
    PersistConfig {
        store_url: "sim://".into(),
        store: StoreOptions {
            pool_connections_max: 3,
            acquire_timeout_ms: STATEMENT_TIMEOUT_MS,
            events: true,
        },
        commits_in_flight_max: 2,
        batch_rows_max: 6,
        batch_linger_us: 300,
        queue_rows_max,
        demo: false,
        statement_timeout: Duration::from_millis(STATEMENT_TIMEOUT_MS),
        events_retention: None,
        events_stream: None,
        leases,
        metrics: Arc::default(),
        breaker,
    }
}

fn random_spec(rng: &mut StdRng) -> CourseSpec {
    let opens_at = rng.gen_bool(0.5).then(|| T0_MS + rng.gen_range(-4_000..4_000));
    let closes_at = rng
        .gen_bool(0.4)
        .then(|| opens_at.unwrap_or(T0_MS) + rng.gen_range(1_000..12_000));
    // Now and then a draw (within the first seconds, so lives reach it) and a waitlist.
    let draw_at = rng
        .gen_bool(0.3)
        .then(|| opens_at.unwrap_or(T0_MS - 10_000) + rng.gen_range(1..6_000))
        .filter(|d| closes_at.is_none_or(|c| *d < c));
    CourseSpec {
        title: "simulated".into(),
        capacity: rng.gen_range(0..=CAPACITY_MAX),
        opens_at,
        closes_at,
        draw_at,
        waitlist_max: if rng.gen_bool(0.5) {
            rng.gen_range(1..=WAITLIST_MAX)
        } else {
            0
        },
    }
}

/// A one-thread runtime on a paused clock: time moves only when every task waits.
fn paused_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
}

/// One process's worth of the simulation.
struct World {
    store: Rc<SimStore>,
    clock: Arc<SimClock>,
    checker: Rc<std::cell::RefCell<Checker>>,
    courses: Vec<CourseId>,
    students: Vec<StudentId>,
    /// This life's node; its successor (a takeover mid-life) is `node + 1`.
    node: store::NodeTag,
    /// The persist queue's bound ([`QUEUE_ROWS_MAX`] but in a test that needs room).
    queue_rows_max: usize,
}

/// One running node of the simulation: its persist committers and shards.
struct Node {
    handle: persist::PersistHandle,
    routers: Vec<Rc<Router>>,
}

impl World {
    /// Starts a node: it takes every lease over in the store (bumping the epochs, so
    /// whatever an earlier node still has in flight can never commit), then its persist
    /// committers, then its shards loaded from the store.
    fn start_node(&self, node: store::NodeTag) -> Result<Node, String> {
        let breaker = Arc::new(Breaker::new(
            "store",
            BreakerConfig {
                window_calls: 20,
                calls_min: 5,
                slow_call_ms: 150,
                open_ms: 300,
                ..BreakerConfig::default()
            },
        ));
        let held = Arc::new(crate::partition::Held::default());
        self.store.take_over(node);
        let (gen, owned) = self.store.fence_state(node);
        for lease in &owned {
            held.grant(*lease);
        }
        held.refresh(gen, &owned);
        let leases = persist::LeaseConfig {
            node: persist::lease::NodeInfo {
                id: format!("sim-{node}"),
                incarnation: i64::from(node),
                advertise: String::new(),
                lease: Duration::from_secs(3),
            },
            held,
            solo: true,
            metrics: Arc::default(),
        };
        let pcfg = persist_config(breaker.clone(), Some(leases), self.queue_rows_max);
        self.store.set_breaker(node, breaker.clone());
        let (handle, queues) = persist::queues(&pcfg);
        let backend = store::SimNode {
            store: self.store.clone(),
            node,
        };
        tokio::task::spawn_local(async move { persist::serve(&backend, &pcfg, queues).await });
        let routers = self.start_shards(handle.clone(), breaker)?;
        Ok(Node {
            handle,
            routers: routers.into_iter().map(Rc::new).collect(),
        })
    }

    /// Starts persist and the shards from the store, runs `ops` requests under changing
    /// weather, then either crashes (returns with work in flight) or heals and checks.
    async fn live(self, mut rng: StdRng, ops: usize, last: bool) -> Result<(), String> {
        let mut node = self.start_node(self.node)?;
        self.checker
            .borrow_mut()
            .set_shards(node.routers.iter().map(|r| r.me.clone()).collect());
        self.checker.borrow().check_loaded()?;
        self.store.set_weather(Weather::calm());
        // Now and then this node is paused past its lease mid-life, and a successor takes
        // every partition over: the paused node's work in flight must be fenced out, and
        // the successor starts from exactly what was acknowledged.
        let takeover_at = rng.gen_bool(0.4).then(|| rng.gen_range(0..ops.max(1)));
        for op in 0..ops {
            tokio::time::sleep(Duration::from_micros(rng.gen_range(0..3_000))).await;
            if rng.gen_bool(0.03) {
                self.store.set_weather(Weather::random(&mut rng));
            }
            if takeover_at == Some(op) {
                // The paused node keeps its requests in flight (it answers them when it
                // resumes); new requests reach the successor (the paused node would pass
                // them on, its lease no longer vouched for).
                self.checker.borrow_mut().depose();
                node = self.start_node(self.node + 1)?;
                self.checker
                    .borrow_mut()
                    .set_shards(node.routers.iter().map(|r| r.me.clone()).collect());
                self.checker.borrow().check_step()?;
            }
            let routers = &node.routers;
            let router = routers[rng.gen_range(0..routers.len())].clone();
            let request = self.random_request(&mut rng);
            // Now and then a double click, a script hammering one seat, or one toggling it
            // (POSTs and DELETEs of one seat mixed: a request then waits on several
            // changes in a row and can run out of rounds).
            let (copies, toggle) = match rng.gen_range(0..100) {
                0 => (FLOOD_COPIES, false),
                1 => (FLOOD_COPIES, true),
                2..=5 => (2, false),
                _ => (1, false),
            };
            for _ in 0..copies {
                let request = match (&request, toggle && rng.gen_bool(0.5)) {
                    (Request::Enroll { course, student }, true) => Request::Drop {
                        course: course.clone(),
                        student: student.clone(),
                    },
                    (Request::Drop { course, student }, true) => Request::Enroll {
                        course: course.clone(),
                        student: student.clone(),
                    },
                    _ => request.clone(),
                };
                self.spawn_request(router.clone(), request);
            }
            self.checker.borrow().check_step()?;
        }
        if !last && rng.gen_bool(0.7) {
            // Crash with work in flight.
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..STATEMENT_TIMEOUT_MS * 2))).await;
            return Ok(());
        }
        self.store.set_weather(Weather::calm());
        let answer_bound = Duration::from_millis(STATEMENT_TIMEOUT_MS) * ANSWER_WAIT_STATEMENT_TIMEOUTS;
        tokio::time::sleep(answer_bound + Duration::from_millis(STATEMENT_TIMEOUT_MS)).await;
        self.checker.borrow().check_all_answered()?;
        tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;
        self.checker.borrow().check_settled()?;
        let feed = read_feed(&node.handle, &mut rng).await?;
        self.checker.borrow().check_feed(&feed)
    }

    fn start_shards(&self, persist: persist::PersistHandle, breaker: Arc<Breaker>) -> Result<Vec<Router>, String> {
        let mut tables: Vec<CourseTable> = (0..SHARDS).map(|_| CourseTable::default()).collect();
        // The store has no duplicate seats: every stored seat is loaded, even past capacity.
        let mut refused = Vec::new();
        self.store.load(|row| {
            let owner = owner_of(row.course(), SHARDS).0;
            if let Err(what) = tables[owner].load_row(row) {
                refused.push(what);
            }
        });
        if !refused.is_empty() {
            return Err(format!("start: stored seats not loaded into memory: {refused:?}"));
        }
        let limits = LimitsConfig {
            enabled: false,
            ..LimitsConfig::default()
        };
        let (_tx, rx) = watch::channel(Arc::new(limits));
        let limiter = Arc::new(Limiter::new(rx, None, breaker).map_err(|e| e.to_string())?);
        let (inbox_tx, inbox_rx): (Vec<_>, Vec<_>) = (0..SHARDS).map(|_| mpsc::channel::<Envelope>(64)).unzip();
        let answer_wait = Duration::from_millis(STATEMENT_TIMEOUT_MS) * ANSWER_WAIT_STATEMENT_TIMEOUTS;
        let mut routers = Vec::new();
        // Draw seeds from the simulation's own seed, so a run replays.
        let seeds = std::cell::RefCell::new(StdRng::seed_from_u64(u64::from(self.node)));
        let draw_seeds: Rc<dyn Fn() -> [u8; 32]> = Rc::new(move || seeds.borrow_mut().gen());
        for (i, (table, inbox)) in tables.into_iter().zip(inbox_rx).enumerate() {
            let clock: Arc<dyn Clock> = self.clock.clone();
            let shard = Rc::new(
                Shard::new(
                    ShardId(i),
                    table,
                    persist.clone(),
                    Arc::default(),
                    Rc::new(ShardLimiter::new(limiter.clone(), SHARDS)),
                    |_| bytes::Bytes::new(),
                    ShardClock::new(clock),
                    answer_wait,
                )
                .with_draw_seeds(draw_seeds.clone()),
            );
            tokio::task::spawn_local(serve_inbox(shard.clone(), inbox));
            tokio::task::spawn_local(run_rounds(shard.clone()));
            routers.push(Router {
                me: shard,
                peers: inbox_tx.clone(),
            });
        }
        Ok(routers)
    }

    fn random_request(&self, rng: &mut StdRng) -> Request {
        let course = self.courses[rng.gen_range(0..self.courses.len())].clone();
        let student = self.students[rng.gen_range(0..self.students.len())].clone();
        match rng.gen_range(0..100) {
            0..=59 => Request::Enroll { course, student },
            60..=89 => Request::Drop { course, student },
            _ => Request::Put {
                course,
                spec: random_spec(rng),
            },
        }
    }

    fn spawn_request(&self, router: Rc<Router>, request: Request) {
        let checker = self.checker.clone();
        let id = checker.borrow_mut().begin(&request);
        tokio::task::spawn_local(async move {
            let reply = router.call(request.course(), command_of(&request)).await;
            checker.borrow_mut().end(id, &request, &reply);
        });
    }
}

/// The whole change feed, through the persist read path, in pages of random size.
async fn read_feed(persist: &persist::PersistHandle, rng: &mut StdRng) -> Result<Vec<Event>, String> {
    let mut feed = Vec::new();
    let mut after = None;
    loop {
        let rx = persist
            .read_events(after, rng.gen_range(1..=FEED_PAGE_MAX))
            .map_err(|e| e.to_string())?;
        let page = rx
            .await
            .map_err(|_| "the feed reader went away".to_string())?
            .map_err(|e| e.to_string())?;
        if page.events.is_empty() {
            return Ok(feed);
        }
        after = Some(page.next);
        feed.extend(page.events);
    }
}

fn command_of(request: &Request) -> Command {
    match request.clone() {
        Request::Enroll { course, student } => Command::Enroll {
            course,
            student,
            admission: Admission {
                profile: LimitsConfig::default().profiles["student"],
                ipseg: 0,
            },
        },
        Request::Drop { course, student } => Command::Drop { course, student },
        Request::Put { course, spec } => Command::Put { course, spec },
    }
}

/// Panics inside simulated tasks: tokio turns a task's panic into a `JoinError` (which the
/// shard would answer as an unknown outcome), while production aborts the process on
/// any panic. So the simulation records every panic on its thread and fails the seed.
mod panics {
    use std::cell::RefCell;

    thread_local! {
        static PANICKED: RefCell<Option<String>> = const { RefCell::new(None) };
    }

    pub fn watch() {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                PANICKED.with(|p| {
                    p.borrow_mut().get_or_insert_with(|| info.to_string());
                });
                default(info);
            }));
        });
        take();
    }

    pub fn take() -> Option<String> {
        PANICKED.with(|p| p.borrow_mut().take())
    }
}

/// Seeds from `ENROLLD_SIM_SEED` (one) or `ENROLLD_SIM_SEEDS` fresh ones from the OS.
fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("ENROLLD_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![seed];
    }
    let count = std::env::var("ENROLLD_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEEDS_DEFAULT);
    let base: u64 = rand::random::<u32>() as u64 * 1_000;
    (base..base + count).collect()
}

/// Fails the whole run, naming the seed, when one seed runs past [`SEED_WALL_SECS_MAX`]:
/// a livelock would otherwise hang the test (and CI) instead of failing it. Exiting is the
/// only way out of a seed spinning on this thread.
#[cfg(test)]
struct Watchdog {
    /// The seed running (its number + 1; 0: none) and when it started.
    running: std::sync::Arc<(std::sync::atomic::AtomicU64, parking_lot::Mutex<std::time::Instant>)>,
}

#[cfg(test)]
impl Watchdog {
    fn start() -> Watchdog {
        use std::sync::atomic::Ordering;
        let running = std::sync::Arc::new((
            std::sync::atomic::AtomicU64::new(0),
            parking_lot::Mutex::new(std::time::Instant::now()),
        ));
        let watched = std::sync::Arc::downgrade(&running);
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            let Some(running) = watched.upgrade() else { return };
            let seed = running.0.load(Ordering::Relaxed);
            if seed > 0 && running.1.lock().elapsed().as_secs() > SEED_WALL_SECS_MAX {
                let seed = seed - 1;
                // Straight to the stream: the test harness captures `eprintln!`, and would
                // drop it at the exit.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "simulation seed {seed} ran over {SEED_WALL_SECS_MAX} s of wall time: a livelock?\n\
                     replay: ENROLLD_SIM_SEED={seed} cargo test --release --lib sim::"
                );
                std::process::exit(101);
            }
        });
        Watchdog { running }
    }

    fn seed(&self, seed: u64) {
        *self.running.1.lock() = std::time::Instant::now();
        self.running.0.store(seed + 1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn simulation_holds_every_promise_under_faults() {
    let ops = std::env::var("ENROLLD_SIM_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(OPS_DEFAULT);
    let seeds = seeds();
    let mut total = Report::default();
    let watchdog = Watchdog::start();
    for &seed in &seeds {
        watchdog.seed(seed);
        // A panic outside a task (the world itself, a start) fails the seed too, with its seed.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(seed, ops)))
            .unwrap_or_else(|_| Err(format!("panicked: {}", panics::take().unwrap_or_default())));
        match result {
            Ok(report) => total.add(&report),
            Err(e) => panic!(
                "simulation seed {seed} failed: {e}\nreplay: ENROLLD_SIM_SEED={seed} cargo test --release --lib sim::"
            ),
        }
    }
    eprintln!(
        "simulation: {} seeds ({}..={}), {} requests, {} lives; {:?}",
        seeds.len(),
        seeds[0],
        seeds[seeds.len() - 1],
        total.requests,
        total.lives,
        total.counts
    );
    if seeds.len() >= 16 {
        // The generator must keep reaching every fault and every kind of answer.
        for what in checker::COVERED.iter().chain(store::COVERED) {
            assert!(
                total.counts.get(what).copied().unwrap_or(0) > 0,
                "no seed reached {what:?}: {:?}",
                total.counts
            );
        }
    }
}

/// A seat command forwarded to its owner shard whose reply is lost (the owner's runtime
/// went down at shutdown with the command in hand) may have been committed: the caller
/// answers "unknown" (the connection is closed), never 503 "nothing recorded".
#[test]
fn a_forwarded_command_whose_reply_is_lost_is_unknown_not_unavailable() {
    let runtime = paused_runtime().expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let store = SimStore::new(1);
        let world = World {
            store: store.clone(),
            clock: Arc::new(SimClock::new(1, 0.0)),
            checker: Rc::new(std::cell::RefCell::new(Checker::new(store))),
            courses: Vec::new(),
            students: Vec::new(),
            node: 1,
            queue_rows_max: QUEUE_ROWS_MAX,
        };
        let breaker = Arc::new(Breaker::new("store", BreakerConfig::default()));
        let (handle, _queues) = persist::queues(&persist_config(breaker.clone(), None, QUEUE_ROWS_MAX));
        let mut routers = world.start_shards(handle, breaker).expect("shards");
        let me = routers.swap_remove(0);
        // Shard 1's inbox: takes the command, then goes down without answering.
        let (tx, mut rx) = mpsc::channel::<Envelope>(1);
        let router = Router {
            me: me.me.clone(),
            peers: vec![me.peers[0].clone(), tx],
        };
        tokio::task::spawn_local(async move {
            let envelope = rx.recv().await.expect("the forwarded command");
            drop(envelope);
        });
        let course = (0..)
            .map(|i| CourseId::parse(&format!("X{i}")).expect("valid"))
            .find(|c| owner_of(c, SHARDS).0 == 1)
            .expect("a course of shard 1");
        let student = StudentId::parse("s1").expect("valid");
        let request = Request::Enroll { course, student };
        let reply = router.call(request.course(), command_of(&request)).await;
        assert_eq!(reply, crate::shard::Reply::OutcomeUnknown);
    });
}

/// Holders drop from a full course while a burst joins its waitlist. One drop holds the
/// lane, so every joiner waits (more than [`LANE_ALONE_WAITERS_MAX`]), and then the other
/// drops come: each must still find room to wait for the lane alone. Every drop is
/// answered "dropped", every joiner is placed (seated or waiting), and the seats given up
/// go to joiners.
///
/// [`LANE_ALONE_WAITERS_MAX`]: crate::shard::LANE_ALONE_WAITERS_MAX
#[test]
fn drops_find_room_to_wait_behind_a_burst_of_joins() {
    use crate::shard::{Reply, LANE_ALONE_WAITERS_MAX};
    const SEATS: u32 = 6;
    const JOINERS: usize = LANE_ALONE_WAITERS_MAX * 3;
    let runtime = paused_runtime().expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let store = SimStore::new(1);
        let course = CourseId::parse("BURST").expect("valid");
        store.create_course(
            &course,
            CourseSpec {
                waitlist_max: JOINERS as u32,
                ..CourseSpec::plain("burst", SEATS, None, None)
            },
        );
        let world = World {
            store: store.clone(),
            clock: Arc::new(SimClock::new(1, 0.0)),
            checker: Rc::new(std::cell::RefCell::new(Checker::new(store.clone()))),
            courses: vec![course.clone()],
            students: Vec::new(),
            node: 1,
            // Room for the whole burst: a full queue is not what this test is about.
            queue_rows_max: JOINERS * 2,
        };
        let node = world.start_node(1).expect("the node");
        let router = node.routers[0].clone();
        let student = |name: String| StudentId::parse(&name).expect("valid");
        let call = |request: Request| {
            let router = router.clone();
            tokio::task::spawn_local(async move { router.call(request.course(), command_of(&request)).await })
        };
        for h in 0..SEATS {
            let enroll = Request::Enroll {
                course: course.clone(),
                student: student(format!("h{h}")),
            };
            let reply = call(enroll).await.expect("the task");
            assert!(matches!(reply, Reply::Enrolled { created: true, .. }), "{reply:?}");
        }
        let drop_of = |h: u32| {
            call(Request::Drop {
                course: course.clone(),
                student: student(format!("h{h}")),
            })
        };
        let mut drops = vec![drop_of(0)];
        let joins: Vec<_> = (0..JOINERS)
            .map(|j| {
                call(Request::Enroll {
                    course: course.clone(),
                    student: student(format!("j{j:03}")),
                })
            })
            .collect();
        drops.extend((1..SEATS).map(drop_of));
        for d in drops {
            assert_eq!(d.await.expect("the task"), Reply::Dropped("dropped"));
        }
        for j in joins {
            match j.await.expect("the task") {
                Reply::Enrolled { created: true, .. } | Reply::Placed(_) => {}
                other => panic!("a joiner was answered {other:?}"),
            }
        }
        let rows = store.rows();
        let seats = rows.seats_of(&course);
        assert_eq!(seats.len(), SEATS as usize, "{seats:?}");
        assert!(seats.iter().all(|s| s.as_str().starts_with('j')), "{seats:?}");
        assert_eq!(
            rows.waitlist_of(&course).len(),
            JOINERS - SEATS as usize,
            "each joiner once"
        );
    });
}
