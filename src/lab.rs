//! `weft lab`: a small cluster of network namespaces on one machine.
//!
//! ```text
//!                     underlay namespace <name>-ul: bridge br0, 192.168.77.0/24
//!        ┌──────────────────────────┼──────────────────────────┐
//!   <name>-n1 eth0 .1          <name>-n2 eth0 .2          <name>-n3 eth0 .3
//!   weft agent (weft0)         weft agent (weft0)         weft agent, or the kernel's
//!   cni0 10.244.1.1/24         cni0 10.244.2.1/24         flannel.1 (--peer kernel-vxlan)
//!        │                          │                          │
//!   <name>-n1p1 10.244.1.2     <name>-n2p1 10.244.2.2     <name>-n3p1 10.244.3.2
//! ```
//!
//! The lab writes the static datastore, starts one `weft agent` per node,
//! checks pod-to-pod reachability (ping every pair on different nodes, a
//! SHA-256-verified TCP transfer both ways between the first and the last
//! node) and reads every agent's counters. Everything it creates carries the
//! lab's name as prefix, so [`down`] removes it all, also after a crash.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};

use crate::datastore::{format_mac, Lease, NetworkConfig, StaticDatastore, SubnetKey, VxlanData};
use crate::netns::{self, exec, ip};

/// Where lab state (datastore, configs, logs, pids) lives.
pub const STATE_ROOT: &str = "/run/weft/lab";
/// Underlay MTU of the lab's veths.
pub const UNDERLAY_MTU: u32 = 1500;
/// Pod MTU: underlay minus Flannel's VXLAN overhead.
pub const POD_MTU: u32 = UNDERLAY_MTU - 50;
/// Metrics port of every agent (inside its own node namespace).
pub const METRICS_PORT: u16 = 9464;
/// Port the TCP check listens on inside the receiving pod.
const TRANSFER_PORT: u16 = 5201;

/// What runs on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// A `weft agent`.
    Weft,
    /// The kernel's VXLAN device laid out as flanneld lays it out.
    KernelVxlan,
}

/// How to build a lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Name, prefix of every namespace.
    pub name: String,
    /// Number of nodes.
    pub nodes: usize,
    /// Pods per node.
    pub pods_per_node: usize,
    /// Backend of the weft nodes.
    pub backend: String,
    /// Run the last node as a kernel Flannel node.
    pub kernel_peer: bool,
    /// Size of the TCP check transfer, in MiB.
    pub transfer_mib: usize,
    /// Worker threads per agent (`None`: the agent's default).
    pub threads: Option<usize>,
    /// The weft binary the agents run.
    pub weft_bin: PathBuf,
}

impl LabOptions {
    /// Defaults for lab `name`, agents run from `weft_bin`.
    pub fn new(name: &str, weft_bin: PathBuf) -> Self {
        LabOptions {
            name: name.to_string(),
            nodes: 3,
            pods_per_node: 1,
            backend: "vxlan".into(),
            kernel_peer: false,
            transfer_mib: 64,
            threads: None,
            weft_bin,
        }
    }
}

/// A node of the lab.
#[derive(Debug, Clone)]
pub struct Node {
    /// 1-based index.
    pub index: usize,
    /// Namespace.
    pub ns: String,
    /// Underlay address.
    pub ip: Ipv4Addr,
    /// Pod subnet.
    pub subnet: Ipv4Net,
    /// VTEP MAC.
    pub mac: [u8; 6],
    /// What runs on it.
    pub kind: NodeKind,
    /// Its pods.
    pub pods: Vec<Pod>,
}

/// A pod of the lab.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Namespace.
    pub ns: String,
    /// Address.
    pub ip: Ipv4Addr,
}

/// A lab that has been built; [`down`] removes it.
#[derive(Debug)]
pub struct Lab {
    /// Options it was built with.
    pub opts: LabOptions,
    /// Its nodes.
    pub nodes: Vec<Node>,
    /// Its state directory.
    pub dir: PathBuf,
}

