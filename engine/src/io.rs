//! Batched packet I/O on both sides of a worker.
//!
//! A worker moves packets in [`Batch`]es: the TUN side reads a batch, the
//! worker rewrites every packet in place, the underlay side sends the batch
//! (and the reverse). The traits speak in batches so that `recvmmsg`,
//! `sendmmsg`, `UDP_SEGMENT`/`UDP_GRO` and a vnet-header TUN slot in behind
//! them; the TUN side reads and writes one (super-)packet per
//! syscall, the underlay side moves a whole batch per `recvmmsg`/`sendmmsg`.

pub mod mem;

use std::io;
use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use crate::coalesce::{parts, Out, MAX_PARTS};
use crate::counters::{add, DropCause, EngineDrop, WorkerCounters};
pub use crate::sys::mmsg::Received;
use crate::sys::mmsg::{recv_mmsg, send_gso, send_mmsg, Outgoing, MAX_GSO_SEGMENTS, MAX_MMSG};
use crate::sys::pages::PageBuf;
pub use crate::sys::pair::{packet_pair, PacketEnd};
use crate::sys::raw::RawUdpTx;
use crate::sys::tun::TunQueue;
use crate::vnet::{VnetHdr, GSO_UDP_L4, VNET_HDR_LEN};

/// Packets per batch. 32 keeps a batch's buffers (32 x 64 KiB per direction)
/// small next to the socket buffers while amortising the poll wakeup over
/// many packets; wireguard-go's TUN batches are of the same order.
pub const BATCH_SIZE: usize = 32;

/// Bytes per packet buffer: the largest IP packet plus room for the outer
/// headers written in front of it.
pub const BUF_LEN: usize = 65536 + 64;

/// What an I/O side can do per call. The worker asks before every batch
/// (an offload the kernel refuses is turned off at run time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Packets one call moves at most.
    pub batch_size: usize,
    /// Segments one packet or send may carry: pod side, super-packets read
    /// with a virtio-net header (GSO in); underlay side, `UDP_SEGMENT`
    /// sends (1: neither).
    pub max_gso_segments: usize,
    /// Pod side: coalesced writes (GRO out, [`PodIo::write_coalesced`]);
    /// underlay side: coalesced receives handed out in place
    /// ([`UnderlayIo::recv_in_place`]).
    pub gro: bool,
    /// Pod side: coalesced writes may join UDP datagrams (USO).
    pub uso: bool,
}

/// Where one packet of a batch lies in its buffer, and its underlay address.
#[derive(Debug, Clone, Copy, Default)]
pub struct Meta {
    /// Offset of the packet in its buffer.
    pub start: usize,
    /// Length of the packet; 0 marks a dropped packet the sink skips.
    pub len: usize,
    /// Underlay peer: the source on receive, the destination on send.
    pub addr: Option<IpAddr>,
    /// The underlay peer's UDP port (receive side).
    pub port: u16,
    /// The virtio-net header read with the packet from an offloading TUN,
    /// or to write with it.
    pub vnet: VnetHdr,
    /// The local underlay address: the one a datagram was received on
    /// (pktinfo), or the one to send it from.
    pub local: Option<IpAddr>,
}

/// A fixed set of packet buffers, allocated once per worker (each on pages
/// of its own: resident only once packets were written to it).
pub struct Batch {
    bufs: Vec<PageBuf>,
    meta: Vec<Meta>,
    count: usize,
}

impl Default for Batch {
    fn default() -> Self {
        Batch::new(BATCH_SIZE)
    }
}

impl Batch {
    /// A batch of `slots` buffers of [`BUF_LEN`] bytes.
    pub fn new(slots: usize) -> Self {
        Batch {
            bufs: (0..slots).map(|_| PageBuf::zeroed(BUF_LEN)).collect(),
            meta: vec![Meta::default(); slots],
            count: 0,
        }
    }

    /// Moves the batch out, leaving one with no slots (no allocation):
    /// lets a caller hold two of its owner's batches at once.
    pub fn take(&mut self) -> Batch {
        std::mem::replace(self, Batch { bufs: Vec::new(), meta: Vec::new(), count: 0 })
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.bufs.len()
    }

    /// Sets the number of packets in the batch (at most its capacity).
    pub fn set_len(&mut self, n: usize) {
        self.count = n.min(self.bufs.len());
    }

    /// The buffers and metadata of the packets in the batch.
    pub fn parts_mut(&mut self) -> (&mut [PageBuf], &mut [Meta]) {
        (&mut self.bufs[..self.count], &mut self.meta[..self.count])
    }

    /// Swaps buffer `i` of this batch with buffer `j` of `other` (no copy).
    pub fn swap_buf(&mut self, i: usize, other: &mut Batch, j: usize) {
        std::mem::swap(&mut self.bufs[i], &mut other.bufs[j]);
    }

    /// Number of packets in the batch.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the batch holds no packet.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Packet `i`: its whole buffer and its metadata.
    pub fn slot_mut(&mut self, i: usize) -> (&mut [u8], &mut Meta) {
        (&mut self.bufs[i], &mut self.meta[i])
    }

    /// Puts the live packets (dropped ones skipped), in order, into `out`
    /// as mutable slices; returns how many.
    pub fn live_mut<'a>(&'a mut self, out: &mut [&'a mut [u8]]) -> usize {
        let mut n = 0;
        for (b, m) in self.bufs[..self.count].iter_mut().zip(&self.meta[..self.count]) {
            if m.len > 0 && n < out.len() {
                out[n] = &mut b[m.start..m.start + m.len];
                n += 1;
            }
        }
        n
    }

