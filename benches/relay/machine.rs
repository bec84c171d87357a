//! The machine and the programs on it, for the report's header. Shared by the relay and
//! mysql benches (the mysql one includes this file by path), so it uses no other module.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

/// The machine and the conditions of the run.
#[derive(Debug, Serialize)]
pub struct Machine {
    /// Cores this process may use.
    pub nproc: usize,
    /// The CPU's model name.
    pub cpu: String,
    /// The kernel release.
    pub kernel: String,
    /// /proc/loadavg before the first run and after the last.
    pub loadavg_start: String,
    pub loadavg_end: String,
    /// The size of the host's TIME_WAIT table.
    pub tcp_max_tw_buckets: u64,
}

/// The machine as the run starts.
pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    Machine {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu,
        kernel,
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
        tcp_max_tw_buckets: tw_cap(),
    }
}

/// /proc/loadavg's three averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The first line a program prints about its version (nginx and HAProxy print to stderr).
pub fn version(bin: &Path, flag: &str) -> String {
    Command::new(bin)
        .arg(flag)
        .output()
        .ok()
        .and_then(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stderr),
                String::from_utf8_lossy(&o.stdout)
            );
            let line = text.lines().next()?.to_string();
            line.split(['/', ' '])
                .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "?".into())
}

/// The first of `candidates` that exists.
pub fn find(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

/// The size of the host's TIME_WAIT table (`net.ipv4.tcp_max_tw_buckets`).
pub fn tw_cap() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_max_tw_buckets")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u64::MAX)
}
