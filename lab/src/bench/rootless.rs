//! `weft bench --rootless` (the weft-rootless mode): what the userspace
//! stack of a rootless node costs, beside the TUN path of the same agents in
//! the same run. A lab of two weft nodes and a rootless one; per
//! repetition: TCP, one stream, from a pod to a SOCKS5 client on the
//! rootless node (bytes through smoltcp) against the same transfer pod to
//! pod; round trips of one byte over TCP through SOCKS5 against pod to
//! pod; CPU of the rootless agent; its peak memory at the end.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::measure::CpuSpan;
use super::report::{self, Settings};
use crate::netns;
use crate::rootless::{self as rl, SOCKS_ADDR};
use crate::{LabOptions, Pod};

/// Port of the round-trip echo in the pod.
const ECHO_PORT: u16 = 5204;

/// One repetition's figures.
#[derive(Debug, Clone, Copy)]
struct Rep {
    socks_gbps: f64,
    pod_gbps: f64,
    socks_rtt_us: f64,
    pod_rtt_us: f64,
    /// CPU of the rootless agent during the SOCKS5 transfer, % of a core.
    cpu_pct: f64,
}

/// Runs the mode for `backend`; prints its lines and table.
pub fn run(name: &str, weft_bin: &std::path::Path, s: &Settings, backend: &str) -> anyhow::Result<bool> {
    let mut o = LabOptions::new(name, weft_bin.to_path_buf());
    o.nodes = 2;
    o.rootless = true;
    o.backend = backend.into();
    o.threads = s.threads;
    o.busy_poll_us = s.busy_poll_us;
    println!("weft-rootless ({backend}): building the lab");
    let lab = crate::up(&o)?;
    struct Down(String);
    impl Drop for Down {
        fn drop(&mut self) {
            crate::down(&self.0);
        }
    }
    let _down = Down(name.to_string());
    let r = lab.rootless.clone().context("the lab has no rootless node")?;
    let (a, b) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    let pid = rl::agent_pid(name).context("the rootless agent's pid")?;
    echo_server(&a)?;
    // Bytes per transfer: about `duration` seconds at a gigabit.
    let bytes = ((s.duration_s as usize * 125) << 20).clamp(64 << 20, 2 << 30);
    let mut reps = Vec::new();
    for rep in 1..=s.reps {
        let span = CpuSpan::start(&[pid])?;
        let (sent, got, secs) = lab.socks_fetch(&a, false, bytes)?;
        let cpu = span.finish()?;
        if sent != got {
            bail!("the SOCKS5 transfer arrived changed");
        }
        let direct = crate::transfer_check(&a, &b, false, bytes);
        let pod_gbps = direct
            .detail
            .split(", ")
            .nth(1)
            .and_then(|g| g.trim_end_matches(" Gbit/s").parse().ok())
            .filter(|_| direct.passed)
            .with_context(|| format!("pod to pod transfer: {}", direct.detail))?;
        let target = SocketAddr::new(a.ip(false).context("an IPv4 pod")?, ECHO_PORT);
        let secs_rtt = s.duration_s as f64;
        let socks_rtt = netns::in_netns(&r.ns, move || -> anyhow::Result<f64> {
            let s = rl::socks5_connect(SOCKS_ADDR, target)?.map_err(|c| anyhow::anyhow!("CONNECT refused: {c}"))?;
            ping_pong(s, secs_rtt)
        })??;
        let pod_rtt = netns::in_netns(&b.ns, move || -> anyhow::Result<f64> {
            ping_pong(TcpStream::connect_timeout(&target, Duration::from_secs(5))?, secs_rtt)
        })??;
        let f = Rep {
            socks_gbps: bytes as f64 * 8.0 / secs / 1e9,
            pod_gbps,
            socks_rtt_us: socks_rtt,
            pod_rtt_us: pod_rtt,
            cpu_pct: cpu.processes_pct,
        };
        println!(
            "weft-rootless rep {rep}/{}: pod -> socks5 client {:.2} Gbit/s (pod to pod {:.2}), rtt {:.0} us \
             (pod to pod {:.0}), rootless agent cpu {:.0} %",
            s.reps, f.socks_gbps, f.pod_gbps, f.socks_rtt_us, f.pod_rtt_us, f.cpu_pct
        );
        reps.push(f);
    }
    let med = |f: fn(&Rep) -> f64| report::median(&reps.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
    };
    println!();
    println!("{:<28} {:>12} {:>12} {:>8}", "weft-rootless", "socks5", "pod to pod", "ratio");
    let (sg, pg) = (med(|r| r.socks_gbps), med(|r| r.pod_gbps));
    println!("{:<28} {:>12.2} {:>12.2} {:>7.2}x", "tcp 1 stream, Gbit/s", sg, pg, sg / pg.max(1e-9));
    let (sr, pr) = (med(|r| r.socks_rtt_us), med(|r| r.pod_rtt_us));
    println!("{:<28} {:>12.0} {:>12.0} {:>7.2}x", "tcp round trip, us", sr, pr, sr / pr.max(1e-9));
    println!("{:<28} {:>12.0}", "rootless agent cpu, %", med(|r| r.cpu_pct));
    println!(
        "{:<28} {:>12}",
        "rootless agent peak rss",
        kib("VmHWM:").map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
    );
    Ok(true)
}

/// A TCP echo in `pod` at [`ECHO_PORT`], one thread per connection.
fn echo_server(pod: &Pod) -> anyhow::Result<()> {
    let l = netns::in_netns(&pod.ns, || TcpListener::bind((Ipv4Addr::UNSPECIFIED, ECHO_PORT)))??;
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

/// One-byte round trips over `s` for `secs`; the mean, in microseconds.
fn ping_pong(mut s: TcpStream, secs: f64) -> anyhow::Result<f64> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut samples = Vec::new();
    let mut b = [0u8; 1];
    while Instant::now() < end {
        let t0 = Instant::now();
        s.write_all(&[7])?;
        s.read_exact(&mut b).context("the echo stopped answering")?;
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    // The first ones include connection setup on the way.
    let skip = samples.len().min(10);
    let rest = &samples[skip..];
    if rest.is_empty() {
        bail!("no round trip measured");
    }
    Ok(rest.iter().sum::<f64>() / rest.len() as f64)
}
