//! A simulated mesh (STYLE.md 8.3): N data paths over in-memory pod and
//! underlay sides, joined by a link with loss, reordering and duplication,
//! in virtual time. No root, no devices, no sleeping: two minutes of
//! WireGuard timers run in milliseconds.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use rand::{Rng, SeedableRng};
use weft_engine::counters::{DropCause, EngineDrop};
use weft_engine::datapath::{Backend, Datapath};
use weft_engine::io::mem::{Datagram, MemPod, MemUnderlay};
use weft_engine::wg::{Deadlines, WgDevice, WgPeer};
use weft_engine::{Families, Peer, Snapshot, WorkerCounters};
use weft_tunnel::vxlan::{Vtep, Vxlan};
use weft_tunnel::wireguard::{Identity, WgError, REJECT_AFTER_TIME, REKEY_AFTER_TIME};

const MTU: usize = 1420;
const WG_PORT: u16 = 51820;

fn addr(i: usize) -> IpAddr {
    IpAddr::from([192, 0, 2, i as u8 + 1])
}

fn subnet(i: usize) -> IpNet {
    format!("10.244.{}.0/24", i + 1).parse().unwrap()
}

fn mac(i: usize) -> [u8; 6] {
    [0x0a, 0x58, 0, 0, i as u8 + 1, 0]
}

/// A pod packet from node `i`'s pod to node `j`'s, numbered `seq`.
fn packet(i: usize, j: usize, seq: u32) -> Vec<u8> {
    weft_testkit::tcp_ipv4([10, 244, i as u8 + 1, 2], [10, 244, j as u8 + 1, 2], 200, seq)
}

enum Kind {
    Vxlan,
    Wireguard,
}

struct Node {
    dp: Datapath<MemPod, MemUnderlay>,
    /// WireGuard: this node's device and its view of every other node.
    device: Option<Arc<WgDevice>>,
    wg: Vec<Option<Arc<WgPeer>>>,
    /// Keeps the timer owner's waker alive.
    _poll: mio::Poll,
}

/// N nodes and the link between them.
struct Mesh {
    nodes: Vec<Node>,
    kind: Kind,
    now: Instant,
    rng: rand::rngs::StdRng,
    seed: u64,
    loss: f64,
    dup: f64,
    reorder: f64,
    /// In flight: (due, datagram).
    flight: Vec<(Instant, Datagram)>,
    /// Every datagram put on the link, (sender node, WireGuard message type or 0).
    log: Vec<(usize, u8, Instant)>,
    /// Drop every datagram whose first byte is in here (WireGuard types).
    block_types: Vec<u8>,
}

impl Mesh {
    fn new(n: usize, kind: Kind) -> Mesh {
        Mesh::with_offloads(n, kind, false)
    }

    /// N nodes whose pod sides play TUNs with offloads (super-packets in,
    /// coalesced writes out) or without.
    fn with_offloads(n: usize, kind: Kind, offloads: bool) -> Mesh {
        let seed: u64 = rand::random();
        let now = Instant::now();
        let devices: Vec<Arc<WgDevice>> =
            (0..n).map(|i| Arc::new(WgDevice::with_identity(|wall| Identity::new([i as u8 + 1; 32], wall)))).collect();
        let mut mesh = Mesh {
            nodes: Vec::new(),
            kind,
            now,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            seed,
            loss: 0.0,
            dup: 0.0,
            reorder: 0.0,
            flight: Vec::new(),
            log: Vec::new(),
            block_types: Vec::new(),
        };
        for i in 0..n {
            let (backend, port, device) = match mesh.kind {
                Kind::Vxlan => {
                    let vx = Vxlan::new(1, 8472, Vtep { addr: addr(i), mac: mac(i) });
                    (Backend::Vxlan(vec![vx]), 8472, None)
                }
                Kind::Wireguard => (Backend::Wireguard(devices[i].clone()), WG_PORT, Some(devices[i].clone())),
            };
            let wg: Vec<Option<Arc<WgPeer>>> = (0..n)
                .map(|j| {
                    let d = device.as_ref()?;
                    (j != i).then(|| {
                        let ep = SocketAddr::new(addr(j), WG_PORT);
                        Arc::new(WgPeer::new(d, devices[j].public_key(), None, None, j as u32 + 1, Some(ep)))
                    })
                })
                .collect();
            let under = MemUnderlay::new(SocketAddr::new(addr(i), port), matches!(mesh.kind, Kind::Vxlan));
            let counters = Arc::new(WorkerCounters::default());
            let mut dp = Datapath::new(MemPod::new(offloads), vec![under], backend, Arc::default(), counters, MTU);
            let poll = mio::Poll::new().unwrap();
            let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
            dp.deadlines = Some(Arc::new(Deadlines::new(waker)));
            dp.timer_owner = true;
            mesh.nodes.push(Node { dp, device, wg, _poll: poll });
        }
        for i in 0..n {
            mesh.publish(i, &(0..n).map(subnet).collect::<Vec<_>>());
        }
        mesh
    }

