//! Binary upgrade without loss (`waitless upgrade`, POST /upgrade, SIGUSR2): the running
//! process starts the new binary with its own arguments and hands it every listening socket
//! by inheritance. They are the same sockets (one file description, one accept queue, shared
//! by both processes for a moment), so a connection queued while the processes change is
//! accepted by one or the other, never reset: two processes merely sharing SO_REUSEPORT lose
//! the queue of the socket that closes.
//!
//! The new process loads its config, takes the sockets its listeners ask for, starts
//! accepting and writes `ready` on a pipe; only then does the old one stop accepting and drain
//! as on SIGTERM. A new process that fails (a bad config) writes why on the pipe and exits;
//! one that says nothing within `READY_TIMEOUT` is killed. Either way the old one keeps
//! serving and reports the failure.
//!
//! Between the two, in the environment (as LISTEN_PID does, `WAITLESS_UPGRADE_FROM` keeps the
//! variables from anyone but the child they were meant for):
//! - `WAITLESS_UPGRADE_FDS`: one `fd=key` line per inherited descriptor; the key is the
//!   listener's address as configured (`127.0.0.1:80`, `unix:/run/w.sock`, `systemd:web`;
//!   port 0 ones add `#name`) or `admin@` and the admin address, so a changed config finds
//!   the sockets of the listeners it kept. A TCP listener has one line per worker socket.
//! - `WAITLESS_UPGRADE_READY`: the pipe's write end.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The inherited descriptors and their keys.
const FDS_VAR: &str = "WAITLESS_UPGRADE_FDS";
/// The write end of the readiness pipe.
const READY_VAR: &str = "WAITLESS_UPGRADE_READY";
/// The pid of the process that started this one for an upgrade.
const FROM_VAR: &str = "WAITLESS_UPGRADE_FROM";
/// What the new process writes once it accepts.
const READY: &[u8] = b"ready\n";
/// How long the new process may take to load its config and accept. Past it, it is killed
/// and the old process carries on: the upgrade is refused, never half done.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The binary to start for an upgrade, found at start, before anything replaced it.
static EXE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
/// What the old process handed this one, taken once from the environment.
static FROM_OLD: OnceLock<FromOld> = OnceLock::new();
/// Set once a new process took over: the listening sockets (and their unix socket files)
/// are its now, so nothing here may remove a socket file.
static HANDED_OVER: AtomicBool = AtomicBool::new(false);

/// What this process got from the one it replaces; empty when it was not started so.
#[derive(Debug, Default)]
struct FromOld {
    /// Listening sockets by key, each claimed once by the listener of that key.
    sockets: Mutex<HashMap<String, Vec<OwnedFd>>>,
    /// The readiness pipe, until `ready` or `fail` writes on it.
    ready: Mutex<Option<std::fs::File>>,
    /// Whether this process was started by an upgrade.
    upgraded: bool,
}

/// Reads what an upgrade passed, and notes the binary to start for the next one. Call it
/// first thing in `main`, before files are opened (the inherited descriptors are taken and
/// marked close-on-exec here).
///
/// The binary: argv[0] when it names a path (made absolute against the start directory), as
/// it is written, so that a symlink switched to a new version (`/usr/bin/waitless` →
/// `/opt/waitless-1.3/waitless`) starts the new one; else (found on PATH) the target of
/// /proc/self/exe read now, the installed path. Read at upgrade time instead, /proc/self/exe
/// would name the replaced, deleted file (`… (deleted)`).
pub fn init() {
    EXE.get_or_init(|| {
        let found = match std::env::args_os().next() {
            Some(argv0) if argv0.as_encoded_bytes().contains(&b'/') => std::path::absolute(argv0),
            _ => std::env::current_exe(),
        };
        found.map_err(|e| format!("cannot tell which binary this is: {e}"))
    });
    from_old();
}

/// Takes the inherited sockets of `key`, if the old process handed any: once, so a listener
/// removed by a later reload and configured again binds anew.
pub fn take(key: &str) -> Option<Vec<OwnedFd>> {
    from_old()
        .sockets
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(key)
}

/// Whether the old process handed a socket of `key` (not yet taken).
pub fn has(key: &str) -> bool {
    from_old()
        .sockets
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains_key(key)
}

/// Closes the inherited sockets no listener of the new config took: their listeners were
/// removed, and a queue nobody accepts on would hold its clients until they time out.
pub fn close_unclaimed() {
    let mut sockets = from_old().sockets.lock().unwrap_or_else(|p| p.into_inner());
    for (key, _) in sockets.drain() {
        tracing::info!(%key, "upgrade: a socket of the old process is in no listener now: closed");
    }
}

/// Whether this process was started by an upgrade (it then tells systemd it is the main
/// process).
pub fn upgraded() -> bool {
    from_old().upgraded
}

/// Tells the old process that this one accepts: it stops accepting and drains.
pub fn ready() {
    if let Some(mut pipe) = take_pipe() {
        if let Err(e) = pipe.write_all(READY) {
            tracing::warn!(error = %e, "upgrade: cannot tell the old process we are ready");
        }
    }
}

/// Tells the old process why this one will not serve (it keeps serving and reports it).
pub fn fail(why: &str) {
    if let Some(mut pipe) = take_pipe() {
        let _ = pipe.write_all(why.trim_end().as_bytes());
    }
}

/// Whether the listening sockets were handed to a new process that took over.
pub fn handed_over() -> bool {
    HANDED_OVER.load(Ordering::Relaxed)
}

