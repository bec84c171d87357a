//! /metrics, checked from outside: Prometheus's own linter on the scrape, and a parser of the
//! text format that holds every family to its HELP and TYPE, and every histogram to its own
//! arithmetic (cumulative buckets, +Inf equal to the count) and to the counters beside it.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PROMTOOL: &str = "/usr/bin/promtool";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_lint_clean_and_histograms_agree_with_the_counters() {
    let Some(nginx) = Nginx::start().await else {
        panic!("nginx is not installed: .ci/run installs it (apt-get install nginx)");
    };
    let proxy = Waitless::start(&[nginx.addr()], "", "pool_size = 2").await;
    // Four at a time on a pool of two: some requests find the pool empty and open more.
    assert_eq!(short_load(proxy.addr(), 200, 4).await, 0);
    let text = proxy.admin_get("/metrics").await;

    // (a) Prometheus's linter, when installed (.ci/run installs it).
    if std::path::Path::new(PROMTOOL).exists() {
        let (ok, said) = promtool_check(&text);
        assert!(
            ok && said.is_empty(),
            "promtool check metrics: {said}\n{text}"
        );
    } else {
        println!("{PROMTOOL} not found: lint skipped, the parser's checks still run");
    }

    // (b) Our own reading of the text format.
    let scrape = Scrape::parse(&text);
    scrape.every_sample_has_help_and_type();
    scrape.histograms_add_up();

    let server = nginx.addr().to_string();
    let upstream = [("upstream", "web"), ("server", server.as_str())];
    let opened = scrape.value("waitless_upstream_connections_opened_total", &upstream);
    let connects = scrape.value(
        "waitless_upstream_connect_duration_seconds_count",
        &upstream,
    );
    println!("200 short requests, pool_size 2: {opened} upstream connections opened");
    assert!(opened >= 1.0, "no upstream connection opened?\n{text}");
    assert_eq!(
        connects, opened,
        "connect histogram count against connections opened"
    );
    // Every connect is slower than nothing: the sum is there too.
    assert!(scrape.value("waitless_upstream_connect_duration_seconds_sum", &upstream) > 0.0);
    assert_eq!(
        scrape.value("waitless_requests_total", &[("listener", "web")]),
        200.0
    );
    // Every request answered is in the request histogram, and every response head the
    // server sent in its server's histogram.
    assert_eq!(
        scrape.value(
            "waitless_request_duration_seconds_count",
            &[("listener", "web")],
        ),
        200.0
    );
    assert_eq!(
        scrape.value(
            "waitless_upstream_response_head_duration_seconds_count",
            &upstream,
        ),
        200.0
    );

    // The process's figures, against what the kernel says of the process.
    let pid = proxy.child.id();
    let rss = scrape.value("process_resident_memory_bytes", &[]);
    let vm_hwm = proc_kib(pid, "VmHWM") as f64 * 1024.0;
    assert!(rss > 0.0 && rss <= vm_hwm, "rss {rss}, peak {vm_hwm}");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count() as f64;
    let open_fds = scrape.value("process_open_fds", &[]);
    // Within a few: the scrape's own connection and reads come and go.
    assert!(
        (open_fds - fds).abs() <= 4.0,
        "open fds {open_fds}, /proc says {fds}"
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let started = scrape.value("process_start_time_seconds", &[]);
    assert!(
        started <= now + 1.0 && started > now - 120.0,
        "started {started}, now {now}"
    );
    assert!(scrape.value("process_cpu_seconds_total", &[]) >= 0.0);
    assert_eq!(
        scrape.value(
            "waitless_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    // The host's counters, against /proc/net/netstat (they only grow: at most what it says
    // now).
    let tw_now = netstat_tcpext("TW").expect("TcpExt TW in /proc/net/netstat");
    let tw = scrape.value("waitless_host_tcpext_total", &[("counter", "TW")]);
    assert!(tw <= tw_now as f64, "TW {tw}, /proc now {tw_now}");
    for c in [
        "TWRecycled",
        "TWKilled",
        "TCPTimeWaitOverflow",
        "TCPAbortOnLinger",
        "TCPAbortOnClose",
    ] {
        if netstat_tcpext(c).is_some() {
            scrape.value("waitless_host_tcpext_total", &[("counter", c)]);
        }
    }
    scrape.value("waitless_host_time_wait_sockets", &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prometheus_server_asking_for_openmetrics_gets_it() {
    let backend = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[backend.addr], "", "").await;
    assert_eq!(short_load(proxy.addr(), 5, 1).await, 0);
    let admin = SocketAddr::from(([127, 0, 0, 1], proxy.admin));
    // Prometheus's own Accept header.
    let accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                  version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (head, body) = scrape_raw(admin, Some(accept)).await;
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    // OpenMetrics names a counter family without `_total`, and gives units.
    assert!(
        body.contains("# TYPE waitless_requests counter\n"),
        "{body}"
    );
    assert!(body.contains("waitless_requests_total{listener=\"web\"} 5\n"));
    assert!(body.contains("# UNIT waitless_request_duration_seconds seconds\n"));

    let (head, body) = scrape_raw(admin, None).await;
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(body.contains("# TYPE waitless_requests_total counter\n"));
    assert!(
        !body.contains("# EOF") && !body.contains("# UNIT"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_families_waitless_exports() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/grafana-dashboard.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read dashboard"))
            .expect("the dashboard parses as JSON");
    assert!(json["title"].is_string() && json["panels"].is_array());
    let mut exprs = Vec::new();
    collect_exprs(&json, &mut exprs);
    assert!(exprs.len() >= 10, "only {} queries", exprs.len());

    let backend = Backend::start(BackendMode::Echo).await;
    let proxy = Waitless::start(&[backend.addr], "", "").await;
    assert_eq!(short_load(proxy.addr(), 5, 1).await, 0);
    let scrape = Scrape::parse(&proxy.admin_get("/metrics").await);
    let names: Vec<&str> = scrape.samples.iter().map(|s| s.name.as_str()).collect();
    for e in &exprs {
        for name in metric_names(e) {
            assert!(
                names.contains(&name.as_str()),
                "the dashboard queries {name}, which /metrics does not have: {e}"
            );
        }
    }
    for wanted in [
        "histogram_quantile",
        "waitless_closes_total",
        "waitless_sockets",
        "waitless_upstream_connections_reused_total",
        "waitless_errors_total",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(wanted)),
            "no panel uses {wanted}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The text format, read

/// One sample line.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scrape: HELP and TYPE by family name, and the samples in order.
#[derive(Debug, Default)]
struct Scrape {
    help: HashMap<String, String>,
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut s = Scrape::default();
        for line in text.lines().filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                let prev = s.help.insert(name.to_string(), help.to_string());
                assert!(prev.is_none(), "second HELP for {name}");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').expect("TYPE name type");
                let prev = s.types.insert(name.to_string(), ty.to_string());
                assert!(prev.is_none(), "second TYPE for {name}");
            } else if line.starts_with('#') {
                continue;
            } else {
                s.samples.push(parse_sample(line));
            }
        }
        s
    }

    /// The family a sample belongs to: its own name, or a histogram's by suffix.
    fn family_of(&self, sample: &str) -> Option<&str> {
        if self.types.contains_key(sample) {
            return self.types.get_key_value(sample).map(|(k, _)| k.as_str());
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = sample.strip_suffix(suffix)?;
            match self.types.get_key_value(base) {
                Some((k, t)) if t == "histogram" => Some(k.as_str()),
                _ => None,
            }
        })
    }

    fn every_sample_has_help_and_type(&self) {
        assert!(!self.samples.is_empty());
        for s in &self.samples {
            let family = self
                .family_of(&s.name)
                .unwrap_or_else(|| panic!("{} has no TYPE", s.name));
            let help = self.help.get(family);
            assert!(
                help.is_some_and(|h| !h.trim().is_empty()),
                "{family} has no HELP"
            );
            if self.types[family] == "counter" {
                assert!(
                    family.ends_with("_total"),
                    "counter {family} without _total"
                );
            }
        }
    }

    /// Each histogram series: buckets cumulative in `le` order, +Inf equal to `_count`.
    fn histograms_add_up(&self) {
        let mut checked = 0;
        for (family, _) in self.types.iter().filter(|(_, t)| *t == "histogram") {
            let bucket = format!("{family}_bucket");
            let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
            for s in self.samples.iter().filter(|s| s.name == bucket) {
                let mut labels = s.labels.clone();
                let le = labels.remove("le").expect("bucket without le");
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("le")
                };
                series
                    .entry(format!("{labels:?}"))
                    .or_default()
                    .push((le, s.value));
            }
            assert!(!series.is_empty(), "{family} has no buckets");
            for (labels, mut buckets) in series {
                buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                for w in buckets.windows(2) {
                    assert!(
                        w[0].1 <= w[1].1,
                        "{family}{labels}: buckets not cumulative: {buckets:?}"
                    );
                }
                let (last_le, inf) = *buckets.last().expect("a bucket");
                assert_eq!(last_le, f64::INFINITY, "{family}{labels} has no +Inf");
                let count = self
                    .samples
                    .iter()
                    .find(|s| {
                        s.name == format!("{family}_count") && format!("{:?}", s.labels) == labels
                    })
                    .unwrap_or_else(|| panic!("{family}{labels} has no _count"));
                assert_eq!(inf, count.value, "{family}{labels}: +Inf against _count");
                checked += 1;
            }
        }
        assert!(checked >= 3, "only {checked} histogram series");
    }

    /// The value of the one sample named `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
        found[0].value
    }
}

