//! TLS to the servers, checked from outside: an nginx HTTPS backend with its own certificate
//! signed by a test CA, plain-HTTP clients through http and tcp listeners, the connections
//! nginx saw (its log's `$connection`), waitless's log, /stats, /metrics and the kernel's
//! socket table.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::tempdir::TempDir;
use common::*;
use tokio::net::TcpStream;

/// A test CA and a `localhost` server certificate it signed (RSA-2048, also 127.0.0.1), made
/// with the openssl CLI.
fn make_certs() -> TempDir {
    let dir = TempDir::new("upstream-tls-certs");
    let leaf = common::certs::Leaf {
        file: "server",
        cn: "localhost",
        ecdsa: false,
        san: "DNS:localhost,IP:127.0.0.1",
    };
    common::certs::make(&dir.0, &[leaf]).unwrap_or_else(|e| panic!("{e}"));
    dir
}

/// nginx serving HTTPS on a private port with `certs`' server certificate, logging each
/// request's connection serial number; None when nginx is not installed.
struct HttpsNginx {
    child: std::process::Child,
    port: u16,
    dir: TempDir,
}

impl HttpsNginx {
    async fn start(certs: &Path) -> Option<HttpsNginx> {
        let bin = common::nginx::binary()?;
        let port = free_port();
        let dir = TempDir::new("nginx-https");
        let d = dir.0.display();
        let c = certs.display();
        let server = format!(
            "  log_format conn '$connection $ssl_session_reused';\n\
             server {{\n    listen 127.0.0.1:{port} ssl;\n\
             ssl_certificate {c}/server.pem;\n    ssl_certificate_key {c}/server.key;\n\
             keepalive_requests 100000;\n    access_log {d}/conn.log conn;\n\
             location / {{ return 200 \"hello over tls\\n\"; }}\n  }}\n"
        );
        let conf = common::nginx::config(&dir.0, "worker_processes 1;\n", 4096, &server);
        std::fs::write(dir.0.join("nginx.conf"), conf).ok()?;
        let child = common::nginx::command(&bin, &dir.0, false)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let n = HttpsNginx { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Some(n);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "nginx did not start: {:?}",
            std::fs::read_to_string(n.dir.0.join("error.log"))
        );
    }

    /// TIME_WAIT on either end of connections to it.
    fn time_wait(&self) -> usize {
        time_wait_on_port(self.port) + sockets_to_port("time-wait", self.port)
    }

    /// The connections its requests came on, as nginx numbered them.
    fn connections(&self) -> HashSet<String> {
        self.log()
            .iter()
            .filter_map(|l| l.split(' ').next())
            .map(str::to_string)
            .collect()
    }

    /// Requests whose connection resumed an earlier TLS session (`$ssl_session_reused`).
    fn resumed(&self) -> usize {
        self.log().iter().filter(|l| l.ends_with(" r")).count()
    }

    /// Its log's lines: `$connection $ssl_session_reused`.
    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.0.join("conn.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for HttpsNginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A whole config: one listener of `protocol` in front of `backend` over TLS.
fn config(port: u16, admin: u16, protocol: &str, backend: u16, tls: &str, extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[listener]]\nname = \"front\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"{protocol}\"\n\
         upstream = \"api\"\n\n\
         [[upstream]]\nname = \"api\"\nservers = [\"127.0.0.1:{backend}\"]\n{tls}\n{extra}\n"
    )
}

