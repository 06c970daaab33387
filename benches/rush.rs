//! `cargo bench --bench rush -- [flags]`: registration day, replayed against the real server.
//!
//! Why: the figures that matter for enrolld are those of the minute registration opens:
//! tens of thousands of students, a few very popular courses, most answers a 409 from
//! memory and the rest durable 201s. They only mean something next to proof that nothing
//! was oversold, undersold or lost, so this bench both loads the server and then checks,
//! through the API and the database, that every acknowledged seat is exactly where it
//! should be, and fails loudly (exit 1, every violation printed) when one is not.
//!
//! How: it starts its own `enrolld serve` on a scratch MariaDB database (or targets
//! `--url`), creates courses with Zipf-distributed popularity, and lets many keep-alive
//! connections send raw HTTP/1.1 (no client crate sits between the clock and the wire),
//! optionally pipelined, in a closed loop or an open loop (`--rate`; latency is measured
//! from the *scheduled* send time, so a stalled server cannot hide its stall: no coordinated
//! omission). An optional drop wave frees seats while refused students try again. It writes
//! `target/rush/report.md` and `target/rush/throughput.svg`.
//!
//! `--scenario registration-day` runs another day instead: a draw round, then a first-come
//! round with waitlists, people against scripts (benches/rush_rounds.rs, its own report).
//!
//! `--owner-ports` measures what routing by owner saves: the started server also listens on
//! one port per shard (`--shard-listen`), and connection c talks only to the port of shard
//! c % shards and claims only the requests for courses that shard owns (what nginx's `hash`
//! upstream does in production), so no request hops between shards. The report gives the
//! hops counted during the load either way; a run with owner ports that hopped is broken.
//!
//! Must never: retry impolitely (429/503 wait their `Retry-After`, retries are capped), count
//! an answer it did not receive, report figures from a failed run without saying so, or
//! leave its server or database behind (a database is kept only after a violation, for
//! inspection, and the report says how to drop it).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use clap::Parser;
use enrolld::ids::{CourseId, StudentId};
use enrolld::net::auth::{Auth, Role};
use enrolld::shard::owner_of;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The registration-day scenario (`--scenario registration-day`). In a directory of its own
/// so that Cargo does not take it for a bench target.
#[path = "rush/rounds.rs"]
mod rounds;

/// Lifetime of the tokens minted for the run.
const TOKEN_TTL_SECS: u64 = 4 * 3600;
/// Largest latency a histogram holds (larger ones are clamped to it).
const LATENCY_US_MAX: u64 = 60_000_000;
/// Longest `Retry-After` honoured; a longer one is treated as this.
const RETRY_AFTER_SECS_MAX: u64 = 10;
/// `Retry-After` assumed when a 429/503 carries none.
const RETRY_AFTER_SECS_DEFAULT: u64 = 1;
/// A connection with requests in flight and no answer for this long is given up and reopened.
const ANSWER_TIMEOUT_SECS: u64 = 30;
/// The timer's granularity (tokio sleeps in whole milliseconds): a scheduled request is
/// sent up to this early rather than up to this late, so the open loop does not charge the
/// server for the load generator's timer.
const TIMER_SLACK: Duration = Duration::from_millis(1);
/// Attempts to (re)open a connection before the run is declared broken, and the pause between.
const CONNECT_TRIES_MAX: u32 = 50;
const CONNECT_PAUSE_MS: u64 = 100;
/// Time the server gets to log `ready listen=ADDR`, and to exit after SIGTERM.
const READY_TIMEOUT_SECS: u64 = 60;
const STOP_TIMEOUT_SECS: u64 = 15;
/// Retries of one setup or check request answered 429/503.
const ADMIN_RETRIES_MAX: u32 = 600;
/// Connections used to create courses and to read rosters back.
const ADMIN_CONNECTIONS: usize = 16;
/// Answers a connection counts before it moves the shared progress bar.
const PROGRESS_BATCH: u64 = 64;
/// Bytes asked of the socket per read, and the longest response head accepted.
const READ_CHUNK_BYTES: usize = 16 * 1024;
const HEAD_BYTES_MAX: usize = 64 * 1024;
/// Deepest pipeline accepted on one connection.
const PIPELINE_MAX: usize = 256;
/// Violations printed (all are counted).
const VIOLATIONS_SHOWN_MAX: usize = 200;
/// Significant figures of the latency histograms (the per-second ones are coarser).
const LATENCY_SIGFIG: u8 = 3;
const TIMELINE_SIGFIG: u8 = 2;

/// The server's counter of requests passed from the shard that took them to the owner.
const HOPS_METRIC: &str = "enrolld_shard_hops_total";

/// Outcome classes of an answer, the rows of the latency table.
const OUTCOMES: [&str; 8] = ["201", "200", "409", "403", "404", "429", "503", "other"];
const METHODS: [&str; 2] = ["POST", "DELETE"];

fn outcome_index(status: u16) -> usize {
    match status {
        201 => 0,
        200 => 1,
        409 => 2,
        403 => 3,
        404 => 4,
        429 => 5,
        503 => 6,
        _ => 7,
    }
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "rush",
    about = "Registration-day load generator and invariant checker for enrolld"
)]
struct Args {
    /// Which day to replay: `rush` (the default: the load and invariant run below) or
    /// `registration-day` (a draw round, then a first-come round; people against scripts).
    #[arg(long, value_enum, default_value_t = Scenario::Rush)]
    scenario: Scenario,
    /// Students in the rush [default: 50000; 300 for the smoke run under `cargo test`].
    #[arg(long)]
    students: Option<u32>,
    /// Courses in the catalog [default: 2000; 20 for the smoke run].
    #[arg(long)]
    courses: Option<u32>,
    /// Distinct courses each student tries, drawn by popularity.
    #[arg(long, default_value_t = 6)]
    attempts: u32,
    /// Largest course capacity; capacities are uniform in 0..=this.
    #[arg(long, default_value_t = 300)]
    capacity_max: u32,
    /// Zipf exponent of course popularity (0 = uniform).
    #[arg(long, default_value_t = 1.0)]
    zipf_s: f64,
    /// Seed of the workload (capacities, popularity, choices, order, drop wave).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Requests in flight per connection (1 = no pipelining).
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Open loop: requests per second on a fixed schedule. Default: closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Second wave: this fraction of students holding seats drops one, and this fraction of
    /// the refused (409) requests try again, all racing.
    #[arg(long)]
    drop_wave: Option<f64>,
    /// Retries of one request answered 429/503 (or whose answer was lost).
    #[arg(long, default_value_t = 5)]
    retries_max: u32,
    /// Target an existing server (http://127.0.0.1:PORT) instead of starting one.
    #[arg(long, requires = "secret")]
    url: Option<String>,
    /// The existing server's JWT secret (with --url).
    #[arg(long)]
    secret: Option<String>,
    /// The existing server's store, to check the database too (mysql://user:pass@host:port/db).
    #[arg(long, requires = "url")]
    store_url: Option<String>,
    /// The enrolld binary to start (default target/release/enrolld, built when missing).
    #[arg(long)]
    enrolld_bin: Option<PathBuf>,
    /// `--shards` of the started server (default: its own, one per core).
    #[arg(long)]
    shards: Option<usize>,
    /// Start the server with `--shard-listen` and send each course's requests to its owner
    /// shard's own port (connection c to shard c % shards), so none hops between shards.
    /// Only with a server this bench starts; needs --connections >= the shard count.
    #[arg(long, conflicts_with = "url")]
    owner_ports: bool,
    /// Keep the started server's traffic limits on. Off by default: all the load comes from
    /// one IP segment and a few hot courses, which the default limits are there to refuse,
    /// and this bench measures the seat path (with them on it measures the 429 path).
    #[arg(long)]
    with_limits: bool,
    /// Extra argument for the started `enrolld serve` (repeatable), e.g.
    /// `--server-arg=--commits-in-flight-max=2`.
    #[arg(long, allow_hyphen_values = true)]
    server_arg: Vec<String>,
    /// MariaDB that the started server uses; a scratch database is made in it
    /// [default: $ENROLLD_TEST_MYSQL or mysql://enrolld:enrolld@127.0.0.1:3306].
    #[arg(long)]
    mysql: Option<String>,
    /// Width of a sample of the chart's timeline, in milliseconds (rates are per second).
    #[arg(long, default_value_t = 250)]
    sample_ms: u64,
    /// Worker threads of the load generator.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Where the report goes (default target/rush).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the scratch database even when the run passes.
    #[arg(long)]
    keep_db: bool,
    /// Proves the checker fails loudly: before checking, deletes one acknowledged row from
    /// the store behind the server's back and pretends one more seat was acknowledged.
    /// The run must then exit 1 and name both.
    #[arg(long, hide = true)]
    self_check: bool,
    /// Passed by `cargo bench` to harness = false benches. Without it (`cargo test
    /// --all-targets` runs benches as tests) the sizes default to a smoke run.
    #[arg(long, hide = true)]
    bench: bool,
    /// Last: its help heading would also head the flags after it.
    #[command(flatten)]
    rounds: rounds::RoundsArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Rush,
    RegistrationDay,
}

/// Full size under `cargo bench`; a smoke run (a few seconds) under `cargo test`.
const STUDENTS_DEFAULT: u32 = 50_000;
const COURSES_DEFAULT: u32 = 2_000;
const SMOKE_STUDENTS: u32 = 300;
const SMOKE_COURSES: u32 = 20;

impl Args {
    /// Parses the command line. `cargo test` may pass libtest flags (`--nocapture`, a
    /// filter): without `--bench`, arguments clap does not know give the smoke run.
    fn from_command_line() -> Result<Args, clap::Error> {
        let bench = std::env::args().any(|a| a == "--bench");
        let mut args = match Args::try_parse() {
            Ok(a) => a,
            Err(e) if bench || matches!(e.kind(), clap::error::ErrorKind::DisplayHelp) => return Err(e),
            Err(_) => {
                eprintln!("rush: not under `cargo bench`; ignoring the test harness's arguments");
                Args::parse_from(["rush"])
            }
        };
        if args.scenario == Scenario::RegistrationDay {
            return Ok(args); // it resolves its own sizes
        }
        let (students, courses) = if args.bench {
            (STUDENTS_DEFAULT, COURSES_DEFAULT)
        } else {
            (SMOKE_STUDENTS, SMOKE_COURSES)
        };
        args.students.get_or_insert(students);
        args.courses.get_or_insert(courses);
        if !args.bench {
            eprintln!(
                "rush: smoke run ({} students, {} courses); `cargo bench --bench rush` runs the full size",
                args.students(),
                args.courses()
            );
        }
        Ok(args)
    }

    fn students(&self) -> u32 {
        self.students.expect("resolved by from_command_line")
    }

    fn courses(&self) -> u32 {
        self.courses.expect("resolved by from_command_line")
    }

    fn mysql_base(&self) -> String {
        self.mysql
            .clone()
            .or_else(|| std::env::var("ENROLLD_TEST_MYSQL").ok())
            .unwrap_or_else(|| "mysql://enrolld:enrolld@127.0.0.1:3306".into())
    }

    fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.students() >= 1, "--students must be at least 1");
        ensure!(self.courses() >= 1, "--courses must be at least 1");
        ensure!(
            (1..=self.courses()).contains(&self.attempts),
            "--attempts must be 1..=--courses"
        );
        ensure!(self.capacity_max <= 100_000, "--capacity-max must be 0..=100000");
        ensure!(self.zipf_s >= 0.0 && self.zipf_s.is_finite(), "--zipf-s must be >= 0");
        ensure!(self.connections >= 1, "--connections must be at least 1");
        ensure!(
            (1..=PIPELINE_MAX).contains(&self.pipeline),
            "--pipeline must be 1..={PIPELINE_MAX}"
        );
        ensure!(self.client_threads >= 1, "--client-threads must be at least 1");
        ensure!(
            (10..=60_000).contains(&self.sample_ms),
            "--sample-ms must be 10..=60000"
        );
        if let Some(r) = self.rate {
            ensure!(r > 0.0 && r.is_finite(), "--rate must be > 0");
        }
        if let Some(f) = self.drop_wave {
            ensure!(f > 0.0 && f <= 1.0, "--drop-wave must be in (0, 1]");
        }
        if self.owner_ports {
            ensure!(
                self.url.is_none(),
                "--owner-ports needs a server this bench starts itself, not --url"
            );
            if let Some(n) = self.shards {
                ensure!(
                    self.connections >= n,
                    "--owner-ports gives every shard its own connections: --connections ({}) must be at least --shards ({n})",
                    self.connections
                );
            }
        }
        Ok(())
    }

    fn out_dir(&self) -> PathBuf {
        let default = if self.bench { "target/rush" } else { "target/rush/smoke" };
        self.out.clone().unwrap_or_else(|| manifest_dir().join(default))
    }
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn main() -> ExitCode {
    let args = match Args::from_command_line() {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    if args.scenario == Scenario::RegistrationDay {
        return rounds::run(args);
    }
    if let Err(e) = args.validate() {
        eprintln!("rush: {e}");
        return ExitCode::from(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // On Ctrl-C the run is dropped, and with it the server we started and its database.
    let interruptible = async {
        tokio::select! {
            r = run(args) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    };
    match runtime.block_on(interruptible) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("rush: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

async fn run(args: Args) -> anyhow::Result<bool> {
    let out = args.out_dir();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut target = Target::open(&args, &out)?;
    if args.keep_db {
        target.keep_db_for_inspection();
    }
    let work = Arc::new(plan(&args, &target.secret)?);
    eprintln!(
        "rush: {} students x {} courses each over {} courses (total capacity {}), target {}",
        args.students(),
        args.attempts,
        args.courses(),
        work.capacities.iter().map(|&c| c as u64).sum::<u64>(),
        target.addr
    );
    create_courses(target.addr, &work).await?;
    let run = load_and_check(&args, &target, &work).await?;
    let mut violations = run.answer_violations.clone();
    for c in &run.checks {
        violations.extend(c.violations.iter().cloned());
    }
    let broken: Vec<String> = run.phases.iter().flat_map(|p| p.run_errors()).collect();
    if !violations.is_empty() && !args.self_check {
        target.keep_db_for_inspection();
    }
    let report = Report {
        args: &args,
        target: &target,
        work: &work,
        run: &run,
        violations: &violations,
        broken: &broken,
    };
    let md = report.markdown();
    std::fs::write(out.join("report.md"), &md)?;
    if let Err(e) = chart(&out.join("throughput.svg"), &run.timeline) {
        eprintln!("rush: could not draw the chart: {e:#}");
    }
    println!("{md}");
    print_failures(&violations, &broken);
    eprintln!(
        "rush: wrote {} and {}",
        out.join("report.md").display(),
        out.join("throughput.svg").display()
    );
    Ok(violations.is_empty() && broken.is_empty())
}

/// Everything a run measured and checked.
struct RunResult {
    phases: Vec<PhaseResult>,
    checks: Vec<CheckResult>,
    exp: Expected,
    /// Answers no correct server gives (a second 201, a 200 for a seat never taken...).
    answer_violations: Vec<String>,
    timeline: Vec<Point>,
    server_metrics: Option<BTreeMap<String, f64>>,
}

/// The rush, a check, and with `--drop-wave` the second wave and another check.
async fn load_and_check(args: &Args, target: &Target, work: &Arc<Workload>) -> anyhow::Result<RunResult> {
    let routing = match &target.shard_addrs {
        Some(addrs) => Some(OwnerRouting::new(addrs, work)?),
        None => None,
    };
    let eng = Arc::new(Engine {
        addr: target.addr,
        routing,
        work: work.clone(),
        rate: args.rate,
        pipeline: args.pipeline,
        connections: args.connections,
        retries_max: args.retries_max,
        bench_start: Instant::now(),
        sample_ms: args.sample_ms,
        timeline: Mutex::new(Timeline::new(args.sample_ms)),
    });
    let cpu = CpuClock::new(target.server_pid());
    let mut phases = vec![run_phase(&eng, "rush", work.rush_ops.clone(), &cpu).await?];
    let mut exp = Expected::new(work.course_ids.len());
    let mut answer_violations = exp.apply(&phases[0], work, true);
    if args.self_check {
        tamper(target, work, &mut exp)?;
    }
    let all_courses = vec![true; work.course_ids.len()];
    let mut checks = vec![check(target, work, &exp, &all_courses, "after the rush").await?];
    if let Some(fraction) = args.drop_wave {
        let wave = plan_drop_wave(work, &phases[0], &exp, fraction, args.seed);
        let untouched: Vec<bool> = touched_courses(&wave, work.course_ids.len())
            .iter()
            .map(|t| !t)
            .collect();
        phases.push(run_phase(&eng, "drop wave", wave, &cpu).await?);
        answer_violations.extend(exp.apply(&phases[1], work, false));
        checks.push(check(target, work, &exp, &untouched, "after the drop wave").await?);
    }
    let timeline = eng.timeline.lock().expect("timeline lock").points();
    Ok(RunResult {
        phases,
        checks,
        exp,
        answer_violations,
        timeline,
        server_metrics: scrape_metrics(target.addr).await.ok(),
    })
}

fn print_failures(violations: &[String], broken: &[String]) {
    for b in broken {
        eprintln!("RUN BROKEN: {b}");
    }
    for v in violations.iter().take(VIOLATIONS_SHOWN_MAX) {
        eprintln!("INVARIANT VIOLATED: {v}");
    }
    if violations.len() > VIOLATIONS_SHOWN_MAX {
        eprintln!("... and {} more violations", violations.len() - VIOLATIONS_SHOWN_MAX);
    }
    if !violations.is_empty() {
        eprintln!("rush: FAILED with {} invariant violations", violations.len());
    }
}

// ---------------------------------------------------------------------------------------
// Target: our own server on a scratch database, or an existing one
// ---------------------------------------------------------------------------------------

/// The server under test. Fields drop in order: the server stops before its database goes.
struct Target {
    addr: SocketAddr,
    /// `--owner-ports`: each shard's own address, in shard order.
    shard_addrs: Option<Vec<SocketAddr>>,
    secret: String,
    server: Option<OwnServer>,
    db: Option<ScratchDb>,
    /// The store to check (the scratch database, or `--store-url`).
    store: Option<Mysql>,
    description: String,
}

impl Target {
    fn open(args: &Args, out: &Path) -> anyhow::Result<Target> {
        if let Some(url) = &args.url {
            let addr = parse_http_url(url)?;
            let store = args.store_url.as_deref().map(Mysql::parse).transpose()?;
            return Ok(Target {
                addr,
                shard_addrs: None,
                secret: args.secret.clone().expect("clap requires --secret with --url"),
                server: None,
                db: None,
                store,
                description: format!("existing server {url}"),
            });
        }
        let bin = enrolld_bin(args)?;
        let db = ScratchDb::create(&args.mysql_base(), "enrolld_rush")?;
        let secret = format!("rush-{:032x}", rand::random::<u128>());
        let mut extra = args.server_arg.clone();
        if let Some(n) = args.shards {
            extra.extend(["--shards".to_string(), n.to_string()]);
        }
        if !args.with_limits {
            extra.extend(["--limits-enabled".to_string(), "false".to_string()]);
        }
        if args.owner_ports {
            extra.extend(["--shard-listen".to_string(), "127.0.0.1:0".to_string()]);
        }
        let log_path = out.join("enrolld.log");
        let (server, addr, ready) = OwnServer::start(&bin, &db.mysql.url(), &secret, &extra, &log_path)?;
        let shard_addrs = if args.owner_ports {
            Some(
                owner_ports(args, &ready)
                    .with_context(|| format!("--owner-ports (server log {})", log_path.display()))?,
            )
        } else {
            None
        };
        let shards = match (args.shards, &shard_addrs) {
            (Some(n), _) => n.to_string(),
            (None, Some(addrs)) => format!("default (one per core): {}", addrs.len()),
            (None, None) => "default (one per core)".to_string(),
        };
        Ok(Target {
            addr,
            shard_addrs,
            secret,
            store: Some(db.mysql.clone()),
            description: format!(
                "own `enrolld serve` ({}) on MariaDB database {}, --shards {shards}, extra arguments `{}`",
                bin.display(),
                db.mysql.db,
                extra.join(" ")
            ),
            server: Some(server),
            db: Some(db),
        })
    }

    fn server_pid(&self) -> Option<u32> {
        self.server.as_ref().map(|s| s.child.id())
    }

    fn keep_db_for_inspection(&mut self) {
        if let Some(db) = &mut self.db {
            db.keep = true;
        }
    }
}

/// The shards' own addresses from the started server's ready line, checked against
/// `--shards` when given (otherwise the list's length is the shard count) and against
/// `--connections`.
fn owner_ports(args: &Args, ready_line: &str) -> anyhow::Result<Vec<SocketAddr>> {
    let addrs = ready_shard_addrs(ready_line)
        .context("enrolld was started with --shard-listen but its ready line has no `shard_listen=` list")??;
    if let Some(n) = args.shards {
        ensure!(
            addrs.len() == n,
            "enrolld runs {n} shards (--shards) but its ready line lists {} shard ports",
            addrs.len()
        );
    }
    ensure!(
        args.connections >= addrs.len(),
        "--connections ({}) must be at least the server's shard count ({}), so every shard's port gets a connection",
        args.connections,
        addrs.len()
    );
    Ok(addrs)
}

fn parse_http_url(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url.strip_prefix("http://").context("--url must start with http://")?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    use std::net::ToSocketAddrs;
    hostport
        .to_socket_addrs()
        .with_context(|| format!("resolving {hostport}"))?
        .next()
        .with_context(|| format!("{hostport} resolves to nothing"))
}

fn enrolld_bin(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(b) = &args.enrolld_bin {
        ensure!(b.exists(), "--enrolld-bin {} does not exist", b.display());
        return Ok(b.clone());
    }
    // The binary cargo built beside this bench (target/release/enrolld under `cargo bench`).
    let bin = option_env!("CARGO_BIN_EXE_enrolld")
        .map_or_else(|| manifest_dir().join("target/release/enrolld"), PathBuf::from);
    if !bin.exists() {
        eprintln!("rush: {} missing, running cargo build --release", bin.display());
        let status = Command::new("cargo")
            .args(["build", "--release", "--bin", "enrolld"])
            .current_dir(manifest_dir())
            .status()
            .context("running cargo build --release")?;
        ensure!(status.success(), "cargo build --release failed");
    }
    Ok(bin)
}

/// A MariaDB database reached with the `mariadb` command-line client.
#[derive(Clone, Debug)]
struct Mysql {
    host: String,
    port: String,
    user: String,
    pass: String,
    db: String,
}

impl Mysql {
    /// `mysql://user:pass@host:port[/db]`.
    fn parse(url: &str) -> anyhow::Result<Mysql> {
        let rest = url
            .strip_prefix("mysql://")
            .with_context(|| format!("{url}: a MariaDB URL starts with mysql://"))?;
        let (creds, hostpath) = rest.split_once('@').with_context(|| format!("{url}: no user@"))?;
        let (user, pass) = creds.split_once(':').unwrap_or((creds, ""));
        let (hostport, db) = hostpath.split_once('/').unwrap_or((hostpath, ""));
        let (host, port) = hostport.split_once(':').unwrap_or((hostport, "3306"));
        Ok(Mysql {
            host: host.into(),
            port: port.into(),
            user: user.into(),
            pass: pass.into(),
            db: db.into(),
        })
    }

    fn url(&self) -> String {
        format!(
            "mysql://{}:{}@{}:{}/{}",
            self.user, self.pass, self.host, self.port, self.db
        )
    }

    /// Runs `sql` (in `db` when it is not empty); returns the rows, tab-separated.
    fn query_in(&self, db: &str, sql: &str) -> anyhow::Result<Vec<Vec<String>>> {
        let mut cmd = Command::new("mariadb");
        cmd.arg(format!("-h{}", self.host))
            .arg(format!("-P{}", self.port))
            .arg(format!("-u{}", self.user))
            .env("MYSQL_PWD", &self.pass)
            .args(["-N", "-B"]);
        if !db.is_empty() {
            cmd.arg(db);
        }
        let out = cmd.args(["-e", sql]).output().context("running the mariadb client")?;
        ensure!(
            out.status.success(),
            "mariadb: {sql}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split('\t').map(str::to_owned).collect())
            .collect())
    }

    fn query(&self, sql: &str) -> anyhow::Result<Vec<Vec<String>>> {
        self.query_in(&self.db, sql)
    }
}

/// A database made for this run and dropped after it (kept after a violation).
struct ScratchDb {
    mysql: Mysql,
    keep: bool,
}

impl ScratchDb {
    fn create(base_url: &str, prefix: &str) -> anyhow::Result<ScratchDb> {
        let mut mysql = Mysql::parse(base_url)?;
        if mysql.query_in("", "SELECT 1").is_err() {
            eprintln!(
                "rush: MariaDB not reachable as {}, running scripts/services.sh",
                mysql.user
            );
            let status = Command::new(manifest_dir().join("scripts/services.sh"))
                .status()
                .context("running scripts/services.sh")?;
            ensure!(status.success(), "scripts/services.sh failed");
        }
        mysql.db = format!("{prefix}_{:08x}", rand::random::<u32>());
        mysql.query_in("", &format!("CREATE DATABASE {}", mysql.db))?;
        Ok(ScratchDb { mysql, keep: false })
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        if self.keep {
            eprintln!(
                "rush: kept database {} for inspection; drop it with: mariadb -uenrolld -penrolld -e 'DROP DATABASE {}'",
                self.mysql.db, self.mysql.db
            );
            return;
        }
        if let Err(e) = self
            .mysql
            .query_in("", &format!("DROP DATABASE IF EXISTS {}", self.mysql.db))
        {
            eprintln!("rush: could not drop {}: {e:#}", self.mysql.db);
        }
    }
}

/// An `enrolld serve` we started; SIGTERM (then SIGKILL) when dropped.
struct OwnServer {
    child: Child,
}

impl OwnServer {
    fn start(
        bin: &Path,
        store: &str,
        secret: &str,
        extra: &[String],
        log_path: &Path,
    ) -> anyhow::Result<(OwnServer, SocketAddr, String)> {
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--store", store])
            .args(["--jwt-secret", secret])
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd.args(extra);
        let mut child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut log = std::fs::File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
                if let Some(addr) = ready_addr(&line) {
                    let _ = tx.send((addr, line.clone()));
                }
            }
        });
        let mut server = OwnServer { child };
        match rx.recv_timeout(Duration::from_secs(READY_TIMEOUT_SECS)) {
            Ok((addr, line)) => Ok((server, addr, line)),
            Err(_) => {
                server.stop();
                bail!(
                    "enrolld did not log `ready listen=ADDR` within {READY_TIMEOUT_SECS} s; its log is {}",
                    log_path.display()
                )
            }
        }
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(STOP_TIMEOUT_SECS);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("rush: enrolld did not exit {STOP_TIMEOUT_SECS} s after SIGTERM; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The address in a log line containing `ready listen=ADDR`.
fn ready_addr(line: &str) -> Option<SocketAddr> {
    let i = line.find("ready listen=")?;
    let rest = &line[i + "ready listen=".len()..];
    let word = rest
        .split(|c: char| c.is_whitespace() || c == '"')
        .find(|w| !w.is_empty())?;
    word.parse().ok()
}

/// The shards' own addresses in a ready line's `shard_listen=A0,A1,...` (shard order):
/// `None` when the line has no such list, an error when an address does not parse.
fn ready_shard_addrs(line: &str) -> Option<anyhow::Result<Vec<SocketAddr>>> {
    let rest = &line[line.find("ready listen=")?..];
    let i = rest.find(" shard_listen=")?;
    let list = rest[i + " shard_listen=".len()..]
        .split(|c: char| c.is_whitespace() || c == '"')
        .next()
        .unwrap_or("");
    Some(
        list.split(',')
            .map(|a| {
                a.parse()
                    .with_context(|| format!("shard_listen address {a:?} in {line:?}"))
            })
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------
// The workload
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Post,
    Delete,
}

/// One request the run makes: a student enrolls in or drops a course.
#[derive(Clone, Copy, Debug)]
struct Op {
    method: Method,
    course: u32,
    student: u32,
}

/// Everything decided before the first request (deterministic for a seed, except the tag).
struct Workload {
    /// Prefix of every id this run creates, so runs never share a course or a student.
    tag: String,
    course_ids: Vec<String>,
    capacities: Vec<u32>,
    student_ids: Vec<String>,
    tokens: Vec<String>,
    admin_token: String,
    /// Every student's POSTs for their chosen courses, in a random arrival order.
    rush_ops: Vec<Op>,
}

impl Workload {
    fn course_prefix(&self) -> String {
        format!("{}-c", self.tag)
    }
    /// The student index of an id this run minted.
    fn student_index(&self, id: &str) -> Option<u32> {
        let n: u32 = id.strip_prefix(&self.tag)?.strip_prefix("-s")?.parse().ok()?;
        ((n as usize) < self.student_ids.len()).then_some(n)
    }
}

fn plan(args: &Args, secret: &str) -> anyhow::Result<Workload> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let tag = format!("rush{:08x}", rand::random::<u32>());
    let n_courses = args.courses() as usize;
    let course_ids: Vec<String> = (0..n_courses).map(|i| format!("{tag}-c{i}")).collect();
    let capacities: Vec<u32> = (0..n_courses).map(|_| rng.gen_range(0..=args.capacity_max)).collect();
    // Popularity rank r (1 = hottest) belongs to a random course, so hot courses are spread
    // over ids and therefore over shards.
    let mut by_rank: Vec<u32> = (0..args.courses()).collect();
    by_rank.shuffle(&mut rng);
    let zipf = Zipf::new(args.courses() as u64, args.zipf_s).map_err(|e| anyhow::anyhow!("zipf: {e:?}"))?;
    let auth = Auth::new(secret.as_bytes());
    let mut student_ids = Vec::with_capacity(args.students() as usize);
    let mut tokens = Vec::with_capacity(args.students() as usize);
    let mut rush_ops = Vec::with_capacity(args.students() as usize * args.attempts as usize);
    for s in 0..args.students() {
        let id = format!("{tag}-s{s}");
        let sid = StudentId::parse(&id).context("student id")?;
        tokens.push(auth.mint(&sid, Role::Student, TOKEN_TTL_SECS));
        student_ids.push(id);
        for course in choose_courses(&mut rng, &zipf, &by_rank, args.attempts as usize) {
            rush_ops.push(Op {
                method: Method::Post,
                course,
                student: s,
            });
        }
    }
    rush_ops.shuffle(&mut rng);
    let admin = StudentId::parse("rush-admin").expect("valid id");
    Ok(Workload {
        tag,
        course_ids,
        capacities,
        student_ids,
        tokens,
        admin_token: auth.mint(&admin, Role::Admin, TOKEN_TTL_SECS),
        rush_ops,
    })
}

/// `k` distinct courses drawn by popularity. A very steep Zipf could make the last distinct
/// draws rare, so after a bounded number of draws the rest are picked uniformly.
fn choose_courses(rng: &mut StdRng, zipf: &Zipf<f64>, by_rank: &[u32], k: usize) -> Vec<u32> {
    let draws_max = 1_000 * k;
    let mut chosen: Vec<u32> = Vec::with_capacity(k);
    for _ in 0..draws_max {
        if chosen.len() == k {
            return chosen;
        }
        let rank = (zipf.sample(rng) as usize).clamp(1, by_rank.len());
        let c = by_rank[rank - 1];
        if !chosen.contains(&c) {
            chosen.push(c);
        }
    }
    while chosen.len() < k {
        let c = by_rank[rng.gen_range(0..by_rank.len())];
        if !chosen.contains(&c) {
            chosen.push(c);
        }
    }
    chosen
}

/// The second wave: a fraction of the students holding seats drops one of them, and the
/// same fraction of the rush's refused requests tries again; all shuffled so they race.
fn plan_drop_wave(w: &Workload, rush: &PhaseResult, exp: &Expected, fraction: f64, seed: u64) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1));
    let mut held: Vec<Vec<u32>> = vec![Vec::new(); w.student_ids.len()];
    for (c, pairs) in exp.pairs.iter().enumerate() {
        for (&s, &seat) in pairs {
            if seat == Seat::Held {
                held[s as usize].push(c as u32);
            }
        }
    }
    let mut ops = Vec::new();
    for (s, courses) in held.iter_mut().enumerate() {
        if courses.is_empty() || !rng.gen_bool(fraction) {
            continue;
        }
        courses.sort_unstable();
        let course = courses[rng.gen_range(0..courses.len())];
        ops.push(Op {
            method: Method::Delete,
            course,
            student: s as u32,
        });
    }
    for (i, op) in rush.ops.iter().enumerate() {
        if rush.status[i] == 409 && rng.gen_bool(fraction) {
            ops.push(*op);
        }
    }
    ops.shuffle(&mut rng);
    ops
}

/// `--self-check`: two faults the checks must find.
fn tamper(target: &Target, w: &Workload, exp: &mut Expected) -> anyhow::Result<()> {
    let c = (0..w.course_ids.len())
        .find(|&c| !exp.held(c).is_empty())
        .context("no seat was sold: nothing to tamper with")?;
    let held = *exp.held(c).iter().next().expect("not empty");
    let ghost = (0..w.student_ids.len() as u32)
        .find(|s| !exp.pairs[c].contains_key(s))
        .context("every student asked for this course")?;
    exp.pairs[c].insert(ghost, Seat::Held);
    eprintln!(
        "rush: self-check: pretending {} holds a seat in {}",
        w.student_ids[ghost as usize], w.course_ids[c]
    );
    if let Some(store) = &target.store {
        store.query(&format!(
            "DELETE FROM enrollments WHERE course_id = '{}' AND student_id = '{}'",
            w.course_ids[c], w.student_ids[held as usize]
        ))?;
        eprintln!(
            "rush: self-check: deleted the row of {} in {} from the store",
            w.student_ids[held as usize], w.course_ids[c]
        );
    }
    Ok(())
}

fn touched_courses(ops: &[Op], n_courses: usize) -> Vec<bool> {
    let mut t = vec![false; n_courses];
    for op in ops {
        t[op.course as usize] = true;
    }
    t
}

// ---------------------------------------------------------------------------------------
// Raw HTTP/1.1
// ---------------------------------------------------------------------------------------

/// What the load generator needs of a response head.
struct Head {
    status: u16,
    retry_after_secs: Option<u64>,
    close: bool,
    head_len: usize,
    body_len: usize,
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// Parses the head at the start of `buf`: `Ok(None)` until it is complete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let Some(end) = find_head_end(buf) else {
        if buf.len() > HEAD_BYTES_MAX {
            return Err(format!("response head longer than {HEAD_BYTES_MAX} bytes"));
        }
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| "response head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or("");
    let status = parts.next().and_then(|s| s.parse::<u16>().ok());
    let Some(status) = status.filter(|_| version.starts_with("HTTP/1.")) else {
        return Err(format!("bad status line {status_line:?}"));
    };
    let mut head = Head {
        status,
        retry_after_secs: None,
        close: version == "HTTP/1.0",
        head_len: end,
        body_len: 0,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("bad header line {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.body_len = value.parse().map_err(|_| format!("bad Content-Length {value:?}"))?;
        } else if name.eq_ignore_ascii_case("retry-after") {
            head.retry_after_secs = value.parse().ok();
        } else if name.eq_ignore_ascii_case("connection") {
            head.close = value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!("unsupported Transfer-Encoding {value:?}"));
        }
    }
    Ok(Some(head))
}

/// One keep-alive connection and its read buffer.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    pos: usize,
}

impl Conn {
    async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(READ_CHUNK_BYTES),
            pos: 0,
        })
    }

    async fn open_retrying(addr: SocketAddr) -> anyhow::Result<Conn> {
        let mut last = None;
        for _ in 0..CONNECT_TRIES_MAX {
            match Conn::open(addr).await {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(CONNECT_PAUSE_MS)).await;
        }
        bail!("cannot connect to {addr}: {}", last.expect("at least one try"))
    }

    /// Reads more bytes; `Ok(false)` when the server closed. Cancel-safe (`read_buf` is).
    async fn read_more(&mut self) -> std::io::Result<bool> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > READ_CHUNK_BYTES {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.reserve(READ_CHUNK_BYTES);
        Ok(self.stream.read_buf(&mut self.buf).await? > 0)
    }

    /// Takes one complete response off the buffer; its body is `buf[range]` until the next read.
    fn next_response(&mut self) -> Result<Option<(Head, std::ops::Range<usize>)>, String> {
        let avail = &self.buf[self.pos..];
        let Some(head) = parse_head(avail)? else {
            return Ok(None);
        };
        let total = head.head_len + 4 + head.body_len;
        if avail.len() < total {
            return Ok(None);
        }
        let body = self.pos + head.head_len + 4..self.pos + total;
        self.pos += total;
        Ok(Some((head, body)))
    }

    /// One idempotent request (setup and checks; not the measured path), repeated after
    /// `Retry-After` while the server answers 429/503 (the admin is rate-limited too when
    /// the server's limits are on).
    async fn request(&mut self, method: &str, path: &str, token: &str, body: &str) -> anyhow::Result<(u16, Vec<u8>)> {
        let mut tries = 0;
        loop {
            let (status, retry_after, answer) = self.request_once(method, path, token, body).await?;
            tries += 1;
            if !matches!(status, 429 | 503) || tries > ADMIN_RETRIES_MAX {
                return Ok((status, answer));
            }
            let wait = retry_after
                .unwrap_or(RETRY_AFTER_SECS_DEFAULT)
                .min(RETRY_AFTER_SECS_MAX);
            tokio::time::sleep(Duration::from_secs(wait)).await;
        }
    }

    async fn request_once(
        &mut self,
        method: &str,
        path: &str,
        token: &str,
        body: &str,
    ) -> anyhow::Result<(u16, Option<u64>, Vec<u8>)> {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream.write_all(req.as_bytes()).await?;
        loop {
            if let Some((head, range)) = self.next_response().map_err(anyhow::Error::msg)? {
                return Ok((head.status, head.retry_after_secs, self.buf[range].to_vec()));
            }
            let more = tokio::time::timeout(Duration::from_secs(ANSWER_TIMEOUT_SECS), self.read_more())
                .await
                .with_context(|| format!("{method} {path}: no answer in {ANSWER_TIMEOUT_SECS} s"))??;
            ensure!(more, "{method} {path}: connection closed before the answer");
        }
    }
}

