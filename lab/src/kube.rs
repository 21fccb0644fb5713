//! The lab's Kubernetes side (`weft lab --datastore kube`): the API server
//! stand-in ([`crate::apiserver`]; no real kube-apiserver can be installed
//! on these machines) listens in the underlay namespace, and the lab does
//! what the rest of a cluster would: registers every node's Node object as
//! its kubelet would, assigns its pod CIDR(s) as the controller manager
//! does (`--allocate-node-cidrs`), and, for a kernel Flannel node, writes
//! the annotations flanneld writes. The agents find the API server through
//! a kubeconfig the lab writes.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use anyhow::Context;
use serde_json::{json, Value};

use weft_control::datastore::Lease;
use weft_control::subnet::SubnetKey;

use crate::apiserver::ApiServer;
use crate::namespaces::underlay_service_address;
use crate::plan::{Lab, Node};

/// The API server's port (kube-apiserver's secure port).
pub const API_PORT: u16 = 6443;

/// The running API server stand-in and how agents reach it.
pub struct KubeLab {
    /// The stand-in.
    pub api: ApiServer,
    /// The kubeconfig every agent is given.
    pub kubeconfig: PathBuf,
}

impl std::fmt::Debug for KubeLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeLab").field("kubeconfig", &self.kubeconfig).finish()
    }
}

/// The API server's address: the underlay bridge's own address.
pub fn api_addr(lab: &Lab) -> SocketAddr {
    let ip: IpAddr = if lab.opts.cluster_v4().is_some() {
        [192, 168, 77, 254].into()
    } else {
        "fd77::fe".parse().expect("a literal address")
    };
    SocketAddr::new(ip, API_PORT)
}

/// Starts the stand-in in the underlay namespace and registers every node,
/// with its pod CIDRs assigned.
pub(crate) fn start(lab: &Lab) -> anyhow::Result<KubeLab> {
    let ul = format!("{}-ul", lab.opts.name);
    underlay_service_address(lab)?;
    let token = format!("weft-lab-{}", lab.opts.name);
    let api = ApiServer::start(Some(&ul), api_addr(lab), &token).context("starting the API server stand-in")?;
    let kubeconfig = lab.dir.join("kubeconfig.yaml");
    std::fs::write(&kubeconfig, api.kubeconfig_yaml(&token))?;
    std::fs::set_permissions(&kubeconfig, std::fs::Permissions::from_mode(0o600))?;
    let kube = KubeLab { api, kubeconfig };
    for n in &lab.nodes {
        kube.register(n)?;
    }
    Ok(kube)
}

impl KubeLab {
    /// Registers `n`'s Node (kubelet) and assigns its pod CIDRs (controller
    /// manager).
    pub fn register(&self, n: &Node) -> anyhow::Result<()> {
        self.api.create_node(node_object(n)).with_context(|| format!("registering Node {}", n.ns))?;
        self.api.patch_node(&n.ns, pod_cidr_patch(&n.key), false).with_context(|| format!("assigning {}", n.key))?;
        Ok(())
    }

    /// Writes the annotations kernel flanneld writes for `lease` on Node
    /// `name` (through `nodes/status`, as flanneld does).
    pub fn annotate_as_flannel(&self, name: &str, lease: &Lease) -> anyhow::Result<()> {
        let annotations = weft_control::kube::lease_annotations(lease);
        self.api.patch_node(name, json!({ "metadata": { "annotations": annotations } }), true)?;
        Ok(())
    }

    /// The lease Node `name` announces in its annotations, read as the
    /// agents read it under the network config `net`.
    pub fn lease_of(&self, name: &str, net: &weft_control::datastore::NetworkConfig) -> anyhow::Result<Lease> {
        let v = self.api.node(name).with_context(|| format!("no Node {name}"))?;
        let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(v)?;
        match weft_control::kube::node_lease(&node, net).map_err(anyhow::Error::msg)? {
            Some((_, lease)) => Ok(lease),
            None => anyhow::bail!("Node {name} has no Flannel annotations yet"),
        }
    }
}

/// A Node object as a kubelet registers it (name, the hostname label, the
/// node's addresses), before the controller manager assigns its pod CIDRs.
pub fn node_object(n: &Node) -> Value {
    let addresses: Vec<Value> =
        n.ips().iter().map(|a| json!({ "type": "InternalIP", "address": a.to_string() })).collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": n.ns,
            "labels": {
                "kubernetes.io/hostname": n.ns,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH,
            },
        },
        "spec": {},
        "status": {
            "addresses": addresses,
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
            }],
        },
    })
}

/// The patch the controller manager makes: `spec.podCIDR` (the first) and
/// `spec.podCIDRs` (one per family, IPv4 first).
pub fn pod_cidr_patch(key: &SubnetKey) -> Value {
    let cidrs: Vec<String> = key.subnets().iter().map(|n| n.to_string()).collect();
    json!({ "spec": { "podCIDR": cidrs.first(), "podCIDRs": cidrs } })
}
