//! TCP mode: a byte-exact relay for any protocol, one server connection per client
//! connection. It cannot reuse a server connection for a second client, but it still decides
//! who closes first on each side, and it can take the connect off the hot path by keeping
//! `preconnect` fresh, never-used connections open to each server.
//!
//! Half-closes cross the relay: a client's FIN becomes a FIN toward the server and the other
//! way round, and bytes that flow after a half-close are relayed. Two exceptions, both to
//! keep TIME_WAIT off a side: a client that finishes after the server already closed is not
//! answered with a FIN toward the server but with RST (the server's socket in FIN_WAIT_2 goes
//! straight to CLOSED), and under `linger_fallback = "reset"` a server's close ends the client
//! connection with RST once the client acknowledged everything.

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::close::{ClientPolicy, Ending, Reason, ServerSocket, SideLedger, Socket, Tracked};
use crate::config::{self, Address, ProxyProtocol};
use crate::connector::{self, GetError, OpenError, Plain, Reuse};
use crate::listener::{ListenerStats, Serve};
use crate::pool::{self, PoolConn};
use crate::proxy_protocol;

/// A fresh connection to a server, never used by a client; None once a relay took it.
#[derive(Debug)]
pub struct TcpConn {
    io: Option<ServerSocket>,
}

/// An upstream of preconnected TCP connections.
pub type TcpUpstream = pool::Upstream<TcpConn>;

/// A tcp listener: its settings and where it relays to.
#[derive(Debug)]
pub struct TcpRelay {
    /// Its configuration.
    pub cfg: config::Listener,
    /// Where clients are relayed to.
    pub upstream: Arc<TcpUpstream>,
    /// Its client-side close ledger.
    pub ledger: Arc<SideLedger>,
    /// Its counters.
    pub stats: Arc<ListenerStats>,
    /// Wakes the preconnect task when a connection was taken.
    refill: Arc<Notify>,
}

/// One direction of the relay.
struct Half {
    /// Bytes read and not yet written.
    buf: Box<[u8]>,
    pos: usize,
    cap: usize,
    /// The reader's EOF arrived.
    eof: bool,
    /// EOF arrived and everything before it was written; the half-close was forwarded or
    /// deliberately not.
    done: bool,
}

/// How the relay ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Both directions finished.
    Both,
    /// The server closed, and the client's policy ends its connection now (with the
    /// fallback's RST) rather than relaying on.
    ServerClosed,
    /// Nothing moved for the listener's keepalive_timeout.
    Idle,
}

const RELAY_BUF: usize = 64 * 1024;

/// A relay needs no handshake: a fresh socket is a connection.
const HANDSHAKE: Plain<fn(ServerSocket) -> TcpConn> = Plain(TcpConn::fresh);

// === impl TcpConn ===

impl TcpConn {
    fn fresh(io: ServerSocket) -> TcpConn {
        TcpConn { io: Some(io) }
    }
}

impl PoolConn for TcpConn {
    type ServerState = ();

    /// A fresh connection is still good unless the server closed it (EOF or error). Bytes
    /// waiting to be read are fine: some servers greet first.
    fn is_usable(&mut self) -> bool {
        self.io.as_mut().is_some_and(ServerSocket::is_open)
    }
}

// === impl TcpRelay ===

impl TcpRelay {
    /// Builds the relay for `cfg` in front of `upstream`, and starts keeping its servers'
    /// preconnected connections when the upstream asks for some.
    pub fn new(
        cfg: config::Listener,
        upstream: Arc<TcpUpstream>,
        ledger: Arc<SideLedger>,
        stats: Arc<ListenerStats>,
    ) -> Arc<TcpRelay> {
        let refill = Arc::new(Notify::new());
        if upstream.cfg.preconnect > 0 {
            tokio::spawn(keep_preconnected(
                Arc::downgrade(&upstream),
                refill.clone(),
                cfg.name.clone(),
            ));
        }
        Arc::new(TcpRelay {
            cfg,
            upstream,
            ledger,
            stats,
            refill,
        })
    }

