//! The eBPF data plane of the VXLAN backend: loads `bpf/vxlan.bpf.c`'s
//! programs, attaches them with tcx links (egress of the TUN device, ingress
//! of the underlay interface), and writes their maps from the engine's
//! [`Snapshot`].
//!
//! What it owns: the programs' lifetime (the links are the process's file
//! descriptors: they detach when the agent exits, `kill -9` included, so a
//! restart never finds a stale program) and the maps' contents. What it
//! refuses to do: policy. A packet the programs leave alone goes on into
//! the TUN (egress) or up to the engine's UDP socket (ingress), where the
//! userspace engine handles it with its own checks: userspace is the slow
//! path, not a second implementation.
//!
//! IPv4 underlays only, for now: IPv6 pods travel through userspace.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr};

use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap as BpfHash, LpmTrie, MapData, PerCpuArray};
use aya::programs::tc::TcAttachOptions;
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;
use weft_tunnel::flow::{SRC_PORT_MAX, SRC_PORT_MIN};

use crate::snapshot::Snapshot;
use crate::sys::bpf::{BpfConfig, BpfHop4};

/// The programs, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vxlan.bpf.o"));

/// The programs' counters, by index in `weft_counters`: what Prometheus
/// calls each (`weft_ebpf_packets_total{what=...}`).
pub const COUNTERS: [&str; 12] = [
    "encapsulated",
    "egress_no_route",
    "egress_error",
    "decapsulated",
    "drop_bad_header",
    "drop_vni",
    "drop_unknown_source",
    "drop_vtep_mac",
    "drop_spoofed_source",
    "ingress_to_userspace",
    "ingress_gso_to_userspace",
    "ingress_bulk_to_userspace",
];

/// Set in the agent's environment, it makes the attach step fail as a kernel
/// without tcx would: how the tests reach `dataplane: auto`'s fallback on a
/// kernel that has tcx.
pub const REFUSE_ENV: &str = "WEFT_EBPF_REFUSE";

/// The names of the tcx programs attached to `iface` (in the caller's
/// network namespace) at ingress or egress: what the tests and operators
/// check after a stop.
pub fn attached(iface: &str, egress: bool) -> io::Result<Vec<String>> {
    let hook = if egress { TcAttachType::Egress } else { TcAttachType::Ingress };
    let (_, programs) = SchedClassifier::query_tcx(iface, hook).map_err(|e| err("querying tcx", chain(&e)))?;
    Ok(programs.iter().map(|p| p.name_as_str().unwrap_or("?").to_string()).collect())
}

/// Outer TTL, as kernel VXLAN sends by default (the route's hop limit).
const TTL: u8 = 64;

/// Where and how the programs run.
#[derive(Debug, Clone)]
pub struct EbpfSetup {
    /// weft's TUN device (egress program).
    pub tun: String,
    /// The interface holding `addr` (ingress program, and where
    /// encapsulated packets are sent).
    pub underlay: String,
    /// Its index.
    pub underlay_index: u32,
    /// This node's IPv4 underlay address (node-ip).
    pub addr: Ipv4Addr,
    /// This node's VtepMAC on that underlay.
    pub mac: [u8; 6],
    /// VNI.
    pub vni: u32,
    /// VXLAN port.
    pub port: u16,
}

/// The loaded, attached programs and what their maps hold.
pub struct EbpfPlane {
    bpf: Ebpf,
    routes: HashMap<(u32, u8), BpfHop4>,
    nodes: HashSet<u32>,
}

/// `what` failed because of `e` and its sources, all in one line.
fn err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// `e` with every error it wraps: aya's top-level messages alone do not
/// say which relocation or which helper.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

