//! `cargo bench --bench relay`: waitless against a direct connection, HAProxy and nginx, side
//! by side, in one run on one machine.
//!
//! One backend (nginx `return 200` when installed, else an embedded hyper server) listens on a
//! fresh port per run. In front of it, each proxy is started as its own process with a config
//! this bench writes: waitless (the release binary) once per listener `time_wait` policy,
//! HAProxy (`http-reuse always`) and nginx (`upstream keepalive`); a missing one is skipped
//! with a note. The load generator is wrk when installed, else a built-in tokio one; each
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

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use waitless::close::census::{count_many, Scope, StateCounts};

/// Connections the load generator keeps busy (wrk -c).
const CONCURRENCY: usize = 64;
/// Idle client connections held open for the RSS measurement (fewer when the open-file
/// limit cannot be raised: HAProxy wants two descriptors per connection).
const IDLE_CONNS: usize = 10_000;
/// Default length of one measurement.
const DEFAULT_SECS: u64 = 5;
/// Default rounds of the contest (HAProxy, nginx, waitless `none`): the runs of one target
/// differ by 10-20% on a shared 2-core machine, more than the gaps measured; the median of
/// rounds taken in turn does not.
const DEFAULT_ROUNDS: usize = 3;
/// Ports for backends and proxies come from here up: below the ephemeral range
/// (32768-60999 by default), so no client socket ever has one as its local port.
const PORT_BASE: u16 = 20_000;
const PORT_END: u16 = 32_000;
/// Short-connection requests per second assumed before any short run was measured, to judge
/// whether the TIME_WAIT table has room for the next run (afterwards: the fastest seen).
const FIRST_SHORT_RATE: f64 = 20_000.0;

/// The programs this bench can use.
struct Tools {
    /// The waitless release binary.
    waitless: PathBuf,
    /// nginx: the backend, and one of the proxies.
    nginx: Option<PathBuf>,
    haproxy: Option<PathBuf>,
    wrk: Option<PathBuf>,
    /// Idle connections for the RSS measurement, from the open-file limit.
    idle_conns: usize,
    /// HAProxy and nginx listen with their deferred accept too (`defer-accept`, `deferred`),
    /// as waitless's HTTP listeners do by default (`WAITLESS_BENCH_ANCHOR_DEFER=1`).
    anchor_defer: bool,
}

/// Which clients a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clients {
    /// One request per connection, `Connection: close`; the client closes after the response.
    Short,
    /// Persistent connections.
    KeepAlive,
}

/// What the load goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Direct,
    Haproxy,
    Nginx,
    /// waitless with this listener `time_wait` policy.
    Waitless(&'static str),
}

/// A process this bench started, in a process group of its own; killed with the group.
struct Proc {
    /// What it is, for messages.
    name: String,
    child: Child,
    /// Its config, logs and temp files; removed on drop.
    dir: TempDir,
}

/// A directory removed on drop.
struct TempDir(PathBuf);

/// The one backend, listening on a fresh port for every run.
struct Backend {
    /// "nginx 1.22.1 return 200" or "embedded hyper".
    describe: String,
    /// The nginx process, or the embedded server's tasks.
    kind: BackendKind,
    /// Its ports, one per run, in the order runs take them.
    ports: Vec<u16>,
    /// Ports handed out so far.
    taken: usize,
}

enum BackendKind {
    Nginx(Proc),
    Embedded(Vec<tokio::task::JoinHandle<()>>),
}

/// Hands out fresh ports for proxies.
struct Ports {
    next: u16,
}

/// What a load generator measured.
#[derive(Debug, Default)]
struct Load {
    requests: u64,
    secs: f64,
    non2xx: u64,
    socket_errors: u64,
    p50_us: f64,
    p99_us: f64,
    /// The load generator's own CPU per request (wrk only).
    client_cpu_us: Option<f64>,
}

/// One measurement: one target, one kind of client.
#[derive(Debug, Serialize)]
struct Run {
    target: String,
    clients: &'static str,
    req_per_s: f64,
    requests: u64,
    secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Non-2xx responses plus socket errors.
    errors: u64,
    non2xx: u64,
    socket_errors: u64,
    proxy_cpu_us_per_req: Option<f64>,
    backend_cpu_us_per_req: Option<f64>,
    client_cpu_us_per_req: Option<f64>,
    /// TIME_WAIT sockets on the backend's port.
    tw_backend: u64,
    /// TIME_WAIT sockets on the proxy's listener port and on its connections to the backend.
    tw_proxy: Option<u64>,
    /// TIME_WAIT sockets on the clients' connections to the target.
    tw_client: u64,
    /// TIME_WAIT sockets the kernel did not create during the run (host-wide) because
    /// `tcp_max_tw_buckets` was reached: the census above is short by this many, somewhere.
    tw_overflow: u64,
    /// Position in the order the runs were taken.
    order: usize,
    /// Which round of the contest (HAProxy, nginx, waitless `none`) it belongs to; 1 for the
    /// targets measured once.
    round: usize,
    /// /proc/loadavg right after the run: others' work on the machine shows here.
    loadavg: String,
}

/// One target under one kind of client over all its runs: the medians of the rates, times and
/// CPU; of TIME_WAIT the most any run left; the errors of all runs.
#[derive(Debug, Serialize)]
struct Summary {
    target: String,
    clients: &'static str,
    runs: usize,
    req_per_s: f64,
    /// Every run's req/s, in the order taken.
    req_per_s_each: Vec<f64>,
    proxy_cpu_us_per_req: Option<f64>,
    proxy_cpu_us_each: Vec<f64>,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    tw_backend: u64,
    tw_proxy: Option<u64>,
    tw_client: u64,
    tw_overflow: u64,
}

