//! The two-node, two-pod topology of each `weft bench` mode.
//!
//! ```text
//!                underlay namespace <name>-ul: bridge br0 (veths MTU 1500)
//!              ┌──────────────────────┴──────────────────────┐
//!   <name>-n1 eth0 192.168.77.1                   <name>-n2 eth0 192.168.77.2
//!   tunnel: weft agent | flannel.1 |              tunnel: the same as node 1
//!           wireguard-go | boringtun-cli | none (host-gw)
//!   cni0 10.244.1.1/24 (CNI bridge)               cni0 10.244.2.1/24
//!        │                                             │
//!   <name>-n1p1 10.244.1.2  ── iperf3 -c, ping ──>  <name>-n2p1 10.244.2.2 (iperf3 -s, echo)
//! ```
//!
//! weft and host-gw modes are `weft lab` topologies ([`lab::up`]); kernel
//! VXLAN and the userspace WireGuard anchors run the same tunnel on both
//! nodes, which the lab does not do, so they are built here with the lab's
//! plan, names and state directory: [`lab::down`] removes either kind.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipnet::IpNet;

use super::report::CpuSource;
use super::Mode;
use crate::cni::SubnetEnv;
use crate::datastore::{format_mac, subnet_env};
use crate::lab::{self, Lab, LabOptions, Node, NodeKind, Pod, CNI_PATH, STATE_ROOT, UNDERLAY_MTU};
use crate::netns::{self, exec, ip};

/// A built topology: the lab, and what runs its tunnel.
#[derive(Debug)]
pub struct Topology {
    /// The nodes and pods.
    pub lab: Lab,
    /// Processes that carry the tunnel (empty for kernel data planes).
    pub tunnel_pids: Vec<i32>,
    /// What the CPU figure of this mode counts.
    pub cpu_source: CpuSource,
}

impl Topology {
    /// The sending pod (node 1) and the receiving pod (node 2).
    pub fn pods(&self) -> (&Pod, &Pod) {
        (&self.lab.nodes[0].pods[0], &self.lab.nodes[1].pods[0])
    }

    /// The receiving pod's IPv4 address.
    pub fn target(&self) -> anyhow::Result<IpAddr> {
        self.pods().1.ip(false).context("the receiving pod has no IPv4 address")
    }

    /// The tail of the tunnel processes' logs, for error reports.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.lab.nodes {
            if let Ok(log) = std::fs::read_to_string(self.lab.dir.join(format!("n{}.log", n.index))) {
                let tail: Vec<&str> = log.lines().rev().take(6).collect();
                out += &format!("\n--- {} ---\n{}", n.ns, tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
        }
        out
    }
}

