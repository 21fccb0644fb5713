//! The rootless node's configuration (`rootless: true` and the keys that
//! go with it), parsed and checked here, pure: the userspace stack that
//! runs it is `weft-netstack`.

use std::net::SocketAddr;

use crate::cluster::Backend;
use crate::error::ConfigError;

/// The rootless keys, with one line each (part of the agent's keys).
pub const KEYS: &[(&str, &str)] = &[
    (
        "rootless",
        "run with no privilege: no TUN, no netlink, no routes; the pod side is a userspace TCP/IP stack \
         reached through socks5-addr, forward and expose (default false)",
    ),
    ("socks5-addr", "with rootless: the SOCKS5 server's address (default 127.0.0.1:1080; empty: off)"),
    ("socks5-username", "with rootless: the SOCKS5 server's user (with socks5-password; default: no authentication)"),
    ("socks5-password", "the password of socks5-username"),
    (
        "forward",
        "with rootless: LOCAL=TARGET[/tcp|/udp], comma separated: a local address whose connections go to \
         TARGET in the cluster, such as 127.0.0.1:8080=10.244.2.5:80 (default: both protocols)",
    ),
    (
        "expose",
        "with rootless: PORT=LOCAL[/tcp|/udp], comma separated: PORT of the node's pod address reaches the \
         local service LOCAL, such as 80=127.0.0.1:8080 (default: both protocols)",
    ),
    ("rootless-max-connections", "with rootless: connections and UDP flows open at once (default 512)"),
    (
        "underlay-mtu",
        "with rootless: the MTU of the link holding node-ip, which a rootless node cannot ask the kernel for \
         (default 1500)",
    ),
];

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// `forward`: a local address whose connections (or datagrams) go to a
/// target in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub local: SocketAddr,
    pub target: SocketAddr,
    pub proto: Proto,
}

/// `expose`: a port of the node's pod address whose connections (or
/// datagrams) go to a local service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expose {
    pub port: u16,
    pub local: SocketAddr,
    pub proto: Proto,
}

/// What `rootless: true` comes with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootlessConfig {
    /// The SOCKS5 server's address; none for off.
    pub socks5: Option<SocketAddr>,
    /// The SOCKS5 user and password; none for no authentication.
    pub socks5_user: Option<(String, String)>,
    pub forwards: Vec<Forward>,
    pub exposes: Vec<Expose>,
    pub max_connections: usize,
    pub underlay_mtu: u32,
}

/// Default of `rootless-max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// The rootless keys from the config's pairs (`get` gives a trimmed,
/// non-empty value; `raw` the value as written, so that an empty one can
/// turn a default off). None unless `rootless: true`; a rootless key
/// without it is refused.
pub fn from_pairs<'a>(
    get: &impl Fn(&str) -> Option<&'a str>,
    raw: &impl Fn(&str) -> Option<&'a str>,
    backend: Backend,
) -> Result<Option<RootlessConfig>, ConfigError> {
    let on = match get("rootless") {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => return Err(ConfigError::new("rootless", v, "true or false")),
    };
    if !on {
        if let Some((k, _)) = KEYS[1..].iter().find(|(k, _)| raw(k).is_some()) {
            return Err(ConfigError::new(k, shown(k, raw(k)), "only with rootless: true"));
        }
        return Ok(None);
    }
    if !matches!(backend, Backend::Vxlan | Backend::WireguardNative) {
        return Err(ConfigError::new(
            "flannel-backend",
            backend.name(),
            "vxlan or wireguard-native with rootless: true (host-gw and none need routes in the kernel)",
        ));
    }
    let socks5 =
        match raw("socks5-addr").map(str::trim) {
            Some("") => None,
            Some(v) => Some(v.parse::<SocketAddr>().map_err(|_| {
                ConfigError::new("socks5-addr", v, "host:port such as 127.0.0.1:1080, or empty for off")
            })?),
            None => Some(SocketAddr::from(([127, 0, 0, 1], 1080))),
        };
    let socks5_user = match (get("socks5-username"), get("socks5-password")) {
        (Some(u), Some(p)) if u.len() <= 255 && p.len() <= 255 => Some((u.to_string(), p.to_string())),
        (Some(u), Some(_)) => {
            return Err(ConfigError::new("socks5-username", u, "a user and a password of at most 255 bytes each"))
        }
        (Some(_), None) => return Err(ConfigError::new("socks5-password", "", "the password of socks5-username")),
        (None, Some(_)) => {
            return Err(ConfigError::new("socks5-username", "", "the user whose password socks5-password is"))
        }
        (None, None) => None,
    };
    if socks5.is_none() && socks5_user.is_some() {
        return Err(ConfigError::new(
            "socks5-username",
            shown("socks5-username", get("socks5-username")),
            "only with socks5-addr",
        ));
    }
    let mut forwards = Vec::new();
    for item in list(get("forward")) {
        let (rule, protos) = protos("forward", item)?;
        let parsed = rule.split_once('=').and_then(|(l, t)| Some((l.trim().parse().ok()?, t.trim().parse().ok()?)));
        let Some((local, target)) = parsed else {
            return Err(ConfigError::new(
                "forward",
                item,
                "LOCAL=TARGET[/tcp|/udp] with both host:port, such as 127.0.0.1:8080=10.244.2.5:80",
            ));
        };
        forwards.extend(protos.iter().map(|&proto| Forward { local, target, proto }));
    }
    let mut exposes = Vec::new();
    for item in list(get("expose")) {
        let (rule, protos) = protos("expose", item)?;
        let parsed =
            rule.split_once('=').and_then(|(p, l)| Some((p.trim().parse::<u16>().ok()?, l.trim().parse().ok()?)));
        let Some((port, local)) = parsed.filter(|(p, _)| *p > 0) else {
            return Err(ConfigError::new(
                "expose",
                item,
                "PORT=LOCAL[/tcp|/udp] with PORT from 1 to 65535 and LOCAL host:port, such as 80=127.0.0.1:8080",
            ));
        };
        if exposes.iter().any(|e: &Expose| e.port == port && protos.contains(&e.proto)) {
            return Err(ConfigError::new("expose", item, "each port and protocol once"));
        }
        exposes.extend(protos.iter().map(|&proto| Expose { port, local, proto }));
    }
    let max_connections = match get("rootless-max-connections") {
        None => DEFAULT_MAX_CONNECTIONS,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=65536).contains(n))
            .ok_or_else(|| ConfigError::new("rootless-max-connections", v, "an integer from 1 to 65536"))?,
    };
    let underlay_mtu = match get("underlay-mtu") {
        None => 1500,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1280..=65535).contains(n))
            .ok_or_else(|| ConfigError::new("underlay-mtu", v, "an integer from 1280 to 65535"))?,
    };
    Ok(Some(RootlessConfig { socks5, socks5_user, forwards, exposes, max_connections, underlay_mtu }))
}