    /// Gives node `i` a snapshot where node `j` owns `subnets[j]`.
    fn publish(&mut self, i: usize, subnets: &[IpNet]) {
        let n = self.nodes.len();
        let peers = (0..n)
            .filter(|j| *j != i)
            .map(|j| Peer {
                name: format!("n{j}"),
                vtep4: matches!(self.kind, Kind::Vxlan).then(|| Vtep { addr: addr(j), mac: mac(j) }),
                vtep6: None,
                subnets: vec![subnets[j]],
                counters: Default::default(),
                wg: self.nodes[i].wg[j].clone(),
            })
            .collect();
        let s = Arc::new(Snapshot::new(peers, Families { v4: true, v6: false }));
        self.nodes[i].dp.set_snapshot(s, self.now);
    }

    fn send(&mut self, i: usize, j: usize, seq: u32) {
        self.nodes[i].dp.pod.push(packet(i, j, seq));
    }

    /// One step of `dt`: every node reads its pod side and fires its
    /// timers, then the link carries what was sent and every node
    /// receives, until nothing more is sent at this instant (answers to
    /// answers included: the link itself takes no time).
    fn step(&mut self, dt: Duration) {
        self.now += dt;
        let now = self.now;
        for node in &mut self.nodes {
            while node.dp.pod_to_underlay(now).unwrap() {}
            node.dp.poll_timers(now);
        }
        for _ in 0..16 {
            self.carry(dt);
            let (due, later): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.flight).into_iter().partition(|(t, _)| *t <= now);
            self.flight = later;
            if due.is_empty() {
                break;
            }
            for (_, (from, to, d)) in due {
                if let Some(node) = self.nodes.iter_mut().find(|n| n.dp.families[0].local.ip() == to.ip()) {
                    node.dp.families[0].inbox.push_back((from, d));
                }
            }
            for node in &mut self.nodes {
                while node.dp.underlay_to_pod(0, now).unwrap() {}
            }
        }
    }

    /// Puts what every node sent on the link: lost, duplicated or held
    /// back a step, at random.
    fn carry(&mut self, dt: Duration) {
        let now = self.now;
        for (k, node) in self.nodes.iter_mut().enumerate() {
            for d in node.dp.families[0].take_sent() {
                let kind = if matches!(self.kind, Kind::Wireguard) { d.2[0] } else { 0 };
                self.log.push((k, kind, now));
                if self.block_types.contains(&kind) || self.rng.gen_bool(self.loss) {
                    continue;
                }
                let delay = if self.rng.gen_bool(self.reorder) { dt * 2 } else { Duration::ZERO };
                if self.rng.gen_bool(self.dup) {
                    self.flight.push((now + delay, d.clone()));
                }
                self.flight.push((now + delay, d));
            }
        }
    }

    fn run(&mut self, total: Duration, dt: Duration) {
        let end = self.now + total;
        while self.now < end {
            self.step(dt);
        }
    }

    /// Packets node `j`'s pod got, numbered by their sequence field.
    fn got(&self, j: usize) -> Vec<Vec<u8>> {
        self.nodes[j].dp.pod.outbox.clone()
    }

    fn sent_of(&self, by: usize, kind: u8) -> usize {
        self.log.iter().filter(|(k, t, _)| *k == by && *t == kind).count()
    }

    fn drops(&self, j: usize, c: DropCause) -> u64 {
        self.nodes[j].dp.counters.drops(c)
    }
}

