//! A worker: one TUN queue, one socket pair per underlay family, one poll loop.
//!
//! ```text
//!  TUN queue --read batch--> route lookup --> VXLAN encap --send batch--> underlay
//!  TUN queue <--write batch-- peer checks <-- VXLAN decap <--recv batch-- underlay
//! ```
//!
//! The loop runs each batch to completion and then looks at the control
//! channel, so a new [`Snapshot`] is swapped in between batches, never in the
//! middle of one. Readiness is edge-triggered: a side stays "pending" until a
//! read comes back short, and the loop polls without blocking while anything
//! is pending.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;
use crossbeam_channel::Receiver;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use weft_tunnel::vxlan::{Vtep, Vxlan, HEADROOM};

use crate::coalesce::{coalesce, Out};
use crate::counters::{add, DropCause, EngineDrop, WorkerCounters};
use crate::io::{canonical, Batch, Meta, TunIo, UdpUnderlay, UnderlayIo, BATCH_SIZE, MAX_GSO_BYTES};
use crate::segment::{segment_tcp, Plan};
use crate::snapshot::Snapshot;
use crate::sys::mmsg::{send_mmsg, MAX_GSO_PARTS, MAX_GSO_SEGMENTS};
use crate::sys::tun::TunQueue;
use crate::vnet::{complete_csum, F_NEEDS_CSUM};
use crate::wg::{decrypted, Decrypted, WgDevice, WgPeer};

/// Batches per side handled before the loop polls again, so that one busy
/// direction cannot starve the other or the control channel. 8 x 32 packets
/// keeps a control message's latency well under a millisecond at line rate.
pub const IO_LOOP_BOUND: usize = 8;

/// Datagrams the transmit batch holds before it is sent: one 64 KiB
/// super-packet cut at a 1450-byte MTU makes 47, so 64 holds one whole
/// plus the small packets around it; a longer run is sent in several calls.
pub const TX_SLOTS: usize = 64;

/// Room per segment header in [`Worker::hdrs`]: outer UDP, VXLAN and
/// Ethernet ([`HEADROOM`]), then IPv6 and TCP with the most options.
pub const HDR_SLOT: usize = 160;

/// Datagrams one in-place receive hands out at most: [`crate::io::GRO_BUFS`]
/// buffers of up to 64 datagrams (`UDP_GRO` merges at most 64).
pub const MAX_VIEWS: usize = 512;

pub(crate) const TUN: Token = Token(0);
pub(crate) const WAKER: Token = Token(1);
/// Underlay family `i` (0: IPv4, 1: IPv6) polls as `Token(UDP_BASE + i)`.
const UDP_BASE: usize = 2;

/// Messages from the control plane.
pub enum Control {
    /// Forward with this snapshot from the next batch on.
    Snapshot(Arc<Snapshot>),
    /// Use these underlay sockets (a new port) instead of the current ones.
    Families(Vec<Family>),
    /// Use this WireGuard device (a new private key).
    WgDevice(Arc<WgDevice>),
    /// Leave the loop.
    Stop,
}

/// One underlay family: its VXLAN endpoint (none with WireGuard) and its sockets.
pub struct Family {
    pub vxlan: Option<Vxlan>,
    pub io: UdpUnderlay,
}

pub(crate) struct Worker {
    pub poll: Poll,
    pub tun: TunQueue,
    /// The underlay families, IPv4 first; one or two.
    pub families: Vec<Family>,
    pub snapshot: Arc<Snapshot>,
    pub control: Receiver<Control>,
    pub counters: Arc<WorkerCounters>,
    /// MTU of the TUN: larger decapsulated packets are cut before writing.
    pub mtu: usize,
    /// Where segments are built, one at a time.
    pub scratch: Vec<u8>,
    /// The WireGuard device, when the backend is WireGuard.
    pub wg: Option<Arc<WgDevice>>,
    /// Where WireGuard writes what it encrypts or decrypts.
    pub wg_out: Vec<u8>,
    /// Segment headers of one `UDP_SEGMENT` send, [`HDR_SLOT`] bytes each.
    pub hdrs: Vec<u8>,
    /// How long to keep polling after the last packet before sleeping.
    pub busy_poll: Duration,
}

