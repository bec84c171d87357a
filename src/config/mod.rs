//! The configuration model and its validation.
//!
//! A config is read from TOML. Every error names the file, the line and the key, because an
//! operator who restarts a proxy at 3 a.m. should not have to guess which of forty lines is
//! wrong. Syntax and type errors come from the TOML deserializer (which knows the line); errors
//! found by validation afterwards (a listener naming a missing upstream, duplicate names, ...)
//! are located by looking the offending key up in a span-keeping parse of the same text.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this config was read from (for messages and reloads).
    pub source: PathBuf,
    /// Worker threads of the runtime; 0 = one per core.
    pub workers: usize,
    /// On SIGTERM, how long requests and sessions in flight may take to finish.
    pub drain_timeout: Duration,
    /// The admin listener (metrics, stats, health).
    pub admin: Admin,
    /// Client-facing listeners.
    pub listeners: Vec<Listener>,
    /// Backend groups the listeners forward to.
    pub upstreams: Vec<Upstream>,
    /// Accounts of mysql listeners (`[[mysql_user]]`).
    pub mysql_users: Vec<MysqlUser>,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Where /metrics, /stats and /healthz are served; None disables the admin listener.
    pub listen: Option<SocketAddr>,
}

/// Where a listener accepts or a server is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `HOST:PORT` or `[V6]:PORT`, resolved once at load time.
    Tcp(SocketAddr),
    /// `unix:/path`.
    Unix(PathBuf),
}

/// The protocol a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    Http,
    Tcp,
    Mysql,
}

/// Client side close policy: where TIME_WAIT lands for client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientTimeWait {
    /// Wait up to `linger` for the client's FIN, then close passively: TIME_WAIT on the client.
    #[default]
    Client,
    /// Close first with FIN: TIME_WAIT on the proxy.
    Proxy,
    /// RST once every sent byte is acknowledged: TIME_WAIT nowhere.
    None,
}

/// What to do when `linger` runs out before the client closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LingerFallback {
    #[default]
    Fin,
    Reset,
}

/// Upstream side close policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamTimeWait {
    /// waitless retires pooled connections itself with FIN; a server FIN is answered with RST.
    #[default]
    Proxy,
    /// Every close of a pooled connection is RST after the send queue drained.
    None,
}

/// The PROXY protocol header sent to upstream servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProxyProtocol {
    /// No header: servers see waitless's address.
    #[default]
    Off,
    /// The text header (`PROXY TCP4 ...`).
    V1,
    /// The binary header.
    V2,
}

/// `[[listener]]`.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Unique name, used in metrics and logs.
    pub name: String,
    /// Where to accept.
    pub listen: Address,
    /// The protocol spoken on accepted connections.
    pub protocol: Protocol,
    /// Name of the `[[upstream]]` requests go to.
    pub upstream: String,
    /// Who closes first on client connections.
    pub time_wait: ClientTimeWait,
    /// How long to wait for the client's FIN (client) or for the send queue to drain (none).
    pub linger: Duration,
    /// Close used when linger runs out.
    pub linger_fallback: LingerFallback,
    /// How long an idle keep-alive client connection is kept open between requests.
    pub keepalive_timeout: Duration,
    /// File mode of a unix socket listener (e.g. 0o660).
    pub mode: Option<u32>,
    /// Clients (a load balancer) send a PROXY protocol header first; its addresses are used.
    pub accept_proxy_protocol: bool,
    /// Most client connections open at once; beyond it 503 (http), ERR 1040 (mysql), close
    /// (tcp). 0 = unlimited.
    pub max_clients: usize,
    /// Bound on receiving a request head once its first byte arrived (slow-header clients).
    pub header_timeout: Duration,
    /// TCP_DEFER_ACCEPT: a client connection is accepted when its first bytes arrive, so
    /// serving it starts with a read that finds the request (no wait for readiness). Only for
    /// protocols whose client speaks first; default on for http over TCP.
    pub defer_accept: bool,
}

/// How an upstream picks a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// In turn, in proportion to the weights.
    #[default]
    RoundRobin,
    /// The server with the fewest connections in use (relative to its weight).
    LeastConn,
}

/// What an active health check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckKind {
    /// A TCP connect.
    #[default]
    Tcp,
    /// An HTTP GET of `path`, expecting 2xx or 3xx.
    Http,
}

/// `health_check = { kind, path, interval }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub path: String,
    pub interval: Duration,
}

/// `[[upstream]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// Unique name, referenced by listeners.
    pub name: String,
    /// The servers, tried round-robin.
    pub servers: Vec<Address>,
    /// Most idle keep-alive connections kept per server (>= 1).
    pub pool_size: usize,
    /// Most connections open per server; 0 = unlimited.
    pub max_connections: usize,
    /// Idle pooled connections are closed by waitless after this.
    pub idle_timeout: Duration,
    /// Bound on establishing a connection to a server.
    pub connect_timeout: Duration,
    /// Bound on waiting for a response's head once the request was sent.
    pub response_timeout: Duration,
    /// Pooled connections are retired after this age; None = never.
    pub max_lifetime: Option<Duration>,
    /// Pooled connections are retired after this many requests; 0 = unlimited.
    pub max_requests: u64,
    /// The server's own keep-alive timeout, if known (check warns when idle_timeout >= it).
    pub server_keepalive: Option<Duration>,
    /// Who closes first on pooled connections.
    pub time_wait: UpstreamTimeWait,
    /// Fresh, never-used connections kept open per server (tcp listeners).
    pub preconnect: usize,
    /// PROXY protocol header sent first on each server connection (tcp listeners).
    pub proxy_protocol: ProxyProtocol,
    /// How a server is picked.
    pub balance: Balance,
    /// Per server, in `servers` order (all 1 when absent).
    pub weights: Vec<u32>,
    /// Consecutive failed connects (or timeouts) that mark a server down.
    pub fail_threshold: u32,
    /// How long a server marked down is skipped before it is tried again.
    pub fail_backoff: Duration,
    /// Optional active checks.
    pub health_check: Option<HealthCheck>,
}

/// `[[mysql_user]]`: an account that clients of mysql listeners log in as and that waitless
/// logs in to the servers with: the same name and password on both sides.
#[derive(Clone, PartialEq, Eq)]
pub struct MysqlUser {
    /// The account name.
    pub user: String,
    /// The password, from the file or from the environment.
    pub password: String,
    /// The environment variable the password was read from, if it came from one.
    pub password_env: Option<String>,
}

/// A config that could not be loaded, with where it went wrong.
#[derive(Debug, Clone)]
pub struct ConfigError {
    /// The file, as given.
    pub file: PathBuf,
    /// 1-based line of the offending key, when known.
    pub line: Option<usize>,
    /// Dotted path of the offending key, e.g. `listener[0].upstream`, when known.
    pub key: Option<String>,
    /// What is wrong, in a sentence.
    pub message: String,
}

// Defaults live here, once, so the parser, the printer and config/waitless.toml cannot disagree.

/// `[admin] listen` when the key is absent.
const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9901));
/// `linger` when absent.
const DEFAULT_LINGER: Duration = Duration::from_secs(2);
/// `keepalive_timeout` when absent.
const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// `pool_size` when absent.
const DEFAULT_POOL_SIZE: usize = 64;
/// `idle_timeout` when absent: below nginx's default 75 s keep-alive, so waitless, not the
/// server, closes an idle pooled connection.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// `connect_timeout` when absent.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// `response_timeout` when absent.
const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// `drain_timeout` when absent.
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// `header_timeout` when absent: generous for real clients, short for slowloris.
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// `max_clients` when absent: far above what one proxy process should hold, below the fd
/// limit a systemd unit sets (LimitNOFILE=1048576), so the limit answers before accept fails.
const DEFAULT_MAX_CLIENTS: usize = 100_000;
/// `fail_threshold` when absent.
const DEFAULT_FAIL_THRESHOLD: u32 = 3;
/// `fail_backoff` when absent.
const DEFAULT_FAIL_BACKOFF: Duration = Duration::from_secs(10);
/// `health_check.interval` when absent.
const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// The file as written, before defaults and cross-checks.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// `workers`.
    workers: Option<usize>,
    drain_timeout: Option<RawDuration>,
    /// `[admin]`.
    admin: Option<RawAdmin>,
    /// `[[listener]]` tables, in file order (validation names them by index).
    #[serde(default)]
    listener: Vec<RawListener>,
    /// `[[upstream]]` tables, in file order.
    #[serde(default)]
    upstream: Vec<RawUpstream>,
    /// `[[mysql_user]]` tables, in file order.
    #[serde(default)]
    mysql_user: Vec<RawMysqlUser>,
}

