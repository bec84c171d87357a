//! MySQL mode: session pooling in front of MySQL / MariaDB servers.
//!
//! waitless greets each client as its server would and checks its password itself
//! (`front`), lends it an authenticated server connection for the whole session (`backend`,
//! pooled per server by user, capabilities and character set), relays every command and
//! response unchanged (`relay`, over `packet`'s framing), and when the client leaves — by
//! COM_QUIT, which never reaches the server, by EOF or by error — resets the server
//! connection and keeps it. Short client sessions so end at waitless, and the server sees a
//! few long-lived connections: no connection churn and no TIME_WAIT on its side.

mod backend;
mod front;
mod lent;
mod mux;
mod packet;
mod relay;
mod residue;
mod statement;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mysql_common::constants::CapabilityFlags;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::close::{ClientPolicy, Ending, Ledger, Reason, SideLedger, Socket, Tracked};
use crate::config::{self, MysqlUser, Pooling};
use crate::connector::{self, OpenError};
use crate::listener::{ListenerStats, Serve};
use crate::pool::{self, Server};
pub use backend::MysqlConn;
use backend::{BackendError, Profile, ServerFacts};
use front::{Login, Refused};
pub use mux::{MuxStats, Pin};
use packet::{err_payload, ok_payload, Fault, Flow, Head, PacketIo, MAX_PACKET, PEEK};
use relay::{Response, Shape, COM_INIT_DB, COM_QUIT, COM_SET_OPTION, COM_STMT_EXECUTE};
use residue::Residue;
use statement::Effect;

/// An upstream of MySQL servers: their pools, each server with what it said about itself.
#[derive(Debug)]
pub struct MysqlUpstream {
    /// Per-server pools of logged-in connections; a server's `state` is a `ServerState`.
    pub pool: Arc<pool::Upstream<MysqlConn>>,
    /// Woken when a connection goes back to a pool: one waiting client per connection (all
    /// of them woken would race for the one, a herd under transaction pooling).
    returned: Notify,
}

/// A server of a mysql upstream, with its pool.
type MysqlServer = Server<MysqlConn>;

/// What a mysql upstream keeps about each server beside its pool: it comes and goes with
/// the server's address in DNS.
#[derive(Debug, Default)]
pub struct ServerState {
    /// What its greeting said.
    facts: ServerFacts,
    /// Connections being reset after a session, soon idle again.
    resetting: AtomicUsize,
    /// Sessions waiting for one of those.
    waiting: AtomicUsize,
    /// The sessions holding a connection, to see which are ending.
    lent: lent::Lent,
}

/// Everything a client connection of one mysql listener needs.
#[derive(Debug)]
pub struct MysqlListener {
    /// Its configuration.
    pub cfg: config::Listener,
    /// Where sessions go.
    pub upstream: Arc<MysqlUpstream>,
    /// The accounts clients may log in as.
    pub users: Vec<MysqlUser>,
    /// Its client-side close ledger.
    pub ledger: Arc<SideLedger>,
    /// Its counters (requests = client commands).
    pub stats: Arc<ListenerStats>,
    /// Connection ids for greetings (waitless's own; CONNECTION_ID() is the server's).
    next_id: AtomicU32,
}

/// A borrowed server connection and where it goes back.
type Lease = pool::Lease<MysqlConn>;

/// How a session ended, for the client's close.
enum End {
    /// The client quit, closed, or was answered and let go: close by policy.
    Done(Reason),
    /// The client connection failed: dropped.
    Broken(String),
    /// The server connection closed or failed under the session: the client sees the end
    /// now, as it would from the server.
    ServerGone,
    /// The client sent an SSLRequest: its login goes on over TLS.
    StartTls(Box<Started>),
}

/// A session whose client was greeted: the rest of its login is to come.
struct Started {
    /// The server it goes to.
    picked: Picked,
    /// What the client was greeted with.
    greeted: front::Greeted,
    /// When the login must be done by (header_timeout after the greeting began).
    deadline: Instant,
}

/// How long a waiting client sleeps between looks at a full pool when nothing is returned.
const RECHECK: Duration = Duration::from_millis(50);

const ER_CON_COUNT_ERROR: u16 = 1040;
/// CR_CONN_HOST_ERROR: "Can't connect to MySQL server", for an upstream with no server up.
const CR_CONN_HOST_ERROR: u16 = 2003;
const ER_UNKNOWN_COM_ERROR: u16 = 1047;
/// ER_BAD_DB_ERROR: unknown database, the client's mistake.
const ER_BAD_DB_ERROR: u16 = 1049;
/// ER_UNKNOWN_ERROR: the catch-all for "waitless could not reach the server".
const ER_UNKNOWN_ERROR: u16 = 1105;

