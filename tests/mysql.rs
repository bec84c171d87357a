//! The MySQL front against a real MariaDB: short client sessions end at waitless while the
//! server keeps a few pooled connections (its own counters and the kernel's socket table say
//! so), sessions never see each other's state, and everything in between is relayed intact.

mod common;

use std::time::Duration;

use common::mysql::*;
use common::*;
use mysql_async::prelude::*;
use mysql_async::{Conn, Params};

const POOL: u64 = 4;

/// What a session could leave behind: user variable, sql_mode and wait_timeout back to the
/// global values, open transaction, named lock, insert id, uncommitted row count.
type Leftovers = (Option<i64>, String, u64, u64, Option<i64>, u64, u64);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_sessions_leave_the_server_few_connections_and_no_time_wait() {
    const CYCLES: usize = 3000;
    let db = MariaDb::start().await;
    let mut watch = db.watcher().await;
    let bounds = format!("pool_size = {POOL}\nmax_connections = {POOL}");
    let proxy = MysqlProxy::start(db.port, "", &bounds).await;

    // The first session also reads the server's greeting (one extra, unpooled connection).
    assert_eq!(short_sessions(proxy.port, 1, 1).await, 0);
    let before = watch.status("Connections").await;
    assert_eq!(short_sessions(proxy.port, CYCLES, 4).await, 0);
    settle().await;
    let opened = watch.status("Connections").await - before;
    let threads = watch.status("Threads_connected").await;
    let server_tw = time_wait_on_port(db.port);
    let proxy_tw = time_wait_on_port(proxy.port);
    let client_tw = sockets_to_port("time-wait", proxy.port);
    println!(
        "{CYCLES} sessions through waitless: server Connections +{opened}, Threads_connected \
         {threads} (1 is the watcher), TIME_WAIT server {server_tw}, proxy {proxy_tw}, \
         clients {client_tw}"
    );
    assert!(opened <= POOL, "server saw {opened} new connections");
    assert!(threads <= POOL + 1, "{threads} threads connected");
    assert_eq!(server_tw, 0, "TIME_WAIT on the server's port");
    assert_eq!(
        proxy_tw, 0,
        "TIME_WAIT on waitless's port (time_wait = client)"
    );

    let stats = proxy.stats().await;
    let ledger = &stats["listeners"][0]["ledger"];
    assert_eq!(
        ledger["closed"].as_u64(),
        Some(CYCLES as u64 + 1),
        "{ledger}"
    );

    // The same load straight to the server, for comparison: every session is a server
    // connection, and the server's side keeps TIME_WAIT for those it closed first.
    let before = watch.status("Connections").await;
    let (direct_ok, _, err) = {
        let mut ok = true;
        let mut last_err = String::new();
        for _ in 0..300 {
            let (good, _, e) = cli_direct(db.port, "SELECT 1");
            ok &= good;
            last_err = e;
        }
        (ok, (), last_err)
    };
    assert!(direct_ok, "{err}");
    settle().await;
    let direct_opened = watch.status("Connections").await - before;
    println!(
        "300 sessions straight to the server (mariadb CLI): Connections +{direct_opened}, \
         TIME_WAIT on the server's port {}",
        time_wait_on_port(db.port)
    );
    assert_eq!(direct_opened, 300);
}

