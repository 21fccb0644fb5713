//! The WireGuard handshake between real peers with real keys, driven by
//! the fuzzer's choice of actions: which peer sends, which datagram on the
//! wire is delivered to whom and from which address (so also reordered,
//! dropped and replayed), which field of it is changed, when an initiation's
//! timestamp lies (older, equal, newer), how far virtual time moves, and
//! which nodes are under load. The messages it builds carry a correct mac1
//! (and a mac2 from a real cookie when asked), so the fuzzer gets past the
//! MAC checks into the handshake states behind them.
//!
//! ```text
//!   A, B, C: real nodes that know each other     M: knows A, B, C; nobody knows M
//!
//!   each node: Identity (macs, cookie replies) + one Tunnel per peer it knows;
//!   a datagram is dispatched as the engine does (initiation by the key it
//!   opens to, anything else by the receiver index's upper 24 bits)
//!
//!   wire log: every datagram ever sent; an action delivers any of them
//! ```
//!
//! The target keeps its own model of what the protocol must do: which
//! messages are genuine (made by a node's tunnel, byte for byte), the newest
//! timestamp each responder accepted from each peer, each tunnel's pending
//! initiation and last mac1, the identities' one-second load windows and
//! cookie secrets, the cookies learned from cookie replies (opened here with
//! the responder's public key), and which two ephemerals made each session.
//! Invariants, each checked both ways where the model knows the answer:
//!
//! - nothing panics;
//! - `check_macs` refuses a wrong mac1 and writes nothing; under load it
//!   passes exactly the messages whose mac2 carries the node's current
//!   cookie for the sender's address, and answers every other one with a
//!   cookie reply that opens to that cookie and names the message's sender;
//! - an initiation opens only if it is genuine and made for this node, to
//!   the key of the node that made it; it is answered exactly when its
//!   timestamp is newer than the newest accepted from that peer and it does
//!   not come within 20 ms of the last one (a replayed or stale initiation
//!   never makes or replaces a session);
//! - a response is taken exactly when it is genuine, from the tunnel's peer,
//!   and answers the tunnel's pending initiation; a cookie reply only when
//!   it is genuine, from the peer, and answers the tunnel's last message;
//! - a refused message leaves the sessions a tunnel holds as they were;
//! - a data packet opens exactly when it is genuine, was not opened before,
//!   and the receiving tunnel holds the session (the same two ephemerals)
//!   it was sealed with, younger than `REJECT_AFTER_TIME`; what it opens to
//!   is exactly the packet sent, from the sender's pod range, on the node
//!   it was sent to: nothing unauthenticated reaches a TUN;
//! - at the end, a packet sealed on every session a real node holds opens
//!   on its peer to the exact bytes sent, when the peer holds that session;
//!   nobody ever confirms a session with M.
//!
//! Input: byte 0 chooses the load (bits 0-5: rate limit of A, B, C, two bits
//! each: 0, 1, 3 or the default [`HANDSHAKE_RATE_LIMIT`] handshakes a
//! second; bit 6: data opened through `Keypair::open` and `Tunnel::accept`
//! instead of `Tunnel::decapsulate`; bit 7: M's limit 0). Then up to
//! [`MAX_ACTIONS`] actions of four bytes `op p1 p2 p3`, `op % 8`:
//!
//! | op | action | p1, p2, p3 |
//! |---|---|---|
//! | 0, 7 | a node sends a pod packet to a peer (data, or staged and an initiation) | node, peer, length |
//! | 1, 2, 6 | deliver a datagram from the wire log | k-th newest, routing (bits 0-1: to the intended node or one of two others; bits 2-3: from the sender's address or one of two others), - |
//! | 3 | deliver a changed copy of a datagram | k-th newest, change (bits 0-2 field, 3-4 mac1: right / kept / broken / right for another node, 5-6 mac2: kept / from a real cookie / zero / flipped, 7 another source address), value |
//! | 4 | a second tunnel of a node makes an initiation with a chosen timestamp, delivered at once | node, peer, timing (bits 0-1: equal to the newest accepted, older, newer, now; bits 2-7: how much, in 20 ms) |
//! | 5 | virtual time moves on; every due timer fires | how far (from 1 ms to 541 s) |

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::XChaCha20Poly1305;
use weft_tunnel::wireguard::{
    inner_source, public_key, Identity, Keypair, Message, Tunnel, WgError, COOKIE_REFRESH_TIME, COOKIE_REPLY_LEN,
    HANDSHAKE_RATE_LIMIT, INITIATION_LEN, INITIATION_MIN_INTERVAL, KEEPALIVE_LEN, REJECT_AFTER_TIME, RESPONSE_LEN,
};

/// Actions taken from one input. Each action makes at most two local
/// indices per tunnel, so with 32 the 8-bit session slots never wrap within
/// one input (the model names sessions by index); a handshake through a
/// cookie takes 7. Under the fuzzer's instrumentation X25519 is most of a
/// run's cost, about 10 ms for an input of 32 actions.
pub const MAX_ACTIONS: usize = 32;

/// A, B and C know each other; M (the last) knows them, they do not know M.
const NODES: usize = 4;
const STRANGER: usize = 3;
const MTU: usize = 1420;
/// Where mac1 starts in an initiation and in a response (the wire format).
const INITIATION_MAC1: usize = 116;
const RESPONSE_MAC1: usize = 60;
/// The wall-clock time (since 1970) at the run's first instant.
const WALL: Duration = Duration::from_secs(1_700_000_000);
/// Rate limits byte 0 chooses from.
const LIMITS: [u32; 4] = [0, 1, 3, HANDSHAKE_RATE_LIMIT];
/// How far an "advance" action moves time: around every timer's edge.
const STEPS: [Duration; 16] = [
    Duration::from_millis(1),
    Duration::from_millis(10),
    Duration::from_millis(25),
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_millis(5_500),
    Duration::from_secs(10),
    Duration::from_millis(15_100),
    Duration::from_secs(60),
    Duration::from_secs(110),
    Duration::from_secs(121),
    Duration::from_secs(181),
    Duration::from_secs(541),
    Duration::from_secs(2),
    Duration::from_millis(100),
    Duration::from_secs(3),
];

