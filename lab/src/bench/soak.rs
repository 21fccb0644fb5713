//! `weft bench --soak MINUTES`: a three-node lab under mixed traffic for a
//! while, its agents sampled, and a verdict.
//!
//! Traffic, all at once, until the time is up:
//! - bulk TCP: 16 MiB transfers from a pod of node 1 to a pod of node 3,
//!   one after the other, each checked by SHA-256 at both ends;
//! - small UDP: numbered 64-byte datagrams from node 2's pod to node 1's,
//!   500 a second, each of which must arrive exactly once;
//! - short connections: from node 3's pod to an echo server in node 2's,
//!   each a connect, 64 bytes there and back, and a close, 40 a second;
//! - peers joining and leaving: every 10 s a node that does not exist
//!   (its own subnet, address and key) enters or leaves the datastore and
//!   every agent reloads.
//!
//! Every [`SAMPLE_EVERY`] each agent's resident memory, open descriptors,
//! threads and drop counters are read. The run fails when, from the second
//! quarter of the run to the last, an agent's resident memory grows by
//! more than [`RSS_GROWTH_KIB`] (the first quarter is the warm-up: buffers,
//! sessions, allocator pools), its descriptors grow by more than
//! [`FD_GROWTH`] or its threads by any; when any drop counter moves (none
//! of this traffic has a reason to be dropped); or when a transfer fails,
//! a datagram is lost or arrives twice, or a connection fails.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use weft_control::datastore::{Lease, StaticDatastore, VxlanData, WgData};
use weft_control::subnet::SubnetKey;

use crate::namespaces::read_pid;
use crate::netns::spawn_in_netns;
use crate::plan::{Lab, LabOptions, Node};

/// How often the agents are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Resident memory an agent may gain from the second quarter of the run to
/// the last.
pub const RSS_GROWTH_KIB: u64 = 4096;
/// Descriptors an agent may gain (a metrics scrape's connection in flight).
pub const FD_GROWTH: u64 = 2;
/// Size of each bulk transfer.
const BULK_BYTES: usize = 16 << 20;
/// Datagrams a second of the UDP stream.
const UDP_RATE: u64 = 500;
/// Short connections a second.
const CONN_RATE: u64 = 40;
/// How often a peer joins or leaves.
const CHURN_EVERY: Duration = Duration::from_secs(10);

/// One agent at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentSample {
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
    /// Sum of every `weft_drops_total` series.
    pub drops: u64,
    /// Each series that is not zero, by reason.
    pub by_reason: std::collections::BTreeMap<String, u64>,
}

/// Every agent at one moment.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Duration,
    pub agents: Vec<AgentSample>,
}

/// What the traffic did.
#[derive(Debug, Default)]
pub struct Traffic {
    pub bulk_ok: AtomicU64,
    pub bulk_failed: AtomicU64,
    pub udp_sent: AtomicU64,
    pub udp_received: AtomicU64,
    pub udp_twice: AtomicU64,
    pub conns_ok: AtomicU64,
    pub conns_failed: AtomicU64,
    pub churn: AtomicU64,
}

/// Drop reasons that are no fault of the data path: the kernel's own link
/// chatter into the TUN (see the README's metrics).
pub const EXPLAINED: [&str; 1] = ["link_local"];

/// A verdict row: what, whether it held, the figures.
pub type Verdict = (String, bool, String);

/// Judges the samples of a run (see the module doc for the bounds).
pub fn judge(names: &[String], samples: &[Sample]) -> Vec<Verdict> {
    let mut out = Vec::new();
    let n = samples.len();
    if n < 4 {
        out.push(("samples".into(), false, format!("{n} samples: the run is too short to judge growth")));
        return out;
    }
    let (second, last) = (&samples[n / 4..n / 2], &samples[n - n / 4..]);
    for (i, name) in names.iter().enumerate() {
        let max = |s: &[Sample], f: fn(&AgentSample) -> u64| s.iter().map(|s| f(&s.agents[i])).max().unwrap_or(0);
        let (rss0, rss1) = (max(second, |a| a.rss_kib), max(last, |a| a.rss_kib));
        out.push((
            format!("{name}: resident memory"),
            rss1 <= rss0 + RSS_GROWTH_KIB,
            format!(
                "{:.1} MiB in the second quarter, {:.1} MiB in the last (bound: +{} MiB)",
                rss0 as f64 / 1024.0,
                rss1 as f64 / 1024.0,
                RSS_GROWTH_KIB / 1024
            ),
        ));
        let (fd0, fd1) = (max(second, |a| a.fds), max(last, |a| a.fds));
        let (th0, th1) = (max(second, |a| a.threads), max(last, |a| a.threads));
        out.push((
            format!("{name}: descriptors and threads"),
            fd1 <= fd0 + FD_GROWTH && th1 <= th0,
            format!("fds {fd0} then {fd1} (bound: +{FD_GROWTH}), threads {th0} then {th1} (bound: +0)"),
        ));
        let (first, end) = (&samples[0].agents[i], &samples[n - 1].agents[i]);
        let moved: Vec<(&String, u64)> = end
            .by_reason
            .iter()
            .map(|(r, v)| (r, v.saturating_sub(first.by_reason.get(r).copied().unwrap_or(0))))
            .filter(|(_, d)| *d > 0)
            .collect();
        let unexplained = moved.iter().any(|(r, _)| !EXPLAINED.contains(&r.as_str()));
        let detail = match moved.is_empty() {
            true => "none dropped during the run".to_string(),
            false => {
                let list: Vec<String> = moved.iter().map(|(r, d)| format!("{r} {d}")).collect();
                format!("dropped during the run: {} (explained: {})", list.join(", "), EXPLAINED.join(", "))
            }
        };
        out.push((format!("{name}: drops"), !unexplained, detail));
    }
    out
}

