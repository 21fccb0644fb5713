//! weft-engine: moves packets between a TUN device and the underlay.
//!
//! [`Engine::start`] creates the TUN device and one worker per queue, each
//! with its own underlay sockets (`SO_REUSEPORT`) and poll loop. The control
//! plane hands it [`Snapshot`]s of peers and routes; it never talks to a
//! datastore. Kernel state other than the TUN itself (addresses, routes, MTU)
//! is set through [`sys::netlink`] by the caller. [`ebpf`] is the optional
//! kernel fast path in front of the workers (VXLAN): its programs and maps,
//! kept equal to the same snapshots.

// Only the syscall layer (`sys`) may hold `unsafe`, each block with its
// `// SAFETY:` comment.
#![deny(unsafe_code)]

pub mod coalesce;
pub mod counters;
pub mod datapath;
pub mod ebpf;
pub mod io;
pub mod route;
pub mod segment;
pub mod snapshot;
pub mod spread;
#[allow(unsafe_code)]
pub mod sys;
pub mod vnet;
pub mod wg;
pub mod worker;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::Sender;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use weft_tunnel::vxlan::Vxlan;

pub use snapshot::Families;

pub use wg::{WgDevice, WgPeer};

pub use counters::{PeerCounters, WorkerCounters};
pub use snapshot::{Peer, Snapshot};
use worker::{Control, Worker, WAKER};

/// Receive buffer per underlay socket. Bursts of a TCP window arrive faster
/// than one wakeup drains them; 8 MiB absorbs a few windows.
pub const UDP_RCVBUF: usize = 8 << 20;

/// Which encapsulation the engine speaks.
#[derive(Clone)]
pub enum Encap {
    /// VXLAN: our endpoints (VNI, port, local VTEP), one per underlay family
    /// this node has: at least one, at most one IPv4 and one IPv6.
    Vxlan(Vec<Vxlan>),
    /// WireGuard: the device, and the local underlay addresses (one per family).
    Wireguard(Arc<WgDevice>, Vec<IpAddr>),
}

/// How the engine is set up.
#[derive(Clone)]
pub struct EngineConfig {
    /// TUN device name.
    pub tun_name: String,
    /// Worker threads (and TUN queues).
    pub threads: usize,
    /// The encapsulation.
    pub encap: Encap,
    /// UDP port to receive on over IPv4 (and IPv6 for VXLAN).
    pub port: u16,
    /// UDP port over IPv6 for WireGuard (Flannel: `ListenPortV6`, 51821).
    pub port_v6: u16,
    /// MTU of the TUN device.
    pub mtu: usize,
    /// Which offloads to try; each falls back at run time when refused.
    pub offloads: Offloads,
    /// How long a worker keeps polling without sleeping after it last
    /// moved a packet, in microseconds (0: it sleeps at once). An answer
    /// arriving within that time costs no thread wakeup, which on a VM is
    /// tens of microseconds of round trip per hop.
    pub busy_poll_us: u32,
    /// A rootless node: no TUN device and no raw socket. The pod side is a
    /// packet pair to a userspace stack ([`Engine::start_rootless`]); VXLAN
    /// leaves through ordinary UDP sockets.
    pub rootless: bool,
}

/// Default of [`EngineConfig::busy_poll_us`].
pub const DEFAULT_BUSY_POLL_US: u32 = 0;

/// The offloads the engine tries. Each one the kernel refuses is dropped at
/// run time (logged once); turning one off here never asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloads {
    /// TUN `IFF_VNET_HDR` + `TUNSETOFFLOAD`: super-packet reads, software
    /// segmentation, and coalesced (software GRO) writes.
    pub tun: bool,
    /// `UDP_SEGMENT` sends on the underlay.
    pub udp_gso: bool,
    /// `UDP_GRO` receives on the underlay.
    pub udp_gro: bool,
}

impl Default for Offloads {
    fn default() -> Self {
        Offloads { tun: true, udp_gso: true, udp_gro: true }
    }
}

impl Offloads {
    /// Every offload off: one packet per read and write, as peers without
    /// offloads see it.
    pub const NONE: Offloads = Offloads { tun: false, udp_gso: false, udp_gro: false };
}

