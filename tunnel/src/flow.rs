//! Inner-flow hashing and the outer UDP source port derived from it.
//!
//! Like the kernel's `udp_flow_src_port`, the source port of an encapsulated
//! packet is a hash of the inner flow scaled into the ephemeral port range,
//! so that receivers (RSS, `SO_REUSEPORT`) can spread flows while every packet
//! of one flow takes one path and stays in order. The hash is ours; only its
//! properties (stable per flow, spread across flows) matter on the wire.

/// Lowest outer source port (the kernel's default `ip_local_port_range`).
pub const SRC_PORT_MIN: u16 = 32768;
/// Highest outer source port, inclusive.
pub const SRC_PORT_MAX: u16 = 60999;

/// Hash of an IP packet's flow: addresses, protocol, and the transport ports
/// for TCP, UDP and SCTP when the packet is not a non-first fragment.
/// Packets too short to carry a flow hash to zero.
pub fn hash(ip: &[u8]) -> u32 {
    let Some(&first) = ip.first() else { return 0 };
    let mut h = Mixer::default();
    let (proto, l4) = match first >> 4 {
        4 if ip.len() >= 20 => {
            let ihl = ((first & 0x0f) as usize) * 4;
            h.add(&ip[12..20]);
            let frag_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
            let l4 = if frag_offset == 0 { ip.get(ihl..) } else { None };
            (ip[9], l4)
        }
        6 if ip.len() >= 40 => {
            h.add(&ip[8..40]);
            (ip[6], ip.get(40..))
        }
        _ => return 0,
    };
    h.add(&[proto]);
    if let (6 | 17 | 132, Some(l4)) = (proto, l4) {
        if let Some(ports) = l4.get(..4) {
            h.add(ports);
        }
    }
    h.finish()
}

/// Outer UDP source port for an inner flow hash.
pub fn src_port(hash: u32) -> u16 {
    let range = (SRC_PORT_MAX - SRC_PORT_MIN + 1) as u64;
    SRC_PORT_MIN + ((hash as u64 * range) >> 32) as u16
}

/// A small multiplicative mixer (FxHash steps with a final avalanche).
#[derive(Default)]
struct Mixer(u64);

impl Mixer {
    const K: u64 = 0x517c_c1b7_2722_0a95;

    fn add(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(Self::K);
        }
    }

    fn finish(&self) -> u32 {
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp4(src_port: u16, dst_port: u16) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 244, 1, 2]);
        p[16..20].copy_from_slice(&[10, 244, 2, 2]);
        p[20..22].copy_from_slice(&src_port.to_be_bytes());
        p[22..24].copy_from_slice(&dst_port.to_be_bytes());
        p
    }

    #[test]
    fn same_flow_same_port_other_flows_spread() {
        let a = udp4(1000, 53);
        let mut a2 = a.clone();
        a2.extend_from_slice(b"payload differs");
        assert_eq!(hash(&a), hash(&a2), "payload must not change the flow hash");
        let ports: std::collections::HashSet<u16> = (0..200).map(|p| src_port(hash(&udp4(1000 + p, 53)))).collect();
        assert!(ports.len() > 150, "200 flows landed on only {} ports", ports.len());
    }

    #[test]
    fn ports_stay_in_range() {
        assert_eq!(src_port(0), SRC_PORT_MIN);
        assert_eq!(src_port(u32::MAX), SRC_PORT_MAX);
    }

    #[test]
    fn garbage_hashes_without_panic() {
        for len in 0..60 {
            let _ = hash(&vec![0x4f; len]);
            let _ = hash(&vec![0x6f; len]);
        }
    }
}
