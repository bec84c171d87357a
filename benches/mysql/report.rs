//! The report: the table (each operation's direct time, HAProxy / direct and
//! waitless / direct as medians of the ratios taken round by round), the CPU and server
//! connection figures, and issue 18's targets, each met or not.

use serde::Serialize;

use crate::clients::{Part, PHP_PARTS};
use crate::measure::Run;
use crate::targets::{Target, POOL_SIZE};

/// One target and part over its rounds: medians, and every round's figure.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub target: Target,
    pub part: &'static str,
    pub rounds: usize,
    /// Median µs per operation, and each round's.
    pub us_per_op: f64,
    pub us_per_op_each: Vec<f64>,
    /// Median operations per second.
    pub per_s: f64,
    /// Median CPU per operation of the proxy and the server (µs).
    pub proxy_cpu_us: Option<f64>,
    pub server_cpu_us: f64,
    /// Server connections opened, each round.
    pub server_connections_each: Vec<u64>,
    /// Errors over all rounds.
    pub errors: u64,
}

/// One of issue 18's targets.
#[derive(Debug, Serialize)]
pub struct Check {
    pub what: String,
    /// The figure judged, with its unit ("0.62x direct", "31.0 µs").
    pub value: String,
    /// The bound, as the issue gives it.
    pub target: String,
    /// None when the figure could not be measured in this run.
    pub met: Option<bool>,
    /// Each round's figure, when it is a median of rounds.
    pub rounds: Vec<f64>,
}

// === impl Summary ===

impl Summary {
    pub fn of(runs: &[Run], target: Target, part: Part) -> Option<Summary> {
        let mine: Vec<&Run> = of(runs, target, part).collect();
        if mine.is_empty() {
            return None;
        }
        let each = |f: fn(&Run) -> f64| mine.iter().map(|r| f(r)).collect::<Vec<_>>();
        let proxy: Vec<f64> = mine.iter().filter_map(|r| r.proxy_cpu_us).collect();
        Some(Summary {
            target,
            part: part.key(),
            rounds: mine.len(),
            us_per_op: median(&each(|r| r.us_per_op)),
            us_per_op_each: each(|r| r.us_per_op),
            per_s: median(&each(|r| r.per_s)),
            proxy_cpu_us: (!proxy.is_empty()).then(|| median(&proxy)),
            server_cpu_us: median(&each(|r| r.server_cpu_us)),
            server_connections_each: mine.iter().map(|r| r.server_connections).collect(),
            errors: mine.iter().map(|r| r.errors).sum(),
        })
    }
}

/// The runs of `target` on `part`, in the order taken.
fn of(runs: &[Run], target: Target, part: Part) -> impl Iterator<Item = &Run> {
    runs.iter()
        .filter(move |r| r.target == target && r.part == part.key())
}

/// The middle value (the mean of the two middle ones for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Round by round, `value` of `a` over `value` of `b` on `part`, for the rounds both ran.
pub fn per_round(
    runs: &[Run],
    part: Part,
    a: Target,
    b: Target,
    value: fn(&Run) -> f64,
) -> Vec<f64> {
    of(runs, a, part)
        .filter_map(|ra| {
            let rb = of(runs, b, part).find(|rb| rb.round == ra.round)?;
            let vb = value(rb);
            (vb > 0.0).then(|| value(ra) / vb)
        })
        .collect()
}

fn us(r: &Run) -> f64 {
    r.us_per_op
}

fn rate(r: &Run) -> f64 {
    r.per_s
}

fn server_cpu(r: &Run) -> f64 {
    r.server_cpu_us
}

