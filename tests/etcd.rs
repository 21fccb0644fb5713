//! The etcd datastore against a real etcd (`/usr/bin/etcd`, Debian
//! `etcd-server`), one server per test on free loopback ports.

mod common_etcd;

use std::net::Ipv4Addr;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use common_etcd::EtcdServer;
use weft_control::datastore::{Lease, NetworkConfig};
use weft_control::etcd::{EtcdStore, LeaseEvent, StoreError, Unreachable, DEFAULT_PREFIX};
use weft_control::etcd_tls::{EtcdSecurity, HandshakeError, TlsFile};
use weft_control::subnet::SubnetKey;
use weft_lab::etcd_certs::EtcdCerts;

const TIMEOUT: Duration = Duration::from_secs(2);
const DAY: Duration = Duration::from_secs(24 * 3600);

fn connect(etcd: &EtcdServer) -> EtcdStore {
    EtcdStore::connect(&etcd.endpoints(), DEFAULT_PREFIX, TIMEOUT).expect("connect to the test etcd")
}

fn key(s: &str) -> SubnetKey {
    SubnetKey::parse(s).expect("test key")
}

fn lease(ip: [u8; 4], mac_last: u8) -> Lease {
    Lease {
        public_ip: Some(Ipv4Addr::from(ip)),
        public_ipv6: None,
        backend_type: "vxlan".into(),
        backend_data: serde_json::json!({"VNI": 1, "VtepMAC": format!("0a:58:0a:f4:{mac_last:02x}:00")}),
        backend_v6_data: None,
    }
}

/// A store call whose result is only checked for its error.
type Call<'a> = Box<dyn Fn() -> Result<(), StoreError> + 'a>;

/// Reads events until `n` have arrived or 10 s have passed.
fn collect(watch: &mut weft_control::etcd::Watch, n: usize) -> Vec<LeaseEvent> {
    let until = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < until {
        out.extend(watch.next(Duration::from_millis(500)).expect("watch"));
    }
    out
}

#[test]
fn network_config_round_trips() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd);
    assert!(matches!(store.network_config(), Err(StoreError::NoConfig { .. })));
    let cfg = NetworkConfig::parse(
        br#"{"Network":"10.244.0.0/16","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"vxlan","VNI":1}}"#,
    )
    .unwrap();
    store.put_network_config(&cfg).unwrap();
    assert_eq!(store.network_config().unwrap(), cfg);
    // A prefix of our own sees nothing of Flannel's.
    let other = EtcdStore::connect(&etcd.endpoints(), "/weft/test/", TIMEOUT).unwrap();
    assert!(matches!(other.network_config(), Err(StoreError::NoConfig { .. })));
}

