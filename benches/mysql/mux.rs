//! Issue 22's bench: many persistent clients, each running a cheap statement every 50 ms,
//! direct (a server thread per client), through HAProxy `mode tcp` (the same, one hop more)
//! and through waitless with `pooling = "transaction"` on `MUX_CONNECTIONS` server
//! connections. The offered load is fixed (clients / 50 ms), so "as fast as direct" is a
//! rate within 1% of direct's with latency to match; what the pool saves shows in the
//! server's threads and memory.
//!
//! The clients are mysql_async connections on one tokio runtime in this process, opened 64
//! at a time before the clock starts; each starts its interval at its own offset within the
//! first 50 ms, so that the statements arrive spread out, not in waves. Each run has a
//! server of its own, started for it; while the clients run, its app connections (its
//! processlist) and its RSS are sampled every 200 ms.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{Conn, OptsBuilder};
use serde::Serialize;

use crate::cpu::Mark;
use crate::process::{proc_stat, ticks_to_us};
use crate::procfs;
use crate::server::{MariaDb, DATABASE, PASSWORD, USER};
use crate::targets::{Target, Tools};

/// waitless's `pool_size` and `max_connections` in this part: the bound.
pub const MUX_CONNECTIONS: usize = 16;
/// Each client's statement period.
const PERIOD: Duration = Duration::from_millis(50);
/// Logins in flight at once while the clients connect.
const CONNECTING: usize = 64;

/// How much the part does.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MuxSizes {
    pub clients: usize,
    pub seconds: u64,
}

/// One target's run in one round.
#[derive(Debug, Clone, Serialize)]
pub struct MuxRun {
    pub target: Target,
    pub round: usize,
    /// Statements answered within the run's seconds.
    pub statements: u64,
    pub per_s: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The most connections of the app's user the server's processlist showed at once.
    pub server_connections_peak: u64,
    /// The server's largest VmRSS while the clients ran, in kB.
    pub server_rss_kb_peak: u64,
    /// The proxy's CPU per statement (µs); None for direct.
    pub proxy_cpu_us: Option<f64>,
    /// The server's CPU per statement (µs).
    pub server_cpu_us: f64,
    /// This process's CPU per statement (µs): the clients, competing for the same cores.
    pub load_cpu_us: f64,
}

/// What each client did.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

/// One run through `target`: a fresh server (so that its threads and memory are this run's
/// alone) and a fresh proxy, the clients connected, `sizes.seconds` of statements, the
/// clients gone.
pub fn run(target: Target, round: usize, tools: &Tools, sizes: MuxSizes) -> Result<MuxRun, String> {
    let server = &MariaDb::start()?;
    let running = target.start_mux(tools, server.port, MUX_CONNECTIONS)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let port = running.port;
    let conns = rt.block_on(connect_all(port, sizes.clients))?;

    let proxy = running.proc.as_ref().map(Mark::of);
    let db = Mark::of(&server.proc);
    let me = own_ticks();
    let done = AtomicBool::new(false);
    let mut peak_conns = 0;
    let mut peak_rss = 0;
    let tallies = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut conns = 0;
            let mut rss = 0;
            while !done.load(Ordering::Relaxed) {
                let sql = format!(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = '{USER}'"
                );
                if let Some(n) = server
                    .root_sql(&sql)
                    .ok()
                    .and_then(|o| o.trim().parse::<u64>().ok())
                {
                    conns = conns.max(n);
                }
                rss = rss.max(server_rss_kb(server));
                std::thread::sleep(Duration::from_millis(200));
            }
            (conns, rss)
        });
        let tallies = rt.block_on(statements(conns, Duration::from_secs(sizes.seconds)));
        done.store(true, Ordering::Relaxed);
        if let Ok((c, r)) = sampler.join() {
            peak_conns = c;
            peak_rss = r;
        }
        tallies
    });
    let proxy_used = running.proc.as_ref().zip(proxy).map(|(p, m)| m.used(p));
    let server_used = db.used(&server.proc);
    let load_us = ticks_to_us(own_ticks().saturating_sub(me));

    let mut latencies: Vec<u32> = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tallies {
        latencies.extend(t.latencies_us);
        errors += t.errors;
        first_error = first_error.or(t.first_error);
    }
    latencies.sort_unstable();
    let statements = latencies.len() as u64;
    let per = |us: f64| us / statements.max(1) as f64;
    Ok(MuxRun {
        target,
        round,
        statements,
        per_s: statements as f64 / sizes.seconds as f64,
        errors,
        first_error,
        p50_ms: quantile(&latencies, 0.50),
        p99_ms: quantile(&latencies, 0.99),
        server_connections_peak: peak_conns,
        server_rss_kb_peak: peak_rss,
        proxy_cpu_us: proxy_used.map(|u| per(u.us)),
        server_cpu_us: per(server_used.us),
        load_cpu_us: per(load_us),
    })
}

/// `clients` logged-in connections, `CONNECTING` logins at a time.
async fn connect_all(port: u16, clients: usize) -> Result<Vec<Conn>, String> {
    let gate = Arc::new(tokio::sync::Semaphore::new(CONNECTING));
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let gate = Arc::clone(&gate);
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.map_err(|e| e.to_string())?;
            let opts = OptsBuilder::default()
                .ip_or_hostname("127.0.0.1")
                .tcp_port(port)
                .user(Some(USER))
                .pass(Some(PASSWORD))
                .db_name(Some(DATABASE))
                .prefer_socket(false);
            Conn::new(opts).await.map_err(|e| e.to_string())
        }));
    }
    let mut conns = Vec::with_capacity(clients);
    for t in tasks {
        let conn = t.await.map_err(|e| e.to_string())?;
        conns.push(conn.map_err(|e| format!("a client could not log in: {e}"))?);
    }
    Ok(conns)
}

