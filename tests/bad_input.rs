//! Bad input, byte by byte, against the real binary over real sockets.
//!
//! Why: the HTTP front is the only part of enrolld that strangers can reach, so it must turn
//! every malformed, oversize, forged or slow request into the answer API.md promises (a 4xx
//! with the contract error body and an `X-Request-Id`, or a closed connection) without
//! crashing, without pinning a shard, and without touching a seat. Unit tests of the parsers
//! cannot show that: hyper answers some of these before our code runs, and the limits live in
//! the connection setup. Each family below is one `check`-style helper fed many small cases;
//! a family reports every failing case at once instead of stopping at the first.
//!
//! Where hyper refuses a request before our service is called (an unparsable request line,
//! a head beyond the buffer), it writes its own bare answer: the status, `content-length: 0`,
//! no JSON body and no `X-Request-Id`. The router cannot shape those, so such cases assert
//! hyper's answer (`Want::Hyper`, or `Want::HyperOrClosed` where the brief allows a close
//! instead) and say so: a known gap against API.md's "every non-2xx has the error body".
//!
//! Two findings this file pinned and src/ then fixed: hyper's `pipeline_flush(true)` held
//! answers back while unparsed bytes sat in its buffer (the `pipelined_*` tests), and no
//! timeout covered a request body (`stalled_bodies_do_not_lock_out_new_clients`).
//!
//! The suite runs on the embedded SQLite store (a file in a `TempDir`), so it needs no MariaDB.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::{admin_token, put_course, roster, token, Conn, Resp, Server, TempDir, SECRET};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// Longest any single exchange may take before we call the server hung.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// A course made at the start of every fixture, holding one seat, that no bad input may touch.
const KEEP: &str = "KEEP-01";
const KEEP_CAPACITY: u32 = 3;
/// API.md limits.
const HEAD_BYTES_MAX: usize = 16 * 1024;
const BODY_BYTES_MAX: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Fixture and plumbing
// ---------------------------------------------------------------------------------------------

struct Fixture {
    server: Server,
    baseline: Value,
    _dir: TempDir,
}

impl Fixture {
    /// Starts a server on a fresh SQLite file, creates `KEEP` and takes one seat in it.
    async fn start(extra: &[&str]) -> Fixture {
        let dir = TempDir::new("enrolld_bad_input");
        let store = format!("sqlite://{}", dir.path("enrolld.db"));
        // Rate limits are tests/limits.rs's subject; here they would only turn the many
        // probes of one observer into 429s.
        let mut args = vec!["--store", store.as_str(), "--limits-enabled", "false"];
        if !extra.contains(&"--shards") {
            args.extend(["--shards", "2"]);
        }
        args.extend_from_slice(extra);
        let server = Server::start(&args);
        let mut c = server.conn().await;
        put_course(&mut c, KEEP, KEEP_CAPACITY).await;
        let r = c
            .request(
                "POST",
                &format!("/v1/courses/{KEEP}/enrollment"),
                Some(&token("keeper")),
                None,
            )
            .await;
        assert_eq!(r.status, 201, "seat in {KEEP}: {}", text(&r.body));
        let baseline = course(&server, KEEP).await.expect("KEEP exists");
        assert_eq!(baseline["enrolled"], 1, "{baseline}");
        assert_eq!(baseline["seats_left"], KEEP_CAPACITY - 1, "{baseline}");
        Fixture {
            server,
            baseline,
            _dir: dir,
        }
    }

    async fn conn(&self) -> Conn {
        self.server.conn().await
    }

    /// After a bad case: the process is alive, a fresh connection gets `/healthz` 200, and
    /// `KEEP` still has exactly its seats.
    async fn intact(&mut self, case: &str) -> Result<(), String> {
        if let Ok(Some(status)) = self.server.child.try_wait() {
            return Err(format!("{case}: the server exited ({status})"));
        }
        let mut c = self.conn().await;
        let r = tokio::time::timeout(ANSWER_WITHIN, c.request("GET", "/healthz", None, None))
            .await
            .map_err(|_| format!("{case}: /healthz did not answer afterwards"))?;
        ensure(r.status == 200, || {
            format!("{case}: /healthz afterwards answered {}", r.status)
        })?;
        let now = course(&self.server, KEEP).await;
        ensure(now.as_ref() == Some(&self.baseline), || {
            format!("{case}: {KEEP} changed: was {}, now {now:?}", self.baseline)
        })
    }
}

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

