//! The TUN device: a multi-queue layer-3 device without packet information,
//! one queue per worker, non-blocking so the worker's poll loop drives it.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// One queue of the TUN device.
pub struct TunQueue {
    dev: tun_rs::SyncDevice,
}

impl TunQueue {
    /// Creates the device `name` with `queues` queues (at least one).
    pub fn create(name: &str, queues: usize) -> io::Result<Vec<TunQueue>> {
        let first = tun_rs::DeviceBuilder::new().name(name).multi_queue(true).build_sync()?;
        let mut out = Vec::with_capacity(queues.max(1));
        for _ in 1..queues.max(1) {
            out.push(TunQueue { dev: first.try_clone()? });
        }
        out.insert(0, TunQueue { dev: first });
        for q in &out {
            q.dev.set_nonblocking(true)?;
        }
        Ok(out)
    }

    /// Reads one packet; `WouldBlock` when the queue is empty.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.dev.recv(buf)
    }

    /// Writes one packet.
    pub fn send(&self, packet: &[u8]) -> io::Result<usize> {
        self.dev.send(packet)
    }
}

impl AsRawFd for TunQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }
}
