//! Internet checksum (RFC 1071) and the UDP pseudo-header sum.
//!
//! The one's complement sum does not depend on byte order (RFC 1071
//! section 2(B)), so [`sum`] adds the data as native-endian words and turns
//! the result into network order once at the end. The bulk of the data is
//! added 64 bytes at a time into eight independent 64-bit lanes, in a shape
//! the compiler vectorizes with baseline SSE2 (or NEON), without `unsafe` or
//! target features; see [`Lanes`].

use std::net::IpAddr;

/// Bytes added per step of the wide loop: eight 64-bit lanes.
const STEP: usize = 64;

/// Data at least this long goes through the wide loop; shorter data is
/// quicker to add with scalar code than to set the lanes up and reduce them.
const WIDE: usize = 2 * STEP;

/// Most bytes summed by one run of the wide loop, so that its lanes cannot
/// overflow (see [`Lanes`]); longer data is cut into runs of this size.
const RUN: usize = 1 << 30;

/// One's complement sum of `data` (not inverted), added onto `initial`.
///
/// [`fold`] of the result is the textbook RFC 1071 sum of the big-endian
/// 16-bit words of `data` (an odd last byte being the high byte of a word
/// padded with zero) added to `initial`. The returned value itself is only
/// equivalent to that, not a particular bit pattern. Results chain: for an
/// even-length `a`, `sum(sum(x, a), b)` folds like `sum(x, a ++ b)`. Any
/// `initial` and any length are fine: nothing overflows.
pub fn sum(initial: u64, data: &[u8]) -> u64 {
    sum_runs::<RUN>(initial, data)
}

/// [`sum`] with the run length a parameter, so tests can cross run bounds.
#[inline(always)]
fn sum_runs<const R: usize>(initial: u64, data: &[u8]) -> u64 {
    let mut acc = 0;
    let mut rest = data;
    if rest.len() >= WIDE {
        while rest.len() >= STEP {
            let (run, r) = rest.split_at(rest.len().min(R) / STEP * STEP);
            acc = add(acc, lanes(run));
            rest = r;
        }
    }
    add(initial, network_order(add(acc, short(rest))))
}

/// Copies `src` into `dst` and returns `sum(initial, src)`, in one pass over
/// the data.
///
/// # Panics
///
/// If the two slices have different lengths, like `copy_from_slice`.
pub fn copy_and_sum(initial: u64, dst: &mut [u8], src: &[u8]) -> u64 {
    copy_and_sum_runs::<RUN>(initial, dst, src)
}

#[inline(always)]
fn copy_and_sum_runs<const R: usize>(initial: u64, dst: &mut [u8], src: &[u8]) -> u64 {
    assert_eq!(dst.len(), src.len(), "copy_and_sum: destination and source lengths differ");
    let mut acc = 0;
    let (mut rest, mut out) = (src, dst);
    if rest.len() >= WIDE {
        while rest.len() >= STEP {
            let n = rest.len().min(R) / STEP * STEP;
            let (run, r) = rest.split_at(n);
            let (run_out, o) = out.split_at_mut(n);
            acc = add(acc, lanes_copy(run, run_out));
            (rest, out) = (r, o);
        }
    }
    copy_short(out, rest);
    add(initial, network_order(add(acc, short(rest))))
}

/// Sum of the native-endian 32-bit halves of the 64-bit words of `run`,
/// whose length is a multiple of `STEP` and at most `RUN`. Exact, and below
/// 2^60: no carry is lost.
#[inline(always)]
fn lanes(run: &[u8]) -> u64 {
    let mut l = Lanes::default();
    for chunk in run.chunks_exact(STEP) {
        l.add(chunk);
    }
    l.total()
}

/// [`lanes`], copying `run` into `out` (of the same length) on the way.
#[inline(always)]
fn lanes_copy(run: &[u8], out: &mut [u8]) -> u64 {
    let mut l = Lanes::default();
    for (chunk, out) in run.chunks_exact(STEP).zip(out.chunks_exact_mut(STEP)) {
        let w = l.add(chunk);
        // Stored word by word from the loaded values. A `copy_from_slice`
        // of the whole chunk is turned by LLVM into one memcpy of the run
        // ahead of the loop, and that memcpy plus a second read of the
        // source is slower than this single pass.
        for (i, w) in w.iter().enumerate() {
            out[8 * i..8 * i + 8].copy_from_slice(&w.to_ne_bytes());
        }
    }
    l.total()
}

