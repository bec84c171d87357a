//! `EagerTcp`: an accepted client socket that tries every read and write at once and joins
//! tokio's reactor (epoll) only when one of them would block.
//!
//! A short client's whole exchange often never waits on its own socket: its request has
//! arrived by the time it is accepted, and its response fits the socket's send buffer. A
//! tokio `TcpStream` registers with epoll when it is created and unregisters when dropped,
//! two `epoll_ctl` calls per connection that such an exchange never needed. HAProxy and nginx
//! skip them the same way, by trying the I/O first.

use std::future::poll_fn;
use std::io::{self, IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use socket2::SockRef;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::close::Socket;

/// A TCP client socket, registered with the reactor on its first would-block.
#[derive(Debug)]
pub struct EagerTcp {
    /// The registration, once an operation had to wait. Declared before `sock` so it drops
    /// first: the descriptor leaves epoll before it is closed.
    reg: Option<AsyncFd<RawFd>>,
    /// The socket (non-blocking).
    sock: TcpStream,
}

/// Which readiness an operation waits for.
#[derive(Debug, Clone, Copy)]
enum Direction {
    Read,
    Write,
}

// === impl EagerTcp ===

impl EagerTcp {
    /// Wraps an accepted socket, which must be non-blocking.
    pub fn new(sock: TcpStream) -> EagerTcp {
        EagerTcp { reg: None, sock }
    }

    /// Reads into `buf` without taking the bytes from the socket, waiting until some came
    /// (Ok(0) at EOF).
    pub async fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let buf = as_uninit(buf);
        poll_fn(|cx| self.poll_io(cx, Direction::Read, |s| SockRef::from(s).peek(buf), never)).await
    }

    /// Runs `op` on the socket now; if it would block, registers and waits until it does not.
    /// `drained` says from a result that the socket has nothing more for now (a read that did
    /// not fill its buffer), which spares the would-block call that would otherwise find out.
    fn poll_io<R>(
        &mut self,
        cx: &mut Context<'_>,
        dir: Direction,
        mut op: impl FnMut(&TcpStream) -> io::Result<R>,
        drained: impl Fn(&R) -> bool,
    ) -> Poll<io::Result<R>> {
        if self.reg.is_none() {
            match op(&self.sock) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.register()?,
                done => return Poll::Ready(done),
            }
        }
        let (Some(fd), sock) = (&self.reg, &self.sock) else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        loop {
            let mut guard = match dir {
                Direction::Read => ready!(fd.poll_read_ready(cx))?,
                Direction::Write => ready!(fd.poll_write_ready(cx))?,
            };
            match guard.try_io(|_| op(sock)) {
                Ok(Ok(r)) if drained(&r) => {
                    guard.clear_ready();
                    return Poll::Ready(Ok(r));
                }
                Ok(done) => return Poll::Ready(done),
                // The readiness was cleared: the next turn waits for the reactor.
                Err(_would_block) => continue,
            }
        }
    }

    /// Joins the reactor (inside a runtime); on failure the socket stays as it was.
    fn register(&mut self) -> io::Result<()> {
        // SAFETY: the descriptor belongs to `self.sock`, which outlives the registration:
        // `reg` is dropped (or replaced) before `sock` in every case (field order).
        let fd = unsafe { AsyncFd::register(self.sock.as_raw_fd()) }?;
        self.reg = Some(fd);
        Ok(())
    }
}

impl AsFd for EagerTcp {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl Socket for EagerTcp {
    const IS_TCP: bool = true;

    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut probe = [MaybeUninit::<u8>::uninit(); 1];
        self.poll_io(
            cx,
            Direction::Read,
            |s| SockRef::from(s).peek(&mut probe),
            never,
        )
        .map_ok(drop)
    }

    fn read_now(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Straight to the socket: WouldBlock when nothing is there, registered or not.
        (&self.sock).read(buf)
    }
}

impl AsyncRead for EagerTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // SAFETY: recv only writes into the slice and never de-initializes it.
        let unfilled = unsafe { buf.unfilled_mut() };
        let want = unfilled.len();
        // A short read emptied the socket (edge-triggered readiness, as tokio's TcpStream).
        let n = ready!(self.get_mut().poll_io(
            cx,
            Direction::Read,
            |s| SockRef::from(s).recv(unfilled),
            |n| *n > 0 && *n < want,
        ))?;
        // SAFETY: recv initialized the first n bytes.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for EagerTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_io(cx, Direction::Write, |mut s| s.write(buf), never)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_io(cx, Direction::Write, |mut s| s.write_vectored(bufs), never)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.sock.shutdown(Shutdown::Write))
    }
}

/// For `poll_io`: a result that says nothing about what is left.
fn never<R>(_: &R) -> bool {
    false
}

/// `buf` as the uninitialized memory socket2 reads into.
fn as_uninit(buf: &mut [u8]) -> &mut [MaybeUninit<u8>] {
    // SAFETY: initialized bytes are valid MaybeUninit bytes, and socket2 only writes
    // initialized bytes into the slice.
    unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) }
}
