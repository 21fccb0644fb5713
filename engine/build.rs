//! Builds the eBPF data plane's programs (`bpf/*.bpf.c`) with clang into
//! `OUT_DIR`, where `src/ebpf.rs` embeds them. BPF objects do not depend on
//! the target: one build serves every architecture weft is built for.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-env-changed=CLANG");
    let status = Command::new(&clang)
        .args(["-target", "bpfel", "-O2", "-g", "-Wall", "-Werror", "-Ibpf/include", "-c", "bpf/vxlan.bpf.c", "-o"])
        .arg(out.join("vxlan.bpf.o"))
        .status()
        .unwrap_or_else(|e| {
            panic!("running {clang} to build bpf/vxlan.bpf.c: {e} (scripts/setup installs clang and libbpf-dev)")
        });
    assert!(
        status.success(),
        "{clang} could not build bpf/vxlan.bpf.c ({status}); scripts/setup installs clang and libbpf-dev"
    );
}
