//! The MariaDB server the bench measures against: a private data directory and port, the
//! account the clients log in as, one database with a small table.
//!
//! tests/common/mysql.rs starts its server the same way but talks to it through mysql_async
//! and the tests' harness; this bench reads the server only with the stock `mariadb` client
//! (as root over the server's unix socket), so it needs no driver of its own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::machine::version;
use crate::process::Proc;
use crate::targets::free_port;
use crate::tempdir::TempDir;

/// The account the clients log in as, through every target (waitless's `[[mysql_user]]`).
pub const USER: &str = "app";
pub const PASSWORD: &str = "apppw";
/// The clients' default database; holds `items` (id, name), rows 1 "one" to 3 "three".
pub const DATABASE: &str = "benchdb";

pub const MARIADBD: &str = "/usr/sbin/mariadbd";

/// A MariaDB server started for this run, killed with the bench.
pub struct MariaDb {
    /// The server process, its data directory and logs.
    pub proc: Proc,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    /// `mariadbd --version`'s version.
    pub version: String,
}

// === impl MariaDb ===

impl MariaDb {
    /// Installs a data directory, starts the server on a free port and creates the account,
    /// the database and its table.
    pub fn start() -> Result<MariaDb, String> {
        let dir = TempDir::create("mariadb").map_err(|e| format!("MariaDB: temp dir: {e}"))?;
        let out = Command::new("mariadb-install-db")
            .args(["--no-defaults", "--user=root", "--skip-test-db"])
            .arg(format!("--datadir={}", dir.0.join("data").display()))
            .arg("--auth-root-authentication-method=socket")
            .arg(format!("--tmpdir={}", dir.0.display()))
            .output()
            .map_err(|e| format!("mariadb-install-db: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mariadb-install-db failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let port = free_port()?;
        let d = dir.0.display().to_string();
        let mut cmd = Command::new(MARIADBD);
        cmd.args(["--no-defaults", "--user=root", "--bind-address=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--datadir={d}/data"))
            .arg(format!("--socket={d}/mysqld.sock"))
            .arg(format!("--pid-file={d}/mysqld.pid"))
            .arg(format!("--log-error={d}/error.log"))
            .arg(format!("--tmpdir={d}"))
            // No binary log (the direct side would pay for it on every write), a buffer pool
            // that holds the one table; max_connections well above what slap
            // and the mux part's persistent clients open direct.
            .args([
                "--skip-log-bin",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=32M",
                "--innodb-log-file-size=16M",
                "--max-connections=1500",
            ]);
        let mut proc = Proc::spawn("MariaDB", &mut cmd, dir)?;
        proc.wait_listening(port)?;
        let db = MariaDb {
            proc,
            port,
            version: version(Path::new(MARIADBD), "--version"),
        };
        db.wait_ready()?;
        db.root_sql(&format!(
            "CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}';
             GRANT ALL ON *.* TO '{USER}'@'%';
             CREATE DATABASE {DATABASE};
             CREATE TABLE {DATABASE}.items (id INT PRIMARY KEY, name VARCHAR(32));
             INSERT INTO {DATABASE}.items VALUES (1, 'one'), (2, 'two'), (3, 'three');"
        ))?;
        Ok(db)
    }

    /// Runs SQL as root over the server's unix socket; its output, tab-separated.
    pub fn root_sql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new("mariadb")
            .args(["--no-defaults", "-uroot", "-N", "-B"])
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-e", sql])
            .output()
            .map_err(|e| format!("mariadb client: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "root SQL failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A `SHOW GLOBAL STATUS` counter. Reading it is a connection of its own, counted in
    /// `Connections` before the value is read.
    pub fn status(&self, name: &str) -> Result<u64, String> {
        let out = self.root_sql(&format!("SHOW GLOBAL STATUS LIKE '{name}'"))?;
        out.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no status {name} in {out:?}"))
    }

    fn socket(&self) -> PathBuf {
        self.proc.dir.0.join("mysqld.sock")
    }

    /// The port listens before the server takes logins on its socket.
    fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.root_sql("SELECT 1") {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "MariaDB takes no logins: {e}; {}",
                        self.proc.logs()
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}
