//! Software GRO: coalescing the TCP segments of one batch into super-packets
//! the TUN takes in one write, with a virtio-net GSO header.
//!
//! ```text
//!  packets after decapsulation          after coalesce()            TUN writes (writev)
//!  0 [A seq 0    1398 B]  head  ──┐     0 Out{gso 1398, next 1}     [vnet][0 whole][1 payload][3 payload]
//!  1 [A seq 1398 1398 B]  ────────┤     1 Out{merged, next 3}
//!  2 [B seq 9    100 B ]  ────────┼──>  2 Out{alone}                 [vnet][2 whole]
//!  3 [A seq 2796 1398 B]  ────────┘     3 Out{merged}
//! ```
//!
//! The rules are the ones Linux GRO (`tcp_gro_receive`) applies: same
//! addresses and ports, the next sequence number, the same ACK number,
//! byte-equal TCP options, the same TTL/hop limit, TOS/traffic class and
//! DF bit, no IP options or IPv6 extension headers; only ACK, PSH and ECE
//! may be set, and a PSH closes the super-packet; every segment but the
//! last carries exactly `gso_size` bytes, and the whole stays within 64 KiB.
//! A segment whose checksum is wrong is never merged (it would otherwise be
//! given a fresh, valid checksum): it goes to the pod alone and is dropped
//! there. A checksum left partial by a local sender's offload is trusted,
//! as the kernel trusts `CHECKSUM_PARTIAL`.
//!
//! Nothing is copied: the payloads of merged segments stay where they were
//! received, linked from their head by [`Out::next`], and the writer hands
//! the head and those payloads to one `writev` ([`parts`]). Only the head's
//! headers change (lengths, IPv4 header checksum, PSH); the result carries
//! `NEEDS_CSUM` with the pseudo-header seed in the checksum field, which the
//! kernel completes or segments as for any GSO packet. This module does no
//! I/O and does not allocate. It does not coalesce UDP (USO towards the
//! TUN) or reorder anything: the order of heads is the order of writes.

use std::net::IpAddr;

use weft_tunnel::checksum;

use crate::vnet::{VnetHdr, F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4};

/// Largest IP packet the kernel accepts in one TUN write.
pub const MAX_COALESCED: usize = 65535;

/// Segments one coalesced packet holds at most (the head included), as
/// Linux GRO caps a super-packet at 64 segments; it also bounds the
/// `writev` of one packet to [`MAX_PARTS`] slices.
pub const MAX_SEGS: usize = 64;

/// Slices one coalesced write takes: the virtio-net header, the head, and
/// the payloads of up to `MAX_SEGS - 1` merged segments.
pub const MAX_PARTS: usize = MAX_SEGS + 1;

/// Super-packets being built at once; packets of further flows in the
/// same call are written alone.
const MAX_OPEN: usize = 64;

/// Marks the end of a chain in [`Out::next`].
pub const NONE: u16 = u16::MAX;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const URG: u8 = 0x20;
const CWR: u8 = 0x80;

/// What one call to [`coalesce`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Segments appended to an earlier one (writes saved).
    pub merged: u64,
    /// Partial checksums completed in software (packets that could not be
    /// handed to the kernel partial).
    pub csum_completed: u64,
    /// Super-packets larger than the MTU passed on as GSO packets.
    pub oversized: u64,
}

/// How one packet goes to the TUN after [`coalesce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Out {
    /// The virtio-net header its write carries (heads and lone packets).
    pub vnet: VnetHdr,
    /// The packet whose payload follows this one's in the same write.
    pub next: u16,
    /// Whether its payload is written with its head, not on its own.
    pub merged: bool,
    /// Bytes of headers a merged packet's write skips.
    pub skip: u16,
}

impl Default for Out {
    fn default() -> Self {
        Out { vnet: VnetHdr::default(), next: NONE, merged: false, skip: 0 }
    }
}

/// The slices of the write that starts at packet `head` (not a merged
/// one): the head whole, then the payload of each packet merged into it.
pub fn parts<'a, P: AsRef<[u8]>>(pkts: &'a [P], outs: &'a [Out], head: usize) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut at = Some(head);
    std::iter::from_fn(move || {
        let i = at?;
        let o = outs.get(i)?;
        at = (o.next != NONE).then_some(o.next as usize);
        pkts.get(i).map(|p| &p.as_ref()[o.skip as usize..])
    })
}

