//! The WireGuard userspace API against the real `wg` tool (Debian
//! `wireguard-tools`): weft's [`serve`] on `/var/run/wireguard/<iface>.sock`
//! with a small in-memory [`Device`] that applies set requests the way
//! WireGuard does, driven by `wg set`, `wg setconf`, `wg show` and
//! `wg showconf`, and by malformed requests written straight to the socket.
//! Also the server's socket handling (stale, live and foreign files, modes,
//! removal) in a temporary directory.
//!
//! The `wg` tests run as root (the socket directory is root's); CI runs them
//! as root.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use weft_uapi::{self as uapi, Device, DeviceStatus, Key, ServerHandle, SetRequest, UapiError};

// ---------------------------------------------------------------------------
// An in-memory device with WireGuard's set semantics.

#[derive(Default)]
struct MemDevice {
    state: Mutex<DeviceStatus>,
    /// A listen port `apply` refuses with EADDRINUSE, to see errors reach `wg`.
    busy_port: Option<u16>,
}

impl MemDevice {
    fn with_busy_port(port: u16) -> Self {
        MemDevice { busy_port: Some(port), ..Default::default() }
    }

    fn snapshot(&self) -> DeviceStatus {
        self.state.lock().unwrap().clone()
    }

    /// What the data plane would count: traffic and a handshake for a peer.
    fn record_traffic(&self, peer: &Key, rx: u64, tx: u64, handshake: SystemTime) {
        let mut st = self.state.lock().unwrap();
        let p = st.peers.iter_mut().find(|p| p.public_key == *peer).expect("peer exists");
        p.rx_bytes = rx;
        p.tx_bytes = tx;
        p.last_handshake = Some(handshake);
    }
}

impl Device for MemDevice {
    fn status(&self) -> DeviceStatus {
        self.snapshot()
    }

    fn apply(&self, req: SetRequest) -> Result<(), UapiError> {
        let mut st = self.state.lock().unwrap();
        // A refused port changes nothing.
        if let Some(port) = req.listen_port.filter(|p| Some(*p) == self.busy_port) {
            return Err(UapiError::PortInUse(port));
        }
        st.apply_set(&req);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Helpers.

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// An interface name unique to this process and call, at most 15 characters.
fn unique_iface() -> String {
    let name = format!("wu{}x{}", std::process::id() % 1_000_000, SEQ.fetch_add(1, Ordering::Relaxed));
    assert!(name.len() <= 15, "{name}");
    name
}

/// A fresh temporary directory, removed by [`TempDir`]'s drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "weft-uapi-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn require_root_and_wg() {
    assert!(nix::unistd::Uid::effective().is_root(), "the wg tests use /var/run/wireguard and must run as root");
    let found = Command::new("wg").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(found, "the `wg` tool is missing: DEBIAN_FRONTEND=noninteractive apt-get install -y wireguard-tools");
}

/// A served interface: the device, the server, and a directory for key files.
/// Dropping it stops the server, which removes the socket.
struct Iface {
    name: String,
    device: Arc<MemDevice>,
    server: ServerHandle,
    dir: TempDir,
}

impl Iface {
    fn up(device: MemDevice) -> Self {
        require_root_and_wg();
        let name = unique_iface();
        let device = Arc::new(device);
        let server = uapi::serve(&uapi::socket_path(&name), device.clone()).expect("serve");
        Iface { name, device, server, dir: TempDir::new("wg") }
    }

    /// Runs `wg <args>` with `{}` standing for this interface's name.
    fn wg(&self, args: &[&str]) -> Output {
        let args: Vec<String> =
            args.iter().map(|a| if *a == "{}" { self.name.clone() } else { a.to_string() }).collect();
        Command::new("wg").args(&args).output().expect("running wg")
    }