/// What a run reached (the unit tests check that the scenarios get deep).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Initiations answered.
    pub answered: usize,
    /// Responses taken: sessions made by an initiator.
    pub sessions: usize,
    /// Cookie replies written, and taken.
    pub cookies: (usize, usize),
    /// Initiations refused as stale (replayed or older).
    pub stale: usize,
    /// Handshake messages refused for mac1.
    pub mac1: usize,
    /// Packets that reached a TUN.
    pub tun: usize,
}

/// Runs one input through the invariants above; panics on a broken one.
pub fn run(data: &[u8]) {
    play(data);
}

/// Runs one input and says how far it got.
pub fn play(data: &[u8]) -> Tally {
    let Some((&config, actions)) = data.split_first() else { return Tally::default() };
    let mut w = World::new(config);
    for a in actions.chunks_exact(4).take(MAX_ACTIONS) {
        w.act(a[0], a[1], a[2], a[3]);
    }
    w.finish();
    w.tally
}

/// The two ephemeral public keys (initiator's, responder's) a session's
/// keys were derived from: a session's name across both sides.
type Sid = ([u8; 32], [u8; 32]);

/// A tunnel's pending initiation, as far as the model knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    /// The last initiation it wrote (sender index, ephemeral).
    Known(u32, [u8; 32]),
    /// The same, or none: a timer fired since and may have dropped it.
    Maybe(u32, [u8; 32]),
}

/// One tunnel and the model of it.
struct Peer {
    tunnel: Tunnel,
    pending: Pending,
    last_mac1: [u8; 16],
    /// Sessions it made: local index to their name.
    sessions: HashMap<u32, Sid>,
    /// Packets staged, oldest first.
    staged: VecDeque<Vec<u8>>,
    /// The newest timestamp accepted from the peer, and the instant it was made at.
    greatest: [u8; 12],
    greatest_at: Option<Instant>,
    last_consumed: Option<Instant>,
}

/// A node. Its identity and tunnels are made when first used: making
/// them takes no time or randomness that matters, and the scalar
/// multiplications are most of a run's cost under the fuzzer's
/// instrumentation.
struct Node {
    identity: Option<Arc<Identity>>,
    public: [u8; 32],
    addr: SocketAddr,
    limit: u32,
    /// `tunnels[j]`: the tunnel to node `j`, once made (if this node knows `j`).
    tunnels: Vec<Option<Peer>>,
    /// The load window: its start and the handshake messages counted in it.
    load: (Instant, u32),
    /// The cookie secret: its generation and when it was made.
    secret: (u32, Instant),
    /// Cookies read from this node's cookie replies, by (generation, address).
    cookies: HashMap<(u32, SocketAddr), [u8; 16]>,
}

/// A datagram on the wire log.
#[derive(Clone)]
struct Datagram {
    bytes: Vec<u8>,
    author: usize,
    to: usize,
}

/// A genuine initiation: bytes 8..116 as its tunnel wrote them.
struct Init {
    author: usize,
    to: usize,
    body: [u8; 108],
    ts: [u8; 12],
    at: Instant,
}

/// A genuine response: bytes 8..60, and the ephemeral it answers.
struct Resp {
    author: usize,
    body: [u8; 52],
    answers: [u8; 32],
}

/// A genuine cookie reply: bytes 8..64, the mac1 it answers, its cookie.
struct Cookie {
    author: usize,
    body: [u8; 56],
    aad: [u8; 16],
}

/// A genuine data packet: who sealed it for whom, on which session, with what inside.
struct Sealed {
    author: usize,
    to: usize,
    sid: Sid,
    plain: Vec<u8>,
    opened: bool,
}

struct World {
    t0: Instant,
    now: Instant,
    nodes: Vec<Node>,
    log: Vec<Datagram>,
    inits: HashMap<[u8; 32], Init>,
    resps: HashMap<[u8; 32], Resp>,
    cookie_replies: HashMap<[u8; 24], Cookie>,
    sealed: HashMap<Vec<u8>, Sealed>,
    split_open: bool,
    packets: u16,
    tally: Tally,
}

impl World {
    fn new(config: u8) -> World {
        let t0 = Instant::now();
        let nodes: Vec<Node> = (0..NODES)
            .map(|i| Node {
                identity: None,
                public: public_keys()[i],
                addr: SocketAddr::from(([192, 0, 2, i as u8 + 1], 51820)),
                limit: match i {
                    STRANGER if config & 0x80 != 0 => 0,
                    STRANGER => HANDSHAKE_RATE_LIMIT,
                    _ => LIMITS[usize::from(config >> (2 * i)) & 3],
                },
                tunnels: (0..NODES).map(|_| None).collect(),
                load: (t0, 0),
                secret: (0, t0),
                cookies: HashMap::new(),
            })
            .collect();
        World {
            t0,
            now: t0,
            nodes,
            log: Vec::new(),
            inits: HashMap::new(),
            resps: HashMap::new(),
            cookie_replies: HashMap::new(),
            sealed: HashMap::new(),
            split_open: config & 0x40 != 0,
            packets: 0,
            tally: Tally::default(),
        }
    }

