//! CPU time of a process and its threads over a run, to the nanosecond.
//!
//! utime + stime in /proc/PID/stat count in clock ticks (10 ms here): over a run of a thousand
//! sessions at 30 µs each that is 3 ticks, too coarse to judge a 30 µs target. The scheduler's
//! own runtime per thread (/proc/PID/task/TID/schedstat, first field, ns) is exact, but a
//! thread that exits takes its time with it; when one did during the run, the figure falls
//! back to utime + stime, which keeps the time of exited threads.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::process::{ticks_to_us, Proc};

/// The CPU a process group had used when a run started.
pub struct Mark {
    /// Runtime per thread (tid), in ns.
    threads: BTreeMap<u32, u64>,
    /// utime + stime of the whole group, in ticks.
    ticks: u64,
}

/// CPU used over a run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Used {
    pub us: f64,
    /// "schedstat" (exact), or "ticks" when a thread exited during the run.
    pub source: &'static str,
    /// utime + stime over the run, to 10 ms: a cross-check of `us`.
    pub ticks_us: f64,
}

// === impl Mark ===

impl Mark {
    pub fn of(p: &Proc) -> Mark {
        Mark {
            threads: threads(p),
            ticks: p.cpu_ticks(),
        }
    }

    /// The CPU `p` used since the mark.
    pub fn used(&self, p: &Proc) -> Used {
        let now = threads(p);
        let ticks_us = ticks_to_us(p.cpu_ticks().saturating_sub(self.ticks));
        if !now.is_empty() && self.threads.keys().all(|t| now.contains_key(t)) {
            // A thread born during the run used all of its runtime in it.
            let ns: u64 = now
                .iter()
                .map(|(t, ns)| ns.saturating_sub(self.threads.get(t).copied().unwrap_or(0)))
                .sum();
            return Used {
                us: ns as f64 / 1000.0,
                source: "schedstat",
                ticks_us,
            };
        }
        Used {
            us: ticks_us,
            source: "ticks",
            ticks_us,
        }
    }
}

/// Every thread of every process in `p`'s group, with its runtime so far in ns.
fn threads(p: &Proc) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    for pid in p.pids() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let ns = std::fs::read_to_string(t.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
            if let Some(ns) = ns {
                out.insert(tid, ns);
            }
        }
    }
    out
}
