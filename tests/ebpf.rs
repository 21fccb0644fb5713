//! The eBPF data plane of the VXLAN backend (root): labs with `dataplane:
//! ebpf`, a kernel Flannel node as the peer both ways, the frames on the
//! wire, the spoofing cases against the programs, what the programs leave to
//! userspace, `auto`'s fallback, and the programs' lifetime (SIGTERM,
//! `kill -9`).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::vxlan::{collect_udp, send_from, send_legitimate, spoof_cases, v4};
use common::{assert_all_passed, options, up, wait_for};
use weft_lab::{self as lab, netns, Lab, Node};

/// One of the programs' counters on node `n`.
fn ebpf(lab: &Lab, n: &Node, what: &str) -> f64 {
    lab.metrics(n).unwrap().get(&format!("weft_ebpf_packets_total{{what=\"{what}\"}}")).copied().unwrap_or(-1.0)
}

fn ebpf_options(tag: &str) -> weft_lab::LabOptions {
    let mut o = options(tag);
    o.dataplane = Some("ebpf".into());
    o.transfer_mib = 16;
    o
}

/// The tcx programs on `iface` in namespace `ns`.
fn attached(ns: &str, iface: &str, egress: bool) -> Vec<String> {
    let iface = iface.to_string();
    netns::in_netns(ns, move || weft_engine::ebpf::attached(&iface, egress)).unwrap().unwrap()
}

#[test]
fn ebpf_nodes_and_a_kernel_flannel_node_reach_each_other_through_the_programs() {
    let mut o = ebpf_options("e");
    o.kernel_peer = true;
    let (lab, _g) = up(&o);
    assert_eq!(lab.nodes[2].kind, lab::NodeKind::KernelVxlan);
    let checks = lab.check();
    assert!(checks.iter().any(|c| c.name == "tcp 16 MiB 10.244.1.2 -> 10.244.3.2"));
    assert!(checks.iter().any(|c| c.name == "tcp 16 MiB 10.244.3.2 -> 10.244.1.2"));
    assert_all_passed(&lab, &checks);
    for n in &lab.nodes[..2] {
        assert_eq!(attached(&n.ns, "weft0", true), ["weft_egress"], "{}", n.ns);
        assert_eq!(attached(&n.ns, "eth0", false), ["weft_ingress"], "{}", n.ns);
        // The programs carried the pods' IPv4 traffic: the engine sent none.
        let m = lab.metrics(n).unwrap();
        // (Node 1 carries the TCP checks with the kernel node; node 2 pings.)
        let least = if n.index == 1 { 100.0 } else { 1.0 };
        assert!(ebpf(&lab, n, "encapsulated") >= least && ebpf(&lab, n, "decapsulated") >= least, "{m:?}");
        assert_eq!(m.get("weft_udp_tx_packets_total"), Some(&0.0), "{}: {m:?}", n.ns);
    }

    // The frames on the wire, as tshark reads them: Flannel's VXLAN (VNI 1,
    // flow-hashed source port, the receiving VtepMAC inside, no outer UDP
    // checksum on IPv4, as kernel Flannel sends), both to the kernel node
    // and from it.
    let (a, k) = (&lab.nodes[0].pods[0], &lab.nodes[2].pods[0]);
    let pcap = lab
        .capture_underlay(&["udp", "port", "8472"], || {
            netns::exec(&a.ns, "ping", &["-c", "3", "-i", "0.2", "-W", "2", &v4(k).to_string()]).unwrap();
        })
        .unwrap();
    let pcap_s = pcap.display().to_string();
    let fields = ["vxlan.vni", "ip.src", "ip.dst", "udp.srcport", "eth.dst", "udp.checksum", "vxlan.flags"];
    let mut args = vec!["-r", &pcap_s, "-d", "udp.port==8472,vxlan", "-Y", "vxlan && icmp", "-T", "fields"];
    args.extend(["-E", "separator=|"]);
    for f in &fields {
        args.extend(["-e", f]);
    }
    let out = netns::run("tshark", &args).unwrap();
    let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.len() >= 6, "3 echo requests and 3 replies, got:\n{out}");
    let requests = lines.iter().filter(|l| l.contains("192.168.77.1,10.244.1.2")).count();
    assert!(requests >= 3, "weft's frames decoded:\n{out}");
    for line in &lines {
        let f: Vec<&str> = line.split('|').collect();
        assert_eq!(f[0], "1", "VNI in {line}");
        let sport: u16 = f[3].parse().unwrap();
        assert!((32768..=60999).contains(&sport), "flow-picked source port in {line}");
        let inner_dst_mac = f[4].split(',').nth(1).unwrap_or("");
        assert!(inner_dst_mac.starts_with("0a:58:0a:f4:0"), "inner destination MAC in {line}");
        if f[1].starts_with("192.168.77.1,") {
            assert_eq!(f[5], "0x0000", "no outer UDP checksum on IPv4 in {line}");
            assert_eq!(f[6], "0x0800", "VXLAN flags: the I bit alone in {line}");
        }
    }
}

