//! The real driver: `libcuda.so.1` through cudarc for init, devices and version, and
//! the six `cuCheckpointProcess*` entry points resolved from the same library (cudarc
//! 0.19 has their argument types but not the functions).

use crate::driver::DriverCallError;
use crate::driver::{
    CudaDriver, GpuDevice, GpuMemory, GpuPair, GpuUuid, MappedGpu, MappedOperation, ProcessState,
};
use crate::error::CudaError;
use crate::nvml::Nvml;
use cudarc::driver::{result, sys};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;
use std::time::Duration;

/// The soname of the driver library.
pub const LIBCUDA: &str = "libcuda.so.1";
/// `CUDA_ERROR_NO_DEVICE`: the driver is installed but sees no GPU.
const CUDA_ERROR_NO_DEVICE: i32 = 100;
/// First driver API version whose restore arguments carry `gpuPairs`.
pub const REMAP_MIN_DRIVER: i32 = 13000;
/// First driver API version with custom-storage checkpoints (CUDA 13.4, branch 615).
pub const CUSTOM_STORAGE_MIN_DRIVER: i32 = 13040;

/// `CUcheckpointGpuPair` (CUDA 13.0): declared here because cudarc only has it under a
/// 13.x feature, and the workspace builds against 12.8.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct RawGpuPair {
    old_uuid: sys::CUuuid,
    new_uuid: sys::CUuuid,
}

/// `CUcheckpointCustomStoragePerDeviceData` (CUDA 13.4).
#[repr(C)]
#[derive(Debug)]
struct RawPerDeviceData {
    dev_ptr: u64,
    size: usize,
    stream: *mut c_void,
}

/// `CUcheckpointCustomStorageInfo` (CUDA 13.4): owned by the driver.
#[repr(C)]
#[derive(Debug)]
struct RawCustomStorageInfo {
    handle: *mut c_void,
    per_device_data: *mut RawPerDeviceData,
    device_count: c_uint,
}

/// `CUcheckpointCheckpointArgs` as of CUDA 13.4; older drivers see 64 zeroed bytes
/// when the custom-storage pointer is null.
#[repr(C)]
#[derive(Debug)]
struct RawCheckpointArgs {
    custom_storage_info_out: *mut *mut RawCustomStorageInfo,
    reserved: [c_char; 56],
}

/// `CUcheckpointRestoreArgs` as of CUDA 13.4. Under 12.8 and 12.9 the same 64 bytes
/// are reserved and 13.0 adds only the pairs, so all-zero arguments mean "no remap,
/// no custom storage" on every driver.
#[repr(C)]
#[derive(Debug)]
struct RawRestoreArgs {
    gpu_pairs: *mut RawGpuPair,
    gpu_pairs_count: c_uint,
    padding0: c_uint,
    custom_storage_info_out: *mut *mut RawCustomStorageInfo,
    reserved: [c_char; 40],
}

const _: () = assert!(
    std::mem::size_of::<RawCheckpointArgs>()
        == std::mem::size_of::<sys::CUcheckpointCheckpointArgs>()
);
const _: () = assert!(
    std::mem::size_of::<RawRestoreArgs>() == std::mem::size_of::<sys::CUcheckpointRestoreArgs>()
);

type GetStateFn = unsafe extern "C" fn(c_int, *mut c_int) -> c_int;
type GetRestoreTidFn = unsafe extern "C" fn(c_int, *mut c_int) -> c_int;
type LockFn = unsafe extern "C" fn(c_int, *mut sys::CUcheckpointLockArgs) -> c_int;
type CheckpointFn = unsafe extern "C" fn(c_int, *mut RawCheckpointArgs) -> c_int;
type CompleteFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type RestoreFn = unsafe extern "C" fn(c_int, *mut RawRestoreArgs) -> c_int;
type UnlockFn = unsafe extern "C" fn(c_int, *mut sys::CUcheckpointUnlockArgs) -> c_int;
type ErrorNameFn = unsafe extern "C" fn(c_int, *mut *const c_char) -> c_int;

