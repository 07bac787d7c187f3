//! TLS for unimic endpoints: a development mode (self-signed certificate, pinned by the client by
//! the SHA-256 of its DER encoding) and a production mode (PEM certificate chain and key, normal
//! WebPKI verification against a root store), with optional client certificates.
//!
//! Everything here runs TLS 1.3 only (QUIC requires it) with rustls' `ring` provider and the ALPN
//! protocol [`ALPN`].
//!
//! # Security
//! Pinning trusts exactly the certificates whose hashes the client was given, whatever their
//! names, issuers or validity dates: it is meant for development and for deployments that
//! distribute the hash out of band. A pinned certificate whose private key leaks cannot be
//! revoked; rotate the pin.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The ALPN protocol identifier of unimic version 1.
pub const ALPN: &[u8] = b"unimic/1";

/// Why a TLS configuration could not be built.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Generating a self-signed certificate failed.
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file could not be read or parsed.
    #[error("reading PEM file {path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A PEM file held no certificate (or no private key).
    #[error("PEM file {path} holds no {what}")]
    Empty {
        /// The file.
        path: PathBuf,
        /// `"certificate"` or `"private key"`.
        what: &'static str,
    },
    /// rustls refused the configuration (bad key, unsupported algorithm, ...).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A verifier could not be built from the given roots.
    #[error("certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// A root certificate was rejected.
    #[error("root certificate rejected: {0}")]
    Root(String),
    /// A configuration asks for something impossible (e.g. client auth without roots).
    #[error("invalid TLS configuration: {0}")]
    Invalid(&'static str),
    /// quinn refused the rustls configuration (no TLS 1.3 initial cipher suite).
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
}

/// The SHA-256 of a certificate's DER encoding, used to pin a server certificate.
///
/// Displayed and parsed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertHash(pub [u8; 32]);

impl CertHash {
    /// Hashes a DER-encoded certificate.
    pub fn of(cert: &CertificateDer<'_>) -> Self {
        Self(Sha256::digest(cert.as_ref()).into())
    }
}

impl fmt::Display for CertHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CertHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertHash({self})")
    }
}

/// A [`CertHash`] string was not 64 hex digits.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("a certificate hash is 64 hex digits")]
pub struct ParseCertHashError;

impl FromStr for CertHash {
    type Err = ParseCertHashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != 64 || !s.is_ascii() {
            return Err(ParseCertHashError);
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            let pair = s.get(2 * i..2 * i + 2).ok_or(ParseCertHashError)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| ParseCertHashError)?;
        }
        Ok(Self(out))
    }
}

/// A certificate chain with its private key.
#[derive(Debug)]
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// An identity from DER certificates (leaf first) and a DER private key.
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        if chain.is_empty() {
            return Err(TlsError::Invalid(
                "an identity needs at least one certificate",
            ));
        }
        Ok(Self { chain, key })
    }

    /// Reads a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let chain = read_pem_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, e))?;
        Self::from_der(chain, key)
    }

    /// Parses a PEM certificate chain and private key held in memory.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let here = Path::new("<memory>");
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error(here, e))?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| pem_error(here, e))?;
        Self::from_der(chain, key)
    }

    /// A fresh self-signed certificate for `names` (DNS names or IP addresses), for development.
    pub fn self_signed<S: Into<String> + Clone>(names: &[S]) -> Result<Self, TlsError> {
        let names: Vec<String> = names.iter().cloned().map(Into::into).collect();
        let certified = rcgen::generate_simple_self_signed(names)?;
        let key = PrivateKeyDer::try_from(certified.signing_key.serialize_der())
            .map_err(|e| TlsError::Root(e.to_string()))?;
        Self::from_der(vec![certified.cert.der().clone()], key)
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        // `from_der` guarantees a non-empty chain.
        &self.chain[0]
    }

    /// The whole chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The SHA-256 of the leaf certificate: what a client pins.
    pub fn cert_hash(&self) -> CertHash {
        CertHash::of(self.leaf())
    }
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    TlsError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Trust anchors (root certificates) for WebPKI verification.
#[derive(Debug, Clone, Default)]
pub struct Roots {
    certs: Vec<CertificateDer<'static>>,
}

impl Roots {
    /// Roots from DER certificates.
    pub fn from_der(certs: Vec<CertificateDer<'static>>) -> Self {
        Self { certs }
    }

    /// Roots read from a PEM file holding one or more certificates.
    pub fn from_pem_file(path: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            certs: read_pem_certs(path)?,
        })
    }

    /// Adds a root.
    pub fn push(&mut self, cert: CertificateDer<'static>) {
        self.certs.push(cert);
    }

    fn store(&self) -> Result<Arc<RootCertStore>, TlsError> {
        if self.certs.is_empty() {
            return Err(TlsError::Invalid("no root certificates given"));
        }
        let mut store = RootCertStore::empty();
        for c in &self.certs {
            store
                .add(c.clone())
                .map_err(|e| TlsError::Root(e.to_string()))?;
        }
        Ok(Arc::new(store))
    }
}

/// Whether the server asks clients for certificates.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum ClientAuth {
    /// No client certificates (authentication by bearer token only).
    #[default]
    None,
    /// Clients may present a certificate; if they do it must chain to these roots.
    Optional(Roots),
    /// Clients must present a certificate chaining to these roots.
    Required(Roots),
}

