//! TLS for Tessera (rustls with the ring provider only).
//!
//! - **Serving**: [`ServerTls`] loads a PEM certificate chain and key, and reloads them
//!   without a restart when the files change or the process gets SIGHUP. [`TlsListener`]
//!   wraps a TCP listener for `axum::serve`. Handshakes run in their own tasks, with a
//!   timeout and a bound on how many are in flight, so a slow or silent client delays nobody
//!   else.
//! - **Clients**: [`client_builder`] gives a `reqwest` builder that trusts the system's roots
//!   plus, if given, a site CA (`--ca FILE` / `TESSERA_CA`).
//! - **A private CA**: [`init`] writes `ca.pem`, `ca.key`, `server.pem` and `server.key` for a
//!   list of names and addresses (`tessera tls init`), for sites without a PKI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

mod peer;
pub use peer::{Client, PeerStream, fingerprint, fingerprint_file, parse_pin, peer_client_config};
pub use {rustls, tokio_rustls};

/// The environment variable naming a site CA for clients (like `--ca`).
pub const CA_ENV: &str = "TESSERA_CA";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error("TLS: {0}")]
    Other(String),
}

fn invalid(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Installs rustls's ring provider as the process default (once; later calls do nothing).
/// Every process that makes an HTTP client calls this first: reqwest is built without a
/// provider of its own (no aws-lc), and panics building a client without one.
pub fn install() {
    provider();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let provider = rustls::crypto::ring::default_provider();
            // reqwest (built without a provider of its own) uses the process default.
            let _ = provider.clone().install_default();
            Arc::new(provider)
        })
        .clone()
}

// ---- clients ----

/// The CA file a client should trust besides the system roots: `ca`, else `$TESSERA_CA`.
pub fn ca_file(ca: Option<&Path>) -> Option<PathBuf> {
    ca.map(Path::to_path_buf).or_else(|| {
        std::env::var_os(CA_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
}

/// Reads the certificates of a PEM file (a CA, or a bundle of them).
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let certificates = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("not a PEM certificate file: {e}")))?;
    if certificates.is_empty() {
        return Err(invalid(path, "no certificate in the file (expected PEM)"));
    }
    Ok(certificates)
}

/// A `reqwest` client builder speaking HTTPS with rustls (ring): the system's roots, plus the
/// CA in `ca` (else `$TESSERA_CA`) when there is one.
pub fn client_builder(ca: Option<&Path>) -> Result<reqwest::ClientBuilder, TlsError> {
    client_builder_exactly(ca_file(ca).as_deref())
}

