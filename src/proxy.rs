//! A running waitless: listeners, upstream pools and the ledger built from a config, and the
//! two ways that config changes while running — a reload (SIGHUP) and a drain (SIGTERM).
//!
//! A reload builds a new generation beside the running one: a listener whose address and
//! protocol did not change keeps its socket and gets the new service (established clients
//! keep the one they started with); an upstream whose settings did not change keeps its pool
//! and its warm connections. Removed listeners stop accepting and drain; replaced pools close
//! their idle connections. Any error refuses the whole reload and leaves the running
//! generation untouched.
//!
//! An upgrade (`upgrade`) hands every socket, the admin one's too, to a new process of the
//! binary; once it accepts, this one drains as on SIGTERM.
//!
//! Nothing here names a protocol: `frontend` builds each listener's service and pool.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, Control, Inputs, ReloadCounts};
use crate::close::{Ledger, SideId};
use crate::config::{self, Config, Protocol};
use crate::frontend::{self, Context, Parts, Pools, Swap};
use crate::listener::{set_defer_accept, AcceptOpts, Bound, ListenerStats, Listening};
use crate::pool::UpstreamInfo;
use crate::workers::Workers;

pub use crate::admin::ListenerInfo;

/// The shared state of a running proxy.
#[derive(Debug)]
pub struct Proxy {
    /// Every close, per side; kept across reloads so counters never go back.
    pub ledger: Arc<Ledger>,
    /// The admin listener's bound address.
    pub admin_addr: Option<SocketAddr>,
    /// What runs now.
    current: RwLock<Arc<Generation>>,
    /// Listening sockets by address, kept across reloads.
    slots: Mutex<Vec<Slot>>,
    /// Cancelled on shutdown; every listener's stop token is its child.
    stop: CancellationToken,
    /// Every client connection task.
    tasks: TaskTracker,
    /// The worker runtimes; every listener accepts on each of them.
    workers: Workers,
    /// Reloads taken and refused, for /stats and /metrics.
    reloads: Reloads,
    /// The admin listener's upgrade key and a second descriptor of its socket, to hand over.
    admin_handover: Option<(String, OwnedFd)>,
    /// Stops the admin accept loop once a new process took its socket over.
    admin_stop: CancellationToken,
    /// Admin connection tasks, so an upgraded process answers the upgrade before it exits.
    admin_tasks: TaskTracker,
    /// An upgrade is under way: a second one, and reloads, are refused meanwhile.
    upgrading: AtomicBool,
    /// Cancelled once a new process took the sockets over: this one drains and exits.
    handed: CancellationToken,
}

/// One config's listeners and pools.
#[derive(Debug, Default)]
pub struct Generation {
    /// The config it was built from.
    pub config: Option<Config>,
    /// Listeners, whatever their protocol.
    pub listeners: Vec<ListenerInfo>,
    /// Upstream pools by name, so a reload can keep the unchanged ones.
    pools: Pools,
}

/// Reload outcomes since start.
#[derive(Debug, Default)]
struct Reloads {
    /// Configs read and applied.
    taken: AtomicU64,
    /// Configs refused (the running one stayed).
    refused: AtomicU64,
}

/// A start-up or reload failure, naming what could not be set up.
#[derive(Debug)]
pub struct StartError(pub String);

/// A listening socket and the service its accept loop hands connections to.
#[derive(Debug)]
struct Slot {
    /// The address as configured (port 0 listeners never match one another).
    key: String,
    /// The listener name it was last configured under.
    name: String,
    protocol: Protocol,
    /// Swaps the service on reload.
    service: Box<dyn Swap>,
    /// Stops its accept loop (reload removed it, or shutdown).
    stop: CancellationToken,
    /// Kept across reloads while the name stays.
    stats: Arc<ListenerStats>,
    /// The address bound.
    addr: Option<SocketAddr>,
    /// Second descriptors of its TCP sockets, to apply a reloaded `defer_accept`.
    tcp: Vec<OwnedFd>,
    /// Second descriptors of every socket, to hand to a new binary on upgrade.
    handover: Vec<OwnedFd>,
}

/// A listener's sockets bound (or handed over) by a reload, not yet accepted on.
struct Fresh {
    /// One share per worker.
    socks: Vec<Listening>,
    /// For `Slot::tcp`.
    tcp: Vec<OwnedFd>,
    /// For `Slot::handover`.
    handover: Vec<OwnedFd>,
}

/// The admin listener's backlog (tokio's default for the TCP one).
const ADMIN_BACKLOG: u32 = 1024;

/// How long a load balancer may take to send its PROXY header.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

// === impl StartError ===

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

// === impl Proxy ===