// === impl MysqlUpstream ===

impl MysqlUpstream {
    /// Its servers written as names follow DNS, as an http upstream's do.
    pub fn new(cfg: &config::Upstream, ledger: &Arc<Ledger>, workers: usize) -> Arc<MysqlUpstream> {
        Arc::new(MysqlUpstream {
            pool: pool::Upstream::new(cfg, ledger, workers, true),
            returned: Notify::new(),
        })
    }

    fn cfg(&self) -> &config::Upstream {
        &self.pool.cfg
    }

    /// A server for a new session and what to greet its client with: the first in rotation
    /// whose greeting is known, or else the first that greets a new connection — which then
    /// serves the session, its login completed after the client's.
    async fn pick(&self, listener: &str) -> Result<Picked, String> {
        // Servers that are up, in the balance policy's order; none when all are down.
        let order: Vec<Arc<MysqlServer>> = self.pool.rotation().collect();
        if order.is_empty() {
            return Err("no server is up".into());
        }
        // Sessions that arrive together before any greeting is known open one connection
        // each; past max_connections they wait for one of those greetings instead.
        let deadline = Instant::now() + self.cfg().connect_timeout;
        loop {
            match self.pick_in(&order, listener).await {
                Err(None) if Instant::now() < deadline => tokio::time::sleep(RECHECK).await,
                Err(None) => return Err("max_connections open, no greeting known yet".into()),
                Err(Some(e)) => return Err(e),
                Ok(picked) => return Ok(picked),
            }
        }
    }

    /// One look for `pick` over the servers in `order`; Err(None) when one was at
    /// max_connections and no greeting is known.
    async fn pick_in(
        &self,
        order: &[Arc<MysqlServer>],
        listener: &str,
    ) -> Result<Picked, Option<String>> {
        for server in order {
            if let Some(profile) = server.state.facts.profile() {
                return Ok(Picked {
                    server: server.clone(),
                    profile,
                    greeted: None,
                });
            }
        }
        let mut last = String::from("no servers");
        let mut busy = false;
        for server in order {
            let facts = &server.state.facts;
            let greeting = backend::Greeting { facts };
            match connector::open(&self.pool, server, &greeting, listener).await {
                Ok(pooled) => {
                    if let Some(profile) = facts.profile() {
                        return Ok(Picked {
                            server: server.clone(),
                            profile,
                            greeted: Some(pooled),
                        });
                    }
                }
                Err(OpenError::Refused(err)) => {
                    let why = packet::describe_err(&err, CapabilityFlags::CLIENT_PROTOCOL_41);
                    last = format!("{}: {why}", server.label);
                }
                Err(OpenError::Io(e)) => last = format!("{}: {e}", server.label),
                Err(OpenError::Busy) => {
                    busy = true;
                    last = format!("{}: max_connections open", server.label);
                }
            }
        }
        if busy && order.iter().all(|s| s.state.facts.profile().is_none()) {
            return Err(None);
        }
        Err(Some(last))
    }

