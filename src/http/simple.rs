//! The simple path: plain HTTP/1.1 GET and HEAD requests, served on the client's socket
//! without hyper's server.
//!
//! Nearly every request a load balancer or a web app sends is one of these: a whole head in
//! one read, a Host, no body, nothing to negotiate. For them hyper's server would parse the
//! head into a map, box a future, dispatch it to the service and encode the response from
//! another map: a quarter of a keep-alive request's instructions. Here the request head is
//! parsed with httparse and written upstream straight from its bytes (hop-by-hop headers
//! out, the client's address in), and the response head is written from the fields of the
//! upstream's as they came (`wire::Head`): no header map is built either way.
//!
//! Anything else goes to hyper with the bytes read so far, before anything was sent: a head
//! not whole in the buffer, another method, HTTP/1.0, a body or its framing headers (or a
//! name with `_` that a CGI-style server reads as one, which hyper's path refuses), Expect,
//! Upgrade, a Connection header naming other headers, a request target or Host this path
//! does not vouch for, anything httparse refuses. hyper then serves it, checks and refusals
//! included, exactly as before; so nothing the checks in `validate` refuse is sent from here.

use std::future::{poll_fn, Future};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Either;
use hyper::body::Body;
use tokio::io::AsyncWriteExt;

use super::upstream::BodyError;
use super::{headers, idle, validate, wire, Answer, Bodyless, HttpListener, RespBody};
use crate::access;
use crate::close::{Ending, Reason, Socket, Tracked};

/// Longest head this path reads before leaving it to hyper (cookies make heads of several
/// KiB; a longer one is rare).
const MAX_HEAD: usize = 16 * 1024;

/// Body bytes up to this size are copied behind the head and go out in the same write.
const COPY_BELOW: usize = 16 * 1024;

/// The response buffer's first capacity: a usual response head and a small body.
const OUT_START: usize = 1024;

/// How a run of the simple path ended.
pub enum Simple<S: Socket> {
    /// The connection ended and was closed by policy (or dropped on an error).
    Over,
    /// No request came for a while: the socket, to wait for its next one cheaply.
    Idle(Tracked<S>),
    /// A request this path does not serve: the socket and the bytes read, for hyper.
    Hyper(Tracked<S>, Bytes),
}

/// A simple request, ready to go upstream.
#[derive(Debug)]
struct Parsed {
    /// Length of its head in the buffer.
    len: usize,
    /// The head as written upstream.
    upstream: Vec<u8>,
    /// HEAD or GET.
    flags: Bodyless,
    /// The client asked to close after the response.
    close: bool,
}

/// How the wait for the next request on a kept-alive connection ended.
enum Next {
    /// Bytes are in the buffer.
    Read,
    /// The client closed.
    Eof,
    /// Nothing came for a while.
    Idle,
    /// The listener drains.
    Stopped,
    /// The socket failed.
    Failed,
}

// === impl HttpListener ===

