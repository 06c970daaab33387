//! Configuration: one explicit struct, from flags, `ENROLLD_*` variables and a TOML file,
//! validated once at start.
//!
//! Why: operators must be able to tell what the server runs with and get a one-line error
//! naming the bad key, never a half-started server. Precedence: flag, then environment,
//! then file, then the documented default (see `config/enrolld.toml`).
//! Must never: start anything before the whole configuration is valid.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;

use crate::limit::LimitsConfig;
use crate::net::HEAD_BYTES_MIN;
use crate::persist::store::{Dialect, BATCH_ROWS_LIMIT};

pub use crate::ids::SHARDS_MAX;

/// Keys settable by flag and environment (and, but for `config`, by file).
#[derive(Args, Debug, Default, Clone)]
pub struct ConfigArgs {
    /// TOML configuration file (every key documented in config/enrolld.toml)
    #[arg(long, env = "ENROLLD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, env = "ENROLLD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Shard threads [default: one per available core]
    #[arg(long, env = "ENROLLD_SHARDS")]
    pub shards: Option<usize>,
    /// Also listen on one port per shard, shard i on this port + i (port 0: any free ports),
    /// for a proxy that sends each course to its owner shard [default: none]
    #[arg(long, env = "ENROLLD_SHARD_LISTEN")]
    pub shard_listen: Option<SocketAddr>,
    /// Store URL: sqlite://FILE or mysql://user:pass@host:port/db [default: sqlite://enrolld.db]
    #[arg(long, env = "ENROLLD_STORE")]
    pub store: Option<String>,
    /// Redis URL for cross-node limits [default: none]
    #[arg(long, env = "ENROLLD_REDIS")]
    pub redis: Option<String>,
    /// HS256 secret for tokens [default: generated once beside the SQLite store]
    #[arg(long, env = "ENROLLD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Seed a demo catalog into an empty store
    #[arg(long, env = "ENROLLD_DEMO", num_args = 0..=1, default_missing_value = "true")]
    pub demo: Option<bool>,
    /// Rate limits and flow rules on or off (their settings: the file's [limits] table) [default: true]
    #[arg(long, env = "ENROLLD_LIMITS_ENABLED", num_args = 0..=1, default_missing_value = "true")]
    pub limits_enabled: Option<bool>,
    /// Count requests for /metrics (off only to measure what counting costs) [default: true]
    #[arg(long, env = "ENROLLD_METRICS_ENABLED", num_args = 0..=1, default_missing_value = "true")]
    pub metrics_enabled: Option<bool>,
    /// Log one line per request, with its request id [default: false]
    #[arg(long, env = "ENROLLD_ACCESS_LOG", num_args = 0..=1, default_missing_value = "true")]
    pub access_log: Option<bool>,
    /// Log format: text or json [default: text]
    #[arg(long, env = "ENROLLD_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Open connections at most, over all shards [default: 10000]
    #[arg(long, env = "ENROLLD_CONNECTIONS_MAX")]
    pub connections_max: Option<usize>,
    /// Time allowed for a request head, and for an idle keep-alive connection [default: 10000]
    #[arg(long, env = "ENROLLD_HEADER_READ_TIMEOUT_MS")]
    pub header_read_timeout_ms: Option<u64>,
    /// Largest request head in bytes [default: 16384]
    #[arg(long, env = "ENROLLD_HEAD_BYTES_MAX")]
    pub head_bytes_max: Option<usize>,
    /// Time a request body may take to arrive (408 beyond) [default: 10000]
    #[arg(long, env = "ENROLLD_BODY_READ_TIMEOUT_MS")]
    pub body_read_timeout_ms: Option<u64>,
    /// Largest request body in bytes (413 beyond) [default: 65536]
    #[arg(long, env = "ENROLLD_BODY_BYTES_MAX")]
    pub body_bytes_max: Option<usize>,
    /// Time SIGTERM waits for in-flight requests [default: 10000]
    #[arg(long, env = "ENROLLD_DRAIN_TIMEOUT_MS")]
    pub drain_timeout_ms: Option<u64>,
    /// Seat changes per group commit at most [default: 1000]
    #[arg(long, env = "ENROLLD_BATCH_ROWS_MAX")]
    pub batch_rows_max: Option<usize>,
    /// Time a batch waits for more changes when not full [default: 0]
    #[arg(long, env = "ENROLLD_BATCH_LINGER_US")]
    pub batch_linger_us: Option<u64>,
    /// Seat changes queued for the persist thread at most (503 beyond) [default: 65536]
    #[arg(long, env = "ENROLLD_QUEUE_ROWS_MAX")]
    pub queue_rows_max: Option<usize>,
    /// Committers, each owning a share of the courses, with its own queue and store connection [default: 1]
    #[arg(long, env = "ENROLLD_COMMITS_IN_FLIGHT_MAX")]
    pub commits_in_flight_max: Option<usize>,
    /// Time to get a store connection before a batch fails [default: 1000]
    #[arg(long, env = "ENROLLD_STORE_ACQUIRE_TIMEOUT_MS")]
    pub store_acquire_timeout_ms: Option<u64>,
    /// Bound on every store call (a batch with its COMMIT, an admin change, a ping, a read-back); an unanswered COMMIT is read back after its session is ended; requests wait at most 3x this [default: 5000]
    #[arg(long, env = "ENROLLD_STORE_STATEMENT_TIMEOUT_MS")]
    pub store_statement_timeout_ms: Option<u64>,
    /// Write the change feed (GET /v1/admin/events) in every change's transaction [default: true]
    #[arg(long, env = "ENROLLD_EVENTS_ENABLED", num_args = 0..=1, default_missing_value = "true")]
    pub events_enabled: Option<bool>,
    /// Days the change feed keeps an event (fractions allowed; older ones are trimmed in small batches) [default: 30]
    #[arg(long, env = "ENROLLD_EVENTS_RETENTION_DAYS")]
    pub events_retention_days: Option<f64>,
    /// Also append each committed event to this Redis Stream (best effort; needs --redis) [default: none]
    #[arg(long, env = "ENROLLD_EVENTS_REDIS_STREAM")]
    pub events_redis_stream: Option<String>,
    /// MySQL: a node's partition leases lapse this long after its last heartbeat (renewed three times per lease) [default: 3000]
    #[arg(long, env = "ENROLLD_CLUSTER_LEASE_MS")]
    pub cluster_lease_ms: Option<u64>,
    /// Turns cluster mode on: this node's id, unique among the nodes sharing the MySQL store, [A-Za-z0-9_.-]{1,32} [default: none]
    #[arg(long, env = "ENROLLD_NODE_ID")]
    pub node_id: Option<String>,
    /// host:port the other nodes (and nginx's upstream list, written the same way) reach this node at [default: the listen address]
    #[arg(long, env = "ENROLLD_ADVERTISE")]
    pub advertise: Option<String>,
    /// Cluster mode: the catalog cache is re-read from the store at least this often (its staleness bound when Redis is down) [default: 5000]
    #[arg(long, env = "ENROLLD_CLUSTER_CATCHUP_MS")]
    pub cluster_catchup_ms: Option<u64>,
    /// Every Redis key and channel enrolld uses starts with this, so deployments can share one Redis [default: enrolld:]
    #[arg(long, env = "ENROLLD_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The file's keys: the same names as the flags, with `_` for `-`.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    shards: Option<usize>,
    shard_listen: Option<SocketAddr>,
    store: Option<String>,
    redis: Option<String>,
    jwt_secret: Option<String>,
    demo: Option<bool>,
    metrics_enabled: Option<bool>,
    access_log: Option<bool>,
    log_format: Option<LogFormat>,
    connections_max: Option<usize>,
    header_read_timeout_ms: Option<u64>,
    head_bytes_max: Option<usize>,
    body_bytes_max: Option<usize>,
    body_read_timeout_ms: Option<u64>,
    drain_timeout_ms: Option<u64>,
    batch_rows_max: Option<usize>,
    batch_linger_us: Option<u64>,
    queue_rows_max: Option<usize>,
    commits_in_flight_max: Option<usize>,
    store_acquire_timeout_ms: Option<u64>,
    store_statement_timeout_ms: Option<u64>,
    events_enabled: Option<bool>,
    events_retention_days: Option<f64>,
    events_redis_stream: Option<String>,
    cluster_lease_ms: Option<u64>,
    node_id: Option<String>,
    advertise: Option<String>,
    cluster_catchup_ms: Option<u64>,
    redis_prefix: Option<String>,
    limits: Option<LimitsConfig>,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub shards: usize,
    /// Shard i also listens on this port + i (every shard on a free port when it is 0).
    pub shard_listen: Option<SocketAddr>,
    pub store: String,
    pub redis: Option<String>,
    /// As configured; `None` means "the secret kept beside the SQLite store".
    pub jwt_secret: Option<String>,
    pub demo: bool,
    pub metrics_enabled: bool,
    pub access_log: bool,
    pub log_format: LogFormat,
    pub connections_max: usize,
    pub header_read_timeout_ms: u64,
    pub head_bytes_max: usize,
    pub body_bytes_max: usize,
    pub body_read_timeout_ms: u64,
    pub drain_timeout_ms: u64,
    pub batch_rows_max: usize,
    pub batch_linger_us: u64,
    pub queue_rows_max: usize,
    pub commits_in_flight_max: usize,
    pub store_acquire_timeout_ms: u64,
    pub store_statement_timeout_ms: u64,
    pub events_enabled: bool,
    pub events_retention_days: f64,
    /// Redis Stream key the committed events are also appended to.
    pub events_redis_stream: Option<String>,
    /// How long a node's leases outlive its last heartbeat (MySQL).
    pub cluster_lease_ms: u64,
    /// Cluster mode: this node's id and the address the others reach it at.
    pub cluster: Option<ClusterConfig>,
    /// The catalog cache's catch-up bound (cluster mode).
    pub cluster_catchup_ms: u64,
    /// The start of every Redis key and channel.
    pub redis_prefix: String,
    /// Rate limits, flow rules, breakers (reloadable).
    pub limits: LimitsConfig,
    /// The file it came from, for reloads.
    pub config_path: Option<PathBuf>,
    /// `--limits-enabled`, which outranks the file on reload too.
    limits_enabled_flag: Option<bool>,
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("config: {0}")]
pub struct ConfigError(pub String);

