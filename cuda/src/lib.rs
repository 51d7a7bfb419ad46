//! Kybernate's CUDA session: the NVIDIA driver's checkpoint API applied to every CUDA
//! process of a workload, consistently (lock all, then checkpoint all), with rollback,
//! host-RAM pre-flight, GPU fingerprints and UUID remapping on restore.
//!
//! The agent creates one [`CudaSession`] at start ([`CudaSession::load`]) and calls
//! [`CudaSession::checkpoint`] before CRIU dumps and [`CudaSession::restore`] after
//! CRIU restores. The driver sits behind [`CudaDriver`] so the session can be tested.

mod copier;
mod driver;
mod error;
mod fingerprint;
mod gate;
mod host;
mod libcuda;
mod mode;
mod nvml;
mod session;
mod vram;

pub use copier::CopyFailure;
pub use driver::{
    CudaDriver, DriverCallError, GpuDevice, GpuMemory, GpuPair, GpuUuid, MappedGpu,
    MappedOperation, ProcessState,
};
pub use error::{CudaError, Phase};
pub use fingerprint::{plan_restore, GpuFingerprint};
pub use gate::{check_gate, GatePolicy, NodeGpuFacts, RecordedGpu};
pub use host::{available_memory, process_tree};
pub use libcuda::{LibCuda, CUSTOM_STORAGE_MIN_DRIVER, LIBCUDA, REMAP_MIN_DRIVER};
pub use mode::{choose_mode, CheckpointMode, CustomStorageSetting, ModeChoice, ModeUnavailable};
pub use session::{
    CheckpointOptions, Checkpointed, CudaSession, CustomCheckpointOptions, PhaseTimings,
    RestoreReport,
};
pub use vram::{DirVramStore, MemoryVramStore, VramImage, VramKey, VramStore};
