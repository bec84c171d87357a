//! `waitless stats`: the /stats JSON as a terminal table, ledger beside census, so an
//! operator sees at a glance where TIME_WAIT is.

use serde_json::Value;

/// Renders a /stats document.
pub fn render(stats: &Value) -> String {
    let mut out = String::new();
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let s = |v: &Value| v.as_str().unwrap_or("?").to_string();

    out.push_str("CLIENT SIDE (listeners)\n");
    for l in stats["listeners"].as_array().into_iter().flatten() {
        let e = &l["errors"];
        out.push_str(&format!(
            "  {} on {}  time_wait={}  connections {}  requests {}  errors {}\n",
            s(&l["name"]),
            s(&l["listen"]),
            s(&l["time_wait"]),
            n(&l["connections"]),
            n(&l["requests"]),
            n(&e["connect"]) + n(&e["timeout"]) + n(&e["busy"]) + n(&e["upstream"]),
        ));
        ledger(&mut out, &l["ledger"], "client");
        census(&mut out, &l["census"], "listener port");
    }
    out.push_str("\nUPSTREAM SIDE (pooled connections)\n");
    for u in stats["upstreams"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {}  time_wait={}\n",
            s(&u["name"]),
            s(&u["time_wait"])
        ));
        for srv in u["servers"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "    server {}  {}  weight {}  idle {}  opened {}  reused {}  retries {}  connect errors {}\n",
                s(&srv["server"]),
                s(&srv["state"]),
                n(&srv["weight"]),
                n(&srv["idle"]),
                n(&srv["opened"]),
                n(&srv["reused"]),
                n(&srv["retries"]),
                n(&srv["connect_errors"]),
            ));
            ledger(&mut out, &srv["ledger"], "server");
            census(&mut out, &srv["census_proxy"], "waitless side");
            census(&mut out, &srv["census_server"], "server side");
        }
    }
    if let Some(err) = stats["census_error"].as_str() {
        out.push_str(&format!("\ncensus unavailable: {err}\n"));
    }
    out
}

fn ledger(out: &mut String, l: &Value, peer: &str) {
    let n = |k: &str| l[k].as_u64().unwrap_or(0);
    out.push_str(&format!(
        "      ledger  closed {:>8}   TIME_WAIT landed on {peer} {:>8}, on waitless {:>8}, nowhere {:>8}\n",
        n("closed"),
        n("time_wait_peer"),
        n("time_wait_proxy"),
        n("time_wait_nobody"),
    ));
    for e in l["entries"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "              {:>8}  first close by {:<5} with {:<3}  reason {:<14} TIME_WAIT: {}\n",
            e["count"].as_u64().unwrap_or(0),
            e["closer"].as_str().unwrap_or("?"),
            e["how"].as_str().unwrap_or("?"),
            e["reason"].as_str().unwrap_or("?"),
            e["time_wait"].as_str().unwrap_or("?"),
        ));
    }
}

fn census(out: &mut String, c: &Value, what: &str) {
    if c.is_null() {
        return;
    }
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    out.push_str(&format!(
        "      census  {what:<14} TIME_WAIT {:>6}  ESTABLISHED {:>6}  CLOSE_WAIT {:>4}  FIN_WAIT1/2 {}/{}  LAST_ACK {}\n",
        n("time_wait"),
        n("established"),
        n("close_wait"),
        n("fin_wait1"),
        n("fin_wait2"),
        n("last_ack"),
    ));
}