/// The checkpoint entry points, resolved once.
#[derive(Debug)]
struct CheckpointApi {
    get_state: GetStateFn,
    get_restore_tid: GetRestoreTidFn,
    lock: LockFn,
    checkpoint: CheckpointFn,
    restore: RestoreFn,
    unlock: UnlockFn,
    error_name: ErrorNameFn,
    /// `cuCheckpointOperationComplete`: only drivers of branch 615 or newer have it.
    complete: Option<CompleteFn>,
}

/// The initialised NVIDIA driver. Load it once, when the agent starts, and keep it:
/// a fresh `cuInit` costs seconds on real systems.
#[derive(Debug)]
pub struct LibCuda {
    api: CheckpointApi,
    version: i32,
    devices: Vec<GpuDevice>,
    nvml: Option<Nvml>,
    /// The primary context of GPU 0, retained on first custom-storage use: the
    /// driver maps a target's memory into the caller's context.
    context: OnceLock<Result<usize, DriverCallError>>,
    /// Keeps the entry points above valid.
    _library: libloading::Library,
}

fn load_error(reason: impl Into<String>) -> CudaError {
    CudaError::DriverLoad {
        library: LIBCUDA.into(),
        reason: reason.into(),
    }
}

fn cudarc_code(err: &result::DriverError) -> i32 {
    err.0 as i32
}

/// `CUDA_ERROR_NAME (code)` for an error from a cudarc call.
fn describe(err: &result::DriverError) -> String {
    let code = cudarc_code(err);
    match err.error_name() {
        Ok(name) => format!("{} ({code})", name.to_string_lossy()),
        Err(_) => format!("CUDA_ERROR_{code}"),
    }
}

impl LibCuda {
    /// Opens and initialises the driver. `Ok(None)` means this node has no usable
    /// driver (no `libcuda.so.1`, or no GPU): a CPU-only node.
    pub fn load() -> Result<Option<Self>, CudaError> {
        // SAFETY: loading the NVIDIA driver runs its initialisers, which have no
        // preconditions; the library stays loaded for the life of `LibCuda`.
        let library = match unsafe { libloading::Library::new(LIBCUDA) } {
            Ok(lib) => lib,
            Err(e) => {
                tracing::info!("no CUDA driver ({LIBCUDA}: {e}); this node checkpoints CPU-only");
                return Ok(None);
            }
        };
        // cudarc finds the same library by name (its candidates include libcuda.so.1,
        // and the dynamic loader hands out the handle already open).
        if let Err(e) = result::init() {
            if cudarc_code(&e) == CUDA_ERROR_NO_DEVICE {
                tracing::info!("CUDA driver present but no GPU; this node checkpoints CPU-only");
                return Ok(None);
            }
            return Err(load_error(format!("cuInit failed: {}", describe(&e))));
        }
        let api = resolve(&library)?;
        same_library_as_cudarc(&library)?;
        let mut version: c_int = 0;
        // SAFETY: the out pointer is valid for the duration of the call; cuInit succeeded.
        let code = unsafe { sys::cuDriverGetVersion(&mut version) };
        code.result()
            .map_err(|e| load_error(format!("cuDriverGetVersion failed: {}", describe(&e))))?;
        let devices = enumerate()?;
        let nvml = match Nvml::load() {
            Ok(nvml) => Some(nvml),
            Err(reason) => {
                tracing::warn!(
                    "NVML unavailable ({reason}); host-RAM pre-flight assumes each CUDA \
                     process may hold all GPU memory"
                );
                None
            }
        };
        tracing::info!(
            driver_version = version,
            gpus = devices.len(),
            "CUDA driver initialised"
        );
        Ok(Some(LibCuda {
            api,
            version,
            devices,
            nvml,
            context: OnceLock::new(),
            _library: library,
        }))
    }

