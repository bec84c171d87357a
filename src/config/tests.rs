//! The config's unit tests: parsing, defaults, errors with file/line/key, printing, and the
//! resolve step.

use super::*;

/// Every key set, each to something other than its default.
const FULL: &str = r#"workers = 4

[admin]
listen = "127.0.0.1:9911"

[[listener]]
name = "web"
listen = "127.0.0.1:8080"
protocol = "http"
upstream = "web"
time_wait = "proxy"
linger = "500ms"
linger_fallback = "reset"
keepalive_timeout = 30

[[listener]]
name = "db"
listen = "unix:/run/waitless/db.sock"
protocol = "mysql"
upstream = "db"
time_wait = "none"
mode = "0660"

[[upstream]]
name = "web"
servers = ["127.0.0.1:8081", "[::1]:8082", "unix:/run/app.sock"]
pool_size = 16
max_connections = 32
idle_timeout = "40s"
connect_timeout = "1.5s"
response_timeout = "2m"
max_lifetime = "1h"
max_requests = 1000
server_keepalive = "75s"
time_wait = "none"

[[upstream]]
name = "db"
servers = ["127.0.0.1:3306"]

[[mysql_user]]
user = "app"
# Any variable set wherever tests run: the printed config names it and parses back.
password_env = "PATH"
"#;

/// The least a config can say.
const MINIMAL: &str = r#"
[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "web"

[[upstream]]
name = "web"
servers = ["127.0.0.1:8081"]
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("test.toml"))
}

/// Parses text that must fail and returns the one-line message the operator sees.
fn error(text: &str) -> String {
    match parse(text) {
        Ok(config) => panic!("expected an error, parsed {config:?}"),
        Err(e) => {
            let shown = e.to_string();
            assert!(!shown.contains('\n'), "message spans lines: {shown}");
            shown
        }
    }
}

/// MINIMAL with one listener key replaced or added (the listener keys start on line 3).
fn with_listener_key(line: &str) -> String {
    MINIMAL.replace(
        "upstream = \"web\"\n",
        &format!("upstream = \"web\"\n{line}\n"),
    )
}

#[test]
fn full_config_sets_every_key() {
    let config = parse(FULL).unwrap();
    assert_eq!(config.source, Path::new("test.toml"));
    assert_eq!(config.workers, 4);
    assert_eq!(
        config.admin.listen,
        Some(Address::Tcp("127.0.0.1:9911".parse().unwrap()))
    );

    let web = &config.listeners[0];
    assert_eq!(web.name, "web");
    assert_eq!(web.listen, Address::Tcp("127.0.0.1:8080".parse().unwrap()));
    assert_eq!(web.protocol, Protocol::Http);
    assert_eq!(web.upstream, "web");
    assert_eq!(web.time_wait, ClientTimeWait::Proxy);
    assert_eq!(web.linger, Duration::from_millis(500));
    assert_eq!(web.linger_fallback, LingerFallback::Reset);
    assert_eq!(web.keepalive_timeout, Duration::from_secs(30));

    let db = &config.listeners[1];
    assert_eq!(
        db.listen,
        Address::Unix(PathBuf::from("/run/waitless/db.sock"))
    );
    assert_eq!(db.protocol, Protocol::Mysql);
    assert_eq!(db.time_wait, ClientTimeWait::None);
    assert_eq!(db.mode, Some(0o660));
    assert!(!db.defer_accept, "mysql on a unix socket does not defer");

    let up = config.upstream("web").unwrap();
    assert_eq!(
        up.servers,
        vec![
            Address::Tcp("127.0.0.1:8081".parse().unwrap()),
            Address::Tcp("[::1]:8082".parse().unwrap()),
            Address::Unix(PathBuf::from("/run/app.sock")),
        ]
    );
    assert_eq!(up.pool_size, 16);
    assert_eq!(up.max_connections, 32);
    assert_eq!(up.idle_timeout, Duration::from_secs(40));
    assert_eq!(up.connect_timeout, Duration::from_millis(1500));
    assert_eq!(up.response_timeout, Duration::from_secs(120));
    assert_eq!(up.max_lifetime, Some(Duration::from_secs(3600)));
    assert_eq!(up.max_requests, 1000);
    assert_eq!(up.server_keepalive, Some(Duration::from_secs(75)));
    assert_eq!(up.time_wait, UpstreamTimeWait::None);
}

#[test]
fn absent_keys_take_their_defaults() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(config.workers, 0);
    assert_eq!(
        config.admin.listen,
        Some(Address::Tcp("127.0.0.1:9901".parse().unwrap()))
    );
    let listener = &config.listeners[0];
    assert_eq!(listener.protocol, Protocol::Http);
    assert_eq!(listener.time_wait, ClientTimeWait::Client);
    assert_eq!(listener.linger, Duration::from_secs(2));
    assert_eq!(listener.linger_fallback, LingerFallback::Fin);
    assert_eq!(listener.keepalive_timeout, Duration::from_secs(60));
    assert_eq!(listener.mode, None);
    assert!(listener.defer_accept, "http over TCP defers accept");
    let upstream = &config.upstreams[0];
    assert_eq!(upstream.pool_size, 64);
    assert_eq!(upstream.max_connections, 0);
    assert_eq!(upstream.idle_timeout, Duration::from_secs(50));
    assert_eq!(upstream.connect_timeout, Duration::from_secs(2));
    assert_eq!(upstream.response_timeout, Duration::from_secs(60));
    assert_eq!(upstream.max_lifetime, None);
    assert_eq!(upstream.max_requests, 0);
    assert_eq!(upstream.server_keepalive, None);
    assert_eq!(upstream.time_wait, UpstreamTimeWait::Proxy);
}