fn encode_op(buf: &mut Vec<u8>, op: Op, w: &Workload) {
    buf.extend_from_slice(match op.method {
        Method::Post => b"POST /v1/courses/",
        Method::Delete => b"DELETE /v1/courses/",
    });
    buf.extend_from_slice(w.course_ids[op.course as usize].as_bytes());
    buf.extend_from_slice(b"/enrollment HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ");
    buf.extend_from_slice(w.tokens[op.student as usize].as_bytes());
    buf.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
}

/// Runs `f(conn, i)` for i in 0..n over `ADMIN_CONNECTIONS` connections.
async fn for_each_over_connections<T, F, Fut>(addr: SocketAddr, n: usize, f: F) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(Conn, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<(Conn, T)>> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..ADMIN_CONNECTIONS.min(n.max(1)) {
        let (f, next) = (f.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open_retrying(addr).await?;
            let mut got = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(got);
                }
                let (c, t) = f(conn, i).await?;
                conn = c;
                got.push((i, t));
            }
        }));
    }
    let mut all: Vec<(usize, T)> = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, t)| t).collect())
}

async fn create_courses(addr: SocketAddr, w: &Arc<Workload>) -> anyhow::Result<()> {
    let started = Instant::now();
    let work = w.clone();
    for_each_over_connections(addr, w.course_ids.len(), move |mut conn, i| {
        let work = work.clone();
        async move {
            let id = &work.course_ids[i];
            let body = format!(r#"{{"title":"Rush course {i}","capacity":{}}}"#, work.capacities[i]);
            let (status, resp) = conn
                .request("PUT", &format!("/v1/admin/courses/{id}"), &work.admin_token, &body)
                .await?;
            ensure!(
                status == 201 || status == 200,
                "PUT course {id}: {status} {}",
                String::from_utf8_lossy(&resp)
            );
            Ok((conn, ()))
        }
    })
    .await?;
    eprintln!(
        "rush: created {} courses in {:.1} s",
        w.course_ids.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The load engine
// ---------------------------------------------------------------------------------------

/// What every connection of every phase shares.
struct Engine {
    /// The shared address (the kernel picks the shard), for every connection without
    /// `--owner-ports`.
    addr: SocketAddr,
    /// `--owner-ports`: where each connection goes and which requests it claims.
    routing: Option<OwnerRouting>,
    work: Arc<Workload>,
    rate: Option<f64>,
    pipeline: usize,
    connections: usize,
    retries_max: u32,
    /// Zero of the timeline (the start of the first phase).
    bench_start: Instant,
    /// Width of a timeline sample.
    sample_ms: u64,
    timeline: Mutex<Timeline>,
}

impl Engine {
    /// A phase's lanes: one shared by every connection, or with `--owner-ports` one per shard
    /// holding the requests for the courses it owns.
    fn lanes(&self, ops: &[Op]) -> Vec<Lane> {
        let Some(r) = &self.routing else {
            return vec![Lane {
                ops: None,
                next: AtomicUsize::new(0),
            }];
        };
        let mut by_shard: Vec<Vec<u32>> = vec![Vec::new(); r.shard_addrs.len()];
        for (i, op) in ops.iter().enumerate() {
            by_shard[r.course_owner[op.course as usize]].push(i as u32);
        }
        by_shard
            .into_iter()
            .map(|ops| Lane {
                ops: Some(ops),
                next: AtomicUsize::new(0),
            })
            .collect()
    }

    /// Where the connections of lane `lane` (connection c drives lane c % lanes) connect.
    fn lane_addr(&self, lane: usize) -> SocketAddr {
        self.routing.as_ref().map_or(self.addr, |r| r.shard_addrs[lane])
    }
}

/// `--owner-ports`: each shard's own address, and the shard that owns each course (as the
/// server computes it, so a request sent there never hops).
struct OwnerRouting {
    shard_addrs: Vec<SocketAddr>,
    course_owner: Vec<usize>,
}

impl OwnerRouting {
    fn new(shard_addrs: &[SocketAddr], w: &Workload) -> anyhow::Result<OwnerRouting> {
        let course_owner = w
            .course_ids
            .iter()
            .map(|id| {
                let course = CourseId::parse(id).with_context(|| format!("{id:?} is not a valid course id"))?;
                Ok(owner_of(&course, shard_addrs.len()).0)
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(OwnerRouting {
            shard_addrs: shard_addrs.to_vec(),
            course_owner,
        })
    }
}

/// A queue of a phase's requests that some connections claim from, in order, through their
/// own cursor.
struct Lane {
    /// Indices into the phase's `ops` (global ones, so the open-loop schedule is the same
    /// whatever the lane); `None`: all of them, in order.
    ops: Option<Vec<u32>>,
    next: AtomicUsize,
}

impl Lane {
    /// The index (into the phase's `total` ops) of the next unclaimed request, if any is left.
    fn claim(&self, total: usize) -> Option<usize> {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        match &self.ops {
            None => (k < total).then_some(k),
            Some(ops) => ops.get(k).map(|&i| i as usize),
        }
    }
}

/// What happened in each sample (`sample_ms`) since the first phase began, for the chart.
struct Timeline {
    sample_ms: u64,
    /// Latencies of the answers received in each sample.
    latency: Vec<Histogram<u64>>,
    /// 201s received in each sample.
    created: Vec<u64>,
    /// When each phase ran (seconds since the start), so a second that was only partly
    /// under load is not drawn as a dip.
    spans: Vec<(f64, f64)>,
}

/// One sample of the chart (rates per second); `None` where no phase ran.
struct Point {
    t: f64,
    answers_per_sec: Option<f64>,
    created_per_sec: Option<f64>,
    p99_ms: Option<f64>,
}

impl Timeline {
    fn new(sample_ms: u64) -> Timeline {
        Timeline {
            sample_ms,
            latency: Vec::new(),
            created: Vec::new(),
            spans: Vec::new(),
        }
    }

    fn add(&mut self, sec: usize, latency: &Histogram<u64>, created: u64) {
        while self.latency.len() <= sec {
            self.latency.push(histogram(TIMELINE_SIGFIG));
            self.created.push(0);
        }
        self.latency[sec].add(latency).expect("same bounds");
        self.created[sec] += created;
    }

    fn points(&self) -> Vec<Point> {
        let end = self.spans.iter().map(|s| s.1).fold(0.0, f64::max);
        let width = self.sample_ms as f64 / 1000.0;
        (0..(end / width).ceil() as usize)
            .map(|sec| {
                let (a, b) = (sec as f64 * width, (sec + 1) as f64 * width);
                let active: f64 = self.spans.iter().map(|&(s, e)| (e.min(b) - s.max(a)).max(0.0)).sum();
                let h = self.latency.get(sec);
                let per_sec = |n: u64| (active > 0.05 * width).then(|| n as f64 / active);
                Point {
                    t: (a + b) / 2.0,
                    answers_per_sec: per_sec(h.map_or(0, |h| h.len())),
                    created_per_sec: per_sec(self.created.get(sec).copied().unwrap_or(0)),
                    p99_ms: h
                        .filter(|h| !h.is_empty())
                        .map(|h| h.value_at_quantile(0.99) as f64 / 1000.0),
                }
            })
            .collect()
    }
}

fn histogram(sigfig: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, sigfig).expect("valid histogram bounds")
}

/// An answer was written and never came back: the request may have taken effect.
const FLAG_LOST: u8 = 1;
/// Retries ran out (on 429/503 or lost answers).
const FLAG_GAVE_UP: u8 = 2;

/// One phase's requests and what became of each, written by the connection that finished it.
struct PhaseRun {
    ops: Vec<Op>,
    /// Connection c claims from lane c % lanes.len().
    lanes: Vec<Lane>,
    /// Final status of each op; 0 when no answer ever came.
    status: Vec<AtomicU16>,
    flags: Vec<AtomicU8>,
    start: Instant,
    progress: ProgressBar,
}

/// A request waiting to be sent or in flight: `due` is when it is (was) scheduled to go.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Due {
    due: Instant,
    op: u32,
    attempt: u32,
}

/// Counters of one connection, merged over the phase.
struct ConnStats {
    /// Latency (µs) by method and outcome, made on first use.
    latency: Vec<Option<Histogram<u64>>>,
    retries: u64,
    reconnects: u64,
    lost_answers: u64,
    gave_up: u64,
    errors: Vec<String>,
    fatal: Option<String>,
}

impl ConnStats {
    fn new() -> ConnStats {
        ConnStats {
            latency: (0..METHODS.len() * OUTCOMES.len()).map(|_| None).collect(),
            retries: 0,
            reconnects: 0,
            lost_answers: 0,
            gave_up: 0,
            errors: Vec::new(),
            fatal: None,
        }
    }

    fn record(&mut self, method: Method, status: u16, us: u64) {
        let i = method as usize * OUTCOMES.len() + outcome_index(status);
        self.latency[i]
            .get_or_insert_with(|| histogram(LATENCY_SIGFIG))
            .saturating_record(us);
    }

    fn merge(&mut self, other: ConnStats) {
        for (mine, theirs) in self.latency.iter_mut().zip(other.latency) {
            if let Some(t) = theirs {
                match mine {
                    Some(m) => m.add(&t).expect("same bounds"),
                    None => *mine = Some(t),
                }
            }
        }
        self.retries += other.retries;
        self.reconnects += other.reconnects;
        self.lost_answers += other.lost_answers;
        self.gave_up += other.gave_up;
        for e in other.errors {
            if self.errors.len() < 10 {
                self.errors.push(e);
            }
        }
        if self.fatal.is_none() {
            self.fatal = other.fatal;
        }
    }
}

enum Wake {
    Read(std::io::Result<bool>),
    Timer,
    Stalled,
}

/// One connection's loop: keeps up to `pipeline` requests in flight, sends each when it is
/// due (at once in the closed loop, on its schedule in the open loop), and retries 429/503
/// after their Retry-After without blocking the other requests.
struct Driver {
    eng: Arc<Engine>,
    run: Arc<PhaseRun>,
    /// The lane this connection claims from (and, with `--owner-ports`, its shard).
    lane: usize,
    conn: Conn,
    retry_q: BinaryHeap<Reverse<Due>>,
    staged: Option<Due>,
    exhausted: bool,
    inflight: VecDeque<Due>,
    wbuf: Vec<u8>,
    last_answer: Instant,
    stats: ConnStats,
    tl_sample: u64,
    tl_hist: Histogram<u64>,
    tl_created: u64,
    progress_pending: u64,
}

impl Driver {
    fn new(eng: Arc<Engine>, run: Arc<PhaseRun>, lane: usize, conn: Conn) -> Driver {
        Driver {
            eng,
            run,
            lane,
            conn,
            retry_q: BinaryHeap::new(),
            staged: None,
            exhausted: false,
            inflight: VecDeque::new(),
            wbuf: Vec::with_capacity(4096),
            last_answer: Instant::now(),
            stats: ConnStats::new(),
            tl_sample: 0,
            tl_hist: histogram(TIMELINE_SIGFIG),
            tl_created: 0,
            progress_pending: 0,
        }
    }

    async fn drive(mut self) -> ConnStats {
        loop {
            self.send_due();
            if !self.wbuf.is_empty() {
                let written = self.conn.stream.write_all(&self.wbuf).await;
                self.wbuf.clear();
                if let Err(e) = written {
                    if !self.reconnect(&format!("write: {e}")).await {
                        break;
                    }
                    continue;
                }
            }
            let wake_at = self.next_due();
            if self.inflight.is_empty() && wake_at.is_none() {
                break;
            }
            if !self.wait_and_read(wake_at).await {
                break;
            }
        }
        self.finish()
    }

    /// Waits for an answer or the next due request; false when the connection is lost for good.
    async fn wait_and_read(&mut self, wake_at: Option<Instant>) -> bool {
        let reading = !self.inflight.is_empty();
        let far = Instant::now() + Duration::from_secs(3600);
        let timer = tokio::time::sleep_until(wake_at.unwrap_or(far).into());
        let stall = tokio::time::sleep_until((self.last_answer + Duration::from_secs(ANSWER_TIMEOUT_SECS)).into());
        let wake = tokio::select! {
            r = self.conn.read_more(), if reading => Wake::Read(r),
            _ = timer, if wake_at.is_some() => Wake::Timer,
            _ = stall, if reading => Wake::Stalled,
        };
        match wake {
            Wake::Timer => true,
            Wake::Read(Ok(true)) => match self.take_answers() {
                Ok(()) => true,
                Err(e) => self.reconnect(&e).await,
            },
            Wake::Read(Ok(false)) => self.reconnect("closed by the server").await,
            Wake::Read(Err(e)) => self.reconnect(&format!("read: {e}")).await,
            Wake::Stalled => self.reconnect(&format!("no answer in {ANSWER_TIMEOUT_SECS} s")).await,
        }
    }

    /// Claims the next request of the phase, unless one is already staged.
    fn stage(&mut self) {
        if self.staged.is_some() || self.exhausted {
            return;
        }
        let Some(i) = self.run.lanes[self.lane].claim(self.run.ops.len()) else {
            self.exhausted = true;
            return;
        };
        let due = match self.eng.rate {
            Some(rate) => self.run.start + Duration::from_secs_f64(i as f64 / rate),
            None => Instant::now(),
        };
        self.staged = Some(Due {
            due,
            op: i as u32,
            attempt: 0,
        });
    }

    /// The earliest of the staged request and the retries, when it is due by `now`.
    fn pop_due(&mut self, now: Instant) -> Option<Due> {
        let retry_first = match (self.retry_q.peek(), &self.staged) {
            (Some(Reverse(r)), Some(s)) => r.due <= s.due,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if retry_first {
            let due = self.retry_q.peek()?.0.due;
            return (due <= now).then(|| self.retry_q.pop().expect("peeked").0);
        }
        match self.staged {
            Some(s) if s.due <= now => self.staged.take(),
            _ => None,
        }
    }

    /// Sends what is due while there is room. A request is claimed only when this
    /// connection has room for it, so a busy connection never holds back the next one.
    fn send_due(&mut self) {
        let now = Instant::now();
        if self.inflight.is_empty() {
            // The answer timeout runs from the first request after an idle spell.
            self.last_answer = now;
        }
        while self.inflight.len() < self.eng.pipeline {
            self.stage();
            let Some(item) = self.pop_due(now + TIMER_SLACK) else {
                break;
            };
            encode_op(&mut self.wbuf, self.run.ops[item.op as usize], &self.eng.work);
            // Open loop: latency runs from the scheduled time (no coordinated omission),
            // or from the send when that was (a timer tick) early.
            let start = if self.eng.rate.is_some() {
                item.due.min(now)
            } else {
                now
            };
            self.inflight.push_back(Due { due: start, ..item });
        }
    }

    /// When the connection must wake to send, if it has room to send at all.
    fn next_due(&self) -> Option<Instant> {
        if self.inflight.len() >= self.eng.pipeline {
            return None;
        }
        let retry = self.retry_q.peek().map(|r| r.0.due);
        let staged = self.staged.map(|s| s.due);
        let due = match (retry, staged) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        due.map(|d| d.checked_sub(TIMER_SLACK).unwrap_or(d))
    }

    fn take_answers(&mut self) -> Result<(), String> {
        while let Some((head, _body)) = self.conn.next_response()? {
            let sent = self
                .inflight
                .pop_front()
                .ok_or_else(|| "an answer to no request".to_string())?;
            self.on_answer(sent, &head);
            if head.close {
                return Err("the server closed the connection (Connection: close)".into());
            }
        }
        Ok(())
    }

    fn on_answer(&mut self, sent: Due, head: &Head) {
        let now = Instant::now();
        self.last_answer = now;
        let op = self.run.ops[sent.op as usize];
        let us = now.saturating_duration_since(sent.due).as_micros() as u64;
        self.stats.record(op.method, head.status, us);
        self.timeline_record(now, us, head.status == 201);
        let refused_for_now = matches!(head.status, 429 | 503);
        if refused_for_now && sent.attempt < self.eng.retries_max {
            let wait = head
                .retry_after_secs
                .unwrap_or(RETRY_AFTER_SECS_DEFAULT)
                .min(RETRY_AFTER_SECS_MAX);
            self.stats.retries += 1;
            self.retry_q.push(Reverse(Due {
                due: now + Duration::from_secs(wait),
                op: sent.op,
                attempt: sent.attempt + 1,
            }));
            return;
        }
        if refused_for_now {
            self.stats.gave_up += 1;
            self.run.flags[sent.op as usize].fetch_or(FLAG_GAVE_UP, Ordering::Relaxed);
        }
        self.run.status[sent.op as usize].store(head.status, Ordering::Relaxed);
        self.finished_ops(1);
    }

    /// The connection broke with requests in flight: their answers are lost (they may have
    /// taken effect), so they are retried (a POST or DELETE is safe to repeat) on a new one.
    async fn reconnect(&mut self, reason: &str) -> bool {
        self.stats.reconnects += 1;
        if self.stats.errors.len() < 5 {
            self.stats.errors.push(reason.to_string());
        }
        let now = Instant::now();
        let lost: Vec<Due> = self.inflight.drain(..).collect();
        for sent in lost {
            self.stats.lost_answers += 1;
            self.run.flags[sent.op as usize].fetch_or(FLAG_LOST, Ordering::Relaxed);
            if sent.attempt < self.eng.retries_max {
                self.retry_q.push(Reverse(Due {
                    due: now,
                    op: sent.op,
                    attempt: sent.attempt + 1,
                }));
            } else {
                self.stats.gave_up += 1;
                self.run.flags[sent.op as usize].fetch_or(FLAG_GAVE_UP, Ordering::Relaxed);
                self.finished_ops(1);
            }
        }
        match Conn::open_retrying(self.eng.lane_addr(self.lane)).await {
            Ok(conn) => {
                self.conn = conn;
                self.last_answer = Instant::now();
                true
            }
            Err(e) => {
                self.stats.fatal = Some(format!("{e:#} (after: {reason})"));
                false
            }
        }
    }

    fn finished_ops(&mut self, n: u64) {
        self.progress_pending += n;
        if self.progress_pending >= PROGRESS_BATCH {
            self.run.progress.inc(self.progress_pending);
            self.progress_pending = 0;
        }
    }

    fn timeline_record(&mut self, now: Instant, us: u64, created: bool) {
        let since = now.duration_since(self.eng.bench_start);
        let sec = (since.as_millis() / self.eng.sample_ms as u128) as u64;
        if sec != self.tl_sample {
            self.flush_timeline();
            self.tl_sample = sec;
        }
        self.tl_hist.saturating_record(us);
        self.tl_created += created as u64;
    }

    fn flush_timeline(&mut self) {
        if self.tl_hist.is_empty() {
            return;
        }
        let mut tl = self.eng.timeline.lock().expect("timeline lock");
        tl.add(self.tl_sample as usize, &self.tl_hist, self.tl_created);
        self.tl_hist.reset();
        self.tl_created = 0;
    }

    fn finish(mut self) -> ConnStats {
        self.flush_timeline();
        self.run.progress.inc(self.progress_pending);
        self.stats
    }
}

/// A phase's figures and the final status of each of its requests.
struct PhaseResult {
    name: &'static str,
    ops: Vec<Op>,
    status: Vec<u16>,
    flags: Vec<u8>,
    stats: ConnStats,
    wall: Duration,
    cpu: CpuUse,
    /// Requests passed between shards during the phase (`enrolld_shard_hops_total` before
    /// and after), or why that is unknown.
    hops: Result<u64, String>,
    owner_ports: bool,
}

impl PhaseResult {
    fn count(&self, method: Method, outcome: usize) -> u64 {
        self.stats.latency[method as usize * OUTCOMES.len() + outcome]
            .as_ref()
            .map_or(0, |h| h.len())
    }

    fn answers(&self) -> u64 {
        self.stats.latency.iter().flatten().map(|h| h.len()).sum()
    }

    fn hops_text(&self) -> String {
        match &self.hops {
            Ok(n) => n.to_string(),
            Err(e) => format!("unknown ({e})"),
        }
    }

    fn unanswered(&self) -> usize {
        self.status
            .iter()
            .zip(&self.flags)
            .filter(|(s, f)| **s == 0 && **f & FLAG_GAVE_UP == 0)
            .count()
    }

    /// Why this phase's figures cannot be trusted, if they cannot.
    fn run_errors(&self) -> Vec<String> {
        let mut e = Vec::new();
        if let Some(f) = &self.stats.fatal {
            e.push(format!("{}: a connection was lost for good: {f}", self.name));
        }
        let n = self.unanswered();
        if n > 0 {
            e.push(format!("{}: {n} requests never got an answer", self.name));
        }
        if let (true, Ok(hops @ 1..)) = (self.owner_ports, &self.hops) {
            e.push(format!(
                "{}: {hops} requests hopped between shards although every one went to its owner's port (--owner-ports)",
                self.name
            ));
        }
        e
    }
}

async fn run_phase(eng: &Arc<Engine>, name: &'static str, ops: Vec<Op>, cpu: &CpuClock) -> anyhow::Result<PhaseResult> {
    let n = ops.len();
    let lanes = eng.lanes(&ops);
    let mut conns = Vec::with_capacity(eng.connections);
    for c in 0..eng.connections {
        let lane = c % lanes.len();
        conns.push((lane, Conn::open_retrying(eng.lane_addr(lane)).await?));
    }
    let progress = ProgressBar::new(n as u64).with_style(
        ProgressStyle::with_template("{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})")
            .expect("valid template"),
    );
    progress.set_prefix(name);
    let hops_before = hops_total(eng.addr).await;
    let run = Arc::new(PhaseRun {
        ops,
        lanes,
        status: (0..n).map(|_| AtomicU16::new(0)).collect(),
        flags: (0..n).map(|_| AtomicU8::new(0)).collect(),
        start: Instant::now(),
        progress: progress.clone(),
    });
    let cpu_before = cpu.sample();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|(lane, c)| tokio::spawn(Driver::new(eng.clone(), run.clone(), lane, c).drive()))
        .collect();
    let mut stats = ConnStats::new();
    for t in tasks {
        stats.merge(t.await.context("a connection task panicked")?);
    }
    let wall = run.start.elapsed();
    let since = |t: Instant| t.saturating_duration_since(eng.bench_start).as_secs_f64();
    eng.timeline
        .lock()
        .expect("timeline lock")
        .spans
        .push((since(run.start), since(run.start + wall)));
    let cpu_used = cpu.usage(&cpu_before, &cpu.sample(), wall);
    let hops = match (hops_before, hops_total(eng.addr).await) {
        (Ok(before), Ok(after)) => Ok(after.saturating_sub(before)),
        (Err(e), _) | (_, Err(e)) => Err(format!("{e:#}")),
    };
    progress.finish_and_clear();
    let run = Arc::try_unwrap(run).map_err(|_| anyhow::anyhow!("phase still shared"))?;
    let result = PhaseResult {
        name,
        ops: run.ops,
        status: run.status.into_iter().map(AtomicU16::into_inner).collect(),
        flags: run.flags.into_iter().map(AtomicU8::into_inner).collect(),
        stats,
        wall,
        cpu: cpu_used,
        hops,
        owner_ports: eng.routing.is_some(),
    };
    eprintln!(
        "rush: {name}: {} answers in {:.2} s ({:.0}/s), {} x 201, {} retries, {} reconnects, {} hops between shards ({})",
        result.answers(),
        wall.as_secs_f64(),
        result.answers() as f64 / wall.as_secs_f64(),
        result.count(Method::Post, 0),
        result.stats.retries,
        result.stats.reconnects,
        result.hops_text(),
        if result.owner_ports {
            "owner ports"
        } else {
            "shared port"
        }
    );
    Ok(result)
}

// ---------------------------------------------------------------------------------------
// CPU accounting (Linux /proc), to show who used the two cores
// ---------------------------------------------------------------------------------------

struct CpuClock {
    server_pid: Option<u32>,
    mariadb_pid: Option<u32>,
    ticks_per_sec: f64,
}

#[derive(Clone, Copy)]
struct CpuSample {
    client_ticks: Option<u64>,
    server_ticks: Option<u64>,
    mariadb_ticks: Option<u64>,
    machine_ticks: Option<u64>,
}

/// Cores used on average over a phase (None when /proc could not tell). `machine` counts
/// every process, so it shows when other work shared the cores.
#[derive(Clone, Copy, Default)]
struct CpuUse {
    client_cores: Option<f64>,
    server_cores: Option<f64>,
    mariadb_cores: Option<f64>,
    machine_cores: Option<f64>,
}

impl CpuClock {
    fn new(server_pid: Option<u32>) -> CpuClock {
        let ticks_per_sec = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0);
        let mariadb_pid = Command::new("pgrep")
            .args(["-x", "-o", "mariadbd"])
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok());
        CpuClock {
            server_pid,
            mariadb_pid,
            ticks_per_sec,
        }
    }

    fn sample(&self) -> CpuSample {
        CpuSample {
            client_ticks: proc_ticks("self"),
            server_ticks: self.server_pid.and_then(|p| proc_ticks(&p.to_string())),
            mariadb_ticks: self.mariadb_pid.and_then(|p| proc_ticks(&p.to_string())),
            machine_ticks: machine_busy_ticks(),
        }
    }

    fn usage(&self, before: &CpuSample, after: &CpuSample, wall: Duration) -> CpuUse {
        let cores = |a: Option<u64>, b: Option<u64>| {
            Some(a?.saturating_sub(b?) as f64 / self.ticks_per_sec / wall.as_secs_f64().max(1e-9))
        };
        CpuUse {
            client_cores: cores(after.client_ticks, before.client_ticks),
            server_cores: cores(after.server_ticks, before.server_ticks),
            mariadb_cores: cores(after.mariadb_ticks, before.mariadb_ticks),
            machine_cores: cores(after.machine_ticks, before.machine_ticks),
        }
    }
}

/// Busy ticks of all cores together (the `cpu` line of /proc/stat, without idle and iowait).
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    Some(
        v.get(..8)?
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3 && *i != 4)
            .map(|(_, x)| x)
            .sum(),
    )
}

