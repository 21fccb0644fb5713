//! TLS and authentication for the etcd datastore, with Flannel's keys:
//! `etcd-cafile`, `etcd-certfile`, `etcd-keyfile`, `etcd-username`,
//! `etcd-password`.
//!
//! The PEM files are read and checked here (readable, PEM, holding a
//! certificate or a private key that rustls takes), so that a bad file is
//! refused at start with the file and the reason. [`handshake`] makes one
//! TLS connection to an endpoint with the same files before the gRPC client
//! does: a server certificate the CA did not sign, or a client certificate
//! etcd does not trust, is then a refusal naming the key at fault and not a
//! connection that "fails, retry later" forever.
//!
//! Refuses: TLS without a CA file (no system roots: an etcd for a cluster
//! has its own CA), a certificate without its key and the reverse.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How weft checks etcd and proves itself to it. Empty: plain `http://`,
/// no user.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EtcdSecurity {
    /// `etcd-cafile`: the CA that signed etcd's server certificate.
    pub ca_file: Option<PathBuf>,
    /// `etcd-certfile`: the client certificate.
    pub cert_file: Option<PathBuf>,
    /// `etcd-keyfile`: its private key.
    pub key_file: Option<PathBuf>,
    /// `etcd-username`.
    pub username: Option<String>,
    /// `etcd-password`.
    pub password: Option<String>,
}

impl std::fmt::Debug for EtcdSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSecurity")
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "(hidden)"))
            .finish()
    }
}

/// One of the TLS files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    /// `etcd-cafile`.
    Ca,
    /// `etcd-certfile`.
    Cert,
    /// `etcd-keyfile`.
    Key,
}

impl TlsFile {
    /// The config key naming this file.
    pub fn key(self) -> &'static str {
        match self {
            TlsFile::Ca => "etcd-cafile",
            TlsFile::Cert => "etcd-certfile",
            TlsFile::Key => "etcd-keyfile",
        }
    }

    /// What the file must hold.
    pub fn wanted(self) -> &'static str {
        match self {
            TlsFile::Ca => "a PEM file holding the CA certificate that signed etcd's server certificate",
            TlsFile::Cert => "a PEM file holding the client certificate for etcd",
            TlsFile::Key => "a PEM file holding the private key of etcd-certfile",
        }
    }
}

