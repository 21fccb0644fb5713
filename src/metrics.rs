//! `/metrics` (Prometheus text), `/healthz` and `/readyz` over HTTP/1.
//!
//! hyper on a thread of its own: every connection is served concurrently, so
//! a client that connects and sends nothing (or reads slowly) never holds up
//! `/healthz`; one that sends no request within [`HEADER_TIMEOUT`] is
//! dropped. It reads counters; it never blocks the data plane.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use weft_engine::counters::DropCause;
use weft_engine::{Snapshot, WorkerCounters};

/// What the endpoints report on.
pub struct MetricsState {
    /// Per-worker counters.
    pub workers: Vec<Arc<WorkerCounters>>,
    /// The snapshot the workers forward with (for per-peer counters).
    pub snapshot: Mutex<Arc<Snapshot>>,
    /// Set once the device, address and routes are in place.
    pub ready: AtomicBool,
    /// A rootless node's userspace stack.
    pub netstack: Option<Arc<weft_netstack::Counters>>,
    /// The eBPF data plane, when it runs (its counters live in its maps).
    pub ebpf: Mutex<Option<weft_engine::ebpf::EbpfPlane>>,
}

impl MetricsState {
    /// Whether every worker is running.
    pub fn healthy(&self) -> bool {
        self.workers.iter().all(|w| !w.stopped.load(Relaxed))
    }

    /// The exposition, in the OpenMetrics text format (which Prometheus
    /// reads), written by prometheus-client: names, help, types and label
    /// escaping are the crate's.
    pub fn render(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(self.sample()));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    /// Every value, read once.
    fn sample(&self) -> Sample {
        let sum = |f: fn(&WorkerCounters) -> u64| self.workers.iter().map(|w| f(w)).sum::<u64>();
        let totals = vec![
            (
                "tun_rx_packets",
                "Packets read from the TUN device (pod to tunnel).",
                sum(|w| w.tun_rx_packets.load(Relaxed)),
            ),
            ("tun_rx_bytes", "Bytes read from the TUN device.", sum(|w| w.tun_rx_bytes.load(Relaxed))),
            ("udp_tx_packets", "Encapsulated datagrams sent on the underlay.", sum(|w| w.udp_tx_packets.load(Relaxed))),
            (
                "udp_gso_refused",
                "UDP_SEGMENT sends the kernel refused (segments above the underlay MTU, or no UDP GSO), sent again \
                 one datagram per send.",
                sum(|w| w.udp_gso_refused.load(Relaxed)),
            ),
            ("udp_rx_packets", "Datagrams received on the underlay.", sum(|w| w.udp_rx_packets.load(Relaxed))),
            ("udp_rx_bytes", "UDP payload bytes received on the underlay.", sum(|w| w.udp_rx_bytes.load(Relaxed))),
            (
                "tun_tx_packets",
                "Packets written to the TUN device (tunnel to pod).",
                sum(|w| w.tun_tx_packets.load(Relaxed)),
            ),
            ("tun_tx_bytes", "Bytes written to the TUN device.", sum(|w| w.tun_tx_bytes.load(Relaxed))),
            (
                "csum_completed",
                "Inner checksums left partial by a sender's offload, completed.",
                sum(|w| w.csum_completed.load(Relaxed)),
            ),
            (
                "sw_segmented",
                "Super-packets cut in software or passed on as GSO (TUN TSO/USO reads, oversized received TCP).",
                sum(|w| w.sw_segmented.load(Relaxed)),
            ),
            (
                "gro_merged",
                "Received segments coalesced into an earlier one before the TUN write.",
                sum(|w| w.gro_merged.load(Relaxed)),
            ),
            ("syscalls", "System calls made on the packet path.", sum(|w| w.syscalls.load(Relaxed))),
        ];
        // Pod bytes moved through the TUN, both directions.
        let moved = sum(|w| w.tun_rx_bytes.load(Relaxed) + w.tun_tx_bytes.load(Relaxed));
        let syscalls = sum(|w| w.syscalls.load(Relaxed));
        let syscalls_per_mb = if moved == 0 { 0.0 } else { syscalls as f64 / (moved as f64 / 1e6) };
        let drops = DropCause::all().map(|c| (c.label(), self.workers.iter().map(|w| w.drops(c)).sum())).collect();
        let snapshot = self.snapshot.lock().map(|s| s.clone()).unwrap_or_default();
        let peers = snapshot
            .peers()
            .iter()
            .map(|p| {
                let c = &p.counters;
                let ips = p.underlay_addrs().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
                let v = [&c.tx_packets, &c.tx_bytes, &c.rx_packets, &c.rx_bytes].map(|a| a.load(Relaxed));
                (escape_label(&p.name), escape_label(&ips), v)
            })
            .collect();
        let crypto =
            self.workers.iter().map(|w| [w.wg_sealed_bytes.load(Relaxed), w.wg_opened_bytes.load(Relaxed)]).collect();
        let netstack = self.netstack.as_ref().map(|n| n.pairs().to_vec()).unwrap_or_default();
        let ebpf = match self.ebpf.lock().as_deref() {
            Ok(Some(p)) => match p.counters() {
                Ok(c) => weft_engine::ebpf::COUNTERS.iter().copied().zip(c).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "reading the eBPF counters");
                    Vec::new()
                }
            },
            _ => Vec::new(),
        };
        Sample { totals, syscalls_per_mb, drops, peers, workers: self.workers.len() as i64, crypto, netstack, ebpf }
    }
}