/// A pool full of one account's idle connections still pools another account's sessions:
/// the least recently used idle connection makes room for the one just given back. (It was
/// the other way round: every session of the second account opened, and then closed, a
/// server connection of its own, as PHP sessions did after mariadb-slap's in the bench.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_full_of_one_accounts_connections_still_pools_another_accounts_sessions() {
    const SESSIONS: usize = 200;
    let db = MariaDb::start().await;
    db.root_sql(
        "CREATE USER 'other'@'%' IDENTIFIED BY 'otherpw'; GRANT ALL ON *.* TO 'other'@'%';",
    );
    let mut watch = db.watcher().await;
    let extra =
        format!("pool_size = {POOL}\n\n[[mysql_user]]\nuser = \"other\"\npassword = \"otherpw\"");
    let proxy = MysqlProxy::start(db.port, "", &extra).await;

    // POOL sessions of `app` at once, then ended: the pool holds POOL idle connections of app.
    let mut held = Vec::new();
    for _ in 0..POOL {
        held.push(connect(proxy.port, Some("appdb")).await);
    }
    for c in held {
        c.disconnect().await.unwrap();
    }
    settle().await;
    let stats = proxy.stats().await;
    let idle = stats["upstreams"][0]["servers"][0]["idle"].as_u64();
    assert_eq!(idle, Some(POOL), "the pool is full of app's: {stats}");

    let before = watch.status("Connections").await;
    for i in 0..SESSIONS {
        let mut c = Conn::new(opts(proxy.port, "other", "otherpw", Some("appdb")))
            .await
            .unwrap_or_else(|e| panic!("session {i} of other: {e}"));
        let user: Option<String> = c.query_first("SELECT CURRENT_USER()").await.unwrap();
        assert_eq!(user.as_deref(), Some("other@%"));
        c.disconnect().await.unwrap();
    }
    settle().await;
    let opened = watch.status("Connections").await - before;
    let threads = watch.status("Threads_connected").await;
    println!(
        "{SESSIONS} sequential sessions of another account: server Connections +{opened}, \
         Threads_connected {threads} (1 is the watcher)"
    );
    assert!(opened <= 2, "server saw {opened} new connections");
    assert!(threads <= POOL + 1, "{threads} threads connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_does_not_leak_to_the_next_client() {
    let db = MariaDb::start().await;
    // One connection at most: every client gets the same server session, reset in between.
    let proxy = MysqlProxy::start(db.port, "", "pool_size = 1\nmax_connections = 1").await;

    let mut a = connect(proxy.port, Some("appdb")).await;
    let id: u32 = a
        .query_first("SELECT CONNECTION_ID()")
        .await
        .unwrap()
        .unwrap();
    a.query_drop(
        "SET @leak = 42; SET SESSION sql_mode = 'ANSI_QUOTES'; SET SESSION wait_timeout = 77; \
         CREATE TEMPORARY TABLE scratch (x INT); SELECT GET_LOCK('waitless-lock', 0); \
         PREPARE sql_stmt FROM 'SELECT 1'; START TRANSACTION; \
         INSERT INTO items (v) VALUES ('uncommitted')",
    )
    .await
    .unwrap();
    let stmt = a.prep("SELECT ? + 1").await.unwrap();
    let two: Option<i64> = a.exec_first(&stmt, (1,)).await.unwrap();
    assert_eq!(two, Some(2));
    let insert_id: Option<u64> = a.query_first("SELECT LAST_INSERT_ID()").await.unwrap();
    assert!(insert_id.unwrap_or(0) > 0);
    a.disconnect().await.unwrap();

    let mut b = connect(proxy.port, Some("appdb")).await;
    let same: u32 = b
        .query_first("SELECT CONNECTION_ID()")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        same, id,
        "the next client is served by the same server connection"
    );
    let row: Option<Leftovers> = b
        .query_first(
            "SELECT @leak, @@session.sql_mode = @@global.sql_mode, \
             @@session.wait_timeout = @@global.wait_timeout, @@in_transaction, \
             IS_USED_LOCK('waitless-lock'), LAST_INSERT_ID(), (SELECT COUNT(*) FROM items)",
        )
        .await
        .unwrap();
    assert_eq!(
        row,
        Some((None, "1".into(), 1, 0, None, 0, 0)),
        "user variable, sql_mode, wait_timeout, transaction, lock, insert id, rolled back row"
    );
    let temp = b.query_drop("SELECT * FROM scratch").await.unwrap_err();
    assert_eq!(server_code(&temp), Some(1146), "temp table gone: {temp}");
    let prepared = b.query_drop("EXECUTE sql_stmt").await.unwrap_err();
    assert_eq!(
        server_code(&prepared),
        Some(1243),
        "PREPARE gone: {prepared}"
    );
    // The binary protocol statement id of the previous session is gone too.
    b.query_drop("USE other_db").await.unwrap();
    b.disconnect().await.unwrap();

    // A client that moved to another database leaves the next one in its own.
    let mut c = connect(proxy.port, Some("appdb")).await;
    let (cid, schema): (u32, Option<String>) = c
        .query_first("SELECT CONNECTION_ID(), DATABASE()")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((cid, schema.as_deref()), (id, Some("appdb")));
    c.query_drop("USE other_db").await.unwrap();
    c.disconnect().await.unwrap();
    let mut d = connect(proxy.port, None).await;
    let schema: Option<Option<String>> = d.query_first("SELECT DATABASE()").await.unwrap();
    assert_eq!(schema, Some(None), "a client without a database gets none");
    d.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_blob_round_trips_byte_exact() {
    const SIZE: usize = 64 << 20;
    let db = MariaDb::start().await;
    let proxy = MysqlProxy::start(db.port, "", "").await;
    let blob = pattern(SIZE).to_vec();

    let mut c = connect(proxy.port, Some("appdb")).await;
    c.exec_drop("INSERT INTO items (v) VALUES (?)", (blob.clone(),))
        .await
        .unwrap();
    let id = c.last_insert_id().unwrap();
    // Text protocol: one row of one column, a packet over 16 MiB split into chunks.
    let text: Option<Vec<u8>> = c
        .query_first(format!("SELECT v FROM items WHERE id = {id}"))
        .await
        .unwrap();
    assert!(
        text.as_deref() == Some(&blob[..]),
        "text protocol blob differs"
    );
    // Binary protocol.
    let binary: Option<Vec<u8>> = c
        .exec_first("SELECT v FROM items WHERE id = ?", (id,))
        .await
        .unwrap();
    assert!(
        binary.as_deref() == Some(&blob[..]),
        "binary protocol blob differs"
    );
    // And the server stored what was sent.
    let len: Option<u64> = c
        .query_first(format!("SELECT LENGTH(v) FROM items WHERE id = {id}"))
        .await
        .unwrap();
    assert_eq!(len, Some(SIZE as u64));
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_refused_without_touching_the_server() {
    let db = MariaDb::start().await;
    let mut watch = db.watcher().await;
    let proxy = MysqlProxy::start(db.port, "", "").await;
    assert_eq!(short_sessions(proxy.port, 1, 1).await, 0);
    let before = watch.status("Connections").await;

    let e = Conn::new(opts(proxy.port, USER, "wrong", None))
        .await
        .expect_err("wrong password refused");
    match &e {
        mysql_async::Error::Server(s) => {
            assert_eq!((s.code, s.state.as_str()), (1045, "28000"));
            assert_eq!(
                s.message,
                "Access denied for user 'app'@'127.0.0.1' (using password: YES)"
            );
        }
        other => panic!("expected ERR 1045, got {other}"),
    }
    let e = Conn::new(opts(proxy.port, "nobody", "x", None))
        .await
        .expect_err("unknown user refused");
    assert_eq!(server_code(&e), Some(1045));

    assert_eq!(
        watch.status("Connections").await,
        before,
        "the server saw a connection for a refused login"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_max_connections_wait_then_get_1040() {
    let db = MariaDb::start().await;
    let proxy = MysqlProxy::start(
        db.port,
        "",
        "pool_size = 2\nmax_connections = 2\nconnect_timeout = \"1s\"",
    )
    .await;
    let first = connect(proxy.port, None).await;
    let second = connect(proxy.port, None).await;

    let e = Conn::new(opts(proxy.port, USER, PASSWORD, None))
        .await
        .expect_err("a third session is refused");
    match &e {
        mysql_async::Error::Server(s) => {
            assert_eq!((s.code, s.message.as_str()), (1040, "Too many connections"))
        }
        other => panic!("expected ERR 1040, got {other}"),
    }

    // A waiting client gets the connection a leaving one gives back.
    let waiting = tokio::spawn(async move {
        let mut c = Conn::new(opts(proxy.port, USER, PASSWORD, None)).await?;
        let one: Option<u32> = c.query_first("SELECT 1").await?;
        c.disconnect().await?;
        Ok::<_, mysql_async::Error>((one, proxy))
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    first.disconnect().await.unwrap();
    let (one, _proxy) = waiting.await.unwrap().expect("the waiting client got in");
    assert_eq!(one, Some(1));
    second.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_and_multi_statements_work_through_the_pool() {
    let db = MariaDb::start().await;
    let proxy = MysqlProxy::start(db.port, "", "").await;
    let mut c = connect(proxy.port, Some("appdb")).await;

    // COM_STMT_PREPARE / EXECUTE / CLOSE with parameters and result columns.
    let insert = c.prep("INSERT INTO items (v) VALUES (?)").await.unwrap();
    for v in ["a", "b", "c"] {
        c.exec_drop(&insert, (v,)).await.unwrap();
    }
    c.close(insert).await.unwrap();
    let select = c
        .prep("SELECT id, v FROM items WHERE v >= ? ORDER BY id")
        .await
        .unwrap();
    let rows: Vec<(u32, String)> = c.exec(&select, ("b",)).await.unwrap();
    assert_eq!(
        rows.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
        ["b", "c"]
    );
    // No result columns, no parameters.
    c.exec_drop("DO 1", Params::Empty).await.unwrap();

    // Multi-statements: several result sets and OKs in one response.
    let mut results = c
        .query_iter(
            "SELECT 1; UPDATE items SET v = v WHERE 1 = 0; SELECT 'x', 'y' UNION SELECT 'z', 'w'",
        )
        .await
        .unwrap();
    let first: Vec<u8> = results.collect().await.unwrap();
    assert_eq!(first, vec![1]);
    let _ok: Vec<u8> = results.collect().await.unwrap();
    let third: Vec<(String, String)> = results.collect().await.unwrap();
    assert_eq!(third.len(), 2);
    drop(results);

    // A stored procedure returns its result sets and a final OK.
    c.query_drop("CREATE PROCEDURE two() BEGIN SELECT 1; SELECT 2, 3; END")
        .await
        .unwrap();
    let mut results = c.query_iter("CALL two()").await.unwrap();
    let a: Vec<u8> = results.collect().await.unwrap();
    let b: Vec<(u8, u8)> = results.collect().await.unwrap();
    assert_eq!((a, b), (vec![1], vec![(2, 3)]));
    drop(results);

    // Errors come back as the server's, and the session goes on.
    let e = c
        .query_drop("SELECT * FROM missing_table")
        .await
        .unwrap_err();
    assert_eq!(server_code(&e), Some(1146));
    let e = c
        .query_drop("SELECT 1; SELECT * FROM missing_table")
        .await
        .unwrap_err();
    assert_eq!(server_code(&e), Some(1146));
    let one: Option<u8> = c.query_first("SELECT 1").await.unwrap();
    assert_eq!(one, Some(1));
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stock_mariadb_client_works_through_waitless() {
    let db = MariaDb::start().await;
    let proxy = MysqlProxy::start(db.port, "", "").await;

    let (ok, out, err) = cli(
        proxy.port,
        &[
            "appdb",
            "-e",
            "SELECT 1; SELECT DATABASE(); SELECT 'a' UNION SELECT 'b'",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out, "1\nappdb\na\nb\n");

    // LOAD DATA LOCAL INFILE: the client's file travels through the relay.
    let dir = TempDir::new("infile");
    let file = dir.0.join("rows.txt");
    std::fs::write(&file, "one\ntwo\nthree\n").unwrap();
    let sql = format!(
        "LOAD DATA LOCAL INFILE '{}' INTO TABLE items (v); SELECT COUNT(*) FROM items",
        file.display()
    );
    let (ok, out, err) = cli(proxy.port, &["--local-infile=1", "appdb", "-e", &sql]);
    assert!(ok, "{err}");
    assert_eq!(out, "3\n");

    // A server error reaches the client as the server worded it.
    let (ok, _, err) = cli(proxy.port, &["appdb", "-e", "SELECT * FROM nope"]);
    assert!(!ok);
    assert!(
        err.contains("ERROR 1146 (42S02)") && err.contains("appdb.nope"),
        "{err}"
    );

    // A client that insists on TLS is told why it cannot have it.
    // TLS is not offered, so a client that requires it stops before sending anything.
    let (ok, _, err) = cli(proxy.port, &["--ssl-verify-server-cert", "-e", "SELECT 1"]);
    assert!(!ok);
    assert!(err.contains("SSL is required"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_dead_after_a_server_restart_are_not_lent() {
    let mut db = MariaDb::start().await;
    let proxy = MysqlProxy::start(db.port, "", &format!("pool_size = {POOL}")).await;
    assert_eq!(short_sessions(proxy.port, 20, 4).await, 0);

    db.restart().await;
    settle().await;
    assert_eq!(
        short_sessions(proxy.port, 20, 4).await,
        0,
        "sessions after the restart failed"
    );
    // The dead connections were answered and counted, not handed to clients.
    let stats = proxy.stats().await;
    let server = &stats["upstreams"][0]["servers"][0];
    println!("after restart: {server}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_requests_and_caching_sha2_logins_get_clear_answers() {
    use mysql_common::constants::CapabilityFlags as C;
    use mysql_common::io::ParseBuf;
    use mysql_common::packets::{
        AuthPlugin, AuthSwitchRequest, HandshakePacket, HandshakeResponse, SslRequest,
    };
    use mysql_common::proto::MySerialize;

    let db = MariaDb::start().await;
    let proxy = MysqlProxy::start(db.port, "", "").await;
    let caps = C::CLIENT_PROTOCOL_41 | C::CLIENT_SECURE_CONNECTION | C::CLIENT_PLUGIN_AUTH;

    // A client that sends an SSLRequest although TLS was not offered.
    let mut s = raw::connect(proxy.port).await;
    let greeting = raw::read(&mut s).await;
    let mut ssl = Vec::new();
    SslRequest::new(caps | C::CLIENT_SSL, 1 << 24, 45).serialize(&mut ssl);
    raw::write(&mut s, 1, &ssl).await;
    let err = raw::read(&mut s).await;
    assert_eq!(<[u8]>::first(&err), Some(&0xFF));
    assert!(
        String::from_utf8_lossy(&err).contains("does not support TLS"),
        "{err:?}"
    );
    drop(greeting);

    // A client that starts with caching_sha2_password is switched to mysql_native_password.
    let mut s = raw::connect(proxy.port).await;
    let greeting = raw::read(&mut s).await;
    let hs: HandshakePacket<'_> = ParseBuf(&greeting).parse(()).unwrap();
    assert_eq!(hs.auth_plugin(), Some(AuthPlugin::MysqlNativePassword));
    let resp = HandshakeResponse::new(
        Some(&[7u8; 32][..]),
        (10, 11, 0),
        Some(USER.as_bytes()),
        None::<&[u8]>,
        Some(AuthPlugin::CachingSha2Password),
        caps,
        None,
        1 << 24,
    );
    let mut buf = Vec::new();
    resp.serialize(&mut buf);
    raw::write(&mut s, 1, &buf).await;
    let switch = raw::read(&mut s).await;
    let req: AuthSwitchRequest<'_> = ParseBuf(&switch).parse(()).unwrap();
    assert_eq!(req.auth_plugin(), AuthPlugin::MysqlNativePassword);
    let answer =
        mysql_common::scramble::scramble_native(req.plugin_data(), PASSWORD.as_bytes()).unwrap();
    raw::write(&mut s, 3, &answer).await;
    let ok = raw::read(&mut s).await;
    assert_eq!(
        <[u8]>::first(&ok),
        Some(&0x00),
        "login after the switch: {ok:?}"
    );
}

/// Packets by hand, for what no client library does on purpose.
mod raw {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub async fn connect(port: u16) -> TcpStream {
        TcpStream::connect(("127.0.0.1", port)).await.unwrap()
    }

    /// One packet's payload (tests send and receive small packets only).
    pub async fn read(s: &mut TcpStream) -> Vec<u8> {
        let mut head = [0u8; 4];
        s.read_exact(&mut head).await.unwrap();
        let len = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.unwrap();
        payload
    }

    pub async fn write(s: &mut TcpStream, seq: u8, payload: &[u8]) {
        let len = (payload.len() as u32).to_le_bytes();
        s.write_all(&[len[0], len[1], len[2], seq]).await.unwrap();
        s.write_all(payload).await.unwrap();
    }
}

/// The stock client straight to the server (for the comparison with waitless).
fn cli_direct(port: u16, sql: &str) -> (bool, String, String) {
    cli(port, &["-e", sql])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_sessions_over_a_unix_socket_listener() {
    let db = MariaDb::start().await;
    let dir = TempDir::new("mysql-unix");
    let sock = dir.0.join("db.sock");
    let admin = free_port();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[listener]]\nname = \"db\"\nlisten = \"unix:{}\"\nprotocol = \"mysql\"\nupstream = \"db\"\n\n\
         [[upstream]]\nname = \"db\"\nservers = [\"127.0.0.1:{}\"]\n\n\
         [[mysql_user]]\nuser = \"{USER}\"\npassword = \"{PASSWORD}\"\n",
        sock.display(),
        db.port
    );
    let _proxy = Waitless::launch(&config, 0, admin).await;
    for _ in 0..3 {
        let out = std::process::Command::new("mariadb")
            .args(["--no-defaults", "-N", "-B"])
            .arg(format!("--socket={}", sock.display()))
            .arg(format!("-u{USER}"))
            .arg(format!("-p{PASSWORD}"))
            .args(["-e", "SELECT 40 + 2"])
            .output()
            .expect("run mariadb");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.trim(), "42");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_max_clients_get_1040_at_once() {
    let db = MariaDb::start().await;
    let proxy = MysqlProxy::start(db.port, "max_clients = 1", "").await;
    let held = connect(proxy.port, None).await;
    let refused = Conn::new(opts(proxy.port, USER, PASSWORD, None)).await;
    match refused {
        Err(e) => assert_eq!(server_code(&e), Some(1040), "{e}"),
        Ok(_) => panic!("a second client got in past max_clients = 1"),
    }
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_server_up_gives_error_2003() {
    let dead = free_port();
    let proxy = MysqlProxy::start(dead, "", "connect_timeout = \"500ms\"").await;
    match Conn::new(opts(proxy.port, USER, PASSWORD, None)).await {
        Err(e) => assert_eq!(server_code(&e), Some(2003), "{e}"),
        Ok(_) => panic!("logged in with no server up"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_that_stalls_is_cut_at_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = MariaDb::start().await;
    let proxy = MysqlProxy::start(db.port, "header_timeout = \"1s\"", "").await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let greeting = s.read(&mut buf).await.unwrap();
    assert!(greeting > 0, "no greeting");
    // A login packet header announcing 32 bytes, then one byte, then nothing.
    s.write_all(&[32, 0, 0, 1, 0x85]).await.unwrap();
    let cut = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("a stalled login was never cut");
    assert!(matches!(cut, Ok(0) | Err(_)), "{cut:?}");
}
