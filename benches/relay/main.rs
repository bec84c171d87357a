//! `cargo bench --bench relay`: waitless against a direct connection, HAProxy and nginx, side
//! by side, in one run on one machine.
//!
//! One backend (nginx `return 200` when installed, else an embedded hyper server) listens on a
//! fresh port per run. In front of it, each proxy is started as its own process with a config
//! this bench writes: waitless (the release binary) once per listener `time_wait` policy,
//! HAProxy (`http-reuse always`) and nginx (`upstream keepalive`); a missing one is skipped
//! with a note. The load generator is wrk when installed, else (or with
//! `WAITLESS_BENCH_BUILTIN_LOAD` set) a built-in tokio one; each
//! measurement is bounded (`WAITLESS_BENCH_SECS`, default 5 s). `WAITLESS_BENCH_ONLY` names
//! the parts to run (`short`, `keep-alive`, `rss`, comma-separated; default all).
//!
//! HAProxy, nginx and waitless `time_wait = "none"` (the targets' contest) are measured in
//! `WAITLESS_BENCH_ROUNDS` rounds (default 3), taken in turn, each round starting with the
//! next of them; the table gives each one's
//! medians, the target ratios the median of the ratios taken round by round, the JSON every
//! run.
//!
//! For each proxy and each kind of client (short `Connection: close`, keep-alive):
//! requests/s, the proxy's CPU per request (utime + stime of all its processes from
//! /proc/PID/stat, over the run), p50/p99 latency, errors, and TIME_WAIT sockets on the
//! backend, the proxy and the client, counted by the kernel (sock_diag census) after the run.
//! Then each proxy's RSS with 10,000 idle keep-alive client connections open.
//!
//! TIME_WAIT is capped host-wide by `net.ipv4.tcp_max_tw_buckets`; a 5 s short-connection run
//! can exceed it alone. A full table would make the next run's TIME_WAIT vanish (the kernel
//! frees the socket and counts `TCPTimeWaitOverflow` instead), so before each short run the
//! bench waits for the table to drain, and reports the overflow of each run beside the census.
//!
//! Results print as a table and are written to `target/bench-relay.json`.
//!
//! `WAITLESS_BENCH_TLS=1` makes it the HTTPS bench: the backend (nginx) listens with TLS, and
//! every proxy terminates the clients' TLS and speaks TLS to the backend, verifying its
//! certificate (one RSA-2048 certificate from a CA the bench makes); wrk's short clients do
//! a full handshake per request. No idle-RSS part; targets: short >= 1.5x, keep-alive
//! >= 1.1x; results in `target/bench-relay-tls.json`.

//!
//! The bench's modules: `targets` (backend, anchors, waitless and their configs), `process`
//! (the processes started and /proc), `load` (wrk or the built-in generator), `measure` (one
//! run), `timewait` (census and TIME_WAIT table), `rss` (idle memory), `report` (table and
//! ratios), `machine` (the header). Temp dirs, HTTP response parsing, nginx's config
//! skeleton and the waitless command line are the tests' own fixtures, in `tests/common/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod certs;
mod load;
mod machine;
mod measure;
mod process;
mod report;
mod rss;
mod targets;
mod timewait;

// The fixtures the tests use too; this bench needs only part of each.
#[allow(dead_code)]
#[path = "../../tests/common/binary.rs"]
mod binary;
#[allow(dead_code)]
#[path = "../../tests/common/http1.rs"]
mod http1;
#[allow(dead_code)]
#[path = "../../tests/common/nginx.rs"]
mod nginx;
#[allow(dead_code)]
#[path = "../../tests/common/procfs.rs"]
mod procfs;
#[allow(dead_code)]
#[path = "../../tests/common/tempdir.rs"]
mod tempdir;

use machine::{find, loadavg, machine, version};
use measure::Bench;
use report::{ratios, render_ratios, render_rss, render_summaries, Summary};
use rss::raise_nofile;
use targets::{Backend, Clients, Target, Tools};
use timewait::Ports;

/// Connections the load generator keeps busy (wrk -c).
pub const CONCURRENCY: usize = 64;
/// Idle client connections held open for the RSS measurement (fewer when the open-file
/// limit cannot be raised: HAProxy wants two descriptors per connection).
const IDLE_CONNS: usize = 10_000;
/// Default length of one measurement.
const DEFAULT_SECS: u64 = 5;
/// Default rounds of the contest (HAProxy, nginx, waitless `none`): the runs of one target
/// differ by 10-20% on a shared 2-core machine, more than the gaps measured; the median of
/// rounds taken in turn does not.
const DEFAULT_ROUNDS: usize = 3;

