//! The file as written: serde's view of the TOML, and the defaults that turn it into the
//! model. Nothing here looks a name up or reads the environment.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::locate::Locator;
use super::units::{parse_duration, parse_endpoint, parse_mode, Keyword};
use super::{
    Admin, Balance, CheckKind, ClientTimeWait, Config, ConfigError, Endpoint, HealthCheck,
    LingerFallback, Listener, Log, MysqlUser, Pooling, Protocol, ProxyProtocol, Resolver,
    Unresolved, Upstream, UpstreamTimeWait,
};

// Defaults live here, once, so the parser, the printer and config/waitless.toml cannot disagree.

/// `[admin] listen` when the key is absent.
pub(super) const DEFAULT_ADMIN_LISTEN: SocketAddr =
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
/// `resolve_interval` when absent: a moved server is followed within half a minute even when
/// its record says to keep it for an hour.
pub(super) const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// `[resolver] min_interval` when absent.
pub(super) const DEFAULT_MIN_INTERVAL: Duration = Duration::from_secs(1);

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
    /// `[log]`.
    log: Option<RawLog>,
    /// `[resolver]`.
    resolver: Option<RawResolver>,
}

/// `[resolver]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResolver {
    /// `nameservers`: `IP:PORT` each.
    nameservers: Option<Vec<toml::Spanned<String>>>,
    min_interval: Option<RawDuration>,
}

/// `[log]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    /// `access`: `off`, `stderr` or a path.
    access: Option<String>,
    format: Option<RawWord<crate::access::Format>>,
    queue: Option<usize>,
}

/// `[admin]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    /// `listen`; absent means the default address.
    listen: Option<RawAdminListen>,
    /// `mode`: the file mode of a unix admin socket.
    mode: Option<RawMode>,
    /// `token`: the bearer token write endpoints require.
    token: Option<String>,
    /// `token_env`: the variable the token is read from instead.
    token_env: Option<String>,
}

/// `[[listener]]` as written; the fields mirror [`Listener`], None where the key is absent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: String,
    listen: RawEndpoint,
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
    listen_backlog: Option<u32>,
    drop_underscore_headers: Option<bool>,
    pooling: Option<RawWord<Pooling>>,
    tls: Option<RawTls>,
}

/// `tls = { cert, key }` or `tls = { certs = [{ cert, key }, ...] }` as written.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a table: tls = { cert = \"FILE\", key = \"FILE\" }, or tls = { certs = [{ cert = \"FILE\", key = \"FILE\" }, ...] }"
)]
enum RawTls {
    One(RawCert),
    Many(RawCerts),
}

/// One certificate chain and its key, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCert {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

/// `certs = [...]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCerts {
    certs: Vec<RawCert>,
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
    tls: Option<RawUpstreamTls>,
    /// A duration, or `"off"`.
    resolve_interval: Option<RawInterval>,
}

/// A duration, or `"off"` for none.
struct RawInterval(Option<Duration>);

/// `[[upstream]] tls = { ca, server_name, verify, cert, key }` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    ca: Option<std::path::PathBuf>,
    server_name: Option<String>,
    verify: Option<bool>,
    cert: Option<std::path::PathBuf>,
    key: Option<std::path::PathBuf>,
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
struct RawEndpoint(Endpoint);

/// The admin address: `HOST:PORT`, `unix:/path`, or `""` / `"off"` for none.
struct RawAdminListen(Option<Endpoint>);

/// A unix socket file mode, written as an octal string.
struct RawMode(u32);

/// One of the words of a [`Keyword`] enum.
struct RawWord<T>(T);

/// Deserializes `text` and fills in defaults. Fails on what serde refuses (syntax, types,
/// unknown keys) and on a bad server address, which is parsed here rather than by the
/// deserializer so that the error names the element's own line.
pub(super) fn parse(text: &str, at: &Locator) -> Result<Config<Unresolved>, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| at.deserialize_error(&e))?;
    raw.into_config(at)
}

// === impl RawConfig ===

