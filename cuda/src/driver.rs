//! The seam between the session logic and the NVIDIA driver: a trait with the real
//! implementation in `libcuda` and recording fakes in tests.

use std::fmt;
use std::time::Duration;

/// A failed driver call: the driver's numeric result code and its name
/// (`cuGetErrorName`), e.g. `CUDA_ERROR_TIMEOUT (909)`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{name} ({code})")]
pub struct DriverCallError {
    /// The `CUresult` value.
    pub code: i32,
    /// The name the driver gives the code, or `CUDA_ERROR_<code>` when it has none.
    pub name: String,
}

/// A GPU's UUID, printed the way `nvidia-smi` prints it (`GPU-xxxxxxxx-…`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GpuUuid(pub [u8; 16]);

impl fmt::Display for GpuUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
        write!(
            f,
            "GPU-{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

impl fmt::Debug for GpuUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for GpuUuid {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("not a GPU UUID (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx): {text:?}");
        let hex: String = text
            .strip_prefix("GPU-")
            .ok_or_else(bad)?
            .chars()
            .filter(|c| *c != '-')
            .collect();
        if hex.len() != 32 {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2).ok_or_else(bad)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(GpuUuid(out))
    }
}

impl serde::Serialize for GpuUuid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for GpuUuid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One GPU the driver enumerates.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GpuDevice {
    /// Its UUID.
    pub uuid: GpuUuid,
    /// The model, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Total memory in bytes.
    pub total_memory: u64,
}

/// `CUprocessState`: where a process is in the checkpoint cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ProcessState {
    /// GPU work runs normally.
    Running,
    /// GPU work is blocked; VRAM still on the device.
    Locked,
    /// VRAM moved into host memory; the GPU is released.
    Checkpointed,
    /// A checkpoint operation failed for this process.
    Failed,
    /// A state this crate does not know (newer drivers add transient states).
    Other(i32),
}

impl ProcessState {
    /// Maps the driver's numeric state.
    pub fn from_raw(raw: i32) -> Self {
        match raw {
            0 => ProcessState::Running,
            1 => ProcessState::Locked,
            2 => ProcessState::Checkpointed,
            3 => ProcessState::Failed,
            other => ProcessState::Other(other),
        }
    }
}

/// One remapping for restore: the process used `old`, it shall now use `new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GpuPair {
    /// UUID recorded at checkpoint.
    pub old: GpuUuid,
    /// UUID of the GPU on this node.
    pub new: GpuUuid,
}

/// One GPU's memory of a target process, mapped into this process by a checkpoint or
/// restore with custom storage (`CUcheckpointCustomStoragePerDeviceData`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedGpu {
    /// Device pointer of the mapping, valid in this process until the operation ends.
    pub ptr: u64,
    /// Bytes mapped.
    pub size: u64,
    /// The stream to copy on; the driver synchronises it when the operation completes.
    pub stream: u64,
}

/// A custom-storage checkpoint or restore awaiting `cuCheckpointOperationComplete`
/// (`CUcheckpointCustomStorageInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedOperation {
    /// The operation handle, opaque.
    pub handle: u64,
    /// One entry per GPU the process uses.
    pub gpus: Vec<MappedGpu>,
}

/// Live facts of one GPU that a restore must fit into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GpuMemory {
    /// Total bytes.
    pub total: u64,
    /// Free bytes now.
    pub free: u64,
}

fn not_supported(what: &str) -> DriverCallError {
    DriverCallError {
        code: 801,
        name: format!("CUDA_ERROR_NOT_SUPPORTED ({what} is not offered by this driver)"),
    }
}

