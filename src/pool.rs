//! Upstream pools: a few persistent connections per server, kept and retired by waitless.
//!
//! The pool is protocol-neutral: it holds whatever connection handle a protocol module gives
//! it (`PoolConn`), lends it out, takes it back and retires it — idle too long, too old, too
//! many requests, pool full — always telling the connection's `CloseCtl` why first, so the
//! close mechanism can record the reason and pick FIN or RST. Opening connections is the
//! connector's (`crate::connector`); the pool bounds how many may be open (`max_connections`)
//! and lends them as `Lease`s that give them back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::admin::histogram::Histogram;
use crate::close::{CloseCtl, Ledger, Reason, SideId, SideLedger};
use crate::config::{self, Address, Balance, HealthCheck};
use crate::health::{self, Health};
use crate::workers;

/// A connection handle the pool can keep.
pub trait PoolConn: Send + 'static {
    /// What the protocol keeps about each server beside its pool (MySQL: the server's
    /// greeting, sessions being reset): it lives and goes with the server, as DNS adds and
    /// removes addresses.
    type ServerState: Default + Send + Sync + std::fmt::Debug + 'static;

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
    /// The worker whose runtime owns its socket (and hyper's task for it).
    home: usize,
    /// Its `max_connections` permit and its place in the open count, for as long as it lives.
    /// Boxed: a lease moves several times per request, and 24 more bytes in it made the
    /// keep-alive request 300 instructions dearer (callgrind); one allocation per connection
    /// opened is nothing.
    _counted: Box<Counted>,
}

/// What an open connection holds for as long as its socket lives: a `max_connections`
/// permit (when that applies) and its place in the server's open count.
#[derive(Debug)]
pub struct Counted {
    _permit: Option<OwnedSemaphorePermit>,
    _slot: OpenSlot,
}

/// A connection lent out, and the server it goes back to.
#[derive(Debug)]
pub struct Lease<C: PoolConn> {
    /// The connection.
    pub pooled: Pooled<C>,
    /// Its server, whose pool takes it back.
    pub server: Arc<Server<C>>,
    /// Its upstream, for the settings `give_back` applies.
    pub upstream: Arc<Upstream<C>>,
}

/// One server of an upstream and its idle connections.
#[derive(Debug)]
pub struct Server<C: PoolConn> {
    /// Where it is.
    pub addr: Address,
    /// `host:port` or `unix:/path`, as shown in logs and metrics.
    pub label: String,
    /// The index of the server it was written as in `servers` (a name gives several).
    entry: usize,
    /// The name it was written as (`host:port`), when it follows DNS; also its TLS name.
    pub name: Option<Arc<crate::dns::Name>>,
    /// Its close ledger.
    pub ledger: Arc<SideLedger>,
    /// Idle connections per worker, most recently used last (LIFO keeps the hot few warm
    /// and lets the rest reach `idle_timeout`). A worker lends its own first, so a request
    /// and its upstream connection stay on one thread; it takes another worker's only
    /// when it has none, rather than open one more connection.
    idle: Box<[Mutex<Vec<Pooled<C>>>]>,
    /// Idle connections over all workers (bounded by `pool_size`).
    idle_total: AtomicUsize,
    /// Connections open or being opened (each holds an `OpenSlot`).
    open: Arc<AtomicUsize>,
    /// Bounds open connections when `max_connections` > 0.
    limit: Option<Arc<Semaphore>>,
    /// Requests waiting for room under `max_connections` (`room`), and what wakes them when
    /// a connection goes back idle: at the limit, connections are given back far more often
    /// than closed.
    waiting: AtomicUsize,
    returned: Notify,
    /// Counters for metrics (shared with the admin side's snapshots).
    pub stats: Arc<ServerStats>,
    /// Up or down, from failures seen and active checks.
    pub health: Health,
    /// Its share of new connections (`weights`).
    pub weight: u32,
    /// Drained (shutdown, replaced by a reload, or gone from DNS): connections given back
    /// are closed.
    drained: AtomicBool,
    /// What the protocol keeps about it.
    pub state: C::ServerState,
}

