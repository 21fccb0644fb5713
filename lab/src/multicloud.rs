//! `weft lab --multicloud`: the distributed multi-cloud cluster of K3s's
//! networking page. Nodes sit in separate private networks ("clouds"), each
//! behind a gateway that maps one external address per node 1:1 (DNAT of
//! the WireGuard port, SNAT back, as cloud providers map public IPs); the
//! gateways meet on an internet bridge whose documentation addresses exist
//! only inside the lab. Every cloud uses the same private range, as real
//! ones may. With `--nat-node` the last node is at home, behind a router
//! that masquerades with random ports and lets nothing in: nobody can reach
//! it until it has spoken.
//!
//! ```text
//!                  internet <name>-ul: bridge br0, 198.51.100.0/24
//!        ┌──────────────────────────┼────────────────────────────┐
//!  <name>-g1 wan0 .1 .101 .103  <name>-g2 wan0 .2 .102     <name>-g0 wan0 .250
//!       lan0 172.16.0.1          lan0 172.16.0.1        lan0 192.168.1.1 (home)
//!  <name>-c1 bridge br0         <name>-c2 bridge br0     <name>-c0 bridge br0
//!   n1 172.16.0.11  n3 .12       n2 172.16.0.11           n4 192.168.1.10
//! ```
//!
//! Node `i` of `c` clouds is in cloud `(i - 1) % c + 1` and has the external
//! address 198.51.100.(100 + i). Nothing here runs weft: the agents are
//! started as in every lab, with `node-external-ip`, `flannel-external-ip`
//! and, when the lab announces locations, `node-location: cloud<k>`.

use std::net::Ipv4Addr;

use anyhow::{bail, Context};

use crate::checks::{ping_check, transfer_with};
use crate::netns::{self, exec, ip};
use crate::plan::{Check, Lab, Multicloud, Node, Site};

/// The gateways' own addresses are 198.51.100.`k`; node `i`'s external
/// address is 198.51.100.(`EXTERNAL_BASE` + `i`).
const EXTERNAL_BASE: u8 = 100;
/// The home router's address on the internet, and the one its ISP gives it
/// next ([`Lab::move_home_mapping`]).
pub const HOME_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 250);
/// See [`HOME_PUBLIC`].
pub const HOME_PUBLIC_NEXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 251);
/// Where the lab's services (etcd) listen on the internet, as a K3s
/// server with a public address would.
pub const SERVICE_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
/// The WireGuard port the cloud gateways map (Flannel's, IPv4).
const WG_PORT: u16 = 51820;
/// Name of the nftables counter of ICMP "fragmentation needed" messages a
/// gateway sent or forwarded.
const FRAG_COUNTER: &str = "fragneeded";

/// Gives each node its site and addresses (pure): cloud nodes round-robin
/// over the clouds at 172.16.0.(10 + j), with an external address; the home
/// node, last, at 192.168.1.10 without one.
pub(crate) fn place(m: &Multicloud, nodes: &mut [Node]) -> anyhow::Result<()> {
    let cloud_nodes = nodes.len().saturating_sub(m.nat_node as usize);
    if m.clouds < 2 || cloud_nodes < m.clouds + 1 {
        bail!(
            "--multicloud with {} clouds{}: needs at least 2 clouds and {} nodes (one cloud with two)",
            m.clouds,
            if m.nat_node { " and --nat-node" } else { "" },
            m.clouds + 1 + m.nat_node as usize
        );
    }
    if cloud_nodes > 100 {
        bail!("--multicloud: at most 100 nodes in the clouds");
    }
    for (i, n) in nodes.iter_mut().enumerate() {
        if n.ip6.is_some() {
            bail!("--multicloud is IPv4 only: give an IPv4 --cluster-cidr");
        }
        if i < cloud_nodes {
            let (cloud, j) = (i % m.clouds + 1, i / m.clouds + 1);
            n.site = Site::Cloud(cloud);
            n.ip4 = Some(Ipv4Addr::new(172, 16, 0, 10 + j as u8));
            n.external4 = Some(Ipv4Addr::new(198, 51, 100, EXTERNAL_BASE + n.index as u8));
        } else {
            n.site = Site::Home;
            n.ip4 = Some(Ipv4Addr::new(192, 168, 1, 10));
            n.external4 = None;
        }
    }
    Ok(())
}