/// [`client_builder`] trusting the system's roots plus exactly `ca` (the environment is not
/// read).
pub fn client_builder_exactly(ca: Option<&Path>) -> Result<reqwest::ClientBuilder, TlsError> {
    provider();
    let mut builder = reqwest::Client::builder().tls_backend_rustls();
    if let Some(path) = ca.map(Path::to_path_buf) {
        let text = std::fs::read(&path).map_err(|e| TlsError::Read {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let certificates = reqwest::Certificate::from_pem_bundle(&text)
            .map_err(|e| invalid(&path, format!("not a PEM certificate file: {e}")))?;
        if certificates.is_empty() {
            return Err(invalid(&path, "no certificate in the file (expected PEM)"));
        }
        builder = builder.tls_certs_merge(certificates);
    }
    Ok(builder)
}

// ---- serving ----

/// A certificate and key loaded from PEM files, reloaded when they change.
#[derive(Debug)]
pub struct ServerTls {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Loaded>,
    /// The files' times when they last failed to load (said once, not every look).
    failed: std::sync::Mutex<Option<(Option<SystemTime>, Option<SystemTime>)>>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    modified: (Option<SystemTime>, Option<SystemTime>),
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load(cert_path: &Path, key_path: &Path) -> Result<Loaded, TlsError> {
    let modified = (modified(cert_path), modified(key_path));
    let chain = read_certificates(cert_path)?;
    let key_text = std::fs::read(key_path).map_err(|e| TlsError::Read {
        path: key_path.to_path_buf(),
        message: e.to_string(),
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key_text)
        .map_err(|e| invalid(key_path, format!("not a PEM private key: {e}")))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| invalid(key_path, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        invalid(
            key_path,
            format!("the key does not match {}: {e}", cert_path.display()),
        )
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        modified,
    })
}

impl ServerTls {
    /// Loads the certificate chain (`cert`, PEM: the server's certificate first) and its key.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerTls>, TlsError> {
        let loaded = load(cert, key)?;
        Ok(Arc::new(ServerTls {
            cert_path: cert.to_path_buf(),
            key_path: key.to_path_buf(),
            current: RwLock::new(loaded),
            failed: std::sync::Mutex::new(None),
        }))
    }

    /// Loads the files again if they changed since the last load (or if `force`). A new
    /// pair that does not load (half written, key and certificate not matching) is
    /// reported and the current one kept. Returns whether a new pair is in use.
    pub fn reload(&self, force: bool) -> bool {
        let stamps = (modified(&self.cert_path), modified(&self.key_path));
        let unchanged = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .modified
            == stamps;
        let failed_before = *self.failed.lock().unwrap_or_else(|e| e.into_inner()) == Some(stamps);
        if !force && (unchanged || failed_before) {
            return false;
        }
        match load(&self.cert_path, &self.key_path) {
            Ok(loaded) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = loaded;
                *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = None;
                tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded");
                true
            }
            Err(error) => {
                *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(stamps);
                tracing::warn!(%error, "TLS certificate not reloaded: the current one stays in use");
                false
            }
        }
    }

    /// Reloads on SIGHUP, and when the files change (looked at every `every`), until the
    /// returned task is aborted.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let tls = self.clone();
        // Registered before returning: a SIGHUP from now on reloads, never kills the process.
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        tokio::spawn(async move {
            loop {
                #[cfg(unix)]
                let forced = match hangup.as_mut() {
                    Some(signal) => tokio::select! {
                        _ = signal.recv() => true,
                        _ = tokio::time::sleep(every) => false,
                    },
                    None => {
                        tokio::time::sleep(every).await;
                        false
                    }
                };
                #[cfg(not(unix))]
                let forced = {
                    tokio::time::sleep(every).await;
                    false
                };
                tls.reload(forced);
            }
        })
    }

    /// An acceptor serving the current certificate at each handshake (HTTP/1.1).
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Other(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

impl ServerTls {
    /// The certificate and key in use now.
    fn current_key(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .key
            .clone()
    }
}

impl ResolvesServerCert for ServerTls {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current_key())
    }
}

/// How long a client has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many handshakes in flight; a connection beyond it is closed at once (the
/// accept loop never waits, so silent connections cannot stop others from connecting).
pub const HANDSHAKES_MAX: usize = 256;
/// At most this many handshakes in flight from one address (an IPv6 /64 counts as one).
pub const HANDSHAKES_PER_ADDRESS_MAX: usize = 8;

/// The address a limit applies to: IPv4 (or IPv4-mapped IPv6) as is, IPv6 by its /64.
pub fn address_group(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            let segments = v6.segments();
            std::net::IpAddr::V6(std::net::Ipv6Addr::new(
                segments[0],
                segments[1],
                segments[2],
                segments[3],
                0,
                0,
                0,
                0,
            ))
        }
        v4 => v4,
    }
}

/// A TCP listener whose connections are TLS, for `axum::serve`.
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (sender, accepted) = mpsc::channel(64);
        let task = tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(HANDSHAKES_MAX));
            let per_address: Arc<
                std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
            > = Arc::default();
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of descriptors, say: wait a little, as axum does.
                        tracing::debug!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, "too many TLS handshakes in flight: connection closed");
                    continue;
                };
                let group = address_group(peer.ip());
                {
                    let mut counts = per_address.lock().unwrap_or_else(|e| e.into_inner());
                    let count = counts.entry(group).or_default();
                    if *count >= HANDSHAKES_PER_ADDRESS_MAX {
                        tracing::debug!(%peer, "too many TLS handshakes from this address: connection closed");
                        continue;
                    }
                    *count += 1;
                }
                let (acceptor, sender) = (acceptor.clone(), sender.clone());
                let per_address = per_address.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let _counted = Counted(per_address, group);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = sender.send((tls, peer)).await;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            accepted,
            local,
            task,
        })
    }
}

/// One handshake in flight from an address, for as long as it lives.
struct Counted(
    Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    std::net::IpAddr,
);

impl Drop for Counted {
    fn drop(&mut self) {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.1) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.1);
            }
        }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accept loop ended (the runtime is shutting down): accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

// ---- a private CA ----