/// The pod side's batch in, the underlay's batch out: VXLAN as Flannel's
/// wire format has it, one datagram per packet, to the peer's VTEP.
#[test]
fn a_pod_batch_becomes_one_vxlan_datagram_per_packet() {
    let mut m = Mesh::new(2, Kind::Vxlan);
    let packets: Vec<Vec<u8>> = (0..3).map(|s| packet(0, 1, s)).collect();
    for p in &packets {
        m.nodes[0].dp.pod.push(p.clone());
    }
    let now = m.now;
    assert!(!m.nodes[0].dp.pod_to_underlay(now).unwrap(), "one short batch");
    let sent = m.nodes[0].dp.families[0].take_sent();
    assert_eq!(sent.len(), 3);
    for ((from, to, d), p) in sent.iter().zip(&packets) {
        assert_eq!(from.ip(), addr(0));
        assert_eq!(*to, SocketAddr::new(addr(1), 8472));
        assert_eq!(d[..8], [0x08, 0, 0, 0, 0, 0, 1, 0], "flags, VNI 1");
        assert_eq!(d[8..14], mac(1), "to the peer's VtepMAC");
        assert_eq!(d[14..20], mac(0));
        assert_eq!(d[20..22], [0x08, 0x00]);
        assert_eq!(&d[22..], &p[..], "the packet unchanged");
    }
}

/// A super-packet from a TUN with offloads is cut into MTU-sized
/// segments, one datagram each; a receiver with offloads writes them back
/// to its pod as one coalesced packet, one without as the segments.
fn super_packet_crosses(kind: Kind, receiver_offloads: bool) {
    let mut m = Mesh::with_offloads(2, kind, true);
    m.nodes[1].dp.pod.offloads = receiver_offloads;
    // A first packet for the WireGuard handshake.
    m.send(0, 1, 0);
    m.step(Duration::from_millis(10));
    let before = m.log.len();
    let sp = weft_testkit::tcp_ipv4([10, 244, 1, 2], [10, 244, 2, 2], 13_800, 1);
    m.nodes[0].dp.pod.push_super(sp.clone(), 1380);
    m.step(Duration::from_millis(10));
    assert_eq!(m.log.len() - before, 10, "13 800 bytes cut at 1380 (MTU 1420): ten datagrams");
    let got = m.got(1);
    let payload: Vec<u8> = got[1..].iter().flat_map(|p| p[40..].iter().copied()).collect();
    assert_eq!(payload, sp[40..], "every byte, in order");
    if receiver_offloads {
        assert_eq!(got.len(), 2, "one coalesced write");
    } else {
        assert_eq!(got.len(), 11, "one write per segment");
        assert!(got[1..].iter().all(|p| p.len() <= MTU));
    }
}

#[test]
fn vxlan_cuts_a_super_packet_and_the_receiver_coalesces_it() {
    super_packet_crosses(Kind::Vxlan, true);
}

#[test]
fn vxlan_cuts_a_super_packet_for_a_receiver_without_offloads() {
    super_packet_crosses(Kind::Vxlan, false);
}

#[test]
fn wireguard_seals_each_segment_and_the_receiver_coalesces_them() {
    super_packet_crosses(Kind::Wireguard, true);
}

#[test]
fn wireguard_seals_each_segment_for_a_receiver_without_offloads() {
    super_packet_crosses(Kind::Wireguard, false);
}

/// Every packet a pod got is one that was sent to it, unchanged.
fn assert_all_genuine(m: &Mesh, j: usize, from: &[usize], upto: u32) {
    for p in m.got(j) {
        let ok = from.iter().any(|&i| (0..upto).any(|s| packet(i, j, s * 1000) == p));
        assert!(ok, "seed {}: node {j} got a packet nobody sent it", m.seed);
    }
}

#[test]
fn vxlan_delivers_between_three_nodes_through_loss_reordering_and_duplication() {
    let mut m = Mesh::new(3, Kind::Vxlan);
    (m.loss, m.dup, m.reorder) = (0.1, 0.1, 0.2);
    for s in 0..100 {
        for i in 0..3 {
            m.send(i, (i + 1) % 3, s * 1000);
        }
        m.step(Duration::from_millis(1));
    }
    m.run(Duration::from_millis(10), Duration::from_millis(1));
    for j in 0..3 {
        let got = m.got(j).len();
        assert!((70..=130).contains(&got), "seed {}: node {j} got {got} of 100", m.seed);
        assert_all_genuine(&m, j, &[(j + 2) % 3], 100);
    }
}