impl RootlessConfig {
    /// Refuses the host ports an unprivileged process cannot bind: below
    /// `start` (the kernel's `net.ipv4.ip_unprivileged_port_start`). The
    /// underlay ports are given with their keys.
    pub fn check_ports(&self, underlay: &[(&str, u16)], start: u16) -> Result<(), ConfigError> {
        let why = |p: u16| {
            format!(
                "a port from {start} up: a rootless node cannot bind port {p} (below \
                 net.ipv4.ip_unprivileged_port_start = {start})"
            )
        };
        for (key, port) in underlay {
            if *port != 0 && *port < start {
                return Err(ConfigError::new(key, port, why(*port)));
            }
        }
        if let Some(a) = self.socks5.filter(|a| a.port() != 0 && a.port() < start) {
            return Err(ConfigError::new("socks5-addr", a, why(a.port())));
        }
        if let Some(f) = self.forwards.iter().find(|f| f.local.port() != 0 && f.local.port() < start) {
            return Err(ConfigError::new("forward", format!("{}={}", f.local, f.target), why(f.local.port())));
        }
        Ok(())
    }
}

fn list(v: Option<&str>) -> impl Iterator<Item = &str> {
    v.into_iter().flat_map(|v| v.split(',')).map(str::trim).filter(|s| !s.is_empty())
}

/// A rule's protocols: `/tcp`, `/udp`, or both when none is given.
fn protos<'a>(key: &str, item: &'a str) -> Result<(&'a str, &'static [Proto]), ConfigError> {
    Ok(match item.rsplit_once('/') {
        Some((rule, "tcp")) => (rule, &[Proto::Tcp]),
        Some((rule, "udp")) => (rule, &[Proto::Udp]),
        Some((_, other)) if !other.contains(':') && !other.contains(']') => {
            return Err(ConfigError::new(key, item, format!("protocol tcp or udp, not `{other}`")))
        }
        _ => (item, &[Proto::Tcp, Proto::Udp]),
    })
}

