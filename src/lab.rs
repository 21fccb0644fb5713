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
//! node), checks masquerade against a server in `<name>-inet` (a namespace
//! outside the cluster on the underlay bridge) and reads every agent's
//! counters. Everything it creates carries the lab's name as prefix, so
//! [`down`] removes it all, also after a crash.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sha2::{Digest, Sha256};

use weft_tunnel::vxlan::OVERHEAD_V4;

use crate::netns::{self, exec, ip};
use weft_control::cni::SubnetEnv;
use weft_control::datastore::{
    format_mac, subnet_env, Lease, NetworkConfig, StaticDatastore, VxlanData, WgData, WG_OVERHEAD,
};
use weft_control::subnet::SubnetKey;

mod kube;
pub use kube::KubeLab;

/// Where lab state (datastore, configs, logs, pids) lives.
pub const STATE_ROOT: &str = "/run/weft/lab";
/// Underlay MTU of the lab's veths.
pub const UNDERLAY_MTU: u32 = 1500;
/// Metrics port of every agent (inside its own node namespace).
pub const METRICS_PORT: u16 = 9464;
/// How long a TCP check may make no progress before it fails: long enough
/// for a WireGuard peer to notice a restarted node and handshake again
/// (15 s without a reply, then a new handshake) and TCP to retransmit.
const TRANSFER_STALL: Duration = Duration::from_secs(60);
/// Client port of the lab's etcd.
pub const ETCD_PORT: u16 = 2379;
/// Port the TCP check listens on inside the receiving pod.
const TRANSFER_PORT: u16 = 5201;
/// Port of the masquerade checks' TCP server (in the internet namespace
/// or in a pod), which answers with the peer address it saw.
const SOURCE_PORT: u16 = 5202;
/// The internet namespace's IPv4 address: outside the node range and every
/// pod network (TEST-NET-3), on the underlay bridge.
pub const INTERNET_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The internet namespace's IPv6 address (documentation range), when the
/// lab has an IPv6 underlay.
pub const INTERNET_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 1);
/// Where Debian's containernetworking-plugins live.
pub const CNI_PATH: &str = "/usr/lib/cni";

/// What runs on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// A `weft agent`.
    Weft,
    /// The kernel's VXLAN device laid out as flanneld lays it out.
    KernelVxlan,
    /// A userspace WireGuard implementation (`wireguard-go`) set up with `wg`.
    UserspaceWg,
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
    /// Backend of the weft nodes: vxlan, host-gw or none.
    pub backend: String,
    /// Run the last node as a kernel Flannel node.
    pub kernel_peer: bool,
    /// Run the last node as a userspace WireGuard peer nobody here wrote:
    /// `wireguard-go`, configured with `wg` from the leases.
    pub wg_peer: Option<String>,
    /// Size of the TCP check transfer, in MiB.
    pub transfer_mib: usize,
    /// Worker threads per agent (`None`: the agent's default).
    pub threads: Option<usize>,
    /// The agents' `busy-poll-us` (`None`: the agent's default, or
    /// `WEFT_LAB_BUSY_POLL_US` from the environment).
    pub busy_poll_us: Option<u32>,
    /// The weft binary the agents run.
    pub weft_bin: PathBuf,
    /// Pod networks: one IPv4 and/or one IPv6 (K3s `cluster-cidr`).
    pub cluster_cidrs: Vec<IpNet>,
    /// Service networks (K3s `service-cidr`); empty: 10.43.0.0/16 and/or
    /// fd00:43::/112, matching the pod networks' families and order.
    pub service_cidrs: Vec<IpNet>,
    /// Where the leases live: `file` (the static datastore) or `etcd` (an
    /// etcd server the lab runs in the underlay namespace).
    pub datastore: String,
    /// Turn every offload of the weft agents off (`offload-tun`,
    /// `offload-udp-gso`, `offload-udp-gro: false`): one packet per TUN read
    /// and write, one datagram per message. `weft lab` also turns them off
    /// when the environment has `WEFT_LAB_OFFLOADS=off`.
    pub offloads_off: bool,
    /// Node subnet prefix lengths (K3s `node-cidr-mask-size-ipv4` / `-ipv6`).
    pub node_mask_v4: u8,
    /// See `node_mask_v4`.
    pub node_mask_v6: u8,
    /// The agents' `ip-masq` (default true).
    pub ip_masq: bool,
    /// The agents' `flannel-ipv6-masq` when the lab has IPv6 (default true).
    pub ipv6_masq: bool,
    /// With `datastore: etcd`: etcd speaks TLS only and requires client
    /// certificates (a CA, server and client certificates made for the lab);
    /// every agent gets `etcd-cafile`, `etcd-certfile`, `etcd-keyfile`.
    pub etcd_tls: bool,
    /// With `datastore: etcd`: etcd has user `root` with a password and
    /// authentication enabled; every agent gets `etcd-username`,
    /// `etcd-password`.
    pub etcd_auth: bool,
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
            wg_peer: None,
            transfer_mib: 64,
            threads: None,
            busy_poll_us: std::env::var("WEFT_LAB_BUSY_POLL_US").ok().and_then(|v| v.parse().ok()),
            offloads_off: std::env::var("WEFT_LAB_OFFLOADS").is_ok_and(|v| v == "off"),
            weft_bin,
            cluster_cidrs: vec!["10.244.0.0/16".parse().expect("a valid network")],
            service_cidrs: Vec::new(),
            datastore: "file".into(),
            node_mask_v4: 24,
            node_mask_v6: 64,
            ip_masq: true,
            ipv6_masq: true,
            etcd_tls: false,
            etcd_auth: false,
        }
    }

    /// Whether the weft nodes masquerade pod traffic of a family leaving
    /// the cluster (never with the backend `none`).
    pub fn masquerades(&self, v6: bool) -> bool {
        self.ip_masq && self.backend != "none" && (!v6 || (self.ipv6_masq && self.cluster_v6().is_some()))
    }

    fn cluster_v4(&self) -> Option<Ipv4Net> {
        self.cluster_cidrs.iter().find_map(|n| if let IpNet::V4(n) = n { Some(*n) } else { None })
    }

    /// The service networks: as given, or defaults of the pod networks' families.
    pub fn service_cidrs(&self) -> Vec<IpNet> {
        if !self.service_cidrs.is_empty() {
            return self.service_cidrs.clone();
        }
        let v4: IpNet = "10.43.0.0/16".parse().expect("a valid network");
        let v6: IpNet = "fd00:43::/112".parse().expect("a valid network");
        self.cluster_cidrs.iter().map(|c| if c.addr().is_ipv4() { v4 } else { v6 }).collect()
    }

    fn cluster_v6(&self) -> Option<Ipv6Net> {
        self.cluster_cidrs.iter().find_map(|n| if let IpNet::V6(n) = n { Some(*n) } else { None })
    }
}

