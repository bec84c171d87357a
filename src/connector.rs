//! One connector for every upstream, whatever its protocol.
//!
//! `get` picks a server (the balance policy's rotation, failing over past servers that
//! refuse), takes an idle connection or opens one, and lends it as a `Lease` together with
//! whether it carried a request before: the retry rule of the keep-alive race reads that in
//! one line at the call site (Pingora's connector hands back the same). `open` is the one
//! place a connection is opened: the `max_connections` permit, connect and handshake within
//! `connect_timeout`, the TLS handshake when the upstream has `tls` (one per pooled
//! connection, resuming the upstream's earlier sessions), the server's counters and its
//! health. A protocol supplies only what happens on a fresh socket before it can be lent
//! (`Handshake`): nothing for tcp and http, the login for mysql. Where something must go in
//! clear before TLS (MySQL's greeting and SSLRequest, a PROXY header), the socket is left
//! plain and the protocol starts TLS itself, through the same code (`Opening::start_tls`).

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpStream, UnixStream};

use crate::close::{CloseCtl, ServerSocket, Tracked};
use crate::config::{self, Address, ProxyProtocol};
use crate::pool::{Busy, Counted, Lease, PoolConn, Pooled, Room, Server, Upstream};
use crate::tls::{Tls, TlsStats};

/// What a protocol does on a fresh server socket before the pool may lend it.
pub trait Handshake<C>: Sync {
    /// What a server that refuses the handshake says (a MySQL ERR packet); such a server is
    /// up, only this connection is not.
    type Refusal: Send;

    /// The protocol starts the upstream's TLS itself, after an exchange in clear (MySQL's
    /// SSLRequest follows the server's greeting): `open` leaves the socket plain.
    const STARTS_TLS: bool = false;

    /// Turns the socket into the protocol's connection; bounded by `connect_timeout` with
    /// the connect (`at.deadline`).
    fn greet(
        &self,
        io: ServerSocket,
        at: &Opening<'_>,
    ) -> impl Future<Output = Result<C, OpenError<Self::Refusal>>> + Send;
}

/// A connection being opened to one server, as a protocol that starts TLS itself needs it.
#[derive(Debug, Clone, Copy)]
pub struct Opening<'a> {
    /// The upstream's settings, its `tls` among them.
    pub cfg: &'a config::Upstream,
    /// The upstream's TLS counters.
    pub stats: &'a TlsStats,
    /// The server.
    pub addr: &'a Address,
    /// Its label (`host:port`), for errors.
    pub label: &'a str,
    /// The host it was found by when it follows DNS: its TLS name, whichever address answers.
    pub host: Option<&'a str>,
    /// When the connect and its handshakes must be done by (`connect_timeout`).
    pub deadline: Instant,
}

/// The handshake of protocols that speak first on a plain socket (http, tcp).
#[derive(Debug, Clone, Copy)]
pub struct Plain<F>(pub F);

/// Which idle connections `get` may lend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// This worker's own, another worker's once `pool_size` are open (`take_idle_or_open`).
    OwnFirst,
    /// Any worker's (connections opened ahead of need, never used).
    Any,
    /// None: a fresh connection (a retry after the keep-alive race).
    Never,
}

/// Why a connection could not be opened.
#[derive(Debug)]
pub enum OpenError<R> {
    /// `max_connections` are open and none freed up in time.
    Busy,
    /// The connect or the handshake failed or timed out: counted against the server's health.
    Io(io::Error),
    /// The server refused the handshake: it is up.
    Refused(R),
}

/// Why `get` lent nothing.
#[derive(Debug)]
pub enum GetError<R> {
    /// Every server of the upstream is marked down; nothing was tried.
    NoneUp,
    /// The last server tried failed so.
    Failed {
        /// Its label (`host:port` or `unix:/path`).
        server: String,
        error: OpenError<R>,
    },
}

// === impl Plain ===

impl<C, F> Handshake<C> for Plain<F>
where
    F: Fn(ServerSocket) -> C + Sync,
    C: Send,
{
    type Refusal = Infallible;

    fn greet(
        &self,
        io: ServerSocket,
        _at: &Opening<'_>,
    ) -> impl Future<Output = Result<C, OpenError<Infallible>>> + Send {
        std::future::ready(Ok((self.0)(io)))
    }
}

// === impl Opening ===