/// utime + stime of a process, in clock ticks.
fn proc_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

// ---------------------------------------------------------------------------------------
// Invariants
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seat {
    Held,
    Free,
    /// An answer was lost and nothing later settled it: either is allowed.
    Unknown,
}

/// What the answers say the server must hold.
struct Expected {
    /// Per course: the seat of every student a request was made for.
    pairs: Vec<HashMap<u32, Seat>>,
    /// Per course: students whose rush POST got a definitive answer (201, 200 or 409).
    requesters: Vec<u64>,
    /// Per course: an unknown or given-up request makes "no undersell" undecidable.
    undecided: Vec<bool>,
}

impl Expected {
    fn new(n_courses: usize) -> Expected {
        Expected {
            pairs: vec![HashMap::new(); n_courses],
            requesters: vec![0; n_courses],
            undecided: vec![false; n_courses],
        }
    }

    /// Folds a phase's answers in; returns answers that no correct server gives.
    fn apply(&mut self, phase: &PhaseResult, w: &Workload, rush: bool) -> Vec<String> {
        let mut bad = Vec::new();
        for (i, op) in phase.ops.iter().enumerate() {
            let (status, flags) = (phase.status[i], phase.flags[i]);
            let lost = flags & FLAG_LOST != 0;
            let c = op.course as usize;
            let seat = self.pairs[c].entry(op.student).or_insert(Seat::Free);
            let (next, complaint) = next_seat(op.method, status, lost, *seat);
            if let Some(why) = complaint {
                bad.push(format!(
                    "{} {} by {}: answered {status}, {why}",
                    METHODS[op.method as usize], w.course_ids[c], w.student_ids[op.student as usize]
                ));
            }
            *seat = next;
            if rush && matches!(status, 201 | 200 | 409) {
                self.requesters[c] += 1;
            }
            if next == Seat::Unknown || matches!(status, 0 | 429 | 503) {
                self.undecided[c] = true;
            }
        }
        bad
    }

