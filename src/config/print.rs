//! The effective configuration as text (`waitless check`, and the log of a reload): valid
//! TOML with every key and its value after defaults, which parses back to the same config.
//! Unset optional keys appear as comments; passwords never appear.

use std::fmt;

use super::units::format_duration;
use super::validate::Place;
use super::{Config, Protocol, Stage};

// === impl Config ===

/// Prints every key. A resolved config prints the addresses names resolved to; an unresolved
/// one prints the names as written.
impl<S: Stage> fmt::Display for Config<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "workers = {}", self.workers)?;
        writeln!(
            f,
            "drain_timeout = \"{}\"",
            format_duration(self.drain_timeout)
        )?;
        writeln!(f)?;
        writeln!(f, "[admin]")?;
        match &self.admin.listen {
            Some(addr) => writeln!(f, "listen = {}", quoted(&addr.to_string()))?,
            None => writeln!(f, "listen = \"off\"")?,
        }
        if self
            .admin
            .listen
            .as_ref()
            .map(S::admin_address)
            .is_some_and(|a| a.is_unix())
        {
            writeln!(f, "mode = \"{:04o}\"", self.admin.unix_mode())?;
        }
        // The token itself is never printed: `check` output ends up in logs.
        match (&self.admin.token_env, &self.admin.token) {
            (Some(var), _) => writeln!(f, "token_env = {}", quoted(var))?,
            (None, Some(_)) => writeln!(f, "token = \"(set)\"")?,
            (None, None) => {}
        }
        writeln!(f)?;
        writeln!(f, "[log]")?;
        match &self.log.access {
            crate::access::Destination::Off => writeln!(f, "access = \"off\"")?,
            crate::access::Destination::Stderr => writeln!(f, "access = \"stderr\"")?,
            crate::access::Destination::File(path) => {
                writeln!(f, "access = {}", quoted(&path.display().to_string()))?
            }
        }
        writeln!(f, "format = \"{}\"", self.log.format)?;
        writeln!(f, "queue = {}", self.log.queue)?;
        writeln!(f)?;
        writeln!(f, "[resolver]")?;
        let nameservers: Vec<String> = self
            .resolver
            .nameservers
            .iter()
            .map(|ns| quoted(&ns.to_string()))
            .collect();
        match nameservers.is_empty() {
            true => writeln!(f, "# nameservers: unset, the system's /etc/resolv.conf")?,
            false => writeln!(f, "nameservers = [{}]", nameservers.join(", "))?,
        }
        let floor = format_duration(self.resolver.min_interval);
        writeln!(f, "min_interval = \"{floor}\"")?;
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
            match listener.mode {
                Some(mode) => writeln!(f, "mode = \"{mode:04o}\"")?,
                None if listener.listen.is_unix() => {
                    writeln!(f, "# mode: unset, the umask decides")?
                }
                None => {}
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
            writeln!(f, "listen_backlog = {}", listener.listen_backlog)?;
            if let Some(certs) = &listener.tls {
                let certs: Vec<String> = S::cert_files(certs)
                    .iter()
                    .map(|c| {
                        format!(
                            "{{ cert = {}, key = {} }}",
                            quoted(&c.cert.display().to_string()),
                            quoted(&c.key.display().to_string())
                        )
                    })
                    .collect();
                writeln!(f, "tls = {{ certs = [{}] }}", certs.join(", "))?;
            }
            if listener.protocol == Protocol::Mysql {
                writeln!(f, "pooling = \"{}\"", listener.pooling)?;
            }
            if listener.protocol == Protocol::Http {
                let drop = listener.drop_underscore_headers;
                writeln!(f, "drop_underscore_headers = {drop}")?;
            }
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
            // A resolved config prints a name's first address above; all of them here.
            for (j, named) in upstream.names.iter().enumerate() {
                if let Some(n) = named {
                    let addrs: Vec<String> = n.addrs.iter().map(ToString::to_string).collect();
                    writeln!(
                        f,
                        "# servers[{j}] = \"{}:{}\" resolves to {}",
                        n.host,
                        n.port,
                        addrs.join(", ")
                    )?;
                }
            }
            match upstream.resolve_interval {
                Some(every) => writeln!(f, "resolve_interval = \"{}\"", format_duration(every))?,
                None => writeln!(f, "resolve_interval = \"off\"")?,
            }
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
            if let Some(tls) = &upstream.tls {
                let t = S::upstream_tls(tls);
                let mut keys = Vec::new();
                if let Some(ca) = &t.ca {
                    keys.push(format!("ca = {}", quoted(&ca.display().to_string())));
                }
                if let Some(name) = &t.server_name {
                    keys.push(format!("server_name = {}", quoted(name)));
                }
                keys.push(format!("verify = {}", t.verify));
                if let Some(c) = &t.client {
                    keys.push(format!("cert = {}", quoted(&c.cert.display().to_string())));
                    keys.push(format!("key = {}", quoted(&c.key.display().to_string())));
                }
                writeln!(f, "tls = {{ {} }}", keys.join(", "))?;
            }
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

// === helpers ===

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
