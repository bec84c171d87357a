//! The census and TIME_WAIT accounting: the kernel's socket counts after each run, ports no
//! socket of any state uses, the host's TIME_WAIT table and its overflow.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use waitless::close::census::{count_many, Scope, StateCounts};

use crate::machine::tw_cap;
use crate::measure::Run;
use crate::targets::Clients;

/// Ports for backends and proxies come from here up: below the ephemeral range
/// (32768-60999 by default), so no client socket ever has one as its local port.
const PORT_BASE: u16 = 20_000;
const PORT_END: u16 = 32_000;
/// Short-connection requests per second assumed before any short run was measured, to judge
/// whether the TIME_WAIT table has room for the next run (afterwards: the fastest seen).
const FIRST_SHORT_RATE: f64 = 20_000.0;

/// Hands out fresh ports for proxies.
pub struct Ports {
    next: u16,
}

// === impl Ports ===

impl Ports {
    pub fn new() -> Ports {
        let spread = (std::process::id() % 4000) as u16;
        Ports {
            next: PORT_BASE + spread * 2,
        }
    }

    /// A port nothing is bound to and no socket of any state uses, on either side.
    pub fn take(&mut self) -> Result<u16, String> {
        for _ in 0..(PORT_END - PORT_BASE) {
            let p = self.next;
            self.next = if p + 1 >= PORT_END { PORT_BASE } else { p + 1 };
            if std::net::TcpListener::bind(("127.0.0.1", p)).is_err() {
                continue;
            }
            let remote = SocketAddr::from(([127, 0, 0, 1], p));
            let clean = count_many(&[Scope::LocalPort(p), Scope::Remote(remote)])
                .map(|c| c.iter().all(|s| s.total() == 0))
                .unwrap_or(false);
            if clean {
                return Ok(p);
            }
        }
        Err("no free port left in 20000-32000".into())
    }
}

/// Counts by scope, in order.
pub fn census(scopes: &[Scope]) -> Result<Vec<StateCounts>, String> {
    count_many(scopes).map_err(|e| format!("census: {e}"))
}

/// Waits (at most 65 s: TIME_WAIT lasts 60 s) until the TIME_WAIT table has room for a
/// short run's sockets, so that none of them is lost to `tcp_max_tw_buckets`; a run
/// that overflows anyway says so in its `tw_overflow`.
pub fn wait_tw_headroom(runs: &[Run], secs: u64) {
    let cap = tw_cap();
    let rate = runs
        .iter()
        .filter(|r| r.clients == Clients::Short.label())
        .map(|r| r.req_per_s)
        .fold(FIRST_SHORT_RATE, f64::max);
    let need = ((rate * 1.25 * secs as f64) as u64).min(cap);
    let enough = |tw: u64| tw + need <= cap || tw <= cap / 50;
    let start = Instant::now();
    let mut told = false;
    while let Some(tw) = host_time_wait() {
        if enough(tw) || start.elapsed() > Duration::from_secs(65) {
            break;
        }
        if !told {
            eprintln!(
                "  (waiting for {tw} TIME_WAIT sockets to expire: tcp_max_tw_buckets = {cap})"
            );
            told = true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// TIME_WAIT sockets on the host (/proc/net/sockstat; IPv4 and IPv6 share the table).
pub fn host_time_wait() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "tw")?;
    words.get(at + 1)?.parse().ok()
}

/// The kernel's count of TIME_WAIT sockets not created because the table was full
/// (TcpExt TCPTimeWaitOverflow in /proc/net/netstat).
pub fn tw_overflow_count() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/net/netstat") else {
        return 0;
    };
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        if let [names, values] = pair {
            if !names.starts_with("TcpExt:") {
                continue;
            }
            let at = names
                .split_whitespace()
                .position(|n| n == "TCPTimeWaitOverflow");
            if let Some(v) = at.and_then(|i| values.split_whitespace().nth(i)) {
                return v.parse().unwrap_or(0);
            }
        }
    }
    0
}
