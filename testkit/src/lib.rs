//! What weft's tests, benches and fuzz targets build over and over: TCP
//! packets with correct checksums, a peer table that accepts everything,
//! and the fix-up that turns fuzz input into a plausible TCP packet. Only
//! ever a dev-dependency.

#![forbid(unsafe_code)]

use std::net::IpAddr;

use weft_tunnel::checksum;
use weft_tunnel::vxlan::Peers;

/// A TCP/IPv4 packet `src -> dst` (ports 40000 -> 5201, ACK, DF) carrying
/// `payload` bytes of a fixed pattern from sequence number `seq`, with its
/// IPv4 header and TCP checksums complete.
pub fn tcp_ipv4(src: [u8; 4], dst: [u8; 4], payload: usize, seq: u32) -> Vec<u8> {
    let total = 40 + payload;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    let c = !checksum::fold(checksum::sum(0, &p[..20]));
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..24].copy_from_slice(&[0x9c, 0x40, 0x14, 0x51]);
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[32] = 0x50;
    p[33] = 0x10;
    for (i, b) in p[40..].iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    let pseudo = checksum::pseudo_header(src.into(), dst.into(), 6, (total - 20) as u32).unwrap_or(0);
    let c = !checksum::fold(checksum::sum(pseudo, &p[20..]));
    p[36..38].copy_from_slice(&c.to_be_bytes());
    p
}

/// A peer table of one node that every underlay address is and that owns
/// every inner address: decapsulation checks pass, their cost stays.
pub struct AnyPeer;

impl Peers for AnyPeer {
    fn peer_by_underlay(&self, _: IpAddr) -> Option<usize> {
        Some(0)
    }

    fn peer_owns(&self, _: usize, _: IpAddr) -> bool {
        true
    }
}

/// Makes fuzz input `p` a TCP packet where it has a fixed IP header: the IP
/// length field its length, the protocol TCP, no fragment offset or MF (DF
/// may stay), so that the fuzzer reaches the cutting and joining code
/// instead of stopping at the first length check.
pub fn fix_up_tcp(p: &mut [u8]) {
    match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= 20 => {
            let len = p.len().min(u16::MAX as usize) as u16;
            p[2..4].copy_from_slice(&len.to_be_bytes());
            p[6] &= 0x40;
            p[7] = 0;
            p[9] = 6;
        }
        Some(6) if p.len() >= 40 => {
            let len = (p.len() - 40).min(u16::MAX as usize) as u16;
            p[4..6].copy_from_slice(&len.to_be_bytes());
            p[6] = 6;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tcp_packet_verifies_and_says_what_was_asked() {
        let p = tcp_ipv4([10, 244, 1, 2], [10, 244, 2, 2], 1000, 77);
        assert_eq!(p.len(), 1040);
        assert_eq!(checksum::fold(checksum::sum(0, &p[..20])), 0xffff, "IPv4 header checksum");
        let pseudo = checksum::pseudo_header([10, 244, 1, 2].into(), [10, 244, 2, 2].into(), 6, 1020).unwrap();
        assert_eq!(checksum::fold(checksum::sum(pseudo, &p[20..])), 0xffff, "TCP checksum");
        assert_eq!(u32::from_be_bytes([p[24], p[25], p[26], p[27]]), 77);
    }

    #[test]
    fn fix_up_makes_lengths_and_protocol_consistent() {
        let mut p = vec![0x45u8; 60];
        fix_up_tcp(&mut p);
        assert_eq!((u16::from_be_bytes([p[2], p[3]]), p[6], p[7], p[9]), (60, 0x40 & 0x45, 0, 6));
        let mut short = vec![0x45u8; 10];
        fix_up_tcp(&mut short);
        assert_eq!(short, vec![0x45u8; 10], "too short for an IPv4 header: left alone");
    }
}
