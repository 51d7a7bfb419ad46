//! The simulated node: which devices exist, which driver version it reports, which
//! faults it injects. Everything lives under the directory named by
//! `KYBERNATE_FAKE_CUDA_DIR`, so a test owns its node and changes it by writing files:
//!
//! - `devices`: one device per line, `GPU-<uuid> <total MiB> <name...>`;
//! - `driver_version`: e.g. `13000` (default when absent);
//! - `driver_release`: the driver release NVML reports, e.g. `615.20.04`;
//! - `occupied`: GPU memory held by processes outside the test, one line per device,
//!   `GPU-<uuid> <MiB>` (it counts as used for allocations, restores and free memory);
//! - `no_custom_storage`: when present, the driver refuses custom-storage checkpoints and
//!   restores with `CUDA_ERROR_NOT_SUPPORTED` (an older kernel module);
//! - `faults`: one fault per line, `<op> fail=<code>|hang [pid=<pid>] [nth=<n>]`, where
//!   `<op>` is `state`, `restore_tid`, `lock`, `checkpoint`, `restore`, `unlock`, or one
//!   of the custom-storage calls `checkpoint_custom`, `restore_custom`, `copy` (an
//!   asynchronous copy from or to a mapping), `complete`, `sync` (stream
//!   synchronisation) and `host_register`. `pid` names the target process of the
//!   checkpoint operation; `nth` makes a failure hit only the n-th such call made in
//!   the process that runs it (counted from 1, since the fault list last changed);
//! - `vram/<uuid>/<pid>-<starttime>.bin`: the device memory of one process;
//! - `ctl/<pid>/`: the control channel of one CUDA process (see `control`);
//! - `calls.log`: every checkpoint-API call made by a caller, with its result.
//!
//! Processes are named by their pids in the host's pid namespace, the ones the agent sees.
//! A process in a container (its own pid namespace) finds its host pid through the host's
//! procfs mounted into the container at the path `KYBERNATE_FAKE_CUDA_HOST_PROC` names:
//! that procfs resolves `self` in the host's namespace. A container restored by CRIU gets
//! new host pids, so the fake asks again on every use.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

/// The environment variable naming the node directory.
pub const DIR_ENV: &str = "KYBERNATE_FAKE_CUDA_DIR";
const DEFAULT_DRIVER_VERSION: i32 = 13000;
const DEFAULT_DRIVER_RELEASE: &str = "580.82.07";

/// The environment variable naming the host's procfs inside a container.
pub const HOST_PROC_ENV: &str = "KYBERNATE_FAKE_CUDA_HOST_PROC";

/// The procfs whose pids name processes on this node: the host's.
pub fn proc_root() -> PathBuf {
    std::env::var_os(HOST_PROC_ENV).map_or_else(|| PathBuf::from("/proc"), PathBuf::from)
}

/// This process's pid in the host's pid namespace.
pub fn own_pid() -> u32 {
    if std::env::var_os(HOST_PROC_ENV).is_none() {
        return std::process::id();
    }
    fs::read_link(proc_root().join("self"))
        .ok()
        .and_then(|p| p.to_str()?.parse().ok())
        .unwrap_or_else(std::process::id)
}

/// The calling thread's id in the host's pid namespace.
pub fn own_tid() -> i32 {
    // SAFETY: gettid has no preconditions.
    let local = unsafe { libc::gettid() };
    if std::env::var_os(HOST_PROC_ENV).is_none() {
        return local;
    }
    // `thread-self` reads `<pid>/task/<tid>`.
    fs::read_link(proc_root().join("thread-self"))
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse().ok())
        .unwrap_or(local)
}

/// One simulated GPU.
#[derive(Clone, Debug)]
pub struct Device {
    pub uuid: [u8; 16],
    pub total_bytes: u64,
    pub name: String,
}

/// The node directory, or `None` when the variable is unset (the fake then has no devices).
pub fn dir() -> Option<PathBuf> {
    std::env::var_os(DIR_ENV).map(PathBuf::from)
}

/// Reads the device list; a malformed line is skipped with a note on stderr.
pub fn devices() -> Vec<Device> {
    let Some(dir) = dir() else { return Vec::new() };
    let text = fs::read_to_string(dir.join("devices")).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut parts = line.split_whitespace();
        let uuid = parts.next().and_then(parse_uuid);
        let mib = parts.next().and_then(|m| m.parse::<u64>().ok());
        let name = parts.collect::<Vec<_>>().join(" ");
        match (uuid, mib) {
            (Some(uuid), Some(mib)) if !name.is_empty() => out.push(Device {
                uuid,
                total_bytes: mib * 1024 * 1024,
                name,
            }),
            _ => eprintln!("fake libcuda: bad line in devices file: {line:?}"),
        }
    }
    out
}

/// The reported driver version (`cuDriverGetVersion`).
pub fn driver_version() -> i32 {
    dir()
        .and_then(|d| fs::read_to_string(d.join("driver_version")).ok())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(DEFAULT_DRIVER_VERSION)
}

/// The driver release NVML reports (`nvmlSystemGetDriverVersion`).
pub fn driver_release() -> String {
    dir()
        .and_then(|d| fs::read_to_string(d.join("driver_release")).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| DEFAULT_DRIVER_RELEASE.to_string())
}