    fn act(&mut self, op: u8, p1: u8, p2: u8, p3: u8) {
        match op % 8 {
            0 | 7 => {
                let x = usize::from(p1) % NODES;
                let y = self.peer_of(x, p2);
                self.send(x, y, usize::from(p3));
            }
            1 | 2 | 6 => {
                let Some(d) = self.pick(p1) else { return };
                let to = match p2 & 3 {
                    0 | 1 => d.to,
                    r => (d.to + usize::from(r) - 1) % NODES,
                };
                let from = match (p2 >> 2) & 3 {
                    0 | 1 => d.author,
                    r => (d.author + usize::from(r) - 1) % NODES,
                };
                self.receive(to, from, &d.bytes);
            }
            3 => self.mutate(p1, p2, p3),
            4 => self.forge(usize::from(p1) % NODES, p2, p3),
            _ => self.advance(STEPS[usize::from(p1) % STEPS.len()]),
        }
    }

    /// The `k`-th newest datagram of the wire log.
    fn pick(&self, k: u8) -> Option<Datagram> {
        let n = self.log.len();
        (n > 0).then(|| self.log[n - 1 - usize::from(k) % n].clone())
    }

    /// One of the peers node `x` knows.
    fn peer_of(&self, x: usize, p: u8) -> usize {
        let peers: Vec<usize> = (0..NODES).filter(|&j| knows(x, j)).collect();
        peers[usize::from(p) % peers.len()]
    }

    /// Node `x`'s identity (made on first use).
    fn identity(&mut self, x: usize) -> Arc<Identity> {
        let (t0, limit) = (self.t0, self.nodes[x].limit);
        let id = self.nodes[x]
            .identity
            .get_or_insert_with(|| Arc::new(Identity::new(private_key(x), (t0, WALL)).with_rate_limit(limit)));
        id.clone()
    }

    /// Node `x`'s tunnel to `y`, which it knows (made on first use).
    fn peer(&mut self, x: usize, y: usize) -> &mut Peer {
        assert!(knows(x, y), "node {x} has no tunnel to node {y}");
        if self.nodes[x].tunnels[y].is_none() {
            let tunnel = Tunnel::new(self.identity(x), self.nodes[y].public, None, None, tunnel_index(y));
            self.nodes[x].tunnels[y] = Some(Peer {
                tunnel,
                pending: Pending::None,
                last_mac1: [0; 16],
                sessions: HashMap::new(),
                staged: VecDeque::new(),
                greatest: [0; 12],
                greatest_at: None,
                last_consumed: None,
            });
        }
        self.nodes[x].tunnels[y].as_mut().expect("made above")
    }

    /// Whether node `x`'s tunnel to `y` has been made and holds a current session.
    fn has_current(&self, x: usize, y: usize) -> bool {
        self.nodes[x].tunnels[y].as_ref().is_some_and(|p| p.tunnel.current().is_some())
    }

    /// Node `x` sends a fresh pod packet to `y`.
    fn send(&mut self, x: usize, y: usize, len: usize) {
        self.packets = self.packets.wrapping_add(1);
        let packet = pod_packet(x, y, self.packets, len);
        let now = self.now;
        let mut out = vec![0u8; 2048];
        let p = self.peer(x, y);
        let kp = p.tunnel.current().cloned();
        match p.tunnel.encapsulate(now, &packet, MTU, &mut out) {
            Some(n) => {
                let kp = kp.expect("data is sealed only on a current session");
                assert_eq!(out[4..8], kp.remote_index.to_le_bytes(), "data goes to the peer's index");
                self.record_data(x, y, &kp, out[..n].to_vec(), packet);
            }
            None => self.peer(x, y).staged.push_back(packet),
        }
        self.drain(x, y);
    }

    fn record_data(&mut self, x: usize, y: usize, kp: &Keypair, bytes: Vec<u8>, plain: Vec<u8>) {
        let sid = *self.peer(x, y).sessions.get(&kp.local_index).expect("a session the tunnel made");
        self.log.push(Datagram { bytes: bytes.clone(), author: x, to: y });
        self.sealed.insert(bytes, Sealed { author: x, to: y, sid, plain, opened: false });
    }

    /// Everything tunnel `x -> y` sends on its own, onto the wire log.
    fn drain(&mut self, x: usize, y: usize) {
        let now = self.now;
        let mut out = vec![0u8; 2048];
        loop {
            let p = self.peer(x, y);
            while p.staged.len() > p.tunnel.staged() {
                p.staged.pop_front();
            }
            let Some(n) = p.tunnel.poll_transmit(now, MTU, &mut out) else { break };
            let bytes = out[..n].to_vec();
            match (bytes[0], n) {
                (1, INITIATION_LEN) => self.record_init(x, y, now, bytes),
                (4, _) => {
                    let p = self.peer(x, y);
                    let kp = p.tunnel.current().cloned().expect("data is sealed only on a current session");
                    let plain = if n == KEEPALIVE_LEN {
                        Vec::new()
                    } else {
                        let plain = p.staged.pop_front().expect("a staged packet went out");
                        assert_eq!(n, Keypair::sealed_len(plain.len(), MTU), "the staged packet, oldest first");
                        plain
                    };
                    assert_eq!(p.staged.len(), p.tunnel.staged(), "one staged packet per data packet");
                    self.record_data(x, y, &kp, bytes, plain);
                }
                _ => panic!("a tunnel sent on its own a datagram of type {} and {n} bytes", bytes[0]),
            }
        }
    }

