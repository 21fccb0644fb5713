//! `sendmmsg` and `recvmmsg`: many datagrams per syscall on the underlay.
//!
//! Both work on caller-owned buffers; the message headers, I/O vectors and
//! addresses live on the stack for the duration of one call (at most
//! [`MAX_MMSG`] messages), so nothing is allocated per packet.
//!
//! Why VXLAN still transmits through the raw socket (sys/raw.rs) and not
//! with `UDP_SEGMENT`: the kernel's VXLAN sets each datagram's outer UDP
//! source port to a hash of the inner flow so that receivers spread flows
//! over queues (RSS) and cores, and weft does the same. `UDP_SEGMENT` needs
//! an ordinary UDP socket, whose source port is the socket's own: one
//! socket per source port would be needed (a pool picked by flow hash
//! gives up the kernel's exact port for a coarser one). The probe measured
//! that batching the UDP side gains little next to TUN offloads and
//! coalescing, while `sendmmsg` on the raw socket already takes the
//! syscall count per MB below the target, keeps every datagram's source
//! port the kernel's, and keeps the checksum ours (complete on the wire for
//! peers that do no offload). So: `sendmmsg` of whole datagrams on the raw
//! socket for VXLAN, and on the UDP socket for WireGuard.
//!
//! Receive uses `recvmmsg` into the batch's buffers; `UDP_GRO` is not asked
//! for (a GRO datagram would have to be split into slots, a copy, before
//! coalescing), which the `offload-udp-gro` key documents.

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;

use socket2::SockAddr;

/// Messages per `sendmmsg`/`recvmmsg` call: the transmit batch's size
/// ([`crate::worker::TX_SLOTS`]), so one batch is one call.
pub const MAX_MMSG: usize = 64;

/// What a batched send did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendStats {
    /// Syscalls made.
    pub syscalls: u64,
    /// Datagrams the kernel took.
    pub sent: u64,
    /// Datagrams refused (each skipped after its error).
    pub failed: u64,
}

/// Sends every `(datagram, destination, source)` of `msgs` on `fd`,
/// [`MAX_MMSG`] per call. A datagram the kernel refuses is counted as failed
/// and skipped.
pub fn send_mmsg(fd: RawFd, msgs: &[Outgoing<'_>]) -> SendStats {
    let mut stats = SendStats::default();
    for chunk in msgs.chunks(MAX_MMSG) {
        let n = chunk.len();
        let addrs: [SockAddr; MAX_MMSG] =
            std::array::from_fn(|i| SockAddr::from(chunk.get(i).map_or(SocketAddr::from(([0u8; 4], 0)), |m| m.1)));
        let mut iovs: [libc::iovec; MAX_MMSG] = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_MMSG];
        let mut controls: [Cmsg; MAX_MMSG] = [[0; 12]; MAX_MMSG];
        // SAFETY: mmsghdr is a plain C struct for which all-zero bytes are a
        // valid (empty) value.
        let mut hdrs: [libc::mmsghdr; MAX_MMSG] = unsafe { std::mem::zeroed() };
        for i in 0..n {
            iovs[i] = libc::iovec { iov_base: chunk[i].0.as_ptr() as *mut libc::c_void, iov_len: chunk[i].0.len() };
            hdrs[i].msg_hdr.msg_name = addrs[i].as_ptr() as *mut libc::c_void;
            hdrs[i].msg_hdr.msg_namelen = addrs[i].len();
            hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            if let Some(src) = chunk[i].2 {
                hdrs[i].msg_hdr.msg_control = controls[i].as_mut_ptr() as *mut libc::c_void;
                hdrs[i].msg_hdr.msg_controllen = pktinfo_space(src);
                // SAFETY: the control buffer is zeroed, aligned, 96 bytes,
                // more than pktinfo_space (at most 40); FIRSTHDR is its start.
                unsafe { write_pktinfo(libc::CMSG_FIRSTHDR(&hdrs[i].msg_hdr), src) };
            }
        }
        let mut off = 0;
        while off < n {
            stats.syscalls += 1;
            // SAFETY: `hdrs[off..n]` are initialised message headers whose
            // name and iov pointers point at `addrs` and `iovs` (and through
            // them at the caller's datagrams), all alive until this returns;
            // the kernel only reads them (and writes `msg_len`).
            let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr().add(off), (n - off) as libc::c_uint, 0) };
            if r < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                stats.failed += 1;
                off += 1;
            } else {
                stats.sent += r as u64;
                off += r as usize;
            }
        }
    }
    stats
}

