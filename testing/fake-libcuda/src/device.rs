//! The simulated GPU as seen from inside one process: its context, its allocations and
//! its checkpoint state. Device memory is a region file under the node directory, never
//! this process's memory, until a checkpoint moves it in (as the real driver moves VRAM
//! into host memory) and a restore moves it back out.

use crate::codes::{
    CONTEXT_IS_DESTROYED, ILLEGAL_STATE, INVALID_CONTEXT, INVALID_DEVICE, INVALID_VALUE,
    NOT_INITIALIZED, NO_DEVICE, OPERATING_SYSTEM, OUT_OF_MEMORY, SUCCESS,
};
use crate::node::{self, Device};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// First device address handed out; any non-null, aligned value would do.
const BASE: u64 = 0x7f00_0000_0000;

/// `CUprocessState` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Running = 0,
    Locked = 1,
    Checkpointed = 2,
}

#[derive(Debug)]
struct Gpu {
    initialised: bool,
    state: State,
    device: Option<[u8; 16]>,
    /// Start time of the incarnation that owns the device region.
    incarnation: u64,
    /// device pointer → (offset in region, length)
    allocs: BTreeMap<u64, (u64, u64)>,
    next: u64,
    /// The device memory while checkpointed.
    host_copy: Vec<u8>,
    /// Checkpointed into the caller's custom storage: the memory lives nowhere here.
    vram_elsewhere: bool,
    /// A custom-storage operation mapped by a caller, awaiting its completion.
    pending: Option<Pending>,
}

/// A custom-storage operation on this process that awaits `cuCheckpointOperationComplete`.
#[derive(Clone, Copy, Debug)]
enum Pending {
    /// The caller copies the device region out; it stays on the device until then.
    Checkpoint,
    /// The caller fills a fresh region on `device` for incarnation `incarnation`.
    Restore {
        device: Option<[u8; 16]>,
        incarnation: u64,
    },
}

static GPU: Mutex<Gpu> = Mutex::new(Gpu {
    initialised: false,
    state: State::Running,
    device: None,
    incarnation: 0,
    allocs: BTreeMap::new(),
    next: 0,
    host_copy: Vec::new(),
    vram_elsewhere: false,
    pending: None,
});
static RESUMED: Condvar = Condvar::new();

fn gpu() -> MutexGuard<'static, Gpu> {
    GPU.lock().unwrap_or_else(|p| p.into_inner())
}

/// A buffer length as a device-memory length.
pub fn byte_len(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

fn own_pid() -> u32 {
    node::own_pid()
}

fn own_start() -> u64 {
    node::start_time(own_pid()).unwrap_or(0)
}

fn region_path(device: &[u8; 16], incarnation: u64) -> Option<PathBuf> {
    Some(
        node::dir()?
            .join("vram")
            .join(node::format_uuid(device))
            .join(format!("{}-{incarnation}.bin", own_pid())),
    )
}

/// Device memory in use on `device`: every live region plus what others occupy.
pub fn used_on(device: &[u8; 16]) -> u64 {
    let Some(dir) = node::dir() else { return 0 };
    node::occupied(device)
        + fs::read_dir(dir.join("vram").join(node::format_uuid(device)))
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum::<u64>()
            })
            .unwrap_or(0)
}

/// `cuInit`: frees regions of dead processes, like the kernel driver does on exit.
pub fn init() -> i32 {
    if node::dir().is_none() || node::devices().is_empty() {
        return NO_DEVICE;
    }
    node::free_dead_regions();
    gpu().initialised = true;
    SUCCESS
}

/// The node's devices, only after `cuInit`.
pub fn devices() -> Result<Vec<Device>, i32> {
    if !gpu().initialised {
        return Err(NOT_INITIALIZED);
    }
    Ok(node::devices())
}

/// `cuDevicePrimaryCtxRetain`: binds this process to a device (the first one it asks
/// for); the caller then starts its control channel (`control::serve`).
pub fn retain_context(ordinal: i32) -> i32 {
    let devices = match devices() {
        Ok(d) => d,
        Err(code) => return code,
    };
    let Some(device) = usize::try_from(ordinal).ok().and_then(|i| devices.get(i)) else {
        return INVALID_DEVICE;
    };
    let mut g = gpu();
    // A process's allocations live on the device of its first context (the fake's one
    // simplification); contexts on further devices are granted, as the driver does, and
    // serve the custom-storage mappings of a caller.
    if g.device.is_none() {
        g.device = Some(device.uuid);
        g.incarnation = own_start();
    }
    drop(g);
    SUCCESS
}

