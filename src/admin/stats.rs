//! A point-in-time snapshot of the proxy: counters, ledger and the kernel's census side by
//! side, so anyone can see they agree. Served as JSON on /stats, rendered as /metrics, and
//! read back by `waitless stats`.
//!
//! The snapshot is its own wire format: ledger cells carry their labels as the strings
//! /metrics shows, so a `waitless stats` of one version reads the /stats of another.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::histogram::HistogramSnap;
use super::Inputs;
use crate::close::census::{self, Scope, StateCounts};
use crate::close::ledger::{Entry, SideLedger, TimeWaitAt};
use crate::pool::tcp_addr;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub listeners: Vec<ListenerSnap>,
    pub upstreams: Vec<UpstreamSnap>,
    /// Set when the census could not be read (it is then all zeros).
    pub census_error: Option<String>,
    /// Reloads since start (absent from older versions' /stats).
    #[serde(default)]
    pub reloads: crate::admin::ReloadCounts,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerSnap {
    pub name: String,
    pub protocol: String,
    pub listen: String,
    pub time_wait: String,
    pub connections: u64,
    /// Client connections open now (absent from older versions' /stats).
    #[serde(default)]
    pub active: u64,
    /// Client connections turned away at `max_clients` (absent from older versions' /stats).
    #[serde(default)]
    pub rejected: u64,
    pub requests: u64,
    pub errors: Errors,
    pub ledger: LedgerSnap,
    /// Sockets on the listener's port by state (accepted client connections).
    pub census: Option<StateCounts>,
    /// Request (session) durations (absent from older versions' /stats).
    #[serde(default)]
    pub request_duration: HistogramSnap,
    /// TLS handshakes with clients, when the listener has `tls`.
    #[serde(default)]
    pub tls: Option<TlsSnap>,
    /// mysql listeners with `pooling = "transaction"`: sessions, lends and pins.
    #[serde(default)]
    pub mysql: Option<MuxSnap>,
}

/// A transaction-pooled mysql listener's sharing of server connections.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MuxSnap {
    /// Client sessions logged in now.
    pub sessions: u64,
    /// Server connections lent to its clients now.
    pub in_use: u64,
    /// Server connections lent so far (one per statement in autocommit, transaction or
    /// pinned session).
    pub lends: u64,
    /// Sessions pinned to their server connection now.
    pub pinned: u64,
    /// Sessions pinned so far.
    pub pinned_total: u64,
    /// Sessions pinned so far, by reason.
    pub pins: std::collections::BTreeMap<String, u64>,
}

impl MuxSnap {
    fn of(stats: &crate::mysql::MuxStats) -> MuxSnap {
        let pins: std::collections::BTreeMap<String, u64> = stats
            .pins()
            .map(|(pin, n)| (pin.as_str().to_string(), n))
            .collect();
        MuxSnap {
            sessions: stats.sessions.load(Ordering::Relaxed) as u64,
            in_use: stats.in_use.load(Ordering::Relaxed) as u64,
            lends: stats.lends.load(Ordering::Relaxed),
            pinned: stats.pinned.load(Ordering::Relaxed) as u64,
            pinned_total: pins.values().sum(),
            pins,
        }
    }
}

/// One side's TLS handshakes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TlsSnap {
    /// Completed.
    pub handshakes: u64,
    /// Of those, resumed from an earlier session.
    #[serde(default)]
    pub resumed: u64,
    /// Failed, by reason (`timeout`, `eof`, `no_application_protocol`, `not_tls`,
    /// `protocol`, `certificate`).
    pub errors: std::collections::BTreeMap<String, u64>,
}

