//! Subnet lease allocation with Flannel's semantics, as pure code.
//!
//! Flannel's etcd subnet manager gives each node one subnet of the pod
//! network per address family: `SubnetLen` bits out of `Network` for IPv4,
//! `IPv6SubnetLen` bits out of `IPv6Network` for IPv6, between `SubnetMin`
//! and `SubnetMax` (`IPv6SubnetMin`, `IPv6SubnetMax`). A dual-stack lease
//! pairs one subnet of each family under one key. This module checks such a
//! configuration as Flannel's `CheckNetworkConfig` does, fills in the same
//! defaults, and picks a subnet as Flannel's `allocateSubnet` does:
//!
//! ```text
//!  previous subnet in range, of this config's families, and free? ── yes ──► keep it
//!        │ no
//!        ▼
//!  for each family: the first CANDIDATES free subnets from SubnetMin upward
//!  (taken leases are skipped as whole index ranges, never address by address)
//!        │
//!        ▼
//!  one of them, chosen with the caller's `pick`; None if a family has none
//! ```
//!
//! It does no I/O, reads no clock and draws no random numbers: the caller
//! lists the leases it saw, passes a random `u64`, and writes the lease
//! (retrying on a lost race, as Flannel does). It refuses every config
//! Flannel refuses, and also `SubnetMin` above `SubnetMax`, which Flannel
//! accepts and then never allocates from.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::error::ConfigError;
use crate::subnet::SubnetKey;

/// How many free subnets per family a new lease is drawn from: Flannel's
/// `allocateSubnet` collects at most 100 free subnets from `SubnetMin`
/// upward and picks one at random. Keeping the number keeps our picks
/// spread like Flannel's when both allocate in one cluster, so nodes racing
/// for a lease rarely pick the same subnet.
pub const CANDIDATES: usize = 100;

/// A pod network configuration Flannel would refuse, or that weft refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Neither an IPv4 nor an IPv6 pod network is configured.
    #[error("no pod network: set Network, IPv6Network or both")]
    NoNetwork,
    /// The network is `0.0.0.0/0` or `::/0`, which Flannel takes for unset.
    #[error("`{key}` = `{value}` refused: a pod network such as 10.244.0.0/16 or fd00:10:244::/56")]
    EmptyNetwork {
        /// `Network` or `IPv6Network`.
        key: &'static str,
        /// The network given.
        value: String,
    },
    /// The network cannot hold four subnets of the smallest length.
    #[error("`{key}` = `{value}` refused: too small, the prefix must be at most /{max_prefix}")]
    NetworkTooSmall {
        /// `Network` or `IPv6Network`.
        key: &'static str,
        /// The network given.
        value: String,
        /// The longest prefix accepted (28 for IPv4, 124 for IPv6).
        max_prefix: u8,
    },
    /// The subnet length leaves fewer than four subnets in the network, or
    /// fewer than four addresses in a subnet.
    #[error("`{key}` = `{value}` refused: with network {network} it must be from {min} to {max}")]
    SubnetLen {
        /// `SubnetLen` or `IPv6SubnetLen`.
        key: &'static str,
        /// The length given.
        value: u8,
        /// The network it splits.
        network: String,
        /// The shortest length accepted (network prefix + 2).
        min: u8,
        /// The longest length accepted (30 for IPv4, 126 for IPv6).
        max: u8,
    },
    /// `SubnetMin` or `SubnetMax` lies outside the network.
    #[error("`{key}` = `{value}` refused: an address inside {network}")]
    OutsideNetwork {
        /// `SubnetMin`, `SubnetMax`, `IPv6SubnetMin` or `IPv6SubnetMax`.
        key: &'static str,
        /// The address given.
        value: String,
        /// The network it must lie in.
        network: String,
    },
    /// `SubnetMin` or `SubnetMax` is not the first address of a subnet.
    #[error("`{key}` = `{value}` refused: an address on a /{subnet_len} boundary")]
    Unaligned {
        /// `SubnetMin`, `SubnetMax`, `IPv6SubnetMin` or `IPv6SubnetMax`.
        key: &'static str,
        /// The address given.
        value: String,
        /// The subnet length it must be aligned to.
        subnet_len: u8,
    },
    /// `SubnetMin` is above `SubnetMax`: no subnet could be allocated.
    #[error("`{key}` = `{value}` refused: at most {max_key} = {max}")]
    MinAboveMax {
        /// `SubnetMin` or `IPv6SubnetMin`.
        key: &'static str,
        /// The minimum in effect.
        value: String,
        /// `SubnetMax` or `IPv6SubnetMax`.
        max_key: &'static str,
        /// The maximum in effect.
        max: String,
    },
}

impl AllocError {
    /// The config key refused (`Network`, `SubnetLen`, ...); `Network` when
    /// no network is set at all.
    pub fn key(&self) -> &'static str {
        match self {
            AllocError::NoNetwork => "Network",
            AllocError::EmptyNetwork { key, .. }
            | AllocError::NetworkTooSmall { key, .. }
            | AllocError::SubnetLen { key, .. }
            | AllocError::OutsideNetwork { key, .. }
            | AllocError::Unaligned { key, .. }
            | AllocError::MinAboveMax { key, .. } => key,
        }
    }

    /// The value refused, as written in the config; empty for
    /// [`AllocError::NoNetwork`].
    pub fn value(&self) -> String {
        match self {
            AllocError::NoNetwork => String::new(),
            AllocError::SubnetLen { value, .. } => value.to_string(),
            AllocError::EmptyNetwork { value, .. }
            | AllocError::NetworkTooSmall { value, .. }
            | AllocError::OutsideNetwork { value, .. }
            | AllocError::Unaligned { value, .. }
            | AllocError::MinAboveMax { value, .. } => value.clone(),
        }
    }
}

