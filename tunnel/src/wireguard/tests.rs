//! Two peers in memory and in virtual time: handshakes, data, every timer,
//! cookies, and interop with boringtun's implementation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

const MTU: usize = 1420;

/// One side: an identity with one peer, and the device-level dispatch a
/// worker does (macs, then the peer).
struct Node {
    identity: Arc<Identity>,
    tunnel: Tunnel,
    addr: SocketAddr,
    /// Inner packets delivered.
    got: Vec<Vec<u8>>,
    /// Refusals seen.
    refused: Vec<WgError>,
}

impl Node {
    fn new(private: u8, peer_public: [u8; 32], index: u32, t0: Instant) -> Node {
        let identity = Arc::new(Identity::new([private; 32], (t0, Duration::from_secs(1_700_000_000))));
        Node::with_identity(identity, peer_public, index, private)
    }

    fn with_identity(identity: Arc<Identity>, peer_public: [u8; 32], index: u32, tag: u8) -> Node {
        let tunnel = Tunnel::new(identity.clone(), peer_public, None, None, index);
        Node { identity, tunnel, addr: SocketAddr::from(([192, 0, 2, tag], 51820)), got: vec![], refused: vec![] }
    }

    /// A pod packet to the peer: the datagrams to put on the wire.
    fn send(&mut self, now: Instant, packet: &[u8]) -> Vec<Vec<u8>> {
        let mut out = vec![0u8; 2048];
        let mut wire = Vec::new();
        if let Some(n) = self.tunnel.encapsulate(now, packet, MTU, &mut out) {
            wire.push(out[..n].to_vec());
        }
        wire.extend(self.drain(now));
        wire
    }

    fn drain(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let mut out = vec![0u8; 2048];
        let mut wire = Vec::new();
        while let Some(n) = self.tunnel.poll_transmit(now, MTU, &mut out) {
            wire.push(out[..n].to_vec());
        }
        wire
    }

    /// A datagram from `from`: the datagrams sent back.
    fn receive(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> Vec<Vec<u8>> {
        let mut replies = Vec::new();
        let msg = match Message::parse(datagram) {
            Ok(m) => m,
            Err(e) => {
                self.refused.push(e);
                return replies;
            }
        };
        let mut cookie = [0u8; COOKIE_REPLY_LEN];
        if let Err(e) = self.identity.check_macs(now, from, &msg, &mut cookie) {
            if e == WgError::Cookie {
                replies.push(cookie.to_vec());
            }
            self.refused.push(e);
            return replies;
        }
        let r = match msg {
            Message::Initiation(m) => self.identity.open_initiation(m).and_then(|half| {
                let mut resp = [0u8; RESPONSE_LEN];
                self.tunnel.consume_initiation(now, &half, &mut resp)?;
                replies.push(resp.to_vec());
                Ok(())
            }),
            Message::Response(m) => self.tunnel.consume_response(now, m),
            Message::CookieReply(m) => self.tunnel.consume_cookie(now, m),
            Message::Data(d) => {
                let mut plain = vec![0u8; 2048];
                self.tunnel.decapsulate(now, &d, &mut plain).and_then(|len| {
                    if len > 0 {
                        let (n, _) = inner_source(&plain[..len])?;
                        self.got.push(plain[..n].to_vec());
                    }
                    Ok(())
                })
            }
        };
        if let Err(e) = r {
            self.refused.push(e);
        }
        replies.extend(self.drain(now));
        replies
    }

    fn tick(&mut self, now: Instant) -> Vec<Vec<u8>> {
        if self.tunnel.poll_timeout().is_some_and(|t| t <= now) {
            self.tunnel.handle_timeout(now);
        }
        self.drain(now)
    }
}

/// Two nodes and a wire between them, in virtual time.
struct Pair {
    a: Node,
    b: Node,
    now: Instant,
    /// Datagrams on the wire, (to b?, bytes).
    wire: Vec<(bool, Vec<u8>)>,
    /// Every datagram sent, (by a?, message type).
    log: Vec<(bool, u8, Instant)>,
    /// Drop what goes this way (to b?), when set.
    cut: Option<bool>,
}

impl Pair {
    fn new() -> Pair {
        let now = Instant::now();
        let (pa, pb) = (public_key(&[1; 32]), public_key(&[2; 32]));
        Pair { a: Node::new(1, pb, 7, now), b: Node::new(2, pa, 9, now), now, wire: vec![], log: vec![], cut: None }
    }