/// The outcome of one check.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// Details: timings, hashes, errors.
    pub detail: String,
}

/// Plans the nodes and pods of a lab (pure).
pub fn plan(opts: &LabOptions) -> Vec<Node> {
    (1..=opts.nodes)
        .map(|i| {
            let ns = format!("{}-n{i}", opts.name);
            let subnet =
                Ipv4Net::new(Ipv4Addr::new(10, 244, i as u8, 0), 24).expect("24 is a valid prefix");
            let kind = if opts.kernel_peer && i == opts.nodes {
                NodeKind::KernelVxlan
            } else {
                NodeKind::Weft
            };
            let pods = (1..=opts.pods_per_node)
                .map(|j| Pod {
                    ns: format!("{ns}p{j}"),
                    ip: Ipv4Addr::new(10, 244, i as u8, 1 + j as u8),
                })
                .collect();
            Node {
                index: i,
                ns,
                ip: Ipv4Addr::new(192, 168, 77, i as u8),
                subnet,
                mac: [0x0a, 0x58, 0x0a, 0xf4, i as u8, 0],
                kind,
                pods,
            }
        })
        .collect()
}

/// The static datastore of a lab (pure).
pub fn datastore(nodes: &[Node]) -> StaticDatastore {
    let config = NetworkConfig {
        network: Some("10.244.0.0/16".parse().expect("a valid network")),
        ipv6_network: None,
        enable_ipv4: None,
        enable_ipv6: None,
        subnet_len: Some(24),
        ipv6_subnet_len: None,
        subnet_min: None,
        subnet_max: None,
        backend: serde_json::json!({"Type": "vxlan"}),
    };
    let leases = nodes
        .iter()
        .map(|n| {
            let lease = Lease {
                public_ip: Some(n.ip),
                public_ipv6: None,
                backend_type: "vxlan".into(),
                backend_data: VxlanData {
                    vni: 1,
                    vtep_mac: n.mac,
                }
                .to_value(),
                backend_v6_data: None,
            };
            (
                SubnetKey {
                    v4: Some(n.subnet),
                    v6: None,
                },
                lease,
            )
        })
        .collect();
    StaticDatastore { config, leases }
}

/// Builds the lab and starts its agents; on failure removes what it made.
pub fn up(opts: &LabOptions) -> anyhow::Result<Lab> {
    if opts.nodes < 2 || opts.nodes > 200 {
        bail!("--nodes {}: a lab needs 2 to 200 nodes", opts.nodes);
    }
    if opts.backend != "vxlan" {
        bail!("--backend {}: this build's lab runs: vxlan", opts.backend);
    }
    if netns::exists(&format!("{}-ul", opts.name)) {
        bail!(
            "a lab named {} exists already; remove it with `weft lab down --name {}`",
            opts.name,
            opts.name
        );
    }
    let lab = Lab {
        opts: opts.clone(),
        nodes: plan(opts),
        dir: Path::new(STATE_ROOT).join(&opts.name),
    };
    match build(&lab) {
        Ok(()) => Ok(lab),
        Err(e) => {
            let logs = lab.agent_logs();
            down(&opts.name);
            Err(e.context(logs))
        }
    }
}

