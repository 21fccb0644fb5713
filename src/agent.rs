//! `weft agent`: one node's data plane, set up from the datastore.
//!
//! At start it finds this node's lease by its node IP, creates the TUN device
//! through the engine, gives it the subnet's network address and an MTU of
//! the underlay's minus the VXLAN overhead, routes every other node's pod
//! subnets into it, writes `subnet.env`, and serves metrics. SIGHUP re-reads
//! the datastore and applies only the difference (routes and peers of
//! unchanged nodes are left alone, so their traffic never stops); SIGTERM
//! removes the routes, the device and the masquerade table, and exits.
//!
//! What to change is computed in pure code ([`desired`], [`route_changes`]);
//! the netlink calls that apply it are a thin layer after.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use ipnet::IpNet;
use weft_engine::sys::netlink::{Netlink, Route};
use weft_engine::{Encap, Engine, EngineConfig, Families, Peer, PeerCounters, Snapshot, WgDevice, WgPeer};
use weft_tunnel::vxlan::{Vtep, Vxlan, OVERHEAD_V4, OVERHEAD_V6};

use weft_control::cluster::Backend;
use weft_control::config::{AgentConfig, Dataplane, DatastoreSource};
use weft_control::datastore::{subnet_env, StaticDatastore, WgData, WgOptions, WG_OVERHEAD};
use weft_control::keys;
use weft_control::lease;
use weft_control::rootless::RootlessConfig;
use weft_control::subnet::SubnetKey;

use crate::metrics::{self, MetricsState};

/// What the datastore says this node's data plane should be.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// This node's lease key.
    pub own_key: SubnetKey,
    /// This node's VTEPs, one per underlay family it has (IPv4 first).
    pub own: Vec<Vtep>,
    /// This node's WireGuard data as its lease announces it.
    pub own_wg: Option<WgData>,
    /// The IPv4 pod network, from the datastore config.
    pub network: Option<IpNet>,
    /// The IPv6 pod network, from the datastore config.
    pub ipv6_network: Option<IpNet>,
    /// The other nodes.
    pub peers: Vec<DesiredPeer>,
    /// Leases skipped, with why (other backend, no shared family, bad data).
    pub skipped: Vec<(SubnetKey, String)>,
}

/// A remote node as the datastore describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredPeer {
    /// Its lease key.
    pub key: SubnetKey,
    /// Its IPv4 underlay address and VTEP MAC (host-gw: the MAC is unused).
    pub vtep4: Option<Vtep>,
    /// Its IPv6 underlay address and VTEP MAC.
    pub vtep6: Option<Vtep>,
    /// WireGuard: its public key and port, and the endpoint to send to.
    pub wg: Option<(WgData, SocketAddr)>,
}

/// Derives the desired state from the config and the datastore.
pub fn desired(cfg: &AgentConfig, ds: &StaticDatastore) -> anyhow::Result<Desired> {
    let backend = ds.config.backend_type();
    if backend != cfg.lease_backend() {
        bail!("the datastore's Backend.Type is `{backend}` but flannel-backend is `{}`", cfg.backend());
    }
    let wireguard = cfg.cluster.backend == Backend::WireguardNative;
    let network = ds.config.network.map(IpNet::V4);
    let ipv6_network = ds.config.ipv6_network.map(IpNet::V6);
    if cfg.cluster_cidr_given {
        for want in &cfg.cluster.cluster_cidrs {
            let have = if want.addr().is_ipv4() { network } else { ipv6_network };
            if have != Some(*want) {
                let have = have.map(|h| h.to_string()).unwrap_or_else(|| "none".into());
                bail!(
                    "config key `cluster-cidr`: value `{want}` refused: it must match the datastore's network `{have}`"
                );
            }
        }
    }
    let public: Vec<IpAddr> = [false, true].into_iter().filter_map(|v6| cfg.cluster.public_ip(v6)).collect();
    let (own_key, own_lease) = public
        .iter()
        .find_map(|ip| ds.lease_of(*ip))
        .with_context(|| format!("no lease in the datastore has a PublicIP of config key `node-ip` {public:?}"))?;
    let vxlan = cfg.backend() == "vxlan";
    let mut own = Vec::new();
    let mut own_wg = None;
    for announced in own_lease.public_ips() {
        if !public.contains(&announced) {
            bail!("this node's lease {own_key} announces {announced}, which is not this node's (config key `node-ip`)");
        }
        // Packets leave from the node's own address of that family; with
        // flannel-external-ip the lease announces the external one.
        let ip = cfg.node_ips().iter().copied().find(|a| a.is_ipv6() == announced.is_ipv6()).unwrap_or(announced);
        let mac = if vxlan {
            let data = own_lease.vxlan_data(ip.is_ipv6()).context("this node's lease")?;
            if data.vni != cfg.vni {
                bail!("this node's lease has VNI {} but config key `vni` is {}", data.vni, cfg.vni);
            }
            data.vtep_mac
        } else {
            [0; 6]
        };
        if wireguard && own_wg.is_none() {
            own_wg = Some(own_lease.wireguard_data(ip.is_ipv6()).context("this node's lease")?);
        }
        own.push(Vtep { addr: ip, mac });
    }
    let mut peers = Vec::new();
    let mut skipped = Vec::new();
    for (key, lease) in &ds.leases {
        if key == own_key {
            continue;
        }
        if lease.backend_type != cfg.lease_backend() {
            skipped.push((*key, format!("backend {}", lease.backend_type)));
            continue;
        }
        let mut vteps = [None, None];
        let mut wg = None;
        let mut refused = None;
        for ip in lease.public_ips().filter(|ip| own.iter().any(|o| o.addr.is_ipv6() == ip.is_ipv6())) {
            let mac = if vxlan {
                match lease.vxlan_data(ip.is_ipv6()) {
                    Ok(d) if d.vni == cfg.vni => d.vtep_mac,
                    Ok(d) => {
                        refused = Some(format!("VNI {} is not ours", d.vni));
                        continue;
                    }
                    Err(e) => {
                        refused = Some(e.to_string());
                        continue;
                    }
                }
            } else {
                [0; 6]
            };
            if wireguard && wg.is_none() {
                // One WireGuard peer per node: its first underlay family
                // we share (IPv4 first) is where its datagrams go.
                // A node of our own location is reached in the private
                // network we share, not through its external address.
                let via = match (&cfg.node_location, lease.private_path(ip.is_ipv6())) {
                    (Some(ours), Some(p)) if *ours == p.location => p.address,
                    _ => ip,
                };
                match lease.wireguard_data(ip.is_ipv6()) {
                    Ok(d) => wg = Some((d, SocketAddr::new(via, d.port))),
                    Err(e) => {
                        refused = Some(e.to_string());
                        continue;
                    }
                }
            }
            vteps[ip.is_ipv6() as usize] = Some(Vtep { addr: ip, mac });
        }
        if vteps.iter().all(|v| v.is_none()) {
            let why = refused.unwrap_or_else(|| "no public address of an underlay family of ours".into());
            skipped.push((*key, why));
            continue;
        }
        peers.push(DesiredPeer { key: *key, vtep4: vteps[0], vtep6: vteps[1], wg });
    }
    Ok(Desired { own_key: *own_key, own, own_wg, network, ipv6_network, peers, skipped })
}

