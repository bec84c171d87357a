//! Server connections: opened and logged in as a configured user, lent to one client session
//! at a time, and reset before the next one (session pooling).

use std::io;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use mysql_common::constants::{CapabilityFlags, StatusFlags};
use mysql_common::io::ParseBuf;
use mysql_common::packets::{
    AuthPlugin, AuthSwitchRequest, ComChangeUser, ComChangeUserMoreData, HandshakePacket,
    HandshakeResponse,
};
use mysql_common::proto::MySerialize;
use mysql_common::scramble::scramble_native;
use tokio::io::{AsyncRead, AsyncWrite};

use super::packet::{describe_err, ok_fields, Packet, PacketIo, MAX_HANDSHAKE_PACKET, MAX_PACKET};
use super::relay::{Reply, COM_INIT_DB, COM_QUERY, COM_SET_OPTION};
use super::Sent;
use crate::close::ServerSocket;
use crate::config::MysqlUser;
use crate::connector::{Handshake, OpenError, Opening};
use crate::pool::PoolConn;

/// What a server says about itself in its greeting; clients are greeted alike.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Version string, e.g. `5.5.5-10.11.6-MariaDB-0+deb12u1`.
    pub version: Vec<u8>,
    /// Capabilities it offers.
    pub caps: CapabilityFlags,
    /// Its default collation.
    pub collation: u8,
    /// Its status flags (autocommit as its global has it).
    pub status: StatusFlags,
}

/// What a pooled connection must have been opened with to serve a client session: the
/// account, the command-phase capabilities (EOF vs OK terminators, multi-statements, session
/// tracking, ...) and the character set. Connections are only lent to an exact match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionKey {
    /// The account.
    pub user: String,
    /// Capabilities that shape the command phase, as the client negotiated them.
    pub caps: CapabilityFlags,
    /// The collation (and so character set) the client asked for.
    pub collation: u8,
}

/// An authenticated server connection.
#[derive(Debug)]
pub struct MysqlConn {
    /// The connection, framed.
    pub io: PacketIo<ServerSocket>,
    /// What it was opened for.
    pub key: SessionKey,
    /// The current database as far as waitless knows: None once a statement may have
    /// changed it (`USE`), Some(None) for no database.
    pub schema: Option<Option<Vec<u8>>>,
    /// The nonce its last authentication answered (COM_CHANGE_USER answers it again).
    nonce: Vec<u8>,
    /// The status flags of the server's last OK or terminator (autocommit, as the server
    /// has it): a client's login OK carries them.
    pub status: StatusFlags,
    /// Opened by `Greeting`: greeted, not logged in yet; lent to no one until `log_in`.
    greeted_only: bool,
    /// A transaction-pooled statement left its LAST_INSERT_ID here, unreset: a session that
    /// starts on it must not see another client's id (`forget_insert_id`).
    pub insert_id_left: bool,
}

/// The handshake of a new server connection: the login of one session's account, with its
/// capabilities, character set and database.
#[derive(Debug)]
pub struct Login<'a> {
    pub facts: &'a ServerFacts,
    pub user: &'a MysqlUser,
    pub key: &'a SessionKey,
    pub db: Option<&'a [u8]>,
}

/// Why no server connection could be had.
#[derive(Debug)]
pub enum BackendError {
    /// The server answered with ERR (payload kept for the client: access denied, too many
    /// connections, unknown database, ...).
    Server(Vec<u8>),
    /// Connecting, a timeout, or a protocol failure.
    Io(io::Error),
}

/// Per server: what its greeting said, and whether it knows COM_RESET_CONNECTION.
#[derive(Debug)]
pub struct ServerFacts {
    /// The last greeting's profile.
    pub profile: Mutex<Option<Profile>>,
    /// Cleared when the server refused COM_RESET_CONNECTION (MySQL < 5.7.3, MariaDB < 10.2.4):
    /// sessions are then reset with COM_CHANGE_USER.
    pub can_reset: AtomicBool,
}

