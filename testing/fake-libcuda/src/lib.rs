//! A test double of the NVIDIA user-space driver, built as `libcuda.so.1`.
//!
//! It implements exactly the driver entry points Kybernate and its test workloads call
//! (through cudarc and through the checkpoint API resolved by hand), plus the NVML calls
//! the agent uses to learn how much GPU memory a process holds, so a symlink named
//! `libnvidia-ml.so.1` to this file serves both. Device memory lives in files under
//! the node directory (`KYBERNATE_FAKE_CUDA_DIR`), outside every process, and follows
//! the real checkpoint semantics; see `device` and `control`. Tests only: never shipped.

// The exported functions are C entry points; their safety contract is the CUDA driver
// API's documentation for the function of the same name.
#![allow(clippy::missing_safety_doc)]

mod codes;
mod control;
mod custom;
mod device;
mod node;
mod nvml;
mod stream;

use codes::{INVALID_DEVICE, INVALID_VALUE, NOT_INITIALIZED, SUCCESS};
use std::ffi::{c_char, c_int, c_uint, c_void};

/// `CUcheckpointLockArgs`.
#[repr(C)]
#[derive(Debug)]
pub struct LockArgs {
    timeout_ms: c_uint,
    _reserved0: c_uint,
    _reserved1: [u64; 7],
}

/// `CUcheckpointGpuPair`.
#[repr(C)]
#[derive(Debug)]
pub struct GpuPair {
    old_uuid: [u8; 16],
    new_uuid: [u8; 16],
}

/// `CUcheckpointRestoreArgs` as of CUDA 13.4 (64 bytes, as in 12.8 and 13.0, whose
/// callers leave the custom-storage pointer zeroed as reserved).
#[repr(C)]
#[derive(Debug)]
pub struct RestoreArgs {
    gpu_pairs: *const GpuPair,
    gpu_pairs_count: c_uint,
    _padding0: c_uint,
    custom_storage_info_out: *mut *mut custom::CustomStorageInfo,
    _reserved: [c_char; 40],
}

/// `CUcheckpointCheckpointArgs` as of CUDA 13.4 (64 bytes).
#[repr(C)]
#[derive(Debug)]
pub struct CheckpointArgs {
    custom_storage_info_out: *mut *mut custom::CustomStorageInfo,
    _reserved: [c_char; 56],
}

const _: () = assert!(std::mem::size_of::<RestoreArgs>() == 64);
const _: () = assert!(std::mem::size_of::<CheckpointArgs>() == 64);

fn device_at(ordinal: c_int) -> Result<node::Device, c_int> {
    let devices = device::devices()?;
    usize::try_from(ordinal)
        .ok()
        .and_then(|i| devices.into_iter().nth(i))
        .ok_or(INVALID_DEVICE)
}

/// The driver's `cuInit`, simulated.
#[no_mangle]
pub extern "C" fn cuInit(_flags: c_uint) -> c_int {
    device::init()
}

/// The driver's `cuDriverGetVersion`, simulated.
#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> c_int {
    if version.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: the caller passes a valid pointer (checked non-null).
    unsafe { version.write(node::driver_version()) };
    SUCCESS
}

/// The driver's `cuDeviceGetCount`, simulated.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> c_int {
    if count.is_null() {
        return INVALID_VALUE;
    }
    match device::devices() {
        Ok(d) => {
            // SAFETY: valid out pointer (checked non-null).
            unsafe { count.write(c_int::try_from(d.len()).unwrap_or(c_int::MAX)) };
            SUCCESS
        }
        Err(code) => code,
    }
}

/// The driver's `cuDeviceGet`, simulated.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(dev: *mut c_int, ordinal: c_int) -> c_int {
    if dev.is_null() {
        return INVALID_VALUE;
    }
    match device_at(ordinal) {
        Ok(_) => {
            // SAFETY: valid out pointer (checked non-null).
            unsafe { dev.write(ordinal) };
            SUCCESS
        }
        Err(code) => code,
    }
}

/// The driver's `cuDeviceGetName`, simulated.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: c_int) -> c_int {
    let Ok(len) = usize::try_from(len) else {
        return INVALID_VALUE;
    };
    if name.is_null() || len == 0 {
        return INVALID_VALUE;
    }
    match device_at(dev) {
        Ok(d) => {
            let bytes = d.name.as_bytes();
            let n = bytes.len().min(len - 1);
            // SAFETY: the caller's buffer holds `len` bytes; we write n + 1 <= len.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), name.cast::<u8>(), n);
                name.add(n).write(0);
            }
            SUCCESS
        }
        Err(code) => code,
    }
}

/// The driver's `cuDeviceTotalMem_v2`, simulated.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: c_int) -> c_int {
    if bytes.is_null() {
        return INVALID_VALUE;
    }
    match device_at(dev) {
        Ok(d) => {
            // SAFETY: valid out pointer (checked non-null).
            unsafe { bytes.write(usize::try_from(d.total_bytes).unwrap_or(usize::MAX)) };
            SUCCESS
        }
        Err(code) => code,
    }
}