#[test]
fn admin_listen_off_or_empty_disables_admin() {
    for off in ["off", ""] {
        let config = parse(&format!("[admin]\nlisten = \"{off}\"\n{MINIMAL}")).unwrap();
        assert_eq!(config.admin.listen, None, "listen = {off:?}");
    }
}

#[test]
fn hostnames_are_resolved_at_load() {
    let text = MINIMAL.replace("127.0.0.1:8081", "localhost:8081");
    let config = parse(&text).unwrap();
    match &config.upstreams[0].servers[0] {
        Address::Tcp(addr) => {
            assert!(addr.ip().is_loopback());
            assert_eq!(addr.port(), 8081);
        }
        other => panic!("resolved to {other:?}"),
    }
}

#[test]
fn unknown_top_level_key_names_its_line_and_key() {
    let message = error(&format!("workers = 1\nwrokers = 2\n{MINIMAL}"));
    assert!(
        message.starts_with("test.toml:2: key `wrokers`: unknown field `wrokers`"),
        "{message}"
    );
}

#[test]
fn unknown_listener_key_names_its_line_and_key() {
    let message = error(&with_listener_key("time_wiat = \"none\""));
    assert!(
        message.starts_with("test.toml:6: key `listener[0].time_wiat`:"),
        "{message}"
    );
    assert!(message.contains("unknown field `time_wiat`"), "{message}");
}

#[test]
fn missing_required_key_names_the_key() {
    let text = MINIMAL.replace("listen = \"127.0.0.1:8080\"\n", "");
    let message = error(&text);
    assert!(
        message.starts_with("test.toml:2: key `listener[0].listen`:"),
        "{message}"
    );
    assert!(message.contains("missing field `listen`"), "{message}");
}

#[test]
fn listener_naming_a_missing_upstream_is_an_error_at_that_line() {
    let text = MINIMAL.replace("upstream = \"web\"", "upstream = \"api\"");
    let message = error(&text);
    assert!(
        message.starts_with("test.toml:5: key `listener[0].upstream`:"),
        "{message}"
    );
    assert!(
        message.contains("no [[upstream]] is named `api` (defined: `web`)"),
        "{message}"
    );
}

#[test]
fn duplicate_listener_name_is_an_error_at_the_second() {
    let text = format!(
        "{MINIMAL}\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8090\"\nupstream = \"web\"\n"
    );
    let message = error(&text);
    assert!(
        message.starts_with("test.toml:12: key `listener[1].name`:"),
        "{message}"
    );
    assert!(
        message.contains("already used by `listener[0].name` (line 3)"),
        "{message}"
    );
}

#[test]
fn duplicate_upstream_name_is_an_error_at_the_second() {
    let text = format!("{MINIMAL}\n[[upstream]]\nname = \"web\"\nservers = [\"127.0.0.1:9\"]\n");
    let message = error(&text);
    assert!(
        message.starts_with("test.toml:12: key `upstream[1].name`:"),
        "{message}"
    );
    assert!(
        message.contains("already used by `upstream[0].name` (line 8)"),
        "{message}"
    );
}

#[test]
fn duplicate_listen_address_is_an_error() {
    let text = format!(
        "{MINIMAL}\n[[listener]]\nname = \"other\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"web\"\n"
    );
    let message = error(&text);
    assert!(
        message.starts_with("test.toml:13: key `listener[1].listen`:"),
        "{message}"
    );
    assert!(
        message.contains("`listener[0].listen` (line 4)"),
        "{message}"
    );

    let text = MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:9901");
    let message = error(&text);
    assert!(
        message.contains(
            "key `listener[0].listen`: 127.0.0.1:9901 is already the address of `admin.listen`"
        ),
        "{message}"
    );
}

#[test]
fn port_zero_listeners_do_not_clash() {
    let text = format!(
        "{MINIMAL}\n[[listener]]\nname = \"other\"\nlisten = \"127.0.0.1:0\"\nupstream = \"web\"\n"
    )
    .replace("127.0.0.1:8080", "127.0.0.1:0");
    assert_eq!(parse(&text).unwrap().listeners.len(), 2);
}

