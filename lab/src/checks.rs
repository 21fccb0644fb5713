//! The checks `weft lab` prints: ping between every pair of pods on
//! different nodes, a SHA-256-checked TCP transfer both ways, masquerade
//! (what a server outside the cluster, and a pod, see as the source), that
//! only WireGuard crosses the underlay, every agent's counters, and, with an
//! emulated node, that its agent is the foreign binary.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

use crate::namespaces::{internet_ips, internet_ns, read_pid};
use crate::netns::{self, exec};
use crate::plan::{Check, Lab, Node, Pod};

/// How long a TCP check may make no progress before it fails: long enough
/// for a WireGuard peer to notice a restarted node and handshake again
/// (15 s without a reply, then a new handshake) and TCP to retransmit.
const TRANSFER_STALL: Duration = Duration::from_secs(60);
/// Port the TCP check listens on inside the receiving pod.
const TRANSFER_PORT: u16 = 5201;
/// Port of the masquerade checks' TCP server (in the internet namespace
/// or in a pod), which answers with the peer address it saw.
const SOURCE_PORT: u16 = 5202;

impl Lab {
    /// The address families of the lab's pods.
    fn families(&self) -> Vec<bool> {
        [false, true].into_iter().filter(|v6| self.nodes[0].pods[0].ip(*v6).is_some()).collect()
    }

    /// Runs every check of the lab. With the backend `none` there is no data
    /// plane: pods on different nodes must then *not* reach each other.
    pub fn check(&self) -> Vec<Check> {
        if let Some(m) = &self.opts.multicloud {
            return self.multicloud_checks(m);
        }
        let mut checks = Vec::new();
        let none = self.opts.backend == "none";
        for v6 in self.families() {
            for a in &self.nodes {
                for b in self.nodes.iter().filter(|b| b.index != a.index) {
                    for pa in &a.pods {
                        for pb in &b.pods {
                            // Through a lossy link a ping may need more tries.
                            let tries = if self.opts.impair.is_some() { 30 } else { 3 };
                            let mut c = ping_tries(pa, pb, v6, tries);
                            if none {
                                c.name += " (none: must fail)";
                                c.passed = !c.passed;
                            }
                            checks.push(c);
                        }
                    }
                }
            }
            if none {
                continue;
            }
            let (first, last) = (&self.nodes[0].pods[0], &self.nodes[self.nodes.len() - 1].pods[0]);
            let bytes = self.opts.transfer_mib << 20;
            checks.push(transfer_check(first, last, v6, bytes));
            checks.push(transfer_check(last, first, v6, bytes));
            checks.extend(self.masquerade_checks(v6));
        }
        if self.opts.backend == "wireguard-native" {
            checks.push(self.underlay_check());
        }
        for n in self.weft_nodes() {
            checks.push(self.counter_check(n));
        }
        if let Some(r) = &self.rootless {
            checks.extend(self.rootless_checks(r));
        }
        for n in &self.nodes {
            if let Some(e) = self.opts.emulated_on(n) {
                checks.push(self.arch_check(n, e.arch.rust_arch()));
            }
        }
        if self.opts.impair.is_some() {
            checks.push(self.impair_check());
        }
        checks
    }

    /// The impairment relay's row: what it did each way; it fails when the
    /// relay is gone or saw no datagram.
    fn impair_check(&self) -> Check {
        let n = &self.nodes[0];
        let name = format!("impaired link {} <-> underlay", n.ns);
        let alive = read_pid(&self.dir.join(format!("impair-n{}.pid", n.index)))
            .is_some_and(|p| nix::sys::signal::kill(p, None).is_ok());
        match crate::impair::read_stats(&self.dir, n.index) {
            Ok(s) => Check {
                name,
                passed: alive && s.to_node.datagrams > 0 && s.from_node.datagrams > 0,
                detail: format!(
                    "{}{}: to the node {}; from it {}",
                    s.spec,
                    if alive { "" } else { " (relay gone)" },
                    s.to_node,
                    s.from_node
                ),
            },
            Err(e) => Check { name, passed: false, detail: format!("{e:#}") },
        }
    }