fn shown(key: &str, v: Option<&str>) -> String {
    match (key, v) {
        ("socks5-password", Some(_)) => "(hidden)".into(),
        (_, v) => v.unwrap_or("").to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn parse(pairs: &[(&str, &str)], backend: Backend) -> Result<Option<RootlessConfig>, ConfigError> {
        let m: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let get = |k: &str| m.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());
        let raw = |k: &str| m.get(k).map(String::as_str);
        from_pairs(&get, &raw, backend)
    }

    #[test]
    fn defaults_and_rules() {
        assert_eq!(parse(&[], Backend::Vxlan).unwrap(), None);
        let c = parse(
            &[
                ("rootless", "true"),
                ("forward", "127.0.0.1:8080=10.244.2.5:80, [::1]:5353=[fd00::5]:53/udp"),
                ("expose", "80=127.0.0.1:8080/tcp,53=127.0.0.1:5353"),
            ],
            Backend::WireguardNative,
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.socks5, Some("127.0.0.1:1080".parse().unwrap()));
        assert_eq!(c.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(c.underlay_mtu, 1500);
        assert_eq!(c.forwards.len(), 3, "{:?}", c.forwards);
        assert_eq!(
            c.forwards[2],
            Forward {
                local: "[::1]:5353".parse().unwrap(),
                target: "[fd00::5]:53".parse().unwrap(),
                proto: Proto::Udp
            }
        );
        assert_eq!(
            c.exposes,
            vec![
                Expose { port: 80, local: "127.0.0.1:8080".parse().unwrap(), proto: Proto::Tcp },
                Expose { port: 53, local: "127.0.0.1:5353".parse().unwrap(), proto: Proto::Tcp },
                Expose { port: 53, local: "127.0.0.1:5353".parse().unwrap(), proto: Proto::Udp },
            ]
        );
        let off = parse(&[("rootless", "true"), ("socks5-addr", "")], Backend::Vxlan).unwrap().unwrap();
        assert_eq!(off.socks5, None);
    }

    #[test]
    fn refusals_name_the_key_and_the_value() {
        let refused = |pairs: &[(&str, &str)], backend, key: &str, value: &str| {
            let e = parse(pairs, backend).expect_err("refused");
            assert_eq!((e.key.as_str(), e.value.as_str()), (key, value), "{e}");
        };
        refused(&[("forward", "127.0.0.1:1=10.0.0.1:1")], Backend::Vxlan, "forward", "127.0.0.1:1=10.0.0.1:1");
        refused(&[("rootless", "yes")], Backend::Vxlan, "rootless", "yes");
        refused(&[("rootless", "true")], Backend::HostGw, "flannel-backend", "host-gw");
        refused(
            &[("rootless", "true"), ("forward", "8080=10.0.0.1:80")],
            Backend::Vxlan,
            "forward",
            "8080=10.0.0.1:80",
        );
        refused(&[("rootless", "true"), ("expose", "0=127.0.0.1:80")], Backend::Vxlan, "expose", "0=127.0.0.1:80");
        refused(
            &[("rootless", "true"), ("expose", "80=127.0.0.1:80/sctp")],
            Backend::Vxlan,
            "expose",
            "80=127.0.0.1:80/sctp",
        );
        refused(&[("rootless", "true"), ("socks5-username", "u")], Backend::Vxlan, "socks5-password", "");
        refused(
            &[("rootless", "true"), ("rootless-max-connections", "0")],
            Backend::Vxlan,
            "rootless-max-connections",
            "0",
        );
        refused(&[("rootless", "true"), ("underlay-mtu", "900")], Backend::Vxlan, "underlay-mtu", "900");
        refused(&[("rootless", "true"), ("socks5-addr", "localhost")], Backend::Vxlan, "socks5-addr", "localhost");
        refused(
            &[("rootless", "true"), ("expose", "80=127.0.0.1:1,80=127.0.0.1:2/tcp")],
            Backend::Vxlan,
            "expose",
            "80=127.0.0.1:2/tcp",
        );
    }

    #[test]
    fn privileged_host_ports_are_refused_with_the_reason() {
        let c = parse(&[("rootless", "true"), ("forward", "127.0.0.1:80=10.244.2.5:80/tcp")], Backend::Vxlan)
            .unwrap()
            .unwrap();
        let e = c.check_ports(&[("vxlan-port", 8472)], 1024).expect_err("port 80 refused");
        assert_eq!(e.key, "forward");
        assert!(e.to_string().contains("ip_unprivileged_port_start"), "{e}");
        let e = c.check_ports(&[("vxlan-port", 472)], 1024).expect_err("underlay port refused");
        assert_eq!((e.key.as_str(), e.value.as_str()), ("vxlan-port", "472"));
        c.check_ports(&[("vxlan-port", 8472)], 0).expect("everything allowed from 0");
        // Exposed ports live in the userspace stack: no privilege needed.
        let c = parse(&[("rootless", "true"), ("expose", "80=127.0.0.1:8080")], Backend::Vxlan).unwrap().unwrap();
        c.check_ports(&[("vxlan-port", 8472)], 1024).expect("expose 80 needs no privilege");
    }
}
