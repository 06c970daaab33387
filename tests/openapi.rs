//! `docs/openapi.yaml` against the real server: schemathesis (pinned and installed into
//! `target/py` by `scripts/py-tools.sh`) generates valid and invalid requests for every
//! operation the server serves, sends them to the real binary on SQLite with the demo
//! catalog, and checks every answer against the document: status codes, content types,
//! bodies, headers (`X-Request-Id` on all, `Retry-After` on 429/503), `401` without a
//! token, `405` with `Allow` for a method a path lacks, and no 5xx but the contract's 503.
//! Operations tagged `planned` (in API.md, not served yet) are left out of the runs, and
//! the feed's long poll (`long-poll`), which tests/feed.rs covers.
//!
//! Each run's seed is printed; `ENROLLD_OPENAPI_SEED=n` replays it.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, Server, TempDir, SECRET};

/// Test cases per operation and phase: what bounds a run (about 15 s for all operations).
const EXAMPLES_PER_OPERATION: u32 = 100;
/// A run that takes longer than this has hung: it is killed and the test fails.
const RUN_SECS_MAX: u64 = 240;

/// schemathesis's configuration for a run. The tokens come from the environment, one for
/// each security scheme of the document.
const CONFIG: &str = r#"
[checks.not_a_server_error]
# The contract's one 5xx: 503, nothing was recorded (with Retry-After).
expected-statuses = ["2xx", "3xx", "4xx", "503"]

[auth.openapi.studentToken]
bearer = "${ENROLLD_OPENAPI_STUDENT_TOKEN}"

[auth.openapi.adminToken]
bearer = "${ENROLLD_OPENAPI_ADMIN_TOKEN}"

# A schema-valid course body may still be a 400: JSON Schema cannot say that closes_at
# comes after opens_at, nor that an instant with its offset stays within years 0000-9999
# in UTC.
[[operations]]
include-operation-id = "putCourse"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429", "5xx"]
"#;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `st` in the virtualenv `scripts/py-tools.sh` makes (`ENROLLD_PY_VENV`, else `target/py`).
fn schemathesis() -> PathBuf {
    let venv = std::env::var_os("ENROLLD_PY_VENV").map_or_else(|| PathBuf::from("target/py"), PathBuf::from);
    let st = repo().join(venv).join("bin/st");
    assert!(
        st.exists(),
        "{} is missing: run scripts/py-tools.sh (it installs schemathesis into target/py)",
        st.display()
    );
    st
}

/// A token minted by `enrolld token`, as API.md's command-line contract says.
fn mint(sub: &str, role: &str) -> String {
    let out = Command::new(bin())
        .args(["token", "--sub", sub, "--role", role, "--jwt-secret", SECRET])
        .output()
        .expect("enrolld token");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "enrolld token: {stderr}");
    String::from_utf8(out.stdout)
        .expect("a token is ASCII")
        .trim()
        .to_string()
}

fn seed() -> u64 {
    match std::env::var("ENROLLD_OPENAPI_SEED") {
        Ok(s) => s.parse().expect("ENROLLD_OPENAPI_SEED is a number"),
        Err(_) => rand::random::<u32>().into(),
    }
}

