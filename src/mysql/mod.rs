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
mod packet;
mod relay;
mod statement;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::close::{ClientPolicy, Ending, Ledger, Reason, SideLedger, Socket, Tracked};
use crate::config::{self, MysqlUser};
use crate::connector::{self, OpenError};
use crate::listener::{ListenerStats, Serve};
use crate::pool::{self, Server};
pub use backend::MysqlConn;
use backend::{BackendError, Profile, ServerFacts};
use front::{Login, Refused};
use packet::{err_payload, ok_payload, Packet, PacketIo, MAX_PACKET};
use relay::{Shape, COM_INIT_DB, COM_QUERY, COM_QUIT, COM_SET_OPTION};

/// An upstream of MySQL servers: the pools, and what each server said about itself.
#[derive(Debug)]
pub struct MysqlUpstream {
    /// Per-server pools of logged-in connections.
    pub pool: Arc<pool::Upstream<MysqlConn>>,
    /// Per server, in the pool's server order.
    facts: Vec<ServerFacts>,
    /// Per server: connections being reset after a session, soon idle again.
    resetting: Vec<AtomicUsize>,
    /// Woken whenever a connection goes back to a pool, for clients waiting for one.
    returned: Notify,
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
}

/// How long a waiting client sleeps between looks at a full pool when nothing is returned.
const RECHECK: Duration = Duration::from_millis(50);

const ER_CON_COUNT_ERROR: u16 = 1040;
/// CR_CONN_HOST_ERROR: "Can't connect to MySQL server", for an upstream with no server up.
const CR_CONN_HOST_ERROR: u16 = 2003;
const ER_UNKNOWN_COM_ERROR: u16 = 1047;
/// ER_UNKNOWN_ERROR: the catch-all for "waitless could not reach the server".
const ER_UNKNOWN_ERROR: u16 = 1105;

// === impl MysqlUpstream ===

impl MysqlUpstream {
    pub fn new(cfg: &config::Upstream, ledger: &Ledger, workers: usize) -> Arc<MysqlUpstream> {
        let pool = pool::Upstream::new(cfg, ledger, workers);
        let facts = pool.servers.iter().map(|_| ServerFacts::new()).collect();
        let resetting = pool.servers.iter().map(|_| AtomicUsize::new(0)).collect();
        Arc::new(MysqlUpstream {
            pool,
            facts,
            resetting,
            returned: Notify::new(),
        })
    }

    fn cfg(&self) -> &config::Upstream {
        &self.pool.cfg
    }

    /// A server for a new session and what to greet its client with: the first in rotation
    /// whose greeting is known, or the first that answers a probe.
    async fn pick(&self, listener: &str) -> Result<(usize, Profile), String> {
        // Servers that are up, in the balance policy's order; none when all are down.
        let order: Vec<usize> = self
            .pool
            .rotation()
            .filter_map(|s| self.pool.servers.iter().position(|x| Arc::ptr_eq(x, s)))
            .collect();
        if order.is_empty() {
            return Err("no server is up".into());
        }
        for &i in &order {
            if let Some(p) = self.facts.get(i).and_then(ServerFacts::profile) {
                return Ok((i, p));
            }
        }
        let mut last = String::from("no servers");
        for &i in &order {
            let (Some(server), Some(facts)) = (self.pool.servers.get(i), self.facts.get(i)) else {
                continue;
            };
            match backend::probe(self.cfg(), server, facts).await {
                Ok(p) => {
                    server.health.succeeded();
                    return Ok((i, p));
                }
                Err(e) => {
                    connector::failed(self.cfg(), server, &e, listener);
                    last = format!("{}: {e}", server.label);
                }
            }
        }
        Err(last)
    }

    /// The index of `server` among this upstream's (where its facts are kept).
    fn index_of(&self, server: &Arc<Server<MysqlConn>>) -> usize {
        self.pool
            .servers
            .iter()
            .position(|s| Arc::ptr_eq(s, server))
            .unwrap_or(usize::MAX)
    }

