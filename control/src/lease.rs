//! This node's subnet lease in etcd, and the watch of everyone else's.
//!
//! At start the agent reclaims the lease that already carries its public
//! address (a restart keeps its subnet), or else takes a free subnet with a
//! create-if-absent transaction, preferring the one its previous
//! `subnet.env` names, and retrying when another node wins the race. The
//! lease lives under a 24-hour etcd lease that a keeper thread renews. The
//! same thread watches `<prefix>/subnets/` and sends a whole new view after
//! every change; after a compaction or a lost connection it lists again, and
//! when its own lease has gone missing (etcd restored empty, an operator
//! deleted it) it writes it back. While etcd is unreachable it only retries:
//! the data plane keeps forwarding with the last view it was given.

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use crossbeam_channel::Sender;
use serde_json::Value;

use crate::alloc;
use crate::cluster::Backend;
use crate::config::AgentConfig;
use crate::datastore::{Lease, NetworkConfig, PrivatePath, StaticDatastore, VxlanData, WgData};
use crate::error::ConfigError;
use crate::etcd::{EtcdStore, LeaseEvent, StoreError};
use crate::etcd_tls::{EtcdSecurity, HandshakeError, TlsFile};
use crate::subnet::SubnetKey;

/// Lifetime of a subnet lease (Flannel's).
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often the lease is renewed: an hour, well inside its lifetime, so a
/// long etcd outage is survived without losing the subnet.
pub const RENEW_EVERY: Duration = Duration::from_secs(3600);
/// Timeout of every etcd call.
pub const ETCD_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts at taking a subnet when other nodes keep winning the race.
const ACQUIRE_ATTEMPTS: usize = 10;
/// Longest wait between retries while etcd is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A lease this node holds.
#[derive(Debug, Clone)]
pub struct Held {
    /// Its key.
    pub key: SubnetKey,
    /// Its value.
    pub lease: Lease,
    /// The etcd lease keeping it alive.
    pub lease_id: i64,
}

/// A locally administered unicast MAC derived from this node's address, so
/// the VTEP MAC stays the same across restarts.
pub fn vtep_mac(addr: IpAddr) -> [u8; 6] {
    let mut h = Fnv::default();
    match addr {
        IpAddr::V4(a) => h.write(&a.octets()),
        IpAddr::V6(a) => h.write(&a.octets()),
    }
    let b = h.finish().to_be_bytes();
    [0x0e, b[0], b[1], b[2], b[3], b[4]]
}

#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        if self.0 == 0 {
            self.0 = 0xcbf2_9ce4_8422_2325;
        }
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The network config a cluster of this shape uses, as written to etcd when
/// none is there yet.
pub fn network_config(cfg: &AgentConfig) -> NetworkConfig {
    let c = &cfg.cluster;
    let mut net = NetworkConfig::for_cluster(
        c.cluster_v4().map(|n| (n, c.node_mask_v4)),
        c.cluster_v6().map(|n| (n, c.node_mask_v6)),
        cfg.lease_backend(),
    );
    if c.backend == Backend::WireguardNative {
        // K3s's wireguard-native default: it keeps NAT mappings open and
        // lets a node nobody can reach first be learned by its peers.
        net.backend["PersistentKeepaliveInterval"] = K3S_KEEPALIVE.into();
    }
    net
}

/// K3s's `PersistentKeepaliveInterval` for wireguard-native, in seconds.
pub const K3S_KEEPALIVE: u16 = 25;

