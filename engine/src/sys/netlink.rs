//! A small rtnetlink client: links, addresses and routes, nothing else.
//!
//! Messages are built and parsed by hand in safe code over a `NETLINK_ROUTE`
//! socket; every request asks for an acknowledgement and the kernel's error
//! code is returned as an `io::Error`. It never dumps whole tables and never
//! touches objects it was not asked about.

use std::io;
use std::io::Read;
use std::net::IpAddr;

use ipnet::IpNet;
use socket2::{Domain, Protocol, Socket, Type};

/// Route protocol weft tags its routes with (`ip route` shows it as `proto 147`
/// unless named in rt_protos), so they are recognisable as weft's.
pub const RTPROT_WEFT: u8 = 147;

const NLMSG_HDR_LEN: usize = 16;
/// `RTNH_F_ONLINK` from <linux/rtnetlink.h> (libc lacks it).
const RTNH_F_ONLINK: u32 = 4;

/// A route weft programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination prefix.
    pub dst: IpNet,
    /// Output interface index.
    pub oif: u32,
    /// Next hop, if any (`via`).
    pub gateway: Option<IpAddr>,
    /// Whether the next hop is taken as on-link (`onlink`).
    pub onlink: bool,
}

/// A netlink route socket.
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

impl Netlink {
    /// Opens a `NETLINK_ROUTE` socket (bound by the kernel on first send).
    pub fn open() -> io::Result<Self> {
        let socket = Socket::new(Domain::from(libc::AF_NETLINK), Type::RAW, Some(Protocol::from(libc::NETLINK_ROUTE)))?;
        Ok(Netlink { socket, seq: 0 })
    }

    /// Index of the interface called `name`.
    pub fn link_index(name: &str) -> io::Result<u32> {
        nix::net::if_::if_nametoindex(name).map_err(io::Error::from)
    }

    /// Sets `index` up (or down) and, if given, its MTU.
    pub fn set_link(&mut self, index: u32, up: bool, mtu: Option<u32>) -> io::Result<()> {
        let mut m = Msg::new(libc::RTM_NEWLINK, libc::NLM_F_ACK as u16);
        m.ifinfo(index, if up { libc::IFF_UP as u32 } else { 0 }, libc::IFF_UP as u32);
        if let Some(mtu) = mtu {
            m.attr(libc::IFLA_MTU, &mtu.to_ne_bytes());
        }
        self.request(m)
    }

    /// MTU of interface `index`.
    pub fn link_mtu(&mut self, index: u32) -> io::Result<u32> {
        let mut m = Msg::new(libc::RTM_GETLINK, 0);
        m.ifinfo(index, 0, 0);
        let reply = self.exchange(m)?;
        // ifinfomsg is 16 bytes; attributes follow.
        let attrs = reply.get(NLMSG_HDR_LEN + 16..).unwrap_or(&[]);
        find_attr(attrs, libc::IFLA_MTU)
            .and_then(|v| v.get(..4))
            .map(|v| u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "link reply without IFLA_MTU"))
    }

    /// Adds `addr` (with its prefix length) to interface `index`, replacing an
    /// equal address.
    pub fn add_address(&mut self, index: u32, addr: IpNet) -> io::Result<()> {
        let flags = (libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE) as u16;
        let mut m = Msg::new(libc::RTM_NEWADDR, flags);
        m.ifaddr(family(addr.addr()), addr.prefix_len(), index);
        let bytes = ip_bytes(addr.addr());
        m.attr(libc::IFA_LOCAL, &bytes);
        m.attr(libc::IFA_ADDRESS, &bytes);
        self.request(m)
    }

    /// Adds or replaces a route in the main table.
    pub fn replace_route(&mut self, route: &Route) -> io::Result<()> {
        let flags = (libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE) as u16;
        self.request(route_msg(libc::RTM_NEWROUTE, flags, route))
    }

    /// Deletes a route from the main table; a route already gone is not an error.
    pub fn delete_route(&mut self, route: &Route) -> io::Result<()> {
        match self.request(route_msg(libc::RTM_DELROUTE, libc::NLM_F_ACK as u16, route)) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            r => r,
        }
    }

    fn request(&mut self, m: Msg) -> io::Result<()> {
        self.exchange(m).map(|_| ())
    }

    /// Sends `m` and returns the first reply that is not an acknowledgement
    /// (empty when the request only asked for an ack).
    fn exchange(&mut self, mut m: Msg) -> io::Result<Vec<u8>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        m.finish(seq);
        self.socket.send(&m.buf)?;
        let mut buf = vec![0u8; 16384];
        loop {
            let n = (&self.socket).read(&mut buf)?;
            let data = &buf[..n];
            let mut off = 0;
            while off + NLMSG_HDR_LEN <= data.len() {
                let len = u32::from_ne_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]]) as usize;
                let typ = u16::from_ne_bytes([data[off + 4], data[off + 5]]);
                let rseq = u32::from_ne_bytes([data[off + 8], data[off + 9], data[off + 10], data[off + 11]]);
                if len < NLMSG_HDR_LEN || off + len > data.len() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
                }
                let msg = &data[off..off + len];
                off += align4(len);
                if rseq != seq {
                    continue;
                }
                if typ == libc::NLMSG_ERROR as u16 {
                    let code = msg
                        .get(NLMSG_HDR_LEN..NLMSG_HDR_LEN + 4)
                        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(-libc::EIO);
                    return if code == 0 { Ok(Vec::new()) } else { Err(io::Error::from_raw_os_error(-code)) };
                }
                return Ok(msg.to_vec());
            }
        }
    }
}

