//! Flannel's datastore schema, and the static-file datastore.
//!
//! The shapes are Flannel's: the network config kept at
//! `/coreos.com/network/config`, one lease per node under
//! `/coreos.com/network/subnets/<key>` whose key is the subnet written as
//! `10.244.1.0-24` (dual-stack: `10.244.1.0-24&fd00:0:0:1::-64`). The static
//! file holds both in one JSON document:
//!
//! ```json
//! {"config": {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}},
//!  "subnets": {"10.244.1.0-24": {"PublicIP": "192.168.77.1", "BackendType": "vxlan",
//!                                "BackendData": {"VNI": 1, "VtepMAC": "0a:58:0a:f4:01:00"}}}}
//! ```
//!
//! Parsing refuses anything malformed with the field and the value; it never
//! panics on input.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::error::DatastoreError;
use crate::subnet::SubnetKey;

/// Flannel's network config (`<prefix>/config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkConfig {
    /// IPv4 pod network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Ipv4Net>,
    /// IPv6 pod network.
    #[serde(default, rename = "IPv6Network", skip_serializing_if = "Option::is_none")]
    pub ipv6_network: Option<Ipv6Net>,
    /// Whether IPv4 is on (default true).
    #[serde(default, rename = "EnableIPv4", skip_serializing_if = "Option::is_none")]
    pub enable_ipv4: Option<bool>,
    /// Whether IPv6 is on (default false).
    #[serde(default, rename = "EnableIPv6", skip_serializing_if = "Option::is_none")]
    pub enable_ipv6: Option<bool>,
    /// IPv4 node subnet length (default 24).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_len: Option<u8>,
    /// IPv6 node subnet length (default 64).
    #[serde(default, rename = "IPv6SubnetLen", skip_serializing_if = "Option::is_none")]
    pub ipv6_subnet_len: Option<u8>,
    /// Lowest IPv4 subnet to allocate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_min: Option<Ipv4Addr>,
    /// Highest IPv4 subnet to allocate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_max: Option<Ipv4Addr>,
    /// Lowest IPv6 subnet to allocate.
    #[serde(default, rename = "IPv6SubnetMin", skip_serializing_if = "Option::is_none")]
    pub ipv6_subnet_min: Option<Ipv6Addr>,
    /// Highest IPv6 subnet to allocate.
    #[serde(default, rename = "IPv6SubnetMax", skip_serializing_if = "Option::is_none")]
    pub ipv6_subnet_max: Option<Ipv6Addr>,
    /// Backend settings: `{"Type": "vxlan", ...}`.
    #[serde(default)]
    pub backend: serde_json::Value,
}

impl NetworkConfig {
    /// Parses the config JSON.
    pub fn parse(json: &[u8]) -> Result<Self, DatastoreError> {
        serde_json::from_slice(json).map_err(|source| DatastoreError::Json { what: "network config".into(), source })
    }

    /// The config of a cluster with these pod networks, node subnet lengths
    /// and backend, allocation ranges left to Flannel's defaults.
    pub fn for_cluster(v4: Option<(Ipv4Net, u8)>, v6: Option<(Ipv6Net, u8)>, backend: &str) -> Self {
        NetworkConfig {
            network: v4.map(|(n, _)| n),
            ipv6_network: v6.map(|(n, _)| n),
            enable_ipv4: Some(v4.is_some()),
            enable_ipv6: Some(v6.is_some()),
            subnet_len: v4.map(|(_, l)| l),
            ipv6_subnet_len: v6.map(|(_, l)| l),
            subnet_min: None,
            subnet_max: None,
            ipv6_subnet_min: None,
            ipv6_subnet_max: None,
            backend: serde_json::json!({"Type": backend}),
        }
    }

    /// The allocation ranges of this config (Flannel's rules and defaults).
    pub fn alloc_config(&self) -> Result<crate::alloc::AllocConfig, crate::alloc::AllocError> {
        let v4 = self.network.filter(|_| self.enable_ipv4 != Some(false));
        let v6 = self.ipv6_network.filter(|_| self.enable_ipv6 == Some(true) || self.network.is_none());
        crate::alloc::AllocConfig::new(
            v4.map(|n| (n, self.subnet_len, self.subnet_min, self.subnet_max)),
            v6.map(|n| (n, self.ipv6_subnet_len, self.ipv6_subnet_min, self.ipv6_subnet_max)),
        )
    }

