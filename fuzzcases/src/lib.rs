//! The invariants of weft's fuzz targets, one module per target, each with
//! `run(data: &[u8])` that panics when an input breaks one.
//!
//! `fuzz/` (cargo-fuzz, nightly) hands them libFuzzer's inputs; the replay
//! test (`tests/replay.rs`) hands them every input kept in the repository,
//! `fuzz/seeds/<target>/` and `fuzz/regressions/<target>/`, on the stable
//! toolchain, natively and under qemu-user for the Pi targets. An input a
//! campaign found to break a target goes to `fuzz/regressions/<target>/`
//! with its fix, and from then on every test run replays it.

#![forbid(unsafe_code)]

pub mod config_parsers;
pub mod kube_node;
pub mod segment;
pub mod socks5;
pub mod uapi_parse;
pub mod vnet_coalesce;
pub mod vxlan_decap;
pub mod wg_handshake;
pub mod wg_receive;

/// A target's invariant check: panics when `data` breaks it.
pub type Target = fn(&[u8]);

/// Every target by name (its directory under `fuzz/seeds/` and `fuzz/regressions/`).
pub const TARGETS: [(&str, Target); 9] = [
    ("config_parsers", config_parsers::run),
    ("kube_node", kube_node::run),
    ("segment", segment::run),
    ("socks5", socks5::run),
    ("uapi_parse", uapi_parse::run),
    ("vnet_coalesce", vnet_coalesce::run),
    ("vxlan_decap", vxlan_decap::run),
    ("wg_handshake", wg_handshake::run),
    ("wg_receive", wg_receive::run),
];
