//! What the load goes through: the backend, the anchors (HAProxy, nginx) and waitless, each
//! started as its own process with a config this bench writes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use tokio::net::TcpListener;

use crate::binary;
use crate::certs::{Certs, SERVER_NAME};
use crate::machine::version;
use crate::nginx;
use crate::process::Proc;
use crate::tempdir::TempDir;
use crate::timewait::Ports;

/// The programs this bench can use.
pub struct Tools {
    /// nginx: the backend, and one of the proxies.
    pub nginx: Option<PathBuf>,
    /// HAProxy, the other anchor.
    pub haproxy: Option<PathBuf>,
    /// The load generator; None: the built-in one.
    pub wrk: Option<PathBuf>,
    /// Idle connections for the RSS measurement, from the open-file limit.
    pub idle_conns: usize,
    /// HAProxy and nginx listen with their deferred accept too (`defer-accept`, `deferred`),
    /// as waitless's HTTP listeners do by default (`WAITLESS_BENCH_ANCHOR_DEFER=1`).
    pub anchor_defer: bool,
    /// HTTPS on both sides of every proxy and at the backend (`WAITLESS_BENCH_TLS`).
    pub tls: Option<Certs>,
}

/// Which clients a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clients {
    /// One request per connection, `Connection: close`; the client closes after the response.
    Short,
    /// Persistent connections.
    KeepAlive,
}

/// What the load goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Direct,
    Haproxy,
    Nginx,
    /// Over TLS: nginx with TLS 1.3 offered to clients too. nginx 1.22's default protocols
    /// stop at TLS 1.2, whose resumed handshake makes no key exchange at all; TLS 1.3's
    /// (rustls', HAProxy's) does one. This one speaks what the others speak.
    NginxTls13,
    /// waitless with this listener `time_wait` policy.
    Waitless(&'static str),
}

/// The one backend, listening on a fresh port for every run.
pub struct Backend {
    /// "nginx 1.22.1 return 200" or "embedded hyper".
    pub describe: String,
    /// The nginx process, or the embedded server's tasks.
    pub kind: BackendKind,
    /// Its ports, one per run, in the order runs take them.
    pub ports: Vec<u16>,
    /// Ports handed out so far.
    pub taken: usize,
}

pub enum BackendKind {
    Nginx(Proc),
    Embedded(Vec<tokio::task::JoinHandle<()>>),
}

// === impl Target ===

impl Target {
    pub fn label(self) -> String {
        match self {
            Target::Direct => "direct".into(),
            Target::Haproxy => "HAProxy http-reuse always".into(),
            Target::Nginx => "nginx upstream keepalive".into(),
            Target::NginxTls13 => "nginx TLSv1.3 to clients".into(),
            Target::Waitless(p) => format!("waitless time_wait={p}"),
        }
    }
}

impl Clients {
    pub fn label(self) -> &'static str {
        match self {
            Clients::Short => "short",
            Clients::KeepAlive => "keep-alive",
        }
    }
}

// === impl Backend ===