impl HttpListener {
    /// Serves simple requests, the first from `unread` (or the socket, when it is empty),
    /// until the connection ends, falls idle, or sends a request for hyper.
    pub(super) async fn serve_simple<S: Socket>(
        self: &Arc<Self>,
        mut io: Tracked<S>,
        unread: Bytes,
        peer: Option<SocketAddr>,
    ) -> Simple<S> {
        let mut buf = BytesMut::from(unread);
        let client = headers::forwarded_for(peer.map(|p| p.ip()));
        let rules = headers::Rules {
            drop_underscored: self.cfg.drop_underscore_headers,
            https: S::IS_TLS,
        };
        // Grown from empty, a short connection's one response took six reallocations
        // (1,000 instructions, callgrind).
        let mut out = Vec::with_capacity(OUT_START);
        // One timer for the whole run, moved on once per period rather than per request:
        // the connection is idle once a full period passed without a request.
        let period = self.idle_wait().min(idle::TICK);
        let mut tick = std::pin::pin!(tokio::time::sleep(period));
        let mut stopped = std::pin::pin!(self.stop.cancelled());
        // The listener drains: the connection closes at the next idle period rather than at
        // once, so that a request already on its way (a busy keep-alive client sends its
        // next one as soon as it has a response) is answered, with `Connection: close`,
        // instead of meeting a close.
        let mut stop_seen = false;
        let (mut served, mut at_tick) = (0u32, 0u32);
        loop {
            if buf.is_empty() {
                let next = poll_fn(|cx| {
                    if buf.capacity() < 1024 {
                        buf.reserve(4096);
                    }
                    match tokio_util::io::poll_read_buf(Pin::new(&mut io), cx, &mut buf) {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Next::Eof),
                        Poll::Ready(Ok(_)) => return Poll::Ready(Next::Read),
                        Poll::Ready(Err(_)) => return Poll::Ready(Next::Failed),
                        Poll::Pending => {}
                    }
                    if !stop_seen && stopped.as_mut().poll(cx).is_ready() {
                        stop_seen = true;
                    }
                    while tick.as_mut().poll(cx).is_ready() {
                        if served == at_tick {
                            return Poll::Ready(if stop_seen { Next::Stopped } else { Next::Idle });
                        }
                        at_tick = served;
                        let now = tokio::time::Instant::now();
                        tick.as_mut().reset(now + period);
                    }
                    Poll::Pending
                })
                .await;
                match next {
                    Next::Read => {}
                    Next::Eof => return self.finish(io, Reason::Done).await,
                    // An idle wait shorter than a tick is over; a longer one goes on without
                    // this run's buffers.
                    Next::Idle if self.idle_wait() <= idle::TICK => {
                        return self.finish(io, Reason::Idle).await
                    }
                    Next::Idle => {
                        // Its last request is logged now, not at a close that may be far off.
                        if let Some(log) = io.log() {
                            log.flush();
                        }
                        return Simple::Idle(io);
                    }
                    Next::Stopped => return self.finish(io, Reason::Drain).await,
                    // Dropped: the close mechanism records the error.
                    Next::Failed => return Simple::Over,
                }
            }
            let req = loop {
                if let Some(req) = parse_request(&buf, client.as_ref(), rules) {
                    break req;
                }
                // Only a head that is not simple as it came pays for this, once.
                if lift_minor_version(&mut buf) || encode_target(&mut buf) {
                    continue;
                }
                // A head cut by the read (a big one, or pipelined ones): the rest is usually
                // in the socket already. Otherwise hyper waits for it, under its timeout.
                let cut = buf.len() < MAX_HEAD && !buf.windows(4).any(|w| w == b"\r\n\r\n");
                if !cut || !read_now(&mut io, &mut buf).await {
                    return Simple::Hyper(io, buf.freeze());
                }
            };
            // The access log's view of the request, taken before its bytes go.
            let mut logged = io
                .log()
                .map(|log| (log.clone(), access::Exchange::begin(&buf)));
            buf.advance(req.len);
            let started = tokio::time::Instant::now();
            served = served.wrapping_add(1);
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let trip = logged.as_mut().map(|(_, ex)| &mut ex.trip);
            let reply = self.send_bodyless(req.upstream, req.flags, trip).await;
            if let Some((_, ex)) = logged.as_mut() {
                ex.status = match &reply {
                    Ok(answer) => answer.head.status.as_u16(),
                    Err(resp) => resp.status().as_u16(),
                };
            }
            // A draining listener finishes the response in flight and closes after it.
            let draining = self.stop.is_cancelled();
            let close = req.close || draining;
            let written = write_response(&mut io, reply, req.flags, close, &mut out).await;
            if let Some((log, ex)) = logged {
                log.exchange(ex);
            }
            if let Err(e) = written {
                tracing::debug!(listener = %self.cfg.name, peer = ?peer, error = %e,
                    "client connection error");
                return Simple::Over;
            }
            self.stats.request_duration.observe(started.elapsed());
            if close {
                let reason = if draining {
                    Reason::Drain
                } else {
                    Reason::Done
                };
                return self.finish(io, reason).await;
            }
        }
    }

    async fn finish<S: Socket>(&self, io: Tracked<S>, reason: Reason) -> Simple<S> {
        io.finish_client(Ending::Over(reason)).await;
        Simple::Over
    }
}

// === request ===

/// Reads what the client sent already into `buf`, without waiting; true if bytes came.
async fn read_now<S: Socket>(io: &mut Tracked<S>, buf: &mut BytesMut) -> bool {
    buf.reserve(4096);
    let read =
        poll_fn(|cx| Poll::Ready(tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf)));
    matches!(read.await, Poll::Ready(Ok(n)) if n > 0)
}