/// Reads agent `pid`'s figures from /proc (its metrics give the drops).
fn sample_agent(lab: &Lab, n: &Node) -> anyhow::Result<AgentSample> {
    let pid = read_pid(&lab.dir.join(format!("n{}.pid", n.index))).context("agent pid")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("the agent is gone")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    let rss_kib = super::footprint::vm_rss_kib(&status).context("no VmRSS")?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no Threads")?;
    let by_reason: std::collections::BTreeMap<String, u64> = lab
        .metrics(n)?
        .into_iter()
        .filter(|(k, v)| k.starts_with("weft_drops_total") && *v > 0.0)
        .map(|(k, v)| (k.split('"').nth(1).unwrap_or(&k).to_string(), v as u64))
        .collect();
    Ok(AgentSample { rss_kib, fds, threads, drops: by_reason.values().sum(), by_reason })
}

fn v4(lab: &Lab, node: usize) -> IpAddr {
    lab.nodes[node].pods[0].ip(false).expect("an IPv4 pod")
}

/// Starts the traffic of the module doc; it runs until `stop`.
fn start_traffic(
    lab: &Lab,
    stop: &Arc<AtomicBool>,
    t: &Arc<Traffic>,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut handles = Vec::new();
    // Bulk TCP, node 1 -> node 3.
    let (a, b) = (lab.nodes[0].pods[0].clone(), lab.nodes[2].pods[0].clone());
    let (s, tt) = (stop.clone(), t.clone());
    handles.push(std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            let c = crate::transfer_check(&a, &b, false, BULK_BYTES);
            if c.passed {
                tt.bulk_ok.fetch_add(1, Ordering::Relaxed);
            } else {
                eprintln!("soak: {}: {}", c.name, c.detail);
                tt.bulk_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }));

    // Small UDP, node 2 -> node 1: the receiver marks each number it sees.
    let to = SocketAddr::new(v4(lab, 0), 7071);
    let rx = crate::netns::in_netns(&lab.nodes[0].pods[0].ns, move || UdpSocket::bind(to))??;
    rx.set_read_timeout(Some(Duration::from_millis(200)))?;
    let tt = t.clone();
    let done_sending = Arc::new(AtomicBool::new(false));
    let sent_all = done_sending.clone();
    handles.push(std::thread::spawn(move || {
        let mut seen = std::collections::HashSet::new();
        let mut buf = [0u8; 128];
        let mut quiet_since = None;
        loop {
            match rx.recv(&mut buf) {
                Ok(64) => {
                    let seq = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
                    if seen.insert(seq) {
                        tt.udp_received.fetch_add(1, Ordering::Relaxed);
                    } else {
                        tt.udp_twice.fetch_add(1, Ordering::Relaxed);
                    }
                    quiet_since = None;
                }
                Ok(_) => {}
                Err(_) if sent_all.load(Ordering::Relaxed) => {
                    // Stragglers get a second after the last one was sent.
                    let since = *quiet_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(1) {
                        return;
                    }
                }
                Err(_) => {}
            }
        }
    }));
    let (s, tt) = (stop.clone(), t.clone());
    handles.push(spawn_in_netns(&lab.nodes[1].pods[0].ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
        let start = Instant::now();
        let mut seq = 0u64;
        let mut payload = [0u8; 64];
        while !s.load(Ordering::Relaxed) {
            payload[..8].copy_from_slice(&seq.to_be_bytes());
            if sock.send_to(&payload, to).is_ok() {
                tt.udp_sent.fetch_add(1, Ordering::Relaxed);
                seq += 1;
            }
            let due = start + Duration::from_micros(1_000_000 / UDP_RATE) * seq as u32;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        done_sending.store(true, Ordering::Relaxed);
    })?);

    // Short connections, node 3 -> an echo server on node 2.
    let echo = SocketAddr::new(v4(lab, 1), 7072);
    let listener = crate::netns::in_netns(&lab.nodes[1].pods[0].ns, move || TcpListener::bind(echo))??;
    listener.set_nonblocking(true)?;
    let s = stop.clone();
    handles.push(std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut c, _)) => {
                    let _ = c.set_nonblocking(false);
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut buf = [0u8; 64];
                    if c.read_exact(&mut buf).is_ok() {
                        let _ = c.write_all(&buf);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }));
    let (s, tt) = (stop.clone(), t.clone());
    handles.push(spawn_in_netns(&lab.nodes[2].pods[0].ns, move || {
        let start = Instant::now();
        let mut k = 0u32;
        while !s.load(Ordering::Relaxed) {
            let once = || -> std::io::Result<bool> {
                let mut c = TcpStream::connect_timeout(&echo, Duration::from_secs(5))?;
                c.set_read_timeout(Some(Duration::from_secs(5)))?;
                let msg = [k as u8; 64];
                c.write_all(&msg)?;
                let mut back = [0u8; 64];
                c.read_exact(&mut back)?;
                Ok(back == msg)
            };
            match once() {
                Ok(true) => tt.conns_ok.fetch_add(1, Ordering::Relaxed),
                _ => tt.conns_failed.fetch_add(1, Ordering::Relaxed),
            };
            k += 1;
            let due = start + Duration::from_micros(1_000_000 / CONN_RATE) * k;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
    })?);
    Ok(handles)
}

