//! Masquerade (root, network namespaces): pods reach a server outside the
//! cluster as their node, pods on other nodes keep their true source, weft's
//! nftables table is replaced (never added to) on restart and removed on
//! SIGTERM, IPv6 with `flannel-ipv6-masq`, and `ip-masq: false`.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{assert_all_passed, options, up};
use weft_control::masq::{self, MasqNet};
use weft_lab::netns;
use weft_lab::{self as lab, Lab, Node};

/// The rules in weft's table in namespace `ns`; `None` when there is no table.
fn weft_rules(ns: &str) -> Option<usize> {
    let out = netns::exec(ns, "nft", &["-j", "list", "table", "inet", masq::TABLE]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).expect("nft -j prints JSON");
    let objects = v["nftables"].as_array().expect("a list of objects");
    Some(objects.iter().filter(|o| o.get("rule").is_some()).count())
}

/// Sends SIGTERM to a node's agent and waits (5 s at most) for it to exit.
fn stop_agent(lab: &Lab, n: &Node) {
    let pid: i32 = std::fs::read_to_string(lab.dir.join(format!("n{}.pid", n.index))).unwrap().trim().parse().unwrap();
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while nix::sys::signal::kill(pid, None).is_ok() && Instant::now() < deadline {
        let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(nix::sys::signal::kill(pid, None).is_err(), "the agent of {} exited on SIGTERM", n.ns);
}

fn subnet_env(lab: &Lab, n: &Node) -> String {
    std::fs::read_to_string(lab.dir.join(format!("n{}-subnet.env", n.index))).unwrap()
}

/// Removes a namespace when dropped, also when the test panics.
struct NsGuard(String);

impl Drop for NsGuard {
    fn drop(&mut self) {
        let _ = netns::ip(&["netns", "del", &self.0]);
    }
}

#[test]
fn applying_again_replaces_the_table_and_remove_deletes_it() {
    common::require_root();
    let ns = common::unique_name("nft");
    netns::ip(&["netns", "add", &ns]).unwrap();
    let _g = NsGuard(ns.clone());
    let v4 = MasqNet { cluster: "10.42.0.0/16".parse().unwrap(), subnet: "10.42.1.0/24".parse().unwrap() };
    let v6 = MasqNet { cluster: "2001:cafe:42::/56".parse().unwrap(), subnet: "2001:cafe:42:1::/64".parse().unwrap() };
    let both = masq::plan(&[v4, v6]);
    let apply = |rules: Vec<masq::MasqRule>| netns::in_netns(&ns, move || masq::apply(&rules)).unwrap().unwrap();
    assert_eq!(weft_rules(&ns), None);
    apply(both.clone());
    assert_eq!(weft_rules(&ns), Some(both.len()));
    apply(both.clone());
    assert_eq!(weft_rules(&ns), Some(both.len()), "a second apply replaces, never appends");
    let only_v4 = masq::plan(&[v4]);
    apply(only_v4.clone());
    assert_eq!(weft_rules(&ns), Some(only_v4.len()), "a smaller plan leaves no old rule behind");
    let listed = netns::exec(&ns, "nft", &["list", "table", "inet", masq::TABLE]).unwrap();
    assert!(listed.contains("masquerade fully-random"), "{listed}");
    assert!(listed.contains("ip daddr != 224.0.0.0/4"), "{listed}");
    assert!(!listed.contains("2001:cafe"), "{listed}");
    netns::in_netns(&ns, masq::remove).unwrap().unwrap();
    assert_eq!(weft_rules(&ns), None, "removed");
    netns::in_netns(&ns, masq::remove).unwrap().expect("removing a missing table is no error");
}

#[test]
fn pods_leave_as_their_node_and_restarts_replace_the_table() {
    let mut o = options("m");
    o.nodes = 2;
    o.transfer_mib = 4;
    let (lab, _g) = up(&o);
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let inet = IpAddr::V4(lab::INTERNET_V4);
    // A pod reaches the server outside the cluster; the server sees the node.
    for n in [n1, n2] {
        let seen = lab::source_seen(&n.pods[0].ns, &lab::internet_ns(&lab), inet).unwrap();
        assert_eq!(Some(seen), n.ip4.map(IpAddr::V4), "masqueraded to {}'s underlay address", n.ns);
    }
    // A pod on another node sees the true pod source, both ways.
    let (p1, p2) = (&n1.pods[0], &n2.pods[0]);
    assert_eq!(lab::source_seen(&p2.ns, &p1.ns, p1.ips[0]).unwrap(), p2.ips[0]);
    assert_eq!(lab::source_seen(&p1.ns, &p2.ns, p2.ips[0]).unwrap(), p1.ips[0]);
    // The lab's own table has the rows, and they pass.
    let checks = lab.check();
    assert_eq!(checks.iter().filter(|c| c.name.starts_with("masquerade ")).count(), 2, "{}", lab::table(&checks));
    assert_eq!(checks.iter().filter(|c| c.name.starts_with("true source ")).count(), 1);
    assert_all_passed(&lab, &checks);
    assert!(subnet_env(&lab, n1).contains("FLANNEL_IPMASQ=true\n"), "{}", subnet_env(&lab, n1));

    let rules = weft_rules(&n1.ns).expect("weft's table is installed");
    assert_eq!(rules, 6, "Flannel's six IPv4 rules");
    // SIGTERM removes the table; a restart installs the same rules once.
    stop_agent(&lab, n1);
    assert_eq!(weft_rules(&n1.ns), None, "SIGTERM removes the table");
    lab.restart_agent(n1).unwrap();
    assert_eq!(weft_rules(&n1.ns), Some(rules), "a restart does not duplicate rules");
    // kill -9 leaves the table behind; the next start replaces it.
    lab.kill_agent(n1).unwrap();
    assert_eq!(weft_rules(&n1.ns), Some(rules), "kill -9 leaves the stale table");
    lab.restart_agent(n1).unwrap();
    assert_eq!(weft_rules(&n1.ns), Some(rules), "the stale table is replaced, not added to");
    let seen = lab::source_seen(&p1.ns, &lab::internet_ns(&lab), inet).unwrap();
    assert_eq!(Some(seen), n1.ip4.map(IpAddr::V4), "still masqueraded after the restarts");
    assert_eq!(lab::source_seen(&p2.ns, &p1.ns, p1.ips[0]).unwrap(), p2.ips[0]);
}

#[test]
fn dual_stack_lab_masquerades_ipv6_with_flannel_ipv6_masq() {
    let mut o = options("m6");
    o.nodes = 2;
    o.transfer_mib = 4;
    o.cluster_cidrs = vec!["10.42.0.0/16".parse().unwrap(), "2001:cafe:42::/56".parse().unwrap()];
    o.service_cidrs = vec!["10.43.0.0/16".parse().unwrap(), "2001:cafe:43::/112".parse().unwrap()];
    assert!(o.ipv6_masq, "the lab turns flannel-ipv6-masq on");
    let (lab, _g) = up(&o);
    let n1 = &lab.nodes[0];
    let seen = lab::source_seen(&n1.pods[0].ns, &lab::internet_ns(&lab), IpAddr::V6(lab::INTERNET_V6)).unwrap();
    assert_eq!(Some(seen), n1.ip6.map(IpAddr::V6), "IPv6 masqueraded to the node's underlay address");
    let checks = lab.check();
    let v6_rows: Vec<_> = checks.iter().filter(|c| c.name.starts_with("masquerade 2001:cafe:42:")).collect();
    assert_eq!(v6_rows.len(), 2, "{}", lab::table(&checks));
    assert!(checks.iter().any(|c| c.name.starts_with("true source 2001:cafe:42:")));
    assert_all_passed(&lab, &checks);
    assert_eq!(weft_rules(&n1.ns), Some(11), "the mark rule and five rules per family");
    let env = subnet_env(&lab, n1);
    assert!(env.contains("FLANNEL_IPMASQ=true\n"), "{env}");
}

#[test]
fn ip_masq_false_installs_no_table() {
    let mut o = options("m0");
    o.nodes = 2;
    o.transfer_mib = 4;
    o.ip_masq = false;
    let (lab, _g) = up(&o);
    let checks = lab.check();
    assert!(!checks.iter().any(|c| c.name.starts_with("masquerade ")), "{}", lab::table(&checks));
    assert!(checks.iter().any(|c| c.name.starts_with("true source ")));
    assert_all_passed(&lab, &checks);
    for n in &lab.nodes {
        assert_eq!(weft_rules(&n.ns), None, "no table on {}", n.ns);
        let env = subnet_env(&lab, n);
        assert!(env.ends_with("FLANNEL_IPMASQ=false\n"), "{env}");
    }
    // Without masquerading the server sees the pod itself, which it cannot
    // answer: it has no route back into the cluster.
    let p1 = &lab.nodes[0].pods[0];
    assert!(lab::source_seen(&p1.ns, &lab::internet_ns(&lab), IpAddr::V4(lab::INTERNET_V4)).is_err());
}