    async fn serve_client<S: Socket>(self: Arc<Self>, stream: S, peer: Option<SocketAddr>) {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let local = SockRef::from(&stream)
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket());
        let policy = self.cfg.close_policy();
        let mut client = Tracked::client(stream, self.ledger.clone(), policy)
            .logged(crate::access::Conn::new(&self.cfg.name, "tcp", peer));
        let header = self.header(peer, local);
        let up = &self.upstream;
        let linger = self.cfg.linger;
        // Preconnected connections first, then a fresh connect; a server that refuses is
        // skipped for the next. A client waits up to connect_timeout for room under
        // max_connections.
        let asked = client.log().map(|_| Instant::now());
        match connector::get(up, Reuse::Any, &HANDSHAKE, &self.cfg.name).await {
            Ok((mut lease, reused)) => {
                self.refill.notify_one();
                if let (Some(log), Some(asked)) = (client.log(), asked) {
                    let mut trip = crate::access::Trip::default();
                    trip.lent(&lease.server.label, reused, Some(asked.elapsed()));
                    log.session(trip, None);
                }
                // The lease (and its max_connections permit) lives as long as the relay; the
                // socket is the relay's to close.
                let Some(io) = lease.pooled.conn.io.take() else {
                    return;
                };
                return match io {
                    // With a PROXY header the connector left TLS for now: the header goes in
                    // clear, then the handshake (HAProxy's `send-proxy` with `ssl`; what
                    // nginx's `listen ... ssl proxy_protocol` expects).
                    ServerSocket::Tcp(io) if up.cfg.tls.is_some() => {
                        let by = std::time::Instant::now() + up.cfg.connect_timeout;
                        let at = connector::Opening::of(up, &lease.server, by);
                        match clear_then_tls(io, &header, &at).await {
                            Ok(io) => {
                                self.run(&mut client, io, &[], policy)
                                    .await
                                    .finish(client, linger)
                                    .await
                            }
                            Err(e) => {
                                connector::failed(&up.cfg, &lease.server, &e, &self.cfg.name);
                                self.stats.errors_connect.fetch_add(1, Ordering::Relaxed);
                                client.finish_client(Ending::Refused).await
                            }
                        }
                    }
                    ServerSocket::Tcp(io) => {
                        self.run(&mut client, io, &header, policy)
                            .await
                            .finish(client, linger)
                            .await
                    }
                    ServerSocket::Tls(io) => {
                        self.run(&mut client, *io, &header, policy)
                            .await
                            .finish(client, linger)
                            .await
                    }
                    ServerSocket::Unix(io) => {
                        self.run(&mut client, io, &header, policy)
                            .await
                            .finish(client, linger)
                            .await
                    }
                };
            }
            Err(GetError::Failed {
                error: OpenError::Busy,
                ..
            }) => {
                self.stats.errors_busy.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(listener = %self.cfg.name, peer = ?peer, upstream = %up.cfg.name,
                    "all upstream connections busy (max_connections); closing the client connection");
                return client.finish_client(Ending::Refused).await;
            }
            Err(_) => {}
        }
        self.stats.errors_connect.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(listener = %self.cfg.name, peer = ?peer, upstream = %up.cfg.name,
            "no upstream server reachable; closing the client connection");
        client.finish_client(Ending::Refused).await;
    }

    /// The PROXY header to send first, if the upstream wants one.
    fn header(&self, peer: Option<SocketAddr>, local: Option<SocketAddr>) -> Vec<u8> {
        let version = self.upstream.cfg.proxy_protocol;
        match (version, peer, local) {
            (ProxyProtocol::Off, ..) => Vec::new(),
            (_, Some(src), Some(dst)) => proxy_protocol::encode(version, src, dst),
            // A unix-socket client has no address to announce.
            (ProxyProtocol::V1, ..) => b"PROXY UNKNOWN\r\n".to_vec(),
            (ProxyProtocol::V2, ..) => proxy_protocol::encode_local(),
        }
    }

    /// Relays between the client and a server connection; returns what the closes need.
    async fn run<C: Socket, U: Socket>(
        &self,
        client: &mut Tracked<C>,
        mut server: Tracked<U>,
        header: &[u8],
        policy: ClientPolicy,
    ) -> Outcome<U> {
        if !header.is_empty() {
            if let Err(e) = server.write_all(header).await {
                tracing::debug!(listener = %self.cfg.name, error = %e, "writing the PROXY header failed");
                return Outcome {
                    end: Err(e),
                    server,
                };
            }
        }
        let end = relay(
            client,
            &mut server,
            policy.ends_relay_at_server_close(),
            self.cfg.keepalive_timeout,
        )
        .await;
        if let Err(e) = &end {
            tracing::debug!(listener = %self.cfg.name, error = %e, "tcp relay ended with an error");
        }
        Outcome { end, server }
    }
}

impl Serve for TcpRelay {
    fn serve<S: Socket>(
        self: Arc<Self>,
        stream: S,
        peer: Option<SocketAddr>,
    ) -> impl std::future::Future<Output = ()> + Send {
        self.serve_client(stream, peer)
    }

    fn track<S: Socket>(&self, stream: S) -> Tracked<S> {
        Tracked::client(stream, self.ledger.clone(), self.cfg.close_policy())
    }

    fn tls(&self) -> Option<(&crate::tls::ServerTls, std::time::Duration)> {
        Some((self.cfg.tls.as_ref()?, self.cfg.header_timeout))
    }
}

/// The server side after a relay, and how the relay ended.
struct Outcome<U: Socket> {
    end: io::Result<End>,
    server: Tracked<U>,
}

