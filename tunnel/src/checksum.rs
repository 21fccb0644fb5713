//! Internet checksum (RFC 1071) and the UDP pseudo-header sum.
//!
//! Sums are folded from 64-bit accumulators, eight bytes per step; the
//! result is the same as the textbook 16-bit loop.

use std::net::IpAddr;

/// One's complement sum of `data` (not inverted), added onto `initial`.
pub fn sum(initial: u64, data: &[u8]) -> u64 {
    let mut acc = initial;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let (s, carry) = acc.overflowing_add(w);
        acc = s + carry as u64;
    }
    let rest = chunks.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        let (s, carry) = acc.overflowing_add(u16::from_be_bytes([p[0], p[1]]) as u64);
        acc = s + carry as u64;
    }
    if let [last] = pairs.remainder() {
        let (s, carry) = acc.overflowing_add((*last as u64) << 8);
        acc = s + carry as u64;
    }
    acc
}

/// Folds a 64-bit one's complement accumulator into 16 bits (not inverted).
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Sum of the UDP pseudo-header (RFC 768 / RFC 8200 section 8.1).
///
/// Returns `None` when the two addresses are of different families.
pub fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: u32) -> Option<u64> {
    let acc = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum(sum(0, &s.octets()), &d.octets()),
        (IpAddr::V6(s), IpAddr::V6(d)) => sum(sum(0, &s.octets()), &d.octets()),
        _ => return None,
    };
    Some(sum(sum(acc, &[0, 0, 0, proto]), &len.to_be_bytes()))
}

/// UDP checksum over `datagram` (header with a zero checksum field, then
/// payload). A computed zero is sent as 0xffff, as RFC 768 requires.
pub fn udp(src: IpAddr, dst: IpAddr, datagram: &[u8]) -> Option<u16> {
    let acc = pseudo_header(src, dst, 17, datagram.len() as u32)?;
    let c = !fold(sum(acc, datagram));
    Some(if c == 0 { 0xffff } else { c })
}

/// Whether a received UDP datagram's checksum (in place) verifies.
pub fn verify_udp(src: IpAddr, dst: IpAddr, datagram: &[u8]) -> bool {
    match pseudo_header(src, dst, 17, datagram.len() as u32) {
        Some(acc) => fold(sum(acc, datagram)) == 0xffff,
        None => false,
    }
}

