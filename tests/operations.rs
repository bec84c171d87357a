//! Production operation, from outside: drain on SIGTERM, reload on SIGHUP, slow-header
//! clients, dead servers, the client connection limit, and the shipped deployment configs.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn signal(proxy: &Waitless, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(proxy.child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill failed");
}

fn config_text(port: u16, admin: u16, servers: &[SocketAddr], extra_upstream: &str) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:{port}\"\nupstream = \"web\"\n\n\
         [[upstream]]\nname = \"web\"\nservers = [{}]\n{extra_upstream}\n",
        servers.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_every_started_request_finish_then_exits_zero() {
    let backend = Backend::start(BackendMode::Echo).await;
    let mut proxy = Waitless::start(&[backend.addr], "", "").await;
    // Requests that take 800 ms each, in flight when SIGTERM arrives.
    let mut inflight = Vec::new();
    for _ in 0..8 {
        inflight.push(tokio::spawn(get(proxy.addr(), "/sleep/800", true)));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(&proxy, libc::SIGTERM);
    // While they finish, new clients are refused at once (a load balancer moves on), not
    // left in a backlog nobody accepts from.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(proxy.addr()).await.is_err(),
        "a client was let in while draining"
    );
    for r in inflight {
        let (status, body) = r.await.unwrap().expect("a started request must complete");
        assert_eq!((status, &body[..]), (200, &b"slept"[..]));
    }
    let exited = tokio::task::spawn_blocking(move || {
        let status = proxy.child.wait().expect("wait");
        (status, proxy)
    })
    .await
    .unwrap();
    assert!(exited.0.success(), "waitless exited with {:?}", exited.0);
    // New connections are refused once it drained.
    assert!(TcpStream::connect(exited.1.addr()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_changed_upstream_under_load_gives_no_errors() {
    let a = Backend::start(BackendMode::Echo).await;
    let b = Backend::start(BackendMode::Echo).await;
    let port = free_port();
    let admin = free_port();
    let proxy = Waitless::launch(&config_text(port, admin, &[a.addr], ""), port, admin).await;
    let path = proxy.dir.0.join("waitless.toml");

    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, errors, done, addr) = (stop.clone(), errors.clone(), done.clone(), proxy.addr());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match get(addr, "/bytes/64", true).await {
                    Ok((200, body)) if body.len() == 64 => done.fetch_add(1, Ordering::SeqCst),
                    other => {
                        eprintln!("error: {other:?}");
                        errors.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(&path, config_text(port, admin, &[b.addr], "pool_size = 4")).unwrap();
    signal(&proxy, libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before_bad = b.requests.load(Ordering::SeqCst);
    // A broken config is refused and the running one stays.
    std::fs::write(&path, "[[listener]]\nname = 1\n").unwrap();
    signal(&proxy, libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    println!(
        "reload under load: {} requests, {} errors; new upstream served {}",
        done.load(Ordering::SeqCst),
        errors.load(Ordering::SeqCst),
        b.requests.load(Ordering::SeqCst)
    );
    assert_eq!(errors.load(Ordering::SeqCst), 0);
    assert!(
        before_bad > 0,
        "the new upstream got no traffic after SIGHUP"
    );
    assert!(
        b.requests.load(Ordering::SeqCst) > before_bad,
        "traffic stopped after a refused reload"
    );
    let a_before = a.requests.load(Ordering::SeqCst);
    assert_eq!(get(proxy.addr(), "/", true).await.unwrap().0, 200);
    assert_eq!(
        a.requests.load(Ordering::SeqCst),
        a_before,
        "old upstream still used"
    );
}

/// `waitless reload`: Ok with what it printed, or Err with what it printed to stderr.
fn reload_via_admin(admin: u16) -> Result<String, String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_waitless"))
        .args(["reload", "--admin", &format!("127.0.0.1:{admin}")])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A reload keeps the pool of an upstream whose settings did not change, warm connection
/// and all; a refused reload changes nothing; a changed upstream gets a new pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_an_unchanged_upstreams_warm_connection_and_replaces_a_changed_one() {
    let backend = Backend::start(BackendMode::Echo).await;
    let (port, admin) = (free_port(), free_port());
    // One worker: one idle list, so every request can reuse the one warm connection.
    let config = |listener_extra: &str, upstream_extra: &str| {
        format!(
            "workers = 1\n{}",
            config_text(port, admin, &[backend.addr], upstream_extra).replace(
                "upstream = \"web\"\n\n",
                &format!("upstream = \"web\"\n{listener_extra}\n\n")
            )
        )
    };
    let proxy = Waitless::launch(&config("", ""), port, admin).await;
    let path = proxy.dir.0.join("waitless.toml");
    let served = || async {
        for _ in 0..5 {
            assert_eq!(get(proxy.addr(), "/", true).await.unwrap().0, 200);
        }
    };
    served().await;
    assert_eq!(
        backend.accepts(),
        1,
        "one warm connection before any reload"
    );

    // A listener setting changed, the upstream did not: its pool and connection stay.
    std::fs::write(&path, config("max_clients = 100", "")).unwrap();
    assert!(reload_via_admin(admin).unwrap().contains("reloaded"));
    served().await;
    assert_eq!(
        backend.accepts(),
        1,
        "a reload that left the upstream alone opened a new connection"
    );

    // Refused (a tcp listener may not share the http listener's upstream): nothing changes.
    let mixed = format!(
        "{}\n[[listener]]\nname = \"raw\"\nlisten = \"127.0.0.1:{}\"\nprotocol = \"tcp\"\n\
         upstream = \"web\"\n",
        config("", ""),
        free_port()
    );
    std::fs::write(&path, mixed).unwrap();
    assert!(
        reload_via_admin(admin).is_err(),
        "a mixed-protocol upstream was taken"
    );
    served().await;
    assert_eq!(backend.accepts(), 1, "a refused reload replaced the pool");

    // The upstream changed: a new pool, which opens its own connection.
    std::fs::write(&path, config("", "pool_size = 4")).unwrap();
    assert!(reload_via_admin(admin).unwrap().contains("reloaded"));
    served().await;
    assert_eq!(backend.accepts(), 2, "a changed upstream kept its old pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_at_the_header_timeout_while_others_are_served() {
    let backend = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[backend.addr], "header_timeout = \"1s\"", "").await;
    let mut slow = TcpStream::connect(proxy.addr()).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let dribble = dribbled_until_cut(&mut slow, 40, Duration::from_millis(250));
    let served = async {
        for _ in 0..20 {
            assert_eq!(get(proxy.addr(), "/", true).await.unwrap().0, 200);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (cut, ()) = tokio::join!(dribble, served);
    assert!(cut, "a client dribbling its header for 10 s was never cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_is_marked_down_and_idempotent_traffic_moves_without_errors() {
    let a = Backend::start(BackendMode::Echo).await;
    let b = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(
        &[a.addr, b.addr],
        "",
        "fail_threshold = 2\nfail_backoff = \"30s\"",
    )
    .await;
    let mut errors = 0;
    for i in 0..200 {
        if i == 50 {
            a.kill();
        }
        match get(proxy.addr(), "/bytes/10", false).await {
            Ok((200, body)) if body.len() == 10 => {}
            other => {
                errors += 1;
                eprintln!("request {i}: {other:?}");
            }
        }
    }
    assert_eq!(errors, 0, "client errors after a server died");
    let stats = proxy.stats().await;
    let servers = stats["upstreams"][0]["servers"].as_array().unwrap();
    let state_of = |addr: SocketAddr| {
        servers
            .iter()
            .find(|s| s["server"] == addr.to_string())
            .map(|s| s["state"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(state_of(a.addr).as_deref(), Some("down"), "{stats}");
    assert_eq!(state_of(b.addr).as_deref(), Some("up"));
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_waitless"))
        .args(["stats", "--admin", &format!("127.0.0.1:{}", proxy.admin)])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("down"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_servers_down_gives_503() {
    let a = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[a.addr], "", "fail_threshold = 1\nfail_backoff = \"30s\"").await;
    a.kill();
    let (first, _) = get(proxy.addr(), "/", true).await.unwrap();
    assert_eq!(first, 502, "the failing connect itself");
    let (status, body) = get(proxy.addr(), "/", true).await.unwrap();
    assert_eq!(status, 503);
    assert!(String::from_utf8_lossy(&body).contains("no server is up"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_answers_503_beyond_max_clients() {
    let backend = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[backend.addr], "max_clients = 2", "").await;
    // Two clients hold their connections open.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(b"GET /bytes/3 HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let (status, body) = get(proxy.addr(), "/", true).await.unwrap();
    assert_eq!(status, 503);
    assert!(String::from_utf8_lossy(&body).contains("max_clients"));
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(proxy.addr(), "/", true).await.unwrap().0, 200);
}

/// Clients turned away at `max_clients` are counted where an operator looks: /stats, /metrics
/// and the `waitless stats` table, which also shows the client still connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_turned_away_at_max_clients_show_as_rejected_in_stats_metrics_and_table() {
    let backend = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[backend.addr], "max_clients = 1", "").await;
    let mut held = TcpStream::connect(proxy.addr()).await.unwrap();
    held.write_all(b"GET /bytes/3 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = held.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    for _ in 0..3 {
        assert_eq!(get(proxy.addr(), "/", true).await.unwrap().0, 503);
    }

    let stats = proxy.stats().await;
    assert_eq!(stats["listeners"][0]["rejected"], 3, "{stats}");
    let metrics = proxy.admin_get("/metrics").await;
    assert!(
        metrics.contains("# HELP waitless_client_connections_rejected"),
        "{metrics}"
    );
    assert!(
        metrics.contains("waitless_client_connections_rejected_total{listener=\"web\"} 3"),
        "{metrics}"
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_waitless"))
        .args(["stats", "--admin", &format!("127.0.0.1:{}", proxy.admin)])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(table.contains("rejected 3"), "{table}");
    // The one client let in is still connected.
    assert!(table.contains("open 1  connections 1"), "{table}");
}

#[test]
fn shipped_deployment_configs_pass_check() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_waitless"))
            .args(["check", "--config"])
            .arg(&path)
            .env("APP_DB_PASSWORD", "example")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(
        checked >= 4,
        "config/ should ship the default and three deployment configs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_serves_from_one_small_pool_and_a_second_instance_cannot_share_the_port() {
    let backend = Backend::start(BackendMode::Echo).await;
    let (port, admin) = (free_port(), free_port());
    // More workers than cores: each has its own socket in the port's SO_REUSEPORT group.
    let config = format!(
        "workers = 4\n{}",
        config_text(port, admin, &[backend.addr], "pool_size = 8")
    );
    let proxy = Waitless::launch(&config, port, admin).await;
    let addr = proxy.addr();
    let failed = run_load(2_000, 8, move || async move {
        matches!(get(addr, "/", true).await, Ok((200, _)))
    })
    .await;
    assert_eq!(failed, 0);
    // Short clients spread over four workers still share the pool's few connections.
    assert!(
        backend.accepts() <= 16,
        "backend accepted {} connections for 2,000 requests",
        backend.accepts()
    );

    // SO_REUSEPORT would let a second process with the option join the port and take half
    // the clients; waitless checks first and refuses.
    let dir = TempDir::new("second");
    let path = dir.0.join("second.toml");
    std::fs::write(
        &path,
        config.replace(&admin.to_string(), &free_port().to_string()),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_waitless"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a second waitless started on a live port"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot listen on"), "{stderr}");
    assert!(matches!(get(addr, "/", true).await, Ok((200, _))));
}

/// HTTP listeners defer accept (TCP_DEFER_ACCEPT): a client that has connected but not yet
/// spoken waits in the kernel, costing waitless nothing, and is served once it sends; one that
/// stays silent is still handed over about a second later, and cut at the header timeout.
/// `defer_accept = false`, here set by a reload, accepts at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_has_not_spoken_waits_in_the_kernel_and_is_still_served_or_cut() {
    let backend = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[backend.addr], "header_timeout = \"2s\"", "").await;
    let mut speaker = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut silent = TcpStream::connect(proxy.addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Both clients finished their handshake; the kernel holds both as request sockets.
    assert_eq!(sockets_on_port("syn-recv", proxy.port), 2);
    assert_eq!(sockets_on_port("established", proxy.port), 0);
    assert_eq!(proxy.stats().await["listeners"][0]["connections"], 0);

    speaker
        .write_all(b"GET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    speaker.read_to_end(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");

    let mut byte = [0u8; 1];
    let cut = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut byte)).await;
    assert!(
        matches!(cut, Ok(Ok(0)) | Ok(Err(_))),
        "a silent client was not cut within 10 s: {cut:?}"
    );
    assert_eq!(proxy.stats().await["listeners"][0]["connections"], 2);

    // Turned off by a reload, on the same listening sockets.
    let path = proxy.dir.0.join("waitless.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("header_timeout", "defer_accept = false\nheader_timeout"),
    )
    .unwrap();
    signal(&proxy, libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let _quiet = TcpStream::connect(proxy.addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sockets_on_port("syn-recv", proxy.port), 0);
    assert_eq!(sockets_on_port("established", proxy.port), 1);
    assert_eq!(proxy.stats().await["listeners"][0]["connections"], 3);
}
