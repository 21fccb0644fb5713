//! The protocol half: the `get=1` / `set=1` text of the cross-platform
//! userspace API, parsed into typed requests and formatted back, and the
//! WireGuard key type.
//!
//! Pure: bytes come in through any [`BufRead`], typed requests go out, replies
//! are returned as text. It opens no socket, starts no thread and reads no
//! clock (a handshake time is a `SystemTime` the caller gives); the server
//! ([`crate::server`]) does the I/O.

use std::collections::HashSet;
use std::fmt::{self, Write as _};
use std::io::{self, BufRead};
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ipnet::IpNet;
use nix::errno::Errno;
use sha2::{Digest, Sha256};

/// Longest line accepted, without its newline. The longest valid line is a
/// key line (`preshared_key=` and 64 hex digits, 78 bytes); an endpoint with
/// an IPv6 address and a scope stays under 80. 1024 leaves room for keys a
/// later protocol version may add while keeping a hostile line cheap.
pub const MAX_LINE_BYTES: usize = 1024;
/// Longest request accepted, in bytes. A peer of a Flannel cluster takes about
/// 300 bytes (key, preshared key, endpoint, keepalive, two allowed IPs), so a
/// 5000-node cluster, Kubernetes' limit, sends about 1.5 MiB; 16 MiB is ten
/// times that, and a parsed request stays within a few tens of MiB.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// A Curve25519 key or a preshared key: 32 bytes, lowercase hex on the wire,
/// base64 in `wg`'s files and output. `Debug` prints a SHA-256 fingerprint,
/// never the key, since the type also holds private keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// The all-zero key, which the protocol uses to mean "no key".
    pub const ZERO: Key = Key([0; 32]);

    /// Whether this is the all-zero key.
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|&b| b == 0)
    }

    /// 64 lowercase hex digits, as the protocol writes keys.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Exactly 64 hex digits, either case (wireguard-go accepts both).
    pub fn from_hex(s: &str) -> Option<Key> {
        let mut key = [0u8; 32];
        hex::decode_to_slice(s, &mut key).ok()?;
        Some(Key(key))
    }

    /// Standard padded base64 (44 characters), as `wg genkey` writes keys.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// The public key of this private key (X25519 with the base point, as
    /// `wg pubkey`).
    pub fn public_key(&self) -> Key {
        Key(*x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(self.0)).as_bytes())
    }

    /// Standard padded base64 of exactly 32 bytes.
    pub fn from_base64(s: &str) -> Option<Key> {
        if s.len() != 44 {
            return None;
        }
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
        Some(Key(bytes.try_into().ok()?))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digest = Sha256::digest(self.0);
        write!(f, "Key(sha256:{:02x}{:02x}{:02x}{:02x})", digest[0], digest[1], digest[2], digest[3])
    }
}

/// The changes a set request makes to one peer, in the protocol's terms.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer, created unless `update_only` (`public_key=`).
    pub public_key: Key,
    /// Remove the peer; the request's other keys for it are ignored (`remove=true`).
    pub remove: bool,
    /// Change the peer only if it exists (`update_only=true`).
    pub update_only: bool,
    /// `Some(Some(k))` sets the preshared key, `Some(None)` clears it (the
    /// all-zero key on the wire), `None` leaves it.
    pub preshared_key: Option<Option<Key>>,
    /// New endpoint (`endpoint=`).
    pub endpoint: Option<SocketAddr>,
    /// New persistent keepalive interval in seconds, 0 = off
    /// (`persistent_keepalive_interval=`).
    pub persistent_keepalive: Option<u16>,
    /// Drop the peer's allowed IPs before adding `allowed_ips`
    /// (`replace_allowed_ips=true`).
    pub replace_allowed_ips: bool,
    /// Prefixes routed to this peer, taken from any peer that has them
    /// (`allowed_ip=`), as written: the device masks them.
    pub allowed_ips: Vec<IpNet>,
    /// Prefixes removed from this peer if it has them (`allowed_ip=-`, sent
    /// by `wg` 1.0.20250521 and later for `allowed-ips -10.0.0.0/24`). Applied
    /// after `allowed_ips`; the parser drops an earlier removal when the same
    /// prefix is added again, so this order gives the protocol's line order.
    pub remove_allowed_ips: Vec<IpNet>,
}

impl PeerConfig {
    /// A configuration that names `public_key` and changes nothing.
    pub fn new(public_key: Key) -> Self {
        PeerConfig {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
            remove_allowed_ips: Vec::new(),
        }
    }
}

/// A parsed `set=1` request. Keys absent from the request are `None`/`false`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SetRequest {
    /// `Some(Some(k))` sets the private key, `Some(None)` clears it (all-zero
    /// key on the wire).
    pub private_key: Option<Option<Key>>,
    /// New listen port; 0 asks for any free port.
    pub listen_port: Option<u16>,
    /// New fwmark; 0 clears it.
    pub fwmark: Option<u32>,
    /// Remove every peer before applying `peers` (`replace_peers=true`).
    pub replace_peers: bool,
    /// Per-peer changes, in request order (a key may appear more than once).
    pub peers: Vec<PeerConfig>,
}

/// One request read from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `get=1`: report the device.
    Get,
    /// `set=1`: change the device.
    Set(SetRequest),
}

/// Why a request was refused or could not be served. Each maps to the errno
/// the reply carries ([`UapiError::errno`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    /// The first line is neither `get=1` nor `set=1` (EINVAL).
    #[error("unknown operation `{0}`: expected get=1 or set=1")]
    UnknownOperation(String),
    /// `get=1` was not followed by the blank line (EINVAL).
    #[error("get=1 must be followed by a blank line")]
    TrailingGet,
    /// A line has no `=` (EPROTO, as wireguard-go).
    #[error("line `{0}` is not key=value")]
    NotKeyValue(String),
    /// A line is not UTF-8 (EINVAL).
    #[error("a line is not UTF-8")]
    NotUtf8,
    /// A key the device section does not know (EINVAL).
    #[error("unknown device key `{0}`")]
    UnknownDeviceKey(String),
    /// A key the peer section does not know (EINVAL).
    #[error("unknown peer key `{0}`")]
    UnknownPeerKey(String),
    /// A peer key before any `public_key` (EINVAL).
    #[error("peer key `{0}` before any public_key")]
    PeerKeyBeforePublicKey(String),
    /// A device key after the first `public_key` (EINVAL).
    #[error("device key `{0}` after a public_key")]
    DeviceKeyAfterPeer(String),
    /// A value that does not parse (EINVAL). Key values are never echoed.
    #[error("{key}: `{value}` refused: expected {accepted}")]
    InvalidValue {
        /// The key.
        key: &'static str,
        /// The value given, or `<secret>` for keys.
        value: String,
        /// What would be accepted.
        accepted: &'static str,
    },
    /// `protocol_version` other than 1 (EINVAL).
    #[error("protocol_version `{0}` refused: only 1 is spoken")]
    ProtocolVersion(String),
    /// A line longer than [`MAX_LINE_BYTES`] (EMSGSIZE).
    #[error("line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    /// A request longer than [`MAX_REQUEST_BYTES`]; its end is lost, so the
    /// connection is closed after the reply (EMSGSIZE).
    #[error("request longer than {MAX_REQUEST_BYTES} bytes")]
    RequestTooLong,
    /// The stream ended inside a request (EPROTO).
    #[error("stream ended inside a request")]
    Truncated,
    /// Reading the stream failed, a timeout included (EIO).
    #[error("reading the request: {0}")]
    Io(io::ErrorKind),
    /// The device could not bind its listen port (EADDRINUSE).
    #[error("listen port {0} is in use")]
    PortInUse(u16),
    /// The device does not support what the request asks (EOPNOTSUPP).
    #[error("not supported: {0}")]
    Unsupported(&'static str),
}