/// Completes a TCP or UDP checksum left partial by a sender's checksum
/// offload.
///
/// A Linux sender that offloads the transport checksum writes only the
/// folded pseudo-header sum into the checksum field and leaves the rest to
/// the NIC. Over veth or between VMs on one host no NIC does it, and the
/// receiving kernel hands a UDP socket the inner packet still partial; a
/// pod would then drop it. When the field holds exactly that seed, the full
/// checksum is computed and written. A packet whose checksum was already
/// complete and happens to equal the seed is rewritten to the same value,
/// so this never damages a valid packet. Returns whether it wrote.
pub fn complete_partial(ip: &mut [u8]) -> bool {
    let Some(&first) = ip.first() else {
        return false;
    };
    let (src, dst, proto, l4_start, l4_end) = match first >> 4 {
        4 if ip.len() >= 20 => {
            let ihl = ((first & 0x0f) as usize) * 4;
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff; // MF or offset
            if ihl < 20 || total > ip.len() || total < ihl || frag != 0 {
                return false;
            }
            let s: [u8; 4] = [ip[12], ip[13], ip[14], ip[15]];
            let d: [u8; 4] = [ip[16], ip[17], ip[18], ip[19]];
            (IpAddr::from(s), IpAddr::from(d), ip[9], ihl, total)
        }
        6 if ip.len() >= 40 => {
            let total = 40 + u16::from_be_bytes([ip[4], ip[5]]) as usize;
            if total > ip.len() {
                return false;
            }
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&ip[8..24]);
            d.copy_from_slice(&ip[24..40]);
            // Extension headers are left alone: offloaded packets from Linux
            // carry TCP or UDP directly after the fixed header.
            (IpAddr::from(s), IpAddr::from(d), ip[6], 40, total)
        }
        _ => return false,
    };
    let field = match proto {
        6 => 16,
        17 => 6,
        _ => return false,
    };
    let l4 = &mut ip[l4_start..l4_end];
    if l4.len() < field + 2 {
        return false;
    }
    let Some(pseudo) = pseudo_header(src, dst, proto, l4.len() as u32) else {
        return false;
    };
    let seed = fold(pseudo);
    let current = u16::from_be_bytes([l4[field], l4[field + 1]]);
    if current != seed || (proto == 17 && current == 0) {
        return false;
    }
    l4[field..field + 2].copy_from_slice(&[0, 0]);
    let mut c = !fold(sum(pseudo, l4));
    if proto == 17 && c == 0 {
        c = 0xffff;
    }
    l4[field..field + 2].copy_from_slice(&c.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook 16-bit loop, as a reference.
    fn slow(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for p in data.chunks(2) {
            let w = if p.len() == 2 { u16::from_be_bytes([p[0], p[1]]) } else { (p[0] as u16) << 8 };
            acc += w as u32;
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    /// A TCP/IPv4 segment with a complete checksum.
    fn tcp4(payload: &[u8]) -> Vec<u8> {
        let total = 40 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 244, 3, 2]);
        p[16..20].copy_from_slice(&[10, 244, 1, 2]);
        p[20..22].copy_from_slice(&5201u16.to_be_bytes());
        p[22..24].copy_from_slice(&40000u16.to_be_bytes());
        p[32] = 0x50;
        p[40..].copy_from_slice(payload);
        let (s, d) = (IpAddr::from([10, 244, 3, 2]), IpAddr::from([10, 244, 1, 2]));
        let c = !fold(sum(pseudo_header(s, d, 6, 20 + payload.len() as u32).unwrap(), &p[20..]));
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn partial_checksums_are_completed_and_complete_ones_kept() {
        let good = tcp4(b"weft payload, odd length");
        let mut p = good.clone();
        assert!(!complete_partial(&mut p), "a complete checksum is not the seed");
        assert_eq!(p, good);
        // What an offloading sender leaves: the folded pseudo-header sum.
        let (s, d) = (IpAddr::from([10, 244, 3, 2]), IpAddr::from([10, 244, 1, 2]));
        let seed = fold(pseudo_header(s, d, 6, (good.len() - 20) as u32).unwrap());
        let mut partial = good.clone();
        partial[36..38].copy_from_slice(&seed.to_be_bytes());
        assert!(complete_partial(&mut partial));
        assert_eq!(partial, good);
        for len in 0..48 {
            let _ = complete_partial(&mut vec![0x45; len]);
            let _ = complete_partial(&mut vec![0x60; len]);
        }
    }

    #[test]
    fn pseudo_header_sum_carries_instead_of_overflowing() {
        // Found by fuzzing: IPv6 addresses near all-ones push the 64-bit
        // accumulator to its top, where a plain `+` overflowed.
        let src: IpAddr = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffee".parse().unwrap();
        let dst: IpAddr = "::".parse().unwrap();
        assert_eq!(fold(pseudo_header(src, dst, 17, 8).unwrap()), 0x0008);
        let src: IpAddr = "fd10:244:2:0:5df:fb77:fffc:fff6".parse().unwrap();
        let dst: IpAddr = "fd10:244:1::2".parse().unwrap();
        assert_eq!(fold(pseudo_header(src, dst, 6, 1440).unwrap()), 0x05a0);
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2.
        assert_eq!(fold(sum(0, &[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7])), 0xddf2);
    }

    #[test]
    fn matches_slow_sum_on_random_lengths() {
        use rand::{Rng, SeedableRng};
        let seed = rand::random::<u64>();
        println!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..2000 {
            let len = rng.gen_range(0..300);
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let fast = fold(sum(0, &data));
            let slow = slow(&data);
            // 0x0000 and 0xffff are the same value in one's complement.
            assert!(fast == slow || (fast == 0xffff && slow == 0) || (fast == 0 && slow == 0xffff), "len {len}");
        }
    }
}
