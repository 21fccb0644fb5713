//! The stack's thread: one smoltcp interface over the packet pair, host
//! sockets (the SOCKS5 server, forwards, exposed services) in one mio poll,
//! and the pump that moves bytes between the two.
//!
//! One thread owns everything: the interface, every smoltcp socket and
//! every host socket, so nothing is locked. Host sockets are edge-triggered
//! (mio): a connection remembers that its host side is readable or writable
//! until a call says `WouldBlock`. Bytes move between a host stream and a
//! smoltcp socket without an intermediate buffer: the host stream reads
//! straight into the smoltcp socket's send buffer and writes straight from
//! its receive buffer.

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant as StdInstant};

use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint};
use weft_engine::io::PacketEnd;

use crate::socks::{self, Auth, Command, Handshake, Step, Target};
pub use weft_control::rootless::{Expose, Forward, Proto};

/// What the stack is given.
#[derive(Debug, Clone)]
pub struct Config {
    /// The node's pod addresses, each with the prefix of its cluster
    /// network (every pod of the cluster is on link).
    pub addrs: Vec<(IpAddr, u8)>,
    /// The pod MTU (the engine's).
    pub mtu: usize,
    /// Where the SOCKS5 server listens; none for no server.
    pub socks: Option<SocketAddr>,
    /// The SOCKS5 server's authentication.
    pub auth: Auth,
    pub forwards: Vec<Forward>,
    pub exposes: Vec<Expose>,
    /// Connections (TCP, UDP associations and UDP flows) open at once.
    pub max_connections: usize,
    /// Each TCP connection's receive and send buffers, in bytes.
    pub tcp_buffer: usize,
}

/// Default of [`Config::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Default of [`Config::tcp_buffer`]: a window that keeps a
/// gigabit busy at a few milliseconds of round trip.
pub const DEFAULT_TCP_BUFFER: usize = 512 << 10;

/// A connect that is not established after this is answered "host unreachable".
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A UDP flow without a datagram for this long is forgotten.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// Listening smoltcp sockets kept per exposed TCP port: SYNs that arrive
/// together (smoltcp has no accept queue).
const LISTEN_BACKLOG: usize = 8;
/// Packets held when the engine's end of the pair is full.
const TX_BACKLOG: usize = 256;

/// What the stack counts. Relaxed atomics, read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections and flows opened (SOCKS5, forwards, exposed ports).
    pub opened: AtomicU64,
    /// Connections and flows open now.
    pub open: AtomicU64,
    /// Refused because [`Config::max_connections`] were open.
    pub refused_cap: AtomicU64,
    /// SOCKS5 clients whose handshake was malformed or refused.
    pub socks_refused: AtomicU64,
    /// Connects to pods (or to exposed local services) that failed.
    pub connect_failed: AtomicU64,
    /// UDP datagrams dropped (no room, bad header, unknown target).
    pub udp_dropped: AtomicU64,
    /// Packets from the engine and to it.
    pub packets_in: AtomicU64,
    pub packets_out: AtomicU64,
    /// Packets to the engine dropped because its end was full.
    pub packets_dropped: AtomicU64,
}

impl Counters {
    /// Every counter with its name, for the metrics endpoint.
    pub fn pairs(&self) -> [(&'static str, &'static str, u64); 9] {
        [
            ("opened", "Connections and UDP flows opened through the userspace stack.", self.opened.load(Relaxed)),
            ("open", "Connections and UDP flows open in the userspace stack.", self.open.load(Relaxed)),
            ("refused_cap", "Connections refused at rootless-max-connections.", self.refused_cap.load(Relaxed)),
            ("socks_refused", "SOCKS5 handshakes malformed or refused.", self.socks_refused.load(Relaxed)),
            ("connect_failed", "Connects that failed (pods or exposed services).", self.connect_failed.load(Relaxed)),
            ("udp_dropped", "UDP datagrams the userspace stack dropped.", self.udp_dropped.load(Relaxed)),
            ("packets_in", "Packets from the engine into the userspace stack.", self.packets_in.load(Relaxed)),
            ("packets_out", "Packets from the userspace stack to the engine.", self.packets_out.load(Relaxed)),
            ("packets_dropped", "Packets to the engine dropped: its end was full.", self.packets_dropped.load(Relaxed)),
        ]
    }
}

/// The running stack.
pub struct Netstack {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
    socks: Option<SocketAddr>,
}

