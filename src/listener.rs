//! Accepting sockets: binding with the options a proxy wants, and the accept loop.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Serialize;

use socket2::{Domain, SockRef, Socket as RawSocket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::histogram::Histogram;
use crate::close::{Ending, Socket, Tracked};
use crate::config::Address;
use crate::eager::EagerTcp;
use crate::proxy_protocol;
use crate::tls::{self, ServerTls, TlsStats};

/// A protocol's handler for accepted client connections.
pub trait Serve: Send + Sync + 'static {
    /// Serves one client connection to its end and closes it by the listener's policy.
    /// `peer` is None for unix-socket clients.
    fn serve<S: Socket>(
        self: Arc<Self>,
        stream: S,
        peer: Option<SocketAddr>,
    ) -> impl std::future::Future<Output = ()> + Send;

    /// Wraps a client connection in the listener's close tracking (its ledger, its client
    /// policy), for connections turned away before `serve` saw them.
    fn track<S: Socket>(&self, stream: S) -> Tracked<S>;

    /// The listener's TLS, taken before the protocol sees the connection, and the bound on
    /// its handshake. None for plain listeners (and for protocols that start TLS themselves).
    fn tls(&self) -> Option<(&ServerTls, Duration)> {
        None
    }

    /// Turns a client away because the listener is at `max_clients`. By default the
    /// connection is closed as a refusal (reset: nothing was sent); protocols with an error
    /// message say it first.
    fn reject<S: Socket>(
        self: Arc<Self>,
        client: Tracked<S>,
        peer: Option<SocketAddr>,
    ) -> impl std::future::Future<Output = ()> + Send {
        let _ = peer;
        client.finish_client(Ending::Refused)
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
    /// How long requests (tcp, mysql: sessions) took, end to end, one observation each.
    pub request_duration: Histogram,
    /// TLS handshakes with clients.
    pub tls: TlsStats,
    /// mysql listeners with `pooling = "transaction"`: sessions, lends and pins.
    #[serde(skip)]
    pub mysql: crate::mysql::MuxStats,
}

/// Listening sockets bound but not yet given to a runtime: for TCP one socket per worker in
/// one SO_REUSEPORT group (the kernel spreads connections across them, and a busy worker's
/// queue does not hold up the others); for unix one socket that every worker accepts on.
#[derive(Debug)]
pub enum Listening {
    Tcp(Vec<std::net::TcpListener>),
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

/// A listening socket in one worker's runtime.
#[derive(Debug)]
pub enum Bound {
    /// Accepted without tokio's `TcpListener`, whose streams join epoll at once (`eager`).
    Tcp(AsyncFd<std::net::TcpListener>),
    /// The path is removed when the socket that owns it (worker 0's) is dropped.
    Unix(UnixListener, Option<PathBuf>),
}

/// A connection just accepted.
pub enum Accepted {
    Tcp(EagerTcp, SocketAddr),
    Unix(tokio::net::UnixStream),
}

/// Listen backlog when `listen_backlog` is absent: short-connection load arrives in bursts; a
/// small backlog turns them into SYN retries (a second of latency each).
pub const DEFAULT_BACKLOG: u32 = 4096;
/// TCP_DEFER_ACCEPT's wait for a silent client, in seconds (the kernel rounds it to SYN-ACK
/// retransmissions: one, a second after the handshake).
const DEFER_ACCEPT_SECS: libc::c_int = 1;

// === impl Listening ===

impl Listening {
    /// Binds `addr` for `workers` workers. A unix socket file left by a dead process is
    /// replaced; one that a live process still accepts on is not stolen, and neither is a
    /// TCP port another process listens on (SO_REUSEPORT alone would share it). A
    /// `systemd:NAME` socket is taken as systemd made it (its backlog, its mode).
    pub fn bind(
        addr: &Address,
        mode: Option<u32>,
        defer_accept: bool,
        backlog: u32,
        workers: usize,
    ) -> io::Result<Listening> {
        let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
        match addr {
            Address::Tcp(sa) => {
                if workers <= 1 {
                    let sock = tcp_socket(*sa, false, defer_accept, backlog)?;
                    return Ok(Listening::Tcp(vec![sock]));
                }
                // Bound without SO_REUSEPORT first: fails if anyone listens on the port.
                let probe = tcp_socket(*sa, false, false, backlog)?;
                let port = probe.local_addr()?.port();
                drop(probe);
                let at = SocketAddr::new(sa.ip(), port);
                let socks = (0..workers)
                    .map(|_| tcp_socket(at, true, defer_accept, backlog))
                    .collect::<io::Result<Vec<_>>>()?;
                Ok(Listening::Tcp(socks))
            }
            Address::Systemd(name) => activated(name, defer_accept, workers),
            Address::Unix(path) => {
                remove_stale_socket(path)?;
                let listener = std::os::unix::net::UnixListener::bind(path)?;
                // std listens with a backlog of its own; listen(2) again sets ours.
                SockRef::from(&listener).listen(backlog)?;
                listener.set_nonblocking(true)?;
                if let Some(mode) = mode {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
                }
                Ok(Listening::Unix(listener, path.clone()))
            }
        }
    }

    /// Sockets handed over by the process this one replaces (`upgrade`), for `workers`
    /// workers: TCP ones are the old SO_REUSEPORT group as it was (a worker may accept on
    /// several, or on a second descriptor of one, when the worker count changed), a unix one
    /// keeps its file (never unlinked and bound again, which would lose its queue) and is
    /// removed by this process when it ends. The listener's options are set anew.
    pub fn inherited(
        fds: Vec<OwnedFd>,
        addr: &Address,
        defer_accept: bool,
        backlog: u32,
        workers: usize,
    ) -> io::Result<Listening> {
        let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
        let socks: Vec<RawSocket> = fds.into_iter().map(RawSocket::from).collect();
        let mut tcp = Vec::with_capacity(socks.len().max(workers));
        let mut unix = None;
        for sock in socks {
            if sock.r#type()? != Type::STREAM || !sock.is_listener()? {
                return Err(io::Error::other(
                    "the socket handed over is not a listening stream socket",
                ));
            }
            sock.set_nonblocking(true)?;
            // listen(2) again only changes the backlog; the queue stays.
            sock.listen(backlog)?;
            if sock.local_addr()?.as_socket().is_some() {
                sock.set_tcp_nodelay(true)?;
                set_defer_accept(&sock, defer_accept)?;
                tcp.push(std::net::TcpListener::from(sock));
            } else if unix.is_none() {
                unix = Some(std::os::unix::net::UnixListener::from(sock));
            }
        }
        if let Some(l) = unix {
            let path = match addr {
                Address::Unix(path) => path.clone(),
                _ => PathBuf::new(),
            };
            return Ok(Listening::Unix(l, path));
        }
        let given = tcp.len();
        for i in given..workers {
            let Some(sock) = tcp.get(i % given.max(1)) else {
                break;
            };
            let clone = sock.try_clone()?;
            tcp.push(clone);
        }
        if tcp.is_empty() {
            return Err(io::Error::other("no socket was handed over"));
        }
        Ok(Listening::Tcp(tcp))
    }

    /// Second descriptors of every socket, to hand to a new binary (`upgrade`).
    pub fn handles(&self) -> io::Result<Vec<OwnedFd>> {
        match self {
            Listening::Tcp(socks) => socks
                .iter()
                .map(|s| s.as_fd().try_clone_to_owned())
                .collect(),
            Listening::Unix(l, _) => Ok(vec![l.as_fd().try_clone_to_owned()?]),
        }
    }

    /// Second descriptors of the TCP sockets, through which a reload changes their options.
    pub fn tcp_handles(&self) -> io::Result<Vec<OwnedFd>> {
        match self {
            Listening::Tcp(socks) => socks
                .iter()
                .map(|s| s.as_fd().try_clone_to_owned())
                .collect(),
            Listening::Unix(..) => Ok(Vec::new()),
        }
    }

    /// The TCP address actually bound (port 0 resolved), if TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listening::Tcp(socks) => socks.first().and_then(|s| s.local_addr().ok()),
            Listening::Unix(..) => None,
        }
    }

    /// Splits into one socket per worker (`workers` of them), for `Bound::register`.
    pub fn split(self, workers: usize) -> io::Result<Vec<Listening>> {
        match self {
            Listening::Tcp(socks) => {
                Ok(socks.into_iter().map(|s| Listening::Tcp(vec![s])).collect())
            }
            Listening::Unix(l, path) => {
                let mut out = Vec::with_capacity(workers);
                for _ in 1..workers.max(1) {
                    // A clone shares the socket; only the original removes the file.
                    out.push(Listening::Unix(l.try_clone()?, PathBuf::new()));
                }
                out.insert(0, Listening::Unix(l, path));
                Ok(out)
            }
        }
    }
}

