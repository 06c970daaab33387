//! The persist thread: the only writer to the store, turning a stream of seat changes into
//! few, large transactions (group commit).
//!
//! Why: MariaDB here commits ~3k single-row transactions/s but ~230k rows/s in 1000-row
//! transactions, so batching is the whole game. It runs on its own current-thread tokio
//! runtime so a slow store never stalls a shard; shards reach it only through one bounded
//! flume queue and are answered through oneshot channels once the outcome is known.
//! Must never: answer a seat as committed before its transaction committed, reorder two
//! changes of the same (course, student), or block a shard (shards only `try_send`).

pub mod feed;
pub mod lease;
pub mod store;
pub mod stream;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::oneshot;

use crate::ids::{CourseId, StudentId, UnixMs};
use crate::limit::breaker::{Breaker, Call};
use crate::model::{CourseSpec, DrawRecord, Standing};
use crate::partition::{Held, Lease, Proof};
use store::{CommitError, LoadRow, Probe, PutResult, SeatOp, SeatResult, Session, Settled, Store, StoreOptions};

/// The store as the committers see it: the seam between the group-commit logic (batching,
/// time bounds, settling unknown outcomes, the breaker) and SQL. [`Store`] is the real
/// one; the simulation hands the same committers a store that fails, hangs, and loses
/// answers on purpose. Implementations need not bound anything: every call is bounded by
/// the caller ([`bounded`]), and a call cut off must leave the store as if it never
/// reached COMMIT unless `Session::committing` says otherwise.
#[allow(async_fn_in_trait)] // used on one current-thread runtime; no Send bound wanted
pub trait Backend {
    async fn ping(&self) -> anyhow::Result<()>;
    /// Commits the ops only if the proof holds (no leases: the store does not fence),
    /// else `CommitError::Fenced`.
    async fn commit_seats(
        &self,
        ops: &[SeatOp],
        proof: &Proof,
        session: &Session,
    ) -> Result<Vec<SeatResult>, CommitError>;
    /// Creates or changes a course, giving seats to `promote` (heads of its waitlist) in
    /// the same commit.
    async fn put_course(
        &self,
        id: &CourseId,
        spec: &CourseSpec,
        promote: &[(StudentId, UnixMs)],
        proof: &Proof,
        session: &Session,
    ) -> Result<PutResult, CommitError>;
    /// Commits a course's draw whole (record, seats, waitlist, events), or nothing.
    async fn draw(
        &self,
        course: &CourseId,
        record: &DrawRecord,
        proof: &Proof,
        session: &Session,
    ) -> Result<(), CommitError>;
    /// This node's fence generation and the leases the store gives it, in one snapshot
    /// (after a fenced batch).
    async fn fence_state(&self) -> anyhow::Result<(u64, Vec<Lease>)>;
    /// After an unanswered COMMIT: makes sure the session can no longer commit (its
    /// COMMIT has applied or never will).
    async fn fence(&self, session: &Session) -> anyhow::Result<()>;
    /// Whether what `probe` names is as a committed transaction left it.
    async fn read_back(&self, probe: &Probe) -> anyhow::Result<bool>;
    /// A page of the change feed.
    async fn read_events(&self, after: Option<u64>, limit: u32) -> Result<feed::Page, feed::FeedError>;
    /// Trims a small batch of events written before `before_ms`; the rows removed.
    async fn trim_events(&self, before_ms: crate::ids::UnixMs) -> anyhow::Result<u64>;
}

impl Backend for Store {
    async fn ping(&self) -> anyhow::Result<()> {
        Store::ping(self).await
    }
    async fn commit_seats(
        &self,
        ops: &[SeatOp],
        proof: &Proof,
        session: &Session,
    ) -> Result<Vec<SeatResult>, CommitError> {
        Store::commit_seats(self, ops, proof, session).await
    }
    async fn put_course(
        &self,
        id: &CourseId,
        spec: &CourseSpec,
        promote: &[(StudentId, UnixMs)],
        proof: &Proof,
        session: &Session,
    ) -> Result<PutResult, CommitError> {
        Store::put_course(self, id, spec, promote, proof, session).await
    }
    async fn draw(
        &self,
        course: &CourseId,
        record: &DrawRecord,
        proof: &Proof,
        session: &Session,
    ) -> Result<(), CommitError> {
        Store::draw(self, course, record, proof, session).await
    }
    async fn fence_state(&self) -> anyhow::Result<(u64, Vec<Lease>)> {
        match self.lease_owner() {
            Some(node) => Store::fence_state(self, node).await,
            None => Ok((0, Vec::new())),
        }
    }
    async fn fence(&self, session: &Session) -> anyhow::Result<()> {
        Store::fence(self, session).await
    }
    async fn read_back(&self, probe: &Probe) -> anyhow::Result<bool> {
        Store::read_back(self, probe).await
    }
    async fn read_events(&self, after: Option<u64>, limit: u32) -> Result<feed::Page, feed::FeedError> {
        Store::read_events(self, after, limit).await
    }
    async fn trim_events(&self, before_ms: crate::ids::UnixMs) -> anyhow::Result<u64> {
        Store::trim_events(self, before_ms).await
    }
}

/// A change a shard asks to be made durable.
#[derive(Debug)]
pub enum Change {
    Seat(SeatOp),
    PutCourse {
        course: CourseId,
        spec: CourseSpec,
        /// Heads of the waitlist a capacity raise gives seats to.
        promote: Vec<(StudentId, UnixMs)>,
    },
    /// A course's draw, committed whole.
    Draw {
        course: CourseId,
        record: DrawRecord,
    },
}