/// `UDP_SEGMENT` from <linux/udp.h> (libc lacks it for glibc).
pub const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` from <linux/udp.h>.
pub const UDP_GRO: libc::c_int = 104;
/// Datagrams one `UDP_SEGMENT` send may carry (`UDP_MAX_SEGMENTS` of
/// kernels before 6.9; newer ones take 128).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Control buffer per message, aligned: room for a `UDP_GRO` or
/// `UDP_SEGMENT` cmsg (24 bytes) and an `IP_PKTINFO`/`IPV6_PKTINFO` one (32
/// or 40 bytes), with slack.
type Cmsg = [u64; 12];

/// A datagram to send: payload, destination, and the local address to send
/// it from (`None`: the kernel's choice).
pub type Outgoing<'a> = (&'a [u8], SocketAddr, Option<IpAddr>);

/// Asks the kernel to report, with every datagram received on `fd`, the
/// local address it was sent to (`IP_PKTINFO` / `IPV6_RECVPKTINFO`), so a
/// socket bound to the wildcard address can answer from that address.
pub fn set_recv_pktinfo(fd: RawFd, v6: bool) -> io::Result<()> {
    let (level, name) =
        if v6 { (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO) } else { (libc::IPPROTO_IP, libc::IP_PKTINFO) };
    set_int_opt(fd, level, name, 1)
}

/// Sends IPv4 datagrams on `fd` without "don't fragment", sized by the
/// interface's MTU whatever the path's (`IP_PMTUDISC_OMIT`), as the
/// kernel's WireGuard and VXLAN devices send their outer packets (DF
/// clear): a hop of a smaller MTU (another cloud's network) fragments them
/// rather than drop them, and an ICMP "fragmentation needed", spoofed or
/// not, cannot lower what the socket sends (with `UDP_SEGMENT`, a path MTU
/// below the segment size would make every send fail). A datagram larger
/// than the interface (a TUN MTU raised above the underlay's) is still
/// fragmented here. Unlike the kernel's tunnels, a route's `mtu` below the
/// interface's is not looked at either.
pub fn set_pmtu_omit(fd: RawFd) -> io::Result<()> {
    set_int_opt(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_OMIT)
}

/// `setsockopt` of an int option.
fn set_int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and its exact size is passed; the
    // kernel copies it before returning.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes of control space a pktinfo cmsg for `src` takes.
fn pktinfo_space(src: IpAddr) -> usize {
    let len =
        if src.is_ipv4() { std::mem::size_of::<libc::in_pktinfo>() } else { std::mem::size_of::<libc::in6_pktinfo>() };
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE(len as u32) as usize }
}

/// Writes a pktinfo cmsg asking to send from `src` at `c`.
///
/// # Safety
/// `c` must point at a cmsghdr inside a zeroed, cmsghdr-aligned control
/// buffer with at least [`pktinfo_space`] bytes left from `c`.
unsafe fn write_pktinfo(c: *mut libc::cmsghdr, src: IpAddr) {
    // SAFETY (whole body): the caller guarantees room for the header and
    // data; CMSG_DATA points inside it; unaligned writes need no alignment.
    unsafe {
        match src {
            IpAddr::V4(a) => {
                (*c).cmsg_level = libc::IPPROTO_IP;
                (*c).cmsg_type = libc::IP_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize;
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr { s_addr: u32::from(a).to_be() },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::in_pktinfo, info);
            }
            IpAddr::V6(a) => {
                (*c).cmsg_level = libc::IPPROTO_IPV6;
                (*c).cmsg_type = libc::IPV6_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in6_pktinfo>() as u32) as usize;
                let info = libc::in6_pktinfo { ipi6_addr: libc::in6_addr { s6_addr: a.octets() }, ipi6_ifindex: 0 };
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::in6_pktinfo, info);
            }
        }
    }
}

/// Asks the kernel to coalesce received datagrams of one flow (`UDP_GRO`).
pub fn set_udp_gro(fd: RawFd) -> io::Result<()> {
    set_int_opt(fd, libc::SOL_UDP, UDP_GRO, 1)
}

/// Slices one [`send_gso`] gathers at most: a header and a payload for
/// each of [`MAX_GSO_SEGMENTS`] datagrams.
pub const MAX_GSO_PARTS: usize = 2 * MAX_GSO_SEGMENTS;

/// Sends the concatenation of `parts` (at most [`MAX_GSO_PARTS`] slices,
/// 65 507 bytes in all) to `dst` in one `sendmsg` with `UDP_SEGMENT`: the
/// kernel cuts it into datagrams of `seg` bytes (the last may be shorter),
/// or the NIC does. A part may be a whole datagram or a piece of one (a
/// header here, its payload elsewhere): the kernel copies them in order.
/// With `src`, the datagrams leave from that local address (pktinfo).
pub fn send_gso(fd: RawFd, parts: &[&[u8]], dst: SocketAddr, src: Option<IpAddr>, seg: u16) -> io::Result<usize> {
    let n = parts.len().min(MAX_GSO_PARTS);
    let mut iovs: [libc::iovec; MAX_GSO_PARTS] =
        [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_GSO_PARTS];
    for (iov, d) in iovs.iter_mut().zip(&parts[..n]) {
        *iov = libc::iovec { iov_base: d.as_ptr() as *mut libc::c_void, iov_len: d.len() };
    }
    let addr = SockAddr::from(dst);
    let mut control: Cmsg = [0; 12];
    // SAFETY: all-zero bytes are a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = addr.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = addr.len();
    msg.msg_iov = iovs.as_mut_ptr();
    msg.msg_iovlen = n;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    // SAFETY: CMSG_SPACE only computes a size.
    let seg_space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
    msg.msg_controllen = seg_space + src.map_or(0, pktinfo_space);
    // SAFETY: `msg_control` points at `control`, 32 bytes aligned for a
    // cmsghdr, and `msg_controllen` (CMSG_SPACE of 2 bytes, 24 on 64-bit
    // Linux) fits in it, so CMSG_FIRSTHDR returns a pointer inside
    // `control`, and the u16 written at CMSG_DATA lies within CMSG_LEN(2).
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg);
        if let Some(src) = src {
            // The second cmsg starts at `seg_space` (24) and needs at most
            // 40 bytes: within the 96-byte zeroed buffer and msg_controllen.
            write_pktinfo((control.as_mut_ptr() as *mut u8).add(seg_space) as *mut libc::cmsghdr, src);
        }
    }
    loop {
        // SAFETY: `msg` points at `addr`, `iovs` (and through them the
        // caller's datagrams) and `control`, all alive across the call,
        // which only reads them.
        let r = unsafe { libc::sendmsg(fd, &msg, 0) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One datagram `recv_mmsg` received: its length and source.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    /// Bytes written into the buffer.
    pub len: usize,
    /// The sender.
    pub from: Option<SocketAddr>,
    /// With `UDP_GRO`: the length of each datagram coalesced into the
    /// buffer (the last may be shorter); 0 when it holds one datagram.
    pub stride: usize,
    /// With pktinfo asked for: the local address the datagram was sent to.
    pub local: Option<IpAddr>,
}

/// Receives up to `bufs.len()` (at most [`MAX_MMSG`]) datagrams from the
/// non-blocking socket `fd` in one call, one per buffer, reporting each in
/// `out`. Returns how many; `WouldBlock` when none is queued.
pub fn recv_mmsg(fd: RawFd, bufs: &mut [&mut [u8]], out: &mut [Received]) -> io::Result<usize> {
    let n = bufs.len().min(out.len()).min(MAX_MMSG);
    let mut iovs: [libc::iovec; MAX_MMSG] = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_MMSG];
    let mut names: [MaybeUninit<libc::sockaddr_storage>; MAX_MMSG] = [MaybeUninit::uninit(); MAX_MMSG];
    let mut controls: [Cmsg; MAX_MMSG] = [[0; 12]; MAX_MMSG];
    // SAFETY: all-zero bytes are a valid mmsghdr.
    let mut hdrs: [libc::mmsghdr; MAX_MMSG] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        iovs[i] = libc::iovec { iov_base: bufs[i].as_mut_ptr() as *mut libc::c_void, iov_len: bufs[i].len() };
        hdrs[i].msg_hdr.msg_control = controls[i].as_mut_ptr() as *mut libc::c_void;
        hdrs[i].msg_hdr.msg_controllen = std::mem::size_of::<Cmsg>();
        hdrs[i].msg_hdr.msg_name = names[i].as_mut_ptr() as *mut libc::c_void;
        hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: `hdrs[..n]` point at `names[..n]` (room for any address) and
    // at `iovs[..n]`, which point at the caller's buffers, exclusively
    // borrowed for this call; the kernel writes at most `iov_len` bytes to
    // each and at most `msg_namelen` to each name, and sets the lengths.
    let r =
        unsafe { libc::recvmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT, std::ptr::null_mut()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let got = r as usize;
    for i in 0..got {
        let namelen = hdrs[i].msg_hdr.msg_namelen;
        // SAFETY: the kernel wrote a socket address of `namelen` bytes
        // (at most the storage size) into `names[i]`; zero-length names (no
        // address) are rejected by SockAddr's family check below.
        let addr = unsafe { SockAddr::new(names[i].assume_init(), namelen) };
        let mut stride = 0;
        let mut local = None;
        // SAFETY: the kernel filled `controls[i]` with `msg_controllen`
        // bytes of well-formed cmsgs; CMSG_FIRSTHDR/NXTHDR stay within that
        // length and return null at its end; the int read lies within the
        // cmsg the kernel wrote (checked by its length).
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&hdrs[i].msg_hdr);
            while !c.is_null() {
                let (level, typ, len) = ((*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len);
                let fits = |n: usize| len >= libc::CMSG_LEN(n as u32) as usize;
                if level == libc::SOL_UDP && typ == UDP_GRO && fits(std::mem::size_of::<libc::c_int>()) {
                    stride = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int).max(0) as usize;
                } else if level == libc::IPPROTO_IP
                    && typ == libc::IP_PKTINFO
                    && fits(std::mem::size_of::<libc::in_pktinfo>())
                {
                    let info = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::in_pktinfo);
                    local = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr))));
                } else if level == libc::IPPROTO_IPV6
                    && typ == libc::IPV6_PKTINFO
                    && fits(std::mem::size_of::<libc::in6_pktinfo>())
                {
                    let info = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::in6_pktinfo);
                    local = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                }
                c = libc::CMSG_NXTHDR(&hdrs[i].msg_hdr, c);
            }
        }
        out[i] = Received {
            len: hdrs[i].msg_len as usize,
            from: if namelen > 0 { addr.as_socket() } else { None },
            stride,
            local,
        };
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_batch_goes_out_and_comes_back_in_one_call_each() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dst = rx.local_addr().unwrap();
        let payloads: Vec<Vec<u8>> = (0..70u8).map(|i| vec![i; 10 + i as usize]).collect();
        let msgs: Vec<Outgoing<'_>> = payloads.iter().map(|p| (&p[..], dst, None)).collect();
        let stats = send_mmsg(tx.as_raw_fd(), &msgs);
        assert_eq!(stats, SendStats { syscalls: 2, sent: 70, failed: 0 });
        let mut store = vec![vec![0u8; 100]; MAX_MMSG];
        let mut bufs: Vec<&mut [u8]> = store.iter_mut().map(|b| &mut b[..]).collect();
        let mut out = [Received { len: 0, from: None, stride: 0, local: None }; MAX_MMSG];
        let n = recv_mmsg(rx.as_raw_fd(), &mut bufs, &mut out).unwrap();
        assert_eq!(n, MAX_MMSG);
        for i in 0..n {
            assert_eq!(&bufs[i][..out[i].len], &payloads[i][..]);
            assert_eq!(out[i].from, Some(tx.local_addr().unwrap()));
        }
        let n = recv_mmsg(rx.as_raw_fd(), &mut bufs, &mut out).unwrap();
        assert_eq!(n, 6);
        let e = recv_mmsg(rx.as_raw_fd(), &mut bufs, &mut out).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_gso_send_arrives_as_datagrams_or_one_gro_buffer() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let payloads: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; if i < 4 { 1000 } else { 300 }]).collect();
        let slices: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
        // Without GRO on the receiver: five datagrams.
        assert_eq!(send_gso(tx.as_raw_fd(), &slices, rx.local_addr().unwrap(), None, 1000).unwrap(), 4300);
        let mut store = vec![vec![0u8; 65536]; 8];
        let mut bufs: Vec<&mut [u8]> = store.iter_mut().map(|b| &mut b[..]).collect();
        let mut out = [Received { len: 0, from: None, stride: 0, local: None }; MAX_MMSG];
        let n = recv_mmsg(rx.as_raw_fd(), &mut bufs, &mut out).unwrap();
        assert_eq!(n, 5);
        for i in 0..5 {
            assert_eq!(&bufs[i][..out[i].len], &payloads[i][..]);
        }
        // With GRO: the bytes arrive in order, split by the reported stride.
        set_udp_gro(rx.as_raw_fd()).unwrap();
        send_gso(tx.as_raw_fd(), &slices, rx.local_addr().unwrap(), None, 1000).unwrap();
        let mut joined = Vec::new();
        while joined.len() < 4300 {
            let n = recv_mmsg(rx.as_raw_fd(), &mut bufs, &mut out).unwrap();
            for i in 0..n {
                let stride = if out[i].stride == 0 { out[i].len } else { out[i].stride };
                for d in bufs[i][..out[i].len].chunks(stride) {
                    assert!(d.len() == 1000 || d.len() == 300, "datagram of {}", d.len());
                    joined.extend_from_slice(d);
                }
            }
        }
        assert_eq!(joined, payloads.concat());
    }

    #[test]
    fn a_gso_send_gathers_headers_and_payloads_from_apart() {
        // As the VXLAN path sends: each datagram a header slice and a
        // payload slice lying elsewhere; the last datagram shorter.
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let headers: Vec<[u8; 30]> = (0..3u8).map(|i| [0xa0 + i; 30]).collect();
        let payload: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
        let pieces = [&payload[..1000], &payload[1000..2000], &payload[2000..]];
        let mut parts: Vec<&[u8]> = Vec::new();
        for (h, p) in headers.iter().zip(pieces) {
            parts.push(&h[..]);
            parts.push(p);
        }
        assert_eq!(send_gso(tx.as_raw_fd(), &parts, rx.local_addr().unwrap(), None, 1030).unwrap(), 2590);
        let mut store = vec![vec![0u8; 2000]; 4];
        let mut bufs: Vec<&mut [u8]> = store.iter_mut().map(|b| &mut b[..]).collect();
        let mut out = [Received { len: 0, from: None, stride: 0, local: None }; 4];
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(recv_mmsg(rx.as_raw_fd(), &mut bufs, &mut out).unwrap(), 3);
        for i in 0..3 {
            assert_eq!(&bufs[i][..out[i].len], &[&headers[i][..], pieces[i]].concat()[..], "datagram {i}");
        }
        // A segment size of 0: no segmentation, one datagram of all the parts.
        send_gso(tx.as_raw_fd(), &parts[..2], rx.local_addr().unwrap(), None, 0).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(recv_mmsg(rx.as_raw_fd(), &mut bufs, &mut out).unwrap(), 1);
        assert_eq!(&bufs[0][..out[0].len], &[&headers[0][..], pieces[0]].concat()[..]);
    }

    #[test]
    fn a_wildcard_socket_learns_the_local_address_and_replies_from_it() {
        // 127.0.0.2 is local through lo's 127.0.0.0/8 without being the
        // address the kernel would pick as source towards 127.0.0.1.
        let server = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        server.set_nonblocking(true).unwrap();
        set_recv_pktinfo(server.as_raw_fd(), false).unwrap();
        let port = server.local_addr().unwrap().port();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        client.send_to(b"hello", ("127.0.0.2", port)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut store = [0u8; 100];
        let mut bufs: Vec<&mut [u8]> = vec![&mut store[..]];
        let mut out = [Received { len: 0, from: None, stride: 0, local: None }; 1];
        assert_eq!(recv_mmsg(server.as_raw_fd(), &mut bufs, &mut out).unwrap(), 1);
        assert_eq!(out[0].local, Some(IpAddr::from([127, 0, 0, 2])));
        let peer = out[0].from.unwrap();
        // Reply from the address the peer sent to, one datagram and a GSO run.
        let st = send_mmsg(server.as_raw_fd(), &[(b"one", peer, out[0].local)]);
        assert_eq!(st.sent, 1);
        let mut b = [0u8; 100];
        let (n, from) = client.recv_from(&mut b).unwrap();
        assert_eq!((&b[..n], from), (&b"one"[..], SocketAddr::from(([127, 0, 0, 2], port))));
        send_gso(server.as_raw_fd(), &[b"ab", b"cd"], peer, out[0].local, 2).unwrap();
        for want in [b"ab", b"cd"] {
            let (n, from) = client.recv_from(&mut b).unwrap();
            assert_eq!((&b[..n], from), (&want[..], SocketAddr::from(([127, 0, 0, 2], port))));
        }
        // Without pktinfo the kernel picks 127.0.0.1: the test can tell.
        send_mmsg(server.as_raw_fd(), &[(b"x", peer, None)]);
        let (_, from) = client.recv_from(&mut b).unwrap();
        assert_eq!(from.ip(), IpAddr::from([127, 0, 0, 1]));
    }
}
