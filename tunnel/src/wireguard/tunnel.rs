//! One peer's protocol state: the handshake, its sessions, staged packets
//! and every timer of the WireGuard paper (section 6), as deadlines.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use x25519_dalek::StaticSecret;

use super::crypto::{self, dh, hash, kdf1, kdf2, kdf3, mac};
use super::identity::{initial_chaining, initial_hash, Identity, InitiationHalf};
use super::keypair::Keypair;
use super::message::{
    le32, Data, COOKIE_REPLY_LEN, INITIATION, INITIATION_LEN, INITIATION_MAC1, RESPONSE, RESPONSE_LEN, RESPONSE_MAC1,
};
use super::{
    WgError, COOKIE_REFRESH_TIME, INITIATION_MIN_INTERVAL, KEEPALIVE_TIMEOUT, LABEL_COOKIE, LABEL_MAC1,
    REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME, REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
};

/// Packets kept while a handshake runs (wireguard-go's `MaxStagedPackets`);
/// the oldest goes when a new one does not fit.
pub const MAX_STAGED: usize = 128;

/// Retries of an unanswered initiation before the handshake is given up:
/// one every [`REKEY_TIMEOUT`] for [`REKEY_ATTEMPT_TIME`].
const MAX_RETRIES: u32 = (REKEY_ATTEMPT_TIME.as_secs() / REKEY_TIMEOUT.as_secs()) as u32;

/// Keys are wiped this long after the last session was made.
const ZERO_KEYS_AFTER: Duration = Duration::from_secs(REJECT_AFTER_TIME.as_secs() * 3);

/// What an initiator keeps between its initiation and the response.
struct Pending {
    local_index: u32,
    chaining: [u8; 32],
    hash: [u8; 32],
    ephemeral: StaticSecret,
}

/// The protocol's timers, each a deadline or off.
#[derive(Debug, Default, Clone)]
struct Timers {
    /// Resend an unanswered initiation.
    retransmit: Option<Instant>,
    /// Retries so far of the current handshake.
    retries: u32,
    /// Answer received data with a keepalive if nothing else went out.
    send_keepalive: Option<Instant>,
    /// More data came while `send_keepalive` was pending: rearm it after.
    another_keepalive: bool,
    /// We sent data and heard nothing: start a new handshake.
    new_handshake: Option<Instant>,
    /// Wipe every key.
    zero_keys: Option<Instant>,
    /// The persistent keepalive.
    persistent: Option<Instant>,
}

/// Counters handed out for sealing a run of packets.
#[derive(Debug, Clone)]
pub struct SendGrant {
    /// The session to seal with.
    pub keypair: Arc<Keypair>,
    /// The first counter; the run takes it and the ones after.
    pub first: u64,
}

/// An opened data packet the peer's state accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// This packet confirmed a new session (staged packets can now go).
    pub confirmed: bool,
}

/// One peer: its handshake, sessions and timers.
pub struct Tunnel {
    identity: Arc<Identity>,
    remote: [u8; 32],
    /// `HASH(LABEL_MAC1 || their key)`: keys mac1 of what we send them.
    remote_mac1_key: [u8; 32],
    /// `HASH(LABEL_COOKIE || their key)`: opens their cookie replies.
    remote_cookie_key: [u8; 32],
    /// `DH(our static, their static)`, `None` for a low-order key.
    static_shared: Option<[u8; 32]>,
    psk: Option<[u8; 32]>,
    keepalive: Option<u16>,
    /// Our 24-bit index of this peer; a session's index adds a low byte.
    index: u32,
    slot: u8,
    pending: Option<Pending>,
    /// The newest timestamp of an initiation from them we accepted.
    greatest_timestamp: [u8; 12],
    last_initiation_consumed: Option<Instant>,
    last_initiation_sent: Option<Instant>,
    /// A cookie from their reply, and when it came.
    cookie: Option<([u8; 16], Instant)>,
    /// mac1 of the last handshake message we sent (a cookie reply's AAD).
    last_mac1: [u8; 16],
    current: Option<Arc<Keypair>>,
    previous: Option<Arc<Keypair>>,
    next: Option<Arc<Keypair>>,
    timers: Timers,
    want_initiation: bool,
    want_keepalive: bool,
    staged: VecDeque<Vec<u8>>,
    spare: Vec<Vec<u8>>,
    last_handshake: Option<Instant>,
    rx_bytes: u64,
    tx_bytes: u64,
}

