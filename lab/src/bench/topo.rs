//! The two-node, two-pod topology of each `weft bench` mode.
//!
//! ```text
//!                underlay namespace <name>-ul: bridge br0 (veths MTU 1500)
//!              ┌──────────────────────┴──────────────────────┐
//!   <name>-n1 eth0 192.168.77.1                   <name>-n2 eth0 192.168.77.2
//!   tunnel: weft agent | flannel.1 |              tunnel: the same as node 1
//!           wireguard-go | boringtun-cli | none (host-gw)
//!   cni0 10.244.1.1/24 (CNI bridge)               cni0 10.244.2.1/24
//!        │                                             │
//!   <name>-n1p1 10.244.1.2  ── iperf3 -c, ping ──>  <name>-n2p1 10.244.2.2 (iperf3 -s, echo)
//! ```
//!
//! weft and host-gw modes are `weft lab` topologies ([`crate::up`]); kernel
//! VXLAN and the userspace WireGuard anchors run the same tunnel on both
//! nodes, which the lab does not do, so they are built here from the lab's
//! plan, names, state directory and node setups (the lab's kernel Flannel
//! node, userspace WireGuard peer and CNI attach, on every node):
//! [`crate::down`] removes either kind.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::report::CpuSource;
use super::Mode;
use crate::namespaces::{attach_pods, build_underlay, wg_key_path};
use crate::netns::{self, exec};
use crate::peers::{kernel_flannel_node, userspace_wg_node};
use crate::{Lab, LabOptions, NodeKind, Pod, STATE_ROOT};

/// A built topology: the lab, and what runs its tunnel.
#[derive(Debug)]
pub struct Topology {
    /// The nodes and pods.
    pub lab: Lab,
    /// Processes that carry the tunnel (empty for kernel data planes).
    pub tunnel_pids: Vec<i32>,
    /// What the CPU figure of this mode counts.
    pub cpu_source: CpuSource,
}

impl Topology {
    /// The sending pod (node 1) and the receiving pod (node 2).
    pub fn pods(&self) -> (&Pod, &Pod) {
        (&self.lab.nodes[0].pods[0], &self.lab.nodes[1].pods[0])
    }

    /// The receiving pod's IPv4 address.
    pub fn target(&self) -> anyhow::Result<IpAddr> {
        self.pods().1.ip(false).context("the receiving pod has no IPv4 address")
    }

    /// The tail of the tunnel processes' logs, for error reports.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.lab.nodes {
            if let Ok(log) = std::fs::read_to_string(self.lab.dir.join(format!("n{}.log", n.index))) {
                let tail: Vec<&str> = log.lines().rev().take(6).collect();
                out += &format!("\n--- {} ---\n{}", n.ns, tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
        }
        out
    }
}