    /// WireGuard replays a node may refuse without fault: the datagrams the
    /// impairment relay duplicated towards it.
    fn duplicated_towards(&self, n: &Node) -> u64 {
        if self.opts.impair.is_none() {
            return 0;
        }
        let Ok(s) = crate::impair::read_stats(&self.dir, self.nodes[0].index) else { return 0 };
        if n.index == self.nodes[0].index {
            s.to_node.duplicated
        } else {
            s.from_node.duplicated
        }
    }

    /// That the agent of `n` reports the CPU architecture `arch` (the
    /// binary built for it, under qemu-user, answered).
    fn arch_check(&self, n: &Node, arch: &str) -> Check {
        let name = format!("agent of {} is an {arch} binary", n.ns);
        let m = match self.metrics(n) {
            Ok(m) => m,
            Err(e) => return Check { name, passed: false, detail: format!("{e:#}") },
        };
        let info = m.keys().find(|k| k.starts_with("weft_build_info{")).cloned().unwrap_or_default();
        let passed = info.contains(&format!("arch=\"{arch}\""));
        Check { name, passed, detail: if info.is_empty() { "no weft_build_info".into() } else { info } }
    }

    /// The masquerade rows of family `v6`: a pod of every weft node reaches
    /// the internet namespace, whose server must see the node's underlay
    /// address; and a pod of the last node reaches a pod of the first,
    /// which must see the true pod address.
    pub fn masquerade_checks(&self, v6: bool) -> Vec<Check> {
        let mut checks = Vec::new();
        let inet = internet_ips(self).into_iter().find(|a| a.is_ipv6() == v6);
        if let (true, Some(inet)) = (self.opts.masquerades(v6), inet) {
            for n in self.weft_nodes() {
                let pod = &n.pods[0];
                let Some(from) = pod.ip(v6) else { continue };
                let name = format!("masquerade {from} -> internet {inet}");
                let want = n.ips().into_iter().find(|a| a.is_ipv6() == v6);
                checks.push(match source_seen(&pod.ns, &internet_ns(self), inet) {
                    Ok(seen) if Some(seen) == want => {
                        Check { name, passed: true, detail: format!("server saw {seen}, the address of {}", n.ns) }
                    }
                    Ok(seen) => Check {
                        name,
                        passed: false,
                        detail: format!("server saw {seen}, not {} of {}", fmt_opt(want), n.ns),
                    },
                    Err(e) => Check { name, passed: false, detail: format!("{e:#}") },
                });
            }
        }
        let (a, b) = (&self.nodes[self.nodes.len() - 1].pods[0], &self.nodes[0].pods[0]);
        if let (Some(from), Some(to)) = (a.ip(v6), b.ip(v6)) {
            let name = format!("true source {from} -> {to}");
            checks.push(match source_seen(&a.ns, &b.ns, to) {
                Ok(seen) if seen == from => {
                    Check { name, passed: true, detail: format!("pod saw {seen}: not masqueraded") }
                }
                Ok(seen) => Check { name, passed: false, detail: format!("pod saw {seen}, not the pod's {from}") },
                Err(e) => Check { name, passed: false, detail: format!("{e:#}") },
            });
        }
        checks
    }

    /// Captures the underlay while a pod pings another with a marker
    /// payload, and checks that only WireGuard crossed it: every datagram
    /// to or from a WireGuard port, no inner address and no marker in clear.
    fn underlay_check(&self) -> Check {
        let name = "underlay carries only WireGuard".to_string();
        match self.underlay_capture() {
            Ok(detail) => Check { name, passed: true, detail },
            Err(e) => Check { name, passed: false, detail: format!("{e:#}") },
        }
    }