/// Capabilities whose value changes what the command phase looks like (or what statements
/// mean); a pooled connection serves a client only if these match.
pub const SESSION_CAPS: CapabilityFlags = CapabilityFlags::from_bits_truncate(
    CapabilityFlags::CLIENT_FOUND_ROWS.bits()
        | CapabilityFlags::CLIENT_LONG_FLAG.bits()
        | CapabilityFlags::CLIENT_NO_SCHEMA.bits()
        | CapabilityFlags::CLIENT_ODBC.bits()
        | CapabilityFlags::CLIENT_LOCAL_FILES.bits()
        | CapabilityFlags::CLIENT_IGNORE_SPACE.bits()
        | CapabilityFlags::CLIENT_INTERACTIVE.bits()
        | CapabilityFlags::CLIENT_TRANSACTIONS.bits()
        | CapabilityFlags::CLIENT_MULTI_STATEMENTS.bits()
        | CapabilityFlags::CLIENT_MULTI_RESULTS.bits()
        | CapabilityFlags::CLIENT_PS_MULTI_RESULTS.bits()
        | CapabilityFlags::CLIENT_SESSION_TRACK.bits()
        | CapabilityFlags::CLIENT_DEPRECATE_EOF.bits(),
);

/// Capabilities every server login uses besides the session's.
const LOGIN_CAPS: CapabilityFlags = CapabilityFlags::from_bits_truncate(
    CapabilityFlags::CLIENT_LONG_PASSWORD.bits()
        | CapabilityFlags::CLIENT_PROTOCOL_41.bits()
        | CapabilityFlags::CLIENT_SECURE_CONNECTION.bits()
        | CapabilityFlags::CLIENT_PLUGIN_AUTH.bits(),
);

/// ER_UNKNOWN_COM_ERROR: the server does not know a command.
const ER_UNKNOWN_COM_ERROR: u16 = 1047;

const COM_RESET_CONNECTION: u8 = 0x1F;

/// What the server did to a session at login for the client's flags, which neither
/// COM_RESET_CONNECTION nor COM_CHANGE_USER does again: CLIENT_INTERACTIVE makes
/// `wait_timeout` the `interactive_timeout`, CLIENT_IGNORE_SPACE adds IGNORE_SPACE to
/// `sql_mode`.
fn login_effects(caps: CapabilityFlags) -> Option<&'static str> {
    let interactive = caps.contains(CapabilityFlags::CLIENT_INTERACTIVE);
    let ignore_space = caps.contains(CapabilityFlags::CLIENT_IGNORE_SPACE);
    match (interactive, ignore_space) {
        (false, false) => None,
        (true, false) => Some(INTERACTIVE),
        (false, true) => Some(IGNORE_SPACE),
        (true, true) => Some(BOTH),
    }
}

const INTERACTIVE: &str = "SET @@session.wait_timeout = @@session.interactive_timeout";
const IGNORE_SPACE: &str =
    "SET @@session.sql_mode = CONCAT_WS(',', NULLIF(@@session.sql_mode, ''), 'IGNORE_SPACE')";
const BOTH: &str = "SET @@session.wait_timeout = @@session.interactive_timeout, \
     @@session.sql_mode = CONCAT_WS(',', NULLIF(@@session.sql_mode, ''), 'IGNORE_SPACE')";

// === impl BackendError ===

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendError::Server(p) => {
                f.write_str(&describe_err(p, CapabilityFlags::CLIENT_PROTOCOL_41))
            }
            BackendError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<io::Error> for BackendError {
    fn from(e: io::Error) -> Self {
        BackendError::Io(e)
    }
}

// === impl ServerFacts ===

impl Default for ServerFacts {
    fn default() -> ServerFacts {
        ServerFacts::new()
    }
}

impl ServerFacts {
    pub fn new() -> ServerFacts {
        ServerFacts {
            profile: Mutex::new(None),
            can_reset: AtomicBool::new(true),
        }
    }

