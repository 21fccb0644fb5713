//! The etcd datastore end to end (root): labs whose agents take, keep, renew
//! and watch their subnet leases in a real etcd server the lab runs.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_all_passed, options, route_exists, up, wait_for};
use weft_control::etcd::{EtcdStore, StoreError};
use weft_control::etcd_tls::{EtcdSecurity, HandshakeError, TlsFile};
use weft_control::subnet::SubnetKey;
use weft_lab::netns;
use weft_lab::{self as lab, Lab, Node};

fn etcd_lab(tag: &str, nodes: usize) -> (Lab, common::Guard) {
    let mut o = options(tag);
    o.datastore = "etcd".into();
    o.nodes = nodes;
    o.transfer_mib = 8;
    up(&o)
}

fn subnet_of(lab: &Lab, n: &Node) -> SubnetKey {
    let env = std::fs::read_to_string(lab.dir.join(format!("n{}-subnet.env", n.index))).unwrap();
    weft_control::lease::previous_subnet(&env).expect("subnet.env names a subnet")
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
    assert!(lab::http_ok(&lab.http_get(n1, "/healthz").unwrap()));
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

/// A lab whose etcd speaks TLS with client certificates and/or requires a
/// user and password.
fn secured_lab(tag: &str, tls: bool, auth: bool, kernel_peer: bool) -> (Lab, common::Guard) {
    let mut o = options(tag);
    o.datastore = "etcd".into();
    o.nodes = if kernel_peer { 3 } else { 2 };
    o.kernel_peer = kernel_peer;
    o.etcd_tls = tls;
    o.etcd_auth = auth;
    o.transfer_mib = 8;
    up(&o)
}

/// Connects to the lab's etcd from its underlay namespace with `sec`.
fn connect_as(lab: &Lab, url: String, sec: EtcdSecurity) -> Result<(), StoreError> {
    netns::in_netns(&format!("{}-ul", lab.opts.name), move || {
        EtcdStore::connect_with(&[url], weft_control::etcd::DEFAULT_PREFIX, Duration::from_secs(3), &sec).map(|_| ())
    })
    .expect("enter the underlay namespace")
}

/// Starts a second agent on node `n` with the lab's config for it, edited by
/// `edit` (key, value pairs replacing the lab's), and returns its exit
/// status, its stderr and how long it ran. It is killed after
/// `limit`: an agent that accepted the config would run forever.
fn run_agent_with(lab: &Lab, n: &Node, edit: &[(&str, &str)], limit: Duration) -> (Option<i32>, String, Duration) {
    let cfg = std::fs::read_to_string(lab.dir.join(format!("n{}.yaml", n.index))).unwrap();
    // Never touch the running agent's metrics port or subnet.env.
    let mut edit = edit.to_vec();
    let subnet_file = lab.dir.join(format!("n{}-refused-subnet.env", n.index));
    let subnet_file = subnet_file.display().to_string();
    edit.extend([("metrics-addr", "''"), ("subnet-file", subnet_file.as_str())]);
    let mut text: String = cfg
        .lines()
        .filter(|l| !edit.iter().any(|(k, _)| l.starts_with(&format!("{k}:"))))
        .map(|l| format!("{l}\n"))
        .collect();
    for (k, v) in &edit {
        text.push_str(&format!("{k}: {v}\n"));
    }
    let path = lab.dir.join(format!("n{}-refused.yaml", n.index));
    std::fs::write(&path, text).unwrap();
    let stderr_path = lab.dir.join(format!("n{}-refused.log", n.index));
    let log = std::fs::File::create(&stderr_path).unwrap();
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &n.ns])
        .arg(common::weft_bin())
        .args(["agent", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start weft agent");
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > limit {
            // `ip netns exec` execs the agent: this PID is the agent's.
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = started.elapsed();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    (status.map(|s| s.code().unwrap_or(-1)), stderr, took)
}

#[test]
fn etcd_over_tls_with_client_certificates_and_a_kernel_flannel_node() {
    let (lab, _g) = secured_lab("s", true, false, true);
    assert!(lab::etcd_url(&lab).starts_with("https://"));
    let cfg = std::fs::read_to_string(lab.dir.join("n1.yaml")).unwrap();
    for key in ["etcd-cafile", "etcd-certfile", "etcd-keyfile"] {
        assert!(cfg.contains(&format!("{key}: ")), "agents get {key}: {cfg}");
    }
    let key_mode = std::fs::metadata(lab::etcd_certs(&lab).client_key).unwrap().permissions().mode();
    assert_eq!(key_mode & 0o777, 0o600, "keys are private");
    // The kernel node's lease went in through TLS too.
    let kernel = lab.nodes.last().unwrap();
    assert_eq!(kernel.kind, lab::NodeKind::KernelVxlan);
    assert_eq!(subnet_of(&lab, kernel).to_string(), "10.244.3.0-24");
    assert_all_passed(&lab, &lab.check());

    // etcd really requires TLS and a client certificate.
    let plain = lab::etcd_url(&lab).replacen("https://", "http://", 1);
    assert!(connect_as(&lab, plain, EtcdSecurity::default()).is_err(), "plain http is not served");
    let mut no_cert = lab::etcd_security(&lab);
    no_cert.cert_file = None;
    no_cert.key_file = None;
    match connect_as(&lab, lab::etcd_url(&lab), no_cert) {
        Err(StoreError::Tls(HandshakeError::Refused { file: TlsFile::Cert, .. })) => {}
        other => panic!("without a client certificate: {other:?}"),
    }
}

#[test]
fn etcd_with_a_password_and_an_agent_with_a_wrong_one_is_refused_at_start() {
    let (lab, _g) = secured_lab("p", false, true, false);
    let cfg = std::fs::read_to_string(lab.dir.join("n1.yaml")).unwrap();
    assert!(cfg.contains("etcd-username: root\n") && cfg.contains("etcd-password: "), "{cfg}");
    assert_all_passed(&lab, &lab.check());

    // Without a user etcd says no, and it is not mistaken for an outage.
    match connect_as(&lab, lab::etcd_url(&lab), EtcdSecurity::default()) {
        Err(StoreError::Refused { .. }) => {}
        other => panic!("without a user: {other:?}"),
    }
    let (status, stderr, took) =
        run_agent_with(&lab, &lab.nodes[0], &[("etcd-password", "not-the-password")], Duration::from_secs(30));
    assert!(status.is_some_and(|c| c != 0), "refused, not running: {status:?} after {took:?}\n{stderr}");
    assert!(took < Duration::from_secs(15), "refused at start, not after retries: {took:?}");
    assert!(stderr.contains("etcd-username") && stderr.contains("etcd-password"), "{stderr}");
    assert!(!stderr.contains("not-the-password"), "the password is not printed: {stderr}");
}

#[test]
fn etcd_with_tls_and_a_password_and_an_agent_with_a_wrong_ca_is_refused_at_start() {
    let (lab, _g) = secured_lab("b", true, true, false);
    assert_all_passed(&lab, &lab.check());

    let other_ca = lab.dir.join("other-ca.pem");
    weft_lab::etcd_certs::EtcdCerts::make_unrelated_ca(&other_ca, "not the lab's CA").unwrap();
    let other = other_ca.display().to_string();
    let (status, stderr, took) =
        run_agent_with(&lab, &lab.nodes[1], &[("etcd-cafile", other.as_str())], Duration::from_secs(30));
    assert!(status.is_some_and(|c| c != 0), "refused, not running: {status:?} after {took:?}\n{stderr}");
    assert!(took < Duration::from_secs(15), "refused at start, not after retries: {took:?}");
    assert!(stderr.contains("etcd-cafile") && stderr.contains(&other), "{stderr}");
    assert!(stderr.contains("certificate"), "says why: {stderr}");

    // A CA file that is no certificate at all is refused before any
    // connection, naming the file.
    let (status, stderr, _) = run_agent_with(
        &lab,
        &lab.nodes[1],
        &[("etcd-cafile", &lab::etcd_certs(&lab).client_key.display().to_string())],
        Duration::from_secs(30),
    );
    assert!(status.is_some_and(|c| c != 0), "{stderr}");
    assert!(stderr.contains("etcd-cafile") && stderr.contains("no certificate"), "{stderr}");
}