impl Change {
    fn course(&self) -> &CourseId {
        match self {
            Change::Seat(op) => op.key().0,
            Change::PutCourse { course, .. } | Change::Draw { course, .. } => course,
        }
    }
}

/// What the store made of a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Durable.
    Committed,
    /// The store's guard refused the seat (full in the store).
    Full,
    /// Certainly not recorded.
    Failed,
    CoursePut(PutResult),
    /// Not known: an unanswered COMMIT whose read-back cannot tell this node's commit from
    /// a successor's change, because a lease it was decided under was taken meanwhile.
    /// The caller answers "outcome unknown" (the client retries) and forgets the change:
    /// the course is no longer this node's to answer for.
    Unknown,
}

pub struct Job {
    pub change: Change,
    /// The lease the change was decided under (None on a store without leases).
    pub lease: Option<Lease>,
    pub reply: oneshot::Sender<Outcome>,
}

#[derive(Clone, Debug)]
pub struct PersistConfig {
    pub store_url: String,
    pub store: StoreOptions,
    /// Committers, each with its own queue, store connection and share of the courses
    /// ([`committer_of`]): their batches never touch the same course rows, so they overlap
    /// their log flushes without waiting on each other's row locks, and a course's changes
    /// stay in order on its one queue.
    pub commits_in_flight_max: usize,
    pub batch_rows_max: usize,
    pub batch_linger_us: u64,
    pub queue_rows_max: usize,
    pub demo: bool,
    /// Bound on every store call: a batch (its COMMIT included), an admin change, a ping,
    /// one read-back.
    pub statement_timeout: Duration,
    /// How long the change feed keeps events (None: the feed is off, nothing to trim).
    pub events_retention: Option<Duration>,
    /// Where committed events are also pushed (`events_redis_stream`), best effort.
    pub events_stream: Option<stream::StreamTarget>,
    pub metrics: Arc<crate::metrics::PersistMetrics>,
    /// Opens on failing or slow commits; shards refuse seat changes while it is open.
    pub breaker: Arc<Breaker>,
    /// MySQL: the partition leases this node takes and proves in every commit
    /// (`lease.rs`); None on SQLite, whose file lock makes one writer (`single_writer`).
    pub leases: Option<LeaseConfig>,
}

/// Who this node is in the lease table, and where the leases it holds are recorded.
#[derive(Clone)]
pub struct LeaseConfig {
    pub node: lease::NodeInfo,
    pub held: Arc<Held>,
    /// Outside cluster mode: take every partition at start and keep them (here). In
    /// cluster mode the keeper (`cluster::keeper`) takes and renews; the persist thread
    /// only proves the leases in its commits and gives them back at the end.
    pub solo: bool,
    pub metrics: Arc<crate::metrics::ClusterMetrics>,
}

impl std::fmt::Debug for LeaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LeaseConfig {{ node: {:?}, held: {} partitions }}",
            self.node,
            self.held.count()
        )
    }
}

/// The shards' side of the persist queues (one per committer). Cheap to clone; never blocks.
#[derive(Clone)]
pub struct PersistHandle {
    txs: Arc<[flume::Sender<Job>]>,
    breaker: Arc<Breaker>,
    /// Reads of the change feed, served by the persist thread's reader.
    reads: flume::Sender<FeedRead>,
    /// Bumped after every commit that wrote events: long polls wait on it.
    committed: tokio::sync::watch::Receiver<u64>,
    /// The leases changes are decided under (None: the store has none).
    held: Option<Arc<Held>>,
    /// Reads of the committed catalog (cluster mode), served beside the committers.
    catalog: flume::Sender<CatalogRead>,
}

/// A read of the committed catalog, for what spans every node's courses in cluster mode.
pub enum CatalogRead {
    Courses {
        after: Option<CourseId>,
        limit: u32,
        reply: oneshot::Sender<anyhow::Result<Vec<store::StoredCourse>>>,
    },
    Enrollments {
        student: StudentId,
        reply: oneshot::Sender<anyhow::Result<Vec<(CourseId, Standing)>>>,
    },
    /// A course's draw record (`GET /v1/admin/courses/{id}/draw`).
    Draw {
        course: CourseId,
        reply: oneshot::Sender<anyhow::Result<Option<DrawRecord>>>,
    },
}

/// One read of the change feed.
pub struct FeedRead {
    pub after: Option<u64>,
    pub limit: u32,
    pub reply: oneshot::Sender<Result<feed::Page, feed::FeedError>>,
}

/// Feed reads waiting for the reader at most (beyond, the read answers 503).
pub const FEED_READS_QUEUED_MAX: usize = 256;
/// How often the retention trim runs (each run removes at most `feed::TRIM_BATCHES_MAX`).
const TRIM_INTERVAL_MS: u64 = 1_000;

/// The persist side of the queues: what [`serve`] consumes.
pub struct Queues {
    pub jobs: Vec<flume::Receiver<Job>>,
    pub reads: flume::Receiver<FeedRead>,
    pub catalog: flume::Receiver<CatalogRead>,
    pub committed: tokio::sync::watch::Sender<u64>,
}

/// The committer that owns a course's changes: a hash of the id over the committers.
pub fn committer_of(course: &CourseId, committers: usize) -> usize {
    crc32fast::hash(course.as_str().as_bytes()) as usize % committers
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("persist queue full")]
    QueueFull,
    #[error("store unavailable")]
    StoreDown,
    /// This node holds no lease on the course's partition: it may not change it.
    #[error("this node does not hold the course's partition")]
    NotHeld,
}

