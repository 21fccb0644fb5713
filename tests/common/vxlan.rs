//! Hand-made VXLAN datagrams for the spoofing tests, and the addresses
//! they need.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};

use weft_lab::{self as lab, netns, Node};
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
