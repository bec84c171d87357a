//! Transaction pooling (`pooling = "transaction"`): a logged-in client holds no server
//! connection between its statements. Each statement in autocommit borrows one of its key's
//! (user, capabilities, character set; the client's current database set on it as
//! checkout does) and gives it back after its response; a transaction keeps its connection
//! from the statement that opens it until the status flags of a response say no transaction
//! is open. Connections are given back without a reset: they are clean by construction, as
//! only statements that leave nothing on the connection run unpinned (`statement::pin`).
//!
//! Anything else pins the client to the connection it holds for the rest of its session,
//! which then goes on as in session pooling (`MysqlListener::commands`) and ends with a
//! reset. The same happens after a response with warnings or an error (`SHOW WARNINGS`
//! must find them), and after one whose status says the session state changed
//! (SERVER_SESSION_STATE_CHANGED, for clients that asked for session tracking). When a
//! session is pinned, the client's own LAST_INSERT_ID — from the last OK relayed to it,
//! maybe from another connection — is set on its connection first.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use mysql_common::constants::StatusFlags;
use tokio::io::{AsyncRead, AsyncWrite};

use super::front::Login;
use super::packet::{err_payload, PacketIo, MAX_PACKET};
use super::relay::{Shape, COM_INIT_DB, COM_QUERY, COM_QUIT};
use super::residue::Residue;
use super::{
    splice, statement, unrelayed, Checkout, End, Lease, MysqlListener, MysqlServer, Next,
    COMMAND_PEEK, ER_CON_COUNT_ERROR, ER_UNKNOWN_ERROR,
};
use crate::close::Reason;

/// Why a transaction-pooled client was pinned to its server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// A user variable (`@v`).
    Variable,
    /// A SET statement (session variables, names, autocommit, transaction options).
    Set,
    /// A temporary table created or dropped.
    TempTable,
    /// A prepared statement (COM_STMT_PREPARE, PREPARE, EXECUTE).
    Prepared,
    /// A lock that outlives its statement: GET_LOCK, LOCK TABLES, FLUSH … WITH READ LOCK.
    Lock,
    /// SQL_CALC_FOUND_ROWS, FOUND_ROWS() or ROW_COUNT(): they read the previous statement's.
    FoundRows,
    /// HANDLER.
    Handler,
    /// XA.
    Xa,
    /// LAST_INSERT_ID(): it reads (or, with an argument, sets) the session's.
    LastInsertId,
    /// USE: the current database is then the server's to know.
    Schema,
    /// A command other than COM_QUERY, COM_INIT_DB, COM_PING and COM_QUIT.
    Command,
    /// The server said the session state changed (SERVER_SESSION_STATE_CHANGED).
    StateChanged,
    /// A warning or an error, which `SHOW WARNINGS` lists on that connection only.
    Diagnostics,
    /// Any other statement: not known to leave nothing behind.
    Statement,
    /// A statement too long, or written so, that its text cannot be read as the server
    /// reads it.
    Unread,
}

/// Transaction pooling's counters, per listener.
#[derive(Debug, Default)]
pub struct MuxStats {
    /// Client sessions logged in now.
    pub sessions: AtomicUsize,
    /// Server connections lent to its clients now (for a statement, a transaction or a
    /// pinned session).
    pub in_use: AtomicUsize,
    /// Server connections lent so far.
    pub lends: AtomicU64,
    /// Sessions pinned now.
    pub pinned: AtomicUsize,
    /// Sessions pinned so far, by reason (in `Pin::ALL`'s order).
    pins: [AtomicU64; Pin::ALL.len()],
}

/// Counts one in a gauge for as long as it lives.
struct Gauge<'a>(&'a AtomicUsize);

/// A server connection a transaction-pooled client holds.
struct Held<'a> {
    lease: Lease,
    /// Its place in `MuxStats::in_use`.
    _in_use: Gauge<'a>,
    /// The connection's LAST_INSERT_ID is the client's own (set by a statement of its
    /// own on it since it was borrowed).
    own_insert_id: bool,
}