/// The servers of an upstream at one moment, swapped whole when a name's addresses change.
#[derive(Debug)]
pub struct ServerSet<C: PoolConn> {
    /// In config order, a name's addresses in its place, sorted.
    pub servers: Vec<Arc<Server<C>>>,
    /// Server indexes in weighted round-robin order (smooth, as nginx spreads them).
    schedule: Vec<usize>,
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
    /// MySQL: sessions whose connection was reset before it went back to the pool.
    pub resets: AtomicU64,
    /// MySQL: sessions that provably left nothing behind, so went back without a reset.
    pub resets_skipped: AtomicU64,
    /// From the start of a connect to a connection the pool may lend (mysql: logged in).
    pub connect_duration: Histogram,
    /// From a request written to the server to its response head read (time to first byte).
    pub response_head: Histogram,
}

/// An upstream: its settings and servers.
#[derive(Debug)]
pub struct Upstream<C: PoolConn> {
    /// Its configuration.
    pub cfg: config::Upstream,
    /// Its servers now; a request loads them once.
    servers: ArcSwap<ServerSet<C>>,
    /// Round-robin cursor into the set's schedule.
    next: AtomicUsize,
    /// TLS handshakes with its servers, when it has `tls`.
    pub tls: crate::tls::TlsStats,
    /// Its servers written as names, followed by DNS (none when not followed).
    pub names: Vec<Arc<crate::dns::Name>>,
    /// Servers whose address left DNS, drained: listed (state `gone`) until their last
    /// connection is closed and `GONE_LISTED` has passed, so their closes are seen.
    gone: Mutex<Vec<(Arc<Server<C>>, Instant)>>,
    /// Where new servers' ledgers are registered.
    ledger: Arc<Ledger>,
    /// Idle lists per server (one per worker).
    workers: usize,
    /// Drained (shutdown, or replaced by a reload): its names are no longer followed.
    drained: AtomicBool,
}

/// How long a server that left DNS stays listed once its last connection closed: longer
/// than a Prometheus scrape interval, so its last closes are scraped.
const GONE_LISTED: Duration = Duration::from_secs(60);

/// What the admin side sees of an upstream, whatever its protocol.
pub trait UpstreamInfo: Send + Sync + std::fmt::Debug {
    /// Its configuration.
    fn cfg(&self) -> &config::Upstream;
    /// Its servers.
    fn server_infos(&self) -> Vec<ServerInfo>;
    /// Its names followed by DNS.
    fn names(&self) -> &[Arc<crate::dns::Name>];
    /// Retires every idle connection (shutdown).
    fn drain(&self);
    /// Its TLS handshakes with the servers.
    fn tls_stats(&self) -> &crate::tls::TlsStats;
}

/// One server as the admin side sees it.
#[derive(Debug)]
pub struct ServerInfo {
    pub addr: Address,
    pub label: String,
    /// The name (`host:port`) it was found by, when it follows DNS.
    pub name: Option<String>,
    pub idle: usize,
    /// Connections open now, idle or lent.
    pub open: usize,
    /// `up`, `down`, or `gone` (its address left DNS; it finishes what it has).
    pub state: &'static str,
    pub weight: u32,
    pub stats: Arc<ServerStats>,
    pub ledger: Arc<SideLedger>,
}

/// A request counted among those waiting in `Server::room` until it is dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts one connection of a server as open for as long as it lives, so a worker can tell
/// whether opening one of its own stays within `pool_size`.
#[derive(Debug)]
struct OpenSlot(Arc<AtomicUsize>);

/// All connections of a server are in use and `max_connections` did not free up in time.
#[derive(Debug)]
pub struct Busy;

/// What waiting under `max_connections` gives: room to open one more, or an idle
/// connection given back meanwhile.
#[derive(Debug)]
pub enum Room<C> {
    Open(Counted),
    Idle(Pooled<C>),
}

// === impl Pooled ===