impl RawConfig {
    fn into_config(self, at: &Locator) -> Result<Config<Unresolved>, ConfigError> {
        let admin = match self.admin {
            Some(a) => {
                if a.token.is_some() && a.token_env.is_some() {
                    return Err(at.error(
                        "admin.token_env",
                        "give the admin token or token_env, not both",
                    ));
                }
                if a.token.as_deref() == Some("") {
                    return Err(at.error(
                        "admin.token",
                        "an empty token would let anyone write; leave the key out instead",
                    ));
                }
                Admin {
                    listen: a.listen.map_or_else(
                        || Admin::<Unresolved>::default().listen,
                        |RawAdminListen(listen)| listen,
                    ),
                    mode: a.mode.map(|m| m.0),
                    token: a.token,
                    token_env: a.token_env,
                }
            }
            None => Admin::<Unresolved>::default(),
        };
        let resolver = match self.resolver {
            Some(r) => r.into_resolver(at)?,
            None => Resolver {
                nameservers: Vec::new(),
                min_interval: DEFAULT_MIN_INTERVAL,
            },
        };
        let upstreams = self
            .upstream
            .into_iter()
            .enumerate()
            .map(|(i, u)| u.into_upstream(i, at, at.file().parent(), &resolver))
            .collect::<Result<Vec<_>, _>>()?;
        let mysql_users = self
            .mysql_user
            .into_iter()
            .enumerate()
            .map(|(i, u)| u.into_user(i, at))
            .collect::<Result<Vec<_>, _>>()?;
        let log = self
            .log
            .map_or_else(Log::default, |l| l.into_log(at.file().parent()));
        Ok(Config {
            source: at.file().to_path_buf(),
            workers: self.workers.unwrap_or(0),
            drain_timeout: self.drain_timeout.map_or(DEFAULT_DRAIN_TIMEOUT, |d| d.0),
            admin,
            listeners: self
                .listener
                .into_iter()
                .map(|l| l.into_listener(at.file().parent()))
                .collect(),
            upstreams,
            mysql_users,
            log,
            resolver,
        })
    }
}

// === impl RawResolver ===

