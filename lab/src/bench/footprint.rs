//! `weft bench --footprint`: what weft costs a small node at rest, beside
//! the userspace WireGuard anchors, from one run.
//!
//! - Each userspace WireGuard (`weft wg`, the `weft-wg` program beside
//!   weft, `wireguard-go`, `boringtun-cli`)
//!   runs in a namespace of its own and gets a private key and
//!   [`PEERS`] peers from `wg setconf` (endpoints on that namespace's
//!   loopback; nothing is sent, since nothing is routed to the device). Once
//!   it settled: its resident memory (`VmRSS`) and the context switches of
//!   all its threads over the window, per second (a thread that sleeps and
//!   wakes switches once per wakeup).
//! - The weft agent of a two-node lab (file datastore), backends `vxlan`
//!   and `wireguard-native`, measured the same way once the lab is up and
//!   idle (no pod traffic: the WireGuard agent has no session, so no
//!   protocol timer runs).
//! - The size of the weft and weft-wg binaries stripped of their symbols, for this build
//!   and for the aarch64 build beside it when there is one.
//!
//! Every figure is printed beside its budget (issue 14: a Raspberry Pi's
//! share); the bench reports, it does not fail on a figure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::namespaces::read_pid;
use crate::netns::{exec, ip};
use crate::peers::find_program;
use crate::{LabOptions, STATE_ROOT};

/// Peers given to each WireGuard device.
pub const PEERS: usize = 100;
/// Budget: resident memory of `weft wg` with [`PEERS`] peers, MiB.
pub const WG_RSS_MIB: f64 = 5.0;
/// Budget: resident memory of an agent, MiB.
pub const AGENT_RSS_MIB: f64 = 16.0;
/// Budget: context switches per second of an idle weft process.
pub const WAKEUPS_PER_S: f64 = 1.0;
/// Budget: size of the stripped binary, MB (10^6 bytes).
pub const BINARY_MB: f64 = 6.0;

/// One process's figures at rest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rest {
    /// Resident memory, MiB.
    pub rss_mib: f64,
    /// Context switches of all its threads per second over the window.
    pub wakeups_per_s: f64,
    /// Threads at the end of the window.
    pub threads: usize,
}

/// A line of the report: what was measured, and its figures or why not.
#[derive(Debug)]
pub struct Row {
    /// What ran.
    pub what: String,
    /// Its figures, or why there are none.
    pub rest: Result<Rest, String>,
    /// Its memory budget, MiB, when it has one.
    pub rss_budget: Option<f64>,
    /// Whether the wakeup budget applies (weft's own processes).
    pub wakeup_budget: bool,
}

/// `VmRSS` of a `/proc/PID/status`, in KiB.
pub fn vm_rss_kib(status: &str) -> Option<u64> {
    field(status, "VmRSS:")
}

/// Voluntary plus involuntary context switches of a
/// `/proc/PID/task/TID/status`.
pub fn context_switches(status: &str) -> Option<u64> {
    Some(field(status, "voluntary_ctxt_switches:")? + field(status, "nonvoluntary_ctxt_switches:")?)
}

fn field(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// Context switches summed over `pid`'s threads, and their number.
fn switches(pid: i32) -> anyhow::Result<(u64, usize)> {
    let dir = PathBuf::from(format!("/proc/{pid}/task"));
    let mut sum = 0;
    let mut threads = 0;
    for task in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
        // A thread that ended between the listing and the read counts no more.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        sum += context_switches(&status).context("no context switch counts in a task's status")?;
        threads += 1;
    }
    Ok((sum, threads))
}

