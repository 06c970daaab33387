//! `enrolld events follow`: the consumer of the change feed (`GET /v1/admin/events`). It
//! prints every event as one JSON line and, with `--exec`, hands each one to a command,
//! keeping its place (the cursor) in a file.
//!
//! Why: billing, the learning platform and the mailer each need every committed change,
//! and the feed's promise (nothing missed, nothing twice) is easiest to break in the
//! consumer: save the cursor before the side effect and a crash loses an event; move past
//! an event whose handler failed and it is lost for good. This is that consumer, written
//! once. Delivery is at least once: a crash after a command succeeded and before its
//! cursor was saved runs that event again, so a command makes its side effect idempotent
//! with the event's `cursor` (unique and stable) as its key.
//!
//! Must never: save a cursor past an event that was not printed or, with `--exec`, whose
//! command has not exited 0; skip an event; read meaning into a cursor (cursors are
//! opaque: the server's text goes back to it as it came); wait on the server without a
//! bound; hand the command the secret it mints tokens with.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context;

use crate::ids::StudentId;
use crate::net::auth::{Auth, Role};

pub const URL_DEFAULT: &str = "http://127.0.0.1:8080";
pub const LIMIT_DEFAULT: u32 = 100;
pub const WAIT_MS_DEFAULT: u64 = 25_000;

/// Time a feed request may take beyond its `wait_ms` before it is given up and retried.
const REQUEST_SLACK_MS: u64 = 10_000;
const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Retries (of a feed request, or of an event's command) wait this long first, doubling
/// up to the max.
const BACKOFF_MS_MIN: u64 = 100;
const BACKOFF_MS_MAX: u64 = 30_000;
const _: () = assert!(BACKOFF_MS_MIN > 0 && BACKOFF_MS_MIN <= BACKOFF_MS_MAX);
/// Lifetime of the admin token minted for each request (checked only when a request
/// arrives, so it need only cover clock skew).
const TOKEN_TTL_SECS: u64 = 300;
/// The subject of the minted tokens, as the server's logs show it.
const TOKEN_SUB: &str = "enrolld-follow";
/// With `--once`, tries of a feed request that failed for a passing reason (a cron job
/// must end).
const ONCE_TRIES_MAX: u32 = 5;
/// Characters of a refusal's body quoted when it carries no `message`.
const REFUSAL_QUOTE_CHARS_MAX: usize = 200;

/// How each request is authorized.
pub enum Credentials {
    /// Sent as it is (`--token`).
    Token(String),
    /// A short-lived admin token is minted with it for each request.
    Secret(Vec<u8>),
}

pub struct Options {
    pub url: String,
    pub after: Option<String>,
    pub cursor_file: Option<PathBuf>,
    pub exec: Option<String>,
    pub limit: u32,
    pub wait_ms: u64,
    pub once: bool,
    pub credentials: Credentials,
}

/// Why following stopped; [`FollowError::exit_code`] is the process's exit code.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// A bad flag or cursor file: nothing was read.
    #[error("{0}")]
    Usage(String),
    /// The server refused the request; asking again cannot help.
    #[error("the server refused the feed request ({status}): {message}{hint}")]
    Refused { status: u16, message: String, hint: String },
    #[error(
        "cursor {cursor} is older than the oldest event the server keeps (410 cursor_expired, see \
         events_retention_days): the events after it were trimmed before this consumer read them. \
         Reconcile what the consumer keeps from the source of truth (e.g. the rosters), then start \
         again from the oldest event kept: remove the cursor file, or leave out --after"
    )]
    CursorExpired { cursor: String },
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl FollowError {
    /// 2: a bad flag, file or token, or a request the server refused; 3: the cursor
    /// expired; 1: anything else (a cursor that could not be saved, stdout closed, an
    /// answer that is not a feed page, a server unreachable under `--once`).
    pub fn exit_code(&self) -> i32 {
        match self {
            FollowError::Usage(_) | FollowError::Refused { .. } => 2,
            FollowError::CursorExpired { .. } => 3,
            FollowError::Failed(_) => 1,
        }
    }
}

