//! Test certificates, made with the openssl CLI (Debian package openssl): a CA (`ca.pem`,
//! `ca.key`) and server certificates it signed, valid for two days.

use std::path::Path;
use std::process::Command;

/// A server certificate to sign: `{file}.pem` and its key `{file}.key`.
pub struct Leaf<'a> {
    pub file: &'a str,
    /// The subject's common name.
    pub cn: &'a str,
    /// ECDSA P-256 instead of RSA-2048.
    pub ecdsa: bool,
    /// subjectAltName, e.g. `DNS:localhost,IP:127.0.0.1`.
    pub san: &'a str,
}

/// Makes the CA in `dir`, then each of `leaves` signed by it.
pub fn make(dir: &Path, leaves: &[Leaf]) -> Result<(), String> {
    let openssl = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .map_err(|e| format!("openssl (Debian package openssl): {e}"))?;
        match out.status.success() {
            true => Ok(()),
            false => Err(format!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    };
    openssl(&[
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
        "/CN=waitless test CA",
    ])?;
    for leaf in leaves {
        let f = leaf.file;
        let (key, csr, ext, pem) = (
            format!("{f}.key"),
            format!("{f}.csr"),
            format!("{f}.ext"),
            format!("{f}.pem"),
        );
        let subject = format!("/CN={}", leaf.cn);
        let mut req = vec!["req", "-new", "-nodes", "-keyout", &key, "-out", &csr];
        req.extend(match leaf.ecdsa {
            true => ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"].as_slice(),
            false => ["-newkey", "rsa:2048"].as_slice(),
        });
        req.extend(["-subj", &subject]);
        openssl(&req)?;
        std::fs::write(dir.join(&ext), format!("subjectAltName={}\n", leaf.san))
            .map_err(|e| format!("{ext}: {e}"))?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ])?;
    }
    Ok(())
}