impl UapiError {
    /// The positive errno of this refusal (`EINVAL` = 22, ...). The server
    /// sends it negated, `errno=-22`, as wireguard-go does: `wg set` turns
    /// that into "Invalid argument" (it reports a positive number as
    /// "Unknown error -22").
    pub fn errno(&self) -> i32 {
        let e = match self {
            UapiError::NotKeyValue(_) | UapiError::Truncated => Errno::EPROTO,
            UapiError::LineTooLong | UapiError::RequestTooLong => Errno::EMSGSIZE,
            UapiError::Io(_) => Errno::EIO,
            UapiError::PortInUse(_) => Errno::EADDRINUSE,
            UapiError::Unsupported(_) => Errno::EOPNOTSUPP,
            UapiError::UnknownOperation(_)
            | UapiError::TrailingGet
            | UapiError::NotUtf8
            | UapiError::UnknownDeviceKey(_)
            | UapiError::UnknownPeerKey(_)
            | UapiError::PeerKeyBeforePublicKey(_)
            | UapiError::DeviceKeyAfterPeer(_)
            | UapiError::InvalidValue { .. }
            | UapiError::ProtocolVersion(_) => Errno::EINVAL,
        };
        e as i32
    }

    /// Whether the request's end was lost, so the connection cannot go on.
    pub fn is_fatal(&self) -> bool {
        matches!(self, UapiError::RequestTooLong | UapiError::Truncated | UapiError::Io(_))
    }
}

/// Reads one request: `get=1` and a blank line, or `set=1`, key=value lines
/// and a blank line. `Ok(None)` on a clean end of stream before a request.
///
/// On a refusal the rest of the request, up to its blank line, has been
/// consumed, so the next call reads the next request, unless the error
/// [`is_fatal`](UapiError::is_fatal). Every read is bounded by
/// [`MAX_LINE_BYTES`] and [`MAX_REQUEST_BYTES`].
pub fn read_request<R: BufRead>(r: &mut R) -> Result<Option<Request>, UapiError> {
    read_request_bounded(r, MAX_LINE_BYTES, MAX_REQUEST_BYTES)
}

/// What the device reports about one peer.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct PeerStatus {
    /// The peer's public key.
    pub public_key: Key,
    /// The preshared key, if one is set.
    pub preshared_key: Option<Key>,
    /// The current endpoint, if known.
    pub endpoint: Option<SocketAddr>,
    /// Persistent keepalive interval in seconds, 0 = off.
    pub persistent_keepalive: u16,
    /// Prefixes routed to the peer (reported masked).
    pub allowed_ips: Vec<IpNet>,
    /// When the last handshake completed, if ever.
    pub last_handshake: Option<SystemTime>,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
}

/// What the device reports about itself.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct DeviceStatus {
    /// The private key, if one is set.
    pub private_key: Option<Key>,
    /// The port bound, 0 when none.
    pub listen_port: u16,
    /// The fwmark, if one is set.
    pub fwmark: Option<u32>,
    /// The peers, in the order they are reported.
    pub peers: Vec<PeerStatus>,
}

impl DeviceStatus {
    /// Applies a set request to this configuration the way WireGuard does
    /// (the order [`Device::apply`](crate::Device::apply) describes): a new private key drops the
    /// peer that has its public key, a peer with the device's own public key
    /// is ignored, `update_only` skips unknown peers, a prefix belongs to one
    /// peer at a time (adding it to one takes it from any other), prefixes
    /// are kept masked. Binding the port and the fwmark is the caller's part;
    /// run-time fields (handshake, counters) of kept peers stay as they are.
    pub fn apply_set(&mut self, req: &SetRequest) {
        if let Some(k) = req.private_key {
            self.private_key = k.filter(|k| !k.is_zero());
        }
        let own = self.private_key.map(|k| k.public_key());
        if let Some(own) = own {
            self.peers.retain(|p| p.public_key != own);
        }
        if let Some(port) = req.listen_port {
            self.listen_port = port;
        }
        if let Some(mark) = req.fwmark {
            self.fwmark = Some(mark).filter(|&m| m != 0);
        }
        if req.replace_peers {
            self.peers.clear();
        }
        for pc in &req.peers {
            if Some(pc.public_key) == own {
                continue;
            }
            let existing = self.peers.iter().position(|p| p.public_key == pc.public_key);
            if pc.remove {
                if let Some(i) = existing {
                    self.peers.remove(i);
                }
                continue;
            }
            let i = match existing {
                Some(i) => i,
                None if pc.update_only => continue,
                None => {
                    self.peers.push(PeerStatus { public_key: pc.public_key, ..Default::default() });
                    self.peers.len() - 1
                }
            };
            let p = &mut self.peers[i];
            if let Some(psk) = pc.preshared_key {
                p.preshared_key = psk.filter(|k| !k.is_zero());
            }
            if let Some(ep) = pc.endpoint {
                p.endpoint = Some(ep);
            }
            if let Some(secs) = pc.persistent_keepalive {
                p.persistent_keepalive = secs;
            }
            if pc.replace_allowed_ips {
                p.allowed_ips.clear();
            }
            // A prefix belongs to one peer: taken from the others, added here
            // once, in the order given. Through sets, so that one peer of
            // many prefixes (wireguard-go's netns.sh sets 130 560 on one)
            // costs linear time, not quadratic.
            let added: HashSet<IpNet> = pc.allowed_ips.iter().map(IpNet::trunc).collect();
            if !added.is_empty() {
                for (j, other) in self.peers.iter_mut().enumerate() {
                    if j != i {
                        other.allowed_ips.retain(|n| !added.contains(n));
                    }
                }
                let p = &mut self.peers[i];
                let mut have: HashSet<IpNet> = p.allowed_ips.iter().copied().collect();
                for net in pc.allowed_ips.iter().map(IpNet::trunc) {
                    if have.insert(net) {
                        p.allowed_ips.push(net);
                    }
                }
            }
            let removed: HashSet<IpNet> = pc.remove_allowed_ips.iter().map(IpNet::trunc).collect();
            if !removed.is_empty() {
                self.peers[i].allowed_ips.retain(|n| !removed.contains(n));
            }
        }
    }
}