/// Why a TLS file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PemReason {
    /// The file could not be read.
    #[error("unreadable: {0}")]
    Unreadable(#[source] std::io::Error),
    /// The file is not PEM, or a PEM block is broken.
    #[error("not PEM: {0}")]
    NotPem(String),
    /// The file is PEM but holds no certificate.
    #[error("no certificate in it (no -----BEGIN CERTIFICATE----- block)")]
    NoCertificate,
    /// The file is PEM but holds no private key.
    #[error("no private key in it (no -----BEGIN PRIVATE KEY----- block, nor RSA or EC)")]
    NoPrivateKey,
    /// rustls refused the certificate or key it holds.
    #[error("refused by the TLS library: {0}")]
    Refused(#[source] rustls::Error),
}

/// A TLS file refused, with its key, path and reason.
#[derive(Debug, thiserror::Error)]
#[error("{} `{}`: {reason}", file.key(), path.display())]
pub struct TlsFileError {
    /// Which file.
    pub file: TlsFile,
    /// Its path.
    pub path: PathBuf,
    /// Why.
    pub reason: PemReason,
}

/// Why a trial TLS connection to etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The endpoint could not be reached (etcd down): not a TLS verdict.
    #[error("cannot reach {endpoint}: {source}")]
    Unreachable {
        /// The endpoint.
        endpoint: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// No answer in time: not a TLS verdict either.
    #[error("no TLS answer from {endpoint} within {timeout:?}")]
    Timeout {
        /// The endpoint.
        endpoint: String,
        /// The time allowed.
        timeout: Duration,
    },
    /// The endpoint is not `https://host[:port]`.
    #[error("endpoint {0} is not an https://host:port URL")]
    BadEndpoint(String),
    /// The TLS handshake was refused, by this side (the server certificate
    /// does not verify against `etcd-cafile`) or by etcd (it does not take
    /// the client certificate).
    #[error("TLS with {endpoint} refused: {source}")]
    Refused {
        /// The endpoint.
        endpoint: String,
        /// The file at fault.
        file: TlsFile,
        /// rustls's verdict.
        source: rustls::Error,
    },
}

impl EtcdSecurity {
    /// Whether any TLS file is given.
    pub fn tls(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// Reads and checks the TLS files; `None` without TLS.
    pub fn load(&self) -> Result<Option<TlsMaterial>, TlsFileError> {
        if !self.tls() {
            return Ok(None);
        }
        let ca = match &self.ca_file {
            Some(path) => Some(read_certificates(TlsFile::Ca, path)?),
            None => None,
        };
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some((read_certificates(TlsFile::Cert, c)?, read_private_key(k)?)),
            _ => None,
        };
        let material = TlsMaterial { ca, identity };
        // Building the rustls config checks the DER inside: a CA that is not
        // an X.509 certificate, a key type rustls cannot use.
        material.rustls_config(self)?;
        Ok(Some(material))
    }
}

/// The TLS files, read and checked.
pub struct TlsMaterial {
    /// The CA file.
    ca: Option<Certs>,
    /// The client certificate file and key file.
    identity: Option<(Certs, Key)>,
}

/// A certificate file's bytes (for the gRPC client) and certificates.
type Certs = (Vec<u8>, Vec<CertificateDer<'static>>);
/// A key file's bytes and key.
type Key = (Vec<u8>, PrivateKeyDer<'static>);

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// The gRPC client's TLS options, from the same files.
    pub fn tonic_options(&self) -> etcd_client::TlsOptions {
        let mut tls = etcd_client::TlsOptions::new();
        if let Some((pem, _)) = &self.ca {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
        }
        if let Some(((cert, _), (key, _))) = &self.identity {
            tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
        }
        tls
    }

    /// A rustls client config from the files (for [`handshake`]), speaking
    /// HTTP/2 as the gRPC client will.
    pub fn rustls_config(&self, sec: &EtcdSecurity) -> Result<Arc<rustls::ClientConfig>, TlsFileError> {
        let ca_path = sec.ca_file.clone().unwrap_or_default();
        let refused = |file, path: &Option<PathBuf>, e| TlsFileError {
            file,
            path: path.clone().unwrap_or_default(),
            reason: PemReason::Refused(e),
        };
        let mut roots = rustls::RootCertStore::empty();
        if let Some((_, certs)) = &self.ca {
            for c in certs {
                roots.add(c.clone()).map_err(|e| TlsFileError {
                    file: TlsFile::Ca,
                    path: ca_path.clone(),
                    reason: PemReason::Refused(e),
                })?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| refused(TlsFile::Ca, &sec.ca_file, e))?
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some(((_, certs), (_, key))) => builder
                .with_client_auth_cert(certs.clone(), key.clone_key())
                .map_err(|e| refused(TlsFile::Key, &sec.key_file, e))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Makes one TLS connection to `endpoint` (`https://host:port`) with
/// `config`, sends the HTTP/2 preface and waits for etcd's first bytes, all
/// within `timeout`. The read matters: with TLS 1.3 the client's handshake
/// ends before the server has checked the client certificate, and etcd's
/// refusal arrives as an alert on the first read.
pub async fn handshake(
    endpoint: &str,
    config: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<(), HandshakeError> {
    let (host, port) = host_port(endpoint).ok_or_else(|| HandshakeError::BadEndpoint(endpoint.to_string()))?;
    let name = ServerName::try_from(host.to_string()).map_err(|_| HandshakeError::BadEndpoint(endpoint.to_string()))?;
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|source| HandshakeError::Unreachable { endpoint: endpoint.to_string(), source })?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let verdict = |e: std::io::Error, during_read: bool| match tls_error(&e) {
            Some(source) => HandshakeError::Refused {
                endpoint: endpoint.to_string(),
                file: file_at_fault(source, during_read),
                source: source.clone(),
            },
            None => HandshakeError::Unreachable { endpoint: endpoint.to_string(), source: e },
        };
        let mut tls = connector.connect(name, tcp).await.map_err(|e| verdict(e, false))?;
        // HTTP/2 client preface and an empty SETTINGS frame (RFC 9113 3.4,
        // 6.5): etcd answers with its own SETTINGS.
        const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
        tls.write_all(PREFACE).await.map_err(|e| verdict(e, true))?;
        tls.flush().await.map_err(|e| verdict(e, true))?;
        let mut buf = [0u8; 64];
        match tls.read(&mut buf).await {
            Ok(0) => Err(HandshakeError::Unreachable {
                endpoint: endpoint.to_string(),
                source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            }),
            Ok(_) => Ok(()),
            Err(e) => Err(verdict(e, true)),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Timeout { endpoint: endpoint.to_string(), timeout }),
    }
}

/// The rustls error somewhere in `e`'s chain, if any: a TLS verdict rather
/// than a network failure.
pub fn tls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        // io::Error's `source` skips the error it wraps: look inside.
        if let Some(inner) = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(t) = inner.downcast_ref::<rustls::Error>() {
                return Some(t);
            }
            cur = inner.source();
            continue;
        }
        cur = err.source();
    }
    None
}

/// The file to blame for a TLS refusal: the CA when this side could not
/// verify etcd, the client certificate when etcd sent an alert.
fn file_at_fault(e: &rustls::Error, during_read: bool) -> TlsFile {
    match e {
        rustls::Error::InvalidCertificate(_) => TlsFile::Ca,
        rustls::Error::AlertReceived(_) if during_read => TlsFile::Cert,
        rustls::Error::AlertReceived(
            rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::CertificateRequired
            | rustls::AlertDescription::UnknownCA
            | rustls::AlertDescription::CertificateUnknown,
        ) => TlsFile::Cert,
        _ => TlsFile::Ca,
    }
}

/// `host` and `port` of `https://host[:port][/...]`; IPv6 in brackets.
fn host_port(endpoint: &str) -> Option<(&str, u16)> {
    let rest = endpoint.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => 2379,
    };
    (!host.is_empty()).then_some((host, port))
}