/// Coalesces `pkts` (each slice one whole IP packet, in arrival order) and
/// says in `outs` (one entry per packet) how each is written; heads get
/// their headers rewritten in place. TCP packets larger than `mtu` are
/// passed on as GSO packets of `mtu`-sized segments. With `udp` (the TUN
/// takes USO writes), datagrams of one flow and one size are joined too,
/// into `GSO_UDP_L4` packets the kernel cuts back into the same datagrams.
/// Every packet whose `outs` entry is not `merged` is one write of [`parts`].
pub fn coalesce<P: AsMut<[u8]>>(pkts: &mut [P], outs: &mut [Out], mtu: usize, udp: bool) -> Stats {
    let mut stats = Stats::default();
    let mut items = [Item::default(); MAX_OPEN];
    let mut n_items = 0;
    let count = pkts.len().min(outs.len()).min(NONE as usize);
    for i in 0..count {
        outs[i] = Out::default();
        let pkt = pkts[i].as_mut();
        let Some(seg) = parse_tcp(pkt).or_else(|| parse_udp(pkt).filter(|_| udp)) else {
            if checksum::complete_partial(pkt) {
                stats.csum_completed += 1;
            }
            continue;
        };
        let partial = checksum_state(pkt, &seg);
        if partial == Csum::Bad {
            continue;
        }
        let len = pkt.len();
        if seg.udp && partial == Csum::Partial && checksum::complete_partial(pkt) {
            // Joined datagrams get one seed for the whole; a lone one
            // is finished here, as before (the kernel would not).
            stats.csum_completed += 1;
        }
        let partial = if seg.udp { Csum::Valid } else { partial };
        if len > mtu && !seg.udp {
            // A sender's TSO frame that crossed a veth uncut: the kernel cuts it.
            set_seed(pkt, &seg, len);
            outs[i].vnet = gso_header(&seg, mtu.saturating_sub(seg.hdr_len).max(1) as u16);
            stats.oversized += 1;
            continue;
        }
        let payload = len - seg.hdr_len;
        let mergeable = (seg.udp || seg.flags & (FIN | SYN | RST | URG | CWR) == 0) && payload > 0 && len <= mtu;
        if mergeable {
            if let Some(j) = items[..n_items].iter().rposition(|it| it.open && it.seg.same_flow(&seg)) {
                let it = items[j];
                let fits = (seg.udp || it.next_seq == seg.seq)
                    && payload <= it.gso_size
                    && it.last_payload == it.gso_size
                    && it.len + payload <= MAX_COALESCED
                    && it.segs < MAX_SEGS;
                let (head, rest) = pkts.split_at_mut(i);
                if fits && same_headers(head[it.slot].as_mut(), rest[0].as_mut(), &seg) {
                    outs[it.tail].next = i as u16;
                    outs[i].merged = true;
                    outs[i].skip = seg.hdr_len as u16;
                    let it = &mut items[j];
                    it.tail = i;
                    it.len += payload;
                    it.segs += 1;
                    it.next_seq = it.next_seq.wrapping_add(payload as u32);
                    it.last_payload = payload;
                    it.open = seg.flags & PSH == 0;
                    it.psh |= seg.flags & PSH != 0;
                    it.partial |= partial == Csum::Partial;
                    stats.merged += 1;
                    continue;
                }
                items[j].open = false;
            }
        }
        if n_items < items.len() {
            items[n_items] = Item {
                slot: i,
                tail: i,
                seg,
                len,
                segs: 1,
                next_seq: seg.seq.wrapping_add(payload as u32),
                gso_size: payload,
                last_payload: payload,
                open: mergeable && seg.flags & PSH == 0,
                psh: false,
                partial: partial == Csum::Partial,
            };
            n_items += 1;
        }
    }
    for it in &items[..n_items] {
        let o = &mut outs[it.slot];
        let pkt = pkts[it.slot].as_mut();
        if it.segs == 1 {
            if it.partial {
                // Left partial by a local sender: let the kernel finish it.
                o.vnet = VnetHdr {
                    flags: F_NEEDS_CSUM,
                    csum_start: it.seg.ip_len as u16,
                    csum_offset: 16,
                    ..VnetHdr::default()
                };
            }
            continue;
        }
        if it.seg.udp {
            let l4 = ((it.len - it.seg.ip_len) as u16).to_be_bytes();
            pkt[it.seg.ip_len + 4..it.seg.ip_len + 6].copy_from_slice(&l4);
        }
        if it.psh {
            pkt[it.seg.ip_len + 13] |= PSH;
        }
        if it.seg.v4 {
            pkt[2..4].copy_from_slice(&(it.len as u16).to_be_bytes());
            pkt[10..12].copy_from_slice(&[0, 0]);
            let c = !checksum::fold(checksum::sum(0, &pkt[..it.seg.ip_len]));
            pkt[10..12].copy_from_slice(&c.to_be_bytes());
        } else {
            pkt[4..6].copy_from_slice(&((it.len - 40) as u16).to_be_bytes());
        }
        set_seed(pkt, &it.seg, it.len);
        o.vnet = gso_header(&it.seg, it.gso_size as u16);
    }
    stats
}

