//! TLS: listeners' certificates, upstreams' trust (roots, names, client certificates), the
//! handshakes with clients and with servers, and `Tls<S>`, the stream a TLS connection is
//! read and written through, whichever side it faces.
//!
//! `Tls<S>` is a `close::Socket` like a plain socket, so `Tracked` closes TLS connections by
//! the same policy: its `poll_close_notify` sends the alert before any close, and its reads
//! report the end only at the peer's TCP FIN — a close_notify alone is not a FIN, and a
//! close that followed it at once would put TIME_WAIT on waitless. A FIN without close_notify
//! ends the stream too (many clients never send one), and is noted (`unclean`).

use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, HandshakeKind, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::close::Socket;

/// A certificate chain and its key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// A listener's TLS: the files as configured and the server config loaded from them.
#[derive(Clone)]
pub struct ServerTls {
    /// The certificates, the first the default for clients whose SNI names none of them.
    pub files: Vec<CertFiles>,
    /// What handshakes are made with.
    pub config: Arc<ServerConfig>,
}

/// An upstream's TLS as written: `tls = { ca, server_name, verify, cert, key }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTlsFiles {
    /// PEM roots to trust; None: the system's.
    pub ca: Option<PathBuf>,
    /// The name sent as SNI and verified; None: the host part of each server as written.
    pub server_name: Option<String>,
    /// Verify the server's certificate (default true).
    pub verify: bool,
    /// A client certificate, for servers that ask for one.
    pub client: Option<CertFiles>,
}

/// An upstream's TLS, loaded: one client config for all its servers, so that its session
/// store (rustls' in-memory cache, the default resumption) lets every new connection resume.
#[derive(Clone)]
pub struct ClientTls {
    /// As written.
    pub files: UpstreamTlsFiles,
    /// What handshakes are made with.
    pub config: Arc<ClientConfig>,
    /// The name each server is verified by, by its resolved address.
    names: Vec<(crate::config::Address, ServerName<'static>)>,
    /// A digest of the files' contents: a reload that finds them unchanged keeps the pool
    /// and its warm connections; one that finds them changed builds a new one.
    digest: u64,
}

/// Why a handshake failed, as counted in /metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    /// Not finished within `header_timeout`.
    Timeout,
    /// The client closed (or reset) before it was done.
    Eof,
    /// The client offered no protocol the listener speaks (ALPN, e.g. only `h2`).
    NoProtocol,
    /// The client's first byte does not start a TLS handshake (plain HTTP on a TLS port):
    /// closed without an answer, which it could not read.
    NotTls,
    /// What the client sent was not TLS, or not TLS waitless accepts.
    Protocol,
    /// The server's certificate failed verification (upstreams).
    Certificate,
}

/// Counters of one side's handshakes.
#[derive(Debug, Default)]
pub struct TlsStats {
    /// Handshakes completed.
    pub handshakes: AtomicU64,
    /// Of those, resumed from an earlier session: no certificate signed, sent or checked.
    pub resumed: AtomicU64,
    /// Handshakes failed, by `HandshakeError` (in its order).
    pub errors: [AtomicU64; HandshakeError::ALL.len()],
}

/// Picks a certificate by the client's SNI; the first one when none matches or none is sent.
#[derive(Debug)]
struct BySni {
    /// The certificates, in the configured order.
    keys: Vec<Arc<CertifiedKey>>,
}

