//! Routing of the API.md paths, request bodies and JSON answers.
//!
//! Why: this is the only place that turns bytes into typed commands and shard replies back
//! into bytes. Everything behind it receives validated ids and an authenticated caller.
//! Must never: decide a seat (that is the owner shard's), or answer a non-2xx without the
//! contract's error body.

use std::cell::Cell;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::auth::{Auth, Caller, Role, TokenCache};
use super::error::{ApiError, RETRY_AFTER_SECS};
use crate::ids::{parse_rfc3339, rfc3339, CourseId, UnixMs};
use crate::limit::{ClientAddr, Dimension, Refusal, RouteGroup};
use crate::metrics::{Attempt, Metrics, Reject, ShardMetrics};
use crate::model::{CourseSpec, Standing, CAPACITY_MAX, WAITLIST_MAX};
use crate::shard::table::{CourseView, EnrollmentView};
use crate::shard::{Command, Reply, Router};

/// Limits of one request, from configuration.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    pub body_bytes_max: usize,
    /// Time a request body may take to arrive (a stalled body must not pin its connection).
    pub body_read_timeout_ms: u64,
}

/// Catalog page size when `limit` is not given, and the most a page may hold.
pub const PAGE_COURSES_DEFAULT: usize = 100;
pub const PAGE_COURSES_MAX: usize = 1_000;
/// Longest course title.
pub const TITLE_CHARS_MAX: usize = 200;
/// The instants a course may name: those whose UTC form has a four-digit year, so the
/// answer can render them back (0000-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z).
const INSTANT_MS_MIN: UnixMs = -62_167_219_200_000;
const INSTANT_MS_MAX: UnixMs = 253_402_300_799_999;
/// Longest client-sent request id echoed back.
pub const REQUEST_ID_BYTES_MAX: usize = 64;
/// Path segments the longest route has (`/v1/admin/courses/{id}/roster`). A path is split
/// into one more at most, so a longer path still matches no route.
const PATH_SEGMENTS_MAX: usize = 5;
/// The request id header, as a constant: a name given as `&str` is allocated per use.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const CONTENT_TYPE_JSON: &str = "application/json; charset=utf-8";
/// Bytes of the chunk generated request ids are cut from (about 150 ids).
const REQUEST_ID_CHUNK_BYTES: usize = 4_096;
const _: () = assert!(REQUEST_ID_CHUNK_BYTES >= REQUEST_ID_BYTES_MAX);

/// Cluster mode's part of a shard's request context.
pub struct ClusterCtx {
    pub cluster: Arc<crate::cluster::Cluster>,
    /// Every course, for the reads of courses other nodes own.
    pub catalog: Arc<crate::cluster::catalog::Catalog>,
    pub forwarder: crate::cluster::forward::Forwarder,
    /// This node's id, for `X-Enrolld-Node`.
    pub node: HeaderValue,
    pub metrics: Arc<crate::metrics::ClusterMetrics>,
}

/// How long a request for a course no live node owns waits for a takeover before it is
/// answered 503: a node that stopped with SIGTERM hands over within a heartbeat.
const UNOWNED_WAIT_MS: u64 = 2_000;
/// How often such a request looks again.
const UNOWNED_POLL_MS: u64 = 20;

/// Per-shard request context.
pub struct Ctx {
    pub router: Router,
    pub auth: Arc<Auth>,
    pub limits: HttpLimits,
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    pub metrics: Arc<Metrics>,
    /// Log one line per request (with its id) at info level.
    pub access_log: bool,
    /// Count requests in the shard's metrics.
    pub metrics_on: bool,
    /// Cluster mode (None on a single node).
    pub cluster: Option<ClusterCtx>,
    request_seq: Cell<u64>,
    request_prefix: String,
    /// Generated request ids are cut from this chunk (one allocation per
    /// `REQUEST_ID_CHUNK_BYTES`, not one per request).
    request_ids: std::cell::RefCell<bytes::BytesMut>,
}

impl Ctx {
    pub fn new(
        router: Router,
        auth: Arc<Auth>,
        limits: HttpLimits,
        ready: Arc<std::sync::atomic::AtomicBool>,
        metrics: Arc<Metrics>,
        access_log: bool,
        metrics_on: bool,
        cluster: Option<ClusterCtx>,
    ) -> Ctx {
        let request_prefix = format!("{:06x}{}", std::process::id() & 0xff_ffff, router.me.id.0);
        Ctx {
            router,
            auth,
            limits,
            ready,
            metrics,
            access_log,
            metrics_on,
            cluster,
            request_seq: Cell::new(0),
            request_prefix,
            request_ids: std::cell::RefCell::new(bytes::BytesMut::new()),
        }
    }

    /// The client's request id when it is 1-64 printable ASCII chars, else a fresh one.
    fn request_id(&self, headers: &hyper::HeaderMap) -> HeaderValue {
        if let Some(v) = headers.get(&X_REQUEST_ID) {
            let b = v.as_bytes();
            if !b.is_empty() && b.len() <= REQUEST_ID_BYTES_MAX && b.iter().all(|c| (0x20..0x7f).contains(c)) {
                return v.clone();
            }
        }
        let n = self.request_seq.get() + 1;
        self.request_seq.set(n);
        cut_request_id(&mut self.request_ids.borrow_mut(), &self.request_prefix, n)
    }
}

/// Request id `PREFIX-N`, cut from a shared chunk: the header value shares the chunk
/// instead of owning a copy, and a new chunk is made when this one is nearly used up.
fn cut_request_id(chunk: &mut bytes::BytesMut, prefix: &str, n: u64) -> HeaderValue {
    if chunk.capacity() - chunk.len() < REQUEST_ID_BYTES_MAX {
        *chunk = bytes::BytesMut::with_capacity(REQUEST_ID_CHUNK_BYTES);
    }
    write!(chunk, "{prefix}-{n:x}").expect("writing to a BytesMut");
    HeaderValue::from_maybe_shared(chunk.split().freeze()).expect("hex and digits are valid")
}

