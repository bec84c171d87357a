//! `cargo bench --bench tls_handshake --features bench-ring`: full TLS handshakes per second
//! with each rustls crypto provider (aws-lc-rs, ring) and each kind of server key (RSA-2048,
//! ECDSA P-256), in memory on one thread, so that the figure is the crypto and rustls alone.
//! The server side is what a listener with `tls` pays per short client; the client side what
//! an upstream with `tls` pays per new pooled connection. Resumed handshakes (a ticket from
//! the first) are measured too. The certificates are made with the openssl CLI.
//!
//! This is how waitless's provider was chosen (README, "TLS"); the `bench-ring` feature only
//! builds ring in for this comparison.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

#[path = "../tests/common/certs.rs"]
mod openssl;
#[allow(dead_code)]
#[path = "../tests/common/tempdir.rs"]
mod tempdir;

/// How a provider is made.
type Provider = fn() -> CryptoProvider;

/// Handshakes per measurement.
const COUNT: u32 = 2_000;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("tls_handshake: a benchmark; run it with `cargo bench --bench tls_handshake --features bench-ring`");
        return;
    }
    if let Err(e) = run() {
        eprintln!("tls_handshake bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let dir = tempdir::TempDir::create("tls-bench").map_err(|e| e.to_string())?;
    make_certs(&dir.0)?;
    let providers: [(&str, Provider); 2] = [
        ("aws-lc-rs", rustls::crypto::aws_lc_rs::default_provider),
        ("ring", rustls::crypto::ring::default_provider),
    ];
    println!(
        "{COUNT} handshakes per row, one thread, in memory; TLS 1.3 (X25519); \
         µs of CPU per handshake on each side, and the server side's handshakes/s\n"
    );
    println!(
        "{:<10} {:<12} {:<8} {:>10} {:>10} {:>14}",
        "provider", "server key", "kind", "server µs", "client µs", "server hs/s"
    );
    for (name, provider) in providers {
        for key in ["rsa2048", "p256"] {
            let (server, client) = configs(&dir.0, key, provider)?;
            for resumed in [false, true] {
                let (s, c) = measure(&server, &client, resumed)?;
                println!(
                    "{:<10} {:<12} {:<8} {:>10.1} {:>10.1} {:>14.0}",
                    name,
                    if key == "p256" {
                        "ECDSA P-256"
                    } else {
                        "RSA-2048"
                    },
                    if resumed { "resumed" } else { "full" },
                    s,
                    c,
                    1e6 / s
                );
            }
        }
    }
    Ok(())
}

/// A CA and, signed by it, a server certificate `bench.test` for each kind of key.
fn make_certs(dir: &Path) -> Result<(), String> {
    let leaf = |file, ecdsa| openssl::Leaf {
        file,
        cn: "bench.test",
        ecdsa,
        san: "DNS:bench.test",
    };
    openssl::make(dir, &[leaf("rsa2048", false), leaf("p256", true)])
}

fn configs(
    dir: &Path,
    key: &str,
    provider: Provider,
) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let chain = CertificateDer::pem_file_iter(dir.join(format!("{key}.pem")))
        .map_err(|e| err(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(&e))?;
    let private =
        PrivateKeyDer::from_pem_file(dir.join(format!("{key}.key"))).map_err(|e| err(&e))?;
    let server = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&e))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| err(&e))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(dir.join("ca.pem")).map_err(|e| err(&e))? {
        roots.add(ca.map_err(|e| err(&e))?).map_err(|e| err(&e))?;
    }
    let client = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((Arc::new(server), Arc::new(client)))
}

/// µs of CPU per handshake, server side and client side.
fn measure(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
    resumed: bool,
) -> Result<(f64, f64), String> {
    let mut client = (**client).clone();
    if !resumed {
        client.resumption = Resumption::disabled();
    }
    let client = Arc::new(client);
    let mut times = (Duration::ZERO, Duration::ZERO);
    // One untimed handshake: it leaves the ticket the resumed ones use.
    handshake(server, &client, &mut (Duration::ZERO, Duration::ZERO))?;
    for _ in 0..COUNT {
        handshake(server, &client, &mut times)?;
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(COUNT);
    Ok((per(times.0), per(times.1)))
}

/// One handshake, messages passed in memory; adds each side's time to `times`.
fn handshake(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
    times: &mut (Duration, Duration),
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let name = ServerName::try_from("bench.test").map_err(|e| err(&e))?;
    let t = Instant::now();
    let mut c = ClientConnection::new(client.clone(), name).map_err(|e| err(&e))?;
    times.1 += t.elapsed();
    let t = Instant::now();
    let mut s = ServerConnection::new(server.clone()).map_err(|e| err(&e))?;
    times.0 += t.elapsed();
    let mut buf = Vec::new();
    for _ in 0..10 {
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(());
        }
        let t = Instant::now();
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).map_err(|e| err(&e))?;
        }
        times.1 += t.elapsed();
        let t = Instant::now();
        feed(&buf, &mut s)?;
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).map_err(|e| err(&e))?;
        }
        times.0 += t.elapsed();
        let t = Instant::now();
        feed(&buf, &mut c)?;
        times.1 += t.elapsed();
    }
    Err("the handshake did not finish in 10 flights".into())
}

/// Hands all of `bytes` to a connection, processing as it goes.
fn feed<D>(mut bytes: &[u8], conn: &mut rustls::ConnectionCommon<D>) -> Result<(), String> {
    while !bytes.is_empty() {
        conn.read_tls(&mut bytes).map_err(|e| e.to_string())?;
        conn.process_new_packets().map_err(|e| e.to_string())?;
    }
    Ok(())
}