/// The lease value this node announces (pure).
pub fn our_lease(cfg: &AgentConfig, net: &NetworkConfig, wg_public: Option<[u8; 32]>) -> anyhow::Result<Lease> {
    let c = &cfg.cluster;
    let v4 = net.network.is_some() && net.enable_ipv4 != Some(false);
    let v6 = net.ipv6_network.is_some() && (net.enable_ipv6 == Some(true) || !v4);
    let public_ip = if v4 {
        Some(c.public_ip(false).context("the cluster has IPv4 but config key `node-ip` has no IPv4 address")?)
    } else {
        None
    };
    let public_ipv6 = if v6 {
        Some(c.public_ip(true).context("the cluster has IPv6 but config key `node-ip` has no IPv6 address")?)
    } else {
        None
    };
    let wg = match (c.backend, wg_public) {
        (Backend::WireguardNative, Some(k)) => Some((k, net.wireguard_options()?)),
        _ => None,
    };
    let data = |addr: Option<IpAddr>| {
        let data = match (c.backend, addr, &wg) {
            (Backend::Vxlan, Some(a), _) => VxlanData { vni: cfg.vni, vtep_mac: vtep_mac(a) }.to_value(),
            (Backend::WireguardNative, Some(a), Some((key, o))) => {
                let port = if a.is_ipv6() { o.listen_port_v6 } else { o.listen_port };
                WgData { public_key: *key, port }.to_value()
            }
            _ => Value::Null,
        };
        // With a location, the nodes of the same one learn the node-ip too.
        let internal = addr.and_then(|a| cfg.node_ips().iter().copied().find(|i| i.is_ipv6() == a.is_ipv6()));
        match (&cfg.node_location, internal) {
            (Some(location), Some(address)) => PrivatePath { location: location.clone(), address }.add_to(data),
            _ => data,
        }
    };
    let as_ip4 = |a: IpAddr| if let IpAddr::V4(a) = a { Some(a) } else { None };
    let as_ip6 = |a: IpAddr| if let IpAddr::V6(a) = a { Some(a) } else { None };
    Ok(Lease {
        public_ip: public_ip.and_then(as_ip4),
        public_ipv6: public_ipv6.and_then(as_ip6),
        backend_type: cfg.lease_backend().to_string(),
        backend_data: data(public_ip.or(public_ipv6)),
        backend_v6_data: public_ipv6
            .filter(|_| matches!(c.backend, Backend::Vxlan | Backend::WireguardNative))
            .map(|a| data(Some(a))),
    })
}

/// The subnet a previous run wrote into `subnet.env`, if any.
pub fn previous_subnet(env: &str) -> Option<SubnetKey> {
    let get =
        |k: &str| env.lines().find_map(|l| l.strip_prefix(k)?.strip_prefix('=')?.trim().parse::<ipnet::IpNet>().ok());
    let key = SubnetKey {
        v4: get("FLANNEL_SUBNET").and_then(|n| if let ipnet::IpNet::V4(n) = n.trunc() { Some(n) } else { None }),
        v6: get("FLANNEL_IPV6_SUBNET").and_then(|n| if let ipnet::IpNet::V6(n) = n.trunc() { Some(n) } else { None }),
    };
    (key.v4.is_some() || key.v6.is_some()).then_some(key)
}

/// Connects, makes sure the network config exists, takes this node's lease.
/// Returns the store, the first view and the held lease.
pub fn start(
    cfg: &AgentConfig,
    endpoints: &[String],
    prefix: &str,
    security: &EtcdSecurity,
    wg_public: Option<[u8; 32]>,
) -> anyhow::Result<(Arc<EtcdStore>, StaticDatastore, Held, i64)> {
    let store = match EtcdStore::connect_with(endpoints, prefix, ETCD_TIMEOUT, security) {
        Ok(s) => Arc::new(s),
        Err(e) => match refused_access(&e, security) {
            Some(refusal) => return Err(refusal.into()),
            None => return Err(e).context("connecting to etcd"),
        },
    };
    let config = match store.network_config() {
        Ok(c) => c,
        Err(StoreError::NoConfig { .. }) => {
            let c = network_config(cfg);
            store.put_network_config(&c).context("writing the network config")?;
            tracing::info!(prefix, "wrote the network config from cluster-cidr");
            c
        }
        Err(e) => return Err(e).context("reading the network config"),
    };
    let value = our_lease(cfg, &config, wg_public)?;
    let previous = std::fs::read_to_string(&cfg.subnet_file).ok().and_then(|t| previous_subnet(&t));
    let held = acquire(&store, &config, &value, previous.as_ref())?;
    let listing = store.leases().context("listing leases")?;
    let mut leases = listing.leases;
    leases.insert(held.key, held.lease.clone());
    Ok((store, StaticDatastore { config, leases }, held, listing.revision))
}

