//! Prometheus text for /metrics, rendered from a snapshot with prometheus-client.
//!
//! Every family is registered with its help text and type; the text is prometheus-client's.
//! It writes OpenMetrics, which a Prometheus server asks for (`Accept:
//! application/openmetrics-text`) and gets as is. Anyone else (curl, `promtool check
//! metrics`, older scrapers) gets the classic text format 0.0.4: the same lines, except that
//! a counter's HELP and TYPE name its `_total` sample (OpenMetrics names the family without
//! it, which a 0.0.4 parser reads as a second, undocumented family) and no UNIT or EOF.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::{encode, encode_registry};
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::histogram::HistogramSnap;
use super::stats::{LedgerSnap, Snapshot};
use super::system::System;
use crate::close::census::StateCounts;

type Labels = Vec<(&'static str, String)>;

/// Which exposition format to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0.0, prometheus-client's own.
    OpenMetrics,
    /// The classic Prometheus text format, version 0.0.4.
    Text,
}

/// The families of one scrape.
#[derive(Default)]
struct Families {
    requests: Family<Labels, Counter>,
    client_connections: Family<Labels, Counter>,
    rejected: Family<Labels, Counter>,
    active: Family<Labels, Gauge>,
    errors: Family<Labels, Counter>,
    opened: Family<Labels, Counter>,
    reused: Family<Labels, Counter>,
    closed: Family<Labels, Counter>,
    retries: Family<Labels, Counter>,
    connect_errors: Family<Labels, Counter>,
    resets: Family<Labels, Counter>,
    idle: Family<Labels, Gauge>,
    open: Family<Labels, Gauge>,
    closes: Family<Labels, Counter>,
    sockets: Family<Labels, Gauge>,
    request_duration: Histograms,
    tls_handshakes: Family<Labels, Counter>,
    tls_resumed: Family<Labels, Counter>,
    tls_errors: Family<Labels, Counter>,
    mysql_sessions: Family<Labels, Gauge>,
    mysql_in_use: Family<Labels, Gauge>,
    mysql_lends: Family<Labels, Counter>,
    mysql_pinned: Family<Labels, Gauge>,
    mysql_pins: Family<Labels, Counter>,
    connect_duration: Histograms,
    response_head: Histograms,
}

/// Histogram snapshots by label set: a family whose members are already read (prometheus-
/// client's `Family` makes its members, which a snapshot cannot be made into).
#[derive(Debug, Default)]
struct Histograms(Vec<(Labels, HistogramSnap)>);

// === impl Format ===