/// RFC 9112 §2.3: a request of a later HTTP/1 minor version (`HTTP/1.2` to `HTTP/1.9`) is
/// served as the highest one implemented, 1.1. httparse, and so hyper, take only 1.0 and
/// 1.1: the digit is rewritten in place in the request line at the start of `buf`, before
/// either parses it (no copy, and nothing on the way of a request that parsed as it came).
/// True if it was rewritten; `HTTP/2.0`, `HTTP/0.9` and `HTTP/1.10` are left to be refused.
fn lift_minor_version(buf: &mut [u8]) -> bool {
    let Some(line) = request_line(buf).and_then(|at| buf.get_mut(at)) else {
        return false;
    };
    let Some((minor, before)) = line.split_last_mut() else {
        return false;
    };
    if before.ends_with(b" HTTP/1.") && (b'2'..=b'9').contains(minor) {
        *minor = b'1';
        return true;
    }
    false
}

/// Where the request line is in `buf` (without its CR LF): after the empty lines httparse
/// skips, and no longer than a target may be.
fn request_line(buf: &[u8]) -> Option<std::ops::Range<usize>> {
    let start = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    let rest = buf.get(start..)?;
    let end = rest
        .iter()
        .take(validate::MAX_URI + 64)
        .position(|&b| b == b'\n')?;
    let line = rest.get(..end)?;
    let len = line.len() - usize::from(line.last() == Some(&b'\r'));
    Some(start..start + len)
}

/// Percent-encodes the visible bytes of the request target at the start of `buf` that
/// hyper's URI (the `http` crate's) cannot hold although clients send them raw: `<`, `>` and
/// `` ` `` in the path, `"`, `<` and `>` in the query, each as `%XX`, the form browsers send
/// them in. True if the head was rewritten: a copy, paid only by a head that did not parse
/// as simple and holds one of them. Control bytes and DEL stay, to be refused.
fn encode_target(buf: &mut BytesMut) -> bool {
    let Some(at) = request_line(buf) else {
        return false;
    };
    let start = at.start;
    let Some(line) = buf.get(at) else {
        return false;
    };
    // method SP target SP version
    let (Some(first), Some(last)) = (
        line.iter().position(|&b| b == b' '),
        line.iter().rposition(|&b| b == b' '),
    ) else {
        return false;
    };
    let Some(target) = line.get(first + 1..last) else {
        return false;
    };
    let needs = |in_query: bool, b: u8| match b {
        b'<' | b'>' => true,
        b'`' => !in_query,
        b'"' => in_query,
        _ => false,
    };
    let mut in_query = false;
    let mut any = false;
    for &b in target {
        match b {
            b'#' => break,
            b'?' => in_query = true,
            _ => any |= needs(in_query, b),
        }
    }
    if !any {
        return false;
    }
    let from = start + first + 1;
    let mut out = BytesMut::with_capacity(buf.len() + 3 * target.len());
    out.extend_from_slice(buf.get(..from).unwrap_or_default());
    let (mut in_query, mut in_fragment) = (false, false);
    for &b in target {
        in_fragment |= b == b'#';
        in_query |= b == b'?';
        if !in_fragment && needs(in_query, b) {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            let hex = |n: u8| HEX.get(usize::from(n)).copied().unwrap_or(b'0');
            out.extend_from_slice(&[b'%', hex(b >> 4), hex(b & 0xf)]);
        } else {
            out.extend_from_slice(&[b]);
        }
    }
    out.extend_from_slice(buf.get(from + target.len()..).unwrap_or_default());
    *buf = out;
    true
}