    pub fn profile(&self) -> Option<Profile> {
        self.profile
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_profile(&self, p: Profile) {
        *self.profile.lock().unwrap_or_else(|p| p.into_inner()) = Some(p);
    }
}

// === impl MysqlConn ===

impl PoolConn for MysqlConn {
    type ServerState = super::ServerState;

    fn is_usable(&mut self) -> bool {
        !self.greeted_only && !self.io.has_buffered() && self.io.get_mut().is_quiet()
    }
}

impl MysqlConn {
    /// The connection on this thread's reactor (`ServerSocket::rehomed`).
    pub fn rehomed(self) -> io::Result<MysqlConn> {
        let io = self.io.try_map(ServerSocket::rehomed)?;
        Ok(MysqlConn { io, ..self })
    }

    /// Completes the login of a connection opened by `Greeting`: as `login.user`, for
    /// `login.key`, into `login.db`, over TLS when the upstream has `tls`, by `at.deadline`.
    /// A server ERR (access denied, unknown database) is for the client.
    pub async fn log_in(
        self,
        login: &Login<'_>,
        at: &Opening<'_>,
    ) -> Result<MysqlConn, BackendError> {
        if !self.greeted_only {
            return Err(invalid("connection already logged in".into()));
        }
        let profile = login
            .facts
            .profile()
            .ok_or_else(|| invalid("no greeting known".into()))?;
        let logging_in = log_in_on(self.io, at, &profile, self.nonce, login);
        let by = tokio::time::Instant::from_std(at.deadline);
        let (io, nonce, status) = match tokio::time::timeout_at(by, logging_in).await {
            Ok(r) => r?,
            Err(_) => return Err(timed_out("login verdict", at.cfg.connect_timeout)),
        };
        Ok(MysqlConn {
            io,
            key: login.key.clone(),
            schema: Some(login.db.map(<[u8]>::to_vec)),
            nonce,
            status,
            greeted_only: false,
            insert_id_left: false,
        })
    }

    /// Keeps what waitless knows of the session up to date after a relayed command.
    pub fn after(&mut self, code: u8, sent: &Sent, reply: &Reply) {
        if let Some(status) = reply.status {
            self.status = status;
        }
        let ok = reply.head == Some(0x00);
        match code {
            COM_INIT_DB if ok => self.schema = Some(sent.db.clone()),
            // Multi-statements on (0) or off (1): no reset restores the option, so the
            // connection is pooled for clients that negotiated what it has now.
            COM_SET_OPTION if ok => match sent.option {
                Some(0) => self.key.caps |= CapabilityFlags::CLIENT_MULTI_STATEMENTS,
                Some(1) => self.key.caps -= CapabilityFlags::CLIENT_MULTI_STATEMENTS,
                _ => {}
            },
            _ if sent.schema_unknown => self.schema = None,
            _ => {}
        }
    }

    /// The status flags a client's login OK carries: the server's, as a login would show.
    pub fn login_status(&self) -> u16 {
        (self.status
            & (StatusFlags::SERVER_STATUS_AUTOCOMMIT
                | StatusFlags::SERVER_STATUS_NO_BACKSLASH_ESCAPES))
            .bits()
    }

    /// Makes `want` the current database: COM_INIT_DB, or COM_CHANGE_USER to have none
    /// (nothing else unselects a database). A server ERR (unknown database) is for the client.
    pub async fn use_schema(
        &mut self,
        user: &MysqlUser,
        want: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        if self.schema.as_ref().map(|s| s.as_deref()) == Some(want) {
            return Ok(());
        }
        match want {
            Some(db) => {
                let mut cmd = Vec::with_capacity(db.len() + 1);
                cmd.push(COM_INIT_DB);
                cmd.extend_from_slice(db);
                let reply = self.command(&cmd, timeout).await?;
                if reply.head() != Some(0x00) {
                    return Err(server_error(reply));
                }
                self.schema = Some(Some(db.to_vec()));
                Ok(())
            }
            None => self.change_user(user, None, timeout).await,
        }
    }

