//! HTTP mode: an HTTP/1.1 server for clients (keep-alive, `Connection: close`, HTTP/1.0)
//! that forwards every request over a pooled keep-alive connection to the upstream.
//!
//! Plain GET and HEAD requests, nearly all of them, take the simple path (`simple`): parsed,
//! forwarded and answered on the socket without hyper's server; any other request is served
//! by hyper's connection-level server, from the bytes the simple path read. Neither shuts
//! the socket down itself: when the exchange is over the socket comes back to us and the
//! listener's close policy (`close::Tracked::finish_client`) decides who sends the first FIN.
//!
//! Each request head is checked (`validate`) before anything is forwarded, on top of what
//! hyper's parser refuses; a refused request is answered and its connection closed. An
//! upstream connection goes back to the pool only after a response complete by its framing
//! to a request sent whole (`upstream::UpstreamBody`, `upstream::ClientBody`).

mod headers;
mod idle;
mod simple;
mod upstream;
mod validate;
mod wire;

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::access;
use crate::close::{Ending, Reason, SideLedger, Socket, Tracked};
use crate::config;
use crate::connector::{self, GetError, OpenError, Reuse};
use crate::listener::{ListenerStats, Serve};
use crate::pool::Server;
use idle::{ExchangeBody, Replay};
use simple::Simple;
use upstream::{ClientBody, Failed, Lease, UpstreamBody};
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
    /// Cancelled when the listener drains (shutdown, or removed by a reload): keep-alive
    /// connections then close after the request in flight.
    pub stop: CancellationToken,
}

/// The state of one hyper connection, shared with the request handler and the response
/// bodies; dropped when hyper is let go, so idle connections do not keep it.
#[derive(Debug)]
pub struct ConnState {
    /// The listener of the connection.
    listener: Arc<HttpListener>,
    /// The client's address (from the PROXY header when there is one).
    client_ip: Option<IpAddr>,
    /// The same, as the X-Forwarded-For value of its requests.
    forwarded_for: Option<HeaderValue>,
    /// The connection's access log, when it is on.
    log: Option<Arc<access::Conn>>,
    /// How its requests' fields go upstream (the listener's rules, and whether it is TLS).
    rules: headers::Rules,
    /// The client reads the response to EOF (HTTP/1.0 without keep-alive, or no length).
    eof_reader: AtomicBool,
    /// The request being served is HTTP/1.0.
    http10: AtomicBool,
    /// waitless refused a request with an answer of its own: the connection ends after it,
    /// closed as a refusal, not waited for.
    refused: AtomicBool,
    /// Exchanges started and ended, for the idle check.
    activity: idle::Activity,
}

/// A request checked and made ready to go upstream.
enum Prepared {
    /// Answered by waitless itself (refused).
    Refused(Box<Response<RespBody>>),
    /// Without a body: the head as written upstream.
    Bodyless { head: Vec<u8>, flags: Bodyless },
    /// With a body, for hyper's client.
    WithBody(Box<Request<Incoming>>),
}

/// What the exchange of a bodyless request needs to know of it.
#[derive(Debug, Clone, Copy)]
struct Bodyless {
    /// HEAD: the response has no body whatever its headers say.
    head_request: bool,
    /// Safe to send again after the keep-alive race.
    idempotent: bool,
}

/// The upstream's answer to a bodyless request: its head as `wire` read it, and its body.
struct Answer {
    /// Status and fields, as they came.
    head: wire::Head,
    /// The body, which gives the connection back to the pool when it ends.
    body: UpstreamBody,
}

/// How the wait for a client's next request ended.
enum Waited {
    /// Bytes (or an EOF) to read.
    Request,
    /// Nothing came within the wait.
    Idle,
    /// The listener drains.
    Stopped,
}

/// How one hyper connection over a client socket ended.
enum Session<S: Socket> {
    /// The connection ended and was closed by policy (or dropped on an error).
    Over,
    /// hyper was let go on an idle connection: the socket, and the bytes hyper had read
    /// without parsing them yet (the start of a pipelined request).
    Released(Tracked<S>, Bytes),
}

/// Floor of the wait for a request head, so a tiny header_timeout cannot starve real clients.
const MIN_HEADER_WAIT: Duration = Duration::from_millis(100);