/// A proxy's memory with idle client connections open.
#[derive(Debug, Serialize)]
struct Rss {
    target: String,
    /// Idle keep-alive connections open (each carried one request first).
    idle_conns: usize,
    failed_conns: usize,
    rss_before_kb: u64,
    rss_with_idle_kb: u64,
    /// (RSS with idle connections − before) / connections.
    bytes_per_idle_conn: f64,
}

/// The machine and the conditions of the run.
#[derive(Debug, Serialize)]
struct Machine {
    nproc: usize,
    cpu: String,
    kernel: String,
    loadavg_start: String,
    loadavg_end: String,
    tcp_max_tw_buckets: u64,
}

// === impl Summary ===

impl Summary {
    /// The runs of `target` with `clients`, if there were any.
    fn of(runs: &[Run], target: Target, clients: &'static str) -> Option<Summary> {
        let label = target.label();
        let mine: Vec<&Run> = runs
            .iter()
            .filter(|r| r.target == label && r.clients == clients)
            .collect();
        if mine.is_empty() {
            return None;
        }
        let each =
            |f: fn(&Run) -> Option<f64>| mine.iter().filter_map(|r| f(r)).collect::<Vec<_>>();
        let req_per_s_each = each(|r| Some(r.req_per_s));
        let proxy_cpu_us_each = each(|r| r.proxy_cpu_us_per_req);
        Some(Summary {
            target: label,
            clients,
            runs: mine.len(),
            req_per_s: median(&req_per_s_each),
            proxy_cpu_us_per_req: (!proxy_cpu_us_each.is_empty())
                .then(|| median(&proxy_cpu_us_each)),
            p50_ms: median(&each(|r| Some(r.p50_ms))),
            p99_ms: median(&each(|r| Some(r.p99_ms))),
            errors: mine.iter().map(|r| r.errors).sum(),
            tw_backend: mine.iter().map(|r| r.tw_backend).max().unwrap_or(0),
            tw_proxy: mine.iter().filter_map(|r| r.tw_proxy).max(),
            tw_client: mine.iter().map(|r| r.tw_client).max().unwrap_or(0),
            tw_overflow: mine.iter().map(|r| r.tw_overflow).sum(),
            req_per_s_each,
            proxy_cpu_us_each,
        })
    }
}

/// The middle value (the mean of the two middle ones for an even count); 0 for none.
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

// === impl Target ===

impl Target {
    fn label(self) -> String {
        match self {
            Target::Direct => "direct".into(),
            Target::Haproxy => "HAProxy http-reuse always".into(),
            Target::Nginx => "nginx upstream keepalive".into(),
            Target::Waitless(p) => format!("waitless time_wait={p}"),
        }
    }
}

impl Clients {
    fn label(self) -> &'static str {
        match self {
            Clients::Short => "short",
            Clients::KeepAlive => "keep-alive",
        }
    }
}

// === impl TempDir ===

impl TempDir {
    fn new(what: &str) -> io::Result<TempDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("waitless-bench-{}-{what}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// === impl Proc ===

impl Proc {
    /// Spawns `cmd` in a new process group, stdout and stderr to files in `dir`.
    fn spawn(name: &str, cmd: &mut Command, dir: TempDir) -> Result<Proc, String> {
        let log = |f: &str| {
            std::fs::File::create(dir.0.join(f))
                .map(Stdio::from)
                .map_err(|e| format!("{name}: log file: {e}"))
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log("stdout.log")?)
            .stderr(log("stderr.log")?)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("{name}: spawn: {e}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            dir,
        })
    }

    /// Its pid and those of every process in its group (nginx workers).
    fn pids(&self) -> Vec<i32> {
        let pgid = self.child.id() as i32;
        let mut pids = vec![pgid];
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return pids;
        };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid != pgid && proc_stat(pid).is_some_and(|s| s.pgrp == pgid) {
                pids.push(pid);
            }
        }
        pids
    }

    /// utime + stime of all its processes, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        self.pids()
            .into_iter()
            .filter_map(proc_stat)
            .map(|s| s.ticks)
            .sum()
    }

    /// VmRSS of all its processes, in kB.
    fn rss_kb(&self) -> u64 {
        self.pids().into_iter().filter_map(vm_rss_kb).sum()
    }

    /// Waits until something listens on `port`, counted by the kernel (a probe connection
    /// would be a client connection the census would have to allow for).
    fn wait_listening(&mut self, port: u16) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited at start ({status}): {}",
                    self.name,
                    self.logs()
                ));
            }
            let listening = count_many(&[Scope::LocalPort(port)])
                .ok()
                .and_then(|c| c.first().map(|s| s.listen > 0))
                .unwrap_or(false);
            if listening {
                // nginx's master binds before its workers exist; let them come up.
                std::thread::sleep(Duration::from_millis(200));
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "{} did not listen on port {port} within 10 s: {}",
            self.name,
            self.logs()
        ))
    }

    /// The tail of its logs, for error messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        for f in ["stderr.log", "stdout.log", "error.log"] {
            if let Ok(text) = std::fs::read_to_string(self.dir.0.join(f)) {
                let tail: String = text.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                if !tail.is_empty() {
                    out.push_str(&format!("[{f}] {tail} "));
                }
            }
        }
        out
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on the process group this bench created for its own child.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

// === impl Ports ===

impl Ports {
    fn new() -> Ports {
        let spread = (std::process::id() % 4000) as u16;
        Ports {
            next: PORT_BASE + spread * 2,
        }
    }

