//! Kybernate's CUDA session: the NVIDIA driver's checkpoint API applied to every CUDA
//! process of a workload, consistently (lock all, then checkpoint all), with rollback,
//! host-RAM pre-flight, GPU fingerprints and UUID remapping on restore.
//!
//! The agent creates one [`CudaSession`] at start ([`CudaSession::load`]) and calls
//! [`CudaSession::checkpoint`] before CRIU dumps and [`CudaSession::restore`] after
//! CRIU restores. The driver sits behind [`CudaDriver`] so the session can be tested.

mod checkpointed;
mod driver;
mod error;
mod fingerprint;
mod host;
mod libcuda;
mod nvml;
mod session;

pub use driver::{CudaDriver, GpuDevice, GpuPair, GpuUuid, ProcessState};
pub use error::{CudaError, DriverCallError, Phase};
pub use fingerprint::{plan_restore, GpuFingerprint};
pub use host::{available_memory, process_tree};
pub use libcuda::{LibCuda, LIBCUDA, REMAP_MIN_DRIVER};
pub use session::{CheckpointOptions, Checkpointed, CudaSession, PhaseTimings, RestoreReport};