impl Netstack {
    /// Binds every host socket (so that a refused address is an error
    /// here) and starts the stack's thread on `dev`.
    pub fn start(cfg: Config, dev: PacketEnd) -> io::Result<Netstack> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut stack = Stack::new(cfg, dev, poll, counters.clone())?;
        let socks = stack.socks_addr;
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("weft-netstack".into()).spawn(move || {
            if let Err(e) = stack.run(&flag) {
                tracing::error!(error = %e, "the userspace stack stopped");
            }
        })?;
        Ok(Netstack { stop, waker, thread: Some(thread), counters, socks })
    }

    /// The stack's counters.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Where the SOCKS5 server listens (its port resolved when 0 was asked).
    pub fn socks_addr(&self) -> Option<SocketAddr> {
        self.socks
    }

    /// Whether the thread still runs.
    pub fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Netstack {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const DEVICE: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_DYNAMIC: usize = 2;

/// What a host socket's token stands for.
#[derive(Debug, Clone, Copy)]
enum Owner {
    SocksListener,
    TcpForward(usize),
    UdpForward(usize),
    /// A connection's host stream, by slot.
    Conn(usize),
    /// A UDP association's host socket, by connection slot.
    Assoc(usize),
    /// An exposed UDP port's flow to the local service.
    ExposeFlow(usize, IpEndpoint),
}

/// The smoltcp device: packets from and to the engine's end of the pair.
struct PairDevice {
    mtu: usize,
    rx: Vec<u8>,
    readable: bool,
    closed: bool,
    tx: TxSide,
}

/// The sending half (a field of its own: a receive token and a transmit
/// token borrow the device at once).
struct TxSide {
    end: PacketEnd,
    /// Packets the pair refused (full), sent when it is writable.
    backlog: VecDeque<Vec<u8>>,
    counters: Arc<Counters>,
}

struct Rx<'a>(&'a [u8]);
struct Tx<'a>(&'a mut TxSide);

impl smoltcp::phy::RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl smoltcp::phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0; len];
        let r = f(&mut packet);
        self.0.send(packet);
        r
    }
}

impl TxSide {
    fn send(&mut self, packet: Vec<u8>) {
        if self.backlog.is_empty() {
            match self.end.send(&packet) {
                Ok(_) => {
                    self.counters.packets_out.fetch_add(1, Relaxed);
                    return;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::debug!(error = %e, "packet to the engine lost");
                    self.counters.packets_dropped.fetch_add(1, Relaxed);
                    return;
                }
            }
        }
        if self.backlog.len() >= TX_BACKLOG {
            self.counters.packets_dropped.fetch_add(1, Relaxed);
        } else {
            self.backlog.push_back(packet);
        }
    }

    /// Sends what the pair refused before; false while it is still full.
    fn flush(&mut self) -> bool {
        while let Some(p) = self.backlog.front() {
            match self.end.send(p) {
                Ok(_) => self.counters.packets_out.fetch_add(1, Relaxed),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(_) => self.counters.packets_dropped.fetch_add(1, Relaxed),
            };
            self.backlog.pop_front();
        }
        true
    }
}

impl Device for PairDevice {
    type RxToken<'a> = Rx<'a>;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx<'_>, Tx<'_>)> {
        if !self.readable {
            return None;
        }
        let read = loop {
            match self.tx.end.recv(&mut self.rx) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                read => break read,
            }
        };
        match read {
            // The engine closed its end: it stopped.
            Ok(0) => {
                self.readable = false;
                self.closed = true;
                None
            }
            Ok(n) => {
                self.tx.counters.packets_in.fetch_add(1, Relaxed);
                Some((Rx(&self.rx[..n]), Tx(&mut self.tx)))
            }
            Err(e) => {
                if e.kind() != ErrorKind::WouldBlock {
                    tracing::debug!(error = %e, "reading from the engine");
                }
                self.readable = false;
                None
            }
        }
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        (self.tx.backlog.len() < TX_BACKLOG / 2).then_some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

/// A UDP forward: one host socket, one smoltcp socket per client.
struct UdpForward {
    host: UdpSocket,
    target: SocketAddr,
    flows: HashMap<SocketAddr, (SocketHandle, u16, StdInstant)>,
}

/// An exposed TCP port: listening smoltcp sockets, re-armed as they take
/// connections.
struct TcpExpose {
    port: u16,
    local: SocketAddr,
    listening: Vec<SocketHandle>,
}

/// An exposed UDP port: one smoltcp socket, one host socket per pod flow.
struct UdpExpose {
    local: SocketAddr,
    sock: SocketHandle,
    flows: HashMap<IpEndpoint, (UdpSocket, Token, StdInstant)>,
}

/// Where a connection is.
enum Phase {
    /// Reading the SOCKS5 client's greeting, authentication and request.
    Socks(Handshake),
    /// Connecting to a pod; `socks` when a SOCKS5 reply is owed.
    Connecting { socks: bool },
    /// A pod connected to an exposed port; connecting to the local service.
    HostConnecting,
    /// Moving bytes both ways.
    Relay,
    /// A SOCKS5 UDP association, alive while its TCP connection is.
    Assoc,
    /// Closing: removed once its reset or last bytes are out.
    Done,
}

/// A SOCKS5 UDP association.
struct Assoc {
    host: UdpSocket,
    token: Token,
    /// The client's address, taken from its first datagram (which must
    /// come from the TCP connection's address).
    client: Option<SocketAddr>,
    client_ip: IpAddr,
    sock: SocketHandle,
    port: u16,
}

/// A host TCP stream and what it is joined to.
struct Conn {
    host: TcpStream,
    token: Token,
    readable: bool,
    writable: bool,
    host_eof: bool,
    host_shut: bool,
    phase: Phase,
    /// The smoltcp TCP socket and its local port.
    sock: Option<(SocketHandle, u16)>,
    /// Bytes owed to the host (SOCKS5 replies) not written yet.
    out: Vec<u8>,
    /// Bytes from the host not consumed yet (the SOCKS5 handshake, and
    /// what a client sent right after its request).
    inbuf: Vec<u8>,
    since: StdInstant,
    assoc: Option<Assoc>,
    /// Rounds left before a Done connection is removed.
    linger: u8,
}

