//! MySQL clients log in to waitless over TLS (issue 20): a mysql listener with `tls` offers
//! CLIENT_SSL, takes the client's SSLRequest and TLS handshake, then its login and session
//! over TLS, while a plain client still logs in on the same listener. Checked with the
//! clients applications use (the stock `mariadb` client, PyMySQL, PHP mysqli), waitless's
//! own TLS counters, and packets by hand for what a client would never send. And waitless
//! logs in to MariaDB over TLS (an upstream with `tls`): a server started with a certificate
//! and an account that `REQUIRE SSL`, whose own `Ssl_cipher` shows the session's TLS.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::mysql::*;
use common::tempdir::TempDir;
use mysql_async::prelude::Queryable;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest one client run may take; the server answers these in milliseconds.
const LIMIT: Duration = Duration::from_secs(15);

const CLIENT_SSL: u32 = 0x0800;

/// A CA and a `localhost` certificate (also for 127.0.0.1) it signed, made with the openssl
/// CLI.
struct Certs {
    dir: TempDir,
}

impl Certs {
    fn make() -> Certs {
        let dir = TempDir::new("mysql-tls-certs");
        let leaf = common::certs::Leaf {
            file: "localhost",
            cn: "localhost",
            ecdsa: false,
            san: "DNS:localhost,IP:127.0.0.1",
        };
        common::certs::make(&dir.0, &[leaf]).unwrap_or_else(|e| panic!("{e}"));
        Certs { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.0.join(file)
    }

    /// The server's options for its certificate (the same one as waitless's listener).
    fn server_options(&self) -> Vec<String> {
        vec![
            format!("--ssl-cert={}", self.path("localhost.pem").display()),
            format!("--ssl-key={}", self.path("localhost.key").display()),
            format!("--ssl-ca={}", self.path("ca.pem").display()),
        ]
    }

    /// `tls = ...` for the upstream: the test CA, the name as the server is written.
    fn upstream_key(&self) -> String {
        format!("tls = {{ ca = {:?} }}", self.path("ca.pem"))
    }

    /// `tls = ...` for the listener.
    fn listener_key(&self) -> String {
        format!(
            "tls = {{ cert = {:?}, key = {:?} }}",
            self.path("localhost.pem"),
            self.path("localhost.key"),
        )
    }
}

/// The listener's TLS counters: handshakes, and errors of `reason`.
async fn tls_counts(proxy: &MysqlProxy, reason: &str) -> (u64, u64) {
    let stats = proxy.stats().await;
    let tls = &stats["listeners"][0]["tls"];
    (
        tls["handshakes"]
            .as_u64()
            .unwrap_or_else(|| panic!("{stats}")),
        tls["errors"][reason]
            .as_u64()
            .unwrap_or_else(|| panic!("{stats}")),
    )
}

/// A raw client's greeting: its capability flags (lower 16 bits).
async fn greeting_caps(s: &mut TcpStream) -> u32 {
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await.unwrap();
    let len = usize::from(head[0]) | usize::from(head[1]) << 8 | usize::from(head[2]) << 16;
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).await.unwrap();
    assert_eq!(p[0], 10, "a Handshake v10 greeting: {p:?}");
    let version_end = p.iter().skip(1).position(|b| *b == 0).unwrap() + 1;
    // Version NUL, connection id (4), scramble (8), filler (1), then the flags.
    let at = version_end + 1 + 4 + 8 + 1;
    u32::from(u16::from_le_bytes([p[at], p[at + 1]]))
}

/// An SSLRequest, seq 1: a HandshakeResponse41 cut after its fixed 32 bytes.
fn ssl_request() -> Vec<u8> {
    // PROTOCOL_41, SSL, SECURE_CONNECTION, PLUGIN_AUTH.
    let caps: u32 = 0x0200 | CLIENT_SSL | 0x8000 | 0x0008_0000;
    let mut p = vec![32u8, 0, 0, 1];
    p.extend(caps.to_le_bytes());
    p.extend((16u32 << 20).to_le_bytes());
    p.push(33);
    p.extend([0u8; 23]);
    p
}