impl<'a> Opening<'a> {
    /// `server` of `up`, to be connected to by `deadline`.
    pub fn of<C: PoolConn>(
        up: &'a Upstream<C>,
        server: &'a Server<C>,
        deadline: Instant,
    ) -> Opening<'a> {
        Opening {
            cfg: &up.cfg,
            stats: &up.tls,
            addr: &server.addr,
            label: &server.label,
            host: server.name.as_deref().map(|n| n.host.as_str()),
            deadline,
        }
    }

    /// The upstream has `tls`: connections to its servers speak TLS.
    pub fn wants_tls(&self) -> bool {
        self.cfg.tls.is_some()
    }

    /// The upstream's TLS handshake on `plain`, a TCP connection to the server, by the
    /// deadline, resuming an earlier session of the upstream's when the server allows. A
    /// failed handshake's connection is closed by the policy and written in the ledger like
    /// any other; the error says why.
    pub async fn start_tls(
        &self,
        plain: Tracked<TcpStream>,
    ) -> io::Result<Tracked<Tls<TcpStream>>> {
        let named = self.cfg.tls.as_ref().and_then(|t| {
            let name = match self.host {
                Some(host) => t.name_for_host(host),
                None => t.name_of(self.addr),
            };
            Some((t, name?))
        });
        let Some((tls, name)) = named else {
            return Err(io::Error::other(format!(
                "no TLS name for server {} (config out of step)",
                self.label
            )));
        };
        let within = self.deadline.saturating_duration_since(Instant::now());
        let layered = plain
            .wrap(|s| async move {
                crate::tls::connect(tls, name, s, within, self.stats)
                    .await
                    .map_err(|(kind, e, s)| ((kind, e), s))
            })
            .await;
        match layered {
            Ok(tls) => Ok(tls),
            // Dropped: closed by the policy and recorded.
            Err(((kind, e), _plain)) => Err(io::Error::new(
                e.kind(),
                format!("TLS handshake failed ({}): {e}", kind.as_str()),
            )),
        }
    }

    /// As `start_tls`, on a server socket that must be plain TCP.
    pub async fn start_tls_on(&self, io: ServerSocket) -> io::Result<ServerSocket> {
        match io {
            ServerSocket::Tcp(plain) => {
                Ok(ServerSocket::Tls(Box::new(self.start_tls(plain).await?)))
            }
            _ => Err(io::Error::other(format!(
                "TLS to server {} is started on a plain TCP connection only",
                self.label
            ))),
        }
    }
}

// === impl OpenError ===

impl<R> From<io::Error> for OpenError<R> {
    fn from(e: io::Error) -> OpenError<R> {
        OpenError::Io(e)
    }
}

impl<R> fmt::Display for OpenError<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Busy => f.write_str("all connections busy (max_connections)"),
            OpenError::Io(e) => write!(f, "{e}"),
            OpenError::Refused(_) => f.write_str("the server refused the handshake"),
        }
    }
}

// === functions ===

/// A connection to a server of `up`: an idle one `reuse` allows, else a new one, trying the
/// servers in rotation until one gives a connection. The flag says whether the connection
/// carried a request before. `listener` names the caller in logs.
pub async fn get<C, H>(
    up: &Arc<Upstream<C>>,
    reuse: Reuse,
    handshake: &H,
    listener: &str,
) -> Result<(Lease<C>, bool), GetError<H::Refusal>>
where
    C: PoolConn,
    H: Handshake<C>,
{
    let mut last = None;
    for server in up.rotation() {
        let idle = match reuse {
            Reuse::OwnFirst => server.take_idle_or_open(&up.cfg),
            Reuse::Any => server.take_idle(&up.cfg),
            Reuse::Never => None,
        };
        if let Some(pooled) = idle {
            return Ok(Lease::new(pooled, &server, up));
        }
        // Boxed: opening is rare, and its future would size every request's.
        let opening = Box::pin(async {
            let idle = reuse != Reuse::Never;
            match server.room(&up.cfg, idle, up.cfg.connect_timeout).await {
                Ok(Room::Idle(pooled)) => Ok(pooled),
                Ok(Room::Open(counted)) => {
                    open_counted(up, &server, handshake, counted, listener).await
                }
                Err(Busy) => Err(OpenError::Busy),
            }
        });
        match opening.await {
            Ok(pooled) => return Ok(Lease::new(pooled, &server, up)),
            Err(e) => last = Some((server.label.clone(), e)),
        }
    }
    Err(match last {
        Some((server, error)) => GetError::Failed { server, error },
        None => GetError::NoneUp,
    })
}

