//! Agent configuration: K3s-style keys from a YAML file, each also a flag.
//!
//! Every value is read as text and checked here, so a refusal always names
//! the key, the value and what would be accepted. Flags override the file.
//! Unknown keys are refused, not ignored: a typo must not silently fall back
//! to a default.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use crate::cluster::{Backend, ClusterConfig};
use crate::error::ConfigError;
use crate::etcd_tls::EtcdSecurity;

/// The agent's own keys; the cluster-shape keys are [`crate::cluster::KEYS`].
pub const AGENT_KEYS: &[(&str, &str)] = &[
    ("node-name", "name of this node (default: NODE_NAME from the environment, else the hostname)"),
    ("vxlan-port", "UDP port of the VXLAN backend (default 8472)"),
    ("vni", "VXLAN network identifier (default 1)"),
    ("tun-name", "name of the TUN device (default weft0)"),
    ("threads", "worker threads, one TUN queue each (default: number of cores)"),
    ("metrics-addr", "address of /metrics, /healthz, /readyz (default 127.0.0.1:9464; empty: off)"),
    ("datastore-file", "static datastore: Flannel's network config and leases in one JSON file"),
    ("etcd-endpoints", "etcd datastore: client URLs, comma separated (instead of datastore-file)"),
    ("etcd-prefix", "etcd key prefix (default /coreos.com/network)"),
    (
        "kube-subnet-mgr",
        "Kubernetes subnet manager: subnets from the Node's podCIDRs, lease as Node annotations (default false)",
    ),
    ("kubeconfig", "with kube-subnet-mgr: the API server's kubeconfig (default: the pod's service account)"),
    (
        "net-config-path",
        "with kube-subnet-mgr: Flannel's net-conf.json (default: from cluster-cidr and flannel-backend)",
    ),
    ("etcd-cafile", "etcd over https://: PEM file of the CA that signed etcd's server certificate"),
    ("etcd-certfile", "etcd over https://: PEM file of the client certificate (with etcd-keyfile)"),
    ("etcd-keyfile", "etcd over https://: PEM file of the client certificate's private key"),
    ("etcd-username", "etcd user (with etcd-password)"),
    ("etcd-password", "password of etcd-username"),
    ("subnet-file", "where subnet.env is written (default /run/flannel/subnet.env)"),
    ("wireguard-key-file", "WireGuard private key, created on first start (default /var/lib/weft/wireguard.key)"),
    ("offload-tun", "TUN offloads: super-packet reads and coalesced writes (default true)"),
    ("offload-udp-gso", "UDP_SEGMENT sends on the underlay (default true)"),
    ("offload-udp-gro", "UDP_GRO receives on the underlay (default true)"),
    ("busy-poll-us", "microseconds a worker keeps polling after its last packet before it sleeps (default 0: off)"),
    (
        "dataplane",
        "with backend vxlan: ebpf (tcx programs encapsulate and decapsulate in the kernel, the engine is the slow \
         path), userspace (the engine does it all) or auto (ebpf where the kernel allows it, else userspace); default userspace",
    ),
    ("ip-masq", "masquerade IPv4 pod traffic leaving the cluster, in nftables table inet weft (default true)"),
    (
        "node-location-label",
        "with kube-subnet-mgr: take node-location from this label of the node's Node, such as \
         topology.kubernetes.io/region (default: none)",
    ),
    (
        "node-location",
        "the private network this node is in (a cloud, a site): with wireguard-native, nodes of one location \
         reach each other at their node-ip, not their external IP (default: none)",
    ),
];

/// Longest `node-location`: a Kubernetes label value's limit.
pub const LOCATION_MAX: usize = 63;

/// Backends this build runs.
pub const BACKENDS: &[Backend] = &[Backend::Vxlan, Backend::HostGw, Backend::WireguardNative, Backend::None];

/// Where leases come from.
#[derive(Debug, Clone, PartialEq)]
pub enum DatastoreSource {
    /// A static JSON file, re-read on SIGHUP.
    File(PathBuf),
    /// etcd, in Flannel's layout under `prefix`.
    Etcd {
        /// Client URLs.
        endpoints: Vec<String>,
        /// Key prefix.
        prefix: String,
        /// TLS files and user (`etcd-cafile`, ..., `etcd-password`).
        security: EtcdSecurity,
    },
    /// The Kubernetes API: the Node objects (Flannel's `--kube-subnet-mgr`).
    Kube(KubeSource),
}