impl<C> Pooled<C> {
    /// Wraps a freshly opened connection and what it holds while open.
    pub fn new(conn: C, ctl: Arc<CloseCtl>, counted: Counted) -> Pooled<C> {
        let now = Instant::now();
        Pooled {
            conn,
            ctl,
            born: now,
            uses: 0,
            since: now,
            home: workers::current(),
            _counted: Box::new(counted),
        }
    }

    /// The same connection, its handle remade by `remake` (MySQL's login of a connection that
    /// was only greeted, which may put TLS under it); on failure it is closed, its place
    /// under `max_connections` given back.
    pub async fn remade<F, Fut, E>(self, remake: F) -> Result<Pooled<C>, E>
    where
        F: FnOnce(C) -> Fut,
        Fut: std::future::Future<Output = Result<C, E>>,
    {
        let conn = remake(self.conn).await?;
        Ok(Pooled { conn, ..self })
    }

    /// Its socket is on another worker's reactor: each of its events wakes that worker's
    /// thread, which then wakes the caller's.
    pub fn is_away(&self) -> bool {
        self.home != workers::current()
    }

    /// Moved onto the caller's worker by `rehome` (which registers its socket with this
    /// thread's runtime); it goes back to this worker's idle list.
    pub fn brought_home<E>(self, rehome: impl FnOnce(C) -> Result<C, E>) -> Result<Pooled<C>, E> {
        let conn = rehome(self.conn)?;
        Ok(Pooled {
            conn,
            home: workers::current(),
            ..self
        })
    }

    /// True when the connection carried a request before.
    pub fn is_reused(&self) -> bool {
        self.uses > 0
    }

    /// Counts one more request (or session) on it.
    pub fn mark_used(&mut self) {
        self.uses += 1;
    }

    fn worn_out(&self, cfg: &config::Upstream, now: Instant) -> bool {
        cfg.max_lifetime
            .is_some_and(|max| now.duration_since(self.born) >= max)
            || (cfg.max_requests > 0 && self.uses >= cfg.max_requests)
    }
}

// === impl Lease ===

impl<C: PoolConn> Lease<C> {
    /// Lends `pooled` for one more request (or session); true when it carried one before.
    pub fn new(
        mut pooled: Pooled<C>,
        server: &Arc<Server<C>>,
        upstream: &Arc<Upstream<C>>,
    ) -> (Lease<C>, bool) {
        let reused = pooled.is_reused();
        if reused {
            server.stats.reused.fetch_add(1, Ordering::Relaxed);
        }
        pooled.mark_used();
        let lease = Lease {
            pooled,
            server: server.clone(),
            upstream: upstream.clone(),
        };
        (lease, reused)
    }

    /// Gives the connection back after a complete exchange (its pool keeps it or retires
    /// it). A lease dropped instead closes its connection.
    pub fn give_back(self) {
        self.server.put(&self.upstream.cfg, self.pooled);
    }
}

// === impl Server ===

impl<C: PoolConn> Server<C> {
    /// Takes an idle connection that is still usable, dropping dead ones on the way: this
    /// worker's own if it has one, else another worker's (which wakes that worker's thread
    /// on every exchange, but opening one more connection would exceed `pool_size`).
    pub fn take_idle(&self, cfg: &config::Upstream) -> Option<Pooled<C>> {
        self.first_usable(cfg, || self.take_where(self.idle.len(), |idle| idle.pop()))
    }

    /// Takes this worker's own idle connection; another worker's only once `pool_size`
    /// connections are open. Below that a new connection of its own serves better: a
    /// borrowed one wakes its owner's thread on every exchange, for as long as it is lent.
    /// The count comes from the `Counted` each connection holds.
    pub fn take_idle_or_open(&self, cfg: &config::Upstream) -> Option<Pooled<C>> {
        self.first_usable(cfg, || {
            let reach = if self.open.load(Ordering::Acquire) < cfg.pool_size {
                1
            } else {
                self.idle.len()
            };
            self.take_where(reach, |idle| idle.pop())
        })
    }