#[test]
fn dual_stack_ebpf_lab_carries_ipv4_in_the_kernel_and_leaves_ipv6_to_userspace() {
    let mut o = ebpf_options("d");
    o.nodes = 2;
    o.cluster_cidrs = vec!["10.244.0.0/16".parse().unwrap(), "2001:cafe:42::/56".parse().unwrap()];
    let (lab, _g) = up(&o);
    let checks = lab.check();
    assert!(checks.iter().any(|c| c.name.starts_with("tcp 16 MiB 2001:cafe:42:")), "IPv6 is checked too");
    assert_all_passed(&lab, &checks);
    for n in &lab.nodes {
        let m = lab.metrics(n).unwrap();
        assert!(ebpf(&lab, n, "encapsulated") > 100.0, "IPv4 through the programs: {m:?}");
        // The programs leave IPv6 pods (an IPv6 underlay) to the engine,
        // which carries them as before.
        assert!(m.get("weft_udp_tx_packets_total").is_some_and(|v| *v > 100.0), "IPv6 through userspace: {m:?}");
    }
}

#[test]
fn ipv6_only_lab_with_dataplane_auto_runs_on_the_engine_and_says_why() {
    // The programs handle IPv4 underlays only: an IPv6-only node has none,
    // so `auto` runs the engine and says why in its one line.
    let mut o = ebpf_options("6");
    o.nodes = 2;
    o.cluster_cidrs = vec!["2001:cafe:42::/56".parse().unwrap()];
    o.dataplane = Some("auto".into());
    let (lab, _g) = up(&o);
    assert_all_passed(&lab, &lab.check());
    for n in &lab.nodes {
        let log = common::plain_log(&lab, n);
        let line = log.lines().find(|l| l.contains("data plane: userspace")).unwrap_or_else(|| panic!("{log}"));
        assert!(line.contains("no IPv4 underlay"), "{line}");
    }
}

#[test]
fn spoofed_vxlan_is_dropped_by_the_ingress_program_and_counted() {
    let mut o = ebpf_options("s");
    o.nodes = 3;
    let (lab, _g) = up(&o);
    let n1 = &lab.nodes[0];
    let listener = collect_udp(&n1.pods[0].ns, 7777);
    for (reason, ns, src, payload) in spoof_cases(&lab) {
        // The program's name for each of the engine's reasons.
        let what = match reason {
            "unknown_source" => "drop_unknown_source",
            "wrong_vni" => "drop_vni",
            "spoofed_source" => "drop_spoofed_source",
            "wrong_dst_mac" => "drop_vtep_mac",
            other => panic!("no eBPF counter for {other}"),
        };
        let before = ebpf(&lab, n1, what);
        send_from(&ns, src, n1, payload);
        let deadline = Instant::now() + Duration::from_secs(2);
        while ebpf(&lab, n1, what) < before + 1.0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(ebpf(&lab, n1, what), before + 1.0, "counter {what}");
        // In the kernel: the engine never saw it.
        let m = lab.metrics(n1).unwrap();
        assert_eq!(m.get(&format!("weft_drops_total{{reason=\"{reason}\"}}")), Some(&0.0), "{reason}: {m:?}");
    }
    // The control: the same datagram from the real node with its own pod's
    // source arrives, decapsulated by the program.
    let before = ebpf(&lab, n1, "decapsulated");
    send_legitimate(&lab);
    let got = listener.join().unwrap();
    assert_eq!(got, vec!["legitimate".to_string()], "only the legitimate packet reaches the pod");
    assert!(ebpf(&lab, n1, "decapsulated") > before);
}

