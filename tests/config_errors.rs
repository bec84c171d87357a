//! `waitless check` from the outside: a bad config stops with one message naming the file,
//! the line and the key; a good one prints the effective configuration.

mod common;

use std::process::Command;

use common::TempDir;

fn check(config: &str) -> (bool, String, String) {
    let dir = TempDir::new("check");
    let path = dir.0.join("bad.toml");
    std::fs::write(&path, config).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_waitless"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run waitless check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GOOD: &str = r#"[admin]
listen = "127.0.0.1:9901"

[[listener]]
name = "web"
listen = "127.0.0.1:8080"
protocol = "http"
upstream = "web"

[[upstream]]
name = "web"
servers = ["127.0.0.1:8081"]
pool_size = 64
max_connections = 0
idle_timeout = "50s"
connect_timeout = "2s"
"#;

/// Applies `edit` to the good config and expects `waitless check` to fail naming
/// `bad.toml:LINE` and `key`.
fn expect_error(edit: impl Fn(&str) -> String, line: usize, key: &str) {
    let text = edit(GOOD);
    let (ok, _, err) = check(&text);
    assert!(!ok, "accepted a bad config:\n{text}");
    assert!(
        err.contains(&format!("bad.toml:{line}")),
        "no file:line {line} in: {err}"
    );
    assert!(err.contains(key), "no key {key} in: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one message: {err}");
}

#[test]
fn good_config_prints_the_effective_configuration() {
    let (ok, out, err) = check(GOOD);
    assert!(ok, "{err}");
    assert!(
        out.contains("time_wait = \"client\""),
        "defaults shown: {out}"
    );
    assert!(out.contains("pool_size = 64"), "{out}");
}

#[test]
fn unknown_key_names_file_line_and_key() {
    expect_error(
        |g| {
            g.replace(
                "upstream = \"web\"\n",
                "upstream = \"web\"\ntime_wiat = \"none\"\n",
            )
        },
        9,
        "time_wiat",
    );
}

#[test]
fn listener_naming_a_missing_upstream_is_refused() {
    expect_error(
        |g| g.replace("upstream = \"web\"", "upstream = \"nope\""),
        8,
        "upstream",
    );
}

#[test]
fn duplicate_upstream_names_are_refused() {
    expect_error(
        |g| format!("{g}\n[[upstream]]\nname = \"web\"\nservers = [\"127.0.0.1:1\"]\n"),
        19,
        "name",
    );
}

#[test]
fn bad_address_is_refused() {
    expect_error(
        |g| g.replace("127.0.0.1:8081", "127.0.0.1:notaport"),
        12,
        "servers",
    );
}

#[test]
fn zero_pool_size_is_refused() {
    expect_error(
        |g| g.replace("pool_size = 64", "pool_size = 0"),
        13,
        "pool_size",
    );
}

#[test]
fn unparsable_duration_is_refused() {
    expect_error(
        |g| g.replace("\"50s\"", "\"fifty seconds\""),
        15,
        "idle_timeout",
    );
}

/// GOOD with a second listener of `protocol` on `listen`, forwarding to upstream `web`.
fn with_second_listener(protocol: &str, listen: &str) -> String {
    GOOD.replace(
        "\n[[upstream]]",
        &format!(
            "\n[[listener]]\nname = \"raw\"\nlisten = \"{listen}\"\nprotocol = \"{protocol}\"\n\
             upstream = \"web\"\n\n[[upstream]]"
        ),
    )
}

#[test]
fn an_upstream_shared_by_an_http_and_a_tcp_listener_is_refused_naming_both() {
    // `waitless run` would bind both and then refuse: one pool speaks one protocol.
    let text = with_second_listener("tcp", "127.0.0.1:8090");
    let (ok, _, err) = check(&text);
    assert!(!ok, "accepted two protocols on one upstream:\n{text}");
    assert!(err.contains("bad.toml:14"), "no file:line in: {err}");
    assert!(err.contains("listener[1].upstream"), "no key in: {err}");
    for named in ["listener `web`", "listener `raw`", "upstream `web`"] {
        assert!(err.contains(named), "{named} not named in: {err}");
    }
    assert!(
        err.contains("line 8"),
        "the first listener's line not named: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one message: {err}");

    let (ok, _, err) = check(&with_second_listener("http", "127.0.0.1:8090"));
    assert!(ok, "two http listeners may share an upstream: {err}");
}

#[test]
fn a_wildcard_listener_and_a_specific_one_on_the_same_port_are_refused() {
    // The second could not bind: 0.0.0.0:8080 holds the port on 127.0.0.1 too.
    let text = with_second_listener("http", "0.0.0.0:8080");
    let (ok, _, err) = check(&text);
    assert!(!ok, "accepted overlapping listen addresses:\n{text}");
    assert!(err.contains("bad.toml:12"), "no file:line in: {err}");
    assert!(err.contains("listener[1].listen"), "no key in: {err}");
    assert!(err.contains("listener[0].listen` (line 6)"), "{err}");

    let (ok, _, err) = check(&with_second_listener("http", "[::]:8080"));
    assert!(
        ok,
        "IPv6 listeners are v6-only and do not overlap IPv4 ones: {err}"
    );
}

#[test]
fn a_unix_socket_path_too_long_to_bind_is_refused() {
    let long = format!("unix:/tmp/{}.sock", "x".repeat(100));
    let (ok, _, err) = check(&GOOD.replace("127.0.0.1:8080", &long));
    assert!(!ok, "accepted a {}-byte socket path", long.len() - 5);
    assert!(err.contains("bad.toml:6"), "no file:line in: {err}");
    assert!(err.contains("listener[0].listen"), "no key in: {err}");
    assert!(err.contains("at most 107"), "{err}");
}

#[test]
fn a_server_name_that_does_not_resolve_is_refused_at_its_line() {
    // `.invalid` never resolves (RFC 6761), so this needs no network to fail.
    let (ok, _, err) = check(&GOOD.replace("127.0.0.1:8081", "nowhere.invalid:8081"));
    assert!(!ok, "accepted an unresolvable server");
    assert!(err.contains("bad.toml:12"), "no file:line in: {err}");
    assert!(err.contains("upstream[0].servers[0]"), "no key in: {err}");
    assert!(err.contains("cannot resolve `nowhere.invalid`"), "{err}");
}
