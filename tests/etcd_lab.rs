//! The etcd datastore end to end (root): labs whose agents take, keep, renew
//! and watch their subnet leases in a real etcd server the lab runs.

mod common;

use std::time::{Duration, Instant};

use common::{assert_all_passed, options, up};
use weft::datastore::SubnetKey;
use weft::lab::{self, Lab, Node};
use weft::netns;

fn etcd_lab(tag: &str, nodes: usize) -> (Lab, common::Guard) {
    let mut o = options(tag);
    o.datastore = "etcd".into();
    o.nodes = nodes;
    o.transfer_mib = 8;
    up(&o)
}

fn subnet_of(lab: &Lab, n: &Node) -> SubnetKey {
    let env = std::fs::read_to_string(lab.dir.join(format!("n{}-subnet.env", n.index))).unwrap();
    weft::lease::previous_subnet(&env).expect("subnet.env names a subnet")
}

fn route_exists(ns: &str, prefix: &str) -> bool {
    !netns::run("ip", &["-n", ns, "route", "show", prefix]).unwrap().trim().is_empty()
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn five_agents_started_together_take_five_distinct_subnets() {
    let (lab, _g) = etcd_lab("f", 5);
    let keys: std::collections::BTreeSet<SubnetKey> = lab.nodes.iter().map(|n| subnet_of(&lab, n)).collect();
    assert_eq!(keys.len(), 5, "{keys:?}");
    let leases = lab.with_etcd(|s| Ok(s.leases()?.leases)).unwrap();
    assert_eq!(leases.keys().copied().collect::<std::collections::BTreeSet<_>>(), keys, "etcd holds exactly those");
    for (k, l) in &leases {
        assert_eq!(l.backend_type, "vxlan");
        assert!(l.vxlan_data(false).is_ok(), "{k}: Flannel's BackendData");
    }
    assert_all_passed(&lab, &lab.check());
}

#[test]
fn restarted_agent_keeps_its_subnet_and_traffic_resumes() {
    let (lab, _g) = etcd_lab("k", 2);
    let n2 = &lab.nodes[1];
    let before = subnet_of(&lab, n2);
    lab.kill_agent(n2).unwrap();
    lab.restart_agent(n2).unwrap();
    assert_eq!(subnet_of(&lab, n2), before, "the lease with its address is reclaimed");
    let (a, b) = (&lab.nodes[0].pods[0], &n2.pods[0]);
    let t = lab::transfer_check(a, b, false, 8 << 20);
    assert!(t.passed, "{}", t.detail);
}

#[test]
fn node_removed_from_etcd_leaves_the_others_routes() {
    let (lab, _g) = etcd_lab("r", 3);
    let (n1, n3) = (&lab.nodes[0], &lab.nodes[2]);
    let gone = subnet_of(&lab, n3);
    let prefix = gone.v4.unwrap().to_string();
    assert!(route_exists(&n1.ns, &prefix));
    lab.kill_agent(n3).unwrap();
    lab.with_etcd(move |s| Ok(s.delete_lease(&gone)?)).unwrap();
    wait_for("the route to the removed node goes", Duration::from_secs(10), || !route_exists(&n1.ns, &prefix));
    assert!(route_exists(&n1.ns, &subnet_of(&lab, &lab.nodes[1]).v4.unwrap().to_string()), "others stay");
}

#[test]
fn etcd_outage_loses_no_data_and_the_cluster_catches_up() {
    let (lab, _g) = etcd_lab("o", 2);
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let outage = Instant::now();
    lab.stop_etcd().unwrap();
    // Forwarding goes on with what the agents knew.
    let (a, b) = (n1.pods[0].clone(), n2.pods[0].clone());
    let transfer = std::thread::spawn(move || lab::transfer_check(&a, &b, false, 32 << 20));
    let t = transfer.join().unwrap();
    assert!(t.passed, "transfer during the outage: {}", t.detail);
    assert!(lab.http_get(n1, "/healthz").unwrap().starts_with("HTTP/1.0 200"));
    std::thread::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed()));
    lab.start_etcd().unwrap();
    // A node that joins after the outage reaches everyone without a restart.
    let late = SubnetKey::parse("10.244.200.0-24").unwrap();
    let json = r#"{"PublicIP":"192.168.77.200","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0a:58:0a:f4:c8:00"}}"#;
    lab.with_etcd(move |s| Ok(s.put_lease_raw(&late.to_string(), json)?)).unwrap();
    wait_for("the agents learn the new node", Duration::from_secs(30), || {
        route_exists(&n1.ns, "10.244.200.0/24") && route_exists(&n2.ns, "10.244.200.0/24")
    });
    // And their own leases are still in etcd.
    let keys = lab.with_etcd(|s| Ok(s.leases()?.leases.into_keys().collect::<Vec<_>>())).unwrap();
    assert!(keys.contains(&subnet_of(&lab, n1)) && keys.contains(&subnet_of(&lab, n2)), "{keys:?}");
}

#[test]
fn kernel_flannel_lease_written_by_hand_is_reached_by_weft_pods() {
    let mut o = options("h");
    o.datastore = "etcd".into();
    o.kernel_peer = true;
    o.transfer_mib = 8;
    let (lab, _g) = up(&o);
    let kernel = lab.nodes.last().unwrap();
    assert_eq!(kernel.kind, lab::NodeKind::KernelVxlan);
    assert_eq!(subnet_of(&lab, kernel).to_string(), "10.244.3.0-24", "the lease written in Flannel's format");
    assert_all_passed(&lab, &lab.check());
}