/// `[admin]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    /// `listen`; absent means the default address.
    listen: Option<RawAdminListen>,
}

/// `[[listener]]` as written; the fields mirror [`Listener`], None where the key is absent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: String,
    listen: RawAddress,
    protocol: Option<RawWord<Protocol>>,
    upstream: String,
    time_wait: Option<RawWord<ClientTimeWait>>,
    linger: Option<RawDuration>,
    linger_fallback: Option<RawWord<LingerFallback>>,
    keepalive_timeout: Option<RawDuration>,
    mode: Option<RawMode>,
    accept_proxy_protocol: Option<bool>,
    max_clients: Option<usize>,
    header_timeout: Option<RawDuration>,
    defer_accept: Option<bool>,
}

/// `[[upstream]]` as written; the fields mirror [`Upstream`], None where the key is absent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    /// Kept as spanned strings: the deserializer blames the whole array for an element's
    /// error, and a bad server should be reported at its own line.
    servers: Vec<toml::Spanned<String>>,
    pool_size: Option<usize>,
    max_connections: Option<usize>,
    idle_timeout: Option<RawDuration>,
    connect_timeout: Option<RawDuration>,
    response_timeout: Option<RawDuration>,
    max_lifetime: Option<RawDuration>,
    max_requests: Option<u64>,
    server_keepalive: Option<RawDuration>,
    time_wait: Option<RawWord<UpstreamTimeWait>>,
    preconnect: Option<usize>,
    proxy_protocol: Option<RawWord<ProxyProtocol>>,
    balance: Option<RawWord<Balance>>,
    weights: Option<Vec<u32>>,
    fail_threshold: Option<u32>,
    fail_backoff: Option<RawDuration>,
    health_check: Option<RawHealthCheck>,
}

/// `health_check = { ... }` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    kind: Option<RawWord<CheckKind>>,
    path: Option<String>,
    interval: Option<RawDuration>,
}

/// `[[mysql_user]]` as written: exactly one of `password` and `password_env`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMysqlUser {
    user: String,
    password: Option<String>,
    password_env: Option<String>,
}

/// A duration: `"500ms"`, `"1.5s"`, ... or an integer number of seconds.
struct RawDuration(Duration);

/// A listen address: `HOST:PORT`, `[V6]:PORT` or `unix:/path`.
struct RawAddress(Address);

/// The admin address: `HOST:PORT`, or `""` / `"off"` for none.
struct RawAdminListen(Option<SocketAddr>);

/// A unix socket file mode, written as an octal string.
struct RawMode(u32);

/// One of the words of a [`Keyword`] enum.
struct RawWord<T>(T);

/// An enum that the config spells as one of a few lowercase words.
trait Keyword: Copy + PartialEq + 'static {
    /// Every spelling and its value, in the order messages list them.
    const WORDS: &'static [(&'static str, Self)];
}

/// Finds keys in the config text, so that errors found after deserialization can still name
/// a line.
struct Locator<'a> {
    /// The file, for messages.
    file: &'a Path,
    /// The config text; offsets below index into it.
    text: &'a str,
    /// Every key, array element and table of the text; empty when the text is not valid TOML,
    /// in which case the deserializer's own error carries the line.
    entries: Vec<Entry>,
}

/// One located item of the config text.
struct Entry {
    /// Dotted path, e.g. `listener[0].upstream` or `upstream[1].servers[0]`.
    path: String,
    /// Where the key is written; None for array elements and `[[table]]` headers.
    key: Option<Range<usize>>,
    /// Where the value is written; for a table, its header.
    value: Option<Range<usize>>,
}

