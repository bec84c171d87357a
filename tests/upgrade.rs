//! Binary upgrade without loss: `waitless upgrade` starts the binary again with the
//! listening sockets handed over, under load from short and keep-alive clients; a bad
//! config at upgrade leaves the old process serving.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http1::{read_response, ResponseHead};
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The size of each response body, checked byte for byte.
const BODY: usize = 4000;

/// What the clients saw.
#[derive(Default)]
struct Tally {
    /// Whole 200 responses with the right body.
    ok: AtomicUsize,
    /// Connects refused or reset, reads and writes that failed, on a fresh connection.
    errors: AtomicUsize,
    /// Responses that were not 200, or whose body was short or wrong.
    bad: AtomicUsize,
    /// Idle keep-alive connections the draining process closed before a request was read
    /// (the request is then sent again on a new connection, as HTTP clients do).
    retried: AtomicUsize,
}

fn config(port: u16, admin: u16, backend: SocketAddr) -> String {
    format!(
        "workers = 2\ndrain_timeout = \"5s\"\n\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:{port}\"\nupstream = \"web\"\n\n\
         [[upstream]]\nname = \"web\"\nservers = [\"{backend}\"]\n"
    )
}

/// Runs `waitless upgrade` (or another admin command) against the admin port.
fn admin_command(command: &str, admin: u16) -> Output {
    admin_command_with(command, admin, &[])
}

/// As `admin_command`, with more arguments.
fn admin_command_with(command: &str, admin: u16, more: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_waitless"))
        .args([command, "--admin", &format!("127.0.0.1:{admin}")])
        .args(more)
        .stdin(Stdio::null())
        .output()
        .expect("run waitless")
}

/// One request on `s`; Ok(true) when the response was whole and right.
async fn exchange(s: &mut TcpStream, close: bool, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let conn = if close { "close" } else { "keep-alive" };
    s.write_all(
        format!("GET /bytes/{BODY} HTTP/1.1\r\nHost: t\r\nConnection: {conn}\r\n\r\n").as_bytes(),
    )
    .await?;
    let (status, _) = read_response(s, buf).await?;
    let whole = ResponseHead::parse(buf)
        .and_then(Result::ok)
        .is_some_and(|h| buf.get(h.len..) == Some(&pattern(BODY)[..]));
    Ok(status == 200 && whole)
}

/// New connection per request until `stop`.
async fn short_client(addr: SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut buf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let result = match TcpStream::connect(addr).await {
            Ok(mut s) => exchange(&mut s, true, &mut buf).await,
            Err(e) => Err(e),
        };
        count(result, &tally);
    }
}

/// One connection reused for request after request until `stop`; a reused connection the
/// server closed while idle is replaced, and its request sent again.
async fn keepalive_client(addr: SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut buf = Vec::new();
    let mut conn: Option<TcpStream> = None;
    while !stop.load(Ordering::Relaxed) {
        let reused = conn.is_some();
        let mut s = match conn.take() {
            Some(s) => s,
            None => match TcpStream::connect(addr).await {
                Ok(s) => s,
                Err(e) => {
                    count(Err(e), &tally);
                    continue;
                }
            },
        };
        match exchange(&mut s, false, &mut buf).await {
            // Closed before any byte of the answer: the server ended the idle connection.
            Err(_) if reused && buf.is_empty() => {
                tally.retried.fetch_add(1, Ordering::Relaxed);
            }
            result => {
                let ok = matches!(result, Ok(true));
                count(result, &tally);
                let closing = ResponseHead::parse(&buf)
                    .and_then(Result::ok)
                    .is_some_and(|h| h.close);
                if ok && !closing {
                    conn = Some(s);
                }
            }
        }
    }
}