    /// A connection for `login` on `server`: an idle one of the same session key with
    /// its database set to `db`, or a new one. When `max_connections` are open, idle connections of
    /// other keys are closed to make room, and then the client waits up to
    /// `connect_timeout` for one to come back. With the lease, whether it served a session before.
    async fn checkout(
        &self,
        server: &Arc<MysqlServer>,
        login: &Login,
        db: Option<&[u8]>,
        greeted: Option<pool::Pooled<MysqlConn>>,
        listener: &str,
    ) -> Result<(Lease, bool), Checkout> {
        let cfg = self.cfg();
        let ServerState {
            facts,
            resetting,
            waiting,
            lent,
        } = &server.state;
        let login_as = backend::Login {
            facts,
            user: &login.user,
            key: &login.key,
            db,
        };
        if let Some(pooled) = greeted {
            let by = std::time::Instant::now() + cfg.connect_timeout;
            let at = connector::Opening::of(&self.pool, server, by);
            return match pooled.remade(|conn| conn.log_in(&login_as, &at)).await {
                Ok(pooled) => Ok(Lease::new(pooled, server, &self.pool)),
                Err(BackendError::Server(err)) => Err(Checkout::Server(err)),
                Err(BackendError::Io(e)) => {
                    connector::failed(cfg, server, &e, listener);
                    Err(Checkout::Failed(format!("{}: {e}", server.label)))
                }
            };
        }
        let deadline = Instant::now() + cfg.connect_timeout;
        loop {
            // Registered before looking, so that a connection returned meanwhile wakes us.
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            while let Some(mut pooled) = server.take_idle_matching(cfg, |c| c.key == login.key) {
                if pooled.is_away() && pooled.conn.io.get_ref().can_rehome() {
                    // Sessions land on workers at random (SO_REUSEPORT); left where it was
                    // opened, every packet of this session would wake two threads.
                    pooled = match pooled.brought_home(MysqlConn::rehomed) {
                        Ok(pooled) => pooled,
                        Err(e) => {
                            tracing::debug!(upstream = %cfg.name, server = %server.label,
                                error = %e, "pooled connection lost moving it to this worker");
                            continue;
                        }
                    };
                }
                match pooled
                    .conn
                    .use_schema(&login.user, db, cfg.response_timeout)
                    .await
                {
                    Ok(()) => return Ok(Lease::new(pooled, server, &self.pool)),
                    Err(BackendError::Server(err)) => {
                        // Unknown database, say: the connection itself is fine.
                        server.put(cfg, pooled);
                        return Err(Checkout::Server(err));
                    }
                    // Dropped: broken under our feet, try the next one.
                    Err(BackendError::Io(_)) => continue,
                }
            }
            // Short sessions back to back: a connection being reset, or lent to a client
            // that has already quit, is idle again in a round trip, sooner than a new one
            // logs in. Wait for it while there are more of them than clients already
            // waiting; the server sees no more connections than the sessions that overlap.
            let now = Instant::now();
            let ahead = waiting.fetch_add(1, Ordering::AcqRel);
            let coming = resetting.load(Ordering::Acquire);
            // A wake goes to one waiter, which may want another key: look again within
            // RECHECK whatever happens.
            let wait = (coming > ahead || lent.leaving_more_than(ahead - coming))
                .then(|| deadline.saturating_duration_since(now).min(RECHECK));
            if let Some(wait) = wait.filter(|w| !w.is_zero()) {
                let _ = tokio::time::timeout(wait, returned).await;
                waiting.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            waiting.fetch_sub(1, Ordering::AcqRel);
            match connector::open(&self.pool, server, &login_as, listener).await {
                Ok(pooled) => return Ok(Lease::new(pooled, server, &self.pool)),
                Err(OpenError::Refused(err)) => return Err(Checkout::Server(err)),
                Err(OpenError::Io(e)) => {
                    return Err(Checkout::Failed(format!("{}: {e}", server.label)))
                }
                Err(OpenError::Busy) => {
                    if let Some(other) = server.take_idle_matching(cfg, |c| c.key != login.key) {
                        // Its permit serves a waiting session better than an idle pool.
                        other.ctl.retire(Reason::PoolFull);
                        continue;
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(Checkout::Busy);
                    }
                    let nap = (deadline - now).min(RECHECK);
                    let _ = tokio::time::timeout(nap, returned).await;
                }
            }
        }
    }

    /// The server a transaction-pooled client of `gone` (drained: its address left DNS) goes
    /// on with: the first up in rotation that greets as `gone` did, so the capabilities and
    /// collation the client logged in with hold there too.
    fn successor(&self, gone: &MysqlServer) -> Option<Arc<MysqlServer>> {
        let was = gone.state.facts.profile()?;
        self.pool.rotation().find(|s| {
            !s.is_drained()
                && s.state
                    .facts
                    .profile()
                    .is_some_and(|p| p.caps == was.caps && p.collation == was.collation)
        })
    }

    /// Resets a lent connection and returns it to its pool; a connection that cannot be
    /// reset is closed instead. `session` is the session's place among the lent, given up
    /// once the connection counts as being reset.
    async fn give_back(&self, mut lease: Lease, login: &Login, session: Option<lent::Entry<'_>>) {
        let cfg = self.cfg();
        if lease.server.is_drained() {
            // Its pool would close it anyway: no reset for a server that takes no more work.
            lease.pooled.ctl.retire(Reason::Drain);
            drop((lease, session));
            self.returned.notify_one();
            return;
        }
        let server = lease.server.clone();
        let ServerState {
            facts, resetting, ..
        } = &server.state;
        resetting.fetch_add(1, Ordering::AcqRel);
        drop(session);
        let reset = lease
            .pooled
            .conn
            .reset(
                &login.user,
                login.db.as_deref(),
                facts,
                cfg.response_timeout,
            )
            .await;
        lease.server.stats.resets.fetch_add(1, Ordering::Relaxed);
        match reset {
            Ok(()) => lease.give_back(),
            Err(e) => {
                tracing::debug!(upstream = %cfg.name, server = %lease.server.label, error = %e,
                    "server connection could not be reset; closing it");
                // Dropped: the close mechanism records the error and picks FIN or RST.
                drop(lease);
            }
        }
        resetting.fetch_sub(1, Ordering::AcqRel);
        self.returned.notify_one();
    }

    /// Returns a lent connection whose session left nothing behind, as it is.
    fn skip_reset(&self, lease: Lease, session: Option<lent::Entry<'_>>) {
        lease
            .server
            .stats
            .resets_skipped
            .fetch_add(1, Ordering::Relaxed);
        lease.give_back();
        drop(session);
        self.returned.notify_one();
    }

    /// Returns a lent connection between a transaction-pooled client's statements: clean,
    /// as nothing pinned it.
    fn put_back(&self, lease: Lease) {
        lease.give_back();
        self.returned.notify_one();
    }
}

/// The server a session goes to.
struct Picked {
    server: Arc<MysqlServer>,
    /// What its client is greeted with.
    profile: Profile,
    /// A new connection that has read the server's greeting, for this session to log in on.
    greeted: Option<pool::Pooled<MysqlConn>>,
}

/// Why a session got no server connection.
enum Checkout {
    /// max_connections open and none came back in time.
    Busy,
    /// The server answered the login or COM_INIT_DB with ERR; the payload is for the client.
    Server(Vec<u8>),
    /// The server could not be reached or failed.
    Failed(String),
}

// === impl MysqlListener ===

impl Serve for MysqlListener {
    fn serve<S: Socket>(
        self: Arc<Self>,
        stream: S,
        peer: Option<SocketAddr>,
    ) -> impl std::future::Future<Output = ()> + Send {
        self.serve_client(stream, peer)
    }

