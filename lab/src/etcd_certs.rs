//! Certificates for a lab's or a test's etcd: a throw-away CA, a server
//! certificate for etcd's address and a client certificate, made with rcgen
//! and written as PEM files (keys mode 0600).
//!
//! This is tooling, not product: a real cluster's certificates come from its
//! operator (K3s makes its own). Nothing here is ever checked in; every run
//! makes fresh keys.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused the parameters or could not sign.
    #[error("making the {what} certificate: {source}")]
    Generate {
        /// Which certificate.
        what: &'static str,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// A file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The PEM files of one etcd set-up, all in one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdCerts {
    /// The CA certificate (`etcd-cafile`, etcd's `--trusted-ca-file`).
    pub ca: PathBuf,
    /// etcd's server certificate (`--cert-file`), SAN = etcd's address.
    pub server_cert: PathBuf,
    /// Its key (`--key-file`), mode 0600.
    pub server_key: PathBuf,
    /// The client certificate (`etcd-certfile`).
    pub client_cert: PathBuf,
    /// Its key (`etcd-keyfile`), mode 0600.
    pub client_key: PathBuf,
}

impl EtcdCerts {
    /// Where [`EtcdCerts::make`] puts the files in `dir`.
    pub fn in_dir(dir: &Path) -> EtcdCerts {
        EtcdCerts {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        }
    }

    /// Makes a CA named `ca_name`, a server certificate for `server_ip`
    /// (and 127.0.0.1, so that tools on the same host reach it too) and a
    /// client certificate, and writes them into `dir` (created if needed).
    pub fn make(dir: &Path, ca_name: &str, server_ip: IpAddr) -> Result<EtcdCerts, CertError> {
        std::fs::create_dir_all(dir).map_err(|source| CertError::Write { path: dir.to_path_buf(), source })?;
        let ca = make_ca(ca_name)?;
        let certs = EtcdCerts::in_dir(dir);
        write(&certs.ca, ca.pem().as_bytes(), 0o644)?;

        let mut sans = vec![server_ip.to_string()];
        if server_ip != IpAddr::from([127, 0, 0, 1]) {
            sans.push("127.0.0.1".into());
        }
        let (cert, key) = make_leaf(&ca, "etcd", sans, ExtendedKeyUsagePurpose::ServerAuth)?;
        write(&certs.server_cert, cert.as_bytes(), 0o644)?;
        write(&certs.server_key, key.as_bytes(), 0o600)?;

        let (cert, key) = make_leaf(&ca, "weft", Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)?;
        write(&certs.client_cert, cert.as_bytes(), 0o644)?;
        write(&certs.client_key, key.as_bytes(), 0o600)?;
        Ok(certs)
    }

    /// Makes only a CA certificate named `ca_name` at `path` (its key is
    /// thrown away): a CA that signed nothing, for checking that a wrong
    /// `etcd-cafile` is refused.
    pub fn make_unrelated_ca(path: &Path, ca_name: &str) -> Result<(), CertError> {
        let ca = make_ca(ca_name)?;
        write(path, ca.pem().as_bytes(), 0o644)
    }
}

type Ca = CertifiedIssuer<'static, KeyPair>;

fn make_ca(name: &str) -> Result<Ca, CertError> {
    let gen = |source| CertError::Generate { what: "CA", source };
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().map_err(gen)?;
    CertifiedIssuer::self_signed(params, key).map_err(gen)
}

/// A certificate signed by `ca`, and its key, as PEM.
fn make_leaf(
    ca: &Ca,
    name: &'static str,
    sans: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<(String, String), CertError> {
    let gen = |source| CertError::Generate { what: name, source };
    let mut params = CertificateParams::new(sans).map_err(gen)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().map_err(gen)?;
    let cert = params.signed_by(&key, ca).map_err(gen)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes `bytes` to `path` with `mode` (also when the file exists already).
fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let err = |source| CertError::Write { path: path.to_path_buf(), source };
    // Remove first: `mode` applies only to a file created here.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(err)?;
    f.write_all(bytes).map_err(err)
}
