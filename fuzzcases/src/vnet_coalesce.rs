//! Arbitrary virtio-net headers and packets through the offload path:
//! `VnetHdr::parse`, `Plan` (software GSO, as a TUN read is cut), then
//! `coalesce` (software GRO, as received segments are joined) and the
//! checksum completion the kernel does for a `NEEDS_CSUM` write.
//!
//! Input: 10 bytes of virtio-net header, then the packet. The header's
//! `gso_size` top bit asks for a fix-up libFuzzer would take long to find:
//! the packet's IP length is made its real length and its protocol TCP.
//!
//! Invariants: nothing panics; every segment is at most its headers plus
//! `gso_size`; coalescing only removes the headers of the segments it
//! merges (length accounting); every live output fits a TUN write and its
//! `NEEDS_CSUM` range lies inside it; when everything merged back into one
//! packet, that packet, completed as the kernel would, is the original
//! (its IPv4 header checksum and TCP or UDP checksum aside, which the
//! original may have had wrong). UDP datagrams are joined too (a TUN with
//! USO).

use weft_engine::coalesce::{coalesce, parts, Out, MAX_COALESCED};
use weft_engine::segment::{Plan, Transport};
use weft_engine::vnet::{complete_csum, VnetHdr, F_NEEDS_CSUM};

/// Runs one input through the invariants above; panics on a broken one.
pub fn run(data: &[u8]) {
    if data.len() < 10 {
        assert!(VnetHdr::parse(data).is_err());
        return;
    }
    let Ok(mut hdr) = VnetHdr::parse(data) else { return };
    let mut packet = data[10..].to_vec();
    if hdr.gso_size & 0x8000 != 0 {
        hdr.gso_size &= 0x7fff;
        weft_testkit::fix_up_tcp(&mut packet);
    }
    let mss = (hdr.gso_size as usize).max(1);
    let Ok(plan) = Plan::new(&packet, mss) else { return };
    if plan.count() > 64 {
        return;
    }
    let mut pkts: Vec<Vec<u8>> = Vec::new();
    for i in 0..plan.count() {
        let mut b = vec![0u8; plan.hdr_len() + mss];
        let Ok(len) = plan.write(&packet, i, &mut b) else { return };
        assert!(len <= plan.hdr_len() + mss, "segment {i} of {len} bytes");
        b.truncate(len);
        pkts.push(b);
    }
    let in_bytes: usize = pkts.iter().map(Vec::len).sum();
    let mtu = plan.hdr_len() + mss;
    let mut outs = vec![Out::default(); pkts.len()];
    let stats = coalesce(&mut pkts, &mut outs, mtu, true);
    let mut outs_bytes = Vec::new();
    for i in (0..pkts.len()).filter(|i| !outs[*i].merged) {
        let mut p = parts(&pkts, &outs, i).collect::<Vec<_>>().concat();
        assert!(p.len() <= MAX_COALESCED);
        if outs[i].vnet.flags & F_NEEDS_CSUM != 0 {
            complete_csum(&mut p, &outs[i].vnet).expect("NEEDS_CSUM range inside the packet");
        }
        outs_bytes.push(p);
    }
    let out_bytes: usize = outs_bytes.iter().map(Vec::len).sum();
    assert_eq!(out_bytes + stats.merged as usize * plan.hdr_len(), in_bytes, "length accounting");
    let mut outs = outs_bytes;
    if plan.count() > 1 && outs.len() == 1 {
        let total = match packet[0] >> 4 {
            4 => u16::from_be_bytes([packet[2], packet[3]]) as usize,
            _ => 40 + u16::from_be_bytes([packet[4], packet[5]]) as usize,
        };
        let mut want = packet[..total].to_vec();
        let mut got = outs.remove(0);
        // Merging needs IPv4 without options or IPv6 without extensions.
        let ip_len = if want[0] >> 4 == 4 { 20 } else { 40 };
        let csum = if plan.transport() == Transport::Tcp { 16 } else { 6 };
        for p in [&mut want, &mut got] {
            if p[0] >> 4 == 4 {
                p[10..12].fill(0);
            }
            p[ip_len + csum..ip_len + csum + 2].fill(0);
            if csum == 6 {
                // The original's UDP length is whatever the input said.
                p[ip_len + 4..ip_len + 6].fill(0);
            }
        }
        assert_eq!(got, want, "split then coalesced is not the original");
    }
}