fn tls_key(certs: &Path, server_name: &str) -> String {
    let ca: PathBuf = certs.join("ca.pem");
    format!("tls = {{ ca = {ca:?}, server_name = \"{server_name}\" }}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_clients_reach_an_https_backend_over_at_most_pool_size_tls_connections() {
    let certs = make_certs();
    let Some(nginx) = HttpsNginx::start(&certs.0).await else {
        eprintln!("skipped: nginx is not installed");
        return;
    };
    // The start-up probe's connect, closed by the test first, left its TIME_WAIT.
    settle().await;
    let probe_time_wait = nginx.time_wait();
    let (port, admin) = (free_port(), free_port());
    let text = config(
        port,
        admin,
        "http",
        nginx.port,
        &tls_key(&certs.0, "localhost"),
        "pool_size = 4\ntime_wait = \"none\"",
    );
    let proxy = Waitless::launch(&text, port, admin).await;
    // As many clients at once as the pool holds: none waits, none needs a fifth connection.
    let failed = short_load(proxy.addr(), 2000, 4).await;
    assert_eq!(failed, 0, "every short client gets nginx's 200");
    settle().await;

    let seen = nginx.connections();
    assert!(
        !seen.is_empty() && seen.len() <= 4,
        "2,000 clients came over {} TLS connections to nginx, pool_size is 4",
        seen.len()
    );
    let stats = proxy.stats().await;
    let tls = &stats["upstreams"][0]["tls"];
    assert_eq!(
        tls["handshakes"].as_u64(),
        Some(seen.len() as u64),
        "one handshake per pooled connection: {tls}"
    );
    let metrics = proxy.admin_get("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("waitless_tls_handshakes_total")
                && l.contains("side=\"upstream\"")
                && l.contains("name=\"api\"")),
        "/metrics counts upstream handshakes:\n{metrics}"
    );
    assert_eq!(
        nginx.time_wait(),
        probe_time_wait,
        "time_wait = none leaves no TIME_WAIT on either end of the backend's connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_for_another_name_is_a_502_with_the_reason_logged() {
    let certs = make_certs();
    let Some(nginx) = HttpsNginx::start(&certs.0).await else {
        eprintln!("skipped: nginx is not installed");
        return;
    };
    let (port, admin) = (free_port(), free_port());
    let text = config(
        port,
        admin,
        "http",
        nginx.port,
        &tls_key(&certs.0, "api.internal"),
        "",
    );
    let (proxy, log) = Waitless::launch_logged(&text, port, admin, "warn").await;
    let (status, _) = get(proxy.addr(), "/", true).await.expect("an answer");
    assert_eq!(status, 502);
    settle().await;
    let logged = std::fs::read_to_string(&log).unwrap();
    let line = logged
        .lines()
        .find(|l| l.contains("certificate"))
        .unwrap_or_else(|| panic!("no certificate error in the log:\n{logged}"));
    assert!(
        line.contains("api") && line.contains(&format!("127.0.0.1:{}", nginx.port)),
        "the line names upstream and server: {line}"
    );
    let metrics = proxy.admin_get("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("waitless_tls_handshake_errors_total")
                && l.contains("side=\"upstream\"")
                && l.contains("reason=\"certificate\"")
                && l.ends_with(" 1")),
        "/metrics counts the failed verification:\n{metrics}"
    );
    assert!(nginx.connections().is_empty(), "no request reached nginx");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_listener_relays_plain_http_to_an_https_backend_resuming_tls_sessions() {
    let certs = make_certs();
    let Some(nginx) = HttpsNginx::start(&certs.0).await else {
        eprintln!("skipped: nginx is not installed");
        return;
    };
    let (port, admin) = (free_port(), free_port());
    let text = config(
        port,
        admin,
        "tcp",
        nginx.port,
        &tls_key(&certs.0, "localhost"),
        "time_wait = \"none\"",
    );
    let proxy = Waitless::launch(&text, port, admin).await;
    for _ in 0..20 {
        let (status, body) = get(proxy.addr(), "/", true).await.expect("an answer");
        assert_eq!(status, 200);
        assert_eq!(&body[..], b"hello over tls\n");
    }
    let out = Command::new("curl")
        .args(["-s", &format!("http://127.0.0.1:{port}/")])
        .output()
        .expect("curl must be installed");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello over tls\n");
    settle().await;
    assert_eq!(
        nginx.connections().len(),
        21,
        "one TLS connection per client"
    );
    assert_eq!(
        nginx.resumed(),
        20,
        "every connection after the first resumed a TLS session"
    );
    drop(proxy);
}

#[test]
fn check_names_a_missing_or_empty_ca_file() {
    let dir = TempDir::new("upstream-tls-check");
    std::fs::write(dir.0.join("empty.pem"), "").unwrap();
    for (ca, says) in [
        ("missing.pem", "cannot read"),
        ("empty.pem", "no certificate"),
    ] {
        let text = format!(
            "[[listener]]\nname = \"front\"\nlisten = \"127.0.0.1:1\"\nprotocol = \"http\"\n\
             upstream = \"api\"\n\n[[upstream]]\nname = \"api\"\nservers = [\"127.0.0.1:2\"]\n\
             tls = {{ ca = \"{ca}\" }}\n"
        );
        let file = dir.0.join("waitless.toml");
        std::fs::write(&file, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_waitless"))
            .arg("check")
            .arg("--config")
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{ca}: check passed");
        assert!(
            err.contains(&dir.0.join(ca).display().to_string()) && err.contains(says),
            "{ca}: {err}"
        );
    }
}

#[test]
fn check_refuses_upstream_tls_where_it_is_not_available_yet() {
    let dir = TempDir::new("upstream-tls-refused");
    let certs = make_certs();
    let ca = certs.0.join("ca.pem");
    for (protocol, extra, says) in [
        ("mysql", "", "mysql listener"),
        ("http", "health_check = { kind = \"http\" }", "health check"),
        ("tcp", "proxy_protocol = \"v1\"", "proxy_protocol"),
    ] {
        let text = format!(
            "[[listener]]\nname = \"front\"\nlisten = \"127.0.0.1:1\"\nprotocol = \"{protocol}\"\n\
             upstream = \"api\"\n\n[[upstream]]\nname = \"api\"\nservers = [\"127.0.0.1:2\"]\n\
             tls = {{ ca = {ca:?} }}\n{extra}\n\n\
             [[mysql_user]]\nuser = \"u\"\npassword = \"p\"\n"
        );
        let file = dir.0.join("waitless.toml");
        std::fs::write(&file, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_waitless"))
            .arg("check")
            .arg("--config")
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{protocol} {extra}: check passed");
        assert!(err.contains(says), "{protocol} {extra}: {err}");
    }
}