/// The thread's state.
struct Stack {
    poll: Poll,
    iface: Interface,
    dev: PairDevice,
    sockets: SocketSet<'static>,
    owners: HashMap<Token, Owner>,
    next_token: usize,
    counters: Arc<Counters>,
    cfg: Config,
    networks: Vec<IpCidr>,
    socks_addr: Option<SocketAddr>,
    socks_listener: Option<TcpListener>,
    tcp_forwards: Vec<(TcpListener, SocketAddr)>,
    udp_forwards: Vec<UdpForward>,
    tcp_exposes: Vec<TcpExpose>,
    udp_exposes: Vec<UdpExpose>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    ports: std::collections::HashSet<u16>,
    next_port: u16,
    scratch: Vec<u8>,
    /// Aborted smoltcp sockets, removed once their reset is out.
    reap: Vec<SocketHandle>,
}

const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;

impl Stack {
    fn new(cfg: Config, end: PacketEnd, poll: Poll, counters: Arc<Counters>) -> io::Result<Stack> {
        let mut dev = PairDevice {
            mtu: cfg.mtu,
            rx: vec![0; 65536],
            readable: true,
            closed: false,
            tx: TxSide { end, backlog: VecDeque::new(), counters: counters.clone() },
        };
        let mut icfg = IfaceConfig::new(HardwareAddress::Ip);
        icfg.random_seed = {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new().build_hasher().finish()
        };
        let mut iface = Interface::new(icfg, &mut dev, Instant::now());
        let networks: Vec<IpCidr> = cfg.addrs.iter().map(|(a, p)| IpCidr::new(IpAddress::from(*a), *p)).collect();
        iface.update_ip_addrs(|addrs| {
            for n in &networks {
                let _ = addrs.push(*n);
            }
        });
        poll.registry().register(
            &mut SourceFd(&std::os::fd::AsRawFd::as_raw_fd(&dev.tx.end)),
            DEVICE,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let mut stack = Stack {
            poll,
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            owners: HashMap::new(),
            next_token: FIRST_DYNAMIC,
            counters,
            networks,
            socks_addr: None,
            socks_listener: None,
            tcp_forwards: Vec::new(),
            udp_forwards: Vec::new(),
            tcp_exposes: Vec::new(),
            udp_exposes: Vec::new(),
            conns: Vec::new(),
            free: Vec::new(),
            ports: Default::default(),
            next_port: *EPHEMERAL.start(),
            scratch: vec![0; 65536],
            reap: Vec::new(),
            cfg,
        };
        if let Some(addr) = stack.cfg.socks {
            let mut l = TcpListener::bind(addr)?;
            stack.socks_addr = Some(l.local_addr()?);
            let t = stack.token(Owner::SocksListener);
            stack.poll.registry().register(&mut l, t, Interest::READABLE)?;
            stack.socks_listener = Some(l);
        }
        for f in stack.cfg.forwards.clone() {
            match f.proto {
                Proto::Tcp => {
                    let mut l = TcpListener::bind(f.local)?;
                    let t = stack.token(Owner::TcpForward(stack.tcp_forwards.len()));
                    stack.poll.registry().register(&mut l, t, Interest::READABLE)?;
                    stack.tcp_forwards.push((l, f.target));
                }
                Proto::Udp => {
                    let mut host = UdpSocket::bind(f.local)?;
                    let t = stack.token(Owner::UdpForward(stack.udp_forwards.len()));
                    stack.poll.registry().register(&mut host, t, Interest::READABLE)?;
                    stack.udp_forwards.push(UdpForward { host, target: f.target, flows: HashMap::new() });
                }
            }
        }
        for e in stack.cfg.exposes.clone() {
            match e.proto {
                Proto::Tcp => {
                    stack.tcp_exposes.push(TcpExpose { port: e.port, local: e.local, listening: Vec::new() });
                }
                Proto::Udp => {
                    let mut s = udp_socket();
                    s.bind(e.port).map_err(|err| io::Error::other(format!("port {}: {err}", e.port)))?;
                    let sock = stack.sockets.add(s);
                    stack.udp_exposes.push(UdpExpose { local: e.local, sock, flows: HashMap::new() });
                }
            }
        }
        stack.arm_listeners();
        Ok(stack)
    }

    fn token(&mut self, owner: Owner) -> Token {
        let t = Token(self.next_token);
        self.next_token += 1;
        self.owners.insert(t, owner);
        t
    }

    /// A free ephemeral port of the stack.
    fn port(&mut self) -> u16 {
        loop {
            let p = self.next_port;
            self.next_port = if p == *EPHEMERAL.end() { *EPHEMERAL.start() } else { p + 1 };
            if self.ports.insert(p) {
                return p;
            }
        }
    }

    /// The node's pod address of `target`'s family, if `target` is in the cluster.
    fn source_for(&self, target: IpAddr) -> Option<IpAddress> {
        let t = IpAddress::from(target);
        self.networks.iter().find(|n| n.contains_addr(&t)).map(|n| n.address())
    }

    fn open_count(&self) -> usize {
        self.counters.open.load(Relaxed) as usize
    }

    fn opened(&self) {
        self.counters.opened.fetch_add(1, Relaxed);
        self.counters.open.fetch_add(1, Relaxed);
    }

    fn closed(&self) {
        self.counters.open.fetch_sub(1, Relaxed);
    }

    /// Whether one more connection or flow may open; counts a refusal.
    fn admit(&self) -> bool {
        if self.open_count() >= self.cfg.max_connections {
            self.counters.refused_cap.fetch_add(1, Relaxed);
            tracing::debug!(max = self.cfg.max_connections, "connection refused: rootless-max-connections reached");
            false
        } else {
            true
        }
    }

    fn tcp_socket(&self) -> tcp::Socket<'static> {
        let n = self.cfg.tcp_buffer;
        let mut s = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; n]), tcp::SocketBuffer::new(vec![0; n]));
        s.set_nagle_enabled(false);
        s.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
        s
    }

    fn run(&mut self, stop: &AtomicBool) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut swept = StdInstant::now();
        loop {
            self.work();
            if stop.load(Relaxed) {
                return Ok(());
            }
            if self.dev.closed {
                return Err(io::Error::new(ErrorKind::BrokenPipe, "the engine closed its end of the pair"));
            }
            let delay = self.iface.poll_delay(Instant::now(), &self.sockets);
            let mut timeout = delay.map_or(Duration::from_secs(1), |d| Duration::from_micros(d.total_micros()));
            timeout = timeout.min(Duration::from_secs(1));
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                let (r, w) = (ev.is_readable() || ev.is_read_closed() || ev.is_error(), ev.is_writable());
                self.event(ev.token(), r, w || ev.is_write_closed() || ev.is_error());
            }
            if swept.elapsed() >= Duration::from_secs(1) {
                swept = StdInstant::now();
                self.sweep();
            }
        }
    }

    /// Polls the interface and pumps until nothing moves.
    fn work(&mut self) {
        for _ in 0..64 {
            self.iface.poll(Instant::now(), &mut self.dev, &mut self.sockets);
            for h in std::mem::take(&mut self.reap) {
                self.sockets.remove(h);
            }
            self.arm_listeners();
            let moved = self.pump();
            if !moved && !self.dev.readable {
                break;
            }
        }
    }

    fn event(&mut self, token: Token, readable: bool, writable: bool) {
        match token {
            DEVICE => {
                self.dev.readable |= readable;
                if writable {
                    self.dev.tx.flush();
                }
                return;
            }
            WAKER => return,
            _ => {}
        }
        let Some(owner) = self.owners.get(&token).copied() else { return };
        match owner {
            Owner::SocksListener => self.accept_socks(),
            Owner::TcpForward(i) => self.accept_forward(i),
            Owner::UdpForward(i) => self.udp_forward_in(i),
            Owner::Conn(slot) => {
                if let Some(Some(c)) = self.conns.get_mut(slot) {
                    c.readable |= readable;
                    c.writable |= writable;
                }
            }
            Owner::Assoc(slot) => self.assoc_in(slot),
            Owner::ExposeFlow(i, ep) => self.expose_flow_in(i, ep),
        }
    }

    fn insert(&mut self, mut host: TcpStream, phase: Phase, sock: Option<(SocketHandle, u16)>) -> Option<usize> {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let token = self.token(Owner::Conn(slot));
        if let Err(e) = self.poll.registry().register(&mut host, token, Interest::READABLE | Interest::WRITABLE) {
            tracing::debug!(error = %e, "registering a connection");
            self.owners.remove(&token);
            self.free.push(slot);
            return None;
        }
        self.opened();
        self.conns[slot] = Some(Conn {
            host,
            token,
            readable: false,
            writable: false,
            host_eof: false,
            host_shut: false,
            phase,
            sock,
            out: Vec::new(),
            inbuf: Vec::new(),
            since: StdInstant::now(),
            assoc: None,
            linger: 2,
        });
        Some(slot)
    }

    fn accept_socks(&mut self) {
        loop {
            let Some(l) = &self.socks_listener else { return };
            match l.accept() {
                Ok((host, _)) => {
                    if !self.admit() {
                        continue;
                    }
                    let phase = Phase::Socks(Handshake::new(self.cfg.auth.clone()));
                    self.insert(host, phase, None);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::debug!(error = %e, "accepting a SOCKS5 client");
                    return;
                }
            }
        }
    }

    fn accept_forward(&mut self, i: usize) {
        loop {
            let (target, accepted) = {
                let (l, target) = &self.tcp_forwards[i];
                (*target, l.accept())
            };
            match accepted {
                Ok((host, _)) => {
                    if !self.admit() {
                        continue;
                    }
                    if let Some(sock) = self.connect(target) {
                        self.insert(host, Phase::Connecting { socks: false }, Some(sock));
                    } else {
                        self.counters.connect_failed.fetch_add(1, Relaxed);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::debug!(error = %e, "accepting a forwarded connection");
                    return;
                }
            }
        }
    }

    /// A smoltcp socket connecting to `target`; none when the cluster has
    /// no such network.
    fn connect(&mut self, target: SocketAddr) -> Option<(SocketHandle, u16)> {
        let src = self.source_for(target.ip())?;
        let port = self.port();
        let mut s = self.tcp_socket();
        if let Err(e) = s.connect(self.iface.context(), IpEndpoint::from(target), (src, port)) {
            tracing::debug!(%target, error = %e, "connect refused by the stack");
            self.ports.remove(&port);
            return None;
        }
        Some((self.sockets.add(s), port))
    }

    /// Keeps [`LISTEN_BACKLOG`] listening sockets on each exposed TCP port
    /// and turns those that took a connection into connections.
    fn arm_listeners(&mut self) {
        for i in 0..self.tcp_exposes.len() {
            let mut taken = Vec::new();
            self.tcp_exposes[i].listening.retain(|h| {
                let s = self.sockets.get::<tcp::Socket>(*h);
                if s.is_listening() {
                    true
                } else {
                    taken.push(*h);
                    false
                }
            });
            for h in taken {
                let active = self.sockets.get::<tcp::Socket>(h).is_active();
                if !active || !self.admit() {
                    self.reset(h);
                    continue;
                }
                let local = self.tcp_exposes[i].local;
                match TcpStream::connect(local) {
                    Ok(host) => {
                        if self.insert(host, Phase::HostConnecting, Some((h, 0))).is_none() {
                            self.reset(h);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(%local, error = %e, "connecting to an exposed service");
                        self.counters.connect_failed.fetch_add(1, Relaxed);
                        self.reset(h);
                    }
                }
            }
            let port = self.tcp_exposes[i].port;
            while self.tcp_exposes[i].listening.len() < LISTEN_BACKLOG {
                let mut s = self.tcp_socket();
                if let Err(e) = s.listen(port) {
                    tracing::warn!(port, error = %e, "cannot listen on an exposed port");
                    break;
                }
                let h = self.sockets.add(s);
                self.tcp_exposes[i].listening.push(h);
            }
        }
    }
}

/// A smoltcp UDP socket with room for bursts of full-sized datagrams.
fn udp_socket() -> udp::Socket<'static> {
    let buf = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 256], vec![0; 256 << 10]);
    udp::Socket::new(buf(), buf())
}