impl From<AllocError> for ConfigError {
    fn from(e: AllocError) -> Self {
        ConfigError::new(e.key(), e.value(), e)
    }
}

/// The IPv4 subnets a lease may hold: `SubnetLen`-long subnets of `Network`
/// from `SubnetMin` to `SubnetMax`, checked and with Flannel's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V4Range {
    network: Ipv4Net,
    span: Span,
}

impl V4Range {
    /// Checks `Network`, `SubnetLen`, `SubnetMin` and `SubnetMax` as Flannel
    /// does and fills in its defaults. `network` may carry host bits (Flannel
    /// drops them); a length of 0 and an address of `0.0.0.0` count as
    /// unset, as in Flannel.
    pub fn new(
        network: Ipv4Net,
        subnet_len: Option<u8>,
        min: Option<Ipv4Addr>,
        max: Option<Ipv4Addr>,
    ) -> Result<Self, AllocError> {
        let network = network.trunc();
        let span = Span::check(
            &V4_RULES,
            u32::from(network.network()).into(),
            network.prefix_len(),
            subnet_len,
            min.map(|a| u32::from(a).into()),
            max.map(|a| u32::from(a).into()),
        )?;
        Ok(V4Range { network, span })
    }

    /// `Network`, without host bits.
    pub fn network(&self) -> Ipv4Net {
        self.network
    }

    /// `SubnetLen` in effect.
    pub fn subnet_len(&self) -> u8 {
        self.span.subnet_len
    }

    /// `SubnetMin` in effect: the address of the lowest subnet handed out.
    pub fn min(&self) -> Ipv4Addr {
        v4_addr(self.span.min)
    }

    /// `SubnetMax` in effect: the address of the highest subnet handed out.
    pub fn max(&self) -> Ipv4Addr {
        v4_addr(self.span.max)
    }

    /// How many subnets lie from `SubnetMin` to `SubnetMax`.
    pub fn capacity(&self) -> u128 {
        self.span.count()
    }

    /// Whether `subnet` is one this range hands out: `SubnetLen` long, no
    /// host bits, from `SubnetMin` to `SubnetMax`.
    pub fn contains(&self, subnet: &Ipv4Net) -> bool {
        subnet.addr() == subnet.network() && self.span.holds(u32::from(subnet.addr()).into(), subnet.prefix_len())
    }

    /// The subnet at `index` from `SubnetMin`; `index` is below capacity.
    fn subnet(&self, index: u128) -> Ipv4Net {
        Ipv4Net::new(v4_addr(self.span.address(index)), self.span.subnet_len)
            .expect("subnet_len was checked to be at most 30")
    }
}

/// The IPv6 subnets a lease may hold: `IPv6SubnetLen`-long subnets of
/// `IPv6Network` from `IPv6SubnetMin` to `IPv6SubnetMax`, checked and with
/// Flannel's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V6Range {
    network: Ipv6Net,
    span: Span,
}

impl V6Range {
    /// Checks `IPv6Network`, `IPv6SubnetLen`, `IPv6SubnetMin` and
    /// `IPv6SubnetMax` as Flannel does and fills in its defaults. `network`
    /// may carry host bits (Flannel drops them); a length of 0 and an
    /// address of `::` count as unset, as in Flannel.
    pub fn new(
        network: Ipv6Net,
        subnet_len: Option<u8>,
        min: Option<Ipv6Addr>,
        max: Option<Ipv6Addr>,
    ) -> Result<Self, AllocError> {
        let network = network.trunc();
        let span = Span::check(
            &V6_RULES,
            network.network().into(),
            network.prefix_len(),
            subnet_len,
            min.map(u128::from),
            max.map(u128::from),
        )?;
        Ok(V6Range { network, span })
    }

    /// `IPv6Network`, without host bits.
    pub fn network(&self) -> Ipv6Net {
        self.network
    }

    /// `IPv6SubnetLen` in effect.
    pub fn subnet_len(&self) -> u8 {
        self.span.subnet_len
    }

    /// `IPv6SubnetMin` in effect: the address of the lowest subnet handed
    /// out.
    pub fn min(&self) -> Ipv6Addr {
        self.span.min.into()
    }

    /// `IPv6SubnetMax` in effect: the address of the highest subnet handed
    /// out.
    pub fn max(&self) -> Ipv6Addr {
        self.span.max.into()
    }

    /// How many subnets lie from `IPv6SubnetMin` to `IPv6SubnetMax`.
    pub fn capacity(&self) -> u128 {
        self.span.count()
    }

    /// Whether `subnet` is one this range hands out: `IPv6SubnetLen` long,
    /// no host bits, from `IPv6SubnetMin` to `IPv6SubnetMax`.
    pub fn contains(&self, subnet: &Ipv6Net) -> bool {
        subnet.addr() == subnet.network() && self.span.holds(subnet.addr().into(), subnet.prefix_len())
    }

    /// The subnet at `index` from `IPv6SubnetMin`; `index` is below
    /// capacity.
    fn subnet(&self, index: u128) -> Ipv6Net {
        Ipv6Net::new(self.span.address(index).into(), self.span.subnet_len)
            .expect("subnet_len was checked to be at most 126")
    }
}

/// A checked allocation config: the families a lease key holds. Both set
/// means dual-stack (every key pairs an IPv4 and an IPv6 subnet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocConfig {
    /// The IPv4 range, if IPv4 is on.
    pub v4: Option<V4Range>,
    /// The IPv6 range, if IPv6 is on.
    pub v6: Option<V6Range>,
}

