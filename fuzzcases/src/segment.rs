//! Arbitrary packets, MTUs and scratch sizes through `segment_tcp`.
//!
//! Input: two bytes of MTU and two of scratch length (each masked to 14
//! bits, so jumbo MTUs are covered), then the packet. The MTU's top bit asks
//! for a fix-up that libFuzzer would take long to find by itself: the packet
//! is made TCP (protocol 6, IPv4 not a fragment) with its IP length field set
//! to its real length. With that bit clear the packet goes through as given.
//!
//! On success a packet that fits is emitted once, unchanged (cut to its IP
//! length). Otherwise every segment is at most `mtu` bytes and fits the
//! scratch, all but the last are exactly `mtu`, each carries the original
//! headers with only length, IPv4 ID, sequence number, flags and checksums
//! changed, its IP length and checksums are right, sequence numbers follow
//! on, and the payloads joined are the original payload. On failure nothing
//! was emitted.

use std::net::IpAddr;

use weft_engine::segment::segment_tcp;
use weft_tunnel::checksum;

const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
const CWR: u8 = 0x80;

/// Runs one input through the invariants above; panics on a broken one.
pub fn run(data: &[u8]) {
    let [m0, m1, s0, s1, ref raw @ ..] = *data else {
        return;
    };
    let mut packet = raw.to_vec();
    if m0 & 0x80 != 0 {
        weft_testkit::fix_up_tcp(&mut packet);
    }
    let packet = &packet[..];
    let mtu = (u16::from_be_bytes([m0, m1]) & 0x3fff) as usize;
    let mut scratch = vec![0u8; (u16::from_be_bytes([s0, s1]) & 0x3fff) as usize];
    let scratch_len = scratch.len();
    let mut segs: Vec<Vec<u8>> = Vec::new();
    let result = segment_tcp(packet, mtu, &mut scratch, |s| segs.push(s.to_vec()));
    let n = match result {
        Ok(n) => n,
        Err(_) => {
            assert!(segs.is_empty(), "emitted segments and then failed");
            return;
        }
    };
    assert_eq!(n, segs.len(), "returned count is not the number emitted");
    assert!(n >= 1);

    // Accepted, so the IP header is there and its version is 4 or 6.
    let v4 = packet[0] >> 4 == 4;
    let (ip_len, total) = if v4 {
        (((packet[0] & 0x0f) as usize) * 4, u16::from_be_bytes([packet[2], packet[3]]) as usize)
    } else {
        assert_eq!(packet[0] >> 4, 6);
        (40, 40 + u16::from_be_bytes([packet[4], packet[5]]) as usize)
    };
    assert!(total <= packet.len());
    let packet = &packet[..total];

    if total <= mtu {
        assert_eq!(n, 1);
        assert_eq!(segs[0], packet, "a packet that fits is emitted unchanged");
        return;
    }

    let tcp = &packet[ip_len..];
    let hdr_len = ip_len + ((tcp[12] >> 4) as usize) * 4;
    let payload = &packet[hdr_len..];
    assert!(mtu > hdr_len);
    let mss = mtu - hdr_len;
    assert_eq!(n, payload.len().div_ceil(mss));
    let (src, dst): (IpAddr, IpAddr) = if v4 {
        (<[u8; 4]>::try_from(&packet[12..16]).unwrap().into(), <[u8; 4]>::try_from(&packet[16..20]).unwrap().into())
    } else {
        (<[u8; 16]>::try_from(&packet[8..24]).unwrap().into(), <[u8; 16]>::try_from(&packet[24..40]).unwrap().into())
    };
    let seq0 = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let id0 = u16::from_be_bytes([packet[4], packet[5]]);
    let flags0 = tcp[13];

    let mut joined = Vec::with_capacity(payload.len());
    let mut seq = seq0;
    for (i, s) in segs.iter().enumerate() {
        let last = i + 1 == n;
        assert!(s.len() <= mtu, "segment {i} of {} bytes over mtu {mtu}", s.len());
        assert!(s.len() <= scratch_len);
        assert!(s.len() > hdr_len, "segment {i} without payload");
        if !last {
            assert_eq!(s.len(), mtu, "segment {i} before the last is not full");
        }

        // Headers: the original's, but for the fields a cut must change.
        let mut expect = packet[..hdr_len].to_vec();
        let mut got = s[..hdr_len].to_vec();
        if v4 {
            assert_eq!(u16::from_be_bytes([s[2], s[3]]) as usize, s.len());
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), id0.wrapping_add(i as u16), "IPv4 IDs follow on");
            assert_eq!(checksum::fold(checksum::sum(0, &s[..ip_len])), 0xffff, "IPv4 header checksum");
            for r in [2..6, 10..12] {
                expect[r.clone()].fill(0);
                got[r].fill(0);
            }
        } else {
            assert_eq!(u16::from_be_bytes([s[4], s[5]]) as usize + 40, s.len());
            expect[4..6].fill(0);
            got[4..6].fill(0);
        }
        let t = &s[ip_len..];
        assert_eq!(u32::from_be_bytes([t[4], t[5], t[6], t[7]]), seq, "sequence numbers follow on");
        let flags = t[13];
        let mut want = flags0;
        if !last {
            want &= !(FIN | PSH);
        }
        if i > 0 {
            want &= !CWR;
        }
        assert_eq!(flags, want, "flags of segment {i}");
        let pseudo = checksum::pseudo_header(src, dst, 6, t.len() as u32).unwrap();
        assert_eq!(checksum::fold(checksum::sum(pseudo, t)), 0xffff, "TCP checksum of segment {i}");
        for r in [ip_len + 4..ip_len + 8, ip_len + 13..ip_len + 14, ip_len + 16..ip_len + 18] {
            expect[r.clone()].fill(0);
            got[r].fill(0);
        }
        assert_eq!(got, expect, "segment {i} changed a header field it should keep");

        let data = &s[hdr_len..];
        seq = seq.wrapping_add(data.len() as u32);
        joined.extend_from_slice(data);
    }
    assert_eq!(joined, payload, "joined payloads differ from the original");
}
