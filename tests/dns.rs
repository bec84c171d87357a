//! Server names that follow DNS, against the real binary: a DNS server in the test (UDP on
//! loopback, A records from a table the test changes, TTL 1 s) named in `[resolver]
//! nameservers`, and two real backends on 127.0.0.1 and 127.0.0.2, same port.

mod common;

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::A;
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use http_body_util::Full;
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UdpSocket};

use common::{free_port, get, Waitless};

/// The name the backends are found by.
const NAME: &str = "backend.waitless.test";

/// A DNS server answering A queries for `NAME` from `table`, TTL 1 s; silent while
/// `answering` is false (an outage as a resolver sees it: no answer at all).
struct Dns {
    addr: SocketAddr,
    table: Arc<Mutex<Vec<Ipv4Addr>>>,
    answering: Arc<AtomicBool>,
    queries: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Dns {
    async fn start(first: Ipv4Addr) -> Dns {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let table = Arc::new(Mutex::new(vec![first]));
        let answering = Arc::new(AtomicBool::new(true));
        let queries = Arc::new(AtomicUsize::new(0));
        let (t, a, q) = (table.clone(), answering.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                q.fetch_add(1, Ordering::SeqCst);
                if !a.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let answer = answer(&query, &t.lock().unwrap());
                let _ = sock.send_to(&answer.to_vec().unwrap(), from).await;
            }
        });
        Dns {
            addr,
            table,
            answering,
            queries,
            task,
        }
    }

    fn set(&self, addrs: &[Ipv4Addr]) {
        *self.table.lock().unwrap() = addrs.to_vec();
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The response to `query`: A records of `NAME` from `table`, NXDOMAIN for other names.
fn answer(query: &Message, table: &[Ipv4Addr]) -> Message {
    let mut m = Message::new(
        query.metadata.id,
        MessageType::Response,
        query.metadata.op_code,
    );
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.authoritative = true;
    for q in &query.queries {
        m.add_query(q.clone());
        let ours = q.name().to_ascii().trim_end_matches('.') == NAME;
        if !ours {
            m.metadata.response_code = ResponseCode::NXDomain;
            continue;
        }
        if q.query_type() == RecordType::A {
            for ip in table {
                m.add_answer(Record::from_rdata(q.name().clone(), 1, RData::A(A(*ip))));
            }
        }
    }
    m
}

/// An HTTP backend on `addr` that answers its own IP, counting requests.
struct Backend {
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    fn start(listener: TcpListener) -> Backend {
        let requests = Arc::new(AtomicUsize::new(0));
        let r = requests.clone();
        let me = listener.local_addr().unwrap().ip().to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (r, me) = (r.clone(), me.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        r.fetch_add(1, Ordering::SeqCst);
                        let body = Bytes::from(me.clone());
                        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend { requests, task }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listeners on 127.0.0.1 and 127.0.0.2 at one port.
async fn two_loopbacks() -> (TcpListener, TcpListener, u16) {
    for _ in 0..50 {
        let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = a.local_addr().unwrap().port();
        if let Ok(b) = TcpListener::bind(("127.0.0.2", port)).await {
            return (a, b, port);
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

/// TCP sockets in `state` from `src` to `dst`, as the kernel has them.
fn sockets(state: &str, filter: &str) -> usize {
    let out = std::process::Command::new("ss")
        .args(["-tanH", "state", state, filter])
        .output()
        .expect("run ss");
    assert!(out.status.success(), "ss failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// The /stats entry of server `label` of upstream "web".
fn server<'a>(stats: &'a serde_json::Value, label: &str) -> Option<&'a serde_json::Value> {
    stats["upstreams"][0]["servers"]
        .as_array()?
        .iter()
        .find(|s| s["server"] == label)
}

/// In `stats`: server `old` (found by DNS name `name`) is listed as gone, with every
/// connection opened to it closed, waitless closing first for the drain; `new` is up.
fn assert_drained(stats: &serde_json::Value, old: &str, new: &str, name: &str) {
    let gone = server(stats, old).expect("the old server is listed while gone");
    assert_eq!(gone["state"], "gone", "{gone}");
    assert_eq!(gone["name"], name);
    let opened = gone["opened"].as_u64().unwrap();
    assert!(opened > 0);
    assert_eq!(
        gone["ledger"]["closed"].as_u64().unwrap(),
        opened,
        "every connection to the old server is in its ledger: {gone}"
    );
    let drained: u64 = gone["ledger"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == "drain" && e["closer"] == "proxy")
        .map(|e| e["count"].as_u64().unwrap())
        .sum();
    assert!(drained > 0, "no close by waitless for draining: {gone}");
    assert_eq!(server(stats, new).unwrap()["state"], "up");
}

/// Polls `done` every 50 ms for up to `limit`; how long it took, or None.
async fn within<F, Fut>(limit: Duration, mut done: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if done().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Moves traffic from 127.0.0.1 to 127.0.0.2 when the record changes, with no client error
/// in a client loop that runs throughout; the old server's pooled connections are closed by
/// waitless (none left, no TIME_WAIT on the server, counted as drain closes); then a DNS
/// outage keeps traffic on the last good address and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_record_moves_traffic_and_an_outage_keeps_the_last_addresses() {
    let (one, two) = (Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2));
    let (l1, l2, port) = two_loopbacks().await;
    let (b1, b2) = (Backend::start(l1), Backend::start(l2));
    let dns = Dns::start(one).await;
    let (listen, admin) = (free_port(), free_port());
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [resolver]\nnameservers = [\"{}\"]\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:{listen}\"\nupstream = \"web\"\n\n\
         [[upstream]]\nname = \"web\"\nservers = [\"{NAME}:{port}\"]\nresolve_interval = \"5s\"\n",
        dns.addr
    );
    let (proxy, log) = Waitless::launch_logged(&config, listen, admin, "waitless=info").await;
    let addr = proxy.addr();

    // The client loop: 4 clients, short requests, bounded in count and time.
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let served = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, errors, served) = (stop.clone(), errors.clone(), served.clone());
        clients.push(tokio::spawn(async move {
            let started = Instant::now();
            for _ in 0..20_000 {
                if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(40) {
                    break;
                }
                match get(addr, "/", false).await {
                    Ok((200, _)) => {
                        served.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok((status, body)) => errors.lock().unwrap().push(format!("{status} {body:?}")),
                    Err(e) => errors.lock().unwrap().push(e),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let old = format!("127.0.0.1:{port}");
    let new = format!("127.0.0.2:{port}");
    assert!(
        within(Duration::from_secs(5), || async { b1.requests() > 20 })
            .await
            .is_some(),
        "traffic did not reach the first address"
    );
    assert_eq!(
        b2.requests(),
        0,
        "the second address was used before its record"
    );
    let stats = proxy.stats().await;
    assert_eq!(
        stats["upstreams"][0]["dns"][0]["name"],
        format!("{NAME}:{port}")
    );
    assert_eq!(stats["upstreams"][0]["dns"][0]["addrs"][0], old);
    assert!(
        sockets("established", &format!("dst {old}")) > 0,
        "no pooled connection to the first address"
    );

    // The record moves: traffic follows within the TTL plus a lookup.
    dns.set(&[two]);
    let moved = within(Duration::from_secs(5), || async { b2.requests() > 0 }).await;
    assert!(moved.is_some(), "traffic did not move to the new address");
    // Requests in flight at the change finish on the old address; then nothing goes there.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let on_old = b1.requests();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        b1.requests(),
        on_old,
        "the address that left DNS still took requests"
    );
    assert!(b2.requests() > 20, "the new address served too little");

    // The old server's pooled connections were closed by waitless, and none is left.
    let closed = within(Duration::from_secs(3), || async {
        sockets("established", &format!("dst {old}")) == 0
    })
    .await;
    assert!(
        closed.is_some(),
        "pooled connections to the old address remain"
    );
    assert_eq!(
        sockets("time-wait", &format!("src {old}")),
        0,
        "TIME_WAIT on the old server"
    );
    let stats = proxy.stats().await;
    assert_drained(&stats, &old, &new, &format!("{NAME}:{port}"));
    assert_eq!(stats["upstreams"][0]["dns"][0]["addrs"][0], new);
    let metrics = proxy.admin_get("/metrics").await;
    let ok_line = format!(
        "waitless_dns_resolutions_total{{upstream=\"web\",name=\"{NAME}:{port}\",result=\"ok\"}}"
    );
    assert!(metrics.contains(&ok_line), "{ok_line} not in /metrics");

    // An outage: the last good address keeps serving; failures are counted.
    dns.answering.store(false, Ordering::SeqCst);
    let asked = dns.queries.load(Ordering::SeqCst);
    let before = b2.requests();
    // Each failed lookup takes waitless's lookup timeout (5 s), the retry 1 s after it.
    let failed = within(Duration::from_secs(15), || async {
        proxy.stats().await["upstreams"][0]["dns"][0]["failed"]
            .as_u64()
            .unwrap_or(0)
            >= 2
    })
    .await;
    assert!(
        failed.is_some(),
        "failed lookups were not counted: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        dns.queries.load(Ordering::SeqCst) > asked,
        "waitless stopped asking"
    );
    assert!(
        b2.requests() > before + 20,
        "traffic stopped during the outage"
    );
    let stats = proxy.stats().await;
    let name = &stats["upstreams"][0]["dns"][0];
    assert_eq!(name["addrs"][0], new, "the last good address was dropped");
    assert!(name["error"].is_string(), "{name}");
    assert_eq!(server(&stats, &new).unwrap()["state"], "up");
    let metrics = proxy.admin_get("/metrics").await;
    let error_line = format!(
        "waitless_dns_resolutions_total{{upstream=\"web\",name=\"{NAME}:{port}\",result=\"error\"}}"
    );
    assert!(
        metrics.contains(&error_line),
        "{error_line} not in /metrics"
    );

    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let errors = errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} client errors of {}: {:?}",
        errors.len(),
        served.load(Ordering::SeqCst),
        &errors[..errors.len().min(5)]
    );
}

/// `waitless check` prints every address a server name resolves to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_the_addresses_of_a_server_name() {
    let dns = Dns::start(Ipv4Addr::new(127, 0, 0, 2)).await;
    dns.set(&[Ipv4Addr::new(127, 0, 0, 3), Ipv4Addr::new(127, 0, 0, 2)]);
    let dir = common::TempDir::new("dns-check");
    let path = dir.0.join("waitless.toml");
    std::fs::write(
        &path,
        format!(
            "[resolver]\nnameservers = [\"{}\"]\n\n\
             [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:{}\"\nupstream = \"web\"\n\n\
             [[upstream]]\nname = \"web\"\nservers = [\"{NAME}:8080\"]\n",
            dns.addr,
            free_port()
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_waitless");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!(
            "# servers[0] = \"{NAME}:8080\" resolves to 127.0.0.2:8080, 127.0.0.3:8080"
        )),
        "{text}"
    );
    assert!(text.contains("resolve_interval = \"30s\""), "{text}");

    // A name the nameserver does not know is an error naming the key.
    dns.answering.store(true, Ordering::SeqCst);
    let dir = common::TempDir::new("dns-check-bad");
    let path = dir.0.join("waitless.toml");
    std::fs::write(
        &path,
        format!(
            "[resolver]\nnameservers = [\"{}\"]\n\n\
             [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:{}\"\nupstream = \"web\"\n\n\
             [[upstream]]\nname = \"web\"\nservers = [\"nowhere.waitless.test:8080\"]\n",
            dns.addr,
            free_port()
        ),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("upstream[0].servers[0]") && err.contains("nowhere"),
        "{err}"
    );
}

/// A port free on both 127.0.0.1 and 127.0.0.2 right now (for two servers of one name).
fn port_on_both() -> u16 {
    for _ in 0..50 {
        let port = free_port();
        if std::net::TcpListener::bind(("127.0.0.2", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

/// What a client loop saw: statements answered by each server, and its errors.
#[derive(Default)]
struct Seen {
    by: Mutex<std::collections::HashMap<String, usize>>,
    last: Mutex<Vec<String>>,
    errors: Mutex<Vec<String>>,
}

impl Seen {
    fn answered(&self, who: String) {
        *self.by.lock().unwrap().entry(who.clone()).or_default() += 1;
        self.last.lock().unwrap().push(who);
    }

    fn count(&self, who: &str) -> usize {
        self.by.lock().unwrap().get(who).copied().unwrap_or(0)
    }

    /// Who answered since the last call.
    fn take_last(&self) -> Vec<String> {
        std::mem::take(&mut *self.last.lock().unwrap())
    }
}

/// A mysql upstream named by DNS follows it as an http one does: two real MariaDB servers
/// on 127.0.0.1 and 127.0.0.2 at one port, short sessions (session pooling) and persistent
/// transaction-pooled clients throughout. When the record moves, new sessions and the
/// persistent clients' next statements go to the new server with no client error; waitless
/// closes every connection to the old one (drain closes in its ledger, no TIME_WAIT on that
/// server); a DNS outage keeps sessions on the last good address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mysql_upstream_follows_dns_without_a_client_error() {
    use common::mysql::{opts, MariaDb, PASSWORD, USER};
    use mysql_async::prelude::Queryable;

    let port = port_on_both();
    let (db1, db2) = tokio::join!(
        MariaDb::start_on("127.0.0.1", port, &[]),
        MariaDb::start_on("127.0.0.2", port, &[])
    );
    for (db, who) in [(&db1, "one"), (&db2, "two")] {
        db.root_sql(&format!(
            "CREATE TABLE appdb.whoami (name VARCHAR(8)); INSERT INTO appdb.whoami VALUES ('{who}');"
        ));
    }
    let dns = Dns::start(Ipv4Addr::new(127, 0, 0, 1)).await;
    let (session, pooled, admin) = (free_port(), free_port(), free_port());
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [resolver]\nnameservers = [\"{}\"]\n\n\
         [[listener]]\nname = \"sessions\"\nlisten = \"127.0.0.1:{session}\"\n\
         protocol = \"mysql\"\nupstream = \"db\"\n\n\
         [[listener]]\nname = \"mux\"\nlisten = \"127.0.0.1:{pooled}\"\n\
         protocol = \"mysql\"\nupstream = \"db\"\npooling = \"transaction\"\n\n\
         [[upstream]]\nname = \"db\"\nservers = [\"{NAME}:{port}\"]\nresolve_interval = \"5s\"\n\
         pool_size = 4\n\n\
         [[mysql_user]]\nuser = \"{USER}\"\npassword = \"{PASSWORD}\"\n",
        dns.addr
    );
    let (proxy, log) = Waitless::launch_logged(&config, session, admin, "waitless=info").await;

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Seen::default());
    let mut clients = Vec::new();
    // Short sessions: connect, read which server answered, quit; 3 at a time.
    for _ in 0..3 {
        let (stop, seen) = (stop.clone(), seen.clone());
        clients.push(tokio::spawn(async move {
            let started = Instant::now();
            for _ in 0..5_000 {
                if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                let cycle = async {
                    let mut c =
                        mysql_async::Conn::new(opts(session, USER, PASSWORD, Some("appdb")))
                            .await?;
                    let who: Option<String> = c.query_first("SELECT name FROM whoami").await?;
                    c.disconnect().await?;
                    Ok::<_, mysql_async::Error>(who.unwrap_or_default())
                };
                match cycle.await {
                    Ok(who) => seen.answered(format!("session {who}")),
                    Err(e) => seen.errors.lock().unwrap().push(format!("session: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    // Persistent transaction-pooled clients: one connection each for the whole test.
    for _ in 0..3 {
        let (stop, seen) = (stop.clone(), seen.clone());
        clients.push(tokio::spawn(async move {
            let mut c =
                match mysql_async::Conn::new(opts(pooled, USER, PASSWORD, Some("appdb"))).await {
                    Ok(c) => c,
                    Err(e) => {
                        seen.errors
                            .lock()
                            .unwrap()
                            .push(format!("mux connect: {e}"));
                        return;
                    }
                };
            let started = Instant::now();
            for _ in 0..20_000 {
                if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                match c.query_first::<String, _>("SELECT name FROM whoami").await {
                    Ok(who) => seen.answered(format!("mux {}", who.unwrap_or_default())),
                    Err(e) => seen.errors.lock().unwrap().push(format!("mux: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = c.disconnect().await;
        }));
    }

    let old = format!("127.0.0.1:{port}");
    let new = format!("127.0.0.2:{port}");
    let both = || seen.count("session one") > 20 && seen.count("mux one") > 20;
    assert!(
        within(Duration::from_secs(10), || async { both() })
            .await
            .is_some(),
        "traffic did not reach the first server"
    );
    assert!(
        seen.count("session two") + seen.count("mux two") == 0,
        "the second server was used before its record"
    );
    assert!(
        sockets("established", &format!("dst {old}")) > 0,
        "no pooled connection to the first server"
    );

    // The record moves: new sessions and the persistent clients' statements follow.
    dns.set(&[Ipv4Addr::new(127, 0, 0, 2)]);
    let moved = within(Duration::from_secs(8), || async {
        seen.count("session two") > 0 && seen.count("mux two") > 0
    })
    .await;
    assert!(
        moved.is_some(),
        "traffic did not move to the new server: {:?}",
        seen.by.lock().unwrap()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    seen.take_last();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let since = seen.take_last();
    assert!(since.len() > 20, "too little traffic after the move");
    assert!(
        since.iter().all(|w| w.ends_with("two")),
        "the server that left DNS still answered: {:?}",
        since.iter().filter(|w| w.ends_with("one")).count()
    );

    // Every connection to the old server was closed by waitless, and none kept TIME_WAIT
    // there.
    let closed = within(Duration::from_secs(5), || async {
        sockets("established", &format!("dst {old}")) == 0
    })
    .await;
    assert!(
        closed.is_some(),
        "connections to the old server remain: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(
        sockets("time-wait", &format!("src {old}")),
        0,
        "TIME_WAIT on the old server"
    );
    let stats = proxy.stats().await;
    assert_drained(&stats, &old, &new, &format!("{NAME}:{port}"));

    // An outage: sessions keep going to the last good address.
    dns.answering.store(false, Ordering::SeqCst);
    let failed = within(Duration::from_secs(15), || async {
        proxy.stats().await["upstreams"][0]["dns"][0]["failed"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    })
    .await;
    assert!(failed.is_some(), "a failed lookup was not counted");
    let before = seen.count("session two");
    let kept = within(Duration::from_secs(5), || async {
        seen.count("session two") > before + 20
    })
    .await;
    assert!(kept.is_some(), "sessions stopped during the outage");

    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let errors = seen.errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} client errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    // The server that left saw waitless's connections end: none of them is still open there.
    let threads: u64 = db1
        .root_sql("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = 'app'")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        threads, 0,
        "sessions of waitless still open on the old server"
    );
}
