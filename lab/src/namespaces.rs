//! Building and removing a lab on the host: the state directory, the
//! underlay namespace and its bridge, a namespace per node joined by a veth,
//! the internet namespace, and pods attached by the real CNI plugins. [`up`]
//! runs the whole build in order; [`down`] removes everything a lab of that
//! name made, also after a crash.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipnet::IpNet;
use weft_control::cni::SubnetEnv;
use weft_control::datastore::Lease;

use crate::agents::{start_agent, wait_ready};
use crate::etcd::{enable_etcd_auth, start_etcd};
use crate::kube;
use crate::netns::{self, ip};
use crate::peers::{kernel_flannel_node, userspace_wg_node};
use crate::plan::{datastore, plan, Lab, LabOptions, Node, NodeKind};

/// Where lab state (datastore, configs, logs, pids) lives.
pub const STATE_ROOT: &str = "/run/weft/lab";
/// Underlay MTU of the lab's veths.
pub const UNDERLAY_MTU: u32 = 1500;
/// The internet namespace's IPv4 address: outside the node range and every
/// pod network (TEST-NET-3), on the underlay bridge.
pub const INTERNET_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The internet namespace's IPv6 address (documentation range), when the
/// lab has an IPv6 underlay.
pub const INTERNET_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 1);
/// Where Debian's containernetworking-plugins live.
pub const CNI_PATH: &str = "/usr/lib/cni";

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
    if opts.impair.is_some() && opts.multicloud.is_some() {
        bail!("--impair stands on the lab bridge's first link; --multicloud has no lab bridge");
    }
    if opts.multicloud.is_some()
        && (opts.backend != "wireguard-native"
            || opts.datastore == "kube"
            || opts.kernel_peer
            || opts.wg_peer.is_some())
    {
        bail!(
            "--multicloud runs weft nodes with --backend wireguard-native (only WireGuard may cross the \
             internet) and --datastore file or etcd"
        );
    }
    if opts.rootless && (opts.multicloud.is_some() || !["vxlan", "wireguard-native"].contains(&opts.backend.as_str())) {
        bail!("--rootless needs --backend vxlan or wireguard-native, and no --multicloud");
    }
    let mut nodes = plan(opts)?;
    let rootless = if opts.rootless { nodes.pop() } else { None };
    let mut lab = Lab { opts: opts.clone(), nodes, dir: Path::new(STATE_ROOT).join(&opts.name), kube: None, rootless };
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
    for n in lab.nodes.iter().chain(&lab.rootless) {
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
    match lab.opts.multicloud.clone() {
        Some(m) => crate::multicloud::build_network(lab, &m)?,
        None => {
            build_underlay(lab)?;
            build_internet(lab)?;
            if let Some(spec) = &lab.opts.impair {
                crate::impair::install(lab, lab.nodes[0].index, spec)?;
            }
        }
    }
    if lab.opts.backend == "wireguard-native" {
        // Each node's key, made as the agent would make it; the static
        // datastore announces the public halves (with etcd, the agents'
        // leases do, and only the userspace peer's key is made here).
        let file = lab.opts.datastore == "file";
        for n in lab.nodes.iter_mut().chain(&mut lab.rootless).filter(|n| file || n.kind == NodeKind::UserspaceWg) {
            let private = weft_control::keys::load_or_create(&wg_key_path(&lab.dir, n.index))?;
            n.wg_public = Some(weft_uapi::Key(private).public_key().0);
        }
    }
    let all: Vec<_> = lab.nodes.iter().chain(&lab.rootless).cloned().collect();
    let ds = datastore(&lab.opts, &all);
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
    for n in lab.weft_nodes().chain(&lab.rootless) {
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
        for n in lab.nodes.iter_mut().chain(&mut lab.rootless) {
            // A node behind NAT announces its external address.
            let ips: Vec<std::net::IpAddr> = n.ips().into_iter().chain(n.external4.map(Into::into)).collect();
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
pub(crate) fn underlay_service_address(lab: &Lab) -> anyhow::Result<()> {
    let ul = format!("{}-ul", lab.opts.name);
    if lab.opts.multicloud.is_some() {
        let a = format!("{}/24", crate::multicloud::SERVICE_PUBLIC);
        ip(&["-n", &ul, "addr", "replace", &a, "dev", "br0"])?;
    } else if lab.opts.cluster_v4().is_some() {
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

/// Where a node's WireGuard private key is.
pub(crate) fn wg_key_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("n{index}-wg.key"))
}

/// Where a node's `subnet.env` is.
pub(crate) fn subnet_env_path(lab: &Lab, n: &Node) -> PathBuf {
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

pub(crate) fn read_pid(path: &Path) -> Option<nix::unistd::Pid> {
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
    crate::rootless::remove_user(name);
}

/// Whether lab names are valid: short (interface and namespace names derive
/// from them) and plain.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 16 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}
