//! Batched packet I/O on both sides of a worker.
//!
//! A worker moves packets in [`Batch`]es: the TUN side reads a batch, the
//! worker rewrites every packet in place, the underlay side sends the batch
//! (and the reverse). The traits speak in batches so that `recvmmsg`,
//! `sendmmsg`, `UDP_SEGMENT`/`UDP_GRO` and a vnet-header TUN slot in behind
//! them; the implementations here make one syscall per packet and say so in
//! [`Capabilities`].

use std::io;
use std::net::{IpAddr, SocketAddr};

use crate::counters::{add, DropCause, EngineDrop, WorkerCounters};
use crate::sys::raw::RawUdpTx;
use crate::sys::tun::TunQueue;
use crate::vnet::{VnetHdr, VNET_HDR_LEN};

/// Packets per batch. 32 keeps a batch's buffers (32 x 64 KiB per direction)
/// small next to the socket buffers while amortising the poll wakeup over
/// many packets; wireguard-go's TUN batches are of the same order.
pub const BATCH_SIZE: usize = 32;

/// Bytes per packet buffer: the largest IP packet plus room for the outer
/// headers written in front of it.
pub const BUF_LEN: usize = 65536 + 64;

/// What an I/O side can do per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Packets one call moves at most.
    pub batch_size: usize,
    /// Segments one send may carry (1: no GSO).
    pub max_gso_segments: usize,
    /// Whether receive coalescing (GRO) is on.
    pub gro: bool,
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
}

/// A fixed set of packet buffers, allocated once per worker.
pub struct Batch {
    bufs: Vec<Box<[u8]>>,
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
            bufs: (0..slots).map(|_| vec![0u8; BUF_LEN].into_boxed_slice()).collect(),
            meta: vec![Meta::default(); slots],
            count: 0,
        }
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
    pub fn parts_mut(&mut self) -> (&mut [Box<[u8]>], &mut [Meta]) {
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

    /// The live packets, dropped ones skipped, with their metadata.
    pub fn packets(&self) -> impl Iterator<Item = (&[u8], &Meta)> {
        self.bufs[..self.count]
            .iter()
            .zip(&self.meta[..self.count])
            .filter(|(_, m)| m.len > 0)
            .map(|(b, m)| (&b[m.start..m.start + m.len], m))
    }
}

/// The pod side: a TUN queue.
pub trait TunIo {
    /// What one call can do.
    fn capabilities(&self) -> Capabilities;
    /// Reads up to a batch of packets, each at `headroom` in its buffer.
    /// Returns how many were read; fewer than a batch means the queue is empty.
    fn read_batch(&mut self, batch: &mut Batch, headroom: usize, counters: &WorkerCounters) -> io::Result<usize>;
    /// Writes the batch's live packets, counting failures as drops.
    fn write_batch(&mut self, batch: &Batch, counters: &WorkerCounters);
}

/// The node side: the underlay UDP socket(s).
pub trait UnderlayIo {
    /// What one call can do.
    fn capabilities(&self) -> Capabilities;
    /// Receives up to a batch of UDP payloads with their source addresses.
    fn recv_batch(&mut self, batch: &mut Batch, counters: &WorkerCounters) -> io::Result<usize>;
    /// Sends the batch's live datagrams to their `addr`, counting failures.
    fn send_batch(&mut self, batch: &Batch, counters: &WorkerCounters);
}

const ONE_BY_ONE: Capabilities = Capabilities { batch_size: BATCH_SIZE, max_gso_segments: 1, gro: false };

impl TunIo for TunQueue {
    fn capabilities(&self) -> Capabilities {
        if self.vnet_hdr() {
            Capabilities { batch_size: BATCH_SIZE, max_gso_segments: 64, gro: true }
        } else {
            ONE_BY_ONE
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
                    *meta = Meta { start: headroom, len: n - VNET_HDR_LEN, addr: None, port: 0, vnet: hdr };
                    batch.count += 1;
                }
                Ok(n) => {
                    *meta = Meta { start: headroom, len: n, addr: None, port: 0, vnet: VnetHdr::default() };
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
}

impl TunQueue {
    /// Writes one complete packet, counting it (or its failure as a drop).
    pub fn write_counted(&self, packet: &[u8], counters: &WorkerCounters) {
        self.write_with(packet, &VnetHdr::default(), counters)
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

/// One underlay family: receives on an ordinary UDP socket, sends through a
/// raw one so that the UDP header (source port, checksum) is ours.
pub struct UdpUnderlay {
    /// The receiving socket, bound to the tunnel port.
    pub rx: mio::net::UdpSocket,
    /// The transmitting raw socket (VXLAN); WireGuard sends through `rx`.
    pub tx: Option<RawUdpTx>,
    /// Whether this is the IPv6 underlay.
    pub v6: bool,
}

impl UnderlayIo for UdpUnderlay {
    fn capabilities(&self) -> Capabilities {
        ONE_BY_ONE
    }

    fn recv_batch(&mut self, batch: &mut Batch, counters: &WorkerCounters) -> io::Result<usize> {
        batch.count = 0;
        while batch.count < batch.capacity() {
            let (buf, meta) = batch.slot_mut(batch.count);
            add(&counters.syscalls, 1);
            match self.rx.recv_from(buf) {
                Ok((n, from)) => {
                    *meta = Meta {
                        start: 0,
                        len: n,
                        addr: Some(canonical(from)),
                        port: from.port(),
                        vnet: VnetHdr::default(),
                    };
                    add(&counters.udp_rx_packets, 1);
                    add(&counters.udp_rx_bytes, n as u64);
                    batch.count += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors surface as ECONNREFUSED and the like: not fatal.
                Err(_) => break,
            }
        }
        Ok(batch.count)
    }

    fn send_batch(&mut self, batch: &Batch, counters: &WorkerCounters) {
        for (datagram, meta) in batch.packets() {
            // A batch may hold datagrams for both underlay families.
            let Some(dst) = meta.addr.filter(|a| a.is_ipv6() == self.v6) else { continue };
            let Some(tx) = &self.tx else { continue };
            add(&counters.syscalls, 1);
            match tx.send_to(datagram, dst) {
                Ok(_) => add(&counters.udp_tx_packets, 1),
                Err(_) => counters.count_drop(DropCause::Engine(EngineDrop::SendError)),
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
