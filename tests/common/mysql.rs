//! MySQL fixtures: a real MariaDB server on a private port and data directory, waitless in
//! front of it with a mysql listener, and clients (mysql_async and the stock `mariadb` CLI).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use mysql_async::{Conn, Opts, OptsBuilder};
use tokio::net::TcpStream;

use super::{free_port, TempDir, Waitless};

/// The account waitless logs clients in as and logs in to the server with.
pub const USER: &str = "app";
pub const PASSWORD: &str = "apppw";
/// A server-only account the tests read status counters with, over one lasting connection.
const ADMIN_USER: &str = "watcher";
const ADMIN_PASSWORD: &str = "watcherpw";

/// A MariaDB server started for one test, killed on drop.
pub struct MariaDb {
    pub child: Child,
    /// The loopback address it listens on (127.0.0.1 unless started with `start_on`).
    pub ip: &'static str,
    pub port: u16,
    pub dir: TempDir,
    /// Server options the test added (`--interactive-timeout=1234`), kept for `restart`.
    extra: Vec<String>,
}

/// A waitless process with one mysql listener "db" in front of one server.
pub struct MysqlProxy(pub Waitless);

impl std::ops::Deref for MysqlProxy {
    type Target = Waitless;

    fn deref(&self) -> &Waitless {
        &self.0
    }
}

const MARIADBD: &str = "/usr/sbin/mariadbd";

impl MariaDb {
    /// Installs a data directory and starts the server on a free port, with databases
    /// `appdb` and `other_db` and the accounts the tests use.
    pub async fn start() -> MariaDb {
        MariaDb::start_with(&[]).await
    }

    /// As `start`, with `extra` server options after the fixture's own (a later option wins).
    pub async fn start_with(extra: &[&str]) -> MariaDb {
        MariaDb::start_on("127.0.0.1", free_port(), extra).await
    }

    /// As `start_with`, listening on `ip`:`port` (another loopback address, for servers that
    /// share a port as the addresses of one DNS name do).
    pub async fn start_on(ip: &'static str, port: u16, extra: &[&str]) -> MariaDb {
        assert!(
            Path::new(MARIADBD).exists(),
            "mariadbd is not installed: .ci/run installs it (apt-get install mariadb-server)"
        );
        let dir = TempDir::new("mariadb");
        let out = Command::new("mariadb-install-db")
            .args(["--no-defaults", "--user=root", "--skip-test-db"])
            .arg(format!("--datadir={}", dir.0.join("data").display()))
            .arg("--auth-root-authentication-method=socket")
            // Its own temporary directory: bootstraps running side by side in a shared /tmp
            // have been seen to trip over each other's temporary tables.
            .arg(format!("--tmpdir={}", dir.0.display()))
            .output()
            .expect("run mariadb-install-db");
        assert!(out.status.success(), "mariadb-install-db: {out:?}");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut db = MariaDb {
            child: spawn_server(&dir.0, ip, port, &extra),
            ip,
            port,
            dir,
            extra,
        };
        db.wait_ready().await;
        db.root_sql(&format!(
            "CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}';
             GRANT ALL ON *.* TO '{USER}'@'%';
             CREATE USER '{ADMIN_USER}'@'%' IDENTIFIED BY '{ADMIN_PASSWORD}';
             GRANT ALL ON *.* TO '{ADMIN_USER}'@'%';
             CREATE DATABASE appdb; CREATE DATABASE other_db;
             CREATE TABLE appdb.items (id INT AUTO_INCREMENT PRIMARY KEY, v LONGBLOB);"
        ));
        db
    }

