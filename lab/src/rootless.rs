//! The rootless node of `weft lab --rootless`: one more node, without pods,
//! whose agent runs as a user the lab makes, with no capabilities, on its
//! userspace stack; and the checks that reach the cluster through it.
//!
//! Its agent's SOCKS5 server listens on [`SOCKS_ADDR`] in its namespace, it
//! forwards [`FORWARD_LOCAL`] (TCP and UDP) to [`FORWARD_PORT`] of the
//! first node's first pod, and exposes port [`EXPOSE_PORT`] of its pod
//! address to [`EXPOSE_LOCAL`] in its namespace, at most
//! [`MAX_CONNECTIONS`] at once (small, so that a flood reaches it fast).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

use crate::netns;
use crate::plan::{Check, Lab, Node, Pod};

/// The rootless agent's SOCKS5 server, in its namespace.
pub const SOCKS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1080);
/// The rootless agent's forward: this local address (TCP and UDP) ...
pub const FORWARD_LOCAL: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15353);
/// ... to this port of the first node's first pod.
pub const FORWARD_PORT: u16 = 5353;
/// The port of its pod address it exposes (TCP and UDP) ...
pub const EXPOSE_PORT: u16 = 8080;
/// ... to this local service in its namespace.
pub const EXPOSE_LOCAL: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 18080);
/// Its `rootless-max-connections`.
pub const MAX_CONNECTIONS: usize = 64;
/// Port of the SOCKS5 fetch's server in the pod.
const FETCH_PORT: u16 = 5203;
/// How long a fetch may make no progress.
const STALL: Duration = Duration::from_secs(60);

/// The user a lab's rootless agent runs as (lower case: Debian's useradd
/// refuses upper case).
pub fn user(lab_name: &str) -> String {
    format!("weftrl_{}", lab_name.to_ascii_lowercase())
}

/// Makes the lab's user (a system user with no home and no shell) if it
/// is missing; its uid and gid.
pub(crate) fn make_user(lab_name: &str) -> anyhow::Result<(u32, u32)> {
    let name = user(lab_name);
    let id = |flag: &str| -> Option<u32> {
        let out = std::process::Command::new("id").args([flag, &name]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        let out = std::process::Command::new("useradd")
            .args(["--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"])
            .args(["--user-group", &name])
            .output()
            .context("running useradd (scripts/setup installs it)")?;
        // Another run may have made it meanwhile.
        if !out.status.success() && id("-u").is_none() {
            bail!("useradd {name}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
    }
    match (id("-u"), id("-g")) {
        (Some(u), Some(g)) if u != 0 => Ok((u, g)),
        _ => bail!("user {name} has no uid, or uid 0"),
    }
}

/// Stops what runs as the lab's user and removes the user, if any.
pub(crate) fn remove_user(lab_name: &str) {
    let name = user(lab_name);
    let run = |prog: &str, args: &[&str]| std::process::Command::new(prog).args(args).output();
    if run("id", &["-u", &name]).map_or(true, |o| !o.status.success()) {
        return;
    }
    let _ = run("pkill", &["-TERM", "-u", &name]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while run("pgrep", &["-u", &name]).is_ok_and(|o| o.status.success()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = run("pkill", &["-KILL", "-u", &name]);
    let _ = run("userdel", &[&name]);
}

/// The pid of the lab's rootless agent: the process of the lab's user
/// running the lab's copy of weft.
pub fn agent_pid(lab_name: &str) -> Option<i32> {
    let out = std::process::Command::new("pgrep").args(["-u", &user(lab_name), "-x", "weft-rootless"]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().next()?.trim().parse().ok()
}

/// The config lines of the rootless agent.
pub(crate) fn config(lab: &Lab) -> String {
    // The pods get their addresses after the agents start: the first one
    // host-local gives out (the tests check it is that).
    let n1 = &lab.nodes[0];
    let pod = host_local_first(n1, false).or_else(|| host_local_first(n1, true));
    let mut cfg = format!(
        "rootless: true\nsocks5-addr: {SOCKS_ADDR}\nexpose: {EXPOSE_PORT}={EXPOSE_LOCAL}\n\
         rootless-max-connections: {MAX_CONNECTIONS}\n"
    );
    if let Some(pod) = pod {
        cfg += &format!("forward: {FORWARD_LOCAL}={}\n", SocketAddr::new(pod, FORWARD_PORT));
    }
    cfg
}

/// The node's pod address in a family: the first host of its subnet.
pub fn pod_address(n: &Node, v6: bool) -> Option<IpAddr> {
    n.key.subnets().into_iter().find(|s| s.addr().is_ipv6() == v6).map(|s| match s.network() {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) + 1)),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) + 1)),
    })
}

/// The first address host-local gives a pod of node `n` (the bridge has
/// the subnet's first host): the subnet's second host.
pub fn host_local_first(n: &Node, v6: bool) -> Option<IpAddr> {
    pod_address(n, v6).map(|a| match a {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) + 1)),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) + 1)),
    })
}

