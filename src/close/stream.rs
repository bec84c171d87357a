//! `Tracked<S>`: the one connection wrapper every protocol uses.
//!
//! It watches the socket for the peer's FIN, swallows the protocol code's own shutdown
//! (hyper calls `poll_shutdown` when it is done with a connection, which would send FIN
//! before the policy had its say), and at the end carries out the close policy and writes
//! the ledger — exactly once, whether the connection ends cleanly (`finish_client`) or is
//! simply dropped (errors, pooled connections retired by the pool).

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::ledger::{Closer, How, Reason, SideLedger};
use crate::config::{ClientTimeWait, LingerFallback, UpstreamTimeWait};

/// A stream socket a `Tracked` can wrap.
pub trait Socket: AsyncRead + AsyncWrite + AsFd + Unpin + Send + Sync + 'static {
    /// TCP sockets have TIME_WAIT, TCP_INFO and SO_LINGER; unix sockets have none of them.
    const IS_TCP: bool;

    /// Ready when there is something to read (or EOF), without reading it.
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Reads what has arrived already, without waiting: Ok(0) at EOF, WouldBlock when
    /// nothing is there (or the socket cannot tell without waiting).
    fn read_now(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// `Socket` for a tokio stream type; TCP and unix streams differ only in `IS_TCP`.
macro_rules! impl_socket {
    ($stream:ty, $tcp:expr) => {
        impl Socket for $stream {
            const IS_TCP: bool = $tcp;

            fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                loop {
                    std::task::ready!(self.poll_read_ready(cx))?;
                    // A fresh socket can report ready before anything arrived: peek to be
                    // sure; WouldBlock clears the readiness so the next poll waits for data.
                    match self.try_io(tokio::io::Interest::READABLE, || peek_one(self)) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Poll::Ready(Err(e)),
                        Ok(_) => return Poll::Ready(Ok(())),
                    }
                }
            }

            fn read_now(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.try_read(buf)
            }
        }
    };
}

impl_socket!(tokio::net::TcpStream, true);
impl_socket!(tokio::net::UnixStream, false);

/// Peeks one byte without blocking: Ok(0) at EOF, WouldBlock when nothing is there.
pub fn peek_one<S: AsFd>(sock: &S) -> io::Result<usize> {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    SockRef::from(sock).peek(&mut probe)
}

/// The client-side close policy of a listener.
#[derive(Debug, Clone, Copy)]
pub struct ClientPolicy {
    pub time_wait: ClientTimeWait,
    pub linger: Duration,
    pub fallback: LingerFallback,
}

/// Shared between a pooled connection's handle and its socket, so that the pool can say why
/// it let the connection go before the socket (inside hyper's connection task) is dropped.
#[derive(Debug, Default)]
pub struct CloseCtl {
    reason: AtomicU8,
}

/// What to do when a `Tracked` is dropped without `finish_client`.
#[derive(Debug)]
enum Role {
    Client(ClientPolicy),
    Upstream(UpstreamTimeWait, Arc<CloseCtl>),
}

/// A socket that knows who closed first and closes by policy.
#[derive(Debug)]
pub struct Tracked<S: Socket> {
    /// The socket.
    inner: S,
    /// The ledger of the side this connection belongs to.
    ledger: Arc<SideLedger>,
    /// What the drop path does.
    role: Role,
    /// A read returned EOF: the peer's FIN arrived.
    peer_eof: bool,
    /// waitless sent FIN (a real shutdown, only under policies that want it).
    sent_fin: bool,
    /// Who sent the first FIN, once known.
    first: Option<Closer>,
    /// The close was carried out and recorded; drop does nothing more.
    done: bool,
    /// The TCP state read just now (by `peer_closed` or `await_acked`), for the `close_now`
    /// that follows, so a close reads TCP_INFO once; cleared before anything that waits.
    state_seen: Option<u8>,
}

const REASON_UNSET: u8 = u8::MAX;

