//! SOCKS5, the server's side (RFC 1928, and RFC 1929 for user and
//! password), sans IO: bytes in, replies and requests out.
//!
//! What it owns: the greeting, the method choice, the user/password
//! subnegotiation, the request (CONNECT, UDP ASSOCIATE), replies, and the
//! header of UDP ASSOCIATE datagrams. What it refuses: BIND, fragmented UDP
//! datagrams, GSSAPI, and any input it cannot parse (an error reply when
//! the protocol has one, then the caller closes). It never panics on input
//! and keeps none of it: the caller's buffer holds at most one pending
//! message (513 bytes for a user/password subnegotiation, 262 for a request).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// How clients authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// No authentication (method 0).
    None,
    /// User and password (method 2, RFC 1929).
    UserPass {
        /// The one user accepted.
        user: String,
        /// That user's password.
        pass: String,
    },
}

/// Reply codes (RFC 1928 section 6).
pub mod reply {
    /// Succeeded.
    pub const SUCCEEDED: u8 = 0;
    /// General SOCKS server failure.
    pub const GENERAL_FAILURE: u8 = 1;
    /// Connection not allowed by ruleset.
    pub const NOT_ALLOWED: u8 = 2;
    /// Network unreachable.
    pub const NETWORK_UNREACHABLE: u8 = 3;
    /// Host unreachable.
    pub const HOST_UNREACHABLE: u8 = 4;
    /// Connection refused.
    pub const CONNECTION_REFUSED: u8 = 5;
    /// TTL expired.
    pub const TTL_EXPIRED: u8 = 6;
    /// Command not supported.
    pub const COMMAND_NOT_SUPPORTED: u8 = 7;
    /// Address type not supported.
    pub const ADDRESS_NOT_SUPPORTED: u8 = 8;
}

/// What a client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// CONNECT (1): a TCP stream to the target.
    Connect,
    /// UDP ASSOCIATE (3): relay datagrams; the target is where the client sends from.
    UdpAssociate,
}

/// Where to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An IPv4 or IPv6 address and a port.
    Addr(SocketAddr),
    /// A name (1 to 255 bytes of UTF-8) and a port.
    Domain(String, u16),
}

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What it asks for.
    pub command: Command,
    /// Where to (DST.ADDR, DST.PORT).
    pub target: Target,
}

/// What [`Handshake::feed`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// More bytes are needed (none consumed).
    Need,
    /// Send these to the client and go on feeding.
    Reply(Vec<u8>),
    /// The request is complete: answer it with [`reply()`].
    Request(Request),
    /// Send these (maybe nothing) and close; why, for counting.
    Fail(Vec<u8>, &'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    UserPass,
    Request,
    Done,
}

/// One client's handshake.
#[derive(Debug)]
pub struct Handshake {
    auth: Auth,
    state: State,
}

const VERSION: u8 = 5;
const NO_ACCEPTABLE: [u8; 2] = [VERSION, 0xff];
const UNSPECIFIED: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

impl Handshake {
    /// A handshake that accepts clients by `auth`.
    pub fn new(auth: Auth) -> Self {
        Handshake { auth, state: State::Greeting }
    }

    /// Feeds the bytes received and not consumed yet; how many the step
    /// consumed (one message at most: the caller feeds the rest again).
    pub fn feed(&mut self, data: &[u8]) -> (usize, Step) {
        let (used, step) = match self.state {
            State::Greeting => self.greeting(data),
            State::UserPass => self.user_pass(data),
            State::Request => request(data),
            State::Done => (0, Step::Fail(Vec::new(), "request after done")),
        };
        match step {
            Step::Request(_) | Step::Fail(..) => self.state = State::Done,
            _ => {}
        }
        (used, step)
    }

    fn greeting(&mut self, d: &[u8]) -> (usize, Step) {
        let Some(&ver) = d.first() else { return (0, Step::Need) };
        if ver != VERSION {
            return (0, Step::Fail(Vec::new(), "not socks version 5"));
        }
        let Some(&n) = d.get(1) else { return (0, Step::Need) };
        if n == 0 {
            return (0, Step::Fail(NO_ACCEPTABLE.to_vec(), "empty method list"));
        }
        let Some(methods) = d.get(2..2 + n as usize) else { return (0, Step::Need) };
        let (want, next) = match self.auth {
            Auth::None => (0u8, State::Request),
            Auth::UserPass { .. } => (2u8, State::UserPass),
        };
        if !methods.contains(&want) {
            return (0, Step::Fail(NO_ACCEPTABLE.to_vec(), "no acceptable method"));
        }
        self.state = next;
        (2 + n as usize, Step::Reply(vec![VERSION, want]))
    }