    fn track<S: Socket>(&self, stream: S) -> Tracked<S> {
        Tracked::client(stream, self.ledger.clone(), self.policy())
    }

    fn reject<S: Socket>(
        self: Arc<Self>,
        client: Tracked<S>,
        peer: Option<SocketAddr>,
    ) -> impl std::future::Future<Output = ()> + Send {
        self.reject_client(client, peer)
    }
}

impl MysqlListener {
    pub fn new(
        cfg: config::Listener,
        upstream: Arc<MysqlUpstream>,
        users: Vec<MysqlUser>,
        ledger: Arc<SideLedger>,
        stats: Arc<ListenerStats>,
    ) -> Arc<MysqlListener> {
        Arc::new(MysqlListener {
            cfg,
            upstream,
            users,
            ledger,
            stats,
            next_id: AtomicU32::new(1),
        })
    }

    /// Serves one client session to its end, then closes the client by policy.
    async fn serve_client<S: Socket>(self: Arc<Self>, stream: S, peer: Option<SocketAddr>) {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let policy = self.policy();
        let log = crate::access::Conn::new(&self.cfg.name, "mysql", peer);
        let tracked = Tracked::client(stream, self.ledger.clone(), policy).logged(log.clone());
        let mut client = PacketIo::new(tracked);
        let fd = client.get_ref().get_ref().as_fd().as_raw_fd();
        match self.session(&mut client, fd, peer, log.clone()).await {
            // Boxed: the TLS session's state must not weigh on every plain one.
            End::StartTls(started) => {
                Box::pin(self.serve_tls(client, *started, fd, peer, log)).await
            }
            end => self.close(client, end, peer).await,
        }
    }

    /// After a client's SSLRequest: the TLS handshake (within what is left of
    /// `header_timeout`, counted in the listener's TLS stats), then its login and session
    /// over TLS.
    async fn serve_tls<S: Socket>(
        &self,
        client: PacketIo<Tracked<S>>,
        started: Started,
        fd: RawFd,
        peer: Option<SocketAddr>,
        log: Option<Arc<crate::access::Conn>>,
    ) {
        let Some(tls) = self.cfg.tls.as_ref() else {
            return self.close(client, End::Done(Reason::Done), peer).await;
        };
        let within = started.deadline.saturating_duration_since(Instant::now());
        let stats = &self.stats.tls;
        // The SSLRequest was read to its end and no further: the ClientHello is unread.
        let tracked = client.into_inner();
        match tracked
            .wrap(|plain| crate::tls::accept(tls, plain, within, stats))
            .await
        {
            Ok(tracked) => {
                let mut client = PacketIo::new(tracked);
                let deadline = started.deadline;
                let end =
                    match tokio::time::timeout_at(deadline, front::response(&mut client)).await {
                        Ok(Ok(reply)) => {
                            self.log_in(&mut client, fd, peer, log, started, reply)
                                .await
                        }
                        Ok(Err(refused)) => self.refused(refused, peer),
                        Err(_) => self.late(peer),
                    };
                self.close(client, end, peer).await
            }
            Err((e, tracked)) => {
                tracing::debug!(listener = %self.cfg.name, peer = ?peer, error = e.as_str(),
                    "TLS handshake failed");
                // A TLS client has an alert to read; a plain one sees the close.
                let ending = match e {
                    crate::tls::HandshakeError::NotTls => Ending::ReadsToEof,
                    _ => Ending::RefusedAfterAnswer,
                };
                tracked.finish_client(ending).await
            }
        }
    }