/// Measures `pid` at rest: context switches over `window`, then its memory.
pub fn at_rest(pid: i32, window: Duration) -> anyhow::Result<Rest> {
    let (s0, _) = switches(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(window);
    let (s1, threads) = switches(pid)?;
    let secs = t0.elapsed().as_secs_f64();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("the process is gone")?;
    let rss = vm_rss_kib(&status).context("no VmRSS in the status")?;
    Ok(Rest { rss_mib: rss as f64 / 1024.0, wakeups_per_s: s1.saturating_sub(s0) as f64 / secs, threads })
}

/// A userspace WireGuard the footprint measures.
#[derive(Debug, Clone, Copy)]
enum Device {
    Weft,
    WeftWg,
    WireguardGo,
    Boringtun,
}

impl Device {
    fn name(self) -> &'static str {
        match self {
            Device::Weft => "weft wg",
            Device::WeftWg => "weft-wg",
            Device::WireguardGo => "wireguard-go",
            Device::Boringtun => "boringtun-cli",
        }
    }

    /// The command that runs it in the foreground on `ifname`.
    fn command(self, weft_bin: &Path) -> Option<(PathBuf, Vec<&'static str>)> {
        match self {
            Device::Weft => Some((weft_bin.to_path_buf(), vec!["wg", "--foreground"])),
            // The program of its own, built beside weft.
            Device::WeftWg => {
                Some(weft_bin.with_file_name("weft-wg")).filter(|p| p.is_file()).map(|p| (p, vec!["--foreground"]))
            }
            Device::WireguardGo => find_program("wireguard-go").map(|p| (p, vec!["-f"])),
            Device::Boringtun => {
                find_program("boringtun-cli").map(|p| (p, vec!["--foreground", "--disable-drop-privileges"]))
            }
        }
    }
}

/// The `wg setconf` file of a device with `peers` peers: throw-away keys,
/// endpoints on loopback, one /24 of allowed IPs each.
pub fn wg_config(peers: usize) -> anyhow::Result<String> {
    let key = |_: usize| -> anyhow::Result<String> {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).map_err(|e| anyhow::anyhow!("random key: {e}"))?;
        Ok(weft_control::keys::encode(&k))
    };
    let mut conf = format!("[Interface]\nPrivateKey = {}\nListenPort = 51820\n", key(0)?);
    for i in 0..peers {
        conf += &format!(
            "\n[Peer]\nPublicKey = {}\nEndpoint = 127.0.0.1:{}\nAllowedIPs = 10.{}.{}.0/24\n",
            key(i)?,
            52000 + i,
            100 + i / 256,
            i % 256
        );
    }
    Ok(conf)
}

