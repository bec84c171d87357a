//! The protocols as the composition root sees them: what each one builds for a listener (its
//! service) and for the upstream it draws from (its pool), and how a built service is started
//! on sockets or swapped into a running listener whatever its type.
//!
//! `proxy` holds slots, pools and services only through the traits here, so a fourth protocol
//! is one `Frontend` impl and one arm in `build`, both in this file.

use std::any::Any;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::close::{Ledger, SideLedger};
use crate::config::{self, Config, Protocol};
use crate::http::{HttpListener, HttpUpstream};
use crate::listener::{accept_loop, AcceptOpts, Bound, ListenerStats, Listening, Serve};
use crate::mysql::{MysqlListener, MysqlUpstream};
use crate::pool::UpstreamInfo;
use crate::tcp::{TcpRelay, TcpUpstream};
use crate::workers::Workers;

/// A protocol's listener service, and the upstream pool its listeners share.
pub trait Frontend: Serve + Debug + Sized {
    /// The pool of one upstream, shared by every listener of this protocol that names it.
    type Pool: Debug + Send + Sync + 'static;

    /// Builds the pool of `cfg`, with idle lists for `workers` workers.
    fn pool(cfg: &config::Upstream, ledger: &Arc<Ledger>, workers: usize) -> Arc<Self::Pool>;

    /// The settings `pool` was built from: a reload keeps a pool whose settings are unchanged.
    fn pool_cfg(pool: &Self::Pool) -> &config::Upstream;

    /// What the admin side sees of `pool`.
    fn pool_info(pool: &Arc<Self::Pool>) -> Arc<dyn UpstreamInfo>;

    /// Builds one listener's service over `pool`.
    fn service(parts: Parts, pool: Arc<Self::Pool>, config: &Config) -> Arc<Self>;
}

/// What every listener's service is made of, whatever its protocol.
#[derive(Debug)]
pub struct Parts {
    /// The listener's configuration.
    pub cfg: config::Listener,
    /// Its client-side close ledger.
    pub ledger: Arc<SideLedger>,
    /// Its counters, kept across reloads while its name stays.
    pub stats: Arc<ListenerStats>,
    /// Cancelled when the listener drains (shutdown, or removed by a reload).
    pub stop: CancellationToken,
}

/// What a service is built with besides its listener's parts.
#[derive(Debug)]
pub struct Context<'a> {
    /// The config being applied (mysql listeners take its users).
    pub config: &'a Config,
    /// The running generation's pools, some of which the new one keeps.
    pub old: &'a Pools,
    /// Where new pools register their servers' sides.
    pub ledger: &'a Arc<Ledger>,
    /// The workers new pools keep idle lists for.
    pub workers: &'a Workers,
}

/// The upstream pools of one generation, whatever their protocol.
#[derive(Debug, Default)]
pub struct Pools {
    /// By upstream name: one upstream pools connections of one protocol.
    by_name: HashMap<String, Entry>,
    /// Every pool in creation order, for the admin side.
    all: Vec<Arc<dyn UpstreamInfo>>,
}

/// One upstream's pool, its type erased.
#[derive(Debug)]
struct Entry {
    /// The protocol of the listeners it serves.
    protocol: Protocol,
    /// An `Arc<F::Pool>` of that protocol's `Frontend`.
    pool: Arc<dyn Any + Send + Sync>,
}

/// A listener's service, built and not yet serving: started on new sockets, or swapped into
/// a kept listener.
pub trait Service: Send {
    /// Starts an accept loop on each worker, each on its own share of `socks`; the returned
    /// handle swaps in the services of later reloads.
    fn start(
        self: Box<Self>,
        socks: Vec<Listening>,
        opts: AcceptOpts,
        workers: &Workers,
    ) -> Box<dyn Swap>;

    /// The service as `Any`, for `Swap::swap` to recover its type.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

/// A running listener's hold on its accept loops' service.
pub trait Swap: Send + Sync + Debug {
    /// Hands new connections to `service` from now on (those established keep theirs);
    /// false, and nothing changed, when it is not of this listener's protocol.
    fn swap(&self, service: Box<dyn Service>) -> bool;
}

// === impl Pools ===

impl Pools {
    /// The pool of `cfg` for a listener of `protocol`: already made in this generation,
    /// carried over from the old one when its settings are unchanged (keeping its warm
    /// connections), or new. An upstream that already serves another protocol is an error.
    fn pick<F: Frontend>(
        &mut self,
        protocol: Protocol,
        cfg: &config::Upstream,
        cx: &Context<'_>,
    ) -> Result<Arc<F::Pool>, String> {
        if let Some(entry) = self.by_name.get(&cfg.name) {
            return match entry.pool.clone().downcast::<F::Pool>() {
                Ok(pool) if entry.protocol == protocol => Ok(pool),
                _ => Err(format!(
                    "upstream {} already serves {} listeners; one upstream pools connections \
                     of one protocol",
                    cfg.name, entry.protocol
                )),
            };
        }
        let kept = cx
            .old
            .by_name
            .get(&cfg.name)
            .filter(|e| e.protocol == protocol)
            .and_then(|e| e.pool.clone().downcast::<F::Pool>().ok())
            .filter(|pool| F::pool_cfg(pool) == cfg);
        let pool = kept.unwrap_or_else(|| F::pool(cfg, cx.ledger, cx.workers.count()));
        self.by_name.insert(
            cfg.name.clone(),
            Entry {
                protocol,
                pool: pool.clone(),
            },
        );
        self.all.push(F::pool_info(&pool));
        Ok(pool)
    }

