//! Test fixtures: real sockets on loopback, the real `waitless` binary, an in-test hyper
//! backend that counts what it accepts, a real nginx, and the kernel's socket table via `ss`.
//!
//! `binary`, `http1`, `nginx`, `procfs` and `tempdir` are the benches' fixtures too: the
//! relay and mysql benches include each file by path (`#[path = "../../tests/common/..."]`),
//! so they use nothing else of this directory and nothing but the crate's dependencies.
#![allow(dead_code)]

pub mod binary;
pub mod certs;
pub mod http1;
pub mod mysql;
pub mod nginx;
pub mod procfs;
pub mod tempdir;

pub use http1::is_complete_response;
pub use tempdir::TempDir;

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

/// A port free on 127.0.0.1 right now, and not handed out before in this test process: the
/// kernel may give the same free port to two binds in a row (a proxy's listener and its
/// admin port, say), which would make the config invalid.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let l = StdListener::bind("127.0.0.1:0").expect("bind :0");
        let port = l.local_addr().expect("local addr").port();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Dribbles a never-ending request head into `s`, a byte a round, each followed by up to
/// `pause` of waiting; true once waitless cut the connection (EOF or an error), false if it
/// was still open after `rounds`.
pub async fn dribbled_until_cut(s: &mut TcpStream, rounds: usize, pause: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for _ in 0..rounds {
        if s.write_all(b"X").await.is_err() {
            return true;
        }
        let mut probe = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(pause, s.read(&mut probe)).await {
            return true;
        }
    }
    false
}

// ---------------------------------------------------------------------------------------
// The kernel's view

/// Sockets in `state` (an `ss` state name) whose local port is `port`, as the kernel has
/// them (`ss -tanH state STATE '( sport = :PORT )'`).
pub fn sockets_on_port(state: &str, port: u16) -> usize {
    let out = Command::new("ss")
        .args(["-tanH", "state", state, &format!("( sport = :{port} )")])
        .output()
        .expect("run ss");
    assert!(out.status.success(), "ss failed: {:?}", out);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// Sockets in `state` whose remote port is `port` (the clients' side of connections to it).
pub fn sockets_to_port(state: &str, port: u16) -> usize {
    let out = Command::new("ss")
        .args(["-tanH", "state", state, &format!("( dport = :{port} )")])
        .output()
        .expect("run ss");
    assert!(out.status.success(), "ss failed: {:?}", out);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// TIME_WAIT sockets whose local port is `port`.
pub fn time_wait_on_port(port: u16) -> usize {
    sockets_on_port("time-wait", port)
}

/// Waits a moment for closes in flight to settle (FIN/ACK exchanges on loopback).
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

// ---------------------------------------------------------------------------------------
// The in-test backend

/// How the in-test backend behaves.
#[derive(Clone, Copy, Debug)]
pub enum BackendMode {
    /// `GET /bytes/N` answers N pseudo-random bytes; any other request echoes its body.
    Echo,
    /// As Echo, but idle keep-alive connections are closed by the server after this long.
    CloseIdleAfter(Duration),
    /// Every response carries `Connection: close` (the server closes first).
    AlwaysClose,
}

/// A hyper HTTP/1.1 server on 127.0.0.1 that counts the connections it accepts.
pub struct Backend {
    pub addr: SocketAddr,
    pub accepts: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
    /// Connection tasks, so `kill` can take the server down as a crash would.
    conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Backend {
    pub async fn start(mode: BackendMode) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let accepts = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (a, r) = (accepts.clone(), requests.clone());
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let held = conns.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                let conn = tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        r.fetch_add(1, Ordering::SeqCst);
                        backend_handle(req, mode)
                    });
                    let mut b = hyper::server::conn::http1::Builder::new();
                    if let BackendMode::CloseIdleAfter(d) = mode {
                        b.timer(TokioTimer::new()).header_read_timeout(d);
                    }
                    let _ = b.serve_connection(TokioIo::new(stream), svc).await;
                });
                held.lock().expect("conns").push(conn);
            }
        });
        Backend {
            addr,
            accepts,
            requests,
            task,
            conns,
        }
    }

    /// Takes the server down at once: no more accepts, every connection dropped.
    pub fn kill(&self) {
        self.task.abort();
        for c in self.conns.lock().expect("conns").drain(..) {
            c.abort();
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Backend responses: whole bodies, or a generated stream for sizes that must not be held.
pub type BackendBody = http_body_util::Either<Full<Bytes>, ZeroBody>;

async fn backend_handle(
    req: Request<Incoming>,
    mode: BackendMode,
) -> Result<Response<BackendBody>, Infallible> {
    use http_body_util::Either;
    let path = req.uri().path().to_string();
    if let Some(ms) = path.strip_prefix("/sleep/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        return Ok(Response::new(Either::Left(Full::new(Bytes::from_static(
            b"slept",
        )))));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let mut resp = Response::new(Either::Left(Full::new(Bytes::new())));
        *resp.status_mut() = code.parse().unwrap_or(hyper::StatusCode::OK);
        return Ok(resp);
    }
    if let Some(n) = path.strip_prefix("/stream/") {
        return Ok(Response::new(Either::Right(ZeroBody::new(
            n.parse().unwrap_or(0),
        ))));
    }
    if path == "/count" {
        // Counts the body without keeping it; answers the count.
        let mut body = req.into_body();
        let mut n: u64 = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => break,
            }
        }
        return Ok(Response::new(Either::Left(Full::new(Bytes::from(
            n.to_string(),
        )))));
    }
    let body = if let Some(n) = path.strip_prefix("/bytes/") {
        pattern(n.parse().unwrap_or(0))
    } else {
        req.into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default()
    };
    let mut resp = Response::new(Either::Left(Full::new(body)));
    if let BackendMode::AlwaysClose = mode {
        resp.headers_mut()
            .insert("connection", "close".parse().expect("value"));
    }
    Ok(resp)
}