fn build(lab: &Lab) -> anyhow::Result<()> {
    let name = &lab.opts.name;
    std::fs::create_dir_all(&lab.dir).with_context(|| format!("creating {}", lab.dir.display()))?;
    let ul = format!("{name}-ul");
    ip(&["netns", "add", &ul])?;
    ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &ul, "link", "set", "br0", "up"])?;
    for n in &lab.nodes {
        ip(&["netns", "add", &n.ns])?;
        let port = format!("n{}", n.index);
        ip(&[
            "-n", &ul, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &n.ns,
        ])?;
        ip(&["-n", &ul, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", &n.ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &n.ns,
            "link",
            "set",
            "eth0",
            "mtu",
            &UNDERLAY_MTU.to_string(),
            "up",
        ])?;
        ip(&[
            "-n",
            &n.ns,
            "addr",
            "add",
            &format!("{}/24", n.ip),
            "dev",
            "eth0",
        ])?;
        netns::sysctl(&n.ns, "net.ipv4.ip_forward", "1")?;
        ip(&["-n", &n.ns, "link", "add", "cni0", "type", "bridge"])?;
        ip(&[
            "-n",
            &n.ns,
            "addr",
            "add",
            &format!("{}/24", crate::datastore::first_host(n.subnet.into())),
            "dev",
            "cni0",
        ])?;
        ip(&[
            "-n",
            &n.ns,
            "link",
            "set",
            "cni0",
            "mtu",
            &POD_MTU.to_string(),
            "up",
        ])?;
        for (j, p) in n.pods.iter().enumerate() {
            ip(&["netns", "add", &p.ns])?;
            let veth = format!("vp{}", j + 1);
            ip(&[
                "-n",
                &n.ns,
                "link",
                "add",
                &veth,
                "mtu",
                &POD_MTU.to_string(),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &p.ns,
            ])?;
            ip(&["-n", &n.ns, "link", "set", &veth, "master", "cni0", "up"])?;
            ip(&["-n", &p.ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &p.ns,
                "link",
                "set",
                "eth0",
                "mtu",
                &POD_MTU.to_string(),
                "up",
            ])?;
            ip(&[
                "-n",
                &p.ns,
                "addr",
                "add",
                &format!("{}/24", p.ip),
                "dev",
                "eth0",
            ])?;
            ip(&[
                "-n",
                &p.ns,
                "route",
                "add",
                "default",
                "via",
                &crate::datastore::first_host(n.subnet.into()).to_string(),
            ])?;
        }
    }
    let ds = datastore(&lab.nodes);
    let ds_path = lab.dir.join("datastore.json");
    std::fs::write(&ds_path, ds.to_json())?;
    for n in &lab.nodes {
        match n.kind {
            NodeKind::Weft => start_agent(lab, n, &ds_path)?,
            NodeKind::KernelVxlan => kernel_flannel_node(n, &lab.nodes)?,
        }
    }
    wait_ready(lab, Duration::from_secs(15))
}

/// Lays out the kernel's VXLAN device on `n` exactly as flanneld does.
fn kernel_flannel_node(n: &Node, all: &[Node]) -> anyhow::Result<()> {
    let ns = n.ns.as_str();
    let ip_s = n.ip.to_string();
    ip(&[
        "-n",
        ns,
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        &ip_s,
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ])?;
    ip(&[
        "-n",
        ns,
        "link",
        "set",
        "flannel.1",
        "address",
        &format_mac(&n.mac),
        "mtu",
        &POD_MTU.to_string(),
        "up",
    ])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{}/32", n.subnet.network()),
        "dev",
        "flannel.1",
    ])?;
    for r in all.iter().filter(|r| r.index != n.index) {
        let gw = r.subnet.network().to_string();
        let mac = format_mac(&r.mac);
        ip(&[
            "-n",
            ns,
            "neigh",
            "replace",
            &gw,
            "lladdr",
            &mac,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ])?;
        exec(
            ns,
            "bridge",
            &[
                "fdb",
                "append",
                &mac,
                "dev",
                "flannel.1",
                "dst",
                &r.ip.to_string(),
            ],
        )?;
        ip(&[
            "-n",
            ns,
            "route",
            "replace",
            &r.subnet.to_string(),
            "via",
            &gw,
            "dev",
            "flannel.1",
            "onlink",
        ])?;
    }
    Ok(())
}

