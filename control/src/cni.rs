//! The CNI hand-off: a network config for the standard `bridge` and
//! `host-local` plugins, derived from what `subnet.env` says.
//!
//! Flannel's own CNI plugin reads `subnet.env` and delegates to `bridge`
//! with `host-local` IPAM; weft writes the delegated config directly, so the
//! plugins shipped with every distribution set up pods without a flannel
//! binary. Pure code: the caller writes the file or pipes it to a plugin.

use ipnet::IpNet;
use serde_json::{json, Value};

/// The values of a `subnet.env` that a CNI config needs.
#[derive(Debug, Clone, PartialEq)]
pub struct SubnetEnv {
    /// `FLANNEL_SUBNET`: first usable address with the subnet's prefix.
    pub subnet: Option<IpNet>,
    /// `FLANNEL_IPV6_SUBNET`.
    pub ipv6_subnet: Option<IpNet>,
    /// `FLANNEL_MTU`.
    pub mtu: u32,
}

impl SubnetEnv {
    /// Parses `subnet.env` text; `None` when a needed variable is missing or bad.
    pub fn parse(text: &str) -> Option<SubnetEnv> {
        let mut env = SubnetEnv { subnet: None, ipv6_subnet: None, mtu: 0 };
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else { continue };
            match k.trim() {
                "FLANNEL_SUBNET" => env.subnet = Some(v.trim().parse().ok()?),
                "FLANNEL_IPV6_SUBNET" => env.ipv6_subnet = Some(v.trim().parse().ok()?),
                "FLANNEL_MTU" => env.mtu = v.trim().parse().ok()?,
                _ => {}
            }
        }
        (env.mtu > 0 && (env.subnet.is_some() || env.ipv6_subnet.is_some())).then_some(env)
    }
}

/// A `bridge` + `host-local` network config named `name` for the pods of a
/// node, on bridge `bridge`, keeping IPAM state in `ipam_dir`.
pub fn bridge_config(name: &str, bridge: &str, env: &SubnetEnv, ipam_dir: &str) -> Value {
    let ranges: Vec<Value> = env
        .subnet
        .iter()
        .chain(&env.ipv6_subnet)
        .map(|s| json!([{"subnet": s.trunc().to_string(), "gateway": s.addr().to_string()}]))
        .collect();
    json!({
        "cniVersion": "0.4.0",
        "name": name,
        "type": "bridge",
        "bridge": bridge,
        "isGateway": true,
        "isDefaultGateway": true,
        "ipMasq": false,
        "hairpinMode": true,
        "mtu": env.mtu,
        "ipam": {"type": "host-local", "dataDir": ipam_dir, "ranges": ranges}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dual_stack_subnet_env_gives_two_ranges() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/subnet.env")).unwrap();
        let env = SubnetEnv::parse(&text).unwrap();
        assert_eq!(env.mtu, 1420);
        let c = bridge_config("weft", "cni0", &env, "ipam");
        assert_eq!(c["type"], "bridge");
        assert_eq!(c["mtu"], 1420);
        let ranges = c["ipam"]["ranges"].as_array().unwrap();
        assert_eq!(ranges[0][0]["subnet"], "10.42.3.0/24");
        assert_eq!(ranges[0][0]["gateway"], "10.42.3.1");
        assert_eq!(ranges[1][0]["subnet"], "2001:cafe:42:3::/64");
        assert_eq!(ranges[1][0]["gateway"], "2001:cafe:42:3::1");
    }

    #[test]
    fn incomplete_subnet_env_is_refused() {
        assert_eq!(SubnetEnv::parse("FLANNEL_MTU=1450\n"), None);
        assert_eq!(SubnetEnv::parse("FLANNEL_SUBNET=10.0.0.1/24\n"), None);
        assert_eq!(SubnetEnv::parse("FLANNEL_SUBNET=nope\nFLANNEL_MTU=1450\n"), None);
    }
}
