//! `weft wg IFNAME`: a userspace WireGuard device for plain WireGuard users,
//! a drop-in for `wireguard-go IFNAME`.
//!
//! It creates the TUN device `IFNAME` and the UAPI socket
//! `/var/run/wireguard/IFNAME.sock`, and from then on does what `wg` tells it
//! through that socket: keys, listen port, peers, their endpoints, keepalives
//! and allowed IPs. wg-quick runs the userspace implementation it finds in
//! `WG_QUICK_USERSPACE_IMPLEMENTATION` with the interface name as its only
//! argument, so the binary also takes this role when invoked as `weft-wg`
//! (a symlink to it).
//!
//! ```text
//!  weft wg IFNAME ──spawn──> weft wg -f IFNAME (own process group)
//!        │ waits for "ready"       │ TUN IFNAME + UDP sockets (engine)
//!        │ <──────────────────────-│ UAPI socket
//!        └─ exit 0                 └─ runs until: SIGTERM/SIGINT, the TUN is
//!                                     deleted, or the socket file is removed
//! ```
//!
//! The UDP sockets are bound where the device is created; the TUN may then
//! be moved into another network namespace and keeps carrying traffic. Set
//! requests are applied whole: a port that cannot be bound refuses the
//! request (EADDRINUSE) and changes nothing.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use weft_engine::{Encap, Engine, EngineConfig, Families, Peer, PeerCounters, Snapshot, WgDevice, WgPeer};

use weft_uapi::{self as uapi, Device, DeviceStatus, Key, SetRequest, UapiError};

/// wireguard-go's default MTU for a new device.
pub const DEFAULT_MTU: u32 = 1420;
/// Set in the environment of the background process: print [`READY`] on
/// stdout once the TUN and the socket exist.
const NOTIFY_ENV: &str = "WEFT_WG_NOTIFY_READY";
/// What the background process prints when it is ready.
const READY: &str = "ready";

/// `weft wg`'s flags.
#[derive(clap::Args, Debug)]
pub struct WgArgs {
    /// Stay in the foreground (otherwise return once the device is ready).
    #[arg(short, long)]
    pub foreground: bool,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Name of the interface to create (at most 15 bytes).
    pub ifname: String,
}

/// Runs `weft wg`.
pub fn run(args: WgArgs) -> anyhow::Result<ExitCode> {
    check_ifname(&args.ifname)?;
    // A TUN of that name would take our queues beside its owner's; refuse
    // as wireguard-go does ("device or resource busy").
    if weft_engine::sys::netlink::Netlink::link_index(&args.ifname).is_ok() {
        bail!("interface {} already exists", args.ifname);
    }
    let path = uapi::socket_path(&args.ifname);
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        bail!("{} is in use by a running device", path.display());
    }
    if !args.foreground {
        return daemonize(&args);
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let dev = Arc::new(StandaloneWg::start(&args.ifname, threads)?);
    let server = match uapi::serve(&path, dev.clone()) {
        Ok(s) => s,
        Err(e) => {
            dev.stop();
            return Err(e).with_context(|| format!("UAPI socket {}", path.display()));
        }
    };
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])
        .context("installing signal handlers")?;
    let (signalled_tx, signalled) = crossbeam_channel::bounded(1);
    std::thread::Builder::new().name("weft-signals".into()).spawn(move || {
        if signals.forever().next().is_some() {
            let _ = signalled_tx.send(());
        }
    })?;
    let stopped = dev.stopped();
    // The socket's directory is watched, so that its removal is seen without
    // polling; where inotify is refused, it is looked at every second.
    let (dir_changes, poll_socket) = match watch_dir(&path) {
        Ok(rx) => (rx, crossbeam_channel::never()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the UAPI socket's directory; checking it every second");
            (crossbeam_channel::never(), crossbeam_channel::tick(Duration::from_secs(1)))
        }
    };
    tracing::info!(ifname = %args.ifname, socket = %path.display(), "device up");
    if std::env::var_os(NOTIFY_ENV).is_some() {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{READY}").and_then(|()| out.flush());
    }
    let why = loop {
        if dev.failed() {
            break "the TUN device is gone";
        }
        if server.socket_gone() {
            break "the UAPI socket was removed";
        }
        crossbeam_channel::select! {
            recv(signalled) -> _ => break "signal",
            recv(stopped) -> _ => {}
            recv(dir_changes) -> _ => {}
            recv(poll_socket) -> _ => {}
        }
    };
    tracing::info!(ifname = %args.ifname, reason = why, "shutting down");
    drop(server);
    dev.stop();
    Ok(ExitCode::SUCCESS)
}

