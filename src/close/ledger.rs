//! The ledger: every connection closed, recorded once, per side.
//!
//! A side is a listener (its client connections) or one server of an upstream (waitless's
//! pooled connections to it). Each close is counted under who closed first, how, and why;
//! where TIME_WAIT landed follows from the first two, so it is derived, never stored.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// Which end sent the first FIN (or RST).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Closer {
    Peer,
    Proxy,
}

/// How waitless closed its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum How {
    Fin,
    Rst,
}

/// Why the connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The exchange ended normally (last response sent, client closed).
    Done,
    /// A client that reads to EOF (HTTP/1.0 without keep-alive): closed at once, not lingered.
    EofReader,
    /// `linger` ran out before the client's FIN, or before its send queue drained.
    LingerExpired,
    /// An idle pooled connection (or idle keep-alive client) timed out.
    Idle,
    /// A pooled connection reached `max_lifetime` or `max_requests`.
    Lifetime,
    /// The pool already held `pool_size` idle connections.
    PoolFull,
    /// The peer closed first.
    PeerClosed,
    /// An I/O or protocol error.
    Error,
    /// waitless is shutting down.
    Drain,
    /// Turned away: at `max_clients`, for a bad PROXY header, or with no upstream server
    /// reachable.
    Refused,
    /// A tcp relay's server closed first, and the client connection was ended after it.
    ServerClosed,
    /// A health check's probe connection.
    HealthCheck,
}

/// Where the TIME_WAIT socket of a close ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeWaitAt {
    Peer,
    Proxy,
    Nobody,
}

/// What a side is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SideId {
    /// Client connections accepted by a listener.
    Listener { name: String },
    /// Pooled connections to one server of an upstream.
    Server {
        upstream: String,
        server: String,
        #[serde(skip)]
        addr: Option<SocketAddr>,
    },
}

/// The closes of one side.
#[derive(Debug)]
pub struct SideLedger {
    /// What this side is.
    pub id: SideId,
    /// Counts indexed by `slot(closer, how, reason)`.
    counts: [AtomicU64; SLOTS],
}

/// One nonzero cell of a side's ledger.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub closer: Closer,
    pub how: How,
    pub reason: Reason,
    pub time_wait: TimeWaitAt,
    pub count: u64,
}

/// All sides' ledgers.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Sides in registration order; sides are never removed so counters never go back.
    sides: Mutex<Vec<Arc<SideLedger>>>,
}

const REASONS: [Reason; 12] = [
    Reason::Done,
    Reason::EofReader,
    Reason::LingerExpired,
    Reason::Idle,
    Reason::Lifetime,
    Reason::PoolFull,
    Reason::PeerClosed,
    Reason::Error,
    Reason::Drain,
    Reason::Refused,
    Reason::ServerClosed,
    Reason::HealthCheck,
];
const SLOTS: usize = 2 * 2 * REASONS.len();

// === impl Closer / How / Reason ===

impl Closer {
    pub fn as_str(self) -> &'static str {
        match self {
            Closer::Peer => "peer",
            Closer::Proxy => "proxy",
        }
    }
}

impl How {
    pub fn as_str(self) -> &'static str {
        match self {
            How::Fin => "fin",
            How::Rst => "rst",
        }
    }
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Done => "done",
            Reason::EofReader => "eof_reader",
            Reason::LingerExpired => "linger_expired",
            Reason::Idle => "idle",
            Reason::Lifetime => "lifetime",
            Reason::PoolFull => "pool_full",
            Reason::PeerClosed => "peer_closed",
            Reason::Error => "error",
            Reason::Drain => "drain",
            Reason::Refused => "refused",
            Reason::ServerClosed => "server_closed",
            Reason::HealthCheck => "health_check",
        }
    }

    fn index(self) -> usize {
        REASONS.iter().position(|r| *r == self).unwrap_or(0)
    }

    pub(crate) fn from_index(i: u8) -> Option<Reason> {
        REASONS.get(i as usize).copied()
    }

    pub(crate) fn to_index(self) -> u8 {
        self.index() as u8
    }
}

