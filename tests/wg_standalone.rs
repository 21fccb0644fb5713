//! `weft wg IFNAME` / `weft-wg`, the drop-in userspace WireGuard, between
//! network namespaces (root): brought up by the real `wg-quick` with
//! `WG_QUICK_USERSPACE_IMPLEMENTATION=weft-wg`, driven by the real `wg`,
//! with its TUN moved into another namespace, under a handshake flood.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{require_root, weft_bin};
use weft_lab::netns;
use weft_lab::{transfer_check, Pod};

/// Namespaces, a scratch directory and interface names of one test; all
/// removed on drop, also when the test fails. Deleting a namespace deletes
/// the TUN in it, which ends the weft process serving it.
struct Net {
    tag: String,
    namespaces: Vec<String>,
    ifaces: Vec<String>,
    dir: PathBuf,
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

impl Net {
    fn new(tag: &str) -> Net {
        require_root();
        let tag = format!("{tag}{}x{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(format!("weft-wg-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        // wg-quick finds the userspace implementation by name on PATH: the
        // weft-wg program itself.
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_weft-wg"), dir.join("weft-wg")).unwrap();
        Net { tag, namespaces: Vec::new(), ifaces: Vec::new(), dir }
    }

    /// Makes `weft-wg` on this test's PATH the `weft` binary under that
    /// name (the symlink an image without the weft-wg program uses).
    fn weft_wg_as_symlink_to_weft(&self) {
        let link = self.dir.join("weft-wg");
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(weft_bin(), link).unwrap();
    }

    /// A namespace named after the test, with loopback up.
    fn ns(&mut self, name: &str) -> String {
        let ns = format!("{}{name}", self.tag);
        netns::ip(&["netns", "add", &ns]).unwrap();
        self.namespaces.push(ns.clone());
        netns::exec(&ns, "ip", &["link", "set", "lo", "up"]).unwrap();
        ns
    }

    /// An interface name unique to this test (at most 15 bytes).
    fn iface(&mut self, name: &str) -> String {
        let i = format!("{}{name}", self.tag);
        assert!(i.len() <= 15, "{i}");
        self.ifaces.push(i.clone());
        i
    }

    /// A veth between `a` (address `.1`) and `b` (`.2`) of `192.168.<net>.0/24`.
    fn link(&self, a: &str, b: &str, net: u8) {
        self.link_named(a, b, net, ("va", "vb"));
    }

    /// [`Net::link`] with the veth ends named `<tag><names>`.
    fn link_named(&self, a: &str, b: &str, net: u8, names: (&str, &str)) {
        let (va, vb) = (format!("{}{}", self.tag, names.0), format!("{}{}", self.tag, names.1));
        netns::ip(&["link", "add", &va, "netns", a, "type", "veth", "peer", "name", &vb, "netns", b]).unwrap();
        for (ns, dev, host) in [(a, &va, 1), (b, &vb, 2)] {
            netns::exec(ns, "ip", &["addr", "add", &format!("192.168.{net}.{host}/24"), "dev", dev]).unwrap();
            netns::exec(ns, "ip", &["link", "set", dev, "up"]).unwrap();
        }
    }

    /// A fresh key pair from the real `wg`: (private base64, public base64).
    fn keypair(&self) -> (String, String) {
        let private = netns::run("wg", &["genkey"]).unwrap().trim().to_string();
        let public = pipe("wg", &["pubkey"], &private).trim().to_string();
        (private, public)
    }

    /// A private key in a 0600 file, for `wg set ... private-key FILE`.
    fn key_file(&self, private: &str) -> PathBuf {
        let path = self.dir.join(format!("{}.key", &public_tag(private)));
        std::fs::write(&path, format!("{private}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// `cmd args...` in namespace `ns` with the scratch directory first on PATH.
    fn run_in(&self, ns: &str, cmd: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        let path = format!("{}:{}", self.dir.display(), std::env::var("PATH").unwrap_or_default());
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, cmd]).args(args).env("PATH", path);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = netns::ip(&["netns", "del", ns]);
        }
        // The processes see their TUN go and exit; wait for them, then make sure.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.ifaces.iter().any(|i| device_pid(i).is_some()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for i in &self.ifaces {
            if let Some(pid) = device_pid(i) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            let _ = std::fs::remove_file(weft_uapi::socket_path(i));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn public_tag(private: &str) -> String {
    private.chars().filter(char::is_ascii_alphanumeric).take(8).collect()
}

/// `cmd args` with `input` on stdin; its stdout.
fn pipe(cmd: &str, args: &[&str], input: &str) -> String {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

/// The pid of the `weft wg` process serving `iface`, if one runs.
fn device_pid(iface: &str) -> Option<u32> {
    let out = Command::new("pgrep").args(["-f", &format!("wg --foreground {iface}$")]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().next()?.trim().parse().ok()
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wg(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    netns::exec(ns, "wg", args)
}

fn ping(ns: &str, to: &str) -> bool {
    netns::exec(ns, "ping", &["-c", "1", "-W", "2", to]).is_ok()
}

/// Pings until one answer comes back or `within` passes.
fn ping_within(ns: &str, to: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if ping(ns, to) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
    }
}

/// Waits until `cond` holds, for up to `within`.
fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// One `wg show IFACE dump` peer line, split: public key, psk, endpoint,
/// allowed IPs, latest handshake, rx, tx, keepalive.
fn peer_rows(ns: &str, iface: &str) -> Vec<Vec<String>> {
    let dump = wg(ns, &["show", iface, "dump"]).unwrap();
    dump.lines().skip(1).map(|l| l.split('\t').map(str::to_string).collect()).collect()
}

fn pod(ns: &str, ip: &str) -> Pod {
    Pod { ns: ns.to_string(), ips: vec![ip.parse().unwrap()] }
}

#[test]
fn wg_quick_up_with_weft_wg_carries_traffic_both_ways_and_down_ends_it() {
    let mut net = Net::new("q");
    let (a, b) = (net.ns("a"), net.ns("b"));
    net.link(&a, &b, 93);
    // Node a reaches b's underlay address only through its default route,
    // and sends everything through the tunnel (AllowedIPs 0.0.0.0/0): wg-quick
    // then marks weft's sockets (fwmark) and routes unmarked traffic into the
    // tunnel, so the tunnel's own datagrams leave only if the mark holds.
    let va = format!("{}va", net.tag);
    netns::exec(&a, "ip", &["addr", "flush", "dev", &va]).unwrap();
    netns::exec(&a, "ip", &["addr", "add", "192.168.93.1/32", "dev", &va]).unwrap();
    netns::exec(&a, "ip", &["route", "add", "default", "dev", &va]).unwrap();
    let (ia, ib) = (net.iface("a"), net.iface("b"));
    let (ka, pa) = net.keypair();
    let (kb, pb) = net.keypair();
    for (ns, iface, text) in [
        (&a, &ia, quick_conf(&ka, "10.93.0.1/24", &pb, "0.0.0.0/0", "192.168.93.2:51820")),
        (&b, &ib, quick_conf(&kb, "10.93.0.2/24", &pa, "10.93.0.1/32", "192.168.93.1:51820")),
    ] {
        wg_quick_up(&net, ns, iface, &text, "weft-wg");
        let pid = device_pid(iface).expect("weft-wg runs in the background");
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert_eq!(exe.file_name().unwrap(), "weft-wg", "the weft-wg program serves {iface}: {exe:?}");
    }

    assert!(ping_within(&a, "10.93.0.2", Duration::from_secs(5)), "a -> b");
    assert!(ping(&b, "10.93.0.1"), "b -> a");
    for (from, to) in [(pod(&a, "10.93.0.1"), pod(&b, "10.93.0.2")), (pod(&b, "10.93.0.2"), pod(&a, "10.93.0.1"))] {
        let c = transfer_check(&from, &to, false, 8 << 20);
        assert!(c.passed, "{}: {}", c.name, c.detail);
    }
    assert_eq!(wg(&a, &["show", &ia, "fwmark"]).unwrap().trim(), "0xca6c", "wg-quick's mark (51820)");
    let rows = peer_rows(&a, &ia);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][0], pb);
    assert!(rows[0][4].parse::<u64>().unwrap() > 1_600_000_000, "a handshake time: {rows:?}");
    assert!(rows[0][5].parse::<u64>().unwrap() > 8 << 20, "received bytes counted: {rows:?}");

    // wg-quick down deletes the link: the process sees its TUN go and exits,
    // taking its socket with it.
    let path = net.dir.join(format!("{ia}.conf"));
    let env = [("WG_QUICK_USERSPACE_IMPLEMENTATION", "weft-wg")];
    ok(&net.run_in(&a, "wg-quick", &["down", path.to_str().unwrap()], &env), "wg-quick down");
    assert!(eventually(Duration::from_secs(3), || device_pid(&ia).is_none()), "weft wg exits with its TUN");
    assert!(!weft_uapi::socket_path(&ia).exists(), "its socket is removed");
    assert!(device_pid(&ib).is_some(), "the other device runs on");
}

/// A wg-quick configuration with one peer.
fn quick_conf(private: &str, addr: &str, peer: &str, allowed: &str, endpoint: &str) -> String {
    format!(
        "[Interface]\nPrivateKey = {private}\nAddress = {addr}\nListenPort = 51820\n\n\
         [Peer]\nPublicKey = {peer}\nAllowedIPs = {allowed}\nEndpoint = {endpoint}\n"
    )
}

/// `wg-quick up` of `text` as interface `iface` in `ns`, with `program` as
/// the userspace implementation.
fn wg_quick_up(net: &Net, ns: &str, iface: &str, text: &str, program: &str) {
    let path = net.dir.join(format!("{iface}.conf"));
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let env = [("WG_QUICK_USERSPACE_IMPLEMENTATION", program)];
    let out = net.run_in(ns, "wg-quick", &["up", path.to_str().unwrap()], &env);
    let log = ok(&out, "wg-quick up") + &String::from_utf8_lossy(&out.stderr);
    assert!(log.contains(&format!("[#] {program} {iface}")), "wg-quick ran {program}: {log}");
}

#[test]
fn weft_wg_and_wireguard_go_talk_through_wg_quick() {
    let mut net = Net::new("g");
    net.weft_wg_as_symlink_to_weft();
    let (a, b) = (net.ns("a"), net.ns("b"));
    net.link(&a, &b, 98);
    let (ia, ib) = (net.iface("a"), net.iface("b"));
    let (ka, pa) = net.keypair();
    let (kb, pb) = net.keypair();
    wg_quick_up(&net, &a, &ia, &quick_conf(&ka, "10.98.0.1/24", &pb, "10.98.0.2/32", "192.168.98.2:51820"), "weft-wg");
    let pid = device_pid(&ia).expect("weft runs in the background");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe.file_name().unwrap(), "weft", "weft under the name weft-wg serves {ia}: {exe:?}");
    wg_quick_up(
        &net,
        &b,
        &ib,
        &quick_conf(&kb, "10.98.0.2/24", &pa, "10.98.0.1/32", "192.168.98.1:51820"),
        "wireguard-go",
    );
    assert!(ping_within(&a, "10.98.0.2", Duration::from_secs(5)), "weft -> wireguard-go");
    assert!(ping(&b, "10.98.0.1"), "wireguard-go -> weft");
    for (from, to) in [(pod(&a, "10.98.0.1"), pod(&b, "10.98.0.2")), (pod(&b, "10.98.0.2"), pod(&a, "10.98.0.1"))] {
        let c = transfer_check(&from, &to, false, 4 << 20);
        assert!(c.passed, "{}: {}", c.name, c.detail);
    }
    // wireguard-go exits when its TUN goes with the namespace; stop it now anyway.
    let _ = Command::new("pkill").args(["-f", &format!("wireguard-go {ib}$")]).status();
}

/// Two standalone devices: `ua` keeps its TUN, `ub`'s TUN is moved into
/// `pb` (its sockets stay in `ub`), the way a container gets its interface.
struct Pair {
    net: Net,
    ua: String,
    ub: String,
    pb: String,
    ia: String,
    ib: String,
    a_key: (String, String),
    b_key: (String, String),
}

impl Pair {
    fn up(tag: &str, net_id: u8) -> Pair {
        let mut net = Net::new(tag);
        let (ua, ub, pb) = (net.ns("ua"), net.ns("ub"), net.ns("pb"));
        net.link(&ua, &ub, net_id);
        let (ia, ib) = (net.iface("a"), net.iface("b"));
        // `weft wg IFNAME` returns once the TUN and the socket are there.
        for (ns, iface) in [(&ua, &ia), (&ub, &ib)] {
            ok(&net.run_in(ns, weft_bin().to_str().unwrap(), &["wg", iface], &[]), "weft wg");
            assert!(weft_uapi::socket_path(iface).exists(), "socket ready when weft wg returns");
            netns::exec(ns, "ip", &["link", "show", iface]).expect("TUN ready when weft wg returns");
        }
        netns::exec(&ub, "ip", &["link", "set", &ib, "netns", &pb]).unwrap();
        let (a_key, b_key) = (net.keypair(), net.keypair());
        for (ns, iface, key, addr, port) in
            [(&ua, &ia, &a_key, "10.94.0.1/24", "51901"), (&pb, &ib, &b_key, "10.94.0.2/24", "51902")]
        {
            let file = net.key_file(&key.0);
            wg(ns, &["set", iface, "private-key", file.to_str().unwrap(), "listen-port", port]).unwrap();
            netns::exec(ns, "ip", &["addr", "add", addr, "dev", iface]).unwrap();
            netns::exec(ns, "ip", &["link", "set", iface, "up"]).unwrap();
        }
        let ep = |host: u8, port: u16| format!("192.168.{net_id}.{host}:{port}");
        wg(&ua, &["set", &ia, "peer", &b_key.1, "allowed-ips", "10.94.0.2/32", "endpoint", &ep(2, 51902)]).unwrap();
        wg(&pb, &["set", &ib, "peer", &a_key.1, "allowed-ips", "10.94.0.1/32", "endpoint", &ep(1, 51901)]).unwrap();
        Pair { net, ua, ub, pb, ia, ib, a_key, b_key }
    }
}

#[test]
fn standalone_device_follows_wg_set_and_outlives_malformed_requests() {
    let p = Pair::up("s", 94);
    let (ua, pb, ia, ib) = (&p.ua, &p.pb, &p.ia, &p.ib);
    assert!(ping_within(ua, "10.94.0.2", Duration::from_secs(5)), "a -> b through the moved TUN");
    assert!(ping(pb, "10.94.0.1"), "b -> a");
    // A second device of the same name is refused and leaves the first alone.
    netns::exec(ua, "ip", &["link", "set", ia, "mtu", "1300"]).unwrap();
    let again = p.net.run_in(ua, weft_bin().to_str().unwrap(), &["wg", ia], &[]);
    assert!(!again.status.success(), "a second weft wg {ia} is refused");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"), "{again:?}");
    let link = netns::exec(ua, "ip", &["link", "show", ia]).unwrap();
    assert!(link.contains("mtu 1300"), "{link}");
    assert!(ping(ua, "10.94.0.2"), "the first device goes on");
    assert_eq!(wg(ua, &["show", ia, "listen-port"]).unwrap().trim(), "51901");
    assert_eq!(wg(ua, &["show", ia, "public-key"]).unwrap().trim(), p.a_key.1);

    // Change the existing peer: keepalive, more allowed IPs, then replace them.
    let b = &p.b_key.1;
    wg(ua, &["set", ia, "peer", b, "persistent-keepalive", "5", "allowed-ips", "10.94.0.2/32,10.94.7.0/24"]).unwrap();
    let rows = peer_rows(ua, ia);
    assert_eq!(rows[0][3], "10.94.0.2/32,10.94.7.0/24", "{rows:?}");
    assert_eq!(rows[0][7], "5");
    wg(ua, &["set", ia, "peer", b, "allowed-ips", "10.94.0.2/32"]).unwrap();
    assert_eq!(peer_rows(ua, ia)[0][3], "10.94.0.2/32", "allowed IPs replaced");
    assert!(ping(ua, "10.94.0.2"), "traffic after changing the peer");

    // A port in use is refused and changes nothing, even when its holder
    // allows SO_REUSEPORT (as every weft socket does, another device's
    // included); a free one is taken, and the peer follows it (roaming) once
    // we send from it.
    let blocker = netns::in_netns(ua, || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        s.set_reuse_port(true)?;
        s.bind(&"0.0.0.0:51950".parse::<SocketAddr>().unwrap().into())?;
        std::io::Result::Ok(s)
    })
    .unwrap()
    .unwrap();
    let e = wg(ua, &["set", ia, "listen-port", "51950"]).unwrap_err().to_string();
    assert!(e.contains("in use"), "{e}");
    assert_eq!(wg(ua, &["show", ia, "listen-port"]).unwrap().trim(), "51901");
    drop(blocker);
    wg(ua, &["set", ia, "listen-port", "51911"]).unwrap();
    assert_eq!(wg(ua, &["show", ia, "listen-port"]).unwrap().trim(), "51911");
    let sockets = netns::exec(&p.ub, "ss", &["-uln"]).unwrap_or_default() + &netns::exec(ua, "ss", &["-uln"]).unwrap();
    assert!(sockets.contains(":51911") && !sockets.contains(":51901 "), "{sockets}");
    assert!(ping_within(ua, "10.94.0.2", Duration::from_secs(5)), "a -> b from the new port");
    assert!(ping(pb, "10.94.0.1"), "b -> a at a's new port (roamed)");
    assert!(peer_rows(pb, ib)[0][2].ends_with(":51911"), "b follows a's new port");

    // Malformed requests straight to the socket: an error reply each, the
    // connection and the device stay up.
    let mut s = UnixStream::connect(weft_uapi::socket_path(ia)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for (req, errno) in [
        (&b"set=1\nnot a line\n\n"[..], "errno=-71"),
        (b"set=1\nlisten_port=seventy\n\n", "errno=-22"),
        (b"set=1\npublic_key=zz\n\n", "errno=-22"),
        (b"get=2\n\n", "errno=-22"),
        (b"set=1\nprotocol_version=2\n\n", "errno=-22"),
    ] {
        s.write_all(req).unwrap();
        let reply = read_reply(&mut s);
        assert!(reply.contains(errno), "{:?} -> {reply:?}", String::from_utf8_lossy(req));
    }
    s.write_all(b"get=1\n\n").unwrap();
    assert!(read_reply(&mut s).contains("listen_port=51911\n"));
    assert!(ping(ua, "10.94.0.2"), "still forwarding after malformed requests");

    // A new private key: the peer knows the old one only, so traffic stops
    // until it is told the new public key.
    let (k2, p2) = p.net.keypair();
    let file = p.net.key_file(&k2);
    wg(ua, &["set", ia, "private-key", file.to_str().unwrap()]).unwrap();
    assert_eq!(wg(ua, &["show", ia, "public-key"]).unwrap().trim(), p2);
    wg(pb, &["set", ib, "peer", &p.a_key.1, "remove"]).unwrap();
    wg(pb, &["set", ib, "peer", &p2, "allowed-ips", "10.94.0.1/32", "endpoint", "192.168.94.1:51911"]).unwrap();
    assert!(ping_within(ua, "10.94.0.2", Duration::from_secs(10)), "traffic with the new key");

    // Remove the peer: nothing is routed to it any more; add it back.
    wg(ua, &["set", ia, "peer", b, "remove"]).unwrap();
    assert!(peer_rows(ua, ia).is_empty());
    assert!(!ping(ua, "10.94.0.2"), "no peer, no traffic");
    wg(ua, &["set", ia, "peer", b, "allowed-ips", "10.94.0.2/32", "endpoint", "192.168.94.2:51902"]).unwrap();
    assert!(ping_within(ua, "10.94.0.2", Duration::from_secs(10)), "peer added back");
}

#[test]
fn a_peer_cannot_inject_sources_that_route_to_another_peer() {
    let p = Pair::up("o", 99);
    let mut net = p.net;
    // A third device c, on a link of its own to a; a gives c 10.94.0.0/24,
    // which overlaps b's 10.94.0.2/32: the longest match owns an address.
    let uc = net.ns("uc");
    net.link_named(&p.ua, &uc, 100, ("vc", "vd"));
    let ic = net.iface("c");
    ok(&net.run_in(&uc, weft_bin().to_str().unwrap(), &["wg", &ic], &[]), "weft wg c");
    let c_key = net.keypair();
    let file = net.key_file(&c_key.0);
    wg(&uc, &["set", &ic, "private-key", file.to_str().unwrap(), "listen-port", "51903"]).unwrap();
    wg(&uc, &["set", &ic, "peer", &p.a_key.1, "allowed-ips", "10.94.0.1/32", "endpoint", "192.168.100.1:51901"])
        .unwrap();
    for addr in ["10.94.0.3/24", "10.94.0.2/32"] {
        netns::exec(&uc, "ip", &["addr", "add", addr, "dev", &ic]).unwrap();
    }
    netns::exec(&uc, "ip", &["link", "set", &ic, "up"]).unwrap();
    wg(&p.ua, &["set", &p.ia, "peer", &c_key.1, "allowed-ips", "10.94.0.0/24", "endpoint", "192.168.100.2:51903"])
        .unwrap();

    let listener = netns::in_netns(&p.ua, || UdpSocket::bind("10.94.0.1:7777")).unwrap().unwrap();
    listener.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let send_from = |ns: &str, src: &'static str, what: &'static [u8]| {
        netns::in_netns(ns, move || {
            let s = UdpSocket::bind((src, 0)).unwrap();
            s.send_to(what, "10.94.0.1:7777").unwrap();
        })
        .unwrap()
    };
    let received = |want: &[u8]| {
        let mut buf = [0u8; 64];
        while let Ok((n, _)) = listener.recv_from(&mut buf) {
            if &buf[..n] == want {
                return true;
            }
        }
        false
    };
    // c's own address gets through (after the handshake).
    let mut through = false;
    for _ in 0..5 {
        send_from(&uc, "10.94.0.3", b"from c");
        if received(b"from c") {
            through = true;
            break;
        }
    }
    assert!(through, "c reaches a from its own address");
    // c claiming b's address, which is inside c's /24 but routes to b: dropped.
    send_from(&uc, "10.94.0.2", b"c as b");
    assert!(!received(b"c as b"), "c injected a packet with b's address");
    // b itself is still heard from that address.
    send_from(&p.pb, "10.94.0.2", b"from b");
    assert!(received(b"from b"), "b reaches a");
}

#[test]
fn replies_leave_from_the_address_the_peer_sent_to() {
    let p = Pair::up("r", 97);
    let (ua, pb, ib) = (&p.ua, &p.pb, &p.ib);
    // a's underlay has a second address; b knows a only by that one. A reply
    // from a's primary address would make b's endpoint roam to it.
    let va = format!("{}va", p.net.tag);
    netns::exec(ua, "ip", &["addr", "add", "192.168.97.11/24", "dev", &va]).unwrap();
    wg(pb, &["set", ib, "peer", &p.a_key.1, "endpoint", "192.168.97.11:51901"]).unwrap();
    assert!(ping_within(pb, "10.94.0.1", Duration::from_secs(5)), "b -> a at its second address");
    assert!(ping(&p.ua, "10.94.0.2"), "a -> b");
    let endpoint = &peer_rows(pb, ib)[0][2];
    assert_eq!(endpoint, "192.168.97.11:51901", "a answered from the address b sent to");
}

fn read_reply(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while !out.ends_with(b"\n\n") {
        match s.read(&mut byte) {
            Ok(1) => out.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn moved_tun_carries_large_packets_and_sigterm_or_socket_removal_end_the_device() {
    let p = Pair::up("m", 95);
    let (ua, pb, ia, ib) = (&p.ua, &p.pb, &p.ia, &p.ib);
    assert!(ping_within(pb, "10.94.0.1", Duration::from_secs(5)), "b (moved TUN) -> a");
    // The MTU is raised after creation: packets up to it are read whole
    // (one 8 KiB packet, no fragmentation before the TUN).
    netns::exec(ua, "ip", &["link", "set", ia, "mtu", "9000"]).unwrap();
    netns::exec(ua, "ping", &["-c", "2", "-W", "3", "-M", "do", "-s", "8000", "10.94.0.2"]).expect("8 KiB ping");
    let c = transfer_check(&pod(pb, "10.94.0.2"), &pod(ua, "10.94.0.1"), false, 4 << 20);
    assert!(c.passed, "{}: {}", c.name, c.detail);

    // SIGTERM: the process exits, removes its socket and its TUN.
    let pid = device_pid(ib).expect("b's device runs");
    Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(eventually(Duration::from_secs(3), || device_pid(ib).is_none()), "exits on SIGTERM");
    assert!(!weft_uapi::socket_path(ib).exists());
    assert!(netns::exec(pb, "ip", &["link", "show", ib]).is_err(), "TUN removed");

    // Removing the socket file ends the device too.
    assert!(device_pid(ia).is_some());
    std::fs::remove_file(weft_uapi::socket_path(ia)).unwrap();
    assert!(eventually(Duration::from_secs(3), || device_pid(ia).is_none()), "exits when its socket is removed");
    assert!(netns::exec(ua, "ip", &["link", "show", ia]).is_err(), "TUN removed");
}

/// WireGuard message types (first byte).
const COOKIE_REPLY: u8 = 3;
const HANDSHAKE_RESPONSE: u8 = 2;

#[test]
fn handshake_flood_gets_cookie_replies_and_a_real_peer_still_connects() {
    let p = Pair::up("f", 96);
    let (ua, pb, ia) = (&p.ua, &p.pb, &p.ia);
    let a_public: [u8; 32] = weft_control::keys::decode(&p.a_key.1).unwrap();
    // An initiation from a key the device does not know, with a valid MAC1:
    // sent again and again, each copy costs the device a DH unless it is
    // over the handshake rate limit, when it earns a cookie reply instead.
    let init = {
        let secret = boringtun::x25519::StaticSecret::from([7u8; 32]);
        let mut t =
            boringtun::noise::Tunn::new(secret, boringtun::x25519::PublicKey::from(a_public), None, None, 1, None);
        let mut buf = [0u8; 256];
        match t.format_handshake_initiation(&mut buf, true) {
            boringtun::noise::TunnResult::WriteToNetwork(b) => b.to_vec(),
            _ => panic!("no initiation"),
        }
    };
    let target: SocketAddr = "192.168.96.1:51901".parse().unwrap();
    let pid = device_pid(ia).expect("the device runs");
    let rss_before = rss_kib(pid);
    let flood = netns::spawn_in_netns(&p.ub, move || {
        let s = UdpSocket::bind("192.168.96.2:0").unwrap();
        s.set_nonblocking(true).unwrap();
        let (mut sent, mut cookies, mut responses) = (0u64, 0u64, 0u64);
        let mut buf = [0u8; 256];
        let end = Instant::now() + Duration::from_secs(12);
        while Instant::now() < end {
            // About 2 000 initiations a second, 20 times the limit.
            for _ in 0..20 {
                if s.send_to(&init, target).is_ok() {
                    sent += 1;
                }
            }
            while let Ok((n, _)) = s.recv_from(&mut buf) {
                match buf[..n].first() {
                    Some(&COOKIE_REPLY) => cookies += 1,
                    Some(&HANDSHAKE_RESPONSE) => responses += 1,
                    _ => {}
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (sent, cookies, responses)
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // The real peer handshakes during the flood: its first initiation is
    // answered with a cookie, the retry carries MAC2 and gets through.
    let connected = ping_within(pb, "10.94.0.1", Duration::from_secs(10));
    let (sent, cookies, responses) = flood.join().unwrap();
    eprintln!(
        "flood: {sent} initiations sent, {cookies} cookie replies, {responses} responses; peer connected: {connected}"
    );
    assert!(sent > 5_000, "flood sent {sent}");
    assert!(cookies > 100, "cookie replies under load: {cookies} of {sent}");
    assert_eq!(responses, 0, "no handshake response to an unknown key");
    assert!(connected, "the real peer connects during the flood");
    assert!(ping(ua, "10.94.0.2"), "and traffic flows both ways");
    assert!(device_pid(ia).is_some(), "the device survived");
    // Handshakes are answered as they come, from no queue: the flood costs
    // the device no memory that stays.
    let grown = rss_kib(pid).saturating_sub(rss_before);
    assert!(grown < 2048, "the device grew by {grown} KiB under {sent} initiations");
}

/// Resident memory of process `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process runs");
    weft_lab::bench::footprint::vm_rss_kib(&status).expect("VmRSS")
}