    fn held(&self, c: usize) -> BTreeSet<u32> {
        self.pairs[c]
            .iter()
            .filter(|(_, s)| **s == Seat::Held)
            .map(|(s, _)| *s)
            .collect()
    }

    fn unknown(&self, c: usize) -> BTreeSet<u32> {
        self.pairs[c]
            .iter()
            .filter(|(_, s)| **s == Seat::Unknown)
            .map(|(s, _)| *s)
            .collect()
    }
}

/// The seat after an answer, and why the answer is wrong if it is. `lost`: an earlier
/// attempt of this request went unanswered and may have taken effect.
fn next_seat(method: Method, status: u16, lost: bool, seat: Seat) -> (Seat, Option<&'static str>) {
    let unsettled = if lost { Seat::Unknown } else { seat };
    match (method, status) {
        (Method::Post, 201) if seat == Seat::Held && !lost => {
            (Seat::Held, Some("a second 201 for a seat already held"))
        }
        (Method::Post, 201) => (Seat::Held, None),
        (Method::Post, 200) if seat != Seat::Held && !lost => (
            Seat::Held,
            Some("200 (already enrolled) but no earlier request took the seat"),
        ),
        (Method::Post, 200) => (Seat::Held, None),
        (Method::Post, 409) if seat == Seat::Held && !lost => {
            (Seat::Held, Some("409 course_full to a student who holds the seat"))
        }
        // A lost attempt may still be pending in the server when the retry is refused.
        (Method::Post, 409) => (if lost { Seat::Unknown } else { Seat::Free }, None),
        (Method::Delete, 200) if seat != Seat::Held && !lost => (Seat::Free, Some("DELETE 200 for a seat not held")),
        (Method::Delete, 200) => (Seat::Free, None),
        (Method::Delete, 404) if seat == Seat::Held && !lost => {
            (Seat::Free, Some("DELETE 404 for a seat the student held"))
        }
        (Method::Delete, 404) => (Seat::Free, None),
        (_, 0 | 429 | 503) => (unsettled, None),
        _ => (unsettled, Some("an answer the contract does not allow here")),
    }
}

