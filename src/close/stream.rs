//! `Tracked<S>`: the one connection wrapper every protocol uses.
//!
//! It watches the socket for the peer's FIN, swallows the protocol code's own shutdown
//! (hyper calls `poll_shutdown` when it is done with a connection, which would send FIN
//! before the policy had its say), and at the end carries out the step `policy::decide`
//! chose and writes the ledger — exactly once, whether the connection ends cleanly
//! (`finish_client`, `finish_upstream`) or is simply dropped (errors, pooled connections
//! retired by the pool).

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use super::ledger::{Closer, How, Reason, SideLedger};
use super::policy::{
    decide, grace, ClientPolicy, ClientTimeWait, Close, Ending, Expired, Facts, Side, Step,
    UpstreamPolicy, UpstreamTimeWait, Wait,
};
use crate::access;

/// A stream socket a `Tracked` can wrap.
pub trait Socket: AsyncRead + AsyncWrite + AsFd + Unpin + Send + Sync + 'static {
    /// TCP sockets have TIME_WAIT, TCP_INFO and SO_LINGER; unix sockets have none of them.
    const IS_TCP: bool;

    /// Ready when there is something to read (or EOF), without reading it.
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Reads what has arrived already, without waiting: Ok(0) at EOF, WouldBlock when
    /// nothing is there (or the socket cannot tell without waiting).
    fn read_now(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// The connection is TLS (`tls::Tls`): its clients asked for https.
    const IS_TLS: bool = false;

    /// Says the session is over in the protocol under the application's, before any close:
    /// TLS's close_notify. A FIN or RST follows, by policy.
    fn poll_close_notify(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
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

/// A tokio stream that can leave the reactor it was registered with for the calling
/// thread's: a pooled connection lent to a client on another worker would otherwise wake its
/// old worker's thread on every event, which then wakes the client's.
pub trait Rehome: Sized {
    /// The same socket, registered with this thread's runtime instead (two epoll_ctl calls).
    /// On an error the socket is closed.
    fn rehomed(self) -> io::Result<Self>;
}

macro_rules! impl_rehome {
    ($stream:ty) => {
        impl Rehome for $stream {
            fn rehomed(self) -> io::Result<Self> {
                <$stream>::from_std(self.into_std()?)
            }
        }
    };
}

impl_rehome!(tokio::net::TcpStream);
impl_rehome!(tokio::net::UnixStream);

/// Peeks one byte without blocking: Ok(0) at EOF, WouldBlock when nothing is there.
pub fn peek_one<S: AsFd>(sock: &S) -> io::Result<usize> {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    SockRef::from(sock).peek(&mut probe)
}

/// Shared between a pooled connection's handle and its socket, so that the pool can say why
/// it let the connection go before the socket (inside hyper's connection task) is dropped.
#[derive(Debug, Default)]
pub struct CloseCtl {
    reason: AtomicU8,
}

/// Which side the connection is on, with what its close needs.
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
    /// What TCP_INFO said just now (read by `peer_closed` or `await_acked`), for the steps
    /// that follow at once, so a close reads it once; cleared before anything that waits.
    seen: Option<TcpView>,
    /// A client connection's access log, when it is on: bytes each way, and its last line,
    /// which the close completes.
    log: Option<Arc<access::Conn>>,
}

/// A `Tracked` without its socket, while a layer is put over the socket (`Tracked::wrap`).
#[derive(Debug)]
struct Carried {
    /// `Tracked::ledger`.
    ledger: Arc<SideLedger>,
    /// `Tracked::role`.
    role: Role,
    /// `Tracked::peer_eof`.
    peer_eof: bool,
    /// `Tracked::sent_fin`.
    sent_fin: bool,
    /// `Tracked::first`.
    first: Option<Closer>,
    /// `Tracked::done`.
    done: bool,
    /// `Tracked::log`.
    log: Option<Arc<access::Conn>>,
}

impl Carried {
    /// Tracks `inner` as the connection it carries on. What TCP_INFO said is read anew.
    fn onto<T: Socket>(self, inner: T) -> Tracked<T> {
        Tracked {
            inner,
            ledger: self.ledger,
            role: self.role,
            peer_eof: self.peer_eof,
            sent_fin: self.sent_fin,
            first: self.first,
            done: self.done,
            seen: None,
            log: self.log,
        }
    }
}

const REASON_UNSET: u8 = u8::MAX;

// TCP states as in include/net/tcp_states.h.
const TCP_ESTABLISHED: u8 = 1;
const TCP_FIN_WAIT1: u8 = 4;
const TCP_FIN_WAIT2: u8 = 5;
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;

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
            seen: None,
            log: None,
        }
    }

    /// Logs the connection in the access log (`access::Conn::new` is None when it is off).
    pub fn logged(mut self, log: Option<Arc<access::Conn>>) -> Tracked<S> {
        self.log = log;
        self
    }

    /// The connection's access log, when it is on.
    pub fn log(&self) -> Option<&Arc<access::Conn>> {
        self.log.as_ref()
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

    /// The same connection over a layer that takes its socket (TLS started mid-protocol, as
    /// MySQL's SSLRequest does): the close seen so far, the ledger and the access log carry
    /// over to the new stream. When `layer` fails it hands the socket back, tracked as before.
    /// `layer` must end by itself (the TLS handshake's own deadline): dropped halfway, it
    /// takes the socket with it and the close goes unrecorded.
    pub async fn wrap<T, E, F, Fut>(self, layer: F) -> Result<Tracked<T>, (E, Tracked<S>)>
    where
        T: Socket,
        F: FnOnce(S) -> Fut,
        Fut: std::future::Future<Output = Result<T, (E, S)>>,
    {
        let (inner, carried) = self.into_parts();
        match layer(inner).await {
            Ok(layered) => Ok(carried.onto(layered)),
            Err((e, inner)) => Err((e, carried.onto(inner))),
        }
    }

    /// The connection moved onto this thread's reactor (`Rehome`). A socket lost on the way
    /// (the kernel refused to register it) is recorded as closed by waitless in error.
    pub fn rehomed(self) -> io::Result<Tracked<S>>
    where
        S: Rehome,
    {
        let (inner, carried) = self.into_parts();
        match inner.rehomed() {
            Ok(inner) => Ok(carried.onto(inner)),
            Err(e) => {
                if !carried.done {
                    let closer = carried.first.unwrap_or(Closer::Proxy);
                    carried.ledger.record(closer, How::Fin, Reason::Error);
                }
                Err(e)
            }
        }
    }

    /// The socket and the rest, without this connection's drop recording a close.
    fn into_parts(self) -> (S, Carried) {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never used or dropped again, so each field read out of it here
        // has one owner from now on.
        let (inner, ledger, role, log) = unsafe {
            (
                std::ptr::read(&this.inner),
                std::ptr::read(&this.ledger),
                std::ptr::read(&this.role),
                std::ptr::read(&this.log),
            )
        };
        let carried = Carried {
            ledger,
            role,
            peer_eof: this.peer_eof,
            sent_fin: this.sent_fin,
            first: this.first,
            done: this.done,
            log,
        };
        (inner, carried)
    }

    /// Ends a client connection, by the listener's policy, for how it ended.
    pub async fn finish_client(self, ending: Ending) {
        self.finish(ending, Duration::ZERO).await
    }

    /// Ends an upstream connection: a relay's exchange being over, or a health check's probe.
    /// A close may wait up to `linger` for the server to acknowledge what it was sent.
    pub async fn finish_upstream(self, ending: Ending, linger: Duration) {
        self.finish(ending, linger).await
    }

    async fn finish(mut self, ending: Ending, upstream_linger: Duration) {
        let step = decide(self.side(upstream_linger), self.facts(), ending);
        self.carry_out(step).await
    }

    /// The side to decide for: the role's policy, and how long an upstream close may wait.
    fn side(&self, upstream_linger: Duration) -> Side {
        match &self.role {
            Role::Client(policy) => Side::Client(*policy),
            Role::Upstream(time_wait, _) => Side::Upstream(UpstreamPolicy {
                time_wait: *time_wait,
                linger: upstream_linger,
            }),
        }
    }

    /// What the socket says now; one TCP_INFO read at most, kept for the steps that follow.
    fn facts(&mut self) -> Facts {
        Facts {
            tcp: S::IS_TCP,
            peer_fin: self.peer_closed(),
            sent_fin: self.sent_fin,
        }
    }

    /// Takes `step`: its FIN, its wait, then the close the wait's outcome calls for.
    async fn carry_out(mut self, step: Step) {
        if S::IS_TLS && !self.done {
            // Whoever sends the first FIN, a TLS reader sees the end only by the alert; and
            // under `none` it is sent before the RST's wait for everything to be acknowledged.
            let _ = std::future::poll_fn(|cx| self.inner.poll_close_notify(cx)).await;
        }
        if step.fin_first {
            let unset = self.first.is_none();
            // The facts just read said the peer had not closed.
            self.first.get_or_insert(Closer::Proxy);
            // Read now: a socket that reaches CLOSE no longer says who its peer was.
            let peer = if unset && S::IS_TCP {
                self.addr(|sock| sock.peer_addr())
            } else {
                None
            };
            self.send_fin().await;
            // But its FIN may have crossed the decision. LAST_ACK right after our FIN says the
            // peer's came first, and TIME_WAIT is its. CLOSE says one of two things on
            // loopback: a LAST_ACK already acknowledged (the peer's), or a peer so quick to
            // answer our FIN with its own that the socket is TIME_WAIT already (ours); only
            // the kernel's table tells them apart. A peer that had not closed leaves us in
            // FIN_WAIT1 or FIN_WAIT2 this soon.
            if unset {
                match self.tcp_state() {
                    Some(TCP_LAST_ACK) => self.first = Some(Closer::Peer),
                    Some(TCP_CLOSE) if !self.in_time_wait(peer) => self.first = Some(Closer::Peer),
                    _ => {}
                }
            }
        }
        let expired = match step.wait {
            Wait::Nothing => None,
            Wait::PeerFin(within) => self
                .await_peer_fin(Instant::now() + within)
                .await
                .then_some(step.expired),
            Wait::PeerFinOrGrace(within) => {
                let graced = step.expired.labelled(Reason::EofReader);
                self.await_peer_fin_or_grace(within, step.expired, graced)
                    .await
            }
            Wait::Acked(within) => {
                let acked = self.await_acked(Instant::now() + within).await;
                (!acked).then_some(step.expired)
            }
        };
        let close = match expired {
            None => step.close,
            Some(Expired::Close(close)) => close,
            Some(Expired::ResetOnceAcked { within, reason }) => {
                let how = if self.await_acked(Instant::now() + within).await {
                    How::Rst
                } else {
                    How::Fin
                };
                Close { how, reason }
            }
        };
        self.close_now(close.how, close.reason)
    }

    /// Waits for the peer's FIN up to `within`, but once every byte sent is acknowledged
    /// only a grace of a few RTTs longer; None when the FIN came, else how to close.
    async fn await_peer_fin_or_grace(
        &mut self,
        within: Duration,
        expired: Expired,
        graced: Expired,
    ) -> Option<Expired> {
        // One clock read serves the first round: the common client closes before any timer.
        let mut now = Instant::now();
        let mut deadline = now + within;
        let mut acked = false;
        let mut pause = Duration::from_millis(1);
        let mut scratch = [0u8; 256];
        loop {
            if !acked {
                // The decision's own TCP_INFO read serves the first round.
                if let Some(v) = self.seen.take().or_else(|| tcp_view(&self.inner)) {
                    if v.all_acked {
                        acked = true;
                        let rtt = Duration::from_millis(u64::from(v.rtt_ms));
                        deadline = deadline.min(now + grace(rtt, within));
                    }
                }
            }
            let wake = if acked {
                deadline
            } else {
                deadline.min(now + pause)
            };
            match tokio::time::timeout_at(wake, self.inner.read(&mut scratch)).await {
                Err(_) => {
                    now = Instant::now();
                    if now >= deadline {
                        return Some(if acked { graced } else { expired });
                    }
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Ok(Ok(0)) => {
                    self.saw_eof();
                    return None;
                }
                Ok(Ok(_)) => now = Instant::now(),
                Ok(Err(_)) => return None,
            }
        }
    }

    /// Waits until the peer's FIN (or RST) arrives, discarding what it sends; true when the
    /// deadline passed first.
    async fn await_peer_fin(&mut self, deadline: Instant) -> bool {
        self.seen = None;
        // Small: what a client sends after its response is rare, and this buffer lives in
        // every connection task's state.
        let mut scratch = [0u8; 256];
        loop {
            match tokio::time::timeout_at(deadline, self.inner.read(&mut scratch)).await {
                Err(_) => return true,
                Ok(Ok(0)) => {
                    self.saw_eof();
                    return false;
                }
                Ok(Ok(_)) => continue,
                Ok(Err(_)) => return false,
            }
        }
    }

    /// Waits until every byte sent was acknowledged; false at the deadline.
    async fn await_acked(&mut self, deadline: Instant) -> bool {
        let mut pause = Duration::from_millis(1);
        loop {
            // What was read just now (the facts of the decision) is as good as a new read.
            let view = self.seen.or_else(|| tcp_view(&self.inner));
            self.seen = view;
            match view {
                Some(v) if !v.all_acked && Instant::now() >= deadline => return false,
                Some(v) if !v.all_acked => {
                    self.seen = None;
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

    /// Writes the last bytes of a client connection whose exchange ends with them. Under
    /// `time_wait = "proxy"` waitless's FIN goes in the same segment (TCP_CORK around the
    /// write and the shutdown): a client cannot see the end and send its own FIN before
    /// waitless's is on its way, so the two never cross (a crossing is a simultaneous close,
    /// which leaves TIME_WAIT on both ends). Elsewhere a plain write: the policy's FIN, if
    /// any, follows in `finish_client`.
    pub async fn write_last(&mut self, buf: &[u8]) -> io::Result<()> {
        let proxy_first =
            matches!(&self.role, Role::Client(p) if p.time_wait == ClientTimeWait::Proxy);
        if !(S::IS_TCP && proxy_first) || self.sent_fin {
            return self.write_all(buf).await;
        }
        // Without the cork the FIN still follows within microseconds.
        let corked = SockRef::from(&self.inner).set_tcp_cork(true).is_ok();
        let written = self.write_all(buf).await;
        if written.is_ok() {
            // The shutdown pushes what the cork held, FIN on its last segment.
            self.send_fin().await;
        }
        if corked {
            let _ = SockRef::from(&self.inner).set_tcp_cork(false);
        }
        written
    }

    /// Sends FIN now (a half-close: reading goes on). For relays that forward a peer's
    /// half-close; everything else leaves the FIN to the close policy.
    pub fn poll_send_fin(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.sent_fin {
            return Poll::Ready(Ok(()));
        }
        self.seen = None;
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
            // The state before the FIN is stale now: a close that follows reads it anew.
            self.seen = None;
        }
        poll
    }

    /// True once a read returned EOF (the peer's FIN).
    pub fn peer_eof(&self) -> bool {
        self.peer_eof
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

    /// Whether this connection's 4-tuple (`peer` as read before the close) is in TIME_WAIT
    /// on this host, by the kernel's table; if that cannot be read, counts as not.
    fn in_time_wait(&self, peer: Option<std::net::SocketAddr>) -> bool {
        match (self.addr(|sock| sock.local_addr()), peer) {
            (Some(local), Some(peer)) => {
                super::census::time_wait_between(local, peer).unwrap_or(false)
            }
            _ => false,
        }
    }

    /// One of the socket's addresses, if it is an IP one and can be read.
    fn addr(
        &self,
        read: impl Fn(&SockRef<'_>) -> io::Result<socket2::SockAddr>,
    ) -> Option<std::net::SocketAddr> {
        read(&SockRef::from(&self.inner)).ok()?.as_socket()
    }

    /// The TCP state read just now if there is one, else read now (and kept for the close
    /// that follows).
    fn tcp_state(&mut self) -> Option<u8> {
        let view = self.seen.or_else(|| tcp_view(&self.inner));
        self.seen = view;
        view.map(|v| v.state)
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
        let how = match how {
            // SO_LINGER {on, 0}: close() sends RST and skips TIME_WAIT. A unix socket has no
            // RST: its close is an EOF.
            How::Rst if S::IS_TCP => {
                match SockRef::from(&self.inner).set_linger(Some(Duration::ZERO)) {
                    Ok(()) => How::Rst,
                    Err(_) => How::Fin,
                }
            }
            _ if !S::IS_TCP => How::Fin,
            how => how,
        };
        self.ledger.record(closer, how, reason);
        if let Some(log) = self.log.take() {
            log.closed(access::Closed {
                closer,
                how,
                reason,
            });
        }
    }
}

impl<S: Socket> Drop for Tracked<S> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let ending = match &self.role {
            Role::Client(_) => Ending::Error,
            Role::Upstream(_, ctl) => ctl.reason().map_or(Ending::Error, Ending::Retired),
        };
        if S::IS_TLS {
            // A drop cannot wait: the alert goes if the socket takes it now (a pooled TLS
            // connection retired by the pool still says close_notify before its FIN or RST).
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let _ = self.inner.poll_close_notify(&mut cx);
        }
        // For these endings the decision never waits (a drop cannot): its close is the step.
        let step = decide(self.side(Duration::ZERO), self.facts(), ending);
        self.close_now(step.close.how, step.close.reason);
    }
}

impl<S: Socket> Tracked<S> {
    fn count_written(&self, poll: &Poll<io::Result<usize>>) {
        if let (Some(log), Poll::Ready(Ok(n))) = (&self.log, poll) {
            log.wrote(*n);
        }
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
            let read = buf.filled().len() - before;
            if read == 0 && buf.remaining() > 0 {
                self.saw_eof();
            }
            if let Some(log) = &self.log {
                log.read(read);
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
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.count_written(&poll);
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.count_written(&poll);
        poll
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
    /// tcpi_rtt, the kernel's smoothed round-trip time, in whole milliseconds (saturating):
    /// the grace needs no finer, and this view lives in every connection's task — 8 bytes
    /// more made the task outgrow its 512-byte block (idle RSS 944 -> 1,174 bytes/conn).
    rtt_ms: u16,
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
        rtt_ms: u16::try_from(info.tcpi_rtt / 1000).unwrap_or(u16::MAX),
    })
}

/// True when the TCP socket is still established (for pool checks).
pub fn is_established<S: AsFd>(sock: &S) -> bool {
    tcp_view(sock).map(|v| v.state) == Some(TCP_ESTABLISHED)
}
