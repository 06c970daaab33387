//! Start-up, the thread layout, signals and shutdown.
//!
//! Why: the order matters and lives in one place: configuration is valid, then the store
//! is open and migrated, the committed state is loaded into per-shard tables, the
//! listeners are bound, the shards start, and only then is the node ready. SIGTERM walks
//! it back: stop accepting, answer what is in flight, flush the persist queue, exit 0.
//! Must never: answer a request before the catalog is loaded.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use tokio::sync::{mpsc, watch};

use crate::cluster::bus::{self, BusConfig};
use crate::cluster::catalog::{publish_changes, Catalog, Published, PUBLISH_QUEUE_MAX};
use crate::cluster::forward::Forwarder;
use crate::cluster::keeper::{self, KeeperConfig};
use crate::cluster::Cluster;
use crate::config::{Config, LogFormat};
use crate::ids::{ShardClock, ShardId, SystemClock};
use crate::limit::breaker::Breaker;
use crate::limit::{Limiter, ShardLimiter};
use crate::metrics::{ClusterMetrics, Collector, Metrics, PersistMetrics, ShardMetrics};
use crate::net::auth::Auth;
use crate::net::http::{ClusterCtx, Ctx, HttpLimits};
use crate::net::ConnLimits;
use crate::persist::store::{LoadRow, StoreOptions};
use crate::persist::{self, PersistConfig};
use crate::shard::table::CourseTable;
use crate::shard::{
    owner_of, publish_heat, run_rounds, serve_inbox, Envelope, Router, Shard, ANSWER_WAIT_STATEMENT_TIMEOUTS,
    INBOX_MESSAGES_MAX,
};