impl PersistHandle {
    /// Queues a change. Refuses at once, holding nothing, when the store is known to be
    /// down or the queue is full: the caller answers 503.
    pub fn submit(&self, change: Change) -> Result<oneshot::Receiver<Outcome>, SubmitError> {
        if !self.store_ok() {
            return Err(SubmitError::StoreDown);
        }
        // Read as the shard decides (this is called in the same step), so the change
        // carries the epoch it was decided under.
        let lease = match &self.held {
            None => None,
            Some(held) => Some(held.lease_of(change.course().as_str()).ok_or(SubmitError::NotHeld)?),
        };
        let (reply, rx) = oneshot::channel();
        let tx = &self.txs[committer_of(change.course(), self.txs.len())];
        match tx.try_send(Job { change, lease, reply }) {
            Ok(()) => Ok(rx),
            Err(_) => Err(SubmitError::QueueFull),
        }
    }

    /// Whether this node may change `course` (it holds its partition's lease, or the store
    /// has no leases).
    pub fn holds(&self, course: &CourseId) -> bool {
        self.held
            .as_ref()
            .is_none_or(|held| held.lease_of(course.as_str()).is_some())
    }

    /// False while the store breaker is open.
    pub fn store_ok(&self) -> bool {
        !self.breaker.is_open()
    }

    pub fn queue_depth(&self) -> usize {
        self.txs.iter().map(flume::Sender::len).sum()
    }

    /// Queues a read of the change feed; refuses at once when too many wait.
    pub fn read_events(
        &self,
        after: Option<u64>,
        limit: u32,
    ) -> Result<oneshot::Receiver<Result<feed::Page, feed::FeedError>>, SubmitError> {
        let (reply, rx) = oneshot::channel();
        self.reads
            .try_send(FeedRead { after, limit, reply })
            .map_err(|_| SubmitError::QueueFull)?;
        Ok(rx)
    }

    /// Queues a read of the committed catalog; refuses at once when too many wait.
    pub fn read_catalog(&self, read: CatalogRead) -> Result<(), SubmitError> {
        self.catalog.try_send(read).map_err(|_| SubmitError::QueueFull)
    }

    /// Changes after every commit that wrote events (for long polls).
    pub fn feed_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.committed.clone()
    }
}

/// What metrics read of the persist side. Holds the receiving end, not a sender, so it
/// never keeps the queue open past shutdown.
pub struct PersistGauges {
    rxs: Vec<flume::Receiver<Job>>,
    breaker: Arc<Breaker>,
}

impl crate::metrics::Gauges for PersistGauges {
    fn queue_depth(&self) -> usize {
        self.rxs.iter().map(flume::Receiver::len).sum()
    }
    fn store_up(&self) -> bool {
        !self.breaker.is_open()
    }
    fn store_breaker(&self) -> u8 {
        self.breaker.state()
    }
}

/// What [`spawn`] hands back: the shards' handle, the metrics' view, the thread.
pub struct Persist {
    pub handle: PersistHandle,
    pub gauges: PersistGauges,
    pub thread: std::thread::JoinHandle<()>,
}

/// How often an idle persist thread checks the store (and notices it is back).
const PING_INTERVAL_MS: u64 = 250;

/// Starts the persist thread: opens and migrates the store, seeds the demo catalog when
/// asked, streams the committed state to `sink` and returns once that is done. The thread
/// then serves the queue until every handle is dropped, and exits after the queue is empty.
pub fn spawn(cfg: PersistConfig, sink: impl FnMut(LoadRow) + Send + 'static) -> anyhow::Result<Persist> {
    let (handle, queues) = queues(&cfg);
    let catalog = queues.catalog.clone();
    let gauges = PersistGauges {
        rxs: queues.jobs.clone(),
        breaker: cfg.breaker.clone(),
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let thread = std::thread::Builder::new()
        .name("persist".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                let store = match open_and_load(&cfg, sink).await {
                    Ok(store) => store,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                // The lease keeper is told to stop, and stops between two store calls: a
                // call dropped halfway through reading its answer can leave its connection
                // for sqlx to drain, and the pool's close would wait on it.
                let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
                // Counted now, before any commit can meet a fence and forget leases.
                let granted = cfg.leases.as_ref().map_or(0, |l| l.held.count());
                let keep = async {
                    if let Some(leases) = cfg.leases.as_ref().filter(|l| l.solo) {
                        keep_leases(&store, &cfg, leases, granted, stop_rx).await;
                    }
                };
                let serving = async {
                    // The catalog reader ends with the last handle, like the committers.
                    tokio::join!(serve(&store, &cfg, queues), serve_catalog(&store, &cfg, catalog));
                    let _ = stop_tx.send(true);
                };
                tokio::join!(serving, keep);
                if let Some(leases) = &cfg.leases {
                    // After the last commit: the others take over at once.
                    match bounded(&cfg, store.release(&leases.node)).await {
                        Ok(Ok(n)) => tracing::info!(partitions = n, "leases released"),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %format!("{e:#}"), "releasing the leases failed; they lapse")
                        }
                        Err(e) => tracing::warn!(error = %e, "releasing the leases timed out; they lapse"),
                    }
                    leases.held.lose_all();
                }
                if tokio::time::timeout(cfg.statement_timeout, store.close())
                    .await
                    .is_err()
                {
                    tracing::warn!("closing the store's connections timed out; leaving them to the exit");
                }
                tracing::info!("persist thread: queue drained, store closed");
            });
        })
        .context("spawning the persist thread")?;
    ready_rx.recv().context("persist thread died during start")??;
    Ok(Persist { handle, gauges, thread })
}