    /// Flannel's WireGuard options from `Backend`, checked.
    pub fn wireguard_options(&self) -> Result<WgOptions, DatastoreError> {
        let b = &self.backend;
        let invalid = |what: &str, value: &serde_json::Value, accepted: &str| DatastoreError::Invalid {
            what: format!("Backend.{what}"),
            value: value.to_string(),
            accepted: accepted.into(),
        };
        let port = |name: &str, default: u16| match b.get(name) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|p| (1..=65535).contains(p))
                .map(|p| p as u16)
                .ok_or_else(|| invalid(name, v, "a port from 1 to 65535")),
        };
        let psk = match b.get("PSK") {
            None => None,
            Some(v) => Some(
                v.as_str().and_then(crate::keys::decode).ok_or_else(|| invalid("PSK", v, "a base64 WireGuard key"))?,
            ),
        };
        let mtu = match b.get("MTU") {
            None => None,
            Some(v) => Some(
                v.as_u64().filter(|m| (576..=65535).contains(m)).ok_or_else(|| invalid("MTU", v, "576 to 65535"))?
                    as u32,
            ),
        };
        let keepalive = match b.get("PersistentKeepaliveInterval") {
            None => 0,
            Some(v) => v
                .as_u64()
                .filter(|k| *k <= 65535)
                .ok_or_else(|| invalid("PersistentKeepaliveInterval", v, "seconds, 0 to 65535 (0: off)"))?
                as u16,
        };
        let mode = match b.get("Mode") {
            None => "separate".to_string(),
            Some(v) => v
                .as_str()
                .filter(|m| ["separate", "auto", "ipv4", "ipv6"].contains(m))
                .ok_or_else(|| invalid("Mode", v, "separate, auto, ipv4 or ipv6"))?
                .to_string(),
        };
        Ok(WgOptions {
            psk,
            listen_port: port("ListenPort", 51820)?,
            listen_port_v6: port("ListenPortV6", 51821)?,
            mtu,
            keepalive,
            mode,
        })
    }

    /// The backend type (`Backend.Type`), `vxlan` when absent as in Flannel.
    pub fn backend_type(&self) -> &str {
        self.backend.get("Type").and_then(|t| t.as_str()).unwrap_or("vxlan")
    }
}

/// One node's lease value (`<prefix>/subnets/<key>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Lease {
    /// The node's IPv4 underlay address.
    #[serde(rename = "PublicIP", default, skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<Ipv4Addr>,
    /// The node's IPv6 underlay address.
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<Ipv6Addr>,
    /// `vxlan`, `wireguard`, `host-gw`, ...
    pub backend_type: String,
    /// Backend data for IPv4 (VXLAN: `{"VNI":1,"VtepMAC":"..."}`).
    #[serde(default)]
    pub backend_data: serde_json::Value,
    /// Backend data for IPv6.
    #[serde(rename = "BackendV6Data", default, skip_serializing_if = "Option::is_none")]
    pub backend_v6_data: Option<serde_json::Value>,
}

impl Lease {
    /// Parses a lease value.
    pub fn parse(json: &[u8]) -> Result<Self, DatastoreError> {
        serde_json::from_slice(json).map_err(|source| DatastoreError::Json { what: "lease".into(), source })
    }

    /// The underlay addresses this lease announces.
    pub fn public_ips(&self) -> impl Iterator<Item = IpAddr> {
        self.public_ip.map(IpAddr::V4).into_iter().chain(self.public_ipv6.map(IpAddr::V6))
    }

    /// The backend data of an underlay family: IPv6's falls back to the
    /// IPv4 one when the lease has none of its own.
    fn data_of(&self, v6: bool) -> &serde_json::Value {
        if v6 {
            self.backend_v6_data.as_ref().unwrap_or(&self.backend_data)
        } else {
            &self.backend_data
        }
    }

    /// WireGuard backend data for the given underlay family.
    pub fn wireguard_data(&self, v6: bool) -> Result<WgData, DatastoreError> {
        WgData::from_value(self.data_of(v6))
    }