/// Runs `dev` in namespace `ns`, gives it [`PEERS`] peers, measures it.
fn measure_device(dev: Device, name: &str, ns: &str, weft_bin: &Path, window: Duration) -> anyhow::Result<Rest> {
    let Some((program, args)) = dev.command(weft_bin) else {
        match dev {
            Device::WeftWg => bail!("not built beside {} (cargo build --bin weft-wg)", weft_bin.display()),
            _ => bail!("not installed (scripts/setup installs it)"),
        }
    };
    let dir = Path::new(STATE_ROOT).join(name);
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    // Unique across runs and labs: the UAPI socket is in the shared /var/run/wireguard.
    let ifname = format!("{}fp{}", &name[..name.len().min(8)], dev as u8);
    let log = std::fs::File::create(dir.join(format!("{ifname}.log")))?;
    use std::os::unix::process::CommandExt;
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(&program)
        .args(&args)
        .arg(&ifname)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let pid = child.id() as i32;
    std::fs::write(dir.join(format!("{ifname}.pid")), pid.to_string())?;
    let sock = Path::new("/var/run/wireguard").join(format!("{ifname}.sock"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join(format!("{ifname}.log"))).unwrap_or_default();
            bail!("made no UAPI socket at {} in 20 s: {}", sock.display(), log.trim());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let conf = dir.join(format!("{ifname}.conf"));
    std::fs::write(&conf, wg_config(PEERS)?)?;
    exec(ns, "wg", &["setconf", &ifname, &conf.display().to_string()])?;
    let listed = exec(ns, "wg", &["show", &ifname, "peers"])?.lines().count();
    if listed != PEERS {
        bail!("`wg show` lists {listed} peers, {PEERS} were set");
    }
    ip(&["-n", ns, "link", "set", &ifname, "up"])?;
    // Threads started by the first requests and the link change settle.
    std::thread::sleep(Duration::from_secs(2));
    at_rest(pid, window)
}

/// Builds a two-node lab of `backend`, measures node 1's agent at rest.
fn measure_agent(backend: &str, name: &str, weft_bin: &Path, window: Duration) -> anyhow::Result<Rest> {
    let mut opts = LabOptions::new(name, weft_bin.to_path_buf());
    opts.nodes = 2;
    opts.backend = backend.into();
    let lab = crate::up(&opts)?;
    let pid = read_pid(&lab.dir.join("n1.pid")).context("the agent's pid")?.as_raw();
    std::thread::sleep(Duration::from_secs(2));
    at_rest(pid, window)
}

/// The size of `bin` stripped by `strip`, in bytes.
fn stripped_size(bin: &Path, strip: &str, out: &Path) -> anyhow::Result<u64> {
    crate::netns::run(strip, &["-o", &out.display().to_string(), &bin.display().to_string()])?;
    Ok(std::fs::metadata(out)?.len())
}

/// Runs the footprint report: every device and agent in turn, then the
/// binaries. `name` prefixes what it creates; `window` is the time
/// context switches are counted over.
pub fn run(name: &str, weft_bin: &Path, window: Duration) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, dev) in [Device::Weft, Device::WeftWg, Device::WireguardGo, Device::Boringtun].into_iter().enumerate() {
        crate::down(name);
        std::fs::create_dir_all(Path::new(STATE_ROOT).join(name))?;
        let ns = format!("{name}-fp{i}");
        println!("footprint: {} with {PEERS} peers, {} s at rest", dev.name(), window.as_secs());
        let rest = measure_device(dev, name, &ns, weft_bin, window).map_err(|e| format!("{e:#}"));
        crate::down(name);
        let own = matches!(dev, Device::Weft | Device::WeftWg);
        rows.push(Row {
            what: format!("{} ({PEERS} peers)", dev.name()),
            rest,
            rss_budget: own.then_some(WG_RSS_MIB),
            wakeup_budget: own,
        });
    }
    for backend in ["vxlan", "wireguard-native"] {
        crate::down(name);
        println!("footprint: weft agent, backend {backend}, file datastore, {} s at rest", window.as_secs());
        let rest = measure_agent(backend, name, weft_bin, window).map_err(|e| format!("{e:#}"));
        crate::down(name);
        rows.push(Row {
            what: format!("weft agent ({backend}, file datastore)"),
            rest,
            rss_budget: Some(AGENT_RSS_MIB),
            wakeup_budget: true,
        });
    }
    Ok(rows)
}

/// The binaries' lines: this one and `weft-wg` beside it, and the aarch64
/// builds of the same profile (`target/aarch64-unknown-linux-gnu/<profile>/`).
pub fn binaries(weft_bin: &Path) -> Vec<(String, Result<u64, String>)> {
    let tmp = std::env::temp_dir().join(format!("weft-footprint-{}", std::process::id()));
    let mut out = Vec::new();
    let arch = std::env::consts::ARCH;
    let here = weft_bin.parent();
    // <target>/<profile>/ -> <target>/aarch64-unknown-linux-gnu/<profile>/
    let cross = here.and_then(|profile| {
        let target = profile.parent()?;
        Some(target.join("aarch64-unknown-linux-gnu").join(profile.file_name()?))
    });
    for program in ["weft", "weft-wg"] {
        let bin =
            if program == "weft" { weft_bin.to_path_buf() } else { here.map(|d| d.join(program)).unwrap_or_default() };
        let size = if bin.is_file() {
            stripped_size(&bin, "strip", &tmp)
        } else {
            Err(anyhow::anyhow!("not built ({} is missing)", bin.display()))
        };
        out.push((format!("{program} {arch} ({})", bin.display()), size));
        if let Some(c) = cross.as_ref().filter(|_| arch != "aarch64").map(|d| d.join(program)) {
            let size = if c.is_file() {
                stripped_size(&c, "aarch64-linux-gnu-strip", &tmp)
            } else {
                Err(anyhow::anyhow!("not built ({} is missing)", c.display()))
            };
            out.push((format!("{program} aarch64 ({})", c.display()), size));
        }
    }
    let _ = std::fs::remove_file(&tmp);
    out.into_iter().map(|(w, r)| (w, r.map_err(|e| format!("{e:#}")))).collect()
}