#[test]
fn creation_succeeds_only_for_an_absent_key() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd);
    let k = key("10.244.1.0-24");
    let id = store.create_lease(&k, &lease([192, 168, 77, 1], 1), DAY).unwrap();
    assert!(id.is_some());
    assert_eq!(store.create_lease(&k, &lease([192, 168, 77, 9], 9), DAY).unwrap(), None);
    assert_eq!(store.leases().unwrap().leases[&k], lease([192, 168, 77, 1], 1), "the first value stays");

    // Five threads race for one key on one shared store: exactly one wins.
    let k = key("10.244.7.0-24");
    let start = Barrier::new(5);
    let results: Vec<Option<i64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..5u8)
            .map(|i| {
                let (store, start, k) = (&store, &start, &k);
                s.spawn(move || {
                    start.wait();
                    store.create_lease(k, &lease([192, 168, 77, 10 + i], 10 + i), DAY).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|r| r.is_some()).count(), 1, "{results:?}");
    let winner = results.iter().position(Option::is_some).unwrap() as u8;
    assert_eq!(store.leases().unwrap().leases[&k], lease([192, 168, 77, 10 + winner], 10 + winner));
}

#[test]
fn leases_expire_unless_renewed() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd);
    let ttl = Duration::from_secs(2);
    let (idle, kept) = (key("10.244.1.0-24"), key("10.244.2.0-24"));
    let idle_id = store.create_lease(&idle, &lease([192, 168, 77, 1], 1), ttl).unwrap().unwrap();
    let kept_id = store.create_lease(&kept, &lease([192, 168, 77, 2], 2), ttl).unwrap().unwrap();
    let started = Instant::now();
    // Renew one every half second for 5 s, well past the other's expiry.
    while started.elapsed() < Duration::from_secs(5) {
        let left = store.renew(kept_id).unwrap();
        assert!(left > Duration::ZERO && left <= ttl, "{left:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let leases = store.leases().unwrap().leases;
    assert!(!leases.contains_key(&idle), "the lease that was not renewed is gone");
    assert!(leases.contains_key(&kept), "the renewed lease stays");
    assert!(matches!(store.renew(idle_id), Err(StoreError::LeaseNotFound { id }) if id == idle_id));
}

#[test]
fn reclaim_takes_back_only_this_nodes_lease() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd);
    let k = key("10.244.3.0-24");
    let old_id = store.create_lease(&k, &lease([192, 168, 77, 3], 3), DAY).unwrap().unwrap();

    // Another node (another PublicIP) may not take it.
    assert_eq!(store.reclaim_lease(&k, &lease([192, 168, 77, 4], 4), DAY).unwrap(), None);
    assert_eq!(store.leases().unwrap().leases[&k], lease([192, 168, 77, 3], 3));

    // The same node after a restart (same PublicIP, new VTEP MAC) may.
    let restarted = lease([192, 168, 77, 3], 0x33);
    let new_id = store.reclaim_lease(&k, &restarted, DAY).unwrap().expect("reclaimed");
    assert_ne!(new_id, old_id);
    assert_eq!(store.leases().unwrap().leases[&k], restarted);
    store.renew(new_id).unwrap();

    // A key that vanished cannot be reclaimed.
    store.delete_lease(&k).unwrap();
    assert_eq!(store.reclaim_lease(&k, &restarted, DAY).unwrap(), None);
    assert!(store.leases().unwrap().leases.is_empty());
}