    /// Clears the session (transactions rolled back, temp tables, variables, locks and
    /// prepared statements gone), gives it back what the client's login flags did to it
    /// (neither reset keeps them), and leaves `home` as the current database, so that the
    /// next session of the same application usually needs no COM_INIT_DB. The commands go
    /// in one write: one wait for the server, not three.
    pub async fn reset(
        &mut self,
        user: &MysqlUser,
        home: Option<&[u8]>,
        facts: &ServerFacts,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        // Only COM_CHANGE_USER unselects a database, and it resets the session as well.
        let must_unselect = home.is_none() && self.schema != Some(None);
        if !facts.can_reset.load(Ordering::Relaxed) || must_unselect {
            return self.change_user(user, home, timeout).await;
        }
        // The reset keeps the current database (MariaDB and MySQL alike).
        let init_db = home.filter(|_| self.schema.as_ref().map(|s| s.as_deref()) != Some(home));
        let effects = login_effects(self.key.caps);
        let mut cmds: Vec<Vec<u8>> = vec![vec![COM_RESET_CONNECTION]];
        cmds.extend(effects.map(|sql| [&[COM_QUERY][..], sql.as_bytes()].concat()));
        cmds.extend(init_db.map(|db| [&[COM_INIT_DB][..], db].concat()));
        let replies = self.commands(&cmds, timeout).await?;
        let mut replies = replies.into_iter();
        let reset = replies
            .next()
            .ok_or_else(|| invalid("no reply to the reset".into()))?;
        match reset.head() {
            Some(0x00) => {}
            Some(0xFF) if err_code(&reset.payload) == Some(ER_UNKNOWN_COM_ERROR) => {
                facts.can_reset.store(false, Ordering::Relaxed);
                return self.change_user(user, home, timeout).await;
            }
            _ => return Err(server_error(reset)),
        }
        for reply in std::iter::once(reset).chain(replies) {
            if reply.head() != Some(0x00) {
                return Err(server_error(reply));
            }
            self.note_ok(&reply);
        }
        if init_db.is_some() {
            self.schema = Some(home.map(<[u8]>::to_vec));
        }
        self.insert_id_left = false;
        Ok(())
    }

    /// Sets LAST_INSERT_ID back to 0, as a fresh connection has it, when a
    /// transaction-pooled statement left one (`insert_id_left`); nothing otherwise.
    pub async fn forget_insert_id(&mut self, timeout: Duration) -> Result<(), BackendError> {
        if !self.insert_id_left {
            return Ok(());
        }
        let cmd = [&[COM_QUERY][..], b"DO LAST_INSERT_ID(0)"].concat();
        let replies = self.commands(&[cmd], timeout).await?;
        let reply = replies
            .into_iter()
            .next()
            .ok_or_else(|| invalid("no reply to DO LAST_INSERT_ID(0)".into()))?;
        if reply.head() != Some(0x00) {
            return Err(server_error(reply));
        }
        self.note_ok(&reply);
        self.insert_id_left = false;
        Ok(())
    }

    /// COM_CHANGE_USER to the same account: a full session reset with a fresh login, and the
    /// login flags' effects again.
    async fn change_user(
        &mut self,
        user: &MysqlUser,
        db: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        let scramble = scramble_native(&self.nonce, user.password.as_bytes());
        let cmd = ComChangeUser::new()
            .with_user(Some(user.user.as_bytes()))
            .with_database(db)
            .with_auth_plugin_data(scramble.as_ref().map(|s| &s[..]))
            .with_more_data(Some(
                ComChangeUserMoreData::new(u16::from(self.key.collation))
                    .with_auth_plugin(Some(AuthPlugin::MysqlNativePassword)),
            ));
        let mut buf = Vec::new();
        cmd.serialize(&mut buf);
        let io = &mut self.io;
        let login = async {
            io.send(0, &buf).await?;
            finish_login(io, user, &mut self.nonce).await
        };
        let status = match tokio::time::timeout(timeout, login).await {
            Ok(r) => r?,
            Err(_) => return Err(timed_out("COM_CHANGE_USER", timeout)),
        };
        self.status = status;
        self.schema = Some(db.map(<[u8]>::to_vec));
        if let Some(sql) = login_effects(self.key.caps) {
            let cmd = [&[COM_QUERY][..], sql.as_bytes()].concat();
            let reply = self.command(&cmd, timeout).await?;
            if reply.head() != Some(0x00) {
                return Err(server_error(reply));
            }
            self.note_ok(&reply);
        }
        Ok(())
    }

