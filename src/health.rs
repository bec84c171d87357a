//! Server health: passive (connect failures and timeouts seen by real traffic) and active
//! (optional periodic checks). A server that fails `fail_threshold` times in a row is marked
//! down and skipped for `fail_backoff`; then one request may try it again, and a success
//! marks it up.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

use crate::close::{CloseCtl, Ending, SideLedger, Socket, Tracked};
use crate::config::{self, Address, CheckKind, HealthCheck};
use crate::connector::Opening;
use crate::tls::TlsStats;

/// One server's health, lock-free: read on every request.
#[derive(Debug, Default)]
pub struct Health {
    /// Failures in a row.
    failures: AtomicU32,
    /// Milliseconds since `epoch()` until which the server is down; 0 = up.
    down_until_ms: AtomicU64,
}

// === impl Health ===

impl Health {
    /// False while the server is marked down and its back-off has not run out.
    pub fn is_up(&self) -> bool {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        until == 0 || now_ms() >= until
    }

    /// "up" or "down", for /stats.
    pub fn state(&self) -> &'static str {
        if self.is_up() {
            "up"
        } else {
            "down"
        }
    }

    /// Counts a failed connect or a timeout; returns true when this one marked it down.
    pub fn failed(&self, cfg: &config::Upstream) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= cfg.fail_threshold {
            let was_up = self.is_up();
            let until = now_ms() + cfg.fail_backoff.as_millis() as u64;
            self.down_until_ms.store(until.max(1), Ordering::Relaxed);
            return was_up;
        }
        false
    }

    /// Counts a success: the server is up.
    pub fn succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.down_until_ms.load(Ordering::Relaxed) != 0 {
            self.down_until_ms.store(0, Ordering::Relaxed);
        }
    }
}

/// Runs one active check of `addr`, a server of the upstream `up` (found by `host` when it
/// follows DNS), within its
/// `connect_timeout`; over TLS when the upstream has `tls`, verified as its connections are
/// (a handshake counted in `tls`), so that a TLS server is checked as it is used. The probe
/// connection is closed as the close policy decides for a check (with RST, so checking a
/// server every few seconds leaves no TIME_WAIT on either side) and recorded in the
/// server's `ledger`.
pub async fn check(
    addr: &Address,
    host: Option<&str>,
    hc: &HealthCheck,
    up: &config::Upstream,
    ledger: &Arc<SideLedger>,
    tls: &TlsStats,
) -> io::Result<()> {
    let deadline = std::time::Instant::now() + up.connect_timeout;
    let run = async {
        match addr {
            Address::Tcp(sa) => {
                let label = sa.to_string();
                // The Host a virtual server answers to: the TLS name, else the DNS name.
                let named = up.tls.as_ref().and_then(|t| t.files.server_name.clone());
                let vhost = named
                    .or_else(|| host.map(|h| format!("{h}:{}", sa.port())))
                    .unwrap_or_else(|| label.clone());
                let s = TcpStream::connect(sa).await?;
                let s = Tracked::upstream(s, ledger.clone(), up.time_wait, CloseCtl::new());
                if up.tls.is_none() {
                    return probe_tracked(s, hc, &vhost).await;
                }
                let at = Opening {
                    cfg: up,
                    stats: tls,
                    addr,
                    label: &label,
                    host,
                    deadline,
                };
                probe_tracked(at.start_tls(s).await?, hc, &vhost).await
            }
            Address::Unix(path) => {
                let s = UnixStream::connect(path).await?;
                let s = Tracked::upstream(s, ledger.clone(), up.time_wait, CloseCtl::new());
                probe_tracked(s, hc, "localhost").await
            }
            // Validation keeps systemd sockets out of server lists.
            Address::Systemd(name) => Err(io::Error::other(format!(
                "systemd:{name} is a listening socket, not a server"
            ))),
        }
    };
    // A probe cut by the timeout is dropped: the close mechanism records it as an error.
    tokio::time::timeout(up.connect_timeout, run)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "health check timed out"))?
}

/// Probes over a tracked connection, then closes it as a check's.
async fn probe_tracked<S: Socket>(
    mut s: Tracked<S>,
    hc: &HealthCheck,
    host: &str,
) -> io::Result<()> {
    let result = probe(&mut s, hc, host).await;
    s.finish_upstream(Ending::Checked, Duration::ZERO).await;
    result
}

async fn probe<S>(s: &mut S, hc: &HealthCheck, host: &str) -> io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if hc.kind == CheckKind::Tcp {
        return Ok(());
    }
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: waitless-health-check\r\n\r\n",
        hc.path
    );
    s.write_all(req.as_bytes()).await?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await?;
    // "HTTP/1.1 200"
    match head.get(9) {
        Some(b'2') | Some(b'3') => Ok(()),
        _ => Err(io::Error::other(format!(
            "health check got {}",
            String::from_utf8_lossy(&head)
        ))),
    }
}

/// The label of a server for logs.
pub fn describe(addr: &Address) -> String {
    match addr {
        Address::Tcp(a) => SocketAddr::to_string(a),
        Address::Unix(p) => format!("unix:{}", p.display()),
        Address::Systemd(name) => format!("systemd:{name}"),
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    // +1 so that 0 keeps meaning "up".
    Instant::now().duration_since(epoch()).as_millis() as u64 + 1
}