impl Proxy {
    /// Binds every socket of `config` and starts serving on `workers`. Must run inside a
    /// tokio runtime (the admin listener and pool tasks run on it). Every socket is bound
    /// before anything is served, so a bad address fails start-up as a whole.
    pub async fn start(config: Config, workers: Workers) -> Result<Arc<Proxy>, StartError> {
        let (admin_sock, admin_handover) = match &config.admin.listen {
            Some(addr) => {
                let (sock, dup) = admin_socket(addr, config.admin.unix_mode())
                    .await
                    .map_err(|e| StartError(format!("admin: cannot listen on {addr}: {e}")))?;
                (Some(sock), Some((admin_key(addr), dup)))
            }
            None => (None, None),
        };
        let proxy = Arc::new(Proxy {
            ledger: Arc::new(Ledger::default()),
            admin_addr: admin_sock.as_ref().and_then(admin::Listener::local_addr),
            current: RwLock::new(Arc::new(Generation::default())),
            slots: Mutex::new(Vec::new()),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            workers,
            reloads: Reloads::default(),
            admin_handover,
            admin_stop: CancellationToken::new(),
            admin_tasks: TaskTracker::new(),
            upgrading: AtomicBool::new(false),
            handed: CancellationToken::new(),
        });
        proxy.apply(config)?;
        // Sockets an upgrade handed over that this config has no listener for.
        crate::upgrade::close_unclaimed();
        for l in &proxy.current().listeners {
            let at = l
                .addr
                .map_or_else(|| l.cfg.listen.to_string(), |a| a.to_string());
            tracing::info!(listener = %l.cfg.name, protocol = %l.cfg.protocol, addr = %at, "listening");
        }
        if let Some(sock) = admin_sock {
            let control: Arc<dyn Control> = proxy.clone();
            tokio::spawn(admin::serve(
                sock,
                control,
                proxy.admin_stop.clone(),
                proxy.admin_tasks.clone(),
            ));
        }
        Ok(proxy)
    }

    /// What runs now.
    pub fn current(&self) -> Arc<Generation> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the config file the running config came from and applies it; on any error
    /// the running config stays as it is. systemd is told the reload's start and its end
    /// (SIGHUP and POST /reload alike), and each outcome is counted.
    pub fn reload(&self) -> Result<(), String> {
        crate::systemd::reloading();
        let result = if self.upgrading.load(Ordering::Relaxed) {
            Err("an upgrade is under way; reload after it".into())
        } else if self.handed.is_cancelled() {
            Err("a new process took over; this one is draining".into())
        } else {
            self.reload_file()
        };
        let counter = match &result {
            Ok(()) => &self.reloads.taken,
            Err(_) => &self.reloads.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        crate::systemd::ready(match &result {
            Ok(()) => "serving; configuration reloaded",
            Err(_) => "serving; reload refused, the running configuration stays",
        });
        result
    }

    fn reload_file(&self) -> Result<(), String> {
        let gen = self.current();
        let Some(path) = gen.config.as_ref().map(|c| c.source.clone()) else {
            return Err("no config file to reload".into());
        };
        let config = Config::load(&path).map_err(|e| e.to_string())?;
        for w in config.warnings() {
            tracing::warn!("{w}");
        }
        self.apply(config).map_err(|e| e.0)
    }

    /// Starts the new binary and hands it every listening socket (`upgrade`); once it accepts,
    /// this process must stop accepting and drain (`handed_over` ends). Its pid, or why not:
    /// then this process serves on as before. Blocks: call it off the runtime threads.
    pub fn upgrade(&self) -> Result<u32, String> {
        if self.handed.is_cancelled() {
            return Err("a new process took over already; this one is draining".into());
        }
        if self.stop.is_cancelled() {
            return Err("draining: nothing left to hand over".into());
        }
        if self.upgrading.swap(true, Ordering::AcqRel) {
            return Err("an upgrade is already under way".into());
        }
        let result = self.hand_over();
        if result.is_ok() {
            // The new process accepts on the admin socket too; this one answers only the
            // connections it has.
            self.admin_stop.cancel();
            self.handed.cancel();
        }
        self.upgrading.store(false, Ordering::Release);
        result
    }

    fn hand_over(&self) -> Result<u32, String> {
        let dup = |key: &str, fd: &OwnedFd| {
            fd.try_clone()
                .map(|fd| (key.to_string(), fd))
                .map_err(|e| format!("{key}: {e}"))
        };
        let mut sockets = Vec::new();
        if let Some((key, fd)) = &self.admin_handover {
            sockets.push(dup(key, fd)?);
        }
        for slot in self.slots.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            for fd in &slot.handover {
                sockets.push(dup(&slot.key, fd)?);
            }
        }
        crate::upgrade::hand_over(sockets)
    }