/// What waitless carries of a transaction-pooled client from connection to connection.
struct Carried {
    /// The current database (COM_INIT_DB moves it; USE pins).
    schema: Option<Vec<u8>>,
    /// The last insert id an OK relayed to the client gave, as LAST_INSERT_ID() keeps it.
    insert_id: u64,
}

// === impl Pin ===

impl Pin {
    pub const ALL: [Pin; 15] = [
        Pin::Variable,
        Pin::Set,
        Pin::TempTable,
        Pin::Prepared,
        Pin::Lock,
        Pin::FoundRows,
        Pin::Handler,
        Pin::Xa,
        Pin::LastInsertId,
        Pin::Schema,
        Pin::Command,
        Pin::StateChanged,
        Pin::Diagnostics,
        Pin::Statement,
        Pin::Unread,
    ];

    /// Its label in /stats and /metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Pin::Variable => "user_variable",
            Pin::Set => "set",
            Pin::TempTable => "temporary_table",
            Pin::Prepared => "prepared_statement",
            Pin::Lock => "lock",
            Pin::FoundRows => "found_rows",
            Pin::Handler => "handler",
            Pin::Xa => "xa",
            Pin::LastInsertId => "last_insert_id",
            Pin::Schema => "use",
            Pin::Command => "command",
            Pin::StateChanged => "state_changed",
            Pin::Diagnostics => "diagnostics",
            Pin::Statement => "statement",
            Pin::Unread => "unread",
        }
    }
}

// === impl MuxStats ===

