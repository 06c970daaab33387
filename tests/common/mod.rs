//! Shared test harness: starts the real `enrolld` binary on a real socket, gives each test
//! its own MariaDB database, mints tokens, and speaks raw HTTP/1.1 over keep-alive
//! connections (so byte-level tests can send anything).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use enrolld::ids::StudentId;
use enrolld::net::auth::{Auth, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const SECRET: &str = "test-secret-0123456789";

/// Base URL of the MariaDB the suite uses (without a database name).
pub fn mysql_base() -> String {
    std::env::var("ENROLLD_TEST_MYSQL").unwrap_or_else(|_| "mysql://enrolld:enrolld@127.0.0.1:3306".into())
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}_{:08x}", std::process::id(), rand::random::<u32>())
}

/// A fresh MariaDB database, dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub fn new() -> TestDb {
        let name = unique("enrolld_t");
        mysql_exec(&format!("CREATE DATABASE {name}"));
        TestDb {
            url: format!("{}/{name}", mysql_base()),
            name,
        }
    }
    /// Runs SQL in this database and returns the tab-separated rows.
    pub fn query(&self, sql: &str) -> Vec<Vec<String>> {
        mysql_query(&self.name, sql)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        mysql_exec(&format!("DROP DATABASE IF EXISTS {}", self.name));
    }
}

fn mysql_cli_args() -> Vec<String> {
    // mysql://user:pass@host:port
    let base = mysql_base();
    let rest = base.trim_start_matches("mysql://");
    let (creds, hostport) = rest.split_once('@').expect("user@host in ENROLLD_TEST_MYSQL");
    let (user, pass) = creds.split_once(':').unwrap_or((creds, ""));
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "3306"));
    vec![
        format!("-h{host}"),
        format!("-P{port}"),
        format!("-u{user}"),
        format!("-p{pass}"),
    ]
}

pub fn mysql_exec(sql: &str) {
    let out = Command::new("mariadb")
        .args(mysql_cli_args())
        .arg("-e")
        .arg(sql)
        .output()
        .expect("mariadb client");
    assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
}

pub fn mysql_query(db: &str, sql: &str) -> Vec<Vec<String>> {
    let out = Command::new("mariadb")
        .args(mysql_cli_args())
        .args(["-N", "-B", db, "-e", sql])
        .output()
        .expect("mariadb client");
    assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

/// A running `enrolld serve`. Killed (SIGKILL) when dropped unless stopped before.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// Each shard's own address, in shard order (with `--shard-listen`).
    pub shard_addrs: Vec<SocketAddr>,
    pub args: Vec<String>,
    /// Extra environment variables of the process (kept for restarts).
    pub env: Vec<(String, String)>,
    /// The log lines up to and including the ready line (what the start did).
    pub start_log: Vec<String>,
    /// The log lines after the ready line, as they come.
    pub log: mpsc::Receiver<String>,
}

/// `enrolld serve --jwt-secret SECRET <args>` with plain-text logs on a piped stderr and
/// stdout discarded: for tests that watch a start (refused, or its ready line) rather than
/// serve through [`Server`].
pub fn spawn_serve(args: &[&str]) -> Child {
    Command::new(bin())
        .args(["serve", "--jwt-secret", SECRET])
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn enrolld")
}

/// How long a refused start may take (it refuses before or right after loading the store;
/// on MySQL, within a heartbeat of the holder).
pub const REFUSAL_WAIT_MS_MAX: u64 = 60_000;
/// How long an exited server's stderr may stay open (a child it left behind holding it).
pub const LOG_CLOSE_WAIT_MS_MAX: u64 = 10_000;

/// `enrolld serve` with `args` on the test secret; expects it to exit by itself and returns
/// its exit code and stderr. A server that becomes ready instead is killed and fails the
/// test: it would be sharing the store or the port.
pub fn refused(args: &[&str]) -> (Option<i32>, String) {
    let mut child = spawn_serve(args);
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_millis(REFUSAL_WAIT_MS_MAX);
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.contains("enrolld ready") => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "a second enrolld started serving {args:?}:\n{}\n{line}",
                    lines.join("\n")
                );
            }
            Ok(line) => lines.push(line),
            // stderr closed: the process is gone.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "enrolld {args:?} neither exited nor served"
                );
            }
        }
    }
    let status = child.wait().expect("wait for enrolld");
    (status.code(), lines.join("\n"))
}

