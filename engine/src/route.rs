//! Longest-prefix-match route table over IPv4 and IPv6 pod subnets.
//!
//! One hash map per prefix length present, probed from the longest length
//! down: a cluster has a handful of distinct lengths (usually one), so a
//! lookup is one or two hash probes. The table is built whole by the control
//! plane and never changed in place; workers read it without a lock.
//!
//! Keys are hashed with a multiply-fold of their own, not SipHash: the keys
//! (pod subnets) come from the control plane, never from packets, so there
//! is no table an attacker can fill with collisions, and a lookup costs a
//! few nanoseconds instead of a SipHash round per probe.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;

use ipnet::IpNet;

/// A longest-prefix-match table from pod subnets to values.
#[derive(Debug, Clone)]
pub struct RouteTable<V> {
    v4: Family<V>,
    v6: Family<V>,
}

#[derive(Debug, Clone)]
struct Family<V> {
    /// (prefix length, masked address -> value), longest length first.
    levels: Vec<(u8, Level<V>)>,
}

/// The prefixes of one length: masked address -> value.
type Level<V> = HashMap<u128, V, BuildHasherDefault<PrefixHasher>>;

/// Hashes a masked address: both halves multiplied by odd constants and
/// folded, so that the low bits the map indexes by depend on every bit.
#[derive(Default)]
struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        let m = u128::from(self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }

    fn write_u128(&mut self, v: u128) {
        self.write_u64(v as u64);
        self.write_u64((v >> 64) as u64);
    }
}

impl<V> Default for Family<V> {
    fn default() -> Self {
        Family { levels: Vec::new() }
    }
}

impl<V> Default for RouteTable<V> {
    fn default() -> Self {
        RouteTable { v4: Family::default(), v6: Family::default() }
    }
}

impl<V> RouteTable<V> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts `net -> value`, replacing the value of an equal prefix.
    pub fn insert(&mut self, net: IpNet, value: V) -> Option<V> {
        let (family, key, len) = match net {
            IpNet::V4(n) => (&mut self.v4, mask(u32::from(n.network()) as u128, n.prefix_len(), 32), n.prefix_len()),
            IpNet::V6(n) => (&mut self.v6, mask(u128::from(n.network()), n.prefix_len(), 128), n.prefix_len()),
        };
        let pos = match family.levels.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(i) => i,
            Err(i) => {
                family.levels.insert(i, (len, HashMap::default()));
                i
            }
        };
        family.levels[pos].1.insert(key, value)
    }

    /// The value of the longest prefix containing `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<&V> {
        let (family, key, bits) = match addr {
            IpAddr::V4(a) => (&self.v4, u32::from(a) as u128, 32),
            IpAddr::V6(a) => (&self.v6, u128::from(a), 128),
        };
        family.levels.iter().find_map(|(len, map)| map.get(&mask(key, *len, bits)))
    }

    /// Number of prefixes in the table.
    pub fn len(&self) -> usize {
        self.v4.levels.iter().chain(&self.v6.levels).map(|(_, m)| m.len()).sum()
    }

    /// Whether the table holds no prefix.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `addr` (right-aligned in `bits` bits) with all but the top `len` bits cleared.
fn mask(addr: u128, len: u8, bits: u8) -> u128 {
    if len == 0 {
        return 0;
    }
    let keep = u128::MAX << (bits - len);
    let width = if bits == 128 { u128::MAX } else { (1u128 << bits) - 1 };
    addr & keep & width
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// The slow reference: a list scanned for the longest containing prefix.
    fn slow_lookup(list: &[(IpNet, usize)], addr: IpAddr) -> Option<usize> {
        list.iter().filter(|(n, _)| n.contains(&addr)).max_by_key(|(n, _)| n.prefix_len()).map(|(_, v)| *v)
    }

    #[test]
    fn matches_brute_force_on_random_prefixes() {
        let seed = rand::random::<u64>();
        println!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for round in 0..20 {
            let mut table = RouteTable::new();
            let mut list: Vec<(IpNet, usize)> = Vec::new();
            for v in 0..rng.gen_range(1..200) {
                // Addresses drawn from a narrow range so prefixes nest.
                let net = if rng.gen_bool(0.5) {
                    let a = Ipv4Addr::from(0x0af4_0000u32 | rng.gen_range(0..0xffffu32));
                    IpNet::new(a.into(), rng.gen_range(8..=32)).unwrap().trunc()
                } else {
                    let a = Ipv6Addr::from((0xfd00u128 << 112) | rng.gen_range(0..1u128 << 72));
                    IpNet::new(a.into(), rng.gen_range(40..=128)).unwrap().trunc()
                };
                table.insert(net, v);
                list.retain(|(n, _)| *n != net);
                list.push((net, v));
            }
            assert_eq!(table.len(), list.len(), "round {round}");
            for _ in 0..2000 {
                let addr: IpAddr = if rng.gen_bool(0.5) {
                    Ipv4Addr::from(0x0af4_0000u32 | rng.gen_range(0..0xffffu32)).into()
                } else {
                    Ipv6Addr::from((0xfd00u128 << 112) | rng.gen_range(0..1u128 << 72)).into()
                };
                assert_eq!(table.lookup(addr).copied(), slow_lookup(&list, addr), "round {round} addr {addr}");
            }
        }
    }

    #[test]
    fn default_route_and_host_routes() {
        let mut t = RouteTable::new();
        t.insert("0.0.0.0/0".parse().unwrap(), 0);
        t.insert("10.244.2.0/24".parse().unwrap(), 2);
        t.insert("10.244.2.7/32".parse().unwrap(), 7);
        assert_eq!(t.lookup("10.244.2.7".parse().unwrap()), Some(&7));
        assert_eq!(t.lookup("10.244.2.8".parse().unwrap()), Some(&2));
        assert_eq!(t.lookup("192.0.2.1".parse().unwrap()), Some(&0));
        assert_eq!(t.lookup("::1".parse().unwrap()), None);
    }
}
