//! Every input kept for a fuzz target, through that target's invariants:
//! `fuzz/seeds/<target>/` (what a campaign starts from) and
//! `fuzz/regressions/<target>/` (inputs that once broke it). A target with
//! no kept input fails: its replay would check nothing.

use std::path::{Path, PathBuf};

fn kept_inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files: Vec<PathBuf> = ["seeds", "regressions"]
        .iter()
        .filter_map(|d| std::fs::read_dir(fuzz.join(d).join(target)).ok())
        .flat_map(|d| d.flatten().map(|e| e.path()))
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "README.md"))
        .collect();
    files.sort();
    files
}

fn replay(target: &str) {
    let run = weft_fuzz_cases::TARGETS.iter().find(|(n, _)| *n == target).expect("a known target").1;
    let inputs = kept_inputs(target);
    assert!(!inputs.is_empty(), "no kept input for {target} under fuzz/seeds or fuzz/regressions");
    for path in &inputs {
        let data = std::fs::read(path).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{target} broke on {}", path.display());
    }
}

#[test]
fn every_target_is_replayed_here() {
    let here = include_str!("replay.rs");
    for (name, _) in weft_fuzz_cases::TARGETS {
        assert!(here.contains(&format!("replay(\"{name}\")")), "{name} has no replay test");
    }
}

#[test]
fn config_parsers() {
    replay("config_parsers");
}

#[test]
fn kube_node() {
    replay("kube_node");
}

#[test]
fn segment() {
    replay("segment");
}

#[test]
fn socks5() {
    replay("socks5");
}

#[test]
fn uapi_parse() {
    replay("uapi_parse");
}

#[test]
fn vnet_coalesce() {
    replay("vnet_coalesce");
}

#[test]
fn vxlan_decap() {
    replay("vxlan_decap");
}

#[test]
fn wg_handshake() {
    replay("wg_handshake");
}

#[test]
fn wg_receive() {
    replay("wg_receive");
}
