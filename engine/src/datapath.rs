//! The data path of one worker, apart from how it is woken: packets in
//! from the pod side, out to the underlay, and back, over the I/O traits.
//!
//! ```text
//!  PodIo --read batch--> route lookup --> encapsulate (VXLAN | WireGuard) --send batch--> UnderlayIo
//!  PodIo <--write batch-- peer checks <-- decapsulate <--recv batch-- UnderlayIo
//! ```
//!
//! [`Datapath`] is generic over its two sides: the worker drives it with a
//! TUN queue and UDP sockets from a poll loop; tests drive it with the
//! in-memory sides of [`crate::io::mem`] and a virtual clock. Time comes in
//! as `now` with every call; nothing here reads a clock.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, MutexGuard};
use std::time::Instant;

use weft_tunnel::vxlan::{Vtep, Vxlan, HEADROOM};
use weft_tunnel::wireguard::{inner_source, Message, WgError, COOKIE_REPLY_LEN, RESPONSE_LEN};

use crate::coalesce::{coalesce, Out};
use crate::counters::{add, DropCause, EngineDrop, WorkerCounters};
use crate::io::{canonical, Batch, DatagramTx, Meta, PodIo, UnderlayIo, BATCH_SIZE, BUF_LEN, MAX_GSO_BYTES};
use crate::segment::{segment_tcp, Plan};
use crate::snapshot::Snapshot;
use crate::sys::mmsg::{MAX_GSO_PARTS, MAX_GSO_SEGMENTS};
use crate::vnet::{complete_csum, F_NEEDS_CSUM};
use crate::wg::{Deadlines, PeerRef, PeerState, WgDevice};

/// Datagrams the transmit batch holds before it is sent: one 64 KiB
/// super-packet cut at a 1450-byte MTU makes 47, so 64 holds one whole
/// plus the small packets around it; a longer run is sent in several calls.
pub const TX_SLOTS: usize = 64;

/// Room per segment header in the header slots: outer UDP, VXLAN and
/// Ethernet ([`HEADROOM`]), then IPv6 and TCP with the most options.
pub const HDR_SLOT: usize = 160;

/// Datagrams one in-place receive hands out at most: [`crate::io::GRO_BUFS`]
/// buffers of up to 64 datagrams (`UDP_GRO` merges at most 64).
pub const MAX_VIEWS: usize = 512;

/// Which encapsulation a data path speaks.
#[derive(Clone)]
pub enum Backend {
    /// VXLAN: our endpoint per underlay family, in the families' order.
    Vxlan(Vec<Vxlan>),
    /// WireGuard: this node's identity.
    Wireguard(Arc<WgDevice>),
}

impl Backend {
    /// The VXLAN endpoint of underlay family `f`.
    pub fn vxlan(&self, f: usize) -> Option<&Vxlan> {
        match self {
            Backend::Vxlan(v) => v.get(f),
            Backend::Wireguard(_) => None,
        }
    }

    /// The WireGuard device.
    pub fn wireguard(&self) -> Option<&Arc<WgDevice>> {
        match self {
            Backend::Wireguard(d) => Some(d),
            Backend::Vxlan(_) => None,
        }
    }
}

/// One worker's packet path: its two sides, its buffers (allocated once),
/// and what it forwards with.
pub struct Datapath<P, U> {
    /// The pod side (a TUN queue).
    pub pod: P,
    /// The underlay families, IPv4 first; one or two.
    pub families: Vec<U>,
    /// The encapsulation.
    pub backend: Backend,
    /// The peers and routes, swapped whole between batches.
    pub snapshot: Arc<Snapshot>,
    /// This worker's counters.
    pub counters: Arc<WorkerCounters>,
    /// MTU of the pod side: larger decapsulated packets are cut before
    /// writing; WireGuard pads to it at most.
    pub mtu: usize,
    /// WireGuard: the peers' earliest deadline, shared by the workers.
    pub deadlines: Option<Arc<Deadlines>>,
    /// Whether this data path drives the WireGuard timers.
    pub timer_owner: bool,
    /// Where segments are built, one at a time.
    scratch: Vec<u8>,
    /// Where WireGuard writes what its protocol sends on its own.
    wg_out: Vec<u8>,
    /// Segment headers of one `UDP_SEGMENT` send, [`HDR_SLOT`] bytes each.
    hdrs: Vec<u8>,
    pod_batch: Batch,
    underlay_batch: Batch,
    tx_batch: Batch,
}

