//! Accepting sockets: binding with the options a proxy wants, and the accept loop.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use socket2::{Domain, SockRef, Socket as RawSocket, Type};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::close::{Closer, How, Reason, SideLedger, Socket};
use crate::config::Address;
use crate::proxy_protocol;

/// A protocol's handler for accepted client connections.
pub trait Serve: Send + Sync + 'static {
    /// Serves one client connection to its end and closes it by the listener's policy.
    /// `peer` is None for unix-socket clients.
    fn serve<S: Socket>(
        self: Arc<Self>,
        stream: S,
        peer: Option<SocketAddr>,
    ) -> impl std::future::Future<Output = ()> + Send;

    /// Turns a client away because the listener is at `max_clients`. By default the
    /// connection is closed; protocols with an error message say it first.
    fn reject<S: Socket>(
        self: Arc<Self>,
        stream: S,
        peer: Option<SocketAddr>,
    ) -> impl std::future::Future<Output = ()> + Send {
        let _ = peer;
        async move { drop(stream) }
    }
}

/// Counters of one listener, whatever its protocol (fields a protocol has no use for stay 0).
#[derive(Debug, Default, Serialize)]
pub struct ListenerStats {
    /// Client connections accepted.
    pub connections: AtomicU64,
    /// Client connections open now.
    pub active: AtomicUsize,
    /// Client connections turned away at `max_clients`.
    pub rejected: AtomicU64,
    /// Requests received.
    pub requests: AtomicU64,
    /// 502: no upstream connection could be had, or it failed before a response.
    pub errors_connect: AtomicU64,
    /// 504: the upstream did not answer within response_timeout.
    pub errors_timeout: AtomicU64,
    /// 503: every allowed upstream connection was busy.
    pub errors_busy: AtomicU64,
    /// 502: the upstream failed after the request was sent.
    pub errors_upstream: AtomicU64,
}

/// A bound, listening socket.
#[derive(Debug)]
pub enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A connection just accepted.
pub enum Accepted {
    Tcp(tokio::net::TcpStream, SocketAddr),
    Unix(tokio::net::UnixStream),
}

/// Listen backlog: short-connection load arrives in bursts; a small backlog turns them into
/// SYN retries (a second of latency each).
const BACKLOG: i32 = 4096;

// === impl Bound ===

impl Bound {
    /// Binds `addr`. A unix socket file left by a dead process is replaced; one that a live
    /// process still accepts on is not stolen.
    pub fn bind(addr: &Address, mode: Option<u32>) -> io::Result<Bound> {
        match addr {
            Address::Tcp(sa) => {
                let sock = RawSocket::new(Domain::for_address(*sa), Type::STREAM, None)?;
                // Rebinding right after a restart must not fail on old TIME_WAIT sockets.
                sock.set_reuse_address(true)?;
                if sa.is_ipv6() {
                    sock.set_only_v6(true)?;
                }
                sock.set_nonblocking(true)?;
                sock.bind(&(*sa).into())?;
                sock.listen(BACKLOG)?;
                Ok(Bound::Tcp(TcpListener::from_std(sock.into())?))
            }
            Address::Unix(path) => {
                remove_stale_socket(path)?;
                let listener = UnixListener::bind(path)?;
                if let Some(mode) = mode {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
                }
                Ok(Bound::Unix(listener, path.clone()))
            }
        }
    }

    /// The TCP address actually bound (port 0 resolved), if TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Bound::Tcp(l) => l.local_addr().ok(),
            Bound::Unix(..) => None,
        }
    }

    /// Accepts the next connection. Transient errors (EMFILE, ECONNABORTED) are logged and
    /// retried after a pause, so a burst past the fd limit does not spin or stop the listener.
    pub async fn accept(&self, name: &str) -> Accepted {
        loop {
            let result = match self {
                Bound::Tcp(l) => l.accept().await.map(|(s, peer)| {
                    let _ = s.set_nodelay(true);
                    Accepted::Tcp(s, peer)
                }),
                Bound::Unix(l, _) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
            };
            match result {
                Ok(accepted) => return accepted,
                Err(e) => {
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// How accepted connections are taken in before the protocol sees them.
#[derive(Debug, Clone)]
pub struct AcceptOpts {
    /// The listener's name, for logs.
    pub name: Arc<str>,
    /// Clients send a PROXY header first; read it within this long.
    pub proxy_header: Option<Duration>,
    /// The listener's ledger, for connections refused before the protocol saw them.
    pub ledger: Arc<SideLedger>,
    /// The listener's counters (`active` bounds connections by `max_clients`).
    pub stats: Arc<ListenerStats>,
    /// Most client connections at once; 0 = unlimited.
    pub max_clients: usize,
    /// Cancelled when the listener is removed by a reload, or on shutdown.
    pub stop: CancellationToken,
    /// Tracks connection tasks, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

/// Accepts on `sock` until `opts.stop` is cancelled, handing each connection to the
/// service `svc` holds at that moment (a reload swaps it; connections keep the one they
/// started with).
pub async fn accept_loop<T: Serve>(svc: watch::Receiver<Arc<T>>, sock: Bound, opts: AcceptOpts) {
    loop {
        let accepted = tokio::select! {
            _ = opts.stop.cancelled() => break,
            a = sock.accept(&opts.name) => a,
        };
        let svc = svc.borrow().clone();
        let active = ActiveGuard::enter(&opts.stats);
        let over = opts.max_clients > 0 && active.count > opts.max_clients;
        match accepted {
            Accepted::Tcp(stream, peer) => {
                let opts2 = opts.clone();
                let fut = async move {
                    let _active = active;
                    let client = match opts2.proxy_header {
                        None => peer,
                        // Boxed: its buffers would otherwise sit in every connection's task.
                        Some(within) => {
                            match Box::pin(proxy_protocol::read_header(&stream, within)).await {
                                Ok(addrs) => addrs.map_or(peer, |a| a.source),
                                Err(e) => {
                                    tracing::warn!(listener = %opts2.name, peer = %peer, error = %e,
                                    "refusing connection: bad PROXY protocol header");
                                    // RST: nothing was sent, and a refused client keeps no TIME_WAIT.
                                    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                                    opts2.ledger.record(Closer::Proxy, How::Rst, Reason::Error);
                                    return;
                                }
                            }
                        }
                    };
                    if over {
                        opts2.stats.rejected.fetch_add(1, Ordering::Relaxed);
                        // Boxed: rare, and large; it must not weigh on every task.
                        Box::pin(svc.reject(stream, Some(client))).await
                    } else {
                        svc.serve(stream, Some(client)).await
                    }
                };
                opts.tasks.spawn(fut);
            }
            Accepted::Unix(stream) => {
                opts.tasks.spawn(async move {
                    let _active = active;
                    if over {
                        Box::pin(svc.reject(stream, None)).await
                    } else {
                        svc.serve(stream, None).await
                    }
                });
            }
        }
    }
    tracing::info!(listener = %opts.name, "stopped accepting");
}

/// Counts a connection as active for its lifetime.
struct ActiveGuard {
    stats: Arc<ListenerStats>,
    /// Active connections including this one, when it entered.
    count: usize,
}

impl ActiveGuard {
    fn enter(stats: &Arc<ListenerStats>) -> ActiveGuard {
        let count = stats.active.fetch_add(1, Ordering::Relaxed) + 1;
        ActiveGuard {
            stats: stats.clone(),
            count,
        }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Bound::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by a running process", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}
