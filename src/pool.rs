//! Upstream pools: a few persistent connections per server, kept and retired by waitless.
//!
//! The pool is protocol-neutral: it holds whatever connection handle a protocol module gives
//! it (`PoolConn`), lends it out, takes it back and retires it — idle too long, too old, too
//! many requests, pool full — always telling the connection's `CloseCtl` why first, so the
//! close mechanism can record the reason and pick FIN or RST. Connecting is the protocol's
//! business; the pool only bounds how many connections may be open (`max_connections`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::close::{CloseCtl, Ledger, Reason, SideId, SideLedger};
use crate::config::{self, Address};

/// A connection handle the pool can keep.
pub trait PoolConn: Send + 'static {
    /// False once the server closed it or it broke; such a handle is dropped, not lent.
    fn is_usable(&mut self) -> bool;
}

/// A pooled connection with what the pool knows about it.
#[derive(Debug)]
pub struct Pooled<C> {
    /// The protocol's handle.
    pub conn: C,
    /// Lets the pool tell the socket why it is being let go.
    pub ctl: Arc<CloseCtl>,
    /// When it was opened (for `max_lifetime`).
    born: Instant,
    /// Requests it has carried (for `max_requests`).
    uses: u64,
    /// When it went idle.
    since: Instant,
}

/// One server of an upstream and its idle connections.
#[derive(Debug)]
pub struct Server<C> {
    /// Where it is.
    pub addr: Address,
    /// `host:port` or `unix:/path`, as shown in logs and metrics.
    pub label: String,
    /// Its close ledger.
    pub ledger: Arc<SideLedger>,
    /// Idle connections, most recently used last (LIFO keeps the hot few warm and lets the
    /// rest reach `idle_timeout`).
    idle: Mutex<Vec<Pooled<C>>>,
    /// Bounds open connections when `max_connections` > 0.
    limit: Option<Arc<Semaphore>>,
    /// Counters for metrics.
    pub stats: ServerStats,
}

/// Counters of one server.
#[derive(Debug, Default, Serialize)]
pub struct ServerStats {
    /// Connections opened.
    pub opened: AtomicU64,
    /// Requests sent on a connection that had carried one before.
    pub reused: AtomicU64,
    /// Connect attempts that failed.
    pub connect_errors: AtomicU64,
    /// Requests retried on a fresh connection after a reused one failed (keep-alive race).
    pub retries: AtomicU64,
}

/// An upstream: its settings and servers.
#[derive(Debug)]
pub struct Upstream<C> {
    /// Its configuration.
    pub cfg: config::Upstream,
    /// Its servers, in config order.
    pub servers: Vec<Arc<Server<C>>>,
    /// Round-robin cursor.
    next: AtomicUsize,
}

/// What the admin side sees of an upstream, whatever its protocol.
pub trait UpstreamInfo: Send + Sync + std::fmt::Debug {
    /// Its configuration.
    fn cfg(&self) -> &config::Upstream;
    /// Its servers.
    fn server_infos(&self) -> Vec<ServerInfo<'_>>;
    /// Retires every idle connection (shutdown).
    fn drain(&self);
}

/// One server as the admin side sees it.
#[derive(Debug)]
pub struct ServerInfo<'a> {
    pub addr: &'a Address,
    pub label: &'a str,
    pub idle: usize,
    pub stats: &'a ServerStats,
    pub ledger: &'a SideLedger,
}

/// All connections of a server are in use and `max_connections` did not free up in time.
#[derive(Debug)]
pub struct Busy;

// === impl Pooled ===

impl<C> Pooled<C> {
    /// Wraps a freshly opened connection.
    pub fn new(conn: C, ctl: Arc<CloseCtl>) -> Pooled<C> {
        let now = Instant::now();
        Pooled {
            conn,
            ctl,
            born: now,
            uses: 0,
            since: now,
        }
    }

    /// True when the connection carried a request before this one.
    pub fn is_reused(&self) -> bool {
        self.uses > 1
    }

    /// Counts one more request on it.
    pub fn mark_used(&mut self) {
        self.uses += 1;
    }

    fn worn_out(&self, cfg: &config::Upstream, now: Instant) -> bool {
        cfg.max_lifetime
            .is_some_and(|max| now.duration_since(self.born) >= max)
            || (cfg.max_requests > 0 && self.uses >= cfg.max_requests)
    }
}

// === impl Server ===

impl<C: PoolConn> Server<C> {
    /// Takes an idle connection that is still usable, dropping dead ones on the way.
    pub fn take_idle(&self, cfg: &config::Upstream) -> Option<Pooled<C>> {
        let now = Instant::now();
        loop {
            let mut pooled = self.lock_idle().pop()?;
            if now.duration_since(pooled.since) >= cfg.idle_timeout {
                pooled.ctl.retire(Reason::Idle);
                continue;
            }
            if pooled.conn.is_usable() {
                return Some(pooled);
            }
            // Dropped: the close mechanism sees the server's FIN and answers it.
        }
    }