/// Routes to add (or replace) and to delete to go from `old` to `new`: a
/// destination kept with another next hop is replaced, not deleted.
pub fn route_changes(old: &[Route], new: &[Route]) -> (Vec<Route>, Vec<Route>) {
    let add = new.iter().filter(|r| !old.contains(r)).cloned().collect();
    let del = old.iter().filter(|r| !new.iter().any(|n| n.dst == r.dst)).cloned().collect();
    (add, del)
}

/// An interface address of this node: the address, its prefix, its link.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalAddr {
    /// The address with its prefix length.
    pub net: IpNet,
    /// Interface index.
    pub index: u32,
}

/// The kernel routes backend `backend` needs for `d`: vxlan routes every
/// peer subnet into the TUN; host-gw routes each via the peer's address on
/// the link that reaches it, and refuses a peer that is not on-link; none
/// routes nothing.
pub fn routes_for(backend: &str, d: &Desired, tun: u32, local: &[LocalAddr]) -> anyhow::Result<Vec<Route>> {
    let mut routes = Vec::new();
    for p in &d.peers {
        for dst in p.key.subnets() {
            match backend {
                "vxlan" | "wireguard-native" => routes.push(Route { dst, oif: tun, gateway: None, onlink: false }),
                "host-gw" => {
                    let via = if dst.addr().is_ipv6() { p.vtep6 } else { p.vtep4 };
                    let Some(via) = via else {
                        bail!("host-gw: node {} has no public address of the family of {dst}", p.key);
                    };
                    let link = local.iter().find(|l| l.net.contains(&via.addr)).with_context(|| {
                        format!(
                            "host-gw needs every node on-link, and node {} ({}) is on no link of this node",
                            p.key, via.addr
                        )
                    })?;
                    routes.push(Route { dst, oif: link.index, gateway: Some(via.addr), onlink: false });
                }
                _ => {}
            }
        }
    }
    Ok(routes)
}

/// The families whose pod traffic this node masquerades (pure): IPv4 with
/// `ip-masq` (default on), IPv6 when `flannel-ipv6-masq` is on too; none
/// with the backend `none` (no Flannel data plane, as in K3s). Each with the
/// datastore's network and this node's subnet of that family.
pub fn masq_nets(cfg: &AgentConfig, d: &Desired) -> Vec<weft_control::masq::MasqNet> {
    if !cfg.ip_masq || cfg.cluster.backend == Backend::None {
        return Vec::new();
    }
    let v4 = d.network.zip(d.own_key.v4.map(IpNet::V4));
    let v6 = d.ipv6_network.zip(d.own_key.v6.map(IpNet::V6)).filter(|_| cfg.cluster.ipv6_masq);
    v4.into_iter().chain(v6).map(|(cluster, subnet)| weft_control::masq::MasqNet { cluster, subnet }).collect()
}

/// Loads and attaches the eBPF data plane for this node's IPv4 underlay;
/// returns it with the underlay interface's name. Fails with the reason
/// (no IPv4 underlay, the kernel refuses a program or tcx).
fn start_ebpf(
    cfg: &AgentConfig,
    want: &Desired,
    local: &[LocalAddr],
    snapshot: &Snapshot,
) -> anyhow::Result<(weft_engine::ebpf::EbpfPlane, String)> {
    let vtep = want.own.iter().find(|v| v.addr.is_ipv4()).context("this node has no IPv4 underlay (node-ip)")?;
    let IpAddr::V4(addr) = vtep.addr else { unreachable!("found by is_ipv4") };
    let link = local.iter().find(|l| l.net.addr() == vtep.addr).context("no interface holds node-ip")?;
    let underlay = nix::net::if_::if_indextoname(link.index)
        .context("naming the underlay interface")?
        .into_string()
        .map_err(|_| anyhow::anyhow!("the underlay interface's name is not UTF-8"))?;
    let setup = weft_engine::ebpf::EbpfSetup {
        tun: cfg.tun_name.clone(),
        underlay: underlay.clone(),
        underlay_index: link.index,
        addr,
        mac: vtep.mac,
        vni: cfg.vni,
        port: cfg.vxlan_port,
    };
    Ok((weft_engine::ebpf::EbpfPlane::start(&setup, snapshot)?, underlay))
}

