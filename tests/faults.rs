//! The fault matrix (issue 16), network-namespace labs (root): faults
//! injected into a running cluster, each followed by a TCP transfer between
//! pods whose SHA-256 must match at both ends once the cluster recovered.
//!
//! - a WireGuard node killed (SIGKILL) mid-transfer, its key file deleted,
//!   restarted with a new key: its peers follow the key from its lease;
//! - the underlay MTU lowered from 1500 to 1380 (every node's `eth0` and
//!   every port of the underlay bridge) mid-transfer, VXLAN and WireGuard:
//!   the TUN keeps its MTU, the kernel fragments the outer datagrams, weft
//!   drops nothing;
//! - the static datastore file truncated mid-write (half its JSON) and a
//!   reload signalled: the last good copy stays in force;
//! - etcd restarted on an empty data directory: the agents write their
//!   leases back, with the subnets they had.
//!
//! Elsewhere: an agent killed mid-transfer and restarted with its key
//! (tests/wireguard.rs), the TUN device deleted and an unwritable
//! subnet-file (tests/lab.rs).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{options, plain_log, route_exists, up, wait_for};
use weft_control::datastore::Lease;
use weft_control::subnet::SubnetKey;
use weft_lab::netns;
use weft_lab::{self as lab, Lab, Node};

/// A node's subnet as its `subnet.env` names it.
fn subnet_of(lab: &Lab, n: &Node) -> SubnetKey {
    let env = std::fs::read_to_string(lab.dir.join(format!("n{}-subnet.env", n.index))).unwrap();
    weft_control::lease::previous_subnet(&env).expect("subnet.env names a subnet")
}

/// The public key of the private key in a node's key file.
fn public_key_in(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let private = weft_control::keys::decode(text.trim()).expect("a key file holds a base64 key");
    weft_control::keys::encode(&weft_engine::WgDevice::public_of(private))
}

/// Whether the process in a node's pid file is alive.
fn agent_alive(lab: &Lab, n: &Node) -> bool {
    let pid = std::fs::read_to_string(lab.dir.join(format!("n{}.pid", n.index))).unwrap();
    let pid = nix::unistd::Pid::from_raw(pid.trim().parse().unwrap());
    // Reap it first if it died (the lab started it: it is our child).
    let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
    nix::sys::signal::kill(pid, None).is_ok()
}

/// A counter of a node's agent, 0 when absent.
fn counter(lab: &Lab, n: &Node, name: &str) -> f64 {
    lab.metrics(n).unwrap_or_else(|e| panic!("metrics of {}: {e:#}", n.ns)).get(name).copied().unwrap_or(0.0)
}

#[test]
fn a_wireguard_peer_restarted_with_a_new_key_is_followed_mid_transfer() {
    let mut o = options("k");
    o.backend = "wireguard-native".into();
    o.datastore = "etcd".into();
    o.nodes = 2;
    let (lab, _g) = up(&o);
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let key_file = lab.dir.join("n2-wg.key");
    let old = public_key_in(&key_file);
    let ifname = lab::wg_ifname(&lab, n1);
    let peers = || netns::exec(&n1.ns, "wg", &["show", &ifname, "peers"]).unwrap();
    assert!(peers().lines().any(|l| l == old), "node 1 knows node 2's first key: {}", peers());

    let (a, b) = (n1.pods[0].clone(), n2.pods[0].clone());
    let mut restarted = None;
    let mut fault = || {
        restarted = Some((|| {
            lab.kill_agent(n2)?;
            std::fs::remove_file(&key_file)?;
            lab.restart_agent(n2)
        })());
    };
    let t = lab::transfer_with(&a, &b, false, 48 << 20, Some(&mut fault));
    let restarted = restarted.expect("the fault ran midway");
    restarted.unwrap_or_else(|e| panic!("restarting node 2 without its key: {e:#}\n{}", lab.agent_logs()));
    assert!(t.passed, "the transfer across the new key: {}\n{}", t.detail, lab.agent_logs());

    let new = public_key_in(&key_file);
    assert_ne!(new, old, "node 2 made a new key");
    // Its lease announces the new key, and node 1's device has followed.
    let announced = lab
        .with_etcd(|s| Ok(s.leases()?.leases))
        .unwrap()
        .values()
        .find(|l| l.public_ip == n2.ip4)
        .and_then(|l| l.wireguard_data(false).ok())
        .map(|d| weft_control::keys::encode(&d.public_key));
    assert_eq!(announced.as_deref(), Some(new.as_str()), "node 2's lease in etcd");
    let listed = peers();
    assert!(listed.lines().any(|l| l == new), "node 1 lists node 2's new key: {listed}");
    assert!(!listed.lines().any(|l| l == old), "node 1 no longer lists the old key: {listed}");
}

