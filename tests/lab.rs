//! Network-namespace labs (root): weft nodes, a kernel Flannel node, a packet
//! dissector on the underlay, spoofed packets, reloads and shutdown.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use common::vxlan::{collect_udp, send_from, send_legitimate, spoof_cases, v4};
use common::{assert_all_passed, options, route_exists, up};
use weft_lab::netns;
use weft_lab::{self as lab, Lab, Node};

#[test]
fn three_weft_nodes_pass_every_check() {
    let (lab, _g) = up(&options("a"));
    let checks = lab.check();
    assert_eq!(checks.iter().filter(|c| c.name.starts_with("ping")).count(), 6, "every ordered pair of pods");
    assert_all_passed(&lab, &checks);
}

#[test]
fn kernel_flannel_node_and_weft_nodes_reach_each_other() {
    let mut o = options("k");
    o.kernel_peer = true;
    let (lab, _g) = up(&o);
    assert_eq!(lab.nodes[2].kind, lab::NodeKind::KernelVxlan);
    let checks = lab.check();
    // Both TCP directions between node 1 (weft) and node 3 (kernel) are in.
    assert!(checks.iter().any(|c| c.name == "tcp 64 MiB 10.244.1.2 -> 10.244.3.2"));
    assert!(checks.iter().any(|c| c.name == "tcp 64 MiB 10.244.3.2 -> 10.244.1.2"));
    assert_all_passed(&lab, &checks);
}

#[test]
fn one_worker_and_several_workers_both_forward() {
    for threads in [1, 3] {
        let mut o = options("t");
        o.nodes = 2;
        o.threads = Some(threads);
        o.transfer_mib = 16;
        let (lab, _g) = up(&o);
        assert_all_passed(&lab, &lab.check());
        let m = lab.metrics(&lab.nodes[0]).unwrap();
        assert_eq!(m.get("weft_workers"), Some(&(threads as f64)));
        // Offloads are on by default: received TCP segments were coalesced
        // into GSO writes, and pods' super-packets were cut in software.
        assert!(m.get("weft_gro_merged_total").is_some_and(|v| *v > 0.0), "coalescing happened: {m:?}");
        assert!(m.get("weft_sw_segmented_total").is_some_and(|v| *v > 0.0), "TSO reads happened: {m:?}");
    }
}

/// Whether node `n`'s agent logged that its TUN takes USO writes.
fn tun_takes_uso(lab: &Lab, n: &Node) -> bool {
    common::plain_log(lab, n).lines().any(|l| l.contains("TUN offloads") && l.contains("uso=true"))
}

#[test]
fn udp_datagrams_arrive_whole_and_joined_writes_keep_their_boundaries() {
    // A burst of equal-sized datagrams from one flow: the receiving node
    // joins them into USO writes where its TUN takes them, and the pod
    // must still get each datagram whole, as sent.
    let mut o = options("u");
    o.nodes = 2;
    o.threads = Some(1);
    let (lab, _g) = up(&o);
    let (from, to) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
    let dst = SocketAddr::from((v4(to), 7788));
    const COUNT: u32 = 4000;
    const LEN: usize = 300;
    let datagram = |seq: u32| -> Vec<u8> {
        let mut d: Vec<u8> = (0..LEN).map(|i| (seq as usize * 7 + i) as u8).collect();
        d[..4].copy_from_slice(&seq.to_be_bytes());
        d
    };
    let listener = netns::spawn_in_netns(&to.ns, move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        let _ = s.set_recv_buffer_size(16 << 20);
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 7788)).into()).unwrap();
        let s: UdpSocket = s.into();
        s.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = s.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let merged_before = lab.metrics(&lab.nodes[1]).unwrap()["weft_gro_merged_total"];
    let src = v4(from);
    netns::in_netns(&from.ns, move || {
        let s = UdpSocket::bind((src, 0)).unwrap();
        for seq in 0..COUNT {
            s.send_to(&datagram(seq), dst).unwrap();
            if seq % 200 == 199 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    })
    .unwrap();
    let got = listener.join().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for d in &got {
        assert_eq!(d.len(), LEN, "a datagram arrived with another length");
        let seq = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
        assert_eq!(d, &datagram(seq), "datagram {seq} arrived changed");
        assert!(seen.insert(seq), "datagram {seq} arrived twice");
    }
    assert!(got.len() as u32 >= COUNT * 9 / 10, "only {} of {COUNT} datagrams arrived", got.len());
    let merged = lab.metrics(&lab.nodes[1]).unwrap()["weft_gro_merged_total"] - merged_before;
    if tun_takes_uso(&lab, &lab.nodes[1]) {
        assert!(merged > 0.0, "the TUN takes USO, yet no datagrams were joined");
    } else {
        eprintln!("this kernel's TUN takes no USO writes: datagrams went one by one");
    }
}