    /// Closes a client whose session ended so, by policy.
    async fn close<S: Socket>(
        &self,
        client: PacketIo<Tracked<S>>,
        end: End,
        peer: Option<SocketAddr>,
    ) {
        match end {
            End::Done(why) => client.into_inner().finish_client(Ending::Over(why)).await,
            End::ServerGone => {
                client
                    .into_inner()
                    .finish_client(Ending::ServerClosed)
                    .await
            }
            End::Broken(e) => {
                tracing::debug!(listener = %self.cfg.name, peer = ?peer, error = %e,
                    "mysql client connection failed");
                // Dropped: the close mechanism records an error (or the client's close).
                drop(client);
            }
            // Asked for in the greeting only, and taken up by `serve_client`.
            End::StartTls(_) => drop(client),
        }
    }

    /// Turns a client away at `max_clients` as a full server does: ERR 1040 in place of the
    /// greeting.
    async fn reject_client<S: Socket>(self: Arc<Self>, io: Tracked<S>, peer: Option<SocketAddr>) {
        let mut client = PacketIo::new(io);
        let err = err_payload(ER_CON_COUNT_ERROR, b"08004", "Too many connections");
        match answer(&mut client, 0, &err).await {
            End::Done(_) => {
                let ending = Ending::Over(Reason::Refused);
                client.into_inner().finish_client(ending).await
            }
            End::Broken(e) => {
                tracing::debug!(listener = %self.cfg.name, peer = ?peer, error = %e,
                    "mysql client turned away");
            }
            End::ServerGone | End::StartTls(_) => {}
        }
    }

    fn policy(&self) -> ClientPolicy {
        self.cfg.close_policy()
    }

