//! Memory: each proxy's RSS before and with idle keep-alive client connections open.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use crate::load::open_idle;
use crate::measure::Bench;
use crate::process::child_exited;
use crate::targets::{start_proxy, Target};

/// A proxy's memory with idle client connections open.
#[derive(Debug, Serialize)]
pub struct Rss {
    /// The target's label.
    pub target: String,
    /// Idle keep-alive connections open (each carried one request first).
    pub idle_conns: usize,
    /// Connections that could not be opened or did not get a 200.
    pub failed_conns: usize,
    /// VmRSS of all the proxy's processes, started and settled, before any client.
    pub rss_before_kb: u64,
    /// The same with the idle connections open.
    pub rss_with_idle_kb: u64,
    /// (RSS with idle connections − before) / connections.
    pub bytes_per_idle_conn: f64,
}

// === impl Bench ===

impl Bench {
    /// Holds `IDLE_CONNS` idle keep-alive connections open to a fresh `target` and reads its
    /// memory before and with them.
    pub fn measure_rss(&mut self, target: Target) {
        eprint!("  {:<28} {:<10} ... ", target.label(), "idle RSS");
        let _ = io::stderr().flush();
        match self.try_measure_rss(target) {
            Ok(r) => {
                eprintln!("{:.0} bytes per idle connection", r.bytes_per_idle_conn);
                self.rss.push(r);
            }
            Err(e) => {
                eprintln!("failed");
                self.notes
                    .push(format!("{} (idle RSS) failed: {e}", target.label()));
            }
        }
    }

    fn try_measure_rss(&mut self, target: Target) -> Result<Rss, String> {
        let backend = self.backend.next_addr()?;
        let port = self.ports.take()?;
        let proxy =
            start_proxy(target, &self.tools, port, backend)?.ok_or("no proxy to measure")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        std::thread::sleep(Duration::from_millis(300));
        let before = proxy.rss_kb();
        let (conns, failed) = self.rt.block_on(open_idle(addr, self.tools.idle_conns));
        // Let the proxy settle (hyper, nginx and HAProxy free per-request state lazily).
        std::thread::sleep(Duration::from_secs(1));
        let with = proxy.rss_kb();
        if let Some(w) = child_exited(&proxy) {
            return Err(format!("{} died holding idle connections: {w}", proxy.name));
        }
        let n = conns.len();
        // RST from the client side: 10,000 closes leave no TIME_WAIT anywhere.
        self.rt.block_on(async move {
            for c in conns {
                let _ = socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO));
                drop(c);
            }
        });
        drop(proxy);
        Ok(Rss {
            target: target.label(),
            idle_conns: n,
            failed_conns: failed,
            rss_before_kb: before,
            rss_with_idle_kb: with,
            bytes_per_idle_conn: (with.saturating_sub(before) * 1024) as f64 / n.max(1) as f64,
        })
    }
}

/// Raises the open-file limit as far as allowed: 10,000 idle connections need as many fds
/// here and in the proxy (which inherits the limit).
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let want = libc::rlimit {
            rlim_cur: 65_536,
            rlim_max: lim.rlim_max.max(65_536),
        };
        // Raising the hard limit needs privilege; fall back to the soft limit up to the hard one.
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}
