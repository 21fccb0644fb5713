//! Cluster shape: K3s's network keys (backend, pod and service networks, node
//! subnet masks, node addresses, external-IP and IPv6-masquerade switches),
//! checked against each other the way K3s documents them.
//!
//! This module is pure: it reads raw text values from a key/value map and
//! returns a [`ClusterConfig`] or a [`ConfigError`] naming the key, the value
//! and the rule that refused it. It reads only the keys in [`KEYS`] and leaves
//! every other key (and the refusal of unknown keys) to its caller. It does
//! not look at the host (interfaces, routes, kernel modules) and does not
//! decide which backends this build can run.
//!
//! ```text
//!   cluster-cidr 10.42.0.0/16,2001:cafe:42::/56      service-cidr 10.43.0.0/16,2001:cafe:43::/112
//!        |  node-cidr-mask-size-ipv4 / -ipv6               (same families, same order,
//!        v                                                  no overlap with cluster-cidr)
//!   node subnets 10.42.N.0/24, 2001:cafe:42:N::/64
//!        ^
//!   node-ip 10.0.0.1,fd00::1  (one per cluster family, same first family)
//!   node-external-ip 203.0.113.1  --flannel-external-ip-->  public_ip(): where peers send tunnel traffic
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::error::ConfigError;

/// Every key [`ClusterConfig::from_pairs`] reads, with a one-line description.
pub const KEYS: &[(&str, &str)] = &[
    ("flannel-backend", "data plane: vxlan (default), host-gw, wireguard-native or none"),
    ("cluster-cidr", "pod network(s): one, or one IPv4 and one IPv6 comma separated (default 10.42.0.0/16)"),
    ("service-cidr", "service network(s), same families and order as cluster-cidr (default 10.43.0.0/16)"),
    ("node-cidr-mask-size-ipv4", "prefix length of each node's IPv4 pod subnet (default 24)"),
    ("node-cidr-mask-size-ipv6", "prefix length of each node's IPv6 pod subnet (default 64)"),
    ("node-ip", "this node's internal address(es), at most one per family, comma separated (required)"),
    ("node-external-ip", "this node's external address(es), at most one per family, comma separated"),
    ("flannel-external-ip", "send tunnel traffic to nodes' external IPs instead of their internal IPs (default false)"),
    (
        "flannel-external-ip-unencrypted",
        "allow flannel-external-ip with vxlan or host-gw, whose tunnel traffic is neither encrypted nor authenticated (default false)",
    ),
    ("flannel-ipv6-masq", "masquerade IPv6 pod traffic leaving the cluster (default false)"),
];

/// K3s's default pod network.
pub const DEFAULT_CLUSTER_CIDR: &str = "10.42.0.0/16";
/// K3s's default service network.
pub const DEFAULT_SERVICE_CIDR: &str = "10.43.0.0/16";
/// Default prefix length of a node's IPv4 pod subnet (a /24: 254 pods).
pub const DEFAULT_NODE_MASK_V4: u8 = 24;
/// Default prefix length of a node's IPv6 pod subnet.
pub const DEFAULT_NODE_MASK_V6: u8 = 64;

/// Shortest IPv4 service-cidr prefix K3s supports (/12: about a million
/// service addresses).
pub const SERVICE_MIN_PREFIX_V4: u8 = 12;
/// Shortest IPv6 service-cidr prefix K3s supports (/112: 65536 addresses).
pub const SERVICE_MIN_PREFIX_V6: u8 = 112;
/// Longest IPv4 node subnet: a /30 holds the gateway and one pod besides the
/// network and broadcast addresses; anything longer holds no pod.
pub const NODE_MASK_MAX_V4: u8 = 30;
/// Longest IPv6 node subnet, chosen like IPv4's: a /126 holds four addresses,
/// room for the gateway and at least one pod.
pub const NODE_MASK_MAX_V6: u8 = 126;
/// How many bits longer than the IPv6 cluster prefix a node mask may be:
/// kube-controller-manager's node CIDR allocator keeps one bit per node subnet
/// and refuses more than 2^16 of them for IPv6.
pub const NODE_MASK_MAX_DIFF_V6: u8 = 16;

/// A Flannel backend as K3s names it in `flannel-backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Pod packets wrapped in VXLAN between nodes (the default).
    Vxlan,
    /// No encapsulation: routes to each node's pod subnet via the node's IP.
    HostGw,
    /// Pod packets encrypted and wrapped in WireGuard.
    WireguardNative,
    /// No Flannel data plane: a custom CNI is installed instead.
    None,
}

impl Backend {
    /// Every backend, in the order the documentation lists them.
    pub const ALL: [Backend; 4] = [Backend::Vxlan, Backend::HostGw, Backend::WireguardNative, Backend::None];

    /// The name as written in `flannel-backend`.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Vxlan => "vxlan",
            Backend::HostGw => "host-gw",
            Backend::WireguardNative => "wireguard-native",
            Backend::None => "none",
        }
    }

    /// The backend of that exact name, if any.
    pub fn from_name(name: &str) -> Option<Backend> {
        Backend::ALL.into_iter().find(|b| b.name() == name)
    }
}

/// The cluster's network shape, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Flannel backend.
    pub backend: Backend,
    /// Pod network(s): one, or one per family (dual-stack), in the order given.
    pub cluster_cidrs: Vec<IpNet>,
    /// Service network(s), same families in the same order as `cluster_cidrs`.
    pub service_cidrs: Vec<IpNet>,
    /// Prefix length of each node's IPv4 pod subnet.
    pub node_mask_v4: u8,
    /// Prefix length of each node's IPv6 pod subnet.
    pub node_mask_v6: u8,
    /// This node's internal addresses, at most one per family, in the order given.
    pub node_ips: Vec<IpAddr>,
    /// This node's external addresses, at most one per family, in the order given.
    pub node_external_ips: Vec<IpAddr>,
    /// Peers send tunnel traffic to external IPs rather than internal ones.
    pub flannel_external_ip: bool,
    /// `flannel-external-ip-unencrypted`: external IPs allowed with vxlan
    /// and host-gw.
    pub external_ip_unencrypted: bool,
    /// Masquerade IPv6 pod traffic leaving the cluster.
    pub ipv6_masq: bool,
}