/// Opens a connection to `server` if there is room under `max_connections` now, and makes
/// it the protocol's (see `open_counted`).
pub async fn open<C, H>(
    up: &Upstream<C>,
    server: &Server<C>,
    handshake: &H,
    listener: &str,
) -> Result<Pooled<C>, OpenError<H::Refusal>>
where
    C: PoolConn,
    H: Handshake<C>,
{
    let counted = server.admit_now().map_err(|Busy| OpenError::Busy)?;
    open_counted(up, server, handshake, counted, listener).await
}

/// Connects to `server` in the room `counted` holds and shakes hands within
/// `connect_timeout`. Counts it as opened, the time it took (`connect_duration`), and its
/// failure against the server's health; a server that refuses the handshake stays up.
async fn open_counted<C, H>(
    up: &Upstream<C>,
    server: &Server<C>,
    handshake: &H,
    counted: Counted,
    listener: &str,
) -> Result<Pooled<C>, OpenError<H::Refusal>>
where
    C: PoolConn,
    H: Handshake<C>,
{
    let cfg = &up.cfg;
    let ctl = CloseCtl::new();
    // After the permit: waiting for room under max_connections is not the server's time.
    let started = Instant::now();
    let at = Opening::of(up, server, started + cfg.connect_timeout);
    // TLS at once, unless something goes in clear first: the protocol's exchange, or the
    // PROXY header a tcp relay writes for its client.
    let tls_now = !H::STARTS_TLS && cfg.proxy_protocol == ProxyProtocol::Off;
    let opening = async {
        let io = dial(up, server, &ctl, &at, tls_now).await?;
        handshake.greet(io, &at).await
    };
    let opened = match tokio::time::timeout(cfg.connect_timeout, opening).await {
        Ok(r) => r,
        Err(_) => Err(OpenError::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {:?}", cfg.connect_timeout),
        ))),
    };
    match opened {
        Ok(conn) => {
            server.stats.connect_duration.observe(started.elapsed());
            server.health.succeeded();
            Ok(Pooled::new(conn, ctl, counted))
        }
        Err(OpenError::Io(e)) => {
            failed(cfg, server, &e, listener);
            Err(OpenError::Io(e))
        }
        Err(other) => Err(other),
    }
}

/// Counts a failed connect (or handshake) against the server: its counter, a log line, and
/// its health, which marks it down after `fail_threshold` failures in a row.
pub fn failed<C: PoolConn>(
    cfg: &config::Upstream,
    server: &Server<C>,
    error: &dyn fmt::Display,
    listener: &str,
) {
    server.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(listener, upstream = %cfg.name, server = %server.label, error = %error,
        "cannot connect to upstream server");
    if server.health.failed(cfg) {
        tracing::warn!(upstream = %cfg.name, server = %server.label,
            backoff = ?cfg.fail_backoff, "server marked down");
    }
}

/// Connects a socket to `server` (TCP without Nagle's delay: requests go out whole), closed
/// by the upstream's policy for the reason `ctl` is given, and counts it as opened; with
/// `tls` and `tls_now`, makes the handshake by `at.deadline`. Otherwise not bounded in time:
/// `open` bounds it with the protocol's handshake.
pub async fn dial<C: PoolConn>(
    up: &Upstream<C>,
    server: &Server<C>,
    ctl: &Arc<CloseCtl>,
    at: &Opening<'_>,
    tls_now: bool,
) -> io::Result<ServerSocket> {
    let cfg = &up.cfg;
    let (ledger, policy) = (server.ledger.clone(), cfg.time_wait);
    let io = match &server.addr {
        Address::Tcp(addr) => {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            ServerSocket::Tcp(Tracked::upstream(s, ledger, policy, ctl.clone()))
        }
        Address::Unix(path) => {
            let s = UnixStream::connect(path).await?;
            ServerSocket::Unix(Tracked::upstream(s, ledger, policy, ctl.clone()))
        }
        // Validation keeps systemd sockets out of server lists.
        Address::Systemd(name) => {
            return Err(io::Error::other(format!(
                "systemd:{name} is a listening socket, not a server"
            )))
        }
    };
    server.stats.opened.fetch_add(1, Ordering::Relaxed);
    match tls_now && at.wants_tls() {
        true => at.start_tls_on(io).await,
        false => Ok(io),
    }
}