// === impl Answer ===

impl Answer {
    /// The answer read on `lease`; its body gives the connection back when it ends.
    fn new(head: wire::Head, lease: Lease) -> Answer {
        let body = UpstreamBody::wire(lease, head.framing, head.keep_alive);
        Answer { head, body }
    }

    /// As a response for hyper's server.
    fn into_response(self) -> Response<UpstreamBody> {
        Response::from_parts(self.head.parts(), self.body)
    }
}

// === impl HttpListener ===

impl Serve for HttpListener {
    fn serve<S: Socket>(
        self: Arc<Self>,
        stream: S,
        peer: Option<SocketAddr>,
    ) -> impl std::future::Future<Output = ()> + Send {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        // Wrapped here, not inside the async fn: its arguments live as long as its future,
        // and a bare socket beside the wrapped one would be dead weight in every idle task.
        let io = Tracked::client(stream, self.ledger.clone(), self.cfg.close_policy())
            .logged(access::Conn::new(&self.cfg.name, "http", peer));
        self.serve_client(io, peer)
    }

    fn track<S: Socket>(&self, stream: S) -> Tracked<S> {
        Tracked::client(stream, self.ledger.clone(), self.cfg.close_policy())
    }

    fn tls(&self) -> Option<(&crate::tls::ServerTls, std::time::Duration)> {
        Some((self.cfg.tls.as_ref()?, self.cfg.header_timeout))
    }

    /// At `max_clients`: every request on the connection gets a 503, then it closes.
    fn reject<S: Socket>(
        self: Arc<Self>,
        client: Tracked<S>,
        peer: Option<SocketAddr>,
    ) -> impl std::future::Future<Output = ()> + Send {
        self.reject_client(client, peer)
    }
}