/// Follows the feed until `--once` has read what is there, a signal stops it (exit 0), or
/// an error that retrying cannot mend.
pub fn run(opts: Options) -> Result<(), FollowError> {
    if !opts.url.starts_with("http://") {
        return Err(FollowError::Usage(format!(
            "--url {}: must start with http:// (no TLS here)",
            opts.url
        )));
    }
    let saved = match &opts.cursor_file {
        Some(path) => read_cursor_file(path)?,
        None => None,
    };
    let stop = Stop::install().context("installing the SIGINT/SIGTERM handlers")?;
    let mut follower = Follower::new(opts, saved, stop);
    if !follower.opts.once {
        let from = follower.cursor.as_deref().unwrap_or("the oldest event kept");
        eprintln!("enrolld: following {} after {from}", follower.events_url);
    }
    follower.run()
}

/// One event as the server sent it, and what the follower reads of it.
#[derive(Debug, PartialEq)]
struct FeedEvent {
    cursor: String,
    kind: String,
    /// The event's JSON, on one line.
    line: String,
}

#[derive(Debug, PartialEq)]
struct Page {
    events: Vec<FeedEvent>,
    next: String,
}

/// The outcome of one feed request that did not give a page.
#[derive(Debug)]
enum Attempt {
    /// Worth asking again after a pause (the network, 5xx, 408, 429).
    Retry(String),
    Fatal(FollowError),
}

struct Follower {
    opts: Options,
    events_url: String,
    agent: ureq::Agent,
    auth: Option<Auth>,
    /// Where the next request starts (None: the oldest event kept).
    cursor: Option<String>,
    /// What the cursor file holds.
    saved: Option<String>,
    stop: Arc<Stop>,
}

impl Follower {
    fn new(opts: Options, saved: Option<String>, stop: Arc<Stop>) -> Follower {
        let auth = match &opts.credentials {
            Credentials::Secret(secret) => Some(Auth::new(secret)),
            Credentials::Token(_) => None,
        };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .user_agent(concat!("enrolld-follow/", env!("CARGO_PKG_VERSION")))
            .build();
        Follower {
            events_url: format!("{}/v1/admin/events", opts.url.trim_end_matches('/')),
            cursor: opts.after.clone().or_else(|| saved.clone()),
            opts,
            agent,
            auth,
            saved,
            stop,
        }
    }

    fn run(&mut self) -> Result<(), FollowError> {
        let wait_ms = if self.opts.once { 0 } else { self.opts.wait_ms };
        loop {
            let page = self.fetch(wait_ms)?;
            let full = page.events.len() >= self.opts.limit as usize;
            self.stop.set_busy(true);
            let handled = self.handle(page);
            let stopping = self.stop.set_busy(false);
            if !handled? || stopping || (self.opts.once && !full) {
                return Ok(());
            }
        }
    }

    /// Prints (and with `--exec` delivers) a page's events and saves the cursor after
    /// them. False when a signal stopped it after the event in hand.
    fn handle(&mut self, page: Page) -> Result<bool, FollowError> {
        let Some(cmd) = self.opts.exec.clone() else {
            let mut out = std::io::stdout().lock();
            for e in &page.events {
                writeln!(out, "{}", e.line).context("writing to stdout")?;
            }
            out.flush().context("writing to stdout")?;
            drop(out);
            return self.advance(page.next).map(|()| true);
        };
        for e in page.events {
            if !self.deliver(&cmd, &e) {
                return Ok(false);
            }
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", e.line)
                .and_then(|()| out.flush())
                .context("writing to stdout")?;
            drop(out);
            self.advance(e.cursor)?;
            if self.stop.requested() {
                return Ok(false);
            }
        }
        self.advance(page.next).map(|()| true)
    }

    /// Moves the cursor, and saves it when it changed.
    fn advance(&mut self, cursor: String) -> Result<(), FollowError> {
        if let Some(path) = &self.opts.cursor_file {
            if self.saved.as_ref() != Some(&cursor) {
                write_atomically(path, &format!("{cursor}\n"))
                    .with_context(|| format!("saving cursor {cursor} to {}", path.display()))?;
                self.saved = Some(cursor.clone());
            }
        }
        self.cursor = Some(cursor);
        Ok(())
    }

