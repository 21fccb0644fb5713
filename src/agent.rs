//! `weft agent`: one node's data plane, set up from the datastore.
//!
//! At start it finds this node's lease by its node IP, creates the TUN device
//! through the engine, gives it the subnet's network address and an MTU of
//! the underlay's minus the VXLAN overhead, routes every other node's pod
//! subnets into it, writes `subnet.env`, and serves metrics. SIGHUP re-reads
//! the datastore and applies only the difference (routes and peers of
//! unchanged nodes are left alone, so their traffic never stops); SIGTERM
//! removes the routes and the device and exits.
//!
//! What to change is computed in pure code ([`desired`], [`route_changes`]);
//! the netlink calls that apply it are a thin layer after.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use ipnet::IpNet;
use weft_engine::sys::netlink::{Netlink, Route};
use weft_engine::{Engine, EngineConfig, Peer, PeerCounters, Snapshot};
use weft_tunnel::vxlan::{Vtep, Vxlan, OVERHEAD_V4, OVERHEAD_V6};

use crate::config::AgentConfig;
use crate::datastore::{subnet_env, StaticDatastore, SubnetKey};
use crate::metrics::{self, MetricsState};

/// What the datastore says this node's data plane should be.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// This node's lease key.
    pub own_key: SubnetKey,
    /// This node's VTEP.
    pub own: Vtep,
    /// The pod network (IPv4), from the datastore config.
    pub network: Option<IpNet>,
    /// The other nodes.
    pub peers: Vec<DesiredPeer>,
    /// Leases skipped, with why (other backend, other family, bad data).
    pub skipped: Vec<(SubnetKey, String)>,
}

/// A remote node as the datastore describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredPeer {
    /// Its lease key.
    pub key: SubnetKey,
    /// Its VTEP.
    pub vtep: Vtep,
}

/// Derives the desired state from the config and the datastore.
pub fn desired(cfg: &AgentConfig, ds: &StaticDatastore) -> anyhow::Result<Desired> {
    let backend = ds.config.backend_type();
    if backend != cfg.backend {
        bail!(
            "the datastore's Backend.Type is `{backend}` but flannel-backend is `{}`",
            cfg.backend
        );
    }
    let network = ds.config.network.map(IpNet::V4);
    if let (Some(want), Some(have)) = (cfg.cluster_cidr, network) {
        if want != have {
            bail!("config key `cluster-cidr`: value `{want}` refused: it must match the datastore's Network `{have}`");
        }
    }
    let v6 = cfg.node_ip.is_ipv6();
    let (own_key, own_lease) = ds.lease_of(cfg.node_ip).with_context(|| {
        format!(
            "no lease in the datastore has PublicIP {} (config key `node-ip`)",
            cfg.node_ip
        )
    })?;
    let own_data = own_lease.vxlan_data(v6).context("this node's lease")?;
    if own_data.vni != cfg.vni {
        bail!(
            "this node's lease has VNI {} but config key `vni` is {}",
            own_data.vni,
            cfg.vni
        );
    }
    let own = Vtep {
        addr: cfg.node_ip,
        mac: own_data.vtep_mac,
    };
    let mut peers = Vec::new();
    let mut skipped = Vec::new();
    for (key, lease) in &ds.leases {
        if key == own_key {
            continue;
        }
        if lease.backend_type != "vxlan" {
            skipped.push((*key, format!("backend {}", lease.backend_type)));
            continue;
        }
        let Some(addr) = lease.public_ips().find(|a| a.is_ipv6() == v6) else {
            skipped.push((*key, "no public address of the underlay's family".into()));
            continue;
        };
        match lease.vxlan_data(v6) {
            Ok(d) if d.vni == cfg.vni => peers.push(DesiredPeer {
                key: *key,
                vtep: Vtep {
                    addr,
                    mac: d.vtep_mac,
                },
            }),
            Ok(d) => skipped.push((*key, format!("VNI {} is not ours", d.vni))),
            Err(e) => skipped.push((*key, e.to_string())),
        }
    }
    Ok(Desired {
        own_key: *own_key,
        own,
        network,
        peers,
        skipped,
    })
}

/// Routes to add and to delete to go from `old` to `new` subnets.
pub fn route_changes(old: &[IpNet], new: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    let add = new.iter().filter(|n| !old.contains(n)).copied().collect();
    let del = old.iter().filter(|n| !new.contains(n)).copied().collect();
    (add, del)
}

