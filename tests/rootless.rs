//! Rootless nodes (root, to build the lab; the rootless agent itself runs as
//! a user the lab makes, with no capabilities): `weft lab --rootless` with
//! VXLAN (dual stack) and WireGuard, the SOCKS5 server (CONNECT, UDP
//! ASSOCIATE, malformed requests, the connection cap), forwards, exposed
//! ports, ICMP echo, and what the agent never opens.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use common::{assert_all_passed, options, up};
use weft_lab::rootless::{self, EXPOSE_LOCAL, EXPOSE_PORT, FORWARD_LOCAL, FORWARD_PORT, MAX_CONNECTIONS, SOCKS_ADDR};
use weft_lab::{netns, Lab};

/// Echo servers on `addr` in `ns`, TCP and UDP, for `secs` seconds; the
/// TCP one answers each connection's bytes until it closes.
fn echo(ns: &str, addr: SocketAddr, secs: u64) {
    let (tcp, udp) = netns::in_netns(ns, move || (TcpListener::bind(addr), UdpSocket::bind(addr))).unwrap();
    let (tcp, udp) = (tcp.unwrap(), udp.unwrap());
    std::thread::spawn(move || {
        tcp.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            match tcp.accept() {
                Ok((mut s, _)) => {
                    std::thread::spawn(move || {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                        let mut buf = [0u8; 4096];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    std::thread::spawn(move || {
        udp.set_read_timeout(Some(Duration::from_secs(secs))).unwrap();
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
}

/// Sends `msg` over a connected TCP stream and reads the same length back.
fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap();
    back
}

/// A UDP datagram to `to` from `ns`, and the reply.
fn udp_round_trip(ns: &str, to: SocketAddr, msg: &'static [u8]) -> Vec<u8> {
    netns::in_netns(ns, move || {
        let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut buf = [0u8; 2048];
        // UDP may lose the first datagram while a WireGuard handshake runs.
        for _ in 0..10 {
            s.send_to(msg, to).unwrap();
            if let Ok(n) = s.recv(&mut buf) {
                return buf[..n].to_vec();
            }
        }
        panic!("no UDP reply from {to}");
    })
    .unwrap()
}

fn metric(lab: &Lab, name: &str) -> f64 {
    let r = lab.rootless.as_ref().unwrap();
    *lab.metrics(r).unwrap().get(name).unwrap_or_else(|| panic!("metric {name}"))
}

/// The rootless agent's user and capability sets, from /proc.
fn status_lines(pid: i32) -> Vec<(String, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.to_string(), v.trim().to_string())))
        .collect()
}

#[test]
fn rootless_vxlan_node_reaches_pods_through_socks5_forwards_and_exposed_ports() {
    let mut o = options("rl");
    o.nodes = 2;
    o.rootless = true;
    o.rootless_trace = true;
    o.cluster_cidrs = vec!["10.244.0.0/16".parse().unwrap(), "2001:cafe:42::/56".parse().unwrap()];
    let (lab, _g) = up(&o);
    // The lab's checks: 64 MiB fetched through SOCKS5 from a pod in each
    // family, SHA-256 equal at both ends; ping of the rootless node's pod
    // addresses from a pod; its counters.
    let checks = lab.check();
    for family in ["(10.244.", "(2001:cafe:42:"] {
        assert!(
            checks.iter().any(|c| c.name.starts_with("socks5 fetch 64 MiB") && c.name.contains(family) && c.passed),
            "fetch in {family}: {}",
            weft_lab::table(&checks)
        );
        let family = &family[1..];
        assert!(
            checks.iter().any(|c| c.name.contains("(rootless node)") && c.name.contains(family) && c.passed),
            "ping of the rootless node's {family} address: {}",
            weft_lab::table(&checks)
        );
    }
    assert_eq!(checks.iter().filter(|c| c.name.starts_with("socks5 fetch")).count(), 2);
    assert_all_passed(&lab, &checks);

    let r = lab.rootless.as_ref().unwrap();
    let pod = &lab.nodes[0].pods[0];
    let pod_ip = pod.ip(false).unwrap();
    assert_eq!(Some(pod_ip), rootless::host_local_first(&lab.nodes[0], false), "the forward's target is this pod");
    let rootless_ip = rootless::pod_address(r, false).unwrap();

    // No privilege: another user than root, every capability set empty.
    let pid = rootless::agent_pid(&lab.opts.name).expect("the rootless agent runs as the lab's user");
    let status = status_lines(pid);
    let get = |k: &str| status.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap();
    assert!(get("Uid").split_whitespace().all(|u| u != "0"), "Uid {}", get("Uid"));
    for cap in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(u64::from_str_radix(&get(cap), 16).unwrap(), 0, "{cap} of the rootless agent");
    }
    // Never a TUN device nor a netlink socket, over its whole life: strace
    // saw every open and socket call; some of them are its UDP sockets.
    let trace = std::fs::read_to_string(lab.dir.join("rootless.strace")).unwrap();
    assert!(trace.contains("socket(AF_INET, SOCK_DGRAM"), "strace saw the agent's sockets:\n{trace}");
    assert!(!trace.contains("/dev/net/tun"), "the rootless agent opened /dev/net/tun:\n{trace}");
    assert!(!trace.contains("AF_NETLINK"), "the rootless agent opened a netlink socket:\n{trace}");

    // Echo servers in the first pod (the forward's target) and, in the
    // rootless node's namespace, the exposed local service.
    echo(&pod.ns, SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), FORWARD_PORT), 120);
    echo(&r.ns, EXPOSE_LOCAL, 120);

    // A pod reaches the service the rootless node exposes, TCP and UDP.
    let exposed = SocketAddr::new(rootless_ip, EXPOSE_PORT);
    let back = netns::in_netns(&pod.ns, move || {
        let mut s = TcpStream::connect_timeout(&exposed, Duration::from_secs(5)).unwrap();
        round_trip(&mut s, b"from a pod to the rootless node")
    })
    .unwrap();
    assert_eq!(back, b"from a pod to the rootless node");
    assert_eq!(udp_round_trip(&pod.ns, exposed, b"udp to an exposed port"), b"udp to an exposed port");

    // Static forwards, TCP and UDP, to the pod.
    let back = netns::in_netns(&r.ns, || {
        let mut s = TcpStream::connect_timeout(&FORWARD_LOCAL, Duration::from_secs(5)).unwrap();
        round_trip(&mut s, b"through the tcp forward")
    })
    .unwrap();
    assert_eq!(back, b"through the tcp forward");
    assert_eq!(udp_round_trip(&r.ns, FORWARD_LOCAL, b"through the udp forward"), b"through the udp forward");

    // UDP ASSOCIATE: a datagram to the pod with the SOCKS5 header, the
    // reply with the pod's address in its header.
    let target = SocketAddr::new(pod_ip, FORWARD_PORT);
    let reply = netns::in_netns(&r.ns, move || {
        let mut c = TcpStream::connect(SOCKS_ADDR).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(&[5, 1, 0]).unwrap();
        let mut choice = [0u8; 2];
        c.read_exact(&mut choice).unwrap();
        c.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap();
        let mut rep = [0u8; 10];
        c.read_exact(&mut rep).unwrap();
        assert_eq!(&rep[..4], &[5, 0, 0, 1], "UDP ASSOCIATE granted");
        let relay = SocketAddr::from(([rep[4], rep[5], rep[6], rep[7]], u16::from_be_bytes([rep[8], rep[9]])));
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        u.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut dgram = vec![0, 0, 0];
        rootless::push_addr(&mut dgram, target);
        dgram.extend_from_slice(b"udp through socks5");
        let mut buf = [0u8; 2048];
        for _ in 0..10 {
            u.send_to(&dgram, relay).unwrap();
            if let Ok(n) = u.recv(&mut buf) {
                drop(c);
                return buf[..n].to_vec();
            }
        }
        panic!("no reply through the UDP association");
    })
    .unwrap();
    let mut want = vec![0, 0, 0];
    rootless::push_addr(&mut want, target);
    want.extend_from_slice(b"udp through socks5");
    assert_eq!(reply, want, "the reply carries the pod's address and the echoed payload");

    // A malformed request gets an error reply and leaves an open
    // connection through the same server working.
    let refused_before = metric(&lab, "weft_netstack_socks_refused_total");
    let (good_echo, bad_type, socks4) = netns::in_netns(&r.ns, move || {
        let mut good = rootless::socks5_connect(SOCKS_ADDR, target).unwrap().expect("CONNECT granted");
        let mut bad = TcpStream::connect(SOCKS_ADDR).unwrap();
        bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        bad.write_all(&[5, 1, 0, 5, 1, 0, 9, 1, 2, 3, 4]).unwrap();
        let mut rep = vec![0u8; 12];
        let mut n = 0;
        while let Ok(k) = bad.read(&mut rep[n..]) {
            if k == 0 {
                break;
            }
            n += k;
        }
        rep.truncate(n);
        let mut old = TcpStream::connect(SOCKS_ADDR).unwrap();
        old.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        old.write_all(&[4, 1, 0, 80, 10, 244, 1, 2, 0]).unwrap();
        let mut rest = Vec::new();
        let _ = old.read_to_end(&mut rest);
        (round_trip(&mut good, b"still here"), rep, rest)
    })
    .unwrap();
    assert_eq!(good_echo, b"still here");
    assert_eq!(&bad_type[..2], &[5, 0], "the greeting was answered: {bad_type:?}");
    assert_eq!(&bad_type[2..4], &[5, 8], "address type not supported: {bad_type:?}");
    assert!(socks4.is_empty(), "a SOCKS4 request is closed without a SOCKS5 reply: {socks4:?}");
    assert!(metric(&lab, "weft_netstack_socks_refused_total") >= refused_before + 2.0);

    // A flood of connections stops at the cap, counted; once they close,
    // new connections are served again.
    let refused_before = metric(&lab, "weft_netstack_refused_cap_total");
    // The UDP flows above stay open until idle for a minute.
    let open_before = metric(&lab, "weft_netstack_open");
    let closed_early = netns::in_netns(&r.ns, || {
        let held: Vec<TcpStream> = (0..MAX_CONNECTIONS + 16).map(|_| TcpStream::connect(SOCKS_ADDR).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(500));
        let mut closed = 0;
        for mut s in held {
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            if matches!(s.read(&mut [0u8; 1]), Ok(0)) {
                closed += 1;
            }
        }
        closed
    })
    .unwrap();
    assert!(closed_early >= 16, "connections beyond the cap are closed: {closed_early}");
    let refused = metric(&lab, "weft_netstack_refused_cap_total") - refused_before;
    assert!(refused >= 16.0, "refusals counted: {refused}");
    common::wait_for("the flood's connections to close", Duration::from_secs(10), || {
        metric(&lab, "weft_netstack_open") <= open_before
    });
    let back = netns::in_netns(&r.ns, move || {
        let mut s = rootless::socks5_connect(SOCKS_ADDR, target).unwrap().expect("CONNECT after the flood");
        round_trip(&mut s, b"after the flood")
    })
    .unwrap();
    assert_eq!(back, b"after the flood");
}

#[test]
fn rootless_wireguard_node_fetches_through_socks5_and_answers_ping() {
    let mut o = options("rw");
    o.nodes = 2;
    o.rootless = true;
    o.backend = "wireguard-native".into();
    let (lab, _g) = up(&o);
    let checks = lab.check();
    assert!(
        checks.iter().any(|c| c.name.starts_with("socks5 fetch 64 MiB") && c.passed),
        "{}",
        weft_lab::table(&checks)
    );
    assert!(checks.iter().any(|c| c.name.contains("(rootless node)") && c.passed), "{}", weft_lab::table(&checks));
    assert_all_passed(&lab, &checks);
    let pid = rootless::agent_pid(&lab.opts.name).expect("the rootless agent runs as the lab's user");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.lines().any(|l| l.starts_with("CapEff:") && l.ends_with("0000000000000000")), "{status}");
}
