//! HTTP mode: an HTTP/1.1 server for clients (keep-alive, `Connection: close`, HTTP/1.0)
//! that forwards every request over a pooled keep-alive connection to the upstream.
//!
//! The client connection runs in hyper's connection-level server without its own shutdown,
//! so when the exchange is over the socket comes back to us and the listener's close policy
//! (`close::Tracked::finish_client`) decides who sends the first FIN.

mod headers;
mod upstream;

use std::convert::Infallible;
use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Empty, Full};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::close::{ClientPolicy, Reason, SideLedger, Socket, Tracked};
use crate::config;
use crate::listener::{ListenerStats, Serve};
use upstream::{ConnectError, Lease, UpstreamBody};
pub use upstream::{HttpConn, HttpUpstream};

/// What a client receives: the upstream's body, or a short one of ours.
pub type RespBody = Either<UpstreamBody, Full<Bytes>>;

/// Everything a client connection of one HTTP listener needs.
#[derive(Debug)]
pub struct HttpListener {
    /// Its configuration.
    pub cfg: config::Listener,
    /// Where its requests go.
    pub upstream: Arc<HttpUpstream>,
    /// Its client-side close ledger.
    pub ledger: Arc<SideLedger>,
    /// Its counters.
    pub stats: Arc<ListenerStats>,
}

/// Per client connection state shared with the request handler.
#[derive(Debug, Default)]
struct ConnState {
    /// The client reads the response to EOF (HTTP/1.0 without keep-alive, or no length).
    eof_reader: AtomicBool,
}

/// Upper bound on the time a client may take to send a request head, whatever the
/// keep-alive timeout (slow-header clients hold a socket each).
const HEADER_TIMEOUT_CAP: std::time::Duration = std::time::Duration::from_secs(60);

// === impl HttpListener ===

impl Serve for HttpListener {
    fn serve<S: Socket>(
        self: Arc<Self>,
        stream: S,
        peer: Option<SocketAddr>,
    ) -> impl std::future::Future<Output = ()> + Send {
        self.serve_client(stream, peer)
    }
}

impl HttpListener {
    /// Serves one client connection to its end, then closes it by policy.
    async fn serve_client<S: Socket>(self: Arc<Self>, stream: S, peer: Option<SocketAddr>) {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let policy = ClientPolicy {
            time_wait: self.cfg.time_wait,
            linger: self.cfg.linger,
            fallback: self.cfg.linger_fallback,
        };
        let io = Tracked::client(stream, self.ledger.clone(), policy);
        let state = Arc::new(ConnState::default());
        let client_ip = peer.map(|p| p.ip());
        let svc = {
            let this = self.clone();
            let state = state.clone();
            service_fn(move |req| {
                let this = this.clone();
                let state = state.clone();
                // Boxed: polling the connection without its shutdown needs an Unpin future.
                Box::pin(
                    async move { Ok::<_, Infallible>(this.handle(req, client_ip, &state).await) },
                )
            })
        };
        let mut conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            // Idle keep-alive time counts as waiting for the next request head.
            .header_read_timeout(self.cfg.keepalive_timeout.min(HEADER_TIMEOUT_CAP))
            .serve_connection(TokioIo::new(io), svc);
        let result = poll_fn(|cx| conn.poll_without_shutdown(cx)).await;
        let io = conn.into_parts().io.into_inner();
        let reason = match result {
            Ok(()) => Reason::Done,
            Err(e) if e.is_timeout() => Reason::Idle,
            Err(e) => {
                tracing::debug!(listener = %self.cfg.name, peer = ?peer, error = %e, "client connection error");
                // Dropped: the close mechanism records it as an error (or a peer close).
                return drop(io);
            }
        };
        io.finish_client(reason, state.eof_reader.load(Ordering::Relaxed))
            .await;
    }