/// A hand-started agent, killed however the test ends.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts node `n`'s agent by hand with `dataplane: value` and `env`; its
/// stderr goes to `log`.
fn start_by_hand(lab: &Lab, n: &Node, value: &str, env: &[(&str, &str)], log: &std::path::Path) -> Agent {
    let cfg = lab.dir.join(format!("n{}.yaml", n.index));
    let text = std::fs::read_to_string(&cfg).unwrap();
    let mut text: String = text.lines().filter(|l| !l.starts_with("dataplane:")).map(|l| format!("{l}\n")).collect();
    text += &format!("dataplane: {value}\n");
    let by_hand = lab.dir.join(format!("n{}-{value}.yaml", n.index));
    std::fs::write(&by_hand, text).unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &n.ns]).arg(common::weft_bin()).arg("agent").arg("--config").arg(&by_hand);
    cmd.envs(env.iter().copied()).env("NO_COLOR", "1").stdout(Stdio::null());
    cmd.stderr(std::fs::File::create(log).unwrap());
    Agent(cmd.spawn().unwrap())
}

#[test]
fn auto_falls_back_to_userspace_when_tcx_is_refused_and_ebpf_says_why() {
    let mut o = ebpf_options("a");
    o.nodes = 2;
    let (lab, _g) = up(&o);
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let (a, b) = (&n1.pods[0], &n2.pods[0]);
    lab.kill_agent(n1).unwrap();
    let refuse = [(weft_engine::ebpf::REFUSE_ENV, "1")];

    // `ebpf` itself: the agent refuses to start and says why, in one line.
    let log = lab.dir.join("n1-ebpf.log");
    let mut child = start_by_hand(&lab, n1, "ebpf", &refuse, &log);
    let status = child.0.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{text}");
    let line = text.lines().find(|l| l.contains("dataplane")).unwrap_or_else(|| panic!("no reason given:\n{text}"));
    assert!(line.contains("value `ebpf` refused") && line.contains("tcx"), "{line}");

    // `auto`: the same refusal, one log line saying so, and the engine
    // carries the traffic.
    let log = lab.dir.join("n1-auto.log");
    let child = start_by_hand(&lab, n1, "auto", &refuse, &log);
    wait_for("the agent with dataplane auto ready", Duration::from_secs(15), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("agent ready"))
    });
    let text = std::fs::read_to_string(&log).unwrap();
    let says = text.lines().filter(|l| l.contains("data plane: userspace")).collect::<Vec<_>>();
    assert_eq!(says.len(), 1, "{text}");
    assert!(says[0].contains(weft_engine::ebpf::REFUSE_ENV), "{}", says[0]);
    assert!(attached(&n1.ns, "weft0", true).is_empty() && attached(&n1.ns, "eth0", false).is_empty());
    let t = lab::transfer_check(a, b, false, 8 << 20);
    drop(child);
    assert!(t.passed, "{}", t.detail);
}