/// Where the API server is: a kubeconfig, or the pod's service account.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeSource {
    /// The kubeconfig file (K3s writes `/etc/rancher/k3s/k3s.yaml`); `None`
    /// inside a pod: the service account's token and CA, and
    /// `KUBERNETES_SERVICE_HOST`.
    pub kubeconfig: Option<PathBuf>,
    /// Flannel's `net-conf.json`; `None`: derived from `cluster-cidr` and
    /// `flannel-backend`.
    pub net_config: Option<PathBuf>,
    /// `node-location-label`: the label of this node's Node that holds
    /// its `node-location`.
    pub location_label: Option<String>,
}

/// The offloads the operator allows the engine (`offload-tun`,
/// `offload-udp-gso`, `offload-udp-gro`), all on by default. The agent hands
/// them to the engine as they are; the engine still drops, at run time, each
/// one the kernel refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloads {
    /// `offload-tun`: TUN super-packets, software segmentation, coalesced writes.
    pub tun: bool,
    /// `offload-udp-gso`: `UDP_SEGMENT` sends.
    pub udp_gso: bool,
    /// `offload-udp-gro`: `UDP_GRO` receives.
    pub udp_gro: bool,
}

impl Default for Offloads {
    fn default() -> Self {
        Offloads { tun: true, udp_gso: true, udp_gro: true }
    }
}

/// Who moves a VXLAN node's packets (`dataplane`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataplane {
    /// tcx programs in the kernel; what they leave goes to the engine.
    Ebpf,
    /// The userspace engine alone.
    Userspace,
    /// `Ebpf` where the kernel loads and attaches the programs, else
    /// `Userspace`, said in one log line.
    Auto,
}

impl Dataplane {
    /// The accepted values, for refusals.
    pub const ACCEPTED: &'static str = "ebpf, userspace or auto";

    /// Parses a `dataplane` value.
    pub fn parse(v: &str) -> Option<Self> {
        match v {
            "ebpf" => Some(Dataplane::Ebpf),
            "userspace" => Some(Dataplane::Userspace),
            "auto" => Some(Dataplane::Auto),
            _ => None,
        }
    }
}

/// `busy-poll-us` when the key is absent: 0, workers sleep as soon as they
/// are idle. The same as the engine's own default, which the weft crate's
/// tests check.
pub const DEFAULT_BUSY_POLL_US: u32 = 0;

/// The agent's configuration, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// The cluster shape: backend, networks, node addresses.
    pub cluster: ClusterConfig,
    /// Whether `cluster-cidr` was given (else it is K3s's default and the
    /// datastore's network config rules).
    pub cluster_cidr_given: bool,
    /// Node name.
    pub node_name: String,
    /// VXLAN UDP port.
    pub vxlan_port: u16,
    /// VXLAN VNI.
    pub vni: u32,
    /// TUN device name.
    pub tun_name: String,
    /// Worker threads.
    pub threads: usize,
    /// Metrics listener, `None` when off.
    pub metrics_addr: Option<SocketAddr>,
    /// Where leases come from.
    pub datastore: DatastoreSource,
    /// subnet.env path.
    pub subnet_file: PathBuf,
    /// WireGuard private key file.
    pub wg_key_file: PathBuf,
    /// The offloads the engine may use (`offload-*` keys).
    pub offloads: Offloads,
    /// `busy-poll-us`.
    pub busy_poll_us: u32,
    /// `ip-masq`: masquerade pod traffic leaving the cluster (IPv6 too
    /// with `flannel-ipv6-masq`).
    pub ip_masq: bool,
    /// `node-location`: the private network this node shares with the
    /// nodes of the same location.
    pub node_location: Option<String>,
    /// `rootless: true` and its keys: no TUN, no netlink, a userspace stack.
    pub rootless: Option<crate::rootless::RootlessConfig>,
    /// `dataplane`.
    pub dataplane: Dataplane,
}