    /// A connection for `login` on server `index`: an idle one of the same session key with
    /// its database set, or a new one. When `max_connections` are open, idle connections of
    /// other keys are closed to make room, and then the client waits up to
    /// `connect_timeout` for one to come back.
    async fn checkout(
        &self,
        index: usize,
        login: &Login,
        listener: &str,
    ) -> Result<Lease, Checkout> {
        let cfg = self.cfg();
        let (Some(server), Some(facts)) = (self.pool.servers.get(index), self.facts.get(index))
        else {
            return Err(Checkout::Failed("no such server".into()));
        };
        let db = login.db.as_deref();
        let deadline = Instant::now() + cfg.connect_timeout;
        // Short sessions back to back: the connection the last one used is being reset and
        // is worth a brief wait rather than a new server connection.
        let mut waited_for_reset = false;
        loop {
            // Registered before looking, so that a connection returned meanwhile wakes us.
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            while let Some(mut pooled) = server.take_idle_matching(cfg, |c| c.key == login.key) {
                match pooled
                    .conn
                    .use_schema(&login.user, db, cfg.response_timeout)
                    .await
                {
                    Ok(()) => return Ok(Lease::new(pooled, server, &self.pool).0),
                    Err(BackendError::Server(err)) => {
                        // Unknown database, say: the connection itself is fine.
                        server.put(cfg, pooled);
                        return Err(Checkout::Server(err));
                    }
                    // Dropped: broken under our feet, try the next one.
                    Err(BackendError::Io(_)) => continue,
                }
            }
            let resetting = self
                .resetting
                .get(index)
                .map_or(0, |n| n.load(Ordering::Acquire));
            if resetting > 0 && !waited_for_reset {
                waited_for_reset = true;
                let _ = tokio::time::timeout(RECHECK, returned).await;
                continue;
            }
            let login_as = backend::Login {
                facts,
                user: &login.user,
                key: &login.key,
                db,
            };
            match connector::open(&self.pool, server, &login_as, Duration::ZERO, listener).await {
                Ok(pooled) => return Ok(Lease::new(pooled, server, &self.pool).0),
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

    /// Resets a lent connection and returns it to its pool; a connection that cannot be
    /// reset is closed instead.
    async fn give_back(&self, mut lease: Lease, login: &Login) {
        let cfg = self.cfg();
        let index = self.index_of(&lease.server);
        let (Some(facts), Some(resetting)) = (self.facts.get(index), self.resetting.get(index))
        else {
            return;
        };
        resetting.fetch_add(1, Ordering::AcqRel);
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
        self.returned.notify_waiters();
    }
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
        let mut client = PacketIo::new(Tracked::client(stream, self.ledger.clone(), policy));
        match self.session(&mut client, peer).await {
            End::Done(why) => client.into_inner().finish_client(Ending::Over(why)).await,
            End::Broken(e) => {
                tracing::debug!(listener = %self.cfg.name, peer = ?peer, error = %e,
                    "mysql client connection failed");
                // Dropped: the close mechanism records an error (or the client's close).
                drop(client);
            }
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
        }
    }

    fn policy(&self) -> ClientPolicy {
        self.cfg.close_policy()
    }

    /// Login, borrow, commands, give back.
    async fn session<C>(&self, client: &mut PacketIo<C>, peer: Option<SocketAddr>) -> End
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let up = &self.upstream;
        let (index, profile) = match up.pick(&self.cfg.name).await {
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
        let host = peer.map_or_else(|| "localhost".to_string(), |p| p.ip().to_string());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // A login must complete within header_timeout: a client that stalls mid-handshake
        // would otherwise hold its connection for ever.
        let accepting = front::accept(client, &profile, &self.users, &host, id);
        let login = match tokio::time::timeout(self.cfg.header_timeout, accepting).await {
            Ok(Ok(login)) => login,
            Ok(Err(Refused::Answered(msg))) => {
                tracing::info!(listener = %self.cfg.name, peer = ?peer, "{msg}");
                return End::Done(Reason::Done);
            }
            Ok(Err(Refused::Io(e))) => return End::Broken(format!("login: {e}")),
            Err(_) => {
                tracing::info!(listener = %self.cfg.name, peer = ?peer,
                    timeout = ?self.cfg.header_timeout, "login not completed in time; closing");
                return End::Done(Reason::Idle);
            }
        };

        let lease = match up.checkout(index, &login, &self.cfg.name).await {
            Ok(lease) => lease,
            Err(Checkout::Busy) => {
                self.stats.errors_busy.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(listener = %self.cfg.name, upstream = %up.cfg().name,
                    "all mysql server connections busy (max_connections)");
                let err = err_payload(ER_CON_COUNT_ERROR, b"08004", "Too many connections");
                return answer(client, login.seq, &err).await;
            }
            Err(Checkout::Server(err)) => return answer(client, login.seq, &err).await,
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
        if let Err(e) = client
            .send(login.seq, &ok_payload(backend::default_status()))
            .await
        {
            up.give_back(lease, &login).await;
            return End::Broken(format!("login OK: {e}"));
        }
        self.commands(client, lease, &login).await
    }

    /// The command phase: until COM_QUIT, EOF, idle timeout or an error.
    async fn commands<C>(&self, client: &mut PacketIo<C>, mut lease: Lease, login: &Login) -> End
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let up = &self.upstream;
        // The session changed something a reset does not undo: the connection is not kept.
        let mut tainted = false;
        let end = loop {
            let cmd =
                match tokio::time::timeout(self.cfg.keepalive_timeout, client.read(MAX_PACKET))
                    .await
                {
                    Err(_) => break End::Done(Reason::Idle),
                    Ok(Ok(None)) => break End::Done(Reason::Done),
                    Ok(Ok(Some(cmd))) => cmd,
                    // The server connection is idle between commands: it can still be kept.
                    Ok(Err(e)) => break End::Broken(format!("reading a command: {e}")),
                };
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let Some(head) = cmd.head() else {
                break End::Broken("empty command packet".into());
            };
            if head == COM_QUIT {
                // Answered here: the server connection stays open for the next session.
                break End::Done(Reason::Done);
            }
            let Some(shape) = Shape::of(head) else {
                let msg = format!(
                    "waitless: command 0x{head:02x} is not supported through the pool; \
                     reconnect instead of COM_CHANGE_USER"
                );
                let err = err_payload(ER_UNKNOWN_COM_ERROR, b"08S01", &msg);
                if let Err(e) = client.send(cmd.seq.wrapping_add(1), &err).await {
                    break End::Broken(format!("answering a command: {e}"));
                }
                continue;
            };
            let conn = &mut lease.pooled.conn;
            let caps = conn.key.caps;
            match relay::command(client, &mut conn.io, &cmd, shape, caps).await {
                Ok(reply) => track_state(conn, &cmd, reply.head, &mut tainted),
                Err(e) => {
                    // Mid-response: the server connection is in an unknown state. Dropped,
                    // it is closed (RST) and its permit freed.
                    tracing::debug!(listener = %self.cfg.name, server = %lease.server.label,
                        error = %e, "mysql command relay failed");
                    drop(lease);
                    up.returned.notify_waiters();
                    return End::Broken(format!("relaying a command: {e}"));
                }
            }
        };
        if tainted {
            lease.pooled.ctl.retire(Reason::Done);
            drop(lease);
            up.returned.notify_waiters();
        } else {
            up.give_back(lease, login).await;
        }
        end
    }
}

/// Keeps what waitless knows of a connection's session state up to date after a command.
fn track_state(conn: &mut MysqlConn, cmd: &Packet, head: Option<u8>, tainted: &mut bool) {
    match cmd.head() {
        Some(COM_INIT_DB) if head == Some(0x00) => {
            conn.schema = Some(cmd.payload.get(1..).map(<[u8]>::to_vec));
        }
        // `USE` may have run; known again after the next COM_INIT_DB or reset.
        Some(COM_QUERY) | Some(0x17) => conn.schema = None,
        // Multi-statements on or off: a capability of the connection no reset restores.
        Some(COM_SET_OPTION) => *tainted = true,
        _ => {}
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