/// The request at the start of `buf` and its head as it goes upstream, if it is simple;
/// `client` is the X-Forwarded-For address, `rules` the listener's and the connection's.
fn parse_request(
    buf: &[u8],
    client: Option<&HeaderValue>,
    rules: headers::Rules,
) -> Option<Parsed> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; wire::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    let method = req.method?;
    let head_request = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return None,
    };
    let target = req.path?;
    if req.version != Some(1) || !is_plain_target(target) {
        return None;
    }
    let mut upstream = Vec::with_capacity(len + 64);
    upstream.extend_from_slice(method.as_bytes());
    upstream.push(b' ');
    upstream.extend_from_slice(target.as_bytes());
    upstream.extend_from_slice(b" HTTP/1.1\r\n");
    let (mut hosts, mut close) = (0, false);
    let mut forwarding = headers::Forwarding::new(client, rules);
    for h in req.headers.iter() {
        let mut lower = [0u8; 24];
        let name = headers::lower(h.name.as_bytes(), &mut lower);
        match name {
            b"host" => {
                hosts += 1;
                if !validate::is_valid_host(h.value) {
                    return None;
                }
            }
            b"connection" => {
                let mut named = headers::Named::default();
                named.note(h.value);
                if !named.others.is_empty() {
                    // It names other fields to drop: hyper's path does that.
                    return None;
                }
                close |= named.close;
            }
            // Framing, negotiation, or a body: hyper's. (A field named `close` is one that
            // `Connection: close` would name: hyper's path drops it.)
            b"content-length" | b"transfer-encoding" | b"expect" | b"upgrade" | b"close" => {
                return None
            }
            // A name a CGI-style server reads as one of those, or as hop-by-hop: hyper's
            // path refuses it.
            b"content_length"
            | b"transfer_encoding"
            | b"keep_alive"
            | b"proxy_connection"
            | b"proxy_authenticate"
            | b"proxy_authorization" => return None,
            _ => {}
        }
        if forwarding.keeps(h.name.as_bytes(), name, h.value) {
            wire::write_field(&mut upstream, h.name.as_bytes(), h.value);
        }
    }
    if hosts != 1 {
        return None;
    }
    forwarding.finish(|name, value| {
        wire::write_field(&mut upstream, name.as_str().as_bytes(), value.as_bytes())
    });
    upstream.extend_from_slice(b"\r\n");
    Some(Parsed {
        len,
        upstream,
        flags: Bodyless {
            head_request,
            idempotent: true,
        },
        close,
    })
}

/// An origin-form target of the characters RFC 3986 allows unescaped, within `MAX_URI`:
/// one that hyper's URI parser and `validate` take as they are, byte for byte.
fn is_plain_target(target: &str) -> bool {
    target.starts_with('/')
        && target.len() <= validate::MAX_URI
        && target
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b))
}

// === response ===

/// Writes a response to the client: its head as hyper's server would for an HTTP/1.1
/// client, then its body, chunked when its length is not known. The first body bytes go
/// out with the head when they are there already.
async fn write_response<S: Socket>(
    io: &mut Tracked<S>,
    reply: Result<Answer, Response<RespBody>>,
    flags: Bodyless,
    close: bool,
    out: &mut Vec<u8>,
) -> Result<(), BodyError> {
    let (framing, mut body) = match reply {
        Ok(answer) => {
            let (head, body) = (answer.head, Either::Left(answer.body));
            let fields = Fields::Upstream(&head);
            (
                encode_head(out, head.status, fields, &body, flags, close),
                body,
            )
        }
        Err(resp) => {
            let (parts, body) = resp.into_parts();
            let fields = Fields::Ours(&parts.headers);
            (
                encode_head(out, parts.status, fields, &body, flags, close),
                body,
            )
        }
    };
    if framing == Out::None {
        // Dropped unread: a wire body with nothing left gives its connection back.
        drop(body);
        return flush_last(io, out, close).await;
    }
    loop {
        let polled = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
        let frame = match polled {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                // Nothing more for now: what is ready goes out while the body comes.
                flush(io, out).await?;
                poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        let Some(frame) = frame.transpose()? else {
            break;
        };
        // Trailers are dropped, as hyper's server drops them for a client that did not
        // ask with `TE: trailers`.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if framing == Out::Chunked {
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        }
        if data.len() < COPY_BELOW {
            out.extend_from_slice(&data);
        } else {
            flush(io, out).await?;
            io.write_all(&data).await?;
        }
        if framing == Out::Chunked {
            out.extend_from_slice(b"\r\n");
        }
        if out.len() >= COPY_BELOW {
            // Many small pieces in a row: they go out in writes of a fair size.
            flush(io, out).await?;
        }
    }
    if framing == Out::Chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    flush_last(io, out, close).await
}

/// Where a response head's fields come from.
#[derive(Clone, Copy)]
enum Fields<'a> {
    /// The upstream's head, as it came.
    Upstream(&'a wire::Head),
    /// A response of waitless's own (an error).
    Ours(&'a HeaderMap),
}

/// How a response body goes to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// Not at all: HEAD, 1xx, 204, 304.
    None,
    /// As it comes, delimited by Content-Length.
    Sized,
    /// In chunks: its length is not known.
    Chunked,
}