/// Eight independent 64-bit lanes, one per word of a `STEP`-byte chunk.
///
/// Each lane adds whole words with wrapping (`sum`) and, separately, their
/// high halves (`high`). The sum of the low halves is then
/// `sum - (high << 32)`: computed modulo 2^64 but exact, since a run of at
/// most `RUN` = 1 GiB has at most 2^27 words of halves below 2^32; likewise
/// `high` cannot overflow. That is three vector operations per 16 bytes (add,
/// shift, add) and no shuffles; on x86-64 with SSE2 alone that runs three to
/// four times as fast as a serial add-with-carry chain.
#[derive(Default)]
struct Lanes {
    sum: [u64; STEP / 8],
    high: [u64; STEP / 8],
}

impl Lanes {
    /// Adds one `STEP`-byte chunk and returns its words.
    #[inline(always)]
    fn add(&mut self, chunk: &[u8]) -> [u64; STEP / 8] {
        let mut w = [0; STEP / 8];
        for (i, w) in w.iter_mut().enumerate() {
            *w = word(&chunk[8 * i..8 * i + 8]);
            self.sum[i] = self.sum[i].wrapping_add(*w);
            self.high[i] += *w >> 32;
        }
        w
    }

    /// The exact sum of all the 32-bit halves added.
    #[inline(always)]
    fn total(&self) -> u64 {
        let sum = self.sum.iter().fold(0u64, |s, &x| s.wrapping_add(x));
        let high: u64 = self.high.iter().sum();
        sum.wrapping_sub(high << 32) + high
    }
}

/// Exact sum of fewer than `WIDE` bytes as native-endian words of at most
/// 32 bits, so below 2^37. An odd last byte is the first byte of a 16-bit
/// word padded with zero. Straight-line code for the headers and short
/// packets that are most of the calls.
#[inline(always)]
fn short(mut r: &[u8]) -> u64 {
    let mut t = 0;
    for size in [64, 32, 16, 8] {
        if r.len() >= size {
            for w in r[..size].chunks_exact(8) {
                let w = word(w);
                t += (w & 0xffff_ffff) + (w >> 32);
            }
            r = &r[size..];
        }
    }
    if r.len() >= 4 {
        t += u32::from_ne_bytes([r[0], r[1], r[2], r[3]]) as u64;
        r = &r[4..];
    }
    if r.len() >= 2 {
        t += u16::from_ne_bytes([r[0], r[1]]) as u64;
        r = &r[2..];
    }
    if let [last] = r {
        t += u16::from_ne_bytes([*last, 0]) as u64;
    }
    t
}

/// Copies fewer than `WIDE` bytes with fixed-size moves rather than a call
/// to memcpy, which costs more than the copy at these sizes.
#[inline(always)]
fn copy_short(mut out: &mut [u8], mut r: &[u8]) {
    for size in [64, 32, 16, 8, 4, 2, 1] {
        if r.len() >= size {
            let (o, rest) = out.split_at_mut(size);
            o.copy_from_slice(&r[..size]);
            (out, r) = (rest, &r[size..]);
        }
    }
}

#[inline(always)]
fn word(b: &[u8]) -> u64 {
    u64::from_ne_bytes(b.try_into().expect("eight bytes"))
}

/// One's complement (end-around carry) addition of two 64-bit sums.
#[inline(always)]
fn add(a: u64, b: u64) -> u64 {
    let (s, carry) = a.overflowing_add(b);
    s + carry as u64
}

