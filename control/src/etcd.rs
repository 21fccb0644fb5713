//! The etcd datastore: Flannel's v3 layout, behind a blocking facade.
//!
//! Keys are Flannel's, under a prefix (`/coreos.com/network` by default):
//!
//! ```text
//! <prefix>/config                       NetworkConfig (JSON)
//! <prefix>/subnets/10.244.1.0-24        Lease (JSON), attached to an etcd lease
//! <prefix>/subnets/10.244.1.0-24&fd00:0:0:1::-64
//! ```
//!
//! [`EtcdStore`] owns a one-worker tokio runtime that drives the gRPC
//! connection; every method blocks the calling thread for at most the timeout
//! given to [`EtcdStore::connect`], so a dead etcd is reported as
//! [`StoreError::Unavailable`] instead of hanging the agent. A [`Watch`] hands
//! out batches of [`LeaseEvent`]s in revision order and says
//! [`StoreError::Compacted`] when it can no longer be resumed, so that the
//! caller lists again.
//!
//! This module refuses to decide anything: it does not pick subnets, does not
//! renew leases by itself and does not retry. It speaks `http://`, or
//! `https://` with the TLS files and the user of an [`EtcdSecurity`]
//! ([`EtcdStore::connect_with`]); a TLS handshake refused or a wrong
//! password is [`StoreError::Tls`] or [`StoreError::Auth`], never
//! "unavailable". Values that do not parse are reported next to the good
//! ones, never dropped silently and never a reason to panic.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, PutOptions, Txn, TxnOp, WatchOptions,
    WatchResponse, WatchStream,
};
use tokio::runtime::Runtime;

use crate::datastore::{Lease, NetworkConfig};
use crate::error::DatastoreError;
use crate::etcd_tls::{EtcdSecurity, HandshakeError, TlsFileError};
use crate::subnet::SubnetKey;

/// Flannel's default key prefix.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";

