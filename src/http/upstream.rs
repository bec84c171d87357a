//! The upstream half of the HTTP relay: pooled keep-alive HTTP/1.1 connections built on
//! hyper's connection-level client, so waitless — not a library pool — decides when a
//! connection is reused, retired and how it is closed.

use std::io;
use std::pin::Pin;
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
use crate::pool::{self, PoolConn, Pooled, Server};

/// The body of a request sent upstream: the client's, or empty for a replay.
pub type ReqBody = Either<Incoming, Empty<Bytes>>;

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
/// by its framing; dropped early, it takes the connection down with it.
pub struct UpstreamBody {
    /// The upstream response body.
    inner: Incoming,
    /// The connection and where it returns; None once returned.
    lease: Option<Lease>,
}

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

// === impl Lease ===

impl Lease {
    fn give_back(self) {
        self.server.put(&self.upstream.cfg, self.pooled);
    }
}

// === impl UpstreamBody ===

impl UpstreamBody {
    pub fn new(inner: Incoming, lease: Lease) -> UpstreamBody {
        UpstreamBody {
            inner,
            lease: Some(lease),
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
            if let Some(lease) = self.lease.take() {
                lease.give_back();
            }
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
        if let Some(lease) = self.lease.take() {
            if self.inner.is_end_stream() {
                lease.give_back();
            }
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
    let ctl = CloseCtl::new();
    let connecting = async {
        match &server.addr {
            Address::Tcp(addr) => {
                let stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                handshake(stream, server, upstream, ctl.clone(), permit).await
            }
            Address::Unix(path) => {
                let stream = UnixStream::connect(path).await?;
                handshake(stream, server, upstream, ctl.clone(), permit).await
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
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> io::Result<SendRequest<ReqBody>> {
    let io = Tracked::upstream(stream, server.ledger.clone(), upstream.cfg.time_wait, ctl);
    let (tx, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(io::Error::other)?;
    let label = server.label.clone();
    tokio::spawn(async move {
        // The permit counts this connection as open until its socket is gone.
        let _permit = permit;
        if let Err(e) = conn.await {
            tracing::debug!(server = %label, error = %e, "upstream connection ended with an error");
        }
    });
    Ok(tx)
}