/// A listening TCP socket on `sa`, in SO_REUSEPORT's group when `shared`, deferring accept when
/// `defer_accept`.
fn tcp_socket(
    sa: SocketAddr,
    shared: bool,
    defer_accept: bool,
    backlog: i32,
) -> io::Result<std::net::TcpListener> {
    let sock = RawSocket::new(Domain::for_address(sa), Type::STREAM, None)?;
    // Rebinding right after a restart must not fail on old TIME_WAIT sockets.
    sock.set_reuse_address(true)?;
    if shared {
        sock.set_reuse_port(true)?;
    }
    if sa.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: one setsockopt per
    // listener instead of one per connection.
    sock.set_tcp_nodelay(true)?;
    set_defer_accept(&sock, defer_accept)?;
    sock.set_nonblocking(true)?;
    sock.bind(&sa.into())?;
    sock.listen(backlog)?;
    Ok(sock.into())
}

/// The socket systemd passed as `name`: a listening TCP or unix stream socket. TCP is one
/// socket, not a SO_REUSEPORT group: each worker accepts on a descriptor of its own for it.
/// Unix sockets are given no path, so waitless never removes systemd's file.
fn activated(name: &str, defer_accept: bool, workers: usize) -> io::Result<Listening> {
    let sock = RawSocket::from(crate::systemd::socket(name)?);
    if sock.r#type()? != Type::STREAM || !sock.is_listener()? {
        return Err(io::Error::other(format!(
            "systemd socket `{name}` is not a listening stream socket (ListenStream=)"
        )));
    }
    sock.set_nonblocking(true)?;
    let local = sock.local_addr()?;
    if local.as_socket().is_some() {
        sock.set_tcp_nodelay(true)?;
        set_defer_accept(&sock, defer_accept)?;
        let first: std::net::TcpListener = sock.into();
        let mut socks = (1..workers.max(1))
            .map(|_| first.try_clone())
            .collect::<io::Result<Vec<_>>>()?;
        socks.insert(0, first);
        Ok(Listening::Tcp(socks))
    } else if local.is_unix() {
        Ok(Listening::Unix(sock.into(), PathBuf::new()))
    } else {
        Err(io::Error::other(format!(
            "systemd socket `{name}` is neither TCP nor unix"
        )))
    }
}

