//! weft-engine: moves packets between a TUN device and the underlay.
//!
//! [`Engine::start`] creates the TUN device and one worker per queue, each
//! with its own underlay sockets (`SO_REUSEPORT`) and poll loop. The control
//! plane hands it [`Snapshot`]s of peers and routes; it never talks to a
//! datastore. Kernel state other than the TUN itself (addresses, routes, MTU)
//! is set through [`sys::netlink`] by the caller.

pub mod counters;
pub mod io;
pub mod route;
pub mod segment;
pub mod snapshot;
pub mod sys;
pub mod worker;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use weft_tunnel::vxlan::Vxlan;

pub use snapshot::Families;

pub use counters::{PeerCounters, WorkerCounters};
pub use snapshot::{Peer, Snapshot};
use worker::{Control, Worker, WAKER};

/// Receive buffer per underlay socket. Bursts of a TCP window arrive faster
/// than one wakeup drains them; 8 MiB absorbs a few windows.
pub const UDP_RCVBUF: usize = 8 << 20;

/// How the engine is set up.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// TUN device name.
    pub tun_name: String,
    /// Worker threads (and TUN queues).
    pub threads: usize,
    /// Our VXLAN endpoints (VNI, port, local VTEP), one per underlay family
    /// this node has: at least one, at most one IPv4 and one IPv6.
    pub vxlan: Vec<Vxlan>,
    /// UDP port to receive on.
    pub port: u16,
    /// MTU of the TUN device.
    pub mtu: usize,
}

struct WorkerHandle {
    thread: JoinHandle<std::io::Result<()>>,
    control: Sender<Control>,
    waker: Arc<mio::Waker>,
}

/// A running engine.
pub struct Engine {
    workers: Vec<WorkerHandle>,
    counters: Vec<Arc<WorkerCounters>>,
}

impl Engine {
    /// Creates the TUN device and starts the workers with `snapshot`.
    pub fn start(cfg: &EngineConfig, snapshot: Arc<Snapshot>) -> std::io::Result<Engine> {
        let threads = cfg.threads.max(1);
        let queues = sys::tun::TunQueue::create(&cfg.tun_name, threads)?;
        if cfg.vxlan.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "no underlay address"));
        }
        let mut workers = Vec::with_capacity(threads);
        let mut counters = Vec::with_capacity(threads);
        for (id, tun) in queues.into_iter().enumerate() {
            let poll = mio::Poll::new()?;
            let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
            let (tx, rx) = crossbeam_channel::unbounded();
            let c = Arc::new(WorkerCounters::default());
            let mut families = Vec::with_capacity(cfg.vxlan.len());
            for vx in &cfg.vxlan {
                let local = vx.local().addr;
                let io = io::UdpUnderlay {
                    rx: udp_socket(local, cfg.port)?,
                    tx: sys::raw::RawUdpTx::open(local)?,
                    v6: local.is_ipv6(),
                };
                families.push(worker::Family { vxlan: vx.clone(), io });
            }
            let w = Worker {
                poll,
                tun,
                families,
                snapshot: snapshot.clone(),
                control: rx,
                counters: c.clone(),
                mtu: cfg.mtu,
                scratch: vec![0u8; cfg.mtu],
            };
            let thread = std::thread::Builder::new().name(format!("weft-worker-{id}")).spawn(move || {
                let counters = w.counters.clone();
                let r = w.run();
                counters.stopped.store(true, std::sync::atomic::Ordering::Relaxed);
                if let Err(e) = &r {
                    tracing::error!(worker = id, error = %e, "worker stopped");
                }
                r
            })?;
            workers.push(WorkerHandle { thread, control: tx, waker });
            counters.push(c);
        }
        tracing::info!(tun = %cfg.tun_name, threads, port = cfg.port, "engine started");
        Ok(Engine { workers, counters })
    }

    /// Swaps `snapshot` into every worker at its next batch boundary.
    pub fn update(&self, snapshot: Arc<Snapshot>) {
        for w in &self.workers {
            let _ = w.control.send(Control::Snapshot(snapshot.clone()));
            let _ = w.waker.wake();
        }
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
        for w in self.workers {
            let _ = w.thread.join();
        }
    }
}

/// A non-blocking UDP socket on the tunnel port, shared by the workers
/// through `SO_REUSEPORT`, of the underlay's family.
fn udp_socket(local: IpAddr, port: u16) -> std::io::Result<mio::net::UdpSocket> {
    let (domain, any) = match local {
        IpAddr::V4(_) => (Domain::IPV4, IpAddr::from([0u8; 4])),
        IpAddr::V6(_) => (Domain::IPV6, IpAddr::from([0u16; 8])),
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if local.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    // A smaller buffer than asked for is fine; the kernel caps it at rmem_max.
    let _ = s.set_recv_buffer_size(UDP_RCVBUF);
    s.bind(&SockAddr::from(SocketAddr::new(any, port)))?;
    Ok(mio::net::UdpSocket::from_std(s.into()))
}
