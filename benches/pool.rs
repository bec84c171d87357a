//! `cargo bench --bench pool`: the pool's checkout/return path (`Server::take_idle_or_open` then
//! `Server::put`), which every proxied request crosses twice.
//!
//! The connection is a stand-in whose `is_usable` is free, so what is measured is the pool's
//! own cost: the idle list's lock, the clock reads, the idle/lifetime checks. The contended
//! case runs the same loop on two threads against one server, as two runtime workers do.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};

use waitless::close::{CloseCtl, Ledger};
use waitless::config::Config;
use waitless::pool::{PoolConn, Pooled, Server, Upstream};

/// A pooled connection that is always usable.
#[derive(Debug)]
struct Conn;

impl PoolConn for Conn {
    type ServerState = ();

    fn is_usable(&mut self) -> bool {
        true
    }
}

/// A stand-in connection just opened, counted as the connector counts one.
fn fresh(server: &Server<Conn>) -> Pooled<Conn> {
    let counted = server.admit_now().expect("no max_connections here");
    Pooled::new(Conn, CloseCtl::new(), counted)
}

/// An upstream with one server and `idle` connections already pooled.
fn upstream(idle: usize) -> (Arc<Upstream<Conn>>, Arc<Server<Conn>>) {
    let text = "[admin]\nlisten = \"off\"\n\n\
                [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:1\"\nupstream = \"web\"\n\n\
                [[upstream]]\nname = \"web\"\nservers = [\"127.0.0.1:2\"]\npool_size = 64\n";
    let config = Config::parse(text, std::path::Path::new("<bench>")).expect("bench config");
    let cfg = config.upstream("web").expect("upstream web");
    let ledger = Arc::new(Ledger::default());
    let up = Upstream::<Conn>::new(cfg, &ledger, 1, false);
    let server = up.servers().servers[0].clone();
    for _ in 0..idle {
        server.put(&up.cfg, fresh(&server));
    }
    (up, server)
}

/// One request's worth of pool traffic: check a connection out, use it, give it back.
fn checkout_return(up: &Upstream<Conn>, server: &Server<Conn>) {
    match server.take_idle_or_open(&up.cfg) {
        Some(mut p) => {
            p.mark_used();
            server.put(&up.cfg, p);
        }
        // Never happens here: every connection taken is put back.
        None => server.put(&up.cfg, fresh(server)),
    }
}

fn bench_pool(c: &mut Criterion) {
    // Upstream::new starts its idle reaper on the current runtime.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();

    let mut g = c.benchmark_group("pool");
    for idle in [1, 64] {
        let (up, server) = upstream(idle);
        g.bench_function(format!("checkout_return/{idle}_idle"), |b| {
            b.iter(|| checkout_return(&up, &server))
        });
    }

    // Two threads hammering one server's idle list: the lock every request takes twice.
    let (up, server) = upstream(64);
    g.bench_function("checkout_return/2_threads_contended", |b| {
        b.iter_custom(|iters| {
            let start = Arc::new(Barrier::new(2));
            let other = {
                let (up, server, start) = (up.clone(), server.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    for _ in 0..iters {
                        checkout_return(&up, &server);
                    }
                })
            };
            start.wait();
            let t0 = Instant::now();
            for _ in 0..iters {
                checkout_return(&up, &server);
            }
            let mine = t0.elapsed();
            let _ = other.join();
            // Time per operation of this thread while the other one ran alongside.
            mine.max(Duration::from_nanos(1))
        })
    });

    g.bench_function("fresh_pooled_new_and_put", |b| {
        let (up, server) = upstream(0);
        b.iter(|| {
            // Opening bookkeeping only (no socket): admit, Pooled::new + CloseCtl, then the take
            // that empties the list again so every put lands.
            server.put(&up.cfg, fresh(&server));
            server.take_idle(&up.cfg)
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_pool
}
criterion_main!(benches);