    /// The live packets, dropped ones skipped, with their metadata.
    pub fn packets(&self) -> impl Iterator<Item = (&[u8], &Meta)> {
        self.bufs[..self.count]
            .iter()
            .zip(&self.meta[..self.count])
            .filter(|(_, m)| m.len > 0)
            .map(|(b, m)| (&b[m.start..m.start + m.len], m))
    }
}

/// The pod side of a worker: a TUN queue, or memory in tests.
pub trait PodIo {
    /// What one call can do now.
    fn capabilities(&self) -> Capabilities;
    /// Reads up to a batch of packets, each at `headroom` in its buffer.
    /// Returns how many were read; fewer than a batch means the queue is empty.
    fn read_batch(&mut self, batch: &mut Batch, headroom: usize, counters: &WorkerCounters) -> io::Result<usize>;
    /// Writes the batch's live packets (each with its `vnet` header when
    /// the side has offloads), counting failures as drops.
    fn write_batch(&mut self, batch: &Batch, counters: &WorkerCounters);
    /// Writes what [`crate::coalesce::coalesce`] made of `pkts`: each head
    /// or lone packet with its virtio-net header and the payloads merged
    /// into it (only asked when [`Capabilities::gro`] is on).
    fn write_coalesced(&mut self, pkts: &[&mut [u8]], outs: &[Out], counters: &WorkerCounters);
    /// Writes one complete packet, counted.
    fn write_one(&mut self, packet: &[u8], counters: &WorkerCounters);
}

/// Sends single datagrams: handshake answers, cookie replies and timer
/// messages, from wherever a worker is (a handle apart from the receive
/// path, so that replies can leave while a receive batch is borrowed).
pub trait DatagramTx: Clone {
    /// Sends `d` to `to` from our address `from` (the kernel's choice
    /// when it is gone), counted.
    fn send_to(&self, d: &[u8], to: SocketAddr, from: Option<IpAddr>, counters: &WorkerCounters);
}

/// The node side of a worker: one underlay family (UDP sockets, an XDP
/// socket, or memory in tests).
pub trait UnderlayIo {
    /// The handle [`UnderlayIo::reply_tx`] gives.
    type Tx: DatagramTx;
    /// What one call can do now.
    fn capabilities(&self) -> Capabilities;
    /// Whether this is the IPv6 underlay.
    fn v6(&self) -> bool;
    /// Receives up to a batch of UDP payloads with their source addresses.
    fn recv_batch(&mut self, batch: &mut Batch, counters: &WorkerCounters) -> io::Result<usize>;
    /// With [`Capabilities::gro`]: hands up to `cap` received datagrams to
    /// `each` where they lie, and says whether more may be waiting;
    /// `None` when the side cannot.
    fn recv_in_place<'a>(
        &'a mut self,
        cap: usize,
        counters: &WorkerCounters,
        each: impl FnMut(&Received, &'a mut [u8]),
    ) -> Option<bool>;
    /// Sends the batch's live datagrams of this family to their `addr`:
    /// VXLAN datagrams carry their UDP header (ports and checksum ours),
    /// WireGuard ones are UDP payloads for `addr`:`port` from `local`.
    fn send_batch(&mut self, batch: &Batch, counters: &WorkerCounters);
    /// Sends `segments` VXLAN datagrams gathered from `parts` (a header
    /// part and a payload part each, all `seg` bytes but the last) from
    /// source port `sport` to `dst`, in one `UDP_SEGMENT` send.
    fn send_gathered(
        &mut self,
        sport: u16,
        dst: SocketAddr,
        parts: &[&[u8]],
        seg: u16,
        segments: usize,
        counters: &WorkerCounters,
    );
    /// A handle that sends single datagrams from this family's port.
    fn reply_tx(&self) -> Self::Tx;
}

impl PodIo for TunQueue {
    fn capabilities(&self) -> Capabilities {
        let vnet = self.vnet_hdr();
        Capabilities {
            batch_size: BATCH_SIZE,
            max_gso_segments: if vnet { MAX_GSO_SEGMENTS } else { 1 },
            gro: vnet,
            uso: vnet && self.uso(),
        }
    }

