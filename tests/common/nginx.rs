//! Running a real nginx on a private prefix: where its binary is, the config skeleton every
//! fixture writes (nginx's logs, pid and temp files kept in the prefix, none in /var), and
//! its command line. Shared by the tests and the benches (which include this file by path).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where distributions and source builds put nginx.
const BINARIES: [&str; 3] = ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"];

/// The nginx binary, or None when it is not installed (CI installs it).
pub fn binary() -> Option<PathBuf> {
    BINARIES.iter().map(PathBuf::from).find(|p| p.exists())
}

/// A whole config whose files stay under `prefix`: `main` holds lines of the main context
/// (`worker_processes 1;` and the like), `http` the rest of the http block (upstreams,
/// servers, settings), each line ending in a newline.
pub fn config(prefix: &Path, main: &str, worker_connections: usize, http: &str) -> String {
    let d = prefix.display();
    let temps: String = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .iter()
        .map(|t| format!("  {t}_temp_path {d}/{t};\n"))
        .collect();
    format!(
        "{main}error_log {d}/error.log;\npid {d}/nginx.pid;\n\
         events {{ worker_connections {worker_connections}; }}\n\
         http {{\n  access_log off;\n{temps}{http}}}\n"
    )
}

/// nginx in the foreground on `prefix/nginx.conf`; `master` keeps its master process (for
/// `worker_processes` above 1), else the one process serves.
pub fn command(bin: &Path, prefix: &Path, master: bool) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("-p").arg(prefix).args(["-c", "nginx.conf", "-g"]);
    cmd.arg(if master {
        "daemon off;"
    } else {
        "daemon off; master_process off;"
    });
    cmd
}
