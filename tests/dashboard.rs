//! The dashboard on the admin listener's `/`, in a real browser: headless Chromium loads it
//! after short clients ran through two listeners with different `time_wait` policies, and
//! the page its scripts rendered must name both listeners and show the TIME_WAIT counts
//! /stats has. A screenshot is left under target/tmp/ (out of git) for a look.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const CHROMIUM: &str = "/usr/bin/chromium";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_chromium_shows_both_listeners_and_the_time_wait_of_stats() {
    if !Path::new(CHROMIUM).exists() {
        println!("{CHROMIUM} not found: dashboard test skipped (.ci/run installs chromium)");
        return;
    }
    let Some(nginx) = Nginx::start().await else {
        panic!("nginx is not installed: .ci/run installs it (apt-get install nginx)");
    };
    let (client_port, proxy_port, admin) = (free_port(), free_port(), free_port());
    let server = nginx.addr();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[listener]]\nname = \"edge-client\"\nlisten = \"127.0.0.1:{client_port}\"\n\
         protocol = \"http\"\nupstream = \"web\"\ntime_wait = \"client\"\n\n\
         [[listener]]\nname = \"edge-proxy\"\nlisten = \"127.0.0.1:{proxy_port}\"\n\
         protocol = \"http\"\nupstream = \"web\"\ntime_wait = \"proxy\"\n\n\
         [[upstream]]\nname = \"web\"\nservers = [\"{server}\"]\npool_size = 2\n"
    );
    let proxy = Waitless::launch(&config, client_port, admin).await;
    let at = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(short_load(at(client_port), 40, 4).await, 0);
    assert_eq!(short_load(at(proxy_port), 30, 4).await, 0);
    // The clients have stopped; wait until every client connection is in the ledger.
    let mut waited = 0;
    loop {
        let stats = proxy.stats().await;
        let closed: u64 = listeners(&stats)
            .iter()
            .map(|l| l["ledger"]["closed"].as_u64().unwrap_or(0))
            .sum();
        if closed >= 70 || waited >= 50 {
            break;
        }
        waited += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    settle().await;

    let url = format!("http://127.0.0.1:{admin}/");
    let dom = chromium(&["--dump-dom".into()], &url).await;
    let stats = proxy.stats().await;

    let polls = attr(&dom, "id=\"dash\"", "data-polls").and_then(|p| p.parse::<u64>().ok());
    assert!(
        polls.is_some_and(|p| p >= 1),
        "the page's script did not render /stats (data-polls {polls:?}):\n{dom}"
    );
    for l in listeners(&stats) {
        let name = l["name"].as_str().expect("listener name");
        let card = format!("id=\"listener-{name}\"");
        assert!(dom.contains(&card), "no card for listener {name}:\n{dom}");
        assert!(
            dom.contains(&format!(">{name}<")),
            "listener {name} not named"
        );
        for (a, want) in [
            ("data-tw-peer", l["ledger"]["time_wait_peer"].as_u64()),
            ("data-tw-proxy", l["ledger"]["time_wait_proxy"].as_u64()),
            ("data-tw-nobody", l["ledger"]["time_wait_nobody"].as_u64()),
            ("data-census-tw", l["census"]["time_wait"].as_u64()),
        ] {
            let shown = attr(&dom, &card, a).and_then(|v| v.parse::<u64>().ok());
            assert_eq!(shown, want, "{name} {a}: page against /stats");
        }
        println!(
            "{name} ({}): TIME_WAIT on clients {}, on waitless {}, nowhere {}; census {}",
            l["time_wait"],
            l["ledger"]["time_wait_peer"],
            l["ledger"]["time_wait_proxy"],
            l["ledger"]["time_wait_nobody"],
            l["census"]["time_wait"]
        );
    }
    // The policies did what they say, so the page had different figures to show.
    let by = |name: &str, f: &str| {
        listeners(&stats)
            .iter()
            .find(|l| l["name"] == name)
            .and_then(|l| l["ledger"][f].as_u64())
    };
    assert_eq!(by("edge-client", "time_wait_peer"), Some(40));
    assert_eq!(by("edge-proxy", "time_wait_proxy"), Some(30));
    // ... and the census compared above was not just zeros: waitless holds edge-proxy's.
    let census = listeners(&stats)
        .iter()
        .find(|l| l["name"] == "edge-proxy")
        .and_then(|l| l["census"]["time_wait"].as_u64());
    assert!(
        census.is_some_and(|n| n > 0),
        "edge-proxy census {census:?}"
    );
    // What /stats gained for the page: connections open now. The clients are gone; the
    // pool keeps at most pool_size, idle ones among them.
    for l in listeners(&stats) {
        assert_eq!(l["active"].as_u64(), Some(0), "active of {}", l["name"]);
    }
    for s in stats["upstreams"][0]["servers"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let (idle, open) = (s["idle"].as_u64(), s["open"].as_u64());
        assert!(
            matches!((idle, open), (Some(i), Some(o)) if i <= o && o <= 2),
            "idle {idle:?}, open {open:?}"
        );
    }
    // The headline: nginx runs here, so its census is read and the page says what it holds.
    let backend_tw: u64 = stats["upstreams"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|u| u["servers"].as_array().into_iter().flatten())
        .filter_map(|s| s["census_server"]["time_wait"].as_u64())
        .sum();
    let headline = attr(&dom, "id=\"headline\"", "data-backend-tw");
    assert_eq!(headline, Some(backend_tw.to_string()), "headline");
    assert!(dom.contains(&format!("The backends hold {backend_tw} TIME_WAIT.")));

    // The artifact: a narrow-screen and a wide screenshot, out of git (target/tmp).
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&out).expect("create the screenshot directory");
    for (file, size) in [
        ("dashboard.png", "1100,1400"),
        ("dashboard-narrow.png", "400,1800"),
    ] {
        let path = out.join(file);
        let _ = std::fs::remove_file(&path);
        chromium(
            &[
                format!("--screenshot={}", path.display()),
                format!("--window-size={size}"),
                "--hide-scrollbars".into(),
            ],
            &url,
        )
        .await;
        assert!(path.exists(), "no screenshot at {}", path.display());
        println!("screenshot: {}", path.display());
    }
}

fn listeners(stats: &serde_json::Value) -> Vec<serde_json::Value> {
    stats["listeners"].as_array().cloned().unwrap_or_default()
}

/// Headless Chromium on `url` with `args`, its own fresh profile and no network of its own
/// (no updates, sync or QUIC); 5 s of virtual time let the page's fetches and timers run.
/// Returns what it printed (the DOM, with `--dump-dom`).
async fn chromium(args: &[String], url: &str) -> String {
    let profile = TempDir::new("chromium");
    let mut cmd = tokio::process::Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=5000",
    ])
    .arg(format!("--user-data-dir={}", profile.0.display()))
    .args(args)
    .arg(url)
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("chromium did not finish in 90 s")
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of attribute `name` in the first tag of `dom` that contains `marker`.
fn attr(dom: &str, marker: &str, name: &str) -> Option<String> {
    let at = dom.find(marker)?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    let tag = &dom[start..end];
    let key = format!(" {name}=\"");
    let v = tag.find(&key)? + key.len();
    let len = tag[v..].find('"')?;
    Some(tag[v..v + len].to_string())
}
