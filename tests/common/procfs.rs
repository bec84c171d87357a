//! A process's figures from /proc. Shared by the tests and the benches (which include this
//! file by path).

/// A memory figure of /proc/PID/status ("VmRSS", "VmHWM", ...), in KiB; None when the
/// process is gone or has no such line.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}