impl Format {
    /// The format a scraper's Accept header asks for.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    /// Its Content-Type.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

// === impl Histograms ===

impl EncodeMetric for Histograms {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, h) in &self.0 {
            h.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Renders the snapshot and the system's figures in `format`.
pub fn render(snap: &Snapshot, sys: &System, format: Format) -> String {
    let mut f = Families::default();
    for l in &snap.listeners {
        let who = || vec![("listener", l.name.clone())];
        f.requests.get_or_create(&who()).inc_by(l.requests);
        f.client_connections
            .get_or_create(&who())
            .inc_by(l.connections);
        f.rejected.get_or_create(&who()).inc_by(l.rejected);
        f.active.get_or_create(&who()).set(l.active as i64);
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
        if let Some(tls) = &l.tls {
            let side = || vec![("side", "client".to_string()), ("name", l.name.clone())];
            f.tls_handshakes
                .get_or_create(&side())
                .inc_by(tls.handshakes);
            f.tls_resumed.get_or_create(&side()).inc_by(tls.resumed);
            for (reason, n) in &tls.errors {
                let mut labels = side();
                labels.push(("reason", reason.clone()));
                f.tls_errors.get_or_create(&labels).inc_by(*n);
            }
        }
        if let Some(mux) = &l.mysql {
            f.mysql_sessions
                .get_or_create(&who())
                .set(mux.sessions as i64);
            f.mysql_in_use.get_or_create(&who()).set(mux.in_use as i64);
            f.mysql_lends.get_or_create(&who()).inc_by(mux.lends);
            f.mysql_pinned.get_or_create(&who()).set(mux.pinned as i64);
            for (reason, n) in &mux.pins {
                let mut labels = who();
                labels.push(("reason", reason.clone()));
                f.mysql_pins.get_or_create(&labels).inc_by(*n);
            }
        }
        f.request_duration
            .0
            .push((who(), l.request_duration.clone()));
        if let Some(c) = &l.census {
            sockets(&f, "listener", &l.name, "proxy", c);
        }
    }
    for up in &snap.upstreams {
        if let Some(tls) = &up.tls {
            let side = || vec![("side", "upstream".to_string()), ("name", up.name.clone())];
            f.tls_handshakes
                .get_or_create(&side())
                .inc_by(tls.handshakes);
            f.tls_resumed.get_or_create(&side()).inc_by(tls.resumed);
            for (reason, n) in &tls.errors {
                let mut labels = side();
                labels.push(("reason", reason.clone()));
                f.tls_errors.get_or_create(&labels).inc_by(*n);
            }
        }
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
            f.open.get_or_create(&who()).set(s.open as i64);
            f.connect_duration
                .0
                .push((who(), s.connect_duration.clone()));
            f.response_head.0.push((who(), s.response_head.clone()));
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

    let mut root = Registry::default();
    process(&mut root, sys);
    let reg = root.sub_registry_with_prefix("waitless");
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
        "client_connections_active",
        "Client connections open now",
        f.active,
    );
    reg.register(
        "mysql_client_sessions",
        "Transaction-pooled MySQL client sessions logged in now",
        f.mysql_sessions,
    );
    reg.register(
        "mysql_server_connections_in_use",
        "Server connections lent to a transaction-pooled listener's clients now",
        f.mysql_in_use,
    );
    reg.register(
        "mysql_lends",
        "Server connections lent to transaction-pooled clients (one per statement in autocommit, transaction or pinned session)",
        f.mysql_lends,
    );
    reg.register(
        "mysql_pinned_sessions",
        "Transaction-pooled client sessions pinned to their server connection now",
        f.mysql_pinned,
    );
    reg.register(
        "mysql_pins",
        "Transaction-pooled client sessions pinned to their server connection, by reason (what of theirs would stay on it)",
        f.mysql_pins,
    );
    reg.register(
        "tls_handshakes",
        "TLS handshakes completed, by side (client: with a listener's clients) and name",
        f.tls_handshakes,
    );
    reg.register(
        "tls_resumed_handshakes",
        "TLS handshakes completed that resumed an earlier session (no certificate signed or checked), by side and name",
        f.tls_resumed,
    );
    reg.register(
        "tls_handshake_errors",
        "TLS handshakes failed, by side, name and reason (timeout: not done within header_timeout; eof: the peer left; no_application_protocol: no ALPN protocol in common, e.g. h2 only; not_tls: plain text on a TLS port, closed unanswered; protocol: TLS that rustls refused; certificate: a server's certificate that failed verification)",
        f.tls_errors,
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
        "pool_open_connections",
        "Upstream connections open now, idle or lent",
        f.open,
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
    reg.register_with_unit(
        "request_duration",
        "Time to serve a request (tcp and mysql: a session), end to end, per listener",
        Unit::Seconds,
        f.request_duration,
    );
    reg.register_with_unit(
        "upstream_connect_duration",
        "Time from the start of a connect to a connection the pool can lend (mysql: logged in); failed connects are not in it",
        Unit::Seconds,
        f.connect_duration,
    );
    reg.register_with_unit(
        "upstream_response_head_duration",
        "Time from a request sent to an upstream server to its response head read",
        Unit::Seconds,
        f.response_head,
    );
    let build = Family::<Labels, Gauge>::default();
    build
        .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_string())])
        .set(1);
    reg.register(
        "build_info",
        "Always 1; its version label is waitless's version",
        build,
    );
    let reloads = Family::<Labels, Counter>::default();
    for (result, n) in [
        ("taken", snap.reloads.taken),
        ("refused", snap.reloads.refused),
    ] {
        reloads
            .get_or_create(&vec![("result", result.to_string())])
            .inc_by(n);
    }
    reg.register(
        "reloads",
        "Config reloads (SIGHUP or POST /reload), by whether the new config was taken or refused",
        reloads,
    );
    let resolutions = Family::<Labels, Counter>::default();
    let addresses = Family::<Labels, Gauge>::default();
    for up in &snap.upstreams {
        for n in &up.dns {
            let who = || vec![("upstream", up.name.clone()), ("name", n.name.clone())];
            for (result, count) in [("ok", n.ok), ("error", n.failed)] {
                let mut labels = who();
                labels.push(("result", result.to_string()));
                resolutions.get_or_create(&labels).inc_by(count);
            }
            addresses.get_or_create(&who()).set(n.addrs.len() as i64);
        }
    }
    reg.register(
        "dns_resolutions",
        "Lookups of server names that follow DNS, by result (on error the last addresses stay)",
        resolutions,
    );
    reg.register(
        "dns_addresses",
        "Addresses a server name resolves to now (each one a server with its own pool)",
        addresses,
    );
    host(reg, sys);
    access_log(reg);

    let mut out = String::new();
    let written = match format {
        Format::OpenMetrics => encode(&mut out, &root),
        Format::Text => encode_registry(&mut out, &root),
    };
    if written.is_err() {
        out.clear();
    }
    match format {
        Format::OpenMetrics => out,
        Format::Text => text_format(&out),
    }
}