/// A node of the lab.
#[derive(Debug, Clone)]
pub struct Node {
    /// 1-based index.
    pub index: usize,
    /// Namespace.
    pub ns: String,
    /// IPv4 underlay address (when the cluster has IPv4).
    pub ip4: Option<Ipv4Addr>,
    /// IPv6 underlay address (when the cluster has IPv6).
    pub ip6: Option<Ipv6Addr>,
    /// Pod subnets, as a lease key.
    pub key: SubnetKey,
    /// VTEP MAC of the IPv4 underlay (BackendData).
    pub mac: [u8; 6],
    /// VTEP MAC of the IPv6 underlay (BackendV6Data).
    pub mac6: [u8; 6],
    /// What runs on it.
    pub kind: NodeKind,
    /// Its pods.
    pub pods: Vec<Pod>,
    /// Its WireGuard public key (backend wireguard-native, static datastore).
    pub wg_public: Option<[u8; 32]>,
}

impl Node {
    /// The node's underlay addresses, IPv4 first.
    pub fn ips(&self) -> Vec<IpAddr> {
        self.ip4.map(IpAddr::V4).into_iter().chain(self.ip6.map(IpAddr::V6)).collect()
    }
}

/// A pod of the lab.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Namespace.
    pub ns: String,
    /// Addresses given by the CNI plugins (IPv4 first).
    pub ips: Vec<IpAddr>,
}

impl Pod {
    /// The pod's address of one family.
    pub fn ip(&self, v6: bool) -> Option<IpAddr> {
        self.ips.iter().copied().find(|a| a.is_ipv6() == v6)
    }
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
    /// With `--datastore kube`: the API server stand-in the agents use.
    pub kube: Option<std::sync::Arc<KubeLab>>,
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

/// The `i`-th subnet of length `len` in `net` (pure).
fn nth_v4(net: Ipv4Net, len: u8, i: usize) -> Option<Ipv4Net> {
    let base = u32::from(net.network()).checked_add((i as u32).checked_mul(1u32.checked_shl(32 - len as u32)?)?)?;
    let sub = Ipv4Net::new(Ipv4Addr::from(base), len).ok()?;
    net.contains(&sub).then_some(sub)
}

fn nth_v6(net: Ipv6Net, len: u8, i: usize) -> Option<Ipv6Net> {
    let base = u128::from(net.network()).checked_add((i as u128).checked_mul(1u128.checked_shl(128 - len as u32)?)?)?;
    let sub = Ipv6Net::new(Ipv6Addr::from(base), len).ok()?;
    net.contains(&sub).then_some(sub)
}

/// Plans the nodes of a lab (pure). Node `i` takes the `i`-th node subnet of
/// each pod network (the first is skipped, as Flannel skips it), the
/// underlay addresses 192.168.77.`i` and fd77::`i`.
pub fn plan(opts: &LabOptions) -> anyhow::Result<Vec<Node>> {
    let (v4, v6) = (opts.cluster_v4(), opts.cluster_v6());
    if v4.is_none() && v6.is_none() {
        bail!("--cluster-cidr: give an IPv4 and/or an IPv6 network");
    }
    (1..=opts.nodes)
        .map(|i| {
            let key =
                SubnetKey {
                    v4: match v4 {
                        Some(n) => Some(nth_v4(n, opts.node_mask_v4, i).with_context(|| {
                            format!("{n} has no room for {i} node subnets of /{}", opts.node_mask_v4)
                        })?),
                        None => None,
                    },
                    v6: match v6 {
                        Some(n) => Some(nth_v6(n, opts.node_mask_v6, i).with_context(|| {
                            format!("{n} has no room for {i} node subnets of /{}", opts.node_mask_v6)
                        })?),
                        None => None,
                    },
                };
            let ns = format!("{}-n{i}", opts.name);
            let kind = match (i == opts.nodes, opts.kernel_peer, &opts.wg_peer) {
                (true, true, _) => NodeKind::KernelVxlan,
                (true, false, Some(_)) => NodeKind::UserspaceWg,
                _ => NodeKind::Weft,
            };
            let pods = (1..=opts.pods_per_node).map(|j| Pod { ns: format!("{ns}p{j}"), ips: Vec::new() }).collect();
            Ok(Node {
                index: i,
                ns,
                ip4: v4.map(|_| Ipv4Addr::new(192, 168, 77, i as u8)),
                ip6: v6.map(|_| Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, i as u16)),
                key,
                mac: [0x0a, 0x58, 0x0a, 0xf4, i as u8, 0],
                mac6: [0x0a, 0x58, 0x0a, 0xf6, i as u8, 0],
                kind,
                pods,
                wg_public: None,
            })
        })
        .collect()
}

/// The backend's name in Flannel's config and leases.
fn lease_backend(backend: &str) -> &str {
    if backend == "wireguard-native" {
        "wireguard"
    } else {
        backend
    }
}

/// The static datastore of a lab (pure).
pub fn datastore(opts: &LabOptions, nodes: &[Node]) -> StaticDatastore {
    let config = NetworkConfig::for_cluster(
        opts.cluster_v4().map(|n| (n, opts.node_mask_v4)),
        opts.cluster_v6().map(|n| (n, opts.node_mask_v6)),
        lease_backend(&opts.backend),
    );
    let leases = nodes
        .iter()
        .map(|n| {
            let data = |mac, v6: bool| match (opts.backend.as_str(), n.wg_public) {
                ("vxlan", _) => VxlanData { vni: 1, vtep_mac: mac }.to_value(),
                ("wireguard-native", Some(k)) => {
                    WgData { public_key: k, port: if v6 { 51821 } else { 51820 } }.to_value()
                }
                _ => serde_json::Value::Null,
            };
            let tunnel = matches!(opts.backend.as_str(), "vxlan" | "wireguard-native");
            let lease = Lease {
                public_ip: n.ip4,
                public_ipv6: n.ip6,
                backend_type: lease_backend(&opts.backend).to_string(),
                backend_data: if n.ip4.is_some() { data(n.mac, false) } else { data(n.mac6, true) },
                backend_v6_data: n.ip6.filter(|_| tunnel).map(|_| data(n.mac6, true)),
            };
            (n.key, lease)
        })
        .collect();
    StaticDatastore { config, leases }
}