/// The subnets routed into the TUN for `d` (every peer subnet of our family
/// set; the node's own subnet is local).
pub fn routed_subnets(d: &Desired) -> Vec<IpNet> {
    d.peers.iter().flat_map(|p| p.key.subnets()).collect()
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let ds = StaticDatastore::load(&cfg.datastore_file)?;
    let want = desired(&cfg, &ds)?;
    for (key, why) in &want.skipped {
        tracing::warn!(lease = %key, why, "lease skipped");
    }
    let mut nl = Netlink::open().context("opening netlink")?;
    let underlay_mtu = underlay_mtu(&mut nl, cfg.node_ip)?;
    let overhead = if cfg.node_ip.is_ipv6() {
        OVERHEAD_V6
    } else {
        OVERHEAD_V4
    } as u32;
    let mtu = underlay_mtu
        .checked_sub(overhead)
        .filter(|m| *m >= 576)
        .context("underlay MTU too small for VXLAN")?;

    let mut counters: HashMap<SubnetKey, Arc<PeerCounters>> = HashMap::new();
    let snapshot = Arc::new(build_snapshot(&want, &mut counters));
    let engine_cfg = EngineConfig {
        tun_name: cfg.tun_name.clone(),
        threads: cfg.threads,
        vxlan: Vxlan::new(cfg.vni, cfg.vxlan_port, want.own),
        port: cfg.vxlan_port,
        mtu: mtu as usize,
    };
    let engine = Engine::start(&engine_cfg, snapshot.clone())
        .context("starting the engine (TUN device, sockets)")?;
    let state = Arc::new(MetricsState {
        workers: engine.counters().to_vec(),
        snapshot: Mutex::new(snapshot),
        ready: Default::default(),
    });
    if let Some(addr) = cfg.metrics_addr {
        metrics::serve(addr, state.clone())
            .with_context(|| format!("config key `metrics-addr`: cannot listen on {addr}"))?;
    }

    let tun = Netlink::link_index(&cfg.tun_name)?;
    nl.set_link(tun, true, Some(mtu))
        .context("setting the TUN device up")?;
    for net in want.own_key.subnets() {
        let host = if net.addr().is_ipv4() { 32 } else { 128 };
        nl.add_address(
            tun,
            IpNet::new(net.network(), host).expect("a host prefix is valid"),
        )
        .context("addressing the TUN device")?;
    }
    let mut routed = routed_subnets(&want);
    for net in &routed {
        nl.replace_route(&tun_route(*net, tun))
            .with_context(|| format!("adding the route to {net}"))?;
    }
    let env = subnet_env(want.network, &want.own_key, None, mtu, false);
    write_subnet_env(&cfg, &env)?;
    state.ready.store(true, Relaxed);
    tracing::info!(node = %cfg.node_name, subnet = %want.own_key, mtu, peers = want.peers.len(), "agent ready");

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    for sig in signals.forever() {
        if sig != signal_hook::consts::SIGHUP {
            break;
        }
        match reload(
            &cfg,
            &engine,
            &mut nl,
            tun,
            &mut routed,
            &mut counters,
            &state,
        ) {
            Ok(()) => {}
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reload refused; keeping the previous state")
            }
        }
    }
    tracing::info!("shutting down");
    state.ready.store(false, Relaxed);
    for net in &routed {
        if let Err(e) = nl.delete_route(&tun_route(*net, tun)) {
            tracing::warn!(route = %net, error = %e, "removing route");
        }
    }
    engine.stop();
    Ok(())
}

/// Re-reads the datastore and applies the difference.
fn reload(
    cfg: &AgentConfig,
    engine: &Engine,
    nl: &mut Netlink,
    tun: u32,
    routed: &mut Vec<IpNet>,
    counters: &mut HashMap<SubnetKey, Arc<PeerCounters>>,
    state: &MetricsState,
) -> anyhow::Result<()> {
    let ds = StaticDatastore::load(&cfg.datastore_file)?;
    let want = desired(cfg, &ds)?;
    let new_routed = routed_subnets(&want);
    let (add, del) = route_changes(routed, &new_routed);
    // Routes first for new nodes, so their packets reach the TUN as soon as
    // the snapshot knows them; old routes go after the snapshot drops them.
    for net in &add {
        nl.replace_route(&tun_route(*net, tun))
            .with_context(|| format!("adding the route to {net}"))?;
    }
    let snapshot = Arc::new(build_snapshot(&want, counters));
    engine.update(snapshot.clone());
    if let Ok(mut s) = state.snapshot.lock() {
        *s = snapshot;
    }
    for net in &del {
        nl.delete_route(&tun_route(*net, tun))
            .with_context(|| format!("removing the route to {net}"))?;
    }
    *routed = new_routed;
    tracing::info!(
        added = add.len(),
        removed = del.len(),
        peers = want.peers.len(),
        "datastore reloaded"
    );
    Ok(())
}

