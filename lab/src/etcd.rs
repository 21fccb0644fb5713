//! The lab's etcd: Debian's etcd server in the underlay namespace, with
//! certificates made for it (`--etcd-tls`) and a user and password
//! (`--etcd-auth`), and a client of it for the lab's own reads and writes.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use weft_control::etcd::{EtcdStore, DEFAULT_PREFIX};
use weft_control::etcd_tls::EtcdSecurity;

use crate::etcd_certs::EtcdCerts;
use crate::namespaces::{read_pid, underlay_service_address};
use crate::netns;
use crate::plan::Lab;

/// Client port of the lab's etcd.
pub const ETCD_PORT: u16 = 2379;

/// The lab's etcd client URL: an address of the underlay bridge.
pub fn etcd_url(lab: &Lab) -> String {
    let scheme = if lab.opts.etcd_tls { "https" } else { "http" };
    format!("{scheme}://{}", etcd_authority(lab))
}

/// `host:port` of the lab's etcd.
fn etcd_authority(lab: &Lab) -> String {
    match etcd_ip(lab) {
        IpAddr::V4(a) => format!("{a}:{ETCD_PORT}"),
        IpAddr::V6(a) => format!("[{a}]:{ETCD_PORT}"),
    }
}

/// The address etcd listens on and its server certificate is made for:
/// the underlay bridge's own, or in a multi-cloud lab an address on the
/// internet, where every cloud and the home node reach it through NAT.
fn etcd_ip(lab: &Lab) -> IpAddr {
    if lab.opts.multicloud.is_some() {
        IpAddr::V4(crate::multicloud::SERVICE_PUBLIC)
    } else if lab.opts.cluster_v4().is_some() {
        IpAddr::from([192, 168, 77, 254])
    } else {
        IpAddr::from([0xfd77, 0, 0, 0, 0, 0, 0, 0xfe])
    }
}

/// The lab's etcd certificates (with `etcd_tls`), in `<lab dir>/etcd-tls`.
pub fn etcd_certs(lab: &Lab) -> EtcdCerts {
    EtcdCerts::in_dir(&lab.dir.join("etcd-tls"))
}

/// The user the lab's etcd knows with `etcd_auth`.
pub const ETCD_USER: &str = "root";

/// Where the lab keeps its etcd password (mode 0600).
fn etcd_password_path(lab: &Lab) -> PathBuf {
    lab.dir.join("etcd-password")
}

/// What a client of the lab's etcd needs: the lab's TLS files, and the user
/// once authentication is on.
pub fn etcd_security(lab: &Lab) -> EtcdSecurity {
    let mut sec = EtcdSecurity::default();
    if lab.opts.etcd_tls {
        let c = etcd_certs(lab);
        sec.ca_file = Some(c.ca);
        sec.cert_file = Some(c.client_cert);
        sec.key_file = Some(c.client_key);
    }
    if let Ok(pw) = std::fs::read_to_string(etcd_password_path(lab)) {
        sec.username = Some(ETCD_USER.into());
        sec.password = Some(pw.trim().to_string());
    }
    sec
}

/// Creates user `root` with a fresh password and turns authentication on,
/// with Debian's `etcdctl` in the underlay namespace. The password file
/// appears only once etcd requires it, so that clients before then connect
/// without a user.
pub(crate) fn enable_etcd_auth(lab: &Lab) -> anyhow::Result<()> {
    let mut pw = [0u8; 16];
    getrandom::fill(&mut pw).map_err(|e| anyhow::anyhow!("the kernel's random source: {e}"))?;
    let pw = hex::encode(pw);
    let ul = format!("{}-ul", lab.opts.name);
    let url = etcd_url(lab);
    let mut base = vec!["netns".to_string(), "exec".into(), ul, "etcdctl".into(), format!("--endpoints={url}")];
    if lab.opts.etcd_tls {
        let c = etcd_certs(lab);
        base.push(format!("--cacert={}", c.ca.display()));
        base.push(format!("--cert={}", c.client_cert.display()));
        base.push(format!("--key={}", c.client_key.display()));
    }
    let etcdctl = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("ip")
            .args(&base)
            .args(args)
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::null())
            .output()
            .context("running etcdctl (Debian package etcd-client)")?;
        if !out.status.success() {
            bail!("etcdctl {}: {}", args[..2].join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    };
    etcdctl(&["user", "add", &format!("{ETCD_USER}:{pw}")])?;
    etcdctl(&["user", "grant-role", ETCD_USER, "root"])?;
    etcdctl(&["auth", "enable"])?;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(etcd_password_path(lab))
        .context("writing the etcd password file")?;
    std::io::Write::write_all(&mut f, pw.as_bytes())?;
    Ok(())
}