struct WorkerHandle {
    /// Says how the worker's loop ended.
    done: crossbeam_channel::Receiver<std::io::Result<()>>,
    control: Sender<Control>,
    waker: Arc<mio::Waker>,
}

/// A running engine.
pub struct Engine {
    workers: Vec<WorkerHandle>,
    counters: Vec<Arc<WorkerCounters>>,
    cfg: EngineConfig,
    /// The UDP ports bound (IPv4, IPv6): the configured ones, or the ones
    /// the kernel picked for port 0.
    ports: (u16, u16),
    /// The mark (`SO_MARK`) on every underlay socket, if any.
    fwmark: Option<u32>,
    /// The WireGuard timers' deadlines (backend WireGuard).
    deadlines: Option<Arc<wg::Deadlines>>,
    /// Gets a message when a worker stops, for [`Engine::stopped`].
    stopped: crossbeam_channel::Receiver<()>,
    /// The workers' threads (dropped after they have stopped).
    _pool: rayon::ThreadPool,
}

/// Sockets opened for all workers at one port pair.
struct Opened {
    per_worker: Vec<Vec<io::UdpUnderlay>>,
    ports: (u16, u16),
}

/// Opens every worker's underlay sockets at `port` (IPv4, and IPv6 for
/// VXLAN) and `port_v6` (IPv6 for WireGuard). Port 0 takes a free port,
/// the same for both families when `port_v6` is 0 too.
/// Opens every worker's underlay sockets at `ports` (IPv4, and IPv6 for
/// VXLAN; IPv6 for WireGuard), marked with `fwmark`. Port 0 takes a free
/// port, the same for both families when both are 0. `exclusive`: the ports
/// must not be held by anyone (see [`udp_socket`]); off only when moving our
/// own sockets to new ones on the same ports.
fn open_families(
    cfg: &EngineConfig,
    threads: usize,
    (port, port_v6): (u16, u16),
    fwmark: Option<u32>,
    exclusive: bool,
) -> std::io::Result<Opened> {
    let locals: Vec<IpAddr> = match &cfg.encap {
        Encap::Vxlan(v) => v.iter().map(|x| x.local().addr).collect(),
        Encap::Wireguard(_, l) => l.clone(),
    };
    if locals.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "no underlay address"));
    }
    let wg = matches!(cfg.encap, Encap::Wireguard(..));
    // A kernel-picked port may be taken in the other family: try again.
    let mut last_err = None;
    for _ in 0..8 {
        match open_at(cfg, &locals, wg, threads, (port, port_v6), fwmark, exclusive) {
            Ok(o) => return Ok(o),
            Err(e) if port == 0 && e.kind() == std::io::ErrorKind::AddrInUse => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| std::io::ErrorKind::AddrInUse.into()))
}

fn open_at(
    cfg: &EngineConfig,
    locals: &[IpAddr],
    wg: bool,
    threads: usize,
    (mut port, mut port_v6): (u16, u16),
    fwmark: Option<u32>,
    exclusive: bool,
) -> std::io::Result<Opened> {
    let mut per_worker: Vec<Vec<io::UdpUnderlay>> = (0..threads).map(|_| Vec::new()).collect();
    for local in locals.iter() {
        let v6_port = local.is_ipv6() && wg;
        if exclusive {
            // SO_REUSEPORT lets any socket of the same user join a port, so
            // a port is first taken by a socket without it: that fails if
            // anyone holds the port, and picks one for port 0.
            let want = if v6_port { port_v6 } else { port };
            picked(&mut port, &mut port_v6, v6_port, udp_socket(*local, want, false)?.local_addr()?.port());
        }
        for families in per_worker.iter_mut() {
            let want = if v6_port { port_v6 } else { port };
            let sock = udp_socket(*local, want, true)?;
            if let Some(mark) = fwmark {
                socket2::SockRef::from(&sock).set_mark(mark)?;
            }
            if want == 0 {
                picked(&mut port, &mut port_v6, v6_port, sock.local_addr()?.port());
            }
            let tx = match &cfg.encap {
                Encap::Vxlan(_) if !cfg.rootless => Some(sys::raw::RawUdpTx::open(*local)?),
                _ => None,
            };
            // Without a raw socket VXLAN has only the pool to send from.
            let vxlan = matches!(cfg.encap, Encap::Vxlan(_));
            let gso_pool = if vxlan_gso(cfg) || (vxlan && cfg.rootless) { gso_pool(*local)? } else { Vec::new() };
            let gro = if cfg.offloads.udp_gro {
                match sys::mmsg::set_udp_gro(std::os::fd::AsRawFd::as_raw_fd(&sock)) {
                    Ok(()) => Some(io::GroRx::default()),
                    Err(e) => {
                        if !GRO_REFUSED.swap(true, Ordering::Relaxed) {
                            tracing::warn!(error = %e, "UDP_GRO refused by the kernel; one datagram per buffer");
                        }
                        None
                    }
                }
            } else {
                None
            };
            let wg_gso = cfg.offloads.udp_gso && wg;
            if wg {
                // Bound to the wildcard address: learn which local address
                // each peer sends to, and answer from it.
                sys::mmsg::set_recv_pktinfo(std::os::fd::AsRawFd::as_raw_fd(&sock), local.is_ipv6())?;
            }
            let io = io::UdpUnderlay {
                rx: mio::net::UdpSocket::from_std(sock),
                tx,
                v6: local.is_ipv6(),
                gso_pool,
                pool_singly: !cfg.offloads.udp_gso,
                gro,
                wg_gso,
                gso_ceiling: io::GsoCeiling::default(),
            };
            families.push(io);
        }
    }
    Ok(Opened { per_worker, ports: (port, port_v6) })
}

