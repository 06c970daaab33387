//! Cluster mode (API.md, "Several nodes"): three real `enrolld serve --node-id` processes on
//! loopback ports share one MariaDB database and the suite's Redis (under a prefix of their
//! own). Any node answers any request (the owner decides, one hop away) and says which node
//! decided; a rush sent to random nodes neither oversells nor undersells and the store holds
//! exactly what was acknowledged; a node killed with `kill -9` or stopped with SIGTERM has
//! its courses sold again by the others, losing nothing; a node paused past its lease, or cut
//! off from the store mid-commit, is fenced out: nothing it decided under its old lease is
//! recorded, and it does not go on answering from that memory. A non-cluster process on the
//! cluster's database is refused and leaves the cluster's leases alone.
//!
//! Which node owns a course is read from its roster's `X-Enrolld-Node` (only the owner
//! answers a roster; a read of the course itself may come from the asked node's catalog
//! cache, and then names that node).
//!
//! Takeover and hand-over times are measured and printed, never asserted (STYLE.md,
//! "Tests"); every wait has a bound only so that a broken cluster fails instead of hanging.
//! The tests run one at a time: each runs three nodes on a two-core machine, and the lease
//! tests need their heartbeats on time.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::net::TcpStream;

const NODE_IDS: [&str; 3] = ["n1", "n2", "n3"];
/// Partitions in every store (`partition::PARTITIONS`).
const PARTITIONS: f64 = 16384.0;
/// Shards per node (the machine has two cores).
const SHARDS: &str = "2";
/// The lease of the failure tests: a dead node's courses sell again about a second later.
const SHORT_LEASE_MS: u64 = 1_000;
/// Liveness guards, not timing assertions.
const CONVERGE_WAIT_MS_MAX: u64 = 30_000;
const TAKEOVER_WAIT_MS_MAX: u64 = 20_000;
const EXIT_WAIT_MS_MAX: u64 = 30_000;
/// A client's bound on one answer: above a hop's own bound (3 statement timeouts, 15 s),
/// so a 504 is seen as the node sent it.
const ANSWER_WAIT_MS_MAX: u64 = 20_000;
const CONNECT_WAIT_MS_MAX: u64 = 5_000;
/// How long a client keeps retrying one request on other nodes (retrying is always safe).
const RETRY_WAIT_MS_MAX: u64 = 25_000;
const RETRY_PAUSE_MS: u64 = 50;
const POLL_MS: u64 = 50;
/// A polling read that gets no answer in this long is given up and asked again (a hop to a
/// stopped owner would wait 15 s).
const POLL_ANSWER_WAIT_MS_MAX: u64 = 2_000;
/// Pause of each client between two enrollments in the failover rushes, so the rush lasts
/// across the failure instead of being over before it.
const FAILOVER_PACE_MS: u64 = 10;

/// One cluster test at a time.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// `enrolld serve` as node `id` on a fixed loopback port (restarts must keep the port: it is
/// the node's advertised address).
fn start_node(setup: &NodeSetup, id: &str, port: u16, lease_ms: Option<u64>) -> Server {
    let mut args: Vec<String> = [
        "serve",
        "--node-id",
        id,
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--store",
        &setup.store,
        "--jwt-secret",
        SECRET,
        "--shards",
        SHARDS,
    ]
    .map(String::from)
    .to_vec();
    if let Some(lease) = lease_ms {
        args.extend(["--cluster-lease-ms".to_string(), lease.to_string()]);
    }
    args.extend(setup.extra.iter().cloned());
    Server::start_args(args)
}

/// How one node is started, beyond its id and port.
#[derive(Clone, Default)]
struct NodeSetup {
    store: String,
    extra: Vec<String>,
}

/// The suite's shared Redis (as tests/limits.rs); each cluster keeps to its own prefix.
fn redis_url() -> String {
    std::env::var("ENROLLD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Three nodes, n1 n2 n3, on one fresh database.
struct Cluster {
    /// Dropped (killed) before the database.
    nodes: Vec<Option<Server>>,
    ports: Vec<u16>,
    setups: Vec<NodeSetup>,
    lease_ms: Option<u64>,
    db: TestDb,
    _one_at_a_time: tokio::sync::MutexGuard<'static, ()>,
}

impl Cluster {
    /// Starts the nodes one after the other and waits until they share the partitions.
    async fn start(lease_ms: Option<u64>) -> Cluster {
        Cluster::start_with(lease_ms, |_, _| None).await
    }

    /// [`Cluster::start`] with node `i` started as `setup(i, db)` says: its own store URL
    /// when not empty, and extra flags (None: as the others). Every node shares one Redis
    /// under a prefix of the cluster's own (the catalog cache follows changes over it).
    async fn start_with(lease_ms: Option<u64>, setup: impl Fn(usize, &TestDb) -> Option<NodeSetup>) -> Cluster {
        let guard = ONE_CLUSTER_AT_A_TIME.lock().await;
        let db = TestDb::new();
        let ports: Vec<u16> = NODE_IDS.iter().map(|_| free_port()).collect();
        let redis = [
            "--redis".to_string(),
            redis_url(),
            "--redis-prefix".to_string(),
            format!("{}:", db.name),
        ];
        let setups: Vec<NodeSetup> = (0..NODE_IDS.len())
            .map(|i| {
                let own = setup(i, &db).unwrap_or_default();
                NodeSetup {
                    store: Some(own.store)
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| db.url.clone()),
                    extra: redis.iter().cloned().chain(own.extra).collect(),
                }
            })
            .collect();
        let started = Instant::now();
        let nodes = NODE_IDS
            .iter()
            .zip(&ports)
            .zip(&setups)
            .map(|((id, port), setup)| Some(start_node(setup, id, *port, lease_ms)))
            .collect();
        let cluster = Cluster {
            nodes,
            ports,
            setups,
            lease_ms,
            db,
            _one_at_a_time: guard,
        };
        let waited = cluster.wait_converged(&[0, 1, 2]).await;
        eprintln!(
            "cluster of 3 (lease {lease_ms:?} ms) ready in {} ms, sharing the partitions {} ms later",
            ms(started.elapsed() - waited),
            ms(waited)
        );
        cluster
    }

    fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports[i]))
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        (0..NODE_IDS.len()).map(|i| self.addr(i)).collect()
    }

    fn pid(&self, i: usize) -> u32 {
        self.nodes[i].as_ref().expect("node running").child.id()
    }

    /// Starts node `i` again under its id and port.
    fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "node {} still runs", NODE_IDS[i]);
        self.nodes[i] = Some(start_node(&self.setups[i], NODE_IDS[i], self.ports[i], self.lease_ms));
    }

    /// Waits until the nodes `live` hold every partition between them, each a share, and
    /// each sees no partition without a live owner; how long it took.
    async fn wait_converged(&self, live: &[usize]) -> Duration {
        let started = Instant::now();
        loop {
            let mut held = Vec::new();
            let mut unowned = Vec::new();
            for &i in live {
                held.push(node_metric(self.addr(i), "enrolld_cluster_leases_held").await);
                unowned.push(node_metric(self.addr(i), "enrolld_cluster_partitions_unowned").await);
            }
            if held.iter().sum::<f64>() == PARTITIONS
                && held.iter().all(|h| *h > 0.0)
                && unowned.iter().all(|u| *u == 0.0)
            {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_millis(CONVERGE_WAIT_MS_MAX),
                "nodes {live:?} did not share the partitions: held {held:?}, unowned {unowned:?}"
            );
            tokio::time::sleep(Duration::from_millis(POLL_MS * 2)).await;
        }
    }

    /// Creates courses `{prefix}-NN` of `capacity` through the nodes in turn until `want`
    /// of them are owned by node `owner`; those.
    async fn courses_owned_by(&self, owner: usize, prefix: &str, want: usize, capacity: u32) -> Vec<String> {
        let mut owned = Vec::new();
        for n in 0..want * 40 {
            let id = format!("{prefix}-{n:02}");
            let mut c = Conn::open(self.addr(n % NODE_IDS.len())).await;
            put_course(&mut c, &id, capacity).await;
            if owner_of(&mut c, &id).await == NODE_IDS[owner] {
                owned.push(id);
                if owned.len() == want {
                    return owned;
                }
            }
        }
        panic!(
            "{} of {want} courses {prefix}-* owned by {}",
            owned.len(),
            NODE_IDS[owner]
        );
    }

    /// The students the store holds in `course`, and its (capacity, enrolled).
    fn store_course(&self, course: &str) -> (BTreeSet<String>, (u64, u64)) {
        let rows = self
            .db
            .query(&format!(
                "SELECT student_id FROM enrollments WHERE course_id = '{course}'"
            ))
            .into_iter()
            .map(|r| r[0].clone())
            .collect();
        let row = self
            .db
            .query(&format!("SELECT capacity, enrolled FROM courses WHERE id = '{course}'"));
        (rows, (row[0][0].parse().unwrap(), row[0][1].parse().unwrap()))
    }

    /// The node the store gives `course`'s partition to (None: nobody).
    fn store_owner(&self, course: &str) -> Option<String> {
        let rows = self.db.query(&format!(
            "SELECT COALESCE(l.owner, 'NULL') FROM leases l JOIN courses c ON c.part = l.part WHERE c.id = '{course}'"
        ));
        Some(rows[0][0].clone()).filter(|o| o != "NULL")
    }
}

