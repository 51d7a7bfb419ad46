//! The caller's side of custom-storage checkpoints (CUDA 13.4, driver 615): a
//! checkpoint or restore with `customStorageInfo_out` set maps the target process's
//! device region into the caller's device address space and returns, per device, the
//! mapped pointer, its size and a stream. The caller copies with the asynchronous
//! memcpy calls on that stream, then `cuCheckpointOperationComplete` synchronises the
//! streams, unmaps, and finishes the operation in the target. The bytes go from the
//! region file straight into the caller's buffers: never through the target's memory.

use crate::codes::{
    HOST_MEMORY_ALREADY_REGISTERED, HOST_MEMORY_NOT_REGISTERED, INVALID_HANDLE, INVALID_VALUE,
    OPERATING_SYSTEM, SUCCESS,
};
use crate::{control, node, stream};
use std::collections::BTreeMap;
use std::ffi::{c_int, c_uint, c_void};
use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// `CUcheckpointCustomStoragePerDeviceData`.
#[repr(C)]
#[derive(Debug)]
pub struct PerDeviceData {
    dev_ptr: u64,
    size: usize,
    stream: *mut c_void,
}

/// `CUcheckpointCustomStorageInfo`.
#[repr(C)]
#[derive(Debug)]
pub struct CustomStorageInfo {
    handle: *mut c_void,
    per_device_data: *mut PerDeviceData,
    device_count: c_uint,
}

/// Where mapped regions start in the caller's device address space; each mapping gets
/// its own window, never reused, so a pointer kept past completion stays invalid.
const MAP_BASE: u64 = 0x1000_0000_0000;
/// 128 GiB per mapping: more than any fake device holds.
const MAP_WINDOW: u64 = 1 << 37;
/// The process's own allocations start here (`device::BASE`).
const MAP_END: u64 = 0x7f00_0000_0000;

/// A target's device region, mapped for the caller.
#[derive(Debug)]
struct Mapping {
    len: u64,
    file: Arc<fs::File>,
    target_pid: u32,
}

/// An operation awaiting `cuCheckpointOperationComplete`.
#[derive(Debug)]
struct Operation {
    pid: u32,
    kind: &'static str,
    mappings: Vec<u64>,
    streams: Vec<u64>,
    /// The info block handed out (freed when the operation ends).
    info: usize,
}

struct Tables {
    operations: BTreeMap<u64, Operation>,
    mappings: BTreeMap<u64, Mapping>,
    registered: BTreeMap<usize, usize>,
}

static TABLES: Mutex<Tables> = Mutex::new(Tables {
    operations: BTreeMap::new(),
    mappings: BTreeMap::new(),
    registered: BTreeMap::new(),
});
static NEXT_WINDOW: AtomicU64 = AtomicU64::new(0);
static NEXT_HANDLE: AtomicU64 = AtomicU64::new(0x0c0d_e000);

