//! Transaction pooling (`pooling = "transaction"`) against a real MariaDB: hundreds of
//! persistent clients on a few server connections (the server's own processlist says so),
//! while what one client leaves on a connection stays its own: user variables, an open
//! transaction, temporary tables and LAST_INSERT_ID, and a client killed mid-transaction
//! leaves nothing.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mysql::*;
use common::*;
use mysql_async::prelude::*;
use mysql_async::Conn;

/// The app account's connections in the server's processlist.
async fn app_connections(watch: &mut Watcher) -> u64 {
    let n: Option<u64> = watch
        .0
        .query_first(format!(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = '{USER}'"
        ))
        .await
        .expect("processlist");
    n.unwrap_or(0)
}

/// waitless in front of `db` with `pooling = "transaction"` and `connections` server
/// connections at most.
async fn mux_proxy(db: &MariaDb, connections: usize) -> MysqlProxy {
    let bounds = format!(
        "pool_size = {connections}\nmax_connections = {connections}\nconnect_timeout = \"10s\""
    );
    let port = free_port();
    let admin = free_port();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[listener]]\nname = \"db\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"mysql\"\n\
         upstream = \"db\"\npooling = \"transaction\"\n\n\
         [[upstream]]\nname = \"db\"\nservers = [\"127.0.0.1:{}\"]\n{bounds}\n\n\
         [[mysql_user]]\nuser = \"{USER}\"\npassword = \"{PASSWORD}\"\n",
        db.port
    );
    MysqlProxy(Waitless::launch(&config, port, admin).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_hundred_persistent_clients_share_eight_server_connections() {
    const CLIENTS: usize = 400;
    const RUN: Duration = Duration::from_secs(15);
    let db = MariaDb::start().await;
    let mut watch = db.watcher().await;
    let proxy = mux_proxy(&db, 8).await;
    let port = proxy.port;

    let done = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (done, answered) = (done.clone(), answered.clone());
        clients.push(tokio::spawn(async move {
            let mut c = Conn::new(opts(port, USER, PASSWORD, Some("appdb")))
                .await
                .map_err(|e| format!("client {i} connect: {e}"))?;
            let mut n = 0u64;
            while !done.load(Ordering::Relaxed) {
                // Reads, autocommit writes and a short transaction, in turn.
                match n % 4 {
                    0 | 2 => {
                        let got: Option<u64> = c
                            .query_first(format!("SELECT {i} + {n}"))
                            .await
                            .map_err(|e| format!("client {i} select: {e}"))?;
                        if got != Some(i as u64 + n) {
                            return Err(format!("client {i}: SELECT answered {got:?}"));
                        }
                    }
                    1 => c
                        .query_drop(format!("INSERT INTO items (v) VALUES ('c{i}-{n}')"))
                        .await
                        .map_err(|e| format!("client {i} insert: {e}"))?,
                    _ => {
                        c.query_drop("BEGIN").await.map_err(|e| e.to_string())?;
                        c.query_drop(format!("UPDATE items SET v = 'u{i}' WHERE id = {i}"))
                            .await
                            .map_err(|e| format!("client {i} update: {e}"))?;
                        c.query_drop("COMMIT").await.map_err(|e| e.to_string())?;
                    }
                }
                answered.fetch_add(1, Ordering::Relaxed);
                n += 1;
                tokio::time::sleep(Duration::from_millis(40 + (i % 20) as u64)).await;
            }
            c.disconnect().await.map_err(|e| e.to_string())?;
            Ok::<u64, String>(n)
        }));
    }

    let started = Instant::now();
    let mut most = 0;
    while started.elapsed() < RUN {
        most = most.max(app_connections(&mut watch).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done.store(true, Ordering::Relaxed);
    let mut statements = 0;
    let mut failures = Vec::new();
    for c in clients {
        match c.await.expect("client task") {
            Ok(n) => statements += n,
            Err(e) => failures.push(e),
        }
    }
    most = most.max(app_connections(&mut watch).await);
    let stats = proxy.stats().await;
    let mux = &stats["listeners"][0]["mysql"];
    println!(
        "{CLIENTS} clients, {statements} statements in {RUN:?}; the server showed at most \
         {most} app connections; /stats: {mux}"
    );
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        statements >= (CLIENTS * 50) as u64,
        "only {statements} statements"
    );
    assert!(most <= 8, "the server showed {most} connections of {USER}");
    assert_eq!(mux["pinned_total"], 0, "nothing here pins: {mux}");
    assert!(
        mux["lends"].as_u64().unwrap_or(0) >= statements / 2,
        "{mux}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_pins_a_client_stays_its_own_and_no_one_elses() {
    let db = MariaDb::start().await;
    let proxy = mux_proxy(&db, 3).await;
    let port = proxy.port;
    // Others look in sessions of their own, each on whichever connection is free: a look
    // that reads a variable or fails pins its session, until it ends and is reset.
    async fn others_see(port: u16, sql: &str) -> Vec<Result<Option<String>, Option<u16>>> {
        let mut seen = Vec::new();
        for _ in 0..6 {
            let mut c = connect(port, Some("appdb")).await;
            let got: Result<Option<Option<String>>, _> = c.query_first(sql).await;
            seen.push(got.map(Option::flatten).map_err(|e| server_code(&e)));
            c.disconnect().await.unwrap();
        }
        seen
    }

    // A user variable.
    let mut a = connect(port, Some("appdb")).await;
    a.query_drop("SET @v = 42").await.unwrap();
    let seen = others_see(port, "SELECT CAST(@v AS CHAR)").await;
    assert!(
        seen.iter().all(|s| s == &Ok(None)),
        "others saw @v: {seen:?}"
    );
    let v: Option<i64> = a.query_first("SELECT @v").await.unwrap();
    assert_eq!(v, Some(42));

    // An open transaction: its row is its own until it rolls back, then no one's.
    let mut t = connect(port, Some("appdb")).await;
    t.query_drop("BEGIN").await.unwrap();
    t.query_drop("INSERT INTO items (v) VALUES ('uncommitted')")
        .await
        .unwrap();
    let seen = others_see(
        port,
        "SELECT CAST(COUNT(*) AS CHAR) FROM items WHERE v = 'uncommitted'",
    )
    .await;
    assert!(
        seen.iter().all(|s| s == &Ok(Some("0".into()))),
        "others saw the row: {seen:?}"
    );
    let mine: Option<u64> = t
        .query_first("SELECT COUNT(*) FROM items WHERE v = 'uncommitted'")
        .await
        .unwrap();
    assert_eq!(mine, Some(1), "its own uncommitted row");
    t.query_drop("ROLLBACK").await.unwrap();
    let after: Option<u64> = t
        .query_first("SELECT COUNT(*) FROM items WHERE v = 'uncommitted'")
        .await
        .unwrap();
    assert_eq!(after, Some(0), "ROLLBACK leaves nothing");

    // A temporary table.
    let mut m = connect(port, Some("appdb")).await;
    m.query_drop("CREATE TEMPORARY TABLE scratch (x INT)")
        .await
        .unwrap();
    m.query_drop("INSERT INTO scratch VALUES (7)")
        .await
        .unwrap();
    let seen = others_see(port, "SELECT CAST(x AS CHAR) FROM scratch").await;
    assert!(
        seen.iter().all(|s| s == &Err(Some(1146))),
        "others must not see it: {seen:?}"
    );
    let x: Option<i64> = m.query_first("SELECT x FROM scratch").await.unwrap();
    assert_eq!(x, Some(7), "the creator still sees its temporary table");

    settle().await;
    let stats = proxy.stats().await;
    let mux = &stats["listeners"][0]["mysql"];
    println!("/stats: {mux}");
    assert_eq!(mux["pins"]["set"], 1, "{mux}");
    assert_eq!(mux["pins"]["temporary_table"], 1, "{mux}");
    assert_eq!(mux["pins"]["user_variable"], 6, "{mux}");
    assert_eq!(mux["pins"]["diagnostics"], 6, "{mux}");
    assert_eq!(mux["pinned"], 2, "a and m, pinned now: {mux}");
    for c in [a, t, m] {
        c.disconnect().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_insert_id_is_the_clients_own_while_others_insert() {
    let db = MariaDb::start().await;
    let proxy = mux_proxy(&db, 3).await;
    let port = proxy.port;
    let stop = Arc::new(AtomicBool::new(false));
    // Inserters keep the shared connections' LAST_INSERT_ID moving.
    let mut inserters = Vec::new();
    for i in 0..4 {
        let stop = stop.clone();
        inserters.push(tokio::spawn(async move {
            let mut c = connect(port, Some("appdb")).await;
            while !stop.load(Ordering::Relaxed) {
                c.query_drop(format!("INSERT INTO items (v) VALUES ('other{i}')"))
                    .await
                    .unwrap();
            }
            c.disconnect().await.unwrap();
        }));
    }
    let never: Option<u64> = connect(port, Some("appdb"))
        .await
        .query_first("SELECT LAST_INSERT_ID()")
        .await
        .unwrap();
    assert_eq!(never, Some(0), "a client that inserted nothing");
    for round in 0..20 {
        let mut c = connect(port, Some("appdb")).await;
        c.query_drop(format!("INSERT INTO items (v) VALUES ('mine{round}')"))
            .await
            .unwrap();
        let own = c.last_insert_id().expect("an insert id in the OK");
        c.query_drop("SELECT 1").await.unwrap();
        let read: Option<u64> = c.query_first("SELECT LAST_INSERT_ID()").await.unwrap();
        assert_eq!(read, Some(own), "round {round}");
        let v: Option<String> = c
            .query_first("SELECT v FROM items WHERE id = LAST_INSERT_ID()")
            .await
            .unwrap();
        assert_eq!(v.as_deref(), Some(format!("mine{round}").as_str()));
        c.disconnect().await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for i in inserters {
        i.await.unwrap();
    }
    let stats = proxy.stats().await;
    assert_eq!(stats["listeners"][0]["mysql"]["pins"]["last_insert_id"], 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_transaction_is_rolled_back_and_reset_before_reuse() {
    if !Interpreter::PyMySql.available().await {
        return;
    }
    let db = MariaDb::start().await;
    let mut watch = db.watcher().await;
    // One connection: whoever comes next gets the killed client's.
    let proxy = mux_proxy(&db, 1).await;
    let body = r#"
import os, signal, sys, pymysql
host, port, user, pw = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
c = pymysql.connect(host=host, port=port, user=user, password=pw, database="appdb", autocommit=True)
cur = c.cursor()
cur.execute("BEGIN")
cur.execute("INSERT INTO items (v) VALUES ('killed')")
cur.execute("SELECT COUNT(*) FROM items WHERE v = 'killed'")
print("inside", cur.fetchone()[0])
os.kill(os.getpid(), signal.SIGKILL)
"#;
    let out = Interpreter::PyMySql
        .run(body, proxy.port, Duration::from_secs(20))
        .await;
    assert!(out.contains("inside 1"), "{out}");
    let resets_before = proxy.stats().await["upstreams"][0]["servers"][0]["resets"]
        .as_u64()
        .unwrap_or(0);
    let mut c = connect(proxy.port, Some("appdb")).await;
    let left: Option<u64> = c
        .query_first("SELECT COUNT(*) FROM items WHERE v = 'killed'")
        .await
        .unwrap();
    assert_eq!(
        left,
        Some(0),
        "the killed client's transaction was rolled back"
    );
    // Its row lock is gone too: the same row can be written at once.
    c.query_drop("INSERT INTO items (v) VALUES ('after')")
        .await
        .unwrap();
    let in_trans: Option<u64> = c.query_first("SELECT @@in_transaction").await.unwrap();
    assert_eq!(in_trans, Some(0));
    c.disconnect().await.unwrap();
    settle().await;
    let stats = proxy.stats().await;
    let server = &stats["upstreams"][0]["servers"][0];
    println!(
        "server: resets {}, open {}",
        server["resets"], server["open"]
    );
    assert!(
        server["resets"].as_u64().unwrap_or(0) >= resets_before.max(1),
        "the connection was reset: {server}"
    );
    assert!(app_connections(&mut watch).await <= 1);
}

/// A session-pooled listener that shares an upstream with a transaction-pooled one never
/// shows a session another client's LAST_INSERT_ID: on the one server connection both
/// listeners use, a transaction-pooled INSERT leaves its id, and the next session to start
/// there reads 0, as on a fresh connection (it read the other's id before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_never_starts_with_another_listeners_insert_id() {
    let db = MariaDb::start().await;
    let (mux, session, admin) = (free_port(), free_port(), free_port());
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[listener]]\nname = \"mux\"\nlisten = \"127.0.0.1:{mux}\"\nprotocol = \"mysql\"\n\
         upstream = \"db\"\npooling = \"transaction\"\n\n\
         [[listener]]\nname = \"sessions\"\nlisten = \"127.0.0.1:{session}\"\n\
         protocol = \"mysql\"\nupstream = \"db\"\n\n\
         [[upstream]]\nname = \"db\"\nservers = [\"127.0.0.1:{}\"]\n\
         pool_size = 1\nmax_connections = 1\nconnect_timeout = \"10s\"\n\n\
         [[mysql_user]]\nuser = \"{USER}\"\npassword = \"{PASSWORD}\"\n",
        db.port
    );
    let _proxy = Waitless::launch(&config, mux, admin).await;
    let mut watch = db.watcher().await;
    for round in 0..3 {
        let mut m = connect(mux, Some("appdb")).await;
        m.query_drop("INSERT INTO items (v) VALUES ('x')")
            .await
            .unwrap();
        let mut s = connect(session, Some("appdb")).await;
        let id: Option<u64> = s.query_first("SELECT LAST_INSERT_ID()").await.unwrap();
        assert_eq!(
            id,
            Some(0),
            "round {round}: a new session saw another client's LAST_INSERT_ID"
        );
        s.disconnect().await.unwrap();
        m.disconnect().await.unwrap();
    }
    // Both listeners were served by the one server connection.
    assert_eq!(app_connections(&mut watch).await, 1);
}
