//! weft-control: the control plane of a weft node, everything that decides
//! what the data plane should be and nothing that moves a packet.
//!
//! It owns the cluster shape and the agent's configuration (K3s's and
//! Flannel's keys, checked with their rules), subnet allocation with
//! Flannel's semantics, Flannel's datastore schema and its three stores (a
//! static file, etcd with TLS and users, Kubernetes Node annotations), this
//! node's lease and the watch of everyone else's, the CNI hand-off
//! (`subnet.env`, the `bridge` plugin's config), the WireGuard key file, and
//! the nftables masquerade table.
//!
//! Modules, in layers; each imports only modules of the layers above it:
//!
//! 1. `error` (the typed refusals), `cni`, `etcd_tls` (Flannel's TLS keys)
//! 2. `subnet` (a node's subnets and their lease key), `cluster` (K3s's
//!    network keys), `masq` (rules as pure code, then one `nft` call), `keys`
//! 3. `alloc` (pure subnet allocation), `config` (the agent's keys)
//! 4. `datastore` (Flannel's schema and the static file)
//! 5. `etcd` (the store), then `lease` (this node's lease in etcd), then
//!    `kube` (the Kubernetes subnet manager)
//!
//! What it refuses to do: no packet I/O (no TUN device, no UDP socket, no
//! route; it does not depend on `weft-engine`), no lab or test tooling (it
//! never links `weft-lab`). The agent (`weft` crate) joins this crate to the
//! engine. Its only weft dependencies are `weft-tunnel` (pure VXLAN
//! constants) and `weft-uapi`, for the WireGuard key type [`weft_uapi::Key`],
//! which lives in the protocol crate so that the key is spelled in one
//! place; `weft-uapi` never depends on this crate.

#![forbid(unsafe_code)]

pub mod alloc;
pub mod cluster;
pub mod cni;
pub mod config;
pub mod datastore;
pub mod error;
pub mod etcd;
pub mod etcd_tls;
pub mod keys;
pub mod kube;
pub mod lease;
pub mod masq;
pub mod rootless;
pub mod subnet;
