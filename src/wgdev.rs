//! The agent's WireGuard device as the UAPI sees it: `wg show` lists the
//! peers the leases made, with handshake times and transfer counters, and
//! `wg set` may change an existing peer's endpoint, keepalive and preshared
//! key. Peers themselves (who they are, their allowed IPs) and the device's
//! key and port come from the subnet leases and the key file in agent mode;
//! a request to change those is refused with EOPNOTSUPP and nothing applied.

use std::sync::Arc;
use std::time::SystemTime;

use weft_control::datastore::WgOptions;
use weft_engine::WgDevice;
use weft_uapi::{Device, DeviceStatus, Key, PeerStatus, SetRequest, UapiError};

use crate::metrics::MetricsState;

/// The agent's device behind the UAPI socket.
pub struct AgentWg {
    /// The WireGuard identity.
    pub device: Arc<WgDevice>,
    /// Flannel's options (port, keepalive, PSK).
    pub options: WgOptions,
    /// Where the current snapshot is.
    pub state: Arc<MetricsState>,
}

impl Device for AgentWg {
    fn status(&self) -> DeviceStatus {
        let snapshot = self.state.snapshot.lock().map(|s| s.clone()).unwrap_or_default();
        let now = SystemTime::now();
        let peers = snapshot
            .peers()
            .iter()
            .filter_map(|p| {
                let wg = p.wg.as_ref()?;
                let (since, tx, rx) = wg.stats();
                let st = wg.lock();
                Some(PeerStatus {
                    public_key: Key(wg.public_key),
                    preshared_key: st.preshared_key().map(Key),
                    endpoint: st.endpoint,
                    persistent_keepalive: st.keepalive().unwrap_or(0),
                    allowed_ips: p.subnets.clone(),
                    last_handshake: since.and_then(|d| now.checked_sub(d)),
                    rx_bytes: rx,
                    tx_bytes: tx,
                })
            })
            .collect();
        DeviceStatus {
            private_key: Some(Key(self.device.private_key())),
            listen_port: self.options.listen_port,
            fwmark: None,
            peers,
        }
    }

    fn apply(&self, req: SetRequest) -> Result<(), UapiError> {
        const FROM_LEASES: &str = "in agent mode peers, allowed IPs, the key and the port come from the subnet leases";
        if req.private_key.is_some() || req.listen_port.is_some() || req.replace_peers || req.fwmark.is_some() {
            return Err(UapiError::Unsupported(FROM_LEASES));
        }
        let snapshot = self.state.snapshot.lock().map(|s| s.clone()).unwrap_or_default();
        let find = |k: &Key| snapshot.peers().iter().find_map(|p| p.wg.as_ref().filter(|w| w.public_key == k.0));
        // Check every peer first: a refused request changes nothing.
        for p in &req.peers {
            let changes_membership =
                p.remove || p.replace_allowed_ips || !p.allowed_ips.is_empty() || !p.remove_allowed_ips.is_empty();
            if changes_membership || (find(&p.public_key).is_none() && !p.update_only) {
                return Err(UapiError::Unsupported(FROM_LEASES));
            }
        }
        for p in &req.peers {
            let Some(wg) = find(&p.public_key) else { continue };
            if let Some(ep) = p.endpoint {
                let mut st = wg.lock();
                st.endpoint = Some(ep);
                st.configured = Some(ep);
            }
            if p.persistent_keepalive.is_some() || p.preshared_key.is_some() {
                let (psk, keepalive) = {
                    let st = wg.lock();
                    (st.preshared_key(), st.keepalive())
                };
                let psk = p.preshared_key.map(|k| k.map(|k| k.0)).unwrap_or(psk);
                let keepalive = p.persistent_keepalive.map(Some).unwrap_or(keepalive);
                wg.reconfigure(psk, keepalive);
                self.device.timers_changed();
            }
        }
        Ok(())
    }
}
