//! The admin listener: `/` (the live dashboard), `/metrics` (Prometheus: the snapshot, the
//! process, the host's TCP), `/stats` (JSON), `/healthz`, `/reload`, `/upgrade`.
//!
//! It sees the running proxy only through `Control`, which the composition root (`proxy`)
//! implements: what a snapshot is taken from, and a reload.

pub mod dashboard;
pub mod histogram;
pub mod metrics;
pub mod report;
pub mod stats;
pub mod system;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::close::SideLedger;
use crate::config;
use crate::listener::ListenerStats;
use crate::pool::UpstreamInfo;

/// What the admin listener may ask of the running proxy.
pub trait Control: Send + Sync + 'static {
    /// What runs now, for a snapshot.
    fn inputs(&self) -> Inputs;

    /// Re-reads the config file and applies it; on any error, which it returns, the running
    /// config stays. Blocks (it reads the file): call it off the runtime threads.
    fn reload(&self) -> Result<(), String>;

    /// Starts the new binary with the listening sockets handed over; once it accepts, this
    /// process drains. The new pid, or why not (this process then serves on). Blocks.
    fn upgrade(&self) -> Result<u32, String>;

    /// The bearer token POST endpoints require now (`[admin] token`), if any: read per
    /// request, so a reload that changes it applies at once.
    fn token(&self) -> Option<String>;
}

/// What a snapshot is taken from: the running generation's listeners and pools.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// Listeners, whatever their protocol.
    pub listeners: Vec<ListenerInfo>,
    /// Upstream pools, whatever their protocol.
    pub upstreams: Vec<Arc<dyn UpstreamInfo>>,
    /// Reloads since start.
    pub reloads: ReloadCounts,
}

/// Reloads since start, by outcome.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct ReloadCounts {
    /// Configs read and applied.
    pub taken: u64,
    /// Configs refused: the running one stayed.
    pub refused: u64,
}

/// What the admin side sees of a listener.
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    /// Its configuration.
    pub cfg: config::Listener,
    /// The TCP address bound (port 0 resolved); None for unix sockets.
    pub addr: Option<SocketAddr>,
    /// Its counters.
    pub stats: Arc<ListenerStats>,
    /// Its client-side ledger.
    pub ledger: Arc<SideLedger>,
}

/// The admin listener's socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// `unix:/path`: its file is removed with it, as a unix listener's.
    Unix(crate::listener::Bound),
}

impl Listener {
    /// The TCP address bound; None for a unix socket.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(_) => None,
        }
    }
}

/// Serves the admin endpoints until `stop` (a new process took the socket over), each
/// connection a task of `tasks`.
pub async fn serve(
    sock: Listener,
    proxy: Arc<dyn Control>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let proxy = proxy.clone();
        match &sock {
            Listener::Tcp(l) => {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = l.accept() => a,
                };
                match accepted {
                    Ok((stream, _)) => {
                        tasks.spawn(connection(stream, proxy));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
            Listener::Unix(l) => {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = l.accept("admin") => a,
                };
                if let crate::listener::Accepted::Unix(stream) = accepted {
                    tasks.spawn(connection(stream, proxy));
                }
            }
        }
    }
}

/// Serves one admin connection.
async fn connection<S>(stream: S, proxy: Arc<dyn Control>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let proxy = proxy.clone();
        async move { Ok::<_, Infallible>(route(req, proxy).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

async fn route(req: Request<Incoming>, proxy: Arc<dyn Control>) -> Response<Full<Bytes>> {
    if let Some((ctype, body)) = dashboard::asset(req.uri().path()) {
        return static_body(ctype, body);
    }
    // Reading is open; anything that changes the proxy needs the token, checked before the
    // path so that a wrong token learns nothing about what exists.
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        if let Some(token) = proxy.token() {
            if !authorized(req.headers(), &token) {
                let mut resp = text(
                    StatusCode::UNAUTHORIZED,
                    "text/plain",
                    "a write endpoint: send Authorization: Bearer <[admin] token>\n".into(),
                );
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"waitless\""),
                );
                return resp;
            }
        }
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/reload" if req.method() == http::Method::POST => {
            match tokio::task::spawn_blocking(move || proxy.reload()).await {
                Ok(Ok(())) => {
                    tracing::info!("configuration reloaded (admin request)");
                    text(StatusCode::OK, "text/plain", "reloaded\n".into())
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "reload refused; the running configuration stays");
                    text(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "text/plain",
                        format!("reload refused, the running configuration stays: {e}\n"),
                    )
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/upgrade" if req.method() == http::Method::POST => {
            match tokio::task::spawn_blocking(move || proxy.upgrade()).await {
                Ok(Ok(pid)) => {
                    tracing::info!(
                        pid,
                        "upgrade: the new process serves; draining (admin request)"
                    );
                    text(
                        StatusCode::OK,
                        "text/plain",
                        format!(
                            "upgraded: process {pid} serves; process {} drains and exits\n",
                            std::process::id()
                        ),
                    )
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "upgrade failed; this process keeps serving");
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        format!("upgrade failed, the running process keeps serving: {e}\n"),
                    )
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/metrics" => {
            let format = metrics::Format::from_accept(
                req.headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            match tokio::task::spawn_blocking(move || {
                metrics::render(&stats::snapshot(&proxy.inputs()), &system::read(), format)
            })
            .await
            {
                Ok(body) => text(StatusCode::OK, format.content_type(), body),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/stats" => match tokio::task::spawn_blocking(move || {
            serde_json::to_string_pretty(&stats::snapshot(&proxy.inputs()))
        })
        .await
        {
            Ok(Ok(body)) => text(StatusCode::OK, "application/json", body),
            Ok(Err(e)) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                e.to_string(),
            ),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                e.to_string(),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Whether `headers` carry `Authorization: Bearer <token>`. The comparison takes the same
/// time wherever the first difference is, so the token cannot be guessed byte by byte.
fn authorized(headers: &http::HeaderMap, token: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

fn static_body(ctype: &'static str, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
}

fn text(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
}
