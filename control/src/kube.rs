//! The Kubernetes subnet manager: Flannel's `--kube-subnet-mgr`, as K3s and
//! RKE2 run it.
//!
//! ```text
//!  controller manager ── spec.podCIDR(s) ──> Node <name>  <── kubelet registers it
//!                                              │  ▲
//!        list + watch (all Nodes, resumed) ────┘  └── PATCH nodes/<name>/status:
//!                 │                                     annotations flannel.alpha.coreos.com/*
//!                 ▼                                     condition NetworkUnavailable=False
//!  every Node with kube-subnet-manager=true and a podCIDR is a peer lease
//! ```
//!
//! The node's subnets are not allocated here: they are the Node's
//! `spec.podCIDRs` (or `spec.podCIDR`), which the controller manager assigns.
//! Until it has, the agent waits and says so. The lease is written as the
//! Node annotations Flannel writes (`kube-subnet-manager`, `backend-type`,
//! `backend-data`, `backend-v6-data`, `public-ip`, `public-ipv6`), through
//! the `nodes/status` subresource with a strategic-merge patch, as Flannel
//! does; `public-ip-overwrite` / `public-ipv6-overwrite` (and, below them,
//! `node-public-ip` / `node-public-ipv6`) set at start override the announced
//! address. Once the data path is up, the `NetworkUnavailable` condition is
//! set to `False` (reason `FlannelIsUp`). Every other Node carrying the
//! annotations is a peer, kept current by kube-rs's watcher, which lists
//! again after a dropped watch or a `410 Gone`. While the API server is
//! unreachable the data plane keeps forwarding with the last view.
//!
//! It refuses to invent anything: a Node without a pod CIDR, or one whose
//! annotations do not parse, is not a peer (and the reason is logged).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use crossbeam_channel::Sender;
use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use serde_json::{json, Value};

use crate::config::{AgentConfig, KubeSource};
use crate::datastore::{Lease, NetworkConfig, StaticDatastore};
use crate::lease::Update;
use crate::subnet::SubnetKey;

/// Flannel's annotation prefix.
pub const PREFIX: &str = "flannel.alpha.coreos.com";
/// Annotation: the node's lease is managed by the Kubernetes subnet manager.
pub const KUBE_MANAGED: &str = "kube-subnet-manager";
/// Annotation: `vxlan`, `wireguard`, `host-gw`, ...
pub const BACKEND_TYPE: &str = "backend-type";
/// Annotation: the IPv4 backend data, JSON.
pub const BACKEND_DATA: &str = "backend-data";
/// Annotation: the IPv6 backend data, JSON.
pub const BACKEND_V6_DATA: &str = "backend-v6-data";
/// Annotation: the node's IPv4 tunnel endpoint.
pub const PUBLIC_IP: &str = "public-ip";
/// Annotation: the node's IPv6 tunnel endpoint.
pub const PUBLIC_IPV6: &str = "public-ipv6";
/// Annotation set by an operator: announce this IPv4 address instead.
pub const PUBLIC_IP_OVERWRITE: &str = "public-ip-overwrite";
/// Annotation set by an operator: announce this IPv6 address instead.
pub const PUBLIC_IPV6_OVERWRITE: &str = "public-ipv6-overwrite";
/// Annotation set by an operator: this node's public IPv4 address.
pub const NODE_PUBLIC_IP: &str = "node-public-ip";
/// Annotation set by an operator: this node's public IPv6 address.
pub const NODE_PUBLIC_IPV6: &str = "node-public-ipv6";

/// Timeout of every API call but the watch, and of connecting.
pub const API_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the start waits again for the node's pod CIDR, and how often
/// that wait is logged.
const WAIT_STEP: Duration = Duration::from_secs(1);
const WAIT_LOG_EVERY: Duration = Duration::from_secs(10);
/// Longest wait between retries while the API server is unreachable: short
/// enough that a returning server is caught up with within seconds.
const MAX_BACKOFF: Duration = Duration::from_secs(3);

/// `flannel.alpha.coreos.com/<name>`.
pub fn annotation(name: &str) -> String {
    format!("{PREFIX}/{name}")
}

