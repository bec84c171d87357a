//! The load generators: wrk when installed, else a built-in tokio one that keeps as many
//! connections busy; and the idle keep-alive connections of the RSS measurement.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::http1::{bad_response, read_response};
use crate::targets::Clients;
use crate::tempdir::TempDir;
use crate::CONCURRENCY;

/// What a load generator measured.
#[derive(Debug, Default)]
pub struct Load {
    /// Responses read whole.
    pub requests: u64,
    /// How long the load ran.
    pub secs: f64,
    /// Responses whose status was not 2xx or 3xx.
    pub non2xx: u64,
    /// Connect, read, write and timeout errors.
    pub socket_errors: u64,
    /// Latency percentiles.
    pub p50_us: f64,
    pub p99_us: f64,
    /// The load generator's own CPU per request (wrk only).
    pub client_cpu_us: Option<f64>,
}

/// Runs wrk against `url`; bounded to `secs` + 15 s.
pub fn run_wrk(wrk: &Path, url: &str, clients: Clients, secs: u64) -> Result<Load, String> {
    let dir = TempDir::create("wrk").map_err(|e| e.to_string())?;
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
    cmd.arg(url);
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

/// A timeval in microseconds.
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
pub async fn builtin_load(addr: SocketAddr, clients: Clients, secs: u64) -> Load {
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

/// The value at quantile `q` of `sorted` (nearest rank); 0 for none.
fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64
}

/// Opens `n` keep-alive connections to `addr`, one request each, and keeps them open.
pub async fn open_idle(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
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