/// The datastore with a node that does not exist added (`join`) or not.
fn churned(lab: &Lab, base: &StaticDatastore, join: bool) -> anyhow::Result<String> {
    let mut ds = base.clone();
    if join {
        let key = SubnetKey::parse("10.244.200.0-24")?;
        let mut lease: Lease = ds.leases.values().next().context("a lease")?.clone();
        lease.public_ip = Some("192.168.77.200".parse()?);
        lease.public_ipv6 = None;
        lease.backend_v6_data = None;
        lease.backend_data = if lab.opts.backend == "vxlan" {
            VxlanData { vni: 1, vtep_mac: [0x0a, 0x58, 0x0a, 0xf4, 0xc8, 0x00] }.to_value()
        } else {
            let mut private = [0u8; 32];
            getrandom::fill(&mut private).map_err(|e| anyhow::anyhow!("random key: {e}"))?;
            WgData { public_key: weft_uapi::Key(private).public_key().0, port: 51820 }.to_value()
        };
        ds.leases.insert(key, lease);
    }
    Ok(ds.to_json())
}

/// Runs the soak for `minutes` with agents of `backend`; prints the samples
/// and the verdict; returns whether every verdict held.
pub fn run(name: &str, weft_bin: &std::path::Path, minutes: f64, backend: &str) -> anyhow::Result<bool> {
    let mut opts = LabOptions::new(name, weft_bin.to_path_buf());
    opts.nodes = 3;
    opts.backend = backend.into();
    let lab = crate::up(&opts)?;
    let result = soak(&lab, minutes);
    if !matches!(result, Ok(true)) {
        eprintln!("{}", lab.agent_logs());
    }
    crate::down(name);
    result
}