/// The node's pod subnets (`spec.podCIDRs`, else `spec.podCIDR`) within the
/// families `net` has. `Ok(None)` while none is assigned.
pub fn pod_subnets(node: &Node, net: &NetworkConfig) -> Result<Option<SubnetKey>, String> {
    let spec = node.spec.as_ref();
    let mut cidrs: Vec<&str> =
        spec.and_then(|s| s.pod_cidrs.as_ref()).map(|v| v.iter().map(|s| s.as_str()).collect()).unwrap_or_default();
    if cidrs.is_empty() {
        cidrs.extend(spec.and_then(|s| s.pod_cidr.as_deref()));
    }
    let v4_on = net.network.is_some() && net.enable_ipv4 != Some(false);
    let v6_on = net.ipv6_network.is_some() && (net.enable_ipv6 == Some(true) || !v4_on);
    let mut key = SubnetKey { v4: None, v6: None };
    for c in cidrs {
        let n: IpNet = c.trim().parse().map_err(|_| format!("spec.podCIDRs holds `{c}`, not a CIDR"))?;
        match n.trunc() {
            IpNet::V4(n) if v4_on && key.v4.is_none() => {
                if !net.network.is_some_and(|w| w.contains(&n)) {
                    return Err(format!("pod CIDR {n} is outside the network {:?}", net.network));
                }
                key.v4 = Some(n)
            }
            IpNet::V6(n) if v6_on && key.v6.is_none() => {
                if !net.ipv6_network.is_some_and(|w| w.contains(&n)) {
                    return Err(format!("pod CIDR {n} is outside the IPv6 network {:?}", net.ipv6_network));
                }
                key.v6 = Some(n)
            }
            _ => {}
        }
    }
    if (v4_on && key.v4.is_none()) || (v6_on && key.v6.is_none()) {
        return Ok(None);
    }
    Ok(Some(key))
}

fn annotations(node: &Node) -> Option<&BTreeMap<String, String>> {
    node.metadata.annotations.as_ref()
}

fn get<'a>(node: &'a Node, name: &str) -> Option<&'a str> {
    annotations(node)?.get(&annotation(name)).map(|s| s.as_str()).filter(|s| !s.trim().is_empty())
}

/// A peer Node's lease, from its pod CIDRs and Flannel's annotations.
/// `Ok(None)`: not a node of the Kubernetes subnet manager (yet).
pub fn node_lease(node: &Node, net: &NetworkConfig) -> Result<Option<(SubnetKey, Lease)>, String> {
    if get(node, KUBE_MANAGED) != Some("true") {
        return Ok(None);
    }
    let Some(key) = pod_subnets(node, net)? else { return Ok(None) };
    let backend_type = get(node, BACKEND_TYPE).ok_or("no backend-type annotation")?.to_string();
    let json = |name: &str| -> Result<Option<Value>, String> {
        get(node, name)
            .map(|s| serde_json::from_str(s).map_err(|e| format!("annotation {name} is not JSON: {e}")))
            .transpose()
    };
    let ip = |name: &str| -> Result<Option<IpAddr>, String> {
        get(node, name)
            .map(|s| s.trim().parse().map_err(|_| format!("annotation {name} `{s}` is not an address")))
            .transpose()
    };
    let public_ip = match ip(PUBLIC_IP)? {
        Some(IpAddr::V4(a)) => Some(a),
        Some(IpAddr::V6(_)) => return Err("annotation public-ip holds an IPv6 address".into()),
        None => None,
    };
    let public_ipv6 = match ip(PUBLIC_IPV6)? {
        Some(IpAddr::V6(a)) => Some(a),
        Some(IpAddr::V4(_)) => return Err("annotation public-ipv6 holds an IPv4 address".into()),
        None => None,
    };
    if public_ip.is_none() && public_ipv6.is_none() {
        return Err("no public-ip or public-ipv6 annotation".into());
    }
    Ok(Some((
        key,
        Lease {
            public_ip,
            public_ipv6,
            backend_type,
            backend_data: json(BACKEND_DATA)?.unwrap_or(Value::Null),
            backend_v6_data: json(BACKEND_V6_DATA)?,
        },
    )))
}