    fn record_init(&mut self, x: usize, y: usize, at: Instant, bytes: Vec<u8>) {
        let eph: [u8; 32] = bytes[8..40].try_into().expect("32 bytes");
        let ts = tai64n(self.t0, at);
        let p = self.peer(x, y);
        let sender = le32(&bytes[4..8]);
        p.pending = Pending::Known(sender, eph);
        p.last_mac1 = bytes[INITIATION_MAC1..INITIATION_MAC1 + 16].try_into().expect("16 bytes");
        let body = bytes[8..116].try_into().expect("108 bytes");
        self.inits.insert(eph, Init { author: x, to: y, body, ts, at });
        self.log.push(Datagram { bytes, author: x, to: y });
    }

    /// A second tunnel of node `x` (same key, same index) initiates to a
    /// peer at an instant chosen around the newest one that peer accepted.
    fn forge(&mut self, x: usize, p: u8, timing: u8) {
        let y = (x + 1 + usize::from(p) % (NODES - 1)) % NODES;
        let base = self.nodes[y].tunnels[x].as_ref().and_then(|p| p.greatest_at).unwrap_or(self.now);
        let step = Duration::from_millis(20) * (1 + u32::from(timing >> 2));
        let at = match timing & 3 {
            0 => base,
            1 => base.checked_sub(step).unwrap_or(base),
            2 => base + step,
            _ => self.now,
        };
        let mut t = Tunnel::new(self.identity(x), self.nodes[y].public, None, None, tunnel_index(y));
        t.stage(at, &pod_packet(x, y, 0, 0));
        let mut out = vec![0u8; 2048];
        let n = t.poll_transmit(at, MTU, &mut out).expect("a new tunnel with a staged packet initiates");
        assert_eq!((out[0], n), (1, INITIATION_LEN), "an initiation");
        let bytes = out[..n].to_vec();
        let eph: [u8; 32] = bytes[8..40].try_into().expect("32 bytes");
        let body = bytes[8..116].try_into().expect("108 bytes");
        self.inits.insert(eph, Init { author: x, to: y, body, ts: tai64n(self.t0, at), at });
        self.log.push(Datagram { bytes: bytes.clone(), author: x, to: y });
        self.receive(y, x, &bytes);
    }

    /// A changed copy of a datagram from the log, delivered at once.
    fn mutate(&mut self, k: u8, change: u8, v: u8) {
        let Some(d) = self.pick(k) else { return };
        let mut b = d.bytes.clone();
        let to = if (change >> 3) & 3 == 3 { (d.to + 1) % NODES } else { d.to };
        let from = if change & 0x80 != 0 { (d.author + 1 + usize::from(v & 1)) % NODES } else { d.author };
        let field = change & 7;
        let flip = |b: &mut [u8], start: usize, span: usize| {
            let at = start + usize::from(v) % span;
            b[at] ^= 1 << (usize::from(v) / span % 8);
        };
        let index = ((u32::from(v & 3) + 1) << 8) | u32::from(v >> 2);
        let mac_at = match b[0] {
            1 => {
                match field {
                    1 => b[4..8].copy_from_slice(&index.to_le_bytes()),
                    2 => flip(&mut b, 8, 32),
                    3 => flip(&mut b, 40, 48),
                    4 => flip(&mut b, 88, 28),
                    5 | 6 => {
                        // Parts of the newest other initiation on the wire.
                        if let Some(o) = self.log.iter().rev().find(|o| o.bytes[0] == 1 && o.bytes[8..40] != b[8..40]) {
                            let r = if field == 5 { 88..116 } else { 8..88 };
                            b[r.clone()].copy_from_slice(&o.bytes[r]);
                        }
                    }
                    _ => {}
                }
                Some(INITIATION_MAC1)
            }
            2 => {
                match field {
                    1 => b[4..8].copy_from_slice(&index.to_le_bytes()),
                    2 => b[8..12].copy_from_slice(&index.to_le_bytes()),
                    3 => flip(&mut b, 12, 32),
                    4 => flip(&mut b, 44, 16),
                    5 => {
                        if let Some(o) = self.log.iter().rev().find(|o| o.bytes[0] == 2 && o.bytes[12..44] != b[12..44])
                        {
                            b[12..60].copy_from_slice(&o.bytes[12..60]);
                        }
                    }
                    _ => {}
                }
                Some(RESPONSE_MAC1)
            }
            3 => {
                match field {
                    1 => b[4..8].copy_from_slice(&index.to_le_bytes()),
                    2 => flip(&mut b, 8, 24),
                    3 => flip(&mut b, 32, 32),
                    4 => {
                        // The cookie of another reply: an answer to another message.
                        if let Some(o) = self.log.iter().rev().find(|o| o.bytes[0] == 3 && o.bytes[8..] != b[8..]) {
                            b[8..].copy_from_slice(&o.bytes[8..]);
                        }
                    }
                    _ => {}
                }
                None
            }
            // Data; one cut shorter than a keepalive earlier is left as it is.
            _ if b.len() < KEEPALIVE_LEN => None,
            _ => {
                match field {
                    1 => b[4..8].copy_from_slice(&index.to_le_bytes()),
                    2 => {
                        let c = u64::from_le_bytes(b[8..16].try_into().expect("eight bytes")) ^ (1 << (v % 64));
                        b[8..16].copy_from_slice(&c.to_le_bytes());
                    }
                    3 => {
                        let span = b.len() - 16;
                        flip(&mut b, 16, span);
                    }
                    4 => b.truncate(b.len() - (usize::from(v) % 16 + 1)),
                    _ => {}
                }
                None
            }
        };
        if let Some(at) = mac_at {
            match (change >> 3) & 3 {
                1 => {}
                m => {
                    let key = hash(&[b"mac1----", &self.nodes[to].public]);
                    let mac1 = mac(&key, &[&b[..at]]);
                    b[at..at + 16].copy_from_slice(&mac1);
                    if m == 2 {
                        b[at + usize::from(v) % 16] ^= 1;
                    }
                }
            }
            match (change >> 5) & 3 {
                0 => {}
                1 => {
                    let node = &self.nodes[to];
                    if let Some(c) = node.cookies.get(&(node.secret.0, self.nodes[from].addr)) {
                        let mac2 = mac(c, &[&b[..at + 16]]);
                        b[at + 16..at + 32].copy_from_slice(&mac2);
                    }
                }
                2 => b[at + 16..at + 32].fill(0),
                _ => b[at + 16 + usize::from(v) % 16] ^= 0x80,
            }
        }
        self.log.push(Datagram { bytes: b.clone(), author: d.author, to });
        self.receive(to, from, &b);
    }

