//! The raw UDP socket weft transmits VXLAN through.
//!
//! A raw `IPPROTO_UDP` socket lets us write the UDP header ourselves (a
//! per-flow source port and our own checksum) while the kernel adds the IP
//! header and routes the packet. A raw socket would also receive a copy of
//! every UDP packet the node gets; a classic BPF program that accepts nothing
//! stops that, so receiving stays with the ordinary UDP socket.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// A transmit-only raw UDP socket bound to the local underlay address.
#[derive(Debug)]
pub struct RawUdpTx {
    socket: Socket,
}

impl RawUdpTx {
    /// Opens the socket, bound to `local` so the kernel uses it as source.
    pub fn open(local: IpAddr) -> io::Result<Self> {
        let domain = if local.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
        let socket = Socket::new(domain, Type::RAW, Some(Protocol::UDP))?;
        attach_drop_all_filter(&socket)?;
        socket.bind(&SockAddr::from(SocketAddr::new(local, 0)))?;
        socket.set_send_buffer_size(4 << 20)?;
        Ok(RawUdpTx { socket })
    }

    /// The socket's descriptor, for batched sends.
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.socket)
    }

    /// Sends one UDP datagram (header included) to `dst`.
    pub fn send_to(&self, datagram: &[u8], dst: IpAddr) -> io::Result<usize> {
        self.socket.send_to(datagram, &SockAddr::from(SocketAddr::new(dst, 0)))
    }
}

/// Attaches a one-instruction classic BPF program, `ret #0`, that drops every
/// packet before it is queued to `socket`.
fn attach_drop_all_filter(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut program = [libc::sock_filter { code: (libc::BPF_RET | libc::BPF_K) as u16, jt: 0, jf: 0, k: 0 }];
    let fprog = libc::sock_fprog { len: program.len() as u16, filter: program.as_mut_ptr() };
    // SAFETY: `fprog` points at `program`, which outlives the call; the kernel
    // copies the program during setsockopt and keeps no pointer to it. The
    // length passed is the size of the `sock_fprog` struct we pass.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            &fprog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