impl AgentConfig {
    /// Every key the agent understands, with a one-line description.
    pub fn keys() -> impl Iterator<Item = &'static (&'static str, &'static str)> {
        crate::cluster::KEYS.iter().chain(AGENT_KEYS).chain(crate::rootless::KEYS)
    }

    /// The backend's name (`vxlan`, `host-gw`, `wireguard-native`, `none`).
    pub fn backend(&self) -> &'static str {
        self.cluster.backend.name()
    }

    /// The backend's name in Flannel's network config and leases (K3s's
    /// `wireguard-native` is Flannel's `wireguard`).
    pub fn lease_backend(&self) -> &'static str {
        match self.cluster.backend {
            Backend::WireguardNative => "wireguard",
            b => b.name(),
        }
    }

    /// This node's own underlay addresses (`node-ip`).
    pub fn node_ips(&self) -> &[IpAddr] {
        &self.cluster.node_ips
    }

    /// Reads the YAML text of a config file into key/value pairs.
    pub fn pairs_from_yaml(text: &str) -> Result<BTreeMap<String, String>, ConfigError> {
        let doc: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| ConfigError::new("(file)", e, "a YAML mapping of key: value"))?;
        let mut out = BTreeMap::new();
        let map = match doc {
            serde_yaml::Value::Null => return Ok(out),
            serde_yaml::Value::Mapping(m) => m,
            other => return Err(ConfigError::new("(file)", yaml_text(&other), "a YAML mapping of key: value")),
        };
        for (k, v) in map {
            let key = match k {
                serde_yaml::Value::String(s) => s,
                other => return Err(ConfigError::new(&yaml_text(&other), "", "string keys")),
            };
            let value = match v {
                serde_yaml::Value::String(s) => s,
                serde_yaml::Value::Number(n) => n.to_string(),
                serde_yaml::Value::Bool(b) => b.to_string(),
                serde_yaml::Value::Null => String::new(),
                // K3s accepts lists for node-ip and the CIDRs; join them.
                serde_yaml::Value::Sequence(items) if items.iter().all(|i| i.is_string()) => {
                    items.iter().filter_map(|i| i.as_str()).collect::<Vec<_>>().join(",")
                }
                other => return Err(ConfigError::new(&key, yaml_text(&other), "a single value")),
            };
            out.insert(key, value);
        }
        Ok(out)
    }

    /// Validates key/value pairs (file and flags merged) into a config.
    pub fn from_pairs(pairs: &BTreeMap<String, String>) -> Result<AgentConfig, ConfigError> {
        for key in pairs.keys() {
            if !Self::keys().any(|(k, _)| k == key) {
                let known: Vec<&str> = Self::keys().map(|(k, _)| *k).collect();
                return Err(ConfigError::new(
                    key,
                    &pairs[key],
                    format!("unknown key; known keys: {}", known.join(", ")),
                ));
            }
        }
        let cluster = ClusterConfig::from_pairs(pairs)?;
        if !BACKENDS.contains(&cluster.backend) {
            let names: Vec<&str> = BACKENDS.iter().map(|b| b.name()).collect();
            return Err(ConfigError::new(
                "flannel-backend",
                cluster.backend.name(),
                format!("one of: {} (this build has no {} yet)", names.join(", "), cluster.backend.name()),
            ));
        }
        let get = |k: &str| pairs.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());
        let vxlan_port = parse_num("vxlan-port", get("vxlan-port"), 8472u16, 1, 65535)?;
        let vni = parse_num("vni", get("vni"), 1u32, 1, weft_tunnel::vxlan::MAX_VNI)?;
        let tun_name = get("tun-name").unwrap_or("weft0").to_string();
        if tun_name.len() > 15 || tun_name.contains(['/', ' ', ':']) {
            return Err(ConfigError::new(
                "tun-name",
                &tun_name,
                "an interface name of 1-15 characters without '/', ':' or spaces",
            ));
        }
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let threads = parse_num("threads", get("threads"), cores, 1, 256)?;
        let metrics_addr = match pairs.get("metrics-addr").map(|s| s.trim()) {
            Some("") => None,
            Some(v) => Some(v.parse().map_err(|_| {
                ConfigError::new("metrics-addr", v, "host:port such as 127.0.0.1:9464, or empty for off")
            })?),
            None => Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
        };
        if get("etcd-endpoints").is_none() {
            if let Some(k) = ETCD_ACCESS_KEYS.iter().find(|k| get(k).is_some()) {
                return Err(ConfigError::new(k, shown(k, get(k)), "only with etcd-endpoints"));
            }
        }
        let kube = parse_bool("kube-subnet-mgr", get("kube-subnet-mgr"), false)?;
        for key in ["kubeconfig", "net-config-path", "node-location-label"] {
            if let (Some(v), false) = (get(key), kube) {
                return Err(ConfigError::new(key, v, "only with kube-subnet-mgr: true"));
            }
        }
        let datastore = match (get("datastore-file"), get("etcd-endpoints")) {
            (None, None) if kube => DatastoreSource::Kube(KubeSource {
                kubeconfig: get("kubeconfig").map(PathBuf::from),
                net_config: get("net-config-path").map(PathBuf::from),
                location_label: get("node-location-label").map(str::to_string),
            }),
            (Some(_), _) | (_, Some(_)) if kube => {
                return Err(ConfigError::new(
                    "kube-subnet-mgr",
                    "true",
                    "one datastore: kube-subnet-mgr, datastore-file or etcd-endpoints, not several",
                ))
            }
            (Some(f), None) => DatastoreSource::File(PathBuf::from(f)),
            (None, Some(e)) => {
                let endpoints: Vec<String> = e.split(',').map(|s| s.trim().to_string()).collect();
                let scheme = |s: &str| endpoints.iter().all(|u| u.starts_with(s) && u.len() > s.len());
                let https = scheme("https://");
                if !https && !scheme("http://") {
                    return Err(ConfigError::new(
                        "etcd-endpoints",
                        e,
                        "http:// or https:// client URLs, comma separated, all of one scheme",
                    ));
                }
                let prefix = get("etcd-prefix").unwrap_or("/coreos.com/network").trim_end_matches('/').to_string();
                if !prefix.starts_with('/') {
                    return Err(ConfigError::new("etcd-prefix", &prefix, "a key prefix starting with '/'"));
                }
                let security = etcd_security(&get, https)?;
                DatastoreSource::Etcd { endpoints, prefix, security }
            }
            (Some(_), Some(e)) => {
                return Err(ConfigError::new("etcd-endpoints", e, "either datastore-file or etcd-endpoints, not both"))
            }
            (None, None) => {
                return Err(ConfigError::new(
                    "datastore-file",
                    "",
                    "the path of a static datastore JSON file, or etcd-endpoints, or kube-subnet-mgr: true (one is required)",
                ))
            }
        };
        let offloads = Offloads {
            tun: parse_bool("offload-tun", get("offload-tun"), true)?,
            udp_gso: parse_bool("offload-udp-gso", get("offload-udp-gso"), true)?,
            udp_gro: parse_bool("offload-udp-gro", get("offload-udp-gro"), true)?,
        };
        let busy_poll_us = parse_num("busy-poll-us", get("busy-poll-us"), DEFAULT_BUSY_POLL_US, 0, 10_000)?;
        let ip_masq = parse_bool("ip-masq", get("ip-masq"), true)?;
        let subnet_file = PathBuf::from(get("subnet-file").unwrap_or("/run/flannel/subnet.env"));
        let node_location = get("node-location").map(str::to_string);
        if let (Some(label), Some(l)) = (get("node-location-label"), &node_location) {
            return Err(ConfigError::new(
                "node-location-label",
                label,
                format!("not with node-location (`{l}`): one says where the node is"),
            ));
        }
        if let Some(label) = get("node-location-label") {
            let ok = label.len() <= 317
                && label.split('/').count() <= 2
                && label.split('/').all(|part| !part.is_empty())
                && label.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
            if !ok {
                return Err(ConfigError::new(
                    "node-location-label",
                    label,
                    "a Kubernetes label key: [prefix/]name of letters, digits, '-', '_' and '.'",
                ));
            }
        }
        if let Some(l) = &node_location {
            if !valid_location(l) {
                return Err(ConfigError::new(
                    "node-location",
                    l,
                    format!(
                        "1 to {LOCATION_MAX} letters, digits, '-', '_' or '.', starting and ending with a letter \
                         or digit (a Kubernetes label value)"
                    ),
                ));
            }
        }
        let raw = |k: &str| pairs.get(k).map(String::as_str);
        let rootless = crate::rootless::from_pairs(&get, &raw, cluster.backend)?;
        let dataplane = match get("dataplane") {
            // Userspace until the eBPF path covers IPv6 underlays too.
            None => Dataplane::Userspace,
            Some(v) => Dataplane::parse(v).ok_or_else(|| ConfigError::new("dataplane", v, Dataplane::ACCEPTED))?,
        };
        if dataplane == Dataplane::Ebpf && cluster.backend != Backend::Vxlan {
            return Err(ConfigError::new(
                "dataplane",
                "ebpf",
                format!("only with backend vxlan (this node's is {}): userspace or auto", cluster.backend.name()),
            ));
        }
        if dataplane == Dataplane::Ebpf && rootless.is_some() {
            return Err(ConfigError::new(
                "dataplane",
                "ebpf",
                "not on a rootless node (it cannot load BPF programs): userspace or auto",
            ));
        }
        let node_name = match get("node-name") {
            Some(v) => v.to_string(),
            None if std::env::var("NODE_NAME").is_ok_and(|n| !n.trim().is_empty()) => {
                std::env::var("NODE_NAME").unwrap_or_default().trim().to_string()
            }
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| cluster.node_ips[0].to_string()),
        };
        Ok(AgentConfig {
            cluster_cidr_given: get("cluster-cidr").is_some(),
            cluster,
            node_name,
            vxlan_port,
            vni,
            tun_name,
            threads,
            metrics_addr,
            datastore,
            subnet_file,
            wg_key_file: PathBuf::from(get("wireguard-key-file").unwrap_or("/var/lib/weft/wireguard.key")),
            offloads,
            busy_poll_us,
            ip_masq,
            node_location,
            rootless,
            dataplane,
        })
    }
}