fn start_agent(lab: &Lab, n: &Node, ds_path: &Path) -> anyhow::Result<()> {
    let cfg_path = lab.dir.join(format!("n{}.yaml", n.index));
    let mut cfg = format!(
        "node-name: {}\nnode-ip: {}\nflannel-backend: {}\ndatastore-file: {}\nsubnet-file: {}\nmetrics-addr: 127.0.0.1:{METRICS_PORT}\n",
        n.ns,
        n.ip,
        lab.opts.backend,
        ds_path.display(),
        lab.dir.join(format!("n{}-subnet.env", n.index)).display()
    );
    if let Some(t) = lab.opts.threads {
        let _ = writeln!(cfg, "threads: {t}");
    }
    std::fs::write(&cfg_path, cfg)?;
    let log = std::fs::File::create(lab.dir.join(format!("n{}.log", n.index)))?;
    let cfg_s = cfg_path.display().to_string();
    let bin = lab.opts.weft_bin.display().to_string();
    use std::os::unix::process::CommandExt;
    let child = Command::new("ip")
        .args(["netns", "exec", &n.ns, &bin, "agent", "--config", &cfg_s])
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C meant for the lab reaches the lab,
        // which then stops the agents in order.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting the agent of {}", n.ns))?;
    std::fs::write(
        lab.dir.join(format!("n{}.pid", n.index)),
        child.id().to_string(),
    )?;
    Ok(())
}

