//! The `waitless` binary: a thin command line over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use waitless::admin::stats::Snapshot;
use waitless::config::{Address, Config};
use waitless::proxy::{self, Proxy};

/// waitless: a connection-pooling HTTP proxy that decides which side closes first, so
/// short connections stop burying servers in TIME_WAIT.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The configuration file.
    #[arg(long, short, global = true, default_value = "config/waitless.toml")]
    config: PathBuf,
    /// Log level or filter (error, warn, info, debug, trace, or a tracing filter such as
    /// "waitless=debug"); overrides RUST_LOG. Logs go to stderr.
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy in the foreground (the default).
    Run,
    /// Validate the configuration and print the effective configuration, or the error.
    Check,
    /// Print the ledger of closes beside the kernel's socket census, per side, from a
    /// running waitless's admin listener.
    Stats {
        /// The admin listener, `HOST:PORT` or `unix:/path` (default: `[admin] listen` of the
        /// config, else 127.0.0.1:9901).
        #[arg(long, value_parser = admin_address)]
        admin: Option<Address>,
    },
    /// Tell a running waitless to re-read its config file (as SIGHUP does); prints whether
    /// the new config was taken or refused, and why.
    Reload {
        /// The admin listener, `HOST:PORT` or `unix:/path` (default: `[admin] listen` of the
        /// config, else 127.0.0.1:9901).
        #[arg(long, value_parser = admin_address)]
        admin: Option<Address>,
        /// The admin token (default: `[admin] token` or `token_env` of the config, when
        /// `--admin` is not given).
        #[arg(long)]
        token: Option<String>,
    },
    /// Replace a running waitless by the binary it was started from (installed anew, say)
    /// without losing a connection, as SIGUSR2 does: the new process gets the listening
    /// sockets and, once it accepts, the old one drains and exits. Prints the outcome; fails,
    /// and the old process keeps serving, when the new one cannot start (a bad config).
    Upgrade {
        /// The admin listener, `HOST:PORT` or `unix:/path` (default: `[admin] listen` of the
        /// config, else 127.0.0.1:9901).
        #[arg(long, value_parser = admin_address)]
        admin: Option<Address>,
        /// The admin token (default: `[admin] token` or `token_env` of the config, when
        /// `--admin` is not given).
        #[arg(long)]
        token: Option<String>,
    },
    /// Show where TIME_WAIT lands: short connections sent directly to an embedded backend,
    /// then through an embedded waitless under each client-side policy. Needs nothing else.
    Demo {
        /// Short connections per row.
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        /// Connections in flight at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints a table; its embedded proxies' info lines would only clutter it.
    let default_level = match cli.command {
        Some(Command::Demo { .. }) => "warn",
        _ => "info",
    };
    let filter = match &cli.log {
        Some(level) => EnvFilter::new(level),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // Before any file is opened: takes the sockets an upgrade passed, notes this binary.
    waitless::upgrade::init();

    let command = cli.command.unwrap_or(Command::Run);
    match command {
        Command::Demo {
            requests,
            concurrency,
        } => return demo(requests, concurrency.max(1)),
        Command::Stats { admin: Some(addr) } => return stats(addr),
        Command::Reload {
            admin: Some(addr),
            token,
        } => return reload(addr, token.as_deref()),
        Command::Upgrade {
            admin: Some(addr),
            token,
        } => return upgrade(addr, token.as_deref()),
        _ => {}
    }
    // `check` runs as ExecStartPre, which systemd passes no sockets to.
    let loaded = match command {
        Command::Check => Config::load_with(&cli.config, &waitless::config::Checking),
        _ => Config::load(&cli.config),
    };
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("waitless: config error: {e}");
            // Started by an upgrade: the old process reports it and serves on.
            waitless::upgrade::fail(&format!("config error: {e}"));
            return ExitCode::from(2);
        }
    };
    for w in config.warnings() {
        eprintln!("waitless: warning: {w}");
    }
    match command {
        Command::Check => {
            print!("{config}");
            ExitCode::SUCCESS
        }
        Command::Stats { .. } => stats(admin_of(&config)),
        Command::Reload { token, .. } => reload(
            admin_of(&config),
            token.as_deref().or(config.admin.token.as_deref()),
        ),
        Command::Upgrade { token, .. } => upgrade(
            admin_of(&config),
            token.as_deref().or(config.admin.token.as_deref()),
        ),
        Command::Run | Command::Demo { .. } => run(config),
    }
}

fn admin_of(config: &Config) -> Address {
    config
        .admin
        .listen
        .clone()
        .unwrap_or_else(|| Address::Tcp(([127, 0, 0, 1], 9901).into()))
}

/// `--admin`: an IP address and port, or `unix:/path`.
fn admin_address(text: &str) -> Result<Address, String> {
    match text.strip_prefix("unix:") {
        Some(path) => Ok(Address::Unix(path.into())),
        None => text
            .parse()
            .map(Address::Tcp)
            .map_err(|e| format!("`{text}` is neither IP:PORT nor unix:/path: {e}")),
    }
}

fn reload(admin: Address, token: Option<&str>) -> ExitCode {
    post(admin, "/reload", token)
}

fn upgrade(admin: Address, token: Option<&str>) -> ExitCode {
    post(admin, "/upgrade", token)
}

