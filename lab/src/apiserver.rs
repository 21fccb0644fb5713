//! A Kubernetes API server stand-in for Nodes, for the lab and the tests.
//!
//! No real kube-apiserver can be installed on the machines weft is tested
//! on, so this speaks the part of its HTTP contract that a CNI's subnet
//! manager uses, as the API server speaks it:
//!
//! - HTTPS only (a CA made at start), `Authorization: Bearer <token>`, else
//!   `401` with a `Status` body;
//! - `GET /api/v1/nodes`: a `NodeList` carrying the list's
//!   `metadata.resourceVersion` (one counter for every write, as etcd's
//!   revision is); `fieldSelector=metadata.name=X` and `labelSelector`
//!   equality terms filter it;
//! - `GET /api/v1/nodes?watch=true&resourceVersion=N`: a chunked stream of
//!   `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}` lines
//!   with every change after `N`, `BOOKMARK`s (only `metadata.resourceVersion`)
//!   when `allowWatchBookmarks=true`, closed after `timeoutSeconds`; a `N`
//!   older than the compaction point gets one `ERROR` event holding a
//!   `Status` with code `410` and reason `Expired` (HTTP 200), as the real
//!   server answers;
//! - `GET`, `POST`, `DELETE` of one Node (`404`, `409` as the real server);
//! - `PATCH /api/v1/nodes/{name}` and `.../status` with
//!   `application/strategic-merge-patch+json` (maps merge, `null` deletes,
//!   `status.conditions` and `status.addresses` merge by `type`, other lists
//!   replaced), `application/merge-patch+json` (RFC 7386) and
//!   `application/json-patch+json` (RFC 6902), else `415`; as for the real
//!   `nodes/status`, a status patch changes metadata and status but not the
//!   spec, and a patch of the Node itself does not change its status.
//!
//! Every request is recorded as the RBAC attributes the real server checks
//! (verb, resource, subresource), so a test can hold them against a
//! ClusterRole ([`cluster_role_rules`], [`allows`], [`unused`]). The owner
//! also drives it as the rest of a cluster would (register a Node, assign its
//! pod CIDR, delete it), and can take it away ([`ApiServer::pause`]: every
//! connection dropped, connections refused) and bring it back with its state.
//! It is tooling, not product: it refuses everything else with `404`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::Notify;

/// How often an idle watch gets a bookmark.
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);
/// Longest watch when the client gives no `timeoutSeconds` (the real
/// server's default is a random 30-60 minutes; tests want shorter).
const DEFAULT_WATCH: Duration = Duration::from_secs(300);

/// One request as RBAC sees it: verb, resource, subresource (or "").
pub type Attributes = (String, String, String);

/// The running stand-in. Dropping it stops it.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    ca_pem: String,
    ctl: tokio::sync::mpsc::UnboundedSender<Ctl>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").field("addr", &self.addr).finish()
    }
}

enum Ctl {
    Pause(std::sync::mpsc::Sender<()>),
    Resume(std::sync::mpsc::Sender<std::io::Result<()>>),
    Stop,
}

struct Shared {
    token: String,
    state: Mutex<State>,
    changed: Notify,
    requests: Mutex<Vec<Attributes>>,
}

#[derive(Default)]
struct State {
    rv: u64,
    compacted: u64,
    nodes: BTreeMap<String, Value>,
    /// Every change: resourceVersion, event type, the object then.
    events: Vec<(u64, &'static str, Value)>,
    uid: u64,
}

impl ApiServer {
    /// Starts serving HTTPS on `addr` (port 0: any free port), inside the
    /// network namespace `netns` when given, with bearer token `token`.
    pub fn start(netns: Option<&str>, addr: SocketAddr, token: &str) -> anyhow::Result<ApiServer> {
        let (cert_pem, key_pem, ca_pem) = certificates(addr.ip())?;
        let tls = tls_config(&cert_pem, &key_pem)?;
        let shared = Arc::new(Shared {
            token: token.to_string(),
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            requests: Mutex::new(Vec::new()),
        });
        let (ctl, ctl_rx) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<SocketAddr>>();
        let sh = shared.clone();
        let run = move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(serve(sh, tls, addr, ctl_rx, ready_tx));
        };
        // Sockets opened by a thread that joined the namespace live there.
        let thread = match netns {
            Some(ns) => crate::netns::spawn_in_netns(ns, run)?,
            None => std::thread::Builder::new().name("weft-apiserver".into()).spawn(run)?,
        };
        let addr = ready_rx.recv().context("the API server thread ended")??;
        Ok(ApiServer { shared, addr, ca_pem, ctl, thread: Some(thread) })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://host:port`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The CA that signed its certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A kubeconfig that reaches it with `token`.
    pub fn kubeconfig_yaml(&self, token: &str) -> String {
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {}\n    \
             certificate-authority-data: {ca}\nusers:\n- name: weft\n  user:\n    token: {token}\n\
             contexts:\n- name: lab\n  context:\n    cluster: lab\n    user: weft\ncurrent-context: lab\n",
            self.url()
        )
    }

