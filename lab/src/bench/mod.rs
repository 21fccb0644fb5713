//! `weft bench`: pod-to-pod figures for each data plane, side by side, in
//! one run on one machine (root).
//!
//! For each mode, one after the other, on a fresh two-node topology
//! ([`topo`]): wait for the machine to be quiet, then per repetition TCP
//! with 1 and 4 streams, 64-byte UDP as fast as iperf3 sends, and a UDP
//! ping-pong for round trips; CPU of the tunnel is sampled in the middle of
//! the 1-stream TCP test. The medians go to a table on stdout (with each
//! mode's ratio to kernel VXLAN), and on request to JSON and an SVG chart.
//! It measures; it judges nothing: targets are read off the table by people.

pub mod footprint;
pub mod measure;
pub mod report;
pub mod rootless;
pub mod soak;
pub mod topo;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};

use measure::{CpuSpan, CpuUse, Echo, IperfServer, IperfTest};
use report::{Figures, Machine, ModeResult, Outcome, Settings};
use topo::Topology;

/// `weft bench`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Modes to run, comma separated, in this order: weft-vxlan, weft-vxlan-ebpf, weft-wireguard, kernel-hostgw,
    /// kernel-vxlan, wireguard-go, boringtun (default: all; the last two when installed).
    #[arg(long)]
    pub modes: Option<String>,
    /// Seconds per measurement (default 10; 2 with --quick).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Repetitions of each measurement; the median is reported (default 3; 1 with --quick).
    #[arg(long)]
    pub reps: Option<usize>,
    /// Write the figures, the machine and the commit as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write an SVG bar chart (a panel per metric, a bar per mode) to this file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// About 2 s per measurement and one repetition: checks the harness, for CI.
    #[arg(long)]
    pub quick: bool,
    /// Worker threads per weft agent (default: the agent's, one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// The weft agents' busy-poll-us: microseconds a worker keeps polling
    /// after its last packet (default: the agent's, 0). Trades CPU for
    /// round-trip time; the report says what was used.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub busy_poll_us: Option<u32>,
    /// Prefix of every namespace the bench creates.
    #[arg(long, default_value = "weftbench")]
    pub name: String,
    /// Instead of throughput: memory and wakeups at rest of `weft wg` (100
    /// peers) beside wireguard-go and boringtun-cli, and of the agent; the
    /// stripped binary's size.
    #[arg(long)]
    pub footprint: bool,
    /// With --footprint: seconds wakeups are counted over (default 60; 10 with --quick).
    #[arg(long)]
    pub window: Option<u64>,
    /// Instead of throughput: a three-node lab under mixed traffic (bulk
    /// TCP, small UDP, short connections, peers joining and leaving) for
    /// MINUTES, its agents sampled; fails on growth or any drop.
    #[arg(long, value_name = "MINUTES")]
    pub soak: Option<f64>,
    /// Instead of the pod-to-pod modes: the weft-rootless mode, a rootless
    /// node's userspace stack (pod to SOCKS5 client, TCP 1 stream, and round
    /// trips) beside the TUN path of the same run.
    #[arg(long)]
    pub rootless: bool,
    /// With --rootless: the agents' backend.
    #[arg(long, default_value = "vxlan", value_parser = ["vxlan", "wireguard-native"])]
    pub rootless_backend: String,
    /// With --soak: the agents' backend.
    #[arg(long, default_value = "wireguard-native", value_parser = ["vxlan", "wireguard-native"])]
    pub soak_backend: String,
}

/// A data plane `weft bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Two weft agents, backend vxlan.
    WeftVxlan,
    /// Two weft agents, backend wireguard-native.
    WeftWireguard,
    /// weft's VXLAN with `dataplane: ebpf`: tcx programs encapsulate and
    /// decapsulate in the kernel.
    WeftVxlanEbpf,
    /// Plain routes between the nodes (weft agents, backend host-gw): the ceiling.
    KernelHostgw,
    /// The kernel's VXLAN device on both nodes, laid out as Flannel lays it out.
    KernelVxlan,
    /// wireguard-go on both nodes, configured with `wg`.
    WireguardGo,
    /// boringtun-cli on both nodes, configured with `wg`.
    Boringtun,
}

