//! The access log, read as its users read it: the file waitless writes, line by line, against
//! the requests the test made, the ledger in /stats and the drop counter in /metrics.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The JSON lines of the log at `path`, once `want` are there (or what is there after 5 s).
async fn lines(path: &std::path::Path, want: usize) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let parsed: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        if parsed.len() >= want || tokio::time::Instant::now() >= deadline {
            return parsed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn config(port: u16, admin: u16, servers: &[SocketAddr], log: &str, extra: &str) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[log]\naccess = \"{log}\"\n{extra}\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"http\"\n\
         upstream = \"web\"\ntime_wait = \"proxy\"\n\n\
         [[upstream]]\nname = \"web\"\nservers = [{}]\npool_size = 2\n",
        servers.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_one_json_line_with_its_close_as_the_ledger_has_it() {
    let Some(nginx) = Nginx::start().await else {
        panic!("nginx is not installed: .ci/run installs it (apt-get install nginx)");
    };
    let (port, admin) = (free_port(), free_port());
    let dir = TempDir::new("access");
    let path = dir.0.join("access.log");
    let text = config(
        port,
        admin,
        &[nginx.addr()],
        &path.display().to_string(),
        "",
    );
    let proxy = Waitless::launch(&text, port, admin).await;
    const N: usize = 200;
    assert_eq!(short_load(proxy.addr(), N, 4).await, 0);
    let got = lines(&path, N).await;
    assert_eq!(got.len(), N, "one line per request");
    let server = nginx.addr().to_string();
    let mut time_wait_at_proxy = 0;
    for line in &got {
        assert_eq!(line["listener"], "web", "{line}");
        assert_eq!(line["protocol"], "http", "{line}");
        assert_eq!(line["method"], "GET", "{line}");
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["server"], server.as_str(), "{line}");
        assert!(line["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.1:")));
        assert!(line["reused"].is_boolean(), "{line}");
        assert!(line["bytes_in"].as_u64().unwrap_or(0) > 0, "{line}");
        assert!(line["bytes_out"].as_u64().unwrap_or(0) > 0, "{line}");
        assert!(
            line["total_us"].is_u64() && line["head_us"].is_u64(),
            "{line}"
        );
        assert!(line["time"].as_str().is_some_and(|t| t.ends_with('Z')));
        let close = &line["close"];
        assert!(
            close["reason"].is_string(),
            "a short request's line has its close: {line}"
        );
        if close["time_wait"] == "proxy" {
            time_wait_at_proxy += 1;
        }
    }
    // The lines say what the ledger says.
    let stats = proxy.stats().await;
    let ledger = stats["listeners"][0]["ledger"]["time_wait_proxy"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(time_wait_at_proxy, ledger, "lines against /stats: {stats}");
    assert_eq!(
        ledger as usize, N,
        "time_wait = proxy: every close on waitless"
    );
}