/// A socket whose reads and writes fail with TimedOut once its timer runs out: how a
/// handshake is bounded and still gives its socket back (tokio-rustls returns it only with an
/// error of the socket's own). The timer is dropped when the handshake is done.
struct Deadline<S> {
    /// The socket.
    io: S,
    /// Runs out at the handshake's deadline; None after it.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// A TLS connection over `S`, as a `close::Socket`.
pub struct Tls<S> {
    /// The TLS session and the socket under it.
    inner: tokio_rustls::TlsStream<Deadline<S>>,
    /// Plaintext that `poll_readable` read ahead of the protocol, handed out first.
    ahead: Vec<u8>,
    /// Where the unread part of `ahead` starts.
    ahead_at: usize,
    /// The peer sent close_notify: what follows on the socket is read raw, and dropped,
    /// until its FIN.
    notified: bool,
    /// The peer's FIN arrived (with or without close_notify): every read is the end now.
    eof: bool,
    /// The FIN came without close_notify.
    unclean: bool,
}

// === impl CertFiles / ServerTls ===

impl ServerTls {
    /// Loads `files` for a listener speaking `alpn` (empty: no ALPN). Errors name the file.
    pub fn load(files: Vec<CertFiles>, alpn: &[&[u8]]) -> Result<ServerTls, String> {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        // AES-128-GCM-SHA256 first, in the server's order: a short client's resumed
        // handshake is mostly its key schedule's HMACs, and SHA-256 runs on the CPU's SHA
        // extensions where SHA-384 does not (the client's usual first choice, AES-256-GCM-
        // SHA384, spent a fifth of waitless's CPU on short HTTPS clients). It is TLS 1.3's
        // mandatory suite, and what most large sites negotiate.
        provider
            .cipher_suites
            .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let provider = Arc::new(provider);
        let keys = files
            .iter()
            .map(|f| f.load(&provider).map(Arc::new))
            .collect::<Result<Vec<_>, String>>()?;
        if keys.is_empty() {
            return Err("tls needs a certificate: `cert` and `key`, or `certs`".to_string());
        }
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS versions: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(BySni { keys }));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.ignore_client_order = true;
        Ok(ServerTls {
            files,
            config: Arc::new(config),
        })
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl CertFiles {
    /// The chain and key, checked to belong together.
    fn load(&self, provider: &rustls::crypto::CryptoProvider) -> Result<CertifiedKey, String> {
        let chain = CertificateDer::pem_file_iter(&self.cert)
            .map_err(|e| pem_error(&self.cert, "certificate", e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error(&self.cert, "certificate", e))?;
        if chain.is_empty() {
            return Err(format!(
                "{}: no certificate in it (PEM)",
                self.cert.display()
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| pem_error(&self.key, "private key", e))?;
        CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "the key in {} does not belong to the certificate in {}",
                self.key.display(),
                self.cert.display()
            ),
            e => format!("{}: {e}", self.key.display()),
        })
    }
}

impl ClientTls {
    /// Loads `files` for an upstream whose servers are `servers` (written, resolved, in the
    /// same order). Errors name the file.
    pub fn load(
        files: UpstreamTlsFiles,
        servers: &[(crate::config::Endpoint, crate::config::Address)],
    ) -> Result<ClientTls, String> {
        use std::hash::{Hash, Hasher};
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut digest = std::collections::hash_map::DefaultHasher::new();
        let roots = match &files.ca {
            Some(ca) => {
                let pem =
                    std::fs::read(ca).map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
                pem.hash(&mut digest);
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| pem_error(ca, "certificate", e))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("{}: not a CA certificate: {e}", ca.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!("{}: no certificate in it (PEM)", ca.display()));
                }
                roots
            }
            None => system_roots()?,
        };
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS versions: {e}"))?;
        let builder = if files.verify {
            builder.with_root_certificates(roots)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider.clone())))
        };
        let config = match &files.client {
            Some(client) => {
                let key = client.load(&provider)?;
                for path in [&client.cert, &client.key] {
                    std::fs::read(path).unwrap_or_default().hash(&mut digest);
                }
                builder.with_client_cert_resolver(Arc::new(ClientCert(Arc::new(key))))
            }
            None => builder.with_no_client_auth(),
        };
        let names = servers
            .iter()
            .map(|(written, addr)| {
                let name = match (&files.server_name, written) {
                    (Some(name), _) => name.clone(),
                    (None, crate::config::Endpoint::Name { host, .. }) => host.clone(),
                    (None, crate::config::Endpoint::Ip(ip)) => ip.ip().to_string(),
                    // Refused at check for upstream tls (and systemd for any server).
                    (
                        None,
                        crate::config::Endpoint::Unix(_) | crate::config::Endpoint::Systemd(_),
                    ) => "localhost".to_string(),
                };
                ServerName::try_from(name.clone())
                    .map(|n| (addr.clone(), n))
                    .map_err(|_| format!("`{name}` is not a DNS name or IP address"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(ClientTls {
            files,
            config: Arc::new(config),
            names,
            digest: digest.finish(),
        })
    }

    /// The name a server written as `host` is sent as SNI and verified by, whichever of its
    /// addresses it is reached at.
    pub fn name_for_host(&self, host: &str) -> Option<ServerName<'static>> {
        let name = self.files.server_name.as_deref().unwrap_or(host);
        ServerName::try_from(name.to_string()).ok()
    }

    /// The name `addr` is sent as SNI and verified by.
    pub fn name_of(&self, addr: &crate::config::Address) -> Option<ServerName<'static>> {
        self.names
            .iter()
            .find(|(a, _)| a == addr)
            .map(|(_, n)| n.clone())
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &ClientTls) -> bool {
        self.files == other.files && self.names == other.names && self.digest == other.digest
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// The system's trusted roots (rustls-native-certs: the distribution's CA bundle).
fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(format!(
            "no system root certificates found ({} errors); give `ca`",
            found.errors.len()
        ));
    }
    Ok(roots)
}