/// Writes the response head into `out` (emptied first) by hyper's server rules: a body of
/// known length gets Content-Length (an empty one `0`, but for HEAD), an unknown one
/// chunked, a response without Date the current one, and a last one `Connection: close`.
fn encode_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    fields: Fields<'_>,
    body: &RespBody,
    flags: Bodyless,
    close: bool,
) -> Out {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
    // As hyper's server: these statuses carry no length of their own.
    let no_length = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    fields.write(out, no_length);
    let framing = if fields.has_length() || no_length {
        Out::Sized
    } else {
        match body.size_hint().exact() {
            Some(0) if flags.head_request => Out::Sized,
            Some(n) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(n.to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
                Out::Sized
            }
            None if flags.head_request => Out::Sized,
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Out::Chunked
            }
        }
    };
    if !fields.has_date() {
        out.extend_from_slice(b"date: ");
        date::extend(out);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if flags.head_request || no_length {
        Out::None
    } else {
        framing
    }
}

// === impl Fields ===

impl Fields<'_> {
    /// Writes each field on its line; `skip_length` leaves out Content-Length.
    fn write(self, out: &mut Vec<u8>, skip_length: bool) {
        match self {
            Fields::Upstream(head) => head.write_fields(out, skip_length),
            Fields::Ours(map) => {
                for (name, value) in map {
                    if skip_length && name == header::CONTENT_LENGTH {
                        continue;
                    }
                    wire::write_field(out, name.as_str().as_bytes(), value.as_bytes());
                }
            }
        }
    }

    fn has_length(self) -> bool {
        match self {
            Fields::Upstream(head) => head.has_length,
            Fields::Ours(map) => map.contains_key(header::CONTENT_LENGTH),
        }
    }

    fn has_date(self) -> bool {
        match self {
            Fields::Upstream(head) => head.has_date,
            Fields::Ours(map) => map.contains_key(header::DATE),
        }
    }
}

/// Writes out what `out` holds and empties it.
/// The response's last bytes; on a connection that closes after it, through the close
/// mechanism (`Tracked::write_last`), which may send its FIN with them.
async fn flush_last<S: Socket>(
    io: &mut Tracked<S>,
    out: &mut Vec<u8>,
    close: bool,
) -> Result<(), BodyError> {
    if !close {
        return flush(io, out).await;
    }
    io.write_last(out).await?;
    out.clear();
    Ok(())
}

