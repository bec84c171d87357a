//! Hostile input on a mysql listener, against a real MariaDB: malformed packets and logins
//! close only their own connection, never reach the server, and leave a log line naming the
//! peer; other sessions go on.

mod common;

use std::time::Duration;

use common::mysql::*;
use common::*;
use mysql_common::constants::CapabilityFlags as C;
use mysql_common::packets::{AuthPlugin, HandshakeResponse};
use mysql_common::proto::MySerialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// waitless with a mysql listener in front of `server`, logging waitless's debug lines to a
/// file (returned): a broken login is logged at debug with its peer.
async fn proxy_with_log(server: u16) -> (MysqlProxy, std::path::PathBuf) {
    let (port, admin) = (free_port(), free_port());
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[listener]]\nname = \"db\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"mysql\"\n\
         upstream = \"db\"\ntime_wait = \"proxy\"\n\n\
         [[upstream]]\nname = \"db\"\nservers = [\"127.0.0.1:{server}\"]\npool_size = 2\n\n\
         [[mysql_user]]\nuser = \"{USER}\"\npassword = \"{PASSWORD}\"\n"
    );
    let (w, log) = Waitless::launch_logged(&config, port, admin, "waitless=debug").await;
    (MysqlProxy(w), log)
}

/// A well-formed HandshakeResponse41 payload for the test account (wrong scramble: these
/// cases never get as far as checking it).
fn handshake_response() -> Vec<u8> {
    let caps = C::CLIENT_PROTOCOL_41
        | C::CLIENT_SECURE_CONNECTION
        | C::CLIENT_PLUGIN_AUTH
        | C::CLIENT_CONNECT_WITH_DB;
    let resp = HandshakeResponse::new(
        Some(&[7u8; 20][..]),
        (10, 11, 0),
        Some(USER.as_bytes()),
        Some(&b"appdb"[..]),
        Some(AuthPlugin::MysqlNativePassword),
        caps,
        None,
        1 << 24,
    );
    let mut buf = Vec::new();
    resp.serialize(&mut buf);
    buf
}

/// A packet header: 3-byte length, sequence id.
fn header(len: usize, seq: u8) -> Vec<u8> {
    let l = (len as u32).to_le_bytes();
    vec![l[0], l[1], l[2], seq]
}

/// What a client got after the greeting, and whether the connection closed.
struct Outcome {
    /// Bytes after the greeting.
    rest: Vec<u8>,
    closed: bool,
}

/// Connects, reads the greeting, sends `bytes` (then FIN if `fin`), reads to EOF.
async fn after_greeting(port: u16, bytes: &[u8], fin: bool) -> (Outcome, std::net::SocketAddr) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let me = s.local_addr().unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await.unwrap();
    let len = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize;
    let mut greeting = vec![0u8; len];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(greeting.first(), Some(&10), "protocol 10 greeting");
    let _ = s.write_all(bytes).await;
    if fin {
        let _ = s.shutdown().await;
    }
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => rest.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    (
        Outcome {
            rest,
            closed: read.is_ok(),
        },
        me,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_and_logins_close_only_that_connection() {
    let db = MariaDb::start().await;
    let mut watch = db.watcher().await;
    let (proxy, log) = proxy_with_log(db.port).await;
    // The first session makes waitless read the server's greeting and pools a connection.
    assert_eq!(short_sessions(proxy.port, 2, 1).await, 0);
    let opened_before = watch.status("Connections").await;

    let good = handshake_response();
    let mut cut_inside = header(good.len(), 1);
    // The length is right, but the payload stops inside the user name: the response claims
    // fields it does not have.
    let user_at = 32;
    let truncated = &good[..user_at + 2];
    cut_inside.truncate(0);
    cut_inside.extend(header(truncated.len(), 1));
    cut_inside.extend_from_slice(truncated);
    let mut auth_claims_more = header(good.len(), 1);
    let mut lying = good.clone();
    // The auth data's length byte (after the NUL-ended user name) says 250.
    let auth_len_at = user_at + USER.len() + 1;
    lying[auth_len_at] = 250;
    auth_claims_more.extend(lying);
    let mut query_first = header(9, 1);
    query_first.extend_from_slice(b"\x03SELECT 1");
    let mut short_length = header(200, 1);
    short_length.extend_from_slice(&good[..20]);
    let mut huge = header(0xFF_FFFF, 1);
    huge.extend_from_slice(&[0u8; 4096]);

    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("length claims more than sent", short_length, true),
        ("handshake response cut inside a field", cut_inside, false),
        (
            "auth data claims more than the packet",
            auth_claims_more,
            false,
        ),
        ("command before authenticating", query_first, false),
        ("16 MiB packet before authenticating", huge, false),
        ("garbage", b"\x01\x00\x00\x01\xff\xfe\xfd".to_vec(), false),
    ];
    let mut peers = Vec::new();
    for (name, bytes, fin) in cases {
        let (out, me) = after_greeting(proxy.port, &bytes, fin).await;
        println!(
            "{name}: {} bytes back, closed {}",
            out.rest.len(),
            out.closed
        );
        assert!(out.closed, "{name}: the connection stayed open");
        // An ERR packet may come back; never an OK (0x00 after the 4-byte header).
        assert_ne!(
            out.rest.get(4),
            Some(&0x00),
            "{name}: logged in: {:?}",
            out.rest
        );
        peers.push((name, me));
    }
    settle().await;
    assert_eq!(
        watch.status("Connections").await,
        opened_before,
        "a hostile login reached the server"
    );
    assert_eq!(short_sessions(proxy.port, 20, 4).await, 0, "sessions after");
    let text = std::fs::read_to_string(&log).unwrap();
    for (name, me) in peers {
        assert!(
            text.lines().any(|l| l.contains(&me.to_string())),
            "{name}: no log line naming {me}:\n{text}"
        );
    }
}