/// A JSON response. Its `Content-Type` (and `X-Request-Id`) are set by [`handle`], on
/// the request's recycled header map, so building one allocates no header map.
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp
}

fn json_of(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    json(status, serde_json::to_vec(value).expect("plain structs serialize"))
}

/// The hyper service: every request goes through here.
/// Ends a connection without an answer: the outcome of its request is not known in time.
/// hyper closes the connection on a service error, which the contract allows ("no answer
/// may go either way"); a 503 would claim that nothing was recorded.
#[derive(Debug, thiserror::Error)]
#[error("the outcome of the request is not known; connection closed")]
pub struct OutcomeUnknown;

pub async fn handle(
    ctx: Rc<Ctx>,
    conn: Rc<super::ConnState>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, OutcomeUnknown> {
    let started = tokio::time::Instant::now();
    conn.busy();
    // The request's header map, emptied, becomes the response's, and hyper hands the
    // response's back for the next request head: no header map is allocated per request.
    let headers = std::mem::take(req.headers_mut());
    let rid = ctx.request_id(&headers);
    let method = req.method().clone();
    // A clone of the URI shares hyper's buffer (no copy), so the segments can borrow from
    // it while `req` moves on.
    let uri = req.uri().clone();
    let path = uri.path();
    let (parts, len) = split_path(path);
    let segments = &parts[..len];
    let route_label = route_label(&method, segments);
    let mut resp = match route(&ctx, &conn.tokens, peer, segments, &headers, &rid, req).await {
        Ok(resp) => resp,
        Err(ApiError::OutcomeUnknown) => {
            let rid = rid.to_str().unwrap_or("-");
            tracing::warn!(request_id = rid, %method, %path, "outcome not known in time; closing the connection");
            return Err(OutcomeUnknown);
        }
        Err(e) => {
            let rid = rid.to_str().unwrap_or("-");
            if e.status().is_server_error() {
                tracing::warn!(request_id = rid, %method, %path, error = %e, "request failed");
            } else {
                tracing::debug!(request_id = rid, %method, %path, error = %e, "request refused");
            }
            e.into_response()
        }
    };
    let status = resp.status().as_u16();
    let done = tokio::time::Instant::now();
    // The next head's time starts now (see `ConnState`).
    conn.idle(done);
    // 401s are counted apart so a flood of forged tokens does not hide in a route's figures.
    let label = if status == 401 { ROUTE_UNAUTHORIZED } else { route_label };
    if ctx.metrics_on {
        ctx.router.me.metrics.request(label, status, done - started);
    }
    if ctx.access_log {
        tracing::info!(
            request_id = rid.to_str().unwrap_or("-"),
            %method,
            %path,
            status,
            elapsed_us = (done - started).as_micros() as u64,
            "request"
        );
    }
    *resp.headers_mut() = response_headers(headers, std::mem::take(resp.headers_mut()), rid);
    if let (Some(cluster), ["v1", ..]) = (&ctx.cluster, segments) {
        // The owner's, when the answer came from it.
        if !resp.headers().contains_key(crate::cluster::forward::X_ENROLLD_NODE) {
            resp.headers_mut()
                .insert(crate::cluster::forward::X_ENROLLD_NODE, cluster.node.clone());
        }
    }
    Ok(resp)
}

/// The response's headers on the request's (emptied) map: what the route set (rarely
/// anything: Retry-After, a Content-Type other than JSON), then JSON's Content-Type if the
/// route set none, and the request id.
fn response_headers(mut map: hyper::HeaderMap, set: hyper::HeaderMap, rid: HeaderValue) -> hyper::HeaderMap {
    map.clear();
    let mut name = None;
    for (n, v) in set {
        // Further values of one name come with `None`.
        if n.is_some() {
            name = n;
        }
        if let Some(n) = &name {
            map.append(n.clone(), v);
        }
    }
    if !map.contains_key(CONTENT_TYPE) {
        map.insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_JSON));
    }
    map.insert(X_REQUEST_ID, rid);
    map
}

/// The path's segments after the leading `/`, on the stack: at most
/// `PATH_SEGMENTS_MAX + 1` (the rest of a longer path is left out; it matches no route).
fn split_path(path: &str) -> ([&str; PATH_SEGMENTS_MAX + 1], usize) {
    let mut parts = [""; PATH_SEGMENTS_MAX + 1];
    let mut len = 0;
    for (slot, segment) in parts.iter_mut().zip(path.strip_prefix('/').unwrap_or(path).split('/')) {
        *slot = segment;
        len += 1;
    }
    (parts, len)
}

/// Index into [`crate::metrics::ROUTES`] of `unauthorized`.
const ROUTE_UNAUTHORIZED: usize = 12;
const _: () = assert!(ROUTE_UNAUTHORIZED == crate::metrics::ROUTES.len() - 1);

/// The metrics label of a request: an index into [`crate::metrics::ROUTES`].
fn route_label(method: &Method, segments: &[&str]) -> usize {
    match (method, segments) {
        (&Method::POST, ["v1", "courses", _, "enrollment"]) => 0,
        (&Method::DELETE, ["v1", "courses", _, "enrollment"]) => 1,
        (&Method::GET, ["v1", "courses", _]) => 2,
        (&Method::GET, ["v1", "courses"]) => 3,
        (&Method::GET, ["v1", "me", "enrollments"]) => 4,
        (&Method::PUT, ["v1", "admin", "courses", _]) => 5,
        (&Method::GET, ["v1", "admin", "courses", _, "roster"]) => 6,
        (_, ["healthz" | "readyz"]) => 7,
        (_, ["metrics"]) => 8,
        (&Method::GET, ["v1", "admin", "courses", _, "draw"]) => 10,
        (&Method::GET, ["v1", "admin", "events"]) => 11,
        _ => 9,
    }
}

