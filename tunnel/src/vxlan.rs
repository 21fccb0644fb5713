//! VXLAN (RFC 7348) as Flannel's `vxlan` backend speaks it.
//!
//! ```text
//!  outer IP (written by the kernel) | UDP 8 | VXLAN 8 | Ethernet 14 | inner IP packet
//!                                   |<------------- HEADROOM ------>|
//! ```
//!
//! Encapsulation writes the UDP, VXLAN and Ethernet headers into the
//! `HEADROOM` bytes in front of an inner packet, without moving it: the
//! inner frame is addressed to the remote node's VTEP MAC, the UDP source
//! port is a hash of the inner flow and the UDP checksum is computed here,
//! never left to a device offload. Decapsulation takes a UDP payload (the
//! VXLAN header onwards) and refuses, with a [`DropReason`], anything short or
//! malformed, without the I flag, for another VNI or VTEP MAC, from an
//! unknown node, or whose inner source address is not in the sending node's
//! pod subnets: VXLAN has no authentication, so this check is what keeps
//! spoofed packets away from pods. ARP and other non-IP inner frames are
//! refused too: Flannel programs static neighbour entries, so none are sent.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;

use crate::{checksum, flow, DropReason, EncapError};

/// Length of a UDP header.
pub const UDP_HEADER_LEN: usize = 8;
/// Length of the VXLAN header.
pub const VXLAN_HEADER_LEN: usize = 8;
/// Length of an untagged Ethernet header.
pub const ETHERNET_HEADER_LEN: usize = 14;
/// Bytes written in front of an inner IP packet on encapsulation.
pub const HEADROOM: usize = UDP_HEADER_LEN + VXLAN_HEADER_LEN + ETHERNET_HEADER_LEN;
/// Total per-packet overhead over an IPv4 underlay (Flannel's MTU - 50).
pub const OVERHEAD_V4: usize = 20 + HEADROOM;
/// Total per-packet overhead over an IPv6 underlay (Flannel's MTU - 70).
pub const OVERHEAD_V6: usize = 40 + HEADROOM;
/// Flannel's default UDP destination port (4789 is the IANA one).
pub const DEFAULT_PORT: u16 = 8472;
/// Flannel's default VNI.
pub const DEFAULT_VNI: u32 = 1;
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = 0x00ff_ffff;

/// The I flag: the VNI field is valid.
const FLAG_I: u8 = 0x08;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;

/// A VTEP: where a node's VXLAN traffic goes, and the MAC it answers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vtep {
    /// The node's underlay address (its lease's `PublicIP`).
    pub addr: IpAddr,
    /// The node's `VtepMAC`.
    pub mac: [u8; 6],
}

/// The known nodes, as decapsulation needs them.
pub trait Peers {
    /// Index of the node whose underlay address is `addr`.
    fn peer_by_underlay(&self, addr: IpAddr) -> Option<usize>;
    /// Whether node `peer` owns the pod address `inner_src`.
    fn peer_owns(&self, peer: usize, inner_src: IpAddr) -> bool;
}

/// A packet that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decapsulated {
    /// Index of the sending node, as [`Peers::peer_by_underlay`] gave it.
    pub peer: usize,
    /// Where the inner IP packet lies in the datagram (Ethernet padding cut).
    pub inner: Range<usize>,
}

/// One node's VXLAN endpoint: its VNI, port and VTEP.
#[derive(Debug, Clone)]
pub struct Vxlan {
    vni: u32,
    port: u16,
    local: Vtep,
}

impl Vxlan {
    /// A VXLAN endpoint. `vni` must be at most [`MAX_VNI`] (checked by config).
    pub fn new(vni: u32, port: u16, local: Vtep) -> Self {
        Vxlan { vni: vni & MAX_VNI, port, local }
    }

    /// This endpoint's VTEP.
    pub fn local(&self) -> Vtep {
        self.local
    }

    /// Encapsulates the inner IP packet at `buf[HEADROOM..HEADROOM + inner_len]`
    /// for `remote`, writing the UDP, VXLAN and Ethernet headers into
    /// `buf[..HEADROOM]`. Returns the UDP datagram length; the datagram is
    /// `buf[..len]`, to be sent in an IP packet from the local VTEP address
    /// to `remote.addr`.
    #[must_use = "the datagram length says what to send"]
    pub fn encapsulate(&self, remote: &Vtep, buf: &mut [u8], inner_len: usize) -> Result<usize, EncapError> {
        self.encapsulate_with(remote, buf, inner_len, true)
    }

