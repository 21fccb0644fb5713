//! WireGuard peers over boringtun's Noise implementation.
//!
//! boringtun does the cryptography and the protocol state of one peer per
//! `Tunn`; everything around it is ours: which peer a datagram belongs to
//! (the receiver index for data, handshake responses and cookies, the static
//! key inside a handshake initiation), the handshake rate limit shared by
//! all peers (cookie replies under load), roaming (a peer's endpoint follows
//! its latest authenticated datagram), and the allowed-IPs check on what a
//! peer may inject. One lock per peer; workers take it per packet.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// Handshake initiations per second answered without a cookie, device-wide
/// (boringtun's device uses the same figure).
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Bytes of WireGuard overhead per data packet (header 16 + tag 16); with
/// the outer IP and UDP headers Flannel counts 80 in all.
pub const DATA_OVERHEAD: usize = 32;

/// This node's WireGuard identity.
pub struct WgDevice {
    private: StaticSecret,
    public: PublicKey,
    /// Shared by all peers: counts handshakes, answers cookies under load.
    pub rate_limiter: Arc<RateLimiter>,
}

impl WgDevice {
    /// A device with private key `private`.
    pub fn new(private: [u8; 32]) -> Self {
        let private = StaticSecret::from(private);
        let public = PublicKey::from(&private);
        let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        WgDevice { private, public, rate_limiter }
    }

    /// Our public key.
    pub fn public_key(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    /// Our private key (for the UAPI `get`).
    pub fn private_key(&self) -> [u8; 32] {
        self.private.to_bytes()
    }

    /// The public key of a private key.
    pub fn public_of(private: [u8; 32]) -> [u8; 32] {
        *PublicKey::from(&StaticSecret::from(private)).as_bytes()
    }

    /// Which peer a datagram is for: `Ok(Index(i))` carries the receiver
    /// index of a response, cookie or data packet; `Ok(Key(k))` the sender's
    /// static key from an initiation (after the MAC and load checks);
    /// `Err(Some(reply))` a cookie reply to send back instead; `Err(None)`
    /// a datagram to drop.
    pub fn classify<'a>(
        &self,
        src: IpAddr,
        datagram: &[u8],
        cookie: &'a mut [u8],
    ) -> Result<PeerRef, Option<&'a [u8]>> {
        match self.rate_limiter.verify_packet(Some(src), datagram, cookie) {
            Ok(Packet::HandshakeInit(init)) => parse_handshake_anon(&self.private, &self.public, &init)
                .map(|half| PeerRef::Key(half.peer_static_public))
                .map_err(|_| None),
            Ok(Packet::HandshakeResponse(p)) => Ok(PeerRef::Index(p.receiver_idx >> 8)),
            Ok(Packet::PacketCookieReply(p)) => Ok(PeerRef::Index(p.receiver_idx >> 8)),
            Ok(Packet::PacketData(p)) => Ok(PeerRef::Index(p.receiver_idx >> 8)),
            Err(TunnResult::WriteToNetwork(reply)) => Err(Some(reply)),
            Err(_) => Err(None),
        }
    }
}

/// How a datagram names its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRef {
    /// Our local index of the peer (the receiver index without its low byte).
    Index(u32),
    /// The peer's static public key.
    Key([u8; 32]),
}

/// One WireGuard peer: its session state and its current endpoint.
pub struct WgPeer {
    /// The peer's public key.
    pub public_key: [u8; 32],
    /// Our local index for it (unique per device).
    pub index: u32,
    state: Mutex<PeerState>,
}

/// What the peer's lock protects.
pub struct PeerState {
    /// boringtun's protocol state.
    pub tunn: Tunn,
    /// Where its datagrams go: configured, then roaming.
    pub endpoint: Option<SocketAddr>,
    /// Our address the peer last sent to: replies and data leave from it
    /// (a socket bound to the wildcard address on a multi-homed host).
    pub local: Option<std::net::IpAddr>,
    /// The endpoint as last configured (a new configured one overrides roaming).
    pub configured: Option<SocketAddr>,
    /// Keepalive interval, as configured.
    pub keepalive: Option<u16>,
    /// Preshared key, as configured.
    pub preshared_key: Option<[u8; 32]>,
    /// Bytes (received, sent) counted by session states this one replaced.
    carried: (u64, u64),
}

