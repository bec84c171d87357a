//! Accepting sockets: binding with the options a proxy wants, and the accept loop.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use socket2::{Domain, SockRef, Socket as RawSocket, Type};
use tokio::net::{TcpListener, UnixListener};

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
}

/// Counters of one listener, whatever its protocol (fields a protocol has no use for stay 0).
#[derive(Debug, Default, Serialize)]
pub struct ListenerStats {
    /// Client connections accepted.
    pub connections: AtomicU64,
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
    /// Clients send a PROXY header first; read it within this long.
    pub proxy_header: Option<Duration>,
    /// The listener's ledger, for connections refused before the protocol saw them.
    pub ledger: Arc<SideLedger>,
}

/// Accepts on `sock` until the process ends, handing each connection to `svc`.
pub async fn accept_loop<T: Serve>(name: String, svc: Arc<T>, sock: Bound, opts: AcceptOpts) {
    let name: Arc<str> = name.into();
    loop {
        match sock.accept(&name).await {
            Accepted::Tcp(stream, peer) => match opts.proxy_header {
                None => {
                    tokio::spawn(svc.clone().serve(stream, Some(peer)));
                }
                Some(within) => {
                    let (svc, name, ledger) = (svc.clone(), name.clone(), opts.ledger.clone());
                    tokio::spawn(async move {
                        match proxy_protocol::read_header(&stream, within).await {
                            Ok(addrs) => {
                                let client = addrs.map_or(peer, |a| a.source);
                                svc.serve(stream, Some(client)).await
                            }
                            Err(e) => {
                                tracing::warn!(listener = %name, peer = %peer, error = %e,
                                    "refusing connection: bad PROXY protocol header");
                                // RST: nothing was sent, and a refused client keeps no TIME_WAIT.
                                let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                                ledger.record(Closer::Proxy, How::Rst, Reason::Error);
                            }
                        }
                    });
                }
            },
            Accepted::Unix(stream) => {
                tokio::spawn(svc.clone().serve(stream, None));
            }
        }
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
