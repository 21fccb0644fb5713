//! The primitives of WireGuard's Noise_IKpsk2 construction, on maintained
//! crates: BLAKE2s (`blake2`) for HASH, MAC and HMAC, ChaCha20-Poly1305 and
//! XChaCha20-Poly1305 (`chacha20poly1305`) for the handshake and cookie
//! AEADs, X25519 (`x25519-dalek`) for DH. Data packets use `ring`'s
//! ChaCha20-Poly1305 instead (see `keypair.rs`): the same construction with
//! assembly that is about twice as fast on x86-64 and aarch64.

use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
use hmac::SimpleHmac;

/// Length of an AEAD tag.
pub const TAG_LEN: usize = 16;

type Mac128 = Blake2sMac<blake2::digest::consts::U16>;

/// HASH(parts...): BLAKE2s-256 of the concatenation.
pub fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        Digest::update(&mut h, p);
    }
    h.finalize().into()
}

/// MAC(key, parts...): keyed BLAKE2s with a 16-byte output.
pub fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    // BLAKE2s takes keys of 1 to 32 bytes; every key here is 16 or 32.
    let mut m = Mac128::new_from_slice(key).expect("a MAC key is 16 or 32 bytes");
    for p in parts {
        Update::update(&mut m, p);
    }
    m.finalize_fixed().into()
}

/// HMAC-BLAKE2s-256(key, parts...).
fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length.
    let mut m = <SimpleHmac<Blake2s256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        Update::update(&mut m, p);
    }
    m.finalize_fixed().into()
}

/// KDF1: the new chaining key.
pub fn kdf1(chaining: &[u8; 32], input: &[u8]) -> [u8; 32] {
    let t0 = hmac(chaining, &[input]);
    hmac(&t0, &[&[1]])
}

/// KDF2: the new chaining key and one key.
pub fn kdf2(chaining: &[u8; 32], input: &[u8]) -> ([u8; 32], [u8; 32]) {
    let t0 = hmac(chaining, &[input]);
    let t1 = hmac(&t0, &[&[1]]);
    let t2 = hmac(&t0, &[&t1, &[2]]);
    (t1, t2)
}

/// KDF3: the new chaining key and two more values.
pub fn kdf3(chaining: &[u8; 32], input: &[u8]) -> ([u8; 32], [u8; 32], [u8; 32]) {
    let t0 = hmac(chaining, &[input]);
    let t1 = hmac(&t0, &[&[1]]);
    let t2 = hmac(&t0, &[&t1, &[2]]);
    let t3 = hmac(&t0, &[&t2, &[3]]);
    (t1, t2, t3)
}

/// The 96-bit nonce of a counter: four zero bytes, then the counter in
/// little-endian order.
pub fn nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

/// AEAD(key, counter, plain, aad) into `out` (`plain.len() + 16` bytes).
pub fn seal(key: &[u8; 32], counter: u64, plain: &[u8], aad: &[u8], out: &mut [u8]) {
    let (body, tag) = out.split_at_mut(plain.len());
    body.copy_from_slice(plain);
    let cipher = ChaCha20Poly1305::new(key.into());
    // Encryption fails only for messages over 256 GiB.
    let t = cipher.encrypt_in_place_detached(&nonce(counter).into(), aad, body).expect("handshake fields are short");
    tag[..TAG_LEN].copy_from_slice(&t);
}

/// Opens AEAD(key, counter, ..., aad) from `sealed` into `out`
/// (`sealed.len() - 16` bytes); false if it does not authenticate.
#[must_use]
pub fn open(key: &[u8; 32], counter: u64, sealed: &[u8], aad: &[u8], out: &mut [u8]) -> bool {
    let Some(len) = sealed.len().checked_sub(TAG_LEN) else { return false };
    let (body, tag) = sealed.split_at(len);
    out[..len].copy_from_slice(body);
    let cipher = ChaCha20Poly1305::new(key.into());
    cipher.decrypt_in_place_detached(&nonce(counter).into(), aad, &mut out[..len], tag.into()).is_ok()
}