/// The annotations that announce `lease` (Flannel writes the backend data
/// as JSON text, `null` when the backend has none).
pub fn lease_annotations(lease: &Lease) -> BTreeMap<String, String> {
    let mut a = BTreeMap::new();
    a.insert(annotation(KUBE_MANAGED), "true".to_string());
    a.insert(annotation(BACKEND_TYPE), lease.backend_type.clone());
    a.insert(annotation(BACKEND_DATA), lease.backend_data.to_string());
    if let Some(ip) = lease.public_ip {
        a.insert(annotation(PUBLIC_IP), ip.to_string());
    }
    if let Some(ip) = lease.public_ipv6 {
        a.insert(annotation(PUBLIC_IPV6), ip.to_string());
    }
    if let Some(d) = &lease.backend_v6_data {
        a.insert(annotation(BACKEND_V6_DATA), d.to_string());
    }
    a
}

/// The strategic-merge patch that makes `node` announce `lease`, or `None`
/// when its annotations already do.
pub fn annotation_patch(node: &Node, lease: &Lease) -> Option<Value> {
    let want = lease_annotations(lease);
    let have = annotations(node);
    let differ: BTreeMap<&String, &String> =
        want.iter().filter(|(k, v)| have.and_then(|h| h.get(*k)) != Some(*v)).collect();
    (!differ.is_empty()).then(|| json!({ "metadata": { "annotations": differ } }))
}

/// The addresses an operator set for this node with Flannel's annotations
/// (`public-ip-overwrite` over `node-public-ip`, per family).
pub fn public_ip_overrides(node: &Node) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), String> {
    let pick = |names: [&str; 2]| -> Result<Option<IpAddr>, String> {
        for name in names {
            if let Some(s) = get(node, name) {
                return s.trim().parse().map(Some).map_err(|_| format!("annotation {name} `{s}` is not an address"));
            }
        }
        Ok(None)
    };
    let v4 = match pick([PUBLIC_IP_OVERWRITE, NODE_PUBLIC_IP])? {
        Some(IpAddr::V4(a)) => Some(a),
        Some(IpAddr::V6(a)) => return Err(format!("annotation {PUBLIC_IP_OVERWRITE} holds the IPv6 address {a}")),
        None => None,
    };
    let v6 = match pick([PUBLIC_IPV6_OVERWRITE, NODE_PUBLIC_IPV6])? {
        Some(IpAddr::V6(a)) => Some(a),
        Some(IpAddr::V4(a)) => return Err(format!("annotation {PUBLIC_IPV6_OVERWRITE} holds the IPv4 address {a}")),
        None => None,
    };
    Ok((v4, v6))
}

/// The `node-location` a Node's label `label` gives: `None` without the
/// label, an error naming it when its value is no location.
pub fn location_from_label(node: &Node, label: &str) -> Result<Option<String>, String> {
    let Some(v) = node.metadata.labels.as_ref().and_then(|l| l.get(label)).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if !crate::config::valid_location(v) {
        return Err(format!(
            "the Node's label {label} is `{v}`, which is no location (1 to {} letters, digits, '-', '_' or '.')",
            crate::config::LOCATION_MAX
        ));
    }
    Ok(Some(v.clone()))
}

/// The status patch that sets `NetworkUnavailable` to `False`, as Flannel
/// does once its backend is up. `now` is RFC 3339.
pub fn network_available_patch(now: &str) -> Value {
    json!({ "status": { "conditions": [{
        "type": "NetworkUnavailable",
        "status": "False",
        "reason": "FlannelIsUp",
        "message": "Flannel is running on this node",
        "lastTransitionTime": now,
        "lastHeartbeatTime": now,
    }]}})
}

/// Whether `node`'s `NetworkUnavailable` condition is `False`.
pub fn network_available(node: &Node) -> bool {
    let conditions = node.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.into_iter().flatten().any(|c| c.type_ == "NetworkUnavailable" && c.status == "False")
}

/// The running subnet manager, between [`start`] and [`Keeper::keep`].
pub struct Keeper {
    rt: tokio::runtime::Runtime,
    api: Api<Node>,
    node_name: String,
    config: NetworkConfig,
    key: SubnetKey,
    lease: Lease,
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keeper").field("node", &self.node_name).field("subnet", &self.key).finish()
    }
}

