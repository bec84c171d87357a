//! `cargo bench --bench close_matrix`: the ledger against the kernel's census, for every
//! protocol and policy. For http, tcp and mysql listeners under `client`, `proxy` and `none`,
//! and for upstreams under `proxy` and `none` (with a server that closes after every
//! response, so that each session ends a server connection), runs 1,000 short sessions and
//! prints the ledger's "TIME_WAIT on proxy" and "on peer" beside what `ss` counts for each
//! side on loopback. Needs the release binary and, for the mysql rows, mariadbd. Then, for
//! each http policy, how long an HTTP/1.1 `Connection: close` client that reads to EOF waits
//! for its end (median and maximum of 40, sequential).

#[path = "../tests/common/mod.rs"]
mod common;

use common::mysql::{short_sessions, MariaDb, MysqlProxy};
use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const N: usize = 1000;
const POLICIES: [&str; 3] = ["client", "proxy", "none"];

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn row(side: &str, policy: &str, ledger: &Value, proxy_tw: usize, peer_tw: usize) {
    let (lp, lq) = (n(&ledger["time_wait_proxy"]), n(&ledger["time_wait_peer"]));
    let off = |l: u64, k: usize| l.abs_diff(k as u64) as f64 * 100.0 / N as f64;
    println!(
        "{side:<9} {policy:<7} {:>6} | {lp:>6} {proxy_tw:>6} {:>5.1}% | {lq:>6} {peer_tw:>6} {:>5.1}%",
        n(&ledger["closed"]),
        off(lp, proxy_tw),
        off(lq, peer_tw),
    );
}

/// A server that greets and closes, as line protocols do on QUIT.
async fn greeter() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"220 hello\r\n").await;
            });
        }
    });
    addr
}

async fn tcp_row(policy: &str) {
    let server = greeter().await;
    let (port, admin) = (free_port(), free_port());
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[listener]]\nname = \"raw\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"tcp\"\n\
         upstream = \"raw\"\ntime_wait = \"{policy}\"\n\n\
         [[upstream]]\nname = \"raw\"\nservers = [\"{server}\"]\n"
    );
    let proxy = Waitless::launch(&config, port, admin).await;
    let addr = proxy.addr();
    run_load(N, 8, move || async move {
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
            return false;
        };
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.is_ok()
    })
    .await;
    settle().await;
    let stats = proxy.stats().await;
    row(
        "tcp",
        policy,
        &stats["listeners"][0]["ledger"],
        time_wait_on_port(proxy.port),
        sockets_to_port("time-wait", proxy.port),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("side      policy  closed | TIME_WAIT on proxy: ledger kernel off | on peer: ledger kernel off");
    for policy in POLICIES {
        let backend = Backend::start(BackendMode::Echo).await;
        let proxy =
            Waitless::start(&[backend.addr], &format!("time_wait = \"{policy}\""), "").await;
        short_load(proxy.addr(), N, 8).await;
        settle().await;
        let stats = proxy.stats().await;
        row(
            "http",
            policy,
            &stats["listeners"][0]["ledger"],
            time_wait_on_port(proxy.port),
            sockets_to_port("time-wait", proxy.port),
        );
    }
    for policy in POLICIES {
        tcp_row(policy).await;
    }
    {
        let db = MariaDb::start().await;
        for policy in POLICIES {
            let proxy = MysqlProxy::start(db.port, &format!("time_wait = \"{policy}\""), "").await;
            short_sessions(proxy.port, N, 8).await;
            settle().await;
            let stats = proxy.stats().await;
            row(
                "mysql",
                policy,
                &stats["listeners"][0]["ledger"],
                time_wait_on_port(proxy.port),
                sockets_to_port("time-wait", proxy.port),
            );
        }
    }
    for policy in ["proxy", "none"] {
        let backend = Backend::start(BackendMode::AlwaysClose).await;
        let proxy =
            Waitless::start(&[backend.addr], "", &format!("time_wait = \"{policy}\"")).await;
        short_load(proxy.addr(), N, 8).await;
        settle().await;
        let stats = proxy.stats().await;
        row(
            "upstream",
            policy,
            &stats["upstreams"][0]["servers"][0]["ledger"],
            sockets_to_port("time-wait", backend.port()),
            time_wait_on_port(backend.port()),
        );
    }
    for policy in POLICIES {
        let backend = Backend::start(BackendMode::Echo).await;
        let proxy =
            Waitless::start(&[backend.addr], &format!("time_wait = \"{policy}\""), "").await;
        let mut ms = Vec::new();
        for _ in 0..40 {
            let t = std::time::Instant::now();
            let ok = get_to_eof(proxy.addr(), "/bytes/1000", "HTTP/1.1")
                .await
                .is_ok();
            ms.push((t.elapsed().as_secs_f64() * 1000.0, ok));
        }
        ms.sort_by(|a, b| a.0.total_cmp(&b.0));
        let whole = ms.iter().filter(|m| m.1).count();
        println!(
            "EOF reader, http {policy:<7} median {:.1} ms, max {:.1} ms, {whole}/40 whole (the end under none is ECONNRESET)",
            ms[ms.len() / 2].0,
            ms[ms.len() - 1].0
        );
    }
}
