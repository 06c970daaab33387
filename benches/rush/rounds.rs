//! `cargo bench --bench rush -- --scenario registration-day`: who wins the seats, people or
//! scripts, in a draw round and then in a first-come round with waitlists.
//!
//! Why: DESIGN.md ("Registration rounds: fairness by design") claims that per-student limits
//! cannot make a first-come rush fair, and that a draw does. This scenario measures it on the
//! real server: the same population (people, and scripts that fire at the opening instant at
//! 50 times a person's rate) meets a round with `draw_at` and then a first-come round with
//! `waitlist_max`, and the report puts the shares of seats and waitlist places side by side.
//! The server's traffic limits are off by default (as in the default rush): they are not what
//! makes a round fair or unfair, and a person's 0.5 requests/s would never meet them anyway.
//!
//! How: it starts `enrolld serve` exactly as the default rush does (`Target::open`: a
//! scratch MariaDB database, `--limits-enabled false` unless `--with-limits`), and gives every
//! client its own student id, token and keep-alive connection. Student ids are
//! `<tag>-u<k>` with people and scripts shuffled over k: nothing the server sees tells them
//! apart but their behaviour. Each client picks one course (Zipf by popularity, `--zipf-s`,
//! the same pick in both rounds) and POSTs until it holds a seat, a waitlist place or an
//! entry, or its round ends. After each round it reads the draw records and the rosters and
//! checks them against every answer a client was given.
//!
//! Must never: count a seat from an answer instead of the roster, report shares from a run
//! whose checks failed without saying so (exit 1, every violation printed), or leave its
//! server or database behind (kept only after a violation, as in the default rush).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use enrolld::ids::{now_ms, rfc3339, StudentId, UnixMs};
use enrolld::net::auth::{Auth, Role};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde_json::Value;
use tokio::time::Instant;

use super::{
    for_each_over_connections, machine, Args, Conn, Target, RETRY_AFTER_SECS_DEFAULT, RETRY_AFTER_SECS_MAX,
    TOKEN_TTL_SECS, VIOLATIONS_SHOWN_MAX,
};

/// Longest wait for a course's draw record after its `draw_at`.
const DRAW_WAIT_MS_MAX: u64 = 30_000;
/// Pause between two polls of a draw record.
const DRAW_POLL_MS: u64 = 100;
/// Least time between creating a round's courses and their opening that is still usable
/// (the scripts connect in it).
const LEAD_MARGIN_MS: i64 = 200;

/// The scenario's own flags (with `--courses`, `--zipf-s`, `--seed`, `--with-limits`,
/// `--shards`, `--server-arg`, `--mysql`, `--client-threads` and `--out` from the rush's).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Scenario registration-day (--scenario registration-day)")]
pub(super) struct RoundsArgs {
    /// People: a human's delay after the opening, then one POST every --person-interval-ms
    /// [default: 2000; 200 in the smoke run]. Here --courses defaults to 20 (4 in the smoke run).
    #[arg(long)]
    people: Option<u32>,
    /// Scripts: the first POST at the opening instant, then --script-speedup times a
    /// person's rate [default: 100; 10 in the smoke run].
    #[arg(long)]
    scripts: Option<u32>,
    /// Capacity of every course [default: 30; 10 in the smoke run].
    #[arg(long)]
    capacity: Option<u32>,
    /// `waitlist_max` of every course, in both rounds [default: 20; 5 in the smoke run].
    #[arg(long)]
    waitlist: Option<u32>,
    /// A person's pause between two POSTs.
    #[arg(long, default_value_t = 2000)]
    person_interval_ms: u64,
    /// How many times a person's rate a script POSTs at.
    #[arg(long, default_value_t = 50)]
    script_speedup: u32,
    /// First-come round: a person's first POST comes uniformly 0..this after the opening.
    #[arg(long, default_value_t = 3000)]
    reaction_ms: u64,
    /// Draw round: seconds from opens_at to draw_at [default: 8; 4 in the smoke run].
    #[arg(long)]
    draw_window_s: Option<u64>,
    /// Draw round: a person's first POST comes uniformly over this first fraction of the window.
    #[arg(long, default_value_t = 0.7)]
    arrival_fraction: f64,
    /// First-come round: seconds from the opening to the end of the round [default: 10; 5].
    #[arg(long)]
    first_come_s: Option<u64>,
    /// Time from creating a round's courses to their opening.
    #[arg(long, default_value_t = 2000)]
    lead_ms: u64,
}

/// The scenario's sizes, resolved (full under `cargo bench`, smoke otherwise).
#[derive(Clone, Debug)]
struct Day {
    people: u32,
    scripts: u32,
    courses: u32,
    capacity: u32,
    waitlist: u32,
    person_interval: Duration,
    script_interval: Duration,
    reaction_ms: u64,
    draw_window_ms: u64,
    arrival_fraction: f64,
    first_come_ms: u64,
    lead_ms: u64,
    zipf_s: f64,
    seed: u64,
}

