//! No heap allocation per packet on the steady-state data path.
//!
//! A counting global allocator (stats_alloc) wraps the system one. The pipeline a worker
//! runs is driven over in-memory buffers and real loopback sockets, the way
//! the worker runs it, with its own buffers allocated once up front:
//!
//! ```text
//!  64 KiB TCP super-packet --Plan::write--> tx batch --VXLAN encapsulate-->
//!  sendmmsg (loopback) --> recvmmsg --> VXLAN decapsulate --> coalesce
//! ```
//!
//! After one warm-up round the allocation count must not move over many
//! rounds. The TUN read/write and the poll loop are not in the picture (they
//! need a device); they use the same batches and make no allocation of
//! their own (`read`/`writev` on a fixed buffer).

use std::alloc::System;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

use weft_engine::coalesce::{coalesce, Out};
use weft_engine::io::{Batch, Meta};
use weft_engine::segment::Plan;
use weft_engine::sys::mmsg::{recv_mmsg, send_mmsg, Received, MAX_MMSG};
use weft_testkit::AnyPeer;
use weft_tunnel::vxlan::{Vtep, Vxlan, HEADROOM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// A TCP/IPv4 super-packet of `payload` bytes with a valid checksum.
fn super_packet(payload: usize, seq: u32) -> Vec<u8> {
    weft_testkit::tcp_ipv4([10, 244, 1, 2], [10, 244, 2, 2], payload, seq)
}

#[test]
fn the_steady_state_path_allocates_nothing_per_packet() {
    let local = Vtep { addr: IpAddr::from([127, 0, 0, 1]), mac: [0x0a, 0x58, 0, 0, 1, 0] };
    let remote = Vtep { addr: IpAddr::from([127, 0, 0, 1]), mac: [0x0a, 0x58, 0, 0, 2, 0] };
    let tx_vxlan = Vxlan::new(1, 8472, local);
    let rx_vxlan = Vxlan::new(1, 8472, remote);
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    rx.set_nonblocking(true).unwrap();
    let _ = socket2::SockRef::from(&rx).set_recv_buffer_size(8 << 20);
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dst = rx.local_addr().unwrap();
    let packets: Vec<Vec<u8>> = (0..4).map(|i| super_packet(64000, i * 64000)).collect();
    let mut tx_batch = Batch::new(MAX_MMSG);
    let mut rx_batch = Batch::new(MAX_MMSG);
    let mut got = [Received { len: 0, from: None, stride: 0, local: None }; MAX_MMSG];
    let mut moved = 0u64;

    let mut round = |packet: &[u8]| -> u64 {
        // Pod to tunnel: cut, encapsulate in place, one sendmmsg.
        let plan = Plan::new(packet, 1398).unwrap();
        for j in 0..plan.count() {
            let (buf, meta) = tx_batch.slot_mut(j);
            let len = plan.write(packet, j, &mut buf[HEADROOM..]).unwrap();
            let dlen = tx_vxlan.encapsulate(&remote, buf, len).unwrap();
            *meta = Meta { start: 0, len: dlen, addr: Some(dst.ip()), ..Meta::default() };
        }
        tx_batch.set_len(plan.count());
        let mut list: [(&[u8], SocketAddr, Option<IpAddr>); MAX_MMSG] = [(&[][..], dst, None); MAX_MMSG];
        let mut k = 0;
        for (d, _) in tx_batch.packets() {
            // The VXLAN payload (after our UDP header) on an ordinary socket.
            list[k] = (&d[8..], dst, None);
            k += 1;
        }
        let st = send_mmsg(tx.as_raw_fd(), &list[..k]);
        assert_eq!(st.sent as usize, plan.count());
        // Tunnel to pod: one recvmmsg, decapsulate, coalesce.
        let (bufs, _) = {
            rx_batch.set_len(MAX_MMSG);
            rx_batch.parts_mut()
        };
        let mut slots = bufs.iter_mut();
        let mut views: [&mut [u8]; MAX_MMSG] =
            std::array::from_fn(|_| slots.next().map_or(&mut [][..], |b| &mut b[..]));
        let n = recv_mmsg(rx.as_raw_fd(), &mut views[..plan.count()], &mut got).unwrap();
        assert_eq!(n, plan.count());
        rx_batch.set_len(n);
        let (bufs, metas) = rx_batch.parts_mut();
        for i in 0..n {
            let d = rx_vxlan.decapsulate(local.addr, &bufs[i][..got[i].len], &AnyPeer).unwrap();
            metas[i] = Meta { start: d.inner.start, len: d.inner.len(), ..Meta::default() };
        }
        let mut pkts: [&mut [u8]; MAX_MMSG] = std::array::from_fn(|_| &mut [][..]);
        let n = rx_batch.live_mut(&mut pkts);
        let mut outs = [Out::default(); MAX_MMSG];
        let stats = coalesce(&mut pkts[..n], &mut outs[..n], 1450, true);
        assert_eq!(stats.merged as usize, n - 1, "the super-packet comes back whole");
        n as u64
    };

    // Warm-up: lazily initialised runtime state (thread-locals, the first
    // syscall wrappers) may allocate once.
    moved += round(&packets[0]);
    let region = Region::new(GLOBAL);
    for r in 0..100 {
        moved += round(&packets[r % packets.len()]);
    }
    let change = region.change();
    assert!(moved > 4000, "{moved} packets moved");
    assert_eq!((change.allocations, change.reallocations), (0, 0), "allocations over {moved} packets in steady state");
}