#[test]
fn vxlan_follows_a_lease_change_while_traffic_flows() {
    let mut m = Mesh::new(3, Kind::Vxlan);
    for s in 0..10 {
        m.send(0, 2, s * 1000);
        m.step(Duration::from_millis(1));
    }
    assert_eq!(m.got(2).len(), 10);
    // Node 2's lease moves to another subnet: the old one routes nowhere.
    let moved: IpNet = "10.244.9.0/24".parse().unwrap();
    let subnets = vec![subnet(0), subnet(1), moved];
    for i in 0..3 {
        m.publish(i, &subnets);
    }
    m.send(0, 2, 99_000);
    m.step(Duration::from_millis(1));
    assert_eq!(m.got(2).len(), 10);
    assert_eq!(m.drops(0, DropCause::Engine(EngineDrop::NoRoute)), 1);
    let p = weft_testkit::tcp_ipv4([10, 244, 1, 2], [10, 244, 9, 2], 200, 1);
    m.nodes[0].dp.pod.push(p.clone());
    m.step(Duration::from_millis(1));
    assert_eq!(m.got(2).last(), Some(&p), "the new subnet is reached");
}

#[test]
fn wireguard_handshakes_through_loss_and_delivers() {
    let mut m = Mesh::new(3, Kind::Wireguard);
    (m.loss, m.dup, m.reorder) = (0.3, 0.1, 0.2);
    for s in 0..50 {
        for i in 0..3 {
            m.send(i, (i + 1) % 3, s * 1000);
        }
        m.run(Duration::from_secs(1), Duration::from_millis(100));
    }
    for j in 0..3 {
        let got = m.got(j).len();
        assert!(got >= 20, "seed {}: node {j} got {got} of 50", m.seed);
        assert_all_genuine(&m, j, &[(j + 2) % 3], 50);
        assert_eq!(m.drops(j, DropCause::Wg(WgError::Decrypt)), 0, "seed {}", m.seed);
    }
    // About 10 of 150 data packets arrive twice: the second is a replay.
    let replays: u64 = (0..3).map(|j| m.drops(j, DropCause::Wg(WgError::Replay))).sum();
    assert!(replays > 0, "seed {}: duplicates are refused as replays", m.seed);
}

#[test]
fn wireguard_rekeys_every_two_minutes_without_a_gap() {
    let mut m = Mesh::new(2, Kind::Wireguard);
    // Node 0 speaks first, so that it is the initiator (two nodes that
    // start at once each initiate, and each rekeys its own session).
    m.send(0, 1, 0);
    m.step(Duration::from_millis(250));
    for s in 1..300 {
        m.send(0, 1, s * 1000);
        m.send(1, 0, s * 1000);
        m.run(Duration::from_secs(1), Duration::from_millis(250));
    }
    let inits: Vec<(usize, Instant)> = m.log.iter().filter(|(_, t, _)| *t == 1).map(|l| (l.0, l.2)).collect();
    assert_eq!(inits.len(), 3, "a handshake at 0 s and rekeys at 120 s and 240 s: {inits:?}");
    assert!(inits.iter().all(|(k, _)| *k == 0), "the initiator rekeys");
    for w in inits.windows(2) {
        let gap = w[1].1 - w[0].1;
        assert!(gap >= REKEY_AFTER_TIME && gap < REKEY_AFTER_TIME + Duration::from_secs(2), "{gap:?}");
    }
    assert_eq!(m.got(1).len(), 300, "every packet arrived");
    assert_eq!(m.got(0).len(), 299);
}

#[test]
fn wireguard_stops_sealing_after_180_s_without_a_new_handshake() {
    let mut m = Mesh::new(2, Kind::Wireguard);
    m.send(0, 1, 0);
    m.run(Duration::from_secs(1), Duration::from_millis(100));
    assert_eq!(m.got(1).len(), 1);
    // From now on no handshake message gets through.
    m.block_types = vec![1, 2];
    let mut last_data = m.now;
    for s in 1..200 {
        m.send(0, 1, s * 1000);
        m.run(Duration::from_secs(1), Duration::from_millis(250));
        if m.log.iter().any(|(k, t, at)| *k == 0 && *t == 4 && *at > last_data) {
            last_data = m.now;
        }
    }
    let first = m.log.iter().find(|(_, t, _)| *t == 4).unwrap().2;
    let sealed_for = last_data - first;
    assert!(sealed_for < REJECT_AFTER_TIME + Duration::from_secs(1), "sealed for {sealed_for:?}");
    assert!(sealed_for >= REJECT_AFTER_TIME - Duration::from_secs(2), "sealed for {sealed_for:?}");
}