    /// The private path of the given underlay family, if the backend data
    /// announces a valid one: a location as `node-location` takes it and a
    /// unicast address of that family. Anything else is no path (the public
    /// address is used), never an error: the fields are an optimisation.
    pub fn private_path(&self, v6: bool) -> Option<PrivatePath> {
        let data = self.data_of(v6);
        let location = data.get(LOCATION_FIELD)?.as_str()?;
        let address: IpAddr = data.get(INTERNAL_IP_FIELD)?.as_str()?.parse().ok()?;
        let mapped = matches!(address, IpAddr::V6(a) if a.to_ipv4_mapped().is_some());
        let unicast = !address.is_unspecified()
            && !address.is_multicast()
            && !address.is_loopback()
            && !mapped
            && address != IpAddr::from([255, 255, 255, 255]);
        (crate::config::valid_location(location) && address.is_ipv6() == v6 && unicast)
            .then(|| PrivatePath { location: location.to_string(), address })
    }

    /// VXLAN backend data for the given underlay family.
    pub fn vxlan_data(&self, v6: bool) -> Result<VxlanData, DatastoreError> {
        VxlanData::from_value(self.data_of(v6))
    }
}

/// Field of a lease's backend data naming the node's `node-location`.
pub const LOCATION_FIELD: &str = "WeftLocation";
/// Field of a lease's backend data holding the node's internal address of
/// that family (its `node-ip`), for the nodes of its location.
pub const INTERNAL_IP_FIELD: &str = "WeftInternalIP";

/// How a node of the same location reaches a node: weft's addition to a
/// lease's backend data (`"WeftLocation"`, `"WeftInternalIP"`). Flannel
/// ignores both, as it ignores every field it does not know, so a kernel
/// Flannel node still sends to the lease's public address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivatePath {
    /// The node's `node-location`.
    pub location: String,
    /// Its internal address of the family the backend data is for.
    pub address: IpAddr,
}

impl PrivatePath {
    /// `data` with this path's fields set, if it is an object (the backend
    /// data of vxlan and wireguard are); anything else is returned as it is.
    pub fn add_to(&self, mut data: serde_json::Value) -> serde_json::Value {
        if let Some(o) = data.as_object_mut() {
            o.insert(LOCATION_FIELD.into(), self.location.clone().into());
            o.insert(INTERNAL_IP_FIELD.into(), self.address.to_string().into());
        }
        data
    }
}

/// WireGuard backend data of a lease (`{"PublicKey": "<base64>", "Port": 51820}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WgData {
    /// The node's WireGuard public key.
    pub public_key: [u8; 32],
    /// Its listen port.
    pub port: u16,
}

impl WgData {
    fn from_value(v: &serde_json::Value) -> Result<Self, DatastoreError> {
        let invalid = |what: &str, value: &serde_json::Value, accepted: &str| DatastoreError::Invalid {
            what: what.into(),
            value: value.to_string(),
            accepted: accepted.into(),
        };
        let key = v.get("PublicKey").unwrap_or(&serde_json::Value::Null);
        let public_key = key
            .as_str()
            .and_then(crate::keys::decode)
            .ok_or_else(|| invalid("BackendData.PublicKey", key, "a base64 WireGuard public key"))?;
        let port = match v.get("Port") {
            None => 51820,
            Some(p) => p
                .as_u64()
                .filter(|p| (1..=65535).contains(p))
                .ok_or_else(|| invalid("BackendData.Port", p, "a port from 1 to 65535"))? as u16,
        };
        Ok(WgData { public_key, port })
    }

    /// As JSON backend data.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::json!({"PublicKey": crate::keys::encode(&self.public_key), "Port": self.port})
    }
}

/// Flannel's WireGuard overhead: outer IPv6 40 + UDP 8 + WireGuard 32. A
/// WireGuard device's MTU is the underlay's minus this unless
/// [`WgOptions::mtu`] says otherwise.
pub const WG_OVERHEAD: usize = 80;