fn route_msg(typ: u16, flags: u16, r: &Route) -> Msg {
    let mut m = Msg::new(typ, flags);
    let scope = if r.gateway.is_some() { libc::RT_SCOPE_UNIVERSE } else { libc::RT_SCOPE_LINK };
    m.rtmsg(family(r.dst.addr()), r.dst.prefix_len(), scope, if r.onlink { RTNH_F_ONLINK } else { 0 });
    m.attr(libc::RTA_DST, &ip_bytes(r.dst.network()));
    m.attr(libc::RTA_OIF, &r.oif.to_ne_bytes());
    if let Some(gw) = r.gateway {
        m.attr(libc::RTA_GATEWAY, &ip_bytes(gw));
    }
    m
}

fn family(a: IpAddr) -> u8 {
    if a.is_ipv4() {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    }
}

fn ip_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Finds attribute `typ` in a run of rtattrs.
fn find_attr(mut attrs: &[u8], typ: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let t = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if t == typ {
            return Some(&attrs[4..len]);
        }
        attrs = attrs.get(align4(len)..)?;
    }
    None
}

/// A netlink request under construction.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(typ: u16, flags: u16) -> Self {
        let mut buf = vec![0u8; NLMSG_HDR_LEN];
        buf[4..6].copy_from_slice(&typ.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
        Msg { buf }
    }

    fn ifinfo(&mut self, index: u32, flags: u32, change: u32) {
        self.buf.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        self.buf.extend_from_slice(&(index as i32).to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&change.to_ne_bytes());
    }

    fn ifaddr(&mut self, family: u8, prefix_len: u8, index: u32) {
        self.buf.extend_from_slice(&[family, prefix_len, 0, libc::RT_SCOPE_UNIVERSE]);
        self.buf.extend_from_slice(&index.to_ne_bytes());
    }

    fn rtmsg(&mut self, family: u8, dst_len: u8, scope: u8, flags: u32) {
        self.buf.extend_from_slice(&[
            family,
            dst_len,
            0,
            0,
            libc::RT_TABLE_MAIN,
            RTPROT_WEFT,
            scope,
            libc::RTN_UNICAST,
        ]);
        self.buf.extend_from_slice(&flags.to_ne_bytes());
    }

    fn attr(&mut self, typ: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&typ.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    fn finish(&mut self, seq: u32) {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_found_and_padded() {
        let mut m = Msg::new(libc::RTM_NEWLINK, 0);
        m.attr(1, &[1, 2, 3]);
        m.attr(4, &1450u32.to_ne_bytes());
        m.finish(7);
        assert_eq!(m.buf.len() % 4, 0);
        let attrs = &m.buf[NLMSG_HDR_LEN..];
        assert_eq!(find_attr(attrs, 1), Some(&[1u8, 2, 3][..]));
        assert_eq!(find_attr(attrs, 4), Some(&1450u32.to_ne_bytes()[..]));
        assert_eq!(find_attr(attrs, 9), None);
        assert_eq!(find_attr(&[0xff, 0xff, 1, 0], 1), None, "overlong attribute refused");
    }
}