/// A body of N zero bytes produced 64 KiB at a time, never held whole.
pub struct ZeroBody {
    remaining: u64,
}

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

impl ZeroBody {
    pub fn new(n: u64) -> ZeroBody {
        ZeroBody { remaining: n }
    }
}

impl hyper::body::Body for ZeroBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.remaining.min(ZEROS.len() as u64) as usize;
        self.remaining -= n as u64;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
            &ZEROS[..n],
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.remaining)
    }
}

/// A process's memory figure from /proc (e.g. "VmRSS", "VmHWM"), in KiB.
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    procfs::status_kib(pid, field).expect("field in /proc status")
}

/// N bytes of a fixed pseudo-random pattern (so downloads can be checked byte for byte).
pub fn pattern(n: usize) -> Bytes {
    let mut x: u32 = 0x9e37_79b9;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.push(x as u8);
    }
    Bytes::from(v)
}

// ---------------------------------------------------------------------------------------
// The waitless binary

/// A running `waitless` process with a config written for the test; killed on drop.
pub struct Waitless {
    pub child: Child,
    pub port: u16,
    pub admin: u16,
    pub dir: TempDir,
}

impl Waitless {
    /// Starts waitless with one http listener "web" on a free port in front of `servers`;
    /// `listener_extra` and `upstream_extra` are TOML lines added to each table.
    pub async fn start(
        servers: &[SocketAddr],
        listener_extra: &str,
        upstream_extra: &str,
    ) -> Waitless {
        let port = free_port();
        let admin = free_port();
        let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
        let config = format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
             [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"http\"\n\
             upstream = \"web\"\n{listener_extra}\n\n\
             [[upstream]]\nname = \"web\"\nservers = [{}]\n{upstream_extra}\n",
            servers.join(", ")
        );
        Waitless::launch(&config, port, admin).await
    }

    /// Starts waitless on a whole config text; `port` is its main listener's TCP port (0 when
    /// it has none) and `admin` the admin port the text sets.
    pub async fn launch(config: &str, port: u16, admin: u16) -> Waitless {
        Waitless::spawn(config, port, admin, "error", false).await
    }

    /// As `launch`, logging at `level` to a file in its directory; returns that file's path,
    /// for tests that check what waitless logs.
    pub async fn launch_logged(
        config: &str,
        port: u16,
        admin: u16,
        level: &str,
    ) -> (Waitless, std::path::PathBuf) {
        let w = Waitless::spawn(config, port, admin, level, true).await;
        let log = w.dir.0.join("waitless.log");
        (w, log)
    }

