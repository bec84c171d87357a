//! `cargo bench --bench close`: the cost of `close::Tracked`, the wrapper every client and
//! upstream socket goes through.
//!
//! - `close/*`: ending one accepted TCP connection on loopback — a plain drop against
//!   `Tracked::client(..).finish_client(..)` under each policy, and the drop (error) path.
//!   Only the close is timed; connecting and accepting happen in untimed setup. Every case
//!   ends with an RST on one side, so the bench leaves no TIME_WAIT behind on a shared host.
//! - `rw/*`: a 64-byte write and the matching read through the wrapper, against the bare
//!   socket, over a unix socketpair and a loopback TCP connection.

use std::net::{Shutdown, TcpListener as StdListener, TcpStream as StdStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use waitless::close::{ClientPolicy, Ending, Ledger, Reason, SideId, SideLedger, Tracked};
use waitless::config::{ClientTimeWait, LingerFallback};

/// The accepted (proxy) side of a fresh loopback connection and the client side, which
/// closes with RST when dropped so that no TIME_WAIT is left anywhere.
struct Pair {
    server: StdStream,
    /// None once the client has closed.
    client: Option<StdStream>,
}

/// How the client has already behaved when the proxy side closes.
#[derive(Clone, Copy)]
enum Peer {
    /// Still open, nothing sent.
    Open,
    /// Sent FIN, then RST: the server socket is already CLOSED, as after a client that
    /// closed right after its response and reset the connection.
    Gone,
}

fn pair(listener: &StdListener, peer: Peer) -> Pair {
    let addr = listener.local_addr().expect("listener addr");
    let client = StdStream::connect(addr).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    server.set_nonblocking(true).expect("nonblocking");
    let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
    let client = match peer {
        Peer::Open => Some(client),
        Peer::Gone => {
            let _ = client.shutdown(Shutdown::Write);
            drop(client);
            None
        }
    };
    Pair { server, client }
}

fn policy(time_wait: ClientTimeWait) -> ClientPolicy {
    ClientPolicy::new(time_wait, Duration::from_secs(2), LingerFallback::Fin)
}

fn ledger() -> Arc<SideLedger> {
    Ledger::default().side(SideId::Listener {
        name: "bench".into(),
    })
}

fn bench_close(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let listener = StdListener::bind("127.0.0.1:0").expect("bind");
    let side = ledger();
    let mut g = c.benchmark_group("close");

    g.bench_function("plain_drop/peer_open", |b| {
        b.to_async(&rt).iter_batched(
            || pair(&listener, Peer::Open),
            |p| async move {
                let s = TcpStream::from_std(p.server).expect("register");
                drop(s);
                p.client
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("tracked_finish/none/peer_open", |b| {
        b.to_async(&rt).iter_batched(
            || pair(&listener, Peer::Open),
            |p| {
                let side = side.clone();
                async move {
                    let s = TcpStream::from_std(p.server).expect("register");
                    let t = Tracked::client(s, side, policy(ClientTimeWait::None));
                    t.finish_client(Ending::Over(Reason::Done)).await;
                    p.client
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("tracked_drop/client/peer_open", |b| {
        b.to_async(&rt).iter_batched(
            || pair(&listener, Peer::Open),
            |p| {
                let side = side.clone();
                async move {
                    let s = TcpStream::from_std(p.server).expect("register");
                    drop(Tracked::client(s, side, policy(ClientTimeWait::Client)));
                    p.client
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("plain_drop/peer_gone", |b| {
        b.to_async(&rt).iter_batched(
            || pair(&listener, Peer::Gone),
            |p| async move {
                let s = TcpStream::from_std(p.server).expect("register");
                drop(s);
                p.client
            },
            BatchSize::SmallInput,
        )
    });
    for (name, tw) in [
        ("client", ClientTimeWait::Client),
        ("proxy", ClientTimeWait::Proxy),
        ("none", ClientTimeWait::None),
    ] {
        g.bench_function(format!("tracked_finish/{name}/peer_gone"), |b| {
            b.to_async(&rt).iter_batched(
                || pair(&listener, Peer::Gone),
                |p| {
                    let side = side.clone();
                    async move {
                        let s = TcpStream::from_std(p.server).expect("register");
                        let t = Tracked::client(s, side, policy(tw));
                        t.finish_client(Ending::Over(Reason::Done)).await;
                        p.client
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// `iters` round trips of 64 bytes from `a` to `b`; the time they took.
async fn ping<A, B>(a: &mut A, b: &mut B, iters: u64) -> Duration
where
    A: AsyncWrite + Unpin,
    B: AsyncRead + Unpin,
{
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    let t0 = Instant::now();
    for _ in 0..iters {
        if a.write_all(&msg).await.is_err() || b.read_exact(&mut buf).await.is_err() {
            break;
        }
    }
    t0.elapsed()
}

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
    let c = c.expect("connect");
    let (s, _) = s.expect("accept");
    let _ = socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO));
    (c, s)
}

fn bench_rw(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let side = ledger();
    let mut g = c.benchmark_group("rw");
    g.bench_function("unix_64B/plain", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let (mut x, mut y) = UnixStream::pair().expect("socketpair");
            ping(&mut x, &mut y, iters).await
        })
    });
    g.bench_function("unix_64B/tracked", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let side = side.clone();
            async move {
                let (x, y) = UnixStream::pair().expect("socketpair");
                let mut x = Tracked::client(x, side.clone(), policy(ClientTimeWait::Client));
                let mut y = Tracked::client(y, side, policy(ClientTimeWait::Client));
                ping(&mut x, &mut y, iters).await
            }
        })
    });
    g.bench_function("tcp_64B/plain", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let (mut x, mut y) = tcp_pair().await;
            ping(&mut y, &mut x, iters).await
        })
    });
    g.bench_function("tcp_64B/tracked", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let side = side.clone();
            async move {
                let (x, y) = tcp_pair().await;
                // The client side (x) stays bare and closes with RST; the tracked server
                // side (y) then finds its peer gone: no TIME_WAIT.
                let mut y = Tracked::client(y, side, policy(ClientTimeWait::None));
                let mut x = x;
                let took = ping(&mut y, &mut x, iters).await;
                drop(x);
                drop(y);
                took
            }
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_close, bench_rw
}
criterion_main!(benches);
