//! The configuration model and the public way in: `Config::load` reads a file, parses it and
//! resolves it; the steps are also open one by one (`parse`, then `Parsed::resolve`).
//!
//! A config is read from TOML. Every error names the file, the line and the key, because an
//! operator who restarts a proxy at 3 a.m. should not have to guess which of forty lines is
//! wrong. Loading is two steps, kept apart so that the first can be fuzzed, tested and re-run
//! without touching the network or the environment:
//!
//! 1. **Parsing is pure** ([`parse`]): text in, a checked [`Config<Unresolved>`] out, with host
//!    names and `password_env` as written. Every rule knowable from the file is checked here,
//!    including those that would otherwise stop start-up (two protocols on one upstream,
//!    overlapping listen addresses, a unix path too long to bind).
//! 2. **Resolving** ([`Parsed::resolve`]) looks host names up and reads `password_env`, giving
//!    the [`Config`] the proxy runs.
//!
//! The jobs live one per file: `raw` (the file as written, serde and defaults), `validate`
//! (the cross-checks and warnings), `resolve`, `print` (the effective config), `locate`
//! (file/line/key of an error) and `units` (durations, modes, addresses, keywords).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::close::ClientPolicy;

mod locate;
mod print;
mod raw;
mod resolve;
mod units;
mod validate;

#[cfg(test)]
mod tests;

use locate::Locator;
// The close policies are the close mechanism's types; the config names them.
pub use crate::close::policy::{ClientTimeWait, LingerFallback, UpstreamTimeWait};
pub use resolve::{parse_address, Checking, Resolve, System};
pub use units::{format_duration, parse_duration, parse_endpoint, parse_mode};

/// The whole, validated configuration. `Config` alone is the resolved one the proxy runs;
/// `Config<Unresolved>` is what pure parsing gives.
#[derive(Debug, Clone)]
pub struct Config<S: Stage = Resolved> {
    /// The file this config was read from (for messages and reloads).
    pub source: PathBuf,
    /// Worker threads of the runtime; 0 = one per core.
    pub workers: usize,
    /// On SIGTERM, how long requests and sessions in flight may take to finish.
    pub drain_timeout: Duration,
    /// The admin listener (metrics, stats, health).
    pub admin: Admin<S>,
    /// Client-facing listeners.
    pub listeners: Vec<Listener<S>>,
    /// Backend groups the listeners forward to.
    pub upstreams: Vec<Upstream<S>>,
    /// Accounts of mysql listeners (`[[mysql_user]]`).
    pub mysql_users: Vec<MysqlUser<S>>,
    /// `[log]`.
    pub log: Log,
    /// `[resolver]`: how server names are looked up again while running.
    pub resolver: Resolver,
}

/// `[resolver]`: the DNS servers and the floor under record TTLs that every upstream's
/// names are followed with (see `crate::dns`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolver {
    /// `nameservers`: asked over UDP, and TCP for a truncated answer; empty: the system's
    /// `/etc/resolv.conf` (its nameservers, search domains and options).
    pub nameservers: Vec<SocketAddr>,
    /// `min_interval`: a name is not looked up more often than this, whatever its TTL (a TTL
    /// of 0 would otherwise be a lookup loop).
    pub min_interval: Duration,
}

/// A server written as a host name, and what it resolved to when the config was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    /// The host as written.
    pub host: String,
    /// The port as written.
    pub port: u16,
    /// Every address of the answer (IPv4 when it has any, else IPv6), sorted.
    pub addrs: Vec<SocketAddr>,
}

/// How far a config has been carried: the types of the parts that the resolve step fills in.
/// Everything else is the same at both stages, so there is one model, not two.
pub trait Stage: fmt::Debug + Clone + PartialEq {
    /// A listen or server address: an [`Endpoint`] as written, an [`Address`] once resolved.
    type Address: fmt::Debug + fmt::Display + Clone + PartialEq + Eq + validate::Place;
    /// The admin listener's address: an [`Endpoint`] as written, an [`Address`] (TCP or
    /// unix) once resolved.
    type AdminAddress: fmt::Debug + fmt::Display + Clone + PartialEq + Eq;
    /// A mysql user's password: as written, `None` when it comes from `password_env`; once
    /// resolved, the password itself.
    type Password: Clone + PartialEq + Eq;
    /// A listener's TLS: the certificate files as written; once resolved, also loaded.
    type ServerTls: fmt::Debug + Clone;
    /// An upstream's TLS: the files and names as written; once resolved, also loaded.
    type ClientTls: fmt::Debug + Clone + PartialEq;

    /// The admin address as a listen address, to check listeners against it.
    fn admin_address(admin: &Self::AdminAddress) -> Self::Address;