    fn put(&mut self, to_b: bool, datagrams: Vec<Vec<u8>>) {
        for d in datagrams {
            self.log.push((to_b, d[0], self.now));
            if self.cut != Some(to_b) {
                self.wire.push((to_b, d));
            }
        }
    }

    /// Delivers until the wire is empty.
    fn deliver(&mut self) {
        while !self.wire.is_empty() {
            for (to_b, d) in std::mem::take(&mut self.wire) {
                let back = if to_b {
                    self.b.receive(self.now, self.a.addr, &d)
                } else {
                    self.a.receive(self.now, self.b.addr, &d)
                };
                self.put(!to_b, back);
            }
        }
    }

    fn a_sends(&mut self, p: &[u8]) {
        let d = self.a.send(self.now, p);
        self.put(true, d);
        self.deliver();
    }

    fn b_sends(&mut self, p: &[u8]) {
        let d = self.b.send(self.now, p);
        self.put(false, d);
        self.deliver();
    }

    /// Moves virtual time forward in steps of `step`, firing timers.
    fn run(&mut self, total: Duration, step: Duration) {
        let end = self.now + total;
        while self.now < end {
            self.now += step;
            let (da, db) = (self.a.tick(self.now), self.b.tick(self.now));
            self.put(true, da);
            self.put(false, db);
            self.deliver();
        }
    }

