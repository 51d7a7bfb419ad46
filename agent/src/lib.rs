//! The Kybernate node agent: checkpoints and restores workloads on its node.
//!
//! Actors (actix): a [`node::NodeAgent`] receiving every request, one
//! [`container::ContainerActor`] per workload, the [`criu::CriuRunner`], the
//! [`cuda::CudaSession`] and one [`tiers::TierActor`] per storage tier. The gRPC API
//! ([`grpc`]) is served on a Unix socket; `kybernatectl` (the binary target
//! `src/bin/kybernatectl/`, which uses only the client crate) is its client.

pub mod bandwidth;
pub mod blocking_work;
pub mod catalog;
pub mod checkpoint;
pub mod checkpoint_machine;
pub mod command;
pub mod config;
pub mod container;
pub mod containerd;
pub mod criu;
pub mod cuda;
pub mod daemon;
pub mod demotion;
pub mod drain;
pub mod encryption;
pub mod error;
pub mod events;
pub mod failpoints;
pub mod grpc;
pub mod host_mounts;
pub mod images;
pub mod journal;
pub mod metrics;
pub mod node;
pub mod node_devices;
pub mod node_parts;
pub mod node_worker;
pub mod pins;
pub mod prefetch;
pub mod private_dirs;
pub mod process;
pub mod recovery;
pub mod reload;
pub mod request_check;
pub mod restore;
pub mod shared_records;
pub mod socket_access;
pub mod streaming;
pub mod tenancy;
pub mod tiers;
pub mod workload_state;
pub mod workloads;

/// Sets up structured logging on stderr; `KYBERNATE_LOG` sets the filter (default `info`).
pub fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("KYBERNATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