impl WgPeer {
    /// A peer of `device` with local `index`.
    pub fn new(
        device: &WgDevice,
        public_key: [u8; 32],
        preshared_key: Option<[u8; 32]>,
        keepalive: Option<u16>,
        index: u32,
        endpoint: Option<SocketAddr>,
    ) -> Self {
        let tunn = Tunn::new(
            device.private.clone(),
            PublicKey::from(public_key),
            preshared_key,
            keepalive.filter(|k| *k > 0),
            index,
            Some(device.rate_limiter.clone()),
        );
        WgPeer {
            public_key,
            index,
            state: Mutex::new(PeerState {
                tunn,
                endpoint,
                local: None,
                configured: endpoint,
                keepalive,
                preshared_key,
                carried: (0, 0),
            }),
        }
    }

    /// Takes the peer's lock. A worker that panicked while holding it left
    /// a state boringtun can still use, so a poisoned lock is taken anyway.
    pub fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the session state with one for a new preshared key or
    /// keepalive (boringtun fixes both at creation); the next packet
    /// handshakes again. The transfer counters carry over.
    pub fn reconfigure(&self, device: &WgDevice, preshared_key: Option<[u8; 32]>, keepalive: Option<u16>) {
        let mut st = self.lock();
        let (_, tx, rx, _, _) = st.tunn.stats();
        st.carried.0 += rx as u64;
        st.carried.1 += tx as u64;
        st.tunn = Tunn::new(
            device.private.clone(),
            PublicKey::from(self.public_key),
            preshared_key,
            keepalive.filter(|k| *k > 0),
            self.index,
            Some(device.rate_limiter.clone()),
        );
        st.preshared_key = preshared_key;
        st.keepalive = keepalive;
    }

    /// Takes `device`'s (new) private key; the sessions made with the old
    /// one end, the next packet handshakes again.
    pub fn set_private(&self, device: &WgDevice) {
        self.lock().tunn.set_static_private(device.private.clone(), device.public, Some(device.rate_limiter.clone()));
    }

    /// Time since the last handshake, bytes sent and received.
    pub fn stats(&self) -> (Option<Duration>, u64, u64) {
        let st = self.lock();
        let (since, tx, rx, _, _) = st.tunn.stats();
        (since, st.carried.1 + tx as u64, st.carried.0 + rx as u64)
    }
}

impl std::fmt::Debug for WgPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgPeer").field("index", &self.index).finish_non_exhaustive()
    }
}

/// Index of peers by local index and by key.
#[derive(Debug, Default)]
pub struct WgIndex {
    by_index: HashMap<u32, usize>,
    by_key: HashMap<[u8; 32], usize>,
}

impl WgIndex {
    /// Indexes `peers` (position `i` holds the WireGuard state of peer `i`).
    pub fn new<'a>(peers: impl Iterator<Item = Option<&'a Arc<WgPeer>>>) -> Self {
        let mut idx = WgIndex::default();
        for (i, p) in peers.enumerate() {
            if let Some(p) = p {
                idx.by_index.insert(p.index, i);
                idx.by_key.insert(p.public_key, i);
            }
        }
        idx
    }

    /// The peer a datagram names.
    pub fn find(&self, r: PeerRef) -> Option<usize> {
        match r {
            PeerRef::Index(i) => self.by_index.get(&i).copied(),
            PeerRef::Key(k) => self.by_key.get(&k).copied(),
        }
    }
}