/// Builds `mode`'s topology named `name`; on failure removes what it made.
pub fn up(
    mode: Mode,
    name: &str,
    weft_bin: &Path,
    threads: Option<usize>,
    busy_poll_us: Option<u32>,
) -> anyhow::Result<Topology> {
    let mut opts = LabOptions::new(name, weft_bin.to_path_buf());
    opts.nodes = 2;
    opts.pods_per_node = 1;
    opts.threads = threads;
    opts.busy_poll_us = busy_poll_us;
    let lab = match mode {
        Mode::WeftVxlan | Mode::WeftVxlanEbpf | Mode::WeftWireguard | Mode::KernelHostgw => {
            if mode == Mode::WeftVxlanEbpf {
                opts.dataplane = Some("ebpf".into());
            }
            opts.backend = match mode {
                Mode::WeftVxlan | Mode::WeftVxlanEbpf => "vxlan",
                Mode::WeftWireguard => "wireguard-native",
                _ => "host-gw",
            }
            .into();
            crate::up(&opts)?
        }
        Mode::KernelVxlan | Mode::WireguardGo | Mode::Boringtun => {
            if mode != Mode::KernelVxlan {
                opts.backend = "wireguard-native".into();
                opts.wg_peer = Some(mode.name().into());
            }
            let mut nodes = crate::plan(&opts)?;
            for n in &mut nodes {
                n.kind = if mode == Mode::KernelVxlan { NodeKind::KernelVxlan } else { NodeKind::UserspaceWg };
            }
            let mut lab = Lab { opts, nodes, dir: Path::new(STATE_ROOT).join(name), kube: None, rootless: None };
            if let Err(e) = build(&mut lab, mode) {
                let logs = Topology { lab, tunnel_pids: Vec::new(), cpu_source: CpuSource::SystemSoftirq }.logs();
                crate::down(name);
                return Err(e.context(logs));
            }
            lab
        }
    };
    let tunnel_pids = match mode {
        // The eBPF data plane's work is the kernel's (softirq), not the
        // agents': measured like the kernel modes.
        Mode::KernelHostgw | Mode::KernelVxlan | Mode::WeftVxlanEbpf => Vec::new(),
        _ => (1..=2)
            .map(|i| {
                let p = lab.dir.join(format!("n{i}.pid"));
                std::fs::read_to_string(&p).ok().and_then(|s| s.trim().parse().ok()).context("tunnel pid")
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let cpu_source = if tunnel_pids.is_empty() { CpuSource::SystemSoftirq } else { CpuSource::Processes };
    let topo = Topology { lab, tunnel_pids, cpu_source };
    let (a, b) = topo.pods();
    if let Err(e) = wait_reachable(a, b, Duration::from_secs(20)) {
        let logs = topo.logs();
        down(&topo);
        return Err(e.context(logs));
    }
    Ok(topo)
}

/// Removes a topology (its processes, namespaces, state and UAPI sockets).
pub fn down(topo: &Topology) {
    crate::down(&topo.lab.opts.name);
    if topo.lab.opts.wg_peer.is_some() || topo.lab.opts.backend == "wireguard-native" {
        for n in &topo.lab.nodes {
            let sock = Path::new("/var/run/wireguard").join(format!("{}.sock", crate::wg_ifname(&topo.lab, n)));
            let _ = std::fs::remove_file(sock);
        }
    }
}

/// Pings `b` from `a` until it answers, for at most `limit`.
fn wait_reachable(a: &Pod, b: &Pod, limit: Duration) -> anyhow::Result<()> {
    let to = b.ip(false).context("the receiving pod has no IPv4 address")?.to_string();
    let start = Instant::now();
    loop {
        match exec(&a.ns, "ping", &["-c", "1", "-W", "1", "-q", &to]) {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() > limit => {
                return Err(e.context(format!("{} does not reach {to} after {limit:?}", a.ns)))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn build(lab: &mut Lab, mode: Mode) -> anyhow::Result<()> {
    let name = lab.opts.name.clone();
    if netns::exists(&format!("{name}-ul")) {
        bail!("a topology named {name} exists already");
    }
    if lab.nodes.iter().any(|n| n.ip4.is_none()) {
        bail!("bench topologies are IPv4");
    }
    build_underlay(lab)?;
    if mode != Mode::KernelVxlan {
        for n in &mut lab.nodes {
            let private = weft_control::keys::load_or_create(&wg_key_path(&lab.dir, n.index))?;
            n.wg_public = Some(weft_uapi::Key(private).public_key().0);
        }
    }
    // Which userspace WireGuard the lab's peer setup runs.
    lab.opts.wg_peer = match mode {
        Mode::Boringtun => Some("boringtun".into()),
        Mode::WireguardGo => Some("wireguard-go".into()),
        _ => None,
    };
    for n in &lab.nodes {
        match mode {
            Mode::KernelVxlan => kernel_flannel_node(lab, n)?,
            _ => userspace_wg_node(lab, n)?,
        }
    }
    for i in 0..lab.nodes.len() {
        let ips = attach_pods(lab, &lab.nodes[i])?;
        for (pod, ips) in lab.nodes[i].pods.iter_mut().zip(ips) {
            pod.ips = ips;
        }
    }
    Ok(())
}
