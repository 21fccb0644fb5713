//! Arbitrary UDP payloads from known and unknown nodes through
//! `Vxlan::decapsulate`.
//!
//! Input: one selector byte, three bytes of VNI, then the UDP payload (VXLAN
//! header onwards). Selector bit 0 picks the receiver's underlay family,
//! bits 1-2 the outer source (two known nodes of either family, or an
//! unknown one). Bits 3 and 4 ask for fix-ups that libFuzzer would take long
//! to find by itself: bit 3 writes a valid VXLAN header (I flag, our VNI), our
//! VTEP MAC and the EtherType matching the inner version nibble; bit 4 writes
//! an inner source address from the outer source's pod subnets; bit 5 writes
//! into a TCP or UDP checksum field the seed an offloading sender leaves
//! there (the folded pseudo-header sum), so that `complete_partial` has work.
//! With these bits clear the payload goes through exactly as given.
//!
//! On acceptance: the inner range lies in the payload right after the VXLAN
//! and Ethernet headers and is exactly the inner IP packet's length; the
//! inner source belongs to the sender; encapsulating the inner packet again
//! from the sender's VTEP gives a datagram whose UDP checksum verifies and
//! which decapsulates to the same bytes; `complete_partial` touches nothing
//! but the transport checksum field, leaves a verifying checksum when it
//! writes, and a second call changes nothing.
//!
//! The raw payload is also encapsulated as if it were an inner packet from
//! the TUN: anything whose first nibble is not 4 or 6 is refused as not IP;
//! anything else gives a datagram of exactly `HEADROOM` more bytes, with
//! the RFC 7348 header, the right MACs and EtherType, a source port in the
//! ephemeral range, a verifying checksum and the inner bytes untouched.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use weft_tunnel::vxlan::{Decapsulated, Peers, Vtep, Vxlan, DEFAULT_PORT, HEADROOM, UDP_HEADER_LEN};
use weft_tunnel::{checksum, flow};
use weft_tunnel::{DropReason, EncapError};

/// VXLAN 8 + Ethernet 14: where the inner packet starts in the payload.
const INNER_START: usize = 22;

const MAC_LOCAL: [u8; 6] = [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x00];

/// Two known nodes, one with an IPv4 and one with an IPv6 underlay, each
/// owning one IPv4 /24 and one IPv6 /64 of pod addresses.
struct Node {
    vtep: Vtep,
    pods_v4: [u8; 3],
    pods_v6: [u8; 8],
}

fn nodes() -> [Node; 2] {
    [
        Node {
            vtep: Vtep { addr: IpAddr::V4(Ipv4Addr::new(192, 168, 77, 2)), mac: [0x0a, 0x58, 0x0a, 0xf4, 0x02, 0x00] },
            pods_v4: [10, 244, 2],
            pods_v6: [0xfd, 0x10, 0x02, 0x44, 0, 0, 0, 2],
        },
        Node {
            vtep: Vtep {
                addr: IpAddr::V6(Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 3)),
                mac: [0x0a, 0x58, 0x0a, 0xf4, 0x03, 0x00],
            },
            pods_v4: [10, 244, 3],
            pods_v6: [0xfd, 0x10, 0x02, 0x44, 0, 0, 0, 3],
        },
    ]
}

struct Known([Node; 2]);

impl Peers for Known {
    fn peer_by_underlay(&self, addr: IpAddr) -> Option<usize> {
        self.0.iter().position(|n| n.vtep.addr == addr)
    }

    fn peer_owns(&self, peer: usize, inner_src: IpAddr) -> bool {
        let n = &self.0[peer];
        match inner_src {
            IpAddr::V4(a) => a.octets()[..3] == n.pods_v4,
            IpAddr::V6(a) => a.octets()[..8] == n.pods_v6,
        }
    }
}

/// Offset and length of the TCP or UDP header's checksum field within an IP
/// packet, if `complete_partial` might touch it.
fn transport_checksum_field(p: &[u8]) -> Option<(usize, usize, u8)> {
    let (l4_start, proto) = if p[0] >> 4 == 4 { (((p[0] & 0x0f) as usize) * 4, p[9]) } else { (40, p[6]) };
    let field = match proto {
        6 => 16,
        17 => 6,
        _ => return None,
    };
    Some((l4_start, field, proto))
}

fn check_complete_partial(inner: &[u8]) {
    let mut once = inner.to_vec();
    let wrote = checksum::complete_partial(&mut once);
    assert_eq!(once.len(), inner.len());
    let changed: Vec<usize> = (0..inner.len()).filter(|&i| once[i] != inner[i]).collect();
    if !wrote {
        assert!(changed.is_empty(), "complete_partial changed bytes but said it did not");
    } else {
        let (l4, field, proto) = transport_checksum_field(inner).expect("wrote into a packet that is not TCP or UDP");
        let at = l4 + field;
        assert!(
            changed.iter().all(|&i| i == at || i == at + 1),
            "complete_partial changed bytes outside the checksum field: {changed:?}"
        );
        // The written checksum verifies over the pseudo-header.
        let (src, dst) = addresses(inner);
        let seg = &once[l4..];
        let pseudo = checksum::pseudo_header(src, dst, proto, seg.len() as u32).unwrap();
        assert_eq!(checksum::fold(checksum::sum(pseudo, seg)), 0xffff, "completed checksum does not verify");
    }
    // Idempotent: a second call may still match the seed (a complete
    // checksum can equal it by chance) but then rewrites the same value.
    let mut twice = once.clone();
    checksum::complete_partial(&mut twice);
    assert_eq!(twice, once, "a second complete_partial changed the packet");
}