    async fn spawn(config: &str, port: u16, admin: u16, level: &str, log: bool) -> Waitless {
        let dir = TempDir::new("waitless");
        let mut cmd = binary::command(&dir.0, config, level).expect("write config");
        cmd.stdout(Stdio::null());
        if log {
            // In the process's own directory, removed with it.
            let file = std::fs::File::create(dir.0.join("waitless.log")).expect("create log");
            cmd.stderr(file);
        }
        let child = cmd.spawn().expect("spawn waitless");
        let w = Waitless {
            child,
            port,
            admin,
            dir,
        };
        w.wait_ready().await;
        w
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            // Only the admin port: a probe of the listener would be a client connection
            // the tests' counts would have to allow for. Listeners are bound before it.
            if TcpStream::connect(("127.0.0.1", self.admin)).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("waitless did not start listening");
    }

    /// /stats as JSON.
    pub async fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin_get("/stats").await).expect("stats JSON")
    }

    /// GET on the admin listener; the body as text.
    pub async fn admin_get(&self, path: &str) -> String {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.admin));
        let (status, body) = get(addr, path, false).await.expect("admin request");
        assert_eq!(status, 200, "admin {path}");
        String::from_utf8_lossy(&body).into_owned()
    }
}

impl Drop for Waitless {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Clients

/// One request on a new connection that the client closes after reading the whole
/// response (as curl, wrk and load balancers do). Returns status and body.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Bytes,
    connection_close: bool,
) -> Result<(u16, Bytes), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "test");
    if connection_close {
        req = req.header("connection", "close");
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    drop(tx);
    conn.abort();
    Ok((status, body))
}

/// A bodyless GET on a new connection.
pub async fn get(addr: SocketAddr, path: &str, close: bool) -> Result<(u16, Bytes), String> {
    request(addr, "GET", path, Bytes::new(), close).await
}

/// A GET with `Connection: close` that reads the response to EOF before closing, as a
/// client that lets the server close first does. Returns the raw response.
pub async fn get_to_eof(addr: SocketAddr, path: &str, version: &str) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} {version}\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut all = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return Ok(all),
            Ok(n) => all.extend_from_slice(&buf[..n]),
            // An RST after the whole response (time_wait = "none") ends the read; whether
            // the response was whole is for the caller to judge.
            Err(e) if !all.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Ok(all)
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runs `one` `n` times, `concurrency` at a time; returns how many returned false.
pub async fn run_load<F, Fut>(n: usize, concurrency: usize, one: F) -> usize
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, failed, one) = (next.clone(), failed.clone(), one.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::SeqCst) < n {
                if !one().await {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("load task");
    }
    failed.load(Ordering::SeqCst)
}

/// `n` EOF-reading requests, `concurrency` at a time; returns how many failed.
pub async fn eof_load(addr: SocketAddr, n: usize, concurrency: usize) -> usize {
    run_load(n, concurrency, move || async move {
        matches!(get_to_eof(addr, "/", "HTTP/1.1").await,
            Ok(r) if r.starts_with(b"HTTP/1.1 200") && is_complete_response(&r))
    })
    .await
}

/// `n` `Connection: close` GETs, `concurrency` at a time; returns how many failed.
pub async fn short_load(addr: SocketAddr, n: usize, concurrency: usize) -> usize {
    run_load(n, concurrency, move || async move {
        matches!(get(addr, "/", true).await, Ok((200, _)))
    })
    .await
}

// ---------------------------------------------------------------------------------------
// nginx

/// A real nginx on a private port and prefix, answering `return 200` (and echoing nothing).
pub struct Nginx {
    pub child: Child,
    pub port: u16,
    pub dir: TempDir,
}

impl Nginx {
    /// Starts nginx, or None when it is not installed (CI installs it).
    pub async fn start() -> Option<Nginx> {
        let bin = nginx::binary()?;
        let port = free_port();
        let dir = TempDir::new("nginx");
        let server = format!(
            "  server {{\n    listen 127.0.0.1:{port};\n\
               location / {{ return 200 \"hello from nginx\\n\"; }}\n  }}\n"
        );
        let conf = nginx::config(&dir.0, "worker_processes 1;\n", 4096, &server);
        std::fs::write(dir.0.join("nginx.conf"), conf).ok()?;
        let child = nginx::command(&bin, &dir.0, false)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let n = Nginx { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Some(n);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "nginx did not start: {:?}",
            std::fs::read_to_string(n.dir.0.join("error.log"))
        );
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// TcpExt TWRecycled from /proc/net/netstat: TIME_WAIT sockets a connect() took over.
pub fn tw_recycled() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut rows = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (rows.next(), rows.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(k, _)| *k == "TWRecycled")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}