/// A coalesced packet being built.
#[derive(Debug, Clone, Copy, Default)]
struct Item {
    slot: usize,
    tail: usize,
    seg: Segment,
    len: usize,
    segs: usize,
    next_seq: u32,
    gso_size: usize,
    last_payload: usize,
    open: bool,
    psh: bool,
    partial: bool,
}

/// What coalescing needs to know of a TCP segment.
#[derive(Debug, Clone, Copy)]
struct Segment {
    v4: bool,
    /// UDP (ports, no sequence) rather than TCP.
    udp: bool,
    ip_len: usize,
    hdr_len: usize,
    src: IpAddr,
    dst: IpAddr,
    ports: [u8; 4],
    seq: u32,
    flags: u8,
}

impl Default for Segment {
    fn default() -> Self {
        Segment {
            v4: true,
            udp: false,
            ip_len: 0,
            hdr_len: 0,
            src: IpAddr::from([0u8; 4]),
            dst: IpAddr::from([0u8; 4]),
            ports: [0; 4],
            seq: 0,
            flags: 0,
        }
    }
}

impl Segment {
    fn same_flow(&self, o: &Segment) -> bool {
        self.v4 == o.v4 && self.udp == o.udp && self.src == o.src && self.dst == o.dst && self.ports == o.ports
    }

    /// Where the transport checksum lies in the transport header.
    fn csum_offset(&self) -> usize {
        if self.udp {
            6
        } else {
            16
        }
    }
}

/// The IP header of a packet with no IPv4 options or IPv6 extension
/// headers carrying `proto`, whole (IP length equal to the buffer):
/// (IPv4, header length, source, destination).
fn parse_ip(p: &[u8], proto: u8) -> Option<(bool, usize, IpAddr, IpAddr)> {
    match p.first()? >> 4 {
        4 => {
            let total = u16::from_be_bytes([*p.get(2)?, *p.get(3)?]) as usize;
            let frag = u16::from_be_bytes([*p.get(6)?, *p.get(7)?]) & 0x3fff;
            if p[0] & 0x0f != 5 || *p.get(9)? != proto || frag != 0 || total != p.len() || total < 20 {
                return None;
            }
            let s: [u8; 4] = p[12..16].try_into().ok()?;
            let d: [u8; 4] = p[16..20].try_into().ok()?;
            Some((true, 20, IpAddr::from(s), IpAddr::from(d)))
        }
        6 => {
            if p.len() < 40 || p[6] != proto || 40 + u16::from_be_bytes([p[4], p[5]]) as usize != p.len() {
                return None;
            }
            let s: [u8; 16] = p[8..24].try_into().ok()?;
            let d: [u8; 16] = p[24..40].try_into().ok()?;
            Some((false, 40, IpAddr::from(s), IpAddr::from(d)))
        }
        _ => None,
    }
}

