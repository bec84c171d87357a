//! The report: each target's medians over its runs, the table, and the targets as ratios of
//! waitless to the better anchor, taken round by round.

use serde::Serialize;

use crate::measure::Run;
use crate::rss::Rss;
use crate::targets::Target;

/// One target under one kind of client over all its runs: the medians of the rates, times and
/// CPU; of TIME_WAIT the most any run left; the errors of all runs.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// The target's label.
    pub target: String,
    /// "short" or "keep-alive".
    pub clients: &'static str,
    /// How many runs it had (the contest's rounds, else 1).
    pub runs: usize,
    /// The median req/s.
    pub req_per_s: f64,
    /// Every run's req/s, in the order taken.
    pub req_per_s_each: Vec<f64>,
    /// The median of the proxy's CPU per request; None for `direct`.
    pub proxy_cpu_us_per_req: Option<f64>,
    /// Every run's CPU per request, in the order taken.
    pub proxy_cpu_us_each: Vec<f64>,
    /// Median latency percentiles.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Errors of all runs together.
    pub errors: u64,
    /// The most TIME_WAIT any run left on the backend, the proxy and the clients.
    pub tw_backend: u64,
    pub tw_proxy: Option<u64>,
    pub tw_client: u64,
    /// TIME_WAIT the kernel dropped over all runs.
    pub tw_overflow: u64,
}

// === impl Summary ===

impl Summary {
    /// The runs of `target` with `clients`, if there were any.
    pub fn of(runs: &[Run], target: Target, clients: &'static str) -> Option<Summary> {
        let label = target.label();
        let mine: Vec<&Run> = runs
            .iter()
            .filter(|r| r.target == label && r.clients == clients)
            .collect();
        if mine.is_empty() {
            return None;
        }
        let each =
            |f: fn(&Run) -> Option<f64>| mine.iter().filter_map(|r| f(r)).collect::<Vec<_>>();
        let req_per_s_each = each(|r| Some(r.req_per_s));
        let proxy_cpu_us_each = each(|r| r.proxy_cpu_us_per_req);
        Some(Summary {
            target: label,
            clients,
            runs: mine.len(),
            req_per_s: median(&req_per_s_each),
            proxy_cpu_us_per_req: (!proxy_cpu_us_each.is_empty())
                .then(|| median(&proxy_cpu_us_each)),
            p50_ms: median(&each(|r| Some(r.p50_ms))),
            p99_ms: median(&each(|r| Some(r.p99_ms))),
            errors: mine.iter().map(|r| r.errors).sum(),
            tw_backend: mine.iter().map(|r| r.tw_backend).max().unwrap_or(0),
            tw_proxy: mine.iter().filter_map(|r| r.tw_proxy).max(),
            tw_client: mine.iter().map(|r| r.tw_client).max().unwrap_or(0),
            tw_overflow: mine.iter().map(|r| r.tw_overflow).sum(),
            req_per_s_each,
            proxy_cpu_us_each,
        })
    }
}

/// The middle value (the mean of the two middle ones for an even count); 0 for none.
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Rates in thousands ("12.3k") from 1,000 up.
fn fmt_k(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

/// A figure with `prec` decimals, or "-" when there is none.
fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.prec$}"))
}

/// The table of summaries, then every contest round's figures.
pub fn render_summaries(summaries: &[Summary]) -> String {
    let mut out = format!(
        "{:<28} {:<10} {:>4} {:>8} {:>9} {:>7} {:>7} {:>8} {:>8} {:>8} {:>9} {:>6}\n",
        "target",
        "clients",
        "runs",
        "req/s",
        "CPU µs/r",
        "p50 ms",
        "p99 ms",
        "TW back",
        "TW proxy",
        "TW clnt",
        "TW overfl",
        "errors"
    );
    for r in summaries {
        out.push_str(&format!(
            "{:<28} {:<10} {:>4} {:>8} {:>9} {:>7.2} {:>7.2} {:>8} {:>8} {:>8} {:>9} {:>6}\n",
            r.target,
            r.clients,
            r.runs,
            fmt_k(r.req_per_s),
            fmt_opt(r.proxy_cpu_us_per_req, 1),
            r.p50_ms,
            r.p99_ms,
            r.tw_backend,
            r.tw_proxy.map_or("-".into(), |n| n.to_string()),
            r.tw_client,
            r.tw_overflow,
            r.errors
        ));
    }
    let rounds: Vec<&Summary> = summaries.iter().filter(|r| r.runs > 1).collect();
    if !rounds.is_empty() {
        out.push_str("\nround by round (req/s; CPU µs/r):\n");
    }
    for r in rounds {
        let rates: Vec<String> = r.req_per_s_each.iter().map(|v| fmt_k(*v)).collect();
        let cpu: Vec<String> = r
            .proxy_cpu_us_each
            .iter()
            .map(|v| format!("{v:.1}"))
            .collect();
        out.push_str(&format!(
            "  {:<28} {:<10} {}; {}\n",
            r.target,
            r.clients,
            rates.join(" "),
            cpu.join(" ")
        ));
    }
    out
}