    /// Every pool, in creation order.
    pub fn all(&self) -> &[Arc<dyn UpstreamInfo>] {
        &self.all
    }
}

// === impl Service ===

impl<F: Frontend> Service for Arc<F> {
    fn start(
        self: Box<Self>,
        socks: Vec<Listening>,
        opts: AcceptOpts,
        workers: &Workers,
    ) -> Box<dyn Swap> {
        let (tx, rx) = watch::channel(*self);
        let handles = workers.handles();
        // Round-robin: sockets handed over by an upgrade may outnumber the workers.
        for (i, sock) in socks.into_iter().enumerate() {
            let Some(worker) = handles.get(i % handles.len().max(1)) else {
                continue;
            };
            let (svc, opts) = (rx.clone(), opts.clone());
            // Registered inside the worker's runtime: its socket belongs to that runtime.
            worker.spawn(async move {
                match Bound::register(sock) {
                    Ok(bound) => accept_loop(svc, bound, opts).await,
                    Err(e) => tracing::error!(listener = %opts.name, error = %e,
                        "cannot accept on this worker"),
                }
            });
        }
        Box::new(tx)
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

// === impl Swap ===

impl<F: Frontend> Swap for watch::Sender<Arc<F>> {
    fn swap(&self, service: Box<dyn Service>) -> bool {
        match service.into_any().downcast::<Arc<F>>() {
            Ok(service) => {
                drop(self.send_replace(*service));
                true
            }
            Err(_) => false,
        }
    }
}

// === impl Frontend ===

impl Frontend for HttpListener {
    type Pool = HttpUpstream;

    fn pool(cfg: &config::Upstream, ledger: &Arc<Ledger>, workers: usize) -> Arc<HttpUpstream> {
        HttpUpstream::new(cfg, ledger, workers, true)
    }

    fn pool_cfg(pool: &HttpUpstream) -> &config::Upstream {
        &pool.cfg
    }

    fn pool_info(pool: &Arc<HttpUpstream>) -> Arc<dyn UpstreamInfo> {
        pool.clone()
    }

    fn service(parts: Parts, pool: Arc<HttpUpstream>, _: &Config) -> Arc<HttpListener> {
        Arc::new(HttpListener {
            cfg: parts.cfg,
            upstream: pool,
            ledger: parts.ledger,
            stats: parts.stats,
            stop: parts.stop,
        })
    }
}

impl Frontend for TcpRelay {
    type Pool = TcpUpstream;

    fn pool(cfg: &config::Upstream, ledger: &Arc<Ledger>, workers: usize) -> Arc<TcpUpstream> {
        TcpUpstream::new(cfg, ledger, workers, true)
    }

    fn pool_cfg(pool: &TcpUpstream) -> &config::Upstream {
        &pool.cfg
    }

    fn pool_info(pool: &Arc<TcpUpstream>) -> Arc<dyn UpstreamInfo> {
        pool.clone()
    }

    fn service(parts: Parts, pool: Arc<TcpUpstream>, _: &Config) -> Arc<TcpRelay> {
        TcpRelay::new(parts.cfg, pool, parts.ledger, parts.stats)
    }
}

impl Frontend for MysqlListener {
    type Pool = MysqlUpstream;

    fn pool(cfg: &config::Upstream, ledger: &Arc<Ledger>, workers: usize) -> Arc<MysqlUpstream> {
        MysqlUpstream::new(cfg, ledger, workers)
    }

    fn pool_cfg(pool: &MysqlUpstream) -> &config::Upstream {
        &pool.pool.cfg
    }

    fn pool_info(pool: &Arc<MysqlUpstream>) -> Arc<dyn UpstreamInfo> {
        pool.pool.clone()
    }

    fn service(parts: Parts, pool: Arc<MysqlUpstream>, config: &Config) -> Arc<MysqlListener> {
        MysqlListener::new(
            parts.cfg,
            pool,
            config.mysql_users.clone(),
            parts.ledger,
            parts.stats,
        )
    }
}

/// Builds the service of the listener in `parts` over the pool of `upstream`, which joins
/// `pools`: the one place that names each protocol's `Frontend`.
pub fn build(
    parts: Parts,
    upstream: &config::Upstream,
    pools: &mut Pools,
    cx: &Context<'_>,
) -> Result<Box<dyn Service>, String> {
    match parts.cfg.protocol {
        Protocol::Http => build_as::<HttpListener>(parts, upstream, pools, cx),
        Protocol::Tcp => build_as::<TcpRelay>(parts, upstream, pools, cx),
        Protocol::Mysql => build_as::<MysqlListener>(parts, upstream, pools, cx),
    }
}

fn build_as<F: Frontend>(
    parts: Parts,
    upstream: &config::Upstream,
    pools: &mut Pools,
    cx: &Context<'_>,
) -> Result<Box<dyn Service>, String> {
    let pool = pools.pick::<F>(parts.cfg.protocol, upstream, cx)?;
    Ok(Box::new(F::service(parts, pool, cx.config)))
}