fn main() {
    // `cargo test --benches` runs this without --bench: nothing to test here.
    if !std::env::args().any(|a| a == "--bench") {
        println!("relay: a benchmark; run it with `cargo bench --bench relay`");
        return;
    }
    if let Err(e) = run() {
        eprintln!("relay bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let secs = std::env::var("WAITLESS_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(DEFAULT_SECS);
    let rounds = std::env::var("WAITLESS_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_ROUNDS);
    let nofile = raise_nofile();
    let mut machine = machine();
    // Both this process and the proxy hold one descriptor per idle connection; HAProxy
    // refuses to start unless it has two per connection it may accept.
    let idle_conns = IDLE_CONNS.min((nofile as usize / 2).saturating_sub(500));
    let tools = Tools {
        nginx: nginx::binary(),
        haproxy: find(&[
            "/usr/sbin/haproxy",
            "/usr/local/sbin/haproxy",
            "/usr/bin/haproxy",
        ]),
        wrk: std::env::var_os("WAITLESS_BENCH_BUILTIN_LOAD")
            .is_none()
            .then(|| find(&["/usr/bin/wrk", "/usr/local/bin/wrk"]))
            .flatten(),
        idle_conns,
        anchor_defer: std::env::var_os("WAITLESS_BENCH_ANCHOR_DEFER").is_some_and(|v| v != "0"),
        tls: if std::env::var_os("WAITLESS_BENCH_TLS").is_some_and(|v| v != "0") {
            Some(certs::Certs::make()?)
        } else {
            None
        },
    };
    let tls = tools.tls.is_some();
    if tls && tools.wrk.is_none() {
        return Err("the HTTPS bench needs wrk (apt-get install wrk)".into());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let mut notes = Vec::new();
    if idle_conns < IDLE_CONNS {
        notes.push(format!(
            "open-file limit is {nofile} and cannot be raised here: idle RSS measured with \
             {idle_conns} connections, not {IDLE_CONNS}"
        ));
    }
    let mut order = vec![Target::Direct];
    match &tools.haproxy {
        Some(_) => order.push(Target::Haproxy),
        None => notes.push("HAProxy skipped: not installed (apt-get install haproxy)".into()),
    }
    match &tools.nginx {
        Some(_) => {
            order.push(Target::Nginx);
            if tls {
                order.push(Target::NginxTls13);
            }
        }
        None => notes.push(
            "nginx skipped as proxy and backend: not installed (apt-get install nginx); \
             the backend is an embedded hyper server"
                .into(),
        ),
    }
    for p in ["client", "proxy", "none"] {
        order.push(Target::Waitless(p));
    }
    let loadgen = match &tools.wrk {
        Some(w) => format!("wrk {} -t2 -c{CONCURRENCY}", version(w, "-v")),
        None => {
            notes.push("wrk not installed (apt-get install wrk): built-in load generator".into());
            format!("built-in tokio generator, {CONCURRENCY} connections")
        }
    };
    let mut ports = Ports::new();
    // Per run one backend port: 2 per target and round, one per RSS measurement.
    let backend = Backend::start(&tools, &mut ports, order.len() * (2 * rounds + 1), &rt)?;
    let haproxy_v = tools.haproxy.as_ref().map(|b| version(b, "-v"));
    let nginx_v = tools.nginx.as_ref().map(|b| version(b, "-v"));

    println!(
        "relay bench{}: {secs} s per run, {rounds} rounds of the contest, {loadgen}, backend {}\n\
         machine: {} cores, {}, Linux {}; load average at start {}\n\
         HAProxy {}, nginx {}, waitless {}; accept deferred: waitless yes, HAProxy and nginx {}\n",
        if tls {
            " over TLS (RSA-2048 at every front and at the backend)"
        } else {
            ""
        },
        backend.describe,
        machine.nproc,
        machine.cpu,
        machine.kernel,
        machine.loadavg_start,
        haproxy_v.as_deref().unwrap_or("-"),
        nginx_v.as_deref().unwrap_or("-"),
        env!("CARGO_PKG_VERSION"),
        if tools.anchor_defer {
            "yes (WAITLESS_BENCH_ANCHOR_DEFER)"
        } else {
            "no (their default)"
        },
    );

    let mut bench = Bench {
        tools,
        rt,
        backend,
        ports,
        secs,
        runs: Vec::new(),
        rss: Vec::new(),
        notes,
    };
    let has = |t: Target| order.contains(&t);
    // WAITLESS_BENCH_ONLY=short,keep-alive,rss (any of them) runs a part of the bench.
    let only = std::env::var("WAITLESS_BENCH_ONLY").ok();
    let wants = |part: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|p| p.trim() == part))
    };
    // The contest is taken in rounds, in turn, so that drift on the machine falls on every
    // side alike; the others once. Every short run starts from a drained TIME_WAIT table.
    let contest: Vec<Target> = [
        Target::Haproxy,
        Target::Nginx,
        Target::NginxTls13,
        Target::Waitless("none"),
    ]
    .into_iter()
    .filter(|t| has(*t))
    .collect();
    let others: Vec<Target> = order
        .iter()
        .copied()
        .filter(|t| !contest.contains(t))
        .collect();
    for (part, clients) in [
        ("short", Clients::Short),
        ("keep-alive", Clients::KeepAlive),
    ] {
        if !wants(part) {
            continue;
        }
        for round in 1..=rounds {
            // Each round starts with the next target, so that none always runs last, when
            // the machine has been slowing down (or speeding up) over the round.
            for t in contest.iter().cycle().skip(round - 1).take(contest.len()) {
                bench.measure(*t, clients, round);
            }
        }
        for t in &others {
            bench.measure(*t, clients, 1);
        }
    }
    if wants("rss") && !tls {
        for t in order.iter().filter(|t| **t != Target::Direct) {
            bench.measure_rss(*t);
        }
    }
    machine.loadavg_end = loadavg();

    let summaries: Vec<Summary> = ["short", "keep-alive"]
        .into_iter()
        .flat_map(|c| order.iter().map(move |t| (*t, c)))
        .filter_map(|(t, c)| Summary::of(&bench.runs, t, c))
        .collect();
    // The targets: over TLS the handshake a pooled upstream saves is worth more.
    let bounds = if tls { (1.5, 1.1) } else { (1.1, 1.0) };
    let (ratio_rows, checks) = ratios(&summaries, &bench.runs, &bench.rss, bounds);
    println!();
    println!("{}", render_summaries(&summaries));
    println!(
        "CPU µs/r: the proxy's user+system CPU per request (all its processes). TW: TIME_WAIT \
         sockets after the run (kernel census) on the backend's port, the proxy's (listener and \
         its connections to the backend), and the clients' connections; TW overfl: TIME_WAIT \
         the kernel dropped host-wide during the run because tcp_max_tw_buckets ({}) was full.\n",
        machine.tcp_max_tw_buckets
    );
    if !bench.rss.is_empty() {
        println!("{}", render_rss(&bench.rss));
    }
    println!(
        "targets (waitless time_wait=none against the better of HAProxy and nginx; rates and \
         CPU: the median of the ratios taken round by round):"
    );
    println!("{}", render_ratios(&ratio_rows, &checks));
    println!("load average at end {}", machine.loadavg_end);
    for n in &bench.notes {
        println!("note: {n}");
    }

    let json = serde_json::json!({
        "secs_per_run": secs,
        "load_generator": loadgen,
        "backend": bench.backend.describe,
        "versions": BTreeMap::from([
            ("haproxy", haproxy_v),
            ("nginx", nginx_v),
            ("waitless", Some(env!("CARGO_PKG_VERSION").to_string())),
        ]),
        "machine": machine,
        "rounds": rounds,
        "tls": tls,
        "anchors_defer_accept": bench.tools.anchor_defer,
        "summaries": summaries,
        "runs": bench.runs,
        "idle_rss": bench.rss,
        "targets": ratio_rows,
        "checks": checks,
        "notes": bench.notes,
    });
    let out = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join(if tls {
            "bench-relay-tls.json"
        } else {
            "bench-relay.json"
        });
    let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
    std::fs::write(&out, text).map_err(|e| format!("{}: {e}", out.display()))?;
    println!("written: {}", out.display());
    Ok(())
}