/// XAEAD(key, nonce, plain, aad) into `out` (cookie replies).
pub fn xseal(key: &[u8; 32], nonce: &[u8; 24], plain: &[u8], aad: &[u8], out: &mut [u8]) {
    let (body, tag) = out.split_at_mut(plain.len());
    body.copy_from_slice(plain);
    let cipher = XChaCha20Poly1305::new(key.into());
    let t = cipher.encrypt_in_place_detached(nonce.into(), aad, body).expect("a cookie is short");
    tag[..TAG_LEN].copy_from_slice(&t);
}

/// Opens XAEAD(key, nonce, ..., aad) from `sealed` into `out`.
#[must_use]
pub fn xopen(key: &[u8; 32], nonce: &[u8; 24], sealed: &[u8], aad: &[u8], out: &mut [u8]) -> bool {
    let Some(len) = sealed.len().checked_sub(TAG_LEN) else { return false };
    let (body, tag) = sealed.split_at(len);
    out[..len].copy_from_slice(body);
    let cipher = XChaCha20Poly1305::new(key.into());
    cipher.decrypt_in_place_detached(nonce.into(), aad, &mut out[..len], tag.into()).is_ok()
}

/// X25519 DH of a private key and a public key. An all-zero result (a
/// low-order public key) is refused, as WireGuard requires.
pub fn dh(private: &x25519_dalek::StaticSecret, public: &[u8; 32]) -> Option<[u8; 32]> {
    let shared = private.diffie_hellman(&x25519_dalek::PublicKey::from(*public));
    shared.was_contributory().then(|| shared.to_bytes())
}

/// The public key of a private key.
pub fn public_key(private: &[u8; 32]) -> [u8; 32] {
    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*private)).to_bytes()
}

/// Constant-time equality of two MACs.
pub fn mac_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Fills `out` with random bytes from the operating system.
///
/// The cores take no clock, but they do take randomness (ephemeral keys,
/// indices, cookie secrets, jitter): a `getrandom` call is no I/O a test
/// has to stand in for, and a failure of the kernel's RNG leaves nothing
/// safe to do but stop.
pub fn random(out: &mut [u8]) {
    getrandom::fill(out).expect("the operating system's random number generator failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BLAKE2s-256 of "abc" (RFC 7693 appendix B).
    #[test]
    fn hash_matches_rfc_7693() {
        let h = hash(&[b"ab", b"c"]);
        assert_eq!(hex(&h), "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982");
    }

    /// HMAC-BLAKE2s computed as the HMAC definition says, from the hash.
    #[test]
    fn hmac_follows_its_definition() {
        let key = [7u8; 32];
        let data = b"weft";
        let mut k = [0u8; 64];
        k[..32].copy_from_slice(&key);
        let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
        let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
        let inner = hash(&[&ipad, data]);
        let outer = hash(&[&opad, &inner]);
        assert_eq!(hmac(&key, &[data]), outer);
    }

    #[test]
    fn aead_round_trips_and_refuses_a_flipped_bit() {
        let key = [9u8; 32];
        let mut sealed = [0u8; 20];
        seal(&key, 3, b"ping", b"aad", &mut sealed);
        let mut out = [0u8; 4];
        assert!(open(&key, 3, &sealed, b"aad", &mut out));
        assert_eq!(&out, b"ping");
        assert!(!open(&key, 4, &sealed, b"aad", &mut out), "another counter");
        assert!(!open(&key, 3, &sealed, b"aaD", &mut out), "another aad");
        sealed[0] ^= 1;
        assert!(!open(&key, 3, &sealed, b"aad", &mut out), "a flipped bit");
        assert!(!open(&key, 3, &sealed[..15], b"aad", &mut out), "shorter than a tag");
    }

    #[test]
    fn a_low_order_point_gives_no_shared_secret() {
        let private = x25519_dalek::StaticSecret::from([5u8; 32]);
        assert!(dh(&private, &[0u8; 32]).is_none());
        assert!(dh(&private, &public_key(&[6u8; 32])).is_some());
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