/// One sample of node `addr`'s metrics (0 when absent).
async fn node_metric(addr: SocketAddr, sample: &str) -> f64 {
    let mut c = Conn::open(addr).await;
    metric(&mut c, sample).await.unwrap_or(0.0)
}

/// The roster route: only a course's owner answers it (a read of the course itself may
/// come from the asked node's catalog cache).
fn roster_path(course: &str) -> String {
    format!("/v1/admin/courses/{course}/roster")
}

/// The course's owner: the node that answers its roster.
async fn owner_of(c: &mut Conn, id: &str) -> String {
    let r = c.request("GET", &roster_path(id), Some(&admin_token()), None).await;
    assert_eq!(r.status, 200, "roster of {id}: {}", String::from_utf8_lossy(&r.body));
    r.header("x-enrolld-node").expect("X-Enrolld-Node on /v1").to_string()
}

/// The students of a roster answer, sorted.
fn students_of(r: &Resp) -> BTreeSet<String> {
    r.json()["students"]
        .as_array()
        .expect("students")
        .iter()
        .map(|s| s.as_str().expect("student id").to_string())
        .collect()
}

/// A connection to `addr`, or None when nothing accepts there.
async fn connect(addr: SocketAddr) -> Option<Conn> {
    let wait = Duration::from_millis(CONNECT_WAIT_MS_MAX);
    // `Conn::open` panics when nothing listens: look first, and keep its panic in a task of
    // its own for the instant a node dies between the two.
    tokio::time::timeout(wait, TcpStream::connect(addr)).await.ok()?.ok()?;
    tokio::time::timeout(wait, tokio::spawn(Conn::open(addr)))
        .await
        .ok()?
        .ok()
}

/// One request on a connection of its own, given up after `wait`: None without an answer.
async fn ask(addr: SocketAddr, method: &str, path: &str, tok: &str, wait: Duration) -> Option<Resp> {
    let mut conn = connect(addr).await?;
    tokio::time::timeout(wait, async {
        conn.send_request(method, path, Some(tok), None).await.ok()?;
        conn.read_response().await
    })
    .await
    .ok()
    .flatten()
}

/// Polls `GET /v1/courses/{course}` on `addr` until `until` holds for the answer; the answer.
async fn poll_course(addr: SocketAddr, course: &str, what: &str, until: impl Fn(&Resp) -> bool) -> Resp {
    poll_get(addr, &format!("/v1/courses/{course}"), what, until).await
}

/// Polls the roster of `course` through `addr` until `until` holds for the answer.
async fn poll_roster(addr: SocketAddr, course: &str, what: &str, until: impl Fn(&Resp) -> bool) -> Resp {
    poll_get(addr, &roster_path(course), what, until).await
}

/// Polls `GET path` (as admin) on `addr` until `until` holds for the answer; the answer.
async fn poll_get(addr: SocketAddr, path: &str, what: &str, until: impl Fn(&Resp) -> bool) -> Resp {
    let started = Instant::now();
    let mut last = None;
    loop {
        let answer = ask(
            addr,
            "GET",
            path,
            &admin_token(),
            Duration::from_millis(POLL_ANSWER_WAIT_MS_MAX),
        )
        .await;
        if let Some(r) = answer {
            if until(&r) {
                return r;
            }
            last = Some((
                r.status,
                r.header("x-enrolld-node").map(str::to_owned),
                String::from_utf8_lossy(&r.body).into_owned(),
            ));
        }
        assert!(
            started.elapsed() < Duration::from_millis(TAKEOVER_WAIT_MS_MAX),
            "{what}: GET {path} on {addr} never did within {TAKEOVER_WAIT_MS_MAX} ms; last answer {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
}

fn decided_by(r: &Resp) -> &str {
    r.header("x-enrolld-node").unwrap_or("-")
}

fn enrolled_of(r: &Resp) -> u64 {
    r.json()["enrolled"].as_u64().expect("enrolled")
}

/// What a client knows of a seat after its requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seat {
    Held,
    NotHeld,
    /// A request got no answer (or 502/504) and no retry settled it.
    Unknown,
}

/// One answer (or its absence) a client got.
struct Event {
    at: Instant,
    method: &'static str,
    course: String,
    status: Option<u16>,
    /// Its `X-Enrolld-Node`.
    by: Option<String>,
}

/// Every answer every client got.
#[derive(Clone, Default)]
struct Journal(Arc<Mutex<Vec<Event>>>);

impl Journal {
    fn record(&self, method: &'static str, course: &str, answer: Option<&Resp>) {
        self.0.lock().unwrap().push(Event {
            at: Instant::now(),
            method,
            course: course.to_string(),
            status: answer.map(|r| r.status),
            by: answer.and_then(|r| r.header("x-enrolld-node").map(str::to_owned)),
        });
    }

    /// The first seat sold after `after` in one of `courses` by a node other than `not_by`.
    fn first_sale(&self, after: Instant, courses: &BTreeSet<String>, not_by: &str) -> Option<Instant> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.at > after && e.method == "POST" && e.status == Some(201))
            .filter(|e| courses.contains(&e.course) && e.by.as_deref() != Some(not_by))
            .map(|e| e.at)
            .min()
    }

    /// Every answer names one of the nodes as its decider; the count of each status
    /// (0: no answer).
    fn check_deciders(&self) -> BTreeMap<u16, usize> {
        let events = self.0.lock().unwrap();
        let mut statuses = BTreeMap::new();
        for e in events.iter() {
            *statuses.entry(e.status.unwrap_or(0)).or_default() += 1;
            if e.status.is_some() {
                let by = e.by.as_deref();
                assert!(
                    by.is_some_and(|b| NODE_IDS.contains(&b)),
                    "{} {} answered {:?} with X-Enrolld-Node {by:?}",
                    e.method,
                    e.course,
                    e.status
                );
            }
        }
        statuses
    }
}

