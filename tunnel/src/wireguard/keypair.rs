//! A session's keys: sealing and opening data packets, the send counter and
//! the receive replay window.
//!
//! A [`Keypair`] is shared (`Arc`) by every worker: sealing needs only the
//! key and counters taken in advance with [`Keypair::reserve`], opening
//! only the key, so the ChaCha20-Poly1305 of data packets can run on any
//! core without the peer's lock. The replay window is checked after a packet
//! authenticates, by whoever holds the peer's state ([`super::Tunnel::accept`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

use super::crypto::{nonce, TAG_LEN};
use super::message::{DATA, DATA_HEADER_LEN};
use super::{WgError, REJECT_AFTER_MESSAGES};

/// One session's keys, in both directions.
pub struct Keypair {
    send: LessSafeKey,
    recv: LessSafeKey,
    /// Our index of this session: the peer's data packets carry it.
    pub local_index: u32,
    /// The peer's index of this session: our data packets carry it.
    pub remote_index: u32,
    /// When the handshake that made it completed.
    pub created: Instant,
    /// Whether we initiated the handshake (only the initiator rekeys on age).
    pub initiator: bool,
    next_counter: AtomicU64,
    pub(crate) replay: Mutex<Replay>,
}

impl Keypair {
    pub(crate) fn new(
        send: [u8; 32],
        recv: [u8; 32],
        local_index: u32,
        remote_index: u32,
        created: Instant,
        initiator: bool,
    ) -> Keypair {
        let key = |k: [u8; 32]| LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &k).expect("a 32-byte key"));
        Keypair {
            send: key(send),
            recv: key(recv),
            local_index,
            remote_index,
            created,
            initiator,
            next_counter: AtomicU64::new(0),
            replay: Mutex::new(Replay::default()),
        }
    }

    /// Takes `n` consecutive send counters; the first, or `None` when the
    /// session has sent all it may.
    pub fn reserve(&self, n: u64) -> Option<u64> {
        let first = self.next_counter.fetch_add(n, Ordering::Relaxed);
        (first.checked_add(n)? < REJECT_AFTER_MESSAGES).then_some(first)
    }

    /// Counters taken so far.
    pub fn sent(&self) -> u64 {
        self.next_counter.load(Ordering::Relaxed)
    }

    /// The length of the data packet that carries `len` bytes of packet,
    /// padded to 16 bytes but not beyond `mtu`.
    pub fn sealed_len(len: usize, mtu: usize) -> usize {
        let padded = len.next_multiple_of(16).min(mtu.max(len));
        DATA_HEADER_LEN + padded + TAG_LEN
    }

    /// Seals `packet` with `counter` (from [`Keypair::reserve`]) into `out`
    /// as a data packet; returns its length, or `None` when `out` is too small.
    pub fn seal(&self, counter: u64, packet: &[u8], mtu: usize, out: &mut [u8]) -> Option<usize> {
        out.get_mut(DATA_HEADER_LEN..DATA_HEADER_LEN + packet.len())?.copy_from_slice(packet);
        self.seal_in_place(counter, out, packet.len(), mtu)
    }

    /// Seals in place: `buf` holds `len` bytes of packet at
    /// [`DATA_HEADER_LEN`], and room after them for the padding and the tag;
    /// the data packet's header is written in front. Returns the data
    /// packet's length, or `None` when `buf` is too small.
    pub fn seal_in_place(&self, counter: u64, buf: &mut [u8], len: usize, mtu: usize) -> Option<usize> {
        let total = Self::sealed_len(len, mtu);
        let out = buf.get_mut(..total)?;
        out[..4].copy_from_slice(&[DATA, 0, 0, 0]);
        out[4..8].copy_from_slice(&self.remote_index.to_le_bytes());
        out[8..16].copy_from_slice(&counter.to_le_bytes());
        let (body, tag) = out[DATA_HEADER_LEN..].split_at_mut(total - DATA_HEADER_LEN - TAG_LEN);
        body[len..].fill(0);
        let t = self
            .send
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce(counter)), Aad::empty(), body)
            .ok()?;
        tag.copy_from_slice(t.as_ref());
        Some(total)
    }

    /// Opens a data packet's `sealed` part (ciphertext and tag) with
    /// `counter` into `out`; returns the plaintext's length (padding
    /// included). The replay window is not looked at here.
    pub fn open(&self, counter: u64, sealed: &[u8], out: &mut [u8]) -> Result<usize, WgError> {
        let len = sealed.len().checked_sub(TAG_LEN).ok_or(WgError::Malformed)?;
        let buf = out.get_mut(..sealed.len()).ok_or(WgError::Malformed)?;
        buf.copy_from_slice(sealed);
        self.open_in_place(counter, buf).map(|_| len)
    }

    /// Opens ciphertext and tag where they lie; the plaintext is left at
    /// the start of `buf`.
    pub fn open_in_place(&self, counter: u64, buf: &mut [u8]) -> Result<usize, WgError> {
        self.recv
            .open_in_place(Nonce::assume_unique_for_key(nonce(counter)), Aad::empty(), buf)
            .map(|p| p.len())
            .map_err(|_| WgError::Decrypt)
    }
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keypair")
            .field("local_index", &self.local_index)
            .field("remote_index", &self.remote_index)
            .field("initiator", &self.initiator)
            .finish_non_exhaustive()
    }
}

