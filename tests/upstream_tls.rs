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
/// request's connection serial number, path, PROXY protocol address and session reuse; 404
/// for `/missing`, 200 for any other path; None when nginx is not installed.
struct HttpsNginx {
    child: std::process::Child,
    port: u16,
    dir: TempDir,
}

impl HttpsNginx {
    async fn start(certs: &Path) -> Option<HttpsNginx> {
        HttpsNginx::start_with(certs, "").await
    }

    /// As `start`, with `listen` options after `ssl` (`proxy_protocol`).
    async fn start_with(certs: &Path, listen: &str) -> Option<HttpsNginx> {
        let bin = common::nginx::binary()?;
        let port = free_port();
        let dir = TempDir::new("nginx-https");
        let d = dir.0.display();
        let c = certs.display();
        let server = format!(
            "  log_format conn '$connection $request_uri $proxy_protocol_addr $http_host $ssl_session_reused';\n\
             server {{\n    listen 127.0.0.1:{port} ssl{listen};\n\
             ssl_certificate {c}/server.pem;\n    ssl_certificate_key {c}/server.key;\n\
             keepalive_requests 100000;\n    access_log {d}/conn.log conn;\n\
             location = /missing {{ return 404; }}\n\
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

    /// Its log's lines: `$connection $request_uri $proxy_protocol_addr $http_host
    /// $ssl_session_reused`.
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

/// The health state /stats gives each server of the first upstream, by its address.
fn states(stats: &serde_json::Value) -> Vec<(String, String)> {
    stats["upstreams"][0]["servers"]
        .as_array()
        .map(|servers| {
            servers
                .iter()
                .map(|s| {
                    let field = |k: &str| s[k].as_str().unwrap_or("").to_string();
                    (field("server"), field("state"))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_health_checks_go_over_tls_marking_a_failing_server_down_and_a_passing_one_up() {
    let certs = make_certs();
    let Some(nginx) = HttpsNginx::start(&certs.0).await else {
        eprintln!("skipped: nginx is not installed");
        return;
    };
    // Nothing listens on `down`: its checks cannot connect.
    let down = free_port();
    let (https, gone) = (
        format!("127.0.0.1:{}", nginx.port),
        format!("127.0.0.1:{down}"),
    );
    // A check in plain text to nginx's TLS port would get its 400 and mark it down too; one
    // that took any certificate would pass for a name nginx's does not carry.
    for (name, path, nginx_state) in [
        ("localhost", "/healthz", "up"),
        ("localhost", "/missing", "down"),
        ("api.internal", "/named", "down"),
    ] {
        let (port, admin) = (free_port(), free_port());
        let text = format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
             [[listener]]\nname = \"front\"\nlisten = \"127.0.0.1:{port}\"\nupstream = \"api\"\n\n\
             [[upstream]]\nname = \"api\"\nservers = [\"{https}\", \"{gone}\"]\n{}\n\
             fail_threshold = 1\nfail_backoff = \"60s\"\n\
             health_check = {{ kind = \"http\", path = \"{path}\", interval = \"100ms\" }}\n",
            tls_key(&certs.0, name)
        );
        let proxy = Waitless::launch(&text, port, admin).await;
        let want = vec![
            (https.clone(), nginx_state.to_string()),
            (gone.clone(), "down".to_string()),
        ];
        let checks_seen = |n: usize| {
            nginx
                .log()
                .iter()
                .filter(|l| l.contains(&format!(" {path} ")))
                .count()
                >= n
        };
        // A certificate that fails verification ends the check before any request.
        let requests = if name == "localhost" { 5 } else { 0 };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = states(&proxy.stats().await);
        while (seen != want || !checks_seen(requests)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            seen = states(&proxy.stats().await);
        }
        assert_eq!(seen, want, "checks of {path} as {name}");
        assert!(
            checks_seen(requests),
            "nginx answered the checks of {path} over TLS"
        );
        let stats = proxy.stats().await;
        let tls = &stats["upstreams"][0]["tls"];
        if name == "localhost" {
            assert!(
                tls["handshakes"].as_u64() >= Some(5),
                "each check is a TLS handshake, counted as the upstream's: {stats}"
            );
            // The check asks for the virtual server the TLS name names, not for ip:port.
            let hosts: Vec<String> = nginx
                .log()
                .iter()
                .filter(|l| l.contains(&format!(" {path} ")))
                .filter_map(|l| l.split(' ').nth(3).map(str::to_string))
                .collect();
            assert!(
                !hosts.is_empty() && hosts.iter().all(|h| h == "localhost"),
                "the checks' Host is the server_name: {hosts:?}"
            );
        } else {
            assert!(
                tls["errors"]["certificate"].as_u64() >= Some(1),
                "the check's failed verification is counted: {stats}"
            );
            assert!(!checks_seen(1), "no check request reached nginx");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_header_goes_in_clear_before_the_tls_handshake() {
    let certs = make_certs();
    let Some(nginx) = HttpsNginx::start_with(&certs.0, " proxy_protocol").await else {
        eprintln!("skipped: nginx is not installed");
        return;
    };
    // v2 with preconnected connections too: they wait, plain, for their client's header.
    for (version, extra) in [("v1", ""), ("v2", "preconnect = 2")] {
        let (port, admin) = (free_port(), free_port());
        let text = config(
            port,
            admin,
            "tcp",
            nginx.port,
            &tls_key(&certs.0, "localhost"),
            &format!("proxy_protocol = \"{version}\"\n{extra}"),
        );
        let proxy = Waitless::launch(&text, port, admin).await;
        let before = nginx.log().len();
        for _ in 0..5 {
            let (status, body) = get(proxy.addr(), "/", true).await.expect("an answer");
            assert_eq!(status, 200, "{version}");
            assert_eq!(&body[..], b"hello over tls\n");
        }
        settle().await;
        let lines = nginx.log();
        let lines = lines.get(before..).unwrap_or_default();
        assert_eq!(lines.len(), 5, "{version}: {lines:?}");
        for line in lines {
            let fields: Vec<&str> = line.split(' ').collect();
            assert_eq!(
                fields.get(2),
                Some(&"127.0.0.1"),
                "{version}: nginx read the client's address from the header: {line}"
            );
        }
        drop(proxy);
    }
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
fn check_refuses_upstream_tls_to_a_unix_socket_server_and_accepts_it_elsewhere() {
    let dir = TempDir::new("upstream-tls-refused");
    let certs = make_certs();
    let ca = certs.0.join("ca.pem");
    for (protocol, servers, extra, refused) in [
        ("http", "\"unix:/run/api.sock\"", "", Some("unix socket")),
        ("mysql", "\"127.0.0.1:2\"", "", None),
        (
            "http",
            "\"127.0.0.1:2\"",
            "health_check = { kind = \"http\" }",
            None,
        ),
        ("tcp", "\"127.0.0.1:2\"", "proxy_protocol = \"v1\"", None),
    ] {
        let text = format!(
            "[[listener]]\nname = \"front\"\nlisten = \"127.0.0.1:1\"\nprotocol = \"{protocol}\"\n\
             upstream = \"api\"\n\n[[upstream]]\nname = \"api\"\nservers = [{servers}]\n\
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
        match refused {
            Some(says) => {
                assert!(!out.status.success(), "{protocol} {servers}: check passed");
                assert!(err.contains(says), "{protocol} {servers}: {err}");
            }
            None => assert!(out.status.success(), "{protocol} {extra}: {err}"),
        }
    }
}