    /// Virtual time moves on; every tunnel's due timers fire and what they
    /// want sent goes onto the wire log.
    fn advance(&mut self, by: Duration) {
        self.now += by;
        let now = self.now;
        for x in 0..NODES {
            for y in 0..NODES {
                let Some(p) = self.nodes[x].tunnels[y].as_mut() else { continue };
                if p.tunnel.poll_timeout().is_none_or(|t| t > now) {
                    continue;
                }
                p.tunnel.handle_timeout(now);
                let before = p.pending;
                if let Pending::Known(l, e) = before {
                    p.pending = Pending::Maybe(l, e);
                }
                self.drain(x, y);
            }
        }
    }

    /// What `check_macs` must answer, with the load and cookie secret moved
    /// on as the identity moves them.
    fn expect_macs(&mut self, z: usize, from: SocketAddr, b: &[u8], at: usize) -> Result<(), WgError> {
        let now = self.now;
        let node = &mut self.nodes[z];
        if mac(&hash(&[b"mac1----", &node.public]), &[&b[..at]]) != b[at..at + 16] {
            return Err(WgError::Mac1);
        }
        if now.saturating_duration_since(node.load.0) >= Duration::from_secs(1) {
            node.load = (now, 0);
        }
        node.load.1 = node.load.1.saturating_add(1);
        if node.load.1 <= node.limit {
            return Ok(());
        }
        if now.saturating_duration_since(node.secret.1) >= COOKIE_REFRESH_TIME {
            node.secret = (node.secret.0 + 1, now);
        }
        match node.cookies.get(&(node.secret.0, from)) {
            Some(c) if mac(c, &[&b[..at + 16]]) == b[at + 16..at + 32] => Ok(()),
            _ => Err(WgError::Cookie),
        }
    }

    /// The sessions (of those the model knows) tunnel `z -> j` holds now.
    fn held(&mut self, z: usize, j: usize) -> Vec<u32> {
        let p = self.peer(z, j);
        let mut v: Vec<u32> = p.sessions.keys().copied().filter(|i| p.tunnel.keypair(*i).is_some()).collect();
        v.sort_unstable();
        v
    }

    /// The tunnel of node `z` a receiver index names, as the engine finds it.
    fn by_index(&self, z: usize, receiver: u32) -> Option<usize> {
        (0..NODES).find(|&j| knows(z, j) && tunnel_index(j) == receiver >> 8)
    }

    /// Node `z` receives `b` from node `from`'s address.
    fn receive(&mut self, z: usize, from_node: usize, b: &[u8]) {
        let from = self.nodes[from_node].addr;
        let now = self.now;
        let Ok(msg) = Message::parse(b) else { return };
        let at = match msg {
            Message::Initiation(_) => INITIATION_MAC1,
            Message::Response(_) => RESPONSE_MAC1,
            _ => 0,
        };
        if at > 0 {
            let expect = self.expect_macs(z, from, b, at);
            let mut reply = [0u8; COOKIE_REPLY_LEN];
            let got = self.identity(z).check_macs(now, from, &msg, &mut reply);
            assert_eq!(got, expect, "check_macs of node {z}");
            match got {
                Err(WgError::Mac1) => {
                    assert_eq!(reply, [0; COOKIE_REPLY_LEN], "a wrong mac1 is answered with nothing");
                    self.tally.mac1 += 1;
                    return;
                }
                Err(_) => return self.cookie_reply(z, from_node, b, at, reply),
                Ok(()) => {}
            }
        }
        match msg {
            Message::Initiation(m) => self.initiation(z, from_node, m),
            Message::Response(m) => self.response(z, m),
            Message::CookieReply(m) => self.cookie(z, m),
            Message::Data(d) => self.data(z, d.receiver, d.counter, d.sealed, b),
        }
    }

    /// A cookie reply node `z` wrote to message `b`: it names the message's
    /// sender and opens to the node's current cookie for the address.
    fn cookie_reply(&mut self, z: usize, from_node: usize, b: &[u8], at: usize, reply: [u8; COOKIE_REPLY_LEN]) {
        let from = self.nodes[from_node].addr;
        assert_eq!(reply[..4], [3, 0, 0, 0], "a cookie reply");
        assert_eq!(reply[4..8], b[4..8], "the cookie reply goes to the message's sender index");
        let aad: [u8; 16] = b[at..at + 16].try_into().expect("16 bytes");
        let cookie =
            open_cookie(&self.nodes[z].public, &reply, &aad).expect("a cookie reply opens with the node's key");
        let node = &mut self.nodes[z];
        let known = *node.cookies.entry((node.secret.0, from)).or_insert(cookie);
        assert_eq!(known, cookie, "one cookie per address while the secret lasts");
        let nonce: [u8; 24] = reply[8..32].try_into().expect("24 bytes");
        let body = reply[8..].try_into().expect("56 bytes");
        self.cookie_replies.insert(nonce, Cookie { author: z, body, aad });
        self.log.push(Datagram { bytes: reply.to_vec(), author: z, to: from_node });
        self.tally.cookies.0 += 1;
    }