/// Panics listing every failed case of a family.
fn report(family: &str, failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{family}: {} case(s) failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

fn text(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    if s.len() > 300 {
        format!(
            "{}…({} bytes)",
            &s[..s.char_indices().nth(300).map_or(s.len(), |(i, _)| i)],
            b.len()
        )
    } else {
        s.into_owned()
    }
}

/// Shows bytes we sent in a failure message (long ones shortened).
fn shown(b: &[u8]) -> String {
    let s = b.escape_ascii().to_string();
    if s.len() > 160 {
        format!("{}…({} bytes)", &s[..160], b.len())
    } else {
        s
    }
}

/// `GET /v1/courses/{id}` on a fresh connection: `Some(course)` on 200, `None` on 404.
async fn course(server: &Server, id: &str) -> Option<Value> {
    let mut c = server.conn().await;
    let r = c
        .request("GET", &format!("/v1/courses/{id}"), Some(&token("observer")), None)
        .await;
    match r.status {
        200 => Some(r.json()),
        404 => {
            contract_error(&r, 404, "not_found").unwrap();
            None
        }
        s => panic!("GET course {id}: {s} {}", text(&r.body)),
    }
}

/// A raw request: the request line, `Host`, the given headers, and a `Content-Length` for
/// `body` when it is `Some`.
fn raw(method: &str, target: &[u8], headers: &[(&str, &str)], body: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\nHost: test\r\n");
    for (k, v) in headers {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if let Some(b) = body {
        out.extend_from_slice(format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    if let Some(b) = body {
        out.extend_from_slice(b);
    }
    out
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// Sends `bytes` on a fresh connection and reads one answer; `None` when the server closed
/// first. A write error (the server closed while we wrote) also counts as closed.
async fn exchange(server: &Server, bytes: &[u8]) -> Result<Option<Resp>, String> {
    let mut c = server.conn().await;
    exchange_on(&mut c, bytes).await
}

async fn exchange_on(c: &mut Conn, bytes: &[u8]) -> Result<Option<Resp>, String> {
    let _ = c.send_raw(bytes).await;
    tokio::time::timeout(ANSWER_WITHIN, c.read_response())
        .await
        .map_err(|_| format!("no answer and no close within {ANSWER_WITHIN:?}"))
}

/// True when the server has closed `c` (EOF or reset) within `within`.
async fn closed_within(c: &mut Conn, within: Duration) -> bool {
    matches!(tokio::time::timeout(within, c.read_response()).await, Ok(None))
}

/// The contract's error answer: `status`, JSON `{"error": code, "message": <non-empty
/// string>}` and nothing else, the JSON content type, and an `X-Request-Id`.
fn contract_error(r: &Resp, status: u16, code: &str) -> Result<(), String> {
    let shape = || format!("{} {:?} body {}", r.status, r.headers, text(&r.body));
    ensure(r.status == status, || format!("want {status} {code}, got {}", shape()))?;
    let v: Value = serde_json::from_slice(&r.body).map_err(|e| format!("body is not JSON ({e}): {}", shape()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("body is not an object: {}", shape()))?;
    ensure(obj.get("error").and_then(Value::as_str) == Some(code), || {
        format!("want error {code:?}: {}", shape())
    })?;
    ensure(
        obj.get("message")
            .and_then(Value::as_str)
            .is_some_and(|m| !m.is_empty()),
        || format!("message missing or empty: {}", shape()),
    )?;
    ensure(obj.len() == 2, || format!("extra keys in the error body: {}", shape()))?;
    ensure(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        || format!("content-type is not JSON: {}", shape()),
    )?;
    request_id_ok(r)
}

/// An `X-Request-Id` that API.md allows: 1-64 printable ASCII chars.
fn request_id_ok(r: &Resp) -> Result<(), String> {
    let id = r
        .header("x-request-id")
        .ok_or_else(|| format!("no x-request-id: {} {:?}", r.status, r.headers))?;
    ensure(
        !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| (0x20..0x7f).contains(&b)),
        || format!("x-request-id {id:?} is not 1-64 printable chars"),
    )
}

/// What a case must get back.
#[derive(Clone, Copy, Debug)]
enum Want {
    /// Our router's answer: this status with the contract error body and an `X-Request-Id`.
    Api(u16, &'static str),
    /// hyper refused the bytes before our service ran: this status with an empty body; the
    /// connection is then closed. (hyper writes these itself; no contract body is possible
    /// from the router. See the module comment.)
    Hyper(u16),
    /// Either hyper's bare answer as in `Hyper`, or a close without an answer. API.md allows
    /// a close for bytes that are not HTTP; today the close is what happens whenever unparsed
    /// bytes stay in hyper's buffer (see the pipeline_flush finding in the module comment).
    HyperOrClosed(u16),
    /// The server closes the connection without an answer.
    Closed,
    /// A success status (for cases that are odd but valid HTTP).
    Ok(u16),
}

async fn judge(c: &mut Conn, got: Option<Resp>, want: Want) -> Result<(), String> {
    match (want, got) {
        (Want::Closed | Want::HyperOrClosed(_), None) => Ok(()),
        (Want::Closed, Some(r)) => Err(format!("want a close, got {} {}", r.status, text(&r.body))),
        (_, None) => Err(format!("want {want:?}, the server closed without an answer")),
        (Want::Api(status, code), Some(r)) => contract_error(&r, status, code),
        (Want::Ok(status), Some(r)) => {
            ensure(r.status == status, || {
                format!("want {status}, got {} {}", r.status, text(&r.body))
            })?;
            request_id_ok(&r)
        }
        (Want::Hyper(status) | Want::HyperOrClosed(status), Some(r)) => {
            ensure(r.status == status && r.body.is_empty(), || {
                format!(
                    "want hyper's bare {status}, got {} {:?} {}",
                    r.status,
                    r.headers,
                    text(&r.body)
                )
            })?;
            ensure(closed_within(c, ANSWER_WITHIN).await, || {
                format!("after hyper's {status} the connection stayed open")
            })
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

// ---------------------------------------------------------------------------------------------
// Malformed request lines and heads
// ---------------------------------------------------------------------------------------------

/// One malformed-bytes case on a fresh connection, then the server must be intact.
async fn check_malformed(fx: &mut Fixture, name: &str, bytes: &[u8], want: Want) -> Result<(), String> {
    let mut c = fx.conn().await;
    let got = exchange_on(&mut c, bytes)
        .await
        .map_err(|e| format!("{name} [{}]: {e}", shown(bytes)))?;
    judge(&mut c, got, want)
        .await
        .map_err(|e| format!("{name} [{}]: {e}", shown(bytes)))?;
    fx.intact(name).await
}

#[tokio::test]
async fn malformed_request_lines_are_refused_and_the_server_survives() {
    // A short header timeout so cases that leave hyper waiting for more bytes end quickly.
    let mut fx = Fixture::start(&["--header-read-timeout-ms", "2000"]).await;
    let long_path = |n: usize| format!("GET /{} HTTP/1.1\r\nHost: test\r\n\r\n", "a".repeat(n)).into_bytes();
    let tls_hello: &[u8] = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\x00\x01\x02\x03\x04\x05\x06\x07\r\n\r\n";
    let cases: Vec<(&str, Vec<u8>, Want)> = vec![
        ("tls client hello", tls_hello.to_vec(), Want::HyperOrClosed(400)),
        (
            "binary garbage",
            b"\xff\xfe\xfd\xfc\x00\x01\r\n\r\n".to_vec(),
            Want::HyperOrClosed(400),
        ),
        (
            "words, no request line",
            b"hello there\r\n\r\n".to_vec(),
            Want::HyperOrClosed(400),
        ),
        (
            "missing version",
            b"GET /healthz\r\nHost: test\r\n\r\n".to_vec(),
            Want::HyperOrClosed(400),
        ),
        (
            "missing target and version",
            b"GET\r\nHost: test\r\n\r\n".to_vec(),
            Want::HyperOrClosed(400),
        ),
        (
            "HTTP/9.9",
            b"GET / HTTP/9.9\r\nHost: test\r\n\r\n".to_vec(),
            Want::HyperOrClosed(400),
        ),
        (
            "HTTP/1.2",
            b"GET /healthz HTTP/1.2\r\nHost: test\r\n\r\n".to_vec(),
            Want::HyperOrClosed(400),
        ),
        (
            "lowercase http",
            b"GET /healthz http/1.1\r\nHost: test\r\n\r\n".to_vec(),
            Want::HyperOrClosed(400),
        ),
        // hyper recognises the HTTP/2 preface and, serving HTTP/1 only, closes without a word.
        (
            "HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            Want::Closed,
        ),
        (
            "NUL in the target",
            b"GET /heal\0thz HTTP/1.1\r\nHost: test\r\n\r\n".to_vec(),
            Want::HyperOrClosed(400),
        ),
        (
            "NUL in the method",
            b"G\0T /healthz HTTP/1.1\r\nHost: test\r\n\r\n".to_vec(),
            Want::HyperOrClosed(400),
        ),
        (
            "NUL in a header name",
            b"GET /healthz HTTP/1.1\r\nHo\0st: test\r\n\r\n".to_vec(),
            Want::HyperOrClosed(400),
        ),
        (
            "NUL in a header value",
            b"GET /healthz HTTP/1.1\r\nHost: te\0st\r\n\r\n".to_vec(),
            Want::HyperOrClosed(400),
        ),
        ("only NULs", vec![0u8; 64], Want::HyperOrClosed(400)),
        (
            "control byte in the target",
            b"GET /\x01 HTTP/1.1\r\nHost: test\r\n\r\n".to_vec(),
            Want::HyperOrClosed(400),
        ),
        (
            "two spaces",
            b"GET  /healthz  HTTP/1.1\r\nHost: test\r\n\r\n".to_vec(),
            Want::HyperOrClosed(400),
        ),
        (
            "tab separators",
            b"GET\t/healthz\tHTTP/1.1\r\nHost: test\r\n\r\n".to_vec(),
            Want::HyperOrClosed(400),
        ),
        (
            "space in the target",
            b"GET /health z HTTP/1.1\r\nHost: test\r\n\r\n".to_vec(),
            Want::HyperOrClosed(400),
        ),
        (
            "header without colon",
            b"GET /healthz HTTP/1.1\r\nHost test\r\n\r\n".to_vec(),
            Want::HyperOrClosed(400),
        ),
        (
            "space before colon",
            b"GET /healthz HTTP/1.1\r\nHost : test\r\n\r\n".to_vec(),
            Want::HyperOrClosed(400),
        ),
        (
            "obs-fold header",
            b"GET /healthz HTTP/1.1\r\nHost: test\r\n folded\r\n\r\n".to_vec(),
            Want::HyperOrClosed(400),
        ),
        (
            "bare CR line ends",
            b"GET /healthz HTTP/1.1\rHost: test\r\r".to_vec(),
            Want::HyperOrClosed(400),
        ),
        (
            "Content-Length not a number",
            b"PUT /v1/admin/courses/X HTTP/1.1\r\nHost: test\r\nContent-Length: abc\r\n\r\n".to_vec(),
            Want::Hyper(400),
        ),
        (
            "two different Content-Lengths",
            b"PUT /v1/admin/courses/X HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef"
                .to_vec(),
            Want::HyperOrClosed(400),
        ),
        (
            "Transfer-Encoding not ending in chunked",
            b"PUT /v1/admin/courses/X HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
            Want::Hyper(400),
        ),
        // A stream of nothing but LF: hyper skips empty lines before a request line, so it
        // buffers them until the head limit and answers 431 (or times out and closes).
        (
            "bare LF stream",
            vec![b'\n'; HEAD_BYTES_MAX + 1024],
            Want::HyperOrClosed(431),
        ),
        // Within the head limit a long path is an ordinary unknown route.
        (
            "long path under the head limit",
            long_path(8 * 1024),
            Want::Api(404, "not_found"),
        ),
        // Beyond it, hyper's buffer fills before the request line ends.
        (
            "very long path beyond the head limit",
            long_path(HEAD_BYTES_MAX + 1024),
            Want::HyperOrClosed(431),
        ),
        // Half a request line and nothing more: the header read timeout closes it.
        ("request line cut short", b"GET /heal".to_vec(), Want::Closed),
        // A request whose lines end in bare LF is valid HTTP/1.1: RFC 9112 section 2.2 lets a
        // recipient accept a lone LF as a line terminator, and hyper's parser (httparse) does.
        // Not an error: listed so a change of that behaviour is noticed.
        (
            "bare LF line ends (valid, lenient)",
            b"GET /healthz HTTP/1.1\nHost: test\n\n".to_vec(),
            Want::Ok(200),
        ),
    ];
    let mut failures = Vec::new();
    for (name, bytes, want) in &cases {
        if let Err(e) = check_malformed(&mut fx, name, bytes, *want).await {
            failures.push(e);
        }
    }
    report("malformed request lines", failures);
}

// ---------------------------------------------------------------------------------------------
// Oversize heads and bodies
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn oversize_heads_get_431_or_a_close() {
    let mut fx = Fixture::start(&[]).await;
    let padded = |pad_headers: usize, each: usize| {
        let mut h = b"GET /healthz HTTP/1.1\r\nHost: test\r\n".to_vec();
        for i in 0..pad_headers {
            h.extend_from_slice(format!("X-Pad-{i}: {}\r\n", "p".repeat(each)).as_bytes());
        }
        h.extend_from_slice(b"\r\n");
        h
    };
    let mut failures = Vec::new();
    // Control: a head comfortably under 16 KiB is served.
    let under = padded(14, 1000);
    assert!(under.len() < HEAD_BYTES_MAX - 512, "{}", under.len());
    match exchange(&fx.server, &under).await {
        Ok(Some(r)) if r.status == 200 => {}
        other => failures.push(format!("a {}-byte head: want 200, got {other:?}", under.len())),
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("20 headers of 1000 bytes (> 16 KiB)", padded(20, 1000)),
        ("one 17 KiB header", padded(1, HEAD_BYTES_MAX + 1024)),
        ("64 KiB of headers", padded(64, 1000)),
        // hyper also bounds the number of headers (100 by default) and answers 431 beyond.
        ("120 tiny headers", padded(120, 1)),
    ];
    for (name, bytes) in &cases {
        let mut c = fx.conn().await;
        let res = match exchange_on(&mut c, bytes).await {
            // The connection may be closed instead of answered: both are allowed.
            Ok(None) => Ok(()),
            Ok(got) => judge(&mut c, got, Want::HyperOrClosed(431)).await,
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            failures.push(format!("{name} ({} bytes): {e}", bytes.len()));
        }
        if let Err(e) = fx.intact(name).await {
            failures.push(e);
        }
    }
    report("oversize heads", failures);
}

/// A valid course body padded with trailing spaces to exactly `len` bytes.
fn padded_course_body(title: &str, len: usize) -> Vec<u8> {
    let mut b = format!(r#"{{"title":"{title}","capacity":5}}"#).into_bytes();
    assert!(b.len() <= len);
    b.resize(len, b' ');
    b
}

/// Chunked framing of `body` in chunks of `chunk` bytes; with the final `0` chunk when
/// `finish`.
fn chunked(body: &[u8], chunk: usize, finish: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for part in body.chunks(chunk) {
        out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    if finish {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    out
}

fn chunked_head(id: &str) -> Vec<u8> {
    format!(
        "PUT /v1/admin/courses/{id} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        admin_token()
    )
    .into_bytes()
}

#[tokio::test]
async fn oversize_bodies_get_413_payload_too_large() {
    let mut fx = Fixture::start(&[]).await;
    let admin = bearer(&admin_token());
    let mut failures = Vec::new();

    // Declared length one past the limit: refused from the head alone. Only the head is sent,
    // so the server never has unread bytes to reset the connection over.
    let head = format!(
        "PUT /v1/admin/courses/BIG-CL HTTP/1.1\r\nHost: test\r\nAuthorization: {admin}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        BODY_BYTES_MAX + 1
    );
    match exchange(&fx.server, head.as_bytes()).await {
        Ok(Some(r)) => {
            if let Err(e) = contract_error(&r, 413, "payload_too_large") {
                failures.push(format!("Content-Length {}: {e}", BODY_BYTES_MAX + 1));
            }
        }
        other => failures.push(format!(
            "Content-Length {}: want 413, got {other:?}",
            BODY_BYTES_MAX + 1
        )),
    }
    // The largest length hyper accepts (u64::MAX - 2): still ours to refuse with 413.
    let huge = head.replace(&format!("{}", BODY_BYTES_MAX + 1), &(u64::MAX - 2).to_string());
    match exchange(&fx.server, huge.as_bytes()).await {
        Ok(Some(r)) => {
            if let Err(e) = contract_error(&r, 413, "payload_too_large") {
                failures.push(format!("Content-Length u64::MAX - 2: {e}"));
            }
        }
        other => failures.push(format!("Content-Length u64::MAX - 2: want 413, got {other:?}")),
    }
    // Past that, hyper refuses the head itself ("content-length bigger than maximum") with its
    // bare 431 before our service runs: not API.md's 413 with a body, and not ours to change.
    let huge = head.replace(&format!("{}", BODY_BYTES_MAX + 1), &u64::MAX.to_string());
    let mut c = fx.conn().await;
    let res = match exchange_on(&mut c, huge.as_bytes()).await {
        Ok(got) => judge(&mut c, got, Want::Hyper(431)).await,
        Err(e) => Err(e),
    };
    if let Err(e) = res {
        failures.push(format!("Content-Length u64::MAX: {e}"));
    }

    // Chunked, no length: 64 KiB + 1 byte of chunks, no final chunk. The server must refuse
    // once it has counted past the limit, without waiting for the end.
    let mut bytes = chunked_head("BIG-CH");
    bytes.extend_from_slice(&chunked(&vec![b' '; BODY_BYTES_MAX], 4096, false));
    bytes.extend_from_slice(b"1\r\n \r\n");
    match exchange(&fx.server, &bytes).await {
        Ok(Some(r)) => {
            if let Err(e) = contract_error(&r, 413, "payload_too_large") {
                failures.push(format!("chunked {} bytes: {e}", BODY_BYTES_MAX + 1));
            }
        }
        other => failures.push(format!("chunked {} bytes: want 413, got {other:?}", BODY_BYTES_MAX + 1)),
    }
    // One single chunk that declares more than the limit.
    let mut bytes = chunked_head("BIG-CH1");
    bytes.extend_from_slice(format!("{:x}\r\n", BODY_BYTES_MAX + 1).as_bytes());
    bytes.extend_from_slice(&vec![b' '; BODY_BYTES_MAX + 1]);
    bytes.extend_from_slice(b"\r\n");
    match exchange(&fx.server, &bytes).await {
        Ok(Some(r)) => {
            if let Err(e) = contract_error(&r, 413, "payload_too_large") {
                failures.push(format!("one chunk of {} bytes: {e}", BODY_BYTES_MAX + 1));
            }
        }
        other => failures.push(format!(
            "one chunk of {} bytes: want 413, got {other:?}",
            BODY_BYTES_MAX + 1
        )),
    }
    for id in ["BIG-CL", "BIG-CH", "BIG-CH1"] {
        if course(&fx.server, id).await.is_some() {
            failures.push(format!("{id} was created by a refused body"));
        }
    }

    // Controls at the limit: exactly 64 KiB is allowed, declared or chunked.
    let at_limit = padded_course_body("At the limit", BODY_BYTES_MAX);
    let mut c = fx.conn().await;
    match exchange_on(
        &mut c,
        &raw(
            "PUT",
            b"/v1/admin/courses/EDGE-CL",
            &[("Authorization", &admin)],
            Some(at_limit.as_slice()),
        ),
    )
    .await
    {
        Ok(Some(r)) if r.status == 201 => {}
        other => failures.push(format!(
            "Content-Length {BODY_BYTES_MAX} (at the limit): want 201, got {other:?}"
        )),
    }
    let mut bytes = chunked_head("EDGE-CH");
    bytes.extend_from_slice(&chunked(&at_limit, 4096, true));
    match exchange(&fx.server, &bytes).await {
        Ok(Some(r)) if r.status == 201 => {}
        other => failures.push(format!(
            "chunked {BODY_BYTES_MAX} (at the limit): want 201, got {other:?}"
        )),
    }
    if let Err(e) = fx.intact("oversize bodies").await {
        failures.push(e);
    }
    report("oversize bodies", failures);
}

// ---------------------------------------------------------------------------------------------
// Bad course bodies on the admin PUT
// ---------------------------------------------------------------------------------------------

/// PUTs `body` to `id` as admin on `c`: must be 400 `bad_request`, and `id` must afterwards be
/// exactly `before` (absent when `None`).
async fn check_bad_body(
    fx: &Fixture,
    c: &mut Conn,
    name: &str,
    id: &str,
    body: &[u8],
    before: Option<&Value>,
) -> Result<(), String> {
    let admin = bearer(&admin_token());
    let req = raw(
        "PUT",
        format!("/v1/admin/courses/{id}").as_bytes(),
        &[("Authorization", &admin)],
        Some(body),
    );
    let got = exchange_on(c, &req).await.map_err(|e| format!("{name} on {id}: {e}"))?;
    let r = got.ok_or_else(|| format!("{name} on {id}: closed without an answer"))?;
    contract_error(&r, 400, "bad_request").map_err(|e| format!("{name} on {id} [{}]: {e}", shown(body)))?;
    let after = course(&fx.server, id).await;
    ensure(after.as_ref() == before, || {
        format!("{name} on {id}: course changed from {before:?} to {after:?}")
    })
}

#[tokio::test]
async fn bad_course_bodies_are_400_and_change_nothing() {
    let fx = Fixture::start(&[]).await;
    let mut c = fx.conn().await;
    put_course(&mut c, "BODY-01", 5).await;
    let existing = course(&fx.server, "BODY-01").await.unwrap();

    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let long_title = format!(r#"{{"title":"{}","capacity":3}}"#, "t".repeat(201));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not JSON", b"not json".to_vec()),
        ("empty body", b"".to_vec()),
        ("truncated", br#"{"title":"A","capacity":3"#.to_vec()),
        ("array", b"[]".to_vec()),
        ("null", b"null".to_vec()),
        ("a string", br#""title""#.to_vec()),
        ("a number", b"3".to_vec()),
        ("capacity as string", br#"{"title":"A","capacity":"3"}"#.to_vec()),
        ("capacity as float", br#"{"title":"A","capacity":3.5}"#.to_vec()),
        ("capacity as bool", br#"{"title":"A","capacity":true}"#.to_vec()),
        ("capacity null", br#"{"title":"A","capacity":null}"#.to_vec()),
        ("negative capacity", br#"{"title":"A","capacity":-1}"#.to_vec()),
        (
            "capacity above the maximum",
            br#"{"title":"A","capacity":100001}"#.to_vec(),
        ),
        ("capacity past u32", br#"{"title":"A","capacity":4294967296}"#.to_vec()),
        (
            "capacity past i64",
            br#"{"title":"A","capacity":18446744073709551616}"#.to_vec(),
        ),
        ("capacity 1e30", br#"{"title":"A","capacity":1e30}"#.to_vec()),
        ("title as number", br#"{"title":5,"capacity":3}"#.to_vec()),
        ("title null", br#"{"title":null,"capacity":3}"#.to_vec()),
        ("empty title", br#"{"title":"","capacity":3}"#.to_vec()),
        ("title of 201 chars", long_title.into_bytes()),
        (
            "control char in title",
            br#"{"title":"A\u0007B","capacity":3}"#.to_vec(),
        ),
        ("unknown field", br#"{"title":"A","capacity":3,"capcity":4}"#.to_vec()),
        ("missing title", br#"{"capacity":3}"#.to_vec()),
        ("missing capacity", br#"{"title":"A"}"#.to_vec()),
        ("duplicate field", br#"{"title":"A","title":"B","capacity":3}"#.to_vec()),
        (
            "opens_at not RFC 3339",
            br#"{"title":"A","capacity":3,"opens_at":"tomorrow"}"#.to_vec(),
        ),
        (
            "opens_at as number",
            br#"{"title":"A","capacity":3,"opens_at":0}"#.to_vec(),
        ),
        (
            "closes_at date only",
            br#"{"title":"A","capacity":3,"closes_at":"2030-01-01"}"#.to_vec(),
        ),
        (
            "closes_at before opens_at",
            br#"{"title":"A","capacity":3,"opens_at":"2030-01-02T00:00:00Z","closes_at":"2030-01-01T00:00:00Z"}"#
                .to_vec(),
        ),
        (
            "closes_at equal to opens_at",
            br#"{"title":"A","capacity":3,"opens_at":"2030-01-01T00:00:00Z","closes_at":"2030-01-01T00:00:00Z"}"#
                .to_vec(),
        ),
        (
            "invalid UTF-8 in title",
            b"{\"title\":\"\xff\xfe\",\"capacity\":3}".to_vec(),
        ),
        (
            "UTF-8 BOM first",
            b"\xef\xbb\xbf{\"title\":\"A\",\"capacity\":3}".to_vec(),
        ),
        ("trailing garbage", br#"{"title":"A","capacity":3} x"#.to_vec()),
        (
            "two objects",
            br#"{"title":"A","capacity":3}{"title":"B","capacity":4}"#.to_vec(),
        ),
        ("nested 5000 deep", deep.into_bytes()),
    ];
    let mut failures = Vec::new();
    for (i, (name, body)) in cases.iter().enumerate() {
        let fresh = format!("NEW-{i:02}");
        if let Err(e) = check_bad_body(&fx, &mut c, name, &fresh, body, None).await {
            failures.push(e);
            c = fx.conn().await;
        }
        if let Err(e) = check_bad_body(&fx, &mut c, name, "BODY-01", body, Some(&existing)).await {
            failures.push(e);
            c = fx.conn().await;
        }
    }
    // A chunked body whose framing is broken: the router cannot read it.
    let mut bytes = chunked_head("NEW-CHUNK");
    bytes.extend_from_slice(b"zz\r\n{}\r\n0\r\n\r\n");
    match exchange(&fx.server, &bytes).await {
        // hyper fails the body stream and the router answers 400 (or the connection ends).
        Ok(None) => {}
        Ok(Some(r)) => {
            if let Err(e) = contract_error(&r, 400, "bad_request") {
                failures.push(format!("broken chunk framing: {e}"));
            }
        }
        Err(e) => failures.push(format!("broken chunk framing: {e}")),
    }
    if course(&fx.server, "NEW-CHUNK").await.is_some() {
        failures.push("broken chunk framing created NEW-CHUNK".into());
    }
    // Control: the same route takes a good body, on the connection the cases used.
    let r = c
        .request(
            "PUT",
            "/v1/admin/courses/NEW-GOOD",
            Some(&admin_token()),
            Some(r#"{"title":"Good","capacity":3}"#),
        )
        .await;
    if r.status != 201 {
        failures.push(format!("control: a good body answered {} {}", r.status, text(&r.body)));
    }
    report("bad course bodies", failures);
}

// ---------------------------------------------------------------------------------------------
// Bad ids and unknown routes
// ---------------------------------------------------------------------------------------------

async fn check_route(
    fx: &mut Fixture,
    name: &str,
    method: &str,
    target: &[u8],
    authorization: Option<&str>,
    body: Option<&[u8]>,
    want: Want,
) -> Result<(), String> {
    let headers: Vec<(&str, &str)> = authorization.iter().map(|a| ("Authorization", *a)).collect();
    let mut c = fx.conn().await;
    let req = raw(method, target, &headers, body);
    let got = exchange_on(&mut c, &req)
        .await
        .map_err(|e| format!("{name} ({method} {}): {e}", shown(target)))?;
    judge(&mut c, got, want)
        .await
        .map_err(|e| format!("{name} ({method} {}): {e}", shown(target)))?;
    fx.intact(name).await
}

#[tokio::test]
async fn bad_ids_and_unknown_routes_are_400_or_404() {
    let mut fx = Fixture::start(&[]).await;
    let student = bearer(&token("idcheck"));
    let admin = bearer(&admin_token());
    let good_body: &[u8] = br#"{"title":"X","capacity":3}"#;
    let id33 = "x".repeat(33);
    let id32 = "y".repeat(32);
    let bad = Want::Api(400, "bad_request");
    let missing = Want::Api(404, "not_found");
    let s = Some(student.as_str());
    let a = Some(admin.as_str());
    #[rustfmt::skip]
    let cases: Vec<(&str, &str, Vec<u8>, Option<&str>, Option<&[u8]>, Want)> = vec![
        ("space as %20", "GET", b"/v1/courses/bad%20id".to_vec(), s, None, bad),
        ("space as %20, enroll", "POST", b"/v1/courses/bad%20id/enrollment".to_vec(), s, None, bad),
        ("space as %20, drop", "DELETE", b"/v1/courses/bad%20id/enrollment".to_vec(), s, None, bad),
        ("space as %20, admin put", "PUT", b"/v1/admin/courses/bad%20id".to_vec(), a, Some(good_body), bad),
        ("space as %20, roster", "GET", b"/v1/admin/courses/bad%20id/roster".to_vec(), a, None, bad),
        ("33-char id", "GET", format!("/v1/courses/{id33}").into_bytes(), s, None, bad),
        ("33-char id, enroll", "POST", format!("/v1/courses/{id33}/enrollment").into_bytes(), s, None, bad),
        ("33-char id, admin put", "PUT", format!("/v1/admin/courses/{id33}").into_bytes(), a, Some(good_body), bad),
        ("32-char id is valid (absent)", "GET", format!("/v1/courses/{id32}").into_bytes(), s, None, missing),
        ("empty id", "GET", b"/v1/courses/".to_vec(), s, None, bad),
        ("empty id, enroll", "POST", b"/v1/courses//enrollment".to_vec(), s, None, bad),
        ("a/b makes an unknown route", "POST", b"/v1/courses/a/b/enrollment".to_vec(), s, None, missing),
        ("a/b on GET", "GET", b"/v1/courses/a/b".to_vec(), s, None, missing),
        ("a/b on admin put", "PUT", b"/v1/admin/courses/a/b".to_vec(), a, Some(good_body), missing),
        ("encoded slash", "GET", b"/v1/courses/a%2Fb".to_vec(), s, None, bad),
        ("encoded NUL", "GET", b"/v1/courses/CS101%00".to_vec(), s, None, bad),
        ("unicode, percent-encoded", "GET", b"/v1/courses/%C3%A9t%C3%A9".to_vec(), s, None, bad),
        ("unicode, raw UTF-8", "GET", "/v1/courses/été".as_bytes().to_vec(), s, None, bad),
        ("emoji, raw UTF-8, enroll", "POST", "/v1/courses/😀/enrollment".as_bytes().to_vec(), s, None, bad),
        ("unicode, raw UTF-8, admin put", "PUT", "/v1/admin/courses/ß".as_bytes().to_vec(), a, Some(good_body), bad),
        // Bytes that are not UTF-8 at all: the http crate refuses the URI, so hyper answers.
        ("invalid UTF-8 in the path", "GET", b"/v1/courses/\xff\xfe".to_vec(), s, None, Want::HyperOrClosed(400)),
        ("dot-dot id", "GET", b"/v1/courses/..".to_vec(), s, None, missing),
        ("dot-dot walk to an admin route", "GET", format!("/v1/courses/../admin/courses/{KEEP}/roster").into_bytes(), s, None, missing),
        ("encoded dot-dot", "GET", b"/v1/courses/%2e%2e".to_vec(), s, None, bad),
        ("unknown /v1 route", "GET", b"/v1/nope".to_vec(), s, None, missing),
        ("unknown route outside /v1", "GET", b"/nope".to_vec(), None, None, missing),
        ("asterisk target", "GET", b"*".to_vec(), None, None, missing),
        ("limit=0", "GET", b"/v1/courses?limit=0".to_vec(), s, None, bad),
        ("limit=1001", "GET", b"/v1/courses?limit=1001".to_vec(), s, None, bad),
        ("limit=abc", "GET", b"/v1/courses?limit=abc".to_vec(), s, None, bad),
        ("after=bad%20id", "GET", b"/v1/courses?after=bad%20id".to_vec(), s, None, bad),
        ("after of 33 chars", "GET", format!("/v1/courses?after={id33}").into_bytes(), s, None, bad),
        ("unknown query parameter", "GET", b"/v1/courses?sort=desc".to_vec(), s, None, bad),
    ];
    let mut failures = Vec::new();
    for (name, method, target, auth, body, want) in &cases {
        if let Err(e) = check_route(&mut fx, name, method, target, *auth, *body, *want).await {
            failures.push(e);
        }
    }
    report("bad ids and routes", failures);
}

// ---------------------------------------------------------------------------------------------
// Forged tokens and roles
// ---------------------------------------------------------------------------------------------

/// HS256 over hand-made header and claims JSON, with `key`.
fn sign_raw(header: &Value, claims: &Value, key: &[u8]) -> String {
    let unsigned = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let alg = Algorithm::HS256;
    let sig = jsonwebtoken::crypto::sign(unsigned.as_bytes(), &EncodingKey::from_secret(key), alg).unwrap();
    format!("{unsigned}.{sig}")
}

fn encode(alg: Algorithm, claims: &Value, key: &[u8]) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(key)).unwrap()
}

const TOK: &str = "TOK-01";

/// Sends the enrollment POST with this `Authorization` value (none when `None`): must be 401
/// `unauthorized`.
async fn check_forged(fx: &mut Fixture, name: &str, authorization: Option<&str>) -> Result<(), String> {
    let mut headers = Vec::new();
    if let Some(a) = authorization {
        headers.push(("Authorization", a));
    }
    let req = raw(
        "POST",
        format!("/v1/courses/{TOK}/enrollment").as_bytes(),
        &headers,
        None,
    );
    let mut c = fx.conn().await;
    let got = exchange_on(&mut c, &req).await.map_err(|e| format!("{name}: {e}"))?;
    judge(&mut c, got, Want::Api(401, "unauthorized"))
        .await
        .map_err(|e| format!("{name}: {e}"))?;
    fx.intact(name).await
}

#[tokio::test]
async fn forged_tokens_are_401_and_take_no_seat() {
    let mut fx = Fixture::start(&[]).await;
    let mut c = fx.conn().await;
    put_course(&mut c, TOK, 5).await;
    let secret = SECRET.as_bytes();
    let exp = now_secs() + 3600;
    let claims = |sub: &str, role: &str| json!({"sub": sub, "role": role, "exp": exp});
    let hs256 = json!({"alg": "HS256", "typ": "JWT"});
    let good = encode(Algorithm::HS256, &claims("forger", "student"), secret);
    let (good_head, good_sig) = {
        let mut p = good.split('.');
        let h = p.next().unwrap().to_owned();
        p.next();
        (h, p.next().unwrap().to_owned())
    };
    let payload = b64(claims("forger", "student").to_string().as_bytes());
    let admin_payload = b64(claims("forger", "admin").to_string().as_bytes());
    let none_token = |alg: &str| {
        format!(
            "{}.{payload}.",
            b64(json!({"alg": alg, "typ": "JWT"}).to_string().as_bytes())
        )
    };

    let cases: Vec<(&str, Option<String>)> = vec![
        ("no Authorization header", None),
        ("alg none, unsigned", Some(bearer(&none_token("none")))),
        ("alg None, unsigned", Some(bearer(&none_token("None")))),
        (
            "alg none with the HS256 signature kept",
            Some(bearer(&format!(
                "{}.{payload}.{good_sig}",
                b64(br#"{"alg":"none","typ":"JWT"}"#)
            ))),
        ),
        (
            "signed with the wrong key",
            Some(bearer(&encode(
                Algorithm::HS256,
                &claims("forger", "student"),
                b"not-the-secret",
            ))),
        ),
        (
            "signed with an empty key",
            Some(bearer(&encode(Algorithm::HS256, &claims("forger", "student"), b""))),
        ),
        (
            "expired",
            Some(bearer(&encode(
                Algorithm::HS256,
                &json!({"sub": "forger", "role": "student", "exp": now_secs() - 60}),
                secret,
            ))),
        ),
        (
            "exp zero",
            Some(bearer(&encode(
                Algorithm::HS256,
                &json!({"sub": "forger", "role": "student", "exp": 0}),
                secret,
            ))),
        ),
        (
            "no exp claim",
            Some(bearer(&sign_raw(
                &hs256,
                &json!({"sub": "forger", "role": "student"}),
                secret,
            ))),
        ),
        (
            "exp as a string",
            Some(bearer(&sign_raw(
                &hs256,
                &json!({"sub": "forger", "role": "student", "exp": exp.to_string()}),
                secret,
            ))),
        ),
        (
            "HS384 signed with the right secret",
            Some(bearer(&encode(Algorithm::HS384, &claims("forger", "student"), secret))),
        ),
        (
            "HS512 signed with the right secret",
            Some(bearer(&encode(Algorithm::HS512, &claims("forger", "student"), secret))),
        ),
        (
            "payload swapped under a good signature",
            Some(bearer(&format!("{good_head}.{admin_payload}.{good_sig}"))),
        ),
        ("signature cut off", Some(bearer(&format!("{good_head}.{payload}")))),
        ("signature emptied", Some(bearer(&format!("{good_head}.{payload}.")))),
        ("garbage string", Some(bearer("garbage"))),
        ("three garbage parts", Some(bearer("a.b.c"))),
        ("empty bearer", Some("Bearer ".into())),
        ("missing Bearer prefix", Some(good.clone())),
        (
            "Basic scheme",
            Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("forger:pw")
            )),
        ),
        ("Bearer without the space", Some(format!("Bearer{good}"))),
        (
            "sub with a space",
            Some(bearer(&encode(Algorithm::HS256, &claims("a b", "student"), secret))),
        ),
        (
            "sub empty",
            Some(bearer(&encode(Algorithm::HS256, &claims("", "student"), secret))),
        ),
        (
            "sub of 65 chars",
            Some(bearer(&encode(
                Algorithm::HS256,
                &claims(&"s".repeat(65), "student"),
                secret,
            ))),
        ),
        (
            "sub with a slash",
            Some(bearer(&encode(
                Algorithm::HS256,
                &claims("../admin", "student"),
                secret,
            ))),
        ),
        (
            "sub missing",
            Some(bearer(&encode(
                Algorithm::HS256,
                &json!({"role": "student", "exp": exp}),
                secret,
            ))),
        ),
        (
            "role superuser",
            Some(bearer(&encode(
                Algorithm::HS256,
                &claims("forger", "superuser"),
                secret,
            ))),
        ),
        (
            "role Admin (wrong case)",
            Some(bearer(&encode(Algorithm::HS256, &claims("forger", "Admin"), secret))),
        ),
        (
            "role missing",
            Some(bearer(&encode(
                Algorithm::HS256,
                &json!({"sub": "forger", "exp": exp}),
                secret,
            ))),
        ),
        (
            "claims not JSON",
            Some(bearer(&{
                let unsigned = format!("{}.{}", b64(hs256.to_string().as_bytes()), b64(b"not json"));
                let sig = jsonwebtoken::crypto::sign(
                    unsigned.as_bytes(),
                    &EncodingKey::from_secret(secret),
                    Algorithm::HS256,
                )
                .unwrap();
                format!("{unsigned}.{sig}")
            })),
        ),
    ];
    let mut failures = Vec::new();
    for (name, auth) in &cases {
        if let Err(e) = check_forged(&mut fx, name, auth.as_deref()).await {
            failures.push(e);
        }
    }
    let tok = course(&fx.server, TOK).await.unwrap();
    if tok["enrolled"] != 0 || tok["seats_left"] != 5 {
        failures.push(format!("a forged token took a seat: {tok}"));
    }
    let students = roster(&mut c, TOK).await;
    if !students.is_empty() {
        failures.push(format!("roster of {TOK} after forged tokens: {students:?}"));
    }
    // Control: the real token does take the seat, so the 401s above were about the tokens.
    let r = c
        .request("POST", &format!("/v1/courses/{TOK}/enrollment"), Some(&good), None)
        .await;
    if r.status != 201 {
        failures.push(format!(
            "control: the good token answered {} {}",
            r.status,
            text(&r.body)
        ));
    }
    report("forged tokens", failures);
}

#[tokio::test]
async fn a_student_on_an_admin_route_is_403() {
    let mut fx = Fixture::start(&[]).await;
    let student = bearer(&token("nosy"));
    let body: &[u8] = br#"{"title":"Mine now","capacity":99}"#;
    let forbidden = Want::Api(403, "forbidden");
    let mut failures = Vec::new();
    let cases: Vec<(&str, &str, String, Option<&[u8]>)> = vec![
        ("create a course", "PUT", "/v1/admin/courses/STU-NEW".into(), Some(body)),
        (
            "change a course",
            "PUT",
            format!("/v1/admin/courses/{KEEP}"),
            Some(body),
        ),
        ("read a roster", "GET", format!("/v1/admin/courses/{KEEP}/roster"), None),
    ];
    for (name, method, path, body) in &cases {
        if let Err(e) = check_route(
            &mut fx,
            name,
            method,
            path.as_bytes(),
            Some(student.as_str()),
            *body,
            forbidden,
        )
        .await
        {
            failures.push(e);
        }
    }
    if course(&fx.server, "STU-NEW").await.is_some() {
        failures.push("a student created STU-NEW".into());
    }
    // And without any token the same routes are 401, not 403.
    for (name, method, path, body) in &cases {
        let name = format!("{name}, no token");
        let want = Want::Api(401, "unauthorized");
        if let Err(e) = check_route(&mut fx, &name, method, path.as_bytes(), None, *body, want).await {
            failures.push(e);
        }
    }
    report("student on admin routes", failures);
}

// ---------------------------------------------------------------------------------------------
// Error shape and request ids
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn every_error_answer_has_the_contract_shape_and_a_request_id() {
    let fx = Fixture::start(&[]).await;
    let mut c = fx.conn().await;
    let admin = admin_token();
    let student = token("shape");
    // A course that is full (capacity 0) and one whose registration closed long ago.
    put_course(&mut c, "FULL-01", 0).await;
    let r = c
        .request(
            "PUT",
            "/v1/admin/courses/SHUT-01",
            Some(&admin),
            Some(
                r#"{"title":"Shut","capacity":3,"opens_at":"2000-01-01T00:00:00Z","closes_at":"2000-01-02T00:00:00Z"}"#,
            ),
        )
        .await;
    assert_eq!(r.status, 201, "{}", text(&r.body));
    let (admin, student) = (admin.as_str(), student.as_str());
    let keep_enroll = format!("/v1/courses/{KEEP}/enrollment");
    let keep_put = format!("/v1/admin/courses/{KEEP}");
    #[rustfmt::skip]
    let cases: Vec<(&str, &str, &str, Option<&str>, Option<&str>, u16, &str)> = vec![
        ("bad id", "GET", "/v1/courses/bad%20id", Some(student), None, 400, "bad_request"),
        ("bad body", "PUT", "/v1/admin/courses/SHAPE-1", Some(admin), Some("{"), 400, "bad_request"),
        ("no token", "GET", "/v1/courses", None, None, 401, "unauthorized"),
        ("student on admin", "GET", "/v1/admin/courses/FULL-01/roster", Some(student), None, 403, "forbidden"),
        ("registration closed", "POST", "/v1/courses/SHUT-01/enrollment", Some(student), None, 403, "registration_closed"),
        ("no such course", "GET", "/v1/courses/NOPE-01", Some(student), None, 404, "not_found"),
        ("no such course, enroll", "POST", "/v1/courses/NOPE-01/enrollment", Some(student), None, 404, "not_found"),
        ("no such route", "GET", "/nope", None, None, 404, "not_found"),
        ("not enrolled", "DELETE", &keep_enroll, Some(student), None, 404, "not_enrolled"),
        // API.md has no 405 row; the router answers it with the `bad_request` code.
        ("wrong method on healthz", "DELETE", "/healthz", None, None, 405, "bad_request"),
        ("wrong method on a course", "PATCH", "/v1/courses/FULL-01", Some(student), None, 405, "bad_request"),
        ("course full", "POST", "/v1/courses/FULL-01/enrollment", Some(student), None, 409, "course_full"),
        ("capacity below enrolled", "PUT", &keep_put, Some(admin), Some(r#"{"title":"Course KEEP-01","capacity":0}"#), 409, "capacity_below_enrolled"),
    ];
    let mut failures = Vec::new();
    for (name, method, path, tok, body, status, code) in &cases {
        let r = c.request(method, path, *tok, *body).await;
        if let Err(e) = contract_error(&r, *status, code) {
            failures.push(format!("{name} ({method} {path}): {e}"));
        }
    }
    // 413 is covered with the oversize bodies; 429 and 503 need load or a broken store.
    let after = course(&fx.server, KEEP).await;
    if after.as_ref() != Some(&fx.baseline) {
        failures.push(format!("{KEEP} changed: {after:?}"));
    }
    report("error shape", failures);
}

/// Sends `GET path` with this raw `X-Request-Id` header line value, returns the answer.
async fn with_request_id(c: &mut Conn, path: &str, id: &[u8], token: Option<&str>) -> Result<Option<Resp>, String> {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n").into_bytes();
    if let Some(t) = token {
        req.extend_from_slice(format!("Authorization: Bearer {t}\r\n").as_bytes());
    }
    req.extend_from_slice(b"X-Request-Id: ");
    req.extend_from_slice(id);
    req.extend_from_slice(b"\r\n\r\n");
    exchange_on(c, &req).await
}

#[tokio::test]
async fn request_ids_are_echoed_when_valid_and_replaced_when_not() {
    let fx = Fixture::start(&[]).await;
    let student = token("rid");
    let mut failures = Vec::new();
    let id64 = "r".repeat(64);
    // Echoed as sent, on a success, on our own errors.
    let echoed: Vec<(&str, &str, Option<&str>, u16)> = vec![
        ("abc-123", "/healthz", None, 200),
        ("abc-123", "/v1/courses/NOPE-01", Some(student.as_str()), 404),
        ("abc-123", "/v1/courses/NOPE-01", None, 401),
        ("abc-123", "/v1/courses/bad%20id", Some(student.as_str()), 400),
        (&id64, "/healthz", None, 200),
        ("a", "/healthz", None, 200),
        ("with spaces and ~!@#$%^&*()", "/healthz", None, 200),
    ];
    let mut c = fx.conn().await;
    for (id, path, tok, status) in &echoed {
        match with_request_id(&mut c, path, id.as_bytes(), *tok).await {
            Ok(Some(r)) if r.status == *status && r.header("x-request-id") == Some(id) => {}
            other => failures.push(format!("id {id:?} on {path}: want {status} echoing it, got {other:?}")),
        }
    }
    // Replaced by a server-made id: too long, a control byte our check refuses (TAB passes
    // hyper's parser), non-ASCII bytes, empty.
    let id65 = "r".repeat(65);
    let replaced: Vec<(&str, Vec<u8>)> = vec![
        ("65 chars", id65.into_bytes()),
        ("a TAB inside", b"abc\tdef".to_vec()),
        ("non-ASCII bytes", "abc-é".as_bytes().to_vec()),
        ("obs-text byte", b"abc\x80".to_vec()),
        ("empty", b"".to_vec()),
    ];
    let mut made = Vec::new();
    for (name, id) in &replaced {
        match with_request_id(&mut c, "/healthz", id, None).await {
            Ok(Some(r)) if r.status == 200 => {
                let got = r.header("x-request-id").map(str::to_owned);
                match got {
                    Some(g) if g.as_bytes() != id.as_slice() && request_id_ok(&r).is_ok() => made.push(g),
                    other => failures.push(format!("id {name}: want a server-made id, got {other:?}")),
                }
            }
            other => {
                failures.push(format!("id {name}: want 200, got {other:?}"));
                c = fx.conn().await;
            }
        }
    }
    let mut unique = made.clone();
    unique.sort();
    unique.dedup();
    if unique.len() != made.len() {
        failures.push(format!("server-made ids repeat: {made:?}"));
    }
    // A control byte that hyper's header parser itself refuses (anything but TAB below 0x20,
    // and DEL): hyper answers its bare 400 before our code can make an id.
    for (name, id) in [
        ("SOH byte", &b"abc\x01def"[..]),
        ("DEL byte", &b"abc\x7fdef"[..]),
        ("NUL byte", &b"abc\0"[..]),
    ] {
        let mut c = fx.conn().await;
        let res = match with_request_id(&mut c, "/healthz", id, None).await {
            Ok(got) => judge(&mut c, got, Want::HyperOrClosed(400)).await,
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            failures.push(format!("id with a {name}: {e}"));
        }
    }
    report("request ids", failures);
}

// ---------------------------------------------------------------------------------------------
// Pipelining
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let fx = Fixture::start(&[]).await;
    let student = bearer(&token("piper"));
    let mut c = fx.conn().await;

    // Three requests in one write, read back in order.
    let mut bytes = raw("GET", b"/healthz", &[("X-Request-Id", "pipe-1")], None);
    bytes.extend(raw(
        "GET",
        format!("/v1/courses/{KEEP}").as_bytes(),
        &[("Authorization", &student), ("X-Request-Id", "pipe-2")],
        None,
    ));
    bytes.extend(raw("GET", b"/healthz", &[("X-Request-Id", "pipe-3")], None));
    c.send_raw(&bytes).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let r = tokio::time::timeout(ANSWER_WITHIN, c.read_response())
            .await
            .expect("answer in time")
            .expect("answer");
        got.push((r.status, r.header("x-request-id").unwrap_or("").to_owned(), r));
    }
    let ids: Vec<&str> = got.iter().map(|(_, id, _)| id.as_str()).collect();
    assert_eq!(ids, ["pipe-1", "pipe-2", "pipe-3"]);
    let statuses: Vec<u16> = got.iter().map(|(s, _, _)| *s).collect();
    assert_eq!(statuses, [200, 200, 200]);
    assert_eq!(got[1].2.json(), fx.baseline);

    // A write, then reads of it, in one pipeline: the answers reflect the order.
    let mut bytes = raw(
        "PUT",
        b"/v1/admin/courses/PIPE-01",
        &[("Authorization", &bearer(&admin_token())), ("X-Request-Id", "w-1")],
        Some(&br#"{"title":"Pipe","capacity":2}"#[..]),
    );
    bytes.extend(raw(
        "POST",
        b"/v1/courses/PIPE-01/enrollment",
        &[("Authorization", &student), ("X-Request-Id", "w-2")],
        Some(&b""[..]),
    ));
    bytes.extend(raw(
        "GET",
        b"/v1/courses/PIPE-01",
        &[("Authorization", &student), ("X-Request-Id", "w-3")],
        None,
    ));
    bytes.extend(raw(
        "GET",
        b"/v1/courses/bad%20id",
        &[("Authorization", &student), ("X-Request-Id", "w-4")],
        None,
    ));
    bytes.extend(raw("GET", b"/healthz", &[("X-Request-Id", "w-5")], None));
    c.send_raw(&bytes).await.unwrap();
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(
            tokio::time::timeout(ANSWER_WITHIN, c.read_response())
                .await
                .expect("answer in time")
                .expect("answer"),
        );
    }
    let ids: Vec<&str> = answers.iter().map(|r| r.header("x-request-id").unwrap_or("")).collect();
    assert_eq!(ids, ["w-1", "w-2", "w-3", "w-4", "w-5"]);
    let statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [201, 201, 200, 400, 200]);
    assert_eq!(answers[2].json()["enrolled"], 1);
    contract_error(&answers[3], 400, "bad_request").unwrap();

    assert_eq!(course(&fx.server, KEEP).await.as_ref(), Some(&fx.baseline));
}

/// FINDING (fails with `.pipeline_flush(true)` in src/net/mod.rs): the answer to a complete
/// request must not wait for, or be lost with, a later pipelined request that is garbage.
/// Today hyper does not flush while unparsed bytes sit in its read buffer, then hits the
/// garbage and closes: neither the 200 nor hyper's 400 is ever written.
/// Bytes: `GET /healthz HTTP/1.1\r\nHost: test\r\nX-Request-Id: before-garbage\r\n\r\n`
/// followed by `\x16\x03\x01garbage\r\n\r\n` in one write; the answer is an EOF.
#[tokio::test]
async fn pipelined_valid_request_before_garbage_is_still_answered() {
    let fx = Fixture::start(&[]).await;
    let mut c = fx.conn().await;
    let mut bytes = raw("GET", b"/healthz", &[("X-Request-Id", "before-garbage")], None);
    bytes.extend_from_slice(b"\x16\x03\x01garbage\r\n\r\n");
    c.send_raw(&bytes).await.unwrap();
    let first = tokio::time::timeout(ANSWER_WITHIN, c.read_response())
        .await
        .expect("answer or close in time")
        .expect("the valid request before the garbage was not answered (connection closed)");
    assert_eq!(
        (first.status, first.header("x-request-id")),
        (200, Some("before-garbage"))
    );
    // Then hyper's bare 400 for the garbage, or a close.
    let second = tokio::time::timeout(ANSWER_WITHIN, c.read_response())
        .await
        .expect("answer or close in time");
    if let Some(r) = second {
        assert_eq!((r.status, r.body.len()), (400, 0), "hyper's bare 400 for the garbage");
        assert!(closed_within(&mut c, ANSWER_WITHIN).await, "closed after the garbage");
    }
    assert_eq!(course(&fx.server, KEEP).await.as_ref(), Some(&fx.baseline));
}

/// FINDING (same cause): a complete request followed by the first bytes of the next one (as
/// a pipelining client whose write straddles a segment does) must be answered at once, not
/// held until the next head completes. Today the 200 is held, and when the header timeout
/// (3 s here) ends the connection the held answer is dropped: the client reads EOF.
/// Bytes: `GET /healthz HTTP/1.1\r\nHost: test\r\nX-Request-Id: first\r\n\r\nGET /hea`.
#[tokio::test]
async fn pipelined_answer_is_not_held_back_by_a_partial_next_request() {
    let fx = Fixture::start(&["--header-read-timeout-ms", "3000"]).await;
    let mut c = fx.conn().await;
    let mut bytes = raw("GET", b"/healthz", &[("X-Request-Id", "first")], None);
    bytes.extend_from_slice(b"GET /hea");
    c.send_raw(&bytes).await.unwrap();
    let first = tokio::time::timeout(ANSWER_WITHIN, c.read_response())
        .await
        .expect("answer or close in time")
        .expect("the complete request was never answered (connection closed at the header timeout)");
    assert_eq!((first.status, first.header("x-request-id")), (200, Some("first")));
    // The rest of the second request completes it normally.
    c.send_raw(b"lthz HTTP/1.1\r\nHost: test\r\nX-Request-Id: second\r\n\r\n")
        .await
        .unwrap();
    let second = tokio::time::timeout(ANSWER_WITHIN, c.read_response())
        .await
        .expect("in time")
        .expect("answer");
    assert_eq!((second.status, second.header("x-request-id")), (200, Some("second")));
}

// ---------------------------------------------------------------------------------------------
// Slowloris and idle connections
// ---------------------------------------------------------------------------------------------

/// Every slow or idle case runs against a server with a 500 ms header read timeout; each
/// must be closed within 10 s (no finer timing is asserted).
const SLOW: &[&str] = &["--header-read-timeout-ms", "500"];

#[tokio::test]
async fn half_a_head_then_silence_is_closed() {
    let mut fx = Fixture::start(SLOW).await;
    let mut c = fx.conn().await;
    c.send_raw(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        .await
        .unwrap();
    assert!(
        closed_within(&mut c, ANSWER_WITHIN).await,
        "a stalled head was not closed within {ANSWER_WITHIN:?}"
    );
    fx.intact("half a head").await.unwrap();
}

#[tokio::test]
async fn a_head_dribbled_byte_by_byte_is_closed() {
    // Each byte comes well inside the timeout, but the timeout covers the whole head.
    let mut fx = Fixture::start(SLOW).await;
    let mut c = fx.conn().await;
    c.send_raw(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let started = tokio::time::Instant::now();
    let mut closed = false;
    while started.elapsed() < ANSWER_WITHIN {
        if c.send_raw(b"X").await.is_err() {
            closed = true;
            break;
        }
        if closed_within(&mut c, Duration::from_millis(100)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "a dribbled head kept the connection open for {ANSWER_WITHIN:?}");
    fx.intact("dribbled head").await.unwrap();
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    let mut fx = Fixture::start(SLOW).await;
    let mut c = fx.conn().await;
    assert!(
        closed_within(&mut c, ANSWER_WITHIN).await,
        "a silent connection was not closed"
    );
    fx.intact("silent connection").await.unwrap();
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let mut fx = Fixture::start(SLOW).await;
    let mut c = fx.conn().await;
    let r = c.request("GET", "/healthz", None, None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("connection").is_none_or(|v| !v.eq_ignore_ascii_case("close")),
        "kept alive: {:?}",
        r.headers
    );
    assert!(
        closed_within(&mut c, ANSWER_WITHIN).await,
        "an idle keep-alive connection was not closed"
    );
    fx.intact("idle keep-alive").await.unwrap();
}

/// A client that sends a complete head and then stalls the body must not keep its
/// connection (and permit) forever: with `--connections-max 2` on one shard, two stalled
/// admin PUTs would otherwise lock every later client out. The body read timeout answers
/// them 408 and closes. A POST without a body route never waits on its body at all.
#[tokio::test]
async fn stalled_bodies_do_not_lock_out_new_clients() {
    let mut fx = Fixture::start(&[
        "--shards",
        "1",
        "--connections-max",
        "2",
        "--header-read-timeout-ms",
        "500",
        "--body-read-timeout-ms",
        "500",
    ])
    .await;
    // Let the fixture's own connections' permits come back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut stalled = Vec::new();
    for i in 0..2 {
        let mut c = fx.conn().await;
        let head = format!(
            "PUT /v1/admin/courses/STALL-{i} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"ti",
            admin_token()
        );
        c.send_raw(head.as_bytes()).await.unwrap();
        stalled.push(c);
    }
    for c in &mut stalled {
        let r = tokio::time::timeout(ANSWER_WITHIN, c.read_response())
            .await
            .expect("answered in time");
        let r = r.expect("a 408 before the close");
        assert_eq!(r.status, 408, "stalled body");
        assert_eq!(r.json()["error"], "bad_request");
    }
    fx.intact("two stalled bodies").await.unwrap();
}

/// The header-read timeout covers waiting for a head, not answering one: a head that is
/// complete in time, followed by a body that takes three head timeouts to arrive (inside
/// the body timeout), is answered, and the connection then serves another request.
#[tokio::test]
async fn a_slow_answer_is_not_cut_by_the_head_timeout() {
    let fx = Fixture::start(&["--header-read-timeout-ms", "300", "--body-read-timeout-ms", "5000"]).await;
    let mut c = fx.conn().await;
    let body = r#"{"title":"Slow body","capacity":3}"#;
    let head = format!(
        "PUT /v1/admin/courses/SLOW-BODY HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        admin_token(),
        body.len()
    );
    c.send_raw(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    c.send_raw(body.as_bytes()).await.unwrap();
    let r = tokio::time::timeout(ANSWER_WITHIN, c.read_response())
        .await
        .expect("answered in time")
        .expect("answered, not closed, although the answer took longer than the head timeout");
    assert!(
        r.status == 201 || r.status == 200,
        "slow PUT: {} {:?}",
        r.status,
        r.body
    );
    let again = c.request("GET", "/healthz", None, None).await;
    assert_eq!(again.status, 200, "the connection serves on");
}
