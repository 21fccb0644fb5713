//! Planning a lab, as pure code: the options, the nodes (namespaces,
//! underlay addresses, subnets, VTEP MACs, what runs on each) and the static
//! datastore that describes them. Nothing here touches the host.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use anyhow::{bail, Context};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use weft_control::datastore::{Lease, NetworkConfig, PrivatePath, StaticDatastore, VxlanData, WgData};
use weft_control::subnet::SubnetKey;

use crate::kube::KubeLab;

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

/// A CPU other than the host's, for one node's agent run under qemu-user
/// (the Raspberry Pi targets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeArch {
    /// 64-bit ARM: Pi 3/4/5 with a 64-bit OS.
    Aarch64,
    /// 32-bit ARM, hard float: Pi 2/3 with a 32-bit OS.
    Armv7,
}

impl NodeArch {
    /// Parses `--node-arch`'s value.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "aarch64" => Ok(NodeArch::Aarch64),
            "armv7" => Ok(NodeArch::Armv7),
            _ => bail!("--node-arch {s}: aarch64 or armv7"),
        }
    }

    /// Rust's target triple.
    pub fn triple(self) -> &'static str {
        match self {
            NodeArch::Aarch64 => "aarch64-unknown-linux-gnu",
            NodeArch::Armv7 => "armv7-unknown-linux-gnueabihf",
        }
    }

    /// `std::env::consts::ARCH` of a binary built for it.
    pub fn rust_arch(self) -> &'static str {
        match self {
            NodeArch::Aarch64 => "aarch64",
            NodeArch::Armv7 => "arm",
        }
    }

    /// The qemu-user emulator and the cross compiler whose C library it
    /// loads the binary with.
    pub fn qemu_and_gcc(self) -> (&'static str, &'static str) {
        match self {
            NodeArch::Aarch64 => ("qemu-aarch64", "aarch64-linux-gnu-gcc"),
            NodeArch::Armv7 => ("qemu-arm", "arm-linux-gnueabihf-gcc"),
        }
    }

    /// The cross-built weft beside a host build: `<target>/<profile>/weft`
    /// gives `<target>/<triple>/<profile>/weft`.
    pub fn binary_beside(self, host_bin: &std::path::Path) -> Option<PathBuf> {
        self.binary_in(host_bin, host_bin.parent()?.file_name()?.to_str()?)
    }

    /// The cross-built weft of cargo profile `profile` beside a host
    /// build: `<target>/<triple>/<profile dir>/weft` (`dev` builds to
    /// `debug`).
    pub fn binary_in(self, host_bin: &std::path::Path, profile: &str) -> Option<PathBuf> {
        let target_dir = host_bin.parent()?.parent()?;
        let dir = if profile == "dev" { "debug" } else { profile };
        Some(target_dir.join(self.triple()).join(dir).join(host_bin.file_name()?))
    }
}

/// Where a node is in the lab's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// On the shared underlay bridge: every lab but `--multicloud`.
    Underlay,
    /// In cloud `k` (from 1) of a multi-cloud lab, behind its gateway.
    Cloud(usize),
    /// At home in a multi-cloud lab: behind a masquerading router, with no
    /// address anyone outside can reach.
    Home,
}

/// The shape of `weft lab --multicloud` (see the `multicloud` module).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Multicloud {
    /// How many clouds, each a private network behind a NAT gateway.
    pub clouds: usize,
    /// The last node is at home (`--nat-node`).
    pub nat_node: bool,
    /// Underlay MTU of cloud `k` at index `k - 1`; clouds past the end and
    /// the home network have [`UNDERLAY_MTU`](crate::UNDERLAY_MTU).
    pub mtus: Vec<u32>,
    /// Nodes announce their cloud as `node-location`, so nodes of one cloud
    /// reach each other in it.
    pub locations: bool,
}

impl Multicloud {
    /// The underlay MTU of a site.
    pub fn mtu(&self, site: Site) -> u32 {
        match site {
            Site::Cloud(k) => self.mtus.get(k - 1).copied().unwrap_or(crate::UNDERLAY_MTU),
            _ => crate::UNDERLAY_MTU,
        }
    }
}

