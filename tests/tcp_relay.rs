//! TCP mode, unix-socket listeners and the PROXY protocol, checked from outside: bytes
//! received, what the server saw, and the kernel's socket table.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A waitless with one tcp listener in front of `servers`.
async fn tcp_proxy(servers: &[SocketAddr], listener_extra: &str, upstream_extra: &str) -> Waitless {
    let port = free_port();
    let admin = free_port();
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[listener]]\nname = \"raw\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"tcp\"\n\
         upstream = \"raw\"\n{listener_extra}\n\n\
         [[upstream]]\nname = \"raw\"\nservers = [{}]\n{upstream_extra}\n",
        servers.join(", ")
    );
    Waitless::launch(&config, port, admin).await
}

/// A server that runs `handler` on every accepted connection.
async fn server<F, Fut>(handler: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(TcpStream, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(handler(s, n));
        }
    });
    (addr, accepts)
}

/// Closes in a ledger (a side's `ledger` in /stats) by who closed first, how and why.
fn closes(ledger: &serde_json::Value, closer: &str, how: &str, reason: &str) -> u64 {
    ledger["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries: {ledger}"))
        .iter()
        .filter(|e| e["closer"] == closer && e["how"] == how && e["reason"] == reason)
        .map(|e| e["count"].as_u64().unwrap_or(0))
        .sum()
}