/// Opens a SOCKS5 CONNECT to `target` through the server at `proxy` (no
/// authentication); the stream after the server's success reply, or the
/// reply code it refused with.
pub fn socks5_connect(proxy: SocketAddr, target: SocketAddr) -> anyhow::Result<Result<TcpStream, u8>> {
    let mut s =
        TcpStream::connect_timeout(&proxy, Duration::from_secs(5)).context("connecting to the SOCKS5 server")?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    s.write_all(&[5, 1, 0])?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).context("reading the method choice")?;
    if choice != [5, 0] {
        bail!("the SOCKS5 server chose {choice:?}");
    }
    let mut req = vec![5, 1, 0];
    push_addr(&mut req, target);
    s.write_all(&req)?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).context("reading the SOCKS5 reply")?;
    let rest = match head[3] {
        1 => 6,
        4 => 18,
        t => bail!("SOCKS5 reply with address type {t}"),
    };
    let mut bound = vec![0u8; rest];
    s.read_exact(&mut bound)?;
    if head[1] != 0 {
        return Ok(Err(head[1]));
    }
    s.set_read_timeout(Some(STALL))?;
    Ok(Ok(s))
}

pub use weft_netstack::socks::push_addr;

impl Lab {
    /// The rootless checks: a SHA-256-checked fetch through SOCKS5 from the
    /// first pod (each family), a ping of the rootless node's pod address
    /// from that pod, and the node's counters.
    pub(crate) fn rootless_checks(&self, r: &Node) -> Vec<Check> {
        let mut checks = Vec::new();
        let pod = &self.nodes[0].pods[0];
        for v6 in [false, true] {
            if pod.ip(v6).is_some() && pod_address(r, v6).is_some() {
                checks.push(self.socks_fetch_check(pod, v6, self.opts.transfer_mib << 20));
                checks.push(ping_address(pod, pod_address(r, v6).expect("checked above")));
            }
        }
        checks.push(self.counter_check(r));
        checks
    }

    /// Fetches `bytes` from a server in `pod` through the rootless node's
    /// SOCKS5 server; SHA-256 compared at both ends.
    pub fn socks_fetch_check(&self, pod: &Pod, v6: bool, bytes: usize) -> Check {
        let ip = pod.ip(v6).map_or_else(|| "?".into(), |a| a.to_string());
        let name = format!("socks5 fetch {} MiB from {} ({ip})", bytes >> 20, pod.ns);
        match self.socks_fetch(pod, v6, bytes) {
            Ok((sent, got, secs)) if sent == got => Check {
                name,
                passed: true,
                detail: format!(
                    "sha256 {}… at both ends, {:.2} Gbit/s",
                    &hex::encode(sent)[..16],
                    bytes as f64 * 8.0 / secs / 1e9
                ),
            },
            Ok((sent, got, _)) => Check {
                name,
                passed: false,
                detail: format!("sha256 sent {} got {}", hex::encode(sent), hex::encode(got)),
            },
            Err(e) => Check { name, passed: false, detail: format!("{e:#}") },
        }
    }

    /// The fetch of [`Lab::socks_fetch_check`]: SHA-256 sent and received,
    /// and seconds from the CONNECT to the last byte.
    pub fn socks_fetch(&self, pod: &Pod, v6: bool, bytes: usize) -> anyhow::Result<([u8; 32], [u8; 32], f64)> {
        let r = self.rootless.as_ref().context("the lab has no rootless node")?;
        let ip = pod.ip(v6).context("the pod has no address of that family")?;
        let any: IpAddr = if v6 { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
        let listener = netns::in_netns(&pod.ns, move || TcpListener::bind((any, FETCH_PORT)))??;
        let server = netns::spawn_in_netns(&pod.ns, move || -> anyhow::Result<[u8; 32]> {
            listener.set_nonblocking(true)?;
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut s = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => return Err(e).context("accepting the fetch"),
                }
            };
            s.set_nonblocking(false)?;
            s.set_write_timeout(Some(STALL))?;
            Ok(send_data(&mut s, bytes)?)
        })?;
        let target = SocketAddr::new(ip, FETCH_PORT);
        let client = netns::spawn_in_netns(&r.ns, move || -> anyhow::Result<([u8; 32], f64)> {
            let start = Instant::now();
            let mut s = socks5_connect(SOCKS_ADDR, target)?
                .map_err(|code| anyhow::anyhow!("the SOCKS5 server refused the CONNECT: reply {code}"))?;
            let (digest, got) = receive_data(&mut s)?;
            if got != bytes {
                bail!("received {got} of {bytes} bytes");
            }
            Ok((digest, start.elapsed().as_secs_f64()))
        })?;
        let got = client.join().map_err(|_| anyhow::anyhow!("the client panicked"))?;
        let sent = server.join().map_err(|_| anyhow::anyhow!("the server panicked"))?;
        let (got, secs) = got?;
        Ok((sent?, got, secs))
    }
}

/// Sends `bytes` of deterministic data and closes; its SHA-256.
pub fn send_data(s: &mut TcpStream, bytes: usize) -> std::io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len());
        for chunk in buf[..n].chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        s.write_all(&buf[..n])?;
        h.update(&buf[..n]);
        left -= n;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    Ok(h.finalize().into())
}

/// Reads to the end; the SHA-256 and the length.
pub fn receive_data(s: &mut TcpStream) -> std::io::Result<([u8; 32], usize)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok((h.finalize().into(), total));
        }
        h.update(&buf[..n]);
        total += n;
    }
}

/// Pings `to` from `pod` (three tries).
pub fn ping_address(pod: &Pod, to: IpAddr) -> Check {
    crate::checks::ping_from(&pod.ns, to, 3, format!("ping {} -> {to} (rootless node)", pod.ns))
}