    /// [`Vxlan::encapsulate`], leaving the UDP checksum zero when
    /// `udp_checksum` is false: for a sender whose UDP socket writes its own
    /// UDP header and checksum (or offloads it), so that only the source
    /// and destination ports written here matter.
    #[must_use = "the datagram length says what to send"]
    pub fn encapsulate_with(
        &self,
        remote: &Vtep,
        buf: &mut [u8],
        inner_len: usize,
        udp_checksum: bool,
    ) -> Result<usize, EncapError> {
        let len = HEADROOM + inner_len;
        if buf.len() < len {
            return Err(EncapError::NoHeadroom);
        }
        if len > u16::MAX as usize {
            return Err(EncapError::TooLarge);
        }
        let ethertype = match buf.get(HEADROOM).map(|b| b >> 4) {
            Some(4) => ETHERTYPE_IPV4,
            Some(6) => ETHERTYPE_IPV6,
            _ => return Err(EncapError::NotIp),
        };
        let src_port = flow::src_port(flow::hash(&buf[HEADROOM..len]));
        let (udp, rest) = buf[..len].split_at_mut(UDP_HEADER_LEN);
        udp[0..2].copy_from_slice(&src_port.to_be_bytes());
        udp[2..4].copy_from_slice(&self.port.to_be_bytes());
        udp[4..6].copy_from_slice(&(len as u16).to_be_bytes());
        udp[6..8].copy_from_slice(&[0, 0]);
        let (vx, eth) = rest.split_at_mut(VXLAN_HEADER_LEN);
        vx.copy_from_slice(&[FLAG_I, 0, 0, 0, 0, 0, 0, 0]);
        vx[4..7].copy_from_slice(&self.vni.to_be_bytes()[1..4]);
        eth[0..6].copy_from_slice(&remote.mac);
        eth[6..12].copy_from_slice(&self.local.mac);
        eth[12..14].copy_from_slice(&ethertype.to_be_bytes());
        if remote.addr.is_ipv4() != self.local.addr.is_ipv4() {
            return Err(EncapError::FamilyMismatch);
        }
        if udp_checksum {
            let csum = checksum::udp(self.local.addr, remote.addr, &buf[..len]).ok_or(EncapError::FamilyMismatch)?;
            buf[6..8].copy_from_slice(&csum.to_be_bytes());
        }
        Ok(len)
    }

    /// Checks a received UDP payload (VXLAN header onwards) from `outer_src`
    /// and locates its inner IP packet.
    pub fn decapsulate<P: Peers + ?Sized>(
        &self,
        outer_src: IpAddr,
        payload: &[u8],
        peers: &P,
    ) -> Result<Decapsulated, DropReason> {
        let start = VXLAN_HEADER_LEN + ETHERNET_HEADER_LEN;
        if payload.len() < start {
            return Err(DropReason::Short);
        }
        if payload[0] & FLAG_I == 0 {
            return Err(DropReason::FlagMissing);
        }
        let vni = u32::from_be_bytes([0, payload[4], payload[5], payload[6]]);
        if vni != self.vni {
            return Err(DropReason::WrongVni);
        }
        let eth = &payload[VXLAN_HEADER_LEN..start];
        if eth[0..6] != self.local.mac {
            return Err(DropReason::WrongDstMac);
        }
        let ethertype = u16::from_be_bytes([eth[12], eth[13]]);
        let (inner_len, inner_src) = match ethertype {
            ETHERTYPE_IPV4 => parse_ipv4(&payload[start..])?,
            ETHERTYPE_IPV6 => parse_ipv6(&payload[start..])?,
            _ => return Err(DropReason::NotIp),
        };
        let peer = peers.peer_by_underlay(outer_src).ok_or(DropReason::UnknownSource)?;
        if !peers.peer_owns(peer, inner_src) {
            return Err(DropReason::SpoofedSource);
        }
        Ok(Decapsulated { peer, inner: start..start + inner_len })
    }
}

