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
use std::sync::Arc;
use std::time::Instant;

use weft_tunnel::vxlan::{Vtep, Vxlan, HEADROOM};
use weft_tunnel::wireguard::{
    inner_source, Keypair, Message, WgError, COOKIE_REPLY_LEN, DATA_HEADER_LEN, RESPONSE_LEN,
};

use crate::coalesce::{coalesce, Out};
use crate::counters::{add, DropCause, EngineDrop, WorkerCounters};
use crate::io::{canonical, Batch, DatagramTx, Meta, PodIo, UnderlayIo, BATCH_SIZE, BUF_LEN, MAX_GSO_BYTES};
use crate::segment::{segment_tcp, Plan};
use crate::snapshot::Snapshot;
use crate::spread::{spread, Crew};
use crate::sys::mmsg::{MAX_GSO_PARTS, MAX_GSO_SEGMENTS};
use crate::sys::pages::PageBuf;
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
    scratch: PageBuf,
    /// Where WireGuard writes what its protocol sends on its own.
    wg_out: PageBuf,
    /// Segment headers of one `UDP_SEGMENT` send, [`HDR_SLOT`] bytes each.
    hdrs: Vec<u8>,
    /// WireGuard: where each transmit slot's plaintext lies and what
    /// sealing it made.
    seal_jobs: [SealJob; TX_SLOTS],
    /// The workers WireGuard's AEAD spreads over, and which one this is
    /// (`None`: everything on this thread).
    pub crew: Option<(Arc<Crew>, usize)>,
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

