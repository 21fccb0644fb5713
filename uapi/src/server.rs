//! The server half: the Unix socket `wg` connects to, an accept thread and
//! one thread per connection, each reading requests with
//! [`read_request`] and handing them to a [`Device`].
//!
//! It owns the socket file (created private, removed on stop) and the
//! threads; what a request means is the [`Device`]'s business, and what the
//! bytes mean is [`crate::proto`]'s.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::proto::{format_errno, format_get, read_request, DeviceStatus, Request, SetRequest, UapiError};

/// Where `wg` looks for userspace interfaces: `<SOCKET_DIR>/<iface>.sock`.
pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// How long a connection may stay silent, between or inside requests, before
/// it is dropped. `wg` writes each request in one go; ten seconds only ever
/// matters for a stuck or hostile client, whose thread it frees.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long writing a reply may block on a client that does not read.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once. `wg` opens one per command and the agent none,
/// so 16 is far above real use; beyond it a connection is closed at once
/// rather than costing another thread.
pub const MAX_CONNECTIONS: usize = 16;

/// The socket `wg` uses for interface `iface`.
pub fn socket_path(iface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{iface}.sock"))
}

/// What the server serves: the device behind the socket.
pub trait Device: Send + Sync {
    /// The device as `get=1` reports it.
    fn status(&self) -> DeviceStatus;
    /// Applies a whole set request, atomically with respect to
    /// [`status`](Device::status), the way WireGuard does: private key,
    /// listen port, fwmark, `replace_peers`, then each peer in order
    /// (`remove`, `update_only`, preshared key, endpoint, keepalive,
    /// `replace_allowed_ips`, allowed IPs taken from any other peer, removals).
    /// WireGuard also ignores a peer whose key is the device's own public key.
    fn apply(&self, req: SetRequest) -> Result<(), UapiError>;
}

/// The running server. Dropping it, or [`stop`](ServerHandle::stop), stops
/// accepting, closes open connections and removes the socket file if it is
/// still the one [`serve`] created.
pub struct ServerHandle {
    path: PathBuf,
    /// Device and inode of the socket file created, to tell it from a file
    /// that replaced it.
    ident: (u64, u64),
    /// A handle on the listening socket, to wake the accept thread on stop.
    listener: UnixListener,
    stopping: Arc<AtomicBool>,
    conns: Connections,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the socket file was removed or replaced by someone else; a
    /// WireGuard implementation then exits, as wireguard-go does.
    pub fn socket_gone(&self) -> bool {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) => (m.dev(), m.ino()) != self.ident,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        }
    }

    /// Stops serving and removes the socket file if it is still ours.
    /// Idempotent.
    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        self.stopping.store(true, Ordering::SeqCst);
        // Shutting a listening unix socket down wakes a blocked accept() with
        // EINVAL on Linux; connecting is the fallback for other kernels.
        if nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both).is_err() {
            let _ = UnixStream::connect(&self.path);
        }
        let _ = thread.join();
        for stream in lock(&self.conns).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        if !self.socket_gone() {
            let _ = std::fs::remove_file(&self.path);
        }
        tracing::info!(path = %self.path.display(), "uapi: stopped");
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle").field("path", &self.path).field("running", &self.thread.is_some()).finish()
    }
}

/// Serves the API on a unix socket at `path` (normally
/// [`socket_path`]`(iface)`) until the handle is dropped.
///
/// Creates the directory (mode 0755) if missing, removes a stale socket
/// (nobody accepting behind it) and refuses a live one (`AddrInUse`) or a
/// file that is not a socket (`AlreadyExists`). The socket is bound in a
/// private 0700 directory, set to mode 0600 and renamed into place, so it is
/// never reachable with looser permissions, whatever the umask. Connections
/// are accepted on a thread of their own and each served on its own thread,
/// many requests per connection.
pub fn serve(path: &Path, device: Arc<dyn Device>) -> io::Result<ServerHandle> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path has no directory")),
    };
    std::fs::DirBuilder::new().recursive(true).mode(0o755).create(dir)?;
    clear_stale_socket(path)?;
    let listener = bind_private(dir, path)?;
    let meta = std::fs::symlink_metadata(path)?;
    let stopping = Arc::new(AtomicBool::new(false));
    let conns: Connections = Arc::new(Mutex::new(HashMap::new()));
    let thread = {
        let listener = listener.try_clone()?;
        let (stopping, conns) = (stopping.clone(), conns.clone());
        std::thread::Builder::new()
            .name("uapi-accept".into())
            .spawn(move || accept_loop(listener, device, stopping, conns))?
    };
    tracing::info!(path = %path.display(), "uapi: serving");
    Ok(ServerHandle {
        path: path.to_path_buf(),
        ident: (meta.dev(), meta.ino()),
        listener,
        stopping,
        conns,
        thread: Some(thread),
    })
}