    fn user_pass(&mut self, d: &[u8]) -> (usize, Step) {
        let Some(&ver) = d.first() else { return (0, Step::Need) };
        if ver != 1 {
            return (0, Step::Fail(vec![1, 1], "bad authentication version"));
        }
        let Some(&ulen) = d.get(1) else { return (0, Step::Need) };
        let u_end = 2 + ulen as usize;
        let Some(&plen) = d.get(u_end) else { return (0, Step::Need) };
        let p_end = u_end + 1 + plen as usize;
        if d.len() < p_end {
            return (0, Step::Need);
        }
        let (user, pass) = (&d[2..u_end], &d[u_end + 1..p_end]);
        let Auth::UserPass { user: u, pass: p } = &self.auth else {
            return (0, Step::Fail(vec![1, 1], "unexpected authentication"));
        };
        // Both compared in full, whatever differs first.
        let ok = same(user, u.as_bytes()) & same(pass, p.as_bytes());
        if !ok {
            return (p_end, Step::Fail(vec![1, 1], "bad credentials"));
        }
        self.state = State::Request;
        (p_end, Step::Reply(vec![1, 0]))
    }
}

/// Equality without an early exit on the first differing byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(!x);
    }
    diff == 0
}

/// Parses a request: VER CMD RSV ATYP DST.ADDR DST.PORT.
fn request(d: &[u8]) -> (usize, Step) {
    let Some(&ver) = d.first() else { return (0, Step::Need) };
    if ver != VERSION {
        return (0, Step::Fail(Vec::new(), "not socks version 5"));
    }
    let Some(&cmd) = d.get(1) else { return (0, Step::Need) };
    if d.len() < 4 {
        return (0, Step::Need);
    }
    let command = match cmd {
        1 => Command::Connect,
        3 => Command::UdpAssociate,
        _ => return (0, Step::Fail(reply(reply::COMMAND_NOT_SUPPORTED, UNSPECIFIED), "unsupported command")),
    };
    match address(&d[3..]) {
        Addr::Need => (0, Step::Need),
        Addr::Bad(code, why) => (0, Step::Fail(reply(code, UNSPECIFIED), why)),
        Addr::Ok(target, len) => (3 + len, Step::Request(Request { command, target })),
    }
}