impl<U: Socket> Outcome<U> {
    /// Closes both sides by their policies.
    async fn finish<C: Socket>(self, client: Tracked<C>, linger: Duration) {
        let client_ending = match self.end {
            // The relay ends only once the client's EOF was read, so it closed by itself.
            Ok(End::Both) => Ending::Over(Reason::Done),
            Ok(End::ServerClosed) => Ending::ServerClosed,
            Ok(End::Idle) => Ending::Over(Reason::Idle),
            // Dropped: the close mechanism records an error (or the peer's close) and RSTs
            // where its policy says.
            Err(_) => return,
        };
        tokio::join!(
            client.finish_client(client_ending),
            self.server
                .finish_upstream(Ending::Over(Reason::Done), linger),
        );
    }
}

/// Writes the PROXY `header` on a plain connection, then makes the upstream's TLS handshake.
async fn clear_then_tls(
    mut plain: Tracked<tokio::net::TcpStream>,
    header: &[u8],
    at: &connector::Opening<'_>,
) -> io::Result<Tracked<crate::tls::Tls<tokio::net::TcpStream>>> {
    let by = tokio::time::Instant::from_std(at.deadline);
    match tokio::time::timeout_at(by, plain.write_all(header)).await {
        Ok(written) => written.map_err(|e| {
            io::Error::new(e.kind(), format!("writing the PROXY header failed: {e}"))
        })?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the PROXY header was not taken within connect_timeout",
            ))
        }
    }
    at.start_tls(plain).await
}

/// Keeps `preconnect` fresh connections open to each TCP server of the upstream, until the
/// upstream is gone. Woken when one is taken; also looks every 100 ms, since the pool's reaper
/// drops connections the servers closed.
async fn keep_preconnected(up: Weak<TcpUpstream>, taken: Arc<Notify>, listener: String) {
    loop {
        {
            let Some(up) = up.upgrade() else { return };
            for server in &up.servers().servers {
                if !matches!(server.addr, Address::Tcp(_)) || !server.health.is_up() {
                    continue;
                }
                // Within max_connections: a preconnected connection holds its permit.
                while server.idle_count() < up.cfg.preconnect {
                    match connector::open(&up, server, &HANDSHAKE, &listener).await {
                        Ok(pooled) => server.put(&up.cfg, pooled),
                        Err(e) => {
                            tracing::debug!(server = %server.label, error = %e, "preconnect failed");
                            break;
                        }
                    }
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), taken.notified()).await;
    }
}

/// Copies both ways until both directions finished (or an end rule applies).
async fn relay<C: Socket, U: Socket>(
    client: &mut Tracked<C>,
    server: &mut Tracked<U>,
    end_at_server_close: bool,
    idle: Duration,
) -> io::Result<End> {
    let mut up = Half::new();
    let mut down = Half::new();
    let mut idle_timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(idle));
    poll_fn(|cx| {
        let mut moved = false;
        if !down.done {
            // server → client
            match down.poll_copy(cx, server, client, &mut moved) {
                Poll::Ready(Ok(())) => {
                    if end_at_server_close && !up.done {
                        return Poll::Ready(Ok(End::ServerClosed));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if !up.done {
            // client → server; once the server has closed, its FIN is answered with RST later
            // rather than with a FIN now.
            let fin = !down.done;
            match up.poll_copy_with(cx, client, server, fin, &mut moved) {
                Poll::Ready(Ok(())) | Poll::Pending => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            }
        }
        if up.done && down.done {
            return Poll::Ready(Ok(End::Both));
        }
        if moved {
            idle_timer.as_mut().reset(Instant::now() + idle);
        }
        match idle_timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Ok(End::Idle)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

// === impl Half ===

impl Half {
    fn new() -> Half {
        Half {
            buf: vec![0u8; RELAY_BUF].into_boxed_slice(),
            pos: 0,
            cap: 0,
            eof: false,
            done: false,
        }
    }

    fn poll_copy<R: Socket, W: Socket>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut Tracked<R>,
        w: &mut Tracked<W>,
        moved: &mut bool,
    ) -> Poll<io::Result<()>> {
        self.poll_copy_with(cx, r, w, true, moved)
    }

    /// Reads from `r` and writes to `w` until `r`'s EOF, then forwards the half-close as FIN
    /// when `fin`.
    fn poll_copy_with<R: Socket, W: Socket>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut Tracked<R>,
        w: &mut Tracked<W>,
        fin: bool,
        moved: &mut bool,
    ) -> Poll<io::Result<()>> {
        loop {
            while self.pos < self.cap {
                let pending = self.buf.get(self.pos..self.cap).unwrap_or_default();
                let n = ready!(Pin::new(&mut *w).poll_write(cx, pending))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                *moved = true;
            }
            if self.eof {
                if fin {
                    ready!(w.poll_send_fin(cx))?;
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut self.buf);
            ready!(Pin::new(&mut *r).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            self.pos = 0;
            self.cap = n;
            if n == 0 {
                self.eof = true;
            } else {
                *moved = true;
            }
        }
    }
}