/// The sites of a multi-cloud lab, clouds first.
fn sites(m: &Multicloud) -> Vec<Site> {
    (1..=m.clouds).map(Site::Cloud).chain(m.nat_node.then_some(Site::Home)).collect()
}

fn site_index(site: Site) -> usize {
    match site {
        Site::Cloud(k) => k,
        Site::Home | Site::Underlay => 0,
    }
}

/// The namespace of a site's gateway (`<name>-g<k>`, home `<name>-g0`).
pub fn gateway_ns(lab: &Lab, site: Site) -> String {
    format!("{}-g{}", lab.opts.name, site_index(site))
}

/// The namespace of a site's private network, a bridge (`<name>-c<k>`).
pub fn switch_ns(lab: &Lab, site: Site) -> String {
    format!("{}-c{}", lab.opts.name, site_index(site))
}

/// A site's gateway address on its private network.
fn gateway_lan(site: Site) -> Ipv4Addr {
    match site {
        Site::Home => Ipv4Addr::new(192, 168, 1, 1),
        _ => Ipv4Addr::new(172, 16, 0, 1),
    }
}

/// A site's gateway address on the internet.
fn gateway_public(site: Site) -> Ipv4Addr {
    match site {
        Site::Cloud(k) => Ipv4Addr::new(198, 51, 100, k as u8),
        _ => HOME_PUBLIC,
    }
}

/// The nftables ruleset of a site's gateway (pure). A cloud gateway maps
/// each node's external address to it (the WireGuard port in, every
/// packet of the node out), hairpins a node that reaches a neighbour by its
/// external address, and drops what comes in unmapped; the home router
/// masquerades with random ports and lets in only replies. Both count the
/// ICMP "fragmentation needed" messages they send or pass on.
pub(crate) fn gateway_rules(site: Site, nodes: &[&Node]) -> String {
    let frag = format!("icmp type destination-unreachable icmp code frag-needed counter name \"{FRAG_COUNTER}\"");
    let mut pre = String::new();
    let mut post = String::new();
    match site {
        Site::Home => post.push_str("        oifname \"wan0\" masquerade random\n"),
        _ => {
            for n in nodes {
                let (Some(int), Some(ext)) = (n.ip4, n.external4) else { continue };
                pre.push_str(&format!("        ip daddr {ext} udp dport {WG_PORT} dnat to {int}\n"));
                post.push_str(&format!("        oifname \"wan0\" ip saddr {int} snat to {ext}\n"));
            }
            post.push_str("        iifname \"lan0\" oifname \"lan0\" masquerade\n");
        }
    }
    format!(
        "table ip weftlab {{\n    counter {FRAG_COUNTER} {{ }}\n\
         \x20   chain nat_pre {{\n        type nat hook prerouting priority dstnat; policy accept;\n{pre}    }}\n\
         \x20   chain nat_post {{\n        type nat hook postrouting priority srcnat; policy accept;\n{post}    }}\n\
         \x20   chain filter_forward {{\n        type filter hook forward priority filter; policy accept;\n        {frag}\n\
         \x20       iifname \"wan0\" ct status dnat accept\n        iifname \"wan0\" ct state established,related accept\n\
         \x20       iifname \"wan0\" drop\n    }}\n\
         \x20   chain filter_output {{\n        type filter hook output priority filter; policy accept;\n        {frag}\n    }}\n}}\n"
    )
}

