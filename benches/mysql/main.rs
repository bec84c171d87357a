//! `cargo bench --bench mysql`: the MySQL front against a direct connection and HAProxy
//! `mode tcp`, with the clients of a PHP app and mariadb-slap, on one MariaDB (issue 18).
//!
//! The bench starts its own MariaDB (a private data directory and port) with an account and
//! a database, and in front of it, fresh processes each round: HAProxy `mode tcp` (skipped
//! with a note when not installed) and waitless (the release binary, or the one
//! `WAITLESS_BENCH_BINARY` names, to compare two builds) with a mysql listener,
//! `pool_size = 16` and `[[mysql_user]]`.
//!
//! Through each target, and directly:
//! - PHP mysqli, one script per measurement (benches/mysql/php/), each timing itself, one
//!   client at a time: `SELECT 1` on one open connection (`WAITLESS_BENCH_QUERIES`, default
//!   10,000); connect + close; connect + `SELECT 1` + close; the app session (connect, SELECT,
//!   prepared SELECT, `SELECT @@sql_mode`, close), `WAITLESS_BENCH_SESSIONS` each (default
//!   2,000). Skipped with a note without php or its mysqli.
//! - mariadb-slap, 16 clients at once, `WAITLESS_BENCH_SLAP_QUERIES` (default 3,000)
//!   `select 1`, each on a connection of its own (`--detach=1`): sessions/s, on a fresh proxy
//!   so that the server's `Connections` counter over the run is what an empty pool opens.
//! - For each run: the proxy's and the server's CPU per operation (the scheduler's runtime of
//!   all their threads, from /proc), and the connections the server saw opened.
//! - The mux part (issue 22): `WAITLESS_BENCH_MUX_CLIENTS` (default 1,000) persistent
//!   mysql_async clients, a statement every 50 ms each for `WAITLESS_BENCH_MUX_SECONDS`
//!   (default 10), direct, through HAProxy and through waitless with `pooling =
//!   "transaction"` on 16 server connections: statements/s, p50/p99, the server's app
//!   connections and RSS at their peak, CPU per statement.
//!
//! The bench runs `WAITLESS_BENCH_ROUNDS` rounds (default 3). In a round each measurement
//! runs through every target in turn, so that the runs a ratio compares are seconds apart,
//! and each round starts with the next target, so that none always runs last: drift on the
//! shared machine falls on every side alike. The ratios are medians of the ratios taken
//! round by round. `WAITLESS_BENCH_ONLY=php`, `=slap` or `=mux` runs one part.
//! The table and issue 18's and 22's targets are printed, everything is
//! written to `target/bench-mysql.json`.
//!
//! The bench's modules: `server` (MariaDB), `targets` (HAProxy, waitless and their configs),
//! `clients` (the PHP scripts, mariadb-slap), `cpu` (exact CPU time from /proc), `measure`
//! (one round), `report` (table, ratios, targets). Processes, /proc and the
//! machine's header are the relay bench's modules; temp dirs and the waitless command line
//! the tests' fixtures.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

mod clients;
mod cpu;
mod measure;
mod mux;
mod report;
mod server;
mod targets;

// The relay bench's modules and the tests' fixtures; this bench needs only part of each.
#[allow(dead_code)]
#[path = "../../tests/common/binary.rs"]
mod binary;
#[allow(dead_code)]
#[path = "../relay/machine.rs"]
mod machine;
#[allow(dead_code)]
#[path = "../relay/process.rs"]
mod process;
#[allow(dead_code)]
#[path = "../../tests/common/procfs.rs"]
mod procfs;
#[allow(dead_code)]
#[path = "../../tests/common/tempdir.rs"]
mod tempdir;

use clients::Part;
use machine::{find, loadavg, machine, version};
use measure::{Bench, Sizes};
use report::{checks, render_checks, render_cpu, render_rounds, render_table, Summary};
use server::{MariaDb, MARIADBD};
use targets::{Target, Tools, POOL_SIZE};

const DEFAULT_ROUNDS: usize = 3;
const DEFAULT_QUERIES: u64 = 10_000;
const DEFAULT_SESSIONS: u64 = 2_000;
/// The issue's count.
const DEFAULT_SLAP_QUERIES: u64 = 3_000;
/// Issue 22's counts.
const DEFAULT_MUX_CLIENTS: usize = 1_000;
const DEFAULT_MUX_SECONDS: u64 = 10;