    /// Gives a connection back after a complete exchange, or retires it.
    pub fn put(&self, cfg: &config::Upstream, mut pooled: Pooled<C>) {
        let now = Instant::now();
        if pooled.worn_out(cfg, now) {
            pooled.ctl.retire(Reason::Lifetime);
            return;
        }
        pooled.since = now;
        let mut idle = self.lock_idle();
        if idle.len() >= cfg.pool_size {
            drop(idle);
            pooled.ctl.retire(Reason::PoolFull);
            return;
        }
        idle.push(pooled);
    }

    /// A permit to open one more connection; waits up to `wait` when `max_connections` are
    /// open. The permit must live as long as the connection.
    pub async fn open_permit(&self, wait: Duration) -> Result<Option<OwnedSemaphorePermit>, Busy> {
        let Some(limit) = &self.limit else {
            return Ok(None);
        };
        match tokio::time::timeout(wait, limit.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            _ => Err(Busy),
        }
    }

    /// Idle connections now.
    pub fn idle_count(&self) -> usize {
        self.lock_idle().len()
    }

    /// Retires idle connections past `idle_timeout` or worn out, and dead ones.
    fn reap(&self, cfg: &config::Upstream) {
        let now = Instant::now();
        let mut gone = Vec::new();
        {
            let mut idle = self.lock_idle();
            let mut i = 0;
            while i < idle.len() {
                let p = &mut idle[i];
                let reason = if now.duration_since(p.since) >= cfg.idle_timeout {
                    Some(Reason::Idle)
                } else if p.worn_out(cfg, now) {
                    Some(Reason::Lifetime)
                } else if !p.conn.is_usable() {
                    Some(Reason::PeerClosed)
                } else {
                    None
                };
                match reason {
                    Some(r) => {
                        let p = idle.remove(i);
                        p.ctl.retire(r);
                        gone.push(p);
                    }
                    None => i += 1,
                }
            }
        }
        // Dropped outside the lock: each drop closes a socket.
        drop(gone);
    }

    /// Retires every idle connection (shutdown).
    pub fn drain(&self) {
        let gone: Vec<_> = std::mem::take(&mut *self.lock_idle());
        for p in &gone {
            p.ctl.retire(Reason::Drain);
        }
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Pooled<C>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}

// === impl Upstream ===

impl<C: PoolConn> Upstream<C> {
    /// Builds the pools of `cfg` and starts their idle reaper.
    pub fn new(cfg: &config::Upstream, ledger: &Ledger) -> Arc<Upstream<C>> {
        let servers = cfg
            .servers
            .iter()
            .map(|addr| {
                let label = address_label(addr);
                Arc::new(Server {
                    addr: addr.clone(),
                    ledger: ledger.side(SideId::Server {
                        upstream: cfg.name.clone(),
                        server: label.clone(),
                        addr: match addr {
                            Address::Tcp(a) => Some(*a),
                            Address::Unix(_) => None,
                        },
                    }),
                    label,
                    idle: Mutex::new(Vec::new()),
                    limit: (cfg.max_connections > 0)
                        .then(|| Arc::new(Semaphore::new(cfg.max_connections))),
                    stats: ServerStats::default(),
                })
            })
            .collect();
        let up = Arc::new(Upstream {
            cfg: cfg.clone(),
            servers,
            next: AtomicUsize::new(0),
        });
        spawn_reaper(Arc::downgrade(&up), reap_interval(cfg.idle_timeout));
        up
    }

    /// The servers in the order to try them for the next request (round-robin start).
    pub fn rotation(&self) -> impl Iterator<Item = &Arc<Server<C>>> {
        let n = self.servers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).map(move |i| &self.servers[(start + i) % n])
    }
}

impl<C: PoolConn + std::fmt::Debug> UpstreamInfo for Upstream<C> {
    fn cfg(&self) -> &config::Upstream {
        &self.cfg
    }

    fn server_infos(&self) -> Vec<ServerInfo<'_>> {
        self.servers
            .iter()
            .map(|s| ServerInfo {
                addr: &s.addr,
                label: &s.label,
                idle: s.idle_count(),
                stats: &s.stats,
                ledger: &s.ledger,
            })
            .collect()
    }

    fn drain(&self) {
        for server in &self.servers {
            server.drain();
        }
    }
}

/// How a server is named in logs and metrics.
pub fn address_label(addr: &Address) -> String {
    match addr {
        Address::Tcp(a) => a.to_string(),
        Address::Unix(p) => format!("unix:{}", p.display()),
    }
}

/// The socket address of a TCP server, if it is one.
pub fn tcp_addr(addr: &Address) -> Option<SocketAddr> {
    match addr {
        Address::Tcp(a) => Some(*a),
        Address::Unix(_) => None,
    }
}

fn reap_interval(idle_timeout: Duration) -> Duration {
    (idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

fn spawn_reaper<C: PoolConn>(up: Weak<Upstream<C>>, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // The upstream is gone (reload removed it): the reaper goes with it.
            let Some(up) = up.upgrade() else { return };
            for server in &up.servers {
                server.reap(&up.cfg);
            }
        }
    });
}
