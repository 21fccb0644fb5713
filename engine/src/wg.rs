//! WireGuard peers over weft-tunnel's sans-IO core.
//!
//! The protocol (handshakes, sessions, timers, cookies) is
//! [`weft_tunnel::wireguard`]'s; what is here is what the engine adds: the
//! clock (`Instant::now()` once per batch, passed in), which peer a
//! datagram belongs to ([`WgIndex`]: the receiver index for responses,
//! cookies and data, the static key inside an initiation), the endpoint a
//! peer roams to (its latest authenticated datagram's source), and one lock
//! per peer, taken once per run of a batch's packets for that peer.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use weft_tunnel::wireguard::{public_key, Identity, Tunnel};

pub use weft_tunnel::wireguard::{DATA_OVERHEAD, HANDSHAKE_RATE_LIMIT};

/// This node's WireGuard identity.
pub struct WgDevice {
    identity: Arc<Identity>,
    /// The timer deadlines of the engine running this device, once it runs.
    timers: Mutex<Option<Arc<Deadlines>>>,
}

impl WgDevice {
    /// A device with private key `private`.
    pub fn new(private: [u8; 32]) -> Self {
        WgDevice::with_identity(|wall| Identity::new(private, wall))
    }

    /// A device whose identity `make` builds from (an instant, the wall
    /// clock at that instant): tests set the handshake rate limit so.
    pub fn with_identity(make: impl FnOnce((Instant, Duration)) -> Identity) -> Self {
        let unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        WgDevice { identity: Arc::new(make((Instant::now(), unix))), timers: Mutex::new(None) }
    }

    /// The engine that runs this device drives its peers' timers by `deadlines`.
    pub(crate) fn attach_timers(&self, deadlines: Arc<Deadlines>) {
        *self.timers.lock().unwrap_or_else(|p| p.into_inner()) = Some(deadlines);
    }

    /// A peer's timers were changed from outside the engine (a keepalive set
    /// through the UAPI, [`WgPeer::reconfigure`]): the worker that drives
    /// them looks at every peer at once.
    pub fn timers_changed(&self) {
        if let Some(d) = &*self.timers.lock().unwrap_or_else(|p| p.into_inner()) {
            d.lower(Some(Instant::now()));
        }
    }