    /// Connections open (idle or lent) to this server now.
    pub fn open_now(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Counts a connection about to be opened until the slot is dropped with it.
    fn open_slot(&self) -> OpenSlot {
        self.open.fetch_add(1, Ordering::AcqRel);
        OpenSlot(self.open.clone())
    }

    /// Takes the most recently used idle connection that `wanted` accepts and that is still
    /// usable, retiring expired and dropping dead ones on the way (for pools whose
    /// connections are not interchangeable, e.g. MySQL connections logged in as one user).
    pub fn take_idle_matching(
        &self,
        cfg: &config::Upstream,
        mut wanted: impl FnMut(&C) -> bool,
    ) -> Option<Pooled<C>> {
        self.first_usable(cfg, || {
            self.take_where(self.idle.len(), |idle| {
                let at = idle.iter().rposition(|p| wanted(&p.conn))?;
                Some(idle.remove(at))
            })
        })
    }

    /// The first connection `next` gives that is still usable, retiring expired and dropping
    /// dead ones on the way; None once `next` has none.
    fn first_usable(
        &self,
        cfg: &config::Upstream,
        mut next: impl FnMut() -> Option<Pooled<C>>,
    ) -> Option<Pooled<C>> {
        let now = Instant::now();
        loop {
            let mut pooled = next()?;
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
        if self.drained.load(Ordering::Relaxed) {
            pooled.ctl.retire(Reason::Drain);
            return;
        }
        let now = Instant::now();
        if pooled.worn_out(cfg, now) {
            pooled.ctl.retire(Reason::Lifetime);
            return;
        }
        pooled.since = now;
        if self.idle_total.fetch_add(1, Ordering::AcqRel) >= cfg.pool_size {
            // Full: the least recently used idle connection makes room, not the one just
            // used. Where connections are not interchangeable (MySQL's per-user keys), a
            // pool full of one key's would otherwise make every session of another key
            // open and close a server connection of its own.
            match self.take_where(self.idle.len(), |idle| {
                (!idle.is_empty()).then(|| idle.remove(0))
            }) {
                Some(oldest) => oldest.ctl.retire(Reason::PoolFull),
                None => {
                    self.idle_total.fetch_sub(1, Ordering::AcqRel);
                    pooled.ctl.retire(Reason::PoolFull);
                    return;
                }
            }
        }
        match self.lock_idle(pooled.home) {
            Some(mut idle) => idle.push(pooled),
            None => {
                self.idle_total.fetch_sub(1, Ordering::AcqRel);
                pooled.ctl.retire(Reason::PoolFull);
                return;
            }
        }
        // SeqCst against `room`'s count: a waiter either is counted here or, having
        // counted itself after this load, finds the connection when it looks.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.returned.notify_one();
        }
    }

    /// The first connection `pick` takes from the idle lists of `reach` workers, the
    /// caller's first (1: its own only).
    fn take_where(
        &self,
        reach: usize,
        mut pick: impl FnMut(&mut Vec<Pooled<C>>) -> Option<Pooled<C>>,
    ) -> Option<Pooled<C>> {
        let n = self.idle.len();
        let me = workers::current();
        (0..reach.min(n)).find_map(|i| {
            let taken = pick(&mut *self.lock_idle(me + i)?)?;
            self.idle_total.fetch_sub(1, Ordering::AcqRel);
            Some(taken)
        })
    }

    /// Room for one more connection (see `admit_now`), waited for up to `wait` when
    /// `max_connections` are open: until one closes, or, with `idle`, until one is given
    /// back idle, which is then taken instead.
    pub async fn room(
        &self,
        cfg: &config::Upstream,
        idle: bool,
        wait: Duration,
    ) -> Result<Room<C>, Busy> {
        let limit = match &self.limit {
            Some(limit) if !wait.is_zero() => limit,
            _ => return self.admit_now().map(Room::Open),
        };
        let deadline = Instant::now() + wait;
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        loop {
            // Registered before looking, so a connection given back meanwhile wakes us.
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if idle {
                if let Some(pooled) = self.take_idle(cfg) {
                    return Ok(Room::Idle(pooled));
                }
            }
            tokio::select! {
                permit = limit.clone().acquire_owned() => {
                    return permit.map_err(|_| Busy).map(|p| Room::Open(Counted {
                        _permit: Some(p),
                        _slot: self.open_slot(),
                    }));
                }
                () = &mut returned => {}
                () = tokio::time::sleep_until(deadline) => return Err(Busy),
            }
        }
    }

    /// As `admit`, only if there is room now.
    pub fn admit_now(&self) -> Result<Counted, Busy> {
        let permit = match &self.limit {
            None => None,
            Some(limit) => Some(limit.clone().try_acquire_owned().map_err(|_| Busy)?),
        };
        Ok(Counted {
            _permit: permit,
            _slot: self.open_slot(),
        })
    }

    /// Connections open and lent out now: opened, minus closed, minus idle.
    pub fn busy(&self) -> u64 {
        let open = self
            .stats
            .opened
            .load(Ordering::Relaxed)
            .saturating_sub(self.ledger.total());
        open.saturating_sub(self.idle_count() as u64)
    }

    /// Idle connections now.
    pub fn idle_count(&self) -> usize {
        self.idle_total.load(Ordering::Acquire)
    }

    /// Retires idle connections past `idle_timeout` or worn out, and dead ones.
    fn reap(&self, cfg: &config::Upstream) {
        let now = Instant::now();
        let mut gone = Vec::new();
        for list in &self.idle {
            let mut idle = lock(list);
            let expired = idle.extract_if(.., |p| {
                let reason = if now.duration_since(p.since) >= cfg.idle_timeout {
                    Reason::Idle
                } else if p.worn_out(cfg, now) {
                    Reason::Lifetime
                } else if !p.conn.is_usable() {
                    Reason::PeerClosed
                } else {
                    return false;
                };
                p.ctl.retire(reason);
                true
            });
            gone.extend(expired);
        }
        self.idle_total.fetch_sub(gone.len(), Ordering::AcqRel);
        // Dropped outside the lock: each drop closes a socket.
        drop(gone);
    }

    /// Whether it was drained (shutdown, reload, or gone from DNS): it takes no new work.
    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }

