//! The kernel Flannel capture in tests/fixtures: every VXLAN packet a kernel
//! node sent decapsulates to its inner IPv4 packet unchanged, and encapsulating
//! that packet again gives the same datagram but for the outer source port
//! (a hash of the flow) and the checksum that covers it.

use std::net::{IpAddr, Ipv4Addr};

use weft_tunnel::checksum;
use weft_tunnel::vxlan::{Peers, Vtep, Vxlan, DEFAULT_PORT, HEADROOM, UDP_HEADER_LEN};

/// The two kernel nodes of the capture (tests/fixtures/README.md).
struct CaptureNodes;

const NODES: [(Ipv4Addr, [u8; 6], [u8; 3]); 2] = [
    (Ipv4Addr::new(192, 168, 77, 1), [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x00], [10, 244, 1]),
    (Ipv4Addr::new(192, 168, 77, 2), [0x0a, 0x58, 0x0a, 0xf4, 0x02, 0x00], [10, 244, 2]),
];

impl Peers for CaptureNodes {
    fn peer_by_underlay(&self, addr: IpAddr) -> Option<usize> {
        NODES.iter().position(|(ip, _, _)| IpAddr::V4(*ip) == addr)
    }
    fn peer_owns(&self, peer: usize, inner: IpAddr) -> bool {
        matches!(inner, IpAddr::V4(a) if a.octets()[..3] == NODES[peer].2)
    }
}

#[test]
fn kernel_flannel_capture_round_trips() {
    let pcap = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kernel-vxlan-8472.pcap")).unwrap();
    let (mut seen, mut partial) = (0, 0);
    for frame in weft_lab::pcap_frames(&pcap).unwrap() {
        // Outer Ethernet, IPv4 without options, UDP to 8472.
        assert_eq!(&frame[12..14], &[0x08, 0x00]);
        let ip = &frame[14..];
        assert_eq!(ip[0], 0x45);
        assert_eq!(ip[9], 17);
        let src = IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap());
        let dst = IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap());
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        let udp = &ip[20..total];
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), DEFAULT_PORT);
        let (sender, receiver) = if src == IpAddr::V4(NODES[0].0) { (0, 1) } else { (1, 0) };

        let rx = Vxlan::new(1, DEFAULT_PORT, Vtep { addr: dst, mac: NODES[receiver].1 });
        let d = rx.decapsulate(src, &udp[UDP_HEADER_LEN..], &CaptureNodes).expect("a kernel node's packet is accepted");
        assert_eq!(d.peer, sender);
        let inner = &udp[UDP_HEADER_LEN..][d.inner.clone()];
        // The inner packet is exactly what follows the inner Ethernet header.
        let inner_ip = &udp[UDP_HEADER_LEN + 8 + 14..];
        assert_eq!(inner, &inner_ip[..u16::from_be_bytes([inner_ip[2], inner_ip[3]]) as usize]);

        let tx = Vxlan::new(1, DEFAULT_PORT, Vtep { addr: src, mac: NODES[sender].1 });
        let mut buf = vec![0u8; HEADROOM + inner.len()];
        buf[HEADROOM..].copy_from_slice(inner);
        let len = tx.encapsulate(&Vtep { addr: dst, mac: NODES[receiver].1 }, &mut buf, inner.len()).unwrap();
        let ours = &buf[..len];
        assert_eq!(ours.len(), udp.len());
        assert_eq!(&ours[2..6], &udp[2..6], "destination port and length");
        assert_eq!(&ours[8..], &udp[8..], "VXLAN header, inner Ethernet and packet");
        assert!(checksum::verify_udp(src, dst, ours), "our UDP checksum verifies");
        // Captured on a veth, before any NIC: the kernel's outer checksum is
        // either still its offload seed (the folded pseudo-header sum), or
        // was computed with local checksum offload over the inner packet as
        // it will be once the inner (still partial) TCP checksum is done.
        let seed = checksum::fold(checksum::pseudo_header(src, dst, 17, udp.len() as u32).unwrap());
        let mut completed = udp.to_vec();
        let inner_range = UDP_HEADER_LEN + d.inner.start..UDP_HEADER_LEN + d.inner.end;
        let was_partial = checksum::complete_partial(&mut completed[inner_range]);
        let theirs = u16::from_be_bytes([udp[6], udp[7]]);
        assert!(theirs == seed || checksum::verify_udp(src, dst, &completed), "kernel checksum {theirs:#06x}");
        partial += was_partial as usize;
        seen += 1;
    }
    assert!(seen > 100, "only {seen} packets in the capture");
    println!("{seen} packets, {partial} with a partial inner checksum");
}