#[test]
fn offloads_forced_off_forward_with_one_and_two_workers() {
    for threads in [1, 2] {
        let mut o = options("o");
        o.nodes = 2;
        o.threads = Some(threads);
        o.transfer_mib = 16;
        o.offloads_off = true;
        let (lab, _g) = up(&o);
        assert_all_passed(&lab, &lab.check());
        let m = lab.metrics(&lab.nodes[0]).unwrap();
        assert_eq!(m.get("weft_workers"), Some(&(threads as f64)));
        // With the TUN offloads off nothing is coalesced or cut from a TSO read.
        assert_eq!(m.get("weft_gro_merged_total"), Some(&0.0), "{m:?}");
        assert_eq!(m.get("weft_sw_segmented_total"), Some(&0.0), "{m:?}");
    }
}

#[test]
fn underlay_capture_is_vxlan_vni_1_with_the_pods_inside() {
    let mut o = options("c");
    o.nodes = 2;
    let (lab, _g) = up(&o);
    let (a, b) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
    let pcap = lab
        .capture_underlay(&["udp", "port", "8472"], || {
            netns::exec(&a.ns, "ping", &["-c", "3", "-i", "0.2", "-W", "2", &v4(b).to_string()]).unwrap();
        })
        .unwrap();
    let pcap_s = pcap.display().to_string();
    let out = netns::run(
        "tshark",
        &[
            "-r",
            &pcap_s,
            "-d",
            "udp.port==8472,vxlan",
            "-Y",
            "vxlan && icmp",
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-e",
            "vxlan.vni",
            "-e",
            "ip.src",
            "-e",
            "ip.dst",
            "-e",
            "udp.srcport",
            "-e",
            "eth.dst",
        ],
    )
    .unwrap();
    let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.len() >= 6, "3 echo requests and 3 replies, got:\n{out}");
    for line in &lines {
        let f: Vec<&str> = line.split('|').collect();
        assert_eq!(f[0], "1", "VNI in {line}");
        // Outer then inner addresses.
        let src: Vec<&str> = f[1].split(',').collect();
        let dst: Vec<&str> = f[2].split(',').collect();
        assert!(src.len() == 2 && dst.len() == 2, "outer and inner IP in {line}");
        let inner = (src[1], dst[1]);
        assert!(
            inner == ("10.244.1.2", "10.244.2.2") || inner == ("10.244.2.2", "10.244.1.2"),
            "inner addresses in {line}"
        );
        // The outer source port depends on the flow, not on a fixed socket
        // port: with UDP_SEGMENT it is that of one of eight pool sockets,
        // picked by the flow hash and bound to an ephemeral port, which on
        // Linux lies in ip_local_port_range (32768-60999 by default), the
        // same range as the kernel's udp_flow_src_port. Never the tunnel port.
        let sport: u16 = f[3].parse().unwrap();
        assert!((32768..=60999).contains(&sport), "flow-picked source port in {line}");
        // The inner frame is addressed to the receiving node's VTEP MAC.
        let inner_dst_mac = f[4].split(',').nth(1).unwrap_or("");
        assert!(inner_dst_mac.starts_with("0a:58:0a:f4:0"), "inner destination MAC in {line}");
    }
    // VXLAN carries pod traffic in clear: the WireGuard lab's underlay check
    // must see that here.
    let e = lab.underlay_capture().unwrap_err().to_string();
    assert!(e.contains("in clear"), "{e}");
}

fn drops(lab: &Lab, n: &Node, reason: &str) -> f64 {
    lab.metrics(n).unwrap().get(&format!("weft_drops_total{{reason=\"{reason}\"}}")).copied().unwrap_or(-1.0)
}

