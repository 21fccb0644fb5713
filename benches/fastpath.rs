//! Per-packet cost of the fast path's pieces: cutting a TUN super-packet
//! (`segment::Plan`), coalescing received segments (`coalesce`), and the
//! whole in-memory worker pipeline for one 64 KiB super-packet (the route
//! lookup has its own bench, `benches/route.rs`):
//!
//! ```text
//!  super-packet -> Plan::write (47 segments) -> VXLAN encapsulate -> "wire"
//!  "wire" -> VXLAN decapsulate -> coalesce -> one GSO packet
//! ```
//!
//! The pipeline bench has no syscalls in it: it is the userspace share of
//! the cost, reported per packet (segment) and in bytes per second of inner
//! traffic. Run with `cargo bench --bench fastpath` (`-- --quick` for short).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use weft_engine::coalesce::{coalesce, Out};
use weft_engine::io::{Batch, Meta};
use weft_engine::segment::Plan;
use weft_testkit::AnyPeer;
use weft_tunnel::checksum;
use weft_tunnel::vxlan::{Vtep, Vxlan, HEADROOM};

const LOCAL: Vtep = Vtep { addr: IpAddr::V4(Ipv4Addr::new(192, 168, 77, 1)), mac: [0x0a, 0x58, 0x0a, 0xf4, 1, 0] };
const REMOTE: Vtep = Vtep { addr: IpAddr::V4(Ipv4Addr::new(192, 168, 77, 2)), mac: [0x0a, 0x58, 0x0a, 0xf4, 2, 0] };
const MSS: usize = 1398;

/// A TCP/IPv4 packet with `payload` bytes and a complete checksum.
fn tcp(payload: usize) -> Vec<u8> {
    weft_testkit::tcp_ipv4([10, 244, 1, 2], [10, 244, 2, 2], payload, 0)
}

fn segmentation(c: &mut Criterion) {
    let mut g = c.benchmark_group("segment");
    let packet = tcp(65000);
    let plan = Plan::new(&packet, MSS).unwrap();
    let mut out = vec![0u8; 2048];
    g.throughput(Throughput::Elements(plan.count() as u64));
    g.bench_function("64KiB_super_packet_segments", |b| {
        b.iter(|| {
            for i in 0..plan.count() {
                black_box(plan.write(&packet, i, &mut out).unwrap());
            }
        })
    });
    g.throughput(Throughput::Bytes(65000));
    g.bench_function("64KiB_super_packet_bytes", |b| {
        b.iter(|| {
            for i in 0..plan.count() {
                black_box(plan.write(&packet, i, &mut out).unwrap());
            }
        })
    });
    g.finish();
}

fn coalescing(c: &mut Criterion) {
    let mut g = c.benchmark_group("coalesce");
    let packet = tcp(65000);
    let plan = Plan::new(&packet, MSS).unwrap();
    let mut segs = Batch::new(plan.count());
    for i in 0..plan.count() {
        let (buf, meta) = segs.slot_mut(i);
        let len = plan.write(&packet, i, &mut buf[22..]).unwrap();
        *meta = Meta { start: 22, len, ..Meta::default() };
    }
    segs.set_len(plan.count());
    let mut work = Batch::new(plan.count());
    g.throughput(Throughput::Elements(plan.count() as u64));
    for i in 0..plan.count() {
        let (src, m) = segs.slot_mut(i);
        let (start, len) = (m.start, m.len);
        let (dst, dm) = work.slot_mut(i);
        dst[start..start + len].copy_from_slice(&src[start..start + len]);
        *dm = Meta { start, len, ..Meta::default() };
    }
    work.set_len(plan.count());
    let mut outs = [Out::default(); 64];
    g.bench_function("47_segments_to_one", |b| {
        b.iter(|| {
            // Restore the first segment, whose headers coalescing rewrote
            // (the others are only linked, never written).
            let (src, m) = segs.slot_mut(0);
            let (start, len) = (m.start, m.len);
            work.slot_mut(0).0[start..start + len].copy_from_slice(&src[start..start + len]);
            let mut pkts: [&mut [u8]; 64] = std::array::from_fn(|_| &mut [][..]);
            let n = work.live_mut(&mut pkts);
            black_box(coalesce(&mut pkts[..n], &mut outs[..n], 1450, true));
        })
    });
    g.finish();
}

fn checksums(c: &mut Criterion) {
    let mut g = c.benchmark_group("checksum");
    for size in [64usize, 1400, 65000] {
        let data = vec![0xa5u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("sum", size), &data, |b, d| b.iter(|| black_box(checksum::sum(0, d))));
        let mut out = vec![0u8; size];
        g.bench_with_input(BenchmarkId::new("copy_and_sum", size), &data, |b, d| {
            b.iter(|| black_box(checksum::copy_and_sum(0, black_box(&mut out), d)))
        });
    }
    g.finish();
}

fn pipeline(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipeline");
    let tx = Vxlan::new(1, 8472, LOCAL);
    let rx = Vxlan::new(1, 8472, REMOTE);
    let packet = tcp(65000);
    let plan = Plan::new(&packet, MSS).unwrap();
    let mut wire = Batch::new(plan.count());
    g.throughput(Throughput::Elements(plan.count() as u64));
    let run = |wire: &mut Batch| {
        for i in 0..plan.count() {
            let (buf, meta) = wire.slot_mut(i);
            let len = plan.write(&packet, i, &mut buf[HEADROOM..]).unwrap();
            // The UDP socket writes the outer checksum (GSO pool path).
            let dlen = tx.encapsulate_with(&REMOTE, buf, len, false).unwrap();
            // The receiver sees the datagram after the UDP header.
            *meta = Meta { start: 8, len: dlen - 8, ..Meta::default() };
        }
        wire.set_len(plan.count());
        let (bufs, metas) = wire.parts_mut();
        for i in 0..plan.count() {
            let d = rx.decapsulate(LOCAL.addr, &bufs[i][8..8 + metas[i].len], &AnyPeer).unwrap();
            metas[i] = Meta { start: 8 + d.inner.start, len: d.inner.len(), ..Meta::default() };
        }
        let mut pkts: [&mut [u8]; 64] = std::array::from_fn(|_| &mut [][..]);
        let n = wire.live_mut(&mut pkts);
        let mut outs = [Out::default(); 64];
        black_box(coalesce(&mut pkts[..n], &mut outs[..n], 1450, true));
    };
    g.bench_function("vxlan_64KiB_per_segment", |b| b.iter(|| run(&mut wire)));
    g.throughput(Throughput::Bytes(65000));
    g.bench_function("vxlan_64KiB_bytes", |b| b.iter(|| run(&mut wire)));
    g.finish();
}

criterion_group!(benches, segmentation, coalescing, checksums, pipeline);
criterion_main!(benches);