    fn call_error(&self, code: c_int) -> DriverCallError {
        let mut name: *const c_char = std::ptr::null();
        // SAFETY: valid out pointer; the driver returns a static string or an error.
        let rc = unsafe { (self.api.error_name)(code, &mut name) };
        let name = if rc == 0 && !name.is_null() {
            // SAFETY: on success the driver hands out a NUL-terminated static string.
            unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        } else {
            format!("CUDA_ERROR_{code}")
        };
        DriverCallError { code, name }
    }

    /// The conservative estimate of a process's GPU memory: all of every GPU.
    fn all_memory(&self) -> u64 {
        self.devices.iter().map(|d| d.total_memory).sum()
    }

    fn check(&self, code: c_int) -> Result<(), DriverCallError> {
        if code == 0 {
            Ok(())
        } else {
            Err(self.call_error(code))
        }
    }
}

impl LibCuda {
    fn check_sys(&self, code: sys::CUresult) -> Result<(), DriverCallError> {
        self.check(code as c_int)
    }

    /// Makes GPU 0's primary context current on the calling thread (retaining it
    /// once): custom-storage mappings and copies live in the caller's context.
    fn bind_context(&self) -> Result<(), DriverCallError> {
        let ctx = self
            .context
            .get_or_init(|| {
                let mut ctx: sys::CUcontext = std::ptr::null_mut();
                // SAFETY: valid out pointer; the driver is initialised and has GPU 0.
                let code = unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, 0) };
                self.check_sys(code).map(|()| ctx as usize)
            })
            .clone()?;
        // SAFETY: `ctx` is a primary context retained above and never released.
        let code = unsafe { sys::cuCtxSetCurrent(ctx as sys::CUcontext) };
        self.check_sys(code)
    }

    /// Reads the driver-owned info block into our own types.
    fn read_info(
        &self,
        info: *mut RawCustomStorageInfo,
    ) -> Result<MappedOperation, DriverCallError> {
        if info.is_null() {
            return Err(DriverCallError {
                code: 999,
                name: "CUDA_ERROR_UNKNOWN (driver returned no custom-storage info)".into(),
            });
        }
        // SAFETY: a non-null info block written by the driver, valid until completion.
        let info = unsafe { &*info };
        let count = usize::try_from(info.device_count).unwrap_or(0);
        let gpus = if count == 0 || info.per_device_data.is_null() {
            Vec::new()
        } else {
            // SAFETY: the driver returns `device_count` entries at `per_device_data`.
            unsafe { std::slice::from_raw_parts(info.per_device_data, count) }
                .iter()
                .map(|d| MappedGpu {
                    ptr: d.dev_ptr,
                    size: u64::try_from(d.size).unwrap_or(u64::MAX),
                    stream: d.stream as u64,
                })
                .collect()
        };
        Ok(MappedOperation {
            handle: info.handle as u64,
            gpus,
        })
    }

    fn restore_with(
        &self,
        pid: u32,
        pairs: &[GpuPair],
        info: *mut *mut RawCustomStorageInfo,
    ) -> Result<(), DriverCallError> {
        let to_raw = |u: &GpuUuid| sys::CUuuid {
            bytes: u.0.map(|b| c_char::from_ne_bytes([b])),
        };
        let mut raw: Vec<RawGpuPair> = pairs
            .iter()
            .map(|p| RawGpuPair {
                old_uuid: to_raw(&p.old),
                new_uuid: to_raw(&p.new),
            })
            .collect();
        let mut args = RawRestoreArgs {
            gpu_pairs: if raw.is_empty() {
                std::ptr::null_mut()
            } else {
                raw.as_mut_ptr()
            },
            gpu_pairs_count: c_uint::try_from(raw.len()).unwrap_or(c_uint::MAX),
            padding0: 0,
            custom_storage_info_out: info,
            reserved: [0; 40],
        };
        // SAFETY: `args` has the 64-byte CUcheckpointRestoreArgs layout; `gpu_pairs`
        // points to `gpu_pairs_count` pairs that outlive the call (or is null with 0);
        // `info` is null or a valid out pointer.
        let code = unsafe { (self.api.restore)(pid_arg(pid)?, &mut args) };
        self.check(code)
    }
}