fn wait_ready(lab: &Lab, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    for n in lab.nodes.iter().filter(|n| n.kind == NodeKind::Weft) {
        loop {
            if matches!(lab.http_get(n, "/readyz"), Ok(r) if r.starts_with("HTTP/1.0 200")) {
                break;
            }
            if start.elapsed() > limit {
                bail!("the agent of {} was not ready after {:?}", n.ns, limit);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

impl Lab {
    /// The weft nodes.
    pub fn weft_nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.kind == NodeKind::Weft)
    }

    /// `GET path` on a node's agent; the whole response.
    pub fn http_get(&self, n: &Node, path: &str) -> anyhow::Result<String> {
        let req = format!("GET {path} HTTP/1.0\r\n\r\n");
        netns::in_netns(&n.ns, move || -> std::io::Result<String> {
            let addr = SocketAddr::from(([127, 0, 0, 1], METRICS_PORT));
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(req.as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })?
        .map_err(Into::into)
    }

    /// A node's metrics as name{labels} -> value.
    pub fn metrics(&self, n: &Node) -> anyhow::Result<BTreeMap<String, f64>> {
        let text = self.http_get(n, "/metrics")?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("HTTP") && l.contains(' '))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect())
    }

    /// Kills a node's agent with SIGKILL (no cleanup at all) and waits for it.
    pub fn kill_agent(&self, n: &Node) -> anyhow::Result<()> {
        let pid = read_pid(&self.dir.join(format!("n{}.pid", n.index))).context("agent pid")?;
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
        let _ = nix::sys::wait::waitpid(pid, None);
        Ok(())
    }

    /// Starts a node's agent again with its config and waits until it is ready.
    pub fn restart_agent(&self, n: &Node) -> anyhow::Result<()> {
        start_agent(self, n, &self.dir.join("datastore.json"))?;
        let one = Lab {
            opts: self.opts.clone(),
            nodes: vec![n.clone()],
            dir: self.dir.clone(),
        };
        wait_ready(&one, Duration::from_secs(15))
    }

    /// Sends SIGHUP to a node's agent.
    pub fn reload(&self, n: &Node) -> anyhow::Result<()> {
        let pid = read_pid(&self.dir.join(format!("n{}.pid", n.index))).context("agent pid")?;
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP)?;
        Ok(())
    }

    /// Runs every check of the lab.
    pub fn check(&self) -> Vec<Check> {
        let mut checks = Vec::new();
        for a in &self.nodes {
            for b in self.nodes.iter().filter(|b| b.index != a.index) {
                for pa in &a.pods {
                    for pb in &b.pods {
                        checks.push(ping_check(pa, pb));
                    }
                }
            }
        }
        let (first, last) = (&self.nodes[0], &self.nodes[self.nodes.len() - 1]);
        let bytes = self.opts.transfer_mib << 20;
        checks.push(transfer_check(&first.pods[0], &last.pods[0], bytes));
        checks.push(transfer_check(&last.pods[0], &first.pods[0], bytes));
        for n in self.weft_nodes() {
            checks.push(self.counter_check(n));
        }
        checks
    }

    fn counter_check(&self, n: &Node) -> Check {
        let name = format!("counters {} ({})", n.ns, n.ip);
        let m = match self.metrics(n) {
            Ok(m) => m,
            Err(e) => {
                return Check {
                    name,
                    passed: false,
                    detail: format!("{e:#}"),
                }
            }
        };
        let get = |k: &str| m.get(k).copied().unwrap_or(0.0) as u64;
        let decap_drops: u64 = weft_tunnel::DropReason::ALL
            .iter()
            .map(|r| get(&format!("weft_drops_total{{reason=\"{}\"}}", r.label())))
            .sum();
        let (tx, rx) = (
            get("weft_udp_tx_packets_total"),
            get("weft_tun_tx_packets_total"),
        );
        let passed = tx > 0 && rx > 0 && decap_drops == 0;
        let detail = format!(
            "sent {tx} pkts, delivered {rx} pkts, decap drops {decap_drops}, syscalls {}",
            get("weft_syscalls_total")
        );
        Check {
            name,
            passed,
            detail,
        }
    }

    /// The tail of every agent log, for error reports.
    pub fn agent_logs(&self) -> String {
        let mut out = String::from("agent logs:");
        for n in self.weft_nodes() {
            let log = std::fs::read_to_string(self.dir.join(format!("n{}.log", n.index)))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            let _ = write!(
                out,
                "\n--- {} ---\n{}",
                n.ns,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        out
    }
}

fn ping_check(a: &Pod, b: &Pod) -> Check {
    let name = format!("ping {} -> {}", a.ip, b.ip);
    let target = b.ip.to_string();
    let mut last = String::new();
    for _ in 0..3 {
        match exec(&a.ns, "ping", &["-c", "1", "-W", "2", "-q", &target]) {
            Ok(out) => {
                let rtt = out
                    .lines()
                    .find(|l| l.contains("min/avg"))
                    .and_then(|l| l.split('/').nth(4))
                    .unwrap_or("?");
                return Check {
                    name,
                    passed: true,
                    detail: format!("rtt {rtt} ms"),
                };
            }
            Err(e) => last = format!("{e:#}"),
        }
    }
    Check {
        name,
        passed: false,
        detail: last,
    }
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
pub fn transfer_check(a: &Pod, b: &Pod, bytes: usize) -> Check {
    let name = format!("tcp {} MiB {} -> {}", bytes >> 20, a.ip, b.ip);
    match transfer(a, b, bytes) {
        Ok((sent, got, secs)) if sent == got => {
            let gbps = bytes as f64 * 8.0 / secs / 1e9;
            Check {
                name,
                passed: true,
                detail: format!(
                    "sha256 {}… at both ends, {gbps:.2} Gbit/s",
                    &hex(&sent)[..16]
                ),
            }
        }
        Ok((sent, got, _)) => Check {
            name,
            passed: false,
            detail: format!("sha256 sent {} got {}", hex(&sent), hex(&got)),
        },
        Err(e) => Check {
            name,
            passed: false,
            detail: format!("{e:#}"),
        },
    }
}

type Digest32 = [u8; 32];

fn transfer(a: &Pod, b: &Pod, bytes: usize) -> anyhow::Result<(Digest32, Digest32, f64)> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = netns::spawn_in_netns(&b.ns, move || -> anyhow::Result<(Digest32, usize)> {
        let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, TRANSFER_PORT))?;
        l.set_nonblocking(true)?;
        let _ = ready_tx.send(());
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(e).context("accepting the transfer"),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
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
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("receiver did not start")?;
    let dst = SocketAddr::from((b.ip, TRANSFER_PORT));
    let sender = netns::spawn_in_netns(&a.ns, move || -> anyhow::Result<(Digest32, f64)> {
        let start = Instant::now();
        let mut s =
            TcpStream::connect_timeout(&dst, Duration::from_secs(5)).context("connecting")?;
        s.set_write_timeout(Some(Duration::from_secs(20)))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len());
            fill(&mut buf[..n], &mut state);
            s.write_all(&buf[..n]).context("sending")?;
            h.update(&buf[..n]);
            left -= n;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        // Wait for the receiver to close, so the time covers delivery.
        let _ = s.read(&mut [0u8; 1]);
        Ok((h.finalize().into(), start.elapsed().as_secs_f64()))
    })?;
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))?;
    let (got, total) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    let (sent, secs) = sent?;
    if total != bytes {
        bail!("received {total} of {bytes} bytes");
    }
    Ok((sent, got, secs))
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_pid(path: &Path) -> Option<nix::unistd::Pid> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse()
        .ok()
        .map(nix::unistd::Pid::from_raw)
}

