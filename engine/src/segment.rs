//! Software segmentation of TCP super-packets (software GSO).
//!
//! Linux senders hand 64 KiB TCP segments to devices that promise to cut
//! them (TSO). Over veth, or between VMs on one host, no device does, and a
//! VXLAN datagram can reach our UDP socket carrying one such super-packet.
//! Before it is written to the TUN it is cut here into segments that fit the
//! pod MTU, each with its own IP length, IPv4 ID and checksums, TCP sequence
//! number and flags (FIN and PSH only on the last segment, CWR only on the
//! first), the way the kernel's own `tcp_gso_segment` cuts them. Only TCP
//! directly after the IP header is cut; anything else is left alone.
//!
//! The same cut serves the TUN's super-packets (TSO, and USO for UDP: each
//! segment then a datagram with its own length and checksum): [`Plan`] parses
//! a super-packet once and writes segment `i` straight into the buffer it
//! will be encapsulated and sent from, with the `gso_size` the virtio-net
//! header gave as the payload per segment.

use std::net::IpAddr;

use weft_tunnel::checksum;

/// Why a packet was not segmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentError {
    /// Not TCP over IPv4/IPv6 without options that prevent cutting.
    NotTcp,
    /// Headers malformed or lengths inconsistent.
    Malformed,
    /// The MTU leaves no room for payload.
    MtuTooSmall,
    /// The scratch buffer is smaller than one segment.
    NoRoom,
}

/// The transport a super-packet carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP: sequence numbers advance, FIN/PSH only on the last segment, CWR
    /// only on the first.
    Tcp,
    /// UDP (USO): every segment is a datagram of its own.
    Udp,
}

/// How a super-packet is cut: parsed once, then each segment is written
/// with [`Plan::write`] into a buffer the caller chose, so segments land
/// where they are sent from without an intermediate copy.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    transport: Transport,
    v4: bool,
    ip_len: usize,
    hdr_len: usize,
    total: usize,
    mss: usize,
    count: usize,
    src: IpAddr,
    dst: IpAddr,
    seq0: u32,
    id0: u16,
    flags0: u8,
}

