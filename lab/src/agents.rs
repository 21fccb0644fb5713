//! The lab's weft agents: each started in its node's namespace with a
//! config file written for it, waited for over HTTP (`/readyz`), asked for
//! its metrics, killed, restarted and reloaded by the tests.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipnet::IpNet;

use crate::etcd::{etcd_security, etcd_url};
use crate::namespaces::{read_pid, subnet_env_path, wg_key_path};
use crate::netns;
use crate::peers::wg_ifname;
use crate::plan::{Emulated, Lab, Node, NodeArch, NodeKind};

/// Metrics port of every agent (inside its own node namespace).
pub const METRICS_PORT: u16 = 9464;

pub(crate) fn start_agent(lab: &Lab, n: &Node, ds_path: &Path) -> anyhow::Result<()> {
    let cfg_path = lab.dir.join(format!("n{}.yaml", n.index));
    let node_ip = n.ips().iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
    let list = |nets: &[IpNet]| nets.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",");
    let o = &lab.opts;
    let mut cfg = format!(
        "node-name: {}\nnode-ip: {node_ip}\nflannel-backend: {}\ncluster-cidr: {}\nservice-cidr: {}\n\
         node-cidr-mask-size-ipv4: {}\nnode-cidr-mask-size-ipv6: {}\nsubnet-file: {}\nmetrics-addr: 127.0.0.1:{METRICS_PORT}\n",
        n.ns,
        o.backend,
        list(&o.cluster_cidrs),
        list(&o.service_cidrs()),
        o.node_mask_v4,
        o.node_mask_v6,
        subnet_env_path(lab, n).display()
    );
    if let Some(ext) = n.external4 {
        let _ = writeln!(cfg, "node-external-ip: {ext}\nflannel-external-ip: true");
    }
    if let Some(location) = n.location(o) {
        let _ = writeln!(cfg, "node-location: {location}");
    }
    if o.backend == "wireguard-native" {
        let _ = writeln!(cfg, "wireguard-key-file: {}", wg_key_path(&lab.dir, n.index).display());
        // The UAPI socket is named after the device, in a directory all
        // namespaces share: the name must be unique.
        let _ = writeln!(cfg, "tun-name: {}", wg_ifname(lab, n));
    }
    match o.datastore.as_str() {
        "etcd" => {
            let _ = writeln!(cfg, "etcd-endpoints: {}", etcd_url(lab));
            let sec = etcd_security(lab);
            for (key, path) in
                [("etcd-cafile", &sec.ca_file), ("etcd-certfile", &sec.cert_file), ("etcd-keyfile", &sec.key_file)]
            {
                if let Some(p) = path {
                    let _ = writeln!(cfg, "{key}: {}", p.display());
                }
            }
            if let (Some(u), Some(pw)) = (&sec.username, &sec.password) {
                let _ = writeln!(cfg, "etcd-username: {u}\netcd-password: {pw}");
            }
        }
        "kube" => {
            let kubeconfig = lab.dir.join("kubeconfig.yaml");
            let _ = writeln!(cfg, "kube-subnet-mgr: true\nkubeconfig: {}", kubeconfig.display());
        }
        _ => {
            let _ = writeln!(cfg, "datastore-file: {}", ds_path.display());
        }
    }
    if let Some(t) = lab.opts.threads {
        let _ = writeln!(cfg, "threads: {t}");
    }
    if lab.opts.offloads_off {
        let _ = writeln!(cfg, "offload-tun: false\noffload-udp-gso: false\noffload-udp-gro: false");
    }
    if let Some(us) = lab.opts.busy_poll_us {
        let _ = writeln!(cfg, "busy-poll-us: {us}");
    }
    if !o.ip_masq {
        let _ = writeln!(cfg, "ip-masq: false");
    }
    if o.ipv6_masq && o.cluster_v6().is_some() && o.backend != "none" {
        let _ = writeln!(cfg, "flannel-ipv6-masq: true");
    }
    let rootless = lab.rootless.as_ref().is_some_and(|r| r.index == n.index);
    if let Some(d) = lab.opts.dataplane.as_ref().filter(|_| !rootless) {
        let _ = writeln!(cfg, "dataplane: {d}");
    }
    if rootless {
        cfg += &crate::rootless::config(lab);
    }
    std::fs::write(&cfg_path, cfg)?;
    if lab.opts.etcd_auth {
        // It holds the etcd password.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cfg_path, std::fs::Permissions::from_mode(0o600))?;
    }
    let log = std::fs::File::create(lab.dir.join(format!("n{}.log", n.index)))?;
    let cfg_s = cfg_path.display().to_string();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &n.ns]);
    if rootless {
        let (uid, gid) = crate::rootless::make_user(&lab.opts.name)?;
        let own = |p: &Path| std::os::unix::fs::chown(p, Some(uid), Some(gid));
        if o.backend == "wireguard-native" {
            // Made here (with etcd the agent would make it, in a directory
            // the user cannot write), then given to the user.
            let key = wg_key_path(&lab.dir, n.index);
            weft_control::keys::load_or_create(&key)?;
            own(&key).with_context(|| format!("giving {} to the rootless user", key.display()))?;
        }
        own(&cfg_path)?;
        // The binary where the user may run it (the build tree may be
        // closed to others).
        let bin = lab.dir.join("weft-rootless");
        std::fs::copy(&lab.opts.weft_bin, &bin).context("copying weft for the rootless user")?;
        if o.rootless_trace {
            let out = lab.dir.join("rootless.strace");
            cmd.args(["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=open,openat,socket", "-o"]).arg(out);
        }
        let (u, g) = (format!("--reuid={uid}"), format!("--regid={gid}"));
        cmd.args(["setpriv", &u, &g, "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--"]).arg(bin);
    } else {
        match lab.opts.emulated_on(n) {
            Some(e) => {
                let (qemu, prefix) = qemu_for(e.arch)?;
                cmd.arg(qemu).arg("-L").arg(prefix).arg(&e.bin);
            }
            None => {
                cmd.arg(&lab.opts.weft_bin);
            }
        }
    }
    use std::os::unix::process::CommandExt;
    let child = cmd
        .args(["agent", "--config", &cfg_s])
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C meant for the lab reaches the lab,
        // which then stops the agents in order.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting the agent of {}", n.ns))?;
    std::fs::write(lab.dir.join(format!("n{}.pid", n.index)), child.id().to_string())?;
    Ok(())
}