/// A refusal of the TLS files or the user, as the config key at fault, its
/// value and the reason; `None` for other errors.
fn refused_access(e: &StoreError, security: &EtcdSecurity) -> Option<ConfigError> {
    let shown = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    match e {
        StoreError::TlsFile(f) => Some(crate::config::tls_file_refused(f)),
        StoreError::Tls(HandshakeError::Refused { endpoint, file: TlsFile::Ca, source }) => Some(ConfigError::new(
            "etcd-cafile",
            shown(&security.ca_file),
            format!("the CA that signed the server certificate of {endpoint}; TLS refused it: {source}"),
        )),
        StoreError::Tls(HandshakeError::Refused { endpoint, file, source }) => Some(ConfigError::new(
            file.key(),
            shown(&security.cert_file),
            format!("a client certificate signed by a CA that {endpoint} trusts; etcd refused it: {source}"),
        )),
        StoreError::Tls(other) => Some(ConfigError::new("etcd-endpoints", "", other)),
        StoreError::Auth { user, source } => Some(ConfigError::new(
            "etcd-username",
            user,
            format!("a user etcd knows, with its password in etcd-password; etcd said: {source}"),
        )),
        _ => None,
    }
}

/// Takes a lease for `value`: reclaims the one with our address, or creates one.
fn acquire(
    store: &EtcdStore,
    config: &NetworkConfig,
    value: &Lease,
    previous: Option<&SubnetKey>,
) -> anyhow::Result<Held> {
    let ranges = config.alloc_config().map_err(|e| anyhow::anyhow!("the network config in etcd: {e}"))?;
    let ours: Vec<IpAddr> = value.public_ips().collect();
    for _ in 0..ACQUIRE_ATTEMPTS {
        let listing = store.leases().context("listing leases")?;
        let mine = listing.leases.iter().find(|(k, l)| ranges.contains(k) && l.public_ips().any(|a| ours.contains(&a)));
        if let Some((key, _)) = mine {
            if let Some(lease_id) = store.reclaim_lease(key, value, LEASE_TTL)? {
                tracing::info!(subnet = %key, "reclaimed this node's lease");
                return Ok(Held { key: *key, lease: value.clone(), lease_id });
            }
            continue;
        }
        let taken: Vec<SubnetKey> = listing.leases.keys().copied().collect();
        let pick = std::collections::hash_map::RandomState::new().build_hasher().finish();
        let Some(key) = alloc::allocate(&ranges, &taken, previous, pick) else {
            bail!("no free subnet left in the network config ({} leases taken)", taken.len());
        };
        if let Some(lease_id) = store.create_lease(&key, value, LEASE_TTL)? {
            tracing::info!(subnet = %key, "took a new lease");
            return Ok(Held { key, lease: value.clone(), lease_id });
        }
    }
    bail!("other nodes won the race for a subnet {ACQUIRE_ATTEMPTS} times in a row")
}

/// Messages the keeper sends the agent.
pub enum Update {
    /// The whole current view of config and leases.
    View(StaticDatastore),
}

