//! waitless: a connection-pooling proxy that decides which side closes first.
//!
//! Short client connections end at waitless; the backends see a few persistent keep-alive
//! connections. On every connection waitless chooses who sends the first FIN — and so where
//! TIME_WAIT lands — and records each close in a ledger checked against the kernel's census.
//!
//! - `config`: the TOML model, pure parsing and validation (errors name file, line and key),
//!   and the separate step that resolves names and reads `password_env`.
//! - `listener`: binding and accepting client sockets.
//! - `eager`: client sockets that join epoll only when an operation would block.
//! - `close`: the heart — the close policy (`policy::decide`, the one place FIN or RST is
//!   chosen), `Tracked`, the socket wrapper that carries it out for every protocol, the
//!   ledger of closes and the kernel's socket census.
//! - `connector`: the one way to an upstream server for every protocol: picks a server,
//!   lends an idle connection or opens one (permit, connect, handshake, health), as a lease.
//! - `pool`: per-server pools of persistent upstream connections, protocol-neutral, with
//!   balancing (weighted round-robin, least connections).
//! - `dns`: server names that follow DNS: looked up again at their TTL, the upstream's
//!   server list changed as a reload of that list would.
//! - `health`: servers marked down by failures or active checks, skipped for a back-off.
//! - `http`: the HTTP/1.1 relay: hyper's connection-level server for clients; upstream, its
//!   own HTTP/1.1 exchange for bodyless requests and hyper's client for those with a body.
//! - `mysql`: the MySQL front: logins checked here, server connections lent per session.
//! - `tcp`: the byte relay for any protocol, with half-close and preconnected servers.
//! - `tls`: listeners' certificates, the handshake with clients, and the TLS stream that
//!   closes by the same policy as a plain socket.
//! - `proxy_protocol`: PROXY v1/v2 headers read from load balancers and sent to servers.
//! - `admin`: /metrics, /stats, /healthz and /reload, and the `waitless stats` table; it
//!   sees the running proxy only through `admin::Control`.
//! - `demo`: `waitless demo`, where TIME_WAIT lands under each policy, measured.
//! - `frontend`: each protocol as the composition root builds it (service and pool).
//! - `proxy`: the running proxy: one config wired into listeners and pools, reloaded and
//!   drained ("server" means only an upstream server).
//! - `upgrade`: a new binary started with the listening sockets handed over, so that
//!   nothing queued on them is lost.
//! - `workers`: thread-per-core runtimes; listeners and pools are spread over them.
//! - `alloc`: mimalloc as the global allocator, on its plain entry points.

// Network input never panics the process: outside tests, no unwrap, expect or unchecked
// indexing (a `get` says what happens when the index is out of range).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod access;
pub mod admin;
pub mod alloc;
pub mod close;
pub mod config;
pub mod connector;
pub mod demo;
pub mod dns;
pub mod eager;
pub mod frontend;
pub mod health;
pub mod http;
pub mod listener;
pub mod mysql;
pub mod pool;
pub mod proxy;
pub mod proxy_protocol;
pub mod systemd;
pub mod tcp;
pub mod tls;
pub mod upgrade;
pub mod workers;