fn main() {
    // `cargo test --benches` runs this without --bench: nothing to test here.
    if !std::env::args().any(|a| a == "--bench") {
        println!("mysql: a benchmark; run it with `cargo bench --bench mysql`");
        return;
    }
    if let Err(e) = run() {
        eprintln!("mysql bench: {e}");
        std::process::exit(1);
    }
}

/// A positive number from the environment, else `default`.
fn knob<T: std::str::FromStr + PartialOrd + Default>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse::<T>().ok())
        .filter(|n| *n > T::default())
        .unwrap_or(default)
}

fn run() -> Result<(), String> {
    if !Path::new(MARIADBD).exists() {
        return Err(format!(
            "{MARIADBD} is not installed (apt-get install mariadb-server mariadb-client)"
        ));
    }
    let rounds = knob("WAITLESS_BENCH_ROUNDS", DEFAULT_ROUNDS);
    let sizes = Sizes {
        queries: knob("WAITLESS_BENCH_QUERIES", DEFAULT_QUERIES),
        sessions: knob("WAITLESS_BENCH_SESSIONS", DEFAULT_SESSIONS),
        slap_queries: knob("WAITLESS_BENCH_SLAP_QUERIES", DEFAULT_SLAP_QUERIES),
    };
    let only = std::env::var("WAITLESS_BENCH_ONLY").ok();
    let wants = |part: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|p| p.trim() == part))
    };
    let waitless = std::env::var_os("WAITLESS_BENCH_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_waitless")));
    if !waitless.exists() {
        return Err(format!("no waitless binary at {}", waitless.display()));
    }
    let mut notes = Vec::new();
    let php = find(&["/usr/bin/php", "/usr/local/bin/php"]);
    let php = match php {
        Some(p) if has_mysqli(&p) => Some(p),
        Some(_) => {
            notes.push("PHP part skipped: php has no mysqli (apt-get install php-mysql)".into());
            None
        }
        None => {
            notes.push(
                "PHP part skipped: php not installed (apt-get install php-cli php-mysql)".into(),
            );
            None
        }
    };
    let slap = find(&["/usr/bin/mariadb-slap", "/usr/local/bin/mariadb-slap"]);
    if slap.is_none() {
        notes.push(
            "slap part skipped: mariadb-slap not installed (apt-get install mariadb-client)".into(),
        );
    }
    let haproxy = find(&[
        "/usr/sbin/haproxy",
        "/usr/local/sbin/haproxy",
        "/usr/bin/haproxy",
    ]);
    if haproxy.is_none() {
        notes.push("HAProxy skipped: not installed (apt-get install haproxy)".into());
    }
    let tools = Tools {
        waitless,
        haproxy,
        php,
        slap,
    };
    let mut order = vec![Target::Direct];
    if tools.haproxy.is_some() {
        order.push(Target::Haproxy);
    }
    order.push(Target::Waitless);

    let mut machine = machine();
    let server = MariaDb::start()?;
    let versions = BTreeMap::from([
        ("mariadb", Some(server.version.clone())),
        ("haproxy", tools.haproxy.as_ref().map(|b| version(b, "-v"))),
        ("php", tools.php.as_ref().map(|b| version(b, "-v"))),
        ("waitless", Some(version(&tools.waitless, "--version"))),
    ]);
    println!(
        "mysql bench: rounds: {rounds}; PHP mysqli {} × SELECT 1 on one connection, {} sessions \
         per session measurement; mariadb-slap c{POOL_SIZE} {} queries; waitless pool_size = \
         {POOL_SIZE}\n\
         machine: {} cores, {}, Linux {}; load average at start {}\n\
         MariaDB {}, HAProxy {}, PHP {}, waitless {} ({})\n",
        sizes.queries,
        sizes.sessions,
        sizes.slap_queries,
        machine.nproc,
        machine.cpu,
        machine.kernel,
        machine.loadavg_start,
        server.version,
        versions["haproxy"].as_deref().unwrap_or("-"),
        versions["php"].as_deref().unwrap_or("-"),
        versions["waitless"].as_deref().unwrap_or("-"),
        tools.waitless.display(),
    );

    let mut bench = Bench {
        php: wants("php") && tools.php.is_some(),
        slap: wants("slap") && tools.slap.is_some(),
        server,
        tools,
        sizes,
        runs: Vec::new(),
        notes,
    };
    let mux_sizes = mux::MuxSizes {
        clients: knob("WAITLESS_BENCH_MUX_CLIENTS", DEFAULT_MUX_CLIENTS),
        seconds: knob("WAITLESS_BENCH_MUX_SECONDS", DEFAULT_MUX_SECONDS),
    };
    let mut mux_runs = Vec::new();
    for round in 1..=rounds {
        // Each round starts with the next target, so that none always runs last.
        let turn: Vec<Target> = order
            .iter()
            .copied()
            .cycle()
            .skip(round - 1)
            .take(order.len())
            .collect();
        if bench.php || bench.slap {
            bench.round(&turn, round);
        }
        if wants("mux") {
            for &target in &turn {
                print!("  mux {:<18} round {round} ...", target.label());
                let _ = std::io::Write::flush(&mut std::io::stdout());
                match mux::run(target, round, &bench.tools, mux_sizes) {
                    Ok(r) => {
                        println!(" {:.0} statements/s, {} errors", r.per_s, r.errors);
                        mux_runs.push(r);
                    }
                    Err(e) => {
                        println!(" failed: {e}");
                        bench
                            .notes
                            .push(format!("mux {} round {round}: {e}", target.label()));
                    }
                }
            }
        }
    }
    machine.loadavg_end = loadavg();

    let parts = clients::PHP_PARTS.into_iter().chain([Part::Slap]);
    let summaries: Vec<Summary> = parts
        .flat_map(|p| order.iter().map(move |t| (*t, p)))
        .filter_map(|(t, p)| Summary::of(&bench.runs, t, p))
        .collect();
    let checks = checks(&bench.runs, &summaries);
    println!();
    println!("{}", render_table(&bench.runs, bench.sizes.slap_queries));
    println!(
        "direct: the median over the rounds; the ratios: the median of the ratios taken round \
         by round (time for PHP, sessions/s for slap). One client at a time for PHP.\n"
    );
    println!("{}", render_rounds(&summaries));
    println!("{}", render_cpu(&bench.runs, &summaries));
    println!(
        "CPU: µs per session (PHP connect + SELECT 1 + close; slap's connect per query), \
         user+system time of all the process's threads over the whole run, warm-up included, \
         medians over the rounds. Server conns opened: MariaDB's `Connections` counter, round \
         by round, over all four PHP runs of a round (one client at a time) and over slap's \
         (c{POOL_SIZE}, each on a fresh proxy).\n"
    );
    println!("issue 18's targets:");
    println!("{}", render_checks(&checks));
    let mux_met = (!mux_runs.is_empty()).then(|| {
        let (table, met) = mux::report(&mux_runs, mux_sizes);
        println!("\nissue 22, persistent clients:\n{table}");
        met
    });
    println!("load average at end {}", machine.loadavg_end);
    for n in &bench.notes {
        println!("note: {n}");
    }

    let json = serde_json::json!({
        "rounds": rounds,
        "sizes": {
            "queries": bench.sizes.queries,
            "sessions": bench.sizes.sessions,
            "slap_queries": bench.sizes.slap_queries,
            "slap_concurrency": POOL_SIZE,
            "pool_size": POOL_SIZE,
        },
        "waitless_binary": bench.tools.waitless,
        "versions": versions,
        "machine": machine,
        "summaries": summaries,
        "runs": bench.runs,
        "checks": checks,
        "mux": { "sizes": mux_sizes, "runs": mux_runs, "target_met": mux_met },
        "notes": bench.notes,
    });
    let out = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench-mysql.json");
    let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
    std::fs::write(&out, text).map_err(|e| format!("{}: {e}", out.display()))?;
    println!("written: {}", out.display());
    Ok(())
}

/// Whether `php` has the mysqli extension.
fn has_mysqli(php: &Path) -> bool {
    Command::new(php)
        .args(["-r", "exit(extension_loaded('mysqli') ? 0 : 1);"])
        .output()
        .is_ok_and(|o| o.status.success())
}