/// Connects, waits until this Node has its pod CIDR, announces the lease
/// (with the operator's public-address annotations applied to `cfg`) and
/// lists the peers. `wg_public` is this node's WireGuard key, if any.
pub fn start(
    cfg: &mut AgentConfig,
    src: &KubeSource,
    wg_public: Option<[u8; 32]>,
) -> anyhow::Result<(Keeper, StaticDatastore)> {
    let config = match &src.net_config {
        Some(path) => read_net_config(path)?,
        None => crate::lease::network_config(cfg),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("weft-kube")
        .build()
        .context("starting the Kubernetes client runtime")?;
    let client = rt.block_on(client(src))?;
    let api: Api<Node> = Api::all(client);
    let name = cfg.node_name.clone();
    let node = rt.block_on(wait_for_pod_cidr(&api, &name, &config))?;
    if let Some(label) = &src.location_label {
        match location_from_label(&node, label) {
            Ok(Some(l)) => {
                tracing::info!(node = %name, location = %l, %label, "node-location from the Node's label");
                cfg.node_location = Some(l);
            }
            Ok(None) => tracing::warn!(node = %name, %label, "the Node has no such label: no node-location"),
            // The label is the cluster's data, and a location only saves a
            // detour: without one the node still reaches every peer.
            Err(e) => tracing::warn!(node = %name, "config key `node-location-label`: {e}; no node-location"),
        }
    }
    let (v4, v6) = public_ip_overrides(&node).map_err(|e| anyhow::anyhow!("node {name}: {e}"))?;
    if v4.is_some() || v6.is_some() {
        let c = &cfg.cluster;
        if let (false, Some(why)) = (c.external_ip_unencrypted, crate::cluster::unencrypted_across_external(c.backend))
        {
            bail!(
                "node {name}: annotation {} (or {}) refused {why}",
                annotation(PUBLIC_IP_OVERWRITE),
                annotation(NODE_PUBLIC_IP)
            );
        }
    }
    for ip in v4.map(IpAddr::V4).into_iter().chain(v6.map(IpAddr::V6)) {
        tracing::info!(node = %name, %ip, "announcing the public address from the node's annotations");
        cfg.cluster.node_external_ips.retain(|a| a.is_ipv6() != ip.is_ipv6());
        cfg.cluster.node_external_ips.push(ip);
        cfg.cluster.flannel_external_ip = true;
    }
    let key = pod_subnets(&node, &config)
        .map_err(|e| anyhow::anyhow!("node {name}: {e}"))?
        .context("the pod CIDR went away while starting")?;
    let lease = crate::lease::our_lease(cfg, &config, wg_public)?;
    let keeper = Keeper { rt, api, node_name: name, config, key, lease };
    keeper.rt.block_on(keeper.announce(&node)).context("writing this node's annotations")?;
    let nodes = keeper.rt.block_on(keeper.api.list(&Default::default())).context("listing the Nodes")?;
    let view = keeper.view(nodes.items.iter());
    tracing::info!(node = %keeper.node_name, subnet = %keeper.key, peers = view.leases.len() - 1, "subnet from the Node's pod CIDR");
    Ok((keeper, view))
}

impl Keeper {
    /// Watches the Nodes and sends a whole new view after every change until
    /// `stop` is set; once `up` is set, marks the Node's network available
    /// (again after the API server comes back, if it was away).
    pub fn keep(self, tx: Sender<Update>, up: Arc<AtomicBool>, stop: Arc<AtomicBool>) {
        let rt = &self.rt;
        rt.block_on(async {
            let cfg = watcher::Config::default().timeout(60);
            let mut events = std::pin::pin!(watcher(self.api.clone(), cfg));
            let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
            let mut listing: Option<BTreeMap<String, Node>> = None;
            let mut last = None;
            let mut available = false;
            let mut backoff = Duration::from_millis(100);
            let mut retry_at = Instant::now();
            while !stop.load(Relaxed) {
                if up.load(Relaxed) && !available && Instant::now() >= retry_at {
                    match self.mark_available().await {
                        Ok(()) => available = true,
                        Err(e) => {
                            tracing::debug!(error = %e, "marking the network available; retrying");
                            retry_at = Instant::now() + MAX_BACKOFF;
                        }
                    }
                }
                let ev = match tokio::time::timeout(Duration::from_millis(500), events.next()).await {
                    Err(_) => continue,
                    Ok(None) => return,
                    Ok(Some(ev)) => ev,
                };
                let mut own = None;
                match ev {
                    Ok(watcher::Event::Init) => listing = Some(BTreeMap::new()),
                    Ok(watcher::Event::InitApply(n)) => {
                        if let Some(l) = listing.as_mut() {
                            l.insert(node_name(&n), n);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        nodes = listing.take().unwrap_or_default();
                        own = nodes.get(&self.node_name).cloned();
                        tracing::info!(nodes = nodes.len(), "Nodes listed");
                    }
                    Ok(watcher::Event::Apply(n)) => {
                        if node_name(&n) == self.node_name {
                            own = Some(n.clone());
                        }
                        nodes.insert(node_name(&n), n);
                    }
                    Ok(watcher::Event::Delete(n)) => {
                        nodes.remove(&node_name(&n));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "watching Nodes; forwarding with the last view");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
                backoff = Duration::from_millis(100);
                if let Some(own) = own {
                    // Someone removed our annotations, or the Node was made anew.
                    if annotation_patch(&own, &self.lease).is_some() {
                        if let Err(e) = self.announce(&own).await {
                            tracing::warn!(error = %e, "writing this node's annotations back");
                        }
                    }
                    available &= network_available(&own);
                }
                if listing.is_some() {
                    continue;
                }
                let view = self.view(nodes.values());
                if last.as_ref() != Some(&view) {
                    if tx.send(Update::View(view.clone())).is_err() {
                        return;
                    }
                    last = Some(view);
                }
            }
        });
    }

    /// The view: every peer Node's lease, and ours.
    fn view<'a>(&self, nodes: impl Iterator<Item = &'a Node>) -> StaticDatastore {
        let mut leases = BTreeMap::new();
        for n in nodes {
            let name = node_name(n);
            if name == self.node_name {
                continue;
            }
            match node_lease(n, &self.config) {
                Ok(Some((k, l))) if k != self.key => {
                    leases.insert(k, l);
                }
                Ok(Some(_)) => {
                    tracing::warn!(node = %name, subnet = %self.key, "Node claims this node's subnet; ignored")
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(node = %name, error = %e, "Node is not a peer"),
            }
        }
        leases.insert(self.key, self.lease.clone());
        StaticDatastore { config: self.config.clone(), leases }
    }

    async fn announce(&self, node: &Node) -> anyhow::Result<()> {
        let Some(patch) = annotation_patch(node, &self.lease) else { return Ok(()) };
        let pp = PatchParams::default();
        api_call(self.api.patch_status(&self.node_name, &pp, &Patch::Strategic(patch))).await?;
        tracing::info!(node = %self.node_name, "annotations written");
        Ok(())
    }

    async fn mark_available(&self) -> anyhow::Result<()> {
        let now = k8s_openapi::jiff::Timestamp::now()
            .round(k8s_openapi::jiff::Unit::Second)
            .map(|t| t.to_string())
            .unwrap_or_default();
        let patch = network_available_patch(&now);
        api_call(self.api.patch_status(&self.node_name, &PatchParams::default(), &Patch::Strategic(patch))).await?;
        tracing::info!(node = %self.node_name, "NetworkUnavailable=False");
        Ok(())
    }
}

fn node_name(n: &Node) -> String {
    n.metadata.name.clone().unwrap_or_default()
}

fn read_net_config(path: &Path) -> anyhow::Result<NetworkConfig> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("config key `net-config-path`: value `{}` refused: cannot read it", path.display()))?;
    NetworkConfig::parse(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "config key `net-config-path`: value `{}` refused: {e} (Flannel's net-conf.json)",
            path.display()
        )
    })
}