/// The first node's agent run as a foreign binary under qemu-user.
#[derive(Debug, Clone)]
pub struct Emulated {
    /// Its CPU.
    pub arch: NodeArch,
    /// The weft binary built for it.
    pub bin: PathBuf,
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
    /// The weft nodes' `dataplane` (`None`: the agent's default).
    pub dataplane: Option<String>,
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
    /// Run the first node's agent as a binary of another CPU under
    /// qemu-user (`weft lab --node-arch`).
    pub emulated: Option<Emulated>,
    /// Nodes in clouds behind NAT instead of on one underlay.
    pub multicloud: Option<Multicloud>,
    /// A relay impairing the first node's underlay link (`weft lab --impair`).
    pub impair: Option<crate::impair::Impairment>,
    /// One more node, without pods, whose agent runs rootless as a user the
    /// lab makes (`weft lab --rootless`; see the `rootless` module).
    pub rootless: bool,
    /// With `rootless`: run its agent under strace, which writes every
    /// `open`, `openat` and `socket` call to `rootless.strace` in the lab's
    /// directory (what the tests check the agent never opens).
    pub rootless_trace: bool,
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
            dataplane: None,
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
            emulated: None,
            multicloud: None,
            impair: None,
            rootless: false,
            rootless_trace: false,
        }
    }

    /// What runs node `n`'s agent under qemu-user, if anything: the first
    /// node's (indices start at 1) with `emulated` set.
    pub fn emulated_on(&self, n: &Node) -> Option<&Emulated> {
        self.emulated.as_ref().filter(|_| n.index == 1)
    }

    /// Whether the weft nodes masquerade pod traffic of a family leaving
    /// the cluster (never with the backend `none`).
    pub fn masquerades(&self, v6: bool) -> bool {
        self.ip_masq && self.backend != "none" && (!v6 || (self.ipv6_masq && self.cluster_v6().is_some()))
    }

    pub(crate) fn cluster_v4(&self) -> Option<Ipv4Net> {
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

    pub(crate) fn cluster_v6(&self) -> Option<Ipv6Net> {
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
    /// Where it is in the lab's network.
    pub site: Site,
    /// Its external IPv4 address (`node-external-ip`), mapped 1:1 by its
    /// cloud's gateway.
    pub external4: Option<Ipv4Addr>,
}

impl Node {
    /// The node's underlay addresses, IPv4 first.
    pub fn ips(&self) -> Vec<IpAddr> {
        self.ip4.map(IpAddr::V4).into_iter().chain(self.ip6.map(IpAddr::V6)).collect()
    }

    /// Its `node-location`, in a multi-cloud lab that announces them.
    pub fn location(&self, opts: &LabOptions) -> Option<String> {
        match self.site {
            Site::Cloud(k) if opts.multicloud.as_ref().is_some_and(|m| m.locations) => Some(format!("cloud{k}")),
            _ => None,
        }
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

/// A lab that has been built; [`down`](crate::down) removes it.
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
    /// With `rootless`: the rootless node (not among `nodes`: it has no pods).
    pub rootless: Option<Node>,
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
    (1..=opts.nodes + opts.rootless as usize)
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
            let pods = if i > opts.nodes {
                Vec::new()
            } else {
                (1..=opts.pods_per_node).map(|j| Pod { ns: format!("{ns}p{j}"), ips: Vec::new() }).collect()
            };
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
                site: Site::Underlay,
                external4: None,
            })
        })
        .collect::<anyhow::Result<Vec<Node>>>()
        .and_then(|mut nodes| {
            if let Some(m) = &opts.multicloud {
                crate::multicloud::place(m, &mut nodes)?;
            }
            Ok(nodes)
        })
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
    let mut config = NetworkConfig::for_cluster(
        opts.cluster_v4().map(|n| (n, opts.node_mask_v4)),
        opts.cluster_v6().map(|n| (n, opts.node_mask_v6)),
        lease_backend(&opts.backend),
    );
    if opts.multicloud.is_some() && opts.backend == "wireguard-native" {
        // K3s's wireguard-native default: what keeps a NAT's mapping open.
        config.backend["PersistentKeepaliveInterval"] = 25.into();
    }
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
            let data = |mac, v6: bool| match (n.location(opts), n.ip4) {
                // What the agent announces with node-location (its lease,
                // when it writes one): the private path beside the data.
                (Some(location), Some(address)) if !v6 => {
                    PrivatePath { location, address: address.into() }.add_to(data(mac, v6))
                }
                _ => data(mac, v6),
            };
            let lease = Lease {
                public_ip: n.external4.or(n.ip4),
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
    fn an_emulated_nodes_binary_is_looked_for_beside_the_host_build() {
        let host = std::path::Path::new("t/target/debug/weft");
        let a = NodeArch::Aarch64;
        assert_eq!(a.binary_beside(host).unwrap(), PathBuf::from("t/target/aarch64-unknown-linux-gnu/debug/weft"));
        assert_eq!(a.binary_in(host, "dev").unwrap(), PathBuf::from("t/target/aarch64-unknown-linux-gnu/debug/weft"));
        let cross = NodeArch::Armv7.binary_in(host, "cross").unwrap();
        assert_eq!(cross, PathBuf::from("t/target/armv7-unknown-linux-gnueabihf/cross/weft"));
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
}