fn tables() -> MutexGuard<'static, Tables> {
    TABLES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts a custom-storage checkpoint or restore of `pid` (`kind` is the control op,
/// `arg` its argument) and writes the info block to `out`.
///
/// # Safety
/// `out` must be valid for one pointer write.
pub unsafe fn begin(
    pid: u32,
    kind: &'static str,
    arg: &str,
    out: *mut *mut CustomStorageInfo,
) -> c_int {
    let (code, len, path) = control::call_detailed(pid, kind, arg);
    if code != SUCCESS {
        return code;
    }
    let mut per_device = Vec::new();
    let mut mappings = Vec::new();
    let mut streams = Vec::new();
    if path != "-" {
        let opened = fs::OpenOptions::new().read(true).write(true).open(&path);
        let (Ok(file), Some(handle)) = (opened, stream::create()) else {
            let _ = control::call(pid, "finish", "abandon");
            return OPERATING_SYSTEM;
        };
        let base = MAP_BASE + MAP_WINDOW * NEXT_WINDOW.fetch_add(1, Ordering::Relaxed);
        let len = u64::try_from(len).unwrap_or(0);
        tables().mappings.insert(
            base,
            Mapping {
                len,
                file: Arc::new(file),
                target_pid: pid,
            },
        );
        mappings.push(base);
        streams.push(handle);
        per_device.push(PerDeviceData {
            dev_ptr: base,
            size: usize::try_from(len).unwrap_or(usize::MAX),
            stream: handle as *mut c_void,
        });
    }
    let handle = NEXT_HANDLE.fetch_add(0x10, Ordering::Relaxed);
    let device_count = c_uint::try_from(per_device.len()).unwrap_or(0);
    let per_device_data = if per_device.is_empty() {
        std::ptr::null_mut()
    } else {
        Box::into_raw(per_device.into_boxed_slice()).cast::<PerDeviceData>()
    };
    let info = Box::into_raw(Box::new(CustomStorageInfo {
        handle: handle as *mut c_void,
        per_device_data,
        device_count,
    }));
    tables().operations.insert(
        handle,
        Operation {
            pid,
            kind,
            mappings,
            streams,
            info: info as usize,
        },
    );
    // SAFETY: the caller passes a valid out pointer.
    unsafe { out.write(info) };
    SUCCESS
}

/// Frees an info block handed out by [`begin`].
fn free_info(info: usize) {
    let info = info as *mut CustomStorageInfo;
    // SAFETY: `info` came from Box::into_raw in `begin` and is freed once, here.
    let info = unsafe { Box::from_raw(info) };
    if !info.per_device_data.is_null() {
        let count = usize::try_from(info.device_count).unwrap_or(0);
        let slice = std::ptr::slice_from_raw_parts_mut(info.per_device_data, count);
        // SAFETY: the array came from a boxed slice of `count` elements in `begin`.
        drop(unsafe { Box::from_raw(slice) });
    }
}

/// Ends operation `handle`: synchronises its streams, unmaps, and tells the target
/// whether the copies are done.
fn complete(handle: u64) -> c_int {
    let Some(pid) = tables().operations.get(&handle).map(|op| op.pid) else {
        return INVALID_HANDLE;
    };
    let injected = node::honour_fault("complete", pid, None);
    let Some(op) = tables().operations.remove(&handle) else {
        return INVALID_HANDLE;
    };
    let mut code = injected.unwrap_or(SUCCESS);
    for &s in &op.streams {
        let synced = stream::destroy(s);
        if code == SUCCESS {
            code = synced;
        }
    }
    {
        let mut t = tables();
        for base in &op.mappings {
            t.mappings.remove(base);
        }
    }
    free_info(op.info);
    let verdict = if code == SUCCESS { "done" } else { "abandon" };
    let (finished, _) = control::call(op.pid, "finish", verdict);
    node::log_call(&format!("complete_{} {} {code}", op.kind, op.pid));
    if code == SUCCESS {
        finished
    } else {
        code
    }
}

/// The driver's `cuCheckpointOperationComplete`, simulated.
#[no_mangle]
pub extern "C" fn cuCheckpointOperationComplete(handle: *mut c_void) -> c_int {
    complete(handle as u64)
}

/// A mapped range: the file and the offset of `ptr` in it, when `len` bytes fit.
fn mapped(ptr: u64, len: u64) -> Result<Option<(Arc<fs::File>, u64, u32)>, c_int> {
    if !(MAP_BASE..MAP_END).contains(&ptr) {
        return Ok(None);
    }
    let t = tables();
    let Some((&base, m)) = t.mappings.range(..=ptr).next_back() else {
        return Err(INVALID_VALUE);
    };
    let offset = ptr - base;
    if offset.checked_add(len).is_none_or(|end| end > m.len) {
        return Err(INVALID_VALUE);
    }
    Ok(Some((Arc::clone(&m.file), offset, m.target_pid)))
}

fn copy_job(ptr: u64, host: usize, len: usize, to_device: bool, stream: u64) -> c_int {
    let target = match mapped(ptr, crate::device::byte_len(len)) {
        Ok(Some(m)) => m,
        Ok(None) => return crate::device_copy(ptr, host, len, to_device),
        Err(code) => return code,
    };
    let (file, offset, pid) = target;
    if let Some(code) = node::honour_fault("copy", pid, None) {
        return code;
    }
    // `host` crosses to the stream worker as an address: the caller keeps the buffer
    // alive until the stream is synchronised, as the CUDA API requires.
    stream::enqueue(
        stream,
        Box::new(move || {
            let done = if to_device {
                // SAFETY: the caller keeps `len` readable bytes at `host` until the
                // stream is synchronised.
                let src = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
                file.write_all_at(src, offset)
            } else {
                // SAFETY: the caller keeps `len` writable bytes at `host` until the
                // stream is synchronised.
                let dst = unsafe { std::slice::from_raw_parts_mut(host as *mut u8, len) };
                file.read_exact_at(dst, offset)
            };
            if done.is_ok() {
                SUCCESS
            } else {
                OPERATING_SYSTEM
            }
        }),
    )
}

/// A synchronous copy between host memory and a mapping; `None` when `ptr` is not in
/// the mapping space (the process's own allocations).
pub fn copy_now(ptr: u64, host: usize, len: usize, to_device: bool) -> Option<c_int> {
    let (file, offset, pid) = match mapped(ptr, crate::device::byte_len(len)) {
        Ok(Some(m)) => m,
        Ok(None) => return None,
        Err(code) => return Some(code),
    };
    if let Some(code) = node::honour_fault("copy", pid, None) {
        return Some(code);
    }
    let done = if to_device {
        // SAFETY: the caller guarantees `len` readable bytes at `host`.
        let src = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        file.write_all_at(src, offset)
    } else {
        // SAFETY: the caller guarantees `len` writable bytes at `host`.
        let dst = unsafe { std::slice::from_raw_parts_mut(host as *mut u8, len) };
        file.read_exact_at(dst, offset)
    };
    Some(if done.is_ok() {
        SUCCESS
    } else {
        OPERATING_SYSTEM
    })
}

/// The driver's `cuMemcpyDtoHAsync_v2`, simulated.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: u64,
    len: usize,
    stream: *mut c_void,
) -> c_int {
    if dst.is_null() {
        return INVALID_VALUE;
    }
    copy_job(src, dst as usize, len, false, stream as u64)
}

