//! The sessions holding a server connection, and whether their clients are already leaving.
//!
//! A client that connects per query sends COM_QUIT (or just closes) and connects again at
//! once. Its new session can ask for a server connection before the old session's task has
//! run to see that COM_QUIT, and would open one more connection than the sessions that
//! really overlap. The kernel knows already: the old client's socket holds the COM_QUIT, or
//! its FIN. A session that finds no idle connection asks here, and waits for a leaving
//! session's connection rather than open another.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// COM_QUIT as a client sends it: a one-byte packet, sequence 0.
const COM_QUIT_PACKET: [u8; 5] = [1, 0, 0, 0, 1];

/// The client sockets of one server's lent sessions.
#[derive(Debug, Default)]
pub struct Lent {
    /// (token, client fd). An fd is listed only while its session holds it open: the entry
    /// is removed (under this lock) before the session ends and its client is closed.
    sessions: Mutex<Vec<(u64, RawFd)>>,
    next: AtomicU64,
}

/// A session's place in `Lent`, removed when dropped.
pub struct Entry<'a> {
    lent: &'a Lent,
    token: u64,
}

impl Lent {
    /// Lists a session whose client is on `fd` (which must stay open while the entry lives).
    pub fn enter(&self, fd: RawFd) -> Entry<'_> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.push((token, fd));
        }
        Entry { lent: self, token }
    }

    /// Whether more than `n` of the listed sessions' clients have quit or closed.
    pub fn leaving_more_than(&self, n: usize) -> bool {
        let Ok(sessions) = self.sessions.lock() else {
            return false;
        };
        let mut seen = 0;
        for &(_, fd) in sessions.iter() {
            if is_leaving(fd) {
                seen += 1;
                if seen > n {
                    return true;
                }
            }
        }
        false
    }
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        if let Ok(mut sessions) = self.lent.sessions.lock() {
            sessions.retain(|&(token, _)| token != self.token);
        }
    }
}

/// The client on `fd` closed its side, or its next command is COM_QUIT. Over TLS the
/// COM_QUIT is encrypted and never matches: only the FIN is seen.
fn is_leaving(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd; `fd` is open while its entry is listed (see `Lent`).
    if unsafe { libc::poll(&mut p, 1, 0) } <= 0 {
        return false;
    }
    if p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
        return true;
    }
    let mut head = [0u8; COM_QUIT_PACKET.len()];
    // SAFETY: `head` is writable for its length; MSG_PEEK leaves the bytes for the session.
    let n = unsafe {
        libc::recv(
            fd,
            head.as_mut_ptr().cast(),
            head.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == head.len() as isize && head == COM_QUIT_PACKET
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_client_that_quit_or_closed_is_leaving_and_one_mid_session_is_not() {
        let lent = Lent::default();
        let (mut quitter, quit_side) = UnixStream::pair().unwrap();
        let (closer, close_side) = UnixStream::pair().unwrap();
        let (mut worker, work_side) = UnixStream::pair().unwrap();
        let _q = lent.enter(quit_side.as_raw_fd());
        let _c = lent.enter(close_side.as_raw_fd());
        let w = lent.enter(work_side.as_raw_fd());
        assert!(!lent.leaving_more_than(0));
        quitter.write_all(&COM_QUIT_PACKET).unwrap();
        drop(closer);
        // COM_QUERY "select 1": not leaving.
        worker.write_all(b"\x09\0\0\0\x03select 1").unwrap();
        assert!(lent.leaving_more_than(1));
        assert!(!lent.leaving_more_than(2));
        drop(w);
        worker.shutdown(std::net::Shutdown::Both).unwrap();
        assert!(
            !lent.leaving_more_than(2),
            "a removed entry is not looked at"
        );
    }
}