    pub(crate) fn counter_check(&self, n: &Node) -> Check {
        let ips = n.ips().iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
        let name = format!("counters {} ({ips})", n.ns);
        let m = match self.metrics(n) {
            Ok(m) => m,
            Err(e) => return Check { name, passed: false, detail: format!("{e:#}") },
        };
        let get = |k: &str| m.get(k).copied().unwrap_or(0.0) as u64;
        let decap_drops: u64 = weft_tunnel::DropReason::ALL
            .iter()
            .map(|r| get(&format!("weft_drops_total{{reason=\"{}\"}}", r.label())))
            .sum();
        // WireGuard datagrams that failed to authenticate or were replayed.
        use weft_tunnel::wireguard::WgError;
        let refused = |e: &WgError| get(&format!("weft_drops_total{{reason=\"{}\"}}", e.label()));
        let replays = refused(&WgError::Replay);
        let wg_refused: u64 = WgError::ALL
            .iter()
            .filter(|e| {
                !matches!(
                    e,
                    WgError::Cookie
                        | WgError::UnknownIndex
                        | WgError::Flood
                        | WgError::StaleTimestamp
                        | WgError::Replay
                )
            })
            .map(refused)
            .sum::<u64>()
            + replays.saturating_sub(self.duplicated_towards(n));
        let (tx, rx) = (get("weft_udp_tx_packets_total"), get("weft_tun_tx_packets_total"));
        let ebpf = |what: &str| get(&format!("weft_ebpf_packets_total{{what=\"{what}\"}}"));
        let ebpf_drops: u64 =
            ["drop_bad_header", "drop_vni", "drop_unknown_source", "drop_vtep_mac", "drop_spoofed_source"]
                .iter()
                .map(|w| ebpf(w))
                .sum();
        let on_ebpf =
            self.opts.dataplane.as_deref() == Some("ebpf") && self.rootless.as_ref().is_none_or(|r| r.index != n.index);
        // Kernel-routed backends move no packet through weft.
        let passed = match self.opts.backend.as_str() {
            // The programs carry the pods' traffic; what they leave to
            // userspace (IPv6 pods, bursts from other nodes, a subnet with no
            // entry yet) may be none.
            "vxlan" if on_ebpf => {
                ebpf("encapsulated") > 0 && ebpf("decapsulated") > 0 && ebpf_drops == 0 && decap_drops == 0
            }
            "vxlan" => tx > 0 && rx > 0 && decap_drops == 0,
            "wireguard-native" => tx > 0 && rx > 0 && wg_refused == 0,
            _ => tx == 0,
        };
        let mut detail = format!(
            "sent {tx} pkts, delivered {rx} pkts, decap drops {decap_drops}, syscalls {}",
            get("weft_syscalls_total")
        );
        if on_ebpf {
            let _ = write!(
                detail,
                "; eBPF encapsulated {}, decapsulated {}, dropped {ebpf_drops}",
                ebpf("encapsulated"),
                ebpf("decapsulated")
            );
        }
        if self.opts.impair.is_some() && self.opts.backend == "wireguard-native" {
            let _ = write!(detail, ", replays refused {replays} (relay duplicated {})", self.duplicated_towards(n));
        }
        Check { name, passed, detail }
    }
}

fn fmt_opt(a: Option<IpAddr>) -> String {
    a.map(|a| a.to_string()).unwrap_or_else(|| "(none)".into())
}

