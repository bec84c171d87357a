//! Server names that follow DNS: a server written as `name:port` is looked up again while
//! waitless runs, when its record's TTL runs out (no sooner than `[resolver] min_interval`,
//! no later than the upstream's `resolve_interval`), with hickory-resolver.
//!
//! A changed answer changes the upstream's server list as a reload of that one list would
//! (`pool::Upstream::follow`): an address that stays keeps its pool and warm connections, a
//! new one gets a pool of its own, one that left takes no new requests and its pool is
//! drained by the close policy. A failed lookup changes nothing: the last good addresses
//! stay, the failure is logged and counted, and the name is asked again sooner.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use serde::{Deserialize, Serialize};

use crate::config;
use crate::pool::{PoolConn, Upstream};

/// One name of an upstream as it is followed: its current addresses and its lookups.
#[derive(Debug)]
pub struct Name {
    /// `host:port` as written.
    pub label: String,
    /// The host, as looked up.
    pub host: String,
    /// The port every address of it is reached on.
    pub port: u16,
    /// Index of the server it was written as, in the upstream's `servers`.
    pub entry: usize,
    /// Lookups that gave addresses.
    pub ok: AtomicU64,
    /// Lookups that failed or gave none (the last good addresses stayed).
    pub failed: AtomicU64,
    /// What the last lookups found.
    last: Mutex<Last>,
}

/// What the lookups of a name found last.
#[derive(Debug, Default)]
struct Last {
    /// The addresses in use: the last good answer.
    addrs: Vec<SocketAddr>,
    /// The last failure's error, cleared by the next good answer.
    error: Option<String>,
    /// The wait before the next lookup.
    next: Duration,
}

/// A name as /stats shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NameSnap {
    /// `host:port` as written.
    pub name: String,
    /// The addresses in use.
    pub addrs: Vec<String>,
    /// Lookups that gave addresses.
    pub ok: u64,
    /// Lookups that failed.
    pub failed: u64,
    /// The error of the last lookup, if it failed.
    pub error: Option<String>,
    /// Seconds until the next lookup, as it was scheduled.
    pub next_secs: f64,
}

/// How long a lookup may take, all nameservers and attempts together, before it counts as
/// failed.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

// === impl Name ===

impl Name {
    /// The name of server `entry`, starting from the addresses it resolved to at load.
    pub fn new(entry: usize, named: &config::Named) -> Name {
        Name {
            label: format!("{}:{}", named.host, named.port),
            host: named.host.clone(),
            port: named.port,
            entry,
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            last: Mutex::new(Last {
                addrs: named.addrs.clone(),
                ..Last::default()
            }),
        }
    }

    /// The addresses in use.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.lock().addrs.clone()
    }

    /// What /stats shows of it.
    pub fn snap(&self) -> NameSnap {
        let last = self.lock();
        NameSnap {
            name: self.label.clone(),
            addrs: last.addrs.iter().map(ToString::to_string).collect(),
            ok: self.ok.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            error: last.error.clone(),
            next_secs: last.next.as_secs_f64(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Last> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }
}

// === functions ===

/// A resolver for `cfg`: its nameservers over UDP and TCP, or the system's configuration.
/// IPv4 addresses when a name has any, else IPv6: one family per name, so a dual-stack
/// server is not counted twice.
pub fn resolver(cfg: &config::Resolver) -> Result<TokioResolver, String> {
    let mut builder = if cfg.nameservers.is_empty() {
        TokioResolver::builder_tokio()
            .map_err(|e| format!("cannot read the system's resolver configuration: {e}"))?
    } else {
        let servers = cfg
            .nameservers
            .iter()
            .map(|ns| {
                let (mut udp, mut tcp) = (ConnectionConfig::udp(), ConnectionConfig::tcp());
                udp.port = ns.port();
                tcp.port = ns.port();
                NameServerConfig::new(ns.ip(), true, vec![udp, tcp])
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    let opts = builder.options_mut();
    opts.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 1;
    // waitless asks again when the TTL runs out: a cached answer would only be the old one.
    opts.cache_size = 0;
    builder
        .build()
        .map_err(|e| format!("cannot build the resolver: {e}"))
}

/// The addresses of `host` at `port` and how long they may be kept (the record's TTL).
pub async fn lookup(
    resolver: &TokioResolver,
    host: &str,
    port: u16,
) -> Result<(Vec<SocketAddr>, Duration), String> {
    let found = tokio::time::timeout(LOOKUP_TIMEOUT, resolver.lookup_ip(host))
        .await
        .map_err(|_| format!("no answer within {LOOKUP_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let ttl = found
        .valid_until()
        .saturating_duration_since(std::time::Instant::now());
    let addrs = one_family(found.iter().map(|ip| SocketAddr::new(ip, port)).collect());
    if addrs.is_empty() {
        return Err("the answer has no address".into());
    }
    Ok((addrs, ttl))
}

/// As [`lookup`], from a caller that is not async (loading the config, which may run inside
/// a runtime): on a thread of its own with a runtime of its own.
pub fn lookup_blocking(
    cfg: &config::Resolver,
    host: &str,
    port: u16,
) -> io::Result<Vec<SocketAddr>> {
    let (cfg, host) = (cfg.clone(), host.to_string());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let resolver = resolver(&cfg).map_err(io::Error::other)?;
            let (addrs, _) = lookup(&resolver, &host, port)
                .await
                .map_err(io::Error::other)?;
            Ok(addrs)
        })
    })
    .join()
    .map_err(|_| io::Error::other("the lookup thread panicked"))?
}

/// `addrs` of one family, IPv4 when there is any, sorted and without repeats.
pub fn one_family(mut addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    if addrs.iter().any(SocketAddr::is_ipv4) {
        addrs.retain(SocketAddr::is_ipv4);
    }
    addrs.sort();
    addrs.dedup();
    addrs
}

/// When to look a name up again: at the end of its TTL, within the floor and the cap.
fn after_ttl(ttl: Duration, floor: Duration, cap: Duration) -> Duration {
    ttl.min(cap).max(floor)
}

/// After `failures` failed lookups in a row: from the floor, doubling, up to the cap.
fn after_failures(failures: u32, floor: Duration, cap: Duration) -> Duration {
    floor
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(cap)
        .max(floor)
}

/// Follows every name of `up` until the upstream is gone (a reload replaced it); one task
/// per upstream that has names, one resolver for them all.
pub fn spawn_follow<C: PoolConn + std::fmt::Debug>(up: &Arc<Upstream<C>>) {
    let Some(cap) = up.cfg.resolve_interval else {
        return;
    };
    if up.names.is_empty() {
        return;
    }
    let resolver = match resolver(&up.cfg.resolver) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            tracing::error!(upstream = %up.cfg.name, error = %e,
                "server names will not follow DNS");
            return;
        }
    };
    let floor = up.cfg.resolver.min_interval;
    for name in &up.names {
        tokio::spawn(follow(
            Arc::downgrade(up),
            name.clone(),
            resolver.clone(),
            floor,
            cap,
        ));
    }
}