/// This node's interface addresses.
pub fn local_addrs() -> anyhow::Result<Vec<LocalAddr>> {
    let mut out = Vec::new();
    for a in nix::ifaddrs::getifaddrs().context("listing interface addresses")? {
        let (Some(addr), Some(mask)) = (a.address.as_ref(), a.netmask.as_ref()) else { continue };
        let net = if let (Some(ip), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
            IpNet::new(IpAddr::V4(ip.ip()), u32::from(m.ip()).count_ones() as u8)
        } else if let (Some(ip), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
            IpNet::new(IpAddr::V6(ip.ip()), u128::from(m.ip()).count_ones() as u8)
        } else {
            continue;
        };
        let Ok(net) = net else { continue };
        out.push(LocalAddr { net, index: Netlink::link_index(&a.interface_name)? });
    }
    Ok(out)
}

/// What the main loop reacts to.
enum Event {
    /// SIGHUP: re-read a static datastore.
    Reload,
    /// SIGTERM or SIGINT.
    Stop,
    /// A new view from etcd.
    View(StaticDatastore),
    /// A worker of the engine stopped on its own: its TUN queue or socket
    /// failed (the device was deleted, for instance).
    WorkerStopped,
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(mut cfg: AgentConfig) -> anyhow::Result<()> {
    // Before anything is made: a node that cannot write its subnet.env
    // would bring up a data path no pod can use.
    // A rootless node has no pods of its own: no CNI reads a subnet.env.
    let rootless = cfg.rootless.clone();
    if rootless.is_none() {
        check_subnet_file(&cfg)?;
    }
    let (tx, rx) = crossbeam_channel::unbounded::<Event>();
    let keeper_stop = Arc::new(AtomicBool::new(false));
    // Set once the data path is up (the Kubernetes subnet manager then
    // marks the Node's network available).
    let data_path_up = Arc::new(AtomicBool::new(false));
    let wireguard = cfg.cluster.backend == Backend::WireguardNative;
    let device = if wireguard { Some(Arc::new(WgDevice::new(keys::load_or_create(&cfg.wg_key_file)?))) } else { None };
    let wg_public = device.as_ref().map(|d| d.public_key());
    let mut keeper = None;
    let (utx, urx) = crossbeam_channel::unbounded();
    let ds = match cfg.datastore.clone() {
        DatastoreSource::File(path) => StaticDatastore::load(&path)?,
        DatastoreSource::Etcd { endpoints, prefix, security } => {
            let (store, view, held, revision) = lease::start(&cfg, &endpoints, &prefix, &security, wg_public)?;
            let stop = keeper_stop.clone();
            let first = view.clone();
            keeper = Some(
                std::thread::Builder::new()
                    .name("weft-lease".into())
                    .spawn(move || lease::keep(store, first, held, revision, utx, stop))?,
            );
            view
        }
        DatastoreSource::Kube(src) => {
            let (kube, view) = weft_control::kube::start(&mut cfg, &src, wg_public)?;
            let (stop, up) = (keeper_stop.clone(), data_path_up.clone());
            keeper =
                Some(std::thread::Builder::new().name("weft-kube".into()).spawn(move || kube.keep(utx, up, stop))?);
            view
        }
    };
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for lease::Update::View(v) in urx {
                if tx.send(Event::View(v)).is_err() {
                    return;
                }
            }
        });
    }
    let want = desired(&cfg, &ds)?;
    for (key, why) in &want.skipped {
        tracing::warn!(lease = %key, why, "lease skipped");
    }
    if let (Some(ours), Some(announced)) = (wg_public, want.own_wg) {
        if announced.public_key != ours {
            bail!(
                "this node's lease {} announces the WireGuard key {} but config key `wireguard-key-file` holds the key of {}",
                want.own_key,
                keys::encode(&announced.public_key),
                keys::encode(&ours)
            );
        }
    }
    let wg_options = if wireguard { Some(ds.config.wireguard_options()?) } else { None };
    let first = want.own.first().context("this node's lease announces no public address")?;
    // A rootless node opens no netlink socket: it binds its UDP sockets to
    // node-ip (which fails if no interface has it) and is told its MTU.
    let (mut nl, local, underlay_mtu) = match &rootless {
        Some(r) => {
            let mut ports = vec![("vxlan-port", cfg.vxlan_port)];
            if let Some(o) = &wg_options {
                ports =
                    vec![("wireguard listen port", o.listen_port), ("wireguard listen port (IPv6)", o.listen_port_v6)];
            }
            r.check_ports(&ports, unprivileged_port_start())?;
            (None, Vec::new(), r.underlay_mtu)
        }
        None => {
            let mut nl = Netlink::open().context("opening netlink")?;
            let local = local_addrs()?;
            let link = local.iter().find(|l| l.net.addr() == first.addr).with_context(|| {
                format!(
                    "config key `node-ip`: value `{}` refused: no interface of this node has that address",
                    first.addr
                )
            })?;
            let mtu = nl.link_mtu(link.index)?;
            (Some(nl), local, mtu)
        }
    };
    let vxlan = cfg.backend() == "vxlan";
    let overhead = if wireguard {
        WG_OVERHEAD
    } else if !vxlan {
        0
    } else if want.own.iter().any(|v| v.addr.is_ipv6()) {
        OVERHEAD_V6
    } else {
        OVERHEAD_V4
    } as u32;
    let mtu = match wg_options.as_ref().and_then(|o| o.mtu) {
        Some(m) => m,
        None => {
            underlay_mtu.checked_sub(overhead).filter(|m| *m >= 576).context("underlay MTU too small for the tunnel")?
        }
    };

    let mut peers = PeerState {
        counters: HashMap::new(),
        wg: HashMap::new(),
        next_index: 1,
        device: device.clone(),
        options: wg_options.clone(),
    };
    let snapshot = Arc::new(peers.snapshot(&want));
    let encap = match (&device, &wg_options) {
        (Some(d), Some(o)) => Some((
            Encap::Wireguard(d.clone(), want.own.iter().map(|v| v.addr).collect()),
            o.listen_port,
            o.listen_port_v6,
        )),
        _ if vxlan => Some((
            Encap::Vxlan(want.own.iter().map(|v| Vxlan::new(cfg.vni, cfg.vxlan_port, *v)).collect()),
            cfg.vxlan_port,
            cfg.vxlan_port,
        )),
        _ => None,
    };
    let mut netstack = None;
    let engine = if let Some((encap, port, port_v6)) = encap {
        let engine_cfg = EngineConfig {
            tun_name: cfg.tun_name.clone(),
            threads: cfg.threads,
            encap,
            port,
            port_v6,
            mtu: mtu as usize,
            offloads: weft_engine::Offloads {
                tun: cfg.offloads.tun,
                udp_gso: cfg.offloads.udp_gso,
                udp_gro: cfg.offloads.udp_gro,
            },
            busy_poll_us: cfg.busy_poll_us,
            rootless: rootless.is_some(),
        };
        match &rootless {
            Some(r) => {
                let (engine, end) =
                    Engine::start_rootless(&engine_cfg, snapshot.clone()).context("starting the engine (sockets)")?;
                let stack = weft_netstack::Netstack::start(netstack_config(r, &want, mtu), end)
                    .context("starting the userspace stack (config keys socks5-addr, forward, expose)")?;
                if let Some(a) = stack.socks_addr() {
                    tracing::info!(socks5 = %a, "SOCKS5 server listening");
                }
                netstack = Some(stack);
                Some(engine)
            }
            None => Some(
                Engine::start(&engine_cfg, snapshot.clone()).context("starting the engine (TUN device, sockets)")?,
            ),
        }
    } else {
        None
    };
    let state = Arc::new(MetricsState {
        workers: engine.as_ref().map(|e| e.counters().to_vec()).unwrap_or_default(),
        snapshot: Mutex::new(snapshot),
        ready: Default::default(),
        netstack: netstack.as_ref().map(|n| n.counters().clone()),
        ebpf: Mutex::new(None),
    });
    if let Some(addr) = cfg.metrics_addr {
        metrics::serve(addr, state.clone())
            .with_context(|| format!("config key `metrics-addr`: cannot listen on {addr}"))?;
    }

    let _uapi = match (&device, &wg_options) {
        // The UAPI's directory is root's.
        _ if rootless.is_some() => None,
        (Some(d), Some(o)) => {
            let dev = crate::wgdev::AgentWg { device: d.clone(), options: o.clone(), state: state.clone() };
            let path = weft_uapi::socket_path(&cfg.tun_name);
            Some(
                weft_uapi::serve(&path, Arc::new(dev))
                    .with_context(|| format!("serving the UAPI on {}", path.display()))?,
            )
        }
        _ => None,
    };
    let mut tun = 0;
    if let (Some(_), Some(nl)) = (&engine, &mut nl) {
        tun = Netlink::link_index(&cfg.tun_name)?;
        no_link_local(&cfg.tun_name);
        nl.set_link(tun, true, Some(mtu)).context("setting the TUN device up")?;
        for net in want.own_key.subnets() {
            let host = if net.addr().is_ipv4() { 32 } else { 128 };
            let addr = IpNet::new(net.network(), host).expect("a host prefix is valid");
            nl.add_address(tun, addr).context("addressing the TUN device")?;
        }
    }
    // One transaction either way: it installs weft's table, replacing the
    // one a killed run left, or removes such a stale table when off.
    let masq_rules = match rootless {
        Some(_) => Vec::new(),
        None => weft_control::masq::plan(&masq_nets(&cfg, &want)),
    };
    // A rootless node has no nftables to touch.
    let applied = if rootless.is_some() { Ok(()) } else { weft_control::masq::apply(&masq_rules) };
    match applied {
        Ok(()) if masq_rules.is_empty() => {}
        Ok(()) => tracing::info!(rules = masq_rules.len(), table = weft_control::masq::TABLE, "masquerade installed"),
        Err(e) if masq_rules.is_empty() => tracing::debug!(error = %e, "no stale masquerade table removed"),
        Err(e) => return Err(e).context("installing the masquerade rules (config key `ip-masq`)"),
    }
    let mut routed = Vec::new();
    if let Some(nl) = &mut nl {
        routed = routes_for(cfg.backend(), &want, tun, &local)?;
        for r in &routed {
            nl.replace_route(r).with_context(|| format!("adding the route to {}", r.dst))?;
        }
        let env = subnet_env(want.network, &want.own_key, want.ipv6_network, mtu, !masq_rules.is_empty());
        write_subnet_env(&cfg, &env)?;
    }
    // Only a VXLAN node with root can load the programs.
    let ebpf_capable = vxlan && rootless.is_none();
    if cfg.dataplane == Dataplane::Auto && !ebpf_capable {
        let why =
            if rootless.is_some() { "a rootless node loads no BPF" } else { "eBPF serves the vxlan backend only" };
        tracing::info!(reason = why, backend = cfg.backend(), "dataplane auto: no eBPF programs");
    }
    if ebpf_capable && cfg.dataplane != Dataplane::Userspace {
        let current = state.snapshot.lock().map(|s| s.clone()).unwrap_or_default();
        match start_ebpf(&cfg, &want, &local, &current) {
            Ok((plane, underlay)) => {
                tracing::info!(
                    tun = %cfg.tun_name,
                    underlay = %underlay,
                    "data plane: eBPF (tcx egress of the TUN device, tcx ingress of the underlay), the userspace \
                     engine as its slow path"
                );
                if let Ok(mut e) = state.ebpf.lock() {
                    *e = Some(plane);
                }
            }
            Err(e) if cfg.dataplane == Dataplane::Auto => {
                tracing::info!(reason = %format!("{e:#}"), "data plane: userspace (dataplane auto: no eBPF)");
            }
            Err(e) => return Err(e).context("config key `dataplane`: value `ebpf` refused"),
        }
    }
    state.ready.store(true, Relaxed);
    data_path_up.store(true, Relaxed);
    tracing::info!(node = %cfg.node_name, subnet = %want.own_key, backend = cfg.backend(), mtu, peers = want.peers.len(), "agent ready");

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    let signal_tx = tx.clone();
    std::thread::spawn(move || {
        for sig in signals.forever() {
            let ev = if sig == signal_hook::consts::SIGHUP { Event::Reload } else { Event::Stop };
            if signal_tx.send(ev).is_err() {
                return;
            }
        }
    });
    if let Some(e) = &engine {
        let (stopped, worker_tx) = (e.stopped(), tx.clone());
        std::thread::Builder::new().name("weft-watch".into()).spawn(move || {
            while stopped.recv().is_ok() {
                if worker_tx.send(Event::WorkerStopped).is_err() {
                    return;
                }
            }
        })?;
    }
    let own_key = want.own_key;
    let mut plane = Plane { engine: engine.as_ref(), nl: nl.as_mut(), tun, local: &local };
    let mut failed = None;
    for ev in rx {
        let view = match (ev, &cfg.datastore) {
            (Event::Stop, _) => break,
            // A half-dead data path loses packets without a word; a process
            // that ends is restarted (systemd, the DaemonSet) and makes its
            // device anew, as after a kill.
            (Event::WorkerStopped, _) => {
                failed = Some(format!(
                    "a worker of the data path stopped (is the TUN device {} gone?); exiting so that a restart \
                     makes it anew",
                    cfg.tun_name
                ));
                break;
            }
            // A file that does not parse (an operator's write caught half
            // way) is refused below: the last good copy stays in force.
            (Event::Reload, DatastoreSource::File(path)) => StaticDatastore::load(path)
                .with_context(|| format!("re-reading config key `datastore-file` {}", path.display())),
            (Event::Reload, DatastoreSource::Etcd { .. } | DatastoreSource::Kube(_)) => continue,
            (Event::View(v), _) => Ok(v),
        };
        let applied = view.and_then(|v| plane.apply(&cfg, &v, own_key, &mut routed, &mut peers, &state));
        if let Err(e) = applied {
            tracing::error!(error = %format!("{e:#}"), "update refused; keeping the previous state");
        }
    }
    tracing::info!("shutting down");
    keeper_stop.store(true, Relaxed);
    state.ready.store(false, Relaxed);
    // Detaches the programs: packets go to the TUN again until it is gone.
    if let Ok(mut e) = state.ebpf.lock() {
        drop(e.take());
    }
    if let Some(nl) = &mut nl {
        for r in &routed {
            if let Err(e) = nl.delete_route(r) {
                tracing::warn!(route = %r.dst, error = %e, "removing route");
            }
        }
    }
    drop(netstack);
    if !masq_rules.is_empty() {
        if let Err(e) = weft_control::masq::remove() {
            tracing::warn!(error = %e, "removing the masquerade table");
        }
    }
    if let Some(engine) = engine {
        engine.stop();
    }
    if let Some(k) = keeper {
        let _ = k.join();
    }
    match failed {
        Some(why) => bail!(why),
        None => Ok(()),
    }
}

