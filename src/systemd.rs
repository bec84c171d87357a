//! Running under systemd: readiness notifications (`Type=notify`) and socket activation
//! (listening sockets passed by a `.socket` unit, taken by name: `listen = "systemd:web"`).
//!
//! Both are the protocol of sd_notify(3) and sd_listen_fds(3), a datagram and a few
//! environment variables, written out here rather than pulled in as a crate: ten lines each,
//! and nothing to keep up to date.

use std::collections::HashMap;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::sync::OnceLock;

/// The first descriptor systemd passes (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;

/// The sockets systemd passed, by name, taken once from the environment.
static PASSED: OnceLock<HashMap<String, OwnedFd>> = OnceLock::new();

/// Tells systemd that start-up is complete: every listener is bound and accepting.
pub fn ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={status}"));
}

/// As `ready`, from a process an upgrade started: systemd is told it is the main process
/// now (MAINPID, taken from a process other than the main one with `NotifyAccess=all`), so
/// that the old one's exit does not end the service.
pub fn ready_as_main(status: &str) {
    notify(&format!(
        "MAINPID={}\nREADY=1\nSTATUS={status}",
        std::process::id()
    ));
}

/// Tells systemd a reload starts; `ready` says it ended (taken or refused).
pub fn reloading() {
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
}

/// Tells systemd that waitless is draining and will exit.
pub fn stopping() {
    notify("STOPPING=1\nSTATUS=draining");
}

/// Sends `state` to $NOTIFY_SOCKET, if set. Failures are logged, never fatal: a proxy that
/// serves but cannot tell systemd is better than one that stops.
fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> io::Result<usize> {
        let bytes = path.as_encoded_bytes();
        // "@name" is an abstract socket, whose name starts with a NUL byte.
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => UnixAddr::from_abstract_name(name)?,
            None => UnixAddr::from_pathname(&path)?,
        };
        UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, socket = ?path, "cannot notify systemd");
    }
}

/// CLOCK_MONOTONIC in microseconds, as systemd compares RELOADING=1 with its own clock.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// Whether systemd passed a socket named `name`, or the process this one replaces handed
/// over the one systemd passed it (`upgrade`).
pub fn has(name: &str) -> bool {
    passed().contains_key(name) || crate::upgrade::has(&format!("systemd:{name}"))
}

/// A second descriptor of the socket named `name`: the original stays here, so that a
/// listener removed by one reload and configured again by a later one finds it again.
pub fn socket(name: &str) -> io::Result<OwnedFd> {
    match passed().get(name) {
        Some(fd) => fd.try_clone(),
        None => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("systemd passed no socket named `{name}`"),
        )),
    }
}

/// The names systemd passed, for messages.
pub fn names() -> Vec<String> {
    let mut names: Vec<String> = passed().keys().cloned().collect();
    names.sort();
    names
}

/// Takes the passed sockets on first use: LISTEN_PID must be this process (the variables
/// were not meant for a parent), LISTEN_FDS counts them from fd 3, LISTEN_FDNAMES names
/// them (`FileDescriptorName=`; systemd's default name is "unknown"). The descriptors are
/// marked close-on-exec, so that nothing waitless starts inherits a listening socket.
fn passed() -> &'static HashMap<String, OwnedFd> {
    PASSED.get_or_init(|| {
        let mut out = HashMap::new();
        let ours = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            == Some(std::process::id());
        if !ours {
            return out;
        }
        let count = std::env::var("LISTEN_FDS")
            .ok()
            .and_then(|n| n.parse::<RawFd>().ok())
            .unwrap_or(0);
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        let mut names = names.split(':');
        for fd in LISTEN_FDS_START..LISTEN_FDS_START.saturating_add(count.max(0)) {
            let name = names.next().unwrap_or("unknown").to_string();
            // SAFETY: fcntl on a descriptor number; F_GETFD fails if it is not open.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
                tracing::warn!(fd, %name, "systemd said it passed this descriptor; it is not open");
                continue;
            }
            // SAFETY: systemd handed this open descriptor to this process (LISTEN_PID) and
            // nothing else in it owns it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            if out.insert(name.clone(), owned).is_some() {
                tracing::warn!(%name, "systemd passed two sockets of one name; the last is used");
            }
        }
        out
    })
}