/// The committers' bounded queues and the shards' handle to them.
pub fn queues(cfg: &PersistConfig) -> (PersistHandle, Queues) {
    assert!(cfg.commits_in_flight_max >= 1, "config guarantees a committer");
    // The queue bound is shared out, so the changes waiting stay within queue_rows_max.
    let per_queue = (cfg.queue_rows_max / cfg.commits_in_flight_max).max(1);
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..cfg.commits_in_flight_max)
        .map(|_| flume::bounded::<Job>(per_queue))
        .unzip();
    let (reads_tx, reads_rx) = flume::bounded(FEED_READS_QUEUED_MAX);
    let (catalog_tx, catalog_rx) = flume::bounded(FEED_READS_QUEUED_MAX);
    let (committed_tx, committed_rx) = tokio::sync::watch::channel(0);
    let handle = PersistHandle {
        txs: txs.into(),
        breaker: cfg.breaker.clone(),
        reads: reads_tx,
        committed: committed_rx,
        held: cfg.leases.as_ref().map(|l| l.held.clone()),
        catalog: catalog_tx,
    };
    let queues = Queues {
        jobs: rxs,
        reads: reads_rx,
        catalog: catalog_rx,
        committed: committed_tx,
    };
    (handle, queues)
}

async fn open_and_load(cfg: &PersistConfig, sink: impl FnMut(LoadRow)) -> anyhow::Result<Store> {
    let mut store = Store::open(&cfg.store_url, &cfg.store).await?;
    if let Some(leases) = &cfg.leases {
        store.fence_as(&leases.node.id);
        if leases.solo {
            // Before anything is read: what is loaded next is what the store holds once
            // every earlier owner is fenced out.
            lease::take_all(&store, &leases.node).await?;
            let (gen, owned) = store.fence_state(&leases.node.id).await?;
            for lease in &owned {
                leases.held.grant(*lease);
            }
            leases.held.refresh(gen, &owned);
            leases.metrics.leases_held.set(leases.held.count() as i64);
            tracing::info!(node = %leases.node.id, partitions = leases.held.count(), "took the store's leases");
        } else {
            // Cluster mode: the keeper takes this node's share and loads it into the shards.
            return Ok(store);
        }
    }
    if cfg.demo && store.course_count().await? == 0 {
        seed_demo(&store, cfg.leases.as_ref().map(|l| &*l.held)).await?;
    }
    store.check_guarantees().await?;
    let report = store.load(None, sink).await.context("loading the catalog")?;
    cfg.metrics.courses_overfull.set(report.courses_overfull as i64);
    cfg.metrics.seats_orphaned.set(report.seats_orphaned as i64);
    Ok(store)
}

/// A small catalog for first runs: capacities from 0 up, one course opening later.
async fn seed_demo(store: &Store, held: Option<&Held>) -> anyhow::Result<()> {
    let soon = crate::ids::now_ms() + 3_600_000;
    let courses: &[(&str, &str, u32, Option<UnixMs>)] = &[
        ("CS101-01", "Introduction to Programming", 120, None),
        ("CS201-01", "Data Structures", 60, None),
        ("CS301-01", "Operating Systems", 40, None),
        ("MATH101-01", "Calculus I", 200, None),
        ("MATH221-01", "Linear Algebra", 50, None),
        ("PHYS101-01", "Mechanics", 80, None),
        ("HIST210-01", "The Medieval World", 25, None),
        ("ART150-01", "Drawing Studio", 12, None),
        ("MUS100-01", "Choir", 1, None),
        ("SEM900-01", "Closed Seminar", 0, None),
        ("CS499-01", "Capstone (opens in an hour)", 30, Some(soon)),
    ];
    for (id, title, capacity, opens_at) in courses {
        let id = CourseId::parse(id).expect("demo ids are valid");
        let spec = CourseSpec::plain(*title, *capacity, *opens_at, None);
        let proof = Proof {
            gen: held.map_or(0, Held::gen),
            leases: held.and_then(|h| h.lease_of(id.as_str())).into_iter().collect(),
        };
        store
            .put_course(&id, &spec, &[], &proof, &Session::default())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    tracing::info!(courses = courses.len(), "seeded the demo catalog");
    Ok(())
}

/// Serves catalog reads one at a time, each bounded like any store call; ends when every
/// handle is gone.
async fn serve_catalog(store: &Store, cfg: &PersistConfig, reads: flume::Receiver<CatalogRead>) {
    while let Ok(read) = reads.recv_async().await {
        fn flatten<T>(r: Result<anyhow::Result<T>, TimedOut>) -> anyhow::Result<T> {
            r.map_err(anyhow::Error::from).and_then(|r| r)
        }
        match read {
            CatalogRead::Courses { after, limit, reply } => {
                let _ = reply.send(flatten(bounded(cfg, store.list_courses(after.as_ref(), limit)).await));
            }
            CatalogRead::Enrollments { student, reply } => {
                let _ = reply.send(flatten(bounded(cfg, store.enrollments_of(&student)).await));
            }
            CatalogRead::Draw { course, reply } => {
                let _ = reply.send(flatten(bounded(cfg, store.read_draw(&course)).await));
            }
        }
    }
}

/// Renews this node's heartbeat three times per lease and checks that the store still
/// gives it every lease it holds. A node outside cluster mode that finds its leases taken
/// (it was paused or cut off past its lease, and another process took the store over)
/// exits at once: its commits are already fenced out, and it must not go on answering
/// from a memory that is no longer the store's.
async fn keep_leases(
    store: &Store,
    cfg: &PersistConfig,
    leases: &LeaseConfig,
    granted: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // A solo node never gives a partition up, so owning or holding fewer than the
    // `granted` it took at start means another process took them. The count at start is
    // the measure, not the count now: a committer that met the fence first has already
    // forgotten the leases it lost (`fenced_out`), and would leave nothing to compare.
    let mut tick = tokio::time::interval(lease::heartbeat_interval(leases.node.lease));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let check = async {
            if !store.heartbeat(&leases.node).await? {
                return Ok::<_, anyhow::Error>(Err("this node's row belongs to another process".to_string()));
            }
            let owned = store.owned_count(&leases.node).await?;
            if owned < granted || leases.held.count() < granted {
                let holders = store.holders(&leases.node).await?;
                let names: Vec<String> = holders.iter().map(ToString::to_string).collect();
                return Ok(Err(format!(
                    "{} of {granted} partitions taken by {}",
                    granted.saturating_sub(owned),
                    names.join("; ")
                )));
            }
            Ok(Ok(()))
        };
        match bounded(cfg, check).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(lost))) => {
                tracing::error!(node = %leases.node.id, "lost the store's leases ({lost}); another enrolld serves this store; exiting");
                leases.held.lose_all();
                std::process::exit(1);
            }
            Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "renewing the leases failed"),
            Err(e) => tracing::warn!(error = %e, "renewing the leases timed out"),
        }
    }
}