/// One transmit slot's plaintext, for sealing in place.
#[derive(Debug, Clone, Copy, Default)]
struct SealJob {
    /// Where the data packet starts in the slot's buffer (the plaintext
    /// 16 bytes further).
    start: usize,
    counter: u64,
    /// The plaintext's length.
    plain: usize,
    /// The data packet's length once sealed; 0 if it did not fit.
    sealed: usize,
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
            scratch: PageBuf::zeroed(BUF_LEN),
            wg_out: PageBuf::zeroed(if wg { BUF_LEN } else { 0 }),
            hdrs: vec![0u8; HDR_SLOT * MAX_GSO_SEGMENTS],
            seal_jobs: [SealJob::default(); TX_SLOTS],
            crew: None,
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
        let mut batch = self.underlay_batch.take();
        let r = self.underlay_to_tun(f, &mut batch, now);
        self.underlay_batch = batch;
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
                let why = if link_scoped(dst) { EngineDrop::LinkLocal } else { EngineDrop::NoRoute };
                self.counters.count_drop(DropCause::Engine(why));
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
    /// segment and the endpoint; the AEAD runs without it, in place, spread
    /// over the workers. Without a session the packets are staged and a
    /// handshake starts.
    ///
    /// ```text
    ///  super-packet --Plan::write--> tx slot [16..]      (one copy, the segment's)
    ///  single packet: its buffer swapped into the tx slot (no copy), header at HEADROOM - 16
    ///  then seal_in_place over the slots, halves on two workers
    /// ```
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
        call_helper(&self.crew, bytes);
        let meta =
            |start: usize| Meta { start, len: 0, addr: Some(ep.ip()), port: ep.port(), local, ..Meta::default() };
        let mut counter = grant.first;
        // The first slot of this run not sealed yet.
        let mut from = tx.len();
        for &(i, len, plan) in items {
            for j in 0..plan.map_or(1, |p| p.count()) {
                if tx.len() == tx.capacity() {
                    self.seal_slots(tx, from, &grant.keypair);
                    send_all(&mut self.families, tx, &self.counters);
                    from = 0;
                }
                let k = tx.len();
                let (start, plain) = match &plan {
                    Some(plan) => {
                        let inner = &batch.slot_mut(i).0[HEADROOM..HEADROOM + len];
                        match plan.write(inner, j, &mut tx.slot_mut(k).0[DATA_HEADER_LEN..]) {
                            Ok(l) => (0, l),
                            Err(_) => {
                                self.counters.count_drop(DropCause::Engine(EngineDrop::Encap));
                                counter += 1;
                                continue;
                            }
                        }
                    }
                    None => {
                        tx.swap_buf(k, batch, i);
                        (HEADROOM - DATA_HEADER_LEN, len)
                    }
                };
                *tx.slot_mut(k).1 = meta(start);
                self.seal_jobs[k] = SealJob { start, counter, plain, sealed: 0 };
                tx.set_len(k + 1);
                counter += 1;
            }
        }
        self.seal_slots(tx, from, &grant.keypair);
    }

    /// Seals the plaintexts in `tx`'s slots from `from` on where they lie
    /// (as [`Datapath::seal_jobs`] says), spread over the workers; a slot
    /// whose buffer is too small is dropped.
    fn seal_slots(&mut self, tx: &mut Batch, from: usize, kp: &Keypair) {
        let (bufs, metas) = tx.parts_mut();
        let n = bufs.len();
        let mtu = self.mtu;
        let jobs = &mut self.seal_jobs[from..n];
        let (crew, me) = crew_of(&self.crew);
        let bytes = jobs.iter().map(|j| j.plain).sum();
        spread(crew, me, &mut bufs[from..n], jobs, bytes, false, &self.counters, &|b, job| {
            job.sealed = kp.seal_in_place(job.counter, &mut b[job.start..], job.plain, mtu).unwrap_or(0);
            if job.sealed > 0 {
                job.plain
            } else {
                0
            }
        });
        for (meta, job) in metas[from..n].iter_mut().zip(&self.seal_jobs[from..n]) {
            meta.len = job.sealed;
            if job.sealed == 0 {
                self.counters.count_drop(DropCause::Engine(EngineDrop::Encap));
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
    fn underlay_to_tun(&mut self, f: usize, batch: &mut Batch, now: Instant) -> io::Result<bool> {
        let Some(vxlan) = self.backend.vxlan(f).cloned() else {
            return self.wg_receive(f, batch, now);
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
        coalesce_views(&mut self.pod, self.mtu, counters, &mut pkts[..n]);
        Some(more)
    }

    /// WireGuard receive: find the peer, check macs, handshake or open with its session,
    /// enforce the peer's allowed IPs, follow its endpoint, write to the TUN.
    ///
    /// Every datagram is opened where it was received: in the `UDP_GRO`
    /// buffers, or in `batch` without them; the plaintext stays there and is
    /// coalesced (with TUN offloads) and written gathered from there, so the
    /// kernel's copies in and out are the only copies. Returns whether more
    /// may be waiting.
    fn wg_receive(&mut self, f: usize, batch: &mut Batch, now: Instant) -> io::Result<bool> {
        let Some(device) = self.backend.wireguard().cloned() else {
            let n = self.families[f].recv_batch(batch, &self.counters)?;
            return Ok(n == batch.capacity());
        };
        let snapshot = self.snapshot.clone();
        let tx = self.families[f].reply_tx();
        let mut views: [&mut [u8]; MAX_VIEWS] = std::array::from_fn(|_| &mut [][..]);
        let mut origins = [Origin::default(); MAX_VIEWS];
        let mut n = 0;
        let more = if self.families[f].capabilities().gro {
            let got = self.families[f].recv_in_place(MAX_VIEWS, &self.counters, |r, datagram| {
                let Some(from) = r.from else { return };
                let local = r.local.map(|l| canonical(SocketAddr::new(l, 0)));
                origins[n] = Origin { from: SocketAddr::new(canonical(from), from.port()), local };
                views[n] = datagram;
                n += 1;
            });
            got.unwrap_or(false)
        } else {
            let cap = batch.capacity();
            let got = self.families[f].recv_batch(batch, &self.counters)?;
            let (bufs, metas) = batch.parts_mut();
            for (buf, meta) in bufs.iter_mut().zip(metas.iter()) {
                let Some(ip) = meta.addr.filter(|_| meta.len > 0 && n < MAX_VIEWS) else { continue };
                origins[n] = Origin { from: SocketAddr::new(ip, meta.port), local: meta.local };
                views[n] = &mut buf[meta.start..meta.start + meta.len];
                n += 1;
            }
            got == cap
        };
        call_helper(&self.crew, views[..n].iter().map(|v| v.len()).sum());
        let mut rx = WgRx {
            device: &device,
            snapshot: &snapshot,
            counters: &self.counters,
            mtu: self.mtu,
            wg_out: &mut self.wg_out,
            tx,
            now,
            deadlines: self.deadlines.as_deref(),
            crew: crew_of(&self.crew),
        };
        let live = rx.open_all(&mut views[..n], &origins[..n]);
        let views = &mut views[..live];
        if self.pod.capabilities().gro {
            coalesce_views(&mut self.pod, self.mtu, &self.counters, views);
        } else {
            for packet in views.iter() {
                self.pod.write_one(packet, &self.counters);
            }
        }
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

/// Where a received datagram came from, and the address of ours it was sent to.
#[derive(Debug, Clone, Copy)]
struct Origin {
    from: SocketAddr,
    local: Option<IpAddr>,
}

impl Default for Origin {
    fn default() -> Self {
        Origin { from: SocketAddr::from(([0u8; 4], 0)), local: None }
    }
}

/// A data packet of a receive batch, between parsing and writing.
#[derive(Debug, Clone, Copy, Default)]
struct Opening {
    /// Our index of the session it names.
    receiver: u32,
    counter: u64,
    /// Which of the run's sessions opens it ([`NO_SESSION`]: none).
    session: u8,
    /// The plaintext's length once opened (padding included).
    len: usize,
    /// Why it failed, if it did.
    error: Option<WgError>,
}

/// Sessions one run can name: a peer holds current, previous and next.
const RUN_SESSIONS: usize = 3;
const NO_SESSION: u8 = u8::MAX;

/// What opening WireGuard datagrams needs of a worker, borrowed apart from
/// its sockets so that datagrams can be opened where they were received.
struct WgRx<'a, T> {
    device: &'a WgDevice,
    snapshot: &'a Snapshot,
    counters: &'a WorkerCounters,
    mtu: usize,
    wg_out: &'a mut [u8],
    /// The receiving socket: cookie replies and handshake answers leave by it.
    tx: T,
    /// The batch's one clock read.
    now: Instant,
    deadlines: Option<&'a Deadlines>,
    /// The workers to spread the opening over, and which one this is.
    crew: (Option<&'a Crew>, usize),
}

impl<'a, T: DatagramTx> WgRx<'a, T> {
    /// Takes a batch of received datagrams in order: handshake messages
    /// one by one, runs of one peer's data packets together (see
    /// [`WgRx::open_run`]). Leaves the packets to write to the TUN at the
    /// front of `views`, each sliced to its IP packet, and returns how many.
    fn open_all(&mut self, views: &mut [&mut [u8]], origins: &[Origin]) -> usize {
        let mut openings = [Opening::default(); MAX_VIEWS];
        let mut keep = [false; MAX_VIEWS];
        // The pending run: its first view and its peer.
        let mut run: Option<(usize, usize)> = None;
        for i in 0..views.len() {
            let data = match Message::parse(views[i]) {
                Ok(Message::Data(d)) => Some(d),
                Ok(_) => None,
                Err(e) => {
                    self.counters.count_drop(DropCause::Wg(e));
                    continue;
                }
            };
            let Some(d) = data else {
                // A handshake message may make the session the next data
                // packets need: what came before it is opened first.
                self.open_pending(run.take(), i, views, &mut openings, origins, &mut keep);
                self.handshake(origins[i], views[i]);
                continue;
            };
            let Some(pi) = self.snapshot.wg_peer_index(PeerRef::Index(d.receiver >> 8)) else {
                self.counters.count_drop(DropCause::Engine(EngineDrop::WgUnknownPeer));
                continue;
            };
            openings[i] =
                Opening { receiver: d.receiver, counter: d.counter, session: NO_SESSION, len: 0, error: None };
            if run.is_none_or(|(_, p)| p != pi) {
                self.open_pending(run.replace((i, pi)), i, views, &mut openings, origins, &mut keep);
            }
        }
        self.open_pending(run, views.len(), views, &mut openings, origins, &mut keep);
        let mut live = 0;
        for (i, _) in keep[..views.len()].iter().enumerate().filter(|(_, k)| **k) {
            views.swap(live, i);
            live += 1;
        }
        live
    }

    /// Opens the pending run (its first view and its peer) up to `end`.
    fn open_pending(
        &mut self,
        run: Option<(usize, usize)>,
        end: usize,
        views: &mut [&mut [u8]],
        openings: &mut [Opening],
        origins: &[Origin],
        keep: &mut [bool],
    ) {
        if let Some((start, pi)) = run {
            let r = start..end;
            self.open_run(pi, &mut views[r.clone()], &mut openings[r.clone()], &origins[r.clone()], &mut keep[r]);
        }
    }

    /// Opens a run of peer `pi`'s data packets: the peer's lock is taken to find the sessions,
    /// let go while the ChaCha20-Poly1305 runs (spread over the workers),
    /// and taken again to check each packet's replay window and session
    /// age in order, move the timers and follow the endpoint. Marks in
    /// `keep` the packets to write, each view sliced to its IP packet.
    fn open_run(
        &mut self,
        pi: usize,
        views: &mut [&mut [u8]],
        openings: &mut [Opening],
        origins: &[Origin],
        keep: &mut [bool],
    ) {
        let Some(wg) = self.snapshot.peers()[pi].wg.as_ref() else { return };
        let (counters, now) = (self.counters, self.now);
        let mut sessions: [Option<Arc<Keypair>>; RUN_SESSIONS] = Default::default();
        {
            let st = wg.lock();
            for o in openings.iter_mut() {
                let receiver = o.receiver;
                o.session = match sessions.iter().position(|s| s.as_ref().is_some_and(|k| k.local_index == receiver)) {
                    Some(s) => s as u8,
                    None => match (st.tunnel.keypair(receiver), sessions.iter().position(Option::is_none)) {
                        (Some(kp), Some(free)) => {
                            sessions[free] = Some(kp.clone());
                            free as u8
                        }
                        _ => NO_SESSION,
                    },
                };
            }
        }
        let sessions = &sessions;
        let bytes = views.iter().map(|v| v.len()).sum();
        let (crew, me) = self.crew;
        spread(crew, me, views, openings, bytes, true, counters, &|v, o| {
            let Some(kp) = sessions.get(o.session as usize).and_then(Option::as_ref) else {
                o.error = Some(WgError::UnknownIndex);
                return 0;
            };
            match kp.open_in_place(o.counter, &mut v[DATA_HEADER_LEN..]) {
                Ok(len) => {
                    o.len = len;
                    v.len() - DATA_HEADER_LEN
                }
                Err(e) => {
                    o.error = Some(e);
                    0
                }
            }
        });
        let mut st = wg.lock();
        let mut last = None;
        for (i, o) in openings.iter_mut().enumerate() {
            if o.error.is_none() {
                let kp = sessions[o.session as usize].as_ref().expect("opened with a session");
                match st.tunnel.accept(now, kp, o.counter, o.len) {
                    Ok(_) => last = Some(i),
                    Err(e) => o.error = Some(e),
                }
            }
            if let Some(e) = o.error {
                counters.count_drop(DropCause::Wg(e));
            }
        }
        if let Some(i) = last {
            // The endpoint follows the latest authenticated datagram,
            // whatever it carries (wireguard-go's order); a session these
            // packets confirmed lets staged packets go, to it.
            let Origin { from, local } = origins[i];
            st.roam(from, local);
            while let Some(n) = st.tunnel.poll_transmit(now, self.mtu, self.wg_out) {
                self.tx.send_to(&self.wg_out[..n], from, local, counters);
            }
        }
        if let Some(d) = self.deadlines {
            d.lower(st.tunnel.poll_timeout());
        }
        drop(st);
        let peer = &self.snapshot.peers()[pi];
        for ((v, o), k) in views.iter_mut().zip(openings.iter()).zip(keep.iter_mut()) {
            if o.error.is_some() || o.len == 0 {
                continue; // dropped, or a keepalive
            }
            let plain = &v[DATA_HEADER_LEN..DATA_HEADER_LEN + o.len];
            let (n, inner_src) = match inner_source(plain) {
                Ok(x) => x,
                Err(e) => {
                    counters.count_drop(DropCause::Wg(e));
                    continue;
                }
            };
            // Cryptokey routing: the source must route back to this very
            // peer (a longest match), not merely lie inside one of its
            // prefixes, which may overlap another peer's.
            if self.snapshot.route_index(inner_src).map(|(o, _)| o) != Some(pi) {
                counters.count_drop(DropCause::Engine(EngineDrop::WgAllowedIps));
                continue;
            }
            add(&peer.counters.rx_packets, 1);
            add(&peer.counters.rx_bytes, n as u64);
            let whole = std::mem::take(v);
            *v = &mut whole[DATA_HEADER_LEN..DATA_HEADER_LEN + n];
            *k = true;
        }
    }

    /// One handshake message or cookie reply from `origin`: macs (and a
    /// cookie reply under load), then the peer's protocol state, under its
    /// lock; answers go back where the message came from.
    fn handshake(&mut self, origin: Origin, datagram: &[u8]) {
        let (counters, now) = (self.counters, self.now);
        let Origin { from, local } = origin;
        let drop = |e: WgError| counters.count_drop(DropCause::Wg(e));
        let Ok(msg) = Message::parse(datagram) else { return };
        let identity = self.device.identity();
        let mut cookie = [0u8; COOKIE_REPLY_LEN];
        if let Err(e) = identity.check_macs(now, from, &msg, &mut cookie) {
            if e == WgError::Cookie {
                self.tx.send_to(&cookie, from, local, counters);
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
        let Some(wg) = self.snapshot.peers()[pi].wg.as_ref() else { return };
        let mut st = wg.lock();
        match msg {
            Message::Initiation(_) => {
                let Some(half) = half else { return };
                let mut resp = [0u8; RESPONSE_LEN];
                match st.tunnel.consume_initiation(now, &half, &mut resp) {
                    Ok(()) => {
                        st.roam(from, local);
                        self.tx.send_to(&resp, from, local, counters);
                    }
                    Err(e) => drop(e),
                }
            }
            Message::Response(m) => match st.tunnel.consume_response(now, m) {
                Ok(()) => {
                    st.roam(from, local);
                    // Packets staged while the handshake ran go out now.
                    while let Some(n) = st.tunnel.poll_transmit(now, self.mtu, self.wg_out) {
                        self.tx.send_to(&self.wg_out[..n], from, local, counters);
                    }
                }
                Err(e) => drop(e),
            },
            Message::CookieReply(m) => {
                if let Err(e) = st.tunnel.consume_cookie(now, m) {
                    drop(e);
                }
            }
            Message::Data(_) => {}
        }
        if let Some(d) = self.deadlines {
            d.lower(st.tunnel.poll_timeout());
        }
    }
}

/// The crew WireGuard's AEAD spreads over, and which worker this is.
fn crew_of(c: &Option<(Arc<Crew>, usize)>) -> (Option<&Crew>, usize) {
    c.as_ref().map_or((None, 0), |(c, i)| (Some(&**c), *i))
}

/// Wakes a helper as soon as a run of `bytes` is known to be worth
/// spreading: a woken worker takes tens of microseconds to run.
fn call_helper(c: &Option<(Arc<Crew>, usize)>, bytes: usize) {
    if let (Some(crew), me) = crew_of(c) {
        if crate::spread::worth_spreading(bytes) {
            crew.call_one(me);
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

/// Coalesces packets lying where they were received (at most
/// [`MAX_VIEWS`]) and writes them to the TUN (which has a virtio-net
/// header), merged payloads gathered where they lie.
fn coalesce_views<P: PodIo>(pod: &mut P, mtu: usize, counters: &WorkerCounters, pkts: &mut [&mut [u8]]) {
    let mut outs = [Out::default(); MAX_VIEWS];
    let outs = &mut outs[..pkts.len()];
    let stats = coalesce(pkts, outs, mtu, pod.capabilities().uso);
    count_coalesce(counters, stats);
    pod.write_coalesced(pkts, outs, counters);
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

/// Whether `dst` is for the device's own link only: multicast or
/// link-local, of either family.
pub fn link_scoped(dst: IpAddr) -> bool {
    match dst {
        IpAddr::V4(a) => a.is_multicast() || a.is_link_local() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_multicast() || a.is_unicast_link_local(),
    }
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