/// A student's client: one keep-alive connection per node, each request to a node picked
/// at random (no routing by course), retried on another node until it is settled.
struct Client {
    addrs: Vec<SocketAddr>,
    conns: Vec<Option<Conn>>,
    rng: StdRng,
    journal: Journal,
}

impl Client {
    fn new(addrs: &[SocketAddr], journal: &Journal) -> Client {
        Client {
            addrs: addrs.to_vec(),
            conns: addrs.iter().map(|_| None).collect(),
            rng: StdRng::from_entropy(),
            journal: journal.clone(),
        }
    }

    /// One request to node `i`; None when no answer came.
    async fn call(&mut self, i: usize, method: &str, path: &str, tok: &str) -> Option<Resp> {
        if self.conns[i].is_none() {
            self.conns[i] = connect(self.addrs[i]).await;
        }
        let conn = self.conns[i].as_mut()?;
        let answer = tokio::time::timeout(Duration::from_millis(ANSWER_WAIT_MS_MAX), async {
            conn.send_request(method, path, Some(tok), None).await.ok()?;
            conn.read_response().await
        })
        .await
        .ok()
        .flatten();
        if answer.is_none() {
            self.conns[i] = None;
        }
        answer
    }

    /// POST (take) or DELETE (drop) `student`'s seat in `course` until an answer settles it:
    /// 503 recorded nothing and a cut or a 502/504 may have, so both are retried.
    async fn settle(&mut self, method: &'static str, course: &str, student: &str) -> Seat {
        let path = format!("/v1/courses/{course}/enrollment");
        let tok = token(student);
        let deadline = Instant::now() + Duration::from_millis(RETRY_WAIT_MS_MAX);
        let mut cut = false;
        loop {
            let node = self.rng.gen_range(0..self.addrs.len());
            let answer = self.call(node, method, &path, &tok).await;
            self.journal.record(method, course, answer.as_ref());
            match (method, answer.as_ref().map(|r| r.status)) {
                ("POST", Some(200 | 201)) => return Seat::Held,
                ("POST", Some(409)) => return Seat::NotHeld,
                ("DELETE", Some(200)) => return Seat::NotHeld,
                // Not enrolled: an earlier, cut drop did it.
                ("DELETE", Some(404)) => return Seat::NotHeld,
                // Nothing recorded: a client retries (after Retry-After; the pause here).
                (_, Some(429 | 503)) => {}
                (_, Some(502 | 504) | None) => cut = true,
                (_, Some(_)) => {
                    let r = answer.unwrap();
                    panic!(
                        "{method} {path} for {student} at {}: {} {}",
                        self.addrs[node],
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    );
                }
            }
            if Instant::now() > deadline {
                return match (cut, method) {
                    (true, _) => Seat::Unknown,
                    // Only 503s: nothing was recorded.
                    (false, "POST") => Seat::NotHeld,
                    (false, _) => Seat::Held,
                };
            }
            tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await;
        }
    }
}

type Seats = BTreeMap<(String, String), Seat>;

/// Checks the store against what the clients were told: a seat acknowledged is a row, one
/// refused or dropped is none, and only the unsettled may go either way; every course holds
/// `enrolled` = its rows <= its capacity. Returns the rows per course.
fn check_store(cluster: &Cluster, seats: &Seats) -> BTreeMap<String, BTreeSet<String>> {
    let mut rows: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in cluster.db.query("SELECT course_id, student_id FROM enrollments") {
        rows.entry(r[0].clone()).or_default().insert(r[1].clone());
    }
    for r in cluster.db.query("SELECT id, capacity, enrolled FROM courses") {
        let (capacity, enrolled): (usize, usize) = (r[1].parse().unwrap(), r[2].parse().unwrap());
        let count = rows.get(&r[0]).map_or(0, BTreeSet::len);
        assert!(enrolled <= capacity, "{} oversold: {enrolled} of {capacity}", r[0]);
        assert_eq!(
            enrolled, count,
            "{}: enrolled says {enrolled}, the store has {count} rows",
            r[0]
        );
    }
    let unknown: BTreeSet<&(String, String)> = seats
        .iter()
        .filter(|(_, s)| **s == Seat::Unknown)
        .map(|(k, _)| k)
        .collect();
    let held: BTreeSet<(String, String)> = seats
        .iter()
        .filter(|(_, s)| **s == Seat::Held)
        .map(|(k, _)| k.clone())
        .collect();
    let stored: BTreeSet<(String, String)> = rows
        .iter()
        .flat_map(|(c, ss)| ss.iter().map(move |s| (c.clone(), s.clone())))
        .filter(|k| !unknown.contains(k))
        .collect();
    let lost: Vec<_> = held.difference(&stored).collect();
    let unacknowledged: Vec<_> = stored.difference(&held).collect();
    assert!(lost.is_empty(), "acknowledged seats missing from the store: {lost:?}");
    assert!(
        unacknowledged.is_empty(),
        "seats in the store that no client was given: {unacknowledged:?}"
    );
    rows
}

/// A client's stream of enrollments until `stop`: each a new student, half of them in
/// `hot`, the rest in one of `courses`; each settled.
async fn enroll_until(
    addrs: Vec<SocketAddr>,
    courses: Vec<String>,
    hot: String,
    tag: String,
    journal: Journal,
    stop: Arc<AtomicBool>,
) -> Seats {
    let mut client = Client::new(&addrs, &journal);
    let mut seats = Seats::new();
    let mut n = 0;
    while !stop.load(Ordering::Acquire) {
        n += 1;
        let student = format!("{tag}-{n}");
        let course = match client.rng.gen_bool(0.5) {
            true => hot.clone(),
            false => courses.choose(&mut client.rng).unwrap().clone(),
        };
        let seat = client.settle("POST", &course, &student).await;
        seats.insert((course, student), seat);
        tokio::time::sleep(Duration::from_millis(FAILOVER_PACE_MS)).await;
    }
    seats
}

