//! The HTTPS bench's certificates (`WAITLESS_BENCH_TLS`), made with the openssl CLI: a CA and
//! one RSA-2048 server certificate it signed for `backend.test` and 127.0.0.1, which every
//! front (waitless, HAProxy, nginx) and the backend present alike.

use std::path::PathBuf;

use crate::tempdir::TempDir;

#[path = "../../tests/common/certs.rs"]
mod openssl;

/// The name the proxies send as SNI and verify the backend's certificate against.
pub const SERVER_NAME: &str = "backend.test";

pub struct Certs {
    /// Holds the files for as long as the bench runs.
    _dir: TempDir,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate and key in one file, as HAProxy's `crt` wants them.
    pub combined: PathBuf,
}

impl Certs {
    pub fn make() -> Result<Certs, String> {
        let dir = TempDir::create("bench-certs").map_err(|e| e.to_string())?;
        let san = format!("DNS:{SERVER_NAME},IP:127.0.0.1");
        let leaf = openssl::Leaf {
            file: "server",
            cn: SERVER_NAME,
            ecdsa: false,
            san: &san,
        };
        openssl::make(&dir.0, &[leaf])?;
        let read = |f: &str| std::fs::read(dir.0.join(f)).map_err(|e| format!("{f}: {e}"));
        let combined = [read("server.pem")?, read("server.key")?].concat();
        std::fs::write(dir.0.join("combined.pem"), combined).map_err(|e| e.to_string())?;
        let at = |f: &str| dir.0.join(f);
        Ok(Certs {
            ca: at("ca.pem"),
            cert: at("server.pem"),
            key: at("server.key"),
            combined: at("combined.pem"),
            _dir: dir,
        })
    }
}