impl Mode {
    /// Every mode, in the default order.
    pub const ALL: [Mode; 7] = [
        Mode::WeftVxlan,
        Mode::WeftVxlanEbpf,
        Mode::WeftWireguard,
        Mode::KernelHostgw,
        Mode::KernelVxlan,
        Mode::WireguardGo,
        Mode::Boringtun,
    ];

    /// The mode's name on the command line and in the reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::WeftVxlan => "weft-vxlan",
            Mode::WeftVxlanEbpf => "weft-vxlan-ebpf",
            Mode::WeftWireguard => "weft-wireguard",
            Mode::KernelHostgw => "kernel-hostgw",
            Mode::KernelVxlan => "kernel-vxlan",
            Mode::WireguardGo => "wireguard-go",
            Mode::Boringtun => "boringtun",
        }
    }

    /// Parses `--modes` (pure): names comma separated, or `all`; no repeats.
    pub fn parse_list(s: &str) -> anyhow::Result<Vec<Mode>> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part == "all" {
                out.extend(Mode::ALL.iter().filter(|m| !out.contains(*m)).collect::<Vec<_>>());
                continue;
            }
            let m = Mode::ALL.into_iter().find(|m| m.name() == part).with_context(|| {
                let names: Vec<&str> = Mode::ALL.iter().map(|m| m.name()).collect();
                format!("--modes: unknown mode `{part}`; accepted: {} or all", names.join(", "))
            })?;
            if !out.contains(&m) {
                out.push(m);
            }
        }
        if out.is_empty() {
            bail!("--modes: name at least one mode");
        }
        Ok(out)
    }

    /// Why the mode cannot run on this machine, if it cannot.
    fn unavailable(self) -> Option<String> {
        let needs: &[&str] = match self {
            Mode::WireguardGo => &["wireguard-go", "wg"],
            Mode::Boringtun => &["boringtun-cli", "wg"],
            _ => &[],
        };
        let missing: Vec<&str> = needs.iter().copied().filter(|p| crate::find_program(p).is_none()).collect();
        (!missing.is_empty()).then(|| format!("{} not installed", missing.join(" and ")))
    }
}

/// Idle share of the machine, in %, that counts as quiet.
const QUIET_IDLE_PCT: f64 = 90.0;