/// A refusal: exit 2 and a one-line error (after any log lines) naming each of `names`.
pub fn check_refused(args: &[&str], names: &[&str]) {
    let (code, log) = refused(args);
    assert_eq!(code, Some(2), "{args:?}: {log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("enrolld: ")).collect();
    assert_eq!(errors.len(), 1, "one error line: {log}");
    for name in names {
        assert!(errors[0].contains(name), "{args:?}: the error names {name}: {log}");
    }
}

/// One enrollment POST on a connection of its own; the status.
pub async fn enroll_on(addr: SocketAddr, course: &str, student: &str) -> u16 {
    let mut c = Conn::open(addr).await;
    let path = format!("/v1/courses/{course}/enrollment");
    c.request("POST", &path, Some(&token(student)), None).await.status
}

/// Enrolls `students` in `course`, each answered 201.
pub async fn enroll_all(c: &mut Conn, course: &str, students: &[&str]) {
    for s in students {
        let r = c
            .request(
                "POST",
                &format!("/v1/courses/{course}/enrollment"),
                Some(&token(s)),
                None,
            )
            .await;
        assert_eq!(r.status, 201, "{s} in {course}");
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_enrolld")
}

impl Server {
    /// Starts the server with `--listen 127.0.0.1:0` and the test secret, plus `extra`.
    pub fn start(extra: &[&str]) -> Server {
        Server::start_with_env(extra, &[])
    }

    /// [`Server::start`] with extra environment variables (e.g. an `LD_PRELOAD`).
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--jwt-secret".into(),
            SECRET.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Server::spawn(args, env)
    }

    pub fn start_args(args: Vec<String>) -> Server {
        Server::spawn(args, Vec::new())
    }

    fn spawn(args: Vec<String>, env: Vec<(String, String)>) -> Server {
        let mut child = Command::new(bin())
            .args(&args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info,enrolld=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn enrolld");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("ENROLLD_TEST_ECHO").is_some() {
                    eprintln!("[enrolld] {line}");
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        // Text logs end a value at a space, JSON logs at a quote.
        let value = |line: &str, key: &str| {
            let i = line.find(key)?;
            Some(line[i + key.len()..].split([' ', '"']).next().unwrap().to_string())
        };
        let (addr, shard_addrs) = loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    if let Some(a) = value(&line, "ready listen=") {
                        let shards: Vec<SocketAddr> = value(&line, " shard_listen=")
                            .map(|v| v.split(',').map(|a| a.parse().expect("shard address")).collect())
                            .unwrap_or_default();
                        seen.push(line);
                        break (a.parse().expect("listen address"), shards);
                    }
                    seen.push(line);
                }
                Err(_) => panic!("enrolld did not become ready; its log:\n{}", seen.join("\n")),
            }
        };
        Server {
            child,
            addr,
            shard_addrs,
            args,
            env,
            start_log: seen,
            log: rx,
        }
    }

    /// Restarts with the same arguments (after a kill or a stop).
    pub fn restart(mut self) -> Server {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let args = std::mem::take(&mut self.args);
        let listen_pos = args.iter().position(|a| a == "--listen").unwrap();
        let mut args = args;
        args[listen_pos + 1] = "127.0.0.1:0".into();
        Server::spawn(args, std::mem::take(&mut self.env))
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().ok()?.code()
    }

    /// Every log line received so far.
    pub fn drain_log(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    /// Every log line after the ready line until the process closes its stderr (call it
    /// after the process exited; waits at most `LOG_CLOSE_WAIT_MS_MAX` for the pipe).
    pub fn rest_of_log(&self) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_millis(LOG_CLOSE_WAIT_MS_MAX);
        let mut lines = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(_) => break,
            }
        }
        lines
    }

    pub async fn conn(&self) -> Conn {
        Conn::open(self.addr).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn auth() -> Auth {
    Auth::new(SECRET.as_bytes())
}

pub fn token(sub: &str) -> String {
    auth().mint(&StudentId::parse(sub).unwrap(), Role::Student, 3600)
}

pub fn admin_token() -> String {
    auth().mint(&StudentId::parse("test-admin").unwrap(), Role::Admin, 3600)
}

/// One HTTP answer.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A raw keep-alive HTTP/1.1 connection.
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Sends raw bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    pub async fn request(&mut self, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Resp {
        self.send_request(method, path, token, body).await.expect("send");
        self.read_response().await.expect("response")
    }

    /// Sends one request without waiting for its answer (read it with
    /// [`Conn::read_response`]); the request reaches a stopped server's socket all the same.
    pub async fn send_request(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> std::io::Result<()> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        let body = body.unwrap_or("");
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
        self.send_raw(req.as_bytes()).await
    }

    /// Reads one response; `None` when the server closed the connection first.
    pub async fn read_response(&mut self) -> Option<Resp> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if !self.fill().await {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| {
                l.split_once(':')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            })
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let total = head_end + 4 + len;
        while self.buf.len() < total {
            if !self.fill().await {
                return None;
            }
        }
        let body = self.buf[head_end + 4..total].to_vec();
        self.buf.drain(..total);
        Some(Resp { status, headers, body })
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(Duration::from_secs(30), self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `PUT /v1/admin/courses/{id}` with `body`, as admin: the answer, whatever it is.
pub async fn put_course_body(conn: &mut Conn, id: &str, body: &str) -> Resp {
    conn.request(
        "PUT",
        &format!("/v1/admin/courses/{id}"),
        Some(&admin_token()),
        Some(body),
    )
    .await
}

/// `GET /v1/admin/courses/{id}/roster`, as admin: the answer, whatever it is.
pub async fn roster_resp(conn: &mut Conn, id: &str) -> Resp {
    conn.request(
        "GET",
        &format!("/v1/admin/courses/{id}/roster"),
        Some(&admin_token()),
        None,
    )
    .await
}

/// Creates (or updates) a course as admin; panics unless 200/201.
pub async fn put_course(conn: &mut Conn, id: &str, capacity: u32) {
    let body = format!(r#"{{"title":"Course {id}","capacity":{capacity}}}"#);
    let r = put_course_body(conn, id, &body).await;
    assert!(
        r.status == 201 || r.status == 200,
        "put {id}: {} {:?}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
}

/// The roster of a course through the admin API, sorted.
pub async fn roster(conn: &mut Conn, id: &str) -> Vec<String> {
    let r = roster_resp(conn, id).await;
    assert_eq!(r.status, 200, "roster {id}");
    let mut v: Vec<String> = r.json()["students"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// A temporary directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let p = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The answers a rush collected: (status, course, student).
pub type Outcomes = Vec<(u16, String, String)>;

/// Every student in `students` tries every course in `courses`, in a per-student random
/// order, over `connections` keep-alive connections. Stops early (without failing) when a
/// connection is cut, so it can run across a `kill -9`.
pub async fn rush(addr: SocketAddr, courses: &[String], students: &[String], connections: usize) -> Outcomes {
    use rand::seq::SliceRandom;
    let mut tasks = Vec::new();
    for chunk in students.chunks(students.len().div_ceil(connections)) {
        let chunk = chunk.to_vec();
        let courses = courses.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let Ok(stream) = TcpStream::connect(addr).await else { return out };
            stream.set_nodelay(true).unwrap();
            let mut conn = Conn { stream, buf: Vec::new() };
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_entropy();
            for s in chunk {
                let tok = token(&s);
                let mut order = courses.clone();
                order.shuffle(&mut rng);
                for c in order {
                    let req = format!(
                        "POST /v1/courses/{c}/enrollment HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {tok}\r\nContent-Length: 0\r\n\r\n"
                    );
                    if conn.send_raw(req.as_bytes()).await.is_err() {
                        return out;
                    }
                    match conn.read_response().await {
                        Some(r) => out.push((r.status, c, s.clone())),
                        None => return out,
                    }
                }
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Seats acknowledged (201 or 200) per course, from a rush's answers.
pub fn acknowledged(outcomes: &Outcomes) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut m: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
    for (status, c, s) in outcomes {
        if *status == 201 || *status == 200 {
            m.entry(c.clone()).or_default().insert(s.clone());
        }
    }
    m
}

/// The value of one sample in a `/metrics` scrape (`name{labels}` exactly as rendered).
pub async fn metric(conn: &mut Conn, sample: &str) -> Option<f64> {
    let r = conn.request("GET", "/metrics", None, None).await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A loopback port nothing listens on right now (for private servers in fault tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throwaway MariaDB server for fault tests, on its own port and data directory (the
/// shared server is never touched), with a database `enrolld`. Killed when dropped.
pub struct PrivateMariadb {
    dir: TempDir,
    pub port: u16,
    /// Extra `mariadbd` options, kept for restarts.
    args: Vec<String>,
    child: Option<Child>,
}

impl PrivateMariadb {
    pub fn new() -> PrivateMariadb {
        PrivateMariadb::with_args(&[])
    }

    /// Started with extra `mariadbd` options (e.g. `--innodb-flush-log-at-trx-commit=2`).
    pub fn with_args(args: &[&str]) -> PrivateMariadb {
        let dir = TempDir::new("enrolld-mariadb");
        // A temporary directory of its own: bootstraps running side by side in the shared
        // /tmp lost each other's temporary tables now and then.
        std::fs::create_dir_all(dir.path("tmp")).unwrap();
        let out = Command::new("mariadb-install-db")
            .args([
                "--no-defaults",
                &format!("--datadir={}", dir.path("data")),
                &format!("--tmpdir={}", dir.path("tmp")),
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .env("TMPDIR", dir.path("tmp"))
            .output()
            .expect("mariadb-install-db (scripts/services.sh installs mariadb-server)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut db = PrivateMariadb {
            dir,
            port: free_port(),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        db.start();
        db.sql("CREATE DATABASE enrolld; USE enrolld; SELECT 1");
        db
    }

    pub fn start(&mut self) {
        let child = Command::new("mariadbd")
            .args([
                "--no-defaults".to_string(),
                format!("--datadir={}", self.dir.path("data")),
                format!("--tmpdir={}", self.dir.path("tmp")),
                format!("--socket={}", self.dir.path("sock")),
                format!("--pid-file={}", self.dir.path("pid")),
                format!("--port={}", self.port),
                "--bind-address=127.0.0.1".into(),
                "--user=root".into(),
                "--skip-grant-tables".into(),
                "--innodb-buffer-pool-size=32M".into(),
            ])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mariadbd");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !self.ping() {
            assert!(std::time::Instant::now() < deadline, "private mariadbd did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn ping(&self) -> bool {
        Command::new("mariadb-admin")
            .args([
                "-h127.0.0.1",
                &format!("-P{}", self.port),
                "-uroot",
                "--connect-timeout=1",
                "ping",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Runs SQL in database `enrolld` (one session) and returns the rows, tab-separated.
    pub fn sql(&self, sql: &str) -> String {
        let with_db = if sql.starts_with("CREATE DATABASE") {
            sql.to_string()
        } else {
            format!("USE enrolld; {sql}")
        };
        let out = Command::new("mariadb")
            .args([
                "-h127.0.0.1",
                &format!("-P{}", self.port),
                "-uroot",
                "-N",
                "-B",
                "-e",
                &with_db,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP / SIGCONT: the server keeps its connections open but stops answering.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        signal(pid, sig);
    }

    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/enrolld", self.port)
    }
}

impl Drop for PrivateMariadb {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal("-CONT");
        }
        self.kill();
    }
}

/// Sends `sig` (`-STOP`, `-CONT`, `-TERM`, ...) to process `pid`; panics if it cannot.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// Enrolls `student`, retrying while the answer is 503 (the breaker may still be open), for
/// at most 30 s; the last status.
pub async fn enroll_once_the_store_is_back(c: &mut Conn, course: &str, student: &str) -> u16 {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let path = format!("/v1/courses/{course}/enrollment");
        let r = c.request("POST", &path, Some(&token(student)), None).await;
        if r.status != 503 || std::time::Instant::now() > deadline {
            return r.status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The two stores a suite runs against.
#[derive(Clone, Copy, Debug)]
pub enum StoreKind {
    Sqlite,
    Mariadb,
}

/// A fresh store of either kind, removed when dropped.
pub enum TestStore {
    Sqlite(TempDir),
    Mariadb(TestDb),
}

impl TestStore {
    pub fn new(kind: StoreKind) -> TestStore {
        match kind {
            StoreKind::Sqlite => TestStore::Sqlite(TempDir::new("enrolld-store")),
            StoreKind::Mariadb => TestStore::Mariadb(TestDb::new()),
        }
    }
    /// The `--store` URL.
    pub fn url(&self) -> String {
        match self {
            TestStore::Sqlite(dir) => format!("sqlite://{}", dir.path("store.db")),
            TestStore::Mariadb(db) => db.url.clone(),
        }
    }
}

/// A redis-server of a test's own, on its own loopback port with nothing saved, for tests
/// that stop or flush it (never the shared Redis). Killed when dropped.
pub struct PrivateRedis {
    child: Option<Child>,
    pub port: u16,
}

impl PrivateRedis {
    /// Starts one on `port` and waits until it answers PING.
    pub fn start(port: u16) -> PrivateRedis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start redis-server (is it installed?)");
        let r = PrivateRedis {
            child: Some(child),
            port,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while r.cli(&["PING"]) != "PONG" {
            assert!(
                std::time::Instant::now() < deadline,
                "private redis-server did not answer on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis-cli` against it; its trimmed output (empty when it could not run).
    pub fn cli(&self, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