/// The reply to `get=1`, laid out as wireguard-go lays it out: `private_key`
/// (if set and not zero), `listen_port` (if not 0), `fwmark` (if set and not
/// 0); per peer `public_key`, `preshared_key` (always, all zeros when none, as
/// wireguard-go), `protocol_version=1`, `endpoint` (if known; IPv6 in
/// brackets), `last_handshake_time_sec`/`_nsec` (0 when never), `tx_bytes`,
/// `rx_bytes`, `persistent_keepalive_interval`, one `allowed_ip` per prefix;
/// then `errno=0` and a blank line.
pub fn format_get(status: &DeviceStatus) -> String {
    let mut out = String::with_capacity(128 + status.peers.len() * 400);
    if let Some(k) = status.private_key.filter(|k| !k.is_zero()) {
        line(&mut out, "private_key", k.to_hex());
    }
    if status.listen_port != 0 {
        line(&mut out, "listen_port", status.listen_port);
    }
    if let Some(mark) = status.fwmark.filter(|&m| m != 0) {
        line(&mut out, "fwmark", mark);
    }
    for p in &status.peers {
        line(&mut out, "public_key", p.public_key.to_hex());
        line(&mut out, "preshared_key", p.preshared_key.unwrap_or(Key::ZERO).to_hex());
        line(&mut out, "protocol_version", 1);
        if let Some(ep) = p.endpoint {
            line(&mut out, "endpoint", ep);
        }
        let since = p.last_handshake.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).unwrap_or(Duration::ZERO);
        line(&mut out, "last_handshake_time_sec", since.as_secs());
        line(&mut out, "last_handshake_time_nsec", since.subsec_nanos());
        line(&mut out, "tx_bytes", p.tx_bytes);
        line(&mut out, "rx_bytes", p.rx_bytes);
        line(&mut out, "persistent_keepalive_interval", p.persistent_keepalive);
        for net in &p.allowed_ips {
            line(&mut out, "allowed_ip", net.trunc());
        }
    }
    out.push_str("errno=0\n\n");
    out
}

/// A set request as `wg` writes it, `set=1` through the blank line: the
/// client side of [`read_request`], which reads it back unchanged.
pub fn format_set(req: &SetRequest) -> String {
    let mut out = String::from("set=1\n");
    if let Some(k) = req.private_key {
        line(&mut out, "private_key", k.unwrap_or(Key::ZERO).to_hex());
    }
    if let Some(port) = req.listen_port {
        line(&mut out, "listen_port", port);
    }
    if let Some(mark) = req.fwmark {
        line(&mut out, "fwmark", mark);
    }
    if req.replace_peers {
        line(&mut out, "replace_peers", "true");
    }
    for p in &req.peers {
        line(&mut out, "public_key", p.public_key.to_hex());
        if p.remove {
            line(&mut out, "remove", "true");
        }
        if p.update_only {
            line(&mut out, "update_only", "true");
        }
        if let Some(k) = p.preshared_key {
            line(&mut out, "preshared_key", k.unwrap_or(Key::ZERO).to_hex());
        }
        if let Some(ep) = p.endpoint {
            line(&mut out, "endpoint", ep);
        }
        if let Some(secs) = p.persistent_keepalive {
            line(&mut out, "persistent_keepalive_interval", secs);
        }
        if p.replace_allowed_ips {
            line(&mut out, "replace_allowed_ips", "true");
        }
        for net in &p.allowed_ips {
            line(&mut out, "allowed_ip", net);
        }
        for net in &p.remove_allowed_ips {
            line(&mut out, "allowed_ip", format_args!("-{net}"));
        }
    }
    out.push('\n');
    out
}

/// The reply `errno=N` and a blank line, `N` written as given: 0 for success;
/// the server sends `-e.errno()` for a refusal, as wireguard-go does.
pub fn format_errno(errno: i32) -> String {
    format!("errno={errno}\n\n")
}

// ---------------------------------------------------------------------------
// Parsing.

/// Keys of the device section.
const DEVICE_KEYS: &[&str] = &["private_key", "listen_port", "fwmark", "replace_peers"];
/// Keys of a peer section, `public_key` aside.
const PEER_KEYS: &[&str] = &[
    "update_only",
    "remove",
    "preshared_key",
    "endpoint",
    "persistent_keepalive_interval",
    "replace_allowed_ips",
    "allowed_ip",
    "protocol_version",
];
/// Longest piece of client text echoed in an error (an unknown key, a bad
/// line): enough to recognise it, too short to carry a key that was sent
/// under the wrong name.
const ECHO_CHARS: usize = 24;

fn read_request_bounded<R: BufRead>(
    r: &mut R,
    max_line: usize,
    max_request: usize,
) -> Result<Option<Request>, UapiError> {
    let mut lines = Lines { r, consumed: 0, max_line, max_request };
    let op = match lines.next()? {
        Line::Eof => return Ok(None),
        Line::Text(t) => t,
        Line::TooLong => return lines.fail(UapiError::LineTooLong),
        Line::NotUtf8 => return lines.fail(UapiError::NotUtf8),
    };
    match op.as_str() {
        "get=1" => match lines.next()? {
            Line::Text(t) if t.is_empty() => Ok(Some(Request::Get)),
            Line::Eof => Err(UapiError::Truncated),
            _ => lines.fail(UapiError::TrailingGet),
        },
        "set=1" => parse_set(&mut lines).map(|req| Some(Request::Set(req))),
        // A lone blank line: an empty request, already ended.
        "" => Err(UapiError::UnknownOperation(String::new())),
        other => {
            let err = UapiError::UnknownOperation(echo(other));
            lines.fail(err)
        }
    }
}

fn parse_set<R: BufRead>(lines: &mut Lines<'_, R>) -> Result<SetRequest, UapiError> {
    let mut req = SetRequest::default();
    let mut peer: Option<PeerConfig> = None;
    loop {
        let text = match lines.next()? {
            Line::Text(t) => t,
            Line::Eof => return Err(UapiError::Truncated),
            Line::TooLong => return lines.fail(UapiError::LineTooLong),
            Line::NotUtf8 => return lines.fail(UapiError::NotUtf8),
        };
        if text.is_empty() {
            req.peers.extend(peer);
            return Ok(req);
        }
        if let Err(e) = parse_set_line(&mut req, &mut peer, &text) {
            return lines.fail(e);
        }
    }
}

fn parse_set_line(req: &mut SetRequest, peer: &mut Option<PeerConfig>, text: &str) -> Result<(), UapiError> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(UapiError::NotKeyValue(echo(text)));
    };
    if key == "public_key" {
        let k = Key::from_hex(value).ok_or_else(|| invalid("public_key", value, "64 hex digits"))?;
        req.peers.extend(peer.replace(PeerConfig::new(k)));
        return Ok(());
    }
    let Some(p) = peer.as_mut() else {
        return parse_device_line(req, key, value);
    };
    match key {
        "update_only" => p.update_only = parse_true("update_only", value)?,
        "remove" => p.remove = parse_true("remove", value)?,
        "preshared_key" => p.preshared_key = Some(parse_maybe_zero_key("preshared_key", value)?),
        "endpoint" => {
            let ep = SocketAddr::from_str(value)
                .map_err(|_| invalid("endpoint", value, "address:port, IPv6 in brackets, numeric scope"))?;
            p.endpoint = Some(ep);
        }
        "persistent_keepalive_interval" => {
            p.persistent_keepalive = Some(parse_decimal("persistent_keepalive_interval", value, "seconds, 0-65535")?)
        }
        "replace_allowed_ips" => {
            p.replace_allowed_ips = parse_true("replace_allowed_ips", value)?;
            // Lines apply in order: earlier allowed_ip lines are replaced too.
            p.allowed_ips.clear();
            p.remove_allowed_ips.clear();
        }
        "allowed_ip" => {
            let (removal, prefix) = match value.strip_prefix('-') {
                Some(rest) => (true, rest),
                None => (false, value),
            };
            let net = IpNet::from_str(prefix)
                .map_err(|_| invalid("allowed_ip", value, "[-]address/prefix-length, e.g. 10.244.1.0/24"))?;
            if removal {
                p.remove_allowed_ips.push(net);
            } else {
                p.remove_allowed_ips.retain(|n| n.trunc() != net.trunc());
                p.allowed_ips.push(net);
            }
        }
        "protocol_version" => {
            if value != "1" {
                return Err(UapiError::ProtocolVersion(echo(value)));
            }
        }
        _ if DEVICE_KEYS.contains(&key) => return Err(UapiError::DeviceKeyAfterPeer(key.to_string())),
        _ => return Err(UapiError::UnknownPeerKey(echo(key))),
    }
    Ok(())
}

