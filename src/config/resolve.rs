//! The step after parsing that meets the outside world: host names are looked up and
//! `password_env` variables read, through a [`Resolve`], so that parsing stays pure and a
//! test or the fuzzer can run everything before this step without a network.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};

use super::units::parse_endpoint;
use super::{
    Address, Admin, Config, ConfigError, Endpoint, Listener, MysqlUser, Named, Parsed, Protocol,
    Resolved, Unresolved, Upstream,
};

/// Where names and secrets come from.
pub trait Resolve {
    /// The addresses of `host` at `port`, in the resolver's order.
    fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>>;
    /// The value of environment variable `name`, if it is set and UTF-8.
    fn var(&self, name: &str) -> Option<String>;
    /// Whether systemd passed a listening socket named `name` (socket activation).
    fn activated(&self, name: &str) -> bool;
    /// The addresses of an upstream server's `host` at `port`: through `resolver`'s
    /// nameservers when it names some (a name only they know must resolve at start too),
    /// else as [`Resolve::lookup`].
    fn lookup_server(
        &self,
        host: &str,
        port: u16,
        resolver: &super::Resolver,
    ) -> io::Result<Vec<SocketAddr>> {
        let _ = resolver;
        self.lookup(host, port)
    }
}

/// The system's resolver (getaddrinfo) and this process's environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct System;

/// As [`System`], but every `systemd:NAME` counts as passed: `waitless check`, run as
/// ExecStartPre, is given no sockets (systemd passes them to ExecStart alone).
#[derive(Debug, Clone, Copy, Default)]
pub struct Checking;

// === impl Parsed ===

