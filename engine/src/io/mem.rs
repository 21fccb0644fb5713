//! Both sides of a worker in memory, for tests without root or devices:
//! packets a test queues are read as from a TUN, datagrams a test queues
//! arrive as on a socket, and whatever the worker writes or sends is kept
//! for the test (or a simulated link) to take.
//!
//! The pod side can play a TUN with offloads (super-packets in with a
//! virtio-net header, coalesced writes out); the underlay side has neither
//! `UDP_SEGMENT` nor `UDP_GRO` (those are the kernel's, tested on sockets).

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use super::{Batch, Capabilities, DatagramTx, Meta, PodIo, Received, UnderlayIo, BATCH_SIZE};
use crate::coalesce::{parts, Out};
use crate::counters::{add, WorkerCounters};
use crate::vnet::{VnetHdr, GSO_TCPV4};

/// A pod side in memory.
#[derive(Debug, Default)]
pub struct MemPod {
    /// Packets the worker will read, oldest first, each with the
    /// virtio-net header a TUN with offloads would give it.
    pub inbox: VecDeque<(VnetHdr, Vec<u8>)>,
    /// Packets the worker wrote, in order (a coalesced write as one).
    pub outbox: Vec<Vec<u8>>,
    /// Whether this side plays a TUN with offloads.
    pub offloads: bool,
    /// Buffers to write into: a test that moves written buffers back here
    /// sees no allocation per packet.
    pub spare: Vec<Vec<u8>>,
}

impl MemPod {
    /// A pod side with offloads or without.
    pub fn new(offloads: bool) -> MemPod {
        MemPod { offloads, ..MemPod::default() }
    }

    fn buffer(&mut self) -> Vec<u8> {
        let mut b = self.spare.pop().unwrap_or_default();
        b.clear();
        b
    }

    /// Queues one packet to be read.
    pub fn push(&mut self, packet: Vec<u8>) {
        self.inbox.push_back((VnetHdr::default(), packet));
    }

    /// Queues a TCP/IPv4 super-packet to be read whole, to be cut at `mss`
    /// (needs offloads).
    pub fn push_super(&mut self, packet: Vec<u8>, mss: u16) {
        let vnet = VnetHdr { gso_type: GSO_TCPV4, gso_size: mss, ..VnetHdr::default() };
        self.inbox.push_back((vnet, packet));
    }
}

impl PodIo for MemPod {
    fn capabilities(&self) -> Capabilities {
        let segments = if self.offloads { crate::sys::mmsg::MAX_GSO_SEGMENTS } else { 1 };
        Capabilities { batch_size: BATCH_SIZE, max_gso_segments: segments, gro: self.offloads, uso: false }
    }

    fn read_batch(&mut self, batch: &mut Batch, headroom: usize, _: &WorkerCounters) -> io::Result<usize> {
        let mut n = 0;
        while n < batch.capacity() {
            let Some((vnet, p)) = self.inbox.pop_front() else { break };
            let (buf, meta) = batch.slot_mut(n);
            buf[headroom..headroom + p.len()].copy_from_slice(&p);
            *meta = Meta { start: headroom, len: p.len(), vnet, ..Meta::default() };
            self.spare.push(p);
            n += 1;
        }
        batch.set_len(n);
        Ok(n)
    }

    fn write_batch(&mut self, batch: &Batch, counters: &WorkerCounters) {
        for (p, _) in batch.packets() {
            self.write_one(p, counters);
        }
    }

    fn write_coalesced(&mut self, pkts: &[&mut [u8]], outs: &[Out], counters: &WorkerCounters) {
        for (i, o) in outs.iter().enumerate().take(pkts.len()) {
            if !o.merged {
                let mut whole = self.buffer();
                for part in parts(pkts, outs, i) {
                    whole.extend_from_slice(part);
                }
                add(&counters.tun_tx_packets, 1);
                add(&counters.tun_tx_bytes, whole.len() as u64);
                self.outbox.push(whole);
            }
        }
    }

    fn write_one(&mut self, packet: &[u8], counters: &WorkerCounters) {
        add(&counters.tun_tx_packets, 1);
        add(&counters.tun_tx_bytes, packet.len() as u64);
        let mut b = self.buffer();
        b.extend_from_slice(packet);
        self.outbox.push(b);
    }
}

/// A datagram on a simulated wire: from, to, UDP payload.
pub type Datagram = (SocketAddr, SocketAddr, Vec<u8>);

/// Where an in-memory underlay's sent datagrams go, shared with its
/// [`MemTx`] handles.
pub type Wire = Arc<Mutex<Vec<Datagram>>>;