enum Addr {
    Need,
    Bad(u8, &'static str),
    Ok(Target, usize),
}

/// ATYP DST.ADDR DST.PORT; the target and its length.
fn address(d: &[u8]) -> Addr {
    let Some(&atyp) = d.first() else { return Addr::Need };
    let port = |at: usize| d.get(at..at + 2).map(|p| u16::from_be_bytes([p[0], p[1]]));
    match atyp {
        1 => match (d.get(1..5), port(5)) {
            (Some(a), Some(p)) => {
                let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
                Addr::Ok(Target::Addr(SocketAddr::new(ip.into(), p)), 7)
            }
            _ => Addr::Need,
        },
        4 => match (d.get(1..17), port(17)) {
            (Some(a), Some(p)) => {
                let mut o = [0u8; 16];
                o.copy_from_slice(a);
                Addr::Ok(Target::Addr(SocketAddr::new(Ipv6Addr::from(o).into(), p)), 19)
            }
            _ => Addr::Need,
        },
        3 => {
            let Some(&n) = d.get(1) else { return Addr::Need };
            if n == 0 {
                return Addr::Bad(reply::GENERAL_FAILURE, "empty domain name");
            }
            let end = 2 + n as usize;
            match (d.get(2..end), port(end)) {
                (Some(name), Some(p)) => match std::str::from_utf8(name) {
                    Ok(name) => Addr::Ok(Target::Domain(name.to_string(), p), end + 2),
                    Err(_) => Addr::Bad(reply::GENERAL_FAILURE, "domain name not UTF-8"),
                },
                _ => Addr::Need,
            }
        }
        _ => Addr::Bad(reply::ADDRESS_NOT_SUPPORTED, "bad address type"),
    }
}

/// A reply: VER REP RSV ATYP BND.ADDR BND.PORT.
pub fn reply(code: u8, bound: SocketAddr) -> Vec<u8> {
    let mut out = vec![VERSION, code, 0];
    push_addr(&mut out, bound);
    out
}

/// Appends a SOCKS5 address as requests, replies and UDP headers carry it:
/// ATYP (1: IPv4, 4: IPv6), the address, the port.
pub fn push_addr(out: &mut Vec<u8>, a: SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            out.push(1);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

/// Parses a UDP ASSOCIATE datagram: RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA.
pub fn parse_udp(d: &[u8]) -> Result<(Target, &[u8]), &'static str> {
    if d.len() < 4 {
        return Err("short datagram");
    }
    if d[2] != 0 {
        return Err("fragmented datagram");
    }
    match address(&d[3..]) {
        Addr::Ok(t, len) => Ok((t, &d[3 + len..])),
        Addr::Need => Err("short datagram"),
        Addr::Bad(_, why) => Err(why),
    }
}

/// The header in front of a datagram from `from` relayed to the client.
pub fn udp_header(from: SocketAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(&[0, 0, 0]);
    push_addr(out, from);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_at_once(auth: Auth, bytes: &[u8]) -> (Vec<Step>, usize) {
        let mut h = Handshake::new(auth);
        let mut buf = bytes.to_vec();
        let mut steps = Vec::new();
        let mut consumed = 0;
        loop {
            let (used, step) = h.feed(&buf);
            buf.drain(..used);
            consumed += used;
            let end = matches!(step, Step::Need | Step::Request(_) | Step::Fail(..));
            steps.push(step);
            if end {
                return (steps, consumed);
            }
        }
    }

    /// Feeds `pieces` one after the other, each as it arrives, until a
    /// request or a failure; the steps (ending in `Need` if neither came)
    /// and the bytes left unread.
    fn fed_in<'a>(auth: Auth, pieces: impl IntoIterator<Item = &'a [u8]>) -> (Vec<Step>, Vec<u8>) {
        let mut h = Handshake::new(auth);
        let mut buf = Vec::new();
        let mut steps = Vec::new();
        for piece in pieces {
            buf.extend_from_slice(piece);
            loop {
                let (used, step) = h.feed(&buf);
                buf.drain(..used);
                match step {
                    Step::Need => break,
                    s @ (Step::Request(_) | Step::Fail(..)) => {
                        steps.push(s);
                        return (steps, buf);
                    }
                    s => steps.push(s),
                }
            }
        }
        steps.push(Step::Need);
        (steps, buf)
    }

    /// Feeds one byte at a time, as a slow client sends: the same steps.
    fn byte_by_byte(auth: Auth, bytes: &[u8]) -> Vec<Step> {
        fed_in(auth, bytes.chunks(1)).0
    }

    #[test]
    fn connects_by_ipv4_ipv6_and_name_pipelined_or_byte_by_byte() {
        let v4 = [5, 1, 0, 5, 1, 0, 1, 10, 244, 2, 5, 0, 80];
        let mut v6 = vec![5, 2, 2, 0, 5, 1, 0, 4];
        v6.extend_from_slice(&"2001:db8::5".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&443u16.to_be_bytes());
        let name = [&[5u8, 1, 0, 5, 3, 0, 3, 3][..], b"pod", &[0, 53]].concat();
        let cases: [(&[u8], Target); 3] = [
            (&v4, Target::Addr("10.244.2.5:80".parse().unwrap())),
            (&v6, Target::Addr("[2001:db8::5]:443".parse().unwrap())),
            (&name, Target::Domain("pod".into(), 53)),
        ];
        for (bytes, target) in cases {
            let command = if bytes == &name[..] { Command::UdpAssociate } else { Command::Connect };
            let want = vec![Step::Reply(vec![5, 0]), Step::Request(Request { command, target })];
            let (steps, used) = all_at_once(Auth::None, bytes);
            assert_eq!(steps, want);
            assert_eq!(used, bytes.len());
            assert_eq!(byte_by_byte(Auth::None, bytes), want);
        }
    }

    #[test]
    fn pipelined_bytes_split_anywhere_give_the_same_steps() {
        let auth = Auth::UserPass { user: "u".into(), pass: "p".into() };
        let flows: [(Auth, &[u8]); 3] = [
            (Auth::None, &[5, 1, 0, 5, 1, 0, 1, 10, 244, 2, 5, 0, 80]),
            (Auth::None, &[5, 1, 0, 5, 1, 0, 3, 3, b'p', b'o', b'd', 0, 53]),
            (auth, &[5, 1, 2, 1, 1, b'u', 1, b'p', 5, 3, 0, 1, 0, 0, 0, 0, 0, 0]),
        ];
        for (auth, bytes) in flows {
            let (want, _) = all_at_once(auth.clone(), bytes);
            for cut in 0..=bytes.len() {
                let (steps, buf) = fed_in(auth.clone(), [&bytes[..cut], &bytes[cut..]]);
                assert_eq!(steps, want, "cut at {cut}");
                assert!(buf.is_empty(), "cut at {cut}: {buf:?} left");
            }
        }
    }