    /// A listener's certificate files, at either stage.
    fn cert_files(tls: &Self::ServerTls) -> &[crate::tls::CertFiles];

    /// An upstream's TLS as written, at either stage.
    fn upstream_tls(tls: &Self::ClientTls) -> &crate::tls::UpstreamTlsFiles;
}

/// The stage pure parsing gives: host names and `password_env` as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unresolved;

/// The stage the proxy runs: every name looked up, every password read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved;

/// A config parsed from text and checked, ready to be resolved. It keeps what it needs to
/// name the line of a key, so that a name that does not resolve is reported where it is
/// written.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The config as written, defaults filled in.
    pub config: Config<Unresolved>,
    /// Where each key is written, for the resolve step's errors.
    at: Locator,
}

/// `[log]`: the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// `access`: `"off"` (the default), `"stderr"`, or a file (relative to the config's
    /// directory), appended to and reopened on SIGHUP.
    pub access: crate::access::Destination,
    /// `format`: `"json"` (the default) or `"text"`.
    pub format: crate::access::Format,
    /// `queue`: lines that may wait for the writer before new ones are dropped (counted);
    /// read at the first start of the log, a change needs a restart.
    pub queue: usize,
}

impl Default for Log {
    fn default() -> Log {
        Log {
            access: crate::access::Destination::Off,
            format: crate::access::Format::Json,
            queue: crate::access::DEFAULT_QUEUE,
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct Admin<S: Stage = Resolved> {
    /// Where /metrics, /stats and /healthz are served (`HOST:PORT` or `unix:/path`); None
    /// disables the admin listener.
    pub listen: Option<S::AdminAddress>,
    /// `mode`: the file mode of a unix admin socket, as written; `unix_mode` gives the
    /// one applied.
    pub mode: Option<u32>,
    /// The bearer token that POST endpoints (/reload) require; None leaves them open.
    /// Once resolved, also the one read from `token_env`.
    pub token: Option<String>,
    /// The environment variable the token is read from, if it comes from one.
    pub token_env: Option<String>,
}

/// Where a listener accepts or a server is reached, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `HOST:PORT` or `[V6]:PORT`, resolved at load time (a server name: its first address;
    /// the others are in the upstream's `names`).
    Tcp(SocketAddr),
    /// `unix:/path`.
    Unix(PathBuf),
    /// `systemd:NAME`: a listening socket systemd passed (socket activation), by its
    /// `FileDescriptorName=`. Listeners only.
    Systemd(String),
}

/// An address as written in the file, before any name is looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// An IP literal and port: nothing to look up.
    Ip(SocketAddr),
    /// A host name and port, looked up by the resolve step.
    Name {
        /// The host as written.
        host: String,
        /// The port.
        port: u16,
    },
    /// `unix:/path`.
    Unix(PathBuf),
    /// `systemd:NAME`, checked against the passed sockets by the resolve step.
    Systemd(String),
}

/// The protocol a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    Http,
    Tcp,
    Mysql,
}

/// How a mysql listener lends server connections to its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooling {
    /// For the client's whole session, reset when it ends.
    #[default]
    Session,
    /// For one statement in autocommit or one transaction; a client whose statements leave
    /// state on the server connection is pinned to it for the rest of its session.
    Transaction,
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
pub struct Listener<S: Stage = Resolved> {
    /// Unique name, used in metrics and logs.
    pub name: String,
    /// Where to accept.
    pub listen: S::Address,
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
    /// listen(2)'s backlog: handshaken connections the kernel queues until accepted.
    pub listen_backlog: u32,
    /// http: request header fields whose names contain `_` are not forwarded (as nginx's
    /// `underscores_in_headers off`), for servers that read `_` as `-` and could be told a
    /// forged `X_Forwarded_For` for the real one. Framing names with `_` are refused anyway.
    pub drop_underscore_headers: bool,
    /// mysql: whether a client holds a server connection for its session or per transaction.
    pub pooling: Pooling,
    /// TLS from clients: the certificates (as written), then loaded (once resolved).
    pub tls: Option<S::ServerTls>,
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
    /// How a server is probed.
    pub kind: CheckKind,
    /// The path an http check asks for.
    pub path: String,
    /// Time between probes of one server.
    pub interval: Duration,
}

/// `[[upstream]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream<S: Stage = Resolved> {
    /// Unique name, referenced by listeners.
    pub name: String,
    /// The servers, tried round-robin.
    pub servers: Vec<S::Address>,
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
    /// TLS to the servers: as written, then loaded (once resolved).
    pub tls: Option<S::ClientTls>,
    /// The longest time between lookups of a server name (a record's shorter TTL comes
    /// first); None (`"off"`): names are resolved when the config is loaded, only.
    pub resolve_interval: Option<Duration>,
    /// The `[resolver]` it follows its names with: a change of it is a change of the
    /// upstream (a reload gives it a new pool).
    pub resolver: Resolver,
    /// Per server, in `servers` order: the name it was written as and its addresses. Filled
    /// by the resolve step; empty before it.
    pub names: Vec<Option<Named>>,
}