/// Runs one committer per queue until every queue is closed and empty.
/// The feed's reader and its retention trim run beside them and end with them.
pub async fn serve<B: Backend>(store: &B, cfg: &PersistConfig, queues: Queues) {
    let Queues {
        jobs, reads, committed, ..
    } = queues;
    let committers = jobs.into_iter().map(|rx| committer(store, cfg, rx, &committed));
    let committers = futures_util::future::join_all(committers);
    let subscribed = committed.subscribe();
    let push = async {
        match &cfg.events_stream {
            Some(target) => stream::push(store, cfg, target, subscribed).await,
            None => std::future::pending().await,
        }
    };
    let background = async {
        tokio::join!(read_feed(store, cfg, reads), trim_feed(store, cfg), push);
    };
    tokio::select! {
        biased;
        _ = committers => {}
        () = background => {}
    }
}

/// Serves feed reads one at a time, each bounded like any store call.
async fn read_feed<B: Backend>(store: &B, cfg: &PersistConfig, reads: flume::Receiver<FeedRead>) {
    while let Ok(read) = reads.recv_async().await {
        let page = match bounded(cfg, store.read_events(read.after, read.limit)).await {
            Ok(page) => page,
            Err(e) => Err(feed::FeedError::Store(e.into())),
        };
        if let Ok(p) = &page {
            cfg.metrics.feed_head.set(p.head as i64);
            if let Some(last) = p.events.last() {
                cfg.metrics
                    .feed_served
                    .set(cfg.metrics.feed_served.get().max(last.seq as i64));
            }
        }
        let _ = read.reply.send(page);
    }
    std::future::pending::<()>().await
}

/// Trims events older than the retention, a small batch per tick, so a trim never holds
/// the feed row long enough to stall the commits.
async fn trim_feed<B: Backend>(store: &B, cfg: &PersistConfig) {
    let Some(retention) = cfg.events_retention else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(Duration::from_millis(TRIM_INTERVAL_MS));
    loop {
        tick.tick().await;
        // The head, for the feed-lag gauge even while nobody reads.
        if let Ok(Ok(page)) = bounded(cfg, store.read_events(None, 0)).await {
            cfg.metrics.feed_head.set(page.head as i64);
        }
        let before_ms = crate::ids::now_ms() - retention.as_millis() as i64;
        match bounded(cfg, store.trim_events(before_ms)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(rows)) => {
                cfg.metrics.events_trimmed.inc_by(rows);
                tracing::debug!(rows, "trimmed the change feed");
            }
            Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "trimming the change feed failed"),
            Err(e) => tracing::warn!(error = %e, "trimming the change feed timed out"),
        }
    }
}

async fn committer<B: Backend>(
    store: &B,
    cfg: &PersistConfig,
    rx: flume::Receiver<Job>,
    committed: &tokio::sync::watch::Sender<u64>,
) {
    let mut batch: Vec<Job> = Vec::with_capacity(cfg.batch_rows_max);
    loop {
        let first = match tokio::time::timeout(Duration::from_millis(PING_INTERVAL_MS), rx.recv_async()).await {
            Ok(Ok(job)) => job,
            Ok(Err(flume::RecvError::Disconnected)) => return,
            Err(_idle) => {
                // Idle: check the store, and probe it when the breaker is due to.
                if cfg.breaker.allow() {
                    let started = tokio::time::Instant::now();
                    let call = match bounded(cfg, store.ping()).await {
                        Ok(Ok(())) => Call::Ok,
                        _ => Call::Unreachable,
                    };
                    cfg.breaker.record(call, started.elapsed());
                }
                continue;
            }
        };
        batch.push(first);
        fill(&rx, &mut batch, cfg).await;
        if cfg.breaker.is_open() {
            // Queued before the breaker opened (a call stalled or failed meanwhile):
            // refuse them now, holding nothing, rather than wait on a store that is down.
            for job in batch.drain(..) {
                let _ = job.reply.send(Outcome::Failed);
            }
            continue;
        }
        run_batch(store, &mut batch, cfg).await;
        // Long polls re-read the feed (cheap: one indexed range read) after any batch.
        committed.send_modify(|n| *n += 1);
    }
}

/// A store call that did not end within the statement timeout.
#[derive(Debug, thiserror::Error)]
#[error("the store did not answer within {0:?}")]
pub struct TimedOut(Duration);