#[test]
fn spoofed_vxlan_never_reaches_a_pod_and_is_counted() {
    let mut o = options("s");
    o.nodes = 3;
    let (lab, _g) = up(&o);
    let n1 = &lab.nodes[0];
    let listener = collect_udp(&n1.pods[0].ns, 7777);
    for (reason, ns, src, payload) in spoof_cases(&lab) {
        let before = drops(&lab, n1, reason);
        send_from(&ns, src, n1, payload);
        let deadline = Instant::now() + Duration::from_secs(2);
        while drops(&lab, n1, reason) < before + 1.0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(drops(&lab, n1, reason), before + 1.0, "drop counter {reason}");
    }
    // The control: the same packet from the real node with its own pod as
    // source does arrive, so the listener would have seen the others.
    send_legitimate(&lab);
    let got = listener.join().unwrap();
    assert_eq!(got, vec!["legitimate".to_string()], "only the legitimate packet reaches the pod");
}

#[test]
fn sighup_applies_datastore_changes_without_dropping_others() {
    let mut o = options("h");
    o.transfer_mib = 128;
    let (lab, _g) = up(&o);
    let (n1, n2, n3) = (&lab.nodes[0], &lab.nodes[1], &lab.nodes[2]);
    let ds_path = lab.dir.join("datastore.json");
    let full = std::fs::read_to_string(&ds_path).unwrap();

    // A transfer n1 -> n2 runs across two reloads; it must lose nothing.
    let (a, b) = (n1.pods[0].clone(), n2.pods[0].clone());
    let transfer = std::thread::spawn(move || lab::transfer_check(&a, &b, false, 128 << 20));

    // Node 3 leaves the datastore.
    let mut ds = weft_control::datastore::StaticDatastore::parse(full.as_bytes()).unwrap();
    ds.leases.retain(|k, _| *k != n3.key);
    std::fs::write(&ds_path, ds.to_json()).unwrap();
    lab.reload(n1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while route_exists(&n1.ns, "10.244.3.0/24") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!route_exists(&n1.ns, "10.244.3.0/24"), "route to the removed node is gone");
    assert!(route_exists(&n1.ns, "10.244.2.0/24"), "route to the unchanged node stays");
    assert_eq!(lab.metrics(n1).unwrap().get("weft_peers"), Some(&1.0));
    assert!(netns::exec(&n1.pods[0].ns, "ping", &["-c", "1", "-W", "1", &v4(&n3.pods[0]).to_string()]).is_err());

    // Node 3 comes back.
    std::fs::write(&ds_path, &full).unwrap();
    lab.reload(n1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !route_exists(&n1.ns, "10.244.3.0/24") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    netns::exec(&n1.pods[0].ns, "ping", &["-c", "1", "-W", "2", &v4(&n3.pods[0]).to_string()])
        .expect("node 3 reachable again");

    let t = transfer.join().unwrap();
    assert!(t.passed, "transfer to the unchanged node across reloads: {}", t.detail);
    // A datastore that no longer parses is refused and the old state kept.
    std::fs::write(&ds_path, "{ not json").unwrap();
    lab.reload(n1).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(route_exists(&n1.ns, "10.244.3.0/24"));
    assert!(lab::http_ok(&lab.http_get(n1, "/healthz").unwrap()));
}

#[test]
fn sigterm_removes_routes_and_the_device() {
    let mut o = options("q");
    o.nodes = 2;
    let (lab, _g) = up(&o);
    let n1 = &lab.nodes[0];
    assert!(route_exists(&n1.ns, "10.244.2.0/24"));
    let pid: i32 = std::fs::read_to_string(lab.dir.join("n1.pid")).unwrap().trim().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() && Instant::now() < deadline {
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!route_exists(&n1.ns, "10.244.2.0/24"), "route removed");
    assert!(netns::run("ip", &["-n", &n1.ns, "link", "show", "weft0"]).is_err(), "device removed");
    let env = std::fs::read_to_string(lab.dir.join("n1-subnet.env")).unwrap();
    assert_eq!(
        env,
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
    );
}

#[test]
fn killed_agent_restarts_and_traffic_resumes() {
    let mut o = options("r");
    o.nodes = 2;
    o.transfer_mib = 16;
    let (lab, _g) = up(&o);
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let (a, b) = (&n1.pods[0], &n2.pods[0]);
    netns::exec(&a.ns, "ping", &["-c", "1", "-W", "2", &v4(b).to_string()]).unwrap();
    lab.kill_agent(n2).unwrap();
    assert!(netns::exec(&a.ns, "ping", &["-c", "1", "-W", "1", &v4(b).to_string()]).is_err(), "node 2 is down");
    lab.restart_agent(n2).unwrap();
    netns::exec(&a.ns, "ping", &["-c", "1", "-W", "2", &v4(b).to_string()]).expect("traffic resumes after the restart");
    let t = lab::transfer_check(b, a, false, 16 << 20);
    assert!(t.passed, "{}", t.detail);
}

#[test]
fn lab_command_keeps_and_removes_a_lab() {
    common::require_root();
    let name = common::unique_name("l");
    let _g = common::Guard(name.clone());
    let weft = common::weft_bin();
    let out = Command::new(&weft)
        .args(["lab", "--nodes", "2", "--keep", "--transfer-mib", "4", "--name", &name])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("all checks passed"), "{stdout}");
    assert!(stdout.contains(&format!("ip netns exec {name}-n1p1")), "{stdout}");
    assert!(netns::exists(&format!("{name}-n1p1")), "kept");
    let out = Command::new(&weft).args(["lab", "down", "--name", &name]).output().unwrap();
    assert!(out.status.success());
    assert!(netns::list().iter().all(|n| !n.starts_with(&format!("{name}-"))), "every namespace removed");
    assert!(!std::path::Path::new(lab::STATE_ROOT).join(&name).exists(), "state removed");
}

