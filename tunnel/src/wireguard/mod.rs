//! WireGuard as a sans-IO core: Noise_IKpsk2 handshakes, cookie replies,
//! sessions and every protocol timer, with time passed in.
//!
//! ```text
//!  Identity (one per node)          Tunnel (one per peer)                 Keypair (one per session)
//!  mac1/mac2 checks, cookie    -->  handshake, timers, staged packets -->  send key + counter,
//!  replies, opens initiations       poll_transmit / poll_timeout           recv key + replay window
//! ```
//!
//! Nothing here reads a clock or touches a socket: every call that depends
//! on time takes `now`, [`Tunnel::poll_timeout`] says when to call
//! [`Tunnel::handle_timeout`] next, and what the protocol wants sent on its
//! own (initiations, retries, keepalives, packets staged while a handshake
//! ran) is drained with [`Tunnel::poll_transmit`]. The data path is split so
//! that a worker takes the peer's lock once per batch: [`Tunnel::send_grant`]
//! hands out a keypair and a run of counters, [`Keypair::seal`] and
//! [`Keypair::open`] run without the lock (on any core), and
//! [`Tunnel::accept`] checks the replay window and moves the timers for a
//! run of opened packets.
//!
//! Why our own and not boringtun: boringtun reads the clock inside its
//! handshake and timer code and keeps its session keys private, so its
//! timers could not be deadlines in our poll loop, could not run in virtual
//! time, and its AEAD could not spread over cores. The primitives are the
//! maintained RustCrypto crates and `ring`; interop with wireguard-go and
//! boringtun is tested on real sockets (tests/wireguard.rs, tests/uapi_wg.rs)
//! and against boringtun in memory (this module's tests).

mod crypto;
mod identity;
mod keypair;
mod message;
mod tunnel;

use std::time::Duration;

pub use crypto::public_key;
pub use identity::{Identity, InitiationHalf, HANDSHAKE_RATE_LIMIT};
pub use keypair::{Keypair, Replay, REPLAY_WINDOW};
pub use message::{Data, Message, COOKIE_REPLY_LEN, DATA_HEADER_LEN, INITIATION_LEN, KEEPALIVE_LEN, RESPONSE_LEN};
pub use tunnel::{inner_source, Accepted, SendGrant, Tunnel, MAX_STAGED};

/// Bytes WireGuard adds to a packet: the data header and the tag (Flannel
/// counts 80 with the outer IPv6 and UDP headers).
pub const DATA_OVERHEAD: usize = DATA_HEADER_LEN + crypto::TAG_LEN;

/// The initiator starts a new handshake when its session is this old.
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
/// No packet is sealed or opened with a session this old.
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// A handshake is given up after retrying this long.
pub const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
/// A handshake without an answer is retried after this (plus jitter).
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// A keepalive answers received data after this much silence of ours.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A cookie is used this long after it was received; the secret cookies
/// are made of changes this often.
pub const COOKIE_REFRESH_TIME: Duration = Duration::from_secs(120);
/// Initiations from one peer closer together than this are refused
/// (wireguard-go's `HandshakeInitationRate`).
pub const INITIATION_MIN_INTERVAL: Duration = Duration::from_millis(20);
/// The initiator rekeys after this many messages on one session.
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
/// No packet is sealed or opened past this counter.
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);

const LABEL_MAC1: &[u8] = b"mac1----";
const LABEL_COOKIE: &[u8] = b"cookie--";

/// Why a WireGuard datagram was refused. Each variant is a drop counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum WgError {
    /// Not one of the four messages, or of the wrong length.
    #[error("malformed WireGuard message")]
    Malformed,
    /// A handshake message whose mac1 is not keyed with our public key.
    #[error("bad mac1")]
    Mac1,
    /// Under load, a handshake message without a valid cookie: a cookie
    /// reply was written instead.
    #[error("under load: cookie reply sent")]
    Cookie,
    /// Does not authenticate (handshake field, data packet, cookie).
    #[error("does not authenticate")]
    Decrypt,
    /// A response, cookie or data packet for an index we do not hold.
    #[error("unknown receiver index")]
    UnknownIndex,
    /// A data packet whose counter was seen before or is too old.
    #[error("replayed counter")]
    Replay,
    /// A data packet of a session past its lifetime or message limit.
    #[error("session expired")]
    Expired,
    /// An initiation whose timestamp is not newer than the last one.
    #[error("replayed initiation")]
    StaleTimestamp,
    /// An initiation too soon after the previous one from the same peer.
    #[error("initiation flood")]
    Flood,
    /// The decrypted packet is not a well-formed IP packet.
    #[error("malformed inner packet")]
    MalformedInner,
}

impl WgError {
    /// Every reason, in counter order.
    pub const ALL: [WgError; 10] = [
        WgError::Malformed,
        WgError::Mac1,
        WgError::Cookie,
        WgError::Decrypt,
        WgError::UnknownIndex,
        WgError::Replay,
        WgError::Expired,
        WgError::StaleTimestamp,
        WgError::Flood,
        WgError::MalformedInner,
    ];

    /// Stable snake_case label (the Prometheus `reason`).
    pub fn label(self) -> &'static str {
        match self {
            WgError::Malformed => "wg_malformed",
            WgError::Mac1 => "wg_mac1",
            WgError::Cookie => "wg_cookie_reply",
            WgError::Decrypt => "wg_decrypt",
            WgError::UnknownIndex => "wg_unknown_index",
            WgError::Replay => "wg_replay",
            WgError::Expired => "wg_expired",
            WgError::StaleTimestamp => "wg_stale_timestamp",
            WgError::Flood => "wg_flood",
            WgError::MalformedInner => "wg_malformed_inner",
        }
    }

    /// Index into a counter array of `ALL.len()` slots.
    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests;
