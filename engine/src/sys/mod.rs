//! Everything that talks to the kernel beyond plain sockets: netlink for
//! links, addresses and routes, the raw UDP transmit socket, the TUN device,
//! packet buffers on pages of their own.
//!
//! This is the only place in weft where `unsafe` may appear; each block says
//! why it is sound.

pub mod bpf;
pub mod mmsg;
pub mod netlink;
pub mod pages;
pub mod pair;
pub mod raw;
pub mod tun;