    /// Retires every idle connection (shutdown).
    pub fn drain(&self) {
        self.drained.store(true, Ordering::Relaxed);
        for list in &self.idle {
            let gone = std::mem::take(&mut *lock(list));
            self.idle_total.fetch_sub(gone.len(), Ordering::AcqRel);
            for p in &gone {
                p.ctl.retire(Reason::Drain);
            }
        }
    }

    /// Worker `w`'s idle list (None only if there were no lists at all).
    fn lock_idle(&self, w: usize) -> Option<MutexGuard<'_, Vec<Pooled<C>>>> {
        let list = self.idle.get(w.checked_rem(self.idle.len())?)?;
        Some(lock(list))
    }
}

// === impl OpenSlot ===

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

// === impl Upstream ===

impl<C: PoolConn> Upstream<C> {
    /// Builds the pools of `cfg`, with idle lists for `workers` workers, and starts their
    /// idle reaper. With `follow`, its servers written as names follow DNS (`crate::dns`):
    /// each address of a name is a server, with a pool of its own.
    pub fn new(
        cfg: &config::Upstream,
        ledger: &Arc<Ledger>,
        workers: usize,
        follow: bool,
    ) -> Arc<Upstream<C>>
    where
        C: std::fmt::Debug,
    {
        let names: Vec<Arc<crate::dns::Name>> = match cfg.resolve_interval {
            Some(_) if follow => cfg
                .names
                .iter()
                .enumerate()
                .filter_map(|(j, n)| Some(Arc::new(crate::dns::Name::new(j, n.as_ref()?))))
                .collect(),
            _ => Vec::new(),
        };
        let mut servers = Vec::new();
        for (j, addr) in cfg.servers.iter().enumerate() {
            match names.iter().find(|n| n.entry == j) {
                Some(name) => {
                    for a in name.addrs() {
                        let at = Address::Tcp(a);
                        servers.push(new_server(cfg, ledger, workers, &at, j, Some(name)));
                    }
                }
                None => servers.push(new_server(cfg, ledger, workers, addr, j, None)),
            }
        }
        let up = Arc::new(Upstream {
            cfg: cfg.clone(),
            servers: ArcSwap::from_pointee(ServerSet::new(servers)),
            next: AtomicUsize::new(0),
            tls: crate::tls::TlsStats::default(),
            names,
            gone: Mutex::new(Vec::new()),
            ledger: ledger.clone(),
            workers,
            drained: AtomicBool::new(false),
        });
        spawn_reaper(Arc::downgrade(&up), reap_interval(cfg.idle_timeout));
        if let Some(hc) = &cfg.health_check {
            spawn_checks(Arc::downgrade(&up), hc.clone());
        }
        crate::dns::spawn_follow(&up);
        up
    }