/// Records the port `got` picked for port 0: every later socket (and the
/// other family, when its port was 0 too) joins it.
fn picked(port: &mut u16, port_v6: &mut u16, v6_port: bool, got: u16) {
    if v6_port {
        *port_v6 = got;
    } else {
        *port = got;
        if *port_v6 == 0 {
            *port_v6 = got;
        }
    }
}

impl Engine {
    /// Creates the TUN device and starts the workers with `snapshot`.
    pub fn start(cfg: &EngineConfig, snapshot: Arc<Snapshot>) -> std::io::Result<Engine> {
        let threads = cfg.threads.max(1);
        let opened = open_families(cfg, threads, (cfg.port, cfg.port_v6), None, true)?;
        let queues = sys::tun::TunQueue::create(&cfg.tun_name, threads, cfg.offloads.tun)?;
        Self::start_on(cfg, snapshot, queues, opened)
    }

    /// Starts a rootless node's engine: one worker, whose pod side is one
    /// end of a packet pair; the other end, returned, is for the userspace
    /// stack. Needs no privilege (`cfg.rootless` must be set: no raw socket).
    pub fn start_rootless(cfg: &EngineConfig, snapshot: Arc<Snapshot>) -> std::io::Result<(Engine, io::PacketEnd)> {
        if !cfg.rootless {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "start_rootless needs cfg.rootless"));
        }
        let opened = open_families(cfg, 1, (cfg.port, cfg.port_v6), None, true)?;
        let (ours, theirs) = io::packet_pair()?;
        let engine = Self::start_on(cfg, snapshot, vec![io::PacketPod(ours)], opened)?;
        Ok((engine, theirs))
    }

    /// Starts one worker per pod side in `pods`, over the sockets `opened`.
    fn start_on<P>(cfg: &EngineConfig, snapshot: Arc<Snapshot>, pods: Vec<P>, opened: Opened) -> std::io::Result<Engine>
    where
        P: io::PodIo + std::os::fd::AsRawFd + Send + 'static,
    {
        let threads = pods.len();
        let wg = match &cfg.encap {
            Encap::Vxlan(_) => None,
            Encap::Wireguard(d, _) => Some(d.clone()),
        };
        let queues = pods;
        let mut workers = Vec::with_capacity(threads);
        let mut handles = Vec::with_capacity(threads);
        let mut counters = Vec::with_capacity(threads);
        let mut deadlines = None;
        for ((id, tun), families) in queues.into_iter().enumerate().zip(opened.per_worker) {
            let poll = mio::Poll::new()?;
            let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
            if id == 0 && wg.is_some() {
                // Worker 0 drives the WireGuard timers; the others wake it
                // when they bring a deadline forward.
                deadlines = Some(Arc::new(wg::Deadlines::new(waker.clone())));
            }
            let (tx, rx) = crossbeam_channel::unbounded();
            let c = Arc::new(WorkerCounters::default());
            let backend = match &cfg.encap {
                Encap::Vxlan(v) => datapath::Backend::Vxlan(v.clone()),
                Encap::Wireguard(d, _) => datapath::Backend::Wireguard(d.clone()),
            };
            let mut dp = datapath::Datapath::new(tun, families, backend, snapshot.clone(), c.clone(), cfg.mtu);
            dp.deadlines = deadlines.clone();
            dp.timer_owner = id == 0;
            let busy_poll = std::time::Duration::from_micros(cfg.busy_poll_us.into());
            workers.push(Worker { poll, dp, control: rx, busy_poll });
            let (done_tx, done) = crossbeam_channel::bounded(1);
            handles.push((WorkerHandle { done, control: tx, waker }, done_tx));
            counters.push(c);
        }
        // WireGuard's AEAD spreads over the workers (see `spread`): they are
        // the threads of one rayon pool and know how to wake each other.
        let crew = Arc::new(spread::Crew::new(handles.iter().map(|(h, _)| h.waker.clone()).collect()));
        for (id, w) in workers.iter_mut().enumerate() {
            w.dp.crew = Some((crew.clone(), id));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|id| format!("weft-worker-{id}"))
            .panic_handler(|_| tracing::error!("a worker panicked"))
            .build()
            .map_err(std::io::Error::other)?;
        let (workers, slots): (Vec<WorkerHandle>, Vec<_>) =
            handles.into_iter().zip(workers).map(|((h, done), w)| (h, Some((w, done)))).unzip();
        // Each thread takes its own worker and the one sender of its `done`.
        let slots = std::sync::Mutex::new(slots);
        let (stopped_tx, stopped) = crossbeam_channel::unbounded();
        pool.spawn_broadcast(move |ctx| {
            let id = ctx.index();
            let taken = slots.lock().ok().and_then(|mut s| s.get_mut(id).and_then(Option::take));
            let Some((w, done)) = taken else { return };
            let counters = w.dp.counters.clone();
            spread::set_thread_counters(counters.clone());
            // Marks the worker stopped however its loop ends, a panic included.
            struct Stopped(Arc<WorkerCounters>, crossbeam_channel::Sender<()>);
            impl Drop for Stopped {
                fn drop(&mut self) {
                    self.0.stopped.store(true, Ordering::Relaxed);
                    let _ = self.1.send(());
                }
            }
            let _stopped = Stopped(counters, stopped_tx.clone());
            let r = w.run();
            if let Err(e) = &r {
                tracing::error!(worker = id, error = %e, "worker stopped");
            }
            let _ = done.send(r);
        });
        if let (Some(d), Some(dl)) = (&wg, &deadlines) {
            d.attach_timers(dl.clone());
        }
        if cfg.rootless {
            tracing::info!(threads, port = opened.ports.0, "engine started (rootless)");
        } else {
            tracing::info!(tun = %cfg.tun_name, threads, port = opened.ports.0, "engine started");
        }
        Ok(Engine {
            workers,
            counters,
            cfg: cfg.clone(),
            ports: opened.ports,
            fwmark: None,
            deadlines,
            stopped,
            _pool: pool,
        })
    }

    /// Swaps `snapshot` into every worker at its next batch boundary.
    pub fn update(&self, snapshot: Arc<Snapshot>) {
        for w in &self.workers {
            let _ = w.control.send(Control::Snapshot(snapshot.clone()));
            let _ = w.waker.wake();
        }
    }

    /// The UDP ports the workers listen on (IPv4, IPv6).
    pub fn ports(&self) -> (u16, u16) {
        self.ports
    }

    /// Moves every worker to new UDP sockets at `ports` (0: a free one),
    /// marked with `fwmark` (`SO_MARK`, for policy routing such as
    /// wg-quick's). New ports must be free; the current ones are reopened
    /// (a new mark). Nothing changes on an error. Returns the ports bound.
    pub fn rebind(&mut self, ports: (u16, u16), fwmark: Option<u32>) -> std::io::Result<(u16, u16)> {
        let exclusive = ports != self.ports;
        let opened = open_families(&self.cfg, self.workers.len(), ports, fwmark, exclusive)?;
        for (w, families) in self.workers.iter().zip(opened.per_worker) {
            let _ = w.control.send(Control::Families(families));
            let _ = w.waker.wake();
        }
        self.ports = opened.ports;
        self.fwmark = fwmark;
        Ok(self.ports)
    }

    /// Replaces the WireGuard device (a new private key). The peers built
    /// with the old key must be replaced too, with [`Engine::update`].
    pub fn set_wg_device(&self, device: Arc<WgDevice>) {
        if let Some(d) = &self.deadlines {
            device.attach_timers(d.clone());
        }
        for w in &self.workers {
            let _ = w.control.send(Control::WgDevice(device.clone()));
            let _ = w.waker.wake();
        }
    }

    /// Whether any worker has stopped on its own (its TUN queue or socket
    /// failed: the device was deleted, for instance).
    pub fn failed(&self) -> bool {
        self.counters.iter().any(|c| c.stopped.load(Ordering::Relaxed))
    }

    /// Gets a message each time a worker stops (see [`Engine::failed`]):
    /// lets a caller wait for that without polling.
    pub fn stopped(&self) -> crossbeam_channel::Receiver<()> {
        self.stopped.clone()
    }

    /// Per-worker counters.
    pub fn counters(&self) -> &[Arc<WorkerCounters>] {
        &self.counters
    }

    /// Stops the workers and closes the TUN queues, which removes the device.
    pub fn stop(self) {
        for w in &self.workers {
            let _ = w.control.send(Control::Stop);
            let _ = w.waker.wake();
        }
        for w in &self.workers {
            // A worker that panicked drops its sender: that ends the wait too.
            let _ = w.done.recv();
        }
    }
}