    /// Creates a Node (as a kubelet registers it).
    pub fn create_node(&self, node: Value) -> anyhow::Result<Value> {
        self.shared.create(node).map_err(|(code, msg)| anyhow::anyhow!("{code}: {msg}"))
    }

    /// Patches a Node with a strategic-merge patch, through `nodes/status`
    /// when `status` (as flanneld and the kubelet do) or the Node itself
    /// (as the controller manager assigns pod CIDRs).
    pub fn patch_node(&self, name: &str, patch: Value, status: bool) -> anyhow::Result<Value> {
        self.shared
            .patch(name, PatchKind::Strategic, &patch, status)
            .map_err(|(code, msg)| anyhow::anyhow!("{code}: {msg}"))
    }

    /// Deletes a Node.
    pub fn delete_node(&self, name: &str) -> anyhow::Result<()> {
        self.shared.delete(name).map(|_| ()).map_err(|(code, msg)| anyhow::anyhow!("{code}: {msg}"))
    }

    /// A Node as it is now.
    pub fn node(&self, name: &str) -> Option<Value> {
        self.shared.state.lock().expect("not poisoned").nodes.get(name).cloned()
    }

    /// Every Node.
    pub fn nodes(&self) -> Vec<Value> {
        self.shared.state.lock().expect("not poisoned").nodes.values().cloned().collect()
    }