/// What [`init`] wrote.
#[derive(Debug)]
pub struct Written {
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How long the private CA and a server certificate are valid.
pub const CA_VALID_DAYS: i64 = 3650;
pub const SERVER_VALID_DAYS: i64 = 825;

/// Makes a private CA (or reuses the one in `out`: `ca.pem` and `ca.key`) and a server
/// certificate for `names` (host names and IP addresses) signed by it: writes `ca.pem`,
/// `ca.key`, `server.pem` (the certificate, then the CA) and `server.key`, the keys readable
/// by their owner only. Clients trust `ca.pem` (`--ca`).
pub fn init(out: &Path, names: &[String]) -> Result<Written, TlsError> {
    init_as(out, names, "server")
}

/// [`init`] writing the certificate and key as `{stem}.pem` and `{stem}.key` (one per host
/// of a domain, all from the same CA: `tessera tls init --cert-name host2`).
pub fn init_as(out: &Path, names: &[String], stem: &str) -> Result<Written, TlsError> {
    if stem.is_empty()
        || stem == "ca"
        || !stem
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        || stem.starts_with('.')
    {
        return Err(TlsError::Other(format!(
            "certificate name {stem:?}: use letters, digits, '-', '_' or '.' (not \"ca\")"
        )));
    }
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let names: Vec<String> = names
        .iter()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() {
        return Err(TlsError::Other(
            "name at least one host name or address the server is reached by (--name)".into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| TlsError::Write {
        path: out.to_path_buf(),
        message: e.to_string(),
    })?;
    let other = |e: rcgen::Error| TlsError::Other(e.to_string());
    let days = |n: i64| {
        let at = jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::from_hours(24 * n))
            .expect("a date in range")
            .to_zoned(jiff::tz::TimeZone::UTC);
        rcgen::date_time_ymd(i32::from(at.year()), at.month() as u8, at.day() as u8)
    };
    let ca_pem_path = out.join("ca.pem");
    let ca_key_path = out.join("ca.key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(other)?;
    // Reusing a CA: only its name, key usages and key matter for issuing.
    // Signs server certificates only, never another CA.
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Tessera private CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = days(-1);
    ca_params.not_after = days(CA_VALID_DAYS);
    if ca_pem_path.exists() != ca_key_path.exists() {
        return Err(TlsError::Other(format!(
            "{} has one of ca.pem and ca.key without the other: give both (to keep the CA clients trust) or neither (a new CA)",
            out.display()
        )));
    }
    let (ca_pem, ca_key) = if ca_pem_path.exists() {
        let key_text = std::fs::read_to_string(&ca_key_path).map_err(|e| TlsError::Read {
            path: ca_key_path.clone(),
            message: e.to_string(),
        })?;
        let key = KeyPair::from_pem(&key_text).map_err(|e| invalid(&ca_key_path, e))?;
        let pem = std::fs::read_to_string(&ca_pem_path).map_err(|e| TlsError::Read {
            path: ca_pem_path.clone(),
            message: e.to_string(),
        })?;
        // The issuer is named as every Tessera private CA is; its key identifies it, and must
        // be the key of the certificate clients trust.
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| invalid(&ca_pem_path, format!("not a PEM certificate: {e}")))?;
        let public = key.public_key_raw();
        if !der.windows(public.len()).any(|window| window == public) {
            return Err(invalid(&ca_key_path, "this is not the key of ca.pem"));
        }
        (pem, key)
    } else {
        let key = KeyPair::generate().map_err(other)?;
        let cert = ca_params.self_signed(&key).map_err(other)?;
        (cert.pem(), key)
    };
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::new(names.clone()).map_err(other)?;
    params
        .distinguished_name
        .push(DnType::CommonName, names[0].clone());
    // Client authentication too: the hosts of a domain show these certificates to each other
    // (mutual TLS, `peer_mtls`).
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = days(-1);
    params.not_after = days(SERVER_VALID_DAYS);
    let key = KeyPair::generate().map_err(other)?;
    let cert = params.signed_by(&key, &issuer).map_err(other)?;
    let written = Written {
        ca: ca_pem_path,
        ca_key: ca_key_path,
        cert: out.join(format!("{stem}.pem")),
        key: out.join(format!("{stem}.key")),
    };
    write(&written.ca, &ca_pem, false)?;
    write(&written.ca_key, &issuer.key().serialize_pem(), true)?;
    // The key first: a server reloading between the two writes then sees a pair that does
    // not match, and keeps the one it has until both are there.
    write(&written.key, &key.serialize_pem(), true)?;
    write(&written.cert, &format!("{}{ca_pem}", cert.pem()), false)?;
    Ok(written)
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), TlsError> {
    use std::io::Write;
    let failed = |e: std::io::Error| TlsError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    // A fresh file of our own (never one left or planted there), owner-only from the start.
    let temporary = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options.open(&temporary).map_err(failed)?;
    file.write_all(text.as_bytes()).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    std::fs::rename(&temporary, path).map_err(failed)
}