    fn initiation(&mut self, z: usize, from_node: usize, m: &[u8; INITIATION_LEN]) {
        let now = self.now;
        let eph: [u8; 32] = m[8..40].try_into().expect("32 bytes");
        let identity = self.identity(z);
        let genuine = self.inits.get(&eph).filter(|g| g.to == z && g.body[..80] == m[8..88]);
        let half = match identity.open_initiation(m) {
            Ok(h) => h,
            Err(e) => {
                assert!(genuine.is_none(), "a genuine initiation to node {z} did not open: {e:?}");
                return;
            }
        };
        let g = genuine.expect("only a genuine initiation made for this node opens");
        let (author, ts, made_at, ts_ok) = (g.author, g.ts, g.at, g.body[80..] == m[88..116]);
        assert_eq!(half.peer, self.nodes[author].public, "an initiation opens to the key of the node that made it");
        if !knows(z, author) {
            assert_eq!(author, STRANGER, "only M is unknown");
            return;
        }
        let held = self.held(z, author);
        let p = self.peer(z, author);
        let expect = if !ts_ok {
            Err(WgError::Decrypt)
        } else if ts <= p.greatest {
            Err(WgError::StaleTimestamp)
        } else if p.last_consumed.is_some_and(|t| now.saturating_duration_since(t) < INITIATION_MIN_INTERVAL) {
            Err(WgError::Flood)
        } else {
            Ok(())
        };
        let mut resp = [0u8; RESPONSE_LEN];
        let got = p.tunnel.consume_initiation(now, &half, &mut resp);
        assert_eq!(got, expect, "node {z} on an initiation from node {author}");
        if got.is_err() {
            if got == Err(WgError::StaleTimestamp) {
                self.tally.stale += 1;
            }
            assert_eq!(self.held(z, author), held, "a refused initiation leaves the sessions as they were");
            return;
        }
        assert_eq!(resp[..4], [2, 0, 0, 0], "a response");
        assert_eq!(resp[8..12], m[4..8], "the response goes to the initiation's sender index");
        let local = le32(&resp[4..8]);
        let resp_eph: [u8; 32] = resp[12..44].try_into().expect("32 bytes");
        p.greatest = ts;
        p.greatest_at = Some(made_at);
        p.last_consumed = Some(now);
        p.sessions.insert(local, (eph, resp_eph));
        p.last_mac1 = resp[RESPONSE_MAC1..RESPONSE_MAC1 + 16].try_into().expect("16 bytes");
        assert!(p.tunnel.keypair(local).is_some(), "the new session is held under its index");
        let body = resp[8..60].try_into().expect("52 bytes");
        self.resps.insert(resp_eph, Resp { author: z, body, answers: eph });
        self.log.push(Datagram { bytes: resp.to_vec(), author: z, to: from_node });
        self.tally.answered += 1;
        self.drain(z, author);
    }

    fn response(&mut self, z: usize, m: &[u8; RESPONSE_LEN]) {
        let now = self.now;
        let receiver = le32(&m[8..12]);
        let Some(j) = self.by_index(z, receiver) else { return };
        let eph: [u8; 32] = m[12..44].try_into().expect("32 bytes");
        let genuine = self.resps.get(&eph).filter(|g| g.body[..] == m[8..60] && g.author == j).map(|g| g.answers);
        let held = self.held(z, j);
        let p = self.peer(z, j);
        let (expect, may) = match (p.pending, genuine) {
            (Pending::Known(l, e), Some(a)) if l == receiver && e == a => (true, true),
            (Pending::Maybe(l, e), Some(a)) if l == receiver && e == a => (false, true),
            _ => (false, false),
        };
        match p.tunnel.consume_response(now, m) {
            Ok(()) => {
                assert!(may, "node {z} took a response that is not the genuine answer to its pending initiation");
                let a = genuine.expect("a genuine response");
                p.sessions.insert(receiver, (a, eph));
                p.pending = Pending::None;
                let cur = p.tunnel.current().expect("a response makes the session current");
                assert_eq!(cur.local_index, receiver, "the new session is current");
                self.tally.sessions += 1;
            }
            Err(e) => {
                assert!(!expect, "node {z} refused the genuine response to its pending initiation: {e:?}");
                if may {
                    p.pending = Pending::None;
                }
                assert_eq!(self.held(z, j), held, "a refused response leaves the sessions as they were");
            }
        }
        self.drain(z, j);
    }

    fn cookie(&mut self, z: usize, m: &[u8; COOKIE_REPLY_LEN]) {
        let now = self.now;
        let receiver = le32(&m[4..8]);
        let Some(j) = self.by_index(z, receiver) else { return };
        let nonce: [u8; 24] = m[8..32].try_into().expect("24 bytes");
        let held = self.held(z, j);
        let p = self.nodes[z].tunnels[j].as_mut().expect("made by held()");
        let genuine = self
            .cookie_replies
            .get(&nonce)
            .is_some_and(|g| g.body[..] == m[8..] && g.author == j && g.aad == p.last_mac1);
        let (pending, maybe) = match p.pending {
            Pending::Known(l, _) => (l == receiver, l == receiver),
            Pending::Maybe(l, _) => (false, l == receiver),
            Pending::None => (false, false),
        };
        let may = genuine && (maybe || p.tunnel.keypair(receiver).is_some());
        match p.tunnel.consume_cookie(now, m) {
            Ok(()) => {
                assert!(may, "node {z} took a cookie reply that is not the genuine answer to its last message");
                self.tally.cookies.1 += 1;
            }
            Err(e) => {
                assert!(!(genuine && pending), "node {z} refused the genuine cookie reply to its initiation: {e:?}")
            }
        }
        assert_eq!(self.held(z, j), held, "a cookie reply changes no session");
        self.drain(z, j);
    }

