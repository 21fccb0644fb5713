//! `/metrics` (Prometheus text), `/healthz` and `/readyz` over plain HTTP/1.0.
//!
//! A tiny server on its own thread: one request per connection, a handful of
//! fixed paths, bounded request size and time. It reads counters; it never
//! blocks the data plane.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
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
}

impl MetricsState {
    /// Whether every worker is running.
    pub fn healthy(&self) -> bool {
        self.workers.iter().all(|w| !w.stopped.load(Relaxed))
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let sum = |f: fn(&WorkerCounters) -> u64| self.workers.iter().map(|w| f(w)).sum::<u64>();
        let totals: [(&str, &str, u64); 11] = [
            (
                "tun_rx_packets",
                "Packets read from the TUN device (pod to tunnel).",
                sum(|w| w.tun_rx_packets.load(Relaxed)),
            ),
            ("tun_rx_bytes", "Bytes read from the TUN device.", sum(|w| w.tun_rx_bytes.load(Relaxed))),
            ("udp_tx_packets", "Encapsulated datagrams sent on the underlay.", sum(|w| w.udp_tx_packets.load(Relaxed))),
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
        let per_mb = if moved == 0 { 0.0 } else { syscalls as f64 / (moved as f64 / 1e6) };
        let _ = writeln!(
            out,
            "# HELP weft_syscalls_per_mb Packet-path syscalls per MB of pod traffic moved (TUN bytes read plus written), since start.\n# TYPE weft_syscalls_per_mb gauge\nweft_syscalls_per_mb {per_mb:.1}"
        );
        for (name, help, v) in totals {
            let _ = writeln!(
                out,
                "# HELP weft_{name}_total {help}\n# TYPE weft_{name}_total counter\nweft_{name}_total {v}"
            );
        }
        let _ = writeln!(out, "# HELP weft_drops_total Packets dropped, by reason.\n# TYPE weft_drops_total counter");
        for cause in DropCause::all() {
            let v: u64 = self.workers.iter().map(|w| w.drops(cause)).sum();
            let _ = writeln!(out, "weft_drops_total{{reason=\"{}\"}} {v}", cause.label());
        }
        let snapshot = self.snapshot.lock().map(|s| s.clone()).unwrap_or_default();
        let per_peer: [(&str, &str); 4] = [
            ("peer_tx_packets", "Packets sent to a remote node."),
            ("peer_tx_bytes", "Inner bytes sent to a remote node."),
            ("peer_rx_packets", "Packets received from a remote node."),
            ("peer_rx_bytes", "Inner bytes received from a remote node."),
        ];
        for (i, (name, help)) in per_peer.iter().enumerate() {
            let _ = writeln!(out, "# HELP weft_{name}_total {help}\n# TYPE weft_{name}_total counter");
            for p in snapshot.peers() {
                let c = &p.counters;
                let v = [&c.tx_packets, &c.tx_bytes, &c.rx_packets, &c.rx_bytes][i].load(Relaxed);
                let _ = writeln!(
                    out,
                    "weft_{name}_total{{node=\"{}\",public_ip=\"{}\"}} {v}",
                    p.name,
                    p.underlay_addrs().map(|a| a.to_string()).collect::<Vec<_>>().join(",")
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP weft_peers Remote nodes known.\n# TYPE weft_peers gauge\nweft_peers {}",
            snapshot.peers().len()
        );
        let _ = writeln!(
            out,
            "# HELP weft_workers Worker threads.\n# TYPE weft_workers gauge\nweft_workers {}",
            self.workers.len()
        );
        out
    }
}

/// Longest request accepted, in bytes: a request line and a few headers.
const MAX_REQUEST: usize = 4096;

/// Binds `addr` and serves on a background thread.
pub fn serve(addr: SocketAddr, state: Arc<MetricsState>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    std::thread::Builder::new().name("weft-metrics".into()).spawn(move || {
        for conn in listener.incoming().flatten() {
            let _ = handle(conn, &state);
        }
    })?;
    Ok(())
}

fn handle(mut conn: TcpStream, state: &MetricsState) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; MAX_REQUEST];
    let mut n = 0;
    while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let request = String::from_utf8_lossy(&buf[..n]);
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match path {
        "/metrics" => ("200 OK", state.render()),
        "/healthz" if state.healthy() => ("200 OK", "ok\n".to_string()),
        "/healthz" => ("503 Service Unavailable", "a worker has stopped\n".to_string()),
        "/readyz" if state.ready.load(Relaxed) && state.healthy() => ("200 OK", "ready\n".to_string()),
        "/readyz" => ("503 Service Unavailable", "not ready\n".to_string()),
        _ => ("404 Not Found", "try /metrics, /healthz or /readyz\n".to_string()),
    };
    write!(
        conn,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