/// Result of feeding a datagram to a peer.
pub enum Decrypted<'a> {
    /// Send these bytes back to the sender (handshake response, cookie).
    Reply(&'a [u8]),
    /// An inner packet from the peer, with its source address.
    Packet(&'a [u8], IpAddr),
    /// Nothing to do (keepalive, handshake completion).
    Nothing,
    /// Refused by the protocol.
    Refused,
}

/// Maps boringtun's decapsulation result.
pub fn decrypted(r: TunnResult<'_>) -> Decrypted<'_> {
    match r {
        TunnResult::Done => Decrypted::Nothing,
        TunnResult::WriteToNetwork(b) => Decrypted::Reply(b),
        TunnResult::WriteToTunnelV4(b, a) => Decrypted::Packet(b, IpAddr::V4(a)),
        TunnResult::WriteToTunnelV6(b, a) => Decrypted::Packet(b, IpAddr::V6(a)),
        TunnResult::Err(_) => Decrypted::Refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> [u8; 32] {
        [b; 32]
    }

    /// Two devices handshake and exchange a packet in memory.
    #[test]
    fn two_peers_handshake_and_exchange_a_packet() {
        let (a, b) = (WgDevice::new(key(1)), WgDevice::new(key(2)));
        let a_to_b = WgPeer::new(&a, b.public_key(), None, None, 7, None);
        let b_to_a = WgPeer::new(&b, a.public_key(), None, None, 9, None);
        let index_b = WgIndex::new([Some(&Arc::new(b_to_a))].into_iter());
        let src_a: IpAddr = "192.168.77.1".parse().unwrap();
        let mut inner = vec![0u8; 40];
        inner[0] = 0x45;
        inner[2..4].copy_from_slice(&40u16.to_be_bytes());
        inner[12..16].copy_from_slice(&[10, 244, 1, 2]);
        inner[16..20].copy_from_slice(&[10, 244, 2, 2]);

        // A's first packet is queued and a handshake initiation goes out.
        let mut out = vec![0u8; 2048];
        let init = match a_to_b.lock().tunn.encapsulate(&inner, &mut out) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("expected an initiation"),
        };
        let mut cookie = [0u8; 64];
        let who = b.classify(src_a, &init, &mut cookie).unwrap();
        assert_eq!(who, PeerRef::Key(a.public_key()), "initiation names its sender's key");
        let peer_b = index_b.find(who).unwrap();
        assert_eq!(peer_b, 0);
        let b_peer = WgPeer::new(&b, a.public_key(), None, None, 9, None);
        let resp = match decrypted(b_peer.lock().tunn.decapsulate(Some(src_a), &init, &mut out)) {
            Decrypted::Reply(r) => r.to_vec(),
            _ => panic!("expected a response"),
        };
        // A gets the response, then flushes its queued packet.
        let mut out2 = vec![0u8; 2048];
        let mut g = a_to_b.lock();
        assert!(matches!(
            decrypted(g.tunn.decapsulate(None, &resp, &mut out2)),
            Decrypted::Reply(_) | Decrypted::Nothing
        ));
        let data = match g.tunn.decapsulate(None, &[], &mut out2) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("the queued packet goes out after the handshake"),
        };
        drop(g);
        assert_eq!(b.classify(src_a, &data, &mut cookie).unwrap(), PeerRef::Index(9));
        match decrypted(b_peer.lock().tunn.decapsulate(Some(src_a), &data, &mut out)) {
            Decrypted::Packet(p, src) => {
                assert_eq!(p, &inner[..]);
                assert_eq!(src, IpAddr::from([10, 244, 1, 2]));
            }
            _ => panic!("expected the inner packet"),
        }
        assert!(b_peer.stats().0.is_some(), "a handshake happened");
    }

    #[test]
    fn garbage_is_dropped_without_a_reply() {
        let d = WgDevice::new(key(3));
        let mut cookie = [0u8; 64];
        for len in [0, 1, 4, 31, 32, 148, 1000] {
            let junk = vec![0x01u8; len];
            assert!(matches!(d.classify("10.0.0.1".parse().unwrap(), &junk, &mut cookie), Err(None)), "len {len}");
        }
    }
}