    /// Its servers now. Hold the set only for as long as one request needs it: a DNS
    /// change swaps in a new one.
    pub fn servers(&self) -> Arc<ServerSet<C>> {
        self.servers.load_full()
    }

    /// The servers that are up, in the order to try them for the next connection: the
    /// balance policy's pick first, the others after it for failover. Empty when every
    /// server is down.
    pub fn rotation(&self) -> Rotation<C> {
        let set = self.servers();
        let first = match self.cfg.balance {
            Balance::RoundRobin => {
                let turn = self.next.fetch_add(1, Ordering::Relaxed);
                set.schedule
                    .get(turn % set.schedule.len().max(1))
                    .copied()
                    .unwrap_or(0)
            }
            Balance::LeastConn => set.least_busy(),
        };
        Rotation { set, first, i: 0 }
    }

    /// Server `entry`'s name now resolves to `addrs`: as a reload of that one server's
    /// addresses, those that stay keep their pools, new ones get new pools, and those that
    /// left are drained (no new requests; idle connections retired by the close policy,
    /// lent ones when they come back) and listed as `gone` until they are closed.
    pub fn follow(&self, entry: usize, addrs: &[SocketAddr]) {
        let Some(name) = self.names.iter().find(|n| n.entry == entry) else {
            return;
        };
        let mut gone = lock(&self.gone);
        // A replaced pool that clients still hold gets no new servers: nothing would drain
        // them.
        if self.is_drained() {
            return;
        }
        let old = self.servers();
        let mut servers = Vec::new();
        let mut left = Vec::new();
        for s in &old.servers {
            // Other servers, and this name's addresses that stay, keep their pools.
            let stays = s.entry != entry || tcp_addr(&s.addr).is_some_and(|a| addrs.contains(&a));
            if stays {
                servers.push(s.clone());
            } else {
                left.push(s.clone());
            }
        }
        for a in addrs {
            if servers
                .iter()
                .any(|s| s.entry == entry && tcp_addr(&s.addr) == Some(*a))
            {
                continue;
            }
            // An address that comes back takes its old server back, warm pool and all.
            let back = gone
                .iter()
                .position(|(s, _)| s.entry == entry && tcp_addr(&s.addr) == Some(*a));
            let server = match back {
                Some(i) => {
                    let (s, _) = gone.swap_remove(i);
                    s.drained.store(false, Ordering::Relaxed);
                    s
                }
                None => new_server(
                    &self.cfg,
                    &self.ledger,
                    self.workers,
                    &Address::Tcp(*a),
                    entry,
                    Some(name),
                ),
            };
            servers.push(server);
        }
        // Config order, a name's addresses sorted in its place.
        servers.sort_by_key(|s| (s.entry, tcp_addr(&s.addr)));
        self.servers.store(Arc::new(ServerSet::new(servers)));
        let now = Instant::now();
        for s in left {
            tracing::info!(upstream = %self.cfg.name, server = %s.label, name = %name.label,
                "server left DNS: draining its pool");
            s.drain();
            gone.push((s, now));
        }
    }