#[test]
fn bad_listen_address_is_an_error_at_its_line() {
    let message = error(&MINIMAL.replace("127.0.0.1:8080", "127.0.0.1"));
    assert!(
        message.starts_with("test.toml:4: key `listener[0].listen`:"),
        "{message}"
    );
    assert!(message.contains("is not HOST:PORT"), "{message}");

    let message = error(&MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:99999"));
    assert!(message.contains("has no valid port"), "{message}");

    let message = error(&MINIMAL.replace("127.0.0.1:8080", "::1:80"));
    assert!(message.contains("expected [V6]:PORT"), "{message}");
}

#[test]
fn bad_server_address_is_an_error_at_its_own_line() {
    let text = MINIMAL.replace(
        "servers = [\"127.0.0.1:8081\"]",
        "servers = [\n  \"127.0.0.1:8081\",\n  \"127.0.0.1\",\n]",
    );
    let message = error(&text);
    assert!(
        message.starts_with("test.toml:11: key `upstream[0].servers[1]`:"),
        "{message}"
    );
}

#[test]
fn empty_server_list_is_an_error() {
    let message = error(&MINIMAL.replace("[\"127.0.0.1:8081\"]", "[]"));
    assert!(
        message.starts_with("test.toml:9: key `upstream[0].servers`:"),
        "{message}"
    );
}

#[test]
fn zero_pool_size_is_an_error_at_its_line() {
    let message = error(&format!("{MINIMAL}pool_size = 0\n"));
    assert!(
        message.starts_with("test.toml:10: key `upstream[0].pool_size`:"),
        "{message}"
    );
    assert!(message.contains("at least 1"), "{message}");
}

#[test]
fn unparsable_duration_is_an_error_at_its_line() {
    let message = error(&format!("{MINIMAL}idle_timeout = \"50 seconds\"\n"));
    assert!(
        message.starts_with("test.toml:10: key `upstream[0].idle_timeout`:"),
        "{message}"
    );
    assert!(
        message.contains("invalid duration `50 seconds`"),
        "{message}"
    );

    let message = error(&with_listener_key("linger = -1"));
    assert!(
        message.starts_with("test.toml:6: key `listener[0].linger`:"),
        "{message}"
    );
}

#[test]
fn unknown_word_lists_the_accepted_ones() {
    let message = error(&with_listener_key("time_wait = \"server\""));
    assert!(
        message.starts_with("test.toml:6: key `listener[0].time_wait`:"),
        "{message}"
    );
    assert!(
        message.contains("expected one of `client`, `proxy`, `none`"),
        "{message}"
    );
}

#[test]
fn mode_is_only_for_unix_listeners_and_must_be_octal() {
    let message = error(&with_listener_key("mode = \"0660\""));
    assert!(
        message.starts_with("test.toml:6: key `listener[0].mode`:"),
        "{message}"
    );

    let unix = MINIMAL.replace("127.0.0.1:8080", "unix:/tmp/w.sock");
    for bad in ["\"0980\"", "\"17777\"", "\"\"", "660"] {
        let text = unix.replace(
            "upstream = \"web\"\n",
            &format!("upstream = \"web\"\nmode = {bad}\n"),
        );
        let message = error(&text);
        assert!(
            message.starts_with("test.toml:6: key `listener[0].mode`:"),
            "{bad}: {message}"
        );
    }
}

#[test]
fn single_bracket_table_suggests_double_brackets() {
    let text = MINIMAL.replace("[[listener]]", "[listener]");
    let message = error(&text);
    assert!(
        message.starts_with("test.toml:2: key `listener`:"),
        "{message}"
    );
    assert!(message.contains("write [[listener]]"), "{message}");
}

#[test]
fn at_least_one_listener_is_required() {
    let message = error("[[upstream]]\nname = \"web\"\nservers = [\"127.0.0.1:8081\"]\n");
    assert!(
        message.contains("key `listener`: at least one [[listener]] is required"),
        "{message}"
    );
}

#[test]
fn syntax_error_names_its_line() {
    let message = error(&format!("{MINIMAL}pool_size = \n"));
    assert!(message.starts_with("test.toml:10:"), "{message}");
}

#[test]
fn durations_parse_in_every_unit() {
    let cases = [
        ("500ms", Duration::from_millis(500)),
        ("2s", Duration::from_secs(2)),
        ("1.5s", Duration::from_millis(1500)),
        ("1m", Duration::from_secs(60)),
        ("1h", Duration::from_secs(3600)),
        (".5m", Duration::from_secs(30)),
        ("10us", Duration::from_micros(10)),
        ("7ns", Duration::from_nanos(7)),
        ("0s", Duration::ZERO),
    ];
    for (text, expected) in cases {
        assert_eq!(parse_duration(text), Ok(expected), "{text}");
        assert_eq!(
            parse_duration(&format_duration(expected)),
            Ok(expected),
            "{text}"
        );
    }
    for bad in [
        "",
        "2",
        "s",
        "2x",
        "1.2.3s",
        "-1s",
        "99999999999999999999999h",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
    }
}

#[test]
fn durations_print_in_the_largest_exact_unit() {
    assert_eq!(format_duration(Duration::from_secs(600)), "10m");
    assert_eq!(format_duration(Duration::from_secs(90)), "90s");
    assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
}

#[test]
fn idle_timeout_not_below_server_keepalive_warns_of_time_wait_on_the_server() {
    let config = parse(&format!(
        "{MINIMAL}idle_timeout = \"75s\"\nserver_keepalive = \"75s\"\n"
    ))
    .unwrap();
    let warnings = config.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("idle_timeout (75s) is not shorter than server_keepalive (75s)"));
    assert!(warnings[0].contains("TIME_WAIT on itself"));

    let config = parse(&format!(
        "{MINIMAL}idle_timeout = \"4s\"\nserver_keepalive = \"5s\"\n"
    ))
    .unwrap();
    assert!(config.warnings().is_empty());
}

#[test]
fn max_connections_below_pool_size_warns() {
    let config = parse(&format!("{MINIMAL}pool_size = 10\nmax_connections = 4\n")).unwrap();
    let warnings = config.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("max_connections (4) is below pool_size (10)"));
}

#[test]
fn unused_upstream_warns() {
    let text = format!("{MINIMAL}\n[[upstream]]\nname = \"spare\"\nservers = [\"127.0.0.1:9\"]\n");
    let warnings = parse(&text).unwrap().warnings();
    assert_eq!(
        warnings,
        vec!["upstream `spare` is not used by any listener".to_string()]
    );
}

#[test]
fn defaults_give_no_warnings() {
    assert!(parse(MINIMAL).unwrap().warnings().is_empty());
}