/// Whether `l` is a valid `node-location`: what Kubernetes accepts as a
/// label value, less the empty one.
pub fn valid_location(l: &str) -> bool {
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    l.len() <= LOCATION_MAX
        && edge_ok(l.chars().next())
        && edge_ok(l.chars().last())
        && l.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// The keys of etcd's TLS files and user, Flannel's names.
const ETCD_ACCESS_KEYS: &[&str] = &["etcd-cafile", "etcd-certfile", "etcd-keyfile", "etcd-username", "etcd-password"];

/// A value as it may appear in a refusal: never the password.
fn shown(key: &str, v: Option<&str>) -> String {
    match (key, v) {
        ("etcd-password", Some(_)) => "(hidden)".into(),
        (_, v) => v.unwrap_or("").to_string(),
    }
}

/// The etcd TLS files and user, checked against each other and against the
/// endpoints' scheme; the files are read and must hold what they are for.
fn etcd_security<'a>(get: &impl Fn(&str) -> Option<&'a str>, https: bool) -> Result<EtcdSecurity, ConfigError> {
    let path = |k: &str| get(k).map(PathBuf::from);
    let sec = EtcdSecurity {
        ca_file: path("etcd-cafile"),
        cert_file: path("etcd-certfile"),
        key_file: path("etcd-keyfile"),
        username: get("etcd-username").map(str::to_string),
        password: get("etcd-password").map(str::to_string),
    };
    if !https {
        if let Some(k) = ["etcd-cafile", "etcd-certfile", "etcd-keyfile"].into_iter().find(|k| get(k).is_some()) {
            return Err(ConfigError::new(k, shown(k, get(k)), "TLS files only with https:// etcd-endpoints"));
        }
    }
    if https && sec.ca_file.is_none() {
        return Err(ConfigError::new(
            "etcd-cafile",
            "",
            "the PEM file of the CA that signed etcd's server certificate (required with https:// etcd-endpoints)",
        ));
    }
    // Keys that need each other: the one missing is named, with what it is.
    let pairs = [
        (sec.cert_file.is_some(), sec.key_file.is_some(), "etcd-keyfile", "the private key of etcd-certfile"),
        (sec.key_file.is_some(), sec.cert_file.is_some(), "etcd-certfile", "the client certificate of etcd-keyfile"),
        (sec.username.is_some(), sec.password.is_some(), "etcd-password", "the password of etcd-username"),
        (sec.password.is_some(), sec.username.is_some(), "etcd-username", "the user whose password etcd-password is"),
    ];
    if let Some((_, _, key, what)) = pairs.iter().find(|(given, other, _, _)| *given && !*other) {
        return Err(ConfigError::new(key, "", format!("{what} (required with it)")));
    }
    if let Err(e) = sec.load() {
        return Err(tls_file_refused(&e));
    }
    Ok(sec)
}