/// The idle-RSS table.
pub fn render_rss(rss: &[Rss]) -> String {
    let mut out = format!(
        "{:<28} {:>10} {:>12} {:>14} {:>16}\n",
        "target", "idle conns", "RSS before", "RSS with idle", "bytes per conn"
    );
    for r in rss {
        out.push_str(&format!(
            "{:<28} {:>10} {:>9.1} MB {:>11.1} MB {:>16.0}\n",
            r.target,
            r.idle_conns,
            r.rss_before_kb as f64 / 1024.0,
            r.rss_with_idle_kb as f64 / 1024.0,
            r.bytes_per_idle_conn
        ));
    }
    out
}

/// One line of the targets check.
#[derive(Debug, Serialize)]
pub struct Ratio {
    pub what: String,
    pub waitless: f64,
    pub best: f64,
    pub best_is: String,
    /// The median of `each`.
    pub ratio: f64,
    /// Round by round.
    pub each: Vec<f64>,
    pub target: String,
    pub met: bool,
}

/// The issue's targets, as ratios of waitless (`none`, `client` for TIME_WAIT) to the better
/// of HAProxy and nginx in this run: for rates and CPU the median over the rounds of each
/// round's ratio, since the runs of one round are minutes apart and the machine's drift
/// between rounds (up to 20%) moves them together. `bounds`: the least ratio of requests/s
/// for short and for keep-alive clients.
pub fn ratios(
    summaries: &[Summary],
    runs: &[Run],
    rss: &[Rss],
    bounds: (f64, f64),
) -> (Vec<Ratio>, Vec<String>) {
    let get = |t: Target, c: &str| {
        let label = t.label();
        summaries
            .iter()
            .find(|r| r.target == label && r.clients == c)
    };
    let mut out = Vec::new();
    let mut checks = Vec::new();
    let none = Target::Waitless("none");
    let rate = |r: &Run| Some(r.req_per_s);
    let cpu = |r: &Run| r.proxy_cpu_us_per_req;
    let anchors = [Target::Haproxy.label(), Target::Nginx.label()];
    // Over TLS, also against the anchors that speak TLS 1.3 to clients, as waitless does.
    let tls13 = [Target::Haproxy.label(), Target::NginxTls13.label()];
    let mut rows = vec![
        (
            "short",
            "req/s",
            rate as fn(&Run) -> Option<f64>,
            true,
            bounds.0,
            &anchors,
        ),
        ("keep-alive", "req/s", rate, true, bounds.1, &anchors),
        ("short", "CPU µs/req", cpu, false, 1.0, &anchors),
        ("keep-alive", "CPU µs/req", cpu, false, 1.0, &anchors),
    ];
    if runs.iter().any(|r| r.target == tls13[1]) {
        rows.push(("short", "req/s, TLS 1.3", rate, true, bounds.0, &tls13));
        rows.push(("short", "CPU µs/req, TLS 1.3", cpu, false, 1.0, &tls13));
    }
    for (clients, measure, value, higher, bound, rivals) in rows {
        let rounds = paired(runs, clients, value, higher, rivals);
        if rounds.is_empty() {
            continue;
        }
        let each: Vec<f64> = rounds.iter().map(|(w, b, _)| w / b).collect();
        let ratio = median(&each);
        // "HAProxy" or "nginx": the anchor that was the better one in some round.
        let mut best_is: Vec<String> = rounds
            .iter()
            .filter_map(|(_, _, who)| who.split(' ').next().map(String::from))
            .collect();
        best_is.sort();
        best_is.dedup();
        out.push(Ratio {
            what: format!("{clients} {measure}"),
            waitless: median(&rounds.iter().map(|r| r.0).collect::<Vec<_>>()),
            best: median(&rounds.iter().map(|r| r.1).collect::<Vec<_>>()),
            best_is: best_is.join(" / "),
            ratio,
            each,
            target: if higher {
                format!(">= {bound:.1}x")
            } else {
                format!("<= {bound:.1}x")
            },
            met: if higher {
                ratio >= bound
            } else {
                ratio <= bound
            },
        });
    }
    let rss_of = |t: Target| {
        let label = t.label();
        rss.iter()
            .find(|r| r.target == label)
            .map(|r| r.bytes_per_idle_conn)
    };
    if let (Some(w), Some(h)) = (rss_of(none), rss_of(Target::Haproxy)) {
        let ratio = w / h.max(1.0);
        out.push(Ratio {
            what: "RSS bytes per idle conn".into(),
            waitless: w,
            best: h,
            best_is: Target::Haproxy.label(),
            ratio,
            each: vec![ratio],
            target: "<= 1.0x HAProxy".into(),
            met: ratio <= 1.0,
        });
    }
    if let Some(w) = get(none, "short") {
        let zero = w.tw_backend == 0 && w.tw_proxy == Some(0) && w.tw_client == 0;
        checks.push(format!(
            "time_wait=none, short: TIME_WAIT backend/proxy/client = {}/{}/{} (overflow {}) — \
             target 0 on every side: {}",
            w.tw_backend,
            w.tw_proxy.unwrap_or(0),
            w.tw_client,
            w.tw_overflow,
            if zero && w.tw_overflow == 0 {
                "met"
            } else {
                "MISSED"
            }
        ));
    }
    let errors: u64 = summaries
        .iter()
        .filter(|r| r.target.starts_with("waitless"))
        .map(|r| r.errors)
        .sum();
    checks.push(format!(
        "waitless errors over all its runs: {errors} — target 0: {}",
        if errors == 0 { "met" } else { "MISSED" }
    ));
    if let Some(c) = get(Target::Waitless("client"), "short") {
        let zero = c.tw_backend == 0 && c.tw_proxy == Some(0);
        checks.push(format!(
            "time_wait=client, short: TIME_WAIT backend/proxy = {}/{} — target 0: {} \
             (client: {}, the client's own cost)",
            c.tw_backend,
            c.tw_proxy.unwrap_or(0),
            if zero { "met" } else { "MISSED" },
            c.tw_client
        ));
    }
    (out, checks)
}