    fn read_batch(&mut self, batch: &mut Batch, headroom: usize, counters: &WorkerCounters) -> io::Result<usize> {
        batch.count = 0;
        let vnet = self.vnet_hdr();
        let at = if vnet { headroom - VNET_HDR_LEN } else { headroom };
        while batch.count < batch.capacity() {
            let (buf, meta) = batch.slot_mut(batch.count);
            add(&counters.syscalls, 1);
            match self.recv(&mut buf[at..]) {
                Ok(n) if vnet => {
                    let Ok(hdr) = VnetHdr::parse(&buf[at..at + n]) else {
                        counters.count_drop(DropCause::Engine(EngineDrop::NotIp));
                        continue;
                    };
                    *meta = Meta { start: headroom, len: n - VNET_HDR_LEN, vnet: hdr, ..Meta::default() };
                    batch.count += 1;
                }
                Ok(n) => {
                    *meta = Meta { start: headroom, len: n, ..Meta::default() };
                    batch.count += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(batch.count)
    }

    fn write_batch(&mut self, batch: &Batch, counters: &WorkerCounters) {
        for (packet, meta) in batch.packets() {
            self.write_with(packet, &meta.vnet, counters);
        }
    }

    fn write_coalesced(&mut self, pkts: &[&mut [u8]], outs: &[Out], counters: &WorkerCounters) {
        self.write_coalesced_from(pkts, outs, counters)
    }

    fn write_one(&mut self, packet: &[u8], counters: &WorkerCounters) {
        self.write_with(packet, &VnetHdr::default(), counters)
    }
}

impl TunQueue {
    /// Writes what [`crate::coalesce::coalesce`] made of `pkts`: each head
    /// or lone packet with its virtio-net header and the payloads merged
    /// into it, in one `writev` (the TUN has a virtio-net header).
    pub fn write_coalesced_from<P: AsRef<[u8]>>(&self, pkts: &[P], outs: &[Out], counters: &WorkerCounters) {
        let empty: &[u8] = &[];
        for (i, o) in outs.iter().enumerate().take(pkts.len()) {
            if o.merged {
                continue;
            }
            let vnet = o.vnet.to_bytes();
            let mut slices = [IoSlice::new(empty); MAX_PARTS + 1];
            slices[0] = IoSlice::new(&vnet);
            let mut k = 1;
            let mut len = 0;
            for part in parts(pkts, outs, i).take(MAX_PARTS) {
                slices[k] = IoSlice::new(part);
                k += 1;
                len += part.len();
            }
            add(&counters.syscalls, 1);
            match self.send_slices(&slices[..k]) {
                Ok(_) => {
                    add(&counters.tun_tx_packets, 1);
                    add(&counters.tun_tx_bytes, len as u64);
                }
                Err(e) => {
                    counters.count_drop(DropCause::Engine(EngineDrop::TunWriteError));
                    if o.vnet.gso_type == GSO_UDP_L4 && e.raw_os_error() == Some(libc::EINVAL) && self.uso() {
                        tracing::warn!(
                            "the TUN refused a joined UDP write (USO); UDP datagrams are written one by one"
                        );
                        self.refuse_uso();
                    }
                }
            }
        }
    }

    /// Writes one packet with `vnet` as its virtio-net header (ignored when
    /// the TUN has none), counting it.
    pub fn write_with(&self, packet: &[u8], vnet: &VnetHdr, counters: &WorkerCounters) {
        add(&counters.syscalls, 1);
        let r = if self.vnet_hdr() { self.send_vnet(&vnet.to_bytes(), packet) } else { self.send(packet) };
        match r {
            Ok(_) => {
                add(&counters.tun_tx_packets, 1);
                add(&counters.tun_tx_bytes, packet.len() as u64);
            }
            Err(_) => counters.count_drop(DropCause::Engine(EngineDrop::TunWriteError)),
        }
    }
}

/// The pod side of a rootless node: one end of a packet pair whose other
/// end is a userspace TCP/IP stack holding the node's pod addresses. One
/// plain IP packet per record, no offloads.
pub struct PacketPod(pub PacketEnd);

impl PodIo for PacketPod {
    fn capabilities(&self) -> Capabilities {
        Capabilities { batch_size: BATCH_SIZE, max_gso_segments: 1, gro: false, uso: false }
    }

    fn read_batch(&mut self, batch: &mut Batch, headroom: usize, counters: &WorkerCounters) -> io::Result<usize> {
        batch.count = 0;
        while batch.count < batch.capacity() {
            let (buf, meta) = batch.slot_mut(batch.count);
            add(&counters.syscalls, 1);
            match self.0.recv(&mut buf[headroom..]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the userspace stack closed its end")),
                Ok(n) => {
                    *meta = Meta { start: headroom, len: n, ..Meta::default() };
                    batch.count += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(batch.count)
    }

    fn write_batch(&mut self, batch: &Batch, counters: &WorkerCounters) {
        for (packet, _) in batch.packets() {
            self.write_one(packet, counters);
        }
    }

    /// Never asked ([`Capabilities::gro`] is off): writes each packet whole.
    fn write_coalesced(&mut self, pkts: &[&mut [u8]], _outs: &[Out], counters: &WorkerCounters) {
        for p in pkts {
            self.write_one(p, counters);
        }
    }

    fn write_one(&mut self, packet: &[u8], counters: &WorkerCounters) {
        add(&counters.syscalls, 1);
        match self.0.send(packet) {
            Ok(_) => {
                add(&counters.tun_tx_packets, 1);
                add(&counters.tun_tx_bytes, packet.len() as u64);
            }
            // A full stack drops, as a full TUN queue does; TCP sends again.
            Err(_) => counters.count_drop(DropCause::Engine(EngineDrop::TunWriteError)),
        }
    }
}

impl AsRawFd for PacketPod {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// One underlay family: receives on an ordinary UDP socket, sends through a
/// raw one so that the UDP header (source port, checksum) is ours.
pub struct UdpUnderlay {
    /// The receiving socket, bound to the tunnel port.
    pub rx: mio::net::UdpSocket,
    /// The transmitting raw socket (VXLAN); WireGuard sends through `rx`.
    pub tx: Option<RawUdpTx>,
    /// Whether this is the IPv6 underlay.
    pub v6: bool,
    /// VXLAN with `UDP_SEGMENT`: UDP sockets bound to distinct ephemeral
    /// source ports, one picked per datagram by its flow-hashed source port
    /// (see `sys::mmsg` for why). Empty: every datagram goes through `tx`.
    /// A rootless node has no raw socket: the pool is its only way out.
    pub gso_pool: Vec<std::net::UdpSocket>,
    /// The pool sends one datagram per message (`UDP_SEGMENT` off or
    /// refused on a node without `tx`).
    pub pool_singly: bool,
    /// `UDP_GRO` on `rx`: where coalesced datagrams land before they are
    /// split into the worker's batch. `None`: one datagram per buffer.
    pub gro: Option<GroRx>,
    /// WireGuard: send runs of equal-sized datagrams to one endpoint with
    /// `UDP_SEGMENT` on `rx` (false: one `sendmmsg` of single datagrams).
    pub wg_gso: bool,
    /// The segment size from which `UDP_SEGMENT` sends are refused (the
    /// underlay's MTU was lowered under them), for both the VXLAN pool
    /// and WireGuard.
    pub gso_ceiling: GsoCeiling,
}

/// Runs of `UDP_SEGMENT` sends at or above a refused segment size sent one
/// datagram per send before `UDP_SEGMENT` is tried for them again. A tried
/// and refused send costs the kernel's copy of the run into its buffer, so
/// one in 256 runs (about 24 MB of full-sized datagrams) adds 0.4 % to the
/// copying while the MTU stays low, and a raised MTU gets `UDP_SEGMENT`
/// back within those 24 MB.
pub const GSO_RETRY_AFTER: u32 = 256;

/// What the kernel said of `UDP_SEGMENT` sends by segment size (pure).
///
/// The kernel refuses a `UDP_SEGMENT` send whose segment, with its
/// headers, exceeds the device's MTU (EMSGSIZE; EINVAL on older kernels),
/// however the socket fragments single datagrams: an underlay whose MTU is
/// lowered below the outer datagrams (which keep their size: the TUN's
/// MTU, as kernel Flannel's device's, is set once at start) refuses every
/// such run. Those runs then go out one datagram per send, which the
/// kernel fragments (the sockets send with DF clear, see
/// `sys::mmsg::set_pmtu_omit`); every [`GSO_RETRY_AFTER`] runs one tries
/// `UDP_SEGMENT` again, and one taken lifts the ceiling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GsoCeiling {
    /// The smallest segment size refused; 0: none.
    refused: usize,
    /// Runs at or above `refused` still to send without trying.
    skip: u32,
}

impl GsoCeiling {
    /// Whether to try `UDP_SEGMENT` for a run of `seg`-byte segments (a
    /// run not tried is counted towards the next try).
    pub fn allows(&mut self, seg: usize) -> bool {
        if self.refused == 0 || seg < self.refused || self.skip == 0 {
            return true;
        }
        self.skip -= 1;
        false
    }

    /// The kernel refused `seg`-byte segments as larger than the device
    /// takes. Returns whether this is news (no size was refused before).
    #[must_use]
    pub fn handle_refused(&mut self, seg: usize) -> bool {
        let news = self.refused == 0;
        self.refused = if news { seg } else { self.refused.min(seg) };
        self.skip = GSO_RETRY_AFTER;
        news
    }

    /// The kernel took a run of `seg`-byte segments. Returns whether that
    /// lifted the ceiling (the MTU is back).
    #[must_use]
    pub fn handle_taken(&mut self, seg: usize) -> bool {
        let lifted = self.refused != 0 && seg >= self.refused;
        if lifted {
            *self = GsoCeiling::default();
        }
        lifted
    }

    /// The smallest segment size refused, if any.
    pub fn refused(&self) -> Option<usize> {
        (self.refused != 0).then_some(self.refused)
    }
}

/// Whether `e`, from a `UDP_SEGMENT` send, says the segment is larger than
/// the device takes (see [`GsoCeiling`]).
fn segment_too_large(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMSGSIZE) | Some(libc::EINVAL))
}

/// Whether `e`, from a `UDP_SEGMENT` send, says this socket cannot do
/// `UDP_SEGMENT` at all (a device without checksum offload, an old kernel).
fn gso_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::ENOPROTOOPT))
}

/// Logs that the [`GsoCeiling`] of one underlay family of one worker was
/// set at `seg` bytes, or lifted.
fn log_ceiling(v6: bool, seg: usize, lifted: bool) {
    if lifted {
        tracing::info!(v6, seg, "UDP_SEGMENT taken again for segments of this size");
    } else {
        tracing::warn!(
            v6,
            seg,
            retry_every = GSO_RETRY_AFTER,
            "UDP_SEGMENT refused for segments of this size (the underlay MTU was lowered?): such runs go out one \
             datagram per send, fragmented by the kernel; UDP_SEGMENT is tried again after retry_every of them"
        );
    }
}

/// Receive state with `UDP_GRO`: a few large buffers, and how far their
/// datagrams have been handed out.
pub struct GroRx {
    batch: Batch,
    got: [Received; GRO_BUFS],
    count: usize,
    buf: usize,
    off: usize,
}

/// Buffers per `recvmmsg` with `UDP_GRO`: each holds up to 64 KiB of one
/// flow's datagrams, so 8 fill a 64-slot batch several times over (the
/// probe's `recvmmsg` of 8).
pub const GRO_BUFS: usize = 8;

impl Default for GroRx {
    fn default() -> Self {
        GroRx {
            batch: Batch::new(GRO_BUFS),
            got: [Received { len: 0, from: None, stride: 0, local: None }; GRO_BUFS],
            count: 0,
            buf: 0,
            off: 0,
        }
    }
}

impl UnderlayIo for UdpUnderlay {
    type Tx = FdTx;

