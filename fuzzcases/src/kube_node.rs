//! Arbitrary bytes as a Node object from the API server, through the
//! Kubernetes subnet manager's readers.
//!
//! Invariants: nothing panics; a lease read from a Node lies inside the
//! network's families and ranges; the annotations weft would write for
//! that lease, put on a Node with the same pod CIDRs, read back as the same
//! lease and need no further patch (the write/read round trip).

use k8s_openapi::api::core::v1::Node;
use weft_control::datastore::NetworkConfig;
use weft_control::kube;

/// Runs one input through the invariants above; panics on a broken one.
pub fn run(data: &[u8]) {
    let Ok(node) = serde_json::from_slice::<Node>(data) else { return };
    let net = NetworkConfig::for_cluster(
        Some(("10.42.0.0/16".parse().unwrap(), 24)),
        Some(("2001:cafe:42::/56".parse().unwrap(), 64)),
        "vxlan",
    );
    let _ = kube::public_ip_overrides(&node);
    let _ = kube::network_available(&node);
    let Ok(Some((key, lease))) = kube::node_lease(&node, &net) else { return };
    assert!(key.v4.is_some_and(|n| net.network.unwrap().contains(&n)));
    assert!(key.v6.is_some_and(|n| net.ipv6_network.unwrap().contains(&n)));
    let mut again = Node { spec: node.spec.clone(), ..Default::default() };
    again.metadata.annotations = Some(kube::lease_annotations(&lease));
    let (k2, l2) = kube::node_lease(&again, &net).expect("our own annotations parse").expect("and are a lease");
    assert_eq!((k2, &l2), (key, &lease));
    assert_eq!(kube::annotation_patch(&again, &lease), None);
}