/// Cluster mode's identity of this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    pub node_id: String,
    /// As nginx's upstream block writes it ("10.0.0.5:8080"): the other nodes forward to
    /// it, and partition owners are chosen on nginx's ring of these strings.
    pub advertise: String,
}

/// Longest node id (API.md).
pub const NODE_ID_BYTES_MAX: usize = 32;

fn cluster_of(
    node_id: Option<String>,
    advertise: Option<String>,
    listen: SocketAddr,
    store: &str,
    demo: bool,
) -> Result<Option<ClusterConfig>, ConfigError> {
    let Some(node_id) = node_id else {
        if advertise.is_some() {
            return Err(ConfigError("`advertise` needs `node_id` (cluster mode)".into()));
        }
        return Ok(None);
    };
    let valid = |b: u8| b.is_ascii_alphanumeric() || b"_.-".contains(&b);
    if node_id.is_empty() || node_id.len() > NODE_ID_BYTES_MAX || !node_id.bytes().all(valid) {
        return Err(ConfigError(format!(
            "`node_id` {node_id:?} must be 1-{NODE_ID_BYTES_MAX} of [A-Za-z0-9_.-]"
        )));
    }
    if node_id.starts_with("solo-") {
        return Err(ConfigError(format!(
            "`node_id` {node_id:?} must not start with `solo-` (the ids of nodes outside cluster mode)"
        )));
    }
    if Dialect::of_url(store) != Some(Dialect::Mysql) {
        return Err(ConfigError(
            "`node_id` (cluster mode) needs a MySQL/MariaDB `store` shared by the nodes".into(),
        ));
    }
    if demo {
        return Err(ConfigError(
            "`demo` seeds a single node's store; start one node without `node_id` to seed it".into(),
        ));
    }
    let advertise = match advertise {
        Some(a) => a,
        None if listen.ip().is_unspecified() || listen.port() == 0 => {
            return Err(ConfigError(format!(
                "`advertise` is required when `listen` is {listen} (the other nodes need an address to reach this one)"
            )))
        }
        None => listen.to_string(),
    };
    let port_ok = advertise
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok
        || advertise.len() > 300
        || advertise
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(ConfigError(format!("`advertise` {advertise:?} must be host:port")));
    }
    Ok(Some(ClusterConfig { node_id, advertise }))
}

