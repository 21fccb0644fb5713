//! Arbitrary bytes as what a SOCKS5 client sends, fed to
//! `weft_netstack::socks::Handshake` in pieces as a connection reads them,
//! and as a UDP ASSOCIATE datagram.
//!
//! Layout: byte 0 picks the server's authentication (bit 0: user `u`,
//! password `p`) and, in its upper bits, the seed of the piece sizes; the
//! rest is the stream. Invariants: nothing panics; a step consumes no more
//! than it was given, `Need` consumes nothing, and the buffer the caller
//! keeps never grows past a handshake's largest message; feeding the stream
//! in pieces gives the steps feeding it byte by byte gives; after a request
//! or a refusal the handshake is done; a domain target is 1 to 255 bytes; a
//! success reply to a request echoes back as a well-formed reply. A
//! datagram `parse_udp` accepts with an address target, re-headed with
//! `udp_header`, parses to the same target and payload.

use weft_netstack::socks::{self, Auth, Handshake, Step, Target};

/// The largest message of a handshake: a user/password subnegotiation
/// (1 + 1 + 255 + 1 + 255) or a request with a 255-byte name (4 + 1 + 255 + 2).
const LARGEST: usize = 513;

/// Feeds `stream` in pieces of the sizes `sizes` yields; the steps.
fn steps(auth: &Auth, stream: &[u8], mut sizes: impl FnMut() -> usize) -> Vec<Step> {
    let mut h = Handshake::new(auth.clone());
    let (mut buf, mut at, mut out) = (Vec::new(), 0, Vec::new());
    while at < stream.len() {
        let n = sizes().clamp(1, stream.len() - at);
        buf.extend_from_slice(&stream[at..at + n]);
        at += n;
        loop {
            let (used, step) = h.feed(&buf);
            assert!(used <= buf.len(), "consumed {used} of {}", buf.len());
            if step == Step::Need {
                assert_eq!(used, 0, "Need consumes nothing");
                assert!(buf.len() <= LARGEST + 8, "a pending message of {} bytes", buf.len());
                break;
            }
            buf.drain(..used);
            let done = matches!(step, Step::Request(_) | Step::Fail(..));
            out.push(step);
            if done {
                // Done: whatever comes next is refused.
                assert!(matches!(h.feed(&buf).1, Step::Fail(_, "request after done")));
                return out;
            }
        }
    }
    out
}

/// Runs one input through the invariants above; panics on a broken one.
pub fn run(data: &[u8]) {
    let Some((&sel, stream)) = data.split_first() else { return };
    let auth = if sel & 1 == 1 { Auth::UserPass { user: "u".into(), pass: "p".into() } } else { Auth::None };
    let mut seed = u32::from(sel >> 1) | 1;
    let pieces = steps(&auth, stream, || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        (seed % 64) as usize + 1
    });
    let singles = steps(&auth, stream, || 1);
    assert_eq!(pieces, singles, "pieces and single bytes give the same steps");
    for step in &pieces {
        if let Step::Request(r) = step {
            if let Target::Domain(name, _) = &r.target {
                assert!((1..=255).contains(&name.len()), "domain of {} bytes", name.len());
            }
            if let Target::Addr(a) = r.target {
                let rep = socks::reply(socks::reply::SUCCEEDED, a);
                assert_eq!(rep.len(), if a.is_ipv4() { 10 } else { 22 });
                assert_eq!(rep[..3], [5, 0, 0]);
            }
        }
    }
    if let Ok((target, payload)) = socks::parse_udp(stream) {
        assert!(payload.len() < stream.len());
        if let Target::Addr(a) = target {
            let mut again = Vec::new();
            socks::udp_header(a, &mut again);
            again.extend_from_slice(payload);
            assert_eq!(socks::parse_udp(&again), Ok((Target::Addr(a), payload)));
        }
    }
}