/// The one client certificate of an upstream, offered whenever a server asks.
#[derive(Debug)]
struct ClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for ClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `verify = false`: any certificate is taken; the handshake's signatures are still checked
/// (the server holds the key of the certificate it sent).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A PEM file's error, naming the file and what was looked for in it.
fn pem_error(path: &Path, what: &str, e: rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(e) => format!("cannot read {}: {e}", path.display()),
        rustls_pki_types::pem::Error::NoItemsFound => {
            format!("{}: no {what} in it (PEM)", path.display())
        }
        e => format!("{}: not a PEM {what}: {e}", path.display()),
    }
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let first = self.keys.first()?;
        if self.keys.len() == 1 {
            return Some(first.clone());
        }
        let Some(name) = hello
            .server_name()
            .and_then(|n| ServerName::try_from(n).ok())
        else {
            return Some(first.clone());
        };
        let valid = |key: &&Arc<CertifiedKey>| {
            key.end_entity_cert()
                .ok()
                .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
                .is_some_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
        };
        Some(self.keys.iter().find(valid).unwrap_or(first).clone())
    }
}

// === impl HandshakeError / TlsStats ===

impl HandshakeError {
    /// Every kind, in the order of `TlsStats::errors`.
    pub const ALL: [HandshakeError; 6] = [
        HandshakeError::Timeout,
        HandshakeError::Eof,
        HandshakeError::NoProtocol,
        HandshakeError::NotTls,
        HandshakeError::Protocol,
        HandshakeError::Certificate,
    ];

    /// The label in /metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeError::Timeout => "timeout",
            HandshakeError::Eof => "eof",
            HandshakeError::NoProtocol => "no_application_protocol",
            HandshakeError::NotTls => "not_tls",
            HandshakeError::Protocol => "protocol",
            HandshakeError::Certificate => "certificate",
        }
    }

    fn of(e: &io::Error) -> HandshakeError {
        let tls = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        match tls {
            Some(rustls::Error::NoApplicationProtocol) => HandshakeError::NoProtocol,
            Some(rustls::Error::InvalidCertificate(_)) => HandshakeError::Certificate,
            Some(_) => HandshakeError::Protocol,
            None if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
            ) =>
            {
                HandshakeError::Eof
            }
            None if e.kind() == io::ErrorKind::TimedOut => HandshakeError::Timeout,
            None if e.kind() == io::ErrorKind::InvalidData => HandshakeError::Protocol,
            None => HandshakeError::Eof,
        }
    }
}