    /// Ends once a new process took the sockets over (`upgrade`, from SIGUSR2 or POST
    /// /upgrade).
    pub async fn handed_over(&self) {
        self.handed.cancelled().await
    }

    /// Waits up to `timeout` for the admin connections this process still has: the one
    /// that asked for an upgrade gets its answer before the process exits.
    pub async fn admin_finished(&self, timeout: Duration) {
        self.admin_tasks.close();
        let _ = tokio::time::timeout(timeout, self.admin_tasks.wait()).await;
    }

    /// Stops accepting, lets connections in flight finish up to `timeout`, then closes every
    /// pooled connection (ledger reason `drain`).
    pub async fn shutdown(&self, timeout: Duration) {
        self.stop.cancel();
        // The reload handles hold the listening sockets open too: closed with the accept
        // loops' own, new clients are refused at once while the others finish.
        for slot in self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter_mut()
        {
            slot.tcp.clear();
            slot.handover.clear();
        }
        self.tasks.close();
        if tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.tasks.len(),
                "drain_timeout passed with client connections still open; closing them"
            );
        }
        self.drain_pools();
    }

    /// Closes every idle pooled connection (ledger reason `drain`).
    pub fn drain_pools(&self) {
        for up in self.current().upstreams() {
            up.drain();
        }
    }

    /// Builds the generation of `config` beside the running one and switches to it.
    fn apply(&self, config: Config) -> Result<(), StartError> {
        let old = self.current();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut pools = Pools::default();

        // Sockets first: a listener that cannot bind refuses the whole config.
        let mut fresh: Vec<Option<Fresh>> = Vec::new();
        for l in &config.listeners {
            let key = slot_key(l);
            if slots
                .iter()
                .any(|s| s.key == key && s.protocol == l.protocol)
            {
                fresh.push(None);
                continue;
            }
            let n = self.workers.count();
            // Sockets an upgrade handed over first: the same sockets, with their queues.
            let bound = match crate::upgrade::take(&key) {
                Some(fds) => {
                    Listening::inherited(fds, &l.listen, l.defer_accept, l.listen_backlog, n)
                }
                None => Listening::bind(&l.listen, l.mode, l.defer_accept, l.listen_backlog, n),
            }
            .and_then(|s| {
                let (tcp, all) = (s.tcp_handles()?, s.handles()?);
                Ok(Fresh {
                    socks: s.split(n)?,
                    tcp,
                    handover: all,
                })
            });
            let socks = bound.map_err(|e| {
                StartError(format!(
                    "listener {}: cannot listen on {}: {e}",
                    l.name, l.listen
                ))
            })?;
            fresh.push(Some(socks));
        }
        // Services next, so that nothing is started until every one could be built.
        let cx = Context {
            config: &config,
            old: &old.pools,
            ledger: &self.ledger,
            workers: &self.workers,
        };
        let mut services = Vec::new();
        for l in &config.listeners {
            let upstream = config.upstream(&l.upstream).ok_or_else(|| {
                StartError(format!(
                    "listener {}: no upstream named {}",
                    l.name, l.upstream
                ))
            })?;
            let key = slot_key(l);
            let existing = slots
                .iter()
                .find(|s| s.key == key && s.protocol == l.protocol);
            let stop = existing.map_or_else(|| self.stop.child_token(), |s| s.stop.clone());
            let stats = match existing {
                Some(s) if s.name == l.name => s.stats.clone(),
                _ => Arc::new(ListenerStats::default()),
            };
            let ledger = self.ledger.side(SideId::Listener {
                name: l.name.clone(),
            });
            let parts = Parts {
                cfg: l.clone(),
                ledger: ledger.clone(),
                stats: stats.clone(),
                stop: stop.clone(),
            };
            let service = frontend::build(parts, upstream, &mut pools, &cx)
                .map_err(|e| StartError(format!("listener {}: {e}", l.name)))?;
            services.push((service, stop, stats, ledger));
        }

        // Switch: swap services on kept sockets, start accept loops on new ones.
        let mut listeners = Vec::new();
        let mut kept = Vec::new();
        for ((l, sock), (service, stop, stats, ledger)) in
            config.listeners.iter().zip(fresh).zip(services)
        {
            let key = slot_key(l);
            let addr = match sock {
                None => {
                    let Some(slot) = slots
                        .iter_mut()
                        .find(|s| s.key == key && s.protocol == l.protocol)
                    else {
                        continue;
                    };
                    if !slot.service.swap(service) {
                        tracing::error!(listener = %l.name,
                            "reload: protocol mismatch on a kept listener");
                    }
                    for fd in &slot.tcp {
                        if let Err(e) = set_defer_accept(fd, l.defer_accept) {
                            tracing::warn!(listener = %l.name, error = %e,
                                "reload: defer_accept not changed");
                        }
                    }
                    slot.name = l.name.clone();
                    slot.stats = stats.clone();
                    slot.addr
                }
                Some(Fresh {
                    socks,
                    tcp,
                    handover,
                }) => {
                    let addr = socks.first().and_then(Listening::local_addr);
                    let opts = AcceptOpts {
                        name: l.name.clone().into(),
                        proxy_header: l.accept_proxy_protocol.then_some(PROXY_HEADER_TIMEOUT),
                        stats: stats.clone(),
                        max_clients: l.max_clients,
                        stop: stop.clone(),
                        tasks: self.tasks.clone(),
                    };
                    let service = service.start(socks, opts, &self.workers);
                    slots.push(Slot {
                        key: key.clone(),
                        name: l.name.clone(),
                        protocol: l.protocol,
                        service,
                        stop,
                        stats: stats.clone(),
                        addr,
                        tcp,
                        handover,
                    });
                    addr
                }
            };
            kept.push(key);
            listeners.push(ListenerInfo {
                cfg: l.clone(),
                addr,
                stats,
                ledger,
            });
        }
        // Listeners no longer configured stop accepting; their clients finish.
        slots.retain(|s| {
            let keep = kept.contains(&s.key);
            if !keep {
                tracing::info!(listener = %s.name, "listener removed: draining");
                s.stop.cancel();
            }
            keep
        });
        // Pools not carried over close their idle connections.
        for up in old.upstreams() {
            if !pools.all().iter().any(|p| Arc::ptr_eq(p, up)) {
                up.drain();
            }
        }
        // Past every check: a refused config leaves the log where it was.
        crate::access::configure(&config.log);
        let gen = Generation {
            config: Some(config),
            listeners,
            pools,
        };
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(gen);
        Ok(())
    }
}

