//! A running waitless: the listeners, upstream pools and ledger built from one config.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::admin;
use crate::close::{Ledger, SideId, SideLedger};
use crate::config::{self, Config, Protocol};
use crate::http::{HttpListener, HttpUpstream};
use crate::listener::{accept_loop, AcceptOpts, Bound, ListenerStats};
use crate::pool::UpstreamInfo;
use crate::tcp::{TcpRelay, TcpUpstream};

/// The shared state of a running proxy.
#[derive(Debug)]
pub struct Proxy {
    /// The config it runs.
    pub config: Config,
    /// Every close, per side.
    pub ledger: Arc<Ledger>,
    /// Listeners, whatever their protocol.
    pub listeners: Vec<ListenerInfo>,
    /// Upstream pools, whatever their protocol.
    pub upstreams: Vec<Arc<dyn UpstreamInfo>>,
    /// The admin listener's bound address.
    pub admin_addr: Option<SocketAddr>,
}

/// What the admin side sees of a listener.
#[derive(Debug)]
pub struct ListenerInfo {
    /// Its configuration.
    pub cfg: config::Listener,
    /// The TCP address bound (port 0 resolved); None for unix sockets.
    pub addr: Option<SocketAddr>,
    /// Its counters.
    pub stats: Arc<ListenerStats>,
    /// Its client-side ledger.
    pub ledger: Arc<SideLedger>,
}

/// A start-up failure, naming what could not be set up.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// Upstream pools by protocol, created on first use by a listener.
#[derive(Default)]
struct Pools {
    http: HashMap<String, Arc<HttpUpstream>>,
    tcp: HashMap<String, Arc<TcpUpstream>>,
    /// Every pool created, in creation order, for the admin side.
    all: Vec<Arc<dyn UpstreamInfo>>,
    /// The protocol each upstream was created for: one upstream serves one protocol.
    protocol: HashMap<String, Protocol>,
}

/// How long a load balancer may take to send its PROXY header.
const PROXY_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A listener ready to serve: its socket and the task that will accept on it.
type Starter = Box<dyn FnOnce() + Send>;

// === impl Proxy ===

impl Proxy {
    /// Binds every socket of `config` and starts serving. Must run inside a tokio runtime.
    /// Every socket is bound before anything is served, so a bad address fails start-up
    /// as a whole.
    pub async fn start(config: Config) -> Result<Arc<Proxy>, StartError> {
        let ledger = Arc::new(Ledger::default());
        let mut pools = Pools::default();
        let mut listeners = Vec::new();
        let mut starters: Vec<Starter> = Vec::new();

        for l in &config.listeners {
            let upstream = config.upstream(&l.upstream).ok_or_else(|| {
                StartError(format!(
                    "listener {}: no upstream named {}",
                    l.name, l.upstream
                ))
            })?;
            match pools.protocol.get(&upstream.name) {
                Some(p) if *p != l.protocol => {
                    return Err(StartError(format!(
                        "listener {}: upstream {} already serves {} listeners; one upstream \
                         pools connections of one protocol",
                        l.name, upstream.name, p
                    )))
                }
                _ => {
                    pools.protocol.insert(upstream.name.clone(), l.protocol);
                }
            }
            let sock = Bound::bind(&l.listen, l.mode).map_err(|e| {
                StartError(format!(
                    "listener {}: cannot listen on {}: {e}",
                    l.name, l.listen
                ))
            })?;
            let info = ListenerInfo {
                cfg: l.clone(),
                addr: sock.local_addr(),
                stats: Arc::new(ListenerStats::default()),
                ledger: ledger.side(SideId::Listener {
                    name: l.name.clone(),
                }),
            };
            let name = l.name.clone();
            let opts = AcceptOpts {
                proxy_header: l.accept_proxy_protocol.then_some(PROXY_HEADER_TIMEOUT),
                ledger: info.ledger.clone(),
            };
            let starter: Starter = match l.protocol {
                Protocol::Http => {
                    let up = pools.http(upstream, &ledger);
                    let svc = Arc::new(HttpListener {
                        cfg: l.clone(),
                        upstream: up,
                        ledger: info.ledger.clone(),
                        stats: info.stats.clone(),
                    });
                    Box::new(move || {
                        tokio::spawn(accept_loop(name, svc, sock, opts));
                    })
                }
                Protocol::Tcp => {
                    let up = pools.tcp(upstream, &ledger);
                    let svc = TcpRelay::new(l.clone(), up, info.ledger.clone(), info.stats.clone());
                    Box::new(move || {
                        tokio::spawn(accept_loop(name, svc, sock, opts));
                    })
                }
                other => {
                    return Err(StartError(format!(
                        "listener {}: protocol {other} is not supported yet",
                        l.name
                    )))
                }
            };
            listeners.push(info);
            starters.push(starter);
        }

        let admin_sock = match config.admin.listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| StartError(format!("admin: cannot listen on {addr}: {e}")))?,
            ),
            None => None,
        };

        let proxy = Arc::new(Proxy {
            listeners,
            upstreams: pools.all,
            admin_addr: admin_sock.as_ref().and_then(|s| s.local_addr().ok()),
            config,
            ledger,
        });
        for l in &proxy.listeners {
            let at = l
                .addr
                .map_or_else(|| l.cfg.listen.to_string(), |a| a.to_string());
            tracing::info!(listener = %l.cfg.name, protocol = %l.cfg.protocol, addr = %at, "listening");
        }
        for start in starters {
            start();
        }
        if let Some(sock) = admin_sock {
            tokio::spawn(admin::serve(sock, proxy.clone()));
        }
        Ok(proxy)
    }

    /// Closes every idle pooled connection (ledger reason `drain`).
    pub fn drain_pools(&self) {
        for up in &self.upstreams {
            up.drain();
        }
    }
}

// === impl Pools ===

impl Pools {
    fn http(&mut self, cfg: &config::Upstream, ledger: &Ledger) -> Arc<HttpUpstream> {
        if let Some(up) = self.http.get(&cfg.name) {
            return up.clone();
        }
        let up = HttpUpstream::new(cfg, ledger);
        self.http.insert(cfg.name.clone(), up.clone());
        self.all.push(up.clone());
        up
    }
}

impl Pools {
    fn tcp(&mut self, cfg: &config::Upstream, ledger: &Ledger) -> Arc<TcpUpstream> {
        if let Some(up) = self.tcp.get(&cfg.name) {
            return up.clone();
        }
        let up = TcpUpstream::new(cfg, ledger);
        self.tcp.insert(cfg.name.clone(), up.clone());
        self.all.push(up.clone());
        up
    }
}

/// Builds the runtime `workers` asks for.
pub fn runtime(workers: usize) -> io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        b.worker_threads(workers);
    }
    b.enable_all().build()
}