    /// Runs the command for one event until it exits 0. False when a signal stopped it.
    fn deliver(&self, cmd: &str, e: &FeedEvent) -> bool {
        let mut backoff = Backoff::new();
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            let why = match run_command(cmd, e) {
                Ok(status) if status.success() => return true,
                Ok(status) => format!("the command failed ({status})"),
                Err(err) => format!("the command could not run: {err:#}"),
            };
            if self.stop.requested() {
                return false;
            }
            let delay = backoff.next();
            eprintln!(
                "enrolld: event {} ({}): attempt {attempt}: {why}; trying again in {} ms",
                e.cursor,
                e.kind,
                delay.as_millis()
            );
            if !self.stop.sleep(delay) {
                return false;
            }
        }
    }

    /// One page, asking again with backoff while the failure may pass.
    fn fetch(&self, wait_ms: u64) -> Result<Page, FollowError> {
        let mut backoff = Backoff::new();
        let mut tries = 0u32;
        loop {
            tries = tries.saturating_add(1);
            let why = match self.request(wait_ms) {
                Ok(page) => return Ok(page),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(why)) => why,
            };
            if self.opts.once && tries >= ONCE_TRIES_MAX {
                return Err(anyhow::anyhow!("reading the feed: {why} (gave up after {tries} tries)").into());
            }
            let delay = backoff.next();
            eprintln!(
                "enrolld: reading the feed: {why}; trying again in {} ms",
                delay.as_millis()
            );
            // The cursor file is exact here, so a signal ends the process at once.
            self.stop.sleep(delay);
        }
    }

    fn request(&self, wait_ms: u64) -> Result<Page, Attempt> {
        let token = match (&self.opts.credentials, &self.auth) {
            (Credentials::Token(t), _) => t.clone(),
            (Credentials::Secret(_), Some(auth)) => {
                let sub = StudentId::parse(TOKEN_SUB).expect("a valid id");
                auth.mint(&sub, Role::Admin, TOKEN_TTL_SECS)
            }
            (Credentials::Secret(_), None) => unreachable!("a secret always has its Auth"),
        };
        let mut req = self
            .agent
            .get(&self.events_url)
            .timeout(Duration::from_millis(wait_ms + REQUEST_SLACK_MS))
            .set("Authorization", &format!("Bearer {token}"))
            .query("limit", &self.opts.limit.to_string())
            .query("wait_ms", &wait_ms.to_string());
        if let Some(c) = &self.cursor {
            req = req.query("after", c);
        }
        match req.call() {
            Ok(resp) => {
                let body = resp
                    .into_string()
                    .map_err(|e| Attempt::Retry(format!("{}: reading the answer: {e}", self.events_url)))?;
                parse_page(&body)
                    .with_context(|| format!("the answer of {} is not a feed page", self.events_url))
                    .map_err(|e| Attempt::Fatal(e.into()))
            }
            Err(ureq::Error::Status(status, resp)) => {
                let body = resp.into_string().unwrap_or_default();
                Err(refusal(status, &body, self.cursor.as_deref())
                    .map_retry(|why| format!("{}: {why}", self.events_url)))
            }
            Err(ureq::Error::Transport(t)) => match t.kind() {
                // Not worth asking again: --url is wrong (https included: no TLS here).
                ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme => Err(Attempt::Fatal(
                    FollowError::Usage(format!("--url {}: {t}", self.opts.url)),
                )),
                _ => Err(Attempt::Retry(t.to_string())),
            },
        }
    }
}

impl Attempt {
    fn map_retry(self, f: impl FnOnce(String) -> String) -> Attempt {
        match self {
            Attempt::Retry(why) => Attempt::Retry(f(why)),
            fatal => fatal,
        }
    }
}