/// Starts the new binary with this process's arguments, hands it `sockets` (key and a
/// descriptor of each), and waits for it to accept. Its pid on success: the sockets are its
/// from then on. On failure the new process is gone (killed if it still ran) and the error
/// says why, with what it wrote. Blocks: call it off the runtime threads.
pub fn hand_over(sockets: Vec<(String, OwnedFd)>) -> Result<u32, String> {
    let exe = match EXE.get() {
        Some(Ok(exe)) => exe.clone(),
        Some(Err(e)) => return Err(e.clone()),
        None => return Err("upgrade::init was not called at start".into()),
    };
    let mut listing = String::new();
    let mut keep: Vec<RawFd> = Vec::with_capacity(sockets.len() + 1);
    for (key, fd) in &sockets {
        if key.contains('\n') {
            return Err(format!(
                "listener address {key:?} cannot be named to a new process"
            ));
        }
        listing.push_str(&format!("{}={key}\n", fd.as_raw_fd()));
        keep.push(fd.as_raw_fd());
    }
    let (read, write) = pipe().map_err(|e| format!("cannot make the readiness pipe: {e}"))?;
    keep.push(write.as_raw_fd());
    let mut cmd = Command::new(&exe);
    cmd.args(std::env::args_os().skip(1))
        .env(FDS_VAR, listing)
        .env(READY_VAR, write.as_raw_fd().to_string())
        .env(FROM_VAR, std::process::id().to_string())
        // systemd's sockets are handed over as `systemd:NAME` keys, not as LISTEN_FDS.
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .stdin(Stdio::null());
    // SAFETY: between fork and exec, only fcntl (async-signal-safe) on descriptors this
    // process owns, read from a vector allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &keep {
                // Our descriptors are close-on-exec; the child's copies must survive exec.
                if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    // The child has its copies: ours of the write end must go, or EOF never comes.
    drop(write);
    drop(sockets);
    let pid = child.id();
    match wait_ready(read, READY_TIMEOUT) {
        Ok(()) => {
            HANDED_OVER.store(true, Ordering::Relaxed);
            Ok(pid)
        }
        Err(why) => {
            let _ = child.kill();
            let status = child
                .wait()
                .map_or_else(|e| e.to_string(), |s| s.to_string());
            Err(format!(
                "the new process ({}, pid {pid}) did not take over: {why} ({status})",
                exe.display()
            ))
        }
    }
}

/// Reads the pipe until the child says `ready`, closes it (EOF: it exited) or `within` ends.
fn wait_ready(pipe: OwnedFd, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut pipe = std::fs::File::from(pipe);
    let mut said = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("not ready within {}s", within.as_secs()));
        }
        let mut poll = libc::pollfd {
            fd: pipe.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one pollfd we own, its count given.
        let rc = unsafe { libc::poll(&mut poll, 1, ms.max(1)) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("waiting for it: {e}"));
        }
        if rc == 0 {
            continue;
        }
        let mut buf = [0u8; 4096];
        match pipe.read(&mut buf) {
            Ok(0) => {
                let text = String::from_utf8_lossy(&said);
                return Err(if text.trim().is_empty() {
                    "it exited before it was ready".into()
                } else {
                    text.trim().to_string()
                });
            }
            Ok(n) => {
                said.extend_from_slice(buf.get(..n).unwrap_or_default());
                if said.starts_with(READY) {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading its readiness: {e}")),
        }
    }
}

/// A pipe, both ends close-on-exec: (read, write).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let [read, write] = fds;
    // SAFETY: both were just opened by pipe2 and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(read), OwnedFd::from_raw_fd(write)) })
}

fn take_pipe() -> Option<std::fs::File> {
    from_old()
        .ready
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
}

/// Takes the descriptors an upgrade passed, on first use: only when WAITLESS_UPGRADE_FROM is
/// this process's parent. Each is marked close-on-exec, so the next upgrade passes only
/// what it means to.
fn from_old() -> &'static FromOld {
    FROM_OLD.get_or_init(|| {
        let from = std::env::var(FROM_VAR)
            .ok()
            .and_then(|p| p.parse::<libc::pid_t>().ok());
        // SAFETY: getppid has no preconditions.
        if from.is_none() || from != Some(unsafe { libc::getppid() }) {
            return FromOld::default();
        }
        let mut sockets: HashMap<String, Vec<OwnedFd>> = HashMap::new();
        let listing = std::env::var_os(FDS_VAR).unwrap_or_default();
        for line in listing.to_string_lossy().lines() {
            let Some((fd, key)) = line.split_once('=') else {
                continue;
            };
            let Some(fd) = claim(fd) else {
                tracing::warn!(%key, "upgrade: the old process named a descriptor that is not open");
                continue;
            };
            sockets.entry(key.to_string()).or_default().push(fd);
        }
        let ready = std::env::var(READY_VAR)
            .ok()
            .as_deref()
            .and_then(claim)
            .map(std::fs::File::from);
        FromOld {
            sockets: Mutex::new(sockets),
            ready: Mutex::new(ready),
            upgraded: true,
        }
    })
}

/// The descriptor numbered `text`, if open, now owned here and close-on-exec.
fn claim(text: &str) -> Option<OwnedFd> {
    let fd: RawFd = text.trim().parse().ok().filter(|fd| *fd > 2)?;
    // SAFETY: fcntl on a descriptor number; it fails if the descriptor is not open.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return None;
    }
    // SAFETY: the old process passed this open descriptor to this one, and nothing else
    // here owns it (it is claimed once, when the environment is first read).
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}
