//! `weft lab`'s command line: its flags, and the run that builds a lab,
//! prints its checks and removes it. The `weft` binary only parses and
//! calls [`run`].

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::LabOptions;

/// `weft lab`'s flags.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LabArgs {
    #[command(subcommand)]
    action: Option<LabAction>,
    /// Number of nodes (default 3; with --multicloud one per cloud, one
    /// more in the first, and the home node).
    #[arg(long)]
    nodes: Option<usize>,
    /// Backend of the weft nodes: vxlan (default), host-gw, wireguard-native
    /// or none; with --multicloud wireguard-native (the only one allowed).
    #[arg(long, value_parser = ["vxlan", "host-gw", "wireguard-native", "none"])]
    backend: Option<String>,
    /// Pod network(s), K3s style: `10.42.0.0/16`, `2001:cafe:42::/56`, or both comma separated.
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: String,
    /// Service network(s), K3s style; checked against the pod networks.
    #[arg(long)]
    service_cidr: Option<String>,
    /// Where leases live: file (a static datastore), etcd (a server the lab runs) or kube (Node
    /// annotations in an API server stand-in the lab runs).
    #[arg(long, default_value = "file", value_parser = ["file", "etcd", "kube"])]
    datastore: String,
    /// With --datastore etcd: etcd over TLS with client certificates (made for the lab).
    #[arg(long)]
    etcd_tls: bool,
    /// With --datastore etcd: etcd with user root, a password and authentication on.
    #[arg(long)]
    etcd_auth: bool,
    /// Node subnet size for IPv4.
    #[arg(long, default_value_t = 24)]
    node_cidr_mask_size_ipv4: u8,
    /// Node subnet size for IPv6.
    #[arg(long, default_value_t = 64)]
    node_cidr_mask_size_ipv6: u8,
    /// Leave the lab running and print how to enter a pod.
    #[arg(long)]
    keep: bool,
    /// Run the last node without weft, as a real peer: kernel-vxlan, wireguard-go or boringtun.
    #[arg(long, value_parser = ["kernel-vxlan", "wireguard-go", "boringtun"])]
    peer: Option<String>,
    /// Lab name: prefix of its namespaces.
    #[arg(long, default_value = "weftlab")]
    name: String,
    /// Pods per node.
    #[arg(long, default_value_t = 1)]
    pods: usize,
    /// Worker threads per agent (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Size of the TCP check, in MiB.
    #[arg(long, default_value_t = 64)]
    transfer_mib: usize,
    /// The agents' `ip-masq`: masquerade pod traffic leaving the cluster.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ip_masq: bool,
    /// The agents' `flannel-ipv6-masq`, when the lab has IPv6.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    flannel_ipv6_masq: bool,
    /// Run the first node's agent as a Raspberry Pi binary under qemu-user:
    /// aarch64 or armv7 (build it first: `cargo build --target <triple>`).
    #[arg(long, value_parser = ["aarch64", "armv7"])]
    node_arch: Option<String>,
    /// With --node-arch: the weft binary built for it (default: the one
    /// beside this binary, `target/<triple>/<profile>/weft`).
    #[arg(long, requires = "node_arch")]
    node_bin: Option<std::path::PathBuf>,
    /// Nodes in separate private networks ("clouds") behind NAT gateways,
    /// joined over an internet bridge by their external addresses
    /// (`node-external-ip`, `flannel-external-ip`); wireguard-native, file or etcd.
    #[arg(long)]
    multicloud: bool,
    /// With --multicloud: how many clouds.
    #[arg(long, default_value_t = 2, requires = "multicloud")]
    clouds: usize,
    /// With --multicloud: one more node at home, behind a masquerading
    /// router, with no address anyone can reach.
    #[arg(long, requires = "multicloud")]
    nat_node: bool,
    /// With --multicloud: a cloud's underlay MTU, `K=MTU` (cloud K from 1),
    /// repeatable.
    #[arg(long, requires = "multicloud")]
    cloud_mtu: Vec<String>,
    /// With --multicloud: nodes announce their cloud as `node-location`, so
    /// nodes of one cloud talk in it rather than through its NAT.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, requires = "multicloud")]
    locations: bool,
    /// A relay on the first node's underlay link that impairs UDP in both
    /// directions: `loss=10%,reorder=5%,duplicate=1%,delay=5ms,jitter=2ms,seed=N`
    /// (any subset; the same seed gives every datagram the same fate).
    #[arg(long)]
    impair: Option<String>,
    /// One more node, without pods, whose agent runs rootless (no TUN, no
    /// capabilities) as a user the lab makes; reached through its SOCKS5 server.
    #[arg(long)]
    rootless: bool,
    /// The weft nodes' data plane with --backend vxlan: ebpf (tcx programs,
    /// the engine as the slow path), userspace or auto.
    #[arg(long, value_parser = ["ebpf", "userspace", "auto"])]
    dataplane: Option<String>,
}

/// `--cloud-mtu K=MTU` values as MTUs by cloud (index K - 1).
fn cloud_mtus(values: &[String], clouds: usize) -> anyhow::Result<Vec<u32>> {
    let mut mtus = vec![crate::UNDERLAY_MTU; clouds];
    for v in values {
        let parsed =
            v.split_once('=').and_then(|(k, m)| Some((k.trim().parse::<usize>().ok()?, m.trim().parse::<u32>().ok()?)));
        match parsed {
            Some((k, m)) if (1..=clouds).contains(&k) && (1280..=9000).contains(&m) => mtus[k - 1] = m,
            _ => anyhow::bail!("--cloud-mtu {v}: K=MTU with K a cloud from 1 to {clouds} and MTU from 1280 to 9000"),
        }
    }
    Ok(mtus)
}