/// Interval of the HTTP/2 pings that detect a dead connection while a watch
/// is open. etcd answers pings more frequent than its `--grpc-keepalive-min-time`
/// (5 s by default) with GOAWAY, so stay well above that.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Why an etcd operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The endpoint list is empty or holds something that is not an
    /// `http://host:port` URL.
    #[error("etcd endpoints {endpoints:?} refused: {source}")]
    Endpoint {
        /// The endpoints given.
        endpoints: Vec<String>,
        /// The client's complaint.
        source: etcd_client::Error,
    },
    /// A TLS file (`etcd-cafile`, `etcd-certfile`, `etcd-keyfile`) was
    /// refused.
    #[error(transparent)]
    TlsFile(#[from] TlsFileError),
    /// The TLS handshake with etcd was refused, by this side or by etcd:
    /// the files do not fit this etcd, trying again will not help.
    #[error("{0}")]
    Tls(#[source] HandshakeError),
    /// etcd refused the user and password (or has no authentication
    /// enabled for them).
    #[error("etcd refused authentication as user `{user}`: {source}")]
    Auth {
        /// The user.
        user: String,
        /// etcd's answer.
        source: etcd_client::Error,
    },
    /// The runtime that drives the client could not be started.
    #[error("starting the etcd client runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// etcd could not be reached, broke the connection or did not answer in
    /// time; trying again later may work.
    #[error("etcd unavailable during {op}: {cause}")]
    Unavailable {
        /// The operation that failed.
        op: &'static str,
        /// What went wrong.
        #[source]
        cause: Unreachable,
    },
    /// etcd answered, with an error.
    #[error("etcd refused {op}: {source}")]
    Refused {
        /// The operation that failed.
        op: &'static str,
        /// etcd's answer.
        source: etcd_client::Error,
    },
    /// There is no network config at the key.
    #[error("no network config at {key}")]
    NoConfig {
        /// The key read.
        key: String,
    },
    /// The network config in etcd does not parse.
    #[error("network config at {key}: {source}")]
    BadConfig {
        /// The key read.
        key: String,
        /// Why it does not parse.
        source: DatastoreError,
    },
    /// The etcd lease has expired or was revoked.
    #[error("etcd lease {id:#x} not found (expired or revoked)")]
    LeaseNotFound {
        /// The etcd lease ID.
        id: i64,
    },
    /// The revisions a watch would have to start from have been compacted
    /// away: list again and watch from the listing's revision.
    #[error("watch from revision {from} impossible: etcd compacted up to revision {compacted}")]
    Compacted {
        /// The first revision the watch asked for.
        from: i64,
        /// The revision etcd has compacted up to.
        compacted: i64,
    },
    /// etcd cancelled a watch for a reason other than compaction.
    #[error("etcd cancelled the watch: {reason}")]
    WatchCancelled {
        /// etcd's reason.
        reason: String,
    },
}

/// Why etcd counts as unavailable.
#[derive(Debug, thiserror::Error)]
pub enum Unreachable {
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// etcd closed the watch stream.
    #[error("the watch stream was closed")]
    StreamClosed,
    /// The connection could not be made or broke.
    #[error(transparent)]
    Transport(etcd_client::Error),
}

/// A change under `<prefix>/subnets/`, as seen by a [`Watch`].
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseEvent {
    /// A lease was created or changed.
    Put(SubnetKey, Lease),
    /// A lease was deleted or expired.
    Delete(SubnetKey),
    /// A key or value under the subnets prefix that is not a Flannel lease;
    /// reported, not applied.
    Invalid {
        /// The key, without `<prefix>/subnets/`.
        key: String,
        /// Why it does not parse.
        error: String,
    },
}

/// Every lease, as of one revision.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Listing {
    /// The leases by subnet key.
    pub leases: BTreeMap<SubnetKey, Lease>,
    /// The store revision the listing was taken at: watch from here.
    pub revision: i64,
    /// Keys (without `<prefix>/subnets/`) whose key or value does not parse,
    /// with the reason.
    pub bad: Vec<(String, String)>,
}

/// A blocking client for Flannel's layout in etcd v3. Share it between
/// threads freely; do not call it from inside an async runtime (blocking
/// there panics).
pub struct EtcdStore {
    client: Client,
    /// The prefix without a trailing `/`.
    prefix: String,
    timeout: Duration,
    /// Last, so that it is dropped after the client.
    rt: Arc<Runtime>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to `endpoints` (`http://127.0.0.1:2379`, ...) and checks that
    /// etcd answers. `prefix` is Flannel's (`/coreos.com/network`);
    /// `timeout` bounds this call and every later one.
    pub fn connect(endpoints: &[String], prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        Self::connect_with(endpoints, prefix, timeout, &EtcdSecurity::default())
    }