/// The underlay MTU the faults lower to: below every outer datagram a
/// full-sized pod packet makes (1450 + 50 for VXLAN, 1420 + 80 for
/// WireGuard, both 1500).
const LOWERED_MTU: u32 = 1380;

/// The kernel's IPv4 `Ip:` counters in namespace `ns`, by name.
fn ip_counters(ns: &str) -> BTreeMap<String, u64> {
    let text = netns::exec(ns, "cat", &["/proc/net/snmp"]).unwrap();
    let mut lines = text.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter_map(|(n, v)| Some((n.to_string(), v.parse().ok()?)))
        .collect()
}

/// Lowers the underlay MTU of every node of `lab`: its `eth0` and the
/// bridge port it hangs on.
fn lower_underlay_mtu(lab: &Lab, mtu: u32) -> anyhow::Result<()> {
    let ul = format!("{}-ul", lab.opts.name);
    let mtu = mtu.to_string();
    for n in &lab.nodes {
        netns::ip(&["-n", &ul, "link", "set", &format!("n{}", n.index), "mtu", &mtu])?;
        netns::ip(&["-n", &n.ns, "link", "set", "eth0", "mtu", &mtu])?;
    }
    Ok(())
}

fn underlay_mtu_lowered_mid_transfer(backend: &str) {
    let mut o = options("m");
    o.backend = backend.into();
    o.nodes = 2;
    let (lab, _g) = up(&o);
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let (a, b) = (&n1.pods[0], &n2.pods[0]);
    let env_before = std::fs::read_to_string(lab.dir.join("n1-subnet.env")).unwrap();
    let send_errors = "weft_drops_total{reason=\"send_error\"}";
    let frags0 = ip_counters(&n1.ns)["FragCreates"];
    let mut lowered = None;
    let mut fault = || lowered = Some(lower_underlay_mtu(&lab, LOWERED_MTU));
    let t = lab::transfer_with(a, b, false, 32 << 20, Some(&mut fault));
    lowered.expect("the fault ran midway").expect("lowering the underlay MTU");
    assert!(t.passed, "{backend}: the transfer across the MTU change: {}\n{}", t.detail, lab.agent_logs());
    let again = lab::transfer_check(a, b, false, 32 << 20);
    assert!(again.passed, "{backend}: a transfer after it: {}\n{}", again.detail, lab.agent_logs());

    let eth0 = netns::exec(&n1.ns, "cat", &["/sys/class/net/eth0/mtu"]).unwrap();
    assert_eq!(eth0.trim(), LOWERED_MTU.to_string(), "the fault is in place");
    // As kernel Flannel: the pods' MTU stays, the kernel fragments the
    // outer datagrams that no longer fit.
    assert_eq!(std::fs::read_to_string(lab.dir.join("n1-subnet.env")).unwrap(), env_before, "subnet.env unchanged");
    let frags = ip_counters(&n1.ns)["FragCreates"] - frags0;
    assert!(frags > 0, "{backend}: the sending node fragmented its outer datagrams");
    // Every datagram weft handed the kernel was taken: a UDP_SEGMENT send
    // refused for its segment size went out again one datagram per send.
    for n in [n1, n2] {
        assert_eq!(counter(&lab, n, send_errors), 0.0, "{backend}: {} lost sends\n{}", n.ns, lab.agent_logs());
    }
    let refused = counter(&lab, n1, "weft_udp_gso_refused_total");
    assert!(refused > 0.0, "{backend}: the refused UDP_SEGMENT sends are counted");
    println!("{backend}: {frags} fragments made, {refused} UDP_SEGMENT sends refused and sent again singly");
}

#[test]
fn underlay_mtu_lowered_while_traffic_flows_loses_nothing_vxlan() {
    underlay_mtu_lowered_mid_transfer("vxlan");
}

#[test]
fn underlay_mtu_lowered_while_traffic_flows_loses_nothing_wireguard() {
    underlay_mtu_lowered_mid_transfer("wireguard-native");
}

