//! Whatever arrives on the WireGuard port: a handshake initiation, its
//! response or a data packet between two real peers, changed by the
//! fuzzer's bytes, goes through the receive path of weft's WireGuard core
//! (parse, macs, the peer's handshake or session). Invariants: nothing
//! panics, and a datagram that was changed in any way never opens to a
//! packet for the TUN: only authenticated traffic reaches a pod. A changed
//! initiation is never answered, unless only its mac2 changed: mac2 is
//! looked at only under load, and one message a run never puts B under load.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_tunnel::wireguard::{inner_source, public_key, Identity, Message, Tunnel, COOKIE_REPLY_LEN, RESPONSE_LEN};

const INNER: [u8; 28] =
    [0x45, 0, 0, 28, 0, 1, 0, 0, 64, 17, 0, 0, 10, 244, 1, 2, 10, 244, 2, 2, 0x9c, 0x40, 0x1b, 0x39, 0, 8, 0, 0];
const MTU: usize = 1420;
/// Where mac2 starts in an initiation: everything before it is covered by
/// mac1 or the handshake's AEADs.
const INITIATION_MAC2: usize = 132;

/// Runs one input through the invariants above; panics on a broken one.
pub fn run(data: &[u8]) {
    let Some((&which, edits)) = data.split_first() else { return };
    let now = Instant::now();
    let wall = (now, Duration::from_secs(1_700_000_000));
    let (a, b) = (Arc::new(Identity::new([1; 32], wall)), Arc::new(Identity::new([2; 32], wall)));
    let mut ta = Tunnel::new(a.clone(), public_key(&[2; 32]), None, None, 1);
    let mut tb = Tunnel::new(b.clone(), public_key(&[1; 32]), None, None, 2);
    let from = SocketAddr::from(([192, 168, 77, 1], 51820));
    let mut out = vec![0u8; 4096];

    // The real exchange: initiation, response, then one data packet.
    ta.stage(now, &INNER);
    let n = ta.poll_transmit(now, MTU, &mut out).expect("an initiation");
    let init = out[..n].to_vec();
    let target = match which % 3 {
        0 => init,
        _ => {
            // B answers a copy of itself, so that the target stays fresh for `tb`.
            let mut tb2 = Tunnel::new(b.clone(), public_key(&[1; 32]), None, None, 2);
            let Ok(Message::Initiation(m)) = Message::parse(&init) else { panic!("an initiation") };
            let half = b.open_initiation(m).expect("it opens");
            let mut resp = [0u8; RESPONSE_LEN];
            tb2.consume_initiation(now, &half, &mut resp).expect("it is answered");
            if which % 3 == 1 {
                resp.to_vec()
            } else {
                ta.consume_response(now, &resp).expect("the response is taken");
                let n = ta.poll_transmit(now, MTU, &mut out).expect("the staged packet");
                tb = tb2;
                out[..n].to_vec()
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
    let Ok(msg) = Message::parse(&changed) else { return };
    let mut cookie = [0u8; COOKIE_REPLY_LEN];
    if b.check_macs(now, from, &msg, &mut cookie).is_err() {
        return;
    }
    match msg {
        Message::Initiation(m) => {
            if let Ok(half) = b.open_initiation(m) {
                let mut resp = [0u8; RESPONSE_LEN];
                if tb.consume_initiation(now, &half, &mut resp).is_ok() {
                    assert_eq!(
                        changed[..INITIATION_MAC2],
                        target[..INITIATION_MAC2],
                        "a changed initiation was answered"
                    );
                }
            }
        }
        Message::Response(m) => {
            let _ = tb.consume_response(now, m);
        }
        Message::CookieReply(m) => {
            let _ = tb.consume_cookie(now, m);
        }
        Message::Data(d) => {
            if let Ok(len) = tb.decapsulate(now, &d, &mut out) {
                assert_eq!(changed, target, "a changed datagram opened");
                let (n, src) = inner_source(&out[..len]).expect("the packet sent");
                assert_eq!(&out[..n], &INNER[..]);
                assert_eq!(src, std::net::IpAddr::from([10, 244, 1, 2]));
            }
        }
    }
}