/// POST `path` with the token; the body goes to stdout on 200, else to stderr as a failure.
fn post(admin: Address, path: &str, token: Option<&str>) -> ExitCode {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n"));
    match admin_request(&admin, "POST", path, auth.as_deref().unwrap_or("")) {
        Ok((200, body)) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((_, body)) => {
            eprint!("waitless: {body}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("waitless: cannot reach the admin listener at {admin}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo(requests: usize, concurrency: usize) -> ExitCode {
    let rt = match proxy::runtime(0) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("waitless: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(waitless::demo::run(requests, concurrency)) {
        Ok(rows) => {
            print!("{}", waitless::demo::render(&rows, requests));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("waitless: demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn stats(admin: Address) -> ExitCode {
    match fetch_stats(&admin) {
        Ok(v) => {
            print!("{}", waitless::admin::report::render(&v));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("waitless: cannot read stats from {admin}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// GET /stats from the admin listener.
fn fetch_stats(admin: &Address) -> Result<Snapshot, String> {
    match admin_request(admin, "GET", "/stats", "")? {
        (200, body) => serde_json::from_str(&body).map_err(|e| e.to_string()),
        (status, body) => Err(format!("{status}: {body}")),
    }
}

/// One plain HTTP/1.0 request to the admin listener, which closes after the response.
/// `headers`: extra header lines, each ending in CRLF.
fn admin_request(
    admin: &Address,
    method: &str,
    path: &str,
    headers: &str,
) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    // Past the longest answer: an upgrade waits up to READY_TIMEOUT for the new process.
    let timeout = waitless::upgrade::READY_TIMEOUT + Duration::from_secs(10);
    let request = format!("{method} {path} HTTP/1.0\r\nHost: waitless\r\n{headers}\r\n");
    let mut raw = Vec::new();
    let e = |e: std::io::Error| e.to_string();
    match admin {
        Address::Tcp(at) => {
            let mut s = std::net::TcpStream::connect_timeout(at, timeout).map_err(e)?;
            s.set_read_timeout(Some(timeout)).map_err(e)?;
            s.write_all(request.as_bytes()).map_err(e)?;
            s.read_to_end(&mut raw).map_err(e)?;
        }
        Address::Unix(path) => {
            let mut s = std::os::unix::net::UnixStream::connect(path).map_err(e)?;
            s.set_read_timeout(Some(timeout)).map_err(e)?;
            s.write_all(request.as_bytes()).map_err(e)?;
            s.read_to_end(&mut raw).map_err(e)?;
        }
        Address::Systemd(_) => return Err("the admin listener is never a systemd socket".into()),
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("malformed response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status")?;
    Ok((status, body.to_string()))
}

fn run(config: Config) -> ExitCode {
    let (rt, workers) = match waitless::workers::start(config.workers) {
        Ok(started) => started,
        Err(e) => {
            eprintln!("waitless: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let proxy = match Proxy::start(config, workers).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("waitless: {e}");
                waitless::upgrade::fail(&e.to_string());
                return ExitCode::FAILURE;
            }
        };
        let mut signals = match Signals::new() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("waitless: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        // Every listener is bound and its accept loop started: systemd may send traffic, and
        // the process this one replaces may stop accepting.
        if waitless::upgrade::upgraded() {
            waitless::systemd::ready_as_main("serving; upgraded");
            waitless::upgrade::ready();
            tracing::info!("upgrade: serving; the old process drains");
        } else {
            waitless::systemd::ready("serving");
        }
        loop {
            let signal = tokio::select! {
                s = signals.next() => s,
                // POST /upgrade handed the sockets over.
                _ = proxy.handed_over() => break,
            };
            match signal {
                Signal::Reload => match proxy.reload() {
                    Ok(()) => tracing::info!("configuration reloaded"),
                    Err(e) => {
                        tracing::error!(error = %e, "reload refused; the running configuration stays");
                        // SIGHUP still reopens the access log, as logrotate expects.
                        waitless::access::reopen();
                    }
                },
                Signal::Upgrade => {
                    let p = proxy.clone();
                    match tokio::task::spawn_blocking(move || p.upgrade()).await {
                        Ok(Ok(pid)) => {
                            tracing::info!(pid, "upgrade: the new process serves; draining");
                        }
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "upgrade failed; this process keeps serving");
                        }
                        Err(e) => tracing::error!(error = %e, "upgrade failed"),
                    }
                }
                Signal::Stop => break,
            }
        }
        let handed_over = waitless::upgrade::handed_over();
        let drain_timeout = proxy
            .current()
            .config
            .as_ref()
            .map_or(Duration::from_secs(30), |c| c.drain_timeout);
        tracing::info!(
            ?drain_timeout,
            "draining: no new connections; waiting for those in flight"
        );
        // After an upgrade the service goes on: STOPPING=1 (accepted from any process with
        // NotifyAccess=all) would tell systemd it ends.
        if !handed_over {
            waitless::systemd::stopping();
        }
        tokio::select! {
            _ = async {
                proxy.shutdown(drain_timeout).await;
                if handed_over {
                    proxy.admin_finished(Duration::from_secs(1)).await;
                }
            } => {
                tracing::info!("drained; exiting");
                ExitCode::SUCCESS
            }
            _ = signals.stop() => {
                tracing::warn!("second signal: exiting at once");
                ExitCode::from(1)
            }
        }
    })
}

/// What a signal asks for.
enum Signal {
    /// SIGHUP: re-read the config.
    Reload,
    /// SIGTERM or SIGINT: drain and exit.
    Stop,
    /// SIGUSR2: hand the sockets to a new binary, then drain and exit.
    Upgrade,
}

/// The signals waitless acts on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
            _ = self.usr2.recv() => Signal::Upgrade,
        }
    }

    async fn stop(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

#[global_allocator]
static GLOBAL: waitless::alloc::Mimalloc = waitless::alloc::Mimalloc;