// ---------------------------------------------------------------------------
// Serving.

/// Open connections by id, so that stop can shut them down.
type Connections = Arc<Mutex<HashMap<u64, UnixStream>>>;

/// Pause after a failed accept (out of descriptors, say) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

fn lock(conns: &Connections) -> MutexGuard<'_, HashMap<u64, UnixStream>> {
    // A poisoned map is still a valid map: entries are only inserted and removed.
    conns.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes a socket file nobody accepts on; refuses a live one or a non-socket.
fn clear_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => {
            Err(io::Error::new(io::ErrorKind::AddrInUse, format!("{} is served by another process", path.display())))
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "uapi: removing stale socket");
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) => Err(e),
    }
}

/// Binds in a fresh 0700 directory beside `path`, sets 0600, renames into place.
fn bind_private(dir: &Path, path: &Path) -> io::Result<UnixListener> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let private = dir.join(format!(".weft-uapi-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let tmp = private.join("s");
    let result = UnixListener::bind(&tmp).and_then(|listener| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    result
}

fn accept_loop(listener: UnixListener, device: Arc<dyn Device>, stopping: Arc<AtomicBool>, conns: Connections) {
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    // Log a run of failed accepts once, not every ACCEPT_BACKOFF.
    let mut failing = false;
    for conn in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "uapi: accept failing; retrying");
                    failing = true;
                }
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        if std::mem::take(&mut failing) {
            tracing::info!("uapi: accepting again");
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        {
            let mut map = lock(&conns);
            if map.len() >= MAX_CONNECTIONS {
                tracing::debug!("uapi: too many connections; closing the new one");
                continue;
            }
            match stream.try_clone() {
                Ok(s) => map.insert(id, s),
                Err(_) => continue,
            };
        }
        let (device, conns2) = (device.clone(), conns.clone());
        let spawned = std::thread::Builder::new().name("uapi-conn".into()).spawn(move || {
            let _guard = ConnGuard { id, conns: conns2 };
            serve_connection(stream, &*device);
        });
        if spawned.is_err() {
            lock(&conns).remove(&id);
        }
    }
}

/// Removes a connection from the map when its thread ends, panics included.
struct ConnGuard {
    id: u64,
    conns: Connections,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.conns).remove(&self.id);
    }
}

fn serve_connection(stream: UnixStream, device: &dyn Device) {
    if stream.set_read_timeout(Some(READ_TIMEOUT)).is_err() || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() {
        return;
    }
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    loop {
        let (reply, fatal) = match read_request(&mut reader) {
            Ok(None) => return,
            Ok(Some(Request::Get)) => (format_get(&device.status()), false),
            Ok(Some(Request::Set(req))) => {
                let peers = req.peers.len();
                match device.apply(req) {
                    Ok(()) => {
                        tracing::info!(peers, "uapi: configuration applied");
                        (format_errno(0), false)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "uapi: configuration refused by the device");
                        (format_errno(-e.errno()), false)
                    }
                }
            }
            Err(UapiError::Io(kind)) => {
                tracing::debug!(?kind, "uapi: connection dropped");
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "uapi: request refused");
                (format_errno(-e.errno()), e.is_fatal())
            }
        };
        if writer.write_all(reply.as_bytes()).is_err() || fatal {
            let _ = writer.shutdown(Shutdown::Write);
            return;
        }
    }
}
