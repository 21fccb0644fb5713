//! The measurements of `weft bench` between two pods: iperf3 for TCP and
//! 64-byte UDP, a UDP ping-pong for round trips, and CPU time from `/proc`.
//! Parsers (iperf3's JSON, `/proc/stat`, `/proc/PID/stat`) are pure
//! functions; the runners around them start processes and threads.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::netns;

/// Port of the iperf3 server in the receiving pod.
pub const IPERF_PORT: u16 = 5201;
/// Port of the ping-pong echo in the receiving pod.
pub const ECHO_PORT: u16 = 5202;
/// Tries of one iperf3 test before the mode fails.
const IPERF_ATTEMPTS: usize = 3;
/// Payload of the UDP packet-rate test, bytes.
pub const UDP_PAYLOAD: usize = 64;
/// Gap between two round-trip probes: 500 probes a second keep a tunnel
/// awake without loading it, and 10 s give 5 000 samples for the p99.
const PROBE_GAP: Duration = Duration::from_millis(2);
/// First round trips thrown away (ARP, first wakeups).
const PROBE_WARMUP: usize = 10;

/// What iperf3 reported for a TCP test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TcpResult {
    /// Bits per second received.
    pub bps: f64,
}

/// What iperf3 reported for a UDP test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UdpResult {
    /// Datagrams delivered per second.
    pub pps: f64,
    /// Fraction lost (0..=1).
    pub loss: f64,
}

/// Parses `iperf3 -J` output of a TCP test: the receiver's total.
pub fn parse_iperf_tcp(json: &str) -> anyhow::Result<TcpResult> {
    let v = parse_iperf(json)?;
    let sum = &v["end"]["sum_received"];
    let bps = sum["bits_per_second"].as_f64().context("iperf3 JSON has no end.sum_received.bits_per_second")?;
    Ok(TcpResult { bps })
}

/// Parses `iperf3 -J -u` output: packets the receiver got (sent minus lost)
/// per second of the test, and the loss it counted.
pub fn parse_iperf_udp(json: &str) -> anyhow::Result<UdpResult> {
    let v = parse_iperf(json)?;
    let sum = if v["end"]["sum_received"].is_object() { &v["end"]["sum_received"] } else { &v["end"]["sum"] };
    let packets = sum["packets"].as_f64().context("iperf3 JSON has no end.sum.packets")?;
    let lost = sum["lost_packets"].as_f64().context("iperf3 JSON has no end.sum.lost_packets")?;
    let secs = sum["seconds"].as_f64().filter(|s| *s > 0.0).context("iperf3 JSON has no end.sum.seconds")?;
    if packets <= 0.0 {
        bail!("iperf3 sent no UDP packet");
    }
    let delivered = (packets - lost).max(0.0);
    Ok(UdpResult { pps: delivered / secs, loss: (lost / packets).clamp(0.0, 1.0) })
}

fn parse_iperf(json: &str) -> anyhow::Result<Value> {
    let v: Value = serde_json::from_str(json).context("iperf3 output is not JSON")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    Ok(v)
}

/// The machine-wide CPU counters of `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    /// user + nice (guest time is inside user).
    pub user: u64,
    /// system.
    pub system: u64,
    /// idle + iowait.
    pub idle: u64,
    /// irq + softirq.
    pub irq: u64,
    /// steal.
    pub steal: u64,
    /// Number of `cpuN` lines.
    pub cores: usize,
}

impl CpuTimes {
    /// Every tick counted.
    pub fn total(&self) -> u64 {
        self.user + self.system + self.idle + self.irq + self.steal
    }

    /// Ticks of one core over the span from `earlier` to `self`.
    pub fn per_core(&self, earlier: &CpuTimes) -> f64 {
        self.total().saturating_sub(earlier.total()) as f64 / self.cores.max(1) as f64
    }

    /// The idle share from `earlier` to `self`, in %.
    pub fn idle_pct(&self, earlier: &CpuTimes) -> f64 {
        let total = self.total().saturating_sub(earlier.total());
        if total == 0 {
            return 0.0;
        }
        self.idle.saturating_sub(earlier.idle) as f64 * 100.0 / total as f64
    }

    /// System + irq + softirq from `earlier` to `self`, in % of one core.
    pub fn kernel_pct(&self, earlier: &CpuTimes) -> f64 {
        let core = self.per_core(earlier);
        if core == 0.0 {
            return 0.0;
        }
        (self.system + self.irq).saturating_sub(earlier.system + earlier.irq) as f64 * 100.0 / core
    }
}