// TCP states as in include/net/tcp_states.h.
const TCP_ESTABLISHED: u8 = 1;
const TCP_FIN_WAIT1: u8 = 4;
const TCP_FIN_WAIT2: u8 = 5;
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;

// === impl ClientPolicy ===

impl ClientPolicy {
    /// The policy a listener's settings ask for.
    pub fn of(listener: &crate::config::Listener) -> ClientPolicy {
        ClientPolicy {
            time_wait: listener.time_wait,
            linger: listener.linger,
            fallback: listener.linger_fallback,
        }
    }
}

// === impl CloseCtl ===

impl CloseCtl {
    pub fn new() -> Arc<CloseCtl> {
        Arc::new(CloseCtl {
            reason: AtomicU8::new(REASON_UNSET),
        })
    }

    /// Tells the socket why the pool is letting it go; the first reason given wins.
    pub fn retire(&self, reason: Reason) {
        let _ = self.reason.compare_exchange(
            REASON_UNSET,
            reason.to_index(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    fn reason(&self) -> Option<Reason> {
        Reason::from_index(self.reason.load(Ordering::Relaxed))
    }
}

// === impl Tracked ===

impl<S: Socket> Tracked<S> {
    /// Wraps an accepted client connection.
    pub fn client(inner: S, ledger: Arc<SideLedger>, policy: ClientPolicy) -> Tracked<S> {
        Tracked::new(inner, ledger, Role::Client(policy))
    }

    /// Wraps a connection to an upstream server.
    pub fn upstream(
        inner: S,
        ledger: Arc<SideLedger>,
        policy: UpstreamTimeWait,
        ctl: Arc<CloseCtl>,
    ) -> Tracked<S> {
        Tracked::new(inner, ledger, Role::Upstream(policy, ctl))
    }

    fn new(inner: S, ledger: Arc<SideLedger>, role: Role) -> Tracked<S> {
        Tracked {
            inner,
            ledger,
            role,
            peer_eof: false,
            sent_fin: false,
            first: None,
            done: false,
            state_seen: None,
        }
    }

    /// The wrapped socket.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped socket, to wait on or read from without the close tracking (bytes only:
    /// an EOF seen this way is seen again by the next tracked read).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Ends a client connection whose exchange is over, by the listener's policy.
    ///
    /// `eof_reader`: the client can only see the end of the response by the close (HTTP/1.0
    /// without keep-alive), so waiting for its FIN would only waste `linger`.
    pub async fn finish_client(mut self, reason: Reason, eof_reader: bool) {
        let policy = match self.role {
            Role::Client(p) => p,
            // Upstream sockets are closed by the drop path.
            Role::Upstream(..) => return,
        };
        if !S::IS_TCP {
            // No TIME_WAIT on a unix socket: any close is free.
            return self.close_now(How::Fin, reason);
        }
        let deadline = Instant::now() + policy.linger;
        match policy.time_wait {
            ClientTimeWait::Client => {
                if self.peer_closed() {
                    self.close_now(How::Fin, reason)
                } else if eof_reader {
                    self.fallback(policy, deadline, Reason::EofReader).await
                } else if self.await_peer_fin(deadline).await {
                    self.close_now(How::Fin, reason)
                } else {
                    self.fallback(policy, deadline, Reason::LingerExpired).await
                }
            }
            ClientTimeWait::Proxy => {
                if !self.peer_closed() {
                    self.send_fin().await;
                    // Read what the client still sends until its FIN, so that closing with
                    // unread data does not turn into an RST that destroys the response.
                    self.await_peer_fin(deadline).await;
                }
                self.close_now(How::Fin, reason)
            }
            // An EOF reader treats an RST as an error even after it has every byte: it gets
            // the fallback, as under "client".
            ClientTimeWait::None if eof_reader => {
                self.fallback(policy, deadline, Reason::EofReader).await
            }
            ClientTimeWait::None => {
                if self.await_acked(deadline).await {
                    self.close_now(How::Rst, reason)
                } else {
                    // Never drop unacknowledged response bytes: a graceful FIN keeps them.
                    self.close_now(How::Fin, Reason::LingerExpired)
                }
            }
        }
    }

    /// What `linger_fallback` says, for a client that did not close in time (or never will).
    async fn fallback(mut self, policy: ClientPolicy, deadline: Instant, reason: Reason) {
        match policy.fallback {
            LingerFallback::Fin => self.close_now(How::Fin, reason),
            LingerFallback::Reset => {
                // "reset" only once the send queue is empty; for EOF readers that means the
                // response arrived, and a Linux client still reads it after the RST.
                let deadline = match reason {
                    Reason::EofReader => deadline,
                    _ => Instant::now() + policy.linger,
                };
                let how = if self.await_acked(deadline).await {
                    How::Rst
                } else {
                    How::Fin
                };
                self.close_now(how, reason)
            }
        }
    }

    /// Waits until the peer's FIN (or RST) arrives, discarding what it sends; false when the
    /// deadline passed first.
    async fn await_peer_fin(&mut self, deadline: Instant) -> bool {
        self.state_seen = None;
        // Small: what a client sends after its response is rare, and this buffer lives in
        // every connection task's state.
        let mut scratch = [0u8; 256];
        loop {
            match tokio::time::timeout_at(deadline, self.inner.read(&mut scratch)).await {
                Err(_) => return false,
                Ok(Ok(0)) => {
                    self.saw_eof();
                    return true;
                }
                Ok(Ok(_)) => continue,
                Ok(Err(_)) => return true,
            }
        }
    }

    /// Waits until every byte sent was acknowledged; false at the deadline.
    async fn await_acked(&mut self, deadline: Instant) -> bool {
        let mut pause = Duration::from_millis(1);
        loop {
            let view = tcp_view(&self.inner);
            self.state_seen = view.map(|v| v.state);
            match view {
                Some(v) if !v.all_acked && Instant::now() >= deadline => return false,
                Some(v) if !v.all_acked => {
                    self.state_seen = None;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                // Unix sockets have no acknowledgements.
                _ => return true,
            }
        }
    }

    async fn send_fin(&mut self) {
        let _ = std::future::poll_fn(|cx| self.poll_send_fin(cx)).await;
    }

    /// Sends FIN now (a half-close: reading goes on). For relays that forward a peer's
    /// half-close; everything else leaves the FIN to the close policy.
    pub fn poll_send_fin(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.sent_fin {
            return Poll::Ready(Ok(()));
        }
        self.state_seen = None;
        if self.first.is_none() {
            // The peer's FIN may have arrived unread: then it was first.
            self.first = Some(if self.peer_closed() {
                Closer::Peer
            } else {
                Closer::Proxy
            });
        }
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        if poll.is_ready() {
            self.sent_fin = true;
        }
        poll
    }

    /// True once a read returned EOF (the peer's FIN).
    pub fn peer_eof(&self) -> bool {
        self.peer_eof
    }

    /// Ends an upstream connection whose exchange is over (a relay, not a pool): a server
    /// that closed first is answered with RST once everything sent was acknowledged, so it
    /// keeps no TIME_WAIT; otherwise waitless's FIN already went out and the close completes.
    pub async fn finish_upstream(mut self, linger: Duration) {
        if self.peer_closed() && !self.sent_fin {
            self.await_acked(Instant::now() + linger).await;
            self.close_now(How::Rst, Reason::PeerClosed)
        } else {
            self.close_now(How::Fin, Reason::Done)
        }
    }

    fn saw_eof(&mut self) {
        self.peer_eof = true;
        if self.first.is_none() {
            self.first = Some(Closer::Peer);
        }
    }

    /// True when the peer's FIN already arrived, even if nobody read the EOF.
    fn peer_closed(&mut self) -> bool {
        if self.peer_eof {
            return true;
        }
        S::IS_TCP
            && matches!(
                self.tcp_state(),
                Some(TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSE)
            )
    }

    /// The TCP state read just now if there is one, else read now (and kept for the close
    /// that follows).
    fn tcp_state(&mut self) -> Option<u8> {
        let state = self
            .state_seen
            .or_else(|| tcp_view(&self.inner).map(|v| v.state));
        self.state_seen = state;
        state
    }

    /// Sets up the close (`how`) and records it; the fd itself closes when `inner` drops.
    fn close_now(&mut self, how: How, reason: Reason) {
        if self.done {
            return;
        }
        self.done = true;
        let closer = self.first.unwrap_or_else(|| {
            if self.peer_closed() {
                Closer::Peer
            } else {
                Closer::Proxy
            }
        });
        let how = if self.sent_fin && how == How::Rst {
            // After our FIN an RST still spares TIME_WAIT only while the peer has not
            // answered with its own FIN.
            match self.tcp_state() {
                Some(TCP_FIN_WAIT1) | Some(TCP_FIN_WAIT2) => How::Rst,
                _ => How::Fin,
            }
        } else {
            how
        };
        let how = if S::IS_TCP && how == How::Rst {
            // SO_LINGER {on, 0}: close() sends RST and skips TIME_WAIT.
            match SockRef::from(&self.inner).set_linger(Some(Duration::ZERO)) {
                Ok(()) => How::Rst,
                Err(_) => How::Fin,
            }
        } else {
            how
        };
        self.ledger.record(closer, how, reason);
    }
}

impl<S: Socket> Drop for Tracked<S> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let peer_closed = self.peer_closed();
        let (how, reason) = match &self.role {
            Role::Client(policy) => {
                let reason = if peer_closed {
                    Reason::PeerClosed
                } else {
                    Reason::Error
                };
                let how = match policy.time_wait {
                    ClientTimeWait::None => How::Rst,
                    _ => How::Fin,
                };
                (how, reason)
            }
            Role::Upstream(policy, ctl) => {
                let given = ctl.reason();
                let reason = match given {
                    Some(r) if !peer_closed => r,
                    _ if peer_closed => Reason::PeerClosed,
                    _ => Reason::Error,
                };
                // Only a deliberate retirement of a healthy connection under "proxy" closes
                // with FIN; a server that closed (or announced it would) is answered with RST
                // so that it keeps no TIME_WAIT, and so is every error.
                let deliberate = matches!(
                    reason,
                    Reason::Idle | Reason::Lifetime | Reason::PoolFull | Reason::Drain
                );
                let how = match policy {
                    UpstreamTimeWait::Proxy if deliberate => How::Fin,
                    _ => How::Rst,
                };
                (how, reason)
            }
        };
        self.close_now(how, reason);
    }
}

impl<S: Socket> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            if buf.filled().len() == before && buf.remaining() > 0 {
                self.saw_eof();
            }
        }
        poll
    }
}