/// The course a request is about, on routes that only its owner may answer.
fn owned_route<'a>(method: &Method, segments: &[&'a str]) -> Option<&'a str> {
    match (method, segments) {
        (_, ["v1", "courses", id, "enrollment"])
        | (&Method::GET, ["v1", "courses", id])
        | (&Method::PUT, ["v1", "admin", "courses", id])
        | (&Method::GET, ["v1", "admin", "courses", id, "roster"]) => Some(id),
        _ => None,
    }
}

/// Cluster mode: `Ok(None)` when this node owns the request's course (or the route has
/// none); otherwise the owner's answer (one hop), or the error for none.
async fn pass_to_owner(
    ctx: &Ctx,
    cluster: &ClusterCtx,
    course: &str,
    headers: &hyper::HeaderMap,
    rid: &HeaderValue,
    req: Request<Incoming>,
) -> Result<Result<Response<Full<Bytes>>, Request<Incoming>>, ApiError> {
    use crate::cluster::forward::HopError;
    use crate::cluster::Route;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(UNOWNED_WAIT_MS);
    let method = req.method().clone();
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
    let mut req = Some(req);
    let mut body: Option<Bytes> = None;
    loop {
        let advertise = match cluster.cluster.route(course) {
            Route::Here => {
                return match req.take() {
                    Some(req) => Ok(Err(req)),
                    // The body went to a hop that could not be made, and this node took the
                    // course over meanwhile. Nothing was sent: the client retries.
                    None => Err(ApiError::Unavailable),
                };
            }
            // Passed on once already: never again (the nodes disagree for a moment).
            Route::Node { .. } if headers.contains_key(crate::cluster::forward::X_ENROLLD_HOP) => {
                return Err(ApiError::Unavailable)
            }
            Route::Node { advertise, .. } => Some(advertise),
            Route::Nobody => None,
        };
        if let Some(advertise) = advertise {
            // Only an admin PUT has a body to pass on; other requests keep theirs (none), so
            // they can still be answered here if this node takes the course over.
            let bytes = match &body {
                Some(b) => b.clone(),
                None if method == Method::PUT => match req.take() {
                    Some(r) => read_body(r, &ctx.limits).await?,
                    None => Bytes::new(),
                },
                None => Bytes::new(),
            };
            body = Some(bytes.clone());
            match cluster
                .forwarder
                .forward(&advertise, &method, &path, headers, rid, bytes)
                .await
            {
                Ok(resp) => {
                    cluster.metrics.hops.inc();
                    if method != Method::GET && resp.status().is_success() {
                        // Read your writes here: the cache's copy is behind until the
                        // owner's change arrives.
                        cluster.catalog.passed_on(course);
                    }
                    return Ok(Ok(resp));
                }
                // Nothing was sent (no hop): wait for a takeover, as for a course nobody owns.
                Err(HopError::Unreachable(to)) => tracing::debug!(node = %to, "owner unreachable"),
                Err(e) => {
                    cluster.metrics.hops.inc();
                    cluster.metrics.hops_failed.inc();
                    tracing::warn!(error = %e, "hop failed");
                    return Err(match e {
                        HopError::TimedOut(_) => ApiError::HopTimedOut,
                        HopError::Cut(_) | HopError::Unreachable(_) => ApiError::HopCut,
                    });
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            // Nothing was sent anywhere: nothing recorded.
            return Err(ApiError::Unavailable);
        }
        // Nobody owns it, or its owner does not answer: the keeper looks now.
        cluster.cluster.wake_keeper();
        tokio::time::sleep(std::time::Duration::from_millis(UNOWNED_POLL_MS)).await;
    }
}

async fn route(
    ctx: &Ctx,
    tokens: &TokenCache,
    peer: SocketAddr,
    segments: &[&str],
    headers: &hyper::HeaderMap,
    rid: &HeaderValue,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let method = req.method().clone();
    match (&method, segments) {
        (&Method::GET, ["healthz"]) => return Ok(json(StatusCode::OK, &br#"{"status":"ok"}"#[..])),
        (&Method::GET, ["readyz"]) => return Ok(readyz(ctx)),
        (&Method::GET, ["metrics"]) => return Ok(metrics(ctx)),
        (_, ["healthz" | "readyz" | "metrics"]) => return Err(ApiError::MethodNotAllowed { allow: "GET" }),
        (_, ["v1", ..]) => {}
        _ => return Err(ApiError::NotFound("no such route")),
    }
    let caller = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|h| ctx.auth.verify_cached(h.as_bytes(), tokens))
        .ok_or(ApiError::Unauthorized)?;
    // A time ticket: no enrollment POST before it, on any course (API.md).
    if let (Some(from), &Method::POST, ["v1", "courses", _, "enrollment"]) = (caller.enroll_from, &method, segments) {
        // Seconds beyond any clock (year 9999) keep the student out for good.
        let from_ms = i64::try_from(from)
            .ok()
            .and_then(|s| s.checked_mul(1000))
            .unwrap_or(i64::MAX);
        if crate::ids::now_ms() < from_ms {
            return Err(ApiError::TicketNotYet(format!(
                "your registration opens at {} (time ticket)",
                rfc3339(from_ms.min(INSTANT_MS_MAX))
            )));
        }
    }
    let query = req.uri().query().map(str::to_owned);
    if declared_length(headers).is_some_and(|n| n > ctx.limits.body_bytes_max as u64) {
        return Err(ApiError::PayloadTooLarge);
    }
    // Cluster mode: a course another node owns is read from the catalog cache...
    if let (Some(cluster), &Method::GET, ["v1", "courses", id]) = (&ctx.cluster, &method, segments) {
        if CourseId::valid(id) && cluster.cluster.route(id) != crate::cluster::Route::Here {
            if let Some(view) = cluster.catalog.get(id) {
                return Ok(json(StatusCode::OK, render_course(&view)));
            }
        }
    }
    // ...and any other request about it is the owner's to answer (its limits apply
    // there).
    let req = match (&ctx.cluster, owned_route(&method, segments)) {
        (Some(cluster), Some(course)) if CourseId::valid(course) => {
            match pass_to_owner(ctx, cluster, course, headers, rid, req).await? {
                Ok(answer) => return Ok(answer),
                Err(req) => req,
            }
        }
        _ => req,
    };
    let group = match (&method, &segments[1..]) {
        (&Method::POST, ["courses", _, "enrollment"]) => RouteGroup::Enroll,
        (&Method::DELETE, ["courses", _, "enrollment"]) => RouteGroup::Drop,
        _ => RouteGroup::Read,
    };
    // Repeated X-Forwarded-For lines are one list, in order (RFC 9110 §5.3): a client's
    // own line first, the proxy's appended line last.
    let forwarded_for = join_header_lines(headers, "x-forwarded-for");
    let client = ClientAddr {
        peer,
        forwarded_for: forwarded_for.as_deref(),
        real_ip: headers.get("x-real-ip").map(|v| v.as_bytes()),
    };
    let me = &ctx.router.me;
    let is_admin = caller.role == Role::Admin;
    let admitted = me
        .limiter
        .admit_request(group, &caller.id, caller.tier.as_deref(), is_admin, client)
        .await;
    let (admission, _in_flight) = admitted.map_err(|refusal| refuse(&me.metrics, group, refusal))?;
    match (&method, &segments[1..]) {
        (&Method::GET, ["courses"]) => list_courses(ctx, query.as_deref()).await,
        (&Method::GET, ["courses", id]) => {
            let id = course_id(id)?;
            reply(ctx.router.call(&id, Command::Course(id.clone())).await)
        }
        (&Method::POST, ["courses", id, "enrollment"]) => {
            if !CourseId::valid(id) {
                return Err(bad_course_id());
            }
            let student = caller.id.clone();
            let answer = ctx
                .router
                .call_existing(id, |course| Command::Enroll {
                    course,
                    student,
                    admission,
                })
                .await;
            if ctx.metrics_on {
                count_attempt(&me.metrics, me.persist().store_ok(), &answer);
            }
            reply(answer)
        }
        (&Method::DELETE, ["courses", id, "enrollment"]) => {
            let course = course_id(id)?;
            let cmd = Command::Drop {
                course: course.clone(),
                student: caller.id.clone(),
            };
            match ctx.router.call(&course, cmd).await {
                Reply::Dropped(status) => Ok(json_of(
                    StatusCode::OK,
                    &serde_json::json!({"course_id": course, "student_id": caller.id, "status": status}),
                )),
                other => reply(other),
            }
        }
        (&Method::GET, ["me", "enrollments"]) => my_enrollments(ctx, &caller).await,
        (&Method::PUT, ["admin", "courses", id]) => {
            admin(&caller)?;
            let course = course_id(id)?;
            let spec = course_spec(&read_body(req, &ctx.limits).await?)?;
            reply(
                ctx.router
                    .call(
                        &course,
                        Command::Put {
                            course: course.clone(),
                            spec,
                        },
                    )
                    .await,
            )
        }
        (&Method::GET, ["admin", "courses", id, "roster"]) => {
            admin(&caller)?;
            let course = course_id(id)?;
            match ctx.router.call(&course, Command::Roster(course.clone())).await {
                Reply::Roster { students, waitlist } => Ok(json_of(
                    StatusCode::OK,
                    &serde_json::json!({"course_id": course, "students": students, "waitlist": waitlist}),
                )),
                other => reply(other),
            }
        }
        (&Method::GET, ["admin", "courses", id, "draw"]) => {
            admin(&caller)?;
            let course = course_id(id)?;
            draw_record(ctx, course).await
        }
        (&Method::GET, ["admin", "events"]) => {
            admin(&caller)?;
            events(ctx, query.as_deref()).await
        }
        (
            _,
            ["courses"]
            | ["courses", _]
            | ["me", "enrollments"]
            | ["admin", "courses", _, "roster"]
            | ["admin", "courses", _, "draw"]
            | ["admin", "events"],
        ) => Err(ApiError::MethodNotAllowed { allow: "GET" }),
        (_, ["courses", _, "enrollment"]) => Err(ApiError::MethodNotAllowed { allow: "POST, DELETE" }),
        (_, ["admin", "courses", _]) => Err(ApiError::MethodNotAllowed { allow: "PUT" }),
        _ => Err(ApiError::NotFound("no such route")),
    }
}

/// Counts and maps a refusal by net/'s limits.
fn refuse(m: &ShardMetrics, group: RouteGroup, refusal: Refusal) -> ApiError {
    let (reason, err) = match refusal {
        Refusal::Limited(d, secs) => (reject_of(d), ApiError::RateLimited { retry_after_secs: secs }),
        Refusal::Flow => (
            Reject::Flow,
            ApiError::RateLimited {
                retry_after_secs: RETRY_AFTER_SECS,
            },
        ),
        Refusal::Shed => (Reject::Flow, ApiError::Unavailable),
    };
    if group == RouteGroup::Enroll {
        m.reject(reason);
        m.attempt(if refusal == Refusal::Shed {
            Attempt::Unavailable
        } else {
            Attempt::RateLimited
        });
    }
    err
}

fn reject_of(d: Dimension) -> Reject {
    match d {
        Dimension::User => Reject::User,
        Dimension::Course => Reject::Course,
        Dimension::Ipseg => Reject::Ipseg,
    }
}

fn count_attempt(m: &ShardMetrics, store_ok: bool, r: &Reply) {
    let a = match r {
        Reply::RateLimited(d, _) => {
            m.reject(reject_of(*d));
            Attempt::RateLimited
        }
        Reply::Unavailable if !store_ok => {
            m.reject(Reject::Breaker);
            Attempt::Unavailable
        }
        Reply::Enrolled { created: true, .. } => Attempt::Enrolled,
        Reply::Enrolled { created: false, .. } => Attempt::Already,
        Reply::Full => {
            m.reject(Reject::Full);
            Attempt::Full
        }
        Reply::Closed => Attempt::Closed,
        Reply::NotFound => Attempt::NotFound,
        Reply::Placed(_) => Attempt::Placed,
        _ => Attempt::Unavailable,
    };
    m.attempt(a);
}

/// All lines of a header joined with ", " (`None` when absent).
fn join_header_lines(headers: &hyper::HeaderMap, name: &str) -> Option<Vec<u8>> {
    let mut lines = headers.get_all(name).iter();
    let first = lines.next()?;
    let mut joined = first.as_bytes().to_vec();
    for more in lines {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(more.as_bytes());
    }
    Some(joined)
}

fn admin(caller: &Caller) -> Result<(), ApiError> {
    if caller.role == Role::Admin {
        Ok(())
    } else {
        Err(ApiError::Forbidden)
    }
}

fn course_id(s: &str) -> Result<CourseId, ApiError> {
    CourseId::parse(s).ok_or_else(bad_course_id)
}

fn bad_course_id() -> ApiError {
    ApiError::BadRequest("course id must be 1-32 chars of [A-Za-z0-9_.-]".into())
}

fn declared_length(headers: &hyper::HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
}

/// Reads the whole body of a route that takes one, refusing (413) past `body_bytes_max`
/// while reading, and giving up (408) when it does not arrive in `body_read_timeout_ms`.
/// Routes without a body never read it; hyper closes such a connection after answering
/// if the client sent one anyway.
async fn read_body(req: Request<Incoming>, limits: &HttpLimits) -> Result<Bytes, ApiError> {
    let reading = Limited::new(req.into_body(), limits.body_bytes_max).collect();
    match tokio::time::timeout(std::time::Duration::from_millis(limits.body_read_timeout_ms), reading).await {
        Err(_elapsed) => Err(ApiError::BodyTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(ApiError::PayloadTooLarge),
        Ok(Err(_)) => Err(ApiError::BadRequest("could not read the request body".into())),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CourseBody {
    title: String,
    /// Any JSON number: `47.0` is the integer 47 (JSON has one number type), `47.5` no capacity.
    capacity: serde_json::Number,
    #[serde(default)]
    opens_at: Option<String>,
    #[serde(default)]
    closes_at: Option<String>,
    #[serde(default)]
    draw_at: Option<String>,
    #[serde(default)]
    waitlist_max: Option<serde_json::Number>,
}

fn course_spec(body: &[u8]) -> Result<CourseSpec, ApiError> {
    let b: CourseBody =
        serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("bad course body: {e}")))?;
    let title_chars = b.title.chars().count();
    if title_chars == 0 || title_chars > TITLE_CHARS_MAX || b.title.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(format!(
            "title must be 1-{TITLE_CHARS_MAX} printable chars"
        )));
    }
    let integral = |f: f64| (f.fract() == 0.0 && f >= 0.0).then_some(f as u64);
    let capacity = b
        .capacity
        .as_u64()
        .or_else(|| b.capacity.as_f64().and_then(integral))
        .and_then(|c| u32::try_from(c).ok())
        .filter(|c| *c <= CAPACITY_MAX)
        .ok_or_else(|| ApiError::BadRequest(format!("capacity must be 0-{CAPACITY_MAX}")))?;
    let instant = |v: Option<String>, name: &str| -> Result<Option<UnixMs>, ApiError> {
        v.map(|s| {
            parse_rfc3339(&s)
                .filter(|ms| (INSTANT_MS_MIN..=INSTANT_MS_MAX).contains(ms))
                .ok_or_else(|| ApiError::BadRequest(format!("{name} must be RFC 3339, years 0000-9999 in UTC")))
        })
        .transpose()
    };
    let opens_at = instant(b.opens_at, "opens_at")?;
    let closes_at = instant(b.closes_at, "closes_at")?;
    if let (Some(o), Some(c)) = (opens_at, closes_at) {
        if c <= o {
            return Err(ApiError::BadRequest("closes_at must be after opens_at".into()));
        }
    }
    let draw_at = instant(b.draw_at, "draw_at")?;
    if let Some(d) = draw_at {
        if opens_at.is_some_and(|o| d <= o) {
            return Err(ApiError::BadRequest("draw_at must be after opens_at".into()));
        }
        if closes_at.is_some_and(|c| d >= c) {
            return Err(ApiError::BadRequest("draw_at must be before closes_at".into()));
        }
    }
    let waitlist_max = match b.waitlist_max {
        None => 0,
        Some(n) => n
            .as_u64()
            .or_else(|| n.as_f64().and_then(integral))
            .and_then(|c| u32::try_from(c).ok())
            .filter(|c| *c <= WAITLIST_MAX)
            .ok_or_else(|| ApiError::BadRequest(format!("waitlist_max must be 0-{WAITLIST_MAX}")))?,
    };
    Ok(CourseSpec {
        title: b.title,
        capacity,
        opens_at,
        closes_at,
        draw_at,
        waitlist_max,
    })
}

/// Events one feed read returns unless the caller asks otherwise.
const PAGE_EVENTS_DEFAULT: u32 = 100;
/// Longest long poll a feed reader may ask for.
const EVENTS_WAIT_MS_MAX: u64 = 30_000;

/// `GET /v1/admin/events`: a page of the change feed after a cursor; with `wait_ms`, an
/// empty page waits until a commit writes events (or the wait ends).
async fn events(ctx: &Ctx, query: Option<&str>) -> Result<Response<Full<Bytes>>, ApiError> {
    use crate::persist::feed;
    let mut after = None;
    let mut limit = PAGE_EVENTS_DEFAULT;
    let mut wait_ms = 0;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "after" => {
                after = Some(feed::parse_cursor(&v).ok_or_else(|| ApiError::BadRequest("after: not a cursor".into()))?)
            }
            "limit" => {
                limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=feed::EVENTS_PAGE_MAX).contains(n))
                    .ok_or_else(|| ApiError::BadRequest(format!("limit must be 1-{}", feed::EVENTS_PAGE_MAX)))?
            }
            "wait_ms" => {
                wait_ms = v
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n <= EVENTS_WAIT_MS_MAX)
                    .ok_or_else(|| ApiError::BadRequest(format!("wait_ms must be 0-{EVENTS_WAIT_MS_MAX}")))?
            }
            _ => return Err(ApiError::BadRequest(format!("unknown query parameter {k:?}"))),
        }
    }
    let persist = ctx.router.me.persist();
    // Subscribed before the first read, so a commit between the read and the wait wakes it.
    let mut changes = persist.feed_changes();
    changes.borrow_and_update();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms);
    let page = loop {
        let rx = persist.read_events(after, limit).map_err(|_| ApiError::Unavailable)?;
        let page = match rx.await.map_err(|_| ApiError::Unavailable)? {
            Ok(page) => page,
            Err(feed::FeedError::Expired { .. }) => return Err(ApiError::CursorExpired),
            Err(feed::FeedError::Ahead) => {
                return Err(ApiError::BadRequest("after: a cursor ahead of the feed".into()))
            }
            Err(feed::FeedError::Store(e)) => {
                tracing::warn!(error = %e, "reading the change feed failed");
                return Err(ApiError::Unavailable);
            }
        };
        if !page.events.is_empty() {
            break page;
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => after = Some(page.next),
            Ok(Err(_)) | Err(_) => break page, // shutting down, or the wait is over
        }
    };
    let events: Vec<EventJson> = page.events.iter().map(EventJson::from).collect();
    Ok(json_of(
        StatusCode::OK,
        &serde_json::json!({"events": events, "next": feed::cursor_of(page.next)}),
    ))
}