fn soak(lab: &Lab, minutes: f64) -> anyhow::Result<bool> {
    let total = Duration::from_secs_f64(minutes * 60.0);
    let names: Vec<String> = lab.nodes.iter().map(|n| n.ns.clone()).collect();
    let ds_path = lab.dir.join("datastore.json");
    let base = StaticDatastore::parse(&std::fs::read(&ds_path)?)?;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = Arc::new(Traffic::default());
    let handles = start_traffic(lab, &stop, &traffic)?;
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut next_churn = start + CHURN_EVERY;
    let mut joined = false;
    println!(
        "soak: {} nodes, {}, {:.1} min; a sample every {} s",
        names.len(),
        lab.opts.backend,
        minutes,
        SAMPLE_EVERY.as_secs()
    );
    while start.elapsed() < total {
        let at = start.elapsed();
        let agents = lab.nodes.iter().map(|n| sample_agent(lab, n)).collect::<anyhow::Result<Vec<_>>>()?;
        let mut line = format!("t={:>5}s", at.as_secs());
        for (n, a) in names.iter().zip(&agents) {
            let short = n.rsplit('-').next().unwrap_or(n);
            let _ = write!(
                line,
                " | {short} {:.1} MiB {} fds {} thr {} drops",
                a.rss_kib as f64 / 1024.0,
                a.fds,
                a.threads,
                a.drops
            );
        }
        let t = &traffic;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = write!(
            line,
            " | bulk {} ok, udp {}/{}, conns {}",
            g(&t.bulk_ok),
            g(&t.udp_received),
            g(&t.udp_sent),
            g(&t.conns_ok)
        );
        println!("{line}");
        samples.push(Sample { at, agents });
        let wake = Instant::now() + SAMPLE_EVERY;
        while Instant::now() < wake && start.elapsed() < total {
            if Instant::now() >= next_churn {
                joined = !joined;
                std::fs::write(&ds_path, churned(lab, &base, joined)?)?;
                for n in &lab.nodes {
                    lab.reload(n)?;
                }
                traffic.churn.fetch_add(1, Ordering::Relaxed);
                next_churn += CHURN_EVERY;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    // A last sample, after the traffic: the drop counters' final word.
    let agents = lab.nodes.iter().map(|n| sample_agent(lab, n)).collect::<anyhow::Result<Vec<_>>>()?;
    samples.push(Sample { at: start.elapsed(), agents });

    let mut verdicts = judge(&names, &samples);
    let t = &traffic;
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    verdicts.push((
        "bulk TCP (SHA-256 at both ends)".into(),
        g(&t.bulk_ok) > 0 && g(&t.bulk_failed) == 0,
        format!("{} transfers of {} MiB whole, {} failed", g(&t.bulk_ok), BULK_BYTES >> 20, g(&t.bulk_failed)),
    ));
    let (sent, got, twice) = (g(&t.udp_sent), g(&t.udp_received), g(&t.udp_twice));
    verdicts.push((
        "small UDP, each once".into(),
        sent > 0 && got == sent && twice == 0,
        format!("{got} of {sent} datagrams arrived, {} lost, {twice} twice", sent - got.min(sent)),
    ));
    verdicts.push((
        "short connections".into(),
        g(&t.conns_ok) > 0 && g(&t.conns_failed) == 0,
        format!("{} echoed, {} failed", g(&t.conns_ok), g(&t.conns_failed)),
    ));
    verdicts.push((
        "peers joining and leaving".into(),
        g(&t.churn) > 0 || total < CHURN_EVERY,
        format!("{} joins and leaves, every agent reloaded each time", g(&t.churn)),
    ));
    println!();
    let width = verdicts.iter().map(|v| v.0.len()).max().unwrap_or(10);
    for (what, ok, detail) in &verdicts {
        println!("{what:<width$}  {}  {detail}", if *ok { "pass" } else { "FAIL" });
    }
    let passed = verdicts.iter().all(|v| v.1);
    println!("{}", if passed { "soak passed" } else { "soak FAILED" });
    Ok(passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(rss: &[u64], fds: &[u64], drops: &[u64]) -> Vec<Sample> {
        (0..rss.len())
            .map(|i| Sample {
                at: Duration::from_secs(i as u64 * 5),
                agents: vec![AgentSample {
                    rss_kib: rss[i],
                    fds: fds[i],
                    threads: 5,
                    drops: drops[i],
                    by_reason: [("x".to_string(), drops[i])].into(),
                }],
            })
            .collect()
    }

    #[test]
    fn steady_agents_pass_and_growth_or_drops_fail() {
        let names = vec!["n1".to_string()];
        let flat = samples(&[7000, 8000, 8100, 8100, 8200, 8100, 8150, 8200], &[20; 8], &[0; 8]);
        assert!(judge(&names, &flat).iter().all(|v| v.1), "{:?}", judge(&names, &flat));
        // The warm-up quarter may grow as it likes; later growth may not.
        let leak = samples(&[7000, 8000, 8100, 9000, 11_000, 12_000, 14_000, 16_000], &[20; 8], &[0; 8]);
        assert!(!judge(&names, &leak)[0].1);
        let fd_leak = samples(&[8000; 8], &[20, 20, 20, 21, 22, 23, 24, 25], &[0; 8]);
        assert!(!judge(&names, &fd_leak)[1].1);
        let dropped = samples(&[8000; 8], &[20; 8], &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(!judge(&names, &dropped)[2].1);
        let mut chatter = samples(&[8000; 8], &[20; 8], &[0; 8]);
        chatter[7].agents[0].by_reason = [("link_local".to_string(), 2)].into();
        chatter[7].agents[0].drops = 2;
        assert!(judge(&names, &chatter)[2].1, "the kernel's link chatter is explained");
        assert!(!judge(&names, &flat[..3])[0].1, "too short to judge");
    }
}