fn count(result: std::io::Result<bool>, tally: &Tally) {
    let counter = match result {
        Ok(true) => &tally.ok,
        Ok(false) => &tally.bad,
        Err(_) => &tally.errors,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Waits up to `within` for `child` to exit; its status.
fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "the old process did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends SIGTERM to `pid` (a process our child started, so not ours to wait for).
fn terminate(pid: u32) {
    // SAFETY: kill(2) on a pid we were told of.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_under_load_loses_no_connection_and_no_response_and_the_old_process_exits_0() {
    let backend = Backend::start(BackendMode::Echo).await;
    let (port, admin) = (free_port(), free_port());
    let (mut old, log) =
        Waitless::launch_logged(&config(port, admin, backend.addr), port, admin, "info").await;
    let old_pid = old.child.id();
    let addr = old.addr();

    let (stop, tally) = (Arc::new(AtomicBool::new(false)), Arc::new(Tally::default()));
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(tokio::spawn(short_client(
            addr,
            stop.clone(),
            tally.clone(),
        )));
    }
    for _ in 0..3 {
        clients.push(tokio::spawn(keepalive_client(
            addr,
            stop.clone(),
            tally.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let before = tally.ok.load(Ordering::Relaxed);
    let out = tokio::task::spawn_blocking(move || admin_command("upgrade", admin))
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "upgrade failed: {said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_pid: u32 = said
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {said:?}"));
    assert_ne!(new_pid, old_pid, "the new process is another process");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    let status = tokio::task::spawn_blocking(move || {
        let status = wait_exit(&mut old.child, Duration::from_secs(10));
        (status, old)
    })
    .await
    .unwrap();
    let (status, old) = status;
    let (ok, errors, bad, retried) = (
        tally.ok.load(Ordering::Relaxed),
        tally.errors.load(Ordering::Relaxed),
        tally.bad.load(Ordering::Relaxed),
        tally.retried.load(Ordering::Relaxed),
    );
    println!(
        "upgrade under load: {ok} whole responses ({before} before the upgrade), {errors} \
         connection errors, {bad} bad responses, {retried} idle keep-alive connections \
         closed by the old process and replaced"
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(errors, 0, "connection errors; log:\n{text}");
    assert_eq!(bad, 0, "responses not 200 or not whole");
    assert!(ok > before && before > 0, "served before and after");
    assert!(status.success(), "the old process exits 0: {status}");

    // The new process serves on its own, on the same port and admin port.
    let (code, body) = get(addr, &format!("/bytes/{BODY}"), false).await.unwrap();
    assert_eq!((code, body.len()), (200, BODY));
    let stats = old.stats().await;
    assert!(
        stats.is_object(),
        "the admin listener answers from the new process"
    );
    assert!(
        std::path::Path::new(&format!("/proc/{new_pid}")).exists(),
        "the new process runs"
    );
    terminate(new_pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_at_upgrade_fails_the_command_with_its_message_and_the_old_process_serves_on()
{
    let backend = Backend::start(BackendMode::Echo).await;
    let (port, admin) = (free_port(), free_port());
    let text =
        config(port, admin, backend.addr).replace("[admin]\n", "[admin]\ntoken = \"t0ken\"\n");
    let (mut proxy, log) = Waitless::launch_logged(&text, port, admin, "info").await;
    std::fs::write(
        proxy.dir.0.join("waitless.toml"),
        format!("{text}bogus = 1\n"),
    )
    .unwrap();

    // POST /upgrade takes the admin token, as POST /reload does.
    let out = admin_command("upgrade", admin);
    assert!(!out.status.success(), "no token, no upgrade");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Bearer"));
    let out = tokio::task::spawn_blocking(move || {
        admin_command_with("upgrade", admin, &["--token", "t0ken"])
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the upgrade command fails");
    assert!(
        said.contains("keeps serving") && said.contains("config error") && said.contains("bogus"),
        "it says why: {said}"
    );
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "the old process runs"
    );
    let (code, body) = get(proxy.addr(), &format!("/bytes/{BODY}"), false)
        .await
        .unwrap();
    assert_eq!((code, body.len()), (200, BODY), "and serves");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("upgrade failed") && logged.contains("bogus"),
        "the old process logs the failure: {logged}"
    );

    // SIGUSR2 with the same bad config: the same outcome, logged.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(proxy.child.id() as libc::pid_t, libc::SIGUSR2) };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(proxy.child.try_wait().unwrap().is_none());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(logged.matches("upgrade failed").count(), 2, "{logged}");
    let (code, _) = get(proxy.addr(), "/bytes/10", false).await.unwrap();
    assert_eq!(code, 200);
}

/// Runs `waitless COMMAND -c CONFIG` (the admin address comes from the config).
fn config_command(command: &str, config: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_waitless"))
        .args([command, "-c"])
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .expect("run waitless")
}

/// Waits until something accepts on the unix socket at `path`.
async fn wait_unix(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::UnixStream::connect(path).await.is_err() {
        assert!(Instant::now() < deadline, "nothing accepts on {path:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_listener_on_a_unix_socket_has_its_mode_and_serves_stats_reload_and_upgrade() {
    use std::os::unix::fs::PermissionsExt;
    let backend = Backend::start(BackendMode::Echo).await;
    let port = free_port();
    let dir = TempDir::new("upgrade-unix-admin");
    let sock = dir.0.join("admin.sock");
    let text = format!(
        "[admin]\nlisten = \"unix:{}\"\nmode = \"0640\"\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:{port}\"\nupstream = \"web\"\n\n\
         [[upstream]]\nname = \"web\"\nservers = [\"{}\"]\n",
        sock.display(),
        backend.addr
    );
    let mut cmd = binary::command(&dir.0, &text, "error").unwrap();
    let mut old = cmd.stdout(Stdio::null()).spawn().unwrap();
    wait_unix(&sock).await;
    let config = dir.0.join("waitless.toml");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640, "the socket file has the configured mode");

    let out = config_command("stats", &config);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains("web"),
        "stats: {table}"
    );
    let out = config_command("reload", &config);
    assert!(
        out.status.success(),
        "reload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_waitless"))
        .args(["stats", "--admin", &format!("unix:{}", sock.display())])
        .output()
        .unwrap();
    assert!(out.status.success(), "stats --admin unix:");

    // Upgraded over it: the file stays (the old process does not remove the socket it
    // handed over) and the new process answers on it.
    let out = tokio::task::spawn_blocking({
        let config = config.clone();
        move || config_command("upgrade", &config)
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "upgrade: {said}");
    let new_pid: u32 = said
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .unwrap();
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut old, Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(status.success());
    assert!(sock.exists(), "the socket file outlives the old process");
    let out = config_command("stats", &config);
    assert!(out.status.success(), "stats from the new process");
    let (code, _) = get(SocketAddr::from(([127, 0, 0, 1], port)), "/bytes/10", false)
        .await
        .unwrap();
    assert_eq!(code, 200);
    terminate(new_pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sock.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !sock.exists(),
        "the new process removes the file when it exits"
    );
}

/// The next notification on `sock`, as text.
async fn next(sock: &tokio::net::UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf))
        .await
        .expect("a notification within 10 s")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_new_process_takes_the_passed_socket_and_says_it_is_the_main_pid() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let backend = Backend::start(BackendMode::Echo).await;
    let admin = free_port();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap();
    let dir = TempDir::new("upgrade-systemd");
    let notify_path = dir.0.join("notify.sock");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"systemd:web\"\nupstream = \"web\"\n\n\
         [[upstream]]\nname = \"web\"\nservers = [\"{}\"]\n",
        backend.addr
    );
    let inner = binary::command(&dir.0, &text, "error").unwrap();
    // LISTEN_PID must be waitless's pid: the shell sets it to its own, then becomes waitless.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(inner.get_program())
        .args(inner.get_args())
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "web")
        .env("NOTIFY_SOCKET", &notify_path)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null());
    let fd = tcp.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2).
    unsafe {
        cmd.pre_exec(move || {
            let a = libc::fcntl(fd, libc::F_DUPFD, 10);
            if a < 0 || libc::dup2(a, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut old = cmd.spawn().unwrap();
    drop(tcp);
    let first = next(&notify).await;
    assert!(
        first.contains("READY=1") && !first.contains("MAINPID"),
        "{first}"
    );

    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(old.id() as libc::pid_t, libc::SIGUSR2) };
    let second = next(&notify).await;
    let new_pid: u32 = second
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("MAINPID in {second:?}"));
    assert!(second.contains("READY=1"), "{second}");
    assert_ne!(new_pid, old.id());
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut old, Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(status.success(), "the old process exits 0");
    // The old process drained without STOPPING=1: the service goes on.
    let mut buf = [0u8; 4096];
    let after = tokio::time::timeout(Duration::from_millis(300), notify.recv(&mut buf)).await;
    assert!(after.is_err(), "nothing more was sent: {after:?}");

    let (code, body) = get(addr, "/bytes/100", false).await.unwrap();
    assert_eq!(
        (code, body.len()),
        (200, 100),
        "the new process serves the passed socket"
    );
    terminate(new_pid);
}