impl Worker {
    /// Runs until told to stop.
    pub fn run(mut self) -> io::Result<()> {
        let tun_fd = self.tun.as_raw_fd();
        self.poll.registry().register(&mut SourceFd(&tun_fd), TUN, Interest::READABLE)?;
        for (i, f) in self.families.iter_mut().enumerate() {
            self.poll.registry().register(&mut f.io.rx, Token(UDP_BASE + i), Interest::READABLE)?;
        }
        let mut events = Events::with_capacity(16);
        let mut tun_batch = Batch::default();
        let mut udp_batch = Batch::new(TX_SLOTS);
        let mut tx_batch = Batch::new(TX_SLOTS);
        let mut tun_pending = true;
        // Only families that exist can be pending: a flag left set for a
        // missing family would keep the loop polling without blocking.
        let all_pending = |n: usize| [n > 0, n > 1];
        let mut udp_pending = all_pending(self.families.len());
        // When the last packet moved: until `busy_poll` after it the loop
        // polls without sleeping (an answer then costs no wakeup).
        let mut last_moved = Instant::now();
        loop {
            let busy = tun_pending || udp_pending.iter().any(|p| *p);
            let spin = !busy && !self.busy_poll.is_zero() && last_moved.elapsed() < self.busy_poll;
            match self.poll.poll(&mut events, (busy || spin).then_some(Duration::ZERO)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if self.busy_poll.is_zero() {
                // No busy polling: no clock to read.
            } else if !events.is_empty() || busy {
                last_moved = Instant::now();
            } else if spin {
                // Whatever else is runnable here (the pod answering) goes first.
                std::thread::yield_now();
            }
            for e in events.iter() {
                match e.token() {
                    TUN => tun_pending = true,
                    Token(t) if (UDP_BASE..UDP_BASE + 2).contains(&t) => udp_pending[t - UDP_BASE] = true,
                    _ => {}
                }
            }
            while let Ok(msg) = self.control.try_recv() {
                match msg {
                    Control::Snapshot(s) => self.snapshot = s,
                    Control::WgDevice(d) => self.wg = Some(d),
                    Control::Families(families) => {
                        for f in &mut self.families {
                            let _ = self.poll.registry().deregister(&mut f.io.rx);
                        }
                        self.families = families;
                        for (i, f) in self.families.iter_mut().enumerate() {
                            self.poll.registry().register(&mut f.io.rx, Token(UDP_BASE + i), Interest::READABLE)?;
                        }
                        udp_pending = all_pending(self.families.len());
                    }
                    Control::Stop => return Ok(()),
                }
            }
            for _ in 0..IO_LOOP_BOUND {
                if tun_pending {
                    tun_pending = self.tun_to_underlay(&mut tun_batch, &mut tx_batch)? == BATCH_SIZE;
                }
                for (f, pending) in udp_pending.iter_mut().enumerate().take(self.families.len()) {
                    if *pending {
                        *pending = self.underlay_to_tun(f, &mut udp_batch, &mut tx_batch)?;
                    }
                }
                if !tun_pending && !udp_pending.iter().any(|p| *p) {
                    break;
                }
            }
        }
    }

    /// Pod to tunnel: read a batch from the TUN, cut super-packets, look up
    /// the route, encapsulate into the transmit batch, send.
    ///
    /// ```text
    ///  read batch (64 KiB super-packets) --Plan::write--> tx slot [HEADROOM..]
    ///      (or, single packets: buffer swapped into the tx slot, no copy)
    ///  tx slot --encapsulate in place--> send_batch when full and at the end
    /// ```
    fn tun_to_underlay(&mut self, batch: &mut Batch, tx: &mut Batch) -> io::Result<usize> {
        let n = self.tun.read_batch(batch, HEADROOM, &self.counters)?;
        tx.set_len(0);
        for i in 0..n {
            let (buf, meta) = batch.slot_mut(i);
            add(&self.counters.tun_rx_packets, 1);
            add(&self.counters.tun_rx_bytes, meta.len as u64);
            let inner_len = meta.len;
            let vnet = meta.vnet;
            meta.len = 0;
            let inner = &mut buf[HEADROOM..HEADROOM + inner_len];
            let Some(dst) = ip_destination(inner) else {
                self.counters.count_drop(DropCause::Engine(EngineDrop::NotIp));
                continue;
            };
            let Some((peer, vtep)) = self.snapshot.route(dst) else {
                self.counters.count_drop(DropCause::Engine(EngineDrop::NoRoute));
                continue;
            };
            let plan = if vnet.is_gso() {
                match Plan::new(inner, vnet.gso_size as usize) {
                    Ok(p) => {
                        add(&self.counters.sw_segmented, 1);
                        Some(p)
                    }
                    Err(_) => {
                        self.counters.count_drop(DropCause::Engine(EngineDrop::Encap));
                        continue;
                    }
                }
            } else {
                if vnet.flags & F_NEEDS_CSUM != 0 && complete_csum(inner, &vnet).is_err() {
                    self.counters.count_drop(DropCause::Engine(EngineDrop::Encap));
                    continue;
                }
                None
            };
            if let Some(wg) = &peer.wg {
                // Each segment is sealed into a tx slot; the slots go out
                // in runs (UDP_SEGMENT) or one sendmmsg when the batch is sent.
                let segments = plan.map_or(1, |p| p.count());
                for j in 0..segments {
                    if tx.len() == tx.capacity() {
                        send_all(&mut self.families, tx, &self.counters);
                    }
                    let inner = &batch.slot_mut(i).0[HEADROOM..HEADROOM + inner_len];
                    let plain = match &plan {
                        Some(plan) => match plan.write(inner, j, &mut self.scratch) {
                            Ok(len) => &self.scratch[..len],
                            Err(_) => break,
                        },
                        None => inner,
                    };
                    let k = tx.len();
                    let (out, meta) = tx.slot_mut(k);
                    if let Some(m) = wg_seal(wg, plain, out, &self.counters) {
                        *meta = m;
                        tx.set_len(k + 1);
                    }
                }
                add(&peer.counters.tx_packets, segments as u64);
                add(&peer.counters.tx_bytes, inner_len as u64);
                continue;
            }
            let Some((f, vxlan, pool)) = self
                .families
                .iter()
                .position(|f| f.io.v6 == vtep.addr.is_ipv6())
                .and_then(|f| Some((f, self.families[f].vxlan.clone()?, self.families[f].io.gso_pool_ready())))
            else {
                self.counters.count_drop(DropCause::Engine(EngineDrop::NoRoute));
                continue;
            };
            let udp_checksum = !pool;
            let segments = plan.map_or(1, |p| p.count());
            if let Some(plan) = plan.filter(|p| pool && p.count() > 1) {
                // Datagrams queued earlier go first: a flow is never reordered.
                if !tx.is_empty() {
                    send_all(&mut self.families, tx, &self.counters);
                }
                let packet = &batch.slot_mut(i).0[HEADROOM..HEADROOM + inner_len];
                let (families, hdrs) = (&mut self.families, &mut self.hdrs);
                Self::send_segments(families, hdrs, &self.counters, (f, &vxlan, &vtep), &plan, packet);
                add(&peer.counters.tx_packets, segments as u64);
                add(&peer.counters.tx_bytes, inner_len as u64);
                continue;
            }
            for j in 0..segments {
                if tx.len() == tx.capacity() {
                    send_all(&mut self.families, tx, &self.counters);
                }
                let k = tx.len();
                tx.set_len(k + 1);
                let len = match &plan {
                    Some(plan) => {
                        let (out, _) = tx.slot_mut(k);
                        match plan.write(&batch.slot_mut(i).0[HEADROOM..HEADROOM + inner_len], j, &mut out[HEADROOM..])
                        {
                            Ok(len) => len,
                            Err(_) => {
                                tx.slot_mut(k).1.len = 0;
                                self.counters.count_drop(DropCause::Engine(EngineDrop::Encap));
                                continue;
                            }
                        }
                    }
                    None => {
                        tx.swap_buf(k, batch, i);
                        inner_len
                    }
                };
                let (out, meta) = tx.slot_mut(k);
                // The GSO pool's sockets write their own UDP header and checksum.
                match vxlan.encapsulate_with(&vtep, out, len, udp_checksum) {
                    Ok(dlen) => {
                        *meta = Meta { start: 0, len: dlen, addr: Some(vtep.addr), ..Meta::default() };
                    }
                    Err(_) => {
                        meta.len = 0;
                        self.counters.count_drop(DropCause::Engine(EngineDrop::Encap));
                    }
                }
            }
            add(&peer.counters.tx_packets, segments as u64);
            add(&peer.counters.tx_bytes, inner_len as u64);
        }
        if !tx.is_empty() {
            send_all(&mut self.families, tx, &self.counters);
        }
        Ok(n)
    }

    /// Super-packet to underlay with the `UDP_SEGMENT` pool: each segment's
    /// headers (outer UDP, VXLAN, Ethernet, IP, TCP/UDP) are written into a
    /// slot of [`Worker::hdrs`], its payload stays where the TUN read put
    /// it, and one `sendmsg` gathers a run of them: the kernel's copy into
    /// the UDP skb is the only copy of the payload on the way out.
    fn send_segments(
        families: &mut [Family],
        hdrs: &mut [u8],
        counters: &WorkerCounters,
        (f, vxlan, vtep): (usize, &Vxlan, &Vtep),
        plan: &Plan,
        packet: &[u8],
    ) {
        let mut j = 0;
        while j < plan.count() {
            let mut parts: [&[u8]; MAX_GSO_PARTS] = [&[]; MAX_GSO_PARTS];
            let (mut k, mut bytes, mut seg, mut port) = (0usize, 0usize, 0usize, (0u16, 0u16));
            for slot in hdrs.chunks_exact_mut(HDR_SLOT) {
                let payload = &packet[plan.payload(j)];
                let sum = weft_tunnel::checksum::sum(0, payload);
                let datagram = plan
                    .write_header(packet, j, &mut slot[HEADROOM..], sum)
                    .ok()
                    .and_then(|hl| vxlan.encapsulate_with(vtep, slot, hl, false).ok());
                let Some(len) = datagram else {
                    // Headers that do not fit: the rest of this packet is dropped.
                    for _ in j..plan.count() {
                        counters.count_drop(DropCause::Engine(EngineDrop::Encap));
                    }
                    j = plan.count();
                    break;
                };
                let slot: &[u8] = slot;
                // What the socket sends: after our UDP header (the socket writes its own).
                let size = len - 8 + payload.len();
                if k == 0 {
                    seg = size;
                    port = (u16::from_be_bytes([slot[0], slot[1]]), u16::from_be_bytes([slot[2], slot[3]]));
                }
                parts[2 * k] = &slot[8..len];
                parts[2 * k + 1] = payload;
                k += 1;
                bytes += size;
                j += 1;
                if j == plan.count() || k == MAX_GSO_SEGMENTS || bytes + seg > MAX_GSO_BYTES || size < seg {
                    break;
                }
            }
            if k == 0 {
                break;
            }
            let dst = SocketAddr::new(vtep.addr, port.1);
            families[f].io.send_gathered(port.0, dst, &parts[..2 * k], seg as u16, k, counters);
        }
    }

    /// Tunnel to pod: receive a batch on underlay family `f`, decapsulate and
    /// check, write to the TUN. Returns whether more may be waiting.
    fn underlay_to_tun(&mut self, f: usize, batch: &mut Batch, out: &mut Batch) -> io::Result<bool> {
        let Some(vxlan) = self.families[f].vxlan.clone() else {
            return self.wg_receive(f, batch, out);
        };
        let gro = self.tun.vnet_hdr();
        if gro {
            if let Some(more) = self.vxlan_in_place(f, &vxlan) {
                return Ok(more);
            }
        }
        let n = self.families[f].io.recv_batch(batch, &self.counters)?;
        for i in 0..n {
            let (buf, meta) = batch.slot_mut(i);
            let Some(src) = meta.addr else { continue };
            match vxlan.decapsulate(src, &buf[..meta.len], &*self.snapshot) {
                Ok(d) => {
                    let peer = &self.snapshot.peers()[d.peer];
                    add(&peer.counters.rx_packets, 1);
                    add(&peer.counters.rx_bytes, d.inner.len() as u64);
                    meta.len = 0;
                    if gro {
                        // Checksums and oversized packets are the coalescer's.
                        meta.start = d.inner.start;
                        meta.len = d.inner.len();
                        continue;
                    }
                    if d.inner.len() > self.mtu {
                        self.write_segmented(&buf[d.inner]);
                        continue;
                    }
                    if weft_tunnel::checksum::complete_partial(&mut buf[d.inner.clone()]) {
                        add(&self.counters.csum_completed, 1);
                    }
                    meta.start = d.inner.start;
                    meta.len = d.inner.len();
                }
                Err(reason) => {
                    self.counters.count_drop(DropCause::Decap(reason));
                    meta.len = 0;
                }
            }
        }
        if gro {
            coalesce_to_tun(&self.tun, self.mtu, &self.counters, batch);
        } else {
            self.tun.write_batch(batch, &self.counters);
        }
        Ok(n == batch.capacity())
    }

    /// VXLAN with `UDP_GRO` and TUN offloads: decapsulates every received
    /// datagram where it lies in the GRO buffers, coalesces, and writes
    /// each super-packet gathered from those buffers: the kernel's copies
    /// in and out are the only copies of the payload. `None` when the
    /// family has no `UDP_GRO`.
    fn vxlan_in_place(&mut self, f: usize, vxlan: &Vxlan) -> Option<bool> {
        let snapshot = &*self.snapshot;
        let counters = &*self.counters;
        let mut pkts: [&mut [u8]; MAX_VIEWS] = std::array::from_fn(|_| &mut [][..]);
        let mut n = 0;
        let more = self.families[f].io.recv_in_place(MAX_VIEWS, counters, |r, datagram| {
            let Some(src) = r.from.map(canonical) else { return };
            match vxlan.decapsulate(src, datagram, snapshot) {
                Ok(d) => {
                    let peer = &snapshot.peers()[d.peer];
                    add(&peer.counters.rx_packets, 1);
                    add(&peer.counters.rx_bytes, d.inner.len() as u64);
                    pkts[n] = &mut datagram[d.inner];
                    n += 1;
                }
                Err(reason) => counters.count_drop(DropCause::Decap(reason)),
            }
        })?;
        let mut outs = [Out::default(); MAX_VIEWS];
        let stats = coalesce(&mut pkts[..n], &mut outs[..n], self.mtu, self.tun.uso());
        count_coalesce(counters, stats);
        self.tun.write_coalesced(&pkts[..n], &outs[..n], counters);
        Some(more)
    }

    /// WireGuard receive: find the peer, let boringtun check and decrypt,
    /// enforce the peer's allowed IPs, follow its endpoint, write to the TUN.
    ///
    /// With `UDP_GRO` the datagrams are opened where `recvmmsg` put them;
    /// otherwise `batch` receives them. Decrypted packets land in `out`'s
    /// slots, which are coalesced (with TUN offloads) and written when `out`
    /// is full and at the end. Returns whether more may be waiting.
    fn wg_receive(&mut self, f: usize, batch: &mut Batch, out: &mut Batch) -> io::Result<bool> {
        let Some(device) = self.wg.clone() else {
            let n = self.families[f].io.recv_batch(batch, &self.counters)?;
            return Ok(n == batch.capacity());
        };
        out.set_len(0);
        let mut rx = WgRx {
            device: &device,
            snapshot: &self.snapshot,
            counters: &self.counters,
            tun: &mut self.tun,
            mtu: self.mtu,
            wg_out: &mut self.wg_out,
            fd: self.families[f].io.rx.as_raw_fd(),
            out,
        };
        let in_place = self.families[f].io.recv_in_place(MAX_VIEWS, rx.counters, |r, datagram| {
            let Some(from) = r.from else { return };
            let local = r.local.map(|l| canonical(SocketAddr::new(l, 0)));
            rx.open(SocketAddr::new(canonical(from), from.port()), local, datagram);
        });
        let more = match in_place {
            Some(more) => more,
            None => {
                let n = self.families[f].io.recv_batch(batch, rx.counters)?;
                for (datagram, meta) in batch.packets() {
                    let Some(ip) = meta.addr else { continue };
                    rx.open(SocketAddr::new(ip, meta.port), meta.local, datagram);
                }
                n == batch.capacity()
            }
        };
        flush_to_tun(rx.tun, rx.mtu, rx.counters, rx.out);
        Ok(more)
    }

    /// Writes a TCP super-packet (a sender's TSO frame that crossed a veth
    /// or a host-internal virtio link uncut) to the TUN as MTU-sized
    /// segments; anything else that large is written as it is and left to
    /// the kernel (fragmentation or ICMP "too big").
    fn write_segmented(&mut self, packet: &[u8]) {
        let (tun, counters) = (&self.tun, &*self.counters);
        let mut write = |seg: &[u8]| tun.write_counted(seg, counters);
        match segment_tcp(packet, self.mtu, &mut self.scratch, &mut write) {
            Ok(_) => add(&counters.sw_segmented, 1),
            Err(_) => write(packet),
        }
    }
}

/// What opening WireGuard datagrams needs of a worker, borrowed apart from
/// its sockets so that datagrams can be opened where they were received.
struct WgRx<'a> {
    device: &'a WgDevice,
    snapshot: &'a Snapshot,
    counters: &'a WorkerCounters,
    tun: &'a mut TunQueue,
    mtu: usize,
    wg_out: &'a mut Vec<u8>,
    /// The receiving socket: cookie replies and handshake answers leave by it.
    fd: std::os::fd::RawFd,
    out: &'a mut Batch,
}