// === impl Control ===

impl Control for Proxy {
    fn inputs(&self) -> Inputs {
        let gen = self.current();
        Inputs {
            listeners: gen.listeners.clone(),
            upstreams: gen.upstreams().to_vec(),
            reloads: ReloadCounts {
                taken: self.reloads.taken.load(Ordering::Relaxed),
                refused: self.reloads.refused.load(Ordering::Relaxed),
            },
        }
    }

    fn token(&self) -> Option<String> {
        self.current().config.as_ref()?.admin.token.clone()
    }

    fn reload(&self) -> Result<(), String> {
        Proxy::reload(self)
    }

    fn upgrade(&self) -> Result<u32, String> {
        Proxy::upgrade(self)
    }
}

// === impl Generation ===

impl Generation {
    /// Upstream pools, whatever their protocol, in creation order.
    pub fn upstreams(&self) -> &[Arc<dyn UpstreamInfo>] {
        self.pools.all()
    }
}

/// Listeners on port 0 get a fresh socket each time; others are matched by address.
fn slot_key(l: &config::Listener) -> String {
    match &l.listen {
        config::Address::Tcp(a) if a.port() == 0 => format!("{}#{}", a, l.name),
        other => other.to_string(),
    }
}

/// The admin listener's key among the sockets an upgrade hands over.
fn admin_key(addr: &config::Address) -> String {
    format!("admin@{addr}")
}

/// The admin socket (the one an upgrade handed over for this address, else bound; a unix
/// one given `mode`), and a second descriptor of it to hand over in turn.
async fn admin_socket(addr: &config::Address, mode: u32) -> io::Result<(admin::Listener, OwnedFd)> {
    let inherited = crate::upgrade::take(&admin_key(addr)).and_then(|fds| fds.into_iter().next());
    match addr {
        config::Address::Tcp(at) => {
            let sock = match inherited {
                Some(fd) => {
                    let sock = std::net::TcpListener::from(fd);
                    sock.set_nonblocking(true)?;
                    tokio::net::TcpListener::from_std(sock)?
                }
                None => tokio::net::TcpListener::bind(at).await?,
            };
            let dup = sock.as_fd().try_clone_to_owned()?;
            Ok((admin::Listener::Tcp(sock), dup))
        }
        _ => {
            let sock = match inherited {
                Some(fd) => Listening::inherited(vec![fd], addr, false, ADMIN_BACKLOG, 1)?,
                None => Listening::bind(addr, Some(mode), false, ADMIN_BACKLOG, 1)?,
            };
            let dup = sock
                .handles()?
                .into_iter()
                .next()
                .ok_or_else(|| io::Error::other("no admin socket"))?;
            Ok((admin::Listener::Unix(Bound::register(sock)?), dup))
        }
    }
}

/// A multi-threaded runtime with `workers` threads (0 = one per core), for the programs
/// that run the library on one runtime (the demo).
pub fn runtime(workers: usize) -> io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        b.worker_threads(workers);
    }
    b.enable_all().build()
}
