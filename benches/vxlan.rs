//! Per-packet cost of the VXLAN data path's pure parts: encapsulation,
//! decapsulation (with the peer and spoofing checks), software segmentation
//! of a TCP super-packet and the Internet checksum.
//!
//! Every benchmark is reported twice, once with `Throughput::Elements`
//! (packets: the time shown is the cost of one packet) and once with
//! `Throughput::Bytes` (inner bytes), over inner IPv4 packets of 64, 512,
//! 1400 and 8950 bytes. Run with `cargo bench --bench vxlan` (add
//! `-- --quick` for a short run).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use weft_engine::segment::segment_tcp;
use weft_tunnel::checksum;
use weft_tunnel::vxlan::{Peers, Vtep, Vxlan, DEFAULT_PORT, DEFAULT_VNI, HEADROOM, UDP_HEADER_LEN};

/// Inner IPv4 packet sizes: minimum, small, a 1450-MTU pod's full packet,
/// a jumbo-frame pod's full packet.
const SIZES: [usize; 4] = [64, 512, 1400, 8950];

const LOCAL: Vtep = Vtep { addr: IpAddr::V4(Ipv4Addr::new(192, 168, 77, 1)), mac: [0x0a, 0x58, 0x0a, 0xf4, 1, 0] };
const REMOTE: Vtep = Vtep { addr: IpAddr::V4(Ipv4Addr::new(192, 168, 77, 2)), mac: [0x0a, 0x58, 0x0a, 0xf4, 2, 0] };

/// The one remote node, owning 10.244.2.0/24.
struct OnePeer;

impl Peers for OnePeer {
    fn peer_by_underlay(&self, addr: IpAddr) -> Option<usize> {
        (addr == REMOTE.addr).then_some(0)
    }

    fn peer_owns(&self, _: usize, inner: IpAddr) -> bool {
        matches!(inner, IpAddr::V4(a) if a.octets()[..3] == [10, 244, 2])
    }
}

/// A TCP/IPv4 packet of `total` bytes from pod 10.244.2.2 to 10.244.1.2,
/// checksums complete.
fn tcp_packet(total: usize) -> Vec<u8> {
    assert!((40..=u16::MAX as usize).contains(&total));
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&[10, 244, 2, 2]);
    p[16..20].copy_from_slice(&[10, 244, 1, 2]);
    let c = !checksum::fold(checksum::sum(0, &p[..20]));
    p[10..12].copy_from_slice(&c.to_be_bytes());
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&5201u16.to_be_bytes());
    t[4..8].copy_from_slice(&0x0102_0304u32.to_be_bytes());
    t[12] = 0x50;
    t[13] = 0x18; // PSH ACK
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    for (i, b) in t[20..].iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    let pseudo = checksum::pseudo_header([10, 244, 2, 2].into(), [10, 244, 1, 2].into(), 6, t.len() as u32).unwrap();
    let c = !checksum::fold(checksum::sum(pseudo, t));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    p
}

/// Reports `f` under `name/size` once per packet and once per byte.
fn per_packet_and_byte(c: &mut Criterion, group: &str, size: usize, mut f: impl FnMut()) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(1));
    g.bench_function(BenchmarkId::new("packets", size), |b| b.iter(&mut f));
    g.throughput(Throughput::Bytes(size as u64));
    g.bench_function(BenchmarkId::new("bytes", size), |b| b.iter(&mut f));
    g.finish();
}

fn encapsulate(c: &mut Criterion) {
    let tx = Vxlan::new(DEFAULT_VNI, DEFAULT_PORT, REMOTE);
    for size in SIZES {
        let mut buf = vec![0u8; HEADROOM + size];
        buf[HEADROOM..].copy_from_slice(&tcp_packet(size));
        per_packet_and_byte(c, "vxlan/encapsulate", size, || {
            let len = tx.encapsulate(&LOCAL, black_box(&mut buf), size).unwrap();
            black_box(len);
        });
    }
}

fn decapsulate(c: &mut Criterion) {
    let tx = Vxlan::new(DEFAULT_VNI, DEFAULT_PORT, REMOTE);
    let rx = Vxlan::new(DEFAULT_VNI, DEFAULT_PORT, LOCAL);
    for size in SIZES {
        let mut buf = vec![0u8; HEADROOM + size];
        buf[HEADROOM..].copy_from_slice(&tcp_packet(size));
        let len = tx.encapsulate(&LOCAL, &mut buf, size).unwrap();
        let payload = &buf[UDP_HEADER_LEN..len];
        assert_eq!(rx.decapsulate(REMOTE.addr, payload, &OnePeer).unwrap().inner.len(), size);
        per_packet_and_byte(c, "vxlan/decapsulate", size, || {
            let d = rx.decapsulate(black_box(REMOTE.addr), black_box(payload), &OnePeer).unwrap();
            black_box(d);
        });
    }
}

/// A 64 KiB TCP super-packet (a sender's TSO frame) cut for a 1450-byte pod
/// MTU: 47 segments, each with its own IP and TCP checksums.
fn segment(c: &mut Criterion) {
    const MTU: usize = 1450;
    let packet = tcp_packet(u16::MAX as usize);
    let mut scratch = vec![0u8; MTU];
    let segments = segment_tcp(&packet, MTU, &mut scratch, |_| {}).unwrap();
    let mut g = c.benchmark_group("segment_tcp/64KiB_mtu1450");
    g.throughput(Throughput::Elements(segments as u64));
    g.bench_function("segments", |b| {
        b.iter(|| {
            segment_tcp(black_box(&packet), MTU, &mut scratch, |s| {
                black_box(s);
            })
        })
    });
    g.throughput(Throughput::Bytes(packet.len() as u64));
    g.bench_function("bytes", |b| {
        b.iter(|| {
            segment_tcp(black_box(&packet), MTU, &mut scratch, |s| {
                black_box(s);
            })
        })
    });
    g.finish();
}

fn checksum_sum(c: &mut Criterion) {
    let data = tcp_packet(1400);
    per_packet_and_byte(c, "checksum/sum", data.len(), || {
        black_box(checksum::sum(0, black_box(&data)));
    });
}

criterion_group!(benches, encapsulate, decapsulate, segment, checksum_sum);
criterion_main!(benches);