async fn client(src: &KubeSource) -> anyhow::Result<kube::Client> {
    let mut config = match &src.kubeconfig {
        Some(path) => {
            let refused = |e: &dyn std::fmt::Display| {
                anyhow::anyhow!("config key `kubeconfig`: value `{}` refused: {e}", path.display())
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| refused(&e))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| refused(&e))?
        }
        None => kube::Config::incluster().map_err(|e| {
            anyhow::anyhow!(
                "config key `kubeconfig` is not set and this is not a pod with a service account \
                 (KUBERNETES_SERVICE_HOST, /var/run/secrets/kubernetes.io/serviceaccount): {e}"
            )
        })?,
    };
    config.connect_timeout = Some(API_TIMEOUT);
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// One API call with [`API_TIMEOUT`].
async fn api_call<T>(call: impl std::future::Future<Output = kube::Result<T>>) -> anyhow::Result<T> {
    match tokio::time::timeout(API_TIMEOUT, call).await {
        Ok(r) => Ok(r?),
        Err(_) => bail!("the API server did not answer within {API_TIMEOUT:?}"),
    }
}

/// Whether an API error will not go away by waiting (bad credentials,
/// no permission).
fn is_refusal(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<kube::Error>(), Some(kube::Error::Api(s)) if s.code == 401 || s.code == 403)
}