/// What one call of `read` or `write` gave, inside smoltcp's closures.
enum Moved {
    Bytes(usize),
    /// The smoltcp buffer had no room (or nothing) at this end.
    Full,
    Eof,
    Err(io::Error),
}

impl Stack {
    /// Aborts a smoltcp TCP socket and removes it after its reset is out.
    fn reset(&mut self, h: SocketHandle) {
        self.sockets.get_mut::<tcp::Socket>(h).abort();
        self.reap.push(h);
    }

    /// Moves bytes for every connection and flow; true if any moved.
    fn pump(&mut self) -> bool {
        let mut moved = false;
        for slot in 0..self.conns.len() {
            if self.conns[slot].is_some() {
                moved |= self.pump_conn(slot);
            }
        }
        moved |= self.udp_forwards_out();
        moved |= self.udp_exposes_out();
        moved
    }

    fn pump_conn(&mut self, slot: usize) -> bool {
        let Some(mut c) = self.conns[slot].take() else { return false };
        let moved = match std::mem::replace(&mut c.phase, Phase::Done) {
            Phase::Socks(h) => self.socks_step(&mut c, h),
            Phase::Connecting { socks } => self.connecting(&mut c, socks),
            Phase::HostConnecting => self.host_connecting(&mut c),
            Phase::Relay => {
                c.phase = Phase::Relay;
                self.relay(&mut c)
            }
            Phase::Assoc => {
                c.phase = Phase::Assoc;
                self.assoc_out(&mut c)
            }
            Phase::Done => false,
        };
        if matches!(c.phase, Phase::Done) {
            flush_out(&mut c);
            c.linger = c.linger.saturating_sub(1);
            if let Some((h, _)) = c.sock {
                let s = self.sockets.get_mut::<tcp::Socket>(h);
                if s.state() != tcp::State::Closed && s.state() != tcp::State::TimeWait {
                    s.abort();
                    c.linger = c.linger.max(1);
                }
            }
            if c.linger == 0 || c.out.is_empty() && c.sock.is_none() {
                self.remove(slot, c);
                return true;
            }
        }
        self.conns[slot] = Some(c);
        moved
    }

