//! The HTTPS bench's certificates (`WAITLESS_BENCH_TLS`), made with the openssl CLI: a CA and
//! one RSA-2048 server certificate it signed for `backend.test` and 127.0.0.1, which every
//! front (waitless, HAProxy, nginx) and the backend present alike.

use std::path::PathBuf;
use std::process::Command;

use crate::tempdir::TempDir;

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
        let ext = format!("subjectAltName=DNS:{SERVER_NAME},IP:127.0.0.1\n");
        std::fs::write(dir.0.join("san.ext"), ext).map_err(|e| e.to_string())?;
        let subject = format!("/CN={SERVER_NAME}");
        let steps: [&[&str]; 3] = [
            &[
                "req",
                "-x509",
                "-nodes",
                "-days",
                "2",
                "-newkey",
                "rsa:2048",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-subj",
                "/CN=waitless bench CA",
            ],
            &[
                "req",
                "-new",
                "-nodes",
                "-newkey",
                "rsa:2048",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                &subject,
            ],
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "san.ext",
                "-out",
                "server.pem",
            ],
        ];
        for args in steps {
            let out = Command::new("openssl")
                .current_dir(&dir.0)
                .args(args)
                .output()
                .map_err(|e| format!("openssl (apt-get install openssl): {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "openssl {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
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
