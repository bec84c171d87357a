//! What the clients go through to the one server: nothing, HAProxy `mode tcp`, or waitless
//! with a mysql listener, each proxy a fresh process with a config this bench writes.

use std::path::PathBuf;
use std::process::Command;

use serde::Serialize;

use crate::binary;
use crate::process::Proc;
use crate::server::{PASSWORD, USER};
use crate::tempdir::TempDir;

/// waitless's `pool_size`, and mariadb-slap's concurrency: the bound on server
/// connections holds while the clients at once are no more than the pool.
pub const POOL_SIZE: usize = 16;

/// The programs this bench can use.
pub struct Tools {
    /// The waitless build measured: the release binary, or `WAITLESS_BENCH_BINARY`.
    pub waitless: PathBuf,
    /// HAProxy, the L4 anchor; None: not installed.
    pub haproxy: Option<PathBuf>,
    /// `php` with mysqli; None: not installed, or without mysqli.
    pub php: Option<PathBuf>,
    /// `mariadb-slap`; None: not installed.
    pub slap: Option<PathBuf>,
}

/// What the clients go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Target {
    Direct,
    Haproxy,
    Waitless,
}

/// A target ready for clients.
pub struct Running {
    /// The port the clients connect to.
    pub port: u16,
    /// The proxy's process; None for `Direct`.
    pub proc: Option<Proc>,
}

// === impl Target ===

impl Target {
    pub fn label(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Haproxy => "HAProxy mode tcp",
            Target::Waitless => "waitless",
        }
    }

    /// Starts the target in front of the server on `server`.
    pub fn start(self, tools: &Tools, server: u16) -> Result<Running, String> {
        self.start_as(tools, server, None)
    }

    /// Starts the target for persistent clients: waitless with `pooling = "transaction"` on
    /// `connections` server connections at most (the others as `start`).
    pub fn start_mux(
        self,
        tools: &Tools,
        server: u16,
        connections: usize,
    ) -> Result<Running, String> {
        self.start_as(tools, server, Some(connections))
    }

    fn start_as(self, tools: &Tools, server: u16, mux: Option<usize>) -> Result<Running, String> {
        let port = free_port()?;
        let mut proc = match self {
            Target::Direct => {
                return Ok(Running {
                    port: server,
                    proc: None,
                })
            }
            Target::Waitless => {
                let dir = TempDir::create("waitless").map_err(|e| e.to_string())?;
                let (pooling, bounds) = match mux {
                    None => (String::new(), format!("pool_size = {POOL_SIZE}\n")),
                    // Logins queue for a connection too: give them time.
                    Some(n) => (
                        "pooling = \"transaction\"\n".to_string(),
                        format!(
                            "pool_size = {n}\nmax_connections = {n}\nconnect_timeout = \"30s\"\n"
                        ),
                    ),
                };
                let conf = format!(
                    "[admin]\nlisten = \"off\"\n\n\
                     [[listener]]\nname = \"db\"\nlisten = \"127.0.0.1:{port}\"\n\
                     protocol = \"mysql\"\nupstream = \"db\"\n{pooling}\n\
                     [[upstream]]\nname = \"db\"\nservers = [\"127.0.0.1:{server}\"]\n\
                     {bounds}\n\
                     [[mysql_user]]\nuser = \"{USER}\"\npassword = \"{PASSWORD}\"\n"
                );
                let mut cmd = binary::command_of(&tools.waitless, &dir.0, &conf, "error")
                    .map_err(|e| e.to_string())?;
                Proc::spawn("waitless", &mut cmd, dir)?
            }
            Target::Haproxy => {
                let bin = tools.haproxy.as_ref().ok_or("HAProxy is not installed")?;
                let dir = TempDir::create("haproxy").map_err(|e| e.to_string())?;
                let conf = format!(
                    "global\n    maxconn 4000\n\n\
                     defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 60s\n\
                     \x20   timeout server 60s\n\n\
                     frontend db\n    bind 127.0.0.1:{port}\n    default_backend db\n\n\
                     backend db\n    server s1 127.0.0.1:{server}\n"
                );
                let path = dir.0.join("haproxy.cfg");
                std::fs::write(&path, conf).map_err(|e| e.to_string())?;
                let mut cmd = Command::new(bin);
                cmd.arg("-db").arg("-f").arg(&path);
                Proc::spawn("HAProxy", &mut cmd, dir)?
            }
        };
        proc.wait_listening(port)?;
        Ok(Running {
            port,
            proc: Some(proc),
        })
    }
}

/// A port free on 127.0.0.1 now and not handed out before in this run (the kernel may give
/// the same free port to two binds in a row).
pub fn free_port() -> Result<u16, String> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
        let port = l.local_addr().map_err(|e| e.to_string())?.port();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
}
