//! weft-lab: weft's tooling. `weft lab`, a small cluster of network
//! namespaces on one machine, `weft bench`, the system benchmarks run on
//! such a topology, and the stand-ins the labs and the tests run against (a
//! Kubernetes API server, certificates for etcd).
//!
//! ```text
//!                     underlay namespace <name>-ul: bridge br0, 192.168.77.0/24
//!        ┌──────────────────────────┼──────────────────────────┐
//!   <name>-n1 eth0 .1          <name>-n2 eth0 .2          <name>-n3 eth0 .3
//!   weft agent (weft0)         weft agent (weft0)         weft agent, or the kernel's
//!   cni0 10.244.1.1/24         cni0 10.244.2.1/24         flannel.1 (--peer kernel-vxlan)
//!        │                          │                          │
//!   <name>-n1p1 10.244.1.2     <name>-n2p1 10.244.2.2     <name>-n3p1 10.244.3.2
//! ```
//!
//! The lab writes the static datastore, starts one `weft agent` per node,
//! checks pod-to-pod reachability (ping every pair on different nodes, a
//! SHA-256-verified TCP transfer both ways between the first and the last
//! node), checks masquerade against a server in `<name>-inet` (a namespace
//! outside the cluster on the underlay bridge) and reads every agent's
//! counters. Everything it creates carries the lab's name as prefix, so
//! [`down`] removes it all, also after a crash.
//!
//! The lab's own code is in private modules, by what they do, and its API
//! is re-exported here (`weft_lab::up`, `weft_lab::Lab`):
//!
//! - `plan`: options, nodes, the static datastore (pure)
//! - `namespaces`: building and removing the namespaces, bridge, veths and
//!   pods ([`up`], [`down`])
//! - `agents`: starting, stopping and asking the weft agents (HTTP)
//! - `etcd`: the lab's etcd process, its TLS and its user
//! - `kube`: the Kubernetes API server stand-in the agents use
//! - `peers`: the kernel VXLAN and userspace WireGuard peers
//! - `multicloud`: clouds behind NAT gateways on an internet bridge, a
//!   node at home, and their checks (`weft lab --multicloud`)
//! - `checks`: ping, TCP transfer, masquerade, counters
//! - `capture`: tcpdump on the underlay, pcap frames
//!
//! Public modules: [`apiserver`] (the Kubernetes API stand-in),
//! [`bench`](mod@bench) (`weft bench`), [`etcd_certs`](mod@etcd_certs)
//! (throw-away certificates for etcd), [`netns`] (running things in network
//! namespaces).
//!
//! What it refuses to be: a dependency of production code. No production
//! crate (weft-tunnel, weft-engine, weft-uapi, weft-control, the `weft`
//! library) depends on it; only the `weft` binary links it, for its `lab`
//! and `bench` commands, and the tests use it. It runs agents as separate
//! processes (`weft agent`), so it needs none of the agent's code; it uses
//! weft-control for the shapes it writes and reads (datastore, leases, etcd,
//! CNI, keys), weft-uapi for WireGuard keys and weft-tunnel for the drop
//! reasons it reads back from the agents' counters. It needs root and changes the host (namespaces, links, processes) under
//! names that carry the lab's prefix, and nothing else.

#![forbid(unsafe_code)]

pub mod apiserver;
pub mod bench;
pub mod etcd_certs;
pub mod impair;
pub mod netns;

mod agents;
mod capture;
mod checks;
mod cli;
mod etcd;
mod kube;
mod multicloud;
mod namespaces;
mod peers;
mod plan;
pub mod rootless;

pub use agents::{emulated, http_ok, qemu_for, METRICS_PORT};
pub use capture::pcap_frames;
pub use checks::{source_seen, table, transfer_check, transfer_with};
pub use cli::{run, LabAction, LabArgs};
pub use etcd::{etcd_certs, etcd_security, etcd_url, ETCD_PORT, ETCD_USER};
pub use kube::KubeLab;
pub use multicloud::{gateway_ns, switch_ns, HOME_PUBLIC, HOME_PUBLIC_NEXT};
pub use namespaces::{
    down, internet_ips, internet_ns, up, valid_name, CNI_PATH, INTERNET_V4, INTERNET_V6, STATE_ROOT, UNDERLAY_MTU,
};
pub use peers::{find_program, wg_ifname};
pub use plan::{datastore, plan, Check, Emulated, Lab, LabOptions, Multicloud, Node, NodeArch, NodeKind, Pod, Site};
