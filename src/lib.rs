//! weft: a userspace pod-network data plane, wire- and lease-compatible with
//! Flannel. This crate is the runtime that joins the control plane
//! (`weft-control`: config, datastores, leases) to the packet engine
//! (`weft-engine`), and serves what runs beside them:
//!
//! - [`agent`]: `weft agent`, one node's data plane set up from the leases
//! - [`standalone`]: `weft wg`, a plain userspace WireGuard device for `wg`
//!   and wg-quick
//! - [`wgdev`]: the agent's WireGuard device as the UAPI (`weft-uapi`) sees it
//! - [`metrics`]: `/metrics`, `/healthz`, `/readyz`
//!
//! ```text
//!   weft-tunnel <- weft-engine ─┐
//!   weft-uapi <- weft-control ──┼─> weft (this crate) ─> the weft binary (src/main.rs)
//!   weft-uapi ──────────────────┘                          ^
//!   weft-control, weft-uapi, weft-tunnel -> weft-lab ──────┘ (lab and bench commands)
//! ```
//!
//! What it refuses to do: it holds no protocol parser and no datastore
//! code of its own (those are in `weft-uapi` and `weft-control`), moves no
//! packet itself (`weft-engine` does), and never uses the lab: `weft-lab`
//! is in this package's dependencies only for the binary's `lab` and
//! `bench` commands, and no module of this library names it.

#![forbid(unsafe_code)]

pub mod agent;
pub mod metrics;
pub mod standalone;
pub mod wgdev;

#[cfg(test)]
mod tests {
    /// The control plane keeps its own copies of the engine's defaults
    /// (it does not link the engine); they must agree.
    #[test]
    fn control_defaults_match_the_engine() {
        let c = weft_control::config::Offloads::default();
        let e = weft_engine::Offloads::default();
        assert_eq!((c.tun, c.udp_gso, c.udp_gro), (e.tun, e.udp_gso, e.udp_gro));
        assert_eq!(weft_control::config::DEFAULT_BUSY_POLL_US, weft_engine::DEFAULT_BUSY_POLL_US);
    }
}
