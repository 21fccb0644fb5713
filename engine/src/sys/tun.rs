//! The TUN device: a multi-queue layer-3 device without packet information,
//! one queue per worker, non-blocking so the worker's poll loop drives it.
//!
//! With offloads on it is opened with `IFF_VNET_HDR` and `TUNSETOFFLOAD`
//! (checksum, TSO4/TSO6, and USO4/USO6 where the kernel has them, which
//! tun-rs asks for and quietly drops on kernels before 6.2): every read then
//! starts with a virtio-net header and may return a 64 KiB super-packet, and
//! every write carries a header. When the kernel refuses the offloads the
//! device is opened without them, which is logged once. The device's
//! `gso_max_size` is never touched: lowering it makes the kernel cut the
//! pods' 64 KiB packets before the TUN (measured: 9.3 -> 1.2 Gbit/s).

use std::io;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};

/// One queue of the TUN device.
pub struct TunQueue {
    dev: tun_rs::SyncDevice,
    vnet_hdr: bool,
    /// Whether `GSO_UDP_L4` writes are taken (USO, kernels from 6.2);
    /// cleared when a write says otherwise.
    uso: std::cell::Cell<bool>,
}

impl TunQueue {
    /// Creates the device `name` with `queues` queues (at least one), with
    /// offloads when `offload` is set and the kernel takes them. The device
    /// is left down, as the kernel's WireGuard device is made: its owner
    /// (the agent, wg-quick) configures it and sets it up.
    pub fn create(name: &str, queues: usize, offload: bool) -> io::Result<Vec<TunQueue>> {
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new().name(name).multi_queue(true).offload(offload).enable(false).build_sync()
        };
        let first = match build(offload) {
            Ok(d) => d,
            Err(e) if offload => {
                tracing::warn!(tun = name, error = %e, "TUN offloads refused by the kernel; one packet per read and write");
                build(false)?
            }
            Err(e) => return Err(e),
        };
        let vnet_hdr = first.tcp_gso();
        let uso = vnet_hdr && first.udp_gso();
        let mut out = Vec::with_capacity(queues.max(1));
        for _ in 1..queues.max(1) {
            out.push(TunQueue { dev: first.try_clone()?, vnet_hdr, uso: uso.into() });
        }
        out.insert(0, TunQueue { dev: first, vnet_hdr, uso: uso.into() });
        for q in &out {
            q.dev.set_nonblocking(true)?;
        }
        tracing::info!(tun = name, vnet_hdr, uso, "TUN offloads");
        Ok(out)
    }

    /// Whether reads and writes carry a virtio-net header.
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// Whether UDP datagrams may be written joined (`GSO_UDP_L4`).
    pub fn uso(&self) -> bool {
        self.uso.get()
    }

    /// Stops joining UDP datagrams (the kernel refused a USO write).
    pub fn refuse_uso(&self) {
        self.uso.set(false);
    }

    /// Reads one packet (with its virtio-net header when offloading);
    /// `WouldBlock` when the queue is empty.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.dev.recv(buf)
    }

    /// Writes one packet (its virtio-net header included when offloading).
    pub fn send(&self, packet: &[u8]) -> io::Result<usize> {
        self.dev.send(packet)
    }

    /// Writes the concatenation of `slices` as one packet (one `writev`).
    pub fn send_slices(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        self.dev.send_vectored(slices)
    }

    /// Writes `hdr` and `packet` as one packet (one `writev`).
    pub fn send_vnet(&self, hdr: &[u8], packet: &[u8]) -> io::Result<usize> {
        self.dev.send_vectored(&[IoSlice::new(hdr), IoSlice::new(packet)])
    }
}

impl AsRawFd for TunQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }
}