/// A label value as the exposition format wants it: prometheus-client 0.24
/// writes label values as given, so backslash, double quote and line feed
/// are escaped here (node names come from the datastore).
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// One scrape's values, encoded by [`Collector::encode`]; label values
/// already escaped.
#[derive(Debug)]
struct Sample {
    totals: Vec<(&'static str, &'static str, u64)>,
    syscalls_per_mb: f64,
    drops: Vec<(&'static str, u64)>,
    /// Name, underlay addresses, and tx/rx packets and bytes.
    peers: Vec<(String, String, [u64; 4])>,
    workers: i64,
    /// Per worker: WireGuard plaintext bytes sealed, ciphertext bytes opened.
    crypto: Vec<[u64; 2]>,
    /// A rootless node's userspace stack: name, help, value.
    netstack: Vec<(&'static str, &'static str, u64)>,
    /// The eBPF programs' counters, by what they count.
    ebpf: Vec<(&'static str, u64)>,
}

impl prometheus_client::collector::Collector for Sample {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let gauge = ConstGauge::new(self.syscalls_per_mb);
        gauge.encode(enc.encode_descriptor(
            "weft_syscalls_per_mb",
            "Packet-path syscalls per MB of pod traffic moved (TUN bytes read plus written), since start.",
            None,
            gauge.metric_type(),
        )?)?;
        for (name, help, v) in &self.totals {
            let c = ConstCounter::new(*v);
            c.encode(enc.encode_descriptor(&format!("weft_{name}"), help, None, c.metric_type())?)?;
        }
        let mut family = enc.encode_descriptor(
            "weft_drops",
            "Packets dropped, by reason.",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, v) in &self.drops {
            ConstCounter::new(*v).encode(family.encode_family(&[("reason", *reason)])?)?;
        }
        let per_peer = [
            ("weft_peer_tx_packets", "Packets sent to a remote node."),
            ("weft_peer_tx_bytes", "Inner bytes sent to a remote node."),
            ("weft_peer_rx_packets", "Packets received from a remote node."),
            ("weft_peer_rx_bytes", "Inner bytes received from a remote node."),
        ];
        for (i, (name, help)) in per_peer.iter().enumerate() {
            let mut family =
                enc.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
            for (node, ips, v) in &self.peers {
                let labels = [("node", node.as_str()), ("public_ip", ips.as_str())];
                ConstCounter::new(v[i]).encode(family.encode_family(&labels)?)?;
            }
        }
        let g = ConstGauge::new(self.peers.len() as i64);
        g.encode(enc.encode_descriptor("weft_peers", "Remote nodes known.", None, g.metric_type())?)?;
        let per_worker = [
            ("weft_worker_wg_sealed_bytes", "WireGuard plaintext bytes this worker sealed (for any worker's packets)."),
            (
                "weft_worker_wg_opened_bytes",
                "WireGuard ciphertext bytes this worker opened (for any worker's packets).",
            ),
        ];
        for (i, (name, help)) in per_worker.iter().enumerate() {
            let mut family =
                enc.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
            for (w, v) in self.crypto.iter().enumerate() {
                let worker = w.to_string();
                ConstCounter::new(v[i]).encode(family.encode_family(&[("worker", worker.as_str())])?)?;
            }
        }
        for (name, help, v) in &self.netstack {
            let name = format!("weft_netstack_{name}");
            if *name == *"weft_netstack_open" {
                let g = ConstGauge::new(*v as i64);
                g.encode(enc.encode_descriptor(&name, help, None, g.metric_type())?)?;
            } else {
                let c = ConstCounter::new(*v);
                c.encode(enc.encode_descriptor(&name, help, None, c.metric_type())?)?;
            }
        }
        if !self.ebpf.is_empty() {
            let mut family = enc.encode_descriptor(
                "weft_ebpf_packets",
                "Packets the eBPF data plane handled, by outcome (drop_*: refused and dropped in the kernel; \
                 egress_no_route, egress_error, ingress_to_userspace: left to the userspace engine).",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (what, v) in &self.ebpf {
                ConstCounter::new(*v).encode(family.encode_family(&[("what", *what)])?)?;
            }
        }
        let g = ConstGauge::new(self.workers);
        g.encode(enc.encode_descriptor("weft_workers", "Worker threads.", None, g.metric_type())?)?;
        let g = ConstGauge::new(1);
        let labels = [("version", env!("CARGO_PKG_VERSION")), ("arch", std::env::consts::ARCH)];
        g.encode(
            enc.encode_descriptor(
                "weft_build_info",
                "The binary's version and CPU architecture (always 1).",
                None,
                g.metric_type(),
            )?
            .encode_family(&labels)?,
        )?;
        Ok(())
    }
}

/// The OpenMetrics text format prometheus-client writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long a client may take to send its request headers: a client that
/// connects and says nothing is dropped after this, and meanwhile every
/// other client is served (each connection is its own task).
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Binds `addr` and serves on a background thread (hyper, HTTP/1, one task
/// per connection on a single-threaded runtime).
pub fn serve(addr: SocketAddr, state: Arc<MetricsState>) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("weft-metrics".into()).spawn(move || {
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let path = req.uri().path();
                        let (status, body) = respond(&state, path);
                        let ct = if path == "/metrics" { CONTENT_TYPE } else { "text/plain; charset=utf-8" };
                        let resp = hyper::Response::builder()
                            .status(status)
                            .header("content-type", ct)
                            .body(http_body_util::Full::new(bytes::Bytes::from(body)));
                        async move { resp }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    })?;
    Ok(())
}

/// The status and body for `path` (pure).
fn respond(state: &MetricsState, path: &str) -> (u16, String) {
    match path {
        "/metrics" => (200, state.render()),
        "/healthz" if state.healthy() => (200, "ok\n".to_string()),
        "/healthz" => (503, "a worker has stopped\n".to_string()),
        "/readyz" if state.ready.load(Relaxed) && state.healthy() => (200, "ready\n".to_string()),
        "/readyz" => (503, "not ready\n".to_string()),
        _ => (404, "try /metrics, /healthz or /readyz\n".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn label_values_are_escaped_and_every_family_is_typed() {
        let sample = Sample {
            totals: vec![("tun_rx_packets", "Packets.", 7)],
            syscalls_per_mb: 1.5,
            drops: vec![("short", 3)],
            peers: vec![(escape_label("evil\"node\n\\"), escape_label("192.0.2.1"), [1, 2, 3, 4])],
            workers: 2,
            crypto: vec![[10, 20], [30, 40]],
            netstack: vec![("open", "Open.", 3), ("refused_cap", "Refused.", 5)],
            ebpf: vec![("encapsulated", 7), ("drop_vni", 2)],
        };
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(sample));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(out.contains("weft_tun_rx_packets_total 7"), "{out}");
        assert!(out.contains("# TYPE weft_tun_rx_packets counter"), "{out}");
        assert!(out.contains(r#"weft_drops_total{reason="short"} 3"#), "{out}");
        assert!(out.contains(r#"weft_peer_rx_bytes_total{node="evil\"node\n\\",public_ip="192.0.2.1"} 4"#), "{out}");
        assert!(out.contains("weft_workers 2") && out.contains("weft_peers 1"), "{out}");
        assert!(out.contains(r#"weft_worker_wg_sealed_bytes_total{worker="1"} 30"#), "{out}");
        assert!(out.contains(r#"weft_worker_wg_opened_bytes_total{worker="0"} 20"#), "{out}");
        assert!(out.contains("weft_netstack_open 3") && out.contains("weft_netstack_refused_cap_total 5"), "{out}");
        assert!(out.contains("weft_ebpf_packets_total{what=\"encapsulated\"} 7"), "{out}");
        assert!(out.contains("weft_ebpf_packets_total{what=\"drop_vni\"} 2"), "{out}");
        let arch = format!(r#"arch="{}""#, std::env::consts::ARCH);
        assert!(
            out.lines().any(|l| l.starts_with("weft_build_info{") && l.contains(&arch) && l.ends_with(" 1")),
            "{out}"
        );
        assert!(out.trim_end().ends_with("# EOF"), "{out}");
    }

    #[test]
    fn a_silent_client_does_not_hold_up_healthz() {
        let state = Arc::new(MetricsState {
            workers: Vec::new(),
            snapshot: Mutex::new(Arc::new(Snapshot::default())),
            ready: AtomicBool::new(true),
            netstack: None,
            ebpf: Default::default(),
        });
        let addr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        serve(addr, state).unwrap();
        // One client connects and sends nothing; another half a request.
        let _silent = TcpStream::connect(addr).unwrap();
        let mut half = TcpStream::connect(addr).unwrap();
        half.write_all(b"GET /metr").unwrap();
        let started = Instant::now();
        let r = get(addr, "/healthz");
        assert!(r.lines().next().is_some_and(|l| l.contains(" 200 ")), "{r}");
        assert!(r.ends_with("ok\n"), "{r}");
        assert!(started.elapsed() < Duration::from_millis(900), "served at once: {:?}", started.elapsed());
        let r = get(addr, "/readyz");
        assert!(r.lines().next().is_some_and(|l| l.contains(" 200 ")), "{r}");
        let r = get(addr, "/nope");
        assert!(r.lines().next().is_some_and(|l| l.contains(" 404 ")), "{r}");
        assert!(get(addr, "/metrics").contains("weft_workers 0"));
        // The silent one is dropped after the header timeout.
        let mut silent = TcpStream::connect(addr).unwrap();
        silent.set_read_timeout(Some(HEADER_TIMEOUT * 3)).unwrap();
        let mut buf = [0u8; 64];
        assert!(silent.read(&mut buf).is_ok(), "closed by the server, not left hanging until the read times out");
    }
}