/// Rows between two progress lines while the catalog loads.
const LOAD_PROGRESS_ROWS: u64 = 200_000;

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    // Colour only on a terminal: journald, files and pipes get plain text.
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Runs `enrolld serve` until SIGTERM or SIGINT.
pub fn serve(cfg: Config) -> anyhow::Result<()> {
    abort_on_panic();
    // Before the store is opened, and held until serve returns: one SQLite file, one process.
    let _store_lock = crate::single_writer::hold(&cfg.store)?;
    let secret = cfg.resolve_jwt_secret()?;
    let auth = Arc::new(Auth::new(&secret));
    let started = Instant::now();
    let persist_metrics = Arc::new(PersistMetrics::default());
    let cluster_metrics = Arc::new(ClusterMetrics::default());
    let store_breaker = Arc::new(Breaker::new("store", cfg.limits.store_breaker.clone()));
    let leases = lease_config(&cfg, cluster_metrics.clone());
    let cluster = match (&cfg.cluster, &leases) {
        (Some(c), Some(l)) => Some(Arc::new(Cluster::new(
            c.node_id.clone(),
            c.advertise.clone(),
            l.held.clone(),
        ))),
        _ => None,
    };
    // Cluster mode: the catalog cache, and the queue the shards hand their changes to.
    let catalog = cluster.as_ref().map(|_| Arc::new(Catalog::default()));
    let (changes_tx, changes_rx) = flume::bounded::<Published>(PUBLISH_QUEUE_MAX);
    let publish_seq = Arc::new(AtomicU64::new(0));
    let (
        tables,
        persist::Persist {
            handle: persist,
            gauges,
            thread: persist_thread,
        },
    ) = load_tables(&cfg, persist_metrics.clone(), store_breaker.clone(), leases.clone())?;
    let (limits_tx, limits_rx) = watch::channel(Arc::new(cfg.limits.clone()));
    let limiter = Arc::new(Limiter::new(
        limits_rx,
        cfg.redis.as_deref().map(|url| (url, cfg.redis_prefix.as_str())),
        store_breaker,
    )?);
    let courses: usize = tables.iter().map(CourseTable::len).sum();
    let seats: u64 = tables.iter().map(CourseTable::enrolled_total).sum();
    tracing::info!(
        courses,
        seats,
        ms = started.elapsed().as_millis() as u64,
        "catalog loaded"
    );

    let listeners =
        crate::net::bind_listeners(cfg.listen, cfg.shards).with_context(|| format!("binding {}", cfg.listen))?;
    let local = listeners[0].local_addr()?;
    let mut own_listeners: Vec<Option<std::net::TcpListener>> = match cfg.shard_listen {
        Some(base) => crate::net::bind_shard_listeners(base, cfg.shards)
            .with_context(|| format!("binding the shard ports from {base}"))?
            .into_iter()
            .map(Some)
            .collect(),
        None => (0..cfg.shards).map(|_| None).collect(),
    };
    let shard_addrs: Vec<String> = own_listeners
        .iter()
        .flatten()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<std::io::Result<_>>()?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let ready = Arc::new(AtomicBool::new(false));
    let (inbox_tx, inbox_rx): (Vec<_>, Vec<_>) = (0..cfg.shards)
        .map(|_| mpsc::channel::<Envelope>(INBOX_MESSAGES_MAX))
        .unzip();
    let drained = Arc::new(tokio::sync::Barrier::new(cfg.shards));
    let shard_metrics: Vec<Arc<ShardMetrics>> = (0..cfg.shards).map(|_| Arc::default()).collect();
    let collector = Collector::new(shard_metrics.clone(), Arc::new(gauges), limiter.clone());
    let metrics = Arc::new(Metrics::new(collector, &persist_metrics, &cluster_metrics));
    let heartbeats: Arc<Vec<AtomicU64>> = Arc::new((0..cfg.shards).map(|_| AtomicU64::new(0)).collect());
    let conn_limits = ConnLimits {
        head_bytes_max: cfg.head_bytes_max,
        header_read_timeout_ms: cfg.header_read_timeout_ms,
        connections_max: cfg.connections_max.div_ceil(cfg.shards),
        drain_timeout_ms: cfg.drain_timeout_ms,
    };
    let mut threads = Vec::new();
    for (i, ((table, listener), inbox)) in tables.into_iter().zip(listeners).zip(inbox_rx).enumerate() {
        let peers = inbox_tx.clone();
        let persist = persist.clone();
        let auth = auth.clone();
        let ready = ready.clone();
        let limits = conn_limits.clone();
        let http_limits = HttpLimits {
            body_bytes_max: cfg.body_bytes_max,
            body_read_timeout_ms: cfg.body_read_timeout_ms,
        };
        let shutdown = shutdown_rx.clone();
        let drained = drained.clone();
        let metrics = metrics.clone();
        let own_metrics = shard_metrics[i].clone();
        let heartbeats = heartbeats.clone();
        let access_log = cfg.access_log;
        let metrics_on = cfg.metrics_enabled;
        let limiter = limiter.clone();
        let shards = cfg.shards;
        let own = own_listeners[i].take();
        let answer_wait =
            std::time::Duration::from_millis(cfg.store_statement_timeout_ms) * ANSWER_WAIT_STATEMENT_TIMEOUTS;
        let cluster = cluster.clone();
        let cluster_metrics = cluster_metrics.clone();
        let catalog = catalog.clone();
        let changes_tx = changes_tx.clone();
        let publish_seq = publish_seq.clone();
        let thread = std::thread::Builder::new().name(format!("shard-{i}")).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let set = tokio::task::LocalSet::new();
            set.block_on(&rt, async move {
                let limiter = Rc::new(ShardLimiter::new(limiter, shards));
                let render = crate::net::http::render_course;
                let clock = ShardClock::new(Arc::new(SystemClock));
                let shard = Shard::new(
                    ShardId(i),
                    table,
                    persist,
                    own_metrics,
                    limiter,
                    render,
                    clock,
                    answer_wait,
                );
                let shard = Rc::new(if cluster.is_some() {
                    shard.track_changes()
                } else {
                    shard
                });
                if let Some(cluster) = &cluster {
                    tokio::task::spawn_local(publish_changes(
                        shard.clone(),
                        cluster.held.clone(),
                        publish_seq,
                        changes_tx,
                    ));
                }
                tokio::task::spawn_local(serve_inbox(shard.clone(), inbox));
                tokio::task::spawn_local(publish_heat(shard.clone()));
                tokio::task::spawn_local(run_rounds(shard.clone()));
                tokio::task::spawn_local(beat(heartbeats, i));
                let router = Router { me: shard, peers };
                let cluster = cluster.zip(catalog).map(|(cluster, catalog)| ClusterCtx {
                    forwarder: Forwarder::new(&cluster.node_id, answer_wait),
                    node: hyper::header::HeaderValue::from_str(&cluster.node_id).expect("validated node id"),
                    cluster,
                    catalog,
                    metrics: cluster_metrics,
                });
                let ctx = Rc::new(Ctx::new(
                    router,
                    auth,
                    http_limits,
                    ready,
                    metrics,
                    access_log,
                    metrics_on,
                    cluster,
                ));
                let listeners = std::iter::once(listener).chain(own).collect();
                let served = crate::net::serve(listeners, ctx, limits, shutdown).await;
                // Keep answering other shards until every shard has drained its clients.
                drained.wait().await;
                served
            })
        })?;
        threads.push(thread);
    }
    // Cluster mode: this node's share of the partitions, loaded into the shards, before
    // it is ready.
    drop(changes_tx);
    let keeper = match (&cluster, &leases) {
        (Some(cluster), Some(l)) => Some(keeper::spawn(KeeperConfig {
            store_url: cfg.store.clone(),
            node: l.node.clone(),
            cluster: cluster.clone(),
            shards: inbox_tx.clone(),
            statement_timeout: std::time::Duration::from_millis(cfg.store_statement_timeout_ms),
            metrics: cluster_metrics.clone(),
        })?),
        _ => None,
    };
    // Cluster mode: the whole catalog in the cache before the node is ready.
    let _bus = match (&cluster, &catalog, &leases) {
        (Some(cluster), Some(catalog), Some(l)) => Some(bus::spawn(BusConfig {
            store_url: cfg.store.clone(),
            redis: cfg.redis.clone(),
            channel: format!("{}catalog", cfg.redis_prefix),
            node_id: cluster.node_id.clone(),
            incarnation: l.node.incarnation,
            catchup: std::time::Duration::from_millis(cfg.cluster_catchup_ms),
            statement_timeout: std::time::Duration::from_millis(cfg.store_statement_timeout_ms),
            catalog: catalog.clone(),
            changes: changes_rx,
            metrics: cluster_metrics.clone(),
        })?),
        _ => None,
    };
    drop(inbox_tx);
    drop(persist);
    ready.store(true, Ordering::Relaxed);
    // Shard i's own port is the i-th address (nginx lists them in that order).
    let shard_listen = match shard_addrs.is_empty() {
        true => String::new(),
        false => format!(" shard_listen={}", shard_addrs.join(",")),
    };
    tracing::info!(
        shards = cfg.shards,
        store = %redact(&cfg.store),
        "enrolld ready listen={local}{shard_listen}"
    );
    notify_systemd(&heartbeats);
    if cfg.demo {
        eprintln!(
            "\nTry it (pass `token` the same --store or --jwt-secret as `serve`):\n  \
             TOKEN=$(cargo run -q --release -- token --sub alice)\n  \
             curl -s -X POST -H \"Authorization: Bearer $TOKEN\" http://{local}/v1/courses/CS101-01/enrollment\n  \
             curl -s -H \"Authorization: Bearer $TOKEN\" http://{local}/v1/me/enrollments\n"
        );
    }
    wait_for_termination(&cfg, &limits_tx, &limiter)?;
    tracing::info!("shutting down: draining connections and the persist queue");
    if let Some(keeper) = keeper {
        // Takes nothing more over; the persist thread gives the leases back once the last
        // change is committed.
        keeper.stop();
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = shutdown_tx.send(true);
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "shard stopped with an error"),
            Err(_) => anyhow::bail!("a shard thread panicked"),
        }
    }
    let store_wait = std::time::Duration::from_millis(cfg.store_statement_timeout_ms) * SHUTDOWN_STATEMENT_TIMEOUTS;
    let waited = Instant::now();
    while !persist_thread.is_finished() {
        if waited.elapsed() >= store_wait {
            // Every client of what is left was already answered or cut off (their waits
            // are bounded too); what the store made of it is read back at the next start.
            anyhow::bail!(
                "the store did not take the last changes within {} ms; exiting without them",
                store_wait.as_millis()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(SHUTDOWN_POLL_MS));
    }
    persist_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the persist thread panicked"))?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// After the shards drained (`drain_timeout_ms`), how long SIGTERM waits at most for the
/// persist queue to reach the store, in statement timeouts: each batch is bounded by one,
/// and once a call fails the breaker refuses the rest at once.
pub const SHUTDOWN_STATEMENT_TIMEOUTS: u32 = 3;
/// How often shutdown looks whether the persist thread has finished.
const SHUTDOWN_POLL_MS: u64 = 20;

type Loaded = (Vec<CourseTable>, persist::Persist);

/// Opens the store on the persist thread and streams its state into per-shard tables.
/// The leases this process takes on a MySQL store (None on SQLite): every partition
/// outside cluster mode, its share in cluster mode.
fn lease_config(cfg: &Config, metrics: Arc<ClusterMetrics>) -> Option<persist::LeaseConfig> {
    if persist::store::Dialect::of_url(&cfg.store) != Some(persist::store::Dialect::Mysql) {
        return None;
    }
    let lease = std::time::Duration::from_millis(cfg.cluster_lease_ms);
    let node = match &cfg.cluster {
        None => persist::lease::NodeInfo::solo(&cfg.listen.to_string(), lease),
        Some(c) => persist::lease::NodeInfo {
            id: c.node_id.clone(),
            incarnation: rand::random::<u32>() as i64,
            advertise: c.advertise.clone(),
            lease,
        },
    };
    Some(persist::LeaseConfig {
        node,
        held: Arc::new(crate::partition::Held::default()),
        solo: cfg.cluster.is_none(),
        metrics,
    })
}

fn load_tables(
    cfg: &Config,
    metrics: Arc<PersistMetrics>,
    breaker: Arc<Breaker>,
    leases: Option<persist::LeaseConfig>,
) -> anyhow::Result<Loaded> {
    let shards = cfg.shards;
    let tables = Arc::new(Mutex::new(
        (0..shards).map(|_| CourseTable::default()).collect::<Vec<_>>(),
    ));
    let sink_tables = tables.clone();
    let mut rows: u64 = 0;
    let started = Instant::now();
    let waitlisted = metrics.waitlisted.clone();
    let sink = move |row: LoadRow| {
        let mut t = sink_tables.lock().expect("loader is the only user");
        if matches!(row, LoadRow::Place { rank: Some(_), .. }) {
            waitlisted.inc();
        }
        let owner = owner_of(row.course(), shards).0;
        if let Err(what) = t[owner].load_row(row) {
            tracing::error!("stored {what} not loaded (the student already has one there)");
        }
        rows += 1;
        if rows % LOAD_PROGRESS_ROWS == 0 {
            let secs = started.elapsed().as_secs_f64().max(0.001);
            tracing::info!(rows, rows_per_sec = (rows as f64 / secs) as u64, "loading catalog");
        }
    };
    let pcfg = PersistConfig {
        store_url: cfg.store.clone(),
        store: StoreOptions {
            // One connection per committer, one for pings and admin reads.
            pool_connections_max: cfg.commits_in_flight_max as u32 + 1,
            acquire_timeout_ms: cfg.store_acquire_timeout_ms,
            events: cfg.events_enabled,
        },
        statement_timeout: std::time::Duration::from_millis(cfg.store_statement_timeout_ms),
        events_retention: cfg
            .events_enabled
            .then(|| std::time::Duration::from_secs_f64(cfg.events_retention_days * 86_400.0)),
        events_stream: match (&cfg.events_redis_stream, &cfg.redis) {
            (Some(key), Some(url)) if cfg.events_enabled => Some(persist::stream::StreamTarget {
                redis_url: url.clone(),
                key: key.clone(),
            }),
            _ => None,
        },
        commits_in_flight_max: cfg.commits_in_flight_max,
        batch_rows_max: cfg.batch_rows_max,
        batch_linger_us: cfg.batch_linger_us,
        queue_rows_max: cfg.queue_rows_max,
        demo: cfg.demo,
        leases,
        metrics,
        breaker,
    };
    let handle = persist::spawn(pcfg, sink).with_context(|| format!("opening store {}", redact(&cfg.store)))?;
    let tables = std::mem::take(&mut *tables.lock().expect("loader finished"));
    Ok((tables, handle))
}

/// How often each shard proves it is alive (for the systemd watchdog).
const HEARTBEAT_MS: u64 = 1_000;

/// Ticks this shard's heartbeat while its runtime is responsive.
async fn beat(heartbeats: Arc<Vec<AtomicU64>>, shard: usize) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(HEARTBEAT_MS));
    loop {
        tick.tick().await;
        heartbeats[shard].fetch_add(1, Ordering::Relaxed);
    }
}