/// Runs etcd in the underlay namespace, reachable from every node; its
/// data stays in the lab directory, so a restart keeps the leases.
pub(crate) fn start_etcd(lab: &Lab) -> anyhow::Result<()> {
    let ul = format!("{}-ul", lab.opts.name);
    let url = etcd_url(lab);
    underlay_service_address(lab)?;
    let data = lab.dir.join("etcd");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(lab.dir.join("etcd.log"))?;
    let peer = "http://127.0.0.1:2380";
    let mut tls = Vec::new();
    if lab.opts.etcd_tls {
        let c = etcd_certs(lab);
        // Made once per lab: a restarted etcd keeps its certificates.
        if !c.ca.exists() {
            let dir = lab.dir.join("etcd-tls");
            EtcdCerts::make(&dir, &format!("{} lab CA", lab.opts.name), etcd_ip(lab))?;
        }
        tls.push(format!("--cert-file={}", c.server_cert.display()));
        tls.push(format!("--key-file={}", c.server_key.display()));
        tls.push(format!("--trusted-ca-file={}", c.ca.display()));
        tls.push("--client-cert-auth".into());
    }
    use std::os::unix::process::CommandExt;
    let child = Command::new("ip")
        .args(["netns", "exec", &ul, "etcd", "--name", "lab", "--data-dir", &data.display().to_string()])
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args(["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer])
        .args(["--initial-cluster", &format!("lab={peer}")])
        .args(&tls)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting etcd (Debian package etcd-server)")?;
    std::fs::write(lab.dir.join("etcd.pid"), child.id().to_string())?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match lab.with_etcd(|_| Ok(())) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e.context("etcd did not become healthy")),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

impl Lab {
    /// Runs `f` with a client of the lab's etcd (from inside the underlay
    /// namespace, where etcd listens).
    pub fn with_etcd<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EtcdStore) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let url = etcd_url(self);
        let sec = etcd_security(self);
        netns::in_netns(&format!("{}-ul", self.opts.name), move || {
            let store = EtcdStore::connect_with(&[url], DEFAULT_PREFIX, Duration::from_secs(2), &sec)?;
            f(&store)
        })?
    }

    /// Stops the lab's etcd (SIGKILL) and waits until it is gone.
    pub fn stop_etcd(&self) -> anyhow::Result<()> {
        let pid = read_pid(&self.dir.join("etcd.pid")).context("etcd pid")?;
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
        let _ = nix::sys::wait::waitpid(pid, None);
        Ok(())
    }

    /// Starts the lab's etcd again on its data.
    pub fn start_etcd(&self) -> anyhow::Result<()> {
        start_etcd(self)
    }

    /// Stops the lab's etcd, empties its data directory and starts it
    /// again: a member restored from nothing, without the network config
    /// and the leases. Refused with `etcd_auth`: its user would be gone too.
    pub fn wipe_etcd(&self) -> anyhow::Result<()> {
        if self.opts.etcd_auth {
            bail!("wipe_etcd: an etcd with authentication would come back without its user");
        }
        self.stop_etcd()?;
        let data = self.dir.join("etcd");
        std::fs::remove_dir_all(&data).with_context(|| format!("emptying {}", data.display()))?;
        start_etcd(self)
    }
}