/// An address as the programs hold it: its bytes in network order.
fn ne(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

impl EbpfPlane {
    /// Loads the programs, fills their maps from `snapshot` and attaches
    /// them. Every failure says which step; a verifier refusal carries the
    /// verifier's log.
    pub fn start(setup: &EbpfSetup, snapshot: &Snapshot) -> io::Result<EbpfPlane> {
        let bpf = EbpfLoader::new().load(OBJECT).map_err(|e| err("loading the eBPF programs", chain(&e)))?;
        let mut plane = EbpfPlane { bpf, routes: HashMap::new(), nodes: HashSet::new() };
        plane.update(snapshot)?;
        let cfg = BpfConfig {
            vni: setup.vni,
            ifindex4: setup.underlay_index,
            addr4: ne(setup.addr),
            port: setup.port.to_be(),
            port_min: SRC_PORT_MIN,
            port_max: SRC_PORT_MAX,
            mac4: setup.mac,
            ttl: TTL,
            enabled: 1,
        };
        let mut config: Array<&mut MapData, BpfConfig> =
            Array::try_from(plane.bpf.map_mut("weft_config").ok_or_else(|| err("map", "weft_config missing"))?)
                .map_err(|e| err("map weft_config", e))?;
        config.set(0, cfg, 0).map_err(|e| err("writing map weft_config", e))?;
        if let Some(v) = std::env::var_os(REFUSE_ENV) {
            return Err(err(
                "attaching the eBPF programs",
                format!(
                    "refused: {REFUSE_ENV}={} (the test hook standing for a kernel without tcx)",
                    v.to_string_lossy()
                ),
            ));
        }
        for (name, iface, hook) in [
            ("weft_ingress", &setup.underlay, TcAttachType::Ingress),
            ("weft_egress", &setup.tun, TcAttachType::Egress),
        ] {
            let prog: &mut SchedClassifier = plane
                .bpf
                .program_mut(name)
                .ok_or_else(|| err("program", format!("{name} missing")))?
                .try_into()
                .map_err(|e| err(name, e))?;
            prog.load().map_err(|e| err(&format!("loading {name}"), chain(&e)))?;
            prog.attach_with_options(iface, hook, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .map_err(|e| err(&format!("attaching {name} to {iface} (tcx {hook:?})"), chain(&e)))?;
        }
        Ok(plane)
    }

    /// Writes the remote subnets and node addresses of `snapshot`: new and
    /// changed entries first, then removals, so an unchanged node's entries
    /// are never absent.
    pub fn update(&mut self, snapshot: &Snapshot) -> io::Result<()> {
        let (routes, nodes) = plan(snapshot);
        {
            let mut map: LpmTrie<&mut MapData, u32, BpfHop4> =
                LpmTrie::try_from(self.bpf.map_mut("weft_routes4").ok_or_else(|| err("map", "weft_routes4 missing"))?)
                    .map_err(|e| err("map weft_routes4", e))?;
            for (&(addr, len), hop) in &routes {
                if self.routes.get(&(addr, len)) != Some(hop) {
                    map.insert(&Key::new(len.into(), addr), *hop, 0).map_err(|e| err("writing weft_routes4", e))?;
                }
            }
            for &(addr, len) in self.routes.keys().filter(|k| !routes.contains_key(k)) {
                map.remove(&Key::new(len.into(), addr)).map_err(|e| err("removing from weft_routes4", e))?;
            }
        }
        {
            let mut map: BpfHash<&mut MapData, u32, u32> =
                BpfHash::try_from(self.bpf.map_mut("weft_nodes4").ok_or_else(|| err("map", "weft_nodes4 missing"))?)
                    .map_err(|e| err("map weft_nodes4", e))?;
            for &a in nodes.difference(&self.nodes) {
                map.insert(a, 1, 0).map_err(|e| err("writing weft_nodes4", e))?;
            }
            for a in self.nodes.difference(&nodes) {
                map.remove(a).map_err(|e| err("removing from weft_nodes4", e))?;
            }
        }
        self.routes = routes;
        self.nodes = nodes;
        Ok(())
    }

    /// The programs' counters summed over CPUs, in [`COUNTERS`]' order.
    pub fn counters(&self) -> io::Result<[u64; COUNTERS.len()]> {
        let map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.bpf.map("weft_counters").ok_or_else(|| err("map", "weft_counters missing"))?)
                .map_err(|e| err("map weft_counters", e))?;
        let mut out = [0; COUNTERS.len()];
        for (i, o) in out.iter_mut().enumerate() {
            *o = map.get(&(i as u32), 0).map_err(|e| err("reading weft_counters", e))?.iter().sum();
        }
        Ok(out)
    }
}

/// The map contents for `snapshot`: each remote IPv4 subnet whose owner has
/// an IPv4 VTEP (the others go through userspace), and those owners'
/// underlay addresses.
fn plan(snapshot: &Snapshot) -> (HashMap<(u32, u8), BpfHop4>, HashSet<u32>) {
    let mut routes = HashMap::new();
    let mut nodes = HashSet::new();
    for p in snapshot.peers() {
        let Some(v) = p.vtep4 else { continue };
        let IpAddr::V4(addr) = v.addr else { continue };
        nodes.insert(ne(addr));
        for net in &p.subnets {
            if let IpNet::V4(n) = net {
                routes.insert((ne(n.network()), n.prefix_len()), BpfHop4 { addr: ne(addr), mac: v.mac, pad: 0 });
            }
        }
    }
    (routes, nodes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Families, Peer};
    use weft_tunnel::vxlan::Vtep;

    fn peer(name: &str, vtep4: Option<&str>, subnets: &[&str]) -> Peer {
        Peer {
            name: name.into(),
            vtep4: vtep4.map(|a| Vtep { addr: a.parse().unwrap(), mac: [2, 0, 0, 0, 0, 1] }),
            vtep6: None,
            subnets: subnets.iter().map(|s| s.parse().unwrap()).collect(),
            counters: Default::default(),
            wg: None,
        }
    }

    #[test]
    fn the_maps_hold_ipv4_subnets_of_nodes_with_an_ipv4_vtep() {
        let s = Snapshot::new(
            vec![
                peer("a", Some("192.168.1.2"), &["10.244.2.0/24", "fd00:2::/64"]),
                peer("b", None, &["10.244.3.0/24"]),
            ],
            Families { v4: true, v6: true },
        );
        let (routes, nodes) = plan(&s);
        let a = ne("192.168.1.2".parse().unwrap());
        assert_eq!(nodes, HashSet::from([a]));
        assert_eq!(routes.len(), 1);
        let hop = routes[&(ne("10.244.2.0".parse().unwrap()), 24)];
        assert_eq!((hop.addr, hop.mac), (a, [2, 0, 0, 0, 0, 1]));
        // Network order in memory: the programs compare it with packet bytes.
        assert_eq!(hop.addr.to_ne_bytes(), [192, 168, 1, 2]);
    }
}
