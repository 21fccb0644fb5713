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
    Some(sum(acc, &[0, 0, 0, proto]) + sum(0, &len.to_be_bytes()))
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