    /// Keeps the status flags of an OK the server sent to waitless's own command.
    fn note_ok(&mut self, ok: &Packet) {
        if let Some((status, _)) = ok_fields(&ok.payload) {
            self.status = status;
        }
    }

    /// Sends commands in one write (each with sequence 0) and reads their one-packet replies.
    async fn commands(
        &mut self,
        cmds: &[Vec<u8>],
        timeout: Duration,
    ) -> Result<Vec<Packet>, BackendError> {
        let io = &mut self.io;
        let exchange = async {
            for cmd in cmds {
                io.queue(0, cmd);
            }
            io.flush().await?;
            let mut replies = Vec::with_capacity(cmds.len());
            for _ in cmds {
                let reply = io.read(MAX_PACKET).await?.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection")
                })?;
                replies.push(reply);
            }
            Ok::<_, io::Error>(replies)
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(timed_out("a reply", timeout)),
        }
    }

    /// Sends a command (sequence 0) and reads its one-packet reply.
    async fn command(&mut self, payload: &[u8], timeout: Duration) -> Result<Packet, BackendError> {
        let io = &mut self.io;
        let exchange = async {
            io.send(0, payload).await?;
            io.read(MAX_PACKET).await?.ok_or_else(|| {
                io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection")
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(timed_out("a reply", timeout)),
        }
    }
}

// === impl Login ===

impl Handshake<MysqlConn> for Login<'_> {
    /// The server's ERR payload (access denied, unknown database, ...), for the client.
    type Refusal = Vec<u8>;

    /// The SSLRequest follows the server's greeting.
    const STARTS_TLS: bool = true;

    async fn greet(
        &self,
        io: ServerSocket,
        at: &Opening<'_>,
    ) -> Result<MysqlConn, OpenError<Vec<u8>>> {
        let logging_in = async {
            let mut io = PacketIo::new(io);
            let (profile, nonce) = read_greeting(&mut io).await?;
            self.facts.set_profile(profile.clone());
            log_in_on(io, at, &profile, nonce, self).await
        };
        let (io, nonce, status) = match logging_in.await {
            Ok(done) => done,
            Err(BackendError::Server(err)) => return Err(OpenError::Refused(err)),
            Err(BackendError::Io(e)) => return Err(OpenError::Io(e)),
        };
        Ok(MysqlConn {
            io,
            key: self.key.clone(),
            schema: Some(self.db.map(<[u8]>::to_vec)),
            nonce,
            status,
            greeted_only: false,
            insert_id_left: false,
        })
    }
}

/// The first half of a new server connection's handshake: the server's greeting only, for a
/// session whose client is yet to be greeted (the first after start-up, when no server's
/// greeting is known). Its login follows once the client has logged in (`log_in`), on the
/// same connection: knowing what to greet with costs the server no extra connection.
#[derive(Debug)]
pub struct Greeting<'a> {
    pub facts: &'a ServerFacts,
}