/// A backend that sends a response head announcing a big body, then dribbles it.
async fn slow_backend() -> SocketAddr {
    let sock = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = sock.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n";
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for _ in 0..2000 {
                    if s.write_all(&[b'x'; 1024]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_response_is_logged_with_that_close() {
    let backend = slow_backend().await;
    let (port, admin) = (free_port(), free_port());
    let dir = TempDir::new("access");
    let path = dir.0.join("access.log");
    let text = config(port, admin, &[backend], &path.display().to_string(), "");
    let proxy = Waitless::launch(&text, port, admin).await;
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = c.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // Gone with the response unfinished; its RST ends waitless's writes.
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    let got = lines(&path, 1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let line = &got[0];
    assert_eq!(line["target"], "/big", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    let reason = line["close"]["reason"].as_str().unwrap_or("");
    assert!(
        reason == "error" || reason == "peer_closed",
        "a client gone mid-response: {line}"
    );
    assert_eq!(line["close"]["closer"], "peer", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_cannot_keep_up_drops_lines_and_requests_still_complete() {
    let Some(nginx) = Nginx::start().await else {
        panic!("nginx is not installed: .ci/run installs it (apt-get install nginx)");
    };
    let (port, admin) = (free_port(), free_port());
    let dir = TempDir::new("access");
    // A pipe nobody reads: the writer blocks once its 64 KiB are full.
    let fifo = dir.0.join("access.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo");
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags_nonblock()
        .open(&fifo)
        .expect("open the fifo's reading end");
    let text = config(
        port,
        admin,
        &[nginx.addr()],
        &fifo.display().to_string(),
        "queue = 16",
    );
    let proxy = Waitless::launch(&text, port, admin).await;
    const N: usize = 1500;
    assert_eq!(
        short_load(proxy.addr(), N, 4).await,
        0,
        "every request completes"
    );
    let metrics = proxy.admin_get("/metrics").await;
    let dropped: f64 = metrics
        .lines()
        .find(|l| l.starts_with("waitless_access_log_dropped_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(dropped > 0.0, "the drop counter rose: {metrics}");
    drop(reader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reopens_the_file_logrotate_moved() {
    let Some(nginx) = Nginx::start().await else {
        panic!("nginx is not installed: .ci/run installs it (apt-get install nginx)");
    };
    let (port, admin) = (free_port(), free_port());
    let dir = TempDir::new("access");
    let path = dir.0.join("access.log");
    let text = config(
        port,
        admin,
        &[nginx.addr()],
        &path.display().to_string(),
        "",
    );
    let proxy = Waitless::launch(&text, port, admin).await;
    assert_eq!(short_load(proxy.addr(), 10, 2).await, 0);
    assert_eq!(lines(&path, 10).await.len(), 10);
    let rotated = dir.0.join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    let pid = proxy.child.id().to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status();
    assert!(hup.is_ok_and(|s| s.success()));
    // The reopen is the writer's, within its wake-up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !path.exists() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(short_load(proxy.addr(), 7, 2).await, 0);
    assert_eq!(lines(&path, 7).await.len(), 7, "new lines in the new file");
    assert_eq!(
        lines(&rotated, 10).await.len(),
        10,
        "the old file kept its own"
    );
}

/// Opening a fifo's reading end without waiting for a writer.
trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_sessions_are_one_line_each_with_their_bytes_and_close() {
    // An echo server: what comes in goes back, until the client's FIN.
    let sock = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = sock.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = sock.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let (port, admin) = (free_port(), free_port());
    let dir = TempDir::new("access");
    let path = dir.0.join("access.log");
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[log]\naccess = \"{}\"\n\n\
         [[listener]]\nname = \"relay\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"tcp\"\n\
         upstream = \"echo\"\n\n\
         [[upstream]]\nname = \"echo\"\nservers = [\"{backend}\"]\n",
        path.display()
    );
    let proxy = Waitless::launch(&text, port, admin).await;
    const N: usize = 20;
    for i in 0..N {
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        let msg = format!("ping {i:03}");
        c.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg.as_bytes());
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
    }
    let got = lines(&path, N).await;
    assert_eq!(got.len(), N, "one line per session");
    for line in &got {
        assert_eq!(line["protocol"], "tcp", "{line}");
        assert_eq!(line["listener"], "relay", "{line}");
        assert_eq!(line["server"], backend.to_string().as_str(), "{line}");
        assert_eq!(line["bytes_in"], 8, "{line}");
        assert_eq!(line["bytes_out"], 8, "{line}");
        assert!(
            line["connect_us"].is_u64() && line["total_us"].is_u64(),
            "{line}"
        );
        // The client's FIN came first; the default policy leaves TIME_WAIT with it.
        assert_eq!(line["close"]["closer"], "peer", "{line}");
        assert_eq!(line["close"]["time_wait"], "peer", "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_sessions_are_one_line_each_with_their_user() {
    let db = common::mysql::MariaDb::start().await;
    let mut watcher = db.watcher().await;
    let before = watcher.status("Connections").await;
    let dir = TempDir::new("access");
    let path = dir.0.join("access.log");
    // [log] after the listener's keys: a table of its own, closed by [[upstream]].
    let extra = format!("\n[log]\naccess = \"{}\"\n", path.display());
    let proxy = common::mysql::MysqlProxy::start(db.port, &extra, "pool_size = 2").await;
    const N: usize = 12;
    assert_eq!(common::mysql::short_sessions(proxy.0.port, N, 2).await, 0);
    let got = lines(&path, N).await;
    assert_eq!(got.len(), N, "one line per session: {got:?}");
    for line in &got {
        assert_eq!(line["protocol"], "mysql", "{line}");
        assert_eq!(line["user"], common::mysql::USER, "{line}");
        assert!(line["server"]
            .as_str()
            .is_some_and(|s| s.ends_with(&db.port.to_string())));
        assert!(line["bytes_in"].as_u64().unwrap_or(0) > 0, "{line}");
        assert!(line["close"]["reason"].is_string(), "{line}");
    }
    // A session that got a fresh server connection says so: as many as the server saw opened.
    let opened = watcher.status("Connections").await - before;
    let fresh = got.iter().filter(|l| l["reused"] == false).count();
    let reused = got.iter().filter(|l| l["reused"] == true).count();
    assert_eq!(
        fresh + reused,
        N,
        "every line says whether it reused: {got:?}"
    );
    assert_eq!(
        fresh as u64, opened,
        "fresh sessions against the server's Connections"
    );
}
