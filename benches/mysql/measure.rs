//! One round: each PHP measurement through every target in turn, then mariadb-slap through
//! each. For each run, what it cost the proxy and the server, and how many connections the
//! server saw opened.

use std::io::{self, Write};

use serde::Serialize;

use crate::clients::{self, Outcome, Part, PHP_PARTS};
use crate::cpu::Mark;
use crate::machine::loadavg;
use crate::process::child_exited;
use crate::server::MariaDb;
use crate::targets::{Running, Target, Tools};

/// How much each run does.
pub struct Sizes {
    /// `SELECT 1` statements on one connection.
    pub queries: u64,
    /// Sessions of each PHP session measurement.
    pub sessions: u64,
    /// mariadb-slap's queries, each a session.
    pub slap_queries: u64,
}

/// One measurement: one target, one part, one round.
#[derive(Debug, Serialize)]
pub struct Run {
    pub target: Target,
    pub part: &'static str,
    pub round: usize,
    /// Position in the order the runs were taken.
    pub order: usize,
    /// Operations timed.
    pub count: u64,
    /// Operations in all, warm-up included (the CPU figures' divisor).
    pub total: u64,
    /// Seconds of the timed operations.
    pub secs: f64,
    /// Microseconds per timed operation.
    pub us_per_op: f64,
    /// Timed operations per second.
    pub per_s: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// The proxy's CPU per operation over the whole run (µs); None for direct.
    pub proxy_cpu_us: Option<f64>,
    /// The server's CPU per operation over the whole run (µs).
    pub server_cpu_us: f64,
    /// Where the CPU figures came from ("schedstat" exact, or "ticks").
    pub cpu_source: String,
    /// The same two figures from utime + stime (to 10 ms over the whole run), to check the
    /// ones above against.
    pub proxy_cpu_ticks_us: Option<f64>,
    pub server_cpu_ticks_us: f64,
    /// Connections the server saw opened during the run (its `Connections` counter).
    pub server_connections: u64,
    /// /proc/loadavg right after the run.
    pub loadavg: String,
}

/// The bench's state: the server, the programs, what was measured so far.
pub struct Bench {
    pub server: MariaDb,
    pub tools: Tools,
    pub sizes: Sizes,
    /// Whether to run the PHP part and the slap part.
    pub php: bool,
    pub slap: bool,
    pub runs: Vec<Run>,
    /// What was skipped or failed, printed after the table.
    pub notes: Vec<String>,
}

// === impl Bench ===

impl Bench {
    /// One round over `targets`, in that order: each PHP part through every target in turn
    /// (a fresh proxy per target, kept for the round's PHP parts), so that the runs a ratio
    /// compares are seconds apart, not a whole visit; then slap through each, on a fresh
    /// proxy again, so that its count of server connections starts from an empty pool.
    pub fn round(&mut self, targets: &[Target], round: usize) {
        if self.php {
            let mut running = Vec::new();
            for &t in targets {
                match t.start(&self.tools, self.server.port) {
                    Ok(r) => running.push((t, r)),
                    Err(e) => self
                        .notes
                        .push(format!("{} failed to start: {e}", t.label())),
                }
            }
            for part in PHP_PARTS {
                for (t, r) in &running {
                    self.measure(*t, r, part, round);
                }
            }
        }
        if self.slap {
            for &t in targets {
                match t.start(&self.tools, self.server.port) {
                    Ok(r) => self.measure(t, &r, Part::Slap, round),
                    Err(e) => self
                        .notes
                        .push(format!("{} failed to start: {e}", t.label())),
                }
            }
        }
    }

    fn measure(&mut self, target: Target, running: &Running, part: Part, round: usize) {
        eprint!("  {round} {:<18} {:<16} ... ", target.label(), part.key());
        let _ = io::stderr().flush();
        match self.try_measure(target, running, part, round) {
            Ok(run) => {
                eprintln!(
                    "{:>9.1} µs/op {:>8.0}/s, {} errors",
                    run.us_per_op, run.per_s, run.errors
                );
                self.runs.push(run);
            }
            Err(e) => {
                eprintln!("failed");
                self.notes.push(format!(
                    "{} {} round {round} failed: {e}",
                    target.label(),
                    part.key()
                ));
            }
        }
    }

    fn try_measure(
        &self,
        target: Target,
        running: &Running,
        part: Part,
        round: usize,
    ) -> Result<Run, String> {
        let warmup = |n: u64| (n / 10).clamp(10, 200);
        let connections = self.server.status("Connections")?;
        let proxy_mark = running.proc.as_ref().map(Mark::of);
        let server_mark = Mark::of(&self.server.proc);
        let outcome: Outcome = match part {
            Part::Slap => {
                let slap = self.tools.slap.as_ref().ok_or("mariadb-slap missing")?;
                clients::slap(slap, running.port, self.sizes.slap_queries)?
            }
            _ => {
                let php = self.tools.php.as_ref().ok_or("php missing")?;
                let n = match part {
                    Part::Select => self.sizes.queries,
                    _ => self.sizes.sessions,
                };
                clients::php(php, part, running.port, n, warmup(n))?
            }
        };
        let server_used = server_mark.used(&self.server.proc);
        let proxy_used = running
            .proc
            .as_ref()
            .zip(proxy_mark)
            .map(|(p, m)| m.used(p));
        // The read of the counter is a connection too, counted before it reads.
        let connections = self
            .server
            .status("Connections")?
            .saturating_sub(connections + 1);
        if let Some(p) = &running.proc {
            if let Some(w) = child_exited(p) {
                return Err(format!("{} died during the run: {w}", p.name));
            }
        }
        let total = outcome.total.max(1) as f64;
        let sources: Vec<&str> = [Some(server_used), proxy_used]
            .iter()
            .flatten()
            .map(|u| u.source)
            .collect();
        Ok(Run {
            target,
            part: part.key(),
            round,
            order: self.runs.len() + 1,
            count: outcome.count,
            total: outcome.total,
            secs: outcome.secs,
            us_per_op: outcome.secs * 1e6 / outcome.count.max(1) as f64,
            per_s: outcome.count as f64 / outcome.secs.max(1e-9),
            errors: outcome.errors,
            first_error: outcome.first_error,
            proxy_cpu_us: proxy_used.map(|u| u.us / total),
            server_cpu_us: server_used.us / total,
            cpu_source: if sources.iter().all(|s| *s == "schedstat") {
                "schedstat".into()
            } else {
                "ticks".into()
            },
            proxy_cpu_ticks_us: proxy_used.map(|u| u.ticks_us / total),
            server_cpu_ticks_us: server_used.ticks_us / total,
            server_connections: connections,
            loadavg: loadavg(),
        })
    }
}
