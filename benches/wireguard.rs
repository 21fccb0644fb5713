//! Per-packet cost of the WireGuard data path: encrypting an inner packet for
//! a peer (boringtun's ChaCha20-Poly1305 behind the peer's lock) and
//! receiving one (peer lookup by receiver index, then decryption), over
//! inner IPv4 packets of 64, 512 and 1400 bytes, reported per packet and per
//! byte. Run with `cargo bench --bench wireguard` (add `-- --quick`).

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;

use boringtun::noise::TunnResult;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use weft_engine::wg::{decrypted, Decrypted, WgDevice, WgIndex, WgPeer};

const SIZES: [usize; 3] = [64, 512, 1400];

/// An IPv4 packet of `len` bytes from 10.244.1.2 to 10.244.2.2.
fn inner(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 244, 1, 2]);
    p[16..20].copy_from_slice(&[10, 244, 2, 2]);
    p
}

/// Two peers with a completed handshake: (sender's view of B, B's view of A, B).
fn pair() -> (WgPeer, Arc<WgPeer>, WgDevice) {
    let (a, b) = (WgDevice::new([1; 32]), WgDevice::new([2; 32]));
    let a_peer = WgPeer::new(&a, b.public_key(), None, None, 1, None);
    let b_peer = Arc::new(WgPeer::new(&b, a.public_key(), None, None, 2, None));
    let src: IpAddr = "192.168.77.1".parse().expect("a valid address");
    let mut out = vec![0u8; 2048];
    let init = match a_peer.lock().tunn.encapsulate(&inner(64), &mut out) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => unreachable!("a first packet starts a handshake"),
    };
    let resp = match b_peer.lock().tunn.decapsulate(Some(src), &init, &mut out) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => unreachable!("an initiation is answered"),
    };
    let mut g = a_peer.lock();
    let _ = g.tunn.decapsulate(None, &resp, &mut out);
    while let TunnResult::WriteToNetwork(_) = g.tunn.decapsulate(None, &[], &mut out) {}
    drop(g);
    (a_peer, b_peer, b)
}

fn encapsulate(c: &mut Criterion) {
    let (a_peer, _, _) = pair();
    let mut out = vec![0u8; 2048];
    for per_byte in [false, true] {
        let mut g = c.benchmark_group(if per_byte { "wg_encapsulate_bytes" } else { "wg_encapsulate" });
        for size in SIZES {
            let packet = inner(size);
            g.throughput(if per_byte { Throughput::Bytes(size as u64) } else { Throughput::Elements(1) });
            g.bench_with_input(BenchmarkId::from_parameter(size), &packet, |bench, packet| {
                bench.iter(|| match a_peer.lock().tunn.encapsulate(black_box(packet), &mut out) {
                    TunnResult::WriteToNetwork(p) => p.len(),
                    _ => 0,
                })
            });
        }
        g.finish();
    }
}

fn decapsulate(c: &mut Criterion) {
    let (a_peer, b_peer, b) = pair();
    let index = WgIndex::new([Some(&b_peer)].into_iter());
    let src: IpAddr = "192.168.77.1".parse().expect("a valid address");
    let mut out = vec![0u8; 2048];
    for per_byte in [false, true] {
        let mut g = c.benchmark_group(if per_byte { "wg_decapsulate_bytes" } else { "wg_decapsulate" });
        for size in SIZES {
            let packet = inner(size);
            g.throughput(if per_byte { Throughput::Bytes(size as u64) } else { Throughput::Elements(1) });
            g.bench_function(BenchmarkId::from_parameter(size), |bench| {
                // Each datagram is fresh: WireGuard refuses replays.
                bench.iter_batched(
                    || match a_peer.lock().tunn.encapsulate(&packet, &mut vec![0u8; 2048]) {
                        TunnResult::WriteToNetwork(p) => p.to_vec(),
                        _ => unreachable!("the session is up"),
                    },
                    |datagram| {
                        let mut cookie = [0u8; 64];
                        let peer = b.classify(src, &datagram, &mut cookie).ok().and_then(|r| index.find(r));
                        let _ = black_box(peer);
                        match decrypted(b_peer.lock().tunn.decapsulate(Some(src), &datagram, &mut out)) {
                            Decrypted::Packet(p, _) => p.len(),
                            _ => 0,
                        }
                    },
                    criterion::BatchSize::SmallInput,
                )
            });
        }
        g.finish();
    }
}

criterion_group!(benches, encapsulate, decapsulate);
criterion_main!(benches);
