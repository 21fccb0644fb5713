//! Hand-made VXLAN datagrams for the spoofing tests, and the addresses
//! they need.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};

use std::time::Duration;

use weft_lab::{self as lab, netns, Lab, Node};
use weft_tunnel::checksum;
use weft_tunnel::vxlan::{Vtep, Vxlan, DEFAULT_PORT, HEADROOM, UDP_HEADER_LEN};

/// Builds a VXLAN payload (UDP payload: VXLAN header onwards) carrying an
/// IPv4 UDP packet `inner_src -> dst:port` with `marker` as payload.
pub fn crafted(
    vni: u32,
    from: Vtep,
    to: Vtep,
    inner_src: Ipv4Addr,
    dst: Ipv4Addr,
    port: u16,
    marker: &[u8],
) -> Vec<u8> {
    let total = 20 + 8 + marker.len();
    let mut ip = vec![0u8; total];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&inner_src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = !checksum::fold(checksum::sum(0, &ip[..20]));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip[20..22].copy_from_slice(&40000u16.to_be_bytes());
    ip[22..24].copy_from_slice(&port.to_be_bytes());
    ip[24..26].copy_from_slice(&((8 + marker.len()) as u16).to_be_bytes());
    ip[28..].copy_from_slice(marker); // UDP checksum 0: none, allowed on IPv4
    let mut buf = vec![0u8; HEADROOM + total];
    buf[HEADROOM..].copy_from_slice(&ip);
    let len = Vxlan::new(vni, DEFAULT_PORT, from).encapsulate(&to, &mut buf, total).unwrap();
    buf[UDP_HEADER_LEN..len].to_vec()
}

/// A pod's IPv4 address (these labs are IPv4).
pub fn v4(p: &lab::Pod) -> Ipv4Addr {
    match p.ip(false) {
        Some(IpAddr::V4(a)) => a,
        other => panic!("{} has no IPv4 address: {other:?}", p.ns),
    }
}

/// A node's IPv4 underlay address.
pub fn node_ip(n: &Node) -> Ipv4Addr {
    n.ip4.expect("an IPv4 underlay")
}

pub fn vtep(n: &Node) -> Vtep {
    Vtep { addr: IpAddr::V4(node_ip(n)), mac: n.mac }
}

/// Sends `payload` from `src` (inside namespace `ns`) to node `to`'s VXLAN port.
pub fn send_from(ns: &str, src: Ipv4Addr, to: &Node, payload: Vec<u8>) {
    let dst = SocketAddr::from((node_ip(to), DEFAULT_PORT));
    netns::in_netns(ns, move || {
        let s = UdpSocket::bind((src, 0)).expect("bind sender");
        s.send_to(&payload, dst).expect("send");
    })
    .unwrap();
}

/// Collects the UDP payloads that reach `port` in namespace `ns` until 1.5 s
/// pass without one.
pub fn collect_udp(ns: &str, port: u16) -> std::thread::JoinHandle<Vec<String>> {
    let h = netns::spawn_in_netns(ns, move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = s.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        got
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    h
}

/// The spoofing cases against node 1 of a three-node lab, to UDP port 7777
/// of its first pod: each with the userspace engine's drop reason, the
/// namespace and address to send from, and the datagram. The underlay
/// namespace plays an attacker at 192.168.77.99, an address no lease has
/// (added here).
pub fn spoof_cases(lab: &Lab) -> Vec<(&'static str, String, Ipv4Addr, Vec<u8>)> {
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let pod = v4(&n1.pods[0]);
    let ul = format!("{}-ul", lab.opts.name);
    let attacker = Ipv4Addr::new(192, 168, 77, 99);
    netns::ip(&["-n", &ul, "addr", "add", "192.168.77.99/24", "dev", "br0"]).unwrap();
    let n2_pod = v4(&n2.pods[0]);
    let n3_pod = v4(&lab.nodes[2].pods[0]);
    let wrong_mac = Vtep { addr: vtep(n1).addr, mac: [0x0a, 0x58, 0x0a, 0xf4, 0x63, 0x00] };
    let from_n2 = |vni, to, src, marker: &[u8]| crafted(vni, vtep(n2), to, src, pod, 7777, marker);
    vec![
        ("unknown_source", ul, attacker, from_n2(1, vtep(n1), n2_pod, b"from-unknown-node")),
        ("wrong_vni", n2.ns.clone(), node_ip(n2), from_n2(2, vtep(n1), n2_pod, b"wrong-vni")),
        ("spoofed_source", n2.ns.clone(), node_ip(n2), from_n2(1, vtep(n1), n3_pod, b"spoofed-inner")),
        ("wrong_dst_mac", n2.ns.clone(), node_ip(n2), from_n2(1, wrong_mac, n2_pod, b"wrong-mac")),
    ]
}

/// The control of [`spoof_cases`]: node 2 sends from its own pod's address,
/// payload `legitimate`.
pub fn send_legitimate(lab: &Lab) {
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let payload = crafted(1, vtep(n2), vtep(n1), v4(&n2.pods[0]), v4(&n1.pods[0]), 7777, b"legitimate");
    send_from(&n2.ns, node_ip(n2), n1, payload);
}