/// Turns TCP_DEFER_ACCEPT on or off on a listening socket. On, the kernel keeps a handshaken
/// connection until its first bytes arrive (or a FIN: a client that leaves is still
/// accepted, and accounted); one that stays silent is handed over after about a second, to
/// the header timeout. Off, each accept of a client not yet sending is followed by a read that
/// finds nothing and a wait for readiness.
pub fn set_defer_accept(sock: &impl AsFd, on: bool) -> io::Result<()> {
    let secs: libc::c_int = if on { DEFER_ACCEPT_SECS } else { 0 };
    // SAFETY: a valid descriptor, and an int option passed with its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// === impl Bound ===

impl Bound {
    /// Registers one worker's share of a listener with the runtime it runs in (call it
    /// inside that runtime).
    pub fn register(l: Listening) -> io::Result<Bound> {
        match l {
            Listening::Tcp(mut socks) => {
                let sock = socks
                    .pop()
                    .ok_or_else(|| io::Error::other("no socket for this worker"))?;
                // SAFETY: the AsyncFd owns the listener, so its descriptor stays open and
                // the same for as long as the registration lives.
                Ok(Bound::Tcp(unsafe { AsyncFd::register(sock) }?))
            }
            Listening::Unix(l, path) => {
                let owner = (!path.as_os_str().is_empty()).then_some(path);
                Ok(Bound::Unix(UnixListener::from_std(l)?, owner))
            }
        }
    }

    /// The TCP address actually bound (port 0 resolved), if TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Bound::Tcp(l) => l.get_ref().local_addr().ok(),
            Bound::Unix(..) => None,
        }
    }

    /// Accepts the next connection. Transient errors (EMFILE, ECONNABORTED) are logged and
    /// retried after a pause, so a burst past the fd limit does not spin or stop the listener.
    pub async fn accept(&self, name: &str) -> Accepted {
        loop {
            let result = match self {
                Bound::Tcp(l) => l.async_io(Interest::READABLE, accept_tcp).await,
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
        if over {
            opts.stats.rejected.fetch_add(1, Ordering::Relaxed);
        }
        // Each task holds only what its connection needs for its whole life: it is most of
        // what an idle client connection costs.
        match accepted {
            Accepted::Tcp(stream, _) if over && svc.tls().is_some() => {
                // An answer (a 503, ERR 1040) would need a handshake first: refused as is.
                opts.tasks.spawn(Box::pin(async move {
                    let _active = active;
                    svc.track(stream).finish_client(Ending::Refused).await
                }));
            }
            Accepted::Tcp(mut stream, peer) if svc.tls().is_some() => {
                let opts = opts.clone();
                opts.tasks.clone().spawn(async move {
                    let _active = active;
                    let client = Box::pin(client_addr(&mut stream, peer, &opts)).await;
                    match (client, svc.tls()) {
                        (Some(client), Some((config, within))) => {
                            match Box::pin(tls::accept(config, stream, within, &opts.stats.tls))
                                .await
                            {
                                Ok(tls) => {
                                    drop(opts);
                                    svc.serve(tls, Some(client)).await
                                }
                                Err((e, stream)) => {
                                    // Accepted, if never served.
                                    opts.stats.connections.fetch_add(1, Ordering::Relaxed);
                                    tracing::debug!(listener = %opts.name, peer = %client,
                                        error = e.as_str(), "TLS handshake failed");
                                    // A TLS client has an alert to read; a plain one waits
                                    // for an answer it could not read, and sees the close.
                                    let ending = match e {
                                        tls::HandshakeError::NotTls => Ending::ReadsToEof,
                                        _ => Ending::RefusedAfterAnswer,
                                    };
                                    Box::pin(svc.track(stream).finish_client(ending)).await
                                }
                            }
                        }
                        _ => Box::pin(svc.track(stream).finish_client(Ending::Refused)).await,
                    }
                });
            }
            Accepted::Tcp(mut stream, peer) if over => {
                // Boxed: rare, and large; it must not weigh on every task.
                let opts = opts.clone();
                opts.tasks.clone().spawn(Box::pin(async move {
                    let _active = active;
                    match client_addr(&mut stream, peer, &opts).await {
                        Some(client) => {
                            let tracked = svc.track(stream);
                            svc.reject(tracked, Some(client)).await
                        }
                        None => svc.track(stream).finish_client(Ending::Refused).await,
                    }
                }));
            }
            Accepted::Tcp(mut stream, peer) if opts.proxy_header.is_some() => {
                let opts = opts.clone();
                opts.tasks.clone().spawn(async move {
                    let _active = active;
                    let client = Box::pin(client_addr(&mut stream, peer, &opts)).await;
                    drop(opts);
                    match client {
                        Some(client) => svc.serve(stream, Some(client)).await,
                        None => Box::pin(svc.track(stream).finish_client(Ending::Refused)).await,
                    }
                });
            }
            Accepted::Tcp(stream, peer) => {
                opts.tasks.spawn(Counted {
                    conn: svc.serve(stream, Some(peer)),
                    _active: active,
                });
            }
            Accepted::Unix(stream) if over => {
                opts.tasks.spawn(Box::pin(async move {
                    let _active = active;
                    let tracked = svc.track(stream);
                    svc.reject(tracked, None).await
                }));
            }
            Accepted::Unix(stream) => {
                opts.tasks.spawn(Counted {
                    conn: svc.serve(stream, None),
                    _active: active,
                });
            }
        }
    }
    tracing::info!(listener = %opts.name, "stopped accepting");
}

/// The client's address: from its PROXY header when the listener reads one, else the peer's.
/// None when the header is bad: the caller then closes the connection as a refusal.
async fn client_addr(
    stream: &mut EagerTcp,
    peer: SocketAddr,
    opts: &AcceptOpts,
) -> Option<SocketAddr> {
    let Some(within) = opts.proxy_header else {
        return Some(peer);
    };
    match proxy_protocol::read_header(stream, within).await {
        Ok(addrs) => Some(addrs.map_or(peer, |a| a.source)),
        Err(e) => {
            tracing::warn!(listener = %opts.name, peer = %peer, error = %e,
                "refusing connection: bad PROXY protocol header");
            None
        }
    }
}

/// One accept4 on a TCP listener: the socket comes non-blocking, and unregistered.
fn accept_tcp(l: &std::net::TcpListener) -> io::Result<Accepted> {
    let (sock, addr) = SockRef::from(l).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
    let peer = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("accepted a TCP connection without an IP address"))?;
    Ok(Accepted::Tcp(EagerTcp::new(sock.into()), peer))
}

pin_project_lite::pin_project! {
    /// A connection's future with its `active` count. Not an async block: one would keep a
    /// copy of the protocol future's inputs (socket, address, service) beside the future for
    /// the connection's whole life, in every idle task.
    struct Counted<F> {
        #[pin]
        conn: F,
        _active: ActiveGuard,
    }
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

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().conn.poll(cx)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        // Once handed over, the file names the new process's socket.
        if let Bound::Unix(_, Some(path)) = self {
            if crate::upgrade::handed_over() {
                return;
            }
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