impl MuxStats {
    /// Sessions pinned so far, by reason, for every reason.
    pub fn pins(&self) -> impl Iterator<Item = (Pin, u64)> + '_ {
        Pin::ALL
            .iter()
            .zip(&self.pins)
            .map(|(p, n)| (*p, n.load(Ordering::Relaxed)))
    }

    fn pinned_for(&self, pin: Pin) {
        if let Some(i) = Pin::ALL.iter().position(|p| *p == pin) {
            if let Some(n) = self.pins.get(i) {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

// === impl Gauge ===

impl<'a> Gauge<'a> {
    fn up(gauge: &'a AtomicUsize) -> Gauge<'a> {
        gauge.fetch_add(1, Ordering::Relaxed);
        Gauge(gauge)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl MysqlListener ===

impl MysqlListener {
    /// The command phase of a transaction-pooled client logged in on `server`, its
    /// socket `fd`: until COM_QUIT, EOF, idle timeout or an error, or until it is pinned and
    /// its session goes on in `commands`.
    pub(super) async fn transactions<C>(
        &self,
        client: &mut PacketIo<C>,
        mut server: Arc<MysqlServer>,
        fd: RawFd,
        login: &Login,
    ) -> End
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let stats = &self.stats.mysql;
        let _session = Gauge::up(&stats.sessions);
        let mut carried = Carried {
            schema: login.db.clone(),
            insert_id: 0,
        };
        let mut held: Option<Held<'_>> = None;
        loop {
            let code = match held.as_mut() {
                // In a transaction: the server may speak meanwhile (KILL, wait_timeout).
                Some(h) => match self.next_command(client, &mut h.lease.pooled.conn).await {
                    Next::Command(code) => code,
                    Next::End(End::ServerGone) => return End::ServerGone,
                    Next::End(end) => {
                        self.let_go(held, login).await;
                        return end;
                    }
                    Next::ServerSpoke => {
                        tracing::info!(listener = %self.cfg.name, server = %h.lease.server.label,
                            "mysql server spoke between commands; passing the session \
                             through unpooled to its end");
                        // The connection is dropped after: its state is unknown.
                        return splice(client, &mut h.lease.pooled.conn.io).await;
                    }
                },
                None => match self.idle_command(client).await {
                    Ok(code) => code,
                    Err(end) => return end,
                },
            };
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let Some(shape) = Shape::of(code).filter(|_| code != COM_QUIT) else {
                match unrelayed(client, code).await {
                    Ok(true) => break,
                    Ok(false) => continue,
                    Err(end) => {
                        self.let_go(held, login).await;
                        return end;
                    }
                }
            };
            let pin = match self.judge(client, code).await {
                Ok(pin) => pin,
                Err(e) => {
                    self.let_go(held, login).await;
                    return End::Broken(format!("reading a command: {e}"));
                }
            };
            let mut h = match held.take() {
                Some(h) => h,
                None => match self.borrow(&mut server, login, &carried).await {
                    Ok(h) => h,
                    Err(refusal) => match self.refuse(client, &refusal).await {
                        Ok(()) => continue,
                        Err(end) => return end,
                    },
                },
            };
            if let Some(pin) = pin {
                return self.pin(client, h, fd, login, &carried, pin).await;
            }
            // What an unpinned statement leaves is nothing, by `judge`.
            let mut residue = Residue::default();
            let exchanged = self.exchange(client, &mut h.lease, code, shape, &mut residue);
            let reply = match exchanged.await {
                Ok(reply) => reply,
                Err(end) => return end,
            };
            if code == COM_INIT_DB && reply.head == Some(0x00) {
                carried.schema = h.lease.pooled.conn.schema.clone().flatten();
            }
            if reply.insert_id != 0 {
                carried.insert_id = reply.insert_id;
                h.own_insert_id = true;
                h.lease.pooled.conn.insert_id_left = true;
            }
            let status = reply.status.unwrap_or_else(StatusFlags::empty);
            let after = if reply.failed || reply.warnings > 0 {
                Some(Pin::Diagnostics)
            } else if status.contains(StatusFlags::SERVER_SESSION_STATE_CHANGED)
                && code != COM_INIT_DB
            {
                Some(Pin::StateChanged)
            } else {
                None
            };
            if let Some(pin) = after {
                return self.pin(client, h, fd, login, &carried, pin).await;
            }
            if status.intersects(
                StatusFlags::SERVER_STATUS_IN_TRANS | StatusFlags::SERVER_STATUS_IN_TRANS_READONLY,
            ) {
                held = Some(h);
            } else {
                self.upstream.put_back(h.lease);
            }
        }
        self.let_go(held, login).await;
        End::Done(Reason::Done)
    }

    /// Waits for a command from a client that holds no server connection.
    async fn idle_command<C>(&self, client: &mut PacketIo<C>) -> Result<u8, End>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        match tokio::time::timeout(self.cfg.keepalive_timeout, client.next_head()).await {
            Ok(Ok(Some(code))) => Ok(code),
            Ok(Ok(None)) => Err(End::Done(Reason::Done)),
            Ok(Err(e)) => Err(End::Broken(format!("reading a command: {e}"))),
            Err(_) => Err(End::Done(Reason::Idle)),
        }
    }

    /// Whether the client's next command (its code `code`, the packet still buffered) pins
    /// it: its statement text is read up to COMMAND_PEEK bytes.
    async fn judge<C>(&self, client: &mut PacketIo<C>, code: u8) -> io::Result<Option<Pin>>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        Ok(match code {
            COM_QUERY => {
                let (head, complete) = client.peek_packet(COMMAND_PEEK).await?;
                if complete {
                    statement::pin(head.get(1..).unwrap_or_default())
                } else {
                    Some(Pin::Unread)
                }
            }
            // COM_PING
            COM_INIT_DB | 0x0E => None,
            _ => Some(Pin::Command),
        })
    }

    /// A server connection for the client's next statement, with its database. Between
    /// transactions the client carries no state on a server: once its `server` left DNS it
    /// moves to one that greets as that one did.
    async fn borrow<'a>(
        &'a self,
        server: &mut Arc<MysqlServer>,
        login: &Login,
        carried: &Carried,
    ) -> Result<Held<'a>, Checkout> {
        let stats = &self.stats.mysql;
        let up = &self.upstream;
        if server.is_drained() {
            if let Some(next) = up.successor(server) {
                *server = next;
            }
        }
        let schema = carried.schema.as_deref();
        let (lease, _) = up
            .checkout(server, login, schema, None, &self.cfg.name)
            .await?;
        stats.lends.fetch_add(1, Ordering::Relaxed);
        Ok(Held {
            lease,
            _in_use: Gauge::up(&stats.in_use),
            own_insert_id: false,
        })
    }

    /// Answers the client's command, read now, with why no server connection was had.
    async fn refuse<C>(&self, client: &mut PacketIo<C>, refusal: &Checkout) -> Result<(), End>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let up = &self.upstream;
        let cmd = match client.read(MAX_PACKET).await {
            Ok(Some(cmd)) => cmd,
            Ok(None) => return Err(End::Done(Reason::Done)),
            Err(e) => return Err(End::Broken(format!("reading a command: {e}"))),
        };
        let err = match refusal {
            Checkout::Busy => {
                self.stats.errors_busy.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(listener = %self.cfg.name, upstream = %up.cfg().name,
                    "all mysql server connections busy (max_connections)");
                err_payload(ER_CON_COUNT_ERROR, b"08004", "Too many connections")
            }
            Checkout::Server(err) => err.clone(),
            Checkout::Failed(e) => {
                self.stats.errors_connect.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(listener = %self.cfg.name, upstream = %up.cfg().name, error = %e,
                    "cannot open a mysql server connection");
                let msg = format!(
                    "waitless: cannot connect to upstream {}: {e}",
                    up.cfg().name
                );
                err_payload(ER_UNKNOWN_ERROR, b"HY000", &msg)
            }
        };
        match client.send(cmd.seq.wrapping_add(1), &err).await {
            Ok(_) => Ok(()),
            Err(e) => Err(End::Broken(format!("answering a command: {e}"))),
        }
    }

    /// Pins the client to the connection it holds for the rest of its session, which goes
    /// on as a session-pooled one and ends with a reset.
    async fn pin<C>(
        &self,
        client: &mut PacketIo<C>,
        mut h: Held<'_>,
        fd: RawFd,
        login: &Login,
        carried: &Carried,
        pin: Pin,
    ) -> End
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let stats = &self.stats.mysql;
        stats.pinned_for(pin);
        let _pinned = Gauge::up(&stats.pinned);
        tracing::debug!(listener = %self.cfg.name, reason = pin.as_str(),
            "mysql client pinned to its server connection");
        if !h.own_insert_id {
            let timeout = self.upstream.cfg().response_timeout;
            if let Err(e) =
                set_insert_id(&mut h.lease.pooled.conn.io, carried.insert_id, timeout).await
            {
                tracing::debug!(listener = %self.cfg.name, server = %h.lease.server.label,
                    error = %e, "setting a pinned client's LAST_INSERT_ID failed");
                return End::ServerGone;
            }
        }
        let server = h.lease.server.clone();
        let place = Some(server.state.lent.enter(fd));
        let Held { lease, _in_use, .. } = h;
        self.commands(client, lease, place, login, Residue::pinned())
            .await
    }

    /// Gives back a connection a client held when it left: mid-transaction, so reset.
    async fn let_go(&self, held: Option<Held<'_>>, login: &Login) {
        if let Some(h) = held {
            let Held { lease, _in_use, .. } = h;
            self.upstream.give_back(lease, login, None).await;
        }
    }
}

/// `DO LAST_INSERT_ID(id)` on a connection: LAST_INSERT_ID() then returns the client's own.
async fn set_insert_id<S>(
    io: &mut PacketIo<S>,
    id: u64,
    timeout: std::time::Duration,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cmd = format!("\u{3}DO LAST_INSERT_ID({id})");
    let exchange = async {
        io.send(0, cmd.as_bytes()).await?;
        io.read(MAX_PACKET).await
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(Some(reply))) if reply.head() == Some(0x00) => Ok(()),
        Ok(Ok(_)) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no OK to DO LAST_INSERT_ID",
        )),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "DO LAST_INSERT_ID")),
    }
}