    fn data(&mut self, z: usize, receiver: u32, counter: u64, sealed: &[u8], b: &[u8]) {
        let now = self.now;
        let Some(j) = self.by_index(z, receiver) else { return };
        let split = self.split_open;
        self.peer(z, j);
        let p = self.nodes[z].tunnels[j].as_mut().expect("made just above");
        let kp = p.tunnel.keypair(receiver).cloned();
        let genuine = self.sealed.get_mut(b);
        let expect = genuine.as_ref().is_some_and(|g| {
            !g.opened
                && kp.as_ref().is_some_and(|k| {
                    p.sessions.get(&receiver) == Some(&g.sid)
                        && now.saturating_duration_since(k.created) < REJECT_AFTER_TIME
                })
        });
        let mut out = vec![0u8; 2048];
        let got = if split {
            match &kp {
                Some(k) => {
                    k.open(counter, sealed, &mut out).and_then(|len| p.tunnel.accept(now, k, counter, len).map(|_| len))
                }
                None => Err(WgError::UnknownIndex),
            }
        } else {
            let Ok(Message::Data(d)) = Message::parse(b) else { unreachable!("parsed before") };
            p.tunnel.decapsulate(now, &d, &mut out)
        };
        match got {
            Ok(len) => {
                let g = genuine.expect("only a genuine data packet opens");
                assert!(expect, "node {z} opened a data packet it should not have (replayed, or not its session)");
                assert_eq!((z, j), (g.to, g.author), "a data packet opens only where it was sent, from its sender");
                if len == 0 {
                    assert!(g.plain.is_empty(), "a keepalive was sealed as one");
                } else {
                    let (n, src) = inner_source(&out[..len]).expect("the packet sent");
                    assert_eq!(out[..n], g.plain[..], "a data packet opens to the exact packet sent");
                    assert_eq!(src, pod_address(j), "from the sender's pods");
                    self.tally.tun += 1;
                }
                g.opened = true;
            }
            Err(e) => assert!(!expect, "node {z} refused a data packet sealed on a session it holds: {e:?}"),
        }
        self.drain(z, j);
    }

    /// On every session a real node holds, a packet to its peer; nobody
    /// has confirmed a session with M.
    fn finish(&mut self) {
        for x in 0..STRANGER {
            for y in 0..STRANGER {
                if x == y || !self.has_current(x, y) {
                    continue;
                }
                let before = self.log.len();
                self.send(x, y, 40);
                let sent: Vec<Datagram> = self.log[before..].iter().filter(|d| d.bytes[0] == 4).cloned().collect();
                for d in sent {
                    self.receive(d.to, d.author, &d.bytes);
                }
            }
        }
        for x in 0..STRANGER {
            assert!(!self.has_current(STRANGER, x), "M confirmed a session with node {x}");
        }
    }
}

/// Whether node `x` has a tunnel to `y`: A, B and C know each other, M
/// knows them, nobody knows M.
fn knows(x: usize, y: usize) -> bool {
    x != y && (x == STRANGER || y != STRANGER)
}

/// Node `x`'s private key.
fn private_key(x: usize) -> [u8; 32] {
    [x as u8 + 1; 32]
}

/// The nodes' public keys, computed once for every run.
fn public_keys() -> &'static [[u8; 32]; NODES] {
    static KEYS: std::sync::OnceLock<[[u8; 32]; NODES]> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| std::array::from_fn(|i| public_key(&private_key(i))))
}

/// Node `j`'s 24-bit tunnel index at every node that knows it: the same at
/// every node, so that a datagram delivered to the wrong node finds a tunnel.
fn tunnel_index(j: usize) -> u32 {
    j as u32 + 1
}

/// The pod address node `x` sends from.
fn pod_address(x: usize) -> IpAddr {
    IpAddr::from([10, 244, x as u8, 2])
}

/// An IPv4/UDP packet from node `x`'s pods to `y`'s, numbered `id`, with
/// `extra` bytes of payload.
fn pod_packet(x: usize, y: usize, id: u16, extra: usize) -> Vec<u8> {
    let len = 28 + extra;
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 244, x as u8, 2]);
    p[16..20].copy_from_slice(&[10, 244, y as u8, 2]);
    p[20..24].copy_from_slice(&[0x9c, 0x40, 0x1b, 0x39]);
    p[24..26].copy_from_slice(&((8 + extra) as u16).to_be_bytes());
    for (i, b) in p[28..].iter_mut().enumerate() {
        *b = (i as u8) ^ (id as u8);
    }
    p
}

/// The TAI64N label an initiation made at `at` carries (WireGuard's: 2^62
/// plus the seconds, and the nanoseconds rounded down to 2^24).
fn tai64n(t0: Instant, at: Instant) -> [u8; 12] {
    let t = WALL + at.saturating_duration_since(t0);
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&((1u64 << 62) + t.as_secs()).to_be_bytes());
    out[8..].copy_from_slice(&(t.subsec_nanos() & !0x00ff_ffff).to_be_bytes());
    out
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("four bytes"))
}

/// BLAKE2s-256 of the parts.
fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        Digest::update(&mut h, p);
    }
    h.finalize().into()
}

