//! The upstream half of the HTTP relay: pooled keep-alive HTTP/1.1 connections that
//! waitless, not a library pool, reuses, retires and closes.
//!
//! A request without a body (nearly all of them) is written and its response read right
//! here, in the request's task (`wire`); one with a body is handed to hyper's client for that
//! exchange, which sends the body while it reads the response, and the socket comes back
//! to the pool when hyper is done with it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use super::wire::{self, Decoded, Framing};
use crate::close::{Reason, ServerSocket};
use crate::connector::Plain;
use crate::pool::{self, PoolConn};

/// The error of a response body.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A pooled HTTP/1.1 connection, boxed: leases, response bodies and the responses that
/// carry them move several times per request, and a pointer moves for less than the socket,
/// buffer and timer.
pub type HttpConn = Box<Conn>;

/// What a pooled HTTP/1.1 connection holds.
#[derive(Debug)]
pub struct Conn {
    /// The socket; None while hyper's client has it for a request with a body.
    io: Option<ServerSocket>,
    /// Bytes read past the response decoded last (a usable idle connection has none).
    buf: BytesMut,
    /// Bounds the wait for each response head; kept, and moved on, from one to the next.
    timer: Pin<Box<Sleep>>,
}

/// An upstream of HTTP connections.
pub type HttpUpstream = pool::Upstream<HttpConn>;

/// A pooled HTTP connection lent out.
pub type Lease = pool::Lease<HttpConn>;

/// HTTP/1.1 needs no handshake: a fresh socket is a connection.
pub const HANDSHAKE: Plain<fn(ServerSocket) -> HttpConn> = Plain(Conn::fresh);

/// Why a bodyless exchange got no response head.
#[derive(Debug)]
pub enum Failed {
    /// None came within `response_timeout`.
    TimedOut,
    /// The connection broke first.
    Broken {
        /// Nothing at all came back: the server may have closed the idle connection just as
        /// the request went out (the keep-alive race), and an idempotent request can be
        /// sent again.
        untouched: bool,
        /// What went wrong, for the 502 and the log.
        why: String,
    },
}

/// A response body that gives its connection back to the pool once it was read to the end
/// by its framing, the server keeps the connection open, and the request went out whole;
/// dropped early, or after a request body that was cut short, it takes the connection down
/// with it.
pub struct UpstreamBody {
    /// Where the bytes come from.
    source: Source,
    /// The server keeps the connection open after this response.
    keep_alive: bool,
    /// How far the request body got; None for a request without one (it went out whole
    /// with its head).
    sent: Option<Arc<Progress>>,
}

/// The two ways a response body is read.
enum Source {
    /// Decoded here from the connection's bytes; the lease is None once given back.
    Wire {
        lease: Option<Lease>,
        framing: Framing,
    },
    /// Decoded by hyper's client, whose task pools the connection when told it may.
    Hyper {
        inner: Incoming,
        verdict: Option<oneshot::Sender<bool>>,
    },
}

/// The client's request body on its way upstream. It records how far it got: a server may
/// answer before the body is in (an early 413, say), and a connection whose request was not
/// sent whole is out of step with the server and must not be reused.
pub struct ClientBody {
    /// The client's body, as hyper's server decodes it.
    inner: Incoming,
    /// Shared with the response body that decides whether the connection is pooled.
    progress: Arc<Progress>,
}

/// How far a request body got: still sending, sent whole, or failed (a framing error in the
/// client's body, or the client went away mid-body).
#[derive(Debug, Default)]
pub struct Progress(AtomicU8);

// === impl Conn ===

impl Conn {
    /// A connection on a socket just opened.
    fn fresh(io: ServerSocket) -> HttpConn {
        Box::new(Conn {
            io: Some(io),
            buf: BytesMut::new(),
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        })
    }
}

// === impl HttpConn ===

impl PoolConn for HttpConn {
    type ServerState = ();

    fn is_usable(&mut self) -> bool {
        // Anything readable on an idle connection (its EOF, or bytes nobody asked for) puts
        // it out of step; the readiness flag tells without a syscall in the common case.
        self.buf.is_empty() && self.io.as_mut().is_some_and(ServerSocket::looks_quiet)
    }
}

// === impl ClientBody ===