/// The standard process families (the names every Prometheus client library uses).
fn process(reg: &mut Registry, sys: &System) {
    let Some(p) = sys.process else {
        return;
    };
    let rss = Gauge::<u64, AtomicU64>::default();
    rss.set(p.rss_bytes);
    reg.register_with_unit(
        "process_resident_memory",
        "Resident memory size",
        Unit::Bytes,
        rss,
    );
    let cpu = Counter::<f64, AtomicU64>::default();
    cpu.inc_by(p.cpu_seconds);
    reg.register_with_unit(
        "process_cpu",
        "User and system CPU time spent",
        Unit::Seconds,
        cpu,
    );
    let start = Gauge::<f64, AtomicU64>::default();
    start.set(p.start_time_seconds);
    reg.register_with_unit(
        "process_start_time",
        "Start time of the process since the Unix epoch",
        Unit::Seconds,
        start,
    );
    if let Some(n) = p.open_fds {
        let fds = Gauge::<u64, AtomicU64>::default();
        fds.set(n);
        reg.register("process_open_fds", "Open file descriptors", fds);
    }
    if let Some(n) = p.max_fds {
        let fds = Gauge::<u64, AtomicU64>::default();
        fds.set(n);
        reg.register(
            "process_max_fds",
            "Maximum open file descriptors (RLIMIT_NOFILE soft limit)",
            fds,
        );
    }
}

/// The host's TIME_WAIT figures (waitless's network namespace).
fn host(reg: &mut Registry, sys: &System) {
    if !sys.tcpext.is_empty() {
        let tcpext = Family::<Labels, Counter>::default();
        for (name, n) in &sys.tcpext {
            tcpext
                .get_or_create(&vec![("counter", (*name).to_string())])
                .inc_by(*n);
        }
        reg.register(
            "host_tcpext",
            "The host's TIME_WAIT-related TcpExt counters from /proc/net/netstat, by kernel name: TW (TIME_WAIT ended), TWRecycled, TWKilled, TCPTimeWaitOverflow (closed without TIME_WAIT: table full), TCPAbortOnLinger, TCPAbortOnClose (reset on close)",
            tcpext,
        );
    }
    if let Some(n) = sys.time_wait {
        let tw = Gauge::<u64, AtomicU64>::default();
        tw.set(n);
        reg.register(
            "host_time_wait_sockets",
            "TCP sockets in TIME_WAIT on the host now, whoever owns them (/proc/net/sockstat)",
            tw,
        );
    }
}

/// The access log's own counters: what it wrote, and what it dropped to never make a
/// request wait.
fn access_log(reg: &mut Registry) {
    let written = Counter::<u64, AtomicU64>::default();
    written.inc_by(crate::access::written());
    reg.register(
        "access_log_lines",
        "Access log lines written ([log] access)",
        written,
    );
    let dropped = Counter::<u64, AtomicU64>::default();
    dropped.inc_by(crate::access::dropped());
    reg.register(
        "access_log_dropped",
        "Access log lines dropped because the writer could not keep up ([log] queue full)",
        dropped,
    );
}

/// prometheus-client's OpenMetrics text as text format 0.0.4: a counter family's HELP and
/// TYPE lines name its `_total` sample; UNIT lines (comments to 0.0.4) are left out.
fn text_format(open_metrics: &str) -> String {
    let mut out = String::with_capacity(open_metrics.len() + 256);
    // A HELP line waits for the TYPE after it, which says whether it names a counter.
    let mut help: Option<&str> = None;
    for line in open_metrics.lines() {
        if line.starts_with("# HELP ") {
            push_line(&mut out, help.replace(line));
            continue;
        }
        if let Some(typed) = line.strip_prefix("# TYPE ") {
            let held = help.take();
            match (typed.strip_suffix(" counter"), held) {
                (Some(name), Some(h)) => {
                    let text = h
                        .strip_prefix("# HELP ")
                        .and_then(|t| t.strip_prefix(name))
                        .unwrap_or_default();
                    out.push_str(&format!("# HELP {name}_total{text}\n"));
                    out.push_str(&format!("# TYPE {name}_total counter\n"));
                }
                (_, h) => {
                    push_line(&mut out, h);
                    push_line(&mut out, Some(line));
                }
            }
            continue;
        }
        push_line(&mut out, help.take());
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        push_line(&mut out, Some(line));
    }
    push_line(&mut out, help);
    out
}

fn push_line(out: &mut String, line: Option<&str>) {
    if let Some(l) = line {
        out.push_str(l);
        out.push('\n');
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_names_the_total_sample_of_a_counter_and_keeps_the_rest() {
        let om = "# HELP w_requests Requests.\n# TYPE w_requests counter\n\
                  w_requests_total{l=\"a\"} 3\n\
                  # HELP w_d_seconds Durations.\n# TYPE w_d_seconds histogram\n\
                  # UNIT w_d_seconds seconds\nw_d_seconds_sum 0.5\nw_d_seconds_count 1\n\
                  w_d_seconds_bucket{le=\"+Inf\"} 1\n# EOF\n";
        assert_eq!(
            text_format(om),
            "# HELP w_requests_total Requests.\n# TYPE w_requests_total counter\n\
             w_requests_total{l=\"a\"} 3\n\
             # HELP w_d_seconds Durations.\n# TYPE w_d_seconds histogram\n\
             w_d_seconds_sum 0.5\nw_d_seconds_count 1\nw_d_seconds_bucket{le=\"+Inf\"} 1\n"
        );
    }

    #[test]
    fn an_accept_header_asking_for_openmetrics_gets_it() {
        let prometheus =
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        assert_eq!(Format::from_accept(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Text);
        assert_eq!(Format::from_accept(None), Format::Text);
    }
}