/// The qemu-user emulator for `arch` and the prefix it loads the target's
/// shared libraries from: Debian's cross C library, found through the cross
/// compiler (as `scripts/qemu-run` finds it).
pub fn qemu_for(arch: NodeArch) -> anyhow::Result<(&'static str, PathBuf)> {
    let (qemu, gcc) = arch.qemu_and_gcc();
    let out = Command::new(gcc)
        .arg("-print-file-name=libc.so.6")
        .output()
        .with_context(|| format!("running {gcc} (scripts/setup installs it)"))?;
    let libc = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    // <prefix>/lib/libc.so.6: the prefix is two levels up.
    let prefix = libc.parent().map(|lib| lib.join("..")).and_then(|p| p.canonicalize().ok());
    match prefix {
        Some(p) if libc.is_absolute() && libc.exists() => Ok((qemu, p)),
        _ => bail!("{gcc} finds no libc.so.6 for {} (scripts/setup installs it)", arch.triple()),
    }
}

/// The cargo profile the tests' cross builds use (`scripts/test`, the
/// `cross` profile of Cargo.toml): where a debug lab looks for an emulated
/// node's binary when none was built with its own profile.
pub const CROSS_PROFILE: &str = "cross";

/// The emulated first node of `--node-arch`: its binary as given, or the
/// one beside `host_bin`: for a debug build the `cross` profile's if there
/// is one, else the same profile's; refused if there is none.
pub fn emulated(arch: NodeArch, bin: Option<PathBuf>, host_bin: &Path) -> anyhow::Result<Emulated> {
    let release = host_bin.parent().and_then(|p| p.file_name()).is_some_and(|n| n == "release");
    let bin = match bin {
        Some(b) => b,
        None => {
            let same = arch.binary_beside(host_bin).context("no target directory beside this binary")?;
            match arch.binary_in(host_bin, CROSS_PROFILE) {
                Some(cross) if !release && cross.is_file() => cross,
                _ => same,
            }
        }
    };
    if !bin.is_file() {
        bail!(
            "--node-arch {}: no weft binary at {} (build it with `cargo build --target {} --no-default-features{}`, \
             or pass --node-bin)",
            arch.rust_arch(),
            bin.display(),
            arch.triple(),
            if release { " --release" } else { " --profile cross" },
        );
    }
    qemu_for(arch)?;
    Ok(Emulated { arch, bin })
}