    /// Whether it was drained: shut down, or replaced by a reload.
    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }

    /// Forgets servers that left DNS once their last connection closed `GONE_LISTED` ago.
    pub fn prune_gone(&self) {
        let now = Instant::now();
        lock(&self.gone).retain_mut(|(s, since)| {
            if s.open_now() > 0 {
                *since = now;
                return true;
            }
            now.duration_since(*since) < GONE_LISTED
        });
    }
}

impl<C: PoolConn> ServerSet<C> {
    fn new(servers: Vec<Arc<Server<C>>>) -> ServerSet<C> {
        let weights: Vec<u32> = servers.iter().map(|s| s.weight).collect();
        ServerSet {
            schedule: smooth_schedule(&weights, servers.len()),
            servers,
        }
    }
}

impl<C: PoolConn> ServerSet<C> {
    /// The up server with the fewest connections in use per unit of weight.
    fn least_busy(&self) -> usize {
        let mut best = (u64::MAX, 0);
        for (i, s) in self.servers.iter().enumerate() {
            if !s.health.is_up() {
                continue;
            }
            // Scaled so weights compare without floats.
            let load = s.busy() * 1000 / u64::from(s.weight.max(1));
            if load < best.0 {
                best = (load, i);
            }
        }
        best.1
    }
}

/// The servers of one request, in the order to try them.
#[derive(Debug)]
pub struct Rotation<C: PoolConn> {
    /// The set loaded for this request.
    set: Arc<ServerSet<C>>,
    /// Where the balance policy starts.
    first: usize,
    /// Servers looked at so far.
    i: usize,
}

// === impl Rotation ===

impl<C: PoolConn> Iterator for Rotation<C> {
    type Item = Arc<Server<C>>;

    fn next(&mut self) -> Option<Arc<Server<C>>> {
        let n = self.set.servers.len();
        while self.i < n {
            let at = (self.first + self.i) % n;
            self.i += 1;
            match self.set.servers.get(at) {
                Some(s) if s.health.is_up() => return Some(s.clone()),
                _ => {}
            }
        }
        None
    }
}

impl<C: PoolConn + std::fmt::Debug> UpstreamInfo for Upstream<C> {
    fn cfg(&self) -> &config::Upstream {
        &self.cfg
    }

    fn tls_stats(&self) -> &crate::tls::TlsStats {
        &self.tls
    }

    fn server_infos(&self) -> Vec<ServerInfo> {
        let info = |s: &Arc<Server<C>>, state: &'static str| ServerInfo {
            addr: s.addr.clone(),
            label: s.label.clone(),
            name: s.name.as_ref().map(|n| n.label.clone()),
            idle: s.idle_count(),
            open: s.open_now(),
            state,
            weight: s.weight,
            stats: s.stats.clone(),
            ledger: s.ledger.clone(),
        };
        let mut infos: Vec<ServerInfo> = self
            .servers()
            .servers
            .iter()
            .map(|s| info(s, s.health.state()))
            .collect();
        infos.extend(lock(&self.gone).iter().map(|(s, _)| info(s, "gone")));
        infos
    }

    fn names(&self) -> &[Arc<crate::dns::Name>] {
        &self.names
    }

    fn drain(&self) {
        // Under the lock `follow` takes: no server is added after this.
        let gone = lock(&self.gone);
        self.drained.store(true, Ordering::Relaxed);
        for (server, _) in gone.iter() {
            server.drain();
        }
        drop(gone);
        for server in &self.servers().servers {
            server.drain();
        }
    }
}