/// Looks `name` up again and again, handing each good answer to the upstream.
async fn follow<C: PoolConn + std::fmt::Debug>(
    up: Weak<Upstream<C>>,
    name: Arc<Name>,
    resolver: Arc<TokioResolver>,
    floor: Duration,
    cap: Duration,
) {
    // The first lookup comes at once: the answer at load gave no TTL.
    let mut wait = Duration::ZERO;
    let mut failures = 0u32;
    loop {
        tokio::time::sleep(wait).await;
        let found = lookup(&resolver, &name.host, name.port).await;
        // Not held across the sleep or the lookup: a replaced upstream is let go at once.
        let Some(up) = up.upgrade() else { return };
        if up.is_drained() {
            return;
        }
        match found {
            Ok((addrs, ttl)) => {
                name.ok.fetch_add(1, Ordering::Relaxed);
                failures = 0;
                wait = after_ttl(ttl, floor, cap);
                let changed = {
                    let mut last = name.lock();
                    last.error = None;
                    last.next = wait;
                    let changed = last.addrs != addrs;
                    last.addrs = addrs.clone();
                    changed
                };
                if changed {
                    let shown: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                    tracing::info!(upstream = %up.cfg.name, name = %name.label,
                        addrs = %shown.join(", "), "server name resolved to new addresses");
                    up.follow(name.entry, &addrs);
                }
            }
            Err(e) => {
                name.failed.fetch_add(1, Ordering::Relaxed);
                failures = failures.saturating_add(1);
                wait = after_failures(failures, floor, cap);
                {
                    let mut last = name.lock();
                    last.error = Some(e.clone());
                    last.next = wait;
                }
                tracing::warn!(upstream = %up.cfg.name, name = %name.label, error = %e,
                    retry_in = ?wait, "cannot resolve server name; keeping its last addresses");
            }
        }
        up.prune_gone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_kept_within_floor_and_cap() {
        let (floor, cap) = (Duration::from_secs(1), Duration::from_secs(30));
        assert_eq!(after_ttl(Duration::ZERO, floor, cap), floor);
        assert_eq!(
            after_ttl(Duration::from_secs(5), floor, cap),
            Duration::from_secs(5)
        );
        assert_eq!(after_ttl(Duration::from_secs(3600), floor, cap), cap);
        // A cap under the floor: the floor wins, no panic.
        assert_eq!(after_ttl(Duration::from_secs(5), cap, floor), cap);
    }

    #[test]
    fn failures_back_off_from_floor_to_cap() {
        let (floor, cap) = (Duration::from_secs(1), Duration::from_secs(30));
        let waits: Vec<u64> = (1..=7)
            .map(|n| after_failures(n, floor, cap).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(after_failures(u32::MAX, floor, cap), cap);
    }

    #[test]
    fn one_family_prefers_ipv4_sorted_once() {
        let a: Vec<SocketAddr> = ["[::1]:80", "127.0.0.2:80", "127.0.0.1:80", "127.0.0.2:80"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let got = one_family(a);
        assert_eq!(got.len(), 2);
        assert!(got[0] < got[1] && got.iter().all(SocketAddr::is_ipv4));
        let v6: Vec<SocketAddr> = vec!["[::1]:80".parse().unwrap()];
        assert_eq!(one_family(v6.clone()), v6);
    }
}