impl TlsStats {
    /// Counts a failed handshake.
    pub fn failed(&self, e: HandshakeError) {
        if let Some(n) = self.errors.get(e as usize) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a completed handshake of `kind`.
    fn completed(&self, kind: Option<HandshakeKind>) {
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        if kind == Some(HandshakeKind::Resumed) {
            self.resumed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Failed handshakes of each kind, with their labels.
    pub fn errors(&self) -> impl Iterator<Item = (HandshakeError, u64)> + '_ {
        HandshakeError::ALL
            .into_iter()
            .zip(&self.errors)
            .map(|(kind, n)| (kind, n.load(Ordering::Relaxed)))
    }
}

/// `{"handshakes": N, "errors": {"timeout": N, ...}}` in /stats.
impl serde::Serialize for TlsStats {
    fn serialize<Z: serde::Serializer>(&self, s: Z) -> Result<Z::Ok, Z::Error> {
        use serde::ser::SerializeStruct;
        let errors: std::collections::BTreeMap<&str, u64> =
            self.errors().map(|(kind, n)| (kind.as_str(), n)).collect();
        let mut out = s.serialize_struct("TlsStats", 3)?;
        out.serialize_field("handshakes", &self.handshakes.load(Ordering::Relaxed))?;
        out.serialize_field("resumed", &self.resumed.load(Ordering::Relaxed))?;
        out.serialize_field("errors", &errors)?;
        out.end()
    }
}

// === the handshake ===

/// Takes a client's TLS handshake on `stream`, within `within`. On failure the stream comes
/// back, for its close to be carried out and recorded (any alert rustls had to send is
/// written first).
pub async fn accept<S: Socket>(
    tls: &ServerTls,
    stream: S,
    within: Duration,
    stats: &TlsStats,
) -> Result<Tls<S>, (HandshakeError, S)> {
    let mut stream = stream;
    let mut timer = Box::pin(tokio::time::sleep(within));
    let first = tokio::select! {
        first = first_byte(&mut stream) => first,
        _ = timer.as_mut() => Err(HandshakeError::Timeout),
    };
    if let Err(e) = first.and_then(|b| match b {
        HANDSHAKE_RECORD => Ok(()),
        _ => Err(HandshakeError::NotTls),
    }) {
        if e == HandshakeError::NotTls {
            // Read what it sent: a socket closed with unread bytes sends RST, not FIN.
            let mut scratch = [0u8; 4096];
            for _ in 0..16 {
                if !matches!(stream.read_now(&mut scratch), Ok(n) if n > 0) {
                    break;
                }
            }
        }
        stats.failed(e);
        return Err((e, stream));
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
    let io = Deadline {
        io: stream,
        timer: Some(timer),
    };
    match acceptor.accept(io).into_fallible().await {
        Ok(mut stream) => {
            stats.completed(stream.get_ref().1.handshake_kind());
            stream.get_mut().0.timer = None;
            Ok(Tls::new(stream.into()))
        }
        Err((e, io)) => {
            let kind = HandshakeError::of(&e);
            stats.failed(kind);
            Err((kind, io.io))
        }
    }
}

/// Makes the TLS handshake with a server on `stream` as `name`, within `within`. On failure
/// the stream comes back with the error (its reason and rustls' words), for its close to be
/// carried out and recorded.
pub async fn connect<S: Socket>(
    tls: &ClientTls,
    name: ServerName<'static>,
    stream: S,
    within: Duration,
    stats: &TlsStats,
) -> Result<Tls<S>, (HandshakeError, io::Error, S)> {
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    let io = Deadline {
        io: stream,
        timer: Some(Box::pin(tokio::time::sleep(within))),
    };
    match connector.connect(name, io).into_fallible().await {
        Ok(mut stream) => {
            stats.completed(stream.get_ref().1.handshake_kind());
            stream.get_mut().0.timer = None;
            Ok(Tls::new(stream.into()))
        }
        Err((e, io)) => {
            let kind = HandshakeError::of(&e);
            stats.failed(kind);
            Err((kind, e, io.io))
        }
    }
}

/// The content type of a TLS handshake record, which every ClientHello starts with.
const HANDSHAKE_RECORD: u8 = 0x16;

/// The client's first byte, left in the socket.
async fn first_byte<S: Socket>(stream: &mut S) -> Result<u8, HandshakeError> {
    std::future::poll_fn(|cx| stream.poll_readable(cx))
        .await
        .map_err(|_| HandshakeError::Eof)?;
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match socket2::SockRef::from(&*stream).peek(&mut byte) {
        // SAFETY: peek wrote the one byte it says it read.
        Ok(1) => Ok(unsafe { byte[0].assume_init() }),
        _ => Err(HandshakeError::Eof),
    }
}

// === impl Deadline ===

impl<S: Socket> Deadline<S> {
    /// Fails once the deadline passed (and has the timer wake the task when it does).
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.timer.as_mut().map(|timer| timer.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake not done in time",
            )),
            _ => Ok(()),
        }
    }
}