    /// [`EtcdStore::connect`] with TLS files and a user. With TLS, one trial
    /// handshake per endpoint comes first, so that certificates that do not
    /// fit are [`StoreError::Tls`]; a refused user is [`StoreError::Auth`].
    pub fn connect_with(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
        security: &EtcdSecurity,
    ) -> Result<Self, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("weft-etcd")
            .enable_all()
            .build()
            .map_err(StoreError::Runtime)?;
        let mut options =
            ConnectOptions::new().with_connect_timeout(timeout).with_keep_alive(KEEPALIVE_INTERVAL, timeout);
        if let Some(tls) = security.load()? {
            let config = tls.rustls_config(security)?;
            for e in endpoints.iter().filter(|e| e.starts_with("https://")) {
                match rt.block_on(crate::etcd_tls::handshake(e, config.clone(), timeout)) {
                    Ok(()) => {}
                    Err(e @ (HandshakeError::Refused { .. } | HandshakeError::BadEndpoint(_))) => {
                        return Err(StoreError::Tls(e))
                    }
                    // etcd down: the connection below says so, as without TLS.
                    Err(HandshakeError::Unreachable { .. } | HandshakeError::Timeout { .. }) => {}
                }
            }
            options = options.with_tls(tls.tonic_options());
        }
        if let (Some(user), Some(password)) = (&security.username, &security.password) {
            // Tokens expire (etcd's --auth-token-ttl, 5 min by default):
            // the client authenticates again when etcd says so.
            options = options.with_user(user.clone(), password.clone()).with_auto_token_refresh(true);
        }
        let client = rt
            .block_on(async { tokio::time::timeout(timeout, Client::connect(endpoints, Some(options))).await })
            .map_err(|_| StoreError::Unavailable { op: "connect", cause: Unreachable::Timeout(timeout) })?
            .map_err(|source| match source {
                etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => {
                    StoreError::Endpoint { endpoints: endpoints.to_vec(), source }
                }
                other => match (classify("connect", other), &security.username) {
                    // With a user, connecting authenticates: etcd's "no" is
                    // about the user or the password.
                    (StoreError::Refused { source, .. }, Some(user)) => StoreError::Auth { user: user.clone(), source },
                    (e, _) => e,
                },
            })?;
        let store = EtcdStore { rt: Arc::new(rt), client, prefix: prefix.trim_end_matches('/').to_string(), timeout };
        // The channel connects lazily: ask for something cheap so that a
        // wrong address is reported here and not at the first real call.
        let key = store.config_key();
        store.run("connect", |mut c| async move { c.get(key, Some(GetOptions::new().with_count_only())).await })?;
        Ok(store)
    }

    /// The network config at `<prefix>/config`.
    pub fn network_config(&self) -> Result<NetworkConfig, StoreError> {
        let key = self.config_key();
        let k = key.clone();
        let resp = self.run("get config", |mut c| async move { c.get(k, None).await })?;
        let kv = resp.kvs().first().ok_or_else(|| StoreError::NoConfig { key: key.clone() })?;
        NetworkConfig::parse(kv.value()).map_err(|source| StoreError::BadConfig { key, source })
    }

    /// Writes the network config (labs and tests; clusters are configured
    /// by their operator).
    pub fn put_network_config(&self, cfg: &NetworkConfig) -> Result<(), StoreError> {
        // NetworkConfig holds only strings, numbers, addresses and a JSON value.
        let json = serde_json::to_vec(cfg).expect("serialising plain data cannot fail");
        let key = self.config_key();
        self.run("put config", |mut c| async move { c.put(key, json, None).await })?;
        Ok(())
    }

    /// Every lease, and the revision the listing was taken at. Keys and
    /// values that do not parse are skipped and returned in
    /// [`Listing::bad`] with their error.
    pub fn leases(&self) -> Result<Listing, StoreError> {
        let dir = self.subnets_dir();
        let d = dir.clone();
        let resp =
            self.run("list leases", |mut c| async move { c.get(d, Some(GetOptions::new().with_prefix())).await })?;
        let mut listing = Listing { revision: resp.header().map_or(0, |h| h.revision()), ..Listing::default() };
        for kv in resp.kvs() {
            match parse_put(&dir, kv) {
                LeaseEvent::Put(key, lease) => {
                    listing.leases.insert(key, lease);
                }
                LeaseEvent::Invalid { key, error } => listing.bad.push((key, error)),
                LeaseEvent::Delete(_) => {}
            }
        }
        Ok(listing)
    }

    /// Creates `key` with `value` under a new etcd lease of `ttl` (whole
    /// seconds, rounded up), only if the key does not exist. Returns the etcd
    /// lease ID if it was created, `None` if the key already exists.
    pub fn create_lease(&self, key: &SubnetKey, value: &Lease, ttl: Duration) -> Result<Option<i64>, StoreError> {
        let k = self.lease_key(key);
        let json = lease_json(value);
        self.run("create lease", |mut c| async move {
            let id = c.lease_grant(ttl_secs(ttl), None).await?.id();
            let txn = Txn::new()
                .when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(k, json, Some(PutOptions::new().with_lease(id)))]);
            if c.txn(txn).await?.succeeded() {
                return Ok(Some(id));
            }
            // Someone else holds the key. Revoke the unused lease rather than
            // leave it around for a day; best effort, it expires anyway.
            c.lease_revoke(id).await.ok();
            Ok(None)
        })
    }

    /// Takes over an existing key, this node's own lease after a restart:
    /// only if its current value announces one of `value`'s public addresses
    /// (`PublicIP` or `PublicIPv6`). The key is written with `value` under a
    /// new etcd lease of `ttl`, provided it did not change since it was read.
    /// Returns the new etcd lease ID, or `None` if the key is gone, belongs
    /// to another node, does not parse, or changed meanwhile.
    pub fn reclaim_lease(&self, key: &SubnetKey, value: &Lease, ttl: Duration) -> Result<Option<i64>, StoreError> {
        let k = self.lease_key(key);
        let json = lease_json(value);
        let ours: Vec<_> = value.public_ips().collect();
        self.run("reclaim lease", |mut c| async move {
            let resp = c.get(k.clone(), None).await?;
            let Some(current) = resp.kvs().first() else { return Ok(None) };
            let Ok(lease) = Lease::parse(current.value()) else { return Ok(None) };
            if !lease.public_ips().any(|ip| ours.contains(&ip)) {
                return Ok(None);
            }
            let seen = current.mod_revision();
            let id = c.lease_grant(ttl_secs(ttl), None).await?.id();
            let txn = Txn::new()
                .when([Compare::mod_revision(k.clone(), CompareOp::Equal, seen)])
                .and_then([TxnOp::put(k, json, Some(PutOptions::new().with_lease(id)))]);
            if c.txn(txn).await?.succeeded() {
                return Ok(Some(id));
            }
            // The key changed since it was read; revoke as in `create_lease`.
            c.lease_revoke(id).await.ok();
            Ok(None)
        })
    }

    /// Sends one keep-alive for the etcd lease `lease_id` and returns its
    /// remaining time to live; [`StoreError::LeaseNotFound`] if it is gone.
    pub fn renew(&self, lease_id: i64) -> Result<Duration, StoreError> {
        let ttl = self.run("renew lease", |mut c| async move {
            match c.lease_keep_alive(lease_id).await {
                Ok(_) => {}
                // etcd answers a keep-alive for an unknown lease with TTL 0,
                // which the client reports as this error.
                Err(etcd_client::Error::LeaseKeepAliveError(_)) => return Ok(-1),
                Err(e) => return Err(e),
            }
            Ok(c.lease_time_to_live(lease_id, None).await?.ttl())
        })?;
        if ttl <= 0 {
            return Err(StoreError::LeaseNotFound { id: lease_id });
        }
        Ok(Duration::from_secs(ttl.unsigned_abs()))
    }

    /// Deletes the lease at `key` (nothing happens if it does not exist).
    pub fn delete_lease(&self, key: &SubnetKey) -> Result<(), StoreError> {
        let k = self.lease_key(key);
        self.run("delete lease", |mut c| async move { c.delete(k, None).await })?;
        Ok(())
    }

    /// Writes `json` at `<prefix>/subnets/<key>` byte for byte and without
    /// an etcd lease, as a test stand-in for a kernel flanneld (or for a
    /// broken value).
    pub fn put_lease_raw(&self, key: &str, json: &str) -> Result<(), StoreError> {
        let k = format!("{}{key}", self.subnets_dir());
        let v = json.to_string();
        self.run("put lease", |mut c| async move { c.put(k, v, None).await })?;
        Ok(())
    }

    /// Watches `<prefix>/subnets/` from `from_revision + 1`, usually a
    /// [`Listing::revision`]. Returns once etcd has registered the watch.
    pub fn watch(&self, from_revision: i64) -> Result<Watch, StoreError> {
        let dir = self.subnets_dir();
        let d = dir.clone();
        let start = from_revision.saturating_add(1);
        let (stream, first) = self.run("watch", |c| async move {
            let options = WatchOptions::new().with_prefix().with_start_revision(start);
            let mut stream = c.watch_client().watch(d, Some(options)).await?;
            let first = stream.message().await?;
            Ok((stream, first))
        })?;
        let Some(first) = first else {
            return Err(StoreError::Unavailable { op: "watch", cause: Unreachable::StreamClosed });
        };
        // The first answer confirms the watch; if it says more than that
        // (a cancellation), `next` reports it.
        let pending = (!first.created() || first.canceled()).then_some(first);
        Ok(Watch { rt: self.rt.clone(), stream, dir, from: start, revision: from_revision, pending })
    }

    fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    fn subnets_dir(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    fn lease_key(&self, key: &SubnetKey) -> String {
        format!("{}{key}", self.subnets_dir())
    }

    /// Runs `f` on a clone of the client, bounded by the timeout.
    fn run<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let fut = f(self.client.clone());
        let timeout = self.timeout;
        match self.rt.block_on(async { tokio::time::timeout(timeout, fut).await }) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(classify(op, e)),
            Err(_) => Err(StoreError::Unavailable { op, cause: Unreachable::Timeout(timeout) }),
        }
    }
}