impl TlsSnap {
    fn of(stats: &crate::tls::TlsStats) -> TlsSnap {
        TlsSnap {
            handshakes: stats.handshakes.load(Ordering::Relaxed),
            resumed: stats.resumed.load(Ordering::Relaxed),
            errors: stats
                .errors()
                .map(|(kind, n)| (kind.as_str().to_string(), n))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Errors {
    pub connect: u64,
    pub timeout: u64,
    pub busy: u64,
    pub upstream: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpstreamSnap {
    pub name: String,
    pub time_wait: String,
    /// TLS handshakes with its servers, when it has `tls`.
    #[serde(default)]
    pub tls: Option<TlsSnap>,
    pub servers: Vec<ServerSnap>,
    /// Its server names that follow DNS: their addresses now and their lookups (absent from
    /// older versions' /stats).
    #[serde(default)]
    pub dns: Vec<crate::dns::NameSnap>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerSnap {
    pub server: String,
    /// The name (`host:port`) it is an address of, when it follows DNS.
    #[serde(default)]
    pub name: Option<String>,
    /// "up" or "down" (health); "gone" once its address left DNS (it finishes what it has).
    pub state: String,
    pub weight: u32,
    pub idle: usize,
    /// Connections open now, idle or lent (absent from older versions' /stats).
    #[serde(default)]
    pub open: usize,
    pub opened: u64,
    pub reused: u64,
    pub connect_errors: u64,
    pub retries: u64,
    /// MySQL: session ends with a reset, and without one (nothing left behind).
    #[serde(default)]
    pub resets: u64,
    #[serde(default)]
    pub resets_skipped: u64,
    pub ledger: LedgerSnap,
    /// waitless's own sockets to this server, by state.
    pub census_proxy: Option<StateCounts>,
    /// The server's sockets on its port, when it runs on this host (loopback).
    pub census_server: Option<StateCounts>,
    /// Connect (and handshake) times of the connections opened (absent from older versions).
    #[serde(default)]
    pub connect_duration: HistogramSnap,
    /// Times from a request sent to its response head (absent from older versions).
    #[serde(default)]
    pub response_head: HistogramSnap,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LedgerSnap {
    pub closed: u64,
    /// Closes by where TIME_WAIT landed.
    pub time_wait_peer: u64,
    pub time_wait_proxy: u64,
    pub time_wait_nobody: u64,
    pub entries: Vec<EntrySnap>,
}

/// One nonzero cell of a side's ledger.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntrySnap {
    /// Who sent the first FIN or RST: "peer" or "proxy".
    pub closer: String,
    /// How waitless closed: "fin" or "rst".
    pub how: String,
    /// Why the connection ended (`close::Reason`, snake_case).
    pub reason: String,
    /// Where TIME_WAIT landed: "peer", "proxy" or "nobody".
    pub time_wait: String,
    pub count: u64,
}

// === impl LedgerSnap ===

impl LedgerSnap {
    fn of(side: &SideLedger) -> LedgerSnap {
        LedgerSnap {
            closed: side.total(),
            time_wait_peer: side.time_wait_at(TimeWaitAt::Peer),
            time_wait_proxy: side.time_wait_at(TimeWaitAt::Proxy),
            time_wait_nobody: side.time_wait_at(TimeWaitAt::Nobody),
            entries: side.entries().iter().map(EntrySnap::of).collect(),
        }
    }
}

// === impl EntrySnap ===

impl EntrySnap {
    fn of(e: &Entry) -> EntrySnap {
        EntrySnap {
            closer: e.closer.as_str().to_string(),
            how: e.how.as_str().to_string(),
            reason: e.reason.as_str().to_string(),
            time_wait: e.time_wait.as_str().to_string(),
            count: e.count,
        }
    }
}

/// Takes a snapshot of `inputs`; reads the census (a blocking netlink dump), so call it off
/// the runtime threads (`spawn_blocking`).
pub fn snapshot(inputs: &Inputs) -> Snapshot {
    // Listener ports, then per server the proxy's side and, on loopback, the server's.
    let mut scopes = Vec::new();
    for l in &inputs.listeners {
        if let Some(addr) = l.addr {
            scopes.push(Scope::LocalPort(addr.port()));
        }
    }
    for up in &inputs.upstreams {
        for server in up.server_infos() {
            if let Some(addr) = tcp_addr(&server.addr) {
                scopes.push(Scope::Remote(addr));
                if is_local(addr) {
                    scopes.push(Scope::LocalPort(addr.port()));
                }
            }
        }
    }
    let counted = census::count_many(&scopes);
    let census_error = counted.as_ref().err().map(|e| e.to_string());
    // Each side looks its counts up by scope; when the census failed, every one is zero.
    let counts: HashMap<Scope, StateCounts> = match counted {
        Ok(c) => scopes.iter().copied().zip(c).collect(),
        Err(_) => scopes
            .iter()
            .map(|s| (*s, StateCounts::default()))
            .collect(),
    };
    let census_of = |scope: Scope| counts.get(&scope).copied();

    let listeners = inputs
        .listeners
        .iter()
        .map(|l| {
            let s = &l.stats;
            ListenerSnap {
                name: l.cfg.name.clone(),
                protocol: l.cfg.protocol.to_string(),
                listen: l
                    .addr
                    .map_or_else(|| l.cfg.listen.to_string(), |a| a.to_string()),
                time_wait: l.cfg.time_wait.to_string(),
                connections: s.connections.load(Ordering::Relaxed),
                active: s.active.load(Ordering::Relaxed) as u64,
                rejected: s.rejected.load(Ordering::Relaxed),
                requests: s.requests.load(Ordering::Relaxed),
                errors: Errors {
                    connect: s.errors_connect.load(Ordering::Relaxed),
                    timeout: s.errors_timeout.load(Ordering::Relaxed),
                    busy: s.errors_busy.load(Ordering::Relaxed),
                    upstream: s.errors_upstream.load(Ordering::Relaxed),
                },
                ledger: LedgerSnap::of(&l.ledger),
                census: l.addr.and_then(|a| census_of(Scope::LocalPort(a.port()))),
                request_duration: s.request_duration.snapshot(),
                tls: l.cfg.tls.as_ref().map(|_| TlsSnap::of(&s.tls)),
                mysql: (l.cfg.protocol == crate::config::Protocol::Mysql
                    && l.cfg.pooling == crate::config::Pooling::Transaction)
                    .then(|| MuxSnap::of(&s.mysql)),
            }
        })
        .collect();

    let upstreams = inputs
        .upstreams
        .iter()
        .map(|up| UpstreamSnap {
            name: up.cfg().name.clone(),
            time_wait: up.cfg().time_wait.to_string(),
            tls: up.cfg().tls.as_ref().map(|_| TlsSnap::of(up.tls_stats())),
            servers: up
                .server_infos()
                .into_iter()
                .map(|server| {
                    let tcp = tcp_addr(&server.addr);
                    let st = &server.stats;
                    ServerSnap {
                        server: server.label.clone(),
                        name: server.name.clone(),
                        state: server.state.to_string(),
                        weight: server.weight,
                        idle: server.idle,
                        open: server.open,
                        opened: st.opened.load(Ordering::Relaxed),
                        reused: st.reused.load(Ordering::Relaxed),
                        connect_errors: st.connect_errors.load(Ordering::Relaxed),
                        retries: st.retries.load(Ordering::Relaxed),
                        resets: st.resets.load(Ordering::Relaxed),
                        resets_skipped: st.resets_skipped.load(Ordering::Relaxed),
                        ledger: LedgerSnap::of(&server.ledger),
                        census_proxy: tcp.and_then(|a| census_of(Scope::Remote(a))),
                        census_server: tcp
                            .filter(|a| is_local(*a))
                            .and_then(|a| census_of(Scope::LocalPort(a.port()))),
                        connect_duration: st.connect_duration.snapshot(),
                        response_head: st.response_head.snapshot(),
                    }
                })
                .collect(),
            dns: up.names().iter().map(|n| n.snap()).collect(),
        })
        .collect();

    Snapshot {
        listeners,
        upstreams,
        census_error,
        reloads: inputs.reloads,
    }
}

/// Only this host's sockets are visible: a server's own sockets can be counted when it
/// listens on a loopback address.
fn is_local(addr: SocketAddr) -> bool {
    addr.ip().is_loopback()
}