    /// Login, borrow, commands, give back.
    /// `fd`: the client's socket, open for as long as this runs.
    /// `log`: the client connection's access log, when it is on.
    async fn session<C>(
        &self,
        client: &mut PacketIo<C>,
        fd: RawFd,
        peer: Option<SocketAddr>,
        log: Option<Arc<crate::access::Conn>>,
    ) -> End
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let up = &self.upstream;
        let picked = match up.pick(&self.cfg.name).await {
            Ok(found) => found,
            Err(e) => {
                self.stats.errors_connect.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(listener = %self.cfg.name, upstream = %up.cfg().name, error = %e,
                    "no mysql server answers");
                let msg = format!(
                    "Can't connect to MySQL server: waitless upstream {}: {e}",
                    up.cfg().name
                );
                // An ERR in place of the greeting, as a server that refuses a host sends it;
                // 2003 is what clients say when they cannot reach a server themselves.
                return answer(client, 0, &err_payload(CR_CONN_HOST_ERROR, b"HY000", &msg)).await;
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // A login must complete within header_timeout: a client that stalls mid-handshake
        // would otherwise hold its connection for ever.
        let deadline = Instant::now() + self.cfg.header_timeout;
        let tls = self.cfg.tls.is_some();
        let greeting = front::greet(client, &picked.profile, id, tls);
        let (greeted, reply) = match tokio::time::timeout_at(deadline, greeting).await {
            Ok(Ok(greeted)) => greeted,
            Ok(Err(refused)) => return self.refused(refused, peer),
            Err(_) => return self.late(peer),
        };
        let started = Started {
            picked,
            greeted,
            deadline,
        };
        if front::asks_tls(&started.greeted, &reply) {
            return End::StartTls(Box::new(started));
        }
        self.log_in(client, fd, peer, log, started, reply).await
    }

    /// How a login that was refused ends.
    fn refused(&self, refused: Refused, peer: Option<SocketAddr>) -> End {
        match refused {
            Refused::Answered(msg) => {
                tracing::info!(listener = %self.cfg.name, peer = ?peer, "{msg}");
                End::Done(Reason::Done)
            }
            Refused::Io(e) => End::Broken(format!("login: {e}")),
        }
    }

    /// How a login not completed within header_timeout ends.
    fn late(&self, peer: Option<SocketAddr>) -> End {
        tracing::info!(listener = %self.cfg.name, peer = ?peer,
            timeout = ?self.cfg.header_timeout, "login not completed in time; closing");
        End::Done(Reason::Idle)
    }

    /// The login in `reply`, checked; then a server connection borrowed and the commands.
    async fn log_in<C>(
        &self,
        client: &mut PacketIo<C>,
        fd: RawFd,
        peer: Option<SocketAddr>,
        log: Option<Arc<crate::access::Conn>>,
        started: Started,
        reply: packet::Packet,
    ) -> End
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let up = &self.upstream;
        let Started {
            picked,
            greeted,
            deadline,
        } = started;
        let host = peer.map_or_else(|| "localhost".to_string(), |p| p.ip().to_string());
        let checking = front::log_in(client, greeted, reply, &self.users, &host);
        let login = match tokio::time::timeout_at(deadline, checking).await {
            Ok(Ok(login)) => login,
            Ok(Err(refused)) => return self.refused(refused, peer),
            Err(_) => return self.late(peer),
        };

        let asked = log.as_ref().map(|_| Instant::now());
        let mut lease = match up
            .checkout(
                &picked.server,
                &login,
                login.db.as_deref(),
                picked.greeted,
                &self.cfg.name,
            )
            .await
        {
            Ok((lease, reused)) => {
                if let (Some(log), Some(asked)) = (log.as_ref(), asked) {
                    let trip = crate::access::Trip {
                        server: Some(lease.server.label.clone()),
                        reused: Some(reused),
                        connect: Some(asked.elapsed()),
                        ..Default::default()
                    };
                    log.session(trip, Some(login.user.user.clone()));
                }
                lease
            }
            Err(Checkout::Busy) => {
                self.stats.errors_busy.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(listener = %self.cfg.name, upstream = %up.cfg().name,
                    "all mysql server connections busy (max_connections)");
                let err = err_payload(ER_CON_COUNT_ERROR, b"08004", "Too many connections");
                return answer(client, login.seq, &err).await;
            }
            Err(Checkout::Server(err)) => {
                // The client passed waitless's own check: a server that refuses the account
                // (its password, REQUIRE SSL, a host rule) is out of step with the config.
                if backend::err_code(&err) != Some(ER_BAD_DB_ERROR) {
                    tracing::warn!(listener = %self.cfg.name, upstream = %up.cfg().name,
                        server = %picked.server.label,
                        user = %login.user.user, tls = up.cfg().tls.is_some(),
                        error = %packet::describe_err(&err, CapabilityFlags::CLIENT_PROTOCOL_41),
                        "the mysql server refused waitless's login");
                }
                return answer(client, login.seq, &err).await;
            }
            Err(Checkout::Failed(e)) => {
                self.stats.errors_connect.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(listener = %self.cfg.name, upstream = %up.cfg().name, error = %e,
                    "cannot open a mysql server connection");
                let msg = format!(
                    "waitless: cannot connect to upstream {}: {e}",
                    up.cfg().name
                );
                return answer(
                    client,
                    login.seq,
                    &err_payload(ER_UNKNOWN_ERROR, b"HY000", &msg),
                )
                .await;
            }
        };
        if self.cfg.pooling == Pooling::Session {
            // A transaction-pooled client of another listener may have left its id here.
            let forgot = lease
                .pooled
                .conn
                .forget_insert_id(up.cfg().response_timeout)
                .await;
            if let Err(e) = forgot {
                self.stats.errors_connect.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(listener = %self.cfg.name, server = %lease.server.label,
                    error = %e, "mysql server connection failed clearing LAST_INSERT_ID");
                let msg = format!("waitless: upstream {}: {e}", up.cfg().name);
                let err = err_payload(ER_UNKNOWN_ERROR, b"HY000", &msg);
                return answer(client, login.seq, &err).await;
            }
        }
        let place = Some(picked.server.state.lent.enter(fd));
        let status = lease.pooled.conn.login_status();
        if let Err(e) = client.send(login.seq, &ok_payload(status)).await {
            up.give_back(lease, &login, place).await;
            return End::Broken(format!("login OK: {e}"));
        }
        match self.cfg.pooling {
            Pooling::Session => {
                self.commands(client, lease, place, &login, Residue::default())
                    .await
            }
            Pooling::Transaction => {
                // The login's connection is clean: the first statement may take another.
                drop(place);
                up.put_back(lease);
                self.transactions(client, picked.server, fd, &login).await
            }
        }
    }

