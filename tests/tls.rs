//! TLS from clients, checked from outside: curl and openssl s_client, a rustls client, what
//! the backend was told, the bytes that arrived, and the kernel's socket table.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::tempdir::TempDir;
use common::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Test certificates made with the openssl CLI: a CA, and two server certificates it signed:
/// `localhost` (RSA-2048, also for 127.0.0.1) and `b.test` (ECDSA P-256).
struct Certs {
    dir: TempDir,
}

impl Certs {
    fn make() -> Certs {
        let dir = TempDir::new("tls-certs");
        let leaves = [
            common::certs::Leaf {
                file: "localhost",
                cn: "localhost",
                ecdsa: false,
                san: "DNS:localhost,IP:127.0.0.1",
            },
            common::certs::Leaf {
                file: "b.test",
                cn: "b.test",
                ecdsa: true,
                san: "DNS:b.test",
            },
        ];
        common::certs::make(&dir.0, &leaves).unwrap_or_else(|e| panic!("{e}"));
        Certs { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.0.join(file)
    }

    /// `tls = ...` for a listener: the localhost certificate first (the default), then b.test.
    fn listener_key(&self) -> String {
        format!(
            "tls = {{ certs = [{{ cert = {:?}, key = {:?} }}, {{ cert = {:?}, key = {:?} }}] }}",
            self.path("localhost.pem"),
            self.path("localhost.key"),
            self.path("b.test.pem"),
            self.path("b.test.key"),
        )
    }

    /// A rustls client trusting `ca` (a file of this set).
    fn client(&self, ca: &str) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.path(ca)).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

/// A backend answering each request with the X-Forwarded-Proto it was sent (`/xff`: the
/// X-Forwarded-For), keeping its connections open; returns its address.
async fn proto_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    // GET /xff answers X-Forwarded-For instead.
                    let field = if head.starts_with("get /xff ") {
                        "x-forwarded-for:"
                    } else {
                        "x-forwarded-proto:"
                    };
                    let values: Vec<&str> = head
                        .lines()
                        .filter_map(|l| l.strip_prefix(field))
                        .map(str::trim)
                        .collect();
                    let body = values.join(",");
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    buf.drain(..end + 4);
                    if s.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl must be installed");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tls_errors(stats: &serde_json::Value, reason: &str) -> u64 {
    stats["listeners"][0]["tls"]["errors"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("no tls.errors.{reason} in {stats}"))
}