impl WgRx<'_> {
    /// Opens one datagram from `from`, received on our address `local`.
    fn open(&mut self, from: SocketAddr, local: Option<IpAddr>, datagram: &[u8]) {
        let ip = from.ip();
        let (fd, counters) = (self.fd, self.counters);
        let reply_to = |d: &[u8]| {
            let st = send_mmsg(fd, &[(d, from, local)]);
            add(&counters.syscalls, st.syscalls);
            add(&counters.udp_tx_packets, st.sent);
        };
        let mut cookie = [0u8; 64];
        let peer = match self.device.classify(ip, datagram, &mut cookie) {
            Ok(r) => self.snapshot.wg_peer(r),
            Err(Some(reply)) => {
                reply_to(reply);
                counters.count_drop(DropCause::Engine(EngineDrop::WgCookie));
                return;
            }
            Err(None) => {
                counters.count_drop(DropCause::Engine(EngineDrop::WgRejected));
                return;
            }
        };
        let Some((peer, wg)) = peer.and_then(|p| Some((p, p.wg.as_ref()?))) else {
            counters.count_drop(DropCause::Engine(EngineDrop::WgUnknownPeer));
            return;
        };
        if self.out.len() == self.out.capacity() {
            flush_to_tun(self.tun, self.mtu, counters, self.out);
        }
        let k = self.out.len();
        let (obuf, ometa) = self.out.slot_mut(k);
        let obase = obuf.as_ptr() as usize;
        let mut st = wg.lock();
        match decrypted(st.tunn.decapsulate(Some(ip), datagram, obuf)) {
            Decrypted::Reply(reply) => {
                st.endpoint = Some(from);
                st.local = local;
                reply_to(reply);
                // Packets queued while the handshake ran go out now.
                while let TunnResult::WriteToNetwork(p) = st.tunn.decapsulate(None, &[], self.wg_out) {
                    reply_to(p);
                }
            }
            Decrypted::Packet(p, inner_src) => {
                // Cryptokey routing: the source must route back to this
                // very peer (a longest match), not merely lie inside one
                // of its prefixes, which may overlap another peer's.
                let owner = self.snapshot.route(inner_src).map(|(o, _)| o);
                if !owner.is_some_and(|o| std::ptr::eq(o, peer)) {
                    counters.count_drop(DropCause::Engine(EngineDrop::WgAllowedIps));
                    return;
                }
                st.endpoint = Some(from);
                st.local = local;
                add(&peer.counters.rx_packets, 1);
                add(&peer.counters.rx_bytes, p.len() as u64);
                *ometa = Meta { start: p.as_ptr() as usize - obase, len: p.len(), ..Meta::default() };
                drop(st);
                self.out.set_len(k + 1);
            }
            Decrypted::Nothing => {
                st.endpoint = Some(from);
                st.local = local;
            }
            Decrypted::Refused => counters.count_drop(DropCause::Engine(EngineDrop::WgRejected)),
        }
    }
}