impl TimeWaitAt {
    /// The side that sends the first FIN and then completes a normal close keeps TIME_WAIT;
    /// an RST from either side leaves none.
    pub fn of(closer: Closer, how: How) -> TimeWaitAt {
        match (closer, how) {
            (_, How::Rst) => TimeWaitAt::Nobody,
            (Closer::Peer, How::Fin) => TimeWaitAt::Peer,
            (Closer::Proxy, How::Fin) => TimeWaitAt::Proxy,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TimeWaitAt::Peer => "peer",
            TimeWaitAt::Proxy => "proxy",
            TimeWaitAt::Nobody => "nobody",
        }
    }
}

// === impl SideId ===

impl SideId {
    /// Label value naming the side: the listener name or `upstream/server`.
    pub fn label(&self) -> String {
        match self {
            SideId::Listener { name } => name.clone(),
            SideId::Server {
                upstream, server, ..
            } => format!("{upstream}/{server}"),
        }
    }
}

// === impl SideLedger ===

impl SideLedger {
    fn new(id: SideId) -> SideLedger {
        SideLedger {
            id,
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Records one close.
    pub fn record(&self, closer: Closer, how: How, reason: Reason) {
        if let Some(count) = self.counts.get(slot(closer, how, reason)) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The nonzero cells.
    pub fn entries(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        for closer in [Closer::Peer, Closer::Proxy] {
            for how in [How::Fin, How::Rst] {
                for reason in REASONS {
                    let cell = self.counts.get(slot(closer, how, reason));
                    let count = cell.map_or(0, |c| c.load(Ordering::Relaxed));
                    if count > 0 {
                        out.push(Entry {
                            closer,
                            how,
                            reason,
                            time_wait: TimeWaitAt::of(closer, how),
                            count,
                        });
                    }
                }
            }
        }
        out
    }

    /// Total closes whose TIME_WAIT landed at `at`.
    pub fn time_wait_at(&self, at: TimeWaitAt) -> u64 {
        self.entries()
            .iter()
            .filter(|e| e.time_wait == at)
            .map(|e| e.count)
            .sum()
    }

    /// Total closes recorded.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

// === impl Ledger ===

impl Ledger {
    /// The ledger of `id`, created on first use.
    pub fn side(&self, id: SideId) -> Arc<SideLedger> {
        let mut sides = self.sides.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = sides.iter().find(|s| s.id == id) {
            return found.clone();
        }
        let side = Arc::new(SideLedger::new(id));
        sides.push(side.clone());
        side
    }

    /// Every side registered so far.
    pub fn sides(&self) -> Vec<Arc<SideLedger>> {
        self.sides.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn slot(closer: Closer, how: How, reason: Reason) -> usize {
    let c = match closer {
        Closer::Peer => 0,
        Closer::Proxy => 1,
    };
    let h = match how {
        How::Fin => 0,
        How::Rst => 1,
    };
    (c * 2 + h) * REASONS.len() + reason.index()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_wait_follows_closer_and_how() {
        let ledger = Ledger::default();
        let side = ledger.side(SideId::Listener { name: "web".into() });
        side.record(Closer::Peer, How::Fin, Reason::Done);
        side.record(Closer::Proxy, How::Rst, Reason::Done);
        side.record(Closer::Proxy, How::Fin, Reason::LingerExpired);
        assert_eq!(side.time_wait_at(TimeWaitAt::Peer), 1);
        assert_eq!(side.time_wait_at(TimeWaitAt::Nobody), 1);
        assert_eq!(side.time_wait_at(TimeWaitAt::Proxy), 1);
        assert_eq!(side.total(), 3);
        let again = ledger.side(SideId::Listener { name: "web".into() });
        assert_eq!(again.total(), 3);
    }
}