/// Runs the benchmark.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if !crate::valid_name(&args.name) {
        bail!("--name {}: 1 to 16 letters, digits or '_'", args.name);
    }
    let modes = match &args.modes {
        Some(s) => Mode::parse_list(s)?,
        None => Mode::ALL.to_vec(),
    };
    let settings = Settings {
        duration_s: args.duration.unwrap_or(if args.quick { 2 } else { 10 }).max(1),
        reps: args.reps.unwrap_or(if args.quick { 1 } else { 3 }).max(1),
        quick: args.quick,
        threads: args.threads,
        busy_poll_us: args.busy_poll_us,
    };
    if !nix::unistd::Uid::effective().is_root() {
        bail!("weft bench creates network namespaces: run it as root");
    }
    if args.footprint {
        return run_footprint(&args);
    }
    if let Some(minutes) = args.soak {
        if !(0.1..=1440.0).contains(&minutes) {
            bail!("--soak {minutes}: minutes from 0.1 to 1440");
        }
        let weft_bin = std::env::current_exe().context("finding the weft binary")?;
        remove_on_signal(&args.name)?;
        crate::down(&args.name);
        let m = machine();
        println!("machine: {}, {} cores, {}; commit {}", m.cpu, m.cores, m.kernel, commit());
        let passed = soak::run(&args.name, &weft_bin, minutes, &args.soak_backend)?;
        return Ok(if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    if args.rootless {
        let weft_bin = std::env::current_exe().context("finding the weft binary")?;
        remove_on_signal(&args.name)?;
        crate::down(&args.name);
        println!("{}", report::machine_line(&machine(), &commit(), &settings));
        let passed = rootless::run(&args.name, &weft_bin, &settings, &args.rootless_backend)?;
        return Ok(if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    for p in ["iperf3", "ping", "ss"] {
        if crate::find_program(p).is_none() {
            bail!("weft bench needs {p} (Debian packages iperf3, iputils-ping, iproute2; scripts/setup installs them)");
        }
    }
    if let Some(us) = settings.busy_poll_us {
        println!("weft agents: busy-poll-us {us} (workers poll {us} us after their last packet before sleeping)");
    }
    let weft_bin = std::env::current_exe().context("finding the weft binary")?;
    let name = args.name.clone();

    remove_on_signal(&name)?;

    // A topology left by a crashed run goes first.
    crate::down(&name);
    let machine = machine();
    let commit = commit();
    println!("{}", report::machine_line(&machine, &commit, &settings));
    let quiet_limit = Duration::from_secs(if settings.quick { 3 } else { 10 });
    let mut outcomes = Vec::new();
    for mode in modes {
        if let Some(why) = mode.unavailable() {
            println!("{}: skipped: {why}", mode.name());
            outcomes.push(Outcome::Skipped(mode.name().into(), why));
            continue;
        }
        let quiet = measure::wait_quiet(QUIET_IDLE_PCT, quiet_limit)?;
        if quiet.quiet {
            println!("{}: machine quiet (idle {:.0} %)", mode.name(), quiet.idle_pct);
        } else {
            println!(
                "{}: machine NOT quiet after {:.0} s (idle {:.0} %, wanted {QUIET_IDLE_PCT:.0} %): measuring anyway",
                mode.name(),
                quiet.waited_s,
                quiet.idle_pct
            );
        }
        let outcome = match run_mode(mode, &name, &weft_bin, &settings) {
            Ok(m) => Outcome::Measured(ModeResult {
                mode: mode.name().into(),
                median: report::median_figures(&m.reps).context("no repetition")?,
                reps: m.reps,
                cpu_source: m.cpu_source,
                system_cpu_pct: m.system_cpu_pct,
                quiet,
            }),
            Err(e) => {
                let reason = reason(&e);
                println!("{}: FAILED: {reason}", mode.name());
                eprintln!("{}: {e:#}", mode.name());
                Outcome::Failed(mode.name().into(), reason)
            }
        };
        outcomes.push(outcome);
    }

    println!();
    print!("{}", report::table(&outcomes));
    if let Some(path) = &args.json {
        let doc = report::json_report(&machine, &commit, &settings, &outcomes);
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        let results: Vec<(String, Figures)> = outcomes
            .iter()
            .filter_map(|o| if let Outcome::Measured(r) = o { Some((r.mode.clone(), r.median)) } else { None })
            .collect();
        let line = report::machine_line(&machine, &commit, &settings).replacen("machine: ", "", 1);
        let subtitle: Vec<String> = match line.split_once("; ") {
            Some((m, rest)) => vec![m.to_string(), rest.to_string()],
            None => vec![line],
        };
        std::fs::write(path, report::svg("weft bench: pod to pod across two nodes", &subtitle, &results))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let failed = outcomes.iter().any(|o| matches!(o, Outcome::Failed(..)));
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Ctrl-C or SIGTERM: remove what the bench made under `name`, then leave.
fn remove_on_signal(name: &str) -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])?;
    let name = name.to_string();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            eprintln!("\ninterrupted: removing {name}-*");
            crate::down(&name);
            std::process::exit(130);
        }
    });
    Ok(())
}