/// The server side of TLS.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerTls {
    /// The server's certificate chain and key.
    pub identity: Identity,
    /// Client certificate policy.
    pub client_auth: ClientAuth,
}

impl ServerTls {
    /// Development mode: a fresh self-signed certificate for `localhost`, `127.0.0.1` and `::1`.
    /// Give clients [`Identity::cert_hash`] of [`ServerTls::identity`] to pin.
    pub fn self_signed() -> Result<Self, TlsError> {
        Ok(Self::new(Identity::self_signed(&[
            "localhost",
            "127.0.0.1",
            "::1",
        ])?))
    }

    /// Production mode: a PEM certificate chain and key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Self::new(Identity::from_pem_files(cert, key)?))
    }

    /// A server presenting `identity`, without client certificates.
    pub fn new(identity: Identity) -> Self {
        Self {
            identity,
            client_auth: ClientAuth::None,
        }
    }

    /// Sets the client certificate policy.
    pub fn with_client_auth(mut self, client_auth: ClientAuth) -> Self {
        self.client_auth = client_auth;
        self
    }

    /// The quinn crypto configuration (TLS 1.3, ALPN `unimic/1`), for raw quinn endpoints such
    /// as test peers and benchmark baselines.
    pub fn quic_config(&self) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
        let provider = provider();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let builder = match &self.client_auth {
            ClientAuth::None => builder.with_no_client_auth(),
            ClientAuth::Optional(roots) => builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.store()?,
                    provider,
                )
                .allow_unauthenticated()
                .build()?,
            ),
            ClientAuth::Required(roots) => builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.store()?,
                    provider,
                )
                .build()?,
            ),
        };
        let mut config =
            builder.with_single_cert(self.identity.chain.clone(), self.identity.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.max_early_data_size = 0;
        quinn::crypto::rustls::QuicServerConfig::try_from(config)
            .map_err(|e| TlsError::Quic(e.to_string()))
    }
}

/// How a client decides to trust the server.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ServerVerification {
    /// Development mode: trust exactly the certificates with these hashes (see the module's
    /// Security section). Names and dates are not checked.
    Pinned(Vec<CertHash>),
    /// Production mode: WebPKI verification (chain to these roots, name, validity dates).
    WebPki(Roots),
}

/// The client side of TLS.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientTls {
    /// How the server is verified.
    pub verification: ServerVerification,
    /// A client certificate to present, if the server asks.
    pub identity: Option<Identity>,
}

impl ClientTls {
    /// Pins the server certificate whose DER SHA-256 is `hash`.
    pub fn pinned(hash: CertHash) -> Self {
        Self {
            verification: ServerVerification::Pinned(vec![hash]),
            identity: None,
        }
    }

    /// Verifies the server against `roots` (production mode).
    pub fn webpki(roots: Roots) -> Self {
        Self {
            verification: ServerVerification::WebPki(roots),
            identity: None,
        }
    }

    /// Presents `identity` as the client certificate.
    pub fn with_identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// The quinn crypto configuration (TLS 1.3, ALPN `unimic/1`), for raw quinn endpoints such
    /// as test peers and benchmark baselines.
    pub fn quic_config(&self) -> Result<quinn::crypto::rustls::QuicClientConfig, TlsError> {
        let provider = provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let builder = match &self.verification {
            ServerVerification::Pinned(hashes) => {
                if hashes.is_empty() {
                    return Err(TlsError::Invalid("pinning needs at least one hash"));
                }
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                        hashes: hashes.clone(),
                        provider,
                    }))
            }
            ServerVerification::WebPki(roots) => builder.with_root_certificates(roots.store()?),
        };
        let mut config = match &self.identity {
            Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.enable_early_data = false;
        quinn::crypto::rustls::QuicClientConfig::try_from(config)
            .map_err(|e| TlsError::Quic(e.to_string()))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts exactly the server certificates whose SHA-256 is pinned; still verifies the handshake
/// signatures against the certificate's key, so the peer must hold the private key.
#[derive(Debug)]
struct PinnedVerifier {
    hashes: Vec<CertHash>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = CertHash::of(end_entity);
        // Hashes are public values; a plain comparison leaks nothing secret.
        if self.hashes.contains(&got) {
            Ok(ServerCertVerified::assertion())
        } else {
            tracing::warn!(%got, "server certificate does not match the pinned hash");
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
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

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_hash_round_trips_through_hex() {
        let id = Identity::self_signed(&["localhost"]).unwrap();
        let h = id.cert_hash();
        let s = h.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<CertHash>().unwrap(), h);
        assert!("zz".parse::<CertHash>().is_err());
        assert!(s[..63].parse::<CertHash>().is_err());
    }

    #[test]
    fn configs_build() {
        let server = ServerTls::self_signed().unwrap();
        server.quic_config().unwrap();
        ClientTls::pinned(server.identity.cert_hash())
            .quic_config()
            .unwrap();
        assert!(matches!(
            ClientTls::webpki(Roots::default()).quic_config(),
            Err(TlsError::Invalid(_))
        ));
    }
}