/// Tells systemd (when it started us with `Type=notify`) that we are ready, and feeds its
/// watchdog only while every shard's heartbeat moves: a wedged shard gets the node
/// restarted instead of half-serving.
fn notify_systemd(heartbeats: &Arc<Vec<AtomicU64>>) {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = (timeout / 2).max(std::time::Duration::from_millis(2 * HEARTBEAT_MS));
    let heartbeats = heartbeats.clone();
    let spawned = std::thread::Builder::new().name("watchdog".into()).spawn(move || {
        let mut last: Vec<u64> = heartbeats.iter().map(|h| h.load(Ordering::Relaxed)).collect();
        loop {
            std::thread::sleep(period);
            let now: Vec<u64> = heartbeats.iter().map(|h| h.load(Ordering::Relaxed)).collect();
            if now.iter().zip(&last).all(|(n, l)| n > l) {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            } else {
                tracing::error!("a shard stopped beating; withholding the systemd watchdog");
            }
            last = now;
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start the watchdog thread");
    }
}

/// How often the configuration file is checked for changes.
const CONFIG_POLL_MS: u64 = 1_000;

/// Blocks until SIGTERM or SIGINT. Meanwhile reloads the limits on SIGHUP and whenever the
/// configuration file's modification time changes; an invalid file keeps the old rules.
fn wait_for_termination(
    cfg: &Config,
    limits_tx: &watch::Sender<Arc<crate::limit::LimitsConfig>>,
    limiter: &Limiter,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let modified = |cfg: &Config| {
        cfg.config_path
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok()?.modified().ok())
    };
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut poll = tokio::time::interval(std::time::Duration::from_millis(CONFIG_POLL_MS));
        let mut seen = modified(cfg);
        loop {
            let why = tokio::select! {
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
                _ = hup.recv() => "SIGHUP",
                _ = poll.tick() => {
                    let now = modified(cfg);
                    if now == seen {
                        continue;
                    }
                    seen = now;
                    "file changed"
                }
            };
            match cfg.reload_limits() {
                Ok(limits) => {
                    limiter.reconfigure(&limits);
                    let _ = limits_tx.send(Arc::new(limits));
                    tracing::info!(why, "limits and flow rules reloaded");
                }
                Err(e) => tracing::error!(why, error = %e, "reload refused; the old rules stay"),
            }
        }
    })
}

/// A panic anywhere (an invariant assert) takes the whole process down: a node with one
/// dead shard would keep answering for the others while that shard's courses hang, whereas
/// a restart rebuilds every shard from the store.
fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        std::process::abort();
    }));
}

/// A store URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..s + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}
