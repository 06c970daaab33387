//! The `enrolld` binary: `serve` and `token` (API.md's command-line contract), `shard-of`,
//! which names the shard that owns a course (for proxies and load generators that send
//! each course to its owner's own port), and `events follow`, the change feed's consumer.

use clap::{Parser, Subcommand};

/// jemalloc: per-thread arenas suit one thread per core, and it returns memory better than
/// glibc's malloc under the churn of a rush.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use std::path::PathBuf;

use enrolld::config::{Config, ConfigArgs, ConfigError};
use enrolld::follow::FollowError;
use enrolld::ids::{CourseId, StudentId};
use enrolld::net::auth::{Auth, Role};

#[derive(Parser)]
#[command(name = "enrolld", version, about = "Course-registration server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server
    Serve(ConfigArgs),
    /// Print a token signed with the configured secret
    Token {
        /// Subject: the student or admin id
        #[arg(long)]
        sub: String,
        #[arg(long, value_enum, default_value = "student")]
        role: RoleArg,
        /// Lifetime in seconds
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Print COUNT tokens, one a line, for subjects SUB-0 .. SUB-(COUNT-1) (load generation)
        #[arg(long)]
        count: Option<u32>,
        /// A time ticket: the student may not enroll before this instant (unix seconds)
        #[arg(long)]
        enroll_from: Option<u64>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Print "COURSE SHARD" for each course: the shard that owns it, whose own port
    /// (`shard_listen` + SHARD) answers it without a hop between shards
    ShardOf {
        /// The node's shard count (its `shards` setting)
        #[arg(long)]
        shards: usize,
        /// Course ids
        #[arg(required = true)]
        courses: Vec<String>,
    },
    /// The change feed (GET /v1/admin/events)
    Events {
        #[command(subcommand)]
        cmd: EventsCmd,
    },
    /// Several nodes on one MySQL store (cluster mode)
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Print each node (id, advertised address), whether it is alive, and the partitions and
    /// courses it owns, as the store's lease table says; exit 1 if a partition has no live owner
    Status {
        /// The nodes' MySQL store
        #[arg(long, env = "ENROLLD_STORE")]
        store: String,
        /// One JSON object instead of a table
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum EventsCmd {
    /// Follow the change feed: print each event as one JSON line, run a command per event
    ///
    /// Long-polls GET /v1/admin/events until SIGINT/SIGTERM (or, with --once, until it has
    /// read what is there) and prints each event as one JSON line on stdout. Without
    /// --exec the cursor is saved after each page is printed. With --exec, `sh -c CMD` runs
    /// once per event, in feed order, with the event's JSON on stdin and
    /// ENROLLD_EVENT_CURSOR and ENROLLD_EVENT_TYPE in its environment (its stdout goes to
    /// stderr); the event's line is printed and the cursor saved only once CMD exits 0. A
    /// failing CMD is run again for the same event, with backoff from 100 ms to 30 s,
    /// logged on stderr: an event is never skipped.
    ///
    /// Idempotent side effects: delivery is at least once. A crash (or a second signal)
    /// after CMD succeeded and before the cursor was saved runs that event again, so make
    /// the side effect idempotent with the event's `cursor` as the deduplication key (it
    /// is unique and never changes): e.g. `INSERT ... ON CONFLICT (cursor) DO NOTHING` in
    /// the same transaction as the effect, or an `Idempotency-Key: <cursor>` header.
    ///
    /// Without --after, it resumes from --cursor-file, or starts from the oldest event
    /// kept. Network errors, 408, 429 and 5xx are retried with the same backoff (with
    /// --once, 5 tries). A signal while waiting on the server exits at once; while an
    /// event is in hand, after that event.
    ///
    /// Exit codes: 0 done (--once) or stopped by a signal; 2 a bad flag or cursor file,
    /// a token the server refused (401/403), or a request it refused (400: a cursor it did
    /// not give or ahead of its feed); 3 the cursor expired (410 cursor_expired: older
    /// than events_retention_days, events were missed; reconcile, then start again
    /// without a cursor); 1 anything else (the cursor could not be saved, stdout closed).
    Follow(FollowArgs),
}

#[derive(clap::Args)]
struct FollowArgs {
    /// The server's base URL (plain http)
    #[arg(long, default_value = enrolld::follow::URL_DEFAULT)]
    url: String,
    /// Start after this cursor (an event's `cursor` or a page's `next`), not the cursor file's
    #[arg(long, value_name = "CURSOR")]
    after: Option<String>,
    /// Keep the cursor in FILE (replaced atomically: temp file, fsync, rename) and resume from it
    #[arg(long, value_name = "FILE")]
    cursor_file: Option<PathBuf>,
    /// Run `sh -c CMD` per event, JSON on stdin; the cursor passes an event only once CMD exits 0
    #[arg(long, value_name = "CMD")]
    exec: Option<String>,
    /// Events per request (1-1000)
    #[arg(long, default_value_t = enrolld::follow::LIMIT_DEFAULT)]
    limit: u32,
    /// Long poll: how long a request waits for a new event (0-30000)
    #[arg(long, default_value_t = enrolld::follow::WAIT_MS_DEFAULT)]
    wait_ms: u64,
    /// Read what is there now and exit (for tests and cron)
    #[arg(long)]
    once: bool,
    /// An admin token to send, instead of minting short-lived ones with the secret
    #[arg(long)]
    token: Option<String>,
    /// The server's HS256 secret [default: the secret file beside the SQLite --store]
    #[arg(long, env = "ENROLLD_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// The server's store, for the secret kept beside its SQLite file [default: sqlite://enrolld.db]
    #[arg(long, env = "ENROLLD_STORE")]
    store: Option<String>,
    /// The server's configuration file, for its jwt_secret or store
    #[arg(long, env = "ENROLLD_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Student,
    Admin,
}

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("enrolld: {e:#}");
            match e.downcast_ref::<FollowError>() {
                Some(f) => f.exit_code(),
                None if refused(&e) => 2,
                None => 1,
            }
        }
    };
    std::process::exit(code);
}