fn pid_arg(pid: u32) -> Result<c_int, DriverCallError> {
    c_int::try_from(pid).map_err(|_| DriverCallError {
        code: 1,
        name: "CUDA_ERROR_INVALID_VALUE".into(),
    })
}

fn resolve(library: &libloading::Library) -> Result<CheckpointApi, CudaError> {
    fn sym<T: Copy>(library: &libloading::Library, name: &str) -> Result<T, CudaError> {
        // SAFETY: each symbol is looked up with the C signature the CUDA driver API
        // documents for it (see the type aliases above).
        unsafe { library.get::<T>(name.as_bytes()) }
            .map(|s| *s)
            .map_err(|e| {
                load_error(format!(
                    "driver lacks {name} ({e}); the checkpoint API needs driver 550 or newer"
                ))
            })
    }
    Ok(CheckpointApi {
        get_state: sym(library, "cuCheckpointProcessGetState")?,
        get_restore_tid: sym(library, "cuCheckpointProcessGetRestoreThreadId")?,
        lock: sym(library, "cuCheckpointProcessLock")?,
        checkpoint: sym(library, "cuCheckpointProcessCheckpoint")?,
        restore: sym(library, "cuCheckpointProcessRestore")?,
        unlock: sym(library, "cuCheckpointProcessUnlock")?,
        error_name: sym(library, "cuGetErrorName")?,
        complete: sym(library, "cuCheckpointOperationComplete").ok(),
    })
}

/// cudarc opens the driver by its own list of names (`libcuda.so` first). Make sure it
/// got the very library whose checkpoint entry points we call: a toolkit stub found
/// first would leave the real driver uninitialised.
fn same_library_as_cudarc(library: &libloading::Library) -> Result<(), CudaError> {
    type InitFn = unsafe extern "C" fn(c_uint) -> c_int;
    // SAFETY: cuInit has this signature; only its address is used.
    let ours = unsafe { library.get::<InitFn>(b"cuInit") }
        .map(|s| *s as usize)
        .map_err(|e| load_error(format!("driver lacks cuInit: {e}")))?;
    // SAFETY: cudarc already opened its library successfully (result::init ran);
    // `culib` returns that handle, and only the address of cuInit is read.
    let theirs = unsafe { sys::culib().get::<InitFn>(b"cuInit") }
        .map(|s| *s as usize)
        .map_err(|e| load_error(format!("cudarc's driver lacks cuInit: {e}")))?;
    if ours != theirs {
        return Err(load_error(
            "cudarc loaded a different libcuda than libcuda.so.1 (a toolkit stub named \
             libcuda.so earlier on the library path?)",
        ));
    }
    Ok(())
}

fn enumerate() -> Result<Vec<GpuDevice>, CudaError> {
    let count = result::device::get_count()
        .map_err(|e| load_error(format!("cuDeviceGetCount failed: {}", describe(&e))))?;
    let mut devices = Vec::new();
    for ordinal in 0..count {
        let dev = result::device::get(ordinal)
            .map_err(|e| load_error(format!("cuDeviceGet({ordinal}) failed: {}", describe(&e))))?;
        let name = result::device::get_name(dev).map_err(|e| {
            load_error(format!(
                "cuDeviceGetName({ordinal}) failed: {}",
                describe(&e)
            ))
        })?;
        // SAFETY: `dev` was returned by cuDeviceGet.
        let total = unsafe { result::device::total_mem(dev) }.map_err(|e| {
            load_error(format!(
                "cuDeviceTotalMem({ordinal}) failed: {}",
                describe(&e)
            ))
        })?;
        let uuid = result::device::get_uuid(dev).map_err(|e| {
            load_error(format!(
                "cuDeviceGetUuid({ordinal}) failed: {}",
                describe(&e)
            ))
        })?;
        devices.push(GpuDevice {
            uuid: GpuUuid(uuid.bytes.map(|b| b.to_ne_bytes()[0])),
            name,
            total_memory: u64::try_from(total).unwrap_or(u64::MAX),
        });
    }
    Ok(devices)
}