impl AllocConfig {
    /// Checks a config: `v4` is (`Network`, `SubnetLen`, `SubnetMin`,
    /// `SubnetMax`), `v6` is (`IPv6Network`, `IPv6SubnetLen`,
    /// `IPv6SubnetMin`, `IPv6SubnetMax`); at least one must be given.
    #[allow(clippy::type_complexity)]
    pub fn new(
        v4: Option<(Ipv4Net, Option<u8>, Option<Ipv4Addr>, Option<Ipv4Addr>)>,
        v6: Option<(Ipv6Net, Option<u8>, Option<Ipv6Addr>, Option<Ipv6Addr>)>,
    ) -> Result<AllocConfig, AllocError> {
        if v4.is_none() && v6.is_none() {
            return Err(AllocError::NoNetwork);
        }
        Ok(AllocConfig {
            v4: v4.map(|(n, len, min, max)| V4Range::new(n, len, min, max)).transpose()?,
            v6: v6.map(|(n, len, min, max)| V6Range::new(n, len, min, max)).transpose()?,
        })
    }

    /// Whether `key` is a lease this config could hand out: it has exactly
    /// the configured families, each subnet in range and aligned (Flannel's
    /// `isSubnetConfigCompat` and `isIPv6SubnetConfigCompat`).
    pub fn contains(&self, key: &SubnetKey) -> bool {
        let v4 = match (&self.v4, &key.v4) {
            (Some(r), Some(n)) => r.contains(n),
            (None, None) => true,
            _ => false,
        };
        let v6 = match (&self.v6, &key.v6) {
            (Some(r), Some(n)) => r.contains(n),
            (None, None) => true,
            _ => false,
        };
        v4 && v6 && (self.v4.is_some() || self.v6.is_some())
    }

    /// How many leases can exist at once: for dual-stack, the smaller of the
    /// two families' subnet counts.
    pub fn capacity(&self) -> u128 {
        match (&self.v4, &self.v6) {
            (Some(a), Some(b)) => a.capacity().min(b.capacity()),
            (Some(a), None) => a.capacity(),
            (None, Some(b)) => b.capacity(),
            (None, None) => 0,
        }
    }
}

/// Picks the subnet key for a new lease, or `None` when a configured family
/// has no free subnet left.
///
/// A subnet is free when no key in `taken` has a subnet of that family
/// overlapping it (Flannel's `Overlaps`, so a stray lease of another length
/// blocks every subnet it covers). `previous`, this node's subnet before a
/// restart, is kept when [`AllocConfig::contains`] it and both its subnets
/// are free; the caller leaves this node's own live lease out of `taken`
/// (Flannel reuses a lease carrying the node's public IP before it gets
/// here). Otherwise each family's subnet is one of its first
/// [`CANDIDATES`] free subnets from the minimum upward, chosen with `pick`,
/// a random number from the caller; the families are chosen independently.
#[must_use]
pub fn allocate(cfg: &AllocConfig, taken: &[SubnetKey], previous: Option<&SubnetKey>, pick: u64) -> Option<SubnetKey> {
    if cfg.v4.is_none() && cfg.v6.is_none() {
        return None;
    }
    if let Some(prev) = previous {
        if cfg.contains(prev) && is_free(prev, taken) {
            return Some(*prev);
        }
    }
    let mut pick = pick;
    let v4 = match &cfg.v4 {
        Some(r) => {
            let blocked = taken
                .iter()
                .filter_map(|k| k.v4)
                .map(|n| (u32::from(n.network()).into(), u32::from(n.broadcast()).into()));
            let free = r.span.first_free(blocked, CANDIDATES);
            Some(r.subnet(choose(&free, &mut pick)?))
        }
        None => None,
    };
    let v6 = match &cfg.v6 {
        Some(r) => {
            let blocked = taken.iter().filter_map(|k| k.v6).map(|n| (n.network().into(), n.broadcast().into()));
            let free = r.span.first_free(blocked, CANDIDATES);
            Some(r.subnet(choose(&free, &mut pick)?))
        }
        None => None,
    };
    Some(SubnetKey { v4, v6 })
}

/// Flannel's rules for one family, with the names of its config keys.
struct FamilyRules {
    /// Address width: 32 or 128.
    bits: u8,
    /// `SubnetLen` when the network is large enough for it.
    default_len: u8,
    network_key: &'static str,
    len_key: &'static str,
    min_key: &'static str,
    max_key: &'static str,
    /// Formats an address of this family held in a `u128`.
    show: fn(u128) -> String,
}

const V4_RULES: FamilyRules = FamilyRules {
    bits: 32,
    default_len: 24,
    network_key: "Network",
    len_key: "SubnetLen",
    min_key: "SubnetMin",
    max_key: "SubnetMax",
    show: |a| v4_addr(a).to_string(),
};

const V6_RULES: FamilyRules = FamilyRules {
    bits: 128,
    default_len: 64,
    network_key: "IPv6Network",
    len_key: "IPv6SubnetLen",
    min_key: "IPv6SubnetMin",
    max_key: "IPv6SubnetMax",
    show: |a| Ipv6Addr::from(a).to_string(),
};

/// The subnets of one family, as addresses in a `u128`: subnet `i` starts at
/// `min + i * 2^(bits - subnet_len)`, the last one at `max`. Checked
/// invariants: `min <= max`, both aligned, `subnet_len <= bits - 2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    min: u128,
    max: u128,
    subnet_len: u8,
    /// `bits - subnet_len`: log2 of a subnet's size.
    shift: u32,
}

