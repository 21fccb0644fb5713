//! Whatever arrives on the WireGuard port: a handshake initiation, its
//! response or a data packet between two real devices, changed by the
//! fuzzer's bytes, goes through the receive path (classify, then the peer's
//! decapsulation). Invariants: nothing panics, and a datagram that was
//! changed in any way never decrypts to a packet for the TUN: only
//! authenticated traffic reaches a pod.

#![no_main]

use std::net::IpAddr;
use std::sync::Arc;

use boringtun::noise::TunnResult;
use libfuzzer_sys::fuzz_target;
use weft_engine::wg::{decrypted, Decrypted, WgDevice, WgIndex, WgPeer};

const INNER: [u8; 28] = [
    0x45, 0, 0, 28, 0, 1, 0, 0, 64, 17, 0, 0, 10, 244, 1, 2, 10, 244, 2, 2, 0x9c, 0x40, 0x1b, 0x39, 0, 8, 0, 0,
];

fn network(r: TunnResult<'_>) -> Vec<u8> {
    match r {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("the unchanged exchange must produce a datagram"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, edits)) = data.split_first() else { return };
    let (a, b) = (WgDevice::new([1; 32]), WgDevice::new([2; 32]));
    let a_peer = WgPeer::new(&a, b.public_key(), None, None, 1, None);
    let b_peer = Arc::new(WgPeer::new(&b, a.public_key(), None, None, 2, None));
    let index = WgIndex::new([Some(&b_peer)].into_iter());
    let src: IpAddr = "192.168.77.1".parse().unwrap();
    let mut out = vec![0u8; 4096];

    // The real exchange: initiation, response, then one data packet.
    let init = network(a_peer.lock().tunn.encapsulate(&INNER, &mut out));
    let target = match which % 3 {
        0 => init,
        _ => {
            let resp = network(b_peer.lock().tunn.decapsulate(Some(src), &init, &mut out));
            let mut g = a_peer.lock();
            let _ = g.tunn.decapsulate(Some("192.168.77.2".parse().unwrap()), &resp, &mut out);
            let data_packet = network(g.tunn.decapsulate(None, &[], &mut out));
            drop(g);
            if which % 3 == 1 {
                resp
            } else {
                data_packet
            }
        }
    };
    // The fuzzer's bytes: XOR the first part, then append or cut.
    let mut changed = target.clone();
    let (xor, tail) = edits.split_at(edits.len().min(changed.len()));
    for (c, x) in changed.iter_mut().zip(xor) {
        *c ^= x;
    }
    match tail.first() {
        Some(&cut) if cut & 1 == 1 => changed.truncate(changed.len().saturating_sub(cut as usize >> 1)),
        Some(_) => changed.extend_from_slice(&tail[1..]),
        None => {}
    }
    let mut cookie = [0u8; 64];
    let Ok(r) = b.classify(src, &changed, &mut cookie) else { return };
    let Some(0) = index.find(r) else { return };
    let mut g = b_peer.lock();
    if let Decrypted::Packet(p, inner_src) = decrypted(g.tunn.decapsulate(Some(src), &changed, &mut out)) {
        assert_eq!(changed, target, "a changed datagram decrypted to a packet");
        assert_eq!(p, &INNER[..]);
        assert_eq!(inner_src, IpAddr::from([10, 244, 1, 2]));
    }
});
