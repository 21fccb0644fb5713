//! No heap allocation per packet on the steady-state data path (root: the
//! VXLAN side sends through a raw socket).
//!
//! A counting global allocator (stats_alloc) wraps the system one. Two real
//! data paths (`Datapath`, the code the workers run) face each other over
//! loopback with their real underlay sides (`UdpUnderlay`: the raw socket,
//! the `UDP_SEGMENT` pool and its gather path, `UDP_GRO` with datagrams
//! opened where they lie) and in-memory pod sides that play TUNs with
//! offloads and hand their buffers back:
//!
//! ```text
//!  64 KiB super-packet --cut--> encapsulate (VXLAN | WireGuard) --UDP_SEGMENT--> loopback
//!  --UDP_GRO--> decapsulate in place --> coalesce --> one write
//! ```
//!
//! After warm-up rounds (handshake, lazily made runtime state) the
//! allocation count must not move over many rounds: VXLAN, WireGuard, and
//! WireGuard with its AEAD spread over two threads of a rayon pool. The poll loop around
//! the data path is not in the picture; it allocates nothing per wakeup.

use std::alloc::System;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use ipnet::IpNet;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use weft_engine::datapath::{Backend, Datapath};
use weft_engine::io::mem::MemPod;
use weft_engine::io::{GroRx, UdpUnderlay};
use weft_engine::spread::{set_thread_counters, Crew};
use weft_engine::sys::mmsg::{set_recv_pktinfo, set_udp_gro};
use weft_engine::sys::raw::RawUdpTx;
use weft_engine::wg::{WgDevice, WgPeer};
use weft_engine::{Families, Peer, Snapshot, WorkerCounters};
use weft_tunnel::vxlan::{Vtep, Vxlan};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const MTU: usize = 1420;

fn addr(i: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, i + 1])
}

fn mac(i: u8) -> [u8; 6] {
    [0x0a, 0x58, 0, 0, i + 1, 0]
}

/// A blocking UDP socket at `local` (the sender's `UDP_SEGMENT` pool).
fn pool_socket(local: IpAddr) -> std::net::UdpSocket {
    std::net::UdpSocket::bind(SocketAddr::new(local, 0)).unwrap()
}

/// The underlay side of node `i` at `port`, with every offload on.
fn underlay(i: u8, port: u16, vxlan: bool) -> UdpUnderlay {
    let rx = std::net::UdpSocket::bind(SocketAddr::new(addr(i), port)).unwrap();
    rx.set_nonblocking(true).unwrap();
    let _ = socket2::SockRef::from(&rx).set_recv_buffer_size(8 << 20);
    set_udp_gro(rx.as_raw_fd()).unwrap();
    if !vxlan {
        set_recv_pktinfo(rx.as_raw_fd(), false).unwrap();
    }
    UdpUnderlay {
        rx: mio::net::UdpSocket::from_std(rx),
        tx: vxlan.then(|| RawUdpTx::open(addr(i)).unwrap()),
        v6: false,
        gso_pool: if vxlan { (0..8).map(|_| pool_socket(addr(i))).collect() } else { Vec::new() },
        pool_singly: false,
        gro: Some(GroRx::default()),
        wg_gso: !vxlan,
        gso_ceiling: Default::default(),
    }
}

/// Nodes 0 and 1, each with the other as its one peer.
fn pair(vxlan: bool) -> [Datapath<MemPod, UdpUnderlay>; 2] {
    // One port for both (different loopback addresses): VXLAN sends to
    // the port it listens on.
    let probe = std::net::UdpSocket::bind(SocketAddr::new(addr(0), 0)).unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let devices = [WgDevice::new([1; 32]), WgDevice::new([2; 32])];
    let devices = devices.map(Arc::new);
    [0u8, 1].map(|i| {
        let j = 1 - i;
        let backend = if vxlan {
            Backend::Vxlan(vec![Vxlan::new(1, port, Vtep { addr: addr(i), mac: mac(i) })])
        } else {
            Backend::Wireguard(devices[i as usize].clone())
        };
        let wg = (!vxlan).then(|| {
            let ep = SocketAddr::new(addr(j), port);
            Arc::new(WgPeer::new(&devices[i as usize], devices[j as usize].public_key(), None, None, 1, Some(ep)))
        });
        let peer = Peer {
            name: format!("n{j}"),
            vtep4: vxlan.then(|| Vtep { addr: addr(j), mac: mac(j) }),
            vtep6: None,
            subnets: vec![format!("10.244.{}.0/24", j + 1).parse::<IpNet>().unwrap()],
            counters: Default::default(),
            wg,
        };
        let snapshot = Arc::new(Snapshot::new(vec![peer], Families { v4: true, v6: false }));
        let counters = Arc::new(WorkerCounters::default());
        Datapath::new(MemPod::new(true), vec![underlay(i, port, vxlan)], backend, snapshot, counters, MTU)
    })
}