    /// A port nothing is bound to and no socket of any state uses, on either side.
    fn take(&mut self) -> Result<u16, String> {
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

// === impl Backend ===

impl Backend {
    /// nginx when installed, else the embedded server, on `n` ports.
    fn start(
        tools: &Tools,
        ports: &mut Ports,
        n: usize,
        rt: &tokio::runtime::Runtime,
    ) -> Result<Backend, String> {
        let list = (0..n)
            .map(|_| ports.take())
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(bin) = &tools.nginx {
            let dir = TempDir::new("backend").map_err(|e| e.to_string())?;
            let d = dir.0.display().to_string();
            let listens: String = list
                .iter()
                .map(|p| format!("    listen 127.0.0.1:{p} backlog=4096;\n"))
                .collect();
            // One process: the proxies and the load generator need the other core.
            // keepalive_requests: nginx would otherwise close a keep-alive connection every
            // 1000 requests, putting TIME_WAIT on the backend that no proxy could help.
            let conf = format!(
                "worker_processes 1;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
                 events {{ worker_connections 16384; }}\n\
                 http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
                 keepalive_timeout 75s;\n{temps}\
                   server {{\n{listens}\
                     location / {{ return 200 \"hello from the backend\\n\"; }}\n  }}\n}}\n",
                temps = nginx_temp_paths(&d)
            );
            std::fs::write(dir.0.join("nginx.conf"), conf).map_err(|e| e.to_string())?;
            let mut cmd = Command::new(bin);
            cmd.args([
                "-p",
                &d,
                "-c",
                "nginx.conf",
                "-g",
                "daemon off; master_process off;",
            ]);
            let mut proc = Proc::spawn("backend nginx", &mut cmd, dir)?;
            proc.wait_listening(list[0])?;
            Ok(Backend {
                describe: format!("nginx {} `return 200`, 1 process", version(bin, "-v")),
                kind: BackendKind::Nginx(proc),
                ports: list,
                taken: 0,
            })
        } else {
            let mut tasks = Vec::new();
            for &p in &list {
                let listener = rt
                    .block_on(TcpListener::bind(("127.0.0.1", p)))
                    .map_err(|e| format!("embedded backend: bind {p}: {e}"))?;
                tasks.push(rt.spawn(embedded_backend(listener)));
            }
            Ok(Backend {
                describe: "embedded hyper server (nginx not installed)".into(),
                kind: BackendKind::Embedded(tasks),
                ports: list,
                taken: 0,
            })
        }
    }

    /// The backend's address for the next run.
    fn next_addr(&mut self) -> Result<SocketAddr, String> {
        let p = *self
            .ports
            .get(self.taken)
            .ok_or("the backend ran out of ports")?;
        self.taken += 1;
        Ok(SocketAddr::from(([127, 0, 0, 1], p)))
    }

    /// CPU ticks of the backend process (nginx only).
    fn cpu_ticks(&self) -> Option<u64> {
        match &self.kind {
            BackendKind::Nginx(p) => Some(p.cpu_ticks()),
            BackendKind::Embedded(_) => None,
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let BackendKind::Embedded(tasks) = &self.kind {
            for t in tasks {
                t.abort();
            }
        }
    }
}

async fn embedded_backend(listener: TcpListener) {
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    Bytes::from_static(b"hello from the backend\n"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

// ---------------------------------------------------------------------------------------
// Proxies

/// Starts `target` on `port` in front of `backend`; None for `Direct`.
fn start_proxy(
    target: Target,
    tools: &Tools,
    port: u16,
    backend: SocketAddr,
) -> Result<Option<Proc>, String> {
    let mut proc = match target {
        Target::Direct => return Ok(None),
        Target::Waitless(policy) => {
            let dir = TempDir::new("waitless").map_err(|e| e.to_string())?;
            let conf = format!(
                "workers = 0\n\n[admin]\nlisten = \"off\"\n\n\
                 [[listener]]\nname = \"bench\"\nlisten = \"127.0.0.1:{port}\"\n\
                 protocol = \"http\"\nupstream = \"backend\"\ntime_wait = \"{policy}\"\n\n\
                 [[upstream]]\nname = \"backend\"\nservers = [\"{backend}\"]\npool_size = 64\n"
            );
            let path = dir.0.join("waitless.toml");
            std::fs::write(&path, conf).map_err(|e| e.to_string())?;
            let mut cmd = Command::new(&tools.waitless);
            cmd.arg("--config").arg(&path).args(["--log", "error"]);
            Proc::spawn(&target.label(), &mut cmd, dir)?
        }
        Target::Haproxy => {
            let bin = tools.haproxy.as_ref().ok_or("HAProxy is not installed")?;
            let dir = TempDir::new("haproxy").map_err(|e| e.to_string())?;
            let conf = format!(
                "global\n    maxconn {maxconn}\n\n\
                 defaults\n    mode http\n    timeout connect 2s\n    timeout client 60s\n\
                 \x20   timeout server 60s\n    timeout http-keep-alive 60s\n\
                 \x20   http-reuse always\n\n\
                 frontend bench\n    bind 127.0.0.1:{port}{defer}\n    default_backend backend\n\n\
                 backend backend\n    server s1 {backend}\n",
                maxconn = tools.idle_conns + 200,
                defer = if tools.anchor_defer {
                    " defer-accept"
                } else {
                    ""
                },
            );
            let path = dir.0.join("haproxy.cfg");
            std::fs::write(&path, conf).map_err(|e| e.to_string())?;
            let mut cmd = Command::new(bin);
            cmd.arg("-db").arg("-f").arg(&path);
            Proc::spawn("HAProxy", &mut cmd, dir)?
        }
        Target::Nginx => {
            let bin = tools.nginx.as_ref().ok_or("nginx is not installed")?;
            let dir = TempDir::new("nginx-proxy").map_err(|e| e.to_string())?;
            let d = dir.0.display().to_string();
            let conf = format!(
                "worker_processes auto;\nworker_rlimit_nofile 30000;\n\
                 error_log {d}/error.log;\npid {d}/nginx.pid;\n\
                 events {{ worker_connections 16384; }}\n\
                 http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
                 keepalive_timeout 75s;\n{temps}\
                 \x20 upstream backend {{\n    server {backend};\n    keepalive 64;\n\
                 \x20   keepalive_requests 1000000;\n  }}\n\
                 \x20 server {{\n    listen 127.0.0.1:{port} backlog=4096{defer};\n\
                 \x20   location / {{\n      proxy_pass http://backend;\n\
                 \x20     proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
                 \x20   }}\n  }}\n}}\n",
                temps = nginx_temp_paths(&d),
                defer = if tools.anchor_defer { " deferred" } else { "" },
            );
            std::fs::write(dir.0.join("nginx.conf"), conf).map_err(|e| e.to_string())?;
            let mut cmd = Command::new(bin);
            cmd.args(["-p", &d, "-c", "nginx.conf", "-g", "daemon off;"]);
            Proc::spawn("nginx proxy", &mut cmd, dir)?
        }
    };
    proc.wait_listening(port)?;
    Ok(Some(proc))
}

fn nginx_temp_paths(d: &str) -> String {
    ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .iter()
        .map(|t| format!("  {t}_temp_path {d}/{t};\n"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// One measurement

struct Bench {
    tools: Tools,
    rt: tokio::runtime::Runtime,
    backend: Backend,
    ports: Ports,
    secs: u64,
    /// Measurements taken so far, in order.
    runs: Vec<Run>,
    rss: Vec<Rss>,
    notes: Vec<String>,
}

impl Bench {
    /// Loads `target` with `clients` for `secs` and counts what it left behind.
    fn measure(&mut self, target: Target, clients: Clients, round: usize) {
        if clients == Clients::Short {
            self.wait_tw_headroom();
        }
        eprint!(
            "  {:<28} {:<10} {round} ... ",
            target.label(),
            clients.label()
        );
        let _ = io::stderr().flush();
        match self.try_measure(target, clients, round) {
            Ok(run) => {
                eprintln!("{:>9.0} req/s, {} errors", run.req_per_s, run.errors);
                self.runs.push(run);
            }
            Err(e) => {
                eprintln!("failed");
                self.notes.push(format!(
                    "{} ({}) failed: {e}",
                    target.label(),
                    clients.label()
                ));
            }
        }
    }

    fn try_measure(
        &mut self,
        target: Target,
        clients: Clients,
        round: usize,
    ) -> Result<Run, String> {
        let backend = self.backend.next_addr()?;
        let port = self.ports.take()?;
        let proxy = start_proxy(target, &self.tools, port, backend)?;
        let addr = if proxy.is_some() {
            SocketAddr::from(([127, 0, 0, 1], port))
        } else {
            backend
        };
        let proxy_ticks = proxy.as_ref().map(Proc::cpu_ticks);
        let backend_ticks = self.backend.cpu_ticks();
        let overflow = tw_overflow_count();
        let load = match &self.tools.wrk {
            Some(wrk) => run_wrk(wrk, addr, clients, self.secs)?,
            None => self.rt.block_on(builtin_load(addr, clients, self.secs)),
        };
        let proxy_ticks = proxy
            .as_ref()
            .zip(proxy_ticks)
            .map(|(p, t0)| p.cpu_ticks().saturating_sub(t0));
        let backend_ticks = self
            .backend
            .cpu_ticks()
            .zip(backend_ticks)
            .map(|(t1, t0)| t1.saturating_sub(t0));
        // The last FIN/ACK exchanges on loopback, and "client" linger, finish first.
        std::thread::sleep(Duration::from_millis(500));
        let overflow = tw_overflow_count().saturating_sub(overflow);
        let proxy_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let c = census(&[
            Scope::LocalPort(backend.port()),
            Scope::LocalPort(port),
            Scope::Remote(backend),
            Scope::Remote(proxy_addr),
        ])?;
        let (tw_proxy, tw_client) = match proxy {
            Some(_) => (Some(c[1].time_wait + c[2].time_wait), c[3].time_wait),
            None => (None, c[2].time_wait),
        };
        if let Some(p) = &proxy {
            if let Some(w) = child_exited(p) {
                return Err(format!("{} died during the run: {w}", p.name));
            }
        }
        drop(proxy);
        let per_req = |ticks: u64| ticks_to_us(ticks) / load.requests.max(1) as f64;
        Ok(Run {
            target: target.label(),
            clients: clients.label(),
            req_per_s: load.requests as f64 / load.secs.max(1e-9),
            requests: load.requests,
            secs: load.secs,
            p50_ms: load.p50_us / 1000.0,
            p99_ms: load.p99_us / 1000.0,
            errors: load.non2xx + load.socket_errors,
            non2xx: load.non2xx,
            socket_errors: load.socket_errors,
            proxy_cpu_us_per_req: proxy_ticks.map(per_req),
            backend_cpu_us_per_req: backend_ticks.map(per_req),
            client_cpu_us_per_req: load.client_cpu_us,
            tw_backend: c[0].time_wait,
            tw_proxy,
            tw_client,
            tw_overflow: overflow,
            order: self.runs.len() + 1,
            round,
            loadavg: loadavg(),
        })
    }

    /// Holds `IDLE_CONNS` idle keep-alive connections open to a fresh `target` and reads its
    /// memory before and with them.
    fn measure_rss(&mut self, target: Target) {
        eprint!("  {:<28} {:<10} ... ", target.label(), "idle RSS");
        let _ = io::stderr().flush();
        match self.try_measure_rss(target) {
            Ok(r) => {
                eprintln!("{:.0} bytes per idle connection", r.bytes_per_idle_conn);
                self.rss.push(r);
            }
            Err(e) => {
                eprintln!("failed");
                self.notes
                    .push(format!("{} (idle RSS) failed: {e}", target.label()));
            }
        }
    }

    fn try_measure_rss(&mut self, target: Target) -> Result<Rss, String> {
        let backend = self.backend.next_addr()?;
        let port = self.ports.take()?;
        let proxy =
            start_proxy(target, &self.tools, port, backend)?.ok_or("no proxy to measure")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        std::thread::sleep(Duration::from_millis(300));
        let before = proxy.rss_kb();
        let (conns, failed) = self.rt.block_on(open_idle(addr, self.tools.idle_conns));
        // Let the proxy settle (hyper, nginx and HAProxy free per-request state lazily).
        std::thread::sleep(Duration::from_secs(1));
        let with = proxy.rss_kb();
        if let Some(w) = child_exited(&proxy) {
            return Err(format!("{} died holding idle connections: {w}", proxy.name));
        }
        let n = conns.len();
        // RST from the client side: 10,000 closes leave no TIME_WAIT anywhere.
        self.rt.block_on(async move {
            for c in conns {
                let _ = socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO));
                drop(c);
            }
        });
        drop(proxy);
        Ok(Rss {
            target: target.label(),
            idle_conns: n,
            failed_conns: failed,
            rss_before_kb: before,
            rss_with_idle_kb: with,
            bytes_per_idle_conn: (with.saturating_sub(before) * 1024) as f64 / n.max(1) as f64,
        })
    }

    /// Waits (at most 65 s: TIME_WAIT lasts 60 s) until the TIME_WAIT table has room for a
    /// short run's sockets, so that none of them is lost to `tcp_max_tw_buckets`; a run
    /// that overflows anyway says so in its `tw_overflow`.
    fn wait_tw_headroom(&self) {
        let cap = tw_cap();
        let rate = self
            .runs
            .iter()
            .filter(|r| r.clients == Clients::Short.label())
            .map(|r| r.req_per_s)
            .fold(FIRST_SHORT_RATE, f64::max);
        let need = ((rate * 1.25 * self.secs as f64) as u64).min(cap);
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
}

/// The child's exit status if it has exited.
fn child_exited(p: &Proc) -> Option<String> {
    let pid = p.child.id() as i32;
    match proc_stat(pid) {
        Some(s) if s.state != 'Z' => None,
        Some(_) => Some(format!("zombie; logs: {}", p.logs())),
        None => Some(format!("gone; logs: {}", p.logs())),
    }
}

/// Counts by scope, in order.
fn census(scopes: &[Scope]) -> Result<Vec<StateCounts>, String> {
    count_many(scopes).map_err(|e| format!("census: {e}"))
}

// ---------------------------------------------------------------------------------------
// Load generators

/// Runs wrk against `addr`; bounded to `secs` + 15 s.
fn run_wrk(wrk: &Path, addr: SocketAddr, clients: Clients, secs: u64) -> Result<Load, String> {
    let dir = TempDir::new("wrk").map_err(|e| e.to_string())?;
    let out_path = dir.0.join("wrk.out");
    let out = std::fs::File::create(&out_path).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(wrk);
    cmd.args([
        "-t2",
        &format!("-c{CONCURRENCY}"),
        &format!("-d{secs}s"),
        "--latency",
    ]);
    if clients == Clients::Short {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{addr}/"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("wrk: {e}"))?;
    let rusage = wait_with_rusage(&mut child, Instant::now() + Duration::from_secs(secs + 15))?;
    let text = std::fs::read_to_string(&out_path).map_err(|e| e.to_string())?;
    let mut load = parse_wrk(&text).ok_or_else(|| format!("unreadable wrk output: {text}"))?;
    let cpu_us = timeval_us(rusage.ru_utime) + timeval_us(rusage.ru_stime);
    load.client_cpu_us = Some(cpu_us / load.requests.max(1) as f64);
    Ok(load)
}

/// Reaps `child` with wait4 to get its CPU time; kills it at `deadline`.
fn wait_with_rusage(child: &mut Child, deadline: Instant) -> Result<libc::rusage, String> {
    let pid = child.id() as libc::pid_t;
    let mut killed = false;
    loop {
        let mut status = 0;
        // SAFETY: rusage is plain data; wait4 writes it for our own child.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on the pid of a child this process spawned and has not reaped.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid {
            return if killed {
                Err("wrk did not finish in time and was killed".into())
            } else {
                Ok(ru)
            };
        }
        if r < 0 {
            return Err(format!("wait4: {}", io::Error::last_os_error()));
        }
        if !killed && Instant::now() > deadline {
            let _ = child.kill();
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn timeval_us(t: libc::timeval) -> f64 {
    t.tv_sec as f64 * 1e6 + t.tv_usec as f64
}

/// Requests, duration, errors and latency percentiles from wrk's report.
fn parse_wrk(text: &str) -> Option<Load> {
    let mut load = Load::default();
    let mut found = false;
    for line in text.lines() {
        let t = line.trim();
        let words: Vec<&str> = t.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => load.p50_us = parse_wrk_duration_us(v)?,
            ["99%", v] => load.p99_us = parse_wrk_duration_us(v)?,
            [n, "requests", "in", d, ..] => {
                load.requests = n.parse().ok()?;
                load.secs = parse_wrk_duration_us(d.trim_end_matches(','))? / 1e6;
                found = true;
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => load.non2xx = n.parse().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                // connect 0, read 12, write 0, timeout 0
                load.socket_errors = rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            _ => {}
        }
    }
    found.then_some(load)
}

/// "1.23ms", "456.00us", "2.00s", "1.00m" → microseconds.
fn parse_wrk_duration_us(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(n * scale)
}

/// The built-in load generator: `CONCURRENCY` connections for `secs`, like wrk.
async fn builtin_load(addr: SocketAddr, clients: Clients, secs: u64) -> Load {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| tokio::spawn(builtin_conn(addr, clients, deadline)))
        .collect();
    let mut load = Load::default();
    let mut latencies = Vec::new();
    for t in tasks {
        if let Ok((lat, non2xx, errors)) = t.await {
            load.requests += lat.len() as u64;
            latencies.extend(lat);
            load.non2xx += non2xx;
            load.socket_errors += errors;
        }
    }
    load.secs = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    load.p50_us = percentile(&latencies, 0.50);
    load.p99_us = percentile(&latencies, 0.99);
    load
}

/// One connection slot of the built-in generator: latencies (µs), non-2xx, socket errors.
async fn builtin_conn(
    addr: SocketAddr,
    clients: Clients,
    deadline: Instant,
) -> (Vec<u32>, u64, u64) {
    let request: &[u8] = match clients {
        Clients::Short => b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n",
        Clients::KeepAlive => b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n",
    };
    let (mut lat, mut non2xx, mut errors) = (Vec::new(), 0, 0);
    let mut buf = Vec::with_capacity(4096);
    let mut conn: Option<TcpStream> = None;
    while Instant::now() < deadline {
        let mut s = match conn.take() {
            Some(s) => s,
            None => match TcpStream::connect(addr).await {
                Ok(s) => s,
                Err(_) => {
                    errors += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            },
        };
        let t0 = Instant::now();
        let result = async {
            s.write_all(request).await?;
            read_response(&mut s, &mut buf).await
        };
        match tokio::time::timeout(Duration::from_secs(2), result).await {
            Ok(Ok((status, close))) => {
                lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                if !(200..400).contains(&status) {
                    non2xx += 1;
                }
                if clients == Clients::KeepAlive && !close {
                    conn = Some(s);
                }
            }
            _ => errors += 1,
        }
    }
    (lat, non2xx, errors)
}

/// Reads one HTTP/1.1 response; returns its status and whether the server will close.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<(u16, bool)> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    let mut head: Option<(usize, u16, Option<usize>, bool, bool)> = None;
    loop {
        if head.is_none() {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                head = Some(parse_head(&buf[..end + 4]).ok_or_else(bad_response)?);
            }
        }
        if let Some((len, status, length, chunked, close)) = head {
            let done = match (length, chunked) {
                (Some(n), _) => buf.len() >= len + n,
                (None, true) => buf.ends_with(b"0\r\n\r\n"),
                (None, false) => false,
            };
            if done {
                return Ok((status, close));
            }
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            // No length and no chunking: the body ends at the close.
            if let Some((_, status, None, false, _)) = head {
                return Ok((status, true));
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// (head length, status, content-length, chunked, connection close).
fn parse_head(head: &[u8]) -> Option<(usize, u16, Option<usize>, bool, bool)> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let (mut length, mut chunked, mut close) = (None, false, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().to_ascii_lowercase();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse().ok(),
            "transfer-encoding" => chunked = value.contains("chunked"),
            "connection" => close = value.contains("close"),
            _ => {}
        }
    }
    Some((head.len(), status, length, chunked, close))
}

fn bad_response() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "unparsable response head")
}

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64
}

/// Opens `n` keep-alive connections to `addr`, one request each, and keeps them open.
async fn open_idle(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let gate = Arc::new(tokio::sync::Semaphore::new(200));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _permit = gate.acquire().await.ok()?;
                let open = async {
                    let mut s = TcpStream::connect(addr).await?;
                    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
                        .await?;
                    let mut buf = Vec::new();
                    let (status, close) = read_response(&mut s, &mut buf).await?;
                    if status != 200 || close {
                        return Err(bad_response());
                    }
                    Ok::<_, io::Error>(s)
                };
                tokio::time::timeout(Duration::from_secs(10), open)
                    .await
                    .ok()?
                    .ok()
            })
        })
        .collect();
    let mut conns = Vec::with_capacity(n);
    let mut failed = 0;
    for t in tasks {
        match t.await {
            Ok(Some(s)) => conns.push(s),
            _ => failed += 1,
        }
    }
    (conns, failed)
}

// ---------------------------------------------------------------------------------------
// /proc and the machine

struct ProcStat {
    state: char,
    pgrp: i32,
    /// utime + stime.
    ticks: u64,
}

fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); pgrp is field 5, utime 14, stime 15.
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        pgrp: f.get(2)?.parse().ok()?,
        ticks: f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
    })
}

fn vm_rss_kb(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn ticks_to_us(ticks: u64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 * 1e6 / hz as f64
}

/// TIME_WAIT sockets on the host (/proc/net/sockstat; IPv4 and IPv6 share the table).
fn host_time_wait() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "tw")?;
    words.get(at + 1)?.parse().ok()
}