/// GPU memory on `uuid` held by processes outside the test (the `occupied` file).
pub fn occupied(uuid: &[u8; 16]) -> u64 {
    let Some(text) = dir().and_then(|d| fs::read_to_string(d.join("occupied")).ok()) else {
        return 0;
    };
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let who = parts.next().and_then(parse_uuid)?;
            let mib = parts.next()?.parse::<u64>().ok()?;
            (who == *uuid).then_some(mib * 1024 * 1024)
        })
        .sum()
}

/// Whether the driver offers custom-storage checkpoints.
pub fn custom_storage_offered() -> bool {
    dir().is_some_and(|d| !d.join("no_custom_storage").exists())
}

/// What a fault line asks the fake to do in a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Fail(i32),
    Hang,
}

/// One parsed fault line that applies to `op` on `pid`.
fn fault_lines(op: &str, pid: u32) -> Vec<(Fault, Option<u32>)> {
    let Some(text) = dir().and_then(|d| fs::read_to_string(d.join("faults")).ok()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if parts.next() != Some(op) {
            continue;
        }
        let Some(action) = parts.next() else { continue };
        let mut applies = true;
        let mut nth = None;
        for option in parts {
            if let Some(p) = option.strip_prefix("pid=") {
                applies &= p.parse::<u32>().ok() == Some(pid);
            } else if let Some(n) = option.strip_prefix("nth=") {
                nth = n.parse::<u32>().ok();
            }
        }
        if !applies {
            continue;
        }
        if action == "hang" {
            out.push((Fault::Hang, nth));
        } else if let Some(code) = action.strip_prefix("fail=").and_then(|c| c.parse().ok()) {
            out.push((Fault::Fail(code), nth));
        }
    }
    out
}

/// The fault configured for `op` on `pid`, if any (ignoring `nth`): used while a hang
/// lasts.
pub fn fault(op: &str, pid: u32) -> Option<Fault> {
    fault_lines(op, pid).first().map(|(f, _)| *f)
}

/// The fault that hits this call of `op` on `pid`: counts the call, so that a line
/// with `nth=<n>` hits only the n-th call made in this process.
pub fn call_fault(op: &str, pid: u32) -> Option<Fault> {
    static CALLS: Mutex<BTreeMap<String, u32>> = Mutex::new(BTreeMap::new());
    // Counting starts afresh whenever the fault list changes.
    let list = dir()
        .and_then(|d| fs::read_to_string(d.join("faults")).ok())
        .unwrap_or_default();
    let count = {
        let mut calls = CALLS.lock().unwrap_or_else(|p| p.into_inner());
        let n = calls.entry(format!("{op}\n{list}")).or_insert(0);
        *n += 1;
        *n
    };
    fault_lines(op, pid)
        .into_iter()
        .find(|(_, nth)| nth.is_none_or(|n| n == count))
        .map(|(f, _)| f)
}

/// Appends one line to `calls.log` (best effort: the log is for tests to read).
pub fn log_call(line: &str) {
    if let Some(dir) = dir() {
        if let Ok(mut f) = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("calls.log"))
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` → 16 bytes.
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let hex: String = text
        .strip_prefix("GPU-")?
        .chars()
        .filter(|c| *c != '-')
        .collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// 16 bytes → `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub fn format_uuid(uuid: &[u8; 16]) -> String {
    let h: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Start time (clock ticks since boot) of a process: with the pid it identifies one
/// incarnation, so a process restored by CRIU is a new incarnation of the same pid.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(proc_root().join(pid.to_string()).join("stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// Deletes device regions whose owning process incarnation no longer exists: the
/// device frees the memory of a process that died.
pub fn free_dead_regions() {
    let Some(dir) = dir() else { return };
    let Ok(devices) = fs::read_dir(dir.join("vram")) else {
        return;
    };
    for device in devices.flatten() {
        let Ok(regions) = fs::read_dir(device.path()) else {
            continue;
        };
        for region in regions.flatten() {
            let name = region.file_name().to_string_lossy().into_owned();
            let Some((pid, start)) = name
                .strip_suffix(".bin")
                .and_then(|s| s.split_once('-'))
                .and_then(|(p, s)| Some((p.parse::<u32>().ok()?, s.parse::<u64>().ok()?)))
            else {
                continue;
            };
            if start_time(pid) != Some(start) {
                let _ = fs::remove_file(region.path());
            }
        }
    }
}

/// Applies the fault configured for this call of `op` on `pid`: `Some(code)` to fail
/// with; `None` to go on (at once, or after a hang was lifted). A hang with a timeout
/// gives up with `CUDA_ERROR_TIMEOUT`, as the driver's lock does.
pub fn honour_fault(op: &str, pid: u32, timeout: Option<std::time::Duration>) -> Option<i32> {
    match call_fault(op, pid)? {
        Fault::Fail(code) => Some(code),
        Fault::Hang => {
            let waited = std::time::Instant::now();
            while fault(op, pid) == Some(Fault::Hang) {
                if timeout.is_some_and(|t| waited.elapsed() >= t) {
                    return Some(crate::codes::TIMEOUT);
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            None
        }
    }
}
