//! What the kernel says of the process and of the host's TCP, read from /proc at scrape time.
//!
//! The process figures are the standard `process_*` ones every Prometheus client exports, so
//! stock dashboards and alerts work on waitless unchanged. The host's TIME_WAIT counters
//! (TcpExt in /proc/net/netstat, `tw` in /proc/net/sockstat) show what waitless's own ledger
//! cannot: TIME_WAIT the kernel cut short (recycled, killed, overflowed) and sockets
//! reset on close. "Host" is waitless's network namespace (a container's own).

use std::fs;

/// The TcpExt counters read from /proc/net/netstat, as the kernel names them.
pub const TCPEXT_COUNTERS: [&str; 6] = [
    "TW",
    "TWRecycled",
    "TWKilled",
    "TCPTimeWaitOverflow",
    "TCPAbortOnLinger",
    "TCPAbortOnClose",
];

/// One reading; a figure /proc did not give (another OS, a hardened /proc) is left out.
#[derive(Debug, Clone, Default)]
pub struct System {
    /// The process's own figures.
    pub process: Option<Process>,
    /// `(TcpExt name, value)` for each of `TCPEXT_COUNTERS` the kernel has.
    pub tcpext: Vec<(&'static str, u64)>,
    /// TCP sockets in TIME_WAIT on the host now (sockstat's `tw`).
    pub time_wait: Option<u64>,
}

/// The process's figures, in base units.
#[derive(Debug, Clone, Copy, Default)]
pub struct Process {
    /// Resident memory, bytes.
    pub rss_bytes: u64,
    /// User and system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: f64,
    /// Open file descriptors (sockets included).
    pub open_fds: Option<u64>,
    /// RLIMIT_NOFILE's soft limit: what `open_fds` may reach before accept fails.
    pub max_fds: Option<u64>,
}

/// Reads it all; blocking (it reads files), so call it off the runtime threads.
pub fn read() -> System {
    System {
        process: process(),
        tcpext: fs::read_to_string("/proc/net/netstat")
            .map(|t| tcpext(&t))
            .unwrap_or_default(),
        time_wait: fs::read_to_string("/proc/net/sockstat")
            .ok()
            .and_then(|t| sockstat_tw(&t)),
    }
}

fn process() -> Option<Process> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    let boot = fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| btime(&t))?;
    // SAFETY: sysconf only reads a constant of the system.
    let (tick, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let (tick, page) = (u64::try_from(tick).ok()?, u64::try_from(page).ok()?);
    let s = self_stat(&stat)?;
    Some(Process {
        rss_bytes: s.rss_pages.saturating_mul(page),
        cpu_seconds: (s.utime + s.stime) as f64 / tick.max(1) as f64,
        start_time_seconds: boot as f64 + s.start_ticks as f64 / tick.max(1) as f64,
        open_fds: fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64),
        max_fds: max_fds(),
    })
}

/// The fields of /proc/self/stat used, in clock ticks and pages.
#[derive(Debug, PartialEq)]
struct SelfStat {
    utime: u64,
    stime: u64,
    start_ticks: u64,
    rss_pages: u64,
}

/// Parses /proc/self/stat. The command name (field 2) may hold spaces and parentheses, so
/// fields are counted from after its last ')': field 3 (state) is the first there.
fn self_stat(text: &str) -> Option<SelfStat> {
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n.checked_sub(3)?)?.parse::<u64>().ok();
    Some(SelfStat {
        utime: field(14)?,
        stime: field(15)?,
        start_ticks: field(22)?,
        rss_pages: field(24)?,
    })
}

/// Boot time (seconds since the epoch) from /proc/stat's `btime` line.
fn btime(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn max_fds() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given, which lives for the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (rc == 0 && lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}

/// The `TCPEXT_COUNTERS` of /proc/net/netstat, whose `TcpExt:` lines come in pairs: names,
/// then values in the same order.
fn tcpext(text: &str) -> Vec<(&'static str, u64)> {
    let mut rows = text.lines().filter_map(|l| l.strip_prefix("TcpExt:"));
    let (Some(names), Some(values)) = (rows.next(), rows.next()) else {
        return Vec::new();
    };
    let have: Vec<(&str, u64)> = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter_map(|(n, v)| Some((n, v.parse().ok()?)))
        .collect();
    TCPEXT_COUNTERS
        .iter()
        .filter_map(|want| {
            have.iter()
                .find(|(n, _)| n == want)
                .map(|(_, v)| (*want, *v))
        })
        .collect()
}

/// `tw` of the `TCP:` line of /proc/net/sockstat (`TCP: inuse 5 orphan 0 tw 2 alloc 7 ...`).
fn sockstat_tw(text: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "tw" {
            return words.next()?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_stat_counts_fields_after_a_command_name_with_spaces_and_parens() {
        let text = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 300 0 0 0 \
                    17 5 0 0 20 0 3 0 123456 98765432 2048 18446744073709551615 rest";
        assert_eq!(
            self_stat(text),
            Some(SelfStat {
                utime: 17,
                stime: 5,
                start_ticks: 123456,
                rss_pages: 2048,
            })
        );
    }

    #[test]
    fn tcpext_takes_the_named_counters_from_the_pair_of_lines() {
        let text = "TcpExt: SyncookiesSent TW TWRecycled TWKilled TCPAbortOnClose\n\
                    TcpExt: 0 12 3 0 7\n\
                    IpExt: InNoRoutes TW\n\
                    IpExt: 1 99\n";
        assert_eq!(
            tcpext(text),
            vec![
                ("TW", 12),
                ("TWRecycled", 3),
                ("TWKilled", 0),
                ("TCPAbortOnClose", 7)
            ]
        );
    }

    #[test]
    fn sockstat_gives_the_time_wait_count() {
        let text = "sockets: used 200\nTCP: inuse 5 orphan 0 tw 21 alloc 7 mem 1\nUDP: inuse 1\n";
        assert_eq!(sockstat_tw(text), Some(21));
    }

    #[test]
    fn this_process_reads_on_linux() {
        let p = read().process.unwrap();
        assert!(p.rss_bytes > 0 && p.start_time_seconds > 1.0e9);
        assert!(p.open_fds.unwrap() >= 3);
    }
}