/// The driver's `cuMemcpyHtoDAsync_v2`, simulated.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: u64,
    src: *const c_void,
    len: usize,
    stream: *mut c_void,
) -> c_int {
    if src.is_null() {
        return INVALID_VALUE;
    }
    copy_job(dst, src as usize, len, true, stream as u64)
}

/// The driver's `cuStreamSynchronize`, simulated.
#[no_mangle]
pub extern "C" fn cuStreamSynchronize(stream: *mut c_void) -> c_int {
    if let Some(code) = node::honour_fault("sync", node::own_pid(), None) {
        return code;
    }
    stream::synchronize(stream as u64)
}

/// The driver's `cuStreamQuery`, simulated.
#[no_mangle]
pub extern "C" fn cuStreamQuery(stream: *mut c_void) -> c_int {
    stream::query(stream as u64)
}

/// The driver's `cuMemHostRegister_v2`, simulated: page-locks nothing, but keeps the
/// range so that overlapping registrations and unknown unregistrations fail as they do
/// on the real driver.
#[no_mangle]
pub extern "C" fn cuMemHostRegister_v2(ptr: *mut c_void, len: usize, _flags: c_uint) -> c_int {
    if ptr.is_null() || len == 0 {
        return INVALID_VALUE;
    }
    if let Some(code) = node::honour_fault("host_register", node::own_pid(), None) {
        return code;
    }
    let start = ptr as usize;
    let mut t = tables();
    let overlaps = t
        .registered
        .range(..start.saturating_add(len))
        .next_back()
        .is_some_and(|(&s, &l)| s + l > start);
    if overlaps {
        return HOST_MEMORY_ALREADY_REGISTERED;
    }
    t.registered.insert(start, len);
    SUCCESS
}

/// The driver's `cuMemHostUnregister`, simulated.
#[no_mangle]
pub extern "C" fn cuMemHostUnregister(ptr: *mut c_void) -> c_int {
    match tables().registered.remove(&(ptr as usize)) {
        Some(_) => SUCCESS,
        None => HOST_MEMORY_NOT_REGISTERED,
    }
}