impl CudaDriver for LibCuda {
    fn driver_version(&self) -> i32 {
        self.version
    }

    fn devices(&self) -> &[GpuDevice] {
        &self.devices
    }

    fn process_state(&self, pid: u32) -> Result<ProcessState, DriverCallError> {
        let mut state: c_int = 0;
        // SAFETY: valid out pointer; the driver is initialised.
        let code = unsafe { (self.api.get_state)(pid_arg(pid)?, &mut state) };
        self.check(code).map(|()| ProcessState::from_raw(state))
    }

    fn restore_thread_id(&self, pid: u32) -> Result<u32, DriverCallError> {
        let mut tid: c_int = 0;
        // SAFETY: valid out pointer; the driver is initialised.
        let code = unsafe { (self.api.get_restore_tid)(pid_arg(pid)?, &mut tid) };
        self.check(code)?;
        u32::try_from(tid).map_err(|_| DriverCallError {
            code: 999,
            name: format!("CUDA_ERROR_UNKNOWN (negative restore thread id {tid})"),
        })
    }

    fn lock(&self, pid: u32, timeout: Duration) -> Result<(), DriverCallError> {
        let mut args = sys::CUcheckpointLockArgs {
            timeoutMs: c_uint::try_from(timeout.as_millis()).unwrap_or(c_uint::MAX),
            reserved0: 0,
            reserved1: [0; 7],
        };
        // SAFETY: `args` is a valid, zero-reserved CUcheckpointLockArgs alive for the call.
        let code = unsafe { (self.api.lock)(pid_arg(pid)?, &mut args) };
        self.check(code)
    }

    fn checkpoint(&self, pid: u32) -> Result<(), DriverCallError> {
        let mut args = RawCheckpointArgs {
            custom_storage_info_out: std::ptr::null_mut(),
            reserved: [0; 56],
        };
        // SAFETY: `args` is a valid, zeroed CUcheckpointCheckpointArgs alive for the call.
        let code = unsafe { (self.api.checkpoint)(pid_arg(pid)?, &mut args) };
        self.check(code)
    }

    fn restore(&self, pid: u32, pairs: &[GpuPair]) -> Result<(), DriverCallError> {
        self.restore_with(pid, pairs, std::ptr::null_mut())
    }

    fn unlock(&self, pid: u32) -> Result<(), DriverCallError> {
        let mut args = sys::CUcheckpointUnlockArgs { reserved: [0; 8] };
        // SAFETY: `args` is a valid, zeroed CUcheckpointUnlockArgs alive for the call.
        let code = unsafe { (self.api.unlock)(pid_arg(pid)?, &mut args) };
        self.check(code)
    }

    fn custom_storage_probe(&self) -> Result<(), String> {
        if self.version < CUSTOM_STORAGE_MIN_DRIVER {
            return Err(format!(
                "driver API {} is older than {CUSTOM_STORAGE_MIN_DRIVER} (CUDA 13.4, branch 615)",
                self.version
            ));
        }
        if self.api.complete.is_none() {
            return Err(format!("{LIBCUDA} lacks cuCheckpointOperationComplete"));
        }
        Ok(())
    }

    fn driver_release(&self) -> Option<String> {
        self.nvml.as_ref()?.driver_release().ok()
    }

    fn gpu_usage(&self, pids: &[u32]) -> Option<Vec<u64>> {
        self.nvml.as_ref()?.usage_by_device(pids).ok()
    }

    fn gpu_memory(&self) -> Option<Vec<GpuMemory>> {
        let memory = self.nvml.as_ref()?.memory().ok()?;
        Some(
            memory
                .into_iter()
                .map(|(total, free)| GpuMemory { total, free })
                .collect(),
        )
    }