#[test]
fn effective_config_prints_every_key_and_parses_back_to_the_same_config() {
    for text in [FULL, MINIMAL] {
        let config = parse(text).unwrap();
        let printed = config.to_string();
        let reparsed = parse(&printed).unwrap_or_else(|e| panic!("{e}\n{printed}"));
        assert_eq!(format!("{config:?}"), format!("{reparsed:?}"), "{printed}");
        assert_eq!(printed, reparsed.to_string());
    }
    let printed = parse(MINIMAL).unwrap().to_string();
    for key in [
        "workers = 0",
        "listen = \"127.0.0.1:9901\"",
        "protocol = \"http\"",
        "time_wait = \"client\"",
        "linger = \"2s\"",
        "linger_fallback = \"fin\"",
        "keepalive_timeout = \"1m\"",
        "pool_size = 64",
        "max_connections = 0",
        "idle_timeout = \"50s\"",
        "connect_timeout = \"2s\"",
        "response_timeout = \"1m\"",
        "# max_lifetime",
        "max_requests = 0",
        "# server_keepalive",
        "time_wait = \"proxy\"",
    ] {
        assert!(printed.contains(key), "missing {key:?} in\n{printed}");
    }
}

#[test]
fn effective_config_quotes_names_and_keeps_admin_off() {
    let text = MINIMAL.replace("\"web\"", "\"we\\\"b\\\\\"");
    let config = parse(&format!("[admin]\nlisten = \"off\"\n{text}")).unwrap();
    assert_eq!(config.listeners[0].name, "we\"b\\");
    let reparsed = parse(&config.to_string()).unwrap();
    assert_eq!(format!("{config:?}"), format!("{reparsed:?}"));
}

