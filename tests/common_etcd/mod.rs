//! A real etcd server for integration tests: `/usr/bin/etcd` (Debian
//! `etcd-server`) on free loopback ports with its own data directory, killed
//! by PID and removed when dropped, also when the test panics.
//!
//! ```ignore
//! mod common_etcd;
//! let etcd = common_etcd::EtcdServer::start();
//! let store = EtcdStore::connect(&etcd.endpoints(), "/coreos.com/network", Duration::from_secs(2))?;
//! ```

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The etcd binary.
pub const ETCD_BIN: &str = "/usr/bin/etcd";

/// How long a fresh server may take to become healthy; normally well under
/// a second, this leaves room for a loaded 2-core CI machine.
const HEALTHY_WITHIN: Duration = Duration::from_secs(10);

/// Attempts at starting, in case another process took a port between our
/// probe and etcd's bind.
const START_ATTEMPTS: usize = 3;

/// A running etcd, stopped and removed on drop.
pub struct EtcdServer {
    child: Option<Child>,
    /// The temporary directory holding the data directory and the log.
    dir: PathBuf,
    /// The client URL, `http://127.0.0.1:<port>` (`https://` with TLS).
    pub endpoint: String,
    /// Where `/health` answers over plain HTTP: the client port, or with
    /// TLS a separate metrics port.
    health: SocketAddr,
}

impl EtcdServer {
    /// Starts a single-member etcd and waits until it reports healthy.
    /// Panics (with the end of etcd's log) if it does not.
    pub fn start() -> EtcdServer {
        Self::start_with(None, &[])
    }

    /// Starts etcd with extra command-line flags (`--auth-token-ttl=1`).
    pub fn start_with_flags(flags: &[&str]) -> EtcdServer {
        Self::start_with(None, flags)
    }

    /// Starts etcd serving `https://` only with `certs`' server certificate,
    /// and requiring client certificates signed by `certs`' CA.
    pub fn start_tls(certs: &weft_lab::etcd_certs::EtcdCerts) -> EtcdServer {
        Self::start_with(Some(certs.clone()), &[])
    }

    fn start_with(tls: Option<weft_lab::etcd_certs::EtcdCerts>, flags: &[&str]) -> EtcdServer {
        assert!(Path::new(ETCD_BIN).exists(), "{ETCD_BIN} is missing: install the Debian package etcd-server");
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            let mut server = Self::spawn(tls.clone(), flags);
            if server.wait_healthy() {
                return server;
            }
            last_log = server.log_tail();
            // Drop kills it and removes its directory.
        }
        panic!(
            "etcd did not become healthy within {HEALTHY_WITHIN:?} ({START_ATTEMPTS} attempts); last log:\n{last_log}"
        );
    }

    /// The client endpoints, as `EtcdStore::connect` takes them.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint.clone()]
    }

    /// The PID of the etcd process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills etcd (SIGKILL, as a crash would) and reaps it; the data
    /// directory stays until drop.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill sends SIGKILL to this child's PID only.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes etcd (SIGSTOP): connections stay open and nothing answers,
    /// as with a hung server or a network partition.
    /// Returns once every thread of etcd has stopped: a group stop is
    /// asynchronous, and a thread still running could answer one more call.
    pub fn freeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
        let tasks = PathBuf::from(format!("/proc/{}/task", self.pid().expect("etcd is running")));
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            let all_stopped = std::fs::read_dir(&tasks).is_ok_and(|dir| {
                dir.flatten().all(|t| {
                    // `/proc/<pid>/task/<tid>/stat`: "tid (comm) S ...", the
                    // state after the last `)`.
                    let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                    stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
                })
            });
            if all_stopped {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("etcd did not stop within 5 s of SIGSTOP");
    }

    /// Lets a frozen etcd run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.pid().expect("etcd is running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("PIDs fit in i32"));
        nix::sys::signal::kill(pid, signal).unwrap_or_else(|e| panic!("{signal} to etcd: {e}"));
    }

    /// Compacts the key-value history up to `revision`, physically, as an
    /// operator or etcd's auto-compaction would.
    pub fn compact(&self, revision: i64) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        rt.block_on(async {
            let mut client =
                etcd_client::Client::connect(self.endpoints(), None).await.expect("connect for compaction");
            client
                .compact(revision, Some(etcd_client::CompactionOptions::new().with_physical()))
                .await
                .expect("compaction");
        });
    }

    /// Creates user `root` with `password` and turns authentication on.
    pub fn enable_auth(&self, password: &str) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        rt.block_on(async {
            let mut c = etcd_client::Client::connect(self.endpoints(), None).await.expect("connect to enable auth");
            c.user_add("root", password, None).await.expect("user add root");
            c.user_grant_role("root", "root").await.expect("grant root the root role");
            c.auth_enable().await.expect("auth enable");
        });
    }

    /// The last lines of etcd's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn spawn(tls: Option<weft_lab::etcd_certs::EtcdCerts>, flags: &[&str]) -> EtcdServer {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "weft-etcd-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create etcd test directory");
        let client_port = free_port();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{}", free_port());
        let health_port = if tls.is_some() { free_port() } else { client_port };
        let health = SocketAddr::from((Ipv4Addr::LOCALHOST, health_port));
        let mut extra: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        if let Some(c) = &tls {
            extra.push(format!("--cert-file={}", c.server_cert.display()));
            extra.push(format!("--key-file={}", c.server_key.display()));
            extra.push(format!("--trusted-ca-file={}", c.ca.display()));
            extra.push("--client-cert-auth".into());
            extra.push(format!("--listen-metrics-urls=http://{health}"));
        }
        let log = std::fs::File::create(dir.join("etcd.log")).expect("create etcd log");
        let child = Command::new(ETCD_BIN)
            .args(&extra)
            .arg("--name=weft-test")
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=weft-test={peer}"))
            .arg("--logger=zap")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {ETCD_BIN}: {e}"));
        EtcdServer { child: Some(child), dir, endpoint: client, health }
    }

    /// Polls `/health` until etcd says it is healthy, it exits, or time is up.
    fn wait_healthy(&mut self) -> bool {
        let addr = self.health;
        let until = Instant::now() + HEALTHY_WITHIN;
        while Instant::now() < until {
            match self.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(None)) => {}
                _ => return false, // exited (port taken?) or cannot tell
            }
            if health(addr) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind an ephemeral port");
    l.local_addr().expect("local address").port()
}

/// Whether etcd's `/health` answers `"health":"true"`.
fn health(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.replace(' ', "").contains("\"health\":\"true\"")
}