/// The packets of a TUN batch for one WireGuard peer, sealed together
/// under one take of the peer's lock: (slot, inner length, segmentation).
struct WgRun {
    peer: usize,
    len: usize,
    items: [(usize, usize, Option<Plan>); BATCH_SIZE],
}

impl Default for WgRun {
    fn default() -> Self {
        WgRun { peer: 0, len: 0, items: [(0, 0, None); BATCH_SIZE] }
    }
}

impl<P: PodIo, U: UnderlayIo> Datapath<P, U> {
    /// A data path over `pod` and `families`, with every buffer allocated.
    pub fn new(
        pod: P,
        families: Vec<U>,
        backend: Backend,
        snapshot: Arc<Snapshot>,
        counters: Arc<WorkerCounters>,
        mtu: usize,
    ) -> Self {
        let wg = matches!(backend, Backend::Wireguard(_));
        Datapath {
            pod,
            families,
            backend,
            snapshot,
            counters,
            mtu,
            deadlines: None,
            timer_owner: false,
            scratch: vec![0u8; BUF_LEN],
            wg_out: if wg { vec![0u8; BUF_LEN] } else { Vec::new() },
            hdrs: vec![0u8; HDR_SLOT * MAX_GSO_SEGMENTS],
            pod_batch: Batch::default(),
            underlay_batch: Batch::new(TX_SLOTS),
            tx_batch: Batch::new(TX_SLOTS),
        }
    }

    /// Pod to underlay: one batch read, encapsulated and sent. Returns
    /// whether more may be waiting (the batch was full).
    pub fn pod_to_underlay(&mut self, now: Instant) -> io::Result<bool> {
        let (mut batch, mut tx) = (self.pod_batch.take(), self.tx_batch.take());
        let r = self.tun_to_underlay(&mut batch, &mut tx, now);
        (self.pod_batch, self.tx_batch) = (batch, tx);
        Ok(r? == self.pod_batch.capacity())
    }

    /// Underlay to pod on family `f`: one batch received, decapsulated and
    /// written. Returns whether more may be waiting.
    pub fn underlay_to_pod(&mut self, f: usize, now: Instant) -> io::Result<bool> {
        let (mut batch, mut out) = (self.underlay_batch.take(), self.tx_batch.take());
        let r = self.underlay_to_tun(f, &mut batch, &mut out, now);
        (self.underlay_batch, self.tx_batch) = (batch, out);
        r
    }

    /// The timer owner's turn: fires the WireGuard timers due at `now`.
    pub fn poll_timers(&mut self, now: Instant) {
        if let Some(d) = self.deadlines.clone().filter(|_| self.timer_owner) {
            if d.next().is_some_and(|t| t <= now) {
                self.wg_timers(&d, now);
            }
        }
    }