    fn wg_ok(&self, args: &[&str]) -> String {
        let out = self.wg(args);
        assert!(
            out.status.success(),
            "wg {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("wg prints UTF-8")
    }

    /// Writes `content` to a file in the key directory and returns its path.
    fn file(&self, name: &str, content: &str) -> String {
        let p = self.dir.0.join(name);
        std::fs::write(&p, content).unwrap();
        p.to_str().unwrap().to_string()
    }

    /// `wg show <iface> dump`: the interface line and the peer lines by public key.
    fn dump(&self) -> (Vec<String>, HashMap<String, Vec<String>>) {
        let text = self.wg_ok(&["show", "{}", "dump"]);
        let mut lines = text.lines().map(|l| l.split('\t').map(str::to_string).collect::<Vec<_>>());
        let iface = lines.next().expect("interface line");
        assert_eq!(iface.len(), 4, "{text}");
        let peers = lines
            .map(|l| {
                assert_eq!(l.len(), 8, "{text}");
                (l[0].clone(), l)
            })
            .collect();
        (iface, peers)
    }
}

/// A key pair from `wg genkey` / `wg pubkey`, base64.
fn keypair() -> (String, String) {
    let out = Command::new("wg").arg("genkey").output().expect("wg genkey");
    assert!(out.status.success());
    let private = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut child =
        Command::new("wg").arg("pubkey").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("wg pubkey");
    child.stdin.take().unwrap().write_all(format!("{private}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    (private, String::from_utf8(out.stdout).unwrap().trim().to_string())
}

fn b64(k: &str) -> Key {
    Key::from_base64(k).unwrap_or_else(|| panic!("{k} is not a key"))
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// Writes `request` and reads one reply, through its blank line.
fn exchange(conn: &mut BufReader<UnixStream>, request: &[u8]) -> String {
    conn.get_mut().write_all(request).expect("write request");
    read_reply(conn)
}

fn read_reply(conn: &mut BufReader<UnixStream>) -> String {
    let mut reply = String::new();
    loop {
        let mut line = String::new();
        let n = conn.read_line(&mut line).expect("read reply");
        assert!(n > 0, "connection closed after {reply:?}");
        reply.push_str(&line);
        if line == "\n" {
            return reply;
        }
    }
}

fn connect(path: &Path) -> BufReader<UnixStream> {
    let s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    BufReader::new(s)
}

// ---------------------------------------------------------------------------
// Tests with the real wg tool.

#[test]
fn wg_set_show_showconf_and_changes() {
    let ifc = Iface::up(MemDevice::default());
    let (private, public) = keypair();
    let (_, a) = keypair();
    let (_, b) = keypair();
    let key_file = ifc.file("private", &format!("{private}\n"));

    // First configuration, as the agent's operator would type it.
    ifc.wg_ok(&[
        "set",
        "{}",
        "private-key",
        &key_file,
        "listen-port",
        "51999",
        "peer",
        &a,
        "endpoint",
        "127.0.0.1:51820",
        "persistent-keepalive",
        "25",
        "allowed-ips",
        "10.244.2.0/24,fd00::/64",
    ]);
    let st = ifc.device.snapshot();
    assert_eq!(st.private_key, Some(b64(&private)));
    assert_eq!(st.listen_port, 51999);
    assert_eq!(st.peers.len(), 1);
    assert_eq!(st.peers[0].public_key, b64(&a));
    assert_eq!(st.peers[0].endpoint, Some("127.0.0.1:51820".parse().unwrap()));
    assert_eq!(st.peers[0].persistent_keepalive, 25);
    assert_eq!(st.peers[0].allowed_ips, nets(&["10.244.2.0/24", "fd00::/64"]));

    // wg derives the public key from the private key we report.
    let (iface, peers) = ifc.dump();
    assert_eq!(iface, [private.as_str(), public.as_str(), "51999", "off"]);
    assert_eq!(peers[&a], [&a, "(none)", "127.0.0.1:51820", "10.244.2.0/24,fd00::/64", "0", "0", "0", "25"]);
    assert_eq!(ifc.wg_ok(&["show", "{}", "public-key"]).trim(), public);
    assert_eq!(ifc.wg_ok(&["show", "{}", "listen-port"]).trim(), "51999");
    let pretty = ifc.wg_ok(&["show", "{}"]);
    assert!(pretty.contains(&format!("interface: {}", ifc.name)), "{pretty}");
    assert!(pretty.contains("listening port: 51999"), "{pretty}");
    assert!(ifc.wg_ok(&["show", "interfaces"]).split_whitespace().any(|n| n == ifc.name));

    assert_eq!(
        ifc.wg_ok(&["showconf", "{}"]),
        format!(
            "[Interface]\nListenPort = 51999\nPrivateKey = {private}\n\n[Peer]\nPublicKey = {a}\n\
             AllowedIPs = 10.244.2.0/24, fd00::/64\nEndpoint = 127.0.0.1:51820\nPersistentKeepalive = 25\n"
        )
    );

    // Change the existing peer: endpoint (IPv6), keepalive off, allowed IPs replaced.
    ifc.wg_ok(&[
        "set",
        "{}",
        "peer",
        &a,
        "endpoint",
        "[::1]:51821",
        "persistent-keepalive",
        "off",
        "allowed-ips",
        "10.244.3.0/24",
    ]);
    let (_, peers) = ifc.dump();
    assert_eq!(peers[&a], [&a, "(none)", "[::1]:51821", "10.244.3.0/24", "0", "0", "0", "off"]);

    // A second peer taking 10.244.3.0/24 moves it off the first.
    ifc.wg_ok(&["set", "{}", "peer", &b, "allowed-ips", "10.244.3.0/24,10.244.4.0/24"]);
    let (_, peers) = ifc.dump();
    assert_eq!(peers[&a][3], "(none)");
    assert_eq!(peers[&b], [&b, "(none)", "(none)", "10.244.3.0/24,10.244.4.0/24", "0", "0", "0", "off"]);

    // Counters and handshakes the device reports reach wg.
    let when = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
    ifc.device.record_traffic(&b64(&b), 1234, 5678, when);
    let (_, peers) = ifc.dump();
    assert_eq!(&peers[&b][4..7], ["1700000000", "1234", "5678"]);

    // Preshared key set, then cleared with an empty file (wg sends all zeros).
    let (psk, _) = keypair();
    ifc.wg_ok(&["set", "{}", "peer", &b, "preshared-key", &ifc.file("psk", &format!("{psk}\n"))]);
    assert_eq!(ifc.dump().1[&b][1], psk);
    assert!(ifc.wg_ok(&["showconf", "{}"]).contains(&format!("PresharedKey = {psk}\n")));
    ifc.wg_ok(&["set", "{}", "peer", &b, "preshared-key", "/dev/null"]);
    assert_eq!(ifc.dump().1[&b][1], "(none)");
    assert_eq!(ifc.device.snapshot().peers[1].preshared_key, None);

    // fwmark on and off.
    ifc.wg_ok(&["set", "{}", "fwmark", "0x1234"]);
    assert_eq!(ifc.dump().0[3], "0x1234");
    assert!(ifc.wg_ok(&["showconf", "{}"]).contains("FwMark = 0x1234\n"));
    ifc.wg_ok(&["set", "{}", "fwmark", "off"]);
    assert_eq!(ifc.dump().0[3], "off");

    // Remove the first peer.
    ifc.wg_ok(&["set", "{}", "peer", &a, "remove"]);
    let (_, peers) = ifc.dump();
    assert_eq!(peers.keys().collect::<Vec<_>>(), [&b]);

    // setconf replaces every peer (replace_peers=true) and the private key.
    let (private2, public2) = keypair();
    let (_, c) = keypair();
    let conf = ifc.file(
        "conf",
        &format!(
            "[Interface]\nPrivateKey = {private2}\nListenPort = 52000\n\n[Peer]\nPublicKey = {c}\n\
             AllowedIPs = 10.244.9.0/24\nEndpoint = 192.0.2.9:51820\n"
        ),
    );
    ifc.wg_ok(&["setconf", "{}", &conf]);
    let (iface, peers) = ifc.dump();
    assert_eq!(iface, [private2.as_str(), public2.as_str(), "52000", "off"]);
    assert_eq!(peers.keys().collect::<Vec<_>>(), [&c]);
    assert_eq!(peers[&c][2..4], ["192.0.2.9:51820", "10.244.9.0/24"]);

    // An empty private key file clears the key (all zeros on the wire).
    ifc.wg_ok(&["set", "{}", "private-key", "/dev/null"]);
    assert_eq!(ifc.device.snapshot().private_key, None);
    assert_eq!(ifc.dump().0[..2], ["(none)", "(none)"]);

    // Stopping removes the socket: wg no longer sees the interface.
    let path = ifc.server.path().to_path_buf();
    drop(ifc);
    assert!(!path.exists(), "{} left behind", path.display());
}

#[test]
fn wg_set_reports_device_errors() {
    let ifc = Iface::up(MemDevice::with_busy_port(51998));
    let (_, a) = keypair();
    ifc.wg_ok(&["set", "{}", "listen-port", "51997"]);
    // The refusal comes back as errno=-98, which wg prints as EADDRINUSE.
    let out = ifc.wg(&["set", "{}", "listen-port", "51998", "peer", &a, "allowed-ips", "10.0.0.0/8"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Address already in use"), "{stderr}");
    // Nothing of the refused request was applied.
    let st = ifc.device.snapshot();
    assert_eq!(st.listen_port, 51997);
    assert!(st.peers.is_empty());
    // wg checks endpoints itself: a bad one fails before reaching the socket.
    assert!(!ifc.wg(&["set", "{}", "peer", &a, "endpoint", "nonsense"]).status.success());
}

#[test]
fn wg_keeps_working_after_malformed_requests() {
    let ifc = Iface::up(MemDevice::default());
    let (_, a) = keypair();
    ifc.wg_ok(&["set", "{}", "listen-port", "51996", "peer", &a, "allowed-ips", "10.244.5.0/24"]);
    let path = ifc.server.path().to_path_buf();

    // Each malformed request gets an errno reply on the same connection, and
    // a good request after it is served.
    let mut conn = connect(&path);
    let huge = format!("set=1\nlisten_port={}\n\n", "1".repeat(1 << 20));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"garbage\n\n".to_vec(), "errno=-22\n\n"),
        (b"set=1\nbogus_key=1\n\n".to_vec(), "errno=-22\n\n"),
        (b"set=1\nprivate_key=zz\n\n".to_vec(), "errno=-22\n\n"),
        (format!("set=1\npublic_key={}\n\n", "g".repeat(64)).into_bytes(), "errno=-22\n\n"),
        (b"set=1\nendpoint=127.0.0.1:1\n\n".to_vec(), "errno=-22\n\n"),
        (b"set=1\nlisten_port=99999\n\n".to_vec(), "errno=-22\n\n"),
        (b"set=1\nno equals sign\n\n".to_vec(), "errno=-71\n\n"),
        (b"get=1\ntrailing\n\n".to_vec(), "errno=-22\n\n"),
        (b"set=1\nlisten_port=\xff\xfe\n\n".to_vec(), "errno=-22\n\n"),
        (huge.into_bytes(), "errno=-90\n\n"),
    ];
    for (request, want) in &cases {
        assert_eq!(
            exchange(&mut conn, request),
            *want,
            "{:?}",
            String::from_utf8_lossy(&request[..request.len().min(60)])
        );
        let status = exchange(&mut conn, b"get=1\n\n");
        assert!(status.ends_with("errno=0\n\n") && status.contains("listen_port=51996\n"), "{status}");
    }
    // None of it changed the device.
    assert_eq!(ifc.device.snapshot().listen_port, 51996);
    // Several requests in one write are answered in order.
    let both = exchange(&mut conn, b"set=1\nlisten_port=51995\n\nget=1\n\n");
    assert_eq!(both, "errno=0\n\n");
    assert!(read_reply(&mut conn).contains("listen_port=51995\n"));
    drop(conn);

    // A request cut off by the client: refused, then the server hangs up.
    let mut conn = connect(&path);
    conn.get_mut().write_all(b"set=1\nlisten_port=1\n").unwrap();
    conn.get_mut().shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_reply(&mut conn), "errno=-71\n\n");
    let mut rest = String::new();
    assert_eq!(conn.read_to_string(&mut rest).unwrap(), 0);

    // A request over the request limit: refused, then the server hangs up.
    let mut conn = connect(&path);
    let mut writer = conn.get_ref().try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        let line = "allowed_ip=10.0.0.0/8\n".repeat(4096);
        let mut chunk = b"set=1\npublic_key=".to_vec();
        chunk.extend_from_slice(format!("{}\n", "ab".repeat(32)).as_bytes());
        let _ = writer.write_all(&chunk);
        let mut sent = 0;
        while sent <= uapi::MAX_REQUEST_BYTES {
            if writer.write_all(line.as_bytes()).is_err() {
                return; // the server hung up, as it should
            }
            sent += line.len();
        }
    });
    assert_eq!(read_reply(&mut conn), "errno=-90\n\n");
    flood.join().unwrap();
    assert!(ifc.device.snapshot().peers.iter().all(|p| p.public_key != Key([0xab; 32])));

    // A client that connects and goes away at once.
    drop(UnixStream::connect(&path).unwrap());

    // And the real tool still works.
    let (_, peers) = ifc.dump();
    assert_eq!(peers[&a][3], "10.244.5.0/24");
    assert!(!ifc.server.socket_gone());
}

// ---------------------------------------------------------------------------
// The server's socket handling, without wg.

/// A device that reports a fixed listen port and accepts everything.
struct Fixed(u16);

impl Device for Fixed {
    fn status(&self) -> DeviceStatus {
        DeviceStatus { listen_port: self.0, ..Default::default() }
    }
    fn apply(&self, _: SetRequest) -> Result<(), UapiError> {
        Ok(())
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn serve_creates_directory_and_private_socket() {
    let tmp = TempDir::new("modes");
    let path = tmp.0.join("run/wireguard/x.sock");
    let server = uapi::serve(&path, Arc::new(Fixed(1))).unwrap();
    assert_eq!(mode(&tmp.0.join("run/wireguard")), 0o755);
    assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_socket());
    assert_eq!(mode(&path), 0o600);
    // Nothing but the socket is left in the directory.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["x.sock"]);
    // Many requests on one connection.
    let mut conn = connect(&path);
    for _ in 0..5 {
        assert_eq!(exchange(&mut conn, b"get=1\n\n"), "listen_port=1\nerrno=0\n\n");
        assert_eq!(exchange(&mut conn, b"set=1\n\n"), "errno=0\n\n");
    }
    drop(server);
    assert!(!path.exists());
    // The connection was closed by the stop.
    let mut rest = String::new();
    assert_eq!(conn.read_to_string(&mut rest).unwrap_or(0), 0);
}

#[test]
fn serve_replaces_stale_socket_and_refuses_live_one() {
    let tmp = TempDir::new("stale");
    let path = tmp.0.join("s.sock");
    // A stale socket: bound, then its listener gone.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let first = uapi::serve(&path, Arc::new(Fixed(1))).expect("stale socket replaced");
    // A live one: refused, and left alone.
    let err = uapi::serve(&path, Arc::new(Fixed(2))).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    assert_eq!(exchange(&mut connect(&path), b"get=1\n\n"), "listen_port=1\nerrno=0\n\n");
    drop(first);

    // A file that is not a socket is never removed.
    std::fs::write(&path, "precious").unwrap();
    let err = uapi::serve(&path, Arc::new(Fixed(3))).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[test]
fn socket_gone_when_removed_or_replaced() {
    let tmp = TempDir::new("gone");
    let path = tmp.0.join("g.sock");
    let server = uapi::serve(&path, Arc::new(Fixed(1))).unwrap();
    assert!(!server.socket_gone());
    std::fs::remove_file(&path).unwrap();
    assert!(server.socket_gone());
    // Someone else's socket now at that path: still gone for us, and not ours to remove.
    let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
    assert!(server.socket_gone());
    drop(server);
    assert!(path.exists(), "a socket that replaced ours must survive our stop");
    drop(other);

    // stop() then drop: idempotent.
    let path = tmp.0.join("h.sock");
    let mut server = uapi::serve(&path, Arc::new(Fixed(1))).unwrap();
    server.stop();
    assert!(!path.exists());
    server.stop();
    drop(server);
}

#[test]
fn connections_beyond_the_limit_are_closed() {
    let tmp = TempDir::new("limit");
    let path = tmp.0.join("l.sock");
    let _server = uapi::serve(&path, Arc::new(Fixed(7))).unwrap();
    // Fill every slot with a served connection.
    let mut held: Vec<_> = (0..uapi::MAX_CONNECTIONS).map(|_| connect(&path)).collect();
    for c in &mut held {
        assert_eq!(exchange(c, b"get=1\n\n"), "listen_port=7\nerrno=0\n\n");
    }
    // One more is closed without a reply.
    let mut extra = connect(&path);
    let _ = extra.get_mut().write_all(b"get=1\n\n");
    let mut rest = String::new();
    assert_eq!(extra.read_to_string(&mut rest).unwrap_or(0), 0, "{rest}");
    // Once the held ones go, new connections are served again.
    held.clear();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = connect(&path);
        let _ = c.get_mut().write_all(b"get=1\n\n");
        let mut line = String::new();
        if c.read_line(&mut line).unwrap_or(0) > 0 {
            assert_eq!(line, "listen_port=7\n");
            break;
        }
        assert!(Instant::now() < deadline, "slots never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn endpoint_formats_round_trip_through_get() {
    // What the server reports, parsed back by hand, for both families.
    let tmp = TempDir::new("ep");
    let path = tmp.0.join("e.sock");
    let dev = Arc::new(MemDevice::default());
    let _server = uapi::serve(&path, dev.clone()).unwrap();
    let mut conn = connect(&path);
    let k = Key([9; 32]);
    let req = format!("set=1\npublic_key={}\nendpoint=[2001:db8::1]:51820\nallowed_ip=10.1.2.3/16\n\n", k.to_hex());
    assert_eq!(exchange(&mut conn, req.as_bytes()), "errno=0\n\n");
    let got = exchange(&mut conn, b"get=1\n\n");
    assert!(got.contains("endpoint=[2001:db8::1]:51820\n"), "{got}");
    assert!(got.contains("allowed_ip=10.1.0.0/16\n"), "{got}");
    let ep: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
    assert_eq!(dev.snapshot().peers[0].endpoint, Some(ep));
}