/// The driver's `cuDeviceGetUuid`, simulated.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut [u8; 16], dev: c_int) -> c_int {
    if uuid.is_null() {
        return INVALID_VALUE;
    }
    match device_at(dev) {
        Ok(d) => {
            // SAFETY: CUuuid is 16 bytes; valid out pointer (checked non-null).
            unsafe { uuid.write(d.uuid) };
            SUCCESS
        }
        Err(code) => code,
    }
}

/// The driver's `cuDeviceGetUuid_v2`, simulated.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut [u8; 16], dev: c_int) -> c_int {
    // SAFETY: same contract as cuDeviceGetUuid.
    unsafe { cuDeviceGetUuid(uuid, dev) }
}

/// The driver's `cuGetErrorName`, simulated.
#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(code: c_int, out: *mut *const c_char) -> c_int {
    match (out.is_null(), codes::describe(code)) {
        (false, Some((name, _))) => {
            // SAFETY: valid out pointer; the string is static.
            unsafe { out.write(name) };
            SUCCESS
        }
        _ => INVALID_VALUE,
    }
}

/// The driver's `cuGetErrorString`, simulated.
#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(code: c_int, out: *mut *const c_char) -> c_int {
    match (out.is_null(), codes::describe(code)) {
        (false, Some((_, text))) => {
            // SAFETY: valid out pointer; the string is static.
            unsafe { out.write(text) };
            SUCCESS
        }
        _ => INVALID_VALUE,
    }
}

/// The driver's `cuDevicePrimaryCtxRetain`, simulated.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut *mut c_void, dev: c_int) -> c_int {
    if ctx.is_null() {
        return INVALID_VALUE;
    }
    let code = device::retain_context(dev);
    if code == SUCCESS {
        // A CUDA process from now on: its control channel starts.
        control::serve();
        let handle = 0x1000 + usize::try_from(dev).unwrap_or(0);
        // SAFETY: valid out pointer; the handle is opaque to callers.
        unsafe { ctx.write(handle as *mut c_void) };
    }
    code
}

/// The driver's `cuDevicePrimaryCtxRelease_v2`, simulated.
#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(_dev: c_int) -> c_int {
    SUCCESS
}

/// The driver's `cuCtxSetCurrent`, simulated.
#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(_ctx: *mut c_void) -> c_int {
    SUCCESS
}

/// The driver's `cuMemAlloc_v2`, simulated.
#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(ptr: *mut u64, len: usize) -> c_int {
    if ptr.is_null() {
        return INVALID_VALUE;
    }
    match device::alloc(device::byte_len(len)) {
        Ok(p) => {
            // SAFETY: valid out pointer (checked non-null).
            unsafe { ptr.write(p) };
            SUCCESS
        }
        Err(code) => code,
    }
}

/// The driver's `cuMemFree_v2`, simulated.
#[no_mangle]
pub extern "C" fn cuMemFree_v2(ptr: u64) -> c_int {
    device::free(ptr)
}

/// The driver's `cuMemcpyHtoD_v2`, simulated.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(dst: u64, src: *const c_void, len: usize) -> c_int {
    if src.is_null() {
        return INVALID_VALUE;
    }
    if let Some(code) = custom::copy_now(dst, src as usize, len, true) {
        return code;
    }
    // SAFETY: the caller guarantees `src` points to `len` readable bytes.
    let src = unsafe { std::slice::from_raw_parts(src.cast::<u8>(), len) };
    device::write(dst, src)
}

/// The driver's `cuMemcpyDtoH_v2`, simulated.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: u64, len: usize) -> c_int {
    if dst.is_null() {
        return INVALID_VALUE;
    }
    if let Some(code) = custom::copy_now(src, dst as usize, len, false) {
        return code;
    }
    // SAFETY: the caller guarantees `dst` points to `len` writable bytes.
    let dst = unsafe { std::slice::from_raw_parts_mut(dst.cast::<u8>(), len) };
    device::read(src, dst)
}

/// The driver's `cuMemGetInfo_v2`, simulated.
#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> c_int {
    if free.is_null() || total.is_null() {
        return INVALID_VALUE;
    }
    match device::mem_info() {
        Ok((f, t)) => {
            // SAFETY: valid out pointers (checked non-null).
            unsafe {
                free.write(usize::try_from(f).unwrap_or(usize::MAX));
                total.write(usize::try_from(t).unwrap_or(usize::MAX));
            }
            SUCCESS
        }
        Err(code) => code,
    }
}

fn checkpoint_call(pid: c_int, op: &str, arg: &str) -> (c_int, i64) {
    if device::devices().is_err() {
        return (NOT_INITIALIZED, 0);
    }
    match u32::try_from(pid) {
        Ok(pid) if pid > 0 => control::call(pid, op, arg),
        _ => (INVALID_VALUE, 0),
    }
}

