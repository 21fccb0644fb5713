//! Error types of the tunnel crate: small `Copy` enums, counted, never logged
//! per packet.

/// Why a received packet was refused. Each variant is a drop counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum DropReason {
    /// Shorter than the headers it claims to carry.
    #[error("packet too short")]
    Short,
    /// VXLAN header without the I (valid VNI) flag.
    #[error("VXLAN I flag missing")]
    FlagMissing,
    /// VXLAN network identifier that is not ours.
    #[error("VNI is not ours")]
    WrongVni,
    /// Inner Ethernet destination is not our VTEP MAC.
    #[error("inner destination MAC is not our VTEP")]
    WrongDstMac,
    /// Inner EtherType is neither IPv4 nor IPv6.
    #[error("inner EtherType is not IP")]
    NotIp,
    /// Inner IP header is malformed (version, header length, total length).
    #[error("malformed inner IP packet")]
    MalformedInner,
    /// Outer source address belongs to no known node.
    #[error("outer source is no known node")]
    UnknownSource,
    /// Inner source address lies outside the sending node's pod subnets.
    #[error("inner source outside the sender's pod subnets")]
    SpoofedSource,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 8] = [
        DropReason::Short,
        DropReason::FlagMissing,
        DropReason::WrongVni,
        DropReason::WrongDstMac,
        DropReason::NotIp,
        DropReason::MalformedInner,
        DropReason::UnknownSource,
        DropReason::SpoofedSource,
    ];

    /// Stable snake_case label, used as the Prometheus `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Short => "short",
            DropReason::FlagMissing => "flag_missing",
            DropReason::WrongVni => "wrong_vni",
            DropReason::WrongDstMac => "wrong_dst_mac",
            DropReason::NotIp => "not_ip",
            DropReason::MalformedInner => "malformed_inner",
            DropReason::UnknownSource => "unknown_source",
            DropReason::SpoofedSource => "spoofed_source",
        }
    }

    /// Index into a counter array of `ALL.len()` slots.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Why a packet could not be encapsulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncapError {
    /// The buffer has no room for the headroom the outer headers need.
    #[error("buffer too small for the outer headers")]
    NoHeadroom,
    /// The inner packet is not a well-formed IP packet.
    #[error("inner packet is not IP")]
    NotIp,
    /// Local and remote underlay addresses are of different families.
    #[error("underlay address families differ")]
    FamilyMismatch,
    /// The datagram would exceed the 65535-byte UDP length field.
    #[error("datagram too large for UDP")]
    TooLarge,
}