impl HttpListener {
    /// At `max_clients`: answers 503 and closes.
    async fn reject_client<S: Socket>(self: Arc<Self>, io: Tracked<S>, peer: Option<SocketAddr>) {
        tracing::warn!(listener = %self.cfg.name, peer = ?peer, max_clients = self.cfg.max_clients,
            "too many client connections: answering 503");
        let name = self.cfg.name.clone();
        let svc = service_fn(move |_req| {
            let mut resp = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("listener {name}: too many client connections (max_clients)"),
            );
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            std::future::ready(Ok::<_, Infallible>(resp))
        });
        let mut conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .timer(TokioTimer::new())
            .header_read_timeout(self.cfg.header_timeout)
            .serve_connection(TokioIo::new(io), svc);
        let result = poll_fn(|cx| conn.poll_without_shutdown(cx)).await;
        let io = conn.into_parts().io.into_inner();
        if result.is_ok() {
            io.finish_client(Ending::RefusedAfterAnswer).await;
        }
    }

    /// Serves one client connection to its end, then closes it by policy.
    ///
    /// While the client sends nothing the connection costs only its socket and this small
    /// future: hyper's buffers and state are allocated (boxed) once there is a request to
    /// read, and let go again when the connection falls idle (`idle`), which keeps idle
    /// client connections cheap whether or not they ever sent a request.
    // Not an `async fn`: its arguments would be kept twice in every idle task (once as
    // arguments, once as the body's variables); the block below holds them once.
    #[allow(clippy::manual_async_fn)]
    fn serve_client<S: Socket>(
        self: Arc<Self>,
        mut io: Tracked<S>,
        peer: Option<SocketAddr>,
    ) -> impl Future<Output = ()> + Send {
        async move {
            // A new client's request has usually arrived by the time it is accepted.
            // (Consumed before the first wait, so that no slot for it stays in the task.)
            let mut released = false;
            if let Some(arrived) = read_arrived(&mut io) {
                match Box::pin(self.serve_requests(io, arrived, peer)).await {
                    Some(back) => (io, released) = (back, true),
                    None => return,
                }
            }
            loop {
                let reason = match self.await_request(&mut io, released).await {
                    Waited::Request => None,
                    Waited::Idle => Some(Reason::Idle),
                    Waited::Stopped => Some(Reason::Drain),
                };
                if let Some(reason) = reason {
                    // Boxed, like serving below: only the wait itself lives in every idle task.
                    return Box::pin(io.finish_client(Ending::Over(reason))).await;
                }
                match Box::pin(self.serve_requests(io, Bytes::new(), peer)).await {
                    Some(back) => (io, released) = (back, true),
                    None => return,
                }
            }
        }
    }

    /// Serves requests (the first starting with `unread`) until the connection ends, or
    /// falls idle: then the socket is given back, with no buffers held for it. Simple ones
    /// take the simple path; from the first other one, hyper serves the connection until
    /// it is idle.
    async fn serve_requests<S: Socket>(
        self: &Arc<Self>,
        mut io: Tracked<S>,
        mut unread: Bytes,
        peer: Option<SocketAddr>,
    ) -> Option<Tracked<S>> {
        loop {
            (io, unread) = match self.serve_simple(io, unread, peer).await {
                Simple::Over => return None,
                Simple::Idle(back) => {
                    crate::workers::tidy_soon();
                    return Some(back);
                }
                Simple::Hyper(back, rest) => (back, rest),
            };
            match self.session(io, unread, peer).await {
                Session::Over => return None,
                Session::Released(back, rest) if rest.is_empty() => {
                    // hyper's buffers were just freed: give them back while it is idle.
                    crate::workers::tidy_soon();
                    return Some(back);
                }
                // A pipelined request hyper had started reading: serve it at once.
                Session::Released(back, rest) => (io, unread) = (back, rest),
            }
        }
    }

    /// How long a connection may stay idle (before a request, or between two), and how long a
    /// head may take to arrive once it began: one bound for both, the shorter one.
    fn idle_wait(&self) -> Duration {
        self.cfg
            .keepalive_timeout
            .min(self.cfg.header_timeout.max(MIN_HEADER_WAIT))
    }

    /// Waits for the client's next bytes (or its EOF) for the idle wait, and for no longer
    /// than the listener runs. `released`: hyper was let go on this connection, idle.
    async fn await_request<S: Socket>(&self, io: &mut Tracked<S>, released: bool) -> Waited {
        let wait = if released {
            // hyper's idle wait began at least a tick before it was let go: the connection
            // closes no earlier than its full idle wait, at most a tick later.
            self.idle_wait().saturating_sub(idle::TICK)
        } else {
            self.idle_wait()
        };
        let mut expired = std::pin::pin!(tokio::time::sleep(wait));
        let mut stopped = std::pin::pin!(self.stop.cancelled());
        poll_fn(|cx| {
            // A request already there is served (and its connection then drained by hyper).
            if io.get_mut().poll_readable(cx).is_ready() {
                Poll::Ready(Waited::Request)
            } else if stopped.as_mut().poll(cx).is_ready() {
                Poll::Ready(Waited::Stopped)
            } else if expired.as_mut().poll(cx).is_ready() {
                Poll::Ready(Waited::Idle)
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Serves requests with hyper, first reading `unread`, until the connection ends (then
    /// it is closed by policy) or hyper is let go on an idle connection.
    async fn session<S: Socket>(
        self: &Arc<Self>,
        io: Tracked<S>,
        unread: Bytes,
        peer: Option<SocketAddr>,
    ) -> Session<S> {
        let state = Arc::new(ConnState {
            listener: self.clone(),
            client_ip: peer.map(|p| p.ip()),
            forwarded_for: headers::forwarded_for(peer.map(|p| p.ip())),
            log: io.log().cloned(),
            rules: headers::Rules {
                drop_underscored: self.cfg.drop_underscore_headers,
                https: S::IS_TLS,
            },
            eof_reader: AtomicBool::new(false),
            http10: AtomicBool::new(false),
            refused: AtomicBool::new(false),
            activity: idle::Activity::default(),
        });
        let svc = {
            let state = state.clone();
            service_fn(move |req| {
                state.activity.start();
                // Boxed: polling the connection without its shutdown needs an Unpin future.
                Box::pin(HttpListener::handle(state.clone(), req))
            })
        };
        let io = Replay::new(io, unread, state.clone());
        let mut conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            // Otherwise hyper reads the socket while a response is pending to spot an early
            // EOF: a read that finds nothing, and makes an `EagerTcp` join epoll for it.
            // A client that half-closes after its request still gets the response.
            .half_close(true)
            // A head over the limit gets 431, whether it completes or fills the buffer first.
            .max_header_size(validate::MAX_HEAD)
            .max_buf_size(validate::MAX_HEAD)
            // Its head timer would be one more timer per request; the tick below bounds the
            // wait for a head instead.
            .header_read_timeout(None)
            .serve_connection(TokioIo::new(io), svc);
        let mut ending = None;
        // No request head completed within the idle wait (a slow or stalled head).
        let mut head_late = false;
        let mut stopped = std::pin::pin!(self.stop.cancelled());
        let mut tick = std::pin::pin!(tokio::time::sleep(self.idle_wait()));
        let mut last = idle::Snapshot::default();
        let mut armed = false;
        // Stopped between two requests, at these counts: the client's next request, if it
        // comes before the idle tick lets the connection go, is answered with
        // `Connection: close`. Closed at once instead, a client that just sent it (a busy
        // keep-alive client's next request follows its last response at once) would see
        // its connection closed under the request.
        let mut drain_from: Option<idle::Snapshot> = None;
        let result = poll_fn(|cx| {
            if ending.is_none() && drain_from.is_none() && stopped.as_mut().poll(cx).is_ready() {
                let now = state.activity.snapshot();
                if now.between_requests() {
                    drain_from = Some(now);
                } else {
                    // Finishes the response in flight, then ends the connection.
                    Pin::new(&mut conn).graceful_shutdown();
                    ending = Some(Reason::Drain);
                }
            }
            let mut poll = conn.poll_without_shutdown(cx);
            if poll.is_pending()
                && ending.is_none()
                && drain_from.is_some_and(|at| state.activity.snapshot() != at)
            {
                // The next request came: hyper answers it with `Connection: close`.
                Pin::new(&mut conn).graceful_shutdown();
                ending = Some(Reason::Drain);
                poll = conn.poll_without_shutdown(cx);
            }
            if poll.is_ready() || ending.is_some() {
                return poll;
            }
            if !armed {
                // The tick starts once an exchange ended: a short connection never arms it.
                last = state.activity.snapshot();
                if !last.any_started() {
                    // hyper waits for this session's first head: the tick, unarmed, is that
                    // wait's deadline (its first poll starts it; a head that arrived whole
                    // was handed to the service before this point, and never starts it).
                    if tick.is_elapsed() || tick.as_mut().poll(cx).is_ready() {
                        head_late = true;
                        return Poll::Ready(Ok(()));
                    }
                    return poll;
                }
                if !last.any_ended() {
                    return poll;
                }
                armed = true;
                tick.as_mut()
                    .reset(tokio::time::Instant::now() + idle::TICK);
            }
            while tick.as_mut().poll(cx).is_ready() {
                if state.activity.idle_since(last) {
                    // hyper is idle: it closes at once, writing nothing (let go, or drained).
                    Pin::new(&mut conn).graceful_shutdown();
                    ending = Some(if drain_from.is_some() {
                        Reason::Drain
                    } else {
                        Reason::Idle
                    });
                    return conn.poll_without_shutdown(cx);
                }
                last = state.activity.snapshot();
                // From now, not from the deadline: a late tick must not make a short one.
                tick.as_mut()
                    .reset(tokio::time::Instant::now() + idle::TICK);
            }
            Poll::Pending
        })
        .await;
        let parts = conn.into_parts();
        let (io, replayed) = parts.io.into_inner().into_parts();
        // Refused by waitless, or by hyper's parser (which answered 400, 414 or 431 before
        // it returned the error): the answer is out, and the client is not waited for.
        let parse_error = matches!(&result, Err(e) if e.is_parse());
        if state.refused.load(Ordering::Relaxed) || parse_error {
            if let Err(e) = &result {
                tracing::debug!(listener = %self.cfg.name, peer = ?peer, error = %e,
                    "client request refused by the parser");
            }
            io.finish_client(Ending::RefusedAfterAnswer).await;
            return Session::Over;
        }
        let reason = match result {
            Ok(()) if ending == Some(Reason::Idle) && !io.peer_eof() => {
                let rest = if replayed.is_empty() {
                    parts.read_buf
                } else {
                    [&parts.read_buf[..], &replayed[..]].concat().into()
                };
                // Its last request is logged now, not at a close that may be far off.
                if let Some(log) = io.log() {
                    log.flush();
                }
                return Session::Released(io, rest);
            }
            Ok(()) if head_late => Reason::Idle,
            Ok(()) if ending == Some(Reason::Drain) => Reason::Drain,
            Ok(()) => Reason::Done,
            Err(e) if e.is_timeout() => Reason::Idle,
            Err(e) => {
                tracing::debug!(listener = %self.cfg.name, peer = ?peer, error = %e, "client connection error");
                // Dropped: the close mechanism records it as an error (or a peer close).
                drop(io);
                return Session::Over;
            }
        };
        let ending = if state.eof_reader.load(Ordering::Relaxed) {
            Ending::ReadsToEof
        } else {
            Ending::Over(reason)
        };
        io.finish_client(ending).await;
        Session::Over
    }

    /// Forwards one request and builds the client's response. Everything that needs no
    /// waiting (checks, rewriting, the upstream head) is done before the future is made:
    /// hyper boxes that future once per request, and it holds only what the exchange needs.
    fn handle(
        state: Arc<ConnState>,
        req: Request<Incoming>,
    ) -> impl Future<Output = Result<Response<ExchangeBody>, Infallible>> + Send + 'static {
        let started = Instant::now();
        let mut logged = state.log.as_ref().map(|_| {
            let target = req.uri().to_string();
            Box::new(access::Exchange::new(req.method().as_str(), &target))
        });
        let prepared = state.listener.prepare(req, &state);
        async move {
            let this = &state.listener;
            let trip = logged.as_deref_mut().map(|ex| &mut ex.trip);
            let resp = match prepared {
                Prepared::Refused(resp) => Err(*resp),
                Prepared::Bodyless { head, flags } => this
                    .send_bodyless(head, flags, trip)
                    .await
                    .map(Answer::into_response),
                Prepared::WithBody(req) => {
                    // Boxed, as connecting is: the rare path's large future (hyper's
                    // handshake) would otherwise size every request's future.
                    let sending = Box::pin(this.send_with_body(*req, &state, trip));
                    sending.await
                }
            };
            let resp = match resp {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    if state.http10.load(Ordering::Relaxed)
                        && !parts.headers.contains_key(header::CONTENT_LENGTH)
                        && !body.is_end_stream()
                    {
                        // hyper can only delimit this by closing the connection.
                        state.eof_reader.store(true, Ordering::Relaxed);
                    }
                    Response::from_parts(parts, Either::Left(body))
                }
                Err(resp) => resp,
            };
            // To the response head handed to hyper (the simple path: to the whole response
            // written).
            this.stats.request_duration.observe(started.elapsed());
            if let Some(ex) = logged.as_deref_mut() {
                ex.status = resp.status().as_u16();
            }
            Ok(resp.map(|body| ExchangeBody::new(body, state, logged)))
        }
    }

    /// Checks a request and makes it ready to go upstream: a bodyless one as the bytes of
    /// its head (`wire`), one with a body as a request for hyper's client.
    fn prepare(&self, req: Request<Incoming>, state: &ConnState) -> Prepared {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let (mut parts, body) = req.into_parts();
        if let Err(refusal) = validate::request(&parts, validate::MAX_URI) {
            return Prepared::Refused(Box::new(self.refuse(refusal, state)));
        }
        let version = parts.version;
        state
            .http10
            .store(version == Version::HTTP_10, Ordering::Relaxed);
        if version == Version::HTTP_10 && !headers::wants_keep_alive(version, &parts.headers) {
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
        // The headers are rewritten for upstream as the request goes out.
        let client = state.forwarded_for.as_ref();
        let rules = state.rules;
        if body.is_end_stream() {
            let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let mut head = Vec::with_capacity(512);
            let (method, headers) = (&parts.method, &parts.headers);
            wire::encode_request(&mut head, method, target, headers, client, rules);
            let flags = Bodyless {
                head_request: parts.method == Method::HEAD,
                idempotent: is_idempotent(&parts.method),
            };
            return Prepared::Bodyless { head, flags };
        }
        let mut forwarded = http::HeaderMap::with_capacity(parts.headers.len() + 2);
        headers::forward_request(&parts.headers, client, rules, |name, value| {
            forwarded.append(name.clone(), value.clone());
        });
        if body.size_hint().exact().is_none() {
            // A body of unknown length came chunked, and goes on chunked, whatever the method:
            // Transfer-Encoding is hop-by-hop and was left out, and without it hyper's client
            // sends a GET or HEAD with no body at all, dropping the client's bytes.
            forwarded.remove(header::CONTENT_LENGTH);
            forwarded.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        parts.headers = forwarded;
        parts.version = Version::HTTP_11;
        Prepared::WithBody(Box::new(Request::from_parts(parts, body)))
    }

    /// Sends a request without a body (`head`, as written upstream) on a pooled connection
    /// and reads the response head; on failure, the error response.
    // Both outcomes are responses; the error one is rare, so its size costs nothing.
    #[allow(clippy::result_large_err)]
    async fn send_bodyless(
        self: &Arc<Self>,
        head: Vec<u8>,
        flags: Bodyless,
        mut trip: Option<&mut access::Trip>,
    ) -> Result<Answer, Response<RespBody>> {
        let timeout = self.upstream.cfg.response_timeout;
        let asked = trip.is_some().then(Instant::now);
        let (mut lease, reused) = self.checkout().await?;
        let sent = Instant::now();
        if let Some(trip) = trip.as_deref_mut() {
            trip.lent(&lease.server.label, reused, asked.map(|a| sent - a));
        }
        let (untouched, why) = match lease.exchange(&head, flags.head_request, timeout).await {
            Ok(head) => {
                let took = sent.elapsed();
                lease.server.stats.response_head.observe(took);
                if let Some(trip) = trip {
                    trip.head = Some(took);
                }
                return Ok(Answer::new(head, lease));
            }
            Err(Failed::TimedOut) => return Err(self.timed_out(&lease.server)),
            Err(Failed::Broken { untouched, why }) => (untouched, why),
        };
        let server = lease.server.clone();
        drop(lease);
        // An idempotent request that got nothing back on a reused connection met the
        // keep-alive race (the server closed it idle just as the request went out): it is
        // sent again, as the same bytes, on a fresh connection.
        if !(untouched && reused && flags.idempotent) {
            return Err(self.upstream_failed(&server.label, &why));
        }
        tracing::debug!(listener = %self.cfg.name, server = %server.label, error = %why,
            "reused upstream connection failed before a response; retrying on a fresh one");
        server.stats.retries.fetch_add(1, Ordering::Relaxed);
        // To whichever server answers: the one that failed may be gone.
        let asked = trip.is_some().then(Instant::now);
        let (mut lease, _) = self.checkout_with(Reuse::Never).await?;
        let sent = Instant::now();
        if let Some(trip) = trip.as_deref_mut() {
            trip.lent(&lease.server.label, false, asked.map(|a| sent - a));
        }
        match lease.exchange(&head, flags.head_request, timeout).await {
            Ok(head) => {
                let took = sent.elapsed();
                lease.server.stats.response_head.observe(took);
                if let Some(trip) = trip {
                    trip.head = Some(took);
                }
                Ok(Answer::new(head, lease))
            }
            Err(Failed::TimedOut) => Err(self.timed_out(&lease.server)),
            Err(Failed::Broken { why, .. }) => Err(self.upstream_failed(&lease.server.label, &why)),
        }
    }

    /// Sends a request with a body (its headers already rewritten) through hyper's client on
    /// a pooled connection; on failure, the error response. Never replayed: the body is gone
    /// once sent.
    #[allow(clippy::result_large_err)]
    async fn send_with_body(
        self: &Arc<Self>,
        req: Request<Incoming>,
        state: &ConnState,
        mut trip: Option<&mut access::Trip>,
    ) -> Result<Response<UpstreamBody>, Response<RespBody>> {
        let (parts, body) = req.into_parts();
        let (body, sent) = ClientBody::new(body);
        let req = Request::from_parts(parts, body);
        let asked = trip.is_some().then(Instant::now);
        let (lease, reused) = self.checkout().await?;
        let server = lease.server.clone();
        if let (Some(trip), Some(asked)) = (trip.as_deref_mut(), asked) {
            trip.lent(&server.label, reused, Some(asked.elapsed()));
        }
        let (mut tx, verdict) = match lease.hand_to_hyper().await {
            Ok(handed) => handed,
            Err(e) => return Err(self.upstream_failed(&server.label, &e.to_string())),
        };
        let timeout = self.upstream.cfg.response_timeout;
        let started = Instant::now();
        let err = match tokio::time::timeout(timeout, tx.send_request(req)).await {
            Ok(Ok(resp)) => {
                let took = started.elapsed();
                server.stats.response_head.observe(took);
                if let Some(trip) = trip {
                    trip.head = Some(took);
                }
                if let Err(why) = validate::response(resp.status(), resp.headers()) {
                    return Err(self.upstream_failed(&server.label, why));
                }
                let keep_alive = headers::wants_keep_alive(resp.version(), resp.headers());
                let (mut parts, body) = resp.into_parts();
                headers::strip_hop_by_hop(&mut parts.headers);
                let body = UpstreamBody::hyper(body, verdict, keep_alive, sent);
                return Ok(Response::from_parts(parts, body));
            }
            Ok(Err(e)) => e,
            Err(_) => return Err(self.timed_out(&server)),
        };
        if sent.is_failed() {
            // The client's body broke (bad chunk, or it went away mid-body), not the server.
            return Err(self.refuse(validate::BROKEN_BODY, state));
        }
        Err(self.upstream_failed(&server.label, &err.to_string()))
    }

    /// An idle pooled connection, or a new one; servers that refuse are skipped. The flag
    /// says whether the connection carried a request before.
    #[allow(clippy::result_large_err)]
    async fn checkout(&self) -> Result<(Lease, bool), Response<RespBody>> {
        self.checkout_with(Reuse::OwnFirst).await
    }

    /// As `checkout`, taking only what `reuse` allows (a retry wants a fresh connection).
    #[allow(clippy::result_large_err)]
    async fn checkout_with(&self, reuse: Reuse) -> Result<(Lease, bool), Response<RespBody>> {
        connector::get(&self.upstream, reuse, &upstream::HANDSHAKE, &self.cfg.name)
            .await
            .map_err(|e| match e {
                GetError::NoneUp => self.none_up(),
                GetError::Failed { server, error } => self.connect_failed(&server, error),
            })
    }

    /// Every server of the upstream is marked down: 503 at once, no connect attempted.
    fn none_up(&self) -> Response<RespBody> {
        self.stats.errors_busy.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(listener = %self.cfg.name, upstream = %self.upstream.cfg.name,
            "no upstream server is up");
        error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("upstream {}: no server is up", self.upstream.cfg.name),
        )
    }

    /// A request refused by waitless itself: nothing was forwarded (or, for a broken body,
    /// nothing whole), and the client connection closes after the answer, as a refusal.
    fn refuse(&self, refusal: validate::Refusal, state: &ConnState) -> Response<RespBody> {
        state.refused.store(true, Ordering::Relaxed);
        tracing::info!(listener = %self.cfg.name, peer = ?state.client_ip,
            status = refusal.status.as_u16(), reason = refusal.reason, "request refused");
        let mut resp = error_response(refusal.status, refusal.reason);
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        resp
    }

    fn connect_failed(&self, server: &str, e: OpenError<Infallible>) -> Response<RespBody> {
        match e {
            OpenError::Refused(never) => match never {},
            OpenError::Busy => {
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
            OpenError::Io(e) => {
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

    fn timed_out(&self, server: &Server<HttpConn>) -> Response<RespBody> {
        self.stats.errors_timeout.fetch_add(1, Ordering::Relaxed);
        server.health.failed(&self.upstream.cfg);
        let label = &server.label;
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

/// What a client sent already, read without waiting (empty at its EOF, which the next read
/// sees again); None when nothing is there yet. Served from these bytes, a fresh connection
/// skips the readiness wait, and an `EagerTcp` does not join epoll for the request.
fn read_arrived<S: Socket>(io: &mut Tracked<S>) -> Option<Bytes> {
    // Big enough for most request heads; hyper reads the rest from the socket.
    let mut buf = [0u8; 2048];
    let n = io.get_mut().read_now(&mut buf).ok()?;
    if let Some(log) = io.log() {
        log.read(n);
    }
    Some(Bytes::copy_from_slice(buf.get(..n)?))
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
