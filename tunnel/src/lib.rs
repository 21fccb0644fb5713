//! weft-tunnel: the encapsulations weft speaks, as pure code: VXLAN and
//! WireGuard (handshakes, sessions and timers included).
//!
//! Bytes go in, bytes and verdicts come out. Nothing here opens a socket,
//! reads a clock (time is passed in) or allocates per packet; the engine owns every buffer and
//! does the I/O. Untrusted input is parsed with `new_checked`-style checks and
//! refused with a [`DropReason`] that the caller counts.

#![forbid(unsafe_code)]

pub mod checksum;
pub mod error;
pub mod flow;
pub mod vxlan;
pub mod wireguard;

pub use error::{DropReason, EncapError};
