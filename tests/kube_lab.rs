//! The Kubernetes subnet manager end to end (root): labs whose agents take
//! their subnets from their Node's pod CIDRs and find their peers in Node
//! annotations, in the API server stand-in the lab runs (no real
//! kube-apiserver can be installed on these machines; `weft_lab::apiserver`
//! speaks its HTTP contract for Nodes, and the agents' client is kube-rs).

mod common;

use std::time::{Duration, Instant};

use common::{assert_all_passed, options, route_exists, up, wait_for};
use serde_json::json;
use weft_lab::{self as lab, Lab};

fn kube_lab(tag: &str, nodes: usize) -> (Lab, common::Guard) {
    let mut o = options(tag);
    o.datastore = "kube".into();
    o.nodes = nodes;
    o.transfer_mib = 8;
    up(&o)
}

/// A Node a kernel flanneld runs on, with its pod CIDR and annotations.
fn flannel_node(name: &str, cidr: &str, ip: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {
            "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"0a:58:0a:f4:c8:00\"}",
            "flannel.alpha.coreos.com/backend-type": "vxlan",
            "flannel.alpha.coreos.com/kube-subnet-manager": "true",
            "flannel.alpha.coreos.com/public-ip": ip}},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
    })
}

#[test]
fn three_nodes_of_the_kubernetes_subnet_manager_pass_the_usual_checks() {
    let (lab, _g) = kube_lab("k", 3);
    let kube = lab.kube.clone().expect("the lab runs the API server stand-in");
    for n in &lab.nodes {
        let available = |node: &serde_json::Value| {
            let c = node["status"]["conditions"].as_array().into_iter().flatten();
            c.into_iter().any(|c| c["type"] == "NetworkUnavailable" && c["status"] == "False")
        };
        wait_for("the agent marks its Node's network available", Duration::from_secs(10), || {
            available(&kube.api.node(&n.ns).unwrap())
        });
        let node = kube.api.node(&n.ns).unwrap();
        let a = &node["metadata"]["annotations"];
        assert_eq!(a["flannel.alpha.coreos.com/kube-subnet-manager"], "true", "{node}");
        assert_eq!(a["flannel.alpha.coreos.com/public-ip"], n.ip4.unwrap().to_string());
        let cond = node["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "NetworkUnavailable");
        assert_eq!(cond.map(|c| (&c["status"], &c["reason"])), Some((&json!("False"), &json!("FlannelIsUp"))));
        let env = std::fs::read_to_string(lab.dir.join(format!("n{}-subnet.env", n.index))).unwrap();
        let cidr = node["spec"]["podCIDR"].as_str().unwrap();
        assert_eq!(weft_control::lease::previous_subnet(&env).unwrap().to_string(), cidr.replace('/', "-"));
    }
    assert_all_passed(&lab, &lab.check());
}

#[test]
fn a_kernel_flannel_node_whose_lease_is_only_annotations_is_reached_both_ways() {
    let mut o = options("h");
    o.datastore = "kube".into();
    o.kernel_peer = true;
    o.transfer_mib = 8;
    let (lab, _g) = up(&o);
    assert_eq!(lab.nodes.last().unwrap().kind, lab::NodeKind::KernelVxlan);
    // lab.check() pings every pair both ways and moves data both ways
    // between the first (weft) and the last (kernel Flannel) node.
    assert_all_passed(&lab, &lab.check());
}

#[test]
fn a_node_added_to_and_removed_from_the_api_enters_and_leaves_the_routes() {
    let (lab, _g) = kube_lab("r", 2);
    let kube = lab.kube.clone().unwrap();
    kube.api.create_node(flannel_node("late", "10.244.200.0/24", "192.168.77.200")).unwrap();
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    wait_for("both agents route to the new node", Duration::from_secs(15), || {
        route_exists(&n1.ns, "10.244.200.0/24") && route_exists(&n2.ns, "10.244.200.0/24")
    });
    kube.api.delete_node("late").unwrap();
    wait_for("the route to the removed node goes", Duration::from_secs(15), || {
        !route_exists(&n1.ns, "10.244.200.0/24") && !route_exists(&n2.ns, "10.244.200.0/24")
    });
    assert!(route_exists(&n1.ns, &lab.nodes[1].key.v4.unwrap().to_string()), "the other node stays");
}

#[test]
fn the_api_server_away_for_30_s_loses_no_data_and_the_cluster_catches_up() {
    let (lab, _g) = kube_lab("o", 2);
    let kube = lab.kube.clone().unwrap();
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let outage = Instant::now();
    kube.api.pause();
    let (a, b) = (n1.pods[0].clone(), n2.pods[0].clone());
    let t = std::thread::spawn(move || lab::transfer_check(&a, &b, false, 32 << 20)).join().unwrap();
    assert!(t.passed, "transfer while the API server is away: {}", t.detail);
    assert!(lab::http_ok(&lab.http_get(n1, "/healthz").unwrap()));
    std::thread::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed()));
    kube.api.resume().unwrap();
    // A node registered after the outage is reached without a restart.
    kube.api.create_node(flannel_node("late", "10.244.201.0/24", "192.168.77.201")).unwrap();
    wait_for("the agents learn the new node", Duration::from_secs(30), || {
        route_exists(&n1.ns, "10.244.201.0/24") && route_exists(&n2.ns, "10.244.201.0/24")
    });
    let (a, b) = (&n2.pods[0], &n1.pods[0]);
    let t = lab::transfer_check(a, b, false, 8 << 20);
    assert!(t.passed, "after the outage: {}", t.detail);
}