/// What a non-2xx answer means for the follower.
fn refusal(status: u16, body: &str, cursor: Option<&str>) -> Attempt {
    if status == 410 {
        return Attempt::Fatal(FollowError::CursorExpired {
            cursor: cursor.unwrap_or("(none)").to_string(),
        });
    }
    let answer: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let message = answer
        .as_ref()
        .and_then(|a| a["message"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| body.chars().take(REFUSAL_QUOTE_CHARS_MAX).collect());
    if status == 408 || status == 429 || status >= 500 {
        return Attempt::Retry(format!("{status}: {message}"));
    }
    let hint = match (status, cursor) {
        (401 | 403, _) => " (the token: pass the server's --jwt-secret, its --store, or an admin --token)".into(),
        (400, Some(c)) => format!(" (the cursor sent was {c}: is it one this server gave?)"),
        _ => String::new(),
    };
    Attempt::Fatal(FollowError::Refused { status, message, hint })
}

fn parse_page(body: &str) -> anyhow::Result<Page> {
    #[derive(serde::Deserialize)]
    struct PageJson {
        events: Vec<serde_json::Value>,
        next: String,
    }
    let page: PageJson = serde_json::from_str(body)?;
    let events = page
        .events
        .into_iter()
        .map(|v| {
            let text = |key: &str| {
                v[key]
                    .as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("an event without {key:?}"))
            };
            Ok(FeedEvent {
                cursor: text("cursor")?,
                kind: text("type")?,
                line: v.to_string(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Page {
        events,
        next: page.next,
    })
}

/// `sh -c CMD` with the event's JSON on stdin. Its stdout goes to our stderr, so our
/// stdout carries only events.
fn run_command(cmd: &str, e: &FeedEvent) -> std::io::Result<ExitStatus> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("ENROLLD_EVENT_CURSOR", &e.cursor)
        .env("ENROLLD_EVENT_TYPE", &e.kind)
        .env_remove("ENROLLD_JWT_SECRET")
        .stdin(Stdio::piped())
        .stdout(Stdio::from(std::io::stderr()))
        .spawn()?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    match stdin.write_all(format!("{}\n", e.line).as_bytes()) {
        // A command that does not read its stdin may have exited already.
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
            drop(stdin);
            let _ = child.kill();
            let _ = child.wait();
            return Err(err);
        }
        _ => {}
    }
    drop(stdin);
    child.wait()
}

/// The cursor file's cursor; None when there is no file yet.
fn read_cursor_file(path: &Path) -> Result<Option<String>, FollowError> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Err(FollowError::Usage(format!(
            "cursor file {} is empty: remove it to start from the oldest event kept, or pass --after",
            path.display()
        ))),
        Ok(text) => Ok(Some(text.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FollowError::Usage(format!(
            "reading cursor file {}: {e}",
            path.display()
        ))),
    }
}

/// Replaces `path` with `text` so that a crash leaves the old text or the new, never a
/// mix: a temporary file beside it, fsync, rename over, fsync the directory.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = OsString::from(path.as_os_str());
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// Capped exponential backoff.
struct Backoff {
    next_ms: u64,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next_ms: BACKOFF_MS_MIN,
        }
    }
    fn next(&mut self) -> Duration {
        let ms = self.next_ms;
        self.next_ms = (ms * 2).min(BACKOFF_MS_MAX);
        Duration::from_millis(ms)
    }
}

/// What SIGINT/SIGTERM do. While the follower waits on the server or between tries of a
/// request, the cursor file is exact and the process exits 0 at once. While it handles a
/// page (prints, runs a command, saves), it finishes the event in hand, saves, and exits
/// 0; a second signal exits 130 at once (that event then comes again next time).
struct Stop {
    state: Mutex<StopState>,
    wake: Condvar,
}

#[derive(Default)]
struct StopState {
    busy: bool,
    requested: bool,
}

impl Stop {
    fn install() -> anyhow::Result<Arc<Stop>> {
        use tokio::signal::unix::{signal, SignalKind};
        let stop = Arc::new(Stop {
            state: Mutex::new(StopState::default()),
            wake: Condvar::new(),
        });
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
        let (mut int, mut term) = {
            let _in_runtime = rt.enter();
            (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?)
        };
        let watched = stop.clone();
        std::thread::Builder::new().name("signals".into()).spawn(move || {
            rt.block_on(async move {
                loop {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                    watched.signalled();
                }
            })
        })?;
        Ok(stop)
    }