    #[test]
    fn user_and_password_are_checked() {
        let auth = Auth::UserPass { user: "weft".into(), pass: "s3cret".into() };
        let good = [&[5u8, 2, 0, 2, 1, 4][..], b"weft", &[6], b"s3cret", &[5, 1, 0, 1, 10, 0, 0, 1, 0, 22]].concat();
        let (steps, _) = all_at_once(auth.clone(), &good);
        assert_eq!(steps[..2], [Step::Reply(vec![5, 2]), Step::Reply(vec![1, 0])]);
        assert!(matches!(steps[2], Step::Request(_)));
        assert_eq!(byte_by_byte(auth.clone(), &good), steps);
        let bad = [&[5u8, 1, 2, 1, 4][..], b"weft", &[6], b"s3creT"].concat();
        assert_eq!(all_at_once(auth.clone(), &bad).0[1], Step::Fail(vec![1, 1], "bad credentials"));
        // A client offering only "no authentication" to a server that wants a password.
        assert_eq!(all_at_once(auth, &[5, 1, 0]).0[0], Step::Fail(vec![5, 0xff], "no acceptable method"));
    }

    #[test]
    fn refusals_carry_the_reply_the_protocol_has() {
        let fail = |bytes: &[u8]| all_at_once(Auth::None, bytes).0.pop().unwrap();
        assert_eq!(fail(&[4, 1, 0, 80, 10, 0, 0, 1, 0]), Step::Fail(vec![], "not socks version 5"));
        assert_eq!(fail(&[5, 0]), Step::Fail(vec![5, 0xff], "empty method list"));
        assert_eq!(fail(&[5, 1, 2]), Step::Fail(vec![5, 0xff], "no acceptable method"));
        assert_eq!(
            fail(&[5, 1, 0, 5, 2, 0, 1, 10, 0, 0, 1, 0, 80]),
            Step::Fail(reply(reply::COMMAND_NOT_SUPPORTED, UNSPECIFIED), "unsupported command")
        );
        assert_eq!(
            fail(&[5, 1, 0, 5, 1, 0, 9, 1, 2, 3, 4]),
            Step::Fail(reply(reply::ADDRESS_NOT_SUPPORTED, UNSPECIFIED), "bad address type")
        );
        assert_eq!(fail(&[5, 1, 0, 5, 1, 0, 3, 0, 0, 80]), Step::Fail(reply(1, UNSPECIFIED), "empty domain name"));
        assert_eq!(
            fail(&[5, 1, 0, 5, 1, 0, 3, 1, 0xff, 0, 80]),
            Step::Fail(reply(1, UNSPECIFIED), "domain name not UTF-8")
        );
        let mut h = Handshake::new(Auth::None);
        let _ = h.feed(&[5, 1, 0]);
        let _ = h.feed(&[5, 1, 0, 1, 10, 0, 0, 1, 0, 80]);
        assert_eq!(h.feed(&[5]), (0, Step::Fail(vec![], "request after done")));
    }

    #[test]
    fn replies_and_udp_headers_round_trip() {
        assert_eq!(reply(0, "10.244.3.1:49152".parse().unwrap()), vec![5, 0, 0, 1, 10, 244, 3, 1, 0xc0, 0]);
        assert_eq!(reply(5, "[::1]:1".parse().unwrap()).len(), 22);
        for from in ["10.244.2.5:53", "[2001:db8::5]:5353"] {
            let from: SocketAddr = from.parse().unwrap();
            let mut d = Vec::new();
            udp_header(from, &mut d);
            d.extend_from_slice(b"payload");
            assert_eq!(parse_udp(&d), Ok((Target::Addr(from), &b"payload"[..])));
        }
        assert_eq!(parse_udp(&[0, 0, 1, 1, 10, 0, 0, 1, 0, 53, 7]), Err("fragmented datagram"));
        assert_eq!(parse_udp(&[0, 0, 0, 1, 10, 0]), Err("short datagram"));
        assert_eq!(parse_udp(&[0, 0, 0, 7, 10, 0, 0, 1, 0, 53]), Err("bad address type"));
        assert_eq!(
            parse_udp(&[0, 0, 0, 3, 3, b'p', b'o', b'd', 0, 53, 9]),
            Ok((Target::Domain("pod".into(), 53), &[9][..]))
        );
    }
}