    fn sent(&self, by_a: bool, kind: u8) -> usize {
        self.log.iter().filter(|(a, k, _)| *a == by_a && *k == kind).count()
    }
}

fn packet(tag: u8, len: usize) -> Vec<u8> {
    let mut p = vec![tag; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[12..16].copy_from_slice(&[10, 244, 1, tag]);
    p[16..20].copy_from_slice(&[10, 244, 2, 2]);
    p
}

const INIT: u8 = 1;
const RESP: u8 = 2;
const COOKIE: u8 = 3;
const DATA: u8 = 4;

#[test]
fn a_packet_starts_a_handshake_and_arrives_after_it() {
    let mut p = Pair::new();
    p.a_sends(&packet(1, 100));
    assert_eq!((p.sent(true, INIT), p.sent(false, RESP)), (1, 1));
    assert_eq!(p.b.got, vec![packet(1, 100)], "the staged packet went out after the response");
    p.b_sends(&packet(2, 60));
    assert_eq!(p.a.got, vec![packet(2, 60)]);
    assert!(p.a.refused.is_empty() && p.b.refused.is_empty(), "{:?} {:?}", p.a.refused, p.b.refused);
    assert_eq!(p.a.tunnel.last_handshake(), Some(p.now));
}

#[test]
fn the_responder_holds_its_packets_until_the_session_is_confirmed() {
    let mut p = Pair::new();
    // A's initiation reaches B, but B's response is lost.
    p.cut = Some(false);
    p.a_sends(&packet(1, 100));
    p.cut = None;
    // B has a session it may not seal with yet: its packet waits.
    let d = p.b.send(p.now, &packet(2, 80));
    assert!(d.iter().all(|d| d[0] != DATA), "no data before confirmation");
    assert_eq!(p.b.tunnel.staged(), 1);
    // A retries after 5 s; the handshake completes; A's keepalive or staged
    // packet confirms B's session and B's staged packet follows.
    p.run(Duration::from_secs(6), Duration::from_millis(100));
    assert_eq!(p.b.got, vec![packet(1, 100)]);
    assert_eq!(p.a.got, vec![packet(2, 80)]);
}

#[test]
fn an_unanswered_handshake_is_retried_every_5_s_and_given_up_after_90_s() {
    let mut p = Pair::new();
    p.cut = Some(true);
    p.a_sends(&packet(1, 100));
    p.run(Duration::from_secs(120), Duration::from_millis(50));
    let times: Vec<Instant> = p.log.iter().filter(|(a, k, _)| *a && *k == INIT).map(|l| l.2).collect();
    assert_eq!(times.len(), 19, "one initiation and 18 retries");
    for w in times.windows(2) {
        let gap = w[1] - w[0];
        assert!(gap >= REKEY_TIMEOUT && gap <= REKEY_TIMEOUT + Duration::from_millis(400), "{gap:?}");
    }
    assert_eq!(p.a.tunnel.staged(), 0, "staged packets dropped when it gives up");
    // The wire comes back: a new packet starts a new handshake at once.
    p.cut = None;
    p.a_sends(&packet(3, 100));
    assert_eq!(p.b.got, vec![packet(3, 100)]);
}

#[test]
fn the_initiator_rekeys_after_120_s_without_losing_a_packet() {
    let mut p = Pair::new();
    p.a_sends(&packet(1, 100));
    let first = p.a.tunnel.current().unwrap().local_index;
    let mut sent = 1;
    for _ in 0..130 {
        p.run(Duration::from_secs(1), Duration::from_secs(1));
        p.a_sends(&packet(1, 100));
        p.b_sends(&packet(2, 100));
        sent += 1;
    }
    assert_eq!(p.sent(true, INIT), 2, "one rekey");
    let rekey = p.log.iter().filter(|(a, k, _)| *a && *k == INIT).nth(1).unwrap().2;
    let age = rekey - p.log[0].2;
    assert!(age >= REKEY_AFTER_TIME && age < REKEY_AFTER_TIME + Duration::from_secs(2), "{age:?}");
    assert_ne!(p.a.tunnel.current().unwrap().local_index, first, "a new session");
    assert_eq!(p.b.got.len(), sent, "every packet arrived");
    assert_eq!(p.a.got.len(), 130);
    assert!(p.b.refused.is_empty() && p.a.refused.is_empty(), "{:?} {:?}", p.a.refused, p.b.refused);
}

#[test]
fn a_session_is_refused_after_180_s() {
    let mut p = Pair::new();
    p.a_sends(&packet(1, 100));
    // A datagram sealed now and held back on the wire.
    let old = p.a.send(p.now, &packet(2, 100));
    assert_eq!(old.len(), 1);
    // No handshake gets through any more.
    p.cut = Some(true);
    p.run(Duration::from_secs(181), Duration::from_secs(1));
    let d = p.a.send(p.now, &packet(3, 100));
    assert!(d.iter().all(|d| d[0] != DATA), "nothing is sealed with a session of 180 s");
    assert!(p.a.tunnel.staged() > 0);
    p.cut = None;
    let r = p.b.receive(p.now, p.a.addr, &old[0]);
    assert!(r.is_empty());
    assert_eq!(p.b.refused, vec![WgError::Expired]);
}

#[test]
fn received_data_is_answered_by_a_keepalive_after_10_s() {
    let mut p = Pair::new();
    p.a_sends(&packet(1, 100));
    let before = p.sent(false, DATA);
    p.run(Duration::from_secs(9), Duration::from_millis(100));
    assert_eq!(p.sent(false, DATA), before, "nothing before 10 s");
    p.run(Duration::from_secs(2), Duration::from_millis(100));
    assert_eq!(p.sent(false, DATA), before + 1, "one keepalive");
    p.run(Duration::from_secs(60), Duration::from_secs(1));
    assert_eq!(p.sent(false, DATA), before + 1, "keepalives answer data, not keepalives");
}

#[test]
fn a_persistent_keepalive_goes_out_every_interval() {
    let mut p = Pair::new();
    p.a.tunnel.set_keepalive(p.now, Some(25));
    p.deliver();
    p.run(Duration::from_millis(100), Duration::from_millis(100));
    assert_eq!(p.sent(true, INIT), 1, "a keepalive without a session asks for one");
    let before = p.sent(true, DATA);
    p.run(Duration::from_secs(100), Duration::from_secs(1));
    let n = p.sent(true, DATA) - before;
    assert!((3..=4).contains(&n), "{n} keepalives in 100 s at 25 s");
}

#[test]
fn data_sent_without_an_answer_starts_a_handshake_after_15_s() {
    let mut p = Pair::new();
    p.a_sends(&packet(1, 100));
    p.cut = Some(false);
    p.a_sends(&packet(1, 100));
    p.run(Duration::from_secs(14), Duration::from_millis(100));
    assert_eq!(p.sent(true, INIT), 1);
    p.run(Duration::from_secs(2), Duration::from_millis(100));
    assert_eq!(p.sent(true, INIT), 2, "a new handshake 15 s after unanswered data");
}

#[test]
fn keys_are_wiped_540_s_after_the_last_session() {
    let mut p = Pair::new();
    p.a_sends(&packet(1, 100));
    assert!(p.a.tunnel.current().is_some());
    p.cut = Some(true);
    p.run(Duration::from_secs(541), Duration::from_secs(1));
    assert!(p.a.tunnel.current().is_none() && p.b.tunnel.current().is_none());
}

#[test]
fn replays_are_refused() {
    let mut p = Pair::new();
    let init = p.a.send(p.now, &packet(1, 100));
    p.put(true, init.clone());
    p.deliver();
    let data = p.a.send(p.now, &packet(2, 100));
    p.put(true, data.clone());
    p.deliver();
    assert_eq!(p.b.got.len(), 2);
    p.now += Duration::from_secs(1);
    p.b.receive(p.now, p.a.addr, &data[0]);
    p.b.receive(p.now, p.a.addr, &init[0]);
    assert_eq!(p.b.refused, vec![WgError::Replay, WgError::StaleTimestamp]);
    assert_eq!(p.b.got.len(), 2);
}

#[test]
fn under_load_an_initiation_gets_a_cookie_and_the_retry_carries_it() {
    let mut p = Pair::new();
    let (pa, t0) = (p.a.identity.public_key(), p.now);
    let loaded = Arc::new(Identity::new([2; 32], (t0, Duration::ZERO)).with_rate_limit(0));
    p.b = Node::with_identity(loaded, pa, 9, 2);
    p.a_sends(&packet(1, 100));
    assert_eq!(p.sent(false, COOKIE), 1);
    assert_eq!(p.sent(false, RESP), 0);
    assert_eq!(p.b.refused, vec![WgError::Cookie]);
    // The retry (5 s later) carries mac2 from the cookie and is answered.
    p.run(Duration::from_secs(6), Duration::from_millis(100));
    assert_eq!(p.sent(false, RESP), 1);
    assert_eq!(p.b.got, vec![packet(1, 100)]);
    // A cookie for another address does not pass.
    let other = SocketAddr::from(([192, 0, 2, 99], 51820));
    p.a.tunnel.handle_timeout(p.now);
    let mut out = [0u8; 2048];
    p.now += Duration::from_secs(6);
    p.a.tunnel.handle_timeout(p.now);
    p.a.tunnel.stage(p.now, &packet(9, 40));
    let n = p.a.tunnel.poll_transmit(p.now, MTU, &mut out).unwrap();
    let r = p.b.receive(p.now, other, &out[..n]);
    assert_eq!(r.first().map(|d| d[0]), Some(COOKIE));
}

#[test]
fn bad_mac1_is_refused_without_spending_a_dh() {
    let mut p = Pair::new();
    let mut init = p.a.send(p.now, &packet(1, 100));
    init[0][120] ^= 1;
    let r = p.b.receive(p.now, p.a.addr, &init[0]);
    assert!(r.is_empty());
    assert_eq!(p.b.refused, vec![WgError::Mac1]);
}

#[test]
fn a_new_private_key_ends_the_sessions_and_a_handshake_follows() {
    let mut p = Pair::new();
    p.a_sends(&packet(1, 100));
    let identity = Arc::new(Identity::new([3; 32], (p.now, Duration::ZERO)));
    p.a.identity = identity.clone();
    p.a.tunnel.set_identity(identity.clone());
    p.b.tunnel = Tunnel::new(p.b.identity.clone(), identity.public_key(), None, None, 9);
    p.now += Duration::from_secs(1);
    p.a_sends(&packet(2, 100));
    assert_eq!(p.b.got, vec![packet(1, 100), packet(2, 100)]);
    assert_eq!(p.sent(true, INIT), 2);
}

#[test]
fn roaming_needs_no_handshake() {
    let mut p = Pair::new();
    p.a_sends(&packet(1, 100));
    p.a.addr = SocketAddr::from(([198, 51, 100, 7], 40000));
    p.a_sends(&packet(2, 100));
    assert_eq!(p.b.got.len(), 2);
    assert_eq!(p.sent(true, INIT), 1);
}

#[test]
fn a_preshared_key_must_match() {
    let mut p = Pair::new();
    p.a.tunnel.set_preshared_key(Some([5; 32]));
    p.a_sends(&packet(1, 100));
    assert_eq!(p.a.refused, vec![WgError::Decrypt], "the response does not open");
    p.b.tunnel.set_preshared_key(Some([5; 32]));
    p.run(Duration::from_secs(6), Duration::from_millis(100));
    assert_eq!(p.b.got, vec![packet(1, 100)]);
}

/// boringtun's implementation on the other side, both ways round.
mod boringtun_interop {
    use super::*;
    use boringtun::noise::{Tunn, TunnResult};
    use boringtun::x25519::{PublicKey, StaticSecret};

    fn theirs(private: u8, peer: [u8; 32]) -> Tunn {
        Tunn::new(StaticSecret::from([private; 32]), PublicKey::from(peer), None, None, 77, None)
    }

    fn to_them(t: &mut Tunn, d: &[u8]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (mut net, mut tun) = (vec![], vec![]);
        let mut out = vec![0u8; 2048];
        match t.decapsulate(None, d, &mut out) {
            TunnResult::WriteToNetwork(b) => {
                net.push(b.to_vec());
                let mut more = vec![0u8; 2048];
                while let TunnResult::WriteToNetwork(b) = t.decapsulate(None, &[], &mut more) {
                    net.push(b.to_vec());
                }
            }
            TunnResult::WriteToTunnelV4(b, _) | TunnResult::WriteToTunnelV6(b, _) => tun.push(b.to_vec()),
            TunnResult::Done => {}
            TunnResult::Err(e) => panic!("boringtun refused: {e:?}"),
        }
        (net, tun)
    }

    #[test]
    fn we_initiate_to_boringtun() {
        let now = Instant::now();
        let mut us = Node::new(1, public_key(&[2; 32]), 7, now);
        let mut bt = theirs(2, public_key(&[1; 32]));
        let init = us.send(now, &packet(1, 100));
        let (net, _) = to_them(&mut bt, &init[0]);
        let mut back = Vec::new();
        for d in net {
            back.extend(us.receive(now, SocketAddr::from(([192, 0, 2, 2], 51820)), &d));
        }
        let mut got = Vec::new();
        for d in back {
            got.extend(to_them(&mut bt, &d).1);
        }
        assert_eq!(got, vec![packet(1, 100)]);
        let mut out = vec![0u8; 2048];
        let TunnResult::WriteToNetwork(d) = bt.encapsulate(&packet(2, 300), &mut out) else { panic!() };
        let d = d.to_vec();
        us.receive(now, SocketAddr::from(([192, 0, 2, 2], 51820)), &d);
        assert_eq!(us.got, vec![packet(2, 300)]);
        assert!(us.refused.is_empty(), "{:?}", us.refused);
    }

    #[test]
    fn boringtun_initiates_to_us() {
        let now = Instant::now();
        let mut us = Node::new(1, public_key(&[2; 32]), 7, now);
        let mut bt = theirs(2, public_key(&[1; 32]));
        let mut out = vec![0u8; 2048];
        let TunnResult::WriteToNetwork(init) = bt.encapsulate(&packet(3, 200), &mut out) else { panic!() };
        let init = init.to_vec();
        let from = SocketAddr::from(([192, 0, 2, 2], 51820));
        let resp = us.receive(now, from, &init);
        assert_eq!(resp.len(), 1, "{:?}", us.refused);
        let (net, _) = to_them(&mut bt, &resp[0]);
        for d in net {
            us.receive(now, from, &d);
        }
        assert_eq!(us.got, vec![packet(3, 200)], "{:?}", us.refused);
        let d = us.send(now, &packet(4, 1400));
        assert_eq!(to_them(&mut bt, &d[0]).1, vec![packet(4, 1400)]);
    }
}