#[test]
fn bad_configuration_is_refused_at_start_with_key_value_and_rule() {
    let out = Command::new(common::weft_bin())
        .args(["agent", "--node-ip", "192.168.77.1", "--datastore-file", "unused.json", "--vni", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`vni`") && err.contains("`0`") && err.contains("1 to 16777215"), "{err}");
    let out = Command::new(common::weft_bin())
        .args(["agent", "--node-ip", "192.168.77.1", "--datastore-file", "/nonexistent/ds.json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ds.json"));
}

/// Builds a lab of `nodes` nodes with `cidrs`, checks it, and returns it for more.
fn family_lab(tag: &str, backend: &str, cidrs: &[&str]) -> (Lab, common::Guard, Vec<lab::Check>) {
    let mut o = options(tag);
    o.backend = backend.into();
    o.transfer_mib = 16;
    o.cluster_cidrs = cidrs.iter().map(|c| c.parse().unwrap()).collect();
    let (lab, g) = up(&o);
    let checks = lab.check();
    assert_all_passed(&lab, &checks);
    (lab, g, checks)
}

#[test]
fn dual_stack_vxlan_lab_carries_both_families_both_ways() {
    let (lab, _g, checks) = family_lab("d", "vxlan", &["10.42.0.0/16", "2001:cafe:42::/56"]);
    assert!(
        checks.iter().any(|c| c.name.starts_with("tcp 16 MiB 2001:cafe:42:1::") && c.passed),
        "{}",
        lab::table(&checks)
    );
    assert!(checks.iter().any(|c| c.name.starts_with("tcp 16 MiB 10.42.3.") && c.passed));
    // Pods got both addresses from host-local, within their node's subnets.
    let pod = &lab.nodes[1].pods[0];
    assert!(pod.ip(false).unwrap().to_string().starts_with("10.42.2."));
    assert!(pod.ip(true).unwrap().to_string().starts_with("2001:cafe:42:2::"));
    // subnet.env as Flannel writes it, IPv6 overhead in the MTU.
    let env = std::fs::read_to_string(lab.dir.join("n2-subnet.env")).unwrap();
    assert_eq!(
        env,
        "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.2.1/24\nFLANNEL_IPV6_NETWORK=2001:cafe:42::/56\n\
         FLANNEL_IPV6_SUBNET=2001:cafe:42:2::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n"
    );
}

#[test]
fn ipv6_only_vxlan_lab_passes() {
    let (lab, _g, _) = family_lab("6", "vxlan", &["2001:cafe:42::/56"]);
    assert!(lab.nodes.iter().all(|n| n.ip4.is_none()), "IPv6-only underlay");
    let m = lab.metrics(&lab.nodes[0]).unwrap();
    assert!(m["weft_udp_tx_packets_total"] > 0.0);
}

#[test]
fn host_gw_lab_routes_via_nodes_without_encapsulation() {
    let (lab, _g, _) = family_lab("g", "host-gw", &["10.244.0.0/16"]);
    let n1 = &lab.nodes[0];
    let route = netns::run("ip", &["-n", &n1.ns, "route", "show", "10.244.2.0/24"]).unwrap();
    assert!(route.contains("via 192.168.77.2 dev eth0"), "{route}");
    assert!(netns::run("ip", &["-n", &n1.ns, "link", "show", "weft0"]).is_err(), "no TUN device");
}

/// The TUN device deleted under a running agent: its workers stop, and the
/// agent says so and exits non-zero rather than run on half dead; started
/// again (as systemd or the DaemonSet would), it makes the device anew and
/// traffic resumes.
#[test]
fn an_agent_whose_tun_is_deleted_says_so_exits_and_a_restart_resumes_traffic() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let mut o = options("d");
    o.nodes = 2;
    o.transfer_mib = 16;
    let (lab, _g) = up(&o);
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let pid: i32 = std::fs::read_to_string(lab.dir.join("n1.pid")).unwrap().trim().parse().unwrap();
    let pid = nix::unistd::Pid::from_raw(pid);
    netns::run("ip", &["-n", &n1.ns, "link", "del", "weft0"]).unwrap();
    let mut status = None;
    common::wait_for("the agent to exit", Duration::from_secs(10), || {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => status = Some(code),
            Ok(WaitStatus::Signaled(..)) => status = Some(-1),
            _ => {}
        }
        status.is_some()
    });
    assert_eq!(status.filter(|c| *c != 0).map(|_| "non-zero"), Some("non-zero"), "exit status {status:?}");
    let log = std::fs::read_to_string(lab.dir.join("n1.log")).unwrap();
    assert!(log.contains("is the TUN device weft0 gone?"), "the agent said why: {log}");
    lab.restart_agent(n1).unwrap();
    let c = lab::transfer_check(&n2.pods[0], &n1.pods[0], false, 16 << 20);
    assert!(c.passed, "{}: {}", c.name, c.detail);
}