// === impl Config ===

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`, naming `path` in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let at = Locator::new(text, path);
        let raw: RawConfig = toml::from_str(text).map_err(|e| at.deserialize_error(&e))?;
        let config = raw.into_config(&at)?;
        config.validate(&at)?;
        Ok(config)
    }

    /// Non-fatal findings (e.g. idle_timeout not shorter than server_keepalive).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for upstream in &self.upstreams {
            let name = &upstream.name;
            if let Some(server) = upstream.server_keepalive {
                if upstream.idle_timeout >= server {
                    warnings.push(format!(
                        "upstream `{name}`: idle_timeout ({}) is not shorter than \
                         server_keepalive ({}): the server would close idle pooled connections \
                         first and leave TIME_WAIT on itself; set idle_timeout below {}",
                        format_duration(upstream.idle_timeout),
                        format_duration(server),
                        format_duration(server),
                    ));
                }
            }
            if upstream.max_connections != 0 && upstream.max_connections < upstream.pool_size {
                warnings.push(format!(
                    "upstream `{name}`: max_connections ({}) is below pool_size ({}): no more \
                     than {} connections per server can ever be pooled",
                    upstream.max_connections, upstream.pool_size, upstream.max_connections,
                ));
            }
            if !self.listeners.iter().any(|l| &l.upstream == name) {
                warnings.push(format!("upstream `{name}` is not used by any listener"));
            }
        }
        warnings
    }

    /// The upstream a listener forwards to (validation guarantees it exists).
    pub fn upstream(&self, name: &str) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// The checks that need the whole config; each error names the offending key.
    fn validate(&self, at: &Locator<'_>) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(at.error("listener", "at least one [[listener]] is required"));
        }
        for (i, listener) in self.listeners.iter().enumerate() {
            let key = |field: &str| format!("listener[{i}].{field}");
            if listener.name.is_empty() {
                return Err(at.error(key("name"), "a listener name must not be empty"));
            }
            if let Some(j) = self
                .listeners
                .iter()
                .take(i)
                .position(|l| l.name == listener.name)
            {
                return Err(at.error(
                    key("name"),
                    format!(
                        "listener name `{}` is already used by {}",
                        listener.name,
                        at.describe(&format!("listener[{j}].name"))
                    ),
                ));
            }
            if let Some(other) = self.listen_clash(i) {
                return Err(at.error(
                    key("listen"),
                    format!(
                        "{} is already the address of {}",
                        listener.listen,
                        at.describe(&other)
                    ),
                ));
            }
            if self.upstream(&listener.upstream).is_none() {
                return Err(at.error(
                    key("upstream"),
                    format!(
                        "no [[upstream]] is named `{}`{}",
                        listener.upstream,
                        self.upstream_names()
                    ),
                ));
            }
            if listener.accept_proxy_protocol && matches!(listener.listen, Address::Unix(_)) {
                return Err(at.error(
                    key("accept_proxy_protocol"),
                    "accept_proxy_protocol applies to TCP listeners; a unix socket's clients are \
                     on this host",
                ));
            }
            if let Some(up) = self.upstream(&listener.upstream) {
                let tcp_only = if up.preconnect > 0 {
                    Some("preconnect")
                } else if up.proxy_protocol != ProxyProtocol::Off {
                    Some("proxy_protocol")
                } else {
                    None
                };
                if let (Some(what), false) = (tcp_only, listener.protocol == Protocol::Tcp) {
                    let j = self
                        .upstreams
                        .iter()
                        .position(|u| u.name == up.name)
                        .unwrap_or(0);
                    return Err(at.error(
                        format!("upstream[{j}].{what}"),
                        format!(
                            "{what} applies to upstreams of tcp listeners, and {} is {}: \
                             a pooled connection serves many clients in turn",
                            at.describe(&key("protocol")),
                            listener.protocol
                        ),
                    ));
                }
            }
            if listener.defer_accept {
                let why = match (&listener.listen, listener.protocol) {
                    (Address::Unix(_), _) => {
                        Some("defer_accept applies to TCP listeners; a unix socket has no TCP_DEFER_ACCEPT")
                    }
                    (_, Protocol::Mysql) => Some(
                        "defer_accept cannot serve a mysql listener: a MySQL client sends \
                         nothing before the server's greeting, so every login would wait out \
                         the kernel's deferral",
                    ),
                    _ => None,
                };
                if let Some(why) = why {
                    return Err(at.error(key("defer_accept"), why));
                }
            }
            if listener.mode.is_some() && !matches!(listener.listen, Address::Unix(_)) {
                return Err(at.error(
                    key("mode"),
                    "mode applies only to unix:/path listeners; a TCP socket has no file mode",
                ));
            }
        }
        for (i, upstream) in self.upstreams.iter().enumerate() {
            let key = |field: &str| format!("upstream[{i}].{field}");
            if upstream.name.is_empty() {
                return Err(at.error(key("name"), "an upstream name must not be empty"));
            }
            if let Some(j) = self
                .upstreams
                .iter()
                .take(i)
                .position(|u| u.name == upstream.name)
            {
                return Err(at.error(
                    key("name"),
                    format!(
                        "upstream name `{}` is already used by {}",
                        upstream.name,
                        at.describe(&format!("upstream[{j}].name"))
                    ),
                ));
            }
            if upstream.servers.is_empty() {
                return Err(at.error(key("servers"), "at least one server is required"));
            }
            for (j, server) in upstream.servers.iter().enumerate() {
                if matches!(server, Address::Tcp(addr) if addr.port() == 0) {
                    return Err(at.error(
                        format!("upstream[{i}].servers[{j}]"),
                        format!("{server} has port 0, which cannot be connected to"),
                    ));
                }
            }
            if upstream.weights.len() != upstream.servers.len() {
                return Err(at.error(
                    key("weights"),
                    format!(
                        "{} weights for {} servers: give one weight per server, in order",
                        upstream.weights.len(),
                        upstream.servers.len()
                    ),
                ));
            }
            if upstream.weights.contains(&0) {
                return Err(at.error(
                    key("weights"),
                    "a weight of 0 would never pick its server; remove the server instead",
                ));
            }
            if upstream.fail_threshold == 0 {
                return Err(at.error(
                    key("fail_threshold"),
                    "must be at least 1: a server is marked down after that many failures in a row",
                ));
            }
            if upstream
                .health_check
                .as_ref()
                .is_some_and(|h| h.interval.is_zero())
            {
                return Err(at.error(key("health_check"), "interval must be longer than 0s"));
            }
            if upstream.pool_size == 0 {
                return Err(at.error(
                    key("pool_size"),
                    "pool_size must be at least 1; a pool that keeps nothing would open and close \
                     a server connection per request",
                ));
            }
            if upstream.connect_timeout.is_zero() {
                return Err(at.error(
                    key("connect_timeout"),
                    "must be longer than 0s, or every connect fails at once",
                ));
            }
            if upstream.response_timeout.is_zero() {
                return Err(at.error(
                    key("response_timeout"),
                    "must be longer than 0s, or every request fails at once",
                ));
            }
        }
        self.validate_mysql(at)
    }

    /// `[[mysql_user]]` names are set and unique, and a mysql listener has users to admit.
    fn validate_mysql(&self, at: &Locator<'_>) -> Result<(), ConfigError> {
        for (i, u) in self.mysql_users.iter().enumerate() {
            let key = format!("mysql_user[{i}].user");
            if u.user.is_empty() {
                return Err(at.error(key, "a mysql user name must not be empty"));
            }
            if let Some(j) = self
                .mysql_users
                .iter()
                .take(i)
                .position(|o| o.user == u.user)
            {
                return Err(at.error(
                    key,
                    format!(
                        "mysql user `{}` is already defined by {}",
                        u.user,
                        at.describe(&format!("mysql_user[{j}].user"))
                    ),
                ));
            }
        }
        if self.mysql_users.is_empty() {
            if let Some(i) = self
                .listeners
                .iter()
                .position(|l| l.protocol == Protocol::Mysql)
            {
                return Err(at.error(
                    format!("listener[{i}].protocol"),
                    "a mysql listener needs at least one [[mysql_user]]: waitless checks client \
                     passwords itself and logs in to the servers with the same account",
                ));
            }
        }
        Ok(())
    }

    /// The `[[mysql_user]]` named `user`.
    pub fn mysql_user(&self, user: &str) -> Option<&MysqlUser> {
        self.mysql_users.iter().find(|u| u.user == user)
    }

    /// The key of an address listener `i` would share with the admin listener or an earlier
    /// listener, if any. Port 0 never clashes: the kernel picks a distinct port for each.
    fn listen_clash(&self, i: usize) -> Option<String> {
        let listen = &self.listeners.get(i)?.listen;
        if matches!(listen, Address::Tcp(addr) if addr.port() == 0) {
            return None;
        }
        if let Some(j) = self
            .listeners
            .iter()
            .take(i)
            .position(|l| &l.listen == listen)
        {
            return Some(format!("listener[{j}].listen"));
        }
        match (listen, self.admin.listen) {
            (Address::Tcp(addr), Some(admin)) if *addr == admin => Some("admin.listen".to_string()),
            _ => None,
        }
    }

    /// " (defined: `a`, `b`)" or "; none is defined", to end a message about a missing upstream.
    fn upstream_names(&self) -> String {
        if self.upstreams.is_empty() {
            return "; none is defined".to_string();
        }
        let names: Vec<String> = self
            .upstreams
            .iter()
            .map(|u| format!("`{}`", u.name))
            .collect();
        format!(" (defined: {})", names.join(", "))
    }
}

/// Prints the effective configuration: valid TOML with every key and its value after defaults,
/// which parses back to the same config. Unset optional keys appear as comments.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "workers = {}", self.workers)?;
        writeln!(
            f,
            "drain_timeout = \"{}\"",
            format_duration(self.drain_timeout)
        )?;
        writeln!(f)?;
        writeln!(f, "[admin]")?;
        match self.admin.listen {
            Some(addr) => writeln!(f, "listen = {}", quoted(&addr.to_string()))?,
            None => writeln!(f, "listen = \"off\"")?,
        }
        for listener in &self.listeners {
            writeln!(f)?;
            writeln!(f, "[[listener]]")?;
            writeln!(f, "name = {}", quoted(&listener.name))?;
            writeln!(f, "listen = {}", quoted(&listener.listen.to_string()))?;
            writeln!(f, "protocol = \"{}\"", listener.protocol)?;
            writeln!(f, "upstream = {}", quoted(&listener.upstream))?;
            writeln!(f, "time_wait = \"{}\"", listener.time_wait)?;
            writeln!(f, "linger = \"{}\"", format_duration(listener.linger))?;
            writeln!(f, "linger_fallback = \"{}\"", listener.linger_fallback)?;
            let keepalive = format_duration(listener.keepalive_timeout);
            writeln!(f, "keepalive_timeout = \"{keepalive}\"")?;
            match (listener.mode, &listener.listen) {
                (Some(mode), _) => writeln!(f, "mode = \"{mode:04o}\"")?,
                (None, Address::Unix(_)) => writeln!(f, "# mode: unset, the umask decides")?,
                (None, Address::Tcp(_)) => {}
            }
            writeln!(
                f,
                "accept_proxy_protocol = {}",
                listener.accept_proxy_protocol
            )?;
            writeln!(f, "max_clients = {}", listener.max_clients)?;
            let header = format_duration(listener.header_timeout);
            writeln!(f, "header_timeout = \"{header}\"")?;
            writeln!(f, "defer_accept = {}", listener.defer_accept)?;
        }
        for upstream in &self.upstreams {
            writeln!(f)?;
            writeln!(f, "[[upstream]]")?;
            writeln!(f, "name = {}", quoted(&upstream.name))?;
            let servers: Vec<String> = upstream
                .servers
                .iter()
                .map(|s| quoted(&s.to_string()))
                .collect();
            writeln!(f, "servers = [{}]", servers.join(", "))?;
            writeln!(f, "pool_size = {}", upstream.pool_size)?;
            writeln!(f, "max_connections = {}", upstream.max_connections)?;
            writeln!(
                f,
                "idle_timeout = \"{}\"",
                format_duration(upstream.idle_timeout)
            )?;
            writeln!(
                f,
                "connect_timeout = \"{}\"",
                format_duration(upstream.connect_timeout)
            )?;
            writeln!(
                f,
                "response_timeout = \"{}\"",
                format_duration(upstream.response_timeout)
            )?;
            match upstream.max_lifetime {
                Some(age) => writeln!(f, "max_lifetime = \"{}\"", format_duration(age))?,
                None => writeln!(
                    f,
                    "# max_lifetime: unset, connections are not retired by age"
                )?,
            }
            writeln!(f, "max_requests = {}", upstream.max_requests)?;
            match upstream.server_keepalive {
                Some(keepalive) => {
                    writeln!(f, "server_keepalive = \"{}\"", format_duration(keepalive))?
                }
                None => writeln!(f, "# server_keepalive: unset, unknown")?,
            }
            writeln!(f, "time_wait = \"{}\"", upstream.time_wait)?;
            writeln!(f, "preconnect = {}", upstream.preconnect)?;
            writeln!(f, "proxy_protocol = \"{}\"", upstream.proxy_protocol)?;
            writeln!(f, "balance = \"{}\"", upstream.balance)?;
            let weights: Vec<String> = upstream.weights.iter().map(|w| w.to_string()).collect();
            writeln!(f, "weights = [{}]", weights.join(", "))?;
            writeln!(f, "fail_threshold = {}", upstream.fail_threshold)?;
            let backoff = format_duration(upstream.fail_backoff);
            writeln!(f, "fail_backoff = \"{backoff}\"")?;
            match &upstream.health_check {
                Some(h) => writeln!(
                    f,
                    "health_check = {{ kind = \"{}\", path = {}, interval = \"{}\" }}",
                    h.kind,
                    quoted(&h.path),
                    format_duration(h.interval)
                )?,
                None => writeln!(f, "# health_check: unset, passive checks only")?,
            }
        }
        for user in &self.mysql_users {
            writeln!(f)?;
            writeln!(f, "[[mysql_user]]")?;
            writeln!(f, "user = {}", quoted(&user.user))?;
            match &user.password_env {
                Some(var) => writeln!(f, "password_env = {}", quoted(var))?,
                // A secret does not belong in `waitless check` output or logs.
                None => writeln!(f, "# password: set in the file, not shown")?,
            }
        }
        Ok(())
    }
}

// === impl MysqlUser ===

/// The password is never shown.
impl fmt::Debug for MysqlUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MysqlUser")
            .field("user", &self.user)
            .field("password_env", &self.password_env)
            .finish_non_exhaustive()
    }
}

// === impl Admin ===

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: Some(DEFAULT_ADMIN_LISTEN),
        }
    }
}

// === impl Address ===

/// The config spelling: `127.0.0.1:80`, `[::1]:80` or `unix:/path`.
impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(addr) => write!(f, "{addr}"),
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

// === impl Protocol, ClientTimeWait, LingerFallback, UpstreamTimeWait ===

impl Keyword for Protocol {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("http", Protocol::Http),
        ("tcp", Protocol::Tcp),
        ("mysql", Protocol::Mysql),
    ];
}

impl Keyword for ClientTimeWait {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("client", ClientTimeWait::Client),
        ("proxy", ClientTimeWait::Proxy),
        ("none", ClientTimeWait::None),
    ];
}

impl Keyword for LingerFallback {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("fin", LingerFallback::Fin),
        ("reset", LingerFallback::Reset),
    ];
}

impl Keyword for UpstreamTimeWait {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("proxy", UpstreamTimeWait::Proxy),
        ("none", UpstreamTimeWait::None),
    ];
}

impl Keyword for Balance {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("round_robin", Balance::RoundRobin),
        ("least_conn", Balance::LeastConn),
    ];
}

impl Keyword for CheckKind {
    const WORDS: &'static [(&'static str, Self)] =
        &[("tcp", CheckKind::Tcp), ("http", CheckKind::Http)];
}

/// The config word, e.g. `least_conn`.
impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(word_of(*self))
    }
}

/// The config word, e.g. `http`.
impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(word_of(*self))
    }
}

impl Keyword for ProxyProtocol {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("off", ProxyProtocol::Off),
        ("v1", ProxyProtocol::V1),
        ("v2", ProxyProtocol::V2),
    ];
}

/// The config word, e.g. `v2`.
impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(word_of(*self))
    }
}

/// The config word, e.g. `mysql`; also suits metric labels.
impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(word_of(*self))
    }
}

/// The config word, e.g. `client`.
impl fmt::Display for ClientTimeWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(word_of(*self))
    }
}

/// The config word, e.g. `reset`.
impl fmt::Display for LingerFallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(word_of(*self))
    }
}

/// The config word, e.g. `proxy`.
impl fmt::Display for UpstreamTimeWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(word_of(*self))
    }
}

// === impl ConfigError ===

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

// === impl RawConfig ===

impl RawConfig {
    /// Fills in defaults. Fails only on a bad server address, which is parsed here rather
    /// than by the deserializer so that the error names the element's own line.
    fn into_config(self, at: &Locator<'_>) -> Result<Config, ConfigError> {
        let admin = match self.admin.and_then(|a| a.listen) {
            Some(RawAdminListen(listen)) => Admin { listen },
            None => Admin::default(),
        };
        let upstreams = self
            .upstream
            .into_iter()
            .map(|u| u.into_upstream(at))
            .collect::<Result<Vec<_>, _>>()?;
        let mysql_users = self
            .mysql_user
            .into_iter()
            .enumerate()
            .map(|(i, u)| u.into_user(i, at))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Config {
            source: at.file.to_path_buf(),
            workers: self.workers.unwrap_or(0),
            drain_timeout: self.drain_timeout.map_or(DEFAULT_DRAIN_TIMEOUT, |d| d.0),
            admin,
            listeners: self
                .listener
                .into_iter()
                .map(RawListener::into_listener)
                .collect(),
            upstreams,
            mysql_users,
        })
    }
}

impl RawMysqlUser {
    /// Resolves the password; `password_env` must name a variable that is set now.
    fn into_user(self, i: usize, at: &Locator<'_>) -> Result<MysqlUser, ConfigError> {
        let key = |field: &str| format!("mysql_user[{i}].{field}");
        let (password, password_env) = match (self.password, self.password_env) {
            (Some(password), None) => (password, None),
            (None, Some(var)) => match std::env::var(&var) {
                Ok(password) => (password, Some(var)),
                Err(_) => {
                    return Err(at.error(
                        key("password_env"),
                        format!("environment variable `{var}` is not set (or not UTF-8)"),
                    ))
                }
            },
            (Some(_), Some(_)) => {
                return Err(at.error(
                    key("password_env"),
                    "give either password or password_env, not both",
                ))
            }
            (None, None) => {
                return Err(at.error(
                    format!("mysql_user[{i}]"),
                    "password or password_env is required",
                ))
            }
        };
        Ok(MysqlUser {
            user: self.user,
            password,
            password_env,
        })
    }
}

impl RawListener {
    fn into_listener(self) -> Listener {
        let protocol = self.protocol.map(|w| w.0).unwrap_or_default();
        // Clients of HTTP speak first; of tcp, perhaps not; of mysql, never.
        let defer_default = protocol == Protocol::Http && matches!(self.listen.0, Address::Tcp(_));
        Listener {
            name: self.name,
            listen: self.listen.0,
            protocol,
            upstream: self.upstream,
            time_wait: self.time_wait.map(|w| w.0).unwrap_or_default(),
            linger: self.linger.map_or(DEFAULT_LINGER, |d| d.0),
            linger_fallback: self.linger_fallback.map(|w| w.0).unwrap_or_default(),
            keepalive_timeout: self
                .keepalive_timeout
                .map_or(DEFAULT_KEEPALIVE_TIMEOUT, |d| d.0),
            mode: self.mode.map(|m| m.0),
            accept_proxy_protocol: self.accept_proxy_protocol.unwrap_or(false),
            max_clients: self.max_clients.unwrap_or(DEFAULT_MAX_CLIENTS),
            header_timeout: self.header_timeout.map_or(DEFAULT_HEADER_TIMEOUT, |d| d.0),
            defer_accept: self.defer_accept.unwrap_or(defer_default),
        }
    }
}

impl RawUpstream {
    fn into_upstream(self, at: &Locator<'_>) -> Result<Upstream, ConfigError> {
        let servers = self
            .servers
            .iter()
            .map(|server| {
                parse_address(server.get_ref())
                    .map_err(|message| at.error_at(server.span(), message))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let servers_len = servers.len();
        Ok(Upstream {
            name: self.name,
            servers,
            pool_size: self.pool_size.unwrap_or(DEFAULT_POOL_SIZE),
            max_connections: self.max_connections.unwrap_or(0),
            idle_timeout: self.idle_timeout.map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
            connect_timeout: self
                .connect_timeout
                .map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0),
            response_timeout: self
                .response_timeout
                .map_or(DEFAULT_RESPONSE_TIMEOUT, |d| d.0),
            max_lifetime: self.max_lifetime.map(|d| d.0),
            max_requests: self.max_requests.unwrap_or(0),
            server_keepalive: self.server_keepalive.map(|d| d.0),
            time_wait: self.time_wait.map(|w| w.0).unwrap_or_default(),
            preconnect: self.preconnect.unwrap_or(0),
            proxy_protocol: self.proxy_protocol.map(|w| w.0).unwrap_or_default(),
            balance: self.balance.map(|w| w.0).unwrap_or_default(),
            weights: self.weights.unwrap_or_else(|| vec![1; servers_len]),
            fail_threshold: self.fail_threshold.unwrap_or(DEFAULT_FAIL_THRESHOLD),
            fail_backoff: self.fail_backoff.map_or(DEFAULT_FAIL_BACKOFF, |d| d.0),
            health_check: self.health_check.map(|h| HealthCheck {
                kind: h.kind.map(|w| w.0).unwrap_or_default(),
                path: h.path.unwrap_or_else(|| "/healthz".to_string()),
                interval: h.interval.map_or(DEFAULT_CHECK_INTERVAL, |d| d.0),
            }),
        })
    }
}

// === impl RawDuration, RawAddress, RawAdminListen, RawMode, RawWord ===

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }
}

/// Accepts a duration string or whole seconds as an integer.
struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = RawDuration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as \"2s\", \"500ms\" or \"1.5m\", or whole seconds")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<RawDuration, E> {
        parse_duration(text)
            .map(RawDuration)
            .map_err(|e| E::custom(format!("invalid duration `{text}`: {e}")))
    }

    fn visit_u64<E: de::Error>(self, secs: u64) -> Result<RawDuration, E> {
        Ok(RawDuration(Duration::from_secs(secs)))
    }

    fn visit_i64<E: de::Error>(self, secs: i64) -> Result<RawDuration, E> {
        u64::try_from(secs)
            .map(|secs| RawDuration(Duration::from_secs(secs)))
            .map_err(|_| E::custom(format!("invalid duration `{secs}`: must not be negative")))
    }
}

impl<'de> Deserialize<'de> for RawAddress {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_address(&text)
            .map(RawAddress)
            .map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for RawAdminListen {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.as_str() {
            "" | "off" => Ok(RawAdminListen(None)),
            _ => match parse_address(&text).map_err(de::Error::custom)? {
                Address::Tcp(addr) => Ok(RawAdminListen(Some(addr))),
                Address::Unix(_) => Err(de::Error::custom(
                    "the admin listener takes HOST:PORT, not a unix socket",
                )),
            },
        }
    }
}

impl<'de> Deserialize<'de> for RawMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // An integer is refused rather than guessed at: `mode = 660` reads as octal to a
        // person and as decimal to TOML.
        let text = String::deserialize(deserializer)?;
        parse_mode(&text).map(RawMode).map_err(de::Error::custom)
    }
}

impl<'de, T: Keyword> Deserialize<'de> for RawWord<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match T::WORDS.iter().find(|(word, _)| *word == text) {
            Some((_, value)) => Ok(RawWord(*value)),
            None => {
                let words: Vec<String> = T::WORDS.iter().map(|(w, _)| format!("`{w}`")).collect();
                Err(de::Error::custom(format!(
                    "unknown value `{text}`, expected one of {}",
                    words.join(", ")
                )))
            }
        }
    }
}

// === impl Locator ===

impl<'a> Locator<'a> {
    /// Indexes `text` with a span-keeping parse. A text that is not TOML indexes to nothing;
    /// the deserializer then reports the syntax error with its own line.
    fn new(text: &'a str, file: &'a Path) -> Self {
        let mut entries = Vec::new();
        // toml_edit panics recovering from some invalid documents (`=={\n.`, found by the
        // config fuzz target), so it only sees text that toml accepts.
        if text.parse::<toml::Table>().is_ok() {
            if let Ok(doc) = toml_edit::Document::parse(text) {
                index_table(doc.as_table(), "", &mut entries);
            }
        }
        Locator {
            file,
            text,
            entries,
        }
    }

    /// An error at dotted `key`, on the key's line when the key is written in the file.
    fn error(&self, key: impl Into<String>, message: impl fmt::Display) -> ConfigError {
        let key = key.into();
        ConfigError {
            file: self.file.to_path_buf(),
            line: self.line_of(&key),
            key: Some(key),
            message: one_line(&message.to_string()),
        }
    }

    /// An error at a byte range of the text, naming whatever key is written there.
    fn error_at(&self, span: Range<usize>, message: impl fmt::Display) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: Some(self.line_at(span.start)),
            key: self.path_at(span.start).map(str::to_owned),
            message: one_line(&message.to_string()),
        }
    }

    /// Turns the deserializer's error into ours: its span gives the line, and the index gives
    /// the key written there.
    fn deserialize_error(&self, error: &toml::de::Error) -> ConfigError {
        let mut message = one_line(error.message());
        let offset = error.span().map(|span| span.start);
        let mut key = offset.and_then(|o| self.path_at(o)).map(str::to_owned);
        // `[listener]` where `[[listener]]` was meant is the likeliest way to get this.
        if message == "invalid type: map, expected a sequence" {
            if let Some(key) = &key {
                message.push_str(&format!("; write [[{key}]] to start each entry"));
            }
        }
        // serde blames a missing field on its table; name the field itself.
        if let Some(field) = missing_field(&message) {
            key = Some(match key {
                Some(table) => format!("{table}.{field}"),
                None => field.to_owned(),
            });
        }
        ConfigError {
            file: self.file.to_path_buf(),
            line: offset.map(|o| self.line_at(o)),
            key,
            message,
        }
    }

    /// "`listener[0].name` (line 7)", or just the key when it is not in the file.
    fn describe(&self, key: &str) -> String {
        match self.line_of(key) {
            Some(line) => format!("`{key}` (line {line})"),
            None => format!("`{key}`"),
        }
    }

    /// The 1-based line of dotted `key`, if it is written in the file.
    fn line_of(&self, key: &str) -> Option<usize> {
        let entry = self.entries.iter().find(|e| e.path == key)?;
        let span = entry.key.as_ref().or(entry.value.as_ref())?;
        Some(self.line_at(span.start))
    }

    /// The 1-based line holding byte `offset`.
    fn line_at(&self, offset: usize) -> usize {
        self.text
            .bytes()
            .take(offset)
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    /// The innermost key, element or table written at byte `offset`.
    fn path_at(&self, offset: usize) -> Option<&str> {
        self.entries
            .iter()
            .flat_map(|e| {
                [&e.key, &e.value]
                    .into_iter()
                    .flatten()
                    .map(move |span| (e, span))
            })
            .filter(|(_, span)| span.contains(&offset) || span.start == offset)
            .min_by_key(|(_, span)| span.len())
            .map(|(e, _)| e.path.as_str())
    }
}

// === helpers ===

/// Parses a duration: a decimal number and a unit (`ns`, `us`, `ms`, `s`, `m`, `h`),
/// e.g. `"500ms"`, `"2s"`, `"1.5m"`. The error says what is wrong, without the input.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const EXPECTED_UNITS: &str = "expected ms, s, m or h";
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit_nanos: u128 = match unit.trim_start() {
        "ns" => 1,
        "us" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "" => return Err(format!("no unit, {EXPECTED_UNITS}")),
        other => return Err(format!("unknown unit `{other}`, {EXPECTED_UNITS}")),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return Err("expected a number before the unit".to_string());
    }
    let too_large = || "too large".to_string();
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_large())?
    };
    // Digits past the 15th are below a nanosecond even for hours; dropping them keeps the
    // arithmetic inside u128.
    let fraction: String = fraction.chars().take(15).collect();
    let scale = 10u128.pow(fraction.len() as u32);
    let fraction: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| too_large())?
    };
    let nanos = whole
        .checked_mul(unit_nanos)
        .and_then(|n| n.checked_add(fraction * unit_nanos / scale))
        .ok_or_else(too_large)?;
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| too_large())?;
    Ok(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

/// Formats a duration in the largest unit that keeps it exact (`"90s"`, `"10m"`,
/// `"1500ms"`), so that [`parse_duration`] reads back the same value.
pub fn format_duration(duration: Duration) -> String {
    const UNITS: [(&str, u128); 6] = [
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
        ("ns", 1),
    ];
    let nanos = duration.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    let (unit, size) = UNITS
        .iter()
        .find(|(_, size)| nanos.is_multiple_of(*size))
        .unwrap_or(&("ns", 1));
    format!("{}{unit}", nanos / size)
}

/// Parses `HOST:PORT`, `[V6]:PORT` or `unix:/path`. A hostname is resolved now, once, and the
/// first address is kept.
pub fn parse_address(text: &str) -> Result<Address, String> {
    if let Some(path) = text.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("`unix:` needs a socket path, e.g. unix:/run/waitless.sock".to_string());
        }
        return Ok(Address::Unix(PathBuf::from(path)));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(Address::Tcp(addr));
    }
    // Check the shape before asking the resolver, whose errors would not say what is wrong.
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!(
            "`{text}` is not HOST:PORT, [V6]:PORT or unix:/path"
        ));
    };
    if port.parse::<u16>().is_err() {
        return Err(format!(
            "`{text}` has no valid port (expected HOST:PORT with PORT 0-65535)"
        ));
    }
    if host.is_empty() {
        return Err(format!(
            "`{text}` has no host (use 0.0.0.0:{port} for all interfaces)"
        ));
    }
    if host.starts_with('[') || host.contains(':') {
        return Err(format!(
            "`{text}` is not a valid IPv6 address (expected [V6]:PORT)"
        ));
    }
    let mut resolved = text
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{host}`: {e}"))?;
    resolved
        .next()
        .map(Address::Tcp)
        .ok_or_else(|| format!("`{host}` resolved to no address"))
}