fn parse_device_line(req: &mut SetRequest, key: &str, value: &str) -> Result<(), UapiError> {
    match key {
        "private_key" => req.private_key = Some(parse_maybe_zero_key("private_key", value)?),
        "listen_port" => req.listen_port = Some(parse_decimal("listen_port", value, "a port, 0-65535")?),
        "fwmark" => req.fwmark = Some(parse_decimal("fwmark", value, "a decimal 32-bit mark")?),
        "replace_peers" => req.replace_peers = parse_true("replace_peers", value)?,
        _ if PEER_KEYS.contains(&key) => return Err(UapiError::PeerKeyBeforePublicKey(key.to_string())),
        _ => return Err(UapiError::UnknownDeviceKey(echo(key))),
    }
    Ok(())
}

/// A key where all zeros means "clear": `Some(key)` or `None`.
fn parse_maybe_zero_key(key: &'static str, value: &str) -> Result<Option<Key>, UapiError> {
    let k = Key::from_hex(value).ok_or(UapiError::InvalidValue {
        key,
        value: "<secret>".to_string(),
        accepted: "64 hex digits",
    })?;
    Ok(Some(k).filter(|k| !k.is_zero()))
}

/// Only `true` is accepted, as wireguard-go (which refuses `false` too).
fn parse_true(key: &'static str, value: &str) -> Result<bool, UapiError> {
    if value == "true" {
        Ok(true)
    } else {
        Err(invalid(key, value, "true"))
    }
}

/// Unsigned decimal: digits only (no sign, no spaces, no `0x`), leading
/// zeros allowed as Go's `ParseUint` allows them.
fn parse_decimal<T: TryFrom<u64>>(key: &'static str, value: &str, accepted: &'static str) -> Result<T, UapiError> {
    let refuse = || invalid(key, value, accepted);
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(refuse());
    }
    let mut n: u64 = 0;
    for b in value.bytes() {
        n = n.checked_mul(10).and_then(|n| n.checked_add(u64::from(b - b'0'))).ok_or_else(refuse)?;
    }
    T::try_from(n).map_err(|_| refuse())
}

fn invalid(key: &'static str, value: &str, accepted: &'static str) -> UapiError {
    UapiError::InvalidValue { key, value: echo(value), accepted }
}

/// Client text cut to [`ECHO_CHARS`] characters for an error message.
fn echo(s: &str) -> String {
    match s.char_indices().nth(ECHO_CHARS) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

fn line(out: &mut String, key: &str, value: impl fmt::Display) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "{key}={value}");
}

/// One line read by [`Lines::next`].
enum Line {
    /// A line without its newline.
    Text(String),
    /// A line over the limit, consumed through its newline.
    TooLong,
    /// A line that is not UTF-8, consumed through its newline.
    NotUtf8,
    /// End of stream at a line boundary.
    Eof,
}

/// Bounded line reader over one request.
struct Lines<'a, R> {
    r: &'a mut R,
    /// Bytes of this request consumed so far (never above `max_request`).
    consumed: usize,
    max_line: usize,
    max_request: usize,
}

impl<R: BufRead> Lines<'_, R> {
    fn next(&mut self) -> Result<Line, UapiError> {
        let mut buf = Vec::new();
        let mut too_long = false;
        loop {
            let avail = match self.r.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(UapiError::Io(e.kind())),
            };
            if avail.is_empty() {
                return if buf.is_empty() && !too_long { Ok(Line::Eof) } else { Err(UapiError::Truncated) };
            }
            let newline = avail.iter().position(|&b| b == b'\n');
            let take = newline.map_or(avail.len(), |i| i + 1);
            if take > self.max_request - self.consumed {
                return Err(UapiError::RequestTooLong);
            }
            let body = &avail[..newline.unwrap_or(take)];
            if !too_long {
                if buf.len() + body.len() > self.max_line {
                    too_long = true;
                    buf = Vec::new();
                } else {
                    buf.extend_from_slice(body);
                }
            }
            self.r.consume(take);
            self.consumed += take;
            if newline.is_some() {
                if too_long {
                    return Ok(Line::TooLong);
                }
                return Ok(String::from_utf8(buf).map_or(Line::NotUtf8, Line::Text));
            }
        }
    }

    /// Consumes the rest of the request through its blank line, then returns
    /// `err`, or a fatal error met on the way.
    fn fail<T>(&mut self, err: UapiError) -> Result<T, UapiError> {
        loop {
            match self.next() {
                Ok(Line::Text(t)) if t.is_empty() => return Err(err),
                Ok(Line::Eof) | Err(UapiError::Truncated) => return Err(err),
                Ok(_) => {}
                Err(fatal) => return Err(fatal),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Redacting Debug impls.

/// Stands in for a secret in `Debug` output.
struct Secret;

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

fn redact(k: Option<Key>) -> Option<Secret> {
    k.map(|_| Secret)
}

impl fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConfig")
            .field("public_key", &self.public_key.to_base64())
            .field("remove", &self.remove)
            .field("update_only", &self.update_only)
            .field("preshared_key", &self.preshared_key.map(redact))
            .field("endpoint", &self.endpoint)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .field("replace_allowed_ips", &self.replace_allowed_ips)
            .field("allowed_ips", &self.allowed_ips)
            .field("remove_allowed_ips", &self.remove_allowed_ips)
            .finish()
    }
}

impl fmt::Debug for SetRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SetRequest")
            .field("private_key", &self.private_key.map(redact))
            .field("listen_port", &self.listen_port)
            .field("fwmark", &self.fwmark)
            .field("replace_peers", &self.replace_peers)
            .field("peers", &self.peers)
            .finish()
    }
}

impl fmt::Debug for PeerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerStatus")
            .field("public_key", &self.public_key.to_base64())
            .field("preshared_key", &redact(self.preshared_key))
            .field("endpoint", &self.endpoint)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .field("allowed_ips", &self.allowed_ips)
            .field("last_handshake", &self.last_handshake)
            .field("rx_bytes", &self.rx_bytes)
            .field("tx_bytes", &self.tx_bytes)
            .finish()
    }
}