/// A `subnet.env` that cannot be written (its "directory" is a file here:
/// root may write anywhere else) is refused at start with the key, the
/// path and the reason, before the agent makes any device: run in a
/// namespace of its own, which holds no TUN afterwards.
#[test]
fn an_unwritable_subnet_file_is_refused_at_start_with_the_path_and_reason() {
    common::require_root();
    let ns = common::unique_name("sf");
    netns::run("ip", &["netns", "add", &ns]).unwrap();
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = netns::run("ip", &["netns", "del", &self.0]);
        }
    }
    let _ns = Ns(ns.clone());
    let dir = std::env::temp_dir().join(&ns);
    std::fs::create_dir_all(&dir).unwrap();
    let not_a_dir = dir.join("file");
    std::fs::write(&not_a_dir, "").unwrap();
    let ds = dir.join("ds.json");
    let o = options("sfds");
    let nodes = lab::plan(&o).unwrap();
    std::fs::write(&ds, lab::datastore(&o, &nodes).to_json()).unwrap();
    let subnet_file = not_a_dir.join("subnet.env");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(common::weft_bin())
        .args(["agent", "--node-ip", "192.168.77.1", "--metrics-addr", "", "--tun-name", "wsf0"])
        .args(["--datastore-file", &ds.display().to_string(), "--subnet-file", &subnet_file.display().to_string()])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {text}");
    assert!(text.contains("config key `subnet-file`") && text.contains(&subnet_file.display().to_string()), "{text}");
    // Making the directory fails first: a file holds its name.
    assert!(text.contains("File exists") || text.contains("Not a directory"), "the reason: {text}");
    assert!(netns::run("ip", &["-n", &ns, "link", "show", "wsf0"]).is_err(), "no device was made");
}
