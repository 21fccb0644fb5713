//! The virtio-net header a TUN opened with `IFF_VNET_HDR` puts in front of
//! every packet, in both directions.
//!
//! On read it says whether the kernel handed us a super-packet (TSO/USO:
//! `gso_type`, `gso_size`) and whether the transport checksum is still to
//! be completed (`NEEDS_CSUM` with `csum_start`/`csum_offset`). On write it
//! tells the kernel the same about what we inject: `GSO_NONE` for a single
//! packet with a complete checksum, a GSO type for a coalesced one. Parsing
//! and emitting are pure; this module never reads or writes a device, and it
//! only knows the fields of the 10-byte legacy header (no `num_buffers`, no
//! hash report: the TUN is opened without them).

use weft_tunnel::checksum;

/// Length of the header on the wire: `struct virtio_net_hdr`.
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset`
/// holds only the pseudo-header seed.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksum was verified.
pub const F_DATA_VALID: u8 = 2;

/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_UDP_L4` (USO, both families).
pub const GSO_UDP_L4: u8 = 5;
/// `VIRTIO_NET_HDR_GSO_ECN` flag bit of `gso_type`.
pub const GSO_ECN: u8 = 0x80;

/// A parsed virtio-net header (host byte order fields; the TUN is opened
/// without `TUNSETVNETBE`, so the wire is little-endian on every host we run on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `F_NEEDS_CSUM` / `F_DATA_VALID`.
    pub flags: u8,
    /// `GSO_*`, possibly with `GSO_ECN`.
    pub gso_type: u8,
    /// Length of the headers (IP + transport) of a GSO packet.
    pub hdr_len: u16,
    /// Payload bytes per segment of a GSO packet.
    pub gso_size: u16,
    /// Where checksumming starts (the transport header).
    pub csum_start: u16,
    /// Where, from `csum_start`, the checksum field lies.
    pub csum_offset: u16,
}

/// Why a header (or the packet it describes) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VnetError {
    /// Fewer than [`VNET_HDR_LEN`] bytes.
    Short,
    /// A GSO type we do not handle (UFO, unknown).
    UnknownGso,
    /// `csum_start`/`csum_offset` outside the packet.
    BadCsumRange,
}

impl VnetHdr {
    /// Parses the first [`VNET_HDR_LEN`] bytes of `b`.
    pub fn parse(b: &[u8]) -> Result<VnetHdr, VnetError> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN).and_then(|s| s.try_into().ok()).ok_or(VnetError::Short)?;
        let h = VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16::from_le_bytes([b[2], b[3]]),
            gso_size: u16::from_le_bytes([b[4], b[5]]),
            csum_start: u16::from_le_bytes([b[6], b[7]]),
            csum_offset: u16::from_le_bytes([b[8], b[9]]),
        };
        match h.gso_type & !GSO_ECN {
            GSO_NONE | GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4 => Ok(h),
            _ => Err(VnetError::UnknownGso),
        }
    }

    /// Writes the header into `out` (at least [`VNET_HDR_LEN`] bytes).
    pub fn emit(&self, out: &mut [u8; VNET_HDR_LEN]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    /// The header bytes.
    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        self.emit(&mut b);
        b
    }

    /// Whether this describes a super-packet to be cut.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }
}

/// Completes the checksum a `NEEDS_CSUM` header leaves partial: the one's
/// complement sum from `csum_start` to the end of `packet` (the field holds
/// the pseudo-header seed) is folded, inverted and written at
/// `csum_start + csum_offset`. A UDP result of zero is sent as 0xffff.
pub fn complete_csum(packet: &mut [u8], hdr: &VnetHdr) -> Result<(), VnetError> {
    let start = hdr.csum_start as usize;
    let field = start + hdr.csum_offset as usize;
    if field + 2 > packet.len() {
        return Err(VnetError::BadCsumRange);
    }
    let mut c = !checksum::fold(checksum::sum(0, &packet[start..]));
    if hdr.csum_offset == 6 && c == 0 {
        c = 0xffff;
    }
    packet[field..field + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_emit_round_trip() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: 1398,
            csum_start: 20,
            csum_offset: 16,
        };
        let b = h.to_bytes();
        assert_eq!(b, [1, 1, 52, 0, 0x76, 0x05, 20, 0, 16, 0]);
        assert_eq!(VnetHdr::parse(&b), Ok(h));
        assert!(h.is_gso());
        assert_eq!(VnetHdr::parse(&b[..9]), Err(VnetError::Short));
        let mut ufo = b;
        ufo[1] = 3;
        assert_eq!(VnetHdr::parse(&ufo), Err(VnetError::UnknownGso));
    }

    #[test]
    fn completes_a_partial_tcp_checksum() {
        // TCP/IPv4 with 11 payload bytes, field seeded with the pseudo-header sum.
        let mut p = vec![0u8; 20 + 20 + 11];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p[32] = 0x50;
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = i as u8 * 13;
        }
        let (s, d) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let seed = checksum::fold(checksum::pseudo_header(s, d, 6, 31).unwrap());
        p[36..38].copy_from_slice(&seed.to_be_bytes());
        let h = VnetHdr { flags: F_NEEDS_CSUM, csum_start: 20, csum_offset: 16, ..Default::default() };
        complete_csum(&mut p, &h).unwrap();
        let sum = checksum::fold(checksum::sum(checksum::pseudo_header(s, d, 6, 31).unwrap(), &p[20..]));
        assert_eq!(sum, 0xffff);
        let far = VnetHdr { csum_start: 40, csum_offset: 16, ..h };
        assert_eq!(complete_csum(&mut p, &far), Err(VnetError::BadCsumRange));
    }
}