/// `[[mysql_user]]`: an account that clients of mysql listeners log in as and that waitless
/// logs in to the servers with: the same name and password on both sides.
#[derive(Clone, PartialEq, Eq)]
pub struct MysqlUser<S: Stage = Resolved> {
    /// The account name.
    pub user: String,
    /// The password, from the file or (once resolved) from the environment.
    pub password: S::Password,
    /// The environment variable the password is read from, if it comes from one.
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

// === impl Config ===

impl Config {
    /// Reads the file at `path`, parses, checks and resolves it.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Parses, checks and resolves `text` (looking names up with the system's resolver),
    /// naming `path` in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        parse(text, path)?.resolve(&System)
    }

    /// As [`Config::load`], resolving with `with` (`Checking` for `waitless check`).
    pub fn load_with(path: &Path, with: &impl Resolve) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        parse(&text, path)?.resolve(with)
    }
}

impl<S: Stage> Config<S> {
    /// The upstream a listener forwards to (validation guarantees it exists).
    pub fn upstream(&self, name: &str) -> Option<&Upstream<S>> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// The `[[mysql_user]]` named `user`.
    pub fn mysql_user(&self, user: &str) -> Option<&MysqlUser<S>> {
        self.mysql_users.iter().find(|u| u.user == user)
    }
}

/// Parses and checks `text`, naming `path` in errors: no name is looked up, no variable read,
/// no file opened. Every rule that does not need the network or the environment is checked.
pub fn parse(text: &str, path: &Path) -> Result<Parsed, ConfigError> {
    let at = Locator::new(text, path);
    let config = raw::parse(text, &at)?;
    config.validate(&at)?;
    Ok(Parsed { config, at })
}

// === impl Listener ===

impl<S: Stage> Listener<S> {
    /// The client-side close policy its settings ask for.
    pub fn close_policy(&self) -> ClientPolicy {
        ClientPolicy::new(self.time_wait, self.linger, self.linger_fallback)
    }
}

// === impl Stage ===

impl Stage for Unresolved {
    type Address = Endpoint;
    type AdminAddress = Endpoint;
    type Password = Option<String>;
    type ServerTls = Vec<crate::tls::CertFiles>;
    type ClientTls = crate::tls::UpstreamTlsFiles;

    fn admin_address(admin: &Endpoint) -> Endpoint {
        admin.clone()
    }

    fn cert_files(tls: &Self::ServerTls) -> &[crate::tls::CertFiles] {
        tls
    }

    fn upstream_tls(tls: &Self::ClientTls) -> &crate::tls::UpstreamTlsFiles {
        tls
    }
}

impl Stage for Resolved {
    type Address = Address;
    type AdminAddress = Address;
    type Password = String;
    type ServerTls = crate::tls::ServerTls;
    type ClientTls = crate::tls::ClientTls;

    fn admin_address(admin: &Address) -> Address {
        admin.clone()
    }

    fn cert_files(tls: &Self::ServerTls) -> &[crate::tls::CertFiles] {
        &tls.files
    }

    fn upstream_tls(tls: &Self::ClientTls) -> &crate::tls::UpstreamTlsFiles {
        &tls.files
    }
}

// === impl Parsed ===

/// The config as written, defaults filled in: text that parses back to the same config.
impl fmt::Display for Parsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.config.fmt(f)
    }
}

// === impl MysqlUser ===

/// The password is never shown.
impl<S: Stage> fmt::Debug for MysqlUser<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MysqlUser")
            .field("user", &self.user)
            .field("password_env", &self.password_env)
            .finish_non_exhaustive()
    }
}

// === impl Admin ===

/// A unix admin socket's mode when `mode` is absent: the admin listener reloads and
/// upgrades, so only its owner may connect.
pub const DEFAULT_ADMIN_MODE: u32 = 0o600;

impl<S: Stage> Admin<S> {
    /// The file mode a unix admin socket is given.
    pub fn unix_mode(&self) -> u32 {
        self.mode.unwrap_or(DEFAULT_ADMIN_MODE)
    }
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: Some(Address::Tcp(raw::DEFAULT_ADMIN_LISTEN)),
            mode: None,
            token: None,
            token_env: None,
        }
    }
}

impl Default for Admin<Unresolved> {
    fn default() -> Self {
        Admin {
            listen: Some(Endpoint::Ip(raw::DEFAULT_ADMIN_LISTEN)),
            mode: None,
            token: None,
            token_env: None,
        }
    }
}
