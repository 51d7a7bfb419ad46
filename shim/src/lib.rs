//! `containerd-shim-kybernate-v1`: a containerd runtime shim (task API v2) for runc
//! containers, a drop-in for `io.containerd.runc.v2`, whose Checkpoint and restore-on-Create
//! run the Kybernate agent's GPU phases around `runc checkpoint` / `runc restore`.

pub mod agent_link;
pub mod checkpoint;
pub mod config;
pub mod containers;
pub mod error;
pub mod events;
pub mod exec;
pub mod failpoints;
pub mod gpu;
pub mod grouping;
pub mod handoff;
pub mod info;
pub mod lifecycle;
pub mod oom;
pub mod pod_identity;
pub mod process;
pub mod resources;
pub mod restore;
pub mod rootfs_diff;
pub mod runc_cli;
pub mod runtime_options;
pub mod service;
pub mod shim;
pub mod stdio;
pub mod task;

#[cfg(test)]
mod fakes;
#[cfg(test)]
mod rollback_tests;