    /// The protocol identity.
    pub fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }

    /// Our public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.identity.public_key()
    }

    /// Our private key (for the UAPI `get`).
    pub fn private_key(&self) -> [u8; 32] {
        self.identity.private_key()
    }

    /// The public key of a private key.
    pub fn public_of(private: [u8; 32]) -> [u8; 32] {
        public_key(&private)
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

/// One WireGuard peer: its protocol state and its current endpoint.
pub struct WgPeer {
    /// The peer's public key.
    pub public_key: [u8; 32],
    /// Our local index for it (unique per device, 24 bits).
    pub index: u32,
    state: Mutex<PeerState>,
}

/// What the peer's lock protects.
pub struct PeerState {
    /// The protocol state.
    pub tunnel: Tunnel,
    /// Where its datagrams go: configured, then roaming.
    pub endpoint: Option<SocketAddr>,
    /// Our address the peer last sent to: replies and data leave from it
    /// (a socket bound to the wildcard address on a multi-homed host).
    pub local: Option<IpAddr>,
    /// The endpoint as last configured (a new configured one overrides roaming).
    pub configured: Option<SocketAddr>,
    /// When the last handshake completed, on the wall clock; kept when the
    /// sessions expire, as `wg show` keeps reporting it.
    last_handshake: Option<SystemTime>,
}

impl PeerState {
    /// The preshared key.
    pub fn preshared_key(&self) -> Option<[u8; 32]> {
        self.tunnel.preshared_key()
    }

    /// The persistent keepalive interval in seconds.
    pub fn keepalive(&self) -> Option<u16> {
        self.tunnel.keepalive()
    }

    /// Follows the peer to `from` (an authenticated datagram came from
    /// there, to our address `local`).
    pub fn roam(&mut self, from: SocketAddr, local: Option<IpAddr>) {
        self.endpoint = Some(from);
        self.local = local;
    }
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
        let mut tunnel = Tunnel::new(device.identity.clone(), public_key, preshared_key, None, index);
        tunnel.set_keepalive(Instant::now(), keepalive);
        WgPeer {
            public_key,
            index,
            state: Mutex::new(PeerState { tunnel, endpoint, local: None, configured: endpoint, last_handshake: None }),
        }
    }

    /// Takes the peer's lock. A worker that panicked while holding it left
    /// a state the protocol can still use, so a poisoned lock is taken anyway.
    pub fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a new preshared key (for the next handshake) and keepalive.
    pub fn reconfigure(&self, preshared_key: Option<[u8; 32]>, keepalive: Option<u16>) {
        let mut st = self.lock();
        st.tunnel.set_preshared_key(preshared_key);
        st.tunnel.set_keepalive(Instant::now(), keepalive);
    }

    /// Takes `device`'s (new) private key; the sessions made with the old
    /// one end, the next packet handshakes again.
    pub fn set_private(&self, device: &WgDevice) {
        self.lock().tunnel.set_identity(device.identity.clone());
    }

    /// Time since the last handshake, bytes sent and received.
    pub fn stats(&self) -> (Option<Duration>, u64, u64) {
        let mut st = self.lock();
        if let Some(at) = st.tunnel.last_handshake() {
            let ago = Instant::now().saturating_duration_since(at);
            st.last_handshake = SystemTime::now().checked_sub(ago);
        }
        let since = st.last_handshake.and_then(|t| SystemTime::now().duration_since(t).ok());
        let (rx, tx) = st.tunnel.transfer();
        (since, tx, rx)
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

/// The earliest WireGuard deadline of all peers, for the worker that
/// drives the timers (the owner, worker 0).
///
/// Any worker that moved a peer's timers under its lock lowers the
/// deadline here; if the owner sleeps past it, it is woken. The owner
/// recomputes the deadline whole on every timer pass, so a deadline that
/// moved later costs it one early wakeup at most.
pub struct Deadlines {
    base: Instant,
    /// Nanoseconds after `base`; `u64::MAX`: none. Read by every worker per
    /// batch, written rarely.
    next: Line,
    /// Until when the owner sleeps (nanoseconds after `base`); 0: awake.
    /// Written by the owner at every wakeup: on a line of its own, so
    /// that it does not pull `next` away from the other workers.
    owner_sleeps: Line,
    owner: Arc<mio::Waker>,
}

/// An atomic alone on its cache line.
#[repr(align(128))]
struct Line(AtomicU64);

impl Deadlines {
    /// Deadlines whose owner is woken through `owner`.
    pub fn new(owner: Arc<mio::Waker>) -> Deadlines {
        // Due at once: the owner's first pass looks at the peers of the
        // first snapshot (a persistent keepalive to start).
        Deadlines { base: Instant::now(), next: Line(AtomicU64::new(0)), owner_sleeps: Line(AtomicU64::new(0)), owner }
    }

    fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Lowers the deadline to `t` and wakes the owner if it sleeps past it.
    pub fn lower(&self, t: Option<Instant>) {
        let Some(t) = t else { return };
        let t = self.nanos(t);
        // Mostly the deadline is no earlier than the one held: a load, and
        // no write to the shared line. (Skipping is what fetch_min would
        // do then; the owner's pass reads the peer after this worker let
        // its lock go.)
        if t >= self.next.0.load(Ordering::SeqCst) {
            return;
        }
        if t < self.next.0.fetch_min(t, Ordering::SeqCst) && t < self.owner_sleeps.0.load(Ordering::SeqCst) {
            let _ = self.owner.wake();
        }
    }

    /// The owner starts a pass: the deadline is rebuilt from the peers.
    pub fn clear(&self) {
        self.next.0.store(u64::MAX, Ordering::SeqCst);
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Instant> {
        let n = self.next.0.load(Ordering::SeqCst);
        (n != u64::MAX).then(|| self.base + Duration::from_nanos(n))
    }

    /// The owner is about to sleep: returns how long it may (`None`: until
    /// woken; no peer has a timer running), after saying so to the other
    /// workers. With no deadline it needs no wakeup of its own: whatever
    /// starts a timer lowers the deadline, which wakes it.
    pub fn sleep_for(&self, now: Instant) -> Option<Duration> {
        self.owner_sleeps.0.store(u64::MAX, Ordering::SeqCst);
        let until = self.next()?;
        self.owner_sleeps.0.store(self.nanos(until).max(1), Ordering::SeqCst);
        Some(until.saturating_duration_since(now))
    }

    /// The owner is awake.
    pub fn awake(&self) {
        self.owner_sleeps.0.store(0, Ordering::SeqCst);
    }
}
