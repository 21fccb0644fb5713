//! The Kubernetes subnet manager against the API server stand-in
//! (`weft_lab::apiserver`), on loopback. No real kube-apiserver can be installed
//! on these machines; the stand-in speaks the API server's HTTP contract for
//! Nodes (list with resourceVersion, watch streams with bookmarks, `410
//! Gone`, strategic-merge patches on `nodes/status`, a bearer token over
//! TLS), and the client on the other side is kube-rs, as in the agent.
//! The Node objects are shaped as a real cluster returns them
//! (tests/fixtures/kube/).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::wait_for;
use serde_json::{json, Value};
use weft_control::config::{AgentConfig, KubeSource};
use weft_control::datastore::StaticDatastore;
use weft_control::kube;
use weft_control::lease::Update;
use weft_lab::apiserver::ApiServer;

const TOKEN: &str = "test-token";

struct Setup {
    api: ApiServer,
    dir: tempdir::Dir,
}

mod tempdir {
    /// A directory removed when dropped.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Dir {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("weft-kube-{}-{tag}-{n}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn setup(tag: &str) -> Setup {
    let api = ApiServer::start(None, SocketAddr::from(([127, 0, 0, 1], 0)), TOKEN).unwrap();
    Setup { api, dir: tempdir::Dir::new(tag) }
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/kube/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// A Node as a kubelet registers it, with the pod CIDR the controller
/// manager assigned (or none).
fn bare_node(name: &str, ip: &str, pod_cidr: Option<&str>) -> Value {
    let mut n = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    });
    if let Some(c) = pod_cidr {
        n["spec"] = json!({"podCIDR": c, "podCIDRs": [c]});
    }
    n
}