impl Parsed {
    /// Looks every host name up (a listener keeps the first address, an upstream server all of
    /// them, in `names`) and reads every `password_env`,
    /// then checks again what resolving may have changed (two names, one address). Each error
    /// names the key and its line. `self` stays as written, to be resolved again later.
    pub fn resolve(&self, with: &impl Resolve) -> Result<Config, ConfigError> {
        let (written, at) = (&self.config, &self.at);
        let admin =
            match &written.admin.listen {
                None => None,
                Some(endpoint) => match lookup(endpoint, with) {
                    Ok(addr @ (Address::Tcp(_) | Address::Unix(_))) => Some(addr),
                    // The raw layer refuses a systemd admin address; kept an error, not a panic.
                    Ok(Address::Systemd(_)) => return Err(at.error(
                        "admin.listen",
                        "the admin listener takes HOST:PORT or unix:/path, not a systemd socket",
                    )),
                    Err(message) => return Err(at.error("admin.listen", message)),
                },
            };
        let listeners = written
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let listen = lookup(&l.listen, with)
                    .map_err(|message| at.error(format!("listener[{i}].listen"), message))?;
                let tls = l
                    .tls
                    .as_ref()
                    .map(|files| load_tls(l, files))
                    .transpose()
                    .map_err(|message| at.error(format!("listener[{i}].tls"), message))?;
                Ok(with_listen(l, listen, tls))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let upstreams = written
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let (servers, names): (Vec<_>, Vec<_>) = u
                    .servers
                    .iter()
                    .enumerate()
                    .map(|(j, s)| {
                        lookup_server(s, &u.resolver, with).map_err(|message| {
                            at.error(format!("upstream[{i}].servers[{j}]"), message)
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter()
                    .unzip();
                let tls = u
                    .tls
                    .as_ref()
                    .map(|files| {
                        let pairs: Vec<_> = u
                            .servers
                            .iter()
                            .cloned()
                            .zip(servers.iter().cloned())
                            .collect();
                        crate::tls::ClientTls::load(files.clone(), &pairs)
                    })
                    .transpose()
                    .map_err(|message| at.error(format!("upstream[{i}].tls"), message))?;
                Ok(with_servers(u, servers, names, tls))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let mysql_users = written
            .mysql_users
            .iter()
            .enumerate()
            .map(|(i, u)| {
                read_password(u, with)
                    .map_err(|m| at.error(format!("mysql_user[{i}].password_env"), m))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let token = match (&written.admin.token, &written.admin.token_env) {
            (Some(token), _) => Some(token.clone()),
            (None, Some(var)) => match with.var(var) {
                Some(token) if !token.is_empty() => Some(token),
                _ => {
                    return Err(at.error(
                        "admin.token_env",
                        format!("environment variable `{var}` is not set, empty or not UTF-8"),
                    ))
                }
            },
            (None, None) => None,
        };
        let config = Config {
            source: written.source.clone(),
            workers: written.workers,
            drain_timeout: written.drain_timeout,
            admin: Admin {
                listen: admin,
                mode: written.admin.mode,
                token,
                token_env: written.admin.token_env.clone(),
            },
            listeners,
            upstreams,
            mysql_users,
            log: written.log.clone(),
            resolver: written.resolver.clone(),
        };
        config.validate(at)?;
        Ok(config)
    }
}

// === impl System ===

impl Resolve for System {
    fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        Ok((host, port).to_socket_addrs()?.collect())
    }

    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn activated(&self, name: &str) -> bool {
        crate::systemd::has(name)
    }

    fn lookup_server(
        &self,
        host: &str,
        port: u16,
        resolver: &super::Resolver,
    ) -> io::Result<Vec<SocketAddr>> {
        if resolver.nameservers.is_empty() {
            self.lookup(host, port)
        } else {
            crate::dns::lookup_blocking(resolver, host, port)
        }
    }
}

// === impl Checking ===

impl Resolve for Checking {
    fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        System.lookup(host, port)
    }

    fn var(&self, name: &str) -> Option<String> {
        System.var(name)
    }

    fn activated(&self, _name: &str) -> bool {
        true
    }

    fn lookup_server(
        &self,
        host: &str,
        port: u16,
        resolver: &super::Resolver,
    ) -> io::Result<Vec<SocketAddr>> {
        System.lookup_server(host, port, resolver)
    }
}

// === helpers ===

/// Parses `HOST:PORT`, `[V6]:PORT` or `unix:/path`, looking a host name up now, once, with
/// the system's resolver; the first address is kept.
pub fn parse_address(text: &str) -> Result<Address, String> {
    lookup(&parse_endpoint(text)?, &System)
}

/// The address `endpoint` names: an IP or a path as written, a name looked up.
pub(super) fn lookup(endpoint: &Endpoint, with: &impl Resolve) -> Result<Address, String> {
    match endpoint {
        Endpoint::Ip(addr) => Ok(Address::Tcp(*addr)),
        Endpoint::Unix(path) => Ok(Address::Unix(path.clone())),
        Endpoint::Systemd(name) if with.activated(name) => Ok(Address::Systemd(name.clone())),
        Endpoint::Systemd(name) => Err(format!(
            "systemd passed no socket named `{name}` (passed: {}); the .socket unit's \
             FileDescriptorName= must match, and waitless must be started by that socket",
            match crate::systemd::names() {
                names if names.is_empty() => "none".to_string(),
                names => names.join(", "),
            }
        )),
        Endpoint::Name { host, port } => with
            .lookup(host, *port)
            .map_err(|e| format!("cannot resolve `{host}`: {e}"))?
            .into_iter()
            .next()
            .map(Address::Tcp)
            .ok_or_else(|| format!("`{host}` resolved to no address")),
    }
}

/// The address of an upstream server, and for a name, every address it has: IPv4 when the
/// answer has any (as the resolver that follows it asks), sorted; the first is the server's.
fn lookup_server(
    endpoint: &Endpoint,
    resolver: &super::Resolver,
    with: &impl Resolve,
) -> Result<(Address, Option<Named>), String> {
    let Endpoint::Name { host, port } = endpoint else {
        return lookup(endpoint, with).map(|a| (a, None));
    };
    let found = with
        .lookup_server(host, *port, resolver)
        .map_err(|e| format!("cannot resolve `{host}`: {e}"))?;
    let addrs = crate::dns::one_family(found);
    let first = addrs
        .first()
        .copied()
        .ok_or_else(|| format!("`{host}` resolved to no address"))?;
    let named = Named {
        host: host.clone(),
        port: *port,
        addrs,
    };
    Ok((Address::Tcp(first), Some(named)))
}

/// The password of `user`: from the file, or from its variable, which must be set now.
fn read_password(
    user: &MysqlUser<Unresolved>,
    with: &impl Resolve,
) -> Result<MysqlUser<Resolved>, String> {
    let password = match (&user.password, &user.password_env) {
        (Some(password), _) => password.clone(),
        (None, Some(var)) => with
            .var(var)
            .ok_or_else(|| format!("environment variable `{var}` is not set (or not UTF-8)"))?,
        // The raw layer requires one of the two.
        (None, None) => return Err("password or password_env is required".to_string()),
    };
    Ok(MysqlUser {
        user: user.user.clone(),
        password,
        password_env: user.password_env.clone(),
    })
}

/// The certificates of listener `l`, read and checked now (and again at each reload).
fn load_tls(
    l: &Listener<Unresolved>,
    files: &[crate::tls::CertFiles],
) -> Result<crate::tls::ServerTls, String> {
    // An http client that offers ALPN must be offered what is spoken: HTTP/1.1 only.
    let alpn: &[&[u8]] = match l.protocol {
        Protocol::Http => &[b"http/1.1"],
        // MySQL clients start TLS after the greeting (SSLRequest) and name no protocol.
        Protocol::Tcp | Protocol::Mysql => &[],
    };
    crate::tls::ServerTls::load(files.to_vec(), alpn)
}

/// `l` with its address and certificates resolved; every other field as written.
fn with_listen(
    l: &Listener<Unresolved>,
    listen: Address,
    tls: Option<crate::tls::ServerTls>,
) -> Listener<Resolved> {
    Listener {
        name: l.name.clone(),
        listen,
        protocol: l.protocol,
        upstream: l.upstream.clone(),
        time_wait: l.time_wait,
        linger: l.linger,
        linger_fallback: l.linger_fallback,
        keepalive_timeout: l.keepalive_timeout,
        mode: l.mode,
        accept_proxy_protocol: l.accept_proxy_protocol,
        max_clients: l.max_clients,
        header_timeout: l.header_timeout,
        defer_accept: l.defer_accept,
        listen_backlog: l.listen_backlog,
        drop_underscore_headers: l.drop_underscore_headers,
        pooling: l.pooling,
        tls,
    }
}

/// `u` with its servers resolved; every other field as written.
fn with_servers(
    u: &Upstream<Unresolved>,
    servers: Vec<Address>,
    names: Vec<Option<Named>>,
    tls: Option<crate::tls::ClientTls>,
) -> Upstream<Resolved> {
    Upstream {
        name: u.name.clone(),
        servers,
        pool_size: u.pool_size,
        max_connections: u.max_connections,
        idle_timeout: u.idle_timeout,
        connect_timeout: u.connect_timeout,
        response_timeout: u.response_timeout,
        max_lifetime: u.max_lifetime,
        max_requests: u.max_requests,
        server_keepalive: u.server_keepalive,
        time_wait: u.time_wait,
        preconnect: u.preconnect,
        proxy_protocol: u.proxy_protocol,
        balance: u.balance,
        weights: u.weights.clone(),
        fail_threshold: u.fail_threshold,
        fail_backoff: u.fail_backoff,
        health_check: u.health_check.clone(),
        tls,
        resolve_interval: u.resolve_interval,
        resolver: u.resolver.clone(),
        names,
    }
}
