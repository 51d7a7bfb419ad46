//! The NVML calls the agent makes to learn how much GPU memory each process holds:
//! the sizes of that process's live device regions.

use crate::node;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::fs;

const NVML_SUCCESS: c_int = 0;
const NVML_ERROR_INVALID_ARGUMENT: c_int = 2;
const NVML_ERROR_INSUFFICIENT_SIZE: c_int = 7;

/// `nvmlProcessInfo_t` (v2/v3 layout).
#[repr(C)]
#[derive(Debug)]
pub struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: u64,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// NVML's `nvmlInit_v2`, simulated.
#[no_mangle]
pub extern "C" fn nvmlInit_v2() -> c_int {
    NVML_SUCCESS
}

/// NVML's `nvmlShutdown`, simulated.
#[no_mangle]
pub extern "C" fn nvmlShutdown() -> c_int {
    NVML_SUCCESS
}

/// NVML's `nvmlDeviceGetCount_v2`, simulated.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> c_int {
    if count.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: valid out pointer (checked non-null).
    unsafe { count.write(c_uint::try_from(node::devices().len()).unwrap_or(0)) };
    NVML_SUCCESS
}

/// NVML's `nvmlDeviceGetHandleByIndex_v2`, simulated.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    handle: *mut *mut c_void,
) -> c_int {
    let Some(i) = usize::try_from(index)
        .ok()
        .filter(|&i| i < node::devices().len())
    else {
        return NVML_ERROR_INVALID_ARGUMENT;
    };
    if handle.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: valid out pointer; the handle is the index plus one, opaque to callers.
    unsafe { handle.write(std::ptr::null_mut::<c_void>().wrapping_byte_add(i + 1)) };
    NVML_SUCCESS
}

fn processes_on(index: usize) -> Vec<(u32, u64)> {
    let (Some(dir), Some(device)) = (node::dir(), node::devices().into_iter().nth(index)) else {
        return Vec::new();
    };
    let path = dir.join("vram").join(node::format_uuid(&device.uuid));
    let Ok(entries) = fs::read_dir(path) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let (pid, start) = name.strip_suffix(".bin")?.split_once('-')?;
            let (pid, start) = (pid.parse::<u32>().ok()?, start.parse::<u64>().ok()?);
            (node::start_time(pid) == Some(start)).then_some((pid, e.metadata().ok()?.len()))
        })
        .collect()
}

/// NVML's `nvmlDeviceGetComputeRunningProcesses_v3`, simulated.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    handle: *mut c_void,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> c_int {
    let Some(index) = handle.addr().checked_sub(1) else {
        return NVML_ERROR_INVALID_ARGUMENT;
    };
    if count.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    let found = processes_on(index);
    // SAFETY: valid in/out pointer (checked non-null).
    let capacity = usize::try_from(unsafe { count.read() }).unwrap_or(0);
    // SAFETY: as above.
    unsafe { count.write(c_uint::try_from(found.len()).unwrap_or(0)) };
    if found.len() > capacity || (infos.is_null() && !found.is_empty()) {
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    for (i, (pid, used)) in found.into_iter().enumerate() {
        // SAFETY: the caller's array holds `capacity` entries and i < capacity.
        unsafe {
            infos.add(i).write(ProcessInfo {
                pid,
                used_gpu_memory: used,
                gpu_instance_id: u32::MAX,
                compute_instance_id: u32::MAX,
            });
        }
    }
    NVML_SUCCESS
}

/// `nvmlMemory_t`.
#[repr(C)]
#[derive(Debug)]
pub struct Memory {
    total: u64,
    free: u64,
    used: u64,
}

/// NVML's `nvmlDeviceGetMemoryInfo`, simulated: total, free and used bytes of a device
/// (the regions of live processes and the node's `occupied` memory count as used).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    handle: *mut c_void,
    memory: *mut Memory,
) -> c_int {
    let device = handle
        .addr()
        .checked_sub(1)
        .and_then(|i| node::devices().into_iter().nth(i));
    let (Some(device), false) = (device, memory.is_null()) else {
        return NVML_ERROR_INVALID_ARGUMENT;
    };
    let used = crate::device::used_on(&device.uuid).min(device.total_bytes);
    // SAFETY: valid out pointer (checked non-null).
    unsafe {
        memory.write(Memory {
            total: device.total_bytes,
            free: device.total_bytes - used,
            used,
        });
    }
    NVML_SUCCESS
}

/// NVML's `nvmlSystemGetDriverVersion`, simulated: the node's `driver_release`.
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) -> c_int {
    let text = node::driver_release();
    let Ok(length) = usize::try_from(length) else {
        return NVML_ERROR_INVALID_ARGUMENT;
    };
    if version.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if text.len() + 1 > length {
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: the caller's buffer holds `length` bytes; we write len + 1 <= length.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), version.cast::<u8>(), text.len());
        version.add(text.len()).write(0);
    }
    NVML_SUCCESS
}