/// The report as a table.
pub fn table(rows: &[Row], bins: &[(String, Result<u64, String>)], window: Duration) -> String {
    let verdict = |value: f64, budget: f64| if value <= budget { "within" } else { "OVER" };
    let mut s = format!(
        "footprint at rest (context switches counted over {} s; budgets: weft wg <= {WG_RSS_MIB} MiB, \
         agent <= {AGENT_RSS_MIB} MiB, weft <= {WAKEUPS_PER_S} wakeup/s, stripped binary <= {BINARY_MB} MB)\n",
        window.as_secs()
    );
    s += &format!("{:<44} {:>8} {:>11} {:>8}  budget\n", "process", "RSS MiB", "wakeups/s", "threads");
    for r in rows {
        match &r.rest {
            Ok(f) => {
                let mut judged = Vec::new();
                if let Some(b) = r.rss_budget {
                    judged.push(format!("memory {}", verdict(f.rss_mib, b)));
                }
                if r.wakeup_budget {
                    judged.push(format!("wakeups {}", verdict(f.wakeups_per_s, WAKEUPS_PER_S)));
                }
                let judged = if judged.is_empty() { "(anchor)".to_string() } else { judged.join(", ") };
                s += &format!(
                    "{:<44} {:>8.1} {:>11.1} {:>8}  {judged}\n",
                    r.what, f.rss_mib, f.wakeups_per_s, f.threads
                );
            }
            Err(why) => s += &format!("{:<44} not measured: {why}\n", r.what),
        }
    }
    for (what, size) in bins {
        match size {
            Ok(b) => {
                let mb = *b as f64 / 1e6;
                s += &format!("binary {what}: {mb:.2} MB stripped, {} the budget\n", verdict(mb, BINARY_MB));
            }
            Err(why) => s += &format!("binary {what}: {why}\n"),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tweft\nVmPeak:\t  20000 kB\nVmRSS:\t    4321 kB\nThreads:\t3\n\
                          voluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";

    #[test]
    fn status_fields_are_read() {
        assert_eq!(vm_rss_kib(STATUS), Some(4321));
        assert_eq!(context_switches(STATUS), Some(127));
        assert_eq!(vm_rss_kib("Name:\tx\n"), None);
        assert_eq!(context_switches("voluntary_ctxt_switches:\t1\n"), None);
    }

    #[test]
    fn this_process_is_measured() {
        let me = std::process::id() as i32;
        let r = at_rest(me, Duration::from_millis(50)).unwrap();
        assert!(r.rss_mib > 0.5, "{r:?}");
        assert!(r.threads >= 1);
    }

    #[test]
    fn the_config_has_every_peer_once() {
        let c = wg_config(300).unwrap();
        assert_eq!(c.matches("[Peer]").count(), 300);
        let keys: std::collections::BTreeSet<&str> = c.lines().filter_map(|l| l.strip_prefix("PublicKey = ")).collect();
        assert_eq!(keys.len(), 300);
        assert!(c.contains("AllowedIPs = 10.101.43.0/24"), "peer 299");
        assert!(c.contains("Endpoint = 127.0.0.1:52299"));
    }

    #[test]
    fn the_table_judges_against_the_budgets() {
        let rows = vec![
            Row {
                what: "weft wg".into(),
                rest: Ok(Rest { rss_mib: 4.0, wakeups_per_s: 3.0, threads: 4 }),
                rss_budget: Some(WG_RSS_MIB),
                wakeup_budget: true,
            },
            Row {
                what: "wireguard-go".into(),
                rest: Ok(Rest { rss_mib: 6.0, wakeups_per_s: 5.0, threads: 9 }),
                rss_budget: None,
                wakeup_budget: false,
            },
            Row {
                what: "boringtun-cli".into(),
                rest: Err("not installed".into()),
                rss_budget: None,
                wakeup_budget: false,
            },
        ];
        let t = table(&rows, &[("weft x86_64".into(), Ok(6_100_000))], Duration::from_secs(60));
        assert!(t.contains("memory within, wakeups OVER"), "{t}");
        assert!(t.contains("(anchor)"), "{t}");
        assert!(t.contains("boringtun-cli") && t.contains("not measured: not installed"), "{t}");
        assert!(t.contains("6.10 MB stripped, OVER the budget"), "{t}");
    }
}
