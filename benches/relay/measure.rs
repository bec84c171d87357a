//! One measurement: a fresh proxy in front of the backend, loaded for a while, then what it
//! cost and what it left behind in the kernel's socket table.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;
use waitless::close::census::Scope;

use crate::load::{builtin_load, run_wrk};
use crate::machine::loadavg;
use crate::process::{child_exited, ticks_to_us, Proc};
use crate::rss::Rss;
use crate::targets::{start_proxy, Backend, Clients, Target, Tools};
use crate::timewait::{census, tw_overflow_count, wait_tw_headroom, Ports};

/// One measurement: one target, one kind of client.
#[derive(Debug, Serialize)]
pub struct Run {
    /// The target's label (`Target::label`).
    pub target: String,
    /// "short" or "keep-alive".
    pub clients: &'static str,
    /// Requests completed per second of load.
    pub req_per_s: f64,
    /// Requests completed.
    pub requests: u64,
    /// How long the load ran.
    pub secs: f64,
    /// Latency percentiles, as the load generator saw them.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Non-2xx responses plus socket errors.
    pub errors: u64,
    /// Responses whose status was not 2xx or 3xx.
    pub non2xx: u64,
    /// Connect, read, write and timeout errors.
    pub socket_errors: u64,
    /// The proxy's user + system CPU per request, all its processes; None for `direct`.
    pub proxy_cpu_us_per_req: Option<f64>,
    /// The backend's, when it is nginx (the embedded one shares this process).
    pub backend_cpu_us_per_req: Option<f64>,
    /// The load generator's, when it is wrk.
    pub client_cpu_us_per_req: Option<f64>,
    /// TIME_WAIT sockets on the backend's port.
    pub tw_backend: u64,
    /// TIME_WAIT sockets on the proxy's listener port and on its connections to the backend.
    pub tw_proxy: Option<u64>,
    /// TIME_WAIT sockets on the clients' connections to the target.
    pub tw_client: u64,
    /// TIME_WAIT sockets the kernel did not create during the run (host-wide) because
    /// `tcp_max_tw_buckets` was reached: the census above is short by this many, somewhere.
    pub tw_overflow: u64,
    /// Position in the order the runs were taken.
    pub order: usize,
    /// Which round of the contest (HAProxy, nginx, waitless `none`) it belongs to; 1 for the
    /// targets measured once.
    pub round: usize,
    /// /proc/loadavg right after the run: others' work on the machine shows here.
    pub loadavg: String,
}

/// The bench's state: what it runs on and what it measured so far.
pub struct Bench {
    /// The programs found on this machine.
    pub tools: Tools,
    /// The runtime of the built-in load generator, the embedded backend and the idle
    /// connections.
    pub rt: tokio::runtime::Runtime,
    /// The one backend, a fresh port of it for each run.
    pub backend: Backend,
    /// Fresh ports for the proxies.
    pub ports: Ports,
    /// Length of one measurement.
    pub secs: u64,
    /// Measurements taken so far, in order.
    pub runs: Vec<Run>,
    /// Idle-RSS measurements taken so far.
    pub rss: Vec<Rss>,
    /// What was skipped or failed, printed after the table.
    pub notes: Vec<String>,
}

// === impl Bench ===

impl Bench {
    /// Loads `target` with `clients` for `secs` and counts what it left behind.
    pub fn measure(&mut self, target: Target, clients: Clients, round: usize) {
        if clients == Clients::Short {
            wait_tw_headroom(&self.runs, self.secs);
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
            Some(wrk) => {
                let scheme = if self.tools.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                run_wrk(wrk, &format!("{scheme}://{addr}/"), clients, self.secs)?
            }
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
}