/// An event as the feed shows it (API.md's `Event`).
#[derive(Serialize)]
struct EventJson<'a> {
    cursor: String,
    #[serde(rename = "type")]
    kind: &'static str,
    course_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    student_id: Option<&'a str>,
    at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    capacity: Option<u64>,
}

impl<'a> From<&'a crate::persist::feed::Event> for EventJson<'a> {
    fn from(e: &'a crate::persist::feed::Event) -> Self {
        EventJson {
            cursor: crate::persist::feed::cursor_of(e.seq),
            kind: e.kind.as_str(),
            course_id: &e.course,
            student_id: e.student.as_deref(),
            at: crate::ids::rfc3339(e.at),
            version: e.version,
            capacity: e.capacity,
        }
    }
}

async fn list_courses(ctx: &Ctx, query: Option<&str>) -> Result<Response<Full<Bytes>>, ApiError> {
    let mut after = None;
    let mut limit = PAGE_COURSES_DEFAULT;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "after" => after = Some(course_id(&v)?),
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=PAGE_COURSES_MAX).contains(n))
                    .ok_or_else(|| ApiError::BadRequest(format!("limit must be 1-{PAGE_COURSES_MAX}")))?
            }
            _ => return Err(ApiError::BadRequest(format!("unknown query parameter {k:?}"))),
        }
    }
    let mut courses: Vec<CourseView> = if let Some(cluster) = ctx.cluster.as_ref().filter(|c| c.catalog.ready()) {
        // Cluster mode: every node's courses, from the catalog cache.
        cluster.catalog.list(after.as_ref(), limit + 1)
    } else if ctx.cluster.is_some() {
        // Cluster mode before the cache is whole: every node's courses, as committed.
        let from = after.clone();
        let stored = read_store(ctx, "the catalog", |reply| crate::persist::CatalogRead::Courses {
            after: from,
            limit: (limit + 1) as u32,
            reply,
        })
        .await?;
        stored.into_iter().map(CourseView::from).collect()
    } else {
        // Each shard gives one more than a page, so we know whether another page follows.
        let replies = ctx
            .router
            .gather(|| Command::List {
                after: after.clone(),
                limit: limit + 1,
            })
            .await;
        let mut courses = Vec::new();
        for r in replies {
            match r {
                Reply::Courses(mut c) => courses.append(&mut c),
                _ => return Err(ApiError::Unavailable),
            }
        }
        courses
    };
    courses.sort_by(|a, b| a.id.cmp(&b.id));
    let next = (courses.len() > limit).then(|| courses[limit - 1].id.clone());
    courses.truncate(limit);
    let page: Vec<CourseJson> = courses.iter().map(CourseJson::from).collect();
    Ok(json_of(
        StatusCode::OK,
        &serde_json::json!({"courses": page, "next": next}),
    ))
}