#[test]
fn shipped_default_config_parses_to_the_defaults() {
    let text = include_str!("../../config/waitless.toml");
    let config =
        Config::parse(text, Path::new("config/waitless.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.warnings().is_empty(), "{:?}", config.warnings());
    assert_eq!(
        format!("{:?}", config),
        format!(
            "{:?}",
            Config::parse(MINIMAL, Path::new("config/waitless.toml")).unwrap()
        )
    );
}

#[test]
fn defer_accept_is_refused_where_the_client_does_not_speak_first_or_there_is_no_tcp() {
    let tcp = parse(&with_listener_key("protocol = \"tcp\"")).unwrap();
    assert!(
        !tcp.listeners[0].defer_accept,
        "tcp clients may wait for the server"
    );
    let asked = parse(&with_listener_key(
        "protocol = \"tcp\"\ndefer_accept = true",
    ))
    .unwrap();
    assert!(asked.listeners[0].defer_accept);

    let mysql = with_mysql_users("").replace(
        "protocol = \"mysql\"\n",
        "protocol = \"mysql\"\ndefer_accept = true\n",
    );
    let message = error(&mysql);
    assert!(
        message.starts_with("test.toml:7: key `listener[0].defer_accept`:"),
        "{message}"
    );
    assert!(message.contains("greeting"), "{message}");

    let unix = with_listener_key("defer_accept = true")
        .replace("\"127.0.0.1:8080\"", "\"unix:/run/w.sock\"");
    let message = error(&unix);
    assert!(message.contains("listener[0].defer_accept"), "{message}");
    assert!(message.contains("unix socket"), "{message}");
    let unix = MINIMAL.replace("\"127.0.0.1:8080\"", "\"unix:/run/w.sock\"");
    assert!(!parse(&unix).unwrap().listeners[0].defer_accept);
}

/// MINIMAL with a mysql listener and the given `[[mysql_user]]` lines appended.
fn with_mysql_users(users: &str) -> String {
    format!(
        "{}{users}",
        MINIMAL.replace(
            "upstream = \"web\"\n",
            "upstream = \"web\"\nprotocol = \"mysql\"\n"
        )
    )
}

#[test]
fn mysql_users_take_a_password_or_an_environment_variable() {
    std::env::set_var("WAITLESS_TEST_DB_PASSWORD", "from-env");
    let config = parse(&with_mysql_users(
        "\n[[mysql_user]]\nuser = \"app\"\npassword = \"apppw\"\n\n\
         [[mysql_user]]\nuser = \"ro\"\npassword_env = \"WAITLESS_TEST_DB_PASSWORD\"\n",
    ))
    .unwrap();
    assert_eq!(config.mysql_user("app").unwrap().password, "apppw");
    let ro = config.mysql_user("ro").unwrap();
    assert_eq!(ro.password, "from-env");
    assert_eq!(
        ro.password_env.as_deref(),
        Some("WAITLESS_TEST_DB_PASSWORD")
    );
    // Neither the effective config nor the debug form shows a password.
    let shown = format!("{config}\n{config:?}");
    assert!(
        !shown.contains("apppw") && !shown.contains("from-env"),
        "{shown}"
    );
    assert!(
        shown.contains("password_env = \"WAITLESS_TEST_DB_PASSWORD\""),
        "{shown}"
    );
}

#[test]
fn mysql_user_errors_name_their_key_and_line() {
    let users = "\n[[mysql_user]]\nuser = \"app\"\n";
    let message = error(&with_mysql_users(users));
    assert!(
        message.starts_with("test.toml:12: key `mysql_user[0]`:"),
        "{message}"
    );
    assert!(
        message.contains("password or password_env is required"),
        "{message}"
    );

    let both = format!("{users}password = \"a\"\npassword_env = \"B\"\n");
    let message = error(&with_mysql_users(&both));
    assert!(
        message.starts_with("test.toml:15: key `mysql_user[0].password_env`:"),
        "{message}"
    );

    let unset = format!("{users}password_env = \"WAITLESS_TEST_SURELY_UNSET\"\n");
    let message = error(&with_mysql_users(&unset));
    assert!(
        message.starts_with("test.toml:14: key `mysql_user[0].password_env`:"),
        "{message}"
    );
    assert!(
        message.contains("`WAITLESS_TEST_SURELY_UNSET` is not set"),
        "{message}"
    );

    let twice = format!("{users}password = \"a\"\n{users}password = \"b\"\n");
    let message = error(&with_mysql_users(&twice));
    assert!(
        message.starts_with("test.toml:17: key `mysql_user[1].user`:"),
        "{message}"
    );
    assert!(
        message.contains("already defined by `mysql_user[0].user` (line 13)"),
        "{message}"
    );
}

#[test]
fn a_mysql_listener_needs_mysql_users() {
    let message = error(&with_mysql_users(""));
    assert!(
        message.starts_with("test.toml:6: key `listener[0].protocol`:"),
        "{message}"
    );
    assert!(message.contains("at least one [[mysql_user]]"), "{message}");
}

/// Inputs the config fuzz target (fuzz/fuzz_targets/config.rs) crashed on: each must be
/// an error naming the file, not a panic.
#[test]
fn fuzz_crashers_are_errors_not_panics() {
    for text in ["=={\n.", "=={7'\u{6}{\n\t)\t=\u{7f}\0\n.\t"] {
        let e = Config::parse(text, Path::new("fuzz.toml")).unwrap_err();
        assert_eq!(e.file, Path::new("fuzz.toml"), "{text:?}");
    }
}

/// A resolver for tests: names and variables from tables, nothing from the host.
struct Fake {
    /// Host name and the address it resolves to; other names fail to resolve.
    names: &'static [(&'static str, &'static str)],
    /// Environment variables that are set.
    vars: &'static [(&'static str, &'static str)],
}

impl Resolve for Fake {
    fn lookup(&self, host: &str, port: u16) -> std::io::Result<Vec<std::net::SocketAddr>> {
        match self.names.iter().find(|(name, _)| *name == host) {
            Some((_, ip)) => Ok(vec![std::net::SocketAddr::new(ip.parse().unwrap(), port)]),
            None => Err(std::io::Error::other("no such name")),
        }
    }

    fn var(&self, name: &str) -> Option<String> {
        self.vars
            .iter()
            .find(|(var, _)| *var == name)
            .map(|(_, value)| value.to_string())
    }

    fn activated(&self, name: &str) -> bool {
        name == "web"
    }
}

/// MINIMAL with a host name for its server and a mysql listener whose user's password comes
/// from `WAITLESS_TEST_UNSET_ANYWHERE`; parsing must need neither.
fn with_names() -> String {
    format!(
        "{}\n[[listener]]\nname = \"db\"\nlisten = \"127.0.0.1:3307\"\nprotocol = \"mysql\"\n\
         upstream = \"db\"\n\n[[upstream]]\nname = \"db\"\nservers = [\"db.invalid:3306\"]\n\n\
         [[mysql_user]]\nuser = \"app\"\npassword_env = \"WAITLESS_TEST_UNSET_ANYWHERE\"\n",
        MINIMAL.replace("127.0.0.1:8081", "web.invalid:8081")
    )
}

#[test]
fn parsing_looks_no_name_up_and_reads_no_variable() {
    let parsed =
        super::parse(&with_names(), Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"));
    let written = &parsed.config;
    assert_eq!(
        written.upstreams[0].servers,
        vec![Endpoint::Name {
            host: "web.invalid".to_string(),
            port: 8081
        }]
    );
    assert_eq!(written.mysql_users[0].password, None);
    // The config as written prints its names, and parses back to the same text.
    let printed = parsed.to_string();
    assert!(
        printed.contains("servers = [\"db.invalid:3306\"]"),
        "{printed}"
    );
    let again = super::parse(&printed, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.to_string(), printed);
}

#[test]
fn the_resolve_step_looks_names_up_and_reads_variables_with_its_resolver() {
    let parsed = super::parse(&with_names(), Path::new("test.toml")).unwrap();
    let config = parsed
        .resolve(&Fake {
            names: &[("web.invalid", "10.0.0.1"), ("db.invalid", "10.0.0.2")],
            vars: &[("WAITLESS_TEST_UNSET_ANYWHERE", "secret")],
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.upstreams[0].servers,
        vec![Address::Tcp("10.0.0.1:8081".parse().unwrap())]
    );
    assert_eq!(
        config.upstreams[1].servers,
        vec![Address::Tcp("10.0.0.2:3306".parse().unwrap())]
    );
    assert_eq!(config.mysql_user("app").unwrap().password, "secret");
    // The written config is kept, to be resolved again.
    assert!(matches!(
        parsed.config.upstreams[0].servers[0],
        Endpoint::Name { .. }
    ));
}

#[test]
fn a_name_that_does_not_resolve_is_an_error_of_the_resolve_step_at_its_line() {
    let parsed = super::parse(&with_names(), Path::new("test.toml")).unwrap();
    let e = parsed
        .resolve(&Fake {
            names: &[("web.invalid", "10.0.0.1")],
            vars: &[("WAITLESS_TEST_UNSET_ANYWHERE", "secret")],
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("test.toml:19: key `upstream[1].servers[0]`: cannot resolve `db.invalid`"),
        "{e}"
    );

    let e = parsed
        .resolve(&Fake {
            names: &[("web.invalid", "10.0.0.1"), ("db.invalid", "10.0.0.2")],
            vars: &[],
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("test.toml:23: key `mysql_user[0].password_env`:"),
        "{e}"
    );
    assert!(
        e.contains("`WAITLESS_TEST_UNSET_ANYWHERE` is not set"),
        "{e}"
    );
}

#[test]
fn two_names_of_one_address_clash_once_resolved() {
    let text = format!(
        "{}\n[[listener]]\nname = \"b\"\nlisten = \"b.invalid:80\"\nupstream = \"web\"\n",
        MINIMAL.replace("127.0.0.1:8080", "a.invalid:80")
    );
    let parsed = super::parse(&text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"));
    let e = parsed
        .resolve(&Fake {
            names: &[("a.invalid", "127.0.0.1"), ("b.invalid", "127.0.0.1")],
            vars: &[],
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("test.toml:13: key `listener[1].listen`: 127.0.0.1:80 is already the address of `listener[0].listen` (line 4)"),
        "{e}"
    );
}

#[test]
fn an_upstream_serves_listeners_of_one_protocol() {
    let text = format!(
        "{MINIMAL}\n[[listener]]\nname = \"raw\"\nlisten = \"127.0.0.1:8090\"\nprotocol = \"tcp\"\n\
         upstream = \"web\"\n"
    );
    let message = error(&text);
    assert!(
        message.starts_with("test.toml:15: key `listener[1].upstream`: listener `raw` is tcp, and upstream `web` already serves http listener `web` at `listener[0].upstream` (line 5)"),
        "{message}"
    );
    let mysql = with_mysql_users("\n[[mysql_user]]\nuser = \"app\"\npassword = \"pw\"\n");
    let text = format!(
        "{mysql}\n[[listener]]\nname = \"raw\"\nlisten = \"127.0.0.1:8090\"\nprotocol = \"tcp\"\n\
         upstream = \"web\"\n"
    );
    assert!(error(&text).contains("listener `raw` is tcp"), "{text}");
    let text = format!(
        "{MINIMAL}\n[[listener]]\nname = \"more\"\nlisten = \"127.0.0.1:8090\"\nupstream = \"web\"\n"
    );
    assert_eq!(parse(&text).unwrap().listeners.len(), 2);
}

#[test]
fn wildcard_listen_addresses_overlap_the_specific_ones_of_their_family_and_port() {
    let message = error(&MINIMAL.replace("127.0.0.1:8080", "0.0.0.0:9901"));
    assert!(
        message.starts_with(
            "test.toml:4: key `listener[0].listen`: 0.0.0.0:9901 overlaps `admin.listen`"
        ),
        "{message}"
    );
    let second = |listen: &str| {
        format!(
            "{MINIMAL}\n[[listener]]\nname = \"b\"\nlisten = \"{listen}\"\nupstream = \"web\"\n"
        )
    };
    let message = error(&second("0.0.0.0:8080"));
    assert!(
        message.starts_with("test.toml:13: key `listener[1].listen`: 0.0.0.0:8080 overlaps `listener[0].listen` (line 4)"),
        "{message}"
    );
    for apart in ["0.0.0.0:8081", "127.0.0.2:8080", "[::]:8080", "[::1]:8080"] {
        assert_eq!(parse(&second(apart)).unwrap().listeners.len(), 2, "{apart}");
    }
}

#[test]
fn a_unix_listener_path_must_fit_the_kernel_s_socket_address() {
    let fits = format!("unix:/{}", "x".repeat(106));
    assert!(parse(&MINIMAL.replace("127.0.0.1:8080", &fits)).is_ok());
    let message = error(&MINIMAL.replace("127.0.0.1:8080", &format!("{fits}x")));
    assert!(
        message.starts_with("test.toml:4: key `listener[0].listen`: the socket path is 108 bytes"),
        "{message}"
    );
}

#[test]
fn drop_underscore_headers_is_off_by_default_and_only_for_http_listeners() {
    assert!(!parse(MINIMAL).unwrap().listeners[0].drop_underscore_headers);
    let asked = parse(&with_listener_key("drop_underscore_headers = true")).unwrap();
    assert!(asked.listeners[0].drop_underscore_headers);
    let printed = asked.to_string();
    assert!(
        printed.contains("drop_underscore_headers = true"),
        "{printed}"
    );
    let tcp = with_listener_key("protocol = \"tcp\"\ndrop_underscore_headers = true");
    let message = error(&tcp);
    assert!(
        message.contains("listener[0].drop_underscore_headers"),
        "{message}"
    );
    assert!(message.contains("http listeners"), "{message}");
}

#[test]
fn a_systemd_listener_resolves_only_to_a_socket_that_was_passed() {
    let text = MINIMAL.replace("127.0.0.1:8080", "systemd:web");
    let parsed = super::parse(&text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        parsed.config.listeners[0].listen,
        Endpoint::Systemd("web".into())
    );
    let fake = Fake {
        names: &[],
        vars: &[],
    };
    let config = parsed.resolve(&fake).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.listeners[0].listen, Address::Systemd("web".into()));
    // The Fake passes only "web".
    let other = super::parse(
        &MINIMAL.replace("127.0.0.1:8080", "systemd:api"),
        Path::new("test.toml"),
    )
    .unwrap();
    let e = other.resolve(&fake).unwrap_err().to_string();
    assert!(
        e.contains("key `listener[0].listen`: systemd passed no socket named `api`"),
        "{e}"
    );
}

#[test]
fn a_systemd_socket_is_no_server_and_no_admin_address() {
    let e = error(&MINIMAL.replace("127.0.0.1:8081", "systemd:web"));
    assert!(e.contains("upstream[0].servers[0]"), "{e}");
    let e = error(&format!("[admin]\nlisten = \"systemd:admin\"\n{MINIMAL}"));
    assert!(e.contains("not a systemd socket"), "{e}");
    let e = error(&MINIMAL.replace("127.0.0.1:8080", "systemd:"));
    assert!(e.contains("FileDescriptorName="), "{e}");
}

#[test]
fn the_admin_token_comes_from_the_file_or_its_variable_never_both_and_is_not_printed() {
    let with = |admin: &str| format!("[admin]\n{admin}\n{MINIMAL}");
    let e = error(&with("token = \"a\"\ntoken_env = \"B\""));
    assert!(e.contains("admin.token_env"), "{e}");
    let e = error(&with("token = \"\""));
    assert!(e.contains("admin.token"), "{e}");
    let parsed = super::parse(&with("token = \"s3cret\""), Path::new("test.toml")).unwrap();
    assert!(!parsed.to_string().contains("s3cret"), "{parsed}");
    let fake = Fake {
        names: &[],
        vars: &[("WAITLESS_TOKEN", "t0ken")],
    };
    let config = parsed.resolve(&fake).unwrap();
    assert_eq!(config.admin.token.as_deref(), Some("s3cret"));
    let parsed =
        super::parse(&with("token_env = \"WAITLESS_TOKEN\""), Path::new("t.toml")).unwrap();
    assert_eq!(
        parsed.resolve(&fake).unwrap().admin.token.as_deref(),
        Some("t0ken")
    );
    let parsed = super::parse(&with("token_env = \"UNSET_HERE\""), Path::new("t.toml")).unwrap();
    let e = parsed.resolve(&fake).unwrap_err().to_string();
    assert!(e.contains("admin.token_env"), "{e}");
}

#[test]
fn listen_backlog_defaults_to_4096_and_is_printed() {
    let parsed = super::parse(MINIMAL, Path::new("test.toml")).unwrap();
    assert_eq!(parsed.config.listeners[0].listen_backlog, 4096);
    let text = MINIMAL.replace(
        "upstream = \"web\"\n",
        "upstream = \"web\"\nlisten_backlog = 512\n",
    );
    let parsed = super::parse(&text, Path::new("test.toml")).unwrap();
    assert_eq!(parsed.config.listeners[0].listen_backlog, 512);
    assert!(parsed.to_string().contains("listen_backlog = 512"));
}

#[test]
fn upstream_tls_prints_as_written_and_parses_back() {
    let text = format!(
        "{MINIMAL}tls = {{ ca = \"/etc/waitless/ca.pem\", server_name = \"api.internal\", \
         verify = false, cert = \"c.pem\", key = \"c.key\" }}\n"
    );
    let parsed = super::parse(&text, Path::new("/etc/waitless/test.toml")).unwrap();
    let printed = parsed.to_string();
    assert!(
        printed.contains(
            "tls = { ca = \"/etc/waitless/ca.pem\", server_name = \"api.internal\", \
             verify = false, cert = \"/etc/waitless/c.pem\", key = \"/etc/waitless/c.key\" }"
        ),
        "{printed}"
    );
    let again = super::parse(&printed, Path::new("/etc/waitless/test.toml")).unwrap();
    assert_eq!(again.to_string(), printed);
}

#[test]
fn upstream_tls_errors_name_the_key_and_the_file() {
    let half = error(&format!("{MINIMAL}tls = {{ cert = \"c.pem\" }}\n"));
    assert!(
        half.contains("upstream[0].tls") && half.contains("both"),
        "{half}"
    );
    let missing = error(&format!(
        "{MINIMAL}tls = {{ ca = \"/nonexistent/ca.pem\" }}\n"
    ));
    assert!(
        missing.contains("upstream[0].tls") && missing.contains("/nonexistent/ca.pem"),
        "{missing}"
    );
}

#[test]
fn pooling_is_session_by_default_is_printed_and_is_only_for_mysql_listeners() {
    use crate::config::Pooling;
    let mysql = "[[listener]]\nname = \"db\"\nlisten = \"127.0.0.1:3307\"\nprotocol = \"mysql\"\n\
                 upstream = \"db\"\n";
    let rest = "\n[[upstream]]\nname = \"db\"\nservers = [\"127.0.0.1:3306\"]\n\n\
                [[mysql_user]]\nuser = \"app\"\npassword = \"pw\"\n";
    let plain = parse(&format!("{MINIMAL}\n{mysql}{rest}")).unwrap();
    assert_eq!(plain.listeners[1].pooling, Pooling::Session);
    let text = format!("{MINIMAL}\n{mysql}pooling = \"transaction\"\n{rest}");
    let asked = parse(&text).unwrap();
    assert_eq!(asked.listeners[1].pooling, Pooling::Transaction);
    let printed = asked.to_string();
    assert!(printed.contains("pooling = \"transaction\""), "{printed}");
    let message = error(&with_listener_key("pooling = \"transaction\""));
    assert!(message.contains("listener[0].pooling"), "{message}");
    assert!(message.contains("mysql listeners"), "{message}");
    let message = error(&format!(
        "{MINIMAL}\n{mysql}pooling = \"statement\"\n{rest}"
    ));
    assert!(message.contains("pooling"), "{message}");
}

#[test]
fn resolver_and_resolve_interval_have_defaults_print_and_parse_back() {
    let config = parse(MINIMAL).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.resolver.nameservers.is_empty());
    assert_eq!(config.resolver.min_interval, Duration::from_secs(1));
    assert_eq!(
        config.upstreams[0].resolve_interval,
        Some(Duration::from_secs(30))
    );
    let text = format!(
        "[resolver]\nnameservers = [\"127.0.0.1:5353\", \"[::1]:53\"]\nmin_interval = \"250ms\"\n{}",
        MINIMAL.replace(
            "servers = [\"127.0.0.1:8081\"]",
            "servers = [\"127.0.0.1:8081\"]\nresolve_interval = \"off\""
        )
    );
    let config = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let want: Vec<std::net::SocketAddr> = vec![
        "127.0.0.1:5353".parse().unwrap(),
        "[::1]:53".parse().unwrap(),
    ];
    assert_eq!(config.resolver.nameservers, want);
    assert_eq!(config.resolver.min_interval, Duration::from_millis(250));
    // Each upstream carries the [resolver] it follows its names with.
    assert_eq!(config.upstreams[0].resolver, config.resolver);
    assert_eq!(config.upstreams[0].resolve_interval, None);
    let printed = config.to_string();
    assert!(printed.contains("resolve_interval = \"off\""), "{printed}");
    let again = parse(&printed).unwrap_or_else(|e| panic!("{e}\n{printed}"));
    assert_eq!(again.resolver, config.resolver);
    assert_eq!(again.upstreams[0].resolve_interval, None);
}

#[test]
fn a_nameserver_must_be_an_ip_and_intervals_more_than_zero() {
    let e = parse(&format!(
        "[resolver]\nnameservers = [\"dns.invalid:53\"]\n{MINIMAL}"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("test.toml:2:") && e.contains("is not IP:PORT"),
        "{e}"
    );
    let e = parse(&format!("[resolver]\nmin_interval = \"0s\"\n{MINIMAL}"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("resolver.min_interval") && e.contains("more than 0"),
        "{e}"
    );
    let zero = MINIMAL.replace(
        "servers = [\"127.0.0.1:8081\"]",
        "servers = [\"127.0.0.1:8081\"]\nresolve_interval = 0",
    );
    let e = parse(&zero).unwrap_err().to_string();
    assert!(
        e.contains("resolve_interval") && e.contains("more than 0"),
        "{e}"
    );
}

#[test]
fn an_upstream_server_name_keeps_all_its_addresses_ipv4_first() {
    /// A resolver that answers two addresses and an IPv6 one for every name.
    struct Many;
    impl Resolve for Many {
        fn lookup(&self, _: &str, port: u16) -> std::io::Result<Vec<std::net::SocketAddr>> {
            Ok(["[::1]", "10.0.0.9", "10.0.0.3"]
                .iter()
                .map(|ip| format!("{ip}:{port}").parse().unwrap())
                .collect())
        }
        fn var(&self, _: &str) -> Option<String> {
            None
        }
        fn activated(&self, _: &str) -> bool {
            false
        }
    }
    let text = MINIMAL.replace("127.0.0.1:8081", "web.invalid:8081");
    let config = super::parse(&text, Path::new("test.toml"))
        .unwrap()
        .resolve(&Many)
        .unwrap_or_else(|e| panic!("{e}"));
    let up = &config.upstreams[0];
    assert_eq!(
        up.servers,
        vec![Address::Tcp("10.0.0.3:8081".parse().unwrap())]
    );
    let named = up.names[0].as_ref().expect("a name");
    assert_eq!(named.host, "web.invalid");
    let want: Vec<std::net::SocketAddr> = vec![
        "10.0.0.3:8081".parse().unwrap(),
        "10.0.0.9:8081".parse().unwrap(),
    ];
    assert_eq!(named.addrs, want);
    assert!(config
        .to_string()
        .contains("# servers[0] = \"web.invalid:8081\" resolves to 10.0.0.3:8081, 10.0.0.9:8081"));
}

#[test]
fn the_admin_listener_takes_a_unix_socket_with_a_mode_owner_only_by_default() {
    let config = parse(&format!(
        "[admin]\nlisten = \"unix:/run/waitless/admin.sock\"\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(
        config.admin.listen,
        Some(Address::Unix("/run/waitless/admin.sock".into()))
    );
    assert_eq!(config.admin.unix_mode(), 0o600);
    let text = config.to_string();
    assert!(text.contains("mode = \"0600\""), "{text}");
    let config = parse(&format!(
        "[admin]\nlisten = \"unix:/run/w.sock\"\nmode = \"0660\"\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(config.admin.unix_mode(), 0o660);
    let reparsed = parse(&config.to_string()).unwrap();
    assert_eq!(reparsed.admin.unix_mode(), 0o660);

    let e = error(&format!("[admin]\nmode = \"0660\"\n{MINIMAL}"));
    assert!(e.contains("admin.mode") && e.contains("unix:/path"), "{e}");
    let long = "x".repeat(120);
    let e = error(&format!("[admin]\nlisten = \"unix:/{long}\"\n{MINIMAL}"));
    assert!(
        e.contains("admin.listen") && e.contains("shorter path"),
        "{e}"
    );
}