/// Parses `/proc/stat`.
pub fn parse_proc_stat(text: &str) -> anyhow::Result<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu ")).context("/proc/stat has no cpu line")?;
    let f: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
    if f.len() < 7 {
        bail!("/proc/stat cpu line is short: {line}");
    }
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    let cores = text
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(|b| b.is_ascii_digit()))
        .count();
    Ok(CpuTimes {
        user: at(0) + at(1),
        system: at(2),
        idle: at(3) + at(4),
        irq: at(5) + at(6),
        steal: at(7),
        cores: cores.max(1),
    })
}

/// Reads `/proc/stat`.
pub fn cpu_times() -> anyhow::Result<CpuTimes> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat")?)
}

/// utime + stime, in ticks, from one `/proc/PID/stat` line (all threads of
/// the process, the exited ones included).
pub fn parse_pid_stat(text: &str) -> anyhow::Result<u64> {
    // The command name is in parentheses and may hold spaces or ')'.
    let rest = text.rsplit_once(')').map(|(_, r)| r).context("/proc/PID/stat without a command")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command start at field 3 (state); utime is 14, stime 15.
    let utime: u64 = f.get(11).context("no utime")?.parse()?;
    let stime: u64 = f.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// CPU ticks used so far by every process of `pids`.
pub fn pid_ticks(pids: &[i32]) -> anyhow::Result<u64> {
    pids.iter()
        .map(|p| {
            let text = std::fs::read_to_string(format!("/proc/{p}/stat"))
                .with_context(|| format!("tunnel process {p} is gone"))?;
            parse_pid_stat(&text)
        })
        .sum()
}

/// CPU used over a span: a start sample, then [`CpuSpan::finish`].
pub struct CpuSpan {
    pids: Vec<i32>,
    machine: CpuTimes,
    procs: u64,
}

/// What a [`CpuSpan`] measured, in % of one core.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuUse {
    /// The processes' utime + stime.
    pub processes_pct: f64,
    /// The machine's system + irq + softirq time.
    pub kernel_pct: f64,
}

impl CpuSpan {
    /// Starts a span over the processes `pids` (and the whole machine).
    pub fn start(pids: &[i32]) -> anyhow::Result<CpuSpan> {
        Ok(CpuSpan { pids: pids.to_vec(), procs: pid_ticks(pids)?, machine: cpu_times()? })
    }

    /// Ends the span.
    pub fn finish(self) -> anyhow::Result<CpuUse> {
        let procs = pid_ticks(&self.pids)?;
        let machine = cpu_times()?;
        // Both counters tick in USER_HZ: a core's ticks over the span come
        // from /proc/stat itself, so no clock rate is assumed.
        let core = machine.per_core(&self.machine);
        let processes_pct = if core > 0.0 { procs.saturating_sub(self.procs) as f64 * 100.0 / core } else { 0.0 };
        Ok(CpuUse { processes_pct, kernel_pct: machine.kernel_pct(&self.machine) })
    }
}

/// Waits until the machine is at least `idle_pct` % idle over one second,
/// for at most `limit`.
pub fn wait_quiet(idle_pct: f64, limit: Duration) -> anyhow::Result<super::report::Quiet> {
    let start = Instant::now();
    loop {
        let a = cpu_times()?;
        std::thread::sleep(Duration::from_secs(1));
        let idle = cpu_times()?.idle_pct(&a);
        let waited = start.elapsed();
        if idle >= idle_pct || waited >= limit {
            return Ok(super::report::Quiet {
                quiet: idle >= idle_pct,
                idle_pct: idle,
                waited_s: waited.as_secs_f64(),
            });
        }
    }
}

/// An iperf3 server in a pod; killed when dropped.
pub struct IperfServer {
    child: Child,
    pid_file: std::path::PathBuf,
}