impl Span {
    /// Flannel's `CheckNetworkConfig` for one family, plus `min <= max`.
    /// `net` has no host bits.
    fn check(
        rules: &FamilyRules,
        net: u128,
        prefix: u8,
        subnet_len: Option<u8>,
        min: Option<u128>,
        max: Option<u128>,
    ) -> Result<Span, AllocError> {
        let show = rules.show;
        let network = format!("{}/{prefix}", show(net));
        if net == 0 && prefix == 0 {
            return Err(AllocError::EmptyNetwork { key: rules.network_key, value: network });
        }
        // Four subnets of at least four addresses each: the first subnet is
        // never used, and a subnet needs room for its network address, the
        // bridge and a pod.
        let max_prefix = rules.bits - 4;
        if prefix > max_prefix {
            return Err(AllocError::NetworkTooSmall { key: rules.network_key, value: network, max_prefix });
        }
        let subnet_len = match subnet_len.filter(|l| *l != 0) {
            Some(l) if l < prefix + 2 || l > rules.bits - 2 => {
                return Err(AllocError::SubnetLen {
                    key: rules.len_key,
                    value: l,
                    network,
                    min: prefix + 2,
                    max: rules.bits - 2,
                });
            }
            Some(l) => l,
            None if prefix + 2 <= rules.default_len => rules.default_len,
            None => prefix + 2,
        };
        let shift = u32::from(rules.bits - subnet_len);
        let host_mask = (1u128 << shift) - 1;
        let net_last = net | (u128::MAX >> (128 - u32::from(rules.bits)) >> prefix);
        let within = |key: &'static str, a: u128| {
            if a < net || a > net_last {
                return Err(AllocError::OutsideNetwork { key, value: show(a), network: network.clone() });
            }
            Ok(a)
        };
        // Flannel skips the network's first subnet, whose first address is
        // the network address itself.
        let min = match min.filter(|a| *a != 0) {
            Some(a) => within(rules.min_key, a)?,
            None => net + host_mask + 1,
        };
        let max = match max.filter(|a| *a != 0) {
            Some(a) => within(rules.max_key, a)?,
            None => net_last - host_mask,
        };
        for (key, a) in [(rules.min_key, min), (rules.max_key, max)] {
            if a & host_mask != 0 {
                return Err(AllocError::Unaligned { key, value: show(a), subnet_len });
            }
        }
        if min > max {
            return Err(AllocError::MinAboveMax {
                key: rules.min_key,
                value: show(min),
                max_key: rules.max_key,
                max: show(max),
            });
        }
        Ok(Span { min, max, subnet_len, shift })
    }

    /// Number of subnets.
    fn count(&self) -> u128 {
        ((self.max - self.min) >> self.shift) + 1
    }

    /// The first address of subnet `index`.
    fn address(&self, index: u128) -> u128 {
        self.min + (index << self.shift)
    }

    /// Whether an aligned subnet at `addr` of length `len` is one of ours.
    fn holds(&self, addr: u128, len: u8) -> bool {
        len == self.subnet_len && addr >= self.min && addr <= self.max
    }

    /// The indices of the subnets overlapping the addresses `lo..=hi`.
    fn overlapping(&self, lo: u128, hi: u128) -> Option<(u128, u128)> {
        // Last address of the last subnet; `max` is aligned, so no overflow.
        let end = self.max + ((1u128 << self.shift) - 1);
        if hi < self.min || lo > end {
            return None;
        }
        Some((lo.saturating_sub(self.min) >> self.shift, (hi.min(end) - self.min) >> self.shift))
    }

    /// The indices of the first `limit` subnets not overlapping any of the
    /// `blocked` address ranges. Costs O(b log b + limit) for b ranges,
    /// whatever the size of the network.
    fn first_free(&self, blocked: impl Iterator<Item = (u128, u128)>, limit: usize) -> Vec<u128> {
        let mut blocked: Vec<(u128, u128)> = blocked.filter_map(|(lo, hi)| self.overlapping(lo, hi)).collect();
        blocked.sort_unstable();
        let last = self.count() - 1;
        let mut free = Vec::new();
        let mut next = 0u128; // lowest index not yet known to be blocked
        for (a, b) in blocked.into_iter().chain([(last + 1, last + 1)]) {
            while next < a && next <= last {
                if free.len() == limit {
                    return free;
                }
                free.push(next);
                next += 1;
            }
            next = next.max(b.saturating_add(1));
        }
        free
    }
}

/// Takes one of `free` with `pick`, leaving in `pick` the randomness not
/// used, for the next family; `None` if `free` is empty.
fn choose(free: &[u128], pick: &mut u64) -> Option<u128> {
    let n = free.len() as u64;
    if n == 0 {
        return None;
    }
    let i = *pick % n;
    *pick /= n;
    Some(free[i as usize])
}

/// Whether no key in `taken` overlaps a subnet of `key`.
fn is_free(key: &SubnetKey, taken: &[SubnetKey]) -> bool {
    taken.iter().all(|t| {
        let v4 = matches!((key.v4, t.v4), (Some(a), Some(b)) if a.contains(&b) || b.contains(&a));
        let v6 = matches!((key.v6, t.v6), (Some(a), Some(b)) if a.contains(&b) || b.contains(&a));
        !v4 && !v6
    })
}