/// Parses a TCP segment with no IP options or extension headers, whole.
fn parse_tcp(p: &[u8]) -> Option<Segment> {
    let (v4, ip_len, src, dst) = parse_ip(p, 6)?;
    let t = p.get(ip_len..ip_len + 20)?;
    let tcp_len = ((t[12] >> 4) as usize) * 4;
    if tcp_len < 20 || ip_len + tcp_len > p.len() {
        return None;
    }
    Some(Segment {
        v4,
        udp: false,
        ip_len,
        hdr_len: ip_len + tcp_len,
        src,
        dst,
        ports: [t[0], t[1], t[2], t[3]],
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        flags: t[13],
    })
}

/// Parses a UDP datagram with no IP options or extension headers, whole,
/// its UDP length that of the packet and its checksum present (IPv4
/// datagrams sent without one are written alone, as they came).
fn parse_udp(p: &[u8]) -> Option<Segment> {
    let (v4, ip_len, src, dst) = parse_ip(p, 17)?;
    let u = p.get(ip_len..ip_len + 8)?;
    if u16::from_be_bytes([u[4], u[5]]) as usize != p.len() - ip_len || u[6..8] == [0, 0] {
        return None;
    }
    Some(Segment {
        v4,
        udp: true,
        ip_len,
        hdr_len: ip_len + 8,
        src,
        dst,
        ports: [u[0], u[1], u[2], u[3]],
        seq: 0,
        flags: 0,
    })
}

