//! A node's subnets and their key: one subnet per address family, written
//! as Flannel writes a lease's key, `10.244.1.0-24`, `fd00::-64` or both
//! joined by `&` (`10.244.1.0-24&fd00:0:0:1::-64`).
//!
//! The allocator ([`crate::alloc`]) hands these out and the datastores
//! ([`crate::datastore`], [`crate::etcd`], [`crate::kube`]) key leases by
//! them; this module is below all of them and imports none. Pure: parsing
//! refuses anything malformed, it never panics on input.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::error::DatastoreError;

/// A lease's subnet key: `10.244.1.0-24`, `fd00::-64` or both joined by `&`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubnetKey {
    /// IPv4 subnet.
    pub v4: Option<Ipv4Net>,
    /// IPv6 subnet.
    pub v6: Option<Ipv6Net>,
}

impl SubnetKey {
    /// Parses a key as Flannel writes it.
    pub fn parse(key: &str) -> Result<Self, DatastoreError> {
        let bad = || DatastoreError::SubnetKey(key.to_string());
        let mut out = SubnetKey { v4: None, v6: None };
        let mut parts = key.split('&');
        for part in parts.by_ref().take(2) {
            let (addr, len) = part.rsplit_once('-').ok_or_else(bad)?;
            let len: u8 = len.parse().map_err(|_| bad())?;
            let net = IpNet::new(addr.parse().map_err(|_| bad())?, len).map_err(|_| bad())?;
            if net.trunc() != net {
                return Err(bad());
            }
            match net {
                IpNet::V4(n) if out.v4.is_none() => out.v4 = Some(n),
                IpNet::V6(n) if out.v6.is_none() => out.v6 = Some(n),
                _ => return Err(bad()),
            }
        }
        if parts.next().is_some() || (out.v4.is_none() && out.v6.is_none()) {
            return Err(bad());
        }
        Ok(out)
    }

    /// The subnets of the key.
    pub fn subnets(&self) -> Vec<IpNet> {
        self.v4.map(IpNet::V4).into_iter().chain(self.v6.map(IpNet::V6)).collect()
    }
}

impl std::fmt::Display for SubnetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(n) = self.v4 {
            write!(f, "{}-{}", n.network(), n.prefix_len())?;
        }
        if let Some(n) = self.v6 {
            if self.v4.is_some() {
                f.write_str("&")?;
            }
            write!(f, "{}-{}", n.network(), n.prefix_len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_keys_round_trip() {
        for k in
            ["10.244.1.0-24", "fd00:0:0:1::-64", "10.244.1.0-24&fd00:0:0:1::-64", "10.42.3.0-24&2001:cafe:42:3::-64"]
        {
            let parsed = SubnetKey::parse(k).unwrap();
            assert_eq!(SubnetKey::parse(&parsed.to_string()).unwrap(), parsed, "{k}");
        }
        assert_eq!(SubnetKey::parse("10.244.1.0-24").unwrap().to_string(), "10.244.1.0-24");
        for bad in [
            "",
            "10.244.1.0",
            "10.244.1.1-24",
            "10.244.1.0-33",
            "x-24",
            "10.0.0.0-8&10.1.0.0-16",
            "a&b&c",
            "&",
            "10.244.1.0-24&",
        ] {
            assert!(SubnetKey::parse(bad).is_err(), "{bad}");
        }
    }
}
