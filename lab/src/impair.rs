//! The impairment relay (`weft lab --impair`): this kernel has no netem, so
//! a userspace relay stands on the first node's underlay link and loses,
//! duplicates, delays and reorders its UDP datagrams.
//!
//! In the underlay namespace the node's port leaves the lab bridge for a
//! bridge of its own, `imp<i>`, with a TAP device beside it; a second TAP
//! sits on the lab bridge. The relay (`weft lab relay`, a process of the
//! lab with a pid file like the agents) copies Ethernet frames between the
//! two TAPs, one thread per direction reading and one writing. Only UDP
//! datagrams (what VXLAN and WireGuard put on the underlay) are impaired;
//! ARP and neighbour discovery pass untouched, so the link itself stays up.
//!
//! Every datagram's fate is four draws, in order, from a generator seeded
//! with `seed` and the direction: lost, duplicated, reordered, jitter. The
//! n-th datagram in a direction meets the same fate for the same seed,
//! whatever the timing. A delayed datagram is due `delay ± jitter` after it
//! arrived; a reordered one is held back a further `delay + jitter + 1 ms`,
//! so those behind it overtake it. A duplicate leaves right after its
//! original.

use std::collections::BinaryHeap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::netns::{self, ip};
use crate::plan::Lab;

/// What the relay does to UDP datagrams, in both directions.
#[derive(Clone, Debug, PartialEq)]
pub struct Impairment {
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Probability that a datagram is held back behind those after it.
    pub reorder: f64,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
    /// Added one-way delay.
    pub delay: Duration,
    /// Uniform spread around `delay` (never below zero).
    pub jitter: Duration,
    /// Seed of the fates.
    pub seed: u64,
}

impl Default for Impairment {
    fn default() -> Self {
        Impairment { loss: 0.0, reorder: 0.0, duplicate: 0.0, delay: Duration::ZERO, jitter: Duration::ZERO, seed: 1 }
    }
}

/// The keys `--impair` takes, with what each accepts.
const KEYS: &str = "loss=P%, reorder=P%, duplicate=P%, delay=Nms, jitter=Nms, seed=N (P from 0 to 100, N ms up to \
                    10000)";

impl FromStr for Impairment {
    type Err = anyhow::Error;

    /// `loss=10%,reorder=5%,duplicate=1%,delay=5ms,jitter=2ms,seed=7`, any
    /// subset in any order; a refusal names the key, the value and what is
    /// accepted.
    fn from_str(s: &str) -> anyhow::Result<Impairment> {
        let mut imp = Impairment::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) =
                item.split_once('=').with_context(|| format!("--impair {item}: key=value, one of {KEYS}"))?;
            let bad = || anyhow::anyhow!("--impair {key}={value}: {KEYS}");
            let percent = || -> anyhow::Result<f64> {
                let p: f64 = value.strip_suffix('%').unwrap_or(value).trim().parse().map_err(|_| bad())?;
                if !(0.0..=100.0).contains(&p) {
                    return Err(bad());
                }
                Ok(p / 100.0)
            };
            let millis = || -> anyhow::Result<Duration> {
                let ms: u64 = value.strip_suffix("ms").unwrap_or(value).trim().parse().map_err(|_| bad())?;
                if ms > 10_000 {
                    return Err(bad());
                }
                Ok(Duration::from_millis(ms))
            };
            match key.trim() {
                "loss" => imp.loss = percent()?,
                "reorder" => imp.reorder = percent()?,
                "duplicate" => imp.duplicate = percent()?,
                "delay" => imp.delay = millis()?,
                "jitter" => imp.jitter = millis()?,
                "seed" => imp.seed = value.trim().parse().map_err(|_| bad())?,
                _ => return Err(bad()),
            }
        }
        Ok(imp)
    }
}

impl fmt::Display for Impairment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "loss={}%,reorder={}%,duplicate={}%,delay={}ms,jitter={}ms,seed={}",
            self.loss * 100.0,
            self.reorder * 100.0,
            self.duplicate * 100.0,
            self.delay.as_millis(),
            self.jitter.as_millis(),
            self.seed
        )
    }
}