/// What an update changes: the engine's snapshot and the kernel's routes.
struct Plane<'a> {
    engine: Option<&'a Engine>,
    /// None on a rootless node: it has no routes.
    nl: Option<&'a mut Netlink>,
    tun: u32,
    local: &'a [LocalAddr],
}

impl Plane<'_> {
    /// Applies the difference between the current state and what `ds` says.
    /// This node keeps the subnet it started with; a view that gives it
    /// another is refused (a restart picks the new one up).
    fn apply(
        &mut self,
        cfg: &AgentConfig,
        ds: &StaticDatastore,
        own_key: SubnetKey,
        routed: &mut Vec<Route>,
        peers: &mut PeerState,
        state: &MetricsState,
    ) -> anyhow::Result<()> {
        let want = desired(cfg, ds)?;
        if want.own_key != own_key {
            bail!("this node's lease moved from {own_key} to {}; restart to take it", want.own_key);
        }
        let new_routes = match self.nl {
            Some(_) => routes_for(cfg.backend(), &want, self.tun, self.local)?,
            None => Vec::new(),
        };
        let (add, del) = route_changes(routed, &new_routes);
        // Routes first for new nodes, so their packets reach the TUN as soon
        // as the snapshot knows them; old routes go after the snapshot drops them.
        for r in &add {
            if let Some(nl) = self.nl.as_mut() {
                nl.replace_route(r).with_context(|| format!("adding the route to {}", r.dst))?;
            }
        }
        let snapshot = Arc::new(peers.snapshot(&want));
        if let Some(engine) = self.engine {
            engine.update(snapshot.clone());
        }
        if let Ok(mut e) = state.ebpf.lock() {
            if let Some(e) = e.as_mut() {
                e.update(&snapshot).context("writing the eBPF maps")?;
            }
        }
        if let Ok(mut s) = state.snapshot.lock() {
            *s = snapshot;
        }
        for r in &del {
            if let Some(nl) = self.nl.as_mut() {
                nl.delete_route(r).with_context(|| format!("removing the route to {}", r.dst))?;
            }
        }
        *routed = new_routes;
        tracing::info!(added = add.len(), removed = del.len(), peers = want.peers.len(), "leases applied");
        Ok(())
    }
}