/// Whether the IP fields GRO compares (TTL/hop limit, TOS/traffic class,
/// DF; IPv6 flow label) and the TCP ACK, window-independent header and
/// options of `b` equal those of the head `a`.
fn same_headers(a: &[u8], b: &[u8], seg: &Segment) -> bool {
    let ip_ok = if seg.v4 {
        a[1] == b[1] && a[8] == b[8] && (a[6] & 0x40) == (b[6] & 0x40)
    } else {
        a[0..4] == b[0..4] && a[7] == b[7]
    };
    if seg.udp {
        return ip_ok;
    }
    let (ta, tb) = (&a[seg.ip_len..], &b[seg.ip_len..]);
    let tcp_len = seg.hdr_len - seg.ip_len;
    ip_ok
        && ta[12] == tb[12]
        && ta[8..12] == tb[8..12]
        && (ta[13] & !PSH) == (tb[13] & !PSH)
        && ta[20..tcp_len] == tb[20..tcp_len]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Csum {
    Valid,
    Partial,
    Bad,
}

fn pseudo(seg: &Segment, l4_len: usize) -> u64 {
    // Both addresses come from one header: the families match.
    let proto = if seg.udp { 17 } else { 6 };
    checksum::pseudo_header(seg.src, seg.dst, proto, l4_len as u32).unwrap_or(0)
}

/// Whether the TCP checksum verifies, or holds a local sender's seed.
fn checksum_state(p: &[u8], seg: &Segment) -> Csum {
    let t = &p[seg.ip_len..];
    let acc = pseudo(seg, t.len());
    let at = seg.csum_offset();
    if u16::from_be_bytes([t[at], t[at + 1]]) == checksum::fold(acc) {
        return Csum::Partial;
    }
    if checksum::fold(checksum::sum(acc, t)) == 0xffff {
        Csum::Valid
    } else {
        Csum::Bad
    }
}

/// Writes the pseudo-header seed a `NEEDS_CSUM` packet of `total` bytes
/// (its head may hold fewer) carries.
fn set_seed(p: &mut [u8], seg: &Segment, total: usize) {
    let l4_len = total - seg.ip_len;
    let seed = checksum::fold(pseudo(seg, l4_len));
    let at = seg.ip_len + seg.csum_offset();
    p[at..at + 2].copy_from_slice(&seed.to_be_bytes());
}

fn gso_header(seg: &Segment, gso_size: u16) -> VnetHdr {
    VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: match (seg.udp, seg.v4) {
            (true, _) => GSO_UDP_L4,
            (false, true) => GSO_TCPV4,
            (false, false) => GSO_TCPV6,
        },
        hdr_len: seg.hdr_len as u16,
        gso_size,
        csum_start: seg.ip_len as u16,
        csum_offset: seg.csum_offset() as u16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::Plan;
    use crate::vnet::complete_csum;

    /// A TCP super-packet with a complete checksum and a timestamp option.
    fn tcp_packet(v6: bool, payload_len: usize, flags: u8, seq: u32) -> Vec<u8> {
        let ip_len = if v6 { 40 } else { 20 };
        let tcp_len = 32;
        let total = ip_len + tcp_len + payload_len;
        let mut p = vec![0u8; total];
        if v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            p[6] = 6;
            p[7] = 64;
            p[8..24].copy_from_slice(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
            p[24..40].copy_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
            p[6] = 0x40;
            p[8] = 64;
            p[9] = 6;
            p[12..16].copy_from_slice(&[10, 244, 3, 2]);
            p[16..20].copy_from_slice(&[10, 244, 1, 2]);
        }
        let t = &mut p[ip_len..];
        t[0..4].copy_from_slice(&[0x14, 0x51, 0xa0, 0x00]);
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&77u32.to_be_bytes());
        t[12] = (tcp_len as u8 / 4) << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&512u16.to_be_bytes());
        t[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 7]);
        for (i, b) in t[tcp_len..].iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        fix_checksums(&mut p);
        p
    }

    fn fix_checksums(p: &mut [u8]) {
        let seg = parse_tcp(p).unwrap();
        if seg.v4 {
            p[10..12].copy_from_slice(&[0, 0]);
            let c = !checksum::fold(checksum::sum(0, &p[..20]));
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let t_len = p.len() - seg.ip_len;
        p[seg.ip_len + 16..seg.ip_len + 18].copy_from_slice(&[0, 0]);
        let c = !checksum::fold(checksum::sum(pseudo(&seg, t_len), &p[seg.ip_len..]));
        p[seg.ip_len + 16..seg.ip_len + 18].copy_from_slice(&c.to_be_bytes());
    }

    /// Coalesces copies of `packets`: the packets (heads rewritten) and
    /// what to write.
    fn run(packets: &[Vec<u8>], mtu: usize) -> (Vec<Vec<u8>>, Vec<Out>, Stats) {
        let mut pkts = packets.to_vec();
        let mut outs = vec![Out::default(); pkts.len()];
        let stats = coalesce(&mut pkts, &mut outs, mtu, true);
        (pkts, outs, stats)
    }

    /// The bytes of each write, in order, with its virtio-net header.
    fn writes(pkts: &[Vec<u8>], outs: &[Out]) -> Vec<(Vec<u8>, VnetHdr)> {
        (0..pkts.len())
            .filter(|i| !outs[*i].merged)
            .map(|i| (parts(pkts, outs, i).collect::<Vec<_>>().concat(), outs[i].vnet))
            .collect()
    }

    fn split(p: &[u8], mss: usize) -> Vec<Vec<u8>> {
        let plan = Plan::new(p, mss).unwrap();
        let mut out = vec![0u8; 70000];
        (0..plan.count())
            .map(|i| {
                let n = plan.write(p, i, &mut out).unwrap();
                out[..n].to_vec()
            })
            .collect()
    }

    /// What the kernel does with a NEEDS_CSUM packet written to the TUN.
    fn as_kernel_would(p: &[u8], vnet: &VnetHdr) -> Vec<u8> {
        let mut p = p.to_vec();
        if vnet.flags & F_NEEDS_CSUM != 0 {
            complete_csum(&mut p, vnet).unwrap();
        }
        p
    }

    fn verify_with_etherparse(p: &[u8]) {
        let s = etherparse::SlicedPacket::from_ip(p).expect("etherparse parses it");
        let Some(etherparse::TransportSlice::Tcp(tcp)) = s.transport else { panic!("not TCP") };
        let ok = match s.net {
            Some(etherparse::NetSlice::Ipv4(ip)) => {
                assert_eq!(ip.header().to_header().calc_header_checksum(), ip.header().header_checksum());
                tcp.calc_checksum_ipv4(ip.header().source(), ip.header().destination()).unwrap()
            }
            Some(etherparse::NetSlice::Ipv6(ip)) => {
                tcp.calc_checksum_ipv6(ip.header().source(), ip.header().destination()).unwrap()
            }
            _ => panic!("not IP"),
        };
        assert_eq!(ok, tcp.checksum(), "TCP checksum");
    }

    #[test]
    fn split_then_coalesce_gives_back_the_original() {
        for v6 in [false, true] {
            for payload_len in [1398, 2796, 4000, 20000, 65535 - 72] {
                let original = tcp_packet(v6, payload_len, 0x10 | PSH, 0xffff_f000);
                let segs = split(&original, 1398);
                let (pkts, outs, stats) = run(&segs, 1500);
                assert_eq!(stats.merged as usize, segs.len() - 1, "v6 {v6} len {payload_len}");
                let w = writes(&pkts, &outs);
                assert_eq!(w.len(), 1);
                let (out, vnet) = &w[0];
                if segs.len() > 1 {
                    assert_eq!(vnet.gso_type, if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
                    assert_eq!(vnet.gso_size, 1398);
                    assert_eq!(vnet.hdr_len as usize, if v6 { 72 } else { 52 });
                }
                let fixed = as_kernel_would(out, vnet);
                // The IPv4 ID is the first segment's, as it was in the original.
                assert_eq!(fixed, original, "v6 {v6} len {payload_len}");
                verify_with_etherparse(&fixed);
            }
        }
    }

    #[test]
    fn coalesced_matches_writing_each_segment_alone() {
        // Two interleaved flows, each split; the model: concatenating each
        // flow's payload in order, as the pod would receive it.
        let a = tcp_packet(false, 6000, 0x10, 1000);
        let mut b = tcp_packet(false, 3000, 0x10, 5);
        b[20..22].copy_from_slice(&[0x99, 0x99]);
        fix_checksums(&mut b);
        let (sa, sb) = (split(&a, 1000), split(&b, 1000));
        let mut mixed = Vec::new();
        for i in 0..sa.len().max(sb.len()) {
            mixed.extend(sa.get(i).cloned());
            mixed.extend(sb.get(i).cloned());
        }
        let (pkts, outs, _) = run(&mixed, 1500);
        let out: Vec<Vec<u8>> = writes(&pkts, &outs).iter().map(|(p, v)| as_kernel_would(p, v)).collect();
        assert_eq!(out, vec![a, b]);
    }

    #[test]
    fn merged_segments_are_linked_not_copied_and_a_chain_stops_at_64() {
        let original = tcp_packet(false, 100 * 100, 0x10, 1);
        let segs = split(&original, 100);
        assert_eq!(segs.len(), 100);
        let (pkts, outs, stats) = run(&segs, 1500);
        assert_eq!(stats.merged, 98, "two writes: 64 segments and 36");
        let w = writes(&pkts, &outs);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].0.len(), 52 + 64 * 100);
        // Only the heads' headers were touched; merged packets are as received.
        for (i, (p, s)) in pkts.iter().zip(&segs).enumerate() {
            if outs[i].merged {
                assert_eq!(p, s, "merged segment {i} unchanged");
                assert_eq!(outs[i].skip, 52);
            }
        }
        let payload: Vec<u8> = w.iter().flat_map(|(p, _)| p[52..].to_vec()).collect();
        assert_eq!(payload, original[52..]);
        for (p, v) in &w {
            verify_with_etherparse(&as_kernel_would(p, v));
        }
    }

    /// `tcp_packet` made UDP: a datagram of `payload_len` bytes with a
    /// complete checksum.
    fn udp_packet(v6: bool, payload_len: usize) -> Vec<u8> {
        let mut p = tcp_packet(v6, payload_len + 24, 0, 0);
        let ip_len = if v6 { 40 } else { 20 };
        p[if v6 { 6 } else { 9 }] = 17;
        let l = ((p.len() - ip_len) as u16).to_be_bytes();
        p[ip_len + 4..ip_len + 6].copy_from_slice(&l);
        if !v6 {
            p[10..12].copy_from_slice(&[0, 0]);
            let c = !checksum::fold(checksum::sum(0, &p[..20]));
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        p[ip_len + 6..ip_len + 8].copy_from_slice(&[0, 0]);
        let (s, d) = (parse_ip(&p, 17).unwrap().2, parse_ip(&p, 17).unwrap().3);
        let c = checksum::udp(s, d, &p[ip_len..]).unwrap();
        p[ip_len + 6..ip_len + 8].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn datagrams_of_one_size_join_into_one_uso_write_only_when_the_tun_takes_it() {
        for v6 in [false, true] {
            let original = udp_packet(v6, 64 * 40 + 10);
            let plan = Plan::new(&original, 64).unwrap();
            let mut out = vec![0u8; 200];
            let dgrams: Vec<Vec<u8>> = (0..plan.count())
                .map(|i| {
                    let n = plan.write(&original, i, &mut out).unwrap();
                    out[..n].to_vec()
                })
                .collect();
            assert_eq!(dgrams.len(), 41);
            let (pkts, outs, stats) = run(&dgrams, 1500);
            assert_eq!(stats.merged, 40);
            let w = writes(&pkts, &outs);
            assert_eq!(w.len(), 1);
            let (p, vnet) = &w[0];
            assert_eq!((vnet.gso_type, vnet.gso_size, vnet.csum_offset), (GSO_UDP_L4, 64, 6));
            assert_eq!(as_kernel_would(p, vnet), original, "v6 {v6}");
            // A TUN without USO: every datagram alone, unchanged.
            let mut pkts = dgrams.clone();
            let mut outs = vec![Out::default(); pkts.len()];
            assert_eq!(coalesce(&mut pkts, &mut outs, 1500, false).merged, 0);
            assert_eq!(pkts, dgrams);
            // A bad checksum, or a longer datagram after a shorter one, is not joined.
            let mut bad = dgrams[1].clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert_eq!(run(&[dgrams[0].clone(), bad], 1500).2.merged, 0);
            assert_eq!(run(&[dgrams[40].clone(), dgrams[0].clone()], 1500).2.merged, 0);
        }
    }

    #[test]
    fn what_must_not_be_merged_is_not() {
        let base = tcp_packet(false, 3000, 0x10, 100);
        let segs = split(&base, 1000);
        // A gap in sequence numbers.
        assert_eq!(run(&[segs[0].clone(), segs[2].clone()], 1500).2.merged, 0);
        // A bad checksum in the second segment: written alone, unchanged.
        let mut bad = segs[1].clone();
        bad[60] ^= 0xff;
        let (pkts, outs, stats) = run(&[segs[0].clone(), bad.clone(), segs[2].clone()], 1500);
        assert_eq!(stats.merged, 0);
        assert_eq!(writes(&pkts, &outs)[1].0, bad);
        // A SYN, a FIN, a different ACK, a different TTL, different options.
        for (at, xor) in [(33usize, SYN), (33, FIN), (28, 1), (8, 1), (45, 1)] {
            let mut odd = segs[1].clone();
            odd[at] ^= xor;
            fix_checksums(&mut odd);
            assert_eq!(run(&[segs[0].clone(), odd], 1500).2.merged, 0, "byte {at} ^ {xor:#x}");
        }
        // After a PSH nothing is appended; a short segment closes too.
        let mut psh = segs[0].clone();
        psh[33] |= PSH;
        fix_checksums(&mut psh);
        assert_eq!(run(&[psh, segs[1].clone()], 1500).2.merged, 0);
        let short = split(&tcp_packet(false, 1500, 0x10, 100), 1000);
        let next = split(&tcp_packet(false, 1000, 0x10, 1600), 1000);
        assert_eq!(run(&[short[0].clone(), short[1].clone(), next[0].clone()], 1500).2.merged, 1);
    }

    #[test]
    fn oversized_and_partial_packets_go_to_the_kernel_partial() {
        let big = tcp_packet(true, 8000, 0x10, 7);
        let (pkts, outs, stats) = run(std::slice::from_ref(&big), 1450);
        assert_eq!(stats.oversized, 1);
        assert_eq!(outs[0].vnet.gso_size as usize, 1450 - 72);
        assert_eq!(as_kernel_would(&pkts[0], &outs[0].vnet), big);
        // A single segment with a partial checksum: NEEDS_CSUM, not computed here.
        let mut p = tcp_packet(false, 100, 0x10, 7);
        let seg = parse_tcp(&p).unwrap();
        let len = p.len();
        set_seed(&mut p, &seg, len);
        let (pkts, outs, _) = run(std::slice::from_ref(&p), 1450);
        assert_eq!(outs[0].vnet.flags, F_NEEDS_CSUM);
        assert_eq!(as_kernel_would(&pkts[0], &outs[0].vnet), tcp_packet(false, 100, 0x10, 7));
    }
}