    /// Takes a new snapshot; the timer owner looks at the new peers'
    /// timers (a persistent keepalive) at once.
    pub fn set_snapshot(&mut self, snapshot: Arc<Snapshot>, now: Instant) {
        self.snapshot = snapshot;
        if let Some(d) = self.deadlines.clone().filter(|_| self.timer_owner) {
            self.wg_timers(&d, now);
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
    fn tun_to_underlay(&mut self, batch: &mut Batch, tx: &mut Batch, now: Instant) -> io::Result<usize> {
        let n = self.pod.read_batch(batch, HEADROOM, &self.counters)?;
        tx.set_len(0);
        let snapshot = self.snapshot.clone();
        let mut wg_run = WgRun::default();
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
            let Some((pi, vtep)) = snapshot.route_index(dst) else {
                self.counters.count_drop(DropCause::Engine(EngineDrop::NoRoute));
                continue;
            };
            let peer = &snapshot.peers()[pi];
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
            if peer.wg.is_some() {
                // Sealed with the run of packets for this peer, under one
                // take of its lock.
                if wg_run.len > 0 && wg_run.peer != pi {
                    self.wg_seal_run(&snapshot, batch, tx, &wg_run, now);
                    wg_run.len = 0;
                }
                wg_run.peer = pi;
                wg_run.items[wg_run.len] = (i, inner_len, plan);
                wg_run.len += 1;
                add(&peer.counters.tx_packets, plan.map_or(1, |p| p.count()) as u64);
                add(&peer.counters.tx_bytes, inner_len as u64);
                continue;
            }
            let Some((f, vxlan, pool)) =
                self.families.iter().position(|u| u.v6() == vtep.addr.is_ipv6()).and_then(|f| {
                    Some((f, self.backend.vxlan(f)?.clone(), self.families[f].capabilities().max_gso_segments > 1))
                })
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
        if wg_run.len > 0 {
            self.wg_seal_run(&snapshot, batch, tx, &wg_run, now);
        }
        if !tx.is_empty() {
            send_all(&mut self.families, tx, &self.counters);
        }
        Ok(n)
    }

    /// Seals a run of TUN packets for one WireGuard peer into the transmit
    /// batch: the peer's lock is taken once, for the counters of every
    /// segment and the endpoint; the AEAD runs without it. Without a
    /// session the packets are staged and a handshake starts.
    fn wg_seal_run(&mut self, snapshot: &Snapshot, batch: &mut Batch, tx: &mut Batch, run: &WgRun, now: Instant) {
        let Some(wg) = &snapshot.peers()[run.peer].wg else { return };
        let items = &run.items[..run.len];
        let segments: usize = items.iter().map(|(_, _, p)| p.map_or(1, |p| p.count())).sum();
        let bytes: usize = items.iter().map(|(_, len, _)| len).sum();
        let mut st = wg.lock();
        let grant = st.tunnel.send_grant(now, segments as u64, bytes as u64);
        let (endpoint, local) = (st.endpoint, st.local);
        let Some(grant) = grant else {
            for &(i, len, plan) in items {
                let inner = &batch.slot_mut(i).0[HEADROOM..HEADROOM + len];
                match plan {
                    Some(plan) => {
                        for j in 0..plan.count() {
                            if let Ok(l) = plan.write(inner, j, &mut self.scratch) {
                                st.tunnel.stage(now, &self.scratch[..l]);
                            }
                        }
                    }
                    None => st.tunnel.stage(now, inner),
                }
            }
            self.wg_drain(&mut st, now);
            return;
        };
        // A rekey the grant asked for goes out now; the deadline follows.
        self.wg_drain(&mut st, now);
        drop(st);
        let Some(ep) = endpoint else {
            for _ in 0..segments {
                self.counters.count_drop(DropCause::Engine(EngineDrop::WgNoEndpoint));
            }
            return;
        };
        let mut counter = grant.first;
        for &(i, len, plan) in items {
            for j in 0..plan.map_or(1, |p| p.count()) {
                if tx.len() == tx.capacity() {
                    send_all(&mut self.families, tx, &self.counters);
                }
                let inner = &batch.slot_mut(i).0[HEADROOM..HEADROOM + len];
                let plain = match &plan {
                    Some(plan) => match plan.write(inner, j, &mut self.scratch) {
                        Ok(l) => &self.scratch[..l],
                        Err(_) => {
                            self.counters.count_drop(DropCause::Engine(EngineDrop::Encap));
                            counter += 1;
                            continue;
                        }
                    },
                    None => inner,
                };
                let k = tx.len();
                let (out, meta) = tx.slot_mut(k);
                match grant.keypair.seal(counter, plain, self.mtu, out) {
                    Some(dlen) => {
                        *meta = Meta {
                            start: 0,
                            len: dlen,
                            addr: Some(ep.ip()),
                            port: ep.port(),
                            local,
                            ..Meta::default()
                        };
                        tx.set_len(k + 1);
                    }
                    None => self.counters.count_drop(DropCause::Engine(EngineDrop::Encap)),
                }
                counter += 1;
            }
        }
    }

    /// Sends what the peer's protocol state wants sent on its own
    /// (initiations, keepalives, staged packets) to its endpoint, and
    /// lowers the timer deadline to the peer's.
    fn wg_drain(&mut self, st: &mut PeerState, now: Instant) {
        while let Some(n) = st.tunnel.poll_transmit(now, self.mtu, &mut self.wg_out) {
            match st.endpoint {
                Some(ep) => send_one(&self.families, &self.wg_out[..n], ep, st.local, &self.counters),
                None => self.counters.count_drop(DropCause::Engine(EngineDrop::WgNoEndpoint)),
            }
        }
        if let Some(d) = &self.deadlines {
            d.lower(st.tunnel.poll_timeout());
        }
    }

    /// The timer owner's pass over every peer: fires what is due, sends
    /// what that wants sent, and rebuilds the earliest deadline.
    fn wg_timers(&mut self, deadlines: &Deadlines, now: Instant) {
        deadlines.clear();
        let snapshot = self.snapshot.clone();
        for wg in snapshot.peers().iter().filter_map(|p| p.wg.as_ref()) {
            let mut st = wg.lock();
            if st.tunnel.poll_timeout().is_some_and(|t| t <= now) {
                st.tunnel.handle_timeout(now);
            }
            self.wg_drain(&mut st, now);
        }
    }

    /// Super-packet to underlay with the `UDP_SEGMENT` pool: each segment's
    /// headers (outer UDP, VXLAN, Ethernet, IP, TCP/UDP) are written into a
    /// slot of [`Worker::hdrs`], its payload stays where the TUN read put
    /// it, and one `sendmsg` gathers a run of them: the kernel's copy into
    /// the UDP skb is the only copy of the payload on the way out.
    fn send_segments(
        families: &mut [U],
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
            families[f].send_gathered(port.0, dst, &parts[..2 * k], seg as u16, k, counters);
        }
    }

    /// Tunnel to pod: receive a batch on underlay family `f`, decapsulate and
    /// check, write to the TUN. Returns whether more may be waiting.
    fn underlay_to_tun(&mut self, f: usize, batch: &mut Batch, out: &mut Batch, now: Instant) -> io::Result<bool> {
        let Some(vxlan) = self.backend.vxlan(f).cloned() else {
            return self.wg_receive(f, batch, out, now);
        };
        let gro = self.pod.capabilities().gro;
        if gro {
            if let Some(more) = self.vxlan_in_place(f, &vxlan) {
                return Ok(more);
            }
        }
        let n = self.families[f].recv_batch(batch, &self.counters)?;
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
            coalesce_to_tun(&mut self.pod, self.mtu, &self.counters, batch);
        } else {
            self.pod.write_batch(batch, &self.counters);
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
        let more = self.families[f].recv_in_place(MAX_VIEWS, counters, |r, datagram| {
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
        let stats = coalesce(&mut pkts[..n], &mut outs[..n], self.mtu, self.pod.capabilities().uso);
        count_coalesce(counters, stats);
        self.pod.write_coalesced(&pkts[..n], &outs[..n], counters);
        Some(more)
    }

    /// WireGuard receive: find the peer, check macs, handshake or open with its session,
    /// enforce the peer's allowed IPs, follow its endpoint, write to the TUN.
    ///
    /// With `UDP_GRO` the datagrams are opened where `recvmmsg` put them;
    /// otherwise `batch` receives them. Decrypted packets land in `out`'s
    /// slots, which are coalesced (with TUN offloads) and written when `out`
    /// is full and at the end. Returns whether more may be waiting.
    fn wg_receive(&mut self, f: usize, batch: &mut Batch, out: &mut Batch, now: Instant) -> io::Result<bool> {
        let Some(device) = self.backend.wireguard().cloned() else {
            let n = self.families[f].recv_batch(batch, &self.counters)?;
            return Ok(n == batch.capacity());
        };
        out.set_len(0);
        let snapshot = self.snapshot.clone();
        let mut rx = WgRx {
            device: &device,
            snapshot: &snapshot,
            counters: &self.counters,
            pod: &mut self.pod,
            mtu: self.mtu,
            wg_out: &mut self.wg_out,
            tx: self.families[f].reply_tx(),
            out,
            now,
            deadlines: self.deadlines.as_deref(),
            held: None,
        };
        let in_place = self.families[f].recv_in_place(MAX_VIEWS, rx.counters, |r, datagram| {
            let Some(from) = r.from else { return };
            let local = r.local.map(|l| canonical(SocketAddr::new(l, 0)));
            rx.open(SocketAddr::new(canonical(from), from.port()), local, datagram);
        });
        let more = match in_place {
            Some(more) => more,
            None => {
                let n = self.families[f].recv_batch(batch, rx.counters)?;
                for (datagram, meta) in batch.packets() {
                    let Some(ip) = meta.addr else { continue };
                    rx.open(SocketAddr::new(ip, meta.port), meta.local, datagram);
                }
                n == batch.capacity()
            }
        };
        rx.release();
        flush_to_tun(rx.pod, rx.mtu, rx.counters, rx.out);
        Ok(more)
    }

    /// Writes a TCP super-packet (a sender's TSO frame that crossed a veth
    /// or a host-internal virtio link uncut) to the TUN as MTU-sized
    /// segments; anything else that large is written as it is and left to
    /// the kernel (fragmentation or ICMP "too big").
    fn write_segmented(&mut self, packet: &[u8]) {
        let (pod, counters) = (&mut self.pod, &*self.counters);
        let mut write = |seg: &[u8]| pod.write_one(seg, counters);
        match segment_tcp(packet, self.mtu, &mut self.scratch, &mut write) {
            Ok(_) => add(&counters.sw_segmented, 1),
            Err(_) => write(packet),
        }
    }
}

/// What opening WireGuard datagrams needs of a worker, borrowed apart from
/// its sockets so that datagrams can be opened where they were received.
struct WgRx<'a, P, T> {
    device: &'a WgDevice,
    snapshot: &'a Snapshot,
    counters: &'a WorkerCounters,
    pod: &'a mut P,
    mtu: usize,
    wg_out: &'a mut Vec<u8>,
    /// The receiving socket: cookie replies and handshake answers leave by it.
    tx: T,
    out: &'a mut Batch,
    /// The batch's one clock read.
    now: Instant,
    deadlines: Option<&'a Deadlines>,
    /// The lock of the peer of the last datagram: consecutive datagrams
    /// of one peer (a run of a batch) take it once.
    held: Option<(usize, MutexGuard<'a, PeerState>)>,
}

impl<'a, P: PodIo, T: DatagramTx> WgRx<'a, P, T> {
    /// Lets go of the held peer lock, lowering the timer deadline to the peer's.
    fn release(&mut self) {
        if let Some((_, st)) = self.held.take() {
            if let Some(d) = self.deadlines {
                d.lower(st.tunnel.poll_timeout());
            }
        }
    }

    /// Opens one datagram from `from`, received on our address `local`.
    fn open(&mut self, from: SocketAddr, local: Option<IpAddr>, datagram: &[u8]) {
        let (counters, now) = (self.counters, self.now);
        let tx = self.tx.clone();
        let reply = |d: &[u8], to: SocketAddr, local: Option<IpAddr>| tx.send_to(d, to, local, counters);
        // What the protocol sends on its own, back to where this came from.
        let drain = |st: &mut PeerState, mtu: usize, buf: &mut Vec<u8>| {
            while let Some(n) = st.tunnel.poll_transmit(now, mtu, buf) {
                reply(&buf[..n], from, local);
            }
        };
        let drop = |e: WgError| counters.count_drop(DropCause::Wg(e));
        let msg = match Message::parse(datagram) {
            Ok(m) => m,
            Err(e) => return drop(e),
        };
        let identity = self.device.identity();
        let mut cookie = [0u8; COOKIE_REPLY_LEN];
        if let Err(e) = identity.check_macs(now, from, &msg, &mut cookie) {
            if e == WgError::Cookie {
                reply(&cookie, from, local);
            }
            return drop(e);
        }
        let mut half = None;
        let named = match &msg {
            Message::Initiation(m) => match identity.open_initiation(m) {
                Ok(h) => {
                    let key = h.peer;
                    half = Some(h);
                    PeerRef::Key(key)
                }
                Err(e) => return drop(e),
            },
            other => PeerRef::Index(other.receiver().unwrap_or(0) >> 8),
        };
        let Some(pi) = self.snapshot.wg_peer_index(named) else {
            counters.count_drop(DropCause::Engine(EngineDrop::WgUnknownPeer));
            return;
        };
        if self.held.as_ref().is_none_or(|(p, _)| *p != pi) {
            self.release();
            let Some(wg) = self.snapshot.peers()[pi].wg.as_ref() else { return };
            self.held = Some((pi, wg.lock()));
        }
        let Some((_, st)) = self.held.as_mut() else { return };
        match msg {
            Message::Initiation(_) => {
                let Some(half) = half else { return };
                let mut resp = [0u8; RESPONSE_LEN];
                match st.tunnel.consume_initiation(now, &half, &mut resp) {
                    Ok(()) => {
                        st.roam(from, local);
                        reply(&resp, from, local);
                    }
                    Err(e) => drop(e),
                }
            }
            Message::Response(m) => match st.tunnel.consume_response(now, m) {
                Ok(()) => {
                    st.roam(from, local);
                    // Packets staged while the handshake ran go out now.
                    drain(st, self.mtu, self.wg_out);
                }
                Err(e) => drop(e),
            },
            Message::CookieReply(m) => {
                if let Err(e) = st.tunnel.consume_cookie(now, m) {
                    drop(e);
                }
            }
            Message::Data(d) => {
                let Some(kp) = st.tunnel.keypair(d.receiver).cloned() else {
                    return drop(WgError::UnknownIndex);
                };
                if self.out.len() == self.out.capacity() {
                    flush_to_tun(self.pod, self.mtu, counters, self.out);
                }
                let k = self.out.len();
                let (obuf, ometa) = self.out.slot_mut(k);
                let len = match kp.open(d.counter, d.sealed, obuf) {
                    Ok(len) => len,
                    Err(e) => return drop(e),
                };
                if let Err(e) = st.tunnel.accept(now, &kp, d.counter, len) {
                    return drop(e);
                }
                // The endpoint follows the latest authenticated datagram,
                // whatever it carries (wireguard-go's order).
                st.roam(from, local);
                // A session this packet confirmed lets staged packets go.
                drain(st, self.mtu, self.wg_out);
                if len == 0 {
                    return; // a keepalive
                }
                let (n, inner_src) = match inner_source(&obuf[..len]) {
                    Ok(x) => x,
                    Err(e) => return drop(e),
                };
                // Cryptokey routing: the source must route back to this
                // very peer (a longest match), not merely lie inside one
                // of its prefixes, which may overlap another peer's.
                if self.snapshot.route_index(inner_src).map(|(o, _)| o) != Some(pi) {
                    counters.count_drop(DropCause::Engine(EngineDrop::WgAllowedIps));
                    return;
                }
                let peer = &self.snapshot.peers()[pi];
                add(&peer.counters.rx_packets, 1);
                add(&peer.counters.rx_bytes, n as u64);
                *ometa = Meta { start: 0, len: n, ..Meta::default() };
                self.out.set_len(k + 1);
            }
        }
    }
}

/// Sends one datagram to `ep` from `local` on the underlay of its
/// address family.
fn send_one<U: UnderlayIo>(families: &[U], d: &[u8], ep: SocketAddr, local: Option<IpAddr>, counters: &WorkerCounters) {
    match families.iter().find(|u| u.v6() == ep.is_ipv6()) {
        Some(u) => u.reply_tx().send_to(d, ep, local, counters),
        None => counters.count_drop(DropCause::Engine(EngineDrop::WgNoEndpoint)),
    }
}

/// Coalesces (with TUN offloads) and writes `out`'s packets, and empties it.
fn flush_to_tun<P: PodIo>(pod: &mut P, mtu: usize, counters: &WorkerCounters, out: &mut Batch) {
    if out.is_empty() {
        return;
    }
    if pod.capabilities().gro {
        coalesce_to_tun(pod, mtu, counters, out);
    } else {
        pod.write_batch(out, counters);
    }
    out.set_len(0);
}

/// Coalesces the live packets of `batch` and writes them to the TUN (which
/// has a virtio-net header), merged payloads gathered where they lie.
fn coalesce_to_tun<P: PodIo>(pod: &mut P, mtu: usize, counters: &WorkerCounters, batch: &mut Batch) {
    let mut pkts: [&mut [u8]; TX_SLOTS] = std::array::from_fn(|_| &mut [][..]);
    let n = batch.live_mut(&mut pkts);
    let mut outs = [Out::default(); TX_SLOTS];
    let stats = coalesce(&mut pkts[..n], &mut outs[..n], mtu, pod.capabilities().uso);
    count_coalesce(counters, stats);
    pod.write_coalesced(&pkts[..n], &outs[..n], counters);
}

fn count_coalesce(counters: &WorkerCounters, stats: crate::coalesce::Stats) {
    add(&counters.gro_merged, stats.merged);
    add(&counters.csum_completed, stats.csum_completed);
    add(&counters.sw_segmented, stats.oversized);
}

/// Sends the transmit batch on every underlay family (each takes the
/// datagrams of its own address family) and empties it.
fn send_all<U: UnderlayIo>(families: &mut [U], tx: &mut Batch, counters: &WorkerCounters) {
    for f in families {
        f.send_batch(tx, counters);
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
