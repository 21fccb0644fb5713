//! Helpers for labs and tests: run commands, enter network namespaces.
//!
//! The lab builds its topology with `ip` and `bridge` (simpler than netlink
//! for veth pairs across namespaces); the agent itself never runs them.
//! [`in_netns`] runs a closure on a thread that has joined a namespace, so the
//! lab can open sockets inside pods without spawning helper processes.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

/// Runs `program args...`, returning stdout; fails with stderr on a non-zero exit.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip args...`.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args).map(|_| ())
}

/// Runs `program args...` inside namespace `ns`.
pub fn exec(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// Sets a sysctl inside namespace `ns` (`net.ipv4.ip_forward` and the like).
pub fn sysctl(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    exec(ns, "sysctl", &["-qw", &format!("{key}={value}")]).map(|_| ())
}

/// Names of the network namespaces that exist.
pub fn list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| d.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default()
}

/// Whether namespace `ns` exists.
pub fn exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

/// Runs `f` on a new thread that has joined network namespace `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    spawn_in_netns(ns, f)?.join().map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))
}

/// Starts `f` on a new thread that has joined network namespace `ns`.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<T>> {
    let file =
        std::fs::File::open(Path::new("/run/netns").join(ns)).with_context(|| format!("opening namespace {ns}"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        // A thread may switch its own network namespace; sockets it opens
        // afterwards live there.
        if let Err(e) = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET) {
            let _ = tx.send(Err(e));
            panic!("setns failed");
        }
        let _ = tx.send(Ok(()));
        f()
    });
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => bail!("entering namespace {ns}: {e}"),
        Err(_) => bail!("entering namespace {ns}: thread died"),
    }
}

/// What a command run by [`exec_timeout`] left.
#[derive(Debug, Clone)]
pub struct Output {
    /// Whether it exited with status 0.
    pub success: bool,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

/// Runs `program args...` inside namespace `ns`; kills it and fails if it
/// runs longer than `limit`. A non-zero exit is not an error here: the
/// caller reads [`Output::success`] and the output (iperf3 writes its
/// errors into its JSON).
pub fn exec_timeout(ns: &str, program: &str, args: &[&str], limit: std::time::Duration) -> anyhow::Result<Output> {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program} in {ns}"))?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{program} {}` in {ns} ran longer than {limit:?}: killed", args.join(" "));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    Ok(Output { success: status.success(), stdout, stderr })
}

/// The kernel's TCP extended counters in namespace `ns` (`TcpExt:` of
/// `/proc/net/netstat`, which is per namespace), by name.
pub fn tcp_ext(ns: &str) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    parse_tcp_ext(&exec(ns, "cat", &["/proc/net/netstat"])?)
}

/// `TcpExt:` of a `/proc/net/netstat` text: a line of names, then a line
/// of values.
pub fn parse_tcp_ext(text: &str) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        anyhow::bail!("no TcpExt lines in /proc/net/netstat");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .map(|(n, v)| Ok((n.to_string(), v.parse::<u64>().map_err(|e| anyhow::anyhow!("TcpExt {n}: {e}"))?)))
        .collect()
}

/// Reordering the TCP senders in `ns` detected (by SACK, timestamps or
/// duplicate ACKs) in `after` against `before`, both [`tcp_ext`] readings.
pub fn reorder_events(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> u64 {
    ["TCPSACKReorder", "TCPTSReorder", "TCPRenoReorder"]
        .iter()
        .map(|k| after.get(*k).unwrap_or(&0).saturating_sub(*before.get(*k).unwrap_or(&0)))
        .sum()
}

#[cfg(test)]
mod tcp_ext_tests {
    use super::*;

    #[test]
    fn tcp_ext_takes_names_and_values_and_reorders_add_up() {
        let text = "TcpExt: SyncookiesSent TCPSACKReorder TCPTSReorder TCPOFOQueue\nTcpExt: 0 3 1 7\nIpExt: InNoRoutes\nIpExt: 0\n";
        let m = parse_tcp_ext(text).unwrap();
        assert_eq!(m.get("TCPOFOQueue"), Some(&7));
        assert_eq!(m.len(), 4);
        let mut later = m.clone();
        later.insert("TCPSACKReorder".into(), 5);
        later.insert("TCPRenoReorder".into(), 2);
        assert_eq!(reorder_events(&m, &later), 4);
        assert!(parse_tcp_ext("IpExt: a\nIpExt: 1\n").is_err());
    }
}