/// Runs `CLIENTS` clients of [`enroll_until`] across a failure of node `victim` that `fail` causes
/// once the rush runs; stops them once a course of the victim's sold again on another
/// node (and a little after). The seats, and the time from the failure to that sale.
async fn rush_across(
    cluster: &mut Cluster,
    victim: usize,
    courses: &[String],
    victims_courses: &BTreeSet<String>,
    hot: &str,
    fail: impl FnOnce(&mut Cluster),
) -> (Seats, Duration) {
    const CLIENTS: usize = 12;
    const BEFORE_FAILURE_MS: u64 = 600;
    const AFTER_SALE_MS: u64 = 500;
    let journal = Journal::default();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|k| {
            tokio::spawn(enroll_until(
                cluster.addrs(),
                courses.to_vec(),
                hot.to_string(),
                format!("c{k}"),
                journal.clone(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(BEFORE_FAILURE_MS)).await;
    let sold_before = journal.check_deciders().get(&201).copied().unwrap_or(0);
    let failed_at = Instant::now();
    fail(cluster);
    let sale = loop {
        if let Some(at) = journal.first_sale(failed_at, victims_courses, NODE_IDS[victim]) {
            break at;
        }
        assert!(
            failed_at.elapsed() < Duration::from_millis(TAKEOVER_WAIT_MS_MAX),
            "no course of {} sold again within {TAKEOVER_WAIT_MS_MAX} ms of its failure",
            NODE_IDS[victim]
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS / 5)).await;
    };
    tokio::time::sleep(Duration::from_millis(AFTER_SALE_MS)).await;
    stop.store(true, Ordering::Release);
    let mut seats = Seats::new();
    for t in tasks {
        seats.extend(t.await.expect("client"));
    }
    let statuses = journal.check_deciders();
    eprintln!("{sold_before} seats sold before the failure; answers by status (0: none): {statuses:?}");
    (seats, sale - failed_at)
}

fn count(seats: &Seats, seat: Seat) -> usize {
    seats.values().filter(|s| **s == seat).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rush_sent_to_random_nodes_never_oversells_and_rosters_match_the_acknowledgements() {
    const COURSES: usize = 20;
    const STUDENTS: usize = 300;
    const CLIENTS: usize = 30;
    /// Courses each student tries: 300 * 5 / 20 = 75 tries per course, capacities 3..=10.
    const TRIES: usize = 5;
    /// One seat taken in this many is dropped again at once.
    const DROP_ONE_IN: u32 = 8;
    let cluster = Cluster::start(None).await;
    let courses: Vec<String> = (0..COURSES).map(|i| format!("RUSH-{i:02}")).collect();
    let capacity = |i: usize| 3 + (i % 8) as u32;
    for (i, c) in courses.iter().enumerate() {
        let mut conn = Conn::open(cluster.addr(i % NODE_IDS.len())).await;
        put_course(&mut conn, c, capacity(i)).await;
    }
    let journal = Journal::default();
    let students: Vec<String> = (0..STUDENTS).map(|i| format!("r{i:03}")).collect();
    let started = Instant::now();
    let tasks: Vec<_> = students
        .chunks(STUDENTS / CLIENTS)
        .enumerate()
        .map(|(k, chunk)| {
            let (chunk, courses, addrs, journal) = (chunk.to_vec(), courses.clone(), cluster.addrs(), journal.clone());
            tokio::spawn(async move {
                let mut client = Client::new(&addrs, &journal);
                let mut seats = Seats::new();
                for (j, student) in chunk.iter().enumerate() {
                    let i = k * chunk.len() + j;
                    let mut tries: Vec<&String> = (0..TRIES)
                        .map(|t| &courses[(i + t * (COURSES / TRIES)) % COURSES])
                        .collect();
                    tries.shuffle(&mut client.rng);
                    for course in tries {
                        let mut seat = client.settle("POST", course, student).await;
                        if seat == Seat::Held && client.rng.gen_ratio(1, DROP_ONE_IN) {
                            seat = client.settle("DELETE", course, student).await;
                        }
                        seats.insert((course.clone(), student.clone()), seat);
                    }
                }
                seats
            })
        })
        .collect();
    let mut seats = Seats::new();
    for t in tasks {
        seats.extend(t.await.expect("client"));
    }
    let rush_took = started.elapsed();
    // Late demand: a drop near the end frees a seat nobody asked for again. Each course is
    // asked until it answers full.
    let mut client = Client::new(&cluster.addrs(), &journal);
    let mut late_sold = 0;
    for c in &courses {
        for k in 0.. {
            let student = format!("late-{c}-{k}");
            let seat = client.settle("POST", c, &student).await;
            seats.insert((c.clone(), student), seat);
            if seat != Seat::Held {
                break;
            }
            late_sold += 1;
            assert!(k < 20, "{c} sells more than its capacity");
        }
    }
    let statuses = journal.check_deciders();
    let dropped = journal
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.method == "DELETE" && e.status == Some(200))
        .count();
    eprintln!(
        "rush: {} requests in {} ms ({dropped} drops), {late_sold} seats sold to late demand; answers by status (0: none): {statuses:?}",
        journal.0.lock().unwrap().len(),
        ms(rush_took)
    );
    assert_eq!(count(&seats, Seat::Unknown), 0, "every request was settled");

    let rows = check_store(&cluster, &seats);
    let mut admin = Conn::open(cluster.addr(2)).await;
    for (i, c) in courses.iter().enumerate() {
        let stored = rows.get(c).cloned().unwrap_or_default();
        // Demand exceeded supply (the last answer was 409): no seat left unsold.
        assert_eq!(stored.len(), capacity(i) as usize, "{c} is full");
        let api: BTreeSet<String> = roster(&mut admin, c).await.into_iter().collect();
        assert_eq!(api, stored, "the roster of {c} (through n3) is the store's");
    }
    let mut hops = Vec::new();
    for i in 0..NODE_IDS.len() {
        hops.push(node_metric(cluster.addr(i), "enrolld_cluster_hops_total").await);
    }
    eprintln!("hops per node: {hops:?}");
    assert!(
        hops.iter().sum::<f64>() > 0.0,
        "requests sent to random nodes were passed to owners"
    );
}

#[tokio::test]
async fn a_student_retrying_on_another_node_gets_200_never_a_second_seat() {
    let cluster = Cluster::start(None).await;
    let mut conns = Vec::new();
    for i in 0..NODE_IDS.len() {
        conns.push(Conn::open(cluster.addr(i)).await);
    }
    put_course(&mut conns[1], "RETRY-1", 5).await;
    let tok = token("ann");
    let path = "/v1/courses/RETRY-1/enrollment";
    let first = conns[0].request("POST", path, Some(&tok), None).await;
    assert_eq!(first.status, 201, "{}", String::from_utf8_lossy(&first.body));
    let owner = decided_by(&first).to_string();
    assert!(NODE_IDS.contains(&owner.as_str()), "decided by {owner}");
    for conn in &mut conns[1..] {
        let again = conn.request("POST", path, Some(&tok), None).await;
        assert_eq!(
            again.status,
            200,
            "a retry holds the seat it has: {}",
            String::from_utf8_lossy(&again.body)
        );
        assert_eq!(
            again.json()["enrolled_at"],
            first.json()["enrolled_at"],
            "the same seat"
        );
        assert_eq!(
            decided_by(&again),
            owner,
            "the owner decides whichever node the retry entered"
        );
    }
    let (rows, (_, enrolled)) = cluster.store_course("RETRY-1");
    assert_eq!(rows, BTreeSet::from(["ann".to_string()]));
    assert_eq!(enrolled, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_node_mid_rush_its_courses_sell_again_and_no_acknowledged_seat_is_lost() {
    const VICTIM: usize = 0;
    let mut cluster = Cluster::start(Some(SHORT_LEASE_MS)).await;
    // The hot course never fills; the others do, and keep answering 409.
    let hot = cluster.courses_owned_by(VICTIM, "HOT", 1, 100_000).await.remove(0);
    let mut courses = Vec::new();
    for i in 0..9 {
        let c = format!("KILL-{i:02}");
        let mut conn = Conn::open(cluster.addr(i % NODE_IDS.len())).await;
        put_course(&mut conn, &c, 30).await;
        courses.push(c);
    }
    let mut victims = BTreeSet::from([hot.clone()]);
    let mut conn = Conn::open(cluster.addr(1)).await;
    for c in &courses {
        if owner_of(&mut conn, c).await == NODE_IDS[VICTIM] {
            victims.insert(c.clone());
        }
    }
    eprintln!("{} owns {victims:?}", NODE_IDS[VICTIM]);

    let (seats, sold_again) = rush_across(&mut cluster, VICTIM, &courses, &victims, &hot, |cluster| {
        cluster.nodes[VICTIM].take().expect("running").kill9();
    })
    .await;
    eprintln!(
        "kill -9 of {}: its courses sold again on another node {} ms later (lease {SHORT_LEASE_MS} ms); {} seats acknowledged, {} unsettled",
        NODE_IDS[VICTIM],
        ms(sold_again),
        count(&seats, Seat::Held),
        count(&seats, Seat::Unknown)
    );
    check_store(&cluster, &seats);

    // The node rejoins under its id and port, takes its share back and decides again.
    let restarted = Instant::now();
    cluster.restart(VICTIM);
    let rejoined = cluster.wait_converged(&[0, 1, 2]).await;
    let back = poll_roster(cluster.addr(2), &hot, "the hot course back at its owner", |r| {
        r.status == 200 && decided_by(r) == NODE_IDS[VICTIM]
    })
    .await;
    eprintln!(
        "{} restarted: ready in {} ms, holds its share {} ms later, owns {hot} again after {} ms",
        NODE_IDS[VICTIM],
        ms(restarted.elapsed() - rejoined),
        ms(rejoined),
        ms(restarted.elapsed())
    );
    let held = node_metric(cluster.addr(VICTIM), "enrolld_cluster_leases_held").await;
    assert!(held > 0.0, "the restarted node holds leases");
    let mut conn = Conn::open(cluster.addr(VICTIM)).await;
    let r = conn
        .request(
            "POST",
            &format!("/v1/courses/{hot}/enrollment"),
            Some(&token("after-restart")),
            None,
        )
        .await;
    assert_eq!(
        (r.status, decided_by(&r)),
        (201, NODE_IDS[VICTIM]),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    // It started from the store: its roster is the store's, and so is the seat count after.
    let (stored, (_, enrolled)) = cluster.store_course(&hot);
    assert_eq!(
        students_of(&back).len() + 1,
        stored.len(),
        "{hot}: what the restarted node had, and one"
    );
    assert_eq!(enrolled as usize, stored.len());
    let mut seats = seats;
    seats.insert((hot.clone(), "after-restart".to_string()), Seat::Held);
    check_store(&cluster, &seats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_a_nodes_courses_over_and_exits_0() {
    const VICTIM: usize = 0;
    let mut cluster = Cluster::start(None).await;
    let hot = cluster.courses_owned_by(VICTIM, "HOT", 1, 100_000).await.remove(0);
    let mut courses = Vec::new();
    for i in 0..9 {
        let c = format!("TERM-{i:02}");
        let mut conn = Conn::open(cluster.addr(i % NODE_IDS.len())).await;
        put_course(&mut conn, &c, 30).await;
        courses.push(c);
    }
    let victims = BTreeSet::from([hot.clone()]);
    let pid = cluster.pid(VICTIM);
    let (seats, handed_over) = rush_across(&mut cluster, VICTIM, &courses, &victims, &hot, |_| {
        signal(pid, "-TERM");
    })
    .await;
    let mut node = cluster.nodes[VICTIM].take().expect("running");
    let deadline = Instant::now() + Duration::from_millis(EXIT_WAIT_MS_MAX);
    let code = loop {
        if let Some(status) = node.child.try_wait().expect("try_wait") {
            break status.code();
        }
        assert!(
            Instant::now() < deadline,
            "{} did not exit after SIGTERM",
            NODE_IDS[VICTIM]
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    };
    let owned_after_exit = cluster.db.query(&format!(
        "SELECT COUNT(*) FROM leases WHERE owner = '{}'",
        NODE_IDS[VICTIM]
    ));
    let log = node.rest_of_log();
    assert_eq!(code, Some(0), "SIGTERM exits 0; its log:\n{}", log.join("\n"));
    assert!(
        log.iter().any(|l| l.contains("leases released")),
        "the node gave its leases back after its last commit:\n{}",
        log.join("\n")
    );
    assert_eq!(
        owned_after_exit,
        vec![vec!["0".to_string()]],
        "no lease is left to lapse"
    );
    eprintln!(
        "SIGTERM of {}: {hot} sold on another node {} ms later (lease 3000 ms); {} seats acknowledged, {} unsettled",
        NODE_IDS[VICTIM],
        ms(handed_over),
        count(&seats, Seat::Held),
        count(&seats, Seat::Unknown)
    );
    check_store(&cluster, &seats);
    // The two left hold everything between them.
    cluster.wait_converged(&[1, 2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_is_fenced_out() {
    const A: usize = 0;
    const B: usize = 1;
    const CAPACITY: usize = 10;
    let cluster = Cluster::start(Some(SHORT_LEASE_MS)).await;
    let x = cluster.courses_owned_by(A, "FENCE", 1, CAPACITY as u32).await.remove(0);
    let path = format!("/v1/courses/{x}/enrollment");

    // Stopped, A keeps its memory (0 of 10 taken) and its listen socket: the kernel queues
    // these requests for A to decide once it runs again, by then no longer X's owner.
    signal(cluster.pid(A), "-STOP");
    let stopped = Instant::now();
    let mut queued = Vec::new();
    for k in 0..CAPACITY {
        let mut conn = Conn::open(cluster.addr(A)).await;
        conn.send_request("POST", &path, Some(&token(&format!("a{k:02}"))), None)
            .await
            .expect("queue a request at the stopped node");
        queued.push(tokio::spawn(async move {
            conn.read_response().await.map(|r| {
                (
                    r.status,
                    decided_by(&r).to_string(),
                    String::from_utf8_lossy(&r.body).into_owned(),
                )
            })
        }));
    }

    // B and C take X over once A's lease lapses; then B passes X's requests to its new owner.
    let taken = loop {
        if let Some(owner) = cluster.store_owner(&x).filter(|o| o != NODE_IDS[A]) {
            break owner;
        }
        assert!(
            stopped.elapsed() < Duration::from_millis(TAKEOVER_WAIT_MS_MAX),
            "nobody took {x} over"
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    };
    let taken_after = stopped.elapsed();
    poll_roster(cluster.addr(B), &x, "B passes X to its new owner", |r| {
        r.status == 200 && decided_by(r) != NODE_IDS[A]
    })
    .await;
    eprintln!(
        "{} stopped: {taken} took {x} over in the store after {} ms, B passes it there after {} ms (lease {SHORT_LEASE_MS} ms)",
        NODE_IDS[A],
        ms(taken_after),
        ms(stopped.elapsed())
    );
    let sold: BTreeSet<String> = (0..CAPACITY).map(|k| format!("b{k:02}")).collect();
    let mut conn = Conn::open(cluster.addr(B)).await;
    for s in &sold {
        let r = conn.request("POST", &path, Some(&token(s)), None).await;
        assert_eq!(r.status, 201, "{s} through B: {}", String::from_utf8_lossy(&r.body));
        assert_ne!(decided_by(&r), NODE_IDS[A]);
    }
    let r = conn.request("POST", &path, Some(&token("b-late")), None).await;
    assert_eq!(r.status, 409, "X is full: {}", String::from_utf8_lossy(&r.body));

    signal(cluster.pid(A), "-CONT");
    let mut answers = BTreeMap::new();
    for q in queued {
        let answer = q.await.expect("reader");
        if let Some((status, by, body)) = &answer {
            assert!(
                !matches!(status, 200..=299),
                "the fenced node acknowledged a seat it could not record: {status} by {by}: {body}"
            );
        }
        *answers.entry(answer.map(|a| a.0)).or_insert(0) += 1;
    }
    eprintln!("requests queued at the stopped node were answered (None: connection closed): {answers:?}");

    let (rows, (capacity, enrolled)) = cluster.store_course(&x);
    assert_eq!(rows, sold, "the store holds B's sale and nothing of A's");
    assert_eq!((capacity, enrolled), (CAPACITY as u64, CAPACITY as u64));

    // A does not answer X from its memory of before the pause (0 of 10 taken). Its roster,
    // which only X's owner answers, is the store's: passed on to the new owner, or A's own
    // once it took X back from the store (it is X's preferred owner again). Its reads of X
    // (from its catalog cache while another node owns X) follow the new owner's sale.
    let fenced = node_metric(cluster.addr(A), "enrolld_cluster_fenced_batches_total").await;
    let resumed = Instant::now();
    // Polled: while A finds out it was deposed (and may take X back), a read of X can be
    // refused (503, as the contract allows during a takeover); once answered, it is the sale.
    let r = poll_roster(cluster.addr(A), &x, "A answers X's roster after it resumed", |r| {
        r.status == 200
    })
    .await;
    let roster_by = decided_by(&r).to_string();
    assert_eq!(
        students_of(&r),
        sold,
        "the roster of {x} through A (decided by {roster_by}) is the store's"
    );
    let view = poll_course(cluster.addr(A), &x, "A's view of X follows the new owner's sale", |r| {
        r.status == 200 && enrolled_of(r) == CAPACITY as u64
    })
    .await;
    eprintln!(
        "after resuming: A's fenced batches {fenced}; the roster of {x} through A decided by {roster_by}; \
         GET {x} on A (by {}) shows it full {} ms later",
        decided_by(&view),
        ms(resumed.elapsed())
    );
    let mut client = Client::new(&[cluster.addr(A)], &Journal::default());
    assert_eq!(
        client.settle("POST", &x, "a-after").await,
        Seat::NotHeld,
        "X is full on A too"
    );
    assert_eq!(cluster.store_course(&x).0, sold);
}

/// A TCP relay in front of MariaDB that can hold every byte, both ways, while the process
/// behind it runs on: a node cut off from its store (a network cut, a stalled proxy).
struct StoreRelay {
    port: u16,
    holding: Arc<AtomicBool>,
    accept: tokio::task::JoinHandle<()>,
}

impl StoreRelay {
    async fn start() -> StoreRelay {
        let base = mysql_base();
        let upstream = base.rsplit('@').next().expect("user@host:port").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("relay port");
        let port = listener.local_addr().unwrap().port();
        let holding = Arc::new(AtomicBool::new(false));
        let held = holding.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (from_client, to_client) = client.into_split();
                let (from_server, to_server) = server.into_split();
                tokio::spawn(relay_bytes(from_client, to_server, held.clone()));
                tokio::spawn(relay_bytes(from_server, to_client, held.clone()));
            }
        });
        StoreRelay { port, holding, accept }
    }

    /// `url` (a database on the suite's MariaDB) through this relay.
    fn url_of(&self, url: &str) -> String {
        let (creds, rest) = url.rsplit_once('@').expect("user@host:port/db");
        let (_, db) = rest.split_once('/').expect("host:port/db");
        format!("{creds}@127.0.0.1:{}/{db}", self.port)
    }

    fn hold(&self, on: bool) {
        self.holding.store(on, Ordering::Release);
    }
}

impl Drop for StoreRelay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies bytes from one side to the other, keeping them while the relay holds.
async fn relay_bytes(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    holding: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while holding.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// The fence itself: node A decides a seat under its lease, but cannot reach the store
/// until its lease has lapsed, another node took the course over and sold it out. A's
/// commit must prove its lease epoch and fail: nothing of it recorded, no 2xx, and the
/// fenced batch counted. (When A is paused instead, as above, A no longer decides at all
/// once it cannot vouch for its lease, so the commit-time fence is never reached there.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_store_mid_commit_is_fenced_out() {
    const A: usize = 0;
    const B: usize = 1;
    const CAPACITY: usize = 10;
    /// A's store calls (a connection from the pool, a statement) may wait this long: its
    /// commit must outlast the cut (a takeover and a sale) and then run, not time out.
    const A_STORE_WAIT_MS: u64 = 20_000;
    let relay = StoreRelay::start().await;
    let cluster = Cluster::start_with(Some(SHORT_LEASE_MS), |i, db| {
        (i == A).then(|| NodeSetup {
            store: relay.url_of(&db.url),
            extra: ["--store-statement-timeout-ms", "--store-acquire-timeout-ms"]
                .iter()
                .flat_map(|key| [key.to_string(), A_STORE_WAIT_MS.to_string()])
                .collect(),
        })
    })
    .await;
    let x = cluster.courses_owned_by(A, "CUT", 1, CAPACITY as u32).await.remove(0);
    let path = format!("/v1/courses/{x}/enrollment");

    relay.hold(true);
    let cut = Instant::now();
    // Sent at once: A still vouches for its lease (its last heartbeat is at most a third of
    // a lease old), decides the seat, and its commit waits at the relay.
    let mut conn = Conn::open(cluster.addr(A)).await;
    conn.send_request("POST", &path, Some(&token("a-cut")), None)
        .await
        .expect("send to A");
    let answer = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_millis(ANSWER_WAIT_MS_MAX * 3), conn.read_response())
            .await
            .ok()
            .flatten()
            .map(|r| {
                (
                    r.status,
                    decided_by(&r).to_string(),
                    String::from_utf8_lossy(&r.body).into_owned(),
                )
            })
    });

    let taken = loop {
        if let Some(owner) = cluster.store_owner(&x).filter(|o| o != NODE_IDS[A]) {
            break owner;
        }
        assert!(
            cut.elapsed() < Duration::from_millis(TAKEOVER_WAIT_MS_MAX),
            "nobody took {x} over"
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    };
    let taken_after = cut.elapsed();
    poll_roster(cluster.addr(B), &x, "B passes X to its new owner", |r| {
        r.status == 200 && decided_by(r) != NODE_IDS[A]
    })
    .await;
    // All seats but one: A's stale decision would find room in the store; only the fence
    // can keep it out.
    let mut sold: BTreeSet<String> = (0..CAPACITY - 1).map(|k| format!("b{k:02}")).collect();
    let mut conn = Conn::open(cluster.addr(B)).await;
    for s in &sold {
        let r = conn.request("POST", &path, Some(&token(s)), None).await;
        assert_eq!(r.status, 201, "{s} through B: {}", String::from_utf8_lossy(&r.body));
    }
    let cut_for = cut.elapsed();
    relay.hold(false);

    let answer = answer.await.expect("reader");
    eprintln!(
        "A cut off from the store: {taken} took {x} over after {} ms; the cut lasted {} ms; A's answer to its queued seat: {answer:?}",
        ms(taken_after),
        ms(cut_for)
    );
    if let Some((status, by, body)) = &answer {
        assert!(
            !matches!(status, 200..=299),
            "A acknowledged a seat it could not record: {status} by {by}: {body}"
        );
    }
    let (rows, (_, enrolled)) = cluster.store_course(&x);
    assert_eq!(rows, sold, "the store holds B's sale and nothing of A's");
    assert_eq!(enrolled, sold.len() as u64);
    let fenced = node_metric(cluster.addr(A), "enrolld_cluster_fenced_batches_total").await;
    assert!(
        fenced >= 1.0,
        "A's commit was refused by the fence (fenced batches {fenced})"
    );
    // And A then gives X up: it shows the store's truth, and the last seat sells once,
    // through A. (A 503 while the takeover settles is allowed by the contract.)
    let r = poll_roster(
        cluster.addr(A),
        &x,
        "A answers X's roster once it reaches the store again",
        |r| r.status == 200,
    )
    .await;
    assert_eq!(
        students_of(&r),
        sold,
        "the roster of {x} through A (decided by {})",
        decided_by(&r)
    );
    poll_course(cluster.addr(A), &x, "A's view of X follows the new owner's sale", |r| {
        r.status == 200 && enrolled_of(r) == sold.len() as u64
    })
    .await;
    let mut client = Client::new(&[cluster.addr(A)], &Journal::default());
    assert_eq!(client.settle("POST", &x, "last").await, Seat::Held);
    assert_eq!(client.settle("POST", &x, "too-late").await, Seat::NotHeld);
    sold.insert("last".to_string());
    let (rows, (capacity, enrolled)) = cluster.store_course(&x);
    assert_eq!(rows, sold);
    assert_eq!((capacity, enrolled), (CAPACITY as u64, CAPACITY as u64));
}

/// After a pause, a node must not go on answering from memory for the courses it lost
/// while paused, and those courses must stay available on every node; not only the course
/// a write to the paused node happened to touch (above) but also those nobody wrote to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_node_serves_no_stale_reads_and_its_courses_stay_available() {
    const A: usize = 0;
    const B: usize = 1;
    let cluster = Cluster::start(Some(SHORT_LEASE_MS)).await;
    let y = cluster.courses_owned_by(A, "STALE", 1, 5).await.remove(0);
    signal(cluster.pid(A), "-STOP");
    let stopped = Instant::now();
    poll_roster(cluster.addr(B), &y, "B passes Y to its new owner", |r| {
        r.status == 200 && decided_by(r) != NODE_IDS[A]
    })
    .await;
    eprintln!(
        "{} stopped: B passes {y} to its new owner after {} ms",
        NODE_IDS[A],
        ms(stopped.elapsed())
    );
    let mut conn = Conn::open(cluster.addr(B)).await;
    let r = conn
        .request("POST", &format!("/v1/courses/{y}/enrollment"), Some(&token("y0")), None)
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let sold = BTreeSet::from(["y0".to_string()]);
    signal(cluster.pid(A), "-CONT");
    let resumed = Instant::now();

    // At once: the roster (only Y's owner answers it) through A is the store's, never A's
    // memory of before the pause (nobody). Its first 200 is checked: a 503 while A learns
    // of the takeover is allowed by the contract.
    let r = poll_roster(cluster.addr(A), &y, "A answers Y's roster after it resumed", |r| {
        r.status == 200
    })
    .await;
    let roster_by = decided_by(&r).to_string();
    assert_eq!(
        students_of(&r),
        sold,
        "the roster of {y} through A right after its pause (decided by {roster_by})"
    );
    let roster_after = resumed.elapsed();
    // A's own view of Y follows; and Y stays available through B, to its owner.
    let view = poll_course(cluster.addr(A), &y, "A's view of Y follows the sale", |r| {
        r.status == 200 && enrolled_of(r) == 1
    })
    .await;
    let view_after = resumed.elapsed();
    poll_course(cluster.addr(B), &y, "B's view of Y", |r| {
        r.status == 200 && enrolled_of(r) == 1
    })
    .await;
    let r = poll_roster(cluster.addr(B), &y, "Y stays available through B", |r| r.status == 200).await;
    assert_eq!(students_of(&r), sold);
    eprintln!(
        "after resuming: the roster of {y} through A answered in {} ms (by {roster_by}); GET {y} on A (by {}) shows the sale after {} ms; Y's owner now {}",
        ms(roster_after),
        decided_by(&view),
        ms(view_after),
        decided_by(&r)
    );
}

#[tokio::test]
async fn an_admin_change_on_one_node_is_visible_on_the_others() {
    const A: usize = 0;
    const B: usize = 1;
    const C: usize = 2;
    let cluster = Cluster::start(None).await;
    let z = cluster.courses_owned_by(B, "ADMIN", 1, 2).await.remove(0);
    let mut conns = Vec::new();
    for i in 0..NODE_IDS.len() {
        conns.push(Conn::open(cluster.addr(i)).await);
    }
    enroll_all(&mut conns[C], &z, &["z1", "z2"]).await;
    let body = format!(r#"{{"title":"Course {z}","capacity":3}}"#);
    let r = conns[A]
        .request(
            "PUT",
            &format!("/v1/admin/courses/{z}"),
            Some(&admin_token()),
            Some(&body),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(decided_by(&r), NODE_IDS[B], "the owner made the change");
    let changed = Instant::now();
    let seats = |r: &Resp| (r.json()["capacity"].as_u64(), r.json()["seats_left"].as_u64());
    // The owner shows it at once; another node's catalog cache follows within its bound.
    let r = conns[B]
        .request("GET", &format!("/v1/courses/{z}"), Some(&token("z9")), None)
        .await;
    assert_eq!(
        (r.status, seats(&r), decided_by(&r)),
        (200, (Some(3), Some(1)), NODE_IDS[B]),
        "GET {z} on its owner"
    );
    let r = poll_course(cluster.addr(C), &z, "C's view of the change", |r| {
        r.status == 200 && seats(r) == (Some(3), Some(1))
    })
    .await;
    eprintln!(
        "the capacity change through {} shows on {} (by {}) after {} ms",
        NODE_IDS[A],
        NODE_IDS[C],
        decided_by(&r),
        ms(changed.elapsed())
    );
    // Seats are the owner's to sell, at once, whichever node is asked.
    let path = format!("/v1/courses/{z}/enrollment");
    let r = conns[C].request("POST", &path, Some(&token("z3")), None).await;
    assert_eq!(
        r.status,
        201,
        "the new seat sells through C: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(decided_by(&r), NODE_IDS[B]);
    let r = conns[A].request("POST", &path, Some(&token("z4")), None).await;
    assert_eq!(r.status, 409);
    let (rows, (capacity, enrolled)) = cluster.store_course(&z);
    assert_eq!(rows.len(), 3);
    assert_eq!((capacity, enrolled), (3, 3));
}

/// Every node's `enrolld_cluster_partitions_released_total`.
async fn released_per_node(cluster: &Cluster) -> Vec<f64> {
    let mut released = Vec::new();
    for i in 0..NODE_IDS.len() {
        released.push(node_metric(cluster.addr(i), "enrolld_cluster_partitions_released_total").await);
    }
    released
}

/// A non-cluster `enrolld serve` on the cluster's database; its exit code and log.
async fn refused_beside(cluster: &Cluster) -> (Option<i32>, String) {
    let url = cluster.db.url.clone();
    tokio::task::spawn_blocking(move || refused(&["--listen", "127.0.0.1:0", "--store", &url]))
        .await
        .expect("refused start")
}

#[tokio::test]
async fn a_second_non_cluster_process_on_the_cluster_database_exits_2() {
    let cluster = Cluster::start(None).await;
    let (code, log) = refused_beside(&cluster).await;
    assert_eq!(code, Some(2), "{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("enrolld: ")).collect();
    assert_eq!(errors.len(), 1, "one error line: {log}");
    let holders: Vec<String> = NODE_IDS
        .iter()
        .zip(&cluster.ports)
        .map(|(id, port)| format!("node {id} at 127.0.0.1:{port}"))
        .collect();
    assert!(
        holders.iter().any(|h| errors[0].contains(h.as_str())),
        "the error names a holder ({holders:?}): {}",
        errors[0]
    );
    // The cluster still serves with every partition owned.
    cluster.wait_converged(&[0, 1, 2]).await;
    let mut conn = Conn::open(cluster.addr(0)).await;
    put_course(&mut conn, "AFTER-1", 3).await;
    enroll_all(&mut conn, "AFTER-1", &["ann"]).await;
}

/// A process that is refused is no node of the cluster: no partition is handed to it, it
/// takes none on its way to the refusal, and the cluster's courses stay where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_non_cluster_start_leaves_the_clusters_leases_alone() {
    const COURSES: usize = 30;
    /// Keeper rounds (lease / 3, default lease 3 s) to wait after the refusal, for a
    /// hand-over it caused to show.
    const ROUNDS_AFTER: u64 = 3;
    let cluster = Cluster::start(None).await;
    let courses: Vec<String> = (0..COURSES).map(|i| format!("STAY-{i:02}")).collect();
    for (i, c) in courses.iter().enumerate() {
        let mut conn = Conn::open(cluster.addr(i % NODE_IDS.len())).await;
        put_course(&mut conn, c, 5).await;
    }
    let leases = |db: &TestDb| -> BTreeMap<String, (String, String)> {
        db.query("SELECT part, COALESCE(owner, 'NULL'), epoch FROM leases")
            .into_iter()
            .map(|r| (r[0].clone(), (r[1].clone(), r[2].clone())))
            .collect()
    };
    let released_before = released_per_node(&cluster).await;
    let leases_before = leases(&cluster.db);

    // Readers of the courses through random nodes while the refused process runs.
    let stop = Arc::new(AtomicBool::new(false));
    let journal = Journal::default();
    let probe = {
        let (addrs, courses, stop, journal) = (cluster.addrs(), courses.clone(), stop.clone(), journal.clone());
        tokio::spawn(async move {
            let mut client = Client::new(&addrs, &journal);
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::Acquire) {
                let (node, course) = (
                    client.rng.gen_range(0..addrs.len()),
                    courses.choose(&mut client.rng).unwrap().clone(),
                );
                let asked = Instant::now();
                let answer = client
                    .call(node, "GET", &format!("/v1/courses/{course}"), &admin_token())
                    .await;
                slowest = slowest.max(asked.elapsed());
                journal.record("GET", &course, answer.as_ref());
                tokio::time::sleep(Duration::from_millis(POLL_MS / 5)).await;
            }
            slowest
        })
    };
    let (code, log) = refused_beside(&cluster).await;
    assert_eq!(code, Some(2), "{log}");
    tokio::time::sleep(Duration::from_millis(3_000 / 3 * ROUNDS_AFTER)).await;
    stop.store(true, Ordering::Release);
    let slowest = probe.await.expect("probe");
    cluster.wait_converged(&[0, 1, 2]).await;
    let released_after = released_per_node(&cluster).await;
    let leases_after = leases(&cluster.db);
    let moved: Vec<_> = leases_before
        .iter()
        .filter(|(part, before)| leases_after.get(*part) != Some(before))
        .collect();
    eprintln!(
        "the refused start: partitions released per node {released_before:?} -> {released_after:?}; \
         {} partitions changed owner or epoch, e.g. {:?}; reads meanwhile by status {:?}, slowest {} ms; its log:\n{log}",
        moved.len(),
        moved.iter().take(3).map(|(p, b)| (p, b, leases_after.get(*p))).collect::<Vec<_>>(),
        journal.check_deciders(),
        ms(slowest)
    );
    assert_eq!(
        released_after, released_before,
        "the nodes handed no partition to the refused process"
    );
    assert!(
        moved.is_empty(),
        "the refused process took {} partitions of the cluster",
        moved.len()
    );
}

#[tokio::test]
async fn contract_smoke() {
    let cluster = Cluster::start(None).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/contract_smoke.py");
    let out = std::process::Command::new("python3")
        .args([
            script,
            "--url",
            &format!("http://{}", cluster.addr(1)),
            "--secret",
            SECRET,
        ])
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "contract smoke failed against node n2 of three: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("contract checks hold"), "{text}");
}

/// Registration rounds in cluster mode: students enter a draw through every node, the
/// owner draws once, every node serves the same record, and after `kill -9` of the owner
/// the node that takes the course over holds the same seats and the waitlist in the same
/// order, and gives a dropped seat to its head in the drop's commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draw_entered_through_every_node_and_its_waitlist_survive_the_owners_kill_9() {
    const VICTIM: usize = 0;
    let mut cluster = Cluster::start(Some(SHORT_LEASE_MS)).await;
    let course = cluster.courses_owned_by(VICTIM, "ROUND", 1, 2).await.remove(0);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64;
    let draw_at = enrolld::ids::rfc3339((now_ms / 1000 + 5) * 1000);
    let body = format!(r#"{{"title":"Round","capacity":2,"draw_at":"{draw_at}","waitlist_max":3}}"#);
    let mut conn = Conn::open(cluster.addr(1)).await;
    let r = put_course_body(&mut conn, &course, &body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let entrants: Vec<String> = (0..8).map(|i| format!("e{i}")).collect();
    for (i, s) in entrants.iter().enumerate() {
        let mut c = Conn::open(cluster.addr(i % NODE_IDS.len())).await;
        let r = c
            .request(
                "POST",
                &format!("/v1/courses/{course}/enrollment"),
                Some(&token(s)),
                None,
            )
            .await;
        assert_eq!(
            (r.status, r.json()["status"].as_str()),
            (202, Some("entered")),
            "{s} entering through {}: {}",
            NODE_IDS[i % NODE_IDS.len()],
            String::from_utf8_lossy(&r.body)
        );
    }
    let draw_path = format!("/v1/admin/courses/{course}/draw");
    let record = poll_get(cluster.addr(2), &draw_path, "the draw's record", |r| r.status == 200)
        .await
        .json();
    let order: Vec<String> = record["order"]
        .as_array()
        .expect("order")
        .iter()
        .map(|s| s.as_str().expect("student").to_string())
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, entrants, "the draw holds every entrant once");
    assert_eq!(
        (record["seats"].as_u64(), record["waitlisted"].as_u64()),
        (Some(2), Some(3))
    );
    let roster = poll_roster(cluster.addr(1), &course, "the drawn roster", |r| r.status == 200).await;
    let waitlist_of = |r: &Resp| -> Vec<String> {
        r.json()["waitlist"]
            .as_array()
            .expect("waitlist")
            .iter()
            .map(|s| s.as_str().expect("student").to_string())
            .collect()
    };
    assert_eq!(
        students_of(&roster),
        order[..2].iter().cloned().collect::<BTreeSet<_>>()
    );
    assert_eq!(waitlist_of(&roster), order[2..5].to_vec());
    // Not selected, and the waitlist is full: a first-come 409, through any node.
    let mut c = Conn::open(cluster.addr(2)).await;
    let r = c
        .request(
            "POST",
            &format!("/v1/courses/{course}/enrollment"),
            Some(&token(&order[5])),
            None,
        )
        .await;
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));

    cluster.nodes[VICTIM].take().expect("running").kill9();
    let taken = poll_roster(cluster.addr(1), &course, "the course taken over", |r| {
        r.status == 200 && decided_by(r) != NODE_IDS[VICTIM]
    })
    .await;
    eprintln!("{course} taken over by {}", decided_by(&taken));
    assert_eq!(students_of(&taken), students_of(&roster), "seats after the takeover");
    assert_eq!(
        waitlist_of(&taken),
        order[2..5].to_vec(),
        "waitlist order after the takeover"
    );
    let again = poll_get(cluster.addr(2), &draw_path, "the record after the takeover", |r| {
        r.status == 200
    })
    .await
    .json();
    assert_eq!(again["seed"], record["seed"], "one draw, one seed");

    // A drop on the taker gives the seat to the head in the same commit.
    let mut c = Conn::open(cluster.addr(2)).await;
    let r = c
        .request(
            "DELETE",
            &format!("/v1/courses/{course}/enrollment"),
            Some(&token(&order[0])),
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (200, Some("dropped")),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let after = c
        .request("GET", &roster_path(&course), Some(&admin_token()), None)
        .await;
    let expected: BTreeSet<String> = [order[1].clone(), order[2].clone()].into();
    assert_eq!(students_of(&after), expected, "the head has the dropped seat");
    assert_eq!(waitlist_of(&after), order[3..5].to_vec());
    let r = c
        .request(
            "POST",
            &format!("/v1/courses/{course}/enrollment"),
            Some(&token(&order[3])),
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.json()["position"].as_u64()),
        (202, Some(1)),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let (stored, (_, enrolled)) = cluster.store_course(&course);
    assert_eq!(stored, expected, "the store holds what the taker answered");
    assert_eq!(enrolled, 2);
}
