//! Shared helpers of the integration tests: unique lab names, cleanup guards.

#![allow(dead_code)]

pub mod vxlan;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use weft_lab::{self as lab, Lab, LabOptions};

/// The weft binary cargo built for these tests.
pub fn weft_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_weft"))
}

/// Fails loudly when not root: these tests build network namespaces.
pub fn require_root() {
    assert!(nix::unistd::Uid::effective().is_root(), "this test builds network namespaces and must run as root");
}

/// A lab name unique to this process and call.
pub fn unique_name(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("w{}{}{}", std::process::id() % 100_000, tag, N.fetch_add(1, Ordering::Relaxed))
}

/// Lab options with a unique name and a small transfer.
pub fn options(tag: &str) -> LabOptions {
    let mut o = LabOptions::new(&unique_name(tag), weft_bin());
    o.transfer_mib = 64;
    o
}

/// Removes the lab when dropped, also when the test panics.
pub struct Guard(pub String);

impl Drop for Guard {
    fn drop(&mut self) {
        lab::down(&self.0);
    }
}

/// Builds a lab and a guard that removes it.
pub fn up(opts: &LabOptions) -> (Lab, Guard) {
    require_root();
    let guard = Guard(opts.name.clone());
    let lab = lab::up(opts).unwrap_or_else(|e| panic!("lab {} did not come up: {e:#}", opts.name));
    (lab, guard)
}

/// Panics with the table and the agent logs unless every check passed.
pub fn assert_all_passed(lab: &Lab, checks: &[lab::Check]) {
    if !checks.iter().all(|c| c.passed) {
        panic!("{}\n{}", lab::table(checks), lab.agent_logs());
    }
}

/// Whether namespace `ns` has a route to `prefix`.
pub fn route_exists(ns: &str, prefix: &str) -> bool {
    !weft_lab::netns::run("ip", &["-n", ns, "route", "show", prefix]).unwrap().trim().is_empty()
}

/// Waits until `ok`, failing with `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node's agent log without the terminal's colour codes.
pub fn plain_log(lab: &Lab, n: &weft_lab::Node) -> String {
    let log = std::fs::read_to_string(lab.dir.join(format!("n{}.log", n.index))).unwrap_or_default();
    let mut plain = String::new();
    let mut in_escape = false;
    for c in log.chars() {
        match (in_escape, c) {
            (false, '\u{1b}') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, c) => plain.push(c),
        }
    }
    plain
}