/// Watches the directory of `path` with inotify: a message for every
/// entry created, removed or renamed there (the socket's removal among
/// them), and for the directory's own removal.
fn watch_dir(path: &std::path::Path) -> nix::Result<crossbeam_channel::Receiver<()>> {
    use nix::sys::inotify::{AddWatchFlags as F, InitFlags, Inotify};
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC)?;
    let flags = F::IN_CREATE | F::IN_DELETE | F::IN_MOVED_FROM | F::IN_MOVED_TO | F::IN_DELETE_SELF | F::IN_MOVE_SELF;
    inotify.add_watch(dir, flags)?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let spawned = std::thread::Builder::new().name("weft-watch".into()).spawn(move || {
        // Ends when the read fails (the watch removed with its directory
        // leaves the descriptor readable no more) or nobody listens.
        while let Ok(events) = inotify.read_events() {
            if events.is_empty() || tx.send(()).is_err() {
                break;
            }
        }
    });
    spawned.map(|_| rx).map_err(|_| nix::Error::EAGAIN)
}

/// Interface names the kernel accepts: 1 to 15 bytes, no `/`, no
/// whitespace, not `.` or `..`.
fn check_ifname(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b.is_ascii_control());
    if !ok {
        bail!("interface name `{name}` refused: expected 1 to 15 bytes without '/', ':' or whitespace");
    }
    Ok(())
}

/// Starts the device in a background process of its own and returns once
/// it is ready (or failed), as wireguard-go does.
fn daemonize(args: &WgArgs) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding this program")?;
    // The `weft-wg` program takes the device's flags alone; `weft`, the
    // subcommand first.
    let own_program = exe.file_name().is_some_and(|n| n == "weft-wg");
    let mut cmd = Command::new(&exe);
    if !own_program {
        cmd.arg("wg");
    }
    cmd.arg("--foreground");
    if let Some(t) = args.threads {
        cmd.arg("--threads").arg(t.to_string());
    }
    cmd.arg(&args.ifname).env(NOTIFY_ENV, "1").stdin(Stdio::null()).stdout(Stdio::piped());
    // Logs of the background process go where ours go only when asked
    // (RUST_LOG set), as wireguard-go logs only with LOG_LEVEL.
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.stderr(Stdio::null());
    }
    // Its own process group: a terminal's Ctrl-C to the caller leaves it running.
    cmd.process_group(0);
    let mut child = cmd.spawn().context("starting the device process")?;
    let mut line = String::new();
    let stdout = child.stdout.take().context("device process stdout")?;
    let _ = BufReader::new(stdout).read_line(&mut line);
    if line.trim_end() == READY {
        return Ok(ExitCode::SUCCESS);
    }
    let status = child.wait().context("waiting for the device process")?;
    bail!("device {} did not come up ({status}); run `weft wg -f {}` to see why", args.ifname, args.ifname)
}

/// The device: its configuration as `wg` set it, and the engine moving the packets.
pub struct StandaloneWg {
    inner: Mutex<Inner>,
}

struct Inner {
    /// What `wg` configured (run-time fields unused); `listen_port` is the
    /// port bound.
    config: DeviceStatus,
    /// The WireGuard identity; a placeholder until a private key is set.
    device: Arc<WgDevice>,
    /// Live state per peer, by public key.
    peers: HashMap<Key, Live>,
    /// Local index of the next peer.
    next_index: u32,
    /// Whether IPv6 sockets are open.
    v6: bool,
    engine: Option<Engine>,
}