/// The engine's snapshot for `d`, keeping the counters of known nodes.
fn build_snapshot(d: &Desired, counters: &mut HashMap<SubnetKey, Arc<PeerCounters>>) -> Snapshot {
    counters.retain(|k, _| d.peers.iter().any(|p| p.key == *k));
    let peers = d
        .peers
        .iter()
        .map(|p| Peer {
            name: p.key.to_string(),
            vtep: p.vtep,
            subnets: p.key.subnets(),
            counters: counters.entry(p.key).or_default().clone(),
        })
        .collect();
    Snapshot::new(peers)
}

fn tun_route(dst: IpNet, tun: u32) -> Route {
    Route {
        dst,
        oif: tun,
        gateway: None,
        onlink: false,
    }
}

/// MTU of the interface that holds `node_ip`.
fn underlay_mtu(nl: &mut Netlink, node_ip: IpAddr) -> anyhow::Result<u32> {
    let addrs = nix::ifaddrs::getifaddrs().context("listing interface addresses")?;
    for a in addrs {
        let ip = a.address.as_ref().and_then(|s| {
            s.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        });
        if ip == Some(node_ip) {
            let index = Netlink::link_index(&a.interface_name)?;
            return Ok(nl.link_mtu(index)?);
        }
    }
    bail!("config key `node-ip`: value `{node_ip}` refused: no interface of this node has that address")
}

fn write_subnet_env(cfg: &AgentConfig, env: &str) -> anyhow::Result<()> {
    if let Some(dir) = cfg.subnet_file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = cfg.subnet_file.with_extension("tmp");
    std::fs::write(&tmp, env).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &cfg.subnet_file)
        .with_context(|| format!("writing {}", cfg.subnet_file.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn cfg(ip: &str) -> AgentConfig {
        let mut pairs = BTreeMap::new();
        pairs.insert("node-ip".to_string(), ip.to_string());
        pairs.insert("datastore-file".to_string(), "unused".to_string());
        AgentConfig::from_pairs(&pairs).unwrap()
    }

    fn ds(extra: &str) -> StaticDatastore {
        let json = format!(
            r#"{{"config":{{"Network":"10.244.0.0/16","Backend":{{"Type":"vxlan"}}}},"subnets":{{
            "10.244.1.0-24":{{"PublicIP":"192.168.77.1","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0a:58:0a:f4:01:00"}}}},
            "10.244.2.0-24":{{"PublicIP":"192.168.77.2","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0a:58:0a:f4:02:00"}}}}{extra}}}}}"#
        );
        StaticDatastore::parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn own_lease_and_peers() {
        let d = desired(&cfg("192.168.77.1"), &ds("")).unwrap();
        assert_eq!(d.own_key.to_string(), "10.244.1.0-24");
        assert_eq!(d.own.mac, [0x0a, 0x58, 0x0a, 0xf4, 1, 0]);
        assert_eq!(d.peers.len(), 1);
        assert_eq!(
            d.peers[0].vtep.addr,
            "192.168.77.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            routed_subnets(&d),
            vec!["10.244.2.0/24".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn foreign_leases_are_skipped_not_fatal() {
        let extra = r#","10.244.3.0-24":{"PublicIP":"192.168.77.3","BackendType":"host-gw"},
            "10.244.4.0-24":{"PublicIP":"192.168.77.4","BackendType":"vxlan","BackendData":{"VNI":7,"VtepMAC":"0a:58:0a:f4:04:00"}}"#;
        let d = desired(&cfg("192.168.77.1"), &ds(extra)).unwrap();
        assert_eq!(d.peers.len(), 1);
        assert_eq!(d.skipped.len(), 2);
    }

    #[test]
    fn missing_own_lease_and_mismatches_are_refused() {
        let e = desired(&cfg("192.168.77.9"), &ds(""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("192.168.77.9") && e.contains("node-ip"), "{e}");
        let mut c = cfg("192.168.77.1");
        c.cluster_cidr = Some("10.42.0.0/16".parse().unwrap());
        let e = desired(&c, &ds("")).unwrap_err().to_string();
        assert!(
            e.contains("cluster-cidr") && e.contains("10.244.0.0/16"),
            "{e}"
        );
    }

    #[test]
    fn route_changes_touch_only_the_difference() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        let old = vec![n("10.244.2.0/24"), n("10.244.3.0/24")];
        let new = vec![n("10.244.3.0/24"), n("10.244.4.0/24")];
        assert_eq!(
            route_changes(&old, &new),
            (vec![n("10.244.4.0/24")], vec![n("10.244.2.0/24")])
        );
        assert_eq!(route_changes(&new, &new), (vec![], vec![]));
    }
}