impl<S: Socket> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// Swallowed: the close policy, not the protocol code, decides whether a FIN is sent.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
}

/// What one TCP_INFO read tells the close path.
#[derive(Debug, Clone, Copy)]
struct TcpView {
    /// tcpi_state.
    state: u8,
    /// Nothing left unsent or unacknowledged (as SIOCOUTQ == 0, without a second call).
    all_acked: bool,
}

/// The kernel's TCP state of a socket, and whether the peer acknowledged every byte.
fn tcp_view<S: AsFd>(sock: &S) -> Option<TcpView> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the buffer and its length are valid for the call; the kernel writes at most len.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 || len < 1 {
        return None;
    }
    // SAFETY: zero-initialised and partly written by the kernel: every bit pattern is valid.
    let info = unsafe { info.assume_init() };
    // tcpi_notsent_bytes came with Linux 4.6; an older kernel leaves it 0 and the segments
    // in flight (tcpi_unacked) still say whether the peer is behind.
    Some(TcpView {
        state: info.tcpi_state,
        all_acked: info.tcpi_unacked == 0 && info.tcpi_notsent_bytes == 0,
    })
}

/// True when the TCP socket is still established (for pool checks).
pub fn is_established<S: AsFd>(sock: &S) -> bool {
    tcp_view(sock).map(|v| v.state) == Some(TCP_ESTABLISHED)
}