/// Waits until the Node exists and has its pod CIDR(s), logging why it
/// waits; fails at once on bad credentials or a pod CIDR outside the network.
async fn wait_for_pod_cidr(api: &Api<Node>, name: &str, net: &NetworkConfig) -> anyhow::Result<Node> {
    let mut logged: Option<Instant> = None;
    loop {
        let why = match api_call(api.get_opt(name)).await {
            Ok(Some(node)) => match pod_subnets(&node, net) {
                Ok(Some(_)) => return Ok(node),
                Ok(None) => format!(
                    "node {name} has no pod CIDR of every family of the network yet (spec.podCIDRs): \
                     waiting for the controller manager to assign one (--allocate-node-cidrs)"
                ),
                Err(e) => bail!("node {name}: {e}"),
            },
            Ok(None) => format!("node {name} is not registered yet (config key `node-name` or NODE_NAME)"),
            Err(e) if is_refusal(&e) => return Err(e.context("the API server refused the agent's credentials")),
            Err(e) => format!("the API server is unreachable: {e:#}"),
        };
        if logged.is_none_or(|t| t.elapsed() >= WAIT_LOG_EVERY) {
            tracing::error!("{why}");
            logged = Some(Instant::now());
        }
        tokio::time::sleep(WAIT_STEP).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> NetworkConfig {
        NetworkConfig::for_cluster(Some(("10.42.0.0/16".parse().unwrap(), 24)), None, "vxlan")
    }

    fn dual() -> NetworkConfig {
        NetworkConfig::for_cluster(
            Some(("10.42.0.0/16".parse().unwrap(), 24)),
            Some(("2001:cafe:42::/56".parse().unwrap(), 64)),
            "vxlan",
        )
    }

    fn node(v: Value) -> Node {
        serde_json::from_value(v).unwrap()
    }

    /// A Node annotated by kernel flanneld (values as flanneld writes them).
    fn flannel_node() -> Node {
        node(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "k3", "annotations": {
                "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"62:1a:2b:3c:4d:5e\"}",
                "flannel.alpha.coreos.com/backend-type": "vxlan",
                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                "flannel.alpha.coreos.com/public-ip": "192.168.77.3",
                "node.alpha.kubernetes.io/ttl": "0"}},
            "spec": {"podCIDR": "10.42.3.0/24", "podCIDRs": ["10.42.3.0/24"]}
        }))
    }

    #[test]
    fn node_location_comes_from_the_label_named_if_it_holds_one() {
        let labelled = |v: &str| {
            node(json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "n", "labels": {"topology.kubernetes.io/region": v}}}))
        };
        let label = "topology.kubernetes.io/region";
        assert_eq!(location_from_label(&labelled("eu-west-1"), label), Ok(Some("eu-west-1".into())));
        assert_eq!(location_from_label(&labelled("eu-west-1"), "other"), Ok(None));
        assert_eq!(location_from_label(&flannel_node(), label), Ok(None), "a Node without labels");
        let e = location_from_label(&labelled("-x"), label).unwrap_err();
        assert!(e.contains(label) && e.contains("`-x`"), "{e}");
    }

    #[test]
    fn a_kernel_flannel_node_is_a_peer_lease() {
        let (key, lease) = node_lease(&flannel_node(), &net()).unwrap().unwrap();
        assert_eq!(key.to_string(), "10.42.3.0-24");
        assert_eq!(lease.public_ip, Some("192.168.77.3".parse().unwrap()));
        assert_eq!(lease.backend_type, "vxlan");
        let d = lease.vxlan_data(false).unwrap();
        assert_eq!((d.vni, d.vtep_mac), (1, [0x62, 0x1a, 0x2b, 0x3c, 0x4d, 0x5e]));
    }

    #[test]
    fn nodes_without_the_manager_annotation_or_a_pod_cidr_are_not_peers() {
        let mut n = flannel_node();
        n.metadata.annotations.as_mut().unwrap().remove(&annotation(KUBE_MANAGED));
        assert_eq!(node_lease(&n, &net()), Ok(None));
        let mut n = flannel_node();
        n.spec = None;
        assert_eq!(node_lease(&n, &net()), Ok(None));
        // Dual-stack network, IPv4 pod CIDR only: not complete yet.
        assert_eq!(pod_subnets(&flannel_node(), &dual()), Ok(None));
    }

    #[test]
    fn bad_annotations_are_refused_with_the_reason() {
        for (name, value) in [(BACKEND_DATA, "{not json"), (PUBLIC_IP, "300.1.1.1"), (PUBLIC_IP, "fd00::1")] {
            let mut n = flannel_node();
            n.metadata.annotations.as_mut().unwrap().insert(annotation(name), value.into());
            let e = node_lease(&n, &net()).expect_err(value);
            assert!(e.contains(name), "{e}");
        }
        let mut n = flannel_node();
        n.spec.as_mut().unwrap().pod_cidrs = Some(vec!["10.99.0.0/24".into()]);
        assert!(node_lease(&n, &net()).unwrap_err().contains("outside"));
    }

    #[test]
    fn dual_stack_pod_cidrs_make_one_key() {
        let n = node(json!({"metadata": {"name": "a"}, "spec": {"podCIDR": "10.42.1.0/24",
            "podCIDRs": ["10.42.1.0/24", "2001:cafe:42:1::/64"]}}));
        assert_eq!(pod_subnets(&n, &dual()).unwrap().unwrap().to_string(), "10.42.1.0-24&2001:cafe:42:1::-64");
        // The old single field alone still counts (clusters before dual-stack).
        let n = node(json!({"metadata": {"name": "a"}, "spec": {"podCIDR": "10.42.1.0/24"}}));
        assert_eq!(pod_subnets(&n, &net()).unwrap().unwrap().to_string(), "10.42.1.0-24");
    }

    #[test]
    fn our_annotations_round_trip_and_patch_only_what_differs() {
        let (_, lease) = node_lease(&flannel_node(), &net()).unwrap().unwrap();
        assert_eq!(annotation_patch(&flannel_node(), &lease), None, "already announced");
        let bare = node(json!({"metadata": {"name": "k3"}, "spec": {"podCIDR": "10.42.3.0/24"}}));
        let patch = annotation_patch(&bare, &lease).unwrap();
        let written: BTreeMap<String, String> =
            serde_json::from_value(patch["metadata"]["annotations"].clone()).unwrap();
        assert_eq!(written.len(), 4, "{written:?}");
        let mut annotated = bare.clone();
        annotated.metadata.annotations = Some(written);
        assert_eq!(node_lease(&annotated, &net()).unwrap().unwrap().1, lease);
        // One changed value: only it is patched.
        let mut moved = lease.clone();
        moved.public_ip = Some("192.168.77.9".parse().unwrap());
        let patch = annotation_patch(&flannel_node(), &moved).unwrap();
        assert_eq!(patch, json!({"metadata": {"annotations": {annotation(PUBLIC_IP): "192.168.77.9"}}}));
    }

    #[test]
    fn operator_overrides_win_in_flannel_order() {
        let mut n = flannel_node();
        let a = n.metadata.annotations.as_mut().unwrap();
        a.insert(annotation(NODE_PUBLIC_IP), "203.0.113.1".into());
        assert_eq!(public_ip_overrides(&n).unwrap(), (Some("203.0.113.1".parse().unwrap()), None));
        let a = n.metadata.annotations.as_mut().unwrap();
        a.insert(annotation(PUBLIC_IP_OVERWRITE), "203.0.113.2".into());
        a.insert(annotation(PUBLIC_IPV6_OVERWRITE), "2001:db8::2".into());
        assert_eq!(
            public_ip_overrides(&n).unwrap(),
            (Some("203.0.113.2".parse().unwrap()), Some("2001:db8::2".parse().unwrap()))
        );
        n.metadata.annotations.as_mut().unwrap().insert(annotation(PUBLIC_IP_OVERWRITE), "2001:db8::3".into());
        assert!(public_ip_overrides(&n).unwrap_err().contains(PUBLIC_IP_OVERWRITE));
    }

    #[test]
    fn the_condition_patch_says_flannel_is_up() {
        let p = network_available_patch("2026-12-01T00:00:00Z");
        let mut n = flannel_node();
        assert!(!network_available(&n));
        n.status = Some(serde_json::from_value(p["status"].clone()).unwrap());
        assert!(network_available(&n));
        assert_eq!(p["status"]["conditions"][0]["reason"], "FlannelIsUp");
    }
}