#[test]
fn programs_detach_on_sigterm_and_a_killed_agent_restarts_into_them() {
    let mut o = ebpf_options("k");
    o.nodes = 2;
    let (lab, _g) = up(&o);
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let (a, b) = (&n1.pods[0], &n2.pods[0]);
    // kill -9: the links were the agent's file descriptors, so nothing
    // stale is left to black-hole traffic, and a restart attaches anew.
    lab.kill_agent(n2).unwrap();
    assert!(attached(&n2.ns, "eth0", false).is_empty(), "a killed agent's program stays attached");
    lab.restart_agent(n2).unwrap();
    assert_eq!(attached(&n2.ns, "eth0", false), ["weft_ingress"]);
    netns::exec(&a.ns, "ping", &["-c", "1", "-W", "2", &v4(b).to_string()]).expect("traffic resumes after the restart");
    let t = lab::transfer_check(b, a, false, 8 << 20);
    assert!(t.passed, "{}", t.detail);

    // SIGTERM: the agent detaches its programs before it exits.
    let pid: i32 = std::fs::read_to_string(lab.dir.join("n1.pid")).unwrap().trim().parse().unwrap();
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    // The lab's agents are this process's children: reap it.
    wait_for("the agent to exit", Duration::from_secs(5), || {
        matches!(
            nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)),
            Ok(nix::sys::wait::WaitStatus::Exited(..) | nix::sys::wait::WaitStatus::Signaled(..)) | Err(_)
        )
    });
    assert!(attached(&n1.ns, "eth0", false).is_empty(), "ingress program left after SIGTERM");
}

#[test]
fn lease_changes_during_a_transfer_rewrite_the_maps_and_lose_nothing_to_unchanged_nodes() {
    let mut o = ebpf_options("l");
    o.transfer_mib = 128;
    let (lab, _g) = up(&o);
    let (n1, n2, n3) = (&lab.nodes[0], &lab.nodes[1], &lab.nodes[2]);
    let ds_path = lab.dir.join("datastore.json");
    let full = std::fs::read_to_string(&ds_path).unwrap();
    let ping = |from: &Node, to: &Node, wait: &str| {
        netns::exec(&from.pods[0].ns, "ping", &["-c", "1", "-W", wait, &v4(&to.pods[0]).to_string()])
    };
    let (a, b) = (n1.pods[0].clone(), n2.pods[0].clone());
    let transfer = std::thread::spawn(move || lab::transfer_check(&a, &b, false, 128 << 20));
    let write_and_reload = |ds: &weft_control::datastore::StaticDatastore| {
        std::fs::write(&ds_path, ds.to_json()).unwrap();
        lab.reload(n1).unwrap();
    };

    // Node 3 leaves: its subnet leaves node 1's maps with its route.
    let mut ds = weft_control::datastore::StaticDatastore::parse(full.as_bytes()).unwrap();
    ds.leases.retain(|k, _| *k != n3.key);
    write_and_reload(&ds);
    wait_for("node 3 gone from node 1", Duration::from_secs(5), || ping(n1, n3, "1").is_err());

    // Node 3 comes back with another VtepMAC in its lease (its own device
    // keeps the old one): node 1's egress program now addresses that MAC,
    // which node 3's ingress program refuses and counts.
    let mut ds = weft_control::datastore::StaticDatastore::parse(full.as_bytes()).unwrap();
    let lease = ds.leases.get_mut(&n3.key).unwrap();
    lease.backend_data["VtepMAC"] = serde_json::json!("0a:58:0a:f4:63:33");
    let refused = ebpf(&lab, n3, "drop_vtep_mac");
    write_and_reload(&ds);
    wait_for("node 1 to send with the new VtepMAC", Duration::from_secs(5), || {
        let _ = ping(n1, n3, "1");
        ebpf(&lab, n3, "drop_vtep_mac") > refused
    });

    // The lease as it was: node 3 is reachable again.
    std::fs::write(&ds_path, &full).unwrap();
    lab.reload(n1).unwrap();
    wait_for("node 3 reachable again", Duration::from_secs(5), || ping(n1, n3, "1").is_ok());

    let t = transfer.join().unwrap();
    assert!(t.passed, "transfer to the unchanged node across the changes: {}", t.detail);
    assert_eq!(lab.metrics(n1).unwrap().get("weft_udp_tx_packets_total"), Some(&0.0), "all through the programs");
}
