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

/// A remote node.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Node name (or lease key) for logs and metrics.
    pub name: String,
    /// Where its VXLAN traffic goes.
    pub vtep: Vtep,
    /// Its pod subnets.
    pub subnets: Vec<IpNet>,
    /// Traffic counters, kept across snapshots.
    pub counters: Arc<PeerCounters>,
}

/// Everything a worker needs to forward: peers, routes, underlay index.
#[derive(Debug, Default)]
pub struct Snapshot {
    peers: Vec<Peer>,
    routes: RouteTable<usize>,
    by_underlay: HashMap<IpAddr, usize>,
}

impl Snapshot {
    /// Builds the lookup structures for `peers`.
    pub fn new(peers: Vec<Peer>) -> Self {
        let mut routes = RouteTable::new();
        let mut by_underlay = HashMap::new();
        for (i, p) in peers.iter().enumerate() {
            for net in &p.subnets {
                routes.insert(*net, i);
            }
            by_underlay.insert(p.vtep.addr, i);
        }
        Snapshot {
            peers,
            routes,
            by_underlay,
        }
    }

    /// The peers, in index order.
    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    /// The peer whose pod subnets contain `dst`.
    pub fn route(&self, dst: IpAddr) -> Option<(usize, &Peer)> {
        let i = *self.routes.lookup(dst)?;
        Some((i, &self.peers[i]))
    }
}

impl Peers for Snapshot {
    fn peer_by_underlay(&self, addr: IpAddr) -> Option<usize> {
        self.by_underlay.get(&addr).copied()
    }

    fn peer_owns(&self, peer: usize, inner_src: IpAddr) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|p| p.subnets.iter().any(|n| n.contains(&inner_src)))
    }
}