/// What `openssl s_client` says of a handshake with `servername` (and `alpn`, if any).
fn s_client(port: u16, servername: &str, alpn: Option<&str>, ca: &Path) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", servername, "-CAfile"])
        .arg(ca)
        .stdin(std::process::Stdio::null());
    if let Some(alpn) = alpn {
        cmd.args(["-alpn", alpn]);
    }
    let out = cmd.output().expect("openssl must be installed");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_clients_are_served_by_sni_and_the_backend_is_told_https() {
    let certs = Certs::make();
    let backend = proto_echo().await;
    let proxy = Waitless::start(&[backend], &certs.listener_key(), "").await;
    let port = proxy.port.to_string();
    let url = format!("https://localhost:{port}/");
    let resolve = format!("localhost:{port}:127.0.0.1");
    let ca = certs.path("ca.pem");
    let ca = ca.to_str().unwrap();

    // curl verifies the default certificate; the backend hears https, even when the client
    // claimed otherwise.
    let (ok, body, err) = curl(&["--cacert", ca, "--resolve", &resolve, &url]);
    assert!(ok, "curl: {err}");
    assert_eq!(body, "https");
    let (ok, body, err) = curl(&[
        "--cacert",
        ca,
        "--resolve",
        &resolve,
        "-H",
        "X-Forwarded-Proto: http",
        &url,
    ]);
    assert!(ok, "curl: {err}");
    assert_eq!(
        body, "https",
        "a TLS client's own X-Forwarded-Proto is replaced"
    );

    // SNI b.test gets the b.test certificate (curl checks the name).
    let b_ca = certs.path("ca.pem");
    let b_resolve = format!("b.test:{port}:127.0.0.1");
    let b_url = format!("https://b.test:{port}/");
    let (ok, body, err) = curl(&[
        "--cacert",
        b_ca.to_str().unwrap(),
        "--resolve",
        &b_resolve,
        &b_url,
    ]);
    assert!(ok, "curl b.test: {err}");
    assert_eq!(body, "https");

    // A name no certificate has gets the default one (localhost's).
    let other = s_client(proxy.port, "other.test", None, &certs.path("ca.pem"));
    assert!(other.contains("subject=CN = localhost"), "{other}");
    let b = s_client(proxy.port, "b.test", None, &certs.path("ca.pem"));
    assert!(b.contains("subject=CN = b.test"), "{b}");

    // A client that speaks only h2 is refused in the handshake, with the alert.
    let h2 = s_client(proxy.port, "localhost", Some("h2"), &certs.path("ca.pem"));
    assert!(h2.contains("no application protocol"), "{h2}");

    // A plain-HTTP client on the TLS port sees the connection end, not a reset or bytes.
    let mut plain = TcpStream::connect(proxy.addr()).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let read = plain.read_to_end(&mut got).await;
    assert!(matches!(read, Ok(0)), "plain client: {read:?}, {got:?}");

    settle().await;
    let stats = proxy.stats().await;
    // Three curls and two s_clients completed a handshake; the h2 one and the plain one not.
    assert_eq!(stats["listeners"][0]["tls"]["handshakes"], 5, "{stats}");
    assert_eq!(tls_errors(&stats, "no_application_protocol"), 1);
    assert_eq!(tls_errors(&stats, "not_tls"), 1);
    let metrics = proxy.admin_get("/metrics").await;
    assert!(
        metrics.contains(
            "waitless_tls_handshake_errors_total{side=\"client\",name=\"web\",reason=\"not_tls\"} 1"
        ),
        "{metrics}"
    );
    // Every connection is in the ledger, TLS or not.
    let closed = stats["listeners"][0]["ledger"]["closed"].as_u64().unwrap();
    assert_eq!(closed, 7, "{stats}");
    assert_eq!(stats["listeners"][0]["connections"], 7, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_with_tls_relays_64_mib_each_way_byte_exact_with_half_close() {
    const N: usize = 64 << 20;
    let certs = Certs::make();
    // A plain echo server that ends its side once the client's side ended.
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = server.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        let (mut r, mut w) = s.split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let port = free_port();
    let admin = free_port();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[listener]]\nname = \"raw\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"tcp\"\n\
         upstream = \"raw\"\n{}\n\n\
         [[upstream]]\nname = \"raw\"\nservers = [\"{backend}\"]\n",
        certs.listener_key()
    );
    let proxy = Waitless::launch(&config, port, admin).await;

    let tcp = TcpStream::connect(proxy.addr()).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = certs.client("ca.pem").connect(name, tcp).await.unwrap();
    let (mut r, mut w) = tokio::io::split(tls);
    let sent = pattern(N);
    let out = sent.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&out).await.unwrap();
        // close_notify and FIN: the client's half of the relay ends, its reading goes on.
        w.shutdown().await.unwrap();
        w
    });
    let mut got = Vec::with_capacity(N);
    r.read_to_end(&mut got).await.unwrap();
    let _w = writer.await.unwrap();
    assert_eq!(got.len(), N);
    assert!(got == sent[..], "the echo differs from what was sent");
}