    /// Forwards one request and builds the client's response.
    async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        client_ip: Option<IpAddr>,
        state: &ConnState,
    ) -> Response<RespBody> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let (mut parts, body) = req.into_parts();
        let version = parts.version;
        let keep_alive = headers::wants_keep_alive(version, &parts.headers);
        if version == Version::HTTP_10 && !keep_alive {
            state.eof_reader.store(true, Ordering::Relaxed);
        }

        // Absolute-form targets (proxy style) become origin-form with a Host header.
        if let Some(authority) = parts.uri.authority().cloned() {
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(header::HOST, host);
            }
            let path = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            parts.uri = path
                .parse::<Uri>()
                .unwrap_or_else(|_| Uri::from_static("/"));
        }
        headers::strip_hop_by_hop(&mut parts.headers);
        // hyper's server already answered `Expect: 100-continue` when the body was polled.
        parts.headers.remove(header::EXPECT);
        headers::add_forwarded(&mut parts.headers, client_ip);
        parts.version = Version::HTTP_11;

        // A bodyless idempotent request can be replayed if a reused connection turns out to
        // have been closed by the server under our feet (the keep-alive race).
        let replay = (is_idempotent(&parts.method) && body.is_end_stream()).then(|| {
            let mut r = Request::new(Either::Right(Empty::new()));
            *r.method_mut() = parts.method.clone();
            *r.uri_mut() = parts.uri.clone();
            *r.version_mut() = parts.version;
            *r.headers_mut() = parts.headers.clone();
            r
        });
        let req = Request::from_parts(parts, Either::Left(body));

        let resp = match self.send(req, replay).await {
            Ok(resp) => resp,
            Err(resp) => return resp,
        };

        let (mut parts, body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        if version == Version::HTTP_10
            && !parts.headers.contains_key(header::CONTENT_LENGTH)
            && !body.is_end_stream()
        {
            // hyper can only delimit this by closing the connection.
            state.eof_reader.store(true, Ordering::Relaxed);
        }
        Response::from_parts(parts, Either::Left(body))
    }

    /// Sends the request on a pooled connection; on failure, the error response.
    async fn send(
        self: &Arc<Self>,
        req: Request<upstream::ReqBody>,
        replay: Option<Request<upstream::ReqBody>>,
    ) -> Result<Response<UpstreamBody>, Response<RespBody>> {
        let up = &self.upstream;
        let mut lease = self.checkout().await?;
        lease.pooled.mark_used();
        let reused = lease.pooled.is_reused();
        let first = tokio::time::timeout(
            up.cfg.response_timeout,
            lease.pooled.conn.tx.send_request(req),
        )
        .await;
        let err = match first {
            Ok(Ok(resp)) => return Ok(self.wrap(resp, lease)),
            Ok(Err(e)) => e,
            Err(_) => return Err(self.timed_out(&lease)),
        };
        let server = lease.server.clone();
        drop(lease);
        let replay = match replay {
            Some(r) if reused => r,
            _ => return Err(self.upstream_failed(&server.label, &err.to_string())),
        };
        tracing::debug!(listener = %self.cfg.name, server = %server.label, error = %err,
            "reused upstream connection failed before a response; retrying on a fresh one");
        server.stats.retries.fetch_add(1, Ordering::Relaxed);
        let pooled = match upstream::connect(up, &server).await {
            Ok(p) => p,
            Err(e) => return Err(self.connect_failed(&server.label, e)),
        };
        let mut lease = Lease {
            pooled,
            server,
            upstream: up.clone(),
        };
        lease.pooled.mark_used();
        match tokio::time::timeout(
            up.cfg.response_timeout,
            lease.pooled.conn.tx.send_request(replay),
        )
        .await
        {
            Ok(Ok(resp)) => Ok(self.wrap(resp, lease)),
            Ok(Err(e)) => Err(self.upstream_failed(&lease.server.label, &e.to_string())),
            Err(_) => Err(self.timed_out(&lease)),
        }
    }

    /// An idle pooled connection, or a new one; servers that refuse are skipped.
    async fn checkout(&self) -> Result<Lease, Response<RespBody>> {
        let up = &self.upstream;
        let mut last = None;
        for server in up.rotation() {
            while let Some(mut pooled) = server.take_idle(&up.cfg) {
                // Ready means the previous exchange fully finished on this connection.
                if pooled.conn.tx.ready().await.is_ok() {
                    server.stats.reused.fetch_add(1, Ordering::Relaxed);
                    return Ok(Lease {
                        pooled,
                        server: server.clone(),
                        upstream: up.clone(),
                    });
                }
            }
            match upstream::connect(up, server).await {
                Ok(pooled) => {
                    return Ok(Lease {
                        pooled,
                        server: server.clone(),
                        upstream: up.clone(),
                    })
                }
                Err(e) => {
                    server.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(listener = %self.cfg.name, upstream = %up.cfg.name,
                        server = %server.label, error = %e, "cannot connect to upstream server");
                    last = Some((server.label.clone(), e));
                }
            }
        }
        Err(match last {
            Some((label, e)) => self.connect_failed(&label, e),
            None => self.connect_failed("-", ConnectError::Busy),
        })
    }

    fn wrap(&self, resp: Response<Incoming>, lease: Lease) -> Response<UpstreamBody> {
        let (parts, body) = resp.into_parts();
        Response::from_parts(parts, UpstreamBody::new(body, lease))
    }

    fn connect_failed(&self, server: &str, e: ConnectError) -> Response<RespBody> {
        match e {
            ConnectError::Busy => {
                self.stats.errors_busy.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(listener = %self.cfg.name, server, "all upstream connections busy");
                error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!(
                        "upstream {}: all connections busy (max_connections)",
                        self.upstream.cfg.name
                    ),
                )
            }
            ConnectError::Io(e) => {
                self.stats.errors_connect.fetch_add(1, Ordering::Relaxed);
                error_response(
                    StatusCode::BAD_GATEWAY,
                    &format!(
                        "upstream {}: cannot connect to {server}: {e}",
                        self.upstream.cfg.name
                    ),
                )
            }
        }
    }

    fn upstream_failed(&self, server: &str, e: &str) -> Response<RespBody> {
        self.stats.errors_upstream.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(listener = %self.cfg.name, upstream = %self.upstream.cfg.name, server,
            error = e, "upstream request failed");
        error_response(
            StatusCode::BAD_GATEWAY,
            &format!(
                "upstream {}: server {server} failed: {e}",
                self.upstream.cfg.name
            ),
        )
    }

    fn timed_out(&self, lease: &Lease) -> Response<RespBody> {
        self.stats.errors_timeout.fetch_add(1, Ordering::Relaxed);
        let label = &lease.server.label;
        tracing::warn!(listener = %self.cfg.name, upstream = %self.upstream.cfg.name,
            server = %label, "upstream response timed out");
        error_response(
            StatusCode::GATEWAY_TIMEOUT,
            &format!(
                "upstream {}: server {label} did not respond within {:?}",
                self.upstream.cfg.name, self.upstream.cfg.response_timeout
            ),
        )
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn error_response(status: StatusCode, text: &str) -> Response<RespBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(format!(
        "waitless: {text}\n"
    )))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