/// The underlay families this node has.
fn families(d: &Desired) -> Families {
    Families { v4: d.own.iter().any(|v| v.addr.is_ipv4()), v6: d.own.iter().any(|v| v.addr.is_ipv6()) }
}

/// What the agent keeps about peers across updates: their counters and
/// their WireGuard sessions, so that an unchanged node never notices one.
struct PeerState {
    counters: HashMap<SubnetKey, Arc<PeerCounters>>,
    wg: HashMap<SubnetKey, Arc<WgPeer>>,
    next_index: u32,
    device: Option<Arc<WgDevice>>,
    options: Option<WgOptions>,
}

impl PeerState {
    /// The engine's snapshot for `d`. A WireGuard peer whose key is
    /// unchanged keeps its session; a changed endpoint is set on it.
    fn snapshot(&mut self, d: &Desired) -> Snapshot {
        self.counters.retain(|k, _| d.peers.iter().any(|p| p.key == *k));
        self.wg.retain(|k, w| {
            d.peers.iter().any(|p| p.key == *k && p.wg.is_some_and(|(data, _)| data.public_key == w.public_key))
        });
        let peers = d
            .peers
            .iter()
            .map(|p| Peer {
                name: p.key.to_string(),
                vtep4: p.vtep4,
                vtep6: p.vtep6,
                subnets: p.key.subnets(),
                counters: self.counters.entry(p.key).or_default().clone(),
                wg: self.wg_peer(p),
            })
            .collect();
        Snapshot::new(peers, families(d))
    }