/// `weft bench --footprint`: the report of [`footprint`], on stdout.
fn run_footprint(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let weft_bin = std::env::current_exe().context("finding the weft binary")?;
    let window = Duration::from_secs(args.window.unwrap_or(if args.quick { 10 } else { 60 }).max(1));
    let name = args.name.clone();
    remove_on_signal(&name)?;
    let m = machine();
    println!("machine: {}, {} cores, {}; commit {}; {}", m.cpu, m.cores, m.kernel, commit(), weft_bin.display());
    let rows = footprint::run(&name, &weft_bin, window)?;
    let bins = footprint::binaries(&weft_bin);
    println!();
    print!("{}", footprint::table(&rows, &bins, window));
    let failed = rows.iter().any(|r| r.rest.is_err() && r.wakeup_budget);
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// What one mode's repetitions measured.
struct Measured {
    reps: Vec<Figures>,
    cpu_source: report::CpuSource,
    /// Median of the machine's system + softirq CPU during the 1-stream TCP tests.
    system_cpu_pct: f64,
}

/// Builds `mode`'s topology, measures it `reps` times, removes it.
fn run_mode(mode: Mode, name: &str, weft_bin: &std::path::Path, s: &Settings) -> anyhow::Result<Measured> {
    println!("{}: building the topology", mode.name());
    let topo = Down(topo::up(mode, name, weft_bin, s.threads, s.busy_poll_us)?);
    measure_mode(mode, &topo.0, s).map_err(|e| {
        let logs = topo.0.logs();
        if logs.is_empty() {
            e
        } else {
            e.context(logs)
        }
    })
}

/// Removes a topology when dropped, also when a measurement panics.
struct Down(Topology);

impl Drop for Down {
    fn drop(&mut self) {
        topo::down(&self.0);
    }
}

fn measure_mode(mode: Mode, topo: &Topology, s: &Settings) -> anyhow::Result<Measured> {
    let (a, b) = topo.pods();
    let to = topo.target()?;
    let _server = IperfServer::start(&b.ns, &topo.lab.dir.join("iperf3.log"), &topo.lab.dir.join("iperf3.pid"))?;
    let _echo = Echo::start(&b.ns)?;
    let mut reps = Vec::new();
    let mut system = Vec::new();
    for rep in 1..=s.reps {
        let (tcp1, cpu) = with_cpu(&topo.tunnel_pids, s.duration_s, || {
            measure::run_iperf(&a.ns, to, IperfTest::Tcp(1), s.duration_s)
        })?;
        let tcp1 = measure::parse_iperf_tcp(&tcp1)?;
        let (crypto0, tcp_ext0) = (aead_bytes(topo), crate::netns::tcp_ext(&a.ns).ok());
        let tcp4 = measure::parse_iperf_tcp(&measure::run_iperf(&a.ns, to, IperfTest::Tcp(4), s.duration_s)?)?;
        let (crypto1, tcp_ext1) = (aead_bytes(topo), crate::netns::tcp_ext(&a.ns).ok());
        let udp = measure::parse_iperf_udp(&measure::run_iperf(&a.ns, to, IperfTest::Udp64, s.duration_s)?)?;
        let rtt = measure::ping_pong(&a.ns, to, s.duration_s as f64)?;
        let answered = rtt.samples_us.len();
        if answered == 0 {
            bail!("no round-trip probe was answered ({} lost)", rtt.lost);
        }
        let avg = rtt.samples_us.iter().sum::<f64>() / answered as f64;
        let p99 = report::percentile(&rtt.samples_us, 99.0).unwrap_or(avg);
        let cpu_pct = if topo.tunnel_pids.is_empty() { cpu.kernel_pct } else { cpu.processes_pct };
        let f = Figures {
            tcp1_gbps: tcp1.bps / 1e9,
            tcp4_gbps: tcp4.bps / 1e9,
            udp64_pps: udp.pps,
            udp64_loss: udp.loss,
            rtt_avg_us: avg,
            rtt_p99_us: p99,
            cpu_pct,
        };
        println!(
            "{} rep {rep}/{}: tcp1 {:.2} Gbit/s, tcp4 {:.2} Gbit/s, udp64 {:.1} kpps ({:.1} % lost), \
             rtt {:.0}/{:.0} us avg/p99 ({answered} probes, {} lost), cpu {:.0} % ({})",
            mode.name(),
            s.reps,
            f.tcp1_gbps,
            f.tcp4_gbps,
            f.udp64_pps / 1e3,
            f.udp64_loss * 100.0,
            f.rtt_avg_us,
            f.rtt_p99_us,
            rtt.lost,
            f.cpu_pct,
            topo.cpu_source.label()
        );
        // What weft's WireGuard agents show of the 4-stream test: each
        // worker's share of the bytes sealed on the sending node and opened
        // on the receiving one, and the reordering the senders' TCP saw.
        if let (Some(c0), Some(c1)) = (crypto0, crypto1) {
            let share = |node: usize, k: usize| {
                let d: Vec<f64> =
                    (0..c1[node].len()).map(|w| c1[node][w][k] - c0[node].get(w).map_or(0.0, |x| x[k])).collect();
                let total: f64 = d.iter().sum();
                d.iter()
                    .map(|x| format!("{:.0}", if total > 0.0 { x * 100.0 / total } else { 0.0 }))
                    .collect::<Vec<_>>()
                    .join("/")
            };
            let reorder = tcp_ext0.zip(tcp_ext1).map_or(-1, |(x, y)| crate::netns::reorder_events(&x, &y) as i64);
            println!(
                "{} rep {rep}/{}: 4 streams: sealed by worker (sending node) {} %, opened by worker (receiving node) {} %, \
                 reordering seen by the senders' TCP {reorder}; 1 stream: {:.2} Gbit/s per core of weft",
                mode.name(),
                s.reps,
                share(0, 0),
                share(1, 1),
                f.tcp1_gbps / (f.cpu_pct / 100.0).max(1e-9),
            );
        }
        reps.push(f);
        system.push(cpu.kernel_pct);
    }
    Ok(Measured { reps, cpu_source: topo.cpu_source, system_cpu_pct: report::median(&system).unwrap_or(0.0) })
}

/// Per node, per worker: the WireGuard bytes (sealed, opened) weft's
/// agents count; `None` for modes without weft's WireGuard.
fn aead_bytes(topo: &Topology) -> Option<Vec<Vec<[f64; 2]>>> {
    if topo.lab.opts.backend != "wireguard-native" || topo.lab.opts.wg_peer.is_some() {
        return None;
    }
    topo.lab
        .nodes
        .iter()
        .take(2)
        .map(|n| {
            let m = topo.lab.metrics(n).ok()?;
            let get = |name: &str, w: usize| m.get(&format!("{name}_total{{worker=\"{w}\"}}")).copied();
            (0..)
                .map_while(|w| Some([get("weft_worker_wg_sealed_bytes", w)?, get("weft_worker_wg_opened_bytes", w)?]))
                .collect::<Vec<_>>()
                .into()
        })
        .collect()
}

/// Runs `f` (a test of `secs` seconds) while sampling CPU over its middle:
/// the first and last fifth (at most a second each) are left out, so
/// process start, TCP slow start and the end-of-test exchange do not count.
fn with_cpu<T>(pids: &[i32], secs: u64, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, CpuUse)> {
    let edge = Duration::from_secs_f64((secs as f64 * 0.2).min(1.0));
    let span = Duration::from_secs(secs).saturating_sub(edge * 2);
    let pids = pids.to_vec();
    let sampler = std::thread::spawn(move || -> anyhow::Result<CpuUse> {
        std::thread::sleep(edge);
        let s = CpuSpan::start(&pids)?;
        std::thread::sleep(span);
        s.finish()
    });
    let out = f();
    let cpu = sampler.join().map_err(|_| anyhow::anyhow!("the CPU sampler panicked"))?;
    Ok((out?, cpu?))
}

/// An error without the process logs that the lab and the topology add as
/// context (they go to stderr whole).
fn reason(e: &anyhow::Error) -> String {
    let parts: Vec<String> = e
        .chain()
        .map(|c| c.to_string())
        .filter(|m| !m.starts_with("agent logs:") && !m.starts_with("\n---") && !m.trim().is_empty())
        .collect();
    parts.join(": ").replace('\n', " ")
}

/// The CPU model, core count and kernel of this machine.
fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    Machine {
        cpu: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown CPU".into()),
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        kernel: crate::netns::run("uname", &["-srm"])
            .map(|s| s.trim().to_string())
            .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| format!("Linux {}", s.trim())))
            .unwrap_or_else(|_| "unknown kernel".into()),
    }
}