/// One datagram's fate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fate {
    pub lost: bool,
    pub duplicated: bool,
    pub reordered: bool,
    /// When it leaves, after it arrived.
    pub after: Duration,
}

/// The fates of one direction's datagrams, in order.
pub struct Dice {
    rng: rand::rngs::StdRng,
    spec: Impairment,
}

impl Dice {
    /// Direction 0 is towards the node, 1 from it.
    pub fn new(spec: &Impairment, direction: u64) -> Dice {
        let seed = spec.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ direction;
        Dice { rng: rand::rngs::StdRng::seed_from_u64(seed), spec: spec.clone() }
    }

    /// The next datagram's fate: always four draws, so fates never shift.
    pub fn roll(&mut self) -> Fate {
        let s = &self.spec;
        let (l, d, r, j): (f64, f64, f64, f64) = (self.rng.gen(), self.rng.gen(), self.rng.gen(), self.rng.gen());
        let spread = s.jitter.as_secs_f64() * (2.0 * j - 1.0);
        let mut after = Duration::from_secs_f64((s.delay.as_secs_f64() + spread).max(0.0));
        let reordered = r < s.reorder;
        if reordered {
            after += s.delay + s.jitter + Duration::from_millis(1);
        }
        Fate { lost: l < s.loss, duplicated: d < s.duplicate, reordered, after }
    }
}

/// What the relay did in one direction.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DirectionStats {
    /// UDP datagrams that reached the relay.
    pub datagrams: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Other frames (ARP, neighbour discovery), passed untouched.
    pub other: u64,
}

impl fmt::Display for DirectionStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} datagrams, {} lost, {} duplicated, {} reordered",
            self.datagrams, self.lost, self.duplicated, self.reordered
        )
    }
}

/// What the relay did, as its stats file holds it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RelayStats {
    pub spec: String,
    pub to_node: DirectionStats,
    pub from_node: DirectionStats,
}

#[derive(Default)]
struct Counters {
    datagrams: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    other: AtomicU64,
}

impl Counters {
    fn read(&self) -> DirectionStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DirectionStats {
            datagrams: g(&self.datagrams),
            lost: g(&self.lost),
            duplicated: g(&self.duplicated),
            reordered: g(&self.reordered),
            other: g(&self.other),
        }
    }
}

/// Whether an Ethernet frame carries a UDP datagram (IPv4, or IPv6 without
/// extension headers: what VXLAN and WireGuard send).
pub fn is_udp(frame: &[u8]) -> bool {
    match frame.get(12..14) {
        Some([0x08, 0x00]) => frame.get(14 + 9) == Some(&17),
        Some([0x86, 0xdd]) => frame.get(14 + 6) == Some(&17),
        _ => false,
    }
}

/// A frame waiting: when it leaves, its arrival number, its bytes.
type Waiting = std::cmp::Reverse<(Instant, u64, Vec<u8>)>;

/// Frames waiting for their time, earliest first (then in arrival order).
#[derive(Default)]
struct Queue {
    heap: Mutex<BinaryHeap<Waiting>>,
    ready: Condvar,
}

