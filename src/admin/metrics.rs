//! Prometheus text for /metrics, rendered from a snapshot with prometheus-client.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::stats::{LedgerSnap, Snapshot};
use crate::close::census::StateCounts;

type Labels = Vec<(&'static str, String)>;

/// The families of one scrape.
#[derive(Default)]
struct Families {
    requests: Family<Labels, Counter>,
    client_connections: Family<Labels, Counter>,
    rejected: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    opened: Family<Labels, Counter>,
    reused: Family<Labels, Counter>,
    closed: Family<Labels, Counter>,
    retries: Family<Labels, Counter>,
    connect_errors: Family<Labels, Counter>,
    resets: Family<Labels, Counter>,
    idle: Family<Labels, Gauge>,
    closes: Family<Labels, Counter>,
    sockets: Family<Labels, Gauge>,
}

/// Renders the snapshot as Prometheus text exposition.
pub fn render(snap: &Snapshot) -> String {
    let f = Families::default();
    for l in &snap.listeners {
        let who = || vec![("listener", l.name.clone())];
        f.requests.get_or_create(&who()).inc_by(l.requests);
        f.client_connections
            .get_or_create(&who())
            .inc_by(l.connections);
        f.rejected.get_or_create(&who()).inc_by(l.rejected);
        for (kind, n) in [
            ("connect", l.errors.connect),
            ("timeout", l.errors.timeout),
            ("busy", l.errors.busy),
            ("upstream", l.errors.upstream),
        ] {
            let mut labels = who();
            labels.push(("kind", kind.to_string()));
            f.errors.get_or_create(&labels).inc_by(n);
        }
        closes(&f, "listener", &l.name, &l.ledger);
        if let Some(c) = &l.census {
            sockets(&f, "listener", &l.name, "proxy", c);
        }
    }
    for up in &snap.upstreams {
        for s in &up.servers {
            let who = || vec![("upstream", up.name.clone()), ("server", s.server.clone())];
            f.opened.get_or_create(&who()).inc_by(s.opened);
            f.reused.get_or_create(&who()).inc_by(s.reused);
            f.closed.get_or_create(&who()).inc_by(s.ledger.closed);
            f.retries.get_or_create(&who()).inc_by(s.retries);
            f.connect_errors
                .get_or_create(&who())
                .inc_by(s.connect_errors);
            if s.resets + s.resets_skipped > 0 {
                for (kind, n) in [("done", s.resets), ("skipped", s.resets_skipped)] {
                    let mut labels = who();
                    labels.push(("kind", kind.to_string()));
                    f.resets.get_or_create(&labels).inc_by(n);
                }
            }
            f.idle.get_or_create(&who()).set(s.idle as i64);
            let name = format!("{}/{}", up.name, s.server);
            closes(&f, "server", &name, &s.ledger);
            if let Some(c) = &s.census_proxy {
                sockets(&f, "server", &name, "proxy", c);
            }
            if let Some(c) = &s.census_server {
                sockets(&f, "server", &name, "server", c);
            }
        }
    }

    let mut reg = Registry::with_prefix("waitless");
    reg.register("requests", "HTTP requests received", f.requests);
    reg.register(
        "client_connections",
        "Client connections accepted",
        f.client_connections,
    );
    reg.register(
        "client_connections_rejected",
        "Client connections turned away at max_clients (HTTP: 503, MySQL: error 1040, tcp: closed)",
        f.rejected,
    );
    reg.register(
        "errors",
        "Requests answered with an error, by kind (connect=502, timeout=504, busy=503, upstream=502)",
        f.errors,
    );
    reg.register(
        "upstream_connections_opened",
        "Upstream connections opened",
        f.opened,
    );
    reg.register(
        "upstream_connections_reused",
        "Requests sent on an upstream connection that had carried one before",
        f.reused,
    );
    reg.register(
        "upstream_connections_closed",
        "Upstream connections closed",
        f.closed,
    );
    reg.register(
        "upstream_retries",
        "Requests retried on a fresh connection after a reused one was found closed",
        f.retries,
    );
    reg.register(
        "upstream_connect_errors",
        "Failed connects to upstream servers",
        f.connect_errors,
    );
    reg.register(
        "mysql_session_resets",
        "MySQL sessions ended, by whether their server connection was reset (done) or provably clean (skipped)",
        f.resets,
    );
    reg.register(
        "pool_idle_connections",
        "Idle pooled upstream connections",
        f.idle,
    );
    reg.register(
        "closes",
        "Connections closed, by side, who closed first, how, why, and where TIME_WAIT landed",
        f.closes,
    );
    reg.register(
        "sockets",
        "The kernel's count of TCP sockets by state (census), per listener port and per upstream server",
        f.sockets,
    );
    let mut out = String::new();
    if encode(&mut out, &reg).is_err() {
        out.clear();
    }
    out
}

fn closes(f: &Families, side: &'static str, name: &str, ledger: &LedgerSnap) {
    for e in &ledger.entries {
        let labels = vec![
            ("side", side.to_string()),
            ("name", name.to_string()),
            ("closer", e.closer.clone()),
            ("how", e.how.clone()),
            ("reason", e.reason.clone()),
            ("time_wait", e.time_wait.clone()),
        ];
        f.closes.get_or_create(&labels).inc_by(e.count);
    }
}

fn sockets(f: &Families, side: &'static str, name: &str, view: &'static str, c: &StateCounts) {
    for (state, n) in [
        ("established", c.established),
        ("syn_sent", c.syn_sent),
        ("syn_recv", c.syn_recv),
        ("fin_wait1", c.fin_wait1),
        ("fin_wait2", c.fin_wait2),
        ("time_wait", c.time_wait),
        ("close_wait", c.close_wait),
        ("last_ack", c.last_ack),
        ("closing", c.closing),
        ("listen", c.listen),
    ] {
        let labels = vec![
            ("side", side.to_string()),
            ("name", name.to_string()),
            ("view", view.to_string()),
            ("state", state.to_string()),
        ];
        f.sockets.get_or_create(&labels).set(n as i64);
    }
}