/// Exit code 2 (API.md): a bad flag, file or key, or a listen address, SQLite file or MySQL
/// database that another live process holds. Nothing was started.
fn refused(e: &anyhow::Error) -> bool {
    use enrolld::net::BindError;
    use enrolld::persist::lease::LeaseError;
    use enrolld::single_writer::StoreLockError;
    e.chain().any(|cause| {
        cause.downcast_ref::<ConfigError>().is_some()
            || matches!(cause.downcast_ref::<BindError>(), Some(BindError::InUse(_)))
            || matches!(
                cause.downcast_ref::<StoreLockError>(),
                Some(StoreLockError::Held { .. })
            )
            || matches!(cause.downcast_ref::<LeaseError>(), Some(LeaseError::Held { .. }))
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Serve(args) => {
            let cfg = Config::load(&args)?;
            enrolld::server::init_logging(cfg.log_format);
            enrolld::server::serve(cfg)
        }
        Cmd::Token {
            sub,
            role,
            ttl,
            count,
            enroll_from,
            config,
        } => {
            let cfg = Config::load(&config)?;
            let auth = Auth::new(&cfg.resolve_jwt_secret()?);
            let role = match role {
                RoleArg::Student => Role::Student,
                RoleArg::Admin => Role::Admin,
            };
            let bad_sub = || ConfigError(format!("--sub {sub:?} must be 1-64 chars of [A-Za-z0-9_.-]"));
            match count {
                None => {
                    let id = StudentId::parse(&sub).ok_or_else(bad_sub)?;
                    println!("{}", auth.mint_ticket(&id, role, ttl, None, enroll_from));
                }
                Some(n) => {
                    use std::io::Write;
                    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                    for i in 0..n {
                        let id = StudentId::parse(&format!("{sub}-{i}")).ok_or_else(bad_sub)?;
                        writeln!(out, "{}", auth.mint_ticket(&id, role, ttl, None, enroll_from))?;
                    }
                }
            }
            Ok(())
        }
        Cmd::ShardOf { shards, courses } => {
            if !(1..=enrolld::config::SHARDS_MAX).contains(&shards) {
                let max = enrolld::config::SHARDS_MAX;
                return Err(ConfigError(format!("--shards {shards} must be 1-{max}")).into());
            }
            for c in &courses {
                let id = CourseId::parse(c)
                    .ok_or_else(|| ConfigError(format!("course id {c:?} must be 1-32 chars of [A-Za-z0-9_.-]")))?;
                println!("{c} {}", enrolld::shard::owner_of(&id, shards).0);
            }
            Ok(())
        }
        Cmd::Events {
            cmd: EventsCmd::Follow(args),
        } => follow(args),
        Cmd::Cluster {
            cmd: ClusterCmd::Status { store, json },
        } => cluster_status(&store, json),
    }
}

fn cluster_status(store: &str, json: bool) -> anyhow::Result<()> {
    use enrolld::persist::store::{Dialect, Store, StoreOptions};
    if Dialect::of_url(store) != Some(Dialect::Mysql) {
        return Err(ConfigError(format!(
            "--store {:?} must be the nodes' mysql:// store",
            enrolld::server::redact(store)
        ))
        .into());
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let status = rt.block_on(async {
        let opts = StoreOptions {
            pool_connections_max: 1,
            acquire_timeout_ms: 5_000,
            events: false,
        };
        let store = Store::open(store, &opts).await?;
        let status = store.cluster_status().await;
        store.close().await;
        status
    })?;
    if json {
        println!("{}", serde_json::to_string(&status)?);
    } else {
        println!(
            "{:<32} {:<24} {:<6} {:>10} {:>8}",
            "NODE", "ADVERTISE", "ALIVE", "PARTITIONS", "COURSES"
        );
        for n in &status.nodes {
            let alive = if n.alive { "yes" } else { "no" };
            println!(
                "{:<32} {:<24} {:<6} {:>10} {:>8}",
                n.id, n.advertise, alive, n.partitions, n.courses
            );
        }
        println!(
            "unowned: {} partitions, {} courses",
            status.partitions_unowned, status.courses_unowned
        );
    }
    if status.partitions_unowned > 0 {
        anyhow::bail!("{} partitions have no live owner", status.partitions_unowned);
    }
    Ok(())
}

fn follow(args: FollowArgs) -> anyhow::Result<()> {
    use enrolld::follow::{Credentials, Options};
    let credentials = match args.token {
        Some(token) => Credentials::Token(token),
        None => Credentials::Secret(follow_secret(args.config, args.store, args.jwt_secret)?),
    };
    enrolld::follow::run(Options {
        url: args.url,
        after: args.after,
        cursor_file: args.cursor_file,
        exec: args.exec,
        limit: args.limit,
        wait_ms: args.wait_ms,
        once: args.once,
        credentials,
    })?;
    Ok(())
}

/// The secret `serve` uses, resolved as `token` resolves it, except that a follower never
/// makes one: with no secret configured, the server's SQLite file must exist (its secret
/// file was made beside it when the server first started).
fn follow_secret(
    config: Option<PathBuf>,
    store: Option<String>,
    jwt_secret: Option<String>,
) -> anyhow::Result<Vec<u8>> {
    let cfg = Config::load(&ConfigArgs {
        config,
        store,
        jwt_secret,
        ..ConfigArgs::default()
    })?;
    let db = enrolld::config::sqlite_path(&cfg.store);
    if cfg.jwt_secret.is_none() && !std::path::Path::new(db).exists() {
        return Err(ConfigError(format!(
            "no secret to mint an admin token with: {db} does not exist; pass --store with the \
             server's SQLite store, its --jwt-secret, or an admin --token"
        ))
        .into());
    }
    Ok(cfg.resolve_jwt_secret()?)
}