    fn wg_peer(&mut self, p: &DesiredPeer) -> Option<Arc<WgPeer>> {
        let (device, options) = (self.device.as_ref()?, self.options.as_ref()?);
        let (data, endpoint) = p.wg?;
        if let Some(existing) = self.wg.get(&p.key) {
            let mut st = existing.lock();
            if st.configured != Some(endpoint) {
                st.endpoint = Some(endpoint);
                st.configured = Some(endpoint);
            }
            drop(st);
            return Some(existing.clone());
        }
        let keepalive = Some(options.keepalive).filter(|k| *k > 0);
        let peer =
            Arc::new(WgPeer::new(device, data.public_key, options.psk, keepalive, self.next_index, Some(endpoint)));
        self.next_index = (self.next_index + 1) % (1 << 24);
        self.wg.insert(p.key, peer.clone());
        Some(peer)
    }
}

/// The userspace stack's config: the node's pod address in each family
/// (the subnet's first host, as a bridge's would be), with the cluster
/// network's prefix, so that every pod is on link.
fn netstack_config(r: &RootlessConfig, d: &Desired, mtu: u32) -> weft_netstack::Config {
    let mut addrs = Vec::new();
    let first_host = |net: IpNet| match net.network() {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) + 1).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) + 1).into()),
    };
    for subnet in d.own_key.subnets() {
        let cluster = if subnet.addr().is_ipv4() { d.network } else { d.ipv6_network };
        if let Some(cluster) = cluster.filter(|c| c.addr().is_ipv4() == subnet.addr().is_ipv4()) {
            addrs.push((first_host(subnet), cluster.prefix_len()));
        }
    }
    weft_netstack::Config {
        addrs,
        mtu: mtu as usize,
        socks: r.socks5,
        auth: match &r.socks5_user {
            Some((user, pass)) => weft_netstack::socks::Auth::UserPass { user: user.clone(), pass: pass.clone() },
            None => weft_netstack::socks::Auth::None,
        },
        forwards: r.forwards.clone(),
        exposes: r.exposes.clone(),
        max_connections: r.max_connections,
        tcp_buffer: weft_netstack::DEFAULT_TCP_BUFFER,
    }
}

/// The kernel's lowest port an unprivileged process may bind.
fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// Keeps the TUN device without an IPv6 link-local address (address
/// generation mode `none`, set before the device goes up): with one, the
/// kernel sends router solicitations and MLD reports into the device, which
/// route to no node and would be counted as drops. Pod traffic is routed to
/// the device by prefix and needs no address of its own. A kernel without
/// IPv6 has no such setting, and nothing to do.
fn no_link_local(tun: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{tun}/addr_gen_mode");
    if let Err(e) = std::fs::write(&path, "1") {
        tracing::debug!(tun, error = %e, "no IPv6 address generation mode to set");
    }
}

/// That `subnet.env` can be written where config key `subnet-file` says:
/// its directory is made if missing, and a file is created and removed
/// beside it. Refused with the key, the path and the reason.
fn check_subnet_file(cfg: &AgentConfig) -> anyhow::Result<()> {
    let path = &cfg.subnet_file;
    let probe = path.with_extension("tmp");
    let tried = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::File::create(&probe))
        .and_then(|_| std::fs::remove_file(&probe));
    tried.map_err(|e| {
        anyhow::anyhow!(
            "config key `subnet-file`: value `{}` refused: cannot write there ({e}); the CNI plugin reads it, \
             so its directory must be writable",
            path.display()
        )
    })
}