/// Whether an HTTP response's status is 200.
pub fn http_ok(response: &str) -> bool {
    response.lines().next().and_then(|l| l.split_whitespace().nth(1)) == Some("200")
}

pub(crate) fn wait_ready(lab: &Lab, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    for n in lab.nodes.iter().filter(|n| n.kind == NodeKind::Weft).chain(&lab.rootless) {
        loop {
            if matches!(lab.http_get(n, "/readyz"), Ok(r) if http_ok(&r)) {
                break;
            }
            if start.elapsed() > limit {
                bail!("the agent of {} was not ready after {:?}", n.ns, limit);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

impl Lab {
    /// The weft nodes.
    pub fn weft_nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.kind == NodeKind::Weft)
    }

    /// `GET path` on a node's agent; the whole response.
    pub fn http_get(&self, n: &Node, path: &str) -> anyhow::Result<String> {
        let req = format!("GET {path} HTTP/1.0\r\n\r\n");
        netns::in_netns(&n.ns, move || -> std::io::Result<String> {
            let addr = SocketAddr::from(([127, 0, 0, 1], METRICS_PORT));
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(req.as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })?
        .map_err(Into::into)
    }

    /// A node's metrics as name{labels} -> value.
    pub fn metrics(&self, n: &Node) -> anyhow::Result<BTreeMap<String, f64>> {
        let text = self.http_get(n, "/metrics")?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("HTTP") && l.contains(' '))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect())
    }

    /// Kills a node's agent with SIGKILL (no cleanup at all) and waits for it.
    pub fn kill_agent(&self, n: &Node) -> anyhow::Result<()> {
        let pid = read_pid(&self.dir.join(format!("n{}.pid", n.index))).context("agent pid")?;
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
        let _ = nix::sys::wait::waitpid(pid, None);
        Ok(())
    }

    /// Starts a node's agent again with its config and waits until it is ready.
    pub fn restart_agent(&self, n: &Node) -> anyhow::Result<()> {
        start_agent(self, n, &self.dir.join("datastore.json"))?;
        let one = Lab {
            opts: self.opts.clone(),
            nodes: vec![n.clone()],
            dir: self.dir.clone(),
            kube: self.kube.clone(),
            rootless: None,
        };
        wait_ready(&one, Duration::from_secs(15))
    }

    /// Sends SIGHUP to a node's agent.
    pub fn reload(&self, n: &Node) -> anyhow::Result<()> {
        let pid = read_pid(&self.dir.join(format!("n{}.pid", n.index))).context("agent pid")?;
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP)?;
        Ok(())
    }

    /// The tail of every agent log, for error reports.
    pub fn agent_logs(&self) -> String {
        let mut out = String::from("agent logs:");
        for n in self.weft_nodes().chain(&self.rootless) {
            let log = std::fs::read_to_string(self.dir.join(format!("n{}.log", n.index))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            let _ = write!(out, "\n--- {} ---\n{}", n.ns, tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        out
    }
}