/// The first `model name` of `/proc/cpuinfo` (pure).
fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// The commit this binary was built from, when its source tree is here:
/// `git rev-parse`, `-dirty` when the tree has changes; else "unknown".
fn commit() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let Ok(head) = crate::netns::run("git", &["-C", dir, "rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".into();
    };
    let dirty = crate::netns::run("git", &["-C", dir, "status", "--porcelain", "--untracked-files=no"])
        .is_ok_and(|s| !s.trim().is_empty());
    format!("{}{}", head.trim(), if dirty { "-dirty" } else { "" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_in_order_without_repeats() {
        let m = Mode::parse_list("kernel-vxlan, weft-vxlan,kernel-vxlan").unwrap();
        assert_eq!(m, vec![Mode::KernelVxlan, Mode::WeftVxlan]);
        assert_eq!(Mode::parse_list("all").unwrap(), Mode::ALL.to_vec());
        let e = Mode::parse_list("weft-vxlan,udp").unwrap_err().to_string();
        assert!(e.contains("`udp`") && e.contains("boringtun"), "{e}");
        assert!(Mode::parse_list(" , ").is_err());
        for m in Mode::ALL {
            assert_eq!(Mode::parse_list(m.name()).unwrap(), vec![m]);
        }
    }

    #[test]
    fn failure_reasons_leave_the_logs_out() {
        let e = anyhow::anyhow!("iperf3: unable to connect").context("\n--- n1 ---\nstarted");
        assert_eq!(reason(&e), "iperf3: unable to connect");
        let e = anyhow::anyhow!("no address").context("agent logs:\n--- n1 ---").context("building");
        assert_eq!(reason(&e), "building: no address");
    }

    #[test]
    fn cpu_model_from_cpuinfo() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)  CPU @ 2.20GHz\n";
        assert_eq!(cpu_model(text).as_deref(), Some("Intel(R) Xeon(R) CPU @ 2.20GHz"));
        assert_eq!(cpu_model("processor : 0\n"), None);
    }

    #[test]
    fn quick_and_explicit_settings() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            b: BenchArgs,
        }
        let a = Cli::parse_from(["x", "--quick", "--modes", "weft-vxlan"]).b;
        assert!(a.quick && a.duration.is_none() && a.reps.is_none());
        assert_eq!(a.name, "weftbench");
        let a = Cli::parse_from(["x", "--duration", "5", "--reps", "1", "--threads", "2", "--json", "o.json"]).b;
        assert_eq!((a.duration, a.reps, a.threads), (Some(5), Some(1), Some(2)));
        assert_eq!(a.json, Some(PathBuf::from("o.json")));
        assert_eq!(a.busy_poll_us, None);
        assert_eq!(Cli::parse_from(["x", "--busy-poll-us", "3000"]).b.busy_poll_us, Some(3000));
        assert!(Cli::try_parse_from(["x", "--busy-poll-us", "20000"]).is_err(), "above 10 000 is refused");
    }
}