/// `weft lab`'s actions besides building one.
#[derive(Subcommand)]
pub enum LabAction {
    /// Remove a lab left running with --keep.
    Down {
        /// Lab name.
        #[arg(long, default_value = "weftlab")]
        name: String,
    },
    /// The impairment relay of `--impair`, which the lab starts itself.
    #[command(hide = true)]
    Relay {
        #[arg(long)]
        node_tap: String,
        #[arg(long)]
        underlay_tap: String,
        #[arg(long)]
        impair: String,
        #[arg(long)]
        stats: std::path::PathBuf,
    },
}

/// Runs `weft lab`: builds the lab, prints its checks, removes it (unless
/// `--keep`); exits 0 only if every check passed.
pub fn run(l: LabArgs) -> anyhow::Result<ExitCode> {
    match l.action {
        Some(LabAction::Down { name }) => {
            crate::down(&name);
            println!("lab {name} removed");
            return Ok(ExitCode::SUCCESS);
        }
        Some(LabAction::Relay { node_tap, underlay_tap, impair, stats }) => {
            crate::impair::relay(&node_tap, &underlay_tap, &impair.parse()?, &stats)?;
            return Ok(ExitCode::SUCCESS);
        }
        None => {}
    }
    if !crate::valid_name(&l.name) {
        anyhow::bail!("--name {}: 1 to 16 letters, digits or '_'", l.name);
    }
    if !nix::unistd::Uid::effective().is_root() {
        anyhow::bail!("weft lab creates network namespaces: run it as root");
    }
    let mut opts = LabOptions::new(&l.name, std::env::current_exe()?);
    opts.nodes = l.nodes.unwrap_or(if l.multicloud { l.clouds + 1 + l.nat_node as usize } else { 3 });
    if l.multicloud {
        opts.multicloud = Some(crate::Multicloud {
            clouds: l.clouds,
            nat_node: l.nat_node,
            mtus: cloud_mtus(&l.cloud_mtu, l.clouds)?,
            locations: l.locations,
        });
    }
    opts.backend = l.backend.unwrap_or_else(|| if l.multicloud { "wireguard-native" } else { "vxlan" }.into());
    opts.kernel_peer = l.peer.as_deref() == Some("kernel-vxlan");
    opts.wg_peer = l.peer.clone().filter(|p| p != "kernel-vxlan");
    opts.pods_per_node = l.pods.max(1);
    opts.threads = l.threads;
    opts.transfer_mib = l.transfer_mib.max(1);
    opts.cluster_cidrs = l
        .cluster_cidr
        .split(',')
        .map(|c| c.trim().parse().with_context(|| format!("--cluster-cidr {}: a network in CIDR form", l.cluster_cidr)))
        .collect::<anyhow::Result<_>>()?;
    opts.node_mask_v4 = l.node_cidr_mask_size_ipv4;
    opts.node_mask_v6 = l.node_cidr_mask_size_ipv6;
    if let Some(sc) = &l.service_cidr {
        opts.service_cidrs = sc
            .split(',')
            .map(|c| c.trim().parse().with_context(|| format!("--service-cidr {sc}: a network in CIDR form")))
            .collect::<anyhow::Result<_>>()?;
    }
    opts.datastore = l.datastore;
    opts.ip_masq = l.ip_masq;
    opts.ipv6_masq = l.flannel_ipv6_masq;
    opts.etcd_tls = l.etcd_tls;
    opts.etcd_auth = l.etcd_auth;
    opts.impair = l.impair.as_deref().map(str::parse).transpose()?;
    opts.rootless = l.rootless;
    opts.dataplane = l.dataplane.clone();
    if let Some(a) = &l.node_arch {
        opts.emulated = Some(crate::emulated(crate::NodeArch::parse(a)?, l.node_bin.clone(), &opts.weft_bin)?);
    }

    // Ctrl-C or SIGTERM: remove everything, then leave.
    let name = opts.name.clone();
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            eprintln!("\ninterrupted: removing lab {name}");
            crate::down(&name);
            std::process::exit(130);
        }
    });

    let arm = opts
        .emulated
        .as_ref()
        .map(|e| format!(", the first one's agent {} under qemu-user ({})", e.arch.rust_arch(), e.bin.display()))
        .unwrap_or_default();
    let clouds = opts
        .multicloud
        .as_ref()
        .map(|m| {
            format!(" in {} clouds behind NAT{}", m.clouds, if m.nat_node { ", the last one at home" } else { "" })
        })
        .unwrap_or_default();
    println!(
        "building lab {}: {} nodes{clouds}{arm}{}",
        opts.name,
        opts.nodes,
        if opts.kernel_peer {
            ", the last one a kernel Flannel node"
        } else if let Some(p) = &opts.wg_peer {
            if p == "boringtun" {
                ", the last one boringtun-cli"
            } else {
                ", the last one wireguard-go"
            }
        } else {
            ""
        }
    );
    if let Some(i) = &opts.impair {
        println!("the first node's underlay link impaired: {i}");
    }
    if opts.rootless {
        println!("and one rootless node, its agent run as user {}", crate::rootless::user(&opts.name));
    }
    let lab = crate::up(&opts)?;
    let checks = lab.check();
    print!("{}", crate::table(&checks));
    let passed = checks.iter().all(|c| c.passed);
    println!("{}", if passed { "all checks passed" } else { "some checks FAILED" });
    if !passed {
        eprintln!("{}", lab.agent_logs());
    }
    if l.keep {
        let pod = &lab.nodes[0].pods[0];
        println!("lab {} left running. Enter a pod:  ip netns exec {} bash", opts.name, pod.ns);
        println!("remove it with:  weft lab down --name {}", opts.name);
    } else {
        crate::down(&opts.name);
    }
    Ok(if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
