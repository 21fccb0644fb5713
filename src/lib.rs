//! weft: a userspace pod-network data plane, wire- and lease-compatible with
//! Flannel. This crate holds the agent (configuration, datastore, control
//! loop, metrics) and the lab; packets are moved by `weft-engine`.

#![forbid(unsafe_code)]

pub mod agent;
pub mod apiserver;
pub mod bench;
pub mod etcd_certs;
pub mod lab;
pub mod metrics;
pub mod netns;
pub mod standalone;
pub mod wgdev;
