//! Labs (root) whose first node's underlay link goes through the
//! impairment relay (`weft lab --impair`): loss, reordering, duplication
//! and delay in userspace, since this kernel has no netem.

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{assert_all_passed, options, up, wait_for};
use weft_lab::{netns, wg_ifname, Lab, LabOptions, Node};

/// The impairment: every kind at once, from a fixed seed.
const MIXED: &str = "loss=10%,reorder=5%,duplicate=1%,delay=5ms,jitter=2ms,seed=7";

fn impaired(tag: &str, backend: &str, spec: &str) -> LabOptions {
    let mut o = options(tag);
    o.nodes = 2;
    o.backend = backend.into();
    o.impair = Some(spec.parse().unwrap());
    o
}

/// Every check passes (pings, the 64 MiB transfers with their SHA-256 at
/// both ends, the counters), and the relay did lose, duplicate and reorder
/// both ways.
fn every_check_passes_through(backend: &str) {
    let (lab, _g) = up(&impaired(if backend == "vxlan" { "iv" } else { "iw" }, backend, MIXED));
    let checks = lab.check();
    assert!(checks.iter().filter(|c| c.name.starts_with("tcp 64 MiB")).count() == 2, "both transfers ran");
    assert_all_passed(&lab, &checks);
    let s = lab.impair_stats().unwrap();
    for (way, d) in [("to the node", &s.to_node), ("from it", &s.from_node)] {
        assert!(d.datagrams > 40_000, "{way}: the transfers crossed the relay: {d}");
        assert!(d.lost > 0 && d.duplicated > 0 && d.reordered > 0, "{way}: {d}");
    }
    eprintln!("{}", weft_lab::table(&checks));
}

#[test]
fn vxlan_keeps_64_mib_whole_through_loss_reordering_duplication_and_delay() {
    every_check_passes_through("vxlan");
}

#[test]
fn wireguard_keeps_64_mib_whole_through_loss_reordering_duplication_and_delay() {
    every_check_passes_through("wireguard-native");
}

/// `wg show <dev> latest-handshakes` of node `n`: the newest, in seconds
/// since the epoch (0: none yet).
fn latest_handshake(lab: &Lab, n: &Node) -> u64 {
    let out = netns::exec(&n.ns, "wg", &["show", &wg_ifname(lab, n), "latest-handshakes"]).unwrap_or_default();
    out.lines().filter_map(|l| l.split_whitespace().nth(1)?.parse().ok()).max().unwrap_or(0)
}

fn ping_once(from: &str, to: &str) -> bool {
    netns::exec(from, "ping", &["-c", "1", "-W", "1", to]).is_ok()
}

#[test]
fn wireguard_handshakes_complete_under_30_percent_loss() {
    let (lab, _g) = up(&impaired("ih", "wireguard-native", "loss=30%,seed=11"));
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let to = b.pods[0].ip(false).unwrap().to_string();
    // From cold: the first packet starts the handshake, retried every 5 s.
    wait_for("a handshake and a ping through 30 % loss", Duration::from_secs(90), || ping_once(&a.pods[0].ns, &to));
    let first = latest_handshake(&lab, a);
    assert!(first > 0 && latest_handshake(&lab, b) > 0, "both ends report the handshake");
    // The peer restarts (a new session is needed) under the same loss.
    std::thread::sleep(Duration::from_millis(1100));
    lab.kill_agent(b).unwrap();
    lab.restart_agent(b).unwrap();
    wait_for("a new handshake after the peer restarted", Duration::from_secs(120), || {
        ping_once(&a.pods[0].ns, &to) && latest_handshake(&lab, a) > first
    });
    let t = weft_lab::transfer_check(&a.pods[0], &b.pods[0], false, 4 << 20);
    assert!(t.passed, "{} {}", t.name, t.detail);
    let s = lab.impair_stats().unwrap();
    let lost = (s.to_node.lost + s.from_node.lost) as f64 / (s.to_node.datagrams + s.from_node.datagrams) as f64;
    assert!((0.25..0.35).contains(&lost), "the relay lost {:.1} % of datagrams", lost * 100.0);
    eprintln!("handshakes completed through {:.1} % loss: {}; {}", lost * 100.0, s.to_node, s.from_node);
}

/// Node `n`'s WireGuard drops of `reason`.
fn drops(lab: &Lab, n: &Node, reason: &str) -> u64 {
    let m: BTreeMap<String, f64> = lab.metrics(n).unwrap();
    m.get(&format!("weft_drops_total{{reason=\"{reason}\"}}")).copied().unwrap_or(0.0) as u64
}

#[test]
fn duplicated_wireguard_datagrams_never_reach_a_pod_twice_and_reordered_ones_all_arrive() {
    let (lab, _g) = up(&impaired("id", "wireguard-native", "duplicate=20%,reorder=10%,delay=2ms,jitter=1ms,seed=5"));
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let to = a.pods[0].ip(false).unwrap();
    wait_for("the tunnel up", Duration::from_secs(30), || ping_once(&b.pods[0].ns, &to.to_string()));
    let replays_before = drops(&lab, a, "wg_replay");
    let dup_before = lab.impair_stats().unwrap().to_node.duplicated;

    const COUNT: u32 = 3000;
    let rx = netns::in_netns(&a.pods[0].ns, move || UdpSocket::bind(SocketAddr::new(to, 7070))).unwrap().unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let receiver = std::thread::spawn(move || {
        let mut seen = vec![0u32; COUNT as usize];
        let mut buf = [0u8; 64];
        while let Ok(n) = rx.recv(&mut buf) {
            if n == 4 {
                let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
                seen[seq as usize] += 1;
            }
        }
        seen
    });
    netns::in_netns(&b.pods[0].ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        let started = Instant::now();
        for seq in 0..COUNT {
            s.send_to(&seq.to_be_bytes(), SocketAddr::new(to, 7070)).unwrap();
            // Paced: the receiving socket never overflows.
            while started.elapsed() < Duration::from_micros(200) * (seq + 1) {}
        }
    })
    .unwrap();
    let seen = receiver.join().unwrap();
    let twice: Vec<usize> = (0..seen.len()).filter(|&i| seen[i] > 1).collect();
    let missing = seen.iter().filter(|&&c| c == 0).count();
    assert!(twice.is_empty(), "datagrams that reached the pod twice: {twice:?}");
    assert_eq!(missing, 0, "reordered datagrams (inside the replay window) are accepted");

    let s = lab.impair_stats().unwrap();
    let duplicated = s.to_node.duplicated - dup_before;
    let replays = drops(&lab, a, "wg_replay") - replays_before;
    assert!(duplicated > 400, "the relay duplicated {duplicated} datagrams towards the node: {}", s.to_node);
    assert!(s.to_node.reordered > 200, "{}", s.to_node);
    // Each duplicate of a data packet is refused as a replay and counted;
    // a duplicated handshake message is refused for its own reason.
    assert!(replays <= duplicated && replays + 10 >= duplicated, "{replays} replays for {duplicated} duplicates");
    eprintln!("{COUNT} datagrams once each; {duplicated} duplicates, {replays} refused as replays; {}", s.to_node);
}