/// What the server holds, read back through the API.
struct CourseSeen {
    roster: Vec<String>,
    enrolled: u64,
    capacity: u64,
    seats_left: u64,
}

struct CheckResult {
    label: &'static str,
    courses: usize,
    undersell_checked: usize,
    seats: u64,
    db_checked: bool,
    db_rows: usize,
    violations: Vec<String>,
}

async fn check(
    target: &Target,
    w: &Arc<Workload>,
    exp: &Expected,
    undersell_candidates: &[bool],
    label: &'static str,
) -> anyhow::Result<CheckResult> {
    let seen = read_courses(target.addr, w).await?;
    let mut r = CheckResult {
        label,
        courses: seen.len(),
        undersell_checked: 0,
        seats: seen.iter().map(|c| c.roster.len() as u64).sum(),
        db_checked: false,
        db_rows: 0,
        violations: Vec::new(),
    };
    for (c, course) in seen.iter().enumerate() {
        let check_undersell = undersell_candidates[c] && !exp.undecided[c];
        r.undersell_checked += check_undersell as usize;
        check_course(w, exp, c, course, check_undersell, &mut r.violations);
    }
    if let Some(store) = &target.store {
        let (rows, bad) = check_store(store, w, &seen)?;
        r.db_checked = true;
        r.db_rows = rows;
        r.violations.extend(bad);
    }
    for v in &mut r.violations {
        *v = format!("[{label}] {v}");
    }
    eprintln!(
        "rush: check {label}: {} courses, {} seats, {} violations",
        r.courses,
        r.seats,
        r.violations.len()
    );
    Ok(r)
}