/// Coalesces (with TUN offloads) and writes `out`'s packets, and empties it.
fn flush_to_tun(tun: &mut TunQueue, mtu: usize, counters: &WorkerCounters, out: &mut Batch) {
    if out.is_empty() {
        return;
    }
    if tun.vnet_hdr() {
        coalesce_to_tun(tun, mtu, counters, out);
    } else {
        tun.write_batch(out, counters);
    }
    out.set_len(0);
}

/// Coalesces the live packets of `batch` and writes them to the TUN (which
/// has a virtio-net header), merged payloads gathered where they lie.
fn coalesce_to_tun(tun: &TunQueue, mtu: usize, counters: &WorkerCounters, batch: &mut Batch) {
    let mut pkts: [&mut [u8]; TX_SLOTS] = std::array::from_fn(|_| &mut [][..]);
    let n = batch.live_mut(&mut pkts);
    let mut outs = [Out::default(); TX_SLOTS];
    let stats = coalesce(&mut pkts[..n], &mut outs[..n], mtu, tun.uso());
    count_coalesce(counters, stats);
    tun.write_coalesced(&pkts[..n], &outs[..n], counters);
}

fn count_coalesce(counters: &WorkerCounters, stats: crate::coalesce::Stats) {
    add(&counters.gro_merged, stats.merged);
    add(&counters.csum_completed, stats.csum_completed);
    add(&counters.sw_segmented, stats.oversized);
}