/// Runs `st run` against `server` with `extra` arguments, the admin scheme's token minted
/// with `admin_role`. Fails the test on any failure schemathesis reports (its exit status),
/// showing its output. Returns the server's log of the run.
fn run(server: &Server, dir: &TempDir, name: &str, admin_role: &str, extra: &[&str]) -> Vec<String> {
    let config = dir.path(&format!("{name}.toml"));
    std::fs::write(&config, CONFIG).unwrap();
    let (out, err) = (dir.path(&format!("{name}.out")), dir.path(&format!("{name}.err")));
    let seed = seed();
    let url = format!("http://{}", server.addr);
    let (examples, seed_arg) = (EXAMPLES_PER_OPERATION.to_string(), seed.to_string());
    let document = repo().join("docs/openapi.yaml");
    let mut args: Vec<&str> = vec!["--config-file", &config, "run", document.to_str().unwrap()];
    args.extend([
        "--url",
        &url,
        "--exclude-tag",
        "planned",
        "--exclude-tag",
        "long-poll",
        "--checks",
        "all",
    ]);
    args.extend(["--max-examples", &examples, "--seed", &seed_arg, "--no-color"]);
    args.extend(["--request-timeout", "10", "--generation-database", "none"]);
    args.extend(extra);
    eprintln!("openapi {name}: st {}", args.join(" "));
    let started = Instant::now();
    let mut child = Command::new(schemathesis())
        .args(&args)
        .current_dir(&dir.0)
        .env("ENROLLD_OPENAPI_STUDENT_TOKEN", mint("openapi-student", "student"))
        .env("ENROLLD_OPENAPI_ADMIN_TOKEN", mint("openapi-admin", admin_role))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn st");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for st") {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(RUN_SECS_MAX) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&out).unwrap_or_default() + &std::fs::read_to_string(&err).unwrap_or_default();
    let Some(status) = status else {
        panic!("openapi {name}: st ran over {RUN_SECS_MAX} s (seed {seed}); its output:\n{output}");
    };
    assert!(
        status.success(),
        "openapi {name}: schemathesis found failures ({status}; ENROLLD_OPENAPI_SEED={seed} replays):\n{output}"
    );
    // A run that tested nothing would exit 0 too.
    assert!(output.contains("Tested:"), "openapi {name}: no summary in:\n{output}");
    let summary = output
        .rsplit_once("Test cases:")
        .map_or("", |(_, s)| s.lines().nth(1).unwrap_or(""));
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!("openapi {name}: passed in {elapsed:.1} s: {}", summary.trim());
    let log = server.drain_log();
    let panics: Vec<&String> = log.iter().filter(|l| l.contains("panicked")).collect();
    assert!(panics.is_empty(), "openapi {name}: the server panicked: {panics:#?}");
    log
}

/// Every served operation, every phase (examples, coverage, fuzzing, stateful), with rate
/// limits off so the answers are the routes' own.
#[test]
fn every_answer_conforms_to_the_document() {
    let dir = TempDir::new("enrolld-openapi");
    let store = format!("sqlite://{}", dir.path("e.db"));
    let server = Server::start(&[
        "--store",
        &store,
        "--demo",
        "--shards",
        "2",
        "--limits-enabled",
        "false",
    ]);
    run(&server, &dir, "all", "admin", &[]);
}

/// A student's token on the admin routes: `403 forbidden` answers conform too.
#[test]
fn forbidden_answers_conform_to_the_document() {
    let dir = TempDir::new("enrolld-openapi-403");
    let store = format!("sqlite://{}", dir.path("e.db"));
    let server = Server::start(&["--store", &store, "--demo", "--limits-enabled", "false"]);
    let phases = ["--phases", "examples,coverage"];
    let log = run(
        &server,
        &dir,
        "forbidden",
        "student",
        &[&["--include-tag", "admin"][..], &phases].concat(),
    );
    let forbidden = log.iter().filter(|l| l.contains("needs the admin role")).count();
    assert!(forbidden > 0, "the run met no 403, so it checked none");
}

/// With the default limits a burst of reads from one student meets 429s: they conform too
/// (error body, `Retry-After`, `X-Request-Id`).
#[test]
fn rate_limited_answers_conform_to_the_document() {
    let dir = TempDir::new("enrolld-openapi-429");
    let store = format!("sqlite://{}", dir.path("e.db"));
    let server = Server::start(&["--store", &store, "--demo"]);
    let only = ["--include-operation-id", "listCourses", "--phases", "fuzzing"];
    let log = run(&server, &dir, "limited", "admin", &only);
    let limited = log.iter().filter(|l| l.contains("too many requests")).count();
    assert!(limited > 0, "the run met no 429, so it checked none");
}