/// Runs one store call within the statement timeout, and tells the breaker as soon as it
/// has been in progress longer than a slow call: the breaker only hears of a finished
/// call otherwise, and a COMMIT that hangs would leave `/readyz` green while requests
/// queue behind it. A call cut off by the bound is dropped, which closes its connection.
pub async fn bounded<F: std::future::Future>(cfg: &PersistConfig, call: F) -> Result<F::Output, TimedOut> {
    let stall = cfg.breaker.slow_call().min(cfg.statement_timeout);
    let deadline = tokio::time::Instant::now() + cfg.statement_timeout;
    let call = tokio::time::timeout_at(deadline, call);
    tokio::pin!(call);
    tokio::select! {
        biased;
        out = &mut call => return out.map_err(|_| TimedOut(cfg.statement_timeout)),
        () = tokio::time::sleep(stall) => cfg.breaker.stalled(),
    }
    call.await.map_err(|_| TimedOut(cfg.statement_timeout))
}

/// Longest wait between two read-backs of an unknown commit.
const READBACK_BACKOFF_MS_MAX: u64 = 1_000;

/// What an unanswered COMMIT came to, once settled.
#[derive(Debug)]
enum Settle {
    /// It applied: this is what its callers are told.
    Applied(Settled),
    NotApplied,
    /// The read-back cannot tell: see [`Outcome::Unknown`].
    Ambiguous,
}

/// What a transaction cut off or unanswered at COMMIT came to. Nobody is answered before
/// this returns. Each read-back is bounded; they are retried with capped backoff until the
/// store answers (the requests waiting on it have their own bound and are cut off with an
/// unknown outcome; the breaker, open meanwhile, refuses new changes).
///
/// A read-back looks at one row the transaction changed. That row proves the commit only
/// while no other node may write it: after the fence and the read-back, the leases are
/// read again, and if one that `proof` names was taken meanwhile, a successor may have
/// made the same change, and the outcome is [`Settle::Ambiguous`]. (The simulation found a
/// deposed node's batch read back as applied because its successor had enrolled the same
/// student, and the batch's other seats answered 201 though they never committed.)
async fn settle<B: Backend>(store: &B, session: &Session, proof: &Proof, cfg: &PersistConfig) -> Settle {
    let Some((probe, if_committed)) = session.committing.borrow_mut().take() else {
        return Settle::NotApplied; // COMMIT never sent
    };
    let Some(probe) = probe else {
        return Settle::Applied(if_committed); // nothing changed: either outcome is the same
    };
    tracing::warn!(?probe, "COMMIT went unanswered; fencing its session and reading back");
    let mut backoff_ms = 20;
    loop {
        let started = tokio::time::Instant::now();
        // Fence first: a read-back that runs while the old session's COMMIT is still on its
        // way would see nothing, and the commit would land after "nothing recorded". The
        // leases last: still held after the read-back, nobody else wrote the row before it.
        let fenced_then_read = async {
            store.fence(session).await?;
            let applied = store.read_back(&probe).await?;
            let still_held = if proof.leases.is_empty() {
                true
            } else {
                let (_, owned) = store.fence_state().await?;
                proof.leases.iter().all(|l| owned.contains(l))
            };
            Ok::<_, anyhow::Error>((applied, still_held))
        };
        match bounded(cfg, fenced_then_read).await {
            Ok(Ok((applied, still_held))) => {
                cfg.breaker.record(Call::Ok, started.elapsed());
                tracing::warn!(applied, still_held, "unanswered COMMIT settled");
                return match (applied, still_held) {
                    (_, false) => Settle::Ambiguous,
                    (true, true) => Settle::Applied(if_committed),
                    (false, true) => Settle::NotApplied,
                };
            }
            Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), backoff_ms, "read-back failed; retrying"),
            Err(e) => tracing::warn!(error = %e, backoff_ms, "read-back timed out; retrying"),
        }
        cfg.breaker.record(Call::Unreachable, started.elapsed());
        tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
        backoff_ms = (backoff_ms * 2).min(READBACK_BACKOFF_MS_MAX);
    }
}

/// How a store call went, for the breaker.
fn call_of<T>(result: &Result<Result<T, CommitError>, TimedOut>) -> Call {
    match result {
        Ok(Ok(_)) => Call::Ok,
        Ok(Err(CommitError::NotCommitted(e))) if store::is_connection_error(e) => Call::Unreachable,
        // The store answered: it chose this transaction as a deadlock victim.
        Ok(Err(CommitError::NotCommitted(e))) if store::is_deadlock(e) => Call::Ok,
        // The store answered: another node holds the lease, which is no fault of the store.
        Ok(Err(CommitError::Fenced)) => Call::Ok,
        Ok(Err(_)) => Call::Failed,
        Err(TimedOut(_)) => Call::Unreachable,
    }
}

/// Takes what is queued, up to `batch_rows_max`; lingers up to `batch_linger_us` for more
/// while the batch is not full. Commits in flight already make batches grow under load.
async fn fill(rx: &flume::Receiver<Job>, batch: &mut Vec<Job>, cfg: &PersistConfig) {
    let deadline = tokio::time::Instant::now() + Duration::from_micros(cfg.batch_linger_us);
    while batch.len() < cfg.batch_rows_max {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) if cfg.batch_linger_us == 0 => return,
            Err(_) => match tokio::time::timeout_at(deadline, rx.recv_async()).await {
                Ok(Ok(job)) => batch.push(job),
                _ => return,
            },
        }
    }
}

