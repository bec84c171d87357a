//! A running waitless: the listeners, upstream pools and ledger built from one config.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::admin;
use crate::close::{Ledger, SideId};
use crate::config::{Config, Protocol};
use crate::http::{HttpListener, HttpUpstream, ListenerStats};
use crate::listener::{Accepted, Bound};

/// The shared state of a running proxy.
#[derive(Debug)]
pub struct Proxy {
    /// The config it runs.
    pub config: Config,
    /// Every close, per side.
    pub ledger: Arc<Ledger>,
    /// Listeners with their bound TCP address (None for unix sockets).
    pub listeners: Vec<(Arc<HttpListener>, Option<SocketAddr>)>,
    /// Upstream pools.
    pub upstreams: Vec<Arc<HttpUpstream>>,
    /// The admin listener's bound address.
    pub admin_addr: Option<SocketAddr>,
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

// === impl Proxy ===

impl Proxy {
    /// Binds every socket of `config` and starts serving. Must run inside a tokio runtime.
    /// Every socket is bound before anything is served, so a bad address fails start-up
    /// as a whole.
    pub async fn start(config: Config) -> Result<Arc<Proxy>, StartError> {
        let ledger = Arc::new(Ledger::default());
        let upstreams: Vec<Arc<HttpUpstream>> = config
            .upstreams
            .iter()
            .map(|u| HttpUpstream::new(u, &ledger))
            .collect();

        let mut bound = Vec::new();
        for l in &config.listeners {
            if l.protocol != Protocol::Http {
                return Err(StartError(format!(
                    "listener {}: protocol {:?} is not supported yet (only http)",
                    l.name, l.protocol
                )));
            }
            let Some(upstream) = upstreams.iter().find(|u| u.cfg.name == l.upstream) else {
                return Err(StartError(format!(
                    "listener {}: no upstream named {}",
                    l.name, l.upstream
                )));
            };
            let sock = Bound::bind(&l.listen, l.mode).map_err(|e| {
                StartError(format!(
                    "listener {}: cannot listen on {:?}: {e}",
                    l.name, l.listen
                ))
            })?;
            let http = Arc::new(HttpListener {
                cfg: l.clone(),
                upstream: upstream.clone(),
                ledger: ledger.side(SideId::Listener {
                    name: l.name.clone(),
                }),
                stats: ListenerStats::default(),
            });
            bound.push((http, sock));
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
            listeners: bound
                .iter()
                .map(|(l, s)| (l.clone(), s.local_addr()))
                .collect(),
            admin_addr: admin_sock.as_ref().and_then(|s| s.local_addr().ok()),
            config,
            ledger,
            upstreams,
        });

        for (http, sock) in bound {
            tracing::info!(listener = %http.cfg.name, addr = ?sock.local_addr().map_or_else(|| format!("{:?}", http.cfg.listen), |a| a.to_string()), "listening");
            tokio::spawn(accept_loop(http, sock));
        }
        if let Some(sock) = admin_sock {
            tokio::spawn(admin::serve(sock, proxy.clone()));
        }
        Ok(proxy)
    }

    /// Closes every idle pooled connection (ledger reason `drain`).
    pub fn drain_pools(&self) {
        for up in &self.upstreams {
            for server in &up.servers {
                server.drain();
            }
        }
    }
}

async fn accept_loop(http: Arc<HttpListener>, sock: Bound) {
    loop {
        match sock.accept(&http.cfg.name).await {
            Accepted::Tcp(stream, peer) => {
                tokio::spawn(http.clone().serve(stream, Some(peer)));
            }
            Accepted::Unix(stream) => {
                tokio::spawn(http.clone().serve(stream, None));
            }
        }
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
