//! Hostile HTTP input, checked from outside: the status each malformed or smuggling request
//! gets, whether waitless closed the client connection, and every byte a raw TCP backend
//! received — nothing of a refused request may reach it, and after each hostile case the
//! next clients get their own responses.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------
// A raw backend that records every byte

/// What one backend connection received.
#[derive(Debug, Default, Clone)]
struct ConnLog {
    /// Every byte, in order.
    bytes: Vec<u8>,
    /// The request lines of the requests it parsed whole.
    requests: Vec<String>,
    /// Their bodies, as the server decoded them.
    bodies: Vec<Vec<u8>>,
    /// The peer closed (or broke) the connection.
    ended: bool,
    /// It ended inside a request (head or body incomplete).
    ended_mid_request: bool,
}

/// A hand-written HTTP/1.1 server on loopback: it records every byte of every connection
/// and answers each request with `path=<its path>`, except under `/evil/` where it sends
/// malformed responses and `/early/` where it answers before reading the body. It frames
/// requests as CGI-style servers do, reading `_` in a header name as `-`
/// (`Transfer_Encoding` is Transfer-Encoding to it): what waitless lets through must frame
/// alike for such a server too.
struct Recorder {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<ConnLog>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let conns: Arc<Mutex<Vec<ConnLog>>> = Arc::default();
        let all = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let id = {
                    let mut all = all.lock().unwrap();
                    all.push(ConnLog::default());
                    all.len() - 1
                };
                tokio::spawn(serve_raw(s, id, all.clone()));
            }
        });
        Recorder { addr, conns, task }
    }

    /// Every byte received so far, all connections together.
    fn all_bytes(&self) -> Vec<u8> {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .flat_map(|c| c.bytes.clone())
            .collect()
    }

    fn total_bytes(&self) -> usize {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.bytes.len())
            .sum()
    }

    fn snapshot(&self) -> Vec<ConnLog> {
        self.conns.lock().unwrap().clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_raw(mut s: TcpStream, id: usize, log: Arc<Mutex<Vec<ConnLog>>>) {
    let mut buf: Vec<u8> = Vec::new();
    let end = |mid: bool| {
        let mut all = log.lock().unwrap();
        all[id].ended = true;
        all[id].ended_mid_request = mid;
    };
    loop {
        // The head.
        let head_len = loop {
            if let Some(at) = find(&buf, b"\r\n\r\n") {
                break at + 4;
            }
            if !read_more(&mut s, &mut buf, id, &log).await {
                return end(!buf.is_empty());
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
        buf.drain(..head_len);
        let line = head.lines().next().unwrap_or_default().to_string();
        let path = line.split(' ').nth(1).unwrap_or("/").to_string();
        let lower = head.to_ascii_lowercase();
        let header = |name: &str| {
            lower.lines().skip(1).find_map(|l| {
                let (field, value) = l.split_once(':')?;
                (field.replace('_', "-") == name).then(|| value.trim().to_string())
            })
        };
        let mut body = Vec::new();
        let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);

        if path.starts_with("/early/") {
            let _ = s.write_all(&ok_response(&path)).await;
        }
        // The body.
        if chunked {
            loop {
                let line_end = loop {
                    if let Some(at) = find(&buf, b"\r\n") {
                        break at;
                    }
                    if !read_more(&mut s, &mut buf, id, &log).await {
                        return end(true);
                    }
                };
                let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
                let size = usize::from_str_radix(size_text.split(';').next().unwrap_or(""), 16)
                    .unwrap_or(0);
                buf.drain(..line_end + 2);
                if size == 0 {
                    // Trailers, then the blank line.
                    loop {
                        if let Some(at) = find(&buf, b"\r\n") {
                            let blank = at == 0;
                            buf.drain(..at + 2);
                            if blank {
                                break;
                            }
                            continue;
                        }
                        if !read_more(&mut s, &mut buf, id, &log).await {
                            return end(true);
                        }
                    }
                    break;
                }
                while buf.len() < size + 2 {
                    if !read_more(&mut s, &mut buf, id, &log).await {
                        return end(true);
                    }
                }
                body.extend_from_slice(&buf[..size]);
                buf.drain(..size + 2);
            }
        } else {
            while buf.len() < length {
                if !read_more(&mut s, &mut buf, id, &log).await {
                    return end(true);
                }
            }
            body.extend_from_slice(&buf[..length]);
            buf.drain(..length);
        }
        {
            let mut all = log.lock().unwrap();
            all[id].requests.push(line.clone());
            all[id].bodies.push(body);
        }

        if path.starts_with("/early/") {
            continue;
        }
        let reply = match path.as_str() {
            "/evil/two-cl" => {
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec()
            }
            "/evil/signed-cl" => b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello".to_vec(),
            "/evil/te-and-cl" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\
                Content-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
            "/evil/te-gzip" => {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nnot really gzip".to_vec()
            }
            "/evil/bad-chunk" => {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
                    .to_vec()
            }
            "/evil/short-body" => b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello".to_vec(),
            // One request, two responses: the second would answer somebody else's request.
            "/evil/two-responses" => {
                let mut r = ok_response("/evil/two-responses");
                r.extend_from_slice(&ok_response("/not-yours"));
                r
            }
            // The head alone: a response to HEAD has no body.
            _ if line.starts_with("HEAD ") => {
                let mut r = ok_response(&path);
                let head_end = find(&r, b"\r\n\r\n").unwrap() + 4;
                r.truncate(head_end);
                r
            }
            _ => ok_response(&path),
        };
        if s.write_all(&reply).await.is_err() {
            return end(false);
        }
        if path == "/evil/te-gzip" || path == "/evil/short-body" {
            // Close-delimited or cut short: the server hangs up.
            return end(false);
        }
    }
}

fn ok_response(path: &str) -> Vec<u8> {
    let body = format!("path={path}");
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn read_more(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    id: usize,
    log: &Arc<Mutex<Vec<ConnLog>>>,
) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    match s.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            log.lock().unwrap()[id].bytes.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------
// A raw client

/// What a client got for raw request bytes.
#[derive(Debug)]
struct Outcome {
    /// The status of the first response, if any.
    status: Option<u16>,
    /// Everything received.
    raw: Vec<u8>,
    /// waitless closed the connection (EOF or RST) after the response.
    closed: bool,
}

/// Sends `req` on a new connection and reads what comes back: the response, then whether
/// waitless closes the connection within `wait`.
async fn exchange(addr: SocketAddr, req: &[u8], wait: Duration) -> Outcome {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // A refused request may be cut off by the close before it was all written.
    let _ = s.write_all(req).await;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + wait;
    let closed = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => raw.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    let status = std::str::from_utf8(raw.get(9..12).unwrap_or_default())
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|_| raw.starts_with(b"HTTP/1."));
    Outcome {
        status,
        raw,
        closed,
    }
}

/// waitless with one http listener that closes first (so a refused client sees EOF at once).
async fn proxy_for(backend: &Recorder) -> Waitless {
    Waitless::start(&[backend.addr], "time_wait = \"proxy\"", "pool_size = 4").await
}

/// The hostile requests: each is refused with one of `statuses`, the connection closed,
/// and none of its bytes reaches the backend.
fn refused_cases() -> Vec<(&'static str, Vec<u8>, &'static [u16])> {
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(70_000));
    let big_head = format!(
        "GET / HTTP/1.1\r\nHost: t\r\n{}\r\n",
        (0..90)
            .map(|i| format!("X-Filler-{i}: {}\r\n", "v".repeat(1000)))
            .collect::<String>()
    );
    let many_headers = format!(
        "GET / HTTP/1.1\r\nHost: t\r\n{}\r\n",
        (0..150)
            .map(|i| format!("X-H{i}: 1\r\n"))
            .collect::<String>()
    );
    let b = |s: &str| s.as_bytes().to_vec();
    vec![
        ("no request target", b("GET\r\nHost: t\r\n\r\n"), &[400]),
        ("HTTP/0.9 request line", b("GET /\r\n\r\n"), &[400]),
        ("extra request line word", b("GET / HTTP/1.1 x\r\nHost: t\r\n\r\n"), &[400]),
        ("double space in request line", b("GET  / HTTP/1.1\r\nHost: t\r\n\r\n"), &[400]),
        ("method with a bad char", b("G(T / HTTP/1.1\r\nHost: t\r\n\r\n"), &[400]),
        ("NUL in method", b("GE\0T / HTTP/1.1\r\nHost: t\r\n\r\n"), &[400]),
        ("space in target", b("GET /a b HTTP/1.1\r\nHost: t\r\n\r\n"), &[400]),
        ("HTTP/9.9", b("GET / HTTP/9.9\r\nHost: t\r\n\r\n"), &[400]),
        ("HTTP/2.0 as text", b("GET / HTTP/2.0\r\nHost: t\r\n\r\n"), &[400]),
        ("HTTP/1.10 (two minor digits)", b("GET / HTTP/1.10\r\nHost: t\r\n\r\n"), &[400]),
        ("lowercase http/1.1", b("GET / http/1.1\r\nHost: t\r\n\r\n"), &[400]),
        ("header without colon", b("GET / HTTP/1.1\r\nHost: t\r\nBadHeader\r\n\r\n"), &[400]),
        ("space before colon", b("GET / HTTP/1.1\r\nHost : t\r\n\r\n"), &[400]),
        (
            "space before colon in Content-Length",
            b("POST / HTTP/1.1\r\nHost: t\r\nContent-Length : 5\r\n\r\nhello"),
            &[400],
        ),
        ("NUL in header value", b("GET / HTTP/1.1\r\nHost: t\r\nX-A: a\0b\r\n\r\n"), &[400]),
        ("control byte in header value", b("GET / HTTP/1.1\r\nHost: t\r\nX-A: a\x01b\r\n\r\n"), &[400]),
        ("DEL in header value", b("GET / HTTP/1.1\r\nHost: t\r\nX-A: a\x7fb\r\n\r\n"), &[400]),
        ("control byte in target", b("GET /a\x01b HTTP/1.1\r\nHost: t\r\n\r\n"), &[400]),
        ("bare CR in header value", b("GET / HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n\r\n"), &[400]),
        ("bad char in header name", b("GET / HTTP/1.1\r\nHost: t\r\nX(A): 1\r\n\r\n"), &[400]),
        ("obs-fold", b("GET / HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b\r\n\r\n"), &[400]),
        (
            "two differing Content-Length",
            b("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
            &[400],
        ),
        (
            "Content-Length list",
            b("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 6\r\n\r\nhello!"),
            &[400],
        ),
        ("signed Content-Length", b("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: +5\r\n\r\nhello"), &[400]),
        ("negative Content-Length", b("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n"), &[400]),
        ("hex Content-Length", b("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0x5\r\n\r\nhello"), &[400]),
        (
            "overflowing Content-Length",
            b("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            &[400],
        ),
        ("Transfer-Encoding: gzip", b("POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nhello"), &[400]),
        (
            "Transfer-Encoding: chunked, gzip",
            b("POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            &[400],
        ),
        (
            "Transfer-Encoding: gzip, chunked",
            b("POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            &[501],
        ),
        (
            "Transfer-Encoding: chunked, chunked",
            b("POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            &[400],
        ),
        (
            "Transfer-Encoding lines gzip then chunked",
            b("POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            &[501],
        ),
        (
            "Transfer-Encoding: xchunked",
            b("POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            &[400],
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            b("POST / HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            &[400],
        ),
        (
            "Transfer-Encoding with space before colon",
            b("POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            &[400],
        ),
        (
            "Transfer_Encoding hiding a request",
            b("POST /foo/bar HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"),
            &[400],
        ),
        (
            "Content_Length",
            b("POST / HTTP/1.1\r\nHost: t\r\nContent_Length: 1000\r\n\r\nhello"),
            &[400],
        ),
        (
            "GET with transfer_encoding",
            b("GET / HTTP/1.1\r\nHost: t\r\ntransfer_encoding: chunked\r\n\r\n0\r\n\r\n"),
            &[400],
        ),
        ("GET with Keep_Alive", b("GET / HTTP/1.1\r\nHost: t\r\nKeep_Alive: 300\r\n\r\n"), &[400]),
        (
            "GET with Proxy_Authorization",
            b("GET / HTTP/1.1\r\nHost: t\r\nProxy_Authorization: x\r\n\r\n"),
            &[400],
        ),
        ("HTTP/1.1 without Host", b("GET / HTTP/1.1\r\n\r\n"), &[400]),
        ("two Host headers", b("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), &[400]),
        ("Host with a space", b("GET / HTTP/1.1\r\nHost: a b\r\n\r\n"), &[400]),
        ("Host with userinfo", b("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n"), &[400]),
        ("absolute form with userinfo", b("GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n"), &[400]),
        ("absolute form without Host", b("GET http://a/ HTTP/1.1\r\n\r\n"), &[400]),
        ("authority form for GET", b("GET a:80 HTTP/1.1\r\nHost: a\r\n\r\n"), &[400]),
        ("asterisk form for GET", b("GET * HTTP/1.1\r\nHost: a\r\n\r\n"), &[400]),
        ("CONNECT", b("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"), &[501]),
        // Over the head limit too: hyper's buffer fills before the request line is whole.
        ("request target of 70 KB", long_target.into_bytes(), &[431]),
        ("request target of 10 KiB", format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(10_000)).into_bytes(), &[414]),
        ("header block over the limit", big_head.into_bytes(), &[431]),
        ("more than 100 headers", many_headers.into_bytes(), &[431]),
    ]
}

/// `n` normal requests at once, each on its own connection: every body must name its own
/// path, so no client gets a response meant for another request; and each arrived at the
/// backend at a request boundary, on whichever pooled connection it went (none was
/// swallowed as a body, or read as the tail of a request before it).
async fn next_clients_get_their_own(backend: &Recorder, proxy: &Waitless, tag: &str, n: usize) {
    let tag = tag.replace(|c: char| !c.is_ascii_alphanumeric(), "-");
    let mut tasks = Vec::new();
    for i in 0..n {
        let (addr, path) = (proxy.addr(), format!("/after/{tag}/{i}"));
        tasks.push(tokio::spawn(async move {
            let got = tokio::time::timeout(Duration::from_secs(5), get(addr, &path, false)).await;
            (path, got)
        }));
    }
    for t in tasks {
        let (path, got) = t.await.expect("client task");
        match got {
            Ok(Ok((200, body))) => assert_eq!(
                String::from_utf8_lossy(&body),
                format!("path={path}"),
                "a client got someone else's response after {tag}"
            ),
            other => panic!("after {tag}: {path} got {other:?}"),
        }
    }
    at_request_boundaries(backend, &format!("/after/{tag}/"));
}

/// Every request for a path starting with `prefix` that reached the backend, on every
/// connection, was read by it as a request of its own: its request line is one the server
/// parsed as such.
fn at_request_boundaries(backend: &Recorder, prefix: &str) {
    for (i, c) in backend.snapshot().iter().enumerate() {
        let text = String::from_utf8_lossy(&c.bytes);
        let sent = text.matches(&format!("GET {prefix}")).count();
        let parsed = c
            .requests
            .iter()
            .filter(|r| r.starts_with(&format!("GET {prefix}")))
            .count();
        assert_eq!(
            sent, parsed,
            "backend connection {i}: {sent} requests for {prefix} arrived, {parsed} read as \
             requests: {c:?}"
        );
    }
}

/// The backend connections whose requests include `path`.
fn conns_that_saw(backend: &Recorder, path: &str) -> Vec<ConnLog> {
    backend
        .snapshot()
        .into_iter()
        .filter(|c| String::from_utf8_lossy(&c.bytes).contains(path))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Requests refused before anything is forwarded

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_closed_and_never_reach_the_backend() {
    let backend = Recorder::start().await;
    let proxy = proxy_for(&backend).await;
    println!("{:<45} {:>6} {:>7}", "case", "status", "closed");
    for (name, req, statuses) in refused_cases() {
        let before = backend.total_bytes();
        let out = exchange(proxy.addr(), &req, Duration::from_secs(3)).await;
        println!(
            "{name:<45} {:>6} {:>7}",
            out.status.map_or("-".into(), |s| s.to_string()),
            out.closed
        );
        assert!(
            out.status.is_some_and(|s| statuses.contains(&s)),
            "{name}: expected one of {statuses:?}, got {:?}",
            String::from_utf8_lossy(&out.raw)
        );
        assert!(out.closed, "{name}: the client connection stayed open");
        // Nothing of the refused request reached the backend, then or later.
        settle().await;
        assert_eq!(
            backend.total_bytes(),
            before,
            "{name}: the backend received {:?}",
            String::from_utf8_lossy(&backend.all_bytes()[before..])
        );
        next_clients_get_their_own(&backend, &proxy, name, 4).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_with_both_lengths_is_read_as_chunked_and_the_connection_closed() {
    let backend = Recorder::start().await;
    let proxy = proxy_for(&backend).await;
    let cases: [(&str, &[u8]); 2] = [
        (
            "/cl-te",
            b"POST /cl-te HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n",
        ),
        (
            "/te-cl",
            b"POST /te-cl HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n",
        ),
    ];
    for (path, req) in cases {
        let out = exchange(proxy.addr(), req, Duration::from_secs(3)).await;
        let text = String::from_utf8_lossy(&out.raw).into_owned();
        assert_eq!(out.status, Some(200), "{path}: {text}");
        assert!(text.ends_with(&format!("path={path}")), "{path}: {text}");
        assert!(
            out.closed,
            "{path}: the connection stayed open after an ambiguous request"
        );
        settle().await;
        let seen = String::from_utf8_lossy(&backend.all_bytes()).to_ascii_lowercase();
        assert!(
            !seen.contains("/smuggled"),
            "{path}: the backend saw {seen}"
        );
        assert!(
            !seen.contains("content-length"),
            "{path}: the backend saw {seen}"
        );
        let line = format!("POST {path} HTTP/1.1");
        let times: usize = backend
            .snapshot()
            .iter()
            .map(|c| c.requests.iter().filter(|r| **r == line).count())
            .sum();
        assert_eq!(times, 1, "{path}: forwarded {times} times");
        next_clients_get_their_own(&backend, &proxy, path, 4).await;
    }
}

// ---------------------------------------------------------------------------------------
// Request bodies that break after the head went upstream

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_request_bodies_get_400_and_their_upstream_connection_is_closed() {
    let backend = Recorder::start().await;
    let proxy = proxy_for(&backend).await;
    let chunked = "Transfer-Encoding: chunked\r\n\r\n";
    let cases: Vec<(&str, String, bool)> = vec![
        // The corpus's case: the data runs into the next size line.
        ("/chunk-runs-on", format!("{chunked}5\r\nABCDE0\r\n"), false),
        (
            "/bad-chunk",
            format!("{chunked}zz\r\nhello\r\n0\r\n\r\n"),
            false,
        ),
        (
            "/negative-chunk",
            format!("{chunked}5\r\nhello\r\n-1\r\nx\r\n0\r\n\r\n"),
            false,
        ),
        (
            "/chunk-overflow",
            format!("{chunked}fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
            false,
        ),
        (
            "/chunk-no-crlf",
            format!("{chunked}5\r\nhelloXX0\r\n\r\n"),
            false,
        ),
        // The client stops mid-body (sends FIN).
        (
            "/truncated",
            "Content-Length: 100\r\n\r\nhello".to_string(),
            true,
        ),
        (
            "/truncated-chunked",
            format!("{chunked}5\r\nhello\r\n"),
            true,
        ),
    ];
    // A GET's body is caught as early as a POST's (it was forwarded bodiless, and the bad
    // chunk noticed after the response).
    let cases = ["POST", "GET"].into_iter().flat_map(|method| {
        cases
            .iter()
            .map(move |(path, rest, fin)| (method, format!("/{method}{path}"), rest, *fin))
    });
    for (method, path, rest, fin) in cases {
        let path = path.as_str();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: t\r\n{rest}").as_bytes())
            .await
            .unwrap();
        if fin {
            s.shutdown().await.unwrap();
        }
        let mut raw = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await;
        assert!(read.is_ok(), "{path}: the client connection stayed open");
        let text = String::from_utf8_lossy(&raw);
        if !fin {
            assert!(text.starts_with("HTTP/1.1 400"), "{path}: {text}");
        }
        settle().await;
        // The backend got an incomplete request, never a whole one, and the connection it
        // came on was closed, not pooled.
        // (A body that breaks in its first chunk stops hyper before the head is written.)
        for c in conns_that_saw(&backend, path) {
            assert!(
                !c.requests.iter().any(|r| r.contains(path)),
                "{path}: the backend got a whole request: {c:?}"
            );
            assert!(
                c.ended && c.ended_mid_request,
                "{path}: connection left open: {c:?}"
            );
        }
        next_clients_get_their_own(&backend, &proxy, path, 4).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_before_the_whole_request_body_does_not_pool_the_connection() {
    let backend = Recorder::start().await;
    let proxy = proxy_for(&backend).await;
    // The server answers as soon as it has the head; the client sends 5 of 100 body bytes
    // and then nothing more, for as long as the test runs.
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"POST /early/1 HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nhello")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("early response")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).ends_with("path=/early/1"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // The connection still owes the server 95 bytes: no other request may go on it (nor
    // wait for it).
    next_clients_get_their_own(&backend, &proxy, "early", 8).await;
    let early = conns_that_saw(&backend, "POST /early/1 ");
    assert_eq!(early.len(), 1);
    assert!(
        !String::from_utf8_lossy(&early[0].bytes).contains("/after/"),
        "a request went out behind the unfinished body: {:?}",
        early[0]
    );
    drop(s);
}

// ---------------------------------------------------------------------------------------
// Upstream responses with invalid framing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_responses_with_invalid_framing_become_502_and_are_not_reused() {
    let backend = Recorder::start().await;
    let proxy = proxy_for(&backend).await;
    for path in [
        "/evil/two-cl",
        "/evil/signed-cl",
        "/evil/te-and-cl",
        "/evil/te-gzip",
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        let out = exchange(proxy.addr(), req.as_bytes(), Duration::from_millis(500)).await;
        let text = String::from_utf8_lossy(&out.raw);
        assert_eq!(out.status, Some(502), "{path}: {text}");
        settle().await;
        for c in conns_that_saw(&backend, path) {
            assert!(c.ended, "{path}: the connection was kept: {c:?}");
        }
        next_clients_get_their_own(&backend, &proxy, path, 4).await;
    }
    // Framing that breaks after the head was relayed: the client sees an incomplete
    // response and a close, never a complete wrong one.
    for path in ["/evil/bad-chunk", "/evil/short-body"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        let out = exchange(proxy.addr(), req.as_bytes(), Duration::from_secs(3)).await;
        assert!(out.closed, "{path}: the client connection stayed open");
        assert!(!is_complete_response(&out.raw), "{path}: {:?}", out.raw);
        settle().await;
        for c in conns_that_saw(&backend, path) {
            assert!(c.ended, "{path}: the connection was kept: {c:?}");
        }
        next_clients_get_their_own(&backend, &proxy, path, 4).await;
    }
    // Two responses to one request: the second must never answer somebody else.
    for round in 0..5 {
        let (status, body) = get(proxy.addr(), "/evil/two-responses", false)
            .await
            .unwrap();
        assert_eq!(
            (status, String::from_utf8_lossy(&body).into_owned()),
            (200, "path=/evil/two-responses".to_string())
        );
        next_clients_get_their_own(&backend, &proxy, &format!("two-responses-{round}"), 4).await;
    }
    let all = String::from_utf8_lossy(&backend.all_bytes()).into_owned();
    assert!(!all.contains("/not-yours"), "{all}");
}

// ---------------------------------------------------------------------------------------
// Noise

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_random_byte_strings_leave_the_proxy_alive_and_serving() {
    use rand::{Rng, SeedableRng};
    let backend = Recorder::start().await;
    let mut proxy = proxy_for(&backend).await;
    let starts: [&[u8]; 5] = [
        b"",
        b"GET / HTTP/1.1\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\n",
        b"GET ",
        b"G",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let inputs: Vec<Vec<u8>> = (0..1000)
        .map(|i| {
            let mut v = starts[i % starts.len()].to_vec();
            let n = rng.random_range(1..2048);
            v.extend((0..n).map(|_| rng.random::<u8>()));
            v
        })
        .collect();
    let inputs = Arc::new(Mutex::new(inputs));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (inputs, addr) = (inputs.clone(), proxy.addr());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(input) = inputs.lock().unwrap().pop() else {
                    return;
                };
                exchange(addr, &input, Duration::from_millis(300)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(proxy.child.try_wait().unwrap().is_none(), "waitless exited");
    next_clients_get_their_own(&backend, &proxy, "noise", 8).await;
}

// ---------------------------------------------------------------------------------------
// PROXY protocol headers in front of HTTP

/// waitless with `accept_proxy_protocol` on its http listener, logging warnings to a file
/// (returned) so tests can read what it said about each peer.
async fn proxy_protocol_proxy(backend: &Recorder) -> (Waitless, std::path::PathBuf) {
    let (port, admin) = (free_port(), free_port());
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:{port}\"\nupstream = \"web\"\n\
         time_wait = \"proxy\"\naccept_proxy_protocol = true\n\n\
         [[upstream]]\nname = \"web\"\nservers = [\"{}\"]\n",
        backend.addr
    );
    let (w, log) = Waitless::launch_logged(&config, port, admin, "warn").await;
    (w, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_proxy_headers_close_only_that_connection_and_log_the_peer() {
    let backend = Recorder::start().await;
    let (proxy, log) = proxy_protocol_proxy(&backend).await;
    let addr = proxy.addr();
    // A v2 header whose length field claims 200 address bytes, of which 12 are sent.
    let mut short_v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\xc8".to_vec();
    short_v2.extend_from_slice(&[192, 0, 2, 1, 127, 0, 0, 1, 0x15, 0xb3, 0, 80]);
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"GARBAGE that is no PROXY header\r\n".to_vec()),
        (
            "bad address",
            b"PROXY TCP4 999.2.3.4 127.0.0.1 1 80\r\nGET / HTTP/1.1\r\n".to_vec(),
        ),
        (
            "no CRLF",
            [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat(),
        ),
        (
            "HTTP without the header",
            b"GET / HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
        ),
        ("v2 claiming more bytes than sent", short_v2),
    ];
    let mut clients = Vec::new();
    for (name, bytes) in bad {
        clients.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let me = s.local_addr().unwrap();
            s.write_all(&bytes).await.unwrap();
            let mut got = Vec::new();
            // The v2 one waits for bytes that never come: refused at the 5 s header timeout.
            let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
            assert!(read.is_ok(), "{name}: the connection stayed open");
            assert!(
                got.is_empty(),
                "{name}: got {:?}",
                String::from_utf8_lossy(&got)
            );
            (name, me)
        }));
    }
    // Meanwhile other clients are served, one with its header split across two segments
    // in the middle of a port number.
    for i in 0..3 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 8")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(
            format!("0\r\nGET /ok/{i} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(text.ends_with(&format!("path=/ok/{i}")), "{text}");
    }
    let mut refused = Vec::new();
    for c in clients {
        refused.push(c.await.unwrap());
    }
    let seen = String::from_utf8_lossy(&backend.all_bytes()).into_owned();
    assert!(seen.contains("x-forwarded-for: 192.0.2.1"), "{seen}");
    assert_eq!(seen.matches("GET ").count(), 3, "{seen}");
    settle().await;
    let text = std::fs::read_to_string(&log).unwrap();
    for (name, me) in refused {
        assert!(
            text.lines()
                .any(|l| l.contains("bad PROXY protocol header") && l.contains(&me.to_string())),
            "{name}: no log line naming {me}:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_just_within_the_limits_are_forwarded() {
    let backend = Recorder::start().await;
    let proxy = proxy_for(&backend).await;
    // A request target of 8 KiB, and a head of about 60 KiB in 60 header fields.
    let target = format!("/{}", "t".repeat(8 * 1024 - 1));
    let fields: String = (0..60)
        .map(|i| format!("X-Big-{i}: {}\r\n", "v".repeat(1000)))
        .collect();
    for (path, extra) in [(target.as_str(), String::new()), ("/big-head", fields)] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n");
        let out = exchange(proxy.addr(), req.as_bytes(), Duration::from_secs(3)).await;
        let text = String::from_utf8_lossy(&out.raw);
        assert_eq!(
            out.status,
            Some(200),
            "{}",
            text.get(..200).unwrap_or(&text)
        );
        assert!(text.ends_with(&format!("path={path}")));
    }
}

// ---------------------------------------------------------------------------------------
// Requests others' corpora showed to be valid, and how their bytes reach the backend

/// The one backend connection that saw `needle`, and the index of the request on it whose
/// line starts with `line`.
fn the_request(backend: &Recorder, needle: &str, line: &str) -> (ConnLog, usize) {
    let conns = conns_that_saw(backend, needle);
    assert_eq!(conns.len(), 1, "{needle}: seen on {conns:?}");
    let c = conns.into_iter().next().unwrap();
    let at = c
        .requests
        .iter()
        .position(|r| r.starts_with(line))
        .unwrap_or_else(|| panic!("{line}: not read as a request: {c:?}"));
    (c, at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_forwarded_whatever_the_method() {
    let backend = Recorder::start().await;
    let proxy = proxy_for(&backend).await;
    let framings = [
        (
            "chunked",
            "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        ("sized", "Content-Length: 5\r\n\r\nhello"),
    ];
    for method in ["GET", "HEAD", "DELETE", "OPTIONS", "POST", "PUT"] {
        for (framing, rest) in framings {
            let path = format!("/body/{method}/{framing}");
            let req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\n{rest}");
            let out = exchange(proxy.addr(), req.as_bytes(), Duration::from_millis(300)).await;
            let text = String::from_utf8_lossy(&out.raw).into_owned();
            assert_eq!(out.status, Some(200), "{method} {framing}: {text}");
            if method != "HEAD" {
                assert!(text.ends_with(&format!("path={path}")), "{text}");
            }
            // The backend read the request, on one connection, with its body whole.
            let (c, at) = the_request(&backend, &path, &format!("{method} {path} "));
            assert_eq!(
                c.bodies[at],
                b"hello",
                "{method} {framing}: the backend got {:?}",
                String::from_utf8_lossy(&c.bytes)
            );
            next_clients_get_their_own(&backend, &proxy, &path, 4).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_http1_minor_versions_are_served_as_1_1() {
    let backend = Recorder::start().await;
    let proxy = proxy_for(&backend).await;
    let cases = [
        ("/v/get", "GET /v/get HTTP/1.2\r\nHost: t\r\n\r\n"),
        ("/v/get9", "GET /v/get9 HTTP/1.9\r\nHost: t\r\n\r\n"),
        (
            "/v/post",
            "POST /v/post HTTP/1.2\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
        ),
    ];
    for (path, req) in cases {
        let out = exchange(proxy.addr(), req.as_bytes(), Duration::from_millis(300)).await;
        let text = String::from_utf8_lossy(&out.raw).into_owned();
        assert_eq!(out.status, Some(200), "{path}: {text}");
        assert!(text.starts_with("HTTP/1.1 200"), "{path}: {text}");
        assert!(!out.closed, "{path}: a 1.1 connection is kept alive");
        let line = req.lines().next().unwrap();
        let method = line.split(' ').next().unwrap();
        let (c, at) = the_request(&backend, path, &format!("{method} {path} HTTP/1.1"));
        if method == "POST" {
            assert_eq!(c.bodies[at], b"hello");
        }
        next_clients_get_their_own(&backend, &proxy, path, 4).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_browsers_and_clients_send_are_forwarded() {
    let backend = Recorder::start().await;
    let proxy = proxy_for(&backend).await;
    // As they came where hyper's URI holds them; percent-encoded, as browsers send them,
    // where it does not.
    let cases = [
        ("GET", "/q/\"quoted\"", "/q/\"quoted\""),
        ("GET", "/q/{\"json\":1}", "/q/{\"json\":1}"),
        ("GET", "/q/a|b^c[d]", "/q/a|b^c[d]"),
        ("GET", "/q/search?q=\"exact\"", "/q/search?q=%22exact%22"),
        ("GET", "/q/<tag>?a=<b>", "/q/%3Ctag%3E?a=%3Cb%3E"),
        ("POST", "/q/post?q=\"x\"", "/q/post?q=%22x%22"),
    ];
    for (method, target, forwarded) in cases {
        let body = if method == "POST" {
            "Content-Length: 2\r\n\r\nhi"
        } else {
            "\r\n"
        };
        let req = format!("{method} {target} HTTP/1.1\r\nHost: t\r\n{body}");
        let out = exchange(proxy.addr(), req.as_bytes(), Duration::from_millis(300)).await;
        let text = String::from_utf8_lossy(&out.raw).into_owned();
        assert_eq!(out.status, Some(200), "{target}: {text}");
        the_request(
            &backend,
            forwarded,
            &format!("{method} {forwarded} HTTP/1.1"),
        );
        next_clients_get_their_own(&backend, &proxy, target, 4).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscored_names_pass_unless_the_listener_drops_them() {
    let backend = Recorder::start().await;
    let keeps = proxy_for(&backend).await;
    let drops = Waitless::start(
        &[backend.addr],
        "time_wait = \"proxy\"\ndrop_underscore_headers = true",
        "pool_size = 4",
    )
    .await;
    for (proxy, kept) in [(&keeps, true), (&drops, false)] {
        // A GET the simple path serves, and a POST hyper's path does.
        for (method, rest) in [("GET", "\r\n"), ("POST", "Content-Length: 5\r\n\r\nhello")] {
            let path = format!("/underscore/{kept}/{method}");
            let req = format!(
                "{method} {path} HTTP/1.1\r\nHost: t\r\nX_Api_Key: k1\r\nX-Plain: p1\r\n{rest}"
            );
            let out = exchange(proxy.addr(), req.as_bytes(), Duration::from_millis(300)).await;
            assert_eq!(out.status, Some(200), "{path}");
            let (c, _) = the_request(&backend, &path, &format!("{method} {path} "));
            let seen = String::from_utf8_lossy(&c.bytes).into_owned();
            // hyper's path writes names in lower case.
            let lower = seen.to_ascii_lowercase();
            assert_eq!(lower.contains("x_api_key: k1"), kept, "{path}: {seen}");
            assert!(seen.to_ascii_lowercase().contains("x-plain: p1"), "{seen}");
            next_clients_get_their_own(&backend, proxy, &path, 4).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// How refused clients are closed

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_clients_are_closed_at_once_under_every_policy_and_recorded_as_refused() {
    let backend = Recorder::start().await;
    let b = |s: &str| s.as_bytes().to_vec();
    let many_headers = format!(
        "GET / HTTP/1.1\r\nHost: t\r\n{}\r\n",
        (0..150)
            .map(|i| format!("X-H{i}: 1\r\n"))
            .collect::<String>()
    );
    // Refused by waitless's checks, by hyper's parser, and mid-body.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("two Hosts", b("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")),
        (
            "gzip, chunked",
            b("POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ),
        ("Transfer_Encoding", b("POST / HTTP/1.1\r\nHost: t\r\nTransfer_Encoding: chunked\r\n\r\n0\r\n\r\n")),
        ("bad request line", b("GET / HTTP/1.1 x\r\nHost: t\r\n\r\n")),
        ("too many headers", many_headers.into_bytes()),
        ("bad chunk", b("POST /refused-chunk HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n")),
    ];
    for policy in [
        "time_wait = \"client\"",
        "time_wait = \"client\"\nlinger_fallback = \"reset\"",
        "time_wait = \"proxy\"",
        "time_wait = \"none\"",
    ] {
        // A linger far beyond the wait below: a close that waited for it fails.
        let listener = format!("{policy}\nlinger = \"30s\"");
        let proxy = Waitless::start(&[backend.addr], &listener, "pool_size = 4").await;
        // Counted from here: a socket of an earlier test may have had this port.
        let (proxy_tw, client_tw) = (
            time_wait_on_port(proxy.port),
            sockets_to_port("time-wait", proxy.port),
        );
        for (name, req) in &cases {
            let out = exchange(proxy.addr(), req, Duration::from_secs(3)).await;
            assert!(
                out.status.is_some_and(|s| (400..=501).contains(&s)),
                "{policy}, {name}: {:?}",
                String::from_utf8_lossy(&out.raw)
            );
            assert!(out.closed, "{policy}, {name}: not closed within 3 s");
            assert!(
                is_complete_response(&out.raw),
                "{policy}, {name}: answer cut"
            );
        }
        settle().await;
        let stats = proxy.stats().await;
        let entries = stats["listeners"][0]["ledger"]["entries"]
            .as_array()
            .unwrap()
            .clone();
        let refused: u64 = entries
            .iter()
            .filter(|e| e["reason"] == "refused")
            .map(|e| e["count"].as_u64().unwrap())
            .sum();
        assert_eq!(refused, cases.len() as u64, "{policy}: ledger {entries:?}");
        // Closed once the answer was acknowledged, never by the client first: no TIME_WAIT
        // on the clients; where the policy resets, on neither side.
        if policy.contains("none") || policy.contains("reset") {
            let now = time_wait_on_port(proxy.port);
            assert_eq!(now, proxy_tw, "{policy}: on the proxy");
        }
        let now = sockets_to_port("time-wait", proxy.port);
        assert_eq!(now, client_tw, "{policy}: on the clients");
        next_clients_get_their_own(&backend, &proxy, policy, 2).await;
    }
}
