//! The `weft` command: `weft agent` runs a node's data plane, `weft lab`
//! builds a namespace cluster on this machine and checks it.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use weft::lab::{self, LabOptions};
use weft_control::config::AgentConfig;

#[derive(Parser)]
#[command(name = "weft", version, about = "Userspace pod-network data plane, compatible with Flannel")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run this node's data plane.
    Agent(AgentArgs),
    /// Build a cluster of network namespaces here, run agents, check pods talk.
    Lab(LabArgs),
    /// Measure pod-to-pod throughput, packet rate, latency and CPU per data plane.
    Bench(weft::bench::BenchArgs),
    /// A userspace WireGuard device, as `wireguard-go IFNAME` (also run as `weft-wg IFNAME`).
    Wg(weft::standalone::WgArgs),
}

/// `weft agent`'s arguments, parsed by [`agent_command`] (one flag per key).
#[derive(Args)]
#[command(disable_help_flag = true)]
struct AgentArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct LabArgs {
    #[command(subcommand)]
    action: Option<LabAction>,
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Backend of the weft nodes: vxlan, host-gw, wireguard-native or none.
    #[arg(long, default_value = "vxlan", value_parser = ["vxlan", "host-gw", "wireguard-native", "none"])]
    backend: String,
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
}

#[derive(Subcommand)]
enum LabAction {
    /// Remove a lab left running with --keep.
    Down {
        /// Lab name.
        #[arg(long, default_value = "weftlab")]
        name: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse_from(argv());
    let result = match cli.command {
        Command::Agent(a) => agent(a).map(|()| ExitCode::SUCCESS),
        Command::Lab(l) => run_lab(l),
        Command::Bench(b) => weft::bench::run(b),
        Command::Wg(w) => weft::standalone::run(w),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weft: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The command line; invoked as `weft-wg` (a symlink, the name wg-quick's
/// `WG_QUICK_USERSPACE_IMPLEMENTATION` is given), it is `weft wg ...`.
fn argv() -> Vec<std::ffi::OsString> {
    let mut args: Vec<_> = std::env::args_os().collect();
    let invoked = args.first().map(std::path::Path::new).and_then(|p| p.file_name()).map(|n| n.to_owned());
    if invoked.as_deref() == Some(std::ffi::OsStr::new(WG_NAME)) {
        args[0] = "weft".into();
        args.insert(1, "wg".into());
    }
    args
}

/// The name under which the binary acts as `weft wg`.
const WG_NAME: &str = "weft-wg";

/// The agent's command line: `--config FILE`, and every config key as a flag.
fn agent_command() -> clap::Command {
    let mut cmd = clap::Command::new("weft agent")
        .about("Run this node's data plane. Every config key is also a flag; flags override the file.")
        .arg(clap::Arg::new("config").long("config").value_name("FILE").help("YAML file of config keys"));
    for (key, help) in AgentConfig::keys() {
        cmd = cmd.arg(clap::Arg::new(*key).long(*key).value_name("VALUE").help(*help));
    }
    cmd
}

fn agent(a: AgentArgs) -> anyhow::Result<()> {
    let m = agent_command()
        .try_get_matches_from(std::iter::once("weft agent".to_string()).chain(a.args))
        .unwrap_or_else(|e| e.exit());
    let mut pairs = match m.get_one::<String>("config") {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
            AgentConfig::pairs_from_yaml(&text)?
        }
        None => BTreeMap::new(),
    };
    for (key, _) in AgentConfig::keys() {
        if let Some(v) = m.get_one::<String>(key) {
            pairs.insert(key.to_string(), v.clone());
        }
    }
    let cfg = AgentConfig::from_pairs(&pairs)?;
    weft::agent::run(cfg)
}

fn run_lab(l: LabArgs) -> anyhow::Result<ExitCode> {
    if let Some(LabAction::Down { name }) = l.action {
        lab::down(&name);
        println!("lab {name} removed");
        return Ok(ExitCode::SUCCESS);
    }
    if !lab::valid_name(&l.name) {
        anyhow::bail!("--name {}: 1 to 16 letters, digits or '_'", l.name);
    }
    if !nix::unistd::Uid::effective().is_root() {
        anyhow::bail!("weft lab creates network namespaces: run it as root");
    }
    let mut opts = LabOptions::new(&l.name, std::env::current_exe()?);
    opts.nodes = l.nodes;
    opts.backend = l.backend;
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

    // Ctrl-C or SIGTERM: remove everything, then leave.
    let name = opts.name.clone();
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            eprintln!("\ninterrupted: removing lab {name}");
            lab::down(&name);
            std::process::exit(130);
        }
    });

    println!(
        "building lab {}: {} nodes{}",
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
    let lab = lab::up(&opts)?;
    let checks = lab.check();
    print!("{}", lab::table(&checks));
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
        lab::down(&opts.name);
    }
    Ok(if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
