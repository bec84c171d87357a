//! A socket to an upstream server, TCP, TLS over TCP, or unix, under the upstream's close
//! policy: what every pool keeps (the connector opens them).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::stream::{is_established, peek_one, Tracked};
use crate::tls::Tls;

/// A connection to a server, tracked by the close mechanism.
#[derive(Debug)]
pub enum ServerSocket {
    Tcp(Tracked<TcpStream>),
    /// The upstream has `tls`; its close sends close_notify first. Boxed: the session is
    /// large, and plain connections should not carry its size.
    Tls(Box<Tracked<Tls<TcpStream>>>),
    Unix(Tracked<UnixStream>),
}

// === impl ServerSocket ===

impl ServerSocket {
    /// Whether `rehomed` can move it: a TLS session's socket cannot be taken out of
    /// tokio-rustls's stream and put back, so it stays on the worker that opened it.
    pub fn can_rehome(&self) -> bool {
        !matches!(self, ServerSocket::Tls(_))
    }

    /// The same connection on this thread's reactor (see `Rehome`); a TLS one as it is.
    pub fn rehomed(self) -> io::Result<ServerSocket> {
        Ok(match self {
            ServerSocket::Tcp(t) => ServerSocket::Tcp(t.rehomed()?),
            ServerSocket::Unix(t) => ServerSocket::Unix(t.rehomed()?),
            tls @ ServerSocket::Tls(_) => tls,
        })
    }

    /// Still open on the server's side: established, with no EOF waiting to be read.
    /// Bytes waiting are fine (some servers greet first); under TLS what waits is taken in
    /// first (a session ticket), and a close_notify is the server's close.
    pub fn is_open(&mut self) -> bool {
        let probe = match self {
            ServerSocket::Tcp(t) if !is_established(t.get_ref()) => return false,
            ServerSocket::Tcp(t) => peek_one(t.get_ref()),
            ServerSocket::Tls(t) => {
                let quiet = t.get_mut().settle();
                return if quiet {
                    is_established(t.get_ref().tcp())
                } else {
                    t.get_ref().has_ahead()
                };
            }
            ServerSocket::Unix(t) => peek_one(t.get_ref()),
        };
        match probe {
            Ok(n) => n > 0,
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        }
    }

    /// Nothing to read, asked of the kernel (a peek): the server has neither closed nor sent
    /// anything unasked.
    pub fn is_quiet(&mut self) -> bool {
        let probe = match self {
            ServerSocket::Tcp(t) => peek_one(t.get_ref()),
            ServerSocket::Tls(t) => return t.get_mut().settle(),
            ServerSocket::Unix(t) => peek_one(t.get_ref()),
        };
        matches!(probe, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// As `is_quiet`, but tokio's readiness is looked at first, so there is no syscall unless
    /// an event came in since the last read; an event the reactor has not taken yet goes
    /// unseen, so a caller must cope with a server that closed just now.
    pub fn looks_quiet(&mut self) -> bool {
        let probe = match self {
            // TLS records (a session ticket) may have come unasked: read, always.
            ServerSocket::Tls(t) => return t.get_mut().settle(),
            ServerSocket::Tcp(t) => {
                let s = t.get_ref();
                s.try_io(Interest::READABLE, || peek_one(s))
            }
            ServerSocket::Unix(t) => {
                let s = t.get_ref();
                s.try_io(Interest::READABLE, || peek_one(s))
            }
        };
        matches!(probe, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            ServerSocket::Tcp($s) => $e,
            ServerSocket::Tls($s) => $e,
            ServerSocket::Unix($s) => $e,
        }
    };
}

impl AsyncRead for ServerSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for ServerSocket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write(cx, b))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}