impl Setup {
    fn config(&self, node: &str, ip: &str, token: &str) -> (AgentConfig, KubeSource) {
        let kc = self.dir.0.join(format!("{node}-{token}.yaml"));
        std::fs::write(&kc, self.api.kubeconfig_yaml(token)).unwrap();
        let pairs: BTreeMap<String, String> = [
            ("node-name", node),
            ("node-ip", ip),
            ("cluster-cidr", "10.42.0.0/16"),
            ("kube-subnet-mgr", "true"),
            ("kubeconfig", kc.to_str().unwrap()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let cfg = AgentConfig::from_pairs(&pairs).unwrap();
        let weft_control::config::DatastoreSource::Kube(src) = cfg.datastore.clone() else { panic!("kube datastore") };
        (cfg, src)
    }
}

/// The keeper running on its thread, with its views.
struct Running {
    views: crossbeam_channel::Receiver<Update>,
    up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    fn start(keeper: kube::Keeper) -> Running {
        let (tx, views) = crossbeam_channel::unbounded();
        let up = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (u, s) = (up.clone(), stop.clone());
        let thread = Some(std::thread::spawn(move || keeper.keep(tx, u, s)));
        Running { views, up, stop, thread }
    }

    /// Waits for a view that satisfies `ok`.
    fn wait_view(&self, what: &str, limit: Duration, ok: impl Fn(&StaticDatastore) -> bool) -> StaticDatastore {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.views.recv_timeout(left) {
                Ok(Update::View(v)) if ok(&v) => return v,
                Ok(_) => {}
                Err(_) => panic!("no view where {what} within {limit:?}"),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn keys(v: &StaticDatastore) -> Vec<String> {
    v.leases.keys().map(|k| k.to_string()).collect()
}

fn annotation(api: &ApiServer, node: &str, name: &str) -> Option<String> {
    api.node(node)?["metadata"]["annotations"][kube::annotation(name)].as_str().map(String::from)
}

#[test]
fn the_lease_is_the_pod_cidr_written_as_flannel_annotations_and_kernel_flannel_nodes_are_peers() {
    let s = setup("a");
    s.api.create_node(fixture("node-kernel-flannel.json")).unwrap();
    s.api.create_node(bare_node("n1", "192.168.77.1", Some("10.42.1.0/24"))).unwrap();
    let (mut cfg, src) = s.config("n1", "192.168.77.1", TOKEN);
    let (keeper, view) = kube::start(&mut cfg, &src, None).unwrap();
    let kernel = kube::node_lease(&serde_json::from_value(fixture("node-kernel-flannel.json")).unwrap(), &view.config)
        .unwrap()
        .expect("the fixture is a kernel Flannel node");
    assert!(view.leases.contains_key(&kernel.0), "{:?}", keys(&view));
    assert!(keys(&view).contains(&"10.42.1.0-24".to_string()), "{:?}", keys(&view));
    assert_eq!(annotation(&s.api, "n1", kube::KUBE_MANAGED).as_deref(), Some("true"));
    assert_eq!(annotation(&s.api, "n1", kube::BACKEND_TYPE).as_deref(), Some("vxlan"));
    assert_eq!(annotation(&s.api, "n1", kube::PUBLIC_IP).as_deref(), Some("192.168.77.1"));
    let data: Value = serde_json::from_str(&annotation(&s.api, "n1", kube::BACKEND_DATA).unwrap()).unwrap();
    assert_eq!(data["VNI"], 1);
    assert!(data["VtepMAC"].as_str().is_some_and(|m| m.len() == 17), "{data}");
    // Written through the status subresource, as Flannel does.
    assert!(s.api.requests().iter().any(|r| r.0 == "patch" && r.2 == "status"), "{:?}", s.api.requests());
    drop(keeper);
}

#[test]
fn the_network_is_marked_available_once_the_data_path_is_up() {
    let s = setup("c");
    s.api.create_node(bare_node("n1", "192.168.77.1", Some("10.42.1.0/24"))).unwrap();
    let (mut cfg, src) = s.config("n1", "192.168.77.1", TOKEN);
    let (keeper, _) = kube::start(&mut cfg, &src, None).unwrap();
    let r = Running::start(keeper);
    let condition = || {
        let n = s.api.node("n1").unwrap();
        n["status"]["conditions"].as_array().into_iter().flatten().find(|c| c["type"] == "NetworkUnavailable").cloned()
    };
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(condition(), None, "not before the data path is up");
    r.up.store(true, Relaxed);
    wait_for("NetworkUnavailable set", Duration::from_secs(5), || condition().is_some());
    let c = condition().unwrap();
    assert_eq!((c["status"].as_str(), c["reason"].as_str()), (Some("False"), Some("FlannelIsUp")));
    // The kubelet's own condition is kept: conditions merge by type.
    let n = s.api.node("n1").unwrap();
    let ready = n["status"]["conditions"].as_array().into_iter().flatten().find(|c| c["type"] == "Ready");
    assert_eq!(ready.and_then(|c| c["status"].as_str()), Some("True"), "{n}");
}

#[test]
fn start_waits_for_the_controller_manager_to_assign_a_pod_cidr() {
    let s = setup("w");
    s.api.create_node(bare_node("n1", "192.168.77.1", None)).unwrap();
    let (mut cfg, src) = s.config("n1", "192.168.77.1", TOKEN);
    let t = std::thread::spawn(move || kube::start(&mut cfg, &src, None).map(|(_, v)| keys(&v)));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!t.is_finished(), "start must wait while no pod CIDR is assigned");
    assert_eq!(annotation(&s.api, "n1", kube::KUBE_MANAGED), None, "nothing announced without a subnet");
    s.api.patch_node("n1", json!({"spec": {"podCIDR": "10.42.7.0/24", "podCIDRs": ["10.42.7.0/24"]}}), false).unwrap();
    let keys = t.join().unwrap().unwrap();
    assert_eq!(keys, vec!["10.42.7.0-24".to_string()]);
}

#[test]
fn a_bad_token_is_refused_at_start_not_waited_on() {
    let s = setup("t");
    s.api.create_node(bare_node("n1", "192.168.77.1", Some("10.42.1.0/24"))).unwrap();
    let (mut cfg, src) = s.config("n1", "192.168.77.1", "wrong-token");
    let started = Instant::now();
    let e = kube::start(&mut cfg, &src, None).expect_err("a bad token is refused");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(format!("{e:#}").contains("credentials"), "{e:#}");
}

#[test]
fn peers_come_and_go_with_the_watch_and_a_410_or_an_outage_is_caught_up() {
    let s = setup("p");
    s.api.create_node(bare_node("n1", "192.168.77.1", Some("10.42.1.0/24"))).unwrap();
    let (mut cfg, src) = s.config("n1", "192.168.77.1", TOKEN);
    let (keeper, first) = kube::start(&mut cfg, &src, None).unwrap();
    assert_eq!(keys(&first), vec!["10.42.1.0-24"]);
    let r = Running::start(keeper);
    let mut peer = fixture("node-kernel-flannel.json");
    let peer_name = peer["metadata"]["name"].as_str().unwrap().to_string();
    s.api.create_node(peer.clone()).unwrap();
    let kernel_key = {
        let n = serde_json::from_value(peer.clone()).unwrap();
        kube::node_lease(&n, &first.config).unwrap().unwrap().0
    };
    r.wait_view("the new peer is in", Duration::from_secs(10), |v| v.leases.contains_key(&kernel_key));
    // Its public address changes: the view follows.
    let moved = json!({"metadata": {"annotations": {kube::annotation(kube::PUBLIC_IP): "192.168.77.99"}}});
    s.api.patch_node(&peer_name, moved, true).unwrap();
    r.wait_view("the peer moved", Duration::from_secs(10), |v| {
        v.leases.get(&kernel_key).is_some_and(|l| l.public_ip == Some("192.168.77.99".parse().unwrap()))
    });
    // An outage with a change the watch misses, then the history before
    // it compacted: the watcher gets 410 Gone, lists again, catches up.
    let lists = || s.api.requests().iter().filter(|r| r.0 == "list").count();
    let lists_before = lists();
    s.api.pause();
    s.api.delete_node(&peer_name).unwrap();
    s.api.compact();
    std::thread::sleep(Duration::from_secs(2));
    s.api.resume().unwrap();
    r.wait_view("the deleted peer is gone", Duration::from_secs(15), |v| !v.leases.contains_key(&kernel_key));
    assert!(lists() > lists_before, "the watch from before the compaction got 410 and the watcher listed again");
    peer["metadata"]["name"] = json!("k-late");
    peer["spec"] = json!({"podCIDR": "10.42.9.0/24", "podCIDRs": ["10.42.9.0/24"]});
    s.api.create_node(peer).unwrap();
    let v = r.wait_view("a node added after the outage", Duration::from_secs(15), |v| {
        v.leases.keys().any(|k| k.to_string() == "10.42.9.0-24")
    });
    assert!(keys(&v).contains(&"10.42.1.0-24".to_string()), "our own lease stays in the view");
    // A Node whose annotations lost our lease (restored from a backup, an
    // operator's edit) gets them back.
    let wipe = json!({"metadata": {"annotations": {kube::annotation(kube::BACKEND_DATA): null}}});
    s.api.patch_node("n1", wipe, true).unwrap();
    wait_for("annotations written back", Duration::from_secs(10), || {
        annotation(&s.api, "n1", kube::BACKEND_DATA).is_some()
    });
}

#[test]
fn the_cluster_role_covers_every_call_the_agent_makes_and_nothing_more() {
    let s = setup("r");
    s.api.create_node(bare_node("n1", "192.168.77.1", Some("10.42.1.0/24"))).unwrap();
    s.api.create_node(bare_node("n2", "192.168.77.2", Some("10.42.2.0/24"))).unwrap();
    let (mut cfg, src) = s.config("n1", "192.168.77.1", TOKEN);
    let (keeper, _) = kube::start(&mut cfg, &src, None).unwrap();
    let r = Running::start(keeper);
    r.up.store(true, Relaxed);
    // Every path the agent has: start, watch, a peer change, the condition,
    // and writing its annotations back.
    s.api.patch_node("n2", json!({"metadata": {"labels": {"x": "y"}}}), false).unwrap();
    let wipe = json!({"metadata": {"annotations": {kube::annotation(kube::PUBLIC_IP): null}}});
    s.api.patch_node("n1", wipe, true).unwrap();
    wait_for("the agent did all its calls", Duration::from_secs(10), || {
        let n = s.api.node("n1").unwrap();
        let cond =
            n["status"]["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == "NetworkUnavailable");
        cond && annotation(&s.api, "n1", kube::PUBLIC_IP).is_some()
    });
    drop(r);
    let manifest = std::fs::read_to_string(format!("{}/deploy/weft.yaml", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let rules = weft_lab::apiserver::cluster_role_rules(&manifest, "weft").unwrap();
    let made = s.api.requests();
    for req in &made {
        assert!(weft_lab::apiserver::allows(&rules, &req.0, &req.1, &req.2), "the ClusterRole refuses {req:?}");
    }
    let unused = weft_lab::apiserver::unused(&rules, &made);
    assert!(unused.is_empty(), "the ClusterRole grants what the agent never uses: {unused:?}");
}

#[test]
fn the_manifest_deploys_what_the_agent_needs_and_no_more() {
    use serde::Deserialize as _;
    let text = std::fs::read_to_string(format!("{}/deploy/weft.yaml", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let docs: Vec<serde_yaml::Value> =
        serde_yaml::Deserializer::from_str(&text).map(|d| serde_yaml::Value::deserialize(d).unwrap()).collect();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]);
    let by_kind = |k: &str| docs.iter().find(|d| d["kind"].as_str() == Some(k)).unwrap();
    let ds = &by_kind("DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(ds["serviceAccountName"], by_kind("ServiceAccount")["metadata"]["name"]);
    assert_eq!(by_kind("ClusterRoleBinding")["subjects"][0]["name"], by_kind("ServiceAccount")["metadata"]["name"]);
    assert_eq!(by_kind("ClusterRoleBinding")["roleRef"]["name"], by_kind("ClusterRole")["metadata"]["name"]);
    assert_eq!(ds["hostNetwork"].as_bool(), Some(true));
    let agent = &ds["containers"][0];
    assert_eq!(agent["securityContext"]["privileged"].as_bool(), Some(false));
    let caps: Vec<&str> = agent["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert_eq!(caps, ["NET_ADMIN", "NET_RAW"]);
    let env: Vec<&str> = agent["env"].as_sequence().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
    assert!(env.contains(&"NODE_NAME"), "{env:?}");
    // The ConfigMap's files: Flannel's net-conf.json, a CNI conflist, and
    // an agent config this weft accepts.
    let data = &by_kind("ConfigMap")["data"];
    let net =
        weft_control::datastore::NetworkConfig::parse(data["net-conf.json"].as_str().unwrap().as_bytes()).unwrap();
    assert_eq!(net.network, Some("10.42.0.0/16".parse().unwrap()));
    let cni: Value = serde_json::from_str(data["cni-conf.json"].as_str().unwrap()).unwrap();
    assert_eq!(cni["plugins"][0]["type"], "flannel");
    let mut pairs = AgentConfig::pairs_from_yaml(data["config.yaml"].as_str().unwrap()).unwrap();
    pairs.insert("node-ip".into(), "192.168.1.10".into());
    let cfg = AgentConfig::from_pairs(&pairs).unwrap();
    assert!(matches!(cfg.datastore, weft_control::config::DatastoreSource::Kube(KubeSource { kubeconfig: None, .. })));
    let rules = weft_lab::apiserver::cluster_role_rules(&text, "weft").unwrap();
    assert_eq!(rules.len(), 2);
}

/// The stand-in itself, through kube-rs's client: the parts of the
/// contract the agent does not exercise on its own.
#[test]
fn the_stand_in_speaks_the_patch_types_status_semantics_and_bookmarks() {
    use ::kube::api::{Api, Patch, PatchParams, WatchEvent, WatchParams};
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Node;
    let s = setup("s");
    s.api.create_node(bare_node("n1", "192.168.77.1", Some("10.42.1.0/24"))).unwrap();
    let kc = s.dir.0.join("kc.yaml");
    std::fs::write(&kc, s.api.kubeconfig_yaml(TOKEN)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let kc = ::kube::config::Kubeconfig::read_from(&kc).unwrap();
        let cfg = ::kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
        let api: Api<Node> = Api::all(::kube::Client::try_from(cfg).unwrap());
        let pp = PatchParams::default();
        // JSON merge patch of the Node: labels change, status does not.
        let p = json!({"metadata": {"labels": {"a": "b"}}, "status": {"addresses": []}});
        let n = api.patch("n1", &pp, &Patch::Merge(p)).await.unwrap();
        assert_eq!(n.metadata.labels.unwrap()["a"], "b");
        assert_eq!(n.status.unwrap().addresses.unwrap().len(), 1, "a patch of the Node leaves its status");
        // JSON patch through status: the spec does not change.
        let ops: json_patch::Patch = serde_json::from_value(json!([
            {"op": "add", "path": "/metadata/annotations", "value": {"x": "1"}},
            {"op": "replace", "path": "/spec/podCIDR", "value": "10.42.99.0/24"}
        ]))
        .unwrap();
        let n = api.patch_status("n1", &pp, &Patch::<()>::Json(ops)).await.unwrap();
        assert_eq!(n.metadata.annotations.unwrap()["x"], "1");
        assert_eq!(n.spec.unwrap().pod_cidr.as_deref(), Some("10.42.1.0/24"), "a status patch leaves the spec");
        // A watch with bookmarks gets one while nothing changes.
        let rv = api.get("n1").await.unwrap().metadata.resource_version.unwrap();
        let mut w = api.watch(&WatchParams::default().timeout(5), &rv).await.unwrap().boxed();
        let ev = tokio::time::timeout(Duration::from_secs(4), w.next()).await.expect("an event within 4 s");
        assert!(matches!(ev, Some(Ok(WatchEvent::Bookmark(_)))), "{ev:?}");
        // Unknown Nodes are 404, as the real server answers.
        match api.get("nope").await {
            Err(::kube::Error::Api(e)) => assert_eq!(e.code, 404),
            other => panic!("{other:?}"),
        }
    });
}