/// Builds the internet bridge, every site's gateway and private network,
/// and the nodes' namespaces in them (addressed, routed, forwarding).
pub(crate) fn build_network(lab: &Lab, m: &Multicloud) -> anyhow::Result<()> {
    std::fs::create_dir_all(&lab.dir).with_context(|| format!("creating {}", lab.dir.display()))?;
    let inet = format!("{}-ul", lab.opts.name);
    ip(&["netns", "add", &inet])?;
    ip(&["-n", &inet, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &inet, "link", "set", "br0", "up"])?;
    for site in sites(m) {
        let (gw, sw) = (gateway_ns(lab, site), switch_ns(lab, site));
        let mtu = m.mtu(site).to_string();
        let here: Vec<&Node> = lab.nodes.iter().filter(|n| n.site == site).collect();
        ip(&["netns", "add", &gw])?;
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        let port = format!("g{}", site_index(site));
        ip(&["-n", &inet, "link", "add", &port, "type", "veth", "peer", "name", "wan0", "netns", &gw])?;
        ip(&["-n", &inet, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", &sw, "link", "add", "gw", "type", "veth", "peer", "name", "lan0", "netns", &gw])?;
        ip(&["-n", &sw, "link", "set", "gw", "mtu", &mtu, "master", "br0", "up"])?;
        ip(&["-n", &gw, "link", "set", "lo", "up"])?;
        ip(&["-n", &gw, "link", "set", "wan0", "up"])?;
        ip(&["-n", &gw, "link", "set", "lan0", "mtu", &mtu, "up"])?;
        ip(&["-n", &gw, "addr", "add", &format!("{}/24", gateway_lan(site)), "dev", "lan0"])?;
        ip(&["-n", &gw, "addr", "add", &format!("{}/24", gateway_public(site)), "dev", "wan0"])?;
        for n in &here {
            if let Some(ext) = n.external4 {
                ip(&["-n", &gw, "addr", "add", &format!("{ext}/24"), "dev", "wan0"])?;
            }
        }
        netns::sysctl(&gw, "net.ipv4.ip_forward", "1")?;
        // The home router's ISP may change its address: the new one takes over.
        netns::sysctl(&gw, "net.ipv4.conf.wan0.promote_secondaries", "1")?;
        let rules = lab.dir.join(format!("g{}.nft", site_index(site)));
        std::fs::write(&rules, gateway_rules(site, &here))?;
        exec(&gw, "nft", &["-f", &rules.display().to_string()]).context("the gateway's nftables rules")?;
        for n in &here {
            ip(&["netns", "add", &n.ns])?;
            let port = format!("n{}", n.index);
            ip(&["-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &n.ns])?;
            ip(&["-n", &sw, "link", "set", &port, "mtu", &mtu, "master", "br0", "up"])?;
            ip(&["-n", &n.ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &n.ns, "link", "set", "eth0", "mtu", &mtu, "up"])?;
            let a = n.ip4.context("a multi-cloud node without an address")?;
            ip(&["-n", &n.ns, "addr", "add", &format!("{a}/24"), "dev", "eth0"])?;
            ip(&["-n", &n.ns, "route", "add", "default", "via", &gateway_lan(site).to_string()])?;
            netns::sysctl(&n.ns, "net.ipv4.ip_forward", "1")?;
        }
    }
    Ok(())
}

/// IPv4 source, destination and UDP ports of an Ethernet frame, if it is
/// an unfragmented UDP datagram or the first fragment of one.
fn udp4(frame: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u16, u16)> {
    let ip = frame.get(14..34)?;
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let first_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff == 0;
    if frame.get(12..14)? != [0x08, 0x00] || ip[0] >> 4 != 4 || ihl < 20 || ip[9] != 17 || !first_fragment {
        return None;
    }
    let l4 = frame.get(14 + ihl..14 + ihl + 4)?;
    let (src, dst) = (Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
    Some((src, dst, u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]])))
}

impl Lab {
    /// The first node of a site.
    fn first_in(&self, site: Site) -> Option<&Node> {
        self.nodes.iter().find(|n| n.site == site)
    }

    /// The checks of a multi-cloud lab: ping between every pair of pods,
    /// SHA-256-checked transfers between clouds (both ways between the
    /// first and the last), pings at the full pod MTU that must not be
    /// fragmented away, a capture of the internet showing only WireGuard,
    /// nodes of one cloud talking past their gateway, the home node across
    /// a change of its NAT mapping, the gateways' ICMP counters, every
    /// agent's counters.
    pub(crate) fn multicloud_checks(&self, m: &Multicloud) -> Vec<Check> {
        let mut checks = Vec::new();
        for a in &self.nodes {
            for b in self.nodes.iter().filter(|b| b.index != a.index) {
                checks.push(ping_check(&a.pods[0], &b.pods[0], false));
            }
        }
        let bytes = self.opts.transfer_mib << 20;
        let clouds: Vec<&Node> = (1..=m.clouds).filter_map(|k| self.first_in(Site::Cloud(k))).collect();
        let (first, last) = (clouds[0], clouds[clouds.len() - 1]);
        for b in &clouds[1..] {
            checks.push(transfer_with(&first.pods[0], &b.pods[0], false, bytes, None));
        }
        checks.push(transfer_with(&last.pods[0], &first.pods[0], false, bytes, None));
        for a in &clouds {
            for b in clouds.iter().filter(|b| b.index != a.index) {
                checks.push(self.full_size_ping_check(a, b));
            }
        }
        checks.push(match self.underlay_capture_between(first, last) {
            Ok(detail) => Check { name: "internet carries only WireGuard".into(), passed: true, detail },
            Err(e) => Check { name: "internet carries only WireGuard".into(), passed: false, detail: format!("{e:#}") },
        });
        if m.locations {
            if let Some((a, b)) = self.same_cloud_pair() {
                checks.push(self.same_cloud_check(a, b));
            }
        }
        if m.nat_node {
            if let Some(home) = self.first_in(Site::Home) {
                checks.push(self.home_mapping_check(first, home, bytes));
            }
        }
        for site in sites(m) {
            checks.push(self.frag_counter_check(site));
        }
        for n in self.weft_nodes() {
            checks.push(self.counter_check(n));
        }
        checks
    }

    /// Two nodes of one cloud, if a cloud has two.
    fn same_cloud_pair(&self) -> Option<(&Node, &Node)> {
        self.nodes.iter().find_map(|a| {
            let b = self.nodes.iter().find(|b| b.index != a.index && b.site == a.site)?;
            matches!(a.site, Site::Cloud(_)).then_some((a, b))
        })
    }

    /// A ping from a pod of `a` to a pod of `b` at the full size `a`'s pods
    /// may send (their MTU, from `subnet.env`), fragmentable as most UDP
    /// is: its WireGuard datagram may be larger than `b`'s cloud's MTU, and
    /// the path must carry it anyway. (With "don't fragment" a pod of a
    /// smaller MTU than the sender's is told so by its node, as it should.)
    fn full_size_ping_check(&self, a: &Node, b: &Node) -> Check {
        let (pa, pb) = (&a.pods[0], &b.pods[0]);
        let mtu = std::fs::read_to_string(crate::namespaces::subnet_env_path(self, a))
            .ok()
            .and_then(|e| e.lines().find_map(|l| l.strip_prefix("FLANNEL_MTU=")?.trim().parse::<usize>().ok()));
        let (Some(mtu), Some(from), Some(to)) = (mtu, pa.ip(false), pb.ip(false)) else {
            let name = format!("full-size ping {} -> {}", pa.ns, pb.ns);
            return Check { name, passed: false, detail: "no MTU or address".into() };
        };
        let name = format!("ping of {mtu} bytes {from} -> {to}");
        let size = (mtu - 28).to_string();
        let args = ["-4", "-M", "dont", "-s", &size, "-c", "3", "-i", "0.2", "-W", "2", "-q", &to.to_string()];
        match exec(&pa.ns, "ping", &args) {
            Ok(out) => {
                let line = out.lines().find(|l| l.contains("packets transmitted")).unwrap_or("").to_string();
                Check { name, passed: line.contains(" 0% packet loss"), detail: line }
            }
            Err(e) => Check { name, passed: false, detail: format!("{e:#}") },
        }
    }

    /// That `a` and `b`, of one cloud, talk in it: while a pod of `a` pings
    /// a pod of `b`, a capture on `a`'s switch port sees their WireGuard
    /// datagrams go directly between their internal addresses, and one on
    /// the gateway's private leg sees none of theirs.
    fn same_cloud_check(&self, a: &Node, b: &Node) -> Check {
        let name = format!("{} and {} (one cloud) talk past their gateway", a.ns, b.ns);
        let run = || -> anyhow::Result<String> {
            let (ai, bi) = (a.ip4.context("address")?, b.ip4.context("address")?);
            let (ae, be) = (a.external4.context("external")?, b.external4.context("external")?);
            let to = b.pods[0].ip(false).context("pod address")?.to_string();
            let (gw, sw) = (gateway_ns(self, a.site), switch_ns(self, a.site));
            let mut pinged = Ok(String::new());
            let mut port_pcap = None;
            let gw_pcap = self.capture(&gw, "lan0", "gw", &[], || {
                port_pcap = Some(self.capture(&sw, &format!("n{}", a.index), "port", &[], || {
                    pinged = exec(&a.pods[0].ns, "ping", &["-4", "-c", "3", "-i", "0.2", "-W", "2", "-q", &to]);
                }));
            })?;
            pinged.context("ping between the pods")?;
            let port_frames = crate::capture::pcap_frames(&std::fs::read(port_pcap.context("no capture")??)?)?;
            let gw_frames = crate::capture::pcap_frames(&std::fs::read(gw_pcap)?)?;
            let pair = |s: Ipv4Addr, d: Ipv4Addr| (s == ai && d == bi) || (s == bi && d == ai);
            let direct = port_frames.iter().filter_map(|f| udp4(f)).filter(|(s, d, _, _)| pair(*s, *d)).count();
            let theirs = |s: Ipv4Addr, d: Ipv4Addr| {
                let ours = [ai, bi, ae, be];
                ours.contains(&s) && ours.contains(&d)
            };
            let via_gw = gw_frames.iter().filter_map(|f| udp4(f)).filter(|(s, d, _, _)| theirs(*s, *d)).count();
            if direct < 6 || via_gw > 0 {
                bail!("{direct} datagrams went directly between {ai} and {bi}, {via_gw} of theirs crossed the gateway");
            }
            Ok(format!(
                "{direct} WireGuard datagrams {ai} <-> {bi} on the cloud's network, none of theirs at the gateway"
            ))
        };
        match run() {
            Ok(detail) => Check { name, passed: true, detail },
            Err(e) => Check { name, passed: false, detail: format!("{e:#}") },
        }
    }

    /// The home router's ISP gives it a new address: the old one goes, the
    /// masqueraded flows with it, and the home node's packets leave from the
    /// new one (and from new random ports). Returns the new address.
    pub fn move_home_mapping(&self) -> anyhow::Result<Ipv4Addr> {
        let gw = gateway_ns(self, Site::Home);
        ip(&["-n", &gw, "addr", "add", &format!("{HOME_PUBLIC_NEXT}/24"), "dev", "wan0"])?;
        ip(&["-n", &gw, "addr", "del", &format!("{HOME_PUBLIC}/24"), "dev", "wan0"])?;
        Ok(HOME_PUBLIC_NEXT)
    }

    /// Where `n`'s agent sends to `peer` now, as `wg show` reads it from the
    /// agent's UAPI socket.
    pub fn wg_endpoint(&self, n: &Node, peer: &Node) -> anyhow::Result<String> {
        let key = weft_control::keys::encode(&peer.wg_public.context("the peer's key is not known")?);
        let out = netns::run("wg", &["show", &crate::wg_ifname(self, n), "endpoints"])?;
        out.lines()
            .find_map(|l| l.strip_prefix(key.as_str()).map(|e| e.trim().to_string()))
            .with_context(|| format!("{} has no peer {key}: {out}", n.ns))
    }

    /// A transfer from a pod in the clouds to the home pod, during which the
    /// home router's address changes: the home node's next packets come
    /// from the new address, the cloud node follows them, the transfer
    /// completes with its SHA-256 intact.
    fn home_mapping_check(&self, cloud: &Node, home: &Node, bytes: usize) -> Check {
        let mut moved = None;
        let mut c = transfer_with(
            &cloud.pods[0],
            &home.pods[0],
            false,
            bytes,
            Some(&mut || {
                moved = Some(self.move_home_mapping());
            }),
        );
        c.name = format!("{} across a change of the home NAT's address", c.name);
        match moved {
            Some(Ok(new)) => match self.wg_endpoint(cloud, home) {
                Ok(e) if e.starts_with(&format!("{new}:")) => {
                    c.detail = format!("{}; {} now sends to {e}", c.detail, cloud.ns);
                }
                Ok(e) => {
                    c.passed = false;
                    c.detail = format!("{}; {} still sends to {e}, not {new}", c.detail, cloud.ns);
                }
                Err(e) => {
                    c.passed = false;
                    c.detail = format!("{}; {e:#}", c.detail);
                }
            },
            Some(Err(e)) => {
                c.passed = false;
                c.detail = format!("moving the mapping: {e:#}");
            }
            None => {
                c.passed = false;
                c.detail = format!("{}; the transfer never reached its middle", c.detail);
            }
        }
        c
    }

    /// That a gateway sent or passed on no ICMP "fragmentation needed":
    /// no path needed one (outer packets too big for a cloud are
    /// fragmented, not dropped).
    fn frag_counter_check(&self, site: Site) -> Check {
        let gw = gateway_ns(self, site);
        let name = format!("no ICMP fragmentation-needed at {gw}");
        match exec(&gw, "nft", &["list", "counter", "ip", "weftlab", FRAG_COUNTER]) {
            Ok(out) => {
                let packets =
                    out.split_whitespace().skip_while(|w| *w != "packets").nth(1).and_then(|p| p.parse::<u64>().ok());
                match packets {
                    Some(0) => Check { name, passed: true, detail: "0 messages".into() },
                    Some(p) => Check { name, passed: false, detail: format!("{p} messages") },
                    None => Check { name, passed: false, detail: format!("no packet count in: {out}") },
                }
            }
            Err(e) => Check { name, passed: false, detail: format!("{e:#}") },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{plan, LabOptions};
    use std::net::IpAddr;
    use std::path::PathBuf;

    fn mc(clouds: usize, nat_node: bool) -> Multicloud {
        Multicloud { clouds, nat_node, mtus: vec![], locations: true }
    }

    #[test]
    fn nodes_go_round_robin_over_the_clouds_and_home_is_last() {
        let mut o = LabOptions::new("t", PathBuf::from("weft"));
        o.nodes = 4;
        o.multicloud = Some(mc(2, true));
        let nodes = plan(&o).unwrap();
        let sites: Vec<Site> = nodes.iter().map(|n| n.site).collect();
        assert_eq!(sites, [Site::Cloud(1), Site::Cloud(2), Site::Cloud(1), Site::Home]);
        assert_eq!(nodes[0].ip4, nodes[1].ip4, "clouds share the private range");
        assert_eq!(nodes[2].ip4, Some(Ipv4Addr::new(172, 16, 0, 12)));
        assert_eq!(nodes[2].external4, Some(Ipv4Addr::new(198, 51, 100, 103)));
        assert_eq!((nodes[3].ip4, nodes[3].external4), (Some(Ipv4Addr::new(192, 168, 1, 10)), None));
        assert_eq!(nodes[2].location(&o).as_deref(), Some("cloud1"));
        assert_eq!(nodes[3].location(&o), None);
        // The leases announce the external address, and the private path.
        let ds = crate::plan::datastore(&o, &nodes);
        let (_, l) = ds.lease_of(IpAddr::from([198, 51, 100, 103])).expect("found by the external address");
        let p = l.private_path(false).expect("a private path");
        assert_eq!((p.location.as_str(), p.address), ("cloud1", IpAddr::from([172, 16, 0, 12])));
        assert!(ds.lease_of(IpAddr::from([192, 168, 1, 10])).is_some(), "home: its own address");
        o.nodes = 3;
        assert!(plan(&o).is_err(), "two clouds and home need four nodes");
    }

    #[test]
    fn gateway_rules_map_each_node_and_the_home_router_masquerades() {
        let mut o = LabOptions::new("t", PathBuf::from("weft"));
        o.nodes = 4;
        o.multicloud = Some(mc(2, true));
        let nodes = plan(&o).unwrap();
        let c1: Vec<&Node> = nodes.iter().filter(|n| n.site == Site::Cloud(1)).collect();
        let r = gateway_rules(Site::Cloud(1), &c1);
        assert!(r.contains("ip daddr 198.51.100.101 udp dport 51820 dnat to 172.16.0.11"), "{r}");
        assert!(r.contains("oifname \"wan0\" ip saddr 172.16.0.12 snat to 198.51.100.103"), "{r}");
        assert!(!r.contains("198.51.100.102"), "another cloud's node is not mapped here");
        let home = gateway_rules(Site::Home, &[]);
        assert!(home.contains("masquerade random") && !home.contains("dnat to"), "{home}");
    }

    #[test]
    fn udp4_reads_addresses_and_ports() {
        let mut f = vec![0u8; 14 + 20 + 8];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[23] = 17;
        f[26..30].copy_from_slice(&[172, 16, 0, 11]);
        f[30..34].copy_from_slice(&[172, 16, 0, 12]);
        f[34..36].copy_from_slice(&51820u16.to_be_bytes());
        f[36..38].copy_from_slice(&40000u16.to_be_bytes());
        assert_eq!(udp4(&f), Some((Ipv4Addr::new(172, 16, 0, 11), Ipv4Addr::new(172, 16, 0, 12), 51820, 40000)));
        for len in [20, 25, 32, 36] {
            assert_eq!(udp4(&f[..len]), None, "cut at {len}");
        }
        f[20] = 0x00;
        f[21] = 0xb9;
        assert_eq!(udp4(&f), None, "a later fragment has no ports");
        f[21] = 0;
        f[14] = 0x44;
        assert_eq!(udp4(&f), None, "a header shorter than 20 bytes");
        f[14] = 0x45;
        f[23] = 6;
        assert_eq!(udp4(&f), None, "TCP");
    }
}