/// Parses an octal file mode such as `"0660"` (a leading `0o` is allowed).
pub fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    let octal = !digits.is_empty() && digits.bytes().all(|b| (b'0'..=b'7').contains(&b));
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if octal && mode <= 0o7777 => Ok(mode),
        _ => Err(format!(
            "`{text}` is not an octal file mode such as \"0660\""
        )),
    }
}

/// The word a [`Keyword`] value is spelled with.
fn word_of<T: Keyword>(value: T) -> &'static str {
    T::WORDS
        .iter()
        .find(|(_, v)| *v == value)
        .map_or("?", |(word, _)| word)
}

/// Records every key, array element and table of `table` under `prefix`.
fn index_table(table: &toml_edit::Table, prefix: &str, out: &mut Vec<Entry>) {
    for (name, item) in table.iter() {
        let path = join(prefix, name);
        let key = table.key(name).and_then(|k| k.span());
        match item {
            toml_edit::Item::None => {}
            toml_edit::Item::Value(value) => {
                out.push(Entry {
                    path: path.clone(),
                    key,
                    value: value.span(),
                });
                index_value(value, &path, out);
            }
            toml_edit::Item::Table(inner) => {
                out.push(Entry {
                    path: path.clone(),
                    key,
                    value: inner.span(),
                });
                index_table(inner, &path, out);
            }
            toml_edit::Item::ArrayOfTables(tables) => {
                for (i, inner) in tables.iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    out.push(Entry {
                        path: path.clone(),
                        key: None,
                        value: inner.span(),
                    });
                    index_table(inner, &path, out);
                }
            }
        }
    }
}

