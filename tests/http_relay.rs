//! The HTTP relay, checked from outside: the backend's own accept counter, the kernel's
//! socket table, and the bytes the client receives.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_clients_reuse_at_most_pool_size_backend_connections() {
    let backend = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[backend.addr], "", "pool_size = 8").await;

    let failed = short_load(proxy.addr(), 2000, 8).await;
    assert_eq!(failed, 0, "client errors through waitless");
    let accepts = backend.accepts();
    println!("2000 Connection: close requests -> {accepts} backend connections (pool_size 8)");
    assert!(
        accepts <= 8,
        "backend accepted {accepts} connections, pool_size is 8"
    );
    assert_eq!(
        backend.requests.load(std::sync::atomic::Ordering::SeqCst),
        2000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_max_connections_wait_for_a_pooled_connection_to_come_back() {
    // More clients at once than max_connections: each waits for a connection given back to
    // the pool, not only for one to close (pooled ones never close under this load).
    let backend = Backend::start(BackendMode::Echo).await;
    let bounds = "pool_size = 2\nmax_connections = 2\nconnect_timeout = \"2s\"";
    let proxy = Waitless::start(&[backend.addr], "", bounds).await;

    let failed = short_load(proxy.addr(), 1000, 16).await;
    assert_eq!(
        failed, 0,
        "clients failed waiting for room under max_connections"
    );
    let accepts = backend.accepts();
    assert!(
        accepts <= 2,
        "backend accepted {accepts} connections, max_connections is 2"
    );
    assert_eq!(
        backend.requests.load(std::sync::atomic::Ordering::SeqCst),
        1000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_keeps_no_time_wait_after_short_clients() {
    // Direct: the server closes first on every Connection: close request.
    let direct = Backend::start(BackendMode::Echo).await;
    assert_eq!(short_load(direct.addr, 2000, 8).await, 0);
    settle().await;
    let direct_tw = time_wait_on_port(direct.port());

    let backend = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[backend.addr], "", "pool_size = 8").await;
    assert_eq!(short_load(proxy.addr(), 2000, 8).await, 0);
    settle().await;
    let proxied_tw = time_wait_on_port(backend.port());
    println!("backend TIME_WAIT after 2000 short requests: direct {direct_tw}, through waitless {proxied_tw}");
    assert!(
        direct_tw > 0,
        "the direct load should leave TIME_WAIT on the backend"
    );
    assert_eq!(proxied_tw, 0, "backend TIME_WAIT through waitless");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_backend_keeps_no_time_wait_behind_waitless() {
    let Some(nginx) = Nginx::start().await else {
        panic!("nginx is not installed: .ci/run installs it (apt-get install nginx)");
    };
    let proxy = Waitless::start(&[nginx.addr()], "", "pool_size = 4").await;
    // More than nginx's keepalive_requests (1000) per connection: nginx itself closes some
    // pooled connections first, which waitless must answer with RST.
    let failed = short_load(proxy.addr(), 6000, 4).await;
    assert_eq!(failed, 0);
    settle().await;
    let tw = time_wait_on_port(nginx.port);
    let established = sockets_on_port("established", nginx.port);
    println!("nginx: TIME_WAIT {tw}, ESTABLISHED {established} after 6000 short requests");
    assert_eq!(tw, 0, "nginx's port keeps TIME_WAIT behind waitless");
    assert!(
        established <= 4,
        "more than pool_size connections open at nginx"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_pass_byte_exact_both_ways() {
    let backend = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[backend.addr], "", "").await;
    for size in [0usize, 1, 4095, 65_536, 1 << 20, 7_654_321, 64 << 20] {
        let up = pattern(size);
        let (status, echoed) = request(proxy.addr(), "POST", "/echo", up.clone(), false)
            .await
            .expect("upload");
        assert_eq!(status, 200);
        assert_eq!(echoed.len(), size, "echo length for {size}");
        assert!(echoed == up, "echoed body differs for {size}");

        let (status, down) = get(proxy.addr(), &format!("/bytes/{size}"), true)
            .await
            .expect("download");
        assert_eq!(status, 200);
        assert!(down == pattern(size), "downloaded body differs for {size}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_race_with_server_idle_close_gives_no_errors() {
    // The server closes idle connections after 1 s; a request arrives about every second,
    // right when the pooled connection is being closed.
    let backend = Backend::start(BackendMode::CloseIdleAfter(Duration::from_secs(1))).await;
    let proxy = Waitless::start(&[backend.addr], "", "").await;
    let mut errors = 0;
    let start = tokio::time::Instant::now();
    let mut i = 0u32;
    while start.elapsed() < Duration::from_secs(20) {
        match get(proxy.addr(), "/bytes/100", false).await {
            Ok((200, body)) if body.len() == 100 => {}
            other => {
                errors += 1;
                eprintln!("request {i}: {other:?}");
            }
        }
        i += 1;
        // Alternate around the server's 1 s to hit both sides of the race.
        let pause = if i.is_multiple_of(2) { 995 } else { 1005 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    assert_eq!(errors, 0, "client saw errors across the keep-alive race");
    assert!(
        backend.accepts() > 1,
        "the server never closed an idle connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_gives_502_naming_the_server() {
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = Waitless::start(&[dead], "", "connect_timeout = \"500ms\"").await;
    let (status, body) = get(proxy.addr(), "/", true).await.expect("response");
    assert_eq!(status, 502);
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains(&dead.to_string()),
        "502 body names the server: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_server_is_skipped() {
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let backend = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[dead, backend.addr], "", "").await;
    for _ in 0..20 {
        let (status, _) = get(proxy.addr(), "/", true).await.expect("response");
        assert_eq!(status, 200);
    }
    assert_eq!(
        backend.requests.load(std::sync::atomic::Ordering::SeqCst),
        20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_do_not_cross_and_forwarded_headers_are_added() {
    // A raw backend that records each request head it receives, on any connection (each
    // worker of the proxy may open its own).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::channel::<String>(2);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen_tx = seen_tx.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 8192];
                loop {
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        head.extend_from_slice(&buf[..n]);
                    }
                    let _ = seen_tx
                        .send(String::from_utf8_lossy(&head).into_owned())
                        .await;
                    let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nok";
                    if s.write_all(resp).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let proxy = Waitless::start(&[addr], "", "").await;
    // One head hyper serves (its Connection names another header), one the simple path does.
    for request in [
        &b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close, X-Drop\r\nX-Drop: 1\r\nKeep-Alive: 1\r\nX-Keep: 1\r\n\r\n"[..],
        b"GET /y HTTP/1.1\r\nHost: h\r\nConnection: Keep-Alive\r\nKeep-Alive: 1\r\nTE: trailers\r\nProxy-Connection: x\r\nX-Keep: 1\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(request).await.unwrap();
        let mut resp = Vec::new();
        let mut buf = [0u8; 4096];
        while !resp.windows(6).any(|w| w == b"\r\n\r\nok") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "response cut short: {:?}",
                String::from_utf8_lossy(&resp)
            );
            resp.extend_from_slice(&buf[..n]);
        }
        let head = seen_rx.recv().await.unwrap().to_ascii_lowercase();
        assert!(!head.contains("x-drop"), "{head}");
        assert!(!head.contains("keep-alive"), "{head}");
        assert!(!head.contains("connection"), "{head}");
        assert!(!head.contains("te: "), "{head}");
        assert!(head.contains("x-keep: 1"), "{head}");
        assert!(head.contains("x-forwarded-for: 127.0.0.1"), "{head}");
        assert!(head.contains("x-forwarded-proto: http"), "{head}");
        let resp = String::from_utf8_lossy(&resp).to_ascii_lowercase();
        assert!(!resp.contains("keep-alive"), "{resp}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_and_http10_clients_are_served() {
    let backend = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[backend.addr], "", "").await;
    let (status, body) = request(proxy.addr(), "HEAD", "/bytes/1000", Bytes::new(), false)
        .await
        .expect("HEAD");
    assert_eq!(status, 200);
    assert!(body.is_empty());

    // HTTP/1.0 without keep-alive reads to EOF; it must get the whole body at once.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = std::time::Instant::now();
    let mut s = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"GET /bytes/5000 HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).await.unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    let body_at = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(all[body_at..] == pattern(5000)[..]);
    println!("HTTP/1.0 response read to EOF in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_stats_report_pool_use() {
    let backend = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[backend.addr], "", "pool_size = 2").await;
    assert_eq!(short_load(proxy.addr(), 50, 1).await, 0);
    let metrics = proxy.admin_get("/metrics").await;
    assert!(
        metrics.contains("waitless_requests_total{listener=\"web\"} 50"),
        "{metrics}"
    );
    assert!(
        metrics.contains("waitless_upstream_connections_opened_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("waitless_pool_idle_connections"),
        "{metrics}"
    );
    let stats: serde_json::Value = serde_json::from_str(&proxy.admin_get("/stats").await).unwrap();
    let server = &stats["upstreams"][0]["servers"][0];
    assert_eq!(server["opened"].as_u64(), Some(backend.accepts() as u64));
    assert_eq!(proxy.admin_get("/healthz").await, "ok\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_streams_in_bounded_memory() {
    use http_body_util::BodyExt;
    const GIB: u64 = 1 << 30;
    let backend = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[backend.addr], "", "").await;
    // Warm up so the baseline includes the runtime's and the pool's steady state.
    assert_eq!(short_load(proxy.addr(), 20, 2).await, 0);
    let pid = proxy.child.id();
    let before = proc_kib(pid, "VmRSS");

    // Upload 1 GiB; the backend counts what arrives.
    let stream = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post("/count")
        .header("host", "t")
        .body(ZeroBody::new(GIB))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let counted = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&counted), GIB.to_string());

    // Download 1 GiB, counting without keeping it.
    tx.ready().await.unwrap();
    let req = hyper::Request::get(format!("/stream/{GIB}"))
        .header("host", "t")
        .body(ZeroBody::new(0))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        got += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(got, GIB);

    let peak = proc_kib(pid, "VmHWM");
    let growth_mib = peak.saturating_sub(before) / 1024;
    println!("waitless RSS before {before} KiB, peak {peak} KiB: grew {growth_mib} MiB for 1 GiB each way");
    // Buffering the body would grow by about 1 GiB. What remains is hyper's buffers and the
    // allocator's per-worker pages, which measured 8-17 MiB from run to run.
    assert!(
        growth_mib <= 32,
        "RSS grew {growth_mib} MiB while streaming 1 GiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_upstream_gives_504() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s); // reads nothing, answers nothing
        }
    });
    let proxy = Waitless::start(&[addr], "", "response_timeout = \"500ms\"").await;
    let (status, body) = get(proxy.addr(), "/", true).await.expect("response");
    assert_eq!(status, 504);
    assert!(String::from_utf8_lossy(&body).contains(&addr.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_and_bodyless_statuses_keep_the_connection_in_step() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[backend.addr], "", "").await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();

    // 100-continue: the client sends its body only after the interim response.
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let interim = read_head(&mut s).await;
    assert!(interim.starts_with("http/1.1 100"), "{interim}");
    s.write_all(b"hello").await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let mut body = [0u8; 5];
    s.read_exact(&mut body).await.unwrap();
    assert_eq!(&body, b"hello");

    // 204, 304 and HEAD carry no body: the next response on the connection must be intact.
    for req in [
        "GET /status/204 HTTP/1.1\r\nHost: t\r\n\r\n",
        "GET /status/304 HTTP/1.1\r\nHost: t\r\n\r\n",
        "HEAD /bytes/777 HTTP/1.1\r\nHost: t\r\n\r\n",
    ] {
        s.write_all(req.as_bytes()).await.unwrap();
        let head = read_head(&mut s).await;
        assert!(!head.contains("transfer-encoding"), "{head}");
        s.write_all(b"GET /bytes/10 HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let next = read_head(&mut s).await;
        assert!(next.starts_with("http/1.1 200"), "after {req:?}: {next}");
        let mut ten = [0u8; 10];
        s.read_exact(&mut ten).await.unwrap();
        assert_eq!(&ten[..], &pattern(10)[..]);
    }
}

/// Reads one response head (through the blank line), byte by byte so nothing after it is
/// consumed.
async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = s.read_u8().await.expect("response head");
        head.push(b);
    }
    String::from_utf8_lossy(&head).to_ascii_lowercase()
}

/// Reads one response with a Content-Length body; returns the lowercased head and the body.
async fn read_response(s: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let head = read_head(s).await;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().expect("content-length"))
        .expect("a sized response");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.expect("response body");
    (head, body)
}

/// How many clients of the proxy's listener the kernel has in `state`, seen from the
/// clients' side (remote port = the listener's port).
fn clients_in(state: &str, proxy: &Waitless) -> usize {
    sockets_to_port(state, proxy.port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_serve_their_next_request_after_a_long_pause() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[backend.addr], "", "").await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    for (round, n) in [5usize, 7, 9].into_iter().enumerate() {
        s.write_all(format!("GET /bytes/{n} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("http/1.1 200"), "round {round}: {head}");
        assert!(!head.contains("connection: close"), "round {round}: {head}");
        assert_eq!(&body[..], &pattern(n)[..], "round {round}");
        // Long past the point where waitless lets hyper go on an idle connection.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            clients_in("established", &proxy),
            1,
            "round {round}: the idle connection was closed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_request_cut_mid_head_by_a_pause_is_served_whole() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[backend.addr], "", "").await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    // The first request whole and the start of the second, in one write: waitless reads both.
    s.write_all(b"GET /bytes/5 HTTP/1.1\r\nHost: t\r\n\r\nGET /bytes/11 HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(&body[..], &pattern(5)[..]);
    // Idle long enough for hyper to be let go with the half head in its buffer.
    tokio::time::sleep(Duration::from_millis(800)).await;
    s.write_all(b"st: t\r\n\r\n").await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(&body[..], &pattern(11)[..]);
    assert_eq!(
        backend.requests.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_plain_and_body_requests_are_answered_in_order() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[backend.addr], "", "").await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    // Plain GETs (the simple path), a POST with a body and an HTTP/1.0 GET (hyper) in one
    // write, then a plain HEAD and GET again once hyper served its share.
    s.write_all(
        b"GET /bytes/5 HTTP/1.1\r\nHost: t\r\n\r\n\
          POST /count HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\nhello!\
          GET /bytes/7 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n\
          GET /bytes/9 HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .await
    .unwrap();
    for want in [
        pattern(5),
        bytes::Bytes::from_static(b"6"),
        pattern(7),
        pattern(9),
    ] {
        let (head, body) = read_response(&mut s).await;
        assert!(head.contains(" 200 "), "{head}");
        assert_eq!(&body[..], &want[..], "{head}");
    }
    s.write_all(
        b"HEAD /bytes/3 HTTP/1.1\r\nHost: t\r\n\r\nGET /bytes/4 HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.contains("content-length: 3"), "{head}");
    let (head, body) = read_response(&mut s).await;
    assert_eq!(&body[..], &pattern(4)[..], "{head}");
    assert_eq!(
        backend.requests.load(std::sync::atomic::Ordering::SeqCst),
        6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_timeout_closes_an_idle_client_connection_as_idle() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start(BackendMode::Echo).await;
    // Under "proxy" waitless closes at once when the time is up, not after the client's FIN.
    let proxy = Waitless::start(
        &[backend.addr],
        "keepalive_timeout = \"1500ms\"\ntime_wait = \"proxy\"",
        "",
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"GET /bytes/3 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // Still open well after hyper was let go, before the timeout.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        clients_in("established", &proxy),
        1,
        "closed before keepalive_timeout"
    );
    // Then closed by waitless, without the client doing anything.
    let mut rest = Vec::new();
    let eof = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(matches!(eof, Ok(Ok(0))), "not closed: {eof:?} {rest:?}");
    // The client's FIN completes the close, and waitless records it.
    drop(s);
    settle().await;
    let stats = proxy.stats().await;
    let ledger = &stats["listeners"][0]["ledger"];
    let idle = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == "idle")
        .map(|e| e["count"].as_u64().unwrap())
        .sum::<u64>();
    assert_eq!(idle, 1, "ledger: {ledger}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_request_still_gets_the_response() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[backend.addr], "", "").await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"GET /bytes/7 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    // FIN right behind the request, as `curl --http1.0`-style tools and some load
    // balancers' health checks do: the response must still come, then the close.
    s.shutdown().await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(&body[..], &pattern(7)[..]);
    let mut rest = Vec::new();
    let eof = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(
        matches!(eof, Ok(Ok(0))),
        "the connection was not closed after the response: {eof:?}"
    );
    assert_eq!(
        backend.requests.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_request_head_dribbled_on_a_kept_alive_connection_is_cut_at_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[backend.addr], "header_timeout = \"1s\"", "").await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"GET /bytes/3 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // The next head never completes: a byte every 200 ms for up to 8 s.
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n").await.unwrap();
    let cut = dribbled_until_cut(&mut s, 40, Duration::from_millis(200)).await;
    assert!(
        cut,
        "a head dribbled for 8 s after a served request was never cut"
    );
}

/// A backend that answers scripted raw responses, in order, over whatever connections it is
/// given; it returns the request heads it read and how many connections it accepted.
async fn scripted_backend(
    listener: tokio::net::TcpListener,
    script: Vec<&'static [u8]>,
) -> (Vec<String>, usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut heads = Vec::new();
    let mut accepted = 0;
    let mut script = script.into_iter().peekable();
    while script.peek().is_some() {
        let (mut s, _) = listener.accept().await.unwrap();
        accepted += 1;
        let mut buf = Vec::new();
        while let Some(&response) = script.peek() {
            // One request: the head, then a Content-Length body if it has one.
            let head_end = loop {
                if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break Some(at + 4);
                }
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break None,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let Some(head_end) = head_end else { break };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < head_end + len {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "backend: request body cut short");
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..head_end + len);
            heads.push(head);
            script.next();
            // In small pieces with pauses: heads and chunks arrive split across reads.
            for piece in response.chunks(7) {
                s.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if !response
                .windows(14)
                .any(|w| w.eq_ignore_ascii_case(b"content-length"))
                && !response.windows(7).any(|w| w == b"chunked")
            {
                break; // A close-delimited body ends with the connection.
            }
        }
    }
    (heads, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_is_relayed_whole_over_one_pooled_connection() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    let script: Vec<&'static [u8]> = vec![
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n\
          HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone",
        b"HTTP/1.1 200 OK\r\n\r\nuntil the close",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nf",
    ];
    let backend = tokio::spawn(scripted_backend(listener, script));
    // One worker, so every request finds the one pooled connection.
    let port = free_port();
    let admin = free_port();
    let config = format!(
        "workers = 1\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"http\"\n\
         upstream = \"web\"\n\n[[upstream]]\nname = \"web\"\nservers = [\"{backend_addr}\"]\n"
    );
    let proxy = Waitless::launch(&config, port, admin).await;

    let (status, body) = get(proxy.addr(), "/chunked", false).await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"hello world"[..]));
    let (status, body) = get(proxy.addr(), "/early-hints", false).await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"abc"[..]));
    // A request with a body, on the same connection, and the bodyless one after it.
    let posted = request(proxy.addr(), "POST", "/post", Bytes::from("xyz"), false).await;
    assert_eq!(posted.unwrap(), (201, Bytes::from("ok")));
    let (status, body) = get(proxy.addr(), "/after-post", false).await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"done"[..]));
    let (status, body) = get(proxy.addr(), "/close-delimited", false).await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"until the close"[..]));
    let (status, body) = get(proxy.addr(), "/fresh", false).await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"f"[..]));

    let (heads, accepted) = tokio::time::timeout(Duration::from_secs(5), backend)
        .await
        .expect("backend script finished")
        .unwrap();
    // Five exchanges on the first connection; only the close-delimited body ended it.
    assert_eq!(accepted, 2, "{heads:?}");
    let paths: Vec<&str> = heads
        .iter()
        .map(|h| h.split(' ').nth(1).unwrap_or(""))
        .collect();
    assert_eq!(
        paths,
        [
            "/chunked",
            "/early-hints",
            "/post",
            "/after-post",
            "/close-delimited",
            "/fresh"
        ]
    );
    assert!(
        heads
            .iter()
            .all(|h| h.contains("x-forwarded-for: 127.0.0.1")),
        "{heads:?}"
    );
    assert!(heads[2].contains("content-length: 3"), "{}", heads[2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_a_unix_socket_is_pooled_for_requests_with_and_without_bodies() {
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = TempDir::new("unix-upstream");
    let path = dir.0.join("app.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let accepts = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = accepts.clone();
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                // Answers with the method, the path and the body it got.
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let head = format!("{} {} ", req.method(), req.uri().path());
                        let body = req.into_body().collect().await?.to_bytes();
                        let mut out = head.into_bytes();
                        out.extend_from_slice(&body);
                        Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(
                            Bytes::from(out),
                        )))
                    },
                );
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    let port = free_port();
    let admin = free_port();
    let config = format!(
        "workers = 1\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"http\"\n\
         upstream = \"app\"\n\n[[upstream]]\nname = \"app\"\nservers = [\"unix:{}\"]\n",
        path.display()
    );
    let proxy = Waitless::launch(&config, port, admin).await;
    for i in 0..3 {
        let (status, body) = get(proxy.addr(), &format!("/get/{i}"), true).await.unwrap();
        assert_eq!((status, body), (200, Bytes::from(format!("GET /get/{i} "))));
        let sent = Bytes::from(format!("body {i}"));
        let (status, body) = request(proxy.addr(), "POST", "/post", sent, true)
            .await
            .unwrap();
        assert_eq!(
            (status, body),
            (200, Bytes::from(format!("POST /post body {i}")))
        );
    }
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        1,
        "one pooled connection for all six"
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_its_server_closed_idle_is_answered_within_seconds() {
    // The server closes idle connections after 300 ms; nobody reads an idle pooled
    // connection, so waitless must notice the FIN on its own and answer it.
    let backend = Backend::start(BackendMode::CloseIdleAfter(Duration::from_millis(300))).await;
    let proxy = Waitless::start(&[backend.addr], "", "idle_timeout = \"60s\"").await;
    for _ in 0..4 {
        let (status, _) = get(proxy.addr(), "/bytes/10", true).await.unwrap();
        assert_eq!(status, 200);
    }
    assert!(
        sockets_to_port("established", backend.port()) > 0,
        "nothing was pooled"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // waitless's side of each closed connection is gone (not left in CLOSE_WAIT), and the
    // server's side went without TIME_WAIT (answered with RST).
    assert_eq!(sockets_to_port("close-wait", backend.port()), 0);
    assert_eq!(sockets_to_port("established", backend.port()), 0);
    assert_eq!(time_wait_on_port(backend.port()), 0);
}