    fn capabilities(&self) -> Capabilities {
        let gso = (!self.gso_pool.is_empty() && !self.pool_singly) || self.wg_gso;
        Capabilities {
            batch_size: MAX_MMSG,
            max_gso_segments: if gso { MAX_GSO_SEGMENTS } else { 1 },
            gro: self.gro.is_some(),
            uso: false,
        }
    }

    fn v6(&self) -> bool {
        self.v6
    }

    fn recv_in_place<'a>(
        &'a mut self,
        cap: usize,
        counters: &WorkerCounters,
        each: impl FnMut(&Received, &'a mut [u8]),
    ) -> Option<bool> {
        self.recv_gro_in_place(cap, counters, each)
    }

    fn send_gathered(
        &mut self,
        sport: u16,
        dst: SocketAddr,
        parts: &[&[u8]],
        seg: u16,
        segments: usize,
        counters: &WorkerCounters,
    ) {
        if self.gso_pool.is_empty() {
            // Dropped by an earlier run of the same super-packet: the
            // datapath chose this path for the whole packet.
            for _ in 0..segments {
                counters.count_drop(DropCause::Engine(EngineDrop::SendError));
            }
            return;
        }
        debug_assert_eq!(parts.len(), 2 * segments, "a header and a payload part per datagram");
        if self.send_pool(sport, dst, parts, 2, seg, counters) {
            self.drop_gso_pool();
        }
    }

