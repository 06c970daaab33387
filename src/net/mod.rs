//! HTTP front of a shard: listener, connection limits, hyper, and the request path.
//!
//! Why: each shard accepts on its own SO_REUSEPORT socket, so the kernel spreads
//! connections over the cores and no accept lock is shared. Only net/ knows HTTP, JSON and
//! JWT; shards see typed commands.
//! Must never: accept a connection without a permit (the permit is taken before `accept`),
//! or serve a connection without a header-read timeout (slowloris would pin the shard).
//!
//! The header-read timeout is ours, not hyper's: hyper's drops its timer after every head
//! and boxes a new one for the next, the one heap allocation a 409 still made. Here each
//! connection has one timer for its whole life, and a request only writes a `Cell`
//! ([`ConnState`], [`close_slow_heads`]).

pub mod auth;
pub mod error;
pub mod http;

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

/// Smallest read buffer hyper accepts; the head limit may not go below it.
pub const HEAD_BYTES_MIN: usize = 8_192;
/// Pending connections the kernel queues per listener.
const LISTEN_BACKLOG: i32 = 4_096;
/// Pause after a failed accept (EMFILE and the like) before trying again.
const ACCEPT_ERROR_PAUSE_MS: u64 = 50;

/// Connection-level limits, from configuration.
#[derive(Clone, Debug)]
pub struct ConnLimits {
    pub head_bytes_max: usize,
    pub header_read_timeout_ms: u64,
    pub connections_max: usize,
    pub drain_timeout_ms: u64,
}

/// What a connection keeps between its requests.
pub struct ConnState {
    /// The last token verified on this connection.
    pub tokens: auth::TokenCache,
    /// Since when the connection has waited for its next request head (its opening, or
    /// the moment its last answer was handed to hyper); `None` while a request is being
    /// answered. [`close_slow_heads`] reads it.
    idle_since: Cell<Option<Instant>>,
}

impl ConnState {
    fn new(now: Instant) -> ConnState {
        ConnState {
            tokens: auth::TokenCache::default(),
            idle_since: Cell::new(Some(now)),
        }
    }

    /// A request head is complete: its answer may take as long as it takes (the body has
    /// its own timeout, seat work its own).
    pub fn busy(&self) {
        self.idle_since.set(None);
    }

    /// The answer is handed to hyper: the next head is due within the timeout from `now`.
    pub fn idle(&self, now: Instant) {
        self.idle_since.set(Some(now));
    }
}

/// Runs a connection, and ends it (dropping it closes the socket, as hyper's own header
/// timeout did, with no answer) once it has waited `timeout` for a complete request head.
/// That covers a silent connection, a head dribbled byte by byte and an idle keep-alive
/// connection. The time counts from when the previous answer was handed to hyper, not
/// from when its last byte was written: a client that does not read its answers is
/// closed too.
///
/// One timer per connection: it fires at the earliest possible deadline and, if the
/// connection has moved on since, is reset to the current one; requests never touch it.
pub async fn close_slow_heads<F: Future>(conn: F, state: &ConnState, timeout: Duration) -> Option<F::Output> {
    let sleep = tokio::time::sleep(timeout);
    tokio::pin!(conn, sleep);
    loop {
        tokio::select! {
            biased;
            out = &mut conn => return Some(out),
            () = &mut sleep => {
                let now = Instant::now();
                match state.idle_since.get() {
                    Some(since) if now.duration_since(since) >= timeout => return None,
                    Some(since) => sleep.as_mut().reset(since + timeout),
                    // Answering: look again a timeout from now.
                    None => sleep.as_mut().reset(now + timeout),
                }
            }
        }
    }
}

/// Binds one listener per shard at `base`'s port + shard index (each on any free port when
/// that is 0): a proxy that knows [`crate::shard::owner_of`] sends a course's requests to
/// its owner's port, and they never cross shards.
pub fn bind_shard_listeners(base: SocketAddr, shards: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    (0..shards)
        .map(|i| {
            let mut addr = base;
            if base.port() != 0 {
                let port = usize::from(base.port()) + i;
                addr.set_port(u16::try_from(port).map_err(|_| std::io::Error::other("shard port past 65535"))?);
            }
            Ok(bind_listeners(addr, 1)?.remove(0))
        })
        .collect()
}

/// Binds `shards` SO_REUSEPORT listeners on one address. The first resolves port 0, the
/// rest bind the port it got, so every shard listens on the same address.
pub fn bind_listeners(addr: SocketAddr, shards: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(shards);
    let mut addr = addr;
    for _ in 0..shards {
        let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

/// Accepts and serves connections on every listener of the shard (the shared address and,
/// with `shard_listen`, its own port) until `shutdown` turns true, then lets in-flight
/// requests finish (up to `drain_timeout_ms`) and returns. The connection limit covers all
/// of them together.
pub async fn serve(
    listeners: Vec<std::net::TcpListener>,
    ctx: Rc<http::Ctx>,
    limits: ConnLimits,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.connections_max));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        // No hyper timer and no hyper header-read timeout: `close_slow_heads` is ours.
        .header_read_timeout(None)
        .max_buf_size(limits.head_bytes_max)
        .keep_alive(true)
        // hyper otherwise reads the socket while a request is being answered, to notice a
        // client that hung up and cancel its future. That read found the buffer still
        // shared with the request's head and allocated a fresh 8 KB one every request,
        // plus a recvfrom that returned EAGAIN. Nothing needs the cancellation: work that
        // takes a seat runs in a detached task and settles whoever is listening.
        .half_close(true);
    // Not `pipeline_flush(true)`: hyper then holds answers back while unparsed bytes sit
    // in its buffer, so an answer before garbage or before a partial next request was lost
    // (tests/bad_input.rs pins both).
    let mut loops = Vec::with_capacity(listeners.len());
    for listener in listeners {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        loops.push(accept_loop(
            listener,
            &ctx,
            &builder,
            &graceful,
            Duration::from_millis(limits.header_read_timeout_ms),
            permits.clone(),
            shutdown.clone(),
        ));
    }
    futures_util::future::join_all(loops).await;
    if tokio::time::timeout(Duration::from_millis(limits.drain_timeout_ms), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timed out; closing the remaining connections");
    }
    Ok(())
}

/// One listener's accept loop: a permit first, then the connection, until shutdown.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    ctx: &Rc<http::Ctx>,
    builder: &http1::Builder,
    graceful: &GracefulShutdown,
    head_timeout: Duration,
    permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match stream {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_PAUSE_MS)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let state = Rc::new(ConnState::new(Instant::now()));
        let served = state.clone();
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| http::handle(ctx.clone(), served.clone(), peer, req)),
        );
        let conn = graceful.watch(conn);
        tokio::task::spawn_local(async move {
            match close_slow_heads(conn, &state, head_timeout).await {
                Some(Err(e)) => tracing::debug!(error = %e, "connection ended with an error"),
                Some(Ok(())) => {}
                None => tracing::debug!("connection closed: no complete request head in time"),
            }
            drop(permit);
        });
    }
}
