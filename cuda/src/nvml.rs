//! The GPU memory a process holds, from NVML (`libnvidia-ml.so.1`): the figure the
//! host-RAM pre-flight needs, which the CUDA driver API does not report for another
//! process.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

const LIBNVML: &str = "libnvidia-ml.so.1";
const NVML_ERROR_INSUFFICIENT_SIZE: c_int = 7;
/// `NVML_VALUE_NOT_AVAILABLE`: NVML may not see a process's usage (e.g. in containers).
const VALUE_NOT_AVAILABLE: u64 = u64::MAX;

/// `nvmlProcessInfo_t` (v2/v3 layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: u64,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

type InitFn = unsafe extern "C" fn() -> c_int;
type CountFn = unsafe extern "C" fn(*mut c_uint) -> c_int;
type HandleFn = unsafe extern "C" fn(c_uint, *mut *mut c_void) -> c_int;
type ProcessesFn = unsafe extern "C" fn(*mut c_void, *mut c_uint, *mut ProcessInfo) -> c_int;
type MemoryFn = unsafe extern "C" fn(*mut c_void, *mut MemoryInfo) -> c_int;
type DriverVersionFn = unsafe extern "C" fn(*mut c_char, c_uint) -> c_int;

/// `nvmlMemory_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct MemoryInfo {
    total: u64,
    free: u64,
    used: u64,
}

/// An initialised NVML.
#[derive(Debug)]
pub(crate) struct Nvml {
    count: CountFn,
    handle: HandleFn,
    processes: ProcessesFn,
    /// Optional: older NVMLs and test doubles may lack them; the gate then says so.
    memory: Option<MemoryFn>,
    driver_version: Option<DriverVersionFn>,
    _library: libloading::Library,
}

impl Nvml {
    /// Opens and initialises NVML.
    pub(crate) fn load() -> Result<Self, String> {
        // SAFETY: loading NVML runs its initialisers, which have no preconditions; the
        // library stays loaded for the life of `Nvml`.
        let library = unsafe { libloading::Library::new(LIBNVML) }.map_err(|e| e.to_string())?;
        fn sym<T: Copy>(library: &libloading::Library, name: &str) -> Result<T, String> {
            // SAFETY: each symbol is looked up with the signature NVML documents for it.
            unsafe { library.get::<T>(name.as_bytes()) }
                .map(|s| *s)
                .map_err(|e| format!("{LIBNVML} lacks {name}: {e}"))
        }
        let init: InitFn = sym(&library, "nvmlInit_v2")?;
        // SAFETY: nvmlInit_v2 takes no arguments.
        let rc = unsafe { init() };
        if rc != 0 {
            return Err(format!("nvmlInit_v2 returned {rc}"));
        }
        Ok(Nvml {
            count: sym(&library, "nvmlDeviceGetCount_v2")?,
            handle: sym(&library, "nvmlDeviceGetHandleByIndex_v2")?,
            processes: sym(&library, "nvmlDeviceGetComputeRunningProcesses_v3")?,
            memory: sym(&library, "nvmlDeviceGetMemoryInfo").ok(),
            driver_version: sym(&library, "nvmlSystemGetDriverVersion").ok(),
            _library: library,
        })
    }

    /// The driver release, e.g. `615.20.04`.
    pub(crate) fn driver_release(&self) -> Result<String, String> {
        let f = self
            .driver_version
            .ok_or("NVML lacks nvmlSystemGetDriverVersion")?;
        let mut buf = [0 as c_char; 96];
        // SAFETY: the buffer holds 96 bytes, the length passed.
        let rc = unsafe { f(buf.as_mut_ptr(), 96) };
        if rc != 0 {
            return Err(format!("nvmlSystemGetDriverVersion returned {rc}"));
        }
        // SAFETY: on success NVML wrote a NUL-terminated string into the buffer.
        let text = unsafe { CStr::from_ptr(buf.as_ptr()) };
        Ok(text.to_string_lossy().into_owned())
    }