/// A server of `cfg` at `addr`, written as its server `entry` (and as `name`, when it
/// follows DNS), with idle lists for `workers` workers. Its ledger is found again by its
/// label, so an address that comes back keeps counting where it left off.
fn new_server<C: PoolConn>(
    cfg: &config::Upstream,
    ledger: &Ledger,
    workers: usize,
    addr: &Address,
    entry: usize,
    name: Option<&Arc<crate::dns::Name>>,
) -> Arc<Server<C>> {
    let label = address_label(addr);
    Arc::new(Server {
        addr: addr.clone(),
        ledger: ledger.side(SideId::Server {
            upstream: cfg.name.clone(),
            server: label.clone(),
            addr: tcp_addr(addr),
        }),
        label,
        entry,
        name: name.cloned(),
        idle: (0..workers.max(1))
            .map(|_| Mutex::new(Vec::new()))
            .collect(),
        idle_total: AtomicUsize::new(0),
        open: Arc::default(),
        limit: (cfg.max_connections > 0).then(|| Arc::new(Semaphore::new(cfg.max_connections))),
        waiting: AtomicUsize::new(0),
        returned: Notify::new(),
        stats: Arc::default(),
        health: Health::default(),
        weight: cfg.weights.get(entry).copied().unwrap_or(1).max(1),
        drained: AtomicBool::new(false),
        state: C::ServerState::default(),
    })
}

/// Locks an idle list; a panic elsewhere while it was held leaves it usable.
fn lock<T>(list: &Mutex<T>) -> MutexGuard<'_, T> {
    list.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a server is named in logs and metrics.
pub fn address_label(addr: &Address) -> String {
    match addr {
        Address::Tcp(a) => a.to_string(),
        Address::Unix(p) => format!("unix:{}", p.display()),
        Address::Systemd(name) => format!("systemd:{name}"),
    }
}

/// The socket address of a TCP server, if it is one.
pub fn tcp_addr(addr: &Address) -> Option<SocketAddr> {
    match addr {
        Address::Tcp(a) => Some(*a),
        Address::Unix(_) | Address::Systemd(_) => None,
    }
}

/// Server indexes spread by weight: weights [5, 1, 1] give 0 0 1 0 2 0 0, not 0 0 0 0 0 1 2
/// (nginx's smooth weighted round-robin, run once at start).
fn smooth_schedule(weights: &[u32], n: usize) -> Vec<usize> {
    let weights: Vec<i64> = (0..n)
        .map(|i| i64::from(weights.get(i).copied().unwrap_or(1).max(1)))
        .collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; n];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        let Some((best, _)) = current
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, -(*i as i64)))
        else {
            break;
        };
        if let Some(c) = current.get_mut(best) {
            *c -= total;
        }
        out.push(best);
    }
    out
}

/// Checks every server of the upstream every `interval`, until the upstream is gone.
fn spawn_checks<C: PoolConn>(up: Weak<Upstream<C>>, hc: HealthCheck) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(hc.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(up) = up.upgrade() else { return };
            for server in &up.servers().servers {
                let host = server.name.as_deref().map(|n| n.host.as_str());
                match health::check(&server.addr, host, &hc, &up.cfg, &server.ledger, &up.tls).await
                {
                    Ok(()) => {
                        if !server.health.is_up() {
                            tracing::info!(upstream = %up.cfg.name, server = %server.label,
                                "health check passed: server is up");
                        }
                        server.health.succeeded()
                    }
                    Err(e) => {
                        if server.health.failed(&up.cfg) {
                            tracing::warn!(upstream = %up.cfg.name, server = %server.label,
                                error = %e, "health checks failed: server marked down");
                        }
                    }
                }
            }
        }
    });
}

/// How often idle connections are looked over. Also how long one that its server closed may
/// sit in CLOSE_WAIT before it is answered (nobody reads an idle HTTP connection): at most a
/// second. A round costs a readiness check or a peek per idle connection.
fn reap_interval(idle_timeout: Duration) -> Duration {
    (idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

fn spawn_reaper<C: PoolConn>(up: Weak<Upstream<C>>, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // The upstream is gone (reload removed it): the reaper goes with it.
            let Some(up) = up.upgrade() else { return };
            for server in &up.servers().servers {
                server.reap(&up.cfg);
            }
            // Those that left DNS: lent connections come back to them and are retired.
            for (server, _) in lock(&up.gone).iter() {
                server.reap(&up.cfg);
            }
        }
    });
}
