//! TLS between the hosts of a domain or a redundant pair (Raft, pair and forwarded
//! requests): whom a host trusts as its peer, the certificate it shows as a client (mutual
//! TLS), and what the listener learned of a client's certificate.
//!
//! A peer's certificate is trusted by one of:
//! - **pins** (`peer_pins`): the SHA-256 of the peer's certificate is one of the listed
//!   fingerprints. The handshake's signature is still checked; the chain and the name are
//!   not (the pin names the exact certificate). With a CA as well, both must hold.
//! - **the domain's CA** (`tls_ca`): the chain leads to exactly that CA (not the system's
//!   roots: a certificate any public CA signed for the name is not a peer).
//! - otherwise the system's roots (a site PKI whose CA the system trusts).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};

use crate::{ServerTls, TlsError, provider, read_certificates};

/// A certificate's fingerprint as `peer_pins` lists it: SHA-256 of its DER, lower-case hex.
pub fn fingerprint(certificate: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(certificate.as_ref()))
}

/// The fingerprint of the first certificate of a PEM file (a server's `server.pem`).
pub fn fingerprint_file(path: &Path) -> Result<String, TlsError> {
    let certificates = read_certificates(path)?;
    Ok(fingerprint(&certificates[0]))
}

/// A pin as written in the config: 64 hex digits, optionally prefixed `sha256:` and with
/// `:` between bytes (as `openssl x509 -fingerprint -sha256` prints it).
pub fn parse_pin(text: &str) -> Result<[u8; 32], String> {
    let trimmed = text.trim();
    let hex_digits: String = trimmed
        .strip_prefix("sha256:")
        .or_else(|| trimmed.strip_prefix("SHA256:"))
        .unwrap_or(trimmed)
        .chars()
        .filter(|c| *c != ':')
        .collect();
    let bytes = hex::decode(&hex_digits)
        .map_err(|_| format!("peer pin {text:?} is not hex (expected a SHA-256 fingerprint)"))?;
    bytes.try_into().map_err(|_| {
        format!("peer pin {text:?} is not 32 bytes (expected a SHA-256 fingerprint: 64 hex digits)")
    })
}

/// The rustls client configuration a host uses to reach its peers: trust as the module says,
/// and, when `identity` is given, this host's own certificate shown for mutual TLS (the
/// current one: reloads apply).
pub fn peer_client_config(
    ca: Option<&Path>,
    pins: &[[u8; 32]],
    identity: Option<Arc<ServerTls>>,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let chain: Option<Arc<dyn ServerCertVerifier>> = match ca {
        Some(ca) => {
            let roots = root_store(ca)?;
            Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Other(format!("{}: {e}", ca.display())))?,
            )
        }
        None if pins.is_empty() => Some(Arc::new(
            rustls_platform_verifier::Verifier::new(provider.clone())
                .map_err(|e| TlsError::Other(format!("the system's roots: {e}")))?,
        )),
        None => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = if pins.is_empty() {
        chain.expect("a chain verifier without pins")
    } else {
        Arc::new(PinnedVerifier {
            pins: pins.to_vec(),
            chain,
            provider: provider.clone(),
        })
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Other(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(identity) => builder.with_client_cert_resolver(identity),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn root_store(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in read_certificates(ca)? {
        roots
            .add(certificate)
            .map_err(|e| crate::invalid(ca, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

impl ServerTls {
    /// An acceptor that also asks clients for a certificate from `ca` (mutual TLS between
    /// peers). A client without one is still served (stations, administrators); the
    /// connection's [`Client::certified`] says whether it showed a valid one, and the peer
    /// routes refuse those that did not.
    pub fn acceptor_asking_certificates(
        self: &Arc<Self>,
        ca: &Path,
    ) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(root_store(ca)?),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Other(format!("{}: {e}", ca.display())))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Other(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

impl ResolvesClientCert for ServerTls {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Trusts a server whose certificate's SHA-256 is pinned (and, with a CA, whose chain also
/// verifies); checks the handshake's signatures with the provider's algorithms.
#[derive(Debug)]
struct PinnedVerifier {
    pins: Vec<[u8; 32]>,
    chain: Option<Arc<dyn ServerCertVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if !self.pins.contains(&digest) {
            return Err(rustls::Error::General(format!(
                "the peer's certificate (sha256 {}) is not one of peer_pins",
                hex::encode(digest)
            )));
        }
        if let Some(chain) = &self.chain {
            chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        }
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What a connection tells the routes about its client (axum connect info): the address,
/// and whether it showed a certificate the listener verified (mutual TLS).
#[derive(Clone, Copy, Debug)]
pub struct Client {
    pub addr: SocketAddr,
    pub certified: bool,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, crate::TlsListener>>
    for Client
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, crate::TlsListener>) -> Client {
        Client {
            addr: *stream.remote_addr(),
            certified: stream.io().get_ref().1.peer_certificates().is_some(),
        }
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>>
    for Client
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Client {
        Client {
            addr: *stream.remote_addr(),
            certified: false,
        }
    }
}

/// A connection to a peer: plain TCP, or TLS over it.
pub enum PeerStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl PeerStream {
    /// Opens TLS over `stream` to `host` (a name or an address, as in the peer's URL).
    pub async fn tls(
        connector: &tokio_rustls::TlsConnector,
        host: &str,
        stream: TcpStream,
    ) -> std::io::Result<PeerStream> {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let name = ServerName::try_from(bare.to_string()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{host}: not a host name or address: {e}"),
            )
        })?;
        Ok(PeerStream::Tls(Box::new(
            connector.connect(name, stream).await?,
        )))
    }
}

impl tokio::io::AsyncRead for PeerStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            PeerStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for PeerStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            PeerStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            PeerStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            PeerStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
