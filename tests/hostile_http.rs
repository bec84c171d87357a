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
    /// The peer closed (or broke) the connection.
    ended: bool,
    /// It ended inside a request (head or body incomplete).
    ended_mid_request: bool,
}

/// A hand-written HTTP/1.1 server on loopback: it records every byte of every connection
/// and answers each request with `path=<its path>`, except under `/evil/` where it sends
/// malformed responses and `/early/` where it answers before reading the body.
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
        self.conns.lock().unwrap().iter().map(|c| c.bytes.len()).sum()
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
            lower
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")))
                .map(|v| v.trim().to_string())
        };
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
                buf.drain(..size + 2);
            }
        } else {
            while buf.len() < length {
                if !read_more(&mut s, &mut buf, id, &log).await {
                    return end(true);
                }
            }
            buf.drain(..length);
        }
        log.lock().unwrap()[id].requests.push(line.clone());

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
            log.lock().unwrap()[id]
                .bytes
                .extend_from_slice(&chunk[..n]);
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
        ("HTTP/1.2", b("GET / HTTP/1.2\r\nHost: t\r\n\r\n"), &[400]),
        ("lowercase http/1.1", b("GET / http/1.1\r\nHost: t\r\n\r\n"), &[400]),
        ("header without colon", b("GET / HTTP/1.1\r\nHost: t\r\nBadHeader\r\n\r\n"), &[400]),
        ("space before colon", b("GET / HTTP/1.1\r\nHost : t\r\n\r\n"), &[400]),
        (
            "space before colon in Content-Length",
            b("POST / HTTP/1.1\r\nHost: t\r\nContent-Length : 5\r\n\r\nhello"),
            &[400],
        ),
        ("NUL in header value", b("GET / HTTP/1.1\r\nHost: t\r\nX-A: a\0b\r\n\r\n"), &[400]),
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
        ("HTTP/1.1 without Host", b("GET / HTTP/1.1\r\n\r\n"), &[400]),
        ("two Host headers", b("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), &[400]),
        ("Host with a space", b("GET / HTTP/1.1\r\nHost: a b\r\n\r\n"), &[400]),
        ("Host with userinfo", b("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n"), &[400]),
        ("absolute form without Host", b("GET http://a/ HTTP/1.1\r\n\r\n"), &[400]),
        ("authority form for GET", b("GET a:80 HTTP/1.1\r\nHost: a\r\n\r\n"), &[400]),
        ("asterisk form for GET", b("GET * HTTP/1.1\r\nHost: a\r\n\r\n"), &[400]),
        ("CONNECT", b("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"), &[501]),
        ("request target over the limit", long_target.into_bytes(), &[414]),
        ("request target of 10 KiB", format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(10_000)).into_bytes(), &[414]),
        ("header block over the limit", big_head.into_bytes(), &[431]),
        ("more than 100 headers", many_headers.into_bytes(), &[431]),
    ]
}