/// The catalog cache's catch-up bound unless configured (API.md).
pub const CLUSTER_CATCHUP_MS_DEFAULT: u64 = 5_000;
pub const CLUSTER_CATCHUP_MS_MIN: u64 = 100;
pub const CLUSTER_CATCHUP_MS_MAX: u64 = 3_600_000;
/// Where enrolld's Redis keys and channels start unless configured (API.md).
pub const REDIS_PREFIX_DEFAULT: &str = "enrolld:";

/// How long a node's leases outlive its last heartbeat unless configured (API.md).
pub const CLUSTER_LEASE_MS_DEFAULT: u64 = 3_000;
/// Shortest lease: three heartbeats must fit, each a store round trip.
pub const CLUSTER_LEASE_MS_MIN: u64 = 300;
pub const CLUSTER_LEASE_MS_MAX: u64 = 600_000;

/// How long the change feed keeps events unless configured.
pub const EVENTS_RETENTION_DAYS_DEFAULT: f64 = 30.0;
/// Shortest retention (about a second: for tests of trimming and expired cursors).
pub const EVENTS_RETENTION_DAYS_MIN: f64 = 1e-5;
pub const EVENTS_RETENTION_DAYS_MAX: f64 = 3_650.0;

fn range<T: PartialOrd + std::fmt::Display + Copy>(key: &str, v: T, lo: T, hi: T) -> Result<T, ConfigError> {
    if v < lo || v > hi {
        return Err(ConfigError(format!("`{key}` is {v}; it must be {lo}-{hi}")));
    }
    Ok(v)
}