/// Runs a GPU call: blocks while the process is locked or checkpointed, and fails when
/// the device memory belongs to an earlier incarnation (the process was restored by
/// CRIU without a CUDA checkpoint, so its VRAM died with the old process).
fn gpu_call(op: impl FnOnce(&mut Gpu, PathBuf) -> i32) -> i32 {
    let mut g = gpu();
    while g.state != State::Running {
        g = RESUMED.wait(g).unwrap_or_else(|p| p.into_inner());
    }
    let Some(device) = g.device else {
        return INVALID_CONTEXT;
    };
    if g.incarnation != own_start() {
        return CONTEXT_IS_DESTROYED;
    }
    let Some(path) = region_path(&device, g.incarnation) else {
        return NOT_INITIALIZED;
    };
    op(&mut g, path)
}

/// `cuMemAlloc`.
pub fn alloc(len: u64) -> Result<u64, i32> {
    let mut out = Err(INVALID_VALUE);
    let code = gpu_call(|g, path| {
        let Some(device) = g.device else {
            return INVALID_CONTEXT;
        };
        let total = node::devices()
            .iter()
            .find(|d| d.uuid == device)
            .map_or(0, |d| d.total_bytes);
        if len == 0 || used_on(&device) + len > total {
            return OUT_OF_MEMORY;
        }
        if let Some(parent) = path.parent() {
            if fs::create_dir_all(parent).is_err() {
                return OPERATING_SYSTEM;
            }
        }
        let offset = g.next;
        let grown = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(offset + len));
        if grown.is_err() {
            return OPERATING_SYSTEM;
        }
        g.next = offset + len;
        g.allocs.insert(BASE + offset, (offset, len));
        out = Ok(BASE + offset);
        SUCCESS
    });
    if code == SUCCESS {
        out
    } else {
        Err(code)
    }
}

/// `cuMemFree`: forgets the allocation (the region keeps its size; a bump allocator).
pub fn free(ptr: u64) -> i32 {
    gpu_call(|g, _| match g.allocs.remove(&ptr) {
        Some(_) => SUCCESS,
        None => INVALID_VALUE,
    })
}

fn locate(g: &Gpu, ptr: u64, len: u64) -> Option<u64> {
    let (&start, &(offset, alloc_len)) = g.allocs.range(..=ptr).next_back()?;
    let inner = ptr - start;
    (inner + len <= alloc_len).then_some(offset + inner)
}

/// `cuMemcpyHtoD`.
pub fn write(ptr: u64, src: &[u8]) -> i32 {
    gpu_call(|g, path| {
        let Some(offset) = locate(g, ptr, byte_len(src.len())) else {
            return INVALID_VALUE;
        };
        match fs::OpenOptions::new().write(true).open(path) {
            Ok(f) if f.write_all_at(src, offset).is_ok() => SUCCESS,
            _ => CONTEXT_IS_DESTROYED,
        }
    })
}

/// `cuMemcpyDtoH`.
pub fn read(ptr: u64, dst: &mut [u8]) -> i32 {
    gpu_call(|g, path| {
        let Some(offset) = locate(g, ptr, byte_len(dst.len())) else {
            return INVALID_VALUE;
        };
        match fs::File::open(path) {
            Ok(f) if f.read_exact_at(dst, offset).is_ok() => SUCCESS,
            _ => CONTEXT_IS_DESTROYED,
        }
    })
}

/// `cuMemGetInfo`: (free, total) of the current device.
pub fn mem_info() -> Result<(u64, u64), i32> {
    let device = gpu().device.ok_or(INVALID_CONTEXT)?;
    let total = node::devices()
        .iter()
        .find(|d| d.uuid == device)
        .map_or(0, |d| d.total_bytes);
    Ok((total.saturating_sub(used_on(&device)), total))
}

/// Checkpoint-API state of this process.
pub fn state() -> State {
    gpu().state
}