    fn lock(&self) -> MutexGuard<'_, StopState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn signalled(&self) {
        let mut s = self.lock();
        if !s.busy || s.requested {
            let code = if s.requested { 130 } else { 0 };
            eprintln!("enrolld: stopped by a signal");
            std::process::exit(code);
        }
        s.requested = true;
        eprintln!("enrolld: stopping once the event in hand is done (a failed one is not retried); signal again to stop at once");
        self.wake.notify_all();
    }

    /// Marks a page in hand (or done). Returns whether a stop was requested.
    fn set_busy(&self, busy: bool) -> bool {
        let mut s = self.lock();
        s.busy = busy;
        s.requested
    }

    fn requested(&self) -> bool {
        self.lock().requested
    }

    /// Sleeps `d` unless a stop is requested first; false when it was.
    fn sleep(&self, d: Duration) -> bool {
        let s = self.lock();
        let (s, _) = self
            .wake
            .wait_timeout_while(s, d, |s| !s.requested)
            .unwrap_or_else(PoisonError::into_inner);
        !s.requested
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How a refusal is taken: Ok(exit code) when fatal, Err(()) when retried.
    fn check(status: u16, body: &str, expected: Result<i32, ()>) {
        let got = match refusal(status, body, Some("c1")) {
            Attempt::Fatal(e) => Ok(e.exit_code()),
            Attempt::Retry(_) => Err(()),
        };
        assert_eq!(got, expected, "{status} {body}");
    }

    #[test]
    fn refusals_are_fatal_or_retried_by_status() {
        let expired = r#"{"error":"cursor_expired","message":"older"}"#;
        check(410, expired, Ok(3));
        check(401, r#"{"error":"unauthorized","message":"no"}"#, Ok(2));
        check(403, r#"{"error":"forbidden","message":"no"}"#, Ok(2));
        check(400, r#"{"error":"bad_request","message":"after: not a cursor"}"#, Ok(2));
        check(404, "not json", Ok(2));
        check(408, "", Err(()));
        check(429, "", Err(()));
        check(500, "", Err(()));
        check(503, r#"{"error":"unavailable","message":"store"}"#, Err(()));
    }

    #[test]
    fn a_refusal_quotes_the_servers_message() {
        let Attempt::Fatal(e) = refusal(
            400,
            r#"{"error":"bad_request","message":"after: not a cursor"}"#,
            Some("zz"),
        ) else {
            panic!("fatal")
        };
        let text = e.to_string();
        assert!(text.contains("after: not a cursor") && text.contains("zz"), "{text}");
    }

    #[test]
    fn pages_keep_each_event_whole() {
        let page = parse_page(
            r#"{"events":[{"cursor":"c1","type":"enrolled","course_id":"A","student_id":"s","at":"t","new":1}],"next":"c1"}"#,
        )
        .unwrap();
        assert_eq!(page.next, "c1");
        assert_eq!(page.events.len(), 1);
        let e = &page.events[0];
        assert_eq!((e.cursor.as_str(), e.kind.as_str()), ("c1", "enrolled"));
        let back: serde_json::Value = serde_json::from_str(&e.line).unwrap();
        assert_eq!(back["new"], 1, "fields the follower does not know pass through");
        assert!(parse_page(r#"{"events":[{"type":"enrolled"}],"next":"c1"}"#).is_err());
        assert!(parse_page(r#"{"events":[]}"#).is_err());
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::new();
        let ms: Vec<u64> = (0..12).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(ms[..4], [100, 200, 400, 800]);
        assert!(ms.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*ms.last().unwrap(), BACKOFF_MS_MAX);
    }

    #[test]
    fn cursor_files_are_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("enrolld-follow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cursor");
        assert_eq!(read_cursor_file(&path).unwrap(), None);
        write_atomically(&path, "c1\n").unwrap();
        write_atomically(&path, "c2\n").unwrap();
        assert_eq!(read_cursor_file(&path).unwrap().as_deref(), Some("c2"));
        std::fs::write(&path, "  \n").unwrap();
        assert_eq!(read_cursor_file(&path).unwrap_err().exit_code(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