/// "1.23×", or "-" when there is no round to take a ratio of.
fn fmt_ratio(each: &[f64]) -> String {
    if each.is_empty() {
        "-".into()
    } else {
        format!("{:.2}×", median(each))
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

/// A markdown table with its columns padded to the widest cell.
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(head.iter().map(|h| h.to_string()).collect());
    out.push_str(&line(width.iter().map(|w| "-".repeat(*w)).collect()));
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

/// The table: each operation's direct time, then the proxies' ratios to it.
pub fn render_table(runs: &[Run], slap_queries: u64) -> String {
    let mut rows = Vec::new();
    for part in PHP_PARTS.into_iter().chain([Part::Slap]) {
        let Some(direct) = Summary::of(runs, Target::Direct, part) else {
            continue;
        };
        let (first, value): (String, fn(&Run) -> f64) = match part {
            Part::Slap => (format!("{:.0} sessions/s", direct.per_s), rate),
            _ => (format!("{:.0} µs", direct.us_per_op), us),
        };
        let h = per_round(runs, part, Target::Haproxy, Target::Direct, value);
        let w = per_round(runs, part, Target::Waitless, Target::Direct, value);
        let mut wcell = fmt_ratio(&w);
        if part == Part::Select {
            let wh = per_round(runs, part, Target::Waitless, Target::Haproxy, us);
            if !wh.is_empty() {
                wcell.push_str(&format!(" ({} HAProxy)", fmt_ratio(&wh)));
            }
        }
        let label = match part {
            Part::Slap => format!(
                "mariadb-slap c{POOL_SIZE}, {slap_queries} × `select 1`, connect per query \
                 (sessions/s)"
            ),
            _ => part.label().to_string(),
        };
        rows.push(vec![label, first, fmt_ratio(&h), wcell]);
    }
    table(
        &[
            "operation",
            "direct",
            "HAProxy / direct",
            "waitless / direct",
        ],
        &rows,
    )
}

/// Every round's figure of every target, in the order the rounds ran.
pub fn render_rounds(summaries: &[Summary]) -> String {
    let mut out = String::from("round by round (PHP: µs per operation; slap: sessions/s):\n");
    for s in summaries {
        let each: Vec<String> = if s.part == Part::Slap.key() {
            s.us_per_op_each
                .iter()
                .map(|u| format!("{:.0}", 1e6 / u))
                .collect()
        } else {
            s.us_per_op_each.iter().map(|u| format!("{u:.1}")).collect()
        };
        out.push_str(&format!(
            "  {:<16} {:<16} {}{}\n",
            s.part,
            s.target.label(),
            each.join(" "),
            if s.errors > 0 {
                format!("  ({} errors)", s.errors)
            } else {
                String::new()
            }
        ));
    }
    out
}

/// CPU per session of the proxy and the server, and the server connections each target
/// opened: over a round's PHP runs (one client at a time), and over slap's run.
pub fn render_cpu(runs: &[Run], summaries: &[Summary]) -> String {
    let find = |t: Target, p: Part| {
        summaries
            .iter()
            .find(|s| s.target == t && s.part == p.key())
    };
    let joined = |v: Vec<u64>| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
        }
    };
    let mut rows = Vec::new();
    for t in [Target::Direct, Target::Haproxy, Target::Waitless] {
        let cs = find(t, Part::ConnectSelect);
        let sl = find(t, Part::Slap);
        if cs.is_none() && sl.is_none() {
            continue;
        }
        let mut php_rounds: Vec<usize> = runs
            .iter()
            .filter(|r| r.target == t && r.part != Part::Slap.key())
            .map(|r| r.round)
            .collect();
        php_rounds.dedup();
        let php_conns: Vec<u64> = php_rounds
            .iter()
            .map(|&round| {
                runs.iter()
                    .filter(|r| r.target == t && r.round == round && r.part != Part::Slap.key())
                    .map(|r| r.server_connections)
                    .sum()
            })
            .collect();
        rows.push(vec![
            t.label().to_string(),
            fmt_opt(cs.and_then(|s| s.proxy_cpu_us)),
            fmt_opt(cs.map(|s| s.server_cpu_us)),
            fmt_opt(sl.and_then(|s| s.proxy_cpu_us)),
            fmt_opt(sl.map(|s| s.server_cpu_us)),
            joined(php_conns),
            joined(sl.map_or(Vec::new(), |s| s.server_connections_each.clone())),
        ]);
    }
    table(
        &[
            "target",
            "proxy CPU, PHP c+S+c",
            "MariaDB CPU, PHP c+S+c",
            "proxy CPU, slap",
            "MariaDB CPU, slap",
            "server conns opened, PHP round",
            "server conns opened, slap",
        ],
        &rows,
    )
}