/// Every connection runs a statement each PERIOD for `length`, then quits.
async fn statements(conns: Vec<Conn>, length: Duration) -> Vec<Tally> {
    let n = conns.len().max(1) as u32;
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let end = start + length;
    let mut tasks = Vec::with_capacity(conns.len());
    for (i, mut conn) in conns.into_iter().enumerate() {
        let offset = PERIOD * u32::try_from(i).unwrap_or(0) / n;
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut tick = tokio::time::interval_at(start + offset, PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let at = tick.tick().await;
                if at >= end {
                    break;
                }
                let got: Result<Option<String>, _> = conn
                    .query_first("SELECT name FROM items WHERE id = 2")
                    .await;
                match got {
                    // From the tick it was due at, not from when it was sent: a target that
                    // falls behind shows it in the latency (no coordinated omission).
                    Ok(Some(name)) if name == "two" => tally
                        .latencies_us
                        .push(u32::try_from(at.elapsed().as_micros()).unwrap_or(u32::MAX)),
                    Ok(Some(name)) => note(&mut tally, format!("wrong row: {name:?}")),
                    Ok(None) => note(&mut tally, "no row".into()),
                    Err(e) => note(&mut tally, e.to_string()),
                }
            }
            let _ = conn.disconnect().await;
            tally
        }));
    }
    let mut tallies = Vec::with_capacity(tasks.len());
    for t in tasks {
        tallies.push(t.await.unwrap_or_else(|e| Tally {
            errors: 1,
            first_error: Some(e.to_string()),
            ..Tally::default()
        }));
    }
    tallies
}

fn note(tally: &mut Tally, error: String) {
    tally.errors += 1;
    tally.first_error.get_or_insert(error);
}

/// The `q` quantile of sorted microseconds, in ms.
fn quantile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    f64::from(sorted.get(i).copied().unwrap_or(0)) / 1000.0
}

fn server_rss_kb(server: &MariaDb) -> u64 {
    server
        .proc
        .pids()
        .into_iter()
        .filter_map(|pid| procfs::status_kib(pid as u32, "VmRSS"))
        .sum()
}

fn own_ticks() -> u64 {
    proc_stat(std::process::id() as i32).map_or(0, |s| s.ticks)
}

/// The part's table, its ratios (medians of the per-round ratios against direct) and
/// issue 22's target, printed.
pub fn report(runs: &[MuxRun], sizes: MuxSizes) -> (String, bool) {
    let mut out = format!(
        "{} persistent clients, a statement every {} ms each for {} s; waitless: pooling = \
         \"transaction\", pool_size = max_connections = {MUX_CONNECTIONS}\n\
         {:<18} {:>5} {:>10} {:>7} {:>8} {:>8} {:>10} {:>12} {:>10} {:>10} {:>10}\n",
        sizes.clients,
        PERIOD.as_millis(),
        sizes.seconds,
        "target",
        "round",
        "stmts/s",
        "errors",
        "p50 ms",
        "p99 ms",
        "srv conns",
        "srv RSS MiB",
        "proxy µs",
        "server µs",
        "load µs",
    );
    for r in runs {
        out.push_str(&format!(
            "{:<18} {:>5} {:>10.0} {:>7} {:>8.2} {:>8.2} {:>10} {:>12.1} {:>10} {:>10.1} {:>10.1}\n",
            r.target.label(),
            r.round,
            r.per_s,
            r.errors,
            r.p50_ms,
            r.p99_ms,
            r.server_connections_peak,
            r.server_rss_kb_peak as f64 / 1024.0,
            r.proxy_cpu_us.map_or("-".into(), |c| format!("{c:.1}")),
            r.server_cpu_us,
            r.load_cpu_us,
        ));
    }
    let ratio = |target: Target, f: fn(&MuxRun) -> f64| {
        let mut rs: Vec<f64> = runs
            .iter()
            .filter(|r| r.target == target)
            .filter_map(|r| {
                let d = runs
                    .iter()
                    .find(|d| d.target == Target::Direct && d.round == r.round)?;
                Some(f(r) / f(d).max(f64::MIN_POSITIVE))
            })
            .collect();
        rs.sort_by(f64::total_cmp);
        rs.get(rs.len() / 2).copied()
    };
    let mut met = true;
    for target in [Target::Haproxy, Target::Waitless] {
        let (Some(rate), Some(rss), Some(p99)) = (
            ratio(target, |r| r.per_s),
            ratio(target, |r| r.server_rss_kb_peak as f64),
            ratio(target, |r| r.p99_ms),
        ) else {
            continue;
        };
        out.push_str(&format!(
            "{} / direct: statements/s {rate:.3}x, p99 {p99:.2}x, server RSS {rss:.2}x\n",
            target.label()
        ));
        if target == Target::Waitless {
            let conns = runs
                .iter()
                .filter(|r| r.target == Target::Waitless)
                .map(|r| r.server_connections_peak)
                .max()
                .unwrap_or(0);
            let errors: u64 = runs
                .iter()
                .filter(|r| r.target == Target::Waitless)
                .map(|r| r.errors)
                .sum();
            let ok = rate >= 0.99 && conns <= MUX_CONNECTIONS as u64 && errors == 0;
            met &= ok;
            out.push_str(&format!(
                "issue 22's target: statements/s >= direct's (within 1%: the load is fixed) with \
                 <= {MUX_CONNECTIONS} server connections and 0 errors: {rate:.3}x, at most {conns} \
                 connections, {errors} errors: {}\n",
                if ok { "met" } else { "MISSED" }
            ));
        }
    }
    (out, met)
}