    /// Total and free bytes of each GPU, in NVML index order.
    pub(crate) fn memory(&self) -> Result<Vec<(u64, u64)>, String> {
        let f = self.memory.ok_or("NVML lacks nvmlDeviceGetMemoryInfo")?;
        let mut count: c_uint = 0;
        // SAFETY: valid out pointer.
        let rc = unsafe { (self.count)(&mut count) };
        if rc != 0 {
            return Err(format!("nvmlDeviceGetCount_v2 returned {rc}"));
        }
        let mut out = Vec::new();
        for index in 0..count {
            let mut handle: *mut c_void = std::ptr::null_mut();
            // SAFETY: valid out pointer; index < count.
            let rc = unsafe { (self.handle)(index, &mut handle) };
            if rc != 0 {
                return Err(format!(
                    "nvmlDeviceGetHandleByIndex_v2({index}) returned {rc}"
                ));
            }
            let mut info = MemoryInfo::default();
            // SAFETY: a handle NVML returned and a valid out pointer.
            let rc = unsafe { f(handle, &mut info) };
            if rc != 0 {
                return Err(format!(
                    "nvmlDeviceGetMemoryInfo(GPU {index}) returned {rc}"
                ));
            }
            out.push((info.total, info.free));
        }
        Ok(out)
    }

    /// GPU memory `pids` hold together on each GPU, in NVML index order.
    pub(crate) fn usage_by_device(&self, pids: &[u32]) -> Result<Vec<u64>, String> {
        let mut count: c_uint = 0;
        // SAFETY: valid out pointer.
        let rc = unsafe { (self.count)(&mut count) };
        if rc != 0 {
            return Err(format!("nvmlDeviceGetCount_v2 returned {rc}"));
        }
        let mut out = Vec::new();
        for index in 0..count {
            let mut handle: *mut c_void = std::ptr::null_mut();
            // SAFETY: valid out pointer; index < count.
            let rc = unsafe { (self.handle)(index, &mut handle) };
            if rc != 0 {
                return Err(format!(
                    "nvmlDeviceGetHandleByIndex_v2({index}) returned {rc}"
                ));
            }
            let used = self
                .processes_on(handle, index)?
                .iter()
                .filter(|p| pids.contains(&p.pid) && p.used_gpu_memory != VALUE_NOT_AVAILABLE)
                .map(|p| p.used_gpu_memory)
                .sum();
            out.push(used);
        }
        Ok(out)
    }

    /// GPU memory `pid` holds on all devices together.
    pub(crate) fn memory_used_by(&self, pid: u32) -> Result<u64, String> {
        let mut count: c_uint = 0;
        // SAFETY: valid out pointer.
        let rc = unsafe { (self.count)(&mut count) };
        if rc != 0 {
            return Err(format!("nvmlDeviceGetCount_v2 returned {rc}"));
        }
        let mut total = 0u64;
        for index in 0..count {
            let mut handle: *mut c_void = std::ptr::null_mut();
            // SAFETY: valid out pointer; index < count.
            let rc = unsafe { (self.handle)(index, &mut handle) };
            if rc != 0 {
                return Err(format!(
                    "nvmlDeviceGetHandleByIndex_v2({index}) returned {rc}"
                ));
            }
            for info in self.processes_on(handle, index)? {
                if info.pid == pid {
                    if info.used_gpu_memory == VALUE_NOT_AVAILABLE {
                        return Err(format!("usage of pid {pid} on GPU {index} not visible"));
                    }
                    total = total.saturating_add(info.used_gpu_memory);
                }
            }
        }
        Ok(total)
    }

    fn processes_on(&self, handle: *mut c_void, index: c_uint) -> Result<Vec<ProcessInfo>, String> {
        let mut infos: Vec<ProcessInfo> = Vec::new();
        // The process list can grow between the sizing call and the real one; retry.
        for _ in 0..4 {
            let mut count = c_uint::try_from(infos.len()).unwrap_or(c_uint::MAX);
            let ptr = if infos.is_empty() {
                std::ptr::null_mut()
            } else {
                infos.as_mut_ptr()
            };
            // SAFETY: `ptr` points to `count` entries (or is null with count 0).
            let rc = unsafe { (self.processes)(handle, &mut count, ptr) };
            let found = usize::try_from(count).unwrap_or(0);
            match rc {
                0 => {
                    infos.truncate(found);
                    return Ok(infos);
                }
                NVML_ERROR_INSUFFICIENT_SIZE => infos.resize(found + 4, ProcessInfo::default()),
                other => {
                    return Err(format!(
                        "nvmlDeviceGetComputeRunningProcesses_v3(GPU {index}) returned {other}"
                    ))
                }
            }
        }
        Err(format!("process list of GPU {index} kept growing"))
    }
}
