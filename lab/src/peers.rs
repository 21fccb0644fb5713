//! The lab's peers nobody here wrote, on the last node: the kernel's VXLAN
//! device laid out as flanneld lays it out, or a userspace WireGuard
//! (`wireguard-go`, `boringtun-cli`) configured with `wg`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipnet::IpNet;
use weft_control::datastore::{format_mac, subnet_env, WG_OVERHEAD};
use weft_tunnel::vxlan::OVERHEAD_V4;

use crate::namespaces::{subnet_env_path, wg_key_path, UNDERLAY_MTU};
use crate::netns::{exec, ip};
use crate::plan::{Lab, Node};

/// Lays out the kernel's VXLAN device on `n` exactly as flanneld does, and
/// writes the `subnet.env` flanneld would write.
pub(crate) fn kernel_flannel_node(lab: &Lab, n: &Node) -> anyhow::Result<()> {
    let ns = n.ns.as_str();
    let (Some(ip4), Some(subnet)) = (n.ip4, n.key.v4) else { bail!("the kernel Flannel node is IPv4 only") };
    let mtu = (UNDERLAY_MTU - OVERHEAD_V4 as u32).to_string();
    let ip_s = ip4.to_string();
    let add = ["-n", ns, "link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", &ip_s, "dev", "eth0"];
    ip(&[&add[..], &["dstport", "8472", "nolearning"]].concat())?;
    ip(&["-n", ns, "link", "set", "flannel.1", "address", &format_mac(&n.mac), "mtu", &mtu, "up"])?;
    ip(&["-n", ns, "addr", "add", &format!("{}/32", subnet.network()), "dev", "flannel.1"])?;
    for r in lab.nodes.iter().filter(|r| r.index != n.index) {
        let (Some(rip), Some(rsub)) = (r.ip4, r.key.v4) else { continue };
        let gw = rsub.network().to_string();
        let mac = format_mac(&r.mac);
        ip(&["-n", ns, "neigh", "replace", &gw, "lladdr", &mac, "dev", "flannel.1", "nud", "permanent"])?;
        exec(ns, "bridge", &["fdb", "append", &mac, "dev", "flannel.1", "dst", &rip.to_string()])?;
        ip(&["-n", ns, "route", "replace", &rsub.to_string(), "via", &gw, "dev", "flannel.1", "onlink"])?;
    }
    let env = subnet_env(lab.opts.cluster_v4().map(IpNet::V4), &n.key, None, UNDERLAY_MTU - OVERHEAD_V4 as u32, false);
    std::fs::write(subnet_env_path(lab, n), env)?;
    Ok(())
}

/// Where `program` is: on `PATH`, or in cargo's bin directory (where
/// `cargo install boringtun-cli` puts it).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("bin"));
    std::env::split_paths(&path).chain(cargo).map(|d| d.join(program)).find(|p| p.is_file())
}

/// The interface name of a lab's userspace WireGuard peer: unique across
/// labs, since its UAPI socket lives in the shared `/var/run/wireguard`.
pub fn wg_ifname(lab: &Lab, n: &Node) -> String {
    let h = lab.opts.name.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
    format!("wg{:06x}n{}", h & 0xff_ffff, n.index)
}

/// Runs the userspace WireGuard peer (`wireguard-go`, or `boringtun-cli`)
/// on `n` and configures it with `wg` from the other nodes' leases, the way a
/// WireGuard operator would; writes the `subnet.env` a Flannel node would have.
pub(crate) fn userspace_wg_node(lab: &Lab, n: &Node) -> anyhow::Result<()> {
    let ns = n.ns.as_str();
    let (Some(subnet), Some(_)) = (n.key.v4, n.ip4) else { bail!("the userspace WireGuard peer is IPv4 only") };
    let ifname = wg_ifname(lab, n);
    let log = std::fs::File::create(lab.dir.join(format!("n{}.log", n.index)))?;
    use std::os::unix::process::CommandExt;
    let program: &[&str] = match lab.opts.wg_peer.as_deref() {
        Some("boringtun") => &["boringtun-cli", "--foreground", "--disable-drop-privileges"],
        _ => &["wireguard-go", "-f"],
    };
    let path = find_program(program[0]).unwrap_or_else(|| PathBuf::from(program[0]));
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(&path)
        .args(&program[1..])
        .arg(&ifname)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| {
            format!("starting {} (wireguard-go: Debian package; boringtun-cli: cargo install)", program[0])
        })?;
    std::fs::write(lab.dir.join(format!("n{}.pid", n.index)), child.id().to_string())?;
    let sock = Path::new("/var/run/wireguard").join(format!("{ifname}.sock"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if Instant::now() > deadline {
            bail!("{} made no UAPI socket at {}", program[0], sock.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let key = wg_key_path(&lab.dir, n.index).display().to_string();
    exec(ns, "wg", &["set", &ifname, "private-key", &key, "listen-port", "51820"])?;
    for r in lab.nodes.iter().filter(|r| r.index != n.index) {
        let (Some(rip), Some(rsub), Some(public)) = (r.ip4, r.key.v4, r.wg_public) else { continue };
        let public = weft_control::keys::encode(&public);
        let endpoint = format!("{rip}:51820");
        exec(ns, "wg", &["set", &ifname, "peer", &public, "endpoint", &endpoint, "allowed-ips", &rsub.to_string()])?;
    }
    let mtu = (UNDERLAY_MTU - WG_OVERHEAD as u32).to_string();
    ip(&["-n", ns, "addr", "add", &format!("{}/32", subnet.network()), "dev", &ifname])?;
    ip(&["-n", ns, "link", "set", &ifname, "mtu", &mtu, "up"])?;
    for r in lab.nodes.iter().filter(|r| r.index != n.index) {
        if let Some(rsub) = r.key.v4 {
            ip(&["-n", ns, "route", "replace", &rsub.to_string(), "dev", &ifname])?;
        }
    }
    let env = subnet_env(lab.opts.cluster_v4().map(IpNet::V4), &n.key, None, UNDERLAY_MTU - WG_OVERHEAD as u32, false);
    std::fs::write(subnet_env_path(lab, n), env)?;
    Ok(())
}