fn honour_fault(op: &str, timeout: Option<Duration>) -> Option<i32> {
    node::honour_fault(op, own_pid(), timeout)
}

/// `cuCheckpointProcessLock`: waits for in-flight GPU calls (they hold the state
/// mutex), then blocks further ones.
pub fn lock(timeout_ms: u32) -> i32 {
    let timeout = (timeout_ms > 0).then(|| Duration::from_millis(u64::from(timeout_ms)));
    if let Some(code) = honour_fault("lock", timeout) {
        return code;
    }
    let mut g = gpu();
    if g.state != State::Running {
        return ILLEGAL_STATE;
    }
    g.state = State::Locked;
    SUCCESS
}

/// `cuCheckpointProcessCheckpoint`: device memory → process memory; the device region
/// is freed.
pub fn checkpoint() -> i32 {
    if let Some(code) = honour_fault("checkpoint", None) {
        return code;
    }
    let mut g = gpu();
    if g.state != State::Locked || g.pending.is_some() {
        return ILLEGAL_STATE;
    }
    if let Some(device) = g.device {
        let Some(path) = region_path(&device, g.incarnation) else {
            return NOT_INITIALIZED;
        };
        let len = usize::try_from(g.next).unwrap_or(usize::MAX);
        let mut copy = vec![0u8; len];
        let read = fs::File::open(&path).and_then(|f| f.read_exact_at(&mut copy, 0));
        if read.is_err() {
            return CONTEXT_IS_DESTROYED;
        }
        if fs::remove_file(&path).is_err() {
            return OPERATING_SYSTEM;
        }
        g.host_copy = copy;
    }
    g.state = State::Checkpointed;
    SUCCESS
}

/// `cuCheckpointProcessRestore`: process memory → a device region of this incarnation,
/// on the device the UUID pairs map the old one to.
pub fn restore(pairs: &[([u8; 16], [u8; 16])]) -> i32 {
    if let Some(code) = honour_fault("restore", None) {
        return code;
    }
    let mut g = gpu();
    // A checkpoint into custom storage comes back only through custom storage.
    if g.state != State::Checkpointed || g.pending.is_some() || g.vram_elsewhere {
        return ILLEGAL_STATE;
    }
    if let Some(old) = g.device {
        let target = pairs
            .iter()
            .find(|(from, _)| *from == old)
            .map_or(old, |(_, to)| *to);
        let Some(device) = node::devices().into_iter().find(|d| d.uuid == target) else {
            return INVALID_DEVICE;
        };
        if used_on(&target) + byte_len(g.host_copy.len()) > device.total_bytes {
            return OUT_OF_MEMORY;
        }
        let incarnation = own_start();
        let Some(path) = region_path(&target, incarnation) else {
            return NOT_INITIALIZED;
        };
        let written = path
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| fs::write(&path, &g.host_copy));
        if written.is_err() {
            return OPERATING_SYSTEM;
        }
        g.host_copy = Vec::new();
        g.device = Some(target);
        g.incarnation = incarnation;
    }
    g.state = State::Locked;
    SUCCESS
}

/// `cuCheckpointProcessUnlock`: GPU calls resume.
pub fn unlock() -> i32 {
    if let Some(code) = honour_fault("unlock", None) {
        return code;
    }
    let mut g = gpu();
    if g.state != State::Locked || g.pending.is_some() {
        return ILLEGAL_STATE;
    }
    g.state = State::Running;
    RESUMED.notify_all();
    SUCCESS
}

/// Where a restore maps `old` (the device recorded at checkpoint) on this node.
fn remapped(old: [u8; 16], pairs: &[([u8; 16], [u8; 16])]) -> [u8; 16] {
    pairs
        .iter()
        .find(|(from, _)| *from == old)
        .map_or(old, |(_, to)| *to)
}

/// What a custom-storage call hands the caller: the length and file of the device
/// region it maps (`-` when the process holds no device memory).
pub type Mapped = (i32, u64, String);