/// Words of the replay bitmap: 8192 bits, of which the newest word is
/// partly ahead, so 8128 counters behind the greatest are accepted once
/// each (the kernel's and wireguard-go's window, RFC 6479's scheme).
const WORDS: usize = 128;
/// How far behind the greatest counter a packet may be.
pub const REPLAY_WINDOW: u64 = (WORDS as u64 - 1) * 64;

/// Which counters were received: a ring of bit words, the newest holding
/// the greatest counter seen.
#[derive(Debug, Clone)]
pub struct Replay {
    greatest: u64,
    bits: [u64; WORDS],
}

impl Default for Replay {
    fn default() -> Self {
        Replay { greatest: 0, bits: [0; WORDS] }
    }
}

impl Replay {
    /// Marks `counter` received; false if it was before or is too old.
    pub fn accept(&mut self, counter: u64) -> bool {
        if counter >= REJECT_AFTER_MESSAGES {
            return false;
        }
        let word = counter / 64;
        if counter > self.greatest {
            let current = self.greatest / 64;
            let ahead = (word - current).min(WORDS as u64);
            for i in 1..=ahead {
                self.bits[((current + i) % WORDS as u64) as usize] = 0;
            }
            self.greatest = counter;
        } else if self.greatest - counter > REPLAY_WINDOW {
            return false;
        }
        let slot = &mut self.bits[(word % WORDS as u64) as usize];
        let bit = 1u64 << (counter % 64);
        let fresh = *slot & bit == 0;
        *slot |= bit;
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn seal_and_open_round_trip_with_padding() {
        let now = Instant::now();
        let a = Keypair::new([1; 32], [2; 32], 10, 20, now, true);
        let b = Keypair::new([2; 32], [1; 32], 20, 10, now, false);
        let packet = [0x45u8; 21];
        let mut out = [0u8; 128];
        let len = a.seal(5, &packet, 1420, &mut out).unwrap();
        assert_eq!(len, 16 + 32 + 16, "padded to 16");
        assert_eq!(super::super::message::le32(&out[4..8]), 20, "the peer's index");
        let mut plain = [0u8; 128];
        let n = b.open(5, &out[16..len], &mut plain).unwrap();
        assert_eq!(&plain[..21], &packet);
        assert!(plain[21..n].iter().all(|b| *b == 0));
        assert_eq!(b.open(6, &out[16..len], &mut plain), Err(WgError::Decrypt), "another counter");
        assert_eq!(Keypair::sealed_len(1419, 1420), 16 + 1420 + 16, "padding stops at the MTU");
        assert_eq!(Keypair::sealed_len(0, 1420), 32, "a keepalive");
    }

    #[test]
    fn sealing_in_place_makes_the_same_bytes_as_sealing_a_copy() {
        let a = Keypair::new([7; 32], [8; 32], 1, 2, Instant::now(), true);
        for len in [0usize, 1, 15, 16, 17, 1400, 1419] {
            let packet: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut copied = vec![0u8; 1500];
            let n = a.seal(9, &packet, 1420, &mut copied).unwrap();
            // Garbage after the packet must not leak into the padding.
            let mut buf = vec![0xAAu8; 1500];
            buf[16..16 + len].copy_from_slice(&packet);
            assert_eq!(a.seal_in_place(9, &mut buf, len, 1420), Some(n), "length {len}");
            assert_eq!(&buf[..n], &copied[..n], "length {len}");
        }
        assert_eq!(a.seal_in_place(0, &mut [0u8; 40], 20, 1420), None, "no room for padding and tag");
    }

    #[test]
    fn counters_are_taken_once_each() {
        let k = Keypair::new([1; 32], [2; 32], 1, 2, Instant::now(), true);
        assert_eq!(k.reserve(3), Some(0));
        assert_eq!(k.reserve(1), Some(3));
        assert_eq!(k.sent(), 4);
    }

    /// The window against a brute-force set of every counter seen.
    #[test]
    fn replay_window_matches_a_model() {
        let seed: u64 = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut w = Replay::default();
        let mut seen = std::collections::HashSet::new();
        let mut greatest = 0u64;
        for _ in 0..40_000 {
            let c = if rng.gen_bool(0.1) {
                greatest + rng.gen_range(0..20_000)
            } else {
                greatest.saturating_sub(rng.gen_range(0..9_000))
            };
            let expect = !seen.contains(&c) && (c >= greatest || greatest - c <= REPLAY_WINDOW);
            assert_eq!(w.accept(c), expect, "seed {seed}: counter {c}, greatest {greatest}");
            if expect {
                seen.insert(c);
                greatest = greatest.max(c);
            }
        }
    }

    #[test]
    fn the_first_counter_is_zero_and_the_last_ones_are_refused() {
        let mut w = Replay::default();
        assert!(w.accept(0));
        assert!(!w.accept(0));
        assert!(!w.accept(REJECT_AFTER_MESSAGES));
    }
}