impl Backend {
    /// nginx when installed, else the embedded server, on `n` ports.
    pub fn start(
        tools: &Tools,
        ports: &mut Ports,
        n: usize,
        rt: &tokio::runtime::Runtime,
    ) -> Result<Backend, String> {
        let list = (0..n)
            .map(|_| ports.take())
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(bin) = &tools.nginx {
            let dir = TempDir::create("backend").map_err(|e| e.to_string())?;
            let ssl = if tools.tls.is_some() { " ssl" } else { "" };
            let listens: String = list
                .iter()
                .map(|p| format!("    listen 127.0.0.1:{p}{ssl} backlog=4096;\n"))
                .collect();
            let certs = tools.tls.as_ref().map(nginx_certs).unwrap_or_default();
            // One process: the proxies and the load generator need the other core.
            // keepalive_requests: nginx would otherwise close a keep-alive connection every
            // 1000 requests, putting TIME_WAIT on the backend that no proxy could help.
            let http = format!(
                "  keepalive_requests 1000000;\n  keepalive_timeout 75s;\n\
                 \x20 server {{\n{listens}{certs}\
                 \x20   location / {{ return 200 \"hello from the backend\\n\"; }}\n  }}\n"
            );
            let conf = nginx::config(&dir.0, "worker_processes 1;\n", 16384, &http);
            std::fs::write(dir.0.join("nginx.conf"), conf).map_err(|e| e.to_string())?;
            let mut cmd = nginx::command(bin, &dir.0, false);
            let mut proc = Proc::spawn("backend nginx", &mut cmd, dir)?;
            proc.wait_listening(list[0])?;
            Ok(Backend {
                describe: format!(
                    "nginx {} `return 200`{}, 1 process",
                    version(bin, "-v"),
                    if tools.tls.is_some() { " over TLS" } else { "" }
                ),
                kind: BackendKind::Nginx(proc),
                ports: list,
                taken: 0,
            })
        } else if tools.tls.is_some() {
            Err("the HTTPS bench needs nginx as its backend (apt-get install nginx)".into())
        } else {
            let mut tasks = Vec::new();
            for &p in &list {
                let listener = rt
                    .block_on(TcpListener::bind(("127.0.0.1", p)))
                    .map_err(|e| format!("embedded backend: bind {p}: {e}"))?;
                tasks.push(rt.spawn(embedded_backend(listener)));
            }
            Ok(Backend {
                describe: "embedded hyper server (nginx not installed)".into(),
                kind: BackendKind::Embedded(tasks),
                ports: list,
                taken: 0,
            })
        }
    }

    /// The backend's address for the next run.
    pub fn next_addr(&mut self) -> Result<SocketAddr, String> {
        let p = *self
            .ports
            .get(self.taken)
            .ok_or("the backend ran out of ports")?;
        self.taken += 1;
        Ok(SocketAddr::from(([127, 0, 0, 1], p)))
    }

