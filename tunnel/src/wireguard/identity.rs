//! This node's WireGuard identity: the static key pair, the MAC and cookie
//! checks every handshake message passes before any DH is spent on it, and
//! the first half of opening an initiation (which names its sender).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use x25519_dalek::StaticSecret;

use super::crypto::{self, hash, kdf1, kdf2, mac, mac_eq};
use super::message::{le32, Message, COOKIE_REPLY, COOKIE_REPLY_LEN, INITIATION_LEN, INITIATION_MAC1, RESPONSE_MAC1};
use super::{WgError, COOKIE_REFRESH_TIME, LABEL_COOKIE, LABEL_MAC1};

/// Handshake messages per second a node answers without asking for a
/// cookie (boringtun's figure; wireguard-go uses a queue depth instead).
pub const HANDSHAKE_RATE_LIMIT: u32 = 100;

/// `HASH(CONSTRUCTION)`, the first chaining key.
pub(crate) fn initial_chaining() -> [u8; 32] {
    hash(&[b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"])
}

/// `HASH(HASH(CONSTRUCTION) || IDENTIFIER || responder's static public key)`.
pub(crate) fn initial_hash(responder: &[u8; 32]) -> [u8; 32] {
    let h = hash(&[&initial_chaining(), b"WireGuard v1 zx2c4 Jason@zx2c4.com"]);
    hash(&[&h, responder])
}

/// Our static key pair and what is derived from it once.
pub struct Identity {
    pub(crate) private: StaticSecret,
    public: [u8; 32],
    /// `HASH(LABEL_MAC1 || our public key)`: checks mac1 of what we receive.
    mac1_key: [u8; 32],
    /// `HASH(LABEL_COOKIE || our public key)`: seals our cookie replies.
    cookie_key: [u8; 32],
    /// Initial chaining key and hash of initiations to us.
    hash0: [u8; 32],
    /// A monotonic instant and the wall-clock time (since the Unix epoch)
    /// at that instant: initiations carry a TAI64N timestamp derived from
    /// the `now` they are given, without reading a clock.
    wall: (Instant, Duration),
    /// Handshake messages in the current one-second window.
    load: Mutex<(Instant, u32)>,
    /// The secret cookies are made from, and when it was made.
    cookie_secret: Mutex<([u8; 32], Instant)>,
    /// Handshake messages per second answered without a cookie.
    rate_limit: u32,
}

/// An initiation opened as far as our static key allows: who sent it and
/// the handshake state to finish with that peer's [`super::Tunnel`].
pub struct InitiationHalf {
    /// The initiator's static public key.
    pub peer: [u8; 32],
    pub(crate) sender: u32,
    pub(crate) ephemeral: [u8; 32],
    pub(crate) chaining: [u8; 32],
    pub(crate) hash: [u8; 32],
    pub(crate) timestamp: [u8; 28],
}

impl Identity {
    /// An identity with `private`; `wall` pairs an instant with the
    /// wall-clock time since the Unix epoch at that instant.
    pub fn new(private: [u8; 32], wall: (Instant, Duration)) -> Identity {
        let public = crypto::public_key(&private);
        let mut secret = [0u8; 32];
        crypto::random(&mut secret);
        Identity {
            private: StaticSecret::from(private),
            public,
            mac1_key: hash(&[LABEL_MAC1, &public]),
            cookie_key: hash(&[LABEL_COOKIE, &public]),
            hash0: initial_hash(&public),
            wall,
            load: Mutex::new((wall.0, 0)),
            cookie_secret: Mutex::new((secret, wall.0)),
            rate_limit: HANDSHAKE_RATE_LIMIT,
        }
    }

    /// The same identity answering only `limit` handshakes a second
    /// without a cookie (tests of the cookie path).
    pub fn with_rate_limit(mut self, limit: u32) -> Identity {
        self.rate_limit = limit;
        self
    }

    /// Our public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// Our private key.
    pub fn private_key(&self) -> [u8; 32] {
        self.private.to_bytes()
    }

    /// The TAI64N label of `now`: seconds since 1970 plus 2^62, and
    /// nanoseconds rounded down to 2^24 ns (as wireguard-go does, so that
    /// the timestamp says little about the clock).
    pub(crate) fn tai64n(&self, now: Instant) -> [u8; 12] {
        let t = self.wall.1 + now.saturating_duration_since(self.wall.0);
        let mut out = [0u8; 12];
        out[..8].copy_from_slice(&((1u64 << 62) + t.as_secs()).to_be_bytes());
        out[8..].copy_from_slice(&(t.subsec_nanos() & !0x00ff_ffff).to_be_bytes());
        out
    }

    /// Checks a handshake message's macs. mac1 must be right (keyed with
    /// our public key); under load mac2 must carry a cookie for `from`, and
    /// without one a cookie reply is written to `reply`: `Err(Cookie(n))`.
    pub fn check_macs(
        &self,
        now: Instant,
        from: SocketAddr,
        msg: &Message<'_>,
        reply: &mut [u8; COOKIE_REPLY_LEN],
    ) -> Result<(), WgError> {
        let (bytes, at): (&[u8], usize) = match msg {
            Message::Initiation(m) => (&m[..], INITIATION_MAC1),
            Message::Response(m) => (&m[..], RESPONSE_MAC1),
            _ => return Ok(()),
        };
        if !mac_eq(&mac(&self.mac1_key, &[&bytes[..at]]), &bytes[at..at + 16]) {
            return Err(WgError::Mac1);
        }
        if !self.under_load(now) {
            return Ok(());
        }
        let cookie = self.cookie(now, from);
        if mac_eq(&mac(&cookie, &[&bytes[..at + 16]]), &bytes[at + 16..at + 32]) {
            return Ok(());
        }
        // The reply goes to the message's sender index.
        reply[..4].copy_from_slice(&[COOKIE_REPLY, 0, 0, 0]);
        reply[4..8].copy_from_slice(&bytes[4..8]);
        let mut nonce = [0u8; 24];
        crypto::random(&mut nonce);
        reply[8..32].copy_from_slice(&nonce);
        crypto::xseal(&self.cookie_key, &nonce, &cookie, &bytes[at..at + 16], &mut reply[32..]);
        Err(WgError::Cookie)
    }

    /// Counts a handshake message; true when more than the rate limit came
    /// in the current second.
    fn under_load(&self, now: Instant) -> bool {
        let mut l = self.load.lock().unwrap_or_else(|p| p.into_inner());
        if now.saturating_duration_since(l.0) >= Duration::from_secs(1) {
            *l = (now, 0);
        }
        l.1 = l.1.saturating_add(1);
        l.1 > self.rate_limit
    }

    /// The cookie of `from`: MAC of its address and port under a secret
    /// that changes every two minutes.
    fn cookie(&self, now: Instant, from: SocketAddr) -> [u8; 16] {
        let mut s = self.cookie_secret.lock().unwrap_or_else(|p| p.into_inner());
        if now.saturating_duration_since(s.1) >= COOKIE_REFRESH_TIME {
            crypto::random(&mut s.0);
            s.1 = now;
        }
        let port = from.port().to_be_bytes();
        match from.ip() {
            std::net::IpAddr::V4(a) => mac(&s.0, &[&a.octets(), &port]),
            std::net::IpAddr::V6(a) => mac(&s.0, &[&a.octets(), &port]),
        }
    }

    /// Opens an initiation's ephemeral and static fields: who sent it.
    /// Its macs must have been checked first.
    pub fn open_initiation(&self, m: &[u8; INITIATION_LEN]) -> Result<InitiationHalf, WgError> {
        let ephemeral: [u8; 32] = m[8..40].try_into().expect("32 bytes");
        let chaining = kdf1(&initial_chaining(), &ephemeral);
        let h = hash(&[&self.hash0, &ephemeral]);
        let shared = crypto::dh(&self.private, &ephemeral).ok_or(WgError::Decrypt)?;
        let (chaining, key) = kdf2(&chaining, &shared);
        let mut peer = [0u8; 32];
        if !crypto::open(&key, 0, &m[40..88], &h, &mut peer) {
            return Err(WgError::Decrypt);
        }
        let h = hash(&[&h, &m[40..88]]);
        Ok(InitiationHalf {
            peer,
            sender: le32(&m[4..8]),
            ephemeral,
            chaining,
            hash: h,
            timestamp: m[88..116].try_into().expect("28 bytes"),
        })
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}