/// Records the elements of an array or inline table written at `path`.
fn index_value(value: &toml_edit::Value, path: &str, out: &mut Vec<Entry>) {
    match value {
        toml_edit::Value::Array(array) => {
            for (i, element) in array.iter().enumerate() {
                let path = format!("{path}[{i}]");
                out.push(Entry {
                    path: path.clone(),
                    key: None,
                    value: element.span(),
                });
                index_value(element, &path, out);
            }
        }
        toml_edit::Value::InlineTable(table) => {
            for (name, element) in table.iter() {
                let path = join(path, name);
                let key = table.key(name).and_then(|k| k.span());
                out.push(Entry {
                    path: path.clone(),
                    key,
                    value: element.span(),
                });
                index_value(element, &path, out);
            }
        }
        _ => {}
    }
}

/// `prefix.name`, or `name` at the top level.
fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// The field of serde's "missing field `x`" message.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// Keeps a message on one line, as `FILE:LINE: key `KEY`: MESSAGE` promises.
fn one_line(message: &str) -> String {
    message
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// `text` as a TOML basic string.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key set, each to something other than its default.
    const FULL: &str = r#"workers = 4

[admin]
listen = "127.0.0.1:9911"

[[listener]]
name = "web"
listen = "127.0.0.1:8080"
protocol = "http"
upstream = "web"
time_wait = "proxy"
linger = "500ms"
linger_fallback = "reset"
keepalive_timeout = 30

[[listener]]
name = "db"
listen = "unix:/run/waitless/db.sock"
protocol = "mysql"
upstream = "db"
time_wait = "none"
mode = "0660"

[[upstream]]
name = "web"
servers = ["127.0.0.1:8081", "[::1]:8082", "unix:/run/app.sock"]
pool_size = 16
max_connections = 32
idle_timeout = "40s"
connect_timeout = "1.5s"
response_timeout = "2m"
max_lifetime = "1h"
max_requests = 1000
server_keepalive = "75s"
time_wait = "none"

[[upstream]]
name = "db"
servers = ["127.0.0.1:3306"]

[[mysql_user]]
user = "app"
# Any variable set wherever tests run: the printed config names it and parses back.
password_env = "PATH"
"#;

    /// The least a config can say.
    const MINIMAL: &str = r#"
[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "web"

[[upstream]]
name = "web"
servers = ["127.0.0.1:8081"]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    /// Parses text that must fail and returns the one-line message the operator sees.
    fn error(text: &str) -> String {
        match parse(text) {
            Ok(config) => panic!("expected an error, parsed {config:?}"),
            Err(e) => {
                let shown = e.to_string();
                assert!(!shown.contains('\n'), "message spans lines: {shown}");
                shown
            }
        }
    }

    /// MINIMAL with one listener key replaced or added (the listener keys start on line 3).
    fn with_listener_key(line: &str) -> String {
        MINIMAL.replace(
            "upstream = \"web\"\n",
            &format!("upstream = \"web\"\n{line}\n"),
        )
    }

    #[test]
    fn full_config_sets_every_key() {
        let config = parse(FULL).unwrap();
        assert_eq!(config.source, Path::new("test.toml"));
        assert_eq!(config.workers, 4);
        assert_eq!(config.admin.listen, Some("127.0.0.1:9911".parse().unwrap()));

        let web = &config.listeners[0];
        assert_eq!(web.name, "web");
        assert_eq!(web.listen, Address::Tcp("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(web.protocol, Protocol::Http);
        assert_eq!(web.upstream, "web");
        assert_eq!(web.time_wait, ClientTimeWait::Proxy);
        assert_eq!(web.linger, Duration::from_millis(500));
        assert_eq!(web.linger_fallback, LingerFallback::Reset);
        assert_eq!(web.keepalive_timeout, Duration::from_secs(30));

        let db = &config.listeners[1];
        assert_eq!(
            db.listen,
            Address::Unix(PathBuf::from("/run/waitless/db.sock"))
        );
        assert_eq!(db.protocol, Protocol::Mysql);
        assert_eq!(db.time_wait, ClientTimeWait::None);
        assert_eq!(db.mode, Some(0o660));
        assert!(!db.defer_accept, "mysql on a unix socket does not defer");

        let up = config.upstream("web").unwrap();
        assert_eq!(
            up.servers,
            vec![
                Address::Tcp("127.0.0.1:8081".parse().unwrap()),
                Address::Tcp("[::1]:8082".parse().unwrap()),
                Address::Unix(PathBuf::from("/run/app.sock")),
            ]
        );
        assert_eq!(up.pool_size, 16);
        assert_eq!(up.max_connections, 32);
        assert_eq!(up.idle_timeout, Duration::from_secs(40));
        assert_eq!(up.connect_timeout, Duration::from_millis(1500));
        assert_eq!(up.response_timeout, Duration::from_secs(120));
        assert_eq!(up.max_lifetime, Some(Duration::from_secs(3600)));
        assert_eq!(up.max_requests, 1000);
        assert_eq!(up.server_keepalive, Some(Duration::from_secs(75)));
        assert_eq!(up.time_wait, UpstreamTimeWait::None);
    }

    #[test]
    fn absent_keys_take_their_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.workers, 0);
        assert_eq!(config.admin.listen, Some("127.0.0.1:9901".parse().unwrap()));
        let listener = &config.listeners[0];
        assert_eq!(listener.protocol, Protocol::Http);
        assert_eq!(listener.time_wait, ClientTimeWait::Client);
        assert_eq!(listener.linger, Duration::from_secs(2));
        assert_eq!(listener.linger_fallback, LingerFallback::Fin);
        assert_eq!(listener.keepalive_timeout, Duration::from_secs(60));
        assert_eq!(listener.mode, None);
        assert!(listener.defer_accept, "http over TCP defers accept");
        let upstream = &config.upstreams[0];
        assert_eq!(upstream.pool_size, 64);
        assert_eq!(upstream.max_connections, 0);
        assert_eq!(upstream.idle_timeout, Duration::from_secs(50));
        assert_eq!(upstream.connect_timeout, Duration::from_secs(2));
        assert_eq!(upstream.response_timeout, Duration::from_secs(60));
        assert_eq!(upstream.max_lifetime, None);
        assert_eq!(upstream.max_requests, 0);
        assert_eq!(upstream.server_keepalive, None);
        assert_eq!(upstream.time_wait, UpstreamTimeWait::Proxy);
    }

    #[test]
    fn admin_listen_off_or_empty_disables_admin() {
        for off in ["off", ""] {
            let config = parse(&format!("[admin]\nlisten = \"{off}\"\n{MINIMAL}")).unwrap();
            assert_eq!(config.admin.listen, None, "listen = {off:?}");
        }
    }

    #[test]
    fn hostnames_are_resolved_at_load() {
        let text = MINIMAL.replace("127.0.0.1:8081", "localhost:8081");
        let config = parse(&text).unwrap();
        match &config.upstreams[0].servers[0] {
            Address::Tcp(addr) => {
                assert!(addr.ip().is_loopback());
                assert_eq!(addr.port(), 8081);
            }
            other => panic!("resolved to {other:?}"),
        }
    }

    #[test]
    fn unknown_top_level_key_names_its_line_and_key() {
        let message = error(&format!("workers = 1\nwrokers = 2\n{MINIMAL}"));
        assert!(
            message.starts_with("test.toml:2: key `wrokers`: unknown field `wrokers`"),
            "{message}"
        );
    }

    #[test]
    fn unknown_listener_key_names_its_line_and_key() {
        let message = error(&with_listener_key("time_wiat = \"none\""));
        assert!(
            message.starts_with("test.toml:6: key `listener[0].time_wiat`:"),
            "{message}"
        );
        assert!(message.contains("unknown field `time_wiat`"), "{message}");
    }

    #[test]
    fn missing_required_key_names_the_key() {
        let text = MINIMAL.replace("listen = \"127.0.0.1:8080\"\n", "");
        let message = error(&text);
        assert!(
            message.starts_with("test.toml:2: key `listener[0].listen`:"),
            "{message}"
        );
        assert!(message.contains("missing field `listen`"), "{message}");
    }

    #[test]
    fn listener_naming_a_missing_upstream_is_an_error_at_that_line() {
        let text = MINIMAL.replace("upstream = \"web\"", "upstream = \"api\"");
        let message = error(&text);
        assert!(
            message.starts_with("test.toml:5: key `listener[0].upstream`:"),
            "{message}"
        );
        assert!(
            message.contains("no [[upstream]] is named `api` (defined: `web`)"),
            "{message}"
        );
    }

    #[test]
    fn duplicate_listener_name_is_an_error_at_the_second() {
        let text = format!(
            "{MINIMAL}\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8090\"\nupstream = \"web\"\n"
        );
        let message = error(&text);
        assert!(
            message.starts_with("test.toml:12: key `listener[1].name`:"),
            "{message}"
        );
        assert!(
            message.contains("already used by `listener[0].name` (line 3)"),
            "{message}"
        );
    }

    #[test]
    fn duplicate_upstream_name_is_an_error_at_the_second() {
        let text =
            format!("{MINIMAL}\n[[upstream]]\nname = \"web\"\nservers = [\"127.0.0.1:9\"]\n");
        let message = error(&text);
        assert!(
            message.starts_with("test.toml:12: key `upstream[1].name`:"),
            "{message}"
        );
        assert!(
            message.contains("already used by `upstream[0].name` (line 8)"),
            "{message}"
        );
    }

    #[test]
    fn duplicate_listen_address_is_an_error() {
        let text = format!(
            "{MINIMAL}\n[[listener]]\nname = \"other\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"web\"\n"
        );
        let message = error(&text);
        assert!(
            message.starts_with("test.toml:13: key `listener[1].listen`:"),
            "{message}"
        );
        assert!(
            message.contains("`listener[0].listen` (line 4)"),
            "{message}"
        );

        let text = MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:9901");
        let message = error(&text);
        assert!(
            message.contains(
                "key `listener[0].listen`: 127.0.0.1:9901 is already the address of `admin.listen`"
            ),
            "{message}"
        );
    }

    #[test]
    fn port_zero_listeners_do_not_clash() {
        let text = format!(
            "{MINIMAL}\n[[listener]]\nname = \"other\"\nlisten = \"127.0.0.1:0\"\nupstream = \"web\"\n"
        )
        .replace("127.0.0.1:8080", "127.0.0.1:0");
        assert_eq!(parse(&text).unwrap().listeners.len(), 2);
    }

    #[test]
    fn bad_listen_address_is_an_error_at_its_line() {
        let message = error(&MINIMAL.replace("127.0.0.1:8080", "127.0.0.1"));
        assert!(
            message.starts_with("test.toml:4: key `listener[0].listen`:"),
            "{message}"
        );
        assert!(message.contains("is not HOST:PORT"), "{message}");

        let message = error(&MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:99999"));
        assert!(message.contains("has no valid port"), "{message}");

        let message = error(&MINIMAL.replace("127.0.0.1:8080", "::1:80"));
        assert!(message.contains("expected [V6]:PORT"), "{message}");
    }

    #[test]
    fn bad_server_address_is_an_error_at_its_own_line() {
        let text = MINIMAL.replace(
            "servers = [\"127.0.0.1:8081\"]",
            "servers = [\n  \"127.0.0.1:8081\",\n  \"127.0.0.1\",\n]",
        );
        let message = error(&text);
        assert!(
            message.starts_with("test.toml:11: key `upstream[0].servers[1]`:"),
            "{message}"
        );
    }

    #[test]
    fn empty_server_list_is_an_error() {
        let message = error(&MINIMAL.replace("[\"127.0.0.1:8081\"]", "[]"));
        assert!(
            message.starts_with("test.toml:9: key `upstream[0].servers`:"),
            "{message}"
        );
    }

    #[test]
    fn zero_pool_size_is_an_error_at_its_line() {
        let message = error(&format!("{MINIMAL}pool_size = 0\n"));
        assert!(
            message.starts_with("test.toml:10: key `upstream[0].pool_size`:"),
            "{message}"
        );
        assert!(message.contains("at least 1"), "{message}");
    }

    #[test]
    fn unparsable_duration_is_an_error_at_its_line() {
        let message = error(&format!("{MINIMAL}idle_timeout = \"50 seconds\"\n"));
        assert!(
            message.starts_with("test.toml:10: key `upstream[0].idle_timeout`:"),
            "{message}"
        );
        assert!(
            message.contains("invalid duration `50 seconds`"),
            "{message}"
        );

        let message = error(&with_listener_key("linger = -1"));
        assert!(
            message.starts_with("test.toml:6: key `listener[0].linger`:"),
            "{message}"
        );
    }

    #[test]
    fn unknown_word_lists_the_accepted_ones() {
        let message = error(&with_listener_key("time_wait = \"server\""));
        assert!(
            message.starts_with("test.toml:6: key `listener[0].time_wait`:"),
            "{message}"
        );
        assert!(
            message.contains("expected one of `client`, `proxy`, `none`"),
            "{message}"
        );
    }

    #[test]
    fn mode_is_only_for_unix_listeners_and_must_be_octal() {
        let message = error(&with_listener_key("mode = \"0660\""));
        assert!(
            message.starts_with("test.toml:6: key `listener[0].mode`:"),
            "{message}"
        );

        let unix = MINIMAL.replace("127.0.0.1:8080", "unix:/tmp/w.sock");
        for bad in ["\"0980\"", "\"17777\"", "\"\"", "660"] {
            let text = unix.replace(
                "upstream = \"web\"\n",
                &format!("upstream = \"web\"\nmode = {bad}\n"),
            );
            let message = error(&text);
            assert!(
                message.starts_with("test.toml:6: key `listener[0].mode`:"),
                "{bad}: {message}"
            );
        }
    }

    #[test]
    fn single_bracket_table_suggests_double_brackets() {
        let text = MINIMAL.replace("[[listener]]", "[listener]");
        let message = error(&text);
        assert!(
            message.starts_with("test.toml:2: key `listener`:"),
            "{message}"
        );
        assert!(message.contains("write [[listener]]"), "{message}");
    }

    #[test]
    fn at_least_one_listener_is_required() {
        let message = error("[[upstream]]\nname = \"web\"\nservers = [\"127.0.0.1:8081\"]\n");
        assert!(
            message.contains("key `listener`: at least one [[listener]] is required"),
            "{message}"
        );
    }

    #[test]
    fn syntax_error_names_its_line() {
        let message = error(&format!("{MINIMAL}pool_size = \n"));
        assert!(message.starts_with("test.toml:10:"), "{message}");
    }

    #[test]
    fn durations_parse_in_every_unit() {
        let cases = [
            ("500ms", Duration::from_millis(500)),
            ("2s", Duration::from_secs(2)),
            ("1.5s", Duration::from_millis(1500)),
            ("1m", Duration::from_secs(60)),
            ("1h", Duration::from_secs(3600)),
            (".5m", Duration::from_secs(30)),
            ("10us", Duration::from_micros(10)),
            ("7ns", Duration::from_nanos(7)),
            ("0s", Duration::ZERO),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
            assert_eq!(
                parse_duration(&format_duration(expected)),
                Ok(expected),
                "{text}"
            );
        }
        for bad in [
            "",
            "2",
            "s",
            "2x",
            "1.2.3s",
            "-1s",
            "99999999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn durations_print_in_the_largest_exact_unit() {
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
    }

    #[test]
    fn idle_timeout_not_below_server_keepalive_warns_of_time_wait_on_the_server() {
        let config = parse(&format!(
            "{MINIMAL}idle_timeout = \"75s\"\nserver_keepalive = \"75s\"\n"
        ))
        .unwrap();
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("idle_timeout (75s) is not shorter than server_keepalive (75s)")
        );
        assert!(warnings[0].contains("TIME_WAIT on itself"));

        let config = parse(&format!(
            "{MINIMAL}idle_timeout = \"4s\"\nserver_keepalive = \"5s\"\n"
        ))
        .unwrap();
        assert!(config.warnings().is_empty());
    }

    #[test]
    fn max_connections_below_pool_size_warns() {
        let config = parse(&format!("{MINIMAL}pool_size = 10\nmax_connections = 4\n")).unwrap();
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("max_connections (4) is below pool_size (10)"));
    }

    #[test]
    fn unused_upstream_warns() {
        let text =
            format!("{MINIMAL}\n[[upstream]]\nname = \"spare\"\nservers = [\"127.0.0.1:9\"]\n");
        let warnings = parse(&text).unwrap().warnings();
        assert_eq!(
            warnings,
            vec!["upstream `spare` is not used by any listener".to_string()]
        );
    }

    #[test]
    fn defaults_give_no_warnings() {
        assert!(parse(MINIMAL).unwrap().warnings().is_empty());
    }

    #[test]
    fn effective_config_prints_every_key_and_parses_back_to_the_same_config() {
        for text in [FULL, MINIMAL] {
            let config = parse(text).unwrap();
            let printed = config.to_string();
            let reparsed = parse(&printed).unwrap_or_else(|e| panic!("{e}\n{printed}"));
            assert_eq!(format!("{config:?}"), format!("{reparsed:?}"), "{printed}");
            assert_eq!(printed, reparsed.to_string());
        }
        let printed = parse(MINIMAL).unwrap().to_string();
        for key in [
            "workers = 0",
            "listen = \"127.0.0.1:9901\"",
            "protocol = \"http\"",
            "time_wait = \"client\"",
            "linger = \"2s\"",
            "linger_fallback = \"fin\"",
            "keepalive_timeout = \"1m\"",
            "pool_size = 64",
            "max_connections = 0",
            "idle_timeout = \"50s\"",
            "connect_timeout = \"2s\"",
            "response_timeout = \"1m\"",
            "# max_lifetime",
            "max_requests = 0",
            "# server_keepalive",
            "time_wait = \"proxy\"",
        ] {
            assert!(printed.contains(key), "missing {key:?} in\n{printed}");
        }
    }

    #[test]
    fn effective_config_quotes_names_and_keeps_admin_off() {
        let text = MINIMAL.replace("\"web\"", "\"we\\\"b\\\\\"");
        let config = parse(&format!("[admin]\nlisten = \"off\"\n{text}")).unwrap();
        assert_eq!(config.listeners[0].name, "we\"b\\");
        let reparsed = parse(&config.to_string()).unwrap();
        assert_eq!(format!("{config:?}"), format!("{reparsed:?}"));
    }

    #[test]
    fn shipped_default_config_parses_to_the_defaults() {
        let text = include_str!("../config/waitless.toml");
        let config = Config::parse(text, Path::new("config/waitless.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());
        assert_eq!(
            format!("{:?}", config),
            format!(
                "{:?}",
                Config::parse(MINIMAL, Path::new("config/waitless.toml")).unwrap()
            )
        );
    }

    #[test]
    fn defer_accept_is_refused_where_the_client_does_not_speak_first_or_there_is_no_tcp() {
        let tcp = parse(&with_listener_key("protocol = \"tcp\"")).unwrap();
        assert!(
            !tcp.listeners[0].defer_accept,
            "tcp clients may wait for the server"
        );
        let asked = parse(&with_listener_key(
            "protocol = \"tcp\"\ndefer_accept = true",
        ))
        .unwrap();
        assert!(asked.listeners[0].defer_accept);

        let mysql = with_mysql_users("").replace(
            "protocol = \"mysql\"\n",
            "protocol = \"mysql\"\ndefer_accept = true\n",
        );
        let message = error(&mysql);
        assert!(
            message.starts_with("test.toml:7: key `listener[0].defer_accept`:"),
            "{message}"
        );
        assert!(message.contains("greeting"), "{message}");

        let unix = with_listener_key("defer_accept = true")
            .replace("\"127.0.0.1:8080\"", "\"unix:/run/w.sock\"");
        let message = error(&unix);
        assert!(message.contains("listener[0].defer_accept"), "{message}");
        assert!(message.contains("unix socket"), "{message}");
        let unix = MINIMAL.replace("\"127.0.0.1:8080\"", "\"unix:/run/w.sock\"");
        assert!(!parse(&unix).unwrap().listeners[0].defer_accept);
    }

    /// MINIMAL with a mysql listener and the given `[[mysql_user]]` lines appended.
    fn with_mysql_users(users: &str) -> String {
        format!(
            "{}{users}",
            MINIMAL.replace(
                "upstream = \"web\"\n",
                "upstream = \"web\"\nprotocol = \"mysql\"\n"
            )
        )
    }

    #[test]
    fn mysql_users_take_a_password_or_an_environment_variable() {
        std::env::set_var("WAITLESS_TEST_DB_PASSWORD", "from-env");
        let config = parse(&with_mysql_users(
            "\n[[mysql_user]]\nuser = \"app\"\npassword = \"apppw\"\n\n\
             [[mysql_user]]\nuser = \"ro\"\npassword_env = \"WAITLESS_TEST_DB_PASSWORD\"\n",
        ))
        .unwrap();
        assert_eq!(config.mysql_user("app").unwrap().password, "apppw");
        let ro = config.mysql_user("ro").unwrap();
        assert_eq!(ro.password, "from-env");
        assert_eq!(
            ro.password_env.as_deref(),
            Some("WAITLESS_TEST_DB_PASSWORD")
        );
        // Neither the effective config nor the debug form shows a password.
        let shown = format!("{config}\n{config:?}");
        assert!(
            !shown.contains("apppw") && !shown.contains("from-env"),
            "{shown}"
        );
        assert!(
            shown.contains("password_env = \"WAITLESS_TEST_DB_PASSWORD\""),
            "{shown}"
        );
    }

    #[test]
    fn mysql_user_errors_name_their_key_and_line() {
        let users = "\n[[mysql_user]]\nuser = \"app\"\n";
        let message = error(&with_mysql_users(users));
        assert!(
            message.starts_with("test.toml:12: key `mysql_user[0]`:"),
            "{message}"
        );
        assert!(
            message.contains("password or password_env is required"),
            "{message}"
        );

        let both = format!("{users}password = \"a\"\npassword_env = \"B\"\n");
        let message = error(&with_mysql_users(&both));
        assert!(
            message.starts_with("test.toml:15: key `mysql_user[0].password_env`:"),
            "{message}"
        );

        let unset = format!("{users}password_env = \"WAITLESS_TEST_SURELY_UNSET\"\n");
        let message = error(&with_mysql_users(&unset));
        assert!(
            message.starts_with("test.toml:14: key `mysql_user[0].password_env`:"),
            "{message}"
        );
        assert!(
            message.contains("`WAITLESS_TEST_SURELY_UNSET` is not set"),
            "{message}"
        );

        let twice = format!("{users}password = \"a\"\n{users}password = \"b\"\n");
        let message = error(&with_mysql_users(&twice));
        assert!(
            message.starts_with("test.toml:17: key `mysql_user[1].user`:"),
            "{message}"
        );
        assert!(
            message.contains("already defined by `mysql_user[0].user` (line 13)"),
            "{message}"
        );
    }

    #[test]
    fn a_mysql_listener_needs_mysql_users() {
        let message = error(&with_mysql_users(""));
        assert!(
            message.starts_with("test.toml:6: key `listener[0].protocol`:"),
            "{message}"
        );
        assert!(message.contains("at least one [[mysql_user]]"), "{message}");
    }

    /// Inputs the config fuzz target (fuzz/fuzz_targets/config.rs) crashed on: each must be
    /// an error naming the file, not a panic.
    #[test]
    fn fuzz_crashers_are_errors_not_panics() {
        for text in ["=={\n.", "=={7'\u{6}{\n\t)\t=\u{7f}\0\n.\t"] {
            let e = Config::parse(text, Path::new("fuzz.toml")).unwrap_err();
            assert_eq!(e.file, Path::new("fuzz.toml"), "{text:?}");
        }
    }
}