/// A watch of `<prefix>/subnets/`, made by [`EtcdStore::watch`].
///
/// After an error the watch is finished: make a new one (from
/// [`Watch::revision`] after [`StoreError::Unavailable`], from a new
/// listing after [`StoreError::Compacted`]).
pub struct Watch {
    stream: WatchStream,
    dir: String,
    /// The first revision asked for.
    from: i64,
    /// The revision of the last event handed out.
    revision: i64,
    /// An answer read while creating the watch, not yet handled.
    pending: Option<WatchResponse>,
    /// Last, so that it is dropped after the stream.
    rt: Arc<Runtime>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("dir", &self.dir)
            .field("from", &self.from)
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

impl Watch {
    /// Waits up to `timeout` for the next batch of events. Returns an empty
    /// batch on timeout, [`StoreError::Compacted`] if the start revision has
    /// been compacted (list again), [`StoreError::Unavailable`] when the
    /// connection broke.
    pub fn next(&mut self, timeout: Duration) -> Result<Vec<LeaseEvent>, StoreError> {
        if let Some(resp) = self.pending.take() {
            if let Some(events) = self.handle_response(resp)? {
                return Ok(events);
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let rt = self.rt.clone();
        rt.block_on(async {
            loop {
                let resp = match tokio::time::timeout_at(deadline, self.stream.message()).await {
                    Err(_) => return Ok(Vec::new()),
                    Ok(Err(e)) => return Err(classify("watch", e)),
                    Ok(Ok(None)) => {
                        return Err(StoreError::Unavailable { op: "watch", cause: Unreachable::StreamClosed })
                    }
                    Ok(Ok(Some(resp))) => resp,
                };
                if let Some(events) = self.handle_response(resp)? {
                    return Ok(events);
                }
            }
        })
    }

    /// The revision of the last event handed out (the start revision minus
    /// one before any): a new watch from here misses nothing.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The events of one answer, or `None` for an answer without any
    /// (creation, progress).
    fn handle_response(&mut self, resp: WatchResponse) -> Result<Option<Vec<LeaseEvent>>, StoreError> {
        if resp.compact_revision() != 0 {
            return Err(StoreError::Compacted { from: self.from, compacted: resp.compact_revision() });
        }
        if resp.canceled() {
            return Err(StoreError::WatchCancelled { reason: resp.cancel_reason().to_string() });
        }
        if resp.events().is_empty() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(resp.events().len());
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            self.revision = self.revision.max(kv.mod_revision());
            // mvccpb.Event.EventType: 0 is PUT, 1 is DELETE.
            out.push(match ev.0.r#type {
                0 => parse_put(&self.dir, kv),
                1 => match SubnetKey::parse(&relative_key(&self.dir, kv)) {
                    Ok(key) => LeaseEvent::Delete(key),
                    Err(e) => LeaseEvent::Invalid { key: relative_key(&self.dir, kv), error: e.to_string() },
                },
                other => LeaseEvent::Invalid {
                    key: relative_key(&self.dir, kv),
                    error: format!("unknown event type {other}"),
                },
            });
        }
        Ok(Some(out))
    }
}

/// The lease (or why not) in a key-value pair under `dir`.
fn parse_put(dir: &str, kv: &KeyValue) -> LeaseEvent {
    let key = relative_key(dir, kv);
    let parsed = SubnetKey::parse(&key).and_then(|k| Ok((k, Lease::parse(kv.value())?)));
    match parsed {
        Ok((k, lease)) => LeaseEvent::Put(k, lease),
        Err(e) => LeaseEvent::Invalid { key, error: e.to_string() },
    }
}

/// The key of `kv` without `dir`, lossily decoded.
fn relative_key(dir: &str, kv: &KeyValue) -> String {
    let key = kv.key();
    let rest = key.strip_prefix(dir.as_bytes()).unwrap_or(key);
    String::from_utf8_lossy(rest).into_owned()
}

fn lease_json(value: &Lease) -> Vec<u8> {
    // Lease holds only strings, addresses and JSON values.
    serde_json::to_vec(value).expect("serialising plain data cannot fail")
}

/// An etcd TTL: whole seconds, rounded up, at least one.
fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs().saturating_add(u64::from(ttl.subsec_nanos() > 0));
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

/// Sorts a client error into "etcd is unreachable" and "etcd said no".
fn classify(op: &'static str, e: etcd_client::Error) -> StoreError {
    // gRPC status codes (a wire standard): CANCELLED, UNKNOWN,
    // DEADLINE_EXCEEDED, UNAVAILABLE.
    const CANCELLED: i32 = 1;
    const UNKNOWN: i32 = 2;
    const DEADLINE_EXCEEDED: i32 = 4;
    const UNAVAILABLE: i32 = 14;
    // A TLS verdict (a certificate that expired or was replaced) is an
    // answer, not an outage.
    // (etcd_client::Error has no `source`: look inside by hand.)
    let inner: Option<&(dyn std::error::Error + 'static)> = match &e {
        etcd_client::Error::TransportError(t) => Some(t),
        etcd_client::Error::GRpcStatus(s) => Some(s),
        etcd_client::Error::IoError(i) => Some(i),
        _ => None,
    };
    if inner.and_then(crate::etcd_tls::tls_error).is_some() {
        return StoreError::Refused { op, source: e };
    }
    let unreachable = match &e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => match i32::from(s.code()) {
            CANCELLED | DEADLINE_EXCEEDED | UNAVAILABLE => true,
            // A status made up on this side from a broken connection carries
            // the local error as its source; one sent by etcd has none.
            UNKNOWN => std::error::Error::source(s).is_some(),
            _ => false,
        },
        _ => false,
    };
    if unreachable {
        StoreError::Unavailable { op, cause: Unreachable::Transport(e) }
    } else {
        StoreError::Refused { op, source: e }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_round_up_to_whole_seconds() {
        assert_eq!(ttl_secs(Duration::ZERO), 1);
        assert_eq!(ttl_secs(Duration::from_millis(1)), 1);
        assert_eq!(ttl_secs(Duration::from_secs(2)), 2);
        assert_eq!(ttl_secs(Duration::from_millis(2001)), 3);
        assert_eq!(ttl_secs(Duration::from_secs(24 * 3600)), 86400);
        assert_eq!(ttl_secs(Duration::MAX), i64::MAX);
    }
}