    /// CPU ticks of the backend process (nginx only).
    pub fn cpu_ticks(&self) -> Option<u64> {
        match &self.kind {
            BackendKind::Nginx(p) => Some(p.cpu_ticks()),
            BackendKind::Embedded(_) => None,
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let BackendKind::Embedded(tasks) = &self.kind {
            for t in tasks {
                t.abort();
            }
        }
    }
}

/// The backend when nginx is not installed: the same answer as nginx's `return 200`.
async fn embedded_backend(listener: TcpListener) {
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    Bytes::from_static(b"hello from the backend\n"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

// ---------------------------------------------------------------------------------------
// Proxies

/// Starts `target` on `port` in front of `backend`; None for `Direct`.
pub fn start_proxy(
    target: Target,
    tools: &Tools,
    port: u16,
    backend: SocketAddr,
) -> Result<Option<Proc>, String> {
    let mut proc = match target {
        Target::Direct => return Ok(None),
        Target::Waitless(policy) => {
            let dir = TempDir::create("waitless").map_err(|e| e.to_string())?;
            let (front, back) = match &tools.tls {
                Some(c) => (
                    format!(
                        "tls = {{ cert = \"{}\", key = \"{}\" }}\n",
                        c.cert.display(),
                        c.key.display()
                    ),
                    format!(
                        "tls = {{ ca = \"{}\", server_name = \"{SERVER_NAME}\" }}\n",
                        c.ca.display()
                    ),
                ),
                None => Default::default(),
            };
            let conf = format!(
                "workers = 0\n\n[admin]\nlisten = \"off\"\n\n\
                 [[listener]]\nname = \"bench\"\nlisten = \"127.0.0.1:{port}\"\n\
                 protocol = \"http\"\nupstream = \"backend\"\ntime_wait = \"{policy}\"\n{front}\n\
                 [[upstream]]\nname = \"backend\"\nservers = [\"{backend}\"]\npool_size = 64\n{back}"
            );
            let mut cmd = binary::command(&dir.0, &conf, "error").map_err(|e| e.to_string())?;
            Proc::spawn(&target.label(), &mut cmd, dir)?
        }
        Target::Haproxy => {
            let bin = tools.haproxy.as_ref().ok_or("HAProxy is not installed")?;
            let dir = TempDir::create("haproxy").map_err(|e| e.to_string())?;
            let conf = format!(
                "global\n    maxconn {maxconn}\n\n\
                 defaults\n    mode http\n    timeout connect 2s\n    timeout client 60s\n\
                 \x20   timeout server 60s\n    timeout http-keep-alive 60s\n\
                 \x20   http-reuse always\n\n\
                 frontend bench\n    bind 127.0.0.1:{port}{defer}{front}\n    default_backend backend\n\n\
                 backend backend\n    server s1 {backend}{back}\n",
                maxconn = tools.idle_conns + 200,
                defer = if tools.anchor_defer {
                    " defer-accept"
                } else {
                    ""
                },
                front = tools
                    .tls
                    .as_ref()
                    .map(|c| format!(" ssl crt {}", c.combined.display()))
                    .unwrap_or_default(),
                back = tools
                    .tls
                    .as_ref()
                    .map(|c| format!(
                        " ssl verify required ca-file {} sni str({SERVER_NAME}) verifyhost {SERVER_NAME}",
                        c.ca.display()
                    ))
                    .unwrap_or_default(),
            );
            let path = dir.0.join("haproxy.cfg");
            std::fs::write(&path, conf).map_err(|e| e.to_string())?;
            let mut cmd = Command::new(bin);
            cmd.arg("-db").arg("-f").arg(&path);
            Proc::spawn("HAProxy", &mut cmd, dir)?
        }
        Target::Nginx | Target::NginxTls13 => {
            let bin = tools.nginx.as_ref().ok_or("nginx is not installed")?;
            let dir = TempDir::create("nginx-proxy").map_err(|e| e.to_string())?;
            let http = format!(
                "  keepalive_requests 1000000;\n  keepalive_timeout 75s;\n\
                 \x20 upstream backend {{\n    server {backend};\n    keepalive 64;\n\
                 \x20   keepalive_requests 1000000;\n  }}\n\
                 \x20 server {{\n    listen 127.0.0.1:{port}{ssl} backlog=4096{defer};\n{certs}\
                 \x20   location / {{\n      proxy_pass {scheme}://backend;\n\
                 \x20     proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n{verify}\
                 \x20   }}\n  }}\n",
                defer = if tools.anchor_defer { " deferred" } else { "" },
                ssl = if tools.tls.is_some() { " ssl" } else { "" },
                certs = match (&tools.tls, target) {
                    (Some(c), Target::NginxTls13) => {
                        format!("    ssl_protocols TLSv1.2 TLSv1.3;\n{}", nginx_certs(c))
                    }
                    (Some(c), _) => nginx_certs(c),
                    (None, _) => String::new(),
                },
                scheme = if tools.tls.is_some() { "https" } else { "http" },
                verify = tools
                    .tls
                    .as_ref()
                    .map(|c| format!(
                        "      proxy_ssl_session_reuse on;\n      proxy_ssl_verify on;\n\
                         \x20     proxy_ssl_trusted_certificate {};\n\
                         \x20     proxy_ssl_name {SERVER_NAME};\n      proxy_ssl_server_name on;\n",
                        c.ca.display()
                    ))
                    .unwrap_or_default(),
            );
            let main = "worker_processes auto;\nworker_rlimit_nofile 30000;\n";
            let conf = nginx::config(&dir.0, main, 16384, &http);
            std::fs::write(dir.0.join("nginx.conf"), conf).map_err(|e| e.to_string())?;
            let mut cmd = nginx::command(bin, &dir.0, true);
            Proc::spawn("nginx proxy", &mut cmd, dir)?
        }
    };
    proc.wait_listening(port)?;
    Ok(Some(proc))
}

/// nginx's lines for the bench's server certificate.
fn nginx_certs(c: &Certs) -> String {
    format!(
        "    ssl_certificate {};\n    ssl_certificate_key {};\n",
        c.cert.display(),
        c.key.display()
    )
}