/// Flannel's WireGuard backend options (`Backend` of the network config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgOptions {
    /// `PSK`: a preshared key for every peer.
    pub psk: Option<[u8; 32]>,
    /// `ListenPort` (51820).
    pub listen_port: u16,
    /// `ListenPortV6` (51821).
    pub listen_port_v6: u16,
    /// `MTU`: the device MTU (default: underlay - 80).
    pub mtu: Option<u32>,
    /// `PersistentKeepaliveInterval` in seconds (0: off).
    pub keepalive: u16,
    /// `Mode`: separate, auto, ipv4, ipv6.
    pub mode: String,
}

/// VXLAN backend data of a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanData {
    /// VNI.
    pub vni: u32,
    /// The node's VTEP MAC.
    pub vtep_mac: [u8; 6],
}

impl VxlanData {
    fn from_value(v: &serde_json::Value) -> Result<Self, DatastoreError> {
        let invalid = |what: &str, value: &serde_json::Value, accepted: &str| DatastoreError::Invalid {
            what: what.into(),
            value: value.to_string(),
            accepted: accepted.into(),
        };
        let vni = match v.get("VNI") {
            None => 1,
            Some(n) => {
                n.as_u64()
                    .filter(|n| *n <= weft_tunnel::vxlan::MAX_VNI as u64)
                    .ok_or_else(|| invalid("BackendData.VNI", n, "an integer up to 16777215"))? as u32
            }
        };
        let mac = v.get("VtepMAC").unwrap_or(&serde_json::Value::Null);
        let vtep_mac = mac
            .as_str()
            .and_then(parse_mac)
            .ok_or_else(|| invalid("BackendData.VtepMAC", mac, "a MAC such as 0a:58:0a:f4:01:00"))?;
        Ok(VxlanData { vni, vtep_mac })
    }

    /// As JSON backend data.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::json!({"VNI": self.vni, "VtepMAC": format_mac(&self.vtep_mac)})
    }
}

/// The static datastore: network config and every node's lease.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticDatastore {
    /// The network config.
    pub config: NetworkConfig,
    /// Leases by subnet key.
    pub leases: BTreeMap<SubnetKey, Lease>,
}

#[derive(Serialize, Deserialize)]
struct StaticFile {
    config: NetworkConfig,
    #[serde(default)]
    subnets: BTreeMap<String, Lease>,
}