#[test]
fn wireguard_follows_a_roaming_peer() {
    let mut m = Mesh::new(2, Kind::Wireguard);
    m.send(0, 1, 0);
    m.run(Duration::from_secs(1), Duration::from_millis(100));
    // Node 0 moves to a new address; node 1 answers it there.
    let moved = SocketAddr::new(IpAddr::from([198, 51, 100, 7]), 40000);
    m.nodes[0].dp.families[0].local = moved;
    m.send(0, 1, 1000);
    m.step(Duration::from_millis(100));
    assert_eq!(m.nodes[1].wg[0].as_ref().unwrap().lock().endpoint, Some(moved));
    m.send(1, 0, 2000);
    m.step(Duration::from_millis(100));
    m.step(Duration::from_millis(100));
    assert_eq!(m.got(0), vec![packet(1, 0, 2000)]);
    assert_eq!(m.sent_of(0, 1) + m.sent_of(1, 1), 1, "no new handshake");
}

/// wireguard-go's `tests/netns.sh` (its crypto-RP part): a datagram that
/// authenticates but whose inner source is outside the peer's allowed IPs
/// is dropped, and the peer's endpoint still moves to where it came from,
/// as wireguard-go and the kernel do (the endpoint follows the latest
/// authenticated datagram, before the allowed-IPs check).
#[test]
fn wireguard_follows_an_authenticated_datagram_its_allowed_ips_refuse() {
    let mut m = Mesh::new(2, Kind::Wireguard);
    m.send(0, 1, 0);
    m.run(Duration::from_secs(1), Duration::from_millis(100));
    assert_eq!(m.got(1), vec![packet(0, 1, 0)]);
    let moved = SocketAddr::new(IpAddr::from([198, 51, 100, 9]), 9997);
    m.nodes[0].dp.families[0].local = moved;
    // From a source node 1 does not route to node 0: not node 0's to send.
    let spoofed = weft_testkit::tcp_ipv4([10, 244, 9, 2], [10, 244, 2, 2], 200, 1000);
    m.nodes[0].dp.pod.push(spoofed);
    m.step(Duration::from_millis(100));
    assert_eq!(m.drops(1, DropCause::Engine(EngineDrop::WgAllowedIps)), 1, "refused by the allowed IPs");
    assert_eq!(m.got(1), vec![packet(0, 1, 0)], "nothing of it delivered");
    assert_eq!(m.nodes[1].wg[0].as_ref().unwrap().lock().endpoint, Some(moved), "the endpoint moved anyway");
    // And node 1's answers go there.
    m.send(1, 0, 2000);
    m.step(Duration::from_millis(100));
    m.step(Duration::from_millis(100));
    assert_eq!(m.got(0), vec![packet(1, 0, 2000)]);
}

#[test]
fn wireguard_resumes_after_a_peer_changes_its_key() {
    let mut m = Mesh::new(2, Kind::Wireguard);
    m.send(0, 1, 0);
    m.run(Duration::from_secs(1), Duration::from_millis(100));
    // Node 0 takes a new key; node 1 learns it (a new lease) as a new peer.
    let device = Arc::new(WgDevice::with_identity(|wall| Identity::new([77; 32], wall)));
    m.nodes[0].wg[1].as_ref().unwrap().set_private(&device);
    m.nodes[0].dp.backend = Backend::Wireguard(device.clone());
    m.nodes[0].device = Some(device.clone());
    let ep = SocketAddr::new(addr(0), WG_PORT);
    let d1 = m.nodes[1].device.clone().unwrap();
    m.nodes[1].wg[0] = Some(Arc::new(WgPeer::new(&d1, device.public_key(), None, None, 9, Some(ep))));
    m.publish(1, &[subnet(0), subnet(1)]);
    m.send(0, 1, 1000);
    m.run(Duration::from_secs(1), Duration::from_millis(100));
    assert_eq!(m.got(1), vec![packet(0, 1, 0), packet(0, 1, 1000)]);
}