/// The driver operations the session needs. The real implementation is
/// [`crate::LibCuda`]; tests use fakes to drive every failure path.
pub trait CudaDriver: Send + Sync + fmt::Debug {
    /// `cuDriverGetVersion`, e.g. 12080 for 12.8.
    fn driver_version(&self) -> i32;
    /// The GPUs, in ordinal order.
    fn devices(&self) -> &[GpuDevice];
    /// `cuCheckpointProcessGetState`; an error means "not a CUDA process".
    fn process_state(&self, pid: u32) -> Result<ProcessState, DriverCallError>;
    /// `cuCheckpointProcessGetRestoreThreadId`.
    fn restore_thread_id(&self, pid: u32) -> Result<u32, DriverCallError>;
    /// `cuCheckpointProcessLock` with a timeout.
    fn lock(&self, pid: u32, timeout: Duration) -> Result<(), DriverCallError>;
    /// `cuCheckpointProcessCheckpoint`.
    fn checkpoint(&self, pid: u32) -> Result<(), DriverCallError>;
    /// `cuCheckpointProcessRestore`, remapping GPUs when `pairs` is not empty.
    fn restore(&self, pid: u32, pairs: &[GpuPair]) -> Result<(), DriverCallError>;
    /// `cuCheckpointProcessUnlock`.
    fn unlock(&self, pid: u32) -> Result<(), DriverCallError>;
    /// GPU memory the process holds, in bytes (an upper bound where the exact figure
    /// is unavailable).
    fn gpu_memory_used(&self, pid: u32) -> Result<u64, DriverCallError>;

    /// Whether the driver offers custom-storage checkpoints; `Err` says why not.
    fn custom_storage_probe(&self) -> Result<(), String> {
        Err("this driver interface has no custom-storage calls".into())
    }
    /// The driver release (`615.20.04`), when known (NVML).
    fn driver_release(&self) -> Option<String> {
        None
    }
    /// GPU memory `pids` hold together on each GPU, in ordinal order, when known (NVML).
    fn gpu_usage(&self, _pids: &[u32]) -> Option<Vec<u64>> {
        None
    }
    /// Total and free memory of each GPU, in ordinal order, when known (NVML).
    fn gpu_memory(&self) -> Option<Vec<GpuMemory>> {
        None
    }
    /// `cuCheckpointProcessCheckpoint` with custom storage: maps the process's GPU
    /// memory into this process instead of moving it into the target's memory.
    fn checkpoint_custom(&self, _pid: u32) -> Result<MappedOperation, DriverCallError> {
        Err(not_supported("custom-storage checkpoint"))
    }
    /// `cuCheckpointProcessRestore` with custom storage: maps fresh GPU memory of the
    /// process for this process to fill.
    fn restore_custom(
        &self,
        _pid: u32,
        _pairs: &[GpuPair],
    ) -> Result<MappedOperation, DriverCallError> {
        Err(not_supported("custom-storage restore"))
    }
    /// `cuCheckpointOperationComplete`: synchronises the streams, unmaps, finishes.
    fn complete(&self, _handle: u64) -> Result<(), DriverCallError> {
        Err(not_supported("cuCheckpointOperationComplete"))
    }
    /// `cuMemcpyDtoHAsync` from a mapping into `dst` on `stream`.
    ///
    /// # Safety
    /// `dst` must stay valid for `dst.len()` writes until `stream` is synchronised.
    unsafe fn copy_from_gpu(
        &self,
        _dst: &mut [u8],
        _src: u64,
        _stream: u64,
    ) -> Result<(), DriverCallError> {
        Err(not_supported("cuMemcpyDtoHAsync"))
    }
    /// `cuMemcpyHtoDAsync` from `src` into a mapping on `stream`.
    ///
    /// # Safety
    /// `src` must stay valid and unchanged until `stream` is synchronised.
    unsafe fn copy_to_gpu(
        &self,
        _dst: u64,
        _src: &[u8],
        _stream: u64,
    ) -> Result<(), DriverCallError> {
        Err(not_supported("cuMemcpyHtoDAsync"))
    }
    /// `cuStreamSynchronize`.
    fn synchronize(&self, _stream: u64) -> Result<(), DriverCallError> {
        Err(not_supported("cuStreamSynchronize"))
    }
    /// `cuMemHostRegister`: page-locks a buffer so copies run at full speed.
    ///
    /// # Safety
    /// The buffer must stay allocated until [`CudaDriver::unregister_host`].
    unsafe fn register_host(&self, _buf: &mut [u8]) -> Result<(), DriverCallError> {
        Err(not_supported("cuMemHostRegister"))
    }
    /// `cuMemHostUnregister`.
    fn unregister_host(&self, _ptr: *mut u8) -> Result<(), DriverCallError> {
        Err(not_supported("cuMemHostUnregister"))
    }
}