/// Sends the transmit batch on every underlay family (each takes the
/// datagrams of its own address family) and empties it.
fn send_all(families: &mut [Family], tx: &mut Batch, counters: &WorkerCounters) {
    for f in families {
        f.io.send_batch(tx, counters);
    }
    tx.set_len(0);
}

/// Destination address of an IP packet, if it is one.
pub fn ip_destination(p: &[u8]) -> Option<IpAddr> {
    match p.first()? >> 4 {
        4 => {
            let d: [u8; 4] = p.get(16..20)?.try_into().ok()?;
            Some(IpAddr::from(d))
        }
        6 => {
            let d: [u8; 16] = p.get(24..40)?.try_into().ok()?;
            Some(IpAddr::from(d))
        }
        _ => None,
    }
}

/// Encrypts `packet` for `peer` into `out` and says where the datagram lies
/// and goes (the peer's endpoint), or counts why nothing is to be sent; a
/// packet for a peer without a session starts a handshake (the packet is
/// queued in boringtun and the handshake initiation is the datagram).
pub(crate) fn wg_seal(peer: &WgPeer, packet: &[u8], out: &mut [u8], counters: &WorkerCounters) -> Option<Meta> {
    let base = out.as_ptr() as usize;
    let mut st = peer.lock();
    let (endpoint, local) = (st.endpoint, st.local);
    match st.tunn.encapsulate(packet, out) {
        TunnResult::WriteToNetwork(d) => {
            let Some(ep) = endpoint else {
                counters.count_drop(DropCause::Engine(EngineDrop::WgNoEndpoint));
                return None;
            };
            Some(Meta {
                local,
                start: d.as_ptr() as usize - base,
                len: d.len(),
                addr: Some(ep.ip()),
                port: ep.port(),
                ..Meta::default()
            })
        }
        TunnResult::Done => None,
        _ => {
            counters.count_drop(DropCause::Engine(EngineDrop::WgRejected));
            None
        }
    }
}