impl ClusterConfig {
    /// Reads only the keys in [`KEYS`] from `pairs` (values are raw strings;
    /// absent or empty keys take K3s's defaults) and checks every rule.
    pub fn from_pairs(pairs: &BTreeMap<String, String>) -> Result<ClusterConfig, ConfigError> {
        let get = |k: &str| pairs.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());

        let backend = parse_backend(get("flannel-backend").unwrap_or("vxlan"))?;

        let cluster_raw = Setting::new("cluster-cidr", get("cluster-cidr"), DEFAULT_CLUSTER_CIDR);
        let cluster_cidrs = parse_cidrs(&cluster_raw)?;
        check_cluster_prefixes(&cluster_raw, &cluster_cidrs)?;

        let service_raw = Setting::new("service-cidr", get("service-cidr"), DEFAULT_SERVICE_CIDR);
        let service_cidrs = parse_cidrs(&service_raw)?;
        check_service_prefixes(&service_raw, &service_cidrs)?;
        check_same_families(&cluster_raw, &cluster_cidrs, &service_raw, &service_cidrs)?;
        check_no_overlap(&service_raw, &cluster_cidrs, &service_cidrs)?;

        let cluster_v4 = net_v4(&cluster_cidrs);
        let cluster_v6 = net_v6(&cluster_cidrs);
        let node_mask_v4 = parse_node_mask_v4(
            &Setting::new(
                "node-cidr-mask-size-ipv4",
                get("node-cidr-mask-size-ipv4"),
                &DEFAULT_NODE_MASK_V4.to_string(),
            ),
            cluster_v4,
        )?;
        let node_mask_v6 = parse_node_mask_v6(
            &Setting::new(
                "node-cidr-mask-size-ipv6",
                get("node-cidr-mask-size-ipv6"),
                &DEFAULT_NODE_MASK_V6.to_string(),
            ),
            cluster_v6,
        )?;

        let Some(node_ip_raw) = get("node-ip") else {
            return Err(ConfigError::new(
                "node-ip",
                "",
                "this node's address, or one IPv4 and one IPv6 address comma separated (required)",
            ));
        };
        let node_ips = parse_addrs("node-ip", node_ip_raw)?;
        check_node_ips(node_ip_raw, &node_ips, &cluster_raw, &cluster_cidrs)?;

        let node_external_ips = match get("node-external-ip") {
            Some(v) => parse_addrs("node-external-ip", v)?,
            None => Vec::new(),
        };

        let flannel_external_ip = parse_bool("flannel-external-ip", get("flannel-external-ip"))?;
        if flannel_external_ip && node_external_ips.is_empty() {
            return Err(ConfigError::new(
                "flannel-external-ip",
                "true",
                "false unless node-external-ip is set: flannel-external-ip sends tunnel \
                 traffic to the node's external IP, and none is given",
            ));
        }

        // External addresses are for nodes that reach each other across the
        // internet: only WireGuard protects what crosses it.
        let unencrypted = parse_bool("flannel-external-ip-unencrypted", get("flannel-external-ip-unencrypted"))?;
        if flannel_external_ip && !unencrypted {
            if let Some(why) = unencrypted_across_external(backend) {
                return Err(ConfigError::new("flannel-external-ip", "true", format!("false {why}")));
            }
        }

        let ipv6_masq = parse_bool("flannel-ipv6-masq", get("flannel-ipv6-masq"))?;
        if ipv6_masq && cluster_v6.is_none() {
            return Err(ConfigError::new(
                "flannel-ipv6-masq",
                "true",
                format!(
                    "false for an IPv4-only cluster: IPv6 masquerade needs a dual-stack or \
                     IPv6-only cluster-cidr, and cluster-cidr is `{}`{}",
                    cluster_raw.text,
                    cluster_raw.default_note()
                ),
            ));
        }
        if ipv6_masq && backend == Backend::None {
            return Err(ConfigError::new(
                "flannel-ipv6-masq",
                "true",
                "false with flannel-backend none: there is no Flannel data plane to masquerade",
            ));
        }