impl StaticDatastore {
    /// Parses the static file's JSON.
    pub fn parse(json: &[u8]) -> Result<Self, DatastoreError> {
        let file: StaticFile = serde_json::from_slice(json)
            .map_err(|source| DatastoreError::Json { what: "static datastore".into(), source })?;
        let mut leases = BTreeMap::new();
        for (k, v) in file.subnets {
            leases.insert(SubnetKey::parse(&k)?, v);
        }
        Ok(StaticDatastore { config: file.config, leases })
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Self, DatastoreError> {
        let bytes =
            std::fs::read(path).map_err(|source| DatastoreError::Io { path: path.display().to_string(), source })?;
        Self::parse(&bytes)
    }

    /// As the static file's JSON.
    pub fn to_json(&self) -> String {
        let file = StaticFile {
            config: self.config.clone(),
            subnets: self.leases.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        };
        serde_json::to_string_pretty(&file).expect("serialising plain data cannot fail")
    }

    /// The lease whose public address is `ip`.
    pub fn lease_of(&self, ip: IpAddr) -> Option<(&SubnetKey, &Lease)> {
        self.leases.iter().find(|(_, l)| l.public_ips().any(|a| a == ip))
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Formats a MAC as lowercase `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The `subnet.env` Flannel writes for the CNI plugin.
pub fn subnet_env(
    network: Option<IpNet>,
    subnet: &SubnetKey,
    ipv6_network: Option<IpNet>,
    mtu: u32,
    ipmasq: bool,
) -> String {
    let mut s = String::new();
    if let (Some(n), Some(sub)) = (network, subnet.v4) {
        s += &format!("FLANNEL_NETWORK={n}\nFLANNEL_SUBNET={}/{}\n", first_host(IpNet::V4(sub)), sub.prefix_len());
    }
    if let (Some(n), Some(sub)) = (ipv6_network, subnet.v6) {
        s += &format!(
            "FLANNEL_IPV6_NETWORK={n}\nFLANNEL_IPV6_SUBNET={}/{}\n",
            first_host(IpNet::V6(sub)),
            sub.prefix_len()
        );
    }
    s += &format!("FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={ipmasq}\n");
    s
}

/// The first usable address of a subnet (network address + 1).
pub fn first_host(net: IpNet) -> IpAddr {
    match net {
        IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n.network()).wrapping_add(1))),
        IpNet::V6(n) => IpAddr::V6(Ipv6Addr::from(u128::from(n.network()).wrapping_add(1))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/flannel-etcd").join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn a_private_path_rides_in_the_backend_data_and_the_rest_still_parses() {
        let key = [7u8; 32];
        let path = PrivatePath { location: "eu-1".into(), address: "172.16.0.11".parse().unwrap() };
        let path6 = PrivatePath { location: "eu-1".into(), address: "fd16::11".parse().unwrap() };
        let lease = Lease {
            public_ip: Some(Ipv4Addr::new(198, 51, 100, 101)),
            public_ipv6: Some("2001:db8::101".parse().unwrap()),
            backend_type: "wireguard".into(),
            backend_data: path.add_to(WgData { public_key: key, port: 51820 }.to_value()),
            backend_v6_data: Some(path6.add_to(WgData { public_key: key, port: 51821 }.to_value())),
        };
        let again = Lease::parse(serde_json::to_string(&lease).unwrap().as_bytes()).unwrap();
        assert_eq!(again.private_path(false), Some(path));
        assert_eq!(again.private_path(true), Some(path6));
        assert_eq!(
            again.wireguard_data(false).unwrap(),
            WgData { public_key: key, port: 51820 },
            "still wireguard data"
        );
        // A lease without the fields (kernel Flannel's) has no private path;
        // fields that are wrong are no path either, never an error.
        let plain = Lease { backend_data: WgData { public_key: key, port: 51820 }.to_value(), ..lease.clone() };
        assert_eq!(plain.private_path(false), None);
        for (loc, addr) in [
            ("eu-1", "fd16::11"),
            ("-bad", "172.16.0.11"),
            ("eu-1", "0.0.0.0"),
            ("eu-1", "x"),
            ("eu-1", "224.0.0.1"),
            ("eu-1", "127.0.0.1"),
        ] {
            let mut data = WgData { public_key: key, port: 51820 }.to_value();
            data[LOCATION_FIELD] = loc.into();
            data[INTERNAL_IP_FIELD] = addr.into();
            let l = Lease { backend_data: data, backend_v6_data: None, ..lease.clone() };
            assert_eq!(l.private_path(false), None, "{loc} {addr}");
        }
        let mut data = WgData { public_key: key, port: 51820 }.to_value();
        data[LOCATION_FIELD] = 5.into();
        assert_eq!(Lease { backend_data: data, ..lease }.private_path(false), None, "a location that is no string");
        assert_eq!(path_of_null(), serde_json::Value::Null, "no object: left as it is");
    }

    fn path_of_null() -> serde_json::Value {
        PrivatePath { location: "a".into(), address: "10.0.0.1".parse().unwrap() }.add_to(serde_json::Value::Null)
    }

    #[test]
    fn flannel_written_values_are_understood() {
        // Shapes as flanneld writes them (tests/fixtures/flannel-etcd).
        let l = Lease::parse(&fixture("subnets_10.244.2.0-24.json")).unwrap();
        assert_eq!(l.public_ip, Some(Ipv4Addr::new(192, 168, 77, 2)));
        assert_eq!(l.vxlan_data(false).unwrap(), VxlanData { vni: 1, vtep_mac: [0x0a, 0x58, 0x0a, 0xf4, 2, 0] });
        let again = Lease::parse(serde_json::to_string(&l).unwrap().as_bytes()).unwrap();
        assert_eq!(again, l);
        let l = Lease::parse(&fixture("subnets_10.42.3.0-24&2001:cafe:42:3::-64.json")).unwrap();
        assert_eq!(l.backend_type, "wireguard");
        assert_eq!(l.public_ipv6, Some("fd77::3".parse().unwrap()));
        let c = NetworkConfig::parse(&fixture("config.json")).unwrap();
        assert_eq!(c.network, Some("10.244.0.0/16".parse().unwrap()));
        assert_eq!(c.backend_type(), "vxlan");
    }

    #[test]
    fn wireguard_leases_and_options_as_flannel_writes_them() {
        let l = Lease::parse(&fixture("subnets_10.42.3.0-24&2001:cafe:42:3::-64.json")).unwrap();
        let d = l.wireguard_data(false).unwrap();
        assert_eq!(crate::keys::encode(&d.public_key), "kbxApAnJegIYTFGRnNmfvqDjedUI8BYSp7t0H+iPjys=");
        assert_eq!(d.port, 51820);
        assert_eq!(l.wireguard_data(true).unwrap().port, 51821);
        assert_eq!(WgData::from_value(&d.to_value()).unwrap(), d);
        let c = NetworkConfig::parse(&fixture("config-dualstack-wireguard.json")).unwrap();
        let o = c.wireguard_options().unwrap();
        assert_eq!((o.keepalive, o.listen_port, o.listen_port_v6, o.mode.as_str()), (25, 51820, 51821, "separate"));
        let bad =
            NetworkConfig::parse(br#"{"Network":"10.0.0.0/8","Backend":{"Type":"wireguard","Mode":"both"}}"#).unwrap();
        assert!(bad.wireguard_options().unwrap_err().to_string().contains("Backend.Mode"));
    }

    #[test]
    fn bad_lease_values_are_refused() {
        let bad_mac = br#"{"PublicIP":"192.168.77.2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz"}}"#;
        assert!(matches!(Lease::parse(bad_mac).unwrap().vxlan_data(false), Err(DatastoreError::Invalid { .. })));
        let big_vni = br#"{"PublicIP":"192.168.77.2","BackendType":"vxlan","BackendData":{"VNI":16777216,"VtepMAC":"0a:58:0a:f4:02:00"}}"#;
        assert!(Lease::parse(big_vni).unwrap().vxlan_data(false).is_err());
        assert!(Lease::parse(br#"{"PublicIP":"300.1.1.1","BackendType":"vxlan"}"#).is_err());
        assert!(Lease::parse(b"[]").is_err());
        assert!(StaticDatastore::parse(br#"{"config":{},"subnets":{"nope":{"BackendType":"vxlan"}}}"#).is_err());
    }

    #[test]
    fn static_file_round_trips() {
        let json = br#"{"config":{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}},
            "subnets":{"10.244.1.0-24":{"PublicIP":"192.168.77.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0a:58:0a:f4:01:00"}}}}"#;
        let ds = StaticDatastore::parse(json).unwrap();
        assert_eq!(StaticDatastore::parse(ds.to_json().as_bytes()).unwrap(), ds);
        let (key, _) = ds.lease_of("192.168.77.1".parse().unwrap()).unwrap();
        assert_eq!(key.to_string(), "10.244.1.0-24");
        assert!(ds.lease_of("192.168.77.9".parse().unwrap()).is_none());
    }

    #[test]
    fn subnet_env_matches_flannel() {
        // The shared fixture: dual-stack, first usable addresses.
        let key = SubnetKey::parse("10.42.3.0-24&2001:cafe:42:3::-64").unwrap();
        let env = subnet_env(
            Some("10.42.0.0/16".parse().unwrap()),
            &key,
            Some("2001:cafe:42::/56".parse().unwrap()),
            1420,
            true,
        );
        let expected =
            "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.3.1/24\nFLANNEL_IPV6_NETWORK=2001:cafe:42::/56\n\
                        FLANNEL_IPV6_SUBNET=2001:cafe:42:3::1/64\nFLANNEL_MTU=1420\nFLANNEL_IPMASQ=true\n";
        assert_eq!(env, expected);
        let fixture =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/subnet.env"))
                .unwrap();
        assert_eq!(env, fixture);
    }

    #[test]
    fn macs_round_trip() {
        assert_eq!(parse_mac("0a:58:0A:f4:01:00"), Some([0x0a, 0x58, 0x0a, 0xf4, 1, 0]));
        assert_eq!(format_mac(&[0x0a, 0x58, 0x0a, 0xf4, 1, 0]), "0a:58:0a:f4:01:00");
        for bad in ["", "0a:58:0a:f4:01", "0a:58:0a:f4:01:00:00", "0a-58-0a-f4-01-00", "0a:58:0a:f4:01:0"] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