impl Plan {
    /// Plans cutting `packet` (a TCP or UDP super-packet over IPv4/IPv6
    /// without extension headers) into segments of `mss` payload bytes.
    pub fn new(packet: &[u8], mss: usize) -> Result<Plan, SegmentError> {
        let first = *packet.first().ok_or(SegmentError::Malformed)?;
        let (ip_len, total, src, dst, v4, proto) = match first >> 4 {
            4 if packet.len() >= 20 => {
                let ihl = ((first & 0x0f) as usize) * 4;
                let total = u16::from_be_bytes([packet[2], packet[3]]) as usize;
                let frag = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff;
                if ihl < 20 || total < ihl || total > packet.len() || frag != 0 {
                    return Err(SegmentError::Malformed);
                }
                let s: [u8; 4] = packet[12..16].try_into().map_err(|_| SegmentError::Malformed)?;
                let d: [u8; 4] = packet[16..20].try_into().map_err(|_| SegmentError::Malformed)?;
                (ihl, total, IpAddr::from(s), IpAddr::from(d), true, packet[9])
            }
            6 if packet.len() >= 40 => {
                let total = 40 + u16::from_be_bytes([packet[4], packet[5]]) as usize;
                if total > packet.len() {
                    return Err(SegmentError::Malformed);
                }
                let s: [u8; 16] = packet[8..24].try_into().map_err(|_| SegmentError::Malformed)?;
                let d: [u8; 16] = packet[24..40].try_into().map_err(|_| SegmentError::Malformed)?;
                (40, total, IpAddr::from(s), IpAddr::from(d), false, packet[6])
            }
            _ => return Err(SegmentError::NotTcp),
        };
        let (transport, l4_len) = match proto {
            6 => {
                let tcp = packet.get(ip_len..ip_len + 20).ok_or(SegmentError::Malformed)?;
                (Transport::Tcp, ((tcp[12] >> 4) as usize) * 4)
            }
            17 => (Transport::Udp, 8),
            _ => return Err(SegmentError::NotTcp),
        };
        let hdr_len = ip_len + l4_len;
        let min_l4 = if transport == Transport::Tcp { 20 } else { 8 };
        if l4_len < min_l4 || hdr_len > total {
            return Err(SegmentError::Malformed);
        }
        if mss == 0 {
            return Err(SegmentError::MtuTooSmall);
        }
        let l4 = &packet[ip_len..];
        let (seq0, flags0) = match transport {
            Transport::Tcp => (u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]), l4[13]),
            Transport::Udp => (0, 0),
        };
        Ok(Plan {
            transport,
            v4,
            ip_len,
            hdr_len,
            total,
            mss,
            count: (total - hdr_len).div_ceil(mss).max(1),
            src,
            dst,
            seq0,
            id0: if v4 { u16::from_be_bytes([packet[4], packet[5]]) } else { 0 },
            flags0,
        })
    }

    /// Number of segments.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Length of the IP and transport headers each segment repeats.
    pub fn hdr_len(&self) -> usize {
        self.hdr_len
    }

    /// The largest segment, in bytes.
    pub fn max_segment_len(&self) -> usize {
        self.hdr_len + self.mss.min(self.total - self.hdr_len)
    }

    /// The transport being cut.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Where segment `i`'s payload lies in the packet.
    pub fn payload(&self, i: usize) -> std::ops::Range<usize> {
        let from = (self.hdr_len + i * self.mss).min(self.total);
        from..(from + self.mss).min(self.total)
    }

    /// Writes segment `i` of `packet` (the packet [`Plan::new`] was given)
    /// into `out`, with its own lengths, IPv4 ID and checksums, and returns
    /// its length.
    pub fn write(&self, packet: &[u8], i: usize, out: &mut [u8]) -> Result<usize, SegmentError> {
        let chunk = packet.get(self.payload(i)).ok_or(SegmentError::Malformed)?;
        let len = self.hdr_len + chunk.len();
        let seg = out.get_mut(..len).ok_or(SegmentError::NoRoom)?;
        let payload_sum = checksum::copy_and_sum(0, &mut seg[self.hdr_len..], chunk);
        self.write_header(packet, i, seg, payload_sum)?;
        Ok(len)
    }

    /// Writes only the headers of segment `i` into `out` (its payload is
    /// sent from where it lies, [`Plan::payload`]), given the one's
    /// complement sum of that payload; returns the headers' length.
    pub fn write_header(
        &self,
        packet: &[u8],
        i: usize,
        out: &mut [u8],
        payload_sum: u64,
    ) -> Result<usize, SegmentError> {
        if i >= self.count || packet.len() < self.total {
            return Err(SegmentError::Malformed);
        }
        let len = self.hdr_len + self.payload(i).len();
        let hdr = out.get_mut(..self.hdr_len).ok_or(SegmentError::NoRoom)?;
        hdr.copy_from_slice(&packet[..self.hdr_len]);
        let ip_len = self.ip_len;
        if self.v4 {
            hdr[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            hdr[4..6].copy_from_slice(&self.id0.wrapping_add(i as u16).to_be_bytes());
            hdr[10..12].copy_from_slice(&[0, 0]);
            let c = !checksum::fold(checksum::sum(0, &hdr[..ip_len]));
            hdr[10..12].copy_from_slice(&c.to_be_bytes());
        } else {
            hdr[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        }
        let l4_len = (len - ip_len) as u32;
        let t = &mut hdr[ip_len..];
        let (proto, field) = match self.transport {
            Transport::Tcp => {
                let seq = self.seq0.wrapping_add((i * self.mss) as u32);
                t[4..8].copy_from_slice(&seq.to_be_bytes());
                let mut flags = self.flags0;
                if i + 1 < self.count {
                    flags &= !(0x01 | 0x08); // FIN, PSH
                }
                if i > 0 {
                    flags &= !0x80; // CWR
                }
                t[13] = flags;
                (6, 16)
            }
            Transport::Udp => {
                t[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
                (17, 6)
            }
        };
        t[field..field + 2].copy_from_slice(&[0, 0]);
        let pseudo = checksum::pseudo_header(self.src, self.dst, proto, l4_len).ok_or(SegmentError::Malformed)?;
        // The transport header has an even length, so the payload's sum
        // adds on as it would over the whole segment.
        let head = checksum::fold(checksum::sum(pseudo, t)) as u64;
        let mut c = !checksum::fold(head + checksum::fold(payload_sum) as u64);
        if proto == 17 && c == 0 {
            c = 0xffff;
        }
        t[field..field + 2].copy_from_slice(&c.to_be_bytes());
        Ok(self.hdr_len)
    }
}

/// Cuts the TCP/IP `packet` into segments of at most `mtu` bytes, building
/// each in `scratch` and handing it to `emit`. Returns the number of
/// segments. A packet that already fits is emitted unchanged.
pub fn segment_tcp(
    packet: &[u8],
    mtu: usize,
    scratch: &mut [u8],
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, SegmentError> {
    let probe = Plan::new(packet, 1)?;
    if probe.transport != Transport::Tcp {
        return Err(SegmentError::NotTcp);
    }
    let packet = &packet[..probe.total];
    if probe.total <= mtu {
        emit(packet);
        return Ok(1);
    }
    let mss = mtu.checked_sub(probe.hdr_len).filter(|m| *m > 0).ok_or(SegmentError::MtuTooSmall)?;
    let plan = Plan::new(packet, mss)?;
    if scratch.len() < plan.max_segment_len() {
        return Err(SegmentError::NoRoom);
    }
    for i in 0..plan.count {
        let len = plan.write(packet, i, scratch)?;
        emit(&scratch[..len]);
    }
    Ok(plan.count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_packet(v6: bool, payload_len: usize, flags: u8) -> Vec<u8> {
        let ip_len = if v6 { 40 } else { 20 };
        let total = ip_len + 20 + payload_len;
        let mut p = vec![0u8; total];
        let (src, dst): (IpAddr, IpAddr) = if v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            p[6] = 6;
            p[7] = 64;
            p[8..24].copy_from_slice(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
            p[24..40].copy_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
            ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap())
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[4..6].copy_from_slice(&0xfff0u16.to_be_bytes());
            p[6] = 0x40;
            p[8] = 64;
            p[9] = 6;
            p[12..16].copy_from_slice(&[10, 244, 3, 2]);
            p[16..20].copy_from_slice(&[10, 244, 1, 2]);
            ([10, 244, 3, 2].into(), [10, 244, 1, 2].into())
        };
        let t = &mut p[ip_len..];
        t[4..8].copy_from_slice(&0xffff_ff00u32.to_be_bytes());
        t[12] = 0x50;
        t[13] = flags;
        for (i, b) in t[20..].iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        let c = !checksum::fold(checksum::sum(checksum::pseudo_header(src, dst, 6, t.len() as u32).unwrap(), t));
        t[16..18].copy_from_slice(&c.to_be_bytes());
        if !v6 {
            let c = !checksum::fold(checksum::sum(0, &p[..20]));
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        p
    }

    fn check_segment(seg: &[u8], v6: bool) -> (u32, u8, Vec<u8>) {
        let ip_len = if v6 { 40 } else { 20 };
        let (src, dst): (IpAddr, IpAddr) = if v6 {
            (<[u8; 16]>::try_from(&seg[8..24]).unwrap().into(), <[u8; 16]>::try_from(&seg[24..40]).unwrap().into())
        } else {
            assert_eq!(checksum::fold(checksum::sum(0, &seg[..20])), 0xffff, "IPv4 header checksum");
            assert_eq!(u16::from_be_bytes([seg[2], seg[3]]) as usize, seg.len());
            (<[u8; 4]>::try_from(&seg[12..16]).unwrap().into(), <[u8; 4]>::try_from(&seg[16..20]).unwrap().into())
        };
        let t = &seg[ip_len..];
        let pseudo = checksum::pseudo_header(src, dst, 6, t.len() as u32).unwrap();
        assert_eq!(checksum::fold(checksum::sum(pseudo, t)), 0xffff, "TCP checksum");
        (u32::from_be_bytes([t[4], t[5], t[6], t[7]]), t[13], t[20..].to_vec())
    }

    #[test]
    fn cut_then_joined_gives_the_original_payload() {
        for v6 in [false, true] {
            for payload_len in [1, 1409, 1410, 1411, 30000, 65000 - 60] {
                let p = tcp_packet(v6, payload_len, 0x18 | 0x01 | 0x80); // PSH ACK FIN CWR
                let mut scratch = vec![0u8; 2000];
                let mut segs = Vec::new();
                let n = segment_tcp(&p, 1450, &mut scratch, |s| segs.push(s.to_vec())).unwrap();
                assert_eq!(n, segs.len());
                let mut joined = Vec::new();
                let mut expected_seq = 0xffff_ff00u32;
                for (i, s) in segs.iter().enumerate() {
                    assert!(s.len() <= 1450, "segment of {} bytes", s.len());
                    let (seq, flags, payload) = check_segment(s, v6);
                    assert_eq!(seq, expected_seq, "sequence numbers follow on (and wrap)");
                    expected_seq = expected_seq.wrapping_add(payload.len() as u32);
                    let last = i + 1 == segs.len();
                    assert_eq!(flags & 0x01 != 0, last, "FIN only on the last");
                    assert_eq!(flags & 0x08 != 0, last, "PSH only on the last");
                    assert_eq!(flags & 0x80 != 0, i == 0, "CWR only on the first");
                    assert_eq!(flags & 0x10, 0x10, "ACK on all");
                    joined.extend(payload);
                }
                let hdr = if v6 { 60 } else { 40 };
                assert_eq!(joined, p[hdr..], "v6 {v6} len {payload_len}");
            }
        }
    }

    #[test]
    fn a_udp_super_packet_becomes_datagrams_with_their_own_lengths_and_checksums() {
        for v6 in [false, true] {
            let mut p = tcp_packet(v6, 3000, 0);
            let ip_len = if v6 { 40 } else { 20 };
            if v6 {
                p[6] = 17;
            } else {
                p[9] = 17;
            }
            let (src, dst): (IpAddr, IpAddr) = if v6 {
                ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap())
            } else {
                ([10, 244, 3, 2].into(), [10, 244, 1, 2].into())
            };
            let plan = Plan::new(&p, 1200).unwrap();
            assert_eq!(plan.transport(), Transport::Udp);
            assert_eq!(plan.count(), (3020 - 8usize).div_ceil(1200));
            let mut out = vec![0u8; 2000];
            let mut joined = Vec::new();
            for i in 0..plan.count() {
                let n = plan.write(&p, i, &mut out).unwrap();
                let u = &out[ip_len..n];
                assert_eq!(u16::from_be_bytes([u[4], u[5]]) as usize, u.len(), "UDP length");
                assert!(checksum::verify_udp(src, dst, u), "UDP checksum of datagram {i}");
                joined.extend_from_slice(&u[8..]);
            }
            assert_eq!(joined, p[ip_len + 8..]);
        }
    }

    #[test]
    fn headers_alone_plus_payload_in_place_equal_the_whole_segment() {
        // What the gathered send puts on the wire (headers written apart,
        // the payload sent from the super-packet) is byte for byte what
        // `write` builds, for TCP and UDP, IPv4 and IPv6, odd and even cuts.
        for v6 in [false, true] {
            for udp in [false, true] {
                for mss in [1000, 1001] {
                    let mut p = tcp_packet(v6, 4321, 0x18);
                    if udp {
                        p[if v6 { 6 } else { 9 }] = 17;
                    }
                    let plan = Plan::new(&p, mss).unwrap();
                    let mut whole = vec![0u8; 2000];
                    let mut hdr = vec![0u8; 100];
                    for i in 0..plan.count() {
                        let n = plan.write(&p, i, &mut whole).unwrap();
                        let payload = &p[plan.payload(i)];
                        let h = plan.write_header(&p, i, &mut hdr, checksum::sum(0, payload)).unwrap();
                        assert_eq!(h, plan.hdr_len());
                        assert_eq!(
                            [&hdr[..h], payload].concat(),
                            whole[..n],
                            "v6 {v6} udp {udp} mss {mss} segment {i}"
                        );
                    }
                    assert_eq!(plan.write_header(&p, plan.count(), &mut hdr, 0), Err(SegmentError::Malformed));
                }
            }
        }
    }

    #[test]
    fn refuses_what_it_cannot_cut() {
        let mut scratch = vec![0u8; 2000];
        let mut udp = tcp_packet(false, 3000, 0x10);
        udp[9] = 17;
        assert_eq!(segment_tcp(&udp, 1450, &mut scratch, |_| {}), Err(SegmentError::NotTcp));
        let p = tcp_packet(false, 3000, 0x10);
        assert_eq!(segment_tcp(&p, 40, &mut scratch, |_| {}), Err(SegmentError::MtuTooSmall));
        assert_eq!(segment_tcp(&p, 1450, &mut [0u8; 100], |_| {}), Err(SegmentError::NoRoom));
        assert_eq!(segment_tcp(&p[..2000], 1450, &mut scratch, |_| {}), Err(SegmentError::Malformed));
        for len in 0..60 {
            let _ = segment_tcp(&vec![0x45; len], 1450, &mut scratch, |_| {});
        }
        // A TCP data offset below 5 words (found by the vnet_coalesce fuzz
        // target: it made Plan::write index past the segment's header).
        let mut short_doff = tcp_packet(false, 3000, 0x10);
        short_doff[32] = 0x10;
        assert_eq!(Plan::new(&short_doff, 1000).unwrap_err(), SegmentError::Malformed);
    }
}