impl fmt::Debug for DeviceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceStatus")
            .field("private_key", &redact(self.private_key))
            .field("listen_port", &self.listen_port)
            .field("fwmark", &self.fwmark)
            .field("peers", &self.peers)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn key(b: u8) -> Key {
        Key([b; 32])
    }

    fn parse(text: &str) -> Result<Option<Request>, UapiError> {
        read_request(&mut Cursor::new(text.as_bytes()))
    }

    fn parse_set_ok(text: &str) -> SetRequest {
        match parse(text) {
            Ok(Some(Request::Set(r))) => r,
            other => panic!("{text:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn test_key_hex_and_base64() {
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(11);
        }
        let k = Key(bytes);
        let hex = k.to_hex();
        assert_eq!(hex.len(), 64);
        assert!(hex.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        assert_eq!(Key::from_hex(&hex), Some(k));
        assert_eq!(Key::from_hex(&hex.to_uppercase()), Some(k));
        assert_eq!(Key::from_base64(&k.to_base64()), Some(k));
        // Known answer: 32 bytes of 0xff.
        assert_eq!(key(0xff).to_base64(), "//////////////////////////////////////////8=");
        assert_eq!(key(0xab).to_hex(), "ab".repeat(32));

        assert_eq!(Key::from_hex(&hex[..62]), None);
        assert_eq!(Key::from_hex(&format!("{hex}00")), None);
        assert_eq!(Key::from_hex(&format!("g{}", &hex[1..])), None);
        assert_eq!(Key::from_hex(&format!("+{}", &hex[1..])), None);
        assert_eq!(Key::from_hex(&format!("é{}", &hex[2..])), None);
        assert_eq!(Key::from_base64("AAAA"), None);
        assert_eq!(Key::from_base64(&"A".repeat(44)), None, "44 chars without padding decode to 33 bytes");
        assert_eq!(Key::from_base64("//////////////////////////////////////////9="), None, "non-canonical");
        assert!(Key::ZERO.is_zero() && !k.is_zero());
    }

    /// RFC 7748 section 6.1: Alice's private and public keys.
    #[test]
    fn test_public_key_known_answer() {
        let private = Key::from_hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a").unwrap();
        let public = Key::from_hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a").unwrap();
        assert_eq!(private.public_key(), public);
    }

    #[test]
    fn test_debug_never_prints_secrets() {
        let private = key(0x5a);
        let psk = key(0x3c);
        let mut peer = PeerConfig::new(key(0x11));
        peer.preshared_key = Some(Some(psk));
        let req = SetRequest { private_key: Some(Some(private)), peers: vec![peer], ..Default::default() };
        let status = DeviceStatus {
            private_key: Some(private),
            peers: vec![PeerStatus { public_key: key(0x11), preshared_key: Some(psk), ..Default::default() }],
            ..Default::default()
        };
        for text in [
            format!("{req:?}"),
            format!("{status:?}"),
            format!("{private:?}"),
            format!("{:?}", Request::Set(req.clone())),
        ] {
            for secret in [private, psk] {
                assert!(!text.contains(&secret.to_hex()), "{text}");
                assert!(!text.contains(&secret.to_base64()), "{text}");
                assert!(!text.contains(&secret.to_hex()[..16]), "{text}");
            }
        }
        assert!(format!("{req:?}").contains(&key(0x11).to_base64()), "public keys are shown");
        assert!(format!("{private:?}").starts_with("Key(sha256:"));
    }

    #[test]
    fn test_parse_get() {
        assert_eq!(parse("get=1\n\n"), Ok(Some(Request::Get)));
        assert_eq!(parse(""), Ok(None));
        assert_eq!(parse("get=1\n"), Err(UapiError::Truncated));
        assert_eq!(parse("get=1"), Err(UapiError::Truncated));
        // Several requests on one stream.
        let mut r = Cursor::new(b"get=1\n\nget=1\n\n".to_vec());
        assert_eq!(read_request(&mut r), Ok(Some(Request::Get)));
        assert_eq!(read_request(&mut r), Ok(Some(Request::Get)));
        assert_eq!(read_request(&mut r), Ok(None));
    }

    #[test]
    fn test_parse_set_every_key() {
        let (a, b, psk) = (key(1), key(2), key(3));
        let text = format!(
            "set=1\nprivate_key={}\nlisten_port=51820\nfwmark=4660\nreplace_peers=true\n\
             public_key={}\npreshared_key={}\nendpoint=192.0.2.1:51820\npersistent_keepalive_interval=25\n\
             replace_allowed_ips=true\nallowed_ip=10.244.1.0/24\nallowed_ip=fd00:0:0:1::/64\nprotocol_version=1\n\
             public_key={}\nupdate_only=true\nendpoint=[2001:db8::1]:51821\nallowed_ip=-10.244.9.0/24\n\
             persistent_keepalive_interval=0\n\n",
            key(9).to_hex(),
            a.to_hex(),
            psk.to_hex(),
            b.to_hex()
        );
        let req = parse_set_ok(&text);
        let mut pa = PeerConfig::new(a);
        pa.preshared_key = Some(Some(psk));
        pa.endpoint = Some("192.0.2.1:51820".parse().unwrap());
        pa.persistent_keepalive = Some(25);
        pa.replace_allowed_ips = true;
        pa.allowed_ips = vec![net("10.244.1.0/24"), net("fd00:0:0:1::/64")];
        let mut pb = PeerConfig::new(b);
        pb.update_only = true;
        pb.endpoint = Some(SocketAddr::new(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into(), 51821));
        pb.remove_allowed_ips = vec![net("10.244.9.0/24")];
        pb.persistent_keepalive = Some(0);
        let want = SetRequest {
            private_key: Some(Some(key(9))),
            listen_port: Some(51820),
            fwmark: Some(4660),
            replace_peers: true,
            peers: vec![pa, pb],
        };
        assert_eq!(req, want);
        // And back: format_set writes it in the order wg writes, which reads back the same.
        assert_eq!(parse_set_ok(&format_set(&want)), want);
    }

    #[test]
    fn test_set_replace_allowed_ips() {
        let p = key(7);
        let req = parse_set_ok(&format!(
            "set=1\npublic_key={}\nreplace_allowed_ips=true\nallowed_ip=10.0.0.0/8\nallowed_ip=10.244.3.7/24\n\n",
            p.to_hex()
        ));
        assert_eq!(req.peers.len(), 1);
        assert!(req.peers[0].replace_allowed_ips);
        // Kept as written; the device masks (and format_get reports masked).
        assert_eq!(req.peers[0].allowed_ips, vec![net("10.0.0.0/8"), net("10.244.3.7/24")]);
        // Lines apply in order: allowed IPs before replace_allowed_ips are replaced too.
        let req = parse_set_ok(&format!(
            "set=1\npublic_key={}\nallowed_ip=10.1.0.0/16\nallowed_ip=-10.2.0.0/16\nreplace_allowed_ips=true\n\
             allowed_ip=10.3.0.0/16\n\n",
            p.to_hex()
        ));
        assert_eq!(req.peers[0].allowed_ips, vec![net("10.3.0.0/16")]);
        assert!(req.peers[0].remove_allowed_ips.is_empty());
        // Empty allowed-ips in wg: replace and add nothing.
        let req = parse_set_ok(&format!("set=1\npublic_key={}\nreplace_allowed_ips=true\n\n", p.to_hex()));
        assert!(req.peers[0].replace_allowed_ips && req.peers[0].allowed_ips.is_empty());
    }

    #[test]
    fn test_set_allowed_ip_removal_order() {
        let p = key(7).to_hex();
        // Remove then add: the add wins, the removal is dropped.
        let req = parse_set_ok(&format!("set=1\npublic_key={p}\nallowed_ip=-10.0.0.0/24\nallowed_ip=10.0.0.9/24\n\n"));
        assert_eq!(req.peers[0].allowed_ips, vec![net("10.0.0.9/24")]);
        assert!(req.peers[0].remove_allowed_ips.is_empty());
        // Add then remove: both kept, applied adds first, so it ends removed.
        let req = parse_set_ok(&format!("set=1\npublic_key={p}\nallowed_ip=10.0.0.0/24\nallowed_ip=-10.0.0.0/24\n\n"));
        assert_eq!(req.peers[0].allowed_ips, vec![net("10.0.0.0/24")]);
        assert_eq!(req.peers[0].remove_allowed_ips, vec![net("10.0.0.0/24")]);
        assert_eq!(parse_set_ok(&format_set(&req)), req);
    }

    #[test]
    fn test_set_remove_update_only_and_clears() {
        let (a, b) = (key(0xa), key(0xb));
        let req = parse_set_ok(&format!(
            "set=1\nprivate_key={zero}\npublic_key={}\nremove=true\npublic_key={}\nupdate_only=true\n\
             preshared_key={zero}\nendpoint=10.0.0.1:1\n\n",
            a.to_hex(),
            b.to_hex(),
            zero = Key::ZERO.to_hex()
        ));
        assert_eq!(req.private_key, Some(None), "all-zero private key clears it");
        assert!(!req.replace_peers);
        assert_eq!(req.peers.len(), 2);
        assert!(req.peers[0].remove && !req.peers[0].update_only);
        assert_eq!(req.peers[0].public_key, a);
        assert!(req.peers[1].update_only && !req.peers[1].remove);
        assert_eq!(req.peers[1].preshared_key, Some(None), "all-zero preshared key clears it");
        assert_eq!(req.peers[1].persistent_keepalive, None);
        assert_eq!(parse_set_ok(&format_set(&req)), req);
        // An empty set is valid and changes nothing.
        assert_eq!(parse_set_ok("set=1\n\n"), SetRequest::default());
        // The same peer twice stays two entries, applied in order.
        let req = parse_set_ok(&format!("set=1\npublic_key={0}\npublic_key={0}\nremove=true\n\n", a.to_hex()));
        assert_eq!(req.peers.len(), 2);
        assert!(!req.peers[0].remove && req.peers[1].remove);
    }

    #[test]
    fn test_endpoints_and_numbers() {
        let p = key(1).to_hex();
        let ep = |v: &str| parse(&format!("set=1\npublic_key={p}\nendpoint={v}\n\n"));
        let got = |v: &str| match ep(v) {
            Ok(Some(Request::Set(r))) => r.peers[0].endpoint.unwrap(),
            other => panic!("{v}: {other:?}"),
        };
        assert_eq!(got("127.0.0.1:51820"), SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 51820));
        assert_eq!(got("[::1]:0"), SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 0));
        assert_eq!(
            got("[fe80::1%3]:51820"),
            SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1), 51820, 0, 3))
        );
        for bad in ["", "127.0.0.1", "::1:51820", "127.0.0.1:65536", "[::1]", "host:51820", "[fe80::1%eth0]:1"] {
            assert!(matches!(ep(bad), Err(UapiError::InvalidValue { key: "endpoint", .. })), "{bad}");
        }
        let port = |v: &str| parse(&format!("set=1\nlisten_port={v}\n\n"));
        assert_eq!(
            port("0051820").unwrap(),
            Some(Request::Set(SetRequest { listen_port: Some(51820), ..Default::default() }))
        );
        for bad in ["", "+1", "-1", "65536", "0x10", " 1", "1 ", "99999999999999999999999"] {
            assert!(matches!(port(bad), Err(UapiError::InvalidValue { key: "listen_port", .. })), "{bad:?}");
        }
        let mark = |v: &str| parse(&format!("set=1\nfwmark={v}\n\n"));
        assert!(mark("4294967295").is_ok());
        assert!(mark("4294967296").is_err());
    }

    #[test]
    fn test_refusals_and_resync() {
        let p = key(1).to_hex();
        let cases: Vec<(String, UapiError)> = vec![
            ("garbage\n\n".into(), UapiError::UnknownOperation("garbage".into())),
            ("get=2\n\n".into(), UapiError::UnknownOperation("get=2".into())),
            ("set=1 \n\n".into(), UapiError::UnknownOperation("set=1 ".into())),
            ("\n".into(), UapiError::UnknownOperation(String::new())),
            ("get=1\nx\n\n".into(), UapiError::TrailingGet),
            ("set=1\nlisten_port\n\n".into(), UapiError::NotKeyValue("listen_port".into())),
            ("set=1\nbogus=1\n\n".into(), UapiError::UnknownDeviceKey("bogus".into())),
            (format!("set=1\npublic_key={p}\nbogus=1\n\n"), UapiError::UnknownPeerKey("bogus".into())),
            ("set=1\nendpoint=1.2.3.4:5\n\n".into(), UapiError::PeerKeyBeforePublicKey("endpoint".into())),
            ("set=1\nprotocol_version=1\n\n".into(), UapiError::PeerKeyBeforePublicKey("protocol_version".into())),
            (format!("set=1\npublic_key={p}\nlisten_port=1\n\n"), UapiError::DeviceKeyAfterPeer("listen_port".into())),
            (format!("set=1\npublic_key={p}\nprotocol_version=2\n\n"), UapiError::ProtocolVersion("2".into())),
            ("set=1\npublic_key=zz\n\n".into(), invalid("public_key", "zz", "64 hex digits")),
            (
                format!("set=1\nprivate_key={}\n\n", &p[..63]),
                UapiError::InvalidValue { key: "private_key", value: "<secret>".into(), accepted: "64 hex digits" },
            ),
            (
                format!("set=1\npublic_key={p}\npreshared_key=x{}\n\n", &p[1..]),
                UapiError::InvalidValue { key: "preshared_key", value: "<secret>".into(), accepted: "64 hex digits" },
            ),
            ("set=1\nreplace_peers=false\n\n".into(), invalid("replace_peers", "false", "true")),
            (format!("set=1\npublic_key={p}\nremove=1\n\n"), invalid("remove", "1", "true")),
            (format!("set=1\npublic_key={p}\nupdate_only=TRUE\n\n"), invalid("update_only", "TRUE", "true")),
            (
                format!("set=1\npublic_key={p}\nreplace_allowed_ips=yes\n\n"),
                invalid("replace_allowed_ips", "yes", "true"),
            ),
            (
                format!("set=1\npublic_key={p}\npersistent_keepalive_interval=65536\n\n"),
                invalid("persistent_keepalive_interval", "65536", "seconds, 0-65535"),
            ),
            (
                format!("set=1\npublic_key={p}\nallowed_ip=10.0.0.0/33\n\n"),
                invalid("allowed_ip", "10.0.0.0/33", "[-]address/prefix-length, e.g. 10.244.1.0/24"),
            ),
            (
                format!("set=1\npublic_key={p}\nallowed_ip=+10.0.0.0/8\n\n"),
                invalid("allowed_ip", "+10.0.0.0/8", "[-]address/prefix-length, e.g. 10.244.1.0/24"),
            ),
            (
                format!("set=1\npublic_key={p}\nallowed_ip=10.0.0.1\n\n"),
                invalid("allowed_ip", "10.0.0.1", "[-]address/prefix-length, e.g. 10.244.1.0/24"),
            ),
            ("set=1\nlisten_port=1\r\n\n".into(), invalid("listen_port", "1\r", "a port, 0-65535")),
            ("set=1\n\u{ff}\n\n".into(), UapiError::NotKeyValue("\u{ff}".into())),
            ("set=1\nlisten_port=\u{80}\n\n".into(), invalid("listen_port", "\u{80}", "a port, 0-65535")),
        ];
        for (text, want) in cases {
            // A refusal consumes its request through the blank line, so the next request reads.
            let mut stream = Cursor::new(format!("{text}get=1\n\n").into_bytes());
            assert_eq!(read_request(&mut stream), Err(want.clone()), "{text:?}");
            assert!(!want.is_fatal());
            assert!(want.errno() > 0);
            assert_eq!(read_request(&mut stream), Ok(Some(Request::Get)), "after {text:?}");
            assert_eq!(read_request(&mut stream), Ok(None));
        }
        // Bytes that are not UTF-8.
        let mut stream = Cursor::new(b"set=1\nlisten_port=\xff\n\nget=1\n\n".to_vec());
        assert_eq!(read_request(&mut stream), Err(UapiError::NotUtf8));
        assert_eq!(read_request(&mut stream), Ok(Some(Request::Get)));
        // The errno of each kind.
        assert_eq!(UapiError::UnknownDeviceKey("x".into()).errno(), 22);
        assert_eq!(UapiError::NotKeyValue("x".into()).errno(), 71);
        assert_eq!(UapiError::LineTooLong.errno(), 90);
        assert_eq!(UapiError::Io(io::ErrorKind::TimedOut).errno(), 5);
        assert_eq!(UapiError::PortInUse(1).errno(), 98);
        assert_eq!(UapiError::Unsupported("fwmark").errno(), 95);
    }

    #[test]
    fn test_refusals_never_echo_long_text() {
        let long_key = "k".repeat(200);
        match parse(&format!("set=1\n{long_key}=1\n\n")) {
            Err(UapiError::UnknownDeviceKey(k)) => assert!(k.len() <= ECHO_CHARS + 3, "{k}"),
            other => panic!("{other:?}"),
        }
        // A private key sent under a misspelt name is cut short in the error.
        let secret = key(0x77).to_hex();
        let e = parse(&format!("set=1\nprivate_kye={secret}\n\n")).unwrap_err();
        assert!(!e.to_string().contains(&secret[..ECHO_CHARS + 1]));
        let e = parse(&format!("set=1\n{secret}\n\n")).unwrap_err();
        assert!(!e.to_string().contains(&secret[..ECHO_CHARS + 1]), "{e}");
    }

    #[test]
    fn test_line_and_request_bounds() {
        // A 1 MiB line: refused, consumed, and the stream goes on.
        let text = format!("set=1\nlisten_port={}\n\nget=1\n\n", "1".repeat(1 << 20));
        let mut stream = Cursor::new(text.into_bytes());
        assert_eq!(read_request(&mut stream), Err(UapiError::LineTooLong));
        assert_eq!(read_request(&mut stream), Ok(Some(Request::Get)));
        // As the first line too.
        let mut stream = Cursor::new(format!("{}\n\nget=1\n\n", "g".repeat(MAX_LINE_BYTES + 1)).into_bytes());
        assert_eq!(read_request(&mut stream), Err(UapiError::LineTooLong));
        assert_eq!(read_request(&mut stream), Ok(Some(Request::Get)));
        // Exactly at the limit is fine (the value then fails on its own terms).
        let at = format!("set=1\nlisten_port={}\n\n", "1".repeat(MAX_LINE_BYTES - "listen_port=".len()));
        assert!(matches!(parse(&at), Err(UapiError::InvalidValue { .. })));
        // Line over the limit at the end of the stream, no newline.
        assert_eq!(parse(&format!("set=1\n{}", "x".repeat(MAX_LINE_BYTES * 2))), Err(UapiError::Truncated));

        // Request limit, with small bounds: fatal.
        let small = |text: &str| read_request_bounded(&mut Cursor::new(text.as_bytes()), 64, 100);
        let many = format!("set=1\n{}\n", "listen_port=1\n".repeat(10));
        assert_eq!(small(&many), Err(UapiError::RequestTooLong));
        assert!(UapiError::RequestTooLong.is_fatal());
        let fits = format!("set=1\n{}\n", "listen_port=1\n".repeat(6));
        assert!(matches!(small(&fits), Ok(Some(Request::Set(_)))));
        // While draining after a refusal too.
        assert_eq!(small(&format!("set=1\nbogus=1\n{}\n", "x=1\n".repeat(30))), Err(UapiError::RequestTooLong));
        // A hostile stream with no newline at all is cut at the request limit.
        let endless = "x".repeat(1000);
        assert_eq!(small(&endless), Err(UapiError::RequestTooLong));
    }

    #[test]
    fn test_truncated_requests() {
        let p = key(1).to_hex();
        for text in ["set=1\n", "set=1\nlisten_port=1\n", "set=1\nlisten_port=1", &format!("set=1\npublic_key={p}")] {
            assert_eq!(parse(text), Err(UapiError::Truncated), "{text:?}");
        }
        assert!(UapiError::Truncated.is_fatal());
        // A refusal whose request then ends without its blank line still reports the refusal.
        assert_eq!(parse("set=1\nbogus=1\nx=2\n"), Err(UapiError::UnknownDeviceKey("bogus".into())));
    }

    #[test]
    fn test_apply_set_follows_wireguard() {
        let own_private = key(1);
        let own_public = own_private.public_key();
        let (b, c) = (key(2), key(3));
        let mut dev = DeviceStatus::default();
        // Peers b and c; c shares a prefix with b, which moves it to c.
        dev.apply_set(&parse_set_ok(&format!(
            "set=1\nlisten_port=7\npublic_key={}\nallowed_ip=10.0.0.1/24\nallowed_ip=10.9.0.0/16\n\
             public_key={}\nallowed_ip=10.9.0.0/16\npreshared_key={}\n\n",
            b.to_hex(),
            c.to_hex(),
            key(9).to_hex()
        )));
        assert_eq!(dev.listen_port, 7);
        assert_eq!(dev.peers.len(), 2);
        assert_eq!(dev.peers[0].allowed_ips, [net("10.0.0.0/24")], "masked, and the shared prefix taken by c");
        assert_eq!(dev.peers[1].allowed_ips, [net("10.9.0.0/16")]);
        assert_eq!(dev.peers[1].preshared_key, Some(key(9)));
        // A peer with the device's own key is ignored; setting that private
        // key later drops a peer that has its public key.
        dev.apply_set(&parse_set_ok(&format!("set=1\npublic_key={}\n\n", own_public.to_hex())));
        assert_eq!(dev.peers.len(), 3, "no private key yet: any peer is taken");
        dev.apply_set(&parse_set_ok(&format!("set=1\nprivate_key={}\n\n", own_private.to_hex())));
        assert_eq!(dev.private_key, Some(own_private));
        assert_eq!(dev.peers.len(), 2, "the peer with our own public key is gone");
        dev.apply_set(&parse_set_ok(&format!("set=1\npublic_key={}\nallowed_ip=10.1.0.0/16\n\n", own_public.to_hex())));
        assert!(dev.peers.iter().all(|p| p.public_key != own_public), "own key ignored");
        // update_only leaves unknown peers out; a zero PSK clears it; remove.
        let d = key(4);
        dev.apply_set(&parse_set_ok(&format!(
            "set=1\npublic_key={}\nupdate_only=true\nallowed_ip=10.4.0.0/16\n\
             public_key={}\npreshared_key={}\npublic_key={}\nremove=true\n\n",
            d.to_hex(),
            c.to_hex(),
            Key::ZERO.to_hex(),
            b.to_hex()
        )));
        assert_eq!(dev.peers.len(), 1);
        assert_eq!(dev.peers[0].public_key, c);
        assert_eq!(dev.peers[0].preshared_key, None);
        // A zero private key removes it; replace_peers empties the list.
        dev.apply_set(&parse_set_ok(&format!("set=1\nprivate_key={}\nreplace_peers=true\n\n", Key::ZERO.to_hex())));
        assert_eq!(dev.private_key, None);
        assert!(dev.peers.is_empty());
    }

    #[test]
    fn test_format_get_exact() {
        let psk = Key([0x22; 32]);
        let status = DeviceStatus {
            private_key: Some(Key([0x11; 32])),
            listen_port: 51820,
            fwmark: Some(0x1234),
            peers: vec![
                PeerStatus {
                    public_key: Key([0xaa; 32]),
                    preshared_key: Some(psk),
                    endpoint: Some("192.0.2.7:51820".parse().unwrap()),
                    persistent_keepalive: 25,
                    allowed_ips: vec![net("10.244.2.0/24"), net("fd00:0:0:2::5/64")],
                    last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789)),
                    rx_bytes: 2224,
                    tx_bytes: 38333,
                },
                PeerStatus {
                    public_key: Key([0xbb; 32]),
                    endpoint: Some(SocketAddr::V6(SocketAddrV6::new(
                        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x33),
                        51821,
                        0,
                        0,
                    ))),
                    ..Default::default()
                },
            ],
        };
        let want = format!(
            "private_key={}\n\
             listen_port=51820\n\
             fwmark=4660\n\
             public_key={}\n\
             preshared_key={}\n\
             protocol_version=1\n\
             endpoint=192.0.2.7:51820\n\
             last_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=123456789\n\
             tx_bytes=38333\n\
             rx_bytes=2224\n\
             persistent_keepalive_interval=25\n\
             allowed_ip=10.244.2.0/24\n\
             allowed_ip=fd00:0:0:2::/64\n\
             public_key={}\n\
             preshared_key={}\n\
             protocol_version=1\n\
             endpoint=[2001:db8::33]:51821\n\
             last_handshake_time_sec=0\n\
             last_handshake_time_nsec=0\n\
             tx_bytes=0\n\
             rx_bytes=0\n\
             persistent_keepalive_interval=0\n\
             errno=0\n\n",
            "11".repeat(32),
            "aa".repeat(32),
            "22".repeat(32),
            "bb".repeat(32),
            "00".repeat(32),
        );
        assert_eq!(format_get(&status), want);
        // An empty device: no private key, no port, no fwmark, no peers.
        assert_eq!(format_get(&DeviceStatus::default()), "errno=0\n\n");
        let zeros = DeviceStatus { private_key: Some(Key::ZERO), fwmark: Some(0), ..Default::default() };
        assert_eq!(format_get(&zeros), "errno=0\n\n");
        assert_eq!(format_errno(0), "errno=0\n\n");
        assert_eq!(format_errno(-22), "errno=-22\n\n");
    }

    #[test]
    fn test_format_set_literal() {
        let mut p = PeerConfig::new(Key([0xcd; 32]));
        p.preshared_key = Some(None);
        p.endpoint = Some("[::1]:5".parse().unwrap());
        p.persistent_keepalive = Some(0);
        p.replace_allowed_ips = true;
        p.allowed_ips = vec![net("10.0.0.0/8")];
        p.remove_allowed_ips = vec![net("fd00::/8")];
        let req = SetRequest {
            private_key: Some(None),
            listen_port: Some(0),
            fwmark: Some(0),
            replace_peers: true,
            peers: vec![p, PeerConfig { remove: true, ..PeerConfig::new(Key([0xef; 32])) }],
        };
        let zero = "00".repeat(32);
        let want = format!(
            "set=1\nprivate_key={zero}\nlisten_port=0\nfwmark=0\nreplace_peers=true\n\
             public_key={}\npreshared_key={zero}\nendpoint=[::1]:5\npersistent_keepalive_interval=0\n\
             replace_allowed_ips=true\nallowed_ip=10.0.0.0/8\nallowed_ip=-fd00::/8\n\
             public_key={}\nremove=true\n\n",
            "cd".repeat(32),
            "ef".repeat(32)
        );
        assert_eq!(format_set(&req), want);
        assert_eq!(parse_set_ok(&want), req);
    }

    /// Random bytes and random mutations of valid requests: no panic, every
    /// refusal has an errno, every accepted set reads back from `format_set`.
    #[test]
    fn test_random_input_never_panics() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let valid = format!(
            "set=1\nprivate_key={}\nlisten_port=1\npublic_key={}\nendpoint=[::1]:2\nallowed_ip=10.0.0.0/8\n\
             allowed_ip=-10.1.0.0/16\nreplace_allowed_ips=true\n\nget=1\n\n",
            key(3).to_hex(),
            key(4).to_hex()
        );
        let alphabet = b"=\n-:/[]%.0123456789abcdefgsetpublic_key";
        for _ in 0..3000 {
            let mut bytes = valid.clone().into_bytes();
            for _ in 0..rng.gen_range(0..6) {
                let i = rng.gen_range(0..bytes.len());
                match rng.gen_range(0..3) {
                    0 => bytes[i] = alphabet[rng.gen_range(0..alphabet.len())],
                    1 => {
                        bytes.remove(i);
                    }
                    _ => bytes.insert(i, rng.gen()),
                }
                if bytes.is_empty() {
                    break;
                }
            }
            let mut stream = Cursor::new(bytes);
            for _ in 0..64 {
                match read_request_bounded(&mut stream, 128, 4096) {
                    Ok(None) => break,
                    Ok(Some(Request::Set(req))) => assert_eq!(parse_set_ok(&format_set(&req)), req),
                    Ok(Some(Request::Get)) => {}
                    Err(e) => {
                        assert!(e.errno() > 0);
                        if e.is_fatal() {
                            break;
                        }
                    }
                }
            }
        }
    }
}