/// Writes what selector bits 3 and 4 ask for into `p`, where it fits.
fn fix_up(sel: u8, p: &mut [u8], vni: u32, pods: Option<&Node>) {
    if sel & 0x08 != 0 && p.len() >= INNER_START {
        p[0] |= 0x08;
        p[4..7].copy_from_slice(&vni.to_be_bytes()[1..]);
        p[8..14].copy_from_slice(&MAC_LOCAL);
        let ethertype: [u8; 2] = match p.get(INNER_START).map(|b| b >> 4) {
            Some(6) => [0x86, 0xdd],
            _ => [0x08, 0x00],
        };
        p[20..22].copy_from_slice(&ethertype);
    }
    if let (true, Some(node)) = (sel & 0x10 != 0, pods) {
        let start = INNER_START.min(p.len());
        let inner = &mut p[start..];
        match inner.first().map(|b| b >> 4) {
            Some(4) if inner.len() >= 20 => inner[12..15].copy_from_slice(&node.pods_v4),
            Some(6) if inner.len() >= 40 => inner[8..16].copy_from_slice(&node.pods_v6),
            _ => {}
        }
    }
    if sel & 0x20 != 0 {
        let start = INNER_START.min(p.len());
        seed_partial_checksum(&mut p[start..]);
    }
}

/// Writes the checksum seed of an offloading sender into the transport
/// header of the IP packet at the start of `ip`, where it fits.
fn seed_partial_checksum(ip: &mut [u8]) {
    let Some(&first) = ip.first() else { return };
    let (l4_start, total) = match first >> 4 {
        4 if ip.len() >= 20 => (((first & 0x0f) as usize) * 4, u16::from_be_bytes([ip[2], ip[3]]) as usize),
        6 if ip.len() >= 40 => (40, 40 + u16::from_be_bytes([ip[4], ip[5]]) as usize),
        _ => return,
    };
    if l4_start > total || total > ip.len() {
        return;
    }
    let Some((l4, field, proto)) = transport_checksum_field(ip) else {
        return;
    };
    if total - l4 < field + 2 {
        return;
    }
    let (src, dst) = addresses(ip);
    let seed = checksum::fold(checksum::pseudo_header(src, dst, proto, (total - l4) as u32).unwrap());
    ip[l4 + field..l4 + field + 2].copy_from_slice(&seed.to_be_bytes());
}

/// Source and destination of an IP packet whose fixed header is there.
fn addresses(p: &[u8]) -> (IpAddr, IpAddr) {
    if p[0] >> 4 == 4 {
        (IpAddr::from(<[u8; 4]>::try_from(&p[12..16]).unwrap()), IpAddr::from(<[u8; 4]>::try_from(&p[16..20]).unwrap()))
    } else {
        (
            IpAddr::from(<[u8; 16]>::try_from(&p[8..24]).unwrap()),
            IpAddr::from(<[u8; 16]>::try_from(&p[24..40]).unwrap()),
        )
    }
}

/// Encapsulates arbitrary bytes as an inner packet from `local` to the node
/// of the same underlay family, and checks the datagram's layout.
fn check_encapsulate_any(vni: u32, local: Vtep, peers: &Known, inner: &[u8]) {
    let remote = peers.0.iter().find(|n| n.vtep.addr.is_ipv4() == local.addr.is_ipv4()).unwrap().vtep;
    let tx = Vxlan::new(vni, DEFAULT_PORT, local);
    let mut buf = vec![0u8; HEADROOM + inner.len()];
    buf[HEADROOM..].copy_from_slice(inner);
    let ethertype: [u8; 2] = match inner.first().map(|b| b >> 4) {
        Some(4) => [0x08, 0x00],
        Some(6) => [0x86, 0xdd],
        _ => {
            assert_eq!(tx.encapsulate(&remote, &mut buf, inner.len()), Err(EncapError::NotIp));
            return;
        }
    };
    let len = match tx.encapsulate(&remote, &mut buf, inner.len()) {
        Ok(len) => len,
        Err(EncapError::TooLarge) if HEADROOM + inner.len() > u16::MAX as usize => return,
        Err(e) => panic!("encapsulation of {} inner bytes failed: {e:?}", inner.len()),
    };
    assert_eq!(len, HEADROOM + inner.len());
    let d = &buf[..len];
    let sport = u16::from_be_bytes([d[0], d[1]]);
    assert!((flow::SRC_PORT_MIN..=flow::SRC_PORT_MAX).contains(&sport), "source port {sport}");
    assert_eq!(u16::from_be_bytes([d[2], d[3]]), DEFAULT_PORT);
    assert_eq!(u16::from_be_bytes([d[4], d[5]]) as usize, len);
    let v = vni.to_be_bytes();
    assert_eq!(d[8..16], [0x08, 0, 0, 0, v[1], v[2], v[3], 0], "VXLAN header");
    assert_eq!(d[16..22], remote.mac);
    assert_eq!(d[22..28], local.mac);
    assert_eq!(d[28..30], ethertype);
    assert_eq!(&d[HEADROOM..], inner, "encapsulation touched the inner packet");
    assert!(checksum::verify_udp(local.addr, remote.addr, d), "UDP checksum does not verify");
}