    /// The command phase: until COM_QUIT, EOF, idle timeout or an error.
    async fn commands<C>(
        &self,
        client: &mut PacketIo<C>,
        mut lease: Lease,
        place: Option<lent::Entry<'_>>,
        login: &Login,
        mut residue: Residue,
    ) -> End
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let up = &self.upstream;
        // Commands relayed so far have left the server connection in a known state.
        let mut known = true;
        let end = loop {
            let conn = &mut lease.pooled.conn;
            let code = match self.next_command(client, conn).await {
                Next::Command(code) => code,
                // A server that closed between commands leaves nothing to reset.
                Next::End(End::ServerGone) => {
                    known = false;
                    break End::ServerGone;
                }
                Next::End(end) => break end,
                Next::ServerSpoke => {
                    // Between commands a server only speaks to say it is closing (KILL,
                    // wait_timeout, shutdown); anything else means the relay lost track of a
                    // response. Either way the client gets every byte, as is, to the end.
                    known = false;
                    tracing::info!(listener = %self.cfg.name, server = %lease.server.label,
                        "mysql server spoke between commands; passing the session through \
                         unpooled to its end");
                    break splice(client, &mut conn.io).await;
                }
            };
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let Some(shape) = Shape::of(code).filter(|_| code != COM_QUIT) else {
                // COM_QUIT is answered by the close; the server connection stays open for
                // the next session.
                match unrelayed(client, code).await {
                    Ok(true) => break End::Done(Reason::Done),
                    Ok(false) => continue,
                    Err(end) => break end,
                }
            };
            if let Err(end) = self
                .exchange(client, &mut lease, code, shape, &mut residue)
                .await
            {
                known = false;
                break end;
            }
        };
        if !known || residue.unresettable() {
            // Dropped, or retired when it is merely unresettable: the close mechanism
            // records it and picks FIN or RST.
            tracing::debug!(listener = %self.cfg.name, server = %lease.server.label, known,
                "mysql server connection not pooled again after its session");
            if known {
                lease.pooled.ctl.retire(Reason::Done);
            }
            drop(lease);
            drop(place);
            up.returned.notify_waiters();
        } else if residue.needs_reset() {
            up.give_back(lease, login, place).await;
        } else {
            up.skip_reset(lease, place);
        }
        end
    }

    /// Waits for the client's next command, and watches the server meanwhile.
    async fn next_command<C>(&self, client: &mut PacketIo<C>, conn: &mut MysqlConn) -> Next
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let waiting = async {
            tokio::select! {
                biased;
                head = client.next_head() => match head {
                    Ok(Some(code)) => Next::Command(code),
                    Ok(None) => Next::End(End::Done(Reason::Done)),
                    Err(e) => Next::End(End::Broken(format!("reading a command: {e}"))),
                },
                spoke = conn.io.readable() => match spoke {
                    Ok(true) => Next::ServerSpoke,
                    Ok(false) | Err(_) => Next::End(End::ServerGone),
                },
            }
        };
        match tokio::time::timeout(self.cfg.keepalive_timeout, waiting).await {
            Ok(next) => next,
            Err(_) => Next::End(End::Done(Reason::Idle)),
        }
    }

    /// One command and its response across `lease`'s connection, for either pooling: the
    /// command's code `code` (of `shape`) read, its packet buffered; `residue` sees both.
    /// Err: how the session ends, the server connection in an unknown state (not pooled
    /// again).
    async fn exchange<C>(
        &self,
        client: &mut PacketIo<C>,
        lease: &mut Lease,
        code: u8,
        shape: Shape,
        residue: &mut Residue,
    ) -> Result<relay::Reply, End>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let server = &lease.server.label;
        let conn = &mut lease.pooled.conn;
        let caps = conn.key.caps;
        let mut sent = Sent::default();
        let forwarded = client.forward(&mut conn.io, COMMAND_PEEK, |p| {
            sent = Sent::of(code, p, residue);
            Ok(Flow::Stop)
        });
        match forwarded.await {
            Ok(()) => {}
            // Half a command reached the server: the connection cannot be kept.
            Err(Fault::From(e)) => return Err(End::Broken(format!("reading a command: {e}"))),
            Err(Fault::To(e)) => {
                // The server would not take the command (a packet over its
                // max_allowed_packet): what it said before closing goes to the client.
                tracing::debug!(listener = %self.cfg.name, server = %server, error = %e,
                    "mysql server stopped reading a command");
                last_words(client, &mut conn.io).await;
                return Err(End::ServerGone);
            }
        }
        let resp = Response::new(code, shape, sent.cursor, caps);
        match relay::response(client, &mut conn.io, resp).await {
            Ok(reply) => {
                residue.reply(&reply);
                conn.after(code, &sent, &reply);
                Ok(reply)
            }
            Err(Fault::From(e)) if e.kind() == io::ErrorKind::InvalidData => {
                tracing::warn!(listener = %self.cfg.name, server = %server, error = %e,
                    "mysql response not understood; passing the session through unpooled \
                     to its end");
                Err(splice(client, &mut conn.io).await)
            }
            Err(Fault::From(e)) => {
                tracing::debug!(listener = %self.cfg.name, server = %server, error = %e,
                    "mysql server failed in a response");
                Err(End::ServerGone)
            }
            // Mid-response: the server connection is in an unknown state.
            Err(Fault::To(e)) => Err(End::Broken(format!("relaying a response: {e}"))),
        }
    }
}

