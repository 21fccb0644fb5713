//! The multi-cloud mesh as K3s documents it (root): nodes in separate
//! private networks behind NAT gateways, joined over their external
//! addresses with wireguard-native; a node at home behind a masquerading
//! router; one cloud with a smaller MTU; and the refusal of VXLAN across
//! the internet.

mod common;

use std::process::Command;

use common::{assert_all_passed, options, up, weft_bin};
use weft_lab::{Multicloud, Site};

fn multicloud(tag: &str, clouds: usize, nat_node: bool, mtus: Vec<u32>) -> weft_lab::LabOptions {
    let mut o = options(tag);
    o.backend = "wireguard-native".into();
    o.nodes = clouds + 1 + nat_node as usize;
    o.multicloud = Some(Multicloud { clouds, nat_node, mtus, locations: true });
    o
}

#[test]
fn two_clouds_and_a_home_node_carry_pod_traffic_over_their_external_addresses() {
    // With etcd on the internet: the agents write their own leases, with
    // their external address and their location, and take their subnets.
    let mut o = multicloud("mc", 2, true, vec![]);
    o.datastore = "etcd".into();
    let (lab, _g) = up(&o);
    let sites: Vec<Site> = lab.nodes.iter().map(|n| n.site).collect();
    assert_eq!(sites, [Site::Cloud(1), Site::Cloud(2), Site::Cloud(1), Site::Home]);
    let checks = lab.check();
    let named = |prefix: &str| checks.iter().filter(|c| c.name.starts_with(prefix)).count();
    assert_eq!(named("ping 10.244."), 12, "every ordered pair of pods, the home one included");
    assert_eq!(named("internet carries only WireGuard"), 1);
    assert!(checks.iter().any(|c| c.name.contains("(one cloud) talk past their gateway")), "same-cloud check ran");
    assert!(checks.iter().any(|c| c.name.contains("across a change of the home NAT's address")), "NAT move ran");
    assert_all_passed(&lab, &checks);
    // What the agents announced: the cloud nodes their external address and
    // their location with their node-ip, the home node its own address.
    let leases = lab.with_etcd(|store| Ok(store.leases()?.leases)).unwrap();
    for n in &lab.nodes {
        let lease = &leases[&n.key];
        let path = lease.private_path(false);
        match n.site {
            Site::Cloud(k) => {
                assert_eq!(lease.public_ip, n.external4, "{}", n.ns);
                let p = path.unwrap_or_else(|| panic!("{} announced no private path", n.ns));
                assert_eq!((p.location, p.address), (format!("cloud{k}"), n.ip4.unwrap().into()));
            }
            _ => assert_eq!((lease.public_ip, path), (n.ip4, None), "{}", n.ns),
        }
    }
}

#[test]
fn three_clouds_one_with_an_underlay_mtu_of_1460() {
    let (lab, _g) = up(&multicloud("mtu", 3, false, vec![1500, 1500, 1460]));
    let checks = lab.check();
    // Transfers to and from the small cloud, and full-size pings into it.
    let small = &lab.nodes.iter().find(|n| n.site == Site::Cloud(3)).unwrap().pods[0];
    let small_ip = small.ip(false).unwrap().to_string();
    assert!(checks.iter().any(|c| c.name.starts_with("tcp") && c.name.ends_with(&format!("-> {small_ip}"))));
    assert!(checks.iter().any(|c| c.name.starts_with("tcp") && c.name.contains(&format!("MiB {small_ip} ->"))));
    assert!(checks.iter().any(|c| c.name.starts_with("ping of 1420 bytes 10.244.1.2") && c.name.ends_with(&small_ip)));
    assert_eq!(checks.iter().filter(|c| c.name.starts_with("no ICMP fragmentation-needed")).count(), 3);
    assert_all_passed(&lab, &checks);
}

/// `weft agent` with the cluster keys of a node whose tunnel traffic
/// would go to external addresses with `backend`; returns its exit status
/// and what it printed.
fn agent_with_external_ip(backend: &str, extra: &[&str]) -> (std::process::ExitStatus, String) {
    let out = Command::new(weft_bin())
        .args(["agent", "--node-ip", "172.16.0.11", "--node-external-ip", "198.51.100.101"])
        .args(["--flannel-external-ip", "true", "--flannel-backend", backend])
        .args(["--datastore-file", "/nonexistent/weft-multicloud-test.json", "--metrics-addr", ""])
        .args(extra)
        .output()
        .unwrap();
    (out.status, format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn vxlan_across_external_addresses_is_refused_with_the_advice_unless_allowed() {
    for backend in ["vxlan", "host-gw"] {
        let (status, text) = agent_with_external_ip(backend, &[]);
        assert!(!status.success(), "{backend} accepted: {text}");
        assert!(
            text.contains("flannel-external-ip") && text.contains("use flannel-backend wireguard-native"),
            "{text}"
        );
        // With the explicit key the configuration is taken: the agent goes
        // on to its datastore (which does not exist here) and stops there.
        let (status, text) = agent_with_external_ip(backend, &["--flannel-external-ip-unencrypted", "true"]);
        assert!(!status.success());
        assert!(!text.contains("use flannel-backend wireguard-native"), "still refused: {text}");
        assert!(text.contains("weft-multicloud-test.json"), "did not reach the datastore: {text}");
    }
}