#[test]
fn a_truncated_datastore_file_leaves_the_last_good_copy_in_force() {
    let mut o = options("t");
    o.nodes = 3;
    let (lab, _g) = up(&o);
    let path = lab.dir.join("datastore.json");
    let good = std::fs::read_to_string(&path).unwrap();
    let peer_routes = |n: &Node| -> Vec<String> {
        lab.nodes.iter().filter(|p| p.index != n.index).map(|p| p.key.v4.unwrap().to_string()).collect()
    };
    for n in &lab.nodes {
        for r in peer_routes(n) {
            assert!(route_exists(&n.ns, &r), "{} routes {r} before the fault", n.ns);
        }
    }

    // An operator's write caught half-way: the first half of the JSON.
    std::fs::write(&path, &good.as_bytes()[..good.len() / 2]).unwrap();
    for n in &lab.nodes {
        lab.reload(n).unwrap();
    }
    for n in &lab.nodes {
        wait_for(&format!("{} refuses the truncated file", n.ns), Duration::from_secs(10), || {
            plain_log(&lab, n).lines().any(|l| {
                l.contains("update refused")
                    && l.contains("static datastore")
                    && l.contains(&path.display().to_string())
            })
        });
    }
    let log = plain_log(&lab, &lab.nodes[0]);
    println!("{}", log.lines().find(|l| l.contains("update refused")).unwrap_or_default());
    for n in &lab.nodes {
        assert!(agent_alive(&lab, n), "{} keeps running\n{}", n.ns, lab.agent_logs());
        assert!(lab::http_ok(&lab.http_get(n, "/readyz").unwrap()), "{} stays ready", n.ns);
        for r in peer_routes(n) {
            assert!(route_exists(&n.ns, &r), "{} keeps its route to {r}", n.ns);
        }
    }
    let (first, last) = (&lab.nodes[0].pods[0], &lab.nodes[2].pods[0]);
    let t = lab::transfer_check(first, last, false, 16 << 20);
    assert!(t.passed, "a transfer with the last good copy: {}\n{}", t.detail, lab.agent_logs());

    // A good file with a change (a node joins) is applied.
    let mut ds: serde_json::Value = serde_json::from_str(&good).unwrap();
    ds["subnets"]["10.244.200.0-24"] = serde_json::json!({
        "PublicIP": "192.168.77.200", "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": "0a:58:0a:f4:c8:00"}
    });
    std::fs::write(&path, serde_json::to_string_pretty(&ds).unwrap()).unwrap();
    for n in &lab.nodes {
        lab.reload(n).unwrap();
    }
    for n in &lab.nodes {
        wait_for(&format!("{} routes the new node", n.ns), Duration::from_secs(10), || {
            route_exists(&n.ns, "10.244.200.0/24")
        });
        for r in peer_routes(n) {
            assert!(route_exists(&n.ns, &r), "{} keeps its route to {r}", n.ns);
        }
    }
    let t = lab::transfer_check(last, first, false, 16 << 20);
    assert!(t.passed, "a transfer after the good reload: {}\n{}", t.detail, lab.agent_logs());
}

/// How long the agents may take to write their leases back into an empty
/// etcd: the keeper retries etcd every 5 s at most (`lease::MAX_BACKOFF`)
/// and writes its lease back in the round that finds it missing; twice that
/// and a margin for a loaded machine.
const LEASES_BACK_WITHIN: Duration = Duration::from_secs(20);

#[test]
fn etcd_restarted_with_an_empty_data_directory_gets_the_leases_written_back() {
    let mut o = options("e");
    o.datastore = "etcd".into();
    o.nodes = 3;
    let (lab, _g) = up(&o);
    let before: BTreeMap<SubnetKey, Lease> = lab.with_etcd(|s| Ok(s.leases()?.leases)).unwrap();
    assert_eq!(before.len(), 3, "{before:?}");
    let subnets: Vec<SubnetKey> = lab.nodes.iter().map(|n| subnet_of(&lab, n)).collect();

    lab.wipe_etcd().unwrap();
    // (An agent may have written its lease back already.)
    let no_config = lab.with_etcd(|s| Ok(s.network_config().is_err())).unwrap();
    assert!(no_config, "the network config went with the data directory");
    // The operator puts the network config back, as after any restore.
    let config = lab::datastore(&lab.opts, &lab.nodes).config;
    lab.with_etcd(move |s| Ok(s.put_network_config(&config)?)).unwrap();

    let wiped = Instant::now();
    let mut after = BTreeMap::new();
    wait_for("every agent's lease back in etcd", LEASES_BACK_WITHIN, || {
        after = lab.with_etcd(|s| Ok(s.leases()?.leases)).unwrap_or_default();
        after.len() == before.len()
    });
    println!("leases back {:?} after the wipe", wiped.elapsed());
    assert_eq!(after, before, "the same subnets with the same values");
    for (n, s) in lab.nodes.iter().zip(&subnets) {
        assert_eq!(&subnet_of(&lab, n), s, "{} keeps its subnet", n.ns);
        assert!(agent_alive(&lab, n), "{} keeps running", n.ns);
    }
    for n in &lab.nodes {
        for p in lab.nodes.iter().filter(|p| p.index != n.index) {
            let r = p.key.v4.unwrap().to_string();
            wait_for(&format!("{} routes {r} again", n.ns), Duration::from_secs(10), || route_exists(&n.ns, &r));
        }
    }
    let (first, last) = (&lab.nodes[0].pods[0], &lab.nodes[2].pods[0]);
    let t = lab::transfer_check(first, last, false, 16 << 20);
    assert!(t.passed, "a transfer after the wipe: {}\n{}", t.detail, lab.agent_logs());
}
