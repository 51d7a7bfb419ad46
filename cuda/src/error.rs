//! The one error type of the CUDA session.

use std::fmt;
use std::path::PathBuf;

use crate::driver::DriverCallError;

/// The step of a CUDA checkpoint or restore in which something failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Loading `libcuda.so.1`, `cuInit`, device enumeration.
    Load,
    /// Asking which processes are CUDA processes and how much GPU memory they hold.
    Discover,
    /// Host-RAM check before anything is locked.
    Preflight,
    /// `cuCheckpointProcessLock`.
    Lock,
    /// `cuCheckpointProcessCheckpoint`.
    Checkpoint,
    /// `cuCheckpointProcessGetRestoreThreadId`.
    RestoreThreadId,
    /// `cuCheckpointProcessRestore`.
    Restore,
    /// `cuCheckpointProcessUnlock`.
    Unlock,
    /// Copying VRAM between the driver's mappings and the VRAM store.
    Copy,
    /// `cuCheckpointOperationComplete`.
    Complete,
    /// The restore compatibility check, before anything is locked.
    Gate,
}

impl Phase {
    /// The phase's name, for metric labels and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Load => "load",
            Phase::Discover => "discover",
            Phase::Preflight => "preflight",
            Phase::Lock => "lock",
            Phase::Checkpoint => "checkpoint",
            Phase::RestoreThreadId => "restore-thread-id",
            Phase::Restore => "restore",
            Phase::Unlock => "unlock",
            Phase::Copy => "copy",
            Phase::Complete => "complete",
            Phase::Gate => "gate",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can go wrong in the CUDA session.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// `libcuda.so.1` exists but cannot be used.
    #[error("CUDA driver {library}: {reason}")]
    DriverLoad {
        /// The library that was opened.
        library: String,
        /// What went wrong.
        reason: String,
    },
    /// A driver call failed; `pid` is the process it was made for.
    #[error("CUDA {phase} of pid {pid} failed: {source}")]
    Driver {
        /// The phase of the call.
        phase: Phase,
        /// The target process.
        pid: u32,
        /// Code and name from the driver.
        source: DriverCallError,
    },
    /// Not enough free host RAM to receive the GPU memory; nothing was locked.
    #[error(
        "not enough host RAM for the CUDA checkpoint: the processes hold {gpu_bytes} bytes of GPU \
         memory, plus a margin of {margin} bytes, but only {available} bytes are available; \
         nothing was locked"
    )]
    InsufficientHostMemory {
        /// GPU memory held by the processes to checkpoint.
        gpu_bytes: u64,
        /// Safety margin required on top.
        margin: u64,
        /// `MemAvailable` of the host.
        available: u64,
    },
    /// The recorded GPU fingerprint cannot be restored on this node.
    #[error("checkpoint cannot be restored on this node: {reason}")]
    Incompatible {
        /// Which property does not match.
        reason: String,
    },
    /// A process to restore is not in the state a restore needs.
    #[error("pid {pid} is {found:?}, expected {expected:?} for the CUDA {phase}")]
    UnexpectedState {
        /// The phase that needed the state.
        phase: Phase,
        /// The process.
        pid: u32,
        /// The state the phase needs.
        expected: crate::ProcessState,
        /// The state the driver reported.
        found: crate::ProcessState,
    },
    /// A failure, and the rollback after it did not bring every process back.
    #[error("{cause}; rollback incomplete: {}", failures.join("; "))]
    RollbackIncomplete {
        /// The failure that triggered the rollback.
        cause: Box<CudaError>,
        /// Each rollback step that failed.
        failures: Vec<String>,
    },
    /// The configured checkpoint mode cannot be used on this node.
    #[error(transparent)]
    ModeUnavailable(#[from] crate::mode::ModeUnavailable),
    /// Copying one GPU's memory of a process failed.
    #[error("CUDA VRAM copy of {key} failed: {source}")]
    Copy {
        /// The process and GPU.
        key: crate::VramKey,
        /// What failed.
        source: crate::CopyFailure,
    },
    /// The restore gate found facts of this node that do not fit the checkpoint;
    /// nothing was locked or restored.
    #[error("restore refused before anything was locked: {}", reasons.join("; "))]
    Refused {
        /// One reason per failing fact.
        reasons: Vec<String>,
    },
    /// A host file the session reads (`/proc/meminfo`, `/proc/<pid>/stat`) is unreadable.
    #[error("cannot read {}: {source}", path.display())]
    HostFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl CudaError {
    /// The phase the error belongs to, for metric labels and the CLI.
    pub fn phase(&self) -> Phase {
        match self {
            CudaError::DriverLoad { .. } => Phase::Load,
            CudaError::Driver { phase, .. } | CudaError::UnexpectedState { phase, .. } => *phase,
            CudaError::InsufficientHostMemory { .. } | CudaError::HostFile { .. } => {
                Phase::Preflight
            }
            CudaError::Incompatible { .. } => Phase::Restore,
            CudaError::ModeUnavailable(_) => Phase::Load,
            CudaError::Copy { .. } => Phase::Copy,
            CudaError::Refused { .. } => Phase::Gate,
            CudaError::RollbackIncomplete { cause, .. } => cause.phase(),
        }
    }

    /// A fixed label for the kind of failure, for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            CudaError::DriverLoad { .. } => "driver_load",
            CudaError::Driver { .. } => "driver_call",
            CudaError::InsufficientHostMemory { .. } => "insufficient_host_memory",
            CudaError::Incompatible { .. } => "incompatible_node",
            CudaError::UnexpectedState { .. } => "unexpected_state",
            CudaError::RollbackIncomplete { .. } => "rollback_incomplete",
            CudaError::HostFile { .. } => "host_file",
            CudaError::ModeUnavailable { .. } => "mode_unavailable",
            CudaError::Copy { .. } => "vram_copy",
            CudaError::Refused { .. } => "restore_refused",
        }
    }

    /// The driver's error code, when a driver call failed.
    pub fn driver_code(&self) -> Option<i32> {
        match self {
            CudaError::Driver { source, .. } => Some(source.code),
            CudaError::RollbackIncomplete { cause, .. } => cause.driver_code(),
            CudaError::Copy {
                source: crate::CopyFailure::Driver { source, .. },
                ..
            } => Some(source.code),
            _ => None,
        }
    }
}
