//! Kybernate's Kubernetes operator: the `GpuCheckpoint`, `GpuRestore` and `GpuWorkload`
//! custom resources (in the `kybernate-api` crate), their reconcilers, metrics and leader election.
//!
//! The controller never touches a workload itself: it resolves a pod to its node, labels the
//! object `kybernate.io/node=<node>`, and the agent on that node (which watches objects with
//! its label) does the work and writes the status. The controller enforces timeouts,
//! creates restored pods, runs workload policies and guards stored checkpoints with
//! finalizers.

pub mod checkpoint;
pub mod context;
pub mod error;
pub mod fence;
pub mod lease;
pub mod metrics;
pub mod pod;
pub mod restore;
pub mod run;
pub mod schedule;
pub mod status;
pub mod workload;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod mock;
#[cfg(test)]
mod tests;

pub use context::{Clock, Context, SystemClock};
pub use error::Error;
