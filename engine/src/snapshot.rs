//! The peer and route snapshot the workers forward with.
//!
//! The control plane builds a [`Snapshot`] whole and hands it to every worker,
//! which swaps it in at a batch boundary; workers never lock to read it.
//! Counters live behind `Arc`s so that a node unchanged across snapshots keeps
//! counting where it was.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use weft_tunnel::vxlan::{Peers, Vtep};

use crate::counters::PeerCounters;
use crate::route::RouteTable;
use crate::wg::{PeerRef, WgIndex, WgPeer};

/// A remote node.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Node name (or lease key) for logs and metrics.
    pub name: String,
    /// Its VTEP on the IPv4 underlay (lease `PublicIP`, `BackendData`).
    pub vtep4: Option<Vtep>,
    /// Its VTEP on the IPv6 underlay (lease `PublicIPv6`, `BackendV6Data`).
    pub vtep6: Option<Vtep>,
    /// Its pod subnets.
    pub subnets: Vec<IpNet>,
    /// Traffic counters, kept across snapshots.
    pub counters: Arc<PeerCounters>,
    /// WireGuard state (backend wireguard), kept across snapshots.
    pub wg: Option<Arc<WgPeer>>,
}

impl Peer {
    /// The underlay addresses of the node.
    pub fn underlay_addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.vtep4.iter().chain(&self.vtep6).map(|v| v.addr)
    }
}

/// Which underlay families this node has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Families {
    /// An IPv4 underlay address.
    pub v4: bool,
    /// An IPv6 underlay address.
    pub v6: bool,
}

/// The VTEP of a WireGuard peer known by key only (never used to send).
const NO_VTEP: Vtep = Vtep { addr: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), mac: [0; 6] };

/// Where packets to one pod subnet go: the peer and the VTEP to use.
#[derive(Debug, Clone, Copy)]
struct Hop {
    peer: usize,
    vtep: Vtep,
}

/// Everything a worker needs to forward: peers, routes, underlay index.
#[derive(Debug, Default)]
pub struct Snapshot {
    peers: Vec<Peer>,
    routes: RouteTable<Hop>,
    by_underlay: HashMap<IpAddr, usize>,
    wg_index: WgIndex,
}

impl Snapshot {
    /// Builds the lookup structures for `peers`, as seen from a node with
    /// the underlay families `local`. Each pod subnet travels over the
    /// underlay of its own family when both ends have it (Flannel's layout:
    /// IPv4 pods over `flannel.1`, IPv6 pods over `flannel-v6.1`), otherwise
    /// over the other family; a subnet no shared family reaches is not routed.
    pub fn new(peers: Vec<Peer>, local: Families) -> Self {
        let mut routes = RouteTable::new();
        let mut by_underlay = HashMap::new();
        for (i, p) in peers.iter().enumerate() {
            let v4 = p.vtep4.filter(|_| local.v4);
            let v6 = p.vtep6.filter(|_| local.v6);
            for net in &p.subnets {
                let vtep = if net.addr().is_ipv6() { v6.or(v4) } else { v4.or(v6) };
                // A WireGuard peer is reached at its endpoint, not a VTEP:
                // its allowed IPs route to it even before it has one.
                let vtep = vtep.or_else(|| p.wg.as_ref().map(|_| NO_VTEP));
                if let Some(vtep) = vtep {
                    routes.insert(*net, Hop { peer: i, vtep });
                }
            }
            for addr in p.underlay_addrs() {
                by_underlay.insert(addr, i);
            }
        }
        let wg_index = WgIndex::new(peers.iter().map(|p| p.wg.as_ref()));
        Snapshot { peers, routes, by_underlay, wg_index }
    }

    /// The peers, in index order.
    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    /// The WireGuard peer a datagram names.
    pub fn wg_peer(&self, r: PeerRef) -> Option<&Peer> {
        self.wg_index.find(r).map(|i| &self.peers[i])
    }

    /// The position in [`Snapshot::peers`] of the WireGuard peer a datagram names.
    pub fn wg_peer_index(&self, r: PeerRef) -> Option<usize> {
        self.wg_index.find(r)
    }

    /// Where a packet to `dst` goes: the peer's position in
    /// [`Snapshot::peers`] and the VTEP to send to.
    pub fn route_index(&self, dst: IpAddr) -> Option<(usize, Vtep)> {
        self.routes.lookup(dst).map(|h| (h.peer, h.vtep))
    }

    /// Where a packet to `dst` goes: the peer and the VTEP to send to.
    pub fn route(&self, dst: IpAddr) -> Option<(&Peer, Vtep)> {
        let hop = self.routes.lookup(dst)?;
        Some((&self.peers[hop.peer], hop.vtep))
    }
}

impl Peers for Snapshot {
    fn peer_by_underlay(&self, addr: IpAddr) -> Option<usize> {
        self.by_underlay.get(&addr).copied()
    }

    fn peer_owns(&self, peer: usize, inner_src: IpAddr) -> bool {
        self.peers.get(peer).is_some_and(|p| p.subnets.iter().any(|n| n.contains(&inner_src)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(v4: Option<&str>, v6: Option<&str>, subnets: &[&str]) -> Peer {
        let vtep = |a: &str, m: u8| Vtep { addr: a.parse().unwrap(), mac: [0x0a, 0, 0, 0, 0, m] };
        Peer {
            name: "p".into(),
            vtep4: v4.map(|a| vtep(a, 4)),
            vtep6: v6.map(|a| vtep(a, 6)),
            subnets: subnets.iter().map(|s| s.parse().unwrap()).collect(),
            counters: Default::default(),
            wg: None,
        }
    }

    fn via(s: &Snapshot, dst: &str) -> Option<IpAddr> {
        s.route(dst.parse().unwrap()).map(|(_, v)| v.addr)
    }

    #[test]
    fn each_family_prefers_its_own_underlay() {
        let p = peer(Some("192.168.77.2"), Some("fd77::2"), &["10.244.2.0/24", "fd00:0:0:2::/64"]);
        let both = Snapshot::new(vec![p.clone()], Families { v4: true, v6: true });
        assert_eq!(via(&both, "10.244.2.9"), Some("192.168.77.2".parse().unwrap()));
        assert_eq!(via(&both, "fd00:0:0:2::9"), Some("fd77::2".parse().unwrap()));
        // An IPv4-only underlay carries IPv6 pods too (weft to weft).
        let v4only = Snapshot::new(vec![p], Families { v4: true, v6: false });
        assert_eq!(via(&v4only, "fd00:0:0:2::9"), Some("192.168.77.2".parse().unwrap()));
        let none =
            Snapshot::new(vec![peer(None, Some("fd77::2"), &["10.244.2.0/24"])], Families { v4: true, v6: false });
        assert_eq!(via(&none, "10.244.2.9"), None, "no shared underlay family");
        assert_eq!(both.peer_by_underlay("fd77::2".parse().unwrap()), Some(0));
        assert_eq!(both.peer_by_underlay("192.168.77.2".parse().unwrap()), Some(0));
        assert!(both.peer_owns(0, "fd00:0:0:2::1".parse().unwrap()));
        assert!(!both.peer_owns(0, "fd00:0:0:3::1".parse().unwrap()));
    }
}