async fn my_enrollments(ctx: &Ctx, caller: &Caller) -> Result<Response<Full<Bytes>>, ApiError> {
    if ctx.cluster.is_some() {
        // Cluster mode: the seats on every node, as committed (every answered change is).
        let student = caller.id.clone();
        let seats = read_store(ctx, "a student's seats", |reply| {
            crate::persist::CatalogRead::Enrollments { student, reply }
        })
        .await?;
        let list: Vec<EnrollmentJson> = seats
            .iter()
            .map(|(course, standing)| EnrollmentJson::of(course, &caller.id, *standing))
            .collect();
        return Ok(json_of(StatusCode::OK, &serde_json::json!({"enrollments": list})));
    }
    let replies = ctx
        .router
        .gather(|| Command::StudentEnrollments(caller.id.clone()))
        .await;
    let mut all: Vec<EnrollmentView> = Vec::new();
    for r in replies {
        match r {
            Reply::Enrollments(mut e) => all.append(&mut e),
            _ => return Err(ApiError::Unavailable),
        }
    }
    all.sort_by(|a, b| a.course.cmp(&b.course));
    let list: Vec<EnrollmentJson> = all.iter().map(EnrollmentJson::from).collect();
    Ok(json_of(StatusCode::OK, &serde_json::json!({"enrollments": list})))
}