fn tw_cap() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_max_tw_buckets")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u64::MAX)
}

/// The kernel's count of TIME_WAIT sockets not created because the table was full
/// (TcpExt TCPTimeWaitOverflow in /proc/net/netstat).
fn tw_overflow_count() -> u64 {
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

fn machine() -> Machine {
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

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Raises the open-file limit as far as allowed: 10,000 idle connections need as many fds
/// here and in the proxy (which inherits the limit).
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let want = libc::rlimit {
            rlim_cur: 65_536,
            rlim_max: lim.rlim_max.max(65_536),
        };
        // Raising the hard limit needs privilege; fall back to the soft limit up to the hard one.
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// The first line a program prints about its version (nginx and HAProxy print to stderr).
fn version(bin: &Path, flag: &str) -> String {
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

fn find(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

// ---------------------------------------------------------------------------------------
// Report

fn fmt_k(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.prec$}"))
}

fn render_summaries(summaries: &[Summary]) -> String {
    let mut out = format!(
        "{:<28} {:<10} {:>4} {:>8} {:>9} {:>7} {:>7} {:>8} {:>8} {:>8} {:>9} {:>6}\n",
        "target",
        "clients",
        "runs",
        "req/s",
        "CPU µs/r",
        "p50 ms",
        "p99 ms",
        "TW back",
        "TW proxy",
        "TW clnt",
        "TW overfl",
        "errors"
    );
    for r in summaries {
        out.push_str(&format!(
            "{:<28} {:<10} {:>4} {:>8} {:>9} {:>7.2} {:>7.2} {:>8} {:>8} {:>8} {:>9} {:>6}\n",
            r.target,
            r.clients,
            r.runs,
            fmt_k(r.req_per_s),
            fmt_opt(r.proxy_cpu_us_per_req, 1),
            r.p50_ms,
            r.p99_ms,
            r.tw_backend,
            r.tw_proxy.map_or("-".into(), |n| n.to_string()),
            r.tw_client,
            r.tw_overflow,
            r.errors
        ));
    }
    let rounds: Vec<&Summary> = summaries.iter().filter(|r| r.runs > 1).collect();
    if !rounds.is_empty() {
        out.push_str("\nround by round (req/s; CPU µs/r):\n");
    }
    for r in rounds {
        let rates: Vec<String> = r.req_per_s_each.iter().map(|v| fmt_k(*v)).collect();
        let cpu: Vec<String> = r
            .proxy_cpu_us_each
            .iter()
            .map(|v| format!("{v:.1}"))
            .collect();
        out.push_str(&format!(
            "  {:<28} {:<10} {}; {}\n",
            r.target,
            r.clients,
            rates.join(" "),
            cpu.join(" ")
        ));
    }
    out
}

fn render_rss(rss: &[Rss]) -> String {
    let mut out = format!(
        "{:<28} {:>10} {:>12} {:>14} {:>16}\n",
        "target", "idle conns", "RSS before", "RSS with idle", "bytes per conn"
    );
    for r in rss {
        out.push_str(&format!(
            "{:<28} {:>10} {:>9.1} MB {:>11.1} MB {:>16.0}\n",
            r.target,
            r.idle_conns,
            r.rss_before_kb as f64 / 1024.0,
            r.rss_with_idle_kb as f64 / 1024.0,
            r.bytes_per_idle_conn
        ));
    }
    out
}

/// One line of the targets check.
#[derive(Debug, Serialize)]
struct Ratio {
    what: String,
    waitless: f64,
    best: f64,
    best_is: String,
    /// The median of `each`.
    ratio: f64,
    /// Round by round.
    each: Vec<f64>,
    target: String,
    met: bool,
}

/// The issue's targets, as ratios of waitless (`none`, `client` for TIME_WAIT) to the better
/// of HAProxy and nginx in this run: for rates and CPU the median over the rounds of each
/// round's ratio, since the runs of one round are minutes apart and the machine's drift
/// between rounds (up to 20%) moves them together.
fn ratios(summaries: &[Summary], runs: &[Run], rss: &[Rss]) -> (Vec<Ratio>, Vec<String>) {
    let get = |t: Target, c: &str| {
        let label = t.label();
        summaries
            .iter()
            .find(|r| r.target == label && r.clients == c)
    };
    let mut out = Vec::new();
    let mut checks = Vec::new();
    let none = Target::Waitless("none");
    let rate = |r: &Run| Some(r.req_per_s);
    let cpu = |r: &Run| r.proxy_cpu_us_per_req;
    let rows = [
        ("short", "req/s", rate as fn(&Run) -> Option<f64>, true, 1.1),
        ("keep-alive", "req/s", rate, true, 1.0),
        ("short", "CPU µs/req", cpu, false, 1.0),
        ("keep-alive", "CPU µs/req", cpu, false, 1.0),
    ];
    for (clients, measure, value, higher, bound) in rows {
        let rounds = paired(runs, clients, value, higher);
        if rounds.is_empty() {
            continue;
        }
        let each: Vec<f64> = rounds.iter().map(|(w, b, _)| w / b).collect();
        let ratio = median(&each);
        // "HAProxy" or "nginx": the anchor that was the better one in some round.
        let mut best_is: Vec<String> = rounds
            .iter()
            .filter_map(|(_, _, who)| who.split(' ').next().map(String::from))
            .collect();
        best_is.sort();
        best_is.dedup();
        out.push(Ratio {
            what: format!("{clients} {measure}"),
            waitless: median(&rounds.iter().map(|r| r.0).collect::<Vec<_>>()),
            best: median(&rounds.iter().map(|r| r.1).collect::<Vec<_>>()),
            best_is: best_is.join(" / "),
            ratio,
            each,
            target: if higher {
                format!(">= {bound:.1}x")
            } else {
                format!("<= {bound:.1}x")
            },
            met: if higher {
                ratio >= bound
            } else {
                ratio <= bound
            },
        });
    }
    let rss_of = |t: Target| {
        let label = t.label();
        rss.iter()
            .find(|r| r.target == label)
            .map(|r| r.bytes_per_idle_conn)
    };
    if let (Some(w), Some(h)) = (rss_of(none), rss_of(Target::Haproxy)) {
        let ratio = w / h.max(1.0);
        out.push(Ratio {
            what: "RSS bytes per idle conn".into(),
            waitless: w,
            best: h,
            best_is: Target::Haproxy.label(),
            ratio,
            each: vec![ratio],
            target: "<= 1.0x HAProxy".into(),
            met: ratio <= 1.0,
        });
    }
    if let Some(w) = get(none, "short") {
        let zero = w.tw_backend == 0 && w.tw_proxy == Some(0) && w.tw_client == 0;
        checks.push(format!(
            "time_wait=none, short: TIME_WAIT backend/proxy/client = {}/{}/{} (overflow {}) — \
             target 0 on every side: {}",
            w.tw_backend,
            w.tw_proxy.unwrap_or(0),
            w.tw_client,
            w.tw_overflow,
            if zero && w.tw_overflow == 0 {
                "met"
            } else {
                "MISSED"
            }
        ));
    }
    let errors: u64 = summaries
        .iter()
        .filter(|r| r.target.starts_with("waitless"))
        .map(|r| r.errors)
        .sum();
    checks.push(format!(
        "waitless errors over all its runs: {errors} — target 0: {}",
        if errors == 0 { "met" } else { "MISSED" }
    ));
    if let Some(c) = get(Target::Waitless("client"), "short") {
        let zero = c.tw_backend == 0 && c.tw_proxy == Some(0);
        checks.push(format!(
            "time_wait=client, short: TIME_WAIT backend/proxy = {}/{} — target 0: {} \
             (client: {}, the client's own cost)",
            c.tw_backend,
            c.tw_proxy.unwrap_or(0),
            if zero { "met" } else { "MISSED" },
            c.tw_client
        ));
    }
    (out, checks)
}

/// Round by round, waitless `none`'s `value` and the better anchor's (`higher` is better)
/// with its label, for the rounds in which both ran.
fn paired(
    runs: &[Run],
    clients: &str,
    value: fn(&Run) -> Option<f64>,
    higher: bool,
) -> Vec<(f64, f64, String)> {
    let rivals = [Target::Haproxy.label(), Target::Nginx.label()];
    let none = Target::Waitless("none").label();
    runs.iter()
        .filter(|r| r.target == none && r.clients == clients)
        .filter_map(|w| {
            let best = runs
                .iter()
                .filter(|r| r.round == w.round && r.clients == clients)
                .filter(|r| rivals.contains(&r.target))
                .filter_map(|r| value(r).map(|v| (v, r.target.clone())))
                .max_by(|a, b| {
                    if higher {
                        a.0.total_cmp(&b.0)
                    } else {
                        b.0.total_cmp(&a.0)
                    }
                })?;
            Some((value(w)?, best.0, best.1))
        })
        .collect()
}

fn render_ratios(ratios: &[Ratio], checks: &[String]) -> String {
    let mut out = String::new();
    for r in ratios {
        let each: Vec<String> = r.each.iter().map(|v| format!("{v:.2}")).collect();
        out.push_str(&format!(
            "  {:<24} waitless {:>9.1}  vs {:>9.1} ({:<15})  {:>5.2}x  target {:<16} {:<6} {}\n",
            r.what,
            r.waitless,
            r.best,
            r.best_is,
            r.ratio,
            r.target,
            if r.met { "met" } else { "MISSED" },
            if each.len() > 1 {
                format!("rounds: {}", each.join(" "))
            } else {
                String::new()
            }
        ));
    }
    for c in checks {
        out.push_str(&format!("  {c}\n"));
    }
    out
}

// ---------------------------------------------------------------------------------------

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
        waitless: PathBuf::from(env!("CARGO_BIN_EXE_waitless")),
        nginx: find(&["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]),
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
    };
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
        Some(_) => order.push(Target::Nginx),
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
        "relay bench: {secs} s per run, {rounds} rounds of the contest, {loadgen}, backend {}\n\
         machine: {} cores, {}, Linux {}; load average at start {}\n\
         HAProxy {}, nginx {}, waitless {}; accept deferred: waitless yes, HAProxy and nginx {}\n",
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
    let contest: Vec<Target> = [Target::Haproxy, Target::Nginx, Target::Waitless("none")]
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
    if wants("rss") {
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
    let (ratio_rows, checks) = ratios(&summaries, &bench.runs, &bench.rss);
    println!();
    println!("{}", render_summaries(&summaries));
    println!(
        "CPU µs/r: the proxy's user+system CPU per request (all its processes). TW: TIME_WAIT \
         sockets after the run (kernel census) on the backend's port, the proxy's (listener and \
         its connections to the backend), and the clients' connections; TW overfl: TIME_WAIT \
         the kernel dropped host-wide during the run because tcp_max_tw_buckets ({}) was full.\n",
        machine.tcp_max_tw_buckets
    );
    println!("{}", render_rss(&bench.rss));
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
        .join("bench-relay.json");
    let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
    std::fs::write(&out, text).map_err(|e| format!("{}: {e}", out.display()))?;
    println!("written: {}", out.display());
    Ok(())
}