/// Reads a command the pool does not relay, its code `code`: COM_QUIT (Ok(true), as for a
/// client that closed), or one without a response shape (COM_CHANGE_USER, ...), answered
/// with an ERR (Ok(false)).
async fn unrelayed<C>(client: &mut PacketIo<C>, code: u8) -> Result<bool, End>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let cmd = match client.read(MAX_PACKET).await {
        Ok(Some(cmd)) => cmd,
        Ok(None) => return Ok(true),
        Err(e) => return Err(End::Broken(format!("reading a command: {e}"))),
    };
    if code == COM_QUIT {
        return Ok(true);
    }
    let msg = format!(
        "waitless: command 0x{code:02x} is not supported through the pool; \
         reconnect instead of COM_CHANGE_USER"
    );
    let err = err_payload(ER_UNKNOWN_COM_ERROR, b"08S01", &msg);
    match client.send(cmd.seq.wrapping_add(1), &err).await {
        Ok(_) => Ok(false),
        Err(e) => Err(End::Broken(format!("answering a command: {e}"))),
    }
}

/// What the client or server did between commands.
enum Next {
    /// A client command arrived (its code).
    Command(u8),
    /// The session is over.
    End(End),
    /// The server sent bytes no command asked for.
    ServerSpoke,
}

/// How much of a command the relay looks at before passing it on: a statement longer than
/// this is taken as one that may leave state behind.
const COMMAND_PEEK: usize = 16 << 10;

/// What a relayed command was, as far as its bookkeeping goes.
#[derive(Debug, Default)]
pub struct Sent {
    /// COM_STMT_EXECUTE asked for a cursor.
    pub cursor: bool,
    /// COM_INIT_DB: the database.
    pub db: Option<Vec<u8>>,
    /// A statement text that may have changed the current database (USE, or unknown).
    pub schema_unknown: bool,
    /// COM_SET_OPTION: the option.
    pub option: Option<u16>,
}

impl Sent {
    fn of(code: u8, p: Head<'_>, residue: &mut Residue) -> Sent {
        let args = p.bytes.get(1..).unwrap_or_default();
        let effect = residue.command(code, args, p.bytes.len() == p.len);
        Sent {
            // The flags byte after the statement id: any cursor type.
            cursor: code == COM_STMT_EXECUTE && args.get(4).is_some_and(|f| f & 0x07 != 0),
            db: (code == COM_INIT_DB).then(|| args.to_vec()),
            schema_unknown: effect.is_some_and(|e| e != Effect::None),
            option: match (code, args) {
                (COM_SET_OPTION, [lo, hi, ..]) => Some(u16::from_le_bytes([*lo, *hi])),
                _ => None,
            },
        }
    }
}

/// Passes what a server sent before it went away on to the client (its ERR, usually).
async fn last_words<C, S>(client: &mut PacketIo<C>, server: &mut PacketIo<S>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let one = server.forward(client, PEEK, |_| Ok(Flow::Stop));
    let _ = tokio::time::timeout(LAST_WORDS, one).await;
}

/// How long a server that stopped reading a command is given to say why.
const LAST_WORDS: Duration = Duration::from_secs(1);

/// Passes bytes both ways, unlooked at, until both sides are done: for a session whose
/// server connection is no longer known to the relay.
async fn splice<C, S>(client: &mut PacketIo<C>, server: &mut PacketIo<S>) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let (c, early) = client.parts();
    let (s, late) = server.parts();
    let result = async {
        s.write_all(&early).await?;
        c.write_all(&late).await?;
        tokio::io::copy_bidirectional(c, s).await
    };
    match result.await {
        Ok(_) => End::ServerGone,
        Err(e) => End::Broken(format!("passing a session through: {e}")),
    }
}

/// Sends one last packet to a client and lets it go by policy.
async fn answer<C>(client: &mut PacketIo<C>, seq: u8, payload: &[u8]) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    match client.send(seq, payload).await {
        Ok(_) => End::Done(Reason::Done),
        Err(e) => End::Broken(format!("answering: {e}")),
    }
}