fn count(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Connects and reads until EOF or an error; what arrived, and whether the end was a reset
/// (an RST right after the handshake may already fail the connect).
async fn refused_or_read(addr: SocketAddr) -> (Vec<u8>, bool) {
    match TcpStream::connect(addr).await {
        Ok(mut s) => read_to_end_or_reset(&mut s).await,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => (Vec::new(), true),
        Err(e) => panic!("connect failed: {e}"),
    }
}

/// Reads until EOF or an error; what arrived, and whether the end was a reset.
async fn read_to_end_or_reset(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return (got, false),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

/// xorshift bytes: the same seed gives the same stream, so both ends can check without
/// holding a gigabyte.
struct Stream(u64);

impl Stream {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_of_random_bytes_each_way_arrives_byte_exact() {
    const GIB: usize = 1 << 30;
    // The server echoes everything back.
    let (addr, _) = server(|mut s, _| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await;
    let proxy = tcp_proxy(&[addr], "", "").await;
    let s = TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut gen = Stream(0x1234_5678_9abc_def1);
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0;
        while sent < GIB {
            gen.fill(&mut buf);
            w.write_all(&buf).await.unwrap();
            sent += buf.len();
        }
        w.shutdown().await.unwrap();
    });
    let mut check = Stream(0x1234_5678_9abc_def1);
    let mut expect = vec![0u8; 256 * 1024];
    let mut got = vec![0u8; 256 * 1024];
    let mut received = 0;
    let mut filled = 0;
    check.fill(&mut expect);
    loop {
        let n = r.read(&mut got[filled..]).await.unwrap();
        if n == 0 {
            break;
        }
        filled += n;
        received += n;
        if filled == got.len() {
            assert!(got == expect, "bytes differ before offset {received}");
            check.fill(&mut expect);
            filled = 0;
        }
    }
    writer.await.unwrap();
    assert_eq!(received, GIB, "bytes echoed back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_reaches_the_server_and_its_answer_still_arrives() {
    let (addr, _) = server(|mut s, _| async move {
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap(); // until the client's FIN
        s.write_all(format!("you said {}", String::from_utf8_lossy(&got)).as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
    })
    .await;
    let proxy = tcp_proxy(&[addr], "", "").await;
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "you said hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_half_close_reaches_the_client_and_later_client_bytes_still_arrive() {
    let seen = Arc::new(Mutex::new(String::new()));
    let seen_by_server = seen.clone();
    let (addr, _) = server(move |mut s, _| {
        let seen = seen_by_server.clone();
        async move {
            s.write_all(b"greeting").await.unwrap();
            s.shutdown().await.unwrap(); // half-close: still reading
            let mut got = vec![0u8; 64];
            let mut all = Vec::new();
            // Until EOF, or the RST that stands in for the client's FIN.
            while let Ok(n) = s.read(&mut got).await {
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&got[..n]);
            }
            *seen.lock().unwrap() = String::from_utf8_lossy(&all).into_owned();
        }
    })
    .await;
    let proxy = tcp_proxy(&[addr], "", "").await;
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut greeting = String::new();
    s.read_to_string(&mut greeting).await.unwrap(); // EOF = the server's half-close
    assert_eq!(greeting, "greeting");
    s.write_all(b"late data").await.unwrap();
    s.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(*seen.lock().unwrap(), "late data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_that_greets_and_closes_first_keeps_no_time_wait() {
    let greet = |mut s: TcpStream, _| async move {
        let _ = s.write_all(b"220 hello\r\n").await;
        drop(s); // the server closes first, as memcached's quit or HTTP/1.0 servers do
    };
    async fn clients(addr: SocketAddr, n: usize) -> usize {
        let mut ok = 0;
        for _ in 0..n {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut got = Vec::new();
            if s.read_to_end(&mut got).await.is_ok() && got == b"220 hello\r\n" {
                ok += 1;
            }
        }
        ok
    }
    let (direct, _) = server(greet).await;
    assert_eq!(clients(direct, 1000).await, 1000);
    let (backend, _) = server(greet).await;
    let proxy = tcp_proxy(&[backend], "", "").await;
    assert_eq!(clients(proxy.addr(), 1000).await, 1000);
    settle().await;
    let direct_tw = time_wait_on_port(direct.port());
    let proxied_tw = time_wait_on_port(backend.port());
    println!("greet-and-close server: TIME_WAIT direct {direct_tw}, behind waitless {proxied_tw}");
    assert!(direct_tw > 0);
    assert_eq!(proxied_tw, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_bounds_server_connections_and_the_rest_wait_then_close() {
    // The server echoes one message, then holds the connection until told to let go; it
    // counts how many it holds at once.
    let held = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let (h, m, r) = (held.clone(), most.clone(), release.clone());
    let (addr, accepts) = server(move |mut s, _| {
        let (held, most, release) = (h.clone(), m.clone(), r.clone());
        async move {
            let now = held.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let mut b = [0u8; 4];
            if s.read_exact(&mut b).await.is_ok() && s.write_all(&b).await.is_ok() {
                let let_go = release.notified();
                let _ = tokio::time::timeout(Duration::from_secs(20), let_go).await;
            }
            held.fetch_sub(1, Ordering::SeqCst);
        }
    })
    .await;
    let proxy = tcp_proxy(
        &[addr],
        "",
        "max_connections = 2\nconnect_timeout = \"300ms\"",
    )
    .await;
    let proxy_addr = proxy.addr();
    // Six clients at once: each sends a ping and reads until its echo or its close.
    let clients: Vec<_> = (0..6)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(proxy_addr).await.unwrap();
                s.write_all(b"ping").await.unwrap();
                let mut echo = [0u8; 4];
                let served = tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut echo))
                    .await
                    .expect("the client was neither served nor closed")
                    .is_ok();
                (served, s)
            })
        })
        .collect();
    let mut served = Vec::new();
    let mut turned_away = 0;
    for c in clients {
        match c.await.unwrap() {
            (true, s) => served.push(s),
            (false, _) => turned_away += 1,
        }
    }
    assert_eq!(
        most.load(Ordering::SeqCst),
        2,
        "the server held more connections from waitless at once than max_connections"
    );
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        2,
        "server connections opened"
    );
    assert_eq!(
        (served.len(), turned_away),
        (2, 4),
        "(served, closed after the wait)"
    );
    // Once the two let go, their room is free for the next client.
    release.notify_waiters();
    drop(served);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while held.load(Ordering::SeqCst) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server still holds connections"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut s = TcpStream::connect(proxy_addr).await.unwrap();
    s.write_all(b"pong").await.unwrap();
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"pong");
    release.notify_waiters();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preconnected_connection_carries_the_first_byte() {
    // Records, per accepted connection, its accept order and whether client bytes arrived.
    let first_data_on = Arc::new(Mutex::new(None::<usize>));
    let record = first_data_on.clone();
    let (addr, accepts) = server(move |mut s, n| {
        let record = record.clone();
        async move {
            let mut b = [0u8; 4];
            if s.read_exact(&mut b).await.is_ok() {
                record.lock().unwrap().get_or_insert(n);
                let _ = s.write_all(&b).await;
            }
        }
    })
    .await;
    let proxy = tcp_proxy(&[addr], "", "preconnect = 2").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while accepts.load(Ordering::SeqCst) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "preconnect opened nothing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before_client = accepts.load(Ordering::SeqCst);
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
    let carried_by = first_data_on.lock().unwrap().expect("data arrived");
    assert!(
        carried_by < before_client,
        "the first byte came on connection #{carried_by}, opened after the client connected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_reading_proxy_headers_see_the_client_address() {
    for version in ["v1", "v2"] {
        let seen = Arc::new(Mutex::new(None::<SocketAddr>));
        let record = seen.clone();
        let (addr, _) = server(move |mut s, _| {
            let record = record.clone();
            async move {
                let mut buf = vec![0u8; 512];
                let n = s.read(&mut buf).await.unwrap();
                let src = match ppp::HeaderResult::parse(&buf[..n]) {
                    ppp::HeaderResult::V1(Ok(h)) => match h.addresses {
                        ppp::v1::Addresses::Tcp4(a) => {
                            Some(SocketAddr::from((a.source_address, a.source_port)))
                        }
                        _ => None,
                    },
                    ppp::HeaderResult::V2(Ok(h)) => match h.addresses {
                        ppp::v2::Addresses::IPv4(a) => {
                            Some(SocketAddr::from((a.source_address, a.source_port)))
                        }
                        _ => None,
                    },
                    _ => None,
                };
                *record.lock().unwrap() = src;
                let _ = s.write_all(b"ok").await;
            }
        })
        .await;
        let proxy = tcp_proxy(&[addr], "", &format!("proxy_protocol = \"{version}\"")).await;
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let me = s.local_addr().unwrap();
        s.write_all(b"x").await.unwrap();
        let mut ok = [0u8; 2];
        s.read_exact(&mut ok).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), Some(me), "PROXY {version}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_from_the_load_balancers_proxy_header_is_passed_on() {
    let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let record = seen.clone();
    let (addr, _) = server(move |mut s, _| {
        let record = record.clone();
        async move {
            // The onward header and the client's first bytes, however they are segmented.
            let mut all = Vec::new();
            let mut buf = vec![0u8; 512];
            while !all.ends_with(b"payload") && !all.ends_with(b"x") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => all.extend_from_slice(&buf[..n]),
                }
            }
            *record.lock().unwrap() = all;
            let _ = s.write_all(b"ok").await;
        }
    })
    .await;
    let proxy = tcp_proxy(
        &[addr],
        "accept_proxy_protocol = true",
        "proxy_protocol = \"v1\"",
    )
    .await;
    // The load balancer's header, then the client's bytes in the same segment.
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 80\r\npayload")
        .await
        .unwrap();
    let mut ok = [0u8; 2];
    s.read_exact(&mut ok).await.unwrap();
    let got = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    assert!(got.starts_with("PROXY TCP4 192.0.2.1 "), "{got:?}");
    assert!(got.contains(" 5555 "), "{got:?}");
    // The header was consumed, the payload was not.
    assert!(got.ends_with("\r\npayload"), "{got:?}");

    // A malformed header closes that connection only.
    let mut bad = TcpStream::connect(proxy.addr()).await.unwrap();
    bad.write_all(b"GARBAGE that is no PROXY header\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = bad.read_to_end(&mut rest).await; // EOF or reset
    assert!(rest.is_empty());
    // Reset and recorded as a refusal, as every connection turned away before an exchange.
    let stats = proxy.stats().await;
    let ledger = &stats["listeners"][0]["ledger"];
    assert_eq!(
        closes(ledger, "proxy", "rst", "refused"),
        1,
        "ledger: {ledger}"
    );
    let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
    again
        .write_all(b"PROXY TCP4 192.0.2.9 127.0.0.1 6666 80\r\nx")
        .await
        .unwrap();
    again.read_exact(&mut ok).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_listeners_serve_http_and_tcp_and_replace_stale_files() {
    use tokio::net::UnixStream;
    let backend = Backend::start(BackendMode::Echo).await;
    let (echo, _) = server(|mut s, _| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    let dir = TempDir::new("unix");
    let http_sock = dir.0.join("http.sock");
    let tcp_sock = dir.0.join("tcp.sock");
    // A stale socket file from a dead process.
    drop(std::os::unix::net::UnixListener::bind(&http_sock).unwrap());
    assert!(http_sock.exists());
    let admin = free_port();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"unix:{}\"\nmode = \"0660\"\nupstream = \"web\"\n\n\
         [[listener]]\nname = \"raw\"\nlisten = \"unix:{}\"\nprotocol = \"tcp\"\nupstream = \"raw\"\n\n\
         [[upstream]]\nname = \"web\"\nservers = [\"{}\"]\n\n\
         [[upstream]]\nname = \"raw\"\nservers = [\"{echo}\"]\n",
        http_sock.display(),
        tcp_sock.display(),
        backend.addr
    );
    let proxy = Waitless::launch(&config, 0, admin).await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&http_sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);

    let mut s = UnixStream::connect(&http_sock).await.unwrap();
    s.write_all(b"GET /bytes/100 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    assert!(
        resp.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    assert!(resp.ends_with(&pattern(100)));

    let mut t = UnixStream::connect(&tcp_sock).await.unwrap();
    t.write_all(b"over unix").await.unwrap();
    t.shutdown().await.unwrap();
    let mut back = Vec::new();
    t.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"over unix");

    // A second waitless must not steal a live socket.
    let admin2 = free_port();
    let again = config.replace(
        &format!("127.0.0.1:{admin}"),
        &format!("127.0.0.1:{admin2}"),
    );
    let path = dir.0.join("second.toml");
    std::fs::write(&path, again).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_waitless"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_clients_refused_at_max_clients_are_reset_and_in_the_ledger() {
    const REFUSED: usize = 50;
    // The server echoes until the client leaves.
    let (addr, _) = server(|mut s, _| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    let proxy = tcp_proxy(&[addr], "max_clients = 2", "").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(b"hi").await.unwrap();
        let mut back = [0u8; 2];
        s.read_exact(&mut back).await.unwrap();
        held.push(s);
    }
    for i in 0..REFUSED {
        let (got, reset) = refused_or_read(proxy.addr()).await;
        assert!(got.is_empty(), "refused client {i} got {got:?}");
        assert!(reset, "refused client {i} was not reset");
    }
    settle().await;

    let stats = proxy.stats().await;
    let listener = &stats["listeners"][0];
    let ledger = &listener["ledger"];
    assert_eq!(
        closes(ledger, "proxy", "rst", "refused"),
        REFUSED as u64,
        "ledger: {ledger}"
    );
    assert_eq!(count(&ledger["closed"]), REFUSED as u64, "ledger: {ledger}");
    // Where the ledger says TIME_WAIT went, the kernel has it: nowhere.
    let proxy_tw = time_wait_on_port(proxy.port);
    let client_tw = sockets_to_port("time-wait", proxy.port);
    println!("refused at max_clients: TIME_WAIT proxy {proxy_tw}, client {client_tw}");
    assert_eq!(count(&ledger["time_wait_proxy"]), proxy_tw as u64);
    assert_eq!(count(&ledger["time_wait_peer"]), client_tw as u64);
    assert_eq!(count(&listener["census"]["time_wait"]), proxy_tw as u64);
    assert_eq!((proxy_tw, client_tw), (0, 0));
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_that_greets_and_closes_first_is_reset_and_labelled_peer_closed() {
    const N: usize = 200;
    let (backend, _) = server(|mut s: TcpStream, _| async move {
        let _ = s.write_all(b"220 hello\r\n").await;
        drop(s); // the server closes first
    })
    .await;
    // "reset": the relay ends the client connection as soon as the server closed.
    let proxy = tcp_proxy(&[backend], "linger_fallback = \"reset\"", "").await;
    for i in 0..N {
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let (got, _) = read_to_end_or_reset(&mut s).await;
        assert_eq!(got, b"220 hello\r\n", "client {i}");
    }
    settle().await;

    let stats = proxy.stats().await;
    let server_ledger = &stats["upstreams"][0]["servers"][0]["ledger"];
    assert_eq!(
        closes(server_ledger, "peer", "rst", "peer_closed"),
        N as u64,
        "server ledger: {server_ledger}"
    );
    assert_eq!(count(&server_ledger["closed"]), N as u64);
    // The client side says what happened to it: its server closed first.
    let client_ledger = &stats["listeners"][0]["ledger"];
    let server_closed = closes(client_ledger, "proxy", "rst", "server_closed")
        + closes(client_ledger, "proxy", "fin", "server_closed");
    assert_eq!(server_closed, N as u64, "client ledger: {client_ledger}");

    let server_tw = time_wait_on_port(backend.port());
    let to_server_tw = sockets_to_port("time-wait", backend.port());
    let listener_tw = time_wait_on_port(proxy.port);
    println!(
        "server closes first: TIME_WAIT server {server_tw}, waitless to it {to_server_tw}, \
         listener {listener_tw}"
    );
    assert_eq!(server_tw, 0, "TIME_WAIT on the server");
    assert_eq!(
        to_server_tw, 0,
        "TIME_WAIT on waitless's side of the server connections"
    );
    assert_eq!(count(&client_ledger["time_wait_proxy"]), listener_tw as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_with_no_upstream_reachable_is_reset_under_fin_fallback() {
    const N: usize = 20;
    // A port nobody listens on.
    let gone = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let proxy = tcp_proxy(&[gone], "linger_fallback = \"fin\"", "").await;
    for i in 0..N {
        let (got, reset) = refused_or_read(proxy.addr()).await;
        assert!(got.is_empty(), "client {i} got {got:?}");
        assert!(reset, "client {i} was closed with FIN, not reset");
    }
    settle().await;
    let stats = proxy.stats().await;
    let ledger = &stats["listeners"][0]["ledger"];
    assert_eq!(
        closes(ledger, "proxy", "rst", "refused"),
        N as u64,
        "ledger: {ledger}"
    );
    let proxy_tw = time_wait_on_port(proxy.port);
    println!("no upstream reachable: TIME_WAIT proxy {proxy_tw}");
    assert_eq!(proxy_tw, 0, "TIME_WAIT on waitless's listener port");
}
