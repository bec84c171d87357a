//! The checks that need the whole config, and the warnings. Every rule that would stop
//! start-up and is knowable from the file is here, so that `waitless check` refuses what
//! `waitless run` would: the same checks run on the config as written and again once names
//! are resolved (two names may resolve to one address).

use std::net::SocketAddr;
use std::path::Path;

use super::locate::Locator;
use super::units::format_duration;
use super::{Address, Config, ConfigError, Endpoint, Pooling, Protocol, ProxyProtocol, Stage};

/// Longest unix socket path the kernel binds: `sun_path` holds 108 bytes with the final NUL.
const MAX_UNIX_PATH: usize = 107;

/// What validation asks of an address, written or resolved.
pub trait Place {
    /// A `unix:/path` address.
    fn is_unix(&self) -> bool;
    /// The unix socket path, if a unix address.
    fn unix_path(&self) -> Option<&Path>;
    /// The TCP port, if a TCP address.
    fn port(&self) -> Option<u16>;
    /// A `systemd:NAME` socket, which only a listener can take.
    fn is_systemd(&self) -> bool;
    /// Whether a listener bound here keeps one bound at `other` from binding: the same
    /// address, or the same port of one family where either takes every interface.
    fn overlaps(&self, other: &Self) -> bool;
}

// === impl Config ===

impl<S: Stage> Config<S> {
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

