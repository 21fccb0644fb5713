//! The agent's etcd TLS keys (`etcd-cafile`, `etcd-certfile`,
//! `etcd-keyfile`) and user keys, read by `weft_control::config` from files
//! made as the lab makes them. No root needed.
//!
//! These are unit tests of the config parser that need real certificates;
//! they live here and not beside the parser because the certificates come
//! from the lab's tooling (`weft_lab::etcd_certs`), which no production
//! crate may depend on, not even for its tests.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use weft_control::config::{AgentConfig, DatastoreSource};
use weft_control::error::ConfigError;
use weft_lab::etcd_certs::EtcdCerts;

fn parse(yaml: &str) -> Result<AgentConfig, ConfigError> {
    AgentConfig::from_pairs(&AgentConfig::pairs_from_yaml(yaml)?)
}

fn refused(yaml: &str) -> ConfigError {
    parse(yaml).expect_err(yaml)
}

const GOOD: &str = "node-ip: 192.168.77.1\ndatastore-file: /tmp/ds.json\n";

/// A temporary directory with the lab's kind of certificates, removed on drop.
struct Certs {
    dir: PathBuf,
    certs: EtcdCerts,
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn certs(tag: &str) -> Certs {
    let dir = std::env::temp_dir().join(format!("weft-config-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let certs = EtcdCerts::make(&dir, "test CA", IpAddr::from([127, 0, 0, 1])).unwrap();
    Certs { dir, certs }
}

const ETCD_TLS: &str = "node-ip: 10.0.0.1\netcd-endpoints: https://127.0.0.1:2379,https://127.0.0.2:2379\n";

fn tls_yaml(c: &Certs) -> String {
    format!(
        "{ETCD_TLS}etcd-cafile: {}\netcd-certfile: {}\netcd-keyfile: {}\n",
        c.certs.ca.display(),
        c.certs.client_cert.display(),
        c.certs.client_key.display()
    )
}

#[test]
fn etcd_tls_files_and_user_are_read() {
    let c = certs("good");
    let cfg = parse(&format!("{}etcd-username: root\netcd-password: pw\n", tls_yaml(&c))).unwrap();
    let DatastoreSource::Etcd { endpoints, security, .. } = cfg.datastore else { panic!("etcd") };
    assert_eq!(endpoints, ["https://127.0.0.1:2379", "https://127.0.0.2:2379"]);
    assert_eq!(security.ca_file.as_ref(), Some(&c.certs.ca));
    assert_eq!(security.cert_file.as_ref(), Some(&c.certs.client_cert));
    assert_eq!(security.key_file.as_ref(), Some(&c.certs.client_key));
    assert_eq!((security.username.as_deref(), security.password.as_deref()), (Some("root"), Some("pw")));
    // Server TLS only, without a client certificate.
    let cfg = parse(&format!("{ETCD_TLS}etcd-cafile: {}\n", c.certs.ca.display())).unwrap();
    let DatastoreSource::Etcd { security, .. } = cfg.datastore else { panic!("etcd") };
    assert_eq!((security.cert_file, security.key_file), (None, None));
    // A user over plain http.
    let cfg = parse("node-ip: 10.0.0.1\netcd-endpoints: http://h:2379\netcd-username: u\netcd-password: p\n");
    assert!(cfg.is_ok(), "{cfg:?}");
}

#[test]
fn etcd_tls_and_user_combinations_are_refused() {
    let c = certs("combos");
    let (ca, cert, key) = (c.certs.ca.display(), c.certs.client_cert.display(), c.certs.client_key.display());
    let e = refused("node-ip: 10.0.0.1\netcd-endpoints: http://a:2379,https://b:2379\n");
    assert_eq!((e.key.as_str(), e.value.as_str()), ("etcd-endpoints", "http://a:2379,https://b:2379"));
    assert!(e.accepted.contains("all of one scheme"), "{e}");
    let e = refused("node-ip: 10.0.0.1\netcd-endpoints: https://\n");
    assert_eq!(e.key, "etcd-endpoints");
    let e = refused(ETCD_TLS);
    assert_eq!((e.key.as_str(), e.value.as_str()), ("etcd-cafile", ""));
    assert!(e.accepted.contains("required with https://"), "{e}");
    let e = refused(&format!("{ETCD_TLS}etcd-cafile: {ca}\netcd-certfile: {cert}\n"));
    assert_eq!((e.key.as_str(), e.value.as_str()), ("etcd-keyfile", ""));
    assert!(e.accepted.contains("etcd-certfile"), "{e}");
    let e = refused(&format!("{ETCD_TLS}etcd-cafile: {ca}\netcd-keyfile: {key}\n"));
    assert_eq!((e.key.as_str(), e.value.as_str()), ("etcd-certfile", ""));
    assert!(e.accepted.contains("etcd-keyfile"), "{e}");
    let http = "node-ip: 10.0.0.1\netcd-endpoints: http://127.0.0.1:2379\n";
    let e = refused(&format!("{http}etcd-cafile: {ca}\n"));
    assert_eq!((e.key.as_str(), e.value.as_str()), ("etcd-cafile", ca.to_string().as_str()));
    assert!(e.accepted.contains("only with https://"), "{e}");
    let e = refused(&format!("{http}etcd-certfile: {cert}\netcd-keyfile: {key}\n"));
    assert_eq!(e.key, "etcd-certfile");
    assert!(e.accepted.contains("only with https://"), "{e}");
    let e = refused(&format!("{http}etcd-username: root\n"));
    assert_eq!((e.key.as_str(), e.value.as_str()), ("etcd-password", ""));
    assert!(e.accepted.contains("etcd-username"), "{e}");
    let e = refused(&format!("{http}etcd-password: s3cret\n"));
    assert_eq!((e.key.as_str(), e.value.as_str()), ("etcd-username", ""));
    let e = refused(&format!("{GOOD}etcd-password: s3cret\n"));
    assert_eq!((e.key.as_str(), e.value.as_str()), ("etcd-password", "(hidden)"), "never echoed");
    assert!(e.accepted.contains("only with etcd-endpoints"), "{e}");
    let e = refused(&format!("{GOOD}etcd-cafile: {ca}\n"));
    assert_eq!(e.key, "etcd-cafile");
    assert!(e.accepted.contains("only with etcd-endpoints"), "{e}");
}

#[test]
fn bad_etcd_tls_files_are_refused_with_the_reason() {
    let c = certs("files");
    let dir = &c.dir;
    let missing = dir.join("missing.pem");
    let not_pem = dir.join("not.pem");
    std::fs::write(&not_pem, "just some text\n").unwrap();
    let broken = dir.join("broken.pem");
    std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n").unwrap();
    let garbage_der = dir.join("garbage-der.pem");
    std::fs::write(&garbage_der, "-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n").unwrap();
    let (ca, cert, key) = (&c.certs.ca, &c.certs.client_cert, &c.certs.client_key);
    let yaml = |ca: &Path, cert: &Path, key: &Path| {
        format!(
            "{ETCD_TLS}etcd-cafile: {}\netcd-certfile: {}\netcd-keyfile: {}\n",
            ca.display(),
            cert.display(),
            key.display()
        )
    };
    let cases: &[(&str, String, PathBuf, &str)] = &[
        ("etcd-cafile", yaml(&missing, cert, key), missing.clone(), "unreadable"),
        ("etcd-cafile", yaml(&not_pem, cert, key), not_pem.clone(), "not PEM"),
        ("etcd-cafile", yaml(&broken, cert, key), broken.clone(), "not PEM"),
        ("etcd-cafile", yaml(key, cert, key), key.clone(), "no certificate"),
        ("etcd-cafile", yaml(&garbage_der, cert, key), garbage_der.clone(), "refused by the TLS library"),
        ("etcd-certfile", yaml(ca, &missing, key), missing.clone(), "unreadable"),
        ("etcd-certfile", yaml(ca, key, key), key.clone(), "no certificate"),
        ("etcd-keyfile", yaml(ca, cert, &not_pem), not_pem.clone(), "not PEM"),
        ("etcd-keyfile", yaml(ca, cert, cert), cert.clone(), "no private key"),
        ("etcd-keyfile", yaml(ca, cert, dir), dir.clone(), "unreadable"),
    ];
    for (k, text, path, why) in cases {
        let e = refused(text);
        assert_eq!((e.key.as_str(), e.value.as_str()), (*k, path.display().to_string().as_str()), "{e}");
        assert!(e.accepted.contains(why), "{k} {}: wanted {why:?} in {e}", path.display());
        assert!(e.accepted.contains("PEM file holding"), "says what it must hold: {e}");
    }
}