struct Live {
    wg: Arc<WgPeer>,
    counters: Arc<PeerCounters>,
    /// The last handshake seen.
    last_handshake: Option<SystemTime>,
}

impl StandaloneWg {
    /// Creates the TUN `ifname` and binds a free UDP port, IPv4 and (where
    /// the host has it) IPv6.
    pub fn start(ifname: &str, threads: usize) -> anyhow::Result<StandaloneWg> {
        let v6 = std::net::UdpSocket::bind("[::]:0").is_ok();
        let mut locals = vec![IpAddr::from([0u8; 4])];
        if v6 {
            locals.push(IpAddr::from([0u16; 8]));
        }
        // No key yet: a placeholder identity that no peer is ever built with.
        let device = Arc::new(WgDevice::new([0; 32]));
        let cfg = EngineConfig {
            tun_name: ifname.to_string(),
            threads,
            encap: Encap::Wireguard(device.clone(), locals),
            port: 0,
            port_v6: 0,
            mtu: DEFAULT_MTU as usize,
            offloads: Default::default(),
            busy_poll_us: weft_engine::DEFAULT_BUSY_POLL_US,
            rootless: false,
        };
        let families = Families { v4: true, v6 };
        let engine = Engine::start(&cfg, Arc::new(Snapshot::new(Vec::new(), families)))
            .with_context(|| format!("creating TUN device {ifname} and its UDP sockets"))?;
        set_mtu(ifname, DEFAULT_MTU);
        let config = DeviceStatus { listen_port: engine.ports().0, ..Default::default() };
        Ok(StandaloneWg {
            inner: Mutex::new(Inner { config, device, peers: HashMap::new(), next_index: 1, v6, engine: Some(engine) }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gets a message when the engine stops on its own (see
    /// [`StandaloneWg::failed`]); never, once it was stopped.
    pub fn stopped(&self) -> crossbeam_channel::Receiver<()> {
        self.lock().engine.as_ref().map_or_else(crossbeam_channel::never, |e| e.stopped())
    }

    /// Whether the engine stopped on its own (the TUN was deleted).
    pub fn failed(&self) -> bool {
        self.lock().engine.as_ref().is_none_or(|e| e.failed())
    }

    /// Stops the engine, which removes the TUN device if it still exists.
    pub fn stop(&self) {
        if let Some(e) = self.lock().engine.take() {
            e.stop();
        }
    }
}

/// wireguard-go gives a new device MTU 1420; wg-quick sets its own after.
fn set_mtu(ifname: &str, mtu: u32) {
    use weft_engine::sys::netlink::Netlink;
    let r = Netlink::link_index(ifname).and_then(|i| Netlink::open()?.set_link(i, false, Some(mtu)));
    if let Err(e) = r {
        tracing::warn!(ifname, error = %e, "could not set the MTU");
    }
}

impl Inner {
    /// Builds the engine's peers and routes from the configuration and
    /// hands them over.
    fn publish(&mut self) {
        let keyed = self.config.private_key.is_some();
        let mut live = std::mem::take(&mut self.peers);
        let mut peers = Vec::with_capacity(self.config.peers.len());
        for p in self.config.peers.iter().filter(|_| keyed) {
            let psk = p.preshared_key.map(|k| k.0);
            let keepalive = Some(p.persistent_keepalive).filter(|k| *k > 0);
            let l = match live.remove(&p.public_key) {
                Some(l) => {
                    let changed = {
                        let st = l.wg.lock();
                        st.preshared_key() != psk || st.keepalive() != keepalive
                    };
                    if changed {
                        l.wg.reconfigure(psk, keepalive);
                    }
                    l
                }
                None => {
                    // Local indices are 24 bits (the low byte of a receiver
                    // index is the session's); skip 0 and any still in use.
                    let mut index = self.next_index;
                    while index == 0 || live.values().chain(self.peers.values()).any(|l| l.wg.index == index) {
                        index = (index + 1) & 0x00ff_ffff;
                    }
                    self.next_index = (index + 1) & 0x00ff_ffff;
                    let wg = WgPeer::new(&self.device, p.public_key.0, psk, keepalive, index, p.endpoint);
                    Live { wg: Arc::new(wg), counters: Default::default(), last_handshake: None }
                }
            };
            peers.push(Peer {
                name: p.public_key.to_base64(),
                vtep4: None,
                vtep6: None,
                subnets: p.allowed_ips.clone(),
                counters: l.counters.clone(),
                wg: Some(l.wg.clone()),
            });
            self.peers.insert(p.public_key, l);
        }
        let snapshot = Snapshot::new(peers, Families { v4: true, v6: self.v6 });
        if let Some(e) = &self.engine {
            e.update(Arc::new(snapshot));
        }
    }
}

impl Device for StandaloneWg {
    fn status(&self) -> DeviceStatus {
        let mut inner = self.lock();
        let mut status = inner.config.clone();
        let now = SystemTime::now();
        for p in &mut status.peers {
            let Some(l) = inner.peers.get_mut(&p.public_key) else { continue };
            let (since, tx, rx) = l.wg.stats();
            p.endpoint = l.wg.lock().endpoint.or(p.endpoint);
            // WireGuard keeps reporting the last handshake after its
            // sessions expire.
            if let Some(at) = since.and_then(|d| now.checked_sub(d)) {
                l.last_handshake = Some(at);
            }
            p.last_handshake = l.last_handshake;
            p.tx_bytes = tx;
            p.rx_bytes = rx;
        }
        status
    }

    fn apply(&self, req: SetRequest) -> Result<(), UapiError> {
        let mut inner = self.lock();
        let mut config = inner.config.clone();
        config.apply_set(&req);
        // Port and mark in one rebind, so that a refusal changes nothing.
        let old_port = inner.config.listen_port;
        let new_port = req.listen_port.filter(|p| *p == 0 || *p != old_port);
        if new_port.is_some() || config.fwmark != inner.config.fwmark {
            let port = new_port.unwrap_or(old_port);
            let Some(engine) = inner.engine.as_mut() else {
                return Err(UapiError::Io(std::io::ErrorKind::NotConnected));
            };
            // wireguard-go answers any failure to bind with EADDRINUSE.
            let (bound, _) = engine.rebind((port, port), config.fwmark).map_err(|_| UapiError::PortInUse(port))?;
            config.listen_port = bound;
        } else {
            config.listen_port = old_port;
        }
        // A peer removed, or all of them with replace_peers, starts over
        // (new session, counters at zero) if it is added again.
        if req.replace_peers {
            inner.peers.clear();
        }
        for pc in req.peers.iter().filter(|p| p.remove) {
            inner.peers.remove(&pc.public_key);
        }
        if config.private_key != inner.config.private_key {
            // The peers stay; their sessions, made with the old key, end.
            let key = config.private_key.map_or([0; 32], |k| k.0);
            inner.device = Arc::new(WgDevice::new(key));
            for l in inner.peers.values() {
                l.wg.set_private(&inner.device);
            }
            if let Some(e) = &inner.engine {
                e.set_wg_device(inner.device.clone());
            }
        }
        inner.config = config;
        inner.publish();
        // A configured endpoint overrides where the peer roamed to.
        for pc in req.peers.iter().filter(|p| !p.remove) {
            let (Some(ep), Some(l)) = (pc.endpoint, inner.peers.get(&pc.public_key)) else { continue };
            let mut st = l.wg.lock();
            st.endpoint = Some(ep);
            st.configured = Some(ep);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        for good in ["wg0", "a", "weft-wg.1", "123456789012345"] {
            assert!(check_ifname(good).is_ok(), "{good}");
        }
        for bad in ["", "1234567890123456", "a/b", "a b", "a:b", ".", "..", "tab\t"] {
            let e = check_ifname(bad).unwrap_err().to_string();
            assert!(e.contains("refused") && e.contains("15 bytes"), "{bad}: {e}");
        }
    }
}