/// An IPv4 address held in a `u128` by this module (always below 2^32).
fn v4_addr(a: u128) -> Ipv4Addr {
    Ipv4Addr::from(a as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn v4(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn v6(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    fn key(s: &str) -> SubnetKey {
        SubnetKey::parse(s).unwrap()
    }

    fn cfg4(net: &str, len: Option<u8>) -> Result<AllocConfig, AllocError> {
        AllocConfig::new(Some((v4(net), len, None, None)), None)
    }

    fn cfg6(net: &str, len: Option<u8>) -> Result<AllocConfig, AllocError> {
        AllocConfig::new(None, Some((v6(net), len, None, None)))
    }

    /// Allocates until `None`, checking each key; returns them in order.
    fn exhaust(cfg: &AllocConfig, seed: u64) -> Vec<SubnetKey> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut taken = Vec::new();
        while let Some(k) = allocate(cfg, &taken, None, rng.gen()) {
            assert!(cfg.contains(&k), "{k} out of range");
            assert!(!taken.contains(&k), "{k} handed out twice");
            taken.push(k);
            assert!(taken.len() as u128 <= cfg.capacity(), "beyond capacity");
        }
        taken
    }

    #[test]
    fn flannel_defaults() {
        let c = cfg4("10.244.0.0/16", None).unwrap();
        let r = c.v4.unwrap();
        assert_eq!(r.subnet_len(), 24);
        assert_eq!(r.min(), Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(r.max(), Ipv4Addr::new(10, 244, 255, 0));
        assert_eq!(c.capacity(), 255);
        assert!(!c.contains(&key("10.244.0.0-24")));
        assert!(c.contains(&key("10.244.1.0-24")));
        assert!(c.contains(&key("10.244.255.0-24")));
        let got = exhaust(&c, 1);
        assert_eq!(got.len(), 255);
        let mut thirds: Vec<u8> = got.iter().map(|k| k.v4.unwrap().addr().octets()[2]).collect();
        thirds.sort_unstable();
        assert_eq!(thirds, (1..=255).collect::<Vec<u8>>());

        // Host bits in Network are dropped, as Go's ParseCIDR does for Flannel.
        assert_eq!(cfg4("10.244.7.9/16", None).unwrap(), c);

        // Smaller networks: SubnetLen is network prefix + 2 past /22.
        let lens = [(8, 24), (22, 24), (23, 25), (26, 28), (28, 30)];
        for (prefix, len) in lens {
            let c = cfg4(&format!("10.0.0.0/{prefix}"), None).unwrap();
            assert_eq!(c.v4.unwrap().subnet_len(), len, "/{prefix}");
        }

        let c = cfg6("fd00:10:244::/56", None).unwrap();
        let r = c.v6.unwrap();
        assert_eq!(r.subnet_len(), 64);
        assert_eq!(r.min(), "fd00:10:244:1::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(r.max(), "fd00:10:244:ff::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(c.capacity(), 255);
        for (prefix, len) in [(48, 64), (62, 64), (63, 65), (100, 102), (124, 126)] {
            let c = cfg6(&format!("fd00::/{prefix}"), None).unwrap();
            assert_eq!(c.v6.unwrap().subnet_len(), len, "/{prefix}");
        }

        // Zero values mean unset, as in Flannel's config struct.
        let zero = AllocConfig::new(Some((v4("10.244.0.0/16"), Some(0), Some(Ipv4Addr::UNSPECIFIED), None)), None);
        assert_eq!(zero.unwrap(), cfg4("10.244.0.0/16", None).unwrap());
    }

    #[test]
    fn subnet_min_and_max_are_honoured() {
        let c = AllocConfig::new(
            Some((
                v4("10.244.0.0/16"),
                Some(24),
                Some(Ipv4Addr::new(10, 244, 10, 0)),
                Some(Ipv4Addr::new(10, 244, 19, 0)),
            )),
            None,
        )
        .unwrap();
        assert_eq!(c.capacity(), 10);
        let got = exhaust(&c, 2);
        let mut thirds: Vec<u8> = got.iter().map(|k| k.v4.unwrap().addr().octets()[2]).collect();
        thirds.sort_unstable();
        assert_eq!(thirds, (10..=19).collect::<Vec<u8>>());
        assert!(!c.contains(&key("10.244.9.0-24")));
        assert!(!c.contains(&key("10.244.20.0-24")));

        // SubnetMin may be the network's first subnet when set explicitly.
        let c = AllocConfig::new(Some((v4("10.0.0.0/28"), Some(30), Some(Ipv4Addr::new(10, 0, 0, 0)), None)), None);
        assert_eq!(c.unwrap().capacity(), 4);
        let c = AllocConfig::new(
            None,
            Some((
                v6("fd00::/48"),
                None,
                Some("fd00:0:0:100::".parse().unwrap()),
                Some("fd00:0:0:1ff::".parse().unwrap()),
            )),
        )
        .unwrap();
        assert_eq!(c.capacity(), 256);
        assert!(c.contains(&key("fd00:0:0:1a0::-64")));
        assert!(!c.contains(&key("fd00:0:0:200::-64")));
        assert_eq!(exhaust(&c, 3).len(), 256);
    }

    #[test]
    fn bad_configs_are_refused() {
        let ip4 = |s: &str| Some(s.parse::<Ipv4Addr>().unwrap());
        let ip6 = |s: &str| Some(s.parse::<Ipv6Addr>().unwrap());
        let bad4 = [
            ("0.0.0.0/0", None, None, None, "Network"),
            ("10.0.0.0/29", None, None, None, "Network"),
            ("10.0.0.0/29", Some(30), None, None, "Network"),
            ("10.244.0.0/16", Some(31), None, None, "SubnetLen"),
            ("10.244.0.0/16", Some(17), None, None, "SubnetLen"),
            ("10.244.0.0/16", Some(16), None, None, "SubnetLen"),
            ("10.244.0.0/16", Some(33), None, None, "SubnetLen"),
            ("10.244.0.0/16", None, ip4("10.245.1.0"), None, "SubnetMin"),
            ("10.244.0.0/16", None, None, ip4("10.243.255.0"), "SubnetMax"),
            ("10.244.0.0/16", None, ip4("10.244.1.128"), None, "SubnetMin"),
            ("10.244.0.0/16", None, None, ip4("10.244.9.1"), "SubnetMax"),
            ("10.244.0.0/16", None, ip4("10.244.9.0"), ip4("10.244.8.0"), "SubnetMin"),
        ];
        for (net, len, min, max, key) in bad4 {
            let e = AllocConfig::new(Some((v4(net), len, min, max)), None).unwrap_err();
            assert_eq!(e.key(), key, "{net} {len:?} {min:?} {max:?}: {e}");
            let text = e.to_string();
            assert!(text.contains(key) && text.contains(&e.value()), "{text}");
            let c = ConfigError::from(e.clone());
            assert_eq!((c.key.as_str(), c.value), (key, e.value()));
        }
        let bad6 = [
            ("::/0", None, None, None, "IPv6Network"),
            ("fd00::/125", None, None, None, "IPv6Network"),
            ("fd00::/48", Some(127), None, None, "IPv6SubnetLen"),
            ("fd00::/48", Some(49), None, None, "IPv6SubnetLen"),
            ("fd00::/48", None, ip6("fd01::"), None, "IPv6SubnetMin"),
            ("fd00::/48", None, None, ip6("fd00:0:1::"), "IPv6SubnetMax"),
            ("fd00::/48", None, ip6("fd00:0:0:1::1"), None, "IPv6SubnetMin"),
            ("fd00::/48", None, ip6("fd00:0:0:2::"), ip6("fd00:0:0:1::"), "IPv6SubnetMin"),
        ];
        for (net, len, min, max, key) in bad6 {
            let e = AllocConfig::new(None, Some((v6(net), len, min, max))).unwrap_err();
            assert_eq!(e.key(), key, "{net} {len:?} {min:?} {max:?}: {e}");
        }
        assert_eq!(AllocConfig::new(None, None), Err(AllocError::NoNetwork));
        // A bad family refuses the whole dual-stack config.
        let e = AllocConfig::new(
            Some((v4("10.244.0.0/16"), None, None, None)),
            Some((v6("fd00::/48"), Some(40), None, None)),
        );
        assert!(matches!(e, Err(AllocError::SubnetLen { key: "IPv6SubnetLen", value: 40, min: 50, max: 126, .. })));
    }

    #[test]
    fn previous_subnet_is_kept() {
        let c = cfg4("10.244.0.0/16", None).unwrap();
        let prev = key("10.244.77.0-24");
        let taken = [key("10.244.1.0-24"), key("10.244.2.0-24")];
        for pick in [0, 1, u64::MAX] {
            assert_eq!(allocate(&c, &taken, Some(&prev), pick), Some(prev));
        }
        // Not kept when taken, out of range, misaligned or of other families.
        for bad in ["10.244.0.0-24", "10.244.1.0-24", "10.244.77.0-25", "10.245.0.0-24", "fd00::-64"] {
            let k = allocate(&c, &taken, Some(&key(bad)), 5).unwrap();
            assert_ne!(k, key(bad));
            assert!(c.contains(&k) && !taken.contains(&k));
        }
        let shifted = SubnetKey { v4: Some(v4("10.244.77.5/24")), v6: None };
        assert_ne!(allocate(&c, &[], Some(&shifted), 0), Some(shifted));
        // A covering lease of another length takes it too.
        let over = [key("10.244.64.0-18")];
        assert_ne!(allocate(&c, &over, Some(&prev), 0), Some(prev));
        // A single-stack previous lease is dropped once the cluster is dual-stack.
        let d =
            AllocConfig::new(Some((v4("10.244.0.0/16"), None, None, None)), Some((v6("fd00::/56"), None, None, None)))
                .unwrap();
        let k = allocate(&d, &[], Some(&prev), 0).unwrap();
        assert!(k.v4.is_some() && k.v6.is_some());
        let dual_prev = key("10.244.77.0-24&fd00:0:0:9::-64");
        assert_eq!(allocate(&d, &[], Some(&dual_prev), 0), Some(dual_prev));
        // Either half taken is enough to refuse it.
        let half = [key("10.244.3.0-24&fd00:0:0:9::-64")];
        assert_ne!(allocate(&d, &half, Some(&dual_prev), 0), Some(dual_prev));
    }

    #[test]
    fn picks_among_the_first_free_candidates() {
        let c = cfg4("10.0.0.0/8", None).unwrap();
        assert_eq!(allocate(&c, &[], None, 0), Some(key("10.0.1.0-24")));
        assert_eq!(allocate(&c, &[], None, 99), Some(key("10.0.100.0-24")));
        assert_eq!(allocate(&c, &[], None, 100), Some(key("10.0.1.0-24")));
        let taken = [key("10.0.1.0-24"), key("10.0.2.0-24")];
        assert_eq!(allocate(&c, &taken, None, 0), Some(key("10.0.3.0-24")));
        // A wide lease blocks every subnet under it.
        let taken = [key("10.0.0.0-16")];
        assert_eq!(allocate(&c, &taken, None, 0), Some(key("10.1.0.0-24")));
        // Leases outside the range do not matter.
        let taken = [key("192.168.0.0-16"), key("10.0.0.0-24")];
        assert_eq!(allocate(&c, &taken, None, 0), Some(key("10.0.1.0-24")));
    }

    #[test]
    fn huge_ipv6_ranges_cost_nothing() {
        let c = cfg6("fd00::/16", None).unwrap();
        assert_eq!(c.capacity(), (1u128 << 48) - 1);
        let taken = [key("fd00::-20"), key("fd00:1000::-64")];
        assert_eq!(allocate(&c, &taken, None, 0), Some(key("fd00:1000:0:1::-64")));
        assert_eq!(allocate(&c, &[key("fd00::-16")], None, 7), None);
        assert_eq!(allocate(&c, &[key("fc00::-7")], None, 7), None);

        let c = cfg6("8000::/1", Some(126)).unwrap();
        assert_eq!(c.capacity(), (1u128 << 125) - 1);
        assert_eq!(c.v6.unwrap().max(), "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffc".parse::<Ipv6Addr>().unwrap());
        let k = allocate(&c, &[key("8000::-2")], None, 0).unwrap();
        assert_eq!(k, key("c000::-126"));
        let top = [key("8000::-2"), key("c000::-3"), key("e000::-4")];
        let k = allocate(&c, &top, None, 0).unwrap();
        assert_eq!(k, key("f000::-126"));
    }

    #[test]
    fn small_networks_exhaust_at_capacity() {
        let c = cfg4("10.1.2.0/28", Some(30)).unwrap();
        assert_eq!(c.capacity(), 3);
        for seed in 0..20 {
            let got = exhaust(&c, seed);
            assert_eq!(got.len(), 3);
            assert!(!got.contains(&key("10.1.2.0-30")));
        }
        let c = cfg6("fd00::/124", None).unwrap();
        assert_eq!(c.v6.unwrap().subnet_len(), 126);
        assert_eq!(exhaust(&c, 4).len(), 3);
    }

    #[test]
    fn dual_stack_pairs() {
        let c = AllocConfig::new(
            Some((v4("10.1.2.0/28"), Some(30), None, None)),
            Some((v6("fd00::/120"), Some(122), None, None)),
        )
        .unwrap();
        // Three IPv4 subnets, three IPv6 subnets: three leases.
        assert_eq!(c.capacity(), 3);
        for seed in 0..20 {
            let got = exhaust(&c, seed);
            assert_eq!(got.len(), 3);
            for k in &got {
                assert!(k.v4.is_some() && k.v6.is_some(), "{k}");
            }
        }
        // A single-stack key blocks its family's half only.
        let taken = [key("10.1.2.4-30"), key("10.1.2.8-30")];
        let k = allocate(&c, &taken, None, 0).unwrap();
        assert_eq!(k.v4, Some(v4("10.1.2.12/30")));
        let taken = [key("fd00::40-122"), key("fd00::80-122"), key("fd00::c0-122")];
        assert_eq!(allocate(&c, &taken, None, 0), None);
        assert!(!c.contains(&key("10.1.2.4-30")));
        assert!(!c.contains(&key("fd00::40-122")));
        assert!(c.contains(&key("10.1.2.4-30&fd00::40-122")));
        // The two halves are chosen independently.
        let c = AllocConfig::new(Some((v4("10.0.0.0/8"), None, None, None)), Some((v6("fd00::/48"), None, None, None)))
            .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let pairs: std::collections::BTreeSet<_> = (0..200)
            .map(|_| allocate(&c, &[], None, rng.gen()).unwrap())
            .map(|k| (k.v4.unwrap().addr().octets()[2], k.v6.unwrap().addr().segments()[3]))
            .collect();
        assert!(pairs.iter().any(|(a, b)| u16::from(*a) != *b), "{pairs:?}");
    }

    /// A random subnet near `net` (`bits` wide, address in a u128), of a
    /// length from somewhat shorter than `subnet_len` to the full width.
    fn random_near(rng: &mut impl Rng, net: u128, prefix: u8, subnet_len: u8, bits: u8) -> (u128, u8) {
        let len = rng.gen_range(prefix.saturating_sub(1).max(1)..=bits.min(subnet_len + 2));
        let span = 1u128 << (bits - prefix + 1);
        let mask = u128::MAX >> (128 - u32::from(bits));
        let a = net.wrapping_add(rng.gen_range(0..span)).wrapping_sub(span / 4) & mask;
        (a & !mask.checked_shr(u32::from(len)).unwrap_or(0), len)
    }

    /// Every subnet of `r` from min to max, the slow way.
    fn all_subnets(min: u128, max: u128, len: u8, bits: u8) -> Vec<u128> {
        let step = 1u128 << (bits - len);
        let mut out = Vec::new();
        let mut a = min;
        while a <= max {
            out.push(a);
            match a.checked_add(step) {
                Some(next) => a = next,
                None => break,
            }
        }
        out
    }

    fn free_of<N: Copy>(all: &[N], taken: &[N], overlaps: impl Fn(&N, &N) -> bool) -> Vec<N> {
        all.iter().copied().filter(|s| !taken.iter().any(|t| overlaps(s, t))).collect()
    }

    #[test]
    fn model_matches_brute_force() {
        let seed = std::env::var("WEFT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
        println!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (mut nones, mut kept) = (0, 0);
        for case in 0..3000 {
            let families = rng.gen_range(0..3); // 0: v4, 1: v6, 2: both
            let v4_spec = (families != 1).then(|| {
                let prefix = rng.gen_range(20..=29);
                let net = v4(&format!("{}/{prefix}", Ipv4Addr::from(rng.gen::<u32>())));
                let len = rng.gen_bool(0.7).then(|| rng.gen_range(prefix + 1..=31.min(prefix + 7)));
                let sub = len.filter(|l| *l > prefix).unwrap_or((prefix + 2).max(24)).min(32);
                let aligned = |rng: &mut rand::rngs::StdRng| {
                    let a = u32::from(net.network())
                        + (rng.gen_range(0..1u32 << (32 - prefix)) >> (32 - sub) << (32 - sub));
                    Ipv4Addr::from(a)
                };
                let min = rng.gen_bool(0.3).then(|| aligned(&mut rng));
                let max = rng.gen_bool(0.3).then(|| aligned(&mut rng));
                (net, len, min, max)
            });
            let v6_spec = (families != 0).then(|| {
                let prefix = rng.gen_range(116..=125);
                let net = v6(&format!("{}/{prefix}", Ipv6Addr::from(rng.gen::<u128>())));
                let len = rng.gen_bool(0.7).then(|| rng.gen_range(prefix + 1..=127.min(prefix + 7)));
                let sub = len.filter(|l| *l > prefix).unwrap_or(prefix + 2).min(128);
                let aligned = |rng: &mut rand::rngs::StdRng| {
                    let off = rng.gen_range(0..1u128 << (128 - prefix)) >> (128 - sub) << (128 - sub);
                    Ipv6Addr::from(u128::from(net.network()) + off)
                };
                let min = rng.gen_bool(0.3).then(|| aligned(&mut rng));
                let max = rng.gen_bool(0.3).then(|| aligned(&mut rng));
                (net, len, min, max)
            });
            let cfg = match AllocConfig::new(v4_spec, v6_spec) {
                Ok(c) => c,
                Err(e) => {
                    // Refused only for Flannel's reasons or min > max.
                    let ok = match &e {
                        AllocError::NetworkTooSmall { .. } => true,
                        AllocError::SubnetLen { value, min, max, .. } => value < min || value > max,
                        AllocError::MinAboveMax { .. } => true,
                        _ => false,
                    };
                    assert!(ok, "case {case} seed {seed}: {e}");
                    continue;
                }
            };
            // Reference ranges, the slow way.
            let all4: Vec<Ipv4Net> = cfg
                .v4
                .map(|r| {
                    all_subnets(u32::from(r.min()).into(), u32::from(r.max()).into(), r.subnet_len(), 32)
                        .into_iter()
                        .map(|a| Ipv4Net::new(v4_addr(a), r.subnet_len()).unwrap())
                        .filter(|n| r.network().contains(n))
                        .collect()
                })
                .unwrap_or_default();
            let all6: Vec<Ipv6Net> = cfg
                .v6
                .map(|r| {
                    all_subnets(r.min().into(), r.max().into(), r.subnet_len(), 128)
                        .into_iter()
                        .map(|a| Ipv6Net::new(a.into(), r.subnet_len()).unwrap())
                        .filter(|n| r.network().contains(n))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(r) = cfg.v4 {
                assert_eq!(all4.len() as u128, r.capacity(), "case {case} seed {seed}");
            }
            if let Some(r) = cfg.v6 {
                assert_eq!(all6.len() as u128, r.capacity(), "case {case} seed {seed}");
            }

            // Taken: a random share of the range, plus strays of any length.
            let share = rng.gen::<f64>();
            let n = all4.len().max(all6.len());
            let mut taken = Vec::new();
            for i in 0..n {
                if rng.gen_bool(share) {
                    let a = all4.get(i).copied().filter(|_| rng.gen_bool(0.9));
                    let b = all6.get(i).copied().filter(|_| rng.gen_bool(0.9));
                    if a.is_some() || b.is_some() {
                        taken.push(SubnetKey { v4: a, v6: b });
                    }
                }
            }
            for _ in 0..rng.gen_range(0..4) {
                let a = cfg.v4.filter(|_| rng.gen_bool(0.7)).map(|r| {
                    let (a, l) = random_near(
                        &mut rng,
                        u32::from(r.network().network()).into(),
                        r.network().prefix_len(),
                        r.subnet_len(),
                        32,
                    );
                    Ipv4Net::new(v4_addr(a), l).unwrap()
                });
                let b = cfg.v6.filter(|_| rng.gen_bool(0.7)).map(|r| {
                    let (a, l) = random_near(
                        &mut rng,
                        r.network().network().into(),
                        r.network().prefix_len(),
                        r.subnet_len(),
                        128,
                    );
                    Ipv6Net::new(a.into(), l).unwrap()
                });
                if a.is_some() || b.is_some() {
                    taken.push(SubnetKey { v4: a, v6: b });
                }
            }
            let previous = match rng.gen_range(0..4) {
                0 => None,
                1 => taken.first().copied(),
                _ => Some(SubnetKey {
                    v4: cfg.v4.and_then(|_| all4.get(rng.gen_range(0..all4.len())).copied()),
                    v6: cfg.v6.and_then(|_| all6.get(rng.gen_range(0..all6.len())).copied()),
                }),
            };

            let taken4: Vec<Ipv4Net> = taken.iter().filter_map(|k| k.v4).collect();
            let taken6: Vec<Ipv6Net> = taken.iter().filter_map(|k| k.v6).collect();
            let free4 = free_of(&all4, &taken4, |a, b| a.contains(b) || b.contains(a));
            let free6 = free_of(&all6, &taken6, |a, b| a.contains(b) || b.contains(a));
            let exhausted = (cfg.v4.is_some() && free4.is_empty()) || (cfg.v6.is_some() && free6.is_empty());
            let prev_ok = previous.filter(|p| {
                (p.v4.is_some() == cfg.v4.is_some())
                    && (p.v6.is_some() == cfg.v6.is_some())
                    && p.v4.iter().all(|n| free4.contains(n))
                    && p.v6.iter().all(|n| free6.contains(n))
            });

            let got = allocate(&cfg, &taken, previous.as_ref(), rng.gen());
            let ctx = format!("case {case} seed {seed}: cfg {cfg:?} taken {taken:?} previous {previous:?} got {got:?}");
            match got {
                None => {
                    assert!(exhausted && prev_ok.is_none(), "{ctx}");
                    nones += 1;
                }
                Some(k) => {
                    assert!(cfg.contains(&k), "{ctx}");
                    assert_eq!(k.v4.is_some(), cfg.v4.is_some(), "{ctx}");
                    assert_eq!(k.v6.is_some(), cfg.v6.is_some(), "{ctx}");
                    if let Some(p) = prev_ok {
                        assert_eq!(k, p, "{ctx}");
                        kept += 1;
                        continue;
                    }
                    assert!(!exhausted, "{ctx}");
                    // Free, and among Flannel's first CANDIDATES free ones.
                    if let Some(n) = k.v4 {
                        assert!(free4[..free4.len().min(CANDIDATES)].contains(&n), "{ctx}");
                    }
                    if let Some(n) = k.v6 {
                        assert!(free6[..free6.len().min(CANDIDATES)].contains(&n), "{ctx}");
                    }
                }
            }
        }
        assert!(nones > 50 && kept > 50, "{nones} exhausted and {kept} kept cases: the model drew too few");
    }
}