    /// Kills the server and starts it again on the same port and data directory.
    pub async fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_server(&self.dir.0, self.ip, self.port, &self.extra);
        self.wait_ready().await;
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.0.join("mysqld.sock")
    }

    /// Runs SQL as root over the server's unix socket with the `mariadb` CLI.
    pub fn root_sql(&self, sql: &str) -> String {
        let out = Command::new("mariadb")
            .args(["--no-defaults", "-uroot", "-N", "-B"])
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-e", sql])
            .output()
            .expect("run mariadb");
        assert!(out.status.success(), "root sql failed: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A lasting connection straight to the server, to read its status counters without
    /// adding to them.
    pub async fn watcher(&self) -> Watcher {
        let opts = OptsBuilder::default()
            .ip_or_hostname(self.ip)
            .tcp_port(self.port)
            .user(Some(ADMIN_USER))
            .pass(Some(ADMIN_PASSWORD))
            .prefer_socket(false);
        Watcher(Conn::new(opts).await.expect("watcher connects"))
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if TcpStream::connect((self.ip, self.port)).await.is_ok() && self.socket().exists() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "mariadbd exited ({status}): {}",
                    std::fs::read_to_string(self.dir.0.join("err.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("mariadbd did not start");
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(dir: &Path, ip: &str, port: u16, extra: &[String]) -> Child {
    let d = dir.display();
    Command::new(MARIADBD)
        .args(["--no-defaults", "--user=root"])
        .arg(format!("--bind-address={ip}"))
        .arg(format!("--port={port}"))
        .arg(format!("--datadir={d}/data"))
        .arg(format!("--socket={d}/mysqld.sock"))
        .arg(format!("--pid-file={d}/mysqld.pid"))
        .arg(format!("--log-error={d}/err.log"))
        .arg(format!("--tmpdir={d}"))
        // Small and quick: this server lives for one test.
        .args([
            "--skip-log-bin",
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=16M",
            "--innodb-log-file-size=16M",
            "--max-allowed-packet=256M",
            "--max-connections=500",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mariadbd")
}

/// A connection that reads the server's own counters.
pub struct Watcher(pub Conn);

impl Watcher {
    /// A `SHOW GLOBAL STATUS` counter, e.g. `Connections` or `Threads_connected`.
    pub async fn status(&mut self, name: &str) -> u64 {
        let row: Option<(String, String)> = self
            .0
            .query_first(format!("SHOW GLOBAL STATUS LIKE '{name}'"))
            .await
            .expect("show status");
        row.and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("no status {name}"))
    }
}

impl MysqlProxy {
    /// Starts waitless with listener "db" (mysql) in front of `server`; `listener_extra` and
    /// `upstream_extra` are TOML lines added to each table. The account `app` is configured.
    pub async fn start(server: u16, listener_extra: &str, upstream_extra: &str) -> MysqlProxy {
        let (port, admin) = (free_port(), free_port());
        let config = MysqlProxy::config(port, admin, server, listener_extra, upstream_extra);
        MysqlProxy(Waitless::launch(&config, port, admin).await)
    }

    /// As `start`, logging at `level`; returns the log file's path too.
    pub async fn start_logged(
        server: u16,
        listener_extra: &str,
        upstream_extra: &str,
        level: &str,
    ) -> (MysqlProxy, PathBuf) {
        let (port, admin) = (free_port(), free_port());
        let config = MysqlProxy::config(port, admin, server, listener_extra, upstream_extra);
        let (w, log) = Waitless::launch_logged(&config, port, admin, level).await;
        (MysqlProxy(w), log)
    }

    fn config(
        port: u16,
        admin: u16,
        server: u16,
        listener_extra: &str,
        upstream_extra: &str,
    ) -> String {
        format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
             [[listener]]\nname = \"db\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"mysql\"\n\
             upstream = \"db\"\n{listener_extra}\n\n\
             [[upstream]]\nname = \"db\"\nservers = [\"127.0.0.1:{server}\"]\n{upstream_extra}\n\n\
             [[mysql_user]]\nuser = \"{USER}\"\npassword = \"{PASSWORD}\"\n"
        )
    }
}

/// Client options for `port` as `user` / `password`, optionally with a default database.
/// `prefer_socket` is off: mysql_async would otherwise look up the server's unix socket and
/// reconnect there, around the proxy.
pub fn opts(port: u16, user: &str, password: &str, db: Option<&str>) -> Opts {
    OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .user(Some(user))
        .pass(Some(password))
        .db_name(db)
        .prefer_socket(false)
        .into()
}

/// A session as the configured account.
pub async fn connect(port: u16, db: Option<&str>) -> Conn {
    Conn::new(opts(port, USER, PASSWORD, db))
        .await
        .expect("connect through waitless")
}

/// `n` connect / `SELECT 1` / quit cycles, `concurrency` at a time; returns how many failed.
pub async fn short_sessions(port: u16, n: usize, concurrency: usize) -> usize {
    super::run_load(n, concurrency, move || async move {
        let cycle = async {
            let mut c = Conn::new(opts(port, USER, PASSWORD, Some("appdb"))).await?;
            let one: Option<u32> = c.query_first("SELECT 1").await?;
            c.disconnect().await?;
            Ok::<_, mysql_async::Error>(one == Some(1))
        };
        matches!(cycle.await, Ok(true))
    })
    .await
}

/// Runs the stock `mariadb` client against 127.0.0.1:`port` with `args`; returns its exit
/// status success, stdout and stderr.
pub fn cli(port: u16, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("mariadb")
        .args(["--no-defaults", "-h127.0.0.1", "-N", "-B"])
        .arg(format!("-P{port}"))
        .arg(format!("-u{USER}"))
        .arg(format!("-p{PASSWORD}"))
        .args(args)
        .output()
        .expect("run mariadb");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The server error code of a failed client call.
pub fn server_code(e: &mysql_async::Error) -> Option<u16> {
    match e {
        mysql_async::Error::Server(s) => Some(s.code),
        _ => None,
    }
}

/// A client library outside Rust, driven by a short script: the drivers real applications use
/// parse responses their own way, and a relay that gets a response's end wrong shows up there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interpreter {
    /// Debian's /usr/bin/python3 with PyMySQL (`python3-pymysql`); the pyenv `python3` first
    /// on PATH has no PyMySQL.
    PyMySql,
    /// php-cli with mysqli and PDO mysql (`php-cli php-mysql`).
    Php,
}

impl Interpreter {
    fn command(self) -> tokio::process::Command {
        match self {
            Interpreter::PyMySql => {
                // -u: every line reaches the pipe as printed, so a hang keeps what came before.
                let mut c = tokio::process::Command::new("/usr/bin/python3");
                c.arg("-u").arg("-c");
                c
            }
            Interpreter::Php => {
                let mut c = tokio::process::Command::new("php");
                c.arg("-r");
                c
            }
        }
    }

    /// Whether the interpreter and its MySQL modules are installed; prints a note when not, so
    /// a skipped part shows in the test output.
    pub async fn available(self) -> bool {
        let probe = match self {
            Interpreter::PyMySql => "import pymysql",
            Interpreter::Php => {
                "exit(extension_loaded('mysqli') && extension_loaded('pdo_mysql') ? 0 : 1);"
            }
        };
        let ok = matches!(
            self.command().arg(probe).output().await,
            Ok(out) if out.status.success()
        );
        if !ok {
            println!("note: {self:?} (or its MySQL module) is not installed; that part is skipped");
        }
        ok
    }

    /// Runs `code` with the arguments host, port, user, password (`sys.argv[1:]`,
    /// `$argv[1..]`) against 127.0.0.1:`port`; returns its stdout, then a line saying so if it
    /// exited non-zero (with its first and last stderr lines) or was killed after `limit`.
    pub async fn run(self, code: &str, port: u16, limit: Duration) -> String {
        use tokio::io::AsyncReadExt;
        let mut child = self
            .command()
            .arg(code)
            .args(["127.0.0.1", &port.to_string(), USER, PASSWORD])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {self:?}: {e}"));
        let mut stdout = child.stdout.take().expect("stdout piped");
        let mut stderr = child.stderr.take().expect("stderr piped");
        let out = tokio::spawn(async move {
            let mut b = Vec::new();
            let _ = stdout.read_to_end(&mut b).await;
            b
        });
        let err = tokio::spawn(async move {
            let mut b = Vec::new();
            let _ = stderr.read_to_end(&mut b).await;
            b
        });
        let ending = match tokio::time::timeout(limit, child.wait()).await {
            Ok(Ok(status)) if status.success() => None,
            Ok(status) => Some(format!("exited: {status:?}")),
            Err(_) => {
                let _ = child.kill().await;
                Some(format!("timed out after {limit:?}"))
            }
        };
        let mut text = String::from_utf8_lossy(&out.await.unwrap_or_default()).into_owned();
        if let Some(ending) = ending {
            let err = String::from_utf8_lossy(&err.await.unwrap_or_default()).into_owned();
            // PHP names the error on its first line, Python on its last.
            let mut said = err.lines().filter(|l| !l.trim().is_empty());
            let first = said.next().unwrap_or("");
            let last = said.next_back().unwrap_or("");
            text.push_str(&format!("<{ending}; stderr: {first} ... {last}>\n"));
        }
        text
    }
}