/// Runs the jobs in order: seat ops in group commits (split where a key repeats, so the
/// per-key order holds), admin changes one by one between them.
async fn run_batch<B: Backend>(store: &B, batch: &mut Vec<Job>, cfg: &PersistConfig) {
    let mut seats: Vec<Seat> = Vec::new();
    let mut keys: HashSet<(CourseId, StudentId)> = HashSet::new();
    for job in batch.drain(..) {
        match job.change {
            Change::Seat(op) => {
                let (c, s) = op.key();
                if !keys.insert((c.clone(), s.clone())) {
                    commit_seats(store, &mut seats, cfg).await;
                    keys.clear();
                    keys.insert((c.clone(), s.clone()));
                }
                seats.push((op, job.lease, job.reply));
            }
            Change::PutCourse { course, spec, promote } => {
                commit_seats(store, &mut seats, cfg).await;
                keys.clear();
                let outcome = put_course(store, &course, &spec, &promote, job.lease, cfg).await;
                let _ = job.reply.send(outcome);
            }
            Change::Draw { course, record } => {
                commit_seats(store, &mut seats, cfg).await;
                keys.clear();
                let outcome = draw(store, &course, &record, job.lease, cfg).await;
                let _ = job.reply.send(outcome);
            }
        }
    }
    commit_seats(store, &mut seats, cfg).await;
}

/// Commits a draw. Its one transaction can be large (a 50,000-entry draw writes about
/// 100,000 rows), so it is bounded by [`DRAW_STATEMENT_TIMEOUTS`] statement timeouts; an
/// unanswered COMMIT is settled like any other (the record is there or not).
async fn draw<B: Backend>(
    store: &B,
    course: &CourseId,
    record: &DrawRecord,
    lease: Option<Lease>,
    cfg: &PersistConfig,
) -> Outcome {
    let Some(proof) = proof_of(cfg, lease.as_slice()) else {
        return Outcome::Failed;
    };
    let session = Session::default();
    let started = tokio::time::Instant::now();
    let wide = PersistConfig {
        statement_timeout: cfg.statement_timeout * DRAW_STATEMENT_TIMEOUTS,
        ..cfg.clone()
    };
    let result = bounded(&wide, store.draw(course, record, &proof, &session)).await;
    cfg.breaker.record(call_of(&result), started.elapsed());
    cfg.metrics.draws.inc();
    cfg.metrics.draw_entries.observe(record.order.len() as f64);
    match result {
        Ok(Ok(())) => {
            cfg.metrics.draw_seconds.observe(started.elapsed().as_secs_f64());
            cfg.metrics.waitlisted.add(i64::from(record.waitlisted));
            Ok(Settled::Draw)
        }
        Ok(Err(e)) => ended(store, cfg, Some(e), &session, &proof, "draw").await,
        Err(TimedOut(_)) => ended(store, cfg, None, &session, &proof, "draw").await,
    }
    .map_or_else(|outcome| outcome, |_| Outcome::Committed)
}

/// What a transaction that did not end well came to (`error`; None: it timed out):
/// `Ok` with what its callers are told when an unanswered COMMIT turns out to have
/// applied, else the outcome to answer (logged here, as `what`).
async fn ended<B: Backend>(
    store: &B,
    cfg: &PersistConfig,
    error: Option<CommitError>,
    session: &Session,
    proof: &Proof,
    what: &str,
) -> Result<Settled, Outcome> {
    match error {
        Some(CommitError::NotCommitted(e)) => {
            tracing::error!(error = %format!("{e:#}"), "{what} not committed");
            Err(Outcome::Failed)
        }
        Some(CommitError::Fenced) => {
            fenced_out(store, cfg).await;
            Err(Outcome::Failed)
        }
        Some(CommitError::Unknown(_)) | None => match settle(store, session, proof, cfg).await {
            Settle::Applied(settled) => Ok(settled),
            Settle::NotApplied => {
                tracing::error!("{what} not committed (read back after its COMMIT went unanswered)");
                Err(Outcome::Failed)
            }
            Settle::Ambiguous => {
                tracing::error!("{what}: outcome unknown, a lease it was decided under was taken meanwhile");
                Err(Outcome::Unknown)
            }
        },
    }
}

/// Counts a committed op in the rounds' metrics.
fn count_rounds(m: &crate::metrics::PersistMetrics, op: &SeatOp) {
    match op {
        SeatOp::Enter { .. } => m.entries.inc(),
        SeatOp::Join { .. } => m.waitlisted.inc(),
        SeatOp::Leave { .. } => m.waitlisted.dec(),
        SeatOp::DropPromote { .. } | SeatOp::Promote { .. } => {
            m.waitlisted.dec();
            m.promotions.inc();
        }
        SeatOp::Enroll { .. } | SeatOp::Drop { .. } | SeatOp::Withdraw { .. } => {}
    }
}

/// A draw's bound, in statement timeouts.
const DRAW_STATEMENT_TIMEOUTS: u32 = 4;