/// The relay's body: copies frames between TAPs `node_tap` (towards the
/// node) and `underlay_tap` (towards the lab bridge), both made here, and
/// writes its counters to `stats` every 200 ms. Runs until killed.
pub fn relay(node_tap: &str, underlay_tap: &str, spec: &Impairment, stats: &Path) -> anyhow::Result<()> {
    let open = |name: &str| {
        tun_rs::DeviceBuilder::new()
            .name(name)
            .layer(tun_rs::Layer::L2)
            .packet_information(false)
            .build_sync()
            .with_context(|| format!("creating TAP {name}"))
    };
    let (node, under) = (Arc::new(open(node_tap)?), Arc::new(open(underlay_tap)?));
    let counters: [Arc<Counters>; 2] = Default::default();
    // Direction 0: from the underlay to the node; 1: from the node.
    for (dir, from, to) in [(0u64, under.clone(), node.clone()), (1, node.clone(), under.clone())] {
        let queue = Arc::new(Queue::default());
        let (c, q, s) = (counters[dir as usize].clone(), queue.clone(), spec.clone());
        std::thread::spawn(move || read_side(&from, &q, &c, Dice::new(&s, dir)));
        std::thread::spawn(move || write_side(&to, &queue));
    }
    let tmp = stats.with_extension("tmp");
    loop {
        let s = RelayStats { spec: spec.to_string(), to_node: counters[0].read(), from_node: counters[1].read() };
        std::fs::write(&tmp, serde_json::to_vec(&s)?)?;
        std::fs::rename(&tmp, stats)?;
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn read_side(from: &tun_rs::SyncDevice, queue: &Queue, c: &Counters, mut dice: Dice) {
    let mut buf = vec![0u8; 65536];
    let mut seq = 0u64;
    loop {
        let n = match from.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("relay: read: {e}");
                std::process::exit(1);
            }
        };
        let now = Instant::now();
        let frame = &buf[..n];
        let mut push = |at: Instant, f: Vec<u8>| {
            seq += 1;
            queue.heap.lock().expect("queue lock").push(std::cmp::Reverse((at, seq, f)));
            queue.ready.notify_one();
        };
        if !is_udp(frame) {
            c.other.fetch_add(1, Ordering::Relaxed);
            push(now, frame.to_vec());
            continue;
        }
        c.datagrams.fetch_add(1, Ordering::Relaxed);
        let fate = dice.roll();
        if fate.lost {
            c.lost.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if fate.reordered {
            c.reordered.fetch_add(1, Ordering::Relaxed);
        }
        push(now + fate.after, frame.to_vec());
        if fate.duplicated {
            c.duplicated.fetch_add(1, Ordering::Relaxed);
            push(now + fate.after, frame.to_vec());
        }
    }
}

fn write_side(to: &tun_rs::SyncDevice, queue: &Queue) {
    let mut heap = queue.heap.lock().expect("queue lock");
    loop {
        let now = Instant::now();
        match heap.peek() {
            None => heap = queue.ready.wait(heap).expect("queue lock"),
            Some(std::cmp::Reverse((at, _, _))) if *at > now => {
                let wait = *at - now;
                heap = queue.ready.wait_timeout(heap, wait).expect("queue lock").0;
            }
            Some(_) => {
                let Some(std::cmp::Reverse((_, _, frame))) = heap.pop() else { continue };
                drop(heap);
                // A frame the TAP refuses (the link going down) is lost, as on a wire.
                let _ = to.send(&frame);
                heap = queue.heap.lock().expect("queue lock");
            }
        }
    }
}

/// The TAP names of node `index`'s relay: towards the node, towards the bridge.
fn taps(index: usize) -> (String, String) {
    (format!("ia{index}"), format!("ib{index}"))
}

/// Where the relay of node `index` writes its counters.
pub(crate) fn stats_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("impair-n{index}.json"))
}