fn readyz(ctx: &Ctx) -> Response<Full<Bytes>> {
    let loaded = ctx.ready.load(std::sync::atomic::Ordering::Relaxed);
    if loaded && ctx.router.me.persist().store_ok() {
        json(StatusCode::OK, &br#"{"status":"ready"}"#[..])
    } else {
        ApiError::Unavailable.into_response()
    }
}

/// The Prometheus text exposition.
fn metrics(ctx: &Ctx) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(ctx.metrics.render())));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// The body of `GET /v1/courses/{id}` (the owner shard caches it until the course changes).
pub fn render_course(c: &CourseView) -> Bytes {
    Bytes::from(serde_json::to_vec(&CourseJson::from(c)).expect("plain struct"))
}

/// Maps a shard's answer to the contract.
fn reply(r: Reply) -> Result<Response<Full<Bytes>>, ApiError> {
    match r {
        Reply::CourseBody(bytes) => Ok(json(StatusCode::OK, bytes)),
        Reply::Put { course, created } => {
            let status = if created { StatusCode::CREATED } else { StatusCode::OK };
            Ok(json_of(status, &CourseJson::from(&course)))
        }
        Reply::Enrolled { enrollment, created } => {
            let status = if created { StatusCode::CREATED } else { StatusCode::OK };
            Ok(json_of(status, &EnrollmentJson::from(&enrollment)))
        }
        Reply::Placed(enrollment) => Ok(json_of(StatusCode::ACCEPTED, &EnrollmentJson::from(&enrollment))),
        Reply::Refused(why) => Err(ApiError::BadRequest(why.to_string())),
        Reply::NotFound => Err(ApiError::NotFound("no such course")),
        Reply::Full => Err(ApiError::CourseFull),
        Reply::Closed => Err(ApiError::RegistrationClosed),
        Reply::NotEnrolled => Err(ApiError::NotEnrolled),
        Reply::BelowEnrolled => Err(ApiError::CapacityBelowEnrolled),
        Reply::Unavailable => Err(ApiError::Unavailable),
        Reply::OutcomeUnknown => Err(ApiError::OutcomeUnknown),
        Reply::RateLimited(_, secs) => Err(ApiError::RateLimited { retry_after_secs: secs }),
        Reply::Dropped(_)
        | Reply::Roster { .. }
        | Reply::Courses(_)
        | Reply::Enrollments(_)
        | Reply::Adopted { .. } => {
            unreachable!("handled by the route that asked")
        }
    }
}