/// Keeps this node's lease alive and the view current until `stop` is set.
pub fn keep(
    store: Arc<EtcdStore>,
    mut view: StaticDatastore,
    mut held: Held,
    mut revision: i64,
    tx: Sender<Update>,
    stop: Arc<AtomicBool>,
) {
    let mut watch = store.watch(revision).ok();
    let mut next_renew = Instant::now() + RENEW_EVERY;
    let mut backoff = Duration::from_millis(100);
    while !stop.load(Relaxed) {
        let mut changed = false;
        if watch.is_none() {
            match store.leases() {
                Ok(listing) => {
                    revision = listing.revision;
                    view.leases = listing.leases;
                    changed = true;
                    watch = store.watch(revision).ok();
                    backoff = Duration::from_millis(100);
                    tracing::info!(revision, leases = view.leases.len(), "leases listed");
                }
                Err(e) => {
                    tracing::debug!(error = %e, "etcd unreachable; forwarding with the last view");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        if let Some(w) = watch.as_mut() {
            match w.next(Duration::from_millis(500)) {
                Ok(events) => {
                    for ev in events {
                        changed = true;
                        match ev {
                            LeaseEvent::Put(k, l) => {
                                view.leases.insert(k, l);
                            }
                            LeaseEvent::Delete(k) => {
                                view.leases.remove(&k);
                            }
                            LeaseEvent::Invalid { key, error } => tracing::warn!(key, error, "lease ignored"),
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "watch lost; listing again");
                    watch = None;
                }
            }
        }
        // Our own lease must be there with our value, else write it back.
        let missing = view.leases.get(&held.key) != Some(&held.lease);
        if missing || Instant::now() >= next_renew {
            let renewed =
                if missing { Err(StoreError::LeaseNotFound { id: held.lease_id }) } else { store.renew(held.lease_id) };
            match renewed {
                Ok(_) => next_renew = Instant::now() + RENEW_EVERY,
                Err(StoreError::Unavailable { .. }) => next_renew = Instant::now() + MAX_BACKOFF,
                Err(_) => match rewrite(&store, &held) {
                    Ok(id) => {
                        held.lease_id = id;
                        view.leases.insert(held.key, held.lease.clone());
                        next_renew = Instant::now() + RENEW_EVERY;
                        changed = true;
                        tracing::info!(subnet = %held.key, "wrote this node's lease back");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not write this node's lease back; retrying");
                        next_renew = Instant::now() + MAX_BACKOFF;
                    }
                },
            }
        }
        if changed && tx.send(Update::View(view.clone())).is_err() {
            return;
        }
    }
}

/// Writes the held lease again under a new etcd lease.
fn rewrite(store: &EtcdStore, held: &Held) -> Result<i64, StoreError> {
    if let Some(id) = store.create_lease(&held.key, &held.lease, LEASE_TTL)? {
        return Ok(id);
    }
    store.reclaim_lease(&held.key, &held.lease, LEASE_TTL)?.ok_or(StoreError::LeaseNotFound { id: held.lease_id })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_macs_are_stable_local_unicast_and_distinct() {
        let a = vtep_mac("192.168.77.1".parse().unwrap());
        assert_eq!(a, vtep_mac("192.168.77.1".parse().unwrap()));
        assert_ne!(a, vtep_mac("192.168.77.2".parse().unwrap()));
        assert_eq!(a[0] & 0x03, 0x02, "locally administered, unicast");
    }

    #[test]
    fn a_located_node_announces_its_external_ip_and_its_node_ip_for_its_location() {
        let yaml = "node-ip: 172.16.0.11\nnode-external-ip: 198.51.100.101\nflannel-external-ip: true\n\
                    flannel-backend: wireguard-native\ncluster-cidr: 10.244.0.0/16\ndatastore-file: /x.json\n";
        let net = NetworkConfig::for_cluster(Some(("10.244.0.0/16".parse().unwrap(), 24)), None, "wireguard");
        let located =
            AgentConfig::from_pairs(&AgentConfig::pairs_from_yaml(&format!("{yaml}node-location: eu-1\n")).unwrap())
                .unwrap();
        let lease = our_lease(&located, &net, Some([9; 32])).unwrap();
        assert_eq!(lease.public_ip, Some("198.51.100.101".parse().unwrap()), "peers elsewhere: the external IP");
        let path = lease.private_path(false).expect("a private path");
        assert_eq!((path.location.as_str(), path.address), ("eu-1", "172.16.0.11".parse().unwrap()));
        assert_eq!(lease.wireguard_data(false).unwrap().public_key, [9; 32]);
        let unlocated = AgentConfig::from_pairs(&AgentConfig::pairs_from_yaml(yaml).unwrap()).unwrap();
        assert_eq!(our_lease(&unlocated, &net, Some([9; 32])).unwrap().private_path(false), None);
    }

    #[test]
    fn a_derived_network_config_keeps_alive_as_k3s_does_for_wireguard_only() {
        let cfg = |backend: &str| {
            let yaml = format!("node-ip: 10.0.0.1\nflannel-backend: {backend}\ndatastore-file: /x.json\n");
            AgentConfig::from_pairs(&AgentConfig::pairs_from_yaml(&yaml).unwrap()).unwrap()
        };
        let wg = network_config(&cfg("wireguard-native"));
        assert_eq!(wg.wireguard_options().unwrap().keepalive, K3S_KEEPALIVE);
        assert_eq!(network_config(&cfg("vxlan")).backend.get("PersistentKeepaliveInterval"), None);
    }

    #[test]
    fn previous_subnet_comes_from_subnet_env() {
        let env = "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.3.1/24\nFLANNEL_IPV6_NETWORK=2001:cafe:42::/56\n\
                   FLANNEL_IPV6_SUBNET=2001:cafe:42:3::1/64\nFLANNEL_MTU=1420\nFLANNEL_IPMASQ=true\n";
        assert_eq!(previous_subnet(env).unwrap().to_string(), "10.42.3.0-24&2001:cafe:42:3::-64");
        assert_eq!(previous_subnet("FLANNEL_MTU=1450\n"), None);
    }
}