/// Builds the lab and starts its agents; on failure removes what it made.
pub fn up(opts: &LabOptions) -> anyhow::Result<Lab> {
    if opts.nodes < 2 || opts.nodes > 200 {
        bail!("--nodes {}: a lab needs 2 to 200 nodes", opts.nodes);
    }
    if !["vxlan", "host-gw", "wireguard-native", "none"].contains(&opts.backend.as_str()) {
        bail!("--backend {}: this build's lab runs vxlan, host-gw, wireguard-native or none", opts.backend);
    }
    if opts.kernel_peer && (opts.backend != "vxlan" || opts.cluster_v4().is_none()) {
        bail!("--peer kernel-vxlan needs --backend vxlan and an IPv4 cluster-cidr");
    }
    if let Some(p) = &opts.wg_peer {
        let known = ["wireguard-go", "boringtun"].contains(&p.as_str());
        if !known || opts.backend != "wireguard-native" || opts.cluster_v4().is_none() || opts.kernel_peer {
            bail!("--peer {p}: wireguard-go and boringtun need --backend wireguard-native and an IPv4 cluster-cidr");
        }
    }
    if netns::exists(&format!("{}-ul", opts.name)) {
        bail!("a lab named {} exists already; remove it with `weft lab down --name {}`", opts.name, opts.name);
    }
    if !["file", "etcd", "kube"].contains(&opts.datastore.as_str()) {
        bail!("--datastore {}: file, etcd or kube", opts.datastore);
    }
    if (opts.etcd_tls || opts.etcd_auth) && opts.datastore != "etcd" {
        bail!("--etcd-tls and --etcd-auth need --datastore etcd");
    }
    let mut lab =
        Lab { opts: opts.clone(), nodes: plan(opts)?, dir: Path::new(STATE_ROOT).join(&opts.name), kube: None };
    match build(&mut lab) {
        Ok(()) => Ok(lab),
        Err(e) => {
            let logs = lab.agent_logs();
            down(&opts.name);
            Err(e.context(logs))
        }
    }
}