#[derive(Serialize)]
struct CourseJson<'a> {
    id: &'a CourseId,
    title: &'a str,
    capacity: u32,
    enrolled: u32,
    seats_left: u32,
    opens_at: Option<String>,
    closes_at: Option<String>,
    version: u64,
    draw_at: Option<String>,
    waitlist_max: u32,
    waitlisted: u32,
}

impl<'a> From<&'a CourseView> for CourseJson<'a> {
    fn from(c: &'a CourseView) -> Self {
        CourseJson {
            id: &c.id,
            title: &c.spec.title,
            capacity: c.spec.capacity,
            enrolled: c.enrolled,
            seats_left: c.seats_left,
            opens_at: c.spec.opens_at.map(rfc3339),
            closes_at: c.spec.closes_at.map(rfc3339),
            version: c.version,
            draw_at: c.spec.draw_at.map(rfc3339),
            waitlist_max: c.spec.waitlist_max,
            waitlisted: c.waitlisted,
        }
    }
}

#[derive(Serialize)]
struct EnrollmentJson<'a> {
    course_id: &'a CourseId,
    student_id: &'a crate::ids::StudentId,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    enrolled_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    position: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    draw_at: Option<String>,
}

impl<'a> EnrollmentJson<'a> {
    fn of(course: &'a CourseId, student: &'a crate::ids::StudentId, standing: Standing) -> Self {
        let (status, enrolled_at, position, draw_at) = match standing {
            Standing::Enrolled { at } => ("enrolled", Some(rfc3339(at)), None, None),
            Standing::Waitlisted { position } => ("waitlisted", None, Some(position), None),
            Standing::Entered { draw_at } => ("entered", None, None, draw_at.map(rfc3339)),
        };
        EnrollmentJson {
            course_id: course,
            student_id: student,
            status,
            enrolled_at,
            position,
            draw_at,
        }
    }
}

impl<'a> From<&'a EnrollmentView> for EnrollmentJson<'a> {
    fn from(e: &'a EnrollmentView) -> Self {
        EnrollmentJson::of(&e.course, &e.student, e.status)
    }
}

/// One read of the committed store, served beside the committers (`CatalogRead`); any
/// failure (queue full, store error or timeout) is a 503.
async fn read_store<T>(
    ctx: &Ctx,
    what: &str,
    read: impl FnOnce(tokio::sync::oneshot::Sender<anyhow::Result<T>>) -> crate::persist::CatalogRead,
) -> Result<T, ApiError> {
    let (reply, rx) = tokio::sync::oneshot::channel();
    ctx.router
        .me
        .persist()
        .read_catalog(read(reply))
        .map_err(|_| ApiError::Unavailable)?;
    rx.await.map_err(|_| ApiError::Unavailable)?.map_err(|e| {
        tracing::warn!(error = %format!("{e:#}"), "reading {what} failed");
        ApiError::Unavailable
    })
}