    /// Takes the server away: the listener closes, every connection and
    /// watch is dropped; the state stays. Returns once it is gone.
    pub fn pause(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.ctl.send(Ctl::Pause(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Listens again on the same address, with the same state.
    pub fn resume(&self) -> anyhow::Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.ctl.send(Ctl::Resume(tx)).ok().context("the API server has stopped")?;
        rx.recv().context("the API server has stopped")?.context("listening again")
    }

    /// Forgets the history: a watch from any resourceVersion before now
    /// gets `410 Gone`.
    pub fn compact(&self) {
        let mut st = self.shared.state.lock().expect("not poisoned");
        st.compacted = st.rv;
        st.events.clear();
    }

    /// Every request so far, as RBAC attributes.
    pub fn requests(&self) -> Vec<Attributes> {
        self.shared.requests.lock().expect("not poisoned").clone()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.ctl.send(Ctl::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One rule of a ClusterRole.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// `apiGroups` ("" is the core group).
    pub api_groups: Vec<String>,
    /// `resources`, `nodes` or `nodes/status`.
    pub resources: Vec<String>,
    /// `verbs`.
    pub verbs: Vec<String>,
}

/// The rules of ClusterRole `name` in a multi-document YAML manifest.
pub fn cluster_role_rules(manifest: &str, name: &str) -> anyhow::Result<Vec<Rule>> {
    use serde::Deserialize as _;
    for doc in serde_yaml::Deserializer::from_str(manifest) {
        let v = serde_yaml::Value::deserialize(doc)?;
        if v["kind"].as_str() != Some("ClusterRole") || v["metadata"]["name"].as_str() != Some(name) {
            continue;
        }
        let strings = |v: &serde_yaml::Value| -> Vec<String> {
            v.as_sequence().into_iter().flatten().filter_map(|s| s.as_str().map(String::from)).collect()
        };
        let rules = v["rules"].as_sequence().context("the ClusterRole has no rules")?;
        return Ok(rules
            .iter()
            .map(|r| Rule {
                api_groups: strings(&r["apiGroups"]),
                resources: strings(&r["resources"]),
                verbs: strings(&r["verbs"]),
            })
            .collect());
    }
    bail!("no ClusterRole {name} in the manifest")
}

fn resource_name(resource: &str, subresource: &str) -> String {
    if subresource.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}/{subresource}")
    }
}

/// Whether `rules` allow `verb` on the core group's `resource/subresource`.
pub fn allows(rules: &[Rule], verb: &str, resource: &str, subresource: &str) -> bool {
    let res = resource_name(resource, subresource);
    rules.iter().any(|r| {
        r.api_groups.iter().any(|g| g.is_empty() || g == "*")
            && r.resources.iter().any(|x| *x == res || x == "*")
            && r.verbs.iter().any(|v| v == verb || v == "*")
    })
}

/// The (resource, verb) pairs `rules` grant that no request used.
pub fn unused(rules: &[Rule], requests: &[Attributes]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for r in rules {
        for res in &r.resources {
            for verb in &r.verbs {
                let used = requests.iter().any(|(v, rs, sub)| v == verb && resource_name(rs, sub) == *res);
                if !used {
                    out.push((res.clone(), verb.clone()));
                }
            }
        }
    }
    out
}

type Body = BoxBody<Bytes, Infallible>;

#[derive(Clone, Copy)]
enum PatchKind {
    Strategic,
    Merge,
    Json,
}

async fn serve(
    shared: Arc<Shared>,
    tls: Arc<rustls::ServerConfig>,
    addr: SocketAddr,
    mut ctl: tokio::sync::mpsc::UnboundedReceiver<Ctl>,
    ready: std::sync::mpsc::Sender<anyhow::Result<SocketAddr>>,
) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(anyhow::Error::from(e).context(format!("binding {addr}"))));
            return;
        }
    };
    let addr = listener.local_addr().unwrap_or(addr);
    let _ = ready.send(Ok(addr));
    let mut listener = Some(listener);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accept = async {
            match &listener {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            c = ctl.recv() => match c {
                Some(Ctl::Pause(done)) => {
                    listener = None;
                    conns.abort_all();
                    while conns.join_next().await.is_some() {}
                    let _ = done.send(());
                }
                Some(Ctl::Resume(done)) => {
                    let r = tokio::net::TcpListener::bind(addr).await;
                    let _ = done.send(r.as_ref().map(|_| ()).map_err(|e| std::io::Error::new(e.kind(), e.to_string())));
                    listener = r.ok();
                }
                Some(Ctl::Stop) | None => {
                    conns.abort_all();
                    return;
                }
            },
            a = accept => {
                let Ok((stream, _)) = a else { continue };
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                let shared = shared.clone();
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("a valid response")
}

/// A `Status` object as the API server returns for errors.
fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn error(code: u16, message: &str) -> Response<Body> {
    let reason = match code {
        401 => "Unauthorized",
        404 => "NotFound",
        409 => "AlreadyExists",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        _ => "BadRequest",
    };
    full(StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST), status(code, reason, message))
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    let q = req.uri().query().unwrap_or("");
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .is_some_and(|t| t == shared.token);
    if !authorized {
        return error(401, "Unauthorized");
    }
    let path = req.uri().path().trim_end_matches('/').to_string();
    let q = query(&req);
    let rest = match path.strip_prefix("/api/v1/nodes") {
        Some(r) => r.to_string(),
        None => return error(404, &format!("the server could not find the requested resource ({path})")),
    };
    let mut parts = rest.trim_start_matches('/').splitn(2, '/');
    let name = parts.next().filter(|s| !s.is_empty()).map(String::from);
    let sub = parts.next().unwrap_or("").to_string();
    if !sub.is_empty() && sub != "status" {
        return error(404, &format!("no subresource {sub}"));
    }
    let watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (req.method(), &name) {
        (&Method::GET, None) if watch => "watch",
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, None) => "create",
        (&Method::PUT, Some(_)) => "update",
        (&Method::PATCH, Some(_)) => "patch",
        (&Method::DELETE, Some(_)) => "delete",
        _ => return error(405, "method not allowed"),
    };
    shared.requests.lock().expect("not poisoned").push((verb.into(), "nodes".into(), sub.clone()));
    let content_type = req.headers().get("content-type").and_then(|h| h.to_str().ok()).unwrap_or("").to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(400, "could not read the body"),
    };
    let parse = |b: &Bytes| serde_json::from_slice::<Value>(b).map_err(|e| format!("bad JSON: {e}"));
    let answer = |r: Result<Value, (u16, String)>, ok: StatusCode| match r {
        Ok(v) => full(ok, v),
        Err((code, msg)) => error(code, &msg),
    };
    match verb {
        "list" => full(StatusCode::OK, shared.list(&q)),
        "watch" => watch_stream(shared, &q),
        "get" => {
            let n = shared.state.lock().expect("not poisoned").nodes.get(name.as_deref().unwrap_or("")).cloned();
            match n {
                Some(n) => full(StatusCode::OK, n),
                None => error(404, &format!("nodes \"{}\" not found", name.unwrap_or_default())),
            }
        }
        "create" => match parse(&body) {
            Ok(v) => answer(shared.create(v), StatusCode::CREATED),
            Err(m) => error(400, &m),
        },
        "delete" => answer(shared.delete(name.as_deref().unwrap_or("")), StatusCode::OK),
        "update" => match parse(&body) {
            Ok(v) => answer(
                shared.patch(name.as_deref().unwrap_or(""), PatchKind::Merge, &v, !sub.is_empty()),
                StatusCode::OK,
            ),
            Err(m) => error(400, &m),
        },
        _ => {
            let kind = match content_type.split(';').next().unwrap_or("").trim() {
                "application/strategic-merge-patch+json" => PatchKind::Strategic,
                "application/merge-patch+json" => PatchKind::Merge,
                "application/json-patch+json" => PatchKind::Json,
                other => return error(415, &format!("the body of the request was in an unknown format: {other}")),
            };
            match parse(&body) {
                Ok(p) => answer(shared.patch(name.as_deref().unwrap_or(""), kind, &p, !sub.is_empty()), StatusCode::OK),
                Err(m) => error(400, &m),
            }
        }
    }
}