/// Removes lab `name`: stops its agents (SIGTERM, then SIGKILL after 5 s),
/// deletes its namespaces and its state directory. Safe to call twice.
pub fn down(name: &str) {
    use nix::sys::signal::{kill, Signal};
    let dir = Path::new(STATE_ROOT).join(name);
    let pids: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
                .filter_map(|e| read_pid(&e.path()))
                .collect()
        })
        .unwrap_or_default();
    for pid in &pids {
        let _ = kill(*pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for pid in &pids {
        while kill(*pid, None).is_ok() && Instant::now() < deadline {
            // Reap it if it is our child; otherwise just wait for it to go.
            let _ = nix::sys::wait::waitpid(*pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            std::thread::sleep(Duration::from_millis(20));
        }
        if kill(*pid, None).is_ok() {
            let _ = kill(*pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(*pid, None);
        }
    }
    let prefix = format!("{name}-");
    let mut spaces: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    // Pods before nodes before the underlay: longest names first.
    spaces.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for ns in spaces {
        let _ = ip(&["netns", "del", &ns]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Formats checks as the table `weft lab` prints.
pub fn table(checks: &[Check]) -> String {
    let width = checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(10)
        .max(5);
    let mut out = format!("{:<width$}  {:<6}  {}\n", "CHECK", "RESULT", "DETAIL");
    for c in checks {
        let _ = writeln!(
            out,
            "{:<width$}  {:<6}  {}",
            c.name,
            if c.passed { "pass" } else { "FAIL" },
            c.detail
        );
    }
    out
}

/// Whether lab names are valid: short (interface and namespace names derive
/// from them) and plain.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 16
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_gives_each_node_its_subnet_and_mac() {
        let mut o = LabOptions::new("t", PathBuf::from("weft"));
        o.kernel_peer = true;
        let nodes = plan(&o);
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[1].subnet.to_string(), "10.244.2.0/24");
        assert_eq!(nodes[1].pods[0].ip, Ipv4Addr::new(10, 244, 2, 2));
        assert_eq!(nodes[2].kind, NodeKind::KernelVxlan);
        assert_eq!(nodes[0].kind, NodeKind::Weft);
        let ds = datastore(&nodes);
        let parsed = StaticDatastore::parse(ds.to_json().as_bytes()).unwrap();
        assert_eq!(parsed.leases.len(), 3);
        let (_, l) = parsed.lease_of("192.168.77.2".parse().unwrap()).unwrap();
        assert_eq!(
            l.vxlan_data(false).unwrap().vtep_mac,
            [0x0a, 0x58, 0x0a, 0xf4, 2, 0]
        );
    }

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