        Ok(ClusterConfig {
            backend,
            cluster_cidrs,
            service_cidrs,
            node_mask_v4,
            node_mask_v6,
            node_ips,
            node_external_ips,
            flannel_external_ip,
            external_ip_unencrypted: unencrypted,
            ipv6_masq,
        })
    }

    /// The IPv4 pod network, if the cluster has one.
    pub fn cluster_v4(&self) -> Option<Ipv4Net> {
        net_v4(&self.cluster_cidrs)
    }

    /// The IPv6 pod network, if the cluster has one.
    pub fn cluster_v6(&self) -> Option<Ipv6Net> {
        net_v6(&self.cluster_cidrs)
    }

    /// This node's internal IPv4 address, if given.
    pub fn node_ip_v4(&self) -> Option<Ipv4Addr> {
        self.node_ips.iter().find_map(|a| match a {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
    }

    /// This node's internal IPv6 address, if given.
    pub fn node_ip_v6(&self) -> Option<Ipv6Addr> {
        self.node_ips.iter().find_map(|a| match a {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        })
    }

    /// The address other nodes should send tunnel traffic to, for IPv6 when
    /// `v6` and IPv4 otherwise: the node-external-ip of that family when
    /// flannel-external-ip is set and one exists, else the node-ip of that
    /// family.
    pub fn public_ip(&self, v6: bool) -> Option<IpAddr> {
        let family = if v6 { Family::V6 } else { Family::V4 };
        let of_family = |ips: &[IpAddr]| ips.iter().copied().find(|a| Family::of_addr(a) == family);
        if self.flannel_external_ip {
            if let Some(ip) = of_family(&self.node_external_ips) {
                return Some(ip);
            }
        }
        of_family(&self.node_ips)
    }
}

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of_net(n: &IpNet) -> Family {
        match n {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    fn of_addr(a: &IpAddr) -> Family {
        match a {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// A key's text as used: given, or its default when absent.
struct Setting<'a> {
    key: &'static str,
    text: &'a str,
    defaulted: bool,
}

impl<'a> Setting<'a> {
    fn new(key: &'static str, given: Option<&'a str>, default: &'a str) -> Setting<'a> {
        match given {
            Some(text) => Setting { key, text, defaulted: false },
            None => Setting { key, text: default, defaulted: true },
        }
    }

    /// A note for refusals of a value the operator did not write.
    fn default_note(&self) -> String {
        if self.defaulted {
            format!(" (`{}` is not set; this is its default)", self.key)
        } else {
            String::new()
        }
    }

    fn refuse(&self, accepted: impl std::fmt::Display) -> ConfigError {
        ConfigError::new(self.key, self.text, format!("{accepted}{}", self.default_note()))
    }
}

fn net_v4(nets: &[IpNet]) -> Option<Ipv4Net> {
    nets.iter().find_map(|n| match n {
        IpNet::V4(n) => Some(*n),
        IpNet::V6(_) => None,
    })
}

fn net_v6(nets: &[IpNet]) -> Option<Ipv6Net> {
    nets.iter().find_map(|n| match n {
        IpNet::V6(n) => Some(*n),
        IpNet::V4(_) => None,
    })
}

fn families(nets: &[IpNet]) -> String {
    nets.iter().map(|n| Family::of_net(n).word()).collect::<Vec<_>>().join(" then ")
}

fn parse_backend(v: &str) -> Result<Backend, ConfigError> {
    if let Some(b) = Backend::from_name(v) {
        return Ok(b);
    }
    let names: Vec<&str> = Backend::ALL.iter().map(|b| b.name()).collect();
    let one_of = format!("one of: {}", names.join(", "));
    let migrate = "set `flannel-backend: wireguard-native` on every server, then restart \
                   the servers first, then the agents";
    let accepted = match v {
        "wireguard" => format!("{one_of}; `wireguard` was removed in K3s v1.26: {migrate}"),
        "ipsec" => {
            format!("{one_of}; `ipsec` is deprecated and was removed in K3s v1.27: {migrate}")
        }
        _ => one_of,
    };
    Err(ConfigError::new("flannel-backend", v, accepted))
}

/// Splits a comma-separated value into trimmed items, refusing empty ones and
/// more than one per family (so at most two).
fn split_items<'a>(key: &str, v: &'a str, what: &str) -> Result<Vec<&'a str>, ConfigError> {
    let items: Vec<&str> = v.split(',').map(str::trim).collect();
    if items.iter().any(|s| s.is_empty()) {
        return Err(ConfigError::new(key, v, format!("{what} separated by single commas, without empty entries")));
    }
    if items.len() > 2 {
        return Err(ConfigError::new(
            key,
            v,
            format!("at most two entries (dual-stack: one IPv4 and one IPv6), not {}", items.len()),
        ));
    }
    Ok(items)
}

/// Parses 1 or 2 networks in canonical CIDR form, at most one per family.
fn parse_cidrs(s: &Setting) -> Result<Vec<IpNet>, ConfigError> {
    let what = "one network, or one IPv4 and one IPv6 network, in CIDR form, \
                e.g. 10.42.0.0/16,2001:cafe:42::/56";
    let mut nets = Vec::with_capacity(2);
    for item in split_items(s.key, s.text, what)? {
        let net: IpNet = item.parse().map_err(|_| s.refuse(format!("`{item}` is not a network: {what}")))?;
        if net.trunc() != net {
            return Err(s.refuse(format!(
                "networks in canonical form with the host bits zero: `{item}` would be {}",
                net.trunc()
            )));
        }
        nets.push(net);
    }
    if let [a, b] = nets[..] {
        if Family::of_net(&a) == Family::of_net(&b) {
            return Err(s.refuse(format!(
                "at most one network per family: dual-stack is one IPv4 and one IPv6 network, \
                 not two {} networks",
                Family::of_net(&a).word()
            )));
        }
    }
    Ok(nets)
}

/// A pod network must hold at least one node subnet of the longest allowed
/// mask.
fn check_cluster_prefixes(s: &Setting, nets: &[IpNet]) -> Result<(), ConfigError> {
    for net in nets {
        let max = match net {
            IpNet::V4(_) => NODE_MASK_MAX_V4,
            IpNet::V6(_) => NODE_MASK_MAX_V6,
        };
        if net.prefix_len() > max {
            return Err(s.refuse(format!(
                "an {} pod network of /{max} or shorter, so that it holds at least one node \
                 subnet; `{net}` is too small",
                Family::of_net(net).word()
            )));
        }
    }
    Ok(())
}

/// K3s supports service networks no larger than /12 (IPv4) and /112 (IPv6).
fn check_service_prefixes(s: &Setting, nets: &[IpNet]) -> Result<(), ConfigError> {
    for net in nets {
        let min = match net {
            IpNet::V4(_) => SERVICE_MIN_PREFIX_V4,
            IpNet::V6(_) => SERVICE_MIN_PREFIX_V6,
        };
        if net.prefix_len() < min {
            return Err(s.refuse(format!(
                "an {} service network no larger than /{min} (prefix length {min} or more); \
                 `{net}` is larger",
                Family::of_net(net).word()
            )));
        }
    }
    Ok(())
}

/// cluster-cidr and service-cidr list the same families in the same order.
fn check_same_families(
    cluster: &Setting,
    cluster_nets: &[IpNet],
    service: &Setting,
    service_nets: &[IpNet],
) -> Result<(), ConfigError> {
    let same = cluster_nets.len() == service_nets.len()
        && cluster_nets.iter().zip(service_nets).all(|(c, s)| Family::of_net(c) == Family::of_net(s));
    if same {
        return Ok(());
    }
    Err(service.refuse(format!(
        "the same families in the same order as cluster-cidr `{}`{}: {}, not {}",
        cluster.text,
        if cluster.defaulted { " (default)" } else { "" },
        families(cluster_nets),
        families(service_nets)
    )))
}

/// Pod and service networks of the same family do not overlap.
fn check_no_overlap(service: &Setting, cluster_nets: &[IpNet], service_nets: &[IpNet]) -> Result<(), ConfigError> {
    for c in cluster_nets {
        for s in service_nets {
            let overlap =
                Family::of_net(c) == Family::of_net(s) && (c.contains(&s.network()) || s.contains(&c.network()));
            if overlap {
                return Err(service.refuse(format!(
                    "service networks that do not overlap the pod networks: `{s}` overlaps \
                     cluster-cidr `{c}`"
                )));
            }
        }
    }
    Ok(())
}

fn parse_mask(s: &Setting, bits: u8) -> Result<u8, ConfigError> {
    s.text
        .parse::<u8>()
        .ok()
        .filter(|m| *m <= bits)
        .ok_or_else(|| s.refuse(format!("a prefix length, an integer from 0 to {bits}")))
}

fn parse_node_mask_v4(s: &Setting, cluster: Option<Ipv4Net>) -> Result<u8, ConfigError> {
    let mask = parse_mask(s, 32)?;
    if mask > NODE_MASK_MAX_V4 {
        return Err(s.refuse(format!(
            "at most {NODE_MASK_MAX_V4}, so that a node subnet holds at least one pod \
             beside the gateway"
        )));
    }
    if let Some(net) = cluster {
        if mask < net.prefix_len() {
            return Err(s.refuse(format!(
                "at least {}, the prefix length of the IPv4 cluster-cidr `{net}`: a node \
                 subnet must fit inside the pod network",
                net.prefix_len()
            )));
        }
    }
    Ok(mask)
}

fn parse_node_mask_v6(s: &Setting, cluster: Option<Ipv6Net>) -> Result<u8, ConfigError> {
    let mask = parse_mask(s, 128)?;
    if mask > NODE_MASK_MAX_V6 {
        return Err(s.refuse(format!(
            "at most {NODE_MASK_MAX_V6}, so that a node subnet holds at least one pod \
             beside the gateway"
        )));
    }
    if let Some(net) = cluster {
        let prefix = net.prefix_len();
        if mask < prefix {
            return Err(s.refuse(format!(
                "at least {prefix}, the prefix length of the IPv6 cluster-cidr `{net}`: a node \
                 subnet must fit inside the pod network"
            )));
        }
        if mask - prefix > NODE_MASK_MAX_DIFF_V6 {
            return Err(s.refuse(format!(
                "at most {}: kube-controller-manager refuses an IPv6 node mask more than \
                 {NODE_MASK_MAX_DIFF_V6} bits longer than the cluster-cidr prefix (`{net}`)",
                prefix + NODE_MASK_MAX_DIFF_V6
            )));
        }
    }
    Ok(mask)
}

/// Parses one address, or one IPv4 and one IPv6 address, each usable as a
/// node's address (not unspecified, multicast or broadcast).
fn parse_addrs(key: &str, v: &str) -> Result<Vec<IpAddr>, ConfigError> {
    let what = "one address, or one IPv4 and one IPv6 address, e.g. 10.0.0.1,fd00::1";
    let mut addrs = Vec::with_capacity(2);
    for item in split_items(key, v, what)? {
        let addr: IpAddr =
            item.parse().map_err(|_| ConfigError::new(key, v, format!("`{item}` is not an IP address: {what}")))?;
        let broadcast = matches!(addr, IpAddr::V4(a) if a.is_broadcast());
        if addr.is_unspecified() || addr.is_multicast() || broadcast {
            return Err(ConfigError::new(
                key,
                v,
                format!("a unicast address of this node: `{item}` is unspecified, multicast or broadcast"),
            ));
        }
        addrs.push(addr);
    }
    if let [a, b] = addrs[..] {
        if Family::of_addr(&a) == Family::of_addr(&b) {
            return Err(ConfigError::new(
                key,
                v,
                format!(
                    "at most one address per family: one IPv4 and one IPv6 address, not two {} \
                     addresses",
                    Family::of_addr(&a).word()
                ),
            ));
        }
    }
    Ok(addrs)
}

/// Every cluster family needs a node IP of that family, and node-ip's first
/// family is cluster-cidr's first family (IPv6 first in one means IPv6 first
/// in the other).
fn check_node_ips(
    raw: &str,
    node_ips: &[IpAddr],
    cluster: &Setting,
    cluster_nets: &[IpNet],
) -> Result<(), ConfigError> {
    for net in cluster_nets {
        let family = Family::of_net(net);
        if !node_ips.iter().any(|a| Family::of_addr(a) == family) {
            let shape = match cluster_nets.len() {
                2 => "dual-stack",
                _ => "single-stack",
            };
            return Err(ConfigError::new(
                "node-ip",
                raw,
                format!(
                    "an {} address too: the {shape} cluster-cidr `{}`{} has an {} network, and \
                     a node without a node IP of that family cannot carry its pods",
                    family.word(),
                    cluster.text,
                    if cluster.defaulted { " (default)" } else { "" },
                    family.word()
                ),
            ));
        }
    }
    if let (Some(first_ip), Some(first_net)) = (node_ips.first(), cluster_nets.first()) {
        let want = Family::of_net(first_net);
        if Family::of_addr(first_ip) != want {
            return Err(ConfigError::new(
                "node-ip",
                raw,
                format!(
                    "the {} address first, as cluster-cidr `{}` lists {} first",
                    want.word(),
                    cluster.text,
                    want.word()
                ),
            ));
        }
    }
    Ok(())
}

/// Why external addresses are refused with `backend` (unless
/// `flannel-external-ip-unencrypted` allows them): only WireGuard protects
/// what crosses the nodes' external network. `None`: they are fine.
pub fn unencrypted_across_external(backend: Backend) -> Option<String> {
    matches!(backend, Backend::Vxlan | Backend::HostGw).then(|| {
        format!(
            "with flannel-backend {}: its pod traffic would cross the nodes' external network unencrypted \
             and unauthenticated; use flannel-backend wireguard-native, or set \
             flannel-external-ip-unencrypted: true if that network is trusted (K3s only warns)",
            backend.name()
        )
    })
}

fn parse_bool(key: &str, v: Option<&str>) -> Result<bool, ConfigError> {
    match v {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ConfigError::new(key, other, "true or false")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `kv` over a base holding only `node-ip: 10.0.0.1`; an entry
    /// with an empty value removes the key.
    fn parse(kv: &[(&str, &str)]) -> Result<ClusterConfig, ConfigError> {
        let mut pairs = BTreeMap::from([("node-ip".to_string(), "10.0.0.1".to_string())]);
        for (k, v) in kv {
            if v.is_empty() {
                pairs.remove(*k);
            } else {
                pairs.insert(k.to_string(), v.to_string());
            }
        }
        ClusterConfig::from_pairs(&pairs)
    }

    fn good(kv: &[(&str, &str)]) -> ClusterConfig {
        match parse(kv) {
            Ok(c) => c,
            Err(e) => panic!("{kv:?} refused: {e}"),
        }
    }

    /// Asserts a refusal naming `key` and `value` whose rule mentions `rule`.
    fn refused(kv: &[(&str, &str)], key: &str, value: &str, rule: &str) -> ConfigError {
        let e = match parse(kv) {
            Ok(c) => panic!("{kv:?} accepted: {c:?}"),
            Err(e) => e,
        };
        assert_eq!((e.key.as_str(), e.value.as_str()), (key, value), "{e}");
        assert!(e.accepted.contains(rule), "`{rule}` not in: {e}");
        e
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const DUAL: &[(&str, &str)] = &[
        ("cluster-cidr", "10.42.0.0/16,2001:cafe:42::/56"),
        ("service-cidr", "10.43.0.0/16,2001:cafe:43::/112"),
        ("node-ip", "10.0.0.1,fd00::1"),
    ];

    /// The dual-stack base with `extra` keys replaced or added.
    fn dual(extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
        let mut kv: Vec<(&str, String)> = DUAL.iter().map(|(k, v)| (*k, v.to_string())).collect();
        for (k, v) in extra {
            kv.retain(|(key, _)| key != k);
            kv.push((k, v.to_string()));
        }
        kv
    }

    fn as_refs<'a>(kv: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
        kv.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    #[test]
    fn defaults_are_k3s_defaults() {
        let c = good(&[]);
        assert_eq!(c.backend, Backend::Vxlan);
        assert_eq!(c.cluster_cidrs, vec![net("10.42.0.0/16")]);
        assert_eq!(c.service_cidrs, vec![net("10.43.0.0/16")]);
        assert_eq!((c.node_mask_v4, c.node_mask_v6), (24, 64));
        assert_eq!(c.node_ips, vec![ip("10.0.0.1")]);
        assert!(c.node_external_ips.is_empty());
        assert!(!c.flannel_external_ip && !c.ipv6_masq);
        // Empty values count as absent, as in config.rs.
        assert_eq!(good(&[("flannel-backend", " ")]), c);
    }

    #[test]
    fn every_key_is_read() {
        let c = good(&[
            ("flannel-backend", "wireguard-native"),
            ("cluster-cidr", "2001:cafe:42::/56,10.42.0.0/16"),
            ("service-cidr", "2001:cafe:43::/112,10.43.0.0/16"),
            ("node-cidr-mask-size-ipv4", "26"),
            ("node-cidr-mask-size-ipv6", "72"),
            ("node-ip", "fd00::1, 10.0.0.1"),
            ("node-external-ip", "203.0.113.7"),
            ("flannel-external-ip", "true"),
            ("flannel-ipv6-masq", "true"),
        ]);
        assert_eq!(c.backend, Backend::WireguardNative);
        assert_eq!(c.cluster_cidrs, vec![net("2001:cafe:42::/56"), net("10.42.0.0/16")], "order kept");
        assert_eq!(c.service_cidrs, vec![net("2001:cafe:43::/112"), net("10.43.0.0/16")]);
        assert_eq!((c.node_mask_v4, c.node_mask_v6), (26, 72));
        assert_eq!(c.node_ips, vec![ip("fd00::1"), ip("10.0.0.1")]);
        assert_eq!(c.node_external_ips, vec![ip("203.0.113.7")]);
        assert!(c.flannel_external_ip && c.ipv6_masq);
    }

    #[test]
    fn keys_list_exactly_what_is_read_and_other_keys_are_ignored() {
        let names: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            [
                "flannel-backend",
                "cluster-cidr",
                "service-cidr",
                "node-cidr-mask-size-ipv4",
                "node-cidr-mask-size-ipv6",
                "node-ip",
                "node-external-ip",
                "flannel-external-ip",
                "flannel-external-ip-unencrypted",
                "flannel-ipv6-masq",
            ]
        );
        assert!(KEYS.iter().all(|(_, d)| !d.is_empty()));
        // Keys of other modules (and typos) are the caller's business.
        assert_eq!(good(&[("vni", "not a number"), ("vxlan-port", "x")]), good(&[]));
    }

    #[test]
    fn backend_names() {
        for b in Backend::ALL {
            assert_eq!(good(&[("flannel-backend", b.name())]).backend, b);
            assert_eq!(Backend::from_name(b.name()), Some(b));
        }
        assert_eq!(Backend::ALL.map(|b| b.name()), ["vxlan", "host-gw", "wireguard-native", "none"]);
        refused(
            &[("flannel-backend", "udp")],
            "flannel-backend",
            "udp",
            "one of: vxlan, host-gw, wireguard-native, none",
        );
        refused(&[("flannel-backend", "VXLAN")], "flannel-backend", "VXLAN", "one of:");
    }

    #[test]
    fn legacy_backends_are_refused_with_the_migration() {
        let migrate = "set `flannel-backend: wireguard-native` on every server, then restart \
                       the servers first, then the agents";
        let e = refused(&[("flannel-backend", "wireguard")], "flannel-backend", "wireguard", migrate);
        assert!(e.accepted.contains("removed in K3s v1.26"), "{e}");
        let e = refused(&[("flannel-backend", "ipsec")], "flannel-backend", "ipsec", migrate);
        assert!(e.accepted.contains("deprecated and was removed in K3s v1.27"), "{e}");
        // The message names key, value and rule.
        let shown = e.to_string();
        assert!(shown.contains("`flannel-backend`") && shown.contains("`ipsec`"), "{shown}");
        assert_eq!(good(&[("flannel-backend", "wireguard-native")]).backend, Backend::WireguardNative);
    }

    #[test]
    fn cidr_lists_are_one_or_two_networks() {
        for key in ["cluster-cidr", "service-cidr"] {
            refused(&[(key, "10.42.0.0")], key, "10.42.0.0", "is not a network");
            refused(&[(key, "ten/8")], key, "ten/8", "in CIDR form");
            refused(&[(key, "10.42.0.0/33")], key, "10.42.0.0/33", "is not a network");
            refused(&[(key, "10.42.0.0/16,")], key, "10.42.0.0/16,", "without empty entries");
            let three = "10.42.0.0/16,fd00::/56,10.44.0.0/16";
            refused(&[(key, three)], key, three, "at most two entries");
        }
        let c = good(&[("cluster-cidr", " 10.40.0.0/13 "), ("service-cidr", "192.168.0.0/16")]);
        assert_eq!(c.cluster_cidrs, vec![net("10.40.0.0/13")]);
        assert_eq!(c.service_cidrs, vec![net("192.168.0.0/16")]);
    }

    #[test]
    fn cidrs_must_be_canonical() {
        refused(&[("cluster-cidr", "10.42.1.1/16")], "cluster-cidr", "10.42.1.1/16", "would be 10.42.0.0/16");
        let kv = dual(&[("service-cidr", "10.43.0.0/16,2001:cafe:43::1/112")]);
        refused(&as_refs(&kv), "service-cidr", "10.43.0.0/16,2001:cafe:43::1/112", "host bits zero");
        good(&as_refs(&dual(&[])));
    }

    #[test]
    fn at_most_one_network_per_family() {
        let v = "10.42.0.0/16,10.44.0.0/16";
        refused(&[("cluster-cidr", v)], "cluster-cidr", v, "at most one network per family");
        let v = "fd00:42::/56,fd00:44::/56";
        refused(&[("cluster-cidr", "fd00:40::/56"), ("service-cidr", v)], "service-cidr", v, "not two IPv6 networks");
        assert_eq!(good(&as_refs(&dual(&[]))).cluster_cidrs.len(), 2);
    }

    #[test]
    fn cluster_and_service_list_the_same_families_in_the_same_order() {
        // Dual-stack pods, single-stack services.
        let kv = dual(&[("service-cidr", "10.43.0.0/16")]);
        refused(&as_refs(&kv), "service-cidr", "10.43.0.0/16", "IPv4 then IPv6, not IPv4");
        // Dual-stack pods and services, in different orders.
        let kv = dual(&[("service-cidr", "2001:cafe:43::/112,10.43.0.0/16")]);
        refused(&as_refs(&kv), "service-cidr", "2001:cafe:43::/112,10.43.0.0/16", "IPv4 then IPv6, not IPv6 then IPv4");
        // IPv6-only pods with the IPv4 default service network.
        let e = refused(
            &[("cluster-cidr", "fd00:42::/56"), ("node-ip", "fd00::1")],
            "service-cidr",
            DEFAULT_SERVICE_CIDR,
            "IPv6, not IPv4",
        );
        assert!(e.accepted.contains("this is its default"), "{e}");
        // Dual-stack services with the single-stack default pod network.
        let e = refused(
            &[("service-cidr", "10.43.0.0/16,fd00:43::/112")],
            "service-cidr",
            "10.43.0.0/16,fd00:43::/112",
            "cluster-cidr `10.42.0.0/16` (default)",
        );
        assert!(e.accepted.contains("IPv4, not IPv4 then IPv6"), "{e}");
        // IPv6 first in both is fine, and so is IPv6 only.
        good(&[
            ("cluster-cidr", "fd00:42::/56,10.42.0.0/16"),
            ("service-cidr", "fd00:43::/112,10.43.0.0/16"),
            ("node-ip", "fd00::1,10.0.0.1"),
        ]);
        let c = good(&[
            ("cluster-cidr", "2001:cafe:42::/56"),
            ("service-cidr", "2001:cafe:43::/112"),
            ("node-ip", "2001:db8::1"),
        ]);
        assert_eq!((c.cluster_v4(), c.node_ip_v4()), (None, None));
    }

    #[test]
    fn service_networks_are_at_most_slash_12_and_slash_112() {
        good(&[("service-cidr", "10.16.0.0/12"), ("cluster-cidr", "10.42.0.0/16")]);
        refused(&[("service-cidr", "10.0.0.0/11")], "service-cidr", "10.0.0.0/11", "no larger than /12");
        let kv = dual(&[("service-cidr", "10.43.0.0/16,2001:cafe:43::/111")]);
        refused(
            &as_refs(&kv),
            "service-cidr",
            "10.43.0.0/16,2001:cafe:43::/111",
            "IPv6 service network no larger than /112",
        );
        let kv = dual(&[("service-cidr", "10.43.0.0/16,2001:cafe:43::/120")]);
        good(&as_refs(&kv));
    }

    #[test]
    fn cluster_and_service_networks_do_not_overlap() {
        // The service network inside the pod network, and around it.
        refused(
            &[("service-cidr", "10.42.128.0/17")],
            "service-cidr",
            "10.42.128.0/17",
            "`10.42.128.0/17` overlaps cluster-cidr `10.42.0.0/16`",
        );
        refused(&[("service-cidr", "10.32.0.0/12")], "service-cidr", "10.32.0.0/12", "overlaps cluster-cidr");
        let kv = dual(&[("service-cidr", "10.43.0.0/16,2001:cafe:42::/112")]);
        refused(
            &as_refs(&kv),
            "service-cidr",
            "10.43.0.0/16,2001:cafe:42::/112",
            "overlaps cluster-cidr `2001:cafe:42::/56`",
        );
        // Adjacent networks do not overlap.
        good(&[("cluster-cidr", "10.42.0.0/16"), ("service-cidr", "10.43.0.0/16")]);
        good(&[("cluster-cidr", "10.43.0.0/17"), ("service-cidr", "10.43.128.0/17")]);
    }

    #[test]
    fn pod_networks_hold_at_least_one_node_subnet() {
        good(&[("cluster-cidr", "10.42.0.0/30"), ("node-cidr-mask-size-ipv4", "30")]);
        refused(
            &[("cluster-cidr", "10.42.0.0/31")],
            "cluster-cidr",
            "10.42.0.0/31",
            "IPv4 pod network of /30 or shorter",
        );
        let kv = dual(&[("cluster-cidr", "10.42.0.0/16,2001:cafe:42::/127")]);
        refused(
            &as_refs(&kv),
            "cluster-cidr",
            "10.42.0.0/16,2001:cafe:42::/127",
            "IPv6 pod network of /126 or shorter",
        );
    }

    #[test]
    fn node_mask_v4_fits_the_cluster_and_leaves_room() {
        let key = "node-cidr-mask-size-ipv4";
        // Equal to the cluster prefix (one node subnet) and /30 are the bounds.
        assert_eq!(good(&[(key, "16")]).node_mask_v4, 16);
        assert_eq!(good(&[(key, "30")]).node_mask_v4, 30);
        refused(&[(key, "15")], key, "15", "at least 16, the prefix length of the IPv4 cluster-cidr");
        refused(&[(key, "31")], key, "31", "at most 30");
        refused(&[(key, "33")], key, "33", "an integer from 0 to 32");
        refused(&[(key, "-1")], key, "-1", "an integer from 0 to 32");
        refused(&[(key, "/24")], key, "/24", "prefix length");
        // The default /24 does not fit a /25 pod network; the refusal says so.
        let e = refused(&[("cluster-cidr", "10.42.0.0/25")], key, "24", "at least 25");
        assert!(e.accepted.contains("is not set"), "{e}");
        // Without an IPv4 pod network only the range is checked.
        let v6 = [("cluster-cidr", "fd00:42::/56"), ("service-cidr", "fd00:43::/112"), ("node-ip", "fd00::1")];
        assert_eq!(good(&[v6[0], v6[1], v6[2], (key, "8")]).node_mask_v4, 8);
        refused(&[v6[0], v6[1], v6[2], (key, "31")], key, "31", "at most 30");
    }

    #[test]
    fn node_mask_v6_fits_the_cluster_leaves_room_and_is_within_16_bits() {
        let key = "node-cidr-mask-size-ipv6";
        let with = |mask: &str, cluster: &str| {
            let cluster_v = format!("10.42.0.0/16,{cluster}");
            let mut kv = dual(&[("cluster-cidr", cluster_v.as_str())]);
            if !mask.is_empty() {
                kv.push((key, mask.to_string()));
            }
            kv
        };
        // cluster /56: masks 56 to 72.
        assert_eq!(good(&as_refs(&with("56", "2001:cafe:42::/56"))).node_mask_v6, 56);
        assert_eq!(good(&as_refs(&with("72", "2001:cafe:42::/56"))).node_mask_v6, 72);
        refused(&as_refs(&with("55", "2001:cafe:42::/56")), key, "55", "at least 56");
        refused(
            &as_refs(&with("73", "2001:cafe:42::/56")),
            key,
            "73",
            "at most 72: kube-controller-manager refuses an IPv6 node mask more than 16 bits longer",
        );
        // cluster /112: 126 is the longest node subnet.
        assert_eq!(good(&as_refs(&with("126", "2001:cafe:42::/112"))).node_mask_v6, 126);
        refused(&as_refs(&with("127", "2001:cafe:42::/112")), key, "127", "at most 126");
        refused(&as_refs(&with("129", "2001:cafe:42::/112")), key, "129", "an integer from 0 to 128");
        // The default /64 is too long for a /32 pod network.
        let e = refused(&as_refs(&with("", "2001:db8::/32")), key, "64", "at most 48");
        assert!(e.accepted.contains("is not set"), "{e}");
        // IPv4-only cluster: only the range is checked.
        assert_eq!(good(&[(key, "120")]).node_mask_v6, 120);
        refused(&[(key, "127")], key, "127", "at most 126");
    }

    #[test]
    fn node_ip_is_required() {
        refused(&[("node-ip", "")], "node-ip", "", "(required)");
        assert_eq!(good(&[("node-ip", "192.168.77.1")]).node_ips, vec![ip("192.168.77.1")]);
    }

    #[test]
    fn node_ip_is_at_most_one_address_per_family() {
        refused(&[("node-ip", "10.0.0.300")], "node-ip", "10.0.0.300", "is not an IP address");
        refused(&[("node-ip", "10.0.0.1/24")], "node-ip", "10.0.0.1/24", "is not an IP address");
        refused(&[("node-ip", "10.0.0.1,10.0.0.2")], "node-ip", "10.0.0.1,10.0.0.2", "at most one address per family");
        refused(
            &[("node-ip", "10.0.0.1,fd00::1,fd00::2")],
            "node-ip",
            "10.0.0.1,fd00::1,fd00::2",
            "at most two entries",
        );
        refused(&[("node-ip", "10.0.0.1,,fd00::1")], "node-ip", "10.0.0.1,,fd00::1", "empty");
        for bad in ["0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255"] {
            refused(&[("node-ip", bad)], "node-ip", bad, "a unicast address");
        }
        // A second family the cluster does not use is kept.
        let c = good(&[("node-ip", "10.0.0.1,fd00::1")]);
        assert_eq!(
            (c.node_ip_v4(), c.node_ip_v6()),
            (Some("10.0.0.1".parse().unwrap()), Some("fd00::1".parse().unwrap()))
        );
    }

    #[test]
    fn every_cluster_family_has_a_node_ip() {
        let kv = dual(&[("node-ip", "10.0.0.1")]);
        refused(&as_refs(&kv), "node-ip", "10.0.0.1", "an IPv6 address too: the dual-stack cluster-cidr");
        let kv = dual(&[("node-ip", "fd00::1")]);
        refused(&as_refs(&kv), "node-ip", "fd00::1", "an IPv4 address too");
        refused(&[("node-ip", "fd00::1")], "node-ip", "fd00::1", "single-stack cluster-cidr `10.42.0.0/16` (default)");
        good(&as_refs(&dual(&[])));
    }

    #[test]
    fn node_ip_lists_cluster_cidrs_first_family_first() {
        // IPv6 first in cluster-cidr: IPv6 first in node-ip.
        let v6_first = [("cluster-cidr", "fd00:42::/56,10.42.0.0/16"), ("service-cidr", "fd00:43::/112,10.43.0.0/16")];
        refused(
            &[v6_first[0], v6_first[1], ("node-ip", "10.0.0.1,fd00::1")],
            "node-ip",
            "10.0.0.1,fd00::1",
            "the IPv6 address first, as cluster-cidr `fd00:42::/56,10.42.0.0/16` lists IPv6 first",
        );
        good(&[v6_first[0], v6_first[1], ("node-ip", "fd00::1,10.0.0.1")]);
        // And the other way round.
        let kv = dual(&[("node-ip", "fd00::1,10.0.0.1")]);
        refused(&as_refs(&kv), "node-ip", "fd00::1,10.0.0.1", "the IPv4 address first");
        // IPv6-only cluster with a dual-stack node: IPv6 first.
        let v6_only = [("cluster-cidr", "fd00:42::/56"), ("service-cidr", "fd00:43::/112")];
        refused(
            &[v6_only[0], v6_only[1], ("node-ip", "10.0.0.1,fd00::1")],
            "node-ip",
            "10.0.0.1,fd00::1",
            "the IPv6 address first",
        );
        good(&[v6_only[0], v6_only[1], ("node-ip", "fd00::1,10.0.0.1")]);
    }

    #[test]
    fn node_external_ip_is_optional_and_like_node_ip() {
        assert!(good(&[]).node_external_ips.is_empty());
        let c = good(&[("node-external-ip", "2001:db8::7,203.0.113.7")]);
        assert_eq!(c.node_external_ips, vec![ip("2001:db8::7"), ip("203.0.113.7")]);
        refused(&[("node-external-ip", "example.com")], "node-external-ip", "example.com", "is not an IP address");
        refused(
            &[("node-external-ip", "203.0.113.7,203.0.113.8")],
            "node-external-ip",
            "203.0.113.7,203.0.113.8",
            "at most one address per family",
        );
        refused(&[("node-external-ip", "0.0.0.0")], "node-external-ip", "0.0.0.0", "a unicast address");
    }

    #[test]
    fn booleans_are_true_or_false() {
        for key in ["flannel-external-ip", "flannel-ipv6-masq"] {
            for bad in ["yes", "True", "1", "on"] {
                refused(&[(key, bad)], key, bad, "true or false");
            }
        }
        assert!(!good(&[("flannel-external-ip", "false")]).flannel_external_ip);
        assert!(!good(&[("flannel-ipv6-masq", "false")]).ipv6_masq);
    }

    #[test]
    fn flannel_external_ip_needs_a_node_external_ip() {
        refused(&[("flannel-external-ip", "true")], "flannel-external-ip", "true", "unless node-external-ip is set");
        let c = good(&[
            ("flannel-external-ip", "true"),
            ("node-external-ip", "203.0.113.7"),
            ("flannel-backend", "wireguard-native"),
        ]);
        assert!(c.flannel_external_ip);
    }

    #[test]
    fn flannel_external_ip_with_an_unencrypted_backend_is_refused_unless_allowed() {
        for backend in ["vxlan", "host-gw"] {
            let kv =
                [("flannel-external-ip", "true"), ("node-external-ip", "203.0.113.7"), ("flannel-backend", backend)];
            refused(&kv, "flannel-external-ip", "true", "use flannel-backend wireguard-native");
            refused(&kv, "flannel-external-ip", "true", backend);
            let allowed = [kv[0], kv[1], kv[2], ("flannel-external-ip-unencrypted", "true")];
            assert!(good(&allowed).flannel_external_ip, "{backend} allowed by the explicit key");
        }
        refused(
            &[("flannel-external-ip-unencrypted", "yes")],
            "flannel-external-ip-unencrypted",
            "yes",
            "true or false",
        );
        // The internal addresses of one network: vxlan as ever.
        assert_eq!(good(&[("node-external-ip", "203.0.113.7")]).backend, Backend::Vxlan);
    }

    #[test]
    fn public_ip_prefers_the_external_ip_only_when_asked() {
        let kv = dual(&[("node-external-ip", "203.0.113.7")]);
        let c = good(&as_refs(&kv));
        assert_eq!(c.public_ip(false), Some(ip("10.0.0.1")), "flannel-external-ip off");
        assert_eq!(c.public_ip(true), Some(ip("fd00::1")));
        let kv = dual(&[
            ("node-external-ip", "203.0.113.7"),
            ("flannel-external-ip", "true"),
            ("flannel-backend", "wireguard-native"),
        ]);
        let c = good(&as_refs(&kv));
        assert_eq!(c.public_ip(false), Some(ip("203.0.113.7")));
        assert_eq!(c.public_ip(true), Some(ip("fd00::1")), "no IPv6 external IP: internal");
        let c = good(&[
            ("node-external-ip", "2001:db8::7"),
            ("flannel-external-ip", "true"),
            ("flannel-backend", "wireguard-native"),
        ]);
        assert_eq!(c.public_ip(false), Some(ip("10.0.0.1")));
        assert_eq!(c.public_ip(true), Some(ip("2001:db8::7")));
        assert_eq!(good(&[]).public_ip(true), None);
    }

    #[test]
    fn family_accessors() {
        let c = good(&as_refs(&dual(&[])));
        assert_eq!(c.cluster_v4(), Some("10.42.0.0/16".parse().unwrap()));
        assert_eq!(c.cluster_v6(), Some("2001:cafe:42::/56".parse().unwrap()));
        assert_eq!(c.node_ip_v4(), Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(c.node_ip_v6(), Some("fd00::1".parse().unwrap()));
        let c = good(&[]);
        assert_eq!((c.cluster_v6(), c.node_ip_v6()), (None, None));
    }

    #[test]
    fn ipv6_masq_needs_an_ipv6_cluster() {
        let e =
            refused(&[("flannel-ipv6-masq", "true")], "flannel-ipv6-masq", "true", "false for an IPv4-only cluster");
        assert!(e.accepted.contains("`10.42.0.0/16`"), "{e}");
        assert!(good(&as_refs(&dual(&[("flannel-ipv6-masq", "true")]))).ipv6_masq);
        let c = good(&[
            ("cluster-cidr", "fd00:42::/56"),
            ("service-cidr", "fd00:43::/112"),
            ("node-ip", "fd00::1"),
            ("flannel-ipv6-masq", "true"),
        ]);
        assert!(c.ipv6_masq);
    }

    #[test]
    fn ipv6_masq_is_not_for_backend_none() {
        let kv = dual(&[("flannel-ipv6-masq", "true"), ("flannel-backend", "none")]);
        refused(&as_refs(&kv), "flannel-ipv6-masq", "true", "false with flannel-backend none");
        for b in ["vxlan", "host-gw", "wireguard-native"] {
            let kv = dual(&[("flannel-ipv6-masq", "true"), ("flannel-backend", b)]);
            assert!(good(&as_refs(&kv)).ipv6_masq, "{b}");
        }
        let kv = dual(&[("flannel-backend", "none")]);
        assert_eq!(good(&as_refs(&kv)).backend, Backend::None);
    }
}