/// Length and source of an IPv4 packet at the start of `p`.
fn parse_ipv4(p: &[u8]) -> Result<(usize, IpAddr), DropReason> {
    if p.len() < 20 {
        return Err(DropReason::Short);
    }
    let ihl = ((p[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([p[2], p[3]]) as usize;
    if p[0] >> 4 != 4 || ihl < 20 || total < ihl || total > p.len() {
        return Err(DropReason::MalformedInner);
    }
    Ok((total, IpAddr::V4(Ipv4Addr::new(p[12], p[13], p[14], p[15]))))
}

/// Length and source of an IPv6 packet at the start of `p`.
fn parse_ipv6(p: &[u8]) -> Result<(usize, IpAddr), DropReason> {
    if p.len() < 40 {
        return Err(DropReason::Short);
    }
    let total = 40 + u16::from_be_bytes([p[4], p[5]]) as usize;
    if p[0] >> 4 != 6 || total > p.len() {
        return Err(DropReason::MalformedInner);
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&p[8..24]);
    Ok((total, IpAddr::V6(Ipv6Addr::from(src))))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC1: [u8; 6] = [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x00];
    const MAC2: [u8; 6] = [0x0a, 0x58, 0x0a, 0xf4, 0x02, 0x00];

    fn node(last: u8, mac: [u8; 6]) -> Vtep {
        Vtep { addr: IpAddr::V4(Ipv4Addr::new(192, 168, 77, last)), mac }
    }

    /// One peer: node 2, owning 10.244.2.0/24.
    struct OnePeer;
    impl Peers for OnePeer {
        fn peer_by_underlay(&self, addr: IpAddr) -> Option<usize> {
            (addr == node(2, MAC2).addr).then_some(0)
        }
        fn peer_owns(&self, _: usize, inner: IpAddr) -> bool {
            matches!(inner, IpAddr::V4(a) if a.octets()[..3] == [10, 244, 2])
        }
    }

    /// An ICMP echo request 10.244.2.2 -> 10.244.1.2 with a 4-byte payload.
    fn icmp(src: [u8; 4]) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 32, 0x12, 0x34, 0x40, 0, 64, 1, 0, 0, //
            src[0], src[1], src[2], src[3], 10, 244, 1, 2, //
            8, 0, 0, 0, 0, 1, 0, 1, b'w', b'e', b'f', b't',
        ];
        let c = !checksum::fold(checksum::sum(0, &p[..20]));
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn encap_from_node2(inner: &[u8]) -> Vec<u8> {
        let tx = Vxlan::new(1, DEFAULT_PORT, node(2, MAC2));
        let mut buf = vec![0u8; HEADROOM + inner.len()];
        buf[HEADROOM..].copy_from_slice(inner);
        let len = tx.encapsulate(&node(1, MAC1), &mut buf, inner.len()).unwrap();
        buf.truncate(len);
        buf
    }

    #[test]
    fn test_emit_rfc7348_layout() {
        let inner = icmp([10, 244, 2, 2]);
        let d = encap_from_node2(&inner);
        // RFC 7348 section 5: flags 0x08, 24 reserved bits, VNI, 8 reserved bits.
        assert_eq!(&d[8..16], &[0x08, 0, 0, 0, 0, 0, 0x01, 0]);
        assert_eq!(&d[2..4], &8472u16.to_be_bytes(), "destination port");
        assert_eq!(u16::from_be_bytes([d[4], d[5]]) as usize, d.len(), "UDP length");
        let sport = u16::from_be_bytes([d[0], d[1]]);
        assert!((flow::SRC_PORT_MIN..=flow::SRC_PORT_MAX).contains(&sport));
        assert_eq!(&d[16..22], &MAC1, "inner destination MAC is the remote VTEP");
        assert_eq!(&d[22..28], &MAC2, "inner source MAC is ours");
        assert_eq!(&d[28..30], &[0x08, 0x00]);
        assert_eq!(&d[30..], &inner[..]);
        assert!(checksum::verify_udp(node(2, MAC2).addr, node(1, MAC1).addr, &d));
    }

    #[test]
    fn test_parse_known_bytes() {
        // A datagram written out by hand from RFC 7348's figure: VNI 1,
        // inner Ethernet to 0a:58:0a:f4:01:00, then the inner packet.
        let inner = icmp([10, 244, 2, 2]);
        let mut payload = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
        payload.extend_from_slice(&MAC1);
        payload.extend_from_slice(&MAC2);
        payload.extend_from_slice(&[0x08, 0x00]);
        payload.extend_from_slice(&inner);
        payload.extend_from_slice(&[0; 6]); // Ethernet padding is cut off
        let rx = Vxlan::new(1, DEFAULT_PORT, node(1, MAC1));
        let d = rx.decapsulate(node(2, MAC2).addr, &payload, &OnePeer).unwrap();
        assert_eq!(d.peer, 0);
        assert_eq!(&payload[d.inner], &inner[..]);
    }

    #[test]
    fn round_trip() {
        let inner = icmp([10, 244, 2, 2]);
        let d = encap_from_node2(&inner);
        let rx = Vxlan::new(1, DEFAULT_PORT, node(1, MAC1));
        let got = rx.decapsulate(node(2, MAC2).addr, &d[UDP_HEADER_LEN..], &OnePeer).unwrap();
        assert_eq!(&d[UDP_HEADER_LEN..][got.inner], &inner[..]);
    }

    #[test]
    fn refusals_by_reason() {
        let rx = Vxlan::new(1, DEFAULT_PORT, node(1, MAC1));
        let good = encap_from_node2(&icmp([10, 244, 2, 2]))[UDP_HEADER_LEN..].to_vec();
        let from2 = node(2, MAC2).addr;
        let check = |p: &[u8], src: IpAddr| rx.decapsulate(src, p, &OnePeer).unwrap_err();

        assert_eq!(check(&good[..20], from2), DropReason::Short);
        let mut p = good.clone();
        p[0] = 0;
        assert_eq!(check(&p, from2), DropReason::FlagMissing);
        let mut p = good.clone();
        p[6] = 2;
        assert_eq!(check(&p, from2), DropReason::WrongVni);
        let mut p = good.clone();
        p[8] ^= 0xff;
        assert_eq!(check(&p, from2), DropReason::WrongDstMac);
        let mut p = good.clone();
        p[20..22].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(check(&p, from2), DropReason::NotIp);
        let mut p = good.clone();
        p[22 + 2..22 + 4].copy_from_slice(&999u16.to_be_bytes());
        assert_eq!(check(&p, from2), DropReason::MalformedInner);
        assert_eq!(check(&good, node(9, MAC2).addr), DropReason::UnknownSource);
        let spoofed = encap_from_node2(&icmp([10, 244, 3, 5]))[UDP_HEADER_LEN..].to_vec();
        assert_eq!(check(&spoofed, from2), DropReason::SpoofedSource);
    }

    #[test]
    fn reserved_bits_are_ignored_on_receipt() {
        // RFC 7348: reserved fields MUST be ignored by the receiver.
        let rx = Vxlan::new(1, DEFAULT_PORT, node(1, MAC1));
        let mut p = encap_from_node2(&icmp([10, 244, 2, 2]))[UDP_HEADER_LEN..].to_vec();
        p[0] |= 0x80;
        p[1] = 0xff;
        p[7] = 0xff;
        assert!(rx.decapsulate(node(2, MAC2).addr, &p, &OnePeer).is_ok());
    }

    #[test]
    fn encap_refuses_what_it_cannot_send() {
        let tx = Vxlan::new(1, DEFAULT_PORT, node(2, MAC2));
        let mut buf = vec![0u8; HEADROOM + 4];
        assert_eq!(tx.encapsulate(&node(1, MAC1), &mut buf, 4), Err(EncapError::NotIp));
        assert_eq!(tx.encapsulate(&node(1, MAC1), &mut buf, 5), Err(EncapError::NoHeadroom));
        let v6 = Vtep { addr: "fd00::1".parse().unwrap(), mac: MAC1 };
        let mut buf = vec![0u8; HEADROOM + 32];
        buf[HEADROOM..].copy_from_slice(&icmp([10, 244, 2, 2]));
        assert_eq!(tx.encapsulate(&v6, &mut buf, 32), Err(EncapError::FamilyMismatch));
    }
}
