//! The upstream half of the HTTP relay: pooled keep-alive HTTP/1.1 connections built on
//! hyper's connection-level client, so waitless — not a library pool — decides when a
//! connection is reused, retired and how it is closed.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};

use crate::close::{CloseCtl, Socket, Tracked};
use crate::config::Address;
use crate::pool::{self, OpenSlot, PoolConn, Pooled, Server};

/// The body of a request sent upstream: the client's, or empty for a replay.
pub type ReqBody = Either<ClientBody, Empty<Bytes>>;

/// A pooled HTTP/1.1 connection: the sending half; hyper's connection task owns the socket.
#[derive(Debug)]
pub struct HttpConn {
    pub tx: SendRequest<ReqBody>,
}

/// An upstream of HTTP connections.
pub type HttpUpstream = pool::Upstream<HttpConn>;

/// Why no connection could be had.
#[derive(Debug)]
pub enum ConnectError {
    /// max_connections reached and none freed in time.
    Busy,
    /// connect() failed or timed out, or the handshake failed.
    Io(io::Error),
}

/// A response body that gives its connection back to the pool once it was read to the end
/// by its framing and the request went out whole; dropped early, or after a request body
/// that was cut short, it takes the connection down with it.
pub struct UpstreamBody {
    /// The upstream response body.
    inner: Incoming,
    /// The connection and where it returns; None once returned.
    lease: Option<Lease>,
    /// How far the request body got.
    sent: Arc<Progress>,
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

/// A borrowed connection and the pool it belongs to.
pub struct Lease {
    pub pooled: Pooled<HttpConn>,
    pub server: Arc<Server<HttpConn>>,
    pub upstream: Arc<HttpUpstream>,
}

// === impl ConnectError ===

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Busy => f.write_str("all connections busy (max_connections)"),
            ConnectError::Io(e) => write!(f, "{e}"),
        }
    }
}

// === impl HttpConn ===

impl PoolConn for HttpConn {
    fn is_usable(&mut self) -> bool {
        !self.tx.is_closed()
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
    fn give_back(self) {
        self.server.put(&self.upstream.cfg, self.pooled);
    }
}

// === impl UpstreamBody ===

impl UpstreamBody {
    /// `sent` is the progress of the request this body answers.
    pub fn new(inner: Incoming, lease: Lease, sent: Arc<Progress>) -> UpstreamBody {
        UpstreamBody {
            inner,
            lease: Some(lease),
            sent,
        }
    }

    /// Pools the connection if the request also went out whole; otherwise drops it.
    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            if self.sent.is_sent() {
                lease.give_back();
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = poll {
            self.release();
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

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body with nothing left (HEAD, 204, 304, Content-Length: 0) may never be polled.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

/// Opens a new connection to `server` and performs the HTTP/1.1 handshake.
pub async fn connect(
    upstream: &HttpUpstream,
    server: &Server<HttpConn>,
) -> Result<Pooled<HttpConn>, ConnectError> {
    let cfg = &upstream.cfg;
    let permit = server
        .open_permit(cfg.connect_timeout)
        .await
        .map_err(|_| ConnectError::Busy)?;
    let slot = server.open_slot();
    let ctl = CloseCtl::new();
    let connecting = async {
        match &server.addr {
            Address::Tcp(addr) => {
                let stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                handshake(stream, server, upstream, ctl.clone(), (permit, slot)).await
            }
            Address::Unix(path) => {
                let stream = UnixStream::connect(path).await?;
                handshake(stream, server, upstream, ctl.clone(), (permit, slot)).await
            }
        }
    };
    let tx = match tokio::time::timeout(cfg.connect_timeout, connecting).await {
        Ok(Ok(tx)) => tx,
        Ok(Err(e)) => return Err(ConnectError::Io(e)),
        Err(_) => {
            return Err(ConnectError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {:?}", cfg.connect_timeout),
            )))
        }
    };
    server
        .stats
        .opened
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(Pooled::new(HttpConn { tx }, ctl))
}

async fn handshake<S: Socket>(
    stream: S,
    server: &Server<HttpConn>,
    upstream: &HttpUpstream,
    ctl: Arc<CloseCtl>,
    counted: (Option<tokio::sync::OwnedSemaphorePermit>, OpenSlot),
) -> io::Result<SendRequest<ReqBody>> {
    let io = Tracked::upstream(stream, server.ledger.clone(), upstream.cfg.time_wait, ctl);
    let (tx, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(io::Error::other)?;
    let label = server.label.clone();
    tokio::spawn(async move {
        // The permit and the slot count this connection as open until its socket is gone.
        let _counted = counted;
        if let Err(e) = conn.await {
            tracing::debug!(server = %label, error = %e, "upstream connection ended with an error");
        }
    });
    Ok(tx)
}