    /// The checks that need the whole config; each error names the offending key.
    pub(super) fn validate(&self, at: &Locator) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(at.error("listener", "at least one [[listener]] is required"));
        }
        for i in 0..self.listeners.len() {
            self.validate_listener(i, at)?;
        }
        for i in 0..self.upstreams.len() {
            self.validate_upstream(i, at)?;
        }
        self.validate_admin(at)?;
        self.validate_mysql(at)
    }

    /// `[admin]`: a unix socket path the kernel can bind, `mode` only with one.
    fn validate_admin(&self, at: &Locator) -> Result<(), ConfigError> {
        let listen = self.admin.listen.as_ref().map(S::admin_address);
        if let Some(len) = listen
            .as_ref()
            .and_then(|a| a.unix_path())
            .map(|p| p.as_os_str().len())
            .filter(|len| *len > MAX_UNIX_PATH)
        {
            return Err(at.error(
                "admin.listen",
                format!(
                    "the socket path is {len} bytes, and the kernel binds unix sockets of at most \
                     {MAX_UNIX_PATH}: choose a shorter path"
                ),
            ));
        }
        if self.admin.mode.is_some() && !listen.as_ref().is_some_and(|a| a.is_unix()) {
            return Err(at.error(
                "admin.mode",
                "mode applies only to a unix:/path admin listener; a TCP socket has no file mode",
            ));
        }
        Ok(())
    }

    /// Listener `i`: its name, its address, its upstream and the options its protocol and
    /// address allow.
    fn validate_listener(&self, i: usize, at: &Locator) -> Result<(), ConfigError> {
        let Some(listener) = self.listeners.get(i) else {
            return Ok(());
        };
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
        if let Some(path) = listener.listen.unix_path() {
            let len = path.as_os_str().len();
            if len > MAX_UNIX_PATH {
                return Err(at.error(
                    key("listen"),
                    format!(
                        "the socket path is {len} bytes, and the kernel binds unix sockets of at \
                         most {MAX_UNIX_PATH}: choose a shorter path"
                    ),
                ));
            }
        }
        if let Some((other, same)) = self.listen_clash(i) {
            let message = if same {
                format!(
                    "{} is already the address of {}",
                    listener.listen,
                    at.describe(&other)
                )
            } else {
                format!(
                    "{} overlaps {}: a wildcard address takes its port on every interface of \
                     its family, so the second listener could not bind",
                    listener.listen,
                    at.describe(&other)
                )
            };
            return Err(at.error(key("listen"), message));
        }
        let Some(up) = self.upstream(&listener.upstream) else {
            return Err(at.error(
                key("upstream"),
                format!(
                    "no [[upstream]] is named `{}`{}",
                    listener.upstream,
                    self.upstream_names()
                ),
            ));
        };
        // A pool's connections speak one protocol (an HTTP keep-alive connection cannot carry
        // a tcp relay or a MySQL session), and the proxy builds one pool per upstream.
        if let Some((j, other)) = self
            .listeners
            .iter()
            .enumerate()
            .take(i)
            .find(|(_, l)| l.upstream == listener.upstream && l.protocol != listener.protocol)
        {
            return Err(at.error(
                key("upstream"),
                format!(
                    "listener `{}` is {}, and upstream `{}` already serves {} listener `{}` at \
                     {}: one upstream pools connections of one protocol; give each protocol an \
                     [[upstream]] of its own",
                    listener.name,
                    listener.protocol,
                    up.name,
                    other.protocol,
                    other.name,
                    at.describe(&format!("listener[{j}].upstream")),
                ),
            ));
        }
        if listener.accept_proxy_protocol && listener.listen.is_unix() {
            return Err(at.error(
                key("accept_proxy_protocol"),
                "accept_proxy_protocol applies to TCP listeners; a unix socket's clients are \
                 on this host",
            ));
        }
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
        if listener.defer_accept {
            let why = if listener.listen.is_unix() {
                Some("defer_accept applies to TCP listeners; a unix socket has no TCP_DEFER_ACCEPT")
            } else if listener.protocol == Protocol::Mysql {
                Some(
                    "defer_accept cannot serve a mysql listener: a MySQL client sends nothing \
                     before the server's greeting, so every login would wait out the kernel's \
                     deferral",
                )
            } else {
                None
            };
            if let Some(why) = why {
                return Err(at.error(key("defer_accept"), why));
            }
        }
        if listener.drop_underscore_headers && listener.protocol != Protocol::Http {
            return Err(at.error(
                key("drop_underscore_headers"),
                format!(
                    "drop_underscore_headers applies to http listeners, and this one is {}: \
                     it has no header fields to drop",
                    listener.protocol
                ),
            ));
        }
        if listener.pooling != Pooling::Session && listener.protocol != Protocol::Mysql {
            return Err(at.error(
                key("pooling"),
                format!(
                    "pooling applies to mysql listeners, and this one is {}: it has no \
                     server sessions to share",
                    listener.protocol
                ),
            ));
        }
        if listener.mode.is_some() && !listener.listen.is_unix() {
            return Err(at.error(
                key("mode"),
                "mode applies only to unix:/path listeners; a TCP socket has no file mode",
            ));
        }
        Ok(())
    }

    /// Upstream `i`: its name, its servers and the settings that would make it useless.
    fn validate_upstream(&self, i: usize, at: &Locator) -> Result<(), ConfigError> {
        let Some(upstream) = self.upstreams.get(i) else {
            return Ok(());
        };
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
        if upstream.tls.is_some() {
            if let Some(j) = upstream.servers.iter().position(|s| s.is_unix()) {
                return Err(at.error(
                    format!("upstream[{i}].servers[{j}]"),
                    "tls applies to TCP servers; a unix socket's server is on this host",
                ));
            }
        }
        for (j, server) in upstream.servers.iter().enumerate() {
            if server.is_systemd() {
                return Err(at.error(
                    format!("upstream[{i}].servers[{j}]"),
                    format!("{server} is a listening socket systemd passes; a server is HOST:PORT or unix:/path"),
                ));
            }
            if server.port() == Some(0) {
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
        Ok(())
    }

    /// `[[mysql_user]]` names are set and unique, and a mysql listener has users to admit.
    fn validate_mysql(&self, at: &Locator) -> Result<(), ConfigError> {
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

    /// The key of an address listener `i` would share with the admin listener or an earlier
    /// listener, if any, and whether it is the same address (else one overlaps the other).
    /// Port 0 never clashes: the kernel picks a distinct port for each.
    fn listen_clash(&self, i: usize) -> Option<(String, bool)> {
        let listen = &self.listeners.get(i)?.listen;
        if listen.port() == Some(0) {
            return None;
        }
        if let Some((j, other)) = self
            .listeners
            .iter()
            .enumerate()
            .take(i)
            .find(|(_, l)| l.listen.overlaps(listen))
        {
            return Some((format!("listener[{j}].listen"), &other.listen == listen));
        }
        let admin = S::admin_address(self.admin.listen.as_ref()?);
        admin
            .overlaps(listen)
            .then(|| ("admin.listen".to_string(), &admin == listen))
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

// === impl Address, Endpoint ===

impl Place for Address {
    fn is_unix(&self) -> bool {
        matches!(self, Address::Unix(_))
    }

    fn unix_path(&self) -> Option<&Path> {
        match self {
            Address::Unix(path) => Some(path),
            Address::Tcp(_) | Address::Systemd(_) => None,
        }
    }

    fn port(&self) -> Option<u16> {
        match self {
            Address::Tcp(addr) => Some(addr.port()),
            Address::Unix(_) | Address::Systemd(_) => None,
        }
    }

    fn is_systemd(&self) -> bool {
        matches!(self, Address::Systemd(_))
    }

    fn overlaps(&self, other: &Self) -> bool {
        match (self, other) {
            (Address::Tcp(a), Address::Tcp(b)) => sockets_overlap(a, b),
            (a, b) => a == b,
        }
    }
}

impl Place for Endpoint {
    fn is_unix(&self) -> bool {
        matches!(self, Endpoint::Unix(_))
    }

    fn unix_path(&self) -> Option<&Path> {
        match self {
            Endpoint::Unix(path) => Some(path),
            _ => None,
        }
    }

    fn port(&self) -> Option<u16> {
        match self {
            Endpoint::Ip(addr) => Some(addr.port()),
            Endpoint::Name { port, .. } => Some(*port),
            Endpoint::Unix(_) | Endpoint::Systemd(_) => None,
        }
    }

    fn is_systemd(&self) -> bool {
        matches!(self, Endpoint::Systemd(_))
    }

    /// Names are compared as written; a name and an IP, once the name is resolved.
    fn overlaps(&self, other: &Self) -> bool {
        match (self, other) {
            (Endpoint::Ip(a), Endpoint::Ip(b)) => sockets_overlap(a, b),
            (a, b) => a == b,
        }
    }
}

// === helpers ===

/// Whether listening on `a` keeps a listener from binding `b` (or the reverse). IPv6
/// listeners are IPV6_V6ONLY (src/listener.rs), so the families never overlap.
fn sockets_overlap(a: &SocketAddr, b: &SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}