/// An underlay family in memory, at one address and port.
#[derive(Debug)]
pub struct MemUnderlay {
    /// Our address and listening port.
    pub local: SocketAddr,
    /// Datagrams the worker will receive: (from, payload).
    pub inbox: VecDeque<(SocketAddr, Vec<u8>)>,
    /// Datagrams the worker sent.
    pub outbox: Wire,
    /// VXLAN: the worker writes the UDP header itself (as through the raw
    /// socket); the source port is taken from it.
    pub udp_header: bool,
}

impl MemUnderlay {
    /// An underlay at `local`; `udp_header` for VXLAN.
    pub fn new(local: SocketAddr, udp_header: bool) -> MemUnderlay {
        MemUnderlay { local, inbox: VecDeque::new(), outbox: Arc::default(), udp_header }
    }

    /// Takes the datagrams sent so far.
    pub fn take_sent(&self) -> Vec<Datagram> {
        std::mem::take(&mut *self.outbox.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Sends single datagrams into a [`MemUnderlay`]'s outbox.
#[derive(Debug, Clone)]
pub struct MemTx {
    local: SocketAddr,
    wire: Wire,
}

impl DatagramTx for MemTx {
    fn send_to(&self, d: &[u8], to: SocketAddr, _from: Option<IpAddr>, counters: &WorkerCounters) {
        // One address per side: an address it no longer has is not used
        // (as the kernel refuses it and the socket falls back).
        let src = self.local;
        add(&counters.udp_tx_packets, 1);
        self.wire.lock().unwrap_or_else(|p| p.into_inner()).push((src, to, d.to_vec()));
    }
}

impl UnderlayIo for MemUnderlay {
    type Tx = MemTx;

    fn capabilities(&self) -> Capabilities {
        Capabilities { batch_size: BATCH_SIZE, max_gso_segments: 1, gro: false, uso: false }
    }

    fn v6(&self) -> bool {
        self.local.is_ipv6()
    }

    fn recv_batch(&mut self, batch: &mut Batch, counters: &WorkerCounters) -> io::Result<usize> {
        let mut n = 0;
        while n < batch.capacity() {
            let Some((from, d)) = self.inbox.pop_front() else { break };
            let (buf, meta) = batch.slot_mut(n);
            buf[..d.len()].copy_from_slice(&d);
            *meta = Meta {
                start: 0,
                len: d.len(),
                addr: Some(from.ip()),
                port: from.port(),
                local: Some(self.local.ip()),
                ..Meta::default()
            };
            add(&counters.udp_rx_packets, 1);
            add(&counters.udp_rx_bytes, d.len() as u64);
            n += 1;
        }
        batch.set_len(n);
        Ok(n)
    }

    fn recv_in_place<'a>(
        &'a mut self,
        _: usize,
        _: &WorkerCounters,
        _: impl FnMut(&Received, &'a mut [u8]),
    ) -> Option<bool> {
        None
    }

    fn send_batch(&mut self, batch: &Batch, counters: &WorkerCounters) {
        let tx = self.reply_tx();
        for (d, meta) in batch.packets() {
            let Some(dst) = meta.addr.filter(|a| a.is_ipv6() == self.v6()) else { continue };
            if self.udp_header {
                if d.len() < 8 {
                    continue;
                }
                let (sport, dport) = (u16::from_be_bytes([d[0], d[1]]), u16::from_be_bytes([d[2], d[3]]));
                let from = SocketAddr::new(self.local.ip(), sport);
                add(&counters.udp_tx_packets, 1);
                self.outbox.lock().unwrap_or_else(|p| p.into_inner()).push((
                    from,
                    SocketAddr::new(dst, dport),
                    d[8..].to_vec(),
                ));
            } else {
                tx.send_to(d, SocketAddr::new(dst, meta.port), meta.local, counters);
            }
        }
    }

    fn send_gathered(
        &mut self,
        sport: u16,
        dst: SocketAddr,
        parts: &[&[u8]],
        _: u16,
        _: usize,
        counters: &WorkerCounters,
    ) {
        for pair in parts.chunks(2) {
            let d: Vec<u8> = pair.iter().flat_map(|p| p.iter().copied()).collect();
            add(&counters.udp_tx_packets, 1);
            self.outbox.lock().unwrap_or_else(|p| p.into_inner()).push((
                SocketAddr::new(self.local.ip(), sport),
                dst,
                d,
            ));
        }
    }

    fn reply_tx(&self) -> MemTx {
        MemTx { local: self.local, wire: self.outbox.clone() }
    }
}