/// Turns a one's complement sum of native-endian words into the sum of the
/// same bytes as big-endian words.
///
/// On a little-endian machine each 16-bit word was read byte-swapped, and
/// swapping a word's bytes is multiplying it by 2^8 modulo 2^16 - 1. Rotating
/// the 64-bit sum left by 8 is multiplying it by 2^8 modulo 2^64 - 1, a
/// multiple of 2^16 - 1, so it swaps every word at once (and stays nonzero
/// for a nonzero sum), whatever the carries in between.
#[inline(always)]
fn network_order(acc: u64) -> u64 {
    if cfg!(target_endian = "little") {
        acc.rotate_left(8)
    } else {
        acc
    }
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
    // The sum of big-endian 32-bit words, each the sum of its two 16-bit
    // halves modulo 2^16 - 1, taken exactly in 64 bits: zero, protocol and
    // length are the last two words (IPv6's layout, the same sum as IPv4's).
    let quarters = |a: u128| (0..4).map(|i| (a >> (32 * i)) as u32 as u64).sum::<u64>();
    let addrs = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => u32::from(s) as u64 + u32::from(d) as u64,
        (IpAddr::V6(s), IpAddr::V6(d)) => quarters(s.into()) + quarters(d.into()),
        _ => return None,
    };
    Some(addrs + proto as u64 + len as u64)
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

    /// The textbook RFC 1071 loop over big-endian 16-bit words, starting
    /// from `initial` folded: what `fold(sum(initial, data))` must equal.
    fn reference(initial: u64, data: &[u8]) -> u16 {
        let mut acc = fold(initial) as u32;
        for p in data.chunks(2) {
            acc += u16::from_be_bytes([p[0], *p.get(1).unwrap_or(&0)]) as u32;
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    /// A deterministic generator (SplitMix64), so failures reproduce.
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    /// Seeds callers pass: zero, folded values, pseudo-header sums, earlier
    /// `sum` results, and the top of the range where carries happen.
    fn initials(g: &mut Gen) -> [u64; 10] {
        [
            0,
            1,
            0xffff,
            0x1_0000,
            0xffff_ffff,
            1 << 63,
            u64::MAX - 1,
            u64::MAX,
            g.next(),
            g.next() | 0xffff_0000_0000_0000,
        ]
    }

    fn lengths() -> impl Iterator<Item = usize> {
        (0..300).chain([511, 512, 513, 1399, 1400, 1401, 4095, 65000, 65535, 65536, 65537, (1 << 20) + 3])
    }

    #[test]
    fn sum_and_copy_and_sum_match_the_reference_loop() {
        let mut g = Gen(1);
        let mut out = Vec::new();
        for len in lengths() {
            // Start at every offset modulo eight: the wide loads are unaligned.
            let off = len % 8;
            let buf = g.bytes(off + len);
            let data = &buf[off..];
            for initial in initials(&mut g) {
                let want = reference(initial, data);
                assert_eq!(fold(sum(initial, data)), want, "sum, len {len}, initial {initial:#x}");
                out.clear();
                out.resize(len, 0x5a);
                assert_eq!(fold(copy_and_sum(initial, &mut out, data)), want, "copy_and_sum, len {len}");
                assert_eq!(out, data, "copy_and_sum copies, len {len}");
            }
        }
    }

    #[test]
    fn sums_chain_at_even_split_points() {
        let mut g = Gen(2);
        for len in [0, 1, 2, 63, 64, 65, 130, 301, 1400, 4097] {
            let data = g.bytes(len);
            for initial in initials(&mut g) {
                let whole = fold(sum(initial, &data));
                // Every even split of the short ones, a sample of the others.
                for at in (0..=len).step_by(if len > 400 { 94 } else { 2 }) {
                    let (a, b) = data.split_at(at);
                    assert_eq!(fold(sum(sum(initial, a), b)), whole, "len {len}, split {at}");
                    let mut out = vec![0; len];
                    let (oa, ob) = out.split_at_mut(at);
                    assert_eq!(fold(copy_and_sum(copy_and_sum(initial, oa, a), ob, b)), whole);
                    assert_eq!(out, data);
                }
            }
        }
    }

    #[test]
    fn runs_cut_anywhere_give_the_same_sum() {
        // The wide loop's 1 GiB runs, shrunk so that many bounds are crossed.
        let mut g = Gen(3);
        for len in lengths().take_while(|&l| l <= 4095) {
            let data = g.bytes(len);
            let initial = g.next();
            let want = reference(initial, &data);
            assert_eq!(fold(sum_runs::<64>(initial, &data)), want, "len {len}");
            assert_eq!(fold(sum_runs::<200>(initial, &data)), want, "len {len}");
            let mut out = vec![0; len];
            assert_eq!(fold(copy_and_sum_runs::<64>(initial, &mut out, &data)), want, "len {len}");
            assert_eq!(out, data);
            assert_eq!(fold(copy_and_sum_runs::<200>(initial, &mut out, &data)), want, "len {len}");
        }
    }

    #[test]
    fn all_ones_over_16_mib_does_not_overflow() {
        // The largest words in every lane, for longer than any packet, on
        // top of the largest seed: every partial sum is at its maximum.
        let data = vec![0xff; (16 << 20) + 7];
        for initial in [0, u64::MAX, u64::MAX - 1] {
            assert_eq!(fold(sum(initial, &data)), reference(initial, &data));
            let mut out = vec![0; data.len()];
            assert_eq!(fold(copy_and_sum(initial, &mut out, &data)), reference(initial, &data));
        }
        assert_eq!(fold(sum(0, &[0; 4096])), 0, "only all zeros sum to zero");
    }

    #[test]
    #[should_panic(expected = "lengths differ")]
    fn copy_and_sum_panics_on_different_lengths() {
        copy_and_sum(0, &mut [0; 3], &[0; 4]);
    }
}