impl Handshake<MysqlConn> for Greeting<'_> {
    type Refusal = Vec<u8>;

    /// TLS, when the upstream has it, comes with the login (`log_in`).
    const STARTS_TLS: bool = true;

    async fn greet(
        &self,
        io: ServerSocket,
        _at: &Opening<'_>,
    ) -> Result<MysqlConn, OpenError<Vec<u8>>> {
        let mut io = PacketIo::new(io);
        let (profile, nonce) = match read_greeting(&mut io).await {
            Ok(read) => read,
            Err(BackendError::Server(err)) => return Err(OpenError::Refused(err)),
            Err(BackendError::Io(e)) => return Err(OpenError::Io(e)),
        };
        let status = profile.status;
        self.facts.set_profile(profile);
        Ok(MysqlConn {
            io,
            key: SessionKey::default(),
            schema: Some(None),
            nonce,
            status,
            greeted_only: true,
            insert_id_left: false,
        })
    }
}

/// The server's greeting: its profile and nonce. A greeting that is an ERR (too many
/// connections, host blocked) is the server's answer for the client.
async fn read_greeting<S>(io: &mut PacketIo<S>) -> Result<(Profile, Vec<u8>), BackendError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let greeting = io
        .read(MAX_HANDSHAKE_PACKET)
        .await?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no greeting"))?;
    if greeting.head() == Some(0xFF) {
        return Err(server_error(greeting));
    }
    let hs: HandshakePacket<'_> = ParseBuf(&greeting.payload)
        .parse(())
        .map_err(|e| invalid(format!("bad greeting: {e}")))?;
    if hs.protocol_version() != 10 {
        return Err(invalid(format!(
            "protocol version {} (only 10 is spoken)",
            hs.protocol_version()
        )));
    }
    let profile = Profile {
        version: hs.server_version_ref().to_vec(),
        caps: hs.capabilities(),
        collation: hs.default_collation(),
        status: hs.status_flags(),
    };
    Ok((profile, hs.nonce()))
}

/// The login that follows a greeting already read (`profile`, `nonce`): with `tls` on the
/// upstream, an SSLRequest and the TLS handshake first (a server that does not offer TLS is
/// an error: never plain text in its place), then HandshakeResponse41 with
/// mysql_native_password and the server's verdict. Returns the connection (TLS from now on,
/// when it started), the nonce the login answered and the status flags of its OK.
async fn log_in_on(
    mut io: PacketIo<ServerSocket>,
    at: &Opening<'_>,
    profile: &Profile,
    mut nonce: Vec<u8>,
    login: &Login<'_>,
) -> Result<(PacketIo<ServerSocket>, Vec<u8>, StatusFlags), BackendError> {
    let tls = at.wants_tls();
    let response = handshake_response(profile, &nonce, login.user, login.key, login.db, tls)?;
    let mut seq = 1;
    if tls {
        if !profile.caps.contains(CapabilityFlags::CLIENT_SSL) {
            return Err(invalid(format!(
                "server {} does not offer TLS (no CLIENT_SSL in its greeting), and upstream `{}` \
                 has tls: waitless does not log in to it in plain text",
                at.label, at.cfg.name
            )));
        }
        // The SSLRequest is the response's first 32 bytes (capabilities, max packet size,
        // collation, filler): the server reads the session's flags from it, not from the
        // response that follows over TLS.
        let request = response
            .get(..SSL_REQUEST_LEN)
            .ok_or_else(|| invalid("handshake response too short".into()))?;
        io.send(seq, request).await?;
        if io.has_buffered() {
            return Err(invalid(format!(
                "server {} sent more than its greeting before TLS",
                at.label
            )));
        }
        io = PacketIo::new(at.start_tls_on(io.into_inner()).await?);
        seq += 1;
    }
    io.send(seq, &response).await?;
    let status = finish_login(&mut io, login.user, &mut nonce).await?;
    Ok((io, nonce, status))
}

/// The length of an SSLRequest: HandshakeResponse41 up to the user name.
const SSL_REQUEST_LEN: usize = 32;