impl Tunnel {
    /// A peer with static key `remote`, reached as local `index` (24 bits).
    pub fn new(
        identity: Arc<Identity>,
        remote: [u8; 32],
        psk: Option<[u8; 32]>,
        keepalive: Option<u16>,
        index: u32,
    ) -> Tunnel {
        let static_shared = dh(&identity.private, &remote);
        Tunnel {
            identity,
            remote,
            remote_mac1_key: hash(&[LABEL_MAC1, &remote]),
            remote_cookie_key: hash(&[LABEL_COOKIE, &remote]),
            static_shared,
            psk,
            keepalive: keepalive.filter(|k| *k > 0),
            index: index & 0x00ff_ffff,
            slot: 0,
            pending: None,
            greatest_timestamp: [0; 12],
            last_initiation_consumed: None,
            last_initiation_sent: None,
            cookie: None,
            last_mac1: [0; 16],
            current: None,
            previous: None,
            next: None,
            timers: Timers::default(),
            want_initiation: false,
            want_keepalive: false,
            staged: VecDeque::new(),
            spare: Vec::new(),
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    /// The peer's static public key.
    pub fn remote_key(&self) -> [u8; 32] {
        self.remote
    }

    /// Our 24-bit index of the peer.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The preshared key.
    pub fn preshared_key(&self) -> Option<[u8; 32]> {
        self.psk
    }

    /// The persistent keepalive interval in seconds.
    pub fn keepalive(&self) -> Option<u16> {
        self.keepalive
    }

    /// When the last handshake completed.
    pub fn last_handshake(&self) -> Option<Instant> {
        self.last_handshake
    }

    /// Bytes (received, sent) in datagrams of data packets.
    pub fn transfer(&self) -> (u64, u64) {
        (self.rx_bytes, self.tx_bytes)
    }

    /// The current session, if there is one.
    pub fn current(&self) -> Option<&Arc<Keypair>> {
        self.current.as_ref()
    }

    /// Takes a new identity (our private key changed): every session and
    /// handshake made with the old one ends; the next packet handshakes.
    pub fn set_identity(&mut self, identity: Arc<Identity>) {
        self.static_shared = dh(&identity.private, &self.remote);
        self.identity = identity;
        self.clear_sessions();
        self.greatest_timestamp = [0; 12];
        // A new key handshakes at once, not after the last one's REKEY_TIMEOUT.
        self.last_initiation_sent = None;
        self.timers.retransmit = None;
    }

    /// Takes a new preshared key for the handshakes to come.
    pub fn set_preshared_key(&mut self, psk: Option<[u8; 32]>) {
        self.psk = psk;
    }

    /// Sets the persistent keepalive; a new non-zero one sends a keepalive
    /// at once (as wireguard-go does).
    pub fn set_keepalive(&mut self, now: Instant, keepalive: Option<u16>) {
        let keepalive = keepalive.filter(|k| *k > 0);
        if keepalive.is_some() && keepalive != self.keepalive {
            self.want_keepalive = true;
        }
        self.keepalive = keepalive;
        self.timers.persistent = keepalive.map(|k| now + Duration::from_secs(k.into()));
    }

    fn clear_sessions(&mut self) {
        self.current = None;
        self.previous = None;
        self.next = None;
        self.pending = None;
    }

    fn new_local_index(&mut self) -> u32 {
        self.slot = self.slot.wrapping_add(1);
        (self.index << 8) | u32::from(self.slot)
    }

    /// The current session if it may still seal.
    fn sendable(&self, now: Instant) -> Option<&Arc<Keypair>> {
        self.current.as_ref().filter(|k| {
            now.saturating_duration_since(k.created) < REJECT_AFTER_TIME && k.sent() < REJECT_AFTER_MESSAGES
        })
    }

    /// Counters for sealing `n` packets of `bytes` plaintext bytes in all,
    /// and the session to seal them with; `None` without a session, after
    /// which the caller [`Tunnel::stage`]s them.
    pub fn send_grant(&mut self, now: Instant, n: u64, bytes: u64) -> Option<SendGrant> {
        let kp = self.sendable(now)?.clone();
        let Some(first) = kp.reserve(n) else {
            self.initiate(now, false);
            return None;
        };
        self.tx_bytes += bytes + n * super::DATA_OVERHEAD as u64;
        self.on_any_sent(now);
        if bytes > 0 {
            self.on_data_sent(now);
        }
        let age = now.saturating_duration_since(kp.created);
        if first + n >= REKEY_AFTER_MESSAGES || (kp.initiator && age >= REKEY_AFTER_TIME) {
            self.initiate(now, false);
        }
        Some(SendGrant { keypair: kp, first })
    }

    /// Keeps `packet` until a session exists and asks for a handshake.
    pub fn stage(&mut self, now: Instant, packet: &[u8]) {
        if self.staged.len() == MAX_STAGED {
            if let Some(old) = self.staged.pop_front() {
                self.spare.push(old);
            }
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(packet);
        self.staged.push_back(buf);
        self.initiate(now, false);
    }

    /// Packets staged.
    pub fn staged(&self) -> usize {
        self.staged.len()
    }

    /// Seals one packet into `out`: `Some(len)` of the data packet, or
    /// `None` when it was staged for a handshake (drain
    /// [`Tunnel::poll_transmit`]).
    pub fn encapsulate(&mut self, now: Instant, packet: &[u8], mtu: usize, out: &mut [u8]) -> Option<usize> {
        match self.send_grant(now, 1, packet.len() as u64) {
            Some(g) => g.keypair.seal(g.first, packet, mtu, out),
            None => {
                self.stage(now, packet);
                None
            }
        }
    }

    /// Asks for an initiation. A fresh one (not a retry) resets the retry
    /// count and is refused within [`REKEY_TIMEOUT`] of the last one sent.
    fn initiate(&mut self, now: Instant, retry: bool) {
        if !retry {
            if self.last_initiation_sent.is_some_and(|t| now.saturating_duration_since(t) < REKEY_TIMEOUT) {
                return;
            }
            self.timers.retries = 0;
        }
        self.want_initiation = true;
    }

    /// The next datagram the protocol sends on its own, written to `out`
    /// (at least [`INITIATION_LEN`] bytes, and room for a staged packet):
    /// an initiation, a staged packet, or a keepalive. Call until `None`.
    pub fn poll_transmit(&mut self, now: Instant, mtu: usize, out: &mut [u8]) -> Option<usize> {
        if self.want_initiation {
            self.want_initiation = false;
            if let Some(len) = self.write_initiation(now, out) {
                return Some(len);
            }
        }
        if self.sendable(now).is_none() {
            if self.want_keepalive {
                // A keepalive with no session to carry it asks for one
                // (this is how a persistent keepalive opens a NAT path).
                self.want_keepalive = false;
                self.initiate(now, false);
                if self.want_initiation {
                    return self.poll_transmit(now, mtu, out);
                }
            }
            return None;
        }
        if let Some(p) = self.staged.pop_front() {
            let len = self.encapsulate(now, &p, mtu, out);
            self.spare.push(p);
            self.want_keepalive = false;
            return len;
        }
        if self.want_keepalive {
            self.want_keepalive = false;
            return self.encapsulate(now, &[], mtu, out);
        }
        None
    }

    /// The earliest deadline: call [`Tunnel::handle_timeout`] then.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = &self.timers;
        [t.retransmit, t.send_keepalive, t.new_handshake, t.zero_keys, t.persistent].into_iter().flatten().min()
    }

    /// Fires every timer due at `now`; what they want sent is then in
    /// [`Tunnel::poll_transmit`].
    pub fn handle_timeout(&mut self, now: Instant) {
        let due = |t: Option<Instant>| t.is_some_and(|t| t <= now);
        if due(self.timers.retransmit) {
            self.timers.retransmit = None;
            if self.timers.retries >= MAX_RETRIES {
                // Given up: what waited for it is dropped.
                self.pending = None;
                self.spare.extend(self.staged.drain(..));
                if self.timers.zero_keys.is_none() {
                    self.timers.zero_keys = Some(now + ZERO_KEYS_AFTER);
                }
            } else {
                self.timers.retries += 1;
                self.initiate(now, true);
            }
        }
        if due(self.timers.send_keepalive) {
            self.timers.send_keepalive = None;
            if self.sendable(now).is_some() {
                self.want_keepalive = true;
            }
            if std::mem::take(&mut self.timers.another_keepalive) {
                self.timers.send_keepalive = Some(now + KEEPALIVE_TIMEOUT);
            }
        }
        if due(self.timers.new_handshake) {
            self.timers.new_handshake = None;
            self.initiate(now, false);
        }
        if due(self.timers.zero_keys) {
            self.timers.zero_keys = None;
            self.clear_sessions();
            self.spare.extend(self.staged.drain(..));
        }
        if due(self.timers.persistent) {
            self.timers.persistent = None;
            self.want_keepalive = true;
        }
    }

    fn on_any_sent(&mut self, now: Instant) {
        self.timers.send_keepalive = None;
        self.timers.another_keepalive = false;
        self.on_traversal(now);
    }

    fn on_traversal(&mut self, now: Instant) {
        self.timers.persistent = self.keepalive.map(|k| now + Duration::from_secs(k.into()));
    }

    fn on_data_sent(&mut self, now: Instant) {
        if self.timers.new_handshake.is_none() {
            self.timers.new_handshake = Some(now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT);
        }
    }

    fn on_any_received(&mut self, now: Instant) {
        self.timers.new_handshake = None;
        self.on_traversal(now);
    }

    fn on_data_received(&mut self) -> bool {
        if self.timers.send_keepalive.is_none() {
            true
        } else {
            self.timers.another_keepalive = true;
            false
        }
    }

    fn on_handshake_complete(&mut self, now: Instant) {
        self.timers.retransmit = None;
        self.timers.retries = 0;
        self.last_handshake = Some(now);
    }

    fn on_session_derived(&mut self, now: Instant) {
        self.timers.zero_keys = Some(now + ZERO_KEYS_AFTER);
    }

    /// Writes a handshake initiation to `out` and remembers its state.
    fn write_initiation(&mut self, now: Instant, out: &mut [u8]) -> Option<usize> {
        let shared = self.static_shared?;
        let out = out.get_mut(..INITIATION_LEN)?;
        let mut secret = [0u8; 32];
        crypto::random(&mut secret);
        let ephemeral = StaticSecret::from(secret);
        let epub = x25519_dalek::PublicKey::from(&ephemeral).to_bytes();
        let local_index = self.new_local_index();
        out[..4].copy_from_slice(&[INITIATION, 0, 0, 0]);
        out[4..8].copy_from_slice(&local_index.to_le_bytes());
        out[8..40].copy_from_slice(&epub);
        let chaining = kdf1(&initial_chaining(), &epub);
        let h = hash(&[&initial_hash(&self.remote), &epub]);
        let (chaining, key) = kdf2(&chaining, &dh(&ephemeral, &self.remote)?);
        crypto::seal(&key, 0, &self.identity.public_key(), &h, &mut out[40..88]);
        let h = hash(&[&h, &out[40..88]]);
        let (chaining, key) = kdf2(&chaining, &shared);
        crypto::seal(&key, 0, &self.identity.tai64n(now), &h, &mut out[88..116]);
        let h = hash(&[&h, &out[88..116]]);
        self.write_macs(now, out, INITIATION_MAC1);
        self.pending = Some(Pending { local_index, chaining, hash: h, ephemeral });
        self.last_initiation_sent = Some(now);
        let mut jitter = [0u8; 2];
        crypto::random(&mut jitter);
        let jitter = Duration::from_millis(u64::from(u16::from_le_bytes(jitter) % 334));
        self.timers.retransmit = Some(now + REKEY_TIMEOUT + jitter);
        self.on_any_sent(now);
        Some(INITIATION_LEN)
    }

    /// mac1 (keyed with their key) and mac2 (our cookie from them, if fresh).
    fn write_macs(&mut self, now: Instant, msg: &mut [u8], at: usize) {
        let mac1 = mac(&self.remote_mac1_key, &[&msg[..at]]);
        msg[at..at + 16].copy_from_slice(&mac1);
        self.last_mac1 = mac1;
        let mac2 = match self.cookie {
            Some((c, got)) if now.saturating_duration_since(got) < COOKIE_REFRESH_TIME - REKEY_TIMEOUT * 2 => {
                mac(&c, &[&msg[..at + 16]])
            }
            _ => [0; 16],
        };
        msg[at + 16..at + 32].copy_from_slice(&mac2);
    }

    /// Finishes an initiation from this peer (opened by
    /// [`Identity::open_initiation`]) and writes the response to `out`. The
    /// session it makes seals nothing until the peer's first data packet
    /// confirms it.
    pub fn consume_initiation(
        &mut self,
        now: Instant,
        half: &InitiationHalf,
        out: &mut [u8; RESPONSE_LEN],
    ) -> Result<(), WgError> {
        if half.peer != self.remote {
            return Err(WgError::UnknownIndex);
        }
        let shared = self.static_shared.ok_or(WgError::Decrypt)?;
        let (chaining, key) = kdf2(&half.chaining, &shared);
        let mut ts = [0u8; 12];
        if !crypto::open(&key, 0, &half.timestamp, &half.hash, &mut ts) {
            return Err(WgError::Decrypt);
        }
        let h = hash(&[&half.hash, &half.timestamp]);
        if ts <= self.greatest_timestamp {
            return Err(WgError::StaleTimestamp);
        }
        if self.last_initiation_consumed.is_some_and(|t| now.saturating_duration_since(t) < INITIATION_MIN_INTERVAL) {
            return Err(WgError::Flood);
        }
        let mut secret = [0u8; 32];
        crypto::random(&mut secret);
        let ephemeral = StaticSecret::from(secret);
        let epub = x25519_dalek::PublicKey::from(&ephemeral).to_bytes();
        let ee = dh(&ephemeral, &half.ephemeral).ok_or(WgError::Decrypt)?;
        let es = dh(&ephemeral, &self.remote).ok_or(WgError::Decrypt)?;
        self.greatest_timestamp = ts;
        self.last_initiation_consumed = Some(now);
        let local_index = self.new_local_index();
        out[..4].copy_from_slice(&[RESPONSE, 0, 0, 0]);
        out[4..8].copy_from_slice(&local_index.to_le_bytes());
        out[8..12].copy_from_slice(&half.sender.to_le_bytes());
        out[12..44].copy_from_slice(&epub);
        let chaining = kdf1(&chaining, &epub);
        let h = hash(&[&h, &epub]);
        let chaining = kdf1(&chaining, &ee);
        let chaining = kdf1(&chaining, &es);
        let (chaining, t, key) = kdf3(&chaining, &self.psk.unwrap_or([0; 32]));
        let h = hash(&[&h, &t]);
        crypto::seal(&key, 0, &[], &h, &mut out[44..60]);
        self.write_macs(now, out, RESPONSE_MAC1);
        let (recv, send) = kdf2(&chaining, &[]);
        self.next = Some(Arc::new(Keypair::new(send, recv, local_index, half.sender, now, false)));
        self.previous = None;
        self.on_any_received(now);
        self.on_session_derived(now);
        self.on_any_sent(now);
        Ok(())
    }

    /// Takes the response to our initiation: the new session is current
    /// at once; staged packets (or, without any, a keepalive that confirms
    /// the session to the peer) are in [`Tunnel::poll_transmit`].
    pub fn consume_response(&mut self, now: Instant, m: &[u8; RESPONSE_LEN]) -> Result<(), WgError> {
        let receiver = le32(&m[8..12]);
        let p = self.pending.as_ref().filter(|p| p.local_index == receiver).ok_or(WgError::UnknownIndex)?;
        let epub: [u8; 32] = m[12..44].try_into().expect("32 bytes");
        let chaining = kdf1(&p.chaining, &epub);
        let h = hash(&[&p.hash, &epub]);
        let chaining = kdf1(&chaining, &dh(&p.ephemeral, &epub).ok_or(WgError::Decrypt)?);
        let chaining = kdf1(&chaining, &dh(&self.identity.private, &epub).ok_or(WgError::Decrypt)?);
        let (chaining, t, key) = kdf3(&chaining, &self.psk.unwrap_or([0; 32]));
        let h = hash(&[&h, &t]);
        if !crypto::open(&key, 0, &m[44..60], &h, &mut []) {
            return Err(WgError::Decrypt);
        }
        let (send, recv) = kdf2(&chaining, &[]);
        let kp = Arc::new(Keypair::new(send, recv, receiver, le32(&m[4..8]), now, true));
        self.previous = match self.next.take() {
            Some(next) => Some(next),
            None => self.current.take(),
        };
        self.current = Some(kp);
        self.pending = None;
        self.on_any_received(now);
        self.on_handshake_complete(now);
        self.on_session_derived(now);
        if self.staged.is_empty() {
            self.want_keepalive = true;
        }
        Ok(())
    }

    /// Takes a cookie reply to our last handshake message: the retries
    /// that follow carry mac2.
    pub fn consume_cookie(&mut self, now: Instant, m: &[u8; COOKIE_REPLY_LEN]) -> Result<(), WgError> {
        let receiver = le32(&m[4..8]);
        let ours = self.pending.as_ref().is_some_and(|p| p.local_index == receiver)
            || self.next.as_ref().is_some_and(|k| k.local_index == receiver);
        if !ours {
            return Err(WgError::UnknownIndex);
        }
        let nonce: [u8; 24] = m[8..32].try_into().expect("24 bytes");
        let mut cookie = [0u8; 16];
        if !crypto::xopen(&self.remote_cookie_key, &nonce, &m[32..], &self.last_mac1, &mut cookie) {
            return Err(WgError::Decrypt);
        }
        self.cookie = Some((cookie, now));
        Ok(())
    }

    /// The session a data packet names by its receiver index.
    pub fn keypair(&self, receiver: u32) -> Option<&Arc<Keypair>> {
        [&self.current, &self.previous, &self.next].into_iter().flatten().find(|k| k.local_index == receiver)
    }

    /// Takes an opened data packet (`len` bytes of plaintext, 0 for a
    /// keepalive) sealed with `kp` and `counter`: checks the session's age
    /// and replay window, confirms a new session, moves the timers.
    pub fn accept(&mut self, now: Instant, kp: &Arc<Keypair>, counter: u64, len: usize) -> Result<Accepted, WgError> {
        let age = now.saturating_duration_since(kp.created);
        if age >= REJECT_AFTER_TIME {
            return Err(WgError::Expired);
        }
        if !kp.replay.lock().unwrap_or_else(|p| p.into_inner()).accept(counter) {
            return Err(WgError::Replay);
        }
        self.rx_bytes += (len + super::DATA_OVERHEAD) as u64;
        let confirmed = self.next.as_ref().is_some_and(|n| Arc::ptr_eq(n, kp));
        if confirmed {
            self.previous = self.current.take();
            self.current = self.next.take();
            self.on_handshake_complete(now);
        }
        self.on_any_received(now);
        if len > 0 && self.on_data_received() {
            self.timers.send_keepalive = Some(now + KEEPALIVE_TIMEOUT);
        }
        let is_current = self.current.as_ref().is_some_and(|c| Arc::ptr_eq(c, kp));
        if is_current && kp.initiator && age >= REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT {
            self.initiate(now, false);
        }
        Ok(Accepted { confirmed })
    }

    /// Opens and accepts one data packet into `out`; the plaintext's
    /// length (padding included; see [`inner_source`] for the packet's).
    pub fn decapsulate(&mut self, now: Instant, d: &Data<'_>, out: &mut [u8]) -> Result<usize, WgError> {
        let kp = self.keypair(d.receiver).ok_or(WgError::UnknownIndex)?.clone();
        let len = kp.open(d.counter, d.sealed, out)?;
        self.accept(now, &kp, d.counter, len)?;
        Ok(len)
    }
}

/// The length and source address of the IP packet a decrypted plaintext
/// holds (the rest is padding); a keepalive is empty and not asked here.
pub fn inner_source(plain: &[u8]) -> Result<(usize, IpAddr), WgError> {
    match plain.first().map(|b| b >> 4) {
        Some(4) if plain.len() >= 20 => {
            let len = usize::from(u16::from_be_bytes([plain[2], plain[3]]));
            if len < 20 || len > plain.len() {
                return Err(WgError::MalformedInner);
            }
            let src: [u8; 4] = plain[12..16].try_into().expect("four bytes");
            Ok((len, IpAddr::from(src)))
        }
        Some(6) if plain.len() >= 40 => {
            let len = 40 + usize::from(u16::from_be_bytes([plain[4], plain[5]]));
            if len > plain.len() {
                return Err(WgError::MalformedInner);
            }
            let src: [u8; 16] = plain[8..24].try_into().expect("sixteen bytes");
            Ok((len, IpAddr::from(src)))
        }
        _ => Err(WgError::MalformedInner),
    }
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel").field("index", &self.index).field("timers", &self.timers).finish_non_exhaustive()
    }
}