/// `cuCheckpointProcessCheckpoint` with custom storage: the process must be LOCKED; its
/// device region stays where it is, outside every process, for the caller to map and
/// copy out. Nothing moves into this process's memory.
pub fn checkpoint_custom() -> Mapped {
    if let Some(code) = honour_fault("checkpoint_custom", None) {
        return (code, 0, String::new());
    }
    if !node::custom_storage_offered() {
        return (crate::codes::NOT_SUPPORTED, 0, String::new());
    }
    let mut g = gpu();
    if g.state != State::Locked || g.pending.is_some() {
        return (ILLEGAL_STATE, 0, String::new());
    }
    let path = match g.device {
        None => "-".to_string(),
        Some(device) => {
            let Some(path) = region_path(&device, g.incarnation) else {
                return (NOT_INITIALIZED, 0, String::new());
            };
            if g.next > 0 && !path.exists() {
                return (CONTEXT_IS_DESTROYED, 0, String::new());
            }
            path.to_string_lossy().into_owned()
        }
    };
    g.pending = Some(Pending::Checkpoint);
    let len = if path == "-" { 0 } else { g.next };
    (SUCCESS, len, path)
}

/// `cuCheckpointProcessRestore` with custom storage: the process must be CHECKPOINTED
/// into custom storage; a fresh, zeroed region of the recorded size is made on the
/// (remapped) device for the caller to fill.
pub fn restore_custom(pairs: &[([u8; 16], [u8; 16])]) -> Mapped {
    if let Some(code) = honour_fault("restore_custom", None) {
        return (code, 0, String::new());
    }
    if !node::custom_storage_offered() {
        return (crate::codes::NOT_SUPPORTED, 0, String::new());
    }
    let mut g = gpu();
    if g.state != State::Checkpointed || g.pending.is_some() || !g.vram_elsewhere {
        return (ILLEGAL_STATE, 0, String::new());
    }
    let incarnation = own_start();
    let Some(old) = g.device else {
        g.pending = Some(Pending::Restore {
            device: None,
            incarnation,
        });
        return (SUCCESS, 0, "-".into());
    };
    let target = remapped(old, pairs);
    let Some(device) = node::devices().into_iter().find(|d| d.uuid == target) else {
        return (INVALID_DEVICE, 0, String::new());
    };
    if used_on(&target) + g.next > device.total_bytes {
        return (OUT_OF_MEMORY, 0, String::new());
    }
    let Some(path) = region_path(&target, incarnation) else {
        return (NOT_INITIALIZED, 0, String::new());
    };
    let made = path
        .parent()
        .map_or(Ok(()), fs::create_dir_all)
        .and_then(|()| fs::File::create(&path))
        .and_then(|f| f.set_len(g.next));
    if made.is_err() {
        return (OPERATING_SYSTEM, 0, String::new());
    }
    g.pending = Some(Pending::Restore {
        device: Some(target),
        incarnation,
    });
    (SUCCESS, g.next, path.to_string_lossy().into_owned())
}

/// The end of a custom-storage operation, sent by the caller's
/// `cuCheckpointOperationComplete`. `done`: the caller's copies finished, so a
/// checkpoint releases the device region (the process is CHECKPOINTED) and a restore
/// adopts the filled region (LOCKED). Otherwise the operation is abandoned and the
/// process is back where it was before it: LOCKED with its memory on the device, or
/// CHECKPOINTED with the fresh region freed.
pub fn finish_custom(done: bool) -> i32 {
    let mut g = gpu();
    let Some(pending) = g.pending.take() else {
        return ILLEGAL_STATE;
    };
    match (pending, done) {
        (Pending::Checkpoint, true) => {
            if let Some(device) = g.device {
                if let Some(path) = region_path(&device, g.incarnation) {
                    if path.exists() && fs::remove_file(&path).is_err() {
                        return OPERATING_SYSTEM;
                    }
                }
            }
            g.host_copy = Vec::new();
            g.vram_elsewhere = true;
            g.state = State::Checkpointed;
        }
        (Pending::Checkpoint, false) => {}
        (
            Pending::Restore {
                device,
                incarnation,
            },
            true,
        ) => {
            if device.is_some() {
                g.device = device;
            }
            g.incarnation = incarnation;
            g.vram_elsewhere = false;
            g.state = State::Locked;
        }
        (
            Pending::Restore {
                device,
                incarnation,
            },
            false,
        ) => {
            if let Some(path) = device.and_then(|d| region_path(&d, incarnation)) {
                let _ = fs::remove_file(path);
            }
        }
    }
    SUCCESS
}
