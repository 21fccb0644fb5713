//! The eBPF data plane's map layouts, mirrored from `bpf/vxlan.bpf.c`
//! byte for byte (`#[repr(C)]`, explicit padding), and the marker that lets
//! aya copy them in and out of the kernel.
//!
//! Addresses and the VXLAN port are held in network byte order, as the
//! programs compare them with packet bytes: build them with
//! [`Ipv4Addr::octets`](std::net::Ipv4Addr::octets) and `from_ne_bytes`.

/// `struct config`: one entry, index 0.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BpfConfig {
    /// VNI, host order (24 bits).
    pub vni: u32,
    /// Index of the underlay interface holding node-ip.
    pub ifindex4: u32,
    /// node-ip, network order.
    pub addr4: u32,
    /// VXLAN port, network order.
    pub port: u16,
    /// Lowest flow-hashed source port, host order.
    pub port_min: u16,
    /// Highest flow-hashed source port, host order.
    pub port_max: u16,
    /// Our VtepMAC on the IPv4 underlay.
    pub mac4: [u8; 6],
    /// Outer TTL.
    pub ttl: u8,
    /// 0: the programs pass everything on (to userspace).
    pub enabled: u8,
}

/// `struct hop4`: the node owning a remote IPv4 pod subnet.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BpfHop4 {
    /// Its underlay address, network order.
    pub addr: u32,
    /// Its VtepMAC.
    pub mac: [u8; 6],
    /// Padding to the C layout.
    pub pad: u16,
}

// SAFETY: both are `#[repr(C)]` structs of integers and byte arrays with
// their padding spelled out as fields, so every bit pattern is a valid
// value and no byte is uninitialised: what `aya::Pod` asks for.
unsafe impl aya::Pod for BpfConfig {}
// SAFETY: as above.
unsafe impl aya::Pod for BpfHop4 {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_c_structs() {
        // struct config: 3 x u32, 3 x u16, 6 x u8, 2 x u8 = 26 bytes, padded to 28 (align 4).
        assert_eq!(std::mem::size_of::<BpfConfig>(), 28);
        assert_eq!(std::mem::offset_of!(BpfConfig, port), 12);
        assert_eq!(std::mem::offset_of!(BpfConfig, mac4), 18);
        assert_eq!(std::mem::offset_of!(BpfConfig, ttl), 24);
        assert_eq!(std::mem::offset_of!(BpfConfig, enabled), 25);
        assert_eq!(std::mem::size_of::<BpfHop4>(), 12);
        assert_eq!(std::mem::offset_of!(BpfHop4, mac), 4);
    }
}
