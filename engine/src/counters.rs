//! Packet counters: per worker (written by one thread, summed on export) and
//! per peer (shared by the workers, relaxed atomics). Drops are counted by
//! reason, never logged per packet.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use weft_tunnel::wireguard::WgError;
use weft_tunnel::DropReason;

/// Why the engine itself dropped a packet (decapsulation reasons come from
/// [`DropReason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineDrop {
    /// A packet from the TUN whose destination is in no remote pod subnet.
    NoRoute,
    /// A packet from the TUN for the device's own link (multicast or
    /// link-local: the MLD reports the kernel sends when the device comes
    /// up and the like), which no node is for. Counted apart from
    /// [`EngineDrop::NoRoute`]: it is no pod's traffic.
    LinkLocal,
    /// A packet from the TUN that is not IPv4 or IPv6.
    NotIp,
    /// Encapsulation refused the packet (too large, family mismatch).
    Encap,
    /// The underlay send failed.
    SendError,
    /// The TUN write failed.
    TunWriteError,
    /// WireGuard: a datagram naming no peer we know.
    WgUnknownPeer,
    /// WireGuard: a decrypted packet whose source is outside the peer's allowed IPs.
    WgAllowedIps,
    /// WireGuard: a packet for a peer with no known endpoint yet.
    WgNoEndpoint,
}

impl EngineDrop {
    /// Every reason, in counter order.
    pub const ALL: [EngineDrop; 9] = [
        EngineDrop::NoRoute,
        EngineDrop::LinkLocal,
        EngineDrop::NotIp,
        EngineDrop::Encap,
        EngineDrop::SendError,
        EngineDrop::TunWriteError,
        EngineDrop::WgUnknownPeer,
        EngineDrop::WgAllowedIps,
        EngineDrop::WgNoEndpoint,
    ];

    /// Stable snake_case label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            EngineDrop::NoRoute => "no_route",
            EngineDrop::LinkLocal => "link_local",
            EngineDrop::NotIp => "tun_not_ip",
            EngineDrop::Encap => "encap_failed",
            EngineDrop::SendError => "send_error",
            EngineDrop::TunWriteError => "tun_write_error",
            EngineDrop::WgUnknownPeer => "wg_unknown_peer",
            EngineDrop::WgAllowedIps => "wg_allowed_ips",
            EngineDrop::WgNoEndpoint => "wg_no_endpoint",
        }
    }
}

/// A drop reason of either layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropCause {
    /// Refused by decapsulation.
    Decap(DropReason),
    /// Refused by the engine.
    Engine(EngineDrop),
    /// Refused by the WireGuard protocol (or answered with a cookie).
    Wg(WgError),
}

/// Number of drop counters.
pub const DROP_SLOTS: usize = DropReason::ALL.len() + EngineDrop::ALL.len() + WgError::ALL.len();

impl DropCause {
    fn slot(self) -> usize {
        match self {
            DropCause::Decap(r) => r.index(),
            DropCause::Engine(e) => DropReason::ALL.len() + e as usize,
            DropCause::Wg(e) => DropReason::ALL.len() + EngineDrop::ALL.len() + e.index(),
        }
    }

    /// Every reason with its label, in slot order.
    pub fn all() -> impl Iterator<Item = DropCause> {
        DropReason::ALL
            .into_iter()
            .map(DropCause::Decap)
            .chain(EngineDrop::ALL.into_iter().map(DropCause::Engine))
            .chain(WgError::ALL.into_iter().map(DropCause::Wg))
    }

    /// Stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            DropCause::Decap(r) => r.label(),
            DropCause::Engine(e) => e.label(),
            DropCause::Wg(e) => e.label(),
        }
    }
}

/// Counters of one worker. Padded so two workers never share a cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerCounters {
    /// Packets read from the TUN (pod to tunnel).
    pub tun_rx_packets: AtomicU64,
    /// Bytes read from the TUN.
    pub tun_rx_bytes: AtomicU64,
    /// Encapsulated datagrams sent on the underlay.
    pub udp_tx_packets: AtomicU64,
    /// `UDP_SEGMENT` sends the kernel refused (segments larger than the
    /// underlay's MTU, or no UDP GSO): their datagrams went out again one
    /// per send, and only those that failed then count as drops.
    pub udp_gso_refused: AtomicU64,
    /// Datagrams received on the underlay.
    pub udp_rx_packets: AtomicU64,
    /// Bytes received on the underlay (UDP payload).
    pub udp_rx_bytes: AtomicU64,
    /// Packets written to the TUN (tunnel to pod).
    pub tun_tx_packets: AtomicU64,
    /// Bytes written to the TUN.
    pub tun_tx_bytes: AtomicU64,
    /// Inner TCP/UDP checksums left partial by the sender's offload and
    /// completed here.
    pub csum_completed: AtomicU64,
    /// TCP super-packets received uncut and segmented in software.
    pub sw_segmented: AtomicU64,
    /// Received segments merged into an earlier one before the TUN write
    /// (software GRO): TUN writes saved.
    pub gro_merged: AtomicU64,
    /// WireGuard: plaintext bytes this worker sealed, for any worker's
    /// packets (the AEAD is spread: see `crate::spread`).
    pub wg_sealed_bytes: AtomicU64,
    /// WireGuard: ciphertext bytes this worker opened, for any worker's.
    pub wg_opened_bytes: AtomicU64,
    /// Syscalls made on the packet path.
    pub syscalls: AtomicU64,
    /// Set when the worker's loop has ended (stopped or failed).
    pub stopped: std::sync::atomic::AtomicBool,
    drops: [AtomicU64; DROP_SLOTS],
}

impl WorkerCounters {
    /// Counts one dropped packet.
    pub fn count_drop(&self, reason: DropCause) {
        self.drops[reason.slot()].fetch_add(1, Relaxed);
    }

    /// Packets dropped for `reason`.
    pub fn drops(&self, reason: DropCause) -> u64 {
        self.drops[reason.slot()].load(Relaxed)
    }
}

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

/// Traffic exchanged with one remote node.
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// Packets encapsulated towards the node.
    pub tx_packets: AtomicU64,
    /// Inner bytes encapsulated towards the node.
    pub tx_bytes: AtomicU64,
    /// Packets decapsulated from the node.
    pub rx_packets: AtomicU64,
    /// Inner bytes decapsulated from the node.
    pub rx_bytes: AtomicU64,
}