/// Connects from namespace `client` to a one-shot TCP server in namespace
/// `server` at `to`; returns the peer address the server saw (which it
/// also sends back, and the client must agree).
pub fn source_seen(client: &str, server: &str, to: IpAddr) -> anyhow::Result<IpAddr> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let listener = netns::spawn_in_netns(server, move || -> anyhow::Result<IpAddr> {
        let any: IpAddr = if to.is_ipv6() { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
        // The previous check's server may still hold the port for a moment.
        let deadline = Instant::now() + Duration::from_secs(3);
        let l = loop {
            match TcpListener::bind((any, SOURCE_PORT)) {
                Ok(l) => break l,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(e).context("binding the source check's server"),
            }
        };
        l.set_nonblocking(true)?;
        let _ = ready_tx.send(());
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut s, peer) = loop {
            match l.accept() {
                Ok(a) => break a,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(e).context("no connection reached the source check's server"),
            }
        };
        let seen = peer.ip().to_canonical();
        s.set_nonblocking(false)?;
        s.write_all(seen.to_string().as_bytes())?;
        Ok(seen)
    })?;
    match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(()) => {}
        // The server ended without starting: its own error says why.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            let why = match listener.join() {
                Ok(Err(e)) => e,
                Ok(Ok(_)) => anyhow::anyhow!("it returned before listening"),
                Err(_) => anyhow::anyhow!("it panicked"),
            };
            return Err(why.context("the source check's server did not start"));
        }
        Err(e) => return Err(e).context("the source check's server did not start"),
    }
    let dst = SocketAddr::new(to, SOURCE_PORT);
    let told = netns::in_netns(client, move || -> anyhow::Result<String> {
        let mut last = None;
        // A few tries: the first SYN may wait for neighbour resolution.
        for _ in 0..3 {
            match TcpStream::connect_timeout(&dst, Duration::from_secs(3)) {
                Ok(mut s) => {
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    let mut out = String::new();
                    s.read_to_string(&mut out)?;
                    return Ok(out);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(anyhow::anyhow!("connecting to {dst}: {}", last.map(|e| e.to_string()).unwrap_or_default()))
    })?;
    let seen = listener.join().map_err(|_| anyhow::anyhow!("the source check's server panicked"))??;
    let told = told?;
    if told.trim() != seen.to_string() {
        bail!("the server saw {seen} but told the client `{told}`");
    }
    Ok(seen)
}

pub(crate) fn ping_check(a: &Pod, b: &Pod, v6: bool) -> Check {
    ping_tries(a, b, v6, 3)
}

/// [`ping_check`] with `tries` single pings before it fails.
fn ping_tries(a: &Pod, b: &Pod, v6: bool, tries: usize) -> Check {
    let (Some(from), Some(to)) = (a.ip(v6), b.ip(v6)) else {
        return Check { name: format!("ping {} -> {}", a.ns, b.ns), passed: false, detail: "no address".into() };
    };
    ping_from(&a.ns, to, tries, format!("ping {from} -> {to}"))
}

/// Pings `to` from namespace `ns`, up to `tries` times; check `name`.
pub(crate) fn ping_from(ns: &str, to: IpAddr, tries: usize, name: String) -> Check {
    let target = to.to_string();
    let family = if to.is_ipv6() { "-6" } else { "-4" };
    let mut last = String::new();
    for _ in 0..tries {
        match exec(ns, "ping", &[family, "-c", "1", "-W", "2", "-q", &target]) {
            Ok(out) => {
                let rtt = out.lines().find(|l| l.contains("min/avg")).and_then(|l| l.split('/').nth(4)).unwrap_or("?");
                return Check { name, passed: true, detail: format!("rtt {rtt} ms") };
            }
            Err(e) => last = format!("{e:#}"),
        }
    }
    Check { name, passed: false, detail: last }
}

/// Deterministic test data: an xorshift stream.
fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

/// Sends `bytes` of data from pod `a` to pod `b` over TCP and compares the
/// SHA-256 computed at both ends.
pub fn transfer_check(a: &Pod, b: &Pod, v6: bool, bytes: usize) -> Check {
    transfer_with(a, b, v6, bytes, None)
}

/// [`transfer_check`], running `midway` once half the bytes are sent (the
/// sender goes on meanwhile); a transfer that fails earlier never runs it.
pub fn transfer_with(a: &Pod, b: &Pod, v6: bool, bytes: usize, midway: Option<&mut dyn FnMut()>) -> Check {
    let (Some(from), Some(to)) = (a.ip(v6), b.ip(v6)) else {
        return Check { name: format!("tcp {} -> {}", a.ns, b.ns), passed: false, detail: "no address".into() };
    };
    let name = format!("tcp {} MiB {from} -> {to}", bytes >> 20);
    match transfer(a, b, to, bytes, midway) {
        Ok((sent, got, secs)) if sent == got => {
            let gbps = bytes as f64 * 8.0 / secs / 1e9;
            Check {
                name,
                passed: true,
                detail: format!("sha256 {}… at both ends, {gbps:.2} Gbit/s", &hex::encode(sent)[..16]),
            }
        }
        Ok((sent, got, _)) => {
            Check { name, passed: false, detail: format!("sha256 sent {} got {}", hex::encode(sent), hex::encode(got)) }
        }
        Err(e) => Check { name, passed: false, detail: format!("{e:#}") },
    }
}

type Digest32 = [u8; 32];

fn transfer(
    a: &Pod,
    b: &Pod,
    to: IpAddr,
    bytes: usize,
    midway: Option<&mut dyn FnMut()>,
) -> anyhow::Result<(Digest32, Digest32, f64)> {
    let (half_tx, half_rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = netns::spawn_in_netns(&b.ns, move || -> anyhow::Result<(Digest32, usize)> {
        let any: IpAddr = if to.is_ipv6() { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
        let l = TcpListener::bind((any, TRANSFER_PORT))?;
        l.set_nonblocking(true)?;
        let _ = ready_tx.send(());
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(e).context("accepting the transfer"),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(TRANSFER_STALL))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf).context("receiving")?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            total += n;
        }
        Ok((h.finalize().into(), total))
    })?;
    ready_rx.recv_timeout(Duration::from_secs(5)).context("receiver did not start")?;
    let dst = SocketAddr::from((to, TRANSFER_PORT));
    let sender = netns::spawn_in_netns(&a.ns, move || -> anyhow::Result<(Digest32, f64)> {
        let start = Instant::now();
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).context("connecting")?;
        s.set_write_timeout(Some(TRANSFER_STALL))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut left = bytes;
        let mut half = Some(half_tx);
        while left > 0 {
            let n = left.min(buf.len());
            fill(&mut buf[..n], &mut state);
            s.write_all(&buf[..n]).context("sending")?;
            h.update(&buf[..n]);
            left -= n;
            if left <= bytes / 2 {
                if let Some(t) = half.take() {
                    let _ = t.send(());
                }
            }
        }
        s.shutdown(std::net::Shutdown::Write)?;
        // Wait for the receiver to close, so the time covers delivery.
        let _ = s.read(&mut [0u8; 1]);
        Ok((h.finalize().into(), start.elapsed().as_secs_f64()))
    })?;
    if let Some(f) = midway {
        // Only once the sender says so; it dropping the channel means it failed.
        if half_rx.recv().is_ok() {
            f();
        }
    }
    let sent = sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))?;
    let (got, total) = receiver.join().map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    let (sent, secs) = sent?;
    if total != bytes {
        bail!("received {total} of {bytes} bytes");
    }
    Ok((sent, got, secs))
}

/// Formats checks as the table `weft lab` prints.
pub fn table(checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(10).max(5);
    let mut out = format!("{:<width$}  {:<6}  {}\n", "CHECK", "RESULT", "DETAIL");
    for c in checks {
        let _ = writeln!(out, "{:<width$}  {:<6}  {}", c.name, if c.passed { "pass" } else { "FAIL" }, c.detail);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_is_deterministic() {
        let (mut a, mut b) = (vec![0u8; 100], vec![0u8; 100]);
        let (mut s1, mut s2) = (1u64, 1u64);
        fill(&mut a, &mut s1);
        fill(&mut b, &mut s2);
        assert_eq!(a, b);
        assert_ne!(a, vec![0u8; 100]);
    }
}