fn check_course(w: &Workload, exp: &Expected, c: usize, seen: &CourseSeen, undersell: bool, bad: &mut Vec<String>) {
    let id = &w.course_ids[c];
    let cap = w.capacities[c] as u64;
    let mut roster = BTreeSet::new();
    for s in &seen.roster {
        match w.student_index(s) {
            Some(i) => {
                if !roster.insert(i) {
                    bad.push(format!("{id}: {s} appears twice in the roster"));
                }
            }
            None => bad.push(format!("{id}: the roster holds {s:?}, a student this run never made")),
        }
    }
    let held = exp.held(c);
    let unknown = exp.unknown(c);
    for s in held.difference(&roster) {
        bad.push(format!(
            "{id}: {} was acknowledged (201/200) but is not in the roster: a lost seat",
            w.student_ids[*s as usize]
        ));
    }
    for s in roster.difference(&held).filter(|s| !unknown.contains(s)) {
        bad.push(format!(
            "{id}: the roster holds {}, whose seat was never acknowledged (or was dropped)",
            w.student_ids[*s as usize]
        ));
    }
    let n = seen.roster.len() as u64;
    if n > cap || seen.enrolled > cap {
        bad.push(format!(
            "{id}: OVERSOLD: roster {n}, enrolled {}, capacity {cap}",
            seen.enrolled
        ));
    }
    if seen.enrolled != n || seen.capacity != cap || seen.seats_left != cap.saturating_sub(seen.enrolled) {
        bad.push(format!(
            "{id}: GET says enrolled {} capacity {} seats_left {}, but the roster has {n} and the capacity set was {cap}",
            seen.enrolled, seen.capacity, seen.seats_left
        ));
    }
    let want = cap.min(exp.requesters[c]);
    if undersell && n != want {
        bad.push(format!(
            "{id}: UNDERSOLD: {} distinct students asked for capacity {cap}, {n} seats are held (expected {want})",
            exp.requesters[c]
        ));
    }
}

async fn read_courses(addr: SocketAddr, w: &Arc<Workload>) -> anyhow::Result<Vec<CourseSeen>> {
    let work = w.clone();
    for_each_over_connections(addr, w.course_ids.len(), move |mut conn, i| {
        let work = work.clone();
        async move {
            let id = &work.course_ids[i];
            let path = format!("/v1/admin/courses/{id}/roster");
            let (status, body) = conn.request("GET", &path, &work.admin_token, "").await?;
            ensure!(status == 200, "GET {path}: {status} {}", String::from_utf8_lossy(&body));
            let v: serde_json::Value = serde_json::from_slice(&body).context("roster JSON")?;
            let roster = v["students"]
                .as_array()
                .context("roster without students")?
                .iter()
                .map(|s| s.as_str().unwrap_or("<not a string>").to_string())
                .collect();
            let path = format!("/v1/courses/{id}");
            let (status, body) = conn.request("GET", &path, &work.admin_token, "").await?;
            ensure!(status == 200, "GET {path}: {status} {}", String::from_utf8_lossy(&body));
            let v: serde_json::Value = serde_json::from_slice(&body).context("course JSON")?;
            let num = |k: &str| v[k].as_u64().with_context(|| format!("course {id} without {k}"));
            let seen = CourseSeen {
                roster,
                enrolled: num("enrolled")?,
                capacity: num("capacity")?,
                seats_left: num("seats_left")?,
            };
            Ok((conn, seen))
        }
    })
    .await
}

/// The store against the rosters: the same (course, student) rows, and each course's
/// counter equal to its row count and within its capacity.
fn check_store(store: &Mysql, w: &Workload, seen: &[CourseSeen]) -> anyhow::Result<(usize, Vec<String>)> {
    let like = format!("{}%", w.course_prefix());
    let rows = store.query(&format!(
        "SELECT course_id, student_id FROM enrollments WHERE course_id LIKE '{like}'"
    ))?;
    let counters = store.query(&format!(
        "SELECT id, enrolled, capacity FROM courses WHERE id LIKE '{like}'"
    ))?;
    let index: HashMap<&str, usize> = w.course_ids.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    let mut bad = Vec::new();
    let mut stored: Vec<BTreeSet<String>> = vec![BTreeSet::new(); w.course_ids.len()];
    for r in &rows {
        match (r.first().and_then(|c| index.get(c.as_str())), r.get(1)) {
            (Some(&c), Some(s)) => {
                stored[c].insert(s.clone());
            }
            _ => bad.push(format!("database: unexpected enrollments row {r:?}")),
        }
    }
    for (c, course) in seen.iter().enumerate() {
        let api: BTreeSet<String> = course.roster.iter().cloned().collect();
        let id = &w.course_ids[c];
        for s in stored[c].difference(&api) {
            bad.push(format!("{id}: the database holds {s}, the roster API does not"));
        }
        for s in api.difference(&stored[c]) {
            bad.push(format!("{id}: the roster API holds {s}, the database does not"));
        }
    }
    let mut counted = vec![false; w.course_ids.len()];
    for r in &counters {
        let parsed = (|| {
            let c = *index.get(r.first()?.as_str())?;
            Some((c, r.get(1)?.parse::<u64>().ok()?, r.get(2)?.parse::<u64>().ok()?))
        })();
        let Some((c, enrolled, capacity)) = parsed else {
            bad.push(format!("database: unexpected courses row {r:?}"));
            continue;
        };
        counted[c] = true;
        let id = &w.course_ids[c];
        let n = stored[c].len() as u64;
        if enrolled != n {
            bad.push(format!(
                "{id}: database counter enrolled = {enrolled} but {n} enrollment rows"
            ));
        }
        if enrolled > capacity || capacity != w.capacities[c] as u64 {
            bad.push(format!(
                "{id}: database enrolled {enrolled}, capacity {capacity} (set: {})",
                w.capacities[c]
            ));
        }
    }
    for (c, seen) in counted.iter().enumerate() {
        if !seen {
            bad.push(format!("{}: no row in the database's courses table", w.course_ids[c]));
        }
    }
    Ok((rows.len(), bad))
}

/// The text of the server's `/metrics`.
async fn get_metrics(addr: SocketAddr) -> anyhow::Result<String> {
    let mut conn = Conn::open(addr)
        .await
        .with_context(|| format!("connecting to {addr} for /metrics"))?;
    let (status, body) = conn.request("GET", "/metrics", "-", "").await?;
    ensure!(status == 200, "/metrics: {status}");
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Requests passed between shards so far: `enrolld_shard_hops_total` summed over shards.
async fn hops_total(addr: SocketAddr) -> anyhow::Result<u64> {
    let text = get_metrics(addr).await?;
    let mut total = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name_labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if name_labels.split('{').next() == Some(HOPS_METRIC) {
            let v: f64 = value
                .parse()
                .with_context(|| format!("/metrics: bad value in {line:?}"))?;
            *total.get_or_insert(0.0) += v;
        }
    }
    let total = total.with_context(|| format!("/metrics has no {HOPS_METRIC}"))?;
    Ok(total as u64)
}

/// The server's persist figures from `/metrics`, summed over label sets.
async fn scrape_metrics(addr: SocketAddr) -> anyhow::Result<BTreeMap<String, f64>> {
    let text = get_metrics(addr).await?;
    let mut sums = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name_labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = name_labels.split('{').next().unwrap_or(name_labels);
        let wanted = [
            "enrolld_persist_batch_rows_sum",
            "enrolld_persist_batch_rows_count",
            "enrolld_persist_commit_seconds_sum",
            "enrolld_persist_commit_seconds_count",
        ];
        if wanted.contains(&name) || name == "enrolld_shard_requests_total" {
            let key = if name == "enrolld_shard_requests_total" {
                name_labels
            } else {
                name
            };
            if let Ok(v) = value.parse::<f64>() {
                *sums.entry(key.to_string()).or_insert(0.0) += v;
            }
        }
    }
    Ok(sums)
}

// ---------------------------------------------------------------------------------------
// Report and chart
// ---------------------------------------------------------------------------------------

struct Report<'a> {
    args: &'a Args,
    target: &'a Target,
    work: &'a Workload,
    run: &'a RunResult,
    violations: &'a [String],
    broken: &'a [String],
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