impl IperfServer {
    /// Starts `iperf3 -s` in namespace `ns` and waits until it listens. Its
    /// pid goes to `pid_file`, so an interrupted run's cleanup finds it.
    pub fn start(ns: &str, log: &std::path::Path, pid_file: &std::path::Path) -> anyhow::Result<IperfServer> {
        let log = std::fs::File::create(log)?;
        use std::os::unix::process::CommandExt;
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "iperf3", "-s", "-p", &IPERF_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting iperf3 (Debian package iperf3)")?;
        std::fs::write(pid_file, child.id().to_string())?;
        let mut server = IperfServer { child, pid_file: pid_file.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(5);
        let filter = format!("sport = :{IPERF_PORT}");
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!("iperf3 -s exited at start: {status}");
            }
            if netns::exec(ns, "ss", &["-Hltn", &filter]).is_ok_and(|o| !o.trim().is_empty()) {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!("iperf3 -s did not listen within 5 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(2);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

/// What kind of iperf3 test to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IperfTest {
    /// TCP with this many parallel streams.
    Tcp(usize),
    /// UDP with 64-byte payloads, as fast as the client can send.
    Udp64,
}

/// The iperf3 client arguments of a test (pure).
pub fn iperf_args(test: IperfTest, to: IpAddr, secs: u64) -> Vec<String> {
    let mut a: Vec<String> = ["-c", &to.to_string(), "-p", &IPERF_PORT.to_string(), "-J", "-t", &secs.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // Leave TCP slow start out of runs long enough to afford it. Not UDP:
    // iperf3 counts the omitted second's datagrams as lost there.
    if secs >= 4 && matches!(test, IperfTest::Tcp(_)) {
        a.extend(["-O".into(), "1".into()]);
    }
    match test {
        IperfTest::Tcp(n) if n > 1 => a.extend(["-P".into(), n.to_string()]),
        IperfTest::Tcp(_) => {}
        IperfTest::Udp64 => {
            a.extend(["-u", "-l", "64", "-b", "0", "--udp-counters-64bit"].iter().map(|s| s.to_string()));
        }
    }
    a
}

/// Runs one iperf3 test from namespace `ns` to `to`; returns its JSON.
/// A failed test is tried again, up to [`IPERF_ATTEMPTS`] times in all: a
/// server still closing the previous test answers "busy" or resets the
/// control connection, and a loaded machine sometimes loses one.
pub fn run_iperf(ns: &str, to: IpAddr, test: IperfTest, secs: u64) -> anyhow::Result<String> {
    let args = iperf_args(test, to, secs);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let limit = Duration::from_secs(secs + 30);
    let mut attempt = 1;
    loop {
        let out = netns::exec_timeout(ns, "iperf3", &args, limit)?;
        let result = match (out.success, parse_iperf(&out.stdout)) {
            (true, Ok(_)) => return Ok(out.stdout),
            (_, Err(e)) => Err(e),
            (false, Ok(_)) => Err(anyhow::anyhow!("iperf3 failed: {}", out.stderr.trim())),
        };
        if attempt >= IPERF_ATTEMPTS {
            return result.with_context(|| format!("iperf3 {test:?}, {attempt} attempts"));
        }
        if let Err(e) = result {
            eprintln!("iperf3 {test:?} from {ns}, attempt {attempt} failed ({e:#}); trying again");
        }
        attempt += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A UDP echo in a pod, answering every datagram to port [`ECHO_PORT`];
/// stopped when dropped.
pub struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Echo {
    /// Starts the echo inside namespace `ns`.
    pub fn start(ns: &str) -> anyhow::Result<Echo> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = netns::spawn_in_netns(ns, move || -> anyhow::Result<()> {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, ECHO_PORT))?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            let _ = ready_tx.send(());
            let mut buf = [0u8; 64];
            while !flag.load(Ordering::Relaxed) {
                match s.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        let _ = s.send_to(&buf[..n], from);
                    }
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })?;
        ready_rx.recv_timeout(Duration::from_secs(5)).context("the echo did not start")?;
        Ok(Echo { stop, thread: Some(thread) })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Round trips measured by [`ping_pong`].
#[derive(Debug, Clone, PartialEq)]
pub struct RttResult {
    /// Each answered probe's round trip, microseconds.
    pub samples_us: Vec<f64>,
    /// Probes without an answer within a second.
    pub lost: usize,
}

/// Sends a probe every 2 ms for `secs` from namespace `ns` to the echo at
/// `to` and times each answer (one probe in flight at a time).
pub fn ping_pong(ns: &str, to: IpAddr, secs: f64) -> anyhow::Result<RttResult> {
    netns::in_netns(ns, move || -> anyhow::Result<RttResult> {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect(SocketAddr::from((to, ECHO_PORT)))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let mut samples = Vec::new();
        let mut lost = 0;
        let mut buf = [0u8; 64];
        let mut seq: u64 = 0;
        while Instant::now() < end {
            seq += 1;
            let t0 = Instant::now();
            s.send(&seq.to_be_bytes())?;
            loop {
                match s.recv(&mut buf) {
                    Ok(8) if buf[..8] == seq.to_be_bytes() => {
                        if seq as usize > PROBE_WARMUP {
                            samples.push(t0.elapsed().as_secs_f64() * 1e6);
                        }
                        break;
                    }
                    // A late answer to an earlier probe.
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                        lost += 1;
                        break;
                    }
                    // ICMP unreachable reported on the connected socket: the echo is not there (yet).
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        lost += 1;
                        std::thread::sleep(Duration::from_millis(10));
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if let Some(rest) = PROBE_GAP.checked_sub(t0.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        Ok(RttResult { samples_us: samples, lost })
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP_JSON: &str = r#"{"start":{},"intervals":[],"end":{"streams":[],
        "sum_sent":{"start":0,"end":1.0,"seconds":1.0,"bytes":3706716160,"bits_per_second":29700000000.0,"retransmits":3,"sender":true},
        "sum_received":{"start":0,"end":1.0,"seconds":1.0,"bytes":3706716160,"bits_per_second":29634496491.77684,"sender":true},
        "cpu_utilization_percent":{"host_total":93.8}}}"#;

    const UDP_JSON: &str = r#"{"start":{},"intervals":[],"end":{"streams":[],
        "sum":{"start":0,"end":1.000095,"seconds":1.000095,"bytes":19060480,"bits_per_second":152479265.6,
               "jitter_ms":0.0025,"lost_packets":8666,"packets":297820,"lost_percent":2.9098,"sender":true},
        "sum_sent":{"start":0,"end":1.000095,"seconds":1.000095,"bytes":19060480,"bits_per_second":152479265.6,
               "jitter_ms":0.0025,"lost_packets":8666,"packets":297820,"lost_percent":2.9098,"sender":true},
        "sum_received":{"start":0,"end":1.000095,"seconds":1.000095,"bytes":18505856,"bits_per_second":148032784.9,
               "jitter_ms":0.0025,"lost_packets":8666,"packets":297820,"lost_percent":2.9098,"sender":false}}}"#;

    #[test]
    fn iperf_tcp_takes_the_receiver_sum() {
        let r = parse_iperf_tcp(TCP_JSON).unwrap();
        assert!((r.bps - 29_634_496_491.776_84).abs() < 1.0);
    }

    #[test]
    fn iperf_udp_counts_delivered_packets_and_loss() {
        let r = parse_iperf_udp(UDP_JSON).unwrap();
        assert!((r.pps - (297_820.0 - 8_666.0) / 1.000095).abs() < 0.01);
        assert!((r.loss - 8_666.0 / 297_820.0).abs() < 1e-12);
        // Older iperf3 has only `sum`.
        let old = UDP_JSON.split(",\n        \"sum_sent\"").next().unwrap().to_string() + "}}";
        assert_eq!(parse_iperf_udp(&old).unwrap(), r);
    }

    #[test]
    fn iperf_errors_are_reported() {
        let e = parse_iperf_tcp(r#"{"start":{},"intervals":[],"end":{},"error":"unable to connect to server"}"#);
        assert!(format!("{:#}", e.unwrap_err()).contains("unable to connect"));
        assert!(parse_iperf_tcp("iperf3: error").is_err());
        assert!(parse_iperf_udp(r#"{"end":{"sum":{"packets":0,"lost_packets":0,"seconds":1}}}"#).is_err());
    }

    #[test]
    fn iperf_args_per_test() {
        let to: IpAddr = "10.244.2.2".parse().unwrap();
        assert_eq!(iperf_args(IperfTest::Tcp(1), to, 2).join(" "), "-c 10.244.2.2 -p 5201 -J -t 2");
        assert_eq!(iperf_args(IperfTest::Tcp(4), to, 10).join(" "), "-c 10.244.2.2 -p 5201 -J -t 10 -O 1 -P 4");
        assert!(iperf_args(IperfTest::Udp64, to, 2).join(" ").ends_with("-u -l 64 -b 0 --udp-counters-64bit"));
        assert_eq!(
            iperf_args(IperfTest::Udp64, to, 10).join(" "),
            "-c 10.244.2.2 -p 5201 -J -t 10 -u -l 64 -b 0 --udp-counters-64bit"
        );
    }

    const STAT: &str = "cpu  100 10 50 800 40 5 15 0 0 0\n\
                        cpu0 50 5 25 400 20 2 8 0 0 0\n\
                        cpu1 50 5 25 400 20 3 7 0 0 0\n\
                        intr 12345\nctxt 999\n";

    #[test]
    fn proc_stat_parses_and_gives_shares() {
        let a = parse_proc_stat(STAT).unwrap();
        assert_eq!(a, CpuTimes { user: 110, system: 50, idle: 840, irq: 20, steal: 0, cores: 2 });
        assert_eq!(a.total(), 1020);
        let b = CpuTimes { user: 180, system: 100, idle: 860, irq: 80, steal: 0, cores: 2 };
        // 200 ticks passed: 100 per core; 20 idle; 110 of kernel time.
        assert_eq!(b.per_core(&a), 100.0);
        assert_eq!(b.idle_pct(&a), 10.0);
        assert_eq!(b.kernel_pct(&a), 110.0);
        assert_eq!(a.idle_pct(&a), 0.0);
        assert!(parse_proc_stat("intr 1\n").is_err());
    }

    #[test]
    fn pid_stat_takes_utime_and_stime_past_odd_names() {
        let line = "4242 (weft agent) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 1234 567 0 0 20 0 5 0 100 0 0";
        assert_eq!(parse_pid_stat(line).unwrap(), 1234 + 567);
        assert!(parse_pid_stat("4242 (x) S 1").is_err());
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_pid_stat(&own).is_ok());
    }
}