    fn checkpoint_custom(&self, pid: u32) -> Result<MappedOperation, DriverCallError> {
        self.bind_context()?;
        let mut info: *mut RawCustomStorageInfo = std::ptr::null_mut();
        let mut args = RawCheckpointArgs {
            custom_storage_info_out: &mut info,
            reserved: [0; 56],
        };
        // SAFETY: `args` is a valid CUcheckpointCheckpointArgs whose out pointer
        // outlives the call.
        let code = unsafe { (self.api.checkpoint)(pid_arg(pid)?, &mut args) };
        self.check(code)?;
        self.read_info(info)
    }

    fn restore_custom(
        &self,
        pid: u32,
        pairs: &[GpuPair],
    ) -> Result<MappedOperation, DriverCallError> {
        self.bind_context()?;
        let mut info: *mut RawCustomStorageInfo = std::ptr::null_mut();
        self.restore_with(pid, pairs, &mut info)?;
        self.read_info(info)
    }

    fn complete(&self, handle: u64) -> Result<(), DriverCallError> {
        let Some(complete) = self.api.complete else {
            return Err(DriverCallError {
                code: 801,
                name: "CUDA_ERROR_NOT_SUPPORTED (no cuCheckpointOperationComplete)".into(),
            });
        };
        self.bind_context()?;
        // SAFETY: `handle` came from the driver's info block of a pending operation.
        let code = unsafe { complete(handle as *mut c_void) };
        self.check(code)
    }

    unsafe fn copy_from_gpu(
        &self,
        dst: &mut [u8],
        src: u64,
        stream: u64,
    ) -> Result<(), DriverCallError> {
        self.bind_context()?;
        // SAFETY: the caller keeps `dst` valid until the stream is synchronised; `src`
        // and `stream` come from the driver's info block.
        let code = unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                dst.as_mut_ptr().cast(),
                src,
                dst.len(),
                stream as sys::CUstream,
            )
        };
        self.check_sys(code)
    }

    unsafe fn copy_to_gpu(&self, dst: u64, src: &[u8], stream: u64) -> Result<(), DriverCallError> {
        self.bind_context()?;
        // SAFETY: the caller keeps `src` valid until the stream is synchronised; `dst`
        // and `stream` come from the driver's info block.
        let code = unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst, src.as_ptr().cast(), src.len(), stream as sys::CUstream)
        };
        self.check_sys(code)
    }

    fn synchronize(&self, stream: u64) -> Result<(), DriverCallError> {
        self.bind_context()?;
        // SAFETY: a stream handed out by the driver for a pending operation.
        let code = unsafe { sys::cuStreamSynchronize(stream as sys::CUstream) };
        self.check_sys(code)
    }

    unsafe fn register_host(&self, buf: &mut [u8]) -> Result<(), DriverCallError> {
        self.bind_context()?;
        // SAFETY: the caller keeps the buffer allocated until it is unregistered.
        let code = unsafe { sys::cuMemHostRegister_v2(buf.as_mut_ptr().cast(), buf.len(), 0) };
        self.check_sys(code)
    }

    fn unregister_host(&self, ptr: *mut u8) -> Result<(), DriverCallError> {
        // SAFETY: `ptr` was registered with cuMemHostRegister.
        let code = unsafe { sys::cuMemHostUnregister(ptr.cast()) };
        self.check_sys(code)
    }

    fn gpu_memory_used(&self, pid: u32) -> Result<u64, DriverCallError> {
        match &self.nvml {
            Some(nvml) => match nvml.memory_used_by(pid) {
                Ok(bytes) => Ok(bytes),
                Err(reason) => {
                    tracing::warn!(
                        pid,
                        %reason,
                        "NVML cannot tell this process's GPU memory; assuming all of it"
                    );
                    Ok(self.all_memory())
                }
            },
            None => Ok(self.all_memory()),
        }
    }
}