impl RawResolver {
    fn into_resolver(self, at: &Locator) -> Result<Resolver, ConfigError> {
        let nameservers = self
            .nameservers
            .unwrap_or_default()
            .iter()
            .map(|ns| {
                ns.get_ref().parse::<SocketAddr>().map_err(|_| {
                    at.error_at(
                        ns.span(),
                        format!(
                            "nameserver `{}` is not IP:PORT (e.g. \"127.0.0.1:53\"); a \
                             nameserver cannot be a name",
                            ns.get_ref()
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let min_interval = self.min_interval.map_or(DEFAULT_MIN_INTERVAL, |d| d.0);
        if min_interval.is_zero() {
            return Err(at.error(
                "resolver.min_interval",
                "must be more than 0: a record with a TTL of 0 would be looked up in a loop",
            ));
        }
        Ok(Resolver {
            nameservers,
            min_interval,
        })
    }
}

// === impl RawLog ===

impl RawLog {
    /// `base`: the config file's directory, which a relative log path starts from.
    fn into_log(self, base: Option<&std::path::Path>) -> Log {
        use crate::access::Destination;
        let access = match self.access.as_deref() {
            None | Some("" | "off") => Destination::Off,
            Some("stderr") => Destination::Stderr,
            Some(path) => {
                let path = std::path::PathBuf::from(path);
                match base {
                    Some(base) if path.is_relative() => Destination::File(base.join(path)),
                    _ => Destination::File(path),
                }
            }
        };
        Log {
            access,
            format: self.format.map(|w| w.0).unwrap_or_default(),
            queue: self.queue.unwrap_or(crate::access::DEFAULT_QUEUE).max(1),
        }
    }
}

// === impl RawMysqlUser ===

impl RawMysqlUser {
    /// Exactly one of `password` and `password_env`; the variable is read by the resolve step.
    fn into_user(self, i: usize, at: &Locator) -> Result<MysqlUser<Unresolved>, ConfigError> {
        match (&self.password, &self.password_env) {
            (Some(_), None) | (None, Some(_)) => Ok(MysqlUser {
                user: self.user,
                password: self.password,
                password_env: self.password_env,
            }),
            (Some(_), Some(_)) => Err(at.error(
                format!("mysql_user[{i}].password_env"),
                "give either password or password_env, not both",
            )),
            (None, None) => Err(at.error(
                format!("mysql_user[{i}]"),
                "password or password_env is required",
            )),
        }
    }
}

// === impl RawListener ===

impl RawListener {
    /// `base`: the config file's directory, which relative certificate paths start from.
    fn into_listener(self, base: Option<&std::path::Path>) -> Listener<Unresolved> {
        let protocol = self.protocol.map(|w| w.0).unwrap_or_default();
        // Clients of HTTP speak first; of tcp, perhaps not; of mysql, never.
        let defer_default =
            protocol == Protocol::Http && !matches!(self.listen.0, Endpoint::Unix(_));
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
            listen_backlog: self
                .listen_backlog
                .unwrap_or(crate::listener::DEFAULT_BACKLOG),
            drop_underscore_headers: self.drop_underscore_headers.unwrap_or(false),
            pooling: self.pooling.map(|w| w.0).unwrap_or_default(),
            tls: self.tls.map(|tls| {
                let certs = match tls {
                    RawTls::One(cert) => vec![cert],
                    RawTls::Many(many) => many.certs,
                };
                let at = |p: std::path::PathBuf| match base {
                    Some(base) if p.is_relative() => base.join(p),
                    _ => p,
                };
                certs
                    .into_iter()
                    .map(|c| crate::tls::CertFiles {
                        cert: at(c.cert),
                        key: at(c.key),
                    })
                    .collect()
            }),
        }
    }
}

// === impl RawUpstream ===

impl RawUpstream {
    /// `base`: the config file's directory, which relative certificate paths start from.
    fn into_upstream(
        self,
        i: usize,
        at: &Locator,
        base: Option<&std::path::Path>,
        resolver: &Resolver,
    ) -> Result<Upstream<Unresolved>, ConfigError> {
        let path = |p: std::path::PathBuf| match base {
            Some(base) if p.is_relative() => base.join(p),
            _ => p,
        };
        let tls = match self.tls {
            None => None,
            Some(t) => Some(crate::tls::UpstreamTlsFiles {
                ca: t.ca.map(path),
                server_name: t.server_name,
                verify: t.verify.unwrap_or(true),
                client: match (t.cert, t.key) {
                    (Some(cert), Some(key)) => Some(crate::tls::CertFiles {
                        cert: path(cert),
                        key: path(key),
                    }),
                    (None, None) => None,
                    _ => {
                        return Err(at.error(
                            format!("upstream[{i}].tls"),
                            "a client certificate needs both `cert` and `key`",
                        ))
                    }
                },
            }),
        };
        let servers = self
            .servers
            .iter()
            .map(|server| {
                parse_endpoint(server.get_ref())
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
            tls,
            resolve_interval: self
                .resolve_interval
                .map_or(Some(DEFAULT_RESOLVE_INTERVAL), |r| r.0),
            resolver: resolver.clone(),
            names: Vec::new(),
        })
    }
}

// === impl RawDuration, RawEndpoint, RawAdminListen, RawMode, RawWord ===

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

impl<'de> Deserialize<'de> for RawInterval {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(IntervalVisitor)
    }
}

/// As [`DurationVisitor`], and `"off"`.
struct IntervalVisitor;

impl Visitor<'_> for IntervalVisitor {
    type Value = RawInterval;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as \"30s\", whole seconds, or \"off\"")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<RawInterval, E> {
        match text {
            "off" => Ok(RawInterval(None)),
            _ => match DurationVisitor.visit_str::<E>(text)? {
                RawDuration(d) if d.is_zero() => Err(E::custom(
                    "must be more than 0 (\"off\" resolves names at load only)",
                )),
                RawDuration(d) => Ok(RawInterval(Some(d))),
            },
        }
    }

    fn visit_u64<E: de::Error>(self, secs: u64) -> Result<RawInterval, E> {
        self.visit_str(&format!("{secs}s"))
    }

    fn visit_i64<E: de::Error>(self, secs: i64) -> Result<RawInterval, E> {
        DurationVisitor
            .visit_i64::<E>(secs)
            .and_then(|_| self.visit_str(&format!("{secs}s")))
    }
}

impl<'de> Deserialize<'de> for RawEndpoint {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_endpoint(&text)
            .map(RawEndpoint)
            .map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for RawAdminListen {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.as_str() {
            "" | "off" => Ok(RawAdminListen(None)),
            _ => match parse_endpoint(&text).map_err(de::Error::custom)? {
                Endpoint::Systemd(_) => Err(de::Error::custom(
                    "the admin listener takes HOST:PORT or unix:/path, not a systemd socket",
                )),
                at => Ok(RawAdminListen(Some(at))),
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