/// The driver's `cuCheckpointProcessGetRestoreThreadId`, simulated.
#[no_mangle]
pub unsafe extern "C" fn cuCheckpointProcessGetRestoreThreadId(
    pid: c_int,
    tid: *mut c_int,
) -> c_int {
    if tid.is_null() {
        return INVALID_VALUE;
    }
    let (code, value) = checkpoint_call(pid, "restore_tid", "");
    if code == SUCCESS {
        // SAFETY: valid out pointer (checked non-null).
        unsafe { tid.write(c_int::try_from(value).unwrap_or(0)) };
    }
    code
}

/// The driver's `cuCheckpointProcessGetState`, simulated.
#[no_mangle]
pub unsafe extern "C" fn cuCheckpointProcessGetState(pid: c_int, state: *mut c_int) -> c_int {
    if state.is_null() {
        return INVALID_VALUE;
    }
    let (code, value) = checkpoint_call(pid, "state", "");
    if code == SUCCESS {
        // SAFETY: valid out pointer (checked non-null).
        unsafe { state.write(c_int::try_from(value).unwrap_or(3)) };
    }
    code
}

/// The driver's `cuCheckpointProcessLock`, simulated.
#[no_mangle]
pub unsafe extern "C" fn cuCheckpointProcessLock(pid: c_int, args: *const LockArgs) -> c_int {
    let timeout_ms = if args.is_null() {
        0
    } else {
        // SAFETY: non-null args point to a CUcheckpointLockArgs.
        unsafe { (*args).timeout_ms }
    };
    checkpoint_call(pid, "lock", &timeout_ms.to_string()).0
}

/// The driver's `cuCheckpointProcessCheckpoint`, simulated: into the process's memory,
/// or into the caller's custom storage when `customStorageInfo_out` is set.
#[no_mangle]
pub unsafe extern "C" fn cuCheckpointProcessCheckpoint(
    pid: c_int,
    args: *const CheckpointArgs,
) -> c_int {
    let out = if args.is_null() {
        std::ptr::null_mut()
    } else {
        // SAFETY: non-null args point to a CUcheckpointCheckpointArgs.
        unsafe { (*args).custom_storage_info_out }
    };
    if out.is_null() {
        return checkpoint_call(pid, "checkpoint", "").0;
    }
    match custom_target(pid) {
        // SAFETY: `out` is the caller's non-null out pointer.
        Ok(pid) => unsafe { custom::begin(pid, "checkpoint_custom", "", out) },
        Err(code) => code,
    }
}

fn custom_target(pid: c_int) -> Result<u32, c_int> {
    if device::devices().is_err() {
        return Err(NOT_INITIALIZED);
    }
    u32::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or(INVALID_VALUE)
}

/// The driver's `cuCheckpointProcessRestore`, simulated: from the process's memory,
/// or from the caller's custom storage when `customStorageInfo_out` is set.
#[no_mangle]
pub unsafe extern "C" fn cuCheckpointProcessRestore(pid: c_int, args: *const RestoreArgs) -> c_int {
    let mut pairs = Vec::new();
    let mut out = std::ptr::null_mut();
    if !args.is_null() {
        // SAFETY: non-null args point to a CUcheckpointRestoreArgs.
        let args = unsafe { &*args };
        out = args.custom_storage_info_out;
        let count = usize::try_from(args.gpu_pairs_count).unwrap_or(0);
        if count > 0 {
            if args.gpu_pairs.is_null() {
                return INVALID_VALUE;
            }
            // SAFETY: the caller passes `count` pairs at `gpu_pairs`.
            let raw = unsafe { std::slice::from_raw_parts(args.gpu_pairs, count) };
            pairs.extend(raw.iter().map(|p| (p.old_uuid, p.new_uuid)));
        }
    }
    let pairs = control::format_pairs(&pairs);
    if out.is_null() {
        return checkpoint_call(pid, "restore", &pairs).0;
    }
    match custom_target(pid) {
        // SAFETY: `out` is the caller's non-null out pointer.
        Ok(pid) => unsafe { custom::begin(pid, "restore_custom", &pairs, out) },
        Err(code) => code,
    }
}

/// A copy between host memory and the process's own allocations, on behalf of the
/// asynchronous memcpy calls (done at once: the fake's own memory has no engine).
pub(crate) fn device_copy(ptr: u64, host: usize, len: usize, to_device: bool) -> c_int {
    if to_device {
        // SAFETY: the caller guarantees `len` readable bytes at `host`.
        let src = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        device::write(ptr, src)
    } else {
        // SAFETY: the caller guarantees `len` writable bytes at `host`.
        let dst = unsafe { std::slice::from_raw_parts_mut(host as *mut u8, len) };
        device::read(ptr, dst)
    }
}

/// The driver's `cuCheckpointProcessUnlock`, simulated.
#[no_mangle]
pub extern "C" fn cuCheckpointProcessUnlock(pid: c_int, _args: *const c_void) -> c_int {
    checkpoint_call(pid, "unlock", "").0
}