impl<S: Socket> AsyncRead for Deadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: Socket> AsyncWrite for Deadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

// === impl Tls ===

impl<S: Socket> Tls<S> {
    fn new(inner: tokio_rustls::TlsStream<Deadline<S>>) -> Tls<S> {
        Tls {
            inner,
            ahead: Vec::new(),
            ahead_at: 0,
            notified: false,
            eof: false,
            unclean: false,
        }
    }

    /// Takes in what an idle connection received unasked (a TLS 1.3 NewSessionTicket is
    /// only bookkeeping; a close_notify or FIN is the server's close): true when nothing is
    /// left that a request would find ahead of its response.
    pub fn settle(&mut self) -> bool {
        if self.ahead_at < self.ahead.len() || self.eof || self.notified {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        Socket::poll_readable(self, &mut cx).is_pending()
    }

    /// Plaintext read ahead and not handed out yet.
    pub fn has_ahead(&self) -> bool {
        self.ahead_at < self.ahead.len()
    }

    /// The socket under the session.
    pub fn tcp(&self) -> &S {
        &self.inner.get_ref().0.io
    }

    /// The peer closed TCP without sending close_notify first.
    pub fn closed_uncleanly(&self) -> bool {
        self.unclean
    }

    /// Reads plaintext, past `ahead`: the end only at the peer's FIN.
    fn poll_plain(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            if self.notified {
                // After close_notify nothing more is plaintext; read on to the FIN.
                let mut scratch = [0u8; 512];
                let mut raw = ReadBuf::new(&mut scratch);
                ready!(Pin::new(&mut *self.inner.get_mut().0).poll_read(cx, &mut raw))?;
                self.eof = raw.filled().is_empty();
                continue;
            }
            let before = buf.filled().len();
            match ready!(Pin::new(&mut self.inner).poll_read(cx, buf)) {
                Ok(()) if buf.filled().len() > before => return Poll::Ready(Ok(())),
                // No plaintext and no error: the peer's close_notify.
                Ok(()) => self.notified = true,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.unclean = true;
                    self.eof = true;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<S> fmt::Debug for Tls<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("notified", &self.notified)
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

impl<S: Socket> AsFd for Tls<S> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.get_ref().0.io.as_fd()
    }
}

impl<S: Socket> AsyncRead for Tls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(ahead) = this.ahead.get(this.ahead_at..).filter(|a| !a.is_empty()) {
            let n = ahead.len().min(buf.remaining());
            buf.put_slice(ahead.get(..n).unwrap_or_default());
            this.ahead_at += n;
            if this.ahead_at == this.ahead.len() {
                this.ahead.clear();
                this.ahead_at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        this.poll_plain(cx, buf)
    }
}

impl<S: Socket> AsyncWrite for Tls<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// close_notify, then the FIN, never waiting for a peer that does not read: the alert
    /// is sent if the socket takes it now.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_close_notify(cx))?;
        Pin::new(&mut this.inner.get_mut().0.io).poll_shutdown(cx)
    }
}

impl<S: Socket> Socket for Tls<S> {
    const IS_TCP: bool = S::IS_TCP;
    const IS_TLS: bool = true;

    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.ahead_at < self.ahead.len() || self.eof {
            return Poll::Ready(Ok(()));
        }
        let mut chunk = [0u8; 2048];
        let mut read = ReadBuf::new(&mut chunk);
        ready!(self.poll_plain(cx, &mut read))?;
        self.ahead.extend_from_slice(read.filled());
        Poll::Ready(Ok(()))
    }

    fn read_now(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // A poll that must not wait: the caller polls again with its own waker before it
        // waits on this socket.
        let mut cx = Context::from_waker(Waker::noop());
        let mut read = ReadBuf::new(buf);
        match Pin::new(self).poll_read(&mut cx, &mut read) {
            Poll::Ready(Ok(())) => Ok(read.filled().len()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Queues close_notify (once) and writes what the socket takes now: a peer that stopped
    /// reading does not hold the close up (its alert is lost, as the rest it did not read).
    fn poll_close_notify(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.get_mut().1.send_close_notify();
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => Poll::Ready(Ok(())),
            done => done,
        }
    }
}