/// Reads until the connection ends; Ok with what came before a clean end (FIN), or the
/// error (a reset) that ended it.
async fn read_to_end(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut got = Vec::new();
    tokio::time::timeout(LIMIT, s.read_to_end(&mut got))
        .await
        .expect("waitless closed the connection")?;
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_pymysql_and_mysqli_log_in_over_tls_and_plain_clients_still_do() {
    let certs = Certs::make();
    let db = MariaDb::start().await;
    let proxy = MysqlProxy::start(db.port, &certs.listener_key(), "").await;
    let ca = certs.path("ca.pem");
    let ca = ca.to_str().unwrap();

    // The stock client, verifying waitless's certificate; `status` says what it negotiated.
    let ssl_ca = format!("--ssl-ca={ca}");
    let (ok, out, err) = cli(
        proxy.port,
        &[
            "--ssl",
            &ssl_ca,
            "--ssl-verify-server-cert",
            "appdb",
            "-e",
            "status; SELECT 40 + 2",
        ],
    );
    assert!(ok, "mariadb --ssl through waitless: {err}");
    let ssl_line = out.lines().find(|l| l.starts_with("SSL:")).unwrap_or("");
    assert!(
        ssl_line.contains("Cipher in use"),
        "the mariadb client did not say it runs over TLS: {out}"
    );
    assert!(out.lines().any(|l| l.trim() == "42"), "{out}");
    assert_eq!(tls_counts(&proxy, "protocol").await, (1, 0));

    // A plain client on the same listener: TLS is offered, not required.
    let (ok, out, err) = cli(
        proxy.port,
        &["--skip-ssl", "appdb", "-e", "status; SELECT 7"],
    );
    assert!(ok, "a plain mariadb client through the tls listener: {err}");
    assert!(out.lines().any(|l| l.trim() == "7"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("SSL:") && l.contains("Not in use")),
        "{out}"
    );
    let c = connect(proxy.port, Some("appdb")).await;
    c.disconnect().await.unwrap();
    assert_eq!(tls_counts(&proxy, "protocol").await, (1, 0), "plain logins");

    let mut handshakes = 1;
    if Interpreter::PyMySql.available().await {
        let code = format!(
            r#"
import sys, pymysql
c = pymysql.connect(host=sys.argv[1], port=int(sys.argv[2]), user=sys.argv[3],
                    password=sys.argv[4], database='appdb', ssl={{'ca': {ca:?}}})
print('tls', c._sock.version())
cur = c.cursor()
cur.execute('SELECT n FROM (SELECT 1 AS n UNION SELECT 2) t ORDER BY n')
print('rows', [r[0] for r in cur.fetchall()])
c.close()
"#
        );
        let out = Interpreter::PyMySql.run(&code, proxy.port, LIMIT).await;
        assert!(out.contains("tls TLSv1."), "PyMySQL with ssl=: {out}");
        assert!(out.contains("rows [1, 2]"), "PyMySQL with ssl=: {out}");
        handshakes += 1;
        assert_eq!(tls_counts(&proxy, "protocol").await, (handshakes, 0));
    }
    if Interpreter::Php.available().await {
        let code = format!(
            r#"
[$_, $host, $port, $user, $pw] = $argv;
mysqli_report(MYSQLI_REPORT_ERROR | MYSQLI_REPORT_STRICT);
$m = mysqli_init();
$m->ssl_set(null, null, {ca:?}, null, null);
$m->real_connect($host, $user, $pw, 'appdb', (int)$port, null, MYSQLI_CLIENT_SSL);
echo 'value ', $m->query('SELECT 6 * 7')->fetch_row()[0], "\n";
$m->close();
"#
        );
        let out = Interpreter::Php.run(&code, proxy.port, LIMIT).await;
        assert!(
            out.contains("value 42"),
            "PHP mysqli with MYSQLI_CLIENT_SSL: {out}"
        );
        handshakes += 1;
        assert_eq!(tls_counts(&proxy, "protocol").await, (handshakes, 0));
    }
    // Every session's close went through the close mechanism, TLS or not: the ledger has one
    // entry per client (the two plain ones too).
    let sessions = handshakes + 2;
    let mut closed = 0;
    for _ in 0..50 {
        let stats = proxy.stats().await;
        closed = stats["listeners"][0]["ledger"]["closed"]
            .as_u64()
            .unwrap_or(0);
        if closed >= sessions {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(closed, sessions, "one ledger entry per client session");
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_or_silence_after_an_ssl_request_is_a_clean_close_counted_as_a_handshake_error() {
    let certs = Certs::make();
    let db = MariaDb::start().await;
    let listener = format!("{}\nheader_timeout = \"1s\"", certs.listener_key());
    let proxy = MysqlProxy::start(db.port, &listener, "").await;

    // Plain text where the ClientHello belongs: not_tls, closed unanswered.
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    let caps = greeting_caps(&mut s).await;
    assert_ne!(caps & CLIENT_SSL, 0, "CLIENT_SSL offered: {caps:#x}");
    s.write_all(&ssl_request()).await.unwrap();
    s.write_all(b"SELECT 1; -- no TLS after all\r\n")
        .await
        .unwrap();
    let got = read_to_end(&mut s)
        .await
        .expect("a clean close, not a reset");
    assert!(got.is_empty(), "answered plain text with {got:?}");
    assert_eq!(tls_counts(&proxy, "not_tls").await, (0, 1));

    // A handshake record of garbage: protocol, then the close (after an alert, if any).
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    greeting_caps(&mut s).await;
    s.write_all(&ssl_request()).await.unwrap();
    let mut hello = vec![0x16u8, 0x03, 0x01, 0x00, 0x20];
    hello.extend([0xABu8; 32]);
    s.write_all(&hello).await.unwrap();
    let got = read_to_end(&mut s)
        .await
        .expect("a clean close, not a reset");
    assert!(
        got.is_empty() || got.first() == Some(&0x15),
        "a TLS alert record or nothing: {got:?}"
    );
    let stats = proxy.stats().await;
    assert_eq!(tls_counts(&proxy, "protocol").await, (0, 1), "{stats}");

    // An SSLRequest and then silence: the handshake is bounded by header_timeout.
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    greeting_caps(&mut s).await;
    s.write_all(&ssl_request()).await.unwrap();
    let got = read_to_end(&mut s)
        .await
        .expect("a clean close, not a reset");
    assert!(got.is_empty(), "answered a silent client with {got:?}");
    assert_eq!(tls_counts(&proxy, "timeout").await, (0, 1));

    // A TLS handshake and then silence: the login over TLS is bounded by header_timeout too.
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    greeting_caps(&mut s).await;
    s.write_all(&ssl_request()).await.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(certs.path("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, s)
        .await
        .expect("TLS handshake after the SSLRequest");
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let end = tokio::time::timeout(LIMIT, tls.read_to_end(&mut got))
        .await
        .expect("waitless closed the silent TLS client");
    assert!(end.is_ok() && got.is_empty(), "{end:?} {got:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(tls_counts(&proxy, "timeout").await, (1, 1));

    // Each close was recorded, and the listener still serves.
    let c = connect(proxy.port, Some("appdb")).await;
    c.disconnect().await.unwrap();
    let stats = proxy.stats().await;
    let closed = stats["listeners"][0]["ledger"]["closed"].as_u64();
    assert!(
        closed >= Some(2),
        "both refused clients in the ledger: {stats}"
    );

    // Without tls, CLIENT_SSL is not offered.
    let plain = MysqlProxy::start(db.port, "", "").await;
    let mut s = TcpStream::connect(plain.addr()).await.unwrap();
    let caps = greeting_caps(&mut s).await;
    assert_eq!(
        caps & CLIENT_SSL,
        0,
        "CLIENT_SSL offered without tls: {caps:#x}"
    );
}

/// `mariadb --ssl` to waitless, verifying its certificate, running `sql` in `appdb`.
fn tls_cli(certs: &Certs, port: u16, sql: &str) -> (bool, String, String) {
    let ssl_ca = format!("--ssl-ca={}", certs.path("ca.pem").display());
    cli(
        port,
        &[
            "--ssl",
            &ssl_ca,
            "--ssl-verify-server-cert",
            "appdb",
            "-e",
            sql,
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waitless_logs_in_over_tls_to_a_server_that_requires_it_and_pools_the_tls_session() {
    let certs = Certs::make();
    let options = certs.server_options();
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    let db = MariaDb::start_with(&options).await;
    db.root_sql(&format!("ALTER USER '{USER}'@'%' REQUIRE SSL;"));
    let (proxy, _) = MysqlProxy::start_logged(
        db.port,
        &certs.listener_key(),
        &certs.upstream_key(),
        "warn",
    )
    .await;
    // TLS on both sides: the client's to waitless (`status`), the server's session (its own
    // Ssl_cipher, asked in the session waitless lends).
    for round in 0..3 {
        let (ok, out, err) = tls_cli(
            &certs,
            proxy.port,
            "status; SHOW STATUS LIKE 'Ssl_cipher'; SELECT 40 + 2",
        );
        assert!(ok, "round {round}: mariadb --ssl through waitless: {err}");
        assert!(
            out.lines()
                .any(|l| l.starts_with("SSL:") && l.contains("Cipher in use")),
            "round {round}: the client to waitless is not over TLS: {out}"
        );
        let cipher = out
            .lines()
            .find_map(|l| l.strip_prefix("Ssl_cipher\t"))
            .unwrap_or_else(|| panic!("round {round}: no Ssl_cipher: {out}"));
        assert!(
            !cipher.trim().is_empty(),
            "round {round}: the server's session is not over TLS: {out}"
        );
        assert!(out.lines().any(|l| l.trim() == "42"), "{out}");
    }
    // A plain client of waitless still gets a TLS session with the server.
    let mut c = connect(proxy.port, Some("appdb")).await;
    let cipher: Option<(String, String)> = c
        .query_first("SHOW STATUS LIKE 'Ssl_cipher'")
        .await
        .unwrap();
    assert!(
        cipher.is_some_and(|(_, v)| !v.is_empty()),
        "a plain client's server session is over TLS"
    );
    c.disconnect().await.unwrap();
    let stats = proxy.stats().await;
    let up = &stats["upstreams"][0];
    let handshakes = up["tls"]["handshakes"].as_u64();
    assert_eq!(
        handshakes,
        up["servers"][0]["opened"].as_u64(),
        "one handshake per server connection: {stats}"
    );
    // The mariadb client's sessions share one connection, mysql_async's (other
    // capabilities) gets its own.
    assert!(
        handshakes <= Some(2),
        "four sessions, at most two connections: {stats}"
    );

    // The same without upstream tls: the server refuses waitless's login, and the log says so.
    let (plain, log) = MysqlProxy::start_logged(db.port, &certs.listener_key(), "", "warn").await;
    let (ok, _, err) = tls_cli(&certs, plain.port, "SELECT 1");
    assert!(!ok, "a REQUIRE SSL account logged in over plain text");
    assert!(err.contains("Access denied"), "{err}");
    common::settle().await;
    let logged = std::fs::read_to_string(&log).unwrap();
    let line = logged
        .lines()
        .find(|l| l.contains("refused waitless's login"))
        .unwrap_or_else(|| panic!("no log of the refused login:\n{logged}"));
    assert!(
        line.contains(&format!("127.0.0.1:{}", db.port))
            && line.contains(USER)
            && line.contains("Access denied"),
        "the line names server, account and the server's words: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_offers_no_tls_is_an_error_naming_it_never_a_plain_login() {
    let certs = Certs::make();
    let db = MariaDb::start().await;
    let (proxy, log) = MysqlProxy::start_logged(db.port, "", &certs.upstream_key(), "warn").await;
    let (ok, _, err) = cli(proxy.port, &["appdb", "-e", "SELECT 1"]);
    assert!(!ok, "logged in to a server without TLS");
    assert!(err.contains("does not offer TLS"), "{err}");
    common::settle().await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged
            .lines()
            .any(|l| l.contains("does not offer TLS")
                && l.contains(&format!("127.0.0.1:{}", db.port))),
        "the log names the server:\n{logged}"
    );
}
