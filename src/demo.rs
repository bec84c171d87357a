//! `waitless demo`: shows, with nothing else installed, where TIME_WAIT lands with short
//! client connections — sent directly to a backend, then through an embedded waitless under
//! each client-side `time_wait` policy — counted by the kernel's census.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::close::census::{count_many, Scope};
use crate::config::{ClientTimeWait, Config};
use crate::proxy::Proxy;
use crate::workers::Workers;

/// One row of the demo's table.
#[derive(Debug)]
pub struct Row {
    pub mode: String,
    pub backend_tw: u64,
    pub proxy_tw: Option<u64>,
    pub client_tw: u64,
    pub backend_conns: usize,
    pub req_per_s: f64,
    pub errors: usize,
}

/// A tiny backend that answers every request with a short body and counts its accepts.
struct Backend {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

// === impl Backend ===

impl Backend {
    async fn start() -> std::io::Result<Backend> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accepts = Arc::new(AtomicUsize::new(0));
        let counter = accepts.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            b"hello from the demo backend\n",
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Backend {
            addr,
            accepts,
            task,
        })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs the demo and prints its table. `requests` short connections per row.
pub async fn run(requests: usize, concurrency: usize) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    rows.push(direct(requests, concurrency).await?);
    for policy in [
        ClientTimeWait::Client,
        ClientTimeWait::Proxy,
        ClientTimeWait::None,
    ] {
        rows.push(through_waitless(policy, requests, concurrency).await?);
    }
    Ok(rows)
}

async fn direct(requests: usize, concurrency: usize) -> Result<Row, String> {
    let backend = Backend::start().await.map_err(|e| e.to_string())?;
    let started = Instant::now();
    let errors = load(backend.addr, requests, concurrency).await;
    let secs = started.elapsed().as_secs_f64();
    settle().await;
    let [backend_tw, client_tw] = census([
        Scope::LocalPort(backend.addr.port()),
        Scope::Remote(backend.addr),
    ])?;
    Ok(Row {
        mode: "direct".into(),
        backend_tw,
        proxy_tw: None,
        client_tw,
        backend_conns: backend.accepts.load(Ordering::Relaxed),
        req_per_s: requests as f64 / secs,
        errors,
    })
}

async fn through_waitless(
    policy: ClientTimeWait,
    requests: usize,
    concurrency: usize,
) -> Result<Row, String> {
    let backend = Backend::start().await.map_err(|e| e.to_string())?;
    let workers = Workers::one(tokio::runtime::Handle::current());
    let proxy = Proxy::start(demo_config(backend.addr, policy)?, workers)
        .await
        .map_err(|e| e.to_string())?;
    let listen = proxy
        .current()
        .listeners
        .first()
        .and_then(|l| l.addr)
        .ok_or("the demo listener has no address")?;
    let started = Instant::now();
    let errors = load(listen, requests, concurrency).await;
    let secs = started.elapsed().as_secs_f64();
    settle().await;
    let [backend_tw, listener_tw, upstream_tw, client_tw] = census([
        Scope::LocalPort(backend.addr.port()),
        Scope::LocalPort(listen.port()),
        Scope::Remote(backend.addr),
        Scope::Remote(listen),
    ])?;
    Ok(Row {
        mode: format!("waitless time_wait={}", policy_name(policy)),
        backend_tw,
        proxy_tw: Some(listener_tw + upstream_tw),
        client_tw,
        backend_conns: backend.accepts.load(Ordering::Relaxed),
        req_per_s: requests as f64 / secs,
        errors,
    })
}

fn policy_name(p: ClientTimeWait) -> &'static str {
    match p {
        ClientTimeWait::Client => "client",
        ClientTimeWait::Proxy => "proxy",
        ClientTimeWait::None => "none",
    }
}

fn demo_config(backend: SocketAddr, time_wait: ClientTimeWait) -> Result<Config, String> {
    // Parsed from text, so the demo runs on exactly the defaults an operator gets.
    let text = format!(
        "[admin]\nlisten = \"off\"\n\n\
         [[listener]]\nname = \"demo\"\nlisten = \"127.0.0.1:0\"\nupstream = \"backend\"\n\
         time_wait = \"{time_wait}\"\n\n\
         [[upstream]]\nname = \"backend\"\nservers = [\"{backend}\"]\n"
    );
    Config::parse(&text, Path::new("<demo>")).map_err(|e| e.to_string())
}

/// TIME_WAIT counts of each scope.
/// TIME_WAIT sockets in each of `scopes`, in their order.
fn census<const N: usize>(scopes: [Scope; N]) -> Result<[u64; N], String> {
    let counts = count_many(&scopes).map_err(|e| format!("census: {e}"))?;
    let mut tw = [0; N];
    for (out, c) in tw.iter_mut().zip(&counts) {
        *out = c.time_wait;
    }
    Ok(tw)
}

/// Lets the last FIN/ACK exchanges on loopback finish before counting.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// `n` short HTTP/1.1 connections (`Connection: close`, closed by the client once the
/// response is read, as curl and load balancers do); returns the number of failures.
async fn load(addr: SocketAddr, n: usize, concurrency: usize) -> usize {
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, failed) = (next.clone(), failed.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    if one_request(addr).await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    failed.load(Ordering::Relaxed)
}

async fn one_request(addr: SocketAddr) -> Result<(), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "demo")
        .header("connection", "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let ok = resp.status().is_success();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    drop(tx);
    conn.abort();
    ok.then_some(()).ok_or_else(|| "status".to_string())
}

/// The table as text.
pub fn render(rows: &[Row], requests: usize) -> String {
    let mut out = format!(
        "{requests} short connections (Connection: close, closed by the client after the response) per row\n\
         TIME_WAIT sockets as counted by the kernel (sock_diag) right after the load:\n\n"
    );
    out.push_str(&format!(
        "{:<30} {:>10} {:>10} {:>10} {:>14} {:>9} {:>7}\n",
        "mode", "backend TW", "proxy TW", "client TW", "backend conns", "req/s", "errors"
    ));
    for r in rows {
        out.push_str(&format!(
            "{:<30} {:>10} {:>10} {:>10} {:>14} {:>9.0} {:>7}\n",
            r.mode,
            r.backend_tw,
            r.proxy_tw.map_or("-".to_string(), |n| n.to_string()),
            r.client_tw,
            r.backend_conns,
            r.req_per_s,
            r.errors
        ));
    }
    out
}
