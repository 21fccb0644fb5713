//! Arbitrary input through every parser of configuration and datastore
//! values.
//!
//! The whole input goes to the JSON parsers (`StaticDatastore`, `Lease`,
//! `NetworkConfig`) as bytes and, when it is UTF-8, to the agent's YAML
//! config reader and to `SubnetKey::parse` as text.
//!
//! Invariants: nothing panics; a refused config names a key that was given
//! or that the agent knows; an accepted config has only known keys, values
//! within their documented ranges, and validates the same way twice; a
//! parsed subnet key's text parses back to the same key and is a
//! fixed point; a parsed static datastore's `to_json()` parses back to the
//! same datastore and is a fixed point; leases and network configs survive
//! a serialise/parse round trip.

use weft_control::config::AgentConfig;
use weft_control::datastore::{Lease, NetworkConfig, StaticDatastore};
use weft_control::subnet::SubnetKey;
use weft_tunnel::vxlan::MAX_VNI;

fn known(key: &str) -> bool {
    AgentConfig::keys().any(|(k, _)| *k == key)
}

fn check_agent_config(text: &str) {
    let Ok(pairs) = AgentConfig::pairs_from_yaml(text) else {
        return;
    };
    let c = match AgentConfig::from_pairs(&pairs) {
        Ok(c) => c,
        Err(e) => {
            assert!(
                pairs.contains_key(&e.key) || known(&e.key),
                "refusal names key {:?}, neither given nor known",
                e.key
            );
            return;
        }
    };
    for k in pairs.keys() {
        assert!(known(k), "accepted unknown key {k:?}");
    }
    let given = |k: &str| pairs.get(k).is_some_and(|v| !v.trim().is_empty());
    assert!((1..=MAX_VNI).contains(&c.vni), "vni {}", c.vni);
    assert_ne!(c.vxlan_port, 0);
    assert!(c.threads >= 1);
    if given("threads") {
        assert!(c.threads <= 256, "threads {}", c.threads);
    }
    assert!(!c.tun_name.is_empty() && c.tun_name.len() <= 15, "tun-name {:?}", c.tun_name);
    let ips = c.node_ips();
    assert!(matches!(ips.len(), 1 | 2), "node-ip {ips:?}");
    if let [a, b] = ips {
        assert_ne!(a.is_ipv4(), b.is_ipv4(), "two node IPs of one family accepted");
    }
    let again = AgentConfig::from_pairs(&pairs).expect("accepted once, refused the second time");
    assert_eq!(again, c, "the same pairs validate differently");
}

fn check_subnet_key(text: &str) {
    let Ok(key) = SubnetKey::parse(text) else {
        return;
    };
    let shown = key.to_string();
    let again =
        SubnetKey::parse(&shown).unwrap_or_else(|e| panic!("{text:?} parsed, its text {shown:?} does not: {e}"));
    assert_eq!(again, key, "{text:?} -> {shown:?}");
    assert_eq!(again.to_string(), shown);
    let subnets = key.subnets();
    assert!(!subnets.is_empty() && subnets.len() <= 2);
    for n in subnets {
        assert_eq!(n.trunc(), n, "{text:?} gave a subnet with host bits");
    }
}

fn check_static_datastore(bytes: &[u8]) {
    let Ok(ds) = StaticDatastore::parse(bytes) else {
        return;
    };
    let json = ds.to_json();
    let again =
        StaticDatastore::parse(json.as_bytes()).unwrap_or_else(|e| panic!("to_json output refused: {e}\n{json}"));
    assert_eq!(again, ds, "to_json does not parse back equal:\n{json}");
    assert_eq!(again.to_json(), json, "to_json is not a fixed point");
    for lease in ds.leases.values() {
        let _ = lease.vxlan_data(false);
        let _ = lease.vxlan_data(true);
        for ip in lease.public_ips() {
            assert!(ds.lease_of(ip).is_some());
        }
    }
}

fn check_lease(bytes: &[u8]) {
    let Ok(lease) = Lease::parse(bytes) else {
        return;
    };
    let _ = lease.vxlan_data(false);
    let _ = lease.vxlan_data(true);
    for v6 in [false, true] {
        if let Some(p) = lease.private_path(v6) {
            assert_eq!(p.address.is_ipv6(), v6, "a private path of the other family");
        }
    }
    let json = serde_json::to_string(&lease).expect("serialising a lease");
    let again = Lease::parse(json.as_bytes()).unwrap_or_else(|e| panic!("serialised lease refused: {e}\n{json}"));
    assert_eq!(again, lease, "lease does not round-trip:\n{json}");
}

fn check_network_config(bytes: &[u8]) {
    let Ok(config) = NetworkConfig::parse(bytes) else {
        return;
    };
    let _ = config.backend_type();
    let json = serde_json::to_string(&config).expect("serialising a network config");
    let again = NetworkConfig::parse(json.as_bytes())
        .unwrap_or_else(|e| panic!("serialised network config refused: {e}\n{json}"));
    assert_eq!(again, config, "network config does not round-trip:\n{json}");
}

/// Runs one input through the invariants above; panics on a broken one.
pub fn run(data: &[u8]) {
    check_static_datastore(data);
    check_lease(data);
    check_network_config(data);
    if let Ok(text) = std::str::from_utf8(data) {
        check_agent_config(text);
        check_subnet_key(text);
    }
}
