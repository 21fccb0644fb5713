//! The `weft` command: `weft agent` runs a node's data plane (the `weft`
//! crate), `weft wg` a plain userspace WireGuard device (the `weft` crate),
//! `weft lab` builds a namespace cluster on this machine and checks it, and
//! `weft bench` measures data planes on one (both `weft-lab`, feature
//! `lab`, on by default; a node's binary is built without). This file
//! only parses the command line and calls into those crates.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
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
    #[cfg(feature = "lab")]
    Lab(weft_lab::LabArgs),
    /// Measure pod-to-pod throughput, packet rate, latency and CPU per data plane.
    #[cfg(feature = "lab")]
    Bench(weft_lab::bench::BenchArgs),
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse_from(argv());
    let result = match cli.command {
        Command::Agent(a) => agent(a).map(|()| ExitCode::SUCCESS),
        #[cfg(feature = "lab")]
        Command::Lab(l) => weft_lab::run(l),
        #[cfg(feature = "lab")]
        Command::Bench(b) => weft_lab::bench::run(b),
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
