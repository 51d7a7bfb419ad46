//! The seam between the session logic and the NVIDIA driver: a trait with the real
//! implementation in `libcuda` and recording fakes in tests.

use crate::error::DriverCallError;
use std::fmt;
use std::time::Duration;

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
}
