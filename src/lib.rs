//! weft: a userspace pod-network data plane, wire- and lease-compatible with
//! Flannel. This crate holds the agent (configuration, datastore, control
//! loop, metrics) and the lab; packets are moved by `weft-engine`.

#![forbid(unsafe_code)]

pub mod agent;
pub mod alloc;
pub mod apiserver;
pub mod bench;
pub mod cluster;
pub mod cni;
pub mod config;
pub mod datastore;
pub mod error;
pub mod etcd;
pub mod etcd_certs;
pub mod etcd_tls;
pub mod keys;
pub mod kube;
pub mod lab;
pub mod lease;
pub mod masq;
pub mod metrics;
pub mod netns;
pub mod standalone;
pub mod wgdev;
