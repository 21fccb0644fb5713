//! A pair of connected `AF_UNIX` `SOCK_SEQPACKET` sockets: the pod side of a
//! rootless node. One end is a worker's [`PodIo`](crate::io::PodIo), the
//! other the userspace TCP/IP stack's device; each record is one IP packet.
//!
//! Sequenced packets keep record boundaries like datagrams but are paced by
//! the sender's buffer, like a stream: a full peer makes `send` return
//! `WouldBlock` instead of queueing without end. No privilege is needed.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Socket, Type};

/// Bytes each end may have in flight: a few hundred full-sized packets
/// (the kernel caps it at `wmem_max` and `rmem_max`).
pub const PAIR_BUFFER: usize = 4 << 20;

/// One end of the pair, non-blocking.
pub struct PacketEnd(Socket);

/// Makes a connected pair of non-blocking ends.
pub fn packet_pair() -> io::Result<(PacketEnd, PacketEnd)> {
    let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None)?;
    for s in [&a, &b] {
        s.set_nonblocking(true)?;
        // Smaller than asked is fine: the kernel caps it.
        let _ = s.set_send_buffer_size(PAIR_BUFFER);
        let _ = s.set_recv_buffer_size(PAIR_BUFFER);
    }
    Ok((PacketEnd(a), PacketEnd(b)))
}

impl PacketEnd {
    /// Receives one packet into `buf`; a packet longer than `buf` is cut
    /// (the caller's buffers hold the largest IP packet).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut &self.0, buf)
    }

    /// Sends one packet.
    pub fn send(&self, packet: &[u8]) -> io::Result<usize> {
        io::Write::write(&mut &self.0, packet)
    }
}

impl AsRawFd for PacketEnd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
