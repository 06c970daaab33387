//! HTTP front of a shard: listener, connection limits, hyper, and the request path.
//!
//! Why: each shard accepts on its own SO_REUSEPORT socket, so the kernel spreads
//! connections over the cores and no accept lock is shared. Only net/ knows HTTP, JSON and
//! JWT; shards see typed commands.
//! Must never: accept a connection without a permit (the permit is taken before `accept`),
//! serve a connection without a header-read timeout (slowloris would pin the shard), or
//! share a port with another process: SO_REUSEPORT is for this process's own shards, and
//! with a second server on the port the kernel would split the connections between us
//! ([`bind_listeners`] refuses an address that anyone else holds).
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
/// How long start-up waits for another enrolld to finish binding the same port (it holds
/// the port's lock for the few system calls of a probe and a bind).
const PORT_LOCK_WAIT_MS_MAX: u64 = 5_000;
/// Between two tries of that lock.
const PORT_LOCK_POLL_MS: u64 = 5;
const _: () = assert!(PORT_LOCK_POLL_MS < PORT_LOCK_WAIT_MS_MAX);

/// Why a listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another process holds the address: start-up refuses (exit 2).
    #[error("another process holds {0}")]
    InUse(SocketAddr),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

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
pub fn bind_shard_listeners(base: SocketAddr, shards: usize) -> Result<Vec<std::net::TcpListener>, BindError> {
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

/// Binds `shards` SO_REUSEPORT listeners on one address, once no other process holds it.
///
/// The check is a probe: a socket bound and listening WITHOUT SO_REUSEPORT, which fails
/// with EADDRINUSE while any other socket listens there (ours, left over from an earlier
/// run, would not: SO_REUSEADDR lets it past connections in TIME_WAIT). Two enrolld
/// starting at the same instant could both pass the probe before either has bound, then
/// share the port; so the probe and the binds happen under the port's [`PortLock`], and
/// whoever comes second probes against the first one's bound listeners. Port 0: the probe
/// resolves it (the kernel gives it a port that nobody holds) and keeps it until the
/// port's lock is held, then every shard binds the port it got.
pub fn bind_listeners(addr: SocketAddr, shards: usize) -> Result<Vec<std::net::TcpListener>, BindError> {
    let (addr, _lock) = match addr.port() {
        0 => {
            let probe = probe(addr)?;
            let addr = probe.local_addr()?;
            (addr, PortLock::take(addr)?)
        }
        _ => {
            let lock = PortLock::take(addr)?;
            drop(probe(addr)?);
            (addr, lock)
        }
    };
    (0..shards).map(|_| bind_shared(addr)).collect()
}

/// Binds and listens without SO_REUSEPORT: refused while another socket listens on `addr`.
fn probe(addr: SocketAddr) -> Result<std::net::TcpListener, BindError> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into()).map_err(|e| in_use(addr, e))?;
    socket.listen(1).map_err(|e| in_use(addr, e))?;
    Ok(socket.into())
}

/// One shard's SO_REUSEPORT listener on `addr`.
fn bind_shared(addr: SocketAddr) -> Result<std::net::TcpListener, BindError> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).map_err(|e| in_use(addr, e))?;
    socket.listen(LISTEN_BACKLOG).map_err(|e| in_use(addr, e))?;
    Ok(socket.into())
}

fn in_use(addr: SocketAddr, e: std::io::Error) -> BindError {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => BindError::InUse(addr),
        _ => BindError::Io(e),
    }
}

/// An exclusive `flock` on `enrolld-port-<port>.lock` in the temp dir, held by one enrolld
/// from its probe of a port until its listeners are bound. One per port, whatever the IP:
/// a wildcard address and a specific one on the same port conflict too. The file is
/// removed on release; a process that then gets the lock on the removed file sees that
/// the path no longer names it, and locks the file now there. Without a usable temp dir
/// (logged), or between systemd units that each have a `PrivateTmp`, the probe still
/// refuses every live holder; only two starts in the same instant are not kept apart.
struct PortLock {
    /// Closing it releases the lock.
    _file: std::fs::File,
    path: std::path::PathBuf,
}

impl PortLock {
    fn take(addr: SocketAddr) -> Result<Option<PortLock>, BindError> {
        let path = std::env::temp_dir().join(format!("enrolld-port-{}.lock", addr.port()));
        let deadline = std::time::Instant::now() + Duration::from_millis(PORT_LOCK_WAIT_MS_MAX);
        loop {
            let file = match open_lock_file(&path) {
                Ok(file) => file,
                Err(e) => return Ok(unlocked(&path, &e)),
            };
            match file.try_lock() {
                Ok(()) if names_file(&path, &file) => return Ok(Some(PortLock { _file: file, path })),
                Ok(()) | Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(e)) => return Ok(unlocked(&path, &e)),
            }
            if std::time::Instant::now() >= deadline {
                // Another process has been binding this port all along.
                return Err(BindError::InUse(addr));
            }
            std::thread::sleep(Duration::from_millis(PORT_LOCK_POLL_MS));
        }
    }
}

impl Drop for PortLock {
    fn drop(&mut self) {
        // Removed before `_file` closes (which releases the lock), so no one locks it anew.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Read-write (created when missing), or read-only when another user made it: `flock`
/// needs no write access.
fn open_lock_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o666)
        .open(path)
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => std::fs::File::open(path),
            _ => Err(e),
        })
}

/// Whether `path` still names the open `file` (its holder removes it on release).
fn names_file(path: &std::path::Path, file: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), file.metadata()) {
        (Ok(at_path), Ok(held)) => at_path.dev() == held.dev() && at_path.ino() == held.ino(),
        _ => false,
    }
}

fn unlocked(path: &std::path::Path, e: &std::io::Error) -> Option<PortLock> {
    tracing::warn!(path = %path.display(), error = %e, "cannot lock the port's lock file; binding after the probe alone");
    None
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

#[cfg(test)]
mod tests {
    use super::*;

    fn free_addr() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    #[test]
    fn port_0_resolves_once_for_every_shard_and_leaves_no_lock_file() {
        let listeners = bind_listeners("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        for l in &listeners {
            assert_eq!(l.local_addr().unwrap(), addr);
        }
        let lock = std::env::temp_dir().join(format!("enrolld-port-{}.lock", addr.port()));
        assert!(
            !lock.exists(),
            "{} is removed once the listeners are bound",
            lock.display()
        );
    }

    /// Another enrolld that has probed the port and is about to bind holds its lock: a
    /// start racing it waits, then probes against its listeners and is refused. Without
    /// the lock both probes would pass and both would bind through SO_REUSEPORT.
    #[test]
    fn a_start_racing_another_on_one_port_is_refused() {
        let addr = free_addr();
        let first_lock = PortLock::take(addr).unwrap().expect("the temp dir takes lock files");
        let second = std::thread::spawn(move || bind_listeners(addr, 1));
        // Let the second start reach the port before the first binds (no effect on the
        // outcome with the lock; without it, the second would have bound by now).
        std::thread::sleep(Duration::from_millis(100));
        let first = bind_shared(addr).unwrap();
        drop(first_lock);
        match second.join().unwrap() {
            Err(BindError::InUse(a)) => assert_eq!(a, addr),
            other => panic!("second start on {addr}: {other:?}"),
        }
        drop(first);
        assert_eq!(
            bind_listeners(addr, 2).unwrap().len(),
            2,
            "free again once the first is gone"
        );
    }
}