/// One round: two 64 KiB super-packets from node 0's pod to node 1's.
/// Returns the packets node 1's pod got.
fn round(nodes: &mut [Datapath<MemPod, UdpUnderlay>; 2], sp: &[u8]) -> usize {
    let now = Instant::now();
    for _ in 0..2 {
        let mut b = nodes[0].pod.spare.pop().unwrap_or_default();
        b.clear();
        b.extend_from_slice(sp);
        nodes[0].pod.push_super(b, 1380);
    }
    while nodes[0].pod_to_underlay(now).unwrap() {}
    let mut spins = 0;
    while nodes[1].pod.outbox.is_empty() && spins < 1000 {
        while nodes[1].underlay_to_pod(0, now).unwrap() {}
        spins += 1;
    }
    while nodes[1].underlay_to_pod(0, now).unwrap() {}
    let got = nodes[1].pod.outbox.len();
    let pod = &mut nodes[1].pod;
    pod.spare.append(&mut pod.outbox);
    got
}

fn steady_state_allocates_nothing(vxlan: bool, crew: Option<&Arc<Crew>>) {
    // The raw socket of the VXLAN side needs CAP_NET_RAW.
    assert!(RawUdpTx::open(addr(0)).is_ok(), "this test opens a raw socket and must run as root");
    let mut nodes = pair(vxlan);
    for n in &mut nodes {
        n.crew = crew.map(|c| (c.clone(), 0));
    }
    let sp = weft_testkit::tcp_ipv4([10, 244, 1, 2], [10, 244, 2, 2], 64_000, 1);
    // Warm-up: the WireGuard handshake, buffers reaching their sizes.
    let mut moved = 0;
    for _ in 0..20 {
        moved += round(&mut nodes, &sp);
        let now = Instant::now();
        while nodes[0].underlay_to_pod(0, now).unwrap() {}
    }
    assert!(moved > 0, "the warm-up moved nothing");
    let region = Region::new(GLOBAL);
    let mut moved = 0;
    for _ in 0..100 {
        moved += round(&mut nodes, &sp);
    }
    let change = region.change();
    let segments = nodes[1].counters.udp_rx_packets.load(Relaxed);
    assert!(moved >= 100, "{moved} coalesced packets reached the pod");
    assert!(segments > 9000, "{segments} datagrams");
    assert_eq!((change.allocations, change.reallocations), (0, 0), "allocations over {segments} datagrams");
}

/// One test for both backends: the allocator's count is global, so a
/// second test running beside it would be counted too.
#[test]
fn the_vxlan_and_wireguard_data_paths_allocate_nothing_per_packet() {
    steady_state_allocates_nothing(true, None);
    steady_state_allocates_nothing(false, None);
    // WireGuard with its AEAD spread: the data paths run on one thread of a
    // two-thread rayon pool, and the other takes halves (rayon wakes it).
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let counters: Vec<Arc<WorkerCounters>> = (0..2).map(|_| Arc::new(WorkerCounters::default())).collect();
    pool.broadcast(|ctx| set_thread_counters(counters[ctx.index()].clone()));
    let polls: Vec<mio::Poll> = (0..2).map(|_| mio::Poll::new().unwrap()).collect();
    let wakers = polls.iter().map(|p| Arc::new(mio::Waker::new(p.registry(), mio::Token(0)).unwrap())).collect();
    let crew = Arc::new(Crew::new(wakers));
    pool.install(|| steady_state_allocates_nothing(false, Some(&crew)));
    let worked = counters.iter().map(|c| c.wg_sealed_bytes.load(Relaxed) + c.wg_opened_bytes.load(Relaxed));
    let worked: Vec<u64> = worked.collect();
    assert!(worked.iter().all(|w| *w > 0), "both pool threads sealed or opened: {worked:?}");
}