fn selected(node: &Value, q: &BTreeMap<String, String>) -> bool {
    let terms = |key: &str| -> Vec<(String, String)> {
        q.get(key)
            .map(|s| {
                s.split(',')
                    .filter_map(|t| {
                        t.split_once('=').map(|(k, v)| (k.trim_end_matches('=').to_string(), v.to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let fields_ok = terms("fieldSelector").iter().all(|(k, v)| match k.as_str() {
        "metadata.name" => node["metadata"]["name"].as_str() == Some(v),
        _ => true,
    });
    let labels_ok = terms("labelSelector").iter().all(|(k, v)| node["metadata"]["labels"][k].as_str() == Some(v));
    fields_ok && labels_ok
}

impl Shared {
    fn list(&self, q: &BTreeMap<String, String>) -> Value {
        let st = self.state.lock().expect("not poisoned");
        let items: Vec<&Value> = st.nodes.values().filter(|n| selected(n, q)).collect();
        json!({"kind": "NodeList", "apiVersion": "v1",
               "metadata": {"resourceVersion": st.rv.to_string()}, "items": items})
    }

    /// Records a change and wakes every watch.
    fn record(&self, st: &mut State, kind: &'static str, obj: Value) {
        st.events.push((st.rv, kind, obj));
        self.changed.notify_waiters();
    }

    fn create(&self, mut node: Value) -> Result<Value, (u16, String)> {
        let name =
            node["metadata"]["name"].as_str().map(String::from).ok_or((422, "metadata.name is required".into()))?;
        let mut st = self.state.lock().expect("not poisoned");
        if st.nodes.contains_key(&name) {
            return Err((409, format!("nodes \"{name}\" already exists")));
        }
        st.rv += 1;
        st.uid += 1;
        let now = k8s_openapi::jiff::Timestamp::now();
        let now = now.round(k8s_openapi::jiff::Unit::Second).unwrap_or(now);
        node["apiVersion"] = json!("v1");
        node["kind"] = json!("Node");
        node["metadata"]["uid"] = json!(format!("6f1c0a3e-0000-4000-8000-{:012x}", st.uid));
        node["metadata"]["creationTimestamp"] = json!(now.to_string());
        node["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        st.nodes.insert(name, node.clone());
        self.record(&mut st, "ADDED", node.clone());
        Ok(node)
    }

    fn delete(&self, name: &str) -> Result<Value, (u16, String)> {
        let mut st = self.state.lock().expect("not poisoned");
        let Some(mut node) = st.nodes.remove(name) else { return Err((404, format!("nodes \"{name}\" not found"))) };
        st.rv += 1;
        node["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        self.record(&mut st, "DELETED", node.clone());
        Ok(node)
    }

    fn patch(&self, name: &str, kind: PatchKind, patch: &Value, status: bool) -> Result<Value, (u16, String)> {
        let mut st = self.state.lock().expect("not poisoned");
        let old = st.nodes.get(name).cloned().ok_or((404, format!("nodes \"{name}\" not found")))?;
        if let Some(want) = patch["metadata"]["resourceVersion"].as_str() {
            if old["metadata"]["resourceVersion"].as_str() != Some(want) {
                return Err((
                    409,
                    format!("Operation cannot be fulfilled on nodes \"{name}\": the object has been modified"),
                ));
            }
        }
        let mut new = old.clone();
        match kind {
            PatchKind::Strategic => strategic_merge(&mut new, patch, ""),
            PatchKind::Merge => json_patch::merge(&mut new, patch),
            PatchKind::Json => {
                let ops: json_patch::Patch =
                    serde_json::from_value(patch.clone()).map_err(|e| (400, format!("bad JSON patch: {e}")))?;
                json_patch::patch(&mut new, &ops.0).map_err(|e| (422, format!("JSON patch: {e}")))?;
            }
        }
        // nodes/status changes metadata and status; the Node itself
        // metadata and spec. Identity fields never change.
        if status {
            new["spec"] = old["spec"].clone();
        } else {
            new["status"] = old["status"].clone();
        }
        for f in ["name", "uid", "creationTimestamp"] {
            new["metadata"][f] = old["metadata"][f].clone();
        }
        if new == old {
            return Ok(new);
        }
        st.rv += 1;
        new["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        st.nodes.insert(name.to_string(), new.clone());
        self.record(&mut st, "MODIFIED", new.clone());
        Ok(new)
    }
}

/// The strategic merge of Kubernetes for a Node: maps merge, `null`
/// deletes, the lists with a merge key (`status.conditions`,
/// `status.addresses`: `type`) merge by it, other lists are replaced.
fn strategic_merge(doc: &mut Value, patch: &Value, path: &str) {
    let Some(p) = patch.as_object() else {
        *doc = patch.clone();
        return;
    };
    if !doc.is_object() {
        *doc = json!({});
    }
    let d = doc.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if k.starts_with('$') {
            continue;
        }
        let here = format!("{path}.{k}");
        if v.is_null() {
            d.remove(k);
            continue;
        }
        let keyed = matches!(here.as_str(), ".status.conditions" | ".status.addresses");
        match (keyed, v.as_array(), d.get_mut(k)) {
            (true, Some(items), Some(Value::Array(have))) => {
                for item in items {
                    let t = &item["type"];
                    match have.iter_mut().find(|h| h["type"] == *t) {
                        Some(h) => strategic_merge(h, item, &here),
                        None => have.push(item.clone()),
                    }
                }
            }
            (_, None, Some(existing)) if v.is_object() => strategic_merge(existing, v, &here),
            _ => {
                d.insert(k.clone(), v.clone());
            }
        }
    }
}

fn watch_stream(shared: Arc<Shared>, q: &BTreeMap<String, String>) -> Response<Body> {
    let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout =
        q.get("timeoutSeconds").and_then(|v| v.parse().ok()).map(Duration::from_secs).unwrap_or(DEFAULT_WATCH);
    let q = q.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let line = |v: Value| Bytes::from(format!("{v}\n"));
        let deadline = tokio::time::Instant::now() + timeout;
        // resourceVersion 0 or absent: "any": the current objects as ADDED,
        // then changes from now (the real server's semantics).
        let (start, current, expired) = {
            let st = shared.state.lock().expect("not poisoned");
            if from == 0 {
                (st.rv, st.nodes.values().filter(|n| selected(n, &q)).cloned().collect(), None)
            } else if from < st.compacted {
                (from, Vec::new(), Some(format!("too old resource version: {from} ({})", st.compacted)))
            } else {
                (from, Vec::new(), None)
            }
        };
        if let Some(msg) = expired {
            let _ = tx.send(line(json!({"type": "ERROR", "object": status(410, "Expired", &msg)}))).await;
            return;
        }
        for n in current {
            if tx.send(line(json!({"type": "ADDED", "object": n}))).await.is_err() {
                return;
            }
        }
        let mut at = start;
        loop {
            let notified = shared.changed.notified();
            let batch: Vec<(u64, &'static str, Value)> = {
                let st = shared.state.lock().expect("not poisoned");
                st.events.iter().filter(|(rv, _, o)| *rv > at && selected(o, &q)).cloned().collect()
            };
            for (rv, kind, obj) in batch {
                at = rv;
                if tx.send(line(json!({"type": kind, "object": obj}))).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(BOOKMARK_EVERY) => {
                    if bookmarks {
                        let rv = shared.state.lock().expect("not poisoned").rv.max(at);
                        let ev = json!({"type": "BOOKMARK", "object": {"kind": "Node", "apiVersion": "v1",
                                        "metadata": {"resourceVersion": rv.to_string()}}});
                        if tx.send(line(ev)).await.is_err() {
                            return;
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("a valid response")
}

/// A CA, and a server certificate it signed for `ip` (and localhost).
/// Returns (server cert PEM, server key PEM, CA PEM).
fn certificates(ip: IpAddr) -> anyhow::Result<(String, String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "weft lab kubernetes CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "kubernetes".to_string()])?;
    params.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    for a in [ip, IpAddr::from([127, 0, 0, 1])] {
        if !a.is_unspecified() {
            params.subject_alt_names.push(SanType::IpAddress(a));
        }
    }
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem(), ca.pem()))
}

fn tls_config(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategic_merge_merges_conditions_by_type_and_deletes_nulls() {
        let mut node = json!({"metadata": {"annotations": {"a": "1", "b": "2"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}], "addresses": [{"type": "InternalIP", "address": "x"}]},
            "spec": {"podCIDRs": ["10.0.0.0/24"]}});
        strategic_merge(
            &mut node,
            &json!({"metadata": {"annotations": {"a": null, "c": "3"}},
                    "status": {"conditions": [{"type": "NetworkUnavailable", "status": "False"},
                                              {"type": "Ready", "reason": "KubeletReady"}]},
                    "spec": {"podCIDRs": ["10.0.1.0/24"]}}),
            "",
        );
        assert_eq!(node["metadata"]["annotations"], json!({"b": "2", "c": "3"}));
        assert_eq!(
            node["status"]["conditions"],
            json!([{"type": "Ready", "status": "True", "reason": "KubeletReady"},
                   {"type": "NetworkUnavailable", "status": "False"}])
        );
        assert_eq!(node["spec"]["podCIDRs"], json!(["10.0.1.0/24"]), "other lists are replaced");
    }

    #[test]
    fn rules_allow_exactly_their_verbs() {
        let rules = vec![
            Rule {
                api_groups: vec!["".into()],
                resources: vec!["nodes".into()],
                verbs: vec!["get".into(), "list".into()],
            },
            Rule { api_groups: vec!["".into()], resources: vec!["nodes/status".into()], verbs: vec!["patch".into()] },
        ];
        assert!(allows(&rules, "get", "nodes", ""));
        assert!(allows(&rules, "patch", "nodes", "status"));
        assert!(!allows(&rules, "patch", "nodes", ""));
        assert!(!allows(&rules, "watch", "nodes", ""));
        let used = vec![("get".to_string(), "nodes".to_string(), String::new())];
        assert_eq!(
            unused(&rules, &used),
            vec![("nodes".into(), "list".into()), ("nodes/status".into(), "patch".into())]
        );
    }

    #[test]
    fn percent_decoding_of_selectors() {
        assert_eq!(percent_decode("metadata.name%3Dn1"), "metadata.name=n1");
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}