/// Runs one input through the invariants above; panics on a broken one.
pub fn run(data: &[u8]) {
    let [sel, v0, v1, v2, ref raw @ ..] = *data else {
        return;
    };
    let peers = Known(nodes());
    let local_addr = if sel & 1 == 0 {
        IpAddr::V4(Ipv4Addr::new(192, 168, 77, 1))
    } else {
        IpAddr::V6(Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1))
    };
    let local = Vtep { addr: local_addr, mac: MAC_LOCAL };
    let (outer_src, known) = match (sel >> 1) & 3 {
        0 => (peers.0[0].vtep.addr, Some(0)),
        1 => (peers.0[1].vtep.addr, Some(1)),
        2 => (IpAddr::V4(Ipv4Addr::new(192, 168, 77, 9)), None),
        _ => (IpAddr::V6(Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 9)), None),
    };
    let vni = u32::from_be_bytes([0, v0, v1, v2]);
    let rx = Vxlan::new(vni, DEFAULT_PORT, local);
    let mut payload = raw.to_vec();
    fix_up(sel, &mut payload, vni, known.map(|i| &peers.0[i]));
    let payload = &payload[..];
    check_encapsulate_any(vni, local, &peers, raw);

    let d = match rx.decapsulate(outer_src, payload, &peers) {
        Ok(d) => d,
        Err(reason) => {
            // An unknown node's packet is never blamed on the inner source.
            if known.is_none() {
                assert_ne!(reason, DropReason::SpoofedSource);
            }
            return;
        }
    };

    // Header checks the acceptance implies.
    let peer = known.expect("accepted a packet from an unknown node");
    assert_eq!(d.peer, peer);
    assert_ne!(payload[0] & 0x08, 0, "accepted without the I flag");
    assert_eq!(u32::from_be_bytes([0, payload[4], payload[5], payload[6]]), vni);
    assert_eq!(payload[8..14], MAC_LOCAL);

    // Length accounting: the inner packet follows the headers, lies in the
    // payload and is exactly as long as its IP header says.
    assert_eq!(d.inner.start, INNER_START);
    assert!(d.inner.end <= payload.len());
    let inner = &payload[d.inner.clone()];
    let ethertype = u16::from_be_bytes([payload[20], payload[21]]);
    let ip_len = match (ethertype, inner[0] >> 4) {
        (0x0800, 4) => {
            assert!(inner.len() >= 20);
            u16::from_be_bytes([inner[2], inner[3]]) as usize
        }
        (0x86dd, 6) => {
            assert!(inner.len() >= 40);
            40 + u16::from_be_bytes([inner[4], inner[5]]) as usize
        }
        other => panic!("accepted EtherType/version {other:?}"),
    };
    assert_eq!(inner.len(), ip_len);
    assert!(peers.peer_owns(peer, addresses(inner).0));

    // Re-encapsulated by the sender, the inner packet comes back unchanged.
    let sender = peers.0[peer].vtep;
    let tx = Vxlan::new(vni, DEFAULT_PORT, sender);
    let mut buf = vec![0u8; HEADROOM + inner.len()];
    buf[HEADROOM..].copy_from_slice(inner);
    let same_family = sender.addr.is_ipv4() == local.addr.is_ipv4();
    match tx.encapsulate(&local, &mut buf, inner.len()) {
        Ok(len) => {
            assert!(same_family, "encapsulated across address families");
            assert_eq!(len, HEADROOM + inner.len());
            let dgram = &buf[..len];
            assert_eq!(u16::from_be_bytes([dgram[4], dgram[5]]) as usize, len);
            assert_eq!(u16::from_be_bytes([dgram[2], dgram[3]]), DEFAULT_PORT);
            assert!(
                checksum::verify_udp(sender.addr, local.addr, dgram),
                "UDP checksum of the re-encapsulated datagram does not verify"
            );
            let again =
                rx.decapsulate(sender.addr, &dgram[UDP_HEADER_LEN..], &peers).expect("re-encapsulated packet refused");
            assert_eq!(again, Decapsulated { peer, inner: INNER_START..INNER_START + inner.len() });
            assert_eq!(&dgram[UDP_HEADER_LEN..][again.inner], inner);
        }
        Err(EncapError::FamilyMismatch) => assert!(!same_family),
        Err(EncapError::TooLarge) => assert!(HEADROOM + inner.len() > u16::MAX as usize),
        Err(e) => panic!("re-encapsulation of an accepted packet failed: {e:?}"),
    }

    check_complete_partial(inner);
}