/// Keyed BLAKE2s-128 of the parts (WireGuard's MAC).
fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    // Every key here is 16 or 32 bytes, which BLAKE2s takes.
    let mut m = Blake2sMac::<blake2::digest::consts::U16>::new_from_slice(key).expect("a 16- or 32-byte key");
    for p in parts {
        Update::update(&mut m, p);
    }
    m.finalize_fixed().into()
}

/// The cookie in a cookie reply from the node with public key
/// `responder`, answering a message whose mac1 was `aad`.
fn open_cookie(responder: &[u8; 32], reply: &[u8; COOKIE_REPLY_LEN], aad: &[u8; 16]) -> Option<[u8; 16]> {
    let key = hash(&[b"cookie--", responder]);
    let cipher = <XChaCha20Poly1305 as chacha20poly1305::KeyInit>::new((&key).into());
    let mut cookie: [u8; 16] = reply[32..48].try_into().ok()?;
    let nonce: &[u8; 24] = reply[8..32].try_into().ok()?;
    let tag: &[u8; 16] = reply[48..64].try_into().ok()?;
    cipher.decrypt_in_place_detached(nonce.into(), aad, &mut cookie, tag.into()).ok()?;
    Some(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u8 = 0;
    const B: u8 = 1;
    const M: u8 = 3;

    fn send(x: u8, peer: u8) -> [u8; 4] {
        [0, x, peer, 60]
    }
    /// Deliver the k-th newest datagram as sent.
    fn deliver(k: u8) -> [u8; 4] {
        [1, k, 0, 0]
    }
    fn advance(step: u8) -> [u8; 4] {
        [5, step, 0, 0]
    }

    fn input(config: u8, actions: &[[u8; 4]]) -> Vec<u8> {
        let mut v = vec![config];
        v.extend(actions.iter().flatten());
        v
    }

    /// No node under load (every rate limit the default).
    const CALM: u8 = 0x3f;

    /// The hand-written seeds of `fuzz/seeds/wg_handshake/`.
    fn scenarios() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            // A's packet starts a handshake; response; the staged packet; B answers.
            (
                "handshake-and-data",
                input(CALM, &[send(A, 0), deliver(0), deliver(0), deliver(0), send(B, 0), deliver(0)]),
            ),
            // B under load (limit 0): a cookie reply, the retry 5.5 s later carries mac2.
            (
                "cookie-under-load",
                input(
                    0x3f & !0b1100,
                    &[send(A, 0), deliver(0), deliver(0), advance(5), deliver(0), deliver(0), deliver(0)],
                ),
            ),
            // The initiation delivered again after the handshake: stale.
            ("replayed-initiation", input(CALM, &[send(A, 0), deliver(0), deliver(0), deliver(0), deliver(2)])),
            // Forged initiations from A's key to B: equal, older, newer than the one B took.
            (
                "forged-timestamps",
                input(
                    CALM,
                    &[send(A, 0), deliver(0), deliver(0), [4, A, 0, 0], [4, A, 0, 1], advance(2), [4, A, 0, 2]],
                ),
            ),
            // A changed field with a right mac1, then a broken mac1.
            ("mac1-right-and-broken", input(CALM, &[send(A, 0), [3, 0, 3, 7], [3, 0, 0x10, 3], [1, 2, 2, 0]])),
            // Three peers: A with B and C, B's response delivered to C, M to B.
            (
                "three-peers-and-a-stranger",
                input(
                    CALM,
                    &[send(A, 0), send(A, 1), deliver(1), deliver(1), [1, 1, 3, 0], deliver(1), send(M, 1), deliver(0)],
                ),
            ),
            // Timers: a rekey after 121 s, keys zeroed after 541 s.
            (
                "timers",
                input(
                    CALM,
                    &[
                        send(A, 0),
                        deliver(0),
                        deliver(0),
                        deliver(0),
                        advance(10),
                        deliver(1),
                        deliver(0),
                        deliver(0),
                        send(A, 0),
                        deliver(0),
                        advance(12),
                    ],
                ),
            ),
        ]
    }

    #[test]
    fn the_scenarios_get_deep() {
        let t: HashMap<&str, Tally> = scenarios().into_iter().map(|(n, i)| (n, play(&i))).collect();
        let hd = t["handshake-and-data"];
        assert_eq!((hd.answered, hd.sessions, hd.tun), (1, 1, 4), "{hd:?}");
        let cl = t["cookie-under-load"];
        assert_eq!((cl.cookies, cl.sessions), ((1, 1), 1), "{cl:?}");
        assert!(cl.tun >= 1, "{cl:?}");
        assert_eq!(t["replayed-initiation"].stale, 1);
        let ft = t["forged-timestamps"];
        assert_eq!((ft.stale, ft.answered), (2, 2), "equal and older refused, newer answered: {ft:?}");
        assert_eq!(t["mac1-right-and-broken"].mac1, 2, "the broken copy and the original delivered to C");
        let tp = t["three-peers-and-a-stranger"];
        assert!(tp.answered >= 2 && tp.sessions >= 1, "{tp:?}");
        assert!(t["timers"].sessions >= 2, "{:?}", t["timers"]);
    }

    #[test]
    fn the_seed_files_are_the_scenarios() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/wg_handshake");
        for (name, bytes) in scenarios() {
            let path = dir.join(name);
            if std::env::var_os("WEFT_WRITE_SEEDS").is_some() {
                std::fs::write(&path, &bytes).unwrap();
            }
            assert_eq!(std::fs::read(&path).ok(), Some(bytes), "{} (WEFT_WRITE_SEEDS=1 rewrites it)", path.display());
        }
    }
}