async fn put_course<B: Backend>(
    store: &B,
    course: &CourseId,
    spec: &CourseSpec,
    promote: &[(StudentId, UnixMs)],
    lease: Option<Lease>,
    cfg: &PersistConfig,
) -> Outcome {
    let Some(proof) = proof_of(cfg, lease.as_slice()) else {
        return Outcome::Failed; // decided under a lease this node has lost since
    };
    let mut session = Session::default();
    let started = tokio::time::Instant::now();
    let mut result = bounded(cfg, store.put_course(course, spec, promote, &proof, &session)).await;
    // Two new courses created at once on two nodes can deadlock on the gap their rows go
    // into; InnoDB rolls one back whole, which is then simply run again.
    for _ in 0..DEADLOCK_RETRIES_MAX {
        match &result {
            Ok(Err(CommitError::NotCommitted(e))) if store::is_deadlock(e) => {
                tracing::debug!(course = %course, "admin change chosen as a deadlock victim; running it again");
                session = Session::default();
                result = bounded(cfg, store.put_course(course, spec, promote, &proof, &session)).await;
            }
            _ => break,
        }
    }
    cfg.breaker.record(call_of(&result), started.elapsed());
    if matches!(result, Ok(Ok(PutResult::Updated { .. }))) && !promote.is_empty() {
        cfg.metrics.waitlisted.sub(promote.len() as i64);
        cfg.metrics.promotions.inc_by(promote.len() as u64);
    }
    let error = match result {
        Ok(Ok(r)) => return Outcome::CoursePut(r),
        Ok(Err(e)) => Some(e),
        Err(TimedOut(_)) => None,
    };
    match ended(store, cfg, error, &session, &proof, "admin change").await {
        Ok(Settled::Put(r)) => Outcome::CoursePut(r),
        Ok(Settled::Seats(_) | Settled::Draw) => unreachable!("an admin change settles as a put"),
        Err(outcome) => outcome,
    }
}

/// Times an admin change chosen as a deadlock victim is run again before it fails (503).
const DEADLOCK_RETRIES_MAX: usize = 3;

/// A seat op in a batch: the op, the lease it was decided under, who waits for it.
type Seat = (SeatOp, Option<Lease>, oneshot::Sender<Outcome>);

/// The proof for changes decided under `leases`: the fence generation first, then each
/// lease checked against what is held (a refresh loses leases before it moves the
/// generation, so a lease lost before the generation read is seen lost here). None: one
/// of them was lost since (the change was decided from a memory that is no longer the
/// store's; it is answered as not recorded without reaching the store).
fn proof_of(cfg: &PersistConfig, leases: &[Lease]) -> Option<Proof> {
    let Some(held) = cfg.leases.as_ref().map(|l| &l.held) else {
        return Some(Proof::default());
    };
    let gen = held.gen();
    leases
        .iter()
        .all(|l| held.lease(l.partition) == Some(*l))
        .then(|| Proof {
            gen,
            leases: leases.to_vec(),
        })
}

/// After a fenced batch: reads the store's fence generation and this node's leases, and
/// forgets the leases it lost, so the shards stop deciding for those partitions. The
/// batch's changes are answered as not recorded (true: it rolled back), including those
/// of partitions still held; their clients retry.
async fn fenced_out<B: Backend>(store: &B, cfg: &PersistConfig) {
    cfg.metrics.fenced_batches.inc();
    let held = cfg.leases.as_ref().map(|l| &l.held);
    match bounded(cfg, store.fence_state()).await {
        Ok(Ok((gen, owned))) => {
            tracing::warn!(
                gen,
                leases = owned.len(),
                "batch fenced out: this node's leases changed in the store"
            );
            if let Some(held) = held {
                held.refresh(gen, &owned);
            }
        }
        Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "batch fenced out; reading the leases failed"),
        Err(e) => tracing::warn!(error = %e, "batch fenced out; reading the leases timed out"),
    }
}

async fn commit_seats<B: Backend>(store: &B, seats: &mut Vec<Seat>, cfg: &PersistConfig) {
    if seats.is_empty() {
        return;
    }
    let metrics = &cfg.metrics;
    let mut leases: Vec<Lease> = seats.iter().filter_map(|(_, lease, _)| *lease).collect();
    leases.sort_unstable();
    leases.dedup();
    let Some(proof) = proof_of(cfg, &leases) else {
        // Decided under a lease lost since: not one of them may reach the store.
        for (_, _, reply) in seats.drain(..) {
            let _ = reply.send(Outcome::Failed);
        }
        return;
    };
    let ops: Vec<SeatOp> = seats.iter().map(|(op, _, _)| op.clone()).collect();
    let session = Session::default();
    let started = tokio::time::Instant::now();
    let result = bounded(cfg, store.commit_seats(&ops, &proof, &session)).await;
    let elapsed = started.elapsed();
    cfg.breaker.record(call_of(&result), elapsed);
    tracing::debug!(
        rows = ops.len(),
        elapsed_us = elapsed.as_micros() as u64,
        "group commit"
    );
    metrics.batch_rows.observe(ops.len() as f64);
    metrics.commit_seconds.observe(elapsed.as_secs_f64());
    let results = match result {
        Ok(Ok(results)) => Ok(Settled::Seats(results)),
        Ok(Err(e)) => ended(store, cfg, Some(e), &session, &proof, "seat batch").await,
        Err(TimedOut(_)) => ended(store, cfg, None, &session, &proof, "seat batch").await,
    }
    .map(|settled| match settled {
        Settled::Seats(results) => results,
        Settled::Put(_) | Settled::Draw => unreachable!("a seat batch settles as seats"),
    });
    let outcomes: Vec<Outcome> = match results {
        Ok(results) => {
            assert_eq!(results.len(), ops.len(), "one result per op");
            results
                .into_iter()
                .map(|r| match r {
                    SeatResult::Applied => Outcome::Committed,
                    SeatResult::Full => Outcome::Full,
                })
                .collect()
        }
        Err(outcome) => vec![outcome; ops.len()],
    };
    for ((op, _, reply), outcome) in seats.drain(..).zip(outcomes) {
        if outcome == Outcome::Committed {
            count_rounds(metrics, &op);
        }
        let _ = reply.send(outcome);
    }
}