impl Day {
    fn resolve(args: &Args) -> anyhow::Result<Day> {
        let r = &args.rounds;
        let full = args.bench;
        let pick = |given: Option<u32>, bench: u32, smoke: u32| given.unwrap_or(if full { bench } else { smoke });
        let pick64 = |given: Option<u64>, bench: u64, smoke: u64| given.unwrap_or(if full { bench } else { smoke });
        ensure!(r.script_speedup >= 1, "--script-speedup must be at least 1");
        ensure!(
            (10..=60_000).contains(&r.person_interval_ms),
            "--person-interval-ms must be 10..=60000"
        );
        let day = Day {
            people: pick(r.people, 2_000, 200),
            scripts: pick(r.scripts, 100, 10),
            courses: pick(args.courses, 20, 4),
            capacity: pick(r.capacity, 30, 10),
            waitlist: pick(r.waitlist, 20, 5),
            person_interval: Duration::from_millis(r.person_interval_ms),
            script_interval: Duration::from_micros(r.person_interval_ms * 1000 / r.script_speedup as u64),
            reaction_ms: r.reaction_ms,
            draw_window_ms: 1000 * pick64(r.draw_window_s, 8, 4),
            arrival_fraction: r.arrival_fraction,
            first_come_ms: 1000 * pick64(r.first_come_s, 10, 5),
            lead_ms: r.lead_ms,
            zipf_s: args.zipf_s,
            seed: args.seed,
        };
        ensure!(
            day.people + day.scripts >= 1,
            "--people plus --scripts must be at least 1"
        );
        ensure!((1..=10_000).contains(&day.courses), "--courses must be 1..=10000");
        ensure!(day.capacity <= 100_000, "--capacity must be 0..=100000");
        ensure!(day.waitlist <= 100_000, "--waitlist must be 0..=100000");
        ensure!(day.draw_window_ms >= 1000, "--draw-window-s must be at least 1");
        ensure!(day.first_come_ms >= 1000, "--first-come-s must be at least 1");
        ensure!(
            day.arrival_fraction > 0.0 && day.arrival_fraction <= 1.0,
            "--arrival-fraction must be in (0, 1]"
        );
        ensure!(day.lead_ms >= 1000, "--lead-ms must be at least 1000");
        ensure!(day.zipf_s >= 0.0 && day.zipf_s.is_finite(), "--zipf-s must be >= 0");
        ensure!(
            !args.owner_ports && args.rate.is_none() && args.drop_wave.is_none() && !args.self_check,
            "--owner-ports, --rate, --drop-wave and --self-check belong to the default scenario"
        );
        Ok(day)
    }

    fn clients(&self) -> usize {
        (self.people + self.scripts) as usize
    }

    fn choice(&self) -> String {
        if self.zipf_s == 0.0 {
            "uniform over the courses".into()
        } else {
            format!("Zipf s = {} over the courses (course 0 the most popular)", self.zipf_s)
        }
    }
}

