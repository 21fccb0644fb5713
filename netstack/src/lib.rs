//! weft-netstack: the pod side of a rootless node.
//!
//! A rootless node has no TUN device: its pod address lives in a userspace
//! TCP/IP stack (smoltcp). Local programs reach the cluster's pods through
//! a SOCKS5 server and static forwards; pods reach local services through
//! exposed ports; ICMP echo to the pod address is answered. The stack
//! trades IP packets with the engine's worker over a packet pair
//! (`weft_engine::io::PacketPod` holds the other end).
//!
//! What it owns: the SOCKS5 protocol ([`socks`], pure) and the stack's
//! thread ([`Netstack`]). What it refuses: routing for anyone but local
//! programs (no pod traffic passes through a rootless node), name
//! resolution (pods are reached by address), and any privilege: every
//! socket it opens is an ordinary one.

#![forbid(unsafe_code)]

pub mod socks;
mod stack;

pub use stack::{Config, Counters, Expose, Forward, Netstack, Proto, DEFAULT_MAX_CONNECTIONS, DEFAULT_TCP_BUFFER};