/// `GET /v1/admin/courses/{id}/draw`: the draw's record, read from the store (where the
/// draw's own transaction wrote it).
async fn draw_record(ctx: &Ctx, course: CourseId) -> Result<Response<Full<Bytes>>, ApiError> {
    let id = course.clone();
    let record = read_store(ctx, "a draw", |reply| crate::persist::CatalogRead::Draw {
        course: id,
        reply,
    })
    .await?;
    let Some(r) = record else {
        return Err(ApiError::NotFound("no draw has run for this course"));
    };
    Ok(json_of(
        StatusCode::OK,
        &serde_json::json!({
            "course_id": course,
            "drawn_at": rfc3339(r.drawn_at),
            "seed": r.seed,
            "entries": r.order.len(),
            "seats": r.seats,
            "waitlisted": r.waitlisted,
            "order": r.order,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: &str, ok: bool) {
        assert_eq!(course_spec(body.as_bytes()).is_ok(), ok, "{body}");
    }

    #[test]
    fn course_bodies() {
        check(r#"{"title":"A","capacity":3}"#, true);
        check(r#"{"title":"A","capacity":0}"#, true);
        check(r#"{"title":"A","capacity":-1}"#, false);
        check(r#"{"title":"A","capacity":100001}"#, false);
        check(r#"{"title":"A","capacity":47.0}"#, true);
        check(r#"{"title":"A","capacity":1e2}"#, true);
        check(r#"{"title":"A","capacity":47.5}"#, false);
        check(r#"{"title":"A","capacity":1e300}"#, false);
        check(r#"{"title":"A","capacity":"3"}"#, false);
        check(r#"{"title":"","capacity":3}"#, false);
        check(r#"{"title":"A"}"#, false);
        check(r#"{"title":"A","capacity":3,"capcity":4}"#, false);
        check(r#"{"title":"A","capacity":3,"opens_at":"2026-01-01T00:00:00Z"}"#, true);
        check(r#"{"title":"A","capacity":3,"opens_at":null}"#, true);
        check(r#"{"title":"A","capacity":3,"opens_at":"tomorrow"}"#, false);
        check(r#"{"title":"A","capacity":3,"opens_at":"0000-01-01T00:00:00Z"}"#, true);
        check(
            r#"{"title":"A","capacity":3,"opens_at":"9999-12-31T23:59:59.999Z"}"#,
            true,
        );
        // Year 10000 in UTC: it could not be rendered back (it was answered as 1970).
        check(
            r#"{"title":"A","capacity":3,"opens_at":"9999-12-31T23:00:00-05:00"}"#,
            false,
        );
        check(
            r#"{"title":"A","capacity":3,"closes_at":"0000-01-01T00:30:00+01:00"}"#,
            false,
        );
        check(
            r#"{"title":"A","capacity":3,"opens_at":"2026-01-02T00:00:00Z","closes_at":"2026-01-01T00:00:00Z"}"#,
            false,
        );
        check("not json", false);
        check("", false);
    }

    #[test]
    fn response_headers_reuse_the_request_map_and_keep_what_the_route_set() {
        let mut request = hyper::HeaderMap::with_capacity(8);
        request.insert(hyper::header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        let capacity = request.capacity();
        let rid = HeaderValue::from_static("r-1");
        let map = response_headers(request, hyper::HeaderMap::new(), rid.clone());
        assert_eq!(map.len(), 2, "the request's headers are gone: {map:?}");
        assert_eq!(map[CONTENT_TYPE], CONTENT_TYPE_JSON);
        assert_eq!(map[&X_REQUEST_ID], "r-1");
        assert_eq!(map.capacity(), capacity, "the request's map is reused");

        let mut set = hyper::HeaderMap::new();
        set.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        set.append("x-many", HeaderValue::from_static("a"));
        set.append("x-many", HeaderValue::from_static("b"));
        set.insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
        let map = response_headers(hyper::HeaderMap::new(), set, rid);
        assert_eq!(map[CONTENT_TYPE], "text/plain", "a route's own Content-Type stays");
        assert_eq!(map.get_all("x-many").iter().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(map[hyper::header::RETRY_AFTER], "1");
    }

    #[test]
    fn generated_request_ids_are_distinct_and_share_a_chunk() {
        let mut chunk = bytes::BytesMut::new();
        let ids: Vec<HeaderValue> = (1..=400).map(|n| cut_request_id(&mut chunk, "abc1230", n)).collect();
        assert_eq!(ids[0], "abc1230-1");
        assert_eq!(ids[399], "abc1230-190");
        let distinct: std::collections::HashSet<_> = ids.iter().map(|v| v.as_bytes().to_vec()).collect();
        assert_eq!(distinct.len(), ids.len());
        assert!(ids.iter().all(|v| v.len() <= REQUEST_ID_BYTES_MAX));
    }

    #[test]
    fn paths_split_on_the_stack_and_long_ones_match_no_route() {
        let split = |p: &'static str| {
            let (parts, len) = split_path(p);
            parts[..len].to_vec()
        };
        assert_eq!(
            split("/v1/admin/courses/X/roster"),
            ["v1", "admin", "courses", "X", "roster"]
        );
        assert_eq!(split("/"), [""]);
        assert_eq!(split("/v1/courses/"), ["v1", "courses", ""]);
        let long = split("/v1/courses/X/enrollment/a/b/c");
        assert_eq!(long.len(), PATH_SEGMENTS_MAX + 1);
        assert_eq!(route_label(&Method::POST, &long), 9);
        assert_eq!(route_label(&Method::POST, &split("/v1/courses/X/enrollment")), 0);
    }
}
