//! The clients: one PHP mysqli script per measurement (benches/mysql/php/), each timing
//! itself, and mariadb-slap. Each runs as a child process with a deadline, so a response
//! the relay loses costs a failed measurement, not a hung bench.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::server::{DATABASE, PASSWORD, USER};
use crate::targets::POOL_SIZE;

/// A client's run may take this long before it is killed.
const DEADLINE: Duration = Duration::from_secs(120);

/// What is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Part {
    /// `SELECT 1` on one open connection.
    Select,
    /// connect + close.
    Connect,
    /// connect + `SELECT 1` + close.
    ConnectSelect,
    /// connect, SELECT, prepared SELECT, `SELECT @@sql_mode`, close.
    Session,
    /// mariadb-slap, connect per query, `POOL_SIZE` clients at once.
    Slap,
}

/// The PHP parts, in the order each round takes them.
pub const PHP_PARTS: [Part; 4] = [
    Part::Select,
    Part::Connect,
    Part::ConnectSelect,
    Part::Session,
];

/// A client run's result.
#[derive(Debug)]
pub struct Outcome {
    /// Operations timed (statements for `Select`, sessions for the others).
    pub count: u64,
    /// Operations the run made in all, warm-up included: the divisor of the CPU figures,
    /// which cover the whole run.
    pub total: u64,
    /// Seconds of the timed operations.
    pub secs: f64,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// The JSON line a PHP script prints (php/common.php).
#[derive(Deserialize)]
struct PhpLine {
    count: u64,
    warmup: u64,
    secs: f64,
    errors: u64,
    first_error: Option<String>,
}

// === impl Part ===

impl Part {
    /// Its key in the JSON.
    pub fn key(self) -> &'static str {
        match self {
            Part::Select => "select",
            Part::Connect => "connect",
            Part::ConnectSelect => "connect_select",
            Part::Session => "session",
            Part::Slap => "slap",
        }
    }

    /// Its row in the table.
    pub fn label(self) -> &'static str {
        match self {
            Part::Select => "`SELECT 1` on one open connection",
            Part::Connect => "connect + close",
            Part::ConnectSelect => "connect + `SELECT 1` + close",
            Part::Session => {
                "app session: connect, SELECT, prepared SELECT, `SELECT @@sql_mode`, close"
            }
            Part::Slap => "mariadb-slap c16 connect per query",
        }
    }

    /// Its PHP script; None for slap.
    fn script(self) -> Option<&'static str> {
        match self {
            Part::Select => Some("select.php"),
            Part::Connect => Some("connect.php"),
            Part::ConnectSelect => Some("connect_select.php"),
            Part::Session => Some("session.php"),
            Part::Slap => None,
        }
    }
}

/// Runs the PHP script of `part` against 127.0.0.1:`port`: `count` timed operations after
/// `warmup` untimed ones.
pub fn php(php: &Path, part: Part, port: u16, count: u64, warmup: u64) -> Result<Outcome, String> {
    let name = part.script().ok_or("not a PHP measurement")?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("benches/mysql/php")
        .join(name);
    let mut cmd = Command::new(php);
    cmd.arg(&script)
        .args(["127.0.0.1", &port.to_string(), USER, PASSWORD, DATABASE])
        .args([count.to_string(), warmup.to_string()]);
    let out = run(&mut cmd, name)?;
    let line: PhpLine = out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| format!("{name}: no result line in {out:?}"))?;
    Ok(Outcome {
        count: line.count,
        total: line.count + line.warmup,
        secs: line.secs,
        errors: line.errors,
        first_error: line.first_error,
    })
}

/// mariadb-slap against 127.0.0.1:`port`: `queries` × `select 1`, `POOL_SIZE` clients at
/// once, each query on a connection of its own (`--detach=1`). The time is slap's own
/// ("Average number of seconds to run all queries"), which leaves out its setup.
pub fn slap(slap: &Path, port: u16, queries: u64) -> Result<Outcome, String> {
    let mut cmd = Command::new(slap);
    cmd.args(["--no-defaults", "--protocol=tcp", "-h127.0.0.1"])
        .arg(format!("-P{port}"))
        .arg(format!("-u{USER}"))
        .arg(format!("-p{PASSWORD}"))
        .arg(format!("--create-schema={DATABASE}"))
        .arg("--no-drop")
        .arg(format!("--concurrency={POOL_SIZE}"))
        .arg(format!("--number-of-queries={queries}"))
        .args(["--query=select 1", "--detach=1", "--iterations=1"]);
    let out = run(&mut cmd, "mariadb-slap")?;
    let secs = out
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Average number of seconds to run all queries:")
        })
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .ok_or_else(|| format!("mariadb-slap: no time in {out:?}"))?;
    Ok(Outcome {
        count: queries,
        total: queries,
        secs,
        errors: 0,
        first_error: None,
    })
}

/// Runs `cmd` to its end or the deadline; its stdout when it exits 0.
fn run(cmd: &mut Command, name: &str) -> Result<String, String> {
    let dir = crate::tempdir::TempDir::create("client").map_err(|e| e.to_string())?;
    let (out_path, err_path) = (dir.0.join("stdout"), dir.0.join("stderr"));
    let file = |p: &Path| {
        std::fs::File::create(p)
            .map(Stdio::from)
            .map_err(|e| format!("{name}: {e}"))
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file(&out_path)?)
        .stderr(file(&err_path)?)
        .spawn()
        .map_err(|e| format!("{name}: spawn: {e}"))?;
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > DEADLINE => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{name}: still running after {DEADLINE:?}, killed"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("{name}: wait: {e}")),
        }
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    if !status.success() {
        let err = std::fs::read_to_string(&err_path).unwrap_or_default();
        let tail: Vec<&str> = err.lines().chain(out.lines()).rev().take(4).collect();
        return Err(format!("{name} exited {status}: {}", tail.join(" | ")));
    }
    Ok(out)
}