/// Round by round, waitless `none`'s `value` and the better anchor's (`higher` is better)
/// with its label, for the rounds in which both ran.
fn paired(
    runs: &[Run],
    clients: &str,
    value: fn(&Run) -> Option<f64>,
    higher: bool,
    rivals: &[String],
) -> Vec<(f64, f64, String)> {
    let none = Target::Waitless("none").label();
    runs.iter()
        .filter(|r| r.target == none && r.clients == clients)
        .filter_map(|w| {
            let best = runs
                .iter()
                .filter(|r| r.round == w.round && r.clients == clients)
                .filter(|r| rivals.contains(&r.target))
                .filter_map(|r| value(r).map(|v| (v, r.target.clone())))
                .max_by(|a, b| {
                    if higher {
                        a.0.total_cmp(&b.0)
                    } else {
                        b.0.total_cmp(&a.0)
                    }
                })?;
            Some((value(w)?, best.0, best.1))
        })
        .collect()
}

/// The targets, one line each, then the checks.
pub fn render_ratios(ratios: &[Ratio], checks: &[String]) -> String {
    let mut out = String::new();
    for r in ratios {
        let each: Vec<String> = r.each.iter().map(|v| format!("{v:.2}")).collect();
        out.push_str(&format!(
            "  {:<24} waitless {:>9.1}  vs {:>9.1} ({:<15})  {:>5.2}x  target {:<16} {:<6} {}\n",
            r.what,
            r.waitless,
            r.best,
            r.best_is,
            r.ratio,
            r.target,
            if r.met { "met" } else { "MISSED" },
            if each.len() > 1 {
                format!("rounds: {}", each.join(" "))
            } else {
                String::new()
            }
        ));
    }
    for c in checks {
        out.push_str(&format!("  {c}\n"));
    }
    out
}