/// HandshakeResponse41 with mysql_native_password to a greeting (`profile`, `nonce`), for a
/// session of `key`; CLIENT_SSL with `tls`.
fn handshake_response(
    profile: &Profile,
    nonce: &[u8],
    user: &MysqlUser,
    key: &SessionKey,
    db: Option<&[u8]>,
    tls: bool,
) -> Result<Vec<u8>, BackendError> {
    let missing = key.caps - profile.caps;
    if !missing.is_empty() {
        // The server was replaced by one that cannot do what the client was promised.
        return Err(invalid(format!(
            "server no longer offers capabilities {missing:?}"
        )));
    }
    let mut caps = (key.caps | LOGIN_CAPS) & profile.caps;
    if tls {
        caps |= CapabilityFlags::CLIENT_SSL;
    }
    let scramble = scramble_native(nonce, user.password.as_bytes());
    let resp = HandshakeResponse::new(
        scramble.as_ref().map(|s| &s[..]),
        (0, 0, 0),
        Some(user.user.as_bytes()),
        db,
        Some(AuthPlugin::MysqlNativePassword),
        caps,
        None,
        MAX_PACKET as u32,
    );
    let mut buf = Vec::new();
    resp.serialize(&mut buf);
    // HandshakeResponse picks a collation from the server version; the session's is wanted
    // (byte 8: after the capabilities and the max packet size).
    if let Some(c) = buf.get_mut(8) {
        *c = key.collation;
    }
    Ok(buf)
}

/// Reads the server's verdict on a login (HandshakeResponse or COM_CHANGE_USER), answering
/// an AuthSwitchRequest to mysql_native_password; `nonce` follows a switch.
async fn finish_login(
    io: &mut PacketIo<ServerSocket>,
    user: &MysqlUser,
    nonce: &mut Vec<u8>,
) -> Result<StatusFlags, BackendError> {
    let mut switched = false;
    loop {
        let reply = io
            .read(MAX_HANDSHAKE_PACKET)
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed during login"))?;
        match reply.head() {
            Some(0x00) => {
                return Ok(ok_fields(&reply.payload).map_or(StatusFlags::empty(), |(s, _)| s))
            }
            Some(0xFF) => return Err(server_error(reply)),
            Some(0xFE) if !switched => {
                let req: AuthSwitchRequest<'_> = ParseBuf(&reply.payload)
                    .parse(())
                    .map_err(|e| invalid(format!("bad auth switch request: {e}")))?;
                if req.auth_plugin() != AuthPlugin::MysqlNativePassword {
                    return Err(invalid(format!(
                        "account `{}` uses auth plugin {}; waitless logs in to servers with \
                         mysql_native_password only",
                        user.user,
                        String::from_utf8_lossy(req.auth_plugin().as_bytes())
                    )));
                }
                *nonce = req.plugin_data().to_vec();
                let scramble = scramble_native(nonce, user.password.as_bytes());
                let answer = scramble.as_ref().map_or(&[][..], |s| &s[..]);
                io.send(reply.seq.wrapping_add(1), answer).await?;
                switched = true;
            }
            _ => {
                return Err(invalid(format!(
                    "unexpected packet 0x{:02x} during login",
                    reply.head().unwrap_or(0)
                )))
            }
        }
    }
}

/// The error code of an ERR payload.
pub fn err_code(payload: &[u8]) -> Option<u16> {
    match payload {
        [0xFF, lo, hi, ..] => Some(u16::from_le_bytes([*lo, *hi])),
        _ => None,
    }
}

fn server_error(p: Packet) -> BackendError {
    if p.head() == Some(0xFF) {
        BackendError::Server(p.payload.to_vec())
    } else {
        invalid(format!("unexpected reply 0x{:02x}", p.head().unwrap_or(0)))
    }
}

fn invalid(msg: String) -> BackendError {
    BackendError::Io(io::Error::new(io::ErrorKind::InvalidData, msg))
}

fn timed_out(what: &str, after: Duration) -> BackendError {
    BackendError::Io(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no {what} from the server within {after:?}"),
    ))
}