    fn reply_tx(&self) -> FdTx {
        FdTx(self.rx.as_raw_fd())
    }

    fn recv_batch(&mut self, batch: &mut Batch, counters: &WorkerCounters) -> io::Result<usize> {
        batch.count = 0;
        let fd = self.rx.as_raw_fd();
        if let Some(gro) = &mut self.gro {
            return Ok(gro.fill(fd, batch, counters));
        }
        let mut slots = batch.bufs.iter_mut();
        let mut bufs: [&mut [u8]; MAX_MMSG] = std::array::from_fn(|_| slots.next().map_or(&mut [][..], |b| &mut b[..]));
        let cap = batch.meta.len().min(MAX_MMSG);
        let mut got = [Received { len: 0, from: None, stride: 0, local: None }; MAX_MMSG];
        loop {
            add(&counters.syscalls, 1);
            match recv_mmsg(fd, &mut bufs[..cap], &mut got) {
                Ok(n) => {
                    for (meta, r) in batch.meta.iter_mut().zip(&got[..n]) {
                        *meta = received_meta(r, 0, r.len);
                        add(&counters.udp_rx_packets, 1);
                        add(&counters.udp_rx_bytes, r.len as u64);
                    }
                    batch.count = n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Empty (WouldBlock), or an ICMP error surfacing as
                // ECONNREFUSED and the like: not fatal.
                Err(_) => return Ok(0),
            }
        }
    }

    fn send_batch(&mut self, batch: &Batch, counters: &WorkerCounters) {
        if !self.gso_pool.is_empty() {
            self.send_gso_runs(batch, counters);
            return;
        }
        let Some(tx) = &self.tx else {
            self.send_wg(batch, counters);
            return;
        };
        let unspecified = SocketAddr::from(([0u8; 4], 0));
        let mut list: [Outgoing<'_>; MAX_MMSG] = [(&[][..], unspecified, None); MAX_MMSG];
        let mut k = 0;
        // A batch may hold datagrams for both underlay families.
        for (datagram, meta) in batch.packets() {
            let Some(dst) = meta.addr.filter(|a| a.is_ipv6() == self.v6) else { continue };
            list[k] = (datagram, SocketAddr::new(dst, 0), None);
            k += 1;
            if k == MAX_MMSG {
                flush_raw(tx, &list[..k], counters);
                k = 0;
            }
        }
        if k > 0 {
            flush_raw(tx, &list[..k], counters);
        }
    }
}

fn received_meta(r: &Received, start: usize, len: usize) -> Meta {
    Meta {
        start,
        len,
        addr: r.from.map(canonical),
        port: r.from.map_or(0, |f| f.port()),
        vnet: VnetHdr::default(),
        local: r.local.map(|l| canonical(SocketAddr::new(l, 0))),
    }
}

/// Sends the datagrams of `parts`, `per` parts each, one per `sendmsg` on
/// `fd` without segmentation: the kernel fragments those larger than the
/// device. Counted, failures as drops.
fn send_singly(fd: std::os::fd::RawFd, parts: &[&[u8]], per: usize, dst: SocketAddr, counters: &WorkerCounters) {
    for datagram in parts.chunks(per.max(1)) {
        add(&counters.syscalls, 1);
        match send_gso(fd, datagram, dst, None, 0) {
            Ok(_) => add(&counters.udp_tx_packets, 1),
            Err(_) => counters.count_drop(DropCause::Engine(EngineDrop::SendError)),
        }
    }
}

fn flush_raw(tx: &RawUdpTx, list: &[Outgoing<'_>], counters: &WorkerCounters) {
    let st = send_mmsg(tx.as_raw_fd(), list);
    add(&counters.syscalls, st.syscalls);
    add(&counters.udp_tx_packets, st.sent);
    for _ in 0..st.failed {
        counters.count_drop(DropCause::Engine(EngineDrop::SendError));
    }
}

impl UdpUnderlay {
    /// Sends VXLAN datagrams (UDP header included, as `encapsulate` wrote
    /// them) through the GSO pool: each run of datagrams with one source
    /// port, one destination and one size (the last may be shorter) is one
    /// `UDP_SEGMENT` send. When the kernel cannot do `UDP_SEGMENT` at all
    /// the pool is dropped, which is logged once, and the raw socket takes
    /// over; a segment size it refuses goes out one datagram per send
    /// ([`GsoCeiling`]).
    fn send_gso_runs(&mut self, batch: &Batch, counters: &WorkerCounters) {
        let mut run: [&[u8]; MAX_GSO_SEGMENTS] = [&[]; MAX_GSO_SEGMENTS];
        let mut k = 0;
        let mut run_bytes = 0;
        let mut key = (0u16, SocketAddr::from(([0u8; 4], 0)), 0usize);
        let mut failed = false;
        for (datagram, meta) in batch.packets() {
            let Some(dst) = meta.addr.filter(|a| a.is_ipv6() == self.v6) else { continue };
            if datagram.len() < 8 {
                continue;
            }
            let sport = u16::from_be_bytes([datagram[0], datagram[1]]);
            let dport = u16::from_be_bytes([datagram[2], datagram[3]]);
            let payload = &datagram[8..];
            let this = (sport, SocketAddr::new(dst, dport), payload.len());
            // A run continues while the key matches and every earlier
            // datagram was full-sized; one shorter datagram ends it.
            let joins = k > 0
                && this.0 == key.0
                && this.1 == key.1
                && payload.len() <= key.2
                && k < MAX_GSO_SEGMENTS
                && run_bytes + payload.len() <= MAX_GSO_BYTES;
            if !joins && k > 0 {
                failed |= self.flush_gso(&run[..k], key, counters);
                k = 0;
                run_bytes = 0;
            }
            if k == 0 {
                key = this;
            }
            run[k] = payload;
            k += 1;
            run_bytes += payload.len();
            if payload.len() < key.2 {
                failed |= self.flush_gso(&run[..k], key, counters);
                k = 0;
                run_bytes = 0;
            }
        }
        if k > 0 {
            failed |= self.flush_gso(&run[..k], key, counters);
        }
        if failed {
            self.drop_gso_pool();
        }
    }

    /// Sends one run of whole datagrams; returns whether the kernel refused
    /// `UDP_SEGMENT` itself (as opposed to a transient error, counted as a drop).
    fn flush_gso(&mut self, run: &[&[u8]], key: (u16, SocketAddr, usize), counters: &WorkerCounters) -> bool {
        self.send_pool(key.0, key.1, run, 1, key.2 as u16, counters)
    }

    /// Sends the datagrams of `parts` (`per` parts each: a whole datagram,
    /// or a header and a payload) from the pool socket of `sport` to `dst`
    /// in one `UDP_SEGMENT` send cutting every `seg` bytes (one datagram:
    /// no segmentation asked). A send refused for its segment size goes out
    /// again one datagram per send, and so do later runs of that size for
    /// a while ([`GsoCeiling`]). Returns whether the kernel refused
    /// `UDP_SEGMENT` itself (the datagrams went out one per send all the
    /// same); every datagram not sent is counted as a drop.
    fn send_pool(
        &mut self,
        sport: u16,
        dst: SocketAddr,
        parts: &[&[u8]],
        per: usize,
        seg: u16,
        counters: &WorkerCounters,
    ) -> bool {
        let segments = parts.len() / per.max(1);
        let sock = self.gso_pool[sport as usize % self.gso_pool.len()].as_raw_fd();
        if segments > 1 && (self.pool_singly || !self.gso_ceiling.allows(seg as usize)) {
            send_singly(sock, parts, per, dst, counters);
            return false;
        }
        add(&counters.syscalls, 1);
        // A segment size of 0 asks for no segmentation: one datagram.
        let gso = if segments > 1 { seg } else { 0 };
        match send_gso(sock, parts, dst, None, gso) {
            Ok(_) => {
                add(&counters.udp_tx_packets, segments as u64);
                if segments > 1 && self.gso_ceiling.handle_taken(seg as usize) {
                    log_ceiling(self.v6, seg as usize, true);
                }
                false
            }
            Err(e) if segments > 1 && (segment_too_large(&e) || gso_unsupported(&e)) => {
                add(&counters.udp_gso_refused, 1);
                let unsupported = gso_unsupported(&e);
                if !unsupported && self.gso_ceiling.handle_refused(seg as usize) {
                    log_ceiling(self.v6, seg as usize, false);
                }
                send_singly(sock, parts, per, dst, counters);
                unsupported
            }
            Err(_) => {
                for _ in 0..segments {
                    counters.count_drop(DropCause::Engine(EngineDrop::SendError));
                }
                false
            }
        }
    }

    /// The kernel refused `UDP_SEGMENT`: later datagrams take the raw
    /// socket (the pool, without one), one per message. Logged once.
    fn drop_gso_pool(&mut self) {
        tracing::warn!(v6 = self.v6, "UDP_SEGMENT refused by the kernel; sending one datagram per message");
        if self.tx.is_some() {
            self.gso_pool = Vec::new();
        } else {
            self.pool_singly = true;
        }
    }
}

impl UdpUnderlay {
    /// WireGuard datagrams (whole UDP payloads, `addr`/`port` their
    /// endpoint) from the listening socket: runs of one endpoint and one
    /// size as `UDP_SEGMENT` sends, the rest (or everything, when GSO is
    /// off or refused) in `sendmmsg` calls.
    fn send_wg(&mut self, batch: &Batch, counters: &WorkerCounters) {
        let fd = self.rx.as_raw_fd();
        let unspecified = SocketAddr::from(([0u8; 4], 0));
        let mut list: [Outgoing<'_>; MAX_MMSG] = [(&[][..], unspecified, None); MAX_MMSG];
        let mut k = 0;
        for (datagram, meta) in batch.packets() {
            let Some(ip) = meta.addr.filter(|a| a.is_ipv6() == self.v6) else { continue };
            let dst = SocketAddr::new(ip, meta.port);
            // From the address the peer last sent to (multi-homed hosts).
            list[k] = (datagram, dst, meta.local.filter(|l| l.is_ipv6() == self.v6));
            k += 1;
        }
        let list = &list[..k];
        let mut run: [&[u8]; MAX_GSO_SEGMENTS] = [&[]; MAX_GSO_SEGMENTS];
        let mut i = 0;
        while i < list.len() {
            let (first, dst, src) = list[i];
            let size = first.len();
            let mut n = 0;
            let mut bytes = 0;
            while i + n < list.len()
                && n < MAX_GSO_SEGMENTS
                && list[i + n].1 == dst
                && list[i + n].2 == src
                && list[i + n].0.len() <= size
                && bytes + list[i + n].0.len() <= MAX_GSO_BYTES
            {
                run[n] = list[i + n].0;
                bytes += run[n].len();
                n += 1;
                if run[n - 1].len() < size {
                    break;
                }
            }
            let mut sent = self.send_wg_run(fd, &run[..n], dst, src, counters);
            if sent == 0 && src.is_some() {
                // Our address the peer last sent to is gone (this host's
                // address changed): let the kernel pick until the peer
                // tells us the new one.
                sent = self.send_wg_run(fd, &run[..n], dst, None, counters);
            }
            add(&counters.udp_tx_packets, sent);
            for _ in sent..n as u64 {
                counters.count_drop(DropCause::Engine(EngineDrop::SendError));
            }
            i += n;
        }
    }

    /// Sends one run of WireGuard datagrams to `dst` from `src`: one
    /// `UDP_SEGMENT` send, or a `sendmmsg`. Returns how many left.
    fn send_wg_run(
        &mut self,
        fd: std::os::fd::RawFd,
        run: &[&[u8]],
        dst: SocketAddr,
        src: Option<IpAddr>,
        counters: &WorkerCounters,
    ) -> u64 {
        // One datagram needs no segmentation; and the kernel refuses
        // segments larger than the device's MTU (a lowered underlay MTU, a
        // TUN MTU raised above it): such a run goes out by sendmmsg,
        // fragmented by the kernel, and so do later runs of that size for
        // a while (`GsoCeiling`).
        let seg = run[0].len();
        if self.wg_gso && run.len() > 1 && self.gso_ceiling.allows(seg) {
            add(&counters.syscalls, 1);
            match send_gso(fd, run, dst, src, seg as u16) {
                Ok(_) => {
                    if self.gso_ceiling.handle_taken(seg) {
                        log_ceiling(self.v6, seg, true);
                    }
                    return run.len() as u64;
                }
                Err(e) if gso_unsupported(&e) => {
                    add(&counters.udp_gso_refused, 1);
                    tracing::warn!(
                        v6 = self.v6,
                        "UDP_SEGMENT refused by the kernel; WireGuard sends one datagram per message"
                    );
                    self.wg_gso = false;
                }
                Err(e) if segment_too_large(&e) => {
                    add(&counters.udp_gso_refused, 1);
                    if self.gso_ceiling.handle_refused(seg) {
                        log_ceiling(self.v6, seg, false);
                    }
                }
                Err(_) => {}
            }
        }
        let unspecified = SocketAddr::from(([0u8; 4], 0));
        let mut list: [Outgoing<'_>; MAX_GSO_SEGMENTS] = [(&[][..], unspecified, None); MAX_GSO_SEGMENTS];
        for (l, d) in list.iter_mut().zip(run) {
            *l = (d, dst, src);
        }
        let st = send_mmsg(fd, &list[..run.len()]);
        add(&counters.syscalls, st.syscalls);
        st.sent
    }
}

impl UdpUnderlay {
    /// With `UDP_GRO`: hands each received datagram to `each` where it
    /// lies in the GRO buffers (no copy), with what `recvmmsg` said of its
    /// buffer: those left from the last call first, else newly received
    /// ones, at most `cap` in all. Returns `None` when `UDP_GRO` is off,
    /// else whether more may be waiting.
    fn recv_gro_in_place<'a>(
        &'a mut self,
        cap: usize,
        counters: &WorkerCounters,
        mut each: impl FnMut(&Received, &'a mut [u8]),
    ) -> Option<bool> {
        let fd = self.rx.as_raw_fd();
        let GroRx { batch, got, count, buf, off } = self.gro.as_mut()?;
        if *buf >= *count {
            let mut slots = batch.bufs.iter_mut();
            let mut bufs: [&mut [u8]; GRO_BUFS] =
                std::array::from_fn(|_| slots.next().map_or(&mut [][..], |b| &mut b[..]));
            loop {
                add(&counters.syscalls, 1);
                match recv_mmsg(fd, &mut bufs, got) {
                    Ok(n) => {
                        (*count, *buf, *off) = (n, 0, 0);
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // Empty, or an ICMP error surfacing: not fatal.
                    Err(_) => {
                        (*count, *buf, *off) = (0, 0, 0);
                        return Some(false);
                    }
                }
            }
        }
        let full = *count == GRO_BUFS;
        let mut handed = 0;
        let first = *buf;
        for (b, data) in batch.bufs.iter_mut().enumerate().take(*count).skip(first) {
            let r = got[b];
            let stride = if r.stride == 0 { r.len } else { r.stride };
            let at = if b == first { *off } else { 0 };
            let mut rest: &'a mut [u8] = &mut data[at.min(r.len)..r.len];
            let mut pos = at;
            while !rest.is_empty() {
                if handed == cap {
                    (*buf, *off) = (b, pos);
                    return Some(true);
                }
                let len = stride.min(rest.len());
                let (datagram, tail) = std::mem::take(&mut rest).split_at_mut(len);
                rest = tail;
                pos += len;
                handed += 1;
                add(&counters.udp_rx_packets, 1);
                add(&counters.udp_rx_bytes, len as u64);
                each(&r, datagram);
            }
        }
        (*buf, *off) = (*count, 0);
        Some(full)
    }
}

/// Sends single datagrams on a socket's file descriptor.
#[derive(Debug, Clone, Copy)]
pub struct FdTx(pub std::os::fd::RawFd);

impl DatagramTx for FdTx {
    fn send_to(&self, d: &[u8], to: SocketAddr, from: Option<IpAddr>, counters: &WorkerCounters) {
        let mut st = send_mmsg(self.0, &[(d, to, from)]);
        if st.sent == 0 && from.is_some() {
            // Our address the peer last sent to is gone: the kernel's.
            st = send_mmsg(self.0, &[(d, to, None)]);
        }
        add(&counters.syscalls, st.syscalls);
        add(&counters.udp_tx_packets, st.sent);
    }
}

/// UDP payload bytes one `UDP_SEGMENT` send may carry (65 535 - 8 - 20).
pub const MAX_GSO_BYTES: usize = 65507;

impl GroRx {
    /// Fills `batch` with single datagrams: those left over from the last
    /// `recvmmsg`, then newly received ones, each copied out of its GRO
    /// buffer into a slot of its own. Returns the count: the batch's
    /// capacity when more may be waiting.
    fn fill(&mut self, fd: std::os::fd::RawFd, batch: &mut Batch, counters: &WorkerCounters) -> usize {
        let cap = batch.capacity();
        loop {
            while self.buf < self.count {
                let r = self.got[self.buf];
                let stride = if r.stride == 0 { r.len } else { r.stride };
                while self.off < r.len {
                    if batch.count == cap {
                        return cap;
                    }
                    let len = stride.min(r.len - self.off);
                    let (dst, meta) = batch.slot_mut(batch.count);
                    dst[..len].copy_from_slice(&self.batch.bufs[self.buf][self.off..self.off + len]);
                    *meta = received_meta(&r, 0, len);
                    add(&counters.udp_rx_packets, 1);
                    add(&counters.udp_rx_bytes, len as u64);
                    batch.count += 1;
                    self.off += len;
                }
                self.buf += 1;
                self.off = 0;
            }
            let mut slots = self.batch.bufs.iter_mut();
            let mut bufs: [&mut [u8]; GRO_BUFS] =
                std::array::from_fn(|_| slots.next().map_or(&mut [][..], |b| &mut b[..]));
            add(&counters.syscalls, 1);
            match recv_mmsg(fd, &mut bufs, &mut self.got) {
                Ok(n) => {
                    self.count = n;
                    self.buf = 0;
                    self.off = 0;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.count = 0;
                    return batch.count;
                }
            }
        }
    }
}

/// The IP of a socket address, IPv4-mapped IPv6 unmapped.
pub fn canonical(a: SocketAddr) -> IpAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_segment_size_is_not_tried_again_for_a_while_and_a_taken_one_lifts_the_ceiling() {
        let mut c = GsoCeiling::default();
        assert!(c.allows(1472), "nothing refused: every size is tried");
        assert!(c.handle_refused(1472), "the first refusal is news");
        assert_eq!(c.refused(), Some(1472));
        assert!(c.allows(1400), "smaller segments are still tried");
        // The next GSO_RETRY_AFTER runs of that size or larger go out singly.
        for i in 0..GSO_RETRY_AFTER {
            assert!(!c.allows(if i % 2 == 0 { 1472 } else { 9000 }), "run {i}");
        }
        assert!(c.allows(1472), "then one is tried again");
        // Refused once more (the MTU is still low), and lower now: no news.
        assert!(!c.handle_refused(1400));
        assert_eq!(c.refused(), Some(1400), "the smallest size refused");
        assert!(!c.allows(1400) && c.allows(1399));
        // A smaller size taken lifts nothing; the refused size taken does.
        assert!(!c.handle_taken(1300));
        assert_eq!(c.refused(), Some(1400));
        assert!(c.handle_taken(1472), "the MTU is back");
        assert_eq!(c, GsoCeiling::default());
        assert!(c.allows(9000));
    }

    #[test]
    fn errors_of_a_gso_send_are_told_apart() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert!(segment_too_large(&e(libc::EMSGSIZE)) && segment_too_large(&e(libc::EINVAL)));
        assert!(gso_unsupported(&e(libc::EIO)) && gso_unsupported(&e(libc::ENOPROTOOPT)));
        for other in [libc::EAGAIN, libc::ENETUNREACH, libc::EPERM] {
            assert!(!segment_too_large(&e(other)) && !gso_unsupported(&e(other)), "{other}");
        }
    }
}
