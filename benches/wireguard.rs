//! Per-packet cost of the WireGuard data path, weft's core beside
//! boringtun's in one run: sealing an inner packet for a peer (counters
//! taken under the peer's lock, ChaCha20-Poly1305 without it) and opening
//! one (session by receiver index, decryption, replay window), over inner
//! IPv4 packets of 64, 512 and 1400 bytes, per packet and per byte. Run
//! with `cargo bench --bench wireguard` (add `-- --quick`).

use std::hint::black_box;
use std::time::Instant;

use boringtun::noise::{Tunn, TunnResult};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use weft_engine::wg::{WgDevice, WgPeer};
use weft_tunnel::wireguard::{Message, RESPONSE_LEN};

const SIZES: [usize; 3] = [64, 512, 1400];
const MTU: usize = 1420;

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

/// Two weft peers with a completed handshake: (A's view of B, B's view of A).
fn pair() -> (WgPeer, WgPeer) {
    let (a, b) = (WgDevice::new([1; 32]), WgDevice::new([2; 32]));
    let a_peer = WgPeer::new(&a, b.public_key(), None, None, 1, None);
    let b_peer = WgPeer::new(&b, a.public_key(), None, None, 2, None);
    let now = Instant::now();
    let mut out = vec![0u8; 2048];
    let mut sa = a_peer.lock();
    sa.tunnel.stage(now, &inner(64));
    let n = sa.tunnel.poll_transmit(now, MTU, &mut out).expect("an initiation");
    let Ok(Message::Initiation(init)) = Message::parse(&out[..n]) else { unreachable!("an initiation") };
    let half = b.identity().open_initiation(init).expect("the initiation opens");
    let mut resp = [0u8; RESPONSE_LEN];
    b_peer.lock().tunnel.consume_initiation(now, &half, &mut resp).expect("it is answered");
    sa.tunnel.consume_response(now, &resp).expect("the response is taken");
    let n = sa.tunnel.poll_transmit(now, MTU, &mut out).expect("the staged packet");
    let Ok(Message::Data(d)) = Message::parse(&out[..n]) else { unreachable!("data") };
    b_peer.lock().tunnel.decapsulate(now, &d, &mut vec![0u8; 2048]).expect("it confirms B's session");
    drop(sa);
    (a_peer, b_peer)
}

fn boringtun_pair() -> (Tunn, Tunn) {
    use boringtun::x25519::{PublicKey, StaticSecret};
    let (ka, kb) = (StaticSecret::from([1; 32]), StaticSecret::from([2; 32]));
    let (pa, pb) = (PublicKey::from(&ka), PublicKey::from(&kb));
    let mut a = Tunn::new(ka, pb, None, None, 1, None);
    let mut b = Tunn::new(kb, pa, None, None, 2, None);
    let mut out = vec![0u8; 2048];
    let TunnResult::WriteToNetwork(init) = a.encapsulate(&inner(64), &mut out) else { unreachable!() };
    let init = init.to_vec();
    let TunnResult::WriteToNetwork(resp) = b.decapsulate(None, &init, &mut out) else { unreachable!() };
    let resp = resp.to_vec();
    let _ = a.decapsulate(None, &resp, &mut out);
    while let TunnResult::WriteToNetwork(d) = a.decapsulate(None, &[], &mut out) {
        let d = d.to_vec();
        let _ = b.decapsulate(None, &d, &mut vec![0u8; 2048]);
    }
    (a, b)
}

fn seal(c: &mut Criterion) {
    let (a_peer, _) = pair();
    let (mut bt, _) = boringtun_pair();
    let mut out = vec![0u8; 2048];
    for per_byte in [false, true] {
        let mut g = c.benchmark_group(if per_byte { "wg_seal_bytes" } else { "wg_seal" });
        for size in SIZES {
            let packet = inner(size);
            g.throughput(if per_byte { Throughput::Bytes(size as u64) } else { Throughput::Elements(1) });
            g.bench_with_input(BenchmarkId::new("weft", size), &packet, |bench, packet| {
                bench.iter(|| {
                    let grant = a_peer.lock().tunnel.send_grant(Instant::now(), 1, packet.len() as u64);
                    let g = grant.expect("the session is up");
                    g.keypair.seal(g.first, black_box(packet), MTU, &mut out)
                })
            });
            g.bench_with_input(BenchmarkId::new("boringtun", size), &packet, |bench, packet| {
                bench.iter(|| match bt.encapsulate(black_box(packet), &mut out) {
                    TunnResult::WriteToNetwork(p) => p.len(),
                    _ => 0,
                })
            });
        }
        g.finish();
    }
}

fn open(c: &mut Criterion) {
    let (a_peer, b_peer) = pair();
    let (mut bta, mut btb) = boringtun_pair();
    let mut out = vec![0u8; 2048];
    for per_byte in [false, true] {
        let mut g = c.benchmark_group(if per_byte { "wg_open_bytes" } else { "wg_open" });
        for size in SIZES {
            let packet = inner(size);
            g.throughput(if per_byte { Throughput::Bytes(size as u64) } else { Throughput::Elements(1) });
            g.bench_function(BenchmarkId::new("weft", size), |bench| {
                // Each datagram is fresh: WireGuard refuses replays.
                bench.iter_batched(
                    || {
                        let mut d = vec![0u8; 2048];
                        let n = a_peer.lock().tunnel.encapsulate(Instant::now(), &packet, MTU, &mut d);
                        d.truncate(n.expect("the session is up"));
                        d
                    },
                    |datagram| {
                        let Ok(Message::Data(d)) = Message::parse(&datagram) else { return 0 };
                        b_peer.lock().tunnel.decapsulate(Instant::now(), &d, &mut out).unwrap_or(0)
                    },
                    criterion::BatchSize::SmallInput,
                )
            });
            g.bench_function(BenchmarkId::new("boringtun", size), |bench| {
                bench.iter_batched(
                    || match bta.encapsulate(&packet, &mut vec![0u8; 2048]) {
                        TunnResult::WriteToNetwork(p) => p.to_vec(),
                        _ => unreachable!("the session is up"),
                    },
                    |datagram| match btb.decapsulate(None, &datagram, &mut out) {
                        TunnResult::WriteToTunnelV4(p, _) => p.len(),
                        _ => 0,
                    },
                    criterion::BatchSize::SmallInput,
                )
            });
        }
        g.finish();
    }
}

criterion_group!(benches, seal, open);
criterion_main!(benches);
