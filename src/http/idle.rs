//! Letting go of hyper on idle keep-alive client connections.
//!
//! hyper's server connection keeps an 8 KiB write buffer and an 8 KiB read buffer for as long
//! as it lives, idle or not; ten thousand idle keep-alive clients would hold 160 MiB. So a
//! hyper connection that has been idle for a full `TICK` is shut down (hyper closes an idle
//! connection at once, without writing a byte), its socket and any bytes it had read but not
//! parsed are taken back, and the connection waits for its next request as cheaply as one
//! that never sent a byte. The client sees nothing: the socket stays open.
//!
//! Idleness is judged coarsely, with no clock read per request: each exchange counts its
//! start (the service is called) and its end (the response body is dropped, which hyper does
//! once its last byte is buffered), and one timer per hyper connection compares the counts
//! every `TICK`. hyper must never be shut down with a response unfinished: it would write
//! `Connection: close` or end the connection after it. Nor with a response still in its write
//! buffer: `Replay` notes a write the socket did not take, and such a connection is not idle.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{ConnState, RespBody};
use crate::access;

/// How often a hyper connection checks whether it is idle; it is let go after one full tick
/// without an exchange starting or ending, so within one to two ticks of idleness.
pub const TICK: Duration = Duration::from_millis(250);

/// The exchanges of one hyper connection, counted for the idle check.
#[derive(Debug, Default)]
pub struct Activity {
    /// Requests handed to the service.
    started: AtomicU32,
    /// Their responses finished (body dropped by hyper).
    ended: AtomicU32,
    /// The last write to the client's socket did not go through: hyper holds unsent bytes.
    write_blocked: AtomicBool,
}

/// The exchange counts at one tick, to compare with the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Snapshot {
    started: u32,
    ended: u32,
}

/// A response body that marks the end of its exchange when hyper drops it.
pub struct ExchangeBody {
    /// The response body proper.
    inner: RespBody,
    /// The connection whose `Activity` counts this exchange.
    conn: Arc<ConnState>,
    /// Its access-log line, handed to the connection's log when the response is done.
    logged: Option<Box<access::Exchange>>,
}

/// A client socket lent to one hyper connection: it yields first the bytes a previous hyper
/// connection had read but not parsed (a pipelined request), and records blocked writes.
pub struct Replay<T> {
    /// The socket.
    inner: T,
    /// Bytes to read before the socket's.
    pending: Bytes,
    /// Where a blocked write is recorded.
    conn: Arc<ConnState>,
}

// === impl Activity ===

impl Activity {
    /// A request was handed to the service.
    pub fn start(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            started: self.started.load(Ordering::Relaxed),
            ended: self.ended.load(Ordering::Relaxed),
        }
    }

    /// True when hyper can be let go: it served at least one request (a hyper connection is
    /// idle only after its first exchange), every response is written, and nothing started
    /// or ended since `last`, one tick ago.
    pub fn idle_since(&self, last: Snapshot) -> bool {
        let now = self.snapshot();
        now == last
            && now.started > 0
            && now.started == now.ended
            && !self.write_blocked.load(Ordering::Relaxed)
    }
}

// === impl Snapshot ===

impl Snapshot {
    /// At least one exchange started.
    pub fn any_started(&self) -> bool {
        self.started > 0
    }

    /// At least one exchange ended.
    pub fn any_ended(&self) -> bool {
        self.ended > 0
    }

    /// Every exchange that started ended, and at least one did: hyper waits for the next.
    pub fn between_requests(&self) -> bool {
        self.ended > 0 && self.started == self.ended
    }
}

// === impl ExchangeBody ===

impl ExchangeBody {
    /// Wraps the response of an exchange counted as started on `conn`.
    pub fn new(
        inner: RespBody,
        conn: Arc<ConnState>,
        logged: Option<Box<access::Exchange>>,
    ) -> ExchangeBody {
        ExchangeBody {
            inner,
            conn,
            logged,
        }
    }
}

impl Body for ExchangeBody {
    type Data = Bytes;
    type Error = <RespBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ExchangeBody {
    fn drop(&mut self) {
        // hyper drops the body once its end is in the write buffer, or when it gives up on
        // the connection: either way the exchange no longer keeps the connection busy.
        self.conn.activity.ended.fetch_add(1, Ordering::Relaxed);
        if let (Some(log), Some(ex)) = (self.conn.log.as_ref(), self.logged.take()) {
            log.exchange(*ex);
        }
    }
}

// === impl Replay ===

impl<T> Replay<T> {
    pub fn new(inner: T, pending: Bytes, conn: Arc<ConnState>) -> Replay<T> {
        Replay {
            inner,
            pending,
            conn,
        }
    }

    /// The socket, and the replayed bytes not read yet.
    pub fn into_parts(self) -> (T, Bytes) {
        (self.inner, self.pending)
    }

    fn note_write<R>(&self, poll: &Poll<R>) {
        self.conn
            .activity
            .write_blocked
            .store(poll.is_pending(), Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Replay<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pending.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.pending.len().min(buf.remaining());
        let chunk = self.pending.split_to(n);
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Replay<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note_write(&poll);
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note_write(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.note_write(&poll);
        poll
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