/// `n` HTTPS requests with `Connection: close`, each on its own connection, each read whole
/// (by its length) and then closed by the client: close_notify and FIN.
async fn https_requests(certs: &Certs, addr: SocketAddr, n: usize) {
    let connector = certs.client("ca.pem");
    for i in 0..n {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tls.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        while !got.ends_with(b"https") {
            let k = tls.read(&mut chunk).await.unwrap();
            assert!(k > 0, "request {i}: the end before the response: {got:?}");
            got.extend_from_slice(&chunk[..k]);
        }
        // Under `none` waitless's RST may come first, once its close_notify was acknowledged.
        if let Err(e) = tls.shutdown().await {
            let reset = matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            );
            assert!(reset, "request {i}: closing: {e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_policies_keep_their_meaning_under_tls() {
    const N: usize = 100;
    let certs = Certs::make();
    let backend = proto_echo().await;
    for (policy, landed_on_peer, nobody) in [("client", N as u64, 0), ("none", 0, N as u64)] {
        let extra = format!("time_wait = \"{policy}\"\n{}", certs.listener_key());
        let proxy = Waitless::start(&[backend], &extra, "").await;
        https_requests(&certs, proxy.addr(), N).await;
        settle().await;
        let stats = proxy.stats().await;
        let ledger = &stats["listeners"][0]["ledger"];
        assert_eq!(ledger["closed"], N as u64, "{policy}: {ledger}");
        assert_eq!(
            ledger["time_wait_peer"], landed_on_peer,
            "{policy}: {ledger}"
        );
        assert_eq!(ledger["time_wait_nobody"], nobody, "{policy}: {ledger}");
        // The kernel agrees: none of it on waitless's side of the client connections.
        assert_eq!(ledger["time_wait_proxy"], 0, "{policy}: {ledger}");
        assert_eq!(
            time_wait_on_port(proxy.port),
            0,
            "{policy}: TIME_WAIT on waitless"
        );
        if policy == "none" {
            // Nor on the client's.
            let clients = sockets_to_port("time-wait", proxy.port);
            assert_eq!(clients, 0, "none: TIME_WAIT on the clients");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_errors_name_the_file_at_check() {
    let certs = Certs::make();
    let check = |tls: String| {
        let dir = TempDir::new("tls-check");
        let config = format!(
            "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:1\"\nupstream = \"u\"\n{tls}\n\n\
             [[upstream]]\nname = \"u\"\nservers = [\"127.0.0.1:2\"]\n"
        );
        let mut cmd = common::binary::command(&dir.0, &config, "error").unwrap();
        let out = cmd.arg("check").output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (cert, key) = (certs.path("localhost.pem"), certs.path("localhost.key"));
    let (ok, _) = check(format!("tls = {{ cert = {cert:?}, key = {key:?} }}"));
    assert!(ok, "a good pair passes");

    let missing = certs.path("missing.pem");
    let (ok, err) = check(format!("tls = {{ cert = {missing:?}, key = {key:?} }}"));
    assert!(
        !ok && err.contains("missing.pem") && err.contains("listener[0].tls"),
        "{err}"
    );

    let other_key = certs.path("b.test.key");
    let (ok, err) = check(format!("tls = {{ cert = {cert:?}, key = {other_key:?} }}"));
    assert!(!ok && err.contains("does not belong"), "{err}");

    std::fs::write(certs.path("empty.pem"), "").unwrap();
    let empty = certs.path("empty.pem");
    let (ok, err) = check(format!("tls = {{ cert = {empty:?}, key = {key:?} }}"));
    assert!(
        !ok && err.contains("empty.pem") && err.contains("no certificate"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_header_before_tls_gives_the_client_address() {
    let certs = Certs::make();
    let backend = proto_echo().await;
    let extra = format!("accept_proxy_protocol = true\n{}", certs.listener_key());
    let proxy = Waitless::start(&[backend], &extra, "").await;
    let mut tcp = TcpStream::connect(proxy.addr()).await.unwrap();
    tcp.write_all(b"PROXY TCP4 10.1.2.3 127.0.0.1 5555 443\r\n")
        .await
        .unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = certs.client("ca.pem").connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /xff HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    tls.read_to_end(&mut got).await.unwrap();
    let got = String::from_utf8_lossy(&got);
    assert!(got.ends_with("\r\n\r\n10.1.2.3"), "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rereads_certificates_and_keeps_the_running_ones_when_new_ones_are_bad() {
    let certs = Certs::make();
    let backend = proto_echo().await;
    // The listener's files: copies, so that the test can replace them.
    let (cert, key) = (certs.path("live.pem"), certs.path("live.key"));
    std::fs::copy(certs.path("localhost.pem"), &cert).unwrap();
    std::fs::copy(certs.path("localhost.key"), &key).unwrap();
    let extra = format!("tls = {{ cert = {cert:?}, key = {key:?} }}");
    let proxy = Waitless::start(&[backend], &extra, "").await;
    let ca = certs.path("ca.pem");
    let subject = || s_client(proxy.port, "localhost", None, &ca);
    assert!(subject().contains("subject=CN = localhost"));

    let reload = || {
        Command::new(env!("CARGO_BIN_EXE_waitless"))
            .args(["reload", "--admin", &format!("127.0.0.1:{}", proxy.admin)])
            .output()
            .unwrap()
    };
    std::fs::copy(certs.path("b.test.pem"), &cert).unwrap();
    std::fs::copy(certs.path("b.test.key"), &key).unwrap();
    let out = reload();
    assert!(out.status.success(), "{out:?}");
    assert!(
        subject().contains("subject=CN = b.test"),
        "new certificate after reload"
    );

    // A key that does not match: refused, naming the files; the running certificate stays.
    std::fs::copy(certs.path("localhost.key"), &key).unwrap();
    let out = reload();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("live.key"), "{out:?}");
    assert!(
        subject().contains("subject=CN = b.test"),
        "kept after a refused reload"
    );
}