/// The lab's state directory, its underlay namespace with bridge `br0`, and
/// every node's namespace joined to it by a veth (`eth0`, MTU
/// [`UNDERLAY_MTU`]), addressed, forwarding.
pub(crate) fn build_underlay(lab: &Lab) -> anyhow::Result<()> {
    let name = lab.opts.name.clone();
    std::fs::create_dir_all(&lab.dir).with_context(|| format!("creating {}", lab.dir.display()))?;
    let ul = format!("{name}-ul");
    ip(&["netns", "add", &ul])?;
    ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &ul, "link", "set", "br0", "up"])?;
    for n in &lab.nodes {
        ip(&["netns", "add", &n.ns])?;
        let port = format!("n{}", n.index);
        ip(&["-n", &ul, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &n.ns])?;
        ip(&["-n", &ul, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", &n.ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &n.ns, "link", "set", "eth0", "mtu", &UNDERLAY_MTU.to_string(), "up"])?;
        if let Some(a) = n.ip4 {
            ip(&["-n", &n.ns, "addr", "add", &format!("{a}/24"), "dev", "eth0"])?;
        }
        if let Some(a) = n.ip6 {
            ip(&["-n", &n.ns, "addr", "add", &format!("{a}/64"), "dev", "eth0", "nodad"])?;
        }
        netns::sysctl(&n.ns, "net.ipv4.ip_forward", "1")?;
        netns::sysctl(&n.ns, "net.ipv6.conf.all.forwarding", "1")?;
    }
    Ok(())
}

fn build(lab: &mut Lab) -> anyhow::Result<()> {
    build_underlay(lab)?;
    build_internet(lab)?;
    if lab.opts.backend == "wireguard-native" {
        // Each node's key, made as the agent would make it; the static
        // datastore announces the public halves (with etcd, the agents'
        // leases do, and only the userspace peer's key is made here).
        let file = lab.opts.datastore == "file";
        for n in lab.nodes.iter_mut().filter(|n| file || n.kind == NodeKind::UserspaceWg) {
            let private = weft_control::keys::load_or_create(&wg_key_path(&lab.dir, n.index))?;
            n.wg_public = Some(weft_engine::WgDevice::public_of(private));
        }
    }
    let ds = datastore(&lab.opts, &lab.nodes);
    let ds_path = lab.dir.join("datastore.json");
    if lab.opts.datastore == "etcd" {
        start_etcd(lab)?;
        if lab.opts.etcd_auth {
            enable_etcd_auth(lab)?;
        }
        // The operator's part: the network config, and the leases of the
        // kernel Flannel nodes written as flanneld writes them.
        let config = ds.config.clone();
        let kernel: Vec<(String, String)> = lab
            .nodes
            .iter()
            .filter(|n| matches!(n.kind, NodeKind::KernelVxlan | NodeKind::UserspaceWg))
            .filter_map(|n| Some((n.key.to_string(), serde_json::to_string(ds.leases.get(&n.key)?).ok()?)))
            .collect();
        lab.with_etcd(move |store| {
            store.put_network_config(&config)?;
            for (key, json) in &kernel {
                store.put_lease_raw(key, json)?;
            }
            Ok(())
        })?;
    } else if lab.opts.datastore == "kube" {
        let kube = kube::start(lab)?;
        // A kernel Flannel node's lease exists only as the annotations
        // flanneld writes on its Node.
        for n in lab.nodes.iter().filter(|n| n.kind != NodeKind::Weft) {
            if let Some(lease) = ds.leases.get(&n.key) {
                kube.annotate_as_flannel(&n.ns, lease)?;
            }
        }
        lab.kube = Some(std::sync::Arc::new(kube));
    } else {
        std::fs::write(&ds_path, ds.to_json())?;
    }
    for n in lab.weft_nodes() {
        start_agent(lab, n, &ds_path)?;
    }
    wait_ready(lab, Duration::from_secs(20))?;
    if let Some(kube) = lab.kube.clone() {
        // The agents announced their VTEP MACs and keys: learn them.
        for n in lab.nodes.iter_mut().filter(|n| n.kind == NodeKind::Weft) {
            let lease = kube.lease_of(&n.ns, &ds.config)?;
            learn(n, &lease);
        }
    }
    if lab.opts.datastore == "etcd" {
        // The agents chose their subnets; learn them, and their VTEP MACs.
        let leases = lab.with_etcd(|store| Ok(store.leases()?.leases))?;
        for n in &mut lab.nodes {
            let ips = n.ips();
            let (key, lease) = leases
                .iter()
                .find(|(_, l)| l.public_ips().any(|a| ips.contains(&a)))
                .with_context(|| format!("no lease in etcd for {}", n.ns))?;
            n.key = *key;
            learn(n, lease);
        }
    }
    for n in &lab.nodes {
        match n.kind {
            NodeKind::KernelVxlan => kernel_flannel_node(lab, n)?,
            NodeKind::UserspaceWg => userspace_wg_node(lab, n)?,
            NodeKind::Weft => {}
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

/// What a node's own lease says that the lab did not choose: its VTEP MACs
/// and WireGuard key.
fn learn(n: &mut Node, lease: &Lease) {
    if let Ok(d) = lease.vxlan_data(false) {
        n.mac = d.vtep_mac;
    }
    if let Ok(d) = lease.vxlan_data(true) {
        n.mac6 = d.vtep_mac;
    }
    if let Ok(d) = lease.wireguard_data(false) {
        n.wg_public = Some(d.public_key);
    }
}

/// Gives the underlay bridge its own address (`.254`, or `fd77::fe` in an
/// IPv6-only lab), where the lab's services (etcd, the API server) listen.
fn underlay_service_address(lab: &Lab) -> anyhow::Result<()> {
    let ul = format!("{}-ul", lab.opts.name);
    if lab.opts.cluster_v4().is_some() {
        ip(&["-n", &ul, "addr", "replace", "192.168.77.254/24", "dev", "br0"])?;
    } else {
        ip(&["-n", &ul, "addr", "replace", "fd77::fe/64", "dev", "br0", "nodad"])?;
    }
    ip(&["-n", &ul, "link", "set", "lo", "up"])
}

/// The namespace standing for the world outside the cluster.
pub fn internet_ns(lab: &Lab) -> String {
    format!("{}-inet", lab.opts.name)
}

/// The internet namespace's addresses, IPv4 first: one per underlay family.
pub fn internet_ips(lab: &Lab) -> Vec<IpAddr> {
    let v4 = lab.opts.cluster_v4().map(|_| IpAddr::V4(INTERNET_V4));
    let v6 = lab.opts.cluster_v6().map(|_| IpAddr::V6(INTERNET_V6));
    v4.into_iter().chain(v6).collect()
}

/// The internet namespace `<name>-inet`, on the underlay bridge with
/// addresses outside the node range; every node and it reach each other
/// on-link. It is outside the cluster: traffic from pods must reach it
/// masqueraded.
fn build_internet(lab: &Lab) -> anyhow::Result<()> {
    let (ul, inet) = (format!("{}-ul", lab.opts.name), internet_ns(lab));
    ip(&["netns", "add", &inet])?;
    ip(&["-n", &ul, "link", "add", "inet", "type", "veth", "peer", "name", "eth0", "netns", &inet])?;
    ip(&["-n", &ul, "link", "set", "inet", "master", "br0", "up"])?;
    ip(&["-n", &inet, "link", "set", "lo", "up"])?;
    ip(&["-n", &inet, "link", "set", "eth0", "mtu", &UNDERLAY_MTU.to_string(), "up"])?;
    for a in internet_ips(lab) {
        let (own, nodes) = match a {
            IpAddr::V4(a) => (format!("{a}/24"), "192.168.77.0/24"),
            IpAddr::V6(a) => (format!("{a}/64"), "fd77::/64"),
        };
        let nodad: &[&str] = if a.is_ipv6() { &["nodad"] } else { &[] };
        ip(&[&["-n", &inet, "addr", "add", &own, "dev", "eth0"][..], nodad].concat())?;
        ip(&["-n", &inet, "route", "add", nodes, "dev", "eth0"])?;
        let outside = IpNet::new(a, if a.is_ipv6() { 64 } else { 24 })?.trunc().to_string();
        for n in &lab.nodes {
            ip(&["-n", &n.ns, "route", "add", &outside, "dev", "eth0"])?;
        }
    }
    Ok(())
}

/// The lab's etcd client URL: an address of the underlay bridge.
pub fn etcd_url(lab: &Lab) -> String {
    let scheme = if lab.opts.etcd_tls { "https" } else { "http" };
    format!("{scheme}://{}", etcd_authority(lab))
}

/// `host:port` of the lab's etcd.
fn etcd_authority(lab: &Lab) -> String {
    if lab.opts.cluster_v4().is_some() {
        format!("192.168.77.254:{ETCD_PORT}")
    } else {
        format!("[fd77::fe]:{ETCD_PORT}")
    }
}

/// The address etcd's server certificate is made for.
fn etcd_ip(lab: &Lab) -> IpAddr {
    if lab.opts.cluster_v4().is_some() {
        IpAddr::from([192, 168, 77, 254])
    } else {
        IpAddr::from([0xfd77, 0, 0, 0, 0, 0, 0, 0xfe])
    }
}

/// The lab's etcd certificates (with `etcd_tls`), in `<lab dir>/etcd-tls`.
pub fn etcd_certs(lab: &Lab) -> crate::etcd_certs::EtcdCerts {
    crate::etcd_certs::EtcdCerts::in_dir(&lab.dir.join("etcd-tls"))
}

/// The user the lab's etcd knows with `etcd_auth`.
pub const ETCD_USER: &str = "root";

/// Where the lab keeps its etcd password (mode 0600).
fn etcd_password_path(lab: &Lab) -> PathBuf {
    lab.dir.join("etcd-password")
}

/// What a client of the lab's etcd needs: the lab's TLS files, and the user
/// once authentication is on.
pub fn etcd_security(lab: &Lab) -> weft_control::etcd_tls::EtcdSecurity {
    let mut sec = weft_control::etcd_tls::EtcdSecurity::default();
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
fn enable_etcd_auth(lab: &Lab) -> anyhow::Result<()> {
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
fn start_etcd(lab: &Lab) -> anyhow::Result<()> {
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
            crate::etcd_certs::EtcdCerts::make(&dir, &format!("{} lab CA", lab.opts.name), etcd_ip(lab))?;
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

/// Where a node's WireGuard private key is.
pub(crate) fn wg_key_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("n{index}-wg.key"))
}

/// Where a node's `subnet.env` is.
fn subnet_env_path(lab: &Lab, n: &Node) -> PathBuf {
    lab.dir.join(format!("n{}-subnet.env", n.index))
}

/// Attaches a node's pods with the real `bridge` and `host-local` CNI
/// plugins, from the node's `subnet.env` as Flannel's CNI plugin does.
/// Returns each pod's addresses.
pub(crate) fn attach_pods(lab: &Lab, n: &Node) -> anyhow::Result<Vec<Vec<IpAddr>>> {
    let env_path = subnet_env_path(lab, n);
    let text = std::fs::read_to_string(&env_path).with_context(|| format!("reading {}", env_path.display()))?;
    let env = SubnetEnv::parse(&text).with_context(|| format!("{} is incomplete", env_path.display()))?;
    let ipam = lab.dir.join(format!("ipam-n{}", n.index));
    let conf =
        weft_control::cni::bridge_config(&format!("weft-{}", lab.opts.name), "cni0", &env, &ipam.display().to_string());
    let conf_path = lab.dir.join(format!("n{}-cni.json", n.index));
    std::fs::write(&conf_path, conf.to_string())?;
    let mut out = Vec::new();
    for p in &n.pods {
        ip(&["netns", "add", &p.ns])?;
        let result = cni(&n.ns, "ADD", &p.ns, &conf_path)?;
        let v: serde_json::Value = serde_json::from_str(&result).context("CNI result")?;
        let ips: Vec<IpAddr> = v["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str()?.parse::<IpNet>().ok().map(|n| n.addr()))
            .collect();
        if ips.is_empty() {
            bail!("the CNI plugins gave {} no address: {result}", p.ns);
        }
        out.push(ips);
    }
    Ok(out)
}

/// Runs the bridge plugin with `command` for pod namespace `pod`, the plugin
/// itself running in the node's namespace; returns its stdout.
fn cni(node_ns: &str, command: &str, pod: &str, conf_path: &Path) -> anyhow::Result<String> {
    let conf = std::fs::File::open(conf_path)?;
    let out = Command::new("ip")
        .args(["netns", "exec", node_ns, &format!("{CNI_PATH}/bridge")])
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", pod)
        .env("CNI_NETNS", format!("/run/netns/{pod}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_PATH)
        .stdin(conf)
        .output()
        .with_context(|| format!("running {CNI_PATH}/bridge (Debian package containernetworking-plugins)"))?;
    if !out.status.success() {
        bail!(
            "CNI {command} for {pod}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Lays out the kernel's VXLAN device on `n` exactly as flanneld does, and
/// writes the `subnet.env` flanneld would write.
pub(crate) fn kernel_flannel_node(lab: &Lab, n: &Node) -> anyhow::Result<()> {
    let ns = n.ns.as_str();
    let (Some(ip4), Some(subnet)) = (n.ip4, n.key.v4) else { bail!("the kernel Flannel node is IPv4 only") };
    let mtu = (UNDERLAY_MTU - OVERHEAD_V4 as u32).to_string();
    let ip_s = ip4.to_string();
    let add = ["-n", ns, "link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", &ip_s, "dev", "eth0"];
    ip(&[&add[..], &["dstport", "8472", "nolearning"]].concat())?;
    ip(&["-n", ns, "link", "set", "flannel.1", "address", &format_mac(&n.mac), "mtu", &mtu, "up"])?;
    ip(&["-n", ns, "addr", "add", &format!("{}/32", subnet.network()), "dev", "flannel.1"])?;
    for r in lab.nodes.iter().filter(|r| r.index != n.index) {
        let (Some(rip), Some(rsub)) = (r.ip4, r.key.v4) else { continue };
        let gw = rsub.network().to_string();
        let mac = format_mac(&r.mac);
        ip(&["-n", ns, "neigh", "replace", &gw, "lladdr", &mac, "dev", "flannel.1", "nud", "permanent"])?;
        exec(ns, "bridge", &["fdb", "append", &mac, "dev", "flannel.1", "dst", &rip.to_string()])?;
        ip(&["-n", ns, "route", "replace", &rsub.to_string(), "via", &gw, "dev", "flannel.1", "onlink"])?;
    }
    let env = subnet_env(lab.opts.cluster_v4().map(IpNet::V4), &n.key, None, UNDERLAY_MTU - OVERHEAD_V4 as u32, false);
    std::fs::write(subnet_env_path(lab, n), env)?;
    Ok(())
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

/// The interface name of a lab's userspace WireGuard peer: unique across
/// labs, since its UAPI socket lives in the shared `/var/run/wireguard`.
pub fn wg_ifname(lab: &Lab, n: &Node) -> String {
    let h = lab.opts.name.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
    format!("wg{:06x}n{}", h & 0xff_ffff, n.index)
}

/// Runs the userspace WireGuard peer (`wireguard-go`, or `boringtun-cli`)
/// on `n` and configures it with `wg` from the other nodes' leases, the way a
/// WireGuard operator would; writes the `subnet.env` a Flannel node would have.
pub(crate) fn userspace_wg_node(lab: &Lab, n: &Node) -> anyhow::Result<()> {
    let ns = n.ns.as_str();
    let (Some(subnet), Some(_)) = (n.key.v4, n.ip4) else { bail!("the userspace WireGuard peer is IPv4 only") };
    let ifname = wg_ifname(lab, n);
    let log = std::fs::File::create(lab.dir.join(format!("n{}.log", n.index)))?;
    use std::os::unix::process::CommandExt;
    let program: &[&str] = match lab.opts.wg_peer.as_deref() {
        Some("boringtun") => &["boringtun-cli", "--foreground", "--disable-drop-privileges"],
        _ => &["wireguard-go", "-f"],
    };
    let path = find_program(program[0]).unwrap_or_else(|| PathBuf::from(program[0]));
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(&path)
        .args(&program[1..])
        .arg(&ifname)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| {
            format!("starting {} (wireguard-go: Debian package; boringtun-cli: cargo install)", program[0])
        })?;
    std::fs::write(lab.dir.join(format!("n{}.pid", n.index)), child.id().to_string())?;
    let sock = Path::new("/var/run/wireguard").join(format!("{ifname}.sock"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if Instant::now() > deadline {
            bail!("{} made no UAPI socket at {}", program[0], sock.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let key = wg_key_path(&lab.dir, n.index).display().to_string();
    exec(ns, "wg", &["set", &ifname, "private-key", &key, "listen-port", "51820"])?;
    for r in lab.nodes.iter().filter(|r| r.index != n.index) {
        let (Some(rip), Some(rsub), Some(public)) = (r.ip4, r.key.v4, r.wg_public) else { continue };
        let public = weft_control::keys::encode(&public);
        let endpoint = format!("{rip}:51820");
        exec(ns, "wg", &["set", &ifname, "peer", &public, "endpoint", &endpoint, "allowed-ips", &rsub.to_string()])?;
    }
    let mtu = (UNDERLAY_MTU - WG_OVERHEAD as u32).to_string();
    ip(&["-n", ns, "addr", "add", &format!("{}/32", subnet.network()), "dev", &ifname])?;
    ip(&["-n", ns, "link", "set", &ifname, "mtu", &mtu, "up"])?;
    for r in lab.nodes.iter().filter(|r| r.index != n.index) {
        if let Some(rsub) = r.key.v4 {
            ip(&["-n", ns, "route", "replace", &rsub.to_string(), "dev", &ifname])?;
        }
    }
    let env = subnet_env(lab.opts.cluster_v4().map(IpNet::V4), &n.key, None, UNDERLAY_MTU - WG_OVERHEAD as u32, false);
    std::fs::write(subnet_env_path(lab, n), env)?;
    Ok(())
}

fn start_agent(lab: &Lab, n: &Node, ds_path: &Path) -> anyhow::Result<()> {
    let cfg_path = lab.dir.join(format!("n{}.yaml", n.index));
    let node_ip = n.ips().iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
    let list = |nets: &[IpNet]| nets.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",");
    let o = &lab.opts;
    let mut cfg = format!(
        "node-name: {}\nnode-ip: {node_ip}\nflannel-backend: {}\ncluster-cidr: {}\nservice-cidr: {}\n\
         node-cidr-mask-size-ipv4: {}\nnode-cidr-mask-size-ipv6: {}\nsubnet-file: {}\nmetrics-addr: 127.0.0.1:{METRICS_PORT}\n",
        n.ns,
        o.backend,
        list(&o.cluster_cidrs),
        list(&o.service_cidrs()),
        o.node_mask_v4,
        o.node_mask_v6,
        subnet_env_path(lab, n).display()
    );
    if o.backend == "wireguard-native" {
        let _ = writeln!(cfg, "wireguard-key-file: {}", wg_key_path(&lab.dir, n.index).display());
        // The UAPI socket is named after the device, in a directory all
        // namespaces share: the name must be unique.
        let _ = writeln!(cfg, "tun-name: {}", wg_ifname(lab, n));
    }
    match o.datastore.as_str() {
        "etcd" => {
            let _ = writeln!(cfg, "etcd-endpoints: {}", etcd_url(lab));
            let sec = etcd_security(lab);
            for (key, path) in
                [("etcd-cafile", &sec.ca_file), ("etcd-certfile", &sec.cert_file), ("etcd-keyfile", &sec.key_file)]
            {
                if let Some(p) = path {
                    let _ = writeln!(cfg, "{key}: {}", p.display());
                }
            }
            if let (Some(u), Some(pw)) = (&sec.username, &sec.password) {
                let _ = writeln!(cfg, "etcd-username: {u}\netcd-password: {pw}");
            }
        }
        "kube" => {
            let kubeconfig = lab.dir.join("kubeconfig.yaml");
            let _ = writeln!(cfg, "kube-subnet-mgr: true\nkubeconfig: {}", kubeconfig.display());
        }
        _ => {
            let _ = writeln!(cfg, "datastore-file: {}", ds_path.display());
        }
    }
    if let Some(t) = lab.opts.threads {
        let _ = writeln!(cfg, "threads: {t}");
    }
    if lab.opts.offloads_off {
        let _ = writeln!(cfg, "offload-tun: false\noffload-udp-gso: false\noffload-udp-gro: false");
    }
    if let Some(us) = lab.opts.busy_poll_us {
        let _ = writeln!(cfg, "busy-poll-us: {us}");
    }
    if !o.ip_masq {
        let _ = writeln!(cfg, "ip-masq: false");
    }
    if o.ipv6_masq && o.cluster_v6().is_some() && o.backend != "none" {
        let _ = writeln!(cfg, "flannel-ipv6-masq: true");
    }
    std::fs::write(&cfg_path, cfg)?;
    if lab.opts.etcd_auth {
        // It holds the etcd password.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cfg_path, std::fs::Permissions::from_mode(0o600))?;
    }
    let log = std::fs::File::create(lab.dir.join(format!("n{}.log", n.index)))?;
    let cfg_s = cfg_path.display().to_string();
    let bin = lab.opts.weft_bin.display().to_string();
    use std::os::unix::process::CommandExt;
    let child = Command::new("ip")
        .args(["netns", "exec", &n.ns, &bin, "agent", "--config", &cfg_s])
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C meant for the lab reaches the lab,
        // which then stops the agents in order.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting the agent of {}", n.ns))?;
    std::fs::write(lab.dir.join(format!("n{}.pid", n.index)), child.id().to_string())?;
    Ok(())
}

/// Whether an HTTP response's status is 200.
pub fn http_ok(response: &str) -> bool {
    response.lines().next().and_then(|l| l.split_whitespace().nth(1)) == Some("200")
}

fn wait_ready(lab: &Lab, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    for n in lab.nodes.iter().filter(|n| n.kind == NodeKind::Weft) {
        loop {
            if matches!(lab.http_get(n, "/readyz"), Ok(r) if http_ok(&r)) {
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

    /// Runs `f` with a client of the lab's etcd (from inside the underlay
    /// namespace, where etcd listens).
    pub fn with_etcd<T: Send + 'static>(
        &self,
        f: impl FnOnce(&weft_control::etcd::EtcdStore) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let url = etcd_url(self);
        let sec = etcd_security(self);
        netns::in_netns(&format!("{}-ul", self.opts.name), move || {
            let store = weft_control::etcd::EtcdStore::connect_with(
                &[url],
                weft_control::etcd::DEFAULT_PREFIX,
                Duration::from_secs(2),
                &sec,
            )?;
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
        let one =
            Lab { opts: self.opts.clone(), nodes: vec![n.clone()], dir: self.dir.clone(), kube: self.kube.clone() };
        wait_ready(&one, Duration::from_secs(15))
    }

    /// Sends SIGHUP to a node's agent.
    pub fn reload(&self, n: &Node) -> anyhow::Result<()> {
        let pid = read_pid(&self.dir.join(format!("n{}.pid", n.index))).context("agent pid")?;
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP)?;
        Ok(())
    }

    /// The address families of the lab's pods.
    fn families(&self) -> Vec<bool> {
        [false, true].into_iter().filter(|v6| self.nodes[0].pods[0].ip(*v6).is_some()).collect()
    }

    /// Runs every check of the lab. With the backend `none` there is no data
    /// plane: pods on different nodes must then *not* reach each other.
    pub fn check(&self) -> Vec<Check> {
        let mut checks = Vec::new();
        let none = self.opts.backend == "none";
        for v6 in self.families() {
            for a in &self.nodes {
                for b in self.nodes.iter().filter(|b| b.index != a.index) {
                    for pa in &a.pods {
                        for pb in &b.pods {
                            let mut c = ping_check(pa, pb, v6);
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
        checks
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

    /// Captures the underlay bridge (tcpdump `filter`) while `during` runs;
    /// returns the pcap file.
    pub fn capture_underlay(&self, filter: &[&str], during: impl FnOnce()) -> anyhow::Result<PathBuf> {
        let pcap = self.dir.join("underlay.pcap");
        let ul = format!("{}-ul", self.opts.name);
        let pcap_s = pcap.display().to_string();
        let mut dump = Command::new("ip")
            .args(["netns", "exec", &ul, "tcpdump", "-Z", "root", "--immediate-mode", "-U", "-n", "-i", "br0"])
            .args(["-w", &pcap_s])
            .args(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("tcpdump")?;
        // tcpdump says "listening on br0" once its capture is open; its
        // closing words are read too, so they never meet a closed pipe.
        let mut stderr = std::io::BufReader::new(dump.stderr.take().context("tcpdump stderr")?);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stderr, &mut line)?;
        if !line.contains("listening on") {
            let _ = dump.kill();
            bail!("tcpdump: {line}");
        }
        let drain = std::thread::spawn(move || std::io::Read::read_to_end(&mut stderr, &mut Vec::new()));
        during();
        std::thread::sleep(Duration::from_millis(300));
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(dump.id() as i32), nix::sys::signal::Signal::SIGINT);
        let _ = dump.wait();
        let _ = drain.join();
        Ok(pcap)
    }

    /// The capture behind [`Lab::check`]'s underlay check; an error says
    /// what crossed the underlay in clear.
    pub fn underlay_capture(&self) -> anyhow::Result<String> {
        let (a, b) = (&self.nodes[0].pods[0], &self.nodes[self.nodes.len() - 1].pods[0]);
        let v6 = a.ip(false).is_none();
        let (Some(from), Some(to)) = (a.ip(v6), b.ip(v6)) else { bail!("pods without addresses") };
        // "weftmark" as the ping payload pattern.
        let marker = b"weftmark";
        let pattern: String = marker.iter().map(|b| format!("{b:02x}")).collect();
        let mut pinged = Ok(String::new());
        let pcap = self.capture_underlay(&[], || {
            pinged = exec(&a.ns, "ping", &["-c", "3", "-i", "0.2", "-W", "2", "-p", &pattern, &to.to_string()]);
        })?;
        pinged.context("ping through the tunnel")?;
        let bytes = std::fs::read(&pcap)?;
        let frames = pcap_frames(&bytes)?;
        let mut wireguard = 0;
        for f in &frames {
            if let Some((sport, dport)) = udp_ports(f) {
                if [51820, 51821].contains(&sport) || [51820, 51821].contains(&dport) {
                    wireguard += 1;
                    continue;
                }
            }
            // ARP, neighbour discovery and other link chatter carry no pod data.
        }
        let needles: Vec<Vec<u8>> = vec![
            marker.to_vec(),
            match from {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            },
            match to {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            },
        ];
        for n in &needles {
            if bytes.windows(n.len()).any(|w| w == &n[..]) {
                bail!("the capture holds {n:02x?} in clear");
            }
        }
        if wireguard < 6 {
            bail!("only {wireguard} WireGuard datagrams among {} frames", frames.len());
        }
        Ok(format!("{} frames, {wireguard} WireGuard datagrams, no inner address or payload in clear", frames.len()))
    }

    fn counter_check(&self, n: &Node) -> Check {
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
        let (tx, rx) = (get("weft_udp_tx_packets_total"), get("weft_tun_tx_packets_total"));
        // Kernel-routed backends move no packet through weft.
        let passed = match self.opts.backend.as_str() {
            "vxlan" => tx > 0 && rx > 0 && decap_drops == 0,
            "wireguard-native" => tx > 0 && rx > 0 && get("weft_drops_total{reason=\"wg_rejected\"}") == 0,
            _ => tx == 0,
        };
        let detail = format!(
            "sent {tx} pkts, delivered {rx} pkts, decap drops {decap_drops}, syscalls {}",
            get("weft_syscalls_total")
        );
        Check { name, passed, detail }
    }

    /// The tail of every agent log, for error reports.
    pub fn agent_logs(&self) -> String {
        let mut out = String::from("agent logs:");
        for n in self.weft_nodes() {
            let log = std::fs::read_to_string(self.dir.join(format!("n{}.log", n.index))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            let _ = write!(out, "\n--- {} ---\n{}", n.ns, tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        out
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
        let l = TcpListener::bind((any, SOURCE_PORT)).context("binding the source check's server")?;
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
    ready_rx.recv_timeout(Duration::from_secs(5)).context("the source check's server did not start")?;
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

fn ping_check(a: &Pod, b: &Pod, v6: bool) -> Check {
    let (Some(from), Some(to)) = (a.ip(v6), b.ip(v6)) else {
        return Check { name: format!("ping {} -> {}", a.ns, b.ns), passed: false, detail: "no address".into() };
    };
    let name = format!("ping {from} -> {to}");
    let target = to.to_string();
    let family = if v6 { "-6" } else { "-4" };
    let mut last = String::new();
    for _ in 0..3 {
        match exec(&a.ns, "ping", &[family, "-c", "1", "-W", "2", "-q", &target]) {
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
    let (Some(from), Some(to)) = (a.ip(v6), b.ip(v6)) else {
        return Check { name: format!("tcp {} -> {}", a.ns, b.ns), passed: false, detail: "no address".into() };
    };
    let name = format!("tcp {} MiB {from} -> {to}", bytes >> 20);
    match transfer(a, b, to, bytes) {
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

fn transfer(a: &Pod, b: &Pod, to: IpAddr, bytes: usize) -> anyhow::Result<(Digest32, Digest32, f64)> {
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
    let sent = sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))?;
    let (got, total) = receiver.join().map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    let (sent, secs) = sent?;
    if total != bytes {
        bail!("received {total} of {bytes} bytes");
    }
    Ok((sent, got, secs))
}

/// The Ethernet frames of a classic pcap file (tcpdump's `-w`).
pub fn pcap_frames(pcap: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut reader = pcap_file::pcap::PcapReader::new(pcap).context("not a pcap file")?;
    if reader.header().datalink != pcap_file::DataLink::ETHERNET {
        bail!("pcap link type {:?}, not Ethernet", reader.header().datalink);
    }
    let mut out = Vec::new();
    while let Some(p) = reader.next_packet() {
        out.push(p.context("truncated pcap")?.data.into_owned());
    }
    Ok(out)
}

/// UDP source and destination ports of an Ethernet frame, if it is UDP.
fn udp_ports(frame: &[u8]) -> Option<(u16, u16)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let l4 = match ethertype {
        0x0800 if *frame.get(23)? == 17 => frame.get(14 + ((frame[14] & 0x0f) as usize) * 4..)?,
        0x86dd if *frame.get(20)? == 17 => frame.get(54..)?,
        _ => return None,
    };
    Some((u16::from_be_bytes([*l4.first()?, *l4.get(1)?]), u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?])))
}

fn read_pid(path: &Path) -> Option<nix::unistd::Pid> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok().map(nix::unistd::Pid::from_raw)
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
    let prefix = format!("{name}-");
    // Pods leave through the CNI plugins that attached them (CNI DEL).
    for pod in netns::list().into_iter().filter(|n| n.starts_with(&prefix)) {
        let Some((node, _)) = pod.rsplit_once('p').filter(|(node, j)| node.contains("-n") && j.parse::<u32>().is_ok())
        else {
            continue;
        };
        let Some(index) = node.rsplit_once("-n").map(|(_, i)| i) else { continue };
        let conf = dir.join(format!("n{index}-cni.json"));
        if conf.exists() {
            let _ = cni(node, "DEL", &pod, &conf);
        }
    }
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
    let mut spaces: Vec<String> = netns::list().into_iter().filter(|n| n.starts_with(&prefix)).collect();
    // Pods before nodes before the underlay: longest names first.
    spaces.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for ns in spaces {
        let _ = ip(&["netns", "del", &ns]);
    }
    let _ = std::fs::remove_dir_all(&dir);
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

/// Whether lab names are valid: short (interface and namespace names derive
/// from them) and plain.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 16 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_gives_each_node_its_subnets_and_macs() {
        let mut o = LabOptions::new("t", PathBuf::from("weft"));
        o.kernel_peer = true;
        let nodes = plan(&o).unwrap();
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[1].key.to_string(), "10.244.2.0-24");
        assert_eq!(nodes[1].ips(), vec![IpAddr::from([192, 168, 77, 2])]);
        assert_eq!(nodes[2].kind, NodeKind::KernelVxlan);
        assert_eq!(nodes[0].kind, NodeKind::Weft);
        let ds = datastore(&o, &nodes);
        let parsed = StaticDatastore::parse(ds.to_json().as_bytes()).unwrap();
        assert_eq!(parsed.leases.len(), 3);
        let (_, l) = parsed.lease_of("192.168.77.2".parse().unwrap()).unwrap();
        assert_eq!(l.vxlan_data(false).unwrap().vtep_mac, [0x0a, 0x58, 0x0a, 0xf4, 2, 0]);
    }

    #[test]
    fn dual_stack_and_ipv6_only_plans() {
        let mut o = LabOptions::new("t", PathBuf::from("weft"));
        o.cluster_cidrs = vec!["10.42.0.0/16".parse().unwrap(), "2001:cafe:42::/56".parse().unwrap()];
        let nodes = plan(&o).unwrap();
        assert_eq!(nodes[2].key.to_string(), "10.42.3.0-24&2001:cafe:42:3::-64");
        assert_eq!(nodes[2].ips().len(), 2);
        let ds = datastore(&o, &nodes);
        let (_, l) = ds.lease_of("fd77::3".parse().unwrap()).unwrap();
        assert_eq!(l.vxlan_data(true).unwrap().vtep_mac, [0x0a, 0x58, 0x0a, 0xf6, 3, 0]);
        o.cluster_cidrs = vec!["2001:cafe:42::/56".parse().unwrap()];
        let nodes = plan(&o).unwrap();
        assert_eq!(nodes[0].key.to_string(), "2001:cafe:42:1::-64");
        assert_eq!(nodes[0].ip4, None);
        o.cluster_cidrs = vec!["10.42.0.0/30".parse().unwrap()];
        assert!(plan(&o).is_err(), "no room for three /24s in a /30");
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