/// Issue 18's targets, judged on this run.
pub fn checks(runs: &[Run], summaries: &[Summary]) -> Vec<Check> {
    let mut out = Vec::new();
    let ratio_check = |what: &str, each: Vec<f64>, unit: &str, bound: f64, higher: bool| {
        let m = median(&each);
        Check {
            what: what.to_string(),
            value: if each.is_empty() {
                "not measured".into()
            } else {
                format!("{m:.2}× {unit}")
            },
            target: format!("{} {bound:.1}× {unit}", if higher { "≥" } else { "≤" }),
            met: (!each.is_empty()).then_some(if higher { m >= bound } else { m <= bound }),
            rounds: each,
        }
    };
    let wd = |part| per_round(runs, part, Target::Waitless, Target::Direct, us);
    out.push(ratio_check(
        "connect + SELECT 1 + close",
        wd(Part::ConnectSelect),
        "direct",
        0.6,
        false,
    ));
    out.push(ratio_check(
        "app session",
        wd(Part::Session),
        "direct",
        0.8,
        false,
    ));
    out.push(ratio_check(
        "connect + close",
        wd(Part::Connect),
        "direct",
        0.4,
        false,
    ));
    out.push(ratio_check(
        "SELECT 1 on an open connection",
        per_round(runs, Part::Select, Target::Waitless, Target::Haproxy, us),
        "HAProxy",
        1.0,
        false,
    ));
    let w_cpu: Vec<f64> = of(runs, Target::Waitless, Part::ConnectSelect)
        .filter_map(|r| r.proxy_cpu_us)
        .collect();
    out.push(Check {
        what: "waitless CPU per short session (PHP connect + SELECT 1 + close)".into(),
        value: if w_cpu.is_empty() {
            "not measured".into()
        } else {
            format!("{:.1} µs", median(&w_cpu))
        },
        target: "≤ 30 µs".into(),
        met: (!w_cpu.is_empty()).then(|| median(&w_cpu) <= 30.0),
        rounds: w_cpu,
    });
    // "Well under its cost of a direct connection": taken as at most half.
    out.push(ratio_check(
        "MariaDB CPU per client session, waitless / direct (PHP connect + SELECT 1 + close; \
         \"well under\" taken as half)",
        per_round(
            runs,
            Part::ConnectSelect,
            Target::Waitless,
            Target::Direct,
            server_cpu,
        ),
        "direct",
        0.5,
        false,
    ));
    let slap = summaries
        .iter()
        .find(|s| s.target == Target::Waitless && s.part == Part::Slap.key());
    let most = slap.and_then(|s| s.server_connections_each.iter().max().copied());
    out.push(Check {
        what: format!("server connections opened, mariadb-slap c{POOL_SIZE} through waitless"),
        value: most.map_or("not measured".into(), |m| {
            format!("{m} (most of any round)")
        }),
        target: format!("≤ pool_size {POOL_SIZE}"),
        met: most.map(|m| m <= POOL_SIZE as u64),
        rounds: slap.map_or(Vec::new(), |s| {
            s.server_connections_each
                .iter()
                .map(|&c| c as f64)
                .collect()
        }),
    });
    out.push(ratio_check(
        "mariadb-slap c16 sessions/s, waitless / direct",
        per_round(runs, Part::Slap, Target::Waitless, Target::Direct, rate),
        "direct",
        1.5,
        true,
    ));
    let errors: u64 = runs
        .iter()
        .filter(|r| r.target == Target::Waitless)
        .map(|r| r.errors)
        .sum();
    let measured = runs.iter().any(|r| r.target == Target::Waitless);
    out.push(Check {
        what: "client errors through waitless".into(),
        value: if measured {
            errors.to_string()
        } else {
            "not measured".into()
        },
        target: "0".into(),
        met: measured.then_some(errors == 0),
        rounds: Vec::new(),
    });
    out
}

/// The targets, one line each.
pub fn render_checks(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let rounds: Vec<String> = c.rounds.iter().map(|v| format!("{v:.2}")).collect();
        out.push_str(&format!(
            "  {:<8} {}: {} (target {}){}\n",
            match c.met {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "-",
            },
            c.what,
            c.value,
            c.target,
            if rounds.len() > 1 {
                format!("; rounds: {}", rounds.join(" "))
            } else {
                String::new()
            }
        ));
    }
    out
}