/// Set once `UDP_GRO` was refused, so that it is logged once.
static GRO_REFUSED: AtomicBool = AtomicBool::new(false);

/// UDP sockets per worker and family that VXLAN sends `UDP_SEGMENT`
/// batches from, each bound to its own ephemeral source port; a datagram's
/// flow-hashed source port picks one, so one flow always leaves from one
/// port and different flows spread over eight (receivers' RSS sees eight
/// outer flows per node pair instead of one).
pub const GSO_POOL: usize = 8;

fn vxlan_gso(cfg: &EngineConfig) -> bool {
    cfg.offloads.udp_gso && matches!(cfg.encap, Encap::Vxlan(_))
}

/// Opens the GSO pool: blocking sockets (a full send buffer holds the
/// worker back rather than drop) bound to `local` on ephemeral ports.
fn gso_pool(local: IpAddr) -> std::io::Result<Vec<std::net::UdpSocket>> {
    let mut pool = Vec::with_capacity(GSO_POOL);
    for _ in 0..GSO_POOL {
        let domain = if local.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        let _ = s.set_send_buffer_size(4 << 20);
        if local.is_ipv4() {
            sys::mmsg::set_pmtu_omit(std::os::fd::AsRawFd::as_raw_fd(&s))?;
        }
        s.bind(&SockAddr::from(SocketAddr::new(local, 0)))?;
        pool.push(s.into());
    }
    Ok(pool)
}

/// A non-blocking UDP socket on the tunnel port, of the underlay's family;
/// with `reuse`, shared by the workers through `SO_REUSEPORT`.
fn udp_socket(local: IpAddr, port: u16, reuse: bool) -> std::io::Result<std::net::UdpSocket> {
    let (domain, any) = match local {
        IpAddr::V4(_) => (Domain::IPV4, IpAddr::from([0u8; 4])),
        IpAddr::V6(_) => (Domain::IPV6, IpAddr::from([0u16; 8])),
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if local.is_ipv6() {
        s.set_only_v6(true)?;
    } else {
        // Outer packets without DF, as the kernel's tunnels send them. IPv6
        // routers never fragment: there the kernel's path MTU discovery
        // stays on.
        sys::mmsg::set_pmtu_omit(std::os::fd::AsRawFd::as_raw_fd(&s))?;
    }
    s.set_reuse_port(reuse)?;
    s.set_nonblocking(true)?;
    // A smaller buffer than asked for is fine; the kernel caps it at rmem_max.
    let _ = s.set_recv_buffer_size(UDP_RCVBUF);
    s.bind(&SockAddr::from(SocketAddr::new(any, port)))?;
    Ok(s.into())
}