    fn remove(&mut self, slot: usize, mut c: Conn) {
        let _ = self.poll.registry().deregister(&mut c.host);
        self.owners.remove(&c.token);
        if let Some((h, port)) = c.sock {
            self.sockets.remove(h);
            self.ports.remove(&port);
        }
        if let Some(mut a) = c.assoc {
            let _ = self.poll.registry().deregister(&mut a.host);
            self.owners.remove(&a.token);
            self.sockets.remove(a.sock);
            self.ports.remove(&a.port);
        }
        self.free.push(slot);
        self.closed();
    }

    /// Reads what the host sent into `c.inbuf` (at most `limit` bytes held);
    /// false when the host is gone.
    fn read_in(c: &mut Conn, limit: usize) -> bool {
        let mut buf = [0u8; 512];
        while c.readable && c.inbuf.len() < limit {
            match c.host.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => c.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => c.readable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    fn socks_step(&mut self, c: &mut Conn, mut h: Handshake) -> bool {
        // A handshake is a few hundred bytes; more before the request is
        // answered is the client's first data, kept for the pod.
        if !Self::read_in(c, 4096) {
            return false;
        }
        loop {
            let (used, step) = h.feed(&c.inbuf);
            c.inbuf.drain(..used.min(c.inbuf.len()));
            match step {
                Step::Need => {
                    c.phase = Phase::Socks(h);
                    return used > 0;
                }
                Step::Reply(bytes) => {
                    c.out.extend_from_slice(&bytes);
                    flush_out(c);
                }
                Step::Fail(bytes, why) => {
                    tracing::debug!(why, "SOCKS5 client refused");
                    self.counters.socks_refused.fetch_add(1, Relaxed);
                    c.out.extend_from_slice(&bytes);
                    return true;
                }
                Step::Request(req) => {
                    self.socks_request(c, req);
                    return true;
                }
            }
        }
    }

    fn socks_request(&mut self, c: &mut Conn, req: socks::Request) {
        let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        let target = match &req.target {
            Target::Addr(a) => Some(*a),
            Target::Domain(name, port) => name.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, *port)),
        };
        match req.command {
            Command::Connect => {
                let Some(target) = target else {
                    // No resolver here: pods are reached by address.
                    self.counters.socks_refused.fetch_add(1, Relaxed);
                    c.out.extend_from_slice(&socks::reply(socks::reply::HOST_UNREACHABLE, unspecified));
                    return;
                };
                match self.connect(target) {
                    Some(sock) => {
                        c.sock = Some(sock);
                        c.since = StdInstant::now();
                        c.phase = Phase::Connecting { socks: true };
                    }
                    None => {
                        self.counters.connect_failed.fetch_add(1, Relaxed);
                        c.out.extend_from_slice(&socks::reply(socks::reply::NETWORK_UNREACHABLE, unspecified));
                    }
                }
            }
            Command::UdpAssociate => match self.associate(c) {
                Ok(bound) => {
                    c.out.extend_from_slice(&socks::reply(socks::reply::SUCCEEDED, bound));
                    c.phase = Phase::Assoc;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "UDP association refused");
                    c.out.extend_from_slice(&socks::reply(socks::reply::GENERAL_FAILURE, unspecified));
                }
            },
        }
        flush_out(c);
    }

    /// Opens a UDP association for `c`: a host socket on the address the
    /// client reached us at, a smoltcp socket toward the pods.
    fn associate(&mut self, c: &mut Conn) -> io::Result<SocketAddr> {
        let local = c.host.local_addr()?;
        let client_ip = c.host.peer_addr()?.ip();
        let mut host = UdpSocket::bind(SocketAddr::new(local.ip(), 0))?;
        let bound = host.local_addr()?;
        let slot = match self.owners.get(&c.token) {
            Some(Owner::Conn(slot)) => *slot,
            _ => return Err(io::Error::other("connection without a slot")),
        };
        let token = self.token(Owner::Assoc(slot));
        self.poll.registry().register(&mut host, token, Interest::READABLE)?;
        let port = self.port();
        let mut s = udp_socket();
        s.bind(port).map_err(|e| io::Error::other(e.to_string()))?;
        let sock = self.sockets.add(s);
        c.assoc = Some(Assoc { host, token, client: None, client_ip, sock, port });
        Ok(bound)
    }

    fn connecting(&mut self, c: &mut Conn, socks: bool) -> bool {
        let Some((h, _)) = c.sock else { return false };
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        match s.state() {
            tcp::State::Established => {
                if socks {
                    let bound = s.local_endpoint().map_or(unspecified, SocketAddr::from);
                    c.out.extend_from_slice(&socks::reply(socks::reply::SUCCEEDED, bound));
                    flush_out(c);
                }
                c.phase = Phase::Relay;
                true
            }
            tcp::State::Closed => {
                self.counters.connect_failed.fetch_add(1, Relaxed);
                if socks {
                    c.out.extend_from_slice(&socks::reply(socks::reply::CONNECTION_REFUSED, unspecified));
                }
                true
            }
            _ if c.since.elapsed() >= CONNECT_TIMEOUT => {
                self.counters.connect_failed.fetch_add(1, Relaxed);
                if socks {
                    c.out.extend_from_slice(&socks::reply(socks::reply::HOST_UNREACHABLE, unspecified));
                }
                true
            }
            _ => {
                c.phase = Phase::Connecting { socks };
                false
            }
        }
    }

    fn host_connecting(&mut self, c: &mut Conn) -> bool {
        let failed = |this: &mut Stack| {
            this.counters.connect_failed.fetch_add(1, Relaxed);
            true
        };
        if c.since.elapsed() >= CONNECT_TIMEOUT {
            return failed(self);
        }
        if !c.writable {
            c.phase = Phase::HostConnecting;
            return false;
        }
        match c.host.take_error() {
            Ok(None) => {}
            Ok(Some(_)) | Err(_) => return failed(self),
        }
        match c.host.peer_addr() {
            Ok(_) => {
                c.phase = Phase::Relay;
                true
            }
            Err(e) if e.kind() == ErrorKind::NotConnected => {
                c.writable = false;
                c.phase = Phase::HostConnecting;
                false
            }
            Err(_) => failed(self),
        }
    }

    /// Moves bytes both ways between the host stream and the smoltcp socket.
    fn relay(&mut self, c: &mut Conn) -> bool {
        let Some((h, _)) = c.sock else {
            c.phase = Phase::Done;
            return false;
        };
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        let mut moved = false;
        if !flush_out(c) {
            return false;
        }
        if !c.inbuf.is_empty() && s.can_send() {
            if let Ok(n) = s.send_slice(&c.inbuf) {
                c.inbuf.drain(..n);
                moved |= n > 0;
            }
        }
        // Pod to host.
        while c.writable && s.can_recv() {
            let host = &c.host;
            let r = s.recv(|b| match (&mut &*host).write(b) {
                Ok(n) => (n, Moved::Bytes(n)),
                Err(e) => (0, Moved::Err(e)),
            });
            match r {
                Ok(Moved::Bytes(0)) | Ok(Moved::Full) | Ok(Moved::Eof) | Err(_) => break,
                Ok(Moved::Bytes(_)) => moved = true,
                Ok(Moved::Err(e)) if e.kind() == ErrorKind::WouldBlock => c.writable = false,
                Ok(Moved::Err(e)) if e.kind() == ErrorKind::Interrupted => {}
                Ok(Moved::Err(_)) => {
                    c.phase = Phase::Done;
                    return true;
                }
            }
        }
        let pod_done = matches!(
            s.state(),
            tcp::State::CloseWait
                | tcp::State::LastAck
                | tcp::State::Closing
                | tcp::State::TimeWait
                | tcp::State::Closed
        );
        if pod_done && !c.host_shut && s.recv_queue() == 0 {
            let _ = c.host.shutdown(Shutdown::Write);
            c.host_shut = true;
            moved = true;
        }
        // Host to pod.
        while c.readable && !c.host_eof && s.can_send() && c.inbuf.is_empty() {
            let host = &c.host;
            let r = s.send(|b| {
                if b.is_empty() {
                    return (0, Moved::Full);
                }
                match (&mut &*host).read(b) {
                    Ok(0) => (0, Moved::Eof),
                    Ok(n) => (n, Moved::Bytes(n)),
                    Err(e) => (0, Moved::Err(e)),
                }
            });
            match r {
                Ok(Moved::Bytes(_)) => moved = true,
                Ok(Moved::Eof) => {
                    c.host_eof = true;
                    s.close();
                    moved = true;
                }
                Ok(Moved::Full) | Err(_) => break,
                Ok(Moved::Err(e)) if e.kind() == ErrorKind::WouldBlock => c.readable = false,
                Ok(Moved::Err(e)) if e.kind() == ErrorKind::Interrupted => {}
                Ok(Moved::Err(_)) => {
                    c.phase = Phase::Done;
                    return true;
                }
            }
        }
        let finished = match s.state() {
            tcp::State::Closed => s.recv_queue() == 0,
            tcp::State::TimeWait => c.host_eof && c.host_shut,
            _ => false,
        };
        if finished {
            c.phase = Phase::Done;
            moved = true;
        }
        moved
    }

    /// A UDP association's datagrams from the pods to the client, and its
    /// TCP connection's end.
    fn assoc_out(&mut self, c: &mut Conn) -> bool {
        // The TCP connection only keeps the association alive: what it
        // carries is discarded, its end ends the association.
        c.inbuf.clear();
        if !Self::read_in(c, 4096) {
            c.phase = Phase::Done;
            return true;
        }
        c.inbuf.clear();
        let Some(a) = &c.assoc else { return false };
        let s = self.sockets.get_mut::<udp::Socket>(a.sock);
        let mut moved = false;
        let mut out = Vec::new();
        while let Ok((payload, meta)) = s.recv() {
            moved = true;
            let Some(client) = a.client else {
                self.counters.udp_dropped.fetch_add(1, Relaxed);
                continue;
            };
            out.clear();
            socks::udp_header(SocketAddr::from(meta.endpoint), &mut out);
            out.extend_from_slice(payload);
            if a.host.send_to(&out, client).is_err() {
                self.counters.udp_dropped.fetch_add(1, Relaxed);
            }
        }
        moved
    }

    /// Datagrams from a SOCKS5 client to the pods.
    fn assoc_in(&mut self, slot: usize) {
        let Some(Some(c)) = self.conns.get_mut(slot) else { return };
        let Some(a) = &mut c.assoc else { return };
        loop {
            let (n, from) = match a.host.recv_from(&mut self.scratch) {
                Ok(r) => r,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            let accepted = from.ip() == a.client_ip && a.client.is_none_or(|cl| cl == from);
            let parsed = socks::parse_udp(&self.scratch[..n]);
            let target = match (&parsed, accepted) {
                (Ok((Target::Addr(t), _)), true) => Some(*t),
                (Ok((Target::Domain(name, port), _)), true) => {
                    name.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, *port))
                }
                _ => None,
            };
            let in_cluster = target.is_some_and(|t| {
                let t = IpAddress::from(t.ip());
                self.networks.iter().any(|n| n.contains_addr(&t))
            });
            let (Some(target), Ok((_, payload)), true) = (target, &parsed, in_cluster) else {
                self.counters.udp_dropped.fetch_add(1, Relaxed);
                continue;
            };
            a.client = Some(from);
            let s = self.sockets.get_mut::<udp::Socket>(a.sock);
            if s.send_slice(payload, IpEndpoint::from(target)).is_err() {
                self.counters.udp_dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Datagrams from a forward's clients to its target.
    fn udp_forward_in(&mut self, i: usize) {
        loop {
            let (n, from) = match self.udp_forwards[i].host.recv_from(&mut self.scratch) {
                Ok(r) => r,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            let target = self.udp_forwards[i].target;
            let handle = match self.udp_forwards[i].flows.get_mut(&from) {
                Some(flow) => {
                    flow.2 = StdInstant::now();
                    flow.0
                }
                None => {
                    if !self.admit() {
                        continue;
                    }
                    let port = self.port();
                    let mut s = udp_socket();
                    if s.bind(port).is_err() {
                        self.ports.remove(&port);
                        continue;
                    }
                    let h = self.sockets.add(s);
                    self.opened();
                    self.udp_forwards[i].flows.insert(from, (h, port, StdInstant::now()));
                    h
                }
            };
            let s = self.sockets.get_mut::<udp::Socket>(handle);
            if s.send_slice(&self.scratch[..n], IpEndpoint::from(target)).is_err() {
                self.counters.udp_dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Datagrams from a forward's target back to its clients.
    fn udp_forwards_out(&mut self) -> bool {
        let mut moved = false;
        for f in &mut self.udp_forwards {
            for (client, (h, _, _)) in &f.flows {
                let s = self.sockets.get_mut::<udp::Socket>(*h);
                while let Ok((payload, _)) = s.recv() {
                    moved = true;
                    if f.host.send_to(payload, *client).is_err() {
                        self.counters.udp_dropped.fetch_add(1, Relaxed);
                    }
                }
            }
        }
        moved
    }

    /// Datagrams from pods to exposed UDP services.
    fn udp_exposes_out(&mut self) -> bool {
        let mut moved = false;
        for i in 0..self.udp_exposes.len() {
            loop {
                let h = self.udp_exposes[i].sock;
                let (n, ep) = match self.sockets.get_mut::<udp::Socket>(h).recv_slice(&mut self.scratch) {
                    Ok((n, meta)) => (n, meta.endpoint),
                    Err(_) => break,
                };
                moved = true;
                if !self.udp_exposes[i].flows.contains_key(&ep) {
                    if !self.admit() {
                        continue;
                    }
                    let local = self.udp_exposes[i].local;
                    let any: SocketAddr = if local.is_ipv4() {
                        (Ipv4Addr::UNSPECIFIED, 0).into()
                    } else {
                        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                    };
                    let opened = UdpSocket::bind(any).and_then(|s| s.connect(local).map(|()| s));
                    let mut host = match opened {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::debug!(%local, error = %e, "opening a flow to an exposed service");
                            self.counters.udp_dropped.fetch_add(1, Relaxed);
                            continue;
                        }
                    };
                    let token = self.token(Owner::ExposeFlow(i, ep));
                    if self.poll.registry().register(&mut host, token, Interest::READABLE).is_err() {
                        self.owners.remove(&token);
                        continue;
                    }
                    self.opened();
                    self.udp_exposes[i].flows.insert(ep, (host, token, StdInstant::now()));
                }
                let flow = self.udp_exposes[i].flows.get_mut(&ep).expect("inserted above");
                flow.2 = StdInstant::now();
                if flow.0.send(&self.scratch[..n]).is_err() {
                    self.counters.udp_dropped.fetch_add(1, Relaxed);
                }
            }
        }
        moved
    }

    /// Replies of an exposed UDP service to a pod.
    fn expose_flow_in(&mut self, i: usize, ep: IpEndpoint) {
        let Some(e) = self.udp_exposes.get_mut(i) else { return };
        let Some(flow) = e.flows.get_mut(&ep) else { return };
        loop {
            let n = match flow.0.recv(&mut self.scratch) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            flow.2 = StdInstant::now();
            let s = self.sockets.get_mut::<udp::Socket>(e.sock);
            if s.send_slice(&self.scratch[..n], ep).is_err() {
                self.counters.udp_dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Forgets idle UDP flows.
    fn sweep(&mut self) {
        let mut gone = 0;
        for f in &mut self.udp_forwards {
            f.flows.retain(|_, (h, port, last)| {
                let keep = last.elapsed() < UDP_IDLE;
                if !keep {
                    self.sockets.remove(*h);
                    self.ports.remove(port);
                    gone += 1;
                }
                keep
            });
        }
        for e in &mut self.udp_exposes {
            e.flows.retain(|_, (host, token, last)| {
                let keep = last.elapsed() < UDP_IDLE;
                if !keep {
                    let _ = self.poll.registry().deregister(host);
                    self.owners.remove(token);
                    gone += 1;
                }
                keep
            });
        }
        self.counters.open.fetch_sub(gone, Relaxed);
    }
}

/// Writes what is owed to the host; true when nothing is left.
fn flush_out(c: &mut Conn) -> bool {
    while !c.out.is_empty() {
        match c.host.write(&c.out) {
            Ok(0) => return false,
            Ok(n) => {
                c.out.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                c.writable = false;
                return false;
            }
            Err(_) => {
                c.out.clear();
                return false;
            }
        }
    }
    true
}