fn write_subnet_env(cfg: &AgentConfig, env: &str) -> anyhow::Result<()> {
    if let Some(dir) = cfg.subnet_file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = cfg.subnet_file.with_extension("tmp");
    std::fs::write(&tmp, env).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &cfg.subnet_file).with_context(|| format!("writing {}", cfg.subnet_file.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn cfg_with(ip: &str, extra: &[(&str, &str)]) -> AgentConfig {
        let mut pairs = BTreeMap::new();
        pairs.insert("node-ip".to_string(), ip.to_string());
        pairs.insert("datastore-file".to_string(), "unused".to_string());
        for (k, v) in extra {
            pairs.insert(k.to_string(), v.to_string());
        }
        AgentConfig::from_pairs(&pairs).unwrap()
    }

    fn cfg(ip: &str) -> AgentConfig {
        cfg_with(ip, &[])
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
        assert_eq!(d.own.len(), 1);
        assert_eq!(d.own[0].mac, [0x0a, 0x58, 0x0a, 0xf4, 1, 0]);
        assert_eq!(d.peers.len(), 1);
        assert_eq!(d.peers[0].vtep4.unwrap().addr, "192.168.77.2".parse::<IpAddr>().unwrap());
        let routes = routes_for("vxlan", &d, 7, &[]).unwrap();
        assert_eq!(routes, vec![Route { dst: "10.244.2.0/24".parse().unwrap(), oif: 7, gateway: None, onlink: false }]);
        assert!(routes_for("none", &d, 7, &[]).unwrap().is_empty());
    }

    #[test]
    fn a_peer_of_our_location_is_reached_at_its_node_ip_the_others_at_their_lease_address() {
        let key = |b: u8| weft_control::keys::encode(&[b; 32]);
        let lease = |n: u8, ext: &str, loc: &str| {
            format!(
                r#""10.244.{n}.0-24":{{"PublicIP":"{ext}","BackendType":"wireguard","BackendData":{{"PublicKey":"{}","Port":51820{loc}}}}}"#,
                key(n)
            )
        };
        let json = format!(
            r#"{{"config":{{"Network":"10.244.0.0/16","Backend":{{"Type":"wireguard"}}}},"subnets":{{{},{},{},{}}}}}"#,
            lease(1, "198.51.100.101", r#","WeftLocation":"c1","WeftInternalIP":"172.16.0.11""#),
            lease(2, "198.51.100.102", r#","WeftLocation":"c2","WeftInternalIP":"172.16.0.11""#),
            lease(3, "198.51.100.103", r#","WeftLocation":"c1","WeftInternalIP":"172.16.0.12""#),
            lease(4, "192.168.1.10", ""),
        );
        let ds = StaticDatastore::parse(json.as_bytes()).unwrap();
        let base = [
            ("flannel-backend", "wireguard-native"),
            ("node-external-ip", "198.51.100.101"),
            ("flannel-external-ip", "true"),
        ];
        let endpoint = |d: &Desired, n: u8| {
            let p = d.peers.iter().find(|p| p.key.to_string() == format!("10.244.{n}.0-24")).unwrap();
            p.wg.unwrap().1.to_string()
        };
        let located = [&base[..], &[("node-location", "c1")]].concat();
        let d = desired(&cfg_with("172.16.0.11", &located), &ds).unwrap();
        assert_eq!(d.own_key.to_string(), "10.244.1.0-24", "found by its external IP");
        assert_eq!(endpoint(&d, 3), "172.16.0.12:51820", "same location: the private network");
        assert_eq!(endpoint(&d, 2), "198.51.100.102:51820", "another location, its node-ip the same as ours");
        assert_eq!(endpoint(&d, 4), "192.168.1.10:51820", "no location: the lease's address");
        // The peer's VTEP (what it is known by) stays its lease address.
        assert_eq!(
            d.peers.iter().find(|p| p.key.to_string() == "10.244.3.0-24").unwrap().vtep4.unwrap().addr.to_string(),
            "198.51.100.103"
        );
        let d = desired(&cfg_with("172.16.0.11", &base), &ds).unwrap();
        assert_eq!(endpoint(&d, 3), "198.51.100.103:51820", "no location of our own: every peer at its lease address");
    }

    #[test]
    fn dual_stack_leases_give_a_vtep_per_family() {
        let json = r#"{"config":{"Network":"10.244.0.0/16","IPv6Network":"fd00::/56","EnableIPv6":true,"Backend":{"Type":"vxlan"}},"subnets":{
            "10.244.1.0-24&fd00:0:0:1::-64":{"PublicIP":"192.168.77.1","PublicIPv6":"fd77::1","BackendType":"vxlan",
                "BackendData":{"VNI":1,"VtepMAC":"0a:58:0a:f4:01:00"},"BackendV6Data":{"VNI":1,"VtepMAC":"0a:58:0a:f4:01:06"}},
            "10.244.2.0-24&fd00:0:0:2::-64":{"PublicIP":"192.168.77.2","PublicIPv6":"fd77::2","BackendType":"vxlan",
                "BackendData":{"VNI":1,"VtepMAC":"0a:58:0a:f4:02:00"},"BackendV6Data":{"VNI":1,"VtepMAC":"0a:58:0a:f4:02:06"}}}}"#;
        let ds = StaticDatastore::parse(json.as_bytes()).unwrap();
        let dual = [("cluster-cidr", "10.244.0.0/16,fd00::/56"), ("service-cidr", "10.96.0.0/16,fd01::/112")];
        let d = desired(&cfg_with("192.168.77.1,fd77::1", &dual), &ds).unwrap();
        assert_eq!(d.own.len(), 2);
        assert_eq!(d.own[1].mac, [0x0a, 0x58, 0x0a, 0xf4, 1, 6], "the IPv6 VTEP takes BackendV6Data's MAC");
        let p = &d.peers[0];
        assert_eq!(p.vtep6.unwrap().mac, [0x0a, 0x58, 0x0a, 0xf4, 2, 6]);
        assert_eq!(routes_for("vxlan", &d, 7, &[]).unwrap().len(), 2, "both pod subnets routed");
        // A node whose node-ip lacks the lease's IPv6 address is refused.
        assert!(desired(&cfg("192.168.77.1"), &ds).is_err());
    }

    #[test]
    fn host_gw_routes_via_on_link_peers_and_refuses_others() {
        let json = r#"{"config":{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}},"subnets":{
            "10.244.1.0-24":{"PublicIP":"192.168.77.1","BackendType":"host-gw"},
            "10.244.2.0-24":{"PublicIP":"192.168.77.2","BackendType":"host-gw"}}}"#;
        let ds = StaticDatastore::parse(json.as_bytes()).unwrap();
        let c = cfg_with("192.168.77.1", &[("flannel-backend", "host-gw")]);
        let d = desired(&c, &ds).unwrap();
        let local = [LocalAddr { net: "192.168.77.1/24".parse().unwrap(), index: 3 }];
        let routes = routes_for("host-gw", &d, 0, &local).unwrap();
        assert_eq!(
            routes,
            vec![Route {
                dst: "10.244.2.0/24".parse().unwrap(),
                oif: 3,
                gateway: Some("192.168.77.2".parse().unwrap()),
                onlink: false
            }]
        );
        let elsewhere = [LocalAddr { net: "192.168.78.1/24".parse().unwrap(), index: 3 }];
        let e = routes_for("host-gw", &d, 0, &elsewhere).unwrap_err().to_string();
        assert!(e.contains("on-link") && e.contains("192.168.77.2"), "{e}");
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
        let e = desired(&cfg("192.168.77.9"), &ds("")).unwrap_err().to_string();
        assert!(e.contains("192.168.77.9") && e.contains("node-ip"), "{e}");
        let c = cfg_with("192.168.77.1", &[("cluster-cidr", "10.42.0.0/16")]);
        let e = desired(&c, &ds("")).unwrap_err().to_string();
        assert!(e.contains("cluster-cidr") && e.contains("10.244.0.0/16"), "{e}");
    }

    #[test]
    fn masquerade_follows_ip_masq_and_flannel_ipv6_masq() {
        let json = r#"{"config":{"Network":"10.244.0.0/16","IPv6Network":"fd00::/56","EnableIPv6":true,"Backend":{"Type":"vxlan"}},"subnets":{
            "10.244.1.0-24&fd00:0:0:1::-64":{"PublicIP":"192.168.77.1","PublicIPv6":"fd77::1","BackendType":"vxlan",
                "BackendData":{"VNI":1,"VtepMAC":"0a:58:0a:f4:01:00"},"BackendV6Data":{"VNI":1,"VtepMAC":"0a:58:0a:f4:01:06"}}}}"#;
        let ds = StaticDatastore::parse(json.as_bytes()).unwrap();
        let dual = [("cluster-cidr", "10.244.0.0/16,fd00::/56"), ("service-cidr", "10.96.0.0/16,fd01::/112")];
        let c = cfg_with("192.168.77.1,fd77::1", &dual);
        let nets = masq_nets(&c, &desired(&c, &ds).unwrap());
        assert_eq!(
            nets,
            vec![weft_control::masq::MasqNet {
                cluster: "10.244.0.0/16".parse().unwrap(),
                subnet: "10.244.1.0/24".parse().unwrap()
            }],
            "IPv4 by default, IPv6 only when asked"
        );
        let c = cfg_with("192.168.77.1,fd77::1", &[dual[0], dual[1], ("flannel-ipv6-masq", "true")]);
        let nets = masq_nets(&c, &desired(&c, &ds).unwrap());
        assert_eq!(nets.len(), 2);
        assert_eq!(nets[1].subnet, "fd00:0:0:1::/64".parse::<IpNet>().unwrap());
        let c =
            cfg_with("192.168.77.1,fd77::1", &[dual[0], dual[1], ("flannel-ipv6-masq", "true"), ("ip-masq", "false")]);
        assert!(masq_nets(&c, &desired(&c, &ds).unwrap()).is_empty(), "ip-masq: false turns both off");
    }

    #[test]
    fn route_changes_touch_only_the_difference() {
        let r = |s: &str, gw: Option<&str>| Route {
            dst: s.parse().unwrap(),
            oif: 1,
            gateway: gw.map(|g| g.parse().unwrap()),
            onlink: false,
        };
        let old = vec![r("10.244.2.0/24", None), r("10.244.3.0/24", None)];
        let new = vec![r("10.244.3.0/24", None), r("10.244.4.0/24", None)];
        assert_eq!(route_changes(&old, &new), (vec![r("10.244.4.0/24", None)], vec![r("10.244.2.0/24", None)]));
        assert_eq!(route_changes(&new, &new), (vec![], vec![]));
        // A new next hop for a kept destination is a replacement, not a delete.
        let moved = vec![r("10.244.3.0/24", Some("192.168.77.9")), r("10.244.4.0/24", None)];
        assert_eq!(route_changes(&new, &moved), (vec![r("10.244.3.0/24", Some("192.168.77.9"))], vec![]));
    }
}