/// Builds `mode`'s topology named `name`; on failure removes what it made.
pub fn up(mode: Mode, name: &str, weft_bin: &Path, threads: Option<usize>) -> anyhow::Result<Topology> {
    let mut opts = LabOptions::new(name, weft_bin.to_path_buf());
    opts.nodes = 2;
    opts.pods_per_node = 1;
    opts.threads = threads;
    let lab = match mode {
        Mode::WeftVxlan | Mode::WeftWireguard | Mode::KernelHostgw => {
            opts.backend = match mode {
                Mode::WeftVxlan => "vxlan",
                Mode::WeftWireguard => "wireguard-native",
                _ => "host-gw",
            }
            .into();
            lab::up(&opts)?
        }
        Mode::KernelVxlan | Mode::WireguardGo | Mode::Boringtun => {
            if mode != Mode::KernelVxlan {
                opts.backend = "wireguard-native".into();
                opts.wg_peer = Some(mode.name().into());
            }
            let mut nodes = lab::plan(&opts)?;
            for n in &mut nodes {
                n.kind = if mode == Mode::KernelVxlan { NodeKind::KernelVxlan } else { NodeKind::UserspaceWg };
            }
            let mut lab = Lab { opts, nodes, dir: Path::new(STATE_ROOT).join(name) };
            if let Err(e) = build(&mut lab, mode) {
                let logs = Topology { lab, tunnel_pids: Vec::new(), cpu_source: CpuSource::SystemSoftirq }.logs();
                lab::down(name);
                return Err(e.context(logs));
            }
            lab
        }
    };
    let tunnel_pids = match mode {
        Mode::KernelHostgw | Mode::KernelVxlan => Vec::new(),
        _ => (1..=2)
            .map(|i| {
                let p = lab.dir.join(format!("n{i}.pid"));
                std::fs::read_to_string(&p).ok().and_then(|s| s.trim().parse().ok()).context("tunnel pid")
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let cpu_source = if tunnel_pids.is_empty() { CpuSource::SystemSoftirq } else { CpuSource::Processes };
    let topo = Topology { lab, tunnel_pids, cpu_source };
    let (a, b) = topo.pods();
    if let Err(e) = wait_reachable(a, b, Duration::from_secs(20)) {
        let logs = topo.logs();
        down(&topo);
        return Err(e.context(logs));
    }
    Ok(topo)
}

/// Removes a topology (its processes, namespaces, state and UAPI sockets).
pub fn down(topo: &Topology) {
    lab::down(&topo.lab.opts.name);
    if topo.lab.opts.wg_peer.is_some() || topo.lab.opts.backend == "wireguard-native" {
        for n in &topo.lab.nodes {
            let sock = Path::new("/var/run/wireguard").join(format!("{}.sock", lab::wg_ifname(&topo.lab, n)));
            let _ = std::fs::remove_file(sock);
        }
    }
}

/// Where `program` is: on `PATH`, or in cargo's bin directory (where
/// `cargo install boringtun-cli` puts it).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("bin"));
    std::env::split_paths(&path).chain(cargo).map(|d| d.join(program)).find(|p| p.is_file())
}

/// Pings `b` from `a` until it answers, for at most `limit`.
fn wait_reachable(a: &Pod, b: &Pod, limit: Duration) -> anyhow::Result<()> {
    let to = b.ip(false).context("the receiving pod has no IPv4 address")?.to_string();
    let start = Instant::now();
    loop {
        match exec(&a.ns, "ping", &["-c", "1", "-W", "1", "-q", &to]) {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() > limit => {
                return Err(e.context(format!("{} does not reach {to} after {limit:?}", a.ns)))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn build(lab: &mut Lab, mode: Mode) -> anyhow::Result<()> {
    let name = lab.opts.name.clone();
    if netns::exists(&format!("{name}-ul")) {
        bail!("a topology named {name} exists already");
    }
    std::fs::create_dir_all(&lab.dir).with_context(|| format!("creating {}", lab.dir.display()))?;
    // The underlay, as the lab lays it.
    let ul = format!("{name}-ul");
    ip(&["netns", "add", &ul])?;
    ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &ul, "link", "set", "br0", "up"])?;
    for n in &lab.nodes {
        let ip4 = n.ip4.context("bench topologies are IPv4")?;
        ip(&["netns", "add", &n.ns])?;
        let port = format!("n{}", n.index);
        ip(&["-n", &ul, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &n.ns])?;
        ip(&["-n", &ul, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", &n.ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &n.ns, "link", "set", "eth0", "mtu", &UNDERLAY_MTU.to_string(), "up"])?;
        ip(&["-n", &n.ns, "addr", "add", &format!("{ip4}/24"), "dev", "eth0"])?;
        netns::sysctl(&n.ns, "net.ipv4.ip_forward", "1")?;
    }
    if mode != Mode::KernelVxlan {
        for n in &mut lab.nodes {
            let private = crate::keys::load_or_create(&wg_key_path(&lab.dir, n.index))?;
            n.wg_public = Some(weft_engine::WgDevice::public_of(private));
        }
    }
    for n in &lab.nodes {
        match mode {
            Mode::KernelVxlan => kernel_vxlan_node(lab, n)?,
            _ => userspace_wg_node(lab, n, mode)?,
        }
    }
    for i in 0..lab.nodes.len() {
        let ips = attach_pods(lab, &lab.nodes[i])?;
        for (pod, ips) in lab.nodes[i].pods.iter_mut().zip(ips) {
            pod.ips = ips;
        }
    }
    Ok(())
}

fn wg_key_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("n{index}-wg.key"))
}

fn subnet_env_path(lab: &Lab, n: &Node) -> PathBuf {
    lab.dir.join(format!("n{}-subnet.env", n.index))
}

fn write_subnet_env(lab: &Lab, n: &Node, mtu: u32) -> anyhow::Result<()> {
    let network = lab.opts.cluster_cidrs.iter().copied().find(|c| matches!(c, IpNet::V4(_)));
    std::fs::write(subnet_env_path(lab, n), subnet_env(network, &n.key, None, mtu, false))?;
    Ok(())
}

/// The kernel's VXLAN device on `n`, laid out as flanneld lays it out (the
/// same steps as the lab's kernel Flannel node): flannel.1, VNI 1, port
/// 8472, nolearning; per remote node a route via its subnet's `.0` onlink,
/// a permanent neighbour entry for that `.0` and an FDB entry to its address.
fn kernel_vxlan_node(lab: &Lab, n: &Node) -> anyhow::Result<()> {
    let ns = n.ns.as_str();
    let (Some(ip4), Some(subnet)) = (n.ip4, n.key.v4) else { bail!("the kernel VXLAN node is IPv4 only") };
    let mtu = UNDERLAY_MTU - weft_tunnel::vxlan::OVERHEAD_V4 as u32;
    let ip_s = ip4.to_string();
    let add = ["-n", ns, "link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", &ip_s, "dev", "eth0"];
    ip(&[&add[..], &["dstport", "8472", "nolearning"]].concat())?;
    ip(&["-n", ns, "link", "set", "flannel.1", "address", &format_mac(&n.mac), "mtu", &mtu.to_string(), "up"])?;
    ip(&["-n", ns, "addr", "add", &format!("{}/32", subnet.network()), "dev", "flannel.1"])?;
    for r in lab.nodes.iter().filter(|r| r.index != n.index) {
        let (Some(rip), Some(rsub)) = (r.ip4, r.key.v4) else { continue };
        let gw = rsub.network().to_string();
        let mac = format_mac(&r.mac);
        ip(&["-n", ns, "neigh", "replace", &gw, "lladdr", &mac, "dev", "flannel.1", "nud", "permanent"])?;
        exec(ns, "bridge", &["fdb", "append", &mac, "dev", "flannel.1", "dst", &rip.to_string()])?;
        ip(&["-n", ns, "route", "replace", &rsub.to_string(), "via", &gw, "dev", "flannel.1", "onlink"])?;
    }
    write_subnet_env(lab, n, mtu)
}

/// wireguard-go or boringtun-cli on `n`, configured with `wg` as the lab
/// configures its userspace WireGuard peer: one peer per other node, its
/// pod subnet as allowed IPs, a route per remote subnet on the device.
fn userspace_wg_node(lab: &Lab, n: &Node, mode: Mode) -> anyhow::Result<()> {
    let ns = n.ns.as_str();
    let Some(subnet) = n.key.v4 else { bail!("the userspace WireGuard node is IPv4 only") };
    let ifname = lab::wg_ifname(lab, n);
    let (program, flags): (&str, &[&str]) = match mode {
        Mode::Boringtun => ("boringtun-cli", &["--foreground", "--disable-drop-privileges"]),
        _ => ("wireguard-go", &["-f"]),
    };
    let path = find_program(program).with_context(|| format!("{program} is not installed"))?;
    let log = std::fs::File::create(lab.dir.join(format!("n{}.log", n.index)))?;
    use std::os::unix::process::CommandExt;
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(&path)
        .args(flags)
        .arg(&ifname)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", path.display()))?;
    std::fs::write(lab.dir.join(format!("n{}.pid", n.index)), child.id().to_string())?;
    let sock = Path::new("/var/run/wireguard").join(format!("{ifname}.sock"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if Instant::now() > deadline {
            bail!("{program} made no UAPI socket at {}", sock.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let key = wg_key_path(&lab.dir, n.index).display().to_string();
    exec(ns, "wg", &["set", &ifname, "private-key", &key, "listen-port", "51820"])?;
    for r in lab.nodes.iter().filter(|r| r.index != n.index) {
        let (Some(rip), Some(rsub), Some(public)) = (r.ip4, r.key.v4, r.wg_public) else { continue };
        let public = crate::keys::encode(&public);
        let endpoint = format!("{rip}:51820");
        exec(ns, "wg", &["set", &ifname, "peer", &public, "endpoint", &endpoint, "allowed-ips", &rsub.to_string()])?;
    }
    let mtu = UNDERLAY_MTU - crate::agent::WG_OVERHEAD as u32;
    ip(&["-n", ns, "addr", "add", &format!("{}/32", subnet.network()), "dev", &ifname])?;
    ip(&["-n", ns, "link", "set", &ifname, "mtu", &mtu.to_string(), "up"])?;
    for r in lab.nodes.iter().filter(|r| r.index != n.index) {
        if let Some(rsub) = r.key.v4 {
            ip(&["-n", ns, "route", "replace", &rsub.to_string(), "dev", &ifname])?;
        }
    }
    write_subnet_env(lab, n, mtu)
}

/// Attaches a node's pods with the `bridge` and `host-local` CNI plugins
/// from its `subnet.env`, with the config file names [`lab::down`] reads to
/// detach them. Returns each pod's addresses.
fn attach_pods(lab: &Lab, n: &Node) -> anyhow::Result<Vec<Vec<IpAddr>>> {
    let env_path = subnet_env_path(lab, n);
    let text = std::fs::read_to_string(&env_path).with_context(|| format!("reading {}", env_path.display()))?;
    let env = SubnetEnv::parse(&text).with_context(|| format!("{} is incomplete", env_path.display()))?;
    let ipam = lab.dir.join(format!("ipam-n{}", n.index));
    let conf = crate::cni::bridge_config(&format!("weft-{}", lab.opts.name), "cni0", &env, &ipam.display().to_string());
    let conf_path = lab.dir.join(format!("n{}-cni.json", n.index));
    std::fs::write(&conf_path, conf.to_string())?;
    let mut out = Vec::new();
    for p in &n.pods {
        ip(&["netns", "add", &p.ns])?;
        let conf = std::fs::File::open(&conf_path)?;
        let res = Command::new("ip")
            .args(["netns", "exec", &n.ns, &format!("{CNI_PATH}/bridge")])
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", &p.ns)
            .env("CNI_NETNS", format!("/run/netns/{}", p.ns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_PATH)
            .stdin(conf)
            .output()
            .with_context(|| format!("running {CNI_PATH}/bridge (Debian package containernetworking-plugins)"))?;
        let stdout = String::from_utf8_lossy(&res.stdout);
        if !res.status.success() {
            bail!("CNI ADD for {}: {stdout}{}", p.ns, String::from_utf8_lossy(&res.stderr));
        }
        let v: serde_json::Value = serde_json::from_str(&stdout).context("CNI result")?;
        let ips: Vec<IpAddr> = v["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str()?.parse::<IpNet>().ok().map(|n| n.addr()))
            .collect();
        if ips.is_empty() {
            bail!("the CNI plugins gave {} no address: {stdout}", p.ns);
        }
        out.push(ips);
    }
    Ok(out)
}
