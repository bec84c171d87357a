//! `waitless stats`: the /stats snapshot as a terminal table, ledger beside census, so an
//! operator sees at a glance where TIME_WAIT is.

use super::stats::{LedgerSnap, Snapshot};
use crate::close::census::StateCounts;

/// Renders a /stats snapshot.
pub fn render(stats: &Snapshot) -> String {
    let mut out = String::new();

    out.push_str("CLIENT SIDE (listeners)\n");
    for l in &stats.listeners {
        let e = &l.errors;
        out.push_str(&format!(
            "  {} on {}  time_wait={}  open {}  connections {}  rejected {}  requests {}  errors {}\n",
            l.name,
            l.listen,
            l.time_wait,
            l.active,
            l.connections,
            l.rejected,
            l.requests,
            e.connect + e.timeout + e.busy + e.upstream,
        ));
        ledger(&mut out, &l.ledger, "client");
        census(&mut out, l.census.as_ref(), "listener port");
    }
    out.push_str("\nUPSTREAM SIDE (pooled connections)\n");
    for u in &stats.upstreams {
        out.push_str(&format!("  {}  time_wait={}\n", u.name, u.time_wait));
        for n in &u.dns {
            let error = n
                .error
                .as_ref()
                .map(|e| format!("  last lookup failed: {e}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "    name {} -> {}  lookups ok {} failed {}  next in {:.1}s{error}\n",
                n.name,
                n.addrs.join(", "),
                n.ok,
                n.failed,
                n.next_secs,
            ));
        }
        for srv in &u.servers {
            out.push_str(&format!(
                "    server {}{}  {}  weight {}  idle {} of {} open  opened {}  reused {}  retries {}  connect errors {}\n",
                srv.server,
                srv.name
                    .as_ref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default(),
                srv.state,
                srv.weight,
                srv.idle,
                srv.open,
                srv.opened,
                srv.reused,
                srv.retries,
                srv.connect_errors,
            ));
            ledger(&mut out, &srv.ledger, "server");
            census(&mut out, srv.census_proxy.as_ref(), "waitless side");
            census(&mut out, srv.census_server.as_ref(), "server side");
        }
    }
    if let Some(err) = &stats.census_error {
        out.push_str(&format!("\ncensus unavailable: {err}\n"));
    }
    out
}

fn ledger(out: &mut String, l: &LedgerSnap, peer: &str) {
    out.push_str(&format!(
        "      ledger  closed {:>8}   TIME_WAIT landed on {peer} {:>8}, on waitless {:>8}, nowhere {:>8}\n",
        l.closed, l.time_wait_peer, l.time_wait_proxy, l.time_wait_nobody,
    ));
    for e in &l.entries {
        out.push_str(&format!(
            "              {:>8}  first close by {:<5} with {:<3}  reason {:<14} TIME_WAIT: {}\n",
            e.count, e.closer, e.how, e.reason, e.time_wait,
        ));
    }
}

fn census(out: &mut String, c: Option<&StateCounts>, what: &str) {
    let Some(c) = c else {
        return;
    };
    out.push_str(&format!(
        "      census  {what:<14} TIME_WAIT {:>6}  ESTABLISHED {:>6}  CLOSE_WAIT {:>4}  FIN_WAIT1/2 {}/{}  LAST_ACK {}\n",
        c.time_wait, c.established, c.close_wait, c.fin_wait1, c.fin_wait2, c.last_ack,
    ));
}