#[test]
fn wireguard_under_a_handshake_flood_answers_with_cookies_and_still_connects() {
    let mut m = Mesh::new(2, Kind::Wireguard);
    // Node 1 is under load from the first handshake on.
    let loaded = Arc::new(WgDevice::with_identity(|wall| Identity::new([2; 32], wall).with_rate_limit(0)));
    m.nodes[1].wg[0].as_ref().unwrap().set_private(&loaded);
    m.nodes[1].dp.backend = Backend::Wireguard(loaded);
    m.send(0, 1, 0);
    m.run(Duration::from_secs(7), Duration::from_millis(100));
    assert!(m.sent_of(1, 3) >= 1, "a cookie reply");
    assert_eq!(m.drops(1, DropCause::Wg(WgError::Cookie)), m.sent_of(1, 3) as u64);
    assert_eq!(m.got(1), vec![packet(0, 1, 0)], "the retry with the cookie got through");
}

#[test]
fn wireguard_accepts_reordering_inside_the_replay_window_and_counts_replays_beyond_it() {
    use weft_tunnel::wireguard::REPLAY_WINDOW;
    let mut m = Mesh::new(2, Kind::Wireguard);
    m.send(0, 1, 0);
    m.run(Duration::from_secs(1), Duration::from_millis(100));
    assert_eq!(m.got(1).len(), 1, "the session is up");
    // Node 0 seals one packet; the link holds it back.
    let hold = |m: &mut Mesh, seq: u32| {
        m.send(0, 1, seq);
        let now = m.now;
        while m.nodes[0].dp.pod_to_underlay(now).unwrap() {}
        let mut sent = m.nodes[0].dp.families[0].take_sent();
        assert_eq!(sent.len(), 1, "one datagram sealed");
        sent.pop().unwrap()
    };
    let deliver = |m: &mut Mesh, d: &(SocketAddr, SocketAddr, Vec<u8>)| {
        let now = m.now;
        m.nodes[1].dp.families[0].inbox.push_back((d.0, d.2.clone()));
        while m.nodes[1].dp.underlay_to_pod(0, now).unwrap() {}
    };
    let flood = |m: &mut Mesh, from: u32, count: u32| {
        for s in from..from + count {
            m.send(0, 1, s);
        }
        m.step(Duration::from_millis(1));
    };
    // Held back behind exactly the window's worth of later packets: accepted.
    let early = hold(&mut m, 1);
    let window = REPLAY_WINDOW as u32;
    flood(&mut m, 10, window);
    let before = m.got(1).len();
    assert_eq!(before, 1 + window as usize, "the later packets all arrived");
    deliver(&mut m, &early);
    assert_eq!(m.got(1).len(), before + 1, "reordered by {window}: accepted");
    assert_eq!(m.got(1).last(), Some(&packet(0, 1, 1)));
    // The same datagram again: a replay, refused and counted.
    deliver(&mut m, &early);
    assert_eq!(m.got(1).len(), before + 1);
    assert_eq!(m.drops(1, DropCause::Wg(WgError::Replay)), 1);
    // Held back behind one more than the window: too old, refused and counted.
    let late = hold(&mut m, 2);
    flood(&mut m, 20_000, window + 1);
    let before = m.got(1).len();
    deliver(&mut m, &late);
    assert_eq!(m.got(1).len(), before, "reordered by {}: beyond the window", window + 1);
    assert_eq!(m.drops(1, DropCause::Wg(WgError::Replay)), 2);
    assert_eq!(m.drops(1, DropCause::Wg(WgError::Decrypt)), 0, "it authenticated: refused for its age alone");
}

#[test]
fn the_devices_own_link_chatter_is_counted_apart_from_packets_with_no_route() {
    let mut m = Mesh::new(2, Kind::Vxlan);
    // An MLD report as the kernel sends it when the TUN comes up: from ::
    // to ff02::16.
    let mut mld = vec![0u8; 48];
    mld[0] = 0x60;
    mld[4..6].copy_from_slice(&8u16.to_be_bytes());
    (mld[6], mld[7]) = (58, 1);
    mld[24..40].copy_from_slice(&"ff02::16".parse::<std::net::Ipv6Addr>().unwrap().octets());
    m.nodes[0].dp.pod.push(mld);
    // And a packet for a pod subnet no node has.
    m.nodes[0].dp.pod.push(weft_testkit::tcp_ipv4([10, 244, 1, 2], [10, 244, 77, 2], 200, 1));
    m.step(Duration::from_millis(1));
    assert_eq!(m.drops(0, DropCause::Engine(EngineDrop::LinkLocal)), 1);
    assert_eq!(m.drops(0, DropCause::Engine(EngineDrop::NoRoute)), 1);
    assert!(m.got(1).is_empty());
}