/// Puts the relay on the underlay link of node `index` (see the module
/// doc): starts it, waits for its TAPs, and bridges them in.
pub(crate) fn install(lab: &Lab, index: usize, spec: &Impairment) -> anyhow::Result<()> {
    let ul = format!("{}-ul", lab.opts.name);
    let (ta, tb) = taps(index);
    let stats = stats_path(&lab.dir, index);
    let log = std::fs::File::create(lab.dir.join(format!("impair-n{index}.log")))?;
    use std::os::unix::process::CommandExt;
    let child = Command::new("ip")
        .args(["netns", "exec", &ul])
        .arg(&lab.opts.weft_bin)
        .args(["lab", "relay", "--node-tap", &ta, "--underlay-tap", &tb, "--impair", &spec.to_string(), "--stats"])
        .arg(&stats)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the impairment relay")?;
    std::fs::write(lab.dir.join(format!("impair-n{index}.pid")), child.id().to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stats.exists() {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(lab.dir.join(format!("impair-n{index}.log"))).unwrap_or_default();
            anyhow::bail!("the impairment relay did not start within 10 s: {log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let port = format!("n{index}");
    let bridge = format!("imp{index}");
    ip(&["-n", &ul, "link", "add", &bridge, "type", "bridge"])?;
    ip(&["-n", &ul, "link", "set", &port, "nomaster"])?;
    for (dev, master) in [(&port, &bridge), (&ta, &bridge), (&tb, &"br0".to_string())] {
        ip(&["-n", &ul, "link", "set", dev, "master", master, "up"])?;
    }
    ip(&["-n", &ul, "link", "set", &bridge, "up"])?;
    netns::exec(&ul, "ip", &["link", "show", &ta]).context("the relay's TAP")?;
    Ok(())
}

impl Lab {
    /// What the impairment relay has done so far (`--impair` labs).
    pub fn impair_stats(&self) -> anyhow::Result<RelayStats> {
        read_stats(&self.dir, self.nodes[0].index)
    }
}

/// What the relay of node `index` has done so far.
pub(crate) fn read_stats(dir: &Path, index: usize) -> anyhow::Result<RelayStats> {
    let path = stats_path(dir, index);
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_slice(&text)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_parses_prints_back_and_refuses_naming_the_key() {
        let s: Impairment = "loss=10%,reorder=5%,duplicate=1%,delay=5ms,jitter=2ms,seed=7".parse().unwrap();
        assert_eq!(s.loss, 0.1);
        assert_eq!((s.delay, s.jitter, s.seed), (Duration::from_millis(5), Duration::from_millis(2), 7));
        assert_eq!(s.to_string().parse::<Impairment>().unwrap(), s);
        for (bad, key) in [("loss=120%", "loss=120%"), ("delay=fast", "delay=fast"), ("drop=1%", "drop=1%")] {
            let e = bad.parse::<Impairment>().unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("loss=P%"), "{e}");
        }
    }

    #[test]
    fn fates_follow_the_seed_and_the_rates() {
        let spec: Impairment = "loss=10%,duplicate=1%,reorder=5%,delay=5ms,jitter=2ms,seed=3".parse().unwrap();
        let a: Vec<Fate> = (0..20_000)
            .map({
                let mut d = Dice::new(&spec, 1);
                move |_| d.roll()
            })
            .collect();
        let mut again = Dice::new(&spec, 1);
        assert!(a.iter().all(|f| *f == again.roll()), "same seed, same fates");
        let mut other = Dice::new(&spec, 0);
        assert!(a.iter().any(|f| *f != other.roll()), "the other direction has its own fates");
        let share = |p: fn(&Fate) -> bool| a.iter().filter(|f| p(f)).count() as f64 / a.len() as f64;
        assert!((share(|f| f.lost) - 0.10).abs() < 0.01);
        assert!((share(|f| f.duplicated) - 0.01).abs() < 0.003);
        assert!((share(|f| f.reordered) - 0.05).abs() < 0.006);
        for f in &a {
            let base = if f.reordered { Duration::from_millis(8) } else { Duration::ZERO };
            assert!(f.after >= base + Duration::from_millis(3) && f.after <= base + Duration::from_millis(7), "{f:?}");
        }
    }

    #[test]
    fn only_udp_frames_are_impaired() {
        let mut v4 = vec![0u8; 60];
        v4[12..14].copy_from_slice(&[0x08, 0x00]);
        v4[23] = 17;
        assert!(is_udp(&v4));
        v4[23] = 6;
        assert!(!is_udp(&v4));
        let mut arp = vec![0u8; 60];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(!is_udp(&arp));
        let mut v6 = vec![0u8; 80];
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        v6[20] = 17;
        assert!(is_udp(&v6));
        v6[20] = 58;
        assert!(!is_udp(&v6), "neighbour discovery passes");
    }
}