/// A refused TLS file as a config refusal: its key, its path, what it must
/// hold and what is wrong with it.
pub fn tls_file_refused(e: &crate::etcd_tls::TlsFileError) -> ConfigError {
    ConfigError::new(e.file.key(), e.path.display(), format!("{}; this one: {}", e.file.wanted(), e.reason))
}

fn parse_num<T>(key: &str, v: Option<&str>, default: T, min: T, max: T) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let Some(v) = v else { return Ok(default) };
    match v.parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        _ => Err(ConfigError::new(key, v, format!("an integer from {min} to {max}"))),
    }
}

fn parse_bool(key: &str, v: Option<&str>, default: bool) -> Result<bool, ConfigError> {
    match v {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(v) => Err(ConfigError::new(key, v, "true or false")),
    }
}

fn yaml_text(v: &serde_yaml::Value) -> String {
    serde_yaml::to_string(v).map(|s| s.trim().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_pairs(&AgentConfig::pairs_from_yaml(yaml)?)
    }

    const GOOD: &str = "node-ip: 192.168.77.1\ndatastore-file: /tmp/ds.json\n";

    #[test]
    fn good_file_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.node_ips(), &["192.168.77.1".parse::<IpAddr>().unwrap()]);
        assert_eq!((c.vxlan_port, c.vni, c.tun_name.as_str(), c.backend()), (8472, 1, "weft0", "vxlan"));
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(c.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(c.datastore, DatastoreSource::File("/tmp/ds.json".into()));
        assert!(!c.cluster_cidr_given);
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(
            "node-name: n1\nnode-ip: fd77::1\nflannel-backend: host-gw\ncluster-cidr: 2001:cafe:42::/56\n\
             service-cidr: 2001:cafe:43::/112\nvxlan-port: 4789\nvni: 42\n\
             tun-name: wt0\nthreads: 3\nmetrics-addr: ''\netcd-endpoints: http://127.0.0.1:2379\n\
             etcd-prefix: /weft/network/\nsubnet-file: s.env\n",
        )
        .unwrap();
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.backend(), "host-gw");
        assert_eq!(c.cluster.cluster_cidrs, vec!["2001:cafe:42::/56".parse::<ipnet::IpNet>().unwrap()]);
        assert!(c.cluster_cidr_given);
        assert_eq!((c.vxlan_port, c.vni, c.threads), (4789, 42, 3));
        assert_eq!(c.tun_name, "wt0");
        assert_eq!(c.metrics_addr, None);
        assert_eq!(c.subnet_file, PathBuf::from("s.env"));
        assert_eq!(
            c.datastore,
            DatastoreSource::Etcd {
                endpoints: vec!["http://127.0.0.1:2379".into()],
                prefix: "/weft/network".into(),
                security: EtcdSecurity::default(),
            }
        );
    }

    #[test]
    fn k3s_lists_are_accepted() {
        let c = parse(
            "node-ip: [192.168.77.1, 'fd77::1']\ncluster-cidr: [10.42.0.0/16, '2001:cafe:42::/56']\n\
                       service-cidr: 10.43.0.0/16,2001:cafe:43::/112\ndatastore-file: x\n",
        )
        .unwrap();
        assert_eq!(c.node_ips().len(), 2);
        assert_eq!(c.cluster.cluster_cidrs.len(), 2);
    }

    fn refused(yaml: &str) -> ConfigError {
        parse(yaml).expect_err(yaml)
    }

    #[test]
    fn dataplane_defaults_to_userspace_and_ebpf_needs_vxlan_and_root() {
        assert_eq!(parse(GOOD).unwrap().dataplane, Dataplane::Userspace);
        for (v, want) in [("ebpf", Dataplane::Ebpf), ("userspace", Dataplane::Userspace), ("auto", Dataplane::Auto)] {
            assert_eq!(parse(&format!("{GOOD}dataplane: {v}\n")).unwrap().dataplane, want);
        }
        let e = refused(&format!("{GOOD}dataplane: xdp\n"));
        assert_eq!((e.key.as_str(), e.value.as_str(), e.accepted.as_str()), ("dataplane", "xdp", Dataplane::ACCEPTED));
        let e = refused(&format!("{GOOD}flannel-backend: host-gw\ndataplane: ebpf\n"));
        assert_eq!(e.key, "dataplane");
        assert!(e.accepted.contains("only with backend vxlan") && e.accepted.contains("host-gw"), "{e}");
        // auto is fine anywhere: it means userspace where eBPF cannot run.
        assert_eq!(
            parse(&format!("{GOOD}flannel-backend: host-gw\ndataplane: auto\n")).unwrap().dataplane,
            Dataplane::Auto
        );
        let e = refused(&format!("{GOOD}rootless: true\ndataplane: ebpf\n"));
        assert!(e.key == "dataplane" && e.accepted.contains("rootless"), "{e}");
    }

    #[test]
    fn bad_values_name_key_value_and_what_is_accepted() {
        let e = refused(&format!("{GOOD}vni: 16777216\n"));
        assert_eq!((e.key.as_str(), e.value.as_str()), ("vni", "16777216"));
        assert!(e.accepted.contains("1 to 16777215"), "{e}");
        let e = refused(&format!("{GOOD}flannel-backend: ipsec\n"));
        assert_eq!((e.key.as_str(), e.value.as_str()), ("flannel-backend", "ipsec"));
        assert!(e.accepted.contains("wireguard-native"), "{e}");
        let e = refused(&format!("{GOOD}vxlan-port: 0\n"));
        assert_eq!(e.key, "vxlan-port");
        let e = refused(&format!("{GOOD}cluster-cidr: 10.244.1.1/16\n"));
        assert_eq!(e.key, "cluster-cidr");
        let e = refused(&format!("{GOOD}threads: lots\n"));
        assert_eq!((e.key.as_str(), e.value.as_str()), ("threads", "lots"));
        let e = refused(&format!("{GOOD}metrics-addr: localhost\n"));
        assert_eq!(e.key, "metrics-addr");
        let e = refused(&format!("{GOOD}tun-name: a-name-much-too-long\n"));
        assert_eq!(e.key, "tun-name");
        let e = refused("node-ip: 300.1.1.1\ndatastore-file: x\n");
        assert_eq!((e.key.as_str(), e.value.as_str()), ("node-ip", "300.1.1.1"));
        let e = refused("datastore-file: x\n");
        assert_eq!(e.key, "node-ip");
        let e = refused("node-ip: 10.0.0.1\n");
        assert_eq!(e.key, "datastore-file");
        let e = refused(&format!("{GOOD}etcd-endpoints: http://127.0.0.1:2379\n"));
        assert_eq!(e.key, "etcd-endpoints", "both datastores given");
        let e = refused("node-ip: 10.0.0.1\netcd-endpoints: 127.0.0.1:2379\n");
        assert_eq!(e.key, "etcd-endpoints");
        for key in ["offload-tun", "offload-udp-gso", "offload-udp-gro"] {
            let e = refused(&format!("{GOOD}{key}: maybe\n"));
            assert_eq!((e.key.as_str(), e.value.as_str(), e.accepted.as_str()), (key, "maybe", "true or false"));
        }
        for bad in ["-1", "fast", "10001"] {
            let e = refused(&format!("{GOOD}busy-poll-us: {bad}\n"));
            assert_eq!((e.key.as_str(), e.value.as_str()), ("busy-poll-us", bad));
            assert!(e.accepted.contains("0 to 10000"), "{}", e.accepted);
        }
    }

    #[test]
    fn the_kubernetes_subnet_manager_is_one_datastore_among_three() {
        let c = parse("node-ip: 10.0.0.1\nkube-subnet-mgr: true\nkubeconfig: /etc/rancher/k3s/k3s.yaml\n").unwrap();
        assert_eq!(
            c.datastore,
            DatastoreSource::Kube(KubeSource {
                kubeconfig: Some("/etc/rancher/k3s/k3s.yaml".into()),
                net_config: None,
                location_label: None,
            })
        );
        let c = parse("node-ip: 10.0.0.1\nkube-subnet-mgr: true\nnet-config-path: n.json\n").unwrap();
        assert_eq!(
            c.datastore,
            DatastoreSource::Kube(KubeSource {
                kubeconfig: None,
                net_config: Some("n.json".into()),
                location_label: None
            })
        );
        let e = refused(&format!("{GOOD}kube-subnet-mgr: true\n"));
        assert_eq!((e.key.as_str(), e.value.as_str()), ("kube-subnet-mgr", "true"));
        let e = refused(&format!("{GOOD}kubeconfig: k.yaml\n"));
        assert_eq!(
            (e.key.as_str(), e.value.as_str(), e.accepted.as_str()),
            ("kubeconfig", "k.yaml", "only with kube-subnet-mgr: true")
        );
        let e = refused("node-ip: 10.0.0.1\nkube-subnet-mgr: yes\n");
        assert_eq!((e.key.as_str(), e.accepted.as_str()), ("kube-subnet-mgr", "true or false"));
    }

    #[test]
    fn busy_poll_defaults_and_can_be_turned_off() {
        assert_eq!(parse(GOOD).unwrap().busy_poll_us, DEFAULT_BUSY_POLL_US);
        assert_eq!(parse(&format!("{GOOD}busy-poll-us: 0\n")).unwrap().busy_poll_us, 0);
        assert_eq!(parse(&format!("{GOOD}busy-poll-us: 250\n")).unwrap().busy_poll_us, 250);
    }

    #[test]
    fn ip_masq_defaults_on_and_refuses_other_values() {
        assert!(parse(GOOD).unwrap().ip_masq);
        assert!(!parse(&format!("{GOOD}ip-masq: false\n")).unwrap().ip_masq);
        assert!(parse(&format!("{GOOD}ip-masq: true\n")).unwrap().ip_masq);
        for bad in ["yes", "0", "off"] {
            let e = refused(&format!("{GOOD}ip-masq: {bad}\n"));
            assert_eq!((e.key.as_str(), e.value.as_str(), e.accepted.as_str()), ("ip-masq", bad, "true or false"));
        }
    }

    #[test]
    fn node_location_is_a_label_value_or_absent() {
        assert_eq!(parse(GOOD).unwrap().node_location, None);
        for good in ["eu-west-1", "home", "a", "cloud_2.b"] {
            assert_eq!(parse(&format!("{GOOD}node-location: {good}\n")).unwrap().node_location.as_deref(), Some(good));
        }
        let long = "x".repeat(LOCATION_MAX + 1);
        for bad in ["-eu", "eu-", "eu west", "eu/west", long.as_str()] {
            let e = refused(&format!("{GOOD}node-location: '{bad}'\n"));
            assert_eq!((e.key.as_str(), e.value.as_str()), ("node-location", bad));
            assert!(e.accepted.contains("a Kubernetes label value"), "{e}");
        }
    }

    #[test]
    fn node_location_label_is_for_the_kube_subnet_manager_and_not_beside_node_location() {
        let kube = "node-ip: 10.0.0.1\nkube-subnet-mgr: true\n";
        let c = parse(&format!("{kube}node-location-label: topology.kubernetes.io/region\n")).unwrap();
        let DatastoreSource::Kube(src) = &c.datastore else { panic!("not kube: {:?}", c.datastore) };
        assert_eq!(src.location_label.as_deref(), Some("topology.kubernetes.io/region"));
        let e = refused(&format!("{GOOD}node-location-label: zone\n"));
        assert_eq!((e.key.as_str(), e.accepted.as_str()), ("node-location-label", "only with kube-subnet-mgr: true"));
        let e = refused(&format!("{kube}node-location-label: zone\nnode-location: eu\n"));
        assert!(e.key == "node-location-label" && e.accepted.contains("not with node-location"), "{e}");
        for bad in ["a b", "a/b/c", "/zone", "zone/"] {
            let e = refused(&format!("{kube}node-location-label: '{bad}'\n"));
            assert_eq!((e.key.as_str(), e.value.as_str()), ("node-location-label", bad), "{e}");
        }
    }

    #[test]
    fn offload_keys_turn_each_offload_off() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.offloads, Offloads::default());
        let c = parse(&format!("{GOOD}offload-tun: false\noffload-udp-gro: false\n")).unwrap();
        assert_eq!(c.offloads, Offloads { tun: false, udp_gso: true, udp_gro: false });
        let c = parse(&format!("{GOOD}offload-udp-gso: false\n")).unwrap();
        assert_eq!(c.offloads, Offloads { tun: true, udp_gso: false, udp_gro: true });
    }

    #[test]
    fn unknown_keys_and_bad_shapes_are_refused() {
        let e = refused(&format!("{GOOD}vnii: 1\n"));
        assert_eq!(e.key, "vnii");
        assert!(e.accepted.contains("vxlan-port"), "lists the known keys: {e}");
        assert_eq!(refused("- a\n- b\n").key, "(file)");
        assert_eq!(refused("node-ip: {a: 1}\n").key, "node-ip");
        assert_eq!(refused("{{{").key, "(file)");
    }
}