impl Report<'_> {
    fn markdown(&self) -> String {
        let mut s = String::new();
        let verdict = if self.violations.is_empty() && self.broken.is_empty() {
            "PASS"
        } else {
            "FAIL"
        };
        let _ = writeln!(s, "# enrolld rush: {verdict}\n");
        self.parameters(&mut s);
        self.throughput(&mut s);
        self.latency(&mut s);
        self.totals(&mut s);
        self.invariants(&mut s);
        s
    }

    fn parameters(&self, s: &mut String) {
        let a = self.args;
        let mode = match a.rate {
            Some(r) => {
                format!("open loop, {r} requests/s scheduled (latency from the scheduled time)")
            }
            None => "closed loop".into(),
        };
        let _ = writeln!(s, "## Parameters\n");
        let _ = writeln!(s, "| parameter | value |\n|---|---|");
        let rows: Vec<(&str, String)> = vec![
            ("date (UTC)", enrolld::ids::rfc3339(enrolld::ids::now_ms())),
            ("machine", machine()),
            ("target", self.target.description.clone()),
            ("students", a.students().to_string()),
            ("courses", a.courses().to_string()),
            ("attempts per student", a.attempts.to_string()),
            ("capacities", format!("uniform 0..={}", a.capacity_max)),
            ("popularity", format!("Zipf s = {}", a.zipf_s)),
            ("seed", a.seed.to_string()),
            ("connections", a.connections.to_string()),
            ("pipeline depth", a.pipeline.to_string()),
            ("mode", mode),
            ("owner ports", self.owner_ports()),
            ("drop wave", a.drop_wave.map_or("none".into(), |f| f.to_string())),
            ("retries max (429/503, lost answers)", a.retries_max.to_string()),
            ("load generator threads", a.client_threads.to_string()),
            ("id tag", self.work.tag.clone()),
        ];
        for (k, v) in rows {
            let _ = writeln!(s, "| {k} | {v} |");
        }
        let _ = writeln!(s);
    }

    fn owner_ports(&self) -> String {
        match &self.target.shard_addrs {
            Some(addrs) => format!(
                "yes: connection c sends only the requests for courses shard c % {} owns, to that shard's own port ({})",
                addrs.len(),
                addrs.iter().map(|a| a.port().to_string()).collect::<Vec<_>>().join(", ")
            ),
            None => "no: every connection uses the shared port, whatever shard the kernel gives it".into(),
        }
    }

    fn throughput(&self, s: &mut String) {
        let _ = writeln!(s, "## Throughput\n");
        let _ = writeln!(
            s,
            "| phase | requests | answers | wall s | answers/s | 201/s (durable seats) | retries | reconnects | gave up | CPU cores: load generator / enrolld / mariadbd / whole machine |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
        for p in &self.run.phases {
            let secs = p.wall.as_secs_f64().max(1e-9);
            let cores = |c: Option<f64>| c.map_or("-".into(), |c| format!("{c:.2}"));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.2} | {:.0} | {:.0} | {} | {} | {} | {} / {} / {} / {} |",
                p.name,
                p.ops.len(),
                p.answers(),
                secs,
                p.answers() as f64 / secs,
                p.count(Method::Post, 0) as f64 / secs,
                p.stats.retries,
                p.stats.reconnects,
                p.stats.gave_up,
                cores(p.cpu.client_cores),
                cores(p.cpu.server_cores),
                cores(p.cpu.mariadb_cores),
                cores(p.cpu.machine_cores)
            );
        }
        let _ = writeln!(s);
    }

    fn latency(&self, s: &mut String) {
        let _ = writeln!(s, "## Latency by outcome\n");
        let _ = writeln!(
            s,
            "Every answer counts once (a retried request counts each answer it got).\n"
        );
        let _ = writeln!(
            s,
            "| phase | request | outcome | answers | share | answers/s | p50 ms | p99 ms | p99.9 ms | max ms |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
        for p in &self.run.phases {
            let total = p.answers().max(1) as f64;
            let secs = p.wall.as_secs_f64().max(1e-9);
            let mut all = histogram(LATENCY_SIGFIG);
            for (i, h) in p.stats.latency.iter().enumerate() {
                let Some(h) = h else { continue };
                all.add(h).expect("same bounds");
                let (m, o) = (METHODS[i / OUTCOMES.len()], OUTCOMES[i % OUTCOMES.len()]);
                latency_row(s, p.name, m, o, h, total, secs);
            }
            if !all.is_empty() {
                latency_row(s, p.name, "all", "all", &all, total, secs);
            }
        }
        let _ = writeln!(s);
    }

    fn totals(&self, s: &mut String) {
        let w = self.work;
        let capacity: u64 = w.capacities.iter().map(|&c| c as u64).sum();
        let held: usize = (0..w.course_ids.len()).map(|c| self.run.exp.held(c).len()).sum();
        let full = (0..w.course_ids.len())
            .filter(|&c| self.run.exp.held(c).len() as u32 >= w.capacities[c])
            .count();
        let oversubscribed = (0..w.course_ids.len())
            .filter(|&c| self.run.exp.requesters[c] > w.capacities[c] as u64)
            .count();
        let _ = writeln!(s, "## Totals\n");
        let _ = writeln!(
            s,
            "- seats held at the end (acknowledged): {held} of a total capacity of {capacity}"
        );
        let _ = writeln!(
            s,
            "- courses full at the end: {full} of {}; oversubscribed in the rush: {oversubscribed}",
            w.course_ids.len()
        );
        let rush = &self.run.phases[0];
        let _ = writeln!(
            s,
            "- rush: {} x 201, {} x 409; retries {}; answers lost with a connection {}",
            rush.count(Method::Post, 0),
            rush.count(Method::Post, 2),
            rush.stats.retries,
            rush.stats.lost_answers
        );
        for p in &self.run.phases {
            for e in &p.stats.errors {
                let _ = writeln!(s, "- {} connection trouble: {e}", p.name);
            }
        }
        self.hops_line(s);
        if let Some(m) = self.run.server_metrics.as_ref() {
            persist_line(s, m);
        }
        let _ = writeln!(
            s,
            "- timeline samples ({} ms) under load: {}; peak {:.0} answers/s",
            self.args.sample_ms,
            self.run.timeline.iter().filter(|t| t.answers_per_sec.is_some()).count(),
            self.run
                .timeline
                .iter()
                .filter_map(|t| t.answers_per_sec)
                .fold(0.0, f64::max)
        );
        let _ = writeln!(s);
    }

    /// Hops during the load phases only (setup and checks use the shared port).
    fn hops_line(&self, s: &mut String) {
        let phases = &self.run.phases;
        let total: Result<u64, String> = phases.iter().map(|p| p.hops.clone()).sum();
        let routing = if self.target.shard_addrs.is_some() {
            "owner ports"
        } else {
            "shared port"
        };
        let total = match total {
            Ok(n) => n.to_string(),
            Err(e) => format!("unknown ({e})"),
        };
        let per_phase = match phases.len() {
            1 => String::new(),
            _ => {
                let each: Vec<String> = phases.iter().map(|p| format!("{} {}", p.name, p.hops_text())).collect();
                format!(" ({})", each.join(", "))
            }
        };
        let _ = writeln!(
            s,
            "- requests hopped between shards during the load ({HOPS_METRIC} on /metrics, {routing}): {total}{per_phase}"
        );
    }

    fn invariants(&self, s: &mut String) {
        let _ = writeln!(s, "## Invariants\n");
        for c in &self.run.checks {
            let db = if c.db_checked {
                format!(
                    "database ({} enrollment rows): rows == rosters, each counter == its rows and <= capacity",
                    c.db_rows
                )
            } else {
                "database not checked (no store URL)".into()
            };
            let _ = writeln!(
                s,
                "- {}: checked on {} courses: roster == acknowledged seats, enrolled <= capacity, GET agrees with the roster; no undersell (enrolled == min(capacity, requesters)) on {} courses (those with no drop-wave traffic and no unsettled request); {}. **Violations: {}.**",
                c.label, c.courses, c.undersell_checked, db, c.violations.len()
            );
        }
        for b in self.broken {
            let _ = writeln!(s, "- RUN BROKEN: {b}");
        }
        let answer_bad = self.run.answer_violations.len();
        let _ = writeln!(s, "- answers no correct server gives: {answer_bad}");
        if self.violations.is_empty() && self.broken.is_empty() {
            let _ = writeln!(s, "\n**All invariants hold.**");
        } else {
            let _ = writeln!(s, "\n**FAILED: {} violations.**\n", self.violations.len());
            for v in self.violations.iter().take(VIOLATIONS_SHOWN_MAX) {
                let _ = writeln!(s, "- {v}");
            }
        }
    }
}

fn latency_row(s: &mut String, phase: &str, method: &str, outcome: &str, h: &Histogram<u64>, total: f64, secs: f64) {
    let _ = writeln!(
        s,
        "| {phase} | {method} | {outcome} | {} | {:.1}% | {:.0} | {} | {} | {} | {} |",
        h.len(),
        100.0 * h.len() as f64 / total,
        h.len() as f64 / secs,
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    );
}

fn persist_line(s: &mut String, m: &BTreeMap<String, f64>) {
    let get = |k: &str| m.get(k).copied();
    if let (Some(rows), Some(batches)) = (
        get("enrolld_persist_batch_rows_sum"),
        get("enrolld_persist_batch_rows_count"),
    ) {
        let commit = match (
            get("enrolld_persist_commit_seconds_sum"),
            get("enrolld_persist_commit_seconds_count"),
        ) {
            (Some(sum), Some(n)) if n > 0.0 => format!(", mean commit {:.2} ms", 1000.0 * sum / n),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "- server persist (whole run, /metrics): {batches:.0} batches, mean {:.1} rows per batch{commit}",
            rows / batches.max(1.0)
        );
    }
    let shards: Vec<String> = m
        .iter()
        .filter(|(k, _)| k.starts_with("enrolld_shard_requests_total"))
        .map(|(k, v)| format!("{} {v:.0}", k.trim_start_matches("enrolld_shard_requests_total")))
        .collect();
    if !shards.is_empty() {
        let _ = writeln!(s, "- requests per shard (/metrics): {}", shards.join(", "));
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}; load generator on the same cores")
}

/// Answers (and 201s) per second over p99 latency per second, as two stacked charts.
fn chart(path: &Path, points: &[Point]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let e = |e: &dyn std::fmt::Debug| anyhow::anyhow!("{e:?}");
    let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (top, bottom) = root.split_vertically(350);
    let x_max = points.last().map_or(1.0, |p| p.t.ceil().max(1.0));
    let rps_max = points.iter().filter_map(|p| p.answers_per_sec).fold(1.0, f64::max) * 1.1;
    let p99_max = points.iter().filter_map(|p| p.p99_ms).fold(0.1, f64::max) * 1.1;
    let mut rps = ChartBuilder::on(&top)
        .caption(
            "answers per second (blue: all, green: 201 durable seats)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..rps_max)
        .map_err(|x| e(&x))?;
    rps.configure_mesh()
        .x_desc("seconds since the rush began")
        .y_desc("answers/s")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|x| e(&x))?;
    for (series, color) in [
        (segments(points, |p| p.answers_per_sec), &BLUE),
        (segments(points, |p| p.created_per_sec), &GREEN),
    ] {
        for seg in series {
            rps.draw_series(LineSeries::new(seg, color)).map_err(|x| e(&x))?;
        }
    }
    let mut p99 = ChartBuilder::on(&bottom)
        .caption("p99 latency of the answers in each second (ms)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..p99_max)
        .map_err(|x| e(&x))?;
    p99.configure_mesh()
        .x_desc("seconds since the rush began")
        .y_desc("p99 ms")
        .draw()
        .map_err(|x| e(&x))?;
    for seg in segments(points, |p| p.p99_ms) {
        p99.draw_series(LineSeries::new(seg, &RED)).map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// The runs of seconds where `f` has a value, each as (mid-second, value) points.
fn segments(points: &[Point], f: impl Fn(&Point) -> Option<f64>) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for p in points {
        match f(p) {
            Some(v) => out.last_mut().expect("never empty").push((p.t, v)),
            None if !out.last().expect("never empty").is_empty() => out.push(Vec::new()),
            None => {}
        }
    }
    out.retain(|s| !s.is_empty());
    out
}