#[test]
fn watch_sees_puts_and_deletes_in_order() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd);
    store.put_network_config(&NetworkConfig::parse(br#"{"Network":"10.244.0.0/16"}"#).unwrap()).unwrap();
    let listing = store.leases().unwrap();
    let mut watch = store.watch(listing.revision).unwrap();
    assert_eq!(watch.next(Duration::from_millis(100)).unwrap(), vec![], "nothing happened yet");

    let (a, b) = (key("10.244.1.0-24"), key("10.244.2.0-24&fd00:0:0:2::-64"));
    store.create_lease(&a, &lease([192, 168, 77, 1], 1), DAY).unwrap().unwrap();
    store.create_lease(&b, &lease([192, 168, 77, 2], 2), DAY).unwrap().unwrap();
    store.put_network_config(&NetworkConfig::parse(br#"{"Network":"10.245.0.0/16"}"#).unwrap()).unwrap();
    store.delete_lease(&a).unwrap();
    store.put_lease_raw("10.244.2.0-24&fd00:0:0:2::-64", "not json").unwrap();

    let events = collect(&mut watch, 4);
    assert_eq!(events.len(), 4, "{events:?}");
    assert_eq!(events[0], LeaseEvent::Put(a, lease([192, 168, 77, 1], 1)));
    assert_eq!(events[1], LeaseEvent::Put(b, lease([192, 168, 77, 2], 2)));
    assert_eq!(events[2], LeaseEvent::Delete(a), "the config change is not a lease event");
    assert!(
        matches!(&events[3], LeaseEvent::Invalid { key, .. } if key == "10.244.2.0-24&fd00:0:0:2::-64"),
        "{:?}",
        events[3]
    );
    let last = watch.revision();
    assert_eq!(last, store.leases().unwrap().revision);

    // A new watch from the last revision handed out misses nothing and
    // repeats nothing.
    let mut again = store.watch(last).unwrap();
    store.delete_lease(&b).unwrap();
    assert_eq!(collect(&mut again, 1), vec![LeaseEvent::Delete(b)]);
}

#[test]
fn watch_from_a_compacted_revision_says_compacted() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd);
    let start = store.leases().unwrap().revision;
    for i in 1..=3u8 {
        store.create_lease(&key(&format!("10.244.{i}.0-24")), &lease([192, 168, 77, i], i), DAY).unwrap().unwrap();
    }
    let now = store.leases().unwrap().revision;
    etcd.compact(now);
    let mut watch = store.watch(start).unwrap();
    match watch.next(TIMEOUT) {
        Err(StoreError::Compacted { from, compacted }) => {
            assert_eq!(from, start + 1);
            assert_eq!(compacted, now);
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    // From the current revision, watching works again.
    let mut watch = store.watch(now).unwrap();
    store.delete_lease(&key("10.244.1.0-24")).unwrap();
    assert_eq!(collect(&mut watch, 1), vec![LeaseEvent::Delete(key("10.244.1.0-24"))]);
}

#[test]
fn values_written_by_flannel_are_listed() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd);
    store
        .put_lease_raw(
            "10.244.2.0-24",
            r#"{"PublicIP":"192.168.77.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0a:58:0a:f4:02:00"}}"#,
        )
        .unwrap();
    store.put_lease_raw("10.244.9.9-24", r#"{"BackendType":"vxlan"}"#).unwrap();
    store.put_lease_raw("10.244.3.0-24", r#"{"PublicIP":"300.0.0.1","BackendType":"vxlan"}"#).unwrap();
    let listing = store.leases().unwrap();
    assert!(listing.revision > 0);
    assert_eq!(listing.leases.len(), 1, "{listing:?}");
    let l = &listing.leases[&key("10.244.2.0-24")];
    assert_eq!(l, &lease([192, 168, 77, 2], 2));
    assert_eq!(l.vxlan_data(false).unwrap().vtep_mac, [0x0a, 0x58, 0x0a, 0xf4, 2, 0]);
    let bad: Vec<&str> = listing.bad.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(bad, ["10.244.3.0-24", "10.244.9.9-24"], "{:?}", listing.bad);
}

#[test]
fn a_dead_etcd_fails_calls_within_the_timeout() {
    let mut etcd = EtcdServer::start();
    let timeout = Duration::from_secs(1);
    let store = EtcdStore::connect(&etcd.endpoints(), DEFAULT_PREFIX, timeout).unwrap();
    let k = key("10.244.1.0-24");
    let id = store.create_lease(&k, &lease([192, 168, 77, 1], 1), DAY).unwrap().unwrap();
    let mut watch = store.watch(store.leases().unwrap().revision).unwrap();
    etcd.stop();

    // Allow for scheduling on a loaded machine, not for a hang.
    let bound = timeout + Duration::from_millis(500);
    let started = Instant::now();
    let err = watch.next(Duration::from_secs(5)).unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    assert!(started.elapsed() < bound, "the broken watch took {:?}", started.elapsed());

    let calls: [(&str, Call<'_>); 7] = [
        ("network_config", Box::new(|| store.network_config().map(drop))),
        ("leases", Box::new(|| store.leases().map(drop))),
        ("create_lease", Box::new(|| store.create_lease(&k, &lease([192, 168, 77, 1], 1), DAY).map(drop))),
        ("reclaim_lease", Box::new(|| store.reclaim_lease(&k, &lease([192, 168, 77, 1], 1), DAY).map(drop))),
        ("renew", Box::new(|| store.renew(id).map(drop))),
        ("delete_lease", Box::new(|| store.delete_lease(&k))),
        ("watch", Box::new(|| store.watch(0).map(drop))),
    ];
    for (name, call) in calls {
        let started = Instant::now();
        let err = call().unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{name}: {err:?}");
        assert!(started.elapsed() < bound, "{name} took {:?}", started.elapsed());
    }

    // Connecting to a dead endpoint fails the same way.
    let started = Instant::now();
    let err = EtcdStore::connect(&etcd.endpoints(), DEFAULT_PREFIX, timeout).unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    assert!(started.elapsed() < bound, "connect took {:?}", started.elapsed());
    assert!(matches!(EtcdStore::connect(&[], DEFAULT_PREFIX, timeout), Err(StoreError::Endpoint { .. })));
}

#[test]
fn a_hung_etcd_times_out_and_recovers() {
    let etcd = EtcdServer::start();
    let timeout = Duration::from_millis(500);
    let store = EtcdStore::connect(&etcd.endpoints(), DEFAULT_PREFIX, timeout).unwrap();
    let k = key("10.244.1.0-24");
    // While etcd runs, a 500 ms timeout can still fire on a loaded 2-core
    // machine (a slow fsync). The lease is made through a patient store (a
    // retried creation could find its own first try); the idempotent calls
    // outside the frozen window retry on the store under test until a
    // deadline, and the test fails if one never succeeds.
    let patient = EtcdStore::connect(&etcd.endpoints(), DEFAULT_PREFIX, Duration::from_secs(10)).unwrap();
    let id = patient.create_lease(&k, &lease([192, 168, 77, 1], 1), DAY).unwrap().unwrap();
    let revision = patient.leases().unwrap().revision;
    let mut watch = until_answered("watch", || store.watch(revision));
    etcd.freeze();

    let bound = timeout + Duration::from_millis(500);
    for (name, result) in [
        ("leases", store.leases().map(drop)),
        ("renew", store.renew(id).map(drop)),
        ("create_lease", store.create_lease(&key("10.244.2.0-24"), &lease([192, 168, 77, 2], 2), DAY).map(drop)),
        ("watch", store.watch(0).map(drop)),
    ] {
        assert!(
            matches!(result, Err(StoreError::Unavailable { cause: Unreachable::Timeout(t), .. }) if t == timeout),
            "{name}: {result:?}"
        );
    }
    let started = Instant::now();
    assert!(matches!(
        EtcdStore::connect(&etcd.endpoints(), DEFAULT_PREFIX, timeout),
        Err(StoreError::Unavailable { cause: Unreachable::Timeout(_), .. })
    ));
    assert!(started.elapsed() < bound, "connect took {:?}", started.elapsed());
    // A quiet watch is not an error: it just has nothing to say.
    assert_eq!(watch.next(Duration::from_millis(200)).unwrap(), vec![]);

    etcd.thaw();
    until_answered("renew after thaw", || store.renew(id));
    until_answered("delete after thaw", || store.delete_lease(&k));
    assert_eq!(collect(&mut watch, 1), vec![LeaseEvent::Delete(k)]);
}

/// Runs `call` until it returns anything but a timeout, for at most 10 s;
/// panics on any other error or if it keeps timing out.
fn until_answered<T>(what: &str, mut call: impl FnMut() -> Result<T, StoreError>) -> T {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match call() {
            Ok(v) => return v,
            Err(StoreError::Unavailable { cause: Unreachable::Timeout(_), .. }) if Instant::now() < until => {}
            Err(e) => panic!("{what}: {e:?}"),
        }
    }
}

/// A temporary directory for certificates, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("weft-etcd-certs-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn security(ca: &EtcdCerts, client: &EtcdCerts) -> EtcdSecurity {
    EtcdSecurity {
        ca_file: Some(ca.ca.clone()),
        cert_file: Some(client.client_cert.clone()),
        key_file: Some(client.client_key.clone()),
        ..EtcdSecurity::default()
    }
}

#[test]
fn tls_etcd_takes_its_certificates_and_refuses_others_without_calling_it_an_outage() {
    let dir = TempDir::new("tls");
    let certs = EtcdCerts::make(&dir.0.join("lab"), "weft test CA", Ipv4Addr::LOCALHOST.into()).unwrap();
    let stranger = EtcdCerts::make(&dir.0.join("other"), "another CA", Ipv4Addr::LOCALHOST.into()).unwrap();
    let mut etcd = EtcdServer::start_tls(&certs);
    assert!(etcd.endpoint.starts_with("https://"));

    let store = EtcdStore::connect_with(&etcd.endpoints(), DEFAULT_PREFIX, TIMEOUT, &security(&certs, &certs))
        .expect("the right CA and client certificate");
    let k = key("10.244.1.0-24");
    assert!(store.create_lease(&k, &lease([192, 168, 77, 1], 1), DAY).unwrap().is_some());
    assert!(store.leases().unwrap().leases.contains_key(&k));

    let refused = |sec: &EtcdSecurity| {
        let started = Instant::now();
        let e = EtcdStore::connect_with(&etcd.endpoints(), DEFAULT_PREFIX, TIMEOUT, sec).unwrap_err();
        assert!(started.elapsed() < TIMEOUT + Duration::from_millis(500), "refused at once: {:?}", started.elapsed());
        e
    };
    // etcd's certificate is not signed by the CA given.
    match refused(&security(&stranger, &certs)) {
        StoreError::Tls(HandshakeError::Refused { file: TlsFile::Ca, source, .. }) => {
            assert!(source.to_string().contains("certificate"), "{source}");
        }
        other => panic!("wrong CA: {other:?}"),
    }
    // A client certificate from another CA, and none at all.
    match refused(&security(&certs, &stranger)) {
        StoreError::Tls(HandshakeError::Refused { file: TlsFile::Cert, .. }) => {}
        other => panic!("foreign client certificate: {other:?}"),
    }
    let server_only = EtcdSecurity { ca_file: Some(certs.ca.clone()), ..EtcdSecurity::default() };
    match refused(&server_only) {
        StoreError::Tls(HandshakeError::Refused { file: TlsFile::Cert, .. }) => {}
        other => panic!("no client certificate: {other:?}"),
    }
    // Plain HTTP is not served.
    let plain = etcd.endpoint.replacen("https://", "http://", 1);
    assert!(EtcdStore::connect(&[plain], DEFAULT_PREFIX, TIMEOUT).is_err());

    // With the right files, a dead etcd is still an outage, not a refusal.
    etcd.stop();
    let err = store.leases().unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    let err =
        EtcdStore::connect_with(&etcd.endpoints(), DEFAULT_PREFIX, TIMEOUT, &security(&certs, &certs)).unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
}

#[test]
fn a_user_survives_token_expiry_and_a_wrong_password_is_an_auth_refusal() {
    // Tokens that live one second: the store must authenticate again by
    // itself, as it would every 5 minutes with etcd's default.
    let etcd = EtcdServer::start_with_flags(&["--auth-token-ttl=1"]);
    etcd.enable_auth("pw-for-test");
    let user =
        |pw: &str| EtcdSecurity { username: Some("root".into()), password: Some(pw.into()), ..EtcdSecurity::default() };
    let store = EtcdStore::connect_with(&etcd.endpoints(), DEFAULT_PREFIX, TIMEOUT, &user("pw-for-test")).unwrap();
    let k = key("10.244.1.0-24");
    let id = store.create_lease(&k, &lease([192, 168, 77, 1], 1), DAY).unwrap().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(store.leases().unwrap().leases.contains_key(&k), "listing after the token expired");
    assert!(store.renew(id).unwrap() > Duration::from_secs(3600), "renewal after the token expired");

    match EtcdStore::connect_with(&etcd.endpoints(), DEFAULT_PREFIX, TIMEOUT, &user("wrong")) {
        Err(StoreError::Auth { user, .. }) => assert_eq!(user, "root"),
        other => panic!("wrong password: {other:?}"),
    }
    // No user at all: etcd says no, which is not an outage.
    match EtcdStore::connect(&etcd.endpoints(), DEFAULT_PREFIX, TIMEOUT) {
        Err(StoreError::Refused { .. }) => {}
        other => panic!("no user: {other:?}"),
    }
}
