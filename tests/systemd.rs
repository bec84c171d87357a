//! Running under systemd, without systemd: the notifications a `Type=notify` unit waits for,
//! read from the datagram socket NOTIFY_SOCKET names, and listening sockets passed the way
//! a `.socket` unit passes them (fds from 3, LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID).
//! Also the admin token that guards POST /reload.

mod common;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixDatagram, UnixStream};

fn signal(proxy: &Waitless, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(proxy.child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill failed");
}

/// The next notification waitless sent, as its `KEY=value` lines.
async fn next_state(sock: &UnixDatagram) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf))
        .await
        .expect("no notification within 10 s")
        .expect("recv");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .map(str::to_string)
        .collect()
}

fn config(listen_web: &str, admin: u16, backend: SocketAddr, admin_extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n{admin_extra}\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"{listen_web}\"\nupstream = \"web\"\n\n\
         [[upstream]]\nname = \"web\"\nservers = [\"{backend}\"]\n"
    )
}

/// A raw POST on the admin listener with an optional Authorization value; the status.
async fn admin_post(admin: u16, path: &str, auth: Option<&str>) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", admin)).await.unwrap();
    let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    s.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n{auth}\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_socket_gets_ready_after_the_port_accepts_reloading_around_sighup_and_stopping() {
    let backend = Backend::start(BackendMode::Echo).await;
    let (port, admin) = (free_port(), free_port());
    let dir = TempDir::new("notify");
    let notify_path = dir.0.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let text = config(&format!("127.0.0.1:{port}"), admin, backend.addr, "");
    let mut cmd = binary::command(&dir.0, &text, "error").unwrap();
    cmd.env("NOTIFY_SOCKET", &notify_path).stdout(Stdio::null());
    let proxy = Waitless {
        child: cmd.spawn().unwrap(),
        port,
        admin,
        dir: TempDir::new("notify-proxy"),
    };

    let ready = next_state(&notify).await;
    assert!(ready.contains(&"READY=1".to_string()), "{ready:?}");
    // Told ready, the listener must take a client at once, and serve it.
    let (status, _) = get(proxy.addr(), "/", true)
        .await
        .expect("the port accepts once READY=1 is sent");
    assert_eq!(status, 200);

    let before_reload = monotonic_usec();
    signal(&proxy, libc::SIGHUP);
    let reloading = next_state(&notify).await;
    assert!(
        reloading.contains(&"RELOADING=1".to_string()),
        "{reloading:?}"
    );
    // systemd compares MONOTONIC_USEC with its own CLOCK_MONOTONIC.
    let usec: u64 = reloading
        .iter()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(usec >= before_reload && usec <= monotonic_usec(), "{usec}");
    let ready = next_state(&notify).await;
    assert!(ready.contains(&"READY=1".to_string()), "{ready:?}");

    signal(&proxy, libc::SIGTERM);
    let stopping = next_state(&notify).await;
    assert!(stopping.contains(&"STOPPING=1".to_string()), "{stopping:?}");
}

/// A TCP socket as fd 3 named `web` and a unix socket as fd 4 named `app`, passed as a
/// `.socket` unit passes them: waitless serves on both, and keeps them across a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_passed_by_systemd_are_served_by_name_and_kept_across_a_reload() {
    let backend = Backend::start(BackendMode::Echo).await;
    let admin = free_port();
    let dir = TempDir::new("activation");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let unix_path = dir.0.join("app.sock");
    let unix = std::os::unix::net::UnixListener::bind(&unix_path).unwrap();
    let text = format!(
        "{}\n[[listener]]\nname = \"app\"\nlisten = \"systemd:app\"\nupstream = \"web\"\n",
        config("systemd:web", admin, backend.addr, "")
    );
    let inner = binary::command(&dir.0, &text, "error").unwrap();
    // LISTEN_PID must be waitless's pid: the shell sets it to its own, then becomes waitless.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(inner.get_program())
        .args(inner.get_args())
        .env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", "web:app")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null());
    let (tcp_fd, unix_fd) = (tcp.as_raw_fd(), unix.as_raw_fd());
    // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2). Both are
    // first copied above 10 so that neither dup2 overwrites the other's source.
    unsafe {
        cmd.pre_exec(move || {
            let a = libc::fcntl(tcp_fd, libc::F_DUPFD, 10);
            let b = libc::fcntl(unix_fd, libc::F_DUPFD, 10);
            if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let proxy = Waitless {
        child: cmd.spawn().unwrap(),
        port: tcp_addr.port(),
        admin,
        dir: TempDir::new("activation-proxy"),
    };
    wait_for_admin(admin).await;

    let through_unix = || async {
        let mut s = UnixStream::connect(&unix_path).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw).await;
        String::from_utf8_lossy(&raw).into_owned()
    };
    for round in ["start", "after reload"] {
        let (status, _) = get(tcp_addr, "/", true).await.expect("through fd 3");
        assert_eq!(status, 200, "{round}: tcp");
        let resp = through_unix().await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{round}: unix: {resp:?}");
        if round == "start" {
            signal(&proxy, libc::SIGHUP);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let stats = proxy.stats().await;
    assert_eq!(stats["reloads"]["taken"], 1, "{stats}");
    // The unix socket's file is systemd's: waitless does not remove it.
    drop(proxy);
    assert!(unix_path.exists(), "waitless removed systemd's socket file");
}

#[test]
fn a_systemd_socket_that_was_not_passed_is_a_config_error_naming_the_listener_and_the_name() {
    let dir = TempDir::new("activation-missing");
    let text = config(
        "systemd:web",
        free_port(),
        "127.0.0.1:9".parse().unwrap(),
        "",
    );
    let out = binary::command(&dir.0, &text, "error")
        .unwrap()
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("listener[0].listen"), "{stderr}");
    assert!(
        stderr.contains("systemd passed no socket named `web`"),
        "{stderr}"
    );
    // `check` runs as ExecStartPre, which systemd passes no sockets to: it accepts the name.
    let out = binary::command(&dir.0, &text, "error")
        .unwrap()
        .arg("check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_without_the_admin_token_is_401_and_reloads_nothing() {
    let backend = Backend::start(BackendMode::Echo).await;
    let (port, admin) = (free_port(), free_port());
    let text = config(
        &format!("127.0.0.1:{port}"),
        admin,
        backend.addr,
        "token = \"s3cret\"",
    );
    let proxy = Waitless::launch(&text, port, admin).await;
    assert_eq!(admin_post(admin, "/reload", None).await, 401);
    assert_eq!(admin_post(admin, "/reload", Some("Bearer nope")).await, 401);
    assert_eq!(admin_post(admin, "/reload", Some("s3cret")).await, 401);
    let stats = proxy.stats().await;
    assert_eq!(stats["reloads"]["taken"], 0, "{stats}");
    assert_eq!(stats["reloads"]["refused"], 0, "{stats}");
    // Reading stays open.
    assert!(proxy
        .admin_get("/metrics")
        .await
        .contains("waitless_reloads_total"));

    assert_eq!(
        admin_post(admin, "/reload", Some("Bearer s3cret")).await,
        200
    );
    assert_eq!(proxy.stats().await["reloads"]["taken"], 1);
    // `waitless reload` sends the token of the config it reads.
    let out = binary::command(&proxy.dir.0, &text, "error")
        .unwrap()
        .arg("reload")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(proxy.stats().await["reloads"]["taken"], 2);
}

async fn wait_for_admin(admin: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", admin)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("waitless did not start listening");
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}
