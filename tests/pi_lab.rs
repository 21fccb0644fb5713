//! A Raspberry Pi node in the lab (root): the first node's agent is the
//! aarch64 (or armv7) weft binary under qemu-user, next to an x86 node, for
//! backends vxlan and wireguard-native on both; every usual check passes, and the
//! node reports its architecture. The Pi binaries (the node build) are
//! cross-built beside the test's weft (`cargo build --target
//! aarch64-unknown-linux-gnu --profile cross --no-default-features --bin
//! weft`, the same for armv7-unknown-linux-gnueabihf); `scripts/test` builds
//! them before the tests, and a missing one fails the test with that command.

mod common;

use common::{assert_all_passed, options, up, weft_bin};
use weft_lab::{self as lab, NodeArch};

fn emulated_lab(tag: &str, arch: NodeArch, backend: &str) {
    let mut o = options(tag);
    o.nodes = 2;
    o.backend = backend.into();
    // An emulated worker moves tens of Mbit/s: a small transfer says as much.
    o.transfer_mib = 4;
    o.emulated = Some(lab::emulated(arch, None, &weft_bin()).unwrap_or_else(|e| panic!("{e:#}")));
    let (lab, _g) = up(&o);
    let checks = lab.check();
    let arch_check = format!("agent of {} is an {} binary", lab.nodes[0].ns, arch.rust_arch());
    assert!(checks.iter().any(|c| c.name == arch_check && c.passed), "{}", lab::table(&checks));
    assert!(checks.iter().any(|c| c.name.starts_with("tcp 4 MiB")), "{}", lab::table(&checks));
    assert_all_passed(&lab, &checks);
    // The emulated agent serves its metrics like the others.
    let m = lab.metrics(&lab.nodes[0]).unwrap();
    assert!(m.get("weft_workers").is_some_and(|w| *w >= 1.0), "{m:?}");
}

#[test]
fn aarch64_node_carries_vxlan_pod_traffic() {
    emulated_lab("pa", NodeArch::Aarch64, "vxlan");
}

#[test]
fn aarch64_node_carries_wireguard_pod_traffic() {
    emulated_lab("pw", NodeArch::Aarch64, "wireguard-native");
}

#[test]
fn armv7_node_carries_vxlan_pod_traffic() {
    emulated_lab("pv", NodeArch::Armv7, "vxlan");
}

#[test]
fn armv7_node_carries_wireguard_pod_traffic() {
    emulated_lab("pg", NodeArch::Armv7, "wireguard-native");
}