async fn flush<S: Socket>(io: &mut Tracked<S>, out: &mut Vec<u8>) -> Result<(), BodyError> {
    if !out.is_empty() {
        io.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// The Date header's value, formatted once a second per worker thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        /// The second it was formatted for, and its text.
        static NOW: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }

    /// Appends the current date, as an HTTP-date.
    pub fn extend(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        NOW.with_borrow_mut(|(at, text)| {
            if *at != secs || text.is_empty() {
                *at = secs;
                *text = httpdate::fmt_http_date(now);
            }
            out.extend_from_slice(text.as_bytes());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(raw: &str, client: Option<&str>) -> Option<(String, Parsed)> {
        let ip = headers::forwarded_for(client.map(|c| c.parse().unwrap()));
        let parsed = parse_request(raw.as_bytes(), ip.as_ref(), Default::default())?;
        Some((String::from_utf8(parsed.upstream.clone()).unwrap(), parsed))
    }

    #[test]
    fn a_simple_request_goes_upstream_without_its_hop_by_hop_headers() {
        let raw = "GET /a?b=1 HTTP/1.1\r\nHost: x:80\r\nConnection: Keep-Alive, close\r\n\
                   Keep-Alive: 5\r\nTE: trailers\r\nProxy-Authorization: s\r\n\
                   X-Forwarded-For: 10.0.0.1\r\nAccept: */*\r\n\r\nGET /next";
        let (head, parsed) = upstream(raw, Some("127.0.0.1")).unwrap();
        assert_eq!(
            head,
            "GET /a?b=1 HTTP/1.1\r\nHost: x:80\r\nAccept: */*\r\n\
             x-forwarded-for: 10.0.0.1, 127.0.0.1\r\nx-forwarded-proto: http\r\n\r\n"
        );
        assert!(parsed.close);
        assert_eq!(parsed.len, raw.len() - "GET /next".len());
        // A proto set in front stays, and without a client address the chain is untouched.
        let raw = "HEAD / HTTP/1.1\r\nhost: x\r\nX-Forwarded-Proto: https\r\n\
                   X-Forwarded-For: 10.0.0.1\r\n\r\n";
        let (head, parsed) = upstream(raw, None).unwrap();
        assert_eq!(
            head,
            "HEAD / HTTP/1.1\r\nhost: x\r\nX-Forwarded-Proto: https\r\n\
             X-Forwarded-For: 10.0.0.1\r\n\r\n"
        );
        assert!(parsed.flags.head_request && !parsed.close);
    }

    #[test]
    fn anything_but_a_plain_bodyless_request_is_left_to_hyper() {
        for raw in [
            "GET / HTTP/1.1\r\nHost: x\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a@x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: x-secret\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nClose: 1\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET * HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /{x} HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nX-A: \x01\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\ncontent_length: 5\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nProxy_Connection: close\r\n\r\n",
        ] {
            assert!(upstream(raw, None).is_none(), "{raw:?}");
        }
        let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(8192));
        assert!(upstream(&long, None).is_none());
    }

    #[test]
    fn underscored_names_pass_unless_the_listener_drops_them() {
        let raw = b"GET / HTTP/1.1\r\nHost: x\r\nX_Api_Key: 1\r\nX-A: 2\r\n\r\n";
        let kept = parse_request(raw, None, Default::default()).unwrap();
        let kept = String::from_utf8(kept.upstream).unwrap();
        assert!(kept.contains("X_Api_Key: 1\r\n"), "{kept}");
        let drop = headers::Rules {
            drop_underscored: true,
            https: false,
        };
        let dropped = parse_request(raw, None, drop).unwrap();
        let dropped = String::from_utf8(dropped.upstream).unwrap();
        assert!(!dropped.contains("X_Api_Key"), "{dropped}");
        assert!(dropped.contains("X-A: 2\r\n"), "{dropped}");
    }

    #[test]
    fn later_http1_minor_versions_are_rewritten_as_1_1_and_nothing_else() {
        for (raw, want) in [
            (
                "GET / HTTP/1.2\r\nHost: x\r\n\r\n",
                Some("GET / HTTP/1.1\r\n"),
            ),
            ("\r\nPOST /a HTTP/1.9\r\n", Some("\r\nPOST /a HTTP/1.1\r\n")),
            ("GET / HTTP/1.2\n", Some("GET / HTTP/1.1\n")),
            ("GET / HTTP/1.1\r\n", None),
            ("GET / HTTP/1.0\r\n", None),
            ("GET / HTTP/2.0\r\n", None),
            ("GET / HTTP/0.9\r\n", None),
            ("GET / HTTP/1.10\r\n", None),
            ("GET / HTTP/1.2", None),
            ("GET /HTTP/1.2\r\n", None),
            ("GET / HTTP/1.1\r\nX-A: HTTP/1.2\r\n\r\n", None),
        ] {
            let mut buf = raw.as_bytes().to_vec();
            let lifted = lift_minor_version(&mut buf);
            assert_eq!(lifted, want.is_some(), "{raw:?}");
            if let Some(want) = want {
                assert!(buf.starts_with(want.as_bytes()), "{raw:?}");
                assert_eq!(buf.len(), raw.len());
            } else {
                assert_eq!(buf, raw.as_bytes());
            }
        }
    }

    #[test]
    fn targets_get_the_bytes_hyper_cannot_hold_percent_encoded_and_nothing_else() {
        for (raw, want) in [
            (
                "GET /a?b=\"c\" HTTP/1.1\r\n",
                Some("GET /a?b=%22c%22 HTTP/1.1\r\n"),
            ),
            (
                "GET /<a>`?<\"`> HTTP/1.2\r\nX: <\r\n",
                Some("GET /%3Ca%3E%60?%3C%22`%3E HTTP/1.2\r\nX: <\r\n"),
            ),
            ("\r\nGET /a#\"<\" HTTP/1.1\r\n", None),
            ("GET /\"a\"{} HTTP/1.1\r\n", None),
            ("GET /a\x01b HTTP/1.1\r\n", None),
            ("GET /a?b HTTP/1.1\r\nX-A: \"<>\"\r\n", None),
            ("GET /a<b", None),
        ] {
            let mut buf = BytesMut::from(raw);
            let encoded = encode_target(&mut buf);
            assert_eq!(encoded, want.is_some(), "{raw:?}");
            assert_eq!(&buf[..], want.unwrap_or(raw).as_bytes(), "{raw:?}");
        }
        // What it gives is a URI hyper's parser takes.
        let mut buf = BytesMut::from("GET /<a>`?<\"`> HTTP/1.1\r\n");
        assert!(encode_target(&mut buf));
        let target = std::str::from_utf8(&buf[4..buf.len() - 11]).unwrap();
        assert!(target.parse::<http::Uri>().is_ok(), "{target}");
    }

    #[test]
    fn what_the_simple_path_takes_hyper_and_validate_would_take_too() {
        // Mutated heads: whatever this path serves itself must be a request hyper's parser
        // accepts as it is and `validate` lets through; it must never panic on any of them.
        use rand::{Rng, SeedableRng};
        let seeds = [
            &b"GET /a/b?c=d&e=%20 HTTP/1.1\r\nHost: x.example:8080\r\nAccept: */*\r\n\r\n"[..],
            b"HEAD / HTTP/1.1\r\nhost: [::1]:80\r\nConnection: close\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
        ];
        let alphabet = b" \t\r\n:/@?#%{}[]\"<>\\^`|,;=!*'()~aZ09\x00\x01\x7f\x80\xff";
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut taken = 0;
        for _ in 0..200_000 {
            let mut raw = seeds[rng.random_range(0..seeds.len())].to_vec();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..raw.len());
                let b = alphabet[rng.random_range(0..alphabet.len())];
                match rng.random_range(0..3) {
                    0 => raw[at] = b,
                    1 => raw.insert(at, b),
                    _ => drop(raw.remove(at)),
                }
            }
            let Some(parsed) = parse_request(&raw, None, Default::default()) else {
                continue;
            };
            taken += 1;
            let mut slots = [httparse::EMPTY_HEADER; wire::MAX_HEADERS];
            let mut req = httparse::Request::new(&mut slots);
            assert!(req.parse(&raw).unwrap().is_complete());
            let mut builder = http::Request::builder()
                .method(req.method.unwrap())
                .uri(req.path.unwrap());
            for h in req.headers.iter() {
                builder = builder.header(h.name, h.value);
            }
            let (parts, ()) = builder
                .body(())
                .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&raw)))
                .into_parts();
            assert_eq!(
                parts.uri.path_and_query().unwrap().as_str(),
                req.path.unwrap()
            );
            assert!(
                validate::request(&parts, validate::MAX_URI).is_ok(),
                "{:?}",
                String::from_utf8_lossy(&raw)
            );
            assert!(parsed.len <= raw.len());
        }
        assert!(taken > 1000, "only {taken} mutants taken");
    }

    fn head(status: u16, headers: &[(&str, &str)], body: RespBody, head: bool) -> (String, Out) {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            let name = http::HeaderName::from_bytes(n.as_bytes()).unwrap();
            map.append(name, HeaderValue::from_str(v).unwrap());
        }
        let flags = Bodyless {
            head_request: head,
            idempotent: true,
        };
        let mut out = Vec::new();
        let status = StatusCode::from_u16(status).unwrap();
        let framing = encode_head(&mut out, status, Fields::Ours(&map), &body, flags, false);
        (String::from_utf8(out).unwrap(), framing)
    }

    #[test]
    fn response_heads_are_framed_as_hyper_frames_them() {
        let full = |s: &'static str| Either::Right(http_body_util::Full::new(Bytes::from(s)));
        let date = [("date", "d")];
        let (text, out) = head(502, &date, full("oops"), false);
        assert_eq!(
            text,
            "HTTP/1.1 502 Bad Gateway\r\ndate: d\r\ncontent-length: 4\r\n\r\n"
        );
        assert_eq!(out, Out::Sized);
        // HEAD keeps the length of what GET would get, and no body goes out.
        let (text, out) = head(200, &date, full("oops"), true);
        assert!(text.contains("content-length: 4\r\n"), "{text}");
        assert_eq!(out, Out::None);
        // 304 carries no length of its own; a head without Date gets one.
        let (text, out) = head(304, &[("content-length", "9")], full(""), false);
        assert!(!text.contains("content-length"), "{text}");
        assert!(text.contains("\r\ndate: "), "{text}");
        assert_eq!(out, Out::None);
    }
}