impl Config {
    pub fn load(args: &ConfigArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let limits = limits_of(file.limits.clone(), args.limits_enabled)?;
        let store = args
            .store
            .clone()
            .or(file.store)
            .unwrap_or_else(|| "sqlite://enrolld.db".into());
        if Dialect::of_url(&store).is_none() {
            return Err(ConfigError(format!(
                "`store` {store:?} must start with sqlite:// or mysql://"
            )));
        }
        let redis = args.redis.clone().or(file.redis);
        if let Some(r) = &redis {
            if !(r.starts_with("redis://") || r.starts_with("rediss://")) {
                return Err(ConfigError(format!("`redis` {r:?} must start with redis://")));
            }
        }
        let events_redis_stream = args.events_redis_stream.clone().or(file.events_redis_stream.clone());
        if let Some(stream) = &events_redis_stream {
            if redis.is_none() {
                return Err(ConfigError("`events_redis_stream` needs `redis`".into()));
            }
            if stream.is_empty() || stream.len() > 200 {
                return Err(ConfigError(format!(
                    "`events_redis_stream` {stream:?} must be 1-200 bytes"
                )));
            }
        }
        let redis_prefix = args
            .redis_prefix
            .clone()
            .or(file.redis_prefix.clone())
            .unwrap_or_else(|| REDIS_PREFIX_DEFAULT.into());
        if redis_prefix.len() > 64
            || redis_prefix
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(ConfigError(format!(
                "`redis_prefix` {redis_prefix:?} must be at most 64 bytes, without spaces"
            )));
        }
        let jwt_secret = args.jwt_secret.clone().or(file.jwt_secret);
        if jwt_secret.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError("`jwt_secret` is empty".into()));
        }
        if jwt_secret.is_none() && Dialect::of_url(&store) != Some(Dialect::Sqlite) {
            return Err(ConfigError(
                "`jwt_secret` is required when the store is not SQLite".into(),
            ));
        }
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:8080".parse().expect("literal"));
        let cluster = cluster_of(
            args.node_id.clone().or(file.node_id),
            args.advertise.clone().or(file.advertise),
            listen,
            &store,
            args.demo.or(file.demo).unwrap_or(false),
        )?;
        let shards = range("shards", args.shards.or(file.shards).unwrap_or(cores), 1, SHARDS_MAX)?;
        let head_bytes_max = range(
            "head_bytes_max",
            args.head_bytes_max.or(file.head_bytes_max).unwrap_or(16_384),
            HEAD_BYTES_MIN,
            1 << 20,
        )?;
        let shard_listen = args.shard_listen.or(file.shard_listen);
        if let Some(a) = shard_listen {
            if a.port() != 0 && usize::from(a.port()) + shards - 1 > usize::from(u16::MAX) {
                return Err(ConfigError(format!(
                    "`shard_listen` {a}: {shards} shards need ports up to {}, past 65535",
                    usize::from(a.port()) + shards - 1
                )));
            }
        }
        Ok(Config {
            shard_listen,
            listen,
            shards,
            store,
            redis,
            jwt_secret,
            demo: args.demo.or(file.demo).unwrap_or(false),
            access_log: args.access_log.or(file.access_log).unwrap_or(false),
            metrics_enabled: args.metrics_enabled.or(file.metrics_enabled).unwrap_or(true),
            log_format: args.log_format.or(file.log_format).unwrap_or(LogFormat::Text),
            connections_max: range(
                "connections_max",
                args.connections_max.or(file.connections_max).unwrap_or(10_000),
                shards,
                1_000_000,
            )?,
            header_read_timeout_ms: range(
                "header_read_timeout_ms",
                args.header_read_timeout_ms
                    .or(file.header_read_timeout_ms)
                    .unwrap_or(10_000),
                100,
                600_000,
            )?,
            head_bytes_max,
            body_bytes_max: range(
                "body_bytes_max",
                args.body_bytes_max.or(file.body_bytes_max).unwrap_or(65_536),
                1,
                16 << 20,
            )?,
            body_read_timeout_ms: range(
                "body_read_timeout_ms",
                args.body_read_timeout_ms
                    .or(file.body_read_timeout_ms)
                    .unwrap_or(10_000),
                100,
                600_000,
            )?,
            drain_timeout_ms: range(
                "drain_timeout_ms",
                args.drain_timeout_ms.or(file.drain_timeout_ms).unwrap_or(10_000),
                0,
                600_000,
            )?,
            batch_rows_max: range(
                "batch_rows_max",
                args.batch_rows_max.or(file.batch_rows_max).unwrap_or(1_000),
                1,
                BATCH_ROWS_LIMIT,
            )?,
            batch_linger_us: range(
                "batch_linger_us",
                args.batch_linger_us.or(file.batch_linger_us).unwrap_or(0),
                0,
                1_000_000,
            )?,
            queue_rows_max: range(
                "queue_rows_max",
                args.queue_rows_max.or(file.queue_rows_max).unwrap_or(65_536),
                1,
                10_000_000,
            )?,
            commits_in_flight_max: range(
                "commits_in_flight_max",
                args.commits_in_flight_max.or(file.commits_in_flight_max).unwrap_or(1),
                1,
                64,
            )?,
            store_acquire_timeout_ms: range(
                "store_acquire_timeout_ms",
                args.store_acquire_timeout_ms
                    .or(file.store_acquire_timeout_ms)
                    .unwrap_or(1_000),
                10,
                600_000,
            )?,
            store_statement_timeout_ms: range(
                "store_statement_timeout_ms",
                args.store_statement_timeout_ms
                    .or(file.store_statement_timeout_ms)
                    .unwrap_or(5_000),
                10,
                600_000,
            )?,
            events_enabled: args.events_enabled.or(file.events_enabled).unwrap_or(true),
            events_retention_days: range(
                "events_retention_days",
                args.events_retention_days
                    .or(file.events_retention_days)
                    .unwrap_or(EVENTS_RETENTION_DAYS_DEFAULT),
                EVENTS_RETENTION_DAYS_MIN,
                EVENTS_RETENTION_DAYS_MAX,
            )?,
            events_redis_stream,
            cluster_lease_ms: range(
                "cluster_lease_ms",
                args.cluster_lease_ms
                    .or(file.cluster_lease_ms)
                    .unwrap_or(CLUSTER_LEASE_MS_DEFAULT),
                CLUSTER_LEASE_MS_MIN,
                CLUSTER_LEASE_MS_MAX,
            )?,
            cluster,
            cluster_catchup_ms: range(
                "cluster_catchup_ms",
                args.cluster_catchup_ms
                    .or(file.cluster_catchup_ms)
                    .unwrap_or(CLUSTER_CATCHUP_MS_DEFAULT),
                CLUSTER_CATCHUP_MS_MIN,
                CLUSTER_CATCHUP_MS_MAX,
            )?,
            redis_prefix,
            limits,
            config_path: args.config.clone(),
            limits_enabled_flag: args.limits_enabled,
        })
    }

    /// Re-reads the reloadable part (the `[limits]` table) from the configuration file.
    /// With no file, the current limits stay.
    pub fn reload_limits(&self) -> Result<LimitsConfig, ConfigError> {
        let Some(path) = &self.config_path else {
            return Ok(self.limits.clone());
        };
        limits_of(read_file(path)?.limits, self.limits_enabled_flag)
    }

    /// The HS256 secret: configured, or kept beside the SQLite store (made on first use).
    pub fn resolve_jwt_secret(&self) -> Result<Vec<u8>, ConfigError> {
        if let Some(s) = &self.jwt_secret {
            return Ok(s.as_bytes().to_vec());
        }
        let path = secret_path(&self.store);
        match std::fs::read_to_string(&path) {
            Ok(s) if !s.trim().is_empty() => return Ok(s.trim().as_bytes().to_vec()),
            Ok(_) => return Err(ConfigError(format!("secret file {} is empty", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ConfigError(format!("reading secret file {}: {e}", path.display()))),
        }
        use rand::RngCore;
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        let secret: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        write_private(&path, &secret)
            .map_err(|e| ConfigError(format!("writing secret file {}: {e}", path.display())))?;
        tracing::warn!(path = %path.display(), "no jwt_secret configured: generated one and kept it beside the store");
        Ok(secret.into_bytes())
    }
}

fn limits_of(file: Option<LimitsConfig>, enabled_flag: Option<bool>) -> Result<LimitsConfig, ConfigError> {
    let mut limits = file.unwrap_or_default();
    if let Some(on) = enabled_flag {
        limits.enabled = on;
    }
    limits.validate().map_err(ConfigError)?;
    Ok(limits)
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError(format!("reading {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        let msg = e.message().lines().next().unwrap_or("invalid TOML").to_string();
        // Name the offending line (and so its key) as well as the reason.
        let at = e.span().map(|span| {
            let line_no = text[..span.start.min(text.len())].matches('\n').count();
            let line = text.lines().nth(line_no).unwrap_or("").trim();
            format!(" line {} `{line}`:", line_no + 1)
        });
        ConfigError(format!("{}:{} {msg}", path.display(), at.unwrap_or_default()))
    })
}

/// The file part of a SQLite store URL, as sqlx reads it: `sqlite://data/e.db?mode=rwc` →
/// `data/e.db` (`:memory:` for an in-memory store).
pub fn sqlite_path(store: &str) -> &str {
    let file = store.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
    file.split('?').next().unwrap_or(file)
}

/// `sqlite://enrolld.db?mode=rwc` → `enrolld.db.secret`.
fn secret_path(store: &str) -> PathBuf {
    PathBuf::from(format!("{}.secret", sqlite_path(store)))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_file(toml: &str, expect_err: Option<&str>) {
        let dir = std::env::temp_dir().join(format!("enrolld-cfg-{}", rand::random::<u64>()));
        std::fs::write(&dir, toml).unwrap();
        let args = ConfigArgs {
            config: Some(dir.clone()),
            ..Default::default()
        };
        let r = Config::load(&args);
        std::fs::remove_file(&dir).ok();
        match (r, expect_err) {
            (Ok(_), None) => {}
            (Err(e), Some(needle)) => assert!(e.to_string().contains(needle), "{e} lacks {needle}"),
            (r, _) => panic!("{toml}: unexpected {r:?}"),
        }
    }

    #[test]
    fn files() {
        check_file("", None);
        check_file("shards = 2\nbatch_rows_max = 500", None);
        check_file("shards = 0", Some("`shards`"));
        check_file("shardz = 2", Some("shardz"));
        check_file("batch_rows_max = 999999", Some("`batch_rows_max`"));
        check_file("store = \"postgres://x\"", Some("`store`"));
        check_file("store = \"mysql://u@h/db\"", Some("`jwt_secret`"));
        check_file("store = \"mysql://u@h/db\"\njwt_secret = \"s\"", None);
        check_file("listen = \"nope\"", Some("listen"));
        check_file("shards = 2\nshard_listen = \"127.0.0.1:8100\"", None);
        check_file("shards = 2\nshard_listen = \"127.0.0.1:65535\"", Some("`shard_listen`"));
        check_file("[limits]\nenabled = false\nkeys_max = 10", None);
        check_file("[limits.profiles.student]\nuser = { per_sec = 0.0, burst = 1 }\ncourse = { per_sec = 1.0, burst = 1 }\nipseg = { per_sec = 1.0, burst = 1 }", Some("limits.profiles.student.user"));
        check_file("[limits]\nfoo = 1", Some("foo"));
        check_file("[limits.flow.enroll]\nqps = 100.0\nbehaviour = \"wait\"", Some("wait"));
    }

    /// Every key documented in config/enrolld.toml exists and its documented value is valid.
    #[test]
    fn documented_example_parses() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/enrolld.toml")).unwrap();
        let mut uncommented = String::new();
        for line in text.lines() {
            let line = line.split("   #").next().unwrap_or(line);
            let body = line.strip_prefix("# ").unwrap_or(line);
            let is_setting = body.starts_with('[') || body.split_once(" = ").is_some_and(|(k, _)| !k.contains(' '));
            if !line.starts_with('#') || is_setting {
                uncommented.push_str(body);
                uncommented.push('\n');
            }
        }
        let uncommented = uncommented.replace("jwt_secret = \"change me\"\n", "");
        // Cluster mode needs a MySQL store (and so a secret): checked with one below.
        let cluster_keys = "node_id = \"n1\"\nadvertise = \"10.0.0.11:8080\"\n";
        assert!(uncommented.contains(cluster_keys), "the example documents cluster mode");
        let uncommented = uncommented.replace(cluster_keys, "");
        check_file(&uncommented, None);
        check_file(
            &format!("store = \"mysql://u:p@h:3306/d\"\njwt_secret = \"s\"\n{cluster_keys}"),
            None,
        );
        assert!(
            uncommented.matches(" = ").count() > 40,
            "the example documents every key"
        );
    }

    #[test]
    fn cluster_keys_are_checked() {
        let mysql = "store = \"mysql://u:p@h:3306/d\"\njwt_secret = \"s\"\n";
        check_file(&format!("{mysql}node_id = \"n-1.a_b\""), None);
        check_file(&format!("{mysql}node_id = \"\""), Some("`node_id`"));
        check_file(&format!("{mysql}node_id = \"{}\"", "n".repeat(33)), Some("`node_id`"));
        check_file(&format!("{mysql}node_id = \"n 1\""), Some("`node_id`"));
        check_file(&format!("{mysql}node_id = \"solo-1\""), Some("`solo-`"));
        check_file("node_id = \"n1\"", Some("needs a MySQL"));
        check_file(
            &format!("{mysql}advertise = \"h:1\""),
            Some("`advertise` needs `node_id`"),
        );
        check_file(&format!("{mysql}node_id = \"n1\"\ndemo = true"), Some("`demo`"));
        check_file(
            &format!("{mysql}node_id = \"n1\"\nadvertise = \"h\""),
            Some("host:port"),
        );
        check_file(
            &format!("{mysql}node_id = \"n1\"\nlisten = \"0.0.0.0:8080\""),
            Some("`advertise` is required"),
        );
        check_file(
            &format!("{mysql}node_id = \"n1\"\nlisten = \"0.0.0.0:8080\"\nadvertise = \"10.0.0.1:8080\""),
            None,
        );
        check_file("cluster_lease_ms = 299", Some("`cluster_lease_ms`"));
        check_file("cluster_catchup_ms = 99", Some("`cluster_catchup_ms`"));
        check_file("redis_prefix = \"a b\"", Some("`redis_prefix`"));
    }

    #[test]
    fn defaults() {
        let c = Config::load(&ConfigArgs::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.store, "sqlite://enrolld.db");
        assert_eq!(c.body_bytes_max, 65_536);
        assert!(c.shards >= 1);
    }

    #[test]
    fn secret_beside_store() {
        assert_eq!(
            secret_path("sqlite://data/e.db?mode=rwc"),
            PathBuf::from("data/e.db.secret")
        );
    }
}