/// `name{k="v",...} value` or `name value`.
fn parse_sample(line: &str) -> Sample {
    let (name, rest) = match line.find('{') {
        Some(i) => (&line[..i], &line[i..]),
        None => line.split_once(' ').expect("sample name value"),
    };
    let mut labels = BTreeMap::new();
    let value = if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut key = String::new();
        let end;
        loop {
            let (i, c) = chars.next().expect("unterminated labels");
            match c {
                '}' => {
                    end = i;
                    break;
                }
                ',' => {}
                '=' => {
                    assert_eq!(chars.next().map(|c| c.1), Some('"'), "{line}");
                    let mut v = String::new();
                    loop {
                        match chars.next().expect("unterminated value").1 {
                            '\\' => v.push(chars.next().expect("escape").1),
                            '"' => break,
                            c => v.push(c),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), v);
                }
                c => key.push(c),
            }
        }
        inner[end + 1..].trim()
    } else {
        rest.trim()
    };
    Sample {
        name: name.to_string(),
        labels,
        value: value.parse().unwrap_or_else(|_| panic!("value in {line}")),
    }
}

/// Runs `promtool check metrics` on `text`: whether it passed, and what it said.
fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool output");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said.trim().to_string())
}

/// A TcpExt counter of /proc/net/netstat now.
fn netstat_tcpext(name: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut rows = text.lines().filter_map(|l| l.strip_prefix("TcpExt:"));
    let (names, values) = (rows.next()?, rows.next()?);
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
}

/// GET /metrics with `accept`; the response head (lowercased) and body.
async fn scrape_raw(admin: SocketAddr, accept: Option<&str>) -> (String, String) {
    let mut s = TcpStream::connect(admin).await.expect("connect admin");
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: test\r\n{accept}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("send");
    let mut all = Vec::new();
    s.read_to_end(&mut all).await.expect("read");
    let text = String::from_utf8(all).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    (head.to_ascii_lowercase(), body.to_string())
}

/// Every `expr` string in a Grafana dashboard.
fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match v {
                    serde_json::Value::String(s) if k == "expr" => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The metric names a PromQL expression mentions: words starting `waitless_` or `process_`.
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("waitless_") || w.starts_with("process_"))
        .map(str::to_string)
        .collect()
}