/// `rush --scenario registration-day`: exit 0 when every check passed, 1 otherwise, 2 on a
/// bad flag.
pub(super) fn run(args: Args) -> ExitCode {
    let day = match Day::resolve(&args) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("rush: {e}");
            return ExitCode::from(2);
        }
    };
    if !args.bench {
        eprintln!(
            "rush: registration-day smoke run ({} people, {} scripts, {} courses); `cargo bench --bench rush -- --scenario registration-day` runs the full size",
            day.people, day.scripts, day.courses
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let interruptible = async {
        tokio::select! {
            r = registration_day(&args, &day) => r,
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

async fn registration_day(args: &Args, day: &Day) -> anyhow::Result<bool> {
    let out = args.out_dir();
    let log_dir = out.join("registration-day");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let mut target = Target::open(args, &log_dir)?;
    if args.keep_db {
        target.keep_db_for_inspection();
    }
    let pop = Arc::new(Population::plan(day, &target.secret)?);
    eprintln!(
        "rush: registration day: {} people and {} scripts over {} courses of capacity {} (waitlist {}), target {}",
        day.people, day.scripts, day.courses, day.capacity, day.waitlist, target.addr
    );
    let draw = run_round(target.addr, day, &pop, RoundKind::Draw).await?;
    let first_come = run_round(target.addr, day, &pop, RoundKind::FirstCome).await?;
    let violations: Vec<String> = draw.violations.iter().chain(&first_come.violations).cloned().collect();
    if !violations.is_empty() {
        target.keep_db_for_inspection();
    }
    let md = report(args, day, &target, &pop, &[&draw, &first_come], &violations);
    let path = out.join("registration-day.md");
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    println!("{md}");
    for v in violations.iter().take(VIOLATIONS_SHOWN_MAX) {
        eprintln!("INVARIANT VIOLATED: {v}");
    }
    if !violations.is_empty() {
        eprintln!("rush: registration day FAILED with {} violations", violations.len());
    }
    eprintln!("rush: wrote {} (server log in {})", path.display(), log_dir.display());
    Ok(violations.is_empty())
}

// ---------------------------------------------------------------------------------------
// The population
// ---------------------------------------------------------------------------------------

/// One simulated client: a person or a script, told apart only by how it behaves.
struct Client {
    id: String,
    token: String,
    script: bool,
    /// The course index it wants, in both rounds.
    course: usize,
    /// Its first POST after the opening, per round (0 for a script).
    delay_draw_ms: u64,
    delay_first_come_ms: u64,
}

struct Population {
    tag: String,
    clients: Vec<Client>,
    index: HashMap<String, usize>,
    admin_token: String,
}

impl Population {
    fn plan(day: &Day, secret: &str) -> anyhow::Result<Population> {
        let mut rng = StdRng::seed_from_u64(day.seed);
        let tag = format!("day{:06x}", rand::random::<u32>() & 0xff_ffff);
        let mut scripts: Vec<bool> = (0..day.clients()).map(|i| i >= day.people as usize).collect();
        scripts.shuffle(&mut rng);
        let zipf = Zipf::new(day.courses as u64, day.zipf_s).map_err(|e| anyhow::anyhow!("zipf: {e:?}"))?;
        let auth = Auth::new(secret.as_bytes());
        let arrival_ms_max = (day.draw_window_ms as f64 * day.arrival_fraction) as u64;
        let mut clients = Vec::with_capacity(day.clients());
        for (k, &script) in scripts.iter().enumerate() {
            let id = format!("{tag}-u{k}");
            let sid = StudentId::parse(&id).context("student id")?;
            let course = (zipf.sample(&mut rng) as usize).clamp(1, day.courses as usize) - 1;
            let (delay_draw_ms, delay_first_come_ms) = if script {
                (0, 0)
            } else {
                (rng.gen_range(0..=arrival_ms_max), rng.gen_range(0..=day.reaction_ms))
            };
            clients.push(Client {
                token: auth.mint(&sid, Role::Student, TOKEN_TTL_SECS),
                id,
                script,
                course,
                delay_draw_ms,
                delay_first_come_ms,
            });
        }
        let index = clients.iter().enumerate().map(|(i, c)| (c.id.clone(), i)).collect();
        let admin = StudentId::parse("rush-admin").expect("valid id");
        Ok(Population {
            tag,
            clients,
            index,
            admin_token: auth.mint(&admin, Role::Admin, TOKEN_TTL_SECS),
        })
    }
}

// ---------------------------------------------------------------------------------------
// A round
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RoundKind {
    Draw,
    FirstCome,
}

impl RoundKind {
    fn name(self) -> &'static str {
        match self {
            RoundKind::Draw => "draw",
            RoundKind::FirstCome => "first-come",
        }
    }
}

/// What a client ended a round holding, as it was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Told {
    /// Its last answer refused it (409, 403): it holds nothing.
    Nothing,
    /// An answer was lost after its last refusal: it may hold anything.
    Unknown,
    Seat,
    Waitlisted(u64),
    Entered,
}

/// One client's round.
struct ClientLog {
    sent: u64,
    /// Answers by status.
    answers: BTreeMap<u16, u64>,
    /// Requests whose answer never came (connection lost), and failed connects.
    lost: u64,
    connect_errors: u64,
    told: Told,
    /// Milliseconds from the opening to the answer that placed it.
    placed_ms: Option<i64>,
    /// Answers no correct server gives.
    bad: Vec<String>,
}

/// What a round measured and checked.
struct RoundResult {
    kind: RoundKind,
    course_ids: Vec<String>,
    opens_ms: UnixMs,
    end_ms: UnixMs,
    logs: Vec<ClientLog>,
    /// Per course: roster students and waitlist, in the server's order.
    rosters: Vec<(Vec<String>, Vec<String>)>,
    /// Draw round: per course, the recorded order and its seats and waitlist places.
    draws: Vec<Option<DrawSeen>>,
    violations: Vec<String>,
}

struct DrawSeen {
    order: Vec<String>,
    seats: usize,
    waitlisted: usize,
    /// Milliseconds from draw_at to drawn_at.
    late_ms: i64,
}

async fn run_round(addr: SocketAddr, day: &Day, pop: &Arc<Population>, kind: RoundKind) -> anyhow::Result<RoundResult> {
    let opens_ms = whole_second_after(now_ms() + day.lead_ms as i64);
    let end_ms = opens_ms
        + match kind {
            RoundKind::Draw => day.draw_window_ms,
            RoundKind::FirstCome => day.first_come_ms,
        } as i64;
    let round = match kind {
        RoundKind::Draw => "r1",
        RoundKind::FirstCome => "r2",
    };
    let course_ids: Arc<Vec<String>> =
        Arc::new((0..day.courses).map(|c| format!("{}-{round}-c{c}", pop.tag)).collect());
    create_courses(addr, day, pop, &course_ids, kind, opens_ms, end_ms).await?;
    let left_ms = opens_ms - now_ms();
    ensure!(
        left_ms >= LEAD_MARGIN_MS,
        "creating the {} round's courses took until {left_ms} ms before their opening; raise --lead-ms",
        kind.name()
    );
    eprintln!(
        "rush: {} round: opens {}, {} {}",
        kind.name(),
        rfc3339(opens_ms),
        match kind {
            RoundKind::Draw => "draw_at",
            RoundKind::FirstCome => "ends",
        },
        rfc3339(end_ms)
    );
    let logs = run_clients(addr, day, pop, &course_ids, kind, opens_ms, end_ms).await?;
    let mut admin = Conn::open_retrying(addr).await?;
    let draws = match kind {
        RoundKind::Draw => await_draws(&mut admin, pop, &course_ids, end_ms).await?,
        RoundKind::FirstCome => (0..course_ids.len()).map(|_| None).collect(),
    };
    let (rosters, counts) = read_rosters(addr, pop, &course_ids).await?;
    let mut result = RoundResult {
        kind,
        course_ids: course_ids.to_vec(),
        opens_ms,
        end_ms,
        logs,
        rosters,
        draws,
        violations: Vec::new(),
    };
    result.violations = check_round(day, pop, &result, &counts);
    eprintln!(
        "rush: {} round checked: {} violations",
        kind.name(),
        result.violations.len()
    );
    Ok(result)
}

fn whole_second_after(ms: UnixMs) -> UnixMs {
    (ms + 999) / 1000 * 1000
}

async fn create_courses(
    addr: SocketAddr,
    day: &Day,
    pop: &Arc<Population>,
    course_ids: &Arc<Vec<String>>,
    kind: RoundKind,
    opens_ms: UnixMs,
    end_ms: UnixMs,
) -> anyhow::Result<()> {
    let (ids, pop, day) = (course_ids.clone(), pop.clone(), day.clone());
    for_each_over_connections(addr, ids.len(), move |mut conn, i| {
        let (ids, pop, day) = (ids.clone(), pop.clone(), day.clone());
        async move {
            let mut body = serde_json::json!({
                "title": format!("Registration day, {} round, course {i}", kind.name()),
                "capacity": day.capacity,
                "opens_at": rfc3339(opens_ms),
                "waitlist_max": day.waitlist,
            });
            if kind == RoundKind::Draw {
                body["draw_at"] = rfc3339(end_ms).into();
            }
            let id = &ids[i];
            let (status, resp) = conn
                .request(
                    "PUT",
                    &format!("/v1/admin/courses/{id}"),
                    &pop.admin_token,
                    &body.to_string(),
                )
                .await?;
            ensure!(
                status == 201,
                "PUT course {id}: {status} {}",
                String::from_utf8_lossy(&resp)
            );
            Ok((conn, ()))
        }
    })
    .await?;
    Ok(())
}

/// Every client's round, each on its own task and keep-alive connection.
async fn run_clients(
    addr: SocketAddr,
    day: &Day,
    pop: &Arc<Population>,
    course_ids: &Arc<Vec<String>>,
    kind: RoundKind,
    opens_ms: UnixMs,
    end_ms: UnixMs,
) -> anyhow::Result<Vec<ClientLog>> {
    let opens = instant_of(opens_ms);
    let end = instant_of(end_ms);
    let mut tasks = Vec::with_capacity(pop.clients.len());
    for i in 0..pop.clients.len() {
        let (pop, ids) = (pop.clone(), course_ids.clone());
        let c = &pop.clients[i];
        let (delay_ms, interval) = match (c.script, kind) {
            (true, _) => (0, day.script_interval),
            (false, RoundKind::Draw) => (c.delay_draw_ms, day.person_interval),
            (false, RoundKind::FirstCome) => (c.delay_first_come_ms, day.person_interval),
        };
        let first = opens + Duration::from_millis(delay_ms);
        tasks.push(tokio::spawn(async move {
            let c = &pop.clients[i];
            let path = format!("/v1/courses/{}/enrollment", ids[c.course]);
            // A script is connected and waiting when the round opens; a person connects
            // when they come.
            let preconnect = c.script;
            client_round(addr, &path, &c.token, preconnect, first, interval, opens, end).await
        }));
    }
    let mut logs = Vec::with_capacity(tasks.len());
    for t in tasks {
        logs.push(t.await.context("a client task")?);
    }
    Ok(logs)
}

/// The tokio instant of a unix-ms time (the server reads the same clock).
fn instant_of(ms: UnixMs) -> Instant {
    let (now_i, now) = (Instant::now(), now_ms());
    if ms > now {
        now_i + Duration::from_millis((ms - now) as u64)
    } else {
        now_i
    }
}

/// A client's loop: POSTs from `first`, one every `interval` (or the server's Retry-After
/// on a 429/503, if longer), until an answer places it or `end` comes. Never sends after
/// `end`; an answer to a request sent before it is awaited.
#[allow(clippy::too_many_arguments)]
async fn client_round(
    addr: SocketAddr,
    path: &str,
    token: &str,
    preconnect: bool,
    first: Instant,
    interval: Duration,
    opens: Instant,
    end: Instant,
) -> ClientLog {
    let mut log = ClientLog {
        sent: 0,
        answers: BTreeMap::new(),
        lost: 0,
        connect_errors: 0,
        told: Told::Nothing,
        placed_ms: None,
        bad: Vec::new(),
    };
    let mut conn = None;
    if preconnect {
        match Conn::open(addr).await {
            Ok(c) => conn = Some(c),
            Err(_) => log.connect_errors += 1,
        }
    }
    let mut maybe_holds = false;
    let mut next = first;
    while next < end {
        tokio::time::sleep_until(next).await;
        let sent_at = Instant::now();
        let mut wait = interval;
        if conn.is_none() {
            match Conn::open(addr).await {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    log.connect_errors += 1;
                    next = sent_at + wait;
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected above");
        log.sent += 1;
        match c.request_once("POST", path, token, "").await {
            Ok((status, retry_after, body)) => {
                *log.answers.entry(status).or_default() += 1;
                match classify(status, &body) {
                    Ok(Some(told)) => {
                        log.told = told;
                        log.placed_ms = Some(Instant::now().saturating_duration_since(opens).as_millis() as i64);
                        return log;
                    }
                    Ok(None) if matches!(status, 409 | 403) => maybe_holds = false,
                    Ok(None) => {
                        let secs = retry_after
                            .unwrap_or(RETRY_AFTER_SECS_DEFAULT)
                            .min(RETRY_AFTER_SECS_MAX);
                        wait = wait.max(Duration::from_secs(secs));
                    }
                    Err(bad) => log.bad.push(format!("POST {path}: {bad}")),
                }
            }
            Err(_) => {
                // Sent, and no answer: it may have been recorded. The next POST tells.
                log.lost += 1;
                maybe_holds = true;
                conn = None;
            }
        }
        next = sent_at + wait;
    }
    log.told = if maybe_holds { Told::Unknown } else { Told::Nothing };
    log
}

/// What an answer to an enrollment POST tells: `Ok(Some)` placed, `Ok(None)` not (yet),
/// `Err` an answer no correct server gives.
fn classify(status: u16, body: &[u8]) -> Result<Option<Told>, String> {
    let json =
        || serde_json::from_slice::<Value>(body).map_err(|e| format!("{status} with a body that is not JSON ({e})"));
    match status {
        200 | 201 => {
            let j = json()?;
            match j["status"].as_str() {
                Some("enrolled") => Ok(Some(Told::Seat)),
                _ => Err(format!("{status} {j}: status is not enrolled")),
            }
        }
        202 => {
            let j = json()?;
            match (j["status"].as_str(), j["position"].as_u64()) {
                (Some("entered"), _) => Ok(Some(Told::Entered)),
                (Some("waitlisted"), Some(p)) if p >= 1 => Ok(Some(Told::Waitlisted(p))),
                _ => Err(format!("202 {j}: neither entered nor waitlisted with a position")),
            }
        }
        409 | 403 | 429 | 503 => Ok(None),
        other => Err(format!("{other} {}", String::from_utf8_lossy(body))),
    }
}

/// Polls every course's draw record until it exists (at most `DRAW_WAIT_MS_MAX` after
/// `draw_at_ms`).
async fn await_draws(
    admin: &mut Conn,
    pop: &Population,
    course_ids: &[String],
    draw_at_ms: UnixMs,
) -> anyhow::Result<Vec<Option<DrawSeen>>> {
    let mut draws: Vec<Option<DrawSeen>> = (0..course_ids.len()).map(|_| None).collect();
    let deadline_ms = draw_at_ms + DRAW_WAIT_MS_MAX as i64;
    for (c, id) in course_ids.iter().enumerate() {
        loop {
            let (status, body) = admin
                .request("GET", &format!("/v1/admin/courses/{id}/draw"), &pop.admin_token, "")
                .await?;
            match status {
                200 => {
                    let j: Value = serde_json::from_slice(&body).context("draw record JSON")?;
                    draws[c] = Some(draw_seen(&j, draw_at_ms).with_context(|| format!("draw record of {id}: {j}"))?);
                    break;
                }
                404 if now_ms() < deadline_ms => {
                    tokio::time::sleep(Duration::from_millis(DRAW_POLL_MS)).await;
                }
                _ => bail!(
                    "draw record of {id}: {status} {} ({} ms after draw_at)",
                    String::from_utf8_lossy(&body),
                    now_ms() - draw_at_ms
                ),
            }
        }
    }
    Ok(draws)
}

fn draw_seen(j: &Value, draw_at_ms: UnixMs) -> anyhow::Result<DrawSeen> {
    let order = strings(&j["order"]).context("order")?;
    let seats = j["seats"].as_u64().context("seats")? as usize;
    let waitlisted = j["waitlisted"].as_u64().context("waitlisted")? as usize;
    let entries = j["entries"].as_u64().context("entries")? as usize;
    let seed = j["seed"].as_str().context("seed")?;
    let drawn_at = j["drawn_at"]
        .as_str()
        .and_then(enrolld::ids::parse_rfc3339)
        .context("drawn_at")?;
    ensure!(
        entries == order.len(),
        "entries {entries} but an order of {}",
        order.len()
    );
    ensure!(
        seats + waitlisted <= order.len(),
        "{seats} seats and {waitlisted} waitlisted from {} entries",
        order.len()
    );
    ensure!(
        replay(&order, seed)? == order,
        "the order is not the entrants in id order shuffled from the recorded seed"
    );
    Ok(DrawSeen {
        order,
        seats,
        waitlisted,
        late_ms: drawn_at - draw_at_ms,
    })
}

/// The order a draw of these entrants with this seed makes (the shard's own shuffle).
fn replay(order: &[String], seed_hex: &str) -> anyhow::Result<Vec<String>> {
    ensure!(
        seed_hex.len() == 64 && seed_hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "the seed is not 32 bytes in hex: {seed_hex:?}"
    );
    let mut seed = [0u8; 32];
    for (i, b) in seed.iter_mut().enumerate() {
        *b = u8::from_str_radix(&seed_hex[2 * i..2 * i + 2], 16).expect("checked hex");
    }
    let mut entrants: Vec<StudentId> = order
        .iter()
        .map(|s| StudentId::parse(s).with_context(|| format!("{s:?} is not a student id")))
        .collect::<anyhow::Result<_>>()?;
    entrants.sort_unstable();
    enrolld::shard::course::shuffle_entries(&mut entrants, seed);
    Ok(entrants.iter().map(|s| s.as_str().to_string()).collect())
}

fn strings(v: &Value) -> anyhow::Result<Vec<String>> {
    v.as_array()
        .context("not an array")?
        .iter()
        .map(|s| s.as_str().map(str::to_string).context("not a string"))
        .collect()
}

/// Per course: (students, waitlist) from the roster, and (enrolled, waitlisted) from GET.
type Rosters = (Vec<(Vec<String>, Vec<String>)>, Vec<(u64, u64)>);

async fn read_rosters(
    addr: SocketAddr,
    pop: &Arc<Population>,
    course_ids: &Arc<Vec<String>>,
) -> anyhow::Result<Rosters> {
    let (ids, pop) = (course_ids.clone(), pop.clone());
    let both = for_each_over_connections(addr, ids.len(), move |mut conn, i| {
        let (ids, pop) = (ids.clone(), pop.clone());
        async move {
            let id = &ids[i];
            let (status, body) = conn
                .request("GET", &format!("/v1/admin/courses/{id}/roster"), &pop.admin_token, "")
                .await?;
            ensure!(
                status == 200,
                "roster of {id}: {status} {}",
                String::from_utf8_lossy(&body)
            );
            let j: Value = serde_json::from_slice(&body).context("roster JSON")?;
            let roster = (
                strings(&j["students"]).with_context(|| format!("students of {id}: {j}"))?,
                strings(&j["waitlist"]).with_context(|| format!("waitlist of {id}: {j}"))?,
            );
            let (status, body) = conn
                .request("GET", &format!("/v1/courses/{id}"), &pop.admin_token, "")
                .await?;
            ensure!(
                status == 200,
                "GET course {id}: {status} {}",
                String::from_utf8_lossy(&body)
            );
            let j: Value = serde_json::from_slice(&body).context("course JSON")?;
            let counts = (
                j["enrolled"]
                    .as_u64()
                    .with_context(|| format!("enrolled of {id}: {j}"))?,
                j["waitlisted"]
                    .as_u64()
                    .with_context(|| format!("waitlisted of {id}: {j}"))?,
            );
            Ok((conn, (roster, counts)))
        }
    })
    .await?;
    Ok(both.into_iter().unzip())
}

// ---------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------

/// Every course of a round against its capacity, its waitlist room, its draw record and
/// every answer its clients were given.
fn check_round(day: &Day, pop: &Population, r: &RoundResult, counts: &[(u64, u64)]) -> Vec<String> {
    let mut bad = Vec::new();
    for (i, log) in r.logs.iter().enumerate() {
        for b in &log.bad {
            bad.push(format!(
                "{} round, {}: answer no correct server gives: {b}",
                r.kind.name(),
                pop.clients[i].id
            ));
        }
    }
    for (c, &count) in counts.iter().enumerate() {
        check_course(day, pop, r, c, count, &mut bad);
    }
    bad
}

fn check_course(day: &Day, pop: &Population, r: &RoundResult, c: usize, counts: (u64, u64), bad: &mut Vec<String>) {
    let id = &r.course_ids[c];
    let at = |what: String| format!("{} round, {id}: {what}", r.kind.name());
    let (students, waitlist) = &r.rosters[c];
    if students.len() > day.capacity as usize {
        bad.push(at(format!(
            "{} enrolled, over the capacity {}",
            students.len(),
            day.capacity
        )));
    }
    if waitlist.len() > day.waitlist as usize {
        bad.push(at(format!(
            "{} waiting, over waitlist_max {}",
            waitlist.len(),
            day.waitlist
        )));
    }
    if counts != (students.len() as u64, waitlist.len() as u64) {
        bad.push(at(format!(
            "GET says {} enrolled and {} waitlisted; the roster has {} and {}",
            counts.0,
            counts.1,
            students.len(),
            waitlist.len()
        )));
    }
    let seated: HashSet<&str> = students.iter().map(String::as_str).collect();
    let waiting: HashSet<&str> = waitlist.iter().map(String::as_str).collect();
    if seated.len() != students.len() || waiting.len() != waitlist.len() {
        bad.push(at("a student listed twice in the roster or the waitlist".into()));
    }
    for s in seated.intersection(&waiting) {
        bad.push(at(format!("{s} both enrolled and waitlisted")));
    }
    for s in students.iter().chain(waitlist) {
        match pop.index.get(s) {
            Some(&i) if pop.clients[i].course == c && r.logs[i].sent > 0 => {}
            _ => bad.push(at(format!("{s} is placed but never asked for this course"))),
        }
    }
    let draw = r.draws[c].as_ref();
    if r.kind == RoundKind::Draw {
        match draw {
            Some(d) => check_draw(day, pop, r, c, d, students, waitlist, &at, bad),
            None => bad.push(at("no draw record".into())),
        }
    }
    let place_in_draw: HashMap<&str, usize> = draw
        .map(|d| d.order.iter().enumerate().map(|(k, s)| (s.as_str(), k)).collect())
        .unwrap_or_default();
    for (i, client) in pop.clients.iter().enumerate().filter(|(_, cl)| cl.course == c) {
        let s = client.id.as_str();
        let found = (
            seated.contains(s),
            waitlist.iter().position(|w| w == s).map(|p| p as u64 + 1),
        );
        let ok = match r.logs[i].told {
            Told::Unknown => true,
            Told::Nothing => found == (false, None),
            Told::Seat => found == (true, None),
            Told::Waitlisted(p) => found == (false, Some(p)),
            Told::Entered => match (draw, place_in_draw.get(s)) {
                (Some(d), Some(&k)) if k < d.seats => found.0 && found.1.is_none(),
                (Some(d), Some(&k)) if k < d.seats + d.waitlisted => {
                    !found.0 && found.1 == Some((k - d.seats) as u64 + 1)
                }
                (Some(_), Some(_)) => found == (false, None),
                _ => false,
            },
        };
        if !ok {
            bad.push(at(format!(
                "{s} was told {:?} but is found enrolled = {}, waitlist position = {:?}, drawn at {:?}",
                r.logs[i].told,
                found.0,
                found.1,
                place_in_draw.get(s)
            )));
        }
    }
}

/// The record is a draw of exactly this course's entries, cut as the course's room says,
/// and the roster and waitlist begin as it cut them.
#[allow(clippy::too_many_arguments)]
fn check_draw(
    day: &Day,
    pop: &Population,
    r: &RoundResult,
    c: usize,
    d: &DrawSeen,
    students: &[String],
    waitlist: &[String],
    at: &dyn Fn(String) -> String,
    bad: &mut Vec<String>,
) {
    let drawn: HashSet<&str> = d.order.iter().map(String::as_str).collect();
    if drawn.len() != d.order.len() {
        bad.push(at("a student drawn twice".into()));
    }
    for s in &d.order {
        match pop.index.get(s) {
            Some(&i) if pop.clients[i].course == c && r.logs[i].sent > 0 => {}
            _ => bad.push(at(format!("{s} was drawn but never asked for this course"))),
        }
    }
    let seats = (day.capacity as usize).min(d.order.len());
    let waits = (day.waitlist as usize).min(d.order.len() - seats);
    if (d.seats, d.waitlisted) != (seats, waits) {
        bad.push(at(format!(
            "the draw of {} entries gave {} seats and {} waitlist places, not {seats} and {waits}",
            d.order.len(),
            d.seats,
            d.waitlisted
        )));
    }
    let seated: HashSet<&str> = students.iter().map(String::as_str).collect();
    for s in &d.order[..d.seats.min(d.order.len())] {
        if !seated.contains(s.as_str()) {
            bad.push(at(format!("{s} won a seat in the draw and is not on the roster")));
        }
    }
    let drawn_waits = &d.order[d.seats.min(d.order.len())..(d.seats + d.waitlisted).min(d.order.len())];
    if !waitlist.starts_with(drawn_waits) {
        bad.push(at(format!(
            "the waitlist does not begin with the drawn order: {waitlist:?} vs {drawn_waits:?}"
        )));
    }
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

/// People and scripts, counted.
#[derive(Clone, Copy, Default)]
struct Split {
    people: u64,
    scripts: u64,
}

impl Split {
    fn add(&mut self, script: bool, n: u64) {
        if script {
            self.scripts += n;
        } else {
            self.people += n;
        }
    }
    fn total(self) -> u64 {
        self.people + self.scripts
    }
    /// `n (p%)` of people and of scripts, each as a share of the total.
    fn shares(self) -> (String, String) {
        let t = self.total().max(1) as f64;
        (
            format!("{} ({:.1}%)", self.people, 100.0 * self.people as f64 / t),
            format!("{} ({:.1}%)", self.scripts, 100.0 * self.scripts as f64 / t),
        )
    }
}

/// A round's figures by group.
struct Tally {
    seats: Split,
    waitlist: Split,
    entries: Option<Split>,
    requests: Split,
    lost: u64,
    connect_errors: u64,
    answers: BTreeMap<u16, Split>,
    /// Per course: seats, waitlist places and the clients that wanted it, by group.
    per_course: Vec<(Split, Split, Split)>,
    /// Per course: ms from the opening to the answer that gave its last seat, when full.
    filled_ms: Vec<Option<i64>>,
}

fn tally(day: &Day, pop: &Population, r: &RoundResult) -> Tally {
    let group = |s: &str| pop.index.get(s).map(|&i| pop.clients[i].script);
    let mut t = Tally {
        seats: Split::default(),
        waitlist: Split::default(),
        entries: r.draws.iter().any(Option::is_some).then(Split::default),
        requests: Split::default(),
        lost: 0,
        connect_errors: 0,
        answers: BTreeMap::new(),
        per_course: vec![(Split::default(), Split::default(), Split::default()); r.course_ids.len()],
        filled_ms: vec![None; r.course_ids.len()],
    };
    for (c, (students, waitlist)) in r.rosters.iter().enumerate() {
        for s in students.iter().filter_map(|s| group(s)) {
            t.seats.add(s, 1);
            t.per_course[c].0.add(s, 1);
        }
        for s in waitlist.iter().filter_map(|s| group(s)) {
            t.waitlist.add(s, 1);
            t.per_course[c].1.add(s, 1);
        }
        if let (Some(e), Some(d)) = (t.entries.as_mut(), &r.draws[c]) {
            for s in d.order.iter().filter_map(|s| group(s)) {
                e.add(s, 1);
            }
        }
        if students.len() >= day.capacity as usize && r.kind == RoundKind::FirstCome {
            t.filled_ms[c] = students
                .iter()
                .filter_map(|s| pop.index.get(s))
                .filter_map(|&i| r.logs[i].placed_ms)
                .max();
        }
    }
    for (i, log) in r.logs.iter().enumerate() {
        let script = pop.clients[i].script;
        t.requests.add(script, log.sent);
        t.lost += log.lost;
        t.connect_errors += log.connect_errors;
        t.per_course[pop.clients[i].course].2.add(script, 1);
        for (&status, &n) in &log.answers {
            t.answers.entry(status).or_default().add(script, n);
        }
    }
    t
}

fn report(
    args: &Args,
    day: &Day,
    target: &Target,
    pop: &Population,
    rounds: &[&RoundResult],
    violations: &[String],
) -> String {
    let tallies: Vec<Tally> = rounds.iter().map(|r| tally(day, pop, r)).collect();
    let mut s = String::new();
    let verdict = if violations.is_empty() { "PASS" } else { "FAIL" };
    let _ = writeln!(
        s,
        "## Registration day: a draw round, then a first-come round with waitlists ({verdict})\n"
    );
    setup_lines(&mut s, args, day, target, rounds);
    side_by_side(&mut s, day, &tallies);
    per_course(&mut s, rounds, &tallies);
    let _ = writeln!(s, "### Invariants\n");
    let _ = writeln!(
        s,
        "Checked per course after each round: enrolled <= capacity, waitlist <= waitlist_max, nobody both enrolled and waitlisted or listed twice, GET's counts == the roster, everyone placed asked for the course; every client told 201/200 is enrolled, told 202 waitlisted is at the position it was told, told 202 entered is in the draw and placed where the draw put it, and one whose last answer was 409/403 holds nothing; each draw record drew each entrant once, cut min(capacity, entries) seats and min(waitlist_max, rest) waitlist places, replays from its seed with the shard's shuffle, and the roster and waitlist begin as it cut them."
    );
    if violations.is_empty() {
        let _ = writeln!(s, "\n**All invariants hold.**");
    } else {
        let _ = writeln!(s, "\n**FAILED: {} violations.**\n", violations.len());
        for v in violations.iter().take(VIOLATIONS_SHOWN_MAX) {
            let _ = writeln!(s, "- {v}");
        }
    }
    s
}

fn setup_lines(s: &mut String, args: &Args, day: &Day, target: &Target, rounds: &[&RoundResult]) {
    let command: Vec<String> = std::env::args().collect();
    let round_line = |r: &RoundResult| {
        match r.kind {
        RoundKind::Draw => {
            let late: Vec<i64> = r.draws.iter().flatten().map(|d| d.late_ms).collect();
            format!(
                "draw round: opens_at {}, draw_at {} ({} s window; people's first POST uniform over its first {:.0}%); clients stop sending at draw_at; the draws ran {}-{} ms after draw_at",
                rfc3339(r.opens_ms),
                rfc3339(r.end_ms),
                day.draw_window_ms / 1000,
                100.0 * day.arrival_fraction,
                late.iter().min().copied().unwrap_or(0),
                late.iter().max().copied().unwrap_or(0)
            )
        }
        RoundKind::FirstCome => format!(
            "first-come round: fresh courses, no draw_at; opens_at {}, clients stop sending at {} ({} s); people's first POST uniform 0-{} ms after the opening",
            rfc3339(r.opens_ms),
            rfc3339(r.end_ms),
            day.first_come_ms / 1000,
            day.reaction_ms
        ),
    }
    };
    let lines = [
        format!("command: `{}`", command.join(" ")),
        format!("date (UTC): {}", rfc3339(now_ms())),
        format!("machine: {}", machine()),
        format!("target: {}", target.description),
        format!(
            "traffic limits: {} (they are not what makes a round fair or unfair)",
            if args.with_limits { "on (--with-limits)" } else { "off (--limits-enabled false)" }
        ),
        format!(
            "population: {} people and {} scripts, one student id, token and keep-alive connection each; ids carry no sign of which is which",
            day.people, day.scripts
        ),
        format!("course choice: one course each, {}, the same in both rounds; seed {}", day.choice(), day.seed),
        format!(
            "a person: one POST every {} ms until a seat, a waitlist place or an entry, or the round ends; a script: first POST at the opening instant (connected beforehand), then one every {} ms ({} x a person's rate); both wait a 429/503's Retry-After when longer",
            day.person_interval.as_millis(),
            day.script_interval.as_micros() as f64 / 1000.0,
            args.rounds.script_speedup
        ),
        format!(
            "courses: {} per round, capacity {}, waitlist_max {}",
            day.courses, day.capacity, day.waitlist
        ),
    ];
    for l in lines.iter().cloned().chain(rounds.iter().map(|r| round_line(r))) {
        let _ = writeln!(s, "- {l}");
    }
    let _ = writeln!(s);
}

fn side_by_side(s: &mut String, day: &Day, t: &[Tally]) {
    let (draw, fc) = (&t[0], &t[1]);
    let capacity = day.courses as u64 * day.capacity as u64;
    let places = day.courses as u64 * day.waitlist as u64;
    let pct = |n: u64, d: u64| format!("{:.1}%", 100.0 * n as f64 / d.max(1) as f64);
    let population = day.people as u64 + day.scripts as u64;
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let mut both = |name: &str, f: &dyn Fn(&Tally) -> String| rows.push((name.to_string(), f(draw), f(fc)));
    both("seats filled (of capacity)", &|x| {
        format!("{} of {capacity}", x.seats.total())
    });
    both("seats won by people", &|x| x.seats.shares().0);
    both("seats won by scripts", &|x| x.seats.shares().1);
    both("scripts' share of the population", &|_| {
        pct(day.scripts as u64, population)
    });
    both("waitlist places taken (of room)", &|x| {
        format!("{} of {places}", x.waitlist.total())
    });
    both("waitlist places: people", &|x| x.waitlist.shares().0);
    both("waitlist places: scripts", &|x| x.waitlist.shares().1);
    both("a person's chance of a seat", &|x| {
        pct(x.seats.people, day.people as u64)
    });
    both("a script's chance of a seat", &|x| {
        pct(x.seats.scripts, day.scripts as u64)
    });
    both("draw entries: people / scripts", &|x| {
        x.entries
            .map_or("-".into(), |e| format!("{} / {}", e.people, e.scripts))
    });
    both("requests sent by people", &|x| x.requests.people.to_string());
    both("requests sent by scripts", &|x| x.requests.scripts.to_string());
    both("answers (people / scripts)", &|x| {
        x.answers
            .iter()
            .map(|(st, n)| format!("{st}: {} / {}", n.people, n.scripts))
            .collect::<Vec<_>>()
            .join("; ")
    });
    both("answers lost / failed connects", &|x| {
        format!("{} / {}", x.lost, x.connect_errors)
    });
    let _ = writeln!(s, "### Both rounds side by side\n");
    let _ = writeln!(s, "| | draw round | first-come round |\n|---|---|---|");
    for (name, a, b) in rows {
        let _ = writeln!(s, "| {name} | {a} | {b} |");
    }
    let _ = writeln!(s);
}

fn per_course(s: &mut String, rounds: &[&RoundResult], t: &[Tally]) {
    let _ = writeln!(s, "### Per course (people / scripts)\n");
    let _ = writeln!(
        s,
        "| course | wanted by | draw: seats | draw: waitlist | first-come: seats | first-come: waitlist | first-come: last seat taken after |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    let ps = |x: Split| format!("{} / {}", x.people, x.scripts);
    for c in 0..rounds[0].course_ids.len() {
        let (d, f) = (&t[0].per_course[c], &t[1].per_course[c]);
        let filled = t[1].filled_ms[c].map_or("not full".into(), |ms| format!("{ms} ms"));
        let _ = writeln!(
            s,
            "| {c} | {} | {} | {} | {} | {} | {filled} |",
            ps(d.2),
            ps(d.0),
            ps(d.1),
            ps(f.0),
            ps(f.1)
        );
    }
    let _ = writeln!(s);
}