impl ClientBody {
    /// Wraps the client's body; the returned progress is whole at once for an empty body.
    pub fn new(inner: Incoming) -> (ClientBody, Arc<Progress>) {
        let progress = Arc::new(Progress::default());
        if inner.is_end_stream() {
            progress.set(Progress::SENT);
        }
        let body = ClientBody {
            inner,
            progress: progress.clone(),
        };
        (body, progress)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(None) => self.progress.set(Progress::SENT),
            // hyper's client stops polling once a sized body says it is at its end.
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => {
                self.progress.set(Progress::SENT)
            }
            Poll::Ready(Some(Err(_))) => self.progress.set(Progress::FAILED),
            _ => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// === impl Progress ===

impl Progress {
    const SENDING: u8 = 0;
    const SENT: u8 = 1;
    const FAILED: u8 = 2;

    /// The whole body went out.
    pub fn is_sent(&self) -> bool {
        self.0.load(Ordering::Acquire) == Progress::SENT
    }

    /// The client's body broke: its framing was invalid or the client went away.
    pub fn is_failed(&self) -> bool {
        self.0.load(Ordering::Acquire) == Progress::FAILED
    }

    fn set(&self, state: u8) {
        // Only the first outcome counts; SENDING is never set back.
        let _ = self.0.compare_exchange(
            Progress::SENDING,
            state,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

// === impl Lease ===

impl Lease {
    /// Writes a request without a body and reads the response head, for at most `within`;
    /// the body is then read through `UpstreamBody::wire`.
    pub async fn exchange(
        &mut self,
        request: &[u8],
        head_request: bool,
        within: Duration,
    ) -> Result<wire::Head, Failed> {
        let conn = &mut *self.pooled.conn;
        let Some(io) = conn.io.as_mut() else {
            return Err(broken(true, "connection lost".into()));
        };
        // The connection's own timer, moved on: a later deadline costs no timer-wheel work.
        conn.timer.as_mut().reset(Instant::now() + within);
        let mut work = std::pin::pin!(write_then_read_head(
            io,
            &mut conn.buf,
            request,
            head_request
        ));
        let timer = &mut conn.timer;
        std::future::poll_fn(|cx| match work.as_mut().poll(cx) {
            Poll::Ready(done) => Poll::Ready(done),
            Poll::Pending => timer.as_mut().poll(cx).map(|()| Err(Failed::TimedOut)),
        })
        .await
    }

    /// Hands the connection to hyper's client for one request with a body. When hyper is
    /// done with it, the connection comes back to the pool if the verdict sent by the
    /// response body says so; otherwise it is closed.
    pub async fn hand_to_hyper(
        mut self,
    ) -> io::Result<(SendRequest<ClientBody>, oneshot::Sender<bool>)> {
        let io = self
            .pooled
            .conn
            .io
            .take()
            .ok_or_else(|| io::Error::other("connection lost"))?;
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(io::Error::other)?;
        let (verdict, heard) = oneshot::channel();
        tokio::spawn(async move {
            let parts = conn.without_shutdown().await;
            let reusable = heard.await.unwrap_or(false);
            match parts {
                Ok(parts) => {
                    self.pooled.conn.io = Some(parts.io.into_inner());
                    if reusable && parts.read_buf.is_empty() {
                        self.return_to_pool();
                    }
                }
                Err(e) => {
                    tracing::debug!(server = %self.server.label, error = %e,
                        "upstream connection ended with an error");
                }
            }
        });
        Ok((tx, verdict))
    }

    /// Gives the connection back to its pool with a small buffer: a big body grew it, and an
    /// idle connection keeps a small one.
    fn return_to_pool(mut self) {
        if self.pooled.conn.buf.capacity() > 16 * 1024 {
            self.pooled.conn.buf = BytesMut::new();
        }
        self.give_back();
    }
}

// === impl UpstreamBody ===

impl UpstreamBody {
    /// The body of a response read by `Lease::exchange` on `lease`.
    pub fn wire(lease: Lease, framing: Framing, keep_alive: bool) -> UpstreamBody {
        UpstreamBody {
            source: Source::Wire {
                lease: Some(lease),
                framing,
            },
            keep_alive,
            sent: None,
        }
    }

    /// The body of a response hyper's client read; `verdict` goes to its connection task.
    pub fn hyper(
        inner: Incoming,
        verdict: oneshot::Sender<bool>,
        keep_alive: bool,
        sent: Arc<Progress>,
    ) -> UpstreamBody {
        UpstreamBody {
            source: Source::Hyper {
                inner,
                verdict: Some(verdict),
            },
            keep_alive,
            sent: Some(sent),
        }
    }

    /// The body ended by its framing: pools the connection if the server keeps it and the
    /// request also went out whole; otherwise closes it.
    fn release(&mut self) {
        let reusable = self.keep_alive && self.sent.as_ref().is_none_or(|s| s.is_sent());
        match &mut self.source {
            Source::Wire { lease, .. } => {
                let Some(lease) = lease.take() else { return };
                if reusable && lease.pooled.conn.buf.is_empty() {
                    lease.return_to_pool();
                } else if !self.keep_alive {
                    // The server said it closes: its FIN is answered with RST on drop.
                    lease.pooled.ctl.retire(Reason::PeerClosed);
                }
            }
            Source::Hyper { verdict, .. } => {
                if let Some(v) = verdict.take() {
                    let _ = v.send(reusable);
                }
            }
        }
    }

    /// The next piece of a body read here.
    fn poll_wire(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let Source::Wire { lease, framing } = &mut self.source else {
            return Poll::Ready(None);
        };
        loop {
            let Some(held) = lease.as_mut() else {
                return Poll::Ready(None);
            };
            let conn = &mut held.pooled.conn;
            let step = match framing.decode(&mut conn.buf) {
                Ok(step) => step,
                Err(why) => return Poll::Ready(Some(Err(self.fail(why)))),
            };
            match step {
                Decoded::Data(bytes) => {
                    if framing.is_done() {
                        self.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                Decoded::End => {
                    self.release();
                    return Poll::Ready(None);
                }
                Decoded::NeedMore => {}
            }
            let Some(io) = conn.io.as_mut() else {
                return Poll::Ready(Some(Err(self.fail("connection lost"))));
            };
            // Small bodies in a small buffer; big ones in big reads.
            let want = match framing.remaining() {
                Some(n) if n < 8 * 1024 => 8 * 1024,
                _ => 64 * 1024,
            };
            if conn.buf.capacity() - conn.buf.len() < want / 2 {
                conn.buf.reserve(want);
            }
            match std::task::ready!(tokio_util::io::poll_read_buf(
                Pin::new(io),
                cx,
                &mut conn.buf
            )) {
                Ok(0) if matches!(framing, Framing::UntilClose) => {
                    // The close ends this body: the server closed first, as it meant to.
                    held.pooled.ctl.retire(Reason::PeerClosed);
                    *lease = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return Poll::Ready(Some(Err(
                        self.fail("upstream closed the connection mid-body")
                    )))
                }
                Ok(_) => {}
                Err(e) => {
                    let why = format!("reading the response body: {e}");
                    return Poll::Ready(Some(Err(self.fail_owned(why))));
                }
            }
        }
    }

    /// Drops the connection (closed by the drop path) and makes the body's error.
    fn fail(&mut self, why: &'static str) -> BodyError {
        self.fail_owned(why.to_string())
    }

    fn fail_owned(&mut self, why: String) -> BodyError {
        if let Source::Wire { lease, .. } = &mut self.source {
            if let Some(lease) = lease.take() {
                lease.pooled.ctl.retire(Reason::Error);
            }
        }
        why.into()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let Source::Hyper { inner, .. } = &mut this.source else {
            return this.poll_wire(cx);
        };
        let poll = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(None) = poll {
            this.release();
        }
        poll.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Wire { lease, framing } => lease.is_none() || framing.is_done(),
            Source::Hyper { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Wire { framing, .. } => match framing.remaining() {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
            Source::Hyper { inner, .. } => inner.size_hint(),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body with nothing left (HEAD, 204, 304, Content-Length: 0) may never be polled.
        if self.is_end_stream() {
            self.release();
        }
    }
}

/// Sends a bodyless request and reads until a response head is whole.
async fn write_then_read_head(
    io: &mut ServerSocket,
    buf: &mut BytesMut,
    request: &[u8],
    head_request: bool,
) -> Result<wire::Head, Failed> {
    if let Err(e) = io.write_all(request).await {
        return Err(broken(true, format!("sending the request: {e}")));
    }
    let mut got_any = false;
    loop {
        if got_any {
            let parsed = wire::parse_response(buf, head_request);
            if let Some(head) = parsed.map_err(|why| broken(false, why))? {
                return Ok(head);
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(8 * 1024);
        }
        match tokio_util::io::read_buf(io, buf).await {
            Ok(0) => {
                let why = "connection closed before the response head".into();
                return Err(broken(!got_any, why));
            }
            Ok(_) => got_any = true,
            Err(e) => return Err(broken(!got_any, format!("reading the response: {e}"))),
        }
    }
}

fn broken(untouched: bool, why: String) -> Failed {
    Failed::Broken { untouched, why }
}