/// The certificates of a PEM file, with the file's bytes.
fn read_certificates(file: TlsFile, path: &Path) -> Result<Certs, TlsFileError> {
    let err = |reason| TlsFileError { file, path: path.to_path_buf(), reason };
    let bytes = std::fs::read(path).map_err(|e| err(PemReason::Unreadable(e)))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(PemReason::NotPem(e.to_string())))?;
    if certs.is_empty() {
        return Err(err(if has_pem_block(&bytes) {
            PemReason::NoCertificate
        } else {
            PemReason::NotPem("no -----BEGIN ...----- block".into())
        }));
    }
    Ok((bytes, certs))
}

/// The private key of `etcd-keyfile`, with the file's bytes.
fn read_private_key(path: &Path) -> Result<Key, TlsFileError> {
    let err = |reason| TlsFileError { file: TlsFile::Key, path: path.to_path_buf(), reason };
    let bytes = std::fs::read(path).map_err(|e| err(PemReason::Unreadable(e)))?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(key) => Ok((bytes, key)),
        Err(rustls::pki_types::pem::Error::NoItemsFound) if has_pem_block(&bytes) => Err(err(PemReason::NoPrivateKey)),
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            Err(err(PemReason::NotPem("no -----BEGIN ...----- block".into())))
        }
        Err(e) => Err(err(PemReason::NotPem(e.to_string()))),
    }
}

fn has_pem_block(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|w| w == b"-----BEGIN ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_split_into_host_and_port() {
        assert_eq!(host_port("https://192.168.77.254:2379"), Some(("192.168.77.254", 2379)));
        assert_eq!(host_port("https://[fd77::fe]:2379/"), Some(("fd77::fe", 2379)));
        assert_eq!(host_port("https://etcd.example"), Some(("etcd.example", 2379)));
        assert_eq!(host_port("https://[fd77::fe]"), Some(("fd77::fe", 2379)));
        assert_eq!(host_port("http://127.0.0.1:2379"), None);
        assert_eq!(host_port("https://:2379"), None);
        assert_eq!(host_port("https://h:port"), None);
    }

    #[test]
    fn the_password_is_not_in_debug_output() {
        let s = EtcdSecurity { username: Some("root".into()), password: Some("s3cret".into()), ..Default::default() };
        let text = format!("{s:?}");
        assert!(text.contains("root") && !text.contains("s3cret"), "{text}");
    }
}
